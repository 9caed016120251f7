//! Anti-rollback of signed patches: under `--trusted-keys`, a patch whose
//! signed level is lower than the highest level applied so far cannot be
//! brought back (applied, enabled or rolled back to), unless the VMM allows
//! downgrades. An old signed patch replayed would revert a security fix
//! as surely as an unsigned one; the signature covers the level, so the
//! file cannot claim a higher one (see [`crate::signature`]).

use super::{Engine, EngineError, Prepared};

/// The highest signed level a transition committed, and by which patch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Floor {
    pub(super) level: u16,
    pub(super) patch: Option<String>,
}

impl Engine {
    /// Refuses, from now on, transitions that enable a patch below the
    /// highest signed level applied (the VMM calls this with trusted keys
    /// and without `--allow-downgrade`).
    pub fn enforce_levels(&mut self) {
        self.floor.get_or_insert_with(Floor::default);
    }

    /// The signed level of every patch `p` enables (0 for a patch without
    /// one), checked against the highest level applied.
    pub fn check_levels(&self, p: &Prepared) -> Result<(), EngineError> {
        let Some(floor) = &self.floor else {
            return Ok(());
        };
        for name in p.calls.enabling() {
            let level = self.level_of(p, name);
            if level < floor.level {
                return Err(EngineError::Downgrade {
                    patch: name.to_owned(),
                    level,
                    highest: floor.level,
                    by: floor.patch.clone().unwrap_or_default(),
                });
            }
        }
        Ok(())
    }

    /// After `p` committed: the highest level now applied.
    pub(super) fn raise_floor(&mut self, p: &Prepared) {
        let levels: Vec<(u16, String)> = p
            .calls
            .enabling()
            .map(|n| (self.level_of(p, n), n.to_owned()))
            .collect();
        if let Some(floor) = self.floor.as_mut() {
            for (level, name) in levels {
                if level > floor.level {
                    *floor = Floor {
                        level,
                        patch: Some(name),
                    };
                }
            }
        }
    }

    /// The highest signed level applied, if levels are enforced.
    pub fn level_floor(&self) -> Option<u16> {
        self.floor.as_ref().map(|f| f.level)
    }

    fn level_of(&self, p: &Prepared, name: &str) -> u16 {
        self.records
            .get(name)
            .or(p.record.as_ref().filter(|_| p.name == name))
            .and_then(|r| r.level)
            .unwrap_or(0)
    }
}

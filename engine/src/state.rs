//! klp's system-state rule (`struct klp_state`), as pure logic.
//!
//! The kernel keeps it in `kernel/livepatch/state.c`: a patch may be enabled
//! only if it is compatible with every patch already on klp's list
//! (`klp_is_patch_compatible`), where for each state an enabled patch
//! carries, the new patch must carry the same state id at the same or a
//! higher version, and a cumulative (`.replace`) patch must carry it at all
//! (it takes over every enabled patch, so it must handle every system
//! modification they made). A non-replace patch need not carry states it
//! does not touch.
//!
//! Every transition that enables a patch applies it: apply, enable and
//! rollback. A rollback is checked as the enables and disables it amounts
//! to ([`check_restore`]), so it cannot bring back a patch that `enable`
//! would refuse.

use thiserror::Error;

use crate::module::State;

/// Why klp would refuse to enable a patch next to an enabled one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    /// A replace patch does not carry a state an enabled patch has.
    #[error(
        "patch `{patch}` is incompatible with enabled patch `{holder}`: it replaces every patch \
         but does not carry system state {id} (version {version}) that `{holder}` introduced \
         (klp's klp_is_patch_compatible rule; nothing was written). Add that klp_state to the \
         replace patch, or disable `{holder}` first"
    )]
    Missing {
        /// The patch being enabled.
        patch: String,
        /// The enabled patch that has the state.
        holder: String,
        /// `klp_state.id`.
        id: u64,
        /// The holder's `klp_state.version`.
        version: u32,
    },
    /// A patch carries a state at a lower version than an enabled patch.
    #[error(
        "patch `{patch}` is incompatible with enabled patch `{holder}`: it carries system state \
         {id} at version {version}, older than `{holder}`'s version {held} (klp's \
         klp_is_patch_compatible rule; nothing was written). A patch cannot take over a system \
         state a newer patch changed; disable `{holder}` first, or build the patch with \
         version {held} or higher"
    )]
    Older {
        /// The patch being enabled.
        patch: String,
        /// The enabled patch that has the state at a higher version.
        holder: String,
        /// `klp_state.id`.
        id: u64,
        /// The version the new patch carries.
        version: u32,
        /// The version the holder carries.
        held: u32,
    },
}

/// A patch as the state rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The patch name.
    pub name: &'a str,
    /// `klp_patch.replace`.
    pub replace: bool,
    /// Its `klp_state`s.
    pub states: &'a [State],
}

/// klp's `klp_is_patch_compatible`: whether `patch` may be enabled while
/// every patch in `holders` is enabled (the patch itself is skipped if it
/// is among them).
pub fn check<'a>(
    patch: Holder<'_>,
    holders: impl IntoIterator<Item = Holder<'a>>,
) -> Result<(), StateError> {
    for h in holders.into_iter().filter(|h| h.name != patch.name) {
        for old in h.states {
            match patch.states.iter().find(|s| s.id == old.id) {
                None if patch.replace => {
                    return Err(StateError::Missing {
                        patch: patch.name.to_owned(),
                        holder: h.name.to_owned(),
                        id: old.id,
                        version: old.version,
                    })
                }
                Some(s) if s.version < old.version => {
                    return Err(StateError::Older {
                        patch: patch.name.to_owned(),
                        holder: h.name.to_owned(),
                        id: old.id,
                        version: s.version,
                        held: old.version,
                    })
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The state rule for a rollback from the patches enabled `now` to those
/// enabled `after` (each oldest first, in stack order). A rollback amounts
/// to disabling what it disables and then enabling, in order, what it
/// enables; so each patch it enables is checked as `enable` would check it
/// then: against the patches that stay enabled, the ones it enabled before
/// it, and, when the rollback enables a replace patch (a replace: the
/// patches it takes out of use run no unpatch callbacks, so their system
/// states stay), also every patch enabled now.
pub fn check_restore(now: &[Holder<'_>], after: &[Holder<'_>]) -> Result<(), StateError> {
    let enabled_now = |n: &str| now.iter().any(|h| h.name == n);
    let enabling: Vec<Holder<'_>> = after
        .iter()
        .filter(|h| !enabled_now(h.name))
        .copied()
        .collect();
    let replace = enabling.iter().any(|h| h.replace);
    let stays = |h: &&Holder<'_>| replace || after.iter().any(|a| a.name == h.name);
    for (i, p) in enabling.iter().enumerate() {
        let holders = now
            .iter()
            .filter(stays)
            .chain(&enabling[..i])
            .copied()
            .collect::<Vec<_>>();
        check(*p, holders)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1V1: State = State { id: 1, version: 1 };
    const S1V2: State = State { id: 1, version: 2 };
    const S2V1: State = State { id: 2, version: 1 };

    fn h<'a>(name: &'a str, replace: bool, states: &'a [State]) -> Holder<'a> {
        Holder {
            name,
            replace,
            states,
        }
    }

    /// klp_is_state_compatible, case by case.
    #[test]
    fn compatibility_follows_klp_is_patch_compatible() {
        let held = [h("old", false, &[S1V2])];
        // Same or higher version: compatible, replace or not.
        for replace in [false, true] {
            assert_eq!(check(h("p", replace, &[S1V2]), held), Ok(()));
            let up = State { id: 1, version: 3 };
            assert_eq!(check(h("p", replace, &[up]), held), Ok(()));
        }
        // Lower version: refused, replace or not.
        for replace in [false, true] {
            let err = check(h("p", replace, &[S1V1]), held).unwrap_err();
            assert!(matches!(err, StateError::Older { held: 2, .. }), "{err}");
            assert!(err.to_string().contains("older than `old`'s version 2"));
        }
        // Missing: only a replace patch must carry it.
        assert_eq!(check(h("p", false, &[S2V1]), held), Ok(()));
        let err = check(h("p", true, &[S2V1]), held).unwrap_err();
        assert!(matches!(err, StateError::Missing { id: 1, .. }), "{err}");
        // A patch is not checked against itself.
        assert_eq!(check(h("old", true, &[S1V1]), held), Ok(()));
    }

    /// The downgrade a rollback could do behind `enable`'s back: r2
    /// (replace, state 1 v2) replaced r1 (replace, state 1 v1); rolling
    /// back to before r2 enables r1 as a replace, and r2's unpatch
    /// callbacks do not run, so state 1 stays at version 2: refused, as
    /// `enable r1` is.
    #[test]
    fn a_rollback_cannot_bring_back_an_older_state_version() {
        let now = [h("r2", true, &[S1V2])];
        let after = [h("r1", true, &[S1V1])];
        let err = check_restore(&now, &after).unwrap_err();
        assert!(matches!(err, StateError::Older { .. }), "{err}");
        assert_eq!(check(after[0], now).unwrap_err(), err, "same as enable");
        // A replace patch that lacks the state is refused too.
        let after = [h("r0", true, &[])];
        assert!(matches!(
            check_restore(&now, &after),
            Err(StateError::Missing { .. })
        ));
    }

    /// A rollback that only disables and enables non-replace patches
    /// amounts to disabling first (the unpatch callbacks undo the system
    /// state) and enabling after: allowed, as that sequence of commands is.
    /// A patch that stays enabled still constrains what comes back.
    #[test]
    fn a_rollback_is_checked_as_the_disables_and_enables_it_amounts_to() {
        // b (state 1 v2) is disabled by the rollback, a (v1) comes back.
        let now = [h("b", false, &[S1V2])];
        let after = [h("a", false, &[S1V1])];
        assert_eq!(check_restore(&now, &after), Ok(()));
        // b stays enabled: a is checked against it and refused.
        let after = [h("a", false, &[S1V1]), h("b", false, &[S1V2])];
        assert!(check_restore(&now, &after).is_err());
        // Patches enabled together, older below newer, as enable had
        // checked them: fine (a is not checked against c above it).
        let after = [h("a", false, &[S1V1]), h("c", false, &[S1V2])];
        assert_eq!(check_restore(&[], &after), Ok(()));
        // But newer below older is what enable would refuse.
        let after = [h("c", false, &[S1V2]), h("a", false, &[S1V1])];
        assert!(check_restore(&[], &after).is_err());
    }
}

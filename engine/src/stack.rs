//! The patch stack: klp's rules for which code runs, as pure logic.
//!
//! Patches are kept oldest first. For each old function the newest enabled
//! patch that carries it wins; a function no enabled patch carries runs its
//! original code. Enabling a `.replace = true` patch disables ("replaces")
//! every enabled patch in the same transition, so afterwards exactly the
//! functions it carries are redirected. Disabling follows klp's stacking
//! rule (kernel/livepatch/core.c, `enabled_store`): only a patch with no
//! enabled patch above it may be disabled, and its functions go back to the
//! next enabled patch below or to the original code.
//!
//! A transition is computed here as a [`Change`]: the new per-function
//! targets, so the caller can plan the guest writes (a jump written or
//! re-pointed, or the original entry bytes restored) and commit them all in
//! one pause; the stack itself only changes when the caller applies the
//! change after that commit succeeded.

use std::collections::BTreeMap;

use thiserror::Error;

use klpvisor_api::PatchState;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StackError {
    #[error(
        "a patch named `{0}` is already loaded (state: {1}); remove it first or rename the module"
    )]
    Duplicate(String, PatchState),
    #[error("no patch named `{0}`; `patcher list` shows the loaded ones")]
    Unknown(String),
    #[error("patch `{name}` is {state}, not enabled")]
    NotEnabled { name: String, state: PatchState },
    #[error("patch `{name}` is enabled; disable it before removing it")]
    StillEnabled { name: String },
    #[error(
        "patch `{name}` cannot be disabled while `{above}`, applied after it, is enabled \
         (klp's stacking rule: disable `{above}` first, or apply a replace patch)"
    )]
    NotTopmost { name: String, above: String },
    #[error("patch `{name}` is {state}; only a disabled or replaced patch can be enabled again")]
    NotDisabled { name: String, state: PatchState },
    #[error(
        "patch `{name}` was replaced by a forced transition ({by}); re-enabling it is refused, \
         as klp refuses it: its code may still run on some task's stack"
    )]
    ReplacedByForce { name: String, by: String },
    #[error(
        "patch `{0}` was enabled then but has since been removed; apply its module again \
         (it will be enabled on top), or roll back to a later point"
    )]
    RemovedSince(String),
    #[error(
        "{MAX_PATCHES} patches are loaded, the most a VMM keeps; remove a disabled or replaced \
         one first (`patcher remove NAME`), or fold them into one replace patch"
    )]
    TooMany,
}

/// The most patches loaded at once: every transition's plan and safe-point
/// check scale with the stack, and a cumulative (replace) patch is how klp
/// expects a long series of fixes to be kept.
pub const MAX_PATCHES: usize = 64;

/// One function a patch redirects, by the old function's entry address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub old: u64,
    pub new: u64,
}

/// A patch as the stack sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub replace: bool,
    pub state: PatchState,
    /// Enabled by a forced transition.
    pub forced: bool,
    /// The forced transition that replaced it, if one did.
    pub replaced_by_force: Option<String>,
    pub redirects: Vec<Redirect>,
}

impl Entry {
    pub fn new(name: &str, replace: bool, redirects: Vec<Redirect>) -> Self {
        Self {
            name: name.to_owned(),
            replace,
            state: PatchState::Disabled,
            forced: false,
            replaced_by_force: None,
            redirects,
        }
    }
}

/// A patch's place in the stack at some moment, without its redirects (a
/// loaded patch's never change): what the history keeps per transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub name: String,
    pub state: PatchState,
    pub forced: bool,
    pub replaced_by_force: Option<String>,
}

/// What one function's entry does: jump to `Some(new)` or run the original.
pub type Target = Option<u64>;

/// A planned transition: what every affected function's entry does before
/// and after, and the states the patches will have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Old function address -> (target before, target after), only for
    /// functions whose target changes.
    pub sites: BTreeMap<u64, (Target, Target)>,
    /// The patches' states after the change, by name.
    pub states: Vec<(String, PatchState)>,
    /// The patch being enabled (pushed on top), if any.
    pub push: Option<Entry>,
    /// The patch being enabled again (from disabled or replaced), moved
    /// to the top of the stack.
    pub reenable: Option<String>,
    /// The whole stack after the change (a rollback), replacing it.
    pub restore: Option<Vec<Entry>>,
    pub forced: bool,
}

/// The stack of loaded patches, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Stack {
    entries: Vec<Entry>,
}

impl Stack {
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Every patch's place, oldest first (see [`Stack::plan_restore`]).
    pub fn placed(&self) -> Vec<Placed> {
        self.entries
            .iter()
            .map(|e| Placed {
                name: e.name.clone(),
                state: e.state,
                forced: e.forced,
                replaced_by_force: e.replaced_by_force.clone(),
            })
            .collect()
    }

    /// Per function, the target the newest enabled patch gives it.
    pub fn live(&self) -> BTreeMap<u64, u64> {
        live_of(self.entries.iter())
    }

    /// Plans enabling a new patch `entry` on top of the stack.
    pub fn plan_enable(&self, entry: Entry, forced: bool) -> Result<Change, StackError> {
        if let Some(e) = self.get(&entry.name) {
            return Err(StackError::Duplicate(entry.name, e.state));
        }
        if self.entries.len() >= MAX_PATCHES {
            return Err(StackError::TooMany);
        }
        let mut after: Vec<Entry> = self.entries.clone();
        let mut pushed = entry.clone();
        pushed.state = PatchState::Enabled;
        pushed.forced = forced;
        after.push(pushed.clone());
        if pushed.replace {
            replace_below(&mut after, &pushed.name);
        }
        Ok(self.change(after, Some(pushed), None, forced))
    }

    /// Plans enabling a loaded, disabled (or replaced) patch again: a
    /// downgrade when it is an older replace patch.
    pub fn plan_reenable(&self, name: &str, forced: bool) -> Result<Change, StackError> {
        let e = self
            .get(name)
            .ok_or_else(|| StackError::Unknown(name.to_owned()))?;
        if e.state == PatchState::Enabled || e.state == PatchState::InTransition {
            return Err(StackError::NotDisabled {
                name: name.to_owned(),
                state: e.state,
            });
        }
        if let Some(by) = &e.replaced_by_force {
            return Err(StackError::ReplacedByForce {
                name: name.to_owned(),
                by: by.clone(),
            });
        }
        // klp enables a patch on top of the stack: move it there.
        let mut after: Vec<Entry> = self
            .entries
            .iter()
            .filter(|x| x.name != name)
            .cloned()
            .collect();
        let mut top = e.clone();
        top.state = PatchState::Enabled;
        top.forced = forced;
        let replace = top.replace;
        after.push(top);
        if replace {
            replace_below(&mut after, name);
        }
        Ok(self.change(after, None, Some(name.to_owned()), forced))
    }

    /// Plans disabling enabled patch `name`.
    pub fn plan_disable(&self, name: &str, forced: bool) -> Result<Change, StackError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| StackError::Unknown(name.to_owned()))?;
        let e = &self.entries[i];
        if e.state != PatchState::Enabled {
            return Err(StackError::NotEnabled {
                name: name.to_owned(),
                state: e.state,
            });
        }
        if let Some(above) = self.entries[i + 1..]
            .iter()
            .find(|x| x.state == PatchState::Enabled)
        {
            return Err(StackError::NotTopmost {
                name: name.to_owned(),
                above: above.name.clone(),
            });
        }
        let mut after = self.entries.clone();
        after[i].state = PatchState::Disabled;
        Ok(self.change(after, None, None, forced))
    }

    /// Plans returning to `earlier`, the stack as it was before some past
    /// transition: every patch in its state then (a replaced patch
    /// replaced again, a disabled one disabled), in its order then, so
    /// the same patch wins each function. Patches loaded since stay
    /// loaded, disabled; a patch enabled then but removed since cannot
    /// come back (its code is gone).
    pub fn plan_restore(&self, earlier: &[Placed], forced: bool) -> Result<Change, StackError> {
        let mut after = Vec::with_capacity(self.entries.len());
        for then in earlier {
            match self.get(&then.name) {
                Some(now) => after.push(Entry {
                    state: then.state,
                    forced: then.forced,
                    replaced_by_force: then.replaced_by_force.clone(),
                    ..now.clone()
                }),
                None if then.state == PatchState::Enabled => {
                    return Err(StackError::RemovedSince(then.name.clone()))
                }
                None => {}
            }
        }
        for now in &self.entries {
            if !earlier.iter().any(|e| e.name == now.name) {
                let mut e = now.clone();
                e.state = PatchState::Disabled;
                after.push(e);
            }
        }
        let mut c = self.change(after.clone(), None, None, forced);
        c.restore = Some(after);
        Ok(c)
    }

    /// Removes a patch that is not enabled (its code may then be unmapped
    /// and its arena space reused once no stack references it).
    pub fn remove(&mut self, name: &str) -> Result<Entry, StackError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| StackError::Unknown(name.to_owned()))?;
        if self.entries[i].state == PatchState::Enabled {
            return Err(StackError::StillEnabled {
                name: name.to_owned(),
            });
        }
        Ok(self.entries.remove(i))
    }

    /// Makes a committed change the stack's state.
    pub fn apply(&mut self, change: &Change) {
        if let Some(entries) = &change.restore {
            self.entries = entries.clone();
            return;
        }
        if let Some(name) = &change.reenable {
            if let Some(i) = self.entries.iter().position(|e| &e.name == name) {
                let e = self.entries.remove(i);
                self.entries.push(e);
            }
        }
        if let Some(e) = &change.push {
            self.entries.push(e.clone());
        }
        for (name, state) in &change.states {
            if let Some(e) = self.entries.iter_mut().find(|e| &e.name == name) {
                if e.state == PatchState::Enabled && *state == PatchState::Replaced && change.forced
                {
                    e.replaced_by_force = change
                        .push
                        .as_ref()
                        .map(|p| p.name.clone())
                        .or_else(|| change.reenable.clone());
                }
                // Only the patch this change enables takes its forced flag;
                // one that stays enabled keeps its own.
                let enabled_now = change.push.as_ref().is_some_and(|p| &p.name == name)
                    || change.reenable.as_ref() == Some(name);
                if *state == PatchState::Enabled && enabled_now {
                    e.forced = change.forced;
                }
                e.state = *state;
            }
        }
    }

    fn change(
        &self,
        after: Vec<Entry>,
        push: Option<Entry>,
        reenable: Option<String>,
        forced: bool,
    ) -> Change {
        let before = self.live();
        let now = live_of(after.iter());
        let mut sites = BTreeMap::new();
        for old in before.keys().chain(now.keys()) {
            let (b, a) = (before.get(old).copied(), now.get(old).copied());
            if b != a {
                sites.insert(*old, (b, a));
            }
        }
        Change {
            sites,
            states: after.iter().map(|e| (e.name.clone(), e.state)).collect(),
            push,
            reenable,
            restore: None,
            forced,
        }
    }
}

/// Marks every enabled patch below the top one as replaced.
fn replace_below(after: &mut [Entry], top: &str) {
    for e in after.iter_mut() {
        if e.name != top && e.state == PatchState::Enabled {
            e.state = PatchState::Replaced;
        }
    }
}

fn live_of<'a>(entries: impl Iterator<Item = &'a Entry>) -> BTreeMap<u64, u64> {
    let mut live = BTreeMap::new();
    // Oldest first: a newer enabled patch overwrites an older one's target.
    for e in entries.filter(|e| e.state == PatchState::Enabled) {
        for r in &e.redirects {
            live.insert(r.old, r.new);
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = 0xf000;
    const G: u64 = 0x9000;
    const H: u64 = 0xa000;

    fn entry(name: &str, replace: bool, r: &[(u64, u64)]) -> Entry {
        Entry::new(
            name,
            replace,
            r.iter().map(|&(old, new)| Redirect { old, new }).collect(),
        )
    }

    fn enable(s: &mut Stack, e: Entry) -> Change {
        let c = s.plan_enable(e, false).unwrap();
        s.apply(&c);
        c
    }

    fn state(s: &Stack, name: &str) -> PatchState {
        s.get(name).unwrap().state
    }

    #[test]
    fn a_patch_keeps_its_forced_flag_when_another_is_enabled() {
        let mut s = Stack::default();
        let c = s
            .plan_enable(entry("forced", false, &[(0x1000, 0x9000)]), true)
            .unwrap();
        s.apply(&c);
        enable(&mut s, entry("later", false, &[(0x2000, 0xa000)]));
        assert!(s.get("forced").unwrap().forced, "still forced");
        assert!(!s.get("later").unwrap().forced);
    }

    #[test]
    fn the_stack_holds_at_most_max_patches() {
        let mut s = Stack::default();
        for i in 0..MAX_PATCHES as u64 {
            enable(
                &mut s,
                entry(&format!("p{i}"), false, &[(0x1000 + i, 0x9000 + i)]),
            );
        }
        let err = s
            .plan_enable(entry("one-more", false, &[(0x5000, 0x6000)]), false)
            .unwrap_err();
        assert!(matches!(err, StackError::TooMany), "{err}");
        assert!(err.to_string().contains("patcher remove"), "{err}");
        // Removing one makes room.
        let p = s
            .plan_disable(&format!("p{}", MAX_PATCHES - 1), false)
            .unwrap();
        s.apply(&p);
        s.remove(&format!("p{}", MAX_PATCHES - 1)).unwrap();
        assert!(s
            .plan_enable(entry("one-more", false, &[(0x5000, 0x6000)]), false)
            .is_ok());
    }

    #[test]
    fn newest_enabled_patch_wins_and_disable_hands_back() {
        let mut s = Stack::default();
        let c = enable(&mut s, entry("a", false, &[(F, 1), (G, 2)]));
        assert_eq!(c.sites[&F], (None, Some(1)));
        enable(&mut s, entry("b", false, &[(F, 3)]));
        assert_eq!(s.live(), BTreeMap::from([(F, 3), (G, 2)]));
        // a is under b: klp's stacking rule refuses.
        assert_eq!(
            s.plan_disable("a", false),
            Err(StackError::NotTopmost {
                name: "a".into(),
                above: "b".into()
            })
        );
        let c = s.plan_disable("b", false).unwrap();
        assert_eq!(c.sites, BTreeMap::from([(F, (Some(3), Some(1)))]));
        s.apply(&c);
        let c = s.plan_disable("a", false).unwrap();
        assert_eq!(
            c.sites,
            BTreeMap::from([(F, (Some(1), None)), (G, (Some(2), None))])
        );
        s.apply(&c);
        assert!(s.live().is_empty());
    }

    /// klp's cumulative-patch scenario: v1 patches f and g; v2 (replace)
    /// patches f and h. After v2: f -> v2, g original, h -> v2, v1 replaced
    /// and removable.
    #[test]
    fn replace_reverts_what_only_older_patches_touched() {
        let mut s = Stack::default();
        enable(&mut s, entry("v1", false, &[(F, 1), (G, 2)]));
        let c = enable(&mut s, entry("v2", true, &[(F, 10), (H, 30)]));
        assert_eq!(
            c.sites,
            BTreeMap::from([
                (F, (Some(1), Some(10))),
                (G, (Some(2), None)),
                (H, (None, Some(30)))
            ])
        );
        assert_eq!(state(&s, "v1"), PatchState::Replaced);
        assert_eq!(s.live(), BTreeMap::from([(F, 10), (H, 30)]));
        // Downgrade: v1 (not a replace patch) goes on top of v2.
        let c = s.plan_reenable("v1", false).unwrap();
        s.apply(&c);
        assert_eq!(s.live(), BTreeMap::from([(F, 1), (G, 2), (H, 30)]));
        assert_eq!(s.entries().last().unwrap().name, "v1");
        // v1 can be removed only when not enabled.
        assert!(matches!(
            s.remove("v1"),
            Err(StackError::StillEnabled { .. })
        ));
    }

    #[test]
    fn downgrade_to_an_older_replace_patch_and_back() {
        let mut s = Stack::default();
        enable(&mut s, entry("r1", true, &[(F, 1), (G, 2)]));
        enable(&mut s, entry("r2", true, &[(F, 10)]));
        assert_eq!(state(&s, "r1"), PatchState::Replaced);
        let c = s.plan_reenable("r1", false).unwrap();
        assert_eq!(
            c.sites,
            BTreeMap::from([(F, (Some(10), Some(1))), (G, (None, Some(2)))])
        );
        s.apply(&c);
        assert_eq!(state(&s, "r2"), PatchState::Replaced);
        let c = s.plan_reenable("r2", false).unwrap();
        s.apply(&c);
        assert_eq!(s.live(), BTreeMap::from([(F, 10)]));
        assert_eq!(state(&s, "r1"), PatchState::Replaced);
    }

    #[test]
    fn a_patch_replaced_by_force_cannot_come_back() {
        let mut s = Stack::default();
        enable(&mut s, entry("r1", true, &[(F, 1)]));
        let c = s.plan_enable(entry("r2", true, &[(F, 2)]), true).unwrap();
        s.apply(&c);
        assert!(s.get("r2").unwrap().forced);
        assert_eq!(
            s.plan_reenable("r1", false),
            Err(StackError::ReplacedByForce {
                name: "r1".into(),
                by: "r2".into()
            })
        );
    }

    #[test]
    fn duplicates_and_unknown_names_are_refused() {
        let mut s = Stack::default();
        enable(&mut s, entry("a", false, &[(F, 1)]));
        assert_eq!(
            s.plan_enable(entry("a", false, &[(G, 1)]), false),
            Err(StackError::Duplicate("a".into(), PatchState::Enabled))
        );
        assert_eq!(
            s.plan_disable("zz", false),
            Err(StackError::Unknown("zz".into()))
        );
        let c = s.plan_disable("a", false).unwrap();
        s.apply(&c);
        assert!(matches!(
            s.plan_disable("a", false),
            Err(StackError::NotEnabled { .. })
        ));
        assert_eq!(s.remove("a").unwrap().name, "a");
        assert!(s.entries().is_empty());
    }

    #[test]
    fn unchanged_functions_are_not_sites() {
        let mut s = Stack::default();
        enable(&mut s, entry("a", false, &[(F, 1), (G, 2)]));
        let c = s.plan_enable(entry("b", false, &[(G, 2)]), false).unwrap();
        assert!(c.sites.is_empty(), "same target: nothing to write");
    }

    #[test]
    fn restore_returns_to_an_earlier_stack_exactly() {
        let mut s = Stack::default();
        enable(&mut s, entry("v1", false, &[(F, 1), (G, 2)]));
        let before_v2 = s.placed();
        let live_before = s.live();
        // v2 replaces v1: F re-pointed, G back to the original, H patched.
        enable(&mut s, entry("v2", true, &[(F, 3), (H, 4)]));
        enable(&mut s, entry("extra", false, &[(H, 5)]));
        let c = s.plan_restore(&before_v2, false).unwrap();
        assert_eq!(
            c.sites,
            BTreeMap::from([
                (F, (Some(3), Some(1))),
                (G, (None, Some(2))),
                (H, (Some(5), None))
            ])
        );
        s.apply(&c);
        assert_eq!(s.live(), live_before);
        assert_eq!(state(&s, "v1"), PatchState::Enabled);
        // Loaded since: kept, disabled.
        assert_eq!(state(&s, "v2"), PatchState::Disabled);
        assert_eq!(state(&s, "extra"), PatchState::Disabled);
        // Back to "v2 on top of replaced v1": v1 replaced again.
        let c = s
            .plan_restore(
                &[
                    Placed {
                        name: "v1".into(),
                        state: PatchState::Replaced,
                        forced: false,
                        replaced_by_force: None,
                    },
                    Placed {
                        name: "v2".into(),
                        state: PatchState::Enabled,
                        forced: false,
                        replaced_by_force: None,
                    },
                ],
                false,
            )
            .unwrap();
        s.apply(&c);
        assert_eq!(s.live(), BTreeMap::from([(F, 3), (H, 4)]));
        assert_eq!(state(&s, "v1"), PatchState::Replaced);
        // A patch enabled then and removed since cannot come back.
        let then = s.placed();
        let c = s.plan_disable("v2", false).unwrap();
        s.apply(&c);
        s.remove("v2").unwrap();
        assert_eq!(
            s.plan_restore(&then, false),
            Err(StackError::RemovedSince("v2".into()))
        );
    }
}

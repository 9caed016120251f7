//! The patch stack: klp's rules for which code runs, as pure logic.
//!
//! Patches are kept oldest first. For each old function the newest enabled
//! patch that carries it wins; a function no enabled patch carries runs its
//! original code. Enabling a `.replace = true` patch disables ("replaces")
//! every enabled patch in the same transition, so afterwards exactly the
//! functions it carries are redirected. Any enabled patch may be disabled,
//! as klp allows since 5.1 (`enabled_store` and `__klp_disable_patch`
//! refuse only while another transition runs, which the VMM serialises):
//! what runs per function follows klp's func stack (`klp_ops.func_stack`,
//! newest enabled patch first), so a disabled patch's functions go back to
//! the next enabled patch that has them, or to the original code, and a
//! function a newer enabled patch also carries does not change at all.
//!
//! Force as in klp (`klp_force_transition`): a patch a forced transition
//! takes out of use (disables, or replaces) may still be running on some
//! task's stack, so klp keeps its module loaded for good. Here such a
//! patch is *pinned* ([`Pin`]): it cannot be removed, enabled again,
//! applied again or brought back by a rollback, and `patcher list` says
//! why.
//!
//! A transition is computed here as a [`Change`]: the new per-function
//! targets, so the caller can plan the guest writes (a jump written or
//! re-pointed, or the original entry bytes restored) and commit them all in
//! one pause; the stack itself only changes when the caller applies the
//! change after that commit succeeded.

use std::collections::BTreeMap;

use thiserror::Error;

use klpvisor_api::{PatchState, Pin};

/// klp's rules on the patch stack, refused before anything is planned:
/// each is the state's fault, not the guest's or the module's.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StackError {
    /// A patch of that name is loaded (klp refuses a second module of a
    /// name); with its state.
    #[error(
        "a patch named `{0}` is already loaded (state: {1}); remove it first or rename the module"
    )]
    Duplicate(String, PatchState),
    /// No loaded patch has that name.
    #[error("no patch named `{0}`; `patcher list` shows the loaded ones")]
    Unknown(String),
    /// A disable of a patch that is not enabled.
    #[error("patch `{name}` is {state}, not enabled")]
    NotEnabled {
        /// The patch.
        name: String,
        /// Its state now.
        state: PatchState,
    },
    /// A remove of an enabled patch (klp frees only disabled ones).
    #[error("patch `{name}` is enabled; disable it before removing it")]
    StillEnabled {
        /// The patch.
        name: String,
    },
    /// An enable of a patch that is neither disabled nor replaced.
    #[error("patch `{name}` is {state}; only a disabled or replaced patch can be enabled again")]
    NotDisabled {
        /// The patch.
        name: String,
        /// Its state now.
        state: PatchState,
    },
    /// A patch a forced transition took out of use, which klp never frees.
    #[error(
        "patch `{name}` is pinned: {pin}, and a task may still run its code after a forced \
         transition, so klp keeps such a patch loaded for good; it cannot be {action}. Reboot \
         the guest to be rid of it, or apply a new patch under another name"
    )]
    Pinned {
        /// The patch.
        name: String,
        /// Which forced transition pinned it.
        pin: Pin,
        /// What was asked of it.
        action: PinnedAction,
    },
    #[error(
        "patch `{0}` was enabled then but has since been removed; apply its module again \
         (it will be enabled on top), or roll back to a later point"
    )]
    /// A rollback to a point where a patch since removed was loaded.
    RemovedSince(String),
    #[error(
        "{MAX_PATCHES} patches are loaded, the most a VMM keeps; remove a disabled or replaced \
         one first (`patcher remove NAME`), or fold them into one replace patch"
    )]
    /// [`MAX_PATCHES`] are loaded already.
    TooMany,
}

/// What a pinned patch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinnedAction {
    /// `remove`.
    Removed,
    /// `enable`.
    Enabled,
    /// `apply` of its module again.
    Applied,
    /// A rollback that would make it enabled again.
    RolledBack,
}

impl std::fmt::Display for PinnedAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PinnedAction::Removed => "removed",
            PinnedAction::Enabled => "enabled again",
            PinnedAction::Applied => "applied again",
            PinnedAction::RolledBack => "brought back by a rollback",
        })
    }
}

/// The most patches loaded at once: every transition's plan and safe-point
/// check scale with the stack, and a cumulative (replace) patch is how klp
/// expects a long series of fixes to be kept.
pub const MAX_PATCHES: usize = 64;

/// One function a patch redirects, by the old function's entry address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    /// The old function's entry, kernel-virtual (where the `jmp` goes).
    pub old: u64,
    /// The patch's replacement, kernel-virtual (in the arena).
    pub new: u64,
}

/// A patch as the stack sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The patch's name (its module's name).
    pub name: String,
    /// `klp_patch.replace`: a cumulative patch that replaces all others.
    pub replace: bool,
    /// Enabled, disabled or replaced.
    pub state: PatchState,
    /// Enabled by a forced transition.
    pub forced: bool,
    /// Set once a forced transition took it out of use; never cleared.
    pub pin: Option<Pin>,
    /// Every function it redirects; fixed for as long as it is loaded.
    pub redirects: Vec<Redirect>,
}

impl Entry {
    /// A newly loaded patch: disabled until its first transition.
    pub fn new(name: &str, replace: bool, redirects: Vec<Redirect>) -> Self {
        Self {
            name: name.to_owned(),
            replace,
            state: PatchState::Disabled,
            forced: false,
            pin: None,
            redirects,
        }
    }
}

/// A patch's place in the stack at some moment, without its redirects (a
/// loaded patch's never change) or pin (a pin is never undone): what the
/// history keeps per transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The patch.
    pub name: String,
    /// Its state at that moment.
    pub state: PatchState,
    /// Whether a forced transition had enabled it.
    pub forced: bool,
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
    /// `--force`: no safe-point check, and what it takes out of use is
    /// pinned.
    pub forced: bool,
}

/// The stack of loaded patches, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Stack {
    entries: Vec<Entry>,
}

impl Stack {
    /// Every loaded patch, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The loaded patch `name`.
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
            })
            .collect()
    }

    /// Per function, the target the newest enabled patch gives it.
    pub fn live(&self) -> BTreeMap<u64, u64> {
        live_of(self.entries.iter())
    }

    /// Plans enabling a new patch `entry` on top of the stack.
    pub fn plan_enable(&self, entry: Entry, forced: bool) -> Result<Change, StackError> {
        self.check_new(&entry.name)?;
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

    /// Refuses a new patch named like a loaded one (a pinned one with
    /// why it stays).
    pub fn check_new(&self, name: &str) -> Result<(), StackError> {
        match self.get(name) {
            None => Ok(()),
            Some(e) => Err(pinned(e, PinnedAction::Applied)
                .unwrap_or_else(|| StackError::Duplicate(name.to_owned(), e.state))),
        }
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
        if let Some(err) = pinned(e, PinnedAction::Enabled) {
            return Err(err);
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

    /// Plans disabling enabled patch `name`, wherever it is in the stack
    /// (klp 5.1 and later): its functions go back to the next enabled
    /// patch below that has them, or to the original code; those a newer
    /// enabled patch also has do not change.
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
        let mut after = self.entries.clone();
        after[i].state = PatchState::Disabled;
        Ok(self.change(after, None, None, forced))
    }

    /// Plans returning to `earlier`, the stack as it was before some past
    /// transition: every patch in its state then (a replaced patch
    /// replaced again, a disabled one disabled), in its order then, so
    /// the same patch wins each function. Patches loaded since stay
    /// loaded, disabled; a patch enabled then but removed since cannot
    /// come back (its code is gone), nor can one pinned since. Pins stay
    /// as they are now.
    pub fn plan_restore(&self, earlier: &[Placed], forced: bool) -> Result<Change, StackError> {
        let mut after = Vec::with_capacity(self.entries.len());
        for then in earlier {
            match self.get(&then.name) {
                Some(now) => {
                    if then.state == PatchState::Enabled && now.state != PatchState::Enabled {
                        if let Some(err) = pinned(now, PinnedAction::RolledBack) {
                            return Err(err);
                        }
                    }
                    after.push(Entry {
                        state: then.state,
                        forced: then.forced,
                        ..now.clone()
                    })
                }
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

    /// Plans the same patches, in the same places and states, with the
    /// redirects of `entries` (a module's functions joining a patch as the
    /// module loads, or leaving it as it unloads). `entries` must name the
    /// stack's patches in its order; only their redirects may differ
    /// (`None` otherwise: a bug in the caller).
    pub fn plan_redirects(&self, entries: Vec<Entry>) -> Option<Change> {
        let same = entries.len() == self.entries.len()
            && entries.iter().zip(&self.entries).all(|(a, b)| {
                a.name == b.name && a.state == b.state && a.forced == b.forced && a.pin == b.pin
            });
        if !same {
            return None;
        }
        let mut c = self.change(entries.clone(), None, None, false);
        c.restore = Some(entries);
        Some(c)
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
        if let Some(err) = pinned(&self.entries[i], PinnedAction::Removed) {
            return Err(err);
        }
        Ok(self.entries.remove(i))
    }

    /// Makes a committed change the stack's state. A forced change pins
    /// every patch it takes out of use (as `klp_force_transition` marks
    /// the patches being removed `forced`).
    pub fn apply(&mut self, change: &Change) {
        let pins: Vec<(String, Pin)> = if change.forced {
            self.taken_out_of_use(change)
        } else {
            Vec::new()
        };
        if let Some(entries) = &change.restore {
            // Pins are never undone: keep today's over the history's.
            let now = std::mem::replace(&mut self.entries, entries.clone());
            for e in &mut self.entries {
                e.pin = now
                    .iter()
                    .find(|n| n.name == e.name)
                    .and_then(|n| n.pin.clone());
            }
        } else {
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
                    // Only the patch this change enables takes its forced
                    // flag; one that stays enabled keeps its own.
                    let enabled_now = change.push.as_ref().is_some_and(|p| &p.name == name)
                        || change.reenable.as_ref() == Some(name);
                    if *state == PatchState::Enabled && enabled_now {
                        e.forced = change.forced;
                    }
                    e.state = *state;
                }
            }
        }
        for (name, pin) in pins {
            if let Some(e) = self.entries.iter_mut().find(|e| e.name == name) {
                e.pin.get_or_insert(pin);
            }
        }
    }

    /// The patches `change` takes out of use (enabled now, not after),
    /// with the pin a forced change gives each.
    fn taken_out_of_use(&self, change: &Change) -> Vec<(String, Pin)> {
        let by = change
            .push
            .as_ref()
            .map(|p| p.name.clone())
            .or_else(|| change.reenable.clone());
        self.entries
            .iter()
            .filter(|e| e.state == PatchState::Enabled)
            .filter_map(|e| {
                let after = change.states.iter().find(|(n, _)| n == &e.name)?.1;
                match after {
                    PatchState::Enabled => None,
                    PatchState::Replaced => Some(Pin::ForcedReplace { by: by.clone() }),
                    _ => Some(Pin::ForcedDisable),
                }
                .map(|pin| (e.name.clone(), pin))
            })
            .collect()
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

/// The refusal of `action` on `e`, if it is pinned.
fn pinned(e: &Entry, action: PinnedAction) -> Option<StackError> {
    e.pin.clone().map(|pin| StackError::Pinned {
        name: e.name.clone(),
        pin,
        action,
    })
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

    fn is_pinned(r: Result<impl std::fmt::Debug, StackError>, action: PinnedAction) -> Pin {
        match r {
            Err(StackError::Pinned { pin, action: a, .. }) if a == action => pin,
            other => panic!("expected a pinned refusal to be {action}, got {other:?}"),
        }
    }

    /// klp_force_transition on a replace marks every patch it replaces
    /// `forced`, and klp never lets go of a forced patch's module: here it
    /// is pinned, and cannot be enabled, applied, removed or rolled back
    /// to. The forced patch itself is not pinned.
    #[test]
    fn a_patch_replaced_by_force_stays_pinned() {
        let mut s = Stack::default();
        enable(&mut s, entry("r1", true, &[(F, 1)]));
        let before = s.placed();
        let c = s.plan_enable(entry("r2", true, &[(F, 2)]), true).unwrap();
        s.apply(&c);
        assert!(s.get("r2").unwrap().forced);
        assert_eq!(s.get("r2").unwrap().pin, None);
        let pin = Pin::ForcedReplace {
            by: Some("r2".into()),
        };
        assert_eq!(s.get("r1").unwrap().pin, Some(pin.clone()));
        assert_eq!(
            is_pinned(s.plan_reenable("r1", false), PinnedAction::Enabled),
            pin
        );
        let err = s.plan_reenable("r1", true).unwrap_err().to_string();
        assert!(
            err.contains("forced transition") && err.contains("r2"),
            "{err}"
        );
        is_pinned(s.remove("r1"), PinnedAction::Removed);
        is_pinned(
            s.plan_enable(entry("r1", true, &[(F, 1)]), false),
            PinnedAction::Applied,
        );
        is_pinned(s.plan_restore(&before, false), PinnedAction::RolledBack);
        // A rollback that leaves r1 replaced keeps its pin (the history's
        // entries carry none).
        let c = s.plan_restore(&s.placed(), false).unwrap();
        s.apply(&c);
        assert_eq!(s.get("r1").unwrap().pin, Some(pin));
    }

    /// klp_force_transition on an unpatching transition marks the patch
    /// `forced`: a forced disable is recorded as a pin; a forced enable of
    /// a non-replace patch takes nothing out of use and pins nothing.
    #[test]
    fn a_forced_disable_is_recorded_and_pins_the_patch() {
        let mut s = Stack::default();
        enable(&mut s, entry("a", false, &[(F, 1)]));
        let c = s.plan_enable(entry("b", false, &[(F, 2)]), true).unwrap();
        s.apply(&c);
        assert!(s.entries().iter().all(|e| e.pin.is_none()));
        let c = s.plan_disable("a", true).unwrap();
        s.apply(&c);
        assert_eq!(s.get("a").unwrap().pin, Some(Pin::ForcedDisable));
        is_pinned(s.remove("a"), PinnedAction::Removed);
        is_pinned(s.plan_reenable("a", false), PinnedAction::Enabled);
        // An unforced disable pins nothing: b can go.
        let c = s.plan_disable("b", false).unwrap();
        s.apply(&c);
        assert!(s.remove("b").is_ok());
        // A forced rollback pins what it takes out of use.
        enable(&mut s, entry("c", false, &[(G, 3)]));
        let before_c = s.placed()[..1].to_vec();
        let c = s.plan_restore(&before_c, true).unwrap();
        s.apply(&c);
        assert_eq!(s.get("c").unwrap().pin, Some(Pin::ForcedDisable));
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
                    },
                    Placed {
                        name: "v2".into(),
                        state: PatchState::Enabled,
                        forced: false,
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

    /// One step of a klp scenario: apply a patch (`+name` non-replace,
    /// `*name` replace) carrying the functions listed, or disable one
    /// (`-name`).
    fn step(s: &mut Stack, op: &str, funcs: &str) -> Change {
        let (kind, name) = op.split_at(1);
        let c = match kind {
            "-" => s.plan_disable(name, false),
            _ => {
                let id = u64::from(name.as_bytes()[0]);
                let r: Vec<(u64, u64)> = funcs
                    .chars()
                    .map(|f| (func(f), id << 8 | u64::from(f as u8)))
                    .collect();
                s.plan_enable(entry(name, kind == "*", &r), false)
            }
        }
        .unwrap_or_else(|e| panic!("{op}: {e}"));
        s.apply(&c);
        c
    }

    fn func(f: char) -> u64 {
        0x1000 * u64::from(f as u8)
    }

    /// What runs per function: `F=b` (patch b's), `F=-` (the original).
    fn shown(s: &Stack) -> String {
        let live = s.live();
        "FGH"
            .chars()
            .map(|f| {
                let who = live
                    .get(&func(f))
                    .map_or("-".to_owned(), |t| char::from((t >> 8) as u8).to_string());
                format!("{f}={who}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// klp's behaviour, step by step, for disabling patches anywhere in
    /// the stack (5.1 and later): each function runs the func at the head
    /// of its `klp_ops.func_stack` (the newest enabled patch that has it);
    /// `klp_unpatch_func` takes a patch's func off the stack, so a function
    /// a newer patch also has does not change; a replace patch leaves only
    /// its own funcs (`klp_unpatch_replaced_patches`). Each row: the
    /// operation, the functions an applied patch carries, what runs after,
    /// and which functions' entries the step rewrites.
    #[test]
    fn what_runs_per_function_follows_klps_func_stack() {
        let table: &[&[(&str, &str, &str, &str)]] = &[
            // Disabling the lower of two patches: F stays b's, G original.
            &[
                ("+a", "FG", "F=a G=a H=-", "FG"),
                ("+b", "F", "F=b G=a H=-", "F"),
                ("-a", "", "F=b G=- H=-", "G"),
                ("-b", "", "F=- G=- H=-", "F"),
            ],
            // The middle of three: nothing live changes; then the top hands
            // F back to the bottom.
            &[
                ("+a", "F", "F=a G=- H=-", "F"),
                ("+b", "F", "F=b G=- H=-", "F"),
                ("+c", "F", "F=c G=- H=-", "F"),
                ("-b", "", "F=c G=- H=-", ""),
                ("-c", "", "F=a G=- H=-", "F"),
            ],
            // Overlapping patches, the older disabled first.
            &[
                ("+a", "FG", "F=a G=a H=-", "FG"),
                ("+b", "GH", "F=a G=b H=b", "GH"),
                ("-a", "", "F=- G=b H=b", "F"),
                ("-b", "", "F=- G=- H=-", "GH"),
            ],
            // A replace leaves only its own functions; a non-replace patch
            // on top of it, then the replace patch disabled below it.
            &[
                ("+a", "FG", "F=a G=a H=-", "FG"),
                ("*r", "G", "F=- G=r H=-", "FG"),
                ("+c", "FH", "F=c G=r H=c", "FH"),
                ("-r", "", "F=c G=- H=c", "G"),
            ],
        ];
        for (n, rows) in table.iter().enumerate() {
            let mut s = Stack::default();
            for &(op, funcs, want, sites) in *rows {
                let c = step(&mut s, op, funcs);
                assert_eq!(shown(&s), want, "scenario {n}, after {op}");
                let written: String = c
                    .sites
                    .keys()
                    .map(|&a| char::from((a / 0x1000) as u8))
                    .collect();
                assert_eq!(written, sites, "scenario {n}, entries {op} rewrites");
            }
        }
    }

    /// The same rule against a model of klp's func stacks, over every
    /// sequence of four operations on three patches: the stack here and
    /// the model agree on what runs after each step.
    #[test]
    fn every_short_sequence_agrees_with_a_model_of_klps_func_stacks() {
        // Each patch's functions and whether it is a replace patch.
        const PATCHES: [(&str, &str, bool); 3] =
            [("a", "FG", false), ("b", "GH", false), ("r", "FH", true)];
        let ops: Vec<(usize, bool)> = (0..3).flat_map(|p| [(p, true), (p, false)]).collect();
        let n = ops.len();
        for seq in 0..n.pow(4) {
            let mut s = Stack::default();
            // Per function, the patches on its func stack, newest first.
            let mut model: BTreeMap<char, Vec<usize>> = BTreeMap::new();
            let mut enabled = [false; 3];
            let mut loaded = [false; 3];
            for k in 0..4 {
                let (p, on) = ops[seq / n.pow(k) % n];
                let (name, funcs, replace) = PATCHES[p];
                if on == enabled[p] {
                    continue;
                }
                if on {
                    let c = if loaded[p] {
                        s.plan_reenable(name, false).unwrap()
                    } else {
                        let id = u64::from(name.as_bytes()[0]);
                        let r: Vec<(u64, u64)> = funcs
                            .chars()
                            .map(|f| (func(f), id << 8 | u64::from(f as u8)))
                            .collect();
                        s.plan_enable(entry(name, replace, &r), false).unwrap()
                    };
                    s.apply(&c);
                    loaded[p] = true;
                    for f in funcs.chars() {
                        model.entry(f).or_default().insert(0, p);
                    }
                    if replace {
                        for stack in model.values_mut() {
                            stack.retain(|&q| q == p);
                        }
                        enabled = [false; 3];
                    }
                } else {
                    let c = s.plan_disable(name, false).unwrap();
                    s.apply(&c);
                    for stack in model.values_mut() {
                        stack.retain(|&q| q != p);
                    }
                }
                enabled[p] = on;
                let want = "FGH"
                    .chars()
                    .map(|f| {
                        let who = model
                            .get(&f)
                            .and_then(|st| st.first())
                            .map_or("-", |&q| PATCHES[q].0);
                        format!("{f}={who}")
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                assert_eq!(shown(&s), want, "sequence {seq}, step {k}");
            }
        }
    }
}

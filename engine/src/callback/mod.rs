//! klp callbacks: which run around a transition, in what order, and what
//! undoes them when the transition is abandoned.
//!
//! klp's rules (Documentation/livepatch/callbacks.rst, kernel/livepatch/
//! core.c and transition.c), which a transition here follows:
//! - Enabling a patch: `pre_patch` of each object before anything is
//!   redirected; a non-zero return refuses the patch. `post_patch` once the
//!   transition is complete.
//! - Disabling: `pre_unpatch` before, `post_unpatch` after.
//! - Atomic replace: only the new patch's callbacks run; those of the
//!   patches it replaces do not (cumulative-patches.rst).
//! - A transition abandoned after its pre callbacks ran (a later
//!   `pre_patch` failed, or no safe point came in time) runs the opposite
//!   post callback of every object whose pre step passed:
//!   `post_unpatch` after `pre_patch` (klp_cancel_transition), `post_patch`
//!   after `pre_unpatch` (a reversed disable completes as patched). Within
//!   a patch the objects go in object order, because klp's cancel is
//!   `klp_complete_transition`, which walks `klp_for_each_object`; when a
//!   transition here changes several patches (a rollback), the patch whose
//!   pre steps ran last is cancelled first, as klp would finish the last
//!   transition it started before undoing an earlier one. An object
//!   without a pre callback passes its pre step, as in klp, where
//!   `post_unpatch_enabled` is set unless `pre_patch` failed.
//!
//! How a callback runs inside the guest is [`gate`]'s job.

pub mod gate;
pub mod module;

use crate::link::LinkedCallbacks;

/// One of the four `struct klp_callbacks` members (a wire type too: the
/// API reports each callback run).
pub use klpvisor_api::CallbackKind as Kind;

/// The address of callback `kind` of one object, if it has one.
pub fn address(cbs: &LinkedCallbacks, kind: Kind) -> Option<u64> {
    match kind {
        Kind::PrePatch => cbs.pre_patch,
        Kind::PostPatch => cbs.post_patch,
        Kind::PreUnpatch => cbs.pre_unpatch,
        Kind::PostUnpatch => cbs.post_unpatch,
    }
}

/// One step of one object of one patch: a callback to run, or (`func`
/// `None`) a pre step that passes without running anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The patch the object belongs to, by name.
    pub patch: String,
    /// Which of the four callbacks this step is.
    pub kind: Kind,
    /// The callback's address in the arena.
    pub func: Option<u64>,
    /// The linked `struct klp_object`, the callback's argument.
    pub object: u64,
    /// The object's callbacks, to find the one that cancels this step.
    callbacks: LinkedCallbacks,
}

impl Call {
    fn new(patch: &str, kind: Kind, callbacks: LinkedCallbacks) -> Self {
        Self {
            patch: patch.to_owned(),
            kind,
            func: address(&callbacks, kind),
            object: callbacks.object,
            callbacks,
        }
    }

    /// The call that undoes this passed pre step, if there is one to run.
    pub fn cancel(&self) -> Option<Call> {
        let kind = self.kind.cancel()?;
        let call = Call::new(&self.patch, kind, self.callbacks);
        call.func.is_some().then_some(call)
    }
}

/// The callbacks of one transition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calls {
    /// Patches this transition enables, with their objects' callbacks.
    enabling: Vec<(String, Vec<LinkedCallbacks>)>,
    /// Patches this transition disables (a replace lists none: the
    /// patches it replaces run no callbacks).
    disabling: Vec<(String, Vec<LinkedCallbacks>)>,
}

impl Calls {
    /// Adds a patch the transition enables.
    pub fn enable(&mut self, patch: &str, objects: &[LinkedCallbacks]) {
        self.enabling.push((patch.to_owned(), objects.to_vec()));
    }

    /// The patches the transition enables, in order.
    pub fn enabling(&self) -> impl Iterator<Item = &str> {
        self.enabling.iter().map(|(p, _)| p.as_str())
    }

    /// Adds a patch the transition disables.
    pub fn disable(&mut self, patch: &str, objects: &[LinkedCallbacks]) {
        self.disabling.push((patch.to_owned(), objects.to_vec()));
    }

    /// Whether any callback is set at all (a transition without callbacks
    /// needs no gate and runs exactly as before).
    pub fn is_empty(&self) -> bool {
        self.pre().iter().all(|c| c.func.is_none()) && self.post().is_empty()
    }

    /// The steps before the writes, in order: `pre_unpatch` of the patches
    /// going away, then `pre_patch` of those coming in, each patch's
    /// objects in patch order. Steps without a callback are included
    /// (they pass), so a cancel knows every object that passed.
    pub fn pre(&self) -> Vec<Call> {
        let steps = |list: &[(String, Vec<LinkedCallbacks>)], kind| {
            list.iter()
                .flat_map(move |(p, objs)| objs.iter().map(move |o| Call::new(p, kind, *o)))
                .collect::<Vec<_>>()
        };
        let mut out = steps(&self.disabling, Kind::PreUnpatch);
        out.extend(steps(&self.enabling, Kind::PrePatch));
        out
    }

    /// The callbacks after a committed transition: `post_patch` of the
    /// patches enabled, then `post_unpatch` of those disabled.
    pub fn post(&self) -> Vec<Call> {
        let steps = |list: &[(String, Vec<LinkedCallbacks>)], kind| {
            list.iter()
                .flat_map(move |(p, objs)| objs.iter().map(move |o| Call::new(p, kind, *o)))
                .filter(|c| c.func.is_some())
                .collect::<Vec<_>>()
        };
        let mut out = steps(&self.enabling, Kind::PostPatch);
        out.extend(steps(&self.disabling, Kind::PostUnpatch));
        out
    }

    /// The notices klp prints in the kernel log once a transition is
    /// complete (`'<patch>': patching complete`, `unpatching complete`),
    /// one per patch the transition enabled or disabled, without klp's
    /// `livepatch: ` prefix.
    pub fn log_lines(&self) -> Vec<String> {
        let enabled = self
            .enabling
            .iter()
            .map(|(p, _)| format!("'{p}': patching complete"));
        let disabled = self
            .disabling
            .iter()
            .map(|(p, _)| format!("'{p}': unpatching complete"));
        enabled.chain(disabled).collect()
    }

    /// The calls that undo the pre steps in `passed`: per patch (a run of
    /// steps of one patch and kind), the objects in object order, as
    /// `klp_complete_transition` walks them; the last patch first.
    pub fn cancel(passed: &[Call]) -> Vec<Call> {
        let mut runs: Vec<&[Call]> = passed
            .chunk_by(|a, b| a.patch == b.patch && a.kind == b.kind)
            .collect();
        runs.reverse();
        runs.into_iter()
            .flatten()
            .filter_map(Call::cancel)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbs(object: u64, set: [bool; 4]) -> LinkedCallbacks {
        let a = |i: usize| set[i].then_some(object + 0x100 * (i as u64 + 1));
        LinkedCallbacks {
            object,
            pre_patch: a(0),
            post_patch: a(1),
            pre_unpatch: a(2),
            post_unpatch: a(3),
        }
    }

    fn names(calls: &[Call]) -> Vec<String> {
        calls
            .iter()
            .map(|c| format!("{} {} {:x}", c.patch, c.kind, c.object))
            .collect()
    }

    #[test]
    fn order_follows_klp() {
        let mut calls = Calls::default();
        calls.disable("old", &[cbs(0x1000, [true; 4])]);
        calls.enable("new", &[cbs(0x2000, [true; 4]), cbs(0x3000, [false; 4])]);
        assert_eq!(
            names(&calls.pre()),
            [
                "old pre_unpatch 1000",
                "new pre_patch 2000",
                "new pre_patch 3000"
            ]
        );
        assert_eq!(
            names(&calls.post()),
            ["new post_patch 2000", "old post_unpatch 1000"]
        );
        // The object without callbacks passes its pre step silently.
        assert_eq!(calls.pre()[2].func, None);
        assert!(!calls.is_empty());
    }

    #[test]
    fn a_cancel_runs_each_patch_in_object_order_the_last_patch_first() {
        let mut calls = Calls::default();
        calls.disable("old", &[cbs(0x1000, [true; 4]), cbs(0x1800, [true; 4])]);
        calls.enable(
            "new",
            &[
                cbs(0x2000, [true; 4]),
                cbs(0x3000, [true; 4]),
                cbs(0x4000, [true; 4]),
            ],
        );
        let pre = calls.pre();
        // The third pre_patch failed: the first two passed and are undone
        // in object order (klp_complete_transition after
        // klp_cancel_transition), then the disable is reversed.
        assert_eq!(
            names(&Calls::cancel(&pre[..4])),
            [
                "new post_unpatch 2000",
                "new post_unpatch 3000",
                "old post_patch 1000",
                "old post_patch 1800"
            ]
        );
        // A missing post callback is skipped, not called at address 0.
        let mut bare = Calls::default();
        bare.enable("p", &[cbs(0x4000, [true, true, false, false])]);
        assert!(Calls::cancel(&bare.pre()).is_empty());
    }

    #[test]
    fn klps_completion_notices_one_per_patch() {
        let mut calls = Calls::default();
        calls.disable("old", &[cbs(0x1000, [false; 4])]);
        calls.enable("new", &[cbs(0x2000, [false; 4])]);
        assert_eq!(
            calls.log_lines(),
            ["'new': patching complete", "'old': unpatching complete"]
        );
    }

    #[test]
    fn no_callbacks_means_empty() {
        let mut calls = Calls::default();
        calls.enable("p", &[cbs(0x1000, [false; 4])]);
        calls.disable("q", &[cbs(0x2000, [false; 4])]);
        assert!(calls.is_empty());
        assert_eq!(calls.pre().len(), 2, "the steps still exist");
    }
}

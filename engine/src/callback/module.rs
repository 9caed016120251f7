//! The callbacks of a module object whose module loads or unloads while
//! its patch is enabled, in klp's order.
//!
//! klp runs them in the loading or unloading task, in
//! `klp_module_coming` (`pre_patch`, then the object is patched, then
//! `post_patch`) and `klp_module_going` (`pre_unpatch`, unpatched,
//! `post_unpatch`); a failing `pre_patch` fails the load with its error,
//! and the objects already prepared are unpatched again. klpvisor's hooks
//! ([`crate::hook`]) run them in the same task, by answering the task's
//! port read with a call. With several patches holding objects for one
//! module, klp goes patch by patch; here every patch's pre callback runs,
//! then one switch writes every entry, then every post callback (the same
//! order within each kind, and the same as klp's with one patch). A
//! `pre_patch` that fails, or a switch that fails, cancels as klp's
//! `klp_cancel_transition` does: `post_unpatch` for every object whose
//! `pre_patch` passed, in order, then the load fails.

use super::{address, Kind};
use crate::hook::Event;
use crate::link::LinkedCallbacks;

/// What the VMM does next in a module's coming or going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Have the held task call `func(arg)` (patch `patch`'s callback
    /// `kind`) and come back with its result.
    Call {
        /// The patch whose callback it is, by name.
        patch: String,
        /// Which callback.
        kind: Kind,
        /// The callback's address in the arena (kernel-virtual).
        func: u64,
        /// Its argument: the linked `struct klp_object` (kernel-virtual).
        arg: u64,
    },
    /// Write the entries (the engine's coming or going switch).
    Switch,
    /// Let the task go on (0) or fail the load with this errno.
    Return(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pre,
    Switch,
    Post,
    Cancel,
    Done,
}

/// The steps of one module's coming or going (see the module doc).
#[derive(Debug, Clone)]
pub struct ModuleSteps {
    event: Event,
    /// Per enabled patch holding an object for the module, its callbacks.
    objects: Vec<(String, LinkedCallbacks)>,
    phase: Phase,
    /// The next object of the current phase.
    next: usize,
    /// The `pre_patch` whose result is awaited.
    awaiting: Option<usize>,
    /// Objects whose `pre_patch` passed (or that have none).
    passed: Vec<usize>,
    /// The errno the load fails with.
    failed: Option<i32>,
}

impl ModuleSteps {
    /// The steps for `event` with these objects' callbacks.
    pub fn new(event: Event, objects: Vec<(String, LinkedCallbacks)>) -> Self {
        Self {
            event,
            objects,
            phase: Phase::Pre,
            next: 0,
            awaiting: None,
            passed: Vec::new(),
            failed: None,
        }
    }

    /// Whether the switch failed or was refused: the load fails.
    pub fn fail(&mut self, errno: i32) {
        self.failed.get_or_insert(errno);
        self.phase = Phase::Cancel;
        self.next = 0;
    }

    /// The next step, given the result of the last [`Step::Call`] (its
    /// `rax`; ignored unless it was a `pre_patch`).
    pub fn next(&mut self, result: u64) -> Step {
        if let Some(i) = self.awaiting.take() {
            // klp_pre_patch_callback: an int; non-zero refuses.
            let ret = result as u32 as i32;
            if ret == 0 {
                self.passed.push(i);
            } else {
                self.fail(ret);
            }
        }
        loop {
            let (pre, post) = match self.event {
                Event::Coming => (Kind::PrePatch, Kind::PostPatch),
                Event::Going => (Kind::PreUnpatch, Kind::PostUnpatch),
            };
            let kind = match self.phase {
                Phase::Pre => pre,
                Phase::Post => post,
                Phase::Cancel => Kind::PostUnpatch,
                Phase::Switch => {
                    self.phase = Phase::Post;
                    self.next = 0;
                    return Step::Switch;
                }
                Phase::Done => return Step::Return(self.failed.unwrap_or(0)),
            };
            let Some((patch, cbs)) = self.objects.get(self.next).cloned() else {
                self.phase = match self.phase {
                    Phase::Pre => Phase::Switch,
                    _ => Phase::Done,
                };
                self.next = 0;
                continue;
            };
            let i = self.next;
            self.next += 1;
            if self.phase == Phase::Cancel && !self.passed.contains(&i) {
                continue;
            }
            match address(&cbs, kind) {
                Some(func) => {
                    if kind == Kind::PrePatch {
                        self.awaiting = Some(i);
                    }
                    return Step::Call {
                        patch,
                        kind,
                        func,
                        arg: cbs.object,
                    };
                }
                None if kind == Kind::PrePatch => self.passed.push(i),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbs(object: u64, all: bool) -> LinkedCallbacks {
        let f = |o| all.then_some(object + o);
        LinkedCallbacks {
            object,
            pre_patch: f(1),
            post_patch: f(2),
            pre_unpatch: f(3),
            post_unpatch: f(4),
        }
    }

    fn run(s: &mut ModuleSteps, results: &[(Kind, u64)]) -> Vec<String> {
        let mut out = Vec::new();
        let mut last = 0;
        for _ in 0..32 {
            match s.next(last) {
                Step::Call {
                    patch, kind, func, ..
                } => {
                    out.push(format!("{patch} {kind:?} {func:#x}"));
                    last = results
                        .iter()
                        .find(|(k, _)| *k == kind)
                        .map_or(0, |(_, r)| *r);
                }
                Step::Switch => {
                    out.push("switch".into());
                    last = 0;
                }
                Step::Return(v) => {
                    out.push(format!("return {v}"));
                    return out;
                }
            }
        }
        panic!("no end: {out:?}");
    }

    #[test]
    fn a_coming_runs_pre_patch_then_switches_then_post_patch() {
        let mut s = ModuleSteps::new(
            Event::Coming,
            vec![
                ("a".into(), cbs(0x100, true)),
                ("b".into(), cbs(0x200, false)),
            ],
        );
        assert_eq!(
            run(&mut s, &[]),
            [
                "a PrePatch 0x101",
                "switch",
                "a PostPatch 0x102",
                "return 0"
            ]
        );
    }

    #[test]
    fn a_going_runs_pre_unpatch_then_switches_then_post_unpatch() {
        let mut s = ModuleSteps::new(Event::Going, vec![("a".into(), cbs(0x100, true))]);
        assert_eq!(
            run(&mut s, &[]),
            [
                "a PreUnpatch 0x103",
                "switch",
                "a PostUnpatch 0x104",
                "return 0"
            ]
        );
    }

    #[test]
    fn a_failing_pre_patch_fails_the_load_and_cancels_those_that_passed() {
        let mut s = ModuleSteps::new(
            Event::Coming,
            vec![
                ("a".into(), cbs(0x100, true)),
                ("b".into(), cbs(0x200, false)),
                ("c".into(), cbs(0x300, true)),
            ],
        );
        // The second pre_patch run (c's) returns -EBUSY (as an int in rax).
        let mut calls = 0;
        let mut out = Vec::new();
        let mut last = 0u64;
        loop {
            match s.next(last) {
                Step::Call {
                    patch, kind, func, ..
                } => {
                    out.push(format!("{patch} {kind:?} {func:#x}"));
                    calls += 1;
                    last = if calls == 2 {
                        u64::from(-16i32 as u32)
                    } else {
                        0
                    };
                }
                Step::Switch => panic!("switched after a refusal: {out:?}"),
                Step::Return(v) => {
                    out.push(format!("return {v}"));
                    break;
                }
            }
        }
        assert_eq!(
            out,
            [
                "a PrePatch 0x101",
                "c PrePatch 0x301",
                "a PostUnpatch 0x104",
                "return -16"
            ]
        );
    }

    #[test]
    fn a_failed_switch_cancels_every_pre_patch_that_passed() {
        let mut s = ModuleSteps::new(Event::Coming, vec![("a".into(), cbs(0x100, true))]);
        assert!(matches!(
            s.next(0),
            Step::Call {
                kind: Kind::PrePatch,
                ..
            }
        ));
        assert_eq!(s.next(0), Step::Switch);
        s.fail(-22);
        assert!(matches!(
            s.next(0),
            Step::Call {
                kind: Kind::PostUnpatch,
                func: 0x104,
                ..
            }
        ));
        assert_eq!(s.next(0), Step::Return(-22));
    }

    #[test]
    fn without_callbacks_only_the_switch_happens() {
        let mut s = ModuleSteps::new(Event::Coming, vec![]);
        assert_eq!(run(&mut s, &[]), ["switch", "return 0"]);
    }
}

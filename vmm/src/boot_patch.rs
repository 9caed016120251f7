//! `vmm --patch FILE.ko`: livepatch modules applied, in order, once the
//! guest kernel is up, as `kpatch install` has them loaded at every boot.
//!
//! Each goes through [`Control::apply`], the path of `POST /patches`: same
//! signature policy, same lifecycle, same log lines, and the result is in
//! `patcher list` and the history like any other. A patch that fails is
//! logged with its error and the next one is tried; the VM runs on either
//! way, since a guest that booted without its fix is still a guest the
//! operator can patch by hand.
//!
//! "Up" means the kernel view can be built (`_text`, kallsyms, BTF, as the
//! first API request builds it) *and* the kernel has finished booting
//! (`system_state` is `SYSTEM_RUNNING`, set just before init runs). The
//! view alone can be found while `start_kernel` still runs, before the
//! kernel has set up ftrace's call sites or pruned its own page tables,
//! and no livepatch module can load that early either: kpatch's service
//! and insmod run from user space.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use klpvisor_api::TransitionReply;

use crate::control::{Control, ControlError, Transition, TRANSITION_TIMEOUT};

/// How long the guest kernel may take to come up before the boot patches
/// are given up: a nested (TCG) boot on a loaded host has taken 45 s; a
/// kernel that is not up after this never will be.
pub const KERNEL_UP_TIMEOUT: Duration = Duration::from_secs(300);

/// Between two looks at whether the kernel is up, and between two tries
/// of a patch refused as busy. The kernel view's own backoff paces the
/// expensive part (a failed view is not built again before it passes).
pub const POLL: Duration = Duration::from_millis(500);

/// How long a patch refused as busy (a module loading in the guest,
/// another transition) is tried again.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// A module named by `--patch`, read at start-up.
#[derive(Debug, Clone)]
pub struct BootPatch {
    /// As given on the command line, for the log.
    pub path: PathBuf,
    /// The file's bytes, as `patcher apply` would upload them.
    pub bytes: Vec<u8>,
}

/// Why a `--patch` file cannot be used; checked before the guest starts.
#[derive(Debug, thiserror::Error)]
pub enum BootPatchError {
    /// The file cannot be read.
    #[error("--patch {path}: cannot read it: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The file is empty.
    #[error("--patch {0}: the file is empty, not a livepatch module")]
    Empty(PathBuf),
    /// Larger than the API accepts.
    #[error(
        "--patch {path}: {size} bytes; the VMM accepts modules up to {} MiB: strip its debug \
         info (strip -g)",
        klpvisor_api::MAX_PATCH_BYTES >> 20
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

impl BootPatch {
    /// Reads `path` now, so a typo or a missing build stops the VMM at
    /// start-up (exit 1), not minutes later in the log.
    pub fn read(path: &Path) -> Result<Self, BootPatchError> {
        let read_err = |source| BootPatchError::Read {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_err)?.len();
        if size > klpvisor_api::MAX_PATCH_BYTES as u64 {
            return Err(BootPatchError::TooLarge {
                path: path.to_owned(),
                size,
            });
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        if bytes.is_empty() {
            return Err(BootPatchError::Empty(path.to_owned()));
        }
        Ok(Self {
            path: path.to_owned(),
            bytes,
        })
    }
}

/// What the boot patches need of the VM: [`Control`], or a fake in tests.
pub trait Target {
    /// `Ok` once the guest kernel is up; the error says why not yet.
    fn kernel_up(&self) -> Result<(), ControlError>;
    /// Applies one module, as `POST /patches` does.
    fn apply(&self, ko: &[u8]) -> Result<TransitionReply, ControlError>;
    /// The clock.
    fn now(&self) -> Instant;
    /// Waits `d`.
    fn sleep(&self, d: Duration);
}

impl Target for Control {
    fn kernel_up(&self) -> Result<(), ControlError> {
        self.booted()
    }

    fn apply(&self, ko: &[u8]) -> Result<TransitionReply, ControlError> {
        Control::apply(
            self,
            ko,
            Transition {
                force: false,
                timeout: TRANSITION_TIMEOUT,
            },
        )
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// How the boot patches went, for the log and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Patches applied.
    pub applied: usize,
    /// Patches that failed (each logged with its error).
    pub failed: usize,
    /// The guest kernel never came up (or the guest stopped): none was tried.
    pub never_up: bool,
}

/// Applies `patches` on a thread of its own, so the VM (and the control
/// socket) run meanwhile.
pub fn spawn(control: Arc<Control>, patches: Vec<BootPatch>) -> std::io::Result<()> {
    if patches.is_empty() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("boot-patches".into())
        .spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::Kind::Api);
            run(&*control, &patches, KERNEL_UP_TIMEOUT);
        })
        .map(drop)
}

/// Waits (up to `up_within`) for the kernel to be up, then applies each
/// patch in order, logging each result.
pub fn run(target: &impl Target, patches: &[BootPatch], up_within: Duration) -> Summary {
    let mut summary = Summary::default();
    if patches.is_empty() {
        return summary;
    }
    tracing::info!(
        patches = patches.len(),
        "--patch: waiting for the guest kernel to come up"
    );
    let start = target.now();
    loop {
        match target.kernel_up() {
            Ok(()) => break,
            Err(ControlError::Stopped) => {
                tracing::warn!(
                    "--patch: the guest stopped before its kernel came up; no patch applied"
                );
                summary.never_up = true;
                return summary;
            }
            Err(e) if target.now().saturating_duration_since(start) >= up_within => {
                tracing::error!(
                    "--patch: the guest kernel was not up within {} s; no patch applied \
                     (apply them with patcher once it is): {e}",
                    up_within.as_secs()
                );
                summary.never_up = true;
                return summary;
            }
            Err(e) => {
                tracing::debug!("--patch: the guest kernel is not up yet: {e}");
                target.sleep(POLL);
            }
        }
    }
    tracing::info!(
        after_ms = target.now().saturating_duration_since(start).as_millis() as u64,
        "--patch: the guest kernel is up; applying"
    );
    for p in patches {
        match apply_one(target, p) {
            Ok(reply) => {
                summary.applied += 1;
                tracing::info!(
                    file = %p.path.display(),
                    patch = reply.patch.name,
                    attempts = reply.attempts,
                    pause_us = reply.pause_us as u64,
                    "--patch: applied"
                );
            }
            Err(e) => {
                summary.failed += 1;
                tracing::error!(file = %p.path.display(), "--patch: not applied: {e}");
            }
        }
    }
    summary
}

/// Applies one patch, trying again while it is refused as busy (a module
/// loading in the guest as it boots holds patch changes, as it would
/// hold klp's mutex), for up to [`BUSY_TIMEOUT`].
fn apply_one(target: &impl Target, p: &BootPatch) -> Result<TransitionReply, ControlError> {
    let start = target.now();
    loop {
        match target.apply(&p.bytes) {
            Err(e)
                if e.is_busy() && target.now().saturating_duration_since(start) < BUSY_TIMEOUT =>
            {
                tracing::debug!(file = %p.path.display(), "--patch: busy, trying again: {e}");
                target.sleep(POLL);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A VM whose kernel comes up after `up_after` looks, and whose
    /// applies answer from `answers` in turn; time moves only by sleeps.
    struct Fake {
        up_after: u32,
        looks: Cell<u32>,
        stopped: bool,
        answers: RefCell<Vec<Result<TransitionReply, ControlError>>>,
        applied: RefCell<Vec<Vec<u8>>>,
        t0: Instant,
        slept: Cell<Duration>,
    }

    impl Fake {
        fn new(up_after: u32, answers: Vec<Result<TransitionReply, ControlError>>) -> Self {
            Self {
                up_after,
                looks: Cell::new(0),
                stopped: false,
                answers: RefCell::new(answers),
                applied: RefCell::new(Vec::new()),
                t0: Instant::now(),
                slept: Cell::new(Duration::ZERO),
            }
        }
    }

    impl Target for Fake {
        fn kernel_up(&self) -> Result<(), ControlError> {
            if self.stopped {
                return Err(ControlError::Stopped);
            }
            self.looks.set(self.looks.get() + 1);
            if self.looks.get() > self.up_after {
                Ok(())
            } else {
                Err(ControlError::KernelNotReady("still booting".into()))
            }
        }

        fn apply(&self, ko: &[u8]) -> Result<TransitionReply, ControlError> {
            self.applied.borrow_mut().push(ko.to_vec());
            self.answers.borrow_mut().remove(0)
        }

        fn now(&self) -> Instant {
            self.t0 + self.slept.get()
        }

        fn sleep(&self, d: Duration) {
            self.slept.set(self.slept.get() + d);
        }
    }

    fn reply(name: &str) -> TransitionReply {
        serde_json::from_value(serde_json::json!({
            "patch": {
                "name": name, "state": "enabled", "replace": false, "forced": false,
                "applied_at": 0, "pause_us": 1.0, "arena_bytes": 0, "funcs": [],
            },
            "prepare_ms": 1.0, "pause_us": 1.0, "bytes_written": 5,
        }))
        .expect("a TransitionReply")
    }

    fn patch(name: &str) -> BootPatch {
        BootPatch {
            path: PathBuf::from(format!("{name}.ko")),
            bytes: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn patches_wait_for_the_kernel_and_go_in_order_a_failure_does_not_stop_the_rest() {
        let fake = Fake::new(
            3,
            vec![
                Ok(reply("a")),
                Err(ControlError::Internal("refused")),
                Ok(reply("c")),
            ],
        );
        let s = run(
            &fake,
            &[patch("a"), patch("b"), patch("c")],
            Duration::from_secs(10),
        );
        assert_eq!(
            s,
            Summary {
                applied: 2,
                failed: 1,
                never_up: false
            }
        );
        assert_eq!(fake.looks.get(), 4, "looked until the kernel was up");
        assert_eq!(fake.slept.get(), POLL * 3);
        assert_eq!(
            *fake.applied.borrow(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
    }

    #[test]
    fn a_kernel_that_never_comes_up_is_given_up_on_in_bounded_time() {
        let fake = Fake::new(u32::MAX, vec![]);
        let s = run(&fake, &[patch("a")], Duration::from_secs(5));
        assert!(s.never_up && s.applied == 0 && s.failed == 0, "{s:?}");
        assert!(fake.applied.borrow().is_empty());
        assert!(fake.slept.get() >= Duration::from_secs(5));
        assert!(fake.slept.get() < Duration::from_secs(5) + 2 * POLL);

        let mut gone = Fake::new(0, vec![]);
        gone.stopped = true;
        let s = run(&gone, &[patch("a")], Duration::from_secs(5));
        assert!(s.never_up, "a stopped guest ends the wait at once");
        assert_eq!(gone.slept.get(), Duration::ZERO);
    }

    #[test]
    fn a_busy_refusal_is_tried_again_and_other_errors_are_not() {
        let fake = Fake::new(
            0,
            vec![
                Err(ControlError::Busy("apply of x".into())),
                Err(ControlError::Busy("apply of x".into())),
                Ok(reply("a")),
                Err(ControlError::KernelNotReady("x".into())),
            ],
        );
        let s = run(&fake, &[patch("a"), patch("b")], Duration::from_secs(5));
        assert_eq!((s.applied, s.failed), (1, 1));
        assert_eq!(fake.applied.borrow().len(), 4);
        assert_eq!(fake.slept.get(), POLL * 2);
    }

    #[test]
    fn nothing_to_apply_looks_at_nothing() {
        let fake = Fake::new(0, vec![]);
        assert_eq!(run(&fake, &[], Duration::ZERO), Summary::default());
        assert_eq!(fake.looks.get(), 0);
    }

    #[test]
    fn a_patch_file_is_read_at_start_up_and_a_bad_one_named() {
        let dir = std::env::temp_dir().join(format!("klpv-boot-patch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let ok = dir.join("fix.ko");
        std::fs::write(&ok, b"\x7fELF...").expect("write");
        assert_eq!(BootPatch::read(&ok).expect("readable").bytes, b"\x7fELF...");

        let missing = dir.join("missing.ko");
        let e = BootPatch::read(&missing).expect_err("missing").to_string();
        assert!(e.starts_with("--patch ") && e.contains("missing.ko"), "{e}");

        let empty = dir.join("empty.ko");
        std::fs::write(&empty, b"").expect("write");
        assert!(matches!(
            BootPatch::read(&empty),
            Err(BootPatchError::Empty(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Changing the attached guest: apply, disable, enable, remove and roll
//! back patches through the engine's transition lifecycle
//! ([`klpvisor_engine::transition::run`]), the same one the VMM runs.
//!
//! This is attach's own small control loop, not the VMM's
//! (`vmm/src/control.rs`): that one is built around the VMM's KVM `Vm`
//! (its pause, its doorbell, its module-load hooks, its housekeeping of
//! the gate's registrations), none of which a QEMU host has. What is
//! repeated here is the shape of a change (one at a time, the engine's
//! state published after it, the reply built from the outcome), about
//! 150 lines; the lifecycle and the engine are shared.
//!
//! QEMU cannot raise the call gate's interrupt ([`QemuHost`] says so
//! through [`Host::can_call_guest`]): functions are redirected by a `jmp`
//! at their entry, and patches that need code run in the guest (klp
//! callbacks, per-CPU data, module objects) are refused before anything
//! is written.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use klpvisor_api::{
    ErrorKind, HistoryEntry, PatchInfo, PatchesReply, PendingTransition, RollbackReply,
    TransitionReply,
};
use klpvisor_engine::arena::ArenaError;
use klpvisor_engine::engine::{Engine, EngineError, Fault, Prepared};
use klpvisor_engine::safepoint::Blocker;
use klpvisor_engine::transition::{self as lifecycle, Host, Live, Transition, TransitionError};
use klpvisor_guest::{Guest, Kernel};
use klpvisor_qemu::{QemuError, QemuGuest};

use crate::{lock, App, HttpError};

/// Why a change failed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The lifecycle stopped (a patch that needs calls into the guest).
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Talking to QEMU, or its guest's memory, failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// Another change holds the engine: the one `GET /patches` shows
    /// as its transition, or one still being prepared.
    #[error("another change is under way ({0}); retry when it has ended")]
    Busy(String),
}

impl From<ChangeError> for HttpError {
    fn from(e: ChangeError) -> Self {
        if let ChangeError::Engine(EngineError::Arena(ArenaError::AlreadyMapped { .. })) = &e {
            // The engine's state lives in the attach process: an earlier
            // attach patched this VM and its records went with it.
            return HttpError(
                StatusCode::CONFLICT,
                ErrorKind::Refused,
                format!(
                    "{e}. An earlier klpvisor-attach patched this VM and its records of what it \
                     wrote ended with it; the guest stays as it left it, and further patching \
                     needs the VM restarted"
                ),
            );
        }
        let (status, kind) = match &e {
            ChangeError::Busy(_) => (StatusCode::CONFLICT, ErrorKind::Busy),
            ChangeError::Qemu(QemuError::NoArena) => (StatusCode::CONFLICT, ErrorKind::Refused),
            ChangeError::Qemu(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Failed),
            ChangeError::Transition(TransitionError::NoGuestCalls { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::Refused)
            }
            ChangeError::Transition(_) => (StatusCode::CONFLICT, ErrorKind::Refused),
            ChangeError::Engine(EngineError::Blocked(_)) => {
                (StatusCode::CONFLICT, ErrorKind::Blocked)
            }
            ChangeError::Engine(e) => match e.kind() {
                Fault::Module => (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::Refused),
                Fault::State => (StatusCode::CONFLICT, ErrorKind::Refused),
                Fault::NotFound => (StatusCode::NOT_FOUND, ErrorKind::of_status(404)),
                Fault::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, ErrorKind::of_status(507)),
                Fault::Guest | Fault::Internal => {
                    (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Failed)
                }
            },
        };
        HttpError(status, kind, e.to_string())
    }
}

/// The lifecycle's host over QEMU: pauses are QMP `stop`/`cont` (never
/// across a pause or resume of the API's), writes go through
/// `/proc/PID/mem`, nothing can be run in the guest, and the transition
/// under way is published for `GET /patches`.
pub struct QemuHost<'a> {
    app: &'a App,
    /// `apply`, `disable`, `enable`, `rollback` (`remove`: no transition).
    action: &'a str,
    forced: bool,
}

impl Host for QemuHost<'_> {
    type Guest = QemuGuest;
    type Error = ChangeError;

    fn paused<T>(
        &self,
        f: impl FnOnce(&QemuGuest) -> T,
    ) -> Result<(T, Option<Duration>), ChangeError> {
        let _g = lock(&self.app.gate);
        Ok(self.app.guest.paused(f)?)
    }

    /// Paused through this API or by QEMU's own monitor (a failed status
    /// read counts as paused: the lifecycle then asks for nothing to run).
    fn is_paused(&self) -> bool {
        *lock(&self.app.user_paused) || !self.app.guest.status().is_ok_and(|(r, _)| r)
    }

    fn guest(&self) -> &QemuGuest {
        &self.app.guest
    }

    /// Never called ([`QemuHost::can_call_guest`] is `false`); QEMU has no
    /// command that raises a chosen vector.
    fn raise_vector(&self, _vcpu: usize, _vector: u8) -> Result<bool, ChangeError> {
        Ok(false)
    }

    fn doorbell_rings(&self) -> u64 {
        0
    }

    /// Nothing rings on QEMU: waits out the deadline (never asked for, as
    /// nothing is sent into the guest).
    fn wait_doorbell(&self, _seen: u64, deadline: Instant) {
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    }

    fn can_call_guest(&self) -> bool {
        false
    }

    fn no_guest_calls_reason(&self) -> String {
        "QEMU offers no QMP or monitor command that raises a chosen interrupt vector in the guest"
            .into()
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    /// Shown by `GET /patches` until the transition ends (see
    /// [`PendingGuard`]), so a client can tell a transition that waits
    /// for a safe point from a request that hangs.
    fn begun(&self, patch: &str) {
        *lock(&self.app.pending) = Some(PendingTransition::begun(patch, self.action, self.forced));
    }

    /// The tasks that blocked the last attempt, for `GET /patches`.
    fn waiting(&self, attempts: u32, waited: Duration, blockers: &[Blocker]) {
        if let Some(p) = lock(&self.app.pending).as_mut() {
            p.waiting(attempts, waited, blockers.iter().map(ToString::to_string));
        }
    }
}

/// Clears the published transition however it ends (committed, refused,
/// failed, or its worker unwinding).
struct PendingGuard<'a>(&'a App);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.pending) = None;
    }
}

/// Takes the one change allowed at a time, or says which one holds it.
fn take_change(app: &App) -> Result<std::sync::MutexGuard<'_, ()>, ChangeError> {
    match app.changing.try_lock() {
        Ok(g) => Ok(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => {
            Err(ChangeError::Busy(match lock(&app.pending).as_ref() {
                Some(t) => format!("{} of {}", t.action, t.patch),
                None => "being prepared".into(),
            }))
        }
    }
}

/// Runs one transition on the attached guest, one change at a time
/// (a second one is refused as busy, not queued, as the VMM does).
fn run_transition<R>(
    app: &App,
    kernel: &Kernel,
    action: &str,
    t: Transition,
    prepare: impl Fn(&mut Engine, &Kernel) -> Result<Prepared, EngineError>,
    finish: impl FnOnce(&mut Engine, lifecycle::Outcome) -> Result<R, ChangeError>,
) -> Result<R, ChangeError> {
    if app.guest.arena().1 == 0 {
        return Err(QemuError::NoArena.into());
    }
    let _changing = take_change(app)?;
    let _pending = PendingGuard(app);
    let mut engine = lock(&app.engine);
    let host = QemuHost {
        app,
        action,
        forced: t.force,
    };
    let mut live = Live {
        engine: &mut engine,
        kernel,
        prepare,
    };
    let outcome = lifecycle::run(&host, &mut live, action, t);
    let reply = outcome.and_then(|o| finish(&mut engine, o));
    publish(app, &engine);
    reply
}

/// Publishes the engine's state for `GET /patches`.
fn publish(app: &App, engine: &Engine) {
    *lock(&app.published) = PatchesReply {
        patches: engine.list(),
        live: engine.live(),
        retired: engine.retired(),
        gate: engine.gate_info(),
        ftrace: engine.ftrace_redirects(),
        ftrace_handler_gpa: engine.ftrace_handler_gpa(),
        ..PatchesReply::default()
    };
}

/// A transition of one patch (apply, disable, enable).
fn transition(
    app: &App,
    kernel: &Kernel,
    action: &str,
    t: Transition,
    prepare: impl Fn(&mut Engine, &Kernel) -> Result<Prepared, EngineError>,
) -> Result<TransitionReply, ChangeError> {
    run_transition(app, kernel, action, t, prepare, |engine, o| {
        Ok(engine.transition_reply(o)?)
    })
}

/// Loads and enables a livepatch module. No signature policy here:
/// whoever can reach the API socket (0600) can patch, as with `vmm`
/// without `--trusted-keys`; the module is taken as sent.
pub fn apply(
    app: &App,
    kernel: &Kernel,
    ko: &[u8],
    t: Transition,
) -> Result<TransitionReply, ChangeError> {
    let guest = &app.guest;
    transition(app, kernel, "apply", t, |e, k| {
        let mut p = e.prepare_apply(k, guest, ko, t.force)?;
        p.set_signature(
            "unsigned (klpvisor-attach checks no signatures)".into(),
            None,
        );
        Ok(p)
    })
}

/// Disables enabled patch `name`.
pub fn disable(
    app: &App,
    kernel: &Kernel,
    name: &str,
    t: Transition,
) -> Result<TransitionReply, ChangeError> {
    let guest = &app.guest;
    transition(app, kernel, "disable", t, |e, k| {
        e.prepare_disable(k, guest, name, t.force)
    })
}

/// Enables loaded patch `name` again.
pub fn enable(
    app: &App,
    kernel: &Kernel,
    name: &str,
    t: Transition,
) -> Result<TransitionReply, ChangeError> {
    let guest = &app.guest;
    transition(app, kernel, "enable", t, |e, k| {
        e.prepare_enable(k, guest, name, t.force)
    })
}

/// Returns every patch to its state just before transition `to`
/// (default: the last), in one transition.
pub fn rollback(
    app: &App,
    kernel: &Kernel,
    to: Option<u64>,
    t: Transition,
) -> Result<RollbackReply, ChangeError> {
    let guest = &app.guest;
    let target = std::cell::Cell::new(0);
    run_transition(
        app,
        kernel,
        "rollback",
        t,
        |e, k| {
            target.set(to.unwrap_or(e.last_seq()));
            e.prepare_rollback(k, guest, Some(target.get()), t.force)
        },
        |engine, o| Ok(engine.rollback_reply(target.get(), o)),
    )
}

/// Forgets a disabled or replaced patch; its arena space is freed in a
/// short pause if no task's stack references its code, else later.
pub fn remove(app: &App, kernel: &Kernel, name: &str) -> Result<PatchInfo, ChangeError> {
    let _changing = take_change(app)?;
    let mut engine = lock(&app.engine);
    let info = engine.remove(name)?;
    let host = QemuHost {
        app,
        action: "remove",
        forced: false,
    };
    // Read the stacks while the guest runs; the pause re-reads only the
    // tasks that may have run since.
    engine.prescan_retired(kernel, host.guest());
    let (swept, _) = host.paused(|g| engine.sweep(kernel, g))?;
    swept?;
    publish(app, &engine);
    Ok(info)
}

/// The committed transitions a rollback can return to.
pub fn history(app: &App) -> Vec<HistoryEntry> {
    lock(&app.engine).history()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(e: ChangeError) -> (StatusCode, ErrorKind, String) {
        let h = HttpError::from(e);
        (h.0, h.1, h.2)
    }

    #[test]
    fn refusals_say_why_with_the_vmms_statuses() {
        let (s, k, m) = reply(ChangeError::Transition(TransitionError::NoGuestCalls {
            patch: "p".into(),
            needs: "it has klp callbacks",
            why: "no vector".into(),
        }));
        assert_eq!(
            (s, k),
            (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::Refused)
        );
        assert!(
            m.contains("klp callbacks") && m.contains("no vector"),
            "{m}"
        );
        let (s, k, m) = reply(QemuError::NoArena.into());
        assert_eq!((s, k), (StatusCode::CONFLICT, ErrorKind::Refused));
        assert!(m.contains("--arena"), "{m}");
        let (s, k, m) = reply(ChangeError::Busy("apply of p".into()));
        assert_eq!((s, k), (StatusCode::CONFLICT, ErrorKind::Busy));
        assert!(m.contains("apply of p"), "{m}");
        let (s, k, m) = reply(ChangeError::Engine(EngineError::Arena(
            ArenaError::AlreadyMapped { slots: vec![3] },
        )));
        assert_eq!((s, k), (StatusCode::CONFLICT, ErrorKind::Refused));
        assert!(m.contains("VM restarted"), "{m}");
    }
}

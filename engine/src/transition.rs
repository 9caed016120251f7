//! klp's transition lifecycle, in one place, as the kernel keeps it in
//! `kernel/livepatch/transition.c`: init (prepare while the guest runs,
//! installing the call gate on first use), the pre callbacks, the switch
//! retried with backoff until a safe point or the timeout, the post
//! callbacks, and cancel/abandon when a `pre_patch` refuses or time runs
//! out. `force` is the [`Transition::force`] flag the engine's commit
//! honours (klp_force_transition: no stack check).
//!
//! It is generic over two small traits, so the whole lifecycle runs, and is
//! tested, without KVM:
//! - [`Host`]: what the hypervisor provides, as Cloud Hypervisor's
//!   `Pausable` abstracts pausing: every vCPU paused around a step, an
//!   interrupt raised on a vCPU, the callback doorbell, a clock.
//! - [`Patcher`]: the engine's steps on one transition (prepare, load,
//!   arm and poll a callback, commit, undo); [`Live`] implements it over
//!   [`Engine`] and the guest kernel.
//!
//! klp's callback rules (which run, in what order, what cancels what) are
//! [`callback`](crate::callback)'s; how a callback runs in the guest is
//! the gate's ([`crate::callback::gate`]).

use std::time::{Duration, Instant};

use klpvisor_api::{CallbackKind, CallbackRun, Hex};
use klpvisor_guest::{Guest, Kernel};
use thiserror::Error;

use crate::callback::gate::{Progress, IRQ_WORK_VECTOR};
use crate::callback::{Call, Calls};
use crate::engine::{Armed, Committed, Engine, EngineError, PercpuError, Prepared};
use crate::safepoint::Blocker;
use crate::write::Plan;

/// How long a transition waits for a safe point before failing cleanly
/// (`?timeout_ms=` overrides it, up to [`MAX_TRANSITION_TIMEOUT`]).
pub const TRANSITION_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait a request may ask for (the API answers within 30 s).
pub const MAX_TRANSITION_TIMEOUT: Duration = Duration::from_secs(25);
/// How long a transition waits for a safe point before it sends klp's fake
/// signal to the tasks that block it. klp waits 15 s (`SIGNALS_TIMEOUT`),
/// but klp's transitions never time out; klpvisor's do (10 s by default),
/// so it nudges after half of the default, before the timeout can refuse.
pub const NUDGE_AFTER: Duration = Duration::from_secs(5);
/// How long a post callback, or one that cancels a pre callback, may take.
/// Pre callbacks share the transition's timeout with the safe-point wait.
pub const CALLBACK_GRACE: Duration = Duration::from_secs(2);
/// The first wait between two tries for a safe point; it doubles up to
/// [`BACKOFF_MAX`], so a short blocker costs little and a long one does
/// not make the guest pause hundreds of times a second.
pub const BACKOFF_START: Duration = Duration::from_millis(1);
/// The longest wait between two tries for a safe point.
pub const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// How one transition may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Skip the safe-point check; the patch is marked forced.
    pub force: bool,
    /// How long to retry while tasks block it (pre callbacks included).
    pub timeout: Duration,
}

/// Why a transition stopped in its callbacks; nothing was redirected.
#[derive(Debug, Error)]
pub enum TransitionError {
    /// A `pre_patch` returned non-zero: klp refuses the patch.
    #[error(
        "{patch}: {callback} returned {ret}{errno}: klp refuses a patch whose pre_patch fails, \
         so the transition was abandoned and no function was redirected{cancelled}"
    )]
    Refused {
        /// The patch whose callback refused.
        patch: String,
        /// Which callback (always `pre_patch`: only it returns a value).
        callback: CallbackKind,
        /// Its return value (a negative errno).
        ret: i32,
        /// ` (-EBUSY)` and the like, or empty.
        errno: String,
        /// `; ran ... to cancel`, or empty.
        cancelled: String,
    },
    /// A callback did not return in time (the guest's CPU never took the
    /// interrupt, its workqueue is stuck, or the callback is slow).
    #[error(
        "{patch}: {callback} did not finish within {ms} ms ({progress}); the transition was \
         abandoned and no function was redirected{cancelled}"
    )]
    CallbackTimeout {
        /// The patch whose callback did not finish.
        patch: String,
        /// Which callback.
        callback: CallbackKind,
        /// How long it was waited for.
        ms: u64,
        /// How far it got (see [`Progress::describe`]).
        progress: String,
        /// `; ran ... to cancel`, or empty.
        cancelled: String,
    },
    /// Callbacks run in the guest, which a user's pause holds stopped.
    #[error(
        "the VM is paused and this transition runs klp callbacks, which run in the guest; \
         resume it first (PUT /vm/resume)"
    )]
    PausedForCallbacks,
    /// A patch's per-CPU memory is allocated by the guest kernel, which a
    /// user's pause holds stopped.
    #[error(
        "the VM is paused and this patch has per-CPU variables, whose memory the guest kernel \
         allocates (as it does a module's); resume it first (PUT /vm/resume)"
    )]
    PausedForPercpu,
    /// The host cannot run code in the guest (see [`Host::can_call_guest`])
    /// and the patch needs to.
    #[error(
        "{patch}: {needs}, which klpvisor runs in the guest through its call gate, started by an \
         interrupt the host raises; this host cannot raise it ({why}), so the patch is refused \
         and nothing was written to the guest"
    )]
    NoGuestCalls {
        /// The patch refused.
        patch: String,
        /// What in it needs the guest to run klpvisor's code.
        needs: &'static str,
        /// Why the host cannot (see [`Host::no_guest_calls_reason`]).
        why: String,
    },
}

/// What the hypervisor provides to a transition. The VMM implements it
/// over KVM; tests implement it over a fake guest with a fake clock.
pub trait Host {
    /// The guest the engine reads and writes.
    type Guest: Guest + ?Sized;
    /// The host's own failures (a pause refused, the VM stopped); engine
    /// and transition errors convert into it, so the caller gets one type.
    type Error: From<EngineError> + From<TransitionError> + std::fmt::Display;

    /// Runs `f` with every vCPU paused: inside a pause a user holds, else
    /// one of its own, ended before returning. Returns `f`'s value and the
    /// time the vCPUs spent out of guest mode (`None`: the VM was paused
    /// already).
    fn paused<T>(
        &self,
        f: impl FnOnce(&Self::Guest) -> T,
    ) -> Result<(T, Option<Duration>), Self::Error>;
    /// Whether a user holds the VM paused (callbacks cannot run then).
    fn is_paused(&self) -> bool;
    /// The guest while it runs (a callback's progress is read so).
    fn guest(&self) -> &Self::Guest;
    /// Raises interrupt `vector` on vCPU `vcpu`, called while paused;
    /// `false` if its local APIC did not take it now.
    fn raise_vector(&self, vcpu: usize, vector: u8) -> Result<bool, Self::Error>;
    /// How often the call gate's doorbell has rung so far.
    fn doorbell_rings(&self) -> u64;
    /// Waits until the doorbell rings past `seen`, or `deadline`.
    fn wait_doorbell(&self, seen: u64, deadline: Instant);
    /// Whether the host can run code in the guest: raise the call gate's
    /// vector on a vCPU ([`Host::raise_vector`]) and hear the port the
    /// hooks on the guest's module loads read. `false` (QEMU, which has
    /// no command that raises a chosen vector and does not pass port
    /// reads to klpvisor): the lifecycle never installs the gate, so a
    /// patch's functions are redirected by a `jmp` at their entry (no
    /// ftrace registration), the switch log and the kernel-log lines are
    /// skipped, and a patch with klp callbacks, per-CPU data or module
    /// objects is refused before anything is written.
    fn can_call_guest(&self) -> bool {
        true
    }
    /// Why [`Host::can_call_guest`] is `false`, for the refusal.
    fn no_guest_calls_reason(&self) -> String {
        String::new()
    }
    /// The time now.
    fn now(&self) -> Instant;
    /// Sleeps `d` (the backoff between tries for a safe point).
    fn sleep(&self, d: Duration);
    /// The transition of `patch` is prepared and about to run its
    /// callbacks and wait for a safe point (the VMM shows it "in
    /// transition").
    fn begun(&self, _patch: &str) {}
    /// No safe point yet after `attempts` tries over `waited`; retrying.
    fn waiting(&self, _attempts: u32, _waited: Duration, _blockers: &[Blocker]) {}
}

/// What the lifecycle reads of a prepared transition.
pub trait Planned {
    /// The patch the transition is about.
    fn name(&self) -> &str;
    /// What the transition will not do that klp would.
    fn warnings(&self) -> &[String];
    /// The klp callbacks to run around the switch.
    fn calls(&self) -> &Calls;
    /// Whether it loads a new patch (whose code must be in the guest
    /// before its `pre_patch` runs).
    fn loads(&self) -> bool;
    /// Whether it loads a patch with module objects, which needs the
    /// hooks on the guest's module loads ([`crate::hook`]).
    fn needs_hooks(&self) -> bool {
        false
    }
    /// Whether it loads a patch whose per-CPU block is not allocated yet
    /// (see [`Patcher::arm_percpu_alloc`]); such a plan is never written.
    fn needs_percpu(&self) -> bool {
        false
    }
    /// Whether functions it redirects should be registered with the
    /// guest's ftrace first (see [`Patcher::arm_ops`]).
    fn wants_ops(&self) -> bool {
        false
    }
    /// Why it cannot be committed as planned, known before anything is
    /// written (see [`Prepared::usable`]).
    fn usable(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

impl Planned for Prepared {
    fn name(&self) -> &str {
        Prepared::name(self)
    }
    fn warnings(&self) -> &[String] {
        Prepared::warnings(self)
    }
    fn calls(&self) -> &Calls {
        Prepared::calls(self)
    }
    fn loads(&self) -> bool {
        Prepared::loads(self)
    }
    fn needs_hooks(&self) -> bool {
        Prepared::needs_hooks(self)
    }
    fn needs_percpu(&self) -> bool {
        Prepared::needs_percpu(self)
    }
    fn wants_ops(&self) -> bool {
        Prepared::wants_ops(self)
    }
    fn usable(&self) -> Result<(), EngineError> {
        Prepared::usable(self)
    }
}

/// The engine's steps on one transition, each on guest `G` (paused for
/// all but [`Patcher::prepare`] and [`Patcher::poll_call`]).
pub trait Patcher<G: Guest + ?Sized> {
    /// The prepared transition.
    type Prepared: Planned;
    /// What undoes a load.
    type Undo;
    /// Prepares the transition while the guest runs (reads only).
    fn prepare(&mut self) -> Result<Self::Prepared, EngineError>;
    /// Whether the call gate is installed.
    fn has_gate(&self) -> bool;
    /// Installs the call gate (its arena pages).
    fn install_gate(&mut self, guest: &G) -> Result<(), EngineError>;
    /// Whether the hooks on the guest's module loads are installed.
    fn has_hooks(&self) -> bool {
        true
    }
    /// Installs the hooks on the guest's module loads (an arena page and
    /// two entries).
    fn install_hooks(&mut self, _guest: &G) -> Result<(), EngineError> {
        Ok(())
    }
    /// Writes a new patch's pages, before its `pre_patch` runs.
    fn load(&mut self, p: &mut Self::Prepared, guest: &G) -> Result<Self::Undo, EngineError>;
    /// Restores the loaded pages byte for byte.
    fn unload(&mut self, undo: Self::Undo, guest: &G) -> Result<(), EngineError>;
    /// Keeps an abandoned load's pages mapped until no stack references
    /// them (its code may still run).
    fn retire_load(&mut self, p: Self::Prepared);
    /// Sends one callback into the guest.
    fn arm_call(
        &mut self,
        p: &Self::Prepared,
        guest: &G,
        call: &Call,
    ) -> Result<Armed, EngineError>;
    /// How far a sent callback got.
    fn poll_call(&self, guest: &G, armed: &Armed) -> Result<Progress, EngineError>;
    /// After the transition's last callback: takes back what the guest's
    /// klp was shown while they ran (see `register::livepatch`).
    fn end_calls(&mut self, _guest: &G) -> Result<(), EngineError> {
        Ok(())
    }
    /// Whether [`Patcher::end_calls`] has anything to take back.
    fn klp_shown(&self) -> bool {
        false
    }
    /// Whether a transition's outcome goes to the guest's kernel log
    /// ([`Patcher::arm_log`]), which needs the call gate.
    fn logs(&self) -> bool {
        false
    }
    /// Sends a line to the guest's kernel log; `None` if it sends nothing.
    fn arm_log(&mut self, _guest: &G, _line: &str) -> Result<Option<Armed>, EngineError> {
        Ok(None)
    }
    /// Sends klp's fake signal to the blocking task `pid` through the gate
    /// (see [`Engine::arm_nudge`]); `None` if there is nothing to send.
    /// The default sends nothing.
    fn arm_nudge(&mut self, _guest: &G, _pid: i32) -> Result<Option<Armed>, EngineError> {
        Ok(None)
    }
    /// Sends the allocation of the per-CPU block `p` needs through the
    /// gate (see [`Engine::arm_percpu_alloc`]); `None` if it needs none.
    fn arm_percpu_alloc(
        &mut self,
        _p: &Self::Prepared,
        _guest: &G,
    ) -> Result<Option<Armed>, EngineError> {
        Ok(None)
    }
    /// Takes what the allocation returned (0 is -ENOMEM, an error); the
    /// block belongs to `p`'s apply from now on.
    fn percpu_allocated(&mut self, _p: &Self::Prepared, _ret: u64) -> Result<(), EngineError> {
        Ok(())
    }
    /// The apply did not commit: its per-CPU block, unless a retired load
    /// kept it with its pages, is queued to be freed.
    fn abandon_percpu(&mut self) {}
    /// Per-CPU blocks queued to be freed.
    fn percpu_frees(&self) -> usize {
        0
    }
    /// Sends the free of the oldest queued per-CPU block through the gate
    /// and forgets it; `None` if none is queued. Returns its patch's name.
    fn arm_percpu_free(&mut self, _guest: &G) -> Result<Option<(Armed, String)>, EngineError> {
        Ok(None)
    }
    /// Installs the ftrace redirect handler and slots `p` needs (see
    /// [`crate::ftrace_ops`]); the caller prepares `p` again after.
    fn install_ops(&mut self, _p: &Self::Prepared, _guest: &G) -> Result<(), EngineError> {
        Ok(())
    }
    /// Sends the next step that registers one of `p`'s functions with the
    /// guest's ftrace; `None` when all are registered.
    fn arm_ops(&mut self, _p: &Self::Prepared, _guest: &G) -> Result<Option<Armed>, EngineError> {
        Ok(None)
    }
    /// Takes what the ftrace step sent last returned.
    fn ops_done(&mut self, _ret: u64) -> Result<(), EngineError> {
        Ok(())
    }
    /// The transition ended: slots assigned to it that never reached the
    /// guest are handed out again.
    fn abandon_ops(&mut self) {}
    /// The guest could not run `p`'s registrations in time: its functions
    /// not registered go by a jmp (see [`Engine::ops_unreachable`]).
    fn ops_unreachable(&mut self, _p: &Self::Prepared) {}
    /// The ftrace step sent last: the function and the kernel call.
    fn ops_armed(&self) -> Option<(String, &'static str)> {
        None
    }
    /// Ftrace redirects of functions no patch redirects any more.
    fn ops_releases(&self) -> usize {
        0
    }
    /// Zeroes the slots of ftrace redirects let go (vCPUs paused).
    fn scrub_ops(&mut self, _guest: &G) -> Result<(), EngineError> {
        Ok(())
    }
    /// Sends the next step that lets go of such a redirect; `None` if
    /// none waits. Returns what it is, for the log.
    fn arm_ops_release(&mut self, _guest: &G) -> Result<Option<(Armed, String)>, EngineError> {
        Ok(None)
    }
    /// Whether the switch log (see [`crate::switches`]) should be
    /// registered before this transition's safe-point checks.
    fn switch_log_wanted(&self) -> bool {
        false
    }
    /// Sends the switch log's registration through the gate (installing
    /// its pages first); `None` if the guest cannot have one.
    fn arm_switch_log(&mut self, _guest: &G) -> Result<Option<Armed>, EngineError> {
        Ok(None)
    }
    /// What the registration returned (`None`: it did not finish).
    fn switch_log_done(&mut self, _ret: Option<u64>) {}
    /// Whether the switch log is registered (let go once changes pause).
    fn switch_log_registered(&self) -> bool {
        false
    }
    /// Whether the switch log's pages are in the arena.
    fn switch_log_installed(&self) -> bool {
        false
    }
    /// Sends the switch log's unregistration through the gate; `None` if
    /// it is not registered.
    fn arm_switch_log_release(&mut self, _guest: &G) -> Result<Option<Armed>, EngineError> {
        Ok(None)
    }
    /// What the unregistration returned (`None`: it did not finish).
    fn switch_log_released(&mut self, _ret: Option<u64>) {}
    /// Judges the tasks while the guest runs, so that the next
    /// [`Patcher::commit`] of `p` re-judges only those that ran since.
    fn prescan(&mut self, _p: &Self::Prepared, _guest: &G) {}
    /// The switch: the safe-point check and every entry write.
    fn commit(&mut self, p: &Self::Prepared, guest: &G) -> Result<Committed, EngineError>;
}

/// [`Patcher`] over the engine and the guest kernel; `prepare` makes the
/// transition (apply, enable, disable or rollback) from them.
pub struct Live<'a, F> {
    /// The guest's patches.
    pub engine: &'a mut Engine,
    /// The guest kernel the transition resolves against.
    pub kernel: &'a Kernel,
    /// Prepares the transition (called again after the gate is installed:
    /// the plan must use the arena that has it).
    pub prepare: F,
}

impl<G, F> Patcher<G> for Live<'_, F>
where
    G: Guest + ?Sized,
    F: FnMut(&mut Engine, &Kernel) -> Result<Prepared, EngineError>,
{
    type Prepared = Prepared;
    /// The plans that undo a load, to commit in order: the module's
    /// registration, then the pages.
    type Undo = Vec<Plan>;

    fn prepare(&mut self) -> Result<Prepared, EngineError> {
        (self.prepare)(self.engine, self.kernel)
    }

    fn has_gate(&self) -> bool {
        self.engine.has_gate()
    }

    fn install_gate(&mut self, guest: &G) -> Result<(), EngineError> {
        self.engine.install_gate(self.kernel, guest).map(drop)
    }

    fn has_hooks(&self) -> bool {
        self.engine.has_hooks()
    }

    fn install_hooks(&mut self, guest: &G) -> Result<(), EngineError> {
        self.engine.install_hooks(self.kernel, guest).map(drop)
    }

    fn load(&mut self, p: &mut Prepared, guest: &G) -> Result<Vec<Plan>, EngineError> {
        self.engine.load(self.kernel, guest, p)
    }

    fn unload(&mut self, undo: Vec<Plan>, guest: &G) -> Result<(), EngineError> {
        if self.engine.klp_shown() {
            // Its struct klp_patch may be on the guest's klp_patches.
            return Err(crate::register::RegisterError::KlpBusy(
                "klpvisor's patches are still on the guest's klp_patches",
            )
            .into());
        }
        for plan in undo {
            plan.commit(guest)?;
        }
        Ok(())
    }

    fn retire_load(&mut self, p: Prepared) {
        self.engine.retire_load(p);
    }

    fn arm_call(&mut self, p: &Prepared, guest: &G, call: &Call) -> Result<Armed, EngineError> {
        self.engine.arm_call(self.kernel, guest, p, call)
    }

    fn poll_call(&self, guest: &G, armed: &Armed) -> Result<Progress, EngineError> {
        self.engine.poll_call(guest, armed)
    }

    fn end_calls(&mut self, guest: &G) -> Result<(), EngineError> {
        self.engine.hide_klp(self.kernel, guest)
    }

    fn klp_shown(&self) -> bool {
        self.engine.klp_shown()
    }

    fn logs(&self) -> bool {
        true
    }

    fn arm_log(&mut self, guest: &G, line: &str) -> Result<Option<Armed>, EngineError> {
        self.engine.arm_log(self.kernel, guest, line).map(Some)
    }

    fn arm_nudge(&mut self, guest: &G, pid: i32) -> Result<Option<Armed>, EngineError> {
        self.engine.arm_nudge(self.kernel, guest, pid)
    }

    fn arm_percpu_alloc(&mut self, p: &Prepared, guest: &G) -> Result<Option<Armed>, EngineError> {
        self.engine.arm_percpu_alloc(self.kernel, guest, p)
    }

    fn percpu_allocated(&mut self, p: &Prepared, ret: u64) -> Result<(), EngineError> {
        self.engine.percpu_allocated(p, ret)
    }

    fn abandon_percpu(&mut self) {
        self.engine.abandon_percpu()
    }

    fn percpu_frees(&self) -> usize {
        self.engine.percpu_frees()
    }

    fn arm_percpu_free(&mut self, guest: &G) -> Result<Option<(Armed, String)>, EngineError> {
        self.engine.arm_percpu_free(self.kernel, guest)
    }

    fn install_ops(&mut self, p: &Prepared, guest: &G) -> Result<(), EngineError> {
        self.engine.install_ops(self.kernel, guest, p)
    }

    fn arm_ops(&mut self, p: &Prepared, guest: &G) -> Result<Option<Armed>, EngineError> {
        self.engine.arm_ops(self.kernel, guest, p)
    }

    fn ops_done(&mut self, ret: u64) -> Result<(), EngineError> {
        self.engine.ops_done(ret)
    }

    fn abandon_ops(&mut self) {
        self.engine.abandon_ops()
    }

    fn ops_unreachable(&mut self, p: &Prepared) {
        self.engine.ops_unreachable(p)
    }

    fn ops_armed(&self) -> Option<(String, &'static str)> {
        self.engine.ops_armed()
    }

    fn ops_releases(&self) -> usize {
        self.engine.ops_releases()
    }

    fn scrub_ops(&mut self, guest: &G) -> Result<(), EngineError> {
        self.engine.scrub_ops(guest)
    }

    fn arm_ops_release(&mut self, guest: &G) -> Result<Option<(Armed, String)>, EngineError> {
        self.engine.arm_ops_release(self.kernel, guest)
    }

    fn switch_log_wanted(&self) -> bool {
        self.engine.switch_log_wanted()
    }

    fn arm_switch_log(&mut self, guest: &G) -> Result<Option<Armed>, EngineError> {
        self.engine.arm_switch_log(self.kernel, guest)
    }

    fn switch_log_done(&mut self, ret: Option<u64>) {
        self.engine.switch_log_done(ret)
    }

    fn switch_log_registered(&self) -> bool {
        self.engine.switch_log_registered()
    }

    fn switch_log_installed(&self) -> bool {
        self.engine.switch_log_installed()
    }

    fn arm_switch_log_release(&mut self, guest: &G) -> Result<Option<Armed>, EngineError> {
        self.engine.arm_switch_log_release(self.kernel, guest)
    }

    fn switch_log_released(&mut self, ret: Option<u64>) {
        self.engine.switch_log_released(ret)
    }

    fn prescan(&mut self, p: &Prepared, guest: &G) {
        self.engine.prescan(self.kernel, guest, p)
    }

    fn commit(&mut self, p: &Prepared, guest: &G) -> Result<Committed, EngineError> {
        self.engine.commit(self.kernel, guest, p)
    }
}

/// What a committed transition took, for its reply.
#[derive(Debug)]
pub struct Outcome {
    /// The switch.
    pub committed: Committed,
    /// Preparing it while the guest ran.
    pub prepare_ms: f64,
    /// The pause of the switch (0 inside a user's pause).
    pub pause_us: f64,
    /// Tries for a safe point.
    pub attempts: u32,
    /// Time spent waiting for one (0 if the first try succeeded).
    pub waited_ms: f64,
    /// Tasks that got klp's fake signal because they blocked it.
    pub nudged: u32,
    /// Warnings of the plan and of post callbacks that did not finish.
    pub warnings: Vec<String>,
    /// Every callback that ran, in order.
    pub callbacks: Vec<CallbackRun>,
}

/// A callback that did not let the transition go on.
enum Stop<E> {
    /// `pre_patch` returned non-zero.
    Refused(CallbackRun),
    /// It did not finish in time.
    TimedOut {
        patch: String,
        callback: CallbackKind,
        ms: u64,
        progress: String,
    },
    /// It could not be sent or read, or the switch failed.
    Failed(E),
}

impl<E: std::fmt::Display> Stop<E> {
    /// What a user reads about a callback that did not finish.
    fn message(&self) -> String {
        match self {
            Stop::Refused(run) => format!("{} {} refused", run.patch, run.callback),
            Stop::TimedOut {
                patch,
                callback,
                ms,
                progress,
            } => TransitionError::CallbackTimeout {
                patch: patch.clone(),
                callback: *callback,
                ms: *ms,
                progress: progress.clone(),
                cancelled: String::new(),
            }
            .to_string(),
            Stop::Failed(e) => e.to_string(),
        }
    }
}

/// The Linux name of a negative errno, for `pre_patch` refusals.
pub fn errno_name(ret: i32) -> String {
    let name = match -ret {
        1 => "EPERM",
        2 => "ENOENT",
        5 => "EIO",
        11 => "EAGAIN",
        12 => "ENOMEM",
        16 => "EBUSY",
        17 => "EEXIST",
        19 => "ENODEV",
        22 => "EINVAL",
        95 => "EOPNOTSUPP",
        _ => return String::new(),
    };
    format!(" (-{name})")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs one transition through klp's whole lifecycle: prepares it while the
/// guest runs (parse, resolve, link, plan: reads only), runs its pre
/// callbacks, then commits all of its entry writes in one pause and runs
/// its post callbacks. A transition blocked by a task inside a changed
/// function is retried, the guest running in between, with backoff
/// ([`BACKOFF_START`] doubling to [`BACKOFF_MAX`]) until `t.timeout`; then
/// the blockers are reported, the pre callbacks are cancelled as klp
/// cancels them, and no function is redirected. `action` names it in logs.
pub fn run<H, P>(
    host: &H,
    patcher: &mut P,
    action: &str,
    t: Transition,
) -> Result<Outcome, H::Error>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    let start = host.now();
    // An earlier transition that could not take its patches off the
    // guest's klp_patches left them there: before anything else.
    if let Err(e) = end_calls(host, patcher) {
        tracing::warn!("the guest's klp still lists an earlier patch: {e}");
    }
    // Per-CPU blocks an earlier step could not give back.
    free_percpu(host, patcher);
    let outcome = run_prepared(host, patcher, action, t, start);
    // An apply that did not commit gives its per-CPU block back (unless
    // its abandoned pages were kept, which keep the block too), and so
    // does every patch whose code this transition's pause freed.
    patcher.abandon_percpu();
    patcher.abandon_ops();
    let freed = free_percpu(host, patcher);
    // A transition that did not commit takes back the ftrace redirects it
    // registered at once, as klp's cancel unregisters them, so the guest's
    // text is as it was (a committed one leaves that to the VMM's
    // housekeeping, once changes pause).
    if outcome.is_err() {
        for w in release_ops(host, patcher, usize::MAX) {
            tracing::warn!("{w}");
        }
    }
    outcome.map(|mut o| {
        o.warnings.extend(freed);
        o
    })
}

/// How long letting go of one ftrace redirect may take:
/// `unregister_ftrace_function` waits for an RCU-tasks grace period.
pub const RELEASE_GRACE: Duration = Duration::from_secs(10);

/// Lets go of the ftrace redirects of up to `max` functions no patch
/// redirects any more ([`Patcher::arm_ops_release`]): each function's ops
/// unregistered and its filter freed, through the call gate. The VMM calls
/// it once changes have paused (a transition never waits for it: a
/// function a burst of transitions takes away and brings back keeps its
/// registration). One that cannot be let go now (the VM held paused, a
/// step that did not finish) stays registered and inert, for a later call.
/// Returns warnings.
pub fn release_ops<H, P>(host: &H, patcher: &mut P, max: usize) -> Vec<String>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    let mut warnings = Vec::new();
    let waiting = patcher.ops_releases().min(max);
    if waiting == 0 || host.is_paused() || !patcher.has_gate() || !host.can_call_guest() {
        return warnings;
    }
    // Two steps per function.
    for _ in 0..waiting.saturating_mul(2) {
        let mut what = String::new();
        let deadline = host.now() + RELEASE_GRACE;
        let sent = send(host, patcher, deadline, |p, g| {
            Ok(p.arm_ops_release(g)?.map(|(armed, w)| {
                what = w;
                armed
            }))
        });
        let failed = match sent {
            Ok(Some((_, Ok(ret)))) => match patcher.ops_done(ret) {
                Ok(()) => {
                    tracing::info!("{what}: done");
                    continue;
                }
                Err(e) => e.to_string(),
            },
            Ok(Some((armed, Err(progress)))) => format!(
                "{what} did not finish yet ({})",
                progress.describe(armed.cpu)
            ),
            Ok(None) => break,
            Err(e) => e.to_string(),
        };
        let w = format!("an unused ftrace redirect stays registered (inert) for now: {failed}");
        tracing::warn!("{w}");
        warnings.push(w);
        break;
    }
    // Freed slots read as they did before their first use.
    match host.paused(|g| patcher.scrub_ops(g)) {
        Ok((Ok(()), _)) => {}
        Ok((Err(e), _)) => warnings.push(format!("freed ftrace_ops slots not zeroed: {e}")),
        Err(e) => warnings.push(format!("freed ftrace_ops slots not zeroed: {e}")),
    }
    warnings
}

/// Gives the guest's allocator back every per-CPU block queued for it
/// ([`Patcher::arm_percpu_free`]), each through the call gate and waited
/// for [`CALLBACK_GRACE`]. A block is forgotten once its free is sent; one
/// that cannot be sent (the VM paused by the user, the gate busy) stays
/// queued for the next transition or removal. Returns warnings for the
/// reply.
pub fn free_percpu<H, P>(host: &H, patcher: &mut P) -> Vec<String>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    let mut warnings = Vec::new();
    let queued = patcher.percpu_frees();
    if queued == 0 {
        return warnings;
    }
    if host.is_paused() || !patcher.has_gate() {
        let w = format!(
            "{queued} per-CPU block(s) of removed or abandoned patches wait to be freed in the \
             guest: {}",
            if host.is_paused() {
                "the VM is paused; they are freed by a later transition or removal"
            } else {
                "the call gate is not installed"
            }
        );
        tracing::warn!("{w}");
        warnings.push(w);
        return warnings;
    }
    for _ in 0..queued {
        let mut patch = String::new();
        let deadline = host.now() + CALLBACK_GRACE;
        let sent = send(host, patcher, deadline, |p, g| {
            Ok(p.arm_percpu_free(g)?.map(|(armed, name)| {
                patch = name;
                armed
            }))
        });
        match sent {
            Ok(Some((_, Ok(_)))) => {
                tracing::info!(patch, "per-CPU block freed in the guest")
            }
            Ok(Some((armed, Err(progress)))) => {
                // Sent: the guest finishes it on its own; never sent again.
                let w = format!(
                    "{patch}: free_percpu of its per-CPU block did not finish yet ({})",
                    progress.describe(armed.cpu)
                );
                tracing::warn!("{w}");
                warnings.push(w);
            }
            Ok(None) => break,
            Err(e) => {
                let w = format!("a per-CPU block stays allocated for now (tried again later): {e}");
                tracing::warn!("{w}");
                warnings.push(w);
                break;
            }
        }
    }
    warnings
}

/// How long one registration step of a transition's ftrace redirects may
/// wait for a kworker to start it before its functions fall back to a
/// `jmp` (a starved workqueue). A step that started is waited for up to
/// the transition's own time: ftrace walks every record of the kernel for
/// each registration, which under load takes a while, and a step written
/// off while it runs would register anyway.
pub const OPS_GRACE: Duration = Duration::from_secs(5);

/// The least time the registrations before a transition (its ftrace
/// redirects, the switch log) may take once started, whatever the
/// transition's own timeout: that timeout bounds the wait for a safe
/// point, and a short one (a second, to learn at once whether a sleeper
/// blocks) must not turn a registration slowed by a busy guest into a
/// `jmp` fallback.
pub const REGISTRATION_TIME: Duration = Duration::from_secs(10);

/// Registers with the guest's ftrace every slot `prepared` switches
/// through ([`Patcher::arm_ops`]), each step through the call gate: each
/// must start within [`OPS_GRACE`] and end by `limit`. `Ok(Some(why))`:
/// the guest could not run it in time (a step did not start or did not
/// finish, or the gate is still busy with an earlier call); an error: the
/// guest's ftrace refused a step, or the host failed.
fn register_ops<H, P>(
    host: &H,
    patcher: &mut P,
    prepared: &P::Prepared,
    limit: Instant,
) -> Result<Option<String>, H::Error>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    loop {
        let mut busy = None;
        let deadline = (host.now() + OPS_GRACE).min(limit);
        let sent = send(host, patcher, deadline, |p, g| {
            match p.arm_ops(prepared, g) {
                Err(EngineError::Gate(crate::callback::gate::GateError::Busy(why))) => {
                    busy = Some(why);
                    Ok(None)
                }
                other => other,
            }
        })?;
        let (armed, progress) = match sent {
            None => {
                return Ok(busy.map(|why| format!("the call gate is busy ({why})")));
            }
            Some((_, Ok(ret))) => {
                patcher.ops_done(ret)?;
                continue;
            }
            // Started: the guest runs it; wait for its end.
            Some((armed, Err(Progress::Running))) => {
                match wait_call(host, patcher, &armed, limit)? {
                    Ok(ret) => {
                        patcher.ops_done(ret)?;
                        continue;
                    }
                    Err(progress) => (armed, progress),
                }
            }
            Some((armed, Err(progress))) => (armed, progress),
        };
        let (func, step) = patcher.ops_armed().unwrap_or_default();
        return Ok(Some(
            EngineError::OpsUnfinished {
                func,
                step,
                progress: progress.describe(armed.cpu),
            }
            .to_string(),
        ));
    }
}

/// Registers the switch log ([`Patcher::arm_switch_log`]): the call must
/// start within [`OPS_GRACE`] and end by `limit`. A registration that
/// fails or does not finish leaves this guest without a log (every pause
/// reads every task, as before); a gate busy with an earlier call leaves
/// it for the next transition. Never fails the transition.
fn register_switch_log<H, P>(host: &H, patcher: &mut P, limit: Instant)
where
    H: Host,
    P: Patcher<H::Guest>,
{
    let deadline = (host.now() + OPS_GRACE).min(limit);
    match send(host, patcher, deadline, |p, g| p.arm_switch_log(g)) {
        Ok(Some((_, Ok(ret)))) => patcher.switch_log_done(Some(ret)),
        Ok(Some((armed, Err(Progress::Running)))) => {
            match wait_call(host, patcher, &armed, limit) {
                Ok(Ok(ret)) => patcher.switch_log_done(Some(ret)),
                Ok(Err(_)) => patcher.switch_log_done(None),
                Err(e) => {
                    tracing::warn!("the switch log's registration: {e}");
                    patcher.switch_log_done(None);
                }
            }
        }
        Ok(Some((_, Err(_)))) => patcher.switch_log_done(None),
        Ok(None) => {}
        Err(e) => tracing::debug!("the switch log is not registered yet: {e}"),
    }
}

/// Unregisters the switch log once changes have paused (the VMM's
/// housekeeping calls it, as [`release_ops`]): the guest's tracepoint, and
/// its kernel text, are then as the guest had them. Not while a user holds
/// the VM paused (it stays registered, for later). Returns warnings.
pub fn release_switch_log<H, P>(host: &H, patcher: &mut P) -> Vec<String>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    if !patcher.switch_log_registered()
        || host.is_paused()
        || !patcher.has_gate()
        || !host.can_call_guest()
    {
        return Vec::new();
    }
    let deadline = host.now() + RELEASE_GRACE;
    let ret = match send(host, patcher, deadline, |p, g| p.arm_switch_log_release(g)) {
        Ok(Some((_, Ok(ret)))) => Some(ret),
        Ok(Some((_, Err(_)))) => None,
        Ok(None) => return Vec::new(),
        Err(e) => {
            let w = format!("the switch log stays registered for now: {e}");
            tracing::warn!("{w}");
            return vec![w];
        }
    };
    patcher.switch_log_released(ret);
    Vec::new()
}

/// [`run`] from preparing to the post callbacks.
fn run_prepared<H, P>(
    host: &H,
    patcher: &mut P,
    action: &str,
    t: Transition,
    start: Instant,
) -> Result<Outcome, H::Error>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    let mut prepared = patcher.prepare()?;
    let calls_guest = host.can_call_guest();
    if !calls_guest {
        let needs = if !prepared.calls().is_empty() {
            Some("it has klp callbacks (pre/post patch or unpatch)")
        } else if prepared.needs_percpu() {
            Some("it has per-CPU variables, whose memory the guest kernel allocates")
        } else if prepared.needs_hooks() {
            Some("it patches modules, whose loads and unloads klpvisor hooks")
        } else {
            None
        };
        if let Some(needs) = needs {
            return Err(TransitionError::NoGuestCalls {
                patch: prepared.name().to_owned(),
                needs,
                why: host.no_guest_calls_reason(),
            }
            .into());
        }
    }
    if !prepared.calls().is_empty() {
        if host.is_paused() {
            return Err(TransitionError::PausedForCallbacks.into());
        }
        if !patcher.has_gate() {
            // The gate takes arena pages: install it, then plan again on
            // the arena that has it.
            host.paused(|g| patcher.install_gate(g))?.0?;
            tracing::info!("call gate installed for klp callbacks");
            prepared = patcher.prepare()?;
        }
    }
    if prepared.needs_hooks() && !patcher.has_hooks() {
        // A module object is linked when its module loads, and let go when
        // it unloads: the hooks on both take an arena page, so plan again
        // on the arena that has it. A busy ftrace makes it wait.
        let deadline = host.now() + t.timeout;
        let mut backoff = BACKOFF_START;
        loop {
            match host.paused(|g| patcher.install_hooks(g))?.0 {
                Ok(()) => break,
                Err(e) if e.is_busy() && host.now() + backoff < deadline => {
                    host.sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!("hooks installed on the guest's module loads and unloads");
        prepared = patcher.prepare()?;
    }
    if prepared.needs_percpu() {
        // percpu_modalloc: the guest kernel allocates the patch's per-CPU
        // block, in a kworker through the call gate, and the patch is
        // linked again with its address (the first plan used 0 and is
        // never written).
        if host.is_paused() {
            return Err(TransitionError::PausedForPercpu.into());
        }
        if !patcher.has_gate() {
            host.paused(|g| patcher.install_gate(g))?.0?;
            tracing::info!("call gate installed for per-CPU data");
            prepared = patcher.prepare()?;
        }
        let deadline = host.now() + t.timeout;
        match send(host, patcher, deadline, |p, g| {
            p.arm_percpu_alloc(&prepared, g)
        })? {
            Some((_, Ok(ret))) => patcher.percpu_allocated(&prepared, ret)?,
            Some((armed, Err(progress))) => {
                return Err(EngineError::PerCpu(PercpuError::Unfinished {
                    patch: prepared.name().to_owned(),
                    progress: progress.describe(armed.cpu),
                })
                .into())
            }
            None => {
                return Err(
                    EngineError::Internal("the per-CPU allocation was not sent".into()).into(),
                )
            }
        }
        prepared = patcher.prepare()?;
        if prepared.needs_percpu() {
            return Err(EngineError::Internal(format!(
                "{}: the per-CPU block allocated for it does not fit its module",
                prepared.name()
            ))
            .into());
        }
    }
    let mut ops_warning = None;
    // Without calls into the guest nothing registers with its ftrace: the
    // plan keeps its jmps, as when a user holds the VM paused.
    if prepared.wants_ops() && !host.is_paused() && calls_guest {
        // Each function the patch starts redirecting gets an ftrace_ops of
        // its own, as under klp: a slot for it (and the handler and slot
        // pages, from the arena), registered with the guest's ftrace in a
        // kworker, inert until the switch sets its target; the plan, made
        // again, switches through the slots. (With the VM held paused by
        // its user nothing can run in the guest: the plan keeps its jmps.)
        if !patcher.has_gate() {
            host.paused(|g| patcher.install_gate(g))?.0?;
            tracing::info!("call gate installed for ftrace redirects");
            prepared = patcher.prepare()?;
        }
        if prepared.wants_ops() {
            host.paused(|g| patcher.install_ops(&prepared, g))?.0?;
            prepared = patcher.prepare()?;
            let limit = start + t.timeout.max(REGISTRATION_TIME);
            if let Some(why) = register_ops(host, patcher, &prepared, limit)? {
                // The guest did not run the registration in time (its
                // workqueue starved, the gate still busy with an earlier
                // call): the functions not registered get a jmp instead,
                // as when the VM is held paused, rather than no patch.
                let w = format!(
                    "{why}; the functions not registered with the guest's ftrace are redirected \
                     by a jmp at their entry instead (ftrace skips them while patched)"
                );
                tracing::warn!(patch = prepared.name(), "{w}");
                ops_warning = Some(w);
                patcher.ops_unreachable(&prepared);
                prepared = patcher.prepare()?;
            }
        }
    }
    // The safe-point pauses read only the tasks that may have run since
    // their pre-scan once the guest logs its switches: registered once,
    // in a kworker through the gate, before the first check that can
    // use it (a guest that cannot run it only keeps full pauses).
    if patcher.switch_log_wanted() && !host.is_paused() && calls_guest {
        let had_pages = patcher.switch_log_installed();
        register_switch_log(host, patcher, start + t.timeout.max(REGISTRATION_TIME));
        if !had_pages && patcher.switch_log_installed() {
            // Its pages came from the arena: plan again on the arena that
            // has them.
            prepared = patcher.prepare()?;
        }
    }
    // A plan that could only be committed by writing over ftrace's call
    // is refused now, before its load writes anything.
    prepared.usable()?;
    // (Taken only now: a new patch's callbacks moved with it when the gate
    // made it plan again.)
    let calls = prepared.calls().clone();
    let prepare_ms = ms(host.now() - start);
    for w in prepared.warnings() {
        tracing::warn!(patch = prepared.name(), "{w}");
    }
    let first = host.now();
    let deadline = first + t.timeout;
    host.begun(prepared.name());

    // A new patch's code, and its struct module, go into the guest first,
    // in a pause of their own: its pre_patch is its own code, and the
    // guest kernel must know the module before any of its code runs. No
    // safe point is needed: nothing references the new pages yet. A
    // module load or unload in the guest that is mid-way makes it wait.
    let mut runs = Vec::new();
    let mut loaded = None;
    let mut passed = Vec::new();
    if prepared.loads() {
        let mut backoff = BACKOFF_START;
        loaded = Some(loop {
            match host.paused(|g| patcher.load(&mut prepared, g))?.0 {
                Ok(undo) => break undo,
                Err(e) if e.is_busy() && host.now() + backoff < deadline => {
                    tracing::debug!(patch = prepared.name(), "{e}; retrying the load");
                    host.sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => return Err(e.into()),
            }
        });
    }
    if !calls.is_empty() {
        for call in calls.pre() {
            if call.func.is_some() {
                let stop = match call_in_guest(host, patcher, &prepared, &call, deadline) {
                    Ok(run) if run.ret.unwrap_or(0) == 0 => {
                        runs.push(run);
                        None
                    }
                    Ok(run) => Some(Stop::Refused(run)),
                    Err(stop) => Some(stop),
                };
                if let Some(stop) = stop {
                    return Err(abandon(host, patcher, prepared, loaded, &passed, stop));
                }
            }
            passed.push(call);
        }
    }

    let mut backoff = BACKOFF_START;
    let mut attempts = 0u32;
    let mut nudged = None;
    let (committed, pause) = loop {
        attempts += 1;
        patcher.prescan(&prepared, host.guest());
        let e: H::Error = match host.paused(|g| patcher.commit(&prepared, g)) {
            Ok((Ok(done), pause)) => break (done, pause),
            Ok((Err(EngineError::Blocked(b)), _)) if host.now() + backoff < deadline => {
                tracing::debug!(
                    patch = prepared.name(),
                    attempts,
                    blockers = b.len(),
                    "no safe point yet; retrying"
                );
                host.waiting(attempts, host.now() - first, &b);
                if nudged.is_none() && host.now() - first >= NUDGE_AFTER {
                    nudged = Some(nudge(host, patcher, &b, deadline));
                    backoff = BACKOFF_START;
                    continue;
                }
                host.sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Ok((Err(e), _)) => e.into(),
            Err(e) => e,
        };
        if calls.is_empty() && loaded.is_none() {
            return Err(e);
        }
        return Err(abandon(
            host,
            patcher,
            prepared,
            loaded,
            &passed,
            Stop::Failed(e),
        ));
    };
    let pause_us = pause.unwrap_or_default().as_secs_f64() * 1e6;
    tracing::info!(
        action,
        patch = committed.name,
        seq = committed.seq,
        prepare_ms,
        pause_us,
        attempts,
        bytes = committed.bytes_written,
        "transition committed"
    );
    let mut warnings = prepared.warnings().to_vec();
    warnings.extend(ops_warning);
    // The post callbacks: the transition stands whatever they do.
    for call in calls.post() {
        let grace = host.now() + CALLBACK_GRACE;
        match call_in_guest(host, patcher, &prepared, &call, grace) {
            Ok(run) => runs.push(run),
            Err(stop) => {
                let e = stop.message();
                tracing::warn!(patch = call.patch, callback = %call.kind, "{e}");
                warnings.push(format!("{} {} did not finish: {e}", call.patch, call.kind));
            }
        }
    }
    if let Err(e) = end_calls(host, patcher) {
        warnings.push(format!("the guest's klp still lists the patch: {e}"));
    }
    // klp's notice for each patch the transition completed, in the
    // guest's own kernel log (not while a user holds the VM paused). The
    // gate it goes through is installed now if no callback needed it yet:
    // a transition that fails writes nothing, and a guest where the gate
    // cannot go still gets its patch, without the line.
    if patcher.logs() && !host.is_paused() && !patcher.has_gate() && calls_guest {
        match host.paused(|g| patcher.install_gate(g)) {
            Ok((Ok(()), _)) => tracing::info!("call gate installed for the guest's kernel log"),
            Ok((Err(e), _)) => {
                tracing::warn!("the guest's kernel log will not show transitions: {e}")
            }
            Err(e) => tracing::warn!("the guest's kernel log will not show transitions: {e}"),
        }
    }
    if patcher.logs() && patcher.has_gate() && !host.is_paused() && calls_guest {
        for line in calls.log_lines() {
            if let Err(e) = log_in_guest(host, patcher, &line) {
                tracing::warn!("the guest's kernel log line `{line}` was not printed: {e}");
                warnings.push(format!("the guest's kernel log line was not printed: {e}"));
            }
        }
    }
    Ok(Outcome {
        committed,
        prepare_ms,
        pause_us,
        attempts,
        waited_ms: if attempts > 1 {
            ms(host.now() - first)
        } else {
            0.0
        },
        nudged: nudged.unwrap_or(0),
        warnings,
        callbacks: runs,
    })
}

/// klp's fake signal, once, to every task that blocked the last attempt
/// (`klp_send_signals`, which klp sends after its own grace period): a
/// task asleep in a changed function is woken and leaves it, and its
/// syscall is restarted outside it, so the transition can complete as
/// klp's would. Returns how many tasks it reached. Needs the call gate
/// (installed by an earlier transition's callbacks or kernel log line)
/// and a running VM; a failure is logged and the transition keeps
/// waiting, as it would have without the nudge.
fn nudge<H, P>(host: &H, patcher: &mut P, blockers: &[Blocker], deadline: Instant) -> u32
where
    H: Host,
    P: Patcher<H::Guest>,
{
    if host.is_paused() || !patcher.has_gate() || !host.can_call_guest() {
        tracing::debug!("no fake signal: the VM is paused by the user or has no call gate");
        return 0;
    }
    let mut pids: Vec<i32> = blockers.iter().map(|b| b.pid).filter(|&p| p > 0).collect();
    pids.sort_unstable();
    pids.dedup();
    let mut sent = 0;
    for pid in pids {
        let until = deadline.min(host.now() + CALLBACK_GRACE);
        match send(host, patcher, until, |p, g| p.arm_nudge(g, pid)) {
            Ok(Some((_, Ok(_)))) => sent += 1,
            Ok(None) => {}
            Ok(Some((armed, Err(progress)))) => tracing::warn!(
                pid,
                "the fake signal did not finish: {}",
                progress.describe(armed.cpu)
            ),
            Err(e) => tracing::warn!(pid, "no fake signal: {e}"),
        }
    }
    tracing::info!(
        tasks = sent,
        "sent klp's fake signal to the tasks blocking the transition"
    );
    sent
}

/// Runs one callback in the guest through the call gate and waits for its
/// result until `deadline`. The guest runs throughout except for the short
/// pause that sends it.
fn call_in_guest<H, P>(
    host: &H,
    patcher: &mut P,
    prepared: &P::Prepared,
    call: &Call,
    deadline: Instant,
) -> Result<CallbackRun, Stop<H::Error>>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    let start = host.now();
    let (armed, done) = send(host, patcher, deadline, |p, g| {
        p.arm_call(prepared, g, call).map(Some)
    })
    .map_err(Stop::Failed)?
    .ok_or_else(|| {
        Stop::Failed(EngineError::Internal("the callback was not sent".into()).into())
    })?;
    let ms = ms(host.now() - start);
    match done {
        Ok(ret) => {
            // pre_patch returns an int: the low half of rax.
            let ret = call.kind.returns().then_some(ret as u32 as i32);
            tracing::info!(patch = call.patch, callback = %call.kind, ?ret, ms, seq = armed.seq, "klp callback ran");
            Ok(CallbackRun {
                patch: call.patch.clone(),
                callback: call.kind,
                object: Hex(call.object),
                ret,
                ms,
                done: true,
            })
        }
        Err(progress) => Err(Stop::TimedOut {
            patch: call.patch.clone(),
            callback: call.kind,
            ms: ms as u64,
            progress: progress.describe(armed.cpu),
        }),
    }
}

/// Prints `line` in the guest's kernel log through the call gate, as
/// klp's own notice would (see [`Engine::arm_log`](crate::Engine::arm_log)),
/// and waits for it for [`CALLBACK_GRACE`]. Nothing happens if the patcher
/// does not log.
fn log_in_guest<H, P>(host: &H, patcher: &mut P, line: &str) -> Result<(), String>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    let deadline = host.now() + CALLBACK_GRACE;
    match send(host, patcher, deadline, |p, g| p.arm_log(g, line)) {
        Ok(Some((_, Ok(_)))) | Ok(None) => Ok(()),
        Ok(Some((armed, Err(progress)))) => Err(progress.describe(armed.cpu)),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends one call through the gate with `arm`, in a short pause, retried
/// with backoff while the guest is busy, and waits for it until
/// `deadline`: its return value, or how far it got. `None` if `arm` sent
/// nothing.
#[allow(clippy::type_complexity)]
fn send<H, P>(
    host: &H,
    patcher: &mut P,
    deadline: Instant,
    mut arm: impl FnMut(&mut P, &H::Guest) -> Result<Option<Armed>, EngineError>,
) -> Result<Option<(Armed, Result<u64, Progress>)>, H::Error>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    let mut backoff = BACKOFF_START;
    let armed = loop {
        let sent = host.paused(
            |g| -> Result<Result<Option<Armed>, EngineError>, H::Error> {
                let armed = match arm(patcher, g) {
                    Ok(Some(armed)) => armed,
                    other => return Ok(other),
                };
                if !host.raise_vector(armed.vcpu, IRQ_WORK_VECTOR)? {
                    tracing::warn!("the local APIC did not take the call gate's interrupt now");
                }
                Ok(Ok(Some(armed)))
            },
        );
        match sent?.0? {
            Ok(Some(armed)) => break armed,
            Ok(None) => return Ok(None),
            // The guest's klp is changing its list: a moment later.
            Err(e) if e.is_busy() && host.now() + backoff < deadline => {
                tracing::debug!("{e}; sending the call again in a moment");
                host.sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    };
    let result = wait_call(host, patcher, &armed, deadline)?;
    Ok(Some((armed, result)))
}

/// Waits until the call `armed` returns (its result) or `deadline` passes
/// (how far it got).
fn wait_call<H, P>(
    host: &H,
    patcher: &mut P,
    armed: &Armed,
    deadline: Instant,
) -> Result<Result<u64, Progress>, H::Error>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    loop {
        let seen = host.doorbell_rings();
        let progress = patcher.poll_call(host.guest(), armed)?;
        if let Progress::Done(ret) = progress {
            return Ok(Ok(ret));
        }
        if host.now() >= deadline {
            return Ok(Err(progress));
        }
        host.wait_doorbell(seen, deadline);
    }
}

/// Takes back what the guest's klp was shown while the transition's
/// callbacks ran, retried for [`CALLBACK_GRACE`] while the guest's klp is
/// busy. On failure the engine keeps it, and tries again before it frees
/// any patch's pages.
fn end_calls<H, P>(host: &H, patcher: &mut P) -> Result<(), H::Error>
where
    H: Host,
    P: Patcher<H::Guest>,
{
    if !patcher.klp_shown() {
        return Ok(());
    }
    let deadline = host.now() + CALLBACK_GRACE;
    let mut backoff = BACKOFF_START;
    loop {
        match host.paused(|g| patcher.end_calls(g))?.0 {
            Ok(()) => return Ok(()),
            Err(e) if e.is_busy() && host.now() + backoff < deadline => {
                host.sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Abandons a transition whose pre callbacks ran (some of them): runs the
/// callbacks that cancel the passed ones in klp's order (see
/// [`Calls::cancel`]: each patch's objects in object order, as
/// `klp_cancel_transition` completes the transition), then takes back a loaded patch: its pages
/// are restored byte for byte if its code surely no longer runs and the
/// guest did not change them, else retired (kept mapped until no stack
/// references them). Returns the error to report.
fn abandon<H, P>(
    host: &H,
    patcher: &mut P,
    prepared: P::Prepared,
    loaded: Option<P::Undo>,
    passed: &[Call],
    stop: Stop<H::Error>,
) -> H::Error
where
    H: Host,
    P: Patcher<H::Guest>,
{
    // A callback that timed out may still be running the patch's code.
    let mut clean = !matches!(stop, Stop::TimedOut { .. });
    let mut ran = Vec::new();
    for c in Calls::cancel(passed) {
        let grace = host.now() + CALLBACK_GRACE;
        match call_in_guest(host, patcher, &prepared, &c, grace) {
            Ok(_) => ran.push(format!("{} {}", c.patch, c.kind)),
            Err(e) => {
                clean = false;
                tracing::warn!(patch = c.patch, callback = %c.kind, "cancelling: {}", e.message());
                ran.push(format!("{} {} (did not finish)", c.patch, c.kind));
            }
        }
    }
    if let Err(e) = end_calls(host, patcher) {
        tracing::warn!("the guest's klp still lists the patch: {e}");
    }
    if let Some(undo) = loaded {
        let restored = clean
            && match host.paused(|g| patcher.unload(undo, g)) {
                Ok((Ok(()), _)) => true,
                Ok((Err(e), _)) => {
                    tracing::info!("keeping the abandoned patch's pages: {e}");
                    false
                }
                Err(e) => {
                    tracing::info!("keeping the abandoned patch's pages: {e}");
                    false
                }
            };
        if !restored {
            patcher.retire_load(prepared);
        }
    }
    let cancelled = if ran.is_empty() {
        String::new()
    } else {
        format!("; ran {} to cancel", ran.join(", "))
    };
    match stop {
        Stop::Refused(run) => TransitionError::Refused {
            patch: run.patch,
            callback: run.callback,
            ret: run.ret.unwrap_or(0),
            errno: errno_name(run.ret.unwrap_or(0)),
            cancelled,
        }
        .into(),
        Stop::TimedOut {
            patch,
            callback,
            ms,
            progress,
        } => TransitionError::CallbackTimeout {
            patch,
            callback,
            ms,
            progress,
            cancelled,
        }
        .into(),
        Stop::Failed(e) => e,
    }
}

#[cfg(test)]
mod tests;

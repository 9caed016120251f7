//! What the control socket does to the VM, independent of HTTP: pausing on
//! behalf of a user, short pauses of its own for consistent reads, the
//! cached view of the guest kernel, and the patch engine's transitions, one
//! at a time. klp's transition lifecycle itself (callbacks, retries,
//! cancel) is the engine's ([`klpvisor_engine::transition`]); this VM is
//! its [`Host`].
//!
//! Every pause or resume, a user's or an internal one, goes through one
//! gate, so an internal "pause, read, resume" can never resume a VM that a
//! user paused, and a user's pause never lands in the middle of a task walk.
//!
//! The kernel view (`Kernel::open`, ~100 ms) is built lazily on first need
//! and kept: `_text`, kallsyms and BTF do not change after boot. Only the
//! register read that starts it needs the VM paused; the decode reads
//! static kernel tables while the guest runs. A failure (typically: the
//! kernel is not up yet) is remembered for a backoff that grows with each
//! failed request: until it has passed, requests get that failure at once
//! and the VMM does not decode again.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use klpvisor_api::{
    EndedTransition, HistoryEntry, PatchInfo, PatchState, PatchesReply, PendingTransition,
    RollbackReply, TransitionReply, ENDED_KEPT,
};
use klpvisor_engine::engine::{Engine, EngineError, Prepared};
use klpvisor_engine::safepoint::Blocker;
use klpvisor_engine::signature::{Policy, SignatureError};
use klpvisor_engine::transition::{self as lifecycle, Host, Live, Outcome, TransitionError};
pub use klpvisor_engine::transition::{Transition, MAX_TRANSITION_TIMEOUT, TRANSITION_TIMEOUT};
use klpvisor_guest::VcpuRegs;
use klpvisor_guest::{all_vcpu_regs, Kernel, Task, Tasks, TasksError, VirtRead};

use crate::devices::module_hooks::{Answer as HookAnswer, Event as HookEvent};
use crate::guest::{vcpu_regs, RegsSnapshot, RootPages};
use crate::vm::{PauseReport, ResumeReport, Vm, VmError};
use klpvisor_engine::callback::module::{ModuleSteps, Step};
use klpvisor_engine::engine::{Coming, Going, ModuleEvent};

/// Why a control request failed; the API maps each to a status and kind.
#[derive(Debug, Error)]
pub enum ControlError {
    /// A user pause while the VM is paused.
    #[error("the VM is already paused; resume it first (PUT /vm/resume)")]
    AlreadyPaused,
    /// A user resume while the VM runs.
    #[error("the VM is not paused; pause it first (PUT /vm/pause)")]
    NotPaused,
    /// A vCPU thread has exited: the guest is going away.
    #[error(
        "the guest has stopped (it powered off, rebooted or crashed); the VMM is shutting down"
    )]
    Stopped,
    /// A vCPU index at or above the VM's vCPU count.
    #[error("no vCPU {id}: this VM has vCPUs 0 to {}", count.saturating_sub(1))]
    NoSuchVcpu {
        /// The index asked for.
        id: usize,
        /// The VM's vCPU count (0 when not known where the error arose).
        count: usize,
    },
    /// Any other failure of the VM itself.
    #[error("{0}")]
    Vm(VmError),
    /// Finding `_text`, kallsyms or BTF in guest memory failed (typically
    /// early boot); retried after a backoff.
    #[error("the guest kernel cannot be inspected yet (is it still booting?): {0}")]
    KernelNotReady(String),
    /// Walking the guest's task list failed.
    #[error("reading the guest's task list failed: {0}")]
    Tasks(#[source] TasksError),
    /// The kernel view has no task walker: this kernel's BTF or kallsyms
    /// lack what it needs.
    #[error(
        "reading the guest's task list failed: this kernel's BTF or kallsyms lack what the \
         task walk needs (see the VMM log)"
    )]
    NoTaskWalk,
    /// A VMM bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A callback refused or did not finish, or the VM is paused.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Another transition holds the engine; the text names it.
    #[error(
        "another transition is in progress ({0}); one runs at a time: retry when it ends \
         (`patcher list` shows it)"
    )]
    Busy(String),
    /// The engine refused or failed the patch.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Refused by the signature policy, before anything was parsed.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl ControlError {
    /// Whether the change was refused only because another holds the
    /// engine or the call gate: the same request may pass a moment later.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            Self::Busy(_)
                | Self::Engine(EngineError::Gate(
                    klpvisor_engine::callback::gate::GateError::Busy(_)
                ))
        )
    }
}

impl From<VmError> for ControlError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::AlreadyPaused => Self::AlreadyPaused,
            VmError::NotPaused => Self::NotPaused,
            VmError::NotRunning => Self::Stopped,
            VmError::NoSuchVcpu(id) => Self::NoSuchVcpu {
                id: id.into(),
                count: 0,
            },
            other => Self::Vm(other),
        }
    }
}

/// A result produced while every vCPU was parked.
#[derive(Debug)]
pub struct Paused<T> {
    /// What was read.
    pub value: T,
    /// Out-of-guest time of the pause taken for this read; `None` when the
    /// VM was paused already (by a user) and stays so.
    pub pause: Option<Duration>,
}

/// The guest kernel view with what it cost to build.
#[derive(Debug)]
pub struct CachedKernel {
    /// `_text`, page tables, kallsyms and BTF as decoded from guest memory.
    pub kernel: Kernel,
    /// The task-list walker, with the guest's THREAD_SIZE measured; `None`
    /// when this kernel's BTF or kallsyms cannot support it.
    pub walker: Option<Tasks>,
    /// `Kernel::open` on the running guest.
    pub decode: Duration,
    /// The register-read pause before it.
    pub pause: Duration,
}

/// An internal pause that ends on every path out of the code that took it:
/// [`PauseGuard::resume`] normally, `Drop` when that code returns early or
/// panics (a panic while reading guest data must not leave the guest
/// frozen for good).
struct PauseGuard<'a>(&'a Vm);

impl PauseGuard<'_> {
    fn resume(self) -> Result<ResumeReport, VmError> {
        let vm = self.0;
        std::mem::forget(self);
        vm.resume()
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.resume() {
            tracing::error!("resuming the VM after a failed internal pause: {e}");
        } else {
            tracing::warn!(
                "an internal pause ended early (see the error above); the VM runs again"
            );
        }
    }
}

/// Builds of the kernel view one request makes before it gives up.
pub const FILL_ATTEMPTS: u32 = 3;
/// The pause before a request's second build; doubled for each further one.
pub const FILL_RETRY_BASE: Duration = Duration::from_millis(100);
/// The longest a failure is remembered. A failed request costs up to
/// [`FILL_ATTEMPTS`] builds, each copying up to 256 MiB of every mapped
/// kernel range it searches, so a guest whose view cannot be built costs
/// at most that every 10 s, however many requests ask. A guest that only
/// finishes booting late gets its view at most 10 s late, and only after
/// 7 failed requests in a row (the backoff doubles from 200 ms).
pub const FILL_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A failed build of the kernel view, remembered until `retry_at`.
#[derive(Debug)]
struct Failure {
    message: String,
    at: Instant,
    retry_at: Instant,
}

/// Paces kernel-view builds after failures: each failed request doubles
/// the time before the next may build again (from twice
/// [`FILL_RETRY_BASE`] up to [`FILL_BACKOFF_MAX`]); a success resets it.
/// Until then the failure is the answer: a request that arrives early gets
/// it at once, without a build.
#[derive(Debug, Default)]
struct FillBackoff {
    failures: u32,
    last: Option<Failure>,
}

impl FillBackoff {
    /// The remembered failure, if no build may start at `now`.
    fn refusal(&self, now: Instant) -> Option<&Failure> {
        self.last.as_ref().filter(|f| now < f.retry_at)
    }

    /// Remembers a failure at `now`; returns how long it stands.
    fn failed(&mut self, now: Instant, message: String) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = FILL_RETRY_BASE
            .saturating_mul(1 << self.failures.min(7))
            .min(FILL_BACKOFF_MAX);
        self.last = Some(Failure {
            message,
            at: now,
            retry_at: now + delay,
        });
        delay
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }
}

/// A view built once and then shared, its failed builds remembered by a
/// [`FillBackoff`]. Generic so its pacing is tested without a VM.
struct ViewCache<T> {
    view: Mutex<Option<Arc<T>>>,
    /// Serializes builds, so concurrent first requests build once and
    /// requests queued behind a failed build get its failure.
    fill: Mutex<FillBackoff>,
}

impl<T> Default for ViewCache<T> {
    fn default() -> Self {
        Self {
            view: Mutex::new(None),
            fill: Mutex::new(FillBackoff::default()),
        }
    }
}

impl<T> ViewCache<T> {
    fn get(&self) -> Option<Arc<T>> {
        lock(&self.view).clone()
    }

    /// The view, built by `build` if there is none yet and no remembered
    /// failure stands at `now()`. A failure of `build` is remembered,
    /// except [`ControlError::Stopped`] and [`ControlError::Vm`] (the VM
    /// stopped, or a user paused it: no reason to hold back a later
    /// request). Every failure comes back as
    /// [`ControlError::KernelNotReady`] saying when a build is tried again.
    fn get_or_build(
        &self,
        now: impl Fn() -> Instant,
        build: impl FnOnce() -> Result<Arc<T>, ControlError>,
    ) -> Result<Arc<T>, ControlError> {
        if let Some(v) = self.get() {
            return Ok(v);
        }
        let mut backoff = lock(&self.fill);
        if let Some(v) = self.get() {
            return Ok(v);
        }
        let t = now();
        if let Some(f) = backoff.refusal(t) {
            return Err(ControlError::KernelNotReady(format!(
                "{}\n(from an attempt {} ms ago; the VMM tries again no sooner than {} ms from \
                 now, and answers this until then)",
                f.message,
                t.saturating_duration_since(f.at).as_millis(),
                f.retry_at.saturating_duration_since(t).as_millis()
            )));
        }
        match build() {
            Ok(v) => {
                backoff.succeeded();
                *lock(&self.view) = Some(v.clone());
                Ok(v)
            }
            Err(e @ (ControlError::Stopped | ControlError::Vm(_))) => Err(e),
            Err(e) => {
                let message = match e {
                    ControlError::KernelNotReady(m) => m,
                    other => other.to_string(),
                };
                let retry_in = backoff.failed(now(), message.clone());
                Err(ControlError::KernelNotReady(format!(
                    "{message}\n(tried {FILL_ATTEMPTS} times; the VMM tries again no sooner than \
                     {} ms from now, and answers this until then. If the guest has finished \
                     booting and this persists, the VMM log has each attempt)",
                    retry_in.as_millis()
                )))
            }
        }
    }
}

/// A module's coming or going that the engine has begun.
enum ModuleWork {
    Coming(Coming),
    Going(Going),
}

/// One module load or unload in progress (see [`Control::module_step`]).
struct ModuleTalk {
    /// `None` until the engine has begun (the task may be made to wait).
    steps: Option<ModuleSteps>,
    /// Until the switch.
    work: Option<ModuleWork>,
    /// The switch found the guest busy: try it again first.
    retry_switch: bool,
    name: String,
    started: Instant,
    pause: Duration,
    event: Option<ModuleEvent>,
    /// Coming: the module's functions whose ftrace_ops the task registers
    /// before the switch.
    register: Vec<u64>,
    /// The registration call the task makes now (function, which call).
    registering: Option<(u64, klpvisor_engine::ftrace_ops::Step)>,
    /// The ftrace_ops (by slot) the task lets go of before it goes on: a
    /// going module's, or a failed coming's that reached ftrace.
    release: Vec<u64>,
    /// The release call the task makes now (slot, which call).
    releasing: Option<(u64, klpvisor_engine::ftrace_ops::Step)>,
}

/// Where a coming module's ftrace registrations stand.
enum Registering {
    /// The loading task makes this call next.
    Call(HookAnswer),
    /// Every one is registered.
    Done,
    /// ftrace refused one (its errno, and the reason): the load fails, as
    /// klp_module_coming fails it.
    Failed(i32, String),
}

impl ModuleTalk {
    fn new() -> Self {
        Self {
            steps: None,
            work: None,
            retry_switch: false,
            name: String::new(),
            started: Instant::now(),
            pause: Duration::ZERO,
            event: None,
            register: Vec::new(),
            registering: None,
            release: Vec::new(),
            releasing: None,
        }
    }
}

/// The loads and unloads in progress, by hook and `struct module`: a
/// task that ran a callback may come back on another vCPU.
#[derive(Default)]
struct ModuleTalks(std::collections::HashMap<(HookEvent, u64), ModuleTalk>);

impl ModuleTalks {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The VM as the control socket drives it.
pub struct Control {
    vm: Arc<Vm>,
    /// Serializes every pause/resume (see the module doc).
    gate: Mutex<()>,
    /// The kernel view, and the failure of its last build (see
    /// [`ViewCache`]).
    kernel: ViewCache<CachedKernel>,
    /// The patch engine: held across prepare and commit, so transitions
    /// never interleave.
    engine: Mutex<Engine>,
    /// Held for a whole change (transition or remove); a second change is
    /// refused while it is (see `engine_for_change`), reads of the engine
    /// just wait for it.
    changing: Mutex<()>,
    /// The engine's view as of the last change, served by `GET /patches`
    /// without waiting for a transition that is retrying for a safe point.
    published: Mutex<PatchesReply>,
    /// The transition retrying for a safe point, if one is.
    pending: Mutex<Option<PendingTransition>>,
    /// The last transitions that ended, oldest first (at most
    /// [`ENDED_KEPT`]): what became of one whose request timed out.
    ended: Mutex<std::collections::VecDeque<EndedTransition>>,
    /// Which patches `apply` accepts (`vmm --trusted-keys`).
    policy: Policy,
    /// The module hooks' stub `rip`s, set when the engine installs them.
    hook_rips: Arc<std::sync::OnceLock<(u64, u64)>>,
    /// When the last change ended: ftrace redirects no patch needs are let
    /// go only once changes have paused (see [`Control::housekeeping`]).
    last_change: Mutex<Instant>,
    /// Set while [`Control::housekeeping`] holds `changing`: a change
    /// waits for it instead of being refused as busy.
    housekeeping: std::sync::atomic::AtomicBool,
}

/// How long the guest must go without a patch change before the ftrace
/// redirects of functions no patch redirects are let go: under a burst of
/// changes (a replace, a rollback loop) a function that leaves and comes
/// back keeps its registration instead of paying ftrace's RCU-tasks wait
/// both ways each time.
pub const RELEASE_IDLE: Duration = Duration::from_secs(2);

/// The `prepare` of a [`Live`] for work outside any transition.
type NoTransition = fn(&mut Engine, &Kernel) -> Result<Prepared, EngineError>;

/// Clears the pending transition however the transition ends.
struct PendingGuard<'a>(&'a Mutex<Option<PendingTransition>>);

/// This VM as the transition lifecycle's [`Host`]: pauses through the
/// control's gate, the call gate's interrupt and doorbell, the real clock,
/// and the pending transition `GET /patches` shows.
struct VmHost<'a> {
    control: &'a Control,
    action: &'a str,
    t: Transition,
}

impl Host for VmHost<'_> {
    type Guest = Vm;
    type Error = ControlError;

    fn paused<T>(&self, f: impl FnOnce(&Vm) -> T) -> Result<(T, Option<Duration>), ControlError> {
        let p = self.control.paused(|vm| Ok(f(vm)))?;
        Ok((p.value, p.pause))
    }

    fn is_paused(&self) -> bool {
        self.control.vm.is_paused()
    }

    fn guest(&self) -> &Vm {
        &self.control.vm
    }

    fn raise_vector(&self, vcpu: usize, vector: u8) -> Result<bool, ControlError> {
        Ok(self.control.vm.raise_vector(vcpu, vector)?)
    }

    fn doorbell_rings(&self) -> u64 {
        self.control.vm.doorbell().rings()
    }

    fn wait_doorbell(&self, seen: u64, deadline: Instant) {
        self.control.vm.doorbell().wait_past(seen, deadline);
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn begun(&self, patch: &str) {
        *lock(&self.control.pending) =
            Some(PendingTransition::begun(patch, self.action, self.t.force));
    }

    fn waiting(&self, attempts: u32, waited: Duration, blockers: &[Blocker]) {
        if let Some(p) = lock(&self.control.pending).as_mut() {
            p.waiting(attempts, waited, blockers.iter().map(ToString::to_string));
        }
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        *lock(self.0) = None;
    }
}

/// Locks `m`, recovering from poisoning: every value behind these locks is
/// replaced whole, never left half-updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Control {
    /// With `vmm --no-switch-log`: the engine never registers the switch
    /// log, and every safe-point pause reads every task.
    pub fn no_switch_log(&self) {
        self.engine()
            .switch_log_off("turned off (vmm --no-switch-log)".into());
    }

    /// `allow_downgrade` (`vmm --allow-downgrade`) lifts anti-rollback,
    /// which trusted keys otherwise enforce.
    pub fn new(vm: Arc<Vm>, policy: Policy, allow_downgrade: bool) -> Self {
        let mut engine = Engine::default();
        if policy.enforced() && !allow_downgrade {
            engine.enforce_levels();
        }
        let hook_rips = engine.hook_rips();
        Self {
            vm,
            gate: Mutex::new(()),
            kernel: ViewCache::default(),
            engine: Mutex::new(engine),
            changing: Mutex::new(()),
            published: Mutex::new(PatchesReply::default()),
            pending: Mutex::new(None),
            ended: Mutex::new(std::collections::VecDeque::new()),
            last_change: Mutex::new(Instant::now()),
            housekeeping: std::sync::atomic::AtomicBool::new(false),
            policy,
            hook_rips,
        }
    }

    /// Which patch signatures this VMM accepts (`--trusted-keys`).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The highest signed level applied, when anti-rollback is enforced.
    pub fn level_floor(&self) -> Option<u16> {
        self.engine().level_floor()
    }

    /// The VM this controls.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    fn gate(&self) -> Result<MutexGuard<'_, ()>, ControlError> {
        // A poisoned gate only means a holder panicked; the VM state it
        // guards lives in `Vm`, which stays consistent, so carry on.
        Ok(self.gate.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A user's pause: fails if the VM is paused already.
    pub fn pause(&self) -> Result<PauseReport, ControlError> {
        let _g = self.gate()?;
        Ok(self.vm.pause()?)
    }

    /// A user's resume: fails if the VM is not paused.
    pub fn resume(&self) -> Result<ResumeReport, ControlError> {
        let _g = self.gate()?;
        Ok(self.vm.resume()?)
    }

    /// Runs `f` with every vCPU parked: inside the user's pause if there is
    /// one, else inside a pause of its own that ends before returning.
    pub fn paused<T>(
        &self,
        f: impl FnOnce(&Vm) -> Result<T, ControlError>,
    ) -> Result<Paused<T>, ControlError> {
        let _g = self.gate()?;
        if self.vm.is_paused() {
            return Ok(Paused {
                value: f(&self.vm)?,
                pause: None,
            });
        }
        let parked = self.vm.pause()?.latency;
        let pause = PauseGuard(&self.vm);
        let value = f(&self.vm);
        let resumed = pause.resume()?.paused_for;
        tracing::debug!(
            park_us = parked.as_micros() as u64,
            paused_us = resumed.as_micros() as u64,
            "pause: every vCPU parked, then resumed"
        );
        let value = value?;
        Ok(Paused {
            value,
            pause: Some(resumed),
        })
    }

    /// Registers of vCPU `id`.
    pub fn regs(&self, id: usize) -> Result<Paused<VcpuRegs>, ControlError> {
        let count = self.vm.vcpu_count();
        let id8 = u8::try_from(id)
            .ok()
            .filter(|_| id < count)
            .ok_or(ControlError::NoSuchVcpu { id, count })?;
        self.paused(|vm| Ok(vcpu_regs(&vm.vcpu_state(id8)?)))
    }

    fn all_regs(vm: &Vm) -> Result<Vec<VcpuRegs>, ControlError> {
        all_vcpu_regs(vm).map_err(|e| ControlError::KernelNotReady(e.to_string()))
    }

    /// The cached kernel view, built on first use.
    ///
    /// A view is cached only after it has read the kernel back through the
    /// page tables it keeps (`init_top_pgt`), on the live guest: a view
    /// that cannot would refuse every patch for the VM's whole life. A
    /// failed build is retried within the request ([`FILL_ATTEMPTS`], the
    /// vCPUs' registers read afresh each time: one may have been in the
    /// middle of a CR3 switch or in early boot). The failure of all of them
    /// is remembered ([`FillBackoff`]): until its backoff has passed,
    /// requests get it at once, so a guest whose view cannot be built does
    /// not make the VMM decode it again on every request.
    pub fn kernel(&self) -> Result<Arc<CachedKernel>, ControlError> {
        self.kernel_view(true)
    }

    /// [`Control::kernel`]; `warn`: log each failed build as a warning
    /// (else at debug level, for a caller that expects failures while the
    /// guest boots and says itself when it gives up).
    fn kernel_view(&self, warn: bool) -> Result<Arc<CachedKernel>, ControlError> {
        self.kernel.get_or_build(Instant::now, || {
            let mut last = String::new();
            for attempt in 0..FILL_ATTEMPTS {
                if attempt > 0 {
                    std::thread::sleep(FILL_RETRY_BASE * (1 << (attempt - 1)));
                }
                match self.build_kernel() {
                    Ok(cached) => return Ok(cached),
                    // The VM stopped or a user paused it: retrying cannot help.
                    Err(e @ (ControlError::Stopped | ControlError::Vm(_))) => return Err(e),
                    Err(e) => {
                        if warn {
                            tracing::warn!(
                                attempt = attempt + 1,
                                "the guest kernel view failed: {e}"
                            );
                        } else {
                            tracing::debug!(
                                attempt = attempt + 1,
                                "the guest kernel view failed: {e}"
                            );
                        }
                        // The reply says "cannot be inspected yet" once.
                        last = match e {
                            ControlError::KernelNotReady(m) => m,
                            other => other.to_string(),
                        };
                    }
                }
            }
            Err(ControlError::KernelNotReady(last))
        })
    }

    /// `Ok` once the guest kernel has finished booting: its view is built
    /// ([`Control::kernel`]) and its `system_state` is `SYSTEM_RUNNING`
    /// (set just before init runs; the value from the guest's own BTF).
    /// Until then the error says what is missing. A kernel whose symbols
    /// or types lack either is taken as booted once its view is built
    /// (that is all an API request waits for), with a warning. Failed
    /// builds of the view are logged at debug level only: while the guest
    /// boots they are expected.
    pub fn booted(&self) -> Result<(), ControlError> {
        let k = self.kernel_view(false)?;
        let kernel = &k.kernel;
        let (Ok(addr), Some(running)) = (
            kernel.kallsyms.addr("system_state"),
            kernel.btf.enumerator("SYSTEM_RUNNING"),
        ) else {
            tracing::warn!(
                "this kernel's symbols or BTF lack system_state or SYSTEM_RUNNING: its view is \
                 taken as the sign it has booted"
            );
            return Ok(());
        };
        let mut word = [0u8; 4];
        kernel
            .space(&*self.vm)
            .read_virt(addr, &mut word)
            .map_err(|e| {
                ControlError::KernelNotReady(format!("cannot read system_state at {addr:#x}: {e}"))
            })?;
        let state = i64::from(i32::from_le_bytes(word));
        if state == running {
            Ok(())
        } else {
            Err(ControlError::KernelNotReady(format!(
                "the kernel is still booting (system_state {state}; SYSTEM_RUNNING is {running})"
            )))
        }
    }

    /// One build of the kernel view: registers and root pages read in a
    /// short pause, the kernel decoded from a snapshot of them, then checked
    /// on the live guest through the page tables it keeps.
    fn build_kernel(&self) -> Result<Arc<CachedKernel>, ControlError> {
        let regs = self.paused(|vm| {
            let regs = Self::all_regs(vm)?;
            let roots = RootPages::capture(vm, &regs);
            Ok((regs, roots))
        })?;
        let (vcpu_regs, roots) = regs.value;
        let snapshot = RegsSnapshot {
            vm: &self.vm,
            regs: vcpu_regs,
            roots,
        };
        let start = Instant::now();
        let kernel =
            Kernel::open(&snapshot).map_err(|e| ControlError::KernelNotReady(e.to_string()))?;
        // Kernel::open verified the view through the snapshot; the cached
        // view serves the live guest, so check it there too.
        kernel.verify(&*self.vm).map_err(|e| {
            ControlError::KernelNotReady(format!(
                "the kernel view found through {} does not read back on the live guest: {e}",
                kernel.origin
            ))
        })?;
        let decode = start.elapsed();
        let walker = Tasks::from_kernel(&kernel.kallsyms, &kernel.btf)
            .map_err(|e| tracing::warn!("the task walk will not work on this kernel: {e}"))
            .ok()
            .map(|mut w| {
                // THREAD_SIZE from the kernel's per-CPU data (read while
                // the guest runs: a CPU caught mid-switch is outvoted).
                w.measure_thread_size(&kernel.space(&*self.vm), &kernel.kallsyms, &kernel.btf);
                w
            });
        let cached = Arc::new(CachedKernel {
            kernel,
            walker,
            decode,
            pause: regs.pause.unwrap_or_default(),
        });
        tracing::info!(
            text = format!("{:#x}", cached.kernel.kaslr.text),
            symbols = cached.kernel.kallsyms.len(),
            decode_ms = decode.as_secs_f64() * 1e3,
            found_through = %cached.kernel.origin,
            reads_through = %format!(
                "init_top_pgt at {:#x} ({}-level)",
                cached.kernel.tables.root(),
                if cached.kernel.tables.five_level() { 5 } else { 4 }
            ),
            "guest kernel found"
        );
        Ok(cached)
    }

    /// Serves the module hooks: every vCPU stopped in `klp_module_coming`
    /// or `klp_module_going` is answered by [`Control::module_step`], one
    /// event at a time, on a thread of its own.
    pub fn serve_module_hooks(self: &Arc<Self>) -> std::io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel::<crate::devices::module_hooks::HookEvent>();
        let control = Arc::clone(self);
        std::thread::Builder::new()
            .name("module-hooks".into())
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::Kind::Api);
                let mut talks = ModuleTalks::default();
                // One change at a time: a module's load or unload in
                // progress holds it across the callbacks the loading task
                // runs, as klp_module_coming holds klp_mutex.
                let mut changing: Option<MutexGuard<'_, ()>> = None;
                for e in rx {
                    let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        control.module_step(&mut talks, &mut changing, &e)
                    }));
                    let answer = step.unwrap_or_else(|_| {
                        // A klpvisor bug: refuse the load rather than let
                        // a module run unpatched that a patch waits for.
                        tracing::error!(
                            "the module hook handler panicked (a klpvisor bug; please report \
                             it with the log); the module's {:?} is answered as refused",
                            e.event
                        );
                        talks = ModuleTalks::default();
                        match e.event {
                            HookEvent::Coming => HookAnswer::Return(-22),
                            HookEvent::Going => HookAnswer::Return(0),
                        }
                    });
                    if talks.is_empty() {
                        changing = None;
                    }
                    // A module's load or unload is a change too: the
                    // housekeeping waits for quiet after it.
                    *lock(&control.last_change) = Instant::now();
                    let _ = e.reply.send(answer);
                }
            })?;
        self.vm.module_hooks().set_handler(tx);
        Ok(())
    }

    /// One step of klp's `klp_module_coming` / `klp_module_going` for the
    /// module at `e.module`, which a guest task is loading or unloading
    /// (the task is held in the hook until the answer). The first port
    /// read of a load links the waiting objects; the answers then have the
    /// task run the objects' `pre_patch` callbacks, the VMM redirects, and
    /// the task runs the `post_patch` ones (unloading: `pre_unpatch`, the
    /// redirects taken away, `post_unpatch`); the last answer lets the
    /// task go on, or fails the load with an errno as klp fails it. While
    /// a transition is in progress, or the guest is busy (its ftrace lock
    /// held), the task is made to sleep (`msleep`) and come back, so no
    /// CPU is held while the guest must make progress.
    fn module_step<'c>(
        &'c self,
        talks: &mut ModuleTalks,
        changing: &mut Option<MutexGuard<'c, ()>>,
        e: &crate::devices::module_hooks::HookEvent,
    ) -> HookAnswer {
        const EINVAL: i32 = 22;
        /// How long a load or unload waits for a transition or a busy guest.
        const PATIENCE: Duration = Duration::from_secs(30);
        /// Each sleep of the waiting task.
        const NAP_MS: u64 = 20;
        let (event, module) = (e.event, e.module);
        let Some(k) = self.cached() else {
            // No kernel view, so no patch: nothing to do.
            return HookAnswer::Return(0);
        };
        if !klpvisor_engine::engine::in_hook(self.hook_rips.get().copied(), event, e.rip, e.cpl) {
            tracing::debug!(
                rip = e.rip,
                cpl = e.cpl,
                "a port read that is not a module hook"
            );
            return HookAnswer::Return(0);
        }
        let msleep = k.kernel.kallsyms.addr("msleep").ok();
        let nap = |talks: &mut ModuleTalks, talk: ModuleTalk| -> Option<HookAnswer> {
            let func = msleep?;
            if talk.started.elapsed() > PATIENCE {
                return None;
            }
            talks.0.insert((event, module), talk);
            Some(HookAnswer::Call {
                func,
                args: [NAP_MS, 0, 0, 0],
            })
        };
        let key = (event, module);
        let mut talk = talks.0.remove(&key).unwrap_or_else(ModuleTalk::new);
        let mut result = e.result;
        let returned = e.result;

        if talk.steps.is_none() {
            // Begin: one change at a time.
            if changing.is_none() {
                match self.changing.try_lock() {
                    Ok(g) => *changing = Some(g),
                    Err(std::sync::TryLockError::Poisoned(p)) => *changing = Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => {
                        if let Some(a) = nap(talks, talk) {
                            return a;
                        }
                        *changing = Some(lock(&self.changing));
                        talk = ModuleTalk::new();
                    }
                }
            }
            let mut engine = self.engine();
            // Without pausing: does any patch care?
            let name = k
                .kernel
                .modules_brief(self.vm.as_ref())
                .ok()
                .and_then(|l| l.into_iter().find(|m| m.addr == module))
                .map(|m| m.name);
            let cares = match (event, &name) {
                (HookEvent::Coming, Some(n)) => engine.waits_for(n),
                (HookEvent::Going, n) => engine.holds(module, n.as_deref()),
                (HookEvent::Coming, None) => true,
            };
            if !cares {
                return HookAnswer::Return(0);
            }
            talk.name = name.unwrap_or_else(|| format!("at {module:#x}"));
            let first = self.paused(|vm| {
                Ok(match event {
                    HookEvent::Coming => engine
                        .coming_link(&k.kernel, vm, module, true)
                        .map(|c| c.map(ModuleWork::Coming)),
                    HookEvent::Going => engine
                        .going_plan(&k.kernel, vm, module)
                        .map(|g| g.map(ModuleWork::Going)),
                })
            });
            // Released before anything below takes it again.
            drop(engine);
            match first.map(|p| p.value) {
                Ok(Ok(None)) => return HookAnswer::Return(0),
                Ok(Ok(Some(work))) => {
                    let callbacks = match &work {
                        ModuleWork::Coming(c) => c.callbacks.clone(),
                        ModuleWork::Going(g) => g.callbacks.clone(),
                    };
                    if let ModuleWork::Coming(c) = &work {
                        talk.register = c.ops.clone();
                    }
                    talk.steps = Some(ModuleSteps::new(event, callbacks));
                    talk.work = Some(work);
                    result = 0;
                }
                Ok(Err(err)) if err.is_busy() => {
                    if let Some(a) = nap(talks, talk) {
                        return a;
                    }
                    return self.module_gave_up(event, module, &k, "the guest stayed busy");
                }
                Ok(Err(err)) => {
                    return self.module_gave_up(event, module, &k, &err.to_string());
                }
                Err(err) => {
                    return self.module_gave_up(event, module, &k, &err.to_string());
                }
            }
        }

        loop {
            let step = if talk.retry_switch {
                talk.retry_switch = false;
                Step::Switch
            } else {
                match talk.steps.as_mut() {
                    Some(s) => s.next(result),
                    None => Step::Return(0),
                }
            };
            result = 0;
            match step {
                Step::Call {
                    patch,
                    kind,
                    func,
                    arg,
                } => {
                    tracing::info!(
                        module = talk.name,
                        patch,
                        "{kind:?} runs in the {event:?} task"
                    );
                    talks.0.insert(key, talk);
                    return HookAnswer::Call {
                        func,
                        args: [arg, 0, 0, 0],
                    };
                }
                Step::Switch => {
                    // Coming: the task registers the functions' ftrace_ops
                    // first, as klp_module_coming does in klp_patch_object.
                    if talk.work.is_some() && event == HookEvent::Coming {
                        match self.module_register(&mut talk, returned) {
                            Registering::Call(call) => {
                                talk.retry_switch = true;
                                talks.0.insert(key, talk);
                                return call;
                            }
                            Registering::Done => {}
                            Registering::Failed(errno, why) => {
                                tracing::warn!("refusing to load module {}: {why}", talk.name);
                                talk.work = None;
                                let mut engine = self.engine();
                                engine.note_refused(&talk.name, &why);
                                self.publish(&engine);
                                drop(engine);
                                if let Some(s) = talk.steps.as_mut() {
                                    s.fail(if errno < 0 { errno } else { -EINVAL });
                                }
                                continue;
                            }
                        }
                    }
                    let Some(work) = talk.work.take() else {
                        continue;
                    };
                    let mut engine = self.engine();
                    let switched = self.paused(|vm| {
                        Ok(match &work {
                            ModuleWork::Coming(c) => engine.coming_switch(&k.kernel, vm, c),
                            ModuleWork::Going(g) => engine.going_switch(&k.kernel, vm, g),
                        })
                    });
                    match switched {
                        Ok(Paused {
                            value: Ok(ev),
                            pause,
                        }) => {
                            talk.pause += pause.unwrap_or_default();
                            talk.release.extend(ev.release.iter().copied());
                            talk.event = Some(ev);
                            self.publish(&engine);
                            continue;
                        }
                        Ok(Paused {
                            value: Err(err), ..
                        }) if err.is_busy() => {
                            drop(engine);
                            talk.work = Some(work);
                            talk.retry_switch = true;
                            if let Some(a) = nap(talks, talk) {
                                return a;
                            }
                            return self.module_gave_up(event, module, &k, "the guest stayed busy");
                        }
                        Ok(Paused {
                            value: Err(err), ..
                        }) => {
                            drop(engine);
                            self.module_switch_failed(event, module, &talk.name, &err.to_string());
                            if let Some(s) = talk.steps.as_mut() {
                                s.fail(-EINVAL);
                            }
                        }
                        Err(err) => {
                            drop(engine);
                            self.module_switch_failed(event, module, &talk.name, &err.to_string());
                            if let Some(s) = talk.steps.as_mut() {
                                s.fail(-EINVAL);
                            }
                        }
                    }
                    let engine = self.engine();
                    self.publish(&engine);
                }
                Step::Return(v) => {
                    // A load that fails: what its task registered goes too.
                    if v != 0 && !talk.register.is_empty() {
                        let mut engine = self.engine();
                        let gone = engine.abandon_coming_ops(&talk.register);
                        talk.release.extend(gone);
                        talk.register.clear();
                        self.publish(&engine);
                    }
                    // Unloading (or a load that fails): the task lets go
                    // of the module's ftrace_ops first, as klp unregisters
                    // klp's before ftrace forgets the module's records.
                    if let Some(call) = self.module_release(&mut talk, returned) {
                        talks.0.insert(key, talk);
                        return call;
                    }
                    if v != 0 {
                        tracing::warn!(
                            "module {}: its load fails with {v} (a callback refused it, or it \
                             could not be patched)",
                            talk.name
                        );
                    }
                    if let Some(ev) = talk.event.filter(|ev| !ev.patches.is_empty()) {
                        tracing::info!(
                            module = ev.module,
                            patches = ?ev.patches,
                            entries = ev.sites,
                            pause_us = talk.pause.as_micros() as u64,
                            held_ms = talk.started.elapsed().as_millis() as u64,
                            "module {}: {}",
                            match event {
                                HookEvent::Coming => "loading, its objects applied",
                                HookEvent::Going => "unloading, its redirects taken away",
                            },
                            ev.module
                        );
                    }
                    return HookAnswer::Return(v);
                }
            }
        }
    }

    /// The next call a going module's task makes to let go of one of its
    /// functions' ftrace_ops, after taking what the last one returned
    /// (`returned`); `None` once every one is let go. A call that fails
    /// leaves that ops registered, inert, with a warning: the
    /// housekeeping tries again later.
    fn module_release(&self, talk: &mut ModuleTalk, returned: u64) -> Option<HookAnswer> {
        if talk.release.is_empty() && talk.releasing.is_none() {
            return None;
        }
        let mut engine = self.engine();
        if let Some((slot, step)) = talk.releasing.take() {
            if let Err(e) = engine.module_release_done(slot, step, returned) {
                tracing::warn!(
                    module = talk.name,
                    "a module's ftrace redirect stays registered (inert): {e}"
                );
                talk.release.retain(|s| *s != slot);
            }
        }
        while let Some(&slot) = talk.release.first() {
            match engine.module_release_call(slot) {
                Some((step, func, arg)) => {
                    tracing::info!(
                        module = talk.name,
                        "{} runs in the module's task",
                        step.function()
                    );
                    talk.releasing = Some((slot, step));
                    return Some(HookAnswer::Call {
                        func,
                        args: [arg, 0, 0, 0],
                    });
                }
                None => {
                    talk.release.remove(0);
                }
            }
        }
        self.publish(&engine);
        None
    }

    /// The next call a coming module's task makes to register one of its
    /// functions' ftrace_ops, after taking what the last one returned
    /// (`returned`).
    fn module_register(&self, talk: &mut ModuleTalk, returned: u64) -> Registering {
        let mut engine = self.engine();
        if let Some((old, step)) = talk.registering.take() {
            if let Err(e) = engine.coming_register_done(old, step, returned) {
                let errno = match &e {
                    EngineError::Ops(klpvisor_engine::ftrace_ops::OpsError::Refused {
                        ret,
                        ..
                    }) => *ret,
                    _ => -22,
                };
                return Registering::Failed(errno, e.to_string());
            }
        }
        for &old in &talk.register {
            if let Some((step, func, args)) = engine.coming_register_call(old) {
                tracing::info!(
                    module = talk.name,
                    "{} runs in the loading task",
                    step.function()
                );
                talk.registering = Some((old, step));
                let mut a = [0u64; 4];
                for (slot, v) in a.iter_mut().zip(args) {
                    *slot = v;
                }
                return Registering::Call(HookAnswer::Call { func, args: a });
            }
        }
        Registering::Done
    }

    /// A module's coming or going could not begin (or waited too long):
    /// a load is refused, as klp refuses one it cannot patch; an unload
    /// goes on, and the engine forgets the module (its memory is freed).
    fn module_gave_up(
        &self,
        event: HookEvent,
        module: u64,
        k: &CachedKernel,
        why: &str,
    ) -> HookAnswer {
        let mut engine = self.engine();
        let name = k
            .kernel
            .modules_brief(self.vm.as_ref())
            .ok()
            .and_then(|l| l.into_iter().find(|m| m.addr == module))
            .map_or_else(|| format!("at {module:#x}"), |m| m.name);
        let answer = match event {
            HookEvent::Coming => {
                tracing::warn!("refusing to load module {name}: {why}");
                engine.note_refused(&name, why);
                HookAnswer::Return(-22)
            }
            HookEvent::Going => {
                tracing::error!(
                    "module {name} unloads but its redirects could not be taken away ({why}); \
                     forgetting them, its memory is freed"
                );
                engine.forget_module(self.vm.as_ref(), |m| m.addr == module);
                HookAnswer::Return(0)
            }
        };
        self.publish(&engine);
        answer
    }

    /// A coming's or going's switch failed: a load is then refused (its
    /// callbacks cancelled by the steps), an unload's state forgotten.
    fn module_switch_failed(&self, event: HookEvent, module: u64, name: &str, why: &str) {
        let mut engine = self.engine();
        match event {
            HookEvent::Coming => {
                tracing::warn!("refusing to load module {name}: {why}");
                engine.note_refused(name, why);
            }
            HookEvent::Going => {
                tracing::error!(
                    "module {name} unloads but its redirects could not be taken away ({why}); \
                     forgetting them, its memory is freed"
                );
                engine.forget_module(self.vm.as_ref(), |m| m.addr == module);
            }
        }
    }

    fn cached(&self) -> Option<Arc<CachedKernel>> {
        self.kernel.get()
    }

    /// Every task, walked inside one pause so the lists are consistent.
    pub fn tasks(&self) -> Result<Paused<Vec<Task>>, ControlError> {
        let k = self.kernel()?;
        let walker = k.walker.ok_or(ControlError::NoTaskWalk)?;
        self.paused(|vm| {
            let regs = Self::all_regs(vm)?;
            walker
                .list(&k.kernel.space(vm), &regs)
                .map_err(ControlError::Tasks)
        })
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        // A panic mid-transition cannot leave the engine half-updated: it
        // changes its state only after a commit succeeded.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine for a change: refused at once, not queued, while another
    /// change holds it. A queued request would wait out the other one's
    /// safe-point retries and callbacks (up to its timeout) and could pass
    /// the API's 30 s answer limit; a clear "busy" lets the client decide.
    fn engine_for_change(
        &self,
    ) -> Result<(MutexGuard<'_, ()>, MutexGuard<'_, Engine>), ControlError> {
        match self.changing.try_lock() {
            Ok(g) => Ok((g, self.engine())),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok((p.into_inner(), self.engine())),
            // Housekeeping is short (one function's ops let go): wait.
            Err(std::sync::TryLockError::WouldBlock)
                if self.housekeeping.load(std::sync::atomic::Ordering::Acquire) =>
            {
                let g = self.changing.lock().unwrap_or_else(|p| p.into_inner());
                Ok((g, self.engine()))
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                Err(ControlError::Busy(match lock(&self.pending).as_ref() {
                    Some(t) => format!("{} of {}", t.action, t.patch),
                    None => "being prepared".into(),
                }))
            }
        }
    }

    /// The loaded patches, oldest first, what runs now, and the transition
    /// in progress (its patch shown "in transition").
    pub fn patches(&self) -> PatchesReply {
        let mut reply = lock(&self.published).clone();
        reply.transition = lock(&self.pending).clone();
        reply.ended = lock(&self.ended).iter().cloned().collect();
        if let Some(t) = &reply.transition {
            for p in reply.patches.iter_mut().filter(|p| p.name == t.patch) {
                p.state = PatchState::InTransition;
            }
        }
        reply
    }

    /// Publishes the engine's state after a change.
    fn publish(&self, engine: &Engine) {
        *lock(&self.published) = PatchesReply {
            patches: engine.list(),
            live: engine.live(),
            transition: None,
            retired: engine.retired(),
            gate: engine.gate_info(),
            switch_log: engine.switch_log_info(&*self.vm),
            ended: Vec::new(),
            ftrace: engine.ftrace_redirects(),
            ftrace_handler_gpa: engine.ftrace_handler_gpa(),
        };
    }

    /// Remembers how the transition now ending finished. Only transitions
    /// that began (the lifecycle named their patch) are kept: a request
    /// refused before that got its answer at once.
    /// `committed`: its history number, attempts and wait, when it did.
    fn record_end(&self, committed: Option<(u64, u32, f64)>, error: Option<String>) {
        let Some(mut p) = lock(&self.pending).clone() else {
            return;
        };
        if let Some((_, attempts, waited_ms)) = committed {
            p.attempts = attempts;
            p.waited_ms = waited_ms;
        }
        let ended_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut ended = lock(&self.ended);
        if ended.len() >= ENDED_KEPT {
            ended.pop_front();
        }
        ended.push_back(EndedTransition {
            patch: p.patch,
            action: p.action,
            forced: p.forced,
            ended_at,
            attempts: p.attempts,
            waited_ms: p.waited_ms,
            seq: committed.map(|(seq, _, _)| seq),
            error,
        });
    }

    /// Runs one transition through klp's lifecycle
    /// ([`klpvisor_engine::transition::run`]) on this VM, one change at a
    /// time, showing it "in transition" while it waits for a safe point.
    /// `finish` turns the outcome into the reply.
    fn run_transition<R>(
        &self,
        action: &str,
        t: Transition,
        prepare: impl Fn(&mut Engine, &Kernel) -> Result<Prepared, EngineError>,
        finish: impl FnOnce(&mut Engine, Outcome) -> Result<R, ControlError>,
    ) -> Result<R, ControlError> {
        let k = self.kernel()?;
        let (_changing, mut engine) = self.engine_for_change()?;
        let _pending = PendingGuard(&self.pending);
        let host = VmHost {
            control: self,
            action,
            t,
        };
        let mut live = Live {
            engine: &mut engine,
            kernel: &k.kernel,
            prepare,
        };
        let outcome = lifecycle::run(&host, &mut live, action, t);
        let committed = outcome
            .as_ref()
            .ok()
            .map(|o| (engine.last_seq(), o.attempts, o.waited_ms));
        let reply = outcome.and_then(|o| finish(&mut engine, o));
        self.record_end(committed, reply.as_ref().err().map(ToString::to_string));
        self.publish(&engine);
        *lock(&self.last_change) = Instant::now();
        reply
    }

    /// Runs `f` with the lifecycle's host and patcher for call-gate work
    /// outside any transition (a removal's per-CPU frees, housekeeping),
    /// which prepares none.
    fn outside_transition<R>(
        &self,
        action: &str,
        kernel: &Kernel,
        engine: &mut Engine,
        f: impl FnOnce(&VmHost<'_>, &mut Live<'_, NoTransition>) -> R,
    ) -> R {
        fn none(_: &mut Engine, _: &Kernel) -> Result<Prepared, EngineError> {
            Err(EngineError::Internal(
                "work outside a transition prepares none".into(),
            ))
        }
        let host = VmHost {
            control: self,
            action,
            t: Transition {
                force: false,
                timeout: lifecycle::TRANSITION_TIMEOUT,
            },
        };
        let mut live = Live {
            engine,
            kernel,
            prepare: none as NoTransition,
        };
        f(&host, &mut live)
    }

    /// Lets go of the ftrace redirect of one function no patch redirects
    /// any more (its ops unregistered, its filter freed, through the call
    /// gate), once no change has run for [`RELEASE_IDLE`]; with none left,
    /// unregisters the switch log (see `klpvisor_engine::switches`).
    /// Called every second by the API's runtime; does nothing while a
    /// change runs, the VM is held paused, or there is nothing to let go.
    /// One step per call, so a change that arrives meanwhile waits at most
    /// for that.
    pub fn housekeeping(&self) {
        if lock(&self.last_change).elapsed() < RELEASE_IDLE {
            return;
        }
        let Some(k) = self.cached() else {
            return;
        };
        let Ok(_changing) = self.changing.try_lock() else {
            return;
        };
        self.housekeeping
            .store(true, std::sync::atomic::Ordering::Release);
        let mut engine = self.engine();
        if engine.ops_releases() > 0 {
            self.outside_transition("release", &k.kernel, &mut engine, |host, live| {
                lifecycle::release_ops(host, live, 1)
            });
            self.publish(&engine);
        } else if engine.switch_log_registered() {
            // After the ftrace redirects: the last of klpvisor's own
            // registrations with the guest's tracing to go.
            self.outside_transition("release", &k.kernel, &mut engine, |host, live| {
                lifecycle::release_switch_log(host, live)
            });
            self.publish(&engine);
        }
        drop(engine);
        self.housekeeping
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// A transition of one patch (apply, disable, enable).
    fn transition(
        &self,
        action: &str,
        t: Transition,
        prepare: impl Fn(&mut Engine, &Kernel) -> Result<Prepared, EngineError>,
    ) -> Result<TransitionReply, ControlError> {
        self.run_transition(action, t, prepare, |engine, o| {
            Ok(engine.transition_reply(o)?)
        })
    }

    /// Returns every patch to its state just before transition `to`
    /// (default: the last), in one transition.
    pub fn rollback(&self, to: Option<u64>, t: Transition) -> Result<RollbackReply, ControlError> {
        // Which transition "the last" was is known once the engine is locked.
        let target = std::cell::Cell::new(0);
        self.run_transition(
            "rollback",
            t,
            |e, k| {
                target.set(to.unwrap_or(e.last_seq()));
                let p = e.prepare_rollback(k, &*self.vm, Some(target.get()), t.force)?;
                e.check_levels(&p)?;
                Ok(p)
            },
            |engine, o| Ok(engine.rollback_reply(target.get(), o)),
        )
    }

    /// The committed transitions a rollback can return to.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.engine().history()
    }

    /// Loads and enables a livepatch module.
    ///
    /// The signature is checked first, on the uploaded bytes alone: a
    /// refused patch is never parsed, linked or planned, the engine lock
    /// is not taken and the guest is not paused, read or written. The
    /// engine then sees exactly the module as built, signatures stripped.
    pub fn apply(&self, ko: &[u8], t: Transition) -> Result<TransitionReply, ControlError> {
        let checked = self.policy.check(ko).inspect_err(|e| {
            tracing::warn!(bytes = ko.len(), "patch refused, guest untouched: {e}");
        })?;
        let signature = checked.provenance.to_string();
        let level = checked.provenance.verified_level();
        tracing::info!(signature, "patch signature checked");
        self.transition("apply", t, |e, k| {
            let mut p = e.prepare_apply(k, &*self.vm, checked.module, t.force)?;
            p.set_signature(signature.clone(), level);
            e.check_levels(&p)?;
            Ok(p)
        })
    }

    /// Disables enabled patch `name`.
    pub fn disable(&self, name: &str, t: Transition) -> Result<TransitionReply, ControlError> {
        self.transition("disable", t, |e, k| {
            e.prepare_disable(k, &*self.vm, name, t.force)
        })
    }

    /// Enables loaded patch `name` again (a downgrade for an older
    /// replace patch).
    pub fn enable(&self, name: &str, t: Transition) -> Result<TransitionReply, ControlError> {
        self.transition("enable", t, |e, k| {
            let p = e.prepare_enable(k, &*self.vm, name, t.force)?;
            e.check_levels(&p)?;
            Ok(p)
        })
    }

    /// Forgets a disabled or replaced patch. Its arena space is freed in
    /// a short pause if no task's stack references its code, else by a
    /// later transition's pause once none does.
    pub fn remove(&self, name: &str) -> Result<PatchInfo, ControlError> {
        let (_changing, mut engine) = self.engine_for_change()?;
        let info = engine.remove(name)?;
        if let Some(k) = self.cached() {
            // The stacks are read while the guest runs; the pause re-reads
            // only the tasks that may have run since (with the switch
            // log, a few; at 10000 tasks the sweep's pause read them all
            // for 230 ms, nested).
            engine.prescan_retired(&k.kernel, &*self.vm);
            match self.paused(|vm| Ok(engine.sweep(&k.kernel, vm)?)) {
                Ok(p) if !p.value.is_empty() => {
                    tracing::info!(freed = ?p.value, "arena space of removed patches freed")
                }
                Ok(_) => tracing::info!(
                    patch = name,
                    "its code stays mapped: a task's stack may still reference it"
                ),
                Err(e) => tracing::warn!(patch = name, "cannot check stacks yet: {e}"),
            }
            // A freed patch's per-CPU block goes back to the guest's
            // allocator, through the call gate, now that the pause is over.
            if engine.percpu_frees() > 0 {
                self.outside_transition("remove", &k.kernel, &mut engine, |host, live| {
                    lifecycle::free_percpu(host, live)
                });
            }
        }
        self.publish(&engine);
        Ok(info)
    }

    /// A NUL-terminated string of at most `max` bytes at kernel address `va`.
    pub fn read_cstr(&self, k: &Kernel, va: u64, max: usize) -> Option<String> {
        let mut buf = vec![0u8; max];
        k.space(&*self.vm).read_virt(va, &mut buf).ok()?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Some(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn kernel_view_backoff_doubles_to_a_cap_and_resets_on_success() {
        let t0 = Instant::now();
        let mut b = FillBackoff::default();
        assert!(b.refusal(t0).is_none(), "nothing failed yet: build at once");
        assert_eq!(b.failed(t0, "one".into()), FILL_RETRY_BASE * 2);
        let f = b.refusal(t0).expect("remembered");
        assert_eq!(
            (f.message.as_str(), f.retry_at),
            ("one", t0 + FILL_RETRY_BASE * 2)
        );
        assert!(
            b.refusal(t0 + FILL_RETRY_BASE * 2).is_none(),
            "stands until then only"
        );
        assert_eq!(b.failed(t0, "two".into()), FILL_RETRY_BASE * 4);
        for _ in 0..10 {
            b.failed(t0, "again".into());
        }
        assert_eq!(b.failed(t0, "last".into()), FILL_BACKOFF_MAX);
        assert!(b
            .refusal(t0 + FILL_BACKOFF_MAX - Duration::from_millis(1))
            .is_some());
        b.succeeded();
        assert!(b.refusal(t0).is_none());
        assert_eq!(b.failed(t0, "new".into()), FILL_RETRY_BASE * 2);
    }

    /// A clock the test moves by hand.
    struct Clock {
        t0: Instant,
        at: Cell<Duration>,
    }

    impl Clock {
        fn new() -> Self {
            Self {
                t0: Instant::now(),
                at: Cell::new(Duration::ZERO),
            }
        }
        fn now(&self) -> Instant {
            self.t0 + self.at.get()
        }
        fn advance(&self, d: Duration) {
            self.at.set(self.at.get() + d);
        }
    }

    #[test]
    fn a_failed_view_is_remembered_and_not_built_again_until_its_backoff_passes() {
        let cache = ViewCache::<u32>::default();
        let clock = Clock::new();
        let builds = Cell::new(0);
        let fail = || {
            builds.set(builds.get() + 1);
            Err(ControlError::KernelNotReady("no kallsyms".into()))
        };
        let e = cache.get_or_build(|| clock.now(), fail).unwrap_err();
        assert!(e.to_string().contains("no kallsyms"), "{e}");
        // Requests within the backoff get the failure without a build.
        for _ in 0..100 {
            clock.advance(Duration::from_millis(1));
            let e = cache.get_or_build(|| clock.now(), fail).unwrap_err();
            assert!(matches!(&e, ControlError::KernelNotReady(m) if m.contains("no kallsyms")));
            assert!(e.to_string().contains("no sooner than"), "{e}");
        }
        assert_eq!(builds.get(), 1);
        // Past it, one build; its failure stands twice as long.
        clock.advance(FILL_RETRY_BASE * 2);
        assert!(cache.get_or_build(|| clock.now(), fail).is_err());
        assert_eq!(builds.get(), 2);
        clock.advance(FILL_RETRY_BASE * 2);
        assert!(cache.get_or_build(|| clock.now(), fail).is_err());
        assert_eq!(builds.get(), 2, "the second failure stands 400 ms");
        clock.advance(FILL_RETRY_BASE * 2);
        let ok = || {
            builds.set(builds.get() + 1);
            Ok(Arc::new(7))
        };
        assert_eq!(*cache.get_or_build(|| clock.now(), ok).unwrap(), 7);
        assert_eq!(builds.get(), 3);
        // Built: kept for good, never built again.
        assert_eq!(*cache.get_or_build(|| clock.now(), fail).unwrap(), 7);
        assert_eq!(builds.get(), 3);
    }

    #[test]
    fn a_stopped_or_paused_vm_is_not_remembered_as_a_failed_view() {
        let cache = ViewCache::<u32>::default();
        let clock = Clock::new();
        let builds = Cell::new(0);
        for _ in 0..3 {
            let e = cache
                .get_or_build(
                    || clock.now(),
                    || {
                        builds.set(builds.get() + 1);
                        Err(ControlError::Stopped)
                    },
                )
                .unwrap_err();
            assert!(matches!(e, ControlError::Stopped));
        }
        assert_eq!(builds.get(), 3);
        let v = cache.get_or_build(|| clock.now(), || Ok(Arc::new(1)));
        assert_eq!(*v.unwrap(), 1);
    }

    #[test]
    fn concurrent_requests_behind_a_failing_build_get_its_failure() {
        // 16 requests at once, as on the API's blocking threads, with time
        // standing still: one build, however the threads interleave.
        let cache = ViewCache::<u32>::default();
        let t0 = Instant::now();
        let builds = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    let r = cache.get_or_build(
                        || t0,
                        || {
                            builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(20));
                            Err(ControlError::KernelNotReady("slow failure".into()))
                        },
                    );
                    assert!(r.is_err());
                });
            }
        });
        assert_eq!(builds.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}

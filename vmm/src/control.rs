//! What the control socket does to the VM, independent of HTTP: pausing on
//! behalf of a user, short pauses of its own for consistent reads, and the
//! cached view of the guest kernel.
//!
//! Every pause or resume, a user's or an internal one, goes through one
//! gate, so an internal "pause, read, resume" can never resume a VM that a
//! user paused, and a user's pause never lands in the middle of a task walk.
//!
//! The kernel view (`Kernel::open`, ~100 ms) is built lazily on first need
//! and kept: `_text`, kallsyms and BTF do not change after boot. Only the
//! register read that starts it needs the VM paused; the decode reads
//! static kernel tables while the guest runs. A failure (typically: the
//! kernel is not up yet) is returned, not cached, so a later request retries.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use klpvisor_api::{
    CallbackRun, Hex, HistoryEntry, PatchInfo, PatchState, PatchesReply, PendingTransition,
    RollbackReply, TransitionReply,
};
use klpvisor_engine::callback::gate::{Progress, IRQ_WORK_VECTOR};
use klpvisor_engine::callback::{Call, Calls};
use klpvisor_engine::engine::{Committed, Engine, EngineError, Prepared};
use klpvisor_engine::signature::{Policy, SignatureError};
use klpvisor_engine::write::Plan;
use klpvisor_guest::VcpuRegs;
use klpvisor_guest::{all_vcpu_regs, Kernel, Task, Tasks, VirtRead};

use crate::guest::{vcpu_regs, RegsSnapshot, RootPages};
use crate::vm::{PauseReport, ResumeReport, Vm, VmError};

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("the VM is already paused; resume it first (PUT /vm/resume)")]
    AlreadyPaused,
    #[error("the VM is not paused; pause it first (PUT /vm/pause)")]
    NotPaused,
    #[error(
        "the guest has stopped (it powered off, rebooted or crashed); the VMM is shutting down"
    )]
    Stopped,
    #[error("no vCPU {id}: this VM has vCPUs 0 to {}", count.saturating_sub(1))]
    NoSuchVcpu { id: usize, count: usize },
    #[error("{0}")]
    Vm(VmError),
    #[error("the guest kernel cannot be inspected yet (is it still booting?): {0}")]
    KernelNotReady(String),
    #[error("reading the guest's task list failed: {0}")]
    Tasks(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error(
        "{patch}: {callback} returned {ret}{errno}: klp refuses a patch whose pre_patch fails, \
         so the transition was abandoned and no function was redirected{cancelled}"
    )]
    Refused {
        patch: String,
        callback: klpvisor_engine::callback::Kind,
        ret: i32,
        errno: String,
        cancelled: String,
    },
    #[error(
        "{patch}: {callback} did not finish within {ms} ms ({progress}); the transition was \
         abandoned and no function was redirected{cancelled}"
    )]
    CallbackTimeout {
        patch: String,
        callback: klpvisor_engine::callback::Kind,
        ms: u64,
        progress: String,
        cancelled: String,
    },
    #[error(
        "another transition is in progress ({0}); one runs at a time: retry when it ends \
         (`patcher list` shows it)"
    )]
    Busy(String),
    #[error(
        "the VM is paused and this transition runs klp callbacks, which run in the guest; \
         resume it first (PUT /vm/resume)"
    )]
    PausedForCallbacks,
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Refused by the signature policy, before anything was parsed.
    #[error(transparent)]
    Signature(#[from] SignatureError),
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
    pub value: T,
    /// Out-of-guest time of the pause taken for this read; `None` when the
    /// VM was paused already (by a user) and stays so.
    pub pause: Option<Duration>,
}

/// The guest kernel view with what it cost to build.
#[derive(Debug)]
pub struct CachedKernel {
    pub kernel: Kernel,
    pub walker: Option<Tasks>,
    /// `Kernel::open` on the running guest.
    pub decode: Duration,
    /// The register-read pause before it.
    pub pause: Duration,
}

/// How long a transition waits for a safe point before failing cleanly
/// (`?timeout_ms=` overrides it, up to [`MAX_TRANSITION_TIMEOUT`]).
pub const TRANSITION_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait a request may ask for (the API answers within 30 s).
pub const MAX_TRANSITION_TIMEOUT: Duration = Duration::from_secs(25);
/// How long a post callback, or one that cancels a pre callback, may take.
/// Pre callbacks share the transition's timeout with the safe-point wait.
pub const CALLBACK_GRACE: Duration = Duration::from_secs(2);

/// How a transition is to be made.
#[derive(Debug, Clone, Copy)]
pub struct Transition {
    /// Skip the safe-point check; the patch is marked forced.
    pub force: bool,
    /// How long to retry while tasks block it.
    pub timeout: Duration,
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
/// The longest a request waits for the backoff of earlier failures.
pub const FILL_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Paces kernel-view builds after failures: each failed request doubles
/// the time before the next may build again (from [`FILL_RETRY_BASE`] up
/// to [`FILL_BACKOFF_MAX`]); a success resets it. A request that arrives
/// early waits out the rest rather than failing, so a user's request is
/// delayed, never refused, by the backoff.
#[derive(Debug, Default)]
struct FillBackoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl FillBackoff {
    fn wait(&self) -> Option<Duration> {
        self.not_before
            .and_then(|t| t.checked_duration_since(Instant::now()))
            .map(|d| d.min(FILL_BACKOFF_MAX))
    }

    fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = FILL_RETRY_BASE
            .saturating_mul(1 << self.failures.min(5))
            .min(FILL_BACKOFF_MAX);
        self.not_before = Some(Instant::now() + delay);
        delay
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }
}

/// The VM as the control socket drives it.
pub struct Control {
    vm: Arc<Vm>,
    /// Serializes every pause/resume (see the module doc).
    gate: Mutex<()>,
    /// Serializes cache fills, so concurrent first requests decode once,
    /// and paces the retries after a failed one.
    fill: Mutex<FillBackoff>,
    kernel: Mutex<Option<Arc<CachedKernel>>>,
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
    /// Which patches `apply` accepts (`vmm --trusted-keys`).
    policy: Policy,
}

/// Clears the pending transition however the transition ends.
struct PendingGuard<'a>(&'a Mutex<Option<PendingTransition>>);

/// What a committed transition took, for its reply.
struct Outcome {
    committed: Committed,
    prepare_ms: f64,
    pause_us: f64,
    attempts: u32,
    waited_ms: f64,
    warnings: Vec<String>,
    callbacks: Vec<CallbackRun>,
}

/// A callback that did not let the transition go on.
enum Stop {
    /// `pre_patch` returned non-zero.
    Refused(CallbackRun),
    /// It did not finish in time, or could not be sent.
    Failed(ControlError),
}

/// The Linux name of a negative errno, for `pre_patch` refusals.
fn errno_name(ret: i32) -> String {
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
    pub fn new(vm: Arc<Vm>, policy: Policy) -> Self {
        Self {
            vm,
            gate: Mutex::new(()),
            fill: Mutex::new(FillBackoff::default()),
            kernel: Mutex::new(None),
            engine: Mutex::new(Engine::default()),
            changing: Mutex::new(()),
            published: Mutex::new(PatchesReply::default()),
            pending: Mutex::new(None),
            policy,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

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
        self.vm.pause()?;
        let pause = PauseGuard(&self.vm);
        let value = f(&self.vm);
        let resumed = pause.resume();
        let value = value?;
        Ok(Paused {
            value,
            pause: Some(resumed?.paused_for),
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
    /// middle of a CR3 switch or in early boot), and later requests retry
    /// no sooner than [`FillBackoff`] allows, so a guest whose view cannot
    /// be built does not make the VMM decode it on every request.
    pub fn kernel(&self) -> Result<Arc<CachedKernel>, ControlError> {
        if let Some(k) = self.cached() {
            return Ok(k);
        }
        let mut backoff = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = self.cached() {
            return Ok(k);
        }
        if let Some(wait) = backoff.wait() {
            std::thread::sleep(wait);
        }
        let mut last = String::new();
        for attempt in 0..FILL_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(FILL_RETRY_BASE * (1 << (attempt - 1)));
            }
            match self.build_kernel() {
                Ok(cached) => {
                    backoff.succeeded();
                    *self.kernel.lock().unwrap_or_else(|p| p.into_inner()) = Some(cached.clone());
                    return Ok(cached);
                }
                // The VM stopped or a user paused it: retrying cannot help.
                Err(e @ (ControlError::Stopped | ControlError::Vm(_))) => return Err(e),
                Err(e) => {
                    tracing::warn!(attempt = attempt + 1, "the guest kernel view failed: {e}");
                    last = e.to_string();
                }
            }
        }
        let retry_in = backoff.failed();
        Err(ControlError::KernelNotReady(format!(
            "{last}\n(tried {FILL_ATTEMPTS} times; the next request tries again, no sooner than \
             {} ms from now. If the guest has finished booting and this persists, the VMM log \
             has each attempt)",
            retry_in.as_millis()
        )))
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

    fn cached(&self) -> Option<Arc<CachedKernel>> {
        self.kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every task, walked inside one pause so the lists are consistent.
    pub fn tasks(&self) -> Result<Paused<Vec<Task>>, ControlError> {
        let k = self.kernel()?;
        let walker = k.walker.ok_or(ControlError::Tasks(
            "this kernel's BTF or kallsyms lack what the task walk needs (see the VMM log)".into(),
        ))?;
        self.paused(|vm| {
            let regs = Self::all_regs(vm)?;
            walker
                .list(&k.kernel.space(vm), &regs)
                .map_err(|e| ControlError::Tasks(e.to_string()))
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
        };
    }

    /// Prepares a transition while the guest runs (parse, resolve, link,
    /// plan: reads only), runs its pre callbacks, then commits all of its
    /// entry writes in one pause and runs its post callbacks. A
    /// transition blocked by a task inside a changed function is retried,
    /// the guest running in between, with backoff (1 ms doubling to
    /// 100 ms) until `timeout`; then the blockers are reported, the pre
    /// callbacks are cancelled as klp cancels them, and no function is
    /// redirected. `finish` turns the outcome into the reply.
    fn run_transition<R>(
        &self,
        action: &str,
        t: Transition,
        prepare: impl Fn(&mut Engine, &Kernel) -> Result<Prepared, EngineError>,
        finish: impl FnOnce(&mut Engine, Outcome) -> Result<R, ControlError>,
    ) -> Result<R, ControlError> {
        let k = self.kernel()?;
        let (_changing, mut engine) = self.engine_for_change()?;
        let start = Instant::now();
        let mut prepared = prepare(&mut engine, &k.kernel)?;
        if !prepared.calls().is_empty() {
            if self.vm.is_paused() {
                return Err(ControlError::PausedForCallbacks);
            }
            if !engine.has_gate() {
                // The gate takes arena pages: install it, then plan again
                // on the arena that has it.
                self.paused(|vm| Ok(engine.install_gate(&k.kernel, vm)?))?;
                tracing::info!("call gate installed for klp callbacks");
                prepared = prepare(&mut engine, &k.kernel)?;
            }
        }
        // (Taken only now: a new patch's callbacks moved with it when the
        // gate made it plan again.)
        let calls = prepared.calls().clone();
        let prepare_ms = start.elapsed().as_secs_f64() * 1e3;
        for w in prepared.warnings() {
            tracing::warn!(patch = prepared.name(), "{w}");
        }
        let first = Instant::now();
        let deadline = first + t.timeout;
        *lock(&self.pending) = Some(PendingTransition {
            patch: prepared.name().to_owned(),
            action: action.to_owned(),
            forced: t.force,
            waited_ms: 0.0,
            attempts: 0,
            blockers: Vec::new(),
        });
        let _pending = PendingGuard(&self.pending);

        // The pre callbacks. A new patch's code must be in the guest
        // before its pre_patch runs: load it first (no safe point needed,
        // nothing references it yet).
        let mut runs = Vec::new();
        let mut loaded = None;
        let mut passed = Vec::new();
        if !calls.is_empty() {
            if prepared.loads() {
                let load = prepared.take_load();
                loaded = Some(
                    self.paused(|vm| Ok(load.commit(vm).map_err(EngineError::from)?))?
                        .value,
                );
            }
            for call in calls.pre() {
                if call.func.is_some() {
                    let stop = match self.call(&k, &mut engine, &prepared, &call, deadline) {
                        Ok(run) if run.ret.unwrap_or(0) == 0 => {
                            runs.push(run);
                            None
                        }
                        Ok(run) => Some(Stop::Refused(run)),
                        Err(e) => Some(Stop::Failed(e)),
                    };
                    if let Some(stop) = stop {
                        let e = self.abandon(&k, &mut engine, prepared, loaded, &passed, stop);
                        return Err(e);
                    }
                }
                passed.push(call);
            }
        }

        let mut backoff = Duration::from_millis(1);
        let mut attempts = 0u32;
        let done = loop {
            attempts += 1;
            match self.paused(|vm| Ok(engine.commit(&k.kernel, vm, &prepared)?)) {
                Err(ControlError::Engine(EngineError::Blocked(b)))
                    if Instant::now() + backoff < deadline =>
                {
                    tracing::debug!(
                        patch = prepared.name(),
                        attempts,
                        blockers = b.len(),
                        "no safe point yet; retrying"
                    );
                    if let Some(p) = lock(&self.pending).as_mut() {
                        p.attempts = attempts;
                        p.waited_ms = first.elapsed().as_secs_f64() * 1e3;
                        p.blockers = b.iter().map(|b| b.to_string()).collect();
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Ok(done) => break done,
                Err(e) if calls.is_empty() => return Err(e),
                Err(e) => {
                    return Err(self.abandon(
                        &k,
                        &mut engine,
                        prepared,
                        loaded,
                        &passed,
                        Stop::Failed(e),
                    ))
                }
            }
        };
        let pause_us = done.pause.unwrap_or_default().as_secs_f64() * 1e6;
        tracing::info!(
            action,
            patch = done.value.name,
            seq = done.value.seq,
            prepare_ms,
            pause_us,
            attempts,
            bytes = done.value.bytes_written,
            "transition committed"
        );
        let mut warnings = prepared.warnings().to_vec();
        // The post callbacks: the transition stands whatever they do.
        for call in calls.post() {
            match self.call(
                &k,
                &mut engine,
                &prepared,
                &call,
                Instant::now() + CALLBACK_GRACE,
            ) {
                Ok(run) => runs.push(run),
                Err(e) => {
                    tracing::warn!(patch = call.patch, callback = %call.kind, "{e}");
                    warnings.push(format!("{} {} did not finish: {e}", call.patch, call.kind));
                }
            }
        }
        let outcome = Outcome {
            committed: done.value,
            prepare_ms,
            pause_us,
            attempts,
            waited_ms: if attempts > 1 {
                first.elapsed().as_secs_f64() * 1e3
            } else {
                0.0
            },
            warnings,
            callbacks: runs,
        };
        let reply = finish(&mut engine, outcome);
        self.publish(&engine);
        reply
    }

    /// Runs one callback in the guest through the call gate and waits for
    /// its result until `deadline`. The guest runs throughout except for
    /// the short pause that sends it.
    fn call(
        &self,
        k: &CachedKernel,
        engine: &mut Engine,
        prepared: &Prepared,
        call: &Call,
        deadline: Instant,
    ) -> Result<CallbackRun, ControlError> {
        let start = Instant::now();
        let armed = self
            .paused(|vm| {
                let armed = engine.arm_call(&k.kernel, vm, prepared, call)?;
                if !vm.raise_vector(armed.vcpu, IRQ_WORK_VECTOR)? {
                    tracing::warn!("the local APIC did not take the call gate's interrupt now");
                }
                Ok(armed)
            })?
            .value;
        let bell = self.vm.doorbell();
        loop {
            let seen = bell.rings();
            let progress = engine.poll_call(&*self.vm, &armed)?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            if let Progress::Done(ret) = progress {
                // pre_patch returns an int: the low half of rax.
                let ret = call.kind.returns().then_some(ret as u32 as i32);
                tracing::info!(patch = call.patch, callback = %call.kind, ?ret, ms, seq = armed.seq, "klp callback ran");
                return Ok(CallbackRun {
                    patch: call.patch.clone(),
                    callback: call.kind,
                    object: Hex(call.object),
                    ret,
                    ms,
                    done: true,
                });
            }
            if Instant::now() >= deadline {
                return Err(ControlError::CallbackTimeout {
                    patch: call.patch.clone(),
                    callback: call.kind,
                    ms: ms as u64,
                    progress: progress.describe(armed.cpu),
                    cancelled: String::new(),
                });
            }
            bell.wait_past(seen, deadline);
        }
    }

    /// Abandons a transition whose pre callbacks ran (some of them): runs
    /// the callbacks that cancel the passed ones, as klp does, then takes
    /// back a loaded patch: its pages are restored byte for byte if its
    /// code surely no longer runs and the guest did not change them, else
    /// retired (kept mapped until no stack references them). Returns the
    /// error to report.
    fn abandon(
        &self,
        k: &CachedKernel,
        engine: &mut Engine,
        prepared: Prepared,
        loaded: Option<Plan>,
        passed: &[Call],
        stop: Stop,
    ) -> ControlError {
        let mut clean = !matches!(stop, Stop::Failed(ControlError::CallbackTimeout { .. }));
        let mut ran = Vec::new();
        for c in Calls::cancel(passed) {
            match self.call(k, engine, &prepared, &c, Instant::now() + CALLBACK_GRACE) {
                Ok(_) => ran.push(format!("{} {}", c.patch, c.kind)),
                Err(e) => {
                    clean = false;
                    tracing::warn!(patch = c.patch, callback = %c.kind, "cancelling: {e}");
                    ran.push(format!("{} {} (did not finish)", c.patch, c.kind));
                }
            }
        }
        if let Some(undo) = loaded {
            let restored = clean
                && self
                    .paused(|vm| Ok(undo.commit(vm).map_err(EngineError::from)?))
                    .map_err(|e| tracing::info!("keeping the abandoned patch's pages: {e}"))
                    .is_ok();
            if !restored {
                engine.retire_load(prepared);
            }
        }
        self.publish(engine);
        let cancelled = if ran.is_empty() {
            String::new()
        } else {
            format!("; ran {} to cancel", ran.join(", "))
        };
        match stop {
            Stop::Refused(run) => ControlError::Refused {
                patch: run.patch,
                callback: run.callback,
                ret: run.ret.unwrap_or(0),
                errno: errno_name(run.ret.unwrap_or(0)),
                cancelled,
            },
            Stop::Failed(ControlError::CallbackTimeout {
                patch,
                callback,
                ms,
                progress,
                ..
            }) => ControlError::CallbackTimeout {
                patch,
                callback,
                ms,
                progress,
                cancelled,
            },
            Stop::Failed(e) => e,
        }
    }

    /// A transition of one patch (apply, disable, enable).
    fn transition(
        &self,
        action: &str,
        t: Transition,
        prepare: impl Fn(&mut Engine, &Kernel) -> Result<Prepared, EngineError>,
    ) -> Result<TransitionReply, ControlError> {
        self.run_transition(action, t, prepare, |engine, o| {
            let patch = engine
                .record_pause(&o.committed.name, o.pause_us)
                .or(o.committed.patch)
                .ok_or_else(|| {
                    ControlError::Engine(EngineError::Introspect(
                        "the committed patch vanished".into(),
                    ))
                })?;
            Ok(TransitionReply {
                patch,
                prepare_ms: o.prepare_ms,
                pause_us: o.pause_us,
                bytes_written: o.committed.bytes_written,
                warnings: o.warnings,
                attempts: o.attempts,
                waited_ms: o.waited_ms,
                callbacks: o.callbacks,
            })
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
                e.prepare_rollback(k, &*self.vm, Some(target.get()), t.force)
            },
            |engine, o| {
                Ok(RollbackReply {
                    to: target.get(),
                    seq: o.committed.seq,
                    patches: engine.list(),
                    prepare_ms: o.prepare_ms,
                    pause_us: o.pause_us,
                    bytes_written: o.committed.bytes_written,
                    attempts: o.attempts,
                    waited_ms: o.waited_ms,
                    callbacks: o.callbacks,
                    warnings: o.warnings,
                })
            },
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
        tracing::info!(signature, "patch signature checked");
        self.transition("apply", t, |e, k| {
            let mut p = e.prepare_apply(k, &*self.vm, checked.module, t.force)?;
            p.set_signature(signature.clone());
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
            e.prepare_enable(k, &*self.vm, name, t.force)
        })
    }

    /// Forgets a disabled or replaced patch. Its arena space is freed in
    /// a short pause if no task's stack references its code, else by a
    /// later transition's pause once none does.
    pub fn remove(&self, name: &str) -> Result<PatchInfo, ControlError> {
        let (_changing, mut engine) = self.engine_for_change()?;
        let info = engine.remove(name)?;
        if let Some(k) = self.cached() {
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

    #[test]
    fn kernel_view_backoff_doubles_to_a_cap_and_resets_on_success() {
        let mut b = FillBackoff::default();
        assert_eq!(b.wait(), None, "nothing failed yet: build at once");
        assert_eq!(b.failed(), FILL_RETRY_BASE * 2);
        assert!(b.wait().is_some_and(|w| w <= FILL_RETRY_BASE * 2));
        assert_eq!(b.failed(), FILL_RETRY_BASE * 4);
        for _ in 0..10 {
            b.failed();
        }
        assert_eq!(b.failed(), FILL_BACKOFF_MAX);
        assert!(b.wait().is_some_and(|w| w <= FILL_BACKOFF_MAX));
        b.succeeded();
        assert_eq!(b.wait(), None);
        assert_eq!(b.failed(), FILL_RETRY_BASE * 2);
    }
}

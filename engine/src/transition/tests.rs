//! The lifecycle on a fake host (the flat fake guest memory, a clock that
//! only moves when the lifecycle sleeps or waits) and a scripted patcher:
//! klp's refusal, timeout and cancel orders, without KVM or a guest kernel.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use klpvisor_guest::paging::test_support::FakePhys;

use super::*;
use crate::callback::Kind;
use crate::link::LinkedCallbacks;
use crate::safepoint::Seen;

/// The host's error: what the VMM's would carry, in miniature.
#[derive(Debug)]
enum TestError {
    Engine(EngineError),
    Transition(TransitionError),
}

impl From<EngineError> for TestError {
    fn from(e: EngineError) -> Self {
        Self::Engine(e)
    }
}

impl From<TransitionError> for TestError {
    fn from(e: TransitionError) -> Self {
        Self::Transition(e)
    }
}

impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Engine(e) => e.fmt(f),
            Self::Transition(e) => e.fmt(f),
        }
    }
}

/// One event, host's or patcher's, in the order it happened.
type Log = RefCell<Vec<String>>;

struct FakeHost<'l> {
    guest: FakePhys,
    base: Instant,
    clock: Cell<Duration>,
    user_paused: bool,
    /// The host cannot run code in the guest (as QEMU).
    no_calls: bool,
    log: &'l Log,
    waits: RefCell<Vec<u32>>,
}

impl<'l> FakeHost<'l> {
    fn new(log: &'l Log) -> Self {
        Self {
            guest: FakePhys::new(0x1000),
            base: Instant::now(),
            clock: Cell::new(Duration::ZERO),
            user_paused: false,
            no_calls: false,
            log,
            waits: RefCell::new(Vec::new()),
        }
    }

    fn elapsed(&self) -> Duration {
        self.clock.get()
    }
}

impl Host for FakeHost<'_> {
    type Guest = FakePhys;
    type Error = TestError;

    fn paused<T>(
        &self,
        f: impl FnOnce(&FakePhys) -> T,
    ) -> Result<(T, Option<Duration>), TestError> {
        let v = f(&self.guest);
        Ok((v, Some(Duration::from_micros(10))))
    }
    fn is_paused(&self) -> bool {
        self.user_paused
    }
    fn guest(&self) -> &FakePhys {
        &self.guest
    }
    fn raise_vector(&self, vcpu: usize, vector: u8) -> Result<bool, TestError> {
        self.log
            .borrow_mut()
            .push(format!("irq {vector:#x} on vcpu {vcpu}"));
        Ok(true)
    }
    fn doorbell_rings(&self) -> u64 {
        0
    }
    fn can_call_guest(&self) -> bool {
        !self.no_calls
    }
    fn no_guest_calls_reason(&self) -> String {
        "a test host without interrupts".into()
    }
    fn wait_doorbell(&self, _seen: u64, deadline: Instant) {
        // Nothing rings: the wait lasts until the deadline.
        self.clock
            .set(self.clock.get().max(deadline.duration_since(self.base)));
    }
    fn now(&self) -> Instant {
        self.base + self.clock.get()
    }
    fn sleep(&self, d: Duration) {
        self.log
            .borrow_mut()
            .push(format!("sleep {}", d.as_millis()));
        self.clock.set(self.clock.get() + d);
    }
    fn begun(&self, patch: &str) {
        self.log.borrow_mut().push(format!("begun {patch}"));
    }
    fn waiting(&self, attempts: u32, _waited: Duration, blockers: &[Blocker]) {
        assert_eq!(blockers.len(), 1);
        self.waits.borrow_mut().push(attempts);
    }
}

/// What a scripted callback does.
#[derive(Clone, Copy)]
enum Script {
    Returns(u64),
    /// Starts and never returns.
    Hangs,
    /// Never starts (a starved workqueue).
    NeverStarts,
    /// Runs for as many polls as `FakePatcher::slow_polls` says, then
    /// returns 0.
    Slow,
}

struct FakePlan {
    calls: Calls,
    loads: bool,
    warnings: Vec<String>,
    needs_percpu: bool,
    /// Module objects: needs the hooks on the guest's module loads.
    needs_hooks: bool,
    /// Functions still to register with the guest's ftrace.
    wants_ops: bool,
    /// A traced function this plan could only redirect by a jmp.
    traced_jump: bool,
}

impl Planned for FakePlan {
    fn name(&self) -> &str {
        "new"
    }
    fn warnings(&self) -> &[String] {
        &self.warnings
    }
    fn calls(&self) -> &Calls {
        &self.calls
    }
    fn loads(&self) -> bool {
        self.loads
    }
    fn needs_percpu(&self) -> bool {
        self.needs_percpu
    }
    fn needs_hooks(&self) -> bool {
        self.needs_hooks
    }
    fn wants_ops(&self) -> bool {
        self.wants_ops
    }
    fn usable(&self) -> Result<(), EngineError> {
        if self.traced_jump {
            Err(EngineError::TracedEntry("f".into()))
        } else {
            Ok(())
        }
    }
}

/// The fake patcher's ftrace redirects, as the engine keeps them.
#[derive(Default)]
struct FakeOps {
    /// Functions the plan redirects that have no registered ops.
    unregistered: u32,
    /// What `register_ftrace_function` returns.
    register_ret: u64,
    /// Steps sent, in order.
    steps: Vec<&'static str>,
    /// Registered ops no patch redirects (to let go).
    unheld: u32,
    /// The function is traced in the guest.
    traced: bool,
    /// No kworker ever starts the filter step.
    filter_starved: bool,
    /// The register step runs a long while (`FakePatcher::slow_polls`).
    register_slow: bool,
}

/// Where the fake per-CPU allocator and free are "called".
const ALLOC: u64 = 0xa110c;
const FREE: u64 = 0xf7ee;

/// The fake patcher's per-CPU blocks, as the engine keeps them.
#[derive(Default)]
struct FakePercpu {
    /// The patch has per-CPU data; the guest's allocator returns this.
    returns: Option<u64>,
    /// Allocated for the apply under way.
    pending: Option<u64>,
    /// Owned by a committed or retired patch.
    kept: Option<u64>,
    /// Queued to be freed.
    free: Vec<u64>,
}

struct FakePatcher<'l> {
    calls: Calls,
    gate: bool,
    /// Callback address -> what it does (unscripted ones return 0).
    script: HashMap<u64, Script>,
    /// Commits refused for want of a safe point before one succeeds
    /// (`u32::MAX`: never).
    blocked: Cell<u32>,
    /// Polls a `Script::Slow` call still runs for.
    slow_polls: Cell<u32>,
    armed: RefCell<Vec<(u64, Kind)>>,
    /// Arms refused as busy (the guest's klp holds its mutex) before one
    /// succeeds.
    busy_arms: Cell<u32>,
    /// The guest's klp is shown a patch (set by a call, cleared by
    /// `end_calls`).
    shown: Cell<bool>,
    /// Sends klp's notices to the guest's kernel log.
    logs: bool,
    /// A fake signal makes the sleeper leave: the next commit succeeds.
    nudge_unblocks: bool,
    percpu: FakePercpu,
    /// The patch has module objects (see `FakePlan::needs_hooks`).
    module_objects: bool,
    ops: FakeOps,
    log: FakeSwitchLog,
    steps_log: &'l Log,
}

/// The fake patcher's switch log.
#[derive(Default)]
struct FakeSwitchLog {
    /// The guest can have one.
    supported: bool,
    /// Its pages are in the arena.
    installed: bool,
    /// Registered with the guest's tracepoint.
    registered: bool,
    /// Given up on (a registration or unregistration failed).
    off: bool,
    /// What `tracepoint_probe_register` returns.
    register_ret: u64,
}

impl<'l> FakePatcher<'l> {
    fn new(log: &'l Log, calls: Calls) -> Self {
        Self {
            calls,
            gate: false,
            script: HashMap::new(),
            blocked: Cell::new(0),
            slow_polls: Cell::new(0),
            armed: RefCell::new(Vec::new()),
            busy_arms: Cell::new(0),
            shown: Cell::new(false),
            logs: false,
            nudge_unblocks: false,
            percpu: FakePercpu::default(),
            module_objects: false,
            ops: FakeOps::default(),
            log: FakeSwitchLog::default(),
            steps_log: log,
        }
    }

    fn push(&self, s: String) {
        self.steps_log.borrow_mut().push(s);
    }
}

impl Patcher<FakePhys> for FakePatcher<'_> {
    type Prepared = FakePlan;
    type Undo = ();

    fn prepare(&mut self) -> Result<FakePlan, EngineError> {
        self.push("prepare".into());
        Ok(FakePlan {
            calls: self.calls.clone(),
            loads: true,
            warnings: Vec::new(),
            needs_percpu: self.percpu.returns.is_some()
                && self.percpu.pending.is_none()
                && self.percpu.kept.is_none(),
            needs_hooks: self.module_objects,
            wants_ops: self.ops.unregistered > 0,
            traced_jump: self.ops.traced && self.ops.unregistered > 0,
        })
    }
    fn has_gate(&self) -> bool {
        self.gate
    }
    fn install_gate(&mut self, _guest: &FakePhys) -> Result<(), EngineError> {
        self.push("install gate".into());
        self.gate = true;
        Ok(())
    }
    fn load(&mut self, _p: &mut FakePlan, _guest: &FakePhys) -> Result<(), EngineError> {
        self.push("load".into());
        Ok(())
    }
    fn unload(&mut self, _undo: (), _guest: &FakePhys) -> Result<(), EngineError> {
        self.push("unload".into());
        Ok(())
    }
    fn retire_load(&mut self, _p: FakePlan) {
        self.push("retire".into());
        self.percpu.kept = self.percpu.pending.take().or(self.percpu.kept);
    }
    fn arm_percpu_alloc(
        &mut self,
        p: &FakePlan,
        _guest: &FakePhys,
    ) -> Result<Option<Armed>, EngineError> {
        if !p.needs_percpu {
            return Ok(None);
        }
        self.push("alloc percpu".into());
        self.script.insert(
            ALLOC,
            Script::Returns(self.percpu.returns.unwrap_or_default()),
        );
        let mut armed = self.armed.borrow_mut();
        armed.push((ALLOC, Kind::PrePatch));
        Ok(Some(Armed {
            seq: armed.len() as u64,
            vcpu: 0,
            cpu: 0,
        }))
    }
    fn percpu_allocated(&mut self, _p: &FakePlan, ret: u64) -> Result<(), EngineError> {
        if ret == 0 {
            return Err(crate::engine::PercpuError::NoMemory {
                patch: "new".into(),
                size: 8,
                align: 8,
            }
            .into());
        }
        self.percpu.pending = Some(ret);
        Ok(())
    }
    fn abandon_percpu(&mut self) {
        self.percpu.free.extend(self.percpu.pending.take());
    }
    fn percpu_frees(&self) -> usize {
        self.percpu.free.len()
    }
    fn arm_percpu_free(
        &mut self,
        _guest: &FakePhys,
    ) -> Result<Option<(Armed, String)>, EngineError> {
        if self.percpu.free.is_empty() {
            return Ok(None);
        }
        let ptr = self.percpu.free.remove(0);
        self.push(format!("free percpu {ptr:#x}"));
        let mut armed = self.armed.borrow_mut();
        armed.push((FREE, Kind::PostUnpatch));
        Ok(Some((
            Armed {
                seq: armed.len() as u64,
                vcpu: 0,
                cpu: 0,
            },
            "new".into(),
        )))
    }
    fn switch_log_wanted(&self) -> bool {
        self.log.supported && self.gate && !self.log.registered && !self.log.off
    }
    fn switch_log_installed(&self) -> bool {
        self.log.installed
    }
    fn switch_log_registered(&self) -> bool {
        self.log.registered
    }
    fn arm_switch_log(&mut self, _guest: &FakePhys) -> Result<Option<Armed>, EngineError> {
        if !self.switch_log_wanted() {
            return Ok(None);
        }
        if !self.log.installed {
            self.push("install switch log".into());
            self.log.installed = true;
        }
        self.push("switch log register".into());
        self.script
            .insert(0x5c4, Script::Returns(self.log.register_ret));
        let mut armed = self.armed.borrow_mut();
        armed.push((0x5c4, Kind::PrePatch));
        Ok(Some(Armed {
            seq: armed.len() as u64,
            vcpu: 0,
            cpu: 0,
        }))
    }
    fn switch_log_done(&mut self, ret: Option<u64>) {
        self.log.registered = ret == Some(0);
        self.log.off = !self.log.registered;
    }
    fn arm_switch_log_release(&mut self, _guest: &FakePhys) -> Result<Option<Armed>, EngineError> {
        if !self.log.registered {
            return Ok(None);
        }
        self.push("switch log unregister".into());
        self.script.insert(0x5c5, Script::Returns(0));
        let mut armed = self.armed.borrow_mut();
        armed.push((0x5c5, Kind::PostUnpatch));
        Ok(Some(Armed {
            seq: armed.len() as u64,
            vcpu: 0,
            cpu: 0,
        }))
    }
    fn switch_log_released(&mut self, ret: Option<u64>) {
        self.log.registered = false;
        self.log.off = ret != Some(0);
    }
    fn install_ops(&mut self, _p: &FakePlan, _guest: &FakePhys) -> Result<(), EngineError> {
        self.push("install ops".into());
        Ok(())
    }
    fn arm_ops(&mut self, p: &FakePlan, _guest: &FakePhys) -> Result<Option<Armed>, EngineError> {
        if !p.wants_ops || self.ops.unregistered == 0 {
            return Ok(None);
        }
        let step = if self.ops.steps.last() == Some(&"filter") {
            "register"
        } else {
            "filter"
        };
        self.ops.steps.push(step);
        self.push(format!("ops {step}"));
        let ret = if step == "register" {
            self.ops.register_ret
        } else {
            0
        };
        let script = if step == "filter" && self.ops.filter_starved {
            Script::NeverStarts
        } else if step == "register" && self.ops.register_slow {
            Script::Slow
        } else {
            Script::Returns(ret)
        };
        self.script.insert(0x0f5, script);
        let mut armed = self.armed.borrow_mut();
        armed.push((0x0f5, Kind::PrePatch));
        Ok(Some(Armed {
            seq: armed.len() as u64,
            vcpu: 0,
            cpu: 0,
        }))
    }
    fn ops_done(&mut self, ret: u64) -> Result<(), EngineError> {
        let step = self.ops.steps.last().copied().unwrap_or_default();
        if ret != 0 {
            // Its filter was set: that slot waits to be let go.
            self.ops.unheld += 1;
            self.ops.unregistered = 0;
            return Err(crate::ftrace_ops::OpsError::Refused {
                func: "f".into(),
                step: "register_ftrace_function",
                ret: ret as u32 as i32,
                errno: errno_name(ret as u32 as i32),
                why: "",
            }
            .into());
        }
        match step {
            "register" => self.ops.unregistered -= 1,
            "free filter" => self.ops.unheld -= 1,
            _ => {}
        }
        Ok(())
    }
    fn ops_releases(&self) -> usize {
        self.ops.unheld as usize
    }
    fn ops_unreachable(&mut self, _p: &FakePlan) {
        self.push("ops unreachable".into());
        self.ops.unregistered = 0;
    }
    fn arm_ops_release(
        &mut self,
        _guest: &FakePhys,
    ) -> Result<Option<(Armed, String)>, EngineError> {
        if self.ops.unheld == 0 {
            return Ok(None);
        }
        let step = if self.ops.steps.last() == Some(&"unregister") {
            "free filter"
        } else {
            "unregister"
        };
        self.ops.steps.push(step);
        self.push(format!("ops {step}"));
        let mut armed = self.armed.borrow_mut();
        armed.push((0x0f6, Kind::PostUnpatch));
        Ok(Some((
            Armed {
                seq: armed.len() as u64,
                vcpu: 0,
                cpu: 0,
            },
            "unregister_ftrace_function of f".into(),
        )))
    }
    fn arm_call(
        &mut self,
        _p: &FakePlan,
        _guest: &FakePhys,
        call: &Call,
    ) -> Result<Armed, EngineError> {
        if self.busy_arms.get() > 0 {
            self.busy_arms.set(self.busy_arms.get() - 1);
            return Err(crate::register::RegisterError::KlpBusy("klp_mutex is held").into());
        }
        self.shown.set(true);
        self.push(format!(
            "call {} {} {:#x}",
            call.patch, call.kind, call.object
        ));
        let func = call.func.unwrap_or_default();
        let mut armed = self.armed.borrow_mut();
        armed.push((func, call.kind));
        Ok(Armed {
            seq: armed.len() as u64,
            vcpu: 0,
            cpu: 0,
        })
    }
    fn poll_call(&self, _guest: &FakePhys, armed: &Armed) -> Result<Progress, EngineError> {
        let i = usize::try_from(armed.seq - 1).unwrap_or_default();
        let (func, _) = self.armed.borrow()[i];
        Ok(
            match self
                .script
                .get(&func)
                .copied()
                .unwrap_or(Script::Returns(0))
            {
                Script::Returns(v) => Progress::Done(v),
                Script::Hangs => Progress::Running,
                Script::NeverStarts => Progress::Queued,
                Script::Slow if self.slow_polls.get() > 0 => {
                    self.slow_polls.set(self.slow_polls.get() - 1);
                    Progress::Running
                }
                Script::Slow => Progress::Done(0),
            },
        )
    }
    fn end_calls(&mut self, _guest: &FakePhys) -> Result<(), EngineError> {
        self.push("end calls".into());
        self.shown.set(false);
        Ok(())
    }
    fn klp_shown(&self) -> bool {
        self.shown.get()
    }
    fn logs(&self) -> bool {
        self.logs
    }
    fn arm_log(&mut self, _guest: &FakePhys, line: &str) -> Result<Option<Armed>, EngineError> {
        self.push(format!("log {line}"));
        let mut armed = self.armed.borrow_mut();
        armed.push((0, Kind::PostPatch));
        Ok(Some(Armed {
            seq: armed.len() as u64,
            vcpu: 0,
            cpu: 0,
        }))
    }
    fn arm_nudge(&mut self, _guest: &FakePhys, pid: i32) -> Result<Option<Armed>, EngineError> {
        self.push(format!("nudge {pid}"));
        if self.nudge_unblocks {
            self.blocked.set(0);
        }
        let mut armed = self.armed.borrow_mut();
        armed.push((0, Kind::PostPatch));
        Ok(Some(Armed {
            seq: armed.len() as u64,
            vcpu: 0,
            cpu: 0,
        }))
    }
    fn commit(&mut self, _p: &FakePlan, _guest: &FakePhys) -> Result<Committed, EngineError> {
        let left = self.blocked.get();
        if left > 0 {
            if left != u32::MAX {
                self.blocked.set(left - 1);
            }
            return Err(EngineError::Blocked(vec![Blocker {
                pid: 42,
                comm: "sleeper".into(),
                func: "f".into(),
                addr: 0xffff_ffff_8100_1000,
                seen: Seen::Frame { depth: 0 },
            }]));
        }
        self.push("commit".into());
        self.percpu.kept = self.percpu.pending.take().or(self.percpu.kept);
        Ok(Committed {
            name: "new".into(),
            seq: 1,
            patch: None,
            bytes_written: 5,
            pause_tasks: 0,
        })
    }
}

/// An object at `object` with the callbacks named by `set` (pre_patch,
/// post_patch, pre_unpatch, post_unpatch), each at `object + 0x100 * n`.
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

fn timeout(secs: u64) -> Transition {
    Transition {
        force: false,
        timeout: Duration::from_secs(secs),
    }
}

/// The log without the interrupts (one per call).
fn steps(log: &Log) -> Vec<String> {
    log.borrow()
        .iter()
        .filter(|s| !s.starts_with("irq "))
        .cloned()
        .collect()
}

#[test]
fn callbacks_run_in_klps_order_around_a_switch_retried_until_a_safe_point() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [true; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.blocked.set(2);
    // The guest's klp is busy at the first call: it is sent a moment later.
    p.busy_arms.set(1);
    let o = run(&host, &mut p, "apply", timeout(10)).unwrap();
    assert_eq!(
        steps(&log),
        [
            "prepare",
            "install gate",
            "prepare",
            "begun new",
            "load",
            "sleep 1",
            "call new pre_patch 0x1000",
            "sleep 1",
            "sleep 2",
            "commit",
            "call new post_patch 0x1000",
            // What the guest's klp was shown goes once the last callback ran.
            "end calls",
        ]
    );
    assert_eq!(o.attempts, 3);
    assert_eq!(*host.waits.borrow(), [1, 2]);
    // The busy call's millisecond counts too: the whole wait since begun.
    assert!((o.waited_ms - 4.0).abs() < 1e-6, "{}", o.waited_ms);
    let ran: Vec<_> = o.callbacks.iter().map(|c| (c.callback, c.ret)).collect();
    assert_eq!(
        ran,
        [(Kind::PrePatch, Some(0)), (Kind::PostPatch, None)],
        "only pre_patch returns a value"
    );
}

#[test]
fn a_pre_patch_refusal_abandons_the_transition_and_unloads_the_patch() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [true; 4]), cbs(0x2000, [true; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    // -16: -EBUSY, as an int in rax's low half.
    p.script
        .insert(0x2100, Script::Returns(u64::from((-16i32) as u32)));
    let e = run(&host, &mut p, "apply", timeout(10)).unwrap_err();
    assert!(matches!(
        e,
        TestError::Transition(TransitionError::Refused { ret: -16, .. })
    ));
    assert_eq!(
        e.to_string(),
        "new: pre_patch returned -16 (-EBUSY): klp refuses a patch whose pre_patch fails, so \
         the transition was abandoned and no function was redirected; ran new post_unpatch to \
         cancel"
    );
    let s = steps(&log);
    assert_eq!(
        s[3..],
        [
            "begun new",
            "load",
            "call new pre_patch 0x1000",
            "call new pre_patch 0x2000",
            "call new post_unpatch 0x1000",
            "end calls",
            "unload",
        ],
        "the refusing object's own post_unpatch does not run; nothing is committed; the \
         guest's klp no longer lists the patch when its pages go"
    );
}

#[test]
fn an_abandoned_transition_cancels_each_patch_in_object_order_the_last_patch_first() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    // As a rollback can: disable "old" and enable "new" in one transition.
    calls.disable("old", &[cbs(0x1000, [true; 4])]);
    calls.enable(
        "new",
        &[
            cbs(0x2000, [true; 4]),
            // No pre_patch: it passes its pre step, and so is cancelled.
            cbs(0x3000, [false, true, false, true]),
            cbs(0x4000, [true; 4]),
        ],
    );
    let mut p = FakePatcher::new(&log, calls);
    p.script
        .insert(0x4100, Script::Returns(u64::from((-22i32) as u32)));
    let e = run(&host, &mut p, "rollback", timeout(10)).unwrap_err();
    assert!(e.to_string().contains("returned -22 (-EINVAL)"));
    assert!(
        e.to_string()
            .ends_with("; ran new post_unpatch, new post_unpatch, old post_patch to cancel"),
        "{e}"
    );
    let cancels: Vec<String> = steps(&log)
        .into_iter()
        .skip_while(|s| s != "call new pre_patch 0x4000")
        .skip(1)
        .collect();
    assert_eq!(
        cancels,
        [
            "call new post_unpatch 0x2000",
            "call new post_unpatch 0x3000",
            "call old post_patch 0x1000",
            "end calls",
            "unload",
        ],
        "klp_cancel_transition's order: klp_complete_transition walks the patch's objects \
         in order; the patch started last is cancelled first"
    );
}

#[test]
fn no_safe_point_within_the_timeout_cancels_the_pre_callbacks_and_reports_the_blockers() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [true; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.blocked.set(u32::MAX);
    let e = run(&host, &mut p, "apply", timeout(1)).unwrap_err();
    assert!(
        matches!(&e, TestError::Engine(EngineError::Blocked(b)) if b[0].pid == 42),
        "{e}"
    );
    assert!(e.to_string().contains("sleeper"), "{e}");
    // Backoff 1, 2, 4 ... 64 ms, then 100 ms steps, and no sleep that
    // would end past the deadline.
    let sleeps: Vec<u128> = log
        .borrow()
        .iter()
        .filter_map(|s| s.strip_prefix("sleep ")?.parse().ok())
        .collect();
    assert_eq!(sleeps[..8], [1, 2, 4, 8, 16, 32, 64, 100]);
    assert!(sleeps[8..].iter().all(|&s| s == 100));
    assert!(host.elapsed() <= Duration::from_secs(1));
    assert!(host.elapsed() + BACKOFF_MAX >= Duration::from_secs(1));
    assert_eq!(host.waits.borrow().len(), sleeps.len());
    assert_eq!(
        steps(&log)
            .into_iter()
            .filter(|s| !s.starts_with("sleep"))
            .skip(3)
            .collect::<Vec<_>>(),
        [
            "begun new",
            "load",
            "call new pre_patch 0x1000",
            "call new post_unpatch 0x1000",
            "end calls",
            "unload",
        ]
    );
}

#[test]
fn a_pre_patch_that_outlives_the_timeout_is_abandoned_and_its_pages_kept() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [true; 4]), cbs(0x2000, [true; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.script.insert(0x2100, Script::Hangs);
    let e = run(&host, &mut p, "apply", timeout(1)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "new: pre_patch did not finish within 1000 ms (the callback started and has not \
         returned); the transition was abandoned and no function was redirected; ran new \
         post_unpatch to cancel"
    );
    let s = steps(&log);
    assert_eq!(
        s[s.len() - 3..],
        ["call new post_unpatch 0x1000", "end calls", "retire"],
        "the hung callback may still run the patch's code: its pages stay mapped"
    );
}

#[test]
fn a_post_callback_that_does_not_finish_leaves_the_transition_standing_with_a_warning() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [true; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.script.insert(0x1200, Script::Hangs);
    let o = run(&host, &mut p, "apply", timeout(10)).unwrap();
    assert_eq!(o.committed.name, "new");
    assert_eq!(o.warnings.len(), 1);
    assert!(
        o.warnings[0].starts_with(
            "new post_patch did not finish: new: post_patch did not finish within 2000 ms"
        ),
        "{}",
        o.warnings[0]
    );
}

#[test]
fn callbacks_cannot_run_while_a_user_holds_the_vm_paused() {
    let log = Log::default();
    let mut host = FakeHost::new(&log);
    host.user_paused = true;
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [true; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    let e = run(&host, &mut p, "apply", timeout(10)).unwrap_err();
    assert!(matches!(
        e,
        TestError::Transition(TransitionError::PausedForCallbacks)
    ));
    assert_eq!(steps(&log), ["prepare"], "nothing sent, nothing written");
}

#[test]
fn errno_names_are_linuxs() {
    assert_eq!(errno_name(-16), " (-EBUSY)");
    assert_eq!(errno_name(-95), " (-EOPNOTSUPP)");
    assert_eq!(errno_name(-1000), "");
    assert_eq!(errno_name(1), "");
}

#[test]
fn klps_notice_goes_to_the_guest_log_once_the_transition_is_complete() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [false; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.logs = true;
    run(&host, &mut p, "apply", timeout(10)).unwrap();
    // No callbacks: the gate is installed for the log alone, once the
    // transition committed (one that fails writes nothing).
    assert_eq!(
        steps(&log),
        [
            "prepare",
            "begun new",
            "load",
            "commit",
            "install gate",
            "log 'new': patching complete",
        ]
    );
    // Nothing while a user holds the VM paused.
    let log = Log::default();
    let mut host = FakeHost::new(&log);
    host.user_paused = true;
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [false; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.logs = true;
    run(&host, &mut p, "apply", timeout(10)).unwrap();
    assert!(!steps(&log)
        .iter()
        .any(|s| s.starts_with("log ") || s == "install gate"));
}

#[test]
fn a_sleeper_that_blocks_past_the_grace_period_gets_klps_fake_signal_once() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.nudge_unblocks = true;
    p.blocked.set(u32::MAX);
    let o = run(&host, &mut p, "apply", timeout(10)).unwrap();
    assert_eq!(o.nudged, 1);
    assert!(o.attempts > 1);
    assert!(host.elapsed() >= NUDGE_AFTER, "{:?}", host.elapsed());
    assert!(host.elapsed() < NUDGE_AFTER + BACKOFF_MAX * 2 + CALLBACK_GRACE);
    let nudges: Vec<String> = steps(&log)
        .into_iter()
        .filter(|s| s.starts_with("nudge"))
        .collect();
    assert_eq!(nudges, ["nudge 42"]);
    // The commit came right after the fake signal.
    let s = steps(&log);
    let at = s.iter().position(|s| s == "nudge 42").unwrap();
    assert_eq!(
        s[at + 1..]
            .iter()
            .find(|s| !s.starts_with("irq"))
            .map(String::as_str),
        Some("commit")
    );
}

#[test]
fn a_sleeper_that_stays_is_signalled_once_and_the_transition_still_times_out() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.blocked.set(u32::MAX);
    let e = run(&host, &mut p, "apply", timeout(10)).unwrap_err();
    assert!(
        matches!(&e, TestError::Engine(EngineError::Blocked(_))),
        "{e}"
    );
    let nudges = steps(&log)
        .iter()
        .filter(|s| s.starts_with("nudge"))
        .count();
    assert_eq!(
        nudges, 1,
        "klp signals a blocking task once per grace period"
    );
}

#[test]
fn no_fake_signal_before_the_grace_period_or_without_a_gate() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.blocked.set(u32::MAX);
    // A timeout shorter than the grace period: refused, never signalled.
    assert!(run(&host, &mut p, "apply", timeout(2)).is_err());
    assert!(!steps(&log).iter().any(|s| s.starts_with("nudge")));
    // No gate: nothing can carry the signal.
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.blocked.set(u32::MAX);
    assert!(run(&host, &mut p, "apply", timeout(10)).is_err());
    assert!(!steps(&log).iter().any(|s| s.starts_with("nudge")));
}

#[test]
fn a_per_cpu_block_is_allocated_before_the_link_and_kept_by_the_committed_patch() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.percpu.returns = Some(0x3_1000);
    run(&host, &mut p, "apply", timeout(10)).unwrap();
    assert_eq!(
        steps(&log),
        [
            "prepare",
            // The allocation runs in the guest: the gate first, then the
            // plan again on the arena that has it.
            "install gate",
            "prepare",
            "alloc percpu",
            // Linked again with the block's address.
            "prepare",
            "begun new",
            "load",
            "commit",
        ]
    );
    assert_eq!(p.percpu.kept, Some(0x3_1000));
    assert!(p.percpu.free.is_empty());
}

#[test]
fn a_refused_pre_patch_frees_the_per_cpu_block_once() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [true; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.percpu.returns = Some(0x3_1000);
    p.script
        .insert(0x1100, Script::Returns(u64::from((-16i32) as u32)));
    let e = run(&host, &mut p, "apply", timeout(10)).unwrap_err();
    assert!(matches!(
        e,
        TestError::Transition(TransitionError::Refused { .. })
    ));
    let s = steps(&log);
    assert_eq!(
        s[s.len() - 3..],
        ["end calls", "unload", "free percpu 0x31000"],
        "the block goes back once the patch's pages are gone"
    );
    assert_eq!(s.iter().filter(|l| l.starts_with("free")).count(), 1);
    assert!(p.percpu.free.is_empty() && p.percpu.pending.is_none());
}

#[test]
fn a_failed_commit_frees_the_per_cpu_block_and_a_kept_load_keeps_it() {
    // No safe point within the timeout: the load is undone, the block freed.
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.percpu.returns = Some(0x3_1000);
    p.blocked.set(u32::MAX);
    run(&host, &mut p, "apply", timeout(1)).unwrap_err();
    let s = steps(&log);
    assert_eq!(s[s.len() - 2..], ["unload", "free percpu 0x31000"]);

    // A pre_patch that never returns may still run the patch's code: its
    // pages are kept, and so is its block, until the sweep frees both.
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [true; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.percpu.returns = Some(0x3_1000);
    p.script.insert(0x1100, Script::Hangs);
    run(&host, &mut p, "apply", timeout(1)).unwrap_err();
    assert_eq!(steps(&log).last().map(String::as_str), Some("retire"));
    assert_eq!(p.percpu.kept, Some(0x3_1000));
    assert!(p.percpu.free.is_empty());
}

#[test]
fn a_null_per_cpu_block_fails_the_apply_before_anything_is_loaded() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.percpu.returns = Some(0);
    let e = run(&host, &mut p, "apply", timeout(10)).unwrap_err();
    assert!(e.to_string().contains("-ENOMEM"), "{e}");
    assert_eq!(
        steps(&log),
        ["prepare", "install gate", "prepare", "alloc percpu"]
    );
}

#[test]
fn per_cpu_data_is_not_allocated_while_a_user_holds_the_vm_paused() {
    let log = Log::default();
    let mut host = FakeHost::new(&log);
    host.user_paused = true;
    let mut p = FakePatcher::new(&log, Calls::default());
    p.percpu.returns = Some(0x3_1000);
    let e = run(&host, &mut p, "apply", timeout(10)).unwrap_err();
    assert!(matches!(
        e,
        TestError::Transition(TransitionError::PausedForPercpu)
    ));
    assert_eq!(steps(&log), ["prepare"]);
}

#[test]
fn ftrace_redirects_are_registered_before_the_load_through_slots_planned_before() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.ops.unregistered = 1;
    run(&host, &mut p, "apply", timeout(10)).unwrap();
    assert_eq!(
        steps(&log),
        [
            "prepare",
            // The gate first, then the handler's and slots' pages and a
            // slot for the function, and the plan again, switching
            // through it.
            "install gate",
            "prepare",
            "install ops",
            "prepare",
            // Registered in the guest, inert until the switch, before the
            // patch's code is loaded.
            "ops filter",
            "ops register",
            "begun new",
            "load",
            "commit",
        ]
    );
}

#[test]
fn a_registration_the_guest_refuses_abandons_the_apply_and_is_let_go_at_once() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.ops.unregistered = 1;
    p.ops.register_ret = (-16i64) as u64;
    let err = run(&host, &mut p, "apply", timeout(10))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("register_ftrace_function returned -16 (-EBUSY)"),
        "{err}"
    );
    assert_eq!(
        steps(&log),
        [
            "prepare",
            "install ops",
            "prepare",
            "ops filter",
            "ops register",
            // Nothing loaded; the filter it set let go at once.
            "ops unregister",
            "ops free filter",
        ]
    );
    assert_eq!(p.ops.unheld, 0);
    // Otherwise the VMM lets them go once changes pause (release_ops),
    // one function at a time, never while the VM is held paused.
    p.ops.unheld = 2;
    assert!(release_ops(&host, &mut p, 1).is_empty());
    assert_eq!(p.ops.unheld, 1);
    let mut paused = FakeHost::new(&log);
    paused.user_paused = true;
    release_ops(&paused, &mut p, 1);
    assert_eq!(p.ops.unheld, 1, "not while the VM is held paused");
}

#[test]
fn a_traced_function_is_refused_before_anything_is_written_while_the_vm_is_held_paused() {
    let log = Log::default();
    let mut host = FakeHost::new(&log);
    host.user_paused = true;
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.ops.unregistered = 1;
    p.ops.traced = true;
    let err = run(&host, &mut p, "apply", timeout(10))
        .unwrap_err()
        .to_string();
    assert!(err.contains("traced by the guest's ftrace"), "{err}");
    assert!(err.contains("resume the VM"), "{err}");
    // No registration (nothing runs in a paused guest), no load.
    assert_eq!(steps(&log), ["prepare"]);
}

#[test]
fn a_registration_the_guest_does_not_run_in_time_falls_back_to_a_jmp() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.ops.unregistered = 1;
    p.ops.filter_starved = true;
    let o = run(&host, &mut p, "apply", timeout(10)).unwrap();
    assert_eq!(
        steps(&log),
        [
            "prepare",
            "install ops",
            "prepare",
            "ops filter",
            // Not started within OPS_GRACE: its functions get a jmp.
            "ops unreachable",
            "prepare",
            "begun new",
            "load",
            "commit",
        ]
    );
    assert!(
        o.warnings.iter().any(|w| w.contains("redirected by a jmp")),
        "{:?}",
        o.warnings
    );
    assert!(host.elapsed() >= OPS_GRACE && host.elapsed() < timeout(10).timeout);
}

#[test]
fn a_registration_that_runs_past_the_grace_is_waited_for() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.ops.unregistered = 1;
    p.ops.register_slow = true;
    // Still running when OPS_GRACE is over, done before the timeout.
    p.slow_polls.set(2);
    let o = run(&host, &mut p, "apply", timeout(30)).unwrap();
    assert_eq!(
        steps(&log),
        [
            "prepare",
            "install ops",
            "prepare",
            "ops filter",
            "ops register",
            "begun new",
            "load",
            "commit",
        ]
    );
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    assert!(host.elapsed() >= OPS_GRACE, "it ran past the grace");
}

/// The switch log is registered through the gate before the transition's
/// first safe-point check; its first registration takes arena pages, so
/// the plan is made again; a later transition registers it again without
/// that; the VMM's housekeeping lets it go.
#[test]
fn the_switch_log_is_registered_before_the_first_check_and_let_go_after() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.log.supported = true;
    run(&host, &mut p, "apply", timeout(30)).unwrap();
    assert_eq!(
        steps(&log),
        [
            "prepare",
            "install switch log",
            "switch log register",
            "prepare",
            "begun new",
            "load",
            "commit",
        ]
    );
    assert!(p.log.registered);
    // The housekeeping, once changes pause.
    log.borrow_mut().clear();
    assert!(release_switch_log(&host, &mut p).is_empty());
    assert_eq!(steps(&log), ["switch log unregister"]);
    assert!(!p.log.registered && !p.log.off);
    // The next transition registers it again; its pages are there.
    log.borrow_mut().clear();
    run(&host, &mut p, "apply", timeout(30)).unwrap();
    assert_eq!(
        steps(&log),
        [
            "prepare",
            "switch log register",
            "begun new",
            "load",
            "commit"
        ]
    );
}

/// A registration the guest refuses costs the transition nothing: it
/// commits, and the log is never tried again (every pause then reads
/// every task).
#[test]
fn a_refused_switch_log_registration_does_not_fail_the_transition() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.log.supported = true;
    p.log.register_ret = (-22i64) as u64;
    let o = run(&host, &mut p, "apply", timeout(30)).unwrap();
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    assert!(p.log.off && !p.log.registered);
    log.borrow_mut().clear();
    run(&host, &mut p, "apply", timeout(30)).unwrap();
    assert_eq!(steps(&log), ["prepare", "begun new", "load", "commit"]);
    // No gate, no log (it needs the gate to register).
    let log2 = Log::default();
    let host2 = FakeHost::new(&log2);
    let mut q = FakePatcher::new(&log2, Calls::default());
    q.log.supported = true;
    run(&host2, &mut q, "apply", timeout(30)).unwrap();
    assert!(!steps(&log2).iter().any(|s| s.contains("switch log")));
}

/// A host that cannot run code in the guest (QEMU) gets a patch without
/// callbacks redirected by jmps: no gate, no ftrace registration, no
/// switch log, no kernel-log line.
#[test]
fn a_host_without_guest_calls_patches_by_jmp_with_no_gate() {
    let log = Log::default();
    let mut host = FakeHost::new(&log);
    host.no_calls = true;
    let mut calls = Calls::default();
    calls.enable("new", &[cbs(0x1000, [false; 4])]);
    let mut p = FakePatcher::new(&log, calls);
    p.logs = true;
    p.ops.unregistered = 1;
    p.log.supported = true;
    run(&host, &mut p, "apply", timeout(10)).unwrap();
    assert_eq!(steps(&log), ["prepare", "begun new", "load", "commit"]);
    assert!(!p.gate);
    // Nor does the housekeeping call into the guest.
    assert!(release_switch_log(&host, &mut p).is_empty());
    assert!(release_ops(&host, &mut p, usize::MAX).is_empty());
    assert_eq!(steps(&log), ["prepare", "begun new", "load", "commit"]);
}

/// Callbacks, per-CPU data and module objects need the guest to run
/// klpvisor's code: on a host that cannot, the patch is refused before
/// anything is written, saying why.
#[test]
fn a_host_without_guest_calls_refuses_callbacks_per_cpu_data_and_module_objects() {
    for (what, needs) in [
        ("callbacks", "klp callbacks"),
        ("percpu", "per-CPU"),
        ("modules", "patches modules"),
    ] {
        let log = Log::default();
        let mut host = FakeHost::new(&log);
        host.no_calls = true;
        let mut calls = Calls::default();
        calls.enable("new", &[cbs(0x1000, [what == "callbacks"; 4])]);
        let mut p = FakePatcher::new(&log, calls);
        if what == "percpu" {
            p.percpu.returns = Some(0x3_1000);
        }
        p.module_objects = what == "modules";
        let e = run(&host, &mut p, "apply", timeout(10)).unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(
                e,
                TestError::Transition(TransitionError::NoGuestCalls { .. })
            ),
            "{m}"
        );
        assert!(m.contains(needs), "{m}");
        assert!(m.contains("a test host without interrupts"), "{m}");
        assert!(m.contains("nothing was written"), "{m}");
        assert_eq!(steps(&log), ["prepare"], "nothing sent, nothing written");
        assert!(!p.gate);
    }
}

/// A transition with a short timeout (a second: "tell me at once whether
/// a task blocks") still waits for a registration the guest has started,
/// up to `REGISTRATION_TIME`: its timeout bounds the wait for a safe
/// point, not the preparation, and a busy guest's slow registration must
/// not become a jmp over an entry ftrace then traces.
#[test]
fn a_short_timeout_does_not_cut_a_started_registration() {
    let log = Log::default();
    let host = FakeHost::new(&log);
    let mut p = FakePatcher::new(&log, Calls::default());
    p.gate = true;
    p.ops.unregistered = 1;
    p.ops.register_slow = true;
    p.slow_polls.set(1);
    let o = run(&host, &mut p, "apply", timeout(1)).unwrap();
    assert_eq!(
        steps(&log),
        [
            "prepare",
            "install ops",
            "prepare",
            "ops filter",
            "ops register",
            "begun new",
            "load",
            "commit",
        ]
    );
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    assert!(host.elapsed() > timeout(1).timeout && host.elapsed() <= REGISTRATION_TIME);
}

//! The engine: one guest's patches, from a module's bytes to the writes of
//! a transition and back.
//!
//! Every transition has two halves. *Prepare* runs while the guest runs and
//! only reads it: parse and link the module into arena space (on a copy of
//! the arena's state), compute with [`Stack`] what every affected function's
//! entry must do, and turn that into one [`Plan`] of writes with the bytes
//! each write expects to replace. *Commit* runs with every vCPU paused:
//! check that no task is inside a function the transition changes
//! ([`safepoint`](crate::safepoint)), check every expected byte, write, and
//! only then adopt the new stack and arena state. A transition that fails
//! anywhere leaves the guest and the engine exactly as they were.

mod coming;
mod ftrace;
mod levels;
mod livepatch;
mod load;
mod modules;

pub use coming::{in_hook, Coming, Going, ModuleEvent, Relink};

use klpvisor_guest::GuestPhys;
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::arena::{Arena, ArenaError, ImageFacts, Region};
use crate::callback::gate::{Gate, GateError, Progress};
use crate::callback::{Call, Calls};
use crate::link::{LinkedCallbacks, LinkedObject};
use crate::module::{ModuleError, State};
use crate::safepoint::{Blocker, Check, SafepointError, Span};
use crate::site::{FtraceRecords, Site, SiteError};
use crate::stack::{Change, Entry, Placed, Stack, StackError};
use crate::write::{Plan, Write, WriteError};
use klpvisor_api::{
    FuncInfo, Hex, HistoryEntry, LiveFunc, ObjectInfo, ObjectState, PatchInfo, PatchState,
    RetiredInfo,
};
use klpvisor_guest::orc::Orc;
use klpvisor_guest::retaddr::ReturnHooks;
use klpvisor_guest::Guest;
use klpvisor_guest::{all_vcpu_regs, IntrospectError, Kernel, Tasks, TasksError};

/// Who is at fault for an [`EngineError`], so a front end can pick a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The module cannot be applied to this kernel.
    Module,
    /// The request conflicts with the patches' or the guest's state.
    State,
    /// No such patch.
    NotFound,
    /// The arena is full.
    NoSpace,
    /// Reading or writing the guest failed.
    Guest,
    /// An invariant of the engine broke: a bug in klpvisor, not a problem
    /// with the guest or the patch.
    Internal,
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error("patch arena: {0}")]
    Arena(#[from] ArenaError),
    #[error("cannot patch {name}: {source}")]
    Site {
        name: String,
        source: Box<SiteError>,
    },
    #[error(
        "guest memory changed under the transition or the plan is unsafe; nothing was written: {0}"
    )]
    Write(#[from] WriteError),
    /// The guest's task list or per-CPU areas could not be read.
    #[error("reading the guest kernel failed: {0}")]
    Tasks(#[from] TasksError),
    /// The vCPUs' registers could not be read.
    #[error("reading the guest kernel failed: {0}")]
    Registers(#[from] IntrospectError),
    /// One vCPU's registers could not be read.
    #[error("reading the guest kernel failed: vCPU {vcpu} registers: {source}")]
    VcpuRegisters {
        vcpu: usize,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The kernel's release string could not be read.
    #[error("reading the guest kernel failed: cannot read init_uts_ns.name.release")]
    NoRelease,
    /// A vCPU's GS bases point at no CPU's per-CPU area.
    #[error(
        "reading the guest kernel failed: vCPU {0}'s GS bases are no CPU's per-CPU area \
         (__per_cpu_offset)"
    )]
    NoPerCpuArea(usize),
    /// An invariant of the engine broke. This is klpvisor's fault, not the
    /// guest's or the patch's; the transition was refused before writing.
    #[error(
        "internal error in klpvisor (a bug in klpvisor, not a problem with the guest or the \
         patch; nothing was written, please report it): {0}"
    )]
    Internal(String),
    #[error("safe-point check failed: {0}")]
    Safepoint(#[from] SafepointError),
    /// klp's system-state rule refuses the patch.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(
        "no safe point: {} blocker(s), tasks inside functions this transition changes or vCPUs \
         whose task cannot be told; nothing was written \
         (retry later, or --force to skip the check):\n  {}",
        .0.len(),
        .0.iter().map(|b| b.to_string()).collect::<Vec<_>>().join("\n  ")
    )]
    Blocked(Vec<Blocker>),
    #[error(
        "no transition #{to} to roll back to; `patcher history` lists the last {MAX_HISTORY} \
         (the newest is #{newest})"
    )]
    NoSuchTransition { to: u64, newest: u64 },
    #[error(transparent)]
    Gate(#[from] GateError),
    /// The patch could not be registered with the guest kernel as a module.
    #[error("registering the patch with the guest kernel: {0}")]
    Register(#[from] crate::register::RegisterError),
    /// A module the transition writes into is gone or was reloaded.
    #[error(
        "module `{0}` was unloaded or reloaded since its functions' sites were checked: its \
         text is no longer where they were; nothing was written (retry: the transition is \
         planned afresh)"
    )]
    ModuleGone(String),
    /// The guest is changing its function tracing (`ftrace_lock` held):
    /// the transition waits, like a busy module registry.
    #[error("the guest is busy: {0}; retry")]
    GuestBusy(&'static str),
    /// The guest's module list could not be read (a patch with module
    /// objects needs it).
    #[error("reading the guest kernel's modules failed: {0}")]
    Modules(#[source] klpvisor_guest::ModulesError),
    /// The hooks on the guest's module loads could not be installed (a
    /// patch with module objects needs them).
    #[error(transparent)]
    Hook(#[from] crate::hook::HookError),
    /// A loading module's objects cannot be applied: its load fails.
    #[error("module `{module}` cannot be patched by {patch} as it loads: {source}")]
    ModuleRefused {
        module: String,
        patch: String,
        #[source]
        source: Box<EngineError>,
    },
    /// A disabled patch's object could not be linked when its module
    /// loaded, so the patch cannot be enabled while it is loaded.
    #[error(
        "patch `{patch}` cannot be enabled: its object for module `{module}` could not be linked \
         when the module loaded (see its `refused` reason in `patcher list`); unload the module \
         or apply a patch that fits it"
    )]
    Unlinked { patch: String, module: String },
    /// Anti-rollback: the patch's signed level is below one applied.
    #[error(
        "patch `{patch}` is signed at level {level}, lower than level {highest} already applied \
         (by `{by}`); under --trusted-keys an older level is refused so an old fix cannot be \
         replayed over a newer one. Apply a patch signed at level {highest} or higher, or start \
         the VMM with --allow-downgrade"
    )]
    Downgrade {
        patch: String,
        level: u16,
        highest: u16,
        by: String,
    },
    /// The `struct module` a hook reported is not on the guest's list.
    #[error("the module at {0:#x} that the guest reported loading or unloading is not on its modules list")]
    NoSuchModule(u64),
}

/// Committed transitions the engine remembers for rollback; older ones are
/// forgotten, so a VMM running for months stays flat (an entry costs about
/// 100 bytes per loaded patch).
pub const MAX_HISTORY: usize = 256;

impl EngineError {
    /// Whether the guest was mid-way through something that makes this
    /// step wait (a module load or unload): trying again may succeed.
    pub fn is_busy(&self) -> bool {
        matches!(self, EngineError::Register(e) if e.is_busy())
            || matches!(self, EngineError::GuestBusy(_))
    }

    pub fn kind(&self) -> Fault {
        match self {
            EngineError::Module(_) | EngineError::Link(_) => Fault::Module,
            EngineError::ModuleRefused { source, .. } => source.kind(),
            EngineError::Hook(crate::hook::HookError::NoFunction(_)) => Fault::Module,
            EngineError::Hook(crate::hook::HookError::Arena(ArenaError::Full { .. })) => {
                Fault::NoSpace
            }
            EngineError::Hook(_) | EngineError::NoSuchModule(_) => Fault::Guest,
            EngineError::Internal(_) => Fault::Internal,
            EngineError::Stack(StackError::Unknown(_)) | EngineError::NoSuchTransition { .. } => {
                Fault::NotFound
            }
            EngineError::Stack(_)
            | EngineError::Blocked(_)
            | EngineError::State(_)
            | EngineError::ModuleGone(_)
            | EngineError::Unlinked { .. }
            | EngineError::Downgrade { .. }
            | EngineError::GuestBusy(_) => Fault::State,
            EngineError::Arena(ArenaError::Full { .. })
            | EngineError::Gate(GateError::Arena(ArenaError::Full { .. })) => Fault::NoSpace,
            EngineError::Gate(GateError::Busy(_)) => Fault::State,
            EngineError::Gate(_) => Fault::Guest,
            EngineError::Arena(_)
            | EngineError::Tasks(_)
            | EngineError::Registers(_)
            | EngineError::VcpuRegisters { .. }
            | EngineError::NoRelease
            | EngineError::NoPerCpuArea(_)
            | EngineError::Modules(_)
            | EngineError::Safepoint(_) => Fault::Guest,
            EngineError::Site { source, .. } => match **source {
                SiteError::NotAFunction { .. }
                | SiteError::NotInText { .. }
                | SiteError::NotInModuleText { .. }
                | SiteError::TooShort { .. }
                | SiteError::NotFtraceSite { .. }
                | SiteError::OutOfReach { .. } => Fault::Module,
                SiteError::Records(_) | SiteError::Read { .. } => Fault::Guest,
                _ => Fault::State,
            },
            EngineError::Register(e) => {
                use crate::register::RegisterError as R;
                match e {
                    R::Busy(_) | R::KlpBusy(_) | R::InUse { .. } | R::KeyShared { .. } => {
                        Fault::State
                    }
                    R::Internal(_) => Fault::Internal,
                    R::Name { .. } | R::Reach(_) | R::ForeignKey { .. } => Fault::Module,
                    _ => Fault::Guest,
                }
            }
            EngineError::Write(WriteError::Mismatch { .. }) => Fault::State,
            EngineError::Write(_) => Fault::Guest,
        }
    }
}

/// One patched function of a loaded patch.
#[derive(Debug, Clone)]
struct FuncRecord {
    /// Its module (`None`: vmlinux).
    object: Option<String>,
    name: String,
    sympos: u32,
    old: u64,
    new: u64,
}

/// What the engine keeps of a loaded patch beyond its stack entry.
#[derive(Debug, Clone)]
struct Record {
    replace: bool,
    /// Its `klp_state`s: the system states it introduced or handles.
    states: Vec<State>,
    applied_at: u64,
    pause_us: f64,
    regions: Vec<Region>,
    funcs: Vec<FuncRecord>,
    /// Each loaded object's linked callbacks, in patch order.
    callbacks: Vec<LinkedCallbacks>,
    /// Every object and whether it was linked (its module loaded) or
    /// waits for its module.
    objects: Vec<LinkedObject>,
    /// How the module's signature was checked (the engine never sees
    /// signatures: the caller checks them before `prepare_apply`).
    signature: String,
    /// Its `struct module` in the guest ([`crate::register`]); `None` when
    /// the guest's BTF cannot describe one and the patch needs none.
    module: Option<crate::register::Registered>,
    /// What linking an object later needs (a patch with module objects
    /// only): see [`Relink`].
    relink: Option<Relink>,
    /// Per module object, the last load of its module it refused, and why.
    refused: BTreeMap<String, String>,
    /// Per linked module object, its `struct klp_object`'s address (what
    /// its callbacks are found by in `callbacks`).
    object_at: BTreeMap<String, u64>,
    /// Its `struct klp_patch` in the arena, if the module file has one:
    /// what the guest's klp is shown while its callbacks run.
    klp_patch: Option<u64>,
    /// The patch level its verified signature covers (see [`levels`]).
    level: Option<u16>,
}

impl Record {
    fn text(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.regions
            .iter()
            .filter(|r| r.perm == crate::arena::Perm::Text)
            .map(|r| r.va..r.va + r.len)
    }

    fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

/// Facts read once from the guest kernel for every transition.
#[derive(Debug)]
struct Facts {
    arena: Arena,
    ftrace: FtraceRecords,
    tasks: Tasks,
    hardirq_stack_ptr: Option<u64>,
    /// The kernel's ORC tables, for precise unwinding of sleeping tasks
    /// (None: conservative scanning only).
    orc: Option<Orc>,
    /// The kernel's return hooks (rethook, kretprobes, function graph),
    /// whose hidden return addresses every stack check also judges.
    hooks: ReturnHooks,
    /// The guest's module layout and registries, to register each patch
    /// as a module (Err: why it cannot be done in this guest).
    registry: Result<crate::register::Registry, String>,
}

/// A transition ready to commit. Dropping it changes nothing.
#[derive(Debug)]
pub struct Prepared {
    name: String,
    /// `apply`, `disable`, `enable` or `rollback`, for the history.
    action: &'static str,
    change: Change,
    plan: Plan,
    /// The arena's state after this transition (apply only).
    arena: Option<Arena>,
    /// The new patch's record (apply only).
    record: Option<Record>,
    /// Sites validated for this transition, not yet known to the engine.
    sites: Vec<Site>,
    /// The functions whose stacks must be clean.
    check: Check,
    /// What the transition will not do that klp would.
    warnings: Vec<String>,
    /// The klp callbacks to run around the commit.
    calls: Calls,
    /// Bytes of a load plan split off by [`Prepared::take_load`].
    loaded_bytes: u64,
    /// Its load was committed by [`Engine::load`] (and its module
    /// registered, if it has one).
    loaded: bool,
    /// The `struct klp_patch` of each patch enabled before it, in klp's
    /// order: the world its callbacks are shown (see [`livepatch`]).
    klp_before: Vec<u64>,
}

impl Prepared {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Records how the applied module's signature was checked, for
    /// `PatchInfo::signature` (an apply only; "unsigned" if never set).
    pub fn set_signature(&mut self, signature: String, level: Option<u16>) {
        if let Some(r) = self.record.as_mut() {
            r.signature = signature;
            r.level = level;
        }
    }

    /// Guest bytes the transition writes (its load included).
    pub fn bytes(&self) -> u64 {
        self.loaded_bytes
            + self
                .plan
                .writes()
                .iter()
                .map(|w| w.bytes.len() as u64)
                .sum::<u64>()
    }

    /// The klp callbacks to run before and after the commit.
    pub fn calls(&self) -> &Calls {
        &self.calls
    }

    /// Splits off the writes that load a new patch (its arena pages and
    /// their mapping) so they can be committed before its `pre_patch`
    /// callbacks run: the callbacks are the patch's own code. What stays
    /// is the switch, the entry writes. Nothing references the loaded
    /// pages until then, so the load needs no safe point; undo it with
    /// the returned plan's [`Plan::inverse`] once committed.
    pub fn take_load(&mut self) -> Plan {
        let sites: Vec<_> = self
            .plan
            .allowed()
            .iter()
            .filter(|a| matches!(a.kind, crate::write::AllowKind::Site { .. }))
            .copied()
            .collect();
        let load = self.plan.split_off(|w| {
            !sites
                .iter()
                .any(|a| a.gpa <= w.gpa && w.gpa < a.gpa + a.len)
        });
        self.loaded_bytes = load.writes().iter().map(|w| w.bytes.len() as u64).sum();
        load
    }

    /// Whether this transition loads a new patch (apply).
    pub fn loads(&self) -> bool {
        self.record.is_some()
    }

    /// Whether it loads a patch with module objects: their modules'
    /// loads and unloads must be caught ([`crate::hook`]).
    pub fn needs_hooks(&self) -> bool {
        self.record.as_ref().is_some_and(|r| r.relink.is_some())
    }
}

/// A callback sent into the guest, to wait for with [`Engine::poll_call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Armed {
    pub seq: u64,
    /// The vCPU to raise the gate's vector on.
    pub vcpu: usize,
    /// That vCPU's Linux CPU number.
    pub cpu: u32,
}

/// A committed transition.
#[derive(Debug, Clone)]
pub struct Committed {
    pub name: String,
    /// Its number in the history.
    pub seq: u64,
    /// The patch it applied, disabled or enabled (None for a rollback).
    pub patch: Option<PatchInfo>,
    pub bytes_written: u64,
}

/// A committed transition and the stack it started from.
#[derive(Debug, Clone)]
struct Past {
    seq: u64,
    at: u64,
    action: &'static str,
    patch: String,
    forced: bool,
    before: Vec<Placed>,
}

/// A removed patch whose arena space is not free yet: a task may still
/// hold a return address into its code (a forced transition skipped the
/// check, or the task was preempted there before the check could see it
/// leave). Freed by [`Engine::sweep`] once no stack references it.
#[derive(Debug, Clone)]
struct Retired {
    name: String,
    removed_at: u64,
    record: Record,
}

/// One guest's patches.
#[derive(Debug, Default)]
pub struct Engine {
    facts: Option<Facts>,
    stack: Stack,
    records: BTreeMap<String, Record>,
    /// Validated sites by old function address, with their original bytes.
    sites: BTreeMap<u64, Site>,
    /// Removed patches whose code is still mapped, oldest first.
    retired: Vec<Retired>,
    /// The last [`MAX_HISTORY`] committed transitions, oldest first.
    history: std::collections::VecDeque<Past>,
    /// The number of the last committed transition.
    seq: u64,
    /// The call gate, once a callback needed it.
    gate: Option<Gate>,
    /// The number of the last callback sent.
    calls: u64,
    /// `flags` words of ftrace records klpvisor set `FTRACE_FL_DISABLED`
    /// in (and clears again when the entry is restored).
    ftrace_disabled: std::collections::BTreeSet<u64>,
    /// The hooks on the guest's module loads and unloads, once a patch
    /// with module objects needed them ([`crate::hook`]).
    hooks: Option<crate::hook::Hooks>,
    /// Their stubs' `rip`s (see [`crate::hook::Hooks::rips`]), shared with
    /// whoever answers the hooks without taking the engine.
    hook_rips: std::sync::Arc<std::sync::OnceLock<(u64, u64)>>,
    /// What the guest's klp is shown while callbacks run, until the
    /// transition ends (see [`livepatch`]).
    klp_shown: Option<crate::register::livepatch::Shown>,
    /// Anti-rollback, when enforced: the highest signed level applied.
    floor: Option<levels::Floor>,
}

impl Engine {
    /// Reads what every transition needs from the kernel, once.
    fn facts<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<&mut Facts, EngineError> {
        if self.facts.is_none() {
            let image = ImageFacts::from_kernel(kernel)?;
            let arena = Arena::new(guest, &image)?;
            let space = kernel.space(guest);
            let ftrace =
                FtraceRecords::load(&space, &kernel.kallsyms, &kernel.btf).map_err(|source| {
                    EngineError::Site {
                        name: "ftrace records".into(),
                        source: Box::new(source),
                    }
                })?;
            let mut tasks = Tasks::from_kernel(&kernel.kallsyms, &kernel.btf)?;
            tasks.measure_thread_size(&space, &kernel.kallsyms, &kernel.btf);
            let hardirq_stack_ptr =
                crate::safepoint::hardirq_stack_ptr(&kernel.kallsyms, &kernel.btf);
            let release = kernel.uts(guest, "release");
            // The format from BTF; by release (4.14..6.2 only) if BTF has
            // no struct orc_entry.
            let orc = Orc::load_btf(&space, &kernel.kallsyms, &kernel.btf)
                .or_else(|_| Orc::load(&space, &kernel.kallsyms, release.as_deref()))
                .ok();
            let registry = crate::register::Registry::new(&kernel.btf, &kernel.kallsyms)
                .map_err(|e| e.to_string());
            let hooks = ReturnHooks::from_kernel(&kernel.kallsyms, &kernel.btf);
            self.facts = Some(Facts {
                arena,
                ftrace,
                tasks,
                hardirq_stack_ptr,
                orc,
                hooks,
                registry,
            });
        }
        self.facts
            .as_mut()
            .ok_or_else(|| EngineError::Internal("kernel facts unavailable".into()))
    }

    /// The site of the function at `old` (in `module`, or vmlinux):
    /// known, or validated now.
    fn site<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        ftrace: &FtraceRecords,
        module: Option<&klpvisor_guest::LoadedModule>,
        name: &str,
        old: u64,
    ) -> Result<Site, EngineError> {
        if let Some(s) = self.sites.get(&old) {
            // Known, and not redirected now: it must still hold its
            // original bytes; if the guest changed it (ftrace, in-guest
            // klp), validate afresh for an error that says why.
            let live = self.stack.live().contains_key(&old);
            let mut now = [0u8; 5];
            let unchanged =
                guest.read_phys(GuestPhys(s.gpa), &mut now).is_ok() && now == s.original;
            if live || unchanged {
                return Ok(s.clone());
            }
        }
        let space = kernel.space(guest);
        match module {
            None => Site::find(&space, &kernel.kallsyms, ftrace, old),
            Some(m) => Site::find_in_module(&space, &kernel.kallsyms, m, ftrace, old),
        }
        .map_err(|source| EngineError::Site {
            name: name.to_owned(),
            source: Box::new(source),
        })
    }

    /// The site writes and safe-point spans of a stack change.
    fn plan_sites(
        &self,
        change: &Change,
        fresh: &[Site],
        fresh_record: Option<&Record>,
        plan: &mut Plan,
    ) -> Result<Check, EngineError> {
        let mut spans = Vec::new();
        for (&old, &(before, after)) in &change.sites {
            let site = self
                .sites
                .get(&old)
                .or_else(|| fresh.iter().find(|s| s.func == old))
                .ok_or_else(|| EngineError::Internal(format!("no site for {old:#x}")))?;
            let bytes =
                |t: Option<u64>| -> Result<Vec<u8>, EngineError> {
                    match t {
                        Some(t) => site.redirect(t).map(|b| b.to_vec()).map_err(|source| {
                            EngineError::Site {
                                name: site.name.clone(),
                                source: Box::new(source),
                            }
                        }),
                        None => Ok(site.original.to_vec()),
                    }
                };
            plan.allow(site.allowed());
            plan.push(Write::new(
                site.gpa,
                bytes(after)?,
                bytes(before)?,
                format!("entry of {}", site.name),
            ));
            spans.push(Span {
                range: if site.extent.is_empty() {
                    old..old + 1
                } else {
                    site.extent.clone()
                },
                name: site.name.clone(),
            });
            // The code being switched away from, if it is a patch's.
            if let Some(t) = before {
                if let Some(r) = self
                    .records
                    .values()
                    .chain(fresh_record)
                    .find(|r| r.text().any(|x| x.contains(&t)))
                {
                    for range in r.text() {
                        spans.push(Span {
                            range,
                            name: format!("patched {}", site.name),
                        });
                    }
                }
            }
        }
        Ok(Check::new(spans))
    }

    /// Plans disabling enabled patch `name`.
    pub fn prepare_disable<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        name: &str,
        force: bool,
    ) -> Result<Prepared, EngineError> {
        self.facts(kernel, guest)?;
        let change = self.stack.plan_disable(name, force)?;
        let mut calls = Calls::default();
        calls.disable(name, &self.callbacks_of(name));
        let mut p = self.prepared_sites(name, "disable", change, calls)?;
        // klp's unpatching transition waits for every task to leave every
        // function of the patch (klp_check_stack_func looks for new_func),
        // also those a newer enabled patch shadows, whose entries do not
        // change: a task may have entered them before that patch came.
        if let Some(r) = self.records.get(name) {
            p.check.extend(r.text().map(|range| Span {
                range,
                name: format!("{name} (being disabled)"),
            }));
        }
        Ok(p)
    }

    /// A patch whose object waits for a module that is loaded (its link
    /// failed when the module came, while the patch was disabled) cannot
    /// be enabled: klp would refuse to enable it for the same reason.
    fn check_unlinked<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        name: &str,
        r: &Record,
    ) -> Result<(), EngineError> {
        let waiting: Vec<&str> = r
            .objects
            .iter()
            .filter(|o| !o.loaded)
            .filter_map(|o| o.name.as_deref())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let loaded = kernel.modules_brief(guest).map_err(EngineError::Modules)?;
        for w in waiting {
            if loaded.iter().any(|m| {
                m.name == w
                    && matches!(
                        m.state,
                        klpvisor_guest::ModuleState::Live | klpvisor_guest::ModuleState::Coming
                    )
            }) {
                return Err(EngineError::Unlinked {
                    patch: name.to_owned(),
                    module: w.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// klp's system-state rule ([`crate::state::check`]) for enabling
    /// `patch` (`replace`, carrying `states`) next to the enabled patches.
    fn check_states(
        &self,
        patch: &str,
        replace: bool,
        states: &[State],
    ) -> Result<(), EngineError> {
        let new = crate::state::Holder {
            name: patch,
            replace,
            states,
        };
        let enabled = self.holders(
            self.stack
                .entries()
                .iter()
                .filter(|e| e.state == PatchState::Enabled),
        );
        Ok(crate::state::check(new, enabled)?)
    }

    /// The state rule's view of `entries`' patches.
    fn holders<'a>(
        &'a self,
        entries: impl Iterator<Item = &'a Entry>,
    ) -> Vec<crate::state::Holder<'a>> {
        entries
            .filter_map(|e| {
                let r = self.records.get(&e.name)?;
                Some(crate::state::Holder {
                    name: &e.name,
                    replace: r.replace,
                    states: &r.states,
                })
            })
            .collect()
    }

    /// Plans enabling loaded patch `name` again.
    pub fn prepare_enable<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        name: &str,
        force: bool,
    ) -> Result<Prepared, EngineError> {
        self.facts(kernel, guest)?;
        // The stack's refusals first (unknown, enabled, pinned): they say
        // more than a state conflict would.
        let change = self.stack.plan_reenable(name, force)?;
        if let Some(r) = self.records.get(name) {
            self.check_states(name, r.replace, &r.states)?;
            self.check_unlinked(kernel, guest, name, r)?;
        }
        // Only the enabled patch's callbacks, also when it replaces others.
        let mut calls = Calls::default();
        calls.enable(name, &self.callbacks_of(name));
        self.prepared_sites(name, "enable", change, calls)
    }

    /// Plans returning every patch to the state it had just before
    /// transition `to` (default: the last one, i.e. undo it), in one
    /// transition with the same safe-point rule as any other: what no
    /// in-kernel livepatch can do, since a replace there frees what it
    /// replaced. Patches loaded since stay loaded, disabled.
    pub fn prepare_rollback<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        to: Option<u64>,
        force: bool,
    ) -> Result<Prepared, EngineError> {
        self.facts(kernel, guest)?;
        let to = to.unwrap_or(self.seq);
        let past =
            self.history
                .iter()
                .find(|p| p.seq == to)
                .ok_or(EngineError::NoSuchTransition {
                    to,
                    newest: self.seq,
                })?;
        let change = self.stack.plan_restore(&past.before, force)?;
        // The same system-state rule as enable, for what the rollback
        // enables (it cannot bring back a patch enable would refuse).
        if let Some(after) = &change.restore {
            let enabled = |e: &&Entry| e.state == PatchState::Enabled;
            crate::state::check_restore(
                &self.holders(self.stack.entries().iter().filter(enabled)),
                &self.holders(after.iter().filter(enabled)),
            )?;
        }
        let calls = self.rollback_calls(&change);
        self.prepared_sites(&format!("#{to}"), "rollback", change, calls)
    }

    /// A rollback runs callbacks as the enables and disables it amounts to
    /// would: if it enables a replace patch, that is a replace and only the
    /// enabled patches' callbacks run; otherwise the patches it enables
    /// run their patch callbacks (oldest first) and those it disables
    /// their unpatch callbacks (newest first).
    fn rollback_calls(&self, change: &Change) -> Calls {
        let enabled_now = |n: &str| {
            self.stack
                .get(n)
                .is_some_and(|e| e.state == PatchState::Enabled)
        };
        let after = |n: &str| change.states.iter().find(|(x, _)| x == n).map(|(_, s)| *s);
        let order: Vec<&Entry> = match &change.restore {
            Some(after) => after.iter().collect(),
            None => self.stack.entries().iter().collect(),
        };
        let enabling: Vec<&str> = order
            .iter()
            .map(|e| e.name.as_str())
            .filter(|n| after(n) == Some(PatchState::Enabled) && !enabled_now(n))
            .collect();
        let disabling: Vec<&str> = self
            .stack
            .entries()
            .iter()
            .rev()
            .map(|e| e.name.as_str())
            .filter(|n| enabled_now(n) && after(n).is_some_and(|s| s != PatchState::Enabled))
            .collect();
        let replace = enabling
            .iter()
            .any(|n| self.records.get(*n).is_some_and(|r| r.replace));
        let mut calls = Calls::default();
        for n in enabling {
            calls.enable(n, &self.callbacks_of(n));
        }
        if !replace {
            for n in disabling {
                calls.disable(n, &self.callbacks_of(n));
            }
        }
        calls
    }

    fn callbacks_of(&self, name: &str) -> Vec<LinkedCallbacks> {
        self.records
            .get(name)
            .map(|r| r.callbacks.clone())
            .unwrap_or_default()
    }

    /// Installs the call gate (see [`crate::callback::gate`]) unless it is
    /// there already. Call with every vCPU paused, before preparing the
    /// transition that needs it: the gate takes arena pages. Returns
    /// whether it installed now.
    pub fn install_gate<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<bool, EngineError> {
        if self.gate.is_some() {
            return Ok(false);
        }
        let regs = guest.vcpu_regs(0).map_err(|e| EngineError::VcpuRegisters {
            vcpu: 0,
            source: Box::new(e),
        })?;
        let facts = self.facts(kernel, guest)?;
        let mut arena = facts.arena.clone();
        let (gate, writes) = Gate::plan_install(kernel, guest, &regs, &mut arena)?;
        let mut plan = Plan::new(arena.allowed());
        plan.extend(writes);
        plan.commit(guest)?;
        facts.arena = arena;
        self.gate = Some(gate);
        Ok(true)
    }

    /// The call gate, for the API.
    pub fn gate_info(&self) -> Option<klpvisor_api::GateInfo> {
        let [text, data] = self.gate.as_ref()?.regions();
        Some(klpvisor_api::GateInfo {
            text: Hex(text.va),
            data: Hex(data.va),
            data_gpa: Hex(data.gpa),
            calls: self.calls,
        })
    }

    /// Whether the call gate is installed.
    pub fn has_gate(&self) -> bool {
        self.gate.is_some()
    }

    /// Sends `call` into the guest through the gate, to CPU 0 (the boot
    /// CPU, which x86 Linux does not take offline). Call with every vCPU
    /// paused; then raise the gate's vector on [`Armed::vcpu`].
    pub fn arm_call<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
        call: &Call,
    ) -> Result<Armed, EngineError> {
        let func = call
            .func
            .ok_or_else(|| EngineError::Internal(format!("{} has no {}", call.patch, call.kind)))?;
        // The gate calls whatever the mailbox says: it must be the code of
        // the patch the callback belongs to, loaded in the arena now.
        let record = self
            .records
            .get(&call.patch)
            .or(p.record.as_ref().filter(|_| p.name == call.patch));
        if !record.is_some_and(|r| r.text().any(|t| t.contains(&func))) {
            return Err(EngineError::Internal(format!(
                "{} {} at {func:#x} is not in that patch's loaded code; not calling it",
                call.patch, call.kind
            )));
        }
        let (cpu, base) = self.gate_cpu(kernel, guest)?;
        let gate = self
            .gate
            .as_mut()
            .ok_or_else(|| EngineError::Internal("the call gate is not installed".into()))?;
        let seq = self.calls + 1;
        let plan = gate.plan_arm(kernel, guest, (cpu, base), call, func, seq)?;
        self.show_klp(kernel, guest, p, call)?;
        plan.commit(guest)?;
        self.calls = seq;
        Ok(Armed { seq, vcpu: 0, cpu })
    }

    /// The CPU vCPU 0 runs (its number and per-CPU base), where the gate
    /// sends its calls.
    fn gate_cpu<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<(u32, u64), EngineError> {
        let regs = guest.vcpu_regs(0).map_err(|e| EngineError::VcpuRegisters {
            vcpu: 0,
            source: Box::new(e),
        })?;
        let facts = self
            .facts
            .as_ref()
            .ok_or_else(|| EngineError::Internal("kernel facts unavailable".into()))?;
        let bases = facts.tasks.per_cpu_bases(&kernel.space(guest))?;
        // The per-CPU base is GS in the kernel, the other GS base in user
        // mode; try both, so a vCPU caught right at an entry still works.
        [Some(regs.gs_base), regs.kernel_gs_base]
            .into_iter()
            .flatten()
            .find_map(|gs| bases.iter().find(|(_, b)| *b == gs).copied())
            .ok_or(EngineError::NoPerCpuArea(0))
    }

    /// Sends a line to the guest's kernel log through the gate, as klp's
    /// own `pr_notice("livepatch: ...")` would print it: `line` after the
    /// `livepatch: ` prefix, at KERN_NOTICE. Anything but printable ASCII
    /// becomes `?`, and `%` (a printk conversion) `?` too. Call with
    /// every vCPU paused; then raise the gate's vector on [`Armed::vcpu`].
    pub fn arm_log<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        line: &str,
    ) -> Result<Armed, EngineError> {
        let printk = kernel
            .kallsyms
            .addr("_printk")
            .or_else(|_| kernel.kallsyms.addr("printk"))
            .map_err(GateError::Symbol)?;
        let text = log_text(line);
        let (cpu, base) = self.gate_cpu(kernel, guest)?;
        let gate = self
            .gate
            .as_mut()
            .ok_or_else(|| EngineError::Internal("the call gate is not installed".into()))?;
        let seq = self.calls + 1;
        let plan = gate.plan_log(kernel, guest, (cpu, base), printk, &text, seq)?;
        plan.commit(guest)?;
        self.calls = seq;
        Ok(Armed { seq, vcpu: 0, cpu })
    }

    /// How far a sent callback got (the guest may run meanwhile).
    pub fn poll_call<G: Guest + ?Sized>(
        &self,
        guest: &G,
        armed: &Armed,
    ) -> Result<Progress, EngineError> {
        let gate = self
            .gate
            .as_ref()
            .ok_or_else(|| EngineError::Internal("the call gate is not installed".into()))?;
        Ok(gate.poll(guest, armed.seq)?)
    }

    /// Keeps the pages a transition loaded although it was abandoned,
    /// because the patch's own code may still run in the guest (a callback
    /// that did not return in time): the patch is retired at once, and
    /// [`Engine::sweep`] frees its pages once no stack references them.
    pub fn retire_load(&mut self, p: Prepared) {
        if let (Some(arena), Some(record), Some(f)) = (p.arena, p.record, self.facts.as_mut()) {
            f.arena = arena;
            self.retired.push(Retired {
                name: p.name,
                removed_at: now_unix(),
                record,
            });
        }
    }

    /// The number of the last committed transition (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// The transitions a rollback can return to, oldest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.history
            .iter()
            .map(|p| HistoryEntry {
                seq: p.seq,
                at: p.at,
                action: p.action.to_owned(),
                patch: p.patch.clone(),
                forced: p.forced,
                before: p.before.iter().map(|e| (e.name.clone(), e.state)).collect(),
            })
            .collect()
    }

    fn prepared_sites(
        &self,
        name: &str,
        action: &'static str,
        change: Change,
        calls: Calls,
    ) -> Result<Prepared, EngineError> {
        let mut plan = Plan::new(Vec::new());
        let check = self.plan_sites(&change, &[], None, &mut plan)?;
        Ok(Prepared {
            name: name.to_owned(),
            action,
            change,
            plan,
            arena: None,
            record: None,
            sites: Vec::new(),
            check,
            warnings: Vec::new(),
            calls,
            loaded_bytes: 0,
            loaded: false,
            klp_before: self.klp_enabled(),
        })
    }

    /// Commits `p` with every vCPU paused: the safe-point check (unless
    /// the transition is forced), then every write, then the new state.
    pub fn commit<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
    ) -> Result<Committed, EngineError> {
        self.check_modules(kernel, guest, p)?;
        // A patch not loaded by Engine::load yet is loaded, and its module
        // registered, in this same pause: nothing runs in between.
        let register = p
            .record
            .as_ref()
            .and_then(|r| r.module.clone())
            .filter(|_| !p.loaded);
        if register.is_some() {
            self.registry_quiet(kernel, guest)?;
        }
        if !p.change.forced && !p.check.is_empty() {
            let blockers = self.blockers(kernel, guest, &p.check)?;
            if !blockers.is_empty() {
                return Err(EngineError::Blocked(blockers));
            }
        }
        // Read and checked before anything is written: a busy ftrace waits.
        let ftrace = self.ftrace_plan(kernel, guest, p)?;
        let undo = p.plan.commit(guest)?;
        let unlink = match &register {
            Some(r) => Some(self.register_or_undo(kernel, guest, &p.name, r, &undo)?),
            None => None,
        };
        if let Some((plan, set, cleared)) = ftrace {
            if let Err(e) = plan.commit(guest) {
                if let Some(u) = unlink {
                    u.commit(guest)?;
                }
                undo.commit(guest)?;
                return Err(e.into());
            }
            self.ftrace_disabled.extend(set);
            for w in cleared {
                self.ftrace_disabled.remove(&w);
            }
        }
        if let Some(m) = p.record.as_ref().and_then(|r| r.module.as_ref()) {
            self.orc_add(m);
        }
        if let Some(arena) = &p.arena {
            if let Some(f) = self.facts.as_mut() {
                f.arena = arena.clone();
            }
        }
        for s in &p.sites {
            self.sites.entry(s.func).or_insert_with(|| s.clone());
        }
        if let Some(r) = &p.record {
            self.records.insert(p.name.clone(), r.clone());
        }
        self.raise_floor(p);
        self.seq += 1;
        if self.history.len() == MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Past {
            seq: self.seq,
            at: now_unix(),
            action: p.action,
            patch: p.name.clone(),
            forced: p.change.forced,
            before: self.stack.placed(),
        });
        self.stack.apply(&p.change);
        // In the same pause, free retired code no stack references any
        // more. A failure only delays that; the transition has committed.
        let _ = self.sweep(kernel, guest);
        Ok(Committed {
            name: p.name.clone(),
            seq: self.seq,
            patch: self.info(&p.name),
            bytes_written: p.bytes(),
        })
    }

    /// Every module whose text this transition writes is still the
    /// module its sites were validated in: on the list at the same
    /// `struct module`, live or coming, with the same text. A module
    /// unloaded since (its text freed, perhaps reused) or reloaded
    /// elsewhere refuses the transition before anything is written.
    fn check_modules<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
    ) -> Result<(), EngineError> {
        let mut wanted: Vec<&crate::site::InModule> = Vec::new();
        for old in p.change.sites.keys() {
            let site = self
                .sites
                .get(old)
                .or_else(|| p.sites.iter().find(|s| s.func == *old));
            if let Some(m) = site.and_then(|s| s.module.as_ref()) {
                if !wanted.contains(&m) {
                    wanted.push(m);
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let now = kernel.modules_brief(guest).map_err(EngineError::Modules)?;
        for m in wanted {
            let same = now.iter().any(|n| {
                n.name == m.name
                    && n.addr == m.addr
                    && n.text == m.text
                    && matches!(
                        n.state,
                        klpvisor_guest::ModuleState::Live | klpvisor_guest::ModuleState::Coming
                    )
            });
            if !same {
                return Err(EngineError::ModuleGone(m.name.clone()));
            }
        }
        Ok(())
    }

    fn blockers<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        check: &Check,
    ) -> Result<Vec<Blocker>, EngineError> {
        let f = self
            .facts
            .as_ref()
            .ok_or_else(|| EngineError::Internal("kernel facts unavailable".into()))?;
        let space = kernel.space(guest);
        let regs = all_vcpu_regs(guest)?;
        let tasks = f.tasks.list(&space, &regs)?;
        let irq = match f.hardirq_stack_ptr {
            Some(ptr) => {
                let bases = f.tasks.per_cpu_bases(&space)?;
                crate::safepoint::irq_stacks_sized(&space, &bases, ptr, f.tasks.layout.thread_size)
            }
            None => Vec::new(),
        };
        Ok(check.blockers_hooked(&space, &tasks, &regs, &irq, f.orc.as_ref(), &f.hooks)?)
    }

    /// Notes the pause a committed transition took (measured by the VMM).
    pub fn record_pause(&mut self, name: &str, pause_us: f64) -> Option<PatchInfo> {
        if let Some(r) = self.records.get_mut(name) {
            if r.pause_us == 0.0 {
                r.pause_us = pause_us;
            }
        }
        self.info(name)
    }

    /// Forgets a patch that is not enabled. Its code stays mapped, and its
    /// arena space allocated, until [`Engine::sweep`] finds no task whose
    /// stack references it (klp frees a module only after its transition
    /// completed, for the same reason).
    pub fn remove(&mut self, name: &str) -> Result<PatchInfo, EngineError> {
        let info = self
            .info(name)
            .ok_or_else(|| StackError::Unknown(name.to_owned()))?;
        self.stack.remove(name)?;
        if let Some(record) = self.records.remove(name) {
            self.retired.push(Retired {
                name: name.to_owned(),
                removed_at: now_unix(),
                record,
            });
        }
        Ok(info)
    }

    /// Frees the arena space of every retired patch no task references:
    /// no RIP and no return address (conservatively, no stack word) inside
    /// its code. Call with every vCPU paused. Returns the names freed.
    pub fn sweep<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<Vec<String>, EngineError> {
        if self.retired.is_empty() {
            return Ok(Vec::new());
        }
        let mut freed = Vec::new();
        let mut keep = Vec::new();
        // Iterate over a copy: registry plans look at every retired
        // patch's module, this one's included.
        for r in self.retired.clone() {
            let check = Check::new(
                r.record
                    .text()
                    .map(|range| Span {
                        range,
                        name: format!("retired {}", r.name),
                    })
                    .collect(),
            );
            let referenced = match self.blockers(kernel, guest, &check) {
                Ok(b) => !b.is_empty(),
                // Unknown means referenced: freeing too late costs space,
                // freeing too early lets new code overwrite a live frame.
                Err(_) => true,
            };
            // A transition that could not take its patches off the guest's
            // klp_patches left them there (the next one tries again).
            if referenced || self.klp_shows(r.record.klp_patch) {
                keep.push(r);
                continue;
            }
            if let Some(m) = r.record.module.as_ref() {
                // Its struct module leaves the kernel's lists before its
                // memory is freed. A kernel reader walking past it (only
                // one running on a vCPU right now can be: those walks do
                // not sleep) has the whole time until the pages are
                // reused to move on: that is a later transition's load,
                // after the guest has run again.
                let unlinked = self
                    .unregister_plan(kernel, guest, m)
                    .and_then(|plan| match plan {
                        Some(plan) => Ok(plan.commit(guest).map(drop)?),
                        None => Ok(()),
                    });
                if let Err(e) = unlinked {
                    tracing::info!(patch = r.name, "module not unregistered yet: {e}");
                    keep.push(r);
                    continue;
                }
                self.orc_remove(m);
            }
            if let Some(f) = self.facts.as_mut() {
                for region in &r.record.regions {
                    f.arena.free(region)?;
                }
            }
            freed.push(r.name);
        }
        self.retired = keep;
        Ok(freed)
    }

    /// Removed patches whose code is still mapped.
    pub fn retired(&self) -> Vec<RetiredInfo> {
        self.retired
            .iter()
            .map(|r| RetiredInfo {
                name: r.name.clone(),
                removed_at: r.removed_at,
                arena_bytes: r.record.bytes(),
            })
            .collect()
    }

    /// Every function whose entry is redirected now, and where to.
    pub fn live(&self) -> Vec<LiveFunc> {
        let mut out = Vec::new();
        for (old, new) in self.stack.live() {
            let owner = self.records.iter().find_map(|(name, r)| {
                r.funcs
                    .iter()
                    .find(|f| f.old == old && f.new == new)
                    .map(|f| (name, f))
            });
            if let Some((patch, f)) = owner {
                out.push(LiveFunc {
                    name: f.name.clone(),
                    sympos: f.sympos,
                    old_addr: Hex(old),
                    target: Hex(new),
                    patch: patch.clone(),
                });
            }
        }
        out
    }

    /// Every loaded patch, oldest first.
    pub fn list(&self) -> Vec<PatchInfo> {
        self.stack
            .entries()
            .iter()
            .filter_map(|e| self.info(&e.name))
            .collect()
    }

    fn info(&self, name: &str) -> Option<PatchInfo> {
        let e = self.stack.get(name)?;
        let r = self.records.get(name)?;
        let live = self.stack.live();
        Some(PatchInfo {
            name: e.name.clone(),
            state: e.state,
            replace: r.replace,
            forced: e.forced,
            pinned: e.pin.clone(),
            applied_at: r.applied_at,
            pause_us: r.pause_us,
            arena_bytes: r.bytes(),
            signature: r.signature.clone(),
            objects: r
                .objects
                .iter()
                .map(|o| ObjectInfo {
                    name: o.name.clone().unwrap_or_else(|| "vmlinux".to_owned()),
                    state: if o.loaded {
                        ObjectState::Linked
                    } else {
                        ObjectState::Waiting
                    },
                    funcs: u32::try_from(o.funcs).unwrap_or(u32::MAX),
                    refused: o.name.as_ref().and_then(|n| r.refused.get(n).cloned()),
                })
                .collect(),
            funcs: r
                .funcs
                .iter()
                .map(|f| FuncInfo {
                    object: f.object.clone().unwrap_or_else(|| "vmlinux".to_owned()),
                    name: f.name.clone(),
                    sympos: f.sympos,
                    old_addr: Hex(f.old),
                    site: Hex(self.sites.get(&f.old).map_or(f.old, |s| s.at)),
                    new_addr: Hex(f.new),
                    live: e.state == PatchState::Enabled && live.get(&f.old) == Some(&f.new),
                })
                .collect(),
            module: r.module.as_ref().map(|m| klpvisor_api::ModuleInfo {
                address: Hex(m.module),
                extable: m.counts.extable as u64,
                bug_sites: m.counts.bugs as u64,
                orc_entries: m.counts.orc as u64,
                symbols: m.counts.symbols as u64,
                static_key_sites: m.counts.jumps as u64,
                static_keys: m.jumps.len() as u64,
            }),
        })
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new stack entry for `funcs`.
fn entry(name: &str, replace: bool, funcs: &[FuncRecord]) -> Entry {
    Entry::new(
        name,
        replace,
        funcs
            .iter()
            .map(|f| crate::stack::Redirect {
                old: f.old,
                new: f.new,
            })
            .collect(),
    )
}

/// `line` as a printk format at KERN_NOTICE with klp's `livepatch: `
/// prefix, NUL-terminated and at most [`crate::callback::gate::LOG_MAX`]
/// bytes: printable ASCII only, and no `%` (the gate passes no arguments).
fn log_text(line: &str) -> Vec<u8> {
    let mut text = b"\x015livepatch: ".to_vec();
    let room = crate::callback::gate::LOG_MAX - text.len() - 2;
    text.extend(line.bytes().take(room).map(|b| match b {
        b'%' => b'?',
        0x20..=0x7e => b,
        _ => b'?',
    }));
    text.extend_from_slice(b"\n\0");
    text
}

#[cfg(test)]
mod log_text_tests {
    use super::log_text;

    #[test]
    fn a_log_line_is_klps_notice_and_never_a_printk_conversion() {
        assert_eq!(
            log_text("'p': patching complete"),
            b"\x015livepatch: 'p': patching complete\n\0"
        );
        // A name can carry anything: no conversion, no control byte.
        let t = log_text("'a%sb\x1b\n': patching complete");
        assert!(!t.contains(&b'%'));
        assert_eq!(t.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(t.starts_with(b"\x015livepatch: 'a?sb??'"));
        let long = log_text(&"x".repeat(5000));
        assert_eq!(long.len(), crate::callback::gate::LOG_MAX);
        assert!(long.ends_with(b"x\n\0"));
    }
}

//! What can go wrong in the engine, and whose fault it is.

use thiserror::Error;

use crate::arena::ArenaError;
use crate::callback::gate::GateError;
use crate::module::ModuleError;
use crate::safepoint::{Blocker, SafepointError};
use crate::site::SiteError;
use crate::stack::StackError;
use crate::write::WriteError;
use klpvisor_guest::{IntrospectError, TasksError};

use super::*;

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

/// Errors of every engine request; [`EngineError::kind`] says whose fault each
/// is.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The patch module (.ko) could not be parsed or does not fit this kernel.
    #[error(transparent)]
    Module(#[from] ModuleError),
    /// Linking the module at its arena addresses failed (a symbol, a
    /// relocation, an alternative).
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    /// The request breaks klp's rules for the patch stack (unknown patch,
    /// duplicate name, wrong state).
    #[error(transparent)]
    Stack(#[from] StackError),
    /// Laying out, allocating from or mapping the arena failed.
    #[error("patch arena: {0}")]
    Arena(#[from] ArenaError),
    /// An old function's patch site was refused, or the ftrace records could
    /// not be read.
    #[error("cannot patch {name}: {source}")]
    Site {
        /// The function, or which ftrace records were being read.
        name: String,
        /// Why.
        source: Box<SiteError>,
    },
    /// The write path refused or failed a plan; a `Mismatch` means the guest
    /// changed the bytes after they were read.
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
        /// Which vCPU.
        vcpu: usize,
        /// Why they could not be read.
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
    /// The safe-point check itself failed (a vCPU's registers are missing),
    /// so no safe point can be claimed.
    #[error("safe-point check failed: {0}")]
    Safepoint(#[from] SafepointError),
    /// klp's system-state rule refuses the patch.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// No safe point: tasks inside functions the transition changes, or vCPUs
    /// whose task cannot be told; nothing was written, and a retry may pass.
    #[error(
        "no safe point: {} blocker(s), tasks inside functions this transition changes or vCPUs \
         whose task cannot be told; nothing was written \
         (retry later, or --force to skip the check):\n  {}",
        .0.len(),
        .0.iter().map(|b| b.to_string()).collect::<Vec<_>>().join("\n  ")
    )]
    Blocked(Vec<Blocker>),
    /// A rollback names a transition the history does not hold (it keeps the
    /// last [`MAX_HISTORY`]).
    #[error(
        "no transition #{to} to roll back to; `patcher history` lists the last {MAX_HISTORY} \
         (the newest is #{newest})"
    )]
    NoSuchTransition {
        /// The transition number asked for.
        to: u64,
        /// The newest transition's number.
        newest: u64,
    },
    /// A callback could not run through the call gate.
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
        /// The loading module's name.
        module: String,
        /// The patch whose object for it was refused.
        patch: String,
        /// Why.
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
    Unlinked {
        /// The patch asked to be enabled.
        patch: String,
        /// The loaded module its object could not be linked for.
        module: String,
    },
    /// Anti-rollback: the patch's signed level is below one applied.
    #[error(
        "patch `{patch}` is signed at level {level}, lower than level {highest} already applied \
         (by `{by}`); under --trusted-keys an older level is refused so an old fix cannot be \
         replayed over a newer one. Apply a patch signed at level {highest} or higher, or start \
         the VMM with --allow-downgrade"
    )]
    Downgrade {
        /// The patch being brought back.
        patch: String,
        /// Its signed level (0 for a patch without one).
        level: u16,
        /// The highest level applied so far.
        highest: u16,
        /// The patch that applied it.
        by: String,
    },
    /// The patch's per-CPU data could not be set up or given back.
    #[error(transparent)]
    PerCpu(#[from] super::percpu::PercpuError),
    /// A redirect through the guest's ftrace could not be set up or let go
    /// (see [`crate::ftrace_ops`]).
    #[error(transparent)]
    Ops(#[from] crate::ftrace_ops::OpsError),
    /// A step of setting up a redirect through the guest's ftrace did not
    /// finish in time.
    #[error(
        "{step} for {func} did not finish in the guest within the transition's time ({progress});          nothing was redirected"
    )]
    OpsUnfinished {
        /// The old function.
        func: String,
        /// The kernel function called.
        step: &'static str,
        /// How far the call got.
        progress: String,
    },
    /// Functions the guest traces could only be redirected by writing a
    /// `jmp` over ftrace's call, which klpvisor never does.
    #[error(
        "{0}: traced by the guest's ftrace (its entry holds ftrace's call); klpvisor shares a \
         traced entry only through the guest's ftrace, whose registration runs in the guest: \
         resume the VM (or stop tracing the function) and try again"
    )]
    TracedEntry(String),
    /// A function of a module that is loading is traced by the guest
    /// already, and only a `jmp` could redirect it (the guest's ftrace
    /// cannot carry klpvisor's redirects), never written over ftrace's
    /// call.
    #[error(
        "{func} in module {module}: traced by the guest's ftrace as the module loads (its \
         entry holds ftrace's call), and this guest's functions can only be redirected by a \
         jmp at their entry, which klpvisor never writes over ftrace's call: stop tracing the \
         module's functions while it loads"
    )]
    TracedModuleEntry {
        /// The module.
        module: String,
        /// The function.
        func: String,
    },
    /// The `struct module` a hook reported is not on the guest's list.
    #[error("the module at {0:#x} that the guest reported loading or unloading is not on its modules list")]
    NoSuchModule(u64),
}

impl EngineError {
    /// Whether the guest was mid-way through something that makes this
    /// step wait (a module load or unload): trying again may succeed.
    pub fn is_busy(&self) -> bool {
        matches!(self, EngineError::Register(e) if e.is_busy())
            || matches!(self, EngineError::GuestBusy(_))
    }

    /// Whose fault this is, for a front end's status (see [`Fault`]).
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
            | EngineError::GuestBusy(_)
            | EngineError::TracedEntry(_)
            | EngineError::TracedModuleEntry { .. } => Fault::State,
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
            EngineError::Ops(e) => {
                use crate::ftrace_ops::OpsError as O;
                match e {
                    O::Arena(ArenaError::Full { .. }) => Fault::NoSpace,
                    O::Refused { .. } => Fault::State,
                    _ => Fault::Guest,
                }
            }
            EngineError::OpsUnfinished { .. } => Fault::Guest,
            EngineError::PerCpu(e) => {
                use super::percpu::PercpuError as P;
                match e {
                    P::NoMemory { .. } => Fault::NoSpace,
                    _ => Fault::Guest,
                }
            }
            EngineError::Write(WriteError::Mismatch { .. }) => Fault::State,
            EngineError::Write(_) => Fault::Guest,
        }
    }
}

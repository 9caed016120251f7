//! The control socket's wire format: the JSON bodies the VMM serves and the
//! `patcher` CLI reads. One definition for both sides, so they cannot drift;
//! `vmm/api/openapi.yaml` documents the same shapes for other clients.
//!
//! 64-bit addresses and register values travel as hex strings (`"0x..."`,
//! see [`Hex`]): JSON numbers are doubles to most clients and lose bits
//! above 2^53, which every kernel address has.
#![forbid(unsafe_code)]

#[cfg(feature = "client")]
pub mod client;
pub mod head;

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest memory read one request may ask for, in bytes.
pub const MAX_MEMORY_READ: u64 = 65536;

/// A 64-bit value shown as `"0x..."` in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hex(pub u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_hex(&s).map(Hex).map_err(serde::de::Error::custom)
    }
}

/// Parses `0x1f`, `0X1F` or `1f` as a 64-bit hex number, with a message
/// a user can act on.
pub fn parse_hex(s: &str) -> Result<u64, String> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 16 {
        return Err(format!(
            "`{s}` is not a 64-bit hex number (want e.g. 0xffffffff81000000)"
        ));
    }
    u64::from_str_radix(digits, 16)
        .map_err(|_| format!("`{s}` is not a 64-bit hex number (want e.g. 0xffffffff81000000)"))
}

/// Whether the guest's vCPUs run. `PATCH /vm` also takes Firecracker's
/// spellings, `"Paused"` and `"Resumed"`, so a Firecracker client's pause
/// and resume work unchanged; replies always say `running` or `paused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The vCPUs run the guest (Firecracker: `"Resumed"`).
    #[serde(alias = "Resumed")]
    Running,
    /// Every vCPU is parked outside guest mode (Firecracker: `"Paused"`).
    #[serde(alias = "Paused")]
    Paused,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
        })
    }
}

/// Every error reply: `{"error": "...", "kind": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The message, for a person: what failed and, where known, why.
    pub error: String,
    /// What a script should do about it; absent from VMMs that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
}

/// The class of a failed request, so that a script can react without
/// parsing messages (`patcher` turns it into its exit code). The HTTP
/// status alone cannot say it: a 409 is a busy VMM, a patch klp refuses
/// in the current state, or a transition that found no safe point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request, the module, its signature or the patch stack's state
    /// says no: the same request will fail again until something changes.
    Refused,
    /// No safe point within the timeout: guest tasks sat in functions the
    /// transition changes. Nothing was written; retry later (or force).
    Blocked,
    /// Another change runs, or a user's pause is in the way: retry.
    Busy,
    /// The VM cannot answer yet or any more (kernel still booting, the
    /// request outlived its time, the VM stopped): retry, or look at
    /// `GET /patches` for what happened.
    Unavailable,
    /// The VMM or the guest failed: see the message and the VMM's log.
    Failed,
}

impl ErrorKind {
    /// The kind a status implies when the server names none.
    pub fn of_status(status: u16) -> Self {
        match status {
            409 => Self::Busy,
            503 | 504 => Self::Unavailable,
            400..=499 | 507 => Self::Refused,
            _ => Self::Failed,
        }
    }
}

/// `GET /vm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// Whether the vCPUs run or are parked.
    pub state: VmState,
    /// Number of vCPUs the guest was booted with.
    pub vcpus: usize,
    /// Milliseconds since the VMM started.
    pub uptime_ms: f64,
    /// VMM start to the guest init's boot marker; null until it is written.
    pub boot_ms: Option<f64>,
    /// Null while the kernel cannot be found yet (early boot); see
    /// `kernel_error`.
    pub kernel: Option<KernelInfo>,
    /// Why `kernel` is null (e.g. kallsyms not found yet during early boot).
    pub kernel_error: Option<String>,
    /// The reserved patch arena: guest-physical start and size.
    pub arena_gpa: Hex,
    /// Size of the patch arena in bytes.
    pub arena_size: u64,
    /// The VMM's live heap in bytes: flat across transitions unless
    /// something leaks (RSS would mostly show guest RAM).
    #[serde(default)]
    pub heap_bytes: u64,
    /// Which patches this VMM accepts.
    #[serde(default)]
    pub signatures: SignaturePolicyInfo,
}

/// `GET /vm`'s `signatures`: whether patches must be signed, and by whom.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SignaturePolicyInfo {
    /// `vmm --trusted-keys DIR` was given: unsigned patches are refused.
    pub enforced: bool,
    /// The keys whose signatures are accepted (empty when not enforced).
    pub trusted_keys: Vec<TrustedKeyInfo>,
    /// Anti-rollback (enforced, without `vmm --allow-downgrade`): the
    /// highest signed patch level applied so far; a patch below it is
    /// refused. `None`: not enforced.
    #[serde(default)]
    pub highest_level: Option<u16>,
}

/// One trusted public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKeyInfo {
    /// The first 8 bytes of the SHA-256 of the key, in hex.
    pub key_id: String,
    /// The `.pub` file it was read from.
    pub file: String,
}

/// The guest kernel as read from its memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelInfo {
    /// `init_uts_ns.name.release` (what `uname -r` prints).
    pub release: Option<String>,
    /// `init_uts_ns.name.version` (`uname -v`: build number and date).
    pub version: Option<String>,
    /// `linux_banner` (the first line of /proc/version).
    pub banner: Option<String>,
    /// Kernel-virtual address of `_text` after KASLR.
    pub text: Hex,
    /// Guest-physical address `_text` is loaded at.
    pub text_phys: Hex,
    /// `_text` minus its link-time address 0xffffffff81000000.
    pub slide: Hex,
    /// How `_text` was confirmed (LSTAR or the IDT).
    pub confirmed_by: String,
    /// 4, or 5 when the kernel runs with LA57 paging.
    pub page_table_levels: u8,
    /// Guest-physical address of the page tables the VMM reads the kernel
    /// through: the kernel's own `init_top_pgt`.
    #[serde(default)]
    pub page_tables: Hex,
    /// The vCPU root the kernel was first found through (for diagnosis).
    #[serde(default)]
    pub found_through: String,
    /// Number of kallsyms entries decoded from guest memory.
    pub symbols: usize,
    /// Time the VMM took to find and decode the kernel (kallsyms, BTF).
    pub decode_ms: f64,
    /// The pause for reading vCPU registers before that decode.
    pub decode_pause_us: f64,
}

/// `PATCH /vm` body (Firecracker style).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateChange {
    /// The state to move to: `running` or `paused` (or Firecracker's spellings).
    pub state: VmState,
}

/// `PUT /vm/pause` (and `PATCH /vm` to paused).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PauseReply {
    /// Always `paused`.
    pub state: VmState,
    /// From the pause request until every vCPU was parked.
    pub latency_us: f64,
}

/// `PUT /vm/resume` (and `PATCH /vm` to running).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeReply {
    /// Always `running`.
    pub state: VmState,
    /// From the pause request until the vCPUs were released: an upper
    /// bound on the time any vCPU spent out of guest mode.
    pub out_of_guest_us: f64,
}

/// `GET /vcpus/{id}/regs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegsReply {
    /// The vCPU index the registers belong to.
    pub vcpu: usize,
    /// The VM was running, so the VMM paused it for the read and resumed it.
    pub paused_for_read: bool,
    /// How long that pause kept the vCPUs out of guest mode (null when the
    /// VM was already paused).
    pub out_of_guest_us: Option<f64>,
    /// The registers as read from KVM.
    pub regs: Regs,
}

/// One vCPU's registers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Regs {
    /// General-purpose register.
    pub rax: Hex,
    /// General-purpose register.
    pub rbx: Hex,
    /// General-purpose register.
    pub rcx: Hex,
    /// General-purpose register.
    pub rdx: Hex,
    /// General-purpose register.
    pub rsi: Hex,
    /// General-purpose register.
    pub rdi: Hex,
    /// General-purpose register (frame pointer in kernel code built with one).
    pub rbp: Hex,
    /// Stack pointer.
    pub rsp: Hex,
    /// General-purpose register.
    pub r8: Hex,
    /// General-purpose register.
    pub r9: Hex,
    /// General-purpose register.
    pub r10: Hex,
    /// General-purpose register.
    pub r11: Hex,
    /// General-purpose register.
    pub r12: Hex,
    /// General-purpose register.
    pub r13: Hex,
    /// General-purpose register.
    pub r14: Hex,
    /// General-purpose register.
    pub r15: Hex,
    /// Instruction pointer (kernel-virtual while the vCPU is in the kernel).
    pub rip: Hex,
    /// Flags register (IF: interrupts enabled).
    pub rflags: Hex,
    /// CR0 (PG: paging on).
    pub cr0: Hex,
    /// CR3: guest-physical root of the page tables in use.
    pub cr3: Hex,
    /// CR4 (PAE, LA57: the paging mode).
    pub cr4: Hex,
    /// IA32_EFER; null when the register source records no MSRs.
    pub efer: Option<Hex>,
    /// IA32_LSTAR (the kernel's `entry_SYSCALL_64`); null without MSRs.
    pub lstar: Option<Hex>,
    /// GS base in effect (the per-CPU area while in the kernel).
    pub gs_base: Hex,
    /// IA32_KERNEL_GS_BASE (swapped in by `swapgs`); null without MSRs.
    pub kernel_gs_base: Option<Hex>,
    /// Code segment selector; its low two bits are the CPL.
    pub cs_selector: Hex,
    /// CS.L: the vCPU executes 64-bit code.
    pub cs_long: bool,
    /// Current privilege level (0 = kernel, 3 = user).
    pub cpl: u8,
    /// Kernel-virtual base of the interrupt descriptor table.
    pub idtr_base: Hex,
    /// IDT limit: its size in bytes, minus one.
    pub idtr_limit: Hex,
}

/// `GET /memory`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryReply {
    /// The guest-physical start (given, or translated from `va`).
    pub gpa: Hex,
    /// The kernel-virtual start, when the read was by `va`.
    pub va: Option<Hex>,
    /// Number of bytes read.
    pub len: u64,
    /// The bytes, two lowercase hex digits each.
    pub bytes: String,
}

/// `GET /symbols?name=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SymbolsReply {
    /// The name that was looked up.
    pub name: String,
    /// Every kallsyms entry of that name, in kallsyms order.
    pub symbols: Vec<SymbolEntry>,
}

/// One symbol of that name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SymbolEntry {
    /// Kernel-virtual address (a per-CPU offset when `per_cpu`).
    pub addr: Hex,
    /// klp's 1-based position among same-named symbols, in kallsyms order.
    pub sympos: u32,
    /// nm-style type, as /proc/kallsyms shows it.
    #[serde(rename = "type")]
    pub kind: String,
    /// A per-CPU variable: `addr` is its offset in each CPU's area.
    pub per_cpu: bool,
}

/// `GET /symbols?addr=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddrReply {
    /// The address that was looked up.
    pub addr: Hex,
    /// Name of the symbol at or below `addr`.
    pub name: String,
    /// `addr` minus the symbol's address.
    pub offset: Hex,
    /// The symbol's kernel-virtual address.
    pub symbol_addr: Hex,
    /// nm-style type, as /proc/kallsyms shows it.
    #[serde(rename = "type")]
    pub kind: String,
    /// klp sympos of that symbol among its name's occurrences.
    pub sympos: u32,
}

/// `GET /tasks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TasksReply {
    /// Number of tasks in `tasks`.
    pub count: usize,
    /// How long the VM was paused for the walk (null if it was paused
    /// already).
    pub out_of_guest_us: Option<f64>,
    /// Every task found on the guest's task list.
    pub tasks: Vec<TaskEntry>,
}

/// One task (thread).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskEntry {
    /// Thread id (`task_struct.pid`).
    pub pid: i32,
    /// Thread-group id: the process's pid (`task_struct.tgid`).
    pub tgid: i32,
    /// `task_struct.comm` (at most 15 bytes; /proc may show more for
    /// workqueue workers and long kernel-thread names).
    pub comm: String,
    /// The /proc state letter (R S D T t X Z P I).
    pub state: String,
    /// `task_struct.on_cpu`: the guest scheduler has it on a CPU.
    pub on_cpu: bool,
    /// The vCPU running it at the walk, if any, and its guest CPU number.
    pub vcpu: Option<usize>,
    /// Guest CPU number of that vCPU.
    pub cpu: Option<u32>,
    /// Set for each CPU's idle task (pid 0).
    pub idle_cpu: Option<u32>,
    /// A kernel thread (`PF_KTHREAD`).
    pub kthread: bool,
    /// A workqueue worker (`PF_WQ_WORKER`).
    pub wq_worker: bool,
    /// Address of the task_struct.
    pub task: Hex,
    /// Kernel-virtual start of its kernel stack.
    pub stack_start: Hex,
    /// Kernel-virtual end of its kernel stack.
    pub stack_end: Hex,
    /// `thread.sp`, saved at its last switch-out (stale while it runs).
    pub saved_sp: Hex,
}

/// Largest livepatch module `POST /patches` accepts, in bytes (modules
/// built with debug info are a few hundred KiB; 413 beyond).
pub const MAX_PATCH_BYTES: usize = 16 << 20;

/// Where a patch stands, in klp's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchState {
    /// Its functions are redirected (the newest enabled patch per function
    /// wins).
    Enabled,
    /// Disabled by the user; its code stays mapped until removed.
    Disabled,
    /// Disabled by a later `.replace = true` patch.
    Replaced,
    /// Waiting for a safe point.
    InTransition,
}

/// Why a patch is pinned: a forced transition took its code out of use,
/// so a task may still run it. klp then keeps the patch's module loaded
/// for good (`klp_force_transition` sets `patch->forced`, and a forced
/// patch's module reference is never dropped); klpvisor keeps the patch
/// the same way: it cannot be removed, enabled again, applied again or
/// brought back by a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Pin {
    /// A forced disable (or forced rollback) disabled it.
    ForcedDisable,
    /// A forced replace replaced it.
    ForcedReplace {
        /// The replace patch the forced transition enabled (`None`: a
        /// forced rollback).
        by: Option<String>,
    },
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pin::ForcedDisable => f.write_str("a forced transition disabled it"),
            Pin::ForcedReplace { by: Some(by) } => {
                write!(f, "the forced transition that enabled `{by}` replaced it")
            }
            Pin::ForcedReplace { by: None } => f.write_str("a forced rollback replaced it"),
        }
    }
}

impl fmt::Display for PatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatchState::Enabled => "enabled",
            PatchState::Disabled => "disabled",
            PatchState::Replaced => "replaced",
            PatchState::InTransition => "in transition",
        })
    }
}

/// Whether a patch's `klp_object` is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectState {
    /// vmlinux, or a module that is loaded: its functions are in `funcs`
    /// and redirected while the patch is enabled.
    Linked,
    /// A module that is not loaded: nothing of the object is linked or
    /// redirected. When the module loads, the object is linked and its
    /// functions redirected before any of the module's code runs (klp's
    /// `klp_module_coming`); when it unloads, the object waits again.
    Waiting,
}

impl fmt::Display for ObjectState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectState::Linked => "linked",
            ObjectState::Waiting => "waiting for its module to load",
        })
    }
}

/// The `struct module` that registers a patch with the guest kernel, and
/// what the kernel finds through it (README "Patch code as the kernel
/// sees it").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// Its `struct module` in guest memory (`/proc/modules` shows it).
    pub address: Hex,
    /// Exception fixups (`__ex_table`).
    pub extable: u64,
    /// BUG/WARN sites (`__bug_table`).
    pub bug_sites: u64,
    /// ORC unwind entries.
    pub orc_entries: u64,
    /// Named functions and data in its kallsyms.
    pub symbols: u64,
    /// Static-key sites (static branches, tracepoints) on the kernel's
    /// keys' lists.
    pub static_key_sites: u64,
    /// Distinct static keys those sites follow.
    pub static_keys: u64,
    /// Its per-CPU variables' block (`mod->percpu`, a per-CPU address the
    /// guest's allocator returned), if the patch has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percpu: Option<Hex>,
    /// Bytes of that block (`mod->percpu_size`), 0 without one.
    #[serde(default)]
    pub percpu_size: u64,
}

/// One `klp_object` of a patch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// `vmlinux` or the module's name (`klp_object.name`).
    pub name: String,
    /// Whether it is linked or waits for its module to load.
    pub state: ObjectState,
    /// Its number of `klp_func`s.
    pub funcs: u32,
    /// The last load of its module that this object refused (the module
    /// then failed to load in the guest), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// One patched function.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FuncInfo {
    /// The object it belongs to: `vmlinux` or a module's name.
    #[serde(default = "vmlinux")]
    pub object: String,
    /// `klp_func.old_name`.
    pub name: String,
    /// `klp_func.old_sympos` as given (0: the name is unique).
    pub sympos: u32,
    /// Kernel-virtual address of the function being replaced.
    pub old_addr: Hex,
    /// The 5 bytes at the old entry that become `jmp new_addr` (the ftrace
    /// nop, after ENDBR64 when the kernel has IBT).
    pub site: Hex,
    /// The replacement's address in the arena.
    pub new_addr: Hex,
    /// Whether the old function's entry jumps to `new_addr` now.
    pub live: bool,
    /// The `struct ftrace_ops` through which the guest's own ftrace
    /// redirects the function, as klp's does (its entry then stays
    /// ftrace's, and the function tracer, kprobes and BPF keep working on
    /// it); absent when a `jmp` written at the entry redirects it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ftrace_ops: Option<Hex>,
}

/// One patch, as `GET /patches` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchInfo {
    /// The module's name (klp's sysfs name).
    pub name: String,
    /// Enabled, disabled, replaced or in transition.
    pub state: PatchState,
    /// `klp_patch.replace`.
    pub replace: bool,
    /// Applied with `--force` (no safe-point check).
    pub forced: bool,
    /// Why it is pinned (kept loaded for good), if a forced transition
    /// took it out of use.
    #[serde(default)]
    pub pinned: Option<Pin>,
    /// When it was applied, seconds since the Unix epoch.
    pub applied_at: u64,
    /// Guest pause of the transition that applied it.
    pub pause_us: f64,
    /// Arena bytes its code and data occupy.
    pub arena_bytes: u64,
    /// How its signature was checked when it was applied: `unsigned`,
    /// `verified: KEYID (FILE.pub), level N` or `not verified: signed by
    /// KEYID at level N, no --trusted-keys` (see
    /// `klpvisor_engine::signature::Provenance`).
    #[serde(default = "unsigned")]
    pub signature: String,
    /// Every `klp_object`, in patch order, and whether it is linked or
    /// waits for its module.
    #[serde(default)]
    pub objects: Vec<ObjectInfo>,
    /// Its `klp_func`s, in patch order.
    pub funcs: Vec<FuncInfo>,
    /// Its registration as a guest module, if it has one (a guest whose
    /// BTF cannot describe `struct module` takes patches without tables).
    #[serde(default)]
    pub module: Option<ModuleInfo>,
}

fn unsigned() -> String {
    "unsigned".to_owned()
}

fn vmlinux() -> String {
    "vmlinux".to_owned()
}

/// `GET /patches`: the stack, oldest first, and what runs now.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PatchesReply {
    /// The loaded patches, oldest first.
    pub patches: Vec<PatchInfo>,
    /// Every redirected function and the code its entry jumps to now.
    #[serde(default)]
    pub live: Vec<LiveFunc>,
    /// The transition waiting for a safe point, if one is.
    #[serde(default)]
    pub transition: Option<PendingTransition>,
    /// Removed patches whose code stays mapped until no task's stack
    /// references it.
    #[serde(default)]
    pub retired: Vec<RetiredInfo>,
    /// The call gate that runs klp callbacks, once installed.
    #[serde(default)]
    pub gate: Option<GateInfo>,
    /// The probe on the guest's `sched_switch` that logs context switches
    /// for the safe-point pause, once a transition installed it.
    #[serde(default)]
    pub switch_log: Option<SwitchLogInfo>,
    /// The last transitions that ended, committed or not, oldest first:
    /// how a transition finished whose request timed out or whose client
    /// went away.
    #[serde(default)]
    pub ended: Vec<EndedTransition>,
    /// Every `struct ftrace_ops` klpvisor has registered with the guest's
    /// ftrace, one per function: live ones redirect, the others are inert
    /// and let go once changes pause.
    #[serde(default)]
    pub ftrace: Vec<FtraceRedirect>,
    /// Guest-physical address of the page holding the handler of those
    /// ops, once installed (installed on first use and kept, as the call
    /// gate's pages are).
    #[serde(default)]
    pub ftrace_handler_gpa: Option<Hex>,
}

/// One function's `struct ftrace_ops` in the guest's ftrace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FtraceRedirect {
    /// The function's name.
    pub name: String,
    /// Its address.
    pub old_addr: Hex,
    /// The `struct ftrace_ops`.
    pub ops: Hex,
    /// `assigned` (a transition will register it), `filtered` (its filter
    /// set, not registered yet or any more), `registered`, `unregistered`
    /// (its filter not freed yet), or `lost` (a step the guest did not run
    /// in time: the slot is never used again).
    pub state: String,
    /// Whether it redirects the function now (its target is set).
    pub live: bool,
}

/// A transition that has ended, as `GET /patches` keeps the last
/// [`ENDED_KEPT`] of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndedTransition {
    /// The patch it was for, as [`PendingTransition::patch`] showed it.
    pub patch: String,
    /// `apply`, `disable`, `enable` or `rollback`.
    pub action: String,
    /// Run with `--force` (no safe-point check).
    pub forced: bool,
    /// Seconds since the Unix epoch.
    pub ended_at: u64,
    /// Pauses it took, committing or not.
    pub attempts: u32,
    /// From the first attempt to the end.
    pub waited_ms: f64,
    /// Its number in the history when it committed (`None`: nothing of it
    /// stands; `error` says why).
    pub seq: Option<u64>,
    /// Why it did not commit, or what went wrong after it did.
    pub error: Option<String>,
}

/// How many ended transitions `GET /patches` keeps.
pub const ENDED_KEPT: usize = 16;

/// The call gate: klpvisor's own code in the guest (see README,
/// "Callbacks"), shown like any other code klpvisor put there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateInfo {
    /// Its code page (two functions).
    pub text: Hex,
    /// Its data page (irq_work, work_struct, mailbox).
    pub data: Hex,
    /// Guest-physical address of the data page.
    pub data_gpa: Hex,
    /// Guest-physical address of the code page.
    #[serde(default)]
    pub text_gpa: Hex,
    /// Callbacks sent so far.
    pub calls: u64,
}

/// The switch log: klpvisor's probe on the guest's `sched_switch`
/// tracepoint and its ring (see README, "What the pause costs").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchLogInfo {
    /// `registered`, `installed` (its registration not run yet), or `off:
    /// REASON` (every pause reads every task).
    pub state: String,
    /// The probe's code (what `sched_switch`'s probe list shows).
    pub probe: Hex,
    /// Guest-physical address of the probe's page.
    pub probe_gpa: Hex,
    /// The ring, the probe's data argument.
    pub ring: Hex,
    /// Guest-physical address of the ring.
    pub ring_gpa: Hex,
    /// The ring's bytes (whole pages).
    pub ring_bytes: u64,
    /// Entries the ring holds (two per switch).
    pub entries: u64,
    /// Entries written so far (the head), as last read.
    pub head: u64,
}

/// A redirected function: what `cat /sys/kernel/livepatch/*/...` cannot
/// tell you in one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveFunc {
    /// `klp_func.old_name` of the redirected function.
    pub name: String,
    /// Its klp sympos (0: the name is unique).
    pub sympos: u32,
    /// Kernel-virtual entry of the original function.
    pub old_addr: Hex,
    /// Where the entry jumps.
    pub target: Hex,
    /// The patch that code belongs to.
    pub patch: String,
}

/// A transition retrying for a safe point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingTransition {
    /// The patch the transition is for.
    pub patch: String,
    /// `apply`, `disable` or `enable`.
    pub action: String,
    /// Started with `--force` (no safe-point check).
    pub forced: bool,
    /// Since the first attempt.
    pub waited_ms: f64,
    /// Pauses tried so far.
    pub attempts: u32,
    /// The tasks that blocked the last attempt.
    pub blockers: Vec<String>,
}

impl PendingTransition {
    /// A transition of `patch` that has just begun, before any attempt.
    pub fn begun(patch: &str, action: &str, forced: bool) -> Self {
        Self {
            patch: patch.to_owned(),
            action: action.to_owned(),
            forced,
            waited_ms: 0.0,
            attempts: 0,
            blockers: Vec::new(),
        }
    }

    /// Its attempts so far, the time since the first, and what blocked
    /// the last.
    pub fn waiting(
        &mut self,
        attempts: u32,
        waited: std::time::Duration,
        blockers: impl IntoIterator<Item = String>,
    ) {
        self.attempts = attempts;
        self.waited_ms = waited.as_secs_f64() * 1e3;
        self.blockers = blockers.into_iter().collect();
    }
}

/// A removed patch whose arena space is not reusable yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetiredInfo {
    /// The patch's module name.
    pub name: String,
    /// Seconds since the Unix epoch.
    pub removed_at: u64,
    /// Arena bytes it still holds.
    pub arena_bytes: u64,
}

/// `POST /patches`, `POST /patches/{name}/disable`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransitionReply {
    /// The patch as it stands after the transition.
    pub patch: PatchInfo,
    /// Parsing, resolving and linking, done while the guest ran.
    pub prepare_ms: f64,
    /// The pause in which every guest write happened: from the pause
    /// request until the vCPUs were released.
    pub pause_us: f64,
    /// Guest bytes written in that pause.
    pub bytes_written: u64,
    /// Pauses it took to find a safe point (1: the first).
    #[serde(default)]
    pub attempts: u32,
    /// From the first pause to the committing one (0 when the first
    /// found a safe point).
    #[serde(default)]
    pub waited_ms: f64,
    /// Tasks that got klp's fake signal because they slept in a function
    /// the transition changes (see README, "Consistency model").
    #[serde(default)]
    pub nudged: u32,
    /// Tasks whose stacks the committing pause read: once the guest's
    /// switch log is registered, only those that may have run since they
    /// were judged with the guest running (see README, "What the pause
    /// costs"); otherwise every task. 0 when no stack was checked.
    #[serde(default)]
    pub pause_tasks: u32,
    /// What this transition did not do that in-kernel livepatch would,
    /// or what went wrong after it committed (a post callback that did
    /// not return in time).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The klp callbacks run, in order.
    #[serde(default)]
    pub callbacks: Vec<CallbackRun>,
}

/// One klp callback the VMM ran in the guest (see README, "Callbacks").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackRun {
    /// The patch whose callback it is.
    pub patch: String,
    /// `pre_patch`, `post_patch`, `pre_unpatch` or `post_unpatch`.
    pub callback: CallbackKind,
    /// The `struct klp_object` it got.
    pub object: Hex,
    /// `pre_patch`'s return value (0 lets the patch go on); `None` for
    /// the void callbacks and for a call that did not finish.
    pub ret: Option<i32>,
    /// From sending it to its result, guest running throughout.
    pub ms: f64,
    /// Whether it finished in time.
    pub done: bool,
}

/// One committed transition, as `GET /history` lists it: what it did and
/// the stack it started from, which `POST /rollback?to=SEQ` returns to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// 1 for the first transition of this VMM, then counting up.
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `apply`, `disable`, `enable` or `rollback`.
    pub action: String,
    /// The patch it applied, disabled or enabled (`rollback`: `#SEQ`).
    pub patch: String,
    /// Run with `--force` (no safe-point check).
    pub forced: bool,
    /// Each loaded patch and its state just before it, oldest first.
    pub before: Vec<(String, PatchState)>,
}

/// `POST /rollback`: the stack is back where it was before transition `to`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackReply {
    /// The transition whose starting point was restored.
    pub to: u64,
    /// This rollback's own number in the history (it can be rolled back
    /// too).
    pub seq: u64,
    /// The stack after the rollback, oldest first.
    pub patches: Vec<PatchInfo>,
    /// Parsing, resolving and linking, done while the guest ran.
    pub prepare_ms: f64,
    /// The pause in which every guest write happened.
    pub pause_us: f64,
    /// Guest bytes written in that pause.
    pub bytes_written: u64,
    /// Pauses it took to find a safe point (1: the first).
    pub attempts: u32,
    /// From the first pause to the committing one.
    pub waited_ms: f64,
    /// Tasks that got klp's fake signal (as in [`TransitionReply`]).
    #[serde(default)]
    pub nudged: u32,
    /// Tasks whose stacks the committing pause read (as in
    /// [`TransitionReply`]).
    #[serde(default)]
    pub pause_tasks: u32,
    /// The klp callbacks run, in order.
    #[serde(default)]
    pub callbacks: Vec<CallbackRun>,
    /// What the rollback did not do that in-kernel livepatch would, or what went wrong after it committed.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// One of the four `struct klp_callbacks` members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackKind {
    /// `klp_callbacks.pre_patch`: runs before the patch is enabled; may refuse it.
    PrePatch,
    /// `klp_callbacks.post_patch`: runs after the patch is enabled.
    PostPatch,
    /// `klp_callbacks.pre_unpatch`: runs before the patch is disabled.
    PreUnpatch,
    /// `klp_callbacks.post_unpatch`: runs after the patch is disabled.
    PostUnpatch,
}

impl CallbackKind {
    /// klp's name of the member (`pre_patch`, ...), as the API spells it.
    pub fn name(self) -> &'static str {
        match self {
            CallbackKind::PrePatch => "pre_patch",
            CallbackKind::PostPatch => "post_patch",
            CallbackKind::PreUnpatch => "pre_unpatch",
            CallbackKind::PostUnpatch => "post_unpatch",
        }
    }

    /// The post callback that undoes a passed pre step.
    pub fn cancel(self) -> Option<CallbackKind> {
        match self {
            CallbackKind::PrePatch => Some(CallbackKind::PostUnpatch),
            CallbackKind::PreUnpatch => Some(CallbackKind::PostPatch),
            _ => None,
        }
    }

    /// Only `pre_patch` returns a value that matters (int; non-zero refuses).
    pub fn returns(self) -> bool {
        self == CallbackKind::PrePatch
    }
}

impl std::fmt::Display for CallbackKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Firecracker's `PATCH /vm` bodies work; ours too; replies stay ours.
    #[test]
    fn patch_vm_takes_firecrackers_states() {
        let state = |b: &str| serde_json::from_str::<StateChange>(b).map(|c| c.state);
        assert_eq!(state(r#"{"state":"Paused"}"#).unwrap(), VmState::Paused);
        assert_eq!(state(r#"{"state":"Resumed"}"#).unwrap(), VmState::Running);
        assert_eq!(state(r#"{"state":"paused"}"#).unwrap(), VmState::Paused);
        assert_eq!(state(r#"{"state":"running"}"#).unwrap(), VmState::Running);
        assert!(state(r#"{"state":"Stopped"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&VmState::Running).unwrap(),
            r#""running""#
        );
    }

    /// `patcher list` and API clients read why a patch is pinned; a reply
    /// from a VMM that predates pins reads as not pinned.
    #[test]
    fn a_pin_says_why_on_the_wire_and_in_words() {
        let pin = Pin::ForcedReplace {
            by: Some("v1r".into()),
        };
        let j = serde_json::to_string(&pin).unwrap();
        assert_eq!(j, r#"{"reason":"forced_replace","by":"v1r"}"#);
        assert_eq!(serde_json::from_str::<Pin>(&j).unwrap(), pin);
        assert_eq!(
            serde_json::to_string(&Pin::ForcedDisable).unwrap(),
            r#"{"reason":"forced_disable"}"#
        );
        assert!(pin
            .to_string()
            .contains("forced transition that enabled `v1r`"));
        let old = r#"{"name":"p","state":"replaced","replace":true,"forced":false,
            "applied_at":0,"pause_us":0.0,"arena_bytes":0,"funcs":[]}"#;
        let info: PatchInfo = serde_json::from_str(old).unwrap();
        assert_eq!(info.pinned, None);
    }

    #[test]
    fn hex_round_trips_as_strings() {
        let j = serde_json::to_string(&Hex(0xffff_ffff_8100_0000)).unwrap();
        assert_eq!(j, "\"0xffffffff81000000\"");
        let h: Hex = serde_json::from_str(&j).unwrap();
        assert_eq!(h, Hex(0xffff_ffff_8100_0000));
        assert_eq!(parse_hex("1F").unwrap(), 0x1f);
        assert!(parse_hex("0x").is_err());
        assert!(parse_hex("0x1ffffffffffffffff").is_err());
        assert!(parse_hex("xyz").is_err());
    }
}

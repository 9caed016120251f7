//! seccomp-bpf filters, one per thread kind, as Firecracker confines its
//! VMM: once set up, a thread may make only the system calls its job needs,
//! and anything else stops the VMM with a report naming the call.
//!
//! Why: the VMM parses hostile input all day (guest memory, the control
//! socket, patch files). A bug there that gave an attacker code execution
//! should not also give them the host: no `execve`, no new sockets or
//! files, no `ptrace`, no ioctls beyond the KVM calls each thread makes.
//!
//! The kinds, and what each adds to the [`BASE`] calls every thread makes
//! (memory, threads and futexes, clocks, signals, `read`/`write` on the
//! descriptors it already holds, exit):
//! - [`Kind::Vcpu`]: `KVM_RUN` and the register ioctls on its own vCPU,
//!   and the virtio-blk requests it serves: `pread64`, `pwrite64` and
//!   `fdatasync` on the disk images opened at set-up.
//! - [`Kind::Api`]: the control socket (accept and serve, epoll), and the
//!   patch engine's calls: `KVM_SIGNAL_MSI` for the call gate and `tgkill`
//!   to stop vCPUs for a pause. The API's runtime threads, the `--patch`
//!   thread and the module-hook thread are of this kind.
//! - [`Kind::Vmm`]: the main thread once the VM runs, the console drains,
//!   the stdin pump and the signal thread: terminal mode, the socket file's
//!   removal at exit.
//! - [`Kind::Net`]: a virtio-net device thread, which moves frames between
//!   the guest and its tap: nothing beyond [`BASE`] (`poll`, `read` and
//!   `write` on the tap and the eventfds it was handed) and no ioctl at
//!   all, since it reads guest-controlled descriptors all day.
//!
//! Each thread applies its own filter as it starts ([`enter`]); the main
//! thread applies [`Kind::Vmm`] once every file, socket and KVM object is
//! set up. A filtered thread's children inherit its filter, so nothing runs
//! unfiltered once [`prepare`] has been called. A call outside the filter
//! raises `SIGSYS`; the handler writes one line to stderr naming the call
//! and the thread kind, and the VMM exits with [`EXIT_FORBIDDEN_SYSCALL`].
//! `vmm --no-seccomp` leaves every thread unfiltered (for debugging).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The VMM's exit code after a forbidden system call.
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 6;

/// The KVM ioctl numbers the filters allow, as `<linux/kvm.h>` defines them.
#[allow(missing_docs)]
mod nr {
    use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msi, kvm_msrs, kvm_regs, kvm_sregs};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
}
use nr::*;

/// A thread's job, which decides its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Runs one vCPU.
    Vcpu,
    /// Serves the control socket or drives the patch engine.
    Api,
    /// The main thread and the VMM's small I/O threads.
    Vmm,
    /// A virtio-net device thread (its tap and its queues' eventfds).
    Net,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Vcpu => "vcpu",
            Kind::Api => "api",
            Kind::Vmm => "vmm",
            Kind::Net => "net",
        }
    }
}

/// Why the filters could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter rules do not compile (a klpvisor bug).
    #[error("cannot build the {kind} thread's seccomp filter: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler said.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no seccomp support?).
    #[error("cannot apply the {kind} thread's seccomp filter (run with --no-seccomp on a kernel without seccomp-bpf): {source}")]
    Apply {
        /// The thread kind.
        kind: &'static str,
        /// What the kernel said.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// Calls every thread makes: memory, threads (`clone`, see [`filter`]),
/// futexes, clocks and sleeps,
/// signal delivery and masks (the vCPU kick, signal-hook's handler writing
/// to its socket), reads and writes on descriptors already open (eventfds,
/// the log), `getrandom` for hash seeds, and exit.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_sendto,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The virtio-blk requests a vCPU serves when the guest notifies the
/// queue (`devices::virtio::block`): positioned reads and writes on the
/// image, and FLUSH.
const VCPU: &[i64] = &[libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fdatasync];

/// The control socket (tokio over epoll, hyper on accepted connections)
/// and the engine's work.
const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
];

/// The main thread's exit (the socket file's removal) and the I/O threads.
const VMM: &[i64] = &[
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
];

/// The ioctls each kind may make (`request` is the second argument).
fn ioctls(kind: Kind) -> Vec<u64> {
    match kind {
        Kind::Vcpu => vec![
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_SET_REGS(),
            KVM_GET_SREGS(),
            KVM_SET_SREGS(),
            KVM_GET_MSRS(),
            KVM_SET_MSRS(),
            KVM_GET_FPU(),
            KVM_SET_FPU(),
            KVM_GET_LAPIC(),
            KVM_SET_LAPIC(),
        ],
        Kind::Api => vec![
            KVM_SIGNAL_MSI(),
            KVM_GET_LAPIC(),
            libc::FIONBIO,
            libc::FIOCLEX,
        ],
        // Raw mode on and off for the terminal on stdin.
        Kind::Vmm => vec![
            libc::TCGETS,
            libc::TCSETS,
            libc::TCSETSW,
            libc::TCSETSF,
            libc::FIONBIO,
        ],
        // The tap was configured before the thread started.
        Kind::Net => Vec::new(),
    }
}

/// The filter for `kind`: its calls allowed, any other raises SIGSYS.
pub fn filter(kind: Kind) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let extra: &[i64] = match kind {
        Kind::Vcpu => VCPU,
        Kind::Api => API,
        Kind::Vmm => VMM,
        Kind::Net => &[],
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BASE
        .iter()
        .chain(extra)
        .chain(OPEN)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let ioctl = ioctls(kind)
        .into_iter()
        .map(|request| {
            let on = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?;
            SeccompRule::new(vec![on])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(build)?;
    // An empty rule list would allow every request: a kind without
    // ioctls gets no entry, so any ioctl traps.
    if !ioctl.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl);
    }
    // Threads, never processes: `clone` only with CLONE_THREAD, so a
    // thread that went wrong cannot fork. `clone3` passes its flags in
    // memory, which a filter cannot read; it passes here and the stacked
    // filter makes it fail with ENOSYS, so glibc falls back to `clone`.
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .and_then(|on| SeccompRule::new(vec![on]))
    .map_err(build)?;
    rules.insert(libc::SYS_clone, vec![thread]);
    rules.insert(libc::SYS_clone3, Vec::new());
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    f.try_into().map_err(build)
}

/// Calls that open a file. No VMM thread opens one once set up, but glibc's
/// allocator may try, inside `malloc` or `free`: it reads
/// `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread
/// arena's heap, and the CPU count from `/sys` when it needs a ninth arena
/// (found in patch-bad: a `free` on a new tokio thread). Both cope with a
/// failed open. So these calls pass the kind's filter but a second filter
/// makes them fail with EACCES: nothing is opened, and an allocation is
/// never a reason to stop the VMM.
const OPEN: &[i64] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
];

/// The filters stacked on every kind's: [`OPEN`] fails with EACCES, and
/// `clone3` with ENOSYS (glibc then uses `clone`, whose flags the kind's
/// filter checks); all else is left to the kind's filter.
fn soft_failures() -> Result<[BpfProgram; 2], SeccompError> {
    let build = |source| SeccompError::Build {
        kind: "soft-failure",
        source,
    };
    let fail = |calls: &[i64], errno: i32| -> Result<BpfProgram, SeccompError> {
        let rules = calls.iter().map(|&nr| (nr, Vec::new())).collect();
        SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            TargetArch::x86_64,
        )
        .map_err(build)?
        .try_into()
        .map_err(build)
    };
    Ok([
        fail(OPEN, libc::EACCES)?,
        fail(&[libc::SYS_clone3], libc::ENOSYS)?,
    ])
}

/// The compiled filters, once [`prepare`] has run with filtering on.
struct Filters {
    vcpu: BpfProgram,
    api: BpfProgram,
    vmm: BpfProgram,
    net: BpfProgram,
    soft_failures: [BpfProgram; 2],
}

static FILTERS: OnceLock<Option<Filters>> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the SIGSYS report (0: none applied).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Compiles the filters and installs the SIGSYS handler; with `enabled`
/// false, [`enter`] does nothing from then on. Call once, before the VMM's
/// threads start.
pub fn prepare(enabled: bool) -> Result<(), SeccompError> {
    let filters = if enabled {
        install_handler()?;
        std::panic::set_hook(Box::new(report_panic));
        Some(Filters {
            vcpu: filter(Kind::Vcpu)?,
            api: filter(Kind::Api)?,
            vmm: filter(Kind::Vmm)?,
            net: filter(Kind::Net)?,
            soft_failures: soft_failures()?,
        })
    } else {
        None
    };
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Applies `kind`'s filter to the calling thread, if [`prepare`] turned
/// filtering on (never in unit tests, which do not call it).
pub fn enter(kind: Kind) -> Result<(), SeccompError> {
    let Some(Some(f)) = FILTERS.get() else {
        return Ok(());
    };
    let prog = match kind {
        Kind::Vcpu => &f.vcpu,
        Kind::Api => &f.api,
        Kind::Vmm => &f.vmm,
        Kind::Net => &f.net,
    };
    KIND.with(|k| k.set(kind as u8 + 1));
    // A thread started by a filtered thread (tokio's blocking pool grows
    // from its workers) already runs its parent's filter, of the same
    // kind; `seccomp(2)` itself is not in any filter.
    // SAFETY: PR_GET_SECCOMP takes no pointer and cannot fail here.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } == 2 {
        return Ok(());
    }
    let apply = |prog| {
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Apply {
            kind: kind.name(),
            source,
        })
    };
    // The soft-failure filters first: the kind's filter then forbids
    // `seccomp(2)` itself.
    for soft in &f.soft_failures {
        apply(soft)?;
    }
    apply(prog)
}

/// [`enter`] for a thread that cannot return an error: a thread that
/// cannot be confined stops the VMM rather than run unconfined.
pub fn enter_or_exit(kind: Kind) {
    if let Err(e) = enter(kind) {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

/// Whether the threads are filtered (for `GET /vm`).
pub fn enabled() -> bool {
    matches!(FILTERS.get(), Some(Some(_)))
}

/// The panic report of a filtered VMM. std's default hook symbolizes a
/// backtrace when `RUST_BACKTRACE` is set, which opens the VMM's own binary
/// and asks for the working directory: calls no filter allows, so a panic
/// the VMM would have contained (a bug on hostile input, answered 500)
/// would stop it instead. This one writes the thread, the place and the
/// message, and says how to get a backtrace.
fn report_panic(info: &std::panic::PanicHookInfo<'_>) {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let msg = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("Box<dyn Any>");
    let place = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    eprintln!(
        "thread '{name}' panicked at {place}:\n{msg}\n(no backtrace under the seccomp filter: \
         run with --no-seccomp and RUST_BACKTRACE=1 for one)"
    );
}

fn install_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction with a valid handler address and an empty
    // mask; `on_sigsys` only calls async-signal-safe functions.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Names of calls a compromised or buggy VMM might try, for the report;
/// others are given by number.
const NAMES: &[(i64, &str)] = &[
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_clone, "clone (a new process, not a thread)"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_open, "open"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_ioctl, "ioctl (this request)"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_sysinfo, "sysinfo"),
    (libc::SYS_memfd_create, "memfd_create"),
];

/// Where the kernel puts the call's number in `siginfo_t` for SIGSYS
/// (`si_syscall`, after `si_signo`, `si_errno`, `si_code`, padding and
/// `si_call_addr`, on x86_64).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" {
    /// The linker's symbols at the start of the VMM's image and the end of
    /// its code: a stack word between them is a return address into the
    /// VMM (an offset from the start is what `addr2line -e vmm` takes for
    /// a position-independent binary).
    static __executable_start: u8;
    static etext: u8;
}

/// How many words above the interrupted stack pointer the report scans
/// for return addresses into the VMM's code.
const SCAN_WORDS: usize = 256;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers;
    // si_syscall is an int at SI_SYSCALL_OFFSET for SIGSYS.
    let nr = unsafe {
        (info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let kind = KIND.with(|k| match k.get() {
        1 => "vcpu",
        2 => "api",
        3 => "vmm",
        4 => "net",
        _ => "unnamed",
    });
    let mut buf = Line::default();
    buf.push("vmm: the seccomp filter stopped the VMM: a ");
    buf.push(kind);
    buf.push(" thread made system call ");
    buf.push_num(i64::from(nr));
    if let Some((_, name)) = NAMES.iter().find(|(n, _)| *n == i64::from(nr)) {
        buf.push(" (");
        buf.push(name);
        buf.push(")");
    }
    buf.push(
        ", which its filter does not allow; a klpvisor bug unless the VMM was \
         compromised: report it with the log (vmm --no-seccomp runs unfiltered)\n",
    );
    // Where it came from, for the report: return addresses into the VMM's
    // code found just above the stack pointer, as offsets into the binary.
    // SAFETY: the kernel passes the interrupted context; the words read
    // are the thread's own stack just above its stack pointer (a system
    // call is made deep in a call chain, far below the stack's top).
    unsafe {
        let start = std::ptr::addr_of!(__executable_start) as u64;
        let end = std::ptr::addr_of!(etext) as u64;
        let uc = ctx as *const libc::ucontext_t;
        let sp = (*uc).uc_mcontext.gregs[libc::REG_RSP as usize] as u64;
        buf.push("vmm: code addresses on that stack (addr2line -f -C -e vmm ADDR...):");
        let mut shown = 0;
        for i in 0..SCAN_WORDS {
            let w = (sp as *const u64).add(i).read_volatile();
            if w > start && w < end && shown < 24 {
                buf.push(" 0x");
                buf.push_hex(w - start);
                shown += 1;
            }
        }
        buf.push("\n");
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, buf.bytes.as_ptr().cast(), buf.len);
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

/// A fixed buffer a signal handler can format into without allocating.
struct Line {
    bytes: [u8; 1024],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            bytes: [0; 1024],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, s: &str) {
        for &b in s.as_bytes() {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_hex(&mut self, n: u64) {
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((n >> (shift * 4)) & 0xf) as u8;
            if d != 0 || started || shift == 0 {
                started = true;
                let c = if d < 10 { b'0' + d } else { b'a' + d - 10 };
                if self.len < self.bytes.len() {
                    self.bytes[self.len] = c;
                    self.len += 1;
                }
            }
        }
    }

    fn push_num(&mut self, n: i64) {
        if n < 0 {
            self.push("-");
        }
        let mut digits = [0u8; 20];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = d;
                self.len += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Run as a child of the tests below (KLPV_SECCOMP_CHILD names what to
    /// do); a no-op in a normal test run.
    #[test]
    fn seccomp_child() {
        let Ok(what) = std::env::var("KLPV_SECCOMP_CHILD") else {
            return;
        };
        prepare(true).expect("prepare");
        let kind = match std::env::var("KLPV_SECCOMP_KIND").as_deref() {
            Ok("net") => Kind::Net,
            _ => Kind::Vcpu,
        };
        // What a net thread is handed, made before its filter applies.
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        enter(kind).expect("enter");
        match what.as_str() {
            // Allowed: memory, a thread, a futex, a write.
            "allowed" => {
                let v: Vec<u8> = vec![7; 1 << 20];
                let t = std::thread::spawn(move || v.iter().map(|&b| u64::from(b)).sum::<u64>());
                let sum = t.join().expect("join");
                println!("sum={sum}");
                std::process::exit(0);
            }
            // An open fails (EACCES); the thread goes on.
            "open" => {
                let r = std::fs::File::open("/proc/self/status");
                println!("open={:?}", r.map(drop).map_err(|e| e.raw_os_error()));
                std::process::exit(0);
            }
            // Not allowed on a vCPU thread: a new socket.
            "socket" => {
                // SAFETY: a plain socket(2) call; the filter stops it.
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                std::process::exit(0);
            }
            // A new process: glibc's fork() is a clone(2) without
            // CLONE_THREAD.
            "fork" => {
                // SAFETY: fork in a single-purpose child; the filter stops it.
                let pid = unsafe { libc::fork() };
                println!("forked={pid}");
                std::process::exit(0);
            }
            // clone3 fails softly (its flags are out of a filter's reach),
            // so glibc falls back to clone for threads.
            "clone3" => {
                // SAFETY: clone3 with a null argument; the filter answers
                // before the kernel would read it.
                let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                println!("clone3={r} errno={errno:?}");
                std::process::exit(0);
            }
            // An ioctl the vCPU filter does not list (TIOCSTI would push
            // bytes into a terminal's input).
            "tiocsti" => {
                let c = b'x';
                // SAFETY: an ioctl on stdin with a valid byte pointer.
                unsafe { libc::ioctl(0, libc::TIOCSTI, &c) };
                std::process::exit(0);
            }
            // A net device thread's job: wait on an eventfd it was
            // handed, read and write it.
            "net-io" => {
                let e = evt;
                e.write(3).expect("write");
                let mut fds = [libc::pollfd {
                    fd: std::os::unix::io::AsRawFd::as_raw_fd(&e),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd for the call's duration.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
                println!("polled={n} read={}", e.read().expect("read"));
                std::process::exit(0);
            }
            // Even the non-blocking switch other kinds may flip is not a
            // net thread's.
            "fionbio" => {
                let on: libc::c_int = 1;
                // SAFETY: FIONBIO on stdin with a valid int pointer.
                unsafe { libc::ioctl(0, libc::FIONBIO, &on) };
                std::process::exit(0);
            }
            // A panic contained by catch_unwind, as the API's handlers
            // contain a bug on hostile input.
            "panic" => {
                let r = std::panic::catch_unwind(|| {
                    let v: Vec<u32> = Vec::new();
                    v[3]
                });
                println!("contained={}", r.is_err());
                std::process::exit(0);
            }
            other => panic!("unknown child action {other}"),
        }
    }

    /// Runs `seccomp_child` doing `what`, with RUST_BACKTRACE=1: under it
    /// std's own panic hook would open the binary.
    fn child(what: &str) -> std::process::Output {
        child_of_kind(what, "vcpu")
    }

    /// [`child`] on a thread of `kind` ("vcpu" or "net").
    fn child_of_kind(what: &str, kind: &str) -> std::process::Output {
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "seccomp::tests::seccomp_child", "--nocapture"])
            .env("KLPV_SECCOMP_CHILD", what)
            .env("KLPV_SECCOMP_KIND", kind)
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("run the child")
    }

    #[test]
    fn a_filtered_thread_can_do_its_job() {
        let out = child("allowed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(stdout.contains("sum=7340032"), "{stdout}");
    }

    #[test]
    fn opening_a_file_fails_without_stopping_the_vmm() {
        let out = child("open");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(stdout.contains("open=Err(Some(13))"), "{stdout}");
    }

    #[test]
    fn a_contained_panic_stays_inside_the_filter() {
        let out = child("panic");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(stdout.contains("contained=true"), "{stdout}");
        assert!(
            stderr.contains("panicked at") && stderr.contains("index out of bounds"),
            "{stderr}"
        );
    }

    #[test]
    fn a_forbidden_call_stops_the_vmm_with_a_report_naming_it() {
        let out = child("socket");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_FORBIDDEN_SYSCALL), "{out:?}");
        assert!(
            stderr.contains("a vcpu thread made system call 41 (socket)"),
            "{stderr}"
        );
    }

    #[test]
    fn a_thread_cannot_start_a_process() {
        let out = child("fork");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_FORBIDDEN_SYSCALL), "{out:?}");
        assert!(
            stderr.contains("system call 56 (clone (a new process, not a thread))"),
            "{stderr}"
        );
        let out = child("clone3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(stdout.contains("clone3=-1 errno=Some(38)"), "{stdout}");
    }

    #[test]
    fn an_ioctl_outside_the_list_is_forbidden() {
        let out = child("tiocsti");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_FORBIDDEN_SYSCALL), "{out:?}");
        assert!(stderr.contains("(ioctl (this request))"), "{stderr}");
    }

    #[test]
    fn a_net_thread_polls_and_moves_bytes_but_makes_no_ioctl_or_socket() {
        let out = child_of_kind("net-io", "net");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(stdout.contains("polled=1 read=3"), "{stdout}");
        for (what, call) in [
            ("fionbio", "(ioctl (this request))"),
            ("socket", "41 (socket)"),
        ] {
            let out = child_of_kind(what, "net");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(EXIT_FORBIDDEN_SYSCALL), "{out:?}");
            assert!(stderr.contains("a net thread made system call"), "{stderr}");
            assert!(stderr.contains(call), "{stderr}");
        }
    }

    #[test]
    fn every_kind_compiles() {
        for kind in [Kind::Vcpu, Kind::Api, Kind::Vmm, Kind::Net] {
            let prog = filter(kind).expect("filter");
            assert!(!prog.is_empty());
        }
    }

    #[test]
    fn numbers_format_without_allocating() {
        let mut l = Line::default();
        l.push("n=");
        l.push_num(0);
        l.push(",");
        l.push_num(-12345);
        l.push(",");
        l.push_hex(0x1f0a);
        l.push(",");
        l.push_hex(0);
        assert_eq!(&l.bytes[..l.len], b"n=0,-12345,1f0a,0");
    }
}

//! [`QemuGuest`]: a running QEMU's guest as a [`Guest`], and its pause and
//! resume.
//!
//! Attaching connects to QMP, finds the QEMU process (below), takes the
//! guest-physical memory map from `info mtree -f` and each range's host
//! address from `gpa2hva`, opens `/proc/PID/mem`, and checks a few
//! quadwords read so against QEMU's own `xp` of them: the map and the
//! process are right only if both agree.
//!
//! The process: QMP has no command for QEMU's pid. The kernel tells the
//! pid of the socket's listener (`SO_PEERCRED`), which is QEMU's unless
//! another process (libvirt) created the socket and passed it on; QEMU
//! reports its vCPU threads' ids (`query-cpus-fast`), whose thread group
//! (`/proc/TID/status`, `Tgid`) is QEMU's pid in this pid namespace. The
//! vCPU threads' group is preferred, the peer pid is the fallback, and
//! the memory check above decides.
//!
//! Registers come from `info registers` (see [`crate::hmp`]). It prints
//! no MSR but EFER, so KERNEL_GS_BASE is taken from the CPU-state notes
//! of a `dump-guest-memory` of one page, written into a memfd passed to
//! QEMU (`getfd`), only while the VM is paused and only when the notes
//! agree with `info registers` (RIP, CR3, GS base); else it is `None`.
//! LSTAR has no source in QEMU's monitor and stays `None`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use klpvisor_guest::{DumpError, DumpGuest, Guest, GuestPhys, VcpuRegs};
use serde_json::{json, Value};

use crate::hmp::{self, HmpCpu, HmpError};
use crate::mem::{GuestRam, Mapped, RamError};
use crate::qmp::{QemuVersion, Qmp, QmpError};

/// QEMU id of the memory backend of the arena klpvisor hot-plugs; QEMU
/// names the BAR's memory region after it in `info mtree -f`, which is how
/// a re-attach finds the arena an earlier attach added.
pub const ARENA_MEMDEV: &str = "klpvarena";
/// QEMU id of the `ivshmem-plain` device that puts the arena in the guest's
/// physical address space (its BAR 2).
pub const ARENA_DEVICE: &str = "klpvdev";
/// Size of the arena klpvisor hot-plugs: the VMM's default arena size.
/// A power of two, as PCI BARs are, so the guest aligns it to its size
/// (2 MiB alignment is what the engine's large mappings would need).
pub const ARENA_SIZE: u64 = 16 << 20;
/// How long the guest may take to assign the hot-plugged device's BAR
/// (ACPI hot-plug runs in a guest kworker).
const ARENA_WAIT: Duration = Duration::from_secs(10);
/// What to put on QEMU's command line instead of hot-plugging the arena.
pub const ARENA_COMMAND_LINE: &str = "-object memory-backend-memfd,id=klpvarena,size=16M,share=on -device ivshmem-plain,memdev=klpvarena,id=klpvdev";

/// Most vCPUs accepted from `query-cpus-fast`.
const MAX_VCPUS: usize = hmp::MAX_CPUS;
/// Quadwords compared per range between `xp` and `/proc/PID/mem`.
const CHECK_QWORDS: usize = 8;

/// Why attaching, or an access to the attached guest, failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// Talking to QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// HMP's output was not what was expected.
    #[error(transparent)]
    Hmp(#[from] HmpError),
    /// Guest memory access failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// No process could be taken for QEMU's.
    #[error("cannot find the QEMU process behind {socket}: {why}")]
    NoProcess {
        /// The QMP socket.
        socket: String,
        /// Why each way failed.
        why: String,
    },
    /// Memory read through `/proc/PID/mem` differs from QEMU's own `xp`.
    #[error("process {pid} is not the QEMU behind the socket, or its memory map is not the one QEMU reported: guest-physical {gpa:#x} reads {ours:#x} through /proc/{pid}/mem but {qemus:#x} through QEMU's xp")]
    WrongProcess {
        /// The process tried.
        pid: u32,
        /// Where the two reads differ.
        gpa: u64,
        /// Our read.
        ours: u64,
        /// QEMU's read.
        qemus: u64,
    },
    /// `query-cpus-fast` listed no vCPU, or too many.
    #[error("QEMU reports {0} vCPUs")]
    VcpuCount(usize),
    /// A vCPU index past the count.
    #[error("no vCPU {id}: the VM has {count}")]
    NoVcpu {
        /// The index asked for.
        id: usize,
        /// The VM's vCPU count.
        count: usize,
    },
    /// `info registers` did not list the vCPUs QEMU reported.
    #[error("`info registers -a` lists CPUs {found:?}, QEMU reports {count} vCPUs")]
    VcpuMismatch {
        /// The `CPU#N` indexes found.
        found: Vec<usize>,
        /// `query-cpus-fast`'s count.
        count: usize,
    },
    /// The VM is not in the run state expected.
    #[error("{0}")]
    State(String),
    /// The CPU-state dump could not be made or read.
    #[error("CPU-state dump: {0}")]
    Dump(String),
    /// A thread panicked while holding the QMP connection.
    #[error("the QMP connection's lock is poisoned")]
    Poisoned,
    /// QEMU refused to hot-plug the arena's memory backend or device.
    #[error("cannot hot-plug the patch arena ({step}): {source}; start QEMU with `{ARENA_COMMAND_LINE}` instead (see the README for libvirt)")]
    ArenaRefused {
        /// Which step QEMU refused.
        step: &'static str,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },
    /// The arena device is there but its BAR is not in the guest's memory
    /// map, or not usable as an arena.
    #[error("the patch arena is not usable: {0}")]
    Arena(String),
    /// A write through QEMU's gdbstub (see [`crate::gdb`]) failed.
    #[error(transparent)]
    Gdb(#[from] crate::gdb::GdbError),
    /// An operation needs the arena, and this attach has none.
    #[error("no patch arena: attach with the arena (klpvisor-attach --arena) to change the guest")]
    NoArena,
}

/// How to attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Deadline of each QMP command.
    pub timeout: Duration,
    /// QEMU's pid, when the caller knows it better (checked like a found one).
    pub pid: Option<u32>,
    /// Read KERNEL_GS_BASE from a one-page CPU-state dump while paused.
    pub kernel_gs_base: bool,
    /// Give the guest a patch arena: find the one an earlier attach added,
    /// else hot-plug one (see [`ensure_arena`]). Off: [`Guest::arena`] is
    /// empty and the engine refuses to patch.
    pub arena: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            timeout: crate::qmp::DEFAULT_TIMEOUT,
            pid: None,
            kernel_gs_base: true,
            arena: false,
        }
    }
}

/// What a pause did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paused {
    /// From sending `stop` to its reply: QEMU answers once every vCPU is
    /// out of guest mode (`vm_stop` waits for them).
    pub latency: Duration,
    /// Whether the VM ran before (`false`: someone else had paused it).
    pub was_running: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Paused by [`QemuGuest::pause`] and not resumed since.
    paused_by_us: bool,
    /// Registers read during this pause.
    regs: Option<Vec<VcpuRegs>>,
}

/// A running QEMU's guest, attached through its QMP socket.
#[derive(Debug)]
pub struct QemuGuest {
    qmp: Mutex<Qmp>,
    state: Mutex<State>,
    ram: GuestRam,
    vcpus: usize,
    version: QemuVersion,
    kernel_gs_base: bool,
    /// The arena's guest-physical (start, size); (0, 0) without one.
    arena: (u64, u64),
    /// Whether this attach hot-plugged the arena (else it found it).
    arena_added: bool,
    /// Under TCG with an arena: QEMU's gdbstub, which every write also
    /// goes through so the vCPUs do not run stale translations of it.
    gdb: Option<Mutex<crate::gdb::Gdb>>,
}

/// The thread group of thread `tid`, from `/proc/TID/status`.
fn tgid_of(tid: u64) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The vCPU threads' ids from `query-cpus-fast`.
fn vcpu_threads(cpus: &Value) -> Result<Vec<u64>, QemuError> {
    let list = cpus.as_array().ok_or_else(|| QmpError::Unexpected {
        command: "query-cpus-fast".into(),
        why: "return is not a list".into(),
    })?;
    if list.is_empty() || list.len() > MAX_VCPUS {
        return Err(QemuError::VcpuCount(list.len()));
    }
    Ok(list
        .iter()
        .filter_map(|c| c.get("thread-id").and_then(Value::as_u64))
        .collect())
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, QemuError> {
    m.lock().map_err(|_| QemuError::Poisoned)
}

impl QemuGuest {
    /// Attaches to the QEMU whose QMP socket is `socket`.
    pub fn attach(socket: impl AsRef<Path>, opts: &AttachOptions) -> Result<Self, QemuError> {
        let socket = socket.as_ref();
        let mut qmp = Qmp::connect(socket, opts.timeout)?;
        let version = qmp.version();
        let threads = vcpu_threads(&qmp.execute("query-cpus-fast", None)?)?;
        let vcpus = threads.len();
        // Candidates in order of trust; the memory check below decides.
        let mut candidates: Vec<u32> = Vec::new();
        let mut why: Vec<String> = Vec::new();
        if let Some(p) = opts.pid {
            candidates.push(p);
        } else {
            match threads.first().and_then(|&t| tgid_of(t)) {
                Some(p) => candidates.push(p),
                None => {
                    why.push("no vCPU thread of QEMU's is visible in this pid namespace".into())
                }
            }
            match qmp.peer_pid() {
                Ok(p) if !candidates.contains(&p) => candidates.push(p),
                Ok(_) => {}
                Err(e) => why.push(e.to_string()),
            }
        }
        let mut arena_added = false;
        let ranges = if opts.arena {
            let (ranges, added) = ensure_arena(&mut qmp)?;
            arena_added = added;
            ranges
        } else {
            hmp::parse_flat_ram(&qmp.hmp("info mtree -f", None)?)?
        };
        let arena = if opts.arena {
            arena_range(&ranges)?
        } else {
            (0, 0)
        };
        let mut map = Vec::with_capacity(ranges.len());
        for r in ranges {
            let hva =
                hmp::parse_gpa2hva(r.start, &qmp.hmp(&format!("gpa2hva {:#x}", r.start), None)?)?;
            map.push(Mapped {
                gpa: r.start,
                len: r.len,
                hva,
                writable: r.writable,
                name: r.name,
            });
        }
        let mut found = None;
        for pid in candidates {
            match GuestRam::open(pid, map.clone())
                .map_err(QemuError::from)
                .and_then(|ram| check_against_xp(&mut qmp, &ram).map(|()| ram))
            {
                Ok(ram) => {
                    found = Some(ram);
                    break;
                }
                Err(e) => why.push(format!("pid {pid}: {e}")),
            }
        }
        let ram = found.ok_or_else(|| QemuError::NoProcess {
            socket: socket.display().to_string(),
            why: why.join("; "),
        })?;
        // Patching under TCG: writes must reach QEMU's memory API too.
        // Started paused (a gdb connection stops the VM), and the VM
        // resumed after if it ran.
        let gdb = if opts.arena && !kvm_enabled(&mut qmp)? {
            let running = qmp
                .execute("query-status", None)?
                .get("running")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if running {
                qmp.execute("stop", None)?;
            }
            let g = crate::gdb::Gdb::start(&mut qmp, opts.timeout);
            if running {
                qmp.execute("cont", None)?;
            }
            Some(Mutex::new(g?))
        } else {
            None
        };
        Ok(Self {
            qmp: Mutex::new(qmp),
            state: Mutex::new(State::default()),
            ram,
            vcpus,
            version,
            kernel_gs_base: opts.kernel_gs_base,
            arena,
            arena_added,
            gdb,
        })
    }

    /// Whether writes also go through QEMU's gdbstub (TCG; see
    /// [`crate::gdb`]).
    pub fn writes_through_gdbstub(&self) -> bool {
        self.gdb.is_some()
    }

    /// Whether this attach hot-plugged the arena (`false`: it found the
    /// one an earlier attach or QEMU's command line made, or has none).
    pub fn arena_added(&self) -> bool {
        self.arena_added
    }

    /// Runs one human-monitor command and returns its text (bounded as
    /// every QMP reply is): for checks against QEMU's own view, such as
    /// `xp` of a range just written.
    pub fn hmp(&self, command_line: &str) -> Result<String, QemuError> {
        Ok(lock(&self.qmp)?.hmp(command_line, None)?)
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.ram.pid()
    }

    /// QEMU's version.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// The guest-physical ranges and where QEMU maps them.
    pub fn memory_map(&self) -> &[Mapped] {
        self.ram.map()
    }

    /// QEMU's run state (`query-status`): (`running`, `status`).
    pub fn status(&self) -> Result<(bool, String), QemuError> {
        let v = lock(&self.qmp)?.execute("query-status", None)?;
        let running = v.get("running").and_then(Value::as_bool);
        let status = v.get("status").and_then(Value::as_str);
        match (running, status) {
            (Some(r), Some(s)) => Ok((r, s.to_owned())),
            _ => Err(QmpError::Unexpected {
                command: "query-status".into(),
                why: format!("no running/status in {v}"),
            }
            .into()),
        }
    }

    /// Pauses every vCPU (`stop`) and checks that QEMU says `paused`.
    pub fn pause(&self) -> Result<Paused, QemuError> {
        let (was_running, _) = self.status()?;
        let latency = {
            let mut q = lock(&self.qmp)?;
            let t = Instant::now();
            q.execute("stop", None)?;
            t.elapsed()
        };
        let (running, status) = self.status()?;
        if running {
            return Err(QemuError::State(format!(
                "QEMU answered `stop` but reports `{status}`, running"
            )));
        }
        let mut s = lock(&self.state)?;
        s.paused_by_us = true;
        s.regs = None;
        Ok(Paused {
            latency,
            was_running,
        })
    }

    /// Resumes the vCPUs (`cont`).
    pub fn resume(&self) -> Result<Duration, QemuError> {
        {
            let mut s = lock(&self.state)?;
            s.paused_by_us = false;
            s.regs = None;
        }
        let mut q = lock(&self.qmp)?;
        let t = Instant::now();
        q.execute("cont", None)?;
        Ok(t.elapsed())
    }

    /// Runs `f` with the VM paused: in the pause someone else holds (the
    /// operator through QEMU's monitor, or a [`QemuGuest::pause`] of the
    /// caller's), else in one of its own, resumed before returning even
    /// if `f` failed. Returns `f`'s value and how long that pause lasted,
    /// from sending `stop` to `cont`'s reply: an upper bound on the
    /// vCPUs' time out of guest mode (`None`: it was paused already). A pause someone else takes
    /// between this one's `stop` and `cont` is undone by the `cont`: QEMU
    /// has no pause count.
    pub fn paused<T>(
        &self,
        f: impl FnOnce(&Self) -> T,
    ) -> Result<(T, Option<Duration>), QemuError> {
        let (running, _) = self.status()?;
        if !running {
            return Ok((f(self), None));
        }
        let t = Instant::now();
        self.pause()?;
        let value = f(self);
        self.resume()?;
        Ok((value, Some(t.elapsed())))
    }

    /// Every vCPU's registers, read now (cached until the next pause or
    /// resume while paused by [`QemuGuest::pause`]).
    pub fn all_regs(&self) -> Result<Vec<VcpuRegs>, QemuError> {
        let paused = {
            let s = lock(&self.state)?;
            if let Some(r) = &s.regs {
                return Ok(r.clone());
            }
            s.paused_by_us
        };
        let mut q = lock(&self.qmp)?;
        let cpus = hmp::parse_registers(&q.hmp("info registers -a", None)?)?;
        let found: Vec<usize> = cpus.iter().map(|c| c.index).collect();
        if found != (0..self.vcpus).collect::<Vec<_>>() {
            return Err(QemuError::VcpuMismatch {
                found,
                count: self.vcpus,
            });
        }
        let mut regs: Vec<VcpuRegs> = cpus.iter().map(|c| c.regs).collect();
        if paused && self.kernel_gs_base {
            let first = self.ram.map().iter().find(|m| m.writable).map(|m| m.gpa);
            if let Some(dumped) = first.and_then(|gpa| cpu_state_dump(&mut q, gpa).ok()) {
                merge_kernel_gs_base(&mut regs, &cpus, &dumped);
            }
        }
        drop(q);
        let mut s = lock(&self.state)?;
        if paused && s.paused_by_us {
            s.regs = Some(regs.clone());
        }
        Ok(regs)
    }
}

/// Takes KERNEL_GS_BASE from `dumped` (the dump's vCPUs, in the same
/// order) into `regs` where the two sources agree on RIP, CR3 and the GS
/// base: the same instant of the same vCPU.
pub fn merge_kernel_gs_base(regs: &mut [VcpuRegs], cpus: &[HmpCpu], dumped: &[VcpuRegs]) {
    if dumped.len() != cpus.len() {
        return;
    }
    for ((r, c), d) in regs.iter_mut().zip(cpus).zip(dumped) {
        if (d.rip, d.cr3, d.gs_base) == (c.regs.rip, c.regs.cr3, c.regs.gs_base) {
            r.kernel_gs_base = d.kernel_gs_base;
        }
    }
}

/// The vCPUs' state from QEMU's ELF CPU-state notes: a `dump-guest-memory`
/// of one page at `gpa`, written into a memfd QEMU gets over the socket.
fn cpu_state_dump(q: &mut Qmp, gpa: u64) -> Result<Vec<VcpuRegs>, QemuError> {
    const NAME: &str = "klpvisor-cpustate";
    // SAFETY: the name is a NUL-terminated literal; memfd_create has no
    // other memory argument.
    let fd = unsafe { libc::memfd_create(c"klpvisor-cpustate".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(QemuError::Dump(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    q.execute_with_fd(
        "getfd",
        Some(json!({ "fdname": NAME })),
        Some(fd.as_raw_fd()),
    )?;
    let dumped = q.execute(
        "dump-guest-memory",
        Some(json!({
            "paging": false,
            "protocol": format!("fd:{NAME}"),
            "begin": gpa,
            "length": 4096,
            "format": "elf",
        })),
    );
    if let Err(e) = dumped {
        // QEMU keeps a named fd until used or closed.
        let _ = q.execute("closefd", Some(json!({ "fdname": NAME })));
        return Err(e.into());
    }
    let g = DumpGuest::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e: DumpError| QemuError::Dump(e.to_string()))?;
    (0..g.vcpu_count())
        .map(|i| g.vcpu_regs(i).map_err(|e| QemuError::Dump(e.to_string())))
        .collect()
}

/// Whether the VM runs under KVM (`query-kvm`); else TCG.
fn kvm_enabled(q: &mut Qmp) -> Result<bool, QemuError> {
    Ok(q.execute("query-kvm", None)?
        .get("enabled")
        .and_then(Value::as_bool)
        .unwrap_or(false))
}

/// Whether QEMU knows the QOM object at `path`: a `qom-get` of its
/// `type` succeeds. Any refusal counts as "no" (QEMU names a missing path
/// "DeviceNotFound" or a GenericError, depending on the version).
fn qom_exists(q: &mut Qmp, path: &str) -> Result<bool, QemuError> {
    match q.execute("qom-get", Some(json!({ "path": path, "property": "type" }))) {
        Ok(_) => Ok(true),
        Err(QmpError::Command { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Finds the patch arena klpvisor added to this VM, or hot-plugs it: a
/// `memory-backend-memfd` (`share=on`: the memory is a file klpvisor's
/// writes through `/proc/PID/mem` reach like any RAM) behind an
/// `ivshmem-plain` PCI device, whose BAR 2 is that memory in the guest's
/// physical address space. No guest driver binds ivshmem, so the guest
/// never touches it; the kernel does not map it either (it is no RAM to
/// the guest), and the engine maps it itself through the kernel image's
/// page tables. Each piece is added only if missing, so a re-attach, or a
/// VM started with [`ARENA_COMMAND_LINE`], reuses what is there. Returns
/// the memory map once the BAR is in it, and whether anything was added.
pub fn ensure_arena(q: &mut Qmp) -> Result<(Vec<hmp::RamRange>, bool), QemuError> {
    let ranges = hmp::parse_flat_ram(&q.hmp("info mtree -f", None)?)?;
    if ranges.iter().any(|r| r.name == ARENA_MEMDEV) {
        return Ok((ranges, false));
    }
    let mut added_memdev = false;
    if !qom_exists(q, &format!("/objects/{ARENA_MEMDEV}"))? {
        added_memdev = true;
        q.execute(
            "object-add",
            Some(json!({
                "qom-type": "memory-backend-memfd",
                "id": ARENA_MEMDEV,
                "size": ARENA_SIZE,
                "share": true,
            })),
        )
        .map_err(|source| QemuError::ArenaRefused {
            step: "object-add memory-backend-memfd",
            source,
        })?;
    }
    if !qom_exists(q, &format!("/machine/peripheral/{ARENA_DEVICE}"))? {
        q.execute(
            "device_add",
            Some(json!({
                "driver": "ivshmem-plain",
                "memdev": ARENA_MEMDEV,
                "id": ARENA_DEVICE,
            })),
        )
        .map_err(|source| {
            // Leave QEMU as it was: the backend added for nothing goes.
            if added_memdev {
                let _ = q.execute("object-del", Some(json!({ "id": ARENA_MEMDEV })));
            }
            QemuError::ArenaRefused {
                step: "device_add ivshmem-plain",
                source,
            }
        })?;
    }
    // The guest assigns the BAR when it handles the hot-plug event; its
    // memory region enters the flat view when the guest enables memory
    // decoding on the device.
    let deadline = Instant::now() + ARENA_WAIT;
    loop {
        let ranges = hmp::parse_flat_ram(&q.hmp("info mtree -f", None)?)?;
        if ranges.iter().any(|r| r.name == ARENA_MEMDEV) {
            return Ok((ranges, true));
        }
        if Instant::now() >= deadline {
            return Err(QemuError::Arena(format!(
                "QEMU added the ivshmem device `{ARENA_DEVICE}`, but within {ARENA_WAIT:?} the \
                 guest did not map its BAR (no PCI hot-plug in the guest, or the VM is paused); \
                 start QEMU with `{ARENA_COMMAND_LINE}` instead"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The arena's guest-physical (start, size) in the memory map: the RAM
/// range QEMU names after the arena's memory backend.
pub fn arena_range(ranges: &[hmp::RamRange]) -> Result<(u64, u64), QemuError> {
    let mut found = ranges.iter().filter(|r| r.name == ARENA_MEMDEV);
    let r = found
        .next()
        .ok_or_else(|| QemuError::Arena(format!("no RAM range named `{ARENA_MEMDEV}`")))?;
    if found.next().is_some() {
        return Err(QemuError::Arena(format!(
            "`{ARENA_MEMDEV}` is mapped more than once (a second ivshmem device on the same \
             memory backend?)"
        )));
    }
    if !r.writable || r.start % 4096 != 0 || r.len % 4096 != 0 || r.len < 2 * 4096 {
        return Err(QemuError::Arena(format!(
            "`{ARENA_MEMDEV}` is at {:#x}+{:#x} ({}): not writable page-aligned RAM of at least \
             two pages",
            r.start,
            r.len,
            if r.writable { "ram" } else { "rom" }
        )));
    }
    Ok((r.start, r.len))
}

/// Compares the first quadwords of each range (up to 4 RAM ranges and
/// every ROM one, largest RAM first) read through `/proc/PID/mem` with
/// QEMU's `xp`. Running guest memory may change between the two reads,
/// so a range is tried three times before a difference counts.
fn check_against_xp(q: &mut Qmp, ram: &GuestRam) -> Result<(), QemuError> {
    let mut ranges: Vec<&Mapped> = ram.map().iter().collect();
    ranges.sort_by_key(|m| std::cmp::Reverse((m.writable, m.len)));
    for m in ranges.into_iter().take(4) {
        let n = usize::try_from(m.len / 8)
            .unwrap_or(usize::MAX)
            .min(CHECK_QWORDS);
        if n == 0 {
            continue;
        }
        let mut last = None;
        for _ in 0..3 {
            let text = q.hmp(&format!("xp /{n}gx {:#x}", m.gpa), None)?;
            let theirs = hmp::parse_xp_qwords(m.gpa, &text)?;
            let mut buf = vec![0u8; n * 8];
            ram.read(m.gpa, &mut buf)?;
            let ours: Vec<u64> = buf
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            match ours.iter().zip(&theirs).position(|(a, b)| a != b) {
                None if ours.len() == theirs.len() => {
                    last = None;
                    break;
                }
                None => {
                    last = Some((m.gpa, 0, 0));
                }
                Some(i) => {
                    last = Some((m.gpa + 8 * i as u64, ours[i], theirs[i]));
                }
            }
        }
        if let Some((gpa, ours, qemus)) = last {
            return Err(QemuError::WrongProcess {
                pid: ram.pid(),
                gpa,
                ours,
                qemus,
            });
        }
    }
    Ok(())
}

impl Drop for QemuGuest {
    /// Stops the gdbstub this attach started (best effort: QEMU may be
    /// gone).
    fn drop(&mut self) {
        if let (Some(g), Ok(mut q)) = (&self.gdb, self.qmp.lock()) {
            if let Ok(g) = g.lock() {
                g.stop(&mut q);
            }
        }
    }
}

impl Guest for QemuGuest {
    type Error = QemuError;

    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), QemuError> {
        Ok(self.ram.read(gpa.0, buf)?)
    }

    /// Through `/proc/PID/mem` (checked whole first), then, under TCG,
    /// the same bytes through QEMU's gdbstub, which drops the stale
    /// translations of the code written. The gdbstub takes packets only
    /// while the VM is stopped (a byte that reaches it while the VM runs
    /// stops the VM and is dropped), so a write while the VM runs is made
    /// in a pause of its own; the engine writes inside its pauses anyway.
    fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), QemuError> {
        self.ram.write(gpa.0, data)?;
        let Some(g) = &self.gdb else {
            return Ok(());
        };
        let write = |_: &Self| -> Result<(), QemuError> {
            lock(g)?.write_phys(gpa.0, data)?;
            Ok(())
        };
        if lock(&self.state)?.paused_by_us {
            return write(self);
        }
        self.paused(write)?.0
    }

    /// The ivshmem BAR (see [`ensure_arena`]), or (0, 0) when attached
    /// without one. Its page-table pages take its own first pages
    /// ([`Guest::arena_tables`] is `None`): QEMU's guest has no RAM
    /// reserved for them, and the BAR is outside the kernel's direct map,
    /// so a guest walker that follows the arena's PMD entries through
    /// `__va()` (`text_poke()` on patch code) would fault on them; the
    /// engine's redirects, links and safe-point checks never ask the
    /// guest to walk them.
    fn arena(&self) -> (GuestPhys, u64) {
        (GuestPhys(self.arena.0), self.arena.1)
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus
    }

    fn vcpu_regs(&self, id: usize) -> Result<VcpuRegs, QemuError> {
        self.all_regs()?.get(id).copied().ok_or(QemuError::NoVcpu {
            id,
            count: self.vcpus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: a QMP server thread answering each command with
    /// `answer(command, arguments)` (`Err`: a QMP error), while this test
    /// process stands in for QEMU's address space.
    fn fake_qemu(
        tag: &str,
        mut answer: impl FnMut(&str, &Value) -> Result<Value, String> + Send + 'static,
    ) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("klpv-fake-qemu-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(concat!(r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#, "\n").as_bytes()).unwrap();
            let r = BufReader::new(s.try_clone().unwrap());
            for line in r.lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap_or_default().to_owned();
                let reply = match answer(&cmd, &v["arguments"]) {
                    Ok(r) => json!({"return": r, "id": v["id"]}),
                    Err(desc) => {
                        json!({"error": {"class": "GenericError", "desc": desc}, "id": v["id"]})
                    }
                };
                if s.write_all(format!("{reply}\n").as_bytes()).is_err() {
                    return;
                }
            }
        });
        path
    }

    /// `xp /Ngx 0` output over `mem`.
    fn xp_text(mem: &[u8], n: usize) -> String {
        let mut out = String::new();
        for (i, q) in mem.chunks_exact(8).take(n).enumerate() {
            let v = u64::from_le_bytes(q.try_into().unwrap());
            if i % 2 == 0 {
                out.push_str(&format!("{:016x}:", i * 8));
            }
            out.push_str(&format!(" 0x{v:016x}"));
            if i % 2 == 1 {
                out.push('\n');
            }
        }
        out
    }

    /// The answers of a QEMU whose guest RAM is `ram` (in this process)
    /// at guest-physical 0; `xp_lies` makes its `xp` disagree.
    fn answers(
        ram: &'static [u8],
        xp_lies: bool,
    ) -> impl FnMut(&str, &Value) -> Result<Value, String> + Send + 'static {
        let mut running = true;
        let me = std::process::id();
        move |cmd, args| {
            Ok(match cmd {
                "qmp_capabilities" | "closefd" => json!({}),
                "query-cpus-fast" => {
                    json!([{"thread-id": me, "cpu-index": 0}, {"thread-id": me, "cpu-index": 1}])
                }
                "query-status" => {
                    json!({"running": running, "status": if running { "running" } else { "paused" }})
                }
                "stop" => {
                    running = false;
                    json!({})
                }
                "cont" => {
                    running = true;
                    json!({})
                }
                "getfd" => json!({}),
                "dump-guest-memory" => return Err("dump refused in this test".into()),
                "human-monitor-command" => {
                    let line = args["command-line"].as_str().unwrap_or_default();
                    let text = if line == "info mtree -f" {
                        format!("FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n  0000000000000000-{:016x} (prio 0, ram): pc.ram\n", ram.len() - 1)
                    } else if line == "gpa2hva 0x0" {
                        format!(
                            "Host virtual address for 0x0 (pc.ram) is {:#x}\n",
                            ram.as_ptr() as u64
                        )
                    } else if let Some(rest) = line.strip_prefix("xp /") {
                        let n: usize = rest.split('g').next().unwrap().parse().unwrap();
                        if xp_lies {
                            let mut other = ram[..8 * n].to_vec();
                            other[0] ^= 0xff;
                            xp_text(&other, n)
                        } else {
                            xp_text(ram, n)
                        }
                    } else if line == "info registers -a" {
                        include_str!("../tests/data/info-registers-a.txt").to_owned()
                    } else {
                        format!("unknown command: '{line}'\n")
                    };
                    Value::String(text.replace('\n', "\r\n"))
                }
                other => return Err(format!("The command {other} has not been found")),
            })
        }
    }

    fn fake_ram() -> &'static [u8] {
        let v: Vec<u8> = (0..0x10000u32).map(|i| (i * 7 % 251) as u8).collect();
        Box::leak(v.into_boxed_slice())
    }

    #[test]
    fn attach_to_a_fake_qemu_pause_and_read() {
        let ram = fake_ram();
        let path = fake_qemu("ok", answers(ram, false));
        let g = QemuGuest::attach(&path, &AttachOptions::default()).unwrap();
        assert_eq!(g.pid(), std::process::id());
        assert_eq!(g.vcpu_count(), 2);
        assert_eq!(g.memory_map().len(), 1);
        let mut b = [0u8; 4];
        g.read_phys(GuestPhys(0x100), &mut b).unwrap();
        assert_eq!(b, [ram[0x100], ram[0x101], ram[0x102], ram[0x103]]);
        assert!(g.read_phys(GuestPhys(0xfffe), &mut b).is_err());
        let p = g.pause().unwrap();
        assert!(p.was_running);
        // The dump is refused: registers come without KERNEL_GS_BASE.
        let regs = g.all_regs().unwrap();
        assert_eq!(regs.len(), 2);
        assert_eq!(regs[1].gs_base, 0xff17_4433_9f10_0000);
        assert!(regs.iter().all(|r| r.kernel_gs_base.is_none()));
        assert_eq!(g.vcpu_regs(1).unwrap(), regs[1]);
        assert!(matches!(
            g.vcpu_regs(2),
            Err(QemuError::NoVcpu { id: 2, count: 2 })
        ));
        g.resume().unwrap();
        // Paused by someone else: `paused` leaves it paused.
        g.pause().unwrap();
        let ((), pause) = g.paused(|_| ()).unwrap();
        assert_eq!(pause, None);
        assert!(!g.status().unwrap().0);
        g.resume().unwrap();
        let ((), pause) = g.paused(|_| ()).unwrap();
        assert!(pause.is_some());
        assert!(g.status().unwrap().0);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_process_whose_memory_differs_from_xp_is_refused() {
        let ram = fake_ram();
        let path = fake_qemu("lies", answers(ram, true));
        let e = QemuGuest::attach(&path, &AttachOptions::default()).unwrap_err();
        assert!(matches!(e, QemuError::NoProcess { .. }), "{e}");
        assert!(e.to_string().contains("through QEMU's xp"), "{e}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn kernel_gs_base_only_where_both_sources_agree() {
        let cpus =
            hmp::parse_registers(include_str!("../tests/data/info-registers-a.txt")).unwrap();
        let mut regs: Vec<VcpuRegs> = cpus.iter().map(|c| c.regs).collect();
        let mut dumped = regs.clone();
        dumped[0].kernel_gs_base = Some(0x1111);
        dumped[1].kernel_gs_base = Some(0x2222);
        dumped[1].rip += 1;
        merge_kernel_gs_base(&mut regs, &cpus, &dumped);
        assert_eq!(regs[0].kernel_gs_base, Some(0x1111));
        assert_eq!(regs[1].kernel_gs_base, None);
        // A dump with another vCPU count is not used at all.
        let mut regs2: Vec<VcpuRegs> = cpus.iter().map(|c| c.regs).collect();
        merge_kernel_gs_base(&mut regs2, &cpus, &dumped[..1]);
        assert!(regs2.iter().all(|r| r.kernel_gs_base.is_none()));
    }

    #[test]
    fn the_arena_is_the_range_named_after_its_memory_backend() {
        let ranges =
            hmp::parse_flat_ram(include_str!("../tests/data/info-mtree-f-ivshmem.txt")).unwrap();
        assert_eq!(arena_range(&ranges).unwrap(), (0x1_0000_0000, 16 << 20));
        let mut twice = ranges.clone();
        let mut second = twice.last().unwrap().clone();
        second.start += 16 << 20;
        twice.push(second);
        assert!(arena_range(&twice)
            .unwrap_err()
            .to_string()
            .contains("more than once"));
        let none: Vec<_> = ranges
            .iter()
            .filter(|r| r.name != ARENA_MEMDEV)
            .cloned()
            .collect();
        assert!(matches!(arena_range(&none), Err(QemuError::Arena(_))));
    }

    /// `info mtree -f` of a guest without the arena, and with it.
    fn mtree(with_arena: bool) -> String {
        let text = include_str!("../tests/data/info-mtree-f-ivshmem.txt");
        let text = if with_arena {
            text.to_owned()
        } else {
            text.replace("klpvarena", "other-bar")
                .replace("(prio 1, ram)", "(prio 1, i/o)")
        };
        text.replace('\n', "\r\n")
    }

    #[test]
    fn the_arena_is_hot_plugged_once_and_found_again() {
        use std::sync::{Arc, Mutex};
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let l = log.clone();
        let mut plugged = (false, false);
        let path = fake_qemu("arena", move |cmd, args| {
            l.lock().unwrap().push(cmd.to_owned());
            Ok(match cmd {
                "qmp_capabilities" => json!({}),
                "qom-get" => {
                    let p = args["path"].as_str().unwrap_or_default();
                    let there = if p.starts_with("/objects/") {
                        plugged.0
                    } else {
                        plugged.1
                    };
                    if !there {
                        return Err(format!("Device '{p}' not found"));
                    }
                    json!("x")
                }
                "object-add" => {
                    assert_eq!(args["qom-type"], "memory-backend-memfd");
                    assert_eq!(args["share"], true);
                    plugged.0 = true;
                    json!({})
                }
                "device_add" => {
                    assert_eq!(args["driver"], "ivshmem-plain");
                    assert_eq!(args["memdev"], ARENA_MEMDEV);
                    plugged.1 = true;
                    json!({})
                }
                "human-monitor-command" => Value::String(mtree(plugged.1)),
                other => return Err(format!("The command {other} has not been found")),
            })
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let (ranges, added) = ensure_arena(&mut q).unwrap();
        assert!(added);
        assert_eq!(arena_range(&ranges).unwrap(), (0x1_0000_0000, 16 << 20));
        // Found again: nothing added a second time.
        let (_, added) = ensure_arena(&mut q).unwrap();
        assert!(!added);
        let cmds = log.lock().unwrap().clone();
        assert_eq!(cmds.iter().filter(|c| *c == "object-add").count(), 1);
        assert_eq!(cmds.iter().filter(|c| *c == "device_add").count(), 1);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_refused_hot_plug_says_what_to_put_on_the_command_line() {
        use std::sync::{Arc, Mutex};
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let l = log.clone();
        let path = fake_qemu("noplug", move |cmd, _| {
            l.lock().unwrap().push(cmd.to_owned());
            Ok(match cmd {
                "qmp_capabilities" | "object-add" | "object-del" => json!({}),
                "qom-get" => return Err("not found".into()),
                "device_add" => return Err("Bus 'pci.0' does not support hotplugging".into()),
                "human-monitor-command" => Value::String(mtree(false)),
                other => return Err(format!("The command {other} has not been found")),
            })
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let e = ensure_arena(&mut q).unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(
                e,
                QemuError::ArenaRefused {
                    step: "device_add ivshmem-plain",
                    ..
                }
            ),
            "{m}"
        );
        assert!(m.contains("does not support hotplugging"), "{m}");
        assert!(m.contains(ARENA_COMMAND_LINE), "{m}");
        // The backend it added is taken away again.
        let cmds = log.lock().unwrap().clone();
        assert_eq!(
            cmds.last().map(String::as_str),
            Some("object-del"),
            "{cmds:?}"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn vcpu_threads_of_query_cpus_fast() {
        let v: Value = serde_json::from_str(r#"[{"thread-id": 10381, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"}, {"thread-id": 10382, "props": {"core-id": 1, "thread-id": 0, "socket-id": 0}, "qom-path": "/machine/unattached/device[2]", "cpu-index": 1, "target": "x86_64"}]"#).unwrap();
        assert_eq!(vcpu_threads(&v).unwrap(), vec![10381, 10382]);
        assert!(matches!(
            vcpu_threads(&json!([])),
            Err(QemuError::VcpuCount(0))
        ));
        assert!(vcpu_threads(&json!({})).is_err());
        assert_eq!(
            tgid_of(u64::from(std::process::id())),
            Some(std::process::id())
        );
    }
}

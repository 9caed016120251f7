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
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            timeout: crate::qmp::DEFAULT_TIMEOUT,
            pid: None,
            kernel_gs_base: true,
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
        let ranges = hmp::parse_flat_ram(&qmp.hmp("info mtree -f", None)?)?;
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
        Ok(Self {
            qmp: Mutex::new(qmp),
            state: Mutex::new(State::default()),
            ram,
            vcpus,
            version,
            kernel_gs_base: opts.kernel_gs_base,
        })
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

impl Guest for QemuGuest {
    type Error = QemuError;

    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), QemuError> {
        Ok(self.ram.read(gpa.0, buf)?)
    }

    fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), QemuError> {
        Ok(self.ram.write(gpa.0, data)?)
    }

    /// No arena yet: phase 1 reads the guest; the arena (an ivshmem BAR or
    /// a `memmap=` reservation) comes with patching.
    fn arena(&self) -> (GuestPhys, u64) {
        (GuestPhys(0), 0)
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

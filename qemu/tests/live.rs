//! Attaching to a real QEMU: boots the test guest (build/guest, made by
//! guest-images/build-guest) in plain QEMU TCG with a QMP socket, attaches,
//! pauses, finds the kernel through kallsyms as the VMM does, reads
//! `linux_banner` and the registers, shows that refused writes leave the
//! guest unchanged, resumes, and checks the bad-input cases that need a
//! real QEMU (its human monitor socket, a second attach).
//!
//! Boots a VM (about 7 s to a shell on TCG), so it runs only with
//! `KLPV_QEMU_TESTS=1`. `KLPV_QEMU_GUEST_DIR` names the directory with
//! `bzImage` and `initramfs.cpio.gz` (default: build/guest of this checkout).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use klpvisor_guest::{Guest, GuestPhys, Kernel, VirtRead};
use klpvisor_qemu::mem::RamError;
use klpvisor_qemu::{AttachOptions, QemuError, QemuGuest, QmpError};

fn skip() -> bool {
    if std::env::var_os("KLPV_QEMU_TESTS").is_some_and(|v| v == "1") {
        return false;
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipped: boots a QEMU guest; run with KLPV_QEMU_TESTS=1"
    );
    true
}

fn guest_dir() -> PathBuf {
    std::env::var_os("KLPV_QEMU_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"))
}

/// A QEMU child, killed (by its own pid) when dropped.
struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn boot() -> Vm {
    let g = guest_dir();
    assert!(
        g.join("bzImage").exists(),
        "{} has no bzImage: run guest-images/build-guest or set KLPV_QEMU_GUEST_DIR",
        g.display()
    );
    let dir = std::env::temp_dir().join(format!("klpv-qemu-live-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new("nice")
        .args([
            "-n",
            "19",
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args([
            "-smp",
            "2",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-bios", "/usr/share/seabios/bios-256k.bin"])
        .arg("-kernel")
        .arg(g.join("bzImage"))
        .arg("-initrd")
        .arg(g.join("initramfs.cpio.gz"))
        // Two user-mode spinners: a pause then mostly finds the vCPUs in
        // user mode, where only KERNEL_GS_BASE tells which CPU each is.
        .args([
            "-append",
            "console=ttyS0 panic=-1 -- /bin/sh -c \"while :; do :; done & while :; do :; done\"",
        ])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp.sock").display()
        ))
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("hmp.sock").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    let vm = Vm { child, dir };
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(vm.dir.join("console.log")).unwrap_or_default();
        if log.contains("KLPV-READY") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "no shell within 180 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("guest booted to its spinners in {:?}", t.elapsed());
    vm
}

/// The guest as `info registers` alone shows it: no KERNEL_GS_BASE.
struct WithoutKernelGs<'a>(&'a QemuGuest);

impl Guest for WithoutKernelGs<'_> {
    type Error = QemuError;
    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), QemuError> {
        self.0.read_phys(gpa, buf)
    }
    fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), QemuError> {
        self.0.write_phys(gpa, data)
    }
    fn arena(&self) -> (GuestPhys, u64) {
        self.0.arena()
    }
    fn vcpu_count(&self) -> usize {
        self.0.vcpu_count()
    }
    fn vcpu_regs(&self, id: usize) -> Result<klpvisor_guest::VcpuRegs, QemuError> {
        let mut r = self.0.vcpu_regs(id)?;
        r.kernel_gs_base = None;
        Ok(r)
    }
}

/// FNV-1a over a whole guest-physical range, read in 1 MiB pieces.
fn hash(g: &QemuGuest, start: u64, len: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < start + len {
        let n = (start + len - at).min(buf.len() as u64) as usize;
        g.read_phys(GuestPhys(at), &mut buf[..n]).unwrap();
        for &b in &buf[..n] {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        at += n as u64;
    }
    h
}

/// One QEMU at a time: the tests of this file run one after the other.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn attach_pause_read_the_kernel_resume() {
    if skip() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(|p| p.into_inner());
    let vm = boot();
    let sock = vm.dir.join("qmp.sock");
    let opts = AttachOptions::default();
    let t = Instant::now();
    let g = QemuGuest::attach(&sock, &opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "attached to QEMU {} (pid {}) in {:?}; memory map:",
        g.version(),
        g.pid(),
        t.elapsed()
    );
    for m in g.memory_map() {
        eprintln!(
            "  {:#012x}+{:#010x} at host {:#x} {} {}",
            m.gpa,
            m.len,
            m.hva,
            if m.writable { "ram" } else { "rom" },
            m.name
        );
    }
    assert_eq!(g.vcpu_count(), 2);

    // A second client while we hold QEMU's one QMP connection.
    let short = AttachOptions {
        timeout: Duration::from_secs(1),
        ..AttachOptions::default()
    };
    let e = QemuGuest::attach(&sock, &short).unwrap_err();
    eprintln!("second attach: {e}");
    assert!(matches!(e, QemuError::Qmp(QmpError::NotQmp { .. })), "{e}");
    // QEMU's human monitor is not QMP.
    let e = QemuGuest::attach(vm.dir.join("hmp.sock"), &short).unwrap_err();
    eprintln!("human monitor socket: {e}");
    assert!(matches!(e, QemuError::Qmp(QmpError::NotQmp { .. })), "{e}");
    // No socket.
    let e = QemuGuest::attach(vm.dir.join("none.sock"), &short).unwrap_err();
    eprintln!("missing socket: {e}");
    assert!(matches!(e, QemuError::Qmp(QmpError::Connect { .. })), "{e}");

    let mut latencies = Vec::new();
    for _ in 0..5 {
        let p = g.pause().unwrap();
        assert!(p.was_running);
        latencies.push(p.latency);
        g.resume().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("pause latencies (stop sent to reply): {latencies:?}");

    // Pause until at least one vCPU is in user mode (a timer tick may
    // catch both in the kernel).
    let mut tries = 0;
    loop {
        let p = g.pause().unwrap();
        eprintln!("pause latency {:?}", p.latency);
        if g.all_regs().unwrap().iter().any(|r| r.cpl() == 3) {
            break;
        }
        tries += 1;
        assert!(tries < 50, "no vCPU in user mode in 50 pauses");
        g.resume().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let (running, status) = g.status().unwrap();
    assert!(!running && status == "paused", "{status}");

    let regs = g.all_regs().unwrap();
    for (i, r) in regs.iter().enumerate() {
        eprintln!(
            "vCPU {i}: rip {:#x} rsp {:#x} cr3 {:#x} cpl {} gs {:#x} kernel_gs {:x?} efer {:x?}",
            r.rip,
            r.rsp,
            r.cr3,
            r.cpl(),
            r.gs_base,
            r.kernel_gs_base,
            r.efer
        );
        assert!(r.in_long_mode());
        assert!(
            r.kernel_gs_base.is_some(),
            "vCPU {i}: no KERNEL_GS_BASE from the dump"
        );
        assert_eq!(r.lstar, None);
    }

    let t = Instant::now();
    let k = Kernel::open(&g).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("Kernel::open over QMP + /proc/PID/mem: {:?}", t.elapsed());
    let banner_va = k.kallsyms.addr("linux_banner").unwrap();
    let mut b = [0u8; 256];
    k.space(&g).read_virt(banner_va, &mut b).unwrap();
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let banner = String::from_utf8_lossy(&b[..end]).into_owned();
    eprintln!("linux_banner at {banner_va:#x}: {}", banner.trim_end());
    let kver = std::fs::read_to_string(guest_dir().join("kver")).unwrap_or_default();
    assert!(banner.starts_with("Linux version "), "{banner}");
    assert!(banner.contains(kver.trim()), "{banner} vs {kver}");
    assert_eq!(k.uts(&g, "release").as_deref(), Some(kver.trim()));
    let tasks = k.tasks(&g).unwrap();
    let running: Vec<_> = tasks.iter().filter(|t| t.running.is_some()).collect();
    eprintln!("{} tasks, {} placed on a vCPU", tasks.len(), running.len());
    assert_eq!(running.len(), 2, "each vCPU runs a task");
    // Without KERNEL_GS_BASE (info registers alone), a vCPU in user mode
    // cannot be placed on a CPU.
    let user = regs.iter().filter(|r| r.cpl() == 3).count();
    let blind = k.tasks(&WithoutKernelGs(&g)).unwrap();
    let placed = blind.iter().filter(|t| t.running.is_some()).count();
    eprintln!("{user} vCPU(s) in user mode; without KERNEL_GS_BASE {placed} task(s) placed");
    assert_eq!(placed, 2 - user);

    // Writes that cannot be done whole change nothing.
    let ram = g
        .memory_map()
        .iter()
        .filter(|m| m.writable)
        .max_by_key(|m| m.len)
        .unwrap()
        .clone();
    let rom = g.memory_map().iter().find(|m| !m.writable).unwrap().clone();
    let before = (hash(&g, ram.gpa, ram.len), hash(&g, rom.gpa, rom.len));
    let end = ram.gpa + ram.len;
    let straddle = g.write_phys(GuestPhys(end - 8), &[0xcc; 16]).unwrap_err();
    eprintln!("write across the end of RAM: {straddle}");
    let into_rom = g.write_phys(GuestPhys(rom.gpa), &[0xcc; 16]).unwrap_err();
    eprintln!("write into ROM: {into_rom}");
    let after = (hash(&g, ram.gpa, ram.len), hash(&g, rom.gpa, rom.len));
    eprintln!("RAM/ROM hashes before {before:x?}, after {after:x?}");
    assert_eq!(before, after);
    // A write that fits goes through (the same bytes back: no change).
    let mut same = [0u8; 16];
    g.read_phys(GuestPhys(ram.gpa + 0x1000), &mut same).unwrap();
    g.write_phys(GuestPhys(ram.gpa + 0x1000), &same).unwrap();
    assert_eq!(hash(&g, ram.gpa, ram.len), before.0);

    g.resume().unwrap();
    let (running, status) = g.status().unwrap();
    assert!(running, "{status}");

    // QEMU exits: every access fails with an error, none reaches another process.
    drop(vm);
    let mut b = [0u8; 8];
    let e = g.read_phys(GuestPhys(ram.gpa), &mut b).unwrap_err();
    eprintln!("read after QEMU exited: {e}");
    assert!(matches!(e, QemuError::Ram(RamError::Gone { .. })), "{e}");
    let e = g.status().unwrap_err();
    eprintln!("query-status after QEMU exited: {e}");
    assert!(matches!(e, QemuError::Qmp(QmpError::Closed { .. })), "{e}");
    assert!(g.pause().is_err());
}

/// The arena: hot-plugged on the first attach (a memfd-backed ivshmem
/// device), its BAR written through `/proc/PID/mem` and read back through
/// QEMU's own `xp`, found again (not added twice) on a re-attach, and the
/// rest of guest RAM unchanged by it.
#[test]
fn arena_hot_plugged_written_and_found_again() {
    if skip() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(|p| p.into_inner());
    let vm = boot();
    let sock = vm.dir.join("qmp.sock");
    let opts = AttachOptions {
        arena: true,
        ..AttachOptions::default()
    };
    let t = Instant::now();
    let g = QemuGuest::attach(&sock, &opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("attached with a hot-plugged arena in {:?}", t.elapsed());
    assert!(g.arena_added());
    let (GuestPhys(start), len) = g.arena();
    eprintln!("arena at {start:#x}+{len:#x}");
    assert_eq!(len, klpvisor_qemu::attach::ARENA_SIZE);
    assert_eq!(start % len, 0, "a BAR is aligned to its size");
    // No guest driver binds ivshmem: the BAR reads as the zeroed memfd.
    assert_eq!(hash(&g, start, len), hash_zero(len));
    let pattern: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    for at in [start, start + 0x1000, start + len - 32] {
        g.write_phys(GuestPhys(at), &pattern).unwrap();
        let text = g.hmp(&format!("xp /4gx {at:#x}")).unwrap();
        let q = klpvisor_qemu::hmp::parse_xp_qwords(at, &text).unwrap();
        let want: Vec<u64> = pattern
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(q, want, "xp at {at:#x}: {text}");
    }
    eprintln!(
        "3 writes into the BAR read back through QEMU's xp (through the gdbstub too: {})",
        g.writes_through_gdbstub()
    );
    // Under TCG each write also went through the gdbstub, in a pause of
    // its own: the VM runs again after.
    assert!(g.writes_through_gdbstub());
    let (running, status) = g.status().unwrap();
    assert!(running, "{status}");
    // A write across the end of the BAR moves no byte.
    assert!(g
        .write_phys(GuestPhys(start + len - 8), &[0xcc; 16])
        .is_err());
    // Let the guest run a little: nothing in it touches the BAR.
    std::thread::sleep(Duration::from_millis(500));
    let mut back = vec![0u8; 32];
    g.read_phys(GuestPhys(start + 0x1000), &mut back).unwrap();
    assert_eq!(back, pattern);
    drop(g);

    let g = QemuGuest::attach(&sock, &opts).unwrap_or_else(|e| panic!("{e}"));
    assert!(!g.arena_added(), "a re-attach finds the arena");
    assert_eq!(g.arena(), (GuestPhys(start), len));
    g.read_phys(GuestPhys(start + 0x1000), &mut back).unwrap();
    assert_eq!(back, pattern, "the memfd keeps what was written");
    let devices = g.hmp("info pci").unwrap();
    assert_eq!(
        devices.matches("1af4:1110").count(),
        1,
        "one ivshmem device (1af4:1110):\n{devices}"
    );
    drop(vm);
}

/// FNV-1a of `len` zero bytes, as [`hash`] computes it.
fn hash_zero(len: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for _ in 0..len {
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// A machine whose PCI bus takes no hot-plug (q35's root complex): the
/// arena is refused with QEMU's reason and the command line to use
/// instead, and the memory backend added before the refusal is gone.
/// No guest is needed: QEMU is started stopped (`-S`) with no kernel.
#[test]
fn an_arena_refused_by_qemu_names_the_command_line_and_leaves_nothing() {
    if skip() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("klpv-qemu-q35-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");
    let child = Command::new("nice")
        .args([
            "-n",
            "19",
            "qemu-system-x86_64",
            "-machine",
            "q35",
            "-accel",
            "tcg",
        ])
        .args(["-m", "128", "-S", "-nodefaults", "-display", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    let vm = Vm { child, dir };
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "no QMP socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let opts = AttachOptions {
        arena: true,
        ..AttachOptions::default()
    };
    let e = QemuGuest::attach(&sock, &opts).unwrap_err();
    let m = e.to_string();
    eprintln!("attach --arena on q35: {m}");
    assert!(matches!(e, QemuError::ArenaRefused { .. }), "{m}");
    assert!(m.contains("does not support hotplugging"), "{m}");
    assert!(m.contains(klpvisor_qemu::attach::ARENA_COMMAND_LINE), "{m}");
    let g = QemuGuest::attach(&sock, &AttachOptions::default()).unwrap();
    let memdevs = g.hmp("info memdev").unwrap();
    assert!(!memdevs.contains("klpvarena"), "{memdevs}");
    assert!(!g.hmp("info pci").unwrap().contains("1af4:1110"));
    drop(g);
    drop(vm);
}

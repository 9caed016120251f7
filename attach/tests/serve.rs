//! `klpvisor-attach` against a real QEMU: boots the test guest in TCG
//! (build/guest, or `KLPV_QEMU_GUEST_DIR`), attaches the binary to its QMP
//! socket and talks to the served API with the client `patcher` uses.
//! Runs only with `KLPV_QEMU_TESTS=1` (about 15 s).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use klpvisor_api::client::{Client, ClientError, Space, TransitionOptions};
use klpvisor_api::{ErrorKind, VmState};
use klpvisor_guest::{Guest, GuestPhys, Kernel};
use klpvisor_qemu::{AttachOptions, QemuGuest};

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

/// Children killed (each by its own pid) when dropped, and a scratch dir.
struct Procs {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One QEMU at a time: the tests of this file run one after the other.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn serves_the_read_only_api_for_a_qemu_guest() {
    if skip() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(|p| p.into_inner());
    let g = guest_dir();
    assert!(g.join("bzImage").exists(), "{} has no bzImage", g.display());
    let dir = std::env::temp_dir().join(format!("klpv-attach-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut procs = Procs {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let qmp = dir.join("qmp.sock");
    let qemu = Command::new("nice")
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
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    procs.children.push(qemu);
    wait_for("the guest's shell", Duration::from_secs(180), || {
        std::fs::read_to_string(dir.join("console.log")).is_ok_and(|l| l.contains("/ # "))
    });

    let api = dir.join("api.sock");
    let bin = env!("CARGO_BIN_EXE_klpvisor-attach");
    let attach = Command::new(bin)
        .arg("--qmp")
        .arg(&qmp)
        .arg("--api-sock")
        .arg(&api)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let attach_pid = attach.id();
    procs.children.push(attach);
    wait_for("the API socket", Duration::from_secs(30), || api.exists());

    // A second attach is refused while the first holds QEMU's QMP connection.
    let second = Command::new(bin)
        .arg("--qmp")
        .arg(&qmp)
        .arg("--api-sock")
        .arg(dir.join("api2.sock"))
        .args(["--qmp-timeout-ms", "1000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    eprintln!("second attach: {}", err.trim());
    assert!(!second.status.success());
    assert!(err.contains("no greeting"), "{err}");

    let c = Client::new(&api).unwrap();
    let vm = c.vm().unwrap();
    let kver = std::fs::read_to_string(g.join("kver")).unwrap_or_default();
    let k = vm.kernel.expect("kernel view");
    eprintln!(
        "GET /vm: {:?}, {} vCPUs, kernel {:?}, {} symbols in {:.0} ms",
        vm.state, vm.vcpus, k.release, k.symbols, k.decode_ms
    );
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.vcpus, 2);
    assert_eq!(k.release.as_deref(), Some(kver.trim()));
    assert!(k.banner.unwrap_or_default().starts_with("Linux version "));

    let sym = c.symbol("linux_banner").unwrap();
    let addr = format!("{:#x}", sym.symbols[0].addr.0);
    let m = c.memory(Space::Virt, &addr, 13).unwrap();
    assert_eq!(m.bytes, "4c696e75782076657273696f6e"); // "Linux version"

    let r = c.regs(1).unwrap();
    assert!(r.paused_for_read);
    assert!(r.regs.kernel_gs_base.is_some());
    assert_eq!(r.regs.lstar, None);

    let t = c.tasks().unwrap();
    eprintln!(
        "GET /tasks: {} tasks, paused {:?} us",
        t.count, t.out_of_guest_us
    );
    assert!(t.tasks.iter().any(|t| t.comm == "init" && t.pid == 1));

    let p = c.pause().unwrap();
    eprintln!("PUT /vm/pause: {:.0} us", p.latency_us);
    assert_eq!(c.vm().unwrap().state, VmState::Paused);
    assert!(!c.regs(0).unwrap().paused_for_read);
    c.resume().unwrap();
    assert_eq!(c.vm().unwrap().state, VmState::Running);

    assert!(c.patches().unwrap().patches.is_empty());
    // Attached without --arena: a patch is refused, saying how to get one.
    let e = c
        .apply(vec![0u8; 100_000], TransitionOptions::default())
        .unwrap_err();
    eprintln!("POST /patches: {e}");
    assert!(
        matches!(
            e,
            ClientError::Api {
                status: 409,
                kind: ErrorKind::Refused,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("--arena"), "{e}");

    // SIGTERM: the socket goes, QEMU runs on.
    let status = Command::new("kill")
        .arg(attach_pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("the socket's removal", Duration::from_secs(10), || {
        !api.exists()
    });
    assert!(
        procs.children[0].try_wait().unwrap().is_none(),
        "QEMU exited"
    );
}

/// FNV-1a over a guest-physical range, read in 1 MiB pieces.
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

/// The console's text from byte `from` on.
fn console_since(path: &Path, from: usize) -> String {
    let all = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(all.get(from..).unwrap_or_default()).into_owned()
}

/// The console's length now.
fn console_len(console: &Path) -> usize {
    std::fs::metadata(console).map_or(0, |m| m.len() as usize)
}

/// Waits until the guest, which prints /proc/cmdline every 200 ms, has
/// printed it three times since now (the first may have been read before
/// the change that was just made), and returns the last line.
fn cmdline_now(console: &Path) -> String {
    let from = console_len(console);
    let mut last = String::new();
    wait_for("two /proc/cmdline lines", Duration::from_secs(60), || {
        let text = console_since(console, from);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("CMDLINE ")).collect();
        if lines.len() >= 3 {
            last = lines[lines.len() - 1].to_owned();
            true
        } else {
            false
        }
    });
    last
}

/// The whole cycle on a QEMU guest through `klpvisor-attach --arena`:
/// the kernel's livepatch sample applied (the guest's own `cat
/// /proc/cmdline` then prints the patched text), disabled, enabled, rolled
/// back, applied again; a patch with klp callbacks refused with the reason
/// and the arena and kernel text hashed unchanged; a second attach
/// refused; SIGTERM ends the attach and the guest runs on patched, with
/// QEMU's QMP answering.
#[test]
fn patches_a_qemu_guest_through_the_api() {
    if skip() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(|p| p.into_inner());
    let g = guest_dir();
    let patches = g.join("../patches");
    assert!(g.join("bzImage").exists(), "{} has no bzImage", g.display());
    let dir = std::env::temp_dir().join(format!("klpv-attach-patch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut procs = Procs {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let qmp = dir.join("qmp.sock");
    // A second QMP socket, for this test's own checks (QEMU serves one
    // client per socket, and the attach holds the first).
    let qmp2 = dir.join("qmp2.sock");
    let console = dir.join("console.log");
    let qemu = Command::new("nice")
        .args(["-n", "19", "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max"])
        .args(["-smp", "2", "-m", "256", "-nodefaults", "-display", "none"])
        .args(["-no-reboot", "-bios", "/usr/share/seabios/bios-256k.bin"])
        .arg("-kernel")
        .arg(g.join("bzImage"))
        .arg("-initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .args([
            "-append",
            "console=ttyS0 panic=-1 -- /bin/sh -c \"while :; do echo CMDLINE $(cat /proc/cmdline); sleep 0.2; done\"",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp2.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    procs.children.push(qemu);
    wait_for("the guest's first line", Duration::from_secs(180), || {
        console_since(&console, 0).contains("CMDLINE ")
    });
    let line = cmdline_now(&console);
    eprintln!("guest prints: {line}");
    assert!(line.contains("console=ttyS0"), "{line}");

    let api = dir.join("api.sock");
    let bin = env!("CARGO_BIN_EXE_klpvisor-attach");
    let attach = Command::new(bin)
        .arg("--qmp")
        .arg(&qmp)
        .arg("--api-sock")
        .arg(&api)
        .arg("--arena")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let attach_pid = attach.id();
    procs.children.push(attach);
    wait_for("the API socket", Duration::from_secs(60), || api.exists());

    let second = Command::new(bin)
        .arg("--qmp")
        .arg(&qmp)
        .arg("--api-sock")
        .arg(dir.join("api2.sock"))
        .args(["--arena", "--qmp-timeout-ms", "1000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    eprintln!("second attach: {}", err.trim());
    assert!(!second.status.success());
    assert!(err.contains("no greeting"), "{err}");

    let c = Client::new(&api).unwrap();
    let vm = c.vm().unwrap();
    eprintln!("arena {:#x}+{:#x}", vm.arena_gpa.0, vm.arena_size);
    assert_eq!(vm.arena_size, 16 << 20);

    let opts = TransitionOptions::default();
    let sample = std::fs::read(patches.join("livepatch-sample.ko")).unwrap();
    let r = c.apply(sample.clone(), opts).unwrap();
    eprintln!(
        "apply {}: prepare {:.0} ms, pause {:.0} us, {} bytes, {} attempt(s), warnings {:?}",
        r.patch.name, r.prepare_ms, r.pause_us, r.bytes_written, r.attempts, r.warnings
    );
    let name = r.patch.name.clone();
    let line = cmdline_now(&console);
    eprintln!("after apply the guest prints: {line}");
    assert_eq!(line, "CMDLINE this has been live patched");
    let p = c.patches().unwrap();
    assert_eq!(p.patches.len(), 1);
    assert!(p.gate.is_none(), "no call gate on QEMU");

    let r = c.disable(&name, opts).unwrap();
    eprintln!("disable: pause {:.0} us", r.pause_us);
    let line = cmdline_now(&console);
    eprintln!("after disable: {line}");
    assert!(line.contains("console=ttyS0"), "{line}");

    let r = c.enable(&name, opts).unwrap();
    eprintln!("enable: pause {:.0} us", r.pause_us);
    let line = cmdline_now(&console);
    assert_eq!(line, "CMDLINE this has been live patched");

    let hist = c.history().unwrap();
    eprintln!("history: {} transitions", hist.len());
    assert_eq!(hist.len(), 3);
    let r = c.rollback(Some(hist[0].seq), opts).unwrap();
    eprintln!("rollback to {}: pause {:.0} us", r.to, r.pause_us);
    let line = cmdline_now(&console);
    eprintln!("after rollback: {line}");
    assert!(line.contains("console=ttyS0"), "{line}");

    // Disabled by the rollback: removable, then applied again.
    let removed = c.remove(&name).unwrap();
    eprintln!("removed {}", removed.name);
    assert!(c.patches().unwrap().patches.is_empty());
    c.apply(sample, opts).unwrap();
    let line = cmdline_now(&console);
    assert_eq!(line, "CMDLINE this has been live patched");

    // A patch with klp callbacks is refused, and nothing is written: the
    // arena and the kernel text hash the same before and after.
    let q = QemuGuest::attach(&qmp2, &AttachOptions::default()).unwrap();
    let k = {
        let (k, _) = q.paused(Kernel::open).unwrap();
        k.unwrap()
    };
    let text = k.kallsyms.addr("_text").unwrap();
    let etext = k.kallsyms.addr("_etext").unwrap();
    let text_phys = k.kaslr.text_phys;
    let (arena, arena_len) = (vm.arena_gpa.0, vm.arena_size);
    let before = (
        hash(&q, arena, arena_len),
        hash(&q, text_phys, etext - text),
    );
    let cb = std::fs::read(patches.join("callbacks-v1.ko")).unwrap();
    let e = c.apply(cb, opts).unwrap_err();
    eprintln!("POST /patches callbacks-v1.ko: {e}");
    assert!(
        matches!(
            e,
            ClientError::Api {
                status: 422,
                kind: ErrorKind::Refused,
                ..
            }
        ),
        "{e}"
    );
    let m = e.to_string();
    assert!(m.contains("klp callbacks"), "{m}");
    assert!(m.contains("raises a chosen interrupt vector"), "{m}");
    let after = (
        hash(&q, arena, arena_len),
        hash(&q, text_phys, etext - text),
    );
    eprintln!("arena/text hashes before {before:x?}, after {after:x?}");
    assert_eq!(before, after);
    assert_eq!(c.patches().unwrap().patches.len(), 1);

    // SIGTERM: the socket goes; the guest runs on, patched, and QEMU's
    // QMP answers.
    let status = Command::new("kill")
        .arg(attach_pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("the socket's removal", Duration::from_secs(10), || {
        !api.exists()
    });
    let line = cmdline_now(&console);
    eprintln!("after detach the guest prints: {line}");
    assert_eq!(line, "CMDLINE this has been live patched");
    let (running, status) = q.status().unwrap();
    assert!(running, "{status}");
    drop(q);
    let again = QemuGuest::attach(&qmp, &AttachOptions::default()).unwrap();
    assert!(again.status().unwrap().0);
    drop(again);

    // A new attach finds the arena, but not the engine's state: it
    // refuses to lay the arena out again over the live mapping.
    let attach = Command::new(bin)
        .arg("--qmp")
        .arg(&qmp)
        .arg("--api-sock")
        .arg(&api)
        .arg("--arena")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let reattach_pid = attach.id();
    procs.children.push(attach);
    wait_for("the API socket", Duration::from_secs(60), || api.exists());
    let c = Client::new(&api).unwrap();
    assert_eq!(c.vm().unwrap().arena_gpa, vm.arena_gpa);
    let sample = std::fs::read(patches.join("livepatch-sample.ko")).unwrap();
    let e = c.apply(sample, opts).unwrap_err();
    eprintln!("apply after a re-attach: {e}");
    assert!(
        matches!(
            e,
            ClientError::Api {
                status: 409,
                kind: ErrorKind::Refused,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("already mapped"), "{e}");
    assert!(e.to_string().contains("VM restarted"), "{e}");
    let line = cmdline_now(&console);
    assert_eq!(line, "CMDLINE this has been live patched");
    // SIGTERM again: this attach stops the gdbstub it started, and the
    // guest runs on.
    let status = Command::new("kill")
        .arg(reattach_pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("the socket's removal", Duration::from_secs(10), || {
        !api.exists()
    });
    let line = cmdline_now(&console);
    assert_eq!(line, "CMDLINE this has been live patched");
    assert!(
        procs.children[0].try_wait().unwrap().is_none(),
        "QEMU exited"
    );
}

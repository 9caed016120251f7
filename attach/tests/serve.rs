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

#[test]
fn serves_the_read_only_api_for_a_qemu_guest() {
    if skip() {
        return;
    }
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
    let e = c
        .apply(vec![0u8; 100_000], TransitionOptions::default())
        .unwrap_err();
    eprintln!("POST /patches: {e}");
    assert!(
        matches!(
            e,
            ClientError::Api {
                status: 501,
                kind: ErrorKind::Refused,
                ..
            }
        ),
        "{e}"
    );

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

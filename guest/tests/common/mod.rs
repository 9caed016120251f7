//! What the offline tests share: a QEMU memory dump of the real test guest
//! (guest-images/dump-guest, built once and cached under build/dump) and
//! livepatch modules built by kbuild (guest-images/build-livepatch).
//! Each test binary uses a part of it.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use klpvisor_guest::{DumpGuest, Kernel};

/// Just past the dump's 512 MiB of RAM, where the VMM would reserve the
/// arena: 16 MiB.
pub const ARENA: (u64, u64) = (0x2000_0000, 16 << 20);

/// Whether this tier runs: the dump tests boot the test guest in QEMU
/// (and, the first time, install packages, download the Debian kernel and
/// build patches with kbuild), so a plain `cargo test` skips them with a
/// one-line note. `KLPV_DUMP_TESTS=1` runs them; `scripts/test` sets it.
pub fn skip_without_dump() -> bool {
    if std::env::var_os("KLPV_DUMP_TESTS").is_some_and(|v| v == "1") {
        return false;
    }
    // Straight to stderr: libtest captures print!/eprint!, not this, so the
    // note shows in a normal run.
    let name = std::thread::current()
        .name()
        .unwrap_or("dump test")
        .to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "skipped {name}: needs the QEMU dump of the test guest; run with KLPV_DUMP_TESTS=1 (see tests/README.md)"
    );
    true
}

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The build directories' suffix for the guest `KLPV_GUEST` selects
/// (guest-images/common.sh): none for 6.1 (Debian 12's cloud kernel, the
/// default), `-6.1-amd64` for Debian 12's generic kernel, `-6.12` for 6.12.
/// The scripts these tests run read the same variable.
pub fn guest_suffix() -> &'static str {
    match std::env::var("KLPV_GUEST").as_deref() {
        Ok("6.12") => "-6.12",
        Ok("6.1-amd64") => "-6.1-amd64",
        _ => "",
    }
}

/// build/dump (build/dump-6.1-amd64, build/dump-6.12), made (or found up to date) by
/// guest-images/dump-guest.
pub fn dump_dir() -> PathBuf {
    let dir = root().join(format!("build/dump{}", guest_suffix()));
    let status = Command::new(root().join("guest-images/dump-guest"))
        .arg(&dir)
        .status()
        .expect("cannot run guest-images/dump-guest");
    assert!(status.success(), "guest-images/dump-guest failed: {status}");
    dir
}

/// The dump and the kernel found in it, as the VMM finds it live.
pub fn open_dump() -> (PathBuf, DumpGuest, Kernel) {
    let dir = dump_dir();
    let guest = DumpGuest::open(dir.join("vmcore.elf")).expect("open vmcore.elf");
    let kernel = Kernel::open(&guest).unwrap_or_else(|e| panic!("{e}"));
    (dir, guest, kernel)
}

/// The dump, opened once per test binary.
pub struct Dump {
    pub guest: DumpGuest,
    pub kernel: Kernel,
}

pub fn dump() -> &'static Dump {
    static D: OnceLock<Dump> = OnceLock::new();
    D.get_or_init(|| {
        let (_, guest, kernel) = open_dump();
        Dump { guest, kernel }
    })
}

/// Builds (or reuses) the livepatch module from `src` into build/patches
/// (build/patches-6.1-amd64, build/patches-6.12) and returns the .ko's bytes.
pub fn build_ko(src: &Path) -> Vec<u8> {
    let out = root().join(format!("build/patches{}", guest_suffix()));
    let status = Command::new(root().join("guest-images/build-livepatch"))
        .arg(src)
        .arg(&out)
        .status()
        .expect("cannot run guest-images/build-livepatch");
    assert!(status.success(), "build-livepatch {}", src.display());
    let name = src.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    std::fs::read(out.join(format!("{name}.ko"))).unwrap_or_else(|e| panic!("{name}.ko: {e}"))
}

/// guest-images/patches/NAME.c, built.
pub fn ko(name: &str) -> Vec<u8> {
    build_ko(&root().join(format!("guest-images/patches/{name}.c")))
}

/// The pid of the dumped guest's task playing `name` ("lister", "spinner":
/// roles.txt in the dump directory).
pub fn role_pid(dump_dir: &Path, name: &str) -> i32 {
    std::fs::read_to_string(dump_dir.join("roles.txt"))
        .unwrap_or_else(|e| panic!("roles.txt: {e}"))
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in roles.txt"))
}

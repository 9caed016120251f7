//! Shared machinery for the end-to-end tests.
//!
//! Scenarios are shell scripts in `tests/scenarios/` that run `vmm` on a
//! host with KVM and print `KLPV-RESULT <name> key=value...` lines next to
//! the guest's own console lines. Where this host's /dev/kvm runs guests at
//! hardware speed (`vmm --kvm-probe`), scenarios run here directly; otherwise
//! they run inside the nested image: QEMU TCG boots an L1 Linux with KVM,
//! whose init runs the scenario (`scripts/nested-run`). Either way the test
//! reads the same lines.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one scenario may take before the test fails.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(900);

/// How long a nested run may take before nested-run kills its QEMU (the
/// busiest scenario needs about 2 minutes): an emulator livelock the
/// harness cannot see costs this, then one retry.
pub const NESTED_RUN_TIMEOUT_SECS: u32 = 420;

/// Whether the end-to-end tests run: they boot real VMs (on this host's
/// KVM or inside the nested QEMU image, which takes minutes and needs the
/// release binaries and guest images), so a plain `cargo test` skips each
/// with a one-line note. `KLPV_E2E_TESTS=1` runs them; `scripts/test` sets it.
pub fn skip_without_e2e() -> bool {
    if std::env::var_os("KLPV_E2E_TESTS").is_some_and(|v| v == "1") {
        return false;
    }
    // Straight to stderr: libtest captures print!/eprint!, not this, so the
    // note shows in a normal run.
    let name = std::thread::current()
        .name()
        .unwrap_or("e2e test")
        .to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "skipped {name}: boots VMs; run with KLPV_E2E_TESTS=1 (see tests/README.md)"
    );
    true
}

/// The repository root (scenarios, guest images and build/ live there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The build directories' suffix for the guest `KLPV_GUEST` selects
/// (guest-images/common.sh): none for 6.1 (Debian 12's cloud kernel, the
/// default), `-6.1-amd64` for Debian 12's generic kernel, `-6.12` for the
/// 6.12 cloud kernel. The scripts the harness runs read the same variable
/// (and refuse any other value).
pub fn guest_suffix() -> &'static str {
    match std::env::var("KLPV_GUEST").as_deref() {
        Ok("6.12") => "-6.12",
        Ok("6.1-amd64") => "-6.1-amd64",
        _ => "",
    }
}

/// The selected guest's build directory: build/guest, build/guest-6.1-amd64
/// or build/guest-6.12.
pub fn guest_dir() -> PathBuf {
    repo_root().join(format!("build/guest{}", guest_suffix()))
}

/// Directory holding the release binaries (`vmm`, `pause_cycles`).
pub fn bin_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("release")
}

/// The release `vmm` the scenarios run; a test fails early, saying how to
/// build it, when it is missing.
pub fn vmm_bin() -> PathBuf {
    let p = bin_dir().join("vmm");
    assert!(
        p.exists(),
        "{} is missing: build with `cargo build --release --workspace --examples` (scripts/test does)",
        p.display()
    );
    p
}

/// Where the scenarios run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// This host's KVM runs guests at hardware speed.
    Direct,
    /// Run inside the nested QEMU image.
    Nested,
}

/// Decided once per test binary: `KLPV_MODE=direct|nested` overrides the probe.
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("KLPV_MODE").as_deref() {
        Ok("direct") => Mode::Direct,
        Ok("nested") => Mode::Nested,
        _ => {
            let out = Command::new(vmm_bin())
                .arg("--kvm-probe")
                .output()
                .expect("run vmm --kvm-probe");
            let text = String::from_utf8_lossy(&out.stdout);
            eprintln!("harness: {}", text.trim());
            if text.contains("native=true") {
                Mode::Direct
            } else {
                Mode::Nested
            }
        }
    })
}

/// Builds (or confirms cached) the guest and nested images, unless
/// `KLPV_IMAGES_READY=1` says the caller already has (`scripts/test` builds
/// them once before the end-to-end tier: the confirmation alone takes about
/// 13 s, and test runners that start a process per test would repeat it,
/// and race on the files it rewrites).
fn ensure_images(mode: Mode) {
    static DONE: OnceLock<()> = OnceLock::new();
    if std::env::var_os("KLPV_IMAGES_READY").is_some_and(|v| v == "1") {
        return;
    }
    DONE.get_or_init(|| {
        let root = repo_root();
        let status = match mode {
            Mode::Direct => Command::new(root.join("guest-images/build-guest")).status(),
            Mode::Nested => Command::new(root.join("scripts/nested-image")).status(),
        }
        .expect("run guest-images build");
        assert!(status.success(), "building guest images failed");
    });
}

/// Everything a scenario printed, with its exit status.
#[derive(Debug)]
pub struct Run {
    /// Every line the scenario and its guest printed, in order.
    pub lines: Vec<String>,
    /// Whether the scenario exited 0.
    pub success: bool,
}

impl Run {
    /// `key=value` fields of every `KLPV-RESULT <name> ...` line.
    pub fn results(&self, name: &str) -> Vec<HashMap<String, String>> {
        let prefix = format!("KLPV-RESULT {name} ");
        self.lines
            .iter()
            .filter_map(|l| l.find(&prefix).map(|i| &l[i + prefix.len()..]))
            .map(fields)
            .collect()
    }

    /// The only `KLPV-RESULT <name>` line; panics with the transcript otherwise.
    pub fn result(&self, name: &str) -> HashMap<String, String> {
        let mut r = self.results(name);
        assert_eq!(
            r.len(),
            1,
            "expected one {name} result\n{}",
            self.transcript()
        );
        r.remove(0)
    }

    /// Lines containing `needle` (the console may prefix other output).
    pub fn lines_with(&self, needle: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.contains(needle))
            .map(String::as_str)
            .collect()
    }

    /// Everything printed, for an assertion's message.
    pub fn transcript(&self) -> String {
        self.lines.join("\n")
    }

    /// What the guest's klpv-cmdline printed for `cat /proc/cmdline` the
    /// n-th time (`KLPV-CMDLINE <n> <text>`).
    pub fn cmdline(&self, n: u32) -> String {
        self.step("KLPV-CMDLINE", n)
    }

    /// The text of a guest script's `<TAG> <n> <text>` line for step `n`
    /// (empty when the line ends at the step number).
    pub fn step(&self, tag: &str, n: u32) -> String {
        let tag = format!("{tag} {n} ");
        self.lines
            .iter()
            .find_map(|l| {
                l.split_once(&tag)
                    .map(|(_, c)| c.trim().to_owned())
                    .or_else(|| l.ends_with(tag.trim_end()).then(String::new))
            })
            .unwrap_or_else(|| panic!("no `{tag}` line\n{}", self.transcript()))
    }

    /// The `key=value` words of every `<TAG> ...` line, merged (a later
    /// line's value wins).
    pub fn fields(&self, tag: &str) -> HashMap<String, String> {
        let prefix = format!("{tag} ");
        let mut all = HashMap::new();
        for line in self.lines_with(&prefix) {
            let Some((_, rest)) = line.split_once(&prefix) else {
                continue;
            };
            for word in rest.split(' ') {
                if let Some((k, v)) = word.split_once('=') {
                    all.insert(k.to_string(), v.to_string());
                }
            }
        }
        all
    }

    /// The klp callbacks' lines a guest script printed at step `n`
    /// (`KLPV-CB <n> <line>`), in order.
    pub fn callbacks(&self, n: u32) -> Vec<String> {
        let tag = format!("KLPV-CB {n} ");
        self.lines
            .iter()
            .filter_map(|l| l.split_once(&tag).map(|(_, c)| c.trim().to_owned()))
            .collect()
    }

    /// The JSON a scenario printed on one line after `TAG STEP `
    /// (e.g. `KLPV-JSON-PATCHES applied {...}`), decoded.
    pub fn json<T: serde::de::DeserializeOwned>(&self, tag: &str, step: &str) -> T {
        let prefix = format!("{tag} {step} ");
        let json = self
            .lines
            .iter()
            .find_map(|l| l.split_once(&prefix).map(|(_, j)| j.to_owned()))
            .unwrap_or_else(|| panic!("no {tag} at {step}\n{}", self.transcript()));
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{tag} {step}: {e}: {json}"))
    }
}

/// Splits `a=1 b=two` into a map; a value runs to the next ` key=`.
pub fn fields(s: &str) -> HashMap<String, String> {
    s.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// How long the nested L1 kernel may take to report `KLPV-L1`. It normally
/// takes ~10 s; under QEMU TCG it rarely hangs early in boot (seen about once
/// in 40 boots), which is the emulator, not the code under test.
pub const L1_BOOT_LIMIT: Duration = Duration::from_secs(180);

/// How long an L2 kernel may take from its "Linux version" banner to init's
/// KLPV-READY. Nested it takes 15-25 s; an emulated SMP boot that livelocks
/// (L2 soft lockups right after the secondary CPUs come up) never gets there.
pub const L2_BOOT_LIMIT: Duration = Duration::from_secs(150);

/// How long L1 may go without its heartbeat (`KLPV-L1-ALIVE`, every 20 s
/// on its console while a scenario runs) before the attempt counts as the
/// emulator's: an L1 that stopped altogether (seen in long runs, with
/// nothing in any log) is killed at once and retried, while a scenario
/// that hangs in a live L1 runs into its own limit and fails.
pub const L1_SILENCE_LIMIT: Duration = Duration::from_secs(150);

/// Attempts at one nested scenario while the emulator, not the code under
/// test, ends them (see [`emulator_failure`]). On the 2-core Intel machines
/// of 2026-11-27, with a 2-vCPU L1, about one L2 boot in three died in early
/// SMP initcalls, under our VMM and under QEMU alike, with QEMU 7.2 and
/// 10.0; nested-run now gives L1 one vCPU, which made that go away.
const NESTED_ATTEMPTS: usize = 6;

/// Why a nested run says nothing about the code under test, if it does not:
///
/// - L1's KVM (kvm_amd on QEMU TCG's emulated SVM) oopsed: a stack overflow
///   on VMRUN's return, seen about once in 20 runs of the busiest scenario.
///   The L2 guest has no kvm modules, so an oops naming them is L1's.
/// - L1 stopped without finishing the scenario, before nested-run's own
///   limit on the whole run (which counts against the code under test).
/// - An L2 kernel started and never reached init (a triple fault or a hang
///   during boot). Nothing of ours has touched a guest before its init runs
///   (no patch, no pause), and QEMU as the L2 VMM dies the same way.
fn emulator_failure(mode: Mode, run: &Run) -> Option<&'static str> {
    if mode != Mode::Nested {
        return None;
    }
    let any = |s: &str| run.lines.iter().any(|l| l.contains(s));
    if any("nested-run: timed out after") && !any("KLPV-L1-DONE") {
        // The scenario outlived its whole limit with L1 up: that is the
        // code under test hanging (a guest livelocked by a device once
        // looked like this), not the emulator; three retries of it once
        // took a CI run past its time.
        None
    } else if any("svm_vcpu_run") || any("svm_vcpu_enter_exit") {
        Some("L1's kvm_amd oopsed")
    } else if !any("KLPV-L1-DONE") {
        Some("L1 stopped before the scenario finished")
    } else if l2_boots_unfinished(&run.lines) > 0 {
        Some("an L2 kernel died before reaching init")
    } else {
        None
    }
}

/// L2 kernels that printed their banner after L1 came up, minus those whose
/// init printed KLPV-READY.
fn l2_boots_unfinished(lines: &[String]) -> usize {
    let after_l1 = lines
        .iter()
        .skip_while(|l| !l.contains("KLPV-L1 "))
        .collect::<Vec<_>>();
    let banners = after_l1
        .iter()
        .filter(|l| l.contains("] Linux version "))
        .count();
    let ready = after_l1
        .iter()
        .filter(|l| l.contains("KLPV-READY "))
        .count();
    banners.saturating_sub(ready)
}

/// Runs scenario `name` with `args` where KVM is usable and collects output.
/// Nested, a run the emulator ended (see [`emulator_failure`]) is retried,
/// up to [`NESTED_ATTEMPTS`] in all; anything else counts.
pub fn run_scenario(name: &str, args: &[&str]) -> Run {
    run_scenario_within(name, args, NESTED_RUN_TIMEOUT_SECS)
}

/// [`run_scenario`] for a scenario that needs longer than
/// [`NESTED_RUN_TIMEOUT_SECS`] in the nested image (many L2 boots).
pub fn run_scenario_within(name: &str, args: &[&str], nested_timeout_secs: u32) -> Run {
    run_scenario_on(name, args, nested_timeout_secs, None)
}

/// The Debian root file system image (`guest-images/build-rootfs`), built
/// or confirmed once per test binary unless `KLPV_IMAGES_READY=1`. Needs
/// root (mmdebstrap).
pub fn rootfs_image() -> PathBuf {
    static DONE: OnceLock<()> = OnceLock::new();
    let root = repo_root();
    if std::env::var_os("KLPV_IMAGES_READY").is_none_or(|v| v != "1") {
        DONE.get_or_init(|| {
            let status = Command::new(root.join("guest-images/build-rootfs"))
                .status()
                .expect("run guest-images/build-rootfs");
            assert!(
                status.success(),
                "building the root file system image failed"
            );
        });
    }
    root.join("build/rootfs/rootfs.ext4")
}

/// [`run_scenario_within`] with the Debian root file system for the L2
/// guest: the scenario finds it in `KLPV_ROOTFS`, a file or device it may
/// write (in the nested image L1's virtio disk, which QEMU keeps
/// copy-on-write; directly, a sparse copy of the image for this attempt,
/// removed after it), so no run changes `build/rootfs/rootfs.ext4`.
pub fn run_scenario_with_rootfs(name: &str, args: &[&str], nested_timeout_secs: u32) -> Run {
    let image = rootfs_image();
    run_scenario_on(name, args, nested_timeout_secs, Some(&image))
}

fn run_scenario_on(
    name: &str,
    args: &[&str],
    nested_timeout_secs: u32,
    rootfs: Option<&Path>,
) -> Run {
    let mode = mode();
    ensure_images(mode);
    let start = Instant::now();
    let mut failed: Vec<(String, Vec<String>)> = Vec::new();
    for attempt in 1..=NESTED_ATTEMPTS {
        let last = attempt == NESTED_ATTEMPTS;
        let (why, lines) = match run_once(mode, name, args, nested_timeout_secs, rootfs) {
            Attempt::Done(run) => match emulator_failure(mode, &run) {
                Some(why) if !last => (why.to_string(), run.lines),
                _ => {
                    note(&format!(
                        "scenario {name} took {} s ({attempt} attempt(s))",
                        start.elapsed().as_secs()
                    ));
                    return run;
                }
            },
            Attempt::Emulator(why, lines) => (why, lines),
        };
        note(&format!(
            "attempt {attempt} at {name}: {why} (emulator) after {} s; retrying",
            start.elapsed().as_secs()
        ));
        failed.push((why, lines));
    }
    panic!(
        "the emulator ended all {NESTED_ATTEMPTS} attempts at {name}:\n{}",
        failed
            .iter()
            .map(|(why, lines)| format!("--- {why}\n{}", lines.join("\n")))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// A line straight to stderr, past libtest's capture: where a CI run's
/// time went (each scenario's duration, and every emulator retry) shows in
/// its log even when every test passes.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "harness: {line}");
}

/// The harness's own limit on a scenario: [`SCENARIO_TIMEOUT`], or a
/// minute past the nested run's limit when that is longer.
fn scenario_timeout(nested_timeout_secs: u32) -> Duration {
    SCENARIO_TIMEOUT.max(Duration::from_secs(u64::from(nested_timeout_secs) + 60))
}

enum Attempt {
    Done(Run),
    /// Ended by the harness because of the emulator: why, and the lines.
    Emulator(String, Vec<String>),
}

/// A sparse copy of the root file system image for one direct attempt,
/// removed with this value.
struct RootfsCopy(PathBuf);

impl RootfsCopy {
    fn new(image: &Path) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let copy =
            std::env::temp_dir().join(format!("klpv-rootfs-{}-{n}.ext4", std::process::id()));
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(image)
            .arg(&copy)
            .status()
            .expect("run cp");
        assert!(status.success(), "copying {} failed", image.display());
        RootfsCopy(copy)
    }
}

impl Drop for RootfsCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_once(
    mode: Mode,
    name: &str,
    args: &[&str],
    nested_timeout_secs: u32,
    rootfs: Option<&Path>,
) -> Attempt {
    let root = repo_root();
    // Lives until the attempt is over.
    let rootfs_copy = rootfs.filter(|_| mode == Mode::Direct).map(RootfsCopy::new);
    let mut cmd = match mode {
        Mode::Direct => {
            let mut c = Command::new(root.join("tests/scenarios").join(name));
            c.args(args)
                .env("KLPV_KERNEL", guest_dir().join("bzImage"))
                .env("KLPV_INITRD", guest_dir().join("initramfs.cpio.gz"))
                .env("PATH", path_with(&[bin_dir(), bin_dir().join("examples")]));
            if let Some(copy) = &rootfs_copy {
                c.env("KLPV_ROOTFS", &copy.0);
            }
            c
        }
        Mode::Nested => {
            let mut c = Command::new(root.join("scripts/nested-run"));
            if let Some(image) = rootfs {
                c.arg("--disk").arg(image);
            }
            c.arg("--timeout")
                .arg(nested_timeout_secs.to_string())
                .arg("--")
                .arg(name)
                .args(args);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("harness: scenario {name} {args:?} ({mode:?})");
    let mut child = cmd.spawn().expect("start scenario");
    let (tx, rx) = mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).replace('\r', "");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut lines: Vec<String> = Vec::new();
    let start = Instant::now();
    let timeout = scenario_timeout(nested_timeout_secs);
    let deadline = start + timeout;
    let nested = mode == Mode::Nested;
    let mut l1_up = !nested;
    // When the L2 kernel now booting printed its banner (nested only).
    let mut l2_booting: Option<Instant> = None;
    // L1's last sign of life (nested, once it is up).
    let mut alive = start;
    loop {
        let mut limit = if !l1_up {
            start + L1_BOOT_LIMIT
        } else if let Some(t) = l2_booting {
            deadline.min(t + L2_BOOT_LIMIT)
        } else {
            deadline
        };
        if nested && l1_up {
            limit = limit.min(alive + L1_SILENCE_LIMIT);
        }
        let left = limit.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                eprintln!("  | {line}");
                if line.contains("KLPV-L1 ") || line.contains("KLPV-L1-ALIVE") {
                    alive = Instant::now();
                }
                l1_up |= line.contains("KLPV-L1 ");
                if nested && l1_up && line.contains("] Linux version ") {
                    l2_booting = Some(Instant::now());
                }
                if line.contains("KLPV-READY ") {
                    l2_booting = None;
                }
                // L1's own watchdog naming the vmm: the emulated SVM has
                // livelocked the L1 CPU running L2 (seen under QEMU 7.2
                // TCG); nothing after it is about the code under test.
                let l1_livelock = nested && line.contains("soft lockup") && line.contains("[vmm:");
                lines.push(line);
                if l1_livelock {
                    kill_tree(&mut child);
                    return Attempt::Emulator("L1 livelocked running L2".into(), lines);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if !l1_up => {
                kill_tree(&mut child);
                return Attempt::Emulator(
                    format!("L1 did not boot within {L1_BOOT_LIMIT:?}"),
                    lines,
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout)
                if nested && alive.elapsed() >= L1_SILENCE_LIMIT =>
            {
                kill_tree(&mut child);
                return Attempt::Emulator(
                    format!("L1 stopped: no heartbeat for {L1_SILENCE_LIMIT:?}"),
                    lines,
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) if l2_booting.is_some() => {
                kill_tree(&mut child);
                return Attempt::Emulator(
                    format!("an L2 kernel did not reach init within {L2_BOOT_LIMIT:?}"),
                    lines,
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill_tree(&mut child);
                panic!(
                    "scenario {name} timed out after {timeout:?}\n{}",
                    lines.join("\n")
                );
            }
        }
    }
    let status = child.wait().expect("wait for scenario");
    Attempt::Done(Run {
        lines,
        success: status.success(),
    })
}

/// Kills the scenario and what it started (nested-run execs QEMU under
/// `timeout`, which forwards SIGTERM to it).
fn kill_tree(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn path_with(dirs: &[PathBuf]) -> std::ffi::OsString {
    let mut parts: Vec<PathBuf> = dirs.to_vec();
    if let Some(p) = std::env::var_os("PATH") {
        parts.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(parts).expect("PATH entries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_fields() {
        let r = Run {
            lines: vec![
                "noise KLPV-RESULT boot rc=0 cpus=2".into(),
                "KLPV-RESULT other rc=1".into(),
            ],
            success: true,
        };
        let b = r.result("boot");
        assert_eq!(b["rc"], "0");
        assert_eq!(b["cpus"], "2");
        assert!(r.results("missing").is_empty());
    }

    #[test]
    fn an_l2_that_never_reached_init_is_the_emulators() {
        let lines = |v: &[&str]| Run {
            lines: v.iter().map(|s| s.to_string()).collect(),
            success: false,
        };
        // L1's own banner (before KLPV-L1) does not count.
        let ok = lines(&[
            "[    0.000000] Linux version 6.1.0 (L1)",
            "KLPV-L1 kvm=ready",
            "[    0.000000] Linux version 6.1.0",
            "KLPV-READY cpus=2 cmdline=x",
            "[    0.000000] Linux version 6.1.0",
            "KLPV-READY cpus=2 cmdline=y",
            "KLPV-L1-DONE rc=1",
        ]);
        assert_eq!(emulator_failure(Mode::Nested, &ok), None);
        let died = lines(&[
            "KLPV-L1 kvm=ready",
            "[    0.000000] Linux version 6.1.0",
            "KLPV-READY cpus=2 cmdline=x",
            "[    0.000000] Linux version 6.1.0",
            "vmm: guest triple fault on vCPU 1",
            "KLPV-L1-DONE rc=1",
        ]);
        assert_eq!(
            emulator_failure(Mode::Nested, &died),
            Some("an L2 kernel died before reaching init")
        );
        assert_eq!(emulator_failure(Mode::Direct, &died), None);
        let l1 = lines(&["KLPV-L1 kvm=ready", "KLPV-READY cpus=2 cmdline=x"]);
        assert_eq!(
            emulator_failure(Mode::Nested, &l1),
            Some("L1 stopped before the scenario finished")
        );
        // The whole run's limit, with L1 and L2 up: the scenario hung.
        let hung = lines(&[
            "KLPV-L1 kvm=ready",
            "KLPV-READY cpus=2 cmdline=x",
            "nested-run: timed out after 1500s; killed QEMU",
        ]);
        assert_eq!(emulator_failure(Mode::Nested, &hung), None);
    }
}

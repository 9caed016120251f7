//! Bad arguments end `vmm` with exit code 1 and one line naming the problem:
//! no panic, no backtrace. These fail before any guest runs, so they run on
//! this host directly.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;

use harness::{guest_dir, repo_root, vmm_bin};

fn guest_kernel() -> PathBuf {
    let status = Command::new(repo_root().join("guest-images/build-guest"))
        .status()
        .expect("run build-guest");
    assert!(status.success());
    guest_dir().join("bzImage")
}

/// Runs vmm and returns its stderr, asserting the error contract.
fn refuses(args: &[&str], needle: &str) {
    let out = Command::new(vmm_bin())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "args {args:?}: {stderr}");
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line for {args:?}: {stderr}");
    assert!(lines[0].starts_with("vmm: error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
}

#[test]
fn missing_kernel_file() {
    if harness::skip_without_e2e() {
        return;
    }
    refuses(
        &["--kernel", "/nonexistent/bzImage"],
        "cannot open kernel /nonexistent/bzImage",
    );
}

#[test]
fn kernel_that_is_not_a_bzimage() {
    if harness::skip_without_e2e() {
        return;
    }
    let not_kernel = std::env::current_exe().unwrap();
    let path = not_kernel.to_str().unwrap();
    refuses(&["--kernel", path], "is not a bzImage");
}

#[test]
fn zero_vcpus() {
    if harness::skip_without_e2e() {
        return;
    }
    let k = guest_kernel();
    refuses(
        &["--kernel", k.to_str().unwrap(), "--cpus", "0"],
        "--cpus 0 is out of range",
    );
}

#[test]
fn absurd_memory_size() {
    if harness::skip_without_e2e() {
        return;
    }
    let k = guest_kernel();
    let k = k.to_str().unwrap();
    refuses(
        &["--kernel", k, "--mem", "4000000000"],
        "exceeds this host's",
    );
    refuses(&["--kernel", k, "--mem", "1"], "too small");
}

#[test]
fn initrd_larger_than_ram() {
    if harness::skip_without_e2e() {
        return;
    }
    let k = guest_kernel();
    let big = std::env::temp_dir().join(format!("klpv-big-initrd-{}", std::process::id()));
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(80 << 20).unwrap(); // sparse: 80 MiB > 64 MiB of RAM
    refuses(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            big.to_str().unwrap(),
            "--mem",
            "64",
        ],
        "larger than guest RAM",
    );
    let _ = std::fs::remove_file(big);
}

#[test]
fn odd_arena_size() {
    if harness::skip_without_e2e() {
        return;
    }
    let k = guest_kernel();
    refuses(
        &["--kernel", k.to_str().unwrap(), "--arena", "3"],
        "--arena 3 MiB",
    );
}

//! `vmm --completions SHELL` and `vmm --man`: generated from the argument
//! definitions, they need no KVM and no kernel, and they cannot be mixed
//! with a VM's options.
#![forbid(unsafe_code)]

use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("run vmm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn completions_cover_every_option() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = vmm(&["--completions", shell]);
        assert!(o.status.success(), "{shell}: {o:?}");
        let script = stdout(&o);
        for opt in ["kernel", "api-sock", "trusted-keys", "kvm-probe"] {
            assert!(script.contains(opt), "{shell} script lacks {opt}");
        }
    }
    let o = vmm(&["--completions", "tcsh"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_man_page_is_roff_with_every_option() {
    let o = vmm(&["--man"]);
    assert!(o.status.success(), "{o:?}");
    let page = stdout(&o);
    assert!(page.contains(".TH vmm 1"), "{page}");
    for opt in [
        "\\-\\-kernel",
        "\\-\\-api\\-sock",
        "\\-\\-allow\\-downgrade",
    ] {
        assert!(page.contains(opt), "man page lacks {opt}");
    }
}

#[test]
fn generators_are_not_mixed_with_a_vm() {
    for args in [
        &["--man", "--kernel", "bzImage"][..],
        &["--completions", "bash", "--cpus", "2"][..],
    ] {
        let o = vmm(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
    }
    // Without them, --kernel is still required.
    assert_eq!(vmm(&[]).status.code(), Some(2));
}

#[test]
fn a_patch_that_cannot_be_read_stops_the_vmm_at_start_up() {
    // Checked before the kernel, the socket or KVM: no VM is needed.
    let o = vmm(&[
        "--kernel",
        "/nonexistent/bzImage",
        "--patch",
        "/nonexistent/fix.ko",
    ]);
    assert_eq!(o.status.code(), Some(1), "a bad argument: {o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        ["vmm: error: --patch /nonexistent/fix.ko: cannot read it: No such file or directory (os error 2)"],
        "one line naming the file"
    );
    // --patch is listed with the VM's options.
    let o = vmm(&["--man"]);
    assert!(stdout(&o).contains("\\-\\-patch"), "man page lacks --patch");
}

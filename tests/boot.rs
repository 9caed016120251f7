//! The guest boots to its init with the requested vCPUs and the exact command
//! line, and its own poweroff/reboot end `vmm` with exit code 0.
#![forbid(unsafe_code)]

use harness::run_scenario;

/// Reads the guest's `KLPV-READY cpus=N cmdline=...` line.
fn ready_line(run: &harness::Run) -> (String, String) {
    let lines = run.lines_with("KLPV-READY ");
    assert_eq!(lines.len(), 1, "one READY line\n{}", run.transcript());
    let rest = &lines[0][lines[0].find("KLPV-READY ").unwrap() + "KLPV-READY ".len()..];
    let (cpus, cmdline) = rest.split_once(" cmdline=").expect("cmdline field");
    (
        cpus.trim_start_matches("cpus=").to_string(),
        cmdline.to_string(),
    )
}

#[test]
fn two_vcpus_poweroff() {
    if harness::skip_without_e2e() {
        return;
    }
    let token = format!("t{}", std::process::id());
    let run = run_scenario("boot", &["2", &token, "/bin/true"]);
    let (cpus, cmdline) = ready_line(&run);
    assert_eq!(cpus, "2", "{}", run.transcript());
    assert_eq!(
        cmdline,
        format!("console=ttyS0 reboot=k panic=-1 klpv.token={token} -- /bin/true"),
        "the guest sees exactly the command line given to vmm"
    );
    assert_eq!(
        run.lines_with("KLPV-EXIT rc=0").len(),
        1,
        "{}",
        run.transcript()
    );
    assert_eq!(run.result("boot")["rc"], "0", "poweroff ends vmm with 0");
    assert!(
        !run.lines_with("guest powered off").is_empty(),
        "{}",
        run.transcript()
    );
    assert!(
        !run.lines_with("guest boot marker:").is_empty(),
        "boot timer logged"
    );
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

/// A guest with more RAM than the boot page tables once mapped (1 GiB)
/// boots: the arena tables' `setup_data` blob then sits above 1 GiB, and
/// the kernel's decompressor reads every blob through the loader's
/// identity map before it builds its own. It never printed a line.
#[test]
fn a_guest_with_more_than_a_gib_boots() {
    if harness::skip_without_e2e() {
        return;
    }
    let token = format!("m{}", std::process::id());
    let run = run_scenario("boot", &["2", &token, "--mem", "2048", "/bin/true"]);
    let (cpus, _) = ready_line(&run);
    assert_eq!(cpus, "2", "{}", run.transcript());
    assert_eq!(run.result("boot")["rc"], "0", "{}", run.transcript());
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning\n{}",
        run.transcript()
    );
}

#[test]
fn four_vcpus_reboot() {
    if harness::skip_without_e2e() {
        return;
    }
    let token = format!("r{}", std::process::id());
    // With its log in a file of its own: nothing of it on stderr.
    let run = run_scenario("boot", &["4", &token, "--log-file", "/bin/reboot", "-f"]);
    let (cpus, cmdline) = ready_line(&run);
    assert_eq!(cpus, "4", "{}", run.transcript());
    assert!(cmdline.contains(&format!("klpv.token={token}")));
    assert_eq!(run.result("boot")["rc"], "0", "reboot ends vmm with 0");
    let rebooted = run.lines_with("guest rebooted");
    assert!(!rebooted.is_empty(), "{}", run.transcript());
    assert!(
        rebooted.iter().all(|l| l.contains("KLPV-LOGFILE ")),
        "the log went to its file only\n{}",
        run.transcript()
    );
    assert_eq!(run.result("log-file")["mode"], "600");
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

#[test]
fn panic_and_sigterm_end_with_distinct_codes() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("lifecycle", &[]);
    assert_eq!(
        run.result("lifecycle-panic")["rc"],
        "3",
        "guest panic -> exit 3\n{}",
        run.transcript()
    );
    assert!(
        !run.lines_with("Kernel panic").is_empty(),
        "the guest really panicked"
    );
    assert!(!run.lines_with("guest kernel panicked").is_empty());
    assert_eq!(
        run.result("lifecycle-sigterm")["rc"],
        "143",
        "SIGTERM -> 128+15\n{}",
        run.transcript()
    );
    assert_eq!(run.lines_with("KLPV-READY").len(), 2, "both guests came up");
    assert!(!run.lines_with("stopped by signal 15").is_empty());
}

//! Faults from outside the guest: the VMM killed in the middle of a
//! transition, and a guest that floods its console, with nobody reading
//! it, while transitions run.
#![forbid(unsafe_code)]

use harness::{run_scenario, run_scenario_within};

#[test]
fn a_vmm_killed_mid_transition_leaves_a_clear_error_and_a_reusable_socket() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("fault-kill", &[]);
    let t = run.transcript();
    assert!(run.results("kill").is_empty(), "{t}");
    // The waiting apply learns at once that the VMM is gone: patcher's
    // "unreachable", with the reason, not a hang or an HTTP riddle.
    let apply = run.result("kill-apply");
    assert_eq!(apply["rc"], "3", "{t}");
    let secs: u32 = apply["secs"].parse().expect("secs");
    assert!(secs < 30, "the apply ended {secs} s after the kill\n{t}");
    let said = run.lines_with("KILL-APPLY: ");
    assert!(
        said[0].contains("went away before answering"),
        "{}",
        said[0]
    );
    // SIGKILL: 128 + 9.
    assert_eq!(run.result("kill-vmm")["rc"], "137", "{t}");
    assert_eq!(run.result("kill-stale-socket")["present"], "1", "{t}");
    // A new VMM takes the same path over and serves it.
    let restart = run.result("kill-restart");
    assert_eq!(restart["rc"], "0", "{t}");
    assert_eq!(restart["listed"], "0", "a fresh guest has no patch\n{t}");
    assert_eq!(run.result("kill-restart-exit")["rc"], "0", "{t}");
}

#[test]
fn a_console_flood_with_no_reader_never_stalls_a_transition() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario_within("fault-flood", &["100"], 1500);
    let t = run.transcript();
    let tr = run.result("flood-transitions");
    assert_eq!(tr["failed"], "0", "{t}");
    assert_eq!(tr["ok"], "100", "{t}");
    let guest = run.result("flood-guest");
    assert_eq!(
        guest["answered"], "100",
        "the guest answered after each\n{t}"
    );
    assert_eq!(guest["patched"], "50", "{t}");
    assert_eq!(guest["plain"], "50", "{t}");
    // The guest wrote far more than the VMM's 4 KiB buffer and the
    // FIFO's 64 KiB hold before the first transition, and went on.
    let filled: u64 = run.result("flood-filled")["lines"].parse().expect("lines");
    assert!(filled >= 1138, "flooded 100 KiB first\n{t}");
    let end = run.lines_with("KLPV-RESULT flood-end");
    let total: u64 = end[0]
        .split("lines=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .expect("line count");
    assert!(total > filled, "{t}");
    // Nobody read stdout: the console buffer filled, and the VMM dropped
    // bytes rather than block a vCPU.
    assert!(
        run.lines_with("console output was dropped while stdout was slow")
            .iter()
            .any(|l| l.contains("dropped_bytes=")),
        "{t}"
    );
    assert_eq!(run.result("flood-exit")["rc"], "0", "{t}");
    eprintln!("flood: pauses {tr:?}");
}

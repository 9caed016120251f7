//! Pausing and resuming a running guest hundreds of times leaves it working:
//! its console keeps printing and a computation finishes with the right result.
#![forbid(unsafe_code)]

use harness::run_scenario;

#[test]
fn many_pause_resume_cycles_while_guest_computes() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("pause", &["2", "400000"]);
    let r = run.result("pause");
    let cycles: u32 = r["cycles"].parse().unwrap();
    assert!(
        cycles >= 200,
        "only {cycles} pause/resume cycles after boot\n{}",
        run.transcript()
    );
    assert_eq!(
        r["bad_snapshots"], "0",
        "every paused vCPU's registers were readable"
    );
    assert_eq!(r["exit"], "PowerOff", "{}", run.transcript());
    let progress = run.lines_with("COUNTER progress=");
    assert_eq!(
        progress.len(),
        10,
        "console output continued\n{}",
        run.transcript()
    );
    let done = run.lines_with("COUNTER done");
    assert_eq!(done.len(), 1, "{}", run.transcript());
    assert!(
        done[0].contains("n=400000") && done[0].contains("ok=1"),
        "{}",
        done[0]
    );
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

//! The control socket under load and abuse: 16 concurrent clients, every
//! class of bad input, a foreign uid, while the guest runs checked
//! computations; the VMM keeps serving and the guest is untouched.
#![forbid(unsafe_code)]

use harness::run_scenario;

#[test]
fn socket_survives_concurrency_bad_input_and_foreign_users() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("api", &[]);
    let t = run.transcript();
    assert_eq!(run.result("api-check")["rc"], "0", "{t}");

    let sock = run.result("api-socket");
    assert_eq!(sock["mode"], "600", "socket mode");
    assert_eq!(sock["owner_is_vmm_user"], "1");
    let peer = run.result("api-peer");
    assert_eq!(
        peer["mode_refused"], "1",
        "uid 65534 cannot open a 0600 socket\n{t}"
    );
    assert_eq!(
        peer["cred_refused"], "1",
        "SO_PEERCRED refuses uid 65534\n{t}"
    );

    let sc = run.result("api-seccomp");
    assert_eq!(sc["unfiltered"], "0", "every VMM thread is filtered\n{t}");
    assert!(
        sc["threads"].parse::<u32>().expect("threads") >= 5,
        "main, console, vCPUs, API: {sc:?}"
    );

    let c = run.result("api-concurrency");
    assert_eq!(c["failed"], "0", "{t}");
    assert_eq!(c["ok"], "320");

    let want = [
        ("malformed-json", "400"),
        ("bad-json-value", "422"),
        ("unknown-route", "404"),
        ("wrong-method", "405"),
        ("bad-query", "400"),
        ("bad-rollback-target", "400"),
        ("oversized-read", "400"),
        ("no-such-vcpu", "404"),
        ("oversized-body", "413"),
        ("oversized-patch", "413"),
        ("not-http", "400"),
        ("slow-headers", "408"),
        ("slow-body", "408"),
        ("too-many-connections", "503"),
    ];
    let bad = run.results("api-bad");
    for (class, status) in want {
        let r = bad
            .iter()
            .find(|r| r["class"] == class)
            .unwrap_or_else(|| panic!("no result for {class}\n{t}"));
        assert_eq!(r["status"], status, "{class}\n{t}");
        assert_eq!(r["json_error"], "1", "{class}: JSON error body\n{t}");
    }
    let slow = bad.iter().find(|r| r["class"] == "slow-headers").unwrap();
    assert_eq!(slow["others_served"], "1", "a stalled client blocks nobody");

    assert_eq!(run.result("api-vanished")["alive_after"], "1");
    let after = run.result("api-after");
    assert_eq!(after["recovered"], "1");
    assert_eq!(after["state"], "running");
    assert_eq!(after["text_unchanged"], "1", "kernel text untouched");
    assert_eq!(
        run.result("api-curl")["ok"],
        "1",
        "curl --unix-socket works"
    );

    // The guest computed correctly throughout and shut down on request.
    assert!(run.lines_with("KLPV-ROUNDS failed").is_empty(), "{t}");
    let done = run.lines_with("KLPV-ROUNDS done");
    assert_eq!(done.len(), 1, "{t}");
    assert_eq!(run.result("api-exit")["rc"], "0");
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

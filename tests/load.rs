//! A VM you would run real work in, patched under load: our VMM boots the
//! Debian root file system (systemd, nginx) from a virtio-blk disk with a
//! virtio-net NIC on a tap, klpvisor-loadgen sends HTTP requests from the
//! host side, and 100 transitions (apply, replace, rollback, enable,
//! disable of a 10-function cumulative patch) run while it does. Not one
//! request may fail (tests/scenarios/patch-load).
#![forbid(unsafe_code)]

use harness::Run;

/// loadgen's result line after `tag`, decoded.
fn load(run: &Run, tag: &str) -> serde_json::Value {
    let lines = run.lines_with(tag);
    let line = lines
        .first()
        .unwrap_or_else(|| panic!("no {tag} line\n{}", run.transcript()));
    let json = line
        .split_once(&format!("{tag} "))
        .map(|(_, j)| j)
        .unwrap_or_else(|| panic!("{tag}: no JSON in {line}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{tag}: {e}: {json}"))
}

#[test]
fn a_debian_vm_serving_http_is_patched_under_load_without_a_failed_request() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = harness::run_scenario_with_rootfs("patch-load", &["100", "15"], 900);
    let t = run.transcript();
    let r = run.result("patch-load");
    assert_eq!(r["multiuser"], "1", "the Debian VM reached multi-user\n{t}");
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains("KLPV-ROOTFS ok dev=/dev/vda")),
        "{t}"
    );
    assert_eq!(r["failed"], "0", "every transition committed\n{t}");
    assert_eq!(r["transitions"], "100", "{t}");
    for tag in ["KLPV-LOAD-WARMUP", "KLPV-LOAD-IDLE", "KLPV-LOAD-PATCHING"] {
        let v = load(&run, tag);
        assert_eq!(v["failed"], 0, "{tag}: {v}\n{t}");
        assert!(v["ok"].as_u64().is_some_and(|n| n > 0), "{tag}: {v}\n{t}");
    }
    assert_eq!(r["rc"], "0", "{t}");
}

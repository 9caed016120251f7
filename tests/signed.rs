//! Signed patches, end to end: the signature matrix through the
//! real control socket with `patcher`, with and without `vmm --trusted-keys`
//! (scenario `patch-signed`, one L1 boot, two guest boots).
#![forbid(unsafe_code)]

use harness::{run_scenario, Run};
use klpvisor_api::{PatchState, PatchesReply, VmInfo};

fn patches(run: &Run, step: &str) -> PatchesReply {
    run.json("KLPV-JSON-PATCHES", step)
}

/// The stderr a step printed after `TAG CLASS: `.
fn message(run: &Run, tag: &str, class: &str) -> String {
    let prefix = format!("{tag} {class}: ");
    run.lines
        .iter()
        .find_map(|l| l.split_once(&prefix).map(|(_, m)| m.to_owned()))
        .unwrap_or_else(|| panic!("no {tag} {class}\n{}", run.transcript()))
}

#[test]
fn only_validly_signed_patches_apply_with_trusted_keys() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-signed", &[]);
    let t = run.transcript();
    let keys = run.result("signed-keys");
    let (ops, rogue) = (keys["ops"].clone(), keys["rogue"].clone());
    assert_eq!(ops.len(), 16, "a key id is 16 hex digits\n{t}");
    assert_ne!(ops, rogue);
    assert_eq!(run.result("signed-sign")["rc"], "0", "{t}");

    // 1. --trusted-keys: the status says so and names the key.
    let vm: VmInfo = run.json("KLPV-JSON-VM", "enforced");
    assert!(vm.signatures.enforced, "{vm:?}");
    assert_eq!(vm.signatures.trusted_keys.len(), 1);
    assert_eq!(vm.signatures.trusted_keys[0].key_id, ops);
    assert_eq!(vm.signatures.trusted_keys[0].file, "ops.pub");
    let status = run.lines_with("KLPV-STATUS enforced ");
    assert!(
        status[0].contains("signed only") && status[0].contains(&ops),
        "{}",
        status[0]
    );

    // Every bad case refused with 403 (422 for an unreadable trailer) and
    // a message naming its problem.
    let want: [(&str, &[&str]); 6] = [
        ("unsigned", &["patch is not signed", "HTTP 403"]),
        (
            "untrusted-key",
            &[&rogue, &ops, "not among the trusted keys", "HTTP 403"],
        ),
        ("tampered-module", &["does not verify", &ops, "HTTP 403"]),
        ("tampered-signature", &["does not verify", "HTTP 403"]),
        ("truncated", &["signature"]),
        ("kernel-signed", &["kernel's module signature", "HTTP 403"]),
    ];
    let results = run.results("signed");
    for (class, needles) in want {
        let r = results
            .iter()
            .find(|r| r["class"] == class)
            .unwrap_or_else(|| panic!("no result for {class}\n{t}"));
        assert_eq!(r["rc"], "1", "{class} refused\n{t}");
        let msg = message(&run, "SIGNED", class);
        for n in needles {
            assert!(msg.contains(n), "{class}: `{n}` not in: {msg}");
        }
    }
    let hashes = run.results("guest-hash");
    assert_eq!(hashes.len(), 4, "{t}");
    assert_eq!(hashes[0], hashes[1], "kernel text and arena untouched");
    assert!(
        patches(&run, "refused").patches.is_empty(),
        "nothing loaded"
    );

    // The validly signed module applies, says by whom, and works.
    assert_eq!(run.result("signed-apply")["rc"], "0", "{t}");
    let on = patches(&run, "verified");
    assert_eq!(on.patches.len(), 1);
    assert_eq!(on.patches[0].state, PatchState::Enabled);
    assert_eq!(
        on.patches[0].signature,
        format!("verified: {ops} (ops.pub), level 2")
    );
    let listed = run.lines_with("KLPV-LIST verified ");
    assert!(listed[0].contains(&format!("signature: verified: {ops}")));
    assert_eq!(run.cmdline(2), "this has been live patched");

    // Anti-rollback: a patch signed by the same trusted key at a lower
    // level than one applied is refused, naming both levels, and nothing
    // is written.
    let r = results
        .iter()
        .find(|r| r["class"] == "downgrade")
        .unwrap_or_else(|| panic!("no downgrade result\n{t}"));
    assert_eq!(r["rc"], "1", "downgrade refused\n{t}");
    let msg = message(&run, "SIGNED", "downgrade");
    for n in [
        "hot_getppid` is signed at level 1, lower than level 2 already applied",
        "livepatch_sample",
        "--allow-downgrade",
        "HTTP 409",
    ] {
        assert!(msg.contains(n), "downgrade: `{n}` not in: {msg}");
    }
    assert_eq!(hashes[2], hashes[3], "the refused downgrade wrote nothing");
    let vm: VmInfo = run.json("KLPV-JSON-VM", "levels");
    assert_eq!(vm.signatures.highest_level, Some(2), "{vm:?}");
    assert_eq!(run.result("signed-enforced-exit")["rc"], "0", "{t}");

    // 2. Start-up errors, before any guest.
    let startup = run.results("signed-startup");
    assert_eq!(startup.len(), 2, "{t}");
    for r in &startup {
        assert_eq!(r["rc"], "1", "{r:?}\n{t}");
    }
    let empty = message(&run, "SIGNED-STARTUP", "empty");
    assert!(empty.contains("holds no *.pub file"), "{empty}");
    let bad = message(&run, "SIGNED-STARTUP", "bad-file");
    assert!(
        bad.contains("broken.pub") && bad.contains("not a klpvisor public key"),
        "{bad}"
    );

    // 3. No --trusted-keys: everything applies, and says how it was taken.
    let vm: VmInfo = run.json("KLPV-JSON-VM", "open");
    assert!(!vm.signatures.enforced && vm.signatures.trusted_keys.is_empty());
    let status = run.lines_with("KLPV-STATUS open ");
    assert!(status[0].contains("unsigned accepted"), "{}", status[0]);
    for (class, signature) in [
        ("unsigned", "unsigned".to_owned()),
        (
            "untrusted-key",
            format!("not verified: signed by {rogue} at level 0, no --trusted-keys"),
        ),
        (
            "kernel-signed",
            "unsigned; kernel module signature stripped, not verified".to_owned(),
        ),
    ] {
        let r = run
            .results("signed-open")
            .into_iter()
            .find(|r| r["class"] == class)
            .unwrap_or_else(|| panic!("no result for {class}\n{t}"));
        assert_eq!(r["rc"], "0", "{class} accepted without --trusted-keys\n{t}");
        let p = patches(&run, &format!("open-{class}"));
        assert_eq!(p.patches.len(), 1, "{class}");
        assert_eq!(p.patches[0].state, PatchState::Enabled, "{class}");
        assert_eq!(p.patches[0].signature, signature, "{class}");
    }
    assert_eq!(run.result("signed-open-exit")["rc"], "0", "{t}");
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(dmesg.len(), 2, "{t}");
    assert!(dmesg.iter().all(|d| d.ends_with("warnings=0")), "{dmesg:?}");
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

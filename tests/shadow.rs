//! Shadow variables and system states, end to end: patches built
//! by kbuild call the guest kernel's own klp_shadow_* functions, and klp's
//! state-compatibility rule is enforced from outside.
#![forbid(unsafe_code)]

use harness::{run_scenario, Run};
use klpvisor_api::{PatchState, PatchesReply};

/// The line `KLPV-REFUSED <what> rc=... <message>`, after the tag.
fn refused(run: &Run, what: &str) -> String {
    let tag = format!("KLPV-REFUSED {what} ");
    run.lines
        .iter()
        .find_map(|l| l.split_once(&tag).map(|(_, m)| m.to_owned()))
        .unwrap_or_else(|| panic!("no refusal {what}\n{}", run.transcript()))
}

#[test]
fn a_shadow_variable_outlives_a_replace_and_states_are_enforced() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-shadow", &[]);
    let t = run.transcript();
    for step in [
        "shadow-v1",
        "shadow-v2",
        "shadow-disable",
        "patch-shadow-exit",
    ] {
        assert_eq!(run.result(step)["rc"], "0", "{step}\n{t}");
    }
    let original = run.cmdline(1);
    assert!(original.contains("console=ttyS0"), "{original}");
    // v1 allocates the shadow variable and counts; v2 finds it and goes on.
    assert_eq!(run.cmdline(2), "klpv-shadow v1 count=1", "{t}");
    assert_eq!(run.cmdline(3), "klpv-shadow v1 count=2", "{t}");
    assert_eq!(run.cmdline(4), "klpv-shadow v2 count=3", "{t}");
    // The refused downgrade changed nothing the guest can see.
    assert_eq!(run.cmdline(5), "klpv-shadow v2 count=4", "{t}");
    assert_eq!(run.cmdline(6), original, "disable restores the original");

    // klp's rule, with reasons a user can act on.
    let no_state = refused(&run, "no-state");
    assert!(no_state.starts_with("rc=1 "), "refused: exit 1\n{no_state}");
    assert!(
        no_state.contains("does not carry system state 7 (version 1)"),
        "{no_state}"
    );
    let downgrade = refused(&run, "downgrade");
    assert!(
        downgrade.starts_with("rc=1 "),
        "refused: exit 1\n{downgrade}"
    );
    assert!(downgrade.contains("older than"), "{downgrade}");
    // ... and wrote nothing: kernel text and arena hashed around each.
    let hashes = run.results("guest-hash");
    assert_eq!(hashes.len(), 4, "{t}");
    assert_eq!(hashes[0], hashes[1], "refused apply wrote nothing");
    assert_eq!(hashes[2], hashes[3], "refused enable wrote nothing");

    let list: PatchesReply = run.json("KLPV-JSON-PATCHES", "v2");
    let state = |name: &str| {
        list.patches
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no {name} in {list:?}"))
            .state
    };
    assert_eq!(state("shadow_v2"), PatchState::Enabled);
    assert_eq!(state("shadow_v1"), PatchState::Replaced);
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains("KLPV-DMESG warnings=0")),
        "{t}"
    );
}

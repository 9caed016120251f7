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

/// The lines step `n` of patch-state shows under `tag` (`KLPV-<tag> <n> ...`).
fn shown(run: &Run, tag: &str, n: u32) -> Vec<String> {
    let tag = format!("KLPV-{tag} {n} ");
    run.lines
        .iter()
        .filter_map(|l| l.split_once(&tag).map(|(_, c)| c.trim().to_owned()))
        .collect()
}

#[test]
fn klp_get_prev_state_answers_in_callbacks_as_in_klp() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-state", &[]);
    let t = run.transcript();
    for step in [
        "state-v1",
        "state-v2",
        "state-v3",
        "state-disable",
        "patch-state-exit",
    ] {
        assert_eq!(run.result(step)["rc"], "0", "{step}\n{t}");
    }
    // The console loglevel: the first of /proc/sys/kernel/printk's fields.
    let level = |n: u32| {
        let fields = shown(&run, "LOGLEVEL", n).concat();
        fields.split(' ').next().unwrap_or_default().to_owned()
    };
    let log = |n: u32| shown(&run, "STATE", n);
    let original = level(1);
    assert!(
        original.parse::<u32>().is_ok_and(|l| l < 15),
        "{original}\n{t}"
    );
    let cmdline = run.cmdline(1);
    assert_eq!(log(1), Vec::<String>::new(), "{t}");
    let keeps = |v: u32, version: u32| {
        format!("klpv_state_v{v}: state 1 version {version} keeps console_loglevel {original}")
    };
    // The patch's own lines, then klp's notice in the guest's kernel log.
    let lines = |v: u32, l: &[&str], done: &str| -> Vec<String> {
        l.iter()
            .map(|s| format!("klpv_state_v{v}: {s}"))
            .chain([format!("livepatch: 'klpv_state_v{v}': {done} complete")])
            .collect()
    };

    // v1 allocates the state's data, keeps the original level in it and
    // raises the level (CONSOLE_LOGLEVEL_MOTORMOUTH); its patched
    // cmdline_proc_show reads the state with klp_get_state().
    assert_eq!(
        log(2),
        lines(
            1,
            &[
                "pre_patch_callback: vmlinux",
                "allocate_loglevel_state: allocating space to store console_loglevel",
                "post_patch_callback: vmlinux",
                "fix_console_loglevel: fixing console_loglevel",
            ],
            "patching"
        ),
        "{t}"
    );
    assert_eq!(level(2), "15", "{t}");
    assert_eq!(run.cmdline(2), keeps(1, 1), "{t}");
    // v2 and v3 find the state of the patch before them with
    // klp_get_prev_state() and take its data over: nothing is allocated,
    // and the original level is still known.
    for (n, v) in [(3, 2), (4, 3)] {
        assert_eq!(
            log(n),
            lines(
                v,
                &[
                    "pre_patch_callback: vmlinux",
                    "allocate_loglevel_state: space to store console_loglevel already allocated",
                    "post_patch_callback: vmlinux",
                    "fix_console_loglevel: taking over the console_loglevel change",
                ],
                "patching"
            ),
            "step {n}\n{t}"
        );
        assert_eq!(level(n), "15", "{t}");
        assert_eq!(run.cmdline(n), keeps(v, 2), "{t}");
    }
    // v1 back over v3 would downgrade the state: refused, nothing written.
    let downgrade = refused(&run, "downgrade");
    assert!(downgrade.starts_with("rc=1 "), "{downgrade}");
    assert!(downgrade.contains("older than"), "{downgrade}");
    let hashes = run.results("guest-hash");
    assert_eq!(hashes.len(), 2, "{t}");
    assert_eq!(hashes[0], hashes[1], "the refused enable wrote nothing");
    assert_eq!(log(5), Vec::<String>::new(), "{t}");
    assert_eq!(run.cmdline(5), keeps(3, 2), "{t}");
    // Disabling v3: no patch before it has the state (v1 and v2 were
    // replaced), so it restores the original level and frees the data.
    assert_eq!(
        log(6),
        lines(
            3,
            &[
                "pre_unpatch_callback: vmlinux",
                "restore_console_loglevel: restoring console_loglevel",
                "post_unpatch_callback: vmlinux",
                "free_loglevel_state: freeing space for the stored console_loglevel",
            ],
            "unpatching"
        ),
        "{t}"
    );
    assert_eq!(level(6), original, "{t}");
    assert_eq!(run.cmdline(6), cmdline, "{t}");
    // klp_get_prev_state() warns when it is called outside a transition.
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains("KLPV-DMESG warnings=0")),
        "{t}"
    );
    let list: PatchesReply = run.json("KLPV-JSON-PATCHES", "end");
    let state = |name: &str| {
        list.patches
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.state)
    };
    assert_eq!(
        state("klpv_state_v1"),
        Some(PatchState::Replaced),
        "{list:?}"
    );
    assert_eq!(
        state("klpv_state_v2"),
        Some(PatchState::Replaced),
        "{list:?}"
    );
    assert_eq!(
        state("klpv_state_v3"),
        Some(PatchState::Disabled),
        "{list:?}"
    );
}

//! klp callbacks, end to end: patches built by kbuild log each
//! of their callbacks, with whether their function is live at that
//! moment, and the VMM runs them in the guest kernel through its call
//! gate around apply, replace, disable, a refused pre_patch and rollbacks.
#![forbid(unsafe_code)]

use harness::{run_scenario, Run};
use klpvisor_api::{PatchState, PatchesReply};

/// The callback log lines the guest saw appear during step `n`.
fn log(run: &Run, n: u32) -> Vec<String> {
    let tag = format!("KLPV-CB {n} klpv-cb ");
    run.lines
        .iter()
        .filter_map(|l| l.split_once(&tag).map(|(_, c)| c.trim().to_owned()))
        .collect()
}

fn name(run: &Run, n: u32) -> String {
    let tag = format!("KLPV-NAME {n} ");
    run.lines
        .iter()
        .find_map(|l| l.split_once(&tag).map(|(_, c)| c.trim().to_owned()))
        .unwrap_or_else(|| panic!("no Name: line #{n}\n{}", run.transcript()))
}

#[test]
fn callbacks_run_in_the_guest_in_klps_order() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-callbacks", &[]);
    let t = run.transcript();
    for step in ["cb-v1", "cb-v2", "cb-disable", "cb-undo", "cb-back"] {
        assert_eq!(run.result(step)["rc"], "0", "{step}\n{t}");
    }
    assert_eq!(run.result("patch-callbacks-exit")["rc"], "0", "{t}");
    let cb = |tag: &str, what: &str, live: u8| format!("{tag} {what} obj=vmlinux live={live}");

    // Nothing before the first patch.
    assert_eq!(log(&run, 1), Vec::<String>::new(), "{t}");
    assert_eq!(name(&run, 1), "Name: grep", "{t}");
    // Apply: pre_patch before the entry is redirected, post_patch after.
    assert_eq!(
        log(&run, 2),
        [cb("v1", "pre_patch", 0), cb("v1", "post_patch", 1)],
        "{t}"
    );
    assert_eq!(name(&run, 2), "Name: grep+cb1", "{t}");
    // Replace: only the new patch's callbacks; v1's unpatch ones do not run.
    assert_eq!(
        log(&run, 3),
        [cb("v2", "pre_patch", 0), cb("v2", "post_patch", 1)],
        "{t}"
    );
    assert_eq!(name(&run, 3), "Name: grep+cb2", "{t}");
    // Disable: the unpatch pair, around the entry going back.
    assert_eq!(
        log(&run, 4),
        [cb("v2", "pre_unpatch", 1), cb("v2", "post_unpatch", 0)],
        "{t}"
    );
    assert_eq!(name(&run, 4), "Name: grep", "{t}");
    // A refused pre_patch: nothing else of it ran, nothing is redirected,
    // the error says why, and kernel text + arena are as before.
    assert_eq!(log(&run, 5), [cb("fail", "pre_patch", 0)], "{t}");
    assert_eq!(name(&run, 5), "Name: grep", "{t}");
    let refused = run
        .lines
        .iter()
        .find_map(|l| {
            l.split_once("KLPV-REFUSED pre-patch ")
                .map(|(_, m)| m.to_owned())
        })
        .unwrap_or_else(|| panic!("no refusal\n{t}"));
    assert!(refused.starts_with("rc=1 "), "refused: exit 1\n{refused}");
    assert!(
        refused.contains("callbacks_fail: pre_patch returned -16 (-EBUSY)"),
        "{refused}"
    );
    let hashes = run.results("guest-hash");
    assert_eq!(hashes.len(), 2, "{t}");
    assert_eq!(hashes[0], hashes[1], "the refused patch left nothing");
    // Rollback of the disable: v2 enabled again, as an enable runs it.
    assert_eq!(
        log(&run, 6),
        [cb("v2", "pre_patch", 0), cb("v2", "post_patch", 1)],
        "{t}"
    );
    assert_eq!(name(&run, 6), "Name: grep+cb2", "{t}");
    // Rollback to before v2: v2 disabled and v1 (non-replace) enabled,
    // in one transition: unpatch-pre, patch-pre, switch, patch-post,
    // unpatch-post.
    assert_eq!(
        log(&run, 7),
        [
            cb("v2", "pre_unpatch", 1),
            cb("v1", "pre_patch", 0),
            cb("v1", "post_patch", 1),
            cb("v2", "post_unpatch", 0),
        ],
        "{t}"
    );
    assert_eq!(name(&run, 7), "Name: grep+cb1", "{t}");

    // A callback that does not finish in time: the transition gives up
    // with an error that says how far it got, nothing is redirected, and
    // the gate refuses other callbacks until that one has finished; then
    // the next transition runs its callbacks as usual.
    let refusal = |what: &str| {
        run.lines
            .iter()
            .find_map(|l| {
                l.split_once(&format!("KLPV-REFUSED {what} "))
                    .map(|(_, m)| m.to_owned())
            })
            .unwrap_or_else(|| panic!("no {what} refusal\n{t}"))
    };
    let slow = refusal("slow");
    assert!(
        slow.starts_with("rc=7 "),
        "a callback that did not finish: failed: exit 7\n{slow}"
    );
    assert!(
        slow.contains("callbacks_slow: pre_patch did not finish within")
            && slow.contains("the callback started and has not returned"),
        "{slow}"
    );
    let busy = refusal("gate-busy");
    assert!(busy.starts_with("rc=5 "), "busy: exit 5\n{busy}");
    assert!(
        busy.contains("an earlier callback is still in the guest"),
        "{busy}"
    );
    let tries: u32 = run.result("cb-after-slow")["tries"].parse().unwrap();
    assert!(tries < 2000, "the gate never freed up\n{t}");
    let mut after = log(&run, 8);
    after.extend(log(&run, 9));
    assert_eq!(
        after,
        [
            cb("slow", "pre_patch", 0),
            "slow pre_patch done".to_string(),
            cb("v1", "pre_unpatch", 1),
            cb("v1", "post_unpatch", 0),
        ],
        "{t}"
    );
    assert_eq!(
        name(&run, 8),
        "Name: grep+cb1",
        "the slow patch never went live"
    );
    assert_eq!(name(&run, 9), "Name: grep", "{t}");
    let last: PatchesReply = run.json("KLPV-JSON-PATCHES", "final");
    assert!(
        last.patches.iter().all(|p| p.name != "callbacks_slow"),
        "an abandoned patch is not kept: {last:?}"
    );

    let list: PatchesReply = run.json("KLPV-JSON-PATCHES", "end");
    let state = |name: &str| {
        list.patches
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.state)
    };
    assert_eq!(state("callbacks_v1"), Some(PatchState::Enabled), "{list:?}");
    assert_eq!(
        state("callbacks_v2"),
        Some(PatchState::Disabled),
        "{list:?}"
    );
    assert_eq!(state("callbacks_fail"), None, "a refused patch is not kept");
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains("KLPV-DMESG warnings=0")),
        "{t}"
    );
}

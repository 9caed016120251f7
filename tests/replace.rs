//! Cumulative patches: atomic replace, downgrade, the pin a forced
//! replace leaves, and 1000 transitions under guest load (klpv-v1/v2, see
//! guest-images/patches/klpv-v1.c).
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};

use harness::{run_scenario, Run};
use klpvisor_api::{PatchState, PatchesReply, Pin};

fn patches(run: &Run, step: &str) -> PatchesReply {
    run.json("KLPV-JSON-PATCHES", step)
}

/// What the guest saw after `step`: f, g, h (from f's block) and the
/// direct g and h lines.
fn seen(run: &Run, step: &str) -> String {
    let tag = format!("KLPV-SEEN {step} ");
    run.lines
        .iter()
        .find_map(|l| l.split_once(&tag).map(|(_, s)| s.trim().to_owned()))
        .unwrap_or_else(|| panic!("nothing seen at {step}\n{}", run.transcript()))
}

fn states(p: &PatchesReply) -> HashMap<String, PatchState> {
    p.patches
        .iter()
        .map(|p| (p.name.clone(), p.state))
        .collect()
}

/// Live redirections as (function, patch).
fn live(p: &PatchesReply) -> BTreeSet<(String, String)> {
    p.live
        .iter()
        .map(|l| (l.name.clone(), l.patch.clone()))
        .collect()
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn cumulative_replace_downgrade_and_a_thousand_transitions_under_load() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-replace", &["1000"]);
    let t = run.transcript();
    for step in ["v1", "v2", "remove-v1", "down", "up", "forced", "reset"] {
        assert_eq!(
            run.result(&format!("step-{step}"))["rc"],
            "0",
            "{step}\n{t}"
        );
    }

    // v1 (non-replace) patches f and g.
    assert_eq!(
        seen(&run, "orig"),
        "f=orig g=- h=- direct-g=orig direct-h=orig"
    );
    assert_eq!(
        seen(&run, "v1"),
        "f=v1 g=g1 h=orig direct-g=g1 direct-h=orig"
    );
    let v1 = patches(&run, "v1");
    assert_eq!(
        live(&v1),
        set(&[("task_mem", "klpv_v1"), ("proc_task_name", "klpv_v1")])
    );

    // v2 (replace): exactly f and h redirected, g the kernel's again, v1
    // replaced; the guest sees all three change together.
    assert_eq!(
        seen(&run, "v2"),
        "f=v2 g=orig h=h2 direct-g=orig direct-h=h2"
    );
    let v2 = patches(&run, "v2");
    assert_eq!(
        live(&v2),
        set(&[
            ("task_mem", "klpv_v2"),
            ("cpuset_task_status_allowed", "klpv_v2")
        ])
    );
    let s = states(&v2);
    assert_eq!(s["klpv_v1"], PatchState::Replaced);
    assert_eq!(s["klpv_v2"], PatchState::Enabled);
    assert!(v2.patches.iter().all(|p| !p.forced));
    // The replaced v1 is removable, and its code is freed (no stack
    // references it).
    let removed = patches(&run, "v1-removed");
    assert!(removed.patches.iter().all(|p| p.name != "klpv_v1"));
    assert!(removed.retired.is_empty(), "{:?}", removed.retired);

    // Kernel text: after v2, identical to the original outside f's and h's
    // sites and the two calls in ftrace's entry code that ftrace points at
    // its ops' handlers (so g's entry is byte-identical); at the end, every
    // ops unregistered as klp does, identical whole.
    let hashes = run.results("text-hash");
    assert_eq!(hashes.len(), 4, "{t}");
    assert_eq!(hashes[0]["masked_sites"], "0");
    assert_eq!(hashes[1]["masked_sites"], "4");
    assert_eq!(hashes[2]["masked_sites"], "0");
    assert_eq!(hashes[3]["sites"], hashes[1]["sites"]);
    assert_eq!(hashes[0]["fnv"], hashes[2]["fnv"], "text after all off");
    assert_eq!(hashes[1]["fnv"], hashes[3]["fnv"], "text outside f, h");

    // Downgrade to the cumulative v1 and back.
    assert_eq!(
        seen(&run, "down"),
        "f=v1 g=g1 h=orig direct-g=g1 direct-h=orig"
    );
    let down = patches(&run, "down");
    assert_eq!(
        live(&down),
        set(&[("task_mem", "klpv_v1r"), ("proc_task_name", "klpv_v1r")])
    );
    assert_eq!(states(&down)["klpv_v2"], PatchState::Replaced);
    assert_eq!(
        seen(&run, "up"),
        "f=v2 g=orig h=h2 direct-g=orig direct-h=h2"
    );
    assert_eq!(
        states(&patches(&run, "up"))["klpv_v1r"],
        PatchState::Replaced
    );

    // 1000 transitions v1 -> v2 -> none under the watchers.
    let stress = run.result("stress");
    assert_eq!(stress["ok"], "1000", "{t}");
    let warm: u64 = stress["heap_warm"].parse().unwrap();
    let end: u64 = stress["heap_end"].parse().unwrap();
    assert!(
        end <= warm + 256 * 1024,
        "VMM heap grew from {warm} to {end} bytes over the stress"
    );
    // Rollback: v1 alone <-> v2 over v1, 100 times each way, exact.
    let v1_seen = "f=v1 g=g1 h=orig direct-g=g1 direct-h=orig";
    let v2_seen = seen(&run, "v2");
    assert_eq!(seen(&run, "before-rollback"), v1_seen);
    let rb = run.result("rollback");
    assert_eq!(
        (
            rb["loops"].as_str(),
            rb["rollbacks"].as_str(),
            rb["mismatches"].as_str()
        ),
        ("100", "200", "0"),
        "{t}"
    );
    assert_eq!(rb["sites"], "3", "f, g and h");
    assert_eq!(seen(&run, "rolled"), v2_seen);
    assert_eq!(run.result("step-rollback")["rc"], "0");
    assert_eq!(seen(&run, "rolled-back"), v1_seen, "undoing the replace");
    // The history's newest entry is that rollback, from v2 over v1.
    let last = run.lines_with("KLPV-HISTORY ");
    assert_eq!(last.len(), 1, "{t}");
    assert!(
        last[0].contains(": rollback #")
            && last[0].ends_with("before it: klpv_v1 replaced, klpv_v2 enabled"),
        "{}",
        last[0]
    );
    // A patch replaced by a forced transition stays pinned, as klp keeps
    // it: it cannot come back or be removed, and the list says why.
    assert_eq!(run.result("step-refused")["rc"], "1", "{t}");
    let refused = run.lines_with("REFUSED: ");
    assert!(
        refused.len() == 1 && refused[0].contains("forced transition"),
        "{refused:?}"
    );
    assert_eq!(run.result("step-pinned-remove")["rc"], "1", "{t}");
    let refused = run.lines_with("PINNED-REMOVE: ");
    assert!(
        refused.len() == 1 && refused[0].contains("cannot be removed"),
        "{refused:?}"
    );
    let pinned = run.lines_with("KLPV-PINNED ");
    assert!(
        pinned.len() == 1 && pinned[0].contains("enabled `klpv_v1r` replaced it"),
        "{pinned:?}"
    );
    let forced = patches(&run, "forced");
    let v1r = forced
        .patches
        .iter()
        .find(|p| p.name == "klpv_v1r")
        .unwrap();
    assert!(v1r.forced && v1r.state == PatchState::Enabled && v1r.pinned.is_none());
    let v2 = forced.patches.iter().find(|p| p.name == "klpv_v2").unwrap();
    assert_eq!(
        v2.pinned,
        Some(Pin::ForcedReplace {
            by: Some("klpv_v1r".into())
        })
    );
    assert_eq!(
        seen(&run, "forced"),
        "f=v1 g=g1 h=orig direct-g=g1 direct-h=orig"
    );
    assert_eq!(
        seen(&run, "off"),
        "f=orig g=- h=- direct-g=orig direct-h=orig"
    );
    assert!(patches(&run, "off").live.is_empty());

    // Every watcher read consistent levels only, and saw all three.
    let obs = run.lines_with("KLPV-OBS pid=");
    assert_eq!(obs.len(), 2, "one watcher per vCPU\n{t}");
    for line in obs {
        let kv: HashMap<&str, u64> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        assert_eq!(kv["bad"], 0, "{line}\n{t}");
        for level in ["orig", "v1", "v2"] {
            assert!(kv[level] > 0, "watcher never saw {level}: {line}");
        }
    }
    assert!(run.lines_with("KLPV-OBS-BAD").is_empty(), "{t}");
    assert_eq!(run.lines_with("KLPV-OBS-EXIT rc=0").len(), 2, "{t}");
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert!(
        dmesg.len() == 1 && dmesg[0].ends_with("warnings=0"),
        "{dmesg:?}"
    );
    assert!(run.lines_with("Call Trace").is_empty());
    assert_eq!(run.result("replace-exit")["rc"], "0");
}

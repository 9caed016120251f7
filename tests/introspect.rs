//! Introspection through the control socket equals the guest's own view:
//! its kallsyms (every vmlinux line, by digest), its kernel release and
//! build, and its thread list, on two boots with different KASLR slides.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use harness::{fields, run_scenario, Run};
use klpvisor_api::{TaskEntry, TasksReply, VmInfo};

/// The JSON after `KLPV-JSON-<kind> boot=<n> ` for each boot.
fn json_lines<T: serde::de::DeserializeOwned>(run: &Run, kind: &str) -> BTreeMap<u32, T> {
    let tag = format!("KLPV-JSON-{kind} boot=");
    run.lines
        .iter()
        .filter_map(|l| l.split_once(&tag))
        .map(|(_, rest)| {
            let (boot, json) = rest.split_once(' ').expect("boot number then JSON");
            let v = serde_json::from_str(json)
                .unwrap_or_else(|e| panic!("bad {kind} JSON ({e}): {json}"));
            (boot.parse().expect("boot number"), v)
        })
        .collect()
}

/// Lines of one boot, from its first KLPV-READY to its KLPV-RESULT line.
fn boot_lines(run: &Run, boot: u32) -> Vec<&str> {
    let end = format!("KLPV-RESULT introspect boot={boot} ");
    let mut out = Vec::new();
    let mut n = 0;
    for l in &run.lines {
        if l.contains("KLPV-READY") {
            n += 1;
        }
        if n == boot {
            out.push(l.as_str());
        }
        if l.contains(&end) {
            break;
        }
    }
    out
}

/// One /proc stat line after `tag`: tgid, tid, comm.
fn proc_task(line: &str, tag: &str) -> (i32, i32, String) {
    // "<tag> <tgid>/task/<tid>/stat <tid> (<comm>) <state> ..."
    let rest = line.split_once(&format!("{tag} ")).expect("tag").1;
    let tgid = rest.split('/').next().unwrap().parse().unwrap();
    let open = rest.find('(').unwrap();
    let close = rest.rfind(')').unwrap();
    let tid = rest[..open]
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    (tgid, tid, rest[open + 1..close].to_owned())
}

/// The guest's listing of its threads under `tag`: tid to (tgid, comm).
fn listing(lines: &[&str], tag: &str) -> BTreeMap<i32, (i32, String)> {
    let needle = format!("{tag} ");
    lines
        .iter()
        .filter(|l| l.contains(&needle))
        .map(|l| {
            let (tgid, tid, comm) = proc_task(l, tag);
            (tid, (tgid, comm))
        })
        .collect()
}

/// /proc shows workqueue workers as "kworker/0:1-events" (the comm plus
/// the work's queue); task_struct.comm holds 15 bytes at most.
fn comm_matches(t: &TaskEntry, proc_comm: &str) -> bool {
    // A workqueue worker's /proc comm adds "-<workqueue>" when idle and
    // "+<workqueue>" while running a work item (wq_worker_comm()).
    t.comm == proc_comm
        || (t.wq_worker
            && ["-", "+"]
                .iter()
                .any(|sep| proc_comm.starts_with(&format!("{}{sep}", t.comm))))
        || (t.comm.len() == 15 && proc_comm.starts_with(&t.comm))
}

#[test]
fn api_view_equals_the_guests_own_on_two_kaslr_slides() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("introspect", &[]);
    let vms: BTreeMap<u32, VmInfo> = json_lines(&run, "VM");
    let tasks: BTreeMap<u32, TasksReply> = json_lines(&run, "TASKS");
    assert!(vms.len() >= 2, "at least two boots\n{}", run.transcript());
    let mut slides = Vec::new();
    for (&boot, vm) in &vms {
        let lines = boot_lines(&run, boot);
        let k = vm
            .kernel
            .as_ref()
            .unwrap_or_else(|| panic!("boot {boot}: kernel not found: {:?}", vm.kernel_error));
        let guest = fields(
            lines
                .iter()
                .find(|l| l.contains("KLPV-GUEST "))
                .expect("guest's self-report"),
        );
        let api = run
            .results("introspect")
            .into_iter()
            .find(|r| r["boot"] == boot.to_string())
            .expect("introspect result");

        // kallsyms: every vmlinux line of /proc/kallsyms, by digest.
        assert_eq!(api["api_lines"], guest["kallsyms_lines"], "boot {boot}");
        assert_eq!(
            api["api_md5"], guest["kallsyms_md5"],
            "boot {boot}: kallsyms differ"
        );
        assert_eq!(k.symbols.to_string(), guest["kallsyms_lines"]);
        // The VM ran the whole way through to a clean poweroff.
        assert_eq!(api["rc"], "0", "boot {boot}: vmm exit");

        // Release and build identity, read from init_uts_ns.
        assert_eq!(k.release.as_deref(), Some(guest["release"].as_str()));
        let version = lines
            .iter()
            .find_map(|l| l.split_once("KLPV-GUEST-VERSION ").map(|(_, v)| v.trim()))
            .expect("guest's uname -v");
        assert_eq!(k.version.as_deref(), Some(version), "boot {boot}");
        assert!(k.banner.as_deref().unwrap_or("").contains(version));

        // Threads: the guest's, with the same tgid and name. The guest
        // listed them before the host looked and again after; the kernel
        // may start or end threads of its own in between (a workqueue pool
        // adds a worker when its last idle one gets work).
        let t = &tasks[&boot];
        let before = listing(&lines, "KLPV-GTASK");
        let after = listing(&lines, "KLPV-GTASK2");
        assert!(
            !before.is_empty() && !after.is_empty(),
            "boot {boot}: guest's listings"
        );
        let got: BTreeMap<i32, &TaskEntry> = t
            .tasks
            .iter()
            .filter(|t| t.idle_cpu.is_none())
            .map(|t| (t.pid, t))
            .collect();
        // Alive at both listings, so alive while the host looked.
        let missed: Vec<_> = before
            .keys()
            .filter(|tid| after.contains_key(tid) && !got.contains_key(tid))
            .collect();
        assert!(
            missed.is_empty(),
            "boot {boot}: threads the host missed: {missed:?}"
        );
        // Every thread the host saw was listed, or was born after the first
        // listing (pids count up) and had ended by the second.
        let newest = before.keys().max().copied().unwrap_or(0);
        let unknown: Vec<_> = got
            .keys()
            .filter(|tid| !before.contains_key(tid) && !after.contains_key(tid) && **tid <= newest)
            .collect();
        assert!(
            unknown.is_empty(),
            "boot {boot}: threads the guest never had: {unknown:?}"
        );
        let changed = before.len() != after.len() || before.keys().any(|t| !after.contains_key(t));
        eprintln!(
            "boot {boot}: {} threads seen by the host, {} and {} listed by the guest{}",
            got.len(),
            before.len(),
            after.len(),
            if changed {
                " (the set changed in between)"
            } else {
                ""
            }
        );
        for (tid, g) in &got {
            let Some((tgid, comm)) = before.get(tid).or_else(|| after.get(tid)) else {
                continue;
            };
            assert_eq!(g.tgid, *tgid, "boot {boot}: tgid of {tid}");
            assert!(
                comm_matches(g, comm),
                "boot {boot}: {tid}: {} vs {comm}",
                g.comm
            );
        }
        // One idle task per vCPU, and each vCPU runs exactly one task.
        let idle = t.tasks.iter().filter(|t| t.idle_cpu.is_some()).count();
        assert_eq!(idle, 2, "boot {boot}: idle tasks");
        for v in 0..2 {
            let on: Vec<_> = t.tasks.iter().filter(|t| t.vcpu == Some(v)).collect();
            assert_eq!(on.len(), 1, "boot {boot}: tasks on vCPU {v}: {on:?}");
        }
        // The lister sleeps in `read` while the host looks.
        let lister = t
            .tasks
            .iter()
            .find(|t| t.comm == "klpv-introspect")
            .expect("the guest's lister");
        assert_eq!(lister.state, "S");
        slides.push(k.slide);
    }
    slides.dedup();
    assert!(
        slides.len() >= 2,
        "boots had different KASLR slides: {slides:?}"
    );
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

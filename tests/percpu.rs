//! Per-CPU variables in patch code, end to end: a patch built by kbuild
//! with a per-CPU variable of its own (percpu-uptime), whose block the
//! guest kernel allocates as it would a module's, whose initial value
//! every possible CPU's copy gets, and which goes back to the guest's
//! allocator when the patch's code is freed (scenario `patch-percpu`).
#![forbid(unsafe_code)]

use harness::{run_scenario, Run};
use klpvisor_api::{PatchInfo, PatchesReply};

/// The initial value of the patch's per-CPU counter on every CPU.
const START: u64 = 1000;

/// What the guest printed under `tag` at step `n` (`<tag> <n> <text>`).
fn step(run: &Run, tag: &str, n: &str) -> String {
    let prefix = format!("{tag} {n} ");
    run.lines_with(&prefix)
        .first()
        .and_then(|l| l.split_once(&prefix).map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {tag} {n}\n{}", run.transcript()))
}

/// How many CPUs a sysfs CPU list (`0-1`, `0,2-3`) names.
fn count_cpus(list: &str) -> u64 {
    list.split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => {
                r.parse::<u64>().unwrap();
                1
            }
        })
        .sum()
}

/// The patch as `patcher --json list` showed it at `at`.
fn patch(run: &Run, at: &str) -> PatchInfo {
    let reply: PatchesReply = run.json("KLPV-JSON-PATCHES", at);
    reply
        .patches
        .into_iter()
        .find(|p| p.name == "percpu_uptime")
        .unwrap_or_else(|| panic!("percpu_uptime not listed at {at}\n{}", run.transcript()))
}

#[test]
fn a_patchs_per_cpu_variables_are_allocated_copied_to_every_cpu_and_freed() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-percpu", &[]);
    let t = run.transcript();
    for r in [
        "percpu-apply",
        "percpu-disable",
        "percpu-remove",
        "percpu-reapply",
        "patch-percpu-exit",
    ] {
        assert_eq!(run.result(r)["rc"], "0", "{r}\n{t}");
    }
    let cpus = count_cpus(&step(&run, "KLPV-POSSIBLE", "1"));
    assert!(cpus >= 2, "the VM has two vCPUs\n{t}");

    // Before: the kernel's own function, one line.
    assert_eq!(step(&run, "KLPV-UPTIME", "1 1"), "none", "{t}");
    assert_eq!(step(&run, "KLPV-MODULE", "1"), "none", "{t}");

    // Applied: every possible CPU's copy started at the initial value
    // (percpu_modcopy), and each read counted itself once (this_cpu_inc
    // on whichever CPU ran it) in the sum over them (per_cpu).
    for (n, reads) in [("2 1", 1), ("2 2", 2)] {
        assert_eq!(
            step(&run, "KLPV-UPTIME", n),
            format!("klpv-percpu {} {cpus}", START * cpus + reads),
            "{t}"
        );
    }
    let module = step(&run, "KLPV-MODULE", "2");
    assert!(module.starts_with("percpu_uptime "), "{module}");
    // GET /patches and `patcher list` show the block.
    let m = patch(&run, "applied").module.expect("a guest module");
    assert_eq!(m.percpu_size, 8, "{t}");
    let block = m.percpu.expect("its per-CPU block").0;
    assert!(block != 0, "{t}");
    assert_eq!(run.result("percpu-list")["shown"], "1", "{t}");

    // Disabled and removed: the kernel's function again, and the block
    // went back to the guest's allocator, once.
    assert_eq!(step(&run, "KLPV-UPTIME", "3 1"), "none", "{t}");
    assert_eq!(step(&run, "KLPV-MODULE", "3"), "none", "{t}");
    assert_eq!(
        run.lines_with("per-CPU block freed in the guest").len(),
        1,
        "{t}"
    );

    // Applied again: a new block (perhaps the same memory, which the
    // allocator zeroed), the initial value copied again.
    for (n, reads) in [("4 1", 1), ("4 2", 2)] {
        assert_eq!(
            step(&run, "KLPV-UPTIME", n),
            format!("klpv-percpu {} {cpus}", START * cpus + reads),
            "{t}"
        );
    }
    let again = patch(&run, "reapplied").module.expect("a guest module");
    assert_eq!(again.percpu_size, 8, "{t}");

    // Nothing went wrong in the guest.
    assert_eq!(
        run.lines_with("KLPV-DMESG ")
            .first()
            .map(|l| l.ends_with("warnings=0 oopses=0")),
        Some(true),
        "{t}"
    );
}

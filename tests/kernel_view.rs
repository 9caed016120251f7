//! The kernel view is found on the first request of every boot and keeps
//! working: it reads the guest through the kernel's own page tables
//! (`init_top_pgt`), never through a process's, which the guest frees when
//! that process exits.
//!
//! The scenario boots the guest 10 times in a row (2 vCPUs, 512 MiB,
//! 5-level paging in the nested image), each with processes starting and
//! exiting on every vCPU, and makes an apply the first request that needs
//! the kernel. Before the fix, about one boot in three kept a view through
//! a freed PGD and refused every patch for the VM's life, so 10 boots miss
//! such a regression with odds under 2%, in about 7 minutes of CI; the
//! offline tests in the guest crate (`kernel_view`) check the mechanism
//! itself on every run. `KLPV_FIRST_REQUEST_BOOTS=N` runs a longer soak.
#![forbid(unsafe_code)]

use harness::run_scenario_within;

/// Boots per run unless `KLPV_FIRST_REQUEST_BOOTS` says otherwise.
const DEFAULT_BOOTS: usize = 10;

#[test]
fn boots_in_a_row_each_apply_a_patch_on_the_first_request() {
    if harness::skip_without_e2e() {
        return;
    }
    let boots = std::env::var("KLPV_FIRST_REQUEST_BOOTS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_BOOTS);
    // About 45 s per boot in the nested image, with margin.
    let within = 300 + 75 * u32::try_from(boots).unwrap_or(u32::MAX / 150);
    let run = run_scenario_within("first-request", &[&boots.to_string()], within);
    let t = run.transcript();
    let per_boot = run.results("first-request");
    assert_eq!(per_boot.len(), boots, "{t}");
    for r in &per_boot {
        assert_eq!(
            (r["rc"].as_str(), r["patched"].as_str()),
            ("0", "yes"),
            "boot {}: the first apply failed or did not land\n{t}",
            r["boot"]
        );
    }
    let views = run.results("first-request-view");
    assert_eq!(views.len(), boots, "{t}");
    for v in &views {
        assert!(
            v["page_tables"].starts_with("0x"),
            "boot {}: {v:?}",
            v["boot"]
        );
        assert!(["4", "5"].contains(&v["levels"].as_str()), "{v:?}");
    }
    let total = run.result("first-requests");
    assert_eq!(total["ok"], boots.to_string(), "{t}");

    // Every view the VMM kept reads through init_top_pgt; say which roots
    // found the kernel, and how many builds needed a retry.
    let found = run.lines_with("guest kernel found");
    assert_eq!(found.len(), boots, "one view per boot\n{t}");
    assert!(
        found
            .iter()
            .all(|l| l.contains("reads_through=init_top_pgt at ")),
        "{found:#?}"
    );
    let through_twin = found
        .iter()
        .filter(|l| l.contains("CR3 kernel twin"))
        .count();
    let retried = run.lines_with("the guest kernel view failed").len();
    eprintln!(
        "first-request: {}/{boots} boots applied on the first request; views found through a \
         PTI kernel twin: {through_twin}; builds retried within a request: {retried}",
        total["ok"]
    );
}

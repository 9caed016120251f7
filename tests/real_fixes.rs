//! Real fixes: patches whose code holds what real kernel functions hold,
//! each copied from a real kernel function with one change, registered
//! with the guest kernel as a module so that the kernel treats patch code
//! as it treats a module's. One guest runs both patches (scenario
//! `patch-fixes`); one test checks each construct in turn.
#![forbid(unsafe_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};

use harness::{run_scenario, Run};

/// A check of one construct on the shared run.
type Check = fn(&Run);

/// One nested boot for every construct (test runners such as nextest run
/// each test in its own process, so a shared run cannot span tests). Each
/// construct is still checked on its own: a failure names every construct
/// that failed, with its message, not only the first.
#[test]
fn real_fix_constructs_work_in_patch_code() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-fixes", &[]);
    let checks: [(&str, Check); 5] = [
        (
            "WARN",
            a_warn_in_patch_code_reports_like_a_modules_and_the_guest_continues,
        ),
        (
            "exception fixup",
            a_fault_in_a_patchs_user_access_returns_efault,
        ),
        ("tracepoint", a_tracepoint_in_patch_code_follows_its_key),
        (
            "function tracer",
            the_function_tracer_works_beside_patched_functions,
        ),
        (
            "BPF fentry",
            a_bpf_fentry_program_fires_on_a_patched_function,
        ),
    ];
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, check)| catch_unwind(AssertUnwindSafe(|| check(&run))).is_err())
        .map(|(name, _)| *name)
        .collect();
    assert!(
        failed.is_empty(),
        "constructs that failed: {failed:?} (each one's panic is above)"
    );
}

/// The guest's closing dmesg summary: exactly the one WARN, no oops.
fn assert_clean_dmesg(run: &Run) {
    let summary = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(summary.len(), 1, "{}", run.transcript());
    assert!(
        summary[0].ends_with("warnings=1 oopses=0"),
        "exactly the one WARN, no oops: {}",
        summary[0]
    );
    assert_eq!(
        run.result("patch-fixes-exit")["rc"],
        "0",
        "{}",
        run.transcript()
    );
}

/// The kernel log lines the guest showed at step `n`.
fn kmsg(run: &Run, n: u32) -> Vec<String> {
    let prefix = format!("KLPV-KMSG {n} ");
    run.lines_with(&prefix)
        .iter()
        .filter_map(|l| l.split_once(&prefix))
        .filter_map(|(_, rest)| rest.split_once(' ').map(|(_, line)| line.to_owned()))
        .collect()
}

fn a_warn_in_patch_code_reports_like_a_modules_and_the_guest_continues(run: &Run) {
    let t = run.transcript();
    assert_eq!(run.result("warn-apply")["rc"], "0", "{t}");

    // Before: the kernel's own function, no module, no livepatch taint.
    assert_eq!(run.step("KLPV-HIDEPID", 1), "ptraceable", "{t}");
    assert_eq!(run.step("KLPV-MODULE", 1), "none", "{t}");
    let taint_before: u64 = run.step("KLPV-TAINTED", 1).parse().expect("taint");
    assert_eq!(taint_before & (1 << 15), 0, "{t}");
    assert!(kmsg(run, 1).is_empty(), "{t}");

    // Applied: the patched function runs (its change shows), its WARN
    // fires and reports as a module's would, and the guest carries on.
    assert_eq!(run.step("KLPV-HIDEPID", 2), "unknown", "{t}");
    let module = run.step("KLPV-MODULE", 2);
    assert!(module.starts_with("warn_hidepid "), "{module}");
    assert!(
        module.contains("Live") && module.contains("(K)"),
        "{module}"
    );
    let sym = run.step("KLPV-KALLSYMS", 2);
    assert!(
        sym.contains(" livepatch_proc_show_options") && sym.ends_with("[warn_hidepid]"),
        "{sym}"
    );
    let taint: u64 = run.step("KLPV-TAINTED", 2).parse().expect("taint");
    assert_ne!(taint & (1 << 15), 0, "taint K (TAINT_LIVEPATCH)\n{t}");
    let log = kmsg(run, 2);
    let warning = log
        .iter()
        .find(|l| l.contains("WARNING:"))
        .cloned()
        .unwrap_or_default();
    // "WARNING: CPU: 1 PID: 57 at <file>:<line> livepatch_proc_show_options+0x../0x.. [warn_hidepid]"
    assert!(warning.contains("WARNING: CPU:"), "{log:#?}");
    // WARN_ONCE's message comes first, as printk'd by __warn_printk.
    assert!(warning.contains("warn-hidepid.c:"), "file:line\n{log:#?}");
    assert!(
        warning.contains("livepatch_proc_show_options+0x") && warning.contains("[warn_hidepid]"),
        "the function, named through the module's kallsyms\n{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("bad hide_pid value: 4")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("Modules linked in:") && l.contains("warn_hidepid(K)")),
        "{log:#?}"
    );
    // The guest's ORC unwinder walks out of the patch frame: the caller
    // of the patched function is a reliable frame (no "? ").
    let caller = log
        .iter()
        .find(|l| l.contains("show_vfsmnt+0x") || l.contains("show_mountinfo+0x"))
        .unwrap_or_else(|| panic!("no caller in the call trace\n{log:#?}"));
    assert!(
        !caller.contains("? "),
        "unreliable frame: {caller}\n{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("---[ end trace")), "{log:#?}");

    // Again: WARN_ONCE reports once; the function still runs patched.
    assert_eq!(run.step("KLPV-HIDEPID", 3), "unknown", "{t}");
    assert_eq!(
        kmsg(run, 3)
            .iter()
            .filter(|l| l.contains("WARNING:"))
            .count(),
        1,
        "{t}"
    );

    // Disabled and removed: the kernel's function again; the next
    // transition took the module off the kernel's lists.
    assert_eq!(run.result("disable-warn_hidepid")["rc"], "0", "{t}");
    assert_eq!(run.result("remove-warn_hidepid")["rc"], "0", "{t}");
    assert_eq!(run.result("sample-apply")["rc"], "0", "{t}");
    assert_eq!(run.result("sample-disable")["rc"], "0", "{t}");
    assert_eq!(run.step("KLPV-HIDEPID", 4), "ptraceable", "{t}");
    assert_eq!(run.step("KLPV-MODULE", 4), "none", "{t}");
    assert_eq!(run.step("KLPV-KALLSYMS", 4), "none", "{t}");

    assert_clean_dmesg(run);
}

fn a_fault_in_a_patchs_user_access_returns_efault(run: &Run) {
    let t = run.transcript();
    // With SMAP on, a user access works only between stac and clac: the
    // alternatives must be applied for this CPU, or every read oopses.
    assert_eq!(run.lines_with("KLPV-SMAP yes").len(), 1, "{t}");
    assert_eq!(run.result("zero-apply")["rc"], "0", "{t}");
    // The kernel's read_zero before and after; the patch's (64 KiB at
    // most per read) while applied.
    let full = "1+0 records in";
    let short = "0+1 records in";
    assert_eq!(run.step("KLPV-DD", 1), full, "{t}");
    assert_eq!(run.step("KLPV-DD", 2), short, "the patch runs\n{t}");
    assert_eq!(run.step("KLPV-DD", 3), short, "{t}");
    assert_eq!(run.step("KLPV-DD", 4), full, "{t}");
    // Each outcome of the user access is the kernel's, patched or not: a
    // fault returns -EFAULT (fixed up through the patch's exception
    // table), a fault part-way returns the bytes before it, a good buffer
    // is cleared.
    let want = "bad=-1/EFAULT partial=4096 good=ok";
    for n in 1..=4 {
        assert_eq!(run.step("KLPV-EFAULT", n), want, "step {n}\n{t}");
    }
    assert_eq!(run.result("disable-efault_zero")["rc"], "0", "{t}");
    assert_eq!(run.result("remove-efault_zero")["rc"], "0", "{t}");
    assert_clean_dmesg(run);
}

/// A tracepoint in patch code (trace-itimer: set_cpu_itimer with one
/// change). The guest kernel flips the patch's site itself when the event
/// is switched, because the patch's entries are on the key's list as a
/// module's would be: with the event on at apply, the site is live at
/// once; off, no event; on again, events. After removal the kernel's own
/// site reports again and switching the event touches nothing of ours.
fn a_tracepoint_in_patch_code_follows_its_key(run: &Run) {
    let t = run.transcript();
    assert_eq!(run.result("itimer-apply")["rc"], "0", "{t}");
    let remaining = |n| -> u64 {
        run.step("KLPV-ITIMER", n)
            .strip_prefix("remaining_us=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("KLPV-ITIMER {n}\n{t}"))
    };
    // The kernel's function rounds a new expiry up by a tick; the patch's
    // does not (the largest of 20 readings right after arming: over one
    // second unless every round lost a tick of CPU time in between).
    assert!(remaining(1) > 1_000_000, "{t}");
    assert!(remaining(2) <= 1_000_000, "the patch runs\n{t}");
    assert!(remaining(3) <= 1_000_000, "{t}");
    assert!(remaining(4) > 1_000_000, "the kernel's again\n{t}");
    // Two events per run (arm, disarm) whenever the event is on, from the
    // kernel's site (1, 4) or the patch's (2, 3); none when off.
    for n in 1..=4 {
        assert_eq!(
            run.step("KLPV-TRACE", n),
            "on=2 off=0 again=2",
            "step {n}\n{t}"
        );
    }
    assert_eq!(run.result("disable-trace_itimer")["rc"], "0", "{t}");
    assert_eq!(run.result("remove-trace_itimer")["rc"], "0", "{t}");
    assert_clean_dmesg(run);
}

/// The guest's own tracing works on a patched function, as it does under
/// klp: set_cpu_itimer is redirected through an ftrace_ops of its own, so
/// ftrace keeps its entry, and the function tracer (filtered to it) and a
/// kprobe event on it both fire while the patch, not the kernel's
/// function, does the work (remaining_us), before, while and after it is
/// applied.
fn the_function_tracer_works_beside_patched_functions(run: &Run) {
    let t = run.transcript();
    for n in 1..=4 {
        let line = run.step("KLPV-FTRACE", n);
        let field = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in KLPV-FTRACE {n}: {line}\n{t}"))
        };
        assert!(
            line.starts_with("filter=0 tracer=0/0 kprobe=0 "),
            "step {n}: {line}\n{t}"
        );
        // 20 rounds of arming and disarming: 40 calls, each seen once by
        // each tracer (a few may be lost to a full buffer, never all).
        assert!(field("calls") >= 20, "step {n}: {line}\n{t}");
        assert!(field("hits") >= 20, "step {n}: {line}\n{t}");
        let patched = field("remaining_us") <= 1_000_000;
        assert_eq!(patched, n == 2 || n == 3, "step {n}: {line}\n{t}");
    }
    // No ftrace_bug: the one WARN is warn-hidepid's.
    assert_clean_dmesg(run);
}

/// A BPF fentry program on a patched function (klpv-fentry: the kernel's
/// BPF trampoline, an ftrace direct call that shares the entry with the
/// patch's IPMODIFY ftrace_ops, as it does with klp's) counts every call,
/// before, while and after the patch is applied, and the patch still does
/// the work while it is attached.
fn a_bpf_fentry_program_fires_on_a_patched_function(run: &Run) {
    let t = run.transcript();
    for n in 1..=4 {
        let line = run.step("KLPV-FENTRY", n);
        let field = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in KLPV-FENTRY {n}: {line}\n{t}"))
        };
        // 20 rounds: 40 calls, every one counted.
        assert_eq!(field("hits"), 40, "step {n}: {line}\n{t}");
        let patched = field("remaining_us") <= 1_000_000;
        assert_eq!(patched, n == 2 || n == 3, "step {n}: {line}\n{t}");
    }
}

//! Livepatch modules built by kbuild, applied from outside the guest.
#![forbid(unsafe_code)]

use harness::{run_scenario, Run};
use klpvisor_api::{ObjectState, PatchState, PatchesReply};

/// The JSON after `KLPV-JSON-PATCHES <step> `.
fn patches(run: &Run, step: &str) -> PatchesReply {
    run.json("KLPV-JSON-PATCHES", step)
}

#[test]
fn livepatch_sample_applies_and_disables_from_outside() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-sample", &[]);
    let t = run.transcript();
    assert_eq!(run.result("patch-apply")["rc"], "0", "{t}");
    assert_eq!(run.result("patch-disable")["rc"], "0", "{t}");

    // The guest sees the patch land and go.
    let original = run.cmdline(1);
    assert!(original.contains("console=ttyS0"), "{original}");
    assert_eq!(run.cmdline(2), "this has been live patched");
    assert_eq!(run.cmdline(3), original);

    // The patch as listed: enabled with its one function live, then disabled.
    let on = patches(&run, "applied");
    assert_eq!(on.patches.len(), 1);
    let p = &on.patches[0];
    assert_eq!(p.name, "livepatch_sample");
    assert_eq!(p.state, PatchState::Enabled);
    assert!(!p.replace && !p.forced);
    assert_eq!(p.funcs.len(), 1);
    assert_eq!(p.funcs[0].name, "cmdline_proc_show");
    assert!(p.funcs[0].live);
    let off = patches(&run, "disabled");
    assert_eq!(off.patches[0].state, PatchState::Disabled);
    assert!(!off.patches[0].funcs[0].live);

    // Redirected through the guest's ftrace, as klp redirects.
    assert!(p.funcs[0].ftrace_ops.is_some(), "{p:?}");

    // The switch log: registered for the apply, through the gate, and let
    // go once changes paused (the text hashes below are taken after that).
    let log = on.switch_log.as_ref().expect("the switch log is installed");
    assert!(
        matches!(log.state.as_str(), "registered" | "unregistered"),
        "{log:?}"
    );
    assert!(log.head >= 2, "no switch logged: {log:?}");
    // With it, each pause read only the tasks that may have run since
    // they were judged with the guest running, not all of them.
    let tasks: usize = run.result("tasks")["n"].parse().expect("task count");
    let read: Vec<usize> = run
        .lines_with("that pause read the stacks of ")
        .iter()
        .filter_map(|l| {
            l.split("that pause read the stacks of ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(read.len(), 2, "apply and disable: {t}");
    for n in read {
        assert!(
            n >= 1 && n * 2 < tasks,
            "{n} of {tasks} tasks read in a pause"
        );
    }
    assert_eq!(run.result("patch-remove")["rc"], "0", "{t}");

    // Kernel text: the switch changes nothing outside the patch site and
    // the two calls in ftrace's entry code that ftrace points at its only
    // ops' handler, and disable, which unregisters the ops as klp does,
    // gives back every byte. Hashes: before; applied and disabled (those
    // three masked); disabled (whole).
    let hashes = run.results("text-hash");
    assert_eq!(hashes.len(), 4, "{t}");
    assert_eq!(hashes[1]["masked_sites"], "3");
    assert_eq!(hashes[2]["masked_sites"], "3");
    assert_eq!(hashes[1]["fnv"], hashes[2]["fnv"], "text outside the site");
    assert_eq!(hashes[0]["fnv"], hashes[3]["fnv"], "text after disable");

    assert_eq!(run.result("patch-sample-exit")["rc"], "0");
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(dmesg.len(), 1, "{t}");
    assert!(dmesg[0].ends_with("warnings=0"), "dmesg: {}", dmesg[0]);
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

/// `vmm --patch FILE.ko`: the VMM applies the sample by itself once the
/// guest kernel has booted, with no request on the socket; the patch is
/// then listed and managed like any other, and the guest sees it.
#[test]
fn livepatch_sample_applies_at_boot_with_vmm_patch() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-at-boot", &[]);
    let t = run.transcript();
    assert_eq!(run.result("boot-patch-listed")["rc"], "0", "{t}");
    let on = patches(&run, "booted");
    assert_eq!(on.patches.len(), 1, "{t}");
    let p = &on.patches[0];
    assert_eq!(p.name, "livepatch_sample");
    assert_eq!(p.state, PatchState::Enabled);
    assert!(p.funcs.iter().all(|f| f.live), "{p:?}");
    // In the history as the first transition, an apply like patcher's.
    let history = run.lines_with("KLPV-HISTORY ");
    assert!(
        history.len() == 1
            && history[0].contains("#1 at ")
            && history[0].contains("apply livepatch_sample"),
        "{t}"
    );
    // The guest: its first look may come before or after the patch (the
    // VMM applies it as init starts); the one asked for after the list
    // showed it enabled is patched.
    assert_eq!(run.cmdline(2), "this has been live patched", "{t}");
    // The VMM logged why it waited and what it applied.
    assert_eq!(
        run.lines_with("--patch: the guest kernel is up").len(),
        1,
        "{t}"
    );
    let applied = run.lines_with("--patch: applied");
    assert!(
        applied.len() == 1 && applied[0].contains("patch=\"livepatch_sample\""),
        "{t}"
    );
    assert!(run.lines_with("--patch: not applied").is_empty(), "{t}");
    assert_eq!(run.result("boot-patch-exit")["rc"], "0", "{t}");
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert!(dmesg.len() == 1 && dmesg[0].ends_with("warnings=0"), "{t}");
}

/// A module in kpatch-build's layout: kpatch's own patch hook (from
/// Debian's kpatch-build package) builds its klp_patch only at init time;
/// klpvisor reads kpatch's description instead and applies the same patch
/// from outside: cmdline_proc_show, with its klp relocation against the
/// unexported saved_command_line, as a replace patch named after the
/// module. A kpatch callback, which klpvisor cannot honour yet, is refused
/// with the guest untouched.
#[test]
fn a_kpatch_build_module_applies_from_outside() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-kpatch", &[]);
    let t = run.transcript();
    let line = |tag: &str, n: u32| run.step(tag, n);
    assert_eq!(run.result("kpatch-bad")["rc"], "1", "refused\n{t}");
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains("KPATCH-BAD") && l.contains(".kpatch.callbacks.pre_patch")),
        "the refusal names kpatch's callback table\n{t}"
    );
    assert_eq!(run.result("kpatch-apply")["rc"], "0", "{t}");
    assert_eq!(run.result("kpatch-disable")["rc"], "0", "{t}");

    // The real cmdline, then the same with " kpatch", then back.
    let before = line("KLPV-CMDLINE", 1);
    assert!(
        !before.is_empty() && !before.ends_with(" kpatch"),
        "{before}"
    );
    assert_eq!(line("KLPV-CMDLINE", 2), format!("{before} kpatch"));
    assert_eq!(line("KLPV-CMDLINE", 3), before);

    let on = patches(&run, "applied");
    assert_eq!(on.patches.len(), 1, "the refused module left nothing\n{t}");
    let p = &on.patches[0];
    assert_eq!(p.name, "kpatch_cmdline");
    assert!(p.replace, "kpatch-build's default is a replace patch");
    assert_eq!(p.state, PatchState::Enabled);
    let funcs: Vec<_> = p
        .funcs
        .iter()
        .map(|f| (f.object.as_str(), f.name.as_str(), f.live))
        .collect();
    assert_eq!(funcs, [("vmlinux", "cmdline_proc_show", true)]);
    let off = patches(&run, "disabled");
    assert!(off.patches[0].funcs.iter().all(|f| !f.live));

    assert_eq!(run.result("patch-kpatch-exit")["rc"], "0");
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(dmesg.len(), 1, "{t}");
    assert!(dmesg[0].ends_with("warnings=0"), "dmesg: {}", dmesg[0]);
}

/// A patch for vmlinux and for a module: the pvpanic module the guest's
/// init loaded has its `capability_show` (drivers/misc/pvpanic) patched in
/// the same transition as vmlinux's `cmdline_proc_show`; the object for
/// dummy, which the guest never loads, waits without making the rest of
/// the patch unusable; disable restores both.
#[test]
fn module_object_patches_a_loaded_module_in_the_same_transition() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-module", &[]);
    let t = run.transcript();
    let line = |tag: &str, n: u32| run.step(tag, n);
    assert_eq!(run.result("patch-apply")["rc"], "0", "{t}");
    assert_eq!(run.result("patch-disable")["rc"], "0", "{t}");

    // The guest had pvpanic loaded and dummy not.
    let modules = line("KLPV-MODULES", 1);
    assert!(modules.split(' ').any(|m| m == "pvpanic"), "{modules}");
    assert!(!modules.split(' ').any(|m| m == "dummy"), "{modules}");
    // The module function changed and changed back, with vmlinux's.
    let before = line("KLPV-CAPABILITY", 1);
    assert!(
        !before.is_empty() && before != "none" && !before.contains("patched"),
        "{before}\n{t}"
    );
    assert_eq!(line("KLPV-CAPABILITY", 2), format!("{before} patched"));
    assert_eq!(line("KLPV-CAPABILITY", 3), before);
    assert_eq!(line("KLPV-CMDLINE", 2), "this has been live patched");
    assert_eq!(line("KLPV-CMDLINE", 3), line("KLPV-CMDLINE", 1));

    // As listed: two objects linked, dummy waiting; both functions live.
    let on = patches(&run, "applied");
    let p = &on.patches[0];
    assert_eq!(p.state, PatchState::Enabled);
    let objects: Vec<_> = p
        .objects
        .iter()
        .map(|o| (o.name.as_str(), o.state, o.funcs))
        .collect();
    assert_eq!(
        objects,
        [
            ("vmlinux", ObjectState::Linked, 1),
            ("pvpanic", ObjectState::Linked, 1),
            ("dummy", ObjectState::Waiting, 1)
        ]
    );
    let funcs: Vec<_> = p
        .funcs
        .iter()
        .map(|f| (f.object.as_str(), f.name.as_str(), f.live))
        .collect();
    assert_eq!(
        funcs,
        [
            ("vmlinux", "cmdline_proc_show", true),
            ("pvpanic", "capability_show", true)
        ]
    );
    // The module function's entry is in module space.
    assert!(p.funcs[1].site.0 >= 0xffff_ffff_c000_0000);
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains("PATCHER-LIST   object dummy: waiting")),
        "patcher list names the waiting object\n{t}"
    );
    let off = patches(&run, "disabled");
    assert!(off.patches[0].funcs.iter().all(|f| !f.live));

    assert_eq!(run.result("patch-module-exit")["rc"], "0");
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(dmesg.len(), 1, "{t}");
    assert!(dmesg[0].ends_with("warnings=0"), "dmesg: {}", dmesg[0]);
}

#[test]
fn hot_syscall_patched_and_unpatched_under_a_loop_on_every_vcpu() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-hot", &["10"]);
    let t = run.transcript();
    let r = run.result("patch-hot");
    assert_eq!(
        r["ok"], "10",
        "every apply/disable/remove cycle succeeded\n{t}"
    );
    let workers = run.lines_with("KLPV-HOT-WORKER");
    assert_eq!(workers.len(), 2, "{t}");
    for w in &workers {
        assert!(
            w.ends_with("failed=0"),
            "the loop's results stayed right: {w}"
        );
        assert!(!w.contains("rounds=0 "), "the loop ran: {w}");
    }
    let end = patches(&run, "end");
    assert!(end.patches.is_empty(), "all removed");
    // Run with `--no-switch-log`: the log was never put in the guest, and
    // each pause read (nearly) every task, not the few that ran.
    assert!(end.switch_log.is_none(), "{:?}", end.switch_log);
    let tasks: usize = run.result("tasks")["n"].parse().expect("task count");
    let reads = run.results("hot-apply");
    assert_eq!(reads.len(), 10, "{t}");
    for r in reads {
        let n: usize = r["read"].parse().expect("read=N");
        assert!(n * 2 > tasks, "{n} of {tasks} tasks read in a pause");
    }
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(dmesg.len(), 1, "{t}");
    assert!(dmesg[0].ends_with("warnings=0"), "dmesg: {}", dmesg[0]);
    assert_eq!(run.result("patch-hot-exit")["rc"], "0");
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

/// Each class of bad input: refused with a message naming the problem,
/// and the kernel text and the arena unchanged (hashes through the API).
#[test]
fn bad_patches_are_refused_and_the_guest_is_untouched() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-bad", &[]);
    let t = run.transcript();
    // A forged kallsyms (the guest's token table overwritten before the
    // VMM first looked): the apply fails cleanly, every byte of guest
    // memory the same around it (the VM paused meanwhile).
    let ram = run.results("ram-hash");
    assert_eq!(ram.len(), 2, "{t}");
    assert_eq!(ram[0], ram[1], "a forged kallsyms changed guest memory");
    let hits = &run.result("kallsyms-corrupt")["hits"];
    assert!(hits.parse::<u32>().is_ok_and(|n| n >= 1), "{hits}\n{t}");
    assert_eq!(run.result("kallsyms-restore")["hits"], *hits, "{t}");
    let want = [
        ("forged-kallsyms", "kallsyms"),
        ("not-elf", "not an ELF file"),
        ("wrong-machine", "AArch64"),
        ("truncated", "truncated"),
        ("not-livepatch", "not a livepatch module"),
        ("unknown-function", "klpv_no_such_function"),
        ("ambiguous", "set .old_sympos"),
        ("wrong-sympos", ".old_sympos = 9"),
        ("unresolved", "3 symbol(s) cannot be resolved"),
        ("other-release", "rebuild it against linux-headers-"),
        (
            "own-key",
            "static key `livepatch_round_expiry` is defined by the patch",
        ),
        ("module-object", "not in module `pvpanic`"),
        ("init-ref", ".init.data"),
        ("arena-full", "arena full"),
        ("duplicate", "already loaded"),
        ("traced", "traced by the guest's ftrace"),
    ];
    let results = run.results("patch-bad");
    for (class, needle) in want {
        let r = results
            .iter()
            .find(|r| r["class"] == class)
            .unwrap_or_else(|| panic!("no result for {class}\n{t}"));
        // patcher's exit codes: 1 refused; 6 unavailable, for a guest
        // whose kernel cannot be read.
        let rc = if class == "forged-kallsyms" { "6" } else { "1" };
        assert_eq!(r["rc"], rc, "{class} refused\n{t}");
        let msg = run
            .lines
            .iter()
            .find(|l| l.contains(&format!("PATCH-BAD {class}: ")))
            .unwrap_or_else(|| panic!("no message for {class}"));
        assert!(msg.contains(needle), "{class}: `{needle}` not in: {msg}");
    }
    // Every unresolvable symbol is named, in one error.
    let unresolved = run.lines_with("PATCH-BAD unresolved: ");
    for name in ["klpv_missing_function", "klpv_missing_variable"] {
        assert!(unresolved[0].contains(name), "{}", unresolved[0]);
    }
    let hashes = run.results("guest-hash");
    assert_eq!(hashes.len(), 2, "{t}");
    assert_eq!(hashes[0], hashes[1], "kernel text and arena untouched");
    assert_eq!(
        run.result("patch-good")["rc"],
        "0",
        "a good patch still applies"
    );
    assert_eq!(run.result("patch-good-off")["rc"], "0");
    // Traced, with the VM running: shared through the guest's ftrace,
    // the tracer left on, and the guest runs the patch.
    assert_eq!(run.result("patch-traced")["rc"], "0", "{t}");
    assert!(run
        .lines_with("KLPV-CMDLINE 2 ")
        .iter()
        .any(|l| l.ends_with("this has been live patched")));
    let traced = patches(&run, "traced");
    assert!(traced.patches[0].funcs[0].ftrace_ops.is_some(), "{t}");
    assert_eq!(run.result("patch-traced-off")["rc"], "0", "{t}");
    assert_eq!(
        run.result("patch-untraced")["rc"],
        "0",
        "applies once untraced"
    );
    assert!(run
        .lines_with("KLPV-CMDLINE 4 ")
        .iter()
        .any(|l| l.ends_with("this has been live patched")));
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert!(
        dmesg.len() == 1 && dmesg[0].ends_with("warnings=0"),
        "{dmesg:?}"
    );
    assert_eq!(run.result("patch-bad-exit")["rc"], "0");
}

/// The consistency model: a transition waits while a task sleeps inside
/// the function it replaces, fails cleanly when the task stays too long,
/// and commits once the task has left.
#[test]
fn a_sleeping_task_blocks_the_transition_until_it_leaves() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-blocked", &[]);
    let t = run.transcript();
    assert!(run.results("blocked").is_empty(), "{t}");
    // 1 s timeout, a sleeper that outlives it: refused, the sleeper named,
    // nothing changed.
    // patcher's exit code for "no safe point in time".
    assert_eq!(run.result("blocked-short")["rc"], "4", "{t}");
    let msg = run.lines_with("BLOCKED-SHORT: ");
    assert!(
        msg[0].contains("no safe point")
            && msg[0].contains("(sleep)")
            && msg[0].contains("common_nsleep"),
        "{}",
        msg[0]
    );
    let hashes = run.results("guest-hash");
    assert_eq!(hashes.len(), 2, "{t}");
    assert_eq!(hashes[0], hashes[1], "kernel text and arena unchanged");
    let short = patches(&run, "short");
    assert!(short.patches.is_empty(), "no patch loaded");
    // How it ended is kept for a client that did not see the reply.
    let ended = short
        .ended
        .last()
        .expect("the refused apply is listed as ended");
    assert_eq!(
        (ended.patch.as_str(), ended.action.as_str(), ended.seq),
        ("block_nsleep", "apply", None),
        "{ended:?}"
    );
    assert!(
        ended.attempts > 0
            && ended
                .error
                .as_deref()
                .is_some_and(|e| e.contains("no safe point")),
        "{ended:?}"
    );
    // One change at a time: a second apply while one waits is refused at
    // once, naming the one in progress; the waiting one then commits.
    let busy = run
        .lines
        .iter()
        .find_map(|l| {
            l.split_once("KLPV-REFUSED busy ")
                .map(|(_, m)| m.to_owned())
        })
        .unwrap_or_else(|| panic!("no busy refusal\n{t}"));
    assert!(busy.starts_with("rc=5 "), "busy: exit 5\n{busy}");
    assert!(
        busy.contains("another transition is in progress (apply of block_nsleep)"),
        "{busy}"
    );
    assert_eq!(run.result("blocked-held")["rc"], "0", "{t}");
    assert_eq!(run.result("blocked-reset")["rc"], "0", "{t}");
    // 4 s sleeper, default 10 s: committed after waiting for it; while
    // it waited, the list showed it in transition, blocked by the sleeper.
    assert_eq!(run.result("blocked-wait")["rc"], "0", "{t}");
    let waiting = patches(&run, "waiting");
    // The held apply committed, then the reset's disable: both ended
    // with a history number and no error.
    let held = waiting
        .ended
        .iter()
        .find(|e| e.action == "apply" && e.seq.is_some())
        .unwrap_or_else(|| panic!("the held apply ended committed: {:?}", waiting.ended));
    assert!(held.error.is_none() && held.attempts > 1, "{held:?}");
    let pending = waiting.transition.expect("a transition in progress");
    assert_eq!(
        (pending.patch.as_str(), pending.action.as_str()),
        ("block_nsleep", "apply")
    );
    assert!(
        pending
            .blockers
            .iter()
            .any(|b| b.contains("(sleep)") && b.contains("common_nsleep")),
        "{:?}",
        pending.blockers
    );
    // Meanwhile patcher said on stderr what it waited for.
    assert!(
        run.lines.iter().any(
            |l| l.contains("patcher: waiting for a safe point: attempt ")
                && l.contains("; blocked by: pid ")
                && l.contains("(sleep)")
                && l.contains("common_nsleep")
        ),
        "no progress line naming the sleeper\n{t}"
    );
    let reply: klpvisor_api::TransitionReply = run.json("KLPV-JSON-TRANSITION", "wait");
    assert!(reply.attempts > 1, "it had to wait: {reply:?}");
    assert!(reply.waited_ms > 500.0, "{reply:?}");
    assert_eq!(reply.patch.state, PatchState::Enabled);
    // A sleeper inside the patch's code blocks its disable, found as a
    // frame of its unwound stack: the walk went through the patch's code
    // with the patch's ORC table, not a conservative scan of the stack.
    assert_eq!(run.result("blocked-in-patch")["rc"], "4", "{t}");
    let msg = run.lines_with("BLOCKED-IN-PATCH: ");
    assert!(
        msg[0].contains("(sleep) is in ") && msg[0].contains(" of its stack)"),
        "{}",
        msg[0]
    );
    // The client of a waiting disable was killed: the transition went on
    // and committed once the sleeper left, and the list says how it ended.
    assert_eq!(run.result("blocked-client-gone")["rc"], "137", "{t}");
    let gone = patches(&run, "client-gone");
    let last = gone.ended.last().expect("the disable ended");
    assert_eq!(
        (last.patch.as_str(), last.action.as_str()),
        ("block_nsleep", "disable"),
        "{last:?}"
    );
    assert!(
        last.seq.is_some() && last.error.is_none() && last.attempts > 1,
        "{last:?}"
    );
    assert!(gone
        .patches
        .iter()
        .any(|p| p.name == "block_nsleep" && p.state == PatchState::Disabled));
    // A sleeper that outlived the grace period got klp's fake signal: its
    // sleep restarted outside the patch, the disable committed, and the
    // sleeper is still there, asleep.
    assert_eq!(run.result("blocked-reenable")["rc"], "0", "{t}");
    assert_eq!(run.result("blocked-nudged")["rc"], "0", "{t}");
    let nudged: klpvisor_api::TransitionReply = run.json("KLPV-JSON-TRANSITION", "nudged");
    assert_eq!(nudged.nudged, 1, "{nudged:?}");
    assert!(
        nudged.waited_ms >= 4_000.0 && nudged.waited_ms < 20_000.0,
        "committed after the grace period, well before the timeout: {nudged:?}"
    );
    assert_eq!(nudged.patch.state, PatchState::Disabled);
    assert_eq!(run.result("blocked-sleeper-lives")["rc"], "0", "{t}");
    assert_eq!(run.result("blocked-exit")["rc"], "0");
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

/// A return address a kretprobe hid is judged like any other: the guest's
/// kretprobe on hrtimer_nanosleep leaves its trampoline's address where a
/// sleeper's return into the patched common_nsleep was, and disabling
/// the patch is still refused, naming the sleeper, the trampoline and
/// common_nsleep; once the sleeper is woken the disable and the remove
/// commit, and the guest runs on. The same with the function-graph
/// tracer in the kretprobe's place.
#[test]
fn a_return_hidden_by_a_kretprobe_blocks_the_disable() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-hooked", &[]);
    let t = run.transcript();
    assert!(run.results("hooked").is_empty(), "{t}");
    assert!(run.lines_with("KLPV-KRET failed").is_empty(), "{t}");
    assert_eq!(run.result("hooked-apply")["rc"], "0", "{t}");
    assert_eq!(run.result("hooked-disable")["rc"], "4", "{t}");
    let msg = run.lines_with("HOOKED-DISABLE: ");
    assert!(
        msg[0].contains("no safe point")
            && msg[0].contains("(sleep) will return into ")
            && msg[0].contains("common_nsleep")
            && msg[0].contains("trampoline"),
        "{}",
        msg[0]
    );
    let hashes = run.results("guest-hash");
    assert_eq!(hashes.len(), 2, "{t}");
    assert_eq!(hashes[0], hashes[1], "kernel text and arena unchanged");
    assert_eq!(run.result("hooked-woken")["rc"], "0", "{t}");
    assert_eq!(run.result("hooked-remove")["rc"], "0", "{t}");
    // The function-graph tracer: the real address is read (6.1's
    // ret_stack array, 6.12's shadow stack of encoded words) and judged:
    // the sleeper will return into common_nsleep through return_to_handler.
    assert_eq!(run.result("graph-apply")["rc"], "0", "{t}");
    assert_eq!(run.result("graph-disable")["rc"], "4", "{t}");
    let msg = run.lines_with("GRAPH-DISABLE: ");
    assert!(
        msg[0].contains("(sleep) will return into ")
            && msg[0].contains("common_nsleep")
            && msg[0].contains("return_to_handler"),
        "{}",
        msg[0]
    );
    assert_eq!(run.result("graph-woken")["rc"], "0", "{t}");
    assert_eq!(run.result("hooked-exit")["rc"], "0", "{t}");
    let dmesg = run.lines_with("KLPV-DMESG");
    assert!(
        dmesg.len() == 1 && dmesg[0].ends_with("warnings=0"),
        "{dmesg:?}"
    );
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning"
    );
}

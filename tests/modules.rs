//! A patch's object for a kernel module that loads after the patch is
//! applied: linked and redirected as the module loads (klp's
//! `klp_module_coming`), dropped when it unloads (`klp_module_going`), and
//! a module whose object cannot be resolved refused at load. With a real
//! Debian module, binfmt_misc.ko, that the guest loads and unloads
//! (guest-images/guest-scripts/klpv-modload).
#![forbid(unsafe_code)]

use std::collections::BTreeSet;

use harness::{run_scenario, Run};
use klpvisor_api::{ObjectState, PatchInfo, PatchState, PatchesReply};

/// The JSON after `KLPV-JSON-PATCHES <step> `.
fn patches(run: &Run, step: &str) -> PatchesReply {
    run.json("KLPV-JSON-PATCHES", step)
}

/// The patch called `name` in `reply`.
fn patch<'a>(reply: &'a PatchesReply, name: &str) -> &'a PatchInfo {
    reply
        .patches
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no patch {name} in {reply:?}"))
}

/// A patch's objects as (name, state, number of functions).
fn objects(p: &PatchInfo) -> Vec<(&str, ObjectState, u32)> {
    p.objects
        .iter()
        .map(|o| (o.name.as_str(), o.state, o.funcs))
        .collect()
}

/// Whether the patch's binfmt_misc function is listed and redirected.
fn binfmt_live(p: &PatchInfo) -> bool {
    p.funcs
        .iter()
        .any(|f| f.object == "binfmt_misc" && f.name == "bm_status_read" && f.live)
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

/// In one boot: module-binfmt applied while binfmt_misc is not loaded (its
/// object waits); the module loads patched from its first use, unloads
/// (the object waits again, the module gone) and loads patched again; a
/// cumulative replace (v2) and a rollback switch both objects together;
/// disable restores the kernel's functions; and a patch whose binfmt_misc
/// object names a function the module lacks is accepted while the module
/// is absent, then makes the module's load fail with EINVAL while the rest
/// of the guest runs on.
#[test]
fn a_module_loaded_after_the_patch_is_patched_before_it_runs() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-module-load", &[]);
    let t = run.transcript();
    // `KLPV-<tag> <n> <text>`, klpv-modload's line for step n.
    let line = |tag: &str, n: u32| run.step(tag, n);
    let modules = |n: u32| -> Vec<String> {
        line("KLPV-MODULES", n)
            .split(' ')
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let loaded = |n: u32| modules(n).iter().any(|m| m == "binfmt_misc");
    // `rc=<code> <message>` of a KLPV-INSMOD / KLPV-RMMOD line.
    let rc = |tag: &str, n: u32| -> (String, String) {
        let l = line(tag, n);
        let (rc, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
        let rc = rc
            .strip_prefix("rc=")
            .unwrap_or_else(|| panic!("`{tag} {n}` has no rc: {l}"));
        (rc.to_owned(), rest.to_owned())
    };
    let listed = |step: &str, needle: &str| {
        let prefix = format!("PATCHER-LIST {step} ");
        run.lines
            .iter()
            .any(|l| l.contains(&prefix) && l.contains(needle))
    };
    for step in ["apply-v1", "apply-v2", "rollback", "disable", "apply-bad"] {
        assert_eq!(run.result(step)["rc"], "0", "{step}\n{t}");
    }

    // 1: nothing applied, binfmt_misc shipped but not loaded.
    let original = line("KLPV-CMDLINE", 1);
    assert!(original.contains("console=ttyS0"), "{original}");
    assert!(!loaded(1), "binfmt_misc loaded at boot\n{t}");
    assert_eq!(line("KLPV-BINFMT", 1), "none");

    // Applied with the module absent: vmlinux linked and redirected, the
    // binfmt_misc object waiting, nothing of it redirected.
    let applied = patches(&run, "applied");
    let v1 = patch(&applied, "module_binfmt");
    assert_eq!(v1.state, PatchState::Enabled);
    assert!(v1.replace);
    assert_eq!(
        objects(v1),
        [
            ("vmlinux", ObjectState::Linked, 1),
            ("binfmt_misc", ObjectState::Waiting, 1)
        ]
    );
    assert!(!binfmt_live(v1), "{v1:?}");
    assert_eq!(
        live(&applied),
        set(&[("cmdline_proc_show", "module_binfmt")])
    );
    assert!(
        listed("applied", "object binfmt_misc: waiting"),
        "patcher list names the waiting object\n{t}"
    );

    // 2: loaded: patched from the status file's first read, the object
    // linked and its function redirected in module space.
    assert_eq!(rc("KLPV-INSMOD", 2).0, "0", "{t}");
    assert_eq!(line("KLPV-MOUNT", 2), "rc=0", "{t}");
    assert!(loaded(2), "{t}");
    assert_eq!(line("KLPV-BINFMT", 2), "enabled klpv1", "{t}");
    assert_eq!(line("KLPV-CMDLINE", 2), "module-binfmt klpv1 cmdline");
    let on = patches(&run, "loaded");
    let v1 = patch(&on, "module_binfmt");
    assert_eq!(
        objects(v1),
        [
            ("vmlinux", ObjectState::Linked, 1),
            ("binfmt_misc", ObjectState::Linked, 1)
        ]
    );
    assert!(binfmt_live(v1), "{v1:?}");
    let f = v1
        .funcs
        .iter()
        .find(|f| f.object == "binfmt_misc")
        .expect("the module's function is listed");
    assert!(f.site.0 >= 0xffff_ffff_c000_0000, "{f:?}");
    assert_eq!(
        live(&on),
        set(&[
            ("cmdline_proc_show", "module_binfmt"),
            ("bm_status_read", "module_binfmt")
        ])
    );
    assert!(
        listed("loaded", "object binfmt_misc: linked"),
        "patcher list shows the object linked\n{t}"
    );

    // 3: unloaded: the module is gone, its object waits again and nothing
    // of it stays redirected; vmlinux's function stays patched.
    let (unload_rc, unload_out) = rc("KLPV-RMMOD", 3);
    assert_eq!(unload_rc, "0", "{unload_out}\n{t}");
    assert!(unload_out.starts_with("umount=0"), "{unload_out}");
    assert!(!loaded(3), "{t}");
    assert_eq!(line("KLPV-BINFMT", 3), "none");
    assert_eq!(line("KLPV-CMDLINE", 3), "module-binfmt klpv1 cmdline");
    let off = patches(&run, "unloaded");
    let v1 = patch(&off, "module_binfmt");
    assert_eq!(v1.state, PatchState::Enabled);
    assert_eq!(
        objects(v1),
        [
            ("vmlinux", ObjectState::Linked, 1),
            ("binfmt_misc", ObjectState::Waiting, 1)
        ]
    );
    assert!(!binfmt_live(v1), "{v1:?}");
    assert_eq!(live(&off), set(&[("cmdline_proc_show", "module_binfmt")]));

    // 4: loaded again: patched again.
    assert_eq!(rc("KLPV-INSMOD", 4).0, "0", "{t}");
    assert!(loaded(4), "{t}");
    assert_eq!(line("KLPV-BINFMT", 4), "enabled klpv1", "{t}");
    let again = patches(&run, "reloaded");
    let v1 = patch(&again, "module_binfmt");
    assert_eq!(
        objects(v1),
        [
            ("vmlinux", ObjectState::Linked, 1),
            ("binfmt_misc", ObjectState::Linked, 1)
        ]
    );
    assert!(binfmt_live(v1), "{v1:?}");

    // 5: the patched function reads the module's own state: disabled
    // through the status file it says so, enabled again it says that (on
    // 6.1 through its klp relocation to binfmt_misc's static `enabled`,
    // applied to the module as it loaded again).
    assert_eq!(line("KLPV-BINFMT-OFF", 5), "disabled klpv1", "{t}");
    assert_eq!(line("KLPV-BINFMT", 5), "enabled klpv1", "{t}");

    // 6: the cumulative v2 replaces v1 in both objects at once.
    assert_eq!(line("KLPV-BINFMT", 6), "enabled klpv2", "{t}");
    assert_eq!(line("KLPV-CMDLINE", 6), "module-binfmt klpv2 cmdline");
    let v2 = patches(&run, "v2");
    assert_eq!(patch(&v2, "module_binfmt").state, PatchState::Replaced);
    let p2 = patch(&v2, "module_binfmt_v2");
    assert_eq!(p2.state, PatchState::Enabled);
    assert_eq!(
        objects(p2),
        [
            ("vmlinux", ObjectState::Linked, 1),
            ("binfmt_misc", ObjectState::Linked, 1)
        ]
    );
    assert_eq!(
        live(&v2),
        set(&[
            ("cmdline_proc_show", "module_binfmt_v2"),
            ("bm_status_read", "module_binfmt_v2")
        ])
    );

    // 7: rollback: v1 again in both objects, v2 loaded and disabled.
    assert_eq!(line("KLPV-BINFMT", 7), "enabled klpv1", "{t}");
    assert_eq!(line("KLPV-CMDLINE", 7), "module-binfmt klpv1 cmdline");
    let back = patches(&run, "rolled-back");
    assert_eq!(patch(&back, "module_binfmt").state, PatchState::Enabled);
    assert_eq!(patch(&back, "module_binfmt_v2").state, PatchState::Disabled);
    assert_eq!(
        live(&back),
        set(&[
            ("cmdline_proc_show", "module_binfmt"),
            ("bm_status_read", "module_binfmt")
        ])
    );

    // 8: disabled: the kernel's own functions in both objects.
    assert_eq!(line("KLPV-BINFMT", 8), "enabled", "{t}");
    assert_eq!(line("KLPV-CMDLINE", 8), original);
    let disabled = patches(&run, "disabled");
    assert_eq!(
        patch(&disabled, "module_binfmt").state,
        PatchState::Disabled
    );
    assert!(live(&disabled).is_empty(), "{:?}", disabled.live);

    // 9: unloaded; bad-module-binfmt accepted while binfmt_misc is absent,
    // its binfmt_misc object waiting, its vmlinux function redirected.
    assert_eq!(rc("KLPV-RMMOD", 9).0, "0", "{t}");
    assert!(!loaded(9), "{t}");
    let bad = patches(&run, "bad-applied");
    let b = patch(&bad, "bad_module_binfmt");
    assert_eq!(b.state, PatchState::Enabled);
    assert_eq!(
        objects(b),
        [
            ("vmlinux", ObjectState::Linked, 1),
            ("binfmt_misc", ObjectState::Waiting, 1)
        ]
    );
    assert_eq!(
        live(&bad),
        set(&[("cmdline_proc_show", "bad_module_binfmt")])
    );

    // 10: its object cannot be resolved in the module (no
    // klpv_no_such_binfmt_function): the load fails with EINVAL, as
    // klp_module_coming fails it, and the guest runs on untouched.
    let (insmod_rc, insmod_out) = rc("KLPV-INSMOD", 10);
    assert_ne!(insmod_rc, "0", "binfmt_misc loaded\n{t}");
    assert!(
        insmod_out.contains("Invalid argument"),
        "not EINVAL: {insmod_out}\n{t}"
    );
    assert!(!loaded(10), "binfmt_misc in /proc/modules\n{t}");
    assert_eq!(line("KLPV-BINFMT", 10), "none");
    assert_eq!(line("KLPV-CMDLINE", 10), "bad-module-binfmt cmdline", "{t}");
    let refused = patches(&run, "bad-loaded");
    let b = patch(&refused, "bad_module_binfmt");
    assert_eq!(b.state, PatchState::Enabled);
    assert_eq!(
        objects(b),
        [
            ("vmlinux", ObjectState::Linked, 1),
            ("binfmt_misc", ObjectState::Waiting, 1)
        ]
    );
    assert_eq!(
        live(&refused),
        set(&[("cmdline_proc_show", "bad_module_binfmt")])
    );
    assert!(
        listed("bad-loaded", "klpv_no_such_binfmt_function"),
        "patcher list says why the module's load was refused\n{t}"
    );

    // The binfmt_misc object's klp callbacks, as klp runs them: around
    // the module's own loads and unloads in the loading task (pre_patch
    // before the entry is redirected, post_patch after; pre_unpatch while
    // it still is, post_unpatch after), around the transitions for the
    // replace, the rollback (v1 enabled again) and the disable; never for
    // a disabled patch or a refused load.
    let cbs = |n: u32| run.callbacks(n);
    let on = |m: &str| {
        vec![
            format!("klpv-cb {m} pre_patch obj=binfmt_misc live=0"),
            format!("klpv-cb {m} post_patch obj=binfmt_misc live=1"),
        ]
    };
    let off = |m: &str| {
        vec![
            format!("klpv-cb {m} pre_unpatch obj=binfmt_misc live=1"),
            format!("klpv-cb {m} post_unpatch obj=binfmt_misc live=0"),
        ]
    };
    let none: Vec<String> = Vec::new();
    assert_eq!(cbs(1), none, "{t}");
    assert_eq!(cbs(2), on("klpv1"), "load\n{t}");
    assert_eq!(cbs(3), off("klpv1"), "unload\n{t}");
    assert_eq!(cbs(4), on("klpv1"), "load again\n{t}");
    assert_eq!(cbs(5), none, "{t}");
    assert_eq!(cbs(6), on("klpv2"), "replace: only v2's\n{t}");
    assert_eq!(cbs(7), on("klpv1"), "rollback\n{t}");
    assert_eq!(cbs(8), off("klpv1"), "disable\n{t}");
    assert_eq!(cbs(9), none, "a disabled patch's object\n{t}");
    assert_eq!(cbs(10), none, "{t}");

    assert_eq!(run.result("patch-module-load-exit")["rc"], "0", "{t}");
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(dmesg.len(), 1, "{t}");
    assert!(dmesg[0].ends_with("warnings=0"), "dmesg: {}", dmesg[0]);
    assert!(
        run.lines_with("Call Trace").is_empty(),
        "no oops or warning\n{t}"
    );
}

/// A module's functions are redirected through the guest's ftrace, as
/// klp's are, whether the module was loaded when the patch came or loads
/// later: the function tracer and a kprobe on the patched bm_status_read
/// see its calls, and the patched code runs. The unloading task lets the
/// function's ftrace_ops go and the loading task registers it again,
/// where klp does both; disabled, the function is the kernel's own and
/// still traced.
#[test]
fn a_loaded_modules_patched_function_stays_traceable() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("patch-module-traced", &[]);
    let t = run.transcript();
    let line = |tag: &str, n: u32| run.step(tag, n);
    // `KLPV-FTRACE n k=v ... status=<text>` as a map.
    let ftrace = |n: u32| -> std::collections::BTreeMap<String, String> {
        let l = line("KLPV-FTRACE", n);
        let (head, status) = l
            .split_once(" status=")
            .unwrap_or_else(|| panic!("no status in {l}"));
        let mut m: std::collections::BTreeMap<String, String> = head
            .split(' ')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        m.insert("status".into(), status.to_owned());
        m
    };
    let count = |m: &std::collections::BTreeMap<String, String>, k: &str| -> u32 {
        m.get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {m:?}\n{t}"))
    };
    for step in ["apply", "disable"] {
        assert_eq!(run.result(step)["rc"], "0", "{step}\n{t}");
    }
    assert_eq!(line("KLPV-BINFMT", 2), "enabled", "loaded unpatched\n{t}");

    // Applied with the module loaded: both functions go through ftrace.
    let applied = patches(&run, "applied");
    let p = patch(&applied, "module_binfmt");
    let f = p
        .funcs
        .iter()
        .find(|f| f.object == "binfmt_misc" && f.name == "bm_status_read")
        .unwrap_or_else(|| panic!("bm_status_read not listed: {p:?}"));
    assert!(f.live, "{f:?}");
    let ops = f.ftrace_ops.unwrap_or_else(|| panic!("a jmp: {f:?}\n{t}"));
    assert!(
        applied
            .ftrace
            .iter()
            .any(|r| r.ops == ops && r.state == "registered" && r.live),
        "{:?}",
        applied.ftrace
    );

    // Traced while patched: every read is seen by the function tracer and
    // the kprobe, and every read runs the patched code.
    let traced = ftrace(3);
    assert_eq!(traced["filter"], "0", "{traced:?}\n{t}");
    assert_eq!(traced["kprobe"], "0", "{traced:?}\n{t}");
    assert!(count(&traced, "calls") >= 5, "{traced:?}\n{t}");
    assert!(count(&traced, "hits") >= 5, "{traced:?}\n{t}");
    assert_eq!(traced["status"], "enabled klpv1", "{traced:?}\n{t}");

    // Unloaded: the object waits, and the unloading task let go of the
    // function's ftrace_ops (as klp_module_going does: ftrace would warn
    // when the next module loads on that site).
    let off = patches(&run, "unloaded");
    assert!(
        !patch(&off, "module_binfmt")
            .funcs
            .iter()
            .any(|f| f.object == "binfmt_misc"),
        "{off:?}"
    );
    assert!(off.ftrace.iter().all(|r| r.ops != ops), "{off:?}");
    // Loaded again: patched as it loads, through ftrace, and traced.
    assert_eq!(line("KLPV-BINFMT", 5), "enabled klpv1", "{t}");
    let again = patches(&run, "reloaded");
    let f = patch(&again, "module_binfmt")
        .funcs
        .iter()
        .find(|f| f.name == "bm_status_read")
        .cloned()
        .unwrap_or_else(|| panic!("{again:?}"));
    assert!(f.live, "{f:?}");
    assert!(f.ftrace_ops.is_some(), "a jmp: {f:?}\n{t}");
    let traced = ftrace(6);
    assert_eq!(traced["filter"], "0", "{traced:?}\n{t}");
    assert!(count(&traced, "calls") >= 5, "{traced:?}\n{t}");
    assert!(count(&traced, "hits") >= 5, "{traced:?}\n{t}");
    assert_eq!(traced["status"], "enabled klpv1", "{traced:?}\n{t}");

    // Disabled: the kernel's function, traced as before the patch.
    let plain = ftrace(7);
    assert_eq!(plain["filter"], "0", "{plain:?}\n{t}");
    assert!(count(&plain, "calls") >= 5, "{plain:?}\n{t}");
    assert!(count(&plain, "hits") >= 5, "{plain:?}\n{t}");
    assert_eq!(plain["status"], "enabled", "{plain:?}\n{t}");
    let disabled = patches(&run, "disabled");
    assert!(disabled.live.is_empty(), "{:?}", disabled.live);

    // The callbacks see the redirect through ftrace as klp's do: not yet
    // in pre_patch, in place in post_patch and pre_unpatch, gone in
    // post_unpatch; for the apply and the disable, and around the unload
    // and the load again.
    let cbs = |n: u32| run.callbacks(n);
    let on = [
        "klpv-cb klpv1 pre_patch obj=binfmt_misc live=0",
        "klpv-cb klpv1 post_patch obj=binfmt_misc live=1",
    ];
    let off = [
        "klpv-cb klpv1 pre_unpatch obj=binfmt_misc live=1",
        "klpv-cb klpv1 post_unpatch obj=binfmt_misc live=0",
    ];
    assert_eq!(cbs(3), on, "apply\n{t}");
    assert_eq!(cbs(4), off, "unload\n{t}");
    assert_eq!(cbs(5), on, "load again\n{t}");
    assert_eq!(cbs(6), [] as [&str; 0], "{t}");
    assert_eq!(cbs(7), off, "disable\n{t}");

    assert_eq!(run.result("patch-module-traced-exit")["rc"], "0", "{t}");
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(dmesg.len(), 1, "{t}");
    assert!(dmesg[0].ends_with("warnings=0"), "dmesg: {}", dmesg[0]);
}

//! The engine end to end on a real guest's memory, offline: real livepatch
//! modules (kbuild, guest-images/patches) applied to the QEMU dump through
//! a copy-on-write overlay with a synthetic arena. Checks what the guest
//! would execute: the old entry jumps to linked code whose own calls land
//! on the guest's functions; disable and replace restore exactly.
#![forbid(unsafe_code)]

use klpvisor_api::PatchState;
use klpvisor_engine::engine::{Engine, EngineError, Fault};
use klpvisor_guest::overlay::Overlay;
use klpvisor_guest::Guest;
use klpvisor_guest::GuestPhys;
use klpvisor_guest::VirtRead;

mod common;

use common::{dump as fixture, ko, ARENA};

fn entry_bytes<M: VirtRead>(mem: &M, va: u64) -> [u8; 5] {
    let mut b = [0u8; 5];
    mem.read_virt(va, &mut b).unwrap();
    b
}

/// The klpv-v1/v2 functions f, g and h: task_mem, proc_task_name,
/// cpuset_task_status_allowed.
fn klpv_funcs(k: &klpvisor_guest::Kernel) -> [u64; 3] {
    ["task_mem", "proc_task_name", "cpuset_task_status_allowed"]
        .map(|n| k.kallsyms.resolve(n, 0).unwrap())
}

fn state(e: &Engine, name: &str) -> PatchState {
    e.list()
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| p.state)
        .unwrap_or_else(|| panic!("no patch {name}"))
}

/// Commits a prepared transition that must succeed.
fn go<G: Guest + ?Sized>(
    e: &mut Engine,
    k: &klpvisor_guest::Kernel,
    g: &G,
    p: Result<klpvisor_engine::engine::Prepared, EngineError>,
) -> klpvisor_engine::engine::Committed {
    let p = p.unwrap_or_else(|err| panic!("{err}"));
    e.commit(k, g, &p).unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn sample_applies_disables_and_reapplies_exactly() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let old = k.kallsyms.resolve("cmdline_proc_show", 0).unwrap();
    let original = entry_bytes(&k.space(&g), old);
    let mut e = Engine::default();

    let p = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap();
    assert!(g.write_log().is_empty(), "prepare writes nothing");
    let done = e.commit(k, &g, &p).unwrap();
    assert_eq!(done.name, "livepatch_sample");
    let info = done.patch.as_ref().unwrap();
    assert_eq!(info.state, PatchState::Enabled);
    let func = &info.funcs[0];
    assert_eq!(
        (func.name.as_str(), func.old_addr.0),
        ("cmdline_proc_show", old)
    );
    assert!(func.live);

    // The entry now jumps to the new function, mapped executable in the
    // arena; the new function's own fentry call is a nop.
    let space = k.space(&g);
    let at = func.site.0;
    let jmp = entry_bytes(&space, at);
    assert_eq!(jmp[0], 0xe9);
    let rel = i32::from_le_bytes(jmp[1..5].try_into().unwrap());
    assert_eq!(
        at.wrapping_add(5).wrapping_add(rel as i64 as u64),
        func.new_addr.0
    );
    let t = space.translate(func.new_addr.0).unwrap();
    assert!((ARENA.0..ARENA.0 + ARENA.1).contains(&t.phys.0));
    // (After the ENDBR64 kbuild puts first in an IBT kernel's modules.)
    let new_entry = entry_bytes(&space, func.new_addr.0);
    let fentry_at = if new_entry[..4] == [0xf3, 0x0f, 0x1e, 0xfa] {
        func.new_addr.0 + 4
    } else {
        func.new_addr.0
    };
    assert_eq!(
        entry_bytes(&space, fentry_at),
        [0x0f, 0x1f, 0x44, 0x00, 0x00]
    );

    // The guest's ftrace skips the redirected entry: its record carries
    // FTRACE_FL_DISABLED while the jmp is there, and not after.
    let records = klpvisor_engine::site::FtraceRecords::load(&space, &k.kallsyms, &k.btf).unwrap();
    let flags = records.flags_word(at).expect("the entry's ftrace record");
    let disabled = klpvisor_engine::site::FTRACE_FL_DISABLED;
    assert_ne!(space.read_u64(flags).unwrap() & disabled, 0);
    assert!(!records.contains(at), "a disabled record is no patch site");

    // Disable: the original bytes, the patch listed as disabled.
    let p = e.prepare_disable(k, &g, "livepatch_sample", false).unwrap();
    e.commit(k, &g, &p).unwrap();
    assert_eq!(entry_bytes(&space, old), original);
    assert_eq!(space.read_u64(flags).unwrap() & disabled, 0);
    let l = e.list();
    assert_eq!(l[0].state, PatchState::Disabled);
    assert!(!l[0].funcs[0].live);

    // Enable again, then remove is refused while enabled.
    let p = e.prepare_enable(k, &g, "livepatch_sample", false).unwrap();
    e.commit(k, &g, &p).unwrap();
    assert_eq!(entry_bytes(&space, at), jmp);
    let err = e.remove("livepatch_sample").unwrap_err();
    assert_eq!(err.kind(), Fault::State);

    // Duplicate name refused, nothing written.
    let before = g.write_log().len();
    let err = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap_err();
    assert_eq!(err.kind(), Fault::State, "{err}");
    assert_eq!(g.write_log().len(), before);
}

#[test]
fn replace_patch_takes_over_and_bad_modules_change_nothing() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let mut e = Engine::default();
    let sample_old = k.kallsyms.resolve("cmdline_proc_show", 0).unwrap();
    let original = entry_bytes(&k.space(&g), sample_old);
    let p = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap();
    e.commit(k, &g, &p).unwrap();

    // hot-getppid is a replace patch: cmdline_proc_show goes back to the
    // original, getppid is redirected, the sample ends replaced.
    let p = e.prepare_apply(k, &g, &ko("hot-getppid"), false).unwrap();
    // Its callbacks are planned (pre_patch before the switch; it has no
    // post_patch); the replaced sample's would not run, it has none.
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    let pre: Vec<_> = p.calls().pre().into_iter().map(|c| c.kind).collect();
    assert_eq!(pre, [klpvisor_engine::callback::Kind::PrePatch]);
    assert!(p.calls().post().is_empty());
    e.commit(k, &g, &p).unwrap();
    assert_eq!(entry_bytes(&k.space(&g), sample_old), original);
    let l = e.list();
    assert_eq!(l[0].state, PatchState::Replaced);
    assert_eq!(l[1].state, PatchState::Enabled);
    assert!(l[1].replace);
    assert!(l[1].funcs.iter().all(|f| f.live));
    // The replaced patch can be removed; no stack references its code, so
    // the next sweep frees its arena space.
    e.remove("livepatch_sample").unwrap();
    assert_eq!(e.retired().len(), 1);
    // The sweep takes its struct module off the kernel's lists and frees
    // its memory.
    assert!(guest_modules(k, &g).contains(&"livepatch_sample".to_owned()));
    assert_eq!(e.sweep(k, &g).unwrap(), vec!["livepatch_sample"]);
    assert!(!guest_modules(k, &g).contains(&"livepatch_sample".to_owned()));
    assert!(e.retired().is_empty());

    // Bad modules: a clear error, no write.
    let writes = g.write_log().len();
    for (name, fault) in [
        ("bad-noold", Fault::Module),
        ("bad-ambiguous", Fault::Module),
        ("bad-sympos", Fault::Module),
        ("bad-own-key", Fault::Module),
        ("bad-module-object", Fault::Module),
        ("not-livepatch", Fault::Module),
    ] {
        let err: EngineError = e.prepare_apply(k, &g, &ko(name), false).unwrap_err();
        assert_eq!(err.kind(), fault, "{name}: {err}");
        eprintln!("{name}: {err}");
    }
    let err = e.prepare_apply(k, &g, b"not an elf", false).unwrap_err();
    assert_eq!(err.kind(), Fault::Module);
    assert_eq!(g.write_log().len(), writes, "refusals wrote nothing");
}

/// Code of a removed patch stays allocated while a task's stack holds an
/// address inside it (here a sleeping task is made to hold one after the
/// disable, as a task preempted there before the check could see it would),
/// and is freed by the first sweep after the stack moved on.
#[test]
fn retired_code_is_freed_only_when_no_stack_references_it() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let mut e = Engine::default();
    let p = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap();
    let new = e.commit(k, &g, &p).unwrap().patch.unwrap().funcs[0]
        .new_addr
        .0;
    // Not forced: a patch a forced disable took out of use stays pinned
    // and could not be removed below.
    let p = e.prepare_disable(k, &g, "livepatch_sample", false).unwrap();
    e.commit(k, &g, &p).unwrap();

    // A sleeping task "was preempted inside" the new function: the return
    // address its switch frame resumes at (inactive_task_frame.ret_addr,
    // 6 words above thread.sp) is in it. No ORC data covers patch code, so
    // the stack is scanned and the word found.
    let tasks = k.tasks(&f.guest).unwrap();
    let sleeper = tasks
        .iter()
        .find(|t| t.running.is_none() && !t.on_cpu && t.exit_state == 0 && t.pid > 1)
        .expect("a sleeping task");
    let slot = k.space(&g).translate(sleeper.saved_sp + 48).unwrap().phys;
    let mut saved = [0u8; 8];
    g.read_phys(slot, &mut saved).unwrap();
    g.write_phys(slot, &(new + 4).to_le_bytes()).unwrap();

    e.remove("livepatch_sample").unwrap();
    assert!(e.sweep(k, &g).unwrap().is_empty(), "referenced: kept");
    assert_eq!(e.retired()[0].name, "livepatch_sample");
    // The same with the stacks read before the pause (as the VMM's remove
    // does): the sleeper is not clear, so the pause judges it again.
    e.prescan_retired(k, &g);
    assert!(e.sweep(k, &g).unwrap().is_empty(), "pre-scanned: kept");

    g.write_phys(slot, &saved).unwrap();
    e.prescan_retired(k, &g);
    assert_eq!(e.sweep(k, &g).unwrap(), vec!["livepatch_sample"]);
    assert!(e.retired().is_empty());
    // Nothing retired: no pre-scan is made, the sweep frees nothing.
    e.prescan_retired(k, &g);
    assert!(e.sweep(k, &g).unwrap().is_empty());
}

/// The cumulative-replace scenario of klpv-v1/v2 (f = task_mem,
/// g = proc_task_name, h = cpuset_task_status_allowed), on real memory:
/// after v2 exactly f and h are redirected and g's entry is byte-identical
/// to the kernel's; downgrade to v1 (cumulative) and back; a patch a forced
/// transition replaced cannot come back.
#[test]
fn cumulative_replace_downgrade_and_forced_replace() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let space = k.space(&g);
    let [tf, tg, th] = klpv_funcs(k);
    let original = |a| entry_bytes(&space, a);
    let (of, og, oh) = (original(tf), original(tg), original(th));
    let live = |e: &Engine| -> Vec<(u64, String)> {
        e.live()
            .into_iter()
            .map(|l| (l.old_addr.0, l.patch))
            .collect()
    };
    let mut e = Engine::default();

    let p = e.prepare_apply(k, &g, &ko("klpv-v1"), false);
    go(&mut e, k, &g, p);
    let mut want = vec![(tf, "klpv_v1".to_owned()), (tg, "klpv_v1".to_owned())];
    want.sort();
    assert_eq!(live(&e), want);
    assert_eq!(entry_bytes(&space, th), oh);

    let p = e.prepare_apply(k, &g, &ko("klpv-v2"), false);
    go(&mut e, k, &g, p);
    let mut want = vec![(tf, "klpv_v2".to_owned()), (th, "klpv_v2".to_owned())];
    want.sort();
    assert_eq!(live(&e), want);
    assert_eq!(entry_bytes(&space, tg), og, "g is the kernel's again");
    assert_ne!(entry_bytes(&space, tf), of);
    assert_eq!(state(&e, "klpv_v1"), PatchState::Replaced);
    e.remove("klpv_v1").unwrap();

    // Downgrade to the cumulative v1 and back to v2.
    let p = e.prepare_apply(k, &g, &ko("klpv-v1r"), false);
    go(&mut e, k, &g, p);
    let mut want = vec![(tf, "klpv_v1r".to_owned()), (tg, "klpv_v1r".to_owned())];
    want.sort();
    assert_eq!(live(&e), want);
    assert_eq!(entry_bytes(&space, th), oh, "h is the kernel's again");
    assert_eq!(state(&e, "klpv_v2"), PatchState::Replaced);
    let p = e.prepare_enable(k, &g, "klpv_v2", false);
    go(&mut e, k, &g, p);
    assert_eq!(state(&e, "klpv_v1r"), PatchState::Replaced);
    assert_eq!(entry_bytes(&space, tg), og);

    // v1r brought back by force replaces v2 by force: v2 may still run on
    // some stack, so enabling it again is refused, as klp refuses it.
    let p = e.prepare_enable(k, &g, "klpv_v1r", true);
    go(&mut e, k, &g, p);
    let err = e.prepare_enable(k, &g, "klpv_v2", false).unwrap_err();
    assert_eq!(err.kind(), Fault::State);
    assert!(err.to_string().contains("forced"), "{err}");
    // It stays pinned: it cannot be removed either, and the list says why.
    assert_eq!(e.remove("klpv_v2").unwrap_err().kind(), Fault::State);
    let v2 = e.list().into_iter().find(|p| p.name == "klpv_v2").unwrap();
    assert!(v2.pinned.is_some(), "{v2:?}");

    // Disable everything: every entry is the kernel's again.
    let p = e.prepare_disable(k, &g, "klpv_v1r", false);
    go(&mut e, k, &g, p);
    assert!(e.live().is_empty());
    assert_eq!((original(tf), original(tg), original(th)), (of, og, oh));
}

/// klp's system-state rule (klp_is_patch_compatible): hot-getppid (replace)
/// introduces state 1 at version 2. A replace patch without state 1, or
/// with it at version 1, is refused with nothing written; a non-replace
/// patch need not carry it; the same state at a higher version upgrades.
#[test]
fn system_states_refuse_incompatible_patches_and_accept_upgrades() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let mut e = Engine::default();
    let p = e.prepare_apply(k, &g, &ko("state-v1"), false).unwrap();
    e.commit(k, &g, &p).unwrap();
    // Upgrade: state 1 at version 2, replacing state-v1.
    let p = e.prepare_apply(k, &g, &ko("hot-getppid"), false).unwrap();
    e.commit(k, &g, &p).unwrap();
    let writes = g.write_log().len();
    // Going back to the replaced state-v1 is a downgrade: refused.
    let err = e.prepare_enable(k, &g, "state_v1", false).unwrap_err();
    assert_eq!(err.kind(), Fault::State, "{err}");
    assert!(err.to_string().contains("older than"), "{err}");
    // So is loading it afresh once the replaced record is gone.
    e.remove("state_v1").unwrap();
    for (module, want) in [
        ("klpv-v2", "does not carry system state 1 (version 2)"),
        (
            "state-v1",
            "system state 1 at version 1, older than `hot_getppid`'s version 2",
        ),
    ] {
        let err = e.prepare_apply(k, &g, &ko(module), false).unwrap_err();
        assert_eq!(err.kind(), Fault::State, "{err}");
        assert!(err.to_string().contains(want), "{module}: {err}");
    }
    assert_eq!(g.write_log().len(), writes, "nothing written");
    // A non-replace patch without the state stacks fine.
    let p = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap();
    e.commit(k, &g, &p).unwrap();
}

/// Rollback: back before v2 (v1 enabled again, although a replace
/// disabled it, v2 kept but disabled), undo that rollback, then back to
/// before the first transition: every entry byte as it was at each point.
#[test]
fn rollback_returns_every_entry_to_an_earlier_point() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let space = k.space(&g);
    let funcs = klpv_funcs(k);
    let entries = || funcs.map(|a| entry_bytes(&space, a));
    let mut e = Engine::default();
    let original = entries();
    let p = e.prepare_apply(k, &g, &ko("klpv-v1"), false);
    go(&mut e, k, &g, p);
    let with_v1 = entries();
    let p = e.prepare_apply(k, &g, &ko("klpv-v2"), false);
    go(&mut e, k, &g, p);
    let with_v2 = entries();
    assert_ne!(with_v1, with_v2);
    assert_eq!(with_v2[1], original[1], "v2 reverted g");

    // Undo the last transition (v2's apply).
    let p = e.prepare_rollback(k, &g, None, false);
    let c = go(&mut e, k, &g, p);
    assert_eq!(c.seq, 3);
    assert_eq!(entries(), with_v1);
    assert_eq!(state(&e, "klpv_v1"), PatchState::Enabled);
    assert_eq!(state(&e, "klpv_v2"), PatchState::Disabled);
    // Undo the rollback: v2 on top of a replaced v1 again.
    let p = e.prepare_rollback(k, &g, Some(3), false);
    go(&mut e, k, &g, p);
    assert_eq!(entries(), with_v2);
    assert_eq!(state(&e, "klpv_v1"), PatchState::Replaced);
    assert_eq!(state(&e, "klpv_v2"), PatchState::Enabled);
    // Before everything: the kernel's own entries, both patches loaded.
    let p = e.prepare_rollback(k, &g, Some(1), false);
    go(&mut e, k, &g, p);
    assert_eq!(entries(), original);
    assert!(e.live().is_empty());
    let h = e.history();
    assert_eq!(
        h.iter().map(|h| h.action.as_str()).collect::<Vec<_>>(),
        ["apply", "apply", "rollback", "rollback", "rollback"]
    );
    assert_eq!(h[2].before.len(), 2);

    // Unknown transition; a patch removed since cannot come back.
    let err = e.prepare_rollback(k, &g, Some(99), false).unwrap_err();
    assert_eq!(err.kind(), Fault::NotFound, "{err}");
    e.remove("klpv_v1").unwrap();
    let writes = g.write_log().len();
    let err = e.prepare_rollback(k, &g, Some(2), false).unwrap_err();
    assert!(err.to_string().contains("has since been removed"), "{err}");
    assert_eq!(g.write_log().len(), writes, "nothing written");
}

/// klp callbacks on the real kernel's memory: the call gate installs (the
/// IDT's irq_work vector checked, layouts from BTF), a transition lists
/// the callbacks in klp's order, and sending one writes exactly the
/// mailbox, the gate's irq_work and CPU 0's raised_list head — the guest
/// (which does not run here) would take it from there.
#[test]
fn callbacks_are_ordered_and_sent_through_the_gate() {
    if common::skip_without_dump() {
        return;
    }
    use klpvisor_engine::callback::Kind;
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let mut e = Engine::default();
    let kinds = |calls: Vec<klpvisor_engine::callback::Call>| -> Vec<(String, Kind)> {
        calls.into_iter().map(|c| (c.patch, c.kind)).collect()
    };

    assert!(e.install_gate(k, &g).unwrap(), "installs once");
    assert!(!e.install_gate(k, &g).unwrap(), "and only once");
    let after_gate = g.write_log().len();

    let p = e.prepare_apply(k, &g, &ko("callbacks-v1"), false).unwrap();
    assert_eq!(
        kinds(p.calls().pre()),
        [("callbacks_v1".to_string(), Kind::PrePatch)]
    );
    assert_eq!(
        kinds(p.calls().post()),
        [("callbacks_v1".to_string(), Kind::PostPatch)]
    );
    // The load splits off; what stays is the one entry write.
    let mut p = p;
    let total = p.bytes();
    let load = p.take_load();
    assert!(!load.is_empty());
    assert_eq!(p.bytes(), total, "the load still counts");
    load.commit(&g).unwrap();
    let pre = p.calls().pre();
    let call = &pre[0];
    let func = call.func.unwrap();
    let object = call.object;

    // The gate only calls the patch's own loaded code.
    let before = g.write_log().len();
    let mut bad = call.clone();
    bad.func = Some(k.kallsyms.addr("panic").unwrap());
    let err = e.arm_call(k, &g, &p, &bad).unwrap_err();
    assert!(
        err.to_string().contains("not in that patch's loaded code"),
        "{err}"
    );
    assert_eq!(g.write_log().len(), before);

    // The guest's klp before any callback ran: no patch, no transition.
    let space = k.space(&g);
    let klp_patches = k.kallsyms.addr("klp_patches").unwrap();
    let klp_transition_patch = k.kallsyms.addr("klp_transition_patch").unwrap();
    let klp_words = || {
        [klp_patches, klp_patches + 8, klp_transition_patch].map(|va| space.read_u64(va).unwrap())
    };
    let klp_before = klp_words();
    assert_eq!(klp_before, [klp_patches, klp_patches, 0]);

    // Sending pre_patch: four writes, one of them CPU 0's raised_list,
    // and seven that show the patch to the guest's klp while it runs.
    let before = g.write_log().len();
    let armed = e.arm_call(k, &g, &p, call).unwrap();
    assert_eq!((armed.vcpu, armed.seq), (0, 1));
    let log = g.write_log();
    assert_eq!(log.len() - before, 4 + 7, "{:?}", &log[before..]);
    // klp_patches holds the patch's own struct klp_patch (its objs is the
    // object the callback gets), alone, and it is klp_transition_patch:
    // klp_get_prev_state() walks the list up to it.
    let list_off = k.btf.offset_of("klp_patch.list").unwrap();
    let [next, prev, transition] = klp_words();
    assert_eq!(next, prev, "one entry");
    assert_eq!(transition, next - list_off);
    assert_eq!(
        space
            .read_u64(transition + k.btf.offset_of("klp_patch.objs").unwrap())
            .unwrap(),
        object
    );
    let obj_list = transition + k.btf.offset_of("klp_patch.obj_list").unwrap();
    assert_eq!(
        space.read_u64(obj_list).unwrap(),
        obj_list,
        "no objects for klp"
    );
    assert!(e.klp_shown());
    let bases = klpvisor_guest::Tasks::from_kernel(&k.kallsyms, &k.btf)
        .unwrap()
        .per_cpu_bases(&space)
        .unwrap();
    let cpu = bases.iter().find(|(c, _)| *c == armed.cpu).unwrap().1;
    let head = cpu + k.kallsyms.addr("raised_list").unwrap();
    let node = space.read_u64(head).unwrap();
    // The node is the gate's irq_work, claimed, with func = the gate code
    // and the mailbox naming the callback and its klp_object.
    let node_func = space
        .read_u64(node + k.btf.offset_of("irq_work.func").unwrap())
        .unwrap();
    let flags = space
        .read_u32(node + k.btf.offset_of("irq_work.node.u_flags").unwrap())
        .unwrap();
    assert_eq!(flags, 3, "PENDING | BUSY");
    let mut code = [0u8; 4];
    space.read_virt(node_func, &mut code).unwrap();
    assert_eq!(code, [0xf3, 0x0f, 0x1e, 0xfa], "the gate's irq function");
    let mailbox = node + 256;
    assert_eq!(space.read_u64(mailbox).unwrap(), 1, "seq");
    assert_eq!(space.read_u64(mailbox + 8).unwrap(), 1, "armed");
    assert_eq!(space.read_u64(mailbox + 16).unwrap(), func);
    assert_eq!(space.read_u64(mailbox + 24).unwrap(), object);
    assert_eq!(
        e.poll_call(&g, &armed).unwrap(),
        klpvisor_engine::callback::gate::Progress::Armed
    );
    // A second call while this one is in the guest is refused, unwritten.
    let before = g.write_log().len();
    let err = e.arm_call(k, &g, &p, call).unwrap_err();
    assert!(err.to_string().contains("still in the guest"), "{err}");
    assert_eq!(g.write_log().len(), before);
    // (The gate's pages came before the patch's: preparing after the gate
    // kept them.)
    assert!(after_gate > 0);

    // When the transition's callbacks are over, every klp word goes back.
    e.hide_klp(k, &g).unwrap();
    assert_eq!(klp_words(), klp_before);
    assert!(!e.klp_shown());

    // Disabling runs the unpatch pair; a replace runs only its own.
    e.commit(k, &g, &p).unwrap();
    let d = e.prepare_disable(k, &g, "callbacks_v1", false).unwrap();
    assert_eq!(
        kinds(d.calls().pre()),
        [("callbacks_v1".to_string(), Kind::PreUnpatch)]
    );
    let r = e.prepare_apply(k, &g, &ko("callbacks-v2"), false).unwrap();
    assert_eq!(
        kinds(r.calls().pre()),
        [("callbacks_v2".to_string(), Kind::PrePatch)],
        "the replaced patch's callbacks do not run"
    );
}

/// A signed module, checked the way the VMM checks it: the engine gets
/// exactly the module kbuild wrote (every byte the same, so the same
/// writes land) and the patch records how it was signed.
#[test]
fn signed_module_applies_stripped_and_lists_its_signature() {
    if common::skip_without_dump() {
        return;
    }
    use klpvisor_engine::signature::{sign, Policy, SecretKey, TrustedKeys};
    let f = fixture();
    let k = &f.kernel;
    let key = SecretKey::from_seed([7; 32]);
    let module = ko("livepatch-sample");
    let signed = sign(&module, &key).unwrap();
    let policy = Policy::RequireSigned(TrustedKeys::from_keys([(
        key.public(),
        "release.pub".to_owned(),
    )]));
    let checked = policy.check(&signed).unwrap();
    assert_eq!(checked.module, &module[..], "the parser sees the original");

    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let mut e = Engine::default();
    let mut p = e.prepare_apply(k, &g, checked.module, false).unwrap();
    p.set_signature(
        checked.provenance.to_string(),
        checked.provenance.verified_level(),
    );
    let done = e.commit(k, &g, &p).unwrap();
    let want = format!("verified: {} (release.pub), level 0", key.id());
    assert_eq!(done.patch.unwrap().signature, want);
    assert_eq!(e.list()[0].signature, want);

    // The same writes as the unsigned module's.
    let plain = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let mut e2 = Engine::default();
    let p2 = e2.prepare_apply(k, &plain, &module, false);
    go(&mut e2, k, &plain, p2);
    assert_eq!(g.write_log(), plain.write_log());
    for (gpa, len) in g.write_log() {
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        g.read_phys(GuestPhys(gpa), &mut a).unwrap();
        plain.read_phys(GuestPhys(gpa), &mut b).unwrap();
        assert_eq!(a, b, "bytes written at {gpa:#x}");
    }
    assert_eq!(e2.list()[0].signature, "unsigned");
}

/// The names on the guest kernel's `modules` list, as /proc/modules
/// would show them (read by the guest crate's module reader).
fn guest_modules<G: klpvisor_guest::Guest + ?Sized>(
    k: &klpvisor_guest::Kernel,
    g: &G,
) -> Vec<String> {
    k.modules(g).unwrap().into_iter().map(|m| m.name).collect()
}

/// A patch with objects for vmlinux, the loaded pvpanic module and the
/// absent dummy module, on real memory: one transition redirects
/// cmdline_proc_show and pvpanic's capability_show (its ftrace nop in
/// module text), dummy is listed as waiting; disable restores both entries
/// byte for byte (refused, unwritten, while the module looks unloaded); a
/// function its module lacks is refused, nothing written.
#[test]
fn module_object_applies_in_the_same_transition_and_absent_module_waits() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let space = k.space(&g);
    let modules = k.modules(&g).unwrap();
    let pvpanic = modules.iter().find(|m| m.name == "pvpanic").unwrap();
    let show = pvpanic.lookup("capability_show")[0].symbol.addr;
    let cmdline = k.kallsyms.resolve("cmdline_proc_show", 0).unwrap();
    let (orig_show, orig_cmdline) = (entry_bytes(&space, show), entry_bytes(&space, cmdline));
    let mut e = Engine::default();

    let writes = g.write_log().len();
    let err = e
        .prepare_apply(k, &g, &ko("bad-module-object"), false)
        .unwrap_err();
    assert_eq!(err.kind(), Fault::Module, "{err}");
    assert!(err.to_string().contains("pvpanic"), "{err}");
    assert_eq!(g.write_log().len(), writes);

    let p = e.prepare_apply(k, &g, &ko("module-pvpanic"), false);
    let c = go(&mut e, k, &g, p);
    let info = c.patch.unwrap();
    let objects: Vec<_> = info
        .objects
        .iter()
        .map(|o| (o.name.as_str(), o.state, o.funcs))
        .collect();
    use klpvisor_api::ObjectState::{Linked, Waiting};
    assert_eq!(
        objects,
        [
            ("vmlinux", Linked, 1),
            ("pvpanic", Linked, 1),
            ("dummy", Waiting, 1)
        ]
    );
    let funcs: Vec<_> = info
        .funcs
        .iter()
        .map(|f| (f.object.as_str(), f.name.as_str(), f.old_addr.0, f.live))
        .collect();
    assert_eq!(
        funcs,
        [
            ("vmlinux", "cmdline_proc_show", cmdline, true),
            ("pvpanic", "capability_show", show, true)
        ]
    );
    // Both entries jump to their new functions (past an ENDBR on 6.12).
    for fi in &info.funcs {
        let site = fi.site.0;
        let b = entry_bytes(&space, site);
        assert_eq!(b[0], 0xe9, "{}: {b:02x?}", fi.name);
        let rel = i32::from_le_bytes(b[1..5].try_into().unwrap());
        assert_eq!(
            (site + 5).wrapping_add_signed(i64::from(rel)),
            fi.new_addr.0
        );
        assert!(pvpanic.text.contains(&site) || fi.object == "vmlinux");
    }

    // pvpanic "unloaded" (its struct module renamed, as if another module
    // stood there): a transition writing its text is refused, unwritten.
    let name_at = pvpanic.addr + k.btf.offset_of("module.name").unwrap();
    let name_gpa = space.translate(name_at).unwrap().phys;
    g.write_phys(name_gpa, b"pvpaniX").unwrap();
    let writes = g.write_log().len();
    let p = e
        .prepare_disable(k, &g, "module_pvpanic", false)
        .unwrap_or_else(|err| panic!("{err}"));
    let err = e.commit(k, &g, &p).unwrap_err();
    assert!(
        matches!(err, EngineError::ModuleGone(ref m) if m == "pvpanic"),
        "{err}"
    );
    assert_eq!(err.kind(), Fault::State);
    assert_eq!(g.write_log().len(), writes, "nothing written");
    assert_eq!(state(&e, "module_pvpanic"), PatchState::Enabled);
    g.write_phys(name_gpa, b"pvpanic").unwrap();

    let p = e.prepare_disable(k, &g, "module_pvpanic", false);
    go(&mut e, k, &g, p);
    assert_eq!(entry_bytes(&space, show), orig_show);
    assert_eq!(entry_bytes(&space, cmdline), orig_cmdline);
    assert_eq!(state(&e, "module_pvpanic"), PatchState::Disabled);
    let p = e.prepare_enable(k, &g, "module_pvpanic", false);
    go(&mut e, k, &g, p);
    assert!(e.list()[0].funcs.iter().all(|f| f.live));
}

/// Modules that unload and load while patches are loaded, on real memory
/// (klp's klp_module_going and klp_module_coming, which the VMM runs when
/// the guest stops in klpvisor's hooks): the hooks redirect both
/// functions' entries; pvpanic "unloading" gives capability_show its
/// original bytes back and its object waits; "loading" again links it and
/// redirects it once more, vmlinux's function untouched throughout. A
/// patch whose object cannot be linked when its module comes refuses the
/// load with nothing written.
#[test]
fn a_module_object_follows_its_module_going_and_coming() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let space = k.space(&g);
    let modules = k.modules(&g).unwrap();
    let pvpanic = modules.iter().find(|m| m.name == "pvpanic").unwrap();
    let show = pvpanic.lookup("capability_show")[0].symbol.addr;
    let orig_show = entry_bytes(&space, show);
    let mut e = Engine::default();

    // The hooks: both functions' entries jump into one arena page.
    assert!(e.install_hooks(k, &g).unwrap());
    assert!(!e.install_hooks(k, &g).unwrap(), "installed once");
    let mut stubs = Vec::new();
    for name in ["klp_module_coming", "klp_module_going"] {
        let func = k.kallsyms.resolve(name, 0).unwrap();
        let at = (0..16u64)
            .map(|i| func + i)
            .find(|&a| entry_bytes(&space, a)[0] == 0xe9)
            .unwrap_or_else(|| panic!("{name} not redirected"));
        let b = entry_bytes(&space, at);
        let rel = i32::from_le_bytes(b[1..5].try_into().unwrap());
        stubs.push((at + 5).wrapping_add_signed(i64::from(rel)));
    }
    assert_eq!(stubs[1] - stubs[0], klpvisor_engine::hook::GOING_AT);
    let t = space.translate(stubs[0]).unwrap();
    assert!(
        (ARENA.0..ARENA.0 + ARENA.1).contains(&t.phys.0),
        "the stubs are in the arena"
    );

    let p = e.prepare_apply(k, &g, &ko("module-pvpanic"), false);
    go(&mut e, k, &g, p);
    let live = |e: &Engine| -> Vec<(String, bool)> {
        e.list()[0]
            .funcs
            .iter()
            .map(|f| (f.name.clone(), f.live))
            .collect()
    };
    let objects = |e: &Engine| -> Vec<(String, klpvisor_api::ObjectState)> {
        e.list()[0]
            .objects
            .iter()
            .map(|o| (o.name.clone(), o.state))
            .collect()
    };
    use klpvisor_api::ObjectState::{Linked, Waiting};
    // Its site: past the ENDBR on 6.12.
    let site = e.list()[0]
        .funcs
        .iter()
        .find(|f| f.name == "capability_show")
        .unwrap()
        .site
        .0;
    let cmdline_site = e.list()[0]
        .funcs
        .iter()
        .find(|f| f.name == "cmdline_proc_show")
        .unwrap()
        .site
        .0;
    assert_eq!(entry_bytes(&space, site)[0], 0xe9);
    let redirected = entry_bytes(&space, site);

    // The hooks run for a module that is GOING (klp_module_going) or
    // COMING (klp_module_coming); pvpanic's state is set as the loader
    // would have it. A live module is neither: nothing happens.
    let state_at = pvpanic.addr + k.btf.offset_of("module.state").unwrap();
    let state_gpa = space.translate(state_at).unwrap().phys;
    let set_state = |v: u32| g.write_phys(state_gpa, &v.to_le_bytes()).unwrap();
    let writes = g.write_log().len();
    assert_eq!(e.module_going(k, &g, pvpanic.addr).unwrap().sites, 0);
    assert!(e
        .module_coming(k, &g, pvpanic.addr)
        .unwrap()
        .patches
        .is_empty());
    assert_eq!(g.write_log().len(), writes, "a live module is left alone");

    // Going: the entry gets its nop back, the object waits.
    set_state(2);
    let ev = e.module_going(k, &g, pvpanic.addr).unwrap();
    assert_eq!(ev.module, "pvpanic");
    assert_eq!(ev.patches, [("module_pvpanic".to_owned(), 1)]);
    assert_eq!(ev.sites, 1);
    assert_eq!(entry_bytes(&space, show), orig_show);
    assert_eq!(
        entry_bytes(&space, cmdline_site)[0],
        0xe9,
        "vmlinux stays patched"
    );
    assert_eq!(live(&e), [("cmdline_proc_show".to_owned(), true)]);
    assert_eq!(objects(&e)[1], ("pvpanic".to_owned(), Waiting));
    assert!(e.waits_for("pvpanic") && !e.holds(pvpanic.addr, Some("pvpanic")));
    // A second going finds nothing to do.
    let writes = g.write_log().len();
    assert_eq!(e.module_going(k, &g, pvpanic.addr).unwrap().sites, 0);
    assert_eq!(g.write_log().len(), writes);

    // Coming: linked against the module again and redirected before any
    // of its code would run.
    set_state(1);
    let ev = e.module_coming(k, &g, pvpanic.addr).unwrap();
    assert_eq!(ev.patches, [("module_pvpanic".to_owned(), 1)]);
    assert_eq!(entry_bytes(&space, site), redirected);
    assert_eq!(objects(&e)[1], ("pvpanic".to_owned(), Linked));
    assert!(live(&e).iter().all(|(_, l)| *l), "{:?}", live(&e));
    // A module no patch waits for (pvpanic-mmio, "coming"): nothing
    // changes.
    let other = modules.iter().find(|m| m.name != "pvpanic").unwrap();
    let other_state = space
        .translate(other.addr + k.btf.offset_of("module.state").unwrap())
        .unwrap()
        .phys;
    g.write_phys(other_state, &1u32.to_le_bytes()).unwrap();
    let writes = g.write_log().len();
    let ev = e.module_coming(k, &g, other.addr).unwrap();
    assert!(ev.patches.is_empty(), "{ev:?}");
    assert_eq!(g.write_log().len(), writes, "nothing written");
    g.write_phys(other_state, &0u32.to_le_bytes()).unwrap();

    set_state(0);
    // Disable and enable still treat the module's function as any other.
    let p = e.prepare_disable(k, &g, "module_pvpanic", false);
    go(&mut e, k, &g, p);
    assert_eq!(entry_bytes(&space, show), orig_show);

    // A patch whose pvpanic object names a function pvpanic lacks, applied
    // while pvpanic looks absent (its name changed): it waits. When pvpanic
    // "comes", the load is refused and nothing is written.
    let name_at = pvpanic.addr + k.btf.offset_of("module.name").unwrap();
    let name_gpa = space.translate(name_at).unwrap().phys;
    g.write_phys(name_gpa, b"pvpaniX").unwrap();
    let p = e.prepare_apply(k, &g, &ko("bad-module-object"), false);
    go(&mut e, k, &g, p);
    g.write_phys(name_gpa, b"pvpanic").unwrap();
    set_state(1);
    let writes = g.write_log().len();
    let err = e.module_coming(k, &g, pvpanic.addr).unwrap_err();
    assert!(
        matches!(err, EngineError::ModuleRefused { ref module, .. } if module == "pvpanic"),
        "{err}"
    );
    assert!(
        err.to_string().contains("bad_module_object") || err.to_string().contains("pvpanic"),
        "{err}"
    );
    assert_eq!(g.write_log().len(), writes, "nothing written");
    e.note_refused("pvpanic", &err.to_string());
    let bad = e
        .list()
        .into_iter()
        .find(|p| p.name != "module_pvpanic")
        .unwrap();
    let o = bad.objects.iter().find(|o| o.name == "pvpanic").unwrap();
    assert_eq!(o.state, Waiting);
    assert!(
        o.refused
            .as_deref()
            .is_some_and(|r| r.contains("cannot be patched")),
        "{o:?}"
    );
}

/// A tracepoint in patch code (trace-itimer): the patch's entries join the
/// tracepoint's static key's list as a module's would, with a second
/// member holding the kernel's own entries; the site is left a nop while
/// the event is off. When the patch's code is freed the list folds back
/// into the key, word for word as before.
#[test]
fn a_tracepoint_in_patch_code_joins_its_keys_list_and_leaves_it() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let space = k.space(&g);
    let tp = k.kallsyms.resolve("__tracepoint_itimer_state", 0).unwrap();
    let key = tp + k.btf.offset_of("tracepoint.key").unwrap();
    let word = |va: u64| space.read_u64(va).unwrap();
    let (enabled, before) = (word(key) as u32, word(key + 8));
    assert_eq!(enabled, 0, "the event is off in the dumped guest");
    assert_eq!(before & 2, 0, "no module uses this key in the dumped guest");

    let mut e = Engine::default();
    let p = e.prepare_apply(k, &g, &ko("trace-itimer"), false);
    go(&mut e, k, &g, p);
    let linked = word(key + 8);
    assert_eq!(linked & 3, 2 | (before & 1), "LINKED, initial value kept");
    // GET /patches says what the kernel now follows.
    let info = e
        .list()
        .into_iter()
        .find(|p| p.name == "trace_itimer")
        .unwrap();
    let m = info.module.expect("registered as a guest module");
    assert_eq!((m.static_keys, m.static_key_sites), (1, 1));
    assert!(m.orc_entries > 0 && m.symbols > 0);
    let ours = linked & !3;
    let holder = word(ours);
    assert_ne!(word(ours + 16), 0, "our entry names our struct module");
    let entries = word(ours + 8);
    assert_eq!(word(holder), 0, "the holder ends the list");
    assert_eq!(word(holder + 8), before & !3, "the kernel's own entries");
    assert_eq!(word(holder + 16), 0, "vmlinux: no module");
    // Our first entry is for this key, and its site holds one of the
    // kernel's nops (the key is off): the kernel will flip it when enabled.
    let rel = |va: u64| va.wrapping_add(word(va) as i32 as i64 as u64);
    let entry_key = entries + 8;
    assert_eq!(entry_key.wrapping_add(word(entry_key)) & !3, key);
    let site = rel(entries);
    let b = entry_bytes(&space, site);
    assert!(
        b[..2] == [0x66, 0x90] || b == [0x0f, 0x1f, 0x44, 0x00, 0x00],
        "{b:x?}"
    );

    let p = e.prepare_disable(k, &g, "trace_itimer", false).unwrap();
    e.commit(k, &g, &p).unwrap();
    e.remove("trace_itimer").unwrap();
    assert_eq!(e.sweep(k, &g).unwrap(), vec!["trace_itimer"]);
    assert_eq!(word(key + 8), before, "folded back into the key");
}

/// A patch whose module_exit does more than klp's modules should (the
/// kernel's shadow-variable sample frees its variables there) is applied
/// with a warning saying that work never happens: klpvisor runs neither
/// module_init nor module_exit.
#[test]
fn a_patch_whose_exit_does_work_is_applied_with_a_warning() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let mut e = Engine::default();
    let p = e
        .prepare_apply(&f.kernel, &g, &ko("shadow-fix1"), false)
        .unwrap();
    assert_eq!(p.warnings().len(), 1, "{:?}", p.warnings());
    let w = &p.warnings()[0];
    assert!(
        w.starts_with("its module_exit also calls `klp_shadow_free_all`: klpvisor never runs"),
        "{w}"
    );
    let p = e
        .prepare_apply(&f.kernel, &g, &ko("livepatch-sample"), false)
        .unwrap();
    assert_eq!(p.warnings(), [] as [String; 0]);
}

/// Anti-rollback: with levels enforced, nothing signed below the highest
/// level applied comes back, by apply, enable or rollback; without, it
/// does.
#[test]
fn a_lower_signed_level_cannot_come_back_when_levels_are_enforced() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let k = &f.kernel;
    for enforced in [true, false] {
        let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
        let mut e = Engine::default();
        if enforced {
            e.enforce_levels();
            assert_eq!(e.level_floor(), Some(0));
        }
        let apply = |e: &mut Engine, name: &str, level: u16| {
            let mut p = e.prepare_apply(k, &g, &ko(name), false).unwrap();
            p.set_signature(format!("verified: test, level {level}"), Some(level));
            e.check_levels(&p).map(|()| p)
        };
        // The sample at level 1, disabled, then hot-getppid at level 2.
        let p = apply(&mut e, "livepatch-sample", 1);
        go(&mut e, k, &g, p);
        let p = e.prepare_disable(k, &g, "livepatch_sample", false);
        go(&mut e, k, &g, p);
        let p = apply(&mut e, "hot-getppid", 2);
        go(&mut e, k, &g, p);
        let refused = |r: Result<klpvisor_engine::engine::Prepared, EngineError>| match r {
            Err(EngineError::Downgrade {
                level: 1,
                highest: 2,
                ..
            }) => true,
            Err(other) => panic!("{other}"),
            Ok(_) => false,
        };
        // Enabling the sample again, or a rollback to before its disable
        // (which enables it), is refused for its level before anything
        // else.
        let r = e
            .prepare_enable(k, &g, "livepatch_sample", false)
            .and_then(|p| e.check_levels(&p).map(|()| p));
        assert_eq!(refused(r), enforced);
        let r = e
            .prepare_rollback(k, &g, Some(2), false)
            .and_then(|p| e.check_levels(&p).map(|()| p));
        assert_eq!(refused(r), enforced);
        if enforced {
            assert_eq!(e.level_floor(), Some(2));
            let r = apply(&mut e, "klpv-v1", 1);
            let msg = r
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                msg.contains(
                    "signed at level 1, lower than level 2 already applied (by `hot_getppid`)"
                ),
                "{msg}"
            );
            // A patch at the highest level, or above, still applies.
            let p = apply(&mut e, "klpv-v1", 3);
            go(&mut e, k, &g, p);
            assert_eq!(e.level_floor(), Some(3));
        }
    }
}

/// Per-CPU variables of the patch's own (percpu-uptime: one `unsigned
/// long`, 1000 on every CPU): the first plan asks for a per-CPU block and
/// is never written; with one (here the start of the first chunk's
/// reserved area, `__per_cpu_end`, where the guest's allocator puts
/// modules' blocks) the load copies the initial value into every possible
/// CPU's copy, and the patch's `struct module` records the block. Once the
/// patch's code is freed, its block is queued to be freed in the guest.
#[test]
fn per_cpu_variables_get_a_block_copied_to_every_possible_cpu() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let space = k.space(&g);
    let mut e = Engine::default();
    let first = e.prepare_apply(k, &g, &ko("percpu-uptime"), false).unwrap();
    assert!(first.needs_percpu());
    let err = e.commit(k, &g, &first).unwrap_err();
    assert_eq!(err.kind(), Fault::Internal, "{err}");

    let block = k
        .kallsyms
        .addr("__per_cpu_end")
        .unwrap()
        .next_multiple_of(8);
    e.percpu_allocated(&first, block).unwrap();
    let p = e.prepare_apply(k, &g, &ko("percpu-uptime"), false).unwrap();
    assert!(!p.needs_percpu());
    go(&mut e, k, &g, Ok(p));

    // Every possible CPU's copy holds the initial value.
    let n = space
        .read_u32(k.kallsyms.addr("nr_cpu_ids").unwrap())
        .unwrap();
    let mask = k.kallsyms.addr("__cpu_possible_mask").unwrap();
    let offsets = k.kallsyms.addr("__per_cpu_offset").unwrap();
    let mut copies = 0;
    for cpu in 0..u64::from(n) {
        if space.read_u64(mask + cpu / 64 * 8).unwrap() & (1 << (cpu % 64)) == 0 {
            continue;
        }
        let base = space.read_u64(offsets + cpu * 8).unwrap();
        assert_eq!(space.read_u64(base + block).unwrap(), 1000, "CPU {cpu}");
        copies += 1;
    }
    assert!(copies >= 1);

    // GET /patches and the guest's struct module show the block.
    let info = e
        .list()
        .into_iter()
        .find(|p| p.name == "percpu_uptime")
        .unwrap();
    let m = info.module.expect("registered as a guest module");
    assert_eq!(m.percpu.map(|h| h.0), Some(block));
    assert_eq!(m.percpu_size, 8);
    let at = |f: &str| m.address.0 + k.btf.offset_of(f).unwrap();
    assert_eq!(space.read_u64(at("module.percpu")).unwrap(), block);
    assert_eq!(space.read_u32(at("module.percpu_size")).unwrap(), 8);

    // Removed and swept: the block waits to be freed through the gate.
    let p = e.prepare_disable(k, &g, "percpu_uptime", false).unwrap();
    e.commit(k, &g, &p).unwrap();
    e.remove("percpu_uptime").unwrap();
    assert_eq!(e.percpu_frees(), 0, "not before its code is freed");
    assert_eq!(e.sweep(k, &g).unwrap(), vec!["percpu_uptime"]);
    assert_eq!(e.percpu_frees(), 1);
}

/// A function redirected through the guest's own ftrace, as klp redirects
/// it: its `ftrace_ops` written into an arena slot and registered through
/// the gate before the switch (the test plays the guest's kworker), the
/// switch the ops' `private` word, the entry never written (ftrace owns
/// it); disable and enable flip the word; a removal lets the ops go.
#[test]
fn a_redirect_through_ftrace_switches_a_word_and_leaves_the_entry_to_ftrace() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let k = &f.kernel;
    let space = k.space(&g);
    let old = k.kallsyms.resolve("cmdline_proc_show", 0).unwrap();
    let original = entry_bytes(&space, old);
    let sym = |n: &str| k.kallsyms.addr(n).unwrap();
    let mut e = Engine::default();
    e.install_gate(k, &g).unwrap();
    let mailbox = e.gate_info().unwrap().data_gpa.0 + 256;
    let word = |gpa: u64| {
        let mut b = [0u8; 8];
        g.read_phys(GuestPhys(gpa), &mut b).unwrap();
        u64::from_le_bytes(b)
    };
    // What the guest does with a call: run it, store 0, mark it done,
    // release the irq_work.
    let irq_flags = k.btf.offset_of("irq_work.node.u_flags").unwrap();
    let finish = |ret: u64| {
        g.write_phys(GuestPhys(mailbox + 32), &ret.to_le_bytes())
            .unwrap();
        g.write_phys(GuestPhys(mailbox + 8), &4u64.to_le_bytes())
            .unwrap();
        g.write_phys(GuestPhys(mailbox - 256 + irq_flags), &[0; 4])
            .unwrap();
    };

    if let Err(why) = klpvisor_engine::ftrace_ops::Support::probe(k) {
        panic!("{why}");
    }
    let p = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap();
    assert!(p.wants_ops());
    e.install_ops(k, &g, &p).unwrap();
    let p = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap();
    // The plan switches through the slot: not before ftrace registered it.
    let before = g.write_log().len();
    let err = e.commit(k, &g, &p).unwrap_err().to_string();
    assert!(err.contains("has not registered"), "{err}");
    assert_eq!(g.write_log().len(), before, "nothing written");
    let (mut steps, mut sites) = (Vec::new(), Vec::new());
    while e.arm_ops(k, &g, &p).unwrap().is_some() {
        let (func, step) = e.ops_armed().unwrap();
        steps.push((func, step, word(mailbox + 16), word(mailbox + 24)));
        sites.push(word(mailbox + 48));
        finish(0);
        e.ops_done(0).unwrap();
    }
    let ops = steps[0].3;
    let mut first = [0u8; 4];
    space.read_virt(old, &mut first).unwrap();
    let at = old
        + if first == [0xf3, 0x0f, 0x1e, 0xfa] {
            4
        } else {
            0
        };
    assert_eq!(
        steps,
        [
            (
                "cmdline_proc_show".to_string(),
                "ftrace_set_filter_ip",
                sym("ftrace_set_filter_ip"),
                ops
            ),
            (
                "cmdline_proc_show".to_string(),
                "register_ftrace_function",
                sym("register_ftrace_function"),
                ops
            ),
        ]
    );
    // The filter names the function's ftrace site (after its endbr64 on
    // a kernel built with IBT).
    assert_eq!(sites, [at, 0]);
    // The ops the guest was given: the handler, klp's flags, no target.
    let off = |f: &str| k.btf.offset_of(f).unwrap();
    let handler = space.read_u64(ops + off("ftrace_ops.func")).unwrap();
    let mut code = [0u8; 4];
    space.read_virt(handler, &mut code).unwrap();
    assert_eq!(code, [0xf3, 0x0f, 0x1e, 0xfa]);
    let flag = |n: &str| k.btf.enumerator(n).unwrap() as u64;
    assert_eq!(
        space.read_u64(ops + off("ftrace_ops.flags")).unwrap(),
        flag("FTRACE_OPS_FL_SAVE_REGS")
            | flag("FTRACE_OPS_FL_IPMODIFY")
            | flag("FTRACE_OPS_FL_RECURSION")
            | flag("FTRACE_OPS_FL_PERMANENT")
    );
    let private = ops + off("ftrace_ops.private");
    assert_eq!(
        space.read_u64(private).unwrap(),
        0,
        "inert until the switch"
    );

    // The switch: the word, not the entry.
    let p = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap();
    assert!(!p.wants_ops());
    let done = go(&mut e, k, &g, Ok(p));
    let func = &done.patch.as_ref().unwrap().funcs[0];
    assert_eq!(func.ftrace_ops.map(|h| h.0), Some(ops));
    assert!(func.live);
    assert_eq!(space.read_u64(private).unwrap(), func.new_addr.0);
    assert_eq!(entry_bytes(&space, old), original, "ftrace's entry");

    // Disabled: the word goes back to 0 in the switch; then, as klp does
    // once no patch redirects the function, the ops is unregistered and
    // its filter freed.
    let d = e.prepare_disable(k, &g, "livepatch_sample", false);
    go(&mut e, k, &g, d);
    assert_eq!(space.read_u64(private).unwrap(), 0);
    assert_eq!(e.ops_releases(), 1);
    let mut released = Vec::new();
    while let Some((_, what)) = e.arm_ops_release(k, &g).unwrap() {
        released.push((what, word(mailbox + 16), word(mailbox + 24)));
        finish(0);
        e.ops_done(0).unwrap();
    }
    assert_eq!(
        released,
        [
            (
                "unregister_ftrace_function of cmdline_proc_show".to_string(),
                sym("unregister_ftrace_function"),
                ops
            ),
            (
                "ftrace_free_filter of cmdline_proc_show".to_string(),
                sym("ftrace_free_filter"),
                ops
            ),
        ]
    );
    assert_eq!(e.ops_releases(), 0);
    assert_eq!(entry_bytes(&space, old), original);
    // Enabled again: registered again first.
    let again = e.prepare_enable(k, &g, "livepatch_sample", false).unwrap();
    assert!(again.wants_ops());
    e.remove("livepatch_sample").unwrap();

    // A guest whose ftrace refuses the registration (in-guest klp owns
    // the function): the apply fails naming the function and the reason,
    // and the slot is let go.
    let p = e
        .prepare_apply(k, &g, &ko("livepatch-sample"), false)
        .unwrap();
    assert!(p.wants_ops());
    e.install_ops(k, &g, &p).unwrap();
    e.arm_ops(k, &g, &p).unwrap().unwrap();
    finish(0);
    e.ops_done(0).unwrap();
    e.arm_ops(k, &g, &p).unwrap().unwrap();
    finish((-16i64) as u64);
    let err = e.ops_done((-16i64) as u64).unwrap_err().to_string();
    assert!(
        err.contains("cmdline_proc_show") && err.contains("-EBUSY"),
        "{err}"
    );
    assert_eq!(e.ops_releases(), 1, "its filter is freed");
}

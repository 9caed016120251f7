//! The safe-point check on a real guest, offline: the QEMU dump of the test
//! guest (see guest/tests/dump_introspect.rs) with every task stopped where
//! it was, checked as a transition would check it.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use klpvisor_guest::{DumpGuest, Kernel, Task};

mod common;

use common::open_dump;

struct Fixture {
    dir: PathBuf,
    guest: DumpGuest,
    kernel: Kernel,
}

/// Opens the dump once per test binary.
/// The check for `spans` as the engine makes it: knowing each CPU's entry
/// stack (a task dumped there has no kernel frame).
fn engine_check<M: klpvisor_guest::VirtRead + ?Sized>(
    k: &klpvisor_guest::Kernel,
    mem: &M,
    spans: Vec<klpvisor_engine::safepoint::Span>,
) -> klpvisor_engine::safepoint::Check {
    use klpvisor_engine::safepoint::{entry_stack_sp0, entry_stacks, Check};
    let walker = klpvisor_guest::Tasks::from_kernel(&k.kallsyms, &k.btf).unwrap();
    let bases = walker.per_cpu_bases(mem).unwrap();
    let sp0 = entry_stack_sp0(&k.kallsyms, &k.btf).expect("the kernel's entry stacks");
    let entry = entry_stacks(mem, &bases, sp0);
    assert_eq!(entry.len(), bases.len(), "one entry stack per CPU");
    Check::new(spans).with_entry_stacks(entry)
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (dir, guest, kernel) = open_dump();
        Fixture { dir, guest, kernel }
    })
}

fn role_pid(f: &Fixture, name: &str) -> i32 {
    common::role_pid(&f.dir, name)
}

/// The safe-point check on a real guest: every sleeping task sleeps in
/// `__schedule`, so a transition changing it is blocked by all of them
/// (and the vCPU spinning in user mode by none); a function nobody is in
/// blocks nobody.
#[test]
fn safepoint_check_finds_sleepers_in_schedule_and_nobody_in_cmdline_proc_show() {
    if common::skip_without_dump() {
        return;
    }
    use klpvisor_engine::safepoint::{hardirq_stack_ptr, irq_stacks_sized, Seen, Span};
    let f = fixture();
    let k = &f.kernel;
    let space = k.space(&f.guest);
    let tasks = k.tasks(&f.guest).unwrap();
    let regs = klpvisor_guest::all_vcpu_regs(&f.guest).unwrap();
    let walker = klpvisor_guest::Tasks::from_kernel(&k.kallsyms, &k.btf).unwrap();
    let bases = walker.per_cpu_bases(&space).unwrap();
    let irq = irq_stacks_sized(
        &space,
        &bases,
        hardirq_stack_ptr(&k.kallsyms, &k.btf).unwrap(),
        walker.layout.thread_size,
    );
    assert_eq!(irq.len(), bases.len(), "one IRQ stack per CPU");
    let span = |name: &str| {
        let a = k.kallsyms.resolve(name, 0).unwrap();
        Span {
            range: k.kallsyms.extent(a).unwrap(),
            name: name.into(),
        }
    };
    let sched = engine_check(k, &space, vec![span("__schedule")]);
    let b = sched.blockers(&space, &tasks, &regs, &irq).unwrap();
    let sleeping: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.running.is_none() && t.state_char() != 'R')
        .collect();
    for t in &sleeping {
        assert!(
            b.iter()
                .any(|b| b.pid == t.pid && matches!(b.seen, Seen::Stack { .. })),
            "sleeping pid {} ({}) not found in __schedule",
            t.pid,
            t.comm
        );
    }
    let spinner = role_pid(f, "spinner");
    assert!(
        !b.iter().any(|b| b.pid == spinner),
        "the user-mode spinner has an empty kernel stack"
    );
    let none = engine_check(k, &space, vec![span("cmdline_proc_show")]);
    assert!(none
        .blockers(&space, &tasks, &regs, &irq)
        .unwrap()
        .is_empty());
    eprintln!(
        "__schedule: {} blocking entries over {} sleeping tasks",
        b.len(),
        sleeping.len()
    );
}

/// ORC-judged safe points are precise: a stale word that merely looks like
/// an address in a function (here forged into a sleeping task's saved r15
/// slot) blocks the conservative scan but not the unwound check, while the
/// real frames (__schedule, for every sleeper) block both.
#[test]
fn orc_safe_points_ignore_stale_words_and_keep_real_frames() {
    if common::skip_without_dump() {
        return;
    }
    use klpvisor_engine::safepoint::{hardirq_stack_ptr, irq_stacks_sized, Seen, Span};
    use klpvisor_guest::orc::Orc;
    use klpvisor_guest::overlay::Overlay;
    use klpvisor_guest::DumpGuest;
    use klpvisor_guest::Guest;
    let f = fixture();
    let k = &f.kernel;
    let g: Overlay<'_, DumpGuest> = Overlay::new(&f.guest);
    let space = k.space(&g);
    let orc = Orc::load_btf(&space, &k.kallsyms, &k.btf).unwrap();
    let span = |name: &str| {
        let a = k.kallsyms.resolve(name, 0).unwrap();
        Span {
            range: k.kallsyms.extent(a).unwrap(),
            name: name.into(),
        }
    };
    let regs = klpvisor_guest::all_vcpu_regs(&g).unwrap();
    let tasks = k.tasks(&g).unwrap();
    let walker = klpvisor_guest::Tasks::from_kernel(&k.kallsyms, &k.btf).unwrap();
    let irq = irq_stacks_sized(
        &space,
        &walker.per_cpu_bases(&space).unwrap(),
        hardirq_stack_ptr(&k.kallsyms, &k.btf).unwrap(),
        walker.layout.thread_size,
    );
    let sleeper = tasks
        .iter()
        .find(|t| t.running.is_none() && !t.on_cpu && t.exit_state == 0 && t.pid > 1)
        .unwrap();

    let sched = engine_check(k, &space, vec![span("__schedule")]);
    let precise = sched
        .blockers_with(&space, &tasks, &regs, &irq, Some(&orc))
        .unwrap();
    assert!(precise
        .iter()
        .any(|b| b.pid == sleeper.pid && b.seen == Seen::Frame { depth: 0 }));

    let cmdline = span("cmdline_proc_show");
    let slot = space.translate(sleeper.saved_sp).unwrap().phys;
    g.write_phys(slot, &(cmdline.range.start + 9).to_le_bytes())
        .unwrap();
    let check = engine_check(k, &space, vec![cmdline]);
    let scanned = check.blockers(&space, &tasks, &regs, &irq).unwrap();
    assert!(scanned.iter().any(|b| b.pid == sleeper.pid), "{scanned:?}");
    let unwound = check
        .blockers_with(&space, &tasks, &regs, &irq, Some(&orc))
        .unwrap();
    assert!(unwound.iter().all(|b| b.pid != sleeper.pid), "{unwound:?}");
}

/// A kretprobe's hidden return on the real guest: a sleeper's return
/// into its caller (frame 1 of its unwound stack) is replaced, as
/// `arch_rethook_prepare` does, by `arch_rethook_trampoline`'s address,
/// the real one kept in a `struct rethook_node` on the task's
/// `rethooks` list (laid out from the guest's BTF). Without the task's
/// hooks the caller blocks nothing; with them it blocks, judged by the
/// recovered address, and the walk goes on past it.
#[test]
fn a_return_hidden_by_rethook_blocks_on_the_real_guest() {
    if common::skip_without_dump() {
        return;
    }
    use klpvisor_engine::safepoint::{hardirq_stack_ptr, irq_stacks_sized, Seen, Span};
    use klpvisor_guest::orc::Orc;
    use klpvisor_guest::overlay::Overlay;
    use klpvisor_guest::retaddr::ReturnHooks;
    use klpvisor_guest::{DumpGuest, Guest, VirtRead};
    let f = fixture();
    let k = &f.kernel;
    let g: Overlay<'_, DumpGuest> = Overlay::new(&f.guest);
    let space = k.space(&g);
    let orc = Orc::load_btf(&space, &k.kallsyms, &k.btf).unwrap();
    let hooks = ReturnHooks::from_kernel(&k.kallsyms, &k.btf);
    let regs = klpvisor_guest::all_vcpu_regs(&g).unwrap();
    let tasks = k.tasks(&g).unwrap();
    let walker = klpvisor_guest::Tasks::from_kernel(&k.kallsyms, &k.btf).unwrap();
    let irq = irq_stacks_sized(
        &space,
        &walker.per_cpu_bases(&space).unwrap(),
        hardirq_stack_ptr(&k.kallsyms, &k.btf).unwrap(),
        walker.layout.thread_size,
    );
    // Nothing hooked in the dump: no task blocks on hooks alone.
    let nobody = engine_check(
        k,
        &space,
        vec![Span {
            range: 0x1000..0x1001,
            name: "none".into(),
        }],
    );
    let b = nobody
        .blockers_hooked(&space, &tasks, &regs, &irq, Some(&orc), &hooks)
        .unwrap();
    assert!(b.is_empty(), "{b:?}");
    // A sleeper whose stack unwinds, and the slot of its frame 1.
    let (t, frames) = tasks
        .iter()
        .filter(|t| t.running.is_none() && !t.on_cpu && t.exit_state == 0 && t.pid > 1)
        .find_map(|t| Some((t, orc.unwind_sleeping(&space, t).ok()?)))
        .unwrap();
    let caller = frames[1];
    let slot = (t.saved_sp..t.stack.end)
        .step_by(8)
        .find(|&a| space.read_u64(a).ok() == Some(caller))
        .unwrap();
    let at = k.kallsyms.locate(caller).unwrap();
    let func = caller - at.offset;
    let check = engine_check(
        k,
        &space,
        vec![Span {
            range: k.kallsyms.extent(func).unwrap(),
            name: at.symbol.name.clone(),
        }],
    );
    // Other tasks may sleep in the same caller: only `t` is looked at.
    let only_t =
        |b: &[klpvisor_engine::safepoint::Blocker]| b.iter().filter(|b| b.pid == t.pid).count();
    let before = check
        .blockers_hooked(&space, &tasks, &regs, &irq, Some(&orc), &hooks)
        .unwrap();
    assert_eq!(only_t(&before), 1, "{before:?}");
    // Hook it: the node at the bottom of the task's own stack (unused).
    let off = |p: &str| k.btf.offset_of(p).unwrap();
    let node = t.stack.start + 0x100;
    let write = |va: u64, v: u64| {
        let pa = space.translate(va).unwrap().phys;
        g.write_phys(pa, &v.to_le_bytes()).unwrap();
    };
    let tramp = k.kallsyms.addr("arch_rethook_trampoline").unwrap();
    write(slot, tramp);
    write(node + off("rethook_node.llist"), 0);
    write(node + off("rethook_node.ret_addr"), caller);
    write(node + off("rethook_node.frame"), slot);
    write(
        t.addr + off("task_struct.rethooks"),
        node + off("rethook_node.llist"),
    );
    let blind = check
        .blockers_with(&space, &tasks, &regs, &irq, Some(&orc))
        .unwrap();
    assert_eq!(only_t(&blind), 0, "the bug: the hidden return is missed");
    let b = check
        .blockers_hooked(&space, &tasks, &regs, &irq, Some(&orc), &hooks)
        .unwrap();
    let mine: Vec<_> = b.iter().filter(|b| b.pid == t.pid).collect();
    assert_eq!(mine.len(), 1, "{b:?}");
    assert_eq!(
        mine[0].seen,
        Seen::Hooked {
            trampoline: "arch_rethook_trampoline",
            slot
        }
    );
    assert_eq!(mine[0].addr, caller);
    // The walk recovers the caller and goes on to the end of the stack.
    let th = hooks.of_task(&space, t.addr);
    let walked = orc
        .unwind_sleeping_hooked(&space, t, (&hooks, &th))
        .unwrap();
    assert_eq!(
        walked.iter().map(|f| f.ip).collect::<Vec<_>>(),
        frames,
        "the same frames as before the hook"
    );
    assert_eq!(walked[1].hooked, Some(("arch_rethook_trampoline", slot)));
}

/// The switch log finds what it needs in the real kernel: the
/// `sched_switch` tracepoint, the register and unregister functions, and
/// the layouts of `struct tracepoint` and `struct tracepoint_func` (in the
/// dump no tracer has a probe on it, so it has no probe list).
#[test]
fn the_switch_log_finds_sched_switch_in_the_real_kernel() {
    if common::skip_without_dump() {
        return;
    }
    use klpvisor_engine::switches::Layout;
    use klpvisor_guest::VirtRead;
    let f = fixture();
    let k = &f.kernel;
    let l = Layout::from_kernel(&k.kallsyms, &k.btf).expect("switch log layout");
    assert_eq!(
        k.kallsyms.addr("__tracepoint_sched_switch").unwrap(),
        l.tracepoint
    );
    assert_eq!(l.func_size, 24, "{{func, data, prio}}: {l:?}");
    let space = k.space(&f.guest);
    let enabled = space.read_u32(l.tracepoint + l.enabled).unwrap();
    let funcs = space.read_u64(l.tracepoint + l.funcs).unwrap();
    assert_eq!(
        (enabled, funcs),
        (0, 0),
        "no probe on sched_switch in the dump"
    );
}

/// A summary of each sleeping task's stack, made once, judges as the task
/// itself does on the real kernel, with ORC unwinding and without: every
/// sleeper blocks a check on `__schedule`, none a check on
/// `cmdline_proc_show`, and a check on a frame deeper in one task's stack
/// blocks that task by its summary exactly when the full judgement does.
#[test]
fn stack_summaries_judge_as_the_real_stacks() {
    if common::skip_without_dump() {
        return;
    }
    use klpvisor_engine::safepoint::{summarize, Span};
    use klpvisor_guest::orc::Orc;
    let f = fixture();
    let k = &f.kernel;
    let space = k.space(&f.guest);
    let tasks = k.tasks(&f.guest).unwrap();
    let hooks = klpvisor_guest::retaddr::ReturnHooks::default();
    let orc = Orc::load_btf(&space, &k.kallsyms, &k.btf).ok();
    let span = |name: &str| {
        let a = k.kallsyms.resolve(name, 0).unwrap();
        Span {
            range: k.kallsyms.extent(a).unwrap(),
            name: name.into(),
        }
    };
    let checks = [
        span("__schedule"),
        span("cmdline_proc_show"),
        span("schedule"),
        span("do_nanosleep"),
        span("worker_thread"),
    ];
    let mut judged = 0;
    for orc in [orc.as_ref(), None] {
        for t in tasks.iter().filter(|t| t.running.is_none() && !t.on_cpu) {
            let s = summarize(&space, t, orc, &hooks).expect("a sleeping task is summarised");
            for sp in &checks {
                let c = engine_check(k, &space, vec![sp.clone()]);
                assert!(c.summarisable());
                let full = c
                    .blockers_with(&space, std::slice::from_ref(t), &[], &[], orc)
                    .unwrap();
                assert_eq!(
                    c.summary_blocks(&s),
                    !full.is_empty(),
                    "pid {} ({}) against {} (orc: {}): {full:?}",
                    t.pid,
                    t.comm,
                    sp.name,
                    orc.is_some()
                );
                judged += 1;
            }
        }
    }
    assert!(judged > 100, "{judged}");
}

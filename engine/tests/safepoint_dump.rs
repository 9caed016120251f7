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
    use klpvisor_engine::safepoint::{hardirq_stack_ptr, irq_stacks_sized, Check, Seen, Span};
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
    let sched = Check::new(vec![span("__schedule")]);
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
    let none = Check::new(vec![span("cmdline_proc_show")]);
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
    use klpvisor_engine::safepoint::{hardirq_stack_ptr, irq_stacks_sized, Check, Seen, Span};
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

    let sched = Check::new(vec![span("__schedule")]);
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
    let check = Check::new(vec![cmdline]);
    let scanned = check.blockers(&space, &tasks, &regs, &irq).unwrap();
    assert!(scanned.iter().any(|b| b.pid == sleeper.pid), "{scanned:?}");
    let unwound = check
        .blockers_with(&space, &tasks, &regs, &irq, Some(&orc))
        .unwrap();
    assert!(unwound.iter().all(|b| b.pid != sleeper.pid), "{unwound:?}");
}

//! Introspection of a real guest, offline: `guest-images/dump-guest` boots
//! the Debian test kernel in QEMU TCG (KASLR on), saves the guest's own
//! /proc/kallsyms and task list, and dumps its memory; these tests decode
//! the dump and must agree with what the guest said about itself.
//!
//! Needs QEMU (CI installs it): the first run takes ~30 s, later runs reuse
//! build/dump until the guest image changes.
#![forbid(unsafe_code)]

use klpvisor_guest::GuestPhys;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use klpvisor_guest::paging::PTI_USER_PGD_BIT;
use klpvisor_guest::tasks::THREAD_SIZE;
use klpvisor_guest::{
    kaslr, AddressSpace, DumpError, DumpGuest, Evidence, Kallsyms, Kernel, PageTables, Task,
    VirtRead,
};
use klpvisor_guest::{Guest, VcpuRegs};

struct Fixture {
    dir: PathBuf,
    guest: DumpGuest,
    kernel: Kernel,
}

mod common;

use common::open_dump;

/// Builds (or reuses) the dump once per test binary.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let t = Instant::now();
        let (dir, guest, kernel) = open_dump();
        eprintln!("dump (cached) + Kernel::open took {:?}", t.elapsed());
        Fixture { dir, guest, kernel }
    })
}

fn read(f: &Fixture, name: &str) -> String {
    std::fs::read_to_string(f.dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The guest's /proc/kallsyms without module symbols ("... [module]").
fn proc_kallsyms(f: &Fixture) -> Vec<String> {
    read(f, "kallsyms.txt")
        .lines()
        .filter(|l| !l.contains('['))
        .map(str::to_owned)
        .collect()
}

fn proc_addr(f: &Fixture, name: &str) -> u64 {
    let line = proc_kallsyms(f)
        .into_iter()
        .find(|l| l.split(' ').nth(2) == Some(name))
        .unwrap_or_else(|| panic!("{name} not in /proc/kallsyms"));
    u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap()
}

#[test]
fn kallsyms_equal_proc_kallsyms() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let want = proc_kallsyms(f);
    let got: Vec<String> = f
        .kernel
        .kallsyms
        .symbols()
        .iter()
        .map(|s| format!("{:016x} {} {}", s.addr, s.kind, s.name))
        .collect();
    if let Some(i) = (0..want.len().max(got.len())).find(|&i| want.get(i) != got.get(i)) {
        panic!(
            "kallsyms differ from the guest's /proc/kallsyms at line {}: guest {:?}, decoded {:?} \
             ({} vs {} lines)",
            i + 1,
            want.get(i),
            got.get(i),
            want.len(),
            got.len()
        );
    }
    assert!(got.len() > 50_000, "only {} symbols", got.len());

    // Lookups agree with the list.
    let k = &f.kernel.kallsyms;
    assert_eq!(k.resolve("_text", 0).unwrap(), proc_addr(f, "_text"));
    let sys = proc_addr(f, "entry_SYSCALL_64");
    let l = k.locate(sys + 3).unwrap();
    assert_eq!((l.symbol.name.as_str(), l.offset), ("entry_SYSCALL_64", 3));
    // A name that occurs several times: sympos follows /proc order.
    let mut counts: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for s in k.symbols() {
        counts.entry(s.name.as_str()).or_default().push(s.addr);
    }
    let (name, addrs) = counts
        .iter()
        .find(|(_, a)| a.len() >= 3)
        .expect("a repeated name");
    let found = k.lookup(name);
    assert_eq!(
        found.iter().map(|f| f.symbol.addr).collect::<Vec<_>>(),
        *addrs
    );
    assert_eq!(k.resolve(name, 2).unwrap(), addrs[1]);
    assert!(k.resolve(name, 0).is_err());
    eprintln!(
        "{} symbols, layout {:?}, {:?} lengths, {:?}, tables {:x?}",
        k.len(),
        k.layout(),
        k.name_lengths(),
        k.address_mode(),
        k.table_addrs()
    );
}

#[test]
fn kallsyms_decode_timing() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let space = f.kernel.space(&f.guest);
    let rounds = 5;
    let mut best = std::time::Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        let k = Kallsyms::load(&space, f.kernel.kaslr.text).unwrap();
        best = best.min(t.elapsed());
        assert_eq!(k.len(), f.kernel.kallsyms.len());
    }
    eprintln!(
        "kallsyms load (find + read + decode {} symbols): best of {rounds}: {best:?}{}",
        f.kernel.kallsyms.len(),
        if cfg!(debug_assertions) {
            " (debug build)"
        } else {
            ""
        }
    );
}

#[test]
fn kaslr_slide_found_and_consistent() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let k = &f.kernel.kaslr;
    let text = proc_addr(f, "_text");
    assert_eq!(k.text, text);
    assert_ne!(k.slide, 0, "KASLR is on in the dump: the slide cannot be 0");
    assert_eq!(k.slide, text - kaslr::DEFAULT_TEXT);
    assert_eq!(k.text % (2 << 20), 0);
    // A QEMU core has IDTR but no LSTAR: the IDT gate must have confirmed it.
    assert_eq!(k.evidence, Evidence::Idt);
    let space = f.kernel.space(&f.guest);
    assert_eq!(space.translate(text).unwrap().phys.0, k.text_phys);
    assert_eq!(kaslr::probe(&space).unwrap().text, text);
    eprintln!(
        "_text {:#x} (phys {:#x}), slide {:#x}, {}-level paging",
        k.text,
        k.text_phys,
        k.slide,
        if f.kernel.tables.five_level() { 5 } else { 4 }
    );
}

/// The view kept beyond one pause uses the kernel's own PGD, which maps the
/// kernel exactly as the vCPU's (possibly a process's) page tables did.
#[test]
fn the_view_reads_through_init_top_pgt_and_keeps_every_kernel_translation() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let k = &f.kernel;
    let found = k.origin.tables;
    let pgd = proc_addr(f, "init_top_pgt");
    assert_eq!(
        k.tables.root(),
        found.translate(&f.guest, pgd).unwrap().phys.0,
        "root is init_top_pgt's physical address"
    );
    assert_eq!(k.tables.five_level(), found.five_level());
    for name in [
        "_text",
        "_etext",
        "init_task",
        "linux_banner",
        "init_top_pgt",
    ] {
        let va = proc_addr(f, name);
        let old = found.translate(&f.guest, va).unwrap().phys;
        assert_eq!(k.space(&f.guest).translate(va).unwrap().phys, old, "{name}");
    }
    k.verify(&f.guest).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn btf_offsets_are_sane_and_match_memory() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let btf = &f.kernel.btf;
    let size = btf.struct_size("task_struct").unwrap();
    assert!(
        (4096..=16384).contains(&size),
        "task_struct is {size} bytes"
    );
    let off = |p: &str| btf.offset_of(p).unwrap_or_else(|e| panic!("{e}"));
    for p in [
        "task_struct.tasks",
        "task_struct.pid",
        "task_struct.tgid",
        "task_struct.comm",
        "task_struct.__state",
        "task_struct.stack",
        "task_struct.on_cpu",
        "task_struct.thread.sp",
    ] {
        assert!(off(p) < size, "{p} at {} outside task_struct", off(p));
    }
    assert_eq!(btf.field("task_struct.comm").unwrap().size, Some(16));
    assert_eq!(btf.field("task_struct.pid").unwrap().size, Some(4));
    assert_eq!(off("task_struct.tgid"), off("task_struct.pid") + 4);
    // Livepatch structures are in the kernel's BTF (CONFIG_LIVEPATCH=y).
    for p in [
        "klp_patch.objs",
        "klp_patch.list",
        "klp_object.funcs",
        "klp_func.old_name",
        "klp_func.new_func",
    ] {
        off(p);
    }
    assert!(btf.struct_size("klp_func").unwrap() > 0);
    // A bitfield is reported as one, not given a byte offset.
    let b = btf.field("task_struct.sched_reset_on_fork").unwrap();
    assert_eq!(b.bitfield_bits, Some(1));
    assert!(btf.offset_of("task_struct.sched_reset_on_fork").is_err());

    // Second, independent reading: init_task through these offsets.
    let init = f.kernel.kallsyms.addr("init_task").unwrap();
    let space = f.kernel.space(&f.guest);
    let mut comm = [0u8; 16];
    space
        .read_virt(init + off("task_struct.comm"), &mut comm)
        .unwrap();
    assert_eq!(&comm[..10], b"swapper/0\0");
    assert_eq!(space.read_u32(init + off("task_struct.pid")).unwrap(), 0);
    assert_eq!(space.read_u32(init + off("task_struct.tgid")).unwrap(), 0);
    let next = space.read_u64(init + off("task_struct.tasks")).unwrap();
    let first = next - off("task_struct.tasks");
    assert_eq!(
        space.read_u32(first + off("task_struct.pid")).unwrap(),
        1,
        "first task after init_task is init"
    );
    eprintln!(
        "task_struct {size} bytes: tasks {} pid {} comm {} stack {} thread.sp {}; klp_patch.objs {}",
        off("task_struct.tasks"),
        off("task_struct.pid"),
        off("task_struct.comm"),
        off("task_struct.stack"),
        off("task_struct.thread.sp"),
        off("klp_patch.objs")
    );
}

/// One line of tasks.txt: "<tgid> <pid> (<comm>) <state> ...".
struct ProcTask {
    tgid: i32,
    pid: i32,
    comm: String,
    state: char,
}

fn proc_tasks(f: &Fixture) -> BTreeMap<i32, ProcTask> {
    read(f, "tasks.txt")
        .lines()
        .map(|l| {
            let (tgid, rest) = l.split_once(' ').unwrap();
            let (pid, rest) = rest.split_once(" (").unwrap();
            let (comm, rest) = rest.rsplit_once(") ").unwrap();
            let t = ProcTask {
                tgid: tgid.parse().unwrap(),
                pid: pid.parse().unwrap(),
                comm: comm.to_owned(),
                state: rest.chars().next().unwrap(),
            };
            (t.pid, t)
        })
        .collect()
}

/// How 6.1's /proc names a task (`proc_task_name()`): a workqueue worker's
/// comm gets "+desc" (running) or "-desc" (last work) appended, and a
/// kernel thread whose name did not fit the 16-byte comm shows its full
/// name (`kthread->full_name`); task_struct.comm has the bare, truncated one.
fn comm_matches(task: &Task, proc_comm: &str) -> bool {
    if proc_comm == task.comm {
        return true;
    }
    let Some(rest) = proc_comm.strip_prefix(task.comm.as_str()) else {
        return false;
    };
    (task.is_wq_worker() && (rest.starts_with('+') || rest.starts_with('-')))
        || (task.is_kthread() && task.comm.len() == 15)
}

#[test]
fn tasks_equal_the_guests_task_list() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let tasks = f.kernel.tasks(&f.guest).unwrap_or_else(|e| panic!("{e}"));
    // THREAD_SIZE, read from the kernel's per-CPU top of stack (16 KiB on
    // these non-KASAN kernels), is the size the linker gave init's stack
    // where kallsyms has its bounds (6.12; 6.1 has no __end_init_stack).
    let mut walker = klpvisor_guest::Tasks::from_kernel(&f.kernel.kallsyms, &f.kernel.btf).unwrap();
    let thread_size =
        walker.measure_thread_size(&f.kernel.space(&f.guest), &f.kernel.kallsyms, &f.kernel.btf);
    assert_eq!(thread_size, Some(THREAD_SIZE));
    let ks = &f.kernel.kallsyms;
    if let (Ok(start), Ok(end)) = (ks.addr("__start_init_stack"), ks.addr("__end_init_stack")) {
        assert_eq!(end - start, THREAD_SIZE);
    }
    let want = proc_tasks(f);
    let role = |name: &str| -> i32 {
        let roles = read(f, "roles.txt");
        let line = roles
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in roles.txt"));
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    let (lister, spinner) = (role("lister"), role("spinner"));

    // Idle tasks: one per vCPU, pid 0, not in /proc; CPU 0's is init_task.
    let idle: Vec<&Task> = tasks.iter().filter(|t| t.idle_cpu.is_some()).collect();
    assert_eq!(idle.len(), f.guest.vcpu_count());
    for (cpu, t) in idle.iter().enumerate() {
        assert_eq!((t.pid, t.idle_cpu), (0, Some(cpu as u32)));
        assert_eq!(t.comm, format!("swapper/{cpu}"));
    }
    assert_eq!(idle[0].addr, f.kernel.kallsyms.addr("init_task").unwrap());

    let got: BTreeMap<i32, &Task> = tasks
        .iter()
        .filter(|t| t.idle_cpu.is_none())
        .map(|t| (t.pid, t))
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "pids differ from the guest's /proc"
    );
    for (pid, w) in &want {
        let t = got[pid];
        assert_eq!(t.tgid, w.tgid, "pid {pid} tgid");
        assert!(
            comm_matches(t, &w.comm),
            "pid {pid}: comm {:?} vs /proc {:?}",
            t.comm,
            w.comm
        );
        let state = t.state_char();
        if *pid == lister {
            // Running while it listed, blocked in `read` when dumped.
            assert_eq!((w.state, state), ('R', 'S'), "the listing shell");
        } else if state != w.state {
            // Kernel threads run on timers and workqueues: one may have been
            // running at the instant it was listed or at the instant of the
            // dump. Any other difference is a decoding error.
            assert!(
                t.is_kthread() && (state == 'R' || w.state == 'R'),
                "pid {pid} ({}): state {state} in the dump, {} in /proc",
                t.comm,
                w.state
            );
            eprintln!(
                "tolerated: kernel thread {pid} ({}) was {} when listed, {state} when dumped",
                t.comm, w.state
            );
        }
    }
    assert!(
        got[&1].state_char() == want[&1].state && !got[&1].is_kthread(),
        "init"
    );

    // Every vCPU runs some task, and different ones.
    let mut running: Vec<_> = tasks
        .iter()
        .filter_map(|t| t.running.map(|r| (r.vcpu, r.cpu, t)))
        .collect();
    running.sort_by_key(|r| r.0);
    assert_eq!(
        running.iter().map(|r| r.0).collect::<Vec<_>>(),
        (0..f.guest.vcpu_count()).collect::<Vec<_>>()
    );
    for (vcpu, cpu, t) in &running {
        let regs = f.guest.vcpu_regs(*vcpu).unwrap();
        eprintln!(
            "vCPU {vcpu} = CPU {cpu} runs pid {} ({}), on_cpu {}, CPL {}",
            t.pid,
            t.comm,
            t.on_cpu,
            regs.cpl()
        );
        assert!(t.on_cpu, "vCPU {vcpu} runs {} but its on_cpu is 0", t.comm);
        if regs.cpl() == 3 {
            // Only one user task is runnable: the busy loop.
            assert_eq!(t.pid, spinner, "vCPU {vcpu} is in user mode");
        }
    }
    let spin = got[&spinner];
    assert_eq!(
        (spin.state_char(), want[&spinner].state),
        ('R', 'R'),
        "the busy loop"
    );
    if spin.running.is_none() {
        eprintln!("note: the busy loop was preempted at the dump instant; the user-mode vCPU path is untested");
    }

    // Third reading of the layout: every switched-out task's saved stack
    // pointer lies inside its own kernel stack.
    for t in tasks.iter().filter(|t| t.running.is_none() && !t.on_cpu) {
        assert_eq!(t.stack.end - t.stack.start, THREAD_SIZE);
        assert!(
            t.stack.contains(&t.saved_sp),
            "pid {} ({}): thread.sp {:#x} outside its stack {:#x?}",
            t.pid,
            t.comm,
            t.saved_sp,
            t.stack
        );
    }
}

/// The dump seen through one vCPU only.
struct OneVcpu<'a>(&'a DumpGuest, usize);

impl Guest for OneVcpu<'_> {
    type Error = DumpError;
    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), DumpError> {
        let gpa = gpa.0;
        self.0.read_phys(GuestPhys(gpa), buf)
    }
    fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), DumpError> {
        let gpa = gpa.0;
        self.0.write_phys(GuestPhys(gpa), data)
    }
    fn arena(&self) -> (klpvisor_guest::GuestPhys, u64) {
        self.0.arena()
    }
    fn vcpu_count(&self) -> usize {
        1
    }
    fn vcpu_regs(&self, _id: usize) -> Result<VcpuRegs, DumpError> {
        self.0.vcpu_regs(self.1)
    }
}

#[test]
fn vcpu_on_user_page_tables_alone_finds_the_kernel_through_pti() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    // The busy loop's vCPU is in user mode or at an interrupt entry, on the
    // PTI user PGD (the dump boots with pti=on).
    let Some(vcpu) = (0..f.guest.vcpu_count())
        .find(|&i| f.guest.vcpu_regs(i).unwrap().cr3 & PTI_USER_PGD_BIT != 0)
    else {
        eprintln!("note: no vCPU was on user page tables at the dump instant; PTI path untested");
        return;
    };
    let regs = f.guest.vcpu_regs(vcpu).unwrap();
    let user = PageTables::from_regs(&regs);
    eprintln!(
        "vCPU {vcpu}: CPL {}, user CR3 {:#x}, GS base {:#x}",
        regs.cpl(),
        regs.cr3,
        regs.gs_base
    );
    // The user PGD maps no kernel .rodata: kallsyms cannot be found through it.
    assert!(Kallsyms::load(&AddressSpace::new(&f.guest, user), f.kernel.kaslr.text).is_err());
    let only = OneVcpu(&f.guest, vcpu);
    let k = Kernel::open(&only).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(k.origin.tables.root(), user.root() & !PTI_USER_PGD_BIT);
    assert!(k.origin.pti_twin);
    assert_eq!(k.tables, f.kernel.tables, "kept: init_top_pgt");
    assert_eq!(k.kaslr.text, f.kernel.kaslr.text);
    assert_eq!(k.kallsyms.len(), f.kernel.kallsyms.len());
    // Its current task is still found (through KERNEL_GS_BASE if the user
    // GS base is loaded).
    let tasks = k.tasks(&only).unwrap();
    let running = tasks
        .iter()
        .find(|t| t.running.is_some())
        .expect("a running task");
    assert_eq!(running.comm, "klpv-spin");
}

fn role_pid(f: &Fixture, name: &str) -> i32 {
    common::role_pid(&f.dir, name)
}

/// The ORC unwinder from outside walks every sleeping task's stack to the
/// same frames the guest kernel's own unwinder printed in /proc/PID/stack
/// just before the dump (tasks woken in between may differ: a few).
#[test]
fn orc_unwinds_sleeping_tasks_as_the_guest_kernel_does() {
    if common::skip_without_dump() {
        return;
    }
    use klpvisor_guest::orc::{Format, Orc};
    let f = fixture();
    let k = &f.kernel;
    let space = k.space(&f.guest);
    let release = k.uts(&f.guest, "release").unwrap_or_default();
    let t = Instant::now();
    // The format from the guest's BTF, as the engine reads it; on 6.1 it
    // is the one the release-based reader knows.
    let orc = Orc::load_btf(&space, &k.kallsyms, &k.btf).unwrap_or_else(|e| panic!("{e}"));
    if release.starts_with("6.1.") {
        assert_eq!(
            Format::from_btf(&k.btf).unwrap(),
            Format::V4_14,
            "6.1's BTF describes the 4.14..6.2 ORC format"
        );
        Orc::load(&space, &k.kallsyms, Some(&release)).unwrap();
    }
    eprintln!(
        "ORC tables: {} entries, read in {:?}",
        orc.len(),
        t.elapsed()
    );

    // tid -> ["__schedule+0x2f1", ...] (the "/0xsize" and "[<0>]" dropped).
    let mut oracle: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for line in read(f, "stacks.txt").lines() {
        let mut w = line.split_whitespace();
        let (Some(tid), Some(_), Some(frame)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let frame = frame.split('/').next().unwrap_or(frame).to_owned();
        oracle.entry(tid.parse().unwrap()).or_default().push(frame);
    }
    let skip = [role_pid(f, "lister"), role_pid(f, "spinner")];
    // /proc/PID/stack leaves out the scheduler's own functions
    // (stack_trace_consume_entry_nosched skips .sched.text).
    let sched = k.kallsyms.addr("__sched_text_start").unwrap()
        ..k.kallsyms.addr("__sched_text_end").unwrap();
    let tasks = k.tasks(&f.guest).unwrap();
    let (mut equal, mut differ, mut unreliable) = (0, Vec::new(), Vec::new());
    for t in tasks.iter().filter(|t| {
        t.running.is_none() && t.exit_state == 0 && t.idle_cpu.is_none() && !skip.contains(&t.pid)
    }) {
        let Some(want) = oracle.get(&t.pid) else {
            continue;
        };
        match orc.unwind_sleeping(&space, t) {
            Ok(frames) => {
                let got: Vec<String> = frames
                    .iter()
                    .filter(|ip| !sched.contains(ip))
                    .map(|&ip| match k.kallsyms.locate(ip) {
                        Some(l) => format!("{}+{:#x}", l.symbol.name, l.offset),
                        None => format!("{ip:#x}"),
                    })
                    .collect();
                if &got == want {
                    equal += 1;
                } else {
                    differ.push((t.pid, t.comm.clone(), got, want.clone()));
                }
            }
            Err(e) => unreliable.push((t.pid, t.comm.clone(), e)),
        }
    }
    eprintln!(
        "ORC unwind: {equal} equal to /proc/PID/stack, {} differ, {} unreliable",
        differ.len(),
        unreliable.len()
    );
    for d in &differ {
        eprintln!("  differs: {d:?}");
    }
    for u in &unreliable {
        eprintln!("  unreliable: {u:?}");
    }
    assert!(equal >= 20, "too few sleeping tasks compared: {equal}");
    assert!(
        differ.len() + unreliable.len() <= equal / 10,
        "more than a tenth of the stacks are not the kernel's"
    );
}

/// The modules read from `modules` are the guest's /proc/modules (name,
/// size, state, address), and each `struct module`'s own kallsyms
/// are exactly the guest's /proc/kallsyms module lines ("ADDR t NAME\t[MOD]",
/// in the same order: the kernel prints them from the same tables), the
/// init scripts' pvpanic modules are there and live, and every text symbol
/// lies in its module's text.
#[test]
fn modules_and_their_symbols_equal_proc_kallsyms() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let t = Instant::now();
    let modules = f.kernel.modules(&f.guest).unwrap_or_else(|e| panic!("{e}"));
    let took = t.elapsed();
    let want: Vec<String> = read(f, "kallsyms.txt")
        .lines()
        .filter(|l| l.contains('['))
        .map(str::to_owned)
        .collect();
    let got: Vec<String> = modules
        .iter()
        .flat_map(|m| {
            m.symbols
                .iter()
                .map(move |s| format!("{:016x} {} {}\t[{}]", s.addr, s.kind, s.name, m.name))
        })
        .collect();
    assert_eq!(got, want, "module symbols differ from /proc/kallsyms");
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    for name in ["pvpanic", "pvpanic_mmio"] {
        assert!(names.contains(&name), "no {name} among {names:?}");
    }
    for m in &modules {
        assert_eq!(m.state, klpvisor_guest::ModuleState::Live, "{}", m.name);
        assert!(!m.text.is_empty() && m.text.start >= 0xffff_ffff_c000_0000);
        assert!(m.core.start <= m.text.start && m.text.end <= m.core.end);
        assert!(
            m.init_text.is_empty(),
            "{}: init text freed after init",
            m.name
        );
        for s in m.symbols.iter().filter(|s| matches!(s.kind, 't' | 'T')) {
            assert!(
                m.text.contains(&s.addr),
                "{} {} outside text",
                m.name,
                s.name
            );
        }
    }
    // /proc/modules: "name size refcount deps state address", one line per
    // module in list order; size counts every region, address is the text.
    let proc_modules: Vec<(String, u64, String, u64)> = read(f, "modules.txt")
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            let addr = w[5].trim_start_matches("0x");
            (
                w[0].to_owned(),
                w[1].parse().unwrap(),
                w[4].to_owned(),
                u64::from_str_radix(addr, 16).unwrap(),
            )
        })
        .collect();
    let ours: Vec<(String, u64, String, u64)> = modules
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                m.size,
                m.state.as_str().to_owned(),
                m.text.start,
            )
        })
        .collect();
    assert_eq!(ours, proc_modules, "modules differ from /proc/modules");
    let pvpanic = modules.iter().find(|m| m.name == "pvpanic").unwrap();
    let show = pvpanic.lookup("capability_show");
    assert_eq!(show.len(), 1);
    assert!(show[0].symbol.size > 5, "functions keep st_size");
    // The same name in vmlinux does not count in the module's sympos.
    assert!(!f.kernel.kallsyms.lookup("events_show").is_empty());
    assert_eq!(pvpanic.lookup("events_show").len(), 1);
    eprintln!(
        "{} modules, {} symbols in {took:?}: {}",
        modules.len(),
        got.len(),
        modules
            .iter()
            .map(|m| format!(
                "{} text {:#x}+{:#x}",
                m.name,
                m.text.start,
                m.text.end - m.text.start
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

//! The task walk, the ORC unwinder and the safe-point stack check over
//! arbitrary kernel memory: the input is mapped at `WINDOW`, where the
//! fixed kernel's `init_task`, `__per_cpu_offset`, `nr_cpu_ids` and ORC
//! tables are (see `klpvisor_fuzz::tasks_window`). Its first bytes are
//! read as the header below; the task_struct layout is fixed (6.1-like
//! offsets), except for the thread-list variant.
//!
//! Header: flags (u64), two vCPUs of (gs_base, kernel_gs_base, rip, rsp,
//! cs) as u64s, two changed-function spans (start, end).
#![no_main]

use std::ops::Range;

use klpvisor_engine::safepoint::{irq_stacks, Check, Span};
use klpvisor_fuzz::tasks_window::*;
use klpvisor_fuzz::{kallsyms, Bytes, Window, WINDOW};
use klpvisor_guest::orc::Orc;
use klpvisor_guest::tasks::{TaskLayout, TaskSymbols, ThreadLinks, THREAD_SIZE};
use klpvisor_guest::Tasks;
use klpvisor_guest::VcpuRegs;
use libfuzzer_sys::fuzz_target;

/// task_struct offsets, as in tasks.rs's unit tests.
pub const LAYOUT: TaskLayout = TaskLayout {
    size: 0x200,
    tasks: 0x10,
    pid: 0x20,
    tgid: 0x24,
    comm: 0x30,
    state: 0x00,
    exit_state: 0x28,
    flags: 0x2c,
    on_cpu: 0x40,
    stack: 0x48,
    thread_sp: 0x1f8,
    signal: 0x50,
    nvcsw: 0x80,
    nivcsw: 0x88,
    start_time: 0x90,
    threads: ThreadLinks::SignalThreadHead {
        thread_head: 0x08,
        thread_node: 0x60,
    },
    rq_idle: 0x18,
    thread_size: THREAD_SIZE,
};
/// Per-CPU offsets of `runqueues`, `current_task`, `hardirq_stack_ptr`.
const RUNQUEUES: u64 = 0x80;
const CURRENT_TASK: u64 = 0x40;
const HARDIRQ_STACK_PTR: u64 = 0x50;
/// Tasks walked at most per input (the engine allows 65536).
const MAX_TASKS: usize = 256;

fuzz_target!(|data: &[u8]| {
    let mem = Window {
        base: WINDOW,
        bytes: data,
    };
    let mut h = Bytes(data);
    let flags = h.u64();
    let regs: Vec<VcpuRegs> = (0..2)
        .map(|_| VcpuRegs {
            gs_base: h.u64(),
            kernel_gs_base: Some(h.u64()),
            rip: h.u64(),
            rsp: h.u64(),
            cs_selector: h.u64() as u16,
            ..Default::default()
        })
        .collect();
    let spans: Vec<Span> = ["old_a", "old_b"]
        .iter()
        .map(|name| {
            let (start, end) = (h.u64(), h.u64());
            Span {
                range: start..end,
                name: (*name).into(),
            }
        })
        .collect();

    let layout = if flags & 1 != 0 {
        TaskLayout {
            threads: ThreadLinks::ThreadGroup { thread_group: 0x70 },
            ..LAYOUT
        }
    } else {
        LAYOUT
    };
    let symbols = TaskSymbols {
        init_task: WINDOW + INIT_TASK,
        per_cpu_offset: WINDOW + PER_CPU_OFFSET,
        nr_cpu_ids: WINDOW + NR_CPU_IDS,
        cpu_possible_mask: (flags & 2 != 0).then_some(WINDOW + CPU_POSSIBLE_MASK),
        runqueues: RUNQUEUES,
        current_task: CURRENT_TASK,
    };
    let mut walker = Tasks::new(layout, symbols);
    walker.max_tasks = MAX_TASKS;

    let orc = Orc::load(&mem, kallsyms(), Some("6.1.0")).ok();
    let Ok(tasks) = walker.list(&mem, &regs) else {
        return;
    };
    if let Some(orc) = &orc {
        for t in &tasks {
            let _ = orc.unwind_sleeping(&mem, t);
        }
    }
    let irq: Vec<Range<u64>> = match walker.per_cpu_bases(&mem) {
        Ok(bases) => irq_stacks(&mem, &bases, HARDIRQ_STACK_PTR),
        Err(_) => Vec::new(),
    };
    let check = Check::new(spans);
    let _ = check.blockers_with(&mem, &tasks, &regs, &irq, orc.as_ref());
    let _ = check.blockers(&mem, &tasks, &regs, &irq);
});

//! Every task of the guest kernel, read from its memory: the input of the
//! consistency check, which must know each task's stack and whether a vCPU
//! is running it.
//!
//! Thread-group leaders hang off `init_task.tasks`; each leader's threads
//! off `signal->thread_head` (via `task_struct.thread_node`), or, on
//! kernels without those, the leader's `thread_group` ring. Idle tasks are on
//! neither list: each CPU's is `runqueues.idle` in that CPU's per-CPU area
//! (`__per_cpu_offset[cpu]` + the per-CPU offset of `runqueues`); CPU 0's is
//! `init_task` itself. The task a vCPU runs is the per-CPU `current_task`
//! (6.1) or `pcpu_hot.current_task` (6.2+) of the CPU whose per-CPU base is
//! the vCPU's kernel GS base ([`percpu_gs_base`]).
//!
//! The lists are guest data that may be corrupt or mid-update: every
//! pointer is checked to be a kernel address, every walk is bounded and
//! detects cycles, and every field is read bounds-checked.

use std::collections::HashSet;
use std::ops::Range;

use crate::btf::{Btf, BtfError};
use crate::kallsyms::Kallsyms;
use crate::paging::{PagingError, VirtRead};
use crate::VcpuRegs;

/// x86_64 kernel stack size without KASAN (THREAD_SIZE_ORDER 2): used only
/// until [`Tasks::measure_thread_size`] has read the kernel's own (a KASAN
/// kernel's stacks are 32 KiB), and when neither BTF nor the per-CPU data
/// tell (Debian's 6.1 and 6.12 BTF have no `union thread_union`).
pub const THREAD_SIZE: u64 = 16 << 10;
/// Kernel stack sizes taken from BTF must be a power of two in this range.
const THREAD_SIZES: Range<u64> = (4 << 10)..(256 << 10);
/// The default bound on tasks walked (PID_MAX_DEFAULT is 32768).
pub const DEFAULT_MAX_TASKS: usize = 1 << 16;
/// CONFIG_NR_CPUS maximum on x86_64.
pub const MAX_CPUS: u32 = 8192;
/// We never copy more than this of one task_struct.
const MAX_TASK_STRUCT: u64 = 64 << 10;
/// task_struct.comm length (TASK_COMM_LEN).
const COMM_LEN: usize = 16;
/// PF_KTHREAD and PF_WQ_WORKER from include/linux/sched.h (6.1).
pub const PF_WQ_WORKER: u32 = 0x0000_0020;
/// `task_struct.flags` bit of a kernel thread.
pub const PF_KTHREAD: u32 = 0x0020_0000;
/// `__state` of a task that has switched away for the last time
/// (`do_task_dead`), from include/linux/sched.h (6.1 and 6.12 alike).
pub const TASK_DEAD: u32 = 0x0000_0080;

/// Errors of the task walk.
#[derive(Debug, thiserror::Error)]
pub enum TasksError {
    /// A member the walk needs is missing from the guest's BTF.
    #[error("cannot lay out tasks from the guest's BTF: {0}")]
    Layout(#[from] BtfError),
    /// A symbol the walk needs (`init_task`, `runqueues`, ...) is not in kallsyms.
    #[error("kallsyms has no `{0}`, which the task walk needs")]
    MissingSymbol(&'static str),
    /// A read of task or per-CPU data failed.
    #[error("cannot read {what} at {addr:#x}: {source}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// Its kernel-virtual address.
        addr: u64,
        /// The read's error.
        #[source]
        source: PagingError,
    },
    /// A list or task pointer is not a kernel address.
    #[error("{what} at {at:#x} is {ptr:#x}, not a kernel pointer: corrupt or changing task data")]
    BadPointer {
        /// The member holding it.
        what: &'static str,
        /// The value read.
        ptr: u64,
        /// Kernel-virtual address it was read from.
        at: u64,
    },
    /// A list revisits a node before reaching its head.
    #[error("the {list} list loops without returning to its head ({node:#x} seen twice)")]
    Cycle {
        /// Which list (`init_task.tasks` or a thread list).
        list: &'static str,
        /// Kernel-virtual address of the node seen twice.
        node: u64,
    },
    /// More tasks than [`Tasks::max_tasks`].
    #[error("more than {limit} tasks: giving up (a corrupt task list?)")]
    TooMany {
        /// The bound that was passed.
        limit: usize,
    },
    /// `nr_cpu_ids` is above [`MAX_CPUS`].
    #[error("nr_cpu_ids is {0}, more than the {MAX_CPUS} CPUs x86_64 Linux supports")]
    TooManyCpus(u32),
    /// BTF's `union thread_union` has an impossible size.
    #[error("union thread_union is {0} bytes, not a kernel stack size (a power of two from 4 KiB to 128 KiB): corrupt BTF")]
    ThreadSize(u64),
    /// A BTF offset lies past the end of `task_struct`.
    #[error("field `{field}` at offset {offset} lies outside the {size}-byte task_struct")]
    FieldOutside {
        /// The member.
        field: &'static str,
        /// Its byte offset.
        offset: u64,
        /// `sizeof(struct task_struct)`.
        size: u64,
    },
}

/// How a task's threads are linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadLinks {
    /// `signal_struct.thread_head` lists `task_struct.thread_node` (3.14+).
    SignalThreadHead {
        /// Offset of `signal_struct.thread_head`.
        thread_head: u64,
        /// Offset of `task_struct.thread_node`.
        thread_node: u64,
    },
    /// The leader's `task_struct.thread_group` ring (older, and 6.7+ drops
    /// the ring while keeping thread_head).
    ThreadGroup {
        /// Offset of `task_struct.thread_group`.
        thread_group: u64,
    },
}

/// Offsets the walk needs, from BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    /// `sizeof(struct task_struct)`.
    pub size: u64,
    /// `task_struct.tasks` (the list of thread-group leaders).
    pub tasks: u64,
    /// `task_struct.pid`.
    pub pid: u64,
    /// `task_struct.tgid`.
    pub tgid: u64,
    /// `task_struct.comm`.
    pub comm: u64,
    /// `task_struct.__state` (`state` before 5.14).
    pub state: u64,
    /// `task_struct.exit_state`.
    pub exit_state: u64,
    /// `task_struct.flags`.
    pub flags: u64,
    /// `task_struct.on_cpu`.
    pub on_cpu: u64,
    /// `task_struct.stack`.
    pub stack: u64,
    /// `task_struct.thread.sp`.
    pub thread_sp: u64,
    /// `task_struct.signal`.
    pub signal: u64,
    /// `task_struct.nvcsw` (voluntary context switches).
    pub nvcsw: u64,
    /// `task_struct.nivcsw` (involuntary context switches).
    pub nivcsw: u64,
    /// `task_struct.start_time` (monotonic ns at fork).
    pub start_time: u64,
    /// How to reach a leader's other threads.
    pub threads: ThreadLinks,
    /// `struct rq` member `idle`.
    pub rq_idle: u64,
    /// THREAD_SIZE: `sizeof(union thread_union)`, whose `stack` member is
    /// the whole kernel stack; [`THREAD_SIZE`] if BTF lacks the union.
    pub thread_size: u64,
}

impl TaskLayout {
    /// The offsets in the guest's BTF; THREAD_SIZE defaults when BTF has
    /// no `thread_union`.
    pub fn from_btf(btf: &Btf) -> Result<Self, TasksError> {
        let off = |p: &str| btf.offset_of(p);
        let threads = match (
            off("signal_struct.thread_head"),
            off("task_struct.thread_node"),
        ) {
            (Ok(thread_head), Ok(thread_node)) => ThreadLinks::SignalThreadHead {
                thread_head,
                thread_node,
            },
            _ => ThreadLinks::ThreadGroup {
                thread_group: off("task_struct.thread_group")?,
            },
        };
        // `__state` since 5.14, `state` before.
        let state = off("task_struct.__state").or_else(|_| off("task_struct.state"))?;
        Ok(Self {
            size: btf.struct_size("task_struct")?,
            tasks: off("task_struct.tasks")?,
            pid: off("task_struct.pid")?,
            tgid: off("task_struct.tgid")?,
            comm: off("task_struct.comm")?,
            state,
            exit_state: off("task_struct.exit_state")?,
            flags: off("task_struct.flags")?,
            on_cpu: off("task_struct.on_cpu")?,
            stack: off("task_struct.stack")?,
            thread_sp: off("task_struct.thread.sp")?,
            signal: off("task_struct.signal")?,
            nvcsw: off("task_struct.nvcsw")?,
            nivcsw: off("task_struct.nivcsw")?,
            start_time: off("task_struct.start_time")?,
            threads,
            rq_idle: off("rq.idle")?,
            thread_size: match btf.struct_size("thread_union") {
                Ok(n) if n.is_power_of_two() && THREAD_SIZES.contains(&n) => n,
                Ok(n) => return Err(TasksError::ThreadSize(n)),
                Err(_) => THREAD_SIZE,
            },
        })
    }
}

/// Kernel addresses the walk needs, from kallsyms (+ BTF for pcpu_hot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSymbols {
    /// `init_task`: the head of the task list (and CPU 0's idle task).
    pub init_task: u64,
    /// `__per_cpu_offset[]`.
    pub per_cpu_offset: u64,
    /// `nr_cpu_ids` (unsigned int).
    pub nr_cpu_ids: u64,
    /// `__cpu_possible_mask`, if present.
    pub cpu_possible_mask: Option<u64>,
    /// Per-CPU offset of `runqueues`.
    pub runqueues: u64,
    /// Per-CPU offset of the current-task pointer.
    pub current_task: u64,
}

impl TaskSymbols {
    /// The addresses from kallsyms; the current-task pointer is
    /// `pcpu_hot.current_task` (6.2+, offset from BTF) or `current_task`.
    pub fn from_kernel(kallsyms: &Kallsyms, btf: &Btf) -> Result<Self, TasksError> {
        let sym = |name: &'static str| {
            kallsyms
                .addr(name)
                .map_err(|_| TasksError::MissingSymbol(name))
        };
        // 6.1 has a per-CPU `current_task`; 6.2+ moved it into `pcpu_hot`.
        let current_task = match kallsyms.addr("pcpu_hot") {
            Ok(hot) => hot
                .checked_add(btf.offset_of("pcpu_hot.current_task")?)
                .ok_or(TasksError::MissingSymbol("pcpu_hot"))?,
            Err(_) => sym("current_task")?,
        };
        Ok(Self {
            init_task: sym("init_task")?,
            per_cpu_offset: sym("__per_cpu_offset")?,
            nr_cpu_ids: sym("nr_cpu_ids")?,
            cpu_possible_mask: kallsyms.addr("__cpu_possible_mask").ok(),
            runqueues: sym("runqueues")?,
            current_task,
        })
    }
}

/// Which vCPU runs a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// The vCPU's index.
    pub vcpu: usize,
    /// The guest's CPU number for that vCPU.
    pub cpu: u32,
}

/// One task (thread) of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Address of its task_struct.
    pub addr: u64,
    /// `pid`: the thread id.
    pub pid: i32,
    /// `tgid`: the process id.
    pub tgid: i32,
    /// `comm`, at most 15 bytes, lossily decoded.
    pub comm: String,
    /// `__state` (6.1 encoding, see [`Task::state_char`]).
    pub state: u32,
    /// `exit_state` (EXIT_ZOMBIE, EXIT_DEAD; 0 while alive).
    pub exit_state: u32,
    /// `flags` (`PF_*`).
    pub flags: u32,
    /// `on_cpu`: set while a CPU runs it, until its switch-out completes.
    pub on_cpu: bool,
    /// Its kernel stack `[stack, stack + THREAD_SIZE)` (the layout's
    /// `thread_size`).
    pub stack: Range<u64>,
    /// `thread.sp`: the stack pointer saved when it was switched out (its
    /// `inactive_task_frame`); stale while it runs.
    pub saved_sp: u64,
    /// `nvcsw + nivcsw`: every time the task was switched out, one of
    /// the two went up (`__schedule`), so an unchanged sum means it has not
    /// run to a switch since (see the engine's pre-scan).
    pub switches: u64,
    /// `start_time`: with the address, which task this is, when a new task
    /// may reuse a freed task_struct.
    pub start_time: u64,
    /// `Some(cpu)` for that CPU's idle task.
    pub idle_cpu: Option<u32>,
    /// The vCPU running it, if any.
    pub running: Option<Running>,
}

impl Task {
    /// The state letter `/proc/<pid>/stat` shows, computed like 6.1's
    /// `task_state_index()`: R S D T t X Z P I.
    pub fn state_char(&self) -> char {
        const TASK_REPORT: u32 = 0x7f;
        const TASK_IDLE: u32 = 0x402; // TASK_UNINTERRUPTIBLE | TASK_NOLOAD
        const TASK_RTLOCK_WAIT: u32 = 0x1000;
        const TASK_REPORT_IDLE: u32 = TASK_REPORT + 1;
        let mut s = (self.state | self.exit_state) & TASK_REPORT;
        if self.state & TASK_IDLE == TASK_IDLE {
            s = TASK_REPORT_IDLE;
        }
        if self.state == TASK_RTLOCK_WAIT {
            s = 2; // shown as uninterruptible
        }
        let index = (u32::BITS - s.leading_zeros()) as usize;
        b"RSDTtXZPI".get(index).map_or('?', |&c| char::from(c))
    }

    /// Whether the task will never run again, so nothing on its stack can
    /// be returned into. `exit_state` alone does not say so: `exit_notify`
    /// sets it (EXIT_DEAD for an autoreaped thread, which it also
    /// releases from the task lists, EXIT_ZOMBIE otherwise) and the task
    /// then runs, and may be preempted in, the rest of `do_exit`. Only
    /// `do_task_dead` ends that: it sets `__state` to TASK_DEAD and
    /// schedules away for good (no wakeup matches TASK_DEAD), and the
    /// next task's `finish_task_switch` clears `on_cpu` before freeing
    /// the stack. So: exiting, TASK_DEAD, off every CPU, and no vCPU
    /// found running it.
    pub fn is_dead(&self) -> bool {
        self.exit_state != 0 && self.state == TASK_DEAD && !self.on_cpu && self.running.is_none()
    }

    /// A kernel thread ([`PF_KTHREAD`]).
    pub fn is_kthread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// A workqueue worker: /proc shows its comm with "+desc"/"-desc" added.
    pub fn is_wq_worker(&self) -> bool {
        self.flags & PF_WQ_WORKER != 0
    }
}

/// The kernel's per-CPU base as vCPU `r` holds it: GS_BASE in kernel mode
/// (CPL 0), KERNEL_GS_BASE in user mode; `None` in user mode when the
/// register source records no MSRs.
///
/// Which CPU a vCPU is decides which task the safe-point check judges
/// with its registers, so it must not be forgeable from user space. The
/// kernel keeps its per-CPU base in exactly one of the two registers and
/// the user's GS base in the other, swapping them (`swapgs`) on every
/// entry from and exit to user mode. The user's value is arbitrary: with
/// FSGSBASE, `wrgsbase` sets any canonical address, another CPU's per-CPU
/// base included. Accepting a match in either register, as the first CPU
/// that matched, let a process on CPU 1 whose GS base is CPU 0's place
/// CPU 1's vCPU on CPU 0 while it was in the kernel.
///
/// Why not "match only in kernel mode": a vCPU in user mode is the common
/// case, and its KERNEL_GS_BASE is the kernel's own value, which user mode
/// cannot write (MSR writes and `swapgs` are privileged). Refusing every
/// time a vCPU is in user mode would block most transitions.
///
/// The rule is wrong only while a vCPU runs in kernel mode with the user's
/// GS base, interrupts off: between a syscall, interrupt or exception
/// entry and its `swapgs`, between the `swapgs` and the `sysret`/`iret`
/// of an exit, at the start of a paranoid (NMI, #MC, #DB) entry, and in
/// the kernel's own writes of the user's GS base (`__switch_to` and
/// `arch_prctl` set it between two `swapgs`). There the value taken is
/// the user's. If it is no CPU's, or a CPU another vCPU claims too, the
/// walk places the vCPU on no CPU and the safe-point check blocks on it.
/// If vCPUs in such windows exactly trade CPUs, each is judged with
/// another CPU's current task, whose stack does not hold its RSP (that is
/// on its own task's stack or an entry stack, never an IRQ stack with
/// interrupts off), and the check blocks on a stack pointer on no known
/// stack. Only a user-chosen RSP (at `syscall` before the entry switches
/// stacks, or after the exit restored the user's) can land on the judged
/// task's stack; for no block at all, every trading vCPU must be in such
/// a syscall window, and then none of their tasks has a frame on its
/// kernel stack to miss.
pub fn percpu_gs_base(r: &VcpuRegs) -> Option<u64> {
    if r.cpl() == 0 {
        Some(r.gs_base)
    } else {
        r.kernel_gs_base
    }
}

/// The task walker for one kernel.
#[derive(Debug, Clone, Copy)]
pub struct Tasks {
    /// `task_struct` and friends' offsets, from BTF.
    pub layout: TaskLayout,
    /// The kernel addresses the walk starts from.
    pub symbols: TaskSymbols,
    /// Bound on tasks walked before the list is called corrupt.
    pub max_tasks: usize,
}

/// The lowest kernel address: the kernel half starts at 0xff00000000000000
/// with 5-level paging (0xffff800000000000 with 4 levels; the gap is
/// non-canonical there and fails to read anyway).
const KERNEL_HALF: u64 = 0xff00_0000_0000_0000;

fn is_kernel_ptr(p: u64) -> bool {
    p >= KERNEL_HALF && p % 8 == 0
}

impl Tasks {
    /// A walker bounded at [`DEFAULT_MAX_TASKS`].
    pub fn new(layout: TaskLayout, symbols: TaskSymbols) -> Self {
        Self {
            layout,
            symbols,
            max_tasks: DEFAULT_MAX_TASKS,
        }
    }

    /// A walker for the kernel these kallsyms and BTF describe.
    pub fn from_kernel(kallsyms: &Kallsyms, btf: &Btf) -> Result<Self, TasksError> {
        Ok(Self::new(
            TaskLayout::from_btf(btf)?,
            TaskSymbols::from_kernel(kallsyms, btf)?,
        ))
    }

    /// Takes THREAD_SIZE from the running kernel (BTF has no `union
    /// thread_union` on Debian's kernels):
    /// `__switch_to` sets each CPU's top of stack (`cpu_current_top_of_stack`
    /// up to 6.1, `pcpu_hot.top_of_stack` from 6.2, offset from BTF) to
    /// `task->stack + THREAD_SIZE - TOP_OF_KERNEL_STACK_PADDING` of the task
    /// it switches to (the padding is 0, or 16 with FRED), so the top minus
    /// the CPU's current task's `stack`, rounded up to a power of two, is
    /// THREAD_SIZE. A CPU paused inside `__switch_to` may have one updated
    /// and not the other, so the size most CPUs agree on is taken; none
    /// (no symbol, unreadable, nothing plausible) keeps the layout's size.
    /// Returns the size measured, if any.
    pub fn measure_thread_size<M: VirtRead + ?Sized>(
        &mut self,
        mem: &M,
        kallsyms: &Kallsyms,
        btf: &Btf,
    ) -> Option<u64> {
        let top = kallsyms.addr("cpu_current_top_of_stack").ok().or_else(|| {
            let hot = kallsyms.addr("pcpu_hot").ok()?;
            hot.checked_add(btf.offset_of("pcpu_hot.top_of_stack").ok()?)
        })?;
        self.measure_thread_size_at(mem, top)
    }

    /// [`Tasks::measure_thread_size`] with the per-CPU offset of the top
    /// of stack given.
    pub fn measure_thread_size_at<M: VirtRead + ?Sized>(
        &mut self,
        mem: &M,
        top: u64,
    ) -> Option<u64> {
        let cpus = self.per_cpu_bases(mem).ok()?;
        let mut votes: Vec<(u64, usize)> = Vec::new();
        for (_, base) in cpus.iter().take(MAX_CPUS as usize) {
            let size = (|| {
                let end = mem.read_u64(base.wrapping_add(top)).ok()?;
                let task = self
                    .read_ptr(mem, base.wrapping_add(self.symbols.current_task), "current")
                    .ok()?;
                let stack = mem.read_u64(task.wrapping_add(self.layout.stack)).ok()?;
                let size = end.checked_sub(stack)?.checked_next_power_of_two()?;
                // At most a little padding below the rounded size.
                (THREAD_SIZES.contains(&size) && size - (end - stack) <= 64).then_some(size)
            })();
            if let Some(size) = size {
                match votes.iter_mut().find(|(s, _)| *s == size) {
                    Some((_, n)) => *n += 1,
                    None => votes.push((size, 1)),
                }
            }
        }
        let &(size, _) = votes.iter().max_by_key(|&&(s, n)| (n, s))?;
        self.layout.thread_size = size;
        Some(size)
    }

    /// Every task: each CPU's idle task (by CPU), then every thread in
    /// task-list order; each marked with the vCPU running it, per `regs`
    /// (index = vCPU id) and [`percpu_gs_base`]. A vCPU whose per-CPU
    /// base is no CPU's, or the same CPU's as another vCPU's, marks no
    /// task. A task a vCPU runs but no list holds (one that is exiting)
    /// is added at the end.
    pub fn list<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        regs: &[VcpuRegs],
    ) -> Result<Vec<Task>, TasksError> {
        let cpus = self.per_cpu_bases(mem)?;
        let running = self.running_on(mem, regs, &cpus)?;

        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut budget = self.max_tasks;
        for &(cpu, base) in &cpus {
            let at = base
                .wrapping_add(self.symbols.runqueues)
                .wrapping_add(self.layout.rq_idle);
            let idle = mem.read_u64(at).map_err(|source| TasksError::Read {
                what: "runqueues.idle",
                addr: at,
                source,
            })?;
            if idle == 0 {
                continue; // a possible CPU never brought up
            }
            if !is_kernel_ptr(idle) {
                return Err(TasksError::BadPointer {
                    what: "runqueues.idle",
                    ptr: idle,
                    at,
                });
            }
            if seen.insert(idle) {
                let mut t = self.read_task(mem, idle)?;
                t.idle_cpu = Some(cpu);
                out.push(t);
            }
        }

        // Thread-group leaders.
        let layout = &self.layout;
        let head = self.symbols.init_task.wrapping_add(layout.tasks);
        let mut leaders = Vec::new();
        self.walk_list(mem, head, "init_task.tasks", &mut budget, |node| {
            leaders.push(node.wrapping_sub(layout.tasks));
            Ok(())
        })?;
        for leader in leaders {
            let mut threads = Vec::new();
            match layout.threads {
                ThreadLinks::SignalThreadHead {
                    thread_head,
                    thread_node,
                } => {
                    let at = leader.wrapping_add(layout.signal);
                    let signal = mem.read_u64(at).map_err(|source| TasksError::Read {
                        what: "task_struct.signal",
                        addr: at,
                        source,
                    })?;
                    if signal == 0 {
                        threads.push(leader); // exiting: signal already gone
                    } else if !is_kernel_ptr(signal) {
                        return Err(TasksError::BadPointer {
                            what: "task_struct.signal",
                            ptr: signal,
                            at,
                        });
                    } else {
                        let head = signal.wrapping_add(thread_head);
                        self.walk_list(mem, head, "signal->thread_head", &mut budget, |node| {
                            threads.push(node.wrapping_sub(thread_node));
                            Ok(())
                        })?;
                    }
                }
                ThreadLinks::ThreadGroup { thread_group } => {
                    threads.push(leader);
                    let head = leader.wrapping_add(thread_group);
                    self.walk_list(mem, head, "task_struct.thread_group", &mut budget, |node| {
                        threads.push(node.wrapping_sub(thread_group));
                        Ok(())
                    })?;
                }
            }
            for t in threads {
                if seen.insert(t) {
                    out.push(self.read_task(mem, t)?);
                }
            }
        }

        for (addr, run) in running {
            match out.iter_mut().find(|t| t.addr == addr) {
                Some(t) => t.running = Some(run),
                None => {
                    let mut t = self.read_task(mem, addr)?;
                    t.running = Some(run);
                    out.push(t);
                }
            }
        }
        Ok(out)
    }

    /// The task each vCPU runs, with where (see [`Tasks::list`]): each
    /// CPU's current task, for every vCPU whose per-CPU base is that
    /// CPU's and no other vCPU's.
    pub fn running<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        regs: &[VcpuRegs],
    ) -> Result<Vec<(u64, Running)>, TasksError> {
        let cpus = self.per_cpu_bases(mem)?;
        self.running_on(mem, regs, &cpus)
    }

    fn running_on<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        regs: &[VcpuRegs],
        cpus: &[(u32, u64)],
    ) -> Result<Vec<(u64, Running)>, TasksError> {
        // (vCPU, CPU, per-CPU base) for each vCPU whose per-CPU base is a
        // CPU's. One that is no CPU's (early boot, the instructions
        // between a kernel entry and its swapgs) is placed on none.
        let claims: Vec<(usize, u32, u64)> = regs
            .iter()
            .enumerate()
            .filter_map(|(vcpu, r)| {
                let gs = percpu_gs_base(r)?;
                let &(cpu, base) = cpus.iter().find(|&&(_, base)| base == gs)?;
                Some((vcpu, cpu, base))
            })
            .collect();
        let mut running: Vec<(u64, Running)> = Vec::new();
        for &(vcpu, cpu, base) in &claims {
            // Two vCPUs on one CPU: at most one is right, and which one
            // cannot be told, so neither is placed (the safe-point check
            // blocks on a vCPU that runs no task).
            if claims.iter().filter(|c| c.1 == cpu).count() > 1 {
                continue;
            }
            let at = base.wrapping_add(self.symbols.current_task);
            let task = self.read_ptr(mem, at, "the per-CPU current task")?;
            running.push((task, Running { vcpu, cpu }));
        }
        Ok(running)
    }

    /// (cpu, per-CPU base) for every possible CPU.
    pub fn per_cpu_bases<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<Vec<(u32, u64)>, TasksError> {
        let s = &self.symbols;
        let n = mem
            .read_u32(s.nr_cpu_ids)
            .map_err(|source| TasksError::Read {
                what: "nr_cpu_ids",
                addr: s.nr_cpu_ids,
                source,
            })?;
        if n > MAX_CPUS {
            return Err(TasksError::TooManyCpus(n));
        }
        let mut out = Vec::new();
        for cpu in 0..n {
            if let Some(mask) = s.cpu_possible_mask {
                let at = mask.wrapping_add(u64::from(cpu / 64) * 8);
                let word = mem.read_u64(at).map_err(|source| TasksError::Read {
                    what: "__cpu_possible_mask",
                    addr: at,
                    source,
                })?;
                if word & (1 << (cpu % 64)) == 0 {
                    continue;
                }
            }
            let at = s.per_cpu_offset.wrapping_add(u64::from(cpu) * 8);
            let base = mem.read_u64(at).map_err(|source| TasksError::Read {
                what: "__per_cpu_offset[]",
                addr: at,
                source,
            })?;
            out.push((cpu, base));
        }
        Ok(out)
    }

    fn read_ptr<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        at: u64,
        what: &'static str,
    ) -> Result<u64, TasksError> {
        let p = mem.read_u64(at).map_err(|source| TasksError::Read {
            what,
            addr: at,
            source,
        })?;
        if is_kernel_ptr(p) {
            Ok(p)
        } else {
            Err(TasksError::BadPointer { what, ptr: p, at })
        }
    }

    /// Calls `visit` with each node of the circular list at `head` (not the
    /// head itself), stopping at the head, a cycle or the task budget.
    fn walk_list<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        head: u64,
        list: &'static str,
        budget: &mut usize,
        mut visit: impl FnMut(u64) -> Result<(), TasksError>,
    ) -> Result<(), TasksError> {
        let mut seen = HashSet::new();
        let mut node = self.read_ptr(mem, head, "list_head.next")?;
        while node != head {
            *budget = budget.checked_sub(1).ok_or(TasksError::TooMany {
                limit: self.max_tasks,
            })?;
            if !seen.insert(node) {
                return Err(TasksError::Cycle { list, node });
            }
            visit(node)?;
            node = self.read_ptr(mem, node, "list_head.next")?;
        }
        Ok(())
    }

    /// Reads the fields of one task_struct the walk needs, each on its
    /// own: the safe-point check reads every task inside the pause, and a
    /// task_struct is about 10 KiB of which it wants some 60 bytes.
    pub fn read_task<M: VirtRead + ?Sized>(&self, mem: &M, addr: u64) -> Result<Task, TasksError> {
        let l = &self.layout;
        let field = |name: &'static str, off: u64, buf: &mut [u8]| -> Result<(), TasksError> {
            let inside = off
                .checked_add(buf.len() as u64)
                .is_some_and(|end| end <= l.size && l.size <= MAX_TASK_STRUCT);
            if !inside {
                return Err(TasksError::FieldOutside {
                    field: name,
                    offset: off,
                    size: l.size,
                });
            }
            let at = addr.wrapping_add(off);
            mem.read_virt(at, buf).map_err(|source| TasksError::Read {
                what: "task_struct",
                addr: at,
                source,
            })
        };
        let u32_at = |name, off| -> Result<u32, TasksError> {
            let mut b = [0u8; 4];
            field(name, off, &mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        let u64_at = |name, off| -> Result<u64, TasksError> {
            let mut b = [0u8; 8];
            field(name, off, &mut b)?;
            Ok(u64::from_le_bytes(b))
        };
        let mut comm_buf = [0u8; COMM_LEN];
        field("comm", l.comm, &mut comm_buf)?;
        let comm_raw = &comm_buf[..];
        let comm_len = comm_raw.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        let comm =
            String::from_utf8_lossy(comm_raw.get(..comm_len).unwrap_or_default()).into_owned();
        let stack = u64_at("stack", l.stack)?;
        Ok(Task {
            addr,
            pid: u32_at("pid", l.pid)? as i32,
            tgid: u32_at("tgid", l.tgid)? as i32,
            comm,
            state: u32_at("__state", l.state)?,
            exit_state: u32_at("exit_state", l.exit_state)?,
            flags: u32_at("flags", l.flags)?,
            on_cpu: u32_at("on_cpu", l.on_cpu)? != 0,
            stack: stack..stack.saturating_add(l.thread_size),
            saved_sp: u64_at("thread.sp", l.thread_sp)?,
            switches: u64_at("nvcsw", l.nvcsw)?.wrapping_add(u64_at("nivcsw", l.nivcsw)?),
            start_time: u64_at("start_time", l.start_time)?,
            idle_cpu: None,
            running: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Sparse fake kernel memory: regions by start address.
    #[derive(Default)]
    struct Mem(BTreeMap<u64, Vec<u8>>);

    impl Mem {
        fn region(&mut self, va: u64, len: usize) {
            self.0.insert(va, vec![0; len]);
        }
        fn put(&mut self, va: u64, bytes: &[u8]) {
            let (start, r) = self.0.range_mut(..=va).next_back().unwrap();
            let o = (va - start) as usize;
            r[o..o + bytes.len()].copy_from_slice(bytes);
        }
        fn put64(&mut self, va: u64, v: u64) {
            self.put(va, &v.to_le_bytes());
        }
        fn put32(&mut self, va: u64, v: u32) {
            self.put(va, &v.to_le_bytes());
        }
    }

    impl VirtRead for Mem {
        fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
            let (start, r) = self
                .0
                .range(..=va)
                .next_back()
                .ok_or(PagingError::Unmapped { va })?;
            let o = (va - start) as usize;
            let src = r
                .get(o..o + buf.len())
                .ok_or(PagingError::Unmapped { va })?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    const L: TaskLayout = TaskLayout {
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
    const SYMS: TaskSymbols = TaskSymbols {
        init_task: 0xffff_ffff_8200_0000,
        per_cpu_offset: 0xffff_ffff_8300_0000,
        nr_cpu_ids: 0xffff_ffff_8300_1000,
        cpu_possible_mask: None,
        runqueues: 0x3000,
        current_task: 0x100,
    };
    const PCPU: [u64; 2] = [0xffff_8880_1000_0000, 0xffff_8880_2000_0000];
    const TASK_A: u64 = 0xffff_8880_3000_0000; // leader, 2 threads
    const TASK_B: u64 = 0xffff_8880_3000_1000;
    const IDLE1: u64 = 0xffff_8880_3000_2000;
    const SIG: u64 = 0xffff_8880_4000_0000;

    fn task(m: &mut Mem, at: u64, pid: i32, tgid: i32, comm: &str) {
        m.region(at, 0x200);
        m.put32(at + L.pid, pid as u32);
        m.put32(at + L.tgid, tgid as u32);
        m.put(at + L.comm, comm.as_bytes());
        m.put64(at + L.stack, 0xffff_c900_0000_0000 + (pid as u64) * 0x4000);
        m.put64(at + L.thread_sp, 0xffff_c900_0000_3f00);
    }

    /// init_task -> A; A's signal lists A and B; two CPUs; vCPU 1 runs B.
    fn kernel() -> Mem {
        let mut m = Mem::default();
        task(&mut m, SYMS.init_task, 0, 0, "swapper/0");
        task(&mut m, TASK_A, 100, 100, "leader");
        task(&mut m, TASK_B, 101, 100, "worker");
        task(&mut m, IDLE1, 0, 0, "swapper/1");
        // init_task.tasks <-> A.tasks
        m.put64(SYMS.init_task + L.tasks, TASK_A + L.tasks);
        m.put64(TASK_A + L.tasks, SYMS.init_task + L.tasks);
        // signal->thread_head -> A.thread_node -> B.thread_node -> head
        m.region(SIG, 0x40);
        m.put64(TASK_A + L.signal, SIG);
        m.put64(TASK_B + L.signal, SIG);
        m.put64(SIG + 8, TASK_A + 0x60);
        m.put64(TASK_A + 0x60, TASK_B + 0x60);
        m.put64(TASK_B + 0x60, SIG + 8);
        m.region(SYMS.per_cpu_offset, 16);
        m.put64(SYMS.per_cpu_offset, PCPU[0]);
        m.put64(SYMS.per_cpu_offset + 8, PCPU[1]);
        m.region(SYMS.nr_cpu_ids, 4);
        m.put32(SYMS.nr_cpu_ids, 2);
        for (i, base) in PCPU.iter().enumerate() {
            m.region(*base, 0x4000);
            let idle = if i == 0 { SYMS.init_task } else { IDLE1 };
            m.put64(base + SYMS.runqueues + L.rq_idle, idle);
            m.put64(
                base + SYMS.current_task,
                if i == 0 { SYMS.init_task } else { TASK_B },
            );
        }
        m.put32(TASK_B + L.on_cpu, 1);
        m.put32(TASK_A + L.state, 1);
        m
    }

    fn regs(gs: u64) -> VcpuRegs {
        VcpuRegs {
            gs_base: gs,
            ..Default::default()
        }
    }

    #[test]
    fn thread_size_is_the_top_of_stack_minus_the_current_tasks_stack() {
        const TOP: u64 = 0x300;
        let mut m = kernel();
        // A KASAN-sized (32 KiB) stack on both CPUs: init_task's and B's.
        for (base, task, stack) in [
            (PCPU[0], SYMS.init_task, 0xffff_c900_0001_0000u64),
            (PCPU[1], TASK_B, 0xffff_c900_0002_0000),
        ] {
            m.put64(task + L.stack, stack);
            m.put64(base + TOP, stack + (32 << 10));
        }
        let mut t = Tasks::new(L, SYMS);
        assert_eq!(t.measure_thread_size_at(&m, TOP), Some(32 << 10));
        assert_eq!(t.layout.thread_size, 32 << 10);
        // CPU 1 mid-switch (top of the next task, current still the old):
        // its difference is no stack size, and CPU 0 decides.
        m.put64(PCPU[1] + TOP, 0xffff_c900_0003_0000 + (32 << 10));
        assert_eq!(t.measure_thread_size_at(&m, TOP), Some(32 << 10));
        // Nothing plausible anywhere: the layout keeps its size.
        m.put64(PCPU[0] + TOP, 0);
        let mut t = Tasks::new(L, SYMS);
        assert_eq!(t.measure_thread_size_at(&m, TOP), None);
        assert_eq!(t.layout.thread_size, THREAD_SIZE);
    }

    #[test]
    fn lists_idle_leaders_threads_and_running() {
        let m = kernel();
        let tasks = Tasks::new(L, SYMS);
        // vCPU 0 in user mode: the kernel's GS base is in KERNEL_GS_BASE.
        let r0 = VcpuRegs {
            gs_base: 0,
            kernel_gs_base: Some(PCPU[0]),
            cs_selector: 0x33,
            ..Default::default()
        };
        let list = tasks.list(&m, &[r0, regs(PCPU[1])]).unwrap();
        let summary: Vec<_> = list
            .iter()
            .map(|t| {
                (
                    t.pid,
                    t.tgid,
                    t.comm.as_str(),
                    t.idle_cpu,
                    t.running.map(|r| r.vcpu),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, 0, "swapper/0", Some(0), Some(0)),
                (0, 0, "swapper/1", Some(1), None),
                (100, 100, "leader", None, None),
                (101, 100, "worker", None, Some(1)),
            ]
        );
        let b = &list[3];
        assert!(b.on_cpu);
        assert_eq!(
            b.stack,
            0xffff_c900_0000_0000 + 101 * 0x4000..0xffff_c900_0000_0000 + 102 * 0x4000
        );
        assert_eq!(b.saved_sp, 0xffff_c900_0000_3f00);
        assert_eq!(list[2].state_char(), 'S');
        assert_eq!(b.state_char(), 'R');
    }

    /// With FSGSBASE a user process sets its GS base to anything, another
    /// CPU's per-CPU base included, and that value sits in GS_BASE while
    /// it runs in user mode and in KERNEL_GS_BASE while it is in the
    /// kernel. Only the register that holds the kernel's base in the
    /// vCPU's mode decides which CPU it is.
    #[test]
    fn a_forged_user_gs_base_does_not_move_a_vcpu_to_another_cpu() {
        let m = kernel();
        let tasks = Tasks::new(L, SYMS);
        // vCPU 0 in user mode on CPU 0, its user GS set to CPU 1's base.
        let user = VcpuRegs {
            gs_base: PCPU[1],
            kernel_gs_base: Some(PCPU[0]),
            cs_selector: 0x33,
            ..Default::default()
        };
        // vCPU 1 in the kernel on CPU 1 for a task whose user GS is CPU
        // 0's base (now in KERNEL_GS_BASE).
        let kernel = VcpuRegs {
            gs_base: PCPU[1],
            kernel_gs_base: Some(PCPU[0]),
            ..Default::default()
        };
        let list = tasks.list(&m, &[user, kernel]).unwrap();
        let running: Vec<_> = list
            .iter()
            .filter_map(|t| Some((t.comm.as_str(), t.running?.vcpu, t.running?.cpu)))
            .collect();
        assert_eq!(running, vec![("swapper/0", 0, 0), ("worker", 1, 1)]);
        // Two vCPUs claiming CPU 1: neither is trusted with it.
        let list = tasks.list(&m, &[kernel, kernel]).unwrap();
        assert!(list.iter().all(|t| t.running.is_none()), "{list:?}");
        assert_eq!(percpu_gs_base(&user), Some(PCPU[0]));
        assert_eq!(percpu_gs_base(&kernel), Some(PCPU[1]));
    }

    #[test]
    fn thread_group_ring() {
        let mut m = kernel();
        let layout = TaskLayout {
            threads: ThreadLinks::ThreadGroup { thread_group: 0x70 },
            ..L
        };
        m.put64(TASK_A + 0x70, TASK_B + 0x70);
        m.put64(TASK_B + 0x70, TASK_A + 0x70);
        let list = Tasks::new(layout, SYMS).list(&m, &[]).unwrap();
        assert_eq!(
            list.iter().map(|t| t.pid).collect::<Vec<_>>(),
            vec![0, 0, 100, 101]
        );
    }

    #[test]
    fn cycles_are_detected() {
        let mut m = kernel();
        // A.thread_node -> B.thread_node -> A.thread_node, never the head.
        m.put64(TASK_B + 0x60, TASK_A + 0x60);
        let e = Tasks::new(L, SYMS).list(&m, &[]).unwrap_err();
        assert!(
            matches!(
                e,
                TasksError::Cycle {
                    list: "signal->thread_head",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn budget_bounds_the_walk() {
        let m = kernel();
        let mut t = Tasks::new(L, SYMS);
        t.max_tasks = 2;
        assert!(matches!(
            t.list(&m, &[]),
            Err(TasksError::TooMany { limit: 2 })
        ));
    }

    #[test]
    fn bad_pointers_and_counts_are_errors() {
        let mut m = kernel();
        m.put64(TASK_A + L.tasks, 0x4141_4141);
        assert!(matches!(
            Tasks::new(L, SYMS).list(&m, &[]),
            Err(TasksError::BadPointer { .. })
        ));
        let mut m = kernel();
        m.put64(TASK_A + L.tasks, 0xffff_8880_dead_0000);
        assert!(matches!(
            Tasks::new(L, SYMS).list(&m, &[]),
            Err(TasksError::Read { .. })
        ));
        let mut m = kernel();
        m.put32(SYMS.nr_cpu_ids, u32::MAX);
        assert!(matches!(
            Tasks::new(L, SYMS).list(&m, &[]),
            Err(TasksError::TooManyCpus(_))
        ));
        let m = kernel();
        let layout = TaskLayout { comm: 0x1f8, ..L };
        assert!(matches!(
            Tasks::new(layout, SYMS).list(&m, &[]),
            Err(TasksError::FieldOutside { field: "comm", .. })
        ));
    }

    #[test]
    fn state_letters_follow_6_1() {
        let mut t = Task {
            addr: 0,
            pid: 1,
            tgid: 1,
            comm: String::new(),
            state: 0,
            exit_state: 0,
            flags: 0,
            on_cpu: false,
            stack: 0..0,
            saved_sp: 0,
            switches: 0,
            start_time: 0,
            idle_cpu: None,
            running: None,
        };
        for (state, exit, c) in [
            (0, 0, 'R'),
            (1, 0, 'S'),
            (2, 0, 'D'),
            (4, 0, 'T'),
            (8, 0, 't'),
            (0, 0x10, 'X'),
            (0, 0x20, 'Z'),
            (0x40, 0, 'P'),
            (0x402, 0, 'I'),
            (0x1000, 0, 'D'),
            (0x101, 0, 'S'),
        ] {
            t.state = state;
            t.exit_state = exit;
            assert_eq!(t.state_char(), c, "state {state:#x} exit {exit:#x}");
        }
    }
}

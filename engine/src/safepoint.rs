//! Safe points, checked from outside: with every vCPU paused, does any task
//! (running, sleeping or idle) have its RIP or a return address inside a
//! function the transition changes?
//!
//! This is klp's consistency model collapsed into one instant: klp switches
//! each task when its own stack is clean; we switch all of them at once, so
//! all stacks must be clean at once (as Ksplice did under stop_machine).
//!
//! A sleeping task whose stack unwinds reliably with the kernel's ORC
//! tables ([`Orc::unwind_sleeping`]) is judged by its real frames, as klp
//! judges it. Every other stack is scanned conservatively: every 8-byte
//! word between a task's
//! stack pointer and the top of its stack that points into a changed
//! function counts, whether or not it is really a return address. A stale
//! word can only delay a transition (it is retried), never let an unsafe
//! one through. Where a stack pointer is on no stack we know, the task
//! blocks: unknown means unsafe.
//!
//! Stacks: a sleeping task's from `thread.sp`; a task running in kernel
//! mode from the vCPU's RSP, and when that is on the CPU's IRQ stack, the
//! IRQ stack and then the task's stack from the pointer x86-64 saves at the
//! IRQ stack's top (`call_on_irqstack`). A vCPU in user mode has nothing on
//! its kernel stack.
//!
//! Return addresses hidden behind a trampoline (rethook, kretprobes, the
//! function-graph tracer: see [`klpvisor_guest::retaddr`]) are on no
//! stack: every task's are read from its lists and judged as return
//! addresses ([`Seen::Hooked`]), whether or not a walk or scan meets the
//! trampoline, and the ORC walk continues from the real address. A task
//! whose lists cannot be read, or whose stack holds a trampoline whose
//! lists this kernel's BTF does not describe, blocks
//! ([`Seen::Unrecoverable`]).

use std::ops::Range;

use thiserror::Error;

use klpvisor_guest::orc::Orc;
use klpvisor_guest::retaddr::{ReturnHooks, TaskHooks, Why};
use klpvisor_guest::tasks::percpu_gs_base;
use klpvisor_guest::VcpuRegs;
use klpvisor_guest::{Btf, Kallsyms, Task, VirtRead};

/// The largest stack scanned (x86-64's THREAD_SIZE is 16 KiB, 32 KiB with
/// KASAN): a forged stack range cannot make us read megabytes.
pub const MAX_STACK: u64 = 64 << 10;

/// x86-64's IRQ stack size (IRQ_STACK_SIZE, without KASAN).
pub const IRQ_STACK_SIZE: u64 = 16 << 10;

/// Why the stack check itself could not run (as opposed to finding a
/// blocker): an inconsistency between the task walk and the registers.
#[derive(Debug, Error)]
pub enum SafepointError {
    /// The task walk placed a task on a vCPU whose registers are missing.
    #[error("vCPU {vcpu} runs task {pid} but has no registers")]
    NoRegs {
        /// The vCPU the task walk placed the task on.
        vcpu: usize,
        /// The task's pid.
        pid: i32,
    },
}

/// A function the transition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Its code, kernel-virtual: an old function's whole body, or a
    /// patch's new code when that code is being retired.
    pub range: Range<u64>,
    /// What blockers call it (the function's name, or "retired PATCH").
    pub name: String,
}

/// Where a changed function was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The vCPU was executing it.
    Rip {
        /// The vCPU (0-based) whose RIP is inside the function.
        vcpu: usize,
    },
    /// A stack word at `slot` points into it.
    Stack {
        /// The stack word's kernel-virtual address.
        slot: u64,
    },
    /// It is frame `depth` (0: innermost) of the task's unwound stack.
    Frame {
        /// 0 for the innermost frame.
        depth: usize,
    },
    /// The vCPU's stack pointer is on no stack we know.
    UnknownStack {
        /// The vCPU whose RSP it is.
        vcpu: usize,
        /// The stack pointer, kernel-virtual.
        rsp: u64,
    },
    /// The task's stack could not be read (blocks: unknown means unsafe).
    Unreadable {
        /// The address whose read failed.
        addr: u64,
    },
    /// vCPU `vcpu` executes in long mode, yet the task walk placed no task
    /// on it: its kernel per-CPU base `gs` (see
    /// [`klpvisor_guest::tasks::percpu_gs_base`]; `None` in user mode
    /// without a recorded KERNEL_GS_BASE) is no CPU's, or is also vCPU
    /// `shared_with`'s. Which task it runs is then unknown, and so is what
    /// that task's stack holds: the blocker is the vCPU, not a task
    /// (`pid` -1, `comm` empty).
    Vcpu {
        /// The vCPU no task was placed on.
        vcpu: usize,
        /// Its kernel per-CPU base, if one is known.
        gs: Option<u64>,
        /// Another vCPU with the same base, if one has it.
        shared_with: Option<usize>,
    },
    /// A return address hidden by `trampoline`: stack slot `slot` holds
    /// the trampoline's address, the task's list the real one (`addr`).
    Hooked {
        /// The trampoline's symbol (`arch_rethook_trampoline`, ...).
        trampoline: &'static str,
        /// The stack word holding the trampoline's address.
        slot: u64,
    },
    /// The task has returns through `trampoline` whose real addresses
    /// cannot be read (`slot`: where its stack holds the trampoline, when
    /// that is how it was found). Blocks: unknown means unsafe.
    Unrecoverable {
        /// The trampoline's symbol.
        trampoline: &'static str,
        /// Why the real addresses cannot be read.
        why: Why,
        /// The stack word holding the trampoline's address, if found there.
        slot: Option<u64>,
    },
}

/// A task (or, for [`Seen::Vcpu`], a vCPU) that keeps the transition
/// from committing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    /// The task's pid; -1 for [`Seen::Vcpu`].
    pub pid: i32,
    /// The task's comm; empty for [`Seen::Vcpu`].
    pub comm: String,
    /// The changed function (empty for [`Seen::UnknownStack`],
    /// [`Seen::Unreadable`] and [`Seen::Vcpu`]).
    pub func: String,
    /// The address found (RIP or the stack word's value; the per-CPU base
    /// for [`Seen::Vcpu`], 0 if unknown).
    pub addr: u64,
    /// How it was found, which says how sure the check is.
    pub seen: Seen,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seen {
            Seen::Rip { vcpu } => write!(
                f,
                "pid {} ({}) is executing {} ({:#x}) on vCPU {vcpu}",
                self.pid, self.comm, self.func, self.addr
            ),
            Seen::Stack { slot } => write!(
                f,
                "pid {} ({}) has {} ({:#x}) on its stack at {slot:#x}",
                self.pid, self.comm, self.func, self.addr
            ),
            Seen::Frame { depth } => write!(
                f,
                "pid {} ({}) is in {} ({:#x}, frame {depth} of its stack)",
                self.pid, self.comm, self.func, self.addr
            ),
            Seen::UnknownStack { vcpu, rsp } => write!(
                f,
                "pid {} ({}) runs on vCPU {vcpu} with RSP {rsp:#x} on no known stack",
                self.pid, self.comm
            ),
            Seen::Unreadable { addr } => write!(
                f,
                "pid {} ({}): its stack at {addr:#x} cannot be read",
                self.pid, self.comm
            ),
            Seen::Hooked { trampoline, slot } => write!(
                f,
                "pid {} ({}) will return into {} ({:#x}) through {trampoline}, whose address \
                 stands for it at {slot:#x} on its stack",
                self.pid, self.comm, self.func, self.addr
            ),
            Seen::Unrecoverable {
                trampoline,
                why,
                slot,
            } => {
                write!(
                    f,
                    "pid {} ({}) has returns through {trampoline} whose real addresses cannot \
                     be recovered: {why}",
                    self.pid, self.comm
                )?;
                match slot {
                    Some(slot) => write!(f, " ({trampoline} at {slot:#x} on its stack)"),
                    None => Ok(()),
                }
            }
            Seen::Vcpu { vcpu, gs: None, .. } => write!(
                f,
                "vCPU {vcpu} is in user mode and its KERNEL_GS_BASE is not known (the register \
                 source records no MSRs): which CPU it is, and which task it runs, is unknown"
            ),
            Seen::Vcpu {
                vcpu,
                gs: Some(gs),
                shared_with: Some(other),
            } => write!(
                f,
                "vCPU {vcpu} and vCPU {other} have the same per-CPU base {gs:#x}: which of them \
                 is that CPU, and which task each runs, is unknown (a user GS base set to \
                 another CPU's, seen between a kernel entry and its swapgs; retried)"
            ),
            Seen::Vcpu {
                vcpu,
                gs: Some(gs),
                shared_with: None,
            } => write!(
                f,
                "vCPU {vcpu} executes in long mode, but its per-CPU base {gs:#x} is no CPU's: \
                 the task it runs is unknown (paused between a kernel entry and its swapgs, or \
                 a CPU still coming up; retried)"
            ),
        }
    }
}

/// The functions a transition changes, sorted for lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Check {
    spans: Vec<Span>,
    /// Each CPU's entry stack ([`entry_stacks`]).
    entry_stacks: Vec<Range<u64>>,
}

impl Check {
    /// The check for `spans` (empty ones are dropped).
    pub fn new(mut spans: Vec<Span>) -> Self {
        spans.retain(|s| s.range.start < s.range.end);
        spans.sort_by_key(|s| s.range.start);
        Self {
            spans,
            entry_stacks: Vec::new(),
        }
    }

    /// The same check, knowing each CPU's entry stack: a task running
    /// with its stack pointer there has no kernel frame (see
    /// [`entry_stacks`]), where otherwise its stack would be unknown and
    /// block.
    pub fn with_entry_stacks(mut self, stacks: Vec<Range<u64>>) -> Self {
        self.entry_stacks = stacks;
        self
    }

    /// Whether there is nothing to check: a transition that changes no
    /// function needs no safe point.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Adds the spans of `more` whose ranges it does not have yet (equal
    /// ranges twice would be harmless; overlapping unequal ones are not
    /// expected: functions and patch code do not overlap).
    pub fn extend(&mut self, more: impl IntoIterator<Item = Span>) {
        let mut spans = std::mem::take(&mut self.spans);
        for s in more {
            if !spans.iter().any(|x| x.range == s.range) {
                spans.push(s);
            }
        }
        *self = Check::new(spans);
    }

    /// The changed function containing `addr`.
    pub fn hit(&self, addr: u64) -> Option<&Span> {
        let i = self.spans.partition_point(|s| s.range.start <= addr);
        let s = self.spans.get(i.checked_sub(1)?)?;
        s.range.contains(&addr).then_some(s)
    }

    /// Whether every span lies where a [`Summary`] keeps words (at or
    /// above [`TEXT_FLOOR`]), so that summaries can judge this check.
    pub fn summarisable(&self) -> bool {
        self.spans.iter().all(|x| x.range.start >= TEXT_FLOOR)
    }

    /// Whether a task at rest whose stack `s` summarises blocks this check
    /// (see [`Summary`]). A check with a span below [`TEXT_FLOOR`], whose
    /// words a summary would not have kept, blocks on every summary.
    pub fn summary_blocks(&self, s: &Summary) -> bool {
        match s {
            Summary::Dead => false,
            Summary::Blocks => true,
            Summary::Words { .. } if !self.summarisable() => true,
            Summary::Words { returns, exact } => {
                returns.iter().any(|&ip| self.return_hit(ip).is_some())
                    || exact.iter().any(|&v| self.hit(v).is_some())
            }
        }
    }

    /// Every task that blocks the transition, every stack scanned
    /// conservatively. `regs[v]` are vCPU v's registers; `irq_stacks` are
    /// the CPUs' IRQ stacks.
    pub fn blockers<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        tasks: &[Task],
        regs: &[VcpuRegs],
        irq_stacks: &[Range<u64>],
    ) -> Result<Vec<Blocker>, SafepointError> {
        self.blockers_with(mem, tasks, regs, irq_stacks, None)
    }

    /// [`Check::blockers`], sleeping tasks judged by their ORC-unwound
    /// frames where `orc` unwinds them reliably.
    pub fn blockers_with<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        tasks: &[Task],
        regs: &[VcpuRegs],
        irq_stacks: &[Range<u64>],
        orc: Option<&Orc>,
    ) -> Result<Vec<Blocker>, SafepointError> {
        let none = ReturnHooks::default();
        self.blockers_hooked(mem, tasks, regs, irq_stacks, orc, &none)
    }

    /// [`Check::blockers_with`], with the return addresses the kernel's
    /// return hooks (`hooks`) took off every task's stack judged as its
    /// other return addresses. The engine always checks this way: without
    /// `hooks`, a kretprobe or the function-graph tracer hides the return
    /// into a changed function.
    pub fn blockers_hooked<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        tasks: &[Task],
        regs: &[VcpuRegs],
        irq_stacks: &[Range<u64>],
        orc: Option<&Orc>,
        hooks: &ReturnHooks,
    ) -> Result<Vec<Blocker>, SafepointError> {
        self.blockers_prescanned(mem, tasks, regs, irq_stacks, orc, hooks, None)
    }

    /// [`Check::blockers_hooked`], skipping every task that `prescan` found
    /// clear and that has not run since ([`Prescan::still_clear`]).
    #[allow(clippy::too_many_arguments)]
    pub fn blockers_prescanned<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        tasks: &[Task],
        regs: &[VcpuRegs],
        irq_stacks: &[Range<u64>],
        orc: Option<&Orc>,
        hooks: &ReturnHooks,
        prescan: Option<&Prescan>,
    ) -> Result<Vec<Blocker>, SafepointError> {
        let mut out = Vec::new();
        if self.is_empty() {
            return Ok(out);
        }
        self.unplaced_vcpus(tasks, regs, &mut out);
        for t in tasks {
            if prescan.is_some_and(|p| p.still_clear(t)) {
                continue;
            }
            self.judge(mem, t, regs, irq_stacks, orc, hooks, &mut out)?;
        }
        Ok(out)
    }

    /// Judges the tasks of `tasks` that are off every CPU, read while the
    /// guest runs, and keeps those it found clear for the check in the
    /// pause ([`Check::blockers_prescanned`]): most tasks sleep through a
    /// transition, and unwinding each of them was most of the pause.
    ///
    /// `reread` reads a task again after it was judged. A task is kept only
    /// if both reads show it off every CPU (`on_cpu` clear), with the same
    /// stack, saved stack pointer and context-switch count: then it did
    /// not run while its stack was read (a task switched in sets `on_cpu`
    /// before it runs and, to stop running, is switched out, which counts),
    /// so what was judged is a stack at rest, exactly what the pause would
    /// have seen at that moment. Reads that fail or race only drop tasks
    /// from the result; the pause judges those in full.
    #[allow(clippy::too_many_arguments)]
    pub fn prescan<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        tasks: &[Task],
        orc: Option<&Orc>,
        hooks: &ReturnHooks,
        mut reread: impl FnMut(u64) -> Option<Task>,
    ) -> Prescan {
        let mut scan = Prescan::default();
        if self.is_empty() {
            return scan;
        }
        for t in tasks {
            if !scan.judge_one(self, mem, t, orc, hooks, &mut reread) {
                scan.unclear.push(t.addr);
            }
        }
        scan
    }

    /// Judges one task; what blocks goes to `out`.
    #[allow(clippy::too_many_arguments)]
    fn judge<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        t: &Task,
        regs: &[VcpuRegs],
        irq_stacks: &[Range<u64>],
        orc: Option<&Orc>,
        hooks: &ReturnHooks,
        out: &mut Vec<Blocker>,
    ) -> Result<(), SafepointError> {
        // A dead task never runs again: nothing on its stack (often
        // already freed) can be returned into. An exiting task that is not
        // dead yet is checked like any other (see `Task::is_dead`).
        if t.is_dead() {
            return Ok(());
        }
        let th = if hooks.is_empty() {
            TaskHooks::default()
        } else {
            hooks.of_task(mem, t.addr)
        };
        self.hooked(t, &th, out);
        let mut ranges: Vec<Range<u64>> = Vec::new();
        match t.running {
            Some(run) => {
                let r = regs.get(run.vcpu).ok_or(SafepointError::NoRegs {
                    vcpu: run.vcpu,
                    pid: t.pid,
                })?;
                if r.cpl() != 0 {
                    return Ok(()); // user mode: an empty kernel stack
                }
                if let Some(s) = self.hit(r.rip) {
                    out.push(blocker(t, s, r.rip, Seen::Rip { vcpu: run.vcpu }));
                }
                if t.stack.contains(&r.rsp) {
                    ranges.push(r.rsp..t.stack.end);
                } else if let Some(irq) = irq_stacks.iter().find(|s| s.contains(&r.rsp)) {
                    ranges.push(r.rsp..irq.end);
                    let prev = mem.read_u64(irq.end.wrapping_sub(8)).ok();
                    match prev.filter(|p| t.stack.contains(p)) {
                        Some(p) => ranges.push(p..t.stack.end),
                        None => ranges.push(t.stack.clone()),
                    }
                } else if self.entry_stacks.iter().any(|s| s.contains(&r.rsp)) {
                    // Between user mode and its kernel stack: entering
                    // (before the entry code moves to the task's stack) or
                    // leaving (after the last kernel frame returned). No
                    // kernel frame is live, and the RIP, entry code that is
                    // never patched, was judged above.
                    return Ok(());
                } else {
                    out.push(Blocker {
                        pid: t.pid,
                        comm: t.comm.clone(),
                        func: String::new(),
                        addr: r.rsp,
                        seen: Seen::UnknownStack {
                            vcpu: run.vcpu,
                            rsp: r.rsp,
                        },
                    });
                    return Ok(());
                }
            }
            // Off every CPU: its saved frame is complete (a task still
            // on_cpu may be mid-switch).
            None if !t.on_cpu
                && t.stack.contains(&t.saved_sp)
                && orc.is_some_and(|o| self.frames(mem, o, t, (hooks, &th), out)) => {}
            None if t.stack.contains(&t.saved_sp) => ranges.push(t.saved_sp..t.stack.end),
            // A saved SP off its stack: scan all of it (conservative).
            None => ranges.push(t.stack.clone()),
        }
        let mut unknown = false;
        for range in ranges {
            self.scan(mem, t, range, hooks, &mut unknown, out)?;
        }
        Ok(())
    }

    /// Blocks on every vCPU in long mode that runs no task of `tasks`. Its
    /// CPU's current task would otherwise be judged as if off-CPU, by a
    /// stale saved stack pointer and without the vCPU's RIP, and a forged
    /// or ambiguous GS base would pass silently. A vCPU outside long mode
    /// executes no kernel code and is left out.
    fn unplaced_vcpus(&self, tasks: &[Task], regs: &[VcpuRegs], out: &mut Vec<Blocker>) {
        let placed = |v: usize| tasks.iter().any(|t| t.running.is_some_and(|r| r.vcpu == v));
        for (vcpu, r) in regs.iter().enumerate() {
            if !r.in_long_mode() || placed(vcpu) {
                continue;
            }
            let gs = percpu_gs_base(r);
            let shared_with = gs.and_then(|gs| {
                regs.iter()
                    .enumerate()
                    .find(|&(w, o)| w != vcpu && o.in_long_mode() && percpu_gs_base(o) == Some(gs))
                    .map(|(w, _)| w)
            });
            out.push(Blocker {
                pid: -1,
                comm: String::new(),
                func: String::new(),
                addr: gs.unwrap_or(0),
                seen: Seen::Vcpu {
                    vcpu,
                    gs,
                    shared_with,
                },
            });
        }
    }

    /// Judges every return `t`'s hooks took off its stack, and blocks for
    /// each mechanism whose lists could not be read.
    fn hooked(&self, t: &Task, th: &TaskHooks, out: &mut Vec<Blocker>) {
        for h in &th.hooked {
            if let Some(s) = self.return_hit(h.ret) {
                out.push(blocker(
                    t,
                    s,
                    h.ret,
                    Seen::Hooked {
                        trampoline: h.trampoline,
                        slot: h.slot,
                    },
                ));
            }
        }
        for u in &th.unrecoverable {
            out.push(unrecoverable(t, u.trampoline, u.why, None));
        }
    }

    /// The changed function a return address `ip` returns into. A return
    /// address may sit just past its function's end (a call as the last
    /// instruction): the call site is ip - 1.
    fn return_hit(&self, ip: u64) -> Option<&Span> {
        self.hit(ip).or_else(|| self.hit(ip.wrapping_sub(1)))
    }

    /// Judges sleeping `t` by its unwound frames; false if its stack does
    /// not unwind reliably (then it must be scanned). Frames recovered
    /// from behind a trampoline were judged with the task's hooks
    /// ([`Check::hooked`]).
    fn frames<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        orc: &Orc,
        t: &Task,
        hooks: (&ReturnHooks, &TaskHooks),
        out: &mut Vec<Blocker>,
    ) -> bool {
        let Ok(frames) = orc.unwind_sleeping_hooked(mem, t, hooks) else {
            return false;
        };
        for (depth, f) in frames.iter().enumerate() {
            if f.hooked.is_some() {
                continue;
            }
            if let Some(s) = self.return_hit(f.ip) {
                out.push(blocker(t, s, f.ip, Seen::Frame { depth }));
            }
        }
        true
    }

    /// Scans `range` of `t`'s stacks. A word that is the trampoline of a
    /// mechanism whose lists this kernel's BTF does not describe blocks
    /// once per task (`unknown` records that it did).
    fn scan<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        t: &Task,
        range: Range<u64>,
        hooks: &ReturnHooks,
        unknown: &mut bool,
        out: &mut Vec<Blocker>,
    ) -> Result<(), SafepointError> {
        let start = range.start & !7;
        let len = range.end.saturating_sub(start).min(MAX_STACK);
        if len == 0 {
            return Ok(());
        }
        // len <= MAX_STACK, so it fits in usize.
        let mut buf = vec![0u8; len as usize];
        if mem.read_virt(start, &mut buf).is_err() {
            out.push(Blocker {
                pid: t.pid,
                comm: t.comm.clone(),
                func: String::new(),
                addr: start,
                seen: Seen::Unreadable { addr: start },
            });
            return Ok(());
        }
        for (i, w) in buf.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            let v = u64::from_le_bytes(word);
            let slot = start + 8 * i as u64;
            if let Some(s) = self.hit(v) {
                out.push(blocker(t, s, v, Seen::Stack { slot }));
            } else if !*unknown && hooks.layout_unknown(v) {
                if let Some((_, name)) = hooks.trampoline_at(v) {
                    *unknown = true;
                    out.push(unrecoverable(t, name, Why::UnknownLayout, Some(slot)));
                }
            }
        }
        Ok(())
    }
}

/// The lowest address a changed function can have: every span is kernel
/// text, module text or the arena next to the kernel image, all in the
/// top 2 GiB. A [`Summary`] keeps only stack words from there.
pub const TEXT_FLOOR: u64 = 0xffff_ffff_8000_0000;

/// The most words a [`Summary`] keeps; a stack with more is not
/// summarised (it is read again whenever it is judged).
pub const MAX_SUMMARY: usize = 1024;

/// What a sleeping task's stack holds that any check could find, read
/// once: the return addresses of its unwound frames and of its return
/// hooks, or, where it could not be unwound, every word of it in the top
/// 2 GiB. While the task does not run, its stack and hooks do not change,
/// so a later transition judges it from this ([`Check::summary_blocks`])
/// without reading the guest again: the same verdict [`Check::judge`]
/// gives that task at rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Summary {
    /// Dead: it never runs again.
    Dead,
    /// The addresses a check compares.
    Words {
        /// Return addresses: a call as a function's last instruction
        /// returns just past its end (judged as ip and ip - 1).
        returns: Vec<u64>,
        /// Stack words of a conservative scan (judged exactly).
        exact: Vec<u64>,
    },
    /// It blocks every check: part of its stack could not be read, or a
    /// return hook's lists are unknown.
    Blocks,
}

/// The [`Summary`] of `t`, read now; `None` for a task on a CPU (its
/// stack moves) or a stack with more than [`MAX_SUMMARY`] words to keep.
pub fn summarize<M: VirtRead + ?Sized>(
    mem: &M,
    t: &Task,
    orc: Option<&Orc>,
    hooks: &ReturnHooks,
) -> Option<Summary> {
    if t.on_cpu || t.running.is_some() {
        return None;
    }
    if t.is_dead() {
        return Some(Summary::Dead);
    }
    let th = if hooks.is_empty() {
        TaskHooks::default()
    } else {
        hooks.of_task(mem, t.addr)
    };
    if !th.unrecoverable.is_empty() {
        return Some(Summary::Blocks);
    }
    let mut returns: Vec<u64> = th.hooked.iter().map(|h| h.ret).collect();
    let range = if t.stack.contains(&t.saved_sp) {
        if let Some(frames) = orc.and_then(|o| o.unwind_sleeping_hooked(mem, t, (hooks, &th)).ok())
        {
            returns.extend(frames.iter().filter(|f| f.hooked.is_none()).map(|f| f.ip));
            returns.sort_unstable();
            returns.dedup();
            return (returns.len() <= MAX_SUMMARY).then_some(Summary::Words {
                returns,
                exact: Vec::new(),
            });
        }
        t.saved_sp..t.stack.end
    } else {
        t.stack.clone()
    };
    let start = range.start & !7;
    let len = range.end.saturating_sub(start).min(MAX_STACK);
    let mut buf = vec![0u8; len as usize];
    if mem.read_virt(start, &mut buf).is_err() {
        return Some(Summary::Blocks);
    }
    let mut exact = Vec::new();
    for w in buf.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        let v = u64::from_le_bytes(word);
        if hooks.layout_unknown(v) && hooks.trampoline_at(v).is_some() {
            return Some(Summary::Blocks);
        }
        if v >= TEXT_FLOOR {
            exact.push(v);
        }
    }
    exact.sort_unstable();
    exact.dedup();
    returns.sort_unstable();
    returns.dedup();
    (returns.len() + exact.len() <= MAX_SUMMARY).then_some(Summary::Words { returns, exact })
}

/// Which task a task_struct held: a freed task_struct can be reused by a
/// new task, whose switch count starts again at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    pid: i32,
    start_time: u64,
    stack: u64,
    saved_sp: u64,
    switches: u64,
}

impl Identity {
    fn of(t: &Task) -> Self {
        Self {
            pid: t.pid,
            start_time: t.start_time,
            stack: t.stack.start,
            saved_sp: t.saved_sp,
            switches: t.switches,
        }
    }
}

/// The tasks a check found clear while the guest ran ([`Check::prescan`]).
///
/// Why skipping them in the pause is sound: a task is skipped only if, in
/// the pause, it is off every CPU and no vCPU runs it, and it is the same
/// task (pid, start time, stack) with the same context-switch count and
/// saved stack pointer as when its stack was judged at rest. A task that
/// ran since was switched in (setting `on_cpu`) and, unless it still
/// runs, switched out again, which raised `nvcsw` or `nivcsw`; so its
/// stack, its return hooks' lists and its saved frame are what was
/// judged. Nothing else writes a sleeping task's return addresses. A
/// guest kernel that broke those rules (a forged count) could only make
/// klpvisor patch itself at an unsafe point: it hurts its own kernel,
/// never the host.
#[derive(Debug, Clone, Default)]
pub struct Prescan {
    clear: std::collections::HashMap<u64, Identity>,
    /// Every other task the pre-scan listed (running, blocking, racing,
    /// unreadable), by `task_struct` address.
    unclear: Vec<u64>,
    /// The switch log's head when the pre-scan began, if the log is live
    /// (see [`crate::switches`]).
    pub head0: Option<u64>,
    /// The summary of every task read at rest, consistently (both reads
    /// the same task, off every CPU, unswitched), clear or not: what a
    /// [`StackCache`] keeps for the next pre-scan.
    summaries: std::collections::HashMap<u64, (Identity, Summary)>,
}

impl Prescan {
    /// Judges `t` at rest and keeps it if it is clear (see
    /// [`Check::prescan`]); false if it was not kept.
    fn judge_one<M: VirtRead + ?Sized>(
        &mut self,
        check: &Check,
        mem: &M,
        t: &Task,
        orc: Option<&Orc>,
        hooks: &ReturnHooks,
        reread: &mut impl FnMut(u64) -> Option<Task>,
    ) -> bool {
        if t.on_cpu || t.running.is_some() {
            return false;
        }
        // A stack too big to summarise is judged as it is, and not kept
        // for a later pre-scan.
        let summary = summarize(mem, t, orc, hooks);
        let blocks = match &summary {
            Some(s) if check.summarisable() => check.summary_blocks(s),
            _ => {
                let mut out = Vec::new();
                let judged = check.judge(mem, t, &[], &[], orc, hooks, &mut out);
                judged.is_err() || !out.is_empty()
            }
        };
        let Some(again) = reread(t.addr) else {
            return false;
        };
        let id = Identity::of(t);
        if again.on_cpu || Identity::of(&again) != id {
            return false;
        }
        if let Some(s) = summary.filter(|s| *s != Summary::Blocks) {
            self.summaries.insert(t.addr, (id, s));
        }
        if blocks {
            return false;
        }
        self.clear.insert(t.addr, id);
        true
    }

    /// The tasks the pre-scan listed and did not find clear: with the
    /// tasks that took part in a switch since and those running now,
    /// every task the pause must judge (see [`crate::switches`]).
    pub fn unclear(&self) -> &[u64] {
        &self.unclear
    }

    /// Tasks found clear.
    pub fn len(&self) -> usize {
        self.clear.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.clear.is_empty()
    }

    /// Whether `t`, read in the pause, was found clear and has not run
    /// since.
    pub fn still_clear(&self, t: &Task) -> bool {
        !t.on_cpu && t.running.is_none() && self.clear.get(&t.addr) == Some(&Identity::of(t))
    }
}

/// Pre-scans kept at most this many rounds before a full walk lists the
/// tasks again (tasks that exited and were never named stay in the
/// cache until then).
pub const CACHE_ROUNDS: u32 = 64;

/// The summaries of the tasks at rest (see [`Summary`]), kept from one
/// pre-scan to the next while the switch log runs: a task the log does not
/// name between two pre-scans has not run, so its summary still holds,
/// and the next pre-scan reads only the tasks the log names and those it
/// could not summarise. The pre-scan then costs what the switches cost,
/// not what the tasks cost.
#[derive(Debug, Clone, Default)]
pub struct StackCache {
    /// The switch log's registration it belongs to: a log unregistered in
    /// between missed switches.
    pub epoch: u64,
    /// The ring's head read before the reads that made it current.
    pub head: u64,
    tasks: std::collections::HashMap<u64, (Identity, Summary)>,
    /// Tasks last seen without a summary (on a CPU, racing, unreadable,
    /// too big): read again each time.
    uncached: Vec<u64>,
    /// Tasks the full walk it started from listed.
    listed: usize,
    /// Pre-scans since that walk.
    rounds: u32,
}

impl StackCache {
    /// The cache a full pre-scan `scan` of `listed` tasks leaves, for the
    /// log's registration `epoch`, its head `head` read before the walk.
    pub fn from_full(scan: &Prescan, epoch: u64, head: u64, listed: usize) -> Self {
        Self::of(scan, epoch, head, listed, 0)
    }

    /// What `scan` leaves: its summaries, and the tasks it listed without
    /// one.
    fn of(scan: &Prescan, epoch: u64, head: u64, listed: usize, rounds: u32) -> Self {
        Self {
            epoch,
            head,
            tasks: scan.summaries.clone(),
            uncached: scan
                .unclear
                .iter()
                .copied()
                .filter(|a| !scan.summaries.contains_key(a))
                .collect(),
            listed,
            rounds,
        }
    }

    /// Whether a pre-scan under the log's registration `epoch` may start
    /// from it (else a full walk lists the tasks again).
    pub fn usable(&self, epoch: u64) -> bool {
        self.epoch == epoch
            && self.rounds < CACHE_ROUNDS
            && self.tasks.len() <= self.listed.saturating_mul(2).saturating_add(256)
    }

    /// Tasks it holds a summary of.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Check {
    /// [`Check::prescan`] from `cache` instead of a walk of every task:
    /// the tasks the switch log names since the cache's head (`named`,
    /// read up to `head`) and those the cache has no summary of are read
    /// (`read`, then `reread` as in a full pre-scan) and judged; every
    /// other task is judged from its summary, without a read. Returns the
    /// pre-scan (its `head0` is `head`) and the cache as of `head`.
    #[allow(clippy::too_many_arguments)]
    pub fn prescan_cached<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        cache: &StackCache,
        named: &std::collections::HashSet<u64>,
        head: u64,
        orc: Option<&Orc>,
        hooks: &ReturnHooks,
        mut read: impl FnMut(u64) -> Option<Task>,
        mut reread: impl FnMut(u64) -> Option<Task>,
    ) -> (Prescan, StackCache) {
        let mut scan = Prescan {
            head0: Some(head),
            ..Prescan::default()
        };
        for (&addr, (id, s)) in &cache.tasks {
            if named.contains(&addr) {
                continue;
            }
            scan.summaries.insert(addr, (*id, s.clone()));
            if self.summary_blocks(s) {
                scan.unclear.push(addr);
            } else {
                scan.clear.insert(addr, *id);
            }
        }
        let mut fresh: Vec<u64> = named.iter().chain(&cache.uncached).copied().collect();
        fresh.sort_unstable();
        fresh.dedup();
        for addr in fresh {
            let kept = match read(addr) {
                Some(t) => scan.judge_one(self, mem, &t, orc, hooks, &mut reread),
                None => false,
            };
            if !kept {
                scan.unclear.push(addr);
            }
        }
        let next = StackCache::of(
            &scan,
            cache.epoch,
            head,
            cache.listed,
            cache.rounds.saturating_add(1),
        );
        (scan, next)
    }
}

fn unrecoverable(t: &Task, trampoline: &'static str, why: Why, slot: Option<u64>) -> Blocker {
    Blocker {
        pid: t.pid,
        comm: t.comm.clone(),
        func: String::new(),
        addr: slot.unwrap_or(0),
        seen: Seen::Unrecoverable {
            trampoline,
            why,
            slot,
        },
    }
}

fn blocker(t: &Task, s: &Span, addr: u64, seen: Seen) -> Blocker {
    Blocker {
        pid: t.pid,
        comm: t.comm.clone(),
        func: s.name.clone(),
        addr,
        seen,
    }
}

/// Where each CPU's entry stack is found: the per-CPU offset of its TSS's
/// `sp0` (`cpu_tss_rw.x86_tss.sp0`, which on x86_64 points just past the
/// CPU's entry stack for good) and that stack's size (`struct
/// entry_stack`), from kallsyms and BTF. `None` when the kernel lacks
/// either: a task seen there then blocks as on an unknown stack.
pub fn entry_stack_sp0(kallsyms: &Kallsyms, btf: &Btf) -> Option<(u64, u64)> {
    let tss = kallsyms.addr("cpu_tss_rw").ok()?;
    let sp0 = tss.checked_add(btf.offset_of("tss_struct.x86_tss.sp0").ok()?)?;
    let size = btf.struct_size("entry_stack").ok()?;
    (size > 0).then_some((sp0, size))
}

/// Each CPU's entry (trampoline) stack, `size` bytes below its TSS's `sp0`
/// (per-CPU offset `sp0`): where the CPU lands on an entry from user mode
/// and from which it returns to user mode (with page-table isolation it
/// is mapped in both page tables). CPUs whose `sp0` is unreadable or zero
/// are skipped.
pub fn entry_stacks<M: VirtRead + ?Sized>(
    mem: &M,
    per_cpu_bases: &[(u32, u64)],
    (sp0, size): (u64, u64),
) -> Vec<Range<u64>> {
    per_cpu_bases
        .iter()
        .filter_map(|&(_, base)| mem.read_u64(base.wrapping_add(sp0)).ok())
        .filter(|&top| top > size)
        .map(|top| top - size..top)
        .collect()
}

/// The per-CPU offset of the IRQ stack's top pointer: the per-CPU variable
/// `hardirq_stack_ptr` (up to 6.1), or that member of the per-CPU
/// `pcpu_hot` (6.2+, which moved it there next to `current_task`), its
/// offset from BTF. `None` when the kernel has neither: IRQ stacks are then
/// not scanned.
pub fn hardirq_stack_ptr(kallsyms: &Kallsyms, btf: &Btf) -> Option<u64> {
    if let Ok(a) = kallsyms.addr("hardirq_stack_ptr") {
        return Some(a);
    }
    let hot = kallsyms.addr("pcpu_hot").ok()?;
    hot.checked_add(btf.offset_of("pcpu_hot.hardirq_stack_ptr").ok()?)
}

/// Each CPU's IRQ stack from its per-CPU `hardirq_stack_ptr` (which points
/// at the stack's top word). CPUs whose pointer is unreadable or zero (not
/// set up) are skipped.
pub fn irq_stacks<M: VirtRead + ?Sized>(
    mem: &M,
    per_cpu_bases: &[(u32, u64)],
    hardirq_stack_ptr: u64,
) -> Vec<Range<u64>> {
    irq_stacks_sized(mem, per_cpu_bases, hardirq_stack_ptr, IRQ_STACK_SIZE)
}

/// [`irq_stacks`] of `size` bytes each: on x86_64 IRQ_STACK_SIZE is
/// THREAD_SIZE (both `PAGE_SIZE << (2 + KASAN_STACK_ORDER)`), so the
/// kernel's stack size from BTF gives it.
pub fn irq_stacks_sized<M: VirtRead + ?Sized>(
    mem: &M,
    per_cpu_bases: &[(u32, u64)],
    hardirq_stack_ptr: u64,
    size: u64,
) -> Vec<Range<u64>> {
    per_cpu_bases
        .iter()
        .filter_map(|&(_, base)| mem.read_u64(base.wrapping_add(hardirq_stack_ptr)).ok())
        .filter(|&top| top != 0)
        .map(|top| {
            let end = top.wrapping_add(8);
            end.wrapping_sub(size)..end
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use klpvisor_guest::tasks::Running;
    use klpvisor_guest::PagingError;

    /// A disable adds the disabled patch's whole code to the check; a
    /// range already there is not added twice, and lookups still work.
    #[test]
    fn extending_a_check_adds_new_ranges_once() {
        let span = |range: Range<u64>, name: &str| Span {
            range,
            name: name.to_owned(),
        };
        let mut c = Check::new(vec![span(0x3000..0x3100, "f"), span(0x1000..0x1100, "g")]);
        c.extend([span(0x3000..0x3100, "again"), span(0x2000..0x2800, "patch")]);
        assert_eq!(c.spans.len(), 3);
        assert_eq!(c.hit(0x2400).map(|s| s.name.as_str()), Some("patch"));
        assert_eq!(c.hit(0x3050).map(|s| s.name.as_str()), Some("f"));
        assert!(c.hit(0x2800).is_none());
    }

    /// Memory of 8-byte words at given addresses.
    struct Words(Vec<(u64, u64)>);

    impl VirtRead for Words {
        fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
            buf.fill(0);
            for (i, chunk) in buf.chunks_mut(8).enumerate() {
                let at = va + 8 * i as u64;
                if let Some(&(_, v)) = self.0.iter().find(|(a, _)| *a == at) {
                    chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
                }
            }
            Ok(())
        }
    }

    fn task(pid: i32, stack: Range<u64>, sp: u64, running: Option<usize>) -> Task {
        Task {
            addr: 0xffff_8880_0000_0000 + pid as u64 * 0x1000,
            pid,
            tgid: pid,
            comm: format!("t{pid}"),
            state: 1,
            exit_state: 0,
            flags: 0,
            on_cpu: running.is_some(),
            stack,
            saved_sp: sp,
            switches: 0,
            start_time: 0,
            idle_cpu: None,
            running: running.map(|vcpu| Running {
                vcpu,
                cpu: vcpu as u32,
            }),
        }
    }

    fn check() -> Check {
        Check::new(vec![
            Span {
                range: 0x1000..0x1100,
                name: "pipe_read".into(),
            },
            Span {
                range: 0x2000..0x2040,
                name: "f".into(),
            },
        ])
    }

    #[test]
    fn sleeping_task_with_a_return_address_inside_blocks() {
        let mem = Words(vec![(0x8ff0, 0x1042), (0x8fe0, 0x1042)]);
        // sp above 0x8fe0: that stale word below the SP must not count.
        let t = task(7, 0x8000..0x9000, 0x8fe8, None);
        let b = check().blockers(&mem, &[t], &[], &[]).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].func, "pipe_read");
        assert_eq!(b[0].seen, Seen::Stack { slot: 0x8ff0 });
        assert!(b[0].to_string().contains("pid 7"));
    }

    /// The pre-scan keeps only tasks it judged clear at rest, and the
    /// pause skips exactly those that have not run since: a later return
    /// address on a skipped task's stack is not looked at (it cannot appear
    /// without the task running), while a task that switched, changed
    /// identity or is on a CPU now is judged in full.
    #[test]
    fn a_prescan_spares_only_tasks_that_have_not_run_since() {
        let hooks = ReturnHooks::default();
        let clean = Words(vec![]);
        let sleeper = task(7, 0x8000..0x9000, 0x8fe8, None);
        let blocked = task(8, 0xa000..0xb000, 0xafe8, None);
        let oncpu = Task {
            on_cpu: true,
            ..task(9, 0xc000..0xd000, 0xcfe8, None)
        };
        let mem = Words(vec![(0xaff0, 0x1042)]);
        let all = [sleeper.clone(), blocked.clone(), oncpu.clone()];
        let scan = check().prescan(&mem, &all, None, &hooks, |addr| {
            all.iter().find(|t| t.addr == addr).cloned()
        });
        assert_eq!(scan.len(), 1, "only the clear task at rest: {scan:?}");
        assert!(scan.still_clear(&sleeper));
        assert!(!scan.still_clear(&blocked) && !scan.still_clear(&oncpu));
        // The others are what a pause with the switch log reads again.
        assert_eq!(scan.unclear(), &[blocked.addr, oncpu.addr]);

        // In the pause the sleeper's stack now holds a changed function's
        // address (it could only get there by running): skipped while its
        // count is unchanged, found once it has switched.
        let later = Words(vec![(0x8ff0, 0x2010)]);
        let judged = |t: &Task| {
            check()
                .blockers_prescanned(
                    &later,
                    std::slice::from_ref(t),
                    &[],
                    &[],
                    None,
                    &hooks,
                    Some(&scan),
                )
                .unwrap()
        };
        assert!(judged(&sleeper).is_empty());
        let switched = Task {
            switches: 1,
            ..sleeper.clone()
        };
        assert_eq!(judged(&switched).len(), 1);
        let reborn = Task {
            start_time: 5,
            ..sleeper.clone()
        };
        assert_eq!(
            judged(&reborn).len(),
            1,
            "a new task in the same task_struct"
        );
        let running = Task {
            on_cpu: true,
            ..sleeper.clone()
        };
        assert_eq!(judged(&running).len(), 1);

        // A task that ran between its two reads is not kept.
        let raced = check().prescan(&clean, std::slice::from_ref(&sleeper), None, &hooks, |_| {
            Some(Task {
                switches: 3,
                ..sleeper.clone()
            })
        });
        assert!(raced.is_empty());
        assert_eq!(raced.unclear(), &[sleeper.addr]);
        let gone = check().prescan(&clean, std::slice::from_ref(&sleeper), None, &hooks, |_| {
            None
        });
        assert!(gone.is_empty());
        assert_eq!(gone.unclear(), &[sleeper.addr]);
    }

    /// A check on kernel-text addresses, where summaries keep words.
    fn text_check(spans: &[(u64, u64, &str)]) -> Check {
        Check::new(
            spans
                .iter()
                .map(|&(a, b, n)| Span {
                    range: a..b,
                    name: n.into(),
                })
                .collect(),
        )
    }

    /// A summary judges as the stack it summarises: the same verdict as a
    /// full judgement, for this check and for another one, and the
    /// summaries kept from one pre-scan judge the next one's tasks that
    /// the switch log does not name, without reading them; those it names
    /// are read again.
    #[test]
    fn summaries_judge_as_the_stacks_and_carry_to_the_next_prescan() {
        let hooks = ReturnHooks::default();
        let f = 0xffff_ffff_8100_1000u64;
        let g = 0xffff_ffff_8100_2000u64;
        let a = task(1, 0x8000..0x9000, 0x8fe0, None);
        let b = task(2, 0xa000..0xb000, 0xafe0, None);
        let c = Task {
            on_cpu: true,
            ..task(3, 0xc000..0xd000, 0xcfe0, None)
        };
        // a sleeps with g on its stack (and a pointer below the floor), b
        // with f.
        let mem = Words(vec![(0x8ff0, g + 0x10), (0x8ff8, 0x1005), (0xaff0, f + 4)]);
        let all = [a.clone(), b.clone(), c.clone()];
        let find = |addr: u64| all.iter().find(|t| t.addr == addr).cloned();
        for (t, hit) in [(&a, false), (&b, true)] {
            let s = summarize(&mem, t, None, &hooks).expect("summarised");
            let on_f = text_check(&[(f, f + 0x40, "f")]);
            assert_eq!(on_f.summary_blocks(&s), hit, "{s:?}");
            assert_eq!(
                on_f.blockers(&mem, std::slice::from_ref(t), &[], &[])
                    .unwrap()
                    .is_empty(),
                !hit
            );
        }
        assert_eq!(summarize(&mem, &c, None, &hooks), None, "on a CPU");

        let on_f = text_check(&[(f, f + 0x40, "f")]);
        let scan = on_f.prescan(&mem, &all, None, &hooks, find);
        assert!(scan.still_clear(&a) && !scan.still_clear(&b));
        let cache = StackCache::from_full(&scan, 1, 100, all.len());
        assert_eq!(cache.len(), 2, "a and b at rest; c runs");
        assert!(cache.usable(1) && !cache.usable(2));

        // The next transition changes g. Nothing named: a blocks from its
        // summary, b is clear, c (no summary) is read again; a and b are
        // never read.
        let on_g = text_check(&[(g, g + 0x40, "g")]);
        let read = |addr: u64| {
            assert_eq!(addr, c.addr, "only c is read");
            Some(c.clone())
        };
        let none = std::collections::HashSet::new();
        let (scan, next) = on_g.prescan_cached(&mem, &cache, &none, 104, None, &hooks, read, read);
        assert_eq!(scan.head0, Some(104));
        assert!(scan.still_clear(&b) && !scan.still_clear(&a));
        let mut unclear = scan.unclear().to_vec();
        unclear.sort_unstable();
        assert_eq!(unclear, vec![a.addr, c.addr]);
        assert_eq!(next.head, 104);

        // b ran since (named): read again, its stack now holds g.
        let later = Words(vec![(0xaff0, g + 8)]);
        let b2 = Task {
            switches: 7,
            ..b.clone()
        };
        let reads = std::cell::Cell::new(0);
        let read2 = |addr: u64| {
            reads.set(reads.get() + 1);
            [&b2, &c].into_iter().find(|t| t.addr == addr).cloned()
        };
        let named = std::collections::HashSet::from([b.addr]);
        let (scan, _) = on_g.prescan_cached(&later, &next, &named, 110, None, &hooks, read2, read2);
        assert!(!scan.still_clear(&b2), "b's new stack blocks");
        assert!(reads.get() >= 2, "b and c read");
    }

    #[test]
    fn running_vcpus_count_by_rip_and_stack_but_not_in_user_mode() {
        let mem = Words(vec![(0x8ff8, 0x2010)]);
        let kernel = VcpuRegs {
            rip: 0x1004,
            rsp: 0x8f00,
            ..VcpuRegs::default()
        };
        let user = VcpuRegs {
            rip: 0x1004,
            rsp: 0x8f00,
            cs_selector: 0x33,
            ..VcpuRegs::default()
        };
        let t = task(1, 0x8000..0x9000, 0, Some(0));
        let b = check()
            .blockers(&mem, std::slice::from_ref(&t), &[kernel], &[])
            .unwrap();
        let seen: Vec<Seen> = b.iter().map(|b| b.seen).collect();
        assert_eq!(
            seen,
            vec![Seen::Rip { vcpu: 0 }, Seen::Stack { slot: 0x8ff8 }]
        );
        assert!(check()
            .blockers(&mem, &[t], &[user], &[])
            .unwrap()
            .is_empty());
    }

    /// A vCPU executing the kernel with no task placed on it (its per-CPU
    /// base is no CPU's, or another vCPU's too) blocks, naming the vCPU:
    /// the task it runs is unknown, so is what that task's stack holds.
    #[test]
    fn a_vcpu_running_no_known_task_blocks() {
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        let on = |gs: u64| VcpuRegs {
            cr0: CR0_PG | 1,
            cr4: CR4_PAE,
            gs_base: gs,
            rsp: 0x8f00,
            ..VcpuRegs::default()
        };
        let mem = Words(vec![]);
        let t = task(1, 0x8000..0x9000, 0, Some(0));
        // vCPU 0 runs t; vCPU 1's GS base matched no CPU.
        let regs = [on(0xffff_8880_1000_0000), on(0x7f00_0000_0000)];
        let b = check()
            .blockers(&mem, std::slice::from_ref(&t), &regs, &[])
            .unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(
            b[0].seen,
            Seen::Vcpu {
                vcpu: 1,
                gs: Some(0x7f00_0000_0000),
                shared_with: None
            }
        );
        assert!(b[0].to_string().contains("vCPU 1"), "{}", b[0]);
        // vCPUs 1 and 2 claim the same CPU, so the walk placed neither.
        let regs = [
            on(0xffff_8880_1000_0000),
            on(0xffff_8880_2000_0000),
            on(0xffff_8880_2000_0000),
        ];
        let b = check()
            .blockers(&mem, std::slice::from_ref(&t), &regs, &[])
            .unwrap();
        let seen: Vec<Seen> = b.iter().map(|b| b.seen).collect();
        assert_eq!(
            seen,
            vec![
                Seen::Vcpu {
                    vcpu: 1,
                    gs: Some(0xffff_8880_2000_0000),
                    shared_with: Some(2)
                },
                Seen::Vcpu {
                    vcpu: 2,
                    gs: Some(0xffff_8880_2000_0000),
                    shared_with: Some(1)
                },
            ]
        );
        // In user mode without a recorded KERNEL_GS_BASE: unknown, blocks.
        let user = VcpuRegs {
            cs_selector: 0x33,
            kernel_gs_base: None,
            ..on(0)
        };
        let b = check()
            .blockers(&mem, std::slice::from_ref(&t), &[on(1), user], &[])
            .unwrap();
        assert_eq!(
            b.iter().map(|b| b.seen).collect::<Vec<_>>(),
            vec![Seen::Vcpu {
                vcpu: 1,
                gs: None,
                shared_with: None
            }]
        );
        // Paging off (waiting for its start-up IPI): runs no kernel code.
        let parked = VcpuRegs::default();
        assert!(check()
            .blockers(&mem, &[t], &[on(1), parked], &[])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn irq_stack_then_the_interrupted_task_stack() {
        // On the IRQ stack [0x20000, 0x24000); its top word points back
        // into the task's stack, where a return address into f waits.
        let mem = Words(vec![(0x23ff8, 0x8f80), (0x8f80, 0x2001)]);
        let r = VcpuRegs {
            rip: 0x5000,
            rsp: 0x23f00,
            ..VcpuRegs::default()
        };
        let t = task(3, 0x8000..0x9000, 0, Some(0));
        let irq: Vec<Range<u64>> = std::iter::once(0x20000..0x24000).collect();
        let b = check()
            .blockers(&mem, std::slice::from_ref(&t), &[r], &irq)
            .unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].func, "f");
        // On no known stack: blocks.
        let lost = VcpuRegs {
            rsp: 0x7777_0000,
            ..r
        };
        let b = check().blockers(&mem, &[t], &[lost], &[]).unwrap();
        assert!(matches!(b[0].seen, Seen::UnknownStack { .. }));
    }

    #[test]
    fn a_task_on_its_cpus_entry_stack_has_no_kernel_frame() {
        // CPU 0's TSS sp0 (per-CPU offset 0x6004, base 0x40000) is 0x33000:
        // its entry stack is [0x32000, 0x33000).
        let mem = Words(vec![(0x46004, 0x33000)]);
        let entry = entry_stacks(&mem, &[(0, 0x40000)], (0x6004, 0x1000));
        assert_eq!(entry, vec![(0x32000..0x33000)]);
        let t = task(3, 0x8000..0x9000, 0, Some(0));
        let r = VcpuRegs {
            rip: 0x5000,
            rsp: 0x32fc8,
            ..VcpuRegs::default()
        };
        // Unknown without the entry stacks, nothing to judge with them.
        let b = check()
            .blockers(&mem, std::slice::from_ref(&t), &[r], &[])
            .unwrap();
        assert!(matches!(b[0].seen, Seen::UnknownStack { .. }));
        let c = check().with_entry_stacks(entry);
        assert!(c
            .blockers(&mem, std::slice::from_ref(&t), &[r], &[])
            .unwrap()
            .is_empty());
        // Its RIP is still judged: in a changed function, it blocks.
        let inside = VcpuRegs { rip: 0x2001, ..r };
        let b = c.blockers(&mem, &[t], &[inside], &[]).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].func, "f");
    }

    #[test]
    fn nothing_to_check_means_no_blockers_and_hits_are_exact() {
        let c = check();
        assert!(c.hit(0x0fff).is_none());
        assert_eq!(c.hit(0x1000).unwrap().name, "pipe_read");
        assert!(c.hit(0x1100).is_none());
        let mem = Words(vec![(0x8ff8, 0x1000)]);
        let t = task(1, 0x8000..0x9000, 0x8ff8, None);
        assert!(Check::default()
            .blockers(&mem, &[t], &[], &[])
            .unwrap()
            .is_empty());
    }

    /// Memory that cannot be read at all.
    struct Nothing;

    impl VirtRead for Nothing {
        fn read_virt(&self, va: u64, _: &mut [u8]) -> Result<(), PagingError> {
            Err(PagingError::NonCanonical { va, levels: 4 })
        }
    }

    /// `exit_notify` sets `exit_state` (EXIT_DEAD for an autoreaped
    /// thread, EXIT_ZOMBIE otherwise) long before the task stops running:
    /// the rest of `do_exit` still runs, may be preempted, and returns
    /// into whatever its stack holds. Only a task past its last switch
    /// (TASK_DEAD, off every CPU) is skipped.
    #[test]
    fn exiting_tasks_are_checked_until_they_are_dead() {
        const EXIT_DEAD: u32 = 0x10;
        const EXIT_ZOMBIE: u32 = 0x20;
        const TASK_DEAD: u32 = 0x80;
        // Released (EXIT_DEAD) and still running on vCPU 0 in f.
        let mem = Words(vec![(0x8ff0, 0x1042)]);
        let mut running = task(11, 0x8000..0x9000, 0, Some(0));
        running.exit_state = EXIT_DEAD;
        running.state = 0;
        let r = VcpuRegs {
            rip: 0x2010,
            rsp: 0x8f00,
            ..VcpuRegs::default()
        };
        let b = check()
            .blockers(&mem, std::slice::from_ref(&running), &[r], &[])
            .unwrap();
        let seen: Vec<Seen> = b.iter().map(|b| b.seen).collect();
        assert_eq!(
            seen,
            vec![Seen::Rip { vcpu: 0 }, Seen::Stack { slot: 0x8ff0 }]
        );
        // A zombie preempted after exit_notify, a return into pipe_read
        // on its stack.
        let mut preempted = task(12, 0x8000..0x9000, 0x8fe8, None);
        preempted.exit_state = EXIT_ZOMBIE;
        preempted.state = 0;
        let b = check().blockers(&mem, &[preempted], &[], &[]).unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].func, "pipe_read");
        // TASK_DEAD but still on_cpu: mid-switch away, its stack in use.
        let mut switching = task(13, 0x8000..0x9000, 0x8fe8, None);
        switching.exit_state = EXIT_ZOMBIE;
        switching.state = TASK_DEAD;
        switching.on_cpu = true;
        let b = check().blockers(&mem, &[switching], &[], &[]).unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
    }

    #[test]
    fn dead_tasks_are_skipped_and_unreadable_stacks_block() {
        // Past its last switch: its stack is freed (here: unreadable).
        for exit_state in [0x10, 0x20] {
            let mut dead = task(9, 0..0, 0, None);
            dead.exit_state = exit_state;
            dead.state = 0x80; // TASK_DEAD
            assert!(check()
                .blockers(&Nothing, &[dead], &[], &[])
                .unwrap()
                .is_empty());
        }
        let live = task(10, 0x8000..0x9000, 0x8f00, None);
        let b = check().blockers(&Nothing, &[live], &[], &[]).unwrap();
        assert_eq!(b[0].seen, Seen::Unreadable { addr: 0x8f00 });
    }

    /// Where the synthetic kernel's trampolines are.
    const RETHOOK_TRAMP: u64 = 0xffff_ffff_8100_3000;
    const FGRAPH_TRAMP: u64 = 0xffff_ffff_8100_4000;

    /// A kernel with rethook's and the function graph's trampolines, and
    /// BTF for rethook's lists only (6.1's layout: `task_struct.rethooks`,
    /// `struct rethook_node { union {freelist, rcu}; llist; rethook;
    /// ret_addr; frame; }`); the function graph's layout is unknown.
    fn hooks() -> ReturnHooks {
        use klpvisor_guest::btf::synth::BtfBuilder;
        use klpvisor_guest::kallsyms::synth::{Builder, BASE};
        use klpvisor_guest::kallsyms::{Image, Layout};
        let syms = vec![
            ('T', "_text".to_string(), 0xffff_ffff_8100_0000),
            ('T', "arch_rethook_trampoline".to_string(), RETHOOK_TRAMP),
            ('T', "return_to_handler".to_string(), FGRAPH_TRAMP),
            ('T', "_etext".to_string(), 0xffff_ffff_8120_0000),
        ];
        let bytes = Builder::new(Layout::OffsetsFirst, syms).build();
        let kallsyms = Kallsyms::from_image(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap();
        let mut b = BtfBuilder::new();
        let ulong = b.int("long unsigned int", 8);
        let node = b.composite(false, "llist_node", 8, &[("next", ulong, 0, 0)]);
        let head = b.composite(false, "llist_head", 8, &[("first", ulong, 0, 0)]);
        b.composite(
            false,
            "rethook_node",
            48,
            &[
                ("llist", node, 128, 0),
                ("rethook", ulong, 192, 0),
                ("ret_addr", ulong, 256, 0),
                ("frame", ulong, 320, 0),
            ],
        );
        b.composite(
            false,
            "task_struct",
            0x400,
            &[("rethooks", head, 0x100 * 8, 0)],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        ReturnHooks::from_kernel(&kallsyms, &btf)
    }

    /// Words of `t`'s rethook list: one node at `node` per (real return
    /// address, slot), linked in order from `task_struct.rethooks`.
    fn rethooks(t: &Task, nodes: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
        let mut w = Vec::new();
        let mut link = t.addr + 0x100;
        for &(node, ret, slot) in nodes {
            w.push((link, node + 16));
            w.extend([(node + 32, ret), (node + 40, slot)]);
            link = node + 16;
        }
        w
    }

    /// A kretprobe (on rethook) on the function a task sleeps in replaced
    /// its return into pipe_read by the trampoline's address: no stack
    /// word points into pipe_read, yet the task will return there. The
    /// check without the task's hooks misses it (the bug); with them the
    /// real address is judged and blocks, naming the trampoline.
    #[test]
    fn a_return_hidden_behind_a_kretprobe_trampoline_blocks() {
        let t = task(7, 0x8000..0x9000, 0x8fe8, None);
        let node = 0xffff_8880_0100_0000;
        let mut words = vec![(0x8ff0, RETHOOK_TRAMP)];
        words.extend(rethooks(&t, &[(node, 0x1042, 0x8ff0)]));
        let mem = Words(words);
        let t = [t];
        assert!(check().blockers(&mem, &t, &[], &[]).unwrap().is_empty());
        let b = check()
            .blockers_hooked(&mem, &t, &[], &[], None, &hooks())
            .unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].func, "pipe_read");
        assert_eq!(b[0].addr, 0x1042);
        assert_eq!(
            b[0].seen,
            Seen::Hooked {
                trampoline: "arch_rethook_trampoline",
                slot: 0x8ff0
            }
        );
        let msg = b[0].to_string();
        assert!(
            msg.contains("pid 7 (t7) will return into pipe_read")
                && msg.contains("arch_rethook_trampoline"),
            "{msg}"
        );
        // A hooked return into no changed function passes, and an entry
        // holding the trampoline itself (a second hook on one slot) is
        // not a return address.
        let mut words = vec![(0x8ff0, RETHOOK_TRAMP)];
        words.extend(rethooks(
            &t[0],
            &[
                (node, RETHOOK_TRAMP, 0x8ff0),
                (node + 0x100, 0x5000, 0x8ff0),
            ],
        ));
        let b = check()
            .blockers_hooked(&Words(words), &t, &[], &[], None, &hooks())
            .unwrap();
        assert!(b.is_empty(), "{b:?}");
    }

    /// A running task's hooked returns count too (its RIP may be in the
    /// trampoline's handler, the slot already popped).
    #[test]
    fn a_running_tasks_hooked_returns_count() {
        let t = task(3, 0x8000..0x9000, 0, Some(0));
        let r = VcpuRegs {
            rip: RETHOOK_TRAMP + 0x20,
            rsp: 0x8f00,
            ..VcpuRegs::default()
        };
        let mem = Words(rethooks(&t, &[(0xffff_8880_0100_0000, 0x2005, 0x8f80)]));
        let b = check()
            .blockers_hooked(&mem, &[t], &[r], &[], None, &hooks())
            .unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].func, "f");
    }

    /// Where the real addresses cannot be read, the task blocks, naming
    /// itself, the trampoline and why: a list that loops (or is longer
    /// than any stack), a pointer that is no kernel address, and a
    /// trampoline on the stack whose per-task data this kernel's BTF does
    /// not describe (here the function graph's).
    #[test]
    fn unrecoverable_hidden_returns_block() {
        let t = task(5, 0x8000..0x9000, 0x8fe8, None);
        let node = 0xffff_8880_0100_0000;
        // node -> node: a cycle.
        let mut words = rethooks(&t, &[(node, 0x5000, 0x8ff0)]);
        words.push((node + 16, node + 16));
        let b = check()
            .blockers_hooked(
                &Words(words),
                std::slice::from_ref(&t),
                &[],
                &[],
                None,
                &hooks(),
            )
            .unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(
            b[0].seen,
            Seen::Unrecoverable {
                trampoline: "arch_rethook_trampoline",
                why: Why::TooLong,
                slot: None
            }
        );
        assert!(b[0].to_string().contains("pid 5 (t5)"), "{}", b[0]);
        let words = vec![(t.addr + 0x100, 0x4141_4141)];
        let b = check()
            .blockers_hooked(
                &Words(words),
                std::slice::from_ref(&t),
                &[],
                &[],
                None,
                &hooks(),
            )
            .unwrap();
        assert!(
            matches!(
                b[0].seen,
                Seen::Unrecoverable {
                    why: Why::BadPointer(0x4141_4141),
                    ..
                }
            ),
            "{b:?}"
        );
        let words = vec![(0x8ff8, FGRAPH_TRAMP)];
        let b = check()
            .blockers_hooked(&Words(words), &[t], &[], &[], None, &hooks())
            .unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(
            b[0].seen,
            Seen::Unrecoverable {
                trampoline: "return_to_handler",
                why: Why::UnknownLayout,
                slot: Some(0x8ff8)
            }
        );
        assert!(b[0].to_string().contains("return_to_handler"), "{}", b[0]);
    }

    #[test]
    fn hostile_stack_ranges_are_bounded() {
        let mem = Words(vec![]);
        let t = task(1, 0..u64::MAX, 0, None);
        // Reads at most MAX_STACK bytes; no panic, no huge allocation.
        assert!(check().blockers(&mem, &[t], &[], &[]).unwrap().is_empty());
    }
}

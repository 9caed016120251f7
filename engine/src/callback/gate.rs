//! The call gate: how the VMM runs a klp callback inside the guest kernel.
//!
//! A callback must run where klp runs it: in process context, able to
//! sleep (callbacks allocate with GFP_KERNEL, take mutexes, call
//! `klp_shadow_*`), with no lock held by the code it interrupted. The VMM
//! cannot call into the guest at an arbitrary point of a paused vCPU: that
//! vCPU may hold spinlocks, run with interrupts off, or sit in the idle
//! loop where RCU is not watching. So the gate lets the kernel pick the
//! moment, through its own deferral chain:
//!
//! 1. With every vCPU paused, the VMM pushes the gate's `irq_work` onto the
//!    per-CPU `raised_list` of CPU 0 and raises `IRQ_WORK_VECTOR` on that
//!    CPU's local APIC (an MSI through KVM): exactly what the kernel's own
//!    `irq_work_queue()` does. The list is a lock-free llist; a push while
//!    every vCPU is stopped is as atomic as the kernel's cmpxchg push (a
//!    vCPU stopped between its read and its cmpxchg just retries).
//! 2. `sysvec_irq_work` runs the gate's irq_work function in hard-IRQ
//!    context; all it does is `queue_work_on(cpu, system_wq, &work)`.
//! 3. A kworker runs the gate's work function in process context: it calls
//!    the callback with its `struct klp_object`, stores the return value in
//!    the mailbox and rings the VMM's doorbell port (an `out`, which exits
//!    to the VMM at once). The VMM reads the result from the mailbox.
//!
//! The gate is two arena pages, installed on first use and kept: code
//! (two small functions, hand-assembled below, checked by a decoder test)
//! and data (the `irq_work`, the `work_struct`, the mailbox). Struct
//! layouts come from the guest's BTF; the vector is checked against the
//! guest's IDT before anything is written.
//!
//! Limits, which the README repeats: the callback runs in a kworker, not in
//! the task that asked (klp runs it in the sysfs writer or insmod), and
//! without `klp_mutex`; a guest whose CPU 0 never takes the interrupt, or
//! whose workqueue never runs the item, makes the call time out, and until
//! the item finishes no other callback can run (the mailbox says how far
//! it got).

use crate::arena::{Arena, ArenaError, Perm, Region};
use crate::write::{AllowKind, Allowed, Plan, Write, WriteError};
use klpvisor_guest::{Btf, Kernel, VirtRead};
use klpvisor_guest::{Guest, VcpuRegs};

use super::Call;

/// x86's `IRQ_WORK_VECTOR` (arch/x86/include/asm/irq_vectors.h).
pub const IRQ_WORK_VECTOR: u8 = 0xf6;
/// The port the gate's work function writes the call's number to.
pub const DOORBELL_PORT: u16 = 0x0ff0;

const PAGE: u64 = 4096;
/// Data page: the `irq_work`, the `work_struct` and the mailbox.
const IRQ_WORK_AT: u64 = 0;
const WORK_AT: u64 = 128;
const MAILBOX_AT: u64 = 256;
/// Mailbox fields (u64 each).
const MB_SEQ: u64 = 0;
const MB_STATE: u64 = 8;
const MB_FUNC: u64 = 16;
const MB_ARG: u64 = 24;
const MB_RET: u64 = 32;
const MB_CPU: u64 = 40;
/// The second argument (`rsi`), for calls that take two.
const MB_ARG2: u64 = 48;
/// The third and fourth (`rdx`, `rcx`): 6.10+'s per-CPU allocator,
/// `pcpu_alloc_noprof(size, align, reserved, gfp)`, takes four.
const MB_ARG3: u64 = 56;
const MB_ARG4: u64 = 64;
const MB_LEN: usize = 72;
/// The most arguments a call through the gate takes.
pub const MAX_ARGS: usize = 4;
/// A kernel log line's text, for a `printk` sent through the gate.
const LOG_AT: u64 = 512;
/// The longest such text, its NUL included.
pub const LOG_MAX: usize = 1024;
/// Code page: the two functions.
const IRQ_FN_AT: u64 = 0;
const WORK_FN_AT: u64 = 64;

/// Mailbox states: written by the VMM (idle, armed) and by the gate code.
const IDLE: u64 = 0;
const ARMED: u64 = 1;
const QUEUED: u64 = 2;
const RUNNING: u64 = 3;
const DONE: u64 = 4;

/// `IRQ_WORK_PENDING | IRQ_WORK_BUSY` (irq_work_claim's "claimed").
const IRQ_WORK_CLAIMED: u32 = 3;
/// `WORK_STRUCT_PENDING`.
const WORK_PENDING: u64 = 1;

/// Errors of installing the gate and running a callback through it.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The guest kernel lacks something the gate relies on (a BTF layout,
    /// [`IRQ_WORK_VECTOR`] in its IDT, rel32 reach to the functions it
    /// calls), or a log line is one the gate cannot carry; the message says
    /// which.
    #[error("callbacks cannot run in this guest kernel: {0}")]
    Unsupported(String),
    /// A kernel symbol the gate calls or writes is missing.
    #[error("callbacks cannot run in this guest kernel: {0}")]
    Symbol(#[from] klpvisor_guest::KallsymsError),
    /// The return thunk the gate's code must use could not be read.
    #[error("callbacks cannot run in this guest kernel: {0}")]
    Thunk(#[from] crate::link::LinkError),
    /// Guest memory the gate checks (the IDT, its own pages, the mailbox) could
    /// not be read.
    #[error("callbacks cannot run: reading {what} failed: {source}")]
    Read {
        /// Which of those.
        what: &'static str,
        /// The guest's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The previous call has not finished in the guest (the mailbox's state, or
    /// the irq_work or work item still pending); it says how far it got.
    #[error(
        "an earlier callback is still in the guest ({0}); no other callback can run until it \
         finishes"
    )]
    Busy(String),
    /// The mailbox no longer holds this call's number, or holds a state the
    /// gate never writes: something in the guest changed it.
    #[error("the call gate's mailbox holds call #{found}, not #{expected}: the guest changed it")]
    Tampered {
        /// The number of the call the VMM made.
        expected: u64,
        /// The number the mailbox holds.
        found: u64,
    },
    /// Allocating or mapping the gate's two arena pages failed.
    #[error("call gate: {0}")]
    Arena(#[from] ArenaError),
    /// Reading the guest memory the gate's writes replace failed.
    #[error("call gate: {0}")]
    Write(#[from] WriteError),
}

/// How far a call got, as the mailbox says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Queued on the CPU's irq_work list; the interrupt has not run it.
    Armed,
    /// On the workqueue; no kworker has started it.
    Queued,
    /// The callback has started and not returned.
    Running,
    /// Returned this (rax; an `int` for `pre_patch`).
    Done(u64),
}

impl Progress {
    /// What a user reads when a call times out.
    pub fn describe(self, cpu: u32) -> String {
        match self {
            Progress::Armed => format!("CPU {cpu} has not taken the irq_work interrupt"),
            Progress::Queued => "queued on system_wq; no kworker has started it".into(),
            Progress::Running => "the callback started and has not returned".into(),
            Progress::Done(_) => "done".into(),
        }
    }
}

/// The guest's struct layouts the gate writes (from BTF): where in its
/// data page the `irq_work` and `work_struct` fields are. Public so the
/// fuzz target can check that no BTF makes the gate touch a byte outside
/// the structs it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    irq_next: u64,
    irq_flags: u64,
    irq_func: u64,
    work_data: u64,
    work_entry: u64,
    work_func: u64,
}

impl Layout {
    /// Reads the layouts from the guest's BTF. The BTF is guest memory, so
    /// untrusted: every field the gate reads or writes must lie inside its
    /// struct, and each struct inside its slot of the data page, or the
    /// gate would write past its page (a panic in the VMM) or over the
    /// mailbox.
    pub fn from_btf(btf: &Btf) -> Result<Self, GateError> {
        let off = |path: &str| {
            btf.offset_of(path)
                .map_err(|e| GateError::Unsupported(format!("BTF: {e}")))
        };
        let size = |name: &str| {
            btf.struct_size(name)
                .map_err(|e| GateError::Unsupported(format!("BTF: {e}")))
        };
        let (irq_size, work_size) = (size("irq_work")?, size("work_struct")?);
        if irq_size > WORK_AT - IRQ_WORK_AT || work_size > MAILBOX_AT - WORK_AT {
            return Err(GateError::Unsupported(
                "struct irq_work or work_struct is larger than the gate expects (lockdep?)".into(),
            ));
        }
        if off("list_head.next")? != 0 || off("list_head.prev")? != 8 {
            return Err(GateError::Unsupported("unexpected struct list_head".into()));
        }
        let layout = Self {
            irq_next: off("irq_work.node.llist.next")?,
            irq_flags: off("irq_work.node.u_flags")?,
            irq_func: off("irq_work.func")?,
            work_data: off("work_struct.data")?,
            work_entry: off("work_struct.entry")?,
            work_func: off("work_struct.func")?,
        };
        for (what, at, len) in layout.accesses() {
            let (start, size) = if what.starts_with("irq_work.") {
                (IRQ_WORK_AT, irq_size)
            } else {
                (WORK_AT, work_size)
            };
            let inside = at
                .checked_sub(start)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|end| end <= size);
            if !inside {
                return Err(GateError::Unsupported(format!(
                    "BTF puts {what} ({len} bytes at offset {:#x}) outside its struct ({size} \
                     bytes)",
                    at.wrapping_sub(start)
                )));
            }
        }
        Ok(layout)
    }

    /// Every field the gate reads or writes through this layout: its BTF
    /// path, its offset in the data page, and its length. BTF offsets are
    /// sums of a bounded number of u32 bit offsets, far from overflowing
    /// when added to a page offset.
    pub fn accesses(&self) -> [(&'static str, u64, u64); 6] {
        [
            ("irq_work.node.llist.next", IRQ_WORK_AT + self.irq_next, 8),
            ("irq_work.node.u_flags", IRQ_WORK_AT + self.irq_flags, 4),
            ("irq_work.func", IRQ_WORK_AT + self.irq_func, 8),
            ("work_struct.data", WORK_AT + self.work_data, 8),
            ("work_struct.entry", WORK_AT + self.work_entry, 16),
            ("work_struct.func", WORK_AT + self.work_func, 8),
        ]
    }

    /// The gate's data page at `data` as first written, for code at
    /// `text` (see [`Gate::plan_install`]).
    pub fn data_page(&self, data: u64, text: u64) -> Vec<u8> {
        initial_data(data, text, self)
    }
}

/// Where the `irq_work` ends and the `work_struct` starts in the data page.
pub const DATA_PAGE_WORK_AT: u64 = WORK_AT;
/// Where the `work_struct` ends and the mailbox starts in the data page.
pub const DATA_PAGE_MAILBOX_AT: u64 = MAILBOX_AT;

/// Kernel addresses the gate code uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Symbols {
    queue_work_on: u64,
    system_wq: u64,
    /// Per-CPU offset of `raised_list`.
    raised_list: u64,
    /// `__x86_indirect_thunk_rax`, if the kernel has retpolines.
    indirect_thunk: Option<u64>,
    /// The return thunk (`x86_return_thunk`), if the kernel has one.
    return_thunk: Option<u64>,
}

/// A little x86-64 assembler for the gate's fixed instruction sequences.
struct Asm {
    va: u64,
    bytes: Vec<u8>,
}

impl Asm {
    fn here(&self) -> u64 {
        self.va + self.bytes.len() as u64
    }

    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }

    /// `b` followed by a rel32 to `target` measured from the end of an
    /// instruction `tail` bytes longer than that.
    fn rel(&mut self, b: &[u8], target: u64, tail: u64) -> Result<&mut Self, GateError> {
        let end = self.here() + b.len() as u64 + 4 + tail;
        let disp = i32::try_from(target.wrapping_sub(end) as i64).map_err(|_| {
            GateError::Unsupported(format!(
                "{target:#x} is out of rel32 reach of the gate at {:#x}",
                self.va
            ))
        })?;
        self.raw(b).raw(&disp.to_le_bytes());
        Ok(self)
    }

    fn pad_to(&mut self, off: u64) -> &mut Self {
        self.bytes.resize(off as usize, 0xcc);
        self
    }
}

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// The gate's code page at `text`, its data page at `data`.
fn code(text: u64, data: u64, s: &Symbols) -> Result<Vec<u8>, GateError> {
    let mb = data + MAILBOX_AT;
    let mut a = Asm {
        va: text,
        bytes: Vec::new(),
    };
    // irq_fn(struct irq_work *): hard IRQ on the chosen CPU.
    a.raw(&ENDBR64)
        // mov dword [rip+state], QUEUED
        .rel(&[0xc7, 0x05], mb + MB_STATE, 4)?
        .raw(&(QUEUED as u32).to_le_bytes())
        // mov edi, [rip+cpu]
        .rel(&[0x8b, 0x3d], mb + MB_CPU, 0)?
        // mov rax, &system_wq; mov rsi, [rax]
        .raw(&[0x48, 0xb8])
        .raw(&s.system_wq.to_le_bytes())
        .raw(&[0x48, 0x8b, 0x30])
        // lea rdx, [rip+work]
        .rel(&[0x48, 0x8d, 0x15], data + WORK_AT, 0)?
        // jmp queue_work_on (its bool return is ignored by irq_work)
        .rel(&[0xe9], s.queue_work_on, 0)?;
    if a.here() - text > WORK_FN_AT {
        return Err(GateError::Unsupported("gate irq function too long".into()));
    }
    a.pad_to(WORK_FN_AT);
    // work_fn(struct work_struct *): a kworker, process context. A frame
    // pointer, so a stack dump through here still unwinds.
    a.raw(&ENDBR64)
        .raw(&[0x55]) // push rbp
        .raw(&[0x48, 0x89, 0xe5]) // mov rbp, rsp
        .raw(&[0x53]) // push rbx
        .raw(&[0x48, 0x83, 0xec, 0x08]) // sub rsp, 8 (16-byte aligned call)
        .rel(&[0x48, 0x8d, 0x1d], mb, 0)? // lea rbx, [rip+mailbox]
        .raw(&[0xc7, 0x43, MB_STATE as u8])
        .raw(&(RUNNING as u32).to_le_bytes())
        .raw(&[0x48, 0x8b, 0x7b, MB_ARG as u8]) // mov rdi, [rbx+arg]
        .raw(&[0x48, 0x8b, 0x73, MB_ARG2 as u8]) // mov rsi, [rbx+arg2]
        .raw(&[0x48, 0x8b, 0x53, MB_ARG3 as u8]) // mov rdx, [rbx+arg3]
        .raw(&[0x48, 0x8b, 0x4b, MB_ARG4 as u8]) // mov rcx, [rbx+arg4]
        .raw(&[0x48, 0x8b, 0x43, MB_FUNC as u8]); // mov rax, [rbx+func]
    match s.indirect_thunk {
        Some(t) => a.rel(&[0xe8], t, 0)?, // call __x86_indirect_thunk_rax
        None => a.raw(&[0xff, 0xd0]),     // call rax
    };
    a.raw(&[0x48, 0x89, 0x43, MB_RET as u8]) // mov [rbx+ret], rax
        .raw(&[0xc7, 0x43, MB_STATE as u8])
        .raw(&(DONE as u32).to_le_bytes())
        .raw(&[0x8b, 0x43, MB_SEQ as u8]) // mov eax, [rbx+seq]
        .raw(&[0xba])
        .raw(&u32::from(DOORBELL_PORT).to_le_bytes()) // mov edx, port
        .raw(&[0xef]) // out dx, eax
        .raw(&[0x48, 0x83, 0xc4, 0x08]) // add rsp, 8
        .raw(&[0x5b]) // pop rbx
        .raw(&[0x5d]); // pop rbp
    match s.return_thunk {
        Some(t) => a.rel(&[0xe9], t, 0)?,
        None => a.raw(&[0xc3]),
    };
    a.pad_to(PAGE);
    Ok(a.bytes)
}

/// The gate's data page as first written.
fn initial_data(data: u64, text: u64, l: &Layout) -> Vec<u8> {
    let mut page = vec![0u8; PAGE as usize];
    let mut put = |at: u64, v: u64| {
        let at = at as usize;
        page[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(IRQ_WORK_AT + l.irq_func, text + IRQ_FN_AT);
    // INIT_WORK: an empty list entry. `data` stays 0: the off-queue "last
    // pool" it names (pool 0) only makes __queue_work check that pool for
    // a running instance first, which finds none; after the first run the
    // kernel keeps `data` itself.
    let entry = data + WORK_AT + l.work_entry;
    put(WORK_AT + l.work_entry, entry);
    put(WORK_AT + l.work_entry + 8, entry);
    put(WORK_AT + l.work_func, text + WORK_FN_AT);
    page
}

/// The installed gate.
#[derive(Debug, Clone)]
pub struct Gate {
    text: Region,
    data: Region,
    layout: Layout,
    raised_list: u64,
    /// The CPU the last call was sent to.
    cpu: u32,
}

fn u64_at(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

impl Gate {
    /// Plans installing the gate: checks the kernel offers what it needs
    /// (the vector in the IDT, the symbols, the layouts), allocates its two
    /// pages on `arena` and returns the writes that map and fill them.
    pub fn plan_install<G: Guest + ?Sized>(
        kernel: &Kernel,
        guest: &G,
        regs: &VcpuRegs,
        arena: &mut Arena,
    ) -> Result<(Gate, Vec<Write>), GateError> {
        let space = kernel.space(guest);
        let sym = |name: &str| kernel.kallsyms.addr(name).map_err(GateError::Symbol);
        // The vector must be the kernel's irq_work interrupt.
        let handler = sym("asm_sysvec_irq_work")?;
        let gate_va = regs
            .idtr_base
            .checked_add(u64::from(IRQ_WORK_VECTOR) * 16)
            .ok_or_else(|| GateError::Unsupported("IDTR base overflows".into()))?;
        if u64::from(regs.idtr_limit) < u64::from(IRQ_WORK_VECTOR) * 16 + 15 {
            return Err(GateError::Unsupported(format!(
                "the IDT (limit {:#x}) has no vector {IRQ_WORK_VECTOR:#x}",
                regs.idtr_limit
            )));
        }
        let mut d = [0u8; 16];
        space
            .read_virt(gate_va, &mut d)
            .map_err(|e| GateError::Read {
                what: "the IDT",
                source: Box::new(e),
            })?;
        let target = u64::from(u16::from_le_bytes([d[0], d[1]]))
            | u64::from(u16::from_le_bytes([d[6], d[7]])) << 16
            | u64::from(u32::from_le_bytes([d[8], d[9], d[10], d[11]])) << 32;
        if target != handler || d[5] & 0x80 == 0 {
            return Err(GateError::Unsupported(format!(
                "IDT vector {IRQ_WORK_VECTOR:#x} goes to {target:#x}, not asm_sysvec_irq_work \
                 ({handler:#x})"
            )));
        }
        let symbols = Symbols {
            queue_work_on: sym("queue_work_on")?,
            system_wq: sym("system_wq")?,
            raised_list: sym("raised_list")?,
            indirect_thunk: kernel.kallsyms.addr("__x86_indirect_thunk_rax").ok(),
            // The gate returns as the kernel's own code does: through the
            // chosen return thunk, or with a plain `ret` where the default
            // thunk would warn (see guest_plain_returns).
            return_thunk: crate::link::guest_return_thunk(&space, &kernel.kallsyms)?
                .filter(|&t| !crate::link::guest_plain_returns(&space, &kernel.kallsyms, Some(t))),
        };
        let layout = Layout::from_btf(&kernel.btf)?;
        let text = arena.alloc(PAGE, Perm::Text)?;
        let data = arena.alloc(PAGE, Perm::Data)?;
        let mut writes = arena.map_writes(guest, &[text, data])?;
        writes.push(Write::read_expect(
            guest,
            text.gpa,
            code(text.va.0, data.va.0, &symbols)?,
            "call gate code",
        )?);
        writes.push(Write::read_expect(
            guest,
            data.gpa,
            initial_data(data.va.0, text.va.0, &layout),
            "call gate data",
        )?);
        Ok((
            Gate {
                text,
                data,
                layout,
                raised_list: symbols.raised_list,
                cpu: 0,
            },
            writes,
        ))
    }

    /// The gate's arena pages.
    pub fn regions(&self) -> [Region; 2] {
        [self.text, self.data]
    }

    /// Plans sending `call` as call number `seq` to the CPU whose number
    /// and per-CPU base are `cpu`: fill the mailbox, claim the irq_work
    /// and push it onto that CPU's `raised_list`. Call with every vCPU
    /// paused; after the commit, raise [`IRQ_WORK_VECTOR`] on that CPU.
    pub fn plan_arm<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        cpu: (u32, u64),
        call: &Call,
        func: u64,
        seq: u64,
    ) -> Result<Plan, GateError> {
        let label = format!("#{seq} {} of {}", call.kind, call.patch);
        self.plan_send(
            kernel,
            guest,
            cpu,
            (func, [call.object, 0, 0, 0]),
            None,
            seq,
            &label,
        )
    }

    /// Plans one call of the kernel function `func(args...)` (up to
    /// [`MAX_ARGS`], in `rdi`, `rsi`, `rdx`, `rcx`; the rest are 0) as
    /// call number `seq`, as [`Gate::plan_arm`] does a callback. The
    /// caller vouches for `func`: a kernel function that is safe to call
    /// from a kworker with these arguments.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_call<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        cpu: (u32, u64),
        func: u64,
        args: &[u64],
        seq: u64,
        label: &str,
    ) -> Result<Plan, GateError> {
        if args.len() > MAX_ARGS {
            return Err(GateError::Unsupported(format!(
                "{label}: {} arguments, the gate passes at most {MAX_ARGS}",
                args.len()
            )));
        }
        let mut regs = [0u64; MAX_ARGS];
        regs[..args.len()].copy_from_slice(args);
        self.plan_send(kernel, guest, cpu, (func, regs), None, seq, label)
    }

    /// Plans sending `printk(text)` as call number `seq`, as
    /// [`Gate::plan_arm`] does a callback: `text` (a printk format without
    /// conversions, NUL-terminated, at most [`LOG_MAX`] bytes) goes into
    /// the gate's data page, `printk` is the kernel's `_printk`.
    pub fn plan_log<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        cpu: (u32, u64),
        printk: u64,
        text: &[u8],
        seq: u64,
    ) -> Result<Plan, GateError> {
        if text.len() > LOG_MAX || text.last() != Some(&0) || text.contains(&b'%') {
            return Err(GateError::Unsupported(
                "a kernel log line must be NUL-terminated, without %, and at most 1024 bytes"
                    .into(),
            ));
        }
        let arg = self.data.va.0 + LOG_AT;
        self.plan_send(
            kernel,
            guest,
            cpu,
            (printk, [arg, 0, 0, 0]),
            Some(text),
            seq,
            "kernel log line",
        )
    }

    /// Plans one call of `func(args...)` (with `text` put at [`LOG_AT`]
    /// first).
    #[allow(clippy::too_many_arguments)]
    fn plan_send<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        cpu: (u32, u64),
        (func, args): (u64, [u64; MAX_ARGS]),
        text: Option<&[u8]>,
        seq: u64,
        label: &str,
    ) -> Result<Plan, GateError> {
        let mut page = vec![0u8; PAGE as usize];
        guest
            .read_phys(self.data.gpa, &mut page)
            .map_err(|e| GateError::Read {
                what: "the call gate",
                source: Box::new(e),
            })?;
        let state = u64_at(&page, MAILBOX_AT + MB_STATE);
        if state != IDLE && state != DONE {
            let p = progress(state, 0).unwrap_or(Progress::Running);
            return Err(GateError::Busy(format!(
                "call #{}: {}",
                u64_at(&page, MAILBOX_AT + MB_SEQ),
                p.describe(self.cpu)
            )));
        }
        let flags = u64_at(&page, IRQ_WORK_AT + self.layout.irq_flags) as u32;
        if flags & IRQ_WORK_CLAIMED != 0 {
            return Err(GateError::Busy("its irq_work is still claimed".into()));
        }
        if u64_at(&page, WORK_AT + self.layout.work_data) & WORK_PENDING != 0 {
            return Err(GateError::Busy("its work item is still queued".into()));
        }
        let (number, base) = cpu;
        let head_va = base.wrapping_add(self.raised_list);
        if head_va % 8 != 0 {
            return Err(GateError::Unsupported(format!(
                "CPU {number}'s raised_list at {head_va:#x} is not aligned"
            )));
        }
        let head_gpa = kernel
            .space(guest)
            .translate(head_va)
            .map_err(|e| GateError::Read {
                what: "the per-CPU raised_list",
                source: Box::new(e),
            })?
            .phys;
        let mut old = [0u8; 8];
        guest
            .read_phys(head_gpa, &mut old)
            .map_err(|e| GateError::Read {
                what: "the per-CPU raised_list",
                source: Box::new(e),
            })?;

        let mut plan = Plan::new(vec![
            Allowed {
                gpa: self.data.gpa,
                len: PAGE,
                kind: AllowKind::Arena,
            },
            Allowed {
                gpa: head_gpa,
                len: 8,
                kind: AllowKind::IrqWorkList { cpu: number },
            },
        ]);
        let at = |off: u64| self.data.gpa + off;
        let cut = |off: u64, len: usize| page[off as usize..off as usize + len].to_vec();
        let mut mailbox = Vec::with_capacity(MB_LEN);
        let [arg, arg2, arg3, arg4] = args;
        for v in [
            seq,
            ARMED,
            func,
            arg,
            0,
            u64::from(number),
            arg2,
            arg3,
            arg4,
        ] {
            mailbox.extend_from_slice(&v.to_le_bytes());
        }
        if let Some(text) = text {
            plan.push(Write::new(
                at(LOG_AT),
                text.to_vec(),
                cut(LOG_AT, text.len()),
                format!("call gate text ({label})"),
            ));
        }
        plan.push(Write::new(
            at(MAILBOX_AT),
            mailbox,
            cut(MAILBOX_AT, MB_LEN),
            format!("call gate mailbox ({label})"),
        ));
        plan.push(Write::new(
            at(IRQ_WORK_AT + self.layout.irq_next),
            old.to_vec(),
            cut(IRQ_WORK_AT + self.layout.irq_next, 8),
            "call gate irq_work link",
        ));
        plan.push(Write::new(
            at(IRQ_WORK_AT + self.layout.irq_flags),
            IRQ_WORK_CLAIMED.to_le_bytes().to_vec(),
            cut(IRQ_WORK_AT + self.layout.irq_flags, 4),
            "call gate irq_work flags",
        ));
        plan.push(Write::new(
            head_gpa,
            (self.data.va + IRQ_WORK_AT).0.to_le_bytes().to_vec(),
            old.to_vec(),
            format!("CPU {number}'s raised_list"),
        ));
        self.cpu = number;
        Ok(plan)
    }

    /// How far call `seq` got.
    pub fn poll<G: Guest + ?Sized>(&self, guest: &G, seq: u64) -> Result<Progress, GateError> {
        let mut mb = [0u8; MB_LEN];
        guest
            .read_phys(self.data.gpa + MAILBOX_AT, &mut mb)
            .map_err(|e| GateError::Read {
                what: "the call gate mailbox",
                source: Box::new(e),
            })?;
        let found = u64_at(&mb, MB_SEQ);
        if found != seq {
            return Err(GateError::Tampered {
                expected: seq,
                found,
            });
        }
        progress(u64_at(&mb, MB_STATE), u64_at(&mb, MB_RET)).ok_or(GateError::Tampered {
            expected: seq,
            found,
        })
    }

    /// The CPU the last call went to.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }
}

fn progress(state: u64, ret: u64) -> Option<Progress> {
    match state {
        ARMED => Some(Progress::Armed),
        QUEUED => Some(Progress::Queued),
        RUNNING => Some(Progress::Running),
        DONE => Some(Progress::Done(ret)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter, Instruction};

    fn listing(bytes: &[u8], va: u64) -> Vec<String> {
        let mut d = Decoder::with_ip(64, bytes, va, DecoderOptions::NONE);
        let mut f = GasFormatter::new();
        f.options_mut().set_uppercase_hex(false);
        let mut out = Vec::new();
        let mut insn = Instruction::default();
        while d.can_decode() {
            d.decode_out(&mut insn);
            if insn.code() == iced_x86::Code::Int3 {
                break;
            }
            let mut s = String::new();
            f.format(&insn, &mut s);
            out.push(s);
        }
        out
    }

    const TEXT: u64 = 0xffff_ffff_c000_0000;
    const DATA: u64 = 0xffff_ffff_c000_1000;

    fn symbols(thunks: bool) -> Symbols {
        Symbols {
            queue_work_on: 0xffff_ffff_810a_0000,
            system_wq: 0xffff_ffff_8290_0000,
            raised_list: 0x2_0440,
            indirect_thunk: thunks.then_some(0xffff_ffff_81e0_0000),
            return_thunk: thunks.then_some(0xffff_ffff_81e0_1000),
        }
    }

    #[test]
    fn the_gate_code_is_what_the_doc_says() {
        let bytes = code(TEXT, DATA, &symbols(true)).unwrap();
        assert_eq!(bytes.len(), PAGE as usize);
        let irq = listing(&bytes[..WORK_FN_AT as usize], TEXT);
        assert_eq!(
            irq,
            [
                "endbr64",
                // DATA + 0x100 + 8 = state
                "movl $2,0xffffffffc0001108",
                "mov 0xffffffffc0001128,%edi",
                "movabs $0xffffffff82900000,%rax",
                "mov (%rax),%rsi",
                "lea 0xffffffffc0001080,%rdx",
                "jmp 0xffffffff810a0000",
            ]
        );
        let work = listing(&bytes[WORK_FN_AT as usize..], TEXT + WORK_FN_AT);
        assert_eq!(
            work,
            [
                "endbr64",
                "push %rbp",
                "mov %rsp,%rbp",
                "push %rbx",
                "sub $8,%rsp",
                "lea 0xffffffffc0001100,%rbx",
                "movl $3,8(%rbx)",
                "mov 0x18(%rbx),%rdi",
                "mov 0x30(%rbx),%rsi",
                "mov 0x38(%rbx),%rdx",
                "mov 0x40(%rbx),%rcx",
                "mov 0x10(%rbx),%rax",
                "call 0xffffffff81e00000",
                "mov %rax,0x20(%rbx)",
                "movl $4,8(%rbx)",
                "mov (%rbx),%eax",
                "mov $0xff0,%edx",
                "out %eax,%dx",
                "add $8,%rsp",
                "pop %rbx",
                "pop %rbp",
                "jmp 0xffffffff81e01000",
            ]
        );
        // Without retpolines or return thunks: plain indirect call and ret.
        let plain = code(TEXT, DATA, &symbols(false)).unwrap();
        let work = listing(&plain[WORK_FN_AT as usize..], TEXT + WORK_FN_AT);
        assert!(work.contains(&"call *%rax".to_string()), "{work:?}");
        assert_eq!(work.last().map(String::as_str), Some("ret"));
    }

    #[test]
    fn out_of_reach_targets_are_refused() {
        let mut s = symbols(false);
        s.queue_work_on = 0xffff_8000_0000_0000;
        assert!(matches!(
            code(TEXT, DATA, &s),
            Err(GateError::Unsupported(m)) if m.contains("rel32")
        ));
    }

    /// BTF with 6.1's irq_work and work_struct, `func` of work_struct at
    /// byte `work_func` of a `work_size`-byte struct.
    fn gate_btf(work_func: u32, work_size: u32) -> Btf {
        use klpvisor_guest::btf::synth::BtfBuilder;
        let mut b = BtfBuilder::new();
        let ulong = b.int("long unsigned int", 8);
        let uint = b.int("unsigned int", 4);
        let list = b.composite(
            false,
            "list_head",
            16,
            &[("next", ulong, 0, 0), ("prev", ulong, 64, 0)],
        );
        let llist = b.composite(false, "llist_node", 8, &[("next", ulong, 0, 0)]);
        let node = b.composite(
            false,
            "__call_single_node",
            16,
            &[("llist", llist, 0, 0), ("u_flags", uint, 64, 0)],
        );
        b.composite(
            false,
            "irq_work",
            32,
            &[("node", node, 0, 0), ("func", ulong, 128, 0)],
        );
        b.composite(
            false,
            "work_struct",
            work_size,
            &[
                ("data", ulong, 0, 0),
                ("entry", list, 64, 0),
                ("func", ulong, work_func * 8, 0),
            ],
        );
        Btf::parse(&b.build()).unwrap()
    }

    #[test]
    fn layouts_come_from_btf() {
        let l = Layout::from_btf(&gate_btf(24, 32)).unwrap();
        assert_eq!(
            l,
            Layout {
                irq_next: 0,
                irq_flags: 8,
                irq_func: 16,
                work_data: 0,
                work_entry: 8,
                work_func: 24,
            }
        );
    }

    /// A struct that fits its slot with a member far beyond its end: the
    /// gate wrote the member where BTF said, past its 4 KiB data page
    /// (an index panic in the VMM), before members were bounded by their
    /// struct's size.
    #[test]
    fn members_beyond_their_struct_are_refused() {
        let e = Layout::from_btf(&gate_btf(0x10_0000, 32)).unwrap_err();
        assert!(
            matches!(&e, GateError::Unsupported(m) if m.contains("work_struct.func")),
            "{e}"
        );
        // Inside the slot, but past the struct: over the mailbox's bytes
        // or another field's.
        assert!(Layout::from_btf(&gate_btf(32, 32)).is_err());
        assert!(Layout::from_btf(&gate_btf(28, 32)).is_err());
    }

    #[test]
    fn initial_data_links_the_work_entry_to_itself() {
        let l = Layout {
            irq_next: 0,
            irq_flags: 8,
            irq_func: 24,
            work_data: 0,
            work_entry: 8,
            work_func: 24,
        };
        let page = initial_data(DATA, TEXT, &l);
        assert_eq!(u64_at(&page, 24), TEXT + IRQ_FN_AT);
        assert_eq!(u64_at(&page, WORK_AT + 8), DATA + WORK_AT + 8);
        assert_eq!(u64_at(&page, WORK_AT + 16), DATA + WORK_AT + 8);
        assert_eq!(u64_at(&page, WORK_AT + 24), TEXT + WORK_FN_AT);
        assert_eq!(u64_at(&page, MAILBOX_AT + MB_STATE), IDLE);
    }
}

//! The guest's context switches, logged where the safe-point pause can
//! read them: which tasks may have run since the tasks were judged.
//!
//! The safe-point check judges every task's stack while the guest runs
//! ([`crate::safepoint::Check::prescan`]); the pause then needs only the
//! tasks that may have changed their stacks since. A task's kernel stack
//! changes only while the task runs, and a task runs only between a
//! switch to it and a switch away from it (or while it still runs). So
//! the pause needs: the tasks the pre-scan did not find clear, the tasks
//! each CPU runs now, and every task that took part in a switch since the
//! pre-scan began. The first two are known; this log gives the third,
//! without reading the other (possibly ten thousand) tasks in the pause.
//!
//! The log is a probe on the kernel's `sched_switch` tracepoint,
//! registered once through the call gate in a kworker
//! (`tracepoint_probe_register`, as any tracer's probe), and a ring in an
//! arena data page:
//!
//! ```text
//! probe(ring, preempt, prev, next, prev_state):
//!     i = atomic_fetch_add(&ring->head, 2)
//!     ring->entry[i % N]     = { prev, i + 1 }
//!     ring->entry[i % N + 1] = { next, i + 2 }
//! ```
//!
//! Each entry carries its own sequence number, stored after its task: a
//! reader that finds entry `i` with a sequence other than `i + 1` knows it
//! is being written (a vCPU between the add and the stores) or was
//! overwritten (the ring wrapped), and does not trust the window. x86
//! makes stores visible in program order, so a reader that sees the
//! sequence sees the task too, even while the guest runs.
//!
//! The tracepoint fires in `__schedule` for every switch between two
//! different tasks, before the switch: `next` has not run yet, `prev`
//! has stopped. Its signature, `(bool preempt, struct task_struct *prev,
//! struct task_struct *next, ...)`, has kept `prev` and `next` in the
//! same argument registers from 4.x through 6.16.
//!
//! Why a task the log does not name has the stack it was judged with:
//! its pre-scan saw it off every CPU, twice, with the same switch count,
//! after the log's head was read (`head0`). If it ran at any moment after
//! that, either it runs now (a CPU's current task, judged in the pause),
//! or it stopped, and stopping is a switch away from it, logged after
//! `head0`. A switch whose log entry is still being written (a vCPU paused
//! inside the probe) or a ring that wrapped since `head0` makes the
//! pause read every task, as it does without the log. The guest could
//! forge or drop entries (write the ring, unregister the probe): that
//! only makes klpvisor switch its own kernel at an unsafe point, which a
//! guest kernel can do to itself anyway; the host reads a bounded window
//! of the ring and nothing else.
//!
//! The probe costs one locked add and two stores per context switch, and
//! its registration rewrites the tracepoint's static branch and call in
//! `__schedule`, as any tracer's does. So it is registered only while
//! changes happen: before a transition's first safe-point check, and
//! unregistered once changes pause (as the ftrace redirects are let go),
//! which gives the kernel text back byte for byte. Its text and ring stay
//! in the arena for the next registration.

use std::collections::HashSet;
use std::ops::Range;

use klpvisor_guest::{Btf, Guest, GuestPhys, Kallsyms, Kernel, VcpuRegs, VirtRead};
use thiserror::Error;

use crate::arena::{Arena, ArenaError, Perm, Region};
use crate::write::{Write, WriteError};

const PAGE: u64 = 4096;
/// Entries in the ring: a switch takes two (prev, next). 32768 entries
/// (512 KiB) hold 16384 switches, which a pre-scan of ten thousand tasks
/// does not reach on a busy guest.
pub const ENTRIES: u64 = 1 << 15;
/// Bytes per entry: the task, then its sequence number.
const ENTRY: u64 = 16;
/// Where the entries start in the ring (the head has a cache line of its
/// own).
const SLOTS_AT: u64 = 64;
/// The most `struct tracepoint_func` entries read to find the probe.
const MAX_PROBES: u64 = 64;
/// The largest `struct tracepoint_func` believed.
const MAX_TP_FUNC: u64 = 64;

/// Why the switch log cannot be installed, or its registration failed.
#[derive(Debug, Error)]
pub enum SwitchLogError {
    /// The guest kernel lacks a symbol or layout the log needs.
    #[error("the guest's sched_switch tracepoint cannot carry klpvisor's switch log: {0}")]
    Unsupported(String),
    /// Allocating the probe's or the ring's pages failed.
    #[error("switch log: {0}")]
    Arena(#[from] ArenaError),
    /// Reading guest memory a write replaces failed.
    #[error("switch log: {0}")]
    Write(#[from] WriteError),
    /// The return thunk the probe must use could not be read.
    #[error("switch log: {0}")]
    Thunk(#[from] crate::link::LinkError),
}

/// What the log needs from the guest kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `&__tracepoint_sched_switch`.
    pub tracepoint: u64,
    /// `tracepoint_probe_register`.
    pub register: u64,
    /// `tracepoint_probe_unregister`.
    pub unregister: u64,
    /// Offset of `tracepoint.key.enabled` (an `atomic_t`).
    pub enabled: u64,
    /// Offset of `tracepoint.funcs`.
    pub funcs: u64,
    /// `sizeof(struct tracepoint_func)`.
    pub func_size: u64,
    /// Offset of `tracepoint_func.func`.
    pub func: u64,
    /// Offset of `tracepoint_func.data`.
    pub data: u64,
}

impl Layout {
    /// Reads the symbols and layouts (BTF is untrusted: every field must
    /// lie inside its struct).
    pub fn from_kernel(kallsyms: &Kallsyms, btf: &Btf) -> Result<Self, SwitchLogError> {
        let sym = |name: &str| {
            kallsyms
                .addr(name)
                .map_err(|e| SwitchLogError::Unsupported(format!("{name}: {e}")))
        };
        let off = |path: &str| {
            btf.offset_of(path)
                .map_err(|e| SwitchLogError::Unsupported(format!("BTF: {e}")))
        };
        let size = |name: &str| {
            btf.struct_size(name)
                .map_err(|e| SwitchLogError::Unsupported(format!("BTF: {e}")))
        };
        let tp_size = size("tracepoint")?;
        let func_size = size("tracepoint_func")?;
        let l = Self {
            tracepoint: sym("__tracepoint_sched_switch")?,
            register: sym("tracepoint_probe_register")?,
            unregister: sym("tracepoint_probe_unregister")?,
            enabled: off("tracepoint.key.enabled")?,
            funcs: off("tracepoint.funcs")?,
            func_size,
            func: off("tracepoint_func.func")?,
            data: off("tracepoint_func.data")?,
        };
        if func_size == 0 || func_size > MAX_TP_FUNC {
            return Err(SwitchLogError::Unsupported(format!(
                "struct tracepoint_func is {func_size} bytes"
            )));
        }
        for (what, at, len, within) in [
            ("tracepoint.key.enabled", l.enabled, 4, tp_size),
            ("tracepoint.funcs", l.funcs, 8, tp_size),
            ("tracepoint_func.func", l.func, 8, func_size),
            ("tracepoint_func.data", l.data, 8, func_size),
        ] {
            if at.checked_add(len).is_none_or(|end| end > within) || at % len != 0 {
                return Err(SwitchLogError::Unsupported(format!(
                    "BTF puts {what} at offset {at:#x}, not aligned inside its struct \
                     ({within} bytes)"
                )));
            }
        }
        Ok(l)
    }
}

/// The probe's code for a ring at any address (the ring is its data
/// argument): `endbr64`, the locked add on the head, the two stores, and
/// a return through `return_thunk` when the kernel has one.
pub fn probe_code(va: u64, return_thunk: Option<u64>) -> Result<Vec<u8>, SwitchLogError> {
    let mask = u32::try_from(ENTRIES - 1)
        .map_err(|_| SwitchLogError::Unsupported("ring too large".into()))?;
    let at = |off: u64| SLOTS_AT as u8 + off as u8;
    let mut b = vec![0xf3, 0x0f, 0x1e, 0xfa]; // endbr64
    b.extend([0xb8, 0x02, 0x00, 0x00, 0x00]); // mov eax, 2
    b.extend([0xf0, 0x48, 0x0f, 0xc1, 0x07]); // lock xadd [rdi], rax: i
    b.extend([0x4c, 0x8d, 0x50, 0x01]); // lea r10, [rax+1]: prev's sequence
    b.extend([0x4c, 0x8d, 0x58, 0x02]); // lea r11, [rax+2]: next's sequence
    b.push(0x25); // and eax, MASK (zero-extends: an even entry)
    b.extend(mask.to_le_bytes());
    b.extend([0x48, 0xc1, 0xe0, 0x04]); // shl rax, 4: bytes
    b.extend([0x48, 0x89, 0x54, 0x07, at(0)]); // mov [rdi+rax+64], rdx (prev)
    b.extend([0x4c, 0x89, 0x54, 0x07, at(8)]); // mov [rdi+rax+72], r10
    b.extend([0x48, 0x89, 0x4c, 0x07, at(ENTRY)]); // mov [rdi+rax+80], rcx (next)
    b.extend([0x4c, 0x89, 0x5c, 0x07, at(ENTRY + 8)]); // mov [rdi+rax+88], r11
    match return_thunk {
        Some(t) => {
            let end = va + b.len() as u64 + 5;
            let rel = i32::try_from(t.wrapping_sub(end) as i64).map_err(|_| {
                SwitchLogError::Unsupported(format!(
                    "the return thunk {t:#x} is out of rel32 reach of {va:#x}"
                ))
            })?;
            b.push(0xe9); // jmp return thunk
            b.extend(rel.to_le_bytes());
        }
        None => b.push(0xc3), // ret
    }
    Ok(b)
}

/// How far the log got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogState {
    /// Its pages are written; the probe is not registered.
    Installed,
    /// `tracepoint_probe_register` returned 0: the log is live.
    Registered,
    /// `tracepoint_probe_unregister` returned 0: the tracepoint is as the
    /// guest had it; the pages stay, for the next registration.
    Unregistered,
    /// The registration failed or never finished: the log is never
    /// trusted (the pause reads every task, as without it).
    Lost,
}

/// Why the pause cannot use the log this time (it then reads every task).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// The log is not registered.
    NotLive,
    /// The guest's tracepoint no longer lists the probe, or its key is off.
    Unhooked,
    /// A vCPU is inside the probe: an entry may be half written.
    InProbe(usize),
    /// More switches than the ring holds since the pre-scan (or a head
    /// that went back).
    Wrapped {
        /// The head at the pre-scan.
        from: u64,
        /// The head now.
        to: u64,
    },
    /// Entry `entry` carries another sequence number: being written, or
    /// overwritten.
    Torn {
        /// The entry's number since the ring was installed.
        entry: u64,
        /// The sequence number found (`entry + 1` expected).
        found: u64,
    },
    /// A read failed.
    Read(String),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLive => write!(f, "the switch log is not registered"),
            Self::Unhooked => write!(f, "the guest's sched_switch no longer calls the switch log"),
            Self::InProbe(v) => write!(f, "vCPU {v} is inside the switch log's probe"),
            Self::Wrapped { from, to } => write!(
                f,
                "{} switches since the pre-scan; the ring holds {}",
                to.wrapping_sub(*from) / 2,
                ENTRIES / 2
            ),
            Self::Torn { entry, found } => write!(
                f,
                "the switch log's entry {entry} has sequence {found}: being written or overwritten"
            ),
            Self::Read(e) => write!(f, "{e}"),
        }
    }
}

/// The switch log in one guest.
#[derive(Debug, Clone)]
pub struct SwitchLog {
    layout: Layout,
    text: Region,
    ring: Region,
    code_len: u64,
    state: LogState,
    /// Registrations so far: switches between two of them were not
    /// logged.
    epoch: u64,
}

impl SwitchLog {
    /// Plans the probe's page and the ring on `arena`: the writes map and
    /// fill them. Nothing calls the probe until it is registered.
    pub fn plan_install<G: Guest + ?Sized>(
        kernel: &Kernel,
        guest: &G,
        arena: &mut Arena,
    ) -> Result<(Self, Vec<Write>), SwitchLogError> {
        let layout = Layout::from_kernel(&kernel.kallsyms, &kernel.btf)?;
        let space = kernel.space(guest);
        // Returns as the kernel's own code returns (see the call gate).
        let thunk = crate::link::guest_return_thunk(&space, &kernel.kallsyms)?
            .filter(|&t| !crate::link::guest_plain_returns(&space, &kernel.kallsyms, Some(t)));
        let text = arena.alloc(PAGE, Perm::Text)?;
        let mut code = probe_code(text.va.0, thunk)?;
        let code_len = code.len() as u64;
        code.resize(PAGE as usize, 0xcc);
        let ring_len = (SLOTS_AT + ENTRIES * ENTRY).div_ceil(PAGE) * PAGE;
        let ring = arena.alloc(ring_len, Perm::Data)?;
        let mut writes = arena.map_writes(guest, &[text, ring])?;
        writes.push(Write::read_expect(
            guest,
            text.gpa,
            code,
            "switch log probe",
        )?);
        writes.push(Write::read_expect(
            guest,
            ring.gpa,
            vec![0u8; ring_len as usize],
            "switch log ring",
        )?);
        Ok((
            Self {
                layout,
                text,
                ring,
                code_len,
                state: LogState::Installed,
                epoch: 0,
            },
            writes,
        ))
    }

    /// How far it got.
    pub fn state(&self) -> LogState {
        self.state
    }

    /// Its registrations so far: a summary made under one registration
    /// is no use under the next, whose log missed the switches between.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The registration call: `tracepoint_probe_register(tp, probe, ring)`.
    pub fn register_call(&self) -> (u64, [u64; 3]) {
        (
            self.layout.register,
            [self.layout.tracepoint, self.text.va.0, self.ring.va.0],
        )
    }

    /// The unregistration call: `tracepoint_probe_unregister(tp, probe,
    /// ring)`.
    pub fn unregister_call(&self) -> (u64, [u64; 3]) {
        (
            self.layout.unregister,
            [self.layout.tracepoint, self.text.va.0, self.ring.va.0],
        )
    }

    /// What the unregistration returned (`None`: it did not finish in
    /// time). One that failed leaves the log's state unknown: it is never
    /// trusted or registered again.
    pub fn unregistered(&mut self, ret: Option<u64>) -> Result<(), String> {
        self.settle(ret, LogState::Unregistered, "tracepoint_probe_unregister")
    }

    /// What the registration returned (`None`: it did not finish in time,
    /// and its outcome will never be known).
    pub fn registered(&mut self, ret: Option<u64>) -> Result<(), String> {
        self.settle(ret, LogState::Registered, "tracepoint_probe_register")?;
        self.epoch += 1;
        Ok(())
    }

    /// The state after `call` returned `ret`: `done` for 0, lost for
    /// anything else (a failure, or no result in time).
    fn settle(&mut self, ret: Option<u64>, done: LogState, call: &str) -> Result<(), String> {
        match ret {
            Some(0) => {
                self.state = done;
                Ok(())
            }
            Some(r) => {
                self.state = LogState::Lost;
                let r = r as u32 as i32;
                Err(format!(
                    "{call} returned {r}{}",
                    crate::transition::errno_name(r)
                ))
            }
            None => {
                self.state = LogState::Lost;
                Err(format!("{call} did not finish in time"))
            }
        }
    }

    /// Its two regions: the probe's page and the ring.
    pub fn regions(&self) -> [Region; 2] {
        [self.text, self.ring]
    }

    /// The probe's code, kernel-virtual.
    pub fn probe(&self) -> Range<u64> {
        self.text.va.0..self.text.va.0 + self.code_len
    }

    /// The ring's head: entries written since the ring was installed (two
    /// per switch). A pre-scan reads it before its first task, and only
    /// while the log is registered (see [`SwitchLog::live_head`]).
    pub fn head<G: Guest + ?Sized>(&self, guest: &G) -> Result<u64, Unusable> {
        read_u64(guest, self.ring.gpa)
    }

    /// [`SwitchLog::head`], if the log is registered: where a pre-scan's
    /// window of switches starts.
    pub fn live_head<G: Guest + ?Sized>(&self, guest: &G) -> Result<u64, Unusable> {
        if self.state != LogState::Registered {
            return Err(Unusable::NotLive);
        }
        self.head(guest)
    }

    /// Every task that took part in a switch since the head read `head0`
    /// (see the module's doc for why that, with the running tasks and the
    /// ones the pre-scan did not clear, is every task the pause must
    /// judge). Call with every vCPU paused; `regs` are their registers
    /// and `mem` reads kernel memory.
    pub fn switched_since<G: Guest + ?Sized, M: VirtRead + ?Sized>(
        &self,
        guest: &G,
        mem: &M,
        regs: &[VcpuRegs],
        head0: u64,
    ) -> Result<HashSet<u64>, Unusable> {
        if self.state != LogState::Registered {
            return Err(Unusable::NotLive);
        }
        let probe = self.probe();
        if let Some(v) = regs.iter().position(|r| probe.contains(&r.rip)) {
            return Err(Unusable::InProbe(v));
        }
        if !self.hooked(mem)? {
            return Err(Unusable::Unhooked);
        }
        let head = read_u64(guest, self.ring.gpa)?;
        self.named_between(guest, head0, head)
    }

    /// The tasks of entries `from..to` of the ring, read whole and each
    /// checked against its sequence number. While the guest runs, this is
    /// what a pre-scan learns of the switches since an earlier one: an
    /// entry being written, or one the ring overwrote, makes the window
    /// [`Unusable`].
    pub fn named_between<G: Guest + ?Sized>(
        &self,
        guest: &G,
        from: u64,
        to: u64,
    ) -> Result<HashSet<u64>, Unusable> {
        let n = to.wrapping_sub(from);
        if to < from || n > ENTRIES {
            return Err(Unusable::Wrapped { from, to });
        }
        let mut out = HashSet::new();
        // At most two reads (the window may wrap the ring's end), at most
        // ENTRIES entries in all.
        let start = from % ENTRIES;
        let first = n.min(ENTRIES - start);
        let mut seq = from;
        for (at, len) in [(start, first), (0, n - first)] {
            if len == 0 {
                continue;
            }
            let mut buf = vec![0u8; (len * ENTRY) as usize];
            let gpa = self.ring.gpa + SLOTS_AT + at * ENTRY;
            guest
                .read_phys(gpa, &mut buf)
                .map_err(|e| Unusable::Read(format!("the switch log's ring: {e}")))?;
            for e in buf.chunks_exact(ENTRY as usize) {
                let word = |k: usize| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&e[k..k + 8]);
                    u64::from_le_bytes(w)
                };
                seq += 1;
                if word(8) != seq {
                    return Err(Unusable::Torn {
                        entry: seq - 1,
                        found: word(8),
                    });
                }
                out.insert(word(0));
            }
        }
        Ok(out)
    }

    /// Whether the tracepoint is on and still lists the probe with its
    /// ring.
    fn hooked<M: VirtRead + ?Sized>(&self, mem: &M) -> Result<bool, Unusable> {
        let l = &self.layout;
        let read = |what: &str, e: klpvisor_guest::PagingError| {
            Unusable::Read(format!("sched_switch's {what}: {e}"))
        };
        let enabled = mem
            .read_u32(l.tracepoint.wrapping_add(l.enabled))
            .map_err(|e| read("key", e))?;
        if enabled as i32 <= 0 {
            return Ok(false);
        }
        let funcs = mem
            .read_u64(l.tracepoint.wrapping_add(l.funcs))
            .map_err(|e| read("funcs", e))?;
        if funcs == 0 {
            return Ok(false);
        }
        for i in 0..MAX_PROBES {
            let at = funcs.wrapping_add(i * l.func_size);
            let func = mem
                .read_u64(at.wrapping_add(l.func))
                .map_err(|e| read("funcs", e))?;
            if func == 0 {
                return Ok(false);
            }
            let data = mem
                .read_u64(at.wrapping_add(l.data))
                .map_err(|e| read("funcs", e))?;
            if func == self.text.va.0 && data == self.ring.va.0 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn read_u64<G: Guest + ?Sized>(guest: &G, gpa: GuestPhys) -> Result<u64, Unusable> {
    let mut b = [0u8; 8];
    guest
        .read_phys(gpa, &mut b)
        .map_err(|e| Unusable::Read(format!("the switch log's head: {e}")))?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe is what the module doc says: one locked add of 2 on the
    /// head, an even slot index inside the ring, prev (rdx, the third
    /// argument) then next (rcx, the fourth) stored past the head's cache
    /// line, and the kernel's return.
    #[test]
    fn the_probe_logs_prev_and_next_after_one_locked_add() {
        let va = 0xffff_ffff_c000_0000u64;
        let code = probe_code(va, None).expect("code");
        let text = crate::site::disasm(&code, va, 16);
        let mut at = 0;
        for want in [
            "endbr64",
            "mov $2,%eax",
            "lock xadd %rax,(%rdi)",
            "lea 1(%rax),%r10",
            "lea 2(%rax),%r11",
            "and $0x7fff,%eax",
            "shl $4,%rax",
            "mov %rdx,0x40(%rdi,%rax)",
            "mov %r10,0x48(%rdi,%rax)",
            "mov %rcx,0x50(%rdi,%rax)",
            "mov %r11,0x58(%rdi,%rax)",
            "ret",
        ] {
            let i = text[at..]
                .find(want)
                .unwrap_or_else(|| panic!("{want} missing (in order) from:\n{text}"));
            at += i + want.len();
        }
        // The last pair the mask allows stays inside the ring's slots.
        assert_eq!((ENTRIES - 1) & !1, ENTRIES - 2);
    }

    #[test]
    fn the_probe_returns_through_the_kernels_thunk() {
        let va = 0xffff_ffff_c000_0000u64;
        let thunk = 0xffff_ffff_8100_0000u64;
        let code = probe_code(va, Some(thunk)).expect("code");
        assert_eq!(code[code.len() - 5], 0xe9);
        let rel = i32::from_le_bytes(code[code.len() - 4..].try_into().expect("4"));
        assert_eq!(
            (va + code.len() as u64).wrapping_add(rel as i64 as u64),
            thunk
        );
        assert!(probe_code(va, Some(0x7fff_0000_0000)).is_err());
    }

    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use klpvisor_guest::PagingError;

    const TP: u64 = 0xffff_ffff_8300_0000;
    const FUNCS: u64 = 0xffff_8880_0200_0000;
    const PROBE: u64 = 0xffff_ffff_c000_0000;
    const RING_VA: u64 = 0xffff_ffff_c000_1000;

    /// Guest RAM holding the ring at guest-physical 0, and sparse kernel
    /// memory (the tracepoint and its probe array).
    struct Fake {
        ram: RefCell<Vec<u8>>,
        kmem: BTreeMap<u64, u64>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outside")]
    struct Outside;

    impl Guest for Fake {
        type Error = Outside;
        fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), Outside> {
            let ram = self.ram.borrow();
            let at = gpa.0 as usize;
            buf.copy_from_slice(ram.get(at..at + buf.len()).ok_or(Outside)?);
            Ok(())
        }
        fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), Outside> {
            let mut ram = self.ram.borrow_mut();
            let at = gpa.0 as usize;
            ram.get_mut(at..at + data.len())
                .ok_or(Outside)?
                .copy_from_slice(data);
            Ok(())
        }
        fn arena(&self) -> (GuestPhys, u64) {
            (GuestPhys(0), 0)
        }
        fn vcpu_count(&self) -> usize {
            2
        }
        fn vcpu_regs(&self, _id: usize) -> Result<VcpuRegs, Outside> {
            Ok(VcpuRegs::default())
        }
    }

    impl VirtRead for Fake {
        fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
            // Only aligned words and their low halves are asked for here.
            let w = self
                .kmem
                .get(&va)
                .ok_or(PagingError::NonCanonical { va, levels: 4 })?;
            let n = buf.len().min(8);
            buf[..n].copy_from_slice(&w.to_le_bytes()[..n]);
            Ok(())
        }
    }

    fn layout() -> Layout {
        Layout {
            tracepoint: TP,
            register: 0xffff_ffff_8110_0000,
            unregister: 0xffff_ffff_8110_1000,
            enabled: 8,
            funcs: 0x48,
            func_size: 24,
            func: 0,
            data: 8,
        }
    }

    /// A registered log whose probe is the tracepoint's second probe.
    fn setup() -> (Fake, SwitchLog) {
        let ring_len = (SLOTS_AT + ENTRIES * ENTRY).div_ceil(PAGE) * PAGE;
        let mut kmem = BTreeMap::new();
        kmem.insert(TP + 8, 1); // key enabled
        kmem.insert(TP + 0x48, FUNCS);
        kmem.insert(FUNCS, 0xffff_ffff_8123_0000); // another tracer's probe
        kmem.insert(FUNCS + 8, 0);
        kmem.insert(FUNCS + 24, PROBE);
        kmem.insert(FUNCS + 32, RING_VA);
        kmem.insert(FUNCS + 48, 0);
        let fake = Fake {
            ram: RefCell::new(vec![0; ring_len as usize]),
            kmem,
        };
        let log = SwitchLog {
            layout: layout(),
            text: Region {
                va: klpvisor_guest::KernelVirt(PROBE),
                gpa: GuestPhys(0x10_0000),
                len: PAGE,
                perm: Perm::Text,
            },
            ring: Region {
                va: klpvisor_guest::KernelVirt(RING_VA),
                gpa: GuestPhys(0),
                len: ring_len,
                perm: Perm::Data,
            },
            code_len: 32,
            state: LogState::Registered,
            epoch: 1,
        };
        (fake, log)
    }

    /// What the probe does for one switch.
    fn switch(g: &Fake, prev: u64, next: u64) {
        let mut b = [0u8; 8];
        g.read_phys(GuestPhys(0), &mut b).unwrap();
        let head = u64::from_le_bytes(b);
        g.write_phys(GuestPhys(0), &(head + 2).to_le_bytes())
            .unwrap();
        let i = head & (ENTRIES - 1);
        for (k, task) in [prev, next].into_iter().enumerate() {
            let at = SLOTS_AT + (i + k as u64) * ENTRY;
            g.write_phys(GuestPhys(at), &task.to_le_bytes()).unwrap();
            g.write_phys(GuestPhys(at + 8), &(head + k as u64 + 1).to_le_bytes())
                .unwrap();
        }
    }

    fn regs() -> Vec<VcpuRegs> {
        vec![VcpuRegs::default(); 2]
    }

    #[test]
    fn the_tasks_of_every_switch_since_the_head_are_named() {
        let (g, log) = setup();
        switch(&g, 0xa0, 0xa1); // before the pre-scan: not asked for
        let head0 = log.head(&g).unwrap();
        switch(&g, 0xb0, 0xb1);
        switch(&g, 0xb1, 0xb2);
        let got = log.switched_since(&g, &g, &regs(), head0).unwrap();
        assert_eq!(got, HashSet::from([0xb0, 0xb1, 0xb2]));
        // Nothing since: nothing to judge.
        let head1 = log.head(&g).unwrap();
        assert!(log
            .switched_since(&g, &g, &regs(), head1)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_window_across_the_rings_end_is_read_whole() {
        let (g, log) = setup();
        for k in 0..(ENTRIES / 2 - 1) {
            switch(&g, 0x1000 + k, 0x1000 + k);
        }
        let head0 = log.head(&g).unwrap();
        switch(&g, 0xc0, 0xc1); // the ring's last pair
        switch(&g, 0xc2, 0xc3); // its first again
        let got = log.switched_since(&g, &g, &regs(), head0).unwrap();
        assert_eq!(got, HashSet::from([0xc0, 0xc1, 0xc2, 0xc3]));
    }

    #[test]
    fn a_ring_that_wrapped_since_the_prescan_is_not_trusted() {
        let (g, log) = setup();
        let head0 = log.head(&g).unwrap();
        for k in 0..ENTRIES / 2 {
            switch(&g, 0x10_0000 + k, 0x20_0000 + k);
        }
        // Exactly full: every entry since head0 is still there.
        assert_eq!(
            log.switched_since(&g, &g, &regs(), head0).unwrap().len() as u64,
            ENTRIES
        );
        switch(&g, 0xd0, 0xd1);
        assert!(matches!(
            log.switched_since(&g, &g, &regs(), head0),
            Err(Unusable::Wrapped { .. })
        ));
        // Within the ring's size, but over an entry written since: its
        // sequence number tells.
        assert!(matches!(
            log.named_between(&g, head0, head0 + 4),
            Err(Unusable::Torn { .. })
        ));
        // A head that went back (the guest wrote it) is not trusted either.
        let later = log.head(&g).unwrap() + 2;
        assert!(matches!(
            log.switched_since(&g, &g, &regs(), later),
            Err(Unusable::Wrapped { .. })
        ));
    }

    #[test]
    fn a_vcpu_inside_the_probe_or_a_probe_gone_makes_the_pause_read_every_task() {
        let (mut g, mut log) = setup();
        let head0 = log.head(&g).unwrap();
        let mut r = regs();
        r[1].rip = PROBE + 14; // between the add and the stores
        assert_eq!(
            log.switched_since(&g, &g, &r, head0),
            Err(Unusable::InProbe(1))
        );
        // Unregistered by someone: the probe is no longer listed.
        g.kmem.insert(FUNCS + 24, 0xffff_ffff_8124_0000);
        assert_eq!(
            log.switched_since(&g, &g, &regs(), head0),
            Err(Unusable::Unhooked)
        );
        g.kmem.insert(FUNCS + 24, PROBE);
        // The tracepoint's key turned off.
        g.kmem.insert(TP + 8, 0);
        assert_eq!(
            log.switched_since(&g, &g, &regs(), head0),
            Err(Unusable::Unhooked)
        );
        g.kmem.insert(TP + 8, 1);
        assert!(log.switched_since(&g, &g, &regs(), head0).is_ok());
        // A registration that failed: never trusted.
        assert!(log.registered(Some((-17i64) as u64)).is_err());
        assert_eq!(log.live_head(&g), Err(Unusable::NotLive));
        assert_eq!(
            log.switched_since(&g, &g, &regs(), head0),
            Err(Unusable::NotLive)
        );
    }

    /// An entry whose sequence number is not its own (a vCPU between the
    /// add and the stores, seen while the guest runs) makes the window
    /// untrusted, wherever it is in it.
    #[test]
    fn an_entry_being_written_is_not_trusted() {
        let (g, log) = setup();
        let head0 = log.head(&g).unwrap();
        switch(&g, 0xe0, 0xe1);
        switch(&g, 0xe1, 0xe2);
        switch(&g, 0xe2, 0xe3);
        assert!(log.named_between(&g, head0, head0 + 6).is_ok());
        // The middle switch's add done, its next not stored yet.
        let at = SLOTS_AT + (head0 + 3) * ENTRY + 8;
        g.write_phys(GuestPhys(at), &0u64.to_le_bytes()).unwrap();
        assert_eq!(
            log.named_between(&g, head0, head0 + 6),
            Err(Unusable::Torn {
                entry: head0 + 3,
                found: 0
            })
        );
        // Outside the window it does not matter.
        assert!(log.named_between(&g, head0 + 4, head0 + 6).is_ok());
    }
}

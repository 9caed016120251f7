//! Redirects through the guest's own ftrace, as klp redirects.
//!
//! klp never writes over a function's entry. It registers an `ftrace_ops`
//! with `FTRACE_OPS_FL_IPMODIFY` on the function's ftrace site, and its
//! handler sets the saved instruction pointer to the new function. ftrace
//! then owns the site and shares it: the function tracer, kprobes on the
//! entry and BPF trampolines keep working on a patched function, before,
//! during and after a transition.
//!
//! klpvisor does the same from outside. Each old function gets one
//! `ftrace_ops` in an arena data page (a *slot*), whose `func` is a handler
//! of a few instructions in an arena text page:
//!
//! ```text
//! handler(ip, parent_ip, ops, fregs):
//!     target = ops->private
//!     if target != 0: fregs->regs.ip = target
//! ```
//!
//! - **Register** while the guest runs, through the call gate, in a kworker:
//!   `ftrace_set_filter_ip(ops, site, 0, 0)` then
//!   `register_ftrace_function(ops)`, as klp's `klp_patch_func` does, before
//!   the patch's code is loaded. Its `private` is 0 then, so the ops
//!   changes nothing yet. A guest that does not run the registration in
//!   time gets a `jmp` for those functions instead.
//! - **Switch** in the safe-point pause: one 8-byte write of `private` per
//!   function, so a transition stays one atomic step, checked like any other.
//! - **Unregister** once no patch redirects the function, as klp does
//!   after a transition: `unregister_ftrace_function` (which waits for
//!   RCU-tasks, so no CPU is left in the handler) and `ftrace_free_filter`,
//!   after which the slot is free again and the entry is ftrace's nop.
//!
//! The flags are klp's: `SAVE_REGS | IPMODIFY | PERMANENT` (so that
//! `sysctl kernel.ftrace_enabled=0` cannot silently unpatch), and
//! `RECURSION`: the handler calls nothing, so it cannot recurse and needs
//! no recursion guard. Layouts and flag values come from the guest's BTF;
//! a kernel whose BTF lacks any of them keeps the older `jmp` redirect.
//!
//! A task stopped inside the handler, between reading `private` and storing
//! it, would carry the old target in a register across a switch, so every
//! transition that writes a `private` word also waits for the handler's
//! page to be on no stack and under no vCPU's RIP.

use std::collections::BTreeMap;

use klpvisor_guest::{Btf, Guest, GuestPhys, Kernel, VirtRead};
use thiserror::Error;

use crate::arena::{Arena, ArenaError, Perm, Region};
use crate::write::{AllowKind, Allowed, Write, WriteError};

const PAGE: u64 = 4096;
/// A slot's alignment: a cache line.
const SLOT_ALIGN: u64 = 64;
/// The largest `struct ftrace_ops` a slot takes (6.1: about 200 bytes).
const MAX_OPS_SIZE: u64 = 1024;

/// Why the guest's ftrace cannot carry klpvisor's redirects, or a step of
/// registering one failed.
#[derive(Debug, Error)]
pub enum OpsError {
    /// The guest kernel lacks a layout, flag or function this needs; the
    /// message says which. Redirects then use a `jmp` at the entry.
    #[error("the guest's ftrace cannot carry klpvisor's redirects: {0}")]
    Unsupported(String),
    /// Allocating the handler's or the slots' pages failed.
    #[error("ftrace redirects: {0}")]
    Arena(#[from] ArenaError),
    /// Reading guest memory a write replaces failed.
    #[error("ftrace redirects: {0}")]
    Write(#[from] WriteError),
    /// The return thunk the handler must use could not be read.
    #[error("ftrace redirects: {0}")]
    Thunk(#[from] crate::link::LinkError),
    /// The guest's ftrace refused a step for one function.
    #[error(
        "the guest's ftrace refused to let klpvisor redirect {func}: {step} returned \
         {ret}{errno}{why}"
    )]
    Refused {
        /// The old function.
        func: String,
        /// The kernel function that failed.
        step: &'static str,
        /// Its return value.
        ret: i32,
        /// ` (-EBUSY)` and the like.
        errno: String,
        /// What that usually means.
        why: &'static str,
    },
}

/// What an `ftrace_ops` slot and the handler need from the guest's BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `sizeof(struct ftrace_ops)`.
    pub size: u64,
    /// Offset of `ftrace_ops.func`.
    pub func: u64,
    /// Offset of `ftrace_ops.flags`.
    pub flags: u64,
    /// Offset of `ftrace_ops.private`.
    pub private: u64,
    /// Offset of the saved `ip` in `struct ftrace_regs`.
    pub regs_ip: u64,
    /// `SAVE_REGS | IPMODIFY | RECURSION | PERMANENT`.
    pub flag_bits: u64,
}

impl Layout {
    /// Reads the layouts and flag values from the guest's BTF, which is
    /// untrusted: every field must lie inside its struct, and the struct
    /// inside a slot.
    pub fn from_btf(btf: &Btf) -> Result<Self, OpsError> {
        let off = |path: &str| {
            btf.offset_of(path)
                .map_err(|e| OpsError::Unsupported(format!("BTF: {e}")))
        };
        let size = btf
            .struct_size("ftrace_ops")
            .map_err(|e| OpsError::Unsupported(format!("BTF: {e}")))?;
        if size == 0 || size > MAX_OPS_SIZE {
            return Err(OpsError::Unsupported(format!(
                "struct ftrace_ops is {size} bytes; a slot takes 1 to {MAX_OPS_SIZE}"
            )));
        }
        // x86 keeps a `struct pt_regs regs` in `struct ftrace_regs` (6.1)
        // or, once ftrace_regs became opaque, in `struct
        // __arch_ftrace_regs` at the same address (Debian's 6.12).
        let regs = ["ftrace_regs", "__arch_ftrace_regs"]
            .into_iter()
            .find(|s| btf.offset_of(&format!("{s}.regs.ip")).is_ok())
            .ok_or_else(|| {
                OpsError::Unsupported(
                    "BTF has neither ftrace_regs.regs.ip nor __arch_ftrace_regs.regs.ip".into(),
                )
            })?;
        let regs_size = btf
            .struct_size(regs)
            .map_err(|e| OpsError::Unsupported(format!("BTF: {e}")))?;
        let layout = Self {
            size,
            func: off("ftrace_ops.func")?,
            flags: off("ftrace_ops.flags")?,
            private: off("ftrace_ops.private")?,
            regs_ip: off(&format!("{regs}.regs.ip"))?,
            flag_bits: {
                let mut bits = 0u64;
                for name in [
                    "FTRACE_OPS_FL_SAVE_REGS",
                    "FTRACE_OPS_FL_IPMODIFY",
                    "FTRACE_OPS_FL_RECURSION",
                    "FTRACE_OPS_FL_PERMANENT",
                ] {
                    let v = btf.enumerator(name).ok_or_else(|| {
                        OpsError::Unsupported(format!("BTF has no enumerator {name}"))
                    })?;
                    if !(1..=1 << 31).contains(&v) || v.count_ones() != 1 {
                        return Err(OpsError::Unsupported(format!(
                            "BTF gives {name} the value {v:#x}, not one flag bit"
                        )));
                    }
                    bits |= v as u64;
                }
                bits
            },
        };
        for (what, at, within) in [
            ("ftrace_ops.func", layout.func, size),
            ("ftrace_ops.flags", layout.flags, size),
            ("ftrace_ops.private", layout.private, size),
            ("the saved regs.ip", layout.regs_ip, regs_size),
        ] {
            if at.checked_add(8).is_none_or(|end| end > within) || at % 8 != 0 {
                return Err(OpsError::Unsupported(format!(
                    "BTF puts {what} at offset {at:#x}, not an aligned word inside its struct \
                     ({within} bytes)"
                )));
            }
        }
        Ok(layout)
    }

    /// Bytes between two slots.
    pub fn slot_size(&self) -> u64 {
        self.size.div_ceil(SLOT_ALIGN) * SLOT_ALIGN
    }

    /// Slots per data page.
    pub fn per_page(&self) -> u64 {
        PAGE / self.slot_size()
    }

    /// A fresh `struct ftrace_ops`: zero (ftrace initialises the rest on
    /// registration), `func` the handler, klp's flags, `private` 0.
    pub fn image(&self, handler: u64) -> Vec<u8> {
        let mut b = vec![0u8; self.size as usize];
        let mut put = |at: u64, v: u64| {
            let at = at as usize;
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(self.func, handler);
        put(self.flags, self.flag_bits);
        b
    }
}

/// The guest kernel functions the steps call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symbols {
    /// `ftrace_set_filter_ip(ops, ip, remove, reset)`.
    pub set_filter_ip: u64,
    /// `register_ftrace_function(ops)`.
    pub register: u64,
    /// `unregister_ftrace_function(ops)`.
    pub unregister: u64,
    /// `ftrace_free_filter(ops)`; without it a slot is never reused.
    pub free_filter: Option<u64>,
}

impl Symbols {
    /// Looks them up in the guest's kallsyms.
    pub fn from_kernel(kernel: &Kernel) -> Result<Self, OpsError> {
        let sym = |n: &str| {
            kernel
                .kallsyms
                .addr(n)
                .map_err(|e| OpsError::Unsupported(format!("kallsyms: {e}")))
        };
        Ok(Self {
            set_filter_ip: sym("ftrace_set_filter_ip")?,
            register: sym("register_ftrace_function")?,
            unregister: sym("unregister_ftrace_function")?,
            free_filter: kernel.kallsyms.addr("ftrace_free_filter").ok(),
        })
    }
}

/// What the guest offers for ftrace redirects: checked once per guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// Slot and handler layouts.
    pub layout: Layout,
    /// The functions the steps call.
    pub symbols: Symbols,
}

impl Support {
    /// Checks the guest kernel: BTF layouts and flags, kallsyms symbols.
    pub fn probe(kernel: &Kernel) -> Result<Self, OpsError> {
        Ok(Self {
            layout: Layout::from_btf(&kernel.btf)?,
            symbols: Symbols::from_kernel(kernel)?,
        })
    }
}

/// The handler at `va`: see the module documentation. `return_thunk`: the
/// kernel's chosen return thunk, when returns must go through it.
pub fn handler_code(
    va: u64,
    layout: &Layout,
    return_thunk: Option<u64>,
) -> Result<Vec<u8>, OpsError> {
    let disp = |v: u64, what: &str| {
        i32::try_from(v)
            .map(|d| d.to_le_bytes())
            .map_err(|_| OpsError::Unsupported(format!("{what} offset {v:#x} too large")))
    };
    let mut b = vec![0xf3, 0x0f, 0x1e, 0xfa]; // endbr64
    b.extend([0x48, 0x8b, 0x82]); // mov rax, [rdx + private]
    b.extend(disp(layout.private, "ftrace_ops.private")?);
    b.extend([0x48, 0x85, 0xc0]); // test rax, rax
    b.extend([0x74, 0x07]); // jz over the store
    b.extend([0x48, 0x89, 0x81]); // mov [rcx + regs.ip], rax
    b.extend(disp(layout.regs_ip, "ftrace_regs.regs.ip")?);
    match return_thunk {
        Some(t) => {
            let end = va + b.len() as u64 + 5;
            let rel = i32::try_from(t.wrapping_sub(end) as i64).map_err(|_| {
                OpsError::Unsupported(format!(
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

/// Where one function's `ftrace_ops` lives, and how far its registration
/// got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The slot's kernel-virtual address (the `struct ftrace_ops *`).
    pub va: u64,
    /// Its guest-physical address.
    pub gpa: GuestPhys,
    /// The function's ftrace site (its record's ip).
    pub ip: u64,
    /// The function's name.
    pub name: String,
    /// How far it got.
    pub state: SlotState,
}

/// A slot's registration with the guest's ftrace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Taken for the function; nothing written to the guest yet (its
    /// `ftrace_ops` is written with the first step).
    Assigned,
    /// `ftrace_set_filter_ip` passed.
    Filtered,
    /// `register_ftrace_function` passed: ftrace calls the handler.
    Registered,
    /// `unregister_ftrace_function` passed; its filter is still allocated.
    Unregistered,
    /// A step was sent and its outcome never seen (the guest did not run
    /// it in time): the slot is never used, handed out or let go again.
    Lost,
}

/// One step through the call gate, and the function it calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `ftrace_set_filter_ip(ops, ip, 0, 0)`.
    Filter,
    /// `register_ftrace_function(ops)`.
    Register,
    /// `unregister_ftrace_function(ops)`.
    Unregister,
    /// `ftrace_free_filter(ops)`.
    FreeFilter,
}

impl Step {
    /// The kernel function's name.
    pub fn function(self) -> &'static str {
        match self {
            Step::Filter => "ftrace_set_filter_ip",
            Step::Register => "register_ftrace_function",
            Step::Unregister => "unregister_ftrace_function",
            Step::FreeFilter => "ftrace_free_filter",
        }
    }

    /// What a failure of it usually means.
    fn why(self, ret: i32) -> &'static str {
        match (self, ret) {
            (Step::Register, -16) => {
                ": another ftrace user that changes the instruction pointer (a livepatch loaded \
                 in the guest, or a kprobe with a post handler) already owns this function"
            }
            (Step::Filter, -22) | (Step::Filter, -2) => {
                ": the guest's ftrace has no record for this function's site"
            }
            (_, -19) => ": the guest's ftrace is disabled (an earlier ftrace_bug)",
            _ => "",
        }
    }
}

/// The handler page, the slot pages and every old function's slot.
#[derive(Debug, Clone)]
pub struct Ops {
    support: Support,
    text: Region,
    pages: Vec<Region>,
    /// Slots by old function address.
    slots: BTreeMap<u64, Slot>,
    /// Slots no function holds, to hand out again: (va, gpa).
    free: Vec<(u64, GuestPhys)>,
    /// Freed slots that still hold an `ftrace_ops` image, to zero.
    dirty: Vec<GuestPhys>,
}

impl Ops {
    /// Plans installing the handler: one text page on `arena`.
    pub fn plan_install<G: Guest + ?Sized>(
        kernel: &Kernel,
        guest: &G,
        support: Support,
        arena: &mut Arena,
    ) -> Result<(Self, Vec<Write>), OpsError> {
        let space = kernel.space(guest);
        // Returns as the kernel's own code returns (see the call gate).
        let thunk = crate::link::guest_return_thunk(&space, &kernel.kallsyms)?
            .filter(|&t| !crate::link::guest_plain_returns(&space, &kernel.kallsyms, Some(t)));
        let text = arena.alloc(PAGE, Perm::Text)?;
        let mut code = handler_code(text.va.0, &support.layout, thunk)?;
        code.resize(PAGE as usize, 0xcc);
        let mut writes = arena.map_writes(guest, &[text])?;
        writes.push(Write::read_expect(
            guest,
            text.gpa,
            code,
            "ftrace redirect handler",
        )?);
        Ok((
            Self {
                support,
                text,
                pages: Vec::new(),
                slots: BTreeMap::new(),
                free: Vec::new(),
                dirty: Vec::new(),
            },
            writes,
        ))
    }

    /// Plans enough slot pages on `arena` for `more` functions beyond the
    /// free slots.
    pub fn plan_grow<G: Guest + ?Sized>(
        &mut self,
        guest: &G,
        arena: &mut Arena,
        more: usize,
    ) -> Result<Vec<Write>, OpsError> {
        let short = more.saturating_sub(self.free.len()) as u64;
        if short == 0 {
            return Ok(Vec::new());
        }
        let per_page = self.support.layout.per_page();
        let pages = short.div_ceil(per_page);
        let region = arena.alloc(pages * PAGE, Perm::Data)?;
        let mut writes = arena.map_writes(guest, &[region])?;
        writes.push(Write::read_expect(
            guest,
            region.gpa,
            vec![0u8; region.len as usize],
            "ftrace redirect slots",
        )?);
        let slot = self.support.layout.slot_size();
        for i in (0..pages * per_page).rev() {
            self.free
                .push((region.va.0 + i * slot, region.gpa + i * slot));
        }
        self.pages.push(region);
        Ok(writes)
    }

    /// The guest's support, as probed.
    pub fn support(&self) -> &Support {
        &self.support
    }

    /// The handler page's guest-physical address.
    pub fn handler_gpa(&self) -> GuestPhys {
        self.text.gpa
    }

    /// The writes that zero every freed slot that still holds an
    /// `ftrace_ops` (ftrace no longer knows it), so the slot pages read
    /// as before their first use; the list is emptied. Slots handed out
    /// again since are left alone.
    pub fn plan_scrub<G: Guest + ?Sized>(&mut self, guest: &G) -> Result<Vec<Write>, OpsError> {
        let mut writes = Vec::new();
        for gpa in std::mem::take(&mut self.dirty) {
            if self.free.iter().any(|&(_, g)| g == gpa) {
                writes.push(Write::read_expect(
                    guest,
                    gpa,
                    vec![0u8; self.support.layout.size as usize],
                    "freed ftrace_ops slot",
                )?);
            }
        }
        Ok(writes)
    }

    /// The handler's page, which no task may be in while a `private` word
    /// changes.
    pub fn handler_range(&self) -> std::ops::Range<u64> {
        self.text.va.0..self.text.va.0 + self.text.len
    }

    /// The arena pages it holds.
    pub fn regions(&self) -> Vec<Region> {
        std::iter::once(self.text)
            .chain(self.pages.iter().copied())
            .collect()
    }

    /// The allow-list entries of its pages (slot images and scrubs are
    /// written there).
    pub fn allowed(&self) -> Vec<Allowed> {
        self.regions()
            .iter()
            .map(|r| Allowed {
                gpa: r.gpa,
                len: r.len,
                kind: AllowKind::Arena,
            })
            .collect()
    }

    /// Free slots.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// The slot of old function `old`.
    pub fn slot(&self, old: u64) -> Option<&Slot> {
        self.slots.get(&old)
    }

    /// Whether ftrace calls `old`'s handler: its redirect is the `private`
    /// word.
    pub fn registered(&self, old: u64) -> bool {
        self.slots
            .get(&old)
            .is_some_and(|s| s.state == SlotState::Registered)
    }

    /// Every slot, by old function.
    pub fn slots(&self) -> impl Iterator<Item = (u64, &Slot)> {
        self.slots.iter().map(|(&k, v)| (k, v))
    }

    /// Takes a free slot for `old` (site `ip`, `name`). Nothing is
    /// written yet: the first step writes its `ftrace_ops` ([`Ops::image`]).
    pub fn take(&mut self, old: u64, ip: u64, name: &str) -> Result<(), OpsError> {
        if self.slots.contains_key(&old) {
            return Ok(());
        }
        let (va, gpa) = self
            .free
            .pop()
            .ok_or_else(|| OpsError::Unsupported("no free ftrace_ops slot".into()))?;
        self.slots.insert(
            old,
            Slot {
                va,
                gpa,
                ip,
                name: name.to_owned(),
                state: SlotState::Assigned,
            },
        );
        Ok(())
    }

    /// The write of `old`'s fresh `ftrace_ops`, over whatever its slot
    /// holds now; `None` unless the slot is only assigned.
    pub fn image<G: Guest + ?Sized>(&self, guest: &G, old: u64) -> Result<Option<Write>, OpsError> {
        let Some(s) = self
            .slots
            .get(&old)
            .filter(|s| s.state == SlotState::Assigned)
        else {
            return Ok(None);
        };
        Ok(Some(Write::read_expect(
            guest,
            s.gpa,
            self.support.layout.image(self.text.va.0),
            format!("ftrace_ops of {}", s.name),
        )?))
    }

    /// Whether `old`'s redirect is to go through its slot: taken for it,
    /// and not let go.
    pub fn assigned(&self, old: u64) -> bool {
        self.slots
            .get(&old)
            .is_some_and(|s| !matches!(s.state, SlotState::Unregistered | SlotState::Lost))
    }

    /// The guest did not run the step sent last for `old` in time: its
    /// slot is written off ([`SlotState::Lost`]) and kept under a key no
    /// function has, so `old` can get a fresh slot later.
    pub fn lose(&mut self, old: u64) {
        if let Some(mut s) = self.slots.remove(&old) {
            s.state = SlotState::Lost;
            // Keyed by its own address: no function starts there.
            self.slots.insert(s.va, s);
        }
    }

    /// `old` went with its module: its slot stays registered until it is
    /// let go (by the unloading task itself in klp_module_going, as klp
    /// unregisters there; by the VMM's housekeeping for a module that went
    /// without it), under a key no function has (its own address, as a
    /// lost slot), so that it is never a redirect again.
    pub fn detach(&mut self, old: u64) {
        if let Some(s) = self.slots.remove(&old) {
            self.slots.insert(s.va, s);
        }
    }

    /// The write that clears `old`'s redirect word, if it is not clear:
    /// sent with the slot's unregistration, so that an ops whose function
    /// went while its word was set (a module gone without its going hook)
    /// redirects nothing even before ftrace forgets it.
    pub fn plan_quiet<G: Guest + ?Sized>(
        &self,
        guest: &G,
        old: u64,
    ) -> Result<Option<Write>, OpsError> {
        let Some(s) = self.slots.get(&old) else {
            return Ok(None);
        };
        let w = Write::read_expect(
            guest,
            s.gpa + self.support.layout.private,
            vec![0; 8],
            format!("ftrace redirect of {} (cleared)", s.name),
        )?;
        Ok(w.expect.iter().any(|&b| b != 0).then_some(w))
    }

    /// The arguments of `step` on `old`'s slot.
    pub fn call(&self, old: u64, step: Step) -> Option<(u64, Vec<u64>)> {
        let s = self.slots.get(&old)?;
        let sym = &self.support.symbols;
        Some(match step {
            Step::Filter => (sym.set_filter_ip, vec![s.va, s.ip, 0, 0]),
            Step::Register => (sym.register, vec![s.va]),
            Step::Unregister => (sym.unregister, vec![s.va]),
            Step::FreeFilter => (sym.free_filter?, vec![s.va]),
        })
    }

    /// Records what `step` on `old`'s slot returned (`ret`, an `int`;
    /// ignored for `ftrace_free_filter`, which returns nothing).
    pub fn done(&mut self, old: u64, step: Step, ret: u64) -> Result<(), OpsError> {
        let Some(s) = self.slots.get_mut(&old) else {
            return Ok(());
        };
        let ret = ret as u32 as i32;
        if step != Step::FreeFilter && ret != 0 {
            return Err(OpsError::Refused {
                func: s.name.clone(),
                step: step.function(),
                ret,
                errno: crate::transition::errno_name(ret),
                why: step.why(ret),
            });
        }
        match step {
            Step::Filter => s.state = SlotState::Filtered,
            Step::Register => s.state = SlotState::Registered,
            Step::Unregister => {
                s.state = SlotState::Unregistered;
                if self.support.symbols.free_filter.is_none() {
                    // Its filter hash stays allocated: the slot is not
                    // reused, only forgotten.
                    self.slots.remove(&old);
                }
            }
            Step::FreeFilter => {
                if let Some(s) = self.slots.remove(&old) {
                    self.free.push((s.va, s.gpa));
                    self.dirty.push(s.gpa);
                }
            }
        }
        Ok(())
    }

    /// The next step that brings `old`'s slot to registered.
    pub fn next_up(&self, old: u64) -> Option<Step> {
        match self.slots.get(&old)?.state {
            SlotState::Assigned => Some(Step::Filter),
            SlotState::Filtered => Some(Step::Register),
            SlotState::Registered | SlotState::Unregistered | SlotState::Lost => None,
        }
    }

    /// The next step that lets go of `old`'s slot.
    pub fn next_down(&self, old: u64) -> Option<Step> {
        match self.slots.get(&old)?.state {
            SlotState::Registered => Some(Step::Unregister),
            // A filter set without a registration: freed the same way.
            SlotState::Filtered | SlotState::Unregistered => {
                self.support.symbols.free_filter.map(|_| Step::FreeFilter)
            }
            SlotState::Assigned | SlotState::Lost => None,
        }
    }

    /// Forgets a slot that was assigned but never reached the guest, and
    /// hands it out again.
    pub fn forget_assigned(&mut self, old: u64) {
        if self
            .slots
            .get(&old)
            .is_some_and(|s| s.state == SlotState::Assigned)
        {
            if let Some(s) = self.slots.remove(&old) {
                self.free.push((s.va, s.gpa));
            }
        }
    }

    /// The write that switches `old` from `before` to `after` (0: the
    /// function's own code), and the allow-list entry for it; `None` unless
    /// its slot is [`Ops::assigned`] (it must be registered by the commit).
    pub fn switch_write(
        &self,
        old: u64,
        before: Option<u64>,
        after: Option<u64>,
    ) -> Option<(Allowed, Write)> {
        let s = self
            .slots
            .get(&old)
            .filter(|s| !matches!(s.state, SlotState::Unregistered | SlotState::Lost))?;
        let gpa = s.gpa + self.support.layout.private;
        Some((
            Allowed {
                gpa,
                len: 8,
                kind: AllowKind::RedirectWord { func: old },
            },
            Write::new(
                gpa,
                after.unwrap_or(0).to_le_bytes().to_vec(),
                before.unwrap_or(0).to_le_bytes().to_vec(),
                format!("ftrace redirect of {}", s.name),
            ),
        ))
    }

    /// What `private` of `old`'s slot holds in the guest now.
    pub fn read_private<M: VirtRead + ?Sized>(&self, mem: &M, old: u64) -> Option<u64> {
        let s = self.slots.get(&old)?;
        mem.read_u64(s.va + self.support.layout.private).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            size: 200,
            func: 0,
            flags: 16,
            private: 24,
            regs_ip: 128,
            flag_bits: (1 << 2) | (1 << 4) | (1 << 12) | (1 << 16),
        }
    }

    /// Ops with the handler at a fixed page, no slot pages, `free` slots
    /// and the step functions at 1..=4.
    fn ops(free_filter: Option<u64>, free: Vec<(u64, GuestPhys)>) -> Ops {
        Ops {
            support: Support {
                layout: layout(),
                symbols: Symbols {
                    set_filter_ip: 1,
                    register: 2,
                    unregister: 3,
                    free_filter,
                },
            },
            text: Region {
                va: klpvisor_guest::KernelVirt(0xffff_ffff_c000_0000),
                gpa: GuestPhys(0x100_0000),
                len: PAGE,
                perm: Perm::Text,
            },
            pages: Vec::new(),
            slots: BTreeMap::new(),
            free,
            dirty: Vec::new(),
        }
    }

    #[test]
    fn the_handler_sets_the_saved_ip_only_when_private_is_set() {
        let code = handler_code(0xffff_ffff_c000_0000, &layout(), None).expect("code");
        let text = crate::site::disasm(&code, 0xffff_ffff_c000_0000, 8);
        // Decoded as intended: the load from ops->private (rdx, third
        // argument), the test, the skip, the store into fregs->regs.ip
        // (rcx, fourth argument), the return.
        for want in [
            "endbr64",
            "mov 0x18(%rdx),%rax",
            "test %rax,%rax",
            "je",
            "mov %rax,0x80(%rcx)",
            "ret",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        // The skip lands exactly on the return.
        let je = code.iter().position(|&b| b == 0x74).expect("je");
        assert_eq!(je + 2 + code[je + 1] as usize, code.len() - 1);
    }

    #[test]
    fn the_handler_returns_through_the_kernels_thunk() {
        let va = 0xffff_ffff_c000_0000u64;
        let thunk = 0xffff_ffff_8100_0000u64;
        let code = handler_code(va, &layout(), Some(thunk)).expect("code");
        assert_eq!(code[code.len() - 5], 0xe9);
        let rel = i32::from_le_bytes(code[code.len() - 4..].try_into().expect("4"));
        assert_eq!(
            (va + code.len() as u64).wrapping_add(rel as i64 as u64),
            thunk
        );
        // Out of reach: refused, never truncated.
        assert!(handler_code(va, &layout(), Some(0x7fff_0000_0000)).is_err());
    }

    #[test]
    fn a_fresh_ops_has_the_handler_and_klps_flags_and_nothing_else() {
        let l = layout();
        let img = l.image(0x1122_3344_5566_7788);
        assert_eq!(img.len(), 200);
        assert_eq!(&img[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&img[16..24], &l.flag_bits.to_le_bytes());
        assert!(img[8..16].iter().chain(&img[24..]).all(|&b| b == 0));
        assert_eq!(l.slot_size(), 256);
        assert_eq!(l.per_page(), 16);
    }

    #[test]
    fn a_failed_registration_names_the_function_the_call_and_the_reason() {
        let mut ops = ops(
            Some(4),
            vec![(0xffff_ffff_c000_1000, GuestPhys(0x100_1000))],
        );
        let old = 0xffff_ffff_8120_0000;
        ops.slots.insert(
            old,
            Slot {
                va: 0xffff_ffff_c000_1000,
                gpa: GuestPhys(0x100_1000),
                ip: old + 4,
                name: "cmdline_proc_show".into(),
                state: SlotState::Assigned,
            },
        );
        assert_eq!(ops.next_up(old), Some(Step::Filter));
        assert_eq!(
            ops.call(old, Step::Filter),
            Some((1, vec![0xffff_ffff_c000_1000, old + 4, 0, 0]))
        );
        ops.done(old, Step::Filter, 0).expect("filter");
        assert_eq!(ops.next_up(old), Some(Step::Register));
        let e = ops
            .done(old, Step::Register, (-16i64) as u64)
            .expect_err("EBUSY")
            .to_string();
        assert!(e.contains("cmdline_proc_show"), "{e}");
        assert!(
            e.contains("register_ftrace_function returned -16 (-EBUSY)"),
            "{e}"
        );
        assert!(e.contains("livepatch loaded in the guest"), "{e}");
        // Not registered, but still its redirect; letting go frees the
        // filter it has.
        assert!(ops.switch_write(old, None, Some(5)).is_some());
        assert!(!ops.registered(old));
        assert_eq!(ops.next_down(old), Some(Step::FreeFilter));
        ops.done(old, Step::FreeFilter, 0).expect("free");
        assert!(ops.slot(old).is_none());
        assert_eq!(ops.free_slots(), 2);
    }

    #[test]
    fn the_switch_is_the_private_word_of_a_registered_slot() {
        let mut ops = ops(None, Vec::new());
        let old = 0x1000;
        ops.slots.insert(
            old,
            Slot {
                va: 0xffff_ffff_c000_1000,
                gpa: GuestPhys(0x100_1000),
                ip: old,
                name: "f".into(),
                state: SlotState::Registered,
            },
        );
        let (allowed, w) = ops.switch_write(old, None, Some(0xabcd)).expect("write");
        assert_eq!(w.gpa, GuestPhys(0x100_1000 + 24));
        assert_eq!(w.bytes, 0xabcdu64.to_le_bytes());
        assert_eq!(w.expect, [0; 8]);
        assert_eq!(allowed.len, 8);
        // Without ftrace_free_filter an unregistered slot is forgotten, not
        // reused; no switch goes through it any more.
        assert_eq!(ops.next_down(old), Some(Step::Unregister));
        ops.done(old, Step::Unregister, 0).expect("unregister");
        assert!(ops.slot(old).is_none());
        assert!(ops.switch_write(old, Some(0xabcd), None).is_none());
        assert_eq!(ops.free_slots(), 0);
    }

    #[test]
    fn a_gone_modules_slot_is_no_redirect_and_waits_to_be_let_go() {
        use klpvisor_guest::paging::test_support::FakePhys;
        let mut ops = ops(Some(4), Vec::new());
        let (old, va, gpa) = (0xffff_ffff_c100_0000, 0xffff_ffff_c000_1000, 0x1000);
        let slot = Slot {
            va,
            gpa: GuestPhys(gpa),
            ip: old,
            name: "capability_show".into(),
            state: SlotState::Registered,
        };
        ops.slots.insert(old, slot.clone());
        ops.detach(old);
        // No function's redirect goes through it any more, but it is still
        // registered and waits to be let go, under its own address.
        assert!(!ops.assigned(old));
        assert!(ops.switch_write(old, None, Some(1)).is_none());
        assert_eq!(ops.next_down(old), None);
        assert_eq!(ops.next_down(va), Some(Step::Unregister));
        assert_eq!(ops.call(va, Step::Unregister), Some((3, vec![va])));
        ops.done(va, Step::Unregister, 0).expect("unregister");
        assert_eq!(ops.next_down(va), Some(Step::FreeFilter));
        ops.done(va, Step::FreeFilter, 0).expect("free");
        assert!(ops.slot(va).is_none());
        assert_eq!(ops.free_slots(), 1);
        ops.slots.insert(old, slot);

        // Its unregistration clears a redirect word left set, and only then.
        let m = FakePhys::new(0x4000);
        assert!(ops.plan_quiet(&m, old).expect("read").is_none());
        m.write_phys(GuestPhys(gpa + 24), &0xabcdu64.to_le_bytes())
            .expect("write");
        let w = ops.plan_quiet(&m, old).expect("read").expect("a write");
        assert_eq!(w.gpa, GuestPhys(gpa + 24));
        assert_eq!(w.bytes, [0; 8]);
        assert_eq!(w.expect, 0xabcdu64.to_le_bytes());
    }
}

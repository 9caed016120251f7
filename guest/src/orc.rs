//! The kernel's ORC unwind tables, read from guest memory, and a reliable
//! unwinder for sleeping tasks built on them: the same walk
//! `arch_stack_walk_reliable()` does for klp inside the guest.
//!
//! The conservative scan of [`safepoint`](crate::safepoint) blocks on any
//! stack word that looks like an address in a changed function, stale ones
//! included; a busy kernel leaves many. Where a sleeping task's stack
//! unwinds *reliably* (every frame in kernel text with an ORC entry, every
//! read inside the task's stack, ending at the user-mode registers on top
//! of the stack or at a kernel thread's end-of-stack hint) its real frames
//! replace the scan. Patch code counts as kernel text once its own ORC
//! table is added ([`Orc::add_code`], done when the patch is registered
//! with the guest kernel as a module, whose unwinder reads the same
//! table). Anything else — code without ORC data (ftrace trampolines), an
//! odd register rule, a frame off the stack — makes the walk unreliable and
//! the scan is used: imprecise, never unsafe.
//!
//! The entry format changed twice: Linux 4.14 to 6.2 have two s16 offsets,
//! then sp_reg:4 bp_reg:4 type:2 end:1 (types CALL, REGS, REGS_PARTIAL);
//! 6.3 added a `signal` bit; 6.4 dropped `end` and widened `type` to three
//! bits with new numbers (UNDEFINED, END_OF_STACK, CALL, REGS,
//! REGS_PARTIAL). [`Orc::load_btf`] takes the bitfield positions, and so
//! which of those formats the kernel has, from the kernel's own BTF
//! (`struct orc_entry`); [`Orc::load`] knows only the 4.14..6.2 format by
//! release and refuses newer kernels rather than misread them.

use std::ops::Range;

use thiserror::Error;

use crate::retaddr::{ReturnHooks, TaskHooks};
use crate::{Btf, Kallsyms, Task, VirtRead};

/// Bounds for tables read from guest memory (6.1 has ~370k entries).
const MAX_ENTRIES: u64 = 4 << 20;
const ENTRY_SIZE: u64 = 6;
/// Frames walked at most: real kernel stacks are far shallower.
const MAX_FRAMES: usize = 128;

const REG_UNDEFINED: u8 = 0;
const REG_PREV_SP: u8 = 1;
const REG_BP: u8 = 4;
const REG_SP: u8 = 5;
const REG_BP_INDIRECT: u8 = 8;
const REG_SP_INDIRECT: u8 = 9;

const TYPE_CALL: u8 = 0;
const TYPE_REGS: u8 = 1;
const TYPE_REGS_PARTIAL: u8 = 2;
/// The 6.4+ type numbers (`ORC_TYPE_*` in orc_types.h since commit
/// fb799447ae29, "x86,objtool: Split UNWIND_HINT_EMPTY in two"): BTF has
/// the bitfields but not these #defines, so they are known by format.
const NEW_TYPE_UNDEFINED: u8 = 0;
const NEW_TYPE_END_OF_STACK: u8 = 1;
const NEW_TYPE_CALL: u8 = 2;
const NEW_TYPE_REGS: u8 = 3;
const NEW_TYPE_REGS_PARTIAL: u8 = 4;

/// `struct pt_regs` offsets (x86-64).
const PT_BP: u64 = 4 * 8;
const PT_IP: u64 = 16 * 8;
const PT_CS: u64 = 17 * 8;
const PT_SP: u64 = 19 * 8;
const PT_REGS_SIZE: u64 = 21 * 8;
/// `struct inactive_task_frame`: r15 r14 r13 r12 bx bp ret_addr.
const FRAME_BP: u64 = 5 * 8;
const FRAME_RET: u64 = 6 * 8;
const FRAME_SIZE: u64 = 7 * 8;

/// Why the ORC tables could not be used.
#[derive(Debug, Error)]
pub enum OrcError {
    /// A table bound is not in kallsyms: the kernel has no ORC.
    #[error(
        "the kernel has no ORC tables ({0} not in kallsyms): built without CONFIG_UNWINDER_ORC"
    )]
    Missing(&'static str),
    /// The tables' bounds or contents do not fit together (or the format
    /// is one this code does not know).
    #[error("the ORC tables are inconsistent: {0}")]
    Corrupt(String),
    /// The tables could not be read from guest memory.
    #[error("cannot read the ORC tables: {0}")]
    Read(#[source] crate::paging::PagingError),
    /// BTF's `struct orc_entry` is missing or matches no known format.
    #[error("the kernel's BTF has no usable struct orc_entry ({0}): its ORC format is unknown")]
    Format(String),
}

/// Where the fields of a `struct orc_entry` are, and what its type numbers
/// mean: the bit positions come from BTF (or are 4.14..6.2's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// Entry size in bytes (6, packed).
    size: u64,
    /// (bit offset, width) of sp_reg, bp_reg and type within the entry.
    sp_reg: (u32, u32),
    bp_reg: (u32, u32),
    kind: (u32, u32),
    /// Bit of `end` (4.14..6.3); `None` from 6.4, where the end of the
    /// stack is a type of its own.
    end: Option<u32>,
    /// Bit of `signal` (6.3+): the frame's ip is not a return address.
    signal: Option<u32>,
}

impl Format {
    /// Linux 4.14 to 6.2.
    pub const V4_14: Self = Self {
        size: ENTRY_SIZE,
        sp_reg: (32, 4),
        bp_reg: (36, 4),
        kind: (40, 2),
        end: Some(42),
        signal: None,
    };

    /// The layout of `struct orc_entry` as the kernel's BTF describes it.
    pub fn from_btf(btf: &Btf) -> Result<Self, OrcError> {
        let bad = |e: &dyn std::fmt::Display| OrcError::Format(e.to_string());
        let size = btf.struct_size("orc_entry").map_err(|e| bad(&e))?;
        if !(6..=8).contains(&size) {
            return Err(bad(&format!("{size} bytes")));
        }
        let bits = |name: &str| -> Result<(u32, u32), OrcError> {
            let f = btf
                .field(&format!("orc_entry.{name}"))
                .map_err(|e| bad(&e))?;
            let width = f
                .bitfield_bits
                .ok_or_else(|| bad(&format!("{name} is not a bitfield")))?;
            let at = u32::try_from(f.bit_offset)
                .ok()
                .filter(|&b| u64::from(b) + u64::from(width) <= size * 8 && width <= 8)
                .ok_or_else(|| {
                    bad(&format!(
                        "{name} at bit {} is outside the entry",
                        f.bit_offset
                    ))
                })?;
            Ok((at, width))
        };
        let one = |name: &str| -> Result<Option<u32>, OrcError> {
            if btf.field(&format!("orc_entry.{name}")).is_err() {
                return Ok(None);
            }
            let (at, width) = bits(name)?;
            (width == 1)
                .then_some(Some(at))
                .ok_or_else(|| bad(&format!("{name} is {width} bits wide")))
        };
        for (name, at) in [("sp_offset", 0), ("bp_offset", 2)] {
            let off = btf
                .offset_of(&format!("orc_entry.{name}"))
                .map_err(|e| bad(&e))?;
            if off != at {
                return Err(bad(&format!("{name} at byte {off}")));
            }
        }
        let f = Self {
            size,
            sp_reg: bits("sp_reg")?,
            bp_reg: bits("bp_reg")?,
            kind: bits("type")?,
            end: one("end")?,
            signal: one("signal")?,
        };
        // Either the old format (an `end` bit, 2-bit types) or the 6.4+
        // one (3-bit types, no `end`); anything else is a third format.
        match (f.end, f.kind.1) {
            (Some(_), 2) | (None, 3) => Ok(f),
            _ => Err(bad(&format!(
                "type is {} bits {} an end bit",
                f.kind.1,
                if f.end.is_some() { "with" } else { "without" }
            ))),
        }
    }

    fn decode(&self, b: &[u8]) -> Option<Entry> {
        let raw = b.get(..usize::try_from(self.size).ok()?)?;
        let mut word = [0u8; 8];
        word.get_mut(..raw.len())?.copy_from_slice(raw);
        let word = u64::from_le_bytes(word);
        let get = |(at, width): (u32, u32)| ((word >> at) & ((1u64 << width) - 1)) as u8;
        let kind = get(self.kind);
        let (kind, end) = match self.end {
            Some(bit) => (kind, word & (1 << bit) != 0),
            // 6.4+: map the new numbers onto the old ones the unwinder
            // follows; END_OF_STACK is the old "undefined sp, end set" and
            // UNDEFINED is an entry with no unwind data.
            None => match kind {
                NEW_TYPE_CALL => (TYPE_CALL, false),
                NEW_TYPE_REGS => (TYPE_REGS, false),
                NEW_TYPE_REGS_PARTIAL => (TYPE_REGS_PARTIAL, false),
                NEW_TYPE_END_OF_STACK => (TYPE_END, true),
                NEW_TYPE_UNDEFINED => (TYPE_UNDEFINED, false),
                _ => (TYPE_UNKNOWN, false),
            },
        };
        Some(Entry {
            sp_offset: i16::from_le_bytes([raw[0], raw[1]]),
            bp_offset: i16::from_le_bytes([raw[2], raw[3]]),
            sp_reg: get(self.sp_reg),
            bp_reg: get(self.bp_reg),
            kind,
            end,
            signal: self.signal.map(|bit| word & (1 << bit) != 0),
        })
    }
}

/// Kinds only the 6.4+ format has, as [`Entry::kind`] values past the old
/// numbers: the end of the stack, no unwind data, a number neither format
/// defines.
const TYPE_END: u8 = 0x10;
const TYPE_UNDEFINED: u8 = 0x11;
const TYPE_UNKNOWN: u8 = 0x12;

/// One `struct orc_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Added to `sp_reg`'s value to get the caller's stack pointer.
    pub sp_offset: i16,
    /// Where the caller's frame pointer was saved, relative to `bp_reg`.
    pub bp_offset: i16,
    /// The register the stack pointer is computed from (`ORC_REG_*`).
    pub sp_reg: u8,
    /// The register the saved frame pointer is found through (`ORC_REG_*`).
    pub bp_reg: u8,
    /// The entry's type, in the 4.14..6.2 numbering (6.4+ types mapped
    /// onto it, or past it when the old format has no equivalent).
    pub kind: u8,
    /// The end of the stack: nothing to unwind past this frame.
    pub end: bool,
    /// The `signal` bit, on kernels that have one (6.3+).
    pub signal: Option<bool>,
}

impl Entry {
    #[cfg(test)]
    fn decode(b: &[u8]) -> Option<Self> {
        Format::V4_14.decode(b)
    }
}

/// One frame of an unwound stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Its return address (the interrupted ip for an interrupt frame).
    pub ip: u64,
    /// `Some((trampoline, slot))` when the stack holds `trampoline`'s
    /// address at `slot` and `ip` was recovered from the task's lists.
    pub hooked: Option<(&'static str, u64)>,
}

/// Why a walk is not reliable (the caller falls back to scanning).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unreliable stack at {ip:#x}: {why}")]
pub struct Unreliable {
    /// Kernel-virtual address of the frame the walk stopped at (0 when
    /// the first return address could not be read).
    pub ip: u64,
    /// What made the walk stop.
    pub why: &'static str,
}

/// The kernel's ORC tables: sorted instruction addresses and their entries.
#[derive(Debug, Clone)]
pub struct Orc {
    ips: Vec<u64>,
    entries: Vec<Entry>,
    /// `_stext.._etext`: frames anywhere else are not unwound, but in
    /// `extra`.
    text: Range<u64>,
    format: Format,
    /// Code loaded since (patches), each with its own table.
    extra: Vec<Extra>,
}

/// The ORC table of code outside the kernel image: a patch's text.
#[derive(Debug, Clone)]
struct Extra {
    range: Range<u64>,
    ips: Vec<u64>,
    entries: Vec<Entry>,
}

/// Reads a kernel's tables in the format its BTF describes: any kernel
/// with ORC and BTF, whatever its release.
impl Orc {
    /// Reads the tables, taking the entry format from BTF's
    /// `struct orc_entry`.
    pub fn load_btf<M: VirtRead + ?Sized>(
        mem: &M,
        kallsyms: &Kallsyms,
        btf: &Btf,
    ) -> Result<Self, OrcError> {
        Self::load_format(mem, kallsyms, Format::from_btf(btf)?)
    }
}

impl Orc {
    /// Reads `__start_orc_unwind_ip..__stop_orc_unwind_ip` (32-bit offsets
    /// relative to each slot) and `__start_orc_unwind..__stop_orc_unwind`.
    pub fn load<M: VirtRead + ?Sized>(
        mem: &M,
        kallsyms: &Kallsyms,
        release: Option<&str>,
    ) -> Result<Self, OrcError> {
        if let Some(r) = release {
            if !known_format(r) {
                return Err(OrcError::Corrupt(format!(
                    "kernel {r}: ORC format after 6.2 is not supported"
                )));
            }
        }
        Self::load_format(mem, kallsyms, Format::V4_14)
    }

    fn load_format<M: VirtRead + ?Sized>(
        mem: &M,
        kallsyms: &Kallsyms,
        format: Format,
    ) -> Result<Self, OrcError> {
        let entry_size = format.size;
        let sym = |n: &'static str| kallsyms.addr(n).map_err(|_| OrcError::Missing(n));
        let (ip0, ip1) = (sym("__start_orc_unwind_ip")?, sym("__stop_orc_unwind_ip")?);
        let (e0, e1) = (sym("__start_orc_unwind")?, sym("__stop_orc_unwind")?);
        let text = sym("_stext")?..sym("_etext")?;
        let n = ip1
            .checked_sub(ip0)
            .filter(|l| l % 4 == 0)
            .map(|l| l / 4)
            .ok_or_else(|| OrcError::Corrupt("bad ip table bounds".into()))?;
        if n == 0 || n > MAX_ENTRIES || e1.checked_sub(e0) != Some(n * entry_size) {
            return Err(OrcError::Corrupt(format!(
                "{n} ip slots but {:#x} bytes of entries",
                e1.wrapping_sub(e0)
            )));
        }
        let read = |va, len, what| {
            mem.read_vec(va, len, MAX_ENTRIES * entry_size, what)
                .map_err(OrcError::Read)
        };
        let raw_ips = read(ip0, n * 4, "ORC ip table")?;
        let raw_entries = read(e0, n * entry_size, "ORC entries")?;
        let ips: Vec<u64> = raw_ips
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let rel = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                ip0.wrapping_add(4 * i as u64)
                    .wrapping_add(i64::from(rel) as u64)
            })
            .collect();
        if ips.windows(2).any(|w| w[0] > w[1]) {
            return Err(OrcError::Corrupt("ip table is not sorted".into()));
        }
        let entries = raw_entries
            .chunks_exact(entry_size as usize)
            .filter_map(|b| format.decode(b))
            .collect();
        Ok(Self {
            ips,
            entries,
            text,
            format,
            extra: Vec::new(),
        })
    }

    /// Adds the ORC table of code at `range` outside the kernel image (a
    /// patch's text): `(ip, raw entry)` pairs, sorted by ip, every ip in
    /// `range`, entries in the kernel's format. Replaces a table already
    /// added for the same range.
    pub fn add_code(
        &mut self,
        range: Range<u64>,
        table: &[(u64, [u8; 6])],
    ) -> Result<(), OrcError> {
        if table.len() as u64 > MAX_ENTRIES {
            return Err(OrcError::Corrupt(format!("{} entries", table.len())));
        }
        if self.format.size != ENTRY_SIZE {
            return Err(OrcError::Format(format!(
                "{}-byte entries, a patch's are 6",
                self.format.size
            )));
        }
        if table.windows(2).any(|w| w[0].0 > w[1].0) || table.iter().any(|e| !range.contains(&e.0))
        {
            return Err(OrcError::Corrupt(
                "a patch's ORC table is unsorted or outside its code".into(),
            ));
        }
        let mut ips = Vec::with_capacity(table.len());
        let mut entries = Vec::with_capacity(table.len());
        for (ip, raw) in table {
            let e = self
                .format
                .decode(raw)
                .ok_or_else(|| OrcError::Corrupt(format!("undecodable entry at {ip:#x}")))?;
            ips.push(*ip);
            entries.push(e);
        }
        self.remove_code(&range);
        self.extra.push(Extra {
            range,
            ips,
            entries,
        });
        Ok(())
    }

    /// Forgets the table added for `range` (its code is freed).
    pub fn remove_code(&mut self, range: &Range<u64>) {
        self.extra.retain(|x| x.range != *range);
    }

    /// Whether frames at `ip` can be unwound: kernel text, or added code.
    fn covers(&self, ip: u64) -> bool {
        self.text.contains(&ip) || self.extra.iter().any(|x| x.range.contains(&ip))
    }

    /// Number of entries in the kernel's own table.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    /// Whether the kernel's own table is empty.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// The entry covering `ip`: the last one starting at or before it.
    pub fn find(&self, ip: u64) -> Option<Entry> {
        let (ips, entries) = if self.text.contains(&ip) {
            (&self.ips, &self.entries)
        } else {
            let x = self.extra.iter().find(|x| x.range.contains(&ip))?;
            (&x.ips, &x.entries)
        };
        let i = ips.partition_point(|&x| x <= ip).checked_sub(1)?;
        entries.get(i).copied()
    }

    /// The return addresses of a task that is not running (from its
    /// `inactive_task_frame` at `thread.sp`), innermost first, if its
    /// stack unwinds reliably.
    pub fn unwind_sleeping<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        task: &Task,
    ) -> Result<Vec<u64>, Unreliable> {
        let none = (&ReturnHooks::default(), &TaskHooks::default());
        Ok(self
            .unwind_sleeping_hooked(mem, task, none)?
            .into_iter()
            .map(|f| f.ip)
            .collect())
    }

    /// [`Orc::unwind_sleeping`], each return address a trampoline of
    /// `hooks` stands for replaced by the real one from the task's
    /// `hooked` returns, as the kernel's `unwind_recover_ret_addr` does:
    /// the walk goes on from the real address, whose ORC entry describes
    /// the caller's frame (the trampoline's does not). A trampoline whose
    /// real address the task's lists do not give makes the walk
    /// unreliable (the caller then scans, and blocks where it cannot
    /// recover).
    pub fn unwind_sleeping_hooked<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        task: &Task,
        (hooks, hooked): (&ReturnHooks, &TaskHooks),
    ) -> Result<Vec<Frame>, Unreliable> {
        // The real return address for `ip`, read from stack slot `slot`.
        let recover = |ip: u64, slot: u64| -> Result<Frame, Unreliable> {
            match hooks.trampoline_at(ip) {
                None => Ok(Frame { ip, hooked: None }),
                Some((kind, name)) => match hooked.recover(kind, slot) {
                    Some(real) => Ok(Frame {
                        ip: real,
                        hooked: Some((name, slot)),
                    }),
                    None => Err(Unreliable {
                        ip,
                        why: "a return through a trampoline the task's lists have no entry for",
                    }),
                },
            }
        };
        let stack = task.stack.clone();
        let read = |addr: u64, ip: u64| -> Result<u64, Unreliable> {
            let in_stack = addr
                .checked_add(8)
                .is_some_and(|end| stack.start <= addr && end <= stack.end);
            if !in_stack {
                return Err(Unreliable {
                    ip,
                    why: "a frame reaches outside the task's stack",
                });
            }
            mem.read_u64(addr).map_err(|_| Unreliable {
                ip,
                why: "the stack cannot be read",
            })
        };
        // Guest data: addresses wrap instead of overflowing, and `read`
        // refuses anything (a wrapped address included) off the stack.
        let frame = task.saved_sp;
        let slot = frame.wrapping_add(FRAME_RET);
        let mut cur = recover(read(slot, 0)?, slot)?;
        let mut ip = cur.ip;
        let mut bp = read(frame.wrapping_add(FRAME_BP), ip)?;
        let mut sp = frame.wrapping_add(FRAME_SIZE);
        let mut signal = false;
        let mut frames = Vec::new();
        loop {
            if frames.len() >= MAX_FRAMES {
                return Err(Unreliable {
                    ip,
                    why: "too many frames",
                });
            }
            if !self.covers(ip) {
                return Err(Unreliable {
                    ip,
                    why: "a frame outside kernel and patch text (trampoline code)",
                });
            }
            frames.push(cur);
            let at = if signal { ip } else { ip.wrapping_sub(1) };
            let e = self.find(at).ok_or(Unreliable {
                ip,
                why: "no ORC entry",
            })?;
            match e.kind {
                // 6.4+: the end of a kernel thread's stack (as below).
                TYPE_END => {
                    return if sp.checked_add(PT_REGS_SIZE) == Some(stack.end) {
                        Ok(frames)
                    } else {
                        Err(Unreliable {
                            ip,
                            why: "end-of-stack hint not at the top of the stack",
                        })
                    };
                }
                TYPE_UNDEFINED => {
                    return Err(Unreliable {
                        ip,
                        why: "undefined ORC entry",
                    })
                }
                _ => {}
            }
            if e.sp_reg == REG_UNDEFINED {
                // A kernel thread's end of stack, or no unwind data.
                // ret_from_fork's hint, with the kernel thread's pt_regs
                // right above: the whole stack was walked.
                return if e.end && sp.checked_add(PT_REGS_SIZE) == Some(stack.end) {
                    Ok(frames)
                } else {
                    Err(Unreliable {
                        ip,
                        why: "undefined ORC entry",
                    })
                };
            }
            let base = match e.sp_reg {
                REG_SP | REG_SP_INDIRECT => sp,
                REG_BP | REG_BP_INDIRECT => bp,
                _ => {
                    return Err(Unreliable {
                        ip,
                        why: "an ORC rule this unwinder does not follow",
                    })
                }
            };
            let mut prev_sp = match e.sp_reg {
                REG_SP_INDIRECT => base,
                _ => base.wrapping_add(e.sp_offset as i64 as u64),
            };
            if matches!(e.sp_reg, REG_SP_INDIRECT | REG_BP_INDIRECT) {
                prev_sp = read(prev_sp, ip)?;
                if e.sp_reg == REG_SP_INDIRECT {
                    prev_sp = prev_sp.wrapping_add(e.sp_offset as i64 as u64);
                }
            }
            // Registers saved by this frame, if it is an interrupt or
            // exception frame: where its pt_regs start, and whether all of
            // them were saved (REGS) or only the iret frame (REGS_PARTIAL,
            // which sits at pt_regs' ip).
            let saved = match e.kind {
                TYPE_CALL => None,
                TYPE_REGS => Some((prev_sp, true)),
                TYPE_REGS_PARTIAL => Some((prev_sp.wrapping_sub(PT_IP), false)),
                _ => {
                    return Err(Unreliable {
                        ip,
                        why: "unknown ORC frame type",
                    })
                }
            };
            let (next_ip, next_sp, regs) = match saved {
                None => {
                    let slot = prev_sp.wrapping_sub(8);
                    (recover(read(slot, ip)?, slot)?, prev_sp, None)
                }
                Some((base, full)) => {
                    if read(base.wrapping_add(PT_CS), ip)? & 3 != 0 {
                        // User-mode registers: the stack's end for a user
                        // task, and they must be its task_pt_regs.
                        return if base.checked_add(PT_REGS_SIZE) == Some(stack.end) {
                            Ok(frames)
                        } else {
                            Err(Unreliable {
                                ip,
                                why: "user registers not at the top of the stack",
                            })
                        };
                    }
                    // An interrupted ip, not a return address; were it
                    // a trampoline's first byte, the slot it was
                    // returned from is just below the saved sp.
                    let r_ip = read(base.wrapping_add(PT_IP), ip)?;
                    let r_sp = read(base.wrapping_add(PT_SP), ip)?;
                    (
                        recover(r_ip, r_sp.wrapping_sub(8))?,
                        r_sp,
                        Some((base, full)),
                    )
                }
            };
            bp = match e.bp_reg {
                REG_UNDEFINED => match regs {
                    Some((r, true)) => read(r.wrapping_add(PT_BP), ip)?,
                    _ => bp,
                },
                REG_PREV_SP => read(prev_sp.wrapping_add(e.bp_offset as i64 as u64), ip)?,
                REG_BP => read(bp.wrapping_add(e.bp_offset as i64 as u64), ip)?,
                _ => {
                    return Err(Unreliable {
                        ip,
                        why: "an ORC rule this unwinder does not follow",
                    })
                }
            };
            // Stacks grow down: each caller's frame is above its callee's.
            if next_sp <= sp {
                return Err(Unreliable {
                    ip,
                    why: "the stack pointer does not move up",
                });
            }
            cur = next_ip;
            ip = cur.ip;
            sp = next_sp;
            // 6.3+ says per entry whether the next ip is not a return
            // address (commit ffb1b4a41016, "x86/unwind/orc: Add 'signal'
            // field to ORC metadata"); before, every register frame was.
            signal = e.signal.unwrap_or(regs.is_some());
        }
    }
}

/// Whether release `r` ("6.1.0-56-cloud-amd64") uses the 4.14..6.2 format.
fn known_format(r: &str) -> bool {
    let mut it = r.split(|c: char| !c.is_ascii_digit());
    let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor) >= (4, 14) && (major, minor) <= (6, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_as_the_6_1_bitfields() {
        // sp_offset 16, bp_offset -16, sp_reg SP, bp_reg PREV_SP, CALL.
        let mut b = Vec::new();
        b.extend_from_slice(&16i16.to_le_bytes());
        b.extend_from_slice(&(-16i16).to_le_bytes());
        b.extend_from_slice(&(u16::from(REG_SP) | (u16::from(REG_PREV_SP) << 4)).to_le_bytes());
        let e = Entry::decode(&b).unwrap();
        assert_eq!((e.sp_offset, e.bp_offset), (16, -16));
        assert_eq!(
            (e.sp_reg, e.bp_reg, e.kind, e.end),
            (REG_SP, REG_PREV_SP, TYPE_CALL, false)
        );
        // The end-of-stack hint: sp_reg undefined, type CALL, end set.
        let e = Entry::decode(&[0, 0, 0, 0, 0, 0x04]).unwrap();
        assert!(e.end && e.sp_reg == REG_UNDEFINED);
        assert_eq!(Entry::decode(&[0; 5]), None);
    }

    /// A patch's table answers for its code only, and goes with it.
    #[test]
    fn a_patchs_table_covers_its_code_until_removed() {
        let mut orc = Orc {
            ips: vec![0x1000],
            entries: vec![Entry::decode(&[8, 0, 0, 0, 0x05, 0]).unwrap()],
            text: 0x1000..0x2000,
            format: Format::V4_14,
            extra: Vec::new(),
        };
        let call = |sp: u8| [sp, 0, 0, 0, REG_SP, 0];
        let patch = 0x5000..0x6000;
        assert!(orc.find(0x5010).is_none() && !orc.covers(0x5010));
        orc.add_code(patch.clone(), &[(0x5000, call(8)), (0x5100, call(24))])
            .unwrap();
        assert!(orc.covers(0x5010));
        assert_eq!(orc.find(0x5010).map(|e| e.sp_offset), Some(8));
        assert_eq!(orc.find(0x5100).map(|e| e.sp_offset), Some(24));
        assert_eq!(orc.find(0x6000), None);
        // The kernel's own table still answers for kernel text.
        assert_eq!(orc.find(0x1800).map(|e| e.sp_offset), Some(8));
        // Unsorted, or outside the code: refused.
        let bad = [(0x5100, call(8)), (0x5000, call(8))];
        assert!(orc.add_code(patch.clone(), &bad).is_err());
        assert!(orc.add_code(patch.clone(), &[(0x7000, call(8))]).is_err());
        orc.remove_code(&patch);
        assert!(orc.find(0x5010).is_none() && !orc.covers(0x5010));
    }

    /// `struct orc_entry` as pahole writes it to BTF: 6.1's, or 6.4+'s
    /// (type:3, signal:1 and no end bit).
    fn orc_btf(new: bool) -> Btf {
        let mut b = crate::btf::synth::BtfBuilder::new();
        let s16 = b.int("s16", 2);
        let uint = b.int("unsigned int", 4);
        let mut members = vec![
            ("sp_offset", s16, 0, 0),
            ("bp_offset", s16, 16, 0),
            ("sp_reg", uint, 32, 4),
            ("bp_reg", uint, 36, 4),
        ];
        if new {
            members.extend([("type", uint, 40, 3), ("signal", uint, 43, 1)]);
        } else {
            members.extend([("type", uint, 40, 2), ("end", uint, 42, 1)]);
        }
        b.composite(false, "orc_entry", 6, &members);
        Btf::parse(&b.build()).unwrap()
    }

    #[test]
    fn the_entry_format_comes_from_btf() {
        assert_eq!(Format::from_btf(&orc_btf(false)).unwrap(), Format::V4_14);
        let f = Format::from_btf(&orc_btf(true)).unwrap();
        let flags = |sp: u16, bp: u16, ty: u16, signal: u16| {
            let w = sp | bp << 4 | ty << 8 | signal << 11;
            let mut b = vec![16, 0, 0xf0, 0xff];
            b.extend_from_slice(&w.to_le_bytes());
            b
        };
        // CALL (2), sp = SP + 16, bp = prev_sp - 16.
        let e = f
            .decode(&flags(u16::from(REG_SP), u16::from(REG_PREV_SP), 2, 0))
            .unwrap();
        assert_eq!(
            (e.sp_offset, e.bp_offset, e.sp_reg, e.bp_reg),
            (16, -16, REG_SP, REG_PREV_SP)
        );
        assert_eq!((e.kind, e.end, e.signal), (TYPE_CALL, false, Some(false)));
        // REGS (3) with signal; REGS_PARTIAL (4); END_OF_STACK (1);
        // UNDEFINED (0); 5..7 are no type.
        let kind = |ty: u16, signal: u16| {
            let e = f.decode(&flags(0, 0, ty, signal)).unwrap();
            (e.kind, e.end, e.signal)
        };
        assert_eq!(kind(3, 1), (TYPE_REGS, false, Some(true)));
        assert_eq!(kind(4, 1), (TYPE_REGS_PARTIAL, false, Some(true)));
        assert_eq!(kind(1, 0), (TYPE_END, true, Some(false)));
        assert_eq!(kind(0, 0), (TYPE_UNDEFINED, false, Some(false)));
        assert_eq!(kind(7, 0), (TYPE_UNKNOWN, false, Some(false)));
        // A type field of neither width, or no struct: refused.
        let mut b = crate::btf::synth::BtfBuilder::new();
        let uint = b.int("unsigned int", 4);
        b.composite(false, "orc_entry", 6, &[("type", uint, 40, 5)]);
        assert!(Format::from_btf(&Btf::parse(&b.build()).unwrap()).is_err());
        let empty = crate::btf::synth::BtfBuilder::new();
        assert!(matches!(
            Format::from_btf(&Btf::parse(&empty.build()).unwrap()),
            Err(OrcError::Format(_))
        ));
    }

    #[test]
    fn a_saved_sp_at_the_top_of_the_address_space_is_unreliable() {
        // Found by the tasks fuzz target: `saved_sp + 48` overflowed.
        struct Nothing;
        impl VirtRead for Nothing {
            fn read_virt(&self, va: u64, _: &mut [u8]) -> Result<(), crate::PagingError> {
                Err(crate::PagingError::Unmapped { va })
            }
        }
        let orc = Orc {
            ips: vec![0],
            entries: vec![Entry::decode(&[8, 0, 0, 0, 5, 0]).unwrap()],
            text: 0..u64::MAX,
            format: Format::V4_14,
            extra: Vec::new(),
        };
        let task = Task {
            addr: 0,
            pid: 1,
            tgid: 1,
            comm: String::new(),
            state: 0,
            exit_state: 0,
            flags: 0,
            on_cpu: false,
            stack: u64::MAX - 0x4000..u64::MAX,
            saved_sp: u64::MAX - 8,
            switches: 0,
            start_time: 0,
            idle_cpu: None,
            running: None,
        };
        assert!(orc.unwind_sleeping(&Nothing, &task).is_err());
    }

    /// The ORC walk meets a trampoline's address in a return slot: it
    /// must go on from the real return address the task's hooks hold (the
    /// trampoline's own ORC entry says nothing of the caller's frame).
    /// Without them, this stack even "unwinds reliably" through the
    /// trampoline and the real caller (0x1810) never shows.
    #[test]
    fn a_trampoline_in_a_return_slot_is_replaced_by_the_real_address() {
        use crate::retaddr::{Hook, HookKind, Hooked};
        struct Mem(Vec<(u64, u64)>);
        impl VirtRead for Mem {
            fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), crate::PagingError> {
                let v = self.0.iter().find(|w| w.0 == va).map_or(0, |w| w.1);
                buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
                Ok(())
            }
        }
        const TRAMP: u64 = 0x2800;
        // CALL frames of 8 bytes (just the return address) from 0x1000;
        // the end-of-stack hint from 0x1800.
        let orc = Orc {
            ips: vec![0x1000, 0x1800],
            entries: vec![
                Entry::decode(&[8, 0, 0, 0, REG_SP, 0]).unwrap(),
                Entry::decode(&[0, 0, 0, 0, 0, 0x04]).unwrap(),
            ],
            text: 0x1000..0x3000,
            format: Format::V4_14,
            extra: Vec::new(),
        };
        // inactive_task_frame at sp, returning to 0x1010, whose caller's
        // return slot (sp + 56) holds the trampoline; the kernel thread's
        // pt_regs fill the rest of the stack.
        let sp = 0x9000 - PT_REGS_SIZE - 64;
        let slot = sp + FRAME_SIZE;
        let task = Task {
            addr: 0,
            pid: 9,
            tgid: 9,
            comm: String::new(),
            state: 1,
            exit_state: 0,
            flags: 0,
            on_cpu: false,
            stack: 0x8000..0x9000,
            saved_sp: sp,
            switches: 0,
            start_time: 0,
            idle_cpu: None,
            running: None,
        };
        let mem = Mem(vec![(sp + FRAME_RET, 0x1010), (slot, TRAMP)]);
        let blind = orc.unwind_sleeping(&mem, &task).unwrap();
        assert_eq!(blind, vec![0x1010, TRAMP], "the bug: the caller is hidden");
        let hooks = ReturnHooks::with(vec![Hook::for_test(
            HookKind::Rethook,
            "arch_rethook_trampoline",
            TRAMP,
        )]);
        let mut th = TaskHooks::default();
        th.hooked.push(Hooked {
            kind: HookKind::Rethook,
            trampoline: "arch_rethook_trampoline",
            ret: 0x1810,
            slot,
        });
        let frames = orc
            .unwind_sleeping_hooked(&mem, &task, (&hooks, &th))
            .unwrap();
        assert_eq!(
            frames,
            vec![
                Frame {
                    ip: 0x1010,
                    hooked: None
                },
                Frame {
                    ip: 0x1810,
                    hooked: Some(("arch_rethook_trampoline", slot))
                },
            ]
        );
        // No entry for that slot: unreliable (the caller scans), never
        // a walk that skips the hidden frame.
        th.hooked[0].slot = slot + 8;
        assert!(orc
            .unwind_sleeping_hooked(&mem, &task, (&hooks, &th))
            .is_err());
    }

    #[test]
    fn only_the_pre_6_3_format_is_read() {
        assert!(known_format("6.1.0-56-cloud-amd64"));
        assert!(known_format("5.10.0-30-amd64"));
        assert!(!known_format("6.4.0"));
        assert!(!known_format("6.12.1"));
        assert!(!known_format("4.9.0"));
    }
}

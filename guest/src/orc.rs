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
//! replace the scan. Anything else — code without ORC data (patch code in
//! the arena, ftrace trampolines), an odd register rule, a frame off the
//! stack — makes the walk unreliable and the scan is used: imprecise, never
//! unsafe.
//!
//! The format is the one of Linux 4.14 to 6.2 (`struct orc_entry`: two s16
//! offsets, then sp_reg:4 bp_reg:4 type:2 end:1; types CALL, REGS,
//! REGS_PARTIAL). 6.3 added a `signal` bit and 6.4 renumbered the types;
//! [`Orc::load`] refuses kernels newer than 6.2 rather than misread them.

use std::ops::Range;

use thiserror::Error;

use crate::{Kallsyms, Task, VirtRead};

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

#[derive(Debug, Error)]
pub enum OrcError {
    #[error(
        "the kernel has no ORC tables ({0} not in kallsyms): built without CONFIG_UNWINDER_ORC"
    )]
    Missing(&'static str),
    #[error("the ORC tables are inconsistent: {0}")]
    Corrupt(String),
    #[error("cannot read the ORC tables: {0}")]
    Read(String),
}

/// One `struct orc_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub sp_offset: i16,
    pub bp_offset: i16,
    pub sp_reg: u8,
    pub bp_reg: u8,
    pub kind: u8,
    pub end: bool,
}

impl Entry {
    fn decode(b: &[u8]) -> Option<Self> {
        let w = |i: usize| Some(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?]));
        let flags = w(4)?;
        Some(Self {
            sp_offset: w(0)? as i16,
            bp_offset: w(2)? as i16,
            sp_reg: (flags & 0xf) as u8,
            bp_reg: ((flags >> 4) & 0xf) as u8,
            kind: ((flags >> 8) & 0x3) as u8,
            end: flags & (1 << 10) != 0,
        })
    }
}

/// Why a walk is not reliable (the caller falls back to scanning).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unreliable stack at {ip:#x}: {why}")]
pub struct Unreliable {
    pub ip: u64,
    pub why: &'static str,
}

/// The kernel's ORC tables: sorted instruction addresses and their entries.
#[derive(Debug, Clone)]
pub struct Orc {
    ips: Vec<u64>,
    entries: Vec<Entry>,
    /// `_stext.._etext`: frames anywhere else are not unwound.
    text: Range<u64>,
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
        let sym = |n: &'static str| kallsyms.addr(n).map_err(|_| OrcError::Missing(n));
        let (ip0, ip1) = (sym("__start_orc_unwind_ip")?, sym("__stop_orc_unwind_ip")?);
        let (e0, e1) = (sym("__start_orc_unwind")?, sym("__stop_orc_unwind")?);
        let text = sym("_stext")?..sym("_etext")?;
        let n = ip1
            .checked_sub(ip0)
            .filter(|l| l % 4 == 0)
            .map(|l| l / 4)
            .ok_or_else(|| OrcError::Corrupt("bad ip table bounds".into()))?;
        if n == 0 || n > MAX_ENTRIES || e1.checked_sub(e0) != Some(n * ENTRY_SIZE) {
            return Err(OrcError::Corrupt(format!(
                "{n} ip slots but {:#x} bytes of entries",
                e1.wrapping_sub(e0)
            )));
        }
        let read = |va, len, what| {
            mem.read_vec(va, len, MAX_ENTRIES * ENTRY_SIZE, what)
                .map_err(|e| OrcError::Read(e.to_string()))
        };
        let raw_ips = read(ip0, n * 4, "ORC ip table")?;
        let raw_entries = read(e0, n * ENTRY_SIZE, "ORC entries")?;
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
            .chunks_exact(ENTRY_SIZE as usize)
            .filter_map(Entry::decode)
            .collect();
        Ok(Self { ips, entries, text })
    }

    pub fn len(&self) -> usize {
        self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// The entry covering `ip`: the last one starting at or before it.
    pub fn find(&self, ip: u64) -> Option<Entry> {
        if !self.text.contains(&ip) {
            return None;
        }
        let i = self.ips.partition_point(|&x| x <= ip).checked_sub(1)?;
        self.entries.get(i).copied()
    }

    /// The return addresses of a task that is not running (from its
    /// `inactive_task_frame` at `thread.sp`), innermost first, if its
    /// stack unwinds reliably.
    pub fn unwind_sleeping<M: VirtRead + ?Sized>(
        &self,
        mem: &M,
        task: &Task,
    ) -> Result<Vec<u64>, Unreliable> {
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
        let mut ip = read(frame.wrapping_add(FRAME_RET), 0)?;
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
            if !self.text.contains(&ip) {
                return Err(Unreliable {
                    ip,
                    why: "a frame outside kernel text (patch or trampoline code)",
                });
            }
            frames.push(ip);
            let at = if signal { ip } else { ip.wrapping_sub(1) };
            let e = self.find(at).ok_or(Unreliable {
                ip,
                why: "no ORC entry",
            })?;
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
                None => (read(prev_sp.wrapping_sub(8), ip)?, prev_sp, None),
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
                    let r_ip = read(base.wrapping_add(PT_IP), ip)?;
                    (
                        r_ip,
                        read(base.wrapping_add(PT_SP), ip)?,
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
            ip = next_ip;
            sp = next_sp;
            signal = regs.is_some();
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
            idle_cpu: None,
            running: None,
        };
        assert!(orc.unwind_sleeping(&Nothing, &task).is_err());
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

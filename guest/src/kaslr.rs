//! Where KASLR put the kernel, found from outside.
//!
//! x86_64 Linux maps its image in [0xffffffff80000000, 0xffffffffc0000000)
//! at a random 2 MiB-aligned offset from 0xffffffff81000000, and at boot
//! clears every PMD of that window below `_text` and beyond the image, so the
//! first executable mapping found probing up from 0xffffffff81000000 in
//! 2 MiB steps is `_text` (the LibVMI approach). kallsyms then confirms it:
//! its `_text` must be that address, and independent evidence must agree —
//! LSTAR = `entry_SYSCALL_64` when the vCPU state has MSRs, and the IDT's
//! divide-error gate pointing at the start of a kernel function (IDTR is in
//! every vCPU state, QEMU dumps included).

use crate::kallsyms::{Kallsyms, KERNEL_IMAGE_END};
use crate::paging::{AddressSpace, PagingError, VirtRead};
use crate::{Guest, VcpuRegs};

/// Where the kernel would be without KASLR (`__START_KERNEL`).
pub const DEFAULT_TEXT: u64 = 0xffff_ffff_8100_0000;
/// Start of the kernel image window (`__START_KERNEL_map`).
pub const IMAGE_WINDOW_START: u64 = 0xffff_ffff_8000_0000;
const STEP: u64 = 2 << 20;

/// Errors of the KASLR probe and its confirmation.
#[derive(Debug, thiserror::Error)]
pub enum KaslrError {
    /// No executable, supervisor-only, non-zero 2 MiB slot in the image
    /// window: these page tables do not map the kernel.
    #[error(
        "no executable kernel text mapped in [{from:#x}, {to:#x}) in 2 MiB steps: these page \
         tables (CR3) do not map the kernel image"
    )]
    NoText {
        /// Kernel-virtual start of the window searched.
        from: u64,
        /// Its end (exclusive).
        to: u64,
    },
    /// A page-table walk in the image window failed (other than "not mapped").
    #[error("probing the kernel image window failed at {va:#x}: {source}")]
    Probe {
        /// The kernel-virtual address being translated.
        va: u64,
        /// The walk's error.
        #[source]
        source: PagingError,
    },
    /// A symbol the confirmation needs is not in kallsyms.
    #[error("kallsyms has no `{0}`: cannot confirm the kernel's location")]
    MissingSymbol(&'static str),
    /// kallsyms' `_text` and the page-table probe disagree.
    #[error("kallsyms says _text is at {kallsyms:#x} but the page tables put it at {probed:#x}")]
    TextMismatch {
        /// `_text` as kallsyms has it.
        kallsyms: u64,
        /// `_text` as the probe found it.
        probed: u64,
    },
    /// A vCPU's `syscall` entry is not kallsyms' `entry_SYSCALL_64`.
    #[error("vCPU {vcpu}: LSTAR is {lstar:#x} but kallsyms has entry_SYSCALL_64 at {entry:#x}")]
    LstarMismatch {
        /// The vCPU's index.
        vcpu: usize,
        /// Its IA32_LSTAR.
        lstar: u64,
        /// kallsyms' `entry_SYSCALL_64`.
        entry: u64,
    },
    /// A vCPU's IDT vector 0 gate does not point at the start of a text symbol.
    #[error(
        "vCPU {vcpu}: the IDT divide-error gate points at {handler:#x}, which is not the start \
         of a kernel text symbol"
    )]
    IdtMismatch {
        /// The vCPU's index.
        vcpu: usize,
        /// Kernel-virtual address the gate points at.
        handler: u64,
    },
    /// A vCPU's IDT could not be read.
    #[error("vCPU {vcpu}: cannot read the IDT at {base:#x}: {source}")]
    Idt {
        /// The vCPU's index.
        vcpu: usize,
        /// IDTR base: the IDT's kernel-virtual address.
        base: u64,
        /// The read's error.
        #[source]
        source: PagingError,
    },
}

/// What the page tables alone say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextProbe {
    /// Virtual address of the first mapped executable 2 MiB slot.
    pub text: u64,
    /// Its guest-physical address (physical KASLR is separate).
    pub phys: u64,
}

/// What confirmed the probe, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// LSTAR of every vCPU that reported it equals `entry_SYSCALL_64`.
    Lstar,
    /// No LSTAR known; the IDT's vector 0 gate of every vCPU points at the
    /// start of a kernel text symbol.
    Idt,
    /// Neither register known: only kallsyms' `_text` agrees with the probe.
    KallsymsOnly,
}

/// The kernel's location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kaslr {
    /// Runtime address of `_text`.
    pub text: u64,
    /// `text - 0xffffffff81000000`.
    pub slide: u64,
    /// Guest-physical address of `_text`.
    pub text_phys: u64,
    /// What confirmed it.
    pub evidence: Evidence,
}

/// Probes the image window for the first executable, supervisor-only
/// 2 MiB slot whose first bytes are not all zero.
pub fn probe<G: Guest + ?Sized>(space: &AddressSpace<'_, G>) -> Result<TextProbe, KaslrError> {
    let mut va = DEFAULT_TEXT;
    while va < KERNEL_IMAGE_END {
        match space.translate(va) {
            Ok(t) if t.executable && !t.user => {
                let mut head = [0u8; 64];
                if space.read_virt(va, &mut head).is_ok() && head.iter().any(|&b| b != 0) {
                    return Ok(TextProbe {
                        text: va,
                        phys: t.phys.0,
                    });
                }
            }
            Ok(_) | Err(PagingError::NotPresent { .. }) => {}
            Err(source) => return Err(KaslrError::Probe { va, source }),
        }
        va += STEP;
    }
    Err(KaslrError::NoText {
        from: DEFAULT_TEXT,
        to: KERNEL_IMAGE_END,
    })
}

impl Kaslr {
    /// Confirms a probe with kallsyms and the vCPUs' registers.
    pub fn confirm<M: VirtRead + ?Sized>(
        probe: TextProbe,
        kallsyms: &Kallsyms,
        mem: &M,
        regs: &[VcpuRegs],
    ) -> Result<Self, KaslrError> {
        let text = kallsyms
            .addr("_text")
            .map_err(|_| KaslrError::MissingSymbol("_text"))?;
        if text != probe.text {
            return Err(KaslrError::TextMismatch {
                kallsyms: text,
                probed: probe.text,
            });
        }
        let mut evidence = Evidence::KallsymsOnly;
        let with_lstar: Vec<(usize, u64)> = regs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.lstar.map(|l| (i, l)))
            .collect();
        if !with_lstar.is_empty() {
            let entry = kallsyms
                .addr("entry_SYSCALL_64")
                .map_err(|_| KaslrError::MissingSymbol("entry_SYSCALL_64"))?;
            for (vcpu, lstar) in with_lstar {
                if lstar != entry {
                    return Err(KaslrError::LstarMismatch { vcpu, lstar, entry });
                }
            }
            evidence = Evidence::Lstar;
        } else {
            let mut checked = false;
            for (vcpu, r) in regs.iter().enumerate() {
                // A 64-bit IDT with at least one gate (16 bytes).
                if r.idtr_limit < 15 || !r.cs_long {
                    continue;
                }
                let handler =
                    idt_gate_target(mem, r.idtr_base).map_err(|source| KaslrError::Idt {
                        vcpu,
                        base: r.idtr_base,
                        source,
                    })?;
                let at_start = kallsyms
                    .locate(handler)
                    .is_some_and(|l| l.offset == 0 && l.symbol.kind.eq_ignore_ascii_case(&'t'));
                if !at_start {
                    return Err(KaslrError::IdtMismatch { vcpu, handler });
                }
                checked = true;
            }
            if checked {
                evidence = Evidence::Idt;
            }
        }
        Ok(Kaslr {
            text,
            slide: text.wrapping_sub(DEFAULT_TEXT),
            text_phys: probe.phys,
            evidence,
        })
    }
}

/// The handler address of the 64-bit interrupt gate at `idt` (vector 0).
fn idt_gate_target<M: VirtRead + ?Sized>(mem: &M, idt: u64) -> Result<u64, PagingError> {
    let mut g = [0u8; 16];
    mem.read_virt(idt, &mut g)?;
    let low = u64::from(u16::from_le_bytes([g[0], g[1]]));
    let mid = u64::from(u16::from_le_bytes([g[6], g[7]]));
    let high = u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]]));
    Ok(low | (mid << 16) | (high << 32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::test_support::FakePhys;
    use crate::paging::PageTables;
    use crate::GuestPhys;

    const P: u64 = 0b11;

    /// Kernel image tables: PD slots for `text` (executable) and the slot
    /// before it (NX data), like a kernel after cleanup_highmap.
    fn image_at(text: u64) -> (FakePhys, PageTables) {
        let m = FakePhys::new(0x80_0000);
        let (pml4, pdpt, pd) = (0x1000, 0x2000, 0x3000);
        m.put_u64(pml4 + 511 * 8, pdpt | P);
        m.put_u64(pdpt + 510 * 8, pd | P);
        let slot = (text >> 21) & 0x1ff;
        m.put_u64(pd + (slot - 1) * 8, 0x20_0000 | P | 1 << 7 | 1 << 63);
        m.put_u64(pd + slot * 8, 0x40_0000 | P | 1 << 7);
        m.write_phys(GuestPhys(0x40_0000), &[0x48, 0x8d, 0x25])
            .unwrap();
        (m, PageTables::new(pml4, false))
    }

    #[test]
    fn finds_first_executable_slot() {
        let text = 0xffff_ffff_9a40_0000;
        let (m, pt) = image_at(text);
        let space = AddressSpace::new(&m, pt);
        assert_eq!(
            probe(&space).unwrap(),
            TextProbe {
                text,
                phys: 0x40_0000
            }
        );
    }

    #[test]
    fn no_text_is_a_clear_error() {
        let m = FakePhys::new(0x10000);
        let space = AddressSpace::new(&m, PageTables::new(0x1000, false));
        let e = probe(&space).unwrap_err();
        assert!(matches!(e, KaslrError::NoText { .. }));
        assert!(e.to_string().contains("CR3"));
    }
}

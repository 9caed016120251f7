//! The kernel page tables the arena mapping hooks into, read and checked.
//!
//! x86-64 Linux maps its image through one PMD page, `level2_kernel_pgt`,
//! that covers the whole image window [0xffffffff80000000,
//! 0xffffffffc0000000) (PML5[511] -> PML4[511] -> PDPT[510] -> that page).
//! Every PGD shares it: `pgd_alloc` copies the kernel half of
//! `swapper_pg_dir`, so an entry written there is seen by every process.
//! At boot `cleanup_highmap()` zeroes the PMD entries of the window below
//! `_text` and above `roundup(_brk_end, 2 MiB)`, and nothing maps there
//! later (modules live above the window), so those slots are free for the
//! arena, within rel32 reach of all kernel text.
//!
//! Everything here comes from guest memory and is untrusted: each read is
//! one 8-byte entry or one 4 KiB table at an address masked to the
//! architectural bits, the PMD page must be the one kallsyms names
//! `level2_kernel_pgt` and must map `_text` where the KASLR probe found it,
//! and the engine only ever writes the slots it found zero.

use crate::arena::ArenaError;
use klpvisor_guest::kallsyms::KERNEL_IMAGE_END;
use klpvisor_guest::kaslr::IMAGE_WINDOW_START;
use klpvisor_guest::Guest;
use klpvisor_guest::GuestPhys;
use klpvisor_guest::{Kernel, PageTables};

pub(crate) const PRESENT: u64 = 1;
pub(crate) const RW: u64 = 1 << 1;
pub(crate) const PWT: u64 = 1 << 3;
pub(crate) const PCD: u64 = 1 << 4;
pub(crate) const ACCESSED: u64 = 1 << 5;
pub(crate) const DIRTY: u64 = 1 << 6;
/// PS in a PDPT/PD entry; PAT in a PTE.
pub(crate) const PS: u64 = 1 << 7;
pub(crate) const PTE_PAT: u64 = 1 << 7;
pub(crate) const GLOBAL: u64 = 1 << 8;
/// PAT in a 2 MiB / 1 GiB leaf.
pub(crate) const LARGE_PAT: u64 = 1 << 12;
pub(crate) const NX: u64 = 1 << 63;
pub(crate) const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// EFER.NXE: the CPU honours the NX bit (else bit 63 is reserved).
pub(crate) const EFER_NXE: u64 = 1 << 11;
/// `_KERNPG_TABLE`: how the kernel points a PMD at a PTE page.
pub(crate) const KERNPG_TABLE: u64 = PRESENT | RW | ACCESSED | DIRTY;

pub(crate) const PAGE: u64 = 4096;
pub(crate) const PMD_SIZE: u64 = 2 << 20;
pub(crate) const ENTRIES: u64 = 512;
/// Start of the kernel image window (the 1 GiB `level2_kernel_pgt` maps),
/// where the arena is mapped too.
pub const WINDOW_START: u64 = IMAGE_WINDOW_START;
/// End (exclusive) of the kernel image window.
pub const WINDOW_END: u64 = KERNEL_IMAGE_END;

/// What the arena needs to know about the kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageFacts {
    /// The kernel's page tables (ideally `init_top_pgt`, see
    /// [`Kernel::open`]; any kernel PGD shares the window).
    pub tables: PageTables,
    /// `_text` and where the KASLR probe found it physically.
    pub text: u64,
    /// `_text`'s guest-physical address, from the KASLR probe.
    pub text_phys: u64,
    /// `_end`.
    pub end: u64,
    /// `__start_rodata`: its mapping shows whether the kernel uses NX
    /// when EFER is unknown (memory dumps carry no MSRs).
    pub rodata: u64,
    /// `level2_kernel_pgt`, if kallsyms has it (it does with
    /// CONFIG_KALLSYMS_ALL): the PMD page found by the walk must be it.
    pub pmd_page_va: Option<u64>,
}

impl ImageFacts {
    /// The facts of a kernel already opened (`_end` and `__start_rodata` from
    /// kallsyms).
    pub fn from_kernel(k: &Kernel) -> Result<Self, ArenaError> {
        let sym = |name: &'static str| k.kallsyms.addr(name).map_err(ArenaError::Symbol);
        Ok(Self {
            tables: k.tables,
            text: k.kaslr.text,
            text_phys: k.kaslr.text_phys,
            end: sym("_end")?,
            rodata: sym("__start_rodata")?,
            pmd_page_va: k.kallsyms.addr("level2_kernel_pgt").ok(),
        })
    }
}

/// Where the NX decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NxSource {
    /// A vCPU's EFER.NXE.
    Efer,
    /// The kernel's own `.rodata` mapping (NX set means NX is in use).
    KernelMappings,
}

/// Leaf attributes copied from the kernel's own text mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    /// The kernel text is mapped global (off when page-table isolation
    /// makes the kernel image non-global).
    pub global: bool,
    /// The NX bit may be set (EFER.NXE); without it rodata and data stay
    /// executable, since bit 63 would be a reserved-bit fault.
    pub nx: bool,
    /// How `nx` was decided: EFER, or the kernel's `.rodata` mapping when
    /// EFER is unknown.
    pub nx_source: NxSource,
    /// PWT/PCD/PAT bits of the text mapping, in 4 KiB PTE positions (0 = WB).
    pub cache: u64,
}

/// The window's PMD page, read once.
#[derive(Debug, Clone)]
pub struct Window {
    /// Guest-physical address of the PMD page (`level2_kernel_pgt`).
    pub pmd_page: u64,
    /// Its 512 entries; slot `i` maps `WINDOW_START + i * 2 MiB`.
    pub slots: Vec<u64>,
    /// The attributes of the kernel's own text mapping, copied into arena
    /// entries.
    pub attrs: Attrs,
}

/// PMD slot of a window address.
pub fn slot_of(va: u64) -> u64 {
    (va.wrapping_sub(WINDOW_START) >> 21) & (ENTRIES - 1)
}

pub(crate) fn read_u64<G: Guest + ?Sized>(guest: &G, gpa: u64) -> Result<u64, ArenaError> {
    let mut b = [0u8; 8];
    guest
        .read_phys(GuestPhys(gpa), &mut b)
        .map_err(|e| ArenaError::Read {
            gpa,
            source: Box::new(e),
        })?;
    Ok(u64::from_le_bytes(b))
}

pub(crate) fn read_page<G: Guest + ?Sized>(guest: &G, gpa: u64) -> Result<Vec<u8>, ArenaError> {
    let mut b = vec![0u8; PAGE as usize];
    guest
        .read_phys(GuestPhys(gpa & ADDR_MASK), &mut b)
        .map_err(|e| ArenaError::Read {
            gpa,
            source: Box::new(e),
        })?;
    Ok(b)
}

pub(crate) fn entries(page: &[u8]) -> Vec<u64> {
    page.chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect()
}

/// The leaf entry mapping `va` below the window's PMD `slots`, and whether
/// it is a 2 MiB leaf.
fn leaf<G: Guest + ?Sized>(
    guest: &G,
    slots: &[u64],
    va: u64,
    what: &'static str,
) -> Result<(u64, bool), ArenaError> {
    let pmd = slots.get(slot_of(va) as usize).copied().unwrap_or(0);
    let missing = |why: String| ArenaError::KernelNotMapped { what, va, why };
    if pmd & PRESENT == 0 {
        return Err(missing(format!("its PMD entry is {pmd:#x}")));
    }
    if pmd & PS != 0 {
        return Ok((pmd, true));
    }
    let pte_gpa = (pmd & ADDR_MASK) | (((va >> 12) & (ENTRIES - 1)) * 8);
    let pte = read_u64(guest, pte_gpa)?;
    if pte & PRESENT == 0 {
        return Err(missing(format!("its PTE at {pte_gpa:#x} is {pte:#x}")));
    }
    Ok((pte, false))
}

fn leaf_phys(entry: u64, large: bool, va: u64) -> u64 {
    let size = if large { PMD_SIZE } else { PAGE };
    (entry & ADDR_MASK & !(size - 1)) | (va & (size - 1))
}

/// Walks from the root to the window's PMD page, checks it, reads it and
/// derives the attributes new mappings copy.
pub fn inspect<G: Guest + ?Sized>(guest: &G, facts: &ImageFacts) -> Result<Window, ArenaError> {
    for (what, va) in [("_text", facts.text), ("_end", facts.end)] {
        if !(WINDOW_START..WINDOW_END).contains(&va) {
            return Err(ArenaError::KernelNotMapped {
                what,
                va,
                why: "outside the kernel image window".into(),
            });
        }
    }
    let mut levels: Vec<(&'static str, u32)> = vec![("PML4", 39), ("PDPT", 30)];
    if facts.tables.five_level() {
        levels.insert(0, ("PML5", 48));
    }
    let mut table = facts.tables.root();
    for (level, shift) in levels {
        let entry_gpa = table | (((WINDOW_START >> shift) & (ENTRIES - 1)) * 8);
        let entry = read_u64(guest, entry_gpa)?;
        let bad = |why: &'static str| ArenaError::Walk {
            level,
            entry_gpa,
            entry,
            why,
        };
        if entry & PRESENT == 0 {
            return Err(bad("not present"));
        }
        if level == "PDPT" && entry & PS != 0 {
            return Err(bad(
                "maps the window with a 1 GiB page: there is no PMD page to add entries to",
            ));
        }
        table = entry & ADDR_MASK;
    }
    let pmd_page = table;
    if let Some(va) = facts.pmd_page_va {
        let expected = facts
            .tables
            .translate(guest, va)
            .map_err(|e| ArenaError::KernelNotMapped {
                what: "level2_kernel_pgt",
                va,
                why: e.to_string(),
            })?
            .phys
            .0;
        if expected != pmd_page {
            return Err(ArenaError::PmdPageMismatch {
                found: pmd_page,
                expected,
            });
        }
    }
    let slots = entries(&read_page(guest, pmd_page)?);

    let (text_leaf, large) = leaf(guest, &slots, facts.text, "_text")?;
    let phys = leaf_phys(text_leaf, large, facts.text);
    if phys != facts.text_phys {
        return Err(ArenaError::KernelNotMapped {
            what: "_text",
            va: facts.text,
            why: format!(
                "the PMD page maps it at {phys:#x}, the KASLR probe found {:#x}",
                facts.text_phys
            ),
        });
    }
    if text_leaf & NX != 0 || text_leaf & RW != 0 {
        return Err(ArenaError::KernelNotMapped {
            what: "_text",
            va: facts.text,
            why: format!("its leaf {text_leaf:#x} is not read-only executable"),
        });
    }
    leaf(guest, &slots, facts.end.saturating_sub(1), "_end - 1")?;
    let pat = if large {
        text_leaf & LARGE_PAT != 0
    } else {
        text_leaf & PTE_PAT != 0
    };
    let cache = (text_leaf & (PWT | PCD)) | if pat { PTE_PAT } else { 0 };

    // NX: EFER when a vCPU reports it, else the kernel's own .rodata.
    let efer = (0..guest.vcpu_count()).find_map(|i| guest.vcpu_regs(i).ok().and_then(|r| r.efer));
    let (nx, nx_source) = match efer {
        Some(efer) => (efer & EFER_NXE != 0, NxSource::Efer),
        None => {
            let (ro, _) = leaf(guest, &slots, facts.rodata, "__start_rodata")?;
            (ro & NX != 0, NxSource::KernelMappings)
        }
    };
    Ok(Window {
        pmd_page,
        slots,
        attrs: Attrs {
            global: text_leaf & GLOBAL != 0,
            nx,
            nx_source,
            cache,
        },
    })
}

//! The patch arena: reserved guest-physical memory mapped into the kernel
//! image window, and an allocator over it.
//!
//! Layout. The PTE pages of the arena's own mapping live in RAM the VMM
//! reserved for them ([`Guest::arena_tables`], a `setup_data` blob the
//! kernel keeps for good), because the kernel follows page tables through
//! its direct map, which covers RAM only: `text_poke()` on patch code (a
//! kprobe, a jump label) walks to the PTE with `__va()` and would fault on
//! a PTE page in reserved memory. A guest with no such region (a dump)
//! gets them in the first pages of the arena instead. Either way the
//! guest never allocates that memory, so no guest allocator is needed.
//! The arena is mapped linearly from a
//! 2 MiB-aligned virtual base in the image window, in PMD slots that were
//! empty — after `_end` rounded up to 2 MiB, or below `_text` when there is
//! no room above. Only two kinds of guest memory are ever written: those
//! slots of the kernel's PMD page, and the arena itself.
//!
//! Permissions are W^X per 4 KiB page ([`Perm`]), with the kernel text's
//! own conventions: accessed set (dirty too for data) so the CPU never
//! writes our entries, global exactly when the kernel text is (page-table
//! isolation turns it off), NX when the CPU has it on, the same caching.
//!
//! Mapping is lazy and expressed as writes ([`Arena::map_writes`]): a slot
//! gets its PTE page (written whole) and then its PMD entry the first time
//! one of its pages is used. A page once mapped keeps its permission for
//! good: [`Arena::free`] returns it to a pool of its own permission, so a
//! reused page never changes rights and no stale TLB entry in the guest
//! can grant what the new contents should not have (the engine cannot
//! flush the guest's TLBs). The allocator is a plain value: allocate on a
//! clone, commit the plan, keep the clone only if the commit succeeded.
//!
//! [`Granularity::Large2M`] is the alternative without PTE pages: each slot
//! is one 2 MiB leaf with one permission, fixed when its first page is
//! allocated. Why offer it: with PTE pages in the arena (no reserved
//! tables region), a guest page-table walker that follows our PMD entries
//! through `__va()` (`text_poke()`, debugfs `page_tables`, CONFIG_DEBUG_WX's
//! check when re-run) would fault on them; a 2 MiB leaf is never followed,
//! and `vmalloc_to_page()` computes its page without reading a PTE page.
//! The price is coarser permissions
//! (a slot per permission in use) and a 2 MiB-aligned arena.

pub mod tables;

use std::collections::BTreeMap;
use std::fmt;

use tables::{
    entries, read_page, read_u64, ACCESSED, ADDR_MASK, DIRTY, ENTRIES, GLOBAL, KERNPG_TABLE,
    LARGE_PAT, NX, PAGE, PMD_SIZE, PRESENT, PS, PTE_PAT, RW,
};
pub use tables::{slot_of, Attrs, ImageFacts, NxSource, Window, WINDOW_END, WINDOW_START};

use crate::write::{AllowKind, Allowed, Write};
use klpvisor_guest::kaslr::DEFAULT_TEXT;
use klpvisor_guest::{Guest, GuestPhys, KernelVirt};

/// rel32 reach: every arena byte must be this close to every kernel byte.
const REACH: u64 = 1 << 31;
/// 512 MiB of 2 MiB slots: the image window of a kernel without KASLR.
const NO_KASLR_SLOTS: u64 = 256;

/// Errors of setting up, allocating from and mapping the arena.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// The VMM reserved no arena, so there is nowhere to put patch code.
    #[error("the VMM reserved no patch arena (size 0)")]
    NoArena,
    /// The reserved region (or its page-table region) cannot hold the arena.
    #[error("the arena {gpa:#x}+{size:#x} is unusable: {why}")]
    BadArena {
        /// Where the VMM reserved the arena (guest-physical).
        gpa: u64,
        /// Its size in bytes.
        size: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A kallsyms symbol the mapping checks against (`_end`, `__start_rodata`)
    /// is missing.
    #[error("kernel symbol needed for the arena mapping is missing: {0}")]
    Symbol(#[source] klpvisor_guest::KallsymsError),
    /// A page-table entry or page could not be read from guest memory.
    #[error("cannot read guest-physical {gpa:#x}: {source}")]
    Read {
        /// What was being read (guest-physical).
        gpa: u64,
        /// The guest's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The walk from the kernel's root page table to the image window's PMD
    /// page met an entry it cannot follow.
    #[error(
        "walking to the kernel image window: the {level} entry at guest-physical {entry_gpa:#x} \
         ({entry:#x}) {why}"
    )]
    Walk {
        /// The table the entry is in: "PML5", "PML4" or "PDPT".
        level: &'static str,
        /// Where the entry is (guest-physical).
        entry_gpa: u64,
        /// The entry's value.
        entry: u64,
        /// Why it cannot be followed.
        why: &'static str,
    },
    /// The walk reached a PMD page other than `level2_kernel_pgt`: the page
    /// tables are not the kernel's own (or are forged).
    #[error(
        "the image window's PMD page is at {found:#x} but level2_kernel_pgt is at {expected:#x}: \
         refusing to write page tables that are not the kernel's own"
    )]
    PmdPageMismatch {
        /// The PMD page the walk reached (guest-physical).
        found: u64,
        /// Where `level2_kernel_pgt` (kallsyms) is (guest-physical).
        expected: u64,
    },
    /// The window does not map a kernel symbol the way the arena relies on:
    /// unmapped, outside the window, or `_text` not where the KASLR probe found
    /// it.
    #[error("the kernel image window does not map {what} ({va:#x}) as expected: {why}")]
    KernelNotMapped {
        /// Which symbol (`_text`, `_end - 1`, `level2_kernel_pgt`).
        what: &'static str,
        /// Its kernel-virtual address.
        va: u64,
        /// What the mapping shows instead.
        why: String,
    },
    /// PMD slots already point into the arena or its page-table region: an
    /// earlier layout is live.
    #[error(
        "the arena is already mapped (PMD slots {slots:?} point into it): keep the Arena that \
         mapped it instead of laying it out again, which would reuse its live PTE pages"
    )]
    AlreadyMapped {
        /// Indices of those slots in the window's PMD page.
        slots: Vec<u64>,
    },
    /// The kernel's PMD page for the window lies in memory the arena would
    /// write.
    #[error("the kernel's PMD page {pmd_page:#x} lies inside the arena: refusing to map over it")]
    PmdPageInArena {
        /// Guest-physical address of the PMD page.
        pmd_page: u64,
    },
    /// No run of empty PMD slots next to the kernel image is long enough for
    /// the arena.
    #[error(
        "no {needed} consecutive empty PMD slots (2 MiB each) in the kernel image window next to \
         the kernel (after _end {end:#x} or before _text {text:#x}); largest empty run: {largest} \
         slots"
    )]
    NoRoom {
        /// Slots (2 MiB each) the arena needs.
        needed: u64,
        /// The longest run of empty slots in the window.
        largest: u64,
        /// `_text` (kernel-virtual).
        text: u64,
        /// `_end` (kernel-virtual).
        end: u64,
    },
    /// Some arena byte would be 2 GiB or more from kernel text, out of reach of
    /// the `jmp rel32` at a site.
    #[error(
        "arena VA {va:#x}..{va_end:#x} is out of rel32 reach of kernel text {text:#x}..{end:#x}"
    )]
    OutOfReach {
        /// Start of the arena's mappable part (kernel-virtual).
        va: u64,
        /// Its end (exclusive).
        va_end: u64,
        /// `_text` (kernel-virtual).
        text: u64,
        /// `_end` (kernel-virtual).
        end: u64,
    },
    /// An allocation of 0 bytes was asked for.
    #[error("cannot allocate 0 bytes")]
    ZeroSize,
    /// No free run of pages is long enough for the allocation.
    #[error(
        "arena full: {requested} bytes of {perm} requested, largest free run for it is \
         {largest_free} bytes ({free_total} bytes free for {perm} in all, arena {arena_bytes} \
         bytes)"
    )]
    Full {
        /// Bytes asked for.
        requested: u64,
        /// Rights asked for.
        perm: Perm,
        /// Bytes in the longest run usable for `perm` (never-used pages and
        /// pages retired with `perm`).
        largest_free: u64,
        /// Bytes usable for `perm` in all runs.
        free_total: u64,
        /// Size of the whole arena in bytes (PTE pages included).
        arena_bytes: u64,
    },
    /// A region to free or map is not a live allocation of this arena: freed
    /// already, or not handed out by it.
    #[error("{va:#x}+{len:#x} ({perm}) is not a live allocation of this arena")]
    UnknownRegion {
        /// The region's start (kernel-virtual).
        va: u64,
        /// Its length in bytes.
        len: u64,
        /// Its rights.
        perm: Perm,
    },
    /// A PMD slot the arena owns holds an entry that is neither empty nor the
    /// arena's: something in the guest mapped it.
    #[error(
        "PMD slot {slot} ({va:#x}) holds {found:#x}, neither empty nor the arena's entry \
         {expected:#x}: something else mapped it"
    )]
    SlotTaken {
        /// Index of the slot in the window's PMD page.
        slot: u64,
        /// First address it maps (kernel-virtual).
        va: u64,
        /// The entry there now.
        found: u64,
        /// The entry the arena writes there.
        expected: u64,
    },
    /// A PTE in one of the arena's PTE pages is neither empty nor what the
    /// arena wants there: the arena's page tables were modified.
    #[error(
        "the arena PTE for {va:#x} holds {found:#x}, neither empty nor the expected {wanted:#x}: \
         the arena's page tables were modified"
    )]
    PteConflict {
        /// The page the PTE maps (kernel-virtual).
        va: u64,
        /// The PTE there now.
        found: u64,
        /// The PTE the arena wants there.
        wanted: u64,
    },
}

/// Rights of arena pages: W^X.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Perm {
    /// Code: read + execute.
    Text,
    /// Read-only data: read, NX.
    ReadOnly,
    /// Writable data: read + write, NX.
    Data,
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Perm::Text => "text (RX)",
            Perm::ReadOnly => "read-only data (R, NX)",
            Perm::Data => "data (RW, NX)",
        })
    }
}

/// How arena pages are mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Granularity {
    /// 4 KiB PTEs in PTE pages at the start of the arena; per-page rights.
    #[default]
    Pages4K,
    /// 2 MiB PMD leaves, no PTE pages; per-slot rights.
    Large2M,
}

/// An allocation: virtually and physically contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Where the kernel sees it.
    pub va: KernelVirt,
    /// Where it is in guest memory.
    pub gpa: GuestPhys,
    /// Bytes, a multiple of 4 KiB.
    pub len: u64,
    /// The rights of its pages, fixed while it is live.
    pub perm: Perm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    /// Never allocated: not mapped (as far as the arena knows).
    Unused,
    Used(Perm),
    /// Freed; may still be mapped with this permission, reused only for it.
    Retired(Perm),
}

impl Page {
    fn fits(self, perm: Perm) -> bool {
        match self {
            Page::Unused => true,
            Page::Retired(p) => p == perm,
            Page::Used(_) => false,
        }
    }
}

/// The arena: its layout in the guest and the allocator state.
#[derive(Debug, Clone)]
pub struct Arena {
    gpa: u64,
    size: u64,
    /// PTE pages at the start of the arena (0 when they live apart).
    table_pages: u64,
    /// The reserved region (start, size) of the PTE pages, when they live
    /// apart from the arena: slot `j`'s PTE page is at `start + j * 4 KiB`.
    tables: Option<(u64, u64)>,
    /// Virtual address of the first mappable page (a slot boundary).
    base_va: u64,
    first_slot: u64,
    slots: u64,
    pmd_page: u64,
    attrs: Attrs,
    granularity: Granularity,
    /// With [`Granularity::Large2M`]: each slot's permission once set.
    slot_perm: Vec<Option<Perm>>,
    /// Mappable pages, in order: page `i` is at `base_va + i * 4 KiB` and
    /// guest-physical `gpa + (table_pages + i) * 4 KiB`.
    pages: Vec<Page>,
    /// Live allocations: first page -> page count.
    allocs: BTreeMap<u64, u64>,
}

impl Arena {
    /// Lays the arena the VMM reserved (`guest.arena()`) out next to the
    /// kernel image, with 4 KiB pages. Reads the kernel's page tables;
    /// writes nothing.
    pub fn new<G: Guest + ?Sized>(guest: &G, facts: &ImageFacts) -> Result<Self, ArenaError> {
        Self::with_granularity(guest, facts, Granularity::Pages4K)
    }

    /// [`Arena::new`] with a choice of page size.
    pub fn with_granularity<G: Guest + ?Sized>(
        guest: &G,
        facts: &ImageFacts,
        granularity: Granularity,
    ) -> Result<Self, ArenaError> {
        // The layout below works in plain numbers; the types come back on
        // the regions and writes it hands out.
        let (GuestPhys(gpa), size) = guest.arena();
        if size == 0 {
            return Err(ArenaError::NoArena);
        }
        let bad = |why| ArenaError::BadArena { gpa, size, why };
        if gpa % PAGE != 0 || size % PAGE != 0 {
            return Err(bad("not 4 KiB aligned"));
        }
        if gpa.checked_add(size).is_none_or(|end| end > ADDR_MASK) {
            return Err(bad("beyond the physical address space"));
        }
        if granularity == Granularity::Large2M && (gpa % PMD_SIZE != 0 || size % PMD_SIZE != 0) {
            // A 2 MiB leaf over a partial slot would map memory past the arena.
            return Err(bad("2 MiB mappings need a 2 MiB aligned arena"));
        }
        let total = size / PAGE;
        let apart = match granularity {
            Granularity::Pages4K => guest.arena_tables().map(|(t, len)| (t.0, len)),
            Granularity::Large2M => None,
        };
        // Each PTE page maps 512 pages: t table pages serve (total - t) data
        // pages when 512 * t >= total - t.
        let table_pages = match (granularity, apart) {
            (Granularity::Pages4K, None) => total.div_ceil(ENTRIES + 1),
            _ => 0,
        };
        let mappable = total - table_pages;
        if mappable == 0 {
            return Err(bad("too small: no page left after its page table"));
        }
        let slots = mappable.div_ceil(ENTRIES);
        if let Some((t, len)) = apart {
            if t % PAGE != 0 || len % PAGE != 0 {
                return Err(bad("its page-table region is not 4 KiB aligned"));
            }
            if t.checked_add(len).is_none_or(|end| end > ADDR_MASK) {
                return Err(bad(
                    "its page-table region is beyond the physical address space",
                ));
            }
            if t < gpa + size && gpa < t + len {
                return Err(bad("its page-table region overlaps it"));
            }
            if len / PAGE < slots {
                return Err(bad("its page-table region has less than a page per 2 MiB"));
            }
        }
        let ours = |to: u64| {
            to.wrapping_sub(gpa) < size || apart.is_some_and(|(t, len)| to.wrapping_sub(t) < len)
        };

        let window = tables::inspect(guest, facts)?;
        if ours(window.pmd_page) {
            return Err(ArenaError::PmdPageInArena {
                pmd_page: window.pmd_page,
            });
        }
        // Any window entry (table pointer or 2 MiB leaf) into the arena or
        // its tables means an earlier layout is live.
        let mapped: Vec<u64> = (0..ENTRIES)
            .zip(&window.slots)
            .filter(|&(_, &e)| e & PRESENT != 0 && ours(e & ADDR_MASK))
            .map(|(i, _)| i)
            .collect();
        if !mapped.is_empty() {
            return Err(ArenaError::AlreadyMapped { slots: mapped });
        }
        let first_slot = choose_slots(&window.slots, slots, facts)?;
        let base_va = WINDOW_START + first_slot * PMD_SIZE;
        let va_end = base_va + mappable * PAGE;
        // Within the 1 GiB window this always holds; checked, not assumed.
        if va_end.saturating_sub(facts.text) >= REACH || facts.end.saturating_sub(base_va) >= REACH
        {
            return Err(ArenaError::OutOfReach {
                va: base_va,
                va_end,
                text: facts.text,
                end: facts.end,
            });
        }
        Ok(Self {
            gpa,
            size,
            table_pages,
            tables: apart,
            base_va,
            first_slot,
            slots,
            pmd_page: window.pmd_page,
            attrs: window.attrs,
            granularity,
            slot_perm: vec![None; slots as usize],
            pages: vec![Page::Unused; mappable as usize],
            allocs: BTreeMap::new(),
        })
    }

    /// Guest-physical (start, size) of the whole arena.
    pub fn gpa_range(&self) -> (u64, u64) {
        (self.gpa, self.size)
    }

    /// Virtual [start, end) of the mappable part.
    pub fn va_range(&self) -> (u64, u64) {
        (self.base_va, self.base_va + self.pages.len() as u64 * PAGE)
    }

    /// Pages at the start of the arena that hold its PTE pages (0 when
    /// they live apart, see [`Arena::tables`]).
    pub fn table_pages(&self) -> u64 {
        self.table_pages
    }

    /// The reserved region the PTE pages live in, when apart from the
    /// arena: (guest-physical start, size).
    pub fn tables(&self) -> Option<(u64, u64)> {
        self.tables
    }

    /// The PMD slots the arena owns: (first slot index, count).
    pub fn pmd_slots(&self) -> (u64, u64) {
        (self.first_slot, self.slots)
    }

    /// Guest-physical address of the kernel's PMD page for the window.
    pub fn pmd_page(&self) -> u64 {
        self.pmd_page
    }

    /// The leaf attributes copied from the kernel's text mapping, used in every
    /// arena entry.
    pub fn attrs(&self) -> Attrs {
        self.attrs
    }

    /// Whether the arena maps 4 KiB pages or 2 MiB leaves.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Whether page `i` may be handed out for `perm`.
    fn fits(&self, i: usize, perm: Perm) -> bool {
        let page_ok = self.pages.get(i).is_some_and(|p| p.fits(perm));
        let slot_ok = match self.granularity {
            Granularity::Pages4K => true,
            Granularity::Large2M => self
                .slot_perm
                .get(i / ENTRIES as usize)
                .is_some_and(|s| s.is_none_or(|p| p == perm)),
        };
        page_ok && slot_ok
    }

    /// Bytes free for `perm` (never-used pages and retired `perm` pages).
    pub fn free_bytes(&self, perm: Perm) -> u64 {
        (0..self.pages.len())
            .filter(|&i| self.fits(i, perm))
            .count() as u64
            * PAGE
    }

    /// Live allocations.
    pub fn regions(&self) -> Vec<Region> {
        self.allocs
            .iter()
            .filter_map(|(&first, &count)| {
                let perm = match self.pages.get(first as usize) {
                    Some(Page::Used(p)) => *p,
                    _ => return None,
                };
                Some(self.region(first, count, perm))
            })
            .collect()
    }

    /// What writes touching the arena may touch: the arena, its PMD
    /// slots, and its PTE pages when they live apart.
    pub fn allowed(&self) -> Vec<Allowed> {
        let mut v = vec![
            Allowed {
                gpa: GuestPhys(self.gpa),
                len: self.size,
                kind: AllowKind::Arena,
            },
            Allowed {
                gpa: GuestPhys(self.slot_gpa(0)),
                len: self.slots * 8,
                kind: AllowKind::PmdSlots,
            },
        ];
        if let Some((t, _)) = self.tables {
            v.push(Allowed {
                gpa: GuestPhys(t),
                len: self.slots * PAGE,
                kind: AllowKind::ArenaTables,
            });
        }
        v
    }

    fn region(&self, first: u64, count: u64, perm: Perm) -> Region {
        Region {
            va: KernelVirt(self.base_va + first * PAGE),
            gpa: GuestPhys(self.page_gpa(first)),
            len: count * PAGE,
            perm,
        }
    }

    fn page_gpa(&self, page: u64) -> u64 {
        self.gpa + (self.table_pages + page) * PAGE
    }

    /// Guest-physical address of the PTE page for arena slot `j`.
    fn table_gpa(&self, j: u64) -> u64 {
        match self.tables {
            Some((t, _)) => t + j * PAGE,
            None => self.gpa + j * PAGE,
        }
    }

    /// Guest-physical address of the kernel PMD entry for arena slot `j`.
    fn slot_gpa(&self, j: u64) -> u64 {
        self.pmd_page + (self.first_slot + j) * 8
    }

    /// The PTE for mappable page `page` with `perm`.
    pub fn pte(&self, page: u64, perm: Perm) -> u64 {
        let e = self.page_gpa(page) | self.attrs.cache;
        self.leaf_bits(e, perm)
    }

    /// The 2 MiB leaf PMD entry for arena slot `j` with `perm` (PAT moves
    /// from bit 7 to bit 12 in a large leaf).
    pub fn large_leaf(&self, j: u64, perm: Perm) -> u64 {
        let mut e = self.page_gpa(j * ENTRIES) | PS | (self.attrs.cache & !PTE_PAT);
        if self.attrs.cache & PTE_PAT != 0 {
            e |= LARGE_PAT;
        }
        self.leaf_bits(e, perm)
    }

    fn leaf_bits(&self, mut e: u64, perm: Perm) -> u64 {
        e |= PRESENT | ACCESSED;
        if self.attrs.global {
            e |= GLOBAL;
        }
        if perm == Perm::Data {
            e |= RW | DIRTY;
        }
        if perm != Perm::Text && self.attrs.nx {
            e |= NX;
        }
        e
    }

    /// Allocates `size` bytes (rounded up to pages) with `perm`: first fit
    /// over never-used pages and freed pages of the same permission.
    pub fn alloc(&mut self, size: u64, perm: Perm) -> Result<Region, ArenaError> {
        if size == 0 {
            return Err(ArenaError::ZeroSize);
        }
        let need = size.div_ceil(PAGE);
        let (mut run_start, mut run) = (0u64, 0u64);
        let (mut largest, mut total) = (0u64, 0u64);
        let mut found = None;
        for i in 0..self.pages.len() {
            if self.fits(i, perm) {
                if run == 0 {
                    run_start = i as u64;
                }
                run += 1;
                total += 1;
                largest = largest.max(run);
                if run == need && found.is_none() {
                    found = Some(run_start);
                }
            } else {
                run = 0;
            }
        }
        let Some(first) = found else {
            return Err(ArenaError::Full {
                requested: size,
                perm,
                largest_free: largest * PAGE,
                free_total: total * PAGE,
                arena_bytes: self.size,
            });
        };
        for p in self
            .pages
            .iter_mut()
            .skip(first as usize)
            .take(need as usize)
        {
            *p = Page::Used(perm);
        }
        if self.granularity == Granularity::Large2M {
            for j in first / ENTRIES..=(first + need - 1) / ENTRIES {
                if let Some(s) = self.slot_perm.get_mut(j as usize) {
                    *s = Some(perm);
                }
            }
        }
        self.allocs.insert(first, need);
        Ok(self.region(first, need, perm))
    }

    /// The live allocation `r` is, as (first page, count).
    fn lookup(&self, r: &Region) -> Result<(u64, u64), ArenaError> {
        let unknown = || ArenaError::UnknownRegion {
            va: r.va.0,
            len: r.len,
            perm: r.perm,
        };
        let off = r.va.0.checked_sub(self.base_va).ok_or_else(unknown)?;
        let first = off / PAGE;
        match self.allocs.get(&first) {
            Some(&count)
                if off % PAGE == 0
                    && count * PAGE == r.len
                    && self.pages.get(first as usize) == Some(&Page::Used(r.perm))
                    && self.page_gpa(first) == r.gpa.0 =>
            {
                Ok((first, count))
            }
            _ => Err(unknown()),
        }
    }

    /// Frees a live allocation. Its pages stay mapped with their
    /// permission and are reused only for that permission.
    pub fn free(&mut self, r: &Region) -> Result<(), ArenaError> {
        let (first, count) = self.lookup(r)?;
        for p in self
            .pages
            .iter_mut()
            .skip(first as usize)
            .take(count as usize)
        {
            *p = Page::Retired(r.perm);
        }
        self.allocs.remove(&first);
        Ok(())
    }

    /// The writes that map `regions` (live allocations), computed against
    /// the guest's current page tables: slots not yet in use get their PTE
    /// page (whole) and then their PMD entry; pages of slots in use get
    /// their PTEs; pages already mapped as wanted need nothing. Anything
    /// that is neither empty nor ours is an error, never overwritten.
    pub fn map_writes<G: Guest + ?Sized>(
        &self,
        guest: &G,
        regions: &[Region],
    ) -> Result<Vec<Write>, ArenaError> {
        // Slot -> (index in the PTE page -> PTE).
        let mut by_slot: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
        for r in regions {
            let (first, count) = self.lookup(r)?;
            for page in first..first + count {
                by_slot
                    .entry(page / ENTRIES)
                    .or_default()
                    .insert(page % ENTRIES, self.pte(page, r.perm));
            }
        }
        if self.granularity == Granularity::Large2M {
            return self.map_large(guest, by_slot.keys().copied());
        }
        let mut writes = Vec::new();
        for (j, want) in by_slot {
            let slot_va = self.base_va + j * PMD_SIZE;
            let slot_gpa = self.slot_gpa(j);
            let table = self.table_gpa(j);
            let ours = table | KERNPG_TABLE;
            let current = read_u64(guest, slot_gpa)?;
            let page = read_page(guest, table)?;
            if current == 0 {
                let mut fresh = vec![0u8; PAGE as usize];
                for (&idx, &pte) in &want {
                    let at = idx as usize * 8;
                    if let Some(dst) = fresh.get_mut(at..at + 8) {
                        dst.copy_from_slice(&pte.to_le_bytes());
                    }
                }
                writes.push(Write::new(
                    GuestPhys(table),
                    fresh,
                    page,
                    format!("arena PTE page {j} (maps {slot_va:#x})"),
                ));
                writes.push(Write::new(
                    GuestPhys(slot_gpa),
                    ours.to_le_bytes().to_vec(),
                    current.to_le_bytes().to_vec(),
                    format!("PMD slot {} ({slot_va:#x})", self.first_slot + j),
                ));
                continue;
            }
            if current != ours {
                return Err(ArenaError::SlotTaken {
                    slot: self.first_slot + j,
                    va: slot_va,
                    found: current,
                    expected: ours,
                });
            }
            let now = entries(&page);
            // Runs of consecutive empty entries to fill, one write each.
            let mut run: Option<(u64, Vec<u8>)> = None;
            let flush = |run: &mut Option<(u64, Vec<u8>)>, writes: &mut Vec<Write>| {
                if let Some((start, bytes)) = run.take() {
                    let len = bytes.len();
                    writes.push(Write::new(
                        GuestPhys(table + start * 8),
                        bytes,
                        vec![0u8; len],
                        format!(
                            "arena PTEs for {:#x}..{:#x}",
                            slot_va + start * PAGE,
                            slot_va + (start + len as u64 / 8) * PAGE
                        ),
                    ));
                }
            };
            for (&idx, &pte) in &want {
                let found = now.get(idx as usize).copied().unwrap_or(0);
                if found == pte {
                    flush(&mut run, &mut writes);
                    continue;
                }
                if found != 0 {
                    return Err(ArenaError::PteConflict {
                        va: slot_va + idx * PAGE,
                        found,
                        wanted: pte,
                    });
                }
                match &mut run {
                    Some((start, bytes)) if *start + bytes.len() as u64 / 8 == idx => {
                        bytes.extend_from_slice(&pte.to_le_bytes());
                    }
                    _ => {
                        flush(&mut run, &mut writes);
                        run = Some((idx, pte.to_le_bytes().to_vec()));
                    }
                }
            }
            flush(&mut run, &mut writes);
        }
        Ok(writes)
    }

    /// [`Arena::map_writes`] for 2 MiB leaves: one PMD entry per slot.
    fn map_large<G: Guest + ?Sized>(
        &self,
        guest: &G,
        slots: impl Iterator<Item = u64>,
    ) -> Result<Vec<Write>, ArenaError> {
        let mut writes = Vec::new();
        for j in slots {
            let slot_va = self.base_va + j * PMD_SIZE;
            let Some(perm) = self.slot_perm.get(j as usize).copied().flatten() else {
                continue;
            };
            let want = self.large_leaf(j, perm);
            let current = read_u64(guest, self.slot_gpa(j))?;
            if current == want {
                continue;
            }
            if current != 0 {
                return Err(ArenaError::SlotTaken {
                    slot: self.first_slot + j,
                    va: slot_va,
                    found: current,
                    expected: want,
                });
            }
            writes.push(Write::new(
                GuestPhys(self.slot_gpa(j)),
                want.to_le_bytes().to_vec(),
                current.to_le_bytes().to_vec(),
                format!(
                    "PMD slot {} ({slot_va:#x}, 2 MiB {perm})",
                    self.first_slot + j
                ),
            ));
        }
        Ok(writes)
    }
}

/// Slots at or above this index are not the kernel image's. Without
/// CONFIG_RANDOMIZE_BASE, KERNEL_IMAGE_SIZE is 512 MiB and the module area
/// (MODULES_VADDR) starts at 0xffffffffa0000000, inside this PMD page,
/// where module loading fills slots later. A kernel at its default address
/// may be such a build: stay below 512 MiB then. A kernel elsewhere was
/// moved by KASLR, so the image window is the whole 1 GiB.
fn slot_limit(facts: &ImageFacts) -> u64 {
    if facts.text == DEFAULT_TEXT {
        NO_KASLR_SLOTS
    } else {
        ENTRIES
    }
}

/// First slot of `needed` consecutive empty slots: the lowest run above
/// `roundup(_end, 2 MiB)`, else the highest run below `_text`. "Empty"
/// means zero, what `cleanup_highmap()` writes; a non-present entry with
/// bits set is someone's and is left alone.
fn choose_slots(slots: &[u64], needed: u64, facts: &ImageFacts) -> Result<u64, ArenaError> {
    let empty = |s: u64| slots.get(s as usize) == Some(&0);
    let run_ok = |start: u64| (start..start + needed).all(empty);
    let end_up = facts.end.div_ceil(PMD_SIZE).saturating_mul(PMD_SIZE);
    let limit = slot_limit(facts);
    let above = if end_up >= WINDOW_END {
        ENTRIES
    } else {
        slot_of(end_up)
    };
    if let Some(s) = (above..=limit.saturating_sub(needed)).find(|&s| run_ok(s)) {
        return Ok(s);
    }
    let text_slot = slot_of(facts.text);
    if let Some(top) = text_slot.checked_sub(needed) {
        if let Some(s) = (0..=top).rev().find(|&s| run_ok(s)) {
            return Ok(s);
        }
    }
    let mut largest = 0u64;
    let mut run = 0u64;
    for s in 0..ENTRIES {
        run = if empty(s) { run + 1 } else { 0 };
        largest = largest.max(run);
    }
    Err(ArenaError::NoRoom {
        needed,
        largest,
        text: facts.text,
        end: facts.end,
    })
}

#[cfg(test)]
mod tests;

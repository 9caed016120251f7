//! Virtual -> guest-physical translation through the guest's own x86-64 page
//! tables, the way the MMU does it: 4-level or 5-level (CR4.LA57), with
//! 1 GiB and 2 MiB pages. Everything the engine learns about the kernel is
//! read through kernel virtual addresses, so this is the one place that
//! turns them into guest-physical reads.
//!
//! Page-table entries come from guest memory and are untrusted: every entry
//! is masked to the architectural address bits before use, and walks are
//! bounded by the paging depth.

use crate::GuestPhys;
use std::fmt;

use crate::{Guest, VcpuRegs};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
/// PS at the PDPT and PD levels: the entry maps a 1 GiB or 2 MiB page.
const LARGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
/// Physical address bits 12..51 of an entry (and of CR3).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// The CR3 bit that distinguishes a page-table-isolation user PGD from its
/// kernel PGD: Linux allocates the pair as one 8 KiB block, kernel half first.
pub const PTI_USER_PGD_BIT: u64 = 1 << 12;

/// Errors of the page-table walk.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The address's upper bits are not a sign extension for this depth.
    #[error("virtual address {va:#x} is not canonical for {levels}-level paging")]
    NonCanonical {
        /// The virtual address.
        va: u64,
        /// 4 or 5.
        levels: u8,
    },
    /// An entry on the walk has its present bit clear.
    #[error(
        "virtual address {va:#x} is not mapped: the {level} entry {index} at guest-physical \
         {entry_gpa:#x} is not present (value {entry:#x})"
    )]
    NotPresent {
        /// The virtual address.
        va: u64,
        /// The level whose entry is not present.
        level: Level,
        /// The entry's index in its table.
        index: u64,
        /// Guest-physical address of the entry.
        entry_gpa: u64,
        /// The entry's value.
        entry: u64,
    },
    /// The walk ended without a leaf (not expected from a well-formed walk).
    #[error("virtual address {va:#x} is not mapped")]
    Unmapped {
        /// The virtual address.
        va: u64,
    },
    /// A page-table entry or the data itself could not be read from guest
    /// memory (outside RAM, for one).
    #[error("cannot read the {what} at guest-physical {gpa:#x}: {source}")]
    Phys {
        /// `page-table entry` or `guest memory`.
        what: &'static str,
        /// The guest-physical address read.
        gpa: u64,
        /// The [`Guest`]'s error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The read's end overflows the 64-bit address space.
    #[error("a read of {len} bytes at {va:#x} runs past the end of the address space")]
    Wraps {
        /// Virtual start of the read.
        va: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// A read longer than its caller's limit (the length came from guest data).
    #[error(
        "refusing to read {len} bytes at {va:#x}: more than the {limit}-byte limit for {what}"
    )]
    TooLarge {
        /// Virtual start of the read.
        va: u64,
        /// The length asked for.
        len: u64,
        /// The caller's limit.
        limit: u64,
        /// What was to be read.
        what: &'static str,
    },
}

/// A level of the page-table hierarchy, named as in the Intel SDM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The top level with LA57 (bits 48..56).
    Pml5,
    /// The top level with 4-level paging (bits 39..47).
    Pml4,
    /// Bits 30..38; a leaf here maps 1 GiB.
    Pdpt,
    /// Bits 21..29; a leaf here maps 2 MiB.
    Pd,
    /// Bits 12..20: 4 KiB pages.
    Pt,
}

impl Level {
    /// Bit position of the lowest virtual-address bit this level indexes.
    fn shift(self) -> u32 {
        match self {
            Level::Pml5 => 48,
            Level::Pml4 => 39,
            Level::Pdpt => 30,
            Level::Pd => 21,
            Level::Pt => 12,
        }
    }

    /// Bytes of virtual address space one entry of this level covers.
    pub fn coverage(self) -> u64 {
        1u64 << self.shift()
    }

    /// Whether PS (bit 7) means "large page" at this level.
    fn may_be_large(self) -> bool {
        matches!(self, Level::Pdpt | Level::Pd)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pml5 => "PML5",
            Level::Pml4 => "PML4",
            Level::Pdpt => "PDPT",
            Level::Pd => "PD",
            Level::Pt => "PT",
        })
    }
}

const FOUR_LEVELS: [Level; 4] = [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt];
const FIVE_LEVELS: [Level; 5] = [Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt];

/// Where a virtual address lives and with which rights (the AND of all
/// levels, as the MMU computes them for a supervisor access).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Where `va` is in guest memory.
    pub phys: GuestPhys,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// Every level allows writes.
    pub writable: bool,
    /// No level sets NX.
    pub executable: bool,
    /// Every level allows user-mode access.
    pub user: bool,
}

/// One address space: a page-table root and its depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTables {
    root: u64,
    five_level: bool,
}

impl PageTables {
    /// The tables a vCPU is using (CR3 without PCID/flag bits, CR4.LA57).
    pub fn from_regs(regs: &VcpuRegs) -> Self {
        Self::new(regs.cr3, regs.cr4 & CR4_LA57 != 0)
    }

    /// Tables rooted at guest-physical `root` (low 12 bits and bits above
    /// the physical-address width are ignored, as in CR3).
    pub fn new(root: u64, five_level: bool) -> Self {
        Self {
            root: root & ADDR_MASK,
            five_level,
        }
    }

    /// Guest-physical address of the top-level table.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Whether the walk has five levels (CR4.LA57).
    pub fn five_level(&self) -> bool {
        self.five_level
    }

    fn levels(&self) -> &'static [Level] {
        if self.five_level {
            &FIVE_LEVELS
        } else {
            &FOUR_LEVELS
        }
    }

    fn check_canonical(&self, va: u64) -> Result<(), PagingError> {
        let bits = if self.five_level { 57 } else { 48 };
        // Bits bits-1..63 must all equal bit bits-1.
        let top = (va as i64) >> (bits - 1);
        if top == 0 || top == -1 {
            Ok(())
        } else {
            Err(PagingError::NonCanonical {
                va,
                levels: if self.five_level { 5 } else { 4 },
            })
        }
    }

    /// Translates `va` for a supervisor access.
    pub fn translate<G: Guest + ?Sized>(
        &self,
        guest: &G,
        va: u64,
    ) -> Result<Translation, PagingError> {
        self.check_canonical(va)?;
        let mut table = self.root;
        let mut writable = true;
        let mut user = true;
        let mut executable = true;
        for &level in self.levels() {
            let index = (va >> level.shift()) & 0x1ff;
            // `table` is 4 KiB aligned and index * 8 < 4096: OR cannot overflow.
            let entry_gpa = table | (index * 8);
            let mut raw = [0u8; 8];
            guest
                .read_phys(GuestPhys(entry_gpa), &mut raw)
                .map_err(|e| PagingError::Phys {
                    what: "page-table entry",
                    gpa: entry_gpa,
                    source: Box::new(e),
                })?;
            let entry = u64::from_le_bytes(raw);
            if entry & PRESENT == 0 {
                return Err(PagingError::NotPresent {
                    va,
                    level,
                    index,
                    entry_gpa,
                    entry,
                });
            }
            writable &= entry & WRITABLE != 0;
            user &= entry & USER != 0;
            executable &= entry & NO_EXECUTE == 0;
            let page_size = match level {
                Level::Pt => Some(level.coverage()),
                l if l.may_be_large() && entry & LARGE != 0 => Some(l.coverage()),
                _ => None,
            };
            if let Some(page_size) = page_size {
                let offset_mask = page_size - 1;
                return Ok(Translation {
                    phys: GuestPhys((entry & ADDR_MASK & !offset_mask) | (va & offset_mask)),
                    page_size,
                    writable,
                    executable,
                    user,
                });
            }
            table = entry & ADDR_MASK;
        }
        // Unreachable in practice: the PT level always returns above.
        Err(PagingError::Unmapped { va })
    }

    /// Reads `buf.len()` bytes of virtual memory at `va`, page by page, so a
    /// range may cross pages of any size.
    pub fn read<G: Guest + ?Sized>(
        &self,
        guest: &G,
        va: u64,
        buf: &mut [u8],
    ) -> Result<(), PagingError> {
        read_pieces(guest, va, buf, |cur| {
            let t = self.translate(guest, cur)?;
            Ok((t.phys, t.page_size - (cur & (t.page_size - 1))))
        })
    }

    /// The mapped parts of `[start, end)`, merged into runs of contiguous
    /// virtual addresses with the same rights. Unmapped stretches are
    /// skipped a whole table entry at a time, so sparse windows are cheap.
    pub fn mapped_runs<G: Guest + ?Sized>(
        &self,
        guest: &G,
        start: u64,
        end: u64,
    ) -> Result<Vec<MappedRun>, PagingError> {
        let mut runs: Vec<MappedRun> = Vec::new();
        let mut va = start;
        while va < end {
            let step = match self.translate(guest, va) {
                Ok(t) => {
                    let step = t.page_size - (va & (t.page_size - 1));
                    let run_end = va.saturating_add(step).min(end);
                    match runs.last_mut() {
                        Some(last)
                            if last.end == va
                                && last.writable == t.writable
                                && last.executable == t.executable =>
                        {
                            last.end = run_end;
                        }
                        _ => runs.push(MappedRun {
                            start: va,
                            end: run_end,
                            writable: t.writable,
                            executable: t.executable,
                        }),
                    }
                    step
                }
                Err(PagingError::NotPresent { level, .. }) => {
                    level.coverage() - (va & (level.coverage() - 1))
                }
                Err(e) => return Err(e),
            };
            match va.checked_add(step) {
                Some(next) => va = next,
                None => break,
            }
        }
        Ok(runs)
    }
}

/// A stretch of mapped virtual memory with uniform rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRun {
    /// First virtual address.
    pub start: u64,
    /// End virtual address (exclusive).
    pub end: u64,
    /// The run is writable.
    pub writable: bool,
    /// The run is executable.
    pub executable: bool,
}

impl MappedRun {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the run has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads of kernel virtual memory. The decoders above the page tables
/// (kallsyms, BTF, tasks) use only this, so unit tests can hand them a
/// synthetic memory instead of a guest.
pub trait VirtRead {
    /// Fills `buf` from kernel-virtual address `va`.
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError>;

    /// A little-endian u64 at `va`.
    fn read_u64(&self, va: u64) -> Result<u64, PagingError> {
        let mut b = [0u8; 8];
        self.read_virt(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A little-endian u32 at `va`.
    fn read_u32(&self, va: u64) -> Result<u32, PagingError> {
        let mut b = [0u8; 4];
        self.read_virt(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads `len` bytes into a new buffer; `limit` bounds the allocation
    /// because lengths often come from guest data.
    fn read_vec(
        &self,
        va: u64,
        len: u64,
        limit: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, PagingError> {
        if len > limit {
            return Err(PagingError::TooLarge {
                va,
                len,
                limit,
                what,
            });
        }
        let len = usize::try_from(len).map_err(|_| PagingError::TooLarge {
            va,
            len,
            limit,
            what,
        })?;
        let mut v = vec![0u8; len];
        self.read_virt(va, &mut v)?;
        Ok(v)
    }
}

/// A guest seen through one set of page tables.
pub struct AddressSpace<'g, G: Guest + ?Sized> {
    guest: &'g G,
    tables: PageTables,
}

impl<'g, G: Guest + ?Sized> AddressSpace<'g, G> {
    /// `guest`'s memory as `tables` map it.
    pub fn new(guest: &'g G, tables: PageTables) -> Self {
        Self { guest, tables }
    }

    /// The guest read through the tables.
    pub fn guest(&self) -> &'g G {
        self.guest
    }

    /// The page tables this space walks.
    pub fn tables(&self) -> PageTables {
        self.tables
    }

    /// Where `va` is in guest-physical memory, and its rights.
    pub fn translate(&self, va: u64) -> Result<Translation, PagingError> {
        self.tables.translate(self.guest, va)
    }

    /// The mapped parts of `[start, end)`, as [`PageTables::mapped_runs`].
    pub fn mapped_runs(&self, start: u64, end: u64) -> Result<Vec<MappedRun>, PagingError> {
        self.tables.mapped_runs(self.guest, start, end)
    }
}

impl<G: Guest + ?Sized> VirtRead for AddressSpace<'_, G> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        self.tables.read(self.guest, va, buf)
    }
}

/// Kernel virtual memory of a paused guest, each 4 KiB page walked once.
///
/// The safe-point check reads thousands of small pieces (task fields, list
/// pointers, stack words) inside the pause; walking four or five levels of
/// page tables for each was most of its cost. While every vCPU is stopped
/// the guest cannot change its page tables, so a translation taken once
/// stays right until the guest runs again: hold one of these for one
/// pause and drop it before resuming. Only successful walks are kept (a
/// failed one is walked again and fails the same way), and the cache is
/// bounded at [`PageCache::MAX_PAGES`] entries, emptied when full, so a
/// guest that makes the walk touch many pages costs the VMM at most a few
/// MiB.
pub struct PageCache<'g, G: Guest + ?Sized> {
    space: AddressSpace<'g, G>,
    pages: std::cell::RefCell<std::collections::HashMap<u64, u64>>,
}

impl<'g, G: Guest + ?Sized> PageCache<'g, G> {
    /// At most this many pages are remembered (24 bytes or so each).
    pub const MAX_PAGES: usize = 1 << 17;

    /// An empty cache over `space`.
    pub fn new(space: AddressSpace<'g, G>) -> Self {
        Self {
            space,
            pages: std::cell::RefCell::new(std::collections::HashMap::new()),
        }
    }

    /// The uncached space underneath.
    pub fn space(&self) -> &AddressSpace<'g, G> {
        &self.space
    }

    /// Pages remembered now.
    pub fn len(&self) -> usize {
        self.pages.borrow().len()
    }

    /// Whether no page is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Guest-physical start of the 4 KiB page holding `page` (4 KiB
    /// aligned). A large page is contiguous, so its 4 KiB parts translate
    /// by the same rule.
    fn page_gpa(&self, page: u64) -> Result<u64, PagingError> {
        if let Some(&gpa) = self.pages.borrow().get(&page) {
            return Ok(gpa);
        }
        let gpa = self.space.translate(page)?.phys.0 & !0xfff;
        let mut pages = self.pages.borrow_mut();
        if pages.len() >= Self::MAX_PAGES {
            pages.clear();
        }
        pages.insert(page, gpa);
        Ok(gpa)
    }
}

impl<G: Guest + ?Sized> VirtRead for PageCache<'_, G> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        read_pieces(self.space.guest, va, buf, |cur| {
            let gpa = self.page_gpa(cur & !0xfff)? | (cur & 0xfff);
            Ok((GuestPhys(gpa), 0x1000 - (cur & 0xfff)))
        })
    }
}

/// Reads `buf` from virtual `va` one mapped piece at a time: `locate`
/// gives each piece's guest-physical start and the bytes left in its page.
fn read_pieces<G: Guest + ?Sized>(
    guest: &G,
    va: u64,
    buf: &mut [u8],
    mut locate: impl FnMut(u64) -> Result<(GuestPhys, u64), PagingError>,
) -> Result<(), PagingError> {
    let len = buf.len();
    let mut done = 0usize;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        let cur = va
            .checked_add(done as u64)
            .ok_or(PagingError::Wraps { va, len })?;
        let (gpa, in_page) = locate(cur)?;
        let chunk = rest
            .len()
            .min(usize::try_from(in_page).unwrap_or(usize::MAX));
        let (head, _) = rest.split_at_mut(chunk);
        guest.read_phys(gpa, head).map_err(|e| PagingError::Phys {
            what: "guest memory",
            gpa: gpa.0,
            source: Box::new(e),
        })?;
        done += chunk;
    }
    Ok(())
}

#[cfg(any(test, feature = "synth"))]
pub mod test_support {
    //! A flat fake guest-physical memory for unit tests.
    use crate::GuestPhys;
    use std::cell::RefCell;

    use crate::{Guest, VcpuRegs};

    /// An access past the fake memory's end, at this guest-physical address.
    #[derive(Debug, thiserror::Error)]
    #[error("guest-physical {0:#x} is outside the fake memory")]
    pub struct OutOfRange(pub u64);

    /// Flat guest-physical memory from address 0, with no arena.
    pub struct FakePhys {
        /// The bytes, guest-physical address = index.
        pub mem: RefCell<Vec<u8>>,
    }

    impl FakePhys {
        /// `size` zeroed bytes.
        pub fn new(size: usize) -> Self {
            Self {
                mem: RefCell::new(vec![0; size]),
            }
        }

        /// Writes a little-endian u64 at `gpa`; panics outside the memory.
        pub fn put_u64(&self, gpa: u64, v: u64) {
            self.write_phys(GuestPhys(gpa), &v.to_le_bytes()).unwrap();
        }
    }

    impl Guest for FakePhys {
        type Error = OutOfRange;

        fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), OutOfRange> {
            let gpa = gpa.0;
            let mem = self.mem.borrow();
            let start = usize::try_from(gpa).map_err(|_| OutOfRange(gpa))?;
            let src = mem.get(start..start + buf.len()).ok_or(OutOfRange(gpa))?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), OutOfRange> {
            let gpa = gpa.0;
            let mut mem = self.mem.borrow_mut();
            let start = usize::try_from(gpa).map_err(|_| OutOfRange(gpa))?;
            mem.get_mut(start..start + data.len())
                .ok_or(OutOfRange(gpa))?
                .copy_from_slice(data);
            Ok(())
        }

        fn arena(&self) -> (crate::GuestPhys, u64) {
            (crate::GuestPhys(0), 0)
        }

        fn vcpu_count(&self) -> usize {
            0
        }

        fn vcpu_regs(&self, _id: usize) -> Result<VcpuRegs, OutOfRange> {
            Err(OutOfRange(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::FakePhys;
    use super::*;

    const P: u64 = PRESENT | WRITABLE;

    fn idx(va: u64, level: Level) -> u64 {
        (va >> level.shift()) & 0x1ff
    }

    /// 4-level tables at 0x1000.. mapping three kernel addresses with a 4 KiB,
    /// a 2 MiB and a 1 GiB page.
    fn four_level() -> (FakePhys, PageTables) {
        let m = FakePhys::new(0x40_0000);
        let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
        let va4k = 0xffff_ffff_8100_0000u64;
        m.put_u64(pml4 + idx(va4k, Level::Pml4) * 8, pdpt | P);
        m.put_u64(pdpt + idx(va4k, Level::Pdpt) * 8, pd | P);
        m.put_u64(pd + idx(va4k, Level::Pd) * 8, pt | P);
        // 4 KiB page at 0x10000, read-only and NX.
        m.put_u64(
            pt + idx(va4k, Level::Pt) * 8,
            0x10000 | PRESENT | NO_EXECUTE,
        );
        // Next 4 KiB page at 0x20000 (not physically contiguous).
        m.put_u64(pt + (idx(va4k, Level::Pt) + 1) * 8, 0x20000 | P);
        // 2 MiB page for the next PD slot, at physical 0x200000.
        m.put_u64(pd + (idx(va4k, Level::Pd) + 1) * 8, 0x20_0000 | P | LARGE);
        // 1 GiB page in the next PDPT slot, at physical 0 (PAT bit 12 set,
        // which must be masked away).
        m.put_u64(
            pdpt + (idx(va4k, Level::Pdpt) + 1) * 8,
            P | LARGE | (1 << 12),
        );
        (m, PageTables::new(pml4, false))
    }

    #[test]
    fn translates_all_page_sizes() {
        let (m, pt) = four_level();
        let t = pt.translate(&m, 0xffff_ffff_8100_0123).unwrap();
        assert_eq!(t.phys, GuestPhys(0x10123));
        assert_eq!(t.page_size, 4096);
        assert!(!t.writable && !t.executable);
        let t = pt.translate(&m, 0xffff_ffff_8120_0042).unwrap();
        assert_eq!((t.phys, t.page_size), (GuestPhys(0x20_0042), 2 << 20));
        assert!(t.writable && t.executable);
        let t = pt.translate(&m, 0xffff_ffff_c012_3456).unwrap();
        assert_eq!((t.phys, t.page_size), (GuestPhys(0x12_3456), 1 << 30));
    }

    #[test]
    fn reads_across_pages() {
        let (m, pt) = four_level();
        m.write_phys(GuestPhys(0x10ffe), &[1, 2]).unwrap();
        m.write_phys(GuestPhys(0x20000), &[3, 4]).unwrap();
        let mut buf = [0u8; 4];
        pt.read(&m, 0xffff_ffff_8100_0ffe, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
    }

    #[test]
    fn the_page_cache_reads_what_the_walk_reads_and_walks_each_page_once() {
        let (m, pt) = four_level();
        m.write_phys(GuestPhys(0x10ffe), &[1, 2]).unwrap();
        m.write_phys(GuestPhys(0x20000), &[3, 4]).unwrap();
        m.write_phys(GuestPhys(0x20_0042), &[9]).unwrap();
        let cache = PageCache::new(AddressSpace::new(&m, pt));
        let mut buf = [0u8; 4];
        cache.read_virt(0xffff_ffff_8100_0ffe, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(cache.len(), 2, "two 4 KiB pages");
        // Inside a 2 MiB page: one more entry, for its 4 KiB part.
        let mut one = [0u8; 1];
        cache.read_virt(0xffff_ffff_8120_0042, &mut one).unwrap();
        assert_eq!(one, [9]);
        assert_eq!(cache.len(), 3);
        // A remembered translation is used without walking: a page-table
        // change made while "paused" (which the guest cannot make) is
        // not seen, which is why the cache lives for one pause only.
        let pte_of_first = 0x4000 + idx(0xffff_ffff_8100_0000, Level::Pt) * 8;
        let before = {
            let mut b = [0u8; 8];
            m.read_phys(GuestPhys(pte_of_first), &mut b).unwrap();
            b
        };
        m.write_phys(GuestPhys(pte_of_first), &[0; 8]).unwrap();
        cache.read_virt(0xffff_ffff_8100_0ffe, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        m.write_phys(GuestPhys(pte_of_first), &before).unwrap();
        // Failures are not remembered and say what the walk says.
        let err = cache
            .read_virt(0xffff_ffff_8100_2000, &mut one)
            .unwrap_err();
        assert!(matches!(err, PagingError::NotPresent { .. }), "{err}");
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn not_present_names_level_and_address() {
        let (m, pt) = four_level();
        let err = pt.translate(&m, 0xffff_ffff_8100_2000).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            PagingError::NotPresent {
                level: Level::Pt,
                ..
            }
        ));
        assert!(
            msg.contains("0xffffffff81002000") && msg.contains("PT"),
            "{msg}"
        );
        let err = pt.translate(&m, 0xffff_8880_0000_0000).unwrap_err();
        assert!(matches!(
            err,
            PagingError::NotPresent {
                level: Level::Pml4,
                ..
            }
        ));
    }

    #[test]
    fn rejects_non_canonical() {
        let (m, pt) = four_level();
        assert!(matches!(
            pt.translate(&m, 0x0000_8000_0000_0000),
            Err(PagingError::NonCanonical { levels: 4, .. })
        ));
        // The same address is canonical with 5 levels (and unmapped here).
        let pt5 = PageTables::new(0x1000, true);
        assert!(matches!(
            pt5.translate(&m, 0x0000_8000_0000_0000),
            Err(PagingError::NotPresent { .. })
        ));
    }

    #[test]
    fn five_level_walk() {
        let m = FakePhys::new(0x10_0000);
        let va = 0xff11_0000_0000_1000u64;
        let (pml5, pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000);
        m.put_u64(pml5 + idx(va, Level::Pml5) * 8, pml4 | P);
        m.put_u64(pml4 + idx(va, Level::Pml4) * 8, pdpt | P);
        m.put_u64(pdpt + idx(va, Level::Pdpt) * 8, pd | P);
        m.put_u64(pd + idx(va, Level::Pd) * 8, pt | P);
        m.put_u64(pt + idx(va, Level::Pt) * 8, 0x9000 | P);
        let t = PageTables::new(pml5, true).translate(&m, va + 5).unwrap();
        assert_eq!(t.phys, GuestPhys(0x9005));
    }

    #[test]
    fn hostile_entries_do_not_panic() {
        // Every entry points at a huge physical address, or at itself.
        let m = FakePhys::new(0x2000);
        for i in 0..512u64 {
            m.put_u64(0x1000 + i * 8, u64::MAX);
        }
        let pt = PageTables::new(0x1000, false);
        assert!(matches!(
            pt.translate(&m, 0xffff_ffff_8100_0000),
            Err(PagingError::Phys { .. })
        ));
        // Self-referencing tables: the walk ends after four levels.
        for i in 0..512u64 {
            m.put_u64(0x1000 + i * 8, 0x1000 | P);
        }
        let t = pt.translate(&m, 0xffff_ffff_8100_0000).unwrap();
        assert_eq!(t.phys, GuestPhys(0x1000));
        let mut buf = [0u8; 16];
        assert!(pt.read(&m, u64::MAX - 3, &mut buf).is_err());
    }

    #[test]
    fn mapped_runs_merge_and_skip() {
        let (m, pt) = four_level();
        let runs = pt
            .mapped_runs(&m, 0xffff_ffff_8000_0000, 0xffff_ffff_c000_0000)
            .unwrap();
        assert_eq!(
            runs,
            vec![
                MappedRun {
                    start: 0xffff_ffff_8100_0000,
                    end: 0xffff_ffff_8100_1000,
                    writable: false,
                    executable: false
                },
                MappedRun {
                    start: 0xffff_ffff_8100_1000,
                    end: 0xffff_ffff_8100_2000,
                    writable: true,
                    executable: true
                },
                MappedRun {
                    start: 0xffff_ffff_8120_0000,
                    end: 0xffff_ffff_8140_0000,
                    writable: true,
                    executable: true
                },
            ]
        );
    }
}

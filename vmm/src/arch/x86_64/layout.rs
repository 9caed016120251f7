//! Guest-physical memory map.
//!
//! Low memory holds the boot structures at the addresses the Linux x86 boot
//! protocol and common VMMs use; the kernel is loaded at 1 MiB. RAM is split
//! around the 32-bit MMIO hole (IOAPIC, LAPIC). The patch arena is its own
//! KVM memory slot outside every RAM range and is reported to the guest as
//! e820 "reserved", so the guest allocator never hands it out.
//!
//! The PTE pages that map the arena live apart from it, near the top of low
//! RAM, in a `setup_data` blob the kernel reserves for good
//! ([`MemoryLayout::arena_tables`]). Why RAM: the kernel follows page
//! tables through its direct map (`__va()`), which covers RAM only.
//! `text_poke()` does exactly that for any address outside the core kernel
//! text (`vmalloc_to_page()`), so kprobes, jump labels and static calls in
//! patch code need PTE pages the kernel can reach. Why `setup_data`: both
//! the decompressor (which avoids it when it places the kernel) and the
//! kernel (which `memblock_reserve`s it) honour it without a command line.

use thiserror::Error;

/// GDT for the 64-bit boot CPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables: PML4, PDPT, four PDs (the first 4 GiB in
/// 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
/// Guest-physical page of the boot PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Guest-physical page of the first boot PD (2 MiB pages); the other
/// [`BOOT_PDS`]` - 1` follow it.
pub const PDE_START: u64 = 0xb000;
/// Boot PDs: the identity map covers this many GiB. Everything the boot
/// protocol hands the kernel must be mapped when it starts: boot_params,
/// the command line and every `setup_data` blob, which the decompressor
/// reads before it builds its own tables. The arena tables' blob sits near
/// the top of low RAM (below the 3 GiB MMIO hole), so one GiB was not
/// enough: a guest with more than about 1 GiB of RAM never printed a line.
pub const BOOT_PDS: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the Extended BIOS Data Area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the legacy BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the ACPI tables' area.
pub const ACPI_END: u64 = 0x100000;
/// The protected-mode kernel is loaded here.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole; RAM resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole: 4 GiB.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// In-kernel IOAPIC and local APIC (KVM defaults).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The in-kernel local APIC's MMIO base (KVM default).
pub const APIC_START: u64 = 0xfee0_0000;

/// The arena is mapped into the kernel image window with 2 MiB pages later.
pub const ARENA_ALIGN: u64 = 2 << 20;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of memory the guest must not use (the BIOS area, the patch arena).
pub const E820_RESERVED: u32 = 2;

/// Why a memory layout cannot be built from the given sizes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Guest RAM in MiB is below [`MIN_MEM_MIB`].
    #[error("guest memory of {0} MiB is too small: at least {MIN_MEM_MIB} MiB are needed")]
    TooSmall(u64),
    /// The arena size in MiB is zero or not a multiple of 2 MiB.
    #[error("patch arena size {0} MiB must be a non-zero multiple of 2 MiB")]
    ArenaSize(u64),
}

/// Smallest guest RAM the VMM boots, in MiB.
pub const MIN_MEM_MIB: u64 = 64;

/// Size of one page; the arena tables are counted in pages.
const PAGE: u64 = 4096;

/// Usable RAM left above the arena tables. 6.1 turns `setup_data` into
/// e820 "reserved-kern" memory but sizes its memory nodes by the last
/// plain RAM page (`max_pfn`): a blob at the very top of RAM fell outside
/// every node and the kernel oopsed in `free_area_init` at boot.
const TABLES_BELOW_END: u64 = 2 << 20;

/// One e820 entry as handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// e820 type: [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Where RAM and the patch arena sit in guest-physical space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Guest RAM ranges (start, size), backed by anonymous memory.
    pub ram: Vec<(u64, u64)>,
    /// The patch arena (start, size): its own slot, never RAM.
    pub arena: (u64, u64),
    /// The `setup_data` blob (start, size) in low RAM, 2 MiB below its
    /// end: one header page, then one PTE page per 2 MiB of arena.
    pub tables: (u64, u64),
}

impl MemoryLayout {
    /// Splits `mem_bytes` of RAM around the MMIO hole and places the arena
    /// right after the highest RAM byte, 2 MiB aligned, never inside the hole.
    pub fn new(mem_bytes: u64, arena_bytes: u64) -> Result<Self, LayoutError> {
        if mem_bytes < MIN_MEM_MIB << 20 {
            return Err(LayoutError::TooSmall(mem_bytes >> 20));
        }
        if arena_bytes == 0 || arena_bytes % ARENA_ALIGN != 0 {
            return Err(LayoutError::ArenaSize(arena_bytes >> 20));
        }
        let mut ram = vec![(0, mem_bytes.min(MMIO_GAP_START))];
        if mem_bytes > MMIO_GAP_START {
            ram.push((MMIO_GAP_END, mem_bytes - MMIO_GAP_START));
        }
        let (last_start, last_size) = ram[ram.len() - 1];
        let mut arena_start = align_up(last_start + last_size, ARENA_ALIGN);
        if arena_start < MMIO_GAP_END && arena_start + arena_bytes > MMIO_GAP_START {
            arena_start = MMIO_GAP_END;
        }
        let tables_bytes = PAGE + arena_bytes / ARENA_ALIGN * PAGE;
        let low_end = ram[0].0 + ram[0].1;
        Ok(Self {
            ram,
            arena: (arena_start, arena_bytes),
            tables: (low_end - TABLES_BELOW_END - tables_bytes, tables_bytes),
        })
    }

    /// Where the arena's PTE pages go: the page-aligned part of the
    /// `setup_data` blob after its header page.
    pub fn arena_tables(&self) -> (u64, u64) {
        (self.tables.0 + PAGE, self.tables.1 - PAGE)
    }

    /// End of the low RAM that boot may fill (the initrd): below the
    /// arena tables.
    pub fn low_free_end(&self) -> u64 {
        self.tables.0
    }

    /// Total RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.iter().map(|r| r.1).sum()
    }

    /// Highest RAM address below the MMIO hole (exclusive).
    pub fn low_ram_end(&self) -> u64 {
        self.ram[0].0 + self.ram[0].1
    }

    /// The e820 map: usable RAM minus the BIOS area, and the arena as reserved.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            },
            E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: HIMEM_START,
                size: self.low_ram_end() - HIMEM_START,
                kind: E820_RAM,
            },
        ];
        if let Some(&(start, size)) = self.ram.get(1) {
            map.push(E820Entry {
                addr: start,
                size,
                kind: E820_RAM,
            });
        }
        map.push(E820Entry {
            addr: self.arena.0,
            size: self.arena.1,
            kind: E820_RESERVED,
        });
        map.sort_by_key(|e| e.addr);
        map
    }
}

/// Rounds `v` up to a multiple of `align`.
pub fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn arena_is_reserved_and_outside_ram() {
        for mem_mib in [64u64, 512, 3071, 3072, 3073, 8192] {
            let l = MemoryLayout::new(mem_mib << 20, 16 << 20).unwrap();
            assert_eq!(l.ram_bytes(), mem_mib << 20);
            for r in &l.ram {
                assert!(!overlaps(*r, l.arena), "{mem_mib}: arena overlaps RAM");
            }
            assert!(!overlaps(
                l.arena,
                (MMIO_GAP_START, MMIO_GAP_END - MMIO_GAP_START)
            ));
            assert_eq!(l.arena.0 % ARENA_ALIGN, 0);
            let e820 = l.e820();
            let arena: Vec<_> = e820.iter().filter(|e| e.addr == l.arena.0).collect();
            assert_eq!(arena.len(), 1);
            assert_eq!(arena[0].kind, E820_RESERVED);
            for e in e820.iter().filter(|e| e.kind == E820_RAM) {
                assert!(!overlaps((e.addr, e.size), l.arena));
            }
        }
    }

    #[test]
    fn arena_tables_sit_in_low_ram_after_a_header_page() {
        for (mem_mib, arena_mib) in [(64u64, 2u64), (512, 16), (8192, 64)] {
            let l = MemoryLayout::new(mem_mib << 20, arena_mib << 20).unwrap();
            let (start, size) = l.tables;
            assert_eq!(start % PAGE, 0);
            assert_eq!(start + size + TABLES_BELOW_END, l.low_ram_end());
            assert_eq!(l.arena_tables(), (start + PAGE, arena_mib / 2 * PAGE));
            assert_eq!(l.low_free_end(), start);
            assert!(!overlaps(l.tables, l.arena));
            // Inside an e820 RAM entry: the kernel maps it in its direct map.
            assert!(l
                .e820()
                .iter()
                .any(|e| e.kind == E820_RAM && e.addr <= start && start + size <= e.addr + e.size));
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(
            MemoryLayout::new(32 << 20, 2 << 20),
            Err(LayoutError::TooSmall(32))
        );
        assert_eq!(
            MemoryLayout::new(512 << 20, 3 << 20),
            Err(LayoutError::ArenaSize(3))
        );
        assert_eq!(
            MemoryLayout::new(512 << 20, 0),
            Err(LayoutError::ArenaSize(0))
        );
    }
}

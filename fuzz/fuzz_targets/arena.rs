//! The arena's reading of the kernel's page tables
//! (`arena::tables::inspect` through `Arena::with_granularity`: the walk
//! to the image window's PMD page, its 512 slots, the `_text` leaf, the
//! NX and caching attributes) over guest-physical memory made of the
//! input, then allocations and the writes that would map them.
//!
//! Header (128 bytes, u64s unless noted): page-table root, flags (u8:
//! bit 0 five-level, 1 2 MiB granularity, 2 `level2_kernel_pgt` known,
//! 3 EFER known, 4 separate PTE-page region), `_text`, its physical
//! address, `_end`, `__start_rodata`, `level2_kernel_pgt`, arena start and
//! size, PTE-page region start and size, EFER, three allocation sizes
//! (u16 pages) and their permissions (u8). The rest is guest-physical
//! memory from address 0.
//!
//! Invariant: every write planned lies inside what the arena says writes
//! may touch (the arena, its PMD slots, its PTE pages), and every region
//! inside the arena.
#![no_main]

use klpvisor_engine::arena::{Arena, Granularity, ImageFacts, Perm};
use klpvisor_fuzz::{Bytes, FuzzGuest};
use klpvisor_guest::{PageTables, VcpuRegs};
use libfuzzer_sys::fuzz_target;

const HEADER: usize = 128;

fuzz_target!(|data: &[u8]| {
    let mut h = Bytes(data);
    let root = h.u64();
    let flags = h.u8();
    let text = h.u64();
    let text_phys = h.u64();
    let end = h.u64();
    let rodata = h.u64();
    let pmd_va = h.u64();
    let arena = (h.u64(), h.u64());
    let tables = (h.u64(), h.u64());
    let efer = h.u64();
    let sizes = [h.u16(), h.u16(), h.u16()];
    let perms = [h.u8(), h.u8(), h.u8()];
    let mem = data.get(HEADER..).unwrap_or_default();
    let guest = FuzzGuest {
        mem,
        regs: vec![VcpuRegs {
            efer: (flags & 8 != 0).then_some(efer),
            ..Default::default()
        }],
        arena,
        arena_tables: (flags & 16 != 0).then_some(tables),
    };
    let facts = ImageFacts {
        tables: PageTables::new(root, flags & 1 != 0),
        text,
        text_phys,
        end,
        rodata,
        pmd_page_va: (flags & 4 != 0).then_some(pmd_va),
    };
    let granularity = if flags & 2 != 0 {
        Granularity::Large2M
    } else {
        Granularity::Pages4K
    };
    let Ok(mut a) = Arena::with_granularity(&guest, &facts, granularity) else {
        return;
    };
    let (gpa, size) = a.gpa_range();
    let (va, va_end) = a.va_range();
    let mut regions = Vec::new();
    for (pages, perm) in sizes.iter().zip(perms) {
        let perm = match perm % 3 {
            0 => Perm::Text,
            1 => Perm::ReadOnly,
            _ => Perm::Data,
        };
        if let Ok(r) = a.alloc(u64::from(*pages) * 4096, perm) {
            assert!(gpa <= r.gpa.0 && r.gpa.0 + r.len <= gpa + size, "{r:?}");
            assert!(va <= r.va.0 && r.va.0 + r.len <= va_end, "{r:?}");
            regions.push(r);
        }
    }
    let allowed = a.allowed();
    if let Ok(writes) = a.map_writes(&guest, &regions) {
        for w in &writes {
            let end = w.gpa + w.bytes.len() as u64;
            assert!(
                allowed
                    .iter()
                    .any(|x| x.gpa <= w.gpa && end <= x.gpa + x.len),
                "{} at {:#x} outside {allowed:?}",
                w.label,
                w.gpa
            );
        }
    }
});

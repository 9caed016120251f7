//! Arena layout, page-table math, permissions and the allocator on a fake
//! 4-level kernel image.

use super::tables::{LARGE_PAT, PS, PWT};
use super::*;
use crate::write::{Plan, WriteError};
use klpvisor_guest::overlay::Overlay;
use klpvisor_guest::paging::test_support::FakePhys;
use klpvisor_guest::GuestPhys;
use klpvisor_guest::PageTables;

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PMD: u64 = 0x3000;
const PT_END: u64 = 0x4000;
const TEXT: u64 = 0xffff_ffff_9a00_0000;
const TEXT_PHYS: u64 = 0x40_0000;
const END: u64 = TEXT + 3 * PMD_SIZE + 0x3_0000;
/// 1026 pages: 2 PTE pages + 1024 mappable pages = 2 slots.
const ARENA: (u64, u64) = (0x100_0000, 1026 * PAGE);
const MEM: usize = 0x180_0000;
/// Kernel text leaf: present, accessed, dirty, 2 MiB (what the dump shows).
const ROX_2M: u64 = 0xe1;

fn kernel() -> FakePhys {
    kernel_at(TEXT)
}

/// The fake image at `text`: three 2 MiB slots (text RX, rodata R, data
/// RW) and a fourth split into 4 KiB pages up to `_end`.
fn kernel_at(text: u64) -> FakePhys {
    let m = FakePhys::new(MEM);
    m.put_u64(PML4 + 511 * 8, PDPT | 0x67);
    m.put_u64(PDPT + 510 * 8, PMD | 0x63);
    let s = slot_of(text);
    m.put_u64(PMD + s * 8, TEXT_PHYS | ROX_2M);
    m.put_u64(PMD + (s + 1) * 8, (TEXT_PHYS + PMD_SIZE) | ROX_2M | NX);
    m.put_u64(PMD + (s + 2) * 8, (TEXT_PHYS + 2 * PMD_SIZE) | 0xe3 | NX);
    // The last image slot is split into 4 KiB pages (like the dump's).
    m.put_u64(PMD + (s + 3) * 8, PT_END | 0x63);
    for i in 0..0x30 {
        m.put_u64(
            PT_END + i * 8,
            (TEXT_PHYS + 3 * PMD_SIZE + i * PAGE) | 0x63 | NX,
        );
    }
    m
}

fn facts() -> ImageFacts {
    facts_at(TEXT)
}

fn facts_at(text: u64) -> ImageFacts {
    ImageFacts {
        tables: PageTables::new(PML4, false),
        text,
        text_phys: TEXT_PHYS,
        end: text + (END - TEXT),
        rodata: text + PMD_SIZE,
        pmd_page_va: None,
    }
}

fn overlay(m: &FakePhys) -> Overlay<'_, FakePhys> {
    Overlay::new(m).with_arena(GuestPhys(ARENA.0), ARENA.1)
}

fn commit<G: Guest + ?Sized>(g: &G, a: &Arena, writes: Vec<Write>) -> Plan {
    let mut p = Plan::new(a.allowed());
    p.extend(writes);
    p.commit(g).unwrap()
}

fn pmd_entries(m: &FakePhys) -> Vec<u64> {
    let mut b = vec![0u8; PAGE as usize];
    m.read_phys(GuestPhys(PMD), &mut b).unwrap();
    entries(&b)
}

#[test]
fn layout_next_to_the_kernel() {
    let m = kernel();
    let g = overlay(&m);
    let a = Arena::new(&g, &facts()).unwrap();
    assert_eq!(a.table_pages(), 2);
    assert_eq!(a.pmd_slots(), (slot_of(TEXT) + 4, 2));
    assert_eq!(a.va_range(), (TEXT + 4 * PMD_SIZE, TEXT + 6 * PMD_SIZE));
    assert_eq!(a.pmd_page(), PMD);
    let at = a.attrs();
    assert!(!at.global && at.nx && at.cache == 0);
    assert_eq!(at.nx_source, NxSource::KernelMappings);
    assert_eq!(a.free_bytes(Perm::Text), 1024 * PAGE);
    assert!(g.write_log().is_empty(), "laying out writes nothing");
}

#[test]
fn ptes_copy_the_kernels_conventions() {
    let m = kernel();
    let a = Arena::new(&overlay(&m), &facts()).unwrap();
    let gpa0 = ARENA.0 + 2 * PAGE;
    assert_eq!(a.pte(0, Perm::Text), gpa0 | PRESENT | ACCESSED);
    assert_eq!(a.pte(0, Perm::ReadOnly), gpa0 | PRESENT | ACCESSED | NX);
    assert_eq!(
        a.pte(1, Perm::Data),
        (gpa0 + PAGE) | PRESENT | RW | ACCESSED | DIRTY | NX
    );
    // A global (no PTI), write-through-PAT kernel text is copied too.
    m.put_u64(
        PMD + slot_of(TEXT) * 8,
        TEXT_PHYS | ROX_2M | GLOBAL | PWT | LARGE_PAT,
    );
    let a = Arena::new(&overlay(&m), &facts()).unwrap();
    assert_eq!(
        a.pte(0, Perm::Text),
        gpa0 | PRESENT | ACCESSED | GLOBAL | PWT | PS
    );
    // No NX in the kernel's rodata: the CPU has NX off, never set bit 63.
    let m = kernel();
    m.put_u64(
        PMD + (slot_of(TEXT) + 1) * 8,
        (TEXT_PHYS + PMD_SIZE) | ROX_2M,
    );
    let a = Arena::new(&overlay(&m), &facts()).unwrap();
    assert!(!a.attrs().nx);
    assert_eq!(a.pte(0, Perm::Data) & NX, 0);
}

#[test]
fn maps_with_permissions_and_leaves_the_kernel_alone() {
    let m = kernel();
    let g = overlay(&m);
    let mut a = Arena::new(&g, &facts()).unwrap();
    let pt = facts().tables;
    let kernel_before: Vec<_> = (0..0x40u64)
        .map(|i| pt.translate(&g, TEXT + i * 0x20_0000 / 16).ok())
        .collect();
    let pmd_before = pmd_entries(&m);

    let text = a.alloc(3 * PAGE - 100, Perm::Text).unwrap();
    let data = a.alloc(1, Perm::Data).unwrap();
    // Crosses from slot 0 into slot 1.
    let ro = a.alloc(600 * PAGE, Perm::ReadOnly).unwrap();
    assert_eq!((text.va, text.len), (KernelVirt(a.va_range().0), 3 * PAGE));
    assert_eq!(text.gpa, GuestPhys(ARENA.0 + 2 * PAGE));
    assert_eq!(data.va, text.va + 3 * PAGE);
    assert_eq!(ro.va, data.va + PAGE);

    let writes = a.map_writes(&g, &[text, data, ro]).unwrap();
    // Two slots installed: PTE page then PMD entry, each.
    assert_eq!(writes.len(), 4);
    assert_eq!(writes[0].gpa, GuestPhys(ARENA.0));
    assert_eq!(writes[0].bytes.len(), 4096);
    assert_eq!(writes[1].gpa, GuestPhys(PMD + (slot_of(TEXT) + 4) * 8));
    assert_eq!(writes[3].gpa, GuestPhys(PMD + (slot_of(TEXT) + 5) * 8));
    commit(&g, &a, writes);

    for (r, writable, executable) in [(text, false, true), (data, true, false), (ro, false, false)]
    {
        for off in (0..r.len).step_by(PAGE as usize) {
            let t = pt.translate(&g, r.va.0 + off + 12).unwrap();
            assert_eq!(t.phys, r.gpa + off + 12, "{r:?}+{off:#x}");
            assert_eq!(t.page_size, PAGE);
            assert_eq!(
                (t.writable, t.executable, t.user),
                (writable, executable, false)
            );
        }
    }
    // Pages after the last allocation are not mapped.
    assert!(pt.translate(&g, ro.va.0 + ro.len).is_err());
    // The kernel's mappings are unchanged; only our slots changed in its PMD page.
    let kernel_after: Vec<_> = (0..0x40u64)
        .map(|i| pt.translate(&g, TEXT + i * 0x20_0000 / 16).ok())
        .collect();
    assert_eq!(kernel_before, kernel_after);
    let mut pmd_after = vec![0u8; PAGE as usize];
    g.read_phys(GuestPhys(PMD), &mut pmd_after).unwrap();
    let pmd_after = entries(&pmd_after);
    for (i, (b, a2)) in pmd_before.iter().zip(&pmd_after).enumerate() {
        let ours = (slot_of(TEXT) + 4..slot_of(TEXT) + 6).contains(&(i as u64));
        assert_eq!(b == a2, !ours, "slot {i}");
    }
    // Every write landed in the arena or the two slots.
    for (gpa, len) in g.write_log() {
        let in_arena = gpa >= ARENA.0 && gpa + len as u64 <= ARENA.0 + ARENA.1;
        let in_slots = gpa >= PMD + (slot_of(TEXT) + 4) * 8
            && gpa + len as u64 <= PMD + (slot_of(TEXT) + 6) * 8;
        assert!(in_arena || in_slots, "{gpa:#x}+{len}");
    }

    // Mapping again is a no-op; a new allocation in an installed slot
    // writes just its PTEs, merged into one run.
    assert!(a.map_writes(&g, &[text, data, ro]).unwrap().is_empty());
    let more = a.alloc(5 * PAGE, Perm::Text).unwrap();
    let w = a.map_writes(&g, &[more]).unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].bytes.len(), 5 * 8);
    assert_eq!(w[0].gpa, GuestPhys(ARENA.0 + PAGE + ((604 - 512) * 8)));
    commit(&g, &a, w);
    assert!(pt.translate(&g, more.va.0 + 4 * PAGE).unwrap().executable);
}

#[test]
fn allocator_reuses_by_permission_and_reports_full() {
    let m = kernel();
    let g = overlay(&m);
    let mut a = Arena::new(&g, &facts()).unwrap();
    let t = a.alloc(2 * PAGE, Perm::Text).unwrap();
    let d = a.alloc(PAGE, Perm::Data).unwrap();
    a.free(&t).unwrap();
    assert!(matches!(a.free(&t), Err(ArenaError::UnknownRegion { .. })));
    // Freed text pages are not handed out as data...
    let d2 = a.alloc(PAGE, Perm::Data).unwrap();
    assert_eq!(d2.va, d.va + PAGE);
    // ...but are reused for text.
    let t2 = a.alloc(PAGE, Perm::Text).unwrap();
    assert_eq!(t2.va, t.va);
    assert_eq!(a.regions().len(), 3);
    // A region that is not an allocation is refused.
    let forged = Region {
        len: 2 * PAGE,
        ..t2
    };
    assert!(matches!(
        a.free(&forged),
        Err(ArenaError::UnknownRegion { .. })
    ));
    assert!(matches!(
        a.map_writes(&g, &[forged]),
        Err(ArenaError::UnknownRegion { .. })
    ));
    assert!(matches!(a.alloc(0, Perm::Text), Err(ArenaError::ZeroSize)));

    let free_data = a.free_bytes(Perm::Data);
    assert_eq!(free_data, (1024 - 4) * PAGE);
    let e = a.alloc(free_data + 1, Perm::Data).unwrap_err();
    match &e {
        ArenaError::Full {
            requested,
            largest_free,
            free_total,
            ..
        } => {
            assert_eq!(*requested, free_data + 1);
            assert_eq!((*largest_free, *free_total), (free_data, free_data));
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("arena full"), "{e}");
    // The text pool also has the retired text page.
    assert_eq!(a.free_bytes(Perm::Text), (1024 - 4 + 1) * PAGE);
    a.alloc(free_data, Perm::Data).unwrap();
    assert!(a.alloc(PAGE, Perm::Data).is_err());
    assert!(a.alloc(PAGE, Perm::Text).is_ok(), "the retired text page");
}

#[test]
fn falls_back_below_text_and_refuses_when_no_room() {
    let m = kernel();
    // Non-present but not empty: someone's. The arena must not take them.
    for s in slot_of(TEXT) + 4..512 {
        m.put_u64(PMD + s * 8, 0x2);
    }
    let a = Arena::new(&overlay(&m), &facts()).unwrap();
    assert_eq!(a.pmd_slots(), (slot_of(TEXT) - 2, 2));
    assert_eq!(a.va_range().0, TEXT - 2 * PMD_SIZE);
    m.put_u64(PMD + (slot_of(TEXT) - 1) * 8, 0x2);
    let a = Arena::new(&overlay(&m), &facts()).unwrap();
    assert_eq!(a.pmd_slots(), (slot_of(TEXT) - 3, 2));
    for s in 0..slot_of(TEXT) {
        if s % 2 == 0 {
            m.put_u64(PMD + s * 8, 0x2);
        }
    }
    let e = Arena::new(&overlay(&m), &facts()).unwrap_err();
    assert!(
        matches!(
            e,
            ArenaError::NoRoom {
                needed: 2,
                largest: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn forged_tables_are_refused() {
    // The window mapped by a 1 GiB page: no PMD page.
    let m = kernel();
    m.put_u64(PDPT + 510 * 8, 0xe3);
    assert!(matches!(
        Arena::new(&overlay(&m), &facts()),
        Err(ArenaError::Walk { level: "PDPT", .. })
    ));
    // A PDPT entry pointing somewhere other than level2_kernel_pgt.
    let m = kernel();
    let mut f = facts();
    f.pmd_page_va = Some(TEXT + 2 * PMD_SIZE); // maps to data, not 0x3000
    let e = Arena::new(&overlay(&m), &f).unwrap_err();
    assert!(
        matches!(e, ArenaError::PmdPageMismatch { found: PMD, .. }),
        "{e}"
    );
    // The "PMD page" inside the arena (forged to make us write our PTE
    // pages over the kernel's table, or the other way round).
    let m = kernel();
    let pmd = pmd_entries(&m);
    for (i, e) in pmd.iter().enumerate() {
        m.put_u64(ARENA.0 + PAGE + i as u64 * 8, *e);
    }
    m.put_u64(PDPT + 510 * 8, (ARENA.0 + PAGE) | 0x63);
    assert!(matches!(
        Arena::new(&overlay(&m), &facts()),
        Err(ArenaError::PmdPageInArena { .. })
    ));
    // _text not where the KASLR probe found it.
    let m = kernel();
    let mut f = facts();
    f.text_phys += PMD_SIZE;
    assert!(matches!(
        Arena::new(&overlay(&m), &f),
        Err(ArenaError::KernelNotMapped { what: "_text", .. })
    ));
    // Hostile entries everywhere: errors, no panic, no write.
    let m = FakePhys::new(0x2000);
    for i in 0..512u64 {
        m.put_u64(0x1000 + i * 8, u64::MAX);
    }
    let g = Overlay::new(&m).with_arena(GuestPhys(0x1000), 0x1000);
    let mut f = facts();
    f.tables = PageTables::new(0x1000, true);
    assert!(Arena::new(&g, &f).is_err());
    assert!(g.write_log().is_empty());
    // No arena, or a silly one.
    let m = kernel();
    assert!(matches!(
        Arena::new(&Overlay::new(&m), &facts()),
        Err(ArenaError::NoArena)
    ));
    assert!(matches!(
        Arena::new(
            &Overlay::new(&m).with_arena(GuestPhys(0x100_0800), 0x10_0000),
            &facts()
        ),
        Err(ArenaError::BadArena { .. })
    ));
    assert!(matches!(
        Arena::new(
            &Overlay::new(&m).with_arena(GuestPhys(0x100_0000), PAGE),
            &facts()
        ),
        Err(ArenaError::BadArena { .. })
    ));
}

#[test]
fn tampering_between_plans_is_detected() {
    let m = kernel();
    let g = overlay(&m);
    let mut a = Arena::new(&g, &facts()).unwrap();
    // Someone takes our slot after layout: never overwritten.
    g.write_phys(
        GuestPhys(PMD + (slot_of(TEXT) + 4) * 8),
        &0x1234_5063u64.to_le_bytes(),
    )
    .unwrap();
    let r = a.alloc(PAGE, Perm::Text).unwrap();
    assert!(matches!(
        a.map_writes(&g, &[r]),
        Err(ArenaError::SlotTaken { .. })
    ));

    let m = kernel();
    let g = overlay(&m);
    let mut a = Arena::new(&g, &facts()).unwrap();
    let r = a.alloc(PAGE, Perm::Text).unwrap();
    let w = a.map_writes(&g, &[r]).unwrap();
    // The slot is filled between planning and commit: the expectation fails.
    g.write_phys(
        GuestPhys(PMD + (slot_of(TEXT) + 4) * 8),
        &0x1234_5063u64.to_le_bytes(),
    )
    .unwrap();
    let mut p = Plan::new(a.allowed());
    p.extend(w);
    assert!(matches!(p.commit(&g), Err(WriteError::Mismatch { .. })));
    g.write_phys(GuestPhys(PMD + (slot_of(TEXT) + 4) * 8), &[0; 8])
        .unwrap();
    commit(&g, &a, a.map_writes(&g, &[r]).unwrap());
    // A PTE we did not write appears next to ours: refused, not overwritten.
    g.write_phys(GuestPhys(ARENA.0 + 8), &0xdead_b063u64.to_le_bytes())
        .unwrap();
    let r2 = a.alloc(PAGE, Perm::Data).unwrap();
    assert!(matches!(
        a.map_writes(&g, &[r2]),
        Err(ArenaError::PteConflict { .. })
    ));
}

#[test]
fn plan_mixing_arena_writes_with_a_kernel_slot_is_refused() {
    let m = kernel();
    let g = overlay(&m);
    let mut a = Arena::new(&g, &facts()).unwrap();
    let r = a.alloc(PAGE, Perm::Text).unwrap();
    let mut p = Plan::new(a.allowed());
    p.extend(a.map_writes(&g, &[r]).unwrap());
    // The slot just below ours is the kernel's (_end's 4 KiB table).
    p.push(
        Write::read_expect(
            &g,
            GuestPhys(PMD + (slot_of(TEXT) + 3) * 8),
            vec![0; 8],
            "forged",
        )
        .unwrap(),
    );
    let e = p.commit(&g).unwrap_err();
    assert!(matches!(e, WriteError::Outside { .. }), "{e}");
    assert!(g.write_log().is_empty());
}

#[test]
fn five_level_walk() {
    let m = kernel();
    // PML5 at 0x5000 whose last entry leads to the 4-level PML4.
    m.put_u64(0x5000 + 511 * 8, PML4 | 0x67);
    let mut f = facts();
    f.tables = PageTables::new(0x5000, true);
    let a = Arena::new(&overlay(&m), &f).unwrap();
    assert_eq!(a.pmd_page(), PMD);
}

#[test]
fn kernel_without_kaslr_keeps_out_of_the_module_area() {
    // At the default address the build may lack CONFIG_RANDOMIZE_BASE:
    // modules then start at 0xffffffffa0000000 (slot 256) in this PMD page.
    let text = klpvisor_guest::kaslr::DEFAULT_TEXT;
    let m = kernel_at(text);
    let a = Arena::new(&overlay(&m), &facts_at(text)).unwrap();
    assert_eq!(a.pmd_slots(), (slot_of(text) + 4, 2));
    // Slots up to 255 taken: the free ones at 256.. are not the image's.
    for s in slot_of(text) + 4..256 {
        m.put_u64(PMD + s * 8, 0x2);
    }
    let a = Arena::new(&overlay(&m), &facts_at(text)).unwrap();
    assert_eq!(a.pmd_slots(), (slot_of(text) - 2, 2), "below _text instead");
    // A KASLR-moved kernel may use the whole 1 GiB window.
    let m = kernel();
    for s in slot_of(TEXT) + 4..256 {
        m.put_u64(PMD + s * 8, 0x2);
    }
    let a = Arena::new(&overlay(&m), &facts()).unwrap();
    assert_eq!(a.pmd_slots(), (256, 2));
}

#[test]
fn large_pages_one_permission_per_slot() {
    let m = kernel();
    let arena = (0x100_0000, 3 * PMD_SIZE);
    let g = Overlay::new(&m).with_arena(GuestPhys(arena.0), arena.1);
    let mut a = Arena::with_granularity(&g, &facts(), Granularity::Large2M).unwrap();
    assert_eq!(a.granularity(), Granularity::Large2M);
    assert_eq!(a.table_pages(), 0);
    assert_eq!(a.pmd_slots(), (slot_of(TEXT) + 4, 3));
    let text = a.alloc(PAGE, Perm::Text).unwrap();
    let data = a.alloc(PAGE, Perm::Data).unwrap();
    let text2 = a.alloc(2 * PAGE, Perm::Text).unwrap();
    assert_eq!(text.gpa, GuestPhys(arena.0), "no PTE pages");
    assert_eq!(
        data.va,
        KernelVirt(a.va_range().0 + PMD_SIZE),
        "data gets its own slot"
    );
    assert_eq!(text2.va, text.va + PAGE, "text shares the text slot");
    let w = a.map_writes(&g, &[text, data, text2]).unwrap();
    assert_eq!(w.len(), 2, "one PMD leaf per slot");
    commit(&g, &a, w);
    let pt = facts().tables;
    for (r, writable, executable) in [
        (text, false, true),
        (data, true, false),
        (text2, false, true),
    ] {
        let t = pt.translate(&g, r.va.0 + 5).unwrap();
        assert_eq!((t.phys, t.page_size), (r.gpa + 5, PMD_SIZE));
        assert_eq!((t.writable, t.executable), (writable, executable));
    }
    assert_eq!(
        a.large_leaf(1, Perm::Data),
        (arena.0 + PMD_SIZE) | PRESENT | RW | ACCESSED | DIRTY | PS | NX
    );
    // The third slot is the only one left for read-only data.
    assert_eq!(a.free_bytes(Perm::ReadOnly), PMD_SIZE);
    assert!(a.alloc(PMD_SIZE + 1, Perm::ReadOnly).is_err());
    // Freed text pages stay text; the slot never changes rights.
    a.free(&text).unwrap();
    assert_eq!(a.alloc(PAGE, Perm::Text).unwrap().va, text.va);
    // Unaligned arenas cannot be mapped with 2 MiB leaves.
    let g = Overlay::new(&m).with_arena(GuestPhys(0x100_0000 + PAGE), 2 * PMD_SIZE);
    assert!(matches!(
        Arena::with_granularity(&g, &facts(), Granularity::Large2M),
        Err(ArenaError::BadArena { .. })
    ));
}

#[test]
fn laying_out_a_mapped_arena_again_is_refused() {
    for granularity in [Granularity::Pages4K, Granularity::Large2M] {
        let m = kernel();
        let arena = (0x100_0000, 2 * PMD_SIZE);
        let g = Overlay::new(&m).with_arena(GuestPhys(arena.0), arena.1);
        let mut a = Arena::with_granularity(&g, &facts(), granularity).unwrap();
        let r = a.alloc(PAGE, Perm::Text).unwrap();
        commit(&g, &a, a.map_writes(&g, &[r]).unwrap());
        // A second layout would take the next slots but the same PTE pages.
        let e = Arena::with_granularity(&g, &facts(), granularity).unwrap_err();
        assert!(
            matches!(&e, ArenaError::AlreadyMapped { slots } if slots == &[a.pmd_slots().0]),
            "{e}"
        );
    }
}

/// PTE pages in a reserved region apart from the arena (what the VMM
/// gives: RAM the kernel's direct map covers): the whole arena is
/// mappable, slot `j`'s PMD entry points at the region's page `j`, and the
/// region is on the allow-list.
#[test]
fn tables_apart_from_the_arena() {
    const TABLES: (u64, u64) = (0x150_0000, 3 * PAGE);
    let m = kernel();
    let g = overlay(&m).with_arena_tables(GuestPhys(TABLES.0), TABLES.1);
    let mut a = Arena::new(&g, &facts()).unwrap();
    assert_eq!(a.table_pages(), 0);
    assert_eq!(a.tables(), Some(TABLES));
    // 1026 mappable pages need 3 slots, one PTE page each.
    assert_eq!(a.pmd_slots().1, 3);
    let r = a.alloc(2 * PAGE, Perm::Text).unwrap();
    assert_eq!(
        r.gpa,
        GuestPhys(ARENA.0),
        "the arena's first page is patch memory now"
    );
    let writes = a.map_writes(&g, &[r]).unwrap();
    commit(&g, &a, writes);
    let (first, _) = a.pmd_slots();
    let mut e = [0u8; 8];
    g.read_phys(GuestPhys(PMD + first * 8), &mut e).unwrap();
    assert_eq!(u64::from_le_bytes(e), TABLES.0 | KERNPG_TABLE);
    let mut pte = [0u8; 8];
    g.read_phys(GuestPhys(TABLES.0), &mut pte).unwrap();
    assert_eq!(u64::from_le_bytes(pte) & ADDR_MASK, ARENA.0);
    assert!(a.allowed().iter().any(|w| w.kind == AllowKind::ArenaTables
        && w.gpa == GuestPhys(TABLES.0)
        && w.len == 3 * PAGE));
    // Laying it out again over the live mapping is refused.
    let e = Arena::new(&g, &facts()).unwrap_err();
    assert!(matches!(e, ArenaError::AlreadyMapped { .. }), "{e}");
}

#[test]
fn a_tables_region_that_cannot_serve_is_refused() {
    let m = kernel();
    for (t, why) in [
        ((0x150_0000, 2 * PAGE), "less than a page per 2 MiB"),
        ((ARENA.0 + PAGE, 3 * PAGE), "overlaps"),
        ((0x150_0010, 3 * PAGE), "aligned"),
    ] {
        let g = overlay(&m).with_arena_tables(GuestPhys(t.0), t.1);
        let e = Arena::new(&g, &facts()).unwrap_err().to_string();
        assert!(e.contains(why), "{t:x?}: {e}");
    }
}

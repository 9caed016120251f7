//! The x86-64 page-table walker over guest-physical memory made of the
//! input: a 24-byte header picks the root (CR3), 4 or 5 levels, a virtual
//! address, a read length and a window to list mapped runs of; the rest
//! is guest-physical memory from address 0.
#![no_main]

use klpvisor_fuzz::{Bytes, PhysGuest};
use klpvisor_guest::Guest;
use klpvisor_guest::{AddressSpace, PageTables, VirtRead};
use libfuzzer_sys::fuzz_target;

/// Longest read per input (a page and a bit: crosses a page boundary).
const MAX_READ: u16 = 5000;
/// Widest window listed, in 4 KiB pages (256 MiB): the engine lists up to
/// 1 GiB once per kernel open; the walk is linear in the window.
const MAX_WINDOW_PAGES: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mut h = Bytes(data);
    let root = h.u64();
    let flags = h.u8();
    let va = h.u64();
    let len = h.u16() % (MAX_READ + 1);
    let window = u64::from(h.u16()) % (MAX_WINDOW_PAGES + 1) * 4096;
    let _ = h.take(3);
    let guest = PhysGuest(h.0);
    let tables = PageTables::new(root, flags & 1 != 0);
    let space = AddressSpace::new(&guest, tables);

    if let Ok(t) = space.translate(va) {
        assert!([4096, 2 << 20, 1 << 30].contains(&t.page_size));
        assert_eq!(t.phys.0 & (t.page_size - 1), va & (t.page_size - 1));
        // A successful read starts with the byte the translation names.
        let mut first = [0u8; 1];
        if space.read_virt(va, &mut first).is_ok() {
            let mut phys = [0u8; 1];
            assert!(guest.read_phys(t.phys, &mut phys).is_ok());
            assert_eq!(first, phys);
        }
    }
    let _ = space.read_vec(va, u64::from(len), u64::from(MAX_READ), "fuzz read");

    let start = va & !0xfff;
    let end = start.saturating_add(window);
    if let Ok(runs) = space.mapped_runs(start, end) {
        // Sorted, disjoint, non-empty, inside the window.
        for r in &runs {
            assert!(start <= r.start && r.start < r.end && r.end <= end);
        }
        for w in runs.windows(2) {
            assert!(w[0].end <= w[1].start);
        }
    }
});

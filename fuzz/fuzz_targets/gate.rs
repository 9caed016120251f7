//! The call gate's struct layouts (`callback::gate::Layout::from_btf`)
//! from arbitrary BTF: the guest's BTF says where the gate writes its
//! `irq_work` and `work_struct`.
//!
//! Invariants: whatever layout is accepted, every field the gate reads or
//! writes lies inside its own struct's slot of the data page (the
//! `irq_work` before the `work_struct`, the `work_struct` before the
//! mailbox), and the first data page is built without a panic.
#![no_main]

use klpvisor_engine::callback::gate::{Layout, DATA_PAGE_MAILBOX_AT, DATA_PAGE_WORK_AT};
use klpvisor_guest::Btf;
use libfuzzer_sys::fuzz_target;

const TEXT: u64 = 0xffff_ffff_c000_0000;
const DATA: u64 = 0xffff_ffff_c000_1000;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    let Ok(layout) = Layout::from_btf(&btf) else {
        return;
    };
    for (what, at, len) in layout.accesses() {
        let slot = if what.starts_with("irq_work.") {
            0..DATA_PAGE_WORK_AT
        } else {
            DATA_PAGE_WORK_AT..DATA_PAGE_MAILBOX_AT
        };
        assert!(
            slot.start <= at && at + len <= slot.end,
            "{what}: {len} bytes at {at:#x}, outside {slot:?}"
        );
    }
    assert_eq!(layout.data_page(DATA, TEXT).len(), 4096);
});

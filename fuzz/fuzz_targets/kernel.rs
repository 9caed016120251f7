//! `Kernel::open` end to end over a fuzzed guest: guest-physical memory
//! made of the input and one or two vCPUs whose registers come from its
//! header. Open walks the vCPUs' page tables to the kernel image, probes
//! KASLR, searches the image for kallsyms and decodes it (the tables may
//! be as large as a real kernel's, forged names included: the seeds carry
//! tables at the decoder's expansion limits), confirms the location,
//! finds `init_top_pgt`, reads BTF and verifies the view.
//!
//! Header (128 bytes): vCPU count (u8: 1 + bit 0), then per vCPU: CR0,
//! CR3, CR4, EFER, LSTAR, IDTR base (u64s), CS selector, IDTR limit
//! (u16s), flags (u8: bit 0 EFER known, 1 LSTAR known, 2 CS.L). The rest
//! is guest-physical memory from address 0.
//!
//! Invariants: an opened kernel verifies again, its `_text` is where KASLR
//! allows, and its decoded symbols stay within the decoder's bound.
#![no_main]

use klpvisor_fuzz::{Bytes, FuzzGuest};
use klpvisor_guest::kallsyms::{Symbol, KERNEL_IMAGE_END, MAX_DECODED_BYTES};
use klpvisor_guest::kaslr::DEFAULT_TEXT;
use klpvisor_guest::{Kernel, VcpuRegs};
use libfuzzer_sys::fuzz_target;

pub const HEADER: usize = 128;

fn vcpu(h: &mut Bytes<'_>) -> VcpuRegs {
    let (cr0, cr3, cr4, efer, lstar, idtr_base) =
        (h.u64(), h.u64(), h.u64(), h.u64(), h.u64(), h.u64());
    let (cs_selector, idtr_limit, flags) = (h.u16(), h.u16(), h.u8());
    VcpuRegs {
        cr0,
        cr3,
        cr4,
        efer: (flags & 1 != 0).then_some(efer),
        lstar: (flags & 2 != 0).then_some(lstar),
        cs_long: flags & 4 != 0,
        cs_selector,
        idtr_base,
        idtr_limit,
        ..Default::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut h = Bytes(data);
    let count = 1 + usize::from(h.u8() & 1);
    let regs: Vec<VcpuRegs> = (0..2).map(|_| vcpu(&mut h)).take(count).collect();
    let guest = FuzzGuest {
        mem: data.get(HEADER..).unwrap_or_default(),
        regs,
        arena: (0, 0),
        arena_tables: None,
    };
    let Ok(k) = Kernel::open(&guest) else {
        return;
    };
    if let Err(e) = k.verify(&guest) {
        panic!("an opened kernel does not verify: {e}");
    }
    assert!((DEFAULT_TEXT..KERNEL_IMAGE_END).contains(&k.kaslr.text));
    let decoded = k.kallsyms.len() * std::mem::size_of::<Symbol>()
        + k.kallsyms
            .symbols()
            .iter()
            .map(|s| s.name.len())
            .sum::<usize>();
    assert!(decoded <= MAX_DECODED_BYTES, "{decoded} bytes decoded");
    assert!(k.uts(&guest, "release").is_some());
    let _ = k.modules_brief(&guest);
});

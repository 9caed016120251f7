//! Boot CPU register state for the 64-bit Linux boot protocol: long mode with
//! an identity map of the first GiB, flat segments, `rsi` pointing at the
//! zero page and `rip` at the kernel's 64-bit entry.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{segment_from_gdt, BOOT_GDT};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PDS, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Why the boot CPU's state could not be set.
#[derive(Debug, Error)]
pub enum RegsError {
    /// The boot page tables or GDT did not fit in guest memory.
    #[error("cannot write boot page tables or GDT into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// A KVM ioctl reading or setting the boot CPU's state failed.
    #[error("KVM rejected the boot CPU's {what} state: {source}")]
    Kvm {
        /// Which state (sregs, general registers or FPU).
        what: &'static str,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// Writes the GDT, an empty IDT and the identity page tables into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    // PML4[0] -> PDPT, PDPT[g] -> PD g, each PD maps 1 GiB with 2 MiB pages.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    for g in 0..BOOT_PDS {
        let pd = PDE_START + g * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + g * 8))?;
        for i in 0..512u64 {
            let phys = (g << 30) | (i << 21);
            mem.write_obj(phys | 0x83, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// Puts the boot CPU in long mode at `entry`.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("sregs"))?;
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("sregs"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("general registers"))?;
    Ok(())
}

/// Default x87/SSE control words, as after FNINIT and a reset MXCSR.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The boot page tables map the first 4 GiB one to one, so the
    /// arena tables' `setup_data` blob near the top of low RAM is mapped
    /// for any RAM size.
    #[test]
    fn page_tables_identity_map_the_first_four_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let read = |gpa: u64| -> u64 { mem.read_obj(GuestAddress(gpa)).unwrap() };
        let translate = |va: u64| -> u64 {
            let pdpt = read(PML4_START + ((va >> 39) & 511) * 8);
            assert_eq!(pdpt & 1, 1, "{va:#x}: PML4 entry present");
            let pd = read((pdpt & !0xfff) + ((va >> 30) & 511) * 8);
            assert_eq!(pd & 1, 1, "{va:#x}: PDPT entry present");
            let pde = read((pd & !0xfff) + ((va >> 21) & 511) * 8);
            assert_eq!(pde & 0x81, 0x81, "{va:#x}: a present 2 MiB page");
            (pde & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff)
        };
        for va in [
            0u64,
            0x10_0000,
            0x3fff_ffff,
            0x4000_0000,
            0x5fc0_1234,
            0xbfff_fff8,
            0xffff_fff8,
        ] {
            assert_eq!(translate(va), va);
        }
        let (tables, _) = crate::arch::x86_64::layout::MemoryLayout::new(3 << 30, 16 << 20)
            .unwrap()
            .tables;
        assert_eq!(translate(tables), tables);
        // The PDs fit between the PDPT and the command line.
        const { assert!(PDE_START + BOOT_PDS * 0x1000 <= crate::arch::x86_64::layout::CMDLINE_START) };
    }
}

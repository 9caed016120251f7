//! The patch engine's view of this VM: [`patcher::Guest`] over guest memory,
//! the arena from the memory layout and the parked vCPUs' registers.
//!
//! The engine never sees a KVM type; everything it needs from a vCPU is
//! copied into [`VcpuRegs`] here.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use patcher::{Guest, VcpuRegs};

use crate::vcpu::VcpuState;
use crate::vm::{Vm, VmError};

#[derive(Debug, Error)]
pub enum GuestAccessError {
    #[error("guest-physical range {gpa:#x}+{len:#x} is not entirely in guest memory")]
    OutOfRange { gpa: u64, len: usize },
    #[error("no vCPU {0}: this VM has {1}")]
    NoSuchVcpu(usize, usize),
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl Guest for Vm {
    type Error = GuestAccessError;

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
        // read_slice fails unless every byte lies in some memory region, so a
        // read never spills into a hole or past the end.
        self.memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestAccessError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), GuestAccessError> {
        self.memory()
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| GuestAccessError::OutOfRange {
                gpa,
                len: data.len(),
            })
    }

    fn arena(&self) -> (u64, u64) {
        self.layout().arena
    }

    fn vcpu_count(&self) -> usize {
        Vm::vcpu_count(self)
    }

    fn vcpu_regs(&self, id: usize) -> Result<VcpuRegs, GuestAccessError> {
        let count = Vm::vcpu_count(self);
        let id8 = u8::try_from(id)
            .ok()
            .filter(|_| id < count)
            .ok_or(GuestAccessError::NoSuchVcpu(id, count))?;
        Ok(vcpu_regs(&self.vcpu_state(id8)?))
    }
}

/// Copies a KVM register snapshot into the engine's terms.
pub fn vcpu_regs(s: &VcpuState) -> VcpuRegs {
    let r = &s.regs;
    let sr = &s.sregs;
    VcpuRegs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        rsp: r.rsp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
        cr0: sr.cr0,
        cr3: sr.cr3,
        cr4: sr.cr4,
        efer: Some(sr.efer),
        lstar: Some(s.lstar),
        gs_base: s.gs_base,
        kernel_gs_base: Some(s.kernel_gs_base),
        cs_selector: sr.cs.selector,
        cs_long: sr.cs.l != 0,
        idtr_base: sr.idt.base,
        idtr_limit: sr.idt.limit,
    }
}

/// A guest whose vCPU registers were read once, during a short pause, while
/// memory stays live: `Kernel::open` decodes static kernel tables (kallsyms,
/// BTF) for ~100 ms without holding the guest stopped.
pub struct RegsSnapshot<'a> {
    pub vm: &'a Vm,
    pub regs: Vec<VcpuRegs>,
}

impl Guest for RegsSnapshot<'_> {
    type Error = GuestAccessError;

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError> {
        self.vm.read_phys(gpa, buf)
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), GuestAccessError> {
        self.vm.write_phys(gpa, data)
    }

    fn arena(&self) -> (u64, u64) {
        self.vm.layout().arena
    }

    fn vcpu_count(&self) -> usize {
        self.regs.len()
    }

    fn vcpu_regs(&self, id: usize) -> Result<VcpuRegs, GuestAccessError> {
        self.regs
            .get(id)
            .copied()
            .ok_or(GuestAccessError::NoSuchVcpu(id, self.regs.len()))
    }
}

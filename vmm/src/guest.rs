//! The patch engine's view of this VM: [`klpvisor_guest::Guest`] over guest memory,
//! the arena from the memory layout and the parked vCPUs' registers.
//!
//! The engine never sees a KVM type; everything it needs from a vCPU is
//! copied into [`VcpuRegs`] here.

use klpvisor_guest::GuestPhys;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use klpvisor_guest::paging::{PageTables, PTI_USER_PGD_BIT};
use klpvisor_guest::{Guest, VcpuRegs};

use crate::vcpu::VcpuState;
use crate::vm::{Vm, VmError};

/// Why the engine's access to this VM failed.
#[derive(Debug, Error)]
pub enum GuestAccessError {
    /// A guest-physical read or write touched a hole or the end of memory.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not entirely in guest memory")]
    OutOfRange {
        /// Guest-physical start of the access.
        gpa: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// The vCPU index asked for (first) is not below the VM's vCPU count (second).
    #[error("no vCPU {0}: this VM has {1}")]
    NoSuchVcpu(usize, usize),
    /// The VM could not hand over the vCPU's registers (not paused, not
    /// running, or KVM failed).
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl Guest for Vm {
    type Error = GuestAccessError;

    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), GuestAccessError> {
        let gpa = gpa.0;
        // read_slice fails unless every byte lies in some memory region, so a
        // read never spills into a hole or past the end.
        self.memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestAccessError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), GuestAccessError> {
        let gpa = gpa.0;
        self.memory()
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| GuestAccessError::OutOfRange {
                gpa,
                len: data.len(),
            })
    }

    fn arena(&self) -> (GuestPhys, u64) {
        let (gpa, size) = self.layout().arena;
        (GuestPhys(gpa), size)
    }

    fn arena_tables(&self) -> Option<(GuestPhys, u64)> {
        let (gpa, size) = self.layout().arena_tables();
        Some((GuestPhys(gpa), size))
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
///
/// The CR3 a vCPU had loaded usually belongs to a process, whose top-level
/// table is freed (and zeroed or reused) when it exits — possibly while the
/// decode runs. So the top-level pages are copied inside the pause
/// ([`RootPages::capture`]) and reads of them are served from the copies:
/// their kernel half points at lower tables every address space shares and
/// the kernel never frees, so the copy stays a valid kernel view.
pub struct RegsSnapshot<'a> {
    /// The VM whose memory is read live.
    pub vm: &'a Vm,
    /// Every vCPU's registers, by vCPU index, as read in the pause.
    pub regs: Vec<VcpuRegs>,
    /// The vCPUs' page-table root pages, copied in the same pause.
    pub roots: RootPages,
}

/// Copies of page-table root pages, taken while the vCPUs were parked.
#[derive(Debug, Default)]
pub struct RootPages(Vec<(u64, Box<[u8; PAGE]>)>);

const PAGE: usize = 4096;

impl RootPages {
    /// Copies the root page of every vCPU's CR3 and of its page-table
    /// isolation twin (the 8 KiB-aligned pair). Call with the vCPUs parked.
    pub fn capture(vm: &Vm, regs: &[VcpuRegs]) -> Self {
        let mut pages: Vec<(u64, Box<[u8; PAGE]>)> = Vec::new();
        for r in regs {
            let pair = PageTables::from_regs(r).root() & !(PTI_USER_PGD_BIT | (PAGE as u64 - 1));
            for gpa in [pair, pair | PTI_USER_PGD_BIT] {
                if pages.iter().any(|(g, _)| *g == gpa) {
                    continue;
                }
                let mut page = Box::new([0u8; PAGE]);
                // A root outside guest RAM stays uncopied; the walk through
                // it then fails with the read error, as it would live.
                if vm.read_phys(GuestPhys(gpa), &mut page[..]).is_ok() {
                    pages.push((gpa, page));
                }
            }
        }
        Self(pages)
    }

    /// Fills `buf` from a copy if it lies inside one copied page.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let base = gpa & !(PAGE as u64 - 1);
        let off = (gpa - base) as usize;
        let Some((_, page)) = self.0.iter().find(|(g, _)| *g == base) else {
            return false;
        };
        match page.get(off..off.saturating_add(buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

impl Guest for RegsSnapshot<'_> {
    type Error = GuestAccessError;

    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), GuestAccessError> {
        let gpa = gpa.0;
        if self.roots.read(gpa, buf) {
            return Ok(());
        }
        self.vm.read_phys(GuestPhys(gpa), buf)
    }

    fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), GuestAccessError> {
        let gpa = gpa.0;
        self.vm.write_phys(GuestPhys(gpa), data)
    }

    fn arena(&self) -> (GuestPhys, u64) {
        let (gpa, size) = self.vm.layout().arena;
        (GuestPhys(gpa), size)
    }

    fn arena_tables(&self) -> Option<(GuestPhys, u64)> {
        let (gpa, size) = self.vm.layout().arena_tables();
        Some((GuestPhys(gpa), size))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_copies_serve_reads_inside_one_page_only() {
        let mut page = Box::new([0u8; PAGE]);
        page[0xff8..].copy_from_slice(&0x1234u64.to_le_bytes());
        let roots = RootPages(vec![(0x2908000, page)]);
        let mut entry = [0u8; 8];
        assert!(roots.read(0x2908ff8, &mut entry));
        assert_eq!(u64::from_le_bytes(entry), 0x1234);
        // Crossing into the next page, or another page: read live instead.
        assert!(!roots.read(0x2908ffc, &mut entry));
        assert!(!roots.read(0x2909000, &mut entry));
        assert!(!roots.read(0x2907ff8, &mut entry));
    }
}

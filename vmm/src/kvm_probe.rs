//! Does this host's /dev/kvm run guest code at hardware speed?
//!
//! Some hosts expose a /dev/kvm that emulates supervisor code instruction by
//! instruction (a pagetable-based `kvm_pvm` host with no SVM/VMX took
//! ~1.5 s per million `dec; jnz` iterations in real mode, ~1.8 s at CPL0,
//! and sat in the Debian kernel's decompressor for minutes). The probe runs a one-million-iteration `dec; jnz` loop in a
//! real-mode vCPU and times it; hardware virtualization finishes in a few
//! milliseconds. The end-to-end tests use this to choose between running
//! `vmm` directly and running it inside the nested QEMU image.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Loop iterations the probe runs.
pub const ITERATIONS: u32 = 1_000_000;
/// Above this the host is too slow to boot Linux in reasonable time.
pub const NATIVE_THRESHOLD: Duration = Duration::from_millis(200);

const CODE_ADDR: u64 = 0x1000;
const MEM_SIZE: usize = 0x10000;

/// Why the probe could not run.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// A KVM ioctl (named) failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The probe's guest memory could not be mapped.
    #[error("cannot map probe memory: {0}")]
    Mmap(String),
    /// The loop did not end in HLT (exit named).
    #[error("probe vCPU stopped with {0} instead of HLT")]
    UnexpectedExit(String),
}

/// Result of one probe run.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Wall-clock time of the `KVM_RUN` that ran the loop.
    pub elapsed: Duration,
}

impl Probe {
    /// Whether the loop ran in under [`NATIVE_THRESHOLD`]: hardware virtualization.
    pub fn is_native(&self) -> bool {
        self.elapsed < NATIVE_THRESHOLD
    }
}

/// `mov ecx, ITERATIONS; l: dec ecx; jnz l; hlt` in 16-bit code.
fn code() -> Vec<u8> {
    let mut c = vec![0x66, 0xb9];
    c.extend_from_slice(&ITERATIONS.to_le_bytes());
    c.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc, 0xf4]);
    c
}

/// Runs the probe once.
pub fn run() -> Result<Probe, ProbeError> {
    // Declared first so it is unmapped only after the VM is gone.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .map_err(|e| ProbeError::Mmap(e.to_string()))?;
    mem.write_slice(&code(), GuestAddress(CODE_ADDR))
        .map_err(|e| ProbeError::Mmap(e.to_string()))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| ProbeError::Mmap(e.to_string()))?;
    let kvm = Kvm::new().map_err(ProbeError::Open)?;
    let vm = kvm
        .create_vm()
        .map_err(|e| ProbeError::Kvm("VM creation", e))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` is declared before `vm`, so it outlives the VM and vCPU.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| ProbeError::Kvm("memory slot", e))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| ProbeError::Kvm("vCPU creation", e))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| ProbeError::Kvm("sregs", e))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| ProbeError::Kvm("sregs", e))?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| ProbeError::Kvm("regs", e))?;
    let start = Instant::now();
    let exit = vcpu.run().map_err(|e| ProbeError::Kvm("KVM_RUN", e))?;
    let elapsed = start.elapsed();
    match exit {
        VcpuExit::Hlt => Ok(Probe { elapsed }),
        other => Err(ProbeError::UnexpectedExit(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loop_encoding() {
        let c = super::code();
        assert_eq!(c.len(), 11);
        assert_eq!(&c[..2], &[0x66, 0xb9]);
        assert_eq!(*c.last().unwrap(), 0xf4);
    }
}

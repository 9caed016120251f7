//! klpvisor's live-patch engine. It will parse a livepatch module, resolve it
//! against the guest's own kallsyms and BTF, link it into the reserved arena
//! and switch the guest to it while every vCPU is paused.
//!
//! The engine never talks to KVM. It sees the guest only through [`Guest`],
//! which the VMM implements (and a memory dump can implement for offline
//! tests), so data flows one way: patch bytes -> parse -> resolve -> link ->
//! plan -> (pause) check, commit (resume).

/// The engine's whole view of a guest.
pub trait Guest {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads guest-physical memory; fails if any byte is outside guest memory.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes guest-physical memory; fails if any byte is outside guest memory.
    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// The reserved patch arena: (guest-physical start, size).
    fn arena(&self) -> (u64, u64);
    /// Number of vCPUs.
    fn vcpu_count(&self) -> usize;
}

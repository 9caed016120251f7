//! klpvisor's VMM: boots an unmodified Linux guest on KVM and gives the patch
//! engine what it needs from outside the guest: guest memory, a way to stop
//! every vCPU at once, and the registers of each stopped vCPU.

pub mod api;
pub mod arch;
pub mod boot_patch;
pub mod control;
pub mod devices;
pub mod guest;
pub mod heap;
pub mod kvm_probe;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use vm::{PauseReport, ResumeReport, Vm, VmConfig, VmError, VmExit};

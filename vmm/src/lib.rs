//! klpvisor's VMM: boots an unmodified Linux guest on KVM and gives the patch
//! engine what it needs from outside the guest: guest memory, a way to stop
//! every vCPU at once, and the registers of each stopped vCPU.

// Modules marked `#[allow(missing_docs)]` predate the workspace's
// `missing_docs` lint and still have undocumented public fields or
// variants; the lint holds every other (and every new) module to it.
#[allow(missing_docs)]
pub mod api;
#[allow(missing_docs)]
pub mod arch;
#[allow(missing_docs)]
pub mod control;
#[allow(missing_docs)]
pub mod devices;
#[allow(missing_docs)]
pub mod guest;
pub mod heap;
#[allow(missing_docs)]
pub mod kvm_probe;
#[allow(missing_docs)]
pub mod vcpu;
#[allow(missing_docs)]
pub mod vm;

pub use vm::{PauseReport, ResumeReport, Vm, VmConfig, VmError, VmExit};

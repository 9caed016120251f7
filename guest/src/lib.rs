//! Guest-kernel introspection: what klpvisor learns about a running Linux
//! guest from its memory and vCPU registers alone — page tables, the KASLR
//! slide, kallsyms, BTF, the task list and ORC unwinding — with no
//! System.map, debug package or agent in the guest.
//!
//! It sees the guest only through [`Guest`], which the VMM implements over
//! KVM and [`dump::DumpGuest`] implements over a QEMU memory dump, so the
//! same code runs live and in offline tests. The patch engine
//! (`klpvisor-engine`) builds on it; nothing here writes kernel text.

pub mod btf;
pub mod dump;
pub mod kallsyms;
pub mod kaslr;
pub mod kernel;
pub mod orc;
pub mod overlay;
pub mod paging;
pub mod tasks;

pub use btf::{Btf, BtfError, Field};
pub use dump::{DumpError, DumpGuest};
pub use kallsyms::{Kallsyms, KallsymsError, Symbol};
pub use kaslr::{Evidence, Kaslr, KaslrError};
pub use kernel::{all_vcpu_regs, IntrospectError, Kernel};
pub use paging::{AddressSpace, PageTables, PagingError, VirtRead};
pub use tasks::{Running, Task, Tasks, TasksError};

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
    /// Registers of vCPU `id` (0-based, `< vcpu_count()`), read while it is
    /// paused: the engine finds the kernel page tables (CR3, CR4.LA57), the
    /// running task (GS bases) and the code a vCPU is executing (RIP, RSP).
    fn vcpu_regs(&self, id: usize) -> Result<VcpuRegs, Self::Error>;
}

/// The registers of one paused vCPU that introspection and the consistency
/// check need, in the engine's own terms (no hypervisor types), so every
/// [`Guest`] implementation (KVM, a memory dump, QEMU) can fill it.
///
/// Registers a source cannot know are `None`: a QEMU ELF core, for one,
/// records no MSRs, so `efer` and `lstar` are unknown there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// IA32_EFER, if the source records MSRs.
    pub efer: Option<u64>,
    /// IA32_LSTAR (the 64-bit `syscall` entry, Linux's `entry_SYSCALL_64`).
    pub lstar: Option<u64>,
    /// The GS segment base in effect (the per-CPU area while in the kernel).
    pub gs_base: u64,
    /// IA32_KERNEL_GS_BASE (the other GS base, swapped in by `swapgs`).
    pub kernel_gs_base: Option<u64>,
    /// Code segment selector; its low two bits are the CPL.
    pub cs_selector: u16,
    /// CS.L: the vCPU executes 64-bit code.
    pub cs_long: bool,
    /// IDTR base and limit.
    pub idtr_base: u64,
    pub idtr_limit: u16,
}

impl VcpuRegs {
    /// Current privilege level (0 = kernel, 3 = user).
    pub fn cpl(&self) -> u8 {
        (self.cs_selector & 3) as u8
    }
}

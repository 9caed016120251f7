//! Guest-kernel introspection: what klpvisor learns about a running Linux
//! guest from its memory and vCPU registers alone — page tables, the KASLR
//! slide, kallsyms, BTF, the task list and ORC unwinding — with no
//! System.map, debug package or agent in the guest.
//!
//! It sees the guest only through [`Guest`], which the VMM implements over
//! KVM and [`dump::DumpGuest`] implements over a QEMU memory dump, so the
//! same code runs live and in offline tests. The patch engine
//! (`klpvisor-engine`) builds on it; nothing here writes kernel text.
#![forbid(unsafe_code)]

pub mod btf;
pub mod dump;
pub mod kallsyms;
pub mod kaslr;
pub mod kernel;
pub mod modules;
pub mod orc;
pub mod overlay;
pub mod paging;
pub mod retaddr;
pub mod tasks;

pub use btf::{Btf, BtfError, Field};
pub use dump::{DumpError, DumpGuest};
pub use kallsyms::{Kallsyms, KallsymsError, Symbol};
pub use kaslr::{Evidence, Kaslr, KaslrError};
pub use kernel::{all_vcpu_regs, IntrospectError, Kernel};
pub use modules::{LoadedModule, ModuleState, ModuleSymbol, ModulesError};
pub use paging::{AddressSpace, PageCache, PageTables, PagingError, VirtRead};
pub use tasks::{Running, Task, Tasks, TasksError};

/// A guest-physical address, as vm-memory's `GuestAddress`: what the
/// [`Guest`] trait reads and writes, what the patch arena is carved from
/// and what every planned write targets. It reaches guest memory directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestPhys(pub u64);

/// A kernel-virtual address: where the guest kernel sees a byte (kernel
/// text, the direct map, an arena page). It reaches guest memory only
/// through a page-table walk ([`paging`]). Where both kinds meet (an arena
/// region, a PTE) each keeps its own type, so the compiler keeps a virtual
/// address from being written as a physical one.
///
/// Addresses read out of the kernel's own data (kallsyms, list pointers,
/// stack words) are still bare `u64`s inside the introspection code; this
/// type marks the engine's own addresses at the boundaries where a mix-up
/// would write the wrong memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct KernelVirt(pub u64);

/// An offset into a region the engine laid out (an arena allocation, a
/// page), which cannot leave the address space: offsets from guest data
/// are checked before they get here.
impl std::ops::Add<u64> for GuestPhys {
    type Output = Self;
    fn add(self, bytes: u64) -> Self {
        Self(self.0 + bytes)
    }
}

/// As for [`GuestPhys`]: an offset into a region the engine laid out.
impl std::ops::Add<u64> for KernelVirt {
    type Output = Self;
    fn add(self, bytes: u64) -> Self {
        Self(self.0 + bytes)
    }
}

impl std::fmt::LowerHex for GuestPhys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

impl std::fmt::LowerHex for KernelVirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// The engine's whole view of a guest.
pub trait Guest {
    /// Why an access failed (outside guest memory, a vCPU that cannot be
    /// read); the engine wraps it with what it was reading.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads guest-physical memory; fails if any byte is outside guest memory.
    fn read_phys(&self, gpa: crate::GuestPhys, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes guest-physical memory; fails if any byte is outside guest memory.
    fn write_phys(&self, gpa: crate::GuestPhys, data: &[u8]) -> Result<(), Self::Error>;
    /// The reserved patch arena: (start, size in bytes).
    fn arena(&self) -> (crate::GuestPhys, u64);
    /// Where the arena's PTE pages go, (guest-physical start, size), when
    /// the VMM reserved them in RAM the kernel maps directly (a
    /// `setup_data` blob). `None`: they take the first pages of the arena,
    /// which the kernel cannot follow (see the engine's arena).
    fn arena_tables(&self) -> Option<(crate::GuestPhys, u64)> {
        None
    }
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
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub rax: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub rbx: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub rcx: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub rdx: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub rsi: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub rdi: u64,
    /// The frame pointer (frame-pointer unwinding falls back on it).
    pub rbp: u64,
    /// The stack pointer: which stack the vCPU is on (task, IRQ) for the safe-point check.
    pub rsp: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub r8: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub r9: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub r10: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub r11: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub r12: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub r13: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub r14: u64,
    /// A general-purpose register (read for the unwinder and the `patcher regs` view).
    pub r15: u64,
    /// The instruction pointer: the code the vCPU executes (a safe point must not be inside a changed function).
    pub rip: u64,
    /// The flags (interrupts enabled or not).
    pub rflags: u64,
    /// CR0 (PG: paging on).
    pub cr0: u64,
    /// CR3: the page-table root the vCPU uses (the kernel is found through it).
    pub cr3: u64,
    /// CR4 (PAE, LA57: the paging mode).
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
    /// IDTR base: the interrupt table the call gate checks its vector in.
    pub idtr_base: u64,
    /// IDTR limit (the table's size in bytes, minus one).
    pub idtr_limit: u16,
}

impl VcpuRegs {
    /// Current privilege level (0 = kernel, 3 = user).
    pub fn cpl(&self) -> u8 {
        (self.cs_selector & 3) as u8
    }

    /// Whether the vCPU is in long mode with paging on (CR0.PG, CR4.PAE,
    /// and EFER.LMA where recorded): the only mode the x86-64 kernel's
    /// code runs in. A vCPU outside it (waiting for its start-up IPI, in
    /// the real-mode trampoline) executes no kernel function.
    pub fn in_long_mode(&self) -> bool {
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const EFER_LMA: u64 = 1 << 10;
        self.cr0 & CR0_PG != 0
            && self.cr4 & CR4_PAE != 0
            && self.efer.is_none_or(|e| e & EFER_LMA != 0)
    }
}

//! Shared glue of the fuzz targets: guest memory made of fuzz bytes, and
//! the fixed kernel the targets run against (a symbol table and the klp
//! structure layouts), so each target only decides how to read its input.
//!
//! Everything here is deterministic: a crash found by one run reproduces
//! from the saved input alone.

use klpvisor_guest::GuestPhys;
use std::fmt;
use std::sync::OnceLock;

use klpvisor_guest::kallsyms::synth::Builder;
use klpvisor_guest::kallsyms::{Image, Layout};
use klpvisor_guest::{Btf, Kallsyms, PagingError, VirtRead};
use klpvisor_guest::{Guest, VcpuRegs};

/// Where the tasks target maps its input: a kernel-image address, so the
/// fixed symbol table below can point into it (kallsyms addresses are
/// 32-bit offsets from the lowest symbol).
pub const WINDOW: u64 = 0xffff_ffff_8200_0000;

/// Kernel text of the fixed kernel (ORC covers `_stext.._etext`).
pub const STEXT: u64 = 0xffff_ffff_8100_0000;
pub const ETEXT: u64 = 0xffff_ffff_8180_0000;
/// `_end`: the module target links just past it, as the arena is placed.
pub const END: u64 = 0xffff_ffff_8300_0000;

/// Offsets in the tasks target's window of the kernel objects the task
/// walk and the ORC unwinder start from (see fuzz_targets/tasks.rs).
pub mod tasks_window {
    pub const PER_CPU_OFFSET: u64 = 0x100;
    pub const NR_CPU_IDS: u64 = 0x140;
    pub const CPU_POSSIBLE_MASK: u64 = 0x148;
    pub const INIT_TASK: u64 = 0x200;
    pub const ORC_IP: u64 = 0x1000;
    /// Entries in the ORC tables.
    pub const ORC_ENTRIES: u64 = 16;
    pub const ORC_UNWIND: u64 = ORC_IP + 4 * ORC_ENTRIES;
    pub const ORC_END: u64 = ORC_UNWIND + 6 * ORC_ENTRIES;
}

/// Kernel memory that is exactly `bytes`, mapped at `base`; everything
/// else is unmapped.
pub struct Window<'a> {
    pub base: u64,
    pub bytes: &'a [u8],
}

impl VirtRead for Window<'_> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        let src = va
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| self.bytes.get(o..o.checked_add(buf.len())?))
            .ok_or(PagingError::Unmapped { va })?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A guest-physical access outside the fuzz bytes.
#[derive(Debug)]
pub struct OutOfRange(pub u64);

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest-physical {:#x} is outside the fuzz input", self.0)
    }
}

impl std::error::Error for OutOfRange {}

/// A guest whose physical memory is the fuzz bytes from address 0. It has
/// no vCPUs and no arena, and refuses writes: the targets only read.
pub struct PhysGuest<'a>(pub &'a [u8]);

impl Guest for PhysGuest<'_> {
    type Error = OutOfRange;

    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let gpa = gpa.0;
        let src = usize::try_from(gpa)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or(OutOfRange(gpa))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_phys(&self, gpa: GuestPhys, _data: &[u8]) -> Result<(), OutOfRange> {
        let gpa = gpa.0;
        Err(OutOfRange(gpa))
    }

    fn arena(&self) -> (GuestPhys, u64) {
        (GuestPhys(0), 0)
    }

    fn vcpu_count(&self) -> usize {
        0
    }

    fn vcpu_regs(&self, _id: usize) -> Result<VcpuRegs, OutOfRange> {
        Err(OutOfRange(0))
    }
}

/// A guest whose physical memory is the fuzz bytes from address 0, with
/// vCPUs and an arena of the input's choosing (the `kernel` and `arena`
/// targets). Refuses writes, as [`PhysGuest`] does.
pub struct FuzzGuest<'a> {
    pub mem: &'a [u8],
    pub regs: Vec<VcpuRegs>,
    pub arena: (u64, u64),
    pub arena_tables: Option<(u64, u64)>,
}

impl Guest for FuzzGuest<'_> {
    type Error = OutOfRange;

    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), OutOfRange> {
        PhysGuest(self.mem).read_phys(gpa, buf)
    }

    fn write_phys(&self, gpa: GuestPhys, _data: &[u8]) -> Result<(), OutOfRange> {
        Err(OutOfRange(gpa.0))
    }

    fn arena(&self) -> (GuestPhys, u64) {
        (GuestPhys(self.arena.0), self.arena.1)
    }

    fn arena_tables(&self) -> Option<(GuestPhys, u64)> {
        self.arena_tables.map(|(gpa, len)| (GuestPhys(gpa), len))
    }

    fn vcpu_count(&self) -> usize {
        self.regs.len()
    }

    fn vcpu_regs(&self, id: usize) -> Result<VcpuRegs, OutOfRange> {
        self.regs.get(id).copied().ok_or(OutOfRange(id as u64))
    }
}

/// Reads little-endian integers off the front of a fuzz input; past its
/// end every value is 0, so any input has a meaning.
pub struct Bytes<'a>(pub &'a [u8]);

impl<'a> Bytes<'a> {
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let h = self.take(8);
        b[..h.len()].copy_from_slice(h);
        u64::from_le_bytes(b)
    }

    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let h = self.take(4);
        b[..h.len()].copy_from_slice(h);
        u32::from_le_bytes(b)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let h = self.take(2);
        b[..h.len()].copy_from_slice(h);
        u16::from_le_bytes(b)
    }

    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
}

/// The fixed kernel's symbols, sorted by address as kallsyms is: what the
/// seed module calls and patches (two `dup_fn`s for its sympos 2), the
/// return thunk, and the ORC tables and text bounds of the tasks window.
pub fn kernel_symbols() -> Vec<(char, String, u64)> {
    use tasks_window::*;
    let mut v: Vec<(char, String, u64)> = [
        ('A', "fixed_percpu_data", 0),
        ('A', "current_task", 0x1fb80),
        ('T', "_text", STEXT),
        ('T', "_stext", STEXT),
        ('t', "dup_fn", STEXT + 0x1000),
        ('T', "cmdline_proc_show", STEXT + 0x2000),
        ('T', "seq_printf", STEXT + 0x3000),
        ('t', "dup_fn", STEXT + 0x4000),
        ('T', "klp_enable_patch", STEXT + 0x5000),
        ('T', "__fentry__", STEXT + 0x6000),
        ('T', "__x86_return_thunk", STEXT + 0x7000),
        ('T', "_etext", ETEXT),
        ('D', "init_task", WINDOW + INIT_TASK),
        ('R', "__start_orc_unwind_ip", WINDOW + ORC_IP),
        ('R', "__stop_orc_unwind_ip", WINDOW + ORC_UNWIND),
        ('R', "__start_orc_unwind", WINDOW + ORC_UNWIND),
        ('R', "__stop_orc_unwind", WINDOW + ORC_END),
        ('B', "_end", END),
    ]
    .into_iter()
    .map(|(k, n, a)| (k, n.to_string(), a))
    .collect();
    v.sort_by_key(|s| (s.2 >= 1 << 32, s.2));
    v
}

/// Where the ftrace target's `ftrace_pages_start` is: just past its
/// header in the input, which is mapped at [`WINDOW`].
pub const FTRACE_PAGES_START: u64 = WINDOW + 0x40;

/// The fixed kernel's symbol table with `ftrace_pages_start` added (the
/// ftrace target's list head).
pub fn ftrace_kallsyms() -> &'static Kallsyms {
    static K: OnceLock<Kallsyms> = OnceLock::new();
    K.get_or_init(|| {
        let mut syms = kernel_symbols();
        syms.push(('b', "ftrace_pages_start".into(), FTRACE_PAGES_START));
        syms.sort_by_key(|s| (s.2 >= 1 << 32, s.2));
        let bytes = Builder::new(Layout::OffsetsFirst, syms).build();
        match Kallsyms::from_image(Image {
            base: WINDOW,
            bytes: &bytes,
        }) {
            Ok(k) => k,
            Err(e) => panic!("the ftrace kallsyms tables do not decode: {e}"),
        }
    })
}

/// The key the signature target trusts (and its seeds are signed with).
pub fn signing_key() -> klpvisor_engine::signature::SecretKey {
    klpvisor_engine::signature::SecretKey::from_seed([0x5a; 32])
}

/// kallsyms tables of [`kernel_symbols`] in 6.1's layout.
pub fn kernel_tables(layout: Layout) -> Vec<u8> {
    Builder::new(layout, kernel_symbols()).build()
}

/// The fixed kernel's symbol table, decoded by the real decoder once.
pub fn kallsyms() -> &'static Kallsyms {
    static K: OnceLock<Kallsyms> = OnceLock::new();
    K.get_or_init(|| {
        let bytes = kernel_tables(Layout::OffsetsFirst);
        match Kallsyms::from_image(Image {
            base: WINDOW,
            bytes: &bytes,
        }) {
            Ok(k) => k,
            Err(e) => panic!("the fixed kallsyms tables do not decode: {e}"),
        }
    })
}

/// The klp structure layouts of Linux 6.1, as gcc -gbtf wrote them for
/// seeds-src/livepatch.c.
pub fn klp_btf() -> &'static Btf {
    static B: OnceLock<Btf> = OnceLock::new();
    B.get_or_init(|| match Btf::parse(include_bytes!("../fixtures/klp.btf")) {
        Ok(b) => b,
        Err(e) => panic!("fixtures/klp.btf does not parse: {e}"),
    })
}

/// The kernel release the seed module's vermagic names.
pub const RELEASE: &str = "6.1.0-fuzz";

/// Byte offsets of `struct ftrace_page` and `struct dyn_ftrace` members,
/// as the ftrace target's header gives them.
#[derive(Debug, Clone, Copy)]
pub struct FtraceLayout {
    pub page_size: u32,
    pub next: u32,
    pub records: u32,
    pub index: u32,
    pub rec_size: u32,
    pub ip: u32,
    pub flags: u32,
}

impl FtraceLayout {
    /// 6.1's: `ftrace_page { next; records; int index; int order; }`,
    /// `dyn_ftrace { unsigned long ip, flags; }`.
    pub const V6_1: Self = Self {
        page_size: 24,
        next: 0,
        records: 8,
        index: 16,
        rec_size: 16,
        ip: 0,
        flags: 8,
    };

    /// BTF describing this layout (members may overlap or lie past the
    /// struct's end: the reader must cope).
    pub fn btf(&self) -> Option<Btf> {
        use klpvisor_guest::btf::synth::BtfBuilder;
        let bits = |bytes: u32| bytes.checked_mul(8);
        let mut b = BtfBuilder::new();
        let ulong = b.int("long unsigned int", 8);
        let int = b.int("int", 4);
        let rec = b.composite(
            false,
            "dyn_ftrace",
            self.rec_size,
            &[
                ("ip", ulong, bits(self.ip)?, 0),
                ("flags", ulong, bits(self.flags)?, 0),
            ],
        );
        let rec_p = b.ptr(rec);
        let page_p = b.ptr(0);
        b.composite(
            false,
            "ftrace_page",
            self.page_size,
            &[
                ("next", page_p, bits(self.next)?, 0),
                ("records", rec_p, bits(self.records)?, 0),
                ("index", int, bits(self.index)?, 0),
            ],
        );
        Btf::parse(&b.build()).ok()
    }
}

//! Guest introspection: what the engine knows about the running kernel,
//! learned only from guest memory and vCPU registers — no System.map, no
//! debug info files, no agent in the guest.
//!
//! [`Kernel::open`] strings the steps together: pick page tables from a
//! vCPU, find `_text` through them ([`kaslr`]), decode the symbol table
//! ([`kallsyms`]), confirm the location with it, load the type
//! information ([`btf`]). [`Kernel::tasks`] then lists every task
//! ([`tasks`]). [`dump::DumpGuest`] serves a QEMU memory dump as a
//! [`Guest`] for offline tests.

use crate::{
    kallsyms, kaslr, paging, AddressSpace, Btf, BtfError, Kallsyms, Kaslr, PageTables, PagingError,
    Task, Tasks, TasksError, VirtRead,
};
use crate::{Guest, VcpuRegs};

/// Errors of opening the kernel view.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    /// There is no vCPU to take page tables from.
    #[error("the guest reports no vCPUs")]
    NoVcpus,
    /// The guest could not give a vCPU's registers.
    #[error("cannot read the registers of vCPU {vcpu}: {source}")]
    Vcpu {
        /// The vCPU's index.
        vcpu: usize,
        /// The [`Guest`]'s error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No vCPU's page tables led to a kernel whose kallsyms, KASLR probe
    /// and own page tables agree.
    #[error(
        "no vCPU's page tables lead to a readable, consistent kernel image (is the guest past \
         early boot?):\n{}",
        attempts.join("\n")
    )]
    NoKernel {
        /// Why each vCPU root was rejected, one line each.
        attempts: Vec<String>,
    },
    /// The kernel's BTF could not be loaded.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// The task walk failed.
    #[error(transparent)]
    Tasks(#[from] TasksError),
}

/// Why a kernel view was not kept: the kernel's own page tables could not
/// be found, or reading the kernel through them did not give back what the
/// view already knows. Each names the read that failed.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// kallsyms lacks a symbol the check reads (`init_top_pgt`, `init_uts_ns`, ...).
    #[error("the kernel's symbol table has no `{0}`")]
    MissingSymbol(&'static str),
    /// `init_top_pgt` is below `_text` or past the kernel image window.
    #[error(
        "init_top_pgt at {va:#x} lies outside the kernel image that starts at _text {text:#x}"
    )]
    PgdOutsideImage {
        /// Kernel-virtual address of `init_top_pgt` (kallsyms).
        va: u64,
        /// Kernel-virtual `_text`.
        text: u64,
    },
    /// `init_top_pgt` does not sit where the image's physical placement says.
    #[error(
        "init_top_pgt at {va:#x} is at guest-physical {found:#x} through the vCPU's page \
         tables, but the kernel image puts it at {expected:#x}"
    )]
    PgdMisplaced {
        /// Kernel-virtual address of `init_top_pgt`.
        va: u64,
        /// Guest-physical address the vCPU's page tables translate it to.
        found: u64,
        /// `_text`'s guest-physical address plus its offset from `_text`.
        expected: u64,
    },
    /// A read through `init_top_pgt` failed.
    #[error("cannot read {what} through init_top_pgt at guest-physical {root:#x}: {source}")]
    Unreadable {
        /// What was being read.
        what: &'static str,
        /// Guest-physical address of `init_top_pgt`.
        root: u64,
        /// The read's error.
        #[source]
        source: PagingError,
    },
    /// A value read through `init_top_pgt` differs from what the view knows.
    #[error(
        "{what} reads {found:#x} through init_top_pgt at guest-physical {root:#x}, expected \
         {expected:#x}"
    )]
    Mismatch {
        /// What was read.
        what: &'static str,
        /// Guest-physical address of `init_top_pgt`.
        root: u64,
        /// The value read.
        found: u64,
        /// The value the view holds.
        expected: u64,
    },
    /// `init_uts_ns.name.release` does not look like a kernel release.
    #[error(
        "init_uts_ns.name.release through init_top_pgt at guest-physical {root:#x} is \
         {release:?}, not a kernel release"
    )]
    BadRelease {
        /// Guest-physical address of `init_top_pgt`.
        root: u64,
        /// The string read.
        release: String,
    },
    /// BTF cannot place `uts_namespace.name`.
    #[error(transparent)]
    Btf(#[from] BtfError),
}

/// How the page-table root that found the kernel was chosen: the vCPU it
/// came from and whether it was the loaded CR3 or its page-table-isolation
/// twin. The view keeps `init_top_pgt`, not this root; this says where
/// the search started, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The vCPU whose CR3 it was.
    pub vcpu: usize,
    /// The root (and paging mode) the search started from.
    pub tables: PageTables,
    /// The root is the kernel twin of a PTI user CR3 (bit 12 cleared).
    pub pti_twin: bool,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vCPU {}'s {} at {:#x} ({}-level)",
            self.vcpu,
            if self.pti_twin {
                "CR3 kernel twin"
            } else {
                "CR3"
            },
            self.tables.root(),
            if self.tables.five_level() { 5 } else { 4 }
        )
    }
}

/// The running kernel as the engine sees it.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The kernel's own page tables, `init_top_pgt` (init_mm's PGD): they
    /// live as long as the kernel, unlike a process's PGD a vCPU may have
    /// had loaded, which is freed when that process exits.
    pub tables: PageTables,
    /// The vCPU root the kernel was found through.
    pub origin: Origin,
    /// Where `_text` is, virtual and guest-physical, and what confirmed it.
    pub kaslr: Kaslr,
    /// The core kernel's symbols, decoded from its own tables.
    pub kallsyms: Kallsyms,
    /// The kernel's type information, for struct layouts.
    pub btf: Btf,
}

/// Reads every vCPU's registers.
pub fn all_vcpu_regs<G: Guest + ?Sized>(guest: &G) -> Result<Vec<VcpuRegs>, IntrospectError> {
    (0..guest.vcpu_count())
        .map(|vcpu| {
            guest.vcpu_regs(vcpu).map_err(|e| IntrospectError::Vcpu {
                vcpu,
                source: Box::new(e),
            })
        })
        .collect()
}

/// CR0.PG: paging on.
const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: required by long-mode paging.
const CR4_PAE: u64 = 1 << 5;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;

/// Why a vCPU's CR3 cannot be a 64-bit kernel root at all: the vCPU is
/// in early boot (real mode, or protected mode before long-mode paging),
/// or parked by firmware. `None` when it can be.
fn early_boot(r: &VcpuRegs) -> Option<&'static str> {
    if r.cr0 & CR0_PG == 0 {
        Some("paging is off (CR0.PG clear)")
    } else if r.cr4 & CR4_PAE == 0 {
        Some("not in long-mode paging (CR4.PAE clear)")
    } else if r.efer.is_some_and(|e| e & EFER_LMA == 0) {
        Some("not in long mode (EFER.LMA clear)")
    } else {
        None
    }
}

/// Page-table roots worth trying, best first: vCPUs in the kernel (their
/// CR3 maps the kernel), then vCPUs in user mode. With page-table
/// isolation a CR3 may be a user PGD — in user mode, but also in kernel
/// mode at the first instructions of an entry, before the CR3 switch — and
/// its kernel twin is 4 KiB below (bit 12 clear). A kernel PGD without PTI
/// may have bit 12 set too, so both are tried: the raw one first in kernel
/// mode, the twin first in user mode. Wrong guesses fail confirmation.
/// CR4.LA57 of the vCPU decides 4- or 5-level. vCPUs in early boot are
/// left out, each with the reason in `skipped`.
fn candidate_tables(regs: &[VcpuRegs], skipped: &mut Vec<String>) -> Vec<Origin> {
    let mut out: Vec<Origin> = Vec::new();
    let mut push = |o: Origin| {
        if !out.iter().any(|p| p.tables == o.tables) {
            out.push(o);
        }
    };
    let kernel_first = regs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.cpl() == 0)
        .chain(regs.iter().enumerate().filter(|(_, r)| r.cpl() != 0));
    for (vcpu, r) in kernel_first {
        if let Some(why) = early_boot(r) {
            skipped.push(format!("  vCPU {vcpu}: skipped, {why}"));
            continue;
        }
        let raw = PageTables::from_regs(r);
        let twin = PageTables::new(raw.root() & !paging::PTI_USER_PGD_BIT, raw.five_level());
        let as_is = Origin {
            vcpu,
            tables: raw,
            pti_twin: false,
        };
        let as_twin = Origin {
            vcpu,
            tables: twin,
            pti_twin: twin != raw,
        };
        let order = if r.cpl() == 0 {
            [as_is, as_twin]
        } else {
            [as_twin, as_is]
        };
        for o in order {
            push(o);
        }
    }
    out
}

impl Kernel {
    /// Finds and decodes the guest kernel, and switches the view to the
    /// kernel's own page tables. The vCPUs should be paused while their
    /// registers are read; the decode itself reads static kernel tables.
    ///
    /// Each vCPU root is tried in turn: the kernel image is found through
    /// it, `init_top_pgt` is located from the image (the kernel image is
    /// physically contiguous, so its guest-physical address follows from
    /// `_text`'s), and the view is kept only if [`Kernel::verify`] reads
    /// the kernel back through `init_top_pgt`.
    ///
    /// All the roots share one kallsyms search budget: each vCPU offers up
    /// to two roots, and each search may spend a whole budget on crafted
    /// memory (the `kernel` fuzz target has inputs that do), so with a
    /// budget per root the work grew with the vCPU count. A real kernel's
    /// tables are found on a fraction of one budget, through the first
    /// root that maps the kernel.
    pub fn open<G: Guest + ?Sized>(guest: &G) -> Result<Self, IntrospectError> {
        Self::open_spending(guest, &mut kallsyms::tables::Budget::new())
    }

    fn open_spending<G: Guest + ?Sized>(
        guest: &G,
        budget: &mut kallsyms::tables::Budget,
    ) -> Result<Self, IntrospectError> {
        let regs = all_vcpu_regs(guest)?;
        if regs.is_empty() {
            return Err(IntrospectError::NoVcpus);
        }
        let mut attempts = Vec::new();
        for origin in candidate_tables(&regs, &mut attempts) {
            if budget.is_spent() {
                attempts.push(format!(
                    "  {origin}: not tried, the kallsyms search budget is spent"
                ));
                continue;
            }
            let space = AddressSpace::new(guest, origin.tables);
            let found = kaslr::probe(&space)
                .map_err(|e| e.to_string())
                .and_then(|probe| {
                    let kallsyms = Kallsyms::load_spending(&space, probe.text, budget)
                        .map_err(|e| e.to_string())?;
                    let kaslr = Kaslr::confirm(probe, &kallsyms, &space, &regs)
                        .map_err(|e| e.to_string())?;
                    Ok((kaslr, kallsyms))
                })
                .and_then(|(kaslr, kallsyms)| {
                    let tables = init_mm_tables(&space, &kallsyms, &kaslr, origin.tables)
                        .and_then(|tables| {
                            check_image(&AddressSpace::new(guest, tables), &kaslr, &kallsyms)?;
                            Ok(tables)
                        })
                        .map_err(|e| e.to_string())?;
                    Ok((tables, kaslr, kallsyms))
                });
            let (tables, kaslr, kallsyms) = match found {
                Ok(f) => f,
                Err(e) => {
                    attempts.push(format!("  {origin}: {e}"));
                    continue;
                }
            };
            // Read through the kept tables, which already read back the
            // image: a failure here is the BTF's own.
            let btf = Btf::load(&AddressSpace::new(guest, tables), &kallsyms)?;
            let kernel = Self {
                tables,
                origin,
                kaslr,
                kallsyms,
                btf,
            };
            match kernel.verify(guest) {
                Ok(()) => return Ok(kernel),
                Err(e) => attempts.push(format!("  {origin}: {e}")),
            }
        }
        Err(IntrospectError::NoKernel { attempts })
    }

    /// Reads the kernel back through the view's page tables and checks it
    /// against what the view knows: `_text` maps to the same guest-physical
    /// address, the kallsyms anchors (`kallsyms_num_syms`,
    /// `kallsyms_relative_base`) hold what was decoded, and
    /// `init_uts_ns.name.release` is a kernel release. A view that fails
    /// this must not be kept: every later read would fail or mislead.
    pub fn verify<G: Guest + ?Sized>(&self, guest: &G) -> Result<(), ViewError> {
        check_image(&self.space(guest), &self.kaslr, &self.kallsyms)?;
        let release = self.read_uts(guest, "release")?;
        let plausible = release.bytes().next().is_some_and(|b| b.is_ascii_digit())
            && release.bytes().all(|b| b.is_ascii_graphic());
        if !plausible {
            return Err(ViewError::BadRelease {
                root: self.tables.root(),
                release,
            });
        }
        Ok(())
    }

    /// A field of `init_uts_ns.name` ("release": what `uname -r` prints,
    /// "version": `uname -v`), read through BTF offsets.
    pub fn uts<G: Guest + ?Sized>(&self, guest: &G, field: &str) -> Option<String> {
        self.read_uts(guest, field).ok()
    }

    fn read_uts<G: Guest + ?Sized>(&self, guest: &G, field: &str) -> Result<String, ViewError> {
        let base = self
            .kallsyms
            .addr("init_uts_ns")
            .map_err(|_| ViewError::MissingSymbol("init_uts_ns"))?;
        let off = self.btf.offset_of(&format!("uts_namespace.name.{field}"))?;
        let mut buf = [0u8; 65];
        self.space(guest)
            .read_virt(base.wrapping_add(off), &mut buf)
            .map_err(|source| ViewError::Unreadable {
                what: "init_uts_ns",
                root: self.tables.root(),
                source,
            })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// Kernel virtual memory of `guest`.
    pub fn space<'g, G: Guest + ?Sized>(&self, guest: &'g G) -> AddressSpace<'g, G> {
        AddressSpace::new(guest, self.tables)
    }

    /// Every loaded module with its text and kallsyms, read now: modules
    /// come and go while the guest runs, so this is never cached.
    pub fn modules<G: Guest + ?Sized>(
        &self,
        guest: &G,
    ) -> Result<Vec<crate::LoadedModule>, crate::ModulesError> {
        crate::modules::list(&self.space(guest), &self.kallsyms, &self.btf)
    }

    /// The loaded modules without their symbols (see
    /// [`crate::modules::list_without_symbols`]).
    pub fn modules_brief<G: Guest + ?Sized>(
        &self,
        guest: &G,
    ) -> Result<Vec<crate::LoadedModule>, crate::ModulesError> {
        crate::modules::list_without_symbols(&self.space(guest), &self.kallsyms, &self.btf)
    }

    /// Every task, with the vCPU running it (reads all vCPUs' registers).
    pub fn tasks<G: Guest + ?Sized>(&self, guest: &G) -> Result<Vec<Task>, IntrospectError> {
        let regs = all_vcpu_regs(guest)?;
        let mut walker = Tasks::from_kernel(&self.kallsyms, &self.btf)?;
        let space = self.space(guest);
        walker.measure_thread_size(&space, &self.kallsyms, &self.btf);
        Ok(walker.list(&space, &regs)?)
    }
}

/// Reads the kernel image back through `space` and checks it against
/// what was found: `_text`'s guest-physical address and the kallsyms
/// anchors (`kallsyms_num_syms`, `kallsyms_relative_base`).
fn check_image<G: Guest + ?Sized>(
    space: &AddressSpace<'_, G>,
    kaslr: &Kaslr,
    kallsyms: &Kallsyms,
) -> Result<(), ViewError> {
    let root = space.tables().root();
    let unreadable = |what| move |source| ViewError::Unreadable { what, root, source };
    let text = space.translate(kaslr.text).map_err(unreadable("_text"))?;
    if text.phys.0 != kaslr.text_phys {
        return Err(ViewError::Mismatch {
            what: "_text's guest-physical address",
            root,
            found: text.phys.0,
            expected: kaslr.text_phys,
        });
    }
    let addrs = kallsyms.table_addrs();
    let n = space
        .read_u32(addrs.num_syms)
        .map_err(unreadable("kallsyms_num_syms"))?;
    let decoded = kallsyms.len() as u64;
    if u64::from(n) != decoded {
        return Err(ViewError::Mismatch {
            what: "kallsyms_num_syms",
            root,
            found: n.into(),
            expected: decoded,
        });
    }
    let base = space
        .read_u64(addrs.relative_base)
        .map_err(unreadable("kallsyms_relative_base"))?;
    if base != kallsyms.relative_base() {
        return Err(ViewError::Mismatch {
            what: "kallsyms_relative_base",
            root,
            found: base,
            expected: kallsyms.relative_base(),
        });
    }
    Ok(())
}

/// The kernel's own page tables, `init_top_pgt` (x86-64's
/// `swapper_pg_dir`, init_mm's PGD), found while reading through `found`.
///
/// The kernel image is physically contiguous, so `init_top_pgt`'s
/// guest-physical address is `_text`'s plus its offset in the image; that
/// needs no page-table walk, which matters because the vCPU root that
/// found the kernel may be a process's PGD that is freed (and zeroed)
/// before the next read. Where the vCPU's tables still translate it, the
/// two must agree. The paging depth is the vCPU's (CR4.LA57): every CPU of
/// one kernel uses the same.
fn init_mm_tables<G: Guest + ?Sized>(
    space: &AddressSpace<'_, G>,
    kallsyms: &Kallsyms,
    kaslr: &Kaslr,
    found: PageTables,
) -> Result<PageTables, ViewError> {
    let va = kallsyms
        .addr("init_top_pgt")
        .map_err(|_| ViewError::MissingSymbol("init_top_pgt"))?;
    if va < kaslr.text || va >= kallsyms::KERNEL_IMAGE_END {
        return Err(ViewError::PgdOutsideImage {
            va,
            text: kaslr.text,
        });
    }
    let expected = kaslr.text_phys.wrapping_add(va - kaslr.text);
    if let Ok(t) = space.translate(va) {
        if t.phys.0 != expected {
            return Err(ViewError::PgdMisplaced {
                va,
                found: t.phys.0,
                expected,
            });
        }
    }
    Ok(PageTables::new(expected, found.five_level()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU in 64-bit long mode with paging on.
    fn long_mode(cs_selector: u16, cr3: u64, cr4: u64) -> VcpuRegs {
        VcpuRegs {
            cs_selector,
            cr0: CR0_PG | 1,
            cr3,
            cr4: cr4 | CR4_PAE,
            efer: Some(EFER_LMA | 1 << 8),
            ..Default::default()
        }
    }

    fn roots(c: &[Origin]) -> Vec<(usize, u64, bool, bool)> {
        c.iter()
            .map(|o| (o.vcpu, o.tables.root(), o.tables.five_level(), o.pti_twin))
            .collect()
    }

    #[test]
    fn kernel_mode_vcpus_first_and_pti_twins() {
        let user = long_mode(0x33, 0x5000 | 0x1000 | 0x801, 0); // PCID bits too
        let kernel = long_mode(0x10, 0x8000, paging::CR4_LA57);
        // Kernel mode, but still on the user PGD (interrupt entry).
        let entering = long_mode(0x10, 0x7000, 0);
        let mut skipped = Vec::new();
        let c = candidate_tables(&[user, kernel, kernel, entering], &mut skipped);
        assert_eq!(
            roots(&c),
            vec![
                (1, 0x8000, true, false),
                (3, 0x7000, false, false),
                (3, 0x6000, false, true),
                (0, 0x4000, false, true),
                (0, 0x5000, false, false),
            ]
        );
        assert!(skipped.is_empty());
    }

    /// A kernel image (text page, then kallsyms tables that put `_text`
    /// 2 MiB off, so every root fails confirmation after a full decode)
    /// behind a vCPU whose CR3 has bit 12 set: its root and its PTI twin
    /// (a copy of the PML4 at 0) both map it.
    struct TwoRoots {
        mem: crate::paging::test_support::FakePhys,
        regs: VcpuRegs,
    }

    impl Guest for TwoRoots {
        type Error = crate::paging::test_support::OutOfRange;
        fn read_phys(&self, gpa: crate::GuestPhys, buf: &mut [u8]) -> Result<(), Self::Error> {
            self.mem.read_phys(gpa, buf)
        }
        fn write_phys(&self, gpa: crate::GuestPhys, data: &[u8]) -> Result<(), Self::Error> {
            self.mem.write_phys(gpa, data)
        }
        fn arena(&self) -> (crate::GuestPhys, u64) {
            (crate::GuestPhys(0), 0)
        }
        fn vcpu_count(&self) -> usize {
            1
        }
        fn vcpu_regs(&self, _id: usize) -> Result<VcpuRegs, Self::Error> {
            Ok(self.regs)
        }
    }

    fn two_roots() -> (TwoRoots, Vec<u8>) {
        use crate::kallsyms::synth::{sample_symbols, Builder};
        use crate::kallsyms::Layout;
        const P: u64 = 0b11;
        const NX: u64 = 1 << 63;
        let syms = sample_symbols(300)
            .into_iter()
            .map(|(k, n, a)| (k, n, if a >= 1 << 32 { a + (2 << 20) } else { a }))
            .collect();
        let tables = Builder::new(Layout::OffsetsFirst, syms).build();
        let mem = crate::paging::test_support::FakePhys::new(0x10_0000);
        for pml4 in [0, 0x1000] {
            mem.put_u64(pml4 + 511 * 8, 0x2000 | P);
        }
        mem.put_u64(0x2000 + 510 * 8, 0x3000 | P);
        mem.put_u64(0x3000 + 8 * 8, 0x4000 | P);
        let pages = 1 + tables.len().div_ceil(4096) as u64;
        for page in 0..pages {
            let nx = if page == 0 { 0 } else { NX };
            mem.put_u64(0x4000 + page * 8, (0x1_0000 + page * 0x1000) | P | nx);
        }
        mem.write_phys(crate::GuestPhys(0x1_0000), &[0x48, 0x8d, 0x25])
            .unwrap();
        mem.write_phys(crate::GuestPhys(0x1_1000), &tables).unwrap();
        let regs = long_mode(0x10, 0x1000, 0);
        (TwoRoots { mem, regs }, tables)
    }

    /// Two roots each decode the whole table before failing; on one
    /// budget that covers a decode and a half, the second search runs
    /// out. With a budget per root (before), both decoded in full.
    #[test]
    fn page_table_roots_share_one_kallsyms_budget() {
        let (guest, tables) = two_roots();
        let mut probe = kallsyms::tables::Budget::new();
        kallsyms::tables::decode_spending(
            kallsyms::Image {
                base: 0,
                bytes: &tables,
            },
            &mut probe,
        )
        .unwrap();
        let cost = kallsyms::tables::WORK_BUDGET - probe.left();
        let mut budget = kallsyms::tables::Budget::with(cost + cost / 2);
        let e = Kernel::open_spending(&guest, &mut budget).unwrap_err();
        let IntrospectError::NoKernel { attempts } = &e else {
            panic!("{e}");
        };
        assert_eq!(attempts.len(), 2, "{e}");
        assert!(attempts[0].contains("kallsyms says _text"), "{e}");
        assert!(attempts[1].contains("units of work"), "{e}");
        // A whole budget: both roots decode, both fail to confirm.
        let e = Kernel::open(&guest).unwrap_err().to_string();
        assert_eq!(e.matches("kallsyms says _text").count(), 2, "{e}");
    }

    #[test]
    fn vcpus_in_early_boot_are_skipped_with_the_reason() {
        let real_mode = VcpuRegs::default();
        let no_pae = VcpuRegs {
            cr0: CR0_PG | 1,
            cr3: 0x3000,
            ..Default::default()
        };
        let compat = VcpuRegs {
            efer: Some(1 << 8), // LME set, LMA not yet
            ..long_mode(0x10, 0x2000, 0)
        };
        let ready = long_mode(0x10, 0x9000, 0);
        let mut skipped = Vec::new();
        let c = candidate_tables(&[real_mode, no_pae, compat, ready], &mut skipped);
        assert_eq!(
            roots(&c),
            vec![(3, 0x9000, false, false), (3, 0x8000, false, true)]
        );
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[0].contains("vCPU 0") && skipped[0].contains("CR0.PG"));
        assert!(skipped[1].contains("vCPU 1") && skipped[1].contains("CR4.PAE"));
        assert!(skipped[2].contains("vCPU 2") && skipped[2].contains("EFER.LMA"));
    }
}

//! Which page tables the kernel view reads through, on a real guest's
//! memory dump (guest-images/dump-guest: the Debian test kernel under QEMU
//! TCG, KASLR and page-table isolation on, 5-level paging where the CPU
//! has it).
//!
//! A view found through a process's page tables broke for the VM's whole
//! life once that process exited and its PGD was freed: every later read
//! went through a root whose kernel half was gone. The view now keeps the
//! kernel's own `init_top_pgt` and is verified before it is kept. These
//! tests give `Kernel::open` every kind of root a vCPU can hold, by
//! presenting the dump with doctored vCPU registers or memory.
#![forbid(unsafe_code)]

use klpvisor_guest::paging::{CR4_LA57, PTI_USER_PGD_BIT};
use klpvisor_guest::GuestPhys;
use klpvisor_guest::{AddressSpace, DumpError, DumpGuest, IntrospectError, Kernel};
use klpvisor_guest::{Guest, VcpuRegs};

mod common;

use common::dump;

/// The dump with chosen vCPU registers, and some guest-physical pages
/// reading as zeros (a freed, cleared page-table page).
struct Doctored<'a> {
    dump: &'a DumpGuest,
    regs: Vec<VcpuRegs>,
    zeroed: Vec<u64>,
}

impl<'a> Doctored<'a> {
    fn new(dump: &'a DumpGuest) -> Self {
        let regs = (0..dump.vcpu_count())
            .map(|i| dump.vcpu_regs(i).unwrap())
            .collect();
        Self {
            dump,
            regs,
            zeroed: Vec::new(),
        }
    }
}

impl Guest for Doctored<'_> {
    type Error = DumpError;
    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), DumpError> {
        let gpa = gpa.0;
        self.dump.read_phys(GuestPhys(gpa), buf)?;
        let end = gpa + buf.len() as u64;
        for &page in &self.zeroed {
            let (from, to) = (page.max(gpa), (page + 0x1000).min(end));
            if from < to {
                buf[(from - gpa) as usize..(to - gpa) as usize].fill(0);
            }
        }
        Ok(())
    }
    fn write_phys(&self, _gpa: GuestPhys, _data: &[u8]) -> Result<(), DumpError> {
        panic!("introspection never writes");
    }
    fn arena(&self) -> (klpvisor_guest::GuestPhys, u64) {
        self.dump.arena()
    }
    fn vcpu_count(&self) -> usize {
        self.regs.len()
    }
    fn vcpu_regs(&self, id: usize) -> Result<VcpuRegs, DumpError> {
        Ok(self.regs[id])
    }
}

fn release(k: &Kernel, g: &impl Guest) -> String {
    k.uts(g, "release").expect("init_uts_ns.name.release reads")
}

#[test]
fn the_view_outlives_the_process_page_tables_it_was_found_through() {
    if common::skip_without_dump() {
        return;
    }
    let d = dump();
    let k = &d.kernel;
    let init_pgd = k.tables.root();
    // Free (zero) every root a vCPU had loaded, and its PTI twin, except
    // the kernel's own: what happens when the process a vCPU ran exits.
    let mut freed = Doctored::new(&d.guest);
    for r in &freed.regs.clone() {
        let pair = r.cr3 & 0x000f_ffff_ffff_e000;
        for page in [pair, pair | PTI_USER_PGD_BIT] {
            if page != init_pgd {
                freed.zeroed.push(page);
            }
        }
    }
    eprintln!(
        "found through {}; kept init_top_pgt at {init_pgd:#x}; freed {:#x?}",
        k.origin, freed.zeroed
    );
    if k.origin.tables.root() != init_pgd {
        // The root that found the kernel no longer maps it...
        assert!(AddressSpace::new(&freed, k.origin.tables)
            .translate(k.kaslr.text)
            .is_err());
    }
    // ...but the kept view still reads all of it.
    k.verify(&freed).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(release(k, &freed), release(k, &d.guest));
    assert!(release(k, &freed).starts_with("6."));
}

#[test]
fn an_idle_vcpu_on_init_mm_finds_the_kernel_directly() {
    if common::skip_without_dump() {
        return;
    }
    let d = dump();
    let mut g = Doctored::new(&d.guest);
    let template = g.regs[0];
    g.regs = vec![VcpuRegs {
        cr3: d.kernel.tables.root(),
        ..template
    }];
    let k = Kernel::open(&g).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(k.origin.tables.root(), d.kernel.tables.root());
    assert!(!k.origin.pti_twin);
    assert_eq!(k.tables, d.kernel.tables);
    assert_eq!(k.kaslr.text, d.kernel.kaslr.text);
}

#[test]
fn the_paging_depth_comes_from_cr4_la57_and_a_wrong_depth_is_passed_over() {
    if common::skip_without_dump() {
        return;
    }
    let d = dump();
    let depth = if d.kernel.tables.five_level() { 5 } else { 4 };
    eprintln!("the dumped guest uses {depth}-level paging");
    // Every vCPU claims the other depth: the roots are then read wrongly,
    // and no view is made from them.
    let mut wrong = Doctored::new(&d.guest);
    for r in &mut wrong.regs {
        r.cr4 ^= CR4_LA57;
    }
    match Kernel::open(&wrong) {
        Err(IntrospectError::NoKernel { attempts }) => {
            assert!(!attempts.is_empty());
            let other = 9 - depth;
            assert!(
                attempts
                    .iter()
                    .all(|a| a.contains(&format!("({other}-level)"))),
                "{attempts:?}"
            );
        }
        Ok(k) => panic!("a {} view from the wrong depth", k.origin),
        Err(e) => panic!("unexpected error: {e}"),
    }
    // One vCPU with the right depth is enough.
    let right = d.guest.vcpu_regs(0).unwrap();
    wrong.regs.push(right);
    let k = Kernel::open(&wrong).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(k.origin.vcpu, wrong.regs.len() - 1);
    assert_eq!(k.tables, d.kernel.tables);
}

#[test]
fn vcpus_in_early_boot_or_mid_cr3_switch_are_passed_over() {
    if common::skip_without_dump() {
        return;
    }
    let d = dump();
    let mut g = Doctored::new(&d.guest);
    let real = g.regs[0];
    let early = VcpuRegs::default(); // reset state: real mode
                                     // A kernel-mode vCPU whose CR3 names a page that is not a page table
                                     // (the instant of a switch to a PGD that is being torn down).
    let garbage = 0x10_0000;
    g.zeroed.push(garbage);
    let switching = VcpuRegs {
        cr3: garbage,
        ..real
    };
    g.regs = vec![early, switching, real];
    let k = Kernel::open(&g).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(k.origin.vcpu, 2);
    assert_eq!(k.tables, d.kernel.tables);

    g.regs = vec![early, switching];
    let e = Kernel::open(&g).unwrap_err().to_string();
    assert!(e.contains("vCPU 0: skipped, paging is off"), "{e}");
    assert!(e.contains("vCPU 1's CR3 at 0x100000"), "{e}");
}

#[test]
fn a_view_that_does_not_read_back_through_init_top_pgt_is_not_kept() {
    if common::skip_without_dump() {
        return;
    }
    let d = dump();
    // init_top_pgt cleared: the kernel is still found through the vCPUs'
    // roots, but the tables the view would keep do not map it.
    let mut g = Doctored::new(&d.guest);
    g.zeroed.push(d.kernel.tables.root());
    let regs_roots: Vec<u64> = g.regs.iter().map(|r| r.cr3 & !0xfff).collect();
    if regs_roots.contains(&d.kernel.tables.root()) {
        eprintln!("note: a vCPU was on init_mm at the dump instant; clearing its copy too");
    }
    let e = Kernel::open(&g).unwrap_err().to_string();
    assert!(e.contains("init_top_pgt"), "{e}");
    // And a kept view checked against a guest that lost it says so.
    let e = d.kernel.verify(&g).unwrap_err().to_string();
    assert!(e.contains("through init_top_pgt"), "{e}");
}

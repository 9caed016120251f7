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
    kaslr, paging, AddressSpace, Btf, BtfError, Kallsyms, Kaslr, PageTables, Task, Tasks,
    TasksError, VirtRead,
};
use crate::{Guest, VcpuRegs};

/// Errors of opening the kernel view.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    #[error("the guest reports no vCPUs")]
    NoVcpus,
    #[error("cannot read the registers of vCPU {vcpu}: {source}")]
    Vcpu {
        vcpu: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "no vCPU's page tables lead to a readable, consistent kernel image (is the guest past \
         early boot?):\n{}",
        attempts.join("\n")
    )]
    NoKernel { attempts: Vec<String> },
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Tasks(#[from] TasksError),
}

/// The running kernel as the engine sees it.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Kernel page tables (any kernel PGD: they share the kernel half).
    pub tables: PageTables,
    pub kaslr: Kaslr,
    pub kallsyms: Kallsyms,
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

/// Page-table roots worth trying, best first: vCPUs in the kernel (their
/// CR3 maps the kernel), then vCPUs in user mode. With page-table
/// isolation a CR3 may be a user PGD — in user mode, but also in kernel
/// mode at the first instructions of an entry, before the CR3 switch — and
/// its kernel twin is 4 KiB below (bit 12 clear). A kernel PGD without PTI
/// may have bit 12 set too, so both are tried: the raw one first in kernel
/// mode, the twin first in user mode. Wrong guesses fail confirmation.
fn candidate_tables(regs: &[VcpuRegs]) -> Vec<(usize, PageTables)> {
    let mut out: Vec<(usize, PageTables)> = Vec::new();
    let mut push = |vcpu: usize, t: PageTables| {
        if !out.iter().any(|(_, o)| *o == t) {
            out.push((vcpu, t));
        }
    };
    let kernel_first = regs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.cpl() == 0)
        .chain(regs.iter().enumerate().filter(|(_, r)| r.cpl() != 0));
    for (i, r) in kernel_first {
        let raw = PageTables::from_regs(r);
        let twin = PageTables::new(raw.root() & !paging::PTI_USER_PGD_BIT, raw.five_level());
        let order = if r.cpl() == 0 {
            [raw, twin]
        } else {
            [twin, raw]
        };
        for t in order {
            push(i, t);
        }
    }
    out
}

impl Kernel {
    /// Finds and decodes the guest kernel. The vCPUs should be paused.
    pub fn open<G: Guest + ?Sized>(guest: &G) -> Result<Self, IntrospectError> {
        let regs = all_vcpu_regs(guest)?;
        if regs.is_empty() {
            return Err(IntrospectError::NoVcpus);
        }
        let mut attempts = Vec::new();
        for (vcpu, tables) in candidate_tables(&regs) {
            let space = AddressSpace::new(guest, tables);
            let found = kaslr::probe(&space)
                .map_err(|e| e.to_string())
                .and_then(|probe| {
                    let kallsyms = Kallsyms::load(&space, probe.text).map_err(|e| e.to_string())?;
                    let kaslr = Kaslr::confirm(probe, &kallsyms, &space, &regs)
                        .map_err(|e| e.to_string())?;
                    Ok((kaslr, kallsyms))
                });
            match found {
                Ok((kaslr, kallsyms)) => {
                    let btf = Btf::load(&space, &kallsyms)?;
                    return Ok(Self {
                        tables,
                        kaslr,
                        kallsyms,
                        btf,
                    });
                }
                Err(e) => attempts.push(format!(
                    "  vCPU {vcpu}, page tables at {:#x} ({}-level): {e}",
                    tables.root(),
                    if tables.five_level() { 5 } else { 4 }
                )),
            }
        }
        Err(IntrospectError::NoKernel { attempts })
    }

    /// Switches to the kernel's own page tables, `init_top_pgt` (x86-64's
    /// `swapper_pg_dir`, init_mm's PGD),
    /// which live as long as the kernel. [`Kernel::open`] found the kernel
    /// through whatever PGD a vCPU had loaded, usually a process's, which
    /// is freed when that process exits: a view kept beyond one pause must
    /// not depend on it. Leaves the tables unchanged (and says why) if the
    /// kernel's PGD cannot be found or does not map `_text` identically.
    pub fn pin_init_mm<G: Guest + ?Sized>(&mut self, guest: &G) -> Result<(), String> {
        let va = self
            .kallsyms
            .addr("init_top_pgt")
            .map_err(|e| e.to_string())?;
        let phys = self
            .space(guest)
            .translate(va)
            .map_err(|e| format!("init_top_pgt at {va:#x}: {e}"))?
            .phys;
        let init_mm = PageTables::new(phys, self.tables.five_level());
        let text = AddressSpace::new(guest, init_mm)
            .translate(self.kaslr.text)
            .map_err(|e| format!("init_top_pgt at {phys:#x} does not map _text: {e}"))?;
        if text.phys != self.kaslr.text_phys {
            return Err(format!(
                "init_top_pgt at {phys:#x} maps _text to {:#x}, not {:#x}",
                text.phys, self.kaslr.text_phys
            ));
        }
        self.tables = init_mm;
        Ok(())
    }

    /// A field of `init_uts_ns.name` ("release": what `uname -r` prints,
    /// "version": `uname -v`), read through BTF offsets.
    pub fn uts<G: Guest + ?Sized>(&self, guest: &G, field: &str) -> Option<String> {
        let base = self.kallsyms.addr("init_uts_ns").ok()?;
        let off = self
            .btf
            .offset_of(&format!("uts_namespace.name.{field}"))
            .ok()?;
        let mut buf = [0u8; 65];
        self.space(guest)
            .read_virt(base.wrapping_add(off), &mut buf)
            .ok()?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Some(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// Kernel virtual memory of `guest`.
    pub fn space<'g, G: Guest + ?Sized>(&self, guest: &'g G) -> AddressSpace<'g, G> {
        AddressSpace::new(guest, self.tables)
    }

    /// Every task, with the vCPU running it (reads all vCPUs' registers).
    pub fn tasks<G: Guest + ?Sized>(&self, guest: &G) -> Result<Vec<Task>, IntrospectError> {
        let regs = all_vcpu_regs(guest)?;
        let walker = Tasks::from_kernel(&self.kallsyms, &self.btf)?;
        Ok(walker.list(&self.space(guest), &regs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_mode_vcpus_first_and_pti_twins() {
        let user = VcpuRegs {
            cs_selector: 0x33,
            cr3: 0x5000 | 0x1000 | 0x801, // PCID bits too
            ..Default::default()
        };
        let kernel = VcpuRegs {
            cs_selector: 0x10,
            cr3: 0x8000,
            cr4: paging::CR4_LA57,
            ..Default::default()
        };
        // Kernel mode, but still on the user PGD (interrupt entry).
        let entering = VcpuRegs {
            cs_selector: 0x10,
            cr3: 0x7000,
            ..Default::default()
        };
        let c = candidate_tables(&[user, kernel, kernel, entering]);
        assert_eq!(
            c,
            vec![
                (1, PageTables::new(0x8000, true)),
                (3, PageTables::new(0x7000, false)),
                (3, PageTables::new(0x6000, false)),
                (0, PageTables::new(0x4000, false)),
                (0, PageTables::new(0x5000, false)),
            ]
        );
    }
}

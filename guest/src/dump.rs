//! A guest frozen in a QEMU `dump-guest-memory` ELF core, as a [`Guest`]:
//! the fast, KVM-free way to test introspection on a real kernel.
//!
//! The core has one PT_LOAD per RAM block (p_paddr = guest-physical
//! address) and one PT_NOTE holding, per vCPU, an NT_PRSTATUS ("CORE") and
//! a "QEMU" note with QEMU's `QEMUCPUState` (target/i386/arch_dump.c):
//! general registers, segments with bases and flags, GDT/IDT, CR0-CR4 and
//! (since QEMU 5.0, found by its size field) KERNEL_GS_BASE. It records no
//! other MSRs, so EFER and LSTAR are unknown. Memory is read with positioned
//! reads, never loaded whole. The file is untrusted input like guest memory.

use crate::GuestPhys;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Guest, VcpuRegs};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PN_XNUM: u16 = 0xffff;
/// QEMU's note type for its CPU state (name "QEMU").
const NT_QEMU: u32 = 0;
const MAX_PHDRS: usize = 1 << 16;
const MAX_NOTES_BYTES: u64 = 16 << 20;
/// QEMUCPUState up to and including cr[4].
const QEMU_STATE_MIN: usize = 432;

/// Errors of opening and reading a dump.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Opening or reading the file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The dump file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The ELF header, program headers or notes are not those of an
    /// x86-64 core.
    #[error("{path} is not a 64-bit little-endian x86-64 ELF core: {why}")]
    NotACore {
        /// The dump file.
        path: PathBuf,
        /// What did not fit.
        why: String,
    },
    /// The core has no QEMU CPU-state note, so no vCPU registers.
    #[error("{path} has no QEMU CPU-state notes: take the dump with QEMU's dump-guest-memory (ELF format)")]
    NoCpuState {
        /// The dump file.
        path: PathBuf,
    },
    /// A guest-physical read outside every PT_LOAD segment.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not in the dump")]
    OutOfRange {
        /// Guest-physical start of the read.
        gpa: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// A write: a dump is never changed.
    #[error("a memory dump is read-only (write of {len} bytes at {gpa:#x} refused)")]
    ReadOnly {
        /// Guest-physical start of the refused write.
        gpa: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// A vCPU index at or above the dump's vCPU count.
    #[error("the dump has {count} vCPUs; there is no vCPU {id}")]
    NoVcpu {
        /// The index asked for.
        id: usize,
        /// The number of CPU-state notes in the dump.
        count: usize,
    },
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    gpa: u64,
    len: u64,
    file_off: u64,
}

/// A QEMU ELF core opened for reading.
#[derive(Debug)]
pub struct DumpGuest {
    path: PathBuf,
    file: File,
    /// PT_LOAD segments sorted by guest-physical address.
    segments: Vec<Segment>,
    vcpus: Vec<VcpuRegs>,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(o..o.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(o..o.checked_add(8)?)?.try_into().ok()?,
    ))
}

impl DumpGuest {
    /// Opens a QEMU `dump-guest-memory` ELF core: its RAM segments and one
    /// vCPU's registers per CPU-state note.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DumpError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| DumpError::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |why: &str| DumpError::NotACore {
            path: path.clone(),
            why: why.into(),
        };
        let read = |off: u64, len: usize| -> Result<Vec<u8>, DumpError> {
            let mut v = vec![0u8; len];
            file.read_exact_at(&mut v, off)
                .map_err(|source| DumpError::Io {
                    path: path.clone(),
                    source,
                })?;
            Ok(v)
        };
        let eh = read(0, 64)?;
        if eh.get(0..4) != Some(b"\x7fELF".as_slice()) {
            return Err(bad("no ELF magic"));
        }
        if eh.get(4) != Some(&2) || eh.get(5) != Some(&1) {
            return Err(bad("not ELFCLASS64 little-endian"));
        }
        if u16_at(&eh, 16) != Some(4) {
            return Err(bad("e_type is not ET_CORE"));
        }
        if u16_at(&eh, 18) != Some(62) {
            return Err(bad("e_machine is not x86-64"));
        }
        let phoff = u64_at(&eh, 32).ok_or_else(|| bad("truncated header"))?;
        let shoff = u64_at(&eh, 40).ok_or_else(|| bad("truncated header"))?;
        let phentsize = usize::from(u16_at(&eh, 54).ok_or_else(|| bad("truncated header"))?);
        let mut phnum = usize::from(u16_at(&eh, 56).ok_or_else(|| bad("truncated header"))?);
        if phentsize < 56 {
            return Err(bad("program headers smaller than Elf64_Phdr"));
        }
        if phnum == usize::from(PN_XNUM) {
            // The real count is sh_info of section header 0.
            let sh0 = read(shoff, 64)?;
            phnum = u32_at(&sh0, 44).ok_or_else(|| bad("truncated section header"))? as usize;
        }
        if phnum > MAX_PHDRS {
            return Err(bad("absurd program header count"));
        }
        let ph = read(
            phoff,
            phnum
                .checked_mul(phentsize)
                .ok_or_else(|| bad("header size overflow"))?,
        )?;
        let mut segments = Vec::new();
        let mut notes = Vec::new();
        for i in 0..phnum {
            let o = i * phentsize;
            let field =
                |rel: usize| u64_at(&ph, o + rel).ok_or_else(|| bad("truncated program header"));
            let p_type = u32_at(&ph, o).ok_or_else(|| bad("truncated program header"))?;
            let (offset, paddr, filesz) = (field(8)?, field(24)?, field(32)?);
            match p_type {
                PT_LOAD if filesz > 0 => {
                    if offset.checked_add(filesz).is_none() || paddr.checked_add(filesz).is_none() {
                        return Err(bad("PT_LOAD range overflows"));
                    }
                    segments.push(Segment {
                        gpa: paddr,
                        len: filesz,
                        file_off: offset,
                    });
                }
                PT_NOTE => {
                    if filesz > MAX_NOTES_BYTES {
                        return Err(bad("PT_NOTE too large"));
                    }
                    notes.push(read(offset, filesz as usize)?);
                }
                _ => {}
            }
        }
        segments.sort_by_key(|s| s.gpa);
        let mut vcpus = Vec::new();
        for n in &notes {
            parse_notes(n, &mut vcpus);
        }
        if vcpus.is_empty() {
            return Err(DumpError::NoCpuState { path });
        }
        Ok(Self {
            path,
            file,
            segments,
            vcpus,
        })
    }

    /// The dump file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of guest RAM in the dump.
    pub fn ram_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// Collects the vCPU states from one PT_NOTE segment.
fn parse_notes(n: &[u8], vcpus: &mut Vec<VcpuRegs>) {
    let mut o = 0usize;
    while let (Some(namesz), Some(descsz), Some(ntype)) =
        (u32_at(n, o), u32_at(n, o + 4), u32_at(n, o + 8))
    {
        let align4 = |v: usize| v.checked_add(3).map(|x| x & !3);
        let Some(name_end) = align4(namesz as usize).and_then(|l| (o + 12).checked_add(l)) else {
            return;
        };
        let Some(desc_end) = align4(descsz as usize).and_then(|l| name_end.checked_add(l)) else {
            return;
        };
        let name = n
            .get(o + 12..(o + 12).saturating_add(namesz as usize))
            .unwrap_or_default();
        let desc = name_end
            .checked_add(descsz as usize)
            .and_then(|e| n.get(name_end..e));
        if let (true, Some(desc)) = (ntype == NT_QEMU && name.starts_with(b"QEMU"), desc) {
            if let Some(r) = qemu_cpu_state(desc) {
                vcpus.push(r);
            }
        }
        if desc_end <= o {
            return;
        }
        o = desc_end;
    }
}

/// Decodes QEMU's `QEMUCPUState`.
fn qemu_cpu_state(d: &[u8]) -> Option<VcpuRegs> {
    let size = u32_at(d, 4)? as usize;
    if d.len() < QEMU_STATE_MIN || size < QEMU_STATE_MIN {
        return None;
    }
    let q = |i: usize| u64_at(d, 8 + i * 8);
    // Segments (selector u32, limit u32, flags u32, pad u32, base u64) start
    // at 152 in the order cs ds es fs gs ss ldt tr gdt idt.
    let seg = |i: usize| {
        let o = 152 + i * 24;
        Some((
            u32_at(d, o)?,
            u32_at(d, o + 4)?,
            u32_at(d, o + 8)?,
            u64_at(d, o + 16)?,
        ))
    };
    let (cs_sel, _, cs_flags, _) = seg(0)?;
    let (_, _, _, gs_base) = seg(4)?;
    let (_, idt_limit, _, idt_base) = seg(9)?;
    let cr = |i: usize| u64_at(d, 392 + i * 8);
    let kernel_gs_base = if size >= 440 { u64_at(d, 432) } else { None };
    Some(VcpuRegs {
        rax: q(0)?,
        rbx: q(1)?,
        rcx: q(2)?,
        rdx: q(3)?,
        rsi: q(4)?,
        rdi: q(5)?,
        rsp: q(6)?,
        rbp: q(7)?,
        r8: q(8)?,
        r9: q(9)?,
        r10: q(10)?,
        r11: q(11)?,
        r12: q(12)?,
        r13: q(13)?,
        r14: q(14)?,
        r15: q(15)?,
        rip: q(16)?,
        rflags: q(17)?,
        cr0: cr(0)?,
        cr3: cr(3)?,
        cr4: cr(4)?,
        efer: None,
        lstar: None,
        gs_base,
        kernel_gs_base,
        cs_selector: cs_sel as u16,
        // DESC_L_MASK in QEMU's segment flags (descriptor high word layout).
        cs_long: cs_flags & (1 << 21) != 0,
        idtr_base: idt_base,
        idtr_limit: idt_limit.min(0xffff) as u16,
    })
}

impl Guest for DumpGuest {
    type Error = DumpError;

    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), DumpError> {
        let gpa = gpa.0;
        let len = buf.len();
        let out_of_range = || DumpError::OutOfRange { gpa, len };
        let mut done = 0usize;
        while done < buf.len() {
            let cur = gpa.checked_add(done as u64).ok_or_else(out_of_range)?;
            let i = self.segments.partition_point(|s| s.gpa <= cur);
            let seg = i
                .checked_sub(1)
                .and_then(|i| self.segments.get(i))
                .filter(|s| cur - s.gpa < s.len)
                .ok_or_else(out_of_range)?;
            let in_seg = seg.len - (cur - seg.gpa);
            let rest = buf.get_mut(done..).ok_or_else(out_of_range)?;
            let chunk = rest
                .len()
                .min(usize::try_from(in_seg).unwrap_or(usize::MAX));
            let off = seg.file_off + (cur - seg.gpa);
            self.file
                .read_exact_at(rest.get_mut(..chunk).ok_or_else(out_of_range)?, off)
                .map_err(|source| DumpError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            done += chunk;
        }
        Ok(())
    }

    fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), DumpError> {
        let gpa = gpa.0;
        Err(DumpError::ReadOnly {
            gpa,
            len: data.len(),
        })
    }

    /// A dump has no patch arena.
    fn arena(&self) -> (GuestPhys, u64) {
        (GuestPhys(0), 0)
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    fn vcpu_regs(&self, id: usize) -> Result<VcpuRegs, DumpError> {
        self.vcpus.get(id).copied().ok_or(DumpError::NoVcpu {
            id,
            count: self.vcpus.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], ntype: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&ntype.to_le_bytes());
        v.extend_from_slice(name);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(desc);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn cpu_state(cr3: u64, gs: u64) -> Vec<u8> {
        let mut d = vec![0u8; 440];
        d[0..4].copy_from_slice(&1u32.to_le_bytes());
        d[4..8].copy_from_slice(&440u32.to_le_bytes());
        d[8 + 16 * 8..8 + 17 * 8].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes()); // rip
        d[152..156].copy_from_slice(&0x10u32.to_le_bytes()); // cs
        d[160..164].copy_from_slice(&(1u32 << 21).to_le_bytes());
        d[152 + 4 * 24 + 16..152 + 4 * 24 + 24].copy_from_slice(&gs.to_le_bytes());
        d[392 + 24..392 + 32].copy_from_slice(&cr3.to_le_bytes());
        d[432..440].copy_from_slice(&0x77u64.to_le_bytes());
        d
    }

    /// A core with two RAM segments (a hole between) and two vCPUs.
    fn core() -> Vec<u8> {
        let mut notes = note(b"CORE\0", 1, &[0; 336]);
        notes.extend(note(
            b"QEMU\0",
            0,
            &cpu_state(0x1000, 0xffff_8880_0000_0000),
        ));
        notes.extend(note(
            b"QEMU\0",
            0,
            &cpu_state(0x2000, 0xffff_8880_1000_0000),
        ));
        let phoff = 64u64;
        let data_off = phoff + 3 * 56;
        let notes_len = notes.len() as u64;
        let mut f = vec![0u8; 64];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&4u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[32..40].copy_from_slice(&phoff.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&3u16.to_le_bytes());
        let ph = |t: u32, off: u64, paddr: u64, sz: u64| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&t.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&sz.to_le_bytes());
            p
        };
        f.extend(ph(PT_NOTE, data_off, 0, notes_len));
        f.extend(ph(PT_LOAD, data_off + notes_len, 0, 0x1000));
        f.extend(ph(
            PT_LOAD,
            data_off + notes_len + 0x1000,
            0x10_0000,
            0x1000,
        ));
        f.extend(notes);
        f.extend((0..0x2000u32).map(|i| (i % 251) as u8));
        f
    }

    fn write(bytes: &[u8]) -> (tempdir::Dir, PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.0.join("core");
        std::fs::write(&p, bytes).unwrap();
        (d, p)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "klpv-dump-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn reads_segments_and_vcpus() {
        let (_d, p) = write(&core());
        let g = DumpGuest::open(&p).unwrap();
        assert_eq!(g.vcpu_count(), 2);
        let r = g.vcpu_regs(1).unwrap();
        assert_eq!(
            (r.cr3, r.gs_base, r.kernel_gs_base),
            (0x2000, 0xffff_8880_1000_0000, Some(0x77))
        );
        assert_eq!(
            (r.rip, r.cpl(), r.cs_long),
            (0xffff_ffff_8100_0000, 0, true)
        );
        assert_eq!((r.efer, r.lstar), (None, None));
        let mut b = [0u8; 4];
        g.read_phys(GuestPhys(0x10_0002), &mut b).unwrap();
        assert_eq!(
            b,
            [
                (0x1002 % 251) as u8,
                (0x1003 % 251) as u8,
                (0x1004 % 251) as u8,
                (0x1005 % 251) as u8
            ]
        );
        assert!(matches!(
            g.read_phys(GuestPhys(0xffe), &mut b),
            Err(DumpError::OutOfRange { .. })
        ));
        assert!(matches!(
            g.read_phys(GuestPhys(u64::MAX - 1), &mut b),
            Err(DumpError::OutOfRange { .. })
        ));
        assert!(matches!(
            g.write_phys(GuestPhys(0), &b),
            Err(DumpError::ReadOnly { .. })
        ));
        assert!(matches!(
            g.vcpu_regs(2),
            Err(DumpError::NoVcpu { id: 2, count: 2 })
        ));
    }

    #[test]
    fn hostile_cores_are_errors() {
        let good = core();
        for cut in [0, 10, 63, 64, 100, 200, 300] {
            let (_d, p) = write(&good[..cut]);
            assert!(DumpGuest::open(&p).is_err(), "cut {cut}");
        }
        let mut seed = 0x2545_f491u32;
        for _ in 0..300 {
            let mut b = good.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let i = seed as usize % 1200;
                b[i] = (seed >> 8) as u8;
            }
            let (_d, p) = write(&b);
            if let Ok(g) = DumpGuest::open(&p) {
                let mut buf = [0u8; 64];
                let _ = g.read_phys(GuestPhys(0x10_0000), &mut buf);
            }
        }
    }
}

//! The raw ELF view of a kernel module: every section header, the symbol
//! table and every RELA entry, copied out of the file into owned values
//! once, with every offset and size checked (the `object` crate checks the
//! file structure; this layer checks what it hands on). Nothing here knows
//! about livepatch; [`super::klp`] and [`super`] interpret it.

use object::elf;
use object::read::elf::{FileHeader, Rela as _, SectionHeader, Sym as _};
use object::LittleEndian as LE;

use super::ModuleError;

/// `SHF_RELA_LIVEPATCH` (include/uapi/linux/elf.h): a `.klp.rela.*` section
/// the module loader leaves to klp.
pub const SHF_RELA_LIVEPATCH: u64 = 0x0010_0000;
/// `SHN_LIVEPATCH`: the section index of `.klp.sym.*` symbols.
pub const SHN_LIVEPATCH: u16 = 0xff20;

/// One section header, with the bytes of allocatable sections.
#[derive(Debug, Clone)]
pub struct RawSection {
    /// The name from `.shstrtab`.
    pub name: String,
    /// `sh_type` (`SHT_PROGBITS`, `SHT_NOBITS`, ...).
    pub sh_type: u32,
    /// `sh_flags` (`SHF_ALLOC`, `SHF_WRITE`, `SHF_EXECINSTR`, ...).
    pub flags: u64,
    /// `sh_size` in bytes.
    pub size: u64,
    /// `sh_addralign` in bytes.
    pub align: u64,
    /// File bytes of SHF_ALLOC PROGBITS sections (length `size`); empty
    /// for NOBITS and for sections nobody loads (debug info).
    pub data: Vec<u8>,
}

impl RawSection {
    /// SHF_ALLOC: the loader would copy it into module memory.
    pub fn alloc(&self) -> bool {
        self.flags & u64::from(elf::SHF_ALLOC) != 0
    }
    /// SHF_WRITE: writable once loaded.
    pub fn write(&self) -> bool {
        self.flags & u64::from(elf::SHF_WRITE) != 0
    }
    /// SHF_EXECINSTR: code.
    pub fn exec(&self) -> bool {
        self.flags & u64::from(elf::SHF_EXECINSTR) != 0
    }
    /// SHT_NOBITS: no file bytes, zero-filled when loaded (`.bss`).
    pub fn nobits(&self) -> bool {
        self.sh_type == elf::SHT_NOBITS
    }
}

/// One symbol table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSymbol {
    /// The name from the symbol's string table.
    pub name: String,
    /// Raw `st_shndx`: 0 undefined, `SHN_ABS`, `SHN_LIVEPATCH`, or a section.
    pub shndx: u16,
    /// `st_value`: the offset in its section (a relocatable file).
    pub value: u64,
    /// `st_size` in bytes.
    pub size: u64,
    /// `ELF64_ST_BIND` (`STB_LOCAL`, `STB_GLOBAL`, `STB_WEAK`).
    pub bind: u8,
    /// `ELF64_ST_TYPE` (`STT_FUNC`, `STT_OBJECT`, ...).
    pub kind: u8,
}

impl RawSymbol {
    /// STB_WEAK.
    pub fn weak(&self) -> bool {
        self.bind == elf::STB_WEAK
    }
    /// STB_LOCAL.
    pub fn local(&self) -> bool {
        self.bind == elf::STB_LOCAL
    }
}

/// One RELA entry, with the section it patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRela {
    /// Index of the section the relocation applies to (`sh_info`).
    pub target: usize,
    /// Index of the relocation section itself (for messages).
    pub rela_section: usize,
    /// `r_offset`: where in the target section the value goes.
    pub offset: u64,
    /// `ELF64_R_TYPE` (`R_X86_64_*`).
    pub r_type: u32,
    /// Symbol table index (0: no symbol).
    pub symbol: usize,
    /// `r_addend`.
    pub addend: i64,
    /// From a `.klp.rela.*` section (SHF_RELA_LIVEPATCH).
    pub klp: bool,
}

/// The parsed file.
#[derive(Debug, Clone)]
pub struct RawElf {
    /// Every section header, by ELF section index.
    pub sections: Vec<RawSection>,
    /// The symbol table, by symbol index (0 is the null symbol).
    pub symbols: Vec<RawSymbol>,
    /// RELA entries for allocatable sections, in file order.
    pub relas: Vec<RawRela>,
}

fn corrupt(what: impl std::fmt::Display) -> ModuleError {
    ModuleError::Corrupt(what.to_string())
}

/// Machine names for the errors users most likely meet.
fn machine_name(m: u16) -> &'static str {
    match m {
        elf::EM_386 => "i386",
        elf::EM_ARM => "ARM",
        elf::EM_AARCH64 => "AArch64",
        elf::EM_PPC64 => "PowerPC 64",
        elf::EM_S390 => "s390",
        elf::EM_RISCV => "RISC-V",
        elf::EM_LOONGARCH => "LoongArch",
        elf::EM_X86_64 => "x86-64",
        _ => "unknown",
    }
}

impl RawElf {
    /// Parses a relocatable x86-64 ELF file. Checks the identification by
    /// hand first, so that the common wrong inputs get a precise message.
    pub fn parse(bytes: &[u8]) -> Result<Self, ModuleError> {
        if bytes.get(0..4) != Some(&elf::ELFMAG[..]) {
            return Err(ModuleError::NotElf);
        }
        let ident = bytes
            .get(0..16)
            .ok_or_else(|| corrupt("shorter than the ELF identification"))?;
        if ident[4] != elf::ELFCLASS64 {
            return Err(ModuleError::UnsupportedElf(
                "a 32-bit ELF file; the guest kernel is x86-64".into(),
            ));
        }
        if ident[5] != elf::ELFDATA2LSB {
            return Err(ModuleError::UnsupportedElf(
                "a big-endian ELF file; the guest kernel is x86-64".into(),
            ));
        }
        let header = elf::FileHeader64::<LE>::parse(bytes).map_err(corrupt)?;
        let endian = LE;
        let machine = header.e_machine(endian);
        if machine != elf::EM_X86_64 {
            return Err(ModuleError::WrongMachine {
                machine,
                name: machine_name(machine),
            });
        }
        let e_type = header.e_type(endian);
        if e_type != elf::ET_REL {
            return Err(ModuleError::UnsupportedElf(format!(
                "ELF type {e_type}, but a kernel module (.ko) is a relocatable object (type 1)"
            )));
        }
        let table = header.sections(endian, bytes).map_err(corrupt)?;

        let mut sections = Vec::with_capacity(table.len());
        for sh in table.iter() {
            let name = table.section_name(endian, sh).map_err(corrupt)?;
            let sh_type = sh.sh_type(endian);
            let flags = sh.sh_flags(endian);
            let size = sh.sh_size(endian);
            let alloc = flags & u64::from(elf::SHF_ALLOC) != 0;
            let data = if alloc && sh_type != elf::SHT_NOBITS {
                let d = sh.data(endian, bytes).map_err(|e| {
                    corrupt(format!("section {}: {e}", String::from_utf8_lossy(name)))
                })?;
                d.to_vec()
            } else {
                Vec::new()
            };
            sections.push(RawSection {
                name: String::from_utf8_lossy(name).into_owned(),
                sh_type,
                flags,
                size,
                align: sh.sh_addralign(endian).max(1),
                data,
            });
        }

        let symtab = table
            .symbols(endian, bytes, elf::SHT_SYMTAB)
            .map_err(corrupt)?;
        let mut symbols = Vec::with_capacity(symtab.len());
        for sym in symtab.symbols() {
            let name = symtab.symbol_name(endian, sym).map_err(corrupt)?;
            let shndx = sym.st_shndx(endian);
            if shndx == elf::SHN_XINDEX {
                return Err(ModuleError::UnsupportedElf(
                    "extended section indices (more than 65280 sections)".into(),
                ));
            }
            symbols.push(RawSymbol {
                name: String::from_utf8_lossy(name).into_owned(),
                shndx,
                value: sym.st_value(endian),
                size: sym.st_size(endian),
                bind: sym.st_bind(),
                kind: sym.st_type(),
            });
        }
        if symbols.is_empty() {
            return Err(corrupt("no symbol table"));
        }

        let mut relas = Vec::new();
        for (index, sh) in table.enumerate() {
            let sh_type = sh.sh_type(endian);
            let name = sections.get(index.0).map(|s| s.name.as_str()).unwrap_or("");
            if sh_type == elf::SHT_REL {
                let target = sections.get(sh.sh_info(endian) as usize);
                if target.is_some_and(RawSection::alloc) {
                    return Err(ModuleError::UnsupportedElf(format!(
                        "{name} holds REL relocations; x86-64 modules use RELA only"
                    )));
                }
                continue;
            }
            let Some((entries, _link)) = sh.rela(endian, bytes).map_err(corrupt)? else {
                continue;
            };
            let target = sh.sh_info(endian) as usize;
            let Some(tsec) = sections.get(target) else {
                return Err(corrupt(format!(
                    "{name} applies to section {target}, which does not exist"
                )));
            };
            if !tsec.alloc() {
                continue; // debug info
            }
            let klp = sh.sh_flags(endian) & SHF_RELA_LIVEPATCH != 0;
            for r in entries {
                let symbol = r.r_sym(endian, false) as usize;
                if symbol >= symbols.len() {
                    return Err(corrupt(format!(
                        "{name}: relocation refers to symbol {symbol}, but there are {}",
                        symbols.len()
                    )));
                }
                relas.push(RawRela {
                    target,
                    rela_section: index.0,
                    offset: r.r_offset(endian),
                    r_type: r.r_type(endian, false),
                    symbol,
                    addend: r.r_addend(endian),
                    klp,
                });
            }
        }
        Ok(Self {
            sections,
            symbols,
            relas,
        })
    }

    /// The section called `name`.
    pub fn section_by_name(&self, name: &str) -> Option<(usize, &RawSection)> {
        self.sections
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == name)
    }

    /// The section a symbol is defined in, if it is an ordinary section.
    pub fn symbol_section(&self, sym: &RawSymbol) -> Option<usize> {
        let i = usize::from(sym.shndx);
        (sym.shndx != elf::SHN_UNDEF && sym.shndx < elf::SHN_LORESERVE && i < self.sections.len())
            .then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identification_errors() {
        assert!(matches!(RawElf::parse(b""), Err(ModuleError::NotElf)));
        assert!(matches!(
            RawElf::parse(b"#!/bin/sh\n"),
            Err(ModuleError::NotElf)
        ));
        assert!(matches!(
            RawElf::parse(b"\x7fELF"),
            Err(ModuleError::Corrupt(_))
        ));
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = elf::ELFCLASS32;
        h[5] = elf::ELFDATA2LSB;
        assert!(matches!(
            RawElf::parse(&h),
            Err(ModuleError::UnsupportedElf(_))
        ));
        h[4] = elf::ELFCLASS64;
        h[5] = elf::ELFDATA2MSB;
        assert!(matches!(
            RawElf::parse(&h),
            Err(ModuleError::UnsupportedElf(_))
        ));
        h[5] = elf::ELFDATA2LSB;
        h[6] = 1; // EV_CURRENT
        h[16] = elf::ET_REL as u8;
        h[18] = elf::EM_AARCH64 as u8;
        h[52] = 64; // e_ehsize
        match RawElf::parse(&h) {
            Err(ModuleError::WrongMachine { machine, name }) => {
                assert_eq!((machine, name), (elf::EM_AARCH64, "AArch64"))
            }
            other => panic!("{other:?}"),
        }
    }
}

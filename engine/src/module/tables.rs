//! The module's own tables that the kernel's module loader registers with
//! the kernel: exception fixups (`__ex_table`), BUG/WARN sites
//! (`__bug_table`), ORC unwind data (`.orc_unwind_ip`, `.orc_unwind`) and
//! static-key sites (`__jump_table`: static branches, tracepoints).
//!
//! They are parsed here, not loaded as they stand: each entry points at
//! code through a PC-relative field, and the loader's copy is sorted
//! (`sort_extable`, `unwind_module_init`) and holds no entry for init or
//! exit code, which klpvisor never loads. So the parser turns every entry
//! into places in the module, drops the entries of init/exit code, and
//! [`crate::register`] writes the tables for the final addresses, sorted,
//! next to the `struct module` that makes the guest kernel find them.

use super::elf::{RawElf, RawRela};
use super::sections::{Policy, Segment};
use super::{ModuleError, Place};
use object::elf as E;

/// `struct exception_table_entry` on x86-64: `int insn, fixup, data`.
pub const EXTABLE_ENTRY: u64 = 12;
/// `struct orc_entry`: 6 packed bytes.
pub const ORC_ENTRY: u64 = 6;
/// One `.orc_unwind_ip` entry: a 32-bit PC-relative address.
pub const ORC_IP: u64 = 4;

/// One `__ex_table` entry: a fault at `insn` continues as `data` says
/// (the handler type and register), at `fixup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExEntry {
    /// The instruction that may fault.
    pub insn: Place,
    /// Where execution continues after the fault.
    pub fixup: Place,
    /// Not relocated: the handler type and its operands.
    pub data: i32,
}

/// One `__bug_table` entry: the `ud2` of a BUG or WARN at `addr`, and
/// where it is in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BugEntry {
    /// The `ud2`.
    pub addr: Place,
    /// The file name string (CONFIG_DEBUG_BUGVERBOSE), if the entry has one.
    pub file: Option<Place>,
    /// The source line (0 when the layout has none).
    pub line: u16,
    /// `BUGFLAG_*` (WARNING, ONCE, DONE, ...).
    pub flags: u16,
}

/// `struct jump_entry` (relative form): `s32 code, s32 target, long key`.
pub const JUMP_ENTRY: u64 = 16;

/// One `__jump_table` entry: the 2- or 5-byte site at `code` is a jump to
/// `target` or a nop, as the static key says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpEntry {
    /// The site patched between jump and nop.
    pub code: Place,
    /// Where the jump goes.
    pub target: Place,
    /// Symbol table index of the key's symbol: a kernel (or module)
    /// symbol, never one of the patch's own.
    pub key: usize,
    /// Offset of the key from that symbol (a tracepoint's key is a member
    /// of `struct tracepoint`), without the flag bits.
    pub key_addend: i64,
    /// The site jumps when the key is *off* (`static_branch_likely` on a
    /// false key and the like): the entry's flag bit 0.
    pub branch: bool,
}

/// One ORC entry: the unwind rule from `ip` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrcEntry {
    /// The first instruction the rule covers.
    pub ip: Place,
    /// The raw `struct orc_entry`, in the guest's format.
    pub entry: [u8; ORC_ENTRY as usize],
}

/// Where the fields of `struct bug_entry` are, and its size, as the
/// guest's BTF gives them (the verbose layout has the file and line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BugLayout {
    /// `sizeof(struct bug_entry)`.
    pub size: u64,
    /// Offset of `file_disp`, if the kernel has it.
    pub file: Option<u64>,
    /// Offset of `line`, if the kernel has it.
    pub line: Option<u64>,
    /// Offset of `flags`.
    pub flags: u64,
}

impl BugLayout {
    /// From the guest's BTF; `None` when it has no `struct bug_entry`
    /// with relative pointers (`bug_addr_disp`), the only x86-64 layout.
    pub fn from_btf(btf: &klpvisor_guest::Btf) -> Option<Self> {
        btf.offset_of("bug_entry.bug_addr_disp")
            .ok()
            .filter(|&o| o == 0)?;
        Some(Self {
            size: btf.struct_size("bug_entry").ok()?,
            file: btf.offset_of("bug_entry.file_disp").ok(),
            line: btf.offset_of("bug_entry.line").ok(),
            flags: btf.offset_of("bug_entry.flags").ok()?,
        })
    }
}

/// The parsed tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    /// `__ex_table`.
    pub extable: Vec<ExEntry>,
    /// `__bug_table`.
    pub bugs: Vec<BugEntry>,
    /// `.orc_unwind_ip` with `.orc_unwind`.
    pub orc: Vec<OrcEntry>,
    /// `__jump_table`.
    pub jumps: Vec<JumpEntry>,
}

impl Tables {
    /// Whether the module has none of these tables' entries.
    pub fn is_empty(&self) -> bool {
        self.extable.is_empty()
            && self.bugs.is_empty()
            && self.orc.is_empty()
            && self.jumps.is_empty()
    }
}

fn bad(section: &str, offset: u64, why: impl std::fmt::Display) -> ModuleError {
    ModuleError::BadTable(format!("{section}+{offset:#x}: {why}"))
}

/// Where relocation `r` points: a place in a loaded section, `None` for
/// init/exit code (the entry is dropped), an error for anything else.
fn target(
    elf: &RawElf,
    policies: &[Option<Policy>],
    section: &str,
    r: &RawRela,
    want: &[Segment],
) -> Result<Option<Place>, ModuleError> {
    if r.r_type != E::R_X86_64_PC32 && r.r_type != E::R_X86_64_PLT32 {
        return Err(bad(
            section,
            r.offset,
            format!("relocation type {} instead of R_X86_64_PC32", r.r_type),
        ));
    }
    let raw = elf
        .symbols
        .get(r.symbol)
        .ok_or_else(|| bad(section, r.offset, "relocation against a missing symbol"))?;
    let sec = elf.symbol_section(raw);
    match sec.and_then(|i| policies.get(i).copied().flatten()) {
        Some(Policy::Load(seg)) if want.contains(&seg) => {
            // R_X86_64_PC32 stores S + A - P: the entry points at S + A.
            let offset = raw
                .value
                .checked_add_signed(r.addend)
                .ok_or_else(|| bad(section, r.offset, "target offset overflows"))?;
            Ok(sec.map(|section| Place { section, offset }))
        }
        Some(Policy::InitExit) => Ok(None),
        _ => Err(bad(
            section,
            r.offset,
            format!(
                "the entry points at `{}`{}, which is not {}",
                raw.name,
                sec.and_then(|i| elf.sections.get(i))
                    .map(|s| format!(" in {}", s.name))
                    .unwrap_or_default(),
                if want == [Segment::Text] {
                    "loaded code"
                } else {
                    "loaded code or data"
                }
            ),
        )),
    }
}

/// The relocations of section `index`, by offset; two at one offset, or
/// one that is not where a field is, make the table malformed.
fn relocs_by_offset<'a>(
    elf: &'a RawElf,
    index: usize,
    section: &str,
) -> Result<std::collections::BTreeMap<u64, &'a RawRela>, ModuleError> {
    let mut by = std::collections::BTreeMap::new();
    for r in elf.relas.iter().filter(|r| r.target == index) {
        if by.insert(r.offset, r).is_some() {
            return Err(bad(section, r.offset, "two relocations at one field"));
        }
    }
    Ok(by)
}

/// Parses the three tables of `elf`, given each section's policy.
pub fn parse(
    elf: &RawElf,
    policies: &[Option<Policy>],
    bug: Option<BugLayout>,
) -> Result<Tables, ModuleError> {
    let mut t = Tables::default();
    if let Some((index, s)) = elf.section_by_name("__ex_table") {
        if s.size % EXTABLE_ENTRY != 0 {
            return Err(bad(
                "__ex_table",
                0,
                format!("size {} is not a multiple of {EXTABLE_ENTRY}", s.size),
            ));
        }
        let relocs = relocs_by_offset(elf, index, "__ex_table")?;
        for (i, chunk) in s.data.chunks_exact(EXTABLE_ENTRY as usize).enumerate() {
            let at = i as u64 * EXTABLE_ENTRY;
            let field = |off: u64| {
                relocs
                    .get(&(at + off))
                    .ok_or_else(|| bad("__ex_table", at + off, "field without a relocation"))
            };
            let insn = target(elf, policies, "__ex_table", field(0)?, &[Segment::Text])?;
            let fixup = target(elf, policies, "__ex_table", field(4)?, &[Segment::Text])?;
            let data = i32::from_le_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]);
            match (insn, fixup) {
                (Some(insn), Some(fixup)) => t.extable.push(ExEntry { insn, fixup, data }),
                (None, _) => {}
                (Some(_), None) => {
                    return Err(bad(
                        "__ex_table",
                        at,
                        "a fixup in init/exit code for an instruction in loaded code",
                    ))
                }
            }
        }
    }
    if let Some((index, s)) = elf.section_by_name("__bug_table") {
        let layout = bug.ok_or_else(|| {
            bad(
                "__bug_table",
                0,
                "the guest's BTF has no struct bug_entry with relative addresses",
            )
        })?;
        if layout.size == 0 || s.size % layout.size != 0 {
            return Err(bad(
                "__bug_table",
                0,
                format!(
                    "size {} is not a multiple of the guest's struct bug_entry ({})",
                    s.size, layout.size
                ),
            ));
        }
        let relocs = relocs_by_offset(elf, index, "__bug_table")?;
        let size = usize::try_from(layout.size).unwrap_or(usize::MAX);
        for (i, chunk) in s.data.chunks_exact(size).enumerate() {
            let at = i as u64 * layout.size;
            let Some(r) = relocs.get(&at) else {
                return Err(bad(
                    "__bug_table",
                    at,
                    "entry without an address relocation",
                ));
            };
            let Some(addr) = target(elf, policies, "__bug_table", r, &[Segment::Text])? else {
                continue;
            };
            let file = match layout.file.and_then(|f| relocs.get(&(at + f))) {
                Some(r) => target(
                    elf,
                    policies,
                    "__bug_table",
                    r,
                    &[Segment::Rodata, Segment::Data],
                )?,
                None => None,
            };
            let u16_at = |off: u64| {
                let o = usize::try_from(off).unwrap_or(usize::MAX);
                chunk
                    .get(o..o.saturating_add(2))
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .ok_or_else(|| bad("__bug_table", at + off, "field outside the entry"))
            };
            let line = match layout.line {
                Some(l) => u16_at(l)?,
                None => 0,
            };
            let flags = u16_at(layout.flags)?;
            t.bugs.push(BugEntry {
                addr,
                file,
                line,
                flags,
            });
        }
    }
    if let Some((index, s)) = elf.section_by_name("__jump_table") {
        t.jumps = jump_table(elf, policies, index, s.size)?;
    }
    let ip = elf.section_by_name(".orc_unwind_ip");
    let orc = elf.section_by_name(".orc_unwind");
    match (ip, orc) {
        (None, None) => {}
        (Some((ip_index, ips)), Some((_, orcs))) => {
            if ips.size % ORC_IP != 0 || orcs.size % ORC_ENTRY != 0 {
                return Err(bad(".orc_unwind", 0, "sizes are not whole entries"));
            }
            if ips.size / ORC_IP != orcs.size / ORC_ENTRY {
                return Err(bad(
                    ".orc_unwind",
                    0,
                    format!(
                        "{} addresses but {} entries",
                        ips.size / ORC_IP,
                        orcs.size / ORC_ENTRY
                    ),
                ));
            }
            let relocs = relocs_by_offset(elf, ip_index, ".orc_unwind_ip")?;
            for (i, entry) in orcs.data.chunks_exact(ORC_ENTRY as usize).enumerate() {
                let at = i as u64 * ORC_IP;
                let Some(r) = relocs.get(&at) else {
                    return Err(bad(".orc_unwind_ip", at, "entry without a relocation"));
                };
                let Some(ip) = target(elf, policies, ".orc_unwind_ip", r, &[Segment::Text])? else {
                    continue;
                };
                let mut e = [0u8; ORC_ENTRY as usize];
                e.copy_from_slice(entry);
                t.orc.push(OrcEntry { ip, entry: e });
            }
        }
        _ => {
            return Err(bad(
                ".orc_unwind",
                0,
                "one of .orc_unwind and .orc_unwind_ip without the other",
            ))
        }
    }
    Ok(t)
}

/// The entries of `__jump_table` (section `index`, `size` bytes). Each has
/// three relocations: `code` and `target` PC32 into loaded code, `key` a
/// PC64 against the key's symbol with the flags in the addend's low bits
/// (bit 0 the branch, bit 1 objtool's "nop by default" mark, which the
/// kernel reuses for "in init code" and clears at load).
fn jump_table(
    elf: &RawElf,
    policies: &[Option<Policy>],
    index: usize,
    size: u64,
) -> Result<Vec<JumpEntry>, ModuleError> {
    const S: &str = "__jump_table";
    if size % JUMP_ENTRY != 0 {
        return Err(bad(
            S,
            0,
            format!("size {size} is not a multiple of {JUMP_ENTRY}"),
        ));
    }
    let relocs = relocs_by_offset(elf, index, S)?;
    let mut out = Vec::new();
    for i in 0..size / JUMP_ENTRY {
        let at = i * JUMP_ENTRY;
        let field = |off: u64| {
            relocs
                .get(&(at + off))
                .copied()
                .ok_or_else(|| bad(S, at + off, "field without a relocation"))
        };
        let code = target(elf, policies, S, field(0)?, &[Segment::Text])?;
        let jump = target(elf, policies, S, field(4)?, &[Segment::Text])?;
        let k = field(8)?;
        if k.r_type != E::R_X86_64_PC64 {
            return Err(bad(
                S,
                at + 8,
                format!("key relocation type {} instead of R_X86_64_PC64", k.r_type),
            ));
        }
        let sym = elf
            .symbols
            .get(k.symbol)
            .ok_or_else(|| bad(S, at + 8, "key relocation against a missing symbol"))?;
        if k.symbol == 0 || elf.symbol_section(sym).is_some() {
            // Named after the symbol at the key's place (a static key's
            // relocation is often against its section).
            let place = sym.value.wrapping_add_signed(k.addend & !3);
            let name = elf
                .symbols
                .iter()
                .find(|o| {
                    !o.name.is_empty() && o.shndx == sym.shndx && o.value == place && o.size > 0
                })
                .map_or(sym.name.as_str(), |o| o.name.as_str());
            return Err(ModuleError::BadTable(format!(
                "{S}+{:#x}: the static key `{name}` is defined by the patch; only the kernel's \
                 own keys can be followed (a key of the patch's own would need the kernel's \
                 module loader to set it up)",
                at + 8,
            )));
        }
        match (code, jump) {
            (Some(code), Some(target)) => out.push(JumpEntry {
                code,
                target,
                key: k.symbol,
                key_addend: k.addend & !3,
                branch: k.addend & 1 != 0,
            }),
            // A site in init/exit code, which is never loaded.
            (None, _) => {}
            (Some(_), None) => {
                return Err(bad(
                    S,
                    at,
                    "a site in loaded code jumping into init/exit code",
                ))
            }
        }
    }
    Ok(out)
}

//! Alternatives (`.altinstructions`) in patch code, applied at link time
//! for the guest's own CPU, as the kernel's module loader applies them
//! (`module_finalize` calls `apply_alternatives` in
//! arch/x86/kernel/alternative.c).
//!
//! A patch compiled from real kernel code is full of `ALTERNATIVE()`
//! sites: `stac`/`clac` around user access, `static_cpu_has`,
//! `barrier_nospec`, copy routines picked by CPU feature, paravirt calls
//! turned into inline code. The compiler emits the original instruction
//! in place, the replacement in `.altinstr_replacement` and one
//! `struct alt_instr` per site in `.altinstructions`. The kernel picks per
//! site, once, at load time. klpvisor links the patch outside the guest,
//! so it must make the same choice, from the same facts: the guest's
//! `boot_cpu_data.x86_capability` (read from guest memory, layout from
//! BTF) and the guest kernel's own rules for copying a replacement, which
//! changed between the two kernels supported:
//!
//! * **6.1** ([`Flavor::V6_1`]): `cpuid` is a u16 whose bit 15
//!   (`ALTINSTR_FLAG_INV`) inverts the test; a 5-byte `call` replacement
//!   gets its rel32 fixed up, a leading `jmp` is recomputed (and shortened
//!   when it fits); padding is `0x90`s, then each site's runs of `0x90`
//!   become the kernel's long nops (`optimize_nops`). Other relative
//!   references in a replacement are not fixed by that kernel: we refuse
//!   them rather than link code that jumps into the weeds.
//! * **6.12** ([`Flavor::V6_12`]): `ft_flags` = feature (16 bits) + flags
//!   (`ALT_FLAG_NOT`, `ALT_FLAG_DIRECT_CALL`); nested `ALTERNATIVE_2`
//!   sites share the longest padding; every instruction of the copied
//!   replacement is relocated (`apply_relocation`: `call`, `jmp`, `Jcc`
//!   and RIP-relative operands that leave the replacement), `jmp rel32`
//!   is shortened where it fits, nops are merged (`optimize_nops`), and a
//!   `DIRECT_CALL` site becomes a direct call to the target of the
//!   paravirt slot it calls through, read from the guest's `pv_ops`.
//!
//! Everything works on the linked images: relocations (including those of
//! the table and the replacements) are already applied, so each address
//! below is the one the code will have in the guest, exactly as in the
//! kernel, which runs `apply_alternatives` after `apply_relocate_add`.

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};
use klpvisor_guest::{Btf, Kallsyms, VirtRead};

use super::Linked;
use crate::module::{Module, Place, Section, Segment};

/// The section with the `struct alt_instr` table.
pub const TABLE: &str = ".altinstructions";

/// `MAX_PATCH_LEN` of both kernels: no site is longer.
const MAX_PATCH_LEN: usize = 254;
/// 6.1's `ALTINSTR_FLAG_INV`, in `cpuid`.
const FLAG_INV_6_1: u16 = 0x8000;
/// 6.12's `ALT_FLAG_NOT`, in the flags half of `ft_flags`.
const ALT_FLAG_NOT: u16 = 1 << 0;
/// 6.12's `ALT_FLAG_DIRECT_CALL`.
const ALT_FLAG_DIRECT_CALL: u16 = 1 << 1;
/// `x86_capability` words we accept from BTF (6.12 has 24 or so).
const MAX_CAP_WORDS: u64 = 64;
/// `struct paravirt_patch_template` (`pv_ops`) bytes we snapshot at most.
const MAX_PV_OPS: u64 = 4096;

/// 6.1's `x86_nops` (arch/x86/include/asm/nops.h, 64-bit), lengths 1..=8.
const NOPS_6_1: [&[u8]; 8] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];
/// 6.12 adds NOP9..NOP11 (`cs`/`66` prefixes on NOP8).
const NOPS_6_12_EXTRA: [&[u8]; 3] = [
    &[0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[
        0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00,
    ],
];

/// Which kernel's `apply_alternatives` to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Debian's 6.1: `cpuid` with `ALTINSTR_FLAG_INV`, call fix-up and
    /// `recompute_jump`.
    V6_1,
    /// Debian's 6.12: `ft_flags`, `apply_relocation`, `ALT_FLAG_DIRECT_CALL`.
    V6_12,
}

impl Flavor {
    /// The flavour for a kernel release (`uname -r`), if it is one we know.
    /// Only the two kernels tested are accepted: the copying rules changed
    /// several times between them (6.3, 6.5, 6.7, 6.8), and a release in
    /// between would be linked by the wrong rules.
    pub fn of_release(release: &str) -> Option<Self> {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?;
        let minor = parts.next()?;
        match (major, minor) {
            ("6", "1") => Some(Self::V6_1),
            ("6", "12") => Some(Self::V6_12),
            _ => None,
        }
    }

    /// The `struct alt_instr` layout of this kernel without BTF.
    pub fn default_layout(self) -> AltLayout {
        match self {
            Self::V6_1 => AltLayout {
                size: 12,
                feature: 8,
                feature_size: 2,
                instrlen: 10,
                replacementlen: 11,
            },
            Self::V6_12 => AltLayout {
                size: 14,
                feature: 8,
                feature_size: 4,
                instrlen: 12,
                replacementlen: 13,
            },
        }
    }

    fn nop_max(self) -> usize {
        match self {
            Self::V6_1 => 8,
            Self::V6_12 => 11,
        }
    }

    /// `x86_nops[len]` of this kernel, `1 <= len <= nop_max`.
    fn nop(self, len: usize) -> &'static [u8] {
        match len {
            1..=8 => NOPS_6_1[len - 1],
            9..=11 if self == Self::V6_12 => NOPS_6_12_EXTRA[len - 9],
            _ => &[],
        }
    }
}

/// Where the fields of one `struct alt_instr` are (bytes). `instr_offset`
/// is at 0 and `repl_offset` at 4 in every kernel since 4.x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AltLayout {
    /// `sizeof(struct alt_instr)` (the table stride).
    pub size: usize,
    /// `cpuid` (6.1, u16) or `ft_flags` (6.12, u32).
    pub feature: usize,
    /// 2 for `cpuid`, 4 for `ft_flags`.
    pub feature_size: usize,
    /// `instrlen` (u8).
    pub instrlen: usize,
    /// `replacementlen` (u8).
    pub replacementlen: usize,
}

/// The guest facts alternatives are chosen by, read once per link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCpu {
    /// The kernel whose rules to follow.
    pub flavor: Flavor,
    /// `struct alt_instr` in this guest.
    pub layout: AltLayout,
    /// `boot_cpu_data.x86_capability`: capability and bug words.
    pub caps: Vec<u32>,
    /// 6.12: the guest's `pv_ops` (address, bytes), where a
    /// `DIRECT_CALL` site's slot is read. `None`: such sites are refused.
    pub pv_ops: Option<(u64, Vec<u8>)>,
    /// 6.12: `BUG_func`, what a `DIRECT_CALL` replacement calls before
    /// it is rewritten.
    pub bug_func: Option<u64>,
    /// 6.12: `nop_func`: a `DIRECT_CALL` to it becomes nops.
    pub nop_func: Option<u64>,
}

impl GuestCpu {
    /// Whether the guest's boot CPU has feature (or bug) bit `bit`;
    /// `None` when the bit lies outside `x86_capability`.
    pub fn has(&self, bit: u16) -> Option<bool> {
        let word = self.caps.get(usize::from(bit / 32))?;
        Some(word & (1 << (bit % 32)) != 0)
    }
}

/// Why an alternative cannot be applied, or the guest's facts not read.
#[derive(Debug, thiserror::Error)]
pub enum AltError {
    /// The guest's kernel release is not one whose alternative rules
    /// klpvisor reproduces.
    #[error(
        "the patch has alternatives (.altinstructions), but klpvisor applies them only for \
         Debian's 6.1 and 6.12 kernels, whose rules it reproduces; the guest runs {0}. Build \
         the patch without ALTERNATIVE()/static_cpu_has/user-access helpers, or add this \
         kernel's rules"
    )]
    UnsupportedKernel(String),
    /// The caller did not pass the guest's CPU features.
    #[error(
        "the patch has alternatives (.altinstructions), but the link was not given the guest's \
         CPU features (LinkOptions::alternatives; read them with guest_cpu)"
    )]
    NoGuestCpu,
    /// The guest's BTF cannot place what the CPU-feature read needs.
    #[error("cannot read the guest's CPU features for alternatives: {what}: {source}")]
    Btf {
        /// The structure or member looked up.
        what: &'static str,
        /// BTF's error.
        #[source]
        source: klpvisor_guest::BtfError,
    },
    /// The guest's CPU features could not be read (from its memory, or
    /// through an unusable BTF member).
    #[error("cannot read the guest's CPU features for alternatives: {0}")]
    Guest(String),
    /// `.altinstructions` is not a whole number of this guest's `struct alt_instr`.
    #[error(
        "{TABLE} is {size} bytes, not a multiple of struct alt_instr ({entry} bytes in this \
         guest): corrupt module, or built for another kernel"
    )]
    TableSize {
        /// The section's size in bytes.
        size: usize,
        /// `sizeof(struct alt_instr)` in the guest's BTF.
        entry: usize,
    },
    /// An entry is truncated or its offsets overflow.
    #[error("alternative #{index} in {TABLE}: {reason}")]
    BadEntry {
        /// The entry's index in the table.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An alternative whose replacement klpvisor will not write.
    #[error("alternative at {at} (feature {feature}): {reason}")]
    Refused {
        /// `function+0xoff` of the original instruction.
        at: String,
        /// `word*32+bit`, with `!` for an inverted test.
        feature: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Whether the linker must apply alternatives to `module` (a non-empty
/// table): the caller then reads [`guest_cpu`].
pub fn used_by(module: &Module) -> bool {
    table(module).is_some()
}

fn table(module: &Module) -> Option<&Section> {
    module
        .sections
        .iter()
        .find(|s| s.name == TABLE && !s.data.is_empty())
}

/// Reads the facts [`apply`] needs from the guest: its kernel flavour
/// (from `release`), the `struct alt_instr` layout (BTF, else the
/// flavour's), `boot_cpu_data.x86_capability`, and for 6.12 `pv_ops`,
/// `BUG_func` and `nop_func`.
pub fn guest_cpu<M: VirtRead + ?Sized>(
    mem: &M,
    kallsyms: &Kallsyms,
    btf: &Btf,
    release: &str,
) -> Result<GuestCpu, AltError> {
    let flavor =
        Flavor::of_release(release).ok_or_else(|| AltError::UnsupportedKernel(release.into()))?;
    let layout = btf_layout(btf, flavor)?;

    let caps = btf
        .field("cpuinfo_x86.x86_capability")
        .map_err(|source| AltError::Btf {
            what: "cpuinfo_x86.x86_capability",
            source,
        })?;
    let off = caps
        .byte_offset()
        .ok_or_else(|| AltError::Guest("cpuinfo_x86.x86_capability is a bitfield".into()))?;
    let bytes = caps
        .size
        .filter(|&s| s % 4 == 0 && s > 0 && s / 4 <= MAX_CAP_WORDS)
        .ok_or_else(|| {
            AltError::Guest(format!(
                "cpuinfo_x86.x86_capability is {:?} bytes in BTF, not 1..={MAX_CAP_WORDS} u32 \
                 words",
                caps.size
            ))
        })?;
    let base = kallsyms
        .addr("boot_cpu_data")
        .map_err(|e| AltError::Guest(format!("boot_cpu_data: {e}")))?;
    let va = base
        .checked_add(off)
        .ok_or_else(|| AltError::Guest("boot_cpu_data address overflows".into()))?;
    let raw = mem
        .read_vec(va, bytes, MAX_CAP_WORDS * 4, "boot_cpu_data.x86_capability")
        .map_err(|e| AltError::Guest(format!("reading boot_cpu_data.x86_capability: {e}")))?;
    let caps = raw
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();

    let (mut pv_ops, mut bug_func, mut nop_func) = (None, None, None);
    if flavor == Flavor::V6_12 {
        bug_func = kallsyms.addr("BUG_func").ok();
        nop_func = kallsyms.addr("nop_func").ok();
        if let (Ok(addr), Ok(size)) = (
            kallsyms.addr("pv_ops"),
            btf.struct_size("paravirt_patch_template"),
        ) {
            let size = size.min(MAX_PV_OPS);
            let bytes = mem
                .read_vec(addr, size, MAX_PV_OPS, "pv_ops")
                .map_err(|e| AltError::Guest(format!("reading pv_ops: {e}")))?;
            pv_ops = Some((addr, bytes));
        }
    }
    Ok(GuestCpu {
        flavor,
        layout,
        caps,
        pv_ops,
        bug_func,
        nop_func,
    })
}

/// The `struct alt_instr` layout: from BTF when the guest has the type,
/// checked against what the flavour's rules read; the flavour's own
/// layout otherwise.
fn btf_layout(btf: &Btf, flavor: Flavor) -> Result<AltLayout, AltError> {
    let default = flavor.default_layout();
    if !btf.has_type("alt_instr") {
        return Ok(default);
    }
    let btf_err = |what: &'static str| move |source| AltError::Btf { what, source };
    let size = btf
        .struct_size("alt_instr")
        .map_err(btf_err("sizeof(struct alt_instr)"))?;
    let at = |path: &'static str| -> Result<usize, AltError> {
        let off = btf.offset_of(path).map_err(btf_err(path))?;
        usize::try_from(off).map_err(|_| AltError::Guest(format!("{path}: offset {off}")))
    };
    let feature_path = match flavor {
        Flavor::V6_1 => "alt_instr.cpuid",
        Flavor::V6_12 => "alt_instr.ft_flags",
    };
    let layout = AltLayout {
        size: usize::try_from(size).unwrap_or(usize::MAX),
        feature: at(feature_path)?,
        feature_size: default.feature_size,
        instrlen: at("alt_instr.instrlen")?,
        replacementlen: at("alt_instr.replacementlen")?,
    };
    let fits = |off: usize, len: usize| off.checked_add(len).is_some_and(|e| e <= layout.size);
    if at("alt_instr.instr_offset")? != 0
        || at("alt_instr.repl_offset")? != 4
        || !fits(layout.feature, layout.feature_size)
        || !fits(layout.instrlen, 1)
        || !fits(layout.replacementlen, 1)
        || layout.size > 64
    {
        return Err(AltError::Guest(format!(
            "struct alt_instr in the guest's BTF ({layout:?}) is not the layout of the {flavor:?} \
             rules"
        )));
    }
    Ok(layout)
}

/// One `struct alt_instr`, with addresses resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    instr: u64,
    repl: u64,
    /// Feature bit (flags removed).
    feature: u16,
    /// Patch when the feature is absent (`ALTINSTR_FLAG_INV`/`ALT_FLAG_NOT`).
    inverted: bool,
    direct_call: bool,
    instrlen: u8,
    replacementlen: u8,
}

/// The decoded table.
struct Table {
    entries: Vec<Entry>,
}

fn le_i32(b: &[u8], off: usize) -> Option<i32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decodes the linked table bytes at `va` by `cpu`'s rules.
fn read_table(bytes: &[u8], va: u64, cpu: &GuestCpu) -> Result<Table, AltError> {
    let l = cpu.layout;
    if l.size == 0 || bytes.len() % l.size != 0 {
        return Err(AltError::TableSize {
            size: bytes.len(),
            entry: l.size,
        });
    }
    let mut entries = Vec::with_capacity(bytes.len() / l.size);
    for (index, raw) in bytes.chunks_exact(l.size).enumerate() {
        let bad = |reason: &str| AltError::BadEntry {
            index,
            reason: reason.into(),
        };
        let field_va = |off: u64| {
            va.checked_add(u64::try_from(index * l.size).ok()?)?
                .checked_add(off)
        };
        let instr_off = le_i32(raw, 0).ok_or_else(|| bad("truncated"))?;
        let repl_off = le_i32(raw, 4).ok_or_else(|| bad("truncated"))?;
        let instr = field_va(0)
            .and_then(|a| a.checked_add_signed(i64::from(instr_off)))
            .ok_or_else(|| bad("instr_offset overflows"))?;
        let repl = field_va(4)
            .and_then(|a| a.checked_add_signed(i64::from(repl_off)))
            .ok_or_else(|| bad("repl_offset overflows"))?;
        let word = raw
            .get(l.feature..l.feature + l.feature_size)
            .ok_or_else(|| bad("truncated"))?;
        let (feature, inverted, direct_call) = match cpu.flavor {
            Flavor::V6_1 => {
                let cpuid = u16::from_le_bytes([word[0], word[1]]);
                (cpuid & !FLAG_INV_6_1, cpuid & FLAG_INV_6_1 != 0, false)
            }
            Flavor::V6_12 => {
                let ft = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                let flags = (ft >> 16) as u16;
                (
                    ft as u16,
                    flags & ALT_FLAG_NOT != 0,
                    flags & ALT_FLAG_DIRECT_CALL != 0,
                )
            }
        };
        entries.push(Entry {
            instr,
            repl,
            feature,
            inverted,
            direct_call,
            instrlen: *raw.get(l.instrlen).ok_or_else(|| bad("truncated"))?,
            replacementlen: *raw.get(l.replacementlen).ok_or_else(|| bad("truncated"))?,
        });
    }
    Ok(Table { entries })
}

/// Where linked code lives: the text image and the place of an address
/// in the module (for messages).
struct Code<'a> {
    /// For messages; unit tests run without a module.
    module: Option<&'a Module>,
    text_va: u64,
}

impl Code<'_> {
    fn range(&self, text: &[u8], va: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(va.checked_sub(self.text_va)?).ok()?;
        let end = start.checked_add(len)?;
        (end <= text.len()).then_some(start..end)
    }

    /// `function+0xoff` of a text address.
    fn describe(&self, va: u64) -> String {
        let Some(module) = self.module else {
            return format!("{va:#x}");
        };
        let place = module.sections.iter().find_map(|s| {
            let start = self.text_va.checked_add(s.offset)?;
            let off = va.checked_sub(start)?;
            (s.segment == Segment::Text && off < s.data.len() as u64).then_some(Place {
                section: s.elf_index,
                offset: off,
            })
        });
        match place {
            Some(p) => module.describe(p),
            None => format!("{va:#x} (outside the patch's code)"),
        }
    }
}

/// Applies every alternative of `module` to `linked`, for `cpu`. Called by
/// [`super::link`] after every relocation, as the kernel calls
/// `apply_alternatives` after `apply_relocate_add`.
pub fn apply(module: &Module, linked: &mut Linked, cpu: &GuestCpu) -> Result<(), AltError> {
    let Some(section) = table(module) else {
        return Ok(());
    };
    let va = linked
        .va(Place {
            section: section.elf_index,
            offset: 0,
        })
        .ok_or_else(|| AltError::Guest(format!("{TABLE} was not placed")))?;
    let bytes = linked
        .read(va, section.data.len() as u64)
        .ok_or_else(|| AltError::Guest(format!("{TABLE} lies outside its segment")))?
        .to_vec();
    let mut table = read_table(&bytes, va, cpu)?;
    let code = Code {
        module: Some(module),
        text_va: linked.text.va,
    };
    apply_table(&code, &mut linked.text.bytes, &mut table, cpu)?;
    // 6.12 writes the shared padding back into the table; keep the arena's
    // copy equal to what the kernel would leave.
    if cpu.flavor == Flavor::V6_12 {
        if let Some(start) = va
            .checked_sub(linked.rodata.va)
            .and_then(|o| usize::try_from(o).ok())
        {
            for (i, e) in table.entries.iter().enumerate() {
                let at = start + i * cpu.layout.size + cpu.layout.instrlen;
                if let Some(b) = linked.rodata.bytes.get_mut(at) {
                    *b = e.instrlen;
                }
            }
        }
    }
    Ok(())
}

/// The core, on a text image at `code.text_va`.
fn apply_table(
    code: &Code<'_>,
    text: &mut [u8],
    table: &mut Table,
    cpu: &GuestCpu,
) -> Result<(), AltError> {
    let n = table.entries.len();
    for i in 0..n {
        if cpu.flavor == Flavor::V6_12 {
            // Nested ALTERNATIVE_2 sites are consecutive entries for one
            // address: all get the longest padding (the kernel's loop).
            let mut j = i + 1;
            while j < n && table.entries[j].instr == table.entries[i].instr {
                let len = table.entries[i].instrlen.max(table.entries[j].instrlen);
                table.entries[i].instrlen = len;
                table.entries[j].instrlen = len;
                j += 1;
            }
        }
        let e = table.entries[i];
        let refuse = |reason: String| AltError::Refused {
            at: code.describe(e.instr),
            feature: format!(
                "{}{}*32+{}",
                if e.inverted { "!" } else { "" },
                e.feature / 32,
                e.feature % 32
            ),
            reason,
        };
        let instrlen = usize::from(e.instrlen);
        let repllen = usize::from(e.replacementlen);
        if instrlen > MAX_PATCH_LEN {
            return Err(refuse(format!(
                "the original is {instrlen} bytes, over the kernel's limit"
            )));
        }
        let site = code.range(text, e.instr, instrlen).ok_or_else(|| {
            refuse("the original instruction lies outside the patch's loaded code".into())
        })?;
        let repl_range = code
            .range(text, e.repl, repllen)
            .ok_or_else(|| refuse("the replacement lies outside the patch's loaded code".into()))?;
        let has = cpu.has(e.feature).ok_or_else(|| {
            refuse(format!(
                "feature word {} lies outside the guest's x86_capability ({} words): a patch \
                 built for another kernel?",
                e.feature / 32,
                cpu.caps.len()
            ))
        })?;
        let patch = has != e.inverted;
        let repl = text[repl_range].to_vec();
        let mut buf = text[site.clone()].to_vec();
        match cpu.flavor {
            Flavor::V6_1 => {
                if patch {
                    buf = replace_6_1(&e, &repl).map_err(refuse)?;
                }
                optimize_nops_6_1(&mut buf);
            }
            Flavor::V6_12 => {
                if patch {
                    buf = replace_6_12(&e, &buf, &repl, cpu).map_err(refuse)?;
                } else {
                    optimize_nops_6_12(&mut buf);
                }
            }
        }
        text[site].copy_from_slice(&buf);
    }
    Ok(())
}

/// Reads an x86 instruction at the start of `bytes`.
fn decode(bytes: &[u8]) -> Option<(Instruction, iced_x86::ConstantOffsets)> {
    let mut d = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return None;
    }
    let offsets = d.get_constant_offsets(&insn);
    Some((insn, offsets))
}

/// A relative field of an instruction: where it is, its width, its value.
#[derive(Debug, Clone, Copy)]
struct RelField {
    offset: usize,
    size: usize,
    value: i64,
}

fn read_signed(b: &[u8], offset: usize, size: usize) -> Option<i64> {
    let s = b.get(offset..offset.checked_add(size)?)?;
    Some(match size {
        1 => i64::from(s[0] as i8),
        2 => i64::from(i16::from_le_bytes([s[0], s[1]])),
        4 => i64::from(i32::from_le_bytes([s[0], s[1], s[2], s[3]])),
        _ => return None,
    })
}

fn write_signed(b: &mut [u8], f: RelField, value: i64) -> Result<(), String> {
    let fits = match f.size {
        1 => i8::try_from(value).is_ok(),
        2 => i16::try_from(value).is_ok(),
        4 => i32::try_from(value).is_ok(),
        _ => false,
    };
    let slot = b
        .get_mut(f.offset..f.offset + f.size)
        .filter(|_| fits)
        .ok_or_else(|| {
            format!(
                "a relative field of {} bytes cannot hold displacement {value:#x}",
                f.size
            )
        })?;
    slot.copy_from_slice(&value.to_le_bytes()[..f.size]);
    Ok(())
}

/// The relative fields of an instruction that points somewhere: the
/// branch displacement of a near call/jmp/Jcc (or other relative branch)
/// and the displacement of a RIP-relative memory operand. The bool is
/// whether the kernel's 6.12 `apply_relocation` handles that kind
/// (`call`, `jmp`, `Jcc`: yes; `loop`, `jrcxz`: no).
fn rel_fields(
    bytes: &[u8],
    insn: &Instruction,
    offsets: &iced_x86::ConstantOffsets,
) -> Vec<(RelField, bool)> {
    let mut out = Vec::new();
    let branch = (0..insn.op_count()).any(|i| {
        matches!(
            insn.op_kind(i),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
    });
    if branch && offsets.has_immediate() {
        let (offset, size) = (offsets.immediate_offset(), offsets.immediate_size());
        if let Some(value) = read_signed(bytes, offset, size) {
            let handled = matches!(
                opcode(bytes),
                (Some(0xe8 | 0xe9 | 0xeb | 0x70..=0x7f), _) | (Some(0x0f), Some(0x80..=0x8f))
            );
            out.push((
                RelField {
                    offset,
                    size,
                    value,
                },
                handled,
            ));
        }
    }
    if insn.is_ip_rel_memory_operand() && offsets.has_displacement() {
        let (offset, size) = (offsets.displacement_offset(), offsets.displacement_size());
        if let Some(value) = read_signed(bytes, offset, size) {
            out.push((
                RelField {
                    offset,
                    size,
                    value,
                },
                true,
            ));
        }
    }
    out
}

/// Whether a target at offset `target` from the start of a block of
/// `len` bytes lies outside it (the kernel's `need_reloc`: the end itself
/// counts as inside).
fn leaves(target: i64, len: usize) -> bool {
    target < 0 || target > len as i64
}

/// 6.1: the bytes to write over a site whose replacement is chosen.
fn replace_6_1(e: &Entry, repl: &[u8]) -> Result<Vec<u8>, String> {
    let instrlen = usize::from(e.instrlen);
    if repl.len() > instrlen {
        return Err(format!(
            "the replacement ({} bytes) is longer than the original ({instrlen} bytes)",
            repl.len()
        ));
    }
    // repl - instr, the distance the replacement moves.
    let delta = e.repl.wrapping_sub(e.instr) as i64;
    let mut buf = repl.to_vec();
    // What 6.1 fixes: a 5-byte call, and a 5-byte jmp at the start.
    let mut handled_first = false;
    if repl.len() == 5 && buf[0] == 0xe8 {
        // The kernel adds the distance whatever the target.
        let f = RelField {
            offset: 1,
            size: 4,
            value: read_signed(&buf, 1, 4).unwrap_or(0),
        };
        write_signed(&mut buf, f, f.value.wrapping_add(delta))?;
        handled_first = true;
    }
    if repl.len() == 5 && repl[0] == 0xeb {
        return Err(
            "a 5-byte replacement starting with a short jmp, which the 6.1 kernel's \
             recompute_jump misreads as a jmp rel32"
                .into(),
        );
    }
    if repl.len() == 5 && repl[0] == 0xe9 {
        // recompute_jump: the target stays, the jump may get shorter.
        let o_dspl = read_signed(repl, 1, 4).unwrap_or(0);
        let n_dspl = 5 + o_dspl + delta; // target - instr
        let short = if n_dspl >= 0 {
            n_dspl - 2 <= 127
        } else {
            ((n_dspl - 2) & 0xff) == (n_dspl - 2)
        };
        buf.clear();
        if short {
            buf.push(0xeb);
            buf.push((n_dspl - 2) as u8);
            buf.extend_from_slice(NOPS_6_1[2]);
        } else {
            let d = i32::try_from(n_dspl - 5)
                .map_err(|_| format!("the jump's target is {n_dspl:#x} bytes away"))?;
            buf.push(0xe9);
            buf.extend_from_slice(&d.to_le_bytes());
        }
        handled_first = true;
    }
    // Anything else relative that leaves the replacement would be copied
    // unchanged by 6.1 and point elsewhere: refuse it.
    let mut i = 0;
    while i < repl.len() {
        let (insn, offsets) = decode(&repl[i..])
            .ok_or_else(|| format!("cannot decode the replacement at +{i:#x}"))?;
        let len = insn.len();
        if !(i == 0 && handled_first) {
            for (f, _) in rel_fields(&repl[i..], &insn, &offsets) {
                let target = (i + len) as i64 + f.value;
                if leaves(target, repl.len()) {
                    return Err(format!(
                        "the replacement's instruction at +{i:#x} ({insn}) refers outside the \
                         replacement, which the 6.1 kernel does not relocate when copying it"
                    ));
                }
            }
        }
        i += len;
    }
    buf.resize(instrlen, 0x90);
    Ok(buf)
}

/// 6.1's `optimize_nops`: each run of two or more `0x90`s found at an
/// instruction boundary becomes the kernel's long nops.
fn optimize_nops_6_1(buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let Some((insn, _)) = decode(&buf[i..]) else {
            return;
        };
        if insn.len() == 1 && buf[i] == 0x90 {
            let run = buf[i..].iter().take_while(|&&b| b == 0x90).count();
            if run > 1 {
                add_nops(Flavor::V6_1, &mut buf[i..i + run]);
            }
            i += run;
        } else {
            i += insn.len();
        }
    }
}

/// `add_nops` (6.1) / the nop part of `add_nop` (6.12): fills `buf` with
/// the longest nops first.
fn add_nops(flavor: Flavor, buf: &mut [u8]) {
    let max = flavor.nop_max();
    for chunk in buf.chunks_mut(max) {
        chunk.copy_from_slice(flavor.nop(chunk.len()));
    }
}

/// 6.12's `add_nop`: one nop up to `ASM_NOP_MAX`, else a jump over int3s.
fn add_nop_6_12(buf: &mut [u8]) {
    let len = buf.len();
    if len == 0 {
        return;
    }
    if len <= Flavor::V6_12.nop_max() {
        buf.copy_from_slice(Flavor::V6_12.nop(len));
        return;
    }
    let skip = if len < 128 {
        buf[0] = 0xeb;
        buf[1] = (len - 2) as u8;
        2
    } else {
        buf[0] = 0xe9;
        buf[1..5].copy_from_slice(&((len - 5) as u32).to_le_bytes());
        5
    };
    buf[skip..].fill(0xcc);
}

/// The first legacy prefix and the opcode bytes (after prefixes and REX)
/// of the instruction starting `bytes`, as the kernel's decoder splits
/// them.
fn split(bytes: &[u8]) -> (Option<u8>, Option<u8>, Option<u8>) {
    let mut i = 0;
    let mut first_prefix = None;
    while let Some(&b) = bytes.get(i) {
        if matches!(
            b,
            0x66 | 0x67 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 | 0xf0 | 0xf2 | 0xf3
        ) {
            first_prefix.get_or_insert(b);
            i += 1;
        } else {
            break;
        }
    }
    if bytes.get(i).is_some_and(|b| (0x40..=0x4f).contains(b)) {
        i += 1;
    }
    (
        first_prefix,
        bytes.get(i).copied(),
        bytes.get(i + 1).copied(),
    )
}

/// The opcode bytes of the instruction starting `bytes`.
fn opcode(bytes: &[u8]) -> (Option<u8>, Option<u8>) {
    let (_, a, b) = split(bytes);
    (a, b)
}

/// 6.12's `insn_is_nop`: `nop` (any prefixes but a leading `rep`, which
/// makes it `pause`) and `nopl`.
fn is_nop_6_12(bytes: &[u8]) -> bool {
    match split(bytes) {
        (prefix, Some(0x90), _) => prefix != Some(0xf3),
        (_, Some(0x0f), Some(0x1f)) => true,
        _ => false,
    }
}

/// 6.12's `optimize_nops`: each run of nops becomes one nop (or a jump
/// over int3s), unless it is already a single nop ending the site.
fn optimize_nops_6_12(buf: &mut [u8]) {
    let len = buf.len();
    let mut i = 0;
    while i < len {
        let Some((insn, _)) = decode(&buf[i..]) else {
            return;
        };
        let mut next = i + insn.len();
        if is_nop_6_12(&buf[i..next]) {
            if next == len {
                return;
            }
            // skip_nops
            while next < len {
                let Some((n, _)) = decode(&buf[next..]) else {
                    break;
                };
                if !is_nop_6_12(&buf[next..next + n.len()]) {
                    break;
                }
                next += n.len();
            }
            let next = next.min(len);
            add_nop_6_12(&mut buf[i..next]);
            i = next;
            continue;
        }
        i = next;
    }
}

/// 6.12: the bytes to write over a site whose replacement is chosen.
fn replace_6_12(e: &Entry, orig: &[u8], repl: &[u8], cpu: &GuestCpu) -> Result<Vec<u8>, String> {
    let instrlen = usize::from(e.instrlen);
    if repl.len() > instrlen {
        return Err(format!(
            "the replacement ({} bytes) is longer than the original ({instrlen} bytes)",
            repl.len()
        ));
    }
    let mut buf = repl.to_vec();
    if e.direct_call {
        buf = direct_call(e, orig, buf, cpu)?;
    }
    buf.resize(instrlen, 0x90);
    apply_relocation(&mut buf, e)?;
    optimize_nops_6_12(&mut buf);
    Ok(buf)
}

/// `alt_replace_call`: a paravirt `call *slot(%rip)` whose replacement is
/// `call BUG_func` becomes `call <what the slot holds>` (nops for
/// `nop_func`). The slot is read from the guest's `pv_ops`.
fn direct_call(
    e: &Entry,
    orig: &[u8],
    mut buf: Vec<u8>,
    cpu: &GuestCpu,
) -> Result<Vec<u8>, String> {
    if buf.len() != 5 || buf[0] != 0xe8 {
        return Err("ALT_FLAG_DIRECT_CALL on a replacement that is not a 5-byte call".into());
    }
    if orig.len() != 6 || orig[0] != 0xff || orig[1] != 0x15 {
        return Err("ALT_FLAG_DIRECT_CALL on an original that is not `call *disp32(%rip)`".into());
    }
    let disp = read_signed(orig, 2, 4).unwrap_or(0);
    let slot = e.instr.wrapping_add(6).wrapping_add_signed(disp);
    let (base, bytes) = cpu.pv_ops.as_ref().ok_or(
        "ALT_FLAG_DIRECT_CALL needs the guest's pv_ops, which was not found (no `pv_ops` in \
         kallsyms or no struct paravirt_patch_template in BTF)",
    )?;
    let target = slot
        .checked_sub(*base)
        .and_then(|o| usize::try_from(o).ok())
        .and_then(|o| bytes.get(o..o.checked_add(8)?))
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .ok_or_else(|| {
            format!(
                "ALT_FLAG_DIRECT_CALL through {slot:#x}, which is not a slot of the guest's \
                 pv_ops"
            )
        })?;
    let bug = cpu
        .bug_func
        .ok_or("ALT_FLAG_DIRECT_CALL needs BUG_func, which kallsyms lacks")?;
    let target = if target == 0 { bug } else { target };
    if Some(target) == cpu.nop_func {
        return Ok(Vec::new());
    }
    // (BUG_func - .) + (target - BUG_func) = target - .
    let rel = read_signed(&buf, 1, 4).unwrap_or(0);
    let new = rel.wrapping_add(target.wrapping_sub(bug) as i64);
    let d = i32::try_from(new).map_err(|_| {
        format!("the paravirt target {target:#x} is out of reach of a call from the replacement")
    })?;
    buf[1..5].copy_from_slice(&d.to_le_bytes());
    Ok(buf)
}

/// 6.12's `__apply_relocation` over the padded buffer about to be written
/// at `e.instr`: every relative reference that leaves the replacement is
/// moved by `repl - instr`; a `jmp rel32` that now fits becomes `jmp
/// rel8` followed by int3s. Unlike the kernel (which warns and leaves the
/// rest), an undecodable byte or a relative form it does not handle
/// refuses the patch.
fn apply_relocation(buf: &mut [u8], e: &Entry) -> Result<(), String> {
    let delta = e.repl.wrapping_sub(e.instr) as i64;
    let repl_len = usize::from(e.replacementlen);
    let mut i = 0;
    while i < buf.len() {
        let (insn, offsets) =
            decode(&buf[i..]).ok_or_else(|| format!("cannot decode the replacement at +{i:#x}"))?;
        let next = i + insn.len();
        for (f, handled) in rel_fields(&buf[i..], &insn, &offsets) {
            let target = next as i64 + f.value;
            if !leaves(target, repl_len) {
                continue;
            }
            if !handled {
                return Err(format!(
                    "the replacement's instruction at +{i:#x} ({insn}) is a relative branch \
                     the kernel does not relocate"
                ));
            }
            let field = RelField {
                offset: i + f.offset,
                ..f
            };
            write_signed(buf, field, f.value.wrapping_add(delta))
                .map_err(|m| format!("the replacement's instruction at +{i:#x} ({insn}): {m}"))?;
            // JMP.d32 -> JMP.d8 where the moved target is in reach. Only
            // for jumps that leave the replacement: the kernel's formula
            // applies the move to internal jumps too, which would break
            // them; the assembler emits those as JMP.d8 anyway.
            if buf[i] == 0xe9 && insn.len() == 5 {
                let imm = f.value + delta + 3;
                if let Ok(short) = i8::try_from(imm) {
                    buf[i] = 0xeb;
                    buf[i + 1] = short as u8;
                    buf[i + 2..next].fill(0xcc);
                }
            }
        }
        i = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests;

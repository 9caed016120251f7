//! A livepatch module (.ko), parsed and checked for linking from outside
//! the guest.
//!
//! [`Module::parse`] takes the file bytes, the guest's BTF (for the klp
//! structure layouts) and the guest's kernel release, and either returns a
//! module ready for [`crate::link`] or an error a user can act on. Every
//! offset and size from the file is checked: no byte string makes it panic.
//!
//! Steps: the ELF file ([`elf`]), `.modinfo` and the release check
//! ([`modinfo`]), the `struct klp_patch` ([`klp`]), then each allocatable
//! section by the loader's rules ([`sections`]): code and data are kept
//! with their relocations; `__mcount_loc` gives the `call __fentry__` sites
//! the linker turns into nops (the kernel's ftrace does that at load);
//! `.return_sites` gives the `jmp __x86_return_thunk` sites the linker
//! points at the guest's return thunk (the kernel's `apply_returns` does).

pub mod elf;
pub mod inspect;
pub mod klp;
pub mod kpatch;
pub mod modinfo;
pub mod sections;
pub mod tables;

use std::collections::HashMap;

use object::elf as E;

pub use inspect::{inspect, Inspection, SectionReport, Verdict};
pub use klp::{Callbacks, CodeRef, Func, KlpLayouts, Object, Patch, State};
pub use modinfo::Modinfo;
pub use sections::{Policy, Segment};

use elf::{RawElf, RawSymbol, SHN_LIVEPATCH};
use klpvisor_guest::{Btf, BtfError};

/// A page of the arena.
pub const PAGE: u64 = 4096;
/// The most a patch may occupy (all segments); klp patches are kilobytes.
pub const MAX_MODULE_BYTES: u64 = 64 << 20;
/// The largest `.data..percpu` taken. The kernel allocates a module's
/// per-CPU block from the first chunk's reserved area
/// (`PERCPU_MODULE_RESERVE`: 8 KiB, or 64 KiB on 6.10+ with memory
/// allocation profiling), so it refuses anything larger with -ENOMEM
/// anyway; the bound keeps the copy to every CPU small.
pub const MAX_PERCPU_BYTES: u64 = 64 << 10;

/// Why a module cannot be linked from outside.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The file does not start with the ELF magic.
    #[error("not an ELF file (no \\x7fELF magic): a livepatch module is a .ko built by kbuild")]
    NotElf,
    /// An ELF file this parser cannot take as a module: 32-bit,
    /// big-endian, not relocatable, or with extended section indices.
    #[error("unsupported ELF file: {0}")]
    UnsupportedElf(String),
    /// Built for another architecture.
    #[error("the module is for {name} (ELF machine {machine}), but the guest kernel is x86-64")]
    WrongMachine {
        /// `e_machine`.
        machine: u16,
        /// Its usual name.
        name: &'static str,
    },
    /// A header, section or symbol runs out of the file or contradicts another.
    #[error("corrupt or truncated ELF file: {0}")]
    Corrupt(String),
    /// `.modinfo` has no `vermagic=`.
    #[error("the module has no vermagic in .modinfo: was it built by kbuild?")]
    NoVermagic,
    /// The vermagic's release is not the guest kernel's.
    #[error(
        "the module was built for kernel {module}, but the guest runs {guest}: rebuild it \
         against linux-headers-{guest}"
    )]
    ReleaseMismatch {
        /// The release in the module's vermagic.
        module: String,
        /// The guest kernel's release (`init_uts_ns`).
        guest: String,
    },
    /// Not a livepatch module; the message says what is missing.
    #[error("not a livepatch module: {0}")]
    NotLivepatch(String),
    /// More than one data object could be the `struct klp_patch`.
    #[error("the module has several struct klp_patch candidates: {0}")]
    SeveralPatches(String),
    /// The klp_patch, klp_object or klp_func data is inconsistent.
    #[error("malformed klp structures: {0}")]
    BadPatch(String),
    /// A kpatch-build module klpvisor cannot read as its patch hook would.
    #[error("kpatch-build module: {0}")]
    Kpatch(String),
    /// klp itself would refuse the patch (`klp_enable_patch`,
    /// `klp_init_object`, `klp_init_func`), for this object.
    #[error("object `{object}` of the patch: {refusal}")]
    KlpRefuses {
        /// The object's name (`vmlinux` for the kernel itself).
        object: String,
        /// What klp refuses and how to fix it.
        refusal: klp::Refusal,
    },
    /// The guest's BTF lacks a klp structure or member the parser reads.
    #[error("the guest's BTF lacks a klp structure layout: {0}")]
    KlpLayoutBtf(#[from] BtfError),
    /// A BTF file given for the klp layouts (`patcher info --btf`) does
    /// not parse.
    #[error("not a usable BTF file: {0}")]
    BadBtf(BtfError),
    /// The guest's BTF describes a klp member of an unexpected size.
    #[error("unexpected klp structure layout in the guest's BTF: {0}")]
    KlpLayout(String),
    /// A `.klp.rela.<module>` section uses a vmlinux `.klp.sym` symbol.
    #[error(
        "{section} refers to {symbol}: a module's .klp.rela section may only use that kind of \
         module's .klp.sym symbols, never vmlinux ones (klp_resolve_symbols refuses it too; use \
         an ordinary relocation for an exported vmlinux symbol)"
    )]
    KlpRelaVmlinuxSymbol {
        /// The `.klp.rela` section.
        section: String,
        /// The symbol it refers to.
        symbol: String,
    },
    /// A `.klp.rela` section uses a symbol that is not SHN_LIVEPATCH.
    #[error(
        "{section} refers to `{symbol}`, which is not a .klp.sym symbol (SHN_LIVEPATCH): klp \
         refuses such a relocation section"
    )]
    KlpRelaPlainSymbol {
        /// The `.klp.rela` section.
        section: String,
        /// The symbol it refers to.
        symbol: String,
    },
    /// Sections whose loader semantics klpvisor cannot reproduce, each
    /// with the reason.
    #[error(
        "the module has sections that cannot be honoured from outside the guest:\n{}",
        .0.iter().map(|(s, why)| format!("  {s}: {why}")).collect::<Vec<_>>().join("\n")
    )]
    UnsupportedSections(Vec<(String, String)>),
    /// A relocation type the kernel's module loader does not apply either.
    #[error("relocation type {r_type} ({name}) at {section}+{offset:#x} is not supported")]
    UnsupportedRelocation {
        /// `ELF64_R_TYPE`.
        r_type: u32,
        /// Its usual name.
        name: &'static str,
        /// The section patched.
        section: String,
        /// Offset in that section.
        offset: u64,
    },
    /// A relocation whose bytes lie past its section's end.
    #[error("a relocation at {section}+{offset:#x} lies outside its section ({size} bytes)")]
    RelocationOutOfBounds {
        /// The section patched.
        section: String,
        /// Offset in that section.
        offset: u64,
        /// The section's size.
        size: u64,
    },
    /// Loaded code or data refers to init or exit code or data.
    #[error(
        "{from} refers to {to} in {section}: init code and data run only at insmod and are \
         freed after it; klpvisor never runs module_init, so the patch must not use them"
    )]
    InitReferenced {
        /// Where the reference is (section+offset).
        from: String,
        /// The symbol or place referred to.
        to: String,
        /// The init or exit section it lies in.
        section: String,
    },
    /// Loaded code or data refers to a section that is not loaded.
    #[error("{from} refers to {to} in {section}, which is not loaded")]
    NotLoadedReferenced {
        /// Where the reference is (section+offset).
        from: String,
        /// The symbol or place referred to.
        to: String,
        /// The section it lies in.
        section: String,
    },
    /// A `.klp.sym` name that does not parse.
    #[error("malformed .klp.sym symbol `{0}` (expected .klp.sym.<object>.<name>,<sympos>)")]
    BadKlpSymbol(String),
    /// An `__mcount_loc` or `.return_sites` entry that does not point at
    /// the expected instruction.
    #[error("{0}")]
    BadSite(String),
    /// The patch has tables the guest finds only through a `struct module`,
    /// and the guest's BTF cannot describe one.
    #[error(
        "the patch has exception fixups, BUG/WARN sites or ORC data, which the guest kernel \
         finds only through a struct module, and klpvisor cannot build one for this guest: {0}"
    )]
    NeedsRegistration(String),
    /// An `__ex_table`, `__bug_table` or ORC entry is malformed.
    #[error("malformed module table: {0}")]
    BadTable(String),
    /// A section's alignment or size cannot be laid out in the arena.
    #[error("section layout: {0}")]
    Layout(String),
    /// A relocation inside `.data..percpu` (an initialiser that takes an
    /// address).
    #[error(
        "{at} is relocated (an initial value that takes an address): the kernel's module \
         loader copies .data..percpu to every CPU without applying its relocations, so the \
         variable would start with the wrong value; initialise it at run time instead"
    )]
    PerCpuRelocated {
        /// The place in `.data..percpu`.
        at: String,
    },
}

/// A module's per-CPU data (`.data..percpu`), as the kernel's loader
/// takes it: a block of `size` bytes aligned to `align` is allocated in
/// the guest, and `data` copied into every possible CPU's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerCpu {
    /// ELF section index.
    pub elf_index: usize,
    /// `sh_size`.
    pub size: u64,
    /// `sh_addralign`, at most a page (`percpu_modalloc` lowers a larger
    /// one to `PAGE_SIZE`, with a warning; so does klpvisor).
    pub align: u64,
    /// The initial bytes, unrelocated.
    pub data: Vec<u8>,
}

/// A place in the module: ELF section index and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Place {
    /// ELF section index.
    pub section: usize,
    /// Byte offset in that section.
    pub offset: u64,
}

/// A section copied into the arena.
#[derive(Debug, Clone)]
pub struct Section {
    /// The ELF section name.
    pub name: String,
    /// ELF section index ([`Place::section`]).
    pub elf_index: usize,
    /// The arena segment it goes to (text, rodata or data).
    pub segment: Segment,
    /// Offset within its segment (aligned as the section asks).
    pub offset: u64,
    /// The bytes before relocation (zeros for `.bss`).
    pub data: Vec<u8>,
}

/// What a module symbol stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymbolDef {
    /// In a loaded section.
    Defined(Place),
    /// `SHN_ABS`.
    Absolute(u64),
    /// Undefined: resolved against the guest's global symbols.
    Undefined,
    /// `.klp.sym.<object>.<name>,<sympos>`: resolved with klp's sympos rule.
    Klp {
        /// `vmlinux` or the module the symbol is in.
        object: String,
        /// The symbol's name there.
        name: String,
        /// klp's sympos (0: the name is unique).
        sympos: u32,
    },
    /// `__this_module`: NULL (the patch is not a guest module).
    ThisModule,
    /// In `.data..percpu`, at this offset: its value is the per-CPU
    /// block's address plus the offset (`simplify_symbols`).
    PerCpu(u64),
    /// In a section that is not loaded (never referenced by loaded code:
    /// parsing refuses that).
    NotLoaded,
}

/// A module symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// The ELF symbol name.
    pub name: String,
    /// STB_WEAK: an undefined weak symbol may resolve to 0.
    pub weak: bool,
    /// STT_FUNC or STT_OBJECT (named code or data), for messages.
    pub named: bool,
    /// `st_size` in bytes.
    pub size: u64,
    /// Where its value comes from.
    pub def: SymbolDef,
}

/// The relocation types a kernel module may use (arch/x86/kernel/module.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelocKind {
    /// S + A, 64 bits.
    Abs64,
    /// S + A - P, 32 bits signed.
    Pc32,
    /// Same as PC32 in the kernel (no PLT).
    Plt32,
    /// S + A, 32 bits zero-extended.
    Abs32,
    /// S + A, 32 bits sign-extended.
    Abs32S,
}

impl RelocKind {
    /// The kind of an ELF `R_X86_64_*` type; `None` for types the kernel's
    /// module loader does not handle either.
    pub fn from_elf(r_type: u32) -> Option<Self> {
        match r_type {
            E::R_X86_64_64 => Some(Self::Abs64),
            E::R_X86_64_PC32 => Some(Self::Pc32),
            E::R_X86_64_PLT32 => Some(Self::Plt32),
            E::R_X86_64_32 => Some(Self::Abs32),
            E::R_X86_64_32S => Some(Self::Abs32S),
            _ => None,
        }
    }

    /// Bytes written.
    pub fn width(self) -> u64 {
        match self {
            Self::Abs64 => 8,
            _ => 4,
        }
    }

    /// Whether the value is relative to the place patched (S + A - P).
    pub fn pc_relative(self) -> bool {
        matches!(self, Self::Pc32 | Self::Plt32)
    }
}

/// The usual name of an x86-64 relocation type, for messages.
fn reloc_name(r_type: u32) -> &'static str {
    match r_type {
        E::R_X86_64_NONE => "R_X86_64_NONE",
        E::R_X86_64_64 => "R_X86_64_64",
        E::R_X86_64_PC32 => "R_X86_64_PC32",
        E::R_X86_64_GOT32 => "R_X86_64_GOT32",
        E::R_X86_64_PLT32 => "R_X86_64_PLT32",
        E::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        E::R_X86_64_32 => "R_X86_64_32",
        E::R_X86_64_32S => "R_X86_64_32S",
        E::R_X86_64_16 => "R_X86_64_16",
        E::R_X86_64_PC16 => "R_X86_64_PC16",
        E::R_X86_64_8 => "R_X86_64_8",
        E::R_X86_64_PC8 => "R_X86_64_PC8",
        E::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        E::R_X86_64_PC64 => "R_X86_64_PC64",
        E::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        E::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        _ => "unknown",
    }
}

/// A relocation to apply when linking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloc {
    /// Where the value is written.
    pub place: Place,
    /// How it is computed and how wide it is.
    pub kind: RelocKind,
    /// Index into [`Module::symbols`].
    pub symbol: usize,
    /// `r_addend`.
    pub addend: i64,
    /// The kernel module this relocation belongs to (from a
    /// `.klp.rela.<module>.*` section, or against a `.klp.sym.<module>.*`
    /// symbol): applied only while that module is loaded, as klp applies
    /// it when the module's object is patched. `None`: always applied.
    pub object: Option<String>,
}

/// Segment sizes, page-rounded, known before any address is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of the text segment (executable, read-only once linked).
    pub text: u64,
    /// Bytes of the read-only data segment.
    pub rodata: u64,
    /// Bytes of the writable data segment (`.data`, `.bss`, ...).
    pub data: u64,
}

impl Layout {
    /// The size of `segment`.
    pub fn size(&self, segment: Segment) -> u64 {
        match segment {
            Segment::Text => self.text,
            Segment::Rodata => self.rodata,
            Segment::Data => self.data,
        }
    }

    /// Bytes of all three segments.
    pub fn total(&self) -> u64 {
        self.text + self.rodata + self.data
    }
}

/// A parsed, checked livepatch module.
#[derive(Debug, Clone)]
pub struct Module {
    /// What the module patches: its `struct klp_patch`, or what
    /// kpatch-build's `.kpatch.funcs` describe.
    pub patch: Patch,
    /// The kernel release in its vermagic (equal to the guest's; empty
    /// when parsed offline from a module without one).
    pub release: String,
    /// Loaded sections, in segment order.
    pub sections: Vec<Section>,
    /// The ELF symbol table (same indices).
    pub symbols: Vec<Symbol>,
    /// Relocations in loaded sections (without the fentry calls).
    pub relocs: Vec<Reloc>,
    /// `call __fentry__` sites (the 0xe8 byte), to become 5-byte nops.
    pub fentry_sites: Vec<Place>,
    /// Indices into `relocs` of the rel32 of each `jmp __x86_return_thunk`
    /// listed in `.return_sites`.
    pub return_jumps: Vec<usize>,
    /// Exception fixups, BUG/WARN sites and ORC data, for the guest
    /// kernel's registration of the patch ([`crate::register`]).
    pub tables: tables::Tables,
    /// What the module's init and exit code calls besides
    /// `klp_enable_patch` and the compiler's helpers: `("module_init",
    /// "`name`")`. klpvisor never runs either, so that work never happens
    /// in the guest (see `init_exit_calls`).
    pub init_exit_calls: Vec<(&'static str, String)>,
    /// Its per-CPU data, if `.data..percpu` is not empty.
    pub percpu: Option<PerCpu>,
    layout: Layout,
    /// ELF section index -> index into `sections`.
    by_elf: HashMap<usize, usize>,
}

impl Module {
    /// Parses and checks a livepatch module for the guest described by
    /// `btf` and `guest_release` (`uname -r` of the guest).
    pub fn parse(bytes: &[u8], btf: &Btf, guest_release: &str) -> Result<Self, ModuleError> {
        Self::parse_with(bytes, || KlpLayouts::from_btf(btf), Some(guest_release))
    }

    /// [`Self::parse`] with the structure layouts from `layouts` (called
    /// once the release is checked, so a module for another kernel is
    /// named as such first), and the release checked only when
    /// `guest_release` is given: offline inspection ([`inspect`]) runs
    /// every check that needs no guest.
    pub fn parse_with(
        bytes: &[u8],
        layouts: impl FnOnce() -> Result<KlpLayouts, ModuleError>,
        guest_release: Option<&str>,
    ) -> Result<Self, ModuleError> {
        Self::from_elf(RawElf::parse(bytes)?, layouts, guest_release)
    }

    /// [`Self::parse_with`] on a parsed ELF file.
    fn from_elf(
        elf: RawElf,
        layouts: impl FnOnce() -> Result<KlpLayouts, ModuleError>,
        guest_release: Option<&str>,
    ) -> Result<Self, ModuleError> {
        let modinfo = elf
            .section_by_name(".modinfo")
            .map(|(_, s)| Modinfo::parse(&s.data))
            .unwrap_or_default();
        let release = match guest_release {
            Some(guest) => {
                modinfo.check_release(guest)?;
                guest.to_owned()
            }
            None => modinfo.release().unwrap_or_default().to_owned(),
        };
        let layouts = layouts()?;
        let patch = klp::read_patch_with(&elf, &layouts, modinfo.livepatch(), modinfo.get("name"))?;

        let policies = section_policies(&elf);
        let policy_of = |i: usize| policies.get(i).copied().flatten();
        check_sections(&elf, &policies)?;

        let symbols = convert_symbols(&elf, &policies)?;
        let (sections, by_elf, layout) = lay_out(&elf, &policies)?;
        let percpu = per_cpu_section(&elf, &policies)?;

        let mut relocs = Vec::new();
        for r in &elf.relas {
            if policy_of(r.target) == Some(Policy::PerCpu) {
                return Err(ModuleError::PerCpuRelocated {
                    at: describe(
                        &elf,
                        Place {
                            section: r.target,
                            offset: r.offset,
                        },
                    ),
                });
            }
            let Some(Policy::Load(_)) = policy_of(r.target) else {
                continue;
            };
            let tsec = &elf.sections[r.target];
            // klp applies a `.klp.rela.<object>.*` section when it patches
            // <object> (klp_apply_section_relocs), with only `.klp.sym`
            // symbols, and a module's section never with vmlinux ones.
            let mut object = None;
            if r.klp {
                let rela_section = &elf.sections[r.rela_section].name;
                let o = rela_object(rela_section);
                let sym = &symbols[r.symbol];
                match &sym.def {
                    SymbolDef::Klp { object: so, .. } if so == "vmlinux" && o != "vmlinux" => {
                        return Err(ModuleError::KlpRelaVmlinuxSymbol {
                            section: rela_section.clone(),
                            symbol: sym.name.clone(),
                        })
                    }
                    SymbolDef::Klp { .. } => {}
                    _ if o != "vmlinux" => {
                        return Err(ModuleError::KlpRelaPlainSymbol {
                            section: rela_section.clone(),
                            symbol: sym.name.clone(),
                        })
                    }
                    _ => {}
                }
                if o != "vmlinux" {
                    object = Some(o.to_owned());
                }
            }
            let kind = RelocKind::from_elf(r.r_type).ok_or(ModuleError::UnsupportedRelocation {
                r_type: r.r_type,
                name: reloc_name(r.r_type),
                section: tsec.name.clone(),
                offset: r.offset,
            })?;
            if r.offset
                .checked_add(kind.width())
                .is_none_or(|e| e > tsec.size)
                || tsec.nobits()
            {
                return Err(ModuleError::RelocationOutOfBounds {
                    section: tsec.name.clone(),
                    offset: r.offset,
                    size: tsec.size,
                });
            }
            let place = Place {
                section: r.target,
                offset: r.offset,
            };
            let sym = &symbols[r.symbol];
            if sym.def == SymbolDef::NotLoaded && r.symbol != 0 {
                let raw = &elf.symbols[r.symbol];
                let sec = elf
                    .symbol_section(raw)
                    .map(|i| elf.sections[i].name.clone())
                    .unwrap_or_default();
                let from = describe(&elf, place);
                let to = symbol_target(&elf, raw, r.addend);
                return Err(
                    if policy_of_section(&policies, raw, &elf) == Some(Policy::InitExit) {
                        ModuleError::InitReferenced {
                            from,
                            to,
                            section: sec,
                        }
                    } else {
                        ModuleError::NotLoadedReferenced {
                            from,
                            to,
                            section: sec,
                        }
                    },
                );
            }
            // An empty .data..percpu gets no block (percpu_modalloc
            // allocates nothing): nothing may refer into it.
            if matches!(sym.def, SymbolDef::PerCpu(_)) && percpu.is_none() {
                return Err(ModuleError::Corrupt(format!(
                    "{} refers to {}, in an empty {}",
                    describe(&elf, place),
                    symbol_target(&elf, &elf.symbols[r.symbol], r.addend),
                    sections::PERCPU
                )));
            }
            // A `.klp.sym.<module>` symbol has a value only while that
            // module is loaded: so does any relocation against it.
            if let SymbolDef::Klp { object: so, .. } = &sym.def {
                if so != "vmlinux" && object.is_none() {
                    object = Some(so.clone());
                }
            }
            relocs.push(Reloc {
                place,
                kind,
                symbol: r.symbol,
                addend: r.addend,
                object,
            });
        }

        let mut module = Self {
            patch,
            release,
            sections,
            symbols,
            relocs,
            fentry_sites: Vec::new(),
            return_jumps: Vec::new(),
            tables: tables::parse(&elf, &policies, layouts.bug)?,
            init_exit_calls: init_exit_calls(&elf),
            percpu,
            layout,
            by_elf,
        };
        module.find_fentry_sites(&elf, &policies)?;
        module.find_return_sites(&elf, &policies)?;
        Ok(module)
    }

    /// Segment sizes: allocate this much (page-aligned) before linking.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The loaded section with ELF index `elf_index`.
    pub fn section(&self, elf_index: usize) -> Option<&Section> {
        self.sections.get(*self.by_elf.get(&elf_index)?)
    }

    /// Bytes of a loaded section at `place`, before relocation.
    pub fn bytes_at(&self, place: Place, len: u64) -> Option<&[u8]> {
        let s = self.section(place.section)?;
        let start = usize::try_from(place.offset).ok()?;
        s.data
            .get(start..start.checked_add(usize::try_from(len).ok()?)?)
    }

    /// "function+0xoff" (or "section+0xoff") for a place, for messages.
    pub fn describe(&self, p: Place) -> String {
        let containing = self
            .symbols
            .iter()
            .filter(|s| s.named)
            .filter_map(|s| match s.def {
                SymbolDef::Defined(d) if d.section == p.section => Some((s, d.offset)),
                _ => None,
            })
            .find(|(s, start)| {
                *start <= p.offset && p.offset < start.saturating_add(s.size.max(1))
            });
        match containing {
            Some((s, start)) => format!("{}+{:#x}", s.name, p.offset - start),
            None => format!(
                "{}+{:#x}",
                self.section(p.section)
                    .map(|s| s.name.as_str())
                    .unwrap_or("?"),
                p.offset
            ),
        }
    }

    /// Relocation index by place (a module may have many relocations).
    fn reloc_index(&self) -> HashMap<Place, usize> {
        self.relocs
            .iter()
            .enumerate()
            .map(|(i, r)| (r.place, i))
            .collect()
    }

    /// Reads `__mcount_loc`: one R_X86_64_64 per `call __fentry__` site.
    /// Each site must be an `e8` call whose rel32 is relocated against
    /// `__fentry__`; that relocation is dropped and the linker writes the
    /// 5-byte nop the kernel's ftrace writes at module load.
    fn find_fentry_sites(
        &mut self,
        elf: &RawElf,
        policies: &[Option<Policy>],
    ) -> Result<(), ModuleError> {
        let Some((index, _)) = elf.section_by_name("__mcount_loc") else {
            return Ok(());
        };
        let mut drop = Vec::new();
        let at = self.reloc_index();
        for r in elf.relas.iter().filter(|r| r.target == index) {
            if r.r_type != E::R_X86_64_64 {
                return Err(ModuleError::BadSite(format!(
                    "__mcount_loc+{:#x}: relocation type {} instead of R_X86_64_64",
                    r.offset, r.r_type
                )));
            }
            let Some(site) = site_of(elf, policies, r)? else {
                continue; // in init code, which is not loaded
            };
            let call = self
                .bytes_at(site, 5)
                .filter(|b| b.first() == Some(&0xe8))
                .is_some();
            let rel = at
                .get(&Place {
                    offset: site.offset.saturating_add(1),
                    ..site
                })
                .copied();
            let fentry = rel.filter(|&i| {
                let r = &self.relocs[i];
                r.kind.pc_relative()
                    && r.addend == -4
                    && self.symbols[r.symbol].name == "__fentry__"
            });
            match (call, fentry) {
                (true, Some(i)) => {
                    drop.push(i);
                    self.fentry_sites.push(site);
                }
                _ => {
                    return Err(ModuleError::BadSite(format!(
                        "__mcount_loc lists {}, which is not a `call __fentry__`",
                        describe(elf, site)
                    )))
                }
            }
        }
        drop.sort_unstable();
        for i in drop.into_iter().rev() {
            self.relocs.remove(i);
        }
        self.fentry_sites.sort_unstable();
        Ok(())
    }

    /// Reads `.return_sites`: one R_X86_64_PC32 per `jmp __x86_return_thunk`
    /// (gcc's -mfunction-return=thunk-extern). The kernel's apply_returns
    /// points each at the return thunk the guest chose (x86_return_thunk);
    /// the linker does the same when told the guest's thunk.
    fn find_return_sites(
        &mut self,
        elf: &RawElf,
        policies: &[Option<Policy>],
    ) -> Result<(), ModuleError> {
        let Some((index, _)) = elf.section_by_name(".return_sites") else {
            return Ok(());
        };
        let at = self.reloc_index();
        for r in elf.relas.iter().filter(|r| r.target == index) {
            if r.r_type != E::R_X86_64_PC32 {
                return Err(ModuleError::BadSite(format!(
                    ".return_sites+{:#x}: relocation type {} instead of R_X86_64_PC32",
                    r.offset, r.r_type
                )));
            }
            let Some(site) = site_of(elf, policies, r)? else {
                continue;
            };
            let jmp = self
                .bytes_at(site, 5)
                .filter(|b| b.first() == Some(&0xe9))
                .is_some();
            let rel = at
                .get(&Place {
                    offset: site.offset.saturating_add(1),
                    ..site
                })
                .copied()
                .filter(|&i| {
                    let r = &self.relocs[i];
                    r.kind.pc_relative()
                        && r.addend == -4
                        && self.symbols[r.symbol].name == "__x86_return_thunk"
                });
            match (jmp, rel) {
                (true, Some(i)) => self.return_jumps.push(i),
                _ => {
                    return Err(ModuleError::BadSite(format!(
                        ".return_sites lists {}, which is not a `jmp __x86_return_thunk`",
                        describe(elf, site)
                    )))
                }
            }
        }
        self.return_jumps.sort_unstable();
        Ok(())
    }
}

/// The place a metadata relocation points at: `None` if it is in code
/// that is not loaded (init/exit), an error if it is anywhere else.
fn site_of(
    elf: &RawElf,
    policies: &[Option<Policy>],
    r: &elf::RawRela,
) -> Result<Option<Place>, ModuleError> {
    let raw = &elf.symbols[r.symbol];
    let sec = elf.symbol_section(raw);
    let policy = sec.and_then(|i| policies.get(i).copied().flatten());
    match policy {
        Some(Policy::Load(Segment::Text)) => {
            let offset = raw.value.checked_add_signed(r.addend).ok_or_else(|| {
                ModuleError::BadSite(format!("{}{:+}: offset overflows", raw.name, r.addend))
            })?;
            Ok(sec.map(|section| Place { section, offset }))
        }
        Some(Policy::InitExit) => Ok(None),
        _ => Err(ModuleError::BadSite(format!(
            "{} lists a site in {}, which is not loaded code",
            elf.sections
                .get(r.target)
                .map(|s| s.name.as_str())
                .unwrap_or("?"),
            symbol_target(elf, raw, r.addend)
        ))),
    }
}

/// Each section's policy ([`sections::policy`]); `None` for sections that
/// are not allocatable (symbols, relocations, debug info: never loaded).
fn section_policies(elf: &RawElf) -> Vec<Option<Policy>> {
    elf.sections
        .iter()
        .map(|s| {
            s.alloc()
                .then(|| sections::policy(&s.name, s.write(), s.exec()))
        })
        .collect()
}

fn policy_of_section(policies: &[Option<Policy>], raw: &RawSymbol, elf: &RawElf) -> Option<Policy> {
    policies.get(elf.symbol_section(raw)?).copied().flatten()
}

/// Refuses every non-empty section the loader would need to register.
fn check_sections(elf: &RawElf, policies: &[Option<Policy>]) -> Result<(), ModuleError> {
    let refused: Vec<(String, String)> = section_refusals(elf, policies)
        .into_iter()
        .map(|(i, why)| (elf.sections[i].name.clone(), why))
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(ModuleError::UnsupportedSections(refused))
    }
}

/// Each section that cannot be honoured from outside (by ELF index), with
/// the reason, what the patch defines there and where its code uses it:
/// shared by parsing (which refuses the module) and inspection (which
/// shows every section's verdict).
fn section_refusals(elf: &RawElf, policies: &[Option<Policy>]) -> Vec<(usize, String)> {
    let mut refused = Vec::new();
    for (i, (s, p)) in elf.sections.iter().zip(policies).enumerate() {
        match p {
            Some(Policy::Refuse(why)) if s.size > 0 => {
                // Name what the patch defines there (per-CPU variables,
                // exported symbols), so the user knows what to change.
                let mut names: Vec<&str> = elf
                    .symbols
                    .iter()
                    .filter(|sym| {
                        elf.symbol_section(sym) == Some(i)
                            && matches!(sym.kind, E::STT_FUNC | E::STT_OBJECT)
                    })
                    .map(|sym| sym.name.as_str())
                    .collect();
                names.sort_unstable();
                names.dedup();
                // Name where the patch's code uses it: the code each entry
                // points at (a static key's branch, a call site), as
                // function+offset.
                let mut uses: Vec<String> = elf
                    .relas
                    .iter()
                    .filter(|r| r.target == i)
                    .filter_map(|r| {
                        let raw = elf.symbols.get(r.symbol)?;
                        let sec = elf.symbol_section(raw)?;
                        if !elf.sections.get(sec)?.exec() {
                            return None;
                        }
                        let offset = raw.value.checked_add_signed(r.addend)?;
                        Some(describe(
                            elf,
                            Place {
                                section: sec,
                                offset,
                            },
                        ))
                    })
                    .collect();
                uses.sort_unstable();
                uses.dedup();
                let mut why = (*why).to_owned();
                if !names.is_empty() {
                    why = format!("{why} (defines {})", names.join(", "));
                }
                if !uses.is_empty() {
                    let shown: Vec<&str> = uses.iter().take(4).map(String::as_str).collect();
                    let more = uses.len().saturating_sub(shown.len());
                    why = format!(
                        "{why}; used at {}{}",
                        shown.join(", "),
                        if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        }
                    );
                }
                refused.push((i, why))
            }
            Some(Policy::Unknown) if s.size > 0 => refused.push((
                i,
                "unknown allocatable section: klpvisor cannot tell whether the kernel's module \
                 loader would process it"
                    .to_owned(),
            )),
            _ => {}
        }
    }
    refused
}

/// Parses `.klp.sym.<object>.<name>,<sympos>` (klp_resolve_symbols' format:
/// the object name has no '.', the symbol name no ',').
pub fn parse_klp_sym(name: &str) -> Option<(&str, &str, u32)> {
    let rest = name.strip_prefix(".klp.sym.")?;
    let (object, rest) = rest.split_once('.')?;
    let (sym, pos) = rest.rsplit_once(',')?;
    if object.is_empty() || sym.is_empty() {
        return None;
    }
    Some((object, sym, pos.parse().ok()?))
}

/// The object name of a `.klp.rela.<object>.<section>` section.
fn rela_object(section: &str) -> &str {
    section
        .strip_prefix(".klp.rela.")
        .and_then(|r| r.split_once('.'))
        .map(|(o, _)| o)
        .unwrap_or("")
}

fn convert_symbols(elf: &RawElf, policies: &[Option<Policy>]) -> Result<Vec<Symbol>, ModuleError> {
    elf.symbols
        .iter()
        .map(|s| {
            let def = if s.name.starts_with(".klp.sym.") {
                let (object, name, sympos) = parse_klp_sym(&s.name)
                    .ok_or_else(|| ModuleError::BadKlpSymbol(s.name.clone()))?;
                SymbolDef::Klp {
                    object: object.to_owned(),
                    name: name.to_owned(),
                    sympos,
                }
            } else if s.shndx == E::SHN_UNDEF {
                SymbolDef::Undefined
            } else if s.shndx == E::SHN_ABS {
                SymbolDef::Absolute(s.value)
            } else if s.shndx == SHN_LIVEPATCH {
                return Err(ModuleError::BadKlpSymbol(s.name.clone()));
            } else if s.shndx == E::SHN_COMMON {
                return Err(ModuleError::UnsupportedElf(format!(
                    "common symbol `{}` (kbuild builds with -fno-common)",
                    s.name
                )));
            } else {
                let i = elf.symbol_section(s).ok_or_else(|| {
                    ModuleError::Corrupt(format!(
                        "symbol `{}` is in section {}, which does not exist",
                        s.name, s.shndx
                    ))
                })?;
                match policies.get(i).copied().flatten() {
                    Some(Policy::Load(_)) => SymbolDef::Defined(Place {
                        section: i,
                        offset: s.value,
                    }),
                    // A section symbol or a variable: an offset into the
                    // section (its end included, for a zero-sized one).
                    Some(Policy::PerCpu) if s.value <= elf.sections[i].size => {
                        SymbolDef::PerCpu(s.value)
                    }
                    Some(Policy::PerCpu) => {
                        return Err(ModuleError::Corrupt(format!(
                            "per-CPU symbol `{}` at {:#x} lies past the end of {} ({} bytes)",
                            s.name, s.value, elf.sections[i].name, elf.sections[i].size
                        )))
                    }
                    _ if elf.sections[i].name == sections::THIS_MODULE => SymbolDef::ThisModule,
                    _ => SymbolDef::NotLoaded,
                }
            };
            Ok(Symbol {
                name: s.name.clone(),
                weak: s.weak(),
                named: matches!(s.kind, E::STT_FUNC | E::STT_OBJECT),
                size: s.size,
                def,
            })
        })
        .collect()
}

/// The module's `.data..percpu`, as `percpu_modalloc` sizes it: `None`
/// when it is absent or empty (the loader allocates nothing then).
fn per_cpu_section(
    elf: &RawElf,
    policies: &[Option<Policy>],
) -> Result<Option<PerCpu>, ModuleError> {
    let Some((i, s)) = elf
        .sections
        .iter()
        .enumerate()
        .find(|(i, _)| policies.get(*i).copied().flatten() == Some(Policy::PerCpu))
    else {
        return Ok(None);
    };
    if s.size == 0 {
        return Ok(None);
    }
    if s.size > MAX_PERCPU_BYTES {
        return Err(ModuleError::Layout(format!(
            "{} is {} bytes: more than the {MAX_PERCPU_BYTES} bytes of per-CPU data klpvisor \
             takes (the kernel reserves 8 KiB, at most 64 KiB, for all modules' per-CPU data)",
            s.name, s.size
        )));
    }
    // sh_addralign 0 means no constraint; not a power of two is corrupt.
    let align = s.align.max(1);
    if !align.is_power_of_two() {
        return Err(ModuleError::Layout(format!(
            "{} asks for alignment {}, not a power of two",
            s.name, s.align
        )));
    }
    let data = if s.nobits() {
        vec![0; usize::try_from(s.size).unwrap_or(0)]
    } else {
        s.data.clone()
    };
    if data.len() as u64 != s.size {
        return Err(ModuleError::Corrupt(format!(
            "{} holds {} bytes, its header says {}",
            s.name,
            data.len(),
            s.size
        )));
    }
    Ok(Some(PerCpu {
        elf_index: i,
        size: s.size,
        align: align.min(PAGE),
        data,
    }))
}

/// Places every loaded section in its segment and copies its bytes.
#[allow(clippy::type_complexity)]
fn lay_out(
    elf: &RawElf,
    policies: &[Option<Policy>],
) -> Result<(Vec<Section>, HashMap<usize, usize>, Layout), ModuleError> {
    let mut sections = Vec::new();
    let mut by_elf = HashMap::new();
    let mut layout = Layout::default();
    let mut total = 0u64;
    for segment in [Segment::Text, Segment::Rodata, Segment::Data] {
        let mut cursor = 0u64;
        for (i, s) in elf.sections.iter().enumerate() {
            if policies.get(i).copied().flatten() != Some(Policy::Load(segment)) {
                continue;
            }
            if !s.align.is_power_of_two() || s.align > PAGE {
                return Err(ModuleError::Layout(format!(
                    "{} asks for alignment {}; at most {PAGE} (a power of two) is supported",
                    s.name, s.align
                )));
            }
            let offset = cursor.next_multiple_of(s.align);
            cursor = offset
                .checked_add(s.size)
                .filter(|&c| total.saturating_add(c) <= MAX_MODULE_BYTES)
                .ok_or_else(|| {
                    ModuleError::Layout(format!(
                        "{} is {} bytes: the patch would exceed {MAX_MODULE_BYTES} bytes",
                        s.name, s.size
                    ))
                })?;
            let data = if s.nobits() {
                vec![0; usize::try_from(s.size).unwrap_or(0)]
            } else {
                s.data.clone()
            };
            by_elf.insert(i, sections.len());
            sections.push(Section {
                name: s.name.clone(),
                elf_index: i,
                segment,
                offset,
                data,
            });
        }
        let size = cursor.next_multiple_of(PAGE);
        total += size;
        match segment {
            Segment::Text => layout.text = size,
            Segment::Rodata => layout.rodata = size,
            Segment::Data => layout.data = size,
        }
    }
    Ok((sections, by_elf, layout))
}

/// "function+0xoff" (or "section+0xoff") for a place, for messages.
pub(crate) fn describe(elf: &RawElf, p: Place) -> String {
    let containing = elf
        .symbols
        .iter()
        .filter(|s| {
            elf.symbol_section(s) == Some(p.section)
                && matches!(s.kind, E::STT_FUNC | E::STT_OBJECT)
                && s.value <= p.offset
                && p.offset < s.value.saturating_add(s.size.max(1))
        })
        .min_by_key(|s| (s.local(), s.name.len()));
    match containing {
        Some(s) => format!("{}+{:#x}", s.name, p.offset - s.value),
        None => format!(
            "{}+{:#x}",
            elf.sections
                .get(p.section)
                .map(|s| s.name.as_str())
                .unwrap_or("?"),
            p.offset
        ),
    }
}

/// What a relocation against `raw` + `addend` points at, for messages.
/// Calls a module's `module_init` and `module_exit` functions make (the
/// `init_module` and `cleanup_module` aliases `module_init()` and
/// `module_exit()` define), following calls into the module's own
/// functions: each `call` or `jmp` whose target is a relocation, other than
/// `klp_enable_patch`, ftrace's `__fentry__` and the compiler's thunks and
/// checks. A livepatch's init should do nothing but `klp_enable_patch`
/// (cumulative-patches.rst: a downgrade is safe only if `module_init()` and
/// `module_exit()` make no extra modifications): here neither ever runs,
/// so whatever else they would do never happens. A call the assembler
/// resolved within one section has no relocation and is not seen.
fn init_exit_calls(elf: &RawElf) -> Vec<(&'static str, String)> {
    const PLUMBING: [&str; 4] = [
        "klp_enable_patch",
        "__fentry__",
        "__x86_return_thunk",
        "__stack_chk_fail",
    ];
    /// How deep calls into the module's own functions are followed.
    const DEPTH: usize = 4;
    let defined = |name: &str| {
        elf.symbols.iter().find_map(|sym| {
            let section = elf.symbol_section(sym)?;
            (sym.name == name && sym.kind == E::STT_FUNC)
                .then_some((section, sym.value..sym.value.saturating_add(sym.size)))
        })
    };
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for (what, alias) in [
        ("module_init", "init_module"),
        ("module_exit", "cleanup_module"),
    ] {
        let Some(start) = defined(alias) else {
            continue;
        };
        let mut todo = vec![(start, 0usize)];
        let mut seen = vec![todo[0].0.clone()];
        while let Some(((section, range), depth)) = todo.pop() {
            let Some(data) = elf.sections.get(section).map(|s| &s.data) else {
                continue;
            };
            for r in &elf.relas {
                if r.target != section
                    || !range.contains(&r.offset)
                    || r.klp
                    || !matches!(r.r_type, E::R_X86_64_PLT32 | E::R_X86_64_PC32)
                {
                    continue;
                }
                // A rel32 right after a call (e8) or jmp (e9) opcode.
                let opcode = usize::try_from(r.offset)
                    .ok()
                    .and_then(|o| o.checked_sub(1))
                    .and_then(|o| data.get(o));
                if !matches!(opcode, Some(0xe8 | 0xe9)) {
                    continue;
                }
                let Some(raw) = elf.symbols.get(r.symbol) else {
                    continue;
                };
                if PLUMBING.contains(&raw.name.as_str())
                    || raw.name.starts_with("__x86_indirect_thunk_")
                    || raw.name.starts_with("__sanitizer_cov_")
                {
                    continue;
                }
                // The module's own function: what it calls counts.
                let own = elf.symbol_section(raw).and_then(|s| {
                    let at = raw.value.checked_add_signed(r.addend.saturating_add(4))?;
                    let f = elf.symbols.iter().find(|f| {
                        f.kind == E::STT_FUNC
                            && elf.symbol_section(f) == Some(s)
                            && (f.value..f.value.saturating_add(f.size)).contains(&at)
                    })?;
                    Some((s, f.value..f.value.saturating_add(f.size)))
                });
                match own {
                    Some(f) if depth < DEPTH => {
                        if !seen.contains(&f) {
                            seen.push(f.clone());
                            todo.push((f, depth + 1));
                        }
                    }
                    _ => {
                        // A call's rel32 is relative to the instruction's end.
                        let callee = symbol_target(elf, raw, r.addend.saturating_add(4));
                        if !out.iter().any(|(w, c)| *w == what && *c == callee) {
                            out.push((what, callee));
                        }
                    }
                }
            }
        }
    }
    out
}

fn symbol_target(elf: &RawElf, raw: &RawSymbol, addend: i64) -> String {
    if raw.kind == E::STT_SECTION {
        if let (Some(section), Some(offset)) = (
            elf.symbol_section(raw),
            raw.value.checked_add_signed(addend),
        ) {
            return format!("`{}`", describe(elf, Place { section, offset }));
        }
    }
    format!("`{}`", raw.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klp_sym_names() {
        assert_eq!(
            parse_klp_sym(".klp.sym.vmlinux.version_show,2"),
            Some(("vmlinux", "version_show", 2))
        );
        assert_eq!(
            parse_klp_sym(".klp.sym.vmlinux.sk_drops_add.isra.0,0"),
            Some(("vmlinux", "sk_drops_add.isra.0", 0))
        );
        assert_eq!(
            parse_klp_sym(".klp.sym.ext4.a,b,1"),
            Some(("ext4", "a,b", 1))
        );
        assert_eq!(parse_klp_sym(".klp.sym.vmlinux.x"), None);
        assert_eq!(parse_klp_sym(".klp.sym.vmlinux.x,-1"), None);
        assert_eq!(parse_klp_sym(".klp.sym..x,1"), None);
        assert_eq!(rela_object(".klp.rela.vmlinux..text"), "vmlinux");
        assert_eq!(rela_object(".klp.rela.ext4.text"), "ext4");
    }

    /// The fuzz target's seed (see module::inspect's tests).
    const SEED: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/seeds/module/livepatch.ko"
    ));

    /// The seed with its `.bss` (4 bytes, which `.text` reaches through
    /// the section symbol at offsets 7, 0x17 and 0x4b) made the module's
    /// `.data..percpu`, its references to it of relocation type `r_type`.
    fn per_cpu_seed(r_type: u32) -> RawElf {
        let mut elf = RawElf::parse(SEED).unwrap();
        let (bss, _) = elf.section_by_name(".bss").unwrap();
        elf.sections[bss].name = sections::PERCPU.to_owned();
        for r in elf.relas.iter_mut() {
            if elf.symbols[r.symbol].shndx as usize == bss {
                r.r_type = r_type;
            }
        }
        elf
    }

    fn parse_elf(elf: RawElf) -> Result<Module, ModuleError> {
        Module::from_elf(elf, || Ok(KlpLayouts::builtin()), None)
    }

    #[test]
    fn per_cpu_symbols_are_offsets_into_the_block() {
        let m = parse_elf(per_cpu_seed(E::R_X86_64_32S)).unwrap();
        let pc = m.percpu.clone().unwrap();
        assert_eq!((pc.size, pc.align, pc.data), (4, 4, vec![0; 4]));
        // Not loaded into the arena: no segment holds it.
        assert!(m.section(pc.elf_index).is_none());
        let section_sym = m
            .symbols
            .iter()
            .position(|s| s.def == SymbolDef::PerCpu(0))
            .expect("the section's symbol is per-CPU");
        // Linked, each reference is the block's address plus its addend,
        // as simplify_symbols adds mod->percpu to the symbol.
        let linked = link_seed(&m, 0x3_1000).unwrap();
        assert_eq!(linked.symbol_value(&m, section_sym), Some(0x3_1000));
        assert_eq!(linked.percpu(), 0x3_1000);
        for (offset, addend) in SEED_PERCPU_REFS {
            let (_, field) = seed_field(&m, &linked, offset);
            assert_eq!(i64::from(field), 0x3_1000 + addend, "at .text+{offset:#x}");
        }
    }

    /// Where the seed's `.text` reaches its `.bss`, and the addends.
    const SEED_PERCPU_REFS: [(u64, i64); 3] = [(7, -4), (0x17, -8), (0x4b, -5)];

    /// The address and the linked 32-bit value of the field at `.text+offset`.
    fn seed_field(m: &Module, linked: &crate::link::Linked, offset: u64) -> (u64, i32) {
        let text = m.sections.iter().find(|s| s.name == ".text").unwrap();
        let va = linked
            .va(Place {
                section: text.elf_index,
                offset,
            })
            .unwrap();
        let field = linked.read(va, 4).unwrap();
        (va, i32::from_le_bytes(field.try_into().unwrap()))
    }

    /// Links the seed at the arena's usual place, its per-CPU block at
    /// `percpu`.
    fn link_seed(m: &Module, percpu: u64) -> Result<crate::link::Linked, crate::link::LinkError> {
        use klpvisor_guest::kallsyms::synth::{sample_symbols, Builder, BASE};
        use klpvisor_guest::kallsyms::{Image, Layout};
        let mut syms = sample_symbols(0);
        // The seed patches the second of two `dup_fn`s (sympos 2).
        let names = [
            ('T', "seq_printf"),
            ('T', "cmdline_proc_show"),
            ('t', "dup_fn"),
            ('t', "dup_fn"),
            ('T', "__x86_return_thunk"),
        ];
        for (i, (k, n)) in names.iter().enumerate() {
            syms.push((*k, (*n).to_owned(), 0xffff_ffff_8100_2000 + i as u64 * 0x10));
        }
        let bytes = Builder::new(Layout::OffsetsFirst, syms).build();
        let kallsyms = klpvisor_guest::Kallsyms::from_image(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap();
        let l = m.layout();
        let text = 0xffff_ffff_c000_0000;
        let bases = crate::link::Bases {
            text,
            rodata: text + l.text,
            data: text + l.text + l.rodata,
            percpu,
        };
        crate::link::link(m, &kallsyms, bases, &Default::default())
    }

    #[test]
    fn a_pc_relative_per_cpu_reference_reaches_the_offset_or_is_refused() {
        // gcc compiles this_cpu_inc(var) to `incq %gs:var(%rip)`, an
        // R_X86_64_PC32 against the per-CPU symbol. The kernel's loader
        // applies it as S + A - P: with per-CPU addresses small offsets
        // and patch code in the top 2 GiB, the 64-bit sum rip + rel32
        // wraps to exactly the per-CPU offset, which %gs then bases.
        let m = parse_elf(per_cpu_seed(E::R_X86_64_PC32)).unwrap();
        let linked = link_seed(&m, 0x3_1000).unwrap();
        for (offset, addend) in SEED_PERCPU_REFS {
            let (va, rel) = seed_field(&m, &linked, offset);
            // rip + rel32, rip being the end of the field: the variable
            // plus what the addend asks beyond the field's end.
            let effective = va.wrapping_add(4).wrapping_add(rel as i64 as u64);
            assert_eq!(
                effective as i64,
                0x3_1000 + addend + 4,
                "at .text+{offset:#x}"
            );
        }
        // A block out of rel32 reach of the code (per-CPU addresses that
        // are not small offsets) is refused, never mislinked.
        let e = link_seed(&m, 0x0000_7000_0000_0000).unwrap_err();
        assert!(
            matches!(&e, crate::link::LinkError::PerCpuOutOfReach { .. }),
            "{e}"
        );
        assert!(e.to_string().contains(".data..percpu"), "{e}");
    }
    #[test]
    fn a_relocation_inside_per_cpu_data_is_refused() {
        let mut elf = per_cpu_seed(E::R_X86_64_32S);
        let (percpu, _) = elf.section_by_name(sections::PERCPU).unwrap();
        let mut r = elf.relas[0];
        r.target = percpu;
        r.offset = 0;
        r.r_type = E::R_X86_64_32;
        elf.relas.push(r);
        assert!(matches!(
            parse_elf(elf),
            Err(ModuleError::PerCpuRelocated { .. })
        ));
    }

    #[test]
    fn hostile_per_cpu_sections_are_refused() {
        // Larger than any kernel would allocate.
        let mut elf = per_cpu_seed(E::R_X86_64_32S);
        let (i, _) = elf.section_by_name(sections::PERCPU).unwrap();
        elf.sections[i].size = MAX_PERCPU_BYTES + 1;
        assert!(matches!(parse_elf(elf), Err(ModuleError::Layout(m)) if m.contains("per-CPU")));
        // An alignment that is not a power of two; one over a page is
        // lowered to a page, as percpu_modalloc lowers it.
        let mut elf = per_cpu_seed(E::R_X86_64_32S);
        elf.sections[i].align = 24;
        assert!(matches!(parse_elf(elf), Err(ModuleError::Layout(_))));
        let mut elf = per_cpu_seed(E::R_X86_64_32S);
        elf.sections[i].align = 1 << 20;
        assert_eq!(parse_elf(elf).unwrap().percpu.unwrap().align, PAGE);
        // A symbol past the section's end.
        let mut elf = per_cpu_seed(E::R_X86_64_32S);
        let sym = elf
            .symbols
            .iter()
            .position(|s| s.shndx as usize == i)
            .unwrap();
        elf.symbols[sym].value = 5;
        assert!(matches!(parse_elf(elf), Err(ModuleError::Corrupt(_))));
        // Empty, yet referred to: no block to base the reference on.
        let mut elf = per_cpu_seed(E::R_X86_64_32S);
        elf.sections[i].size = 0;
        elf.symbols[sym].value = 0;
        assert!(matches!(parse_elf(elf), Err(ModuleError::Corrupt(m)) if m.contains("empty")));
        // Bytes that disagree with the header.
        let mut elf = per_cpu_seed(E::R_X86_64_32S);
        elf.sections[i].sh_type = E::SHT_PROGBITS;
        elf.sections[i].data = vec![0; 2];
        assert!(matches!(parse_elf(elf), Err(ModuleError::Corrupt(_))));
    }

    #[test]
    fn reloc_kinds() {
        assert_eq!(RelocKind::from_elf(E::R_X86_64_64), Some(RelocKind::Abs64));
        assert_eq!(RelocKind::from_elf(E::R_X86_64_GOTPCREL), None);
        assert_eq!(RelocKind::Abs64.width(), 8);
        assert_eq!(RelocKind::Abs32S.width(), 4);
        assert!(RelocKind::Plt32.pc_relative() && !RelocKind::Abs32.pc_relative());
        assert_eq!(reloc_name(E::R_X86_64_GOTPCRELX), "R_X86_64_GOTPCRELX");
    }
}

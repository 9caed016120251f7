//! The guest's loaded kernel modules, read from its memory: what a
//! livepatch object naming a module is resolved against.
//!
//! The kernel keeps every module on the `modules` list (`struct module`,
//! linked through `module.list`). klp resolves a module object's symbols
//! with `module_kallsyms_on_each_symbol()` (kernel/module/kallsyms.c):
//! the module's own `mod->kallsyms` table, `Elf64_Sym`s in load order with
//! their names in `strtab` and their nm-style types in `typetab`, skipping
//! `SHN_UNDEF` entries and modules still `MODULE_STATE_UNFORMED`. The same
//! order is what klp's `sympos` counts in, so [`LoadedModule::symbols`]
//! keeps it.
//!
//! Where a module's code lies changed in 6.4: 6.1 has
//! `core_layout`/`init_layout` (`base`, `size`, `text_size`), 6.4+ has
//! `mem[MOD_MEM_NUM_TYPES]` (`base`, `size` per type, text first). Both
//! are taken from BTF ([`ModuleLayout::from_btf`]).
//!
//! Everything here is guest data that may be corrupt or changing while
//! the guest runs (a module loading or going away): every pointer is
//! checked to be a kernel address, the list walk is bounded and detects
//! cycles, every count and string is bounded, and nothing panics.

use std::collections::HashSet;
use std::ops::Range;

use crate::btf::{Btf, BtfError};
use crate::kallsyms::Kallsyms;
use crate::paging::{PagingError, VirtRead};

/// `MODULE_NAME_LEN` on 64-bit kernels: `module.name` is this many bytes.
pub const MODULE_NAME_LEN: usize = 56;
/// More modules than this on the list means a corrupt (or looping) list:
/// a distribution kernel loads a few hundred.
pub const MAX_MODULES: usize = 4096;
/// The most symbols read from one module's table (nf_tables, one of the
/// largest, has about 3000).
pub const MAX_MODULE_SYMBOLS: u32 = 1 << 18;
/// `KSYM_NAME_LEN`: the longest symbol name the kernel keeps.
pub const KSYM_NAME_LEN: usize = 512;
/// `sizeof(Elf64_Sym)`.
const ELF64_SYM_SIZE: u64 = 24;
/// `SHN_UNDEF`: klp's module walk skips such entries (the null symbol).
const SHN_UNDEF: u16 = 0;
/// The lowest kernel address (5-level paging's kernel half; with 4 levels
/// the gap up to 0xffff800000000000 is non-canonical and fails to read).
const KERNEL_HALF: u64 = 0xff00_0000_0000_0000;
const PAGE: u64 = 4096;
/// `enum mod_mem_type` (6.4+, include/linux/module.h): the index of each
/// region in `module.mem`. The BTF enum's values are not read; the array
/// length is checked to be `MOD_MEM_NUM_TYPES` instead, so a kernel that
/// changed the order would be refused rather than misread.
const MOD_TEXT: u64 = 0;
const MOD_INIT_TEXT: u64 = 4;
const MOD_MEM_NUM_TYPES: u64 = 7;

/// Errors of reading the module list. Each message says what was being
/// read; the fields are what the message shows.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    /// A member the walk needs is missing from the guest's BTF.
    #[error("cannot lay out struct module from the guest's BTF: {0}")]
    Layout(#[from] BtfError),
    /// `struct module` has neither known memory layout.
    #[error(
        "struct module in the guest's BTF is neither the 6.1 layout (core_layout) nor the \
         6.4+ one (mem[{MOD_MEM_NUM_TYPES}]): {0}"
    )]
    UnknownLayout(String),
    /// A symbol the walk starts from (`modules`, ...) is not in kallsyms.
    #[error("kallsyms has no `{0}`: the guest kernel was built without modules or KALLSYMS_ALL?")]
    MissingSymbol(&'static str),
    /// A read of module data failed.
    #[error("cannot read {what} at {addr:#x}: {source}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// Its kernel-virtual address.
        addr: u64,
        /// The read's error.
        #[source]
        source: PagingError,
    },
    /// A pointer in module data is not a kernel address.
    #[error(
        "{what} at {at:#x} is {ptr:#x}, not a kernel pointer: corrupt or changing module data"
    )]
    BadPointer {
        /// The member holding it.
        what: &'static str,
        /// The value read.
        ptr: u64,
        /// Kernel-virtual address it was read from.
        at: u64,
    },
    /// The list revisits this node before reaching its head.
    #[error("the modules list loops without returning to its head ({0:#x} seen twice)")]
    Cycle(u64),
    /// More than `MAX_MODULES` entries: a corrupt list.
    #[error("more than {MAX_MODULES} modules on the modules list: giving up (a corrupt list?)")]
    TooMany,
    /// A module's `name` is not a NUL-terminated printable string.
    #[error("the module at {addr:#x} has no NUL-terminated printable name: corrupt module data")]
    BadName {
        /// Kernel-virtual address of the `struct module`.
        addr: u64,
    },
    /// A module's kallsyms count is above `MAX_MODULE_SYMBOLS`.
    #[error(
        "module `{module}` claims {count} symbols, more than the {MAX_MODULE_SYMBOLS} klpvisor \
         reads: corrupt module data"
    )]
    TooManySymbols {
        /// The module's name.
        module: String,
        /// Its `num_symtab`.
        count: u32,
    },
    /// A symbol's name is not a NUL-terminated string within `KSYM_NAME_LEN`.
    #[error(
        "module `{module}`: symbol {index}'s name at strtab+{offset:#x} is not a NUL-terminated \
         name of at most {KSYM_NAME_LEN} bytes"
    )]
    BadSymbolName {
        /// The module's name.
        module: String,
        /// The symbol's index in its symtab.
        index: usize,
        /// `st_name`: the name's offset in the module's strtab.
        offset: u32,
    },
}

/// `enum module_state` (include/linux/module.h, unchanged since 3.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleState {
    /// Initialized: its init has run (or it has none).
    Live,
    /// Being initialized: klp has already applied its objects, its init runs.
    Coming,
    /// Being unloaded (or its init failed).
    Going,
    /// Still being laid out by the loader: no usable symbols yet.
    Unformed,
    /// A value the kernel does not define.
    Other(u32),
}

impl ModuleState {
    fn from_raw(v: u32) -> Self {
        match v {
            0 => Self::Live,
            1 => Self::Coming,
            2 => Self::Going,
            3 => Self::Unformed,
            n => Self::Other(n),
        }
    }

    /// As the kernel's /proc/modules shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "Live",
            Self::Coming => "Loading",
            Self::Going => "Unloading",
            Self::Unformed => "Unformed",
            Self::Other(_) => "unknown",
        }
    }
}

/// Where a module's memory regions are described in `struct module`
/// (every field is a byte offset named after the kernel's member).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemLayout {
    /// 6.1 to 6.3: `core_layout` and `init_layout`, each `struct
    /// module_layout { void *base; unsigned int size, text_size, ... }`.
    /// Offsets are from the start of `struct module`.
    Layouts {
        /// `core_layout.base`.
        core_base: u64,
        /// `core_layout.size`.
        core_size: u64,
        /// `core_layout.text_size`.
        core_text_size: u64,
        /// `init_layout.base`.
        init_base: u64,
        /// `init_layout.size`.
        init_size: u64,
        /// `init_layout.text_size`.
        init_text_size: u64,
    },
    /// 6.4+: `struct module_memory mem[MOD_MEM_NUM_TYPES]`, each with
    /// `base` and `size`; text is `mem[MOD_TEXT]`, init text
    /// `mem[MOD_INIT_TEXT]`.
    Mem {
        /// `mem`, from the start of `struct module`.
        mem: u64,
        /// `sizeof(struct module_memory)`.
        stride: u64,
        /// `module_memory.base`, from the start of each element.
        base: u64,
        /// `module_memory.size`, from the start of each element.
        size: u64,
    },
}

/// The offsets the walk needs, from BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleLayout {
    /// `module.state` (an `enum module_state`, 4 bytes).
    pub state: u64,
    /// `module.list`.
    pub list: u64,
    /// `module.name` (`MODULE_NAME_LEN` bytes).
    pub name: u64,
    /// `module.kallsyms` (a `struct mod_kallsyms *`).
    pub kallsyms: u64,
    /// `mod_kallsyms.symtab` (`Elf64_Sym *`).
    pub symtab: u64,
    /// `mod_kallsyms.num_symtab` (`unsigned int`).
    pub num_symtab: u64,
    /// `mod_kallsyms.strtab` (`char *`).
    pub strtab: u64,
    /// `mod_kallsyms.typetab` (`char *`); None on kernels that kept the
    /// type elsewhere.
    pub typetab: Option<u64>,
    /// Where the module's text and memory are described.
    pub mem: MemLayout,
}

impl ModuleLayout {
    /// Takes every offset from the guest's BTF, for either kernel layout.
    pub fn from_btf(btf: &Btf) -> Result<Self, ModulesError> {
        let off = |p: &str| btf.offset_of(p);
        let mem = if btf.field("module.core_layout").is_ok() {
            MemLayout::Layouts {
                core_base: off("module.core_layout.base")?,
                core_size: off("module.core_layout.size")?,
                core_text_size: off("module.core_layout.text_size")?,
                init_base: off("module.init_layout.base")?,
                init_size: off("module.init_layout.size")?,
                init_text_size: off("module.init_layout.text_size")?,
            }
        } else {
            let field = btf.field("module.mem")?;
            let mem = field.byte_offset().ok_or_else(|| {
                ModulesError::UnknownLayout("module.mem is not byte-aligned".into())
            })?;
            let stride = btf.struct_size("module_memory")?;
            let total = field.size.unwrap_or(0);
            if stride == 0 || total != stride.saturating_mul(MOD_MEM_NUM_TYPES) {
                return Err(ModulesError::UnknownLayout(format!(
                    "module.mem is {total} bytes of {stride}-byte module_memory"
                )));
            }
            MemLayout::Mem {
                mem,
                stride,
                base: off("module_memory.base")?,
                size: off("module_memory.size")?,
            }
        };
        Ok(Self {
            state: off("module.state")?,
            list: off("module.list")?,
            name: off("module.name")?,
            kallsyms: off("module.kallsyms")?,
            symtab: off("mod_kallsyms.symtab")?,
            num_symtab: off("mod_kallsyms.num_symtab")?,
            strtab: off("mod_kallsyms.strtab")?,
            typetab: off("mod_kallsyms.typetab").ok(),
            mem,
        })
    }
}

/// One symbol of a module's kallsyms table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSymbol {
    /// The symbol's name.
    pub name: String,
    /// nm-style type, as /proc/kallsyms shows it ('t', 'T', 'd', ...);
    /// '?' if the kernel has no type table.
    pub kind: char,
    /// Its address (`st_value`).
    pub addr: u64,
    /// `st_size`: a function's length (module symbols keep their sizes,
    /// unlike vmlinux's kallsyms).
    pub size: u64,
}

/// A module on the guest's `modules` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModule {
    /// `module.name`, the name a `klp_object` gives.
    pub name: String,
    /// The `struct module`'s address.
    pub addr: u64,
    /// Whether it is loading, live or going away.
    pub state: ModuleState,
    /// Its resident (core) text.
    pub text: Range<u64>,
    /// Its init text while it is still mapped (empty after init).
    pub init_text: Range<u64>,
    /// Its resident memory (text, rodata, data).
    pub core: Range<u64>,
    /// The bytes of all its memory regions, as /proc/modules counts them.
    pub size: u64,
    /// Its kallsyms entries in table order, `SHN_UNDEF` ones left out (as
    /// klp's walk skips them); empty while the module is unformed.
    pub symbols: Vec<ModuleSymbol>,
}

/// A symbol found by name in one module, with its klp `sympos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundInModule<'a> {
    /// 1-based position among the module's symbols of that name.
    pub sympos: u32,
    /// The symbol.
    pub symbol: &'a ModuleSymbol,
}

impl LoadedModule {
    /// Every symbol called `name`, with its sympos (1-based, in table
    /// order), as klp's `klp_find_callback` counts them.
    pub fn lookup(&self, name: &str) -> Vec<FoundInModule<'_>> {
        self.symbols
            .iter()
            .filter(|s| s.name == name)
            .zip(1u32..)
            .map(|(symbol, sympos)| FoundInModule { sympos, symbol })
            .collect()
    }

    /// The symbol starting exactly at `addr`, preferring a text symbol.
    pub fn symbol_at(&self, addr: u64) -> Option<&ModuleSymbol> {
        let mut at = self.symbols.iter().filter(|s| s.addr == addr);
        let first = at.clone().next();
        at.find(|s| matches!(s.kind, 't' | 'T' | 'w' | 'W'))
            .or(first)
    }

    /// Whether `addr` is in the module's text (resident or init).
    pub fn in_text(&self, addr: u64) -> bool {
        self.text.contains(&addr) || self.init_text.contains(&addr)
    }
}

fn is_kernel_ptr(p: u64) -> bool {
    p >= KERNEL_HALF
}

fn read_u64<M: VirtRead + ?Sized>(
    mem: &M,
    addr: u64,
    what: &'static str,
) -> Result<u64, ModulesError> {
    mem.read_u64(addr)
        .map_err(|source| ModulesError::Read { what, addr, source })
}

fn read_u32<M: VirtRead + ?Sized>(
    mem: &M,
    addr: u64,
    what: &'static str,
) -> Result<u32, ModulesError> {
    mem.read_u32(addr)
        .map_err(|source| ModulesError::Read { what, addr, source })
}

/// A kernel pointer read from `at`.
fn read_ptr<M: VirtRead + ?Sized>(
    mem: &M,
    at: u64,
    what: &'static str,
) -> Result<u64, ModulesError> {
    let ptr = read_u64(mem, at, what)?;
    if is_kernel_ptr(ptr) {
        Ok(ptr)
    } else {
        Err(ModulesError::BadPointer { what, ptr, at })
    }
}

/// A NUL-terminated string of at most `max` bytes at `va`, read a page at
/// a time so a string that ends just before an unmapped page still reads.
/// `None` if it has no NUL within `max` bytes or is unreadable.
fn read_cstr<M: VirtRead + ?Sized>(mem: &M, va: u64, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = va;
    while out.len() < max {
        let to_page_end = PAGE - at % PAGE;
        let n = usize::try_from(to_page_end)
            .ok()?
            .min(max - out.len())
            .min(64);
        let mut buf = vec![0u8; n];
        mem.read_virt(at, &mut buf).ok()?;
        if let Some(end) = buf.iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..end]);
            return Some(out);
        }
        out.extend_from_slice(&buf);
        at = at.checked_add(n as u64)?;
    }
    None
}

/// Reads the guest's module list. Unformed modules are listed without
/// symbols (klp skips them too).
pub fn list<M: VirtRead + ?Sized>(
    mem: &M,
    kallsyms: &Kallsyms,
    btf: &Btf,
) -> Result<Vec<LoadedModule>, ModulesError> {
    let layout = ModuleLayout::from_btf(btf)?;
    let head = kallsyms
        .addr("modules")
        .map_err(|_| ModulesError::MissingSymbol("modules"))?;
    walk(mem, &layout, head)
}

/// As [`list`] without reading any symbol table: which modules are
/// loaded, where, in what state. Cheap enough for a paused guest (a
/// transition re-checks that the modules it writes into are still there).
pub fn list_without_symbols<M: VirtRead + ?Sized>(
    mem: &M,
    kallsyms: &Kallsyms,
    btf: &Btf,
) -> Result<Vec<LoadedModule>, ModulesError> {
    let layout = ModuleLayout::from_btf(btf)?;
    let head = kallsyms
        .addr("modules")
        .map_err(|_| ModulesError::MissingSymbol("modules"))?;
    walk_with(mem, &layout, head, false)
}

/// Walks the list at `head` with `layout` (the testable core of [`list`]).
pub fn walk<M: VirtRead + ?Sized>(
    mem: &M,
    layout: &ModuleLayout,
    head: u64,
) -> Result<Vec<LoadedModule>, ModulesError> {
    walk_with(mem, layout, head, true)
}

fn walk_with<M: VirtRead + ?Sized>(
    mem: &M,
    layout: &ModuleLayout,
    head: u64,
    symbols: bool,
) -> Result<Vec<LoadedModule>, ModulesError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut node = read_ptr(mem, head, "modules.next")?;
    while node != head {
        if !seen.insert(node) {
            return Err(ModulesError::Cycle(node));
        }
        if out.len() >= MAX_MODULES {
            return Err(ModulesError::TooMany);
        }
        let module = node.wrapping_sub(layout.list);
        out.push(read_module_with(mem, layout, module, symbols)?);
        node = read_ptr(mem, node, "module.list.next")?;
    }
    Ok(out)
}

/// One `struct module` at `addr`.
pub fn read_module<M: VirtRead + ?Sized>(
    mem: &M,
    layout: &ModuleLayout,
    addr: u64,
) -> Result<LoadedModule, ModulesError> {
    read_module_with(mem, layout, addr, true)
}

fn read_module_with<M: VirtRead + ?Sized>(
    mem: &M,
    layout: &ModuleLayout,
    addr: u64,
    with_symbols: bool,
) -> Result<LoadedModule, ModulesError> {
    let mut raw = [0u8; MODULE_NAME_LEN];
    let name_at = addr.wrapping_add(layout.name);
    mem.read_virt(name_at, &mut raw)
        .map_err(|source| ModulesError::Read {
            what: "module.name",
            addr: name_at,
            source,
        })?;
    let end = raw
        .iter()
        .position(|&b| b == 0)
        .filter(|&e| e > 0 && raw[..e].iter().all(|b| b.is_ascii_graphic()))
        .ok_or(ModulesError::BadName { addr })?;
    let name = String::from_utf8_lossy(&raw[..end]).into_owned();
    let state = ModuleState::from_raw(read_u32(
        mem,
        addr.wrapping_add(layout.state),
        "module.state",
    )?);
    let Regions {
        text,
        init_text,
        core,
        size,
    } = regions(mem, layout, addr)?;
    // An unformed module has no table yet; a module without one (NULL:
    // a kernel built without KALLSYMS for modules, or a `struct module`
    // written by a tool rather than the loader) has no symbols to find.
    let table_at = addr.wrapping_add(layout.kallsyms);
    let symbols = match state {
        _ if !with_symbols => Vec::new(),
        ModuleState::Unformed => Vec::new(),
        _ => match read_u64(mem, table_at, "module.kallsyms")? {
            0 => Vec::new(),
            table if is_kernel_ptr(table) => read_symbols(mem, layout, &name, table)?,
            ptr => {
                return Err(ModulesError::BadPointer {
                    what: "module.kallsyms",
                    ptr,
                    at: table_at,
                })
            }
        },
    };
    Ok(LoadedModule {
        name,
        addr,
        state,
        text,
        init_text,
        core,
        size,
        symbols,
    })
}

/// `[base, base + len)`, empty when the base is NULL or the range wraps.
fn range(base: u64, len: u64) -> Range<u64> {
    match base.checked_add(len) {
        Some(end) if base != 0 => base..end,
        _ => 0..0,
    }
}

/// Where the module at `addr` lies.
struct Regions {
    text: Range<u64>,
    init_text: Range<u64>,
    core: Range<u64>,
    size: u64,
}

fn regions<M: VirtRead + ?Sized>(
    mem: &M,
    layout: &ModuleLayout,
    addr: u64,
) -> Result<Regions, ModulesError> {
    let at = |o: u64| addr.wrapping_add(o);
    match layout.mem {
        MemLayout::Layouts {
            core_base,
            core_size,
            core_text_size,
            init_base,
            init_size,
            init_text_size,
        } => {
            let base = read_u64(mem, at(core_base), "module.core_layout.base")?;
            let size = read_u32(mem, at(core_size), "module.core_layout.size")?;
            let text = read_u32(mem, at(core_text_size), "module.core_layout.text_size")?;
            let ibase = read_u64(mem, at(init_base), "module.init_layout.base")?;
            let isize = read_u32(mem, at(init_size), "module.init_layout.size")?;
            let itext = read_u32(mem, at(init_text_size), "module.init_layout.text_size")?;
            Ok(Regions {
                text: range(base, u64::from(text.min(size))),
                init_text: range(ibase, u64::from(itext)),
                core: range(base, u64::from(size)),
                size: u64::from(size) + u64::from(isize),
            })
        }
        MemLayout::Mem {
            mem: m,
            stride,
            base,
            size,
        } => {
            let mut total = 0u64;
            let mut region = |i: u64| -> Result<Range<u64>, ModulesError> {
                let r = at(m).wrapping_add(i.wrapping_mul(stride));
                let b = read_u64(mem, r.wrapping_add(base), "module.mem[].base")?;
                let s = read_u32(mem, r.wrapping_add(size), "module.mem[].size")?;
                total += u64::from(s);
                Ok(range(b, u64::from(s)))
            };
            let text = region(MOD_TEXT)?;
            let init_text = region(MOD_INIT_TEXT)?;
            // Core memory: the hull of the resident regions (text, data,
            // rodata, ro_after_init), which the kernel allocates apart.
            let mut core = text.clone();
            for i in 1..MOD_INIT_TEXT {
                let r = region(i)?;
                if r.is_empty() {
                    continue;
                }
                core = if core.is_empty() {
                    r
                } else {
                    core.start.min(r.start)..core.end.max(r.end)
                };
            }
            for i in MOD_INIT_TEXT + 1..MOD_MEM_NUM_TYPES {
                region(i)?;
            }
            Ok(Regions {
                text,
                init_text,
                core,
                size: total,
            })
        }
    }
}

/// The module's `struct mod_kallsyms` at `table`: its symbols in order.
fn read_symbols<M: VirtRead + ?Sized>(
    mem: &M,
    layout: &ModuleLayout,
    module: &str,
    table: u64,
) -> Result<Vec<ModuleSymbol>, ModulesError> {
    let symtab = read_ptr(
        mem,
        table.wrapping_add(layout.symtab),
        "mod_kallsyms.symtab",
    )?;
    let count = read_u32(
        mem,
        table.wrapping_add(layout.num_symtab),
        "mod_kallsyms.num_symtab",
    )?;
    if count > MAX_MODULE_SYMBOLS {
        return Err(ModulesError::TooManySymbols {
            module: module.to_owned(),
            count,
        });
    }
    let strtab = read_ptr(
        mem,
        table.wrapping_add(layout.strtab),
        "mod_kallsyms.strtab",
    )?;
    let bytes = mem
        .read_vec(
            symtab,
            u64::from(count) * ELF64_SYM_SIZE,
            u64::from(MAX_MODULE_SYMBOLS) * ELF64_SYM_SIZE,
            "a module's symbol table",
        )
        .map_err(|source| ModulesError::Read {
            what: "mod_kallsyms.symtab",
            addr: symtab,
            source,
        })?;
    let types = match layout.typetab {
        Some(off) => {
            let typetab = read_ptr(mem, table.wrapping_add(off), "mod_kallsyms.typetab")?;
            mem.read_vec(
                typetab,
                u64::from(count),
                u64::from(MAX_MODULE_SYMBOLS),
                "a module's type table",
            )
            .map_err(|source| ModulesError::Read {
                what: "mod_kallsyms.typetab",
                addr: typetab,
                source,
            })?
        }
        None => Vec::new(),
    };
    decode_symbols(&bytes, &types, |offset| {
        let va = strtab.checked_add(u64::from(offset))?;
        read_cstr(mem, va, KSYM_NAME_LEN)
    })
    .map_err(|(index, offset)| ModulesError::BadSymbolName {
        module: module.to_owned(),
        index,
        offset,
    })
}

/// Decodes `Elf64_Sym`s (`symtab`), their types (`types`, one byte each,
/// may be short) and names (`name_at(st_name)`), leaving out `SHN_UNDEF`
/// entries and unnamed ones (as /proc/kallsyms does). Names are looked up
/// once per distinct offset. Errors name the bad entry: (index, st_name).
pub fn decode_symbols(
    symtab: &[u8],
    types: &[u8],
    mut name_at: impl FnMut(u32) -> Option<Vec<u8>>,
) -> Result<Vec<ModuleSymbol>, (usize, u32)> {
    let mut names: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (i, sym) in symtab.chunks_exact(ELF64_SYM_SIZE as usize).enumerate() {
        let u32_at = |o: usize| {
            sym.get(o..o + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        let u64_at = |o: usize| {
            sym.get(o..o + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let shndx = sym
            .get(6..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u16::from_le_bytes);
        if shndx == SHN_UNDEF {
            continue;
        }
        let st_name = u32_at(0);
        let name = match names.get(&st_name) {
            Some(n) => n.clone(),
            None => {
                let raw = name_at(st_name).ok_or((i, st_name))?;
                let n = String::from_utf8_lossy(&raw).into_owned();
                names.insert(st_name, n.clone());
                n
            }
        };
        if name.is_empty() {
            continue;
        }
        let kind = types.get(i).map_or('?', |&t| {
            if t.is_ascii_graphic() {
                char::from(t)
            } else {
                '?'
            }
        });
        out.push(ModuleSymbol {
            name,
            kind,
            addr: u64_at(8),
            size: u64_at(16),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Sparse kernel-virtual memory: 4 KiB pages by address.
    #[derive(Default)]
    struct Mem {
        pages: BTreeMap<u64, Vec<u8>>,
    }

    impl Mem {
        fn put(&mut self, va: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                let a = va + i as u64;
                let page = self
                    .pages
                    .entry(a & !(PAGE - 1))
                    .or_insert_with(|| vec![0; PAGE as usize]);
                page[(a % PAGE) as usize] = *b;
            }
        }
        fn put_u64(&mut self, va: u64, v: u64) {
            self.put(va, &v.to_le_bytes());
        }
        fn put_u32(&mut self, va: u64, v: u32) {
            self.put(va, &v.to_le_bytes());
        }
    }

    impl VirtRead for Mem {
        fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
            for (i, b) in buf.iter_mut().enumerate() {
                let a = va
                    .checked_add(i as u64)
                    .ok_or(PagingError::Unmapped { va })?;
                let page = self
                    .pages
                    .get(&(a & !(PAGE - 1)))
                    .ok_or(PagingError::Unmapped { va: a })?;
                *b = page[(a % PAGE) as usize];
            }
            Ok(())
        }
    }

    const HEAD: u64 = 0xffff_ffff_8200_0000;
    const MOD_A: u64 = 0xffff_ffff_c000_1000;
    const MOD_B: u64 = 0xffff_ffff_c010_1000;

    /// A 6.4+-style layout with small made-up offsets.
    fn layout() -> ModuleLayout {
        ModuleLayout {
            state: 0,
            list: 8,
            name: 24,
            kallsyms: 0x100,
            symtab: 0,
            num_symtab: 8,
            strtab: 16,
            typetab: Some(24),
            mem: MemLayout::Mem {
                mem: 0x200,
                stride: 0x40,
                base: 0,
                size: 8,
            },
        }
    }

    fn sym(name: u32, shndx: u16, value: u64, size: u64) -> Vec<u8> {
        let mut v = name.to_le_bytes().to_vec();
        v.extend_from_slice(&[0x12, 0]);
        v.extend_from_slice(&shndx.to_le_bytes());
        v.extend_from_slice(&value.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        v
    }

    /// A module at `at` named `name` with text at `text` and the symbols
    /// (name, type, offset in text, size); its tables follow it.
    fn module(m: &mut Mem, at: u64, name: &str, text: u64, syms: &[(&str, u8, u64, u64)]) {
        let l = layout();
        m.put_u32(at + l.state, 0);
        m.put(at + l.name, name.as_bytes());
        m.put(at + l.name + name.len() as u64, &[0]);
        let table = at + 0x800;
        m.put_u64(at + l.kallsyms, table);
        let MemLayout::Mem {
            mem,
            stride,
            base,
            size,
        } = l.mem
        else {
            unreachable!()
        };
        m.put_u64(at + mem + base, text);
        m.put_u32(at + mem + size, 0x1000);
        m.put_u64(at + mem + stride + base, text + 0x1000); // data
        m.put_u32(at + mem + stride + size, 0x1000);
        let (symtab, strtab, typetab) = (at + 0x900, at + 0x2000, at + 0x3000);
        m.put_u64(table, symtab);
        m.put_u32(table + 8, syms.len() as u32 + 1);
        m.put_u64(table + 16, strtab);
        m.put_u64(table + 24, typetab);
        let mut tab = sym(0, 0, 0, 0); // the null symbol
        let mut strs = vec![0u8];
        let mut types = vec![b'U'];
        for (n, t, off, size) in syms {
            tab.extend(sym(strs.len() as u32, 1, text + off, *size));
            strs.extend_from_slice(n.as_bytes());
            strs.push(0);
            types.push(*t);
        }
        m.put(symtab, &tab);
        m.put(strtab, &strs);
        m.put(typetab, &types);
    }

    fn two_modules() -> Mem {
        let mut m = Mem::default();
        let l = layout();
        m.put_u64(HEAD, MOD_A + l.list);
        m.put_u64(MOD_A + l.list, MOD_B + l.list);
        m.put_u64(MOD_B + l.list, HEAD);
        module(
            &mut m,
            MOD_A,
            "pvpanic",
            0xffff_ffff_c020_0000,
            &[
                ("show", b't', 0x10, 0x30),
                ("probe", b'T', 0x40, 0x20),
                ("show", b't', 0x80, 8),
            ],
        );
        module(
            &mut m,
            MOD_B,
            "other",
            0xffff_ffff_c030_0000,
            &[("show", b't', 0, 4)],
        );
        m
    }

    #[test]
    fn walks_the_list_with_names_regions_and_symbols_in_table_order() {
        let m = two_modules();
        let mods = walk(&m, &layout(), HEAD).unwrap();
        assert_eq!(
            mods.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["pvpanic", "other"]
        );
        let a = &mods[0];
        assert_eq!(a.state, ModuleState::Live);
        assert_eq!(a.text, 0xffff_ffff_c020_0000..0xffff_ffff_c020_1000);
        assert_eq!(a.core, 0xffff_ffff_c020_0000..0xffff_ffff_c020_2000);
        assert_eq!(a.size, 0x2000);
        assert!(a.init_text.is_empty());
        assert_eq!(a.symbols.len(), 3, "the null symbol is skipped");
        let shows = a.lookup("show");
        assert_eq!(
            shows
                .iter()
                .map(|f| (f.sympos, f.symbol.addr, f.symbol.size))
                .collect::<Vec<_>>(),
            [
                (1, 0xffff_ffff_c020_0010, 0x30),
                (2, 0xffff_ffff_c020_0080, 8)
            ]
        );
        assert_eq!(a.symbol_at(0xffff_ffff_c020_0040).unwrap().kind, 'T');
        assert_eq!(mods[1].lookup("show").len(), 1, "sympos counts per module");
    }

    #[test]
    fn a_looping_list_is_an_error() {
        let mut m = two_modules();
        m.put_u64(MOD_B + layout().list, MOD_A + layout().list);
        assert!(matches!(
            walk(&m, &layout(), HEAD),
            Err(ModulesError::Cycle(_))
        ));
    }

    #[test]
    fn hostile_counts_pointers_and_names_are_refused() {
        let l = layout();
        let mut m = two_modules();
        m.put_u32(MOD_A + 0x800 + l.num_symtab, u32::MAX);
        assert!(matches!(
            walk(&m, &l, HEAD),
            Err(ModulesError::TooManySymbols {
                count: u32::MAX,
                ..
            })
        ));
        let mut m = two_modules();
        m.put_u64(MOD_A + l.list, 0x1234);
        assert!(matches!(
            walk(&m, &l, HEAD),
            Err(ModulesError::BadPointer { ptr: 0x1234, .. })
        ));
        let mut m = two_modules();
        m.put(MOD_B + l.name, &[b'x'; MODULE_NAME_LEN]);
        assert!(matches!(
            walk(&m, &l, HEAD),
            Err(ModulesError::BadName { addr: MOD_B })
        ));
        // A symbol name that runs off mapped memory.
        let mut m = two_modules();
        m.put(MOD_A + 0x2000 + 1, &[b'a'; 4095]);
        assert!(matches!(
            walk(&m, &l, HEAD),
            Err(ModulesError::BadSymbolName { index: 1, .. })
        ));
        // No kallsyms table at all: no symbols, not an error.
        let mut m = two_modules();
        m.put_u64(MOD_B + l.kallsyms, 0);
        assert!(walk(&m, &l, HEAD).unwrap()[1].symbols.is_empty());
        // A list longer than any kernel's, with no cycle: bounded.
        let mut m = Mem::default();
        let first = 0xffff_ffff_d000_0000;
        m.put_u64(HEAD, first + l.list);
        for i in 0..=MAX_MODULES as u64 {
            let at = first + i * 0x1000;
            m.put_u64(at + l.list, at + 0x1000 + l.list);
            m.put(at + l.name, b"m\0");
            m.put_u32(at + l.state, 3); // unformed: no symbols read
        }
        assert!(matches!(walk(&m, &l, HEAD), Err(ModulesError::TooMany)));
    }

    #[test]
    fn names_are_read_up_to_a_page_end_without_reading_past_it() {
        let mut m = Mem::default();
        let end = 0xffff_ffff_c000_1000;
        m.put(end - 4, b"abc\0");
        assert_eq!(read_cstr(&m, end - 4, KSYM_NAME_LEN).unwrap(), b"abc");
        m.put(end - 4, b"abcd");
        assert_eq!(read_cstr(&m, end - 4, KSYM_NAME_LEN), None);
    }
}

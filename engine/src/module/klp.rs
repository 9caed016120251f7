//! Reading `struct klp_patch` out of a module file.
//!
//! In a .ko every pointer in static data is zero in the file with a RELA
//! entry (`R_X86_64_64`, symbol + addend) at its place, so the structures
//! are read *through their relocations*: a pointer field is the relocation
//! at that place, or NULL if there is none and the bytes are zero. Field
//! offsets and structure sizes come from the guest's BTF, never from
//! constants, so a kernel whose klp structures differ is read correctly or
//! refused by name.
//!
//! Finding the patch: `klp_enable_patch()` refuses a patch without `mod`
//! and `objs`, and `mod` must be THIS_MODULE, so the patch is static data
//! with a pointer relocation to `__this_module` at `klp_patch.mod` and a
//! pointer into the module's data at `klp_patch.objs`. Other structures
//! can also point at THIS_MODULE (`file_operations.owner` does, at the same
//! offset), so a candidate must also hold a readable, terminated array of
//! `klp_object`s. If several candidates remain, the one whose address
//! `init_module` takes (`klp_enable_patch(&patch)`) wins.

use object::elf;

use super::elf::{RawElf, RawSection};
use super::sections::THIS_MODULE;
use super::{ModuleError, Place};
use klpvisor_guest::Btf;

/// klp's KSYM_NAME_LEN bound on a function name (6.1: 512).
const MAX_NAME: usize = 512;

/// What a livepatch module asks for, as klp would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// The module's name (`mod->name`), which klp uses as the patch name.
    pub name: String,
    /// `.replace`: a cumulative patch that replaces all older ones.
    pub replace: bool,
    pub objects: Vec<Object>,
    pub states: Vec<State>,
}

/// One `struct klp_object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// `None` is vmlinux; `Some` names a kernel module, resolved against
    /// that module's own symbols when it is loaded.
    pub name: Option<String>,
    pub funcs: Vec<Func>,
    pub callbacks: Callbacks,
    /// Where the `struct klp_object` itself is: its linked address is the
    /// argument every callback gets.
    pub place: Place,
}

/// One `struct klp_func`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Func {
    pub old_name: String,
    /// klp's rule: 0 = the name must be unique, n = the n-th of that name.
    pub old_sympos: u64,
    pub new_func: CodeRef,
}

/// Code in the module that klp data points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRef {
    pub place: Place,
    /// The module's symbol at that place, if it has one.
    pub symbol: Option<String>,
}

/// `klp_object.callbacks`: which are set, and to what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Callbacks {
    pub pre_patch: Option<CodeRef>,
    pub post_patch: Option<CodeRef>,
    pub pre_unpatch: Option<CodeRef>,
    pub post_unpatch: Option<CodeRef>,
}

/// One `struct klp_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub id: u64,
    pub version: u32,
}

/// Offsets and sizes from the guest's BTF.
#[derive(Debug, Clone, Copy)]
struct Layouts {
    patch_size: u64,
    patch_mod: u64,
    patch_objs: u64,
    patch_states: u64,
    patch_replace: Field,
    obj_size: u64,
    obj_name: u64,
    obj_funcs: u64,
    obj_callbacks: [u64; 4],
    func_size: u64,
    func_old_name: u64,
    func_new_func: u64,
    func_old_sympos: Field,
    state_size: u64,
    state_id: Field,
    state_version: Field,
    module_name: Field,
}

/// An integer field: offset and width.
#[derive(Debug, Clone, Copy)]
struct Field {
    offset: u64,
    size: u64,
}

impl Layouts {
    fn from_btf(btf: &Btf) -> Result<Self, ModuleError> {
        let off = |p: &str| btf.offset_of(p).map_err(ModuleError::from);
        let field = |p: &str| -> Result<Field, ModuleError> {
            let f = btf.field(p)?;
            let offset = btf.offset_of(p)?;
            let size = f.size.filter(|s| [1, 2, 4, 8].contains(s)).ok_or_else(|| {
                ModuleError::KlpLayout(format!("`{p}` is not a 1, 2, 4 or 8-byte integer"))
            })?;
            Ok(Field { offset, size })
        };
        let size = |t: &str| btf.struct_size(t).map_err(ModuleError::from);
        let name = btf.field("module.name")?;
        Ok(Self {
            patch_size: size("klp_patch")?,
            patch_mod: off("klp_patch.mod")?,
            patch_objs: off("klp_patch.objs")?,
            patch_states: off("klp_patch.states")?,
            patch_replace: field("klp_patch.replace")?,
            obj_size: size("klp_object")?,
            obj_name: off("klp_object.name")?,
            obj_funcs: off("klp_object.funcs")?,
            obj_callbacks: [
                off("klp_object.callbacks.pre_patch")?,
                off("klp_object.callbacks.post_patch")?,
                off("klp_object.callbacks.pre_unpatch")?,
                off("klp_object.callbacks.post_unpatch")?,
            ],
            func_size: size("klp_func")?,
            func_old_name: off("klp_func.old_name")?,
            func_new_func: off("klp_func.new_func")?,
            func_old_sympos: field("klp_func.old_sympos")?,
            state_size: size("klp_state")?,
            state_id: field("klp_state.id")?,
            state_version: field("klp_state.version")?,
            module_name: Field {
                offset: btf.offset_of("module.name")?,
                size: name.size.unwrap_or(0),
            },
        })
    }
}

/// A pointer-sized field, read through its relocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ptr {
    Null,
    /// Into one of the module's sections.
    Local(Place),
    /// To THIS_MODULE.
    ThisModule,
    /// To an undefined (kernel) symbol.
    External(usize),
}

/// Reads klp structures from the raw ELF.
struct Reader<'a> {
    elf: &'a RawElf,
    /// R_X86_64_64 relocations by (section, offset) -> index in elf.relas.
    pointers: std::collections::HashMap<(usize, u64), usize>,
    l: Layouts,
}

impl<'a> Reader<'a> {
    fn new(elf: &'a RawElf, btf: &Btf) -> Result<Self, ModuleError> {
        let mut pointers = std::collections::HashMap::new();
        for (i, r) in elf.relas.iter().enumerate() {
            if r.r_type == elf::R_X86_64_64 && !r.klp {
                pointers.insert((r.target, r.offset), i);
            }
        }
        Ok(Self {
            elf,
            pointers,
            l: Layouts::from_btf(btf)?,
        })
    }

    fn section(&self, index: usize) -> Result<&'a RawSection, ModuleError> {
        self.elf
            .sections
            .get(index)
            .ok_or_else(|| bad(format!("section {index} does not exist")))
    }

    fn bytes(&self, at: Place, len: u64) -> Result<&'a [u8], ModuleError> {
        let s = self.section(at.section)?;
        let end = at.offset.checked_add(len);
        end.and_then(|end| {
            s.data
                .get(usize::try_from(at.offset).ok()?..usize::try_from(end).ok()?)
        })
        .ok_or_else(|| {
            bad(format!(
                "{} bytes at {}+{:#x} lie outside the section's {} bytes in the file",
                len,
                s.name,
                at.offset,
                s.data.len()
            ))
        })
    }

    fn uint(&self, at: Place, size: u64) -> Result<u64, ModuleError> {
        let b = self.bytes(at, size)?;
        let mut v = [0u8; 8];
        v.get_mut(..b.len())
            .ok_or_else(|| bad("integer wider than 8 bytes".into()))?
            .copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    }

    fn ptr(&self, at: Place) -> Result<Ptr, ModuleError> {
        let raw = self.uint(at, 8)?;
        let Some(&ri) = self.pointers.get(&(at.section, at.offset)) else {
            return if raw == 0 {
                Ok(Ptr::Null)
            } else {
                Err(bad(format!(
                    "an absolute pointer {raw:#x} without relocation at {}+{:#x}",
                    self.section(at.section)?.name,
                    at.offset
                )))
            };
        };
        let r = self
            .elf
            .relas
            .get(ri)
            .ok_or_else(|| bad("relocation index".into()))?;
        let sym = self
            .elf
            .symbols
            .get(r.symbol)
            .ok_or_else(|| bad("relocation symbol".into()))?;
        if r.symbol == 0 {
            return Ok(Ptr::Null);
        }
        match self.elf.symbol_section(sym) {
            Some(sec) if self.section(sec)?.name == THIS_MODULE => Ok(Ptr::ThisModule),
            Some(sec) => {
                let offset = sym
                    .value
                    .checked_add_signed(r.addend)
                    .ok_or_else(|| bad(format!("pointer to {}{:+}", sym.name, r.addend)))?;
                Ok(Ptr::Local(Place {
                    section: sec,
                    offset,
                }))
            }
            None if sym.shndx == elf::SHN_UNDEF => Ok(Ptr::External(r.symbol)),
            None => Err(bad(format!(
                "pointer to `{}`, which is not in any section",
                sym.name
            ))),
        }
    }

    /// A C string pointed to by a field.
    fn string(&self, field: Place, what: &str) -> Result<Option<String>, ModuleError> {
        let at = match self.ptr(field)? {
            Ptr::Null => return Ok(None),
            Ptr::Local(p) => p,
            _ => return Err(bad(format!("{what} does not point into the module"))),
        };
        let s = self.section(at.section)?;
        let start = usize::try_from(at.offset).unwrap_or(usize::MAX);
        let tail = s
            .data
            .get(start..)
            .ok_or_else(|| bad(format!("{what} points past the end of {}", s.name)))?;
        let end = tail
            .iter()
            .take(MAX_NAME + 1)
            .position(|&b| b == 0)
            .ok_or_else(|| {
                bad(format!(
                    "{what} in {} is not a NUL-terminated string of at most {MAX_NAME} bytes",
                    s.name
                ))
            })?;
        Ok(Some(String::from_utf8_lossy(&tail[..end]).into_owned()))
    }

    /// A pointer that must be code in the module (or NULL).
    fn code(&self, field: Place, what: &str) -> Result<Option<CodeRef>, ModuleError> {
        match self.ptr(field)? {
            Ptr::Null => Ok(None),
            Ptr::Local(place) => {
                let s = self.section(place.section)?;
                if !s.exec() {
                    return Err(bad(format!(
                        "{what} points into {}, which is not code",
                        s.name
                    )));
                }
                if place.offset >= s.size {
                    return Err(bad(format!("{what} points past the end of {}", s.name)));
                }
                Ok(Some(CodeRef {
                    place,
                    symbol: self.function_at(place),
                }))
            }
            _ => Err(bad(format!("{what} does not point into the module's code"))),
        }
    }

    /// The name of the function symbol that starts at `place`.
    fn function_at(&self, place: Place) -> Option<String> {
        let mut best: Option<&super::elf::RawSymbol> = None;
        for s in &self.elf.symbols {
            if self.elf.symbol_section(s) == Some(place.section)
                && s.value == place.offset
                && s.kind == elf::STT_FUNC
                && best.is_none_or(|b| b.local() && !s.local())
            {
                best = Some(s);
            }
        }
        best.map(|s| s.name.clone())
    }

    /// Whether `at` is the start of a plausible klp_patch.
    fn candidate(&self, at: Place) -> bool {
        let objs = self.ptr(Place {
            offset: at.offset.saturating_add(self.l.patch_objs),
            ..at
        });
        let Ok(Ptr::Local(objs)) = objs else {
            return false;
        };
        self.section(objs.section).is_ok_and(|s| !s.exec())
            && self
                .bytes(at, self.l.patch_size)
                .is_ok_and(|b| b.len() as u64 == self.l.patch_size)
            && self.objects(objs).is_ok()
    }

    fn find_patch(&self, modinfo_livepatch: bool) -> Result<Place, ModuleError> {
        let mut found: Vec<Place> = Vec::new();
        for r in &self.elf.relas {
            if r.r_type != elf::R_X86_64_64 || r.klp {
                continue;
            }
            let Some(sym) = self.elf.symbols.get(r.symbol) else {
                continue;
            };
            let this_module = self
                .elf
                .symbol_section(sym)
                .and_then(|i| self.elf.sections.get(i))
                .is_some_and(|s| s.name == THIS_MODULE);
            if !this_module || r.addend != 0 {
                continue;
            }
            let Some(start) = r.offset.checked_sub(self.l.patch_mod) else {
                continue;
            };
            let at = Place {
                section: r.target,
                offset: start,
            };
            if self.section(r.target).is_ok_and(|s| !s.exec()) && self.candidate(at) {
                found.push(at);
            }
        }
        if found.len() > 1 {
            let from_init: Vec<Place> = found
                .iter()
                .copied()
                .filter(|&p| self.init_references(p))
                .collect();
            if from_init.len() == 1 {
                found = from_init;
            }
        }
        match (found.as_slice(), modinfo_livepatch) {
            ([], false) => Err(ModuleError::NotLivepatch(
                "it has neither MODULE_INFO(livepatch, \"Y\") nor a struct klp_patch".into(),
            )),
            ([], true) => Err(ModuleError::NotLivepatch(
                "it is marked MODULE_INFO(livepatch, \"Y\") but has no struct klp_patch with \
                 .mod = THIS_MODULE and .objs"
                    .into(),
            )),
            ([_], false) => Err(ModuleError::NotLivepatch(
                "it has a struct klp_patch but lacks MODULE_INFO(livepatch, \"Y\"), which \
                 klp_enable_patch requires"
                    .into(),
            )),
            ([p], true) => Ok(*p),
            (many, _) => Err(ModuleError::SeveralPatches(
                many.iter()
                    .map(|p| self.describe(*p))
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    /// Whether init_module's code takes the address `at`.
    fn init_references(&self, at: Place) -> bool {
        let Some(init) = self
            .elf
            .symbols
            .iter()
            .find(|s| s.name == "init_module" && s.kind == elf::STT_FUNC)
        else {
            return false;
        };
        let Some(sec) = self.elf.symbol_section(init) else {
            return false;
        };
        let end = init.value.saturating_add(init.size.max(1));
        self.elf.relas.iter().any(|r| {
            r.target == sec
                && (init.value..end).contains(&r.offset)
                && self.elf.symbols.get(r.symbol).is_some_and(|s| {
                    self.elf.symbol_section(s) == Some(at.section)
                        && s.value.checked_add_signed(r.addend) == Some(at.offset)
                })
        })
    }

    fn describe(&self, p: Place) -> String {
        let sec = self
            .section(p.section)
            .map(|s| s.name.as_str())
            .unwrap_or("?");
        let named = self.elf.symbols.iter().find(|s| {
            self.elf.symbol_section(s) == Some(p.section)
                && s.value == p.offset
                && s.kind == elf::STT_OBJECT
        });
        match named {
            Some(s) => format!("`{}` ({sec}+{:#x})", s.name, p.offset),
            None => format!("{sec}+{:#x}", p.offset),
        }
    }

    /// Iterates an array of `size`-byte elements at `start` until `end(elem)`.
    fn array<T>(
        &self,
        start: Place,
        size: u64,
        what: &str,
        mut read: impl FnMut(Place) -> Result<Option<T>, ModuleError>,
    ) -> Result<Vec<T>, ModuleError> {
        let sec_size = self.section(start.section)?.size;
        let mut out = Vec::new();
        let mut at = start;
        loop {
            if at.offset.checked_add(size).is_none_or(|e| e > sec_size) {
                return Err(bad(format!(
                    "the {what} array at {} runs past the end of its section without a \
                     terminating empty entry",
                    self.describe(start)
                )));
            }
            match read(at)? {
                Some(v) => out.push(v),
                None => return Ok(out),
            }
            at.offset += size;
        }
    }

    fn objects(&self, start: Place) -> Result<Vec<Object>, ModuleError> {
        let l = self.l;
        self.array(start, l.obj_size, "klp_object", |at| {
            let f = |off: u64| Place {
                offset: at.offset + off,
                ..at
            };
            let name = self.string(f(l.obj_name), "klp_object.name")?;
            let funcs = self.ptr(f(l.obj_funcs))?;
            // klp_for_each_object_static: obj->funcs || obj->name.
            if name.is_none() && funcs == Ptr::Null {
                return Ok(None);
            }
            let funcs = match funcs {
                Ptr::Local(p) => self.funcs(p)?,
                Ptr::Null => Vec::new(),
                _ => return Err(bad("klp_object.funcs does not point into the module".into())),
            };
            let cb = |i: usize, what| self.code(f(l.obj_callbacks[i]), what);
            let callbacks = Callbacks {
                pre_patch: cb(0, "callbacks.pre_patch")?,
                post_patch: cb(1, "callbacks.post_patch")?,
                pre_unpatch: cb(2, "callbacks.pre_unpatch")?,
                post_unpatch: cb(3, "callbacks.post_unpatch")?,
            };
            Ok(Some(Object {
                name,
                funcs,
                callbacks,
                place: at,
            }))
        })
    }

    fn funcs(&self, start: Place) -> Result<Vec<Func>, ModuleError> {
        let l = self.l;
        self.array(start, l.func_size, "klp_func", |at| {
            let f = |off: u64| Place {
                offset: at.offset + off,
                ..at
            };
            let old_name = self.string(f(l.func_old_name), "klp_func.old_name")?;
            let new_func = self.code(f(l.func_new_func), "klp_func.new_func")?;
            let old_sympos = self.uint(f(l.func_old_sympos.offset), l.func_old_sympos.size)?;
            // klp_for_each_func_static: old_name || new_func || old_sympos.
            match (old_name, new_func) {
                (None, None) if old_sympos == 0 => Ok(None),
                (Some(old_name), Some(new_func)) => Ok(Some(Func {
                    old_name,
                    old_sympos,
                    new_func,
                })),
                (name, _) => Err(bad(format!(
                    "a klp_func at {} has {} (klp_enable_patch refuses it)",
                    self.describe(at),
                    if name.is_none() {
                        "no old_name".to_owned()
                    } else {
                        format!("no new_func for `{}`", name.unwrap_or_default())
                    }
                ))),
            }
        })
    }

    fn states(&self, start: Place) -> Result<Vec<State>, ModuleError> {
        let l = self.l;
        self.array(start, l.state_size, "klp_state", |at| {
            let id = self.uint(
                Place {
                    offset: at.offset + l.state_id.offset,
                    ..at
                },
                l.state_id.size,
            )?;
            // klp_for_each_state: state && state->id.
            if id == 0 {
                return Ok(None);
            }
            let version = self.uint(
                Place {
                    offset: at.offset + l.state_version.offset,
                    ..at
                },
                l.state_version.size,
            )?;
            let version = u32::try_from(version)
                .map_err(|_| bad(format!("klp_state {id}: version {version} out of range")))?;
            Ok(Some(State { id, version }))
        })
    }

    /// `mod->name` from the module's struct module.
    fn module_name(&self) -> Option<String> {
        let (index, s) = self.elf.section_by_name(THIS_MODULE)?;
        let b = self
            .bytes(
                Place {
                    section: index,
                    offset: self.l.module_name.offset,
                },
                self.l.module_name.size.min(s.size),
            )
            .ok()?;
        let end = b.iter().position(|&c| c == 0)?;
        (end > 0).then(|| String::from_utf8_lossy(&b[..end]).into_owned())
    }
}

fn bad(msg: String) -> ModuleError {
    ModuleError::BadPatch(msg)
}

/// Finds and reads the module's `struct klp_patch`. `modinfo_name` is the
/// fallback name when the module has no struct module section.
pub fn read_patch(
    elf: &RawElf,
    btf: &Btf,
    livepatch_marked: bool,
    modinfo_name: Option<&str>,
) -> Result<Patch, ModuleError> {
    let r = Reader::new(elf, btf)?;
    let at = r.find_patch(livepatch_marked)?;
    let l = r.l;
    let field = |off: u64| Place {
        offset: at.offset + off,
        ..at
    };
    let objects = match r.ptr(field(l.patch_objs))? {
        Ptr::Local(p) => r.objects(p)?,
        _ => return Err(bad("klp_patch.objs does not point into the module".into())),
    };
    if objects.is_empty() {
        return Err(bad("klp_patch.objs is empty".into()));
    }
    let states = match r.ptr(field(l.patch_states))? {
        Ptr::Null => Vec::new(),
        Ptr::Local(p) => r.states(p)?,
        _ => return Err(bad("klp_patch.states does not point into the module".into())),
    };
    let replace = r.uint(field(l.patch_replace.offset), l.patch_replace.size)? != 0;
    let name = r
        .module_name()
        .or_else(|| modinfo_name.map(str::to_owned))
        .ok_or_else(|| bad("the module has no name (no struct module, no modinfo name)".into()))?;
    Ok(Patch {
        name,
        replace,
        objects,
        states,
    })
}

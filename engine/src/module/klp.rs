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
use super::tables::BugLayout;
use super::{ModuleError, Place};
use klpvisor_guest::Btf;

/// klp's KSYM_NAME_LEN (6.1 and later: 512): `klp_init_func` refuses an
/// `old_name` of this many bytes or more.
pub(super) const KSYM_NAME_LEN: usize = 512;
/// MODULE_NAME_LEN on 64-bit (64 - sizeof(unsigned long)): `klp_init_object`
/// refuses a module object name of this many bytes or more.
pub(super) const MODULE_NAME_LEN: usize = 56;
/// The longest string read from the module: longer than either bound, so
/// a name klp refuses is reported with its length rather than as garbage.
const MAX_STRING: usize = 4096;

/// What klp refuses in a patch's objects and functions, with the errno it
/// returns; each is named so the author can fix the patch source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `klp_enable_patch`: an object whose `funcs` is NULL (-EINVAL).
    #[error(
        "its klp_object has funcs == NULL, which klp_enable_patch refuses with -EINVAL; point \
         .funcs at a klp_func array (an empty one, `{{ }}`, for an object with only callbacks)"
    )]
    NoFuncs,
    /// `klp_init_object`: a module name of MODULE_NAME_LEN bytes or more.
    #[error(
        "its name is {len} bytes; klp_init_object refuses names of {MODULE_NAME_LEN} \
         (MODULE_NAME_LEN) bytes or more with -EINVAL"
    )]
    NameTooLong {
        /// The name's length.
        len: usize,
    },
    /// Two objects of one name: klp's sysfs directory for the second
    /// cannot be created (-EEXIST).
    #[error(
        "the patch has two klp_objects for it, which klp refuses with -EEXIST (each object is \
         a sysfs directory of the patch); merge their klp_funcs into one object"
    )]
    Duplicate,
    /// `klp_init_func`: a function without `old_name` (-EINVAL).
    #[error("the klp_func at {at} has no old_name, which klp_init_func refuses with -EINVAL")]
    NoOldName {
        /// Where the klp_func is in the module.
        at: String,
    },
    /// `klp_init_func`: a function without `new_func` (-EINVAL).
    #[error(
        "klp_func `{func}` has no new_func, which klp_init_func refuses with -EINVAL; set it \
         to the replacement function"
    )]
    NoNewFunc {
        /// `old_name`.
        func: String,
    },
    /// `klp_init_func`: an `old_name` of KSYM_NAME_LEN bytes or more.
    #[error(
        "a klp_func's old_name is {len} bytes (starting `{start}`); klp_init_func refuses \
         names of {KSYM_NAME_LEN} (KSYM_NAME_LEN) bytes or more with -EINVAL"
    )]
    OldNameTooLong {
        /// The name's length.
        len: usize,
        /// Its first 32 bytes.
        start: String,
    },
    /// Two functions of one name and position in one object: klp's sysfs
    /// entry `name,sympos` for the second cannot be created (-EEXIST;
    /// sympos 0 is entry 1, as a unique symbol is the first).
    #[error(
        "it patches `{func}`,{sympos} twice (old_sympos 0 and 1 are the same function to \
         klp), which klp refuses with -EEXIST (each function is a sysfs entry of the \
         object); keep one klp_func for it"
    )]
    DuplicateFunc {
        /// `old_name`.
        func: String,
        /// The position klp names it by (0 counts as 1).
        sympos: u64,
    },
}

/// An object's name as klp's sysfs shows it.
fn object_name(name: Option<&str>) -> &str {
    name.unwrap_or("vmlinux")
}

pub(super) fn refuse(object: Option<&str>, refusal: Refusal) -> ModuleError {
    ModuleError::KlpRefuses {
        object: object_name(object).to_owned(),
        refusal,
    }
}

/// What a livepatch module asks for, as klp would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// The module's name (`mod->name`), which klp uses as the patch name.
    pub name: String,
    /// `.replace`: a cumulative patch that replaces all older ones.
    pub replace: bool,
    /// `.objs`: vmlinux and the modules it patches, in array order.
    pub objects: Vec<Object>,
    /// `.states`: the system states it declares (`klp_state`), for
    /// klp's compatibility check against the patches already applied.
    pub states: Vec<State>,
    /// Where the `struct klp_patch` itself is, when the module file holds
    /// one (kpatch-build's modules build theirs at init): what the guest's
    /// klp finds on `klp_patches` while one of the patch's callbacks runs
    /// (see [`crate::register::livepatch`]).
    pub place: Option<Place>,
}

/// One `struct klp_object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// `None` is vmlinux; `Some` names a kernel module, resolved against
    /// that module's own symbols when it is loaded.
    pub name: Option<String>,
    /// `.funcs`, in array order.
    pub funcs: Vec<Func>,
    /// `.callbacks`.
    pub callbacks: Callbacks,
    /// Where the `struct klp_object` itself is: its linked address is the
    /// argument every callback gets.
    pub place: Place,
}

/// One `struct klp_func`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Func {
    /// `.old_name`: the function to replace, looked up in its object's
    /// symbols (kallsyms for vmlinux).
    pub old_name: String,
    /// klp's rule: 0 = the name must be unique, n = the n-th of that name.
    pub old_sympos: u64,
    /// `.new_func`: the replacement, in the module's text.
    pub new_func: CodeRef,
}

/// Code in the module that klp data points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRef {
    /// Where the code is in the module.
    pub place: Place,
    /// The module's symbol at that place, if it has one.
    pub symbol: Option<String>,
}

/// `klp_object.callbacks`: which are set, and to what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Callbacks {
    /// Runs before the object is patched; a non-zero return refuses it.
    pub pre_patch: Option<CodeRef>,
    /// Runs after the object is patched.
    pub post_patch: Option<CodeRef>,
    /// Runs before the object is unpatched.
    pub pre_unpatch: Option<CodeRef>,
    /// Runs after the object is unpatched.
    pub post_unpatch: Option<CodeRef>,
}

/// One `struct klp_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// `.id`: which system state (chosen by the patch authors).
    pub id: u64,
    /// `.version`: a later patch must declare at least this version.
    pub version: u32,
}

/// Offsets and sizes from the guest's BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layouts {
    patch_size: u64,
    patch_mod: u64,
    patch_objs: u64,
    patch_states: u64,
    pub(super) patch_replace: Field,
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

/// The klp structure layouts a module is read with: from a guest's BTF
/// (what the VMM uses: exact for the guest it patches), or klpvisor's
/// built-in x86-64 layouts, for reading a module with no guest at hand
/// (`patcher info`).
///
/// `struct bug_entry`'s layout comes along: the module's `__bug_table` is
/// read with it (see [`super::tables`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KlpLayouts {
    pub(super) klp: Layouts,
    /// `None`: the kernel has no x86-64 relative-pointer `bug_entry`, and
    /// a module with BUG/WARN sites is refused.
    pub(super) bug: Option<BugLayout>,
}

impl KlpLayouts {
    /// The layouts in `btf` (a guest kernel's, or any kernel's
    /// `/sys/kernel/btf/vmlinux`); an error names what it lacks.
    pub fn from_btf(btf: &Btf) -> Result<Self, ModuleError> {
        Ok(Self {
            klp: Layouts::from_btf(btf)?,
            bug: BugLayout::from_btf(btf),
        })
    }

    /// The layouts in a raw BTF file (`/sys/kernel/btf/vmlinux` of a
    /// machine running the guest's kernel), for reading a module offline
    /// for a kernel the built-in layouts do not fit.
    pub fn from_btf_bytes(bytes: &[u8]) -> Result<Self, ModuleError> {
        let btf = Btf::parse(bytes).map_err(ModuleError::BadBtf)?;
        Self::from_btf(&btf)
    }

    /// x86-64 Linux 6.1 to 6.12 without `CONFIG_DEBUG_KOBJECT_RELEASE`
    /// (Debian's cloud and generic kernels among them): include/linux/livepatch.h
    /// did not change the members or the sizes the reader depends on in
    /// that range. Offline inspection has no guest BTF, and a struct
    /// klp_patch cannot be found in a module without these; a kernel
    /// configured otherwise is read with [`Self::from_btf`].
    pub fn builtin() -> Self {
        // A kobject is 64 bytes, a list_head 16, a work_struct and a
        // completion 32 each, on x86-64 without lockdep or kobject debug.
        let klp = Layouts {
            patch_size: 200,
            patch_mod: 0,
            patch_objs: 8,
            patch_states: 16,
            patch_replace: Field {
                offset: 24,
                size: 1,
            },
            obj_size: 168,
            obj_name: 0,
            obj_funcs: 8,
            obj_callbacks: [16, 24, 32, 40],
            func_size: 152,
            func_old_name: 0,
            func_new_func: 8,
            func_old_sympos: Field {
                offset: 16,
                size: 8,
            },
            state_size: 24,
            state_id: Field { offset: 0, size: 8 },
            state_version: Field { offset: 8, size: 4 },
            module_name: Field {
                offset: 24,
                size: MODULE_NAME_LEN as u64,
            },
        };
        // CONFIG_DEBUG_BUGVERBOSE (Debian's): bug_addr_disp, file_disp,
        // line, flags.
        let bug = BugLayout {
            size: 12,
            file: Some(4),
            line: Some(8),
            flags: 10,
        };
        Self {
            klp,
            bug: Some(bug),
        }
    }
}

/// An integer field: offset and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Field {
    pub(super) offset: u64,
    pub(super) size: u64,
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
pub(super) enum Ptr {
    Null,
    /// Into one of the module's sections.
    Local(Place),
    /// To THIS_MODULE.
    ThisModule,
    /// To an undefined (kernel) symbol.
    External(usize),
}

/// Reads klp structures from the raw ELF.
pub(super) struct Reader<'a> {
    pub(super) elf: &'a RawElf,
    /// R_X86_64_64 relocations by (section, offset) -> index in elf.relas.
    pointers: std::collections::HashMap<(usize, u64), usize>,
    pub(super) l: Layouts,
}

impl<'a> Reader<'a> {
    pub(super) fn new(elf: &'a RawElf, layouts: &KlpLayouts) -> Self {
        let mut pointers = std::collections::HashMap::new();
        for (i, r) in elf.relas.iter().enumerate() {
            if r.r_type == elf::R_X86_64_64 && !r.klp {
                pointers.insert((r.target, r.offset), i);
            }
        }
        Self {
            elf,
            pointers,
            l: layouts.klp,
        }
    }

    pub(super) fn section(&self, index: usize) -> Result<&'a RawSection, ModuleError> {
        self.elf
            .sections
            .get(index)
            .ok_or_else(|| bad(format!("section {index} does not exist")))
    }

    pub(super) fn bytes(&self, at: Place, len: u64) -> Result<&'a [u8], ModuleError> {
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

    pub(super) fn uint(&self, at: Place, size: u64) -> Result<u64, ModuleError> {
        let b = self.bytes(at, size)?;
        let mut v = [0u8; 8];
        v.get_mut(..b.len())
            .ok_or_else(|| bad("integer wider than 8 bytes".into()))?
            .copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    }

    pub(super) fn ptr(&self, at: Place) -> Result<Ptr, ModuleError> {
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
    pub(super) fn string(&self, field: Place, what: &str) -> Result<Option<String>, ModuleError> {
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
            .take(MAX_STRING + 1)
            .position(|&b| b == 0)
            .ok_or_else(|| {
                bad(format!(
                    "{what} in {} is not a NUL-terminated string of at most {MAX_STRING} bytes",
                    s.name
                ))
            })?;
        Ok(Some(String::from_utf8_lossy(&tail[..end]).into_owned()))
    }

    /// A pointer that must be code in the module (or NULL).
    pub(super) fn code(&self, field: Place, what: &str) -> Result<Option<CodeRef>, ModuleError> {
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
            // A patch klp would refuse is still the patch: read_patch
            // reports why klp refuses it.
            && match self.objects(objs) {
                Ok(_) | Err(ModuleError::KlpRefuses { .. }) => true,
                Err(_) => false,
            }
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
            let object = name.as_deref();
            if let Some(n) = object.filter(|n| n.len() >= MODULE_NAME_LEN) {
                return Err(refuse(object, Refusal::NameTooLong { len: n.len() }));
            }
            let funcs = match funcs {
                Ptr::Local(p) => self.funcs(p, object)?,
                Ptr::Null => return Err(refuse(object, Refusal::NoFuncs)),
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

    /// The `klp_func` array of object `object`, refused as klp's
    /// `klp_init_func` and sysfs would refuse it.
    fn funcs(&self, start: Place, object: Option<&str>) -> Result<Vec<Func>, ModuleError> {
        let l = self.l;
        let funcs = self.array(start, l.func_size, "klp_func", |at| {
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
                (None, _) => Err(refuse(
                    object,
                    Refusal::NoOldName {
                        at: self.describe(at),
                    },
                )),
                (Some(old_name), _) if old_name.len() >= KSYM_NAME_LEN => Err(refuse(
                    object,
                    Refusal::OldNameTooLong {
                        len: old_name.len(),
                        start: old_name.chars().take(32).collect(),
                    },
                )),
                (Some(func), None) => Err(refuse(object, Refusal::NoNewFunc { func })),
                (Some(old_name), Some(new_func)) => Ok(Some(Func {
                    old_name,
                    old_sympos,
                    new_func,
                })),
            }
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for f in &funcs {
            let sympos = f.old_sympos.max(1);
            if !seen.insert((f.old_name.as_str(), sympos)) {
                return Err(refuse(
                    object,
                    Refusal::DuplicateFunc {
                        func: f.old_name.clone(),
                        sympos,
                    },
                ));
            }
        }
        Ok(funcs)
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
    pub(super) fn module_name(&self) -> Option<String> {
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

pub(super) fn bad(msg: String) -> ModuleError {
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
    read_patch_with(
        elf,
        &KlpLayouts::from_btf(btf)?,
        livepatch_marked,
        modinfo_name,
    )
}

/// [`read_patch`] with layouts given rather than read from a BTF (see
/// [`KlpLayouts::builtin`]).
pub fn read_patch_with(
    elf: &RawElf,
    layouts: &KlpLayouts,
    livepatch_marked: bool,
    modinfo_name: Option<&str>,
) -> Result<Patch, ModuleError> {
    let r = Reader::new(elf, layouts);
    let at = match r.find_patch(livepatch_marked) {
        Ok(at) => at,
        // kpatch-build's modules build their klp_patch at init time.
        Err(e @ ModuleError::NotLivepatch(_)) => {
            return match super::kpatch::read(&r, livepatch_marked, modinfo_name)? {
                Some(p) => Ok(p),
                None => Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let l = r.l;
    let field = |off: u64| Place {
        offset: at.offset + off,
        ..at
    };
    let objects = match r.ptr(field(l.patch_objs))? {
        Ptr::Local(p) => r.objects(p)?,
        _ => return Err(bad("klp_patch.objs does not point into the module".into())),
    };
    // klp accepts an empty object array (a replace patch without objects
    // takes every older patch out of use); it refuses two objects of one
    // name.
    for (i, o) in objects.iter().enumerate() {
        if objects[..i].iter().any(|p| p.name == o.name) {
            return Err(refuse(o.name.as_deref(), Refusal::Duplicate));
        }
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
        place: Some(at),
    })
}

#[cfg(test)]
mod tests {
    use super::super::elf::{RawRela, RawSymbol};
    use super::*;
    use klpvisor_guest::btf::synth::BtfBuilder;

    /// The built-in layouts are those of Linux 6.1's livepatch.h as gcc
    /// lays them out (the fuzz fixture, compiled from a copy of it).
    #[test]
    fn builtin_layouts_are_linux_6_1s() {
        let btf = Btf::parse(include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/fixtures/klp.btf"
        )))
        .unwrap();
        // (The fixture has no struct bug_entry.)
        assert_eq!(
            KlpLayouts::from_btf(&btf).unwrap().klp,
            KlpLayouts::builtin().klp
        );
    }

    /// The klp structures of a 64-bit kernel, in miniature.
    fn btf() -> Btf {
        let mut b = BtfBuilder::new();
        let ulong = b.int("long unsigned int", 8);
        let uint = b.int("unsigned int", 4);
        let int = b.int("int", 4);
        let boolean = b.int("_Bool", 1);
        let char_ = b.int("char", 1);
        let ptr = b.ptr(char_);
        let name = b.array(char_, int, MODULE_NAME_LEN as u32);
        b.composite(false, "module", 64, &[("name", name, 0, 0)]);
        let cbs = b.composite(
            false,
            "klp_callbacks",
            32,
            &[
                ("pre_patch", ptr, 0, 0),
                ("post_patch", ptr, 64, 0),
                ("pre_unpatch", ptr, 128, 0),
                ("post_unpatch", ptr, 192, 0),
            ],
        );
        b.composite(
            false,
            "klp_patch",
            32,
            &[
                ("mod", ptr, 0, 0),
                ("objs", ptr, 64, 0),
                ("states", ptr, 128, 0),
                ("replace", boolean, 192, 0),
            ],
        );
        b.composite(
            false,
            "klp_object",
            48,
            &[
                ("name", ptr, 0, 0),
                ("funcs", ptr, 64, 0),
                ("callbacks", cbs, 128, 0),
            ],
        );
        b.composite(
            false,
            "klp_func",
            24,
            &[
                ("old_name", ptr, 0, 0),
                ("new_func", ptr, 64, 0),
                ("old_sympos", ulong, 128, 0),
            ],
        );
        b.composite(
            false,
            "klp_state",
            16,
            &[("id", ulong, 0, 0), ("version", uint, 64, 0)],
        );
        Btf::parse(&b.build()).unwrap()
    }

    /// Section indices of the synthetic module.
    const TEXT: usize = 1;
    const DATA: usize = 2;
    const STR: usize = 3;
    const MODULE: usize = 4;

    /// A synthetic livepatch module: a `klp_patch` at `.data`+0 whose
    /// objects follow at +0x40, each object's funcs at +0x400 + 0x100 * i.
    /// `objs`: (name, funcs as (old_name, new_func set, sympos), or None
    /// for funcs == NULL).
    struct Ko {
        elf: RawElf,
        strings: Vec<u8>,
    }

    impl Ko {
        fn new() -> Self {
            let section = |name: &str, flags: u32, size: u64| RawSection {
                name: name.to_owned(),
                sh_type: elf::SHT_PROGBITS,
                flags: u64::from(flags),
                size,
                align: 8,
                data: vec![0; size as usize],
            };
            let sym = |name: &str, shndx: u16, kind: u8| RawSymbol {
                name: name.to_owned(),
                shndx,
                value: 0,
                size: 0,
                bind: elf::STB_LOCAL,
                kind,
            };
            let mut module = section(THIS_MODULE, elf::SHF_ALLOC | elf::SHF_WRITE, 64);
            module.data[..5].copy_from_slice(b"lp_t\0");
            let elf = RawElf {
                sections: vec![
                    section("", 0, 0),
                    section(".text", elf::SHF_ALLOC | elf::SHF_EXECINSTR, 0x100),
                    section(".data", elf::SHF_ALLOC | elf::SHF_WRITE, 0x1000),
                    section(".rodata.str", elf::SHF_ALLOC, 0x1000),
                    module,
                ],
                symbols: vec![
                    sym("", 0, elf::STT_NOTYPE),
                    sym(".text", TEXT as u16, elf::STT_SECTION),
                    sym(".data", DATA as u16, elf::STT_SECTION),
                    sym(".rodata.str", STR as u16, elf::STT_SECTION),
                    sym("__this_module", MODULE as u16, elf::STT_OBJECT),
                ],
                relas: Vec::new(),
            };
            let mut ko = Self {
                elf,
                strings: vec![0],
            };
            ko.ptr(0, MODULE, 0);
            ko.ptr(8, DATA, 0x40);
            ko
        }

        /// A pointer at .data+`at` to `section`+`addend`.
        fn ptr(&mut self, at: u64, section: usize, addend: i64) {
            self.elf.relas.push(RawRela {
                target: DATA,
                rela_section: 0,
                offset: at,
                r_type: elf::R_X86_64_64,
                symbol: section,
                addend,
                klp: false,
            });
        }

        fn string(&mut self, at: u64, s: &str) {
            let off = self.strings.len() as i64;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            self.ptr(at, STR, off);
        }

        /// Object `i` named `name`, with `funcs` ((old_name, sympos);
        /// None: funcs == NULL).
        fn object(mut self, i: u64, name: Option<&str>, funcs: Option<&[(&str, u64)]>) -> Self {
            let at = 0x40 + 48 * i;
            if let Some(n) = name {
                self.string(at, n);
            }
            if let Some(funcs) = funcs {
                let base = 0x400 + 0x100 * i;
                self.ptr(at + 8, DATA, base as i64);
                for (j, (old, sympos)) in funcs.iter().enumerate() {
                    let f = base + 24 * j as u64;
                    if !old.is_empty() {
                        self.string(f, old);
                    }
                    self.ptr(f + 8, TEXT, 0x10);
                    self.elf.sections[DATA].data[f as usize + 16..f as usize + 24]
                        .copy_from_slice(&sympos.to_le_bytes());
                }
            }
            self
        }

        fn read(mut self) -> Result<Patch, ModuleError> {
            let n = self.strings.len();
            self.elf.sections[STR].data[..n].copy_from_slice(&self.strings);
            read_patch(&self.elf, &btf(), true, None)
        }
    }

    fn refusal(r: Result<Patch, ModuleError>) -> (String, Refusal) {
        match r {
            Err(ModuleError::KlpRefuses { object, refusal }) => (object, refusal),
            other => panic!("expected a klp refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_patch_is_read() {
        let p = Ko::new()
            .object(0, None, Some(&[("cmdline_proc_show", 0), ("f", 2)]))
            .read()
            .unwrap();
        assert_eq!(p.name, "lp_t");
        assert_eq!(p.objects.len(), 1);
        assert_eq!(p.objects[0].funcs[1].old_sympos, 2);
    }

    /// klp_enable_patch: `if (!obj->funcs) return -EINVAL;` for every
    /// object (a NULL name and NULL funcs ends the array instead).
    #[test]
    fn an_object_without_funcs_is_refused_naming_it() {
        let r = Ko::new()
            .object(0, None, Some(&[("f", 0)]))
            .object(1, Some("ext4"), None)
            .read();
        let err = r.as_ref().map(drop).unwrap_err().to_string();
        assert_eq!(refusal(r), ("ext4".into(), Refusal::NoFuncs));
        assert!(
            err.contains("object `ext4`") && err.contains("-EINVAL"),
            "{err}"
        );
        // An empty funcs array is fine: an object with only callbacks.
        let p = Ko::new()
            .object(0, None, Some(&[("f", 0)]))
            .object(1, Some("ext4"), Some(&[]))
            .read()
            .unwrap();
        assert!(p.objects[1].funcs.is_empty());
    }

    /// klp_init_object and klp_init_func refuse over-long names; sysfs
    /// refuses a second object or function of one name (sympos 0 is 1).
    #[test]
    fn what_klp_init_object_and_klp_init_func_refuse_is_refused() {
        let long = "m".repeat(MODULE_NAME_LEN);
        let r = Ko::new().object(0, Some(&long), Some(&[("f", 0)])).read();
        assert_eq!(refusal(r).1, Refusal::NameTooLong { len: 56 });
        let ok = "m".repeat(MODULE_NAME_LEN - 1);
        assert!(Ko::new()
            .object(0, Some(&ok), Some(&[("f", 0)]))
            .read()
            .is_ok());

        let long = "f".repeat(KSYM_NAME_LEN);
        let r = Ko::new().object(0, None, Some(&[(&long, 0)])).read();
        assert!(matches!(
            refusal(r),
            (o, Refusal::OldNameTooLong { len: 512, .. }) if o == "vmlinux"
        ));

        let r = Ko::new()
            .object(0, None, Some(&[("f", 0), ("f", 1)]))
            .read();
        assert_eq!(
            refusal(r).1,
            Refusal::DuplicateFunc {
                func: "f".into(),
                sympos: 1
            }
        );
        assert!(Ko::new()
            .object(0, None, Some(&[("f", 1), ("f", 2)]))
            .read()
            .is_ok());

        let r = Ko::new()
            .object(0, None, Some(&[("f", 0)]))
            .object(1, None, Some(&[("g", 0)]))
            .read();
        assert_eq!(refusal(r), ("vmlinux".into(), Refusal::Duplicate));

        // A klp_func with a sympos but no old_name.
        let r = Ko::new().object(0, None, Some(&[("", 3)])).read();
        assert!(matches!(refusal(r).1, Refusal::NoOldName { .. }));
    }

    /// klp_enable_patch accepts an empty object array: a replace patch
    /// without objects takes every older patch out of use.
    #[test]
    fn a_patch_without_objects_is_accepted_as_klp_accepts_it() {
        let p = Ko::new().read().unwrap();
        assert!(p.objects.is_empty());
    }
}

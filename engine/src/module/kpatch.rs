//! kpatch-build's livepatch modules.
//!
//! kpatch-build (the tool distributions use to turn a source fix into a
//! livepatch) does not write a static `struct klp_patch`. Its module holds
//! the fixed functions and a description of the patch in kpatch's own
//! sections, and kpatch's patch hook (`livepatch-patch-hook.c`, linked in
//! with `kpatch.lds`) builds the `klp_patch` from them at init time and
//! enables it. klpvisor runs no module init, so it reads the description
//! as the hook reads it and builds the same patch:
//!
//! * `.kpatch.funcs`: an array of `struct kpatch_patch_func` (kpatch's
//!   `kpatch-patch.h`): `new_addr`, `new_size`, `old_addr`, `old_size`,
//!   `sympos`, `name`, `objname`, eight bytes each; the pointers are
//!   relocations, the names point into `.kpatch.strings`. Each entry
//!   becomes a `klp_func { old_name = name, new_func = new_addr,
//!   old_sympos = sympos }` of the object `objname` ("vmlinux" is the
//!   kernel). The hook threads objects and functions onto lists with
//!   `list_add`, so the patch's objects come in the reverse order of their
//!   first entry, and each object's functions in reverse entry order.
//! * `lpatch->replace = KLP_REPLACE_ENABLE`: a compile-time constant
//!   (kpatch-build's default is a replace patch; `--non-replace` makes it
//!   false). It lives only in the hook's init code, so it is read there:
//!   the one byte store to `klp_patch.replace` (offset from the guest's
//!   BTF) that `patch_init` makes.
//! * `.kpatch.callbacks.*` (kpatch's `KPATCH_*_CALLBACK` macros) and
//!   `.kpatch.force`: refused for now. A callback gets the `klp_object` the
//!   hook allocates at init time, which has no place in the module file.
//! * The functions' relocations against symbols of the patched objects
//!   are already klp relocations (`.klp.rela.*`, `.klp.sym.*`): kpatch's
//!   create-klp-module writes them, and the linker applies them as any.

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
use object::elf;

use super::klp::{
    refuse, Callbacks, Func, Object, Patch, Reader, Refusal, KSYM_NAME_LEN, MODULE_NAME_LEN,
};
use super::{ModuleError, Place};

/// `sizeof(struct kpatch_patch_func)` on x86-64: seven 8-byte fields.
pub const FUNC_SIZE: u64 = 56;
const NEW_ADDR: u64 = 0;
const SYMPOS: u64 = 32;
const NAME: u64 = 40;
const OBJNAME: u64 = 48;
/// The patch hook's init function (a static function; `init_module` is
/// its alias).
const INIT: [&str; 2] = ["patch_init", "init_module"];
/// Sections kpatch's callbacks and force macros fill.
const REFUSED: [&str; 5] = [
    ".kpatch.callbacks.pre_patch",
    ".kpatch.callbacks.post_patch",
    ".kpatch.callbacks.pre_unpatch",
    ".kpatch.callbacks.post_unpatch",
    ".kpatch.force",
];
/// The most instructions of the init function decoded.
const MAX_INIT_INSNS: usize = 20_000;

fn kpatch(msg: String) -> ModuleError {
    ModuleError::Kpatch(msg)
}

/// The patch a kpatch-build module's hook would build, or `None` if the
/// module is not one (no `.kpatch.funcs`).
pub(super) fn read(
    r: &Reader<'_>,
    livepatch_marked: bool,
    modinfo_name: Option<&str>,
) -> Result<Option<Patch>, ModuleError> {
    let Some((funcs_sec, sec)) = r.elf.section_by_name(".kpatch.funcs") else {
        return Ok(None);
    };
    if !livepatch_marked {
        return Err(ModuleError::NotLivepatch(
            "it has kpatch's .kpatch.funcs but lacks MODULE_INFO(livepatch, \"Y\"), which \
             kpatch's livepatch hook adds: was it built for kpatch.ko (kpatch-build without \
             livepatch support)?"
                .into(),
        ));
    }
    for name in REFUSED {
        if let Some((index, _)) = r.elf.section_by_name(name) {
            // kpatch.lds pads each with eight zero bytes; an entry is a
            // pointer (a relocation).
            if r.elf.relas.iter().any(|x| x.target == index) {
                return Err(kpatch(format!(
                    "it uses {name} (kpatch's callback or force macros), which klpvisor does \
                     not support yet: the callbacks take the klp_object kpatch's hook \
                     allocates at init time"
                )));
            }
        }
    }
    if sec.size % FUNC_SIZE != 0 {
        return Err(kpatch(format!(
            ".kpatch.funcs is {} bytes, not a whole number of {FUNC_SIZE}-byte struct \
             kpatch_patch_func",
            sec.size
        )));
    }
    // (objname, its funcs), in the order of the first entry of each.
    let mut objects: Vec<(String, Vec<Func>, Place)> = Vec::new();
    for i in 0..sec.size / FUNC_SIZE {
        let at = Place {
            section: funcs_sec,
            offset: i * FUNC_SIZE,
        };
        let f = |off: u64| Place {
            offset: at.offset + off,
            ..at
        };
        let what = |field: &str| format!(".kpatch.funcs[{i}].{field}");
        let name = r
            .string(f(NAME), &what("name"))?
            .ok_or_else(|| kpatch(format!("{} is NULL", what("name"))))?;
        let objname = r
            .string(f(OBJNAME), &what("objname"))?
            .ok_or_else(|| kpatch(format!("{} is NULL", what("objname"))))?;
        let new_func = r
            .code(f(NEW_ADDR), &what("new_addr"))?
            .ok_or_else(|| kpatch(format!("{} is NULL", what("new_addr"))))?;
        let old_sympos = r.uint(f(SYMPOS), 8)?;
        let func = Func {
            old_name: name,
            old_sympos,
            new_func,
        };
        match objects.iter_mut().find(|(o, _, _)| *o == objname) {
            Some((_, funcs, _)) => funcs.push(func),
            None => objects.push((objname, vec![func], at)),
        }
    }
    // list_add: newest first, for objects and for each object's funcs.
    let objects: Vec<Object> = objects
        .into_iter()
        .rev()
        .map(|(objname, mut funcs, place)| {
            funcs.reverse();
            Object {
                name: (objname != "vmlinux").then_some(objname),
                funcs,
                callbacks: Callbacks::default(),
                place,
            }
        })
        .collect();
    // What klp_init_object / klp_init_func and klp's sysfs refuse, as for
    // a static klp_patch (the hook builds one from this).
    for o in &objects {
        let name = o.name.as_deref();
        if let Some(n) = name.filter(|n| n.len() >= MODULE_NAME_LEN) {
            return Err(refuse(name, Refusal::NameTooLong { len: n.len() }));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &o.funcs {
            if f.old_name.len() >= KSYM_NAME_LEN {
                return Err(refuse(
                    name,
                    Refusal::OldNameTooLong {
                        len: f.old_name.len(),
                        start: f.old_name.chars().take(32).collect(),
                    },
                ));
            }
            let sympos = f.old_sympos.max(1);
            if !seen.insert((f.old_name.as_str(), sympos)) {
                return Err(refuse(
                    name,
                    Refusal::DuplicateFunc {
                        func: f.old_name.clone(),
                        sympos,
                    },
                ));
            }
        }
    }
    let replace = replace_from_init(r)?;
    let name = r
        .module_name()
        .or_else(|| modinfo_name.map(str::to_owned))
        .ok_or_else(|| {
            kpatch("the module has no name (no struct module, no modinfo name)".into())
        })?;
    Ok(Some(Patch {
        name,
        replace,
        objects,
        states: Vec::new(),
        place: None,
    }))
}

/// `KLP_REPLACE_ENABLE` as compiled into the hook's init function: the
/// value of its byte store to `klp_patch.replace`.
fn replace_from_init(r: &Reader<'_>) -> Result<bool, ModuleError> {
    let field = r.l.patch_replace;
    if field.size != 1 {
        return Err(kpatch(format!(
            "klp_patch.replace is {} bytes in this kernel, not a bool",
            field.size
        )));
    }
    let init = r
        .elf
        .symbols
        .iter()
        .filter(|s| s.kind == elf::STT_FUNC)
        .find_map(|s| INIT.iter().position(|n| *n == s.name).map(|rank| (rank, s)))
        .map(|(_, s)| s)
        .ok_or_else(|| kpatch("no patch_init (kpatch's hook) to read .replace from".into()))?;
    let section = r
        .elf
        .symbol_section(init)
        .ok_or_else(|| kpatch("patch_init is in no section".into()))?;
    let code = r.bytes(
        Place {
            section,
            offset: init.value,
        },
        init.size,
    )?;
    let mut stores = Vec::new();
    let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    for insn in d.iter().take(MAX_INIT_INSNS) {
        if insn.mnemonic() == Mnemonic::Mov
            && insn.op_count() == 2
            && insn.op0_kind() == OpKind::Memory
            && insn.op1_kind() == OpKind::Immediate8
            && insn.memory_size() == iced_x86::MemorySize::UInt8
            && insn.memory_displacement64() == field.offset
            && insn.memory_index() == iced_x86::Register::None
        {
            stores.push(insn.immediate8());
        }
    }
    stores.dedup();
    match stores.as_slice() {
        [v] => Ok(*v != 0),
        [] => Err(kpatch(format!(
            "patch_init stores no constant to klp_patch.replace (offset {:#x}): cannot tell \
             whether this is a replace patch",
            field.offset
        ))),
        _ => Err(kpatch(format!(
            "patch_init stores different constants at klp_patch.replace's offset ({:#x}): \
             cannot tell whether this is a replace patch",
            field.offset
        ))),
    }
}

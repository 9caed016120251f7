//! Symbol resolution against the guest's kallsyms.
//!
//! Rules, and why:
//! * An old function (`klp_func.old_name`, `old_sympos`) follows klp's
//!   `klp_find_object_symbol`: every kallsyms symbol of that name counts,
//!   local or global; sympos 0 means the name must be unique, n picks the
//!   n-th in kallsyms order.
//! * A `.klp.sym.vmlinux.<name>,<sympos>` symbol follows the same rule
//!   (klp_resolve_symbols).
//! * An ordinary undefined symbol must be a unique *global* symbol. The
//!   kernel's module loader would accept only exported symbols; kallsyms
//!   does not say which are exported, but modpost already refused to build
//!   a module using an unexported one, and a static (local) kernel
//!   function may only be reached by a `.klp.sym` reference with a sympos,
//!   so the unique global of that name is what the loader would pick.
//! * An undefined weak symbol that cannot be resolved is 0, as in the
//!   kernel's simplify_symbols.
//! * A module object's old functions and `.klp.sym.<module>.*` symbols
//!   are looked up in that module's own kallsyms only, as klp's
//!   `klp_find_object_symbol` does through `module_kallsyms_on_each_symbol`:
//!   sympos counts within the module, in its table order. A symbol of a
//!   module that is not loaded gets no value; the relocations using it are
//!   left for when it loads (klp applies them in `klp_module_coming`).

use std::collections::HashMap;

use super::{LinkError, Unresolved};
use crate::module::{Module, SymbolDef};
use klpvisor_guest::{Kallsyms, LoadedModule, ModuleState};

/// The guest's symbols a patch links against: vmlinux's kallsyms and the
/// modules loaded now.
#[derive(Debug, Clone, Copy)]
pub struct GuestSymbols<'a> {
    /// vmlinux's symbols.
    pub kallsyms: &'a Kallsyms,
    /// Every module on the guest's list (loaded or not yet formed).
    pub modules: &'a [LoadedModule],
}

impl<'a> GuestSymbols<'a> {
    /// vmlinux alone (no module is loaded, or none matters).
    pub fn vmlinux(kallsyms: &'a Kallsyms) -> Self {
        Self {
            kallsyms,
            modules: &[],
        }
    }

    /// The module `name` if it is loaded far enough to be patched: live,
    /// or coming (klp patches a coming module before its init runs). A
    /// module going away or not formed yet counts as not loaded.
    pub fn module(&self, name: &str) -> Option<&'a LoadedModule> {
        self.modules
            .iter()
            .find(|m| m.name == name && matches!(m.state, ModuleState::Live | ModuleState::Coming))
    }
}

/// The old function `name` of loaded module `module`, by klp's sympos rule
/// counted within the module. Returns (address, st_size).
pub fn old_module_function(
    module: &LoadedModule,
    name: &str,
    sympos: u64,
) -> Result<(u64, u64), LinkError> {
    let found = module.lookup(name);
    let err_module = || module.name.clone();
    match (found.as_slice(), sympos) {
        ([], _) => Err(LinkError::ModuleFunctionNotFound {
            module: err_module(),
            name: name.into(),
        }),
        ([one], 0) => Ok((one.symbol.addr, one.symbol.size)),
        (many, 0) => Err(LinkError::ModuleFunctionAmbiguous {
            module: err_module(),
            name: name.into(),
            candidates: many.iter().map(|f| (f.sympos, f.symbol.addr)).collect(),
        }),
        (all, n) => all
            .iter()
            .find(|f| u64::from(f.sympos) == n)
            .map(|f| (f.symbol.addr, f.symbol.size))
            .ok_or(LinkError::ModuleFunctionNoSuchPosition {
                module: err_module(),
                name: name.into(),
                sympos: n,
                count: all.len(),
            }),
    }
}

/// klp's sympos rule on one module's symbols, for `.klp.sym` symbols.
fn module_symbol(module: &LoadedModule, name: &str, sympos: u32) -> Result<u64, String> {
    old_module_function(module, name, u64::from(sympos))
        .map(|(addr, _)| addr)
        .map_err(|e| e.to_string())
}

/// The address of an old function by klp's sympos rule.
pub fn old_function(kallsyms: &Kallsyms, name: &str, sympos: u64) -> Result<u64, LinkError> {
    let found = kallsyms.lookup(name);
    if found.is_empty() {
        return Err(LinkError::OldFunctionNotFound { name: name.into() });
    }
    if sympos == 0 {
        return match found.as_slice() {
            [one] => Ok(one.symbol.addr),
            many => Err(LinkError::OldFunctionAmbiguous {
                name: name.into(),
                candidates: many.iter().map(|f| (f.sympos, f.symbol.addr)).collect(),
            }),
        };
    }
    found
        .iter()
        .find(|f| u64::from(f.sympos) == sympos)
        .map(|f| f.symbol.addr)
        .ok_or(LinkError::OldFunctionNoSuchPosition {
            name: name.into(),
            sympos,
            count: found.len(),
        })
}

/// Resolves every symbol the module's relocations use that is not in the
/// module, reporting all failures at once. Returns symbol index -> value.
pub fn externals(
    module: &Module,
    symbols: &GuestSymbols<'_>,
) -> Result<HashMap<usize, u64>, LinkError> {
    let kallsyms = symbols.kallsyms;
    let mut values = HashMap::new();
    let mut unresolved: Vec<Unresolved> = Vec::new();
    // Static keys are named only by `__jump_table`, which is parsed, not
    // loaded: its relocations are not among the module's.
    let mut used: Vec<usize> = module
        .relocs
        .iter()
        .map(|r| r.symbol)
        .chain(module.tables.jumps.iter().map(|j| j.key))
        .collect();
    used.sort_unstable();
    used.dedup();
    for i in used {
        let Some(sym) = module.symbols.get(i) else {
            continue;
        };
        let result = match &sym.def {
            SymbolDef::Undefined if i == 0 => Ok(0),
            SymbolDef::Undefined => global(kallsyms, &sym.name, sym.weak),
            SymbolDef::Klp {
                object,
                name,
                sympos,
            } if object == "vmlinux" => kallsyms.resolve(name, *sympos).map_err(|e| e.to_string()),
            SymbolDef::Klp {
                object,
                name,
                sympos,
            } => match symbols.module(object) {
                Some(m) => module_symbol(m, name, *sympos),
                // Not loaded: its relocations wait with the module.
                None => continue,
            },
            _ => continue,
        };
        match result {
            Ok(v) => {
                values.insert(i, v);
            }
            Err(reason) => unresolved.push(Unresolved {
                name: sym.name.clone(),
                reason,
            }),
        }
    }
    if unresolved.is_empty() {
        Ok(values)
    } else {
        Err(LinkError::Unresolved(unresolved))
    }
}

/// The unique global kallsyms symbol called `name`.
fn global(kallsyms: &Kallsyms, name: &str, weak: bool) -> Result<u64, String> {
    let found = kallsyms.lookup(name);
    let globals: Vec<u64> = found
        .iter()
        .filter(|f| f.symbol.kind.is_ascii_uppercase())
        .map(|f| f.symbol.addr)
        .collect();
    match (globals.as_slice(), found.len()) {
        ([one], _) => Ok(*one),
        ([], 0) if weak => Ok(0),
        ([], 0) => Err("not in the guest kernel".into()),
        ([], n) => Err(format!(
            "the guest kernel has only {n} static (local) symbol(s) of this name; reach it with \
             a .klp.sym.vmlinux.{name},<sympos> relocation (klp-convert)"
        )),
        (many, _) => Err(format!(
            "{} global symbols of this name in the guest kernel",
            many.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use klpvisor_guest::kallsyms::synth::{sample_symbols, Builder, BASE};
    use klpvisor_guest::kallsyms::{Image, Layout};

    fn kallsyms() -> Kallsyms {
        let mut syms = sample_symbols(0);
        let names = [
            ('T', "seq_printf"),
            ('t', "static_fn"),
            ('t', "static_fn"),
            ('T', "twice_global"),
            ('T', "twice_global"),
            ('t', "mixed"),
            ('T', "mixed"),
        ];
        for (i, (k, n)) in names.iter().enumerate() {
            syms.push((*k, (*n).to_owned(), 0xffff_ffff_8100_2000 + i as u64 * 0x10));
        }
        let bytes = Builder::new(Layout::OffsetsFirst, syms).build();
        Kallsyms::from_image(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap()
    }

    #[test]
    fn old_functions_follow_klp_sympos() {
        let k = kallsyms();
        assert_eq!(
            old_function(&k, "seq_printf", 0).unwrap(),
            0xffff_ffff_8100_2000
        );
        assert_eq!(
            old_function(&k, "seq_printf", 1).unwrap(),
            0xffff_ffff_8100_2000
        );
        assert_eq!(
            old_function(&k, "static_fn", 2).unwrap(),
            0xffff_ffff_8100_2020
        );
        match old_function(&k, "static_fn", 0) {
            Err(LinkError::OldFunctionAmbiguous { candidates, .. }) => assert_eq!(
                candidates,
                vec![(1, 0xffff_ffff_8100_2010), (2, 0xffff_ffff_8100_2020)]
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            old_function(&k, "static_fn", 3),
            Err(LinkError::OldFunctionNoSuchPosition {
                count: 2,
                sympos: 3,
                ..
            })
        ));
        assert!(matches!(
            old_function(&k, "static_fn", u64::MAX),
            Err(LinkError::OldFunctionNoSuchPosition { .. })
        ));
        assert!(matches!(
            old_function(&k, "nope", 0),
            Err(LinkError::OldFunctionNotFound { .. })
        ));
    }

    #[test]
    fn undefined_symbols_need_a_unique_global() {
        let k = kallsyms();
        assert_eq!(global(&k, "seq_printf", false), Ok(0xffff_ffff_8100_2000));
        // A local of the same name does not make a global ambiguous.
        assert_eq!(global(&k, "mixed", false), Ok(0xffff_ffff_8100_2060));
        // Per-CPU symbols are global absolutes: their offset is the value.
        assert_eq!(global(&k, "current_task", false), Ok(0x1fb80));
        assert!(global(&k, "static_fn", false)
            .unwrap_err()
            .contains(".klp.sym.vmlinux.static_fn"));
        assert!(global(&k, "twice_global", false)
            .unwrap_err()
            .contains("2 global"));
        assert!(global(&k, "nope", false).is_err());
        assert_eq!(global(&k, "nope", true), Ok(0), "unresolved weak is NULL");
    }
}

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

use std::collections::HashMap;

use super::{LinkError, Unresolved};
use crate::introspect::Kallsyms;
use crate::module::{Module, SymbolDef};

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
pub fn externals(module: &Module, kallsyms: &Kallsyms) -> Result<HashMap<usize, u64>, LinkError> {
    let mut values = HashMap::new();
    let mut unresolved: Vec<Unresolved> = Vec::new();
    let mut used: Vec<usize> = module.relocs.iter().map(|r| r.symbol).collect();
    used.sort_unstable();
    used.dedup();
    for i in used {
        let Some(sym) = module.symbols.get(i) else {
            continue;
        };
        let result = match &sym.def {
            SymbolDef::Undefined if i == 0 => Ok(0),
            SymbolDef::Undefined => global(kallsyms, &sym.name, sym.weak),
            SymbolDef::Klp { name, sympos, .. } => {
                kallsyms.resolve(name, *sympos).map_err(|e| e.to_string())
            }
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

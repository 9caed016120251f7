//! Preparing a new patch: module bytes -> parsed, placed, linked and
//! planned, with nothing written.

use super::{entry, now_unix, Engine, EngineError, FuncRecord, Prepared, Record};
use crate::arena::{Perm, Region};
use crate::link::{
    alternatives, guest_plain_returns, guest_return_thunk, link_objects, Bases, GuestSymbols,
    LinkOptions,
};
use crate::module::{Module, ModuleError};
use crate::site::FtraceRecords;
use crate::write::{Plan, Write};
use klpvisor_guest::Guest;
use klpvisor_guest::Kernel;

impl Engine {
    /// Plans loading livepatch module `ko` and enabling it on top of the
    /// stack (replacing every enabled patch if it is a replace patch).
    pub fn prepare_apply<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        ko: &[u8],
        force: bool,
    ) -> Result<Prepared, EngineError> {
        let release = kernel.uts(guest, "release").ok_or(EngineError::NoRelease)?;
        let module = Module::parse(ko, &kernel.btf, &release)?;
        let name = module.patch.name.clone();
        self.stack.check_new(&name)?;
        self.check_states(&name, module.patch.replace, &module.patch.states)?;
        // Its per-CPU block, if one was allocated for it: until then the
        // link uses 0 and the plan is only looked at (`needs_percpu`).
        let percpu = module.percpu.as_ref().map(|pc| super::percpu::PercpuNeed {
            size: pc.size,
            align: pc.align,
            block: self.percpu_block_for(&name, pc),
        });
        let block = percpu.and_then(|n| n.block);

        // Place the segments on a copy of the arena: the engine's own
        // state changes only when the commit succeeds.
        let facts = self.facts(kernel, guest)?;
        let mut arena = facts.arena.clone();
        let layout = module.layout();
        let mut regions = Vec::new();
        for (size, perm) in [
            (layout.text, Perm::Text),
            (layout.rodata, Perm::ReadOnly),
            (layout.data, Perm::Data),
        ] {
            if size > 0 {
                regions.push(arena.alloc(size, perm)?);
            }
        }
        let base = |perm: Perm| {
            regions
                .iter()
                .find(|r| r.perm == perm)
                .map_or(0, |r: &Region| r.va.0)
        };
        let bases = Bases {
            text: base(Perm::Text),
            rodata: base(Perm::ReadOnly),
            data: base(Perm::Data),
            percpu: block.map_or(0, |b| b.ptr),
        };
        let space = kernel.space(guest);
        let return_thunk = guest_return_thunk(&space, &kernel.kallsyms)?;
        let options = LinkOptions {
            return_thunk,
            plain_returns: guest_plain_returns(&space, &kernel.kallsyms, return_thunk),
            alternatives: if alternatives::used_by(&module) {
                Some(
                    alternatives::guest_cpu(&space, &kernel.kallsyms, &kernel.btf, &release)
                        .map_err(crate::link::LinkError::from)?,
                )
            } else {
                None
            },
        };
        // The modules are read now, only for a patch that has module
        // objects: they come and go while the guest runs.
        let has_modules = module.patch.objects.iter().any(|o| o.name.is_some());
        let modules = if has_modules {
            kernel.modules(guest).map_err(EngineError::Modules)?
        } else {
            Vec::new()
        };
        let symbols = GuestSymbols {
            kallsyms: &kernel.kallsyms,
            modules: &modules,
        };
        let linked = link_objects(&module, &symbols, bases, &options)?;

        // Its struct module and tables, in a data region of their own
        // (crate::register). A guest that cannot take one still gets
        // patches that need none.
        let mut registration = None;
        match &facts.registry {
            Ok(registry) => {
                let region = arena.alloc(registry.size(&module), Perm::Data)?;
                let image = registry.image(&name, &module, &linked, region.va.0)?;
                // Keys the patch cannot follow are refused now, before the
                // pause, not when registering.
                registry.check_keys(&image.jumps)?;
                registration = Some((region, image));
            }
            Err(why) if !module.tables.is_empty() => {
                return Err(EngineError::Module(ModuleError::NeedsRegistration(
                    why.clone(),
                )))
            }
            Err(_) => {}
        }

        // Every old function's entry must be an ftrace site we can take.
        // A module's records are read afresh with its text.
        let module_text: Vec<_> = linked
            .objects
            .iter()
            .filter(|o| o.loaded)
            .filter_map(|o| symbols.module(o.name.as_deref()?))
            .map(|m| m.text.clone())
            .collect();
        let ftrace = if module_text.is_empty() {
            facts.ftrace.clone()
        } else {
            FtraceRecords::load_in(
                &kernel.space(guest),
                &kernel.kallsyms,
                &kernel.btf,
                &module_text,
            )
            .map_err(|source| EngineError::Site {
                name: "ftrace records".into(),
                source: Box::new(source),
            })?
        };
        let mut fresh = Vec::new();
        let mut funcs = Vec::new();
        for f in &linked.funcs {
            let in_module = f.object.as_deref().and_then(|o| symbols.module(o));
            let site = self.site(kernel, guest, &ftrace, in_module, &f.old_name, f.old_addr)?;
            // New, or validated again because its entry changed since
            // (the guest traces it now, say): this plan uses it.
            if self.sites.get(&f.old_addr) != Some(&site) {
                fresh.push(site);
            }
            funcs.push(FuncRecord {
                object: f.object.clone(),
                name: f.old_name.clone(),
                sympos: u32::try_from(f.old_sympos).unwrap_or(u32::MAX),
                old: f.old_addr,
                new: f.new_addr,
            });
        }

        // Writes: map the new pages, fill them, then the entries.
        if let Some((region, _)) = &registration {
            regions.push(*region);
        }
        let mut plan = Plan::new(arena.allowed());
        plan.extend(arena.map_writes(guest, &regions)?);
        let mut module_record = None;
        if let Some((region, image)) = registration {
            plan.push(
                Write::read_expect(
                    guest,
                    region.gpa,
                    image.bytes.clone(),
                    format!("{name} struct module"),
                )
                .map_err(EngineError::Write)?,
            );
            module_record = Some(crate::register::Registered {
                module: image.module,
                text: image.text,
                bugs: image.bugs,
                counts: image.counts,
                jumps: image.jumps,
                orc: image.orc,
            });
        }
        for image in [&linked.text, &linked.rodata, &linked.data] {
            if image.bytes.is_empty() {
                continue;
            }
            let region = regions.iter().find(|r| r.va.0 == image.va).ok_or_else(|| {
                EngineError::Internal(format!("no arena region at {:#x}", image.va))
            })?;
            plan.push(
                Write::read_expect(
                    guest,
                    region.gpa,
                    image.bytes.clone(),
                    format!("{name} {:?} segment", image.segment),
                )
                .map_err(EngineError::Write)?,
            );
        }
        // percpu_modcopy: the initial bytes into every possible CPU's
        // copy, in the load's own writes, so before any patch code runs.
        if let (Some(pc), Some(b)) = (&module.percpu, block) {
            Self::percpu_copy_plan(kernel, guest, &name, b, &pc.data, &mut plan)?;
        }
        let relink = has_modules.then(|| super::Relink {
            module: std::sync::Arc::new(module.clone()),
            bases,
            options: options.clone(),
            images: vec![
                linked.text.clone(),
                linked.rodata.clone(),
                linked.data.clone(),
            ],
        });
        let record = Record {
            replace: module.patch.replace,
            states: module.patch.states.clone(),
            applied_at: now_unix(),
            pause_us: 0.0,
            regions,
            funcs,
            callbacks: linked.callbacks.clone(),
            objects: linked.objects.clone(),
            signature: "unsigned".to_owned(),
            module: module_record,
            relink,
            refused: std::collections::BTreeMap::new(),
            object_at: super::coming::object_callbacks(&linked)
                .into_iter()
                .filter(|(_, cb)| super::coming::has_callbacks(cb))
                .filter_map(|(name, cb)| Some((name?, cb.object)))
                .collect(),
            klp_patch: module.patch.place.and_then(|p| linked.va(p)),
            level: None,
            percpu: block,
        };
        // On a replace too, only the new patch's callbacks run.
        let mut calls = crate::callback::Calls::default();
        calls.enable(&name, &record.callbacks);
        let change = self
            .stack
            .plan_enable(entry(&name, record.replace, &record.funcs), force)?;
        let check = self.plan_sites(&change, &fresh, Some(&record), &mut plan)?;
        let wants_ops = self.wanted_ops(&change);
        let traced_jumps = self.traced_jumps(&change, &fresh);
        Ok(Prepared {
            warnings: init_exit_warnings(&module),
            name,
            action: "apply",
            change,
            plan,
            arena: Some(arena),
            record: Some(record),
            sites: fresh,
            check,
            calls,
            loaded_bytes: 0,
            loaded: false,
            klp_before: self.klp_enabled(),
            percpu,
            wants_ops,
            traced_jumps,
        })
    }
}

/// What the module's `module_init` or `module_exit` would do besides
/// `klp_enable_patch`, which never happens here: klpvisor reads the patch
/// from the file and runs neither. (kpatch-build's init is read as what
/// it builds, so it is not reported.)
fn init_exit_warnings(module: &crate::module::Module) -> Vec<String> {
    if module.patch.place.is_none() {
        return Vec::new();
    }
    ["module_init", "module_exit"]
        .into_iter()
        .filter_map(|what| {
            let calls: Vec<&str> = module
                .init_exit_calls
                .iter()
                .filter(|(w, _)| *w == what)
                .map(|(_, c)| c.as_str())
                .collect();
            (!calls.is_empty()).then(|| {
                format!(
                    "its {what} also calls {}: klpvisor never runs a patch module's init or \
                     exit code (it reads struct klp_patch from the file), so that does not \
                     happen in the guest; do such work in a pre_patch or post_unpatch callback",
                    calls.join(", ")
                )
            })
        })
        .collect()
}

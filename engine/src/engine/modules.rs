//! The engine's side of registering patches as guest modules
//! ([`crate::register`]): turning the registry's word edits into plans on
//! the one write path, with an allow-list built from the registries.

use klpvisor_guest::{AddressSpace, Guest, GuestPhys, Kernel, VirtRead};

use super::{Engine, EngineError, Prepared};
use crate::register::jump::Poke;
use crate::register::{Mem, RegisterError, Registered, Registry, Word};
use crate::write::{AllowKind, Allowed, Plan, Write};

/// Guest kernel memory for the registry code.
pub(super) struct SpaceMem<'a, 'g, G: Guest + ?Sized>(pub(super) &'a AddressSpace<'g, G>);

impl<G: Guest + ?Sized> Mem for SpaceMem<'_, '_, G> {
    fn read_u64(&self, va: u64) -> Result<u64, RegisterError> {
        self.0.read_u64(va).map_err(|e| RegisterError::Read {
            va,
            source: Box::new(e),
        })
    }
}

impl Engine {
    pub(super) fn registry(&self) -> Result<&Registry, EngineError> {
        let f = self
            .facts
            .as_ref()
            .ok_or_else(|| EngineError::Internal("kernel facts unavailable".into()))?;
        f.registry
            .as_ref()
            .map_err(|e| EngineError::Internal(format!("no module registry: {e}")))
    }

    /// Every patch `struct module` the engine put in the guest: those the
    /// registries may hold besides the kernel's own modules.
    fn our_modules(&self) -> Vec<u64> {
        self.records
            .values()
            .chain(self.retired.iter().map(|r| &r.record))
            .filter_map(|r| r.module.as_ref().map(|m| m.module))
            .collect()
    }

    /// A plan of `words` and `pokes` (static-key sites of `r`'s code),
    /// allowed only where the registries and `r`'s keys' lists are, and
    /// the arena.
    fn registry_plan<G: Guest + ?Sized>(
        &self,
        space: &AddressSpace<'_, G>,
        (words, pokes): (Vec<Word>, Vec<Poke>),
        r: &Registered,
        label: &str,
    ) -> Result<Plan, EngineError> {
        let registry = self.registry()?;
        let mem = SpaceMem(space);
        let mut ours = self.our_modules();
        ours.push(r.module);
        let allowed = registry.allowed(&mem, &ours, &r.jumps)?;
        let mut plan = self.word_plan(space, allowed, AllowKind::ModuleRegistry, &words, label)?;
        for (va, old, new) in pokes {
            plan.push(Write::new(
                phys(space, va)?,
                new,
                old,
                format!("static-key site {va:#x} of {label}"),
            ));
        }
        Ok(plan)
    }

    /// A plan writing 8-byte `words`, allowed in the arena and at the
    /// guest words `allowed` (as `kind`; one that does not translate is
    /// never written either).
    pub(super) fn word_plan<G: Guest + ?Sized>(
        &self,
        space: &AddressSpace<'_, G>,
        allowed: Vec<u64>,
        kind: AllowKind,
        words: &[Word],
        label: &str,
    ) -> Result<Plan, EngineError> {
        let arena = self
            .facts
            .as_ref()
            .map(|f| f.arena.allowed())
            .unwrap_or_default();
        let mut plan = Plan::new(arena);
        for va in allowed {
            if let Ok(gpa) = phys(space, va) {
                plan.allow(Allowed { gpa, len: 8, kind });
            }
        }
        for &(va, old, new) in words {
            plan.push(Write::new(
                phys(space, va)?,
                new.to_le_bytes().to_vec(),
                old.to_le_bytes().to_vec(),
                format!("{label} {va:#x}"),
            ));
        }
        Ok(plan)
    }

    /// The plan that puts `r` (whose `struct module` is in guest memory
    /// already) on the guest's module registries. vCPUs paused.
    pub(super) fn register_plan<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        r: &Registered,
    ) -> Result<Plan, EngineError> {
        let space = kernel.space(guest);
        let edit = self.registry()?.register(&SpaceMem(&space), r)?;
        self.registry_plan(&space, edit, r, "register module")
    }

    /// The plan that takes `r` off the registries; `None` if it is not on
    /// them (a rolled-back load took it off already). vCPUs paused.
    pub(super) fn unregister_plan<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        r: &Registered,
    ) -> Result<Option<Plan>, EngineError> {
        let space = kernel.space(guest);
        let mem = SpaceMem(&space);
        let registry = self.registry()?;
        // On the `modules` list iff its predecessor points at it.
        let entry = r.module + registry.layout.list;
        let prev = mem.read_u64(entry + 8)?;
        if prev == 0 || mem.read_u64(prev).ok() != Some(entry) {
            return Ok(None);
        }
        let words = registry.unregister(&mem, r)?;
        self.registry_plan(&space, (words, Vec::new()), r, "unregister module")
            .map(Some)
    }

    /// Lets klpvisor's own unwinder walk through `r`'s code, as the guest's
    /// does once `r` is registered: a sleeping task with patch frames is
    /// then judged by its real frames, not by every word on its stack.
    /// Called when the patch's transition commits (a load undone or
    /// abandoned before that never adds its table).
    pub(super) fn orc_add(&mut self, r: &Registered) {
        if let Some(orc) = self.facts.as_mut().and_then(|f| f.orc.as_mut()) {
            if let Err(e) = orc.add_code(r.text.clone(), &r.orc) {
                // Its frames stay unreliable: scanned, never missed.
                tracing::warn!(
                    module = format_args!("{:#x}", r.module),
                    "patch ORC not used: {e}"
                );
            }
        }
    }

    /// Forgets `r`'s ORC table (its code is being freed).
    pub(super) fn orc_remove(&mut self, r: &Registered) {
        if let Some(orc) = self.facts.as_mut().and_then(|f| f.orc.as_mut()) {
            orc.remove_code(&r.text);
        }
    }

    /// Refuses before anything is written while a module load or unload
    /// is mid-way in the guest (nothing to undo then).
    pub(super) fn registry_quiet<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<(), EngineError> {
        Ok(self.registry()?.quiet(&SpaceMem(&kernel.space(guest)))?)
    }

    /// Registers `r`, whose pages `undo` takes back: commits the
    /// registration, or commits `undo` and returns why not. Returns the
    /// plan that undoes the registration. vCPUs paused.
    pub(super) fn register_or_undo<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        name: &str,
        r: &Registered,
        undo: &Plan,
    ) -> Result<Plan, EngineError> {
        match self
            .register_plan(kernel, guest, r)
            .and_then(|plan| Ok(plan.commit(guest)?))
        {
            Ok(unlink) => {
                tracing::info!(
                    patch = name,
                    module = format_args!("{:#x}", r.module),
                    extable = r.counts.extable,
                    bugs = r.counts.bugs,
                    orc = r.counts.orc,
                    symbols = r.counts.symbols,
                    static_key_sites = r.counts.jumps,
                    "patch registered with the guest kernel as a module"
                );
                Ok(unlink)
            }
            Err(e) => {
                undo.commit(guest)?;
                Err(e)
            }
        }
    }

    /// Commits `p`'s load (its pages and its `struct module`) and then
    /// registers the module, both in this pause, undoing the first if the
    /// second fails. Returns the plans that undo both, to commit in order.
    pub fn load<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &mut Prepared,
    ) -> Result<Vec<Plan>, EngineError> {
        if p.needs_percpu() {
            return Err(EngineError::Internal(format!(
                "{} was linked before its per-CPU block was allocated; not loading it",
                p.name
            )));
        }
        let module = p.record.as_ref().and_then(|r| r.module.clone());
        if module.is_some() {
            self.registry_quiet(kernel, guest)?;
        }
        let undo = p.take_load().commit(guest)?;
        let Some(r) = module else {
            p.loaded = true;
            return Ok(vec![undo]);
        };
        let unlink = self.register_or_undo(kernel, guest, p.name(), &r, &undo)?;
        p.loaded = true;
        Ok(vec![unlink, undo])
    }
}

/// The guest-physical address of kernel virtual `va`.
fn phys<G: Guest + ?Sized>(
    space: &AddressSpace<'_, G>,
    va: u64,
) -> Result<GuestPhys, RegisterError> {
    space
        .translate(va)
        .map(|t| t.phys)
        .map_err(|e| RegisterError::Read {
            va,
            source: Box::new(e),
        })
}

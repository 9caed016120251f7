//! Modules that load or unload while patches are loaded: klp's
//! `klp_module_coming` and `klp_module_going`, run by the VMM when the
//! guest stops in one of klpvisor's hooks ([`crate::hook`]).
//!
//! *Coming* (the module is formed, none of its code has run): every loaded
//! patch with an object for the module that is not linked yet is linked
//! again against the module's own symbols. What changes is exactly the
//! patch's `.klp.rela.<module>` relocations, written into its code as klp
//! applies them in `klp_apply_object_relocs`; the object's functions join
//! the patch's redirects, and the entries the stack now gives a target are
//! written. klp checks no stack there and neither does this: no task can
//! be inside code that has never run. If any patch's object cannot be
//! linked (a function or symbol the module lacks), nothing is written and
//! the load fails, as klp makes it fail.
//!
//! *Going* (the module's exit has run, or its load failed after the coming
//! step): its functions leave every patch, their entries get their
//! original bytes back, and the objects wait for the module again. The
//! relocations are left in the patch's code, as nothing runs them until
//! the module comes back, when they are written afresh.
//!
//! Both run with every vCPU paused and change nothing on any error.

use std::sync::Arc;

use klpvisor_guest::{Guest, GuestPhys, Kernel, LoadedModule};

use super::{Engine, EngineError, FuncRecord};
use crate::hook::Hooks;
use crate::link::{
    link_objects, Bases, GuestSymbols, LinkOptions, Linked, LinkedCallbacks, SegmentImage,
};
use crate::module::Module;
use crate::site::{FtraceRecords, Site};
use crate::stack::{Change, Redirect};
use crate::write::{Plan, Write};

/// What linking a waiting object later takes: the parsed patch, where its
/// segments are, how it was linked, and the bytes last written there.
#[derive(Debug, Clone)]
pub struct Relink {
    pub(super) module: Arc<Module>,
    pub(super) bases: Bases,
    pub(super) options: LinkOptions,
    /// The segments as last linked (text, rodata, data). The guest's copy
    /// differs from them only where the guest changed it since (its
    /// static-key sites, the patch's data), never at a relocation of a
    /// waiting object: nothing references those until the module comes.
    pub(super) images: Vec<SegmentImage>,
}

/// What a module's load or unload did to the patches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleEvent {
    /// The module's name.
    pub module: String,
    /// Per patch, the number of the module's functions that joined it
    /// (coming) or left it (going).
    pub patches: Vec<(String, usize)>,
    /// Entries written: redirected (coming) or restored (going).
    pub sites: usize,
    /// Going: the ftrace_ops (by slot address) that the unloading task
    /// must let go of before it goes on ([`Engine::module_release_call`]).
    pub release: Vec<u64>,
}

/// Whether a vCPU that read `event`'s port, stopped at `rip` (after the
/// read) in privilege level `cpl`, is in klpvisor's stub (`rips` from
/// [`Engine::hook_rips`]): only then is it a module load or unload; the
/// guest can read any port itself.
pub fn in_hook(rips: Option<(u64, u64)>, event: crate::hook::Event, rip: u64, cpl: u8) -> bool {
    let Some((coming, going)) = rips else {
        return false;
    };
    cpl == 0
        && rip
            == match event {
                crate::hook::Event::Coming => coming,
                crate::hook::Event::Going => going,
            }
}

/// Whether an object has any callback (kpatch-build objects, which
/// exist only at init time, have none and no address).
pub(super) fn has_callbacks(cb: &LinkedCallbacks) -> bool {
    cb.pre_patch.is_some()
        || cb.post_patch.is_some()
        || cb.pre_unpatch.is_some()
        || cb.post_unpatch.is_some()
}

/// Each linked object's name with its callbacks: `linked.callbacks` has
/// one entry per linked object, in the patch's order.
pub(super) fn object_callbacks(linked: &Linked) -> Vec<(Option<String>, LinkedCallbacks)> {
    linked
        .objects
        .iter()
        .filter(|o| o.loaded)
        .map(|o| o.name.clone())
        .zip(linked.callbacks.iter().copied())
        .collect()
}

/// The writes that turn `old` into `new` (the same segment, linked twice),
/// a run of differing bytes each, expecting `old`'s bytes.
fn relocation_writes(
    old: &SegmentImage,
    new: &SegmentImage,
    gpa: GuestPhys,
    patch: &str,
) -> Result<Vec<Write>, EngineError> {
    if old.va != new.va || old.bytes.len() != new.bytes.len() {
        return Err(EngineError::Internal(format!(
            "{patch}: linking again moved its {:?} segment",
            old.segment
        )));
    }
    let mut writes = Vec::new();
    let mut i = 0;
    let n = old.bytes.len();
    while i < n {
        if old.bytes[i] == new.bytes[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && old.bytes[i] != new.bytes[i] {
            i += 1;
        }
        writes.push(Write::new(
            gpa + start as u64,
            new.bytes[start..i].to_vec(),
            old.bytes[start..i].to_vec(),
            format!("{patch} relocation at {:#x}", old.va + start as u64),
        ));
    }
    Ok(writes)
}

/// One patch's part of a module's coming.
#[derive(Debug)]
struct Joining {
    patch: String,
    funcs: Vec<FuncRecord>,
    /// The segments as linked now (moved into the patch's [`Relink`] once
    /// written).
    images: Vec<SegmentImage>,
    /// Every linked object's callbacks, the module's included.
    callbacks: Vec<LinkedCallbacks>,
    /// The module's object's callbacks.
    object_callbacks: Option<LinkedCallbacks>,
}

/// A module coming, between its link and its switch: the `pre_patch`
/// callbacks run in between, the `post_patch` ones after the switch.
#[derive(Debug)]
pub struct Coming {
    /// The module's `struct module`.
    pub addr: u64,
    /// Its name.
    pub module: String,
    joining: Vec<Joining>,
    fresh: Vec<Site>,
    /// Per enabled patch with an object for the module, in the stack's
    /// order, that object's callbacks.
    pub callbacks: Vec<(String, LinkedCallbacks)>,
    /// The module's functions whose redirect goes through an
    /// `ftrace_ops` that the loading task registers before the switch
    /// ([`Engine::coming_register_call`]), as klp_module_coming registers
    /// klp's.
    pub ops: Vec<u64>,
}

/// A module going: the `pre_unpatch` callbacks run before
/// [`Engine::going_switch`], the `post_unpatch` ones after.
#[derive(Debug)]
pub struct Going {
    /// The module's `struct module`.
    pub addr: u64,
    /// Its name.
    pub module: String,
    /// Its functions' entries that patches redirect or know.
    gone: Vec<u64>,
    /// Per enabled patch with a linked object for the module, in the
    /// stack's order, that object's callbacks.
    pub callbacks: Vec<(String, LinkedCallbacks)>,
}

impl Engine {
    /// Installs the hooks on the guest's module loads and unloads if they
    /// are not there yet ([`crate::hook`]). vCPUs paused. Returns whether
    /// it installed them now.
    pub fn install_hooks<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<bool, EngineError> {
        if self.hooks.is_some() {
            return Ok(false);
        }
        let facts = self.facts(kernel, guest)?;
        let mut arena = facts.arena.clone();
        let ftrace = facts.ftrace.clone();
        let (hooks, writes) = Hooks::plan_install(kernel, guest, &ftrace, &mut arena)?;
        let mut plan = Plan::new(arena.allowed());
        plan.allow(hooks.coming.allowed());
        plan.allow(hooks.going.allowed());
        plan.extend(writes);
        let changes = [&hooks.coming, &hooks.going]
            .iter()
            .filter_map(|s| s.ftrace_flags.map(|w| (w, s.name.clone(), true)))
            .collect();
        // Checked before anything is written: a busy ftrace waits.
        let flags = self.ftrace_flags_plan(kernel, guest, changes)?;
        self.write_with_flags(guest, &plan, flags)?;
        if let Some(f) = self.facts.as_mut() {
            f.arena = arena;
        }
        let _ = self.hook_rips.set(hooks.rips());
        self.hooks = Some(hooks);
        Ok(true)
    }

    /// Whether the hooks are installed.
    pub fn has_hooks(&self) -> bool {
        self.hooks.is_some()
    }

    /// The hooks' stub `rip`s once installed, readable without the
    /// engine: see [`in_hook`].
    pub fn hook_rips(&self) -> std::sync::Arc<std::sync::OnceLock<(u64, u64)>> {
        self.hook_rips.clone()
    }

    /// Whether a loaded patch has an object for module `name` that is not
    /// linked (cheap: nothing is read from the guest).
    pub fn waits_for(&self, name: &str) -> bool {
        self.records.values().any(|r| {
            r.objects
                .iter()
                .any(|o| !o.loaded && o.name.as_deref() == Some(name))
        })
    }

    /// Whether any patch has functions in the module whose `struct
    /// module` is at `addr`, or an object linked to a module of `name`.
    pub fn holds(&self, addr: u64, name: Option<&str>) -> bool {
        self.sites
            .values()
            .any(|s| s.module.as_ref().is_some_and(|m| m.addr == addr))
            || name.is_some_and(|n| {
                self.records.values().any(|r| {
                    r.objects
                        .iter()
                        .any(|o| o.loaded && o.name.as_deref() == Some(n))
                })
            })
    }

    /// Notes that module `module`'s load was refused, for `GET /patches`.
    pub fn note_refused(&mut self, module: &str, why: &str) {
        for r in self.records.values_mut() {
            if r.objects
                .iter()
                .any(|o| !o.loaded && o.name.as_deref() == Some(module))
            {
                r.refused.insert(module.to_owned(), why.to_owned());
            }
        }
    }

    /// klp's `klp_module_coming` for the module whose `struct module` is
    /// at `addr`, in one go: [`Engine::coming_link`] then
    /// [`Engine::coming_switch`] (no callback runs in between, and no
    /// ftrace registration: the module's functions get a `jmp`). vCPUs
    /// paused, the loading one held in the hook.
    pub fn module_coming<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        addr: u64,
    ) -> Result<ModuleEvent, EngineError> {
        match self.coming_link(kernel, guest, addr, false)? {
            Some(c) => self.coming_switch(kernel, guest, &c),
            None => Ok(ModuleEvent {
                module: self.module_name(kernel, guest, addr).unwrap_or_default(),
                ..ModuleEvent::default()
            }),
        }
    }

    fn module_name<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        addr: u64,
    ) -> Option<String> {
        kernel
            .modules_brief(guest)
            .ok()?
            .into_iter()
            .find(|m| m.addr == addr)
            .map(|m| m.name)
    }

    /// The first step of a module's coming: every loaded patch's object
    /// for it is linked against it and its relocations are written into
    /// the patch's code (klp's `klp_init_object_loaded`); nothing is
    /// redirected yet. `None` when no patch waits for the module. The
    /// returned [`Coming`] lists the `pre_patch` and `post_patch`
    /// callbacks to run around [`Engine::coming_switch`]. `registers`: the
    /// loading task will make the ftrace registrations of [`Coming::ops`]
    /// before the switch (the VMM's hooks); without, the module's
    /// functions get a `jmp`. vCPUs paused, the loading one held in the
    /// hook.
    pub fn coming_link<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        addr: u64,
        registers: bool,
    ) -> Result<Option<Coming>, EngineError> {
        // Cheap first: the module's name and state, without symbols.
        let brief = kernel.modules_brief(guest).map_err(EngineError::Modules)?;
        let Some(b) = brief.iter().find(|m| m.addr == addr) else {
            return Err(EngineError::NoSuchModule(addr));
        };
        if b.state != klpvisor_guest::ModuleState::Coming {
            // klp_module_coming runs only for a COMING module.
            return Ok(None);
        }
        // A module that is coming is new: whatever the engine holds of a
        // module of that name, or at that address, is of one that went
        // without klp_module_going (its load failed after the coming step,
        // e.g. in the kernel's own klp_module_coming).
        let stale = b.name.clone();
        self.forget_module(guest, |m| m.addr == addr || m.name == stale);
        let waiting: Vec<String> = self
            .records
            .iter()
            .filter(|(_, r)| {
                r.objects
                    .iter()
                    .any(|o| !o.loaded && o.name.as_deref() == Some(stale.as_str()))
            })
            .map(|(n, _)| n.clone())
            .collect();
        if waiting.is_empty() {
            return Ok(None);
        }
        let modules = kernel.modules(guest).map_err(EngineError::Modules)?;
        let m = modules
            .iter()
            .find(|m| m.addr == addr)
            .ok_or(EngineError::NoSuchModule(addr))?
            .clone();
        self.facts(kernel, guest)?;
        let arena = self
            .facts
            .as_ref()
            .map(|f| f.arena.allowed())
            .unwrap_or_default();
        let space = kernel.space(guest);
        let ftrace = FtraceRecords::load_in(
            &space,
            &kernel.kallsyms,
            &kernel.btf,
            std::slice::from_ref(&m.text),
        )
        .map_err(|source| EngineError::Site {
            name: "ftrace records".into(),
            source: Box::new(source),
        })?;
        let mut plan = Plan::new(arena);
        let mut fresh: Vec<Site> = Vec::new();
        let mut joining = Vec::new();
        for name in &waiting {
            let j = self
                .join(
                    kernel, guest, &modules, &m, &ftrace, name, &mut fresh, &mut plan,
                )
                .map_err(|e| EngineError::ModuleRefused {
                    module: m.name.clone(),
                    patch: name.clone(),
                    source: Box::new(e),
                })?;
            joining.push(j);
        }
        // ftrace's call at the entry of a function of the coming module:
        // the guest's own tracing (ftrace_module_enable enabled it before
        // this hook ran). Only a redirect through ftrace can share it, never
        // a jmp over it.
        if self.ops_support().is_err() {
            self.refuse_traced_jumps(&m.name, &fresh)?;
        }
        // The relocations go in now: the callbacks are the patch's code
        // and may use the module's symbols. The engine's copy of each
        // patch's link follows what is in the guest.
        let change = self.coming_change(&joining)?;
        plan.commit(guest)?;
        // The functions the switch starts redirecting get an ftrace_ops,
        // for the loading task to register.
        let starting: Vec<Site> = change
            .sites
            .iter()
            .filter(|(_, (before, after))| before.is_none() && after.is_some())
            .filter_map(|(old, _)| fresh.iter().find(|s| s.func == *old))
            .cloned()
            .collect();
        let ops = if registers {
            self.coming_ops(kernel, guest, &starting)
        } else {
            Vec::new()
        };
        let mut callbacks = Vec::new();
        for j in &mut joining {
            if let Some(l) = self
                .records
                .get_mut(&j.patch)
                .and_then(|r| r.relink.as_mut())
            {
                l.images = std::mem::take(&mut j.images);
            }
            // klp runs them for the patches on klp_patches: enabled ones.
            let enabled = self
                .stack
                .get(&j.patch)
                .is_some_and(|e| e.state == klpvisor_api::PatchState::Enabled);
            if enabled {
                if let Some(cb) = j.object_callbacks {
                    callbacks.push((j.patch.clone(), cb));
                }
            }
        }
        Ok(Some(Coming {
            addr,
            module: m.name.clone(),
            joining,
            fresh,
            callbacks,
            ops,
        }))
    }

    /// Refuses a coming whose function the guest traces (see
    /// [`Site::traced`]) unless ftrace carries its redirect.
    fn refuse_traced_jumps(&self, module: &str, fresh: &[Site]) -> Result<(), EngineError> {
        match fresh.iter().find(|s| s.traced && !self.via_ftrace(s.func)) {
            Some(s) => Err(EngineError::TracedModuleEntry {
                module: module.to_owned(),
                func: s.name.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The stack change of the coming's functions joining their patches.
    fn coming_change(&self, joining: &[Joining]) -> Result<Change, EngineError> {
        let mut entries = self.stack.entries().to_vec();
        for j in joining {
            if let Some(e) = entries.iter_mut().find(|e| e.name == j.patch) {
                e.redirects.extend(j.funcs.iter().map(|f| Redirect {
                    old: f.old,
                    new: f.new,
                }));
            }
        }
        self.module_change(entries)
    }

    /// The second step of a module's coming, once the `pre_patch`
    /// callbacks passed: the module's functions join their patches and
    /// the entries the stack now gives a target are written. vCPUs
    /// paused, the loading one held in the hook.
    pub fn coming_switch<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        c: &Coming,
    ) -> Result<ModuleEvent, EngineError> {
        let mut event = ModuleEvent {
            module: c.module.clone(),
            ..ModuleEvent::default()
        };
        let change = self.coming_change(&c.joining)?;
        self.refuse_traced_jumps(&c.module, &c.fresh)?;
        // Never a switch through an ops ftrace does not call.
        if let Some(old) = c
            .ops
            .iter()
            .find(|old| !self.ops.as_ref().is_some_and(|o| o.registered(**old)))
        {
            return Err(EngineError::Internal(format!(
                "the loading module's function at {old:#x} was to switch through an ftrace_ops \
                 not registered"
            )));
        }
        let mut plan = Plan::new(Vec::new());
        self.plan_sites(&change, &c.fresh, None, &mut plan)?;
        let flags =
            self.ftrace_flags_plan(kernel, guest, self.ftrace_changes(&change.sites, &c.fresh))?;
        self.write_with_flags(guest, &plan, flags)?;
        for s in &c.fresh {
            self.sites.insert(s.func, s.clone());
        }
        for j in &c.joining {
            let Some(r) = self.records.get_mut(&j.patch) else {
                continue;
            };
            event.patches.push((j.patch.clone(), j.funcs.len()));
            r.funcs.extend(j.funcs.iter().cloned());
            for o in &mut r.objects {
                if o.name.as_deref() == Some(c.module.as_str()) {
                    o.loaded = true;
                }
            }
            r.callbacks = j.callbacks.clone();
            if let Some(cb) = j.object_callbacks.filter(has_callbacks) {
                r.object_at.insert(c.module.clone(), cb.object);
            }
            r.refused.remove(&c.module);
        }
        event.sites = change.sites.len();
        self.stack.apply(&change);
        Ok(event)
    }

    /// Links patch `name`'s object for `m` (coming): its functions, with
    /// their sites added to `fresh`, and its relocations added to `plan`.
    #[allow(clippy::too_many_arguments)]
    fn join<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        modules: &[LoadedModule],
        m: &LoadedModule,
        ftrace: &FtraceRecords,
        name: &str,
        fresh: &mut Vec<Site>,
        plan: &mut Plan,
    ) -> Result<Joining, EngineError> {
        let r = self
            .records
            .get(name)
            .ok_or_else(|| EngineError::Internal(format!("no record of patch {name}")))?;
        let relink = r.relink.as_ref().ok_or_else(|| {
            EngineError::Internal(format!(
                "patch {name} has a module object but no link state"
            ))
        })?;
        // The link sees the module coming and those the patch is linked
        // to already (their relocations come out as before).
        let linked_to: Vec<&str> = r
            .objects
            .iter()
            .filter(|o| o.loaded)
            .filter_map(|o| o.name.as_deref())
            .collect();
        let seen: Vec<LoadedModule> = modules
            .iter()
            .filter(|x| x.addr == m.addr || linked_to.contains(&x.name.as_str()))
            .cloned()
            .collect();
        let symbols = GuestSymbols {
            kallsyms: &kernel.kallsyms,
            modules: &seen,
        };
        let linked = link_objects(&relink.module, &symbols, relink.bases, &relink.options)?;
        let space = kernel.space(guest);
        let mut funcs = Vec::new();
        for f in linked
            .funcs
            .iter()
            .filter(|f| f.object.as_deref() == Some(m.name.as_str()))
        {
            // A site another patch took while the module was coming (a
            // transition links a COMING module) is known, and redirected.
            let known = self
                .sites
                .get(&f.old_addr)
                .filter(|s| s.module.as_ref().is_some_and(|x| x.addr == m.addr));
            let site = match known {
                Some(s) => s.clone(),
                // A traced entry is taken here and refused by the caller
                // with a reason (see Engine::coming_link).
                None => Site::find_in_module(
                    &space,
                    &kernel.kallsyms,
                    m,
                    ftrace,
                    f.old_addr,
                    self.ops_support().is_ok(),
                )
                .map_err(|source| EngineError::Site {
                    name: f.old_name.clone(),
                    source: Box::new(source),
                })?,
            };
            if !fresh.iter().any(|s| s.func == site.func) {
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
        let callbacks = linked.callbacks.clone();
        let object_callbacks = object_callbacks(&linked)
            .into_iter()
            .find(|(n, _)| n.as_deref() == Some(m.name.as_str()))
            .map(|(_, cb)| cb);
        let images = vec![linked.text, linked.rodata, linked.data];
        for (old, new) in relink.images.iter().zip(&images) {
            if old.bytes.is_empty() {
                continue;
            }
            let region = r.regions.iter().find(|x| x.va.0 == old.va).ok_or_else(|| {
                EngineError::Internal(format!("{name}: no arena region at {:#x}", old.va))
            })?;
            for w in relocation_writes(old, new, region.gpa, name)? {
                plan.push(w);
            }
        }
        Ok(Joining {
            patch: name.to_owned(),
            funcs,
            images,
            callbacks,
            object_callbacks,
        })
    }

    /// Drops, without writing anything, what the engine holds of modules
    /// matching `gone`: their sites, the redirects to them, their
    /// functions in every patch; their objects wait again. For a module
    /// that went without klp_module_going, or whose going could not write
    /// (its memory is freed right after: nothing runs the entries again).
    /// Only their ftrace_ops are written: each redirect word is cleared
    /// (as far as the guest lets it be), since ftrace would call that ops
    /// for a module that loads a function on the same site, and the ops
    /// waits to be let go.
    pub fn forget_module<G: Guest + ?Sized>(
        &mut self,
        guest: &G,
        gone: impl Fn(&crate::site::InModule) -> bool,
    ) {
        let olds: Vec<u64> = self
            .sites
            .iter()
            .filter(|(_, s)| s.module.as_ref().is_some_and(&gone))
            .map(|(&f, _)| f)
            .collect();
        let names: std::collections::BTreeSet<String> = self
            .sites
            .values()
            .filter_map(|s| s.module.as_ref().filter(|m| gone(m)))
            .map(|m| m.name.clone())
            .collect();
        if olds.is_empty() {
            return;
        }
        if let Some(ops) = self.ops.as_mut() {
            let mut plan = Plan::new(ops.allowed());
            for &f in &olds {
                match ops.plan_quiet(guest, f) {
                    Ok(Some(w)) => plan.push(w),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("cannot clear a gone module's ftrace redirect: {e}"),
                }
                ops.detach(f);
            }
            if let Err(e) = plan.commit(guest) {
                tracing::warn!("cannot clear a gone module's ftrace redirects: {e}");
            }
        }
        let mut entries = self.stack.entries().to_vec();
        for e in &mut entries {
            e.redirects.retain(|r| !olds.contains(&r.old));
        }
        if let Some(change) = self.stack.plan_redirects(entries) {
            self.stack.apply(&change);
        }
        for r in self.records.values_mut() {
            r.funcs.retain(|f| !olds.contains(&f.old));
            for o in &mut r.objects {
                if o.name.as_ref().is_some_and(|n| names.contains(n)) {
                    o.loaded = false;
                }
            }
            for n in &names {
                if let Some(at) = r.object_at.remove(n) {
                    r.callbacks.retain(|c| c.object != at);
                }
            }
        }
        for f in &olds {
            if let Some(s) = self.sites.remove(f) {
                if let Some(w) = s.ftrace_flags {
                    self.ftrace_disabled.remove(&w);
                }
            }
        }
    }

    /// Commits `plan`, then the ftrace flag writes `flags` (undoing `plan`
    /// if they fail), and notes which flags are now klpvisor's.
    fn write_with_flags<G: Guest + ?Sized>(
        &mut self,
        guest: &G,
        plan: &Plan,
        flags: Option<super::ftrace::FtracePlan>,
    ) -> Result<(), EngineError> {
        let undo = plan.commit(guest)?;
        if let Some((fplan, set, cleared)) = flags {
            if let Err(e) = fplan.commit(guest) {
                undo.commit(guest)?;
                return Err(e.into());
            }
            self.ftrace_disabled.extend(set);
            for w in cleared {
                self.ftrace_disabled.remove(&w);
            }
        }
        Ok(())
    }

    /// The stack change of a module's functions joining or leaving.
    fn module_change(&self, entries: Vec<crate::stack::Entry>) -> Result<Change, EngineError> {
        self.stack.plan_redirects(entries).ok_or_else(|| {
            EngineError::Internal("a module's redirects changed more than redirects".into())
        })
    }

    /// klp's `klp_module_going` for the module whose `struct module` is at
    /// `addr`, in one go: [`Engine::going_plan`] then
    /// [`Engine::going_switch`]. vCPUs paused, the unloading one held in
    /// the hook.
    pub fn module_going<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        addr: u64,
    ) -> Result<ModuleEvent, EngineError> {
        match self.going_plan(kernel, guest, addr)? {
            Some(g) => self.going_switch(kernel, guest, &g),
            None => Ok(ModuleEvent::default()),
        }
    }

    /// What a module's going takes away, and the `pre_unpatch` and
    /// `post_unpatch` callbacks to run around [`Engine::going_switch`];
    /// `None` when no patch holds the module. Reads only.
    pub fn going_plan<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        addr: u64,
    ) -> Result<Option<Going>, EngineError> {
        let gone: Vec<u64> = self
            .sites
            .iter()
            .filter(|(_, s)| s.module.as_ref().is_some_and(|m| m.addr == addr))
            .map(|(&f, _)| f)
            .collect();
        // klp_module_going runs for a GOING module (its exit ran, or its
        // load failed after the coming step): one read of the list says
        // whether it is one, and its name.
        let brief = kernel.modules_brief(guest).map_err(EngineError::Modules)?;
        let Some(name) = brief
            .into_iter()
            .find(|m| m.addr == addr && m.state == klpvisor_guest::ModuleState::Going)
            .map(|m| m.name)
        else {
            return Ok(None);
        };
        let linked = |r: &super::Record| {
            r.objects
                .iter()
                .any(|o| o.loaded && o.name.as_deref() == Some(name.as_str()))
        };
        if gone.is_empty() && !self.records.values().any(linked) {
            return Ok(None);
        }
        let mut callbacks = Vec::new();
        for e in self.stack.entries() {
            if e.state != klpvisor_api::PatchState::Enabled {
                continue;
            }
            let Some(r) = self.records.get(&e.name).filter(|r| linked(r)) else {
                continue;
            };
            if let Some(&at) = r.object_at.get(&name) {
                if let Some(cb) = r.callbacks.iter().find(|c| c.object == at) {
                    callbacks.push((e.name.clone(), *cb));
                }
            }
        }
        Ok(Some(Going {
            addr,
            module: name,
            gone,
            callbacks,
        }))
    }

    /// Takes a going module's functions out of every patch and gives their
    /// entries their original bytes back. vCPUs paused, the unloading one
    /// held in the hook.
    pub fn going_switch<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        g: &Going,
    ) -> Result<ModuleEvent, EngineError> {
        let (name, gone) = (g.module.clone(), &g.gone);
        let mut event = ModuleEvent {
            module: name.clone(),
            ..ModuleEvent::default()
        };
        let mut entries = self.stack.entries().to_vec();
        for e in &mut entries {
            e.redirects.retain(|r| !gone.contains(&r.old));
        }
        let change = self.module_change(entries)?;
        let mut plan = Plan::new(Vec::new());
        self.plan_sites(&change, &[], None, &mut plan)?;
        let flags =
            self.ftrace_flags_plan(kernel, guest, self.ftrace_changes(&change.sites, &[]))?;
        self.write_with_flags(guest, &plan, flags)?;
        // Their ops redirect nothing now. They must be unregistered before
        // the module's text goes (ftrace warns, and takes the record
        // wrongly, when a module loads on a site an IPMODIFY ops still
        // filters): the unloading task does it next, as klp_module_going
        // does ([`Engine::module_release_call`]).
        if let Some(ops) = self.ops.as_mut() {
            for &f in gone {
                if let Some(va) = ops.slot(f).map(|s| s.va) {
                    ops.detach(f);
                    event.release.push(va);
                }
            }
        }
        for (patch, r) in &mut self.records {
            let before = r.funcs.len();
            r.funcs.retain(|f| !gone.contains(&f.old));
            let left = before - r.funcs.len();
            let mut had = false;
            for o in &mut r.objects {
                if o.loaded && o.name.as_deref() == Some(name.as_str()) {
                    o.loaded = false;
                    had = true;
                }
            }
            if let Some(at) = r.object_at.remove(&name) {
                r.callbacks.retain(|c| c.object != at);
            }
            if left > 0 || had {
                event.patches.push((patch.clone(), left));
            }
        }
        for f in gone {
            if let Some(s) = self.sites.remove(f) {
                // Its record goes with the module: forget the flag too.
                if let Some(w) = s.ftrace_flags {
                    self.ftrace_disabled.remove(&w);
                }
            }
        }
        event.sites = change.sites.len();
        self.stack.apply(&change);
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::Event;
    use crate::module::Segment;

    fn image(bytes: &[u8]) -> SegmentImage {
        SegmentImage {
            segment: Segment::Text,
            va: 0xffff_ffff_c000_0000,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn relinking_writes_only_the_bytes_that_changed_expecting_the_old_ones() {
        let old = image(&[1, 2, 0, 0, 0, 0, 7, 8, 0, 0]);
        let new = image(&[1, 2, 0xaa, 0xbb, 0, 0xcc, 7, 8, 0, 0xdd]);
        let w = relocation_writes(&old, &new, GuestPhys(0x10_0000), "p").expect("writes");
        let got: Vec<(u64, Vec<u8>)> = w.iter().map(|w| (w.gpa.0, w.bytes.clone())).collect();
        assert_eq!(
            got,
            [
                (0x10_0002, vec![0xaa, 0xbb]),
                (0x10_0005, vec![0xcc]),
                (0x10_0009, vec![0xdd]),
            ]
        );
        assert!(w.iter().all(|w| w.expect.iter().all(|&b| b == 0)));
    }

    #[test]
    fn only_the_stubs_own_reads_in_the_kernel_are_hooks() {
        let rips = Some((0xffff_ffff_c000_000b, 0xffff_ffff_c000_008b));
        assert!(in_hook(rips, Event::Coming, 0xffff_ffff_c000_000b, 0));
        assert!(in_hook(rips, Event::Going, 0xffff_ffff_c000_008b, 0));
        assert!(!in_hook(rips, Event::Going, 0xffff_ffff_c000_000b, 0));
        assert!(!in_hook(rips, Event::Coming, 0xffff_ffff_c000_000b, 3));
        assert!(!in_hook(rips, Event::Coming, 0x40_1000, 3));
        assert!(!in_hook(None, Event::Coming, 0xffff_ffff_c000_000b, 0));
    }

    #[test]
    fn a_segment_that_moved_is_an_engine_bug() {
        let old = image(&[0; 4]);
        let mut new = image(&[0; 5]);
        assert!(matches!(
            relocation_writes(&old, &new, GuestPhys(0), "p"),
            Err(EngineError::Internal(_))
        ));
        new.bytes.truncate(4);
        new.va += 4096;
        assert!(matches!(
            relocation_writes(&old, &new, GuestPhys(0), "p"),
            Err(EngineError::Internal(_))
        ));
    }
}

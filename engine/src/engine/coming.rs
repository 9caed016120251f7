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

use klpvisor_guest::{Guest, Kernel, LoadedModule};

use super::{Engine, EngineError, FuncRecord};
use crate::hook::Hooks;
use crate::link::{link_objects, Bases, GuestSymbols, LinkOptions, SegmentImage};
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
}

/// The writes that turn `old` into `new` (the same segment, linked twice),
/// a run of differing bytes each, expecting `old`'s bytes.
fn relocation_writes(
    old: &SegmentImage,
    new: &SegmentImage,
    gpa: u64,
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
struct Joining {
    patch: String,
    funcs: Vec<FuncRecord>,
    images: Vec<SegmentImage>,
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
        let undo = plan.commit(guest)?;
        if let Some((fplan, set, _)) = flags {
            if let Err(e) = fplan.commit(guest) {
                undo.commit(guest)?;
                return Err(e.into());
            }
            self.ftrace_disabled.extend(set);
        }
        if let Some(f) = self.facts.as_mut() {
            f.arena = arena;
        }
        self.hooks = Some(hooks);
        Ok(true)
    }

    /// Whether the hooks are installed.
    pub fn has_hooks(&self) -> bool {
        self.hooks.is_some()
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
    /// at `addr`: see the module documentation. vCPUs paused, the loading
    /// one held in the hook.
    pub fn module_coming<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        addr: u64,
    ) -> Result<ModuleEvent, EngineError> {
        let modules = kernel.modules(guest).map_err(EngineError::Modules)?;
        let m = modules
            .iter()
            .find(|m| m.addr == addr)
            .ok_or(EngineError::NoSuchModule(addr))?
            .clone();
        let mut event = ModuleEvent {
            module: m.name.clone(),
            ..ModuleEvent::default()
        };
        let waiting: Vec<String> = self
            .records
            .iter()
            .filter(|(_, r)| {
                r.objects
                    .iter()
                    .any(|o| !o.loaded && o.name.as_deref() == Some(m.name.as_str()))
            })
            .map(|(n, _)| n.clone())
            .collect();
        if waiting.is_empty() {
            return Ok(event);
        }
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
        let mut entries = self.stack.entries().to_vec();
        for j in &joining {
            if let Some(e) = entries.iter_mut().find(|e| e.name == j.patch) {
                e.redirects.extend(j.funcs.iter().map(|f| Redirect {
                    old: f.old,
                    new: f.new,
                }));
            }
        }
        let change = self.module_change(entries)?;
        self.plan_sites(&change, &fresh, None, &mut plan)?;
        let flags =
            self.ftrace_flags_plan(kernel, guest, self.ftrace_changes(&change.sites, &fresh))?;
        let undo = plan.commit(guest)?;
        if let Some((fplan, set, _)) = flags {
            if let Err(e) = fplan.commit(guest) {
                undo.commit(guest)?;
                return Err(e.into());
            }
            self.ftrace_disabled.extend(set);
        }
        for s in fresh {
            self.sites.insert(s.func, s);
        }
        for j in joining {
            let Some(r) = self.records.get_mut(&j.patch) else {
                continue;
            };
            event.patches.push((j.patch.clone(), j.funcs.len()));
            r.funcs.extend(j.funcs);
            for o in &mut r.objects {
                if o.name.as_deref() == Some(m.name.as_str()) {
                    o.loaded = true;
                }
            }
            if let Some(l) = r.relink.as_mut() {
                l.images = j.images;
            }
            r.refused.remove(&m.name);
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
            let site = Site::find_in_module(&space, &kernel.kallsyms, m, ftrace, f.old_addr)
                .map_err(|source| EngineError::Site {
                    name: f.old_name.clone(),
                    source: Box::new(source),
                })?;
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
        let images = vec![linked.text, linked.rodata, linked.data];
        for (old, new) in relink.images.iter().zip(&images) {
            if old.bytes.is_empty() {
                continue;
            }
            let region = r.regions.iter().find(|x| x.va == old.va).ok_or_else(|| {
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
        })
    }

    /// The stack change of a module's functions joining or leaving.
    fn module_change(&self, entries: Vec<crate::stack::Entry>) -> Result<Change, EngineError> {
        self.stack.plan_redirects(entries).ok_or_else(|| {
            EngineError::Internal("a module's redirects changed more than redirects".into())
        })
    }

    /// klp's `klp_module_going` for the module whose `struct module` is at
    /// `addr`: see the module documentation. vCPUs paused, the unloading
    /// one held in the hook.
    pub fn module_going<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        addr: u64,
    ) -> Result<ModuleEvent, EngineError> {
        let gone: Vec<u64> = self
            .sites
            .iter()
            .filter(|(_, s)| s.module.as_ref().is_some_and(|m| m.addr == addr))
            .map(|(&f, _)| f)
            .collect();
        let name = match self
            .sites
            .values()
            .find_map(|s| s.module.as_ref().filter(|m| m.addr == addr))
        {
            Some(m) => m.name.clone(),
            None => {
                let brief = kernel.modules_brief(guest).map_err(EngineError::Modules)?;
                match brief.into_iter().find(|m| m.addr == addr) {
                    Some(m) => m.name,
                    None => return Ok(ModuleEvent::default()),
                }
            }
        };
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
        let undo = plan.commit(guest)?;
        if let Some((fplan, _, cleared)) = flags {
            if let Err(e) = fplan.commit(guest) {
                undo.commit(guest)?;
                return Err(e.into());
            }
            for w in cleared {
                self.ftrace_disabled.remove(&w);
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
            if left > 0 || had {
                event.patches.push((patch.clone(), left));
            }
        }
        for f in &gone {
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
        let w = relocation_writes(&old, &new, 0x10_0000, "p").expect("writes");
        let got: Vec<(u64, Vec<u8>)> = w.iter().map(|w| (w.gpa, w.bytes.clone())).collect();
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
    fn a_segment_that_moved_is_an_engine_bug() {
        let old = image(&[0; 4]);
        let mut new = image(&[0; 5]);
        assert!(matches!(
            relocation_writes(&old, &new, 0, "p"),
            Err(EngineError::Internal(_))
        ));
        new.bytes.truncate(4);
        new.va += 4096;
        assert!(matches!(
            relocation_writes(&old, &new, 0, "p"),
            Err(EngineError::Internal(_))
        ));
    }
}

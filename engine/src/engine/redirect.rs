//! Redirects through the guest's ftrace, as the engine drives them: which
//! functions of a transition get one, their slots installed and registered
//! through the call gate before the switch, and let go once no patch
//! redirects the function (see [`crate::ftrace_ops`]).

use crate::ftrace_ops::{Ops, Step, Support};
use crate::stack::Change;
use crate::write::Plan;
use klpvisor_guest::{Guest, Kernel};

use super::*;

impl Engine {
    /// What the guest offers for ftrace redirects (`Err`: why not; the
    /// entries then get a `jmp`). Facts must be loaded.
    pub(super) fn ops_support(&self) -> Result<Support, String> {
        self.facts
            .as_ref()
            .map_or_else(|| Err("kernel facts unavailable".into()), |f| f.ops.clone())
    }

    /// The functions `change` starts redirecting that ftrace should
    /// redirect and does not yet: those without a registered slot,
    /// vmlinux's and loaded modules' alike. (A module that loads after the
    /// patch gets a `jmp` in its load hook instead: ftrace cannot register
    /// anything while the loading vCPU is held, see [`Engine::coming_link`].)
    pub(super) fn wanted_ops(&self, change: &Change) -> Vec<u64> {
        if self.ops_support().is_err() {
            return Vec::new();
        }
        change
            .sites
            .iter()
            .filter(|(_, (before, after))| before.is_none() && after.is_some())
            .map(|(&old, _)| old)
            .filter(|old| !self.ops.as_ref().is_some_and(|o| o.registered(*old)))
            .collect()
    }

    /// The functions `change` would redirect by a `jmp` although the guest
    /// traces them (see [`Site::traced`]): [`Engine::plan_sites`] writes
    /// nothing for them, and a commit with any is refused.
    pub(super) fn traced_jumps(&self, change: &Change, fresh: &[Site]) -> Vec<String> {
        change
            .sites
            .iter()
            .filter(|(old, _)| !self.via_ftrace(**old))
            .filter_map(|(old, _)| {
                fresh
                    .iter()
                    .find(|s| s.func == *old)
                    .or_else(|| self.sites.get(old))
            })
            .filter(|s| s.traced)
            .map(|s| s.name.clone())
            .collect()
    }

    /// Whether ftrace carries `old`'s redirect: its slot is assigned (and
    /// registered by the time a switch commits). Its entry is then
    /// ftrace's, never written by klpvisor.
    pub(super) fn via_ftrace(&self, old: u64) -> bool {
        self.ops.as_ref().is_some_and(|o| o.assigned(old))
    }

    /// Installs the handler page if needed and enough slot pages for the
    /// functions `p` wants redirected through ftrace, and assigns each a
    /// slot (nothing is written into a slot until its registration). Call
    /// with every vCPU paused, before preparing `p` again (the pages come
    /// from the arena; the plan switches through the slots).
    pub fn install_ops<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
    ) -> Result<(), EngineError> {
        let mut sites = Vec::new();
        for &old in &p.wants_ops {
            if self.ops.as_ref().is_some_and(|o| o.slot(old).is_some()) {
                continue;
            }
            let site = p
                .sites
                .iter()
                .find(|s| s.func == old)
                .or_else(|| self.sites.get(&old))
                .cloned()
                .ok_or_else(|| EngineError::Internal(format!("no site for {old:#x}")))?;
            sites.push(site);
        }
        self.install_slots(kernel, guest, &sites)?;
        // Known from now on: once ftrace owns an entry its bytes are
        // ftrace's call, and a later prepare must not validate it as a nop.
        for site in sites {
            self.sites.insert(site.func, site);
        }
        Ok(())
    }

    /// Installs the handler page if needed and enough slot pages for
    /// `sites`, and assigns each a slot. Call with every vCPU paused.
    fn install_slots<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        sites: &[Site],
    ) -> Result<(), EngineError> {
        let support = self
            .ops_support()
            .map_err(crate::ftrace_ops::OpsError::Unsupported)?;
        let facts = self.facts(kernel, guest)?;
        let mut arena = facts.arena.clone();
        let mut writes = Vec::new();
        let mut ops = match &self.ops {
            Some(o) => o.clone(),
            None => {
                let (o, w) = Ops::plan_install(kernel, guest, support, &mut arena)?;
                writes.extend(w);
                o
            }
        };
        writes.extend(ops.plan_grow(guest, &mut arena, sites.len())?);
        for site in sites {
            ops.take(site.func, site.at, &site.name)?;
        }
        if !writes.is_empty() {
            let mut plan = Plan::new(arena.allowed());
            plan.extend(writes);
            plan.commit(guest)?;
            if let Some(f) = self.facts.as_mut() {
                f.arena = arena;
            }
        }
        self.ops = Some(ops);
        Ok(())
    }

    /// For a module that is coming, with its loading task held: slots for
    /// the functions `sites` the coming's switch will start redirecting,
    /// each with its fresh `ftrace_ops` written, so that the task itself
    /// can register them next ([`Engine::coming_register_call`]), as
    /// klp_module_coming registers klp's. Returns the functions that got
    /// one; none when the guest's ftrace cannot carry redirects or the
    /// arena has no room (they get a `jmp` then, with a warning). Call
    /// with every vCPU paused.
    pub(super) fn coming_ops<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        sites: &[Site],
    ) -> Vec<u64> {
        if sites.is_empty() || self.ops_support().is_err() {
            return Vec::new();
        }
        let written = self.install_slots(kernel, guest, sites).and_then(|()| {
            let ops = self
                .ops
                .as_ref()
                .ok_or_else(|| EngineError::Internal("ftrace redirects not installed".into()))?;
            let mut plan = Plan::new(ops.allowed());
            for s in sites {
                if let Some(w) = ops.image(guest, s.func)? {
                    plan.push(w);
                }
            }
            plan.commit(guest)?;
            Ok(())
        });
        match written {
            Ok(()) => sites.iter().map(|s| s.func).collect(),
            Err(e) => {
                tracing::warn!(
                    "a loading module's functions get a jmp, not an ftrace redirect: {e}"
                );
                self.abandon_coming_ops(&sites.iter().map(|s| s.func).collect::<Vec<_>>());
                Vec::new()
            }
        }
    }

    /// The next call the loading task makes to register `old`'s slot
    /// (`ftrace_set_filter_ip(ops, ip, 0, 0)`, then
    /// `register_ftrace_function(ops)`): the step, the function and its
    /// arguments; `None` once it is registered.
    pub fn coming_register_call(
        &self,
        old: u64,
    ) -> Option<(crate::ftrace_ops::Step, u64, Vec<u64>)> {
        let ops = self.ops.as_ref()?;
        let step = ops.next_up(old)?;
        let (func, args) = ops.call(old, step)?;
        Some((step, func, args))
    }

    /// What the loading task's call `step` on `old`'s slot returned.
    pub fn coming_register_done(
        &mut self,
        old: u64,
        step: crate::ftrace_ops::Step,
        ret: u64,
    ) -> Result<(), EngineError> {
        let ops = self
            .ops
            .as_mut()
            .ok_or_else(|| EngineError::Internal("ftrace redirects not installed".into()))?;
        Ok(ops.done(old, step, ret)?)
    }

    /// The next call that lets go of ftrace_ops `slot` (a going module's,
    /// from [`ModuleEvent::release`]), for the unloading task to make:
    /// `unregister_ftrace_function`, then `ftrace_free_filter`, each with
    /// the ops as its one argument; `None` once it is let go.
    pub fn module_release_call(&self, slot: u64) -> Option<(crate::ftrace_ops::Step, u64, u64)> {
        let ops = self.ops.as_ref()?;
        let step = ops.next_down(slot)?;
        let (func, args) = ops.call(slot, step)?;
        Some((step, func, *args.first()?))
    }

    /// What the unloading task's call `step` on `slot` returned.
    pub fn module_release_done(
        &mut self,
        slot: u64,
        step: crate::ftrace_ops::Step,
        ret: u64,
    ) -> Result<(), EngineError> {
        match self.ops.as_mut() {
            Some(ops) => Ok(ops.done(slot, step, ret)?),
            None => Ok(()),
        }
    }

    /// A coming that will not switch (a callback or a registration
    /// refused it): its slots that never reached the guest's ftrace are
    /// handed out again, the others detached. Returns those (by slot
    /// address), for the loading task to let go of before the load fails
    /// (ftrace would warn when a module loads on their sites again).
    pub fn abandon_coming_ops(&mut self, olds: &[u64]) -> Vec<u64> {
        let Some(ops) = self.ops.as_mut() else {
            return Vec::new();
        };
        let mut release = Vec::new();
        for &old in olds {
            match ops.slot(old).map(|s| (s.state, s.va)) {
                Some((crate::ftrace_ops::SlotState::Assigned, _)) => ops.forget_assigned(old),
                Some((_, va)) => {
                    ops.detach(old);
                    release.push(va);
                }
                None => {}
            }
        }
        release
    }

    /// Sends the next step that registers a slot `p` switches through
    /// (its fresh `ftrace_ops` written in the same pause as the first), or
    /// `None` when every one is registered. Call with every vCPU paused,
    /// before `p`'s load; then raise the gate's vector on [`Armed::vcpu`]
    /// and give the result to [`Engine::ops_done`].
    pub fn arm_ops<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
    ) -> Result<Option<Armed>, EngineError> {
        for &old in &p.wants_ops {
            let ops = self
                .ops
                .as_ref()
                .ok_or_else(|| EngineError::Internal("ftrace redirects not installed".into()))?;
            if ops.slot(old).is_none() {
                return Err(EngineError::Internal(format!(
                    "no ftrace_ops slot was assigned to {old:#x}"
                )));
            }
            let Some(step) = ops.next_up(old) else {
                continue;
            };
            let image = ops.image(guest, old)?;
            return self
                .arm_ops_step(kernel, guest, old, step, image.as_ref())
                .map(Some);
        }
        Ok(None)
    }

    /// Every function whose switch in `p` goes through a slot not
    /// registered with the guest's ftrace: a commit with any is refused.
    pub(super) fn unregistered_ops(&self, p: &Prepared) -> Vec<String> {
        let Some(ops) = &self.ops else {
            return Vec::new();
        };
        p.change
            .sites
            .keys()
            .filter(|old| ops.assigned(**old) && !ops.registered(**old))
            .filter_map(|old| ops.slot(*old).map(|s| s.name.clone()))
            .collect()
    }

    /// Forgets the slots assigned to functions of a transition that
    /// ended without registering them (nothing of them is in the guest).
    pub fn abandon_ops(&mut self) {
        let live = self.stack.live();
        if let Some(ops) = self.ops.as_mut() {
            let assigned: Vec<u64> = ops
                .slots()
                .filter(|(old, s)| {
                    s.state == crate::ftrace_ops::SlotState::Assigned && !live.contains_key(old)
                })
                .map(|(old, _)| old)
                .collect();
            for old in assigned {
                ops.forget_assigned(old);
            }
        }
    }

    /// Sends `step` on `old`'s slot through the gate, writing `image`
    /// (its fresh `ftrace_ops`) in the same pause.
    fn arm_ops_step<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        old: u64,
        step: Step,
        image: Option<&crate::write::Write>,
    ) -> Result<Armed, EngineError> {
        let ops = self
            .ops
            .as_ref()
            .ok_or_else(|| EngineError::Internal("ftrace redirects not installed".into()))?;
        let (func, args) = ops
            .call(old, step)
            .ok_or_else(|| EngineError::Internal(format!("no {} for {old:#x}", step.function())))?;
        let name = ops.slot(old).map(|s| s.name.clone()).unwrap_or_default();
        let mut pre = Plan::new(ops.allowed());
        if let Some(w) = image {
            pre.push(w.clone());
        }
        let (gate, (cpu, base), seq) = self.next_call(kernel, guest)?;
        let label = format!("#{seq} {} for {name}", step.function());
        let plan = gate.plan_call(kernel, guest, (cpu, base), func, &args, seq, &label)?;
        pre.commit(guest)?;
        plan.commit(guest)?;
        self.calls = seq;
        self.ops_armed = Some((old, step));
        tracing::debug!(
            func = name,
            step = step.function(),
            seq,
            "ftrace redirect step sent"
        );
        Ok(Armed { seq, vcpu: 0, cpu })
    }

    /// Takes what the step sent last returned.
    pub fn ops_done(&mut self, ret: u64) -> Result<(), EngineError> {
        let Some((old, step)) = self.ops_armed.take() else {
            return Err(EngineError::Internal(
                "no ftrace redirect step was sent".into(),
            ));
        };
        let ops = self
            .ops
            .as_mut()
            .ok_or_else(|| EngineError::Internal("ftrace redirects not installed".into()))?;
        ops.done(old, step, ret)?;
        if let Some(s) = ops.slot(old) {
            tracing::info!(
                func = s.name,
                step = step.function(),
                "ftrace redirect step done"
            );
        }
        Ok(())
    }

    /// The step sent last, by function name and kernel function.
    pub fn ops_armed(&self) -> Option<(String, &'static str)> {
        let (old, step) = self.ops_armed?;
        let name = self.ops.as_ref()?.slot(old)?.name.clone();
        Some((name, step.function()))
    }

    /// The guest did not run `p`'s registrations in time: the slot of the
    /// step sent last is written off (its call may still run in the guest
    /// one day, and only then would its outcome be known), and the other
    /// slots `p` assigned and never wrote are handed out again, so that
    /// `p`, prepared again, redirects those functions by a jmp. A slot
    /// whose filter was set is let go later, as any unused one.
    pub fn ops_unreachable(&mut self, p: &Prepared) {
        let armed = self.ops_armed.take();
        let Some(ops) = self.ops.as_mut() else {
            return;
        };
        if let Some((old, _)) = armed {
            ops.lose(old);
        }
        for &old in &p.wants_ops {
            ops.forget_assigned(old);
        }
    }

    /// Slots of functions no patch redirects now (a disable's, a
    /// replace's, an abandoned apply's), in old-function order: klp
    /// unregisters a function's ops as soon as no patch redirects it, so
    /// an unpatched function is ftrace's alone again.
    fn unheld_ops(&self) -> Vec<u64> {
        let Some(ops) = &self.ops else {
            return Vec::new();
        };
        let live = self.stack.live();
        ops.slots()
            .filter(|(_, s)| s.state != crate::ftrace_ops::SlotState::Lost)
            .map(|(old, _)| old)
            .filter(|old| !live.contains_key(old))
            .collect()
    }

    /// Zeroes the freed slots that still hold an `ftrace_ops`. Call with
    /// every vCPU paused, after their filters were freed.
    pub fn scrub_ops<G: Guest + ?Sized>(&mut self, guest: &G) -> Result<(), EngineError> {
        let Some(ops) = self.ops.as_mut() else {
            return Ok(());
        };
        let allowed = ops.allowed();
        let writes = ops.plan_scrub(guest)?;
        if !writes.is_empty() {
            let mut plan = Plan::new(allowed);
            plan.extend(writes);
            plan.commit(guest)?;
        }
        Ok(())
    }

    /// How many slots wait to be let go.
    pub fn ops_releases(&self) -> usize {
        self.unheld_ops().len()
    }

    /// Sends the next step that lets go of a slot no patch redirects
    /// (`unregister_ftrace_function`, then `ftrace_free_filter`); `None`
    /// if there is none. Returns the function's name with it. Call with
    /// every vCPU paused; then raise the gate's vector and give the result
    /// to [`Engine::ops_done`].
    pub fn arm_ops_release<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<Option<(Armed, String)>, EngineError> {
        for old in self.unheld_ops() {
            let Some(ops) = self.ops.as_mut() else {
                break;
            };
            ops.forget_assigned(old);
            let Some(step) = ops.next_down(old) else {
                continue;
            };
            let name = ops.slot(old).map(|s| s.name.clone()).unwrap_or_default();
            let quiet = match step {
                Step::Unregister => ops.plan_quiet(guest, old)?,
                _ => None,
            };
            let armed = self.arm_ops_step(kernel, guest, old, step, quiet.as_ref())?;
            return Ok(Some((armed, format!("{} of {name}", step.function()))));
        }
        Ok(None)
    }
}

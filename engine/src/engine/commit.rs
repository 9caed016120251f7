//! Commit: with every vCPU paused, check the safe points and every
//! expected byte, write, and adopt the new stack.

use crate::callback::Calls;
use crate::safepoint::{Blocker, Check};
use crate::stack::Change;
use crate::write::Plan;
use klpvisor_api::PatchInfo;
use klpvisor_guest::Guest;
use klpvisor_guest::{all_vcpu_regs, Kernel};

use super::*;

impl Engine {
    pub(super) fn prepared_sites(
        &self,
        name: &str,
        action: &'static str,
        change: Change,
        calls: Calls,
    ) -> Result<Prepared, EngineError> {
        let mut plan = Plan::new(Vec::new());
        let check = self.plan_sites(&change, &[], None, &mut plan)?;
        let wants_ops = self.wanted_ops(&change);
        let traced_jumps = self.traced_jumps(&change, &[]);
        Ok(Prepared {
            name: name.to_owned(),
            action,
            change,
            plan,
            arena: None,
            record: None,
            sites: Vec::new(),
            check,
            warnings: Vec::new(),
            calls,
            loaded_bytes: 0,
            loaded: false,
            klp_before: self.klp_enabled(),
            percpu: None,
            wants_ops,
            traced_jumps,
        })
    }

    /// Commits `p` with every vCPU paused: the safe-point check (unless
    /// the transition is forced), then every write, then the new state.
    pub fn commit<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
    ) -> Result<Committed, EngineError> {
        if p.needs_percpu() {
            return Err(EngineError::Internal(format!(
                "{} was linked before its per-CPU block was allocated; not writing it",
                p.name
            )));
        }
        p.usable()?;
        // Where the pause's time goes, for the log (each step's end).
        let t0 = std::time::Instant::now();
        let unregistered = self.unregistered_ops(p);
        if !unregistered.is_empty() {
            return Err(EngineError::Internal(format!(
                "{}: the switch goes through ftrace_ops the guest's ftrace has not registered; \
                 not writing it",
                unregistered.join(", ")
            )));
        }
        self.check_modules(kernel, guest, p)?;
        // A patch not loaded by Engine::load yet is loaded, and its module
        // registered, in this same pause: nothing runs in between.
        let register = p
            .record
            .as_ref()
            .and_then(|r| r.module.clone())
            .filter(|_| !p.loaded);
        if register.is_some() {
            self.registry_quiet(kernel, guest)?;
        }
        self.spend_prescan(&p.check);
        let prescan = self.spent_prescan_for(&p.check);
        let t_modules = t0.elapsed();
        let mut pause_tasks = 0;
        if !p.change.forced && !p.check.is_empty() {
            let (blockers, read) = self.blockers(kernel, guest, &p.check, prescan)?;
            if !blockers.is_empty() {
                return Err(EngineError::Blocked(blockers));
            }
            pause_tasks = read;
        }
        let t_check = t0.elapsed();
        // Read and checked before anything is written: a busy ftrace waits.
        let ftrace = self.ftrace_plan(kernel, guest, p)?;
        let t_ftrace = t0.elapsed();
        let undo = p.plan.commit(guest)?;
        let t_write = t0.elapsed();
        let unlink = match &register {
            Some(r) => Some(self.register_or_undo(kernel, guest, &p.name, r, &undo)?),
            None => None,
        };
        if let Some((plan, set, cleared)) = ftrace {
            if let Err(e) = plan.commit(guest) {
                if let Some(u) = unlink {
                    u.commit(guest)?;
                }
                undo.commit(guest)?;
                return Err(e.into());
            }
            self.ftrace_disabled.extend(set);
            for w in cleared {
                self.ftrace_disabled.remove(&w);
            }
        }
        if let Some(m) = p.record.as_ref().and_then(|r| r.module.as_ref()) {
            self.orc_add(m);
        }
        if let Some(arena) = &p.arena {
            if let Some(f) = self.facts.as_mut() {
                f.arena = arena.clone();
            }
        }
        for s in &p.sites {
            self.sites.insert(s.func, s.clone());
        }
        if let Some(r) = &p.record {
            self.percpu_adopted(r);
            self.records.insert(p.name.clone(), r.clone());
        }
        self.raise_floor(p);
        self.seq += 1;
        if self.history.len() == MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Past {
            seq: self.seq,
            at: now_unix(),
            action: p.action,
            patch: p.name.clone(),
            forced: p.change.forced,
            before: self.stack.placed(),
        });
        self.stack.apply(&p.change);
        // In the same pause, free retired code no stack references any
        // more. A failure only delays that; the transition has committed.
        let _ = self.sweep(kernel, guest);
        let us = |d: std::time::Duration| d.as_micros() as u64;
        tracing::debug!(
            patch = p.name,
            modules_us = us(t_modules),
            check_us = us(t_check - t_modules),
            ftrace_us = us(t_ftrace - t_check),
            write_us = us(t_write - t_ftrace),
            rest_us = us(t0.elapsed() - t_write),
            pause_tasks,
            "commit inside the pause"
        );
        Ok(Committed {
            name: p.name.clone(),
            seq: self.seq,
            patch: self.info(&p.name),
            bytes_written: p.bytes(),
            pause_tasks: u32::try_from(pause_tasks).unwrap_or(u32::MAX),
        })
    }

    /// Every module whose text this transition writes is still the
    /// module its sites were validated in: on the list at the same
    /// `struct module`, live or coming, with the same text. A module
    /// unloaded since (its text freed, perhaps reused) or reloaded
    /// elsewhere refuses the transition before anything is written.
    pub(super) fn check_modules<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
    ) -> Result<(), EngineError> {
        let mut wanted: Vec<&crate::site::InModule> = Vec::new();
        for old in p.change.sites.keys() {
            let site = p
                .sites
                .iter()
                .find(|s| s.func == *old)
                .or_else(|| self.sites.get(old));
            if let Some(m) = site.and_then(|s| s.module.as_ref()) {
                if !wanted.contains(&m) {
                    wanted.push(m);
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let now = kernel.modules_brief(guest).map_err(EngineError::Modules)?;
        for m in wanted {
            let same = now.iter().any(|n| {
                n.name == m.name
                    && n.addr == m.addr
                    && n.text == m.text
                    && matches!(
                        n.state,
                        klpvisor_guest::ModuleState::Live | klpvisor_guest::ModuleState::Coming
                    )
            });
            if !same {
                return Err(EngineError::ModuleGone(m.name.clone()));
            }
        }
        Ok(())
    }

    /// Judges, while the guest runs, every task that is off every CPU
    /// against `p`'s check, and keeps those found clear for `p`'s next
    /// commit ([`Check::prescan`] says why that is sound): the pause then
    /// unwinds only the tasks that ran since. Nothing is written. A
    /// failure only means the pause judges every task, as it would have.
    ///
    /// While the switch log runs, the stacks read are kept summarised
    /// ([`crate::safepoint::StackCache`]), and the next pre-scan reads
    /// only the tasks the log names since: what it costs follows the
    /// switches, not the tasks.
    pub fn prescan<G: Guest + ?Sized>(&mut self, kernel: &Kernel, guest: &G, p: &Prepared) {
        if p.change.forced {
            self.prescan = None;
            self.spent_prescan = None;
            return;
        }
        self.prescan_check(kernel, guest, &p.check, &p.name);
    }

    /// The pre-scan for `check` (a transition's, or the sweep's of the
    /// retired patches), with the guest running; `name` is for the log.
    pub(super) fn prescan_check<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        check: &crate::safepoint::Check,
        name: &str,
    ) {
        self.prescan = None;
        self.spent_prescan = None;
        if check.is_empty() {
            return;
        }
        let Some(f) = self.facts.as_ref() else {
            return;
        };
        let space = kernel.space(guest);
        // Before the first task is read: the switches the pause must look
        // at are those logged from here on.
        let live = self
            .switches
            .as_ref()
            .and_then(|l| Some((l, l.live_head(guest).ok()?)));
        let head0 = live.map(|(_, h)| h);
        let cached = live.and_then(|(log, head)| {
            let cache = self
                .stack_cache
                .as_ref()
                .filter(|c| c.usable(log.epoch()))?;
            let named = match log.named_between(guest, cache.head, head) {
                Ok(n) => n,
                Err(why) => {
                    tracing::debug!(patch = name, "a full pre-scan: {why}");
                    return None;
                }
            };
            let read = |addr| f.tasks.read_task(&space, addr).ok();
            Some(check.prescan_cached(
                &space,
                cache,
                &named,
                head,
                f.orc.as_ref(),
                &f.hooks,
                read,
                read,
            ))
        });
        if let Some((scan, cache)) = cached {
            tracing::debug!(
                patch = name,
                clear = scan.len(),
                summarised = cache.len(),
                "pre-scan from the stacks summarised before, the switches since read again"
            );
            self.stack_cache = Some(cache);
            self.prescan = Some((check.clone(), scan));
            return;
        }
        let tasks = match f.tasks.list(&space, &[]) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(patch = name, "no pre-scan: {e}");
                return;
            }
        };
        let mut scan = check.prescan(&space, &tasks, f.orc.as_ref(), &f.hooks, |addr| {
            f.tasks.read_task(&space, addr).ok()
        });
        scan.head0 = head0;
        tracing::debug!(
            patch = name,
            clear = scan.len(),
            tasks = tasks.len(),
            "pre-scan while the guest runs"
        );
        self.stack_cache = live.map(|(log, head)| {
            crate::safepoint::StackCache::from_full(&scan, log.epoch(), head, tasks.len())
        });
        self.prescan = Some((check.clone(), scan));
    }

    /// Takes the pre-scan made for `check`, if that is the one waiting:
    /// used once, it moves to `spent_prescan`, which the next pre-scan
    /// frees with the guest running (not in this pause). A pre-scan for
    /// another check stays where it is.
    pub(super) fn spend_prescan(&mut self, check: &crate::safepoint::Check) {
        if self.prescan.as_ref().is_some_and(|(c, _)| c == check) {
            self.spent_prescan = self.prescan.take();
        }
    }

    /// The pre-scan [`Engine::spend_prescan`] took for `check`.
    pub(super) fn spent_prescan_for(
        &self,
        check: &crate::safepoint::Check,
    ) -> Option<&crate::safepoint::Prescan> {
        self.spent_prescan
            .as_ref()
            .filter(|(c, _)| c == check)
            .map(|(_, scan)| scan)
    }

    pub(super) fn blockers<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        check: &Check,
        prescan: Option<&crate::safepoint::Prescan>,
    ) -> Result<(Vec<Blocker>, usize), EngineError> {
        let f = self
            .facts
            .as_ref()
            .ok_or_else(|| EngineError::Internal("kernel facts unavailable".into()))?;
        // Every read of the check goes through one translation cache,
        // valid because the guest is paused until this returns.
        let space = klpvisor_guest::PageCache::new(kernel.space(guest));
        let regs = all_vcpu_regs(guest)?;
        let bases = f.tasks.per_cpu_bases(&space)?;
        let irq = match f.hardirq_stack_ptr {
            Some(ptr) => {
                crate::safepoint::irq_stacks_sized(&space, &bases, ptr, f.tasks.layout.thread_size)
            }
            None => Vec::new(),
        };
        let entry = f
            .entry_stack_sp0
            .map(|e| crate::safepoint::entry_stacks(&space, &bases, e))
            .unwrap_or_default();
        let check = check.clone().with_entry_stacks(entry);
        let judge = |tasks: &[klpvisor_guest::Task]| {
            check.blockers_prescanned(
                &space,
                tasks,
                &regs,
                &irq,
                f.orc.as_ref(),
                &f.hooks,
                prescan,
            )
        };
        // With the switch log, only the tasks that may have run since the
        // pre-scan are read; a verdict of "blocked" is taken from the
        // whole task list, so blockers are reported exactly as without it.
        if let Some(few) = self.tasks_since_prescan(&space, guest, &regs, prescan) {
            let blockers = judge(&few)?;
            if blockers.is_empty() {
                return Ok((blockers, few.len()));
            }
        }
        let tasks = f.tasks.list(&space, &regs)?;
        Ok((judge(&tasks)?, tasks.len()))
    }

    /// The tasks the pause must judge when the switch log is live (see
    /// [`crate::switches`]): those the pre-scan did not clear, those that
    /// took part in a switch since it began, and those the vCPUs run
    /// now. `None` when the log cannot say (not live, wrapped, a vCPU in
    /// its probe, a read failed): then every task is judged.
    fn tasks_since_prescan<G: Guest + ?Sized, M: klpvisor_guest::VirtRead + ?Sized>(
        &self,
        space: &M,
        guest: &G,
        regs: &[klpvisor_guest::VcpuRegs],
        prescan: Option<&crate::safepoint::Prescan>,
    ) -> Option<Vec<klpvisor_guest::Task>> {
        let f = self.facts.as_ref()?;
        let scan = prescan?;
        let head0 = scan.head0?;
        let log = self.switches.as_ref()?;
        let switched = match log.switched_since(guest, space, regs, head0) {
            Ok(s) => s,
            Err(why) => {
                tracing::debug!("the pause reads every task: {why}");
                return None;
            }
        };
        let running = f.tasks.running(space, regs).ok()?;
        let mut addrs: Vec<u64> = running.iter().map(|&(a, _)| a).collect();
        addrs.extend(scan.unclear().iter().copied());
        addrs.extend(switched.iter().copied());
        addrs.sort_unstable();
        addrs.dedup();
        let mut out = Vec::with_capacity(addrs.len());
        for addr in addrs {
            // An address the log names that holds no task now (freed
            // since, or a forged entry) makes the whole list the judge.
            let mut t = f.tasks.read_task(space, addr).ok()?;
            t.running = running.iter().find(|&&(a, _)| a == addr).map(|&(_, r)| r);
            out.push(t);
        }
        tracing::debug!(
            judged = out.len(),
            switched = switched.len(),
            "the pause judges the tasks that may have run since the pre-scan"
        );
        Some(out)
    }

    /// Notes the pause a committed transition took (measured by the VMM).
    pub fn record_pause(&mut self, name: &str, pause_us: f64) -> Option<PatchInfo> {
        if let Some(r) = self.records.get_mut(name) {
            if r.pause_us == 0.0 {
                r.pause_us = pause_us;
            }
        }
        self.info(name)
    }

    /// The API's reply to a committed transition of one patch (apply,
    /// disable, enable): the patch as it now is, with the pause noted.
    pub fn transition_reply(
        &mut self,
        o: crate::transition::Outcome,
    ) -> Result<klpvisor_api::TransitionReply, EngineError> {
        let patch = self
            .record_pause(&o.committed.name, o.pause_us)
            .or(o.committed.patch)
            .ok_or_else(|| EngineError::Internal("the committed patch vanished".into()))?;
        Ok(klpvisor_api::TransitionReply {
            patch,
            prepare_ms: o.prepare_ms,
            pause_us: o.pause_us,
            bytes_written: o.committed.bytes_written,
            warnings: o.warnings,
            attempts: o.attempts,
            waited_ms: o.waited_ms,
            nudged: o.nudged,
            pause_tasks: o.committed.pause_tasks,
            callbacks: o.callbacks,
        })
    }

    /// The API's reply to a committed rollback to transition `to`.
    pub fn rollback_reply(
        &self,
        to: u64,
        o: crate::transition::Outcome,
    ) -> klpvisor_api::RollbackReply {
        klpvisor_api::RollbackReply {
            to,
            seq: o.committed.seq,
            patches: self.list(),
            prepare_ms: o.prepare_ms,
            pause_us: o.pause_us,
            bytes_written: o.committed.bytes_written,
            attempts: o.attempts,
            waited_ms: o.waited_ms,
            nudged: o.nudged,
            pause_tasks: o.committed.pause_tasks,
            callbacks: o.callbacks,
            warnings: o.warnings,
        }
    }
}

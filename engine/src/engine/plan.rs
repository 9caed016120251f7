//! Prepare: what a transition must write, computed while the guest runs
//! (enable, disable, rollback), and the klp rules that refuse one before
//! anything is written.

use crate::callback::Calls;
use crate::link::LinkedCallbacks;
use crate::module::State;
use crate::safepoint::{Check, Span};
use crate::site::Site;
use crate::stack::{Change, Entry};
use crate::write::{Plan, Write};
use klpvisor_api::PatchState;
use klpvisor_guest::Guest;
use klpvisor_guest::Kernel;

use super::*;

impl Engine {
    /// The site writes and safe-point spans of a stack change.
    pub(super) fn plan_sites(
        &self,
        change: &Change,
        fresh: &[Site],
        fresh_record: Option<&Record>,
        plan: &mut Plan,
    ) -> Result<Check, EngineError> {
        let mut spans = Vec::new();
        let mut handler = None;
        for (&old, &(before, after)) in &change.sites {
            let site = fresh
                .iter()
                .find(|s| s.func == old)
                .or_else(|| self.sites.get(&old))
                .ok_or_else(|| EngineError::Internal(format!("no site for {old:#x}")))?;
            let bytes =
                |t: Option<u64>| -> Result<Vec<u8>, EngineError> {
                    match t {
                        Some(t) => site.redirect(t).map(|b| b.to_vec()).map_err(|source| {
                            EngineError::Site {
                                name: site.name.clone(),
                                source: Box::new(source),
                            }
                        }),
                        None => Ok(site.original.to_vec()),
                    }
                };
            match self
                .ops
                .as_ref()
                .and_then(|o| o.switch_write(old, before, after))
            {
                // ftrace carries the redirect: the switch is its ops'
                // `private` word, and no task may be in the handler, which
                // holds that word in a register for a few instructions.
                Some((allowed, write)) => {
                    plan.allow(allowed);
                    plan.push(write);
                    if let Some(o) = &self.ops {
                        handler = Some(o.handler_range());
                    }
                }
                // Never a jmp over ftrace's call: the commit refuses such
                // a plan (Prepared::traced_jumps).
                None if site.traced => {}
                None => {
                    plan.allow(site.allowed());
                    plan.push(Write::new(
                        site.gpa,
                        bytes(after)?,
                        bytes(before)?,
                        format!("entry of {}", site.name),
                    ));
                }
            }
            spans.push(Span {
                range: if site.extent.is_empty() {
                    old..old + 1
                } else {
                    site.extent.clone()
                },
                name: site.name.clone(),
            });
            // The code being switched away from, if it is a patch's.
            if let Some(t) = before {
                if let Some(r) = self
                    .records
                    .values()
                    .chain(fresh_record)
                    .find(|r| r.text().any(|x| x.contains(&t)))
                {
                    for range in r.text() {
                        spans.push(Span {
                            range,
                            name: format!("patched {}", site.name),
                        });
                    }
                }
            }
        }
        if let Some(range) = handler {
            spans.push(Span {
                range,
                name: "klpvisor's ftrace redirect handler".into(),
            });
        }
        Ok(Check::new(spans))
    }

    /// Plans disabling enabled patch `name`.
    pub fn prepare_disable<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        name: &str,
        force: bool,
    ) -> Result<Prepared, EngineError> {
        self.facts(kernel, guest)?;
        let change = self.stack.plan_disable(name, force)?;
        let mut calls = Calls::default();
        calls.disable(name, &self.callbacks_of(name));
        let mut p = self.prepared_sites(name, "disable", change, calls)?;
        // klp's unpatching transition waits for every task to leave every
        // function of the patch (klp_check_stack_func looks for new_func),
        // also those a newer enabled patch shadows, whose entries do not
        // change: a task may have entered them before that patch came.
        if let Some(r) = self.records.get(name) {
            p.check.extend(r.text().map(|range| Span {
                range,
                name: format!("{name} (being disabled)"),
            }));
        }
        Ok(p)
    }

    /// A patch whose object waits for a module that is loaded (its link
    /// failed when the module came, while the patch was disabled) cannot
    /// be enabled: klp would refuse to enable it for the same reason.
    pub(super) fn check_unlinked<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        name: &str,
        r: &Record,
    ) -> Result<(), EngineError> {
        let waiting: Vec<&str> = r
            .objects
            .iter()
            .filter(|o| !o.loaded)
            .filter_map(|o| o.name.as_deref())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let loaded = kernel.modules_brief(guest).map_err(EngineError::Modules)?;
        for w in waiting {
            if loaded.iter().any(|m| {
                m.name == w
                    && matches!(
                        m.state,
                        klpvisor_guest::ModuleState::Live | klpvisor_guest::ModuleState::Coming
                    )
            }) {
                return Err(EngineError::Unlinked {
                    patch: name.to_owned(),
                    module: w.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// klp's system-state rule ([`crate::state::check`]) for enabling
    /// `patch` (`replace`, carrying `states`) next to the enabled patches.
    pub(super) fn check_states(
        &self,
        patch: &str,
        replace: bool,
        states: &[State],
    ) -> Result<(), EngineError> {
        let new = crate::state::Holder {
            name: patch,
            replace,
            states,
        };
        let enabled = self.holders(
            self.stack
                .entries()
                .iter()
                .filter(|e| e.state == PatchState::Enabled),
        );
        Ok(crate::state::check(new, enabled)?)
    }

    /// The state rule's view of `entries`' patches.
    pub(super) fn holders<'a>(
        &'a self,
        entries: impl Iterator<Item = &'a Entry>,
    ) -> Vec<crate::state::Holder<'a>> {
        entries
            .filter_map(|e| {
                let r = self.records.get(&e.name)?;
                Some(crate::state::Holder {
                    name: &e.name,
                    replace: r.replace,
                    states: &r.states,
                })
            })
            .collect()
    }

    /// Plans enabling loaded patch `name` again.
    pub fn prepare_enable<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        name: &str,
        force: bool,
    ) -> Result<Prepared, EngineError> {
        self.facts(kernel, guest)?;
        // The stack's refusals first (unknown, enabled, pinned): they say
        // more than a state conflict would.
        let change = self.stack.plan_reenable(name, force)?;
        if let Some(r) = self.records.get(name) {
            self.check_states(name, r.replace, &r.states)?;
            self.check_unlinked(kernel, guest, name, r)?;
        }
        // Only the enabled patch's callbacks, also when it replaces others.
        let mut calls = Calls::default();
        calls.enable(name, &self.callbacks_of(name));
        self.prepared_sites(name, "enable", change, calls)
    }

    /// Plans returning every patch to the state it had just before
    /// transition `to` (default: the last one, i.e. undo it), in one
    /// transition with the same safe-point rule as any other: what no
    /// in-kernel livepatch can do, since a replace there frees what it
    /// replaced. Patches loaded since stay loaded, disabled.
    pub fn prepare_rollback<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        to: Option<u64>,
        force: bool,
    ) -> Result<Prepared, EngineError> {
        self.facts(kernel, guest)?;
        let to = to.unwrap_or(self.seq);
        let past =
            self.history
                .iter()
                .find(|p| p.seq == to)
                .ok_or(EngineError::NoSuchTransition {
                    to,
                    newest: self.seq,
                })?;
        let change = self.stack.plan_restore(&past.before, force)?;
        // The same system-state rule as enable, for what the rollback
        // enables (it cannot bring back a patch enable would refuse).
        if let Some(after) = &change.restore {
            let enabled = |e: &&Entry| e.state == PatchState::Enabled;
            crate::state::check_restore(
                &self.holders(self.stack.entries().iter().filter(enabled)),
                &self.holders(after.iter().filter(enabled)),
            )?;
        }
        let calls = self.rollback_calls(&change);
        self.prepared_sites(&format!("#{to}"), "rollback", change, calls)
    }

    /// A rollback runs callbacks as the enables and disables it amounts to
    /// would: if it enables a replace patch, that is a replace and only the
    /// enabled patches' callbacks run; otherwise the patches it enables
    /// run their patch callbacks (oldest first) and those it disables
    /// their unpatch callbacks (newest first).
    pub(super) fn rollback_calls(&self, change: &Change) -> Calls {
        let enabled_now = |n: &str| {
            self.stack
                .get(n)
                .is_some_and(|e| e.state == PatchState::Enabled)
        };
        let after = |n: &str| change.states.iter().find(|(x, _)| x == n).map(|(_, s)| *s);
        let order: Vec<&Entry> = match &change.restore {
            Some(after) => after.iter().collect(),
            None => self.stack.entries().iter().collect(),
        };
        let enabling: Vec<&str> = order
            .iter()
            .map(|e| e.name.as_str())
            .filter(|n| after(n) == Some(PatchState::Enabled) && !enabled_now(n))
            .collect();
        let disabling: Vec<&str> = self
            .stack
            .entries()
            .iter()
            .rev()
            .map(|e| e.name.as_str())
            .filter(|n| enabled_now(n) && after(n).is_some_and(|s| s != PatchState::Enabled))
            .collect();
        let replace = enabling
            .iter()
            .any(|n| self.records.get(*n).is_some_and(|r| r.replace));
        let mut calls = Calls::default();
        for n in enabling {
            calls.enable(n, &self.callbacks_of(n));
        }
        if !replace {
            for n in disabling {
                calls.disable(n, &self.callbacks_of(n));
            }
        }
        calls
    }

    pub(super) fn callbacks_of(&self, name: &str) -> Vec<LinkedCallbacks> {
        self.records
            .get(name)
            .map(|r| r.callbacks.clone())
            .unwrap_or_default()
    }
}

//! Removal and the sweep: patches that left the stack are retired, and
//! their pages freed once no task's stack refers to them.

use crate::safepoint::{Check, Span};
use crate::stack::StackError;
use klpvisor_api::{PatchInfo, RetiredInfo};
use klpvisor_guest::Guest;
use klpvisor_guest::Kernel;

use super::*;

/// A retired patch's name as its check's span (and blockers) call it.
fn span_name(name: &str) -> String {
    format!("retired {name}")
}

impl Engine {
    /// Forgets a patch that is not enabled. Its code stays mapped, and its
    /// arena space allocated, until [`Engine::sweep`] finds no task whose
    /// stack references it (klp frees a module only after its transition
    /// completed, for the same reason).
    pub fn remove(&mut self, name: &str) -> Result<PatchInfo, EngineError> {
        let info = self
            .info(name)
            .ok_or_else(|| StackError::Unknown(name.to_owned()))?;
        self.stack.remove(name)?;
        if let Some(record) = self.records.remove(name) {
            self.retired.push(Retired {
                name: name.to_owned(),
                removed_at: now_unix(),
                record,
            });
        }
        Ok(info)
    }

    /// The check that finds the tasks still referencing retired code.
    fn retired_check(&self) -> Check {
        Check::new(
            self.retired
                .iter()
                .flat_map(|r| {
                    r.record.text().map(|range| Span {
                        range,
                        name: span_name(&r.name),
                    })
                })
                .collect(),
        )
    }

    /// The pre-scan for the next [`Engine::sweep`], with the guest
    /// running: the sweep's pause then reads only the tasks that may have
    /// run since (all of them, as without it, when the switch log cannot
    /// say), as a transition's pause does.
    pub fn prescan_retired<G: Guest + ?Sized>(&mut self, kernel: &Kernel, guest: &G) {
        if self.retired.is_empty() {
            return;
        }
        let check = self.retired_check();
        self.prescan_check(kernel, guest, &check, "(retired patches)");
    }

    /// Frees the arena space of every retired patch no task references:
    /// no RIP and no return address (conservatively, no stack word) inside
    /// its code. Call with every vCPU paused. Returns the names freed.
    /// Uses the pre-scan [`Engine::prescan_retired`] left if it was made
    /// for the same retired patches.
    pub fn sweep<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<Vec<String>, EngineError> {
        if self.retired.is_empty() {
            return Ok(Vec::new());
        }
        // One check of the tasks for all retired patches (the tasks read,
        // not the number of spans, is what costs inside the pause).
        let check = self.retired_check();
        // A transition's own pre-scan (another check) stays for its
        // commit.
        self.spend_prescan(&check);
        let prescan = self.spent_prescan_for(&check);
        // Unknown means referenced: freeing too late costs space, freeing
        // too early lets new code overwrite a live frame. So a failed walk,
        // or a blocker that names no retired patch (a vCPU on no known
        // stack, a return the kernel hid where it cannot be read), keeps
        // every one of them.
        let referenced: Option<Vec<String>> = match self
            .blockers(kernel, guest, &check, prescan)
            .map(|(b, _)| b)
        {
            Ok(b) => {
                let names: Vec<String> = self.retired.iter().map(|r| span_name(&r.name)).collect();
                if b.iter().all(|b| names.contains(&b.func)) {
                    Some(b.into_iter().map(|b| b.func).collect())
                } else {
                    None
                }
            }
            Err(_) => None,
        };
        let mut freed = Vec::new();
        let mut keep = Vec::new();
        // Iterate over a copy: registry plans look at every retired
        // patch's module, this one's included.
        for r in self.retired.clone() {
            let referenced = referenced
                .as_ref()
                .is_none_or(|names| names.contains(&span_name(&r.name)));
            // A transition that could not take its patches off the guest's
            // klp_patches left them there (the next one tries again).
            if referenced || self.klp_shows(r.record.klp_patch) {
                keep.push(r);
                continue;
            }
            if let Some(m) = r.record.module.as_ref() {
                // Its struct module leaves the kernel's lists before its
                // memory is freed. A kernel reader walking past it (only
                // one running on a vCPU right now can be: those walks do
                // not sleep) has the whole time until the pages are
                // reused to move on: that is a later transition's load,
                // after the guest has run again.
                let unlinked = self
                    .unregister_plan(kernel, guest, m)
                    .and_then(|plan| match plan {
                        Some(plan) => Ok(plan.commit(guest).map(drop)?),
                        None => Ok(()),
                    });
                if let Err(e) = unlinked {
                    tracing::info!(patch = r.name, "module not unregistered yet: {e}");
                    keep.push(r);
                    continue;
                }
                self.orc_remove(m);
            }
            if let Some(f) = self.facts.as_mut() {
                for region in &r.record.regions {
                    f.arena.free(region)?;
                }
            }
            // Its per-CPU block goes back to the guest's allocator once no
            // code that addresses it can run; the free is sent through the
            // call gate after this pause.
            if let Some(b) = r.record.percpu {
                self.percpu_free.push((r.name.clone(), b));
            }
            freed.push(r.name);
        }
        self.retired = keep;
        Ok(freed)
    }

    /// Removed patches whose code is still mapped.
    pub fn retired(&self) -> Vec<RetiredInfo> {
        self.retired
            .iter()
            .map(|r| RetiredInfo {
                name: r.name.clone(),
                removed_at: r.removed_at,
                arena_bytes: r.record.bytes(),
            })
            .collect()
    }
}

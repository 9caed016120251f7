//! Keeping the guest's ftrace off the entries klpvisor redirects with a
//! `jmp` (a module's functions, and any function switched while the guest
//! cannot run the call gate; the others go through ftrace itself: see
//! [`crate::ftrace_ops`]).
//!
//! The `jmp` goes over the function's `__fentry__` nop, which ftrace
//! believes is its own. Left alone, the first
//! tracer that touches the function (the function tracer, a filter naming
//! it, a kprobe or a BPF trampoline on ftrace) finds the `jmp` where it
//! expects a nop, warns and shuts ftrace down for good (`ftrace_bug`).
//! So while a function is redirected its record carries
//! `FTRACE_FL_DISABLED`, the flag ftrace gives records it must skip: the
//! function leaves `available_filter_functions`, tracers pass it by, and
//! the rest of the kernel stays traceable. When the entry gets its nop
//! back the flag is cleared again. ftrace changes records only with
//! `ftrace_lock` held, so the flags are written, with every vCPU paused,
//! only while that lock is free; otherwise the transition waits.

use klpvisor_guest::{Guest, Kernel, VirtRead};

use std::collections::BTreeMap;

use super::{Engine, EngineError, Prepared};
use crate::site::Site;
use crate::site::FTRACE_FL_DISABLED;
use crate::stack::Target;
use crate::write::{AllowKind, Allowed, Plan, Write};

/// The flag writes, and the `flags` words they set and clear.
pub(super) type FtracePlan = (Plan, Vec<u64>, Vec<u64>);

impl Engine {
    /// The writes that flag the records of the entries `p` redirects and
    /// unflag those it restores; `None` when there are none. vCPUs paused.
    pub(super) fn ftrace_plan<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
    ) -> Result<Option<FtracePlan>, EngineError> {
        let changes = self.ftrace_changes(&p.change.sites, &p.sites);
        self.ftrace_flags_plan(kernel, guest, changes)
    }

    /// For each site whose entry `sites` changes (looked up among the
    /// known sites and `fresh`): its record's `flags` word, its name, and
    /// whether the flag is to be set (redirected now) or cleared.
    pub(super) fn ftrace_changes(
        &self,
        sites: &BTreeMap<u64, (Target, Target)>,
        fresh: &[Site],
    ) -> Vec<(u64, String, bool)> {
        let mut changes = Vec::new();
        for (old, &(before, after)) in sites {
            // ftrace itself carries this redirect: its record must stay
            // enabled.
            if self.via_ftrace(*old) {
                continue;
            }
            let site = fresh
                .iter()
                .find(|s| s.func == *old)
                .or_else(|| self.sites.get(old));
            let Some((word, name)) = site.and_then(|s| s.ftrace_flags.map(|w| (w, s.name.clone())))
            else {
                continue;
            };
            match (before, after) {
                (None, Some(_)) => changes.push((word, name, true)),
                (Some(_), None) if self.ftrace_disabled.contains(&word) => {
                    changes.push((word, name, false))
                }
                _ => {}
            }
        }
        changes
    }

    /// The writes for `changes` (see [`Engine::ftrace_changes`]), checked
    /// against the guest's `ftrace_lock`. vCPUs paused.
    pub(super) fn ftrace_flags_plan<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        changes: Vec<(u64, String, bool)>,
    ) -> Result<Option<FtracePlan>, EngineError> {
        if changes.is_empty() {
            return Ok(None);
        }
        let space = kernel.space(guest);
        let read = |va: u64| {
            space.read_u64(va).map_err(|e| EngineError::Site {
                name: format!("ftrace record at {va:#x}"),
                source: Box::new(crate::site::SiteError::Records(e.to_string())),
            })
        };
        // A kernel without the lock's symbol has no ftrace to keep off.
        let Ok(lock) = kernel.kallsyms.addr("ftrace_lock") else {
            return Ok(None);
        };
        if read(lock)? != 0 {
            return Err(EngineError::GuestBusy(
                "ftrace_lock is held (the guest is changing its function tracing)",
            ));
        }
        let mut plan = Plan::new(Vec::new());
        let (mut set, mut cleared) = (Vec::new(), Vec::new());
        for (word, name, disable) in changes {
            let flags = read(word)?;
            let new = if disable {
                if flags & FTRACE_FL_DISABLED != 0 {
                    // Not ours to clear later.
                    continue;
                }
                set.push(word);
                flags | FTRACE_FL_DISABLED
            } else {
                cleared.push(word);
                flags & !FTRACE_FL_DISABLED
            };
            let gpa = space
                .translate(word)
                .map_err(|e| EngineError::Site {
                    name: name.clone(),
                    source: Box::new(crate::site::SiteError::Records(e.to_string())),
                })?
                .phys;
            plan.allow(Allowed {
                gpa,
                len: 8,
                kind: AllowKind::FtraceFlags,
            });
            plan.push(Write::new(
                gpa,
                new.to_le_bytes().to_vec(),
                flags.to_le_bytes().to_vec(),
                format!("ftrace record flags of {name}"),
            ));
        }
        Ok(Some((plan, set, cleared)))
    }
}

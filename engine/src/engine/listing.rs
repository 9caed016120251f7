//! What is live, for the API: patches, their functions and module objects.

use klpvisor_api::{FuncInfo, Hex, LiveFunc, ObjectInfo, ObjectState, PatchInfo, PatchState};

use super::*;

impl Engine {
    /// Every ftrace_ops klpvisor has written into the guest for a
    /// function, and how far its registration is.
    pub fn ftrace_redirects(&self) -> Vec<klpvisor_api::FtraceRedirect> {
        let Some(ops) = &self.ops else {
            return Vec::new();
        };
        let live = self.stack.live();
        ops.slots()
            .map(|(old, s)| klpvisor_api::FtraceRedirect {
                name: s.name.clone(),
                // A detached or lost slot is kept under its own address:
                // its site names the function it was for.
                old_addr: Hex(if old == s.va { s.ip } else { old }),
                ops: Hex(s.va),
                state: match s.state {
                    crate::ftrace_ops::SlotState::Assigned => "assigned",
                    crate::ftrace_ops::SlotState::Filtered => "filtered",
                    crate::ftrace_ops::SlotState::Registered => "registered",
                    crate::ftrace_ops::SlotState::Unregistered => "unregistered",
                    crate::ftrace_ops::SlotState::Lost => "lost",
                }
                .to_owned(),
                live: live.contains_key(&old) && ops.registered(old),
            })
            .collect()
    }

    /// The guest-physical address of the ftrace redirect handler's page.
    pub fn ftrace_handler_gpa(&self) -> Option<Hex> {
        self.ops.as_ref().map(|o| Hex(o.handler_gpa().0))
    }

    /// Every function whose entry is redirected now, and where to.
    pub fn live(&self) -> Vec<LiveFunc> {
        let mut out = Vec::new();
        for (old, new) in self.stack.live() {
            let owner = self.records.iter().find_map(|(name, r)| {
                r.funcs
                    .iter()
                    .find(|f| f.old == old && f.new == new)
                    .map(|f| (name, f))
            });
            if let Some((patch, f)) = owner {
                out.push(LiveFunc {
                    name: f.name.clone(),
                    sympos: f.sympos,
                    old_addr: Hex(old),
                    target: Hex(new),
                    patch: patch.clone(),
                });
            }
        }
        out
    }

    /// Every loaded patch, oldest first.
    pub fn list(&self) -> Vec<PatchInfo> {
        self.stack
            .entries()
            .iter()
            .filter_map(|e| self.info(&e.name))
            .collect()
    }

    pub(super) fn info(&self, name: &str) -> Option<PatchInfo> {
        let e = self.stack.get(name)?;
        let r = self.records.get(name)?;
        let live = self.stack.live();
        Some(PatchInfo {
            name: e.name.clone(),
            state: e.state,
            replace: r.replace,
            forced: e.forced,
            pinned: e.pin.clone(),
            applied_at: r.applied_at,
            pause_us: r.pause_us,
            arena_bytes: r.bytes(),
            signature: r.signature.clone(),
            objects: r
                .objects
                .iter()
                .map(|o| ObjectInfo {
                    name: o.name.clone().unwrap_or_else(|| "vmlinux".to_owned()),
                    state: if o.loaded {
                        ObjectState::Linked
                    } else {
                        ObjectState::Waiting
                    },
                    funcs: u32::try_from(o.funcs).unwrap_or(u32::MAX),
                    refused: o.name.as_ref().and_then(|n| r.refused.get(n).cloned()),
                })
                .collect(),
            funcs: r
                .funcs
                .iter()
                .map(|f| FuncInfo {
                    object: f.object.clone().unwrap_or_else(|| "vmlinux".to_owned()),
                    name: f.name.clone(),
                    sympos: f.sympos,
                    old_addr: Hex(f.old),
                    site: Hex(self.sites.get(&f.old).map_or(f.old, |s| s.at)),
                    new_addr: Hex(f.new),
                    live: e.state == PatchState::Enabled && live.get(&f.old) == Some(&f.new),
                    ftrace_ops: self
                        .ops
                        .as_ref()
                        .filter(|o| o.registered(f.old))
                        .and_then(|o| o.slot(f.old))
                        .map(|s| Hex(s.va)),
                })
                .collect(),
            module: r.module.as_ref().map(|m| klpvisor_api::ModuleInfo {
                address: Hex(m.module),
                extable: m.counts.extable as u64,
                bug_sites: m.counts.bugs as u64,
                orc_entries: m.counts.orc as u64,
                symbols: m.counts.symbols as u64,
                static_key_sites: m.counts.jumps as u64,
                static_keys: m.jumps.len() as u64,
                percpu: r.percpu.map(|b| Hex(b.ptr)),
                percpu_size: r.percpu.map_or(0, |b| b.size),
            }),
        })
    }
}

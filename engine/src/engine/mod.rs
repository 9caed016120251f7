//! The engine: one guest's patches, from a module's bytes to the writes of
//! a transition and back.
//!
//! Every transition has two halves. *Prepare* runs while the guest runs and
//! only reads it: parse and link the module into arena space (on a copy of
//! the arena's state), compute with [`Stack`] what every affected function's
//! entry must do, and turn that into one [`Plan`] of writes with the bytes
//! each write expects to replace. *Commit* runs with every vCPU paused:
//! check that no task is inside a function the transition changes
//! ([`safepoint`](crate::safepoint)), check every expected byte, write, and
//! only then adopt the new stack and arena state. A transition that fails
//! anywhere leaves the guest and the engine exactly as they were.
//!
//! The files follow that flow: `load` parses, links and places a
//! new patch; `plan` turns enable, disable and rollback into writes and
//! applies klp's refusals; `commit` checks safe points and writes in the
//! pause; `sweep` retires what left the stack and frees it when no stack
//! refers to it; `listing` says what is live. Beside the flow: `calls`
//! drives the call gate, `livepatch` shows patches to the guest's klp
//! during callbacks, `modules` and `ftrace` keep the guest's own registries
//! in step, `coming` handles modules that load later, `levels` is
//! anti-rollback, and `error` says whose fault a failure is. The klp
//! lifecycle that strings these together lives in [`crate::transition`].

mod calls;
mod coming;
mod commit;
mod error;
mod ftrace;
mod levels;
mod listing;
mod livepatch;
mod load;
mod modules;
mod percpu;
mod plan;
mod redirect;
mod sweep;
mod switches;

pub use coming::{in_hook, Coming, Going, ModuleEvent, Relink};
pub use error::{EngineError, Fault};
pub use percpu::{PercpuBlock, PercpuError};

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::arena::{Arena, ImageFacts, Region};
use crate::callback::gate::Gate;
use crate::callback::Calls;
use crate::link::{LinkedCallbacks, LinkedObject};
use crate::module::State;
use crate::safepoint::Check;
use crate::site::{FtraceRecords, Site};
use crate::stack::{Change, Entry, Placed, Stack};
use crate::write::Plan;
use klpvisor_api::{HistoryEntry, PatchInfo};
use klpvisor_guest::orc::Orc;
use klpvisor_guest::retaddr::ReturnHooks;
use klpvisor_guest::Guest;
use klpvisor_guest::{Kernel, Tasks};

/// Committed transitions the engine remembers for rollback; older ones are
/// forgotten, so a VMM running for months stays flat (an entry costs about
/// 100 bytes per loaded patch).
pub const MAX_HISTORY: usize = 256;

/// One patched function of a loaded patch.
#[derive(Debug, Clone)]
struct FuncRecord {
    /// Its module (`None`: vmlinux).
    object: Option<String>,
    name: String,
    sympos: u32,
    old: u64,
    new: u64,
}

/// What the engine keeps of a loaded patch beyond its stack entry.
#[derive(Debug, Clone, Default)]
struct Record {
    replace: bool,
    /// Its `klp_state`s: the system states it introduced or handles.
    states: Vec<State>,
    applied_at: u64,
    pause_us: f64,
    regions: Vec<Region>,
    funcs: Vec<FuncRecord>,
    /// Each loaded object's linked callbacks, in patch order.
    callbacks: Vec<LinkedCallbacks>,
    /// Every object and whether it was linked (its module loaded) or
    /// waits for its module.
    objects: Vec<LinkedObject>,
    /// How the module's signature was checked (the engine never sees
    /// signatures: the caller checks them before `prepare_apply`).
    signature: String,
    /// Its `struct module` in the guest ([`crate::register`]); `None` when
    /// the guest's BTF cannot describe one and the patch needs none.
    module: Option<crate::register::Registered>,
    /// What linking an object later needs (a patch with module objects
    /// only): see [`Relink`].
    relink: Option<Relink>,
    /// Per module object, the last load of its module it refused, and why.
    refused: BTreeMap<String, String>,
    /// Per linked module object, its `struct klp_object`'s address (what
    /// its callbacks are found by in `callbacks`).
    object_at: BTreeMap<String, u64>,
    /// Its `struct klp_patch` in the arena, if the module file has one:
    /// what the guest's klp is shown while its callbacks run.
    klp_patch: Option<u64>,
    /// The patch level its verified signature covers (see [`levels`]).
    level: Option<u16>,
    /// Its per-CPU block in the guest, freed with its code (see
    /// [`percpu`]).
    percpu: Option<PercpuBlock>,
}

impl Record {
    fn text(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.regions
            .iter()
            .filter(|r| r.perm == crate::arena::Perm::Text)
            .map(|r| r.va.0..r.va.0 + r.len)
    }

    fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

/// Facts read once from the guest kernel for every transition.
#[derive(Debug)]
struct Facts {
    arena: Arena,
    ftrace: FtraceRecords,
    tasks: Tasks,
    hardirq_stack_ptr: Option<u64>,
    /// Where each CPU's entry stack is (see [`crate::safepoint::entry_stacks`]).
    entry_stack_sp0: Option<(u64, u64)>,
    /// The kernel's ORC tables, for precise unwinding of sleeping tasks
    /// (None: conservative scanning only).
    orc: Option<Orc>,
    /// The kernel's return hooks (rethook, kretprobes, function graph),
    /// whose hidden return addresses every stack check also judges.
    hooks: ReturnHooks,
    /// The guest's module layout and registries, to register each patch
    /// as a module (Err: why it cannot be done in this guest).
    registry: Result<crate::register::Registry, String>,
    /// What the guest offers for redirects through its ftrace (Err: why
    /// not; entries then get a `jmp`).
    ops: Result<crate::ftrace_ops::Support, String>,
}

/// A transition ready to commit. Dropping it changes nothing.
#[derive(Debug)]
pub struct Prepared {
    name: String,
    /// `apply`, `disable`, `enable` or `rollback`, for the history.
    action: &'static str,
    change: Change,
    plan: Plan,
    /// The arena's state after this transition (apply only).
    arena: Option<Arena>,
    /// The new patch's record (apply only).
    record: Option<Record>,
    /// Sites validated for this transition, not yet known to the engine.
    sites: Vec<Site>,
    /// The functions whose stacks must be clean.
    check: Check,
    /// What the transition will not do that klp would.
    warnings: Vec<String>,
    /// The klp callbacks to run around the commit.
    calls: Calls,
    /// Bytes of a load plan split off by [`Prepared::take_load`].
    loaded_bytes: u64,
    /// Its load was committed by [`Engine::load`] (and its module
    /// registered, if it has one).
    loaded: bool,
    /// The `struct klp_patch` of each patch enabled before it, in klp's
    /// order: the world its callbacks are shown (see [`livepatch`]).
    klp_before: Vec<u64>,
    /// The per-CPU memory a new patch needs (see [`percpu`]).
    percpu: Option<percpu::PercpuNeed>,
    /// Functions this transition starts redirecting whose redirect the
    /// guest's ftrace should carry and does not yet (see [`redirect`]).
    wants_ops: Vec<u64>,
    /// Functions the guest traces that this plan could only redirect by
    /// a `jmp` over ftrace's call, which it never writes: committing it is
    /// refused (see [`Engine::traced_jumps`]).
    traced_jumps: Vec<String>,
}

impl Prepared {
    /// The patch this transition applies, disables or enables; `#N` for a
    /// rollback to transition N.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What this transition will not do that klp would, to show the user.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Records how the applied module's signature was checked, for
    /// `PatchInfo::signature` (an apply only; "unsigned" if never set).
    pub fn set_signature(&mut self, signature: String, level: Option<u16>) {
        if let Some(r) = self.record.as_mut() {
            r.signature = signature;
            r.level = level;
        }
    }

    /// Guest bytes the transition writes (its load included).
    pub fn bytes(&self) -> u64 {
        self.loaded_bytes
            + self
                .plan
                .writes()
                .iter()
                .map(|w| w.bytes.len() as u64)
                .sum::<u64>()
    }

    /// The klp callbacks to run before and after the commit.
    pub fn calls(&self) -> &Calls {
        &self.calls
    }

    /// Splits off the writes that load a new patch (its arena pages and
    /// their mapping) so they can be committed before its `pre_patch`
    /// callbacks run: the callbacks are the patch's own code. What stays
    /// is the switch, the entry writes. Nothing references the loaded
    /// pages until then, so the load needs no safe point; undo it with
    /// the returned plan's [`Plan::inverse`] once committed.
    pub fn take_load(&mut self) -> Plan {
        let sites: Vec<_> = self
            .plan
            .allowed()
            .iter()
            .filter(|a| {
                matches!(
                    a.kind,
                    crate::write::AllowKind::Site { .. }
                        | crate::write::AllowKind::RedirectWord { .. }
                )
            })
            .copied()
            .collect();
        let load = self.plan.split_off(|w| {
            !sites
                .iter()
                .any(|a| a.gpa <= w.gpa && w.gpa < a.gpa + a.len)
        });
        self.loaded_bytes = load.writes().iter().map(|w| w.bytes.len() as u64).sum();
        load
    }

    /// Whether functions it redirects should first be registered with the
    /// guest's ftrace ([`Engine::install_ops`], [`Engine::arm_ops`]), and
    /// the transition prepared again. Without that (the VM paused by its
    /// user, say) they get a `jmp` at their entry, as this plan has it.
    pub fn wants_ops(&self) -> bool {
        !self.wants_ops.is_empty()
    }

    /// Why it cannot be committed as planned: functions the guest traces
    /// that it could only redirect by a `jmp` over ftrace's call (the
    /// guest could not register their ftrace redirects: the VM is held
    /// paused).
    pub fn usable(&self) -> Result<(), EngineError> {
        if self.traced_jumps.is_empty() {
            Ok(())
        } else {
            Err(EngineError::TracedEntry(self.traced_jumps.join(", ")))
        }
    }

    /// Whether this transition loads a new patch (apply).
    pub fn loads(&self) -> bool {
        self.record.is_some()
    }

    /// Whether it loads a patch with module objects: their modules'
    /// loads and unloads must be caught ([`crate::hook`]).
    pub fn needs_hooks(&self) -> bool {
        self.record.as_ref().is_some_and(|r| r.relink.is_some())
    }

    /// Whether it loads a patch whose per-CPU block is not allocated
    /// yet: allocate it ([`Engine::arm_percpu_alloc`]) and prepare again,
    /// so the link uses its address. Such a plan is never written.
    pub fn needs_percpu(&self) -> bool {
        self.percpu.is_some_and(|n| n.block.is_none())
    }
}

/// A callback sent into the guest, to wait for with [`Engine::poll_call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Armed {
    /// The call's number, which the mailbox and the doorbell carry.
    pub seq: u64,
    /// The vCPU to raise the gate's vector on.
    pub vcpu: usize,
    /// That vCPU's Linux CPU number.
    pub cpu: u32,
}

/// A committed transition.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The patch it concerned; `#N` for a rollback to transition N.
    pub name: String,
    /// Its number in the history.
    pub seq: u64,
    /// The patch it applied, disabled or enabled (None for a rollback).
    pub patch: Option<PatchInfo>,
    /// Guest bytes it wrote, its load included.
    pub bytes_written: u64,
    /// Tasks whose stacks the committing pause read: with the switch log
    /// (see [`crate::switches`]), only those that may have run since the
    /// pre-scan; otherwise every task; 0 when nothing was checked.
    pub pause_tasks: u32,
}

/// A committed transition and the stack it started from.
#[derive(Debug, Clone)]
struct Past {
    seq: u64,
    at: u64,
    action: &'static str,
    patch: String,
    forced: bool,
    before: Vec<Placed>,
}

/// A removed patch whose arena space is not free yet: a task may still
/// hold a return address into its code (a forced transition skipped the
/// check, or the task was preempted there before the check could see it
/// leave). Freed by [`Engine::sweep`] once no stack references it.
#[derive(Debug, Clone)]
struct Retired {
    name: String,
    removed_at: u64,
    record: Record,
}

/// One guest's patches.
#[derive(Debug, Default)]
pub struct Engine {
    facts: Option<Facts>,
    stack: Stack,
    records: BTreeMap<String, Record>,
    /// Validated sites by old function address, with their original bytes.
    sites: BTreeMap<u64, Site>,
    /// Removed patches whose code is still mapped, oldest first.
    retired: Vec<Retired>,
    /// The last [`MAX_HISTORY`] committed transitions, oldest first.
    history: std::collections::VecDeque<Past>,
    /// The number of the last committed transition.
    seq: u64,
    /// The call gate, once a callback needed it.
    gate: Option<Gate>,
    /// The number of the last callback sent.
    calls: u64,
    /// `flags` words of ftrace records klpvisor set `FTRACE_FL_DISABLED`
    /// in (and clears again when the entry is restored).
    ftrace_disabled: std::collections::BTreeSet<u64>,
    /// The hooks on the guest's module loads and unloads, once a patch
    /// with module objects needed them ([`crate::hook`]).
    hooks: Option<crate::hook::Hooks>,
    /// Their stubs' `rip`s (see [`crate::hook::Hooks::rips`]), shared with
    /// whoever answers the hooks without taking the engine.
    hook_rips: std::sync::Arc<std::sync::OnceLock<(u64, u64)>>,
    /// What the guest's klp is shown while callbacks run, until the
    /// transition ends (see [`livepatch`]).
    klp_shown: Option<crate::register::livepatch::Shown>,
    /// Anti-rollback, when enforced: the highest signed level applied.
    floor: Option<levels::Floor>,
    /// The tasks found clear while the guest ran, for the next commit of
    /// a transition with this check: see [`Engine::prescan`].
    prescan: Option<(crate::safepoint::Check, crate::safepoint::Prescan)>,
    /// The pre-scan a commit used, kept until the next pre-scan drops it
    /// while the guest runs: it holds a summary of every task, and
    /// freeing ten thousand of them took longer than the rest of the
    /// pause (nested).
    spent_prescan: Option<(crate::safepoint::Check, crate::safepoint::Prescan)>,
    /// The per-CPU block allocated for the apply under way, until its
    /// record takes it or the apply is abandoned (see [`percpu`]).
    percpu_pending: Option<percpu::Pending>,
    /// Per-CPU blocks to free in the guest, with their patch's name.
    percpu_free: Vec<(String, PercpuBlock)>,
    /// Redirects through the guest's ftrace, once a transition set one up
    /// (see [`crate::ftrace_ops`]).
    ops: Option<crate::ftrace_ops::Ops>,
    /// The ftrace redirect step sent last through the gate, by old
    /// function.
    ops_armed: Option<(u64, crate::ftrace_ops::Step)>,
    /// The guest's context switches, logged for the pause (see
    /// [`crate::switches`]), once a transition registered the log.
    switches: Option<crate::switches::SwitchLog>,
    /// Why this guest gets no switch log (its pauses read every task).
    switches_off: Option<String>,
    /// The stacks of the tasks at rest, summarised while the switch log
    /// runs (see [`crate::safepoint::StackCache`]).
    stack_cache: Option<crate::safepoint::StackCache>,
}

impl Engine {
    /// Reads what every transition needs from the kernel, once.
    fn facts<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<&mut Facts, EngineError> {
        if self.facts.is_none() {
            let image = ImageFacts::from_kernel(kernel)?;
            let arena = Arena::new(guest, &image)?;
            let space = kernel.space(guest);
            let ftrace =
                FtraceRecords::load(&space, &kernel.kallsyms, &kernel.btf).map_err(|source| {
                    EngineError::Site {
                        name: "ftrace records".into(),
                        source: Box::new(source),
                    }
                })?;
            let mut tasks = Tasks::from_kernel(&kernel.kallsyms, &kernel.btf)?;
            tasks.measure_thread_size(&space, &kernel.kallsyms, &kernel.btf);
            let hardirq_stack_ptr =
                crate::safepoint::hardirq_stack_ptr(&kernel.kallsyms, &kernel.btf);
            let entry_stack_sp0 = crate::safepoint::entry_stack_sp0(&kernel.kallsyms, &kernel.btf);
            let release = kernel.uts(guest, "release");
            // The format from BTF; by release (4.14..6.2 only) if BTF has
            // no struct orc_entry.
            let orc = Orc::load_btf(&space, &kernel.kallsyms, &kernel.btf)
                .or_else(|_| Orc::load(&space, &kernel.kallsyms, release.as_deref()))
                .ok();
            let registry = crate::register::Registry::new(&kernel.btf, &kernel.kallsyms)
                .map_err(|e| e.to_string());
            let hooks = ReturnHooks::from_kernel(&kernel.kallsyms, &kernel.btf);
            let ops = crate::ftrace_ops::Support::probe(kernel).map_err(|e| e.to_string());
            if let Err(why) = &ops {
                tracing::warn!("entries will be redirected by a jmp: {why}");
            }
            self.facts = Some(Facts {
                arena,
                ftrace,
                tasks,
                hardirq_stack_ptr,
                entry_stack_sp0,
                orc,
                hooks,
                registry,
                ops,
            });
        }
        self.facts
            .as_mut()
            .ok_or_else(|| EngineError::Internal("kernel facts unavailable".into()))
    }

    /// The site of the function at `old` (in `module`, or vmlinux):
    /// known, or validated now.
    fn site<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        ftrace: &FtraceRecords,
        module: Option<&klpvisor_guest::LoadedModule>,
        name: &str,
        old: u64,
    ) -> Result<Site, EngineError> {
        if let Some(s) = self.sites.get(&old) {
            // Known, and not redirected now: it must still hold its
            // original bytes; if the guest changed it (ftrace, in-guest
            // klp), validate afresh for an error that says why.
            // Redirected through ftrace: the entry is ftrace's, whatever
            // its bytes.
            let live = self.stack.live().contains_key(&old) || self.via_ftrace(old);
            let mut now = [0u8; 5];
            let unchanged = guest.read_phys(s.gpa, &mut now).is_ok() && now == s.original;
            if live || unchanged {
                return Ok(s.clone());
            }
        }
        let space = kernel.space(guest);
        match module {
            // A function the guest traces is shared through its ftrace
            // where that can carry the redirect.
            None if self.ops_support().is_ok() => {
                Site::find_shared(&space, &kernel.kallsyms, ftrace, old)
            }
            None => Site::find(&space, &kernel.kallsyms, ftrace, old),
            Some(m) => Site::find_in_module(
                &space,
                &kernel.kallsyms,
                m,
                ftrace,
                old,
                self.ops_support().is_ok(),
            ),
        }
        .map_err(|source| EngineError::Site {
            name: name.to_owned(),
            source: Box::new(source),
        })
    }

    /// Keeps the pages a transition loaded although it was abandoned,
    /// because the patch's own code may still run in the guest (a callback
    /// that did not return in time): the patch is retired at once, and
    /// [`Engine::sweep`] frees its pages once no stack references them.
    pub fn retire_load(&mut self, p: Prepared) {
        if let Some(record) = &p.record {
            self.percpu_adopted(record);
        }
        if let (Some(arena), Some(record), Some(f)) = (p.arena, p.record, self.facts.as_mut()) {
            f.arena = arena;
            self.retired.push(Retired {
                name: p.name,
                removed_at: now_unix(),
                record,
            });
        }
    }

    /// The number of the last committed transition (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// The transitions a rollback can return to, oldest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.history
            .iter()
            .map(|p| HistoryEntry {
                seq: p.seq,
                at: p.at,
                action: p.action.to_owned(),
                patch: p.patch.clone(),
                forced: p.forced,
                before: p.before.iter().map(|e| (e.name.clone(), e.state)).collect(),
            })
            .collect()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new stack entry for `funcs`.
fn entry(name: &str, replace: bool, funcs: &[FuncRecord]) -> Entry {
    Entry::new(
        name,
        replace,
        funcs
            .iter()
            .map(|f| crate::stack::Redirect {
                old: f.old,
                new: f.new,
            })
            .collect(),
    )
}

/// `line` as a printk format at KERN_NOTICE with klp's `livepatch: `
/// prefix, NUL-terminated and at most [`crate::callback::gate::LOG_MAX`]
/// bytes: printable ASCII only, and no `%` (the gate passes no arguments).
fn log_text(line: &str) -> Vec<u8> {
    let mut text = b"\x015livepatch: ".to_vec();
    let room = crate::callback::gate::LOG_MAX - text.len() - 2;
    text.extend(line.bytes().take(room).map(|b| match b {
        b'%' => b'?',
        0x20..=0x7e => b,
        _ => b'?',
    }));
    text.extend_from_slice(b"\n\0");
    text
}

#[cfg(test)]
mod log_text_tests {
    use super::log_text;

    #[test]
    fn a_log_line_is_klps_notice_and_never_a_printk_conversion() {
        assert_eq!(
            log_text("'p': patching complete"),
            b"\x015livepatch: 'p': patching complete\n\0"
        );
        // A name can carry anything: no conversion, no control byte.
        let t = log_text("'a%sb\x1b\n': patching complete");
        assert!(!t.contains(&b'%'));
        assert_eq!(t.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(t.starts_with(b"\x015livepatch: 'a?sb??'"));
        let long = log_text(&"x".repeat(5000));
        assert_eq!(long.len(), crate::callback::gate::LOG_MAX);
        assert!(long.ends_with(b"x\n\0"));
    }
}

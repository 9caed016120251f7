//! The one path by which the engine writes guest memory.
//!
//! Every change to the guest is a [`Plan`]: a list of [`Write`]s, each with
//! the bytes it expects to replace, checked against an allow-list of
//! [`Allowed`] ranges (the patch sites being redirected, the arena, the PMD
//! slots the arena mapping owns). [`Plan::commit`] checks everything first —
//! every byte inside the allow-list, no two writes overlapping, every
//! `expect` still equal to guest memory — and writes nothing unless all of
//! it holds; then it writes in order and returns the undo plan, so disable
//! and rollback are plans too and go through the same checks.
//!
//! Why expectations: the plan is built from what the engine read, usually
//! before the pause; the guest (ftrace, an in-guest livepatch, a hostile
//! kernel) may have changed those bytes since. Why an allow-list: guest
//! memory is untrusted, so a forged page table or symbol must not be able
//! to steer a write anywhere else; the allow-list is built from facts the
//! engine checked, independently of how each write's address was computed.
//!
//! Commit with every vCPU paused: VM entry is serializing, so no vCPU runs
//! a half-written instruction.

use klpvisor_guest::GuestPhys;
use std::fmt;

use sha2::{Digest as _, Sha256};

use klpvisor_guest::Guest;

/// Bytes shown of a mismatching write in errors.
const SHOW: usize = 16;
/// Chunk size for hashing guest ranges.
const HASH_CHUNK: usize = 1 << 20;

/// Errors of checking and committing a plan.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A write reaches outside every allowed range.
    #[error(
        "refused: write \"{label}\" of {len} bytes at guest-physical {gpa:#x} is outside the \
         allow-list ({allowed}); nothing was written"
    )]
    Outside {
        /// The refused write's [`Write::label`].
        label: String,
        /// Where the write starts (guest-physical).
        gpa: u64,
        /// Its length in bytes.
        len: usize,
        /// The allow-list, summarised for the message.
        allowed: String,
    },
    /// Two writes touch the same byte, so the undo plan would be wrong.
    #[error(
        "refused: writes \"{first}\" and \"{second}\" overlap at guest-physical {gpa:#x}; \
         nothing was written"
    )]
    Overlap {
        /// Label of the write at the lower address.
        first: String,
        /// Label of the write that starts inside `first`.
        second: String,
        /// Where `second` starts (guest-physical).
        gpa: u64,
    },
    /// A write is empty, wraps past the end of memory, or its `expect` differs
    /// in length from its `bytes`.
    #[error("refused: write \"{label}\" at guest-physical {gpa:#x} is malformed: {why}; nothing was written")]
    Malformed {
        /// The refused write's [`Write::label`].
        label: String,
        /// Where the write starts (guest-physical).
        gpa: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Guest memory no longer holds a write's `expect`: something in the guest
    /// changed those bytes after the plan was built.
    #[error(
        "refused: guest memory changed under write \"{label}\" at guest-physical {gpa:#x}: \
         expected {expected}, found {found}; nothing was written"
    )]
    Mismatch {
        /// The refused write's [`Write::label`].
        label: String,
        /// Where the write starts (guest-physical).
        gpa: u64,
        /// The bytes the plan expected, as hex (at most the first 16 shown).
        expected: String,
        /// The bytes guest memory holds now, in the same form.
        found: String,
    },
    /// Guest memory could not be read (to build or check a plan, or to hash).
    #[error("cannot read guest-physical {gpa:#x}+{len:#x}: {source}")]
    Read {
        /// Start of the read (guest-physical).
        gpa: u64,
        /// Its length in bytes.
        len: usize,
        /// The guest's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A write failed part-way through a commit, after all checks passed; the
    /// earlier writes were undone as far as that worked.
    #[error(
        "write \"{label}\" at guest-physical {gpa:#x} failed after {done} of {total} writes \
         ({source}); {rollback}"
    )]
    Partial {
        /// Label of the write that failed.
        label: String,
        /// Where it starts (guest-physical).
        gpa: u64,
        /// How many writes had been made before it.
        done: usize,
        /// Writes in the plan.
        total: usize,
        /// Whether undoing the `done` earlier writes worked, and if not, which
        /// failed.
        rollback: String,
        /// Why the guest refused the write.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One guest write: `bytes` replace `expect` at `gpa`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Where the bytes go.
    pub gpa: GuestPhys,
    /// The new bytes; as long as `expect`.
    pub bytes: Vec<u8>,
    /// The bytes there now (what the plan was computed against).
    pub expect: Vec<u8>,
    /// What this write is, for errors and logs ("site cmdline_proc_show").
    pub label: String,
}

impl Write {
    /// A write of `bytes` over `expect` at `gpa`. Lengths are checked when the
    /// plan is ([`Plan::check_static`]), not here.
    pub fn new(gpa: GuestPhys, bytes: Vec<u8>, expect: Vec<u8>, label: impl Into<String>) -> Self {
        Self {
            gpa,
            bytes,
            expect,
            label: label.into(),
        }
    }

    /// A write whose expectation is what `guest` holds now.
    pub fn read_expect<G: Guest + ?Sized>(
        guest: &G,
        gpa: GuestPhys,
        bytes: Vec<u8>,
        label: impl Into<String>,
    ) -> Result<Self, WriteError> {
        let mut expect = vec![0u8; bytes.len()];
        read(guest, gpa, &mut expect)?;
        Ok(Self::new(gpa, bytes, expect, label))
    }

    /// The write that undoes this one.
    pub fn inverse(&self) -> Self {
        Self {
            gpa: self.gpa,
            bytes: self.expect.clone(),
            expect: self.bytes.clone(),
            label: format!("undo {}", self.label),
        }
    }

    fn end(&self) -> Option<u64> {
        self.gpa.0.checked_add(self.bytes.len() as u64)
    }
}

/// Why a range may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowKind {
    /// The 5 bytes of an old function's entry that become a jmp (`func` is
    /// the function's virtual address).
    Site {
        /// Kernel-virtual address of the old function.
        func: u64,
    },
    /// The reserved arena (patch code and data, the arena's PTE pages).
    Arena,
    /// The arena's PTE pages when they live apart from it, in RAM the
    /// VMM reserved for them (see [`crate::arena`]).
    ArenaTables,
    /// Entries of the kernel's PMD page that the arena mapping owns.
    PmdSlots,
    /// The `flags` word of the ftrace record of a function klpvisor
    /// redirects (see the engine's ftrace step).
    FtraceFlags,
    /// The `private` word of the `ftrace_ops` through which the guest's
    /// ftrace redirects an old function (see [`crate::ftrace_ops`]): the
    /// switch itself when the function is redirected that way.
    RedirectWord {
        /// Kernel-virtual address of the old function.
        func: u64,
    },
    /// The head of one CPU's `raised_list`, where the call gate queues its
    /// irq_work (see [`crate::callback::gate`]): 8 bytes of per-CPU data.
    IrqWorkList {
        /// The CPU whose list it is.
        cpu: u32,
    },
    /// An 8-byte word of the guest's module registries (`modules`,
    /// `module_bug_list`, `mod_tree`, and those entries of each module on
    /// the list), where a patch's `struct module` is linked in or out
    /// (see [`crate::register`]).
    ModuleRegistry,
    /// An 8-byte word of the guest's klp: `klp_transition_patch`, the
    /// `klp_patches` head, and the `next` of each entry on that list,
    /// where patches are shown to klp while their callbacks run (see
    /// [`crate::register::livepatch`]).
    KlpPatches,
    /// The `thread_info.flags` word of one task that blocks a transition,
    /// where klp's fake signal sets `TIF_NOTIFY_SIGNAL` (see
    /// [`crate::engine::Engine::arm_nudge`]).
    TaskFlags,
    /// One CPU's copy of a patch's per-CPU block, where its initial
    /// bytes are copied as the kernel's `percpu_modcopy` copies a
    /// module's (see the engine's per-CPU step): memory the guest's
    /// allocator gave that patch.
    PerCpu {
        /// The CPU whose copy it is.
        cpu: u32,
    },
}

/// A guest-physical range writes may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// Where the range starts.
    pub gpa: GuestPhys,
    /// Length in bytes.
    pub len: u64,
    /// Why it may be written (named in refusals).
    pub kind: AllowKind,
}

impl Allowed {
    fn end(&self) -> u64 {
        self.gpa.0.saturating_add(self.len)
    }
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            AllowKind::Site { func } => write!(f, "site of {func:#x}")?,
            AllowKind::Arena => f.write_str("arena")?,
            AllowKind::ArenaTables => f.write_str("arena page tables")?,
            AllowKind::PmdSlots => f.write_str("PMD slots")?,
            AllowKind::FtraceFlags => f.write_str("ftrace record flags")?,
            AllowKind::RedirectWord { func } => write!(f, "ftrace redirect of {func:#x}")?,
            AllowKind::IrqWorkList { cpu } => write!(f, "raised_list of CPU {cpu}")?,
            AllowKind::ModuleRegistry => f.write_str("module registry word")?,
            AllowKind::KlpPatches => f.write_str("klp_patches word")?,
            AllowKind::TaskFlags => f.write_str("a task's thread flags")?,
            AllowKind::PerCpu { cpu } => write!(f, "a patch's per-CPU copy on CPU {cpu}")?,
        }
        write!(f, " {:#x}..{:#x}", self.gpa, self.end())
    }
}

/// Writes and the ranges they may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    writes: Vec<Write>,
    allowed: Vec<Allowed>,
}

fn hex(b: &[u8]) -> String {
    let mut s: String = b
        .iter()
        .take(SHOW)
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    if b.len() > SHOW {
        s.push_str(&format!(" ... ({} bytes)", b.len()));
    }
    s
}

fn read<G: Guest + ?Sized>(guest: &G, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), WriteError> {
    guest.read_phys(gpa, buf).map_err(|e| WriteError::Read {
        gpa: gpa.0,
        len: buf.len(),
        source: Box::new(e),
    })
}

impl Plan {
    /// An empty plan that may write only inside `allowed`.
    pub fn new(allowed: Vec<Allowed>) -> Self {
        Self {
            writes: Vec::new(),
            allowed,
        }
    }

    /// Adds a range to the allow-list.
    pub fn allow(&mut self, a: Allowed) {
        self.allowed.push(a);
    }

    /// Appends a write; writes are committed in the order pushed.
    pub fn push(&mut self, w: Write) {
        self.writes.push(w);
    }

    /// Appends writes, in order.
    pub fn extend(&mut self, ws: impl IntoIterator<Item = Write>) {
        self.writes.extend(ws);
    }

    /// The writes, in commit order.
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// The allow-list.
    pub fn allowed(&self) -> &[Allowed] {
        &self.allowed
    }

    /// Whether the plan writes nothing (its allow-list may still hold ranges).
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Moves the writes for which `take` holds into a plan of their own
    /// with the same allow-list, keeping the order of both.
    pub fn split_off(&mut self, mut take: impl FnMut(&Write) -> bool) -> Plan {
        let (taken, kept) = std::mem::take(&mut self.writes)
            .into_iter()
            .partition(|w| take(w));
        self.writes = kept;
        Plan {
            writes: taken,
            allowed: self.allowed.clone(),
        }
    }

    /// The plan that undoes this one: inverse writes in reverse order, same
    /// allow-list.
    pub fn inverse(&self) -> Self {
        Self {
            writes: self.writes.iter().rev().map(Write::inverse).collect(),
            allowed: self.allowed.clone(),
        }
    }

    fn describe_allowed(&self) -> String {
        if self.allowed.is_empty() {
            return "it is empty".into();
        }
        let mut parts: Vec<String> = self.allowed.iter().take(8).map(|a| a.to_string()).collect();
        if self.allowed.len() > 8 {
            parts.push(format!("{} more", self.allowed.len() - 8));
        }
        parts.join(", ")
    }

    /// Checks shape and allow-list without reading the guest.
    pub fn check_static(&self) -> Result<(), WriteError> {
        // The allow-list as sorted, merged intervals.
        let mut iv: Vec<(u64, u64)> = self
            .allowed
            .iter()
            .filter(|a| a.len > 0)
            .map(|a| (a.gpa.0, a.end()))
            .collect();
        iv.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in iv {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        for w in &self.writes {
            let malformed = |why| WriteError::Malformed {
                label: w.label.clone(),
                gpa: w.gpa.0,
                why,
            };
            if w.bytes.is_empty() {
                return Err(malformed("it writes no bytes"));
            }
            if w.bytes.len() != w.expect.len() {
                return Err(malformed(
                    "its expected bytes differ in length from its new bytes",
                ));
            }
            let end = w
                .end()
                .ok_or_else(|| malformed("it wraps past the end of memory"))?;
            let k = merged.partition_point(|&(s, _)| s <= w.gpa.0);
            let inside = k
                .checked_sub(1)
                .and_then(|i| merged.get(i))
                .is_some_and(|&(_, e)| end <= e);
            if !inside {
                return Err(WriteError::Outside {
                    label: w.label.clone(),
                    gpa: w.gpa.0,
                    len: w.bytes.len(),
                    allowed: self.describe_allowed(),
                });
            }
        }
        // No two writes touch the same byte (the undo plan would be wrong).
        let mut order: Vec<&Write> = self.writes.iter().collect();
        order.sort_by_key(|w| w.gpa);
        for pair in order.windows(2) {
            if let [a, b] = pair {
                if a.end().is_some_and(|e| e > b.gpa.0) {
                    return Err(WriteError::Overlap {
                        first: a.label.clone(),
                        second: b.label.clone(),
                        gpa: b.gpa.0,
                    });
                }
            }
        }
        Ok(())
    }

    /// Everything [`Plan::commit`] checks, without writing.
    pub fn check<G: Guest + ?Sized>(&self, guest: &G) -> Result<(), WriteError> {
        self.check_static()?;
        for w in &self.writes {
            let mut now = vec![0u8; w.expect.len()];
            read(guest, w.gpa, &mut now)?;
            if now != w.expect {
                return Err(WriteError::Mismatch {
                    label: w.label.clone(),
                    gpa: w.gpa.0,
                    expected: hex(&w.expect),
                    found: hex(&now),
                });
            }
        }
        Ok(())
    }

    /// Checks the whole plan, then writes it; returns the undo plan. Call
    /// with every vCPU paused. Nothing is written if any check fails; if a
    /// write itself fails (the guest's memory vanished under us), the writes
    /// already made are undone and the error says whether that worked.
    pub fn commit<G: Guest + ?Sized>(&self, guest: &G) -> Result<Plan, WriteError> {
        self.check(guest)?;
        for (i, w) in self.writes.iter().enumerate() {
            if let Err(e) = guest.write_phys(w.gpa, &w.bytes) {
                let undo_failed: Vec<String> = self
                    .writes
                    .get(..i)
                    .unwrap_or_default()
                    .iter()
                    .rev()
                    .filter(|d| guest.write_phys(d.gpa, &d.expect).is_err())
                    .map(|d| d.label.clone())
                    .collect();
                let rollback = if undo_failed.is_empty() {
                    format!("the {i} earlier writes were undone")
                } else {
                    format!("undoing failed for: {}", undo_failed.join(", "))
                };
                return Err(WriteError::Partial {
                    label: w.label.clone(),
                    gpa: w.gpa.0,
                    done: i,
                    total: self.writes.len(),
                    rollback,
                    source: Box::new(e),
                });
            }
        }
        Ok(self.inverse())
    }
}

/// A SHA-256 digest of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// SHA-256 over guest-physical `ranges` (gpa, len), each prefixed by its
/// address and length so different splits of memory hash differently.
/// For "the guest is untouched" checks: hash kernel text and the arena
/// before and after a refused request.
pub fn hash_ranges<G: Guest + ?Sized>(
    guest: &G,
    ranges: &[(GuestPhys, u64)],
) -> Result<Digest, WriteError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    for &(gpa, len) in ranges {
        h.update(gpa.0.to_le_bytes());
        h.update(len.to_le_bytes());
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(HASH_CHUNK);
            let at = gpa.0.checked_add(done).ok_or(WriteError::Read {
                gpa: gpa.0,
                len: n,
                source: "range wraps past the end of memory".into(),
            })?;
            let chunk = buf.get_mut(..n).unwrap_or_default();
            read(guest, GuestPhys(at), chunk)?;
            h.update(&*chunk);
            done += n as u64;
        }
    }
    Ok(Digest(h.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use klpvisor_guest::paging::test_support::FakePhys;

    fn guest() -> FakePhys {
        let m = FakePhys::new(0x10000);
        let fill: Vec<u8> = (0..0x10000u32).map(|i| (i * 7 % 251) as u8).collect();
        m.write_phys(GuestPhys(0), &fill).unwrap();
        m
    }

    fn allowed() -> Vec<Allowed> {
        vec![
            Allowed {
                gpa: GuestPhys(0x1000),
                len: 5,
                kind: AllowKind::Site {
                    func: 0xffff_ffff_8100_1000,
                },
            },
            Allowed {
                gpa: GuestPhys(0x8000),
                len: 0x4000,
                kind: AllowKind::Arena,
            },
            Allowed {
                gpa: GuestPhys(0x3000 + 456 * 8),
                len: 16,
                kind: AllowKind::PmdSlots,
            },
        ]
    }

    fn snapshot(m: &FakePhys) -> Vec<u8> {
        m.mem.borrow().clone()
    }

    #[test]
    fn commits_and_undoes() {
        let m = guest();
        let before = snapshot(&m);
        let mut p = Plan::new(allowed());
        p.push(
            Write::read_expect(&m, GuestPhys(0x1000), vec![0xe9, 1, 2, 3, 4], "site f").unwrap(),
        );
        p.push(Write::read_expect(&m, GuestPhys(0x8000), vec![0xaa; 0x4000], "arena").unwrap());
        p.push(
            Write::read_expect(&m, GuestPhys(0x3000 + 457 * 8), vec![0x63; 8], "pmd 457").unwrap(),
        );
        let h0 = hash_ranges(&m, &[(GuestPhys(0), 0x10000)]).unwrap();
        let undo = p.commit(&m).unwrap();
        let mut b = [0u8; 5];
        m.read_phys(GuestPhys(0x1000), &mut b).unwrap();
        assert_eq!(b, [0xe9, 1, 2, 3, 4]);
        assert_ne!(hash_ranges(&m, &[(GuestPhys(0), 0x10000)]).unwrap(), h0);
        // Committing again fails: the expectations no longer hold.
        assert!(matches!(p.commit(&m), Err(WriteError::Mismatch { .. })));
        undo.commit(&m).unwrap();
        assert_eq!(snapshot(&m), before);
        assert_eq!(hash_ranges(&m, &[(GuestPhys(0), 0x10000)]).unwrap(), h0);
    }

    /// The allow-list's own test: a plan that also targets other memory
    /// (kernel text next to a site, a PMD slot the arena does not own, a
    /// range straddling the arena's end) is refused whole.
    #[test]
    fn crafted_plan_outside_the_allow_list_writes_nothing() {
        let m = guest();
        let before = snapshot(&m);
        let h0 = hash_ranges(&m, &[(GuestPhys(0), 0x10000)]).unwrap();
        let legit = Write::read_expect(&m, GuestPhys(0x8000), vec![1; 64], "arena code").unwrap();
        for (gpa, len, label) in [
            (0x1005u64, 1usize, "byte after a site"),
            (0xffc, 5, "straddles a site's start"),
            (0x3000 + 455 * 8, 8, "PMD slot not owned"),
            (0xbffc, 8, "straddles the arena's end"),
            (0x5000, 4096, "kernel data"),
        ] {
            let mut p = Plan::new(allowed());
            p.push(legit.clone());
            p.push(Write::read_expect(&m, GuestPhys(gpa), vec![0xcc; len], label).unwrap());
            let e = p.commit(&m).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, WriteError::Outside { .. }), "{label}: {msg}");
            assert!(
                msg.contains(&format!("{gpa:#x}")) && msg.contains(label) && msg.contains("arena"),
                "{msg}"
            );
            assert_eq!(snapshot(&m), before, "{label}: nothing written");
        }
        assert_eq!(hash_ranges(&m, &[(GuestPhys(0), 0x10000)]).unwrap(), h0);
        // An empty allow-list allows nothing.
        let mut p = Plan::new(Vec::new());
        p.push(legit);
        assert!(p.commit(&m).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn expectation_mismatch_writes_nothing() {
        let m = guest();
        let mut p = Plan::new(allowed());
        p.push(Write::read_expect(&m, GuestPhys(0x8000), vec![1; 8], "first").unwrap());
        let mut site =
            Write::read_expect(&m, GuestPhys(0x1000), vec![0xe9, 0, 0, 0, 0], "site f").unwrap();
        site.expect = vec![0x0f, 0x1f, 0x44, 0, 0];
        p.push(site);
        let before = snapshot(&m);
        let e = p.commit(&m).unwrap_err();
        assert!(matches!(e, WriteError::Mismatch { .. }));
        assert!(e.to_string().contains("0f 1f 44 00 00"), "{e}");
        assert_eq!(snapshot(&m), before);
    }

    #[test]
    fn overlapping_and_malformed_writes_are_refused() {
        let m = guest();
        let mut p = Plan::new(allowed());
        p.push(Write::read_expect(&m, GuestPhys(0x8000), vec![1; 16], "a").unwrap());
        p.push(Write::read_expect(&m, GuestPhys(0x800f), vec![2; 4], "b").unwrap());
        assert!(matches!(p.check(&m), Err(WriteError::Overlap { .. })));
        let mut p = Plan::new(allowed());
        p.push(Write::new(
            GuestPhys(0x8000),
            vec![1; 4],
            vec![0; 3],
            "short expect",
        ));
        assert!(matches!(p.check(&m), Err(WriteError::Malformed { .. })));
        let mut p = Plan::new(allowed());
        p.push(Write::new(
            GuestPhys(u64::MAX - 1),
            vec![1; 4],
            vec![0; 4],
            "wraps",
        ));
        assert!(matches!(p.check(&m), Err(WriteError::Malformed { .. })));
        let mut p = Plan::new(allowed());
        p.push(Write::new(
            GuestPhys(0x8000),
            Vec::new(),
            Vec::new(),
            "empty",
        ));
        assert!(matches!(p.check(&m), Err(WriteError::Malformed { .. })));
    }

    #[test]
    fn hash_depends_on_content_and_split() {
        let m = guest();
        let a = hash_ranges(&m, &[(GuestPhys(0), 0x2000)]).unwrap();
        let b = hash_ranges(&m, &[(GuestPhys(0), 0x1000), (GuestPhys(0x1000), 0x1000)]).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 64);
        assert!(hash_ranges(&m, &[(GuestPhys(0xf000), 0x2000)]).is_err());
    }
}

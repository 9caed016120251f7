//! Showing a transitioning patch to the guest's own klp, as
//! `klp_init_patch` and `klp_init_transition` would, so that the guest's
//! `klp_get_prev_state()` answers in the patch's callbacks.
//!
//! klp keeps every patch it has not freed on `klp_patches`, in the order
//! they were enabled, and points `klp_transition_patch` at the patch whose
//! transition runs. `klp_get_prev_state(id)` walks the list up to that
//! patch and returns the newest earlier `klp_state` of that id; outside a
//! transition it warns and returns NULL. (`klp_get_state(patch, id)`
//! reads only the patch's own `states` array and needs none of this.)
//!
//! klpvisor's patches are not klp's, so while one of their callbacks runs
//! the engine links their `struct klp_patch`es onto `klp_patches`, after
//! whatever the guest's klp holds there, and sets `klp_transition_patch`
//! to the patch whose callback it is. When the transition ends it takes
//! them off again and writes back every word it changed.
//!
//! Why only then, and why this is safe:
//! - While `klp_transition_patch` is set the guest's klp starts nothing
//!   (`__klp_enable_patch` and `__klp_disable_patch` return `-EBUSY`), as
//!   during a transition of its own; an in-guest patch that is enabled
//!   meanwhile goes on the list and comes off again under `klp_mutex`.
//! - The only code that walks a listed patch's objects
//!   (`klp_module_coming`, `klp_module_going`, `klp_add_nops`) finds an
//!   empty `obj_list`: it is initialised empty, so the guest's klp never
//!   touches our objects (a module object is the hooks' job, see
//!   [`crate::hook`]).
//! - Left on the list outside a transition, our patches would be klp's to
//!   free when an in-guest replace patch takes over, through kobjects we
//!   never create.
//!
//! Refused, and retried, while `klp_mutex` is held (the guest's klp is
//! changing its list) or a transition of the guest's own klp runs
//! (`klp_transition_patch` set by the guest); refused for good if the list
//! is not a consistent circular list.

use super::links::{Mem, Word};
use super::RegisterError;
use klpvisor_guest::{Btf, Kallsyms};

/// At most this many patches of the guest's own klp are walked.
pub const MAX_KLP_PATCHES: usize = 1024;

/// The guest's klp globals and `struct klp_patch` members the step writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KlpGlobals {
    /// `LIST_HEAD(klp_patches)`.
    pub patches: u64,
    /// `struct klp_patch *klp_transition_patch`.
    pub transition_patch: u64,
    /// `DEFINE_MUTEX(klp_mutex)`, held by every writer of the list.
    pub mutex: u64,
    /// Offset of `klp_patch.list`.
    pub list: u64,
    /// Offset of `klp_patch.obj_list`.
    pub obj_list: u64,
}

impl KlpGlobals {
    /// From the guest's kallsyms and BTF; `None` if the guest's klp lacks
    /// one of them (callbacks then run without it, and
    /// `klp_get_prev_state()` in them returns NULL).
    pub fn new(btf: &Btf, kallsyms: &Kallsyms) -> Option<Self> {
        if btf.offset_of("list_head.next").ok()? != 0 || btf.offset_of("list_head.prev").ok()? != 8
        {
            return None;
        }
        Some(Self {
            patches: kallsyms.addr("klp_patches").ok()?,
            transition_patch: kallsyms.addr("klp_transition_patch").ok()?,
            mutex: kallsyms.addr("klp_mutex").ok()?,
            list: btf.offset_of("klp_patch.list").ok()?,
            obj_list: btf.offset_of("klp_patch.obj_list").ok()?,
        })
    }
}

/// What the guest's klp is shown: the patch whose callback runs, and every
/// patch klp would hold on `klp_patches` then, in order (the transitioning
/// one included), as the addresses of their `struct klp_patch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// `klp_transition_patch`.
    pub transition: u64,
    /// `klp_patches`, after the guest's own patches.
    pub patches: Vec<u64>,
}

impl World {
    /// klp's list while `transition`'s callbacks run: the patches enabled
    /// before the transition in the order they were enabled (a replaced
    /// patch stays on the list until its replacement's `post_patch` has
    /// run), and `transition` itself, last if it is being enabled.
    pub fn of(transition: u64, enabled_before: &[u64]) -> Self {
        let mut patches = enabled_before.to_vec();
        if !patches.contains(&transition) {
            patches.push(transition);
        }
        Self {
            transition,
            patches,
        }
    }
}

/// A world the guest's klp is shown now: the words written, to take back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    /// What is shown.
    pub world: World,
    words: Vec<Word>,
}

impl Shown {
    /// The words [`show`] wrote.
    pub fn words(&self) -> &[Word] {
        &self.words
    }
}

/// The last entry of `klp_patches` (the head itself if it is empty),
/// after checking the list is circular and consistent, and that none of
/// `ours` is on it.
fn tail(mem: &dyn Mem, g: &KlpGlobals, ours: &[u64]) -> Result<u64, RegisterError> {
    let head = g.patches;
    let mut node = head;
    for _ in 0..=MAX_KLP_PATCHES {
        let next = mem.read_u64(node)?;
        if mem.read_u64(next + 8)? != node {
            return Err(RegisterError::KlpCorrupt(
                "an entry's prev is not its predecessor",
            ));
        }
        if next == head {
            return Ok(node);
        }
        if ours.iter().any(|&p| p + g.list == next) {
            return Err(RegisterError::KlpCorrupt(
                "one of klpvisor's patches is on klp_patches already",
            ));
        }
        node = next;
    }
    Err(RegisterError::KlpCorrupt(
        "klp_patches is longer than 1024 entries or loops",
    ))
}

/// Refuses while the guest's klp may be changing its list or runs a
/// transition of its own.
fn quiet(mem: &dyn Mem, g: &KlpGlobals, expect_transition: u64) -> Result<(), RegisterError> {
    // struct mutex starts with its owner: non-zero while someone holds it.
    if mem.read_u64(g.mutex)? != 0 {
        return Err(RegisterError::KlpBusy(
            "klp_mutex is held (the guest's own klp is changing its patches)",
        ));
    }
    if mem.read_u64(g.transition_patch)? != expect_transition {
        return Err(RegisterError::KlpBusy(
            "a transition of the guest's own klp is running",
        ));
    }
    Ok(())
}

/// The words that show `world` to the guest's klp (vCPUs paused): its
/// patches linked after the list's last entry, each with an empty
/// `obj_list`, and `klp_transition_patch` set.
pub fn show(mem: &dyn Mem, g: &KlpGlobals, world: World) -> Result<Shown, RegisterError> {
    if world.patches.is_empty() || !world.patches.contains(&world.transition) {
        return Err(RegisterError::Internal(
            "a klp world without its transitioning patch",
        ));
    }
    quiet(mem, g, 0)?;
    let head = g.patches;
    let last = tail(mem, g, &world.patches)?;
    let nodes: Vec<u64> = world.patches.iter().map(|p| p + g.list).collect();
    let mut words: Vec<Word> = Vec::new();
    let mut set = |va: u64, new: u64| -> Result<(), RegisterError> {
        if let Some(w) = words.iter_mut().find(|w| w.0 == va) {
            w.2 = new;
        } else {
            words.push((va, mem.read_u64(va)?, new));
        }
        Ok(())
    };
    for (i, (&node, &patch)) in nodes.iter().zip(&world.patches).enumerate() {
        let next = nodes.get(i + 1).copied().unwrap_or(head);
        let prev = if i == 0 { last } else { nodes[i - 1] };
        set(node, next)?;
        set(node + 8, prev)?;
        let objs = patch + g.obj_list;
        set(objs, objs)?;
        set(objs + 8, objs)?;
    }
    // `last` may be the head: then its next and prev both change.
    set(last, nodes[0])?;
    set(head + 8, nodes[nodes.len() - 1])?;
    set(g.transition_patch, world.transition)?;
    Ok(Shown { world, words })
}

/// The words that take `shown` back (vCPUs paused): every word as it was
/// before. Refused while the guest's klp is changing its list; refused
/// for good if the guest changed a word the step wrote.
pub fn hide(mem: &dyn Mem, g: &KlpGlobals, shown: &Shown) -> Result<Vec<Word>, RegisterError> {
    quiet(mem, g, shown.world.transition)?;
    let mut out = Vec::with_capacity(shown.words.len());
    for &(va, old, new) in shown.words.iter().rev() {
        if mem.read_u64(va)? != new {
            return Err(RegisterError::KlpCorrupt(
                "the guest changed klp_patches while klpvisor's patches were on it",
            ));
        }
        out.push((va, new, old));
    }
    Ok(out)
}

/// The words that take `from` back and show `to` instead, in one pause
/// (a transition whose callbacks belong to several patches: a rollback),
/// one word per address; and what is shown afterwards.
pub fn switch(
    mem: &dyn Mem,
    g: &KlpGlobals,
    from: Option<&Shown>,
    to: Option<World>,
) -> Result<(Vec<Word>, Option<Shown>), RegisterError> {
    let mut words = match from {
        Some(shown) => hide(mem, g, shown)?,
        None => Vec::new(),
    };
    let Some(world) = to else {
        return Ok((words, None));
    };
    let shown = show(&Overlay(mem, &words), g, world)?;
    for &(va, _, new) in shown.words() {
        match words.iter_mut().find(|w| w.0 == va) {
            Some(w) => w.2 = new,
            None => words.push((va, mem.read_u64(va)?, new)),
        }
    }
    words.retain(|&(_, old, new)| old != new);
    Ok((words, Some(shown)))
}

/// Guest memory with `words` already written.
struct Overlay<'a>(&'a dyn Mem, &'a [Word]);

impl Mem for Overlay<'_> {
    fn read_u64(&self, va: u64) -> Result<u64, RegisterError> {
        match self.1.iter().rev().find(|w| w.0 == va) {
            Some(w) => Ok(w.2),
            None => self.0.read_u64(va),
        }
    }
}

/// The guest words [`show`] and [`hide`] may write outside the arena:
/// `klp_transition_patch`, the list head, and the `next` of each entry on
/// `klp_patches` (walked, not taken from the edit).
pub fn allowed(mem: &dyn Mem, g: &KlpGlobals) -> Result<Vec<u64>, RegisterError> {
    let mut out = vec![g.transition_patch, g.patches, g.patches + 8];
    let mut node = mem.read_u64(g.patches)?;
    while node != g.patches && out.len() < MAX_KLP_PATCHES + 3 {
        out.push(node);
        node = mem.read_u64(node)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Fake(RefCell<BTreeMap<u64, u64>>);

    impl Mem for Fake {
        fn read_u64(&self, va: u64) -> Result<u64, RegisterError> {
            Ok(self.0.borrow().get(&va).copied().unwrap_or(0))
        }
    }

    impl Fake {
        fn set(&self, va: u64, v: u64) {
            self.0.borrow_mut().insert(va, v);
        }
        fn apply(&self, words: &[Word]) {
            for &(va, old, new) in words {
                assert_eq!(self.read_u64(va).unwrap(), old, "{va:#x}");
                self.set(va, new);
            }
        }
        /// The list from the head, as `klp_for_each_patch` walks it,
        /// checking each prev.
        fn walk(&self, g: &KlpGlobals) -> Vec<u64> {
            let mut out = Vec::new();
            let mut node = g.patches;
            loop {
                let next = self.read_u64(node).unwrap();
                assert_eq!(self.read_u64(next + 8).unwrap(), node, "prev of {next:#x}");
                if next == g.patches {
                    return out;
                }
                out.push(next - g.list);
                node = next;
            }
        }
    }

    const G: KlpGlobals = KlpGlobals {
        patches: 0xffff_ffff_8300_0000,
        transition_patch: 0xffff_ffff_8300_0100,
        mutex: 0xffff_ffff_8300_0200,
        list: 0x18,
        obj_list: 0x28,
    };
    /// klpvisor's patches in the arena, and an in-guest klp patch in a
    /// module.
    const A: u64 = 0xffff_ffff_f000_1000;
    const B: u64 = 0xffff_ffff_f000_3000;
    const C: u64 = 0xffff_ffff_f000_5000;
    const GUEST: u64 = 0xffff_ffff_c010_0000;

    fn empty() -> Fake {
        let f = Fake::default();
        f.set(G.patches, G.patches);
        f.set(G.patches + 8, G.patches);
        f
    }

    fn snapshot(f: &Fake) -> BTreeMap<u64, u64> {
        f.0.borrow().clone()
    }

    #[test]
    fn the_world_is_klps_list_with_the_enabling_patch_last() {
        assert_eq!(World::of(C, &[A, B]).patches, [A, B, C]);
        // A disable: the patch is on the list where it was enabled.
        assert_eq!(World::of(A, &[A, B]).patches, [A, B]);
        assert_eq!(World::of(A, &[A, B]).transition, A);
    }

    #[test]
    fn shown_on_an_empty_list_then_hidden_leaves_every_word_as_it_was() {
        let f = empty();
        let before = snapshot(&f);
        let shown = show(&f, &G, World::of(C, &[A, B])).unwrap();
        f.apply(shown.words());
        assert_eq!(f.walk(&G), [A, B, C]);
        assert_eq!(f.read_u64(G.transition_patch).unwrap(), C);
        // Each obj_list is empty: klp_for_each_object finds nothing.
        for p in [A, B, C] {
            assert_eq!(f.read_u64(p + G.obj_list).unwrap(), p + G.obj_list);
            assert_eq!(f.read_u64(p + G.obj_list + 8).unwrap(), p + G.obj_list);
        }
        let back = hide(&f, &G, &shown).unwrap();
        f.apply(&back);
        let after: BTreeMap<u64, u64> = snapshot(&f).into_iter().filter(|&(_, v)| v != 0).collect();
        assert_eq!(after, before);
    }

    #[test]
    fn ours_go_after_the_guests_own_patches() {
        let f = empty();
        let node = GUEST + G.list;
        f.set(G.patches, node);
        f.set(G.patches + 8, node);
        f.set(node, G.patches);
        f.set(node + 8, G.patches);
        let shown = show(&f, &G, World::of(A, &[])).unwrap();
        f.apply(shown.words());
        assert_eq!(f.walk(&G), [GUEST, A]);
        let writable = allowed(&f, &G).unwrap();
        for &(va, _, _) in shown.words() {
            let ours = (A..A + 0x100).contains(&va);
            assert!(ours || writable.contains(&va), "{va:#x} not allowed");
        }
        f.apply(&hide(&f, &G, &shown).unwrap());
        assert_eq!(f.walk(&G), [GUEST]);
    }

    #[test]
    fn switching_worlds_writes_each_word_once_and_hides_to_the_original() {
        let f = empty();
        let before = snapshot(&f);
        // A rollback: B's pre_unpatch (B enabled), then C's pre_patch.
        let (words, first) = switch(&f, &G, None, Some(World::of(B, &[A, B]))).unwrap();
        f.apply(&words);
        assert_eq!(f.walk(&G), [A, B]);
        let (words, second) = switch(&f, &G, first.as_ref(), Some(World::of(C, &[A, B]))).unwrap();
        let mut vas: Vec<u64> = words.iter().map(|w| w.0).collect();
        vas.sort_unstable();
        vas.dedup();
        assert_eq!(vas.len(), words.len(), "one word per address");
        f.apply(&words);
        assert_eq!(f.walk(&G), [A, B, C]);
        assert_eq!(f.read_u64(G.transition_patch).unwrap(), C);
        let (words, none) = switch(&f, &G, second.as_ref(), None).unwrap();
        assert!(none.is_none());
        f.apply(&words);
        let after: BTreeMap<u64, u64> = snapshot(&f).into_iter().filter(|&(_, v)| v != 0).collect();
        assert_eq!(after, before);
    }

    #[test]
    fn busy_while_the_guests_klp_holds_its_mutex_or_runs_a_transition() {
        let f = empty();
        f.set(G.mutex, 0xffff_8880_0100_0000);
        let e = show(&f, &G, World::of(A, &[])).unwrap_err();
        assert!(e.is_busy(), "{e}");
        f.set(G.mutex, 0);
        f.set(G.transition_patch, GUEST);
        let e = show(&f, &G, World::of(A, &[])).unwrap_err();
        assert!(e.is_busy(), "{e}");
        f.set(G.transition_patch, 0);
        let shown = show(&f, &G, World::of(A, &[])).unwrap();
        f.apply(shown.words());
        // Taking it back waits for the mutex too.
        f.set(G.mutex, 0xffff_8880_0100_0000);
        assert!(hide(&f, &G, &shown).unwrap_err().is_busy());
    }

    #[test]
    fn a_corrupt_list_or_a_changed_word_is_refused() {
        let f = empty();
        // The head's next does not point back.
        f.set(G.patches, GUEST + G.list);
        let e = show(&f, &G, World::of(A, &[])).unwrap_err();
        assert!(!e.is_busy(), "{e}");
        // A loop that never returns to the head.
        let f = empty();
        let node = GUEST + G.list;
        f.set(G.patches, node);
        f.set(node, node);
        f.set(node + 8, G.patches);
        assert!(show(&f, &G, World::of(A, &[])).is_err());
        // The guest rewrote a word while ours were shown.
        let f = empty();
        let shown = show(&f, &G, World::of(A, &[])).unwrap();
        f.apply(shown.words());
        f.set(G.patches + 8, G.patches);
        let e = hide(&f, &G, &shown).unwrap_err();
        assert!(!e.is_busy(), "{e}");
    }

    #[test]
    fn already_listed_is_refused() {
        let f = empty();
        let shown = show(&f, &G, World::of(A, &[])).unwrap();
        f.apply(shown.words());
        f.set(G.transition_patch, 0);
        assert!(show(&f, &G, World::of(A, &[])).is_err());
    }
}

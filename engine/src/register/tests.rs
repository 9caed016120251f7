//! Registration against a fake guest memory with the 6.1 layout: what
//! goes on the lists and in the tree, that removal restores them, and
//! that busy or corrupt registries are refused before anything is written.

use std::collections::HashMap;
use std::sync::Mutex;

use super::layout::{Memory, ModuleLayout, MAX_RANGES, RB_NODE};
use super::links::{self, Globals, Mem, MODULES_AREA};
use super::RegisterError;

/// Debian 6.1's offsets (pahole on its vmlinux).
fn layout61() -> ModuleLayout {
    let mut range_at = [0u64; MAX_RANGES];
    range_at[0] = 320;
    range_at[1] = 400;
    ModuleLayout {
        size: 896,
        state: 0,
        list: 8,
        name: 24,
        name_len: 56,
        num_exentries: 300,
        extable: 304,
        memory: Memory::Layout {
            at: 320,
            size: 8,
            text_size: 12,
            ro_size: 16,
            ro_after_init_size: 20,
            mtn: 24,
        },
        mtn_mod: 0,
        mtn_node: 8,
        num_orcs: Some(480),
        orc_unwind_ip: Some(488),
        orc_unwind: Some(496),
        taints: 504,
        num_bugs: 512,
        bug_list: 520,
        bug_table: 536,
        kallsyms: 544,
        core_kallsyms: 552,
        ks_symtab: 0,
        ks_num_symtab: 8,
        ks_strtab: 16,
        ks_typetab: 24,
        klp: Some(800),
        source_list: 816,
        target_list: 832,
        refcnt: 856,
        jump_entries: None,
        num_jump_entries: None,
        percpu: Some((864, 872)),
        param_wait_list: Some(248),
        root_seq: 0,
        root_tree: [8, 16],
        addr_min: 24,
        addr_max: 32,
        orc_entry: 6,
        range_at,
        ranges: 2,
    }
}

const MODULES: u64 = 0xffff_ffff_8200_0000;
const BUG_LIST: u64 = 0xffff_ffff_8200_0100;
const MOD_TREE: u64 = 0xffff_ffff_8200_0200;
const MUTEX: u64 = 0xffff_ffff_8200_0300;
const TAINT: u64 = 0xffff_ffff_8200_0400;

fn globals() -> Globals {
    Globals {
        modules: MODULES,
        module_bug_list: BUG_LIST,
        mod_tree: MOD_TREE,
        module_mutex: MUTEX,
        tainted_mask: Some(TAINT),
    }
}

/// Guest memory: 8-byte words, zero where never written.
#[derive(Default)]
struct Fake(Mutex<HashMap<u64, u64>>);

impl Mem for Fake {
    fn read_u64(&self, va: u64) -> Result<u64, RegisterError> {
        if va % 8 != 0 {
            return Err(RegisterError::Internal("misaligned read"));
        }
        Ok(*self.0.lock().unwrap().get(&va).unwrap_or(&0))
    }
}

impl Fake {
    fn set(&self, va: u64, v: u64) {
        self.0.lock().unwrap().insert(va, v);
    }
    fn get(&self, va: u64) -> u64 {
        self.read_u64(va).unwrap()
    }
    /// Applies words after checking each `old`.
    fn apply(&self, words: &[(u64, u64, u64)]) {
        for &(va, old, new) in words {
            assert_eq!(self.get(va), old, "stale old value at {va:#x}");
            self.set(va, new);
        }
    }
    fn snapshot(&self) -> HashMap<u64, u64> {
        let mut m = self.0.lock().unwrap().clone();
        m.retain(|_, v| *v != 0);
        m
    }
}

/// A guest with the empty registries, or with one kernel module `m`
/// (text at `base`) on them.
fn guest(layout: &ModuleLayout, existing: Option<(u64, u64)>) -> Fake {
    let f = Fake::default();
    for head in [MODULES, BUG_LIST] {
        f.set(head, head);
        f.set(head + 8, head);
    }
    f.set(MOD_TREE + layout.addr_min, u64::MAX);
    f.set(MOD_TREE + layout.addr_max, 0);
    if let Some((m, base)) = existing {
        let l = m + layout.list;
        f.set(MODULES, l);
        f.set(MODULES + 8, l);
        f.set(l, MODULES);
        f.set(l + 8, MODULES);
        f.set(m + layout.memory.text_base(), base);
        for (i, tree) in layout.root_tree.iter().enumerate() {
            let node = m + layout.memory.text_mtn() + layout.mtn_node + i as u64 * RB_NODE;
            // Alone in the tree: black (1), no parent, no children.
            f.set(MOD_TREE + tree, node);
            f.set(node, 1);
        }
        f.set(MOD_TREE + layout.addr_min, base);
        f.set(MOD_TREE + layout.addr_max, base + 0x1000);
    }
    f
}

const OURS: u64 = 0xffff_ffff_9000_0000;
const OUR_TEXT: u64 = 0xffff_ffff_9010_0000;

fn our_module(f: &Fake, layout: &ModuleLayout) {
    f.set(OURS + layout.memory.text_base(), OUR_TEXT);
    f.set(OURS + layout.bug_list, 0);
    set_refcnt(f, layout, 2);
}

/// The module's `refcnt` (a u32 that need not be 8-aligned).
fn set_refcnt(f: &Fake, layout: &ModuleLayout, refs: u32) {
    let at = OURS + layout.refcnt;
    let shift = (at & 7) * 8;
    let word = f.get(at & !7) & !(0xffff_ffffu64 << shift) | (u64::from(refs) << shift);
    f.set(at & !7, word);
}

/// A kprobe on patch code holds the module: unregistering waits, and
/// writes nothing, until the reference is dropped.
#[test]
fn a_module_in_use_in_the_guest_is_not_unregistered() {
    let layout = layout61();
    let g = globals();
    let f = guest(&layout, None);
    our_module(&f, &layout);
    let words = links::register(&f, &layout, &g, OURS, OUR_TEXT..OUR_TEXT + 0x2000, true).unwrap();
    f.apply(&words);
    set_refcnt(&f, &layout, 3);
    let e = links::unregister(&f, &layout, &g, OURS, true);
    assert!(matches!(e, Err(RegisterError::InUse { refs: 1 })), "{e:?}");
    set_refcnt(&f, &layout, 2);
    links::unregister(&f, &layout, &g, OURS, true).unwrap();
}

#[test]
fn register_then_unregister_restores_the_registries() {
    let layout = layout61();
    let g = globals();
    let kmod = MODULES_AREA.start + 0x10_0000;
    for existing in [None, Some((kmod, MODULES_AREA.start + 0x20_0000))] {
        let f = guest(&layout, existing);
        our_module(&f, &layout);
        let before = f.snapshot();
        let words =
            links::register(&f, &layout, &g, OURS, OUR_TEXT..OUR_TEXT + 0x2000, true).unwrap();
        f.apply(&words);

        // On `modules` at the tail, on module_bug_list, in both trees.
        assert_eq!(f.get(MODULES + 8), OURS + layout.list);
        assert_eq!(f.get(OURS + layout.list), MODULES);
        assert_eq!(f.get(BUG_LIST), OURS + layout.bug_list);
        assert_eq!(f.get(OURS + layout.bug_list + 8), BUG_LIST);
        for (i, tree) in layout.root_tree.iter().enumerate() {
            let node = OURS + layout.memory.text_mtn() + layout.mtn_node + i as u64 * RB_NODE;
            let root = f.get(MOD_TREE + tree);
            if existing.is_none() {
                assert_eq!(root, node);
            } else {
                // Our text is above the module area's start: the new node
                // is the kernel module's right child... or the root after
                // a rotation; either way both are reachable.
                let (l, r) = (f.get(root + 16), f.get(root + 8));
                assert!(root == node || l == node || r == node, "tree {i}");
            }
        }
        assert_eq!(f.get(MOD_TREE + layout.root_seq) & 0xffff_ffff, 2);
        assert!(f.get(MOD_TREE + layout.addr_min) <= OUR_TEXT);
        assert!(f.get(MOD_TREE + layout.addr_max) >= OUR_TEXT + 0x2000);
        assert_eq!(f.get(TAINT), 1 << 15);

        // Every word written is in the allow-list built from the lists.
        let allowed = links::allowed(&f, &layout, &g, &[OURS]).unwrap();
        for (va, _, _) in &words {
            assert!(
                allowed.contains(va) || (OURS..OURS + layout.size).contains(va),
                "{va:#x} outside the allow-list"
            );
        }

        let words = links::unregister(&f, &layout, &g, OURS, true).unwrap();
        f.apply(&words);
        let after = f.snapshot();
        for (va, v) in &before {
            let ours = (OURS..OURS + layout.size).contains(va);
            let kept = [MOD_TREE + layout.addr_min, MOD_TREE + layout.addr_max];
            if !ours && !kept.contains(va) {
                assert_eq!(after.get(va), Some(v), "{va:#x} not restored");
            }
        }
        assert_eq!(f.get(MOD_TREE + layout.root_seq) & 0xffff_ffff, 4);
        assert_eq!(f.get(TAINT), 1 << 15, "taint stays");
    }
}

#[test]
fn a_busy_or_corrupt_registry_is_refused() {
    let layout = layout61();
    let g = globals();
    let f = guest(&layout, None);
    our_module(&f, &layout);
    f.set(MUTEX, 0xffff_8880_0123_4000);
    let e = links::register(&f, &layout, &g, OURS, OUR_TEXT..OUR_TEXT + 0x1000, false);
    assert!(matches!(e, Err(ref e) if e.is_busy()), "{e:?}");
    f.set(MUTEX, 0);
    f.set(MOD_TREE + layout.root_seq, 1);
    let e = links::register(&f, &layout, &g, OURS, OUR_TEXT..OUR_TEXT + 0x1000, false);
    assert!(matches!(e, Err(ref e) if e.is_busy()), "{e:?}");
    f.set(MOD_TREE + layout.root_seq, 0);
    // A list head whose neighbour does not point back.
    f.set(MODULES + 8, 0xffff_ffff_c123_0000);
    let e = links::register(&f, &layout, &g, OURS, OUR_TEXT..OUR_TEXT + 0x1000, false);
    assert!(matches!(e, Err(RegisterError::Corrupt(_))), "{e:?}");
}

#[test]
fn a_forged_module_outside_the_module_area_is_refused() {
    let layout = layout61();
    let g = globals();
    // "A module" in the kernel's text.
    let forged = 0xffff_ffff_8100_0000;
    let f = guest(&layout, Some((forged, forged)));
    let e = links::allowed(&f, &layout, &g, &[]);
    assert!(matches!(e, Err(RegisterError::Corrupt(_))), "{e:?}");
}

#[test]
fn unregistering_a_module_not_on_the_list_is_refused() {
    let layout = layout61();
    let g = globals();
    let f = guest(&layout, None);
    our_module(&f, &layout);
    let e = links::unregister(&f, &layout, &g, OURS, false);
    assert!(e.is_err(), "{e:?}");
}

//! Linking a patch's `struct module` into the kernel's registries, and
//! out again, as `load_module` and `free_module` do:
//!
//! - `modules` (tail, `list_add_tail_rcu`): `/proc/modules`, kallsyms
//!   lookups by name and `/proc/kallsyms` walk it;
//! - `mod_tree`, the latch tree `__module_address` searches: exception
//!   fixups, ORC, `%pS` and `BUG` reports find the module by IP through it;
//!   both copies of the tree are edited and the latch sequence advanced by
//!   two, so a reader paused in the middle of a lookup retries;
//! - `module_bug_list` (head, `list_add_rcu`): `report_bug` searches it.
//!
//! Every edit is computed with every vCPU paused, from memory read then,
//! and only when no writer can be half-way: all three registries change
//! only under `module_mutex`, so a held mutex means "try again later".

use super::layout::{ModuleLayout, RB_NODE};
use super::rbtree::{self, TreeError, TreeMem};
use super::RegisterError;

/// At most this many modules are walked to build the allow-list.
pub const MAX_MODULES: usize = 8192;
/// x86-64's module area (`MODULES_VADDR` to `MODULES_END`, the same with
/// 4- and 5-level paging): every `struct module` the kernel loaded is in
/// it, inside the module's own memory.
pub const MODULES_AREA: std::ops::Range<u64> = 0xffff_ffff_c000_0000..0xffff_ffff_ff00_0000;

/// The kernel symbols the registration writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Globals {
    /// `LIST_HEAD(modules)`.
    pub modules: u64,
    /// `LIST_HEAD(module_bug_list)`.
    pub module_bug_list: u64,
    /// `struct mod_tree_root mod_tree`.
    pub mod_tree: u64,
    /// `DEFINE_MUTEX(module_mutex)`, which every registry writer holds.
    pub module_mutex: u64,
    /// `tainted_mask`, where the kernel keeps its taint flags.
    pub tainted_mask: Option<u64>,
}

/// Reads guest kernel memory.
pub trait Mem {
    /// The 8-byte word at `va`.
    fn read_u64(&self, va: u64) -> Result<u64, RegisterError>;
}

/// One 8-byte word to write: (va, old, new).
pub type Word = (u64, u64, u64);

struct Tree<'a>(&'a dyn Mem);

impl TreeMem for Tree<'_> {
    fn read_u64(&self, va: u64) -> Result<u64, TreeError> {
        self.0.read_u64(va).map_err(|e| TreeError::Read {
            va,
            reason: e.to_string(),
        })
    }
}

/// Words written so far, so later reads see them.
struct Overlay<'a> {
    mem: &'a dyn Mem,
    words: Vec<Word>,
}

impl Mem for Overlay<'_> {
    fn read_u64(&self, va: u64) -> Result<u64, RegisterError> {
        match self.words.iter().rev().find(|w| w.0 == va) {
            Some(w) => Ok(w.2),
            None => self.mem.read_u64(va),
        }
    }
}

impl Overlay<'_> {
    fn set(&mut self, va: u64, new: u64) -> Result<(), RegisterError> {
        if let Some(w) = self.words.iter_mut().find(|w| w.0 == va) {
            w.2 = new;
            return Ok(());
        }
        let old = self.mem.read_u64(va)?;
        self.words.push((va, old, new));
        Ok(())
    }
}

/// Refuses while a registry writer may be mid-way (see the module docs).
pub fn quiet(mem: &dyn Mem, layout: &ModuleLayout, g: &Globals) -> Result<(), RegisterError> {
    // struct mutex starts with its owner: non-zero while someone holds it.
    let owner = mem.read_u64(g.module_mutex)?;
    if owner != 0 {
        return Err(RegisterError::Busy(
            "module_mutex is held (a module is loading or unloading)",
        ));
    }
    let seq = mem.read_u64(g.mod_tree + layout.root_seq)? as u32;
    if seq & 1 != 0 {
        return Err(RegisterError::Busy(
            "mod_tree is being changed (latch sequence odd)",
        ));
    }
    Ok(())
}

/// The key `__mod_tree_val` reads for a tree node: the range's `base`.
fn key(mem: &dyn Mem, layout: &ModuleLayout, node: u64, index: u64) -> Result<u64, TreeError> {
    let range = node
        .checked_sub(index * RB_NODE + layout.mtn_node + layout.memory.mtn_in_range())
        .ok_or(TreeError::Key {
            node,
            reason: "node address underflows".into(),
        })?;
    mem.read_u64(range).map_err(|e| TreeError::Key {
        node,
        reason: e.to_string(),
    })
}

fn tree_node(layout: &ModuleLayout, module: u64, index: u64) -> u64 {
    module + layout.memory.text_mtn() + layout.mtn_node + index * RB_NODE
}

fn check_list(mem: &dyn Mem, node: u64, what: &'static str) -> Result<(u64, u64), RegisterError> {
    let next = mem.read_u64(node)?;
    let prev = mem.read_u64(node + 8)?;
    if mem.read_u64(prev)? != node || mem.read_u64(next + 8)? != node {
        return Err(RegisterError::Corrupt(what));
    }
    Ok((next, prev))
}

fn tree_edit(
    o: &mut Overlay<'_>,
    layout: &ModuleLayout,
    g: &Globals,
    module: u64,
    insert: bool,
) -> Result<(), RegisterError> {
    for index in 0..2u64 {
        let root = g.mod_tree + layout.root_tree[index as usize];
        let node = tree_node(layout, module, index);
        let edit = {
            let mem: &dyn Mem = &*o;
            let tm = Tree(mem);
            if insert {
                let mut less = |a: u64, b: u64| -> Result<bool, TreeError> {
                    Ok(key(mem, layout, a, index)? < key(mem, layout, b, index)?)
                };
                rbtree::insert(&tm, root, node, &mut less)?
            } else {
                rbtree::erase(&tm, root, node)?
            }
        };
        for (va, _, new) in edit.into_writes() {
            o.set(va, new)?;
        }
    }
    // Both copies changed: advance the latch by two, so any lookup that
    // was under way (on a paused vCPU) retries. The word holds the 32-bit
    // sequence and padding (or the next field): keep the upper half.
    let seq_va = g.mod_tree + layout.root_seq;
    let word = o.read_u64(seq_va)?;
    let seq = (word as u32).wrapping_add(2);
    o.set(seq_va, (word & !0xffff_ffff) | u64::from(seq))
}

/// The words that register the `struct module` at `module` (already in
/// guest memory): `text` is its text range, `bugs` whether it goes on the
/// BUG list.
pub fn register(
    mem: &dyn Mem,
    layout: &ModuleLayout,
    g: &Globals,
    module: u64,
    text: std::ops::Range<u64>,
    bugs: bool,
) -> Result<Vec<Word>, RegisterError> {
    quiet(mem, layout, g)?;
    let mut o = Overlay {
        mem,
        words: Vec::new(),
    };
    // modules: list_add_tail_rcu(&mod->list, &modules).
    let head = g.modules;
    let (_, tail) = check_list(mem, head, "the `modules` list head")?;
    let me = module + layout.list;
    o.set(me, head)?;
    o.set(me + 8, tail)?;
    o.set(tail, me)?;
    o.set(head + 8, me)?;
    // module_bug_list: list_add_rcu(&mod->bug_list, &module_bug_list).
    if bugs {
        let head = g.module_bug_list;
        let (first, _) = check_list(mem, head, "the `module_bug_list` head")?;
        let me = module + layout.bug_list;
        o.set(me, first)?;
        o.set(me + 8, head)?;
        o.set(first + 8, me)?;
        o.set(head, me)?;
    }
    tree_edit(&mut o, layout, g, module, true)?;
    // mod_update_bounds().
    let min_va = g.mod_tree + layout.addr_min;
    let max_va = g.mod_tree + layout.addr_max;
    if text.start < o.read_u64(min_va)? {
        o.set(min_va, text.start)?;
    }
    if text.end > o.read_u64(max_va)? {
        o.set(max_va, text.end)?;
    }
    // add_taint_module(TAINT_LIVEPATCH): the kernel-wide flag too, as klp
    // leaves it for crash tools and bug reports. Taint is never cleared.
    if let Some(tm) = g.tainted_mask {
        let mask = o.read_u64(tm)?;
        let k = 1u64 << super::layout::TAINT_LIVEPATCH;
        if mask & k == 0 {
            o.set(tm, mask | k)?;
        }
    }
    Ok(o.words)
}

/// The words that take the `struct module` at `module` out of every
/// registry it is in (the bounds stay, as `free_module` leaves them).
pub fn unregister(
    mem: &dyn Mem,
    layout: &ModuleLayout,
    g: &Globals,
    module: u64,
    bugs: bool,
) -> Result<Vec<Word>, RegisterError> {
    quiet(mem, layout, g)?;
    // Someone in the guest holds the module (a kprobe on patch code takes
    // a reference while it is armed): its code must stay, as `delete_module`
    // refuses a module in use.
    let at = module + layout.refcnt;
    let word = mem.read_u64(at & !7)?;
    let refs = (word >> ((at & 7) * 8)) as u32;
    if refs != super::layout::MODULE_REF_BASE + 1 {
        return Err(RegisterError::InUse {
            refs: refs.saturating_sub(super::layout::MODULE_REF_BASE + 1),
        });
    }
    let mut o = Overlay {
        mem,
        words: Vec::new(),
    };
    for (on, at) in [(true, layout.list), (bugs, layout.bug_list)] {
        if !on {
            continue;
        }
        // list_del_rcu: the neighbours skip us; our own pointers stay, so
        // a reader paused on us still finds its way on.
        let me = module + at;
        let (next, prev) = check_list(mem, me, "the patch's module list entry")?;
        o.set(prev, next)?;
        o.set(next + 8, prev)?;
    }
    tree_edit(&mut o, layout, g, module, false)?;
    Ok(o.words)
}

/// The guest words the registration may write, found independently of
/// the edit: the three registries' heads, and in each module on the
/// `modules` list its list entries and tree nodes. A forged pointer in
/// guest memory can make an edit fail, but not reach outside these.
pub fn allowed(
    mem: &dyn Mem,
    layout: &ModuleLayout,
    g: &Globals,
    ours: &[u64],
) -> Result<Vec<u64>, RegisterError> {
    let mut words = vec![
        g.modules,
        g.modules + 8,
        g.module_bug_list,
        g.module_bug_list + 8,
        g.mod_tree + layout.root_seq,
        g.mod_tree + layout.root_tree[0],
        g.mod_tree + layout.root_tree[1],
        g.mod_tree + layout.addr_min,
        g.mod_tree + layout.addr_max,
    ];
    words.extend(g.tainted_mask);
    let per_module = |m: u64, words: &mut Vec<u64>| {
        for at in [layout.list, layout.bug_list] {
            words.extend([m + at, m + at + 8]);
        }
        for &range in &layout.range_at[..layout.ranges] {
            let node = m + range + layout.memory.mtn_in_range() + layout.mtn_node;
            for w in 0..6 {
                words.push(node + w * 8);
            }
        }
    };
    for &m in ours {
        per_module(m, &mut words);
    }
    let mut cur = mem.read_u64(g.modules)?;
    let mut n = 0;
    while cur != g.modules {
        n += 1;
        if n > MAX_MODULES {
            return Err(RegisterError::Corrupt(
                "the `modules` list is longer than 8192",
            ));
        }
        let m = cur
            .checked_sub(layout.list)
            .ok_or(RegisterError::Corrupt("a `modules` entry below address 0"))?;
        if !MODULES_AREA.contains(&m) && !ours.contains(&m) {
            return Err(RegisterError::Corrupt(
                "a `modules` entry outside the module area and not a patch's",
            ));
        }
        per_module(m, &mut words);
        cur = mem.read_u64(cur)?;
    }
    words.sort_unstable();
    words.dedup();
    Ok(words)
}

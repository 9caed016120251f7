//! Insertion into and erasure from a Linux kernel red-black tree that lives
//! in guest memory, computed from outside the guest.
//!
//! The kernel's own lookups (`latch_tree_find`, `rb_find`, ...) and later
//! `rb_insert_color` / `rb_erase` calls must find a valid tree after we
//! edit it, so this is a port of `lib/rbtree.c` (`rb_link_node`,
//! `__rb_insert`, `__rb_erase_augmented` without augmentation and
//! `____rb_erase_color`) step by step: same cases, same rotations, same
//! colours, hence the same resulting shape the guest would have produced
//! itself. Nothing is written here: every store goes into an [`Edit`]
//! (address, old value, new value), through an overlay so later reads see
//! earlier stores, and the caller commits the edit while every vCPU is
//! paused.
//!
//! Guest memory is untrusted input. Every pointer read from the tree is
//! checked (8-byte aligned, not NULL where a valid tree has a node, the
//! whole `rb_node` addressable), every walk is bounded by [`MAX_DEPTH`] and
//! checks for cycles, and a tree whose links disagree (a parent that does
//! not point back to its child, a red node without a parent) is refused
//! with a [`TreeError`] instead of being "repaired" — the C code trusts
//! these facts; we check them, and only differ from it on trees the C code
//! would corrupt further.
//!
//! x86_64 layout (`include/linux/rbtree_types.h`):
//! `struct rb_node { unsigned long __rb_parent_color; struct rb_node
//! *rb_right; struct rb_node *rb_left; }` at offsets 0, 8, 16, aligned to
//! 8, so bit 0 of `__rb_parent_color` is the colour (red 0, black 1) and
//! the rest is the parent; `struct rb_root { struct rb_node *rb_node; }`.

use std::collections::{HashMap, HashSet};

/// Offset of `__rb_parent_color` in `struct rb_node`.
const PARENT_COLOR: u64 = 0;
/// Offset of `rb_right` in `struct rb_node`.
const RIGHT: u64 = 8;
/// Offset of `rb_left` in `struct rb_node`.
const LEFT: u64 = 16;
/// `sizeof(struct rb_node)`.
const NODE_SIZE: u64 = 24;
/// `RB_RED`: colour bit clear.
const RB_RED: u64 = 0;
/// `RB_BLACK`: colour bit set.
const RB_BLACK: u64 = 1;

/// Most nodes any walk visits (descent, ancestor chain, successor search,
/// rebalancing loop) before the tree is declared corrupt.
///
/// A red-black tree of n nodes is at most 2·log2(n + 1) high, so 256
/// levels would need more than 2^127 nodes: any longer walk means a cycle
/// or a forged tree, and the bound keeps hostile memory from hanging us.
pub const MAX_DEPTH: usize = 256;

/// Why a tree edit could not be computed. Nothing has been written when
/// one is returned (edits are only ever recorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// Guest memory could not be read (unmapped, outside RAM, ...).
    #[error("cannot read guest memory at {va:#x}: {reason}")]
    Read {
        /// Kernel virtual address of the 8-byte word.
        va: u64,
        /// What the memory accessor reported.
        reason: String,
    },
    /// A pointer is not the address of an `rb_node`: misaligned, or the
    /// node would wrap around the end of the address space.
    #[error("{what} at {at:#x} is {value:#x}, not the address of an rb_node ({why})")]
    BadPointer {
        /// Which pointer (e.g. "rb_left").
        what: &'static str,
        /// Where it was read from (or, for an argument, the argument).
        at: u64,
        /// The pointer value.
        value: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A pointer is NULL where a valid red-black tree has a node.
    #[error("{what} at {at:#x} is NULL, but a valid red-black tree has a node there")]
    Null {
        /// Which pointer (e.g. "sibling").
        what: &'static str,
        /// Where it was read from.
        at: u64,
    },
    /// A walk reached the same node twice.
    #[error("node {node:#x} reached twice while walking the tree: the tree has a cycle")]
    Cycle {
        /// The node reached again.
        node: u64,
    },
    /// A walk went on for more than [`MAX_DEPTH`] nodes.
    #[error("walked more than {limit} nodes without reaching the end: the tree is corrupt")]
    TooDeep {
        /// The limit ([`MAX_DEPTH`]).
        limit: usize,
    },
    /// The tree's own links contradict each other.
    #[error("tree corrupt at node {node:#x}: {what}")]
    Corrupt {
        /// The node whose links are inconsistent.
        node: u64,
        /// What is inconsistent.
        what: &'static str,
    },
    /// [`erase`] was asked to remove a node that is not in this tree.
    #[error("node {node:#x} is not in the tree rooted at {root_va:#x}: {why}")]
    NotInTree {
        /// The node to erase.
        node: u64,
        /// Address of the tree's `struct rb_root`.
        root_va: u64,
        /// How the check failed.
        why: &'static str,
    },
    /// [`insert`] was asked to insert a node that is already in the tree,
    /// or whose 24 bytes overlap a node on its insertion path.
    #[error("node {node:#x} to insert is (or overlaps) node {existing:#x} already in the tree")]
    AlreadyInTree {
        /// The node to insert.
        node: u64,
        /// The tree node it is, or overlaps.
        existing: u64,
    },
    /// The caller's ordering function could not compare two nodes (e.g.
    /// it could not read their keys).
    #[error("cannot compare node {node:#x}: {reason}")]
    Key {
        /// The node whose key could not be found.
        node: u64,
        /// Why.
        reason: String,
    },
}

/// Guest memory as the tree code sees it: 8-byte reads at kernel virtual
/// addresses. Writes never go through it; they are recorded in an
/// [`Edit`].
pub trait TreeMem {
    /// Reads the little-endian 8-byte word at `va` (8-aligned).
    fn read_u64(&self, va: u64) -> Result<u64, TreeError>;
}

/// A tree edit computed against guest memory: the 8-byte writes that
/// perform it, nothing written yet.
///
/// One entry per word, in the order each word was first written, with the
/// word's value before the edit (`old`, as read from guest memory) and
/// its value after the whole edit (`new`, the last store to it). Applying
/// the entries in any order gives the same result, since no two share a
/// word; `old` lets the committer check that the guest did not change the
/// tree since the edit was computed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edit {
    writes: Vec<(u64, u64, u64)>,
}

impl Edit {
    /// The writes as `(va, old, new)`, in first-write order.
    pub fn writes(&self) -> &[(u64, u64, u64)] {
        &self.writes
    }

    /// The writes, by value.
    pub fn into_writes(self) -> Vec<(u64, u64, u64)> {
        self.writes
    }
}

/// Inserts `node` (the address of an `rb_node` not yet in the tree) into
/// the tree whose `struct rb_root` is at `root_va`.
///
/// Like the kernel's `__lt_insert` / `rb_add`: walk down from the root
/// going left when `less(node, parent)` and right otherwise (so equal keys
/// go after existing ones), `rb_link_node` (the node's three words become
/// parent|RED, NULL, NULL, all recorded in the edit with their old values
/// read from guest memory), then `rb_insert_color`. `less` gets node
/// addresses; the caller maps them to keys (`container_of`) and may fail.
pub fn insert(
    mem: &dyn TreeMem,
    root_va: u64,
    node: u64,
    less: &mut dyn FnMut(u64, u64) -> Result<bool, TreeError>,
) -> Result<Edit, TreeError> {
    let mut t = Tree::new(mem, root_va)?;
    let node = Node::arg(node, "node to insert")?;

    // Descend to the empty link the node goes into.
    let mut parent: Option<Node> = None;
    let mut link_left = false;
    let mut cur = t.root()?;
    let mut seen = HashSet::new();
    while let Some(p) = cur {
        if p.0.abs_diff(node.0) < NODE_SIZE {
            return Err(TreeError::AlreadyInTree {
                node: node.0,
                existing: p.0,
            });
        }
        if !seen.insert(p) {
            return Err(TreeError::Cycle { node: p.0 });
        }
        if seen.len() > MAX_DEPTH {
            return Err(TreeError::TooDeep { limit: MAX_DEPTH });
        }
        parent = Some(p);
        link_left = less(node.0, p.0)?;
        cur = if link_left { t.left(p)? } else { t.right(p)? };
    }

    // rb_link_node(): parent with colour RED (0), no children, then the link.
    t.set_parent_color(node, parent, RB_RED)?;
    t.set_right(node, None)?;
    t.set_left(node, None)?;
    match parent {
        None => t.set_root(Some(node))?,
        Some(p) if link_left => t.set_left(p, Some(node))?,
        Some(p) => t.set_right(p, Some(node))?,
    }

    t.insert_color(node)?;
    Ok(t.into_edit())
}

/// Erases `node` from the tree whose `struct rb_root` is at `root_va`, as
/// `rb_erase` does.
///
/// The node must be in the tree: its parent chain is walked up to the root
/// first, every parent must point back to its child and the top must be
/// the root's node, else [`TreeError::NotInTree`] (erasing a node that is
/// not in the tree would corrupt it). The erased node's own words are left
/// as they were, as `rb_erase` leaves them.
pub fn erase(mem: &dyn TreeMem, root_va: u64, node: u64) -> Result<Edit, TreeError> {
    let mut t = Tree::new(mem, root_va)?;
    let node = Node::arg(node, "node to erase")?;
    t.check_member(node)?;
    t.erase(node)?;
    Ok(t.into_edit())
}

/// The address of an `rb_node`: non-NULL, 8-aligned, and its 24 bytes do
/// not wrap around the address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Node(u64);

impl Node {
    /// Checks a nullable pointer `value` read from `at` (named `what`).
    fn ptr(value: u64, what: &'static str, at: u64) -> Result<Option<Node>, TreeError> {
        if value == 0 {
            return Ok(None);
        }
        if value % 8 != 0 {
            return Err(TreeError::BadPointer {
                what,
                at,
                value,
                why: "not 8-byte aligned",
            });
        }
        if value.checked_add(NODE_SIZE - 1).is_none() {
            return Err(TreeError::BadPointer {
                what,
                at,
                value,
                why: "the node would wrap around the end of the address space",
            });
        }
        Ok(Some(Node(value)))
    }

    /// Checks a node address given as an argument (must not be NULL).
    fn arg(value: u64, what: &'static str) -> Result<Node, TreeError> {
        Node::ptr(value, what, value)?.ok_or(TreeError::Null { what, at: value })
    }

    /// Address of the field at `off`.
    fn at(self, off: u64) -> u64 {
        // Cannot overflow: `ptr` checked the node's last byte is addressable.
        self.0 + off
    }
}

/// A child side: which of `rb_left` / `rb_right`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Left,
    Right,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        }
    }
}

/// A parent pointer, given `__rb_parent_color` value `pc` read from `node`.
fn parent_of(pc: u64, node: Node) -> Result<Option<Node>, TreeError> {
    // __rb_parent() masks the low two bits; bit 1 is never set by the
    // kernel and a parent is 8-aligned, so only bit 0 may be set.
    Node::ptr(
        pc & !RB_BLACK,
        "parent in __rb_parent_color",
        node.at(PARENT_COLOR),
    )
}

/// Whether a `__rb_parent_color` value says black.
fn pc_is_black(pc: u64) -> bool {
    pc & 1 == RB_BLACK
}

/// Guest memory with the edit's own stores layered on top, and the tree
/// operations of `lib/rbtree.c` over it.
struct Tree<'m> {
    mem: &'m dyn TreeMem,
    root_va: u64,
    /// `(va, old, new)` in first-write order.
    writes: Vec<(u64, u64, u64)>,
    /// Index into `writes` by `va`.
    index: HashMap<u64, usize>,
}

impl<'m> Tree<'m> {
    fn new(mem: &'m dyn TreeMem, root_va: u64) -> Result<Self, TreeError> {
        if root_va % 8 != 0 || root_va == 0 {
            return Err(TreeError::BadPointer {
                what: "struct rb_root",
                at: root_va,
                value: root_va,
                why: "NULL or not 8-byte aligned",
            });
        }
        Ok(Tree {
            mem,
            root_va,
            writes: Vec::new(),
            index: HashMap::new(),
        })
    }

    fn into_edit(self) -> Edit {
        Edit {
            writes: self.writes,
        }
    }

    // --- the overlay -----------------------------------------------------

    fn read(&self, va: u64) -> Result<u64, TreeError> {
        match self.index.get(&va) {
            Some(&i) => Ok(self.writes.get(i).map_or(0, |w| w.2)),
            None => self.mem.read_u64(va),
        }
    }

    fn write(&mut self, va: u64, new: u64) -> Result<(), TreeError> {
        if let Some(&i) = self.index.get(&va) {
            if let Some(w) = self.writes.get_mut(i) {
                w.2 = new;
            }
            return Ok(());
        }
        let old = self.mem.read_u64(va)?;
        self.index.insert(va, self.writes.len());
        self.writes.push((va, old, new));
        Ok(())
    }

    // --- field accessors -------------------------------------------------

    fn root(&self) -> Result<Option<Node>, TreeError> {
        Node::ptr(self.read(self.root_va)?, "rb_root.rb_node", self.root_va)
    }

    fn set_root(&mut self, n: Option<Node>) -> Result<(), TreeError> {
        self.write(self.root_va, n.map_or(0, |n| n.0))
    }

    fn pc(&self, n: Node) -> Result<u64, TreeError> {
        self.read(n.at(PARENT_COLOR))
    }

    fn set_pc(&mut self, n: Node, pc: u64) -> Result<(), TreeError> {
        self.write(n.at(PARENT_COLOR), pc)
    }

    /// `rb_parent()`.
    fn parent(&self, n: Node) -> Result<Option<Node>, TreeError> {
        parent_of(self.pc(n)?, n)
    }

    fn is_black(&self, n: Node) -> Result<bool, TreeError> {
        Ok(pc_is_black(self.pc(n)?))
    }

    /// `rb_is_red()`; NULL children count as black, as the C code's
    /// `!tmp || rb_is_black(tmp)` tests do.
    fn is_red(&self, n: Option<Node>) -> Result<bool, TreeError> {
        match n {
            Some(n) => Ok(!self.is_black(n)?),
            None => Ok(false),
        }
    }

    fn left(&self, n: Node) -> Result<Option<Node>, TreeError> {
        Node::ptr(self.read(n.at(LEFT))?, "rb_left", n.at(LEFT))
    }

    fn right(&self, n: Node) -> Result<Option<Node>, TreeError> {
        Node::ptr(self.read(n.at(RIGHT))?, "rb_right", n.at(RIGHT))
    }

    fn child(&self, n: Node, side: Side) -> Result<Option<Node>, TreeError> {
        match side {
            Side::Left => self.left(n),
            Side::Right => self.right(n),
        }
    }

    fn set_left(&mut self, n: Node, c: Option<Node>) -> Result<(), TreeError> {
        self.write(n.at(LEFT), c.map_or(0, |c| c.0))
    }

    fn set_right(&mut self, n: Node, c: Option<Node>) -> Result<(), TreeError> {
        self.write(n.at(RIGHT), c.map_or(0, |c| c.0))
    }

    fn set_child(&mut self, n: Node, side: Side, c: Option<Node>) -> Result<(), TreeError> {
        match side {
            Side::Left => self.set_left(n, c),
            Side::Right => self.set_right(n, c),
        }
    }

    /// Which child of `parent` `child` is; refuses a parent that does not
    /// point to it (the C code would silently take the right side).
    fn side_of(&self, parent: Node, child: Node) -> Result<Side, TreeError> {
        if self.left(parent)? == Some(child) {
            Ok(Side::Left)
        } else if self.right(parent)? == Some(child) {
            Ok(Side::Right)
        } else {
            Err(TreeError::Corrupt {
                node: parent.0,
                what: "a child's parent pointer names this node, but neither rb_left nor rb_right points back",
            })
        }
    }

    /// A node the algorithm needs: `n`, or an error naming what was NULL.
    fn need(n: Option<Node>, what: &'static str, at: u64) -> Result<Node, TreeError> {
        n.ok_or(TreeError::Null { what, at })
    }

    // --- helpers of lib/rbtree.c -----------------------------------------

    /// `rb_set_parent_color()`.
    fn set_parent_color(
        &mut self,
        n: Node,
        parent: Option<Node>,
        color: u64,
    ) -> Result<(), TreeError> {
        self.set_pc(n, parent.map_or(0, |p| p.0) | color)
    }

    /// `rb_set_parent()`: keeps the colour.
    fn set_parent(&mut self, n: Node, parent: Node) -> Result<(), TreeError> {
        let color = self.pc(n)? & 1;
        self.set_pc(n, parent.0 | color)
    }

    /// `rb_set_black()`.
    fn set_black(&mut self, n: Node) -> Result<(), TreeError> {
        let pc = self.pc(n)?;
        self.set_pc(n, pc | RB_BLACK)
    }

    /// `__rb_change_child()`: makes whatever pointed to `old` (its parent's
    /// child link, or the root) point to `new`.
    fn change_child(
        &mut self,
        old: Node,
        new: Option<Node>,
        parent: Option<Node>,
    ) -> Result<(), TreeError> {
        match parent {
            Some(p) => {
                let side = self.side_of(p, old)?;
                self.set_child(p, side, new)
            }
            None => {
                if self.root()? != Some(old) {
                    return Err(TreeError::Corrupt {
                        node: old.0,
                        what: "node has no parent but is not the root",
                    });
                }
                self.set_root(new)
            }
        }
    }

    /// `__rb_rotate_set_parents()`: `new` takes `old`'s parent and colour
    /// and its place under that parent; `old` gets `new` as parent and
    /// `color`.
    fn rotate_set_parents(&mut self, old: Node, new: Node, color: u64) -> Result<(), TreeError> {
        let old_pc = self.pc(old)?;
        let parent = parent_of(old_pc, old)?;
        self.set_pc(new, old_pc)?;
        self.set_parent_color(old, Some(new), color)?;
        self.change_child(old, Some(new), parent)
    }

    // --- the algorithms --------------------------------------------------

    /// `__rb_insert()` without augmentation: `node` was just linked red;
    /// restore "root black" and "no red node has a red child". The C code's
    /// two mirrored halves are one body here, `side` being the side of
    /// `parent` under `gparent` (the C code's first half is `Left`).
    fn insert_color(&mut self, mut node: Node) -> Result<(), TreeError> {
        let mut parent = self.parent(node)?; // rb_red_parent(node)
        for _ in 0..=MAX_DEPTH {
            // Loop invariant: node is red.
            let Some(mut p) = parent else {
                self.set_parent_color(node, None, RB_BLACK)?;
                return Ok(());
            };
            if self.is_black(p)? {
                return Ok(());
            }
            // A red node is never the root, so it has a parent.
            let g = Self::need(self.parent(p)?, "parent of a red node", p.at(PARENT_COLOR))?;
            let side = if self.right(g)? == Some(p) {
                Side::Right
            } else if self.left(g)? == Some(p) {
                Side::Left
            } else {
                return Err(TreeError::Corrupt {
                    node: g.0,
                    what: "grandparent of the inserted node does not point back to its parent",
                });
            };

            if let Some(uncle) = self.child(g, side.other())? {
                if !self.is_black(uncle)? {
                    // Case 1 - colour flips, then recurse at the grandparent.
                    self.set_parent_color(uncle, Some(g), RB_BLACK)?;
                    self.set_parent_color(p, Some(g), RB_BLACK)?;
                    node = g;
                    parent = self.parent(node)?;
                    self.set_parent_color(node, parent, RB_RED)?;
                    continue;
                }
            }

            let mut tmp = self.child(p, side.other())?;
            if tmp == Some(node) {
                // Case 2 - node is the inner grandchild: rotate at parent
                // so parent becomes node's child on `side`, the outer
                // line that case 3 handles.
                tmp = self.child(node, side)?;
                self.set_child(p, side.other(), tmp)?;
                self.set_child(node, side, Some(p))?;
                if let Some(t) = tmp {
                    self.set_parent_color(t, Some(p), RB_BLACK)?;
                }
                self.set_parent_color(p, Some(node), RB_RED)?;
                p = node;
                tmp = self.child(node, side.other())?;
            }

            // Case 3 - rotate at grandparent towards the uncle.
            self.set_child(g, side, tmp)?;
            self.set_child(p, side.other(), Some(g))?;
            if let Some(t) = tmp {
                self.set_parent_color(t, Some(g), RB_BLACK)?;
            }
            self.rotate_set_parents(g, p, RB_RED)?;
            return Ok(());
        }
        Err(TreeError::TooDeep { limit: MAX_DEPTH })
    }

    /// Walks up from `node` by parent pointers: each parent must point
    /// back to its child, and the topmost must be the root's node.
    fn check_member(&self, node: Node) -> Result<(), TreeError> {
        let not_in = |why| TreeError::NotInTree {
            node: node.0,
            root_va: self.root_va,
            why,
        };
        let mut cur = node;
        let mut seen = HashSet::from([node]);
        while let Some(p) = self.parent(cur)? {
            if self.left(p)? != Some(cur) && self.right(p)? != Some(cur) {
                return Err(if cur == node {
                    not_in("its parent does not point back to it")
                } else {
                    TreeError::Corrupt {
                        node: p.0,
                        what: "an ancestor of the node to erase does not point back to its child",
                    }
                });
            }
            if !seen.insert(p) {
                return Err(TreeError::Cycle { node: p.0 });
            }
            if seen.len() > MAX_DEPTH {
                return Err(TreeError::TooDeep { limit: MAX_DEPTH });
            }
            cur = p;
        }
        if self.root()? != Some(cur) {
            return Err(not_in(
                "its topmost ancestor (or itself, if it has no parent) is not the root",
            ));
        }
        Ok(())
    }

    /// `rb_erase()`: `__rb_erase_augmented()` with no-op callbacks, then
    /// `____rb_erase_color()` if a black node left a path short.
    fn erase(&mut self, node: Node) -> Result<(), TreeError> {
        let child = self.right(node)?;
        let left = self.left(node)?;
        let rebalance: Option<Node>;

        match (left, child) {
            (None, _) => {
                // Case 1: at most one child (the right one). If there is
                // one it is red and node black: it takes node's place and
                // colour, no rebalancing.
                let pc = self.pc(node)?;
                let parent = parent_of(pc, node)?;
                self.change_child(node, child, parent)?;
                if let Some(c) = child {
                    self.set_pc(c, pc)?;
                    rebalance = None;
                } else {
                    rebalance = if pc_is_black(pc) { parent } else { None };
                }
            }
            (Some(l), None) => {
                // Still case 1, the child is the left one.
                let pc = self.pc(node)?;
                self.set_pc(l, pc)?;
                let parent = parent_of(pc, node)?;
                self.change_child(node, Some(l), parent)?;
                rebalance = None;
            }
            (Some(l), Some(c)) => {
                let mut successor = c;
                let parent: Node;
                let child2: Option<Node>;
                let mut tmp = self.left(c)?;
                match tmp {
                    None => {
                        // Case 2: the successor is node's right child.
                        parent = successor;
                        child2 = self.right(successor)?;
                    }
                    Some(_) => {
                        // Case 3: the successor is the leftmost node of
                        // node's right subtree.
                        let mut p = successor;
                        let mut steps = 0;
                        while let Some(t) = tmp {
                            steps += 1;
                            if steps > MAX_DEPTH {
                                return Err(TreeError::TooDeep { limit: MAX_DEPTH });
                            }
                            p = successor;
                            successor = t;
                            tmp = self.left(t)?;
                        }
                        parent = p;
                        child2 = self.right(successor)?;
                        self.set_left(parent, child2)?;
                        self.set_right(successor, Some(c))?;
                        self.set_parent(c, successor)?;
                    }
                }

                self.set_left(successor, Some(l))?;
                self.set_parent(l, successor)?;

                let pc = self.pc(node)?;
                let node_parent = parent_of(pc, node)?;
                self.change_child(node, Some(successor), node_parent)?;
                if let Some(c2) = child2 {
                    self.set_pc(successor, pc)?;
                    self.set_parent_color(c2, Some(parent), RB_BLACK)?;
                    rebalance = None;
                } else {
                    let pc2 = self.pc(successor)?;
                    self.set_pc(successor, pc)?;
                    rebalance = if pc_is_black(pc2) { Some(parent) } else { None };
                }
            }
        }

        match rebalance {
            Some(parent) => self.erase_color(parent),
            None => Ok(()),
        }
    }

    /// `____rb_erase_color()` without augmentation: paths through `node`
    /// (NULL at first, under `parent`) have one black node fewer than the
    /// others; fix it. The C code's two mirrored halves are one body here,
    /// `side` being the side of `node` under `parent` (the C code's first
    /// half is `Left`).
    fn erase_color(&mut self, mut parent: Node) -> Result<(), TreeError> {
        let mut node: Option<Node> = None;
        for _ in 0..=MAX_DEPTH {
            // Loop invariants: node is black (or NULL on the first pass),
            // node is not the root, and paths through it are one black
            // node short.
            let side = match node {
                Some(n) => self.side_of(parent, n)?,
                // The C code: `node != parent->rb_right` means left. The
                // erased slot is the NULL one; its sibling cannot be NULL.
                None => {
                    if self.right(parent)?.is_some() {
                        Side::Left
                    } else {
                        Side::Right
                    }
                }
            };
            if node.is_none() && self.child(parent, side)?.is_some() {
                return Err(TreeError::Corrupt {
                    node: parent.0,
                    what: "a black leaf was erased under this node but it still has two children",
                });
            }
            let sib_at = parent.at(if side == Side::Left { RIGHT } else { LEFT });
            let mut sibling = Self::need(
                self.child(parent, side.other())?,
                "sibling of a short path",
                sib_at,
            )?;

            if self.is_red(Some(sibling))? {
                // Case 1 - rotate at parent towards node; the sibling's
                // child on our side becomes the new (black) sibling.
                let tmp1 = Self::need(
                    self.child(sibling, side)?,
                    "child of a red sibling",
                    sibling.at(if side == Side::Left { LEFT } else { RIGHT }),
                )?;
                self.set_child(parent, side.other(), Some(tmp1))?;
                self.set_child(sibling, side, Some(parent))?;
                self.set_parent_color(tmp1, Some(parent), RB_BLACK)?;
                self.rotate_set_parents(parent, sibling, RB_RED)?;
                sibling = tmp1;
            }

            let mut tmp1 = self.child(sibling, side.other())?;
            if !self.is_red(tmp1)? {
                let tmp2 = self.child(sibling, side)?;
                match tmp2 {
                    Some(t2) if self.is_red(Some(t2))? => {
                        // Case 3 - rotate at sibling away from node.
                        let t1 = self.child(t2, side.other())?;
                        self.set_child(sibling, side, t1)?;
                        self.set_child(t2, side.other(), Some(sibling))?;
                        self.set_child(parent, side.other(), Some(t2))?;
                        if let Some(t1) = t1 {
                            self.set_parent_color(t1, Some(sibling), RB_BLACK)?;
                        }
                        tmp1 = Some(sibling);
                        sibling = t2;
                    }
                    _ => {
                        // Case 2 - sibling colour flip; then either the
                        // parent was red and turns black, or recurse at it.
                        self.set_parent_color(sibling, Some(parent), RB_RED)?;
                        if self.is_red(Some(parent))? {
                            self.set_black(parent)?;
                        } else {
                            node = Some(parent);
                            if let Some(p) = self.parent(parent)? {
                                parent = p;
                                continue;
                            }
                        }
                        return Ok(());
                    }
                }
            }

            // Case 4 - rotate at parent towards node, with colour flips.
            let tmp1 = Self::need(tmp1, "red far child of the sibling", sibling.0)?;
            let tmp2 = self.child(sibling, side)?;
            self.set_child(parent, side.other(), tmp2)?;
            self.set_child(sibling, side, Some(parent))?;
            self.set_parent_color(tmp1, Some(sibling), RB_BLACK)?;
            if let Some(t2) = tmp2 {
                self.set_parent(t2, parent)?;
            }
            self.rotate_set_parents(parent, sibling, RB_BLACK)?;
            return Ok(());
        }
        Err(TreeError::TooDeep { limit: MAX_DEPTH })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Address of the `struct rb_root` under test.
    const ROOT: u64 = 0xffff_ffff_8260_1008;
    /// A second, separate tree.
    const OTHER_ROOT: u64 = 0xffff_ffff_8260_2008;
    /// Where test nodes live (a node per 0x40 bytes, at +8 like a field).
    const BASE: u64 = 0xffff_c900_0010_0000;
    /// What fresh node memory holds, so `old` values are seen to be read.
    const GARBAGE: u64 = 0x5a5a_5a5a_5a5a_5a5a;

    /// Guest memory as a word map (absent words are unmapped) plus each
    /// node's key.
    struct Guest {
        mem: HashMap<u64, u64>,
        keys: HashMap<u64, u64>,
        next: u64,
    }

    impl TreeMem for Guest {
        fn read_u64(&self, va: u64) -> Result<u64, TreeError> {
            self.mem.get(&va).copied().ok_or(TreeError::Read {
                va,
                reason: "unmapped in the test map".into(),
            })
        }
    }

    /// xorshift64*: deterministic, dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = self.below(i + 1);
                v.swap(i, j);
            }
        }
    }

    impl Guest {
        fn new() -> Self {
            Guest {
                mem: HashMap::from([(ROOT, 0), (OTHER_ROOT, 0)]),
                keys: HashMap::new(),
                next: 0,
            }
        }

        /// A fresh node with `key`, its words holding `fill`.
        fn alloc_with(&mut self, key: u64, fill: u64) -> u64 {
            let va = BASE + self.next * 0x40 + 8;
            self.next += 1;
            for off in [PARENT_COLOR, RIGHT, LEFT] {
                self.mem.insert(va + off, fill);
            }
            self.keys.insert(va, key);
            va
        }

        fn alloc(&mut self, key: u64) -> u64 {
            self.alloc_with(key, GARBAGE)
        }

        fn try_insert(&self, root: u64, node: u64) -> Result<Edit, TreeError> {
            let keys = &self.keys;
            let key = |n: u64| {
                keys.get(&n).copied().ok_or(TreeError::Key {
                    node: n,
                    reason: "no key".into(),
                })
            };
            insert(self, root, node, &mut |a, b| Ok(key(a)? < key(b)?))
        }

        /// Checks the edit against memory (one entry per word, every `old`
        /// equal to memory now) and applies it.
        fn apply(&mut self, e: &Edit) {
            let mut vas = HashSet::new();
            for &(va, old, _) in e.writes() {
                assert!(vas.insert(va), "two entries for {va:#x}");
                assert_eq!(self.mem.get(&va), Some(&old), "old value at {va:#x}");
            }
            for &(va, _, new) in e.writes() {
                self.mem.insert(va, new);
            }
        }

        fn insert(&mut self, node: u64) -> Edit {
            let e = self.try_insert(ROOT, node).unwrap();
            // rb_link_node's three stores are in the edit, wherever
            // rebalancing left the node afterwards.
            for off in [PARENT_COLOR, RIGHT, LEFT] {
                assert!(e.writes().iter().any(|w| w.0 == node + off));
            }
            self.apply(&e);
            e
        }

        fn erase(&mut self, node: u64) -> Edit {
            let e = erase(self, ROOT, node).unwrap();
            self.apply(&e);
            e
        }

        fn word(&self, va: u64) -> u64 {
            self.mem[&va]
        }

        /// Checks every red-black and link invariant of the tree at `root`
        /// and returns its nodes in order.
        fn check(&self, root: u64) -> Vec<u64> {
            let mut out = Vec::new();
            let top = self.word(root);
            if top != 0 {
                assert_eq!(
                    self.word(top + PARENT_COLOR),
                    RB_BLACK,
                    "root black, no parent"
                );
                self.walk(top, 0, &mut out);
            }
            for w in out.windows(2) {
                assert!(self.keys[&w[0]] <= self.keys[&w[1]], "in-order keys sorted");
            }
            out
        }

        /// Returns the black height below `n` (inclusive).
        fn walk(&self, n: u64, parent: u64, out: &mut Vec<u64>) -> usize {
            assert!(out.len() < 100_000, "cycle");
            let pc = self.word(n + PARENT_COLOR);
            assert_eq!(pc & !1, parent, "parent pointer of {n:#x}");
            let red = pc & 1 == RB_RED;
            let (l, r) = (self.word(n + LEFT), self.word(n + RIGHT));
            for c in [l, r] {
                if red && c != 0 {
                    assert_eq!(self.word(c) & 1, RB_BLACK, "red {n:#x} has a red child");
                }
            }
            let lh = if l != 0 { self.walk(l, n, out) } else { 0 };
            out.push(n);
            let rh = if r != 0 { self.walk(r, n, out) } else { 0 };
            assert_eq!(lh, rh, "black heights under {n:#x}");
            lh + usize::from(!red)
        }
    }

    /// The expected in-order sequence: by key, equal keys in insertion order.
    fn sorted(g: &Guest, model: &[u64]) -> Vec<u64> {
        let mut v = model.to_vec();
        v.sort_by_cached_key(|n| g.keys[n]);
        v
    }

    /// Inserts `keys` one by one, then erases them in a random order,
    /// checking the whole tree after every step.
    fn insert_then_erase(keys: &[u64], rng: &mut Rng) {
        let mut g = Guest::new();
        let mut model = Vec::new();
        for &k in keys {
            let n = g.alloc(k);
            g.insert(n);
            model.push(n);
            assert_eq!(g.check(ROOT), sorted(&g, &model));
        }
        let mut order = model.clone();
        rng.shuffle(&mut order);
        for n in order {
            g.erase(n);
            model.retain(|&m| m != n);
            assert_eq!(g.check(ROOT), sorted(&g, &model));
        }
        assert_eq!(g.word(ROOT), 0);
    }

    #[test]
    fn sorted_reverse_and_random_orders() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for n in [1u64, 2, 3, 4, 5, 7, 8, 16, 33, 64, 200] {
            let up: Vec<u64> = (1..=n).collect();
            insert_then_erase(&up, &mut rng);
            let down: Vec<u64> = (1..=n).rev().collect();
            insert_then_erase(&down, &mut rng);
            for _ in 0..4 {
                let mut shuffled = up.clone();
                rng.shuffle(&mut shuffled);
                insert_then_erase(&shuffled, &mut rng);
            }
        }
    }

    #[test]
    fn equal_keys_go_after_existing_ones() {
        let mut rng = Rng(7);
        let keys: Vec<u64> = (0..150).map(|i| i % 7).collect();
        insert_then_erase(&keys, &mut rng);
        let mut shuffled = keys;
        rng.shuffle(&mut shuffled);
        insert_then_erase(&shuffled, &mut rng);
    }

    #[test]
    fn interleaved_inserts_and_erases() {
        let mut rng = Rng(0xdead_beef);
        let mut g = Guest::new();
        let mut model: Vec<u64> = Vec::new();
        for _ in 0..3000 {
            // Grow to about 100 nodes, then insert and erase evenly.
            if model.len() < 100 || rng.below(2) == 0 {
                let n = g.alloc(rng.next() % 500);
                g.insert(n);
                model.push(n);
            } else {
                let n = model.remove(rng.below(model.len()));
                g.erase(n);
            }
            assert_eq!(g.check(ROOT), sorted(&g, &model));
        }
    }

    #[test]
    fn small_shapes_match_the_kernel() {
        // 1, 2, 3 ascending: one left rotation at the root (insert case 3).
        let mut g = Guest::new();
        let n: Vec<u64> = (1..=3).map(|k| g.alloc(k)).collect();
        for &x in &n {
            g.insert(x);
        }
        assert_eq!(g.word(ROOT), n[1]);
        assert_eq!(g.word(n[1] + PARENT_COLOR), RB_BLACK);
        assert_eq!(g.word(n[1] + LEFT), n[0]);
        assert_eq!(g.word(n[1] + RIGHT), n[2]);
        assert_eq!(g.word(n[0] + PARENT_COLOR), n[1] | RB_RED);
        assert_eq!(g.word(n[2] + PARENT_COLOR), n[1] | RB_RED);

        // A fourth key flips colours (case 1): 1 and 3 black, 4 red.
        let four = g.alloc(4);
        g.insert(four);
        assert_eq!(g.word(n[0] + PARENT_COLOR), n[1] | RB_BLACK);
        assert_eq!(g.word(n[2] + PARENT_COLOR), n[1] | RB_BLACK);
        assert_eq!(g.word(four + PARENT_COLOR), n[2] | RB_RED);
        assert_eq!(g.word(n[2] + RIGHT), four);

        // Erasing the root (two children, successor 3 is its right child,
        // which has a child): 3 takes its place and colour, 4 goes black.
        let e = g.erase(n[1]);
        assert_eq!(g.word(ROOT), n[2]);
        assert_eq!(g.word(n[2] + PARENT_COLOR), RB_BLACK);
        assert_eq!(g.word(n[2] + LEFT), n[0]);
        assert_eq!(g.word(n[2] + RIGHT), four);
        assert_eq!(g.word(four + PARENT_COLOR), n[2] | RB_BLACK);
        assert_eq!(g.word(n[0] + PARENT_COLOR), n[2] | RB_BLACK);
        // rb_erase does not touch the erased node's own words.
        assert!(e
            .writes()
            .iter()
            .all(|w| w.0 < n[1] || w.0 >= n[1] + NODE_SIZE));
        g.check(ROOT);
    }

    #[test]
    fn latch_tree_nodes_in_two_trees() {
        // struct latch_tree_node { struct rb_node node[2]; }: node[i] of
        // every entry goes into tree[i]; a key lookup maps node[i] back to
        // its latch_tree_node by subtracting i * 24.
        let mut g = Guest::new();
        let mut rng = Rng(42);
        let mut entries = Vec::new();
        for _ in 0..50 {
            let ltn = g.alloc(rng.next() % 1000);
            for off in [24, 32, 40] {
                g.mem.insert(ltn + off, GARBAGE);
            }
            entries.push(ltn);
        }
        for (idx, root) in [(0u64, ROOT), (1, OTHER_ROOT)] {
            let keys = g.keys.clone();
            let key = |n: u64| Ok(keys[&(n - idx * NODE_SIZE)]);
            for &ltn in &entries {
                let e = insert(&g, root, ltn + idx * NODE_SIZE, &mut |a, b| {
                    Ok(key(a)? < key(b)?)
                })
                .unwrap();
                g.apply(&e);
            }
        }
        let tree0 = g.check(ROOT);
        assert_eq!(tree0, sorted(&g, &entries));
        // tree[1] holds node[1]s, in the same order.
        let mut out = Vec::new();
        g.walk(g.word(OTHER_ROOT), 0, &mut out);
        let back: Vec<u64> = out.iter().map(|n| n - NODE_SIZE).collect();
        assert_eq!(back, tree0);
        // node[0] is not in tree[1].
        assert!(matches!(
            erase(&g, OTHER_ROOT, entries[0]),
            Err(TreeError::NotInTree { .. })
        ));
    }

    fn build(keys: &[u64]) -> (Guest, Vec<u64>) {
        let mut g = Guest::new();
        let nodes: Vec<u64> = keys.iter().map(|&k| g.alloc(k)).collect();
        for &n in &nodes {
            g.insert(n);
        }
        g.check(ROOT);
        (g, nodes)
    }

    #[test]
    fn erase_refuses_nodes_not_in_the_tree() {
        let (mut g, nodes) = build(&(1..=20).collect::<Vec<_>>());

        // Never linked (zeroed, as the caller allocates it).
        let loose = g.alloc_with(99, 0);
        assert!(matches!(
            erase(&g, ROOT, loose),
            Err(TreeError::NotInTree { .. })
        ));

        // Claims a parent in the tree that does not point back.
        g.mem.insert(loose + PARENT_COLOR, nodes[3] | RB_BLACK);
        assert!(matches!(
            erase(&g, ROOT, loose),
            Err(TreeError::NotInTree { .. })
        ));

        // Linked into another tree.
        let e = g.try_insert(OTHER_ROOT, loose).unwrap();
        g.apply(&e);
        assert!(matches!(
            erase(&g, ROOT, loose),
            Err(TreeError::NotInTree { .. })
        ));
        assert!(erase(&g, OTHER_ROOT, loose).is_ok());

        // Erased already (its words still name its old parent).
        g.erase(nodes[5]);
        assert!(matches!(
            erase(&g, ROOT, nodes[5]),
            Err(TreeError::NotInTree { .. })
        ));

        // Inserting a node twice is refused too.
        assert!(matches!(
            g.try_insert(ROOT, nodes[7]),
            Err(TreeError::AlreadyInTree { .. })
        ));
        g.check(ROOT);
    }

    #[test]
    fn bad_arguments_are_refused() {
        let (g, nodes) = build(&[1, 2, 3]);
        assert!(matches!(erase(&g, ROOT, 0), Err(TreeError::Null { .. })));
        assert!(matches!(
            erase(&g, ROOT, nodes[0] + 4),
            Err(TreeError::BadPointer { .. })
        ));
        assert!(matches!(
            erase(&g, ROOT + 1, nodes[0]),
            Err(TreeError::BadPointer { .. })
        ));
        assert!(matches!(
            g.try_insert(ROOT, u64::MAX - 7),
            Err(TreeError::BadPointer { .. })
        ));
    }

    #[test]
    fn corrupt_trees_give_errors_not_hangs() {
        // A child pointer back up to the root: the descent sees a cycle.
        let (mut g, _) = build(&(1..=10).collect::<Vec<_>>());
        let mut n = g.word(ROOT);
        while g.word(n + RIGHT) != 0 {
            n = g.word(n + RIGHT);
        }
        g.mem.insert(n + RIGHT, g.word(ROOT));
        let big = g.alloc(1000);
        assert!(matches!(
            g.try_insert(ROOT, big),
            Err(TreeError::Cycle { .. })
        ));

        // Parent pointers in a loop: the membership walk sees a cycle.
        let (mut g, nodes) = build(&(1..=10).collect::<Vec<_>>());
        let top = g.word(ROOT);
        let (a, b) = (g.word(top + LEFT), g.word(top + RIGHT));
        g.mem.insert(top + PARENT_COLOR, a | RB_BLACK);
        g.mem.insert(a + LEFT, top);
        assert!(erase(&g, ROOT, b).is_err());
        assert!(nodes.iter().all(|&n| erase(&g, ROOT, n).is_err()));

        // A misaligned child pointer.
        let (mut g, _) = build(&[1, 2, 3]);
        let top = g.word(ROOT);
        g.mem.insert(top + LEFT, g.word(top + LEFT) | 4);
        let zero = g.alloc(0);
        assert!(matches!(
            g.try_insert(ROOT, zero),
            Err(TreeError::BadPointer {
                what: "rb_left",
                ..
            })
        ));

        // A child pointer into unmapped memory.
        let (mut g, _) = build(&[1, 2, 3]);
        let top = g.word(ROOT);
        g.mem.insert(top + LEFT, 0xffff_8880_dead_0000);
        g.keys.insert(0xffff_8880_dead_0000, 1);
        let zero = g.alloc(0);
        assert!(matches!(
            g.try_insert(ROOT, zero),
            Err(TreeError::Read { va, .. }) if (0xffff_8880_dead_0000..0xffff_8880_dead_0018).contains(&va)
        ));

        // A red root: inserting under it finds no grandparent (where the
        // C code would dereference NULL).
        let mut g = Guest::new();
        let r = g.alloc_with(10, 0);
        g.mem.insert(ROOT, r);
        let x = g.alloc(1);
        assert!(matches!(g.try_insert(ROOT, x), Err(TreeError::Null { .. })));

        // A 1000-node right spine (no cycle): too deep for any valid tree.
        let mut g = Guest::new();
        let spine: Vec<u64> = (0..1000).map(|k| g.alloc_with(k, 0)).collect();
        g.mem.insert(ROOT, spine[0]);
        g.mem.insert(spine[0] + PARENT_COLOR, RB_BLACK);
        for w in spine.windows(2) {
            g.mem.insert(w[0] + RIGHT, w[1]);
            g.mem.insert(w[1] + PARENT_COLOR, w[0] | RB_BLACK);
        }
        let last = g.alloc(5000);
        assert!(matches!(
            g.try_insert(ROOT, last),
            Err(TreeError::TooDeep { limit: MAX_DEPTH })
        ));
        assert!(matches!(
            erase(&g, ROOT, spine[999]),
            Err(TreeError::TooDeep { limit: MAX_DEPTH })
        ));

        // A failing key lookup is passed through.
        let (g, nodes) = build(&[1, 2, 3]);
        let r = insert(&g, ROOT, nodes[0] + 0x1000, &mut |a, _| {
            Err(TreeError::Key {
                node: a,
                reason: "test".into(),
            })
        });
        assert!(matches!(r, Err(TreeError::Key { .. })));
    }
}

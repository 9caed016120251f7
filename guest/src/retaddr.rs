//! Return addresses the guest kernel has hidden behind a trampoline.
//!
//! Three kernel mechanisms take a function's return address off the stack
//! and leave a trampoline's address in its slot: rethook
//! (`arch_rethook_trampoline`, which kretprobes and fprobes use when the
//! kernel has `CONFIG_KRETPROBE_ON_RETHOOK`, as Debian's 6.1 and 6.12 do),
//! kretprobes without rethook (`__kretprobe_trampoline`, earlier
//! `kretprobe_trampoline`) and the function-graph tracer
//! (`return_to_handler`). The real address waits in a per-task list until
//! the trampoline runs. A stack walk or scan that only reads the stack
//! therefore misses the return into the hooked function's caller: with a
//! kretprobe on `hrtimer_nanosleep`, a task sleeping there shows no return
//! into `common_nsleep`, and a transition that frees or replaces
//! `common_nsleep` would pass while the task will still return into it.
//! In-kernel livepatch avoids that in its own unwinder
//! (`unwind_recover_ret_addr`: rethook, kretprobe and ftrace-graph
//! lookups); this module reads the same lists from outside:
//!
//! - `task_struct.rethooks`: an llist of `struct rethook_node`
//!   (`ret_addr`, `frame` = the stack slot now holding the trampoline);
//! - `task_struct.kretprobe_instances`: an llist of
//!   `struct kretprobe_instance` (`ret_addr`, `fp` = the slot), on kernels
//!   whose kretprobes do not use rethook;
//! - `task_struct.ret_stack[0..=curr_ret_stack]`: up to 6.8 an array of
//!   `struct ftrace_ret_stack` (`ret`, `retp` = the slot). From 6.9 the
//!   same structs sit on a one-page shadow stack of words, each frame
//!   topped by a word whose low 10 bits give the distance down to it
//!   (`FGRAPH_FRAME_OFFSET_MASK`); `curr_ret_stack` is the index of the
//!   first free word. That encoding is in no BTF; it is read as the
//!   kernel's own `get_ret_stack` walks it, with the struct's layout from
//!   BTF, and any word that does not fit it makes the task's hidden
//!   returns unrecoverable.
//!
//! Every layout comes from the guest's BTF, and every read is bounded:
//! lists longer than [`MAX_HOOKED`] nodes, pointers that are no kernel
//! address and unreadable nodes make the task's hidden returns
//! unrecoverable, which the safe-point check turns into a blocker (unknown
//! means unsafe), never into silence.

use crate::{Btf, Kallsyms, VirtRead};

/// The most hooked returns read for one task and one mechanism. A task
/// has at most one per frame on its stack (a 16 KiB stack holds well under
/// 512 frames; the function-graph array has 50 entries), so a longer list
/// is corrupt or changing: it blocks.
pub const MAX_HOOKED: usize = 512;

/// The mechanism that hid a return address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookKind {
    /// rethook (kretprobes on rethook kernels, fprobe exit handlers).
    Rethook,
    /// kretprobes without rethook.
    Kretprobe,
    /// The function-graph tracer.
    Fgraph,
}

/// One task's hooked return: where the task will really return, and the
/// stack slot that holds the trampoline's address meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hooked {
    /// The mechanism.
    pub kind: HookKind,
    /// The trampoline's symbol.
    pub trampoline: &'static str,
    /// The real return address.
    pub ret: u64,
    /// The stack slot where the real address was (`frame`, `fp`, `retp`).
    pub slot: u64,
}

/// Why a task's hooked returns cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The guest's BTF does not describe this mechanism's per-task data
    /// in a layout this module reads (the trampoline exists, though).
    UnknownLayout,
    /// The list has more than [`MAX_HOOKED`] nodes (or loops).
    TooLong,
    /// A pointer in the list is not a kernel address.
    BadPointer(u64),
    /// Memory at this address cannot be read.
    Unreadable(u64),
    /// The function-graph index is outside the array.
    BadIndex(i64),
    /// A function-graph shadow-stack word at this index does not lead to
    /// a frame below it.
    BadFrame(i64),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Why::UnknownLayout => write!(
                f,
                "where it keeps the real return addresses is not known for this kernel (its BTF \
                 has no layout klpvisor reads)"
            ),
            Why::TooLong => write!(f, "its list has more than {MAX_HOOKED} entries (corrupt?)"),
            Why::BadPointer(p) => write!(f, "its list holds {p:#x}, not a kernel address"),
            Why::Unreadable(a) => write!(f, "its list at {a:#x} cannot be read"),
            Why::BadIndex(i) => write!(f, "its return-stack index is {i}"),
            Why::BadFrame(i) => write!(
                f,
                "its shadow stack's word {i} does not lead to a frame below it (corrupt?)"
            ),
        }
    }
}

/// A mechanism whose hooked returns of one task could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrecoverable {
    /// The mechanism.
    pub kind: HookKind,
    /// Its trampoline's symbol.
    pub trampoline: &'static str,
    /// Why.
    pub why: Why,
}

/// Where a mechanism keeps a task's real return addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// An llist whose head (`first`) is at `head` in task_struct; each node
    /// is the `llist_node` at `node` inside a struct with the real address
    /// at `ret` and the slot at `slot`.
    List {
        head: u64,
        node: u64,
        ret: u64,
        slot: u64,
    },
    /// `task_struct.ret_stack` (at `array`, a pointer to `size`-byte
    /// entries with the real address at `ret` and the slot at `slot`) and
    /// the index of its top entry (`int`, at `top`; -1 when empty).
    Array {
        array: u64,
        top: u64,
        size: u64,
        ret: u64,
        slot: u64,
    },
    /// 6.9+'s function-graph shadow stack: `task_struct.ret_stack` (at
    /// `array`) points to a page of words, `curr_ret_stack` (`int`, at
    /// `top`) is the first free one, and each `frame_words`-word
    /// `ftrace_ret_stack` (real address at `ret`, slot at `slot`, both
    /// byte offsets) lies under the word whose low bits give its distance.
    Shadow {
        array: u64,
        top: u64,
        frame_words: u64,
        ret: u64,
        slot: u64,
    },
}

/// The words of a function-graph shadow stack (`SHADOW_STACK_SIZE`, one
/// 4 KiB page, in `unsigned long`s): no index can be beyond it.
pub const SHADOW_STACK_WORDS: usize = 512;

/// `FGRAPH_FRAME_OFFSET_MASK`: the low bits of a shadow-stack word that
/// give the distance, in words, down to its frame.
const FGRAPH_FRAME_OFFSET_MASK: u64 = (1 << 10) - 1;

/// One mechanism the kernel has: its trampoline and, if known, its layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    kind: HookKind,
    trampoline: &'static str,
    addr: u64,
    /// `None`: the trampoline exists but the per-task data is not in a
    /// layout read here; a task whose stack shows the trampoline blocks.
    layout: Option<Layout>,
}

#[cfg(test)]
impl Hook {
    /// A mechanism with a list layout (the offsets do not matter to tests
    /// that give the task's hooked returns themselves).
    pub(crate) fn for_test(kind: HookKind, trampoline: &'static str, addr: u64) -> Self {
        Self {
            kind,
            trampoline,
            addr,
            layout: Some(Layout::List {
                head: 0,
                node: 0,
                ret: 8,
                slot: 16,
            }),
        }
    }
}

/// Every return-hooking mechanism of a guest kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReturnHooks {
    hooks: Vec<Hook>,
}

/// The hooked returns of one task, and what could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskHooks {
    /// Every hooked return read, innermost first within each mechanism.
    pub hooked: Vec<Hooked>,
    /// Mechanisms whose lists could not be read for this task.
    pub unrecoverable: Vec<Unrecoverable>,
}

/// Whether `p` can be a pointer to a kernel object: the upper half of a
/// 5-level address space (which includes 4-level's), 8-byte aligned as
/// every node here is.
fn is_kernel_ptr(p: u64) -> bool {
    p >= 0xff00_0000_0000_0000 && p % 8 == 0
}

impl ReturnHooks {
    /// The mechanisms `kallsyms` has trampolines for, each with its layout
    /// from `btf` where it has one.
    pub fn from_kernel(kallsyms: &Kallsyms, btf: &Btf) -> Self {
        let off = |p: &str| btf.offset_of(p).ok();
        let list = |head: &str, node: &str, ret: &str, slot: &str| {
            Some(Layout::List {
                head: off(head)?,
                node: off(node)?,
                ret: off(ret)?,
                slot: off(slot)?,
            })
        };
        let mut hooks = Vec::new();
        let mut add = |kind, names: &[&'static str], layout: Option<Layout>| {
            for &name in names {
                if let Ok(addr) = kallsyms.addr(name) {
                    hooks.push(Hook {
                        kind,
                        trampoline: name,
                        addr,
                        layout,
                    });
                    return;
                }
            }
        };
        add(
            HookKind::Rethook,
            &["arch_rethook_trampoline"],
            list(
                "task_struct.rethooks",
                "rethook_node.llist",
                "rethook_node.ret_addr",
                "rethook_node.frame",
            ),
        );
        add(
            HookKind::Kretprobe,
            &["__kretprobe_trampoline", "kretprobe_trampoline"],
            list(
                "task_struct.kretprobe_instances",
                "kretprobe_instance.llist",
                "kretprobe_instance.ret_addr",
                "kretprobe_instance.fp",
            ),
        );
        add(HookKind::Fgraph, &["return_to_handler"], fgraph_array(btf));
        Self { hooks }
    }

    /// Builds the hooks from parts (synthetic guests in tests).
    #[cfg(test)]
    pub(crate) fn with(hooks: Vec<Hook>) -> Self {
        Self { hooks }
    }

    /// Whether the kernel has no return-hooking mechanism at all.
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// The trampoline whose address `addr` is (exactly: each mechanism
    /// stores its trampoline's own address in the slot).
    pub fn trampoline_at(&self, addr: u64) -> Option<(HookKind, &'static str)> {
        self.hooks
            .iter()
            .find(|h| h.addr == addr)
            .map(|h| (h.kind, h.trampoline))
    }

    /// Whether the trampoline at `addr` belongs to a mechanism whose
    /// per-task data cannot be read on this kernel.
    pub fn layout_unknown(&self, addr: u64) -> bool {
        self.hooks
            .iter()
            .any(|h| h.addr == addr && h.layout.is_none())
    }

    /// The hooked returns of the task whose task_struct is at `task`, and
    /// the mechanisms whose lists could not be read.
    pub fn of_task<M: VirtRead + ?Sized>(&self, mem: &M, task: u64) -> TaskHooks {
        let mut out = TaskHooks::default();
        for h in &self.hooks {
            let Some(layout) = h.layout else { continue };
            let got = match layout {
                Layout::List {
                    head,
                    node,
                    ret,
                    slot,
                } => read_list(mem, task.wrapping_add(head), node, ret, slot),
                Layout::Array {
                    array,
                    top,
                    size,
                    ret,
                    slot,
                } => read_array(mem, task, array, top, size, ret, slot),
                Layout::Shadow {
                    array,
                    top,
                    frame_words,
                    ret,
                    slot,
                } => read_shadow(mem, task, array, top, frame_words, ret, slot),
            };
            match got {
                Ok(pairs) => out.hooked.extend(
                    pairs
                        .into_iter()
                        .map(|(r, s)| Hooked {
                            kind: h.kind,
                            trampoline: h.trampoline,
                            ret: r,
                            slot: s,
                        })
                        // An entry holding the trampoline itself is a second
                        // hook on a slot already hooked: the kernel skips it
                        // (`__rethook_find_ret_addr`), the real address is in
                        // an older entry.
                        .filter(|x| x.ret != h.addr),
                ),
                Err(why) => out.unrecoverable.push(Unrecoverable {
                    kind: h.kind,
                    trampoline: h.trampoline,
                    why,
                }),
            }
        }
        out
    }
}

impl TaskHooks {
    /// The real return address behind the trampoline `kind` left in stack
    /// slot `slot`, as the kernel's unwinder finds it (the entry whose
    /// slot is `slot`); `None` if the task has none.
    pub fn recover(&self, kind: HookKind, slot: u64) -> Option<u64> {
        self.hooked
            .iter()
            .find(|h| h.kind == kind && h.slot == slot)
            .map(|h| h.ret)
    }
}

/// The function-graph layout: up to 6.8 `task_struct.ret_stack` points
/// to `struct ftrace_ret_stack` entries (`ret`, `retp`); from 6.9 to
/// `unsigned long` words of a shadow stack holding those structs. `None`
/// for anything else.
fn fgraph_array(btf: &Btf) -> Option<Layout> {
    let field = btf.field("task_struct.ret_stack").ok()?;
    match btf.pointee_name(&field).as_deref() {
        Some("ftrace_ret_stack") => {}
        Some("long unsigned int") => {
            let size = btf.struct_size("ftrace_ret_stack").ok()?;
            let ret = btf.offset_of("ftrace_ret_stack.ret").ok()?;
            let slot = btf.offset_of("ftrace_ret_stack.retp").ok()?;
            // Whole words, as the kernel's BUILD_BUG_ON requires, and both
            // fields inside.
            let word = |o: u64| o % 8 == 0 && o + 8 <= size;
            if size == 0 || size % 8 != 0 || size > 256 || !word(ret) || !word(slot) {
                return None;
            }
            return Some(Layout::Shadow {
                array: field.byte_offset()?,
                top: btf.offset_of("task_struct.curr_ret_stack").ok()?,
                frame_words: size / 8,
                ret,
                slot,
            });
        }
        _ => return None,
    }
    Some(Layout::Array {
        array: field.byte_offset()?,
        top: btf.offset_of("task_struct.curr_ret_stack").ok()?,
        size: btf.struct_size("ftrace_ret_stack").ok()?,
        ret: btf.offset_of("ftrace_ret_stack.ret").ok()?,
        slot: btf.offset_of("ftrace_ret_stack.retp").ok()?,
    })
}

/// (real address, slot) of each node of the llist whose `first` pointer
/// is at `head`, bounded and checked.
fn read_list<M: VirtRead + ?Sized>(
    mem: &M,
    head: u64,
    node: u64,
    ret: u64,
    slot: u64,
) -> Result<Vec<(u64, u64)>, Why> {
    let read = |a: u64| mem.read_u64(a).map_err(|_| Why::Unreadable(a));
    let mut out = Vec::new();
    let mut at = read(head)?;
    while at != 0 {
        if out.len() >= MAX_HOOKED {
            return Err(Why::TooLong);
        }
        if !is_kernel_ptr(at) {
            return Err(Why::BadPointer(at));
        }
        let base = at.wrapping_sub(node);
        out.push((
            read(base.wrapping_add(ret))?,
            read(base.wrapping_add(slot))?,
        ));
        at = read(at)?;
    }
    Ok(out)
}

/// `task_struct.curr_ret_stack` (an `int` at `top`) of the task at `task`.
fn read_curr_ret_stack<M: VirtRead + ?Sized>(mem: &M, task: u64, top: u64) -> Result<i32, Why> {
    let at = task.wrapping_add(top);
    let mut b = [0u8; 4];
    mem.read_virt(at, &mut b).map_err(|_| Why::Unreadable(at))?;
    Ok(i32::from_le_bytes(b))
}

/// `task_struct.ret_stack` (a pointer at `array`) of the task at `task`:
/// `None` when the task has none, which means nothing is hooked (the
/// tracer hooks a return only once the task has one; `function_graph_enter`
/// refuses otherwise).
fn read_ret_stack<M: VirtRead + ?Sized>(
    mem: &M,
    task: u64,
    array: u64,
) -> Result<Option<u64>, Why> {
    let p = task.wrapping_add(array);
    let base = mem.read_u64(p).map_err(|_| Why::Unreadable(p))?;
    if base == 0 {
        return Ok(None);
    }
    if !is_kernel_ptr(base) {
        return Err(Why::BadPointer(base));
    }
    Ok(Some(base))
}

/// (real address, slot) of entries `0..=top` of the function-graph array.
fn read_array<M: VirtRead + ?Sized>(
    mem: &M,
    task: u64,
    array: u64,
    top: u64,
    size: u64,
    ret: u64,
    slot: u64,
) -> Result<Vec<(u64, u64)>, Why> {
    let top = read_curr_ret_stack(mem, task, top)?;
    if top < 0 {
        return Ok(Vec::new());
    }
    let n = usize::try_from(top).map_err(|_| Why::BadIndex(top.into()))? + 1;
    if n > MAX_HOOKED || size == 0 || size > 256 {
        return Err(Why::BadIndex(top.into()));
    }
    let Some(base) = read_ret_stack(mem, task, array)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let e = base.wrapping_add(i * size);
        let r = mem
            .read_u64(e.wrapping_add(ret))
            .map_err(|_| Why::Unreadable(e))?;
        let s = mem
            .read_u64(e.wrapping_add(slot))
            .map_err(|_| Why::Unreadable(e))?;
        out.push((r, s));
    }
    Ok(out)
}

/// (real address, slot) of each frame on a 6.9+ function-graph shadow
/// stack, innermost first, walked as the kernel's `get_ret_stack` walks
/// it: from `curr_ret_stack` down, each word below the current index
/// gives the distance to its frame, and the walk goes on from that frame.
/// The words are read in one piece (at most a page), every distance must
/// lead strictly down and leave the whole frame below the top, so the
/// walk ends within [`SHADOW_STACK_WORDS`] steps.
fn read_shadow<M: VirtRead + ?Sized>(
    mem: &M,
    task: u64,
    array: u64,
    top: u64,
    frame_words: u64,
    ret: u64,
    slot: u64,
) -> Result<Vec<(u64, u64)>, Why> {
    let top = read_curr_ret_stack(mem, task, top)?;
    // 0 (and, before a task's first call, -1): nothing hooked.
    if top <= 0 {
        return Ok(Vec::new());
    }
    let n = usize::try_from(top).map_err(|_| Why::BadIndex(top.into()))?;
    if n > SHADOW_STACK_WORDS {
        return Err(Why::BadIndex(top.into()));
    }
    let Some(base) = read_ret_stack(mem, task, array)? else {
        return Ok(Vec::new());
    };
    let mut bytes = vec![0u8; n * 8];
    mem.read_virt(base, &mut bytes)
        .map_err(|_| Why::Unreadable(base))?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let fw = usize::try_from(frame_words).map_err(|_| Why::BadIndex(top.into()))?;
    let (ret_w, slot_w) = (ret as usize / 8, slot as usize / 8);
    let mut out = Vec::new();
    let mut i = n;
    while i > 0 {
        let below = i - 1;
        let offs = usize::try_from(word(below) & FGRAPH_FRAME_OFFSET_MASK).unwrap_or(0);
        if offs == 0 || offs > below {
            return Err(Why::BadFrame(below as i64));
        }
        let frame = below - offs;
        if frame + fw > below {
            return Err(Why::BadFrame(below as i64));
        }
        out.push((word(frame + ret_w), word(frame + slot_w)));
        i = frame;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::synth::BtfBuilder;

    /// Memory of 8-byte words (zero elsewhere).
    struct Words(Vec<(u64, u64)>);

    impl VirtRead for Words {
        fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), crate::PagingError> {
            for (i, chunk) in buf.chunks_mut(8).enumerate() {
                let at = va + 8 * i as u64;
                let v = self.0.iter().find(|w| w.0 == at).map_or(0, |w| w.1);
                chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
            }
            Ok(())
        }
    }

    /// task_struct { ret_stack at 0x40; int curr_ret_stack at 0x48 },
    /// ret_stack pointing to 6.1's struct ftrace_ret_stack (ret, func,
    /// calltime, subtime, fp, retp: 48 bytes) or to unsigned long (6.9+).
    fn fgraph_btf(structs: bool) -> Btf {
        let mut b = BtfBuilder::new();
        let ulong = b.int("long unsigned int", 8);
        let int = b.int("int", 4);
        let entry = b.composite(
            false,
            "ftrace_ret_stack",
            48,
            &[("ret", ulong, 0, 0), ("retp", ulong, 320, 0)],
        );
        let ptr = b.ptr(if structs { entry } else { ulong });
        b.composite(
            false,
            "task_struct",
            0x100,
            &[
                ("ret_stack", ptr, 0x40 * 8, 0),
                ("curr_ret_stack", int, 0x48 * 8, 0),
            ],
        );
        Btf::parse(&b.build()).unwrap()
    }

    #[test]
    fn the_function_graph_array_is_read_only_in_its_known_layout() {
        assert_eq!(
            fgraph_array(&fgraph_btf(true)),
            Some(Layout::Array {
                array: 0x40,
                top: 0x48,
                size: 48,
                ret: 0,
                slot: 40
            })
        );
        // 6.9+'s shadow stack of words holding the same structs.
        assert_eq!(
            fgraph_array(&fgraph_btf(false)),
            Some(Layout::Shadow {
                array: 0x40,
                top: 0x48,
                frame_words: 6,
                ret: 0,
                slot: 40
            })
        );
        let hooks = ReturnHooks::with(vec![Hook {
            kind: HookKind::Fgraph,
            trampoline: "return_to_handler",
            addr: 0x2000,
            layout: fgraph_array(&fgraph_btf(true)),
        }]);
        let task = 0xffff_8880_0000_1000;
        let arr = 0xffff_8880_0002_0000;
        // curr_ret_stack 1: entries 0 and 1.
        let mem = Words(vec![
            (task + 0x40, arr),
            (task + 0x48, 1),
            (arr, 0x1111),
            (arr + 40, 0x8ff0),
            (arr + 48, 0x2222),
            (arr + 88, 0x8f00),
            (arr + 96, 0x3333),
        ]);
        let th = hooks.of_task(&mem, task);
        assert!(th.unrecoverable.is_empty(), "{th:?}");
        let got: Vec<(u64, u64)> = th.hooked.iter().map(|h| (h.ret, h.slot)).collect();
        assert_eq!(got, vec![(0x1111, 0x8ff0), (0x2222, 0x8f00)]);
        assert_eq!(th.recover(HookKind::Fgraph, 0x8f00), Some(0x2222));
        assert_eq!(th.recover(HookKind::Rethook, 0x8f00), None);
        // -1: nothing hooked; an index past any real depth: blocks.
        let empty = Words(vec![(task + 0x48, u64::from(u32::MAX))]);
        assert_eq!(hooks.of_task(&empty, task), TaskHooks::default());
        let huge = Words(vec![(task + 0x40, arr), (task + 0x48, 100_000)]);
        assert_eq!(
            hooks.of_task(&huge, task).unrecoverable[0].why,
            Why::BadIndex(100_000)
        );
    }

    /// 6.12's shadow stack, as `function_graph_enter` leaves it: frame A
    /// (6 words) at 0, its bitmap word at 6; frame B at 7, its bitmap word
    /// at 13, one word of data an fgraph_ops reserved at 14 and the data's
    /// word on top at 15, whose distance (8) spans the data and the
    /// bitmap; curr_ret_stack 16. The walk finds B then A; forged
    /// distances block.
    #[test]
    fn the_function_graph_shadow_stack_is_walked_as_the_kernel_walks_it() {
        let layout = fgraph_array(&fgraph_btf(false));
        let hooks = ReturnHooks::with(vec![Hook {
            kind: HookKind::Fgraph,
            trampoline: "return_to_handler",
            addr: 0x2000,
            layout,
        }]);
        let task = 0xffff_8880_0000_1000;
        let stack = 0xffff_8880_0003_0000;
        let bitmap = |offs: u64| (1 << 12) | (1 << 10) | offs;
        let mut words = vec![
            (task + 0x40, stack),
            (task + 0x48, 16),
            // Frame A: ret, ..., retp.
            (stack, 0xa1),
            (stack + 40, 0x8ff0),
            (stack + 6 * 8, bitmap(6)),
            // Frame B.
            (stack + 7 * 8, 0xb1),
            (stack + 7 * 8 + 40, 0x8f00),
            (stack + 13 * 8, bitmap(6)),
            (stack + 14 * 8, 0xdada),
            (stack + 15 * 8, (2 << 10) | 8),
        ];
        let th = hooks.of_task(&Words(words.clone()), task);
        assert!(th.unrecoverable.is_empty(), "{th:?}");
        let got: Vec<(u64, u64)> = th.hooked.iter().map(|h| (h.ret, h.slot)).collect();
        assert_eq!(got, vec![(0xb1, 0x8f00), (0xa1, 0x8ff0)]);
        assert_eq!(th.recover(HookKind::Fgraph, 0x8ff0), Some(0xa1));
        // Empty: curr_ret_stack 0 or -1.
        let empty = Words(vec![(task + 0x40, stack), (task + 0x48, 0)]);
        assert_eq!(hooks.of_task(&empty, task), TaskHooks::default());
        // A distance of 0 would loop; one past the bottom, or one that
        // leaves no room for a frame under the word, is forged.
        for (top_word, why) in [(0u64, 15i64), (16, 15), (4, 15)] {
            words.retain(|w| w.0 != stack + 15 * 8);
            words.push((stack + 15 * 8, (2 << 10) | top_word));
            assert_eq!(
                hooks.of_task(&Words(words.clone()), task).unrecoverable[0].why,
                Why::BadFrame(why),
                "distance {top_word}"
            );
        }
        // More words than a shadow stack has.
        let huge = Words(vec![(task + 0x40, stack), (task + 0x48, 513)]);
        assert_eq!(
            hooks.of_task(&huge, task).unrecoverable[0].why,
            Why::BadIndex(513)
        );
    }

    /// A list is read to its end, bounded: a loop or a forged pointer is
    /// an error, never an endless walk.
    #[test]
    fn lists_are_bounded_and_checked() {
        let head = 0xffff_8880_0000_1000;
        let n1 = 0xffff_8880_0001_0000;
        let n2 = 0xffff_8880_0002_0000;
        // llist at +16, ret at +32, slot at +40.
        let mut w = vec![
            (head, n1 + 16),
            (n1 + 16, n2 + 16),
            (n1 + 32, 0xa),
            (n1 + 40, 0xb),
            (n2 + 32, 0xc),
            (n2 + 40, 0xd),
        ];
        assert_eq!(
            read_list(&Words(w.clone()), head, 16, 32, 40),
            Ok(vec![(0xa, 0xb), (0xc, 0xd)])
        );
        w.push((n2 + 16, n1 + 16));
        assert_eq!(read_list(&Words(w), head, 16, 32, 40), Err(Why::TooLong));
        let forged = Words(vec![(head, 0x1234)]);
        assert_eq!(
            read_list(&forged, head, 16, 32, 40),
            Err(Why::BadPointer(0x1234))
        );
    }
}

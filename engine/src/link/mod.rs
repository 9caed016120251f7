//! Linking a parsed module for chosen guest virtual addresses.
//!
//! The caller learns the segment sizes first ([`Module::layout`]), picks
//! page-aligned addresses in the arena (text RX, rodata R, data RW), then
//! calls [`link`], which resolves the old functions and every external
//! symbol against the guest's kallsyms ([`resolve`]), applies every
//! relocation for those addresses ([`reloc`]), turns the `call __fentry__`
//! sites into 5-byte nops and points the `jmp __x86_return_thunk` sites at
//! the guest's return thunk. Nothing is written to the guest here: the
//! result is bytes plus addresses.
//!
//! ```ignore
//! let layout = module.layout();
//! let bases = Bases { text, rodata, data, percpu }; // caller allocates
//! let linked = link(&module, &kernel.kallsyms, bases, &LinkOptions::default())?;
//! ```

pub mod alternatives;
pub mod reloc;
pub mod resolve;

pub use resolve::GuestSymbols;

use std::collections::HashMap;

use crate::module::{CodeRef, Module, Place, RelocKind, Segment, SymbolDef, PAGE};
use alternatives::{AltError, GuestCpu};
use klpvisor_guest::{Kallsyms, VirtRead};
use reloc::RelocProblem;

/// The 5-byte nop the kernel's ftrace writes over `call __fentry__`
/// (x86_nops[5]: `nopl 0x0(%rax,%rax,1)`).
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// One symbol that could not be resolved, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// The module's symbol name.
    pub name: String,
    /// Why kallsyms (or the module's symbols) gave no single address.
    pub reason: String,
}

/// Why a module cannot be linked into this guest.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A vmlinux `klp_func.old_name` is not in kallsyms.
    #[error("the function `{name}` to patch is not in the guest kernel's kallsyms")]
    OldFunctionNotFound {
        /// `klp_func.old_name`.
        name: String,
    },
    /// A vmlinux `old_name` occurs several times and `old_sympos` is 0.
    #[error(
        "the function `{name}` to patch is ambiguous: the guest kernel has {} of that name ({}); \
         set .old_sympos to pick one",
        candidates.len(),
        candidates.iter().map(|(p, a)| format!("sympos {p} at {a:#x}")).collect::<Vec<_>>().join(", ")
    )]
    OldFunctionAmbiguous {
        /// `klp_func.old_name`.
        name: String,
        /// (sympos, address) of each candidate, in kallsyms order.
        candidates: Vec<(u32, u64)>,
    },
    /// A vmlinux `old_sympos` past the symbols of that name.
    #[error(
        "the function `{name}` to patch has .old_sympos = {sympos}, but the guest kernel has \
         {count} function(s) of that name"
    )]
    OldFunctionNoSuchPosition {
        /// `klp_func.old_name`.
        name: String,
        /// `klp_func.old_sympos`.
        sympos: u64,
        /// How many symbols have the name.
        count: usize,
    },
    /// A module object's `old_name` is not in that loaded module's symbols.
    #[error("the function `{name}` to patch is not in module `{module}`'s kallsyms")]
    ModuleFunctionNotFound {
        /// The guest module.
        module: String,
        /// `klp_func.old_name`.
        name: String,
    },
    /// A module object's `old_name` occurs several times and `old_sympos` is 0.
    #[error(
        "the function `{name}` to patch is ambiguous: module `{module}` has {} of that name \
         ({}); set .old_sympos to pick one",
        candidates.len(),
        candidates.iter().map(|(p, a)| format!("sympos {p} at {a:#x}")).collect::<Vec<_>>().join(", ")
    )]
    ModuleFunctionAmbiguous {
        /// The guest module.
        module: String,
        /// `klp_func.old_name`.
        name: String,
        /// (sympos, address) of each candidate, in the module's table order.
        candidates: Vec<(u32, u64)>,
    },
    /// A module object's `old_sympos` past the symbols of that name.
    #[error(
        "the function `{name}` to patch has .old_sympos = {sympos}, but module `{module}` has \
         {count} symbol(s) of that name"
    )]
    ModuleFunctionNoSuchPosition {
        /// The guest module.
        module: String,
        /// `klp_func.old_name`.
        name: String,
        /// `klp_func.old_sympos`.
        sympos: u64,
        /// How many symbols have the name.
        count: usize,
    },
    /// External symbols the guest cannot resolve, each with the reason.
    #[error(
        "{} symbol(s) cannot be resolved in the guest kernel:\n{}",
        .0.len(),
        .0.iter().map(|u| format!("  {}: {}", u.name, u.reason)).collect::<Vec<_>>().join("\n")
    )]
    Unresolved(Vec<Unresolved>),
    /// The chosen segment addresses are unaligned, wrap or overlap.
    #[error("segment addresses: {0}")]
    BadBases(String),
    /// A relocated value does not fit its field (a 32-bit field needs the
    /// target within 2 GiB).
    #[error(
        "relocation {kind:?} at {at} (address {place:#x}) to {target:#x} does not fit: value \
         {value:#x} (is the arena within 2 GiB of the kernel image?)"
    )]
    Overflow {
        /// The place in the module (section+offset), for the message.
        at: String,
        /// The relocation type.
        kind: RelocKind,
        /// Kernel-virtual address of the field.
        place: u64,
        /// Kernel-virtual address of the symbol (S).
        target: u64,
        /// The value that did not fit.
        value: u64,
    },
    /// A PC-relative reference to a per-CPU variable that rel32 cannot
    /// reach from the code: `%gs:var(%rip)` would address another offset.
    #[error(
        "{at} reaches the per-CPU variable {symbol} PC-relatively (as this_cpu_* accesses \
         compile to %gs:var(%rip)), but its per-CPU address {target:#x} is not within 2 GiB of \
         the code at {place:#x}: the access cannot be linked to it (the kernel's loader \
         refuses such a relocation too)"
    )]
    PerCpuOutOfReach {
        /// The place in the module (function+offset).
        at: String,
        /// The variable (or `.data..percpu+offset`).
        symbol: String,
        /// Kernel-virtual address of the field.
        place: u64,
        /// The variable's per-CPU address.
        target: u64,
    },
    /// The field to relocate already holds non-zero bytes.
    #[error("relocation at {at}: the field is not zero before relocation (corrupt module?)")]
    NotZero {
        /// The place in the module (section+offset).
        at: String,
    },
    /// `.altinstructions` cannot be applied for this guest's CPU.
    #[error(transparent)]
    Alternatives(#[from] AltError),
    /// A klpvisor bug, or a guest read the link needed failed.
    #[error("internal link error: {0}")]
    Internal(String),
}

/// Where the caller put each segment (guest virtual, page-aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bases {
    /// Kernel-virtual start of the text segment.
    pub text: u64,
    /// Kernel-virtual start of the rodata segment.
    pub rodata: u64,
    /// Kernel-virtual start of the data segment.
    pub data: u64,
    /// The per-CPU address of the patch's per-CPU block (what the guest's
    /// `__alloc_reserved_percpu` returned): the base of every symbol in
    /// `.data..percpu`, as `simplify_symbols` adds `mod->percpu`. 0 when
    /// the module has no per-CPU data, or before the block is allocated
    /// (a link that is only planned, never written). References to them
    /// are relocated as the kernel relocates them: absolute ones get the
    /// per-CPU address, and PC-relative ones (`%gs:var(%rip)`) reach it
    /// through the 64-bit wrap of rip + rel32, or are refused
    /// ([`LinkError::PerCpuOutOfReach`]) where rel32 cannot reach it.
    pub percpu: u64,
}

impl Bases {
    /// The start of `segment`.
    pub fn of(&self, segment: Segment) -> u64 {
        match segment {
            Segment::Text => self.text,
            Segment::Rodata => self.rodata,
            Segment::Data => self.data,
        }
    }
}

/// Facts about the guest that change what the kernel's loader would write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkOptions {
    /// The guest's `x86_return_thunk` (the thunk its return sites jump to);
    /// `None` leaves `jmp __x86_return_thunk` as compiled. Read it with
    /// [`guest_return_thunk`].
    pub return_thunk: Option<u64>,
    /// Write `ret; int3 x4` over each `jmp __x86_return_thunk` instead, as
    /// the kernel's apply_returns() does when X86_FEATURE_RETHUNK is off.
    /// Decide it with [`guest_plain_returns`].
    pub plain_returns: bool,
    /// The guest's CPU features and alternative rules, which a patch with
    /// `.altinstructions` needs (its link fails without them). Read them
    /// with [`alternatives::guest_cpu`] when [`alternatives::used_by`].
    pub alternatives: Option<GuestCpu>,
}

/// Whether the guest wants plain `ret`s at return sites. The kernel's
/// apply_returns() points every `jmp __x86_return_thunk` at
/// `x86_return_thunk` when X86_FEATURE_RETHUNK is set, and writes `ret`
/// over it otherwise. Since the kernel commit "x86/retpoline: Ensure
/// default return thunk isn't used at runtime", the default
/// `__x86_return_thunk` is a `jmp warn_thunk_thunk` (a WARN on its first
/// use) rather than a `ret`, so a site left pointing at it (6.12 on a CPU
/// that needs no return thunk) warns. The feature bit's number is not in
/// BTF, so the guest's memory decides: `thunk` (its `x86_return_thunk`) is
/// the default one, and the default does not start with `ret` (0xc3). On
/// kernels whose default thunk is a `ret` (Debian's 6.1) nothing changes.
pub fn guest_plain_returns<M: VirtRead + ?Sized>(
    mem: &M,
    kallsyms: &Kallsyms,
    thunk: Option<u64>,
) -> bool {
    let Ok(default) = kallsyms.addr("__x86_return_thunk") else {
        return false;
    };
    let mut first = [0u8; 1];
    thunk == Some(default) && mem.read_virt(default, &mut first).is_ok() && first[0] != 0xc3
}

/// Reads the guest's `x86_return_thunk` pointer (6.1 stable: set by the
/// retbleed/SRSO mitigation choice, `__x86_return_thunk` by default).
/// `None` when the kernel has no such variable.
pub fn guest_return_thunk<M: VirtRead + ?Sized>(
    mem: &M,
    kallsyms: &Kallsyms,
) -> Result<Option<u64>, LinkError> {
    let Ok(va) = kallsyms.resolve("x86_return_thunk", 0) else {
        return Ok(None);
    };
    mem.read_u64(va)
        .map(Some)
        .map_err(|e| LinkError::Internal(format!("reading x86_return_thunk at {va:#x}: {e}")))
}

/// One segment's bytes, ready to copy to `va`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentImage {
    /// Which segment.
    pub segment: Segment,
    /// Its kernel-virtual start (in the arena).
    pub va: u64,
    /// Page-rounded, as [`Module::layout`] said.
    pub bytes: Vec<u8>,
}

/// One redirected function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedFunc {
    /// The module it belongs to (`None`: vmlinux).
    pub object: Option<String>,
    /// The old function's extent when the guest records it (a module
    /// symbol's `st_size`; vmlinux's kallsyms has no sizes).
    pub old_size: Option<u64>,
    /// `klp_func.old_name`.
    pub old_name: String,
    /// As the patch declares it (0: unique).
    pub old_sympos: u64,
    /// Kernel-virtual entry of the function being replaced, resolved in
    /// kallsyms (or its module's symbols).
    pub old_addr: u64,
    /// Kernel-virtual entry of the replacement, in the arena.
    pub new_addr: u64,
    /// The module's name for the new function.
    pub new_symbol: Option<String>,
}

/// Addresses of the callbacks of one object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkedCallbacks {
    /// The linked `struct klp_object`, the callbacks' argument.
    pub object: u64,
    /// Linked address of `pre_patch`, if set.
    pub pre_patch: Option<u64>,
    /// Linked address of `post_patch`, if set.
    pub post_patch: Option<u64>,
    /// Linked address of `pre_unpatch`, if set.
    pub pre_unpatch: Option<u64>,
    /// Linked address of `post_unpatch`, if set.
    pub post_unpatch: Option<u64>,
}

/// One `klp_object` of the patch and whether it was linked now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedObject {
    /// The module it patches (`None`: vmlinux).
    pub name: Option<String>,
    /// Its module is loaded: its functions, relocations and callbacks are
    /// in this link. `false`: the object waits for its module (nothing of
    /// it is redirected, its relocations are left unapplied).
    pub loaded: bool,
    /// Its number of functions.
    pub funcs: usize,
}

/// The linked patch.
#[derive(Debug, Clone)]
pub struct Linked {
    /// Every object, in patch order.
    pub objects: Vec<LinkedObject>,
    /// The linked text segment.
    pub text: SegmentImage,
    /// The linked rodata segment.
    pub rodata: SegmentImage,
    /// The linked data segment.
    pub data: SegmentImage,
    /// Every function of the loaded objects, in patch order (objects,
    /// then funcs).
    pub funcs: Vec<LinkedFunc>,
    /// One per loaded object, in patch order: klp runs a waiting object's
    /// callbacks only when its module loads.
    pub callbacks: Vec<LinkedCallbacks>,
    /// Addresses of the `call __fentry__` sites now holding [`NOP5`].
    pub fentry_nops: Vec<u64>,
    section_vas: HashMap<usize, u64>,
    externals: HashMap<usize, u64>,
    /// [`Bases::percpu`].
    percpu: u64,
}

impl Linked {
    /// The guest virtual address of a place in a loaded section.
    pub fn va(&self, place: Place) -> Option<u64> {
        self.section_vas
            .get(&place.section)?
            .checked_add(place.offset)
    }

    /// The value a module symbol got: its address, or the kernel symbol's.
    pub fn symbol_value(&self, module: &Module, index: usize) -> Option<u64> {
        match module.symbols.get(index)?.def {
            SymbolDef::Defined(p) => self.va(p),
            SymbolDef::Absolute(v) => Some(v),
            SymbolDef::ThisModule => Some(0),
            SymbolDef::PerCpu(offset) => self.percpu.checked_add(offset),
            _ => self.externals.get(&index).copied(),
        }
    }

    /// The linked bytes at `va`, if they lie within one segment.
    pub fn read(&self, va: u64, len: u64) -> Option<&[u8]> {
        [&self.text, &self.rodata, &self.data].iter().find_map(|s| {
            let off = usize::try_from(va.checked_sub(s.va)?).ok()?;
            s.bytes
                .get(off..off.checked_add(usize::try_from(len).ok()?)?)
        })
    }

    /// The per-CPU address its `.data..percpu` symbols are based on
    /// ([`Bases::percpu`]).
    pub fn percpu(&self) -> u64 {
        self.percpu
    }

    /// Text, rodata and data, in that order.
    pub fn segments(&self) -> [&SegmentImage; 3] {
        [&self.text, &self.rodata, &self.data]
    }
}

fn check_bases(module: &Module, bases: Bases) -> Result<(), LinkError> {
    let layout = module.layout();
    let mut ranges = Vec::new();
    for seg in [Segment::Text, Segment::Rodata, Segment::Data] {
        let base = bases.of(seg);
        let size = layout.size(seg);
        if base % PAGE != 0 {
            return Err(LinkError::BadBases(format!(
                "{seg:?} base {base:#x} is not page-aligned"
            )));
        }
        let end = base
            .checked_add(size)
            .ok_or_else(|| LinkError::BadBases(format!("{seg:?} at {base:#x} wraps around")))?;
        if size > 0 {
            ranges.push((base, end, seg));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if let [(_, end, a), (start, _, b)] = w {
            if start < end {
                return Err(LinkError::BadBases(format!("{a:?} and {b:?} overlap")));
            }
        }
    }
    Ok(())
}

/// Links `module` for `bases` against vmlinux alone (a module object is
/// left waiting). See the module documentation.
pub fn link(
    module: &Module,
    kallsyms: &Kallsyms,
    bases: Bases,
    options: &LinkOptions,
) -> Result<Linked, LinkError> {
    link_objects(module, &GuestSymbols::vmlinux(kallsyms), bases, options)
}

/// Links `module` for `bases` against vmlinux and the modules in
/// `symbols`: an object whose module is loaded is linked in full; one
/// whose module is not loaded waits (no function of it, no relocation of
/// its module, no callback).
pub fn link_objects(
    module: &Module,
    symbols: &GuestSymbols<'_>,
    bases: Bases,
    options: &LinkOptions,
) -> Result<Linked, LinkError> {
    check_bases(module, bases)?;
    let kallsyms = symbols.kallsyms;

    // Old functions first: a wrong target is the likeliest user error.
    let mut olds = Vec::new();
    let mut objects = Vec::new();
    for object in &module.patch.objects {
        let target = match &object.name {
            None => None,
            Some(name) => match symbols.module(name) {
                Some(m) => Some(m),
                None => {
                    objects.push(LinkedObject {
                        name: Some(name.clone()),
                        loaded: false,
                        funcs: object.funcs.len(),
                    });
                    continue;
                }
            },
        };
        objects.push(LinkedObject {
            name: object.name.clone(),
            loaded: true,
            funcs: object.funcs.len(),
        });
        for f in &object.funcs {
            olds.push(match target {
                None => (
                    resolve::old_function(kallsyms, &f.old_name, f.old_sympos)?,
                    None,
                ),
                Some(m) => {
                    let (addr, size) = resolve::old_module_function(m, &f.old_name, f.old_sympos)?;
                    (addr, Some(size))
                }
            });
        }
    }
    let externals = resolve::externals(module, symbols)?;

    let layout = module.layout();
    let mut images = [Segment::Text, Segment::Rodata, Segment::Data].map(|segment| SegmentImage {
        segment,
        va: bases.of(segment),
        bytes: vec![0; usize::try_from(layout.size(segment)).unwrap_or(0)],
    });
    let seg_index = |s: Segment| match s {
        Segment::Text => 0,
        Segment::Rodata => 1,
        Segment::Data => 2,
    };
    let mut section_vas = HashMap::new();
    for s in &module.sections {
        let image = &mut images[seg_index(s.segment)];
        let start = usize::try_from(s.offset).map_err(|_| internal("section offset"))?;
        image
            .bytes
            .get_mut(start..start + s.data.len())
            .ok_or_else(|| internal("section outside its segment"))?
            .copy_from_slice(&s.data);
        section_vas.insert(s.elf_index, image.va + s.offset);
    }

    let mut linked = Linked {
        objects,
        text: images[0].clone(),
        rodata: images[1].clone(),
        data: images[2].clone(),
        funcs: Vec::new(),
        callbacks: Vec::new(),
        fentry_nops: Vec::new(),
        section_vas,
        externals,
        percpu: bases.percpu,
    };
    drop(images);

    let return_jumps: std::collections::HashSet<usize> =
        module.return_jumps.iter().copied().collect();
    for (i, r) in module.relocs.iter().enumerate() {
        if r.object
            .as_deref()
            .is_some_and(|o| symbols.module(o).is_none())
        {
            continue; // its module is not loaded: klp applies it on load
        }
        let at = || module.describe(r.place);
        if options.plain_returns && return_jumps.contains(&i) {
            // `jmp rel32` (e9, its rel32 at the relocation) -> ret; int3 x4.
            let (buf, offset) = linked.locate_mut(module, r.place)?;
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_sub(1))
                .ok_or_else(|| internal("return site offset"))?;
            let site = buf
                .get_mut(start..start + 5)
                .ok_or_else(|| internal("return site outside its segment"))?;
            if site[0] != 0xe9 {
                return Err(internal("return site is not a jmp rel32"));
            }
            site.copy_from_slice(&[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
            continue;
        }
        let target = match (return_jumps.contains(&i), options.return_thunk) {
            (true, Some(thunk)) => thunk,
            _ => linked
                .symbol_value(module, r.symbol)
                .ok_or_else(|| internal(&format!("no value for symbol {}", r.symbol)))?,
        };
        let place = linked
            .va(r.place)
            .ok_or_else(|| internal("relocation place"))?;
        let value = reloc::value(r.kind, target, r.addend, place).map_err(|e| {
            let sym = module.symbols.get(r.symbol);
            match (e, sym.map(|s| (&s.def, s.name.as_str()))) {
                (RelocProblem::Overflow { .. }, Some((SymbolDef::PerCpu(off), name)))
                    if r.kind.pc_relative() =>
                {
                    LinkError::PerCpuOutOfReach {
                        at: at(),
                        symbol: if name.is_empty() {
                            format!(
                                "{}{:+#x}",
                                crate::module::sections::PERCPU,
                                (*off as i64).wrapping_add(r.addend)
                            )
                        } else {
                            name.to_owned()
                        },
                        place,
                        target,
                    }
                }
                (RelocProblem::Overflow { value }, _) => LinkError::Overflow {
                    at: at(),
                    kind: r.kind,
                    place,
                    target,
                    value,
                },
                _ => internal("overflow"),
            }
        })?;
        let (buf, offset) = linked.locate_mut(module, r.place)?;
        reloc::write(buf, offset, r.kind, value).map_err(|e| match e {
            RelocProblem::NotZero => LinkError::NotZero { at: at() },
            _ => internal("relocation outside its segment"),
        })?;
    }

    for &site in &module.fentry_sites {
        let va = linked.va(site).ok_or_else(|| internal("fentry site"))?;
        let (buf, offset) = linked.locate_mut(module, site)?;
        let start = usize::try_from(offset).map_err(|_| internal("fentry offset"))?;
        let slot = buf
            .get_mut(start..start + NOP5.len())
            .ok_or_else(|| internal("fentry site outside its segment"))?;
        if slot != [0xe8, 0, 0, 0, 0] {
            return Err(internal("fentry site is not an unrelocated call"));
        }
        slot.copy_from_slice(&NOP5);
        linked.fentry_nops.push(va);
    }

    // Last, as module_finalize runs after every relocation: each site
    // gets the code the guest kernel would have chosen for its CPU.
    if alternatives::used_by(module) {
        let cpu = options.alternatives.as_ref().ok_or(AltError::NoGuestCpu)?;
        alternatives::apply(module, &mut linked, cpu)?;
    }

    let code = |linked: &Linked, c: &Option<CodeRef>| -> Result<Option<u64>, LinkError> {
        c.as_ref()
            .map(|c| linked.va(c.place).ok_or_else(|| internal("code reference")))
            .transpose()
    };
    let mut olds = olds.into_iter();
    let loaded: Vec<bool> = linked.objects.iter().map(|o| o.loaded).collect();
    for (object, loaded) in module.patch.objects.iter().zip(loaded) {
        if !loaded {
            continue;
        }
        for f in &object.funcs {
            let new_addr = linked
                .va(f.new_func.place)
                .ok_or_else(|| internal("new function"))?;
            let (old_addr, old_size) = olds.next().ok_or_else(|| internal("old function count"))?;
            linked.funcs.push(LinkedFunc {
                object: object.name.clone(),
                old_size,
                old_name: f.old_name.clone(),
                old_sympos: f.old_sympos,
                old_addr,
                new_addr,
                new_symbol: f.new_func.symbol.clone(),
            });
        }
        let cb = &object.callbacks;
        // An object without callbacks never has its address passed: a
        // kpatch-build module's objects exist only once its hook ran.
        let none = *cb == crate::module::Callbacks::default();
        let callbacks = LinkedCallbacks {
            object: linked
                .va(object.place)
                .or(none.then_some(0))
                .ok_or_else(|| internal("klp_object"))?,
            pre_patch: code(&linked, &cb.pre_patch)?,
            post_patch: code(&linked, &cb.post_patch)?,
            pre_unpatch: code(&linked, &cb.pre_unpatch)?,
            post_unpatch: code(&linked, &cb.post_unpatch)?,
        };
        linked.callbacks.push(callbacks);
    }
    Ok(linked)
}

impl Linked {
    /// The segment buffer holding `place`, and the offset in it.
    fn locate_mut(&mut self, module: &Module, place: Place) -> Result<(&mut [u8], u64), LinkError> {
        let s = module
            .section(place.section)
            .ok_or_else(|| internal("place in an unloaded section"))?;
        let image = match s.segment {
            Segment::Text => &mut self.text,
            Segment::Rodata => &mut self.rodata,
            Segment::Data => &mut self.data,
        };
        let offset = s
            .offset
            .checked_add(place.offset)
            .ok_or_else(|| internal("offset"))?;
        Ok((&mut image.bytes, offset))
    }
}

fn internal(what: &str) -> LinkError {
    LinkError::Internal(what.to_owned())
}

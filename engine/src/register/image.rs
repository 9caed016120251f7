//! The bytes of a patch's registration: its `struct module` and the tables
//! the kernel reaches through it, laid out in one arena region.
//!
//! Region layout, each part aligned to 8 bytes:
//! `struct module` | `__ex_table` (sorted by address, as `sort_extable`
//! leaves it) | `__bug_table` | `.orc_unwind_ip` (sorted) | `.orc_unwind`
//! (same order) | `__jump_table` (sorted by key, then site, as
//! `jump_label_sort_entries` leaves it) | two `struct static_key_mod` per
//! key ([`super::jump`]) | symtab (`Elf64_Sym`, entry 0 null) | strtab |
//! typetab.
//!
//! The region is data (RW, NX): the kernel writes the BUG table's
//! `BUGFLAG_DONE` after a `WARN_ONCE` and links keys' lists through our
//! `static_key_mod`s, and nothing here is executed.

use crate::link::Linked;
use crate::module::tables::{BugLayout, EXTABLE_ENTRY, JUMP_ENTRY, ORC_ENTRY, ORC_IP};
use crate::module::{Module, Segment, SymbolDef};

use super::jump::{JumpKey, JumpSite, JLM_SIZE};
use super::layout::{Memory, ModuleLayout, MODULE_REF_BASE, MODULE_STATE_LIVE, TAINT_LIVEPATCH};
use super::RegisterError;

/// `sizeof(Elf64_Sym)`.
const SYM: u64 = 24;
/// STT_OBJECT, STT_FUNC; STB_LOCAL, STB_GLOBAL.
const STT_OBJECT: u8 = 1;
const STT_FUNC: u8 = 2;
const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;

/// What [`build`] laid out, with the addresses the link step needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The region's bytes (its length is what [`size`] returned).
    pub bytes: Vec<u8>,
    /// The `struct module`'s address (the region's start).
    pub module: u64,
    /// The text range registered: every IP of patch code is inside it.
    pub text: std::ops::Range<u64>,
    /// Whether the module goes on `module_bug_list` (it has BUG sites).
    pub bugs: bool,
    /// Entries of each table, for logs and the API.
    pub counts: Counts,
    /// The static keys its code uses, for [`super::jump`].
    pub jumps: Vec<JumpKey>,
    /// Its ORC table, `(ip, entry)` sorted by ip, for klpvisor's own
    /// unwinder.
    pub orc: Vec<(u64, [u8; 6])>,
}

/// How many entries of each kind the guest kernel now knows about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Exception fixups.
    pub extable: usize,
    /// BUG/WARN sites.
    pub bugs: usize,
    /// ORC entries.
    pub orc: usize,
    /// Named functions and data in its kallsyms.
    pub symbols: usize,
    /// Static-key sites (static branches, tracepoints).
    pub jumps: usize,
}

fn align8(x: u64) -> u64 {
    x.div_ceil(8) * 8
}

/// A named symbol of loaded code or data: (name, place, segment, size,
/// whether it is a function, binding).
struct Sym<'a> {
    name: &'a str,
    va: u64,
    size: u64,
    segment: Segment,
    weak: bool,
}

fn symbols<'a>(module: &'a Module, linked: &Linked) -> Vec<Sym<'a>> {
    module
        .symbols
        .iter()
        .filter(|s| s.named && !s.name.is_empty())
        .filter_map(|s| match s.def {
            SymbolDef::Defined(p) => Some(Sym {
                name: &s.name,
                va: linked.va(p)?,
                size: s.size,
                segment: module.section(p.section)?.segment,
                weak: s.weak,
            }),
            _ => None,
        })
        .collect()
}

struct Parts {
    extable: u64,
    bugs: u64,
    orc_ip: u64,
    orc: u64,
    jumps: u64,
    jlms: u64,
    symtab: u64,
    strtab: u64,
    typetab: u64,
    end: u64,
}

fn parts(
    layout: &ModuleLayout,
    bug: Option<BugLayout>,
    module: &Module,
    nsyms: u64,
    strlen: u64,
) -> Parts {
    let t = &module.tables;
    let extable = align8(layout.size);
    let bugs = align8(extable + t.extable.len() as u64 * EXTABLE_ENTRY);
    let bug_size = bug.map_or(0, |b| b.size);
    let orc_ip = align8(bugs + t.bugs.len() as u64 * bug_size);
    let orc = align8(orc_ip + t.orc.len() as u64 * ORC_IP);
    let jumps = align8(orc + t.orc.len() as u64 * ORC_ENTRY);
    let jlms = jumps + t.jumps.len() as u64 * JUMP_ENTRY;
    let symtab = jlms + 2 * key_bound(module) * JLM_SIZE;
    let strtab = symtab + (nsyms + 1) * SYM;
    let typetab = strtab + strlen;
    let end = typetab + nsyms + 1;
    Parts {
        extable,
        bugs,
        orc_ip,
        orc,
        jumps,
        jlms,
        symtab,
        strtab,
        typetab,
        end,
    }
}

/// Distinct (symbol, offset) keys: at least as many as distinct key
/// addresses after linking, known before it.
fn key_bound(module: &Module) -> u64 {
    let mut k: Vec<(usize, i64)> = module
        .tables
        .jumps
        .iter()
        .map(|j| (j.key, j.key_addend))
        .collect();
    k.sort_unstable();
    k.dedup();
    k.len() as u64
}

fn strtab_len(syms: &[Sym<'_>]) -> u64 {
    1 + syms.iter().map(|s| s.name.len() as u64 + 1).sum::<u64>()
}

/// The region size [`build`] needs for `module` (symbol names are known
/// before linking, so this is exact).
pub fn size(layout: &ModuleLayout, bug: Option<BugLayout>, module: &Module) -> u64 {
    let named: Vec<&str> = module
        .symbols
        .iter()
        .filter(|s| s.named && !s.name.is_empty() && matches!(s.def, SymbolDef::Defined(_)))
        .map(|s| s.name.as_str())
        .collect();
    let strlen = 1 + named.iter().map(|n| n.len() as u64 + 1).sum::<u64>();
    parts(layout, bug, module, named.len() as u64, strlen).end
}

struct Buf {
    bytes: Vec<u8>,
}

impl Buf {
    fn put(&mut self, at: u64, b: &[u8]) -> Result<(), RegisterError> {
        let start = usize::try_from(at).map_err(|_| RegisterError::Internal("image offset"))?;
        self.bytes
            .get_mut(start..start + b.len())
            .ok_or(RegisterError::Internal(
                "write outside the registration image",
            ))?
            .copy_from_slice(b);
        Ok(())
    }
    fn u64(&mut self, at: u64, v: u64) -> Result<(), RegisterError> {
        self.put(at, &v.to_le_bytes())
    }
    fn u32(&mut self, at: u64, v: u32) -> Result<(), RegisterError> {
        self.put(at, &v.to_le_bytes())
    }
    fn i32(&mut self, at: u64, v: i32) -> Result<(), RegisterError> {
        self.put(at, &v.to_le_bytes())
    }
    fn u16(&mut self, at: u64, v: u16) -> Result<(), RegisterError> {
        self.put(at, &v.to_le_bytes())
    }
}

/// `target - field` as the 32-bit PC-relative value the kernel's tables
/// hold; the arena is within 2 GiB of everything it points at.
fn rel(target: u64, field: u64, what: &'static str) -> Result<i32, RegisterError> {
    i32::try_from(target.wrapping_sub(field) as i64).map_err(|_| RegisterError::Reach(what))
}

/// Lays out the registration of `module`, linked as `linked`, at `va`.
pub fn build(
    layout: &ModuleLayout,
    bug: Option<BugLayout>,
    name: &str,
    module: &Module,
    linked: &Linked,
    va: u64,
) -> Result<Image, RegisterError> {
    if name.is_empty() || name.len() as u64 >= layout.name_len {
        return Err(RegisterError::Name {
            name: name.to_owned(),
            max: layout.name_len.saturating_sub(1),
        });
    }
    let syms = symbols(module, linked);
    let p = parts(layout, bug, module, syms.len() as u64, strtab_len(&syms));
    let len = usize::try_from(p.end).map_err(|_| RegisterError::Internal("image size"))?;
    let mut b = Buf {
        bytes: vec![0; len],
    };
    let at = |off: u64| va + off;
    let place = |pl, what: &'static str| linked.va(pl).ok_or(RegisterError::Internal(what));

    // The tables.
    let t = &module.tables;
    let mut ex: Vec<(u64, u64, i32)> = t
        .extable
        .iter()
        .map(|e| {
            Ok((
                place(e.insn, "extable insn")?,
                place(e.fixup, "extable fixup")?,
                e.data,
            ))
        })
        .collect::<Result<_, RegisterError>>()?;
    ex.sort_unstable_by_key(|e| e.0);
    for (i, (insn, fixup, data)) in ex.iter().enumerate() {
        let e = p.extable + i as u64 * EXTABLE_ENTRY;
        b.i32(e, rel(*insn, at(e), "__ex_table")?)?;
        b.i32(e + 4, rel(*fixup, at(e + 4), "__ex_table")?)?;
        b.i32(e + 8, *data)?;
    }
    if let (Some(bl), false) = (bug, t.bugs.is_empty()) {
        for (i, e) in t.bugs.iter().enumerate() {
            let o = p.bugs + i as u64 * bl.size;
            b.i32(o, rel(place(e.addr, "bug address")?, at(o), "__bug_table")?)?;
            if let (Some(f), Some(file)) = (bl.file, e.file) {
                b.i32(
                    o + f,
                    rel(place(file, "bug file")?, at(o + f), "__bug_table")?,
                )?;
            }
            if let Some(l) = bl.line {
                b.u16(o + l, e.line)?;
            }
            b.u16(o + bl.flags, e.flags)?;
        }
    }
    let mut orc: Vec<(u64, [u8; ORC_ENTRY as usize])> = t
        .orc
        .iter()
        .map(|o| Ok((place(o.ip, "orc ip")?, o.entry)))
        .collect::<Result<_, RegisterError>>()?;
    // Stable: the kernel's sort keeps no particular order among equal
    // IPs either, and the linker emits at most one entry per IP.
    orc.sort_by_key(|o| o.0);
    for (i, (ip, entry)) in orc.iter().enumerate() {
        let o = p.orc_ip + i as u64 * ORC_IP;
        b.i32(o, rel(*ip, at(o), ".orc_unwind_ip")?)?;
        b.put(p.orc + i as u64 * ORC_ENTRY, entry)?;
    }

    // Static-key sites, sorted by key and then site, each key's slots.
    let mut jumps: Vec<(u64, u64, u64, bool)> = t
        .jumps
        .iter()
        .map(|j| {
            let key = linked
                .symbol_value(module, j.key)
                .and_then(|v| v.checked_add_signed(j.key_addend))
                .ok_or(RegisterError::Internal("static key unresolved"))?;
            Ok((
                key,
                place(j.code, "jump site")?,
                place(j.target, "jump target")?,
                j.branch,
            ))
        })
        .collect::<Result<_, RegisterError>>()?;
    jumps.sort_unstable_by_key(|j| (j.0, j.1));
    let mut keys: Vec<JumpKey> = Vec::new();
    for (i, &(key, code, target, branch)) in jumps.iter().enumerate() {
        let e = p.jumps + i as u64 * JUMP_ENTRY;
        b.i32(e, rel(code, at(e), "__jump_table")?)?;
        b.i32(e + 4, rel(target, at(e + 4), "__jump_table")?)?;
        let flags = u64::from(branch);
        b.u64(e + 8, (key | flags).wrapping_sub(at(e + 8)))?;
        let site = JumpSite {
            code,
            target,
            branch,
        };
        match keys.last_mut() {
            Some(k) if k.key == key => k.sites.push(site),
            _ => {
                let slot = p.jlms + keys.len() as u64 * 2 * JLM_SIZE;
                keys.push(JumpKey {
                    key,
                    entries: at(e),
                    jlm: at(slot),
                    holder: at(slot + JLM_SIZE),
                    sites: vec![site],
                });
            }
        }
    }

    // kallsyms: symtab[0] is the null symbol, as in an ELF symbol table.
    let mut str_at = p.strtab + 1;
    for (i, s) in syms.iter().enumerate() {
        let e = p.symtab + (i as u64 + 1) * SYM;
        let kind = if s.segment == Segment::Text {
            STT_FUNC
        } else {
            STT_OBJECT
        };
        let bind = if s.weak { STB_WEAK } else { STB_GLOBAL };
        let name_off = u32::try_from(str_at - p.strtab)
            .map_err(|_| RegisterError::Internal("strtab offset"))?;
        b.u32(e, name_off)?;
        b.put(e + 4, &[(bind << 4) | kind, 0])?;
        // Any defined section index: the kernel only tests for SHN_UNDEF.
        b.u16(e + 6, 1)?;
        b.u64(e + 8, s.va)?;
        b.u64(e + 16, s.size)?;
        b.put(str_at, s.name.as_bytes())?;
        str_at += s.name.len() as u64 + 1;
        let ty = match s.segment {
            Segment::Text => b't',
            Segment::Rodata => b'r',
            Segment::Data => b'd',
        };
        b.put(p.typetab + i as u64 + 1, &[ty])?;
    }

    // struct module.
    let text_va = linked.text.va;
    let text_len = linked.text.bytes.len() as u64;
    let text_len32 =
        u32::try_from(text_len).map_err(|_| RegisterError::Internal("text size over 4 GiB"))?;
    b.u32(layout.state, MODULE_STATE_LIVE)?;
    b.put(layout.name, name.as_bytes())?;
    b.u32(layout.num_exentries, ex.len() as u32)?;
    b.u64(
        layout.extable,
        if ex.is_empty() { 0 } else { at(p.extable) },
    )?;
    match layout.memory {
        Memory::Layout {
            at: l,
            size,
            text_size,
            ro_size,
            ro_after_init_size,
            mtn,
        } => {
            b.u64(l, text_va)?;
            for f in [size, text_size, ro_size, ro_after_init_size] {
                b.u32(l + f, text_len32)?;
            }
            b.u64(l + mtn + layout.mtn_mod, va)?;
        }
        Memory::Mem {
            at: m, size, mtn, ..
        } => {
            b.u64(m, text_va)?;
            b.u32(m + size, text_len32)?;
            b.u64(m + mtn + layout.mtn_mod, va)?;
        }
    }
    if let (Some(n), Some(ip), Some(u)) = (layout.num_orcs, layout.orc_unwind_ip, layout.orc_unwind)
    {
        if !orc.is_empty() {
            b.u32(n, orc.len() as u32)?;
            b.u64(ip, at(p.orc_ip))?;
            b.u64(u, at(p.orc))?;
        }
    }
    if !jumps.is_empty() {
        let (Some(e), Some(n)) = (layout.jump_entries, layout.num_jump_entries) else {
            return Err(RegisterError::Unexpected(
                "the patch has static-key sites but the guest's struct module has no \
                 jump_entries (CONFIG_JUMP_LABEL off?)",
            ));
        };
        b.u64(e, at(p.jumps))?;
        b.u32(n, jumps.len() as u32)?;
    }
    if let Some(pc) = &module.percpu {
        // is_module_percpu_address() finds the block through these.
        let Some((ptr, size)) = layout.percpu else {
            return Err(RegisterError::Unexpected(
                "the patch has per-CPU variables but the guest's struct module has no percpu \
                 member (a kernel without CONFIG_SMP?)",
            ));
        };
        let len = u32::try_from(pc.size)
            .map_err(|_| RegisterError::Internal("per-CPU data over 4 GiB"))?;
        b.u64(ptr, linked.percpu())?;
        b.u32(size, len)?;
    }
    b.u64(layout.taints, 1 << TAINT_LIVEPATCH)?;
    let bugs = bug.is_some() && !t.bugs.is_empty();
    if bugs {
        b.u32(layout.num_bugs, t.bugs.len() as u32)?;
        b.u64(layout.bug_table, at(p.bugs))?;
    } else {
        // An empty list, as INIT_LIST_HEAD leaves it.
        b.u64(layout.bug_list, at(layout.bug_list))?;
        b.u64(layout.bug_list + 8, at(layout.bug_list))?;
    }
    let ks = layout.core_kallsyms;
    b.u64(layout.kallsyms, at(ks))?;
    b.u64(ks + layout.ks_symtab, at(p.symtab))?;
    b.u32(ks + layout.ks_num_symtab, syms.len() as u32 + 1)?;
    b.u64(ks + layout.ks_strtab, at(p.strtab))?;
    b.u64(ks + layout.ks_typetab, at(p.typetab))?;
    if let Some(k) = layout.klp {
        b.put(k, &[1])?;
    }
    for l in [layout.source_list, layout.target_list]
        .into_iter()
        .chain(layout.param_wait_list)
    {
        b.u64(l, at(l))?;
        b.u64(l + 8, at(l))?;
    }
    // Held once, as klp holds an enabled patch's module: `rmmod` in the
    // guest answers "in use" instead of freeing memory it never allocated.
    b.u32(layout.refcnt, MODULE_REF_BASE + 1)?;

    Ok(Image {
        bytes: b.bytes,
        module: va,
        text: text_va..text_va + text_len,
        bugs,
        counts: Counts {
            extable: ex.len(),
            bugs: if bugs { t.bugs.len() } else { 0 },
            orc: orc.len(),
            symbols: syms.len(),
            jumps: jumps.len(),
        },
        jumps: keys,
        orc,
    })
}

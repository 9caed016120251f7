//! The guest kernel's own type information (BTF), read from its memory.
//!
//! Struct layouts (task_struct, klp_patch, ...) depend on the kernel's
//! version and configuration; with CONFIG_DEBUG_INFO_BTF the kernel carries
//! them in `.BTF` between `__start_BTF` and `__stop_BTF`. This is a small
//! parser for what the engine needs: struct and union sizes and member
//! offsets by dotted path (`task_struct.thread.sp`), looking through
//! anonymous structs/unions and typedef/const/volatile chains, and telling
//! bitfields apart.
//!
//! Not btf-rs: it is LGPL-2.1 (this workspace is Apache-2.0) and it slices
//! its input unchecked and calls `expect`, which a hostile guest could turn
//! into a panic of the host. Everything here is bounds-checked.

use std::collections::{HashMap, HashSet};

use crate::kallsyms::Kallsyms;
use crate::paging::{PagingError, VirtRead};

const MAGIC: u16 = 0xeb9f;
/// vmlinux BTF of a distribution kernel is ~5 MiB; refuse anything absurd.
pub const MAX_BTF_BYTES: u64 = 64 << 20;
/// typedef/const/volatile chains and anonymous-member nesting are shallow
/// in real kernels; a deeper chain is a loop in corrupt data.
const MAX_DEPTH: usize = 64;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Errors of BTF loading and lookups.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// `__start_BTF` or `__stop_BTF` is not in kallsyms.
    #[error("kallsyms has no `{0}`: the guest kernel was built without CONFIG_DEBUG_INFO_BTF?")]
    MissingSymbol(&'static str),
    /// The kallsyms bounds of `.BTF` are reversed, shorter than a BTF
    /// header or longer than [`MAX_BTF_BYTES`].
    #[error("__start_BTF {start:#x} .. __stop_BTF {stop:#x} is not a plausible BTF range")]
    BadRange {
        /// `__start_BTF` (kernel-virtual).
        start: u64,
        /// `__stop_BTF` (kernel-virtual).
        stop: u64,
    },
    /// The `.BTF` bytes could not be read through the page tables.
    #[error("cannot read the guest's BTF: {0}")]
    Memory(#[from] PagingError),
    /// The header's magic is not little-endian BTF's.
    #[error("not BTF: magic {0:#06x}, expected 0xeb9f (little-endian BTF)")]
    BadMagic(u16),
    /// A header, type record or string runs out of bounds or is inconsistent.
    #[error("malformed BTF: {0}")]
    Malformed(String),
    /// No struct or union has this name.
    #[error("BTF has no struct or union named `{0}`")]
    NoType(String),
    /// A component of a dotted path names no member of its type.
    #[error("`{path}`: `{ty}` has no member `{member}`")]
    NoMember {
        /// The dotted path looked up.
        path: String,
        /// The struct or union searched.
        ty: String,
        /// The member not found.
        member: String,
    },
    /// A dotted path goes through a member that is not a struct or union.
    #[error("`{path}`: `{component}` is not a struct or union, so it has no members")]
    NotComposite {
        /// The dotted path looked up.
        path: String,
        /// The component whose type has no members.
        component: String,
    },
    /// The path ends at a bitfield, which has no byte offset.
    #[error("`{path}` is a {bits}-bit bitfield at bit {bit_offset}: it has no byte offset")]
    Bitfield {
        /// The dotted path looked up.
        path: String,
        /// Its width in bits.
        bits: u32,
        /// Its offset in bits from the start of the outermost struct.
        bit_offset: u64,
    },
    /// A typedef/qualifier chain or anonymous nesting deeper than real
    /// kernels have: a loop in corrupt data.
    #[error("`{0}`: type chain too deep or looping")]
    TooDeep(String),
    /// The type (by BTF id) has no size: missing, a function, or a forward
    /// declaration.
    #[error("type id {0} has no size")]
    NoSize(u32),
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    ty: u32,
    /// Bit offset from the start of the enclosing struct/union.
    bit_offset: u32,
    /// Non-zero for a bitfield declared through the struct's kind_flag.
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
enum Kind {
    Int {
        size: u32,
        bits: u32,
        offset: u32,
    },
    Ptr {
        to: u32,
    },
    Array {
        elem: u32,
        nelems: u32,
    },
    Composite {
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        size: u32,
    },
    Float {
        size: u32,
    },
    /// typedef, const, volatile, restrict, type_tag: the same as `to`.
    Alias {
        to: u32,
        typedef: bool,
    },
    /// fwd, func, func_proto, var, datasec, decl_tag: not a data layout.
    Other,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: Kind,
}

/// A member found by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Offset from the start of the outermost struct, in bits.
    pub bit_offset: u64,
    /// `Some(width)` for a bitfield.
    pub bitfield_bits: Option<u32>,
    /// BTF type id of the member.
    pub type_id: u32,
    /// Size of the member's type in bytes, if it has one.
    pub size: Option<u64>,
}

impl Field {
    /// Byte offset; `None` for a bitfield or a member not byte-aligned.
    pub fn byte_offset(&self) -> Option<u64> {
        (self.bitfield_bits.is_none() && self.bit_offset % 8 == 0).then_some(self.bit_offset / 8)
    }
}

/// Parsed vmlinux BTF.
#[derive(Debug, Clone)]
pub struct Btf {
    /// Type id i is `types[i - 1]`; id 0 is void.
    types: Vec<Type>,
    strings: Vec<u8>,
    /// Named structs and unions (with members or a size), by name.
    composites: HashMap<String, Vec<u32>>,
    /// Named typedefs, to accept `typedef struct {...} name_t`.
    typedefs: HashMap<String, u32>,
    /// Every enumerator's value by name (C gives them one namespace; the
    /// first of a name wins).
    enumerators: HashMap<String, i64>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let end = self
            .pos
            .checked_add(4)
            .ok_or_else(|| BtfError::Malformed("type section overflows".into()))?;
        let b = self.bytes.get(self.pos..end).ok_or_else(|| {
            BtfError::Malformed(format!("type data truncated at byte {}", self.pos))
        })?;
        self.pos = end;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                BtfError::Malformed(format!("type data truncated at byte {}", self.pos))
            })?;
        self.pos = end;
        Ok(())
    }
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Btf {
    /// Reads vmlinux BTF from the guest, located by kallsyms.
    pub fn load<M: VirtRead + ?Sized>(mem: &M, kallsyms: &Kallsyms) -> Result<Self, BtfError> {
        let start = kallsyms
            .addr("__start_BTF")
            .map_err(|_| BtfError::MissingSymbol("__start_BTF"))?;
        let stop = kallsyms
            .addr("__stop_BTF")
            .map_err(|_| BtfError::MissingSymbol("__stop_BTF"))?;
        let len = stop
            .checked_sub(start)
            .filter(|l| (24..=MAX_BTF_BYTES).contains(l))
            .ok_or(BtfError::BadRange { start, stop })?;
        let bytes = mem.read_vec(start, len, MAX_BTF_BYTES, "BTF")?;
        Self::parse(&bytes)
    }

    /// Parses raw BTF (header, types, strings), as in /sys/kernel/btf/vmlinux.
    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        let magic = bytes
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| BtfError::Malformed("shorter than the BTF header".into()))?;
        if magic != MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        let hdr =
            |off| le32(bytes, off).ok_or_else(|| BtfError::Malformed("truncated header".into()));
        let version = bytes.get(2).copied().unwrap_or(0);
        if version != 1 {
            return Err(BtfError::Malformed(format!(
                "version {version}, expected 1"
            )));
        }
        let hdr_len = hdr(4)? as usize;
        let (type_off, type_len) = (hdr(8)? as usize, hdr(12)? as usize);
        let (str_off, str_len) = (hdr(16)? as usize, hdr(20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            hdr_len
                .checked_add(off)
                .and_then(|s| Some((s, s.checked_add(len)?)))
                .and_then(|(s, e)| bytes.get(s..e))
                .ok_or_else(|| {
                    BtfError::Malformed(format!(
                        "{what} section lies outside the {} bytes",
                        bytes.len()
                    ))
                })
        };
        let type_bytes = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();

        let mut r = Reader {
            bytes: type_bytes,
            pos: 0,
        };
        // Each type takes at least 12 bytes: a bound on the count.
        let mut types = Vec::with_capacity(type_len / 12);
        let mut enum_values = Vec::new();
        while r.pos < type_bytes.len() {
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 != 0;
            let kind = match (info >> 24) & 0x1f {
                KIND_INT => {
                    let enc = r.u32()?;
                    Kind::Int {
                        size: size_or_type,
                        bits: enc & 0xff,
                        offset: (enc >> 16) & 0xff,
                    }
                }
                KIND_PTR => Kind::Ptr { to: size_or_type },
                KIND_ARRAY => {
                    let elem = r.u32()?;
                    let _index_type = r.u32()?;
                    let nelems = r.u32()?;
                    Kind::Array { elem, nelems }
                }
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen.min(type_bytes.len() / 12));
                    for _ in 0..vlen {
                        let name_off = r.u32()?;
                        let ty = r.u32()?;
                        let off = r.u32()?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (off & 0x00ff_ffff, off >> 24)
                        } else {
                            (off, 0)
                        };
                        members.push(Member {
                            name_off,
                            ty,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    Kind::Composite {
                        size: size_or_type,
                        members,
                    }
                }
                KIND_ENUM => {
                    for _ in 0..vlen {
                        let name_off = r.u32()?;
                        let raw = r.u32()?;
                        // kind_flag: a signed enum.
                        let val = if kind_flag {
                            i64::from(raw as i32)
                        } else {
                            i64::from(raw)
                        };
                        enum_values.push((name_off, val));
                    }
                    Kind::Enum { size: size_or_type }
                }
                KIND_ENUM64 => {
                    for _ in 0..vlen {
                        let name_off = r.u32()?;
                        let lo = u64::from(r.u32()?);
                        let hi = u64::from(r.u32()?);
                        enum_values.push((name_off, (hi << 32 | lo) as i64));
                    }
                    Kind::Enum { size: size_or_type }
                }
                KIND_FWD | KIND_FUNC => Kind::Other,
                KIND_TYPEDEF => Kind::Alias {
                    to: size_or_type,
                    typedef: true,
                },
                KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => Kind::Alias {
                    to: size_or_type,
                    typedef: false,
                },
                KIND_FUNC_PROTO => {
                    r.skip(vlen * 8)?;
                    Kind::Other
                }
                KIND_VAR | KIND_DECL_TAG => {
                    r.skip(4)?;
                    Kind::Other
                }
                KIND_DATASEC => {
                    r.skip(vlen * 12)?;
                    Kind::Other
                }
                KIND_FLOAT => Kind::Float { size: size_or_type },
                k => {
                    return Err(BtfError::Malformed(format!(
                        "unknown kind {k} for type id {}",
                        types.len() + 1
                    )))
                }
            };
            types.push(Type { name_off, kind });
        }

        let mut btf = Btf {
            types,
            strings,
            composites: HashMap::new(),
            typedefs: HashMap::new(),
            enumerators: HashMap::new(),
        };
        let mut composites: HashMap<String, Vec<u32>> = HashMap::new();
        let mut typedefs = HashMap::new();
        for (i, t) in btf.types.iter().enumerate() {
            let id = i as u32 + 1;
            let name = btf.str_at(t.name_off);
            if name.is_empty() {
                continue;
            }
            match t.kind {
                Kind::Composite { .. } => composites.entry(name.to_owned()).or_default().push(id),
                Kind::Alias { typedef: true, .. } => {
                    typedefs.entry(name.to_owned()).or_insert(id);
                }
                _ => {}
            }
        }
        let mut enumerators = HashMap::new();
        for (name_off, val) in enum_values {
            let name = btf.str_at(name_off);
            if !name.is_empty() {
                enumerators.entry(name.to_owned()).or_insert(val);
            }
        }
        btf.composites = composites;
        btf.typedefs = typedefs;
        btf.enumerators = enumerators;
        Ok(btf)
    }

    fn str_at(&self, off: u32) -> &str {
        let Some(rest) = self.strings.get(off as usize..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        rest.get(..end)
            .and_then(|s| std::str::from_utf8(s).ok())
            .unwrap_or("")
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Number of types (ids 1..=count).
    pub fn type_count(&self) -> usize {
        self.types.len()
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the real type.
    fn resolve(&self, mut id: u32, path: &str) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            match self.get(id).map(|t| &t.kind) {
                Some(Kind::Alias { to, .. }) => id = *to,
                _ => return Ok(id),
            }
        }
        Err(BtfError::TooDeep(path.into()))
    }

    /// The struct or union called `name` (or a typedef of one). When
    /// several types share a name, the first with members wins.
    fn composite(&self, name: &str) -> Result<u32, BtfError> {
        if let Some(ids) = self.composites.get(name) {
            let best = ids
                .iter()
                .copied()
                .find(|&id| matches!(self.get(id).map(|t| &t.kind), Some(Kind::Composite { members, .. }) if !members.is_empty()))
                .or_else(|| ids.first().copied());
            if let Some(id) = best {
                return Ok(id);
            }
        }
        if let Some(&td) = self.typedefs.get(name) {
            let id = self.resolve(td, name)?;
            if matches!(self.get(id).map(|t| &t.kind), Some(Kind::Composite { .. })) {
                return Ok(id);
            }
        }
        Err(BtfError::NoType(name.into()))
    }

    /// Size in bytes of type `id`.
    pub fn size_of_type(&self, id: u32) -> Result<u64, BtfError> {
        let mut id = id;
        let mut mult: u64 = 1;
        for _ in 0..MAX_DEPTH {
            let t = self.get(id).ok_or(BtfError::NoSize(id))?;
            let size = match &t.kind {
                Kind::Int { size, .. } | Kind::Enum { size } | Kind::Float { size } => {
                    u64::from(*size)
                }
                Kind::Composite { size, .. } => u64::from(*size),
                Kind::Ptr { .. } => 8,
                Kind::Array { elem, nelems } => {
                    mult = mult.checked_mul(u64::from(*nelems)).ok_or_else(|| {
                        BtfError::Malformed(format!("array type {id} size overflows"))
                    })?;
                    id = *elem;
                    continue;
                }
                Kind::Alias { to, .. } => {
                    id = *to;
                    continue;
                }
                Kind::Other => return Err(BtfError::NoSize(id)),
            };
            return size
                .checked_mul(mult)
                .ok_or_else(|| BtfError::Malformed(format!("type {id} size overflows")));
        }
        Err(BtfError::NoSize(id))
    }

    /// Size of the struct or union `name`.
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        let id = self.composite(name)?;
        self.size_of_type(id)
    }

    /// The name of the type a pointer-typed `field` points to (typedefs
    /// and qualifiers on either side looked through): what tells two
    /// kernels apart whose member has one name but another element type
    /// (6.1's `struct ftrace_ret_stack *ret_stack` against 6.12's
    /// `unsigned long *ret_stack`). `None` if it is no pointer or the
    /// target has no name.
    pub fn pointee_name(&self, field: &Field) -> Option<String> {
        let id = self.resolve(field.type_id, "pointer").ok()?;
        let Some(Kind::Ptr { to }) = self.get(id).map(|t| &t.kind) else {
            return None;
        };
        let to = self.resolve(*to, "pointer").ok()?;
        let name = self.str_at(self.get(to)?.name_off);
        (!name.is_empty()).then(|| name.to_owned())
    }

    /// The value of enumerator `name` (e.g. `SYSTEM_RUNNING`), as this
    /// kernel numbers it: enums gain members between releases, so a value
    /// is read from the guest's own types, never assumed.
    pub fn enumerator(&self, name: &str) -> Option<i64> {
        self.enumerators.get(name).copied()
    }

    /// Whether struct/union `name` exists.
    pub fn has_type(&self, name: &str) -> bool {
        self.composite(name).is_ok()
    }

    /// Finds `path` = `type.member[.member...]`; members of anonymous
    /// structs and unions are found as if they were direct members.
    pub fn field(&self, path: &str) -> Result<Field, BtfError> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or("");
        let mut ty = self.composite(root)?;
        let mut ty_name = root.to_string();
        let mut bit_offset: u64 = 0;
        let mut last: Option<(Member, u64)> = None;
        for part in parts {
            if let Some((m, _)) = last {
                // Step into the previous member's type.
                ty = self.resolve(m.ty, path)?;
                if !matches!(self.get(ty).map(|t| &t.kind), Some(Kind::Composite { .. })) {
                    return Err(BtfError::NotComposite {
                        path: path.into(),
                        component: ty_name,
                    });
                }
            }
            let (m, rel) = self
                .find_member(ty, part, 0, &mut HashSet::new())
                .ok_or_else(|| BtfError::NoMember {
                    path: path.into(),
                    ty: ty_name.clone(),
                    member: part.into(),
                })?;
            bit_offset = bit_offset
                .checked_add(rel)
                .ok_or_else(|| BtfError::Malformed(format!("`{path}`: offset overflows")))?;
            ty_name = part.to_string();
            last = Some((m, rel));
        }
        let Some((m, _)) = last else {
            return Err(BtfError::NoMember {
                path: path.into(),
                ty: root.into(),
                member: String::new(),
            });
        };
        // A bitfield: kind_flag width, or an int narrower than its storage.
        let mut bits = (m.bitfield_size != 0).then_some(m.bitfield_size);
        if bits.is_none() {
            let rid = self.resolve(m.ty, path)?;
            if let Some(Kind::Int {
                size,
                bits: b,
                offset,
            }) = self.get(rid).map(|t| &t.kind)
            {
                if *offset != 0 || u64::from(*b) != u64::from(*size) * 8 {
                    bits = Some(*b);
                    bit_offset = bit_offset.saturating_add(u64::from(*offset));
                }
            }
        }
        Ok(Field {
            bit_offset,
            bitfield_bits: bits,
            type_id: m.ty,
            size: self.size_of_type(m.ty).ok(),
        })
    }

    /// Byte offset of `path`; an error for a bitfield.
    pub fn offset_of(&self, path: &str) -> Result<u64, BtfError> {
        let f = self.field(path)?;
        f.byte_offset().ok_or(BtfError::Bitfield {
            path: path.into(),
            bits: f.bitfield_bits.unwrap_or(0),
            bit_offset: f.bit_offset,
        })
    }

    /// Member `name` of composite `ty`, searching anonymous members
    /// depth-first; returns it and its bit offset relative to `ty`.
    ///
    /// `searched` holds the composites already searched for `name`: the
    /// search of one does not depend on how it was reached, so none is
    /// searched twice. Without it, corrupt BTF whose structs each have two
    /// anonymous members of the next (or their own) type makes the search
    /// take 2^MAX_DEPTH steps (found by the `btf` fuzz target).
    fn find_member(
        &self,
        ty: u32,
        name: &str,
        depth: usize,
        searched: &mut HashSet<u32>,
    ) -> Option<(Member, u64)> {
        if depth > MAX_DEPTH || !searched.insert(ty) {
            return None;
        }
        let Some(Kind::Composite { members, .. }) = self.get(ty).map(|t| &t.kind) else {
            return None;
        };
        for m in members {
            let mname = self.str_at(m.name_off);
            if mname == name {
                return Some((*m, u64::from(m.bit_offset)));
            }
            if mname.is_empty() {
                let Ok(inner) = self.resolve(m.ty, name) else {
                    continue;
                };
                if let Some((found, rel)) = self.find_member(inner, name, depth + 1, searched) {
                    return Some((found, rel.checked_add(u64::from(m.bit_offset))?));
                }
            }
        }
        None
    }
}

/// Synthetic BTF, for unit tests here and in the engine (the `synth`
/// feature): a kernel's type information without a kernel.
#[cfg(any(test, feature = "synth"))]
pub mod synth {
    use super::*;

    /// Assembles raw BTF for tests.
    pub struct BtfBuilder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Default for BtfBuilder {
        fn default() -> Self {
            Self::new()
        }
    }

    impl BtfBuilder {
        /// An empty BTF with only the empty string.
        pub fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        /// Adds `s` to the string section; returns its offset (0 for "").
        pub fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn push(&mut self, words: &[u32]) -> u32 {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        /// Adds an integer type of `size` bytes; returns its type id.
        pub fn int(&mut self, name: &str, size: u32) -> u32 {
            let n = self.name(name);
            self.push(&[n, KIND_INT << 24, size, size * 8])
        }

        /// Adds a pointer to type `to`; returns its type id.
        pub fn ptr(&mut self, to: u32) -> u32 {
            self.push(&[0, KIND_PTR << 24, to])
        }

        /// Adds an array of `n` `elem`s indexed by type `idx`; returns its type id.
        pub fn array(&mut self, elem: u32, idx: u32, n: u32) -> u32 {
            self.push(&[0, KIND_ARRAY << 24, 0, elem, idx, n])
        }

        /// Adds a typedef `name` of type `to`; returns its type id.
        pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
            let n = self.name(name);
            self.push(&[n, KIND_TYPEDEF << 24, to])
        }

        /// Adds an enum of `size` bytes with `values` (signed: kind_flag
        /// set); returns its type id.
        pub fn enumeration(&mut self, name: &str, size: u32, values: &[(&str, i32)]) -> u32 {
            let n = self.name(name);
            let info = (KIND_ENUM << 24) | values.len() as u32 | 1 << 31;
            let mut words = vec![n, info, size];
            for &(vname, val) in values {
                let vn = self.name(vname);
                words.extend_from_slice(&[vn, val as u32]);
            }
            self.push(&words)
        }

        /// Adds a 64-bit enum of `values`; returns its type id.
        pub fn enumeration64(&mut self, name: &str, values: &[(&str, u64)]) -> u32 {
            let n = self.name(name);
            let info = (KIND_ENUM64 << 24) | values.len() as u32;
            let mut words = vec![n, info, 8];
            for &(vname, val) in values {
                let vn = self.name(vname);
                words.extend_from_slice(&[vn, val as u32, (val >> 32) as u32]);
            }
            self.push(&words)
        }

        /// members: (name, type, bit offset, bitfield bits or 0).
        pub fn composite(
            &mut self,
            union: bool,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let n = self.name(name);
            let kind = if union { KIND_UNION } else { KIND_STRUCT };
            let kflag = members.iter().any(|m| m.3 != 0);
            let info = (kind << 24) | members.len() as u32 | if kflag { 1 << 31 } else { 0 };
            let mut words = vec![n, info, size];
            for &(mname, ty, off, bits) in members {
                let mn = self.name(mname);
                words.extend_from_slice(&[mn, ty, if kflag { bits << 24 | off } else { off }]);
            }
            self.push(&words)
        }

        /// The raw BTF: header, type section, string section.
        pub fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(1);
            out.push(0);
            for w in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A miniature task_struct: nested and anonymous members, a bitfield.
    pub fn sample() -> Vec<u8> {
        let mut b = BtfBuilder::new();
        let int = b.int("int", 4);
        let ulong = b.int("long unsigned int", 8);
        let uint = b.int("unsigned int", 4);
        let char_ = b.int("char", 1);
        let list = b.composite(false, "list_head", 16, &[]);
        let thread = b.composite(
            false,
            "thread_struct",
            16,
            &[("ip", ulong, 0, 0), ("sp", ulong, 64, 0)],
        );
        let comm = b.array(char_, int, 16);
        let anon = b.composite(
            false,
            "",
            8,
            &[("state_a", uint, 0, 0), ("flag_bit", uint, 35, 3)],
        );
        let anon_u = b.composite(true, "", 8, &[("u_a", ulong, 0, 0), ("u_b", int, 0, 0)]);
        let stack = b.ptr(ulong);
        let pid_t = b.typedef("pid_t", int);
        let cpid = b.push(&[0, KIND_CONST << 24, pid_t]);
        b.composite(
            false,
            "task_struct",
            128,
            &[
                ("__state", uint, 0, 0),
                ("tasks", list, 64, 0),
                ("", anon, 192, 0),
                ("", anon_u, 256, 0),
                ("pid", cpid, 320, 0),
                ("comm", comm, 384, 0),
                ("thread", thread, 512, 0),
                ("stack", stack, 640, 0),
            ],
        );
        b.build()
    }
}

#[cfg(test)]
mod tests {
    pub use super::synth::{sample, BtfBuilder};
    use super::*;

    #[test]
    fn looks_up_sizes_and_paths() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.struct_size("task_struct").unwrap(), 128);
        assert_eq!(btf.offset_of("task_struct.tasks").unwrap(), 8);
        assert_eq!(btf.offset_of("task_struct.thread.sp").unwrap(), 64 + 8);
        assert_eq!(btf.offset_of("task_struct.pid").unwrap(), 40);
        let f = btf.field("task_struct.pid").unwrap();
        assert_eq!(f.size, Some(4));
        assert_eq!(btf.field("task_struct.comm").unwrap().size, Some(16));
        assert_eq!(btf.field("task_struct.stack").unwrap().size, Some(8));
        // Anonymous struct and union members.
        assert_eq!(btf.offset_of("task_struct.state_a").unwrap(), 24);
        assert_eq!(btf.offset_of("task_struct.u_b").unwrap(), 32);
    }

    #[test]
    fn enumerators_are_read_by_name_signed_and_64_bit() {
        let mut b = BtfBuilder::new();
        b.enumeration(
            "system_states",
            4,
            &[
                ("SYSTEM_BOOTING", 0),
                ("SYSTEM_SCHEDULING", 1),
                ("SYSTEM_FREEING_INITMEM", 2),
                ("SYSTEM_RUNNING", 3),
            ],
        );
        b.enumeration("", 4, &[("NEGATIVE", -22), ("SYSTEM_RUNNING", 9)]);
        b.enumeration64("big", &[("HUGE", 1 << 40)]);
        b.int("int", 4);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.enumerator("SYSTEM_RUNNING"), Some(3), "the first wins");
        assert_eq!(btf.enumerator("SYSTEM_BOOTING"), Some(0));
        assert_eq!(btf.enumerator("NEGATIVE"), Some(-22));
        assert_eq!(btf.enumerator("HUGE"), Some(1 << 40));
        assert_eq!(btf.enumerator("SYSTEM_HALT"), None);
        // Types after the enums still parse where they should.
        assert_eq!(btf.type_count(), 4);
    }

    #[test]
    fn bitfields_are_reported() {
        let btf = Btf::parse(&sample()).unwrap();
        let f = btf.field("task_struct.flag_bit").unwrap();
        assert_eq!((f.bit_offset, f.bitfield_bits), (192 + 35, Some(3)));
        assert!(matches!(
            btf.offset_of("task_struct.flag_bit"),
            Err(BtfError::Bitfield { bits: 3, .. })
        ));
    }

    #[test]
    fn lookup_errors_name_the_problem() {
        let btf = Btf::parse(&sample()).unwrap();
        let e = btf.offset_of("task_struct.nope").unwrap_err().to_string();
        assert!(e.contains("task_struct") && e.contains("nope"), "{e}");
        assert!(matches!(
            btf.offset_of("no_such.x"),
            Err(BtfError::NoType(_))
        ));
        assert!(matches!(
            btf.offset_of("task_struct.pid.x"),
            Err(BtfError::NotComposite { .. })
        ));
    }

    #[test]
    fn hostile_btf_never_panics() {
        let good = sample();
        assert!(matches!(
            Btf::parse(&[0x9f, 0xeb]),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(
            Btf::parse(&[1, 2, 3, 4]),
            Err(BtfError::BadMagic(_))
        ));
        for cut in 0..good.len() {
            let _ = Btf::parse(&good[..cut]);
        }
        // Absurd counts and offsets in the header.
        for field in [4usize, 8, 12, 16, 20] {
            let mut b = good.clone();
            b[field..field + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(Btf::parse(&b).is_err());
        }
        // Random corruption, then lookups on whatever parsed.
        let mut seed = 0x9e37_79b9u32;
        for _ in 0..500 {
            let mut b = good.clone();
            for _ in 0..6 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let i = 24 + seed as usize % (b.len() - 24);
                b[i] = (seed >> 8) as u8;
            }
            if let Ok(btf) = Btf::parse(&b) {
                let _ = btf.field("task_struct.thread.sp");
                let _ = btf.struct_size("task_struct");
                let _ = btf.field("task_struct.u_b");
            }
        }
    }

    #[test]
    fn alias_loops_are_bounded() {
        let mut b = BtfBuilder::new();
        // typedef 1 -> 2 -> 1.
        b.typedef("a", 2);
        b.typedef("b", 1);
        b.composite(false, "s", 8, &[("m", 1, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(btf.field("s.m").is_err());
        assert!(btf.field("s.m.x").is_err());
        assert!(btf.struct_size("a").is_err());
    }

    #[test]
    fn anonymous_member_fan_out_is_searched_once() {
        // Type id i + 1 has two anonymous members of type i + 2, 64 deep,
        // and the last has two of the first: 2^64 paths without the
        // searched set (the btf fuzz target's timeout).
        let mut b = BtfBuilder::new();
        let n = 64;
        for i in 1..=n {
            let next = if i == n { 1 } else { i + 1 };
            let name = if i == 1 { "s" } else { "" };
            b.composite(false, name, 8, &[("", next, 0, 0), ("", next, 32, 0)]);
        }
        let btf = Btf::parse(&b.build()).unwrap();
        let t = std::time::Instant::now();
        assert!(matches!(
            btf.field("s.missing"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn huge_arrays_do_not_overflow() {
        let mut b = BtfBuilder::new();
        let int = b.int("int", 4);
        let a = b.array(int, int, u32::MAX);
        let aa = b.array(a, int, u32::MAX);
        let aaa = b.array(aa, int, u32::MAX);
        b.composite(false, "s", 8, &[("m", aaa, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.field("s.m").unwrap().size, None);
    }
}

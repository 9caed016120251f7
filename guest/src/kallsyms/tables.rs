//! Finding and decoding the kernel's compressed symbol tables in a copy of
//! its read-only data, with no symbol telling us where they are.
//!
//! `scripts/kallsyms.c` emits, each table 8-byte aligned (`ALGN`):
//!
//! | kernel      | order                                                              |
//! |-------------|--------------------------------------------------------------------|
//! | 6.1         | offsets, relative_base, num_syms, names, markers, token_table, token_index |
//! | 6.2 - 6.3   | as 6.1, plus seqs_of_names between markers and token_table         |
//! | 6.4+        | num_syms, names, markers, token_table, token_index, offsets, relative_base, seqs_of_names |
//!
//! The anchor is the token table: every character that occurs in symbol
//! names keeps its own single-character token at its own index, so "0".."9"
//! sit as ten consecutive one-byte tokens at indices 0x30..0x39 (the trick
//! vmlinux-to-elf and drgn use). From there, walking back 0x30 tokens gives
//! the table start, and `token_index` (256 u16 offsets right after it)
//! confirms it. The markers (one u32 names offset per 256 symbols, starting
//! at 0) are found by scanning back; `num_syms` and `names` are then pinned
//! by decoding every name and checking every marker. `offsets` and
//! `relative_base` are tried at both places and kept where the addresses come
//! out sorted, as the kernel sorts kallsyms by address.
//!
//! All inputs are guest data: every read is bounds-checked and every count
//! bounded; a bad table is an error, never a panic.

use memchr::memmem;

/// The digit tokens "0".."9", NUL-terminated, back to back.
const DIGIT_RUN: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
/// Longest token we accept; real ones are a few bytes.
const MAX_TOKEN_LEN: usize = 1024;
/// More symbols than any kernel has (a 6.1 allyesconfig has ~350k). It
/// also bounds what the search allocates per candidate table before the
/// names are expanded: 16 bytes a symbol for the entries, 16 for the
/// addresses, 16 MiB each at most.
pub const MAX_SYMBOLS: u32 = 1 << 20;
/// How far back from the token table the markers may start.
const MAX_MARKERS_DISTANCE: usize = 1 << 20;
/// Bytes one name entry may take when we search for `num_syms`.
const MAX_ENTRY_SEARCH: usize = 512;
/// Longest compressed name entry the search for `num_syms` accepts, in
/// bytes. An entry longer than [`MAX_EXPANDED_NAME`] cannot expand within
/// it (every token is at least one byte), but one up to this long still
/// pins the table down, and the decode then refuses it as
/// [`TablesError::NameTooLong`], which names the problem.
const MAX_NAME_LEN: usize = 4096;
/// Units of search work (bytes scanned, candidate positions tried, entries
/// decoded, bytes of names expanded) one [`decode`] may spend. A real
/// kernel needs a few million (the 6.12 test guest's names alone expand to
/// 3.9 MB); without a cap, crafted memory (a megabyte of zeros before a
/// fake digit run) could make the nested backward searches run for
/// minutes, and copies of a forged table each expand up to
/// [`MAX_DECODED_BYTES`] before they are refused.
pub const WORK_BUDGET: u64 = 1 << 26;
/// A name may expand to at most this many bytes, its type letter included.
///
/// scripts/kallsyms.c drops symbols whose name is KSYM_NAME_LEN bytes or
/// longer (KSYM_NAME_LEN counts the NUL: 512 since Linux 6.1, 128 before),
/// so a real entry expands to at most 1 + 511 = 512 bytes; the longest in
/// the 6.1 and 6.12 test guests take 79. Twice the kernel's limit leaves
/// room for it to grow once more, and no more: each compressed byte can
/// stand for a token of up to [`MAX_TOKEN_LEN`] bytes, so without this
/// bound one forged entry of 4096 bytes would expand to 4 MiB of VMM heap.
const MAX_EXPANDED_NAME: usize = 1024;
/// VMM heap a whole decoded table may take, counted per symbol as its
/// record (`size_of::<RawSymbol>()`, the type letter included) plus its
/// name's bytes.
///
/// The test guests' tables take 5.4 MB (Linux 6.1, 87,347 symbols) and
/// 9.9 MB (6.12, 154,334 symbols) by this count, from their
/// /proc/kallsyms; a 6.1 allyesconfig (~350k symbols) would take about
/// 25 MB. A forged table gets no further whatever its token table says:
/// without this bound, names that are one compressed byte each (a token
/// may hold the type letter too), every byte a `MAX_EXPANDED_NAME`
/// token, cost 1 KiB of heap per 6 bytes of table (length, token and
/// 4-byte offset).
pub const MAX_DECODED_BYTES: usize = 32 << 20;

/// Errors of locating and decoding the tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TablesError {
    /// The image has no run of the digit tokens, so no token table.
    #[error("no kallsyms token table (the \"0\"..\"9\" token run) in {len} bytes at {base:#x}")]
    NoTokenTable {
        /// Kernel-virtual start of the image searched.
        base: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// A token table, but no markers, names and symbol count before it
    /// that agree.
    #[error(
        "found a kallsyms token table at {token_table:#x} but no markers/names/num_syms \
         before it that decode consistently"
    )]
    NoNames {
        /// Kernel-virtual address of the token table.
        token_table: u64,
    },
    /// The names decode, but neither offsets placement gives sorted addresses.
    #[error(
        "kallsyms names at {names:#x} decode, but no kallsyms_offsets/kallsyms_relative_base \
         gives sorted kernel addresses (tried both the 6.1 and the 6.4+ placement)"
    )]
    NoOffsets {
        /// Kernel-virtual address of `kallsyms_names`.
        names: u64,
    },
    /// The search spent [`WORK_BUDGET`] without finding a table.
    #[error(
        "gave up looking for kallsyms in {len} bytes at {base:#x} after {WORK_BUDGET} units of \
         work: the memory does not look like a kernel's"
    )]
    BudgetExhausted {
        /// Kernel-virtual start of the image searched.
        base: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// A name expands past [`MAX_EXPANDED_NAME`] bytes.
    #[error(
        "kallsyms name {index} at {entry:#x} expands past {MAX_EXPANDED_NAME} bytes: the \
         table is corrupt or forged"
    )]
    NameTooLong {
        /// The symbol's index in kallsyms order.
        index: usize,
        /// Kernel-virtual address of its name entry.
        entry: u64,
    },
    /// The decoded table would exceed [`MAX_DECODED_BYTES`] of VMM heap.
    #[error(
        "kallsyms: {symbols} symbols would take more than {limit} bytes decoded (records plus \
         expanded names; over at name {index}): the table is corrupt or forged"
    )]
    TooLarge {
        /// The table's symbol count.
        symbols: usize,
        /// The name at which the limit was passed.
        index: usize,
        /// The limit in bytes.
        limit: usize,
    },
}

/// Remaining search work; see [`WORK_BUDGET`]. One budget may be shared
/// by the searches of several images (see [`decode_spending`]).
pub(crate) struct Budget(u64);

impl Budget {
    /// A whole [`WORK_BUDGET`].
    pub(crate) fn new() -> Self {
        Self(WORK_BUDGET)
    }

    /// A budget of `units` (tests: a budget that runs out sooner).
    #[cfg(test)]
    pub(crate) fn with(units: u64) -> Self {
        Self(units)
    }

    /// Units left.
    #[cfg(test)]
    pub(crate) fn left(&self) -> u64 {
        self.0
    }

    /// Whether nothing is left.
    pub(crate) fn is_spent(&self) -> bool {
        self.0 == 0
    }

    /// Spends `n` units; `None`, and nothing left, once the budget is gone.
    fn spend(&mut self, n: u64) -> Option<()> {
        let left = self.0.checked_sub(n);
        self.0 = left.unwrap_or(0);
        left.map(drop)
    }
}

/// How name lengths are stored: since Linux 6.1 a length >= 0x80 takes two
/// bytes (ULEB128), before that one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameLengths {
    /// ULEB128, one or two bytes (Linux 6.1+).
    Uleb128,
    /// One byte (before 6.1).
    OneByte,
}

/// Where `kallsyms_offsets` and `kallsyms_relative_base` sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Before `kallsyms_num_syms` (Linux 6.1 - 6.3).
    OffsetsFirst,
    /// After `kallsyms_token_index` (Linux 6.4+).
    OffsetsAfterTokenIndex,
}

/// How a 32-bit offset becomes an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressMode {
    /// CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86_64 SMP): a non-negative offset is
    /// the absolute value (per-CPU symbols), a negative one means
    /// `relative_base - 1 - offset`.
    AbsolutePercpu,
    /// `relative_base + (u32)offset`.
    Relative,
}

/// Virtual addresses of the tables, for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableAddrs {
    /// `kallsyms_num_syms`.
    pub num_syms: u64,
    /// `kallsyms_names`.
    pub names: u64,
    /// `kallsyms_markers`.
    pub markers: u64,
    /// `kallsyms_token_table`.
    pub token_table: u64,
    /// `kallsyms_token_index`.
    pub token_index: u64,
    /// `kallsyms_offsets`.
    pub offsets: u64,
    /// `kallsyms_relative_base`.
    pub relative_base: u64,
}

/// One decoded symbol, in kallsyms order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSymbol {
    /// The expanded name.
    pub name: String,
    /// The `nm`-style type character ('T', 't', 'D', ...).
    pub kind: char,
    /// Kernel-virtual address, or a per-CPU offset when `absolute`.
    pub addr: u64,
    /// True for per-CPU symbols stored as absolute values: their "address"
    /// is an offset into each CPU's per-CPU area.
    pub absolute: bool,
}

/// The decoded tables.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// Every symbol, in kallsyms order.
    pub symbols: Vec<RawSymbol>,
    /// The value of `kallsyms_relative_base`.
    pub relative_base: u64,
    /// Where the offsets were found.
    pub layout: Layout,
    /// How name lengths were encoded.
    pub name_lengths: NameLengths,
    /// How offsets became addresses.
    pub address_mode: AddressMode,
    /// Where each table is.
    pub addrs: TableAddrs,
}

/// A copy of kernel memory starting at virtual address `base`.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    /// Kernel-virtual address of `bytes[0]`.
    pub base: u64,
    /// The copied memory.
    pub bytes: &'a [u8],
}

impl Image<'_> {
    fn u16_at(&self, off: usize) -> Option<u16> {
        let b = self.bytes.get(off..off.checked_add(2)?)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        let b = self.bytes.get(off..off.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.bytes.get(off..off.checked_add(8)?)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    fn va(&self, off: usize) -> u64 {
        self.base.wrapping_add(off as u64)
    }

    /// Rounds image offset `off` up so its virtual address is 8-aligned.
    fn align8(&self, off: usize) -> Option<usize> {
        let mis = (self.va(off) % 8) as usize;
        if mis == 0 {
            Some(off)
        } else {
            off.checked_add(8 - mis)
        }
    }

    fn is_aligned8(&self, off: usize) -> bool {
        self.va(off) % 8 == 0
    }
}

/// The token table: 256 NUL-terminated strings and their offsets.
struct Tokens {
    /// Image offset of `kallsyms_token_table`.
    table: usize,
    /// Image offset of `kallsyms_token_index`.
    index: usize,
    /// Token i as bytes.
    tokens: Vec<Vec<u8>>,
}

/// Decodes everything, trying every token-table candidate in the image.
pub fn decode(image: Image<'_>) -> Result<Decoded, TablesError> {
    decode_spending(image, &mut Budget::new())
}

/// [`decode`], spending `budget`, which the caller may share between
/// images: a search of many images then costs no more than one.
pub(crate) fn decode_spending(
    image: Image<'_>,
    budget: &mut Budget,
) -> Result<Decoded, TablesError> {
    decode_within(image, MAX_DECODED_BYTES, budget)
}

/// [`decode_spending`], the decoded table taking at most `limit` bytes
/// (see [`MAX_DECODED_BYTES`]).
fn decode_within(
    image: Image<'_>,
    limit: usize,
    budget: &mut Budget,
) -> Result<Decoded, TablesError> {
    let exhausted = TablesError::BudgetExhausted {
        base: image.base,
        len: image.bytes.len(),
    };
    let mut last_err = None;
    for hit in memmem::find_iter(image.bytes, DIGIT_RUN) {
        let Some(tokens) = token_table_at(image, hit, budget) else {
            if budget.0 == 0 {
                return Err(exhausted);
            }
            continue;
        };
        match decode_with(image, &tokens, budget, limit) {
            Ok(d) => return Ok(d),
            Err(_) if budget.0 == 0 => return Err(exhausted),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or(TablesError::NoTokenTable {
        base: image.base,
        len: image.bytes.len(),
    }))
}

/// Validates a token table whose "0" token starts at image offset `zero`.
fn token_table_at(image: Image<'_>, zero: usize, budget: &mut Budget) -> Option<Tokens> {
    let bytes = image.bytes;
    // Walk back over tokens 0x2f..=0x01: each ends with the NUL just before
    // the start of the next one. Token 0 cannot be found this way (the table
    // before it may end in a non-zero byte); token_index tells its length.
    let mut start1 = zero;
    for _ in 1..0x30 {
        let nul = start1.checked_sub(1)?;
        if *bytes.get(nul)? != 0 {
            return None;
        }
        let lo = nul.saturating_sub(MAX_TOKEN_LEN);
        let window = bytes.get(lo..nul)?;
        let tok_start = lo + window.iter().rposition(|&b| b == 0)? + 1;
        budget.spend((nul - tok_start + 1) as u64)?;
        if tok_start >= nul {
            return None; // empty token: not a token table
        }
        start1 = tok_start;
    }
    // Forward from token 1: 255 non-empty tokens, then token_index.
    let mut tokens = Vec::with_capacity(256);
    let mut pos = start1;
    for _ in 1..256 {
        let rest = bytes.get(pos..)?;
        let len = rest.iter().take(MAX_TOKEN_LEN + 1).position(|&b| b == 0)?;
        if len == 0 {
            return None;
        }
        budget.spend(len as u64 + 1)?;
        tokens.push((pos, rest.get(..len)?.to_vec()));
        pos = pos.checked_add(len + 1)?;
    }
    let index = image.align8(pos)?;
    let token1_off = usize::from(image.u16_at(index.checked_add(2)?)?);
    let start = start1.checked_sub(token1_off)?;
    let token0 = bytes.get(start..start1.checked_sub(1)?)?;
    if token0.is_empty() || token0.contains(&0) || image.u16_at(index)? != 0 {
        return None;
    }
    tokens.insert(0, (start, token0.to_vec()));
    for (i, (tok_pos, _)) in tokens.iter().enumerate() {
        let stored = image.u16_at(index.checked_add(i * 2)?)?;
        if usize::from(stored) != tok_pos - start {
            return None;
        }
    }
    let tokens: Vec<Vec<u8>> = tokens.into_iter().map(|(_, t)| t).collect();
    // The digits must really be at 0x30..0x39.
    for (d, tok) in tokens.get(0x30..0x3a)?.iter().enumerate() {
        if tok.as_slice() != [b'0' + d as u8] {
            return None;
        }
    }
    Some(Tokens {
        table: start,
        index,
        tokens,
    })
}

/// Names and markers, once pinned down.
struct Names {
    num_syms_at: usize,
    num_syms: u32,
    names: usize,
    markers: usize,
    /// Per symbol: its token bytes (indices into the token table).
    entries: Vec<(usize, usize)>,
    lengths: NameLengths,
}

fn decode_with(
    image: Image<'_>,
    tokens: &Tokens,
    budget: &mut Budget,
    limit: usize,
) -> Result<Decoded, TablesError> {
    let names = find_names(image, tokens, budget).ok_or(TablesError::NoNames {
        token_table: image.va(tokens.table),
    })?;
    let (layout, mode, offsets_at, rb_at, relative_base, addrs) =
        find_offsets(image, tokens, &names, budget).ok_or(TablesError::NoOffsets {
            names: image.va(names.names),
        })?;
    let count = names.entries.len();
    let too_large = |index| TablesError::TooLarge {
        symbols: count,
        index,
        limit,
    };
    // The records first: refused before they are allocated.
    let mut total = count
        .checked_mul(std::mem::size_of::<RawSymbol>())
        .filter(|&t| t <= limit)
        .ok_or_else(|| too_large(0))?;
    let mut symbols = Vec::with_capacity(count);
    let mut buf = Vec::with_capacity(64);
    for (index, (&(start, len), (addr, absolute))) in names.entries.iter().zip(addrs).enumerate() {
        buf.clear();
        let entry = start
            .checked_add(len)
            .and_then(|end| image.bytes.get(start..end))
            .ok_or(TablesError::NoNames {
                token_table: image.va(tokens.table),
            })?;
        for &t in entry {
            // tokens has exactly 256 entries, so a u8 always indexes it.
            if let Some(tok) = tokens.tokens.get(usize::from(t)) {
                if buf.len() + tok.len() > MAX_EXPANDED_NAME {
                    return Err(TablesError::NameTooLong {
                        index,
                        entry: image.va(start),
                    });
                }
                buf.extend_from_slice(tok);
            }
        }
        budget
            .spend(buf.len() as u64)
            .ok_or(TablesError::BudgetExhausted {
                base: image.base,
                len: image.bytes.len(),
            })?;
        let (kind, name) = match buf.split_first() {
            Some((&k, rest)) => (char::from(k), String::from_utf8_lossy(rest).into_owned()),
            None => ('?', String::new()),
        };
        // The name as stored: invalid UTF-8 takes 3 bytes a byte.
        total = total
            .checked_add(name.len())
            .filter(|&t| t <= limit)
            .ok_or_else(|| too_large(index))?;
        symbols.push(RawSymbol {
            name,
            kind,
            addr,
            absolute,
        });
    }
    Ok(Decoded {
        symbols,
        relative_base,
        layout,
        name_lengths: names.lengths,
        address_mode: mode,
        addrs: TableAddrs {
            num_syms: image.va(names.num_syms_at),
            names: image.va(names.names),
            markers: image.va(names.markers),
            token_table: image.va(tokens.table),
            token_index: image.va(tokens.index),
            offsets: image.va(offsets_at),
            relative_base: image.va(rb_at),
        },
    })
}

/// Scans back from the token table for `kallsyms_markers` and, before it,
/// `kallsyms_num_syms` + `kallsyms_names`.
fn find_names(image: Image<'_>, tokens: &Tokens, budget: &mut Budget) -> Option<Names> {
    let lowest = tokens.table.saturating_sub(MAX_MARKERS_DISTANCE);
    let mut p = tokens.table.checked_sub(4)?;
    // Step to an 8-aligned offset.
    while !image.is_aligned8(p) {
        p = p.checked_sub(1)?;
    }
    loop {
        budget.spend(1)?;
        if image.u32_at(p) == Some(0) {
            // A run of strictly increasing u32s starting with this 0.
            let mut run = 1usize;
            let mut prev = 0u32;
            while let Some(v) = image.u32_at(p + run * 4) {
                if v <= prev || p + run * 4 >= tokens.table {
                    break;
                }
                budget.spend(1)?;
                prev = v;
                run += 1;
            }
            // The run may have swallowed a few bytes past the markers.
            for m in (run.saturating_sub(3).max(1)..=run).rev() {
                for lengths in [NameLengths::Uleb128, NameLengths::OneByte] {
                    if let Some(n) = names_for_markers(image, p, m, lengths, budget) {
                        return Some(n);
                    }
                    if budget.0 == 0 {
                        return None;
                    }
                }
            }
        }
        if p < lowest + 8 {
            return None;
        }
        p -= 8;
    }
}

/// Tries markers at image offset `markers` with `m` entries: find
/// `num_syms` (N with ceil(N/256) == m) 8 bytes before `names` such that
/// decoding N names ends right before the markers and every marker agrees.
fn names_for_markers(
    image: Image<'_>,
    markers: usize,
    m: usize,
    lengths: NameLengths,
    budget: &mut Budget,
) -> Option<Names> {
    let last = usize::try_from(image.u32_at(markers + (m - 1) * 4)?).ok()?;
    // names_start = num_syms_at + 8 and names_start + last < markers.
    let hi = markers.checked_sub(last)?.checked_sub(9)?;
    let lo = hi.saturating_sub(MAX_ENTRY_SEARCH * 256);
    let mut q = hi;
    while !image.is_aligned8(q) {
        q = q.checked_sub(1)?;
    }
    let min_n = (m - 1) * 256 + 1;
    let max_n = m * 256;
    loop {
        budget.spend(1)?;
        if let Some(n) = image.u32_at(q) {
            let n_us = n as usize;
            if n <= MAX_SYMBOLS && (min_n..=max_n).contains(&n_us) && image.u32_at(q + 4) == Some(0)
            {
                if let Some(names) = check_names(image, q, n, markers, m, lengths, budget) {
                    return Some(names);
                }
            }
        }
        if q < lo + 8 {
            return None;
        }
        q -= 8;
    }
}

/// Decodes `n` entries from `num_syms_at + 8`; they must end in the 8 bytes
/// before `markers`, and marker k must be the offset of entry 256k.
fn check_names(
    image: Image<'_>,
    num_syms_at: usize,
    n: u32,
    markers: usize,
    m: usize,
    lengths: NameLengths,
    budget: &mut Budget,
) -> Option<Names> {
    let names = num_syms_at + 8;
    let mut off = names;
    let mut entries = Vec::new();
    for i in 0..n as usize {
        budget.spend(1)?;
        if i % 256 == 0 {
            let marker = image.u32_at(markers + (i / 256) * 4)?;
            if u64::from(marker) != (off - names) as u64 {
                return None;
            }
        }
        let first = *image.bytes.get(off)?;
        let (len, hdr) = match lengths {
            NameLengths::Uleb128 if first & 0x80 != 0 => {
                let second = *image.bytes.get(off + 1)?;
                (usize::from(first & 0x7f) | (usize::from(second) << 7), 2)
            }
            _ => (usize::from(first), 1),
        };
        if len == 0 || len > MAX_NAME_LEN {
            return None;
        }
        let start = off + hdr;
        off = start.checked_add(len)?;
        if off > markers {
            return None;
        }
        entries.push((start, len));
    }
    if image.align8(off)? != markers || m != (n as usize).div_ceil(256) {
        return None;
    }
    Some(Names {
        num_syms_at,
        num_syms: n,
        names,
        markers,
        entries,
        lengths,
    })
}

type Offsets = (Layout, AddressMode, usize, usize, u64, Vec<(u64, bool)>);

fn find_offsets(
    image: Image<'_>,
    tokens: &Tokens,
    names: &Names,
    budget: &mut Budget,
) -> Option<Offsets> {
    let n = names.num_syms as usize;
    let table_len = n.checked_mul(4)?;
    let padded = table_len.checked_add(7)? & !7;
    let mut candidates = Vec::new();
    // 6.1-6.3: offsets, relative_base, then num_syms.
    if let Some(rb_at) = names.num_syms_at.checked_sub(8) {
        if let Some(offsets_at) = rb_at.checked_sub(padded) {
            candidates.push((Layout::OffsetsFirst, offsets_at, rb_at));
        }
    }
    // 6.4+: token_index (512 bytes), offsets, relative_base.
    if let Some(offsets_at) = tokens.index.checked_add(512).and_then(|o| image.align8(o)) {
        if let Some(rb_at) = offsets_at
            .checked_add(table_len)
            .and_then(|o| image.align8(o))
        {
            candidates.push((Layout::OffsetsAfterTokenIndex, offsets_at, rb_at));
        }
    }
    for (layout, offsets_at, rb_at) in candidates {
        let Some(base) = image.u64_at(rb_at) else {
            continue;
        };
        // A kernel address: upper half.
        if base < 0xffff_8000_0000_0000 {
            continue;
        }
        let Some(raw) = image.bytes.get(offsets_at..offsets_at + table_len) else {
            continue;
        };
        for mode in [AddressMode::AbsolutePercpu, AddressMode::Relative] {
            budget.spend(n as u64)?;
            let addrs: Vec<(u64, bool)> = raw
                .chunks_exact(4)
                .map(|c| {
                    let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    address(mode, base, v)
                })
                .collect();
            let sorted = addrs.windows(2).all(|w| w[0].0 <= w[1].0);
            let any_relative = addrs.iter().any(|&(_, abs)| !abs);
            if sorted && any_relative {
                return Some((layout, mode, offsets_at, rb_at, base, addrs));
            }
        }
    }
    None
}

/// The address of a symbol from its 32-bit offset (the kernel's
/// `kallsyms_sym_address()`), and whether it is absolute.
pub fn address(mode: AddressMode, relative_base: u64, raw: u32) -> (u64, bool) {
    match mode {
        AddressMode::AbsolutePercpu => {
            let off = raw as i32;
            if off >= 0 {
                (off as u64, true)
            } else {
                // relative_base - 1 - off, with off < 0: base + (-1 - off).
                let delta = (-1i64 - i64::from(off)) as u64;
                (relative_base.wrapping_add(delta), false)
            }
        }
        AddressMode::Relative => (relative_base.wrapping_add(u64::from(raw)), false),
    }
}

/// Synthetic kallsyms tables, for unit tests and the fuzz targets (the
/// `synth` feature): a kernel's symbol table without a kernel.
#[cfg(any(test, feature = "synth"))]
pub mod synth {
    use super::Layout;

    /// Builds kallsyms tables like scripts/kallsyms.c.
    pub struct Builder {
        /// Which kernel generation's table order to emit.
        pub layout: Layout,
        /// (type char, name, address); absolute if address < 0x1_0000_0000.
        pub syms: Vec<(char, String, u64)>,
        /// Bytes of unrelated data before the tables.
        pub prefix: usize,
        /// seqs_of_names between markers and token table (6.2-6.3).
        pub seqs: bool,
        /// Tokens put at these indices in place of the builder's own: a
        /// forged table, whose names (still encoded one byte per token)
        /// expand to these. The digits' indices must be left alone, and the
        /// whole token table must stay under 64 KiB (its index is u16).
        pub token_overrides: Vec<(u8, Vec<u8>)>,
    }

    /// Kernel-virtual address the tests place the built tables at; also the
    /// relative base when no symbol is above 4 GiB.
    pub const BASE: u64 = 0xffff_ffff_8200_0000;

    fn pad8(v: &mut Vec<u8>) {
        while v.len() % 8 != 0 {
            v.push(0);
        }
    }

    impl Builder {
        /// Tables for `syms` in `layout`: 24 bytes of prefix, no
        /// `seqs_of_names`, no forged tokens.
        pub fn new(layout: Layout, syms: Vec<(char, String, u64)>) -> Self {
            Self {
                layout,
                syms,
                prefix: 24,
                seqs: false,
                token_overrides: Vec::new(),
            }
        }

        /// Token table: single characters at their own index for every
        /// character used, and two-character tokens in the free slots.
        fn tokens(&self) -> Vec<Vec<u8>> {
            let mut used = [false; 256];
            for (k, n, _) in &self.syms {
                used[*k as usize] = true;
                for b in n.bytes() {
                    used[b as usize] = true;
                }
            }
            for d in b'0'..=b'9' {
                used[d as usize] = true;
            }
            let mut fill = [b"_x".as_slice(), b"sy", b"ab", b"qq"].into_iter().cycle();
            let mut tokens: Vec<Vec<u8>> = (0..256)
                .map(|i| {
                    if used[i] {
                        vec![i as u8]
                    } else {
                        fill.next().unwrap_or(b"_x").to_vec()
                    }
                })
                .collect();
            for (i, t) in &self.token_overrides {
                tokens[usize::from(*i)] = t.clone();
            }
            tokens
        }

        /// The image: prefix, then the tables in `layout`'s order.
        pub fn build(&self) -> Vec<u8> {
            let tokens = self.tokens();
            let n = self.syms.len();
            let relative_base = self
                .syms
                .iter()
                .map(|s| s.2)
                .filter(|&a| a >= 0x1_0000_0000)
                .min()
                .unwrap_or(BASE);
            let offsets: Vec<u8> = self
                .syms
                .iter()
                .flat_map(|&(_, _, a)| {
                    let v: i32 = if a < 0x1_0000_0000 {
                        a as i32
                    } else {
                        (relative_base as i64 - a as i64 - 1) as i32
                    };
                    v.to_le_bytes()
                })
                .collect();
            let mut names = Vec::new();
            let mut markers = Vec::new();
            for (i, (k, name, _)) in self.syms.iter().enumerate() {
                if i % 256 == 0 {
                    markers.extend_from_slice(&(names.len() as u32).to_le_bytes());
                }
                // Encode byte by byte: every character has its own token.
                let mut enc = vec![*k as u8];
                enc.extend(name.bytes());
                let len = enc.len();
                if len > 0x7f {
                    names.push((len as u8 & 0x7f) | 0x80);
                    names.push((len >> 7) as u8);
                } else {
                    names.push(len as u8);
                }
                names.extend(enc);
            }
            let mut token_table = Vec::new();
            let mut token_index = Vec::new();
            for t in &tokens {
                token_index.extend_from_slice(&(token_table.len() as u16).to_le_bytes());
                token_table.extend_from_slice(t);
                token_table.push(0);
            }

            let mut out = vec![0x5a; self.prefix];
            pad8(&mut out);
            let emit_offsets = |out: &mut Vec<u8>| {
                pad8(out);
                out.extend_from_slice(&offsets);
                pad8(out);
                out.extend_from_slice(&relative_base.to_le_bytes());
            };
            if self.layout == Layout::OffsetsFirst {
                emit_offsets(&mut out);
            }
            pad8(&mut out);
            out.extend_from_slice(&(n as u32).to_le_bytes());
            pad8(&mut out);
            out.extend_from_slice(&names);
            pad8(&mut out);
            out.extend_from_slice(&markers);
            if self.seqs {
                pad8(&mut out);
                for i in 0..n as u32 {
                    out.extend_from_slice(&i.to_be_bytes()[1..]);
                }
            }
            pad8(&mut out);
            out.extend_from_slice(&token_table);
            pad8(&mut out);
            out.extend_from_slice(&token_index);
            if self.layout == Layout::OffsetsAfterTokenIndex {
                emit_offsets(&mut out);
            }
            out.extend_from_slice(&[0xa5; 40]);
            out
        }
    }

    /// A plausible symbol list: two per-CPU symbols, `_text`, and `n`
    /// functions with a few duplicate names.
    pub fn sample_symbols(n: usize) -> Vec<(char, String, u64)> {
        let mut v = vec![
            ('A', "fixed_percpu_data".to_string(), 0),
            ('A', "current_task".to_string(), 0x1fb80),
            ('T', "_text".to_string(), 0xffff_ffff_8100_0000),
            ('T', "startup_64".to_string(), 0xffff_ffff_8100_0000),
        ];
        for i in 0..n {
            let kind = if i % 3 == 0 { 't' } else { 'T' };
            // A few duplicate names, like static functions in several files.
            let name = if i % 50 == 7 {
                "dup_fn".to_string()
            } else {
                format!("func_{i}_{}", "z".repeat(i % 7))
            };
            v.push((kind, name, 0xffff_ffff_8100_1000 + i as u64 * 0x40));
        }
        v
    }
}

#[cfg(test)]
pub(crate) mod tests {
    pub use super::synth::{sample_symbols, Builder, BASE};
    use super::*;

    fn check(b: &Builder) {
        let bytes = b.build();
        let d = decode(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap();
        assert_eq!(d.layout, b.layout);
        assert_eq!(d.symbols.len(), b.syms.len());
        for (got, (k, name, addr)) in d.symbols.iter().zip(&b.syms) {
            assert_eq!(
                (got.kind, got.name.as_str(), got.addr),
                (*k, name.as_str(), *addr)
            );
        }
        assert_eq!(d.address_mode, AddressMode::AbsolutePercpu);
    }

    #[test]
    fn a_name_that_expands_past_the_kernels_limit_is_refused() {
        let mut syms = sample_symbols(300);
        syms[3].1 = "x".repeat(1100);
        let bytes = Builder::new(Layout::OffsetsFirst, syms).build();
        let e = decode(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap_err();
        assert!(
            matches!(e, TablesError::NameTooLong { index: 3, .. }),
            "{e}"
        );
    }

    /// A forged table: token `~` stands for `len` bytes, and symbol `i`
    /// of `n` is named by `tildes(i)` of them.
    fn forged(n: usize, len: usize, tildes: impl Fn(usize) -> usize) -> Vec<u8> {
        let syms = (0..n)
            .map(|i| {
                let name = "~".repeat(tildes(i));
                ('T', name, 0xffff_ffff_8100_0000 + i as u64 * 16)
            })
            .collect();
        let mut b = Builder::new(Layout::OffsetsAfterTokenIndex, syms);
        b.token_overrides = vec![(b'~', vec![b'a'; len])];
        b.build()
    }

    #[test]
    fn forged_long_tokens_cannot_blow_up_a_name() {
        // 101 compressed bytes, well within any compressed-length bound,
        // expanding to 1 + 100 KiB.
        let bytes = forged(300, MAX_TOKEN_LEN, |i| if i == 5 { 100 } else { 0 });
        let e = decode(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap_err();
        assert!(
            matches!(e, TablesError::NameTooLong { index: 5, .. }),
            "{e}"
        );
        // One token past the limit is enough.
        let bytes = forged(300, MAX_TOKEN_LEN, |i| usize::from(i == 7));
        let e = decode(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap_err();
        assert!(
            matches!(e, TablesError::NameTooLong { index: 7, .. }),
            "{e}"
        );
    }

    #[test]
    fn forged_names_cannot_exceed_the_decoded_total() {
        // Every name one 1000-byte token: each just within the per-name
        // limit, 7 bytes of table each (length, type, token, offset).
        let per_symbol = std::mem::size_of::<RawSymbol>() + 1000;
        let n = MAX_DECODED_BYTES / per_symbol + 100;
        let bytes = forged(n, 1000, |_| 1);
        assert!(bytes.len() < 300 << 10, "{} bytes", bytes.len());
        let e = decode(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap_err();
        assert!(
            matches!(e, TablesError::TooLarge { symbols, index, .. }
                if symbols == n && index < n),
            "{e}"
        );
    }

    #[test]
    fn expanding_names_spends_the_work_budget() {
        // Three copies of a table just too large to decode: each candidate
        // would expand 32 MiB before it is refused. The budget pays for
        // two at most, and the third is not tried.
        let per_symbol = std::mem::size_of::<RawSymbol>() + 1000;
        let mut one = forged(MAX_DECODED_BYTES / per_symbol + 100, 1000, |_| 1);
        one.resize(one.len().next_multiple_of(8), 0);
        for copy in [0, one.len()] {
            let e = decode(Image {
                base: BASE + copy as u64,
                bytes: &one,
            });
            assert!(matches!(e, Err(TablesError::TooLarge { .. })), "{e:?}");
        }
        let bytes = [one.as_slice(), &one, &one].concat();
        let e = decode(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap_err();
        assert!(matches!(e, TablesError::BudgetExhausted { .. }), "{e}");
    }

    #[test]
    fn the_decoded_total_counts_records_and_names_exactly() {
        let syms = sample_symbols(600);
        let need = syms.len() * std::mem::size_of::<RawSymbol>()
            + syms.iter().map(|s| s.1.len()).sum::<usize>();
        let bytes = Builder::new(Layout::OffsetsFirst, syms.clone()).build();
        let image = Image {
            base: BASE,
            bytes: &bytes,
        };
        assert_eq!(
            decode_within(image, need, &mut Budget::new())
                .unwrap()
                .symbols
                .len(),
            syms.len()
        );
        let e = decode_within(image, need - 1, &mut Budget::new()).unwrap_err();
        assert!(
            matches!(e, TablesError::TooLarge { index, .. } if index == syms.len() - 1),
            "{e}"
        );
        // Too many records for the limit: refused before any name is
        // expanded (or the records allocated).
        let e = decode_within(
            image,
            syms.len() * std::mem::size_of::<RawSymbol>() - 1,
            &mut Budget::new(),
        )
        .unwrap_err();
        assert!(matches!(e, TablesError::TooLarge { index: 0, .. }), "{e}");
    }

    #[test]
    fn decodes_6_1_layout() {
        check(&Builder::new(Layout::OffsetsFirst, sample_symbols(1000)));
    }

    #[test]
    fn decodes_6_4_layout() {
        check(&Builder::new(
            Layout::OffsetsAfterTokenIndex,
            sample_symbols(1000),
        ));
    }

    #[test]
    fn decodes_6_3_layout_with_seqs() {
        let mut b = Builder::new(Layout::OffsetsFirst, sample_symbols(700));
        b.seqs = true;
        check(&b);
    }

    #[test]
    fn decodes_small_tables_and_long_names() {
        let mut syms = sample_symbols(3);
        syms.push(('T', "r".repeat(300), 0xffff_ffff_8200_0000));
        check(&Builder::new(Layout::OffsetsFirst, syms));
    }

    #[test]
    fn percpu_address_rule() {
        let base = 0xffff_ffff_b660_0000;
        assert_eq!(
            address(AddressMode::AbsolutePercpu, base, 0x1fb80),
            (0x1fb80, true)
        );
        assert_eq!(
            address(AddressMode::AbsolutePercpu, base, u32::MAX),
            (base, false)
        );
        assert_eq!(
            address(AddressMode::AbsolutePercpu, base, (-0x101i32) as u32),
            (base + 0x100, false)
        );
        assert_eq!(
            address(AddressMode::Relative, base, 0x10),
            (base + 0x10, false)
        );
    }

    #[test]
    fn no_tables_is_an_error() {
        let bytes = vec![0u8; 4096];
        assert!(matches!(
            decode(Image {
                base: BASE,
                bytes: &bytes
            }),
            Err(TablesError::NoTokenTable { .. })
        ));
    }

    #[test]
    fn truncated_tables_are_errors_at_every_length() {
        let bytes = Builder::new(Layout::OffsetsFirst, sample_symbols(300)).build();
        for cut in (0..bytes.len() - 40).step_by(97) {
            let r = decode(Image {
                base: BASE,
                bytes: &bytes[..cut],
            });
            assert!(r.is_err(), "cut at {cut} decoded");
        }
        let bytes = Builder::new(Layout::OffsetsAfterTokenIndex, sample_symbols(300)).build();
        for cut in (0..bytes.len() - 40).step_by(89) {
            assert!(decode(Image {
                base: BASE,
                bytes: &bytes[..cut]
            })
            .is_err());
        }
    }

    #[test]
    fn corrupt_tables_never_panic() {
        let good = Builder::new(Layout::OffsetsFirst, sample_symbols(600)).build();
        // Flip bytes all over, including absurd counts and lengths.
        let mut seed = 0x1234_5678u32;
        for _ in 0..300 {
            let mut bytes = good.clone();
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let i = seed as usize % bytes.len();
                bytes[i] = (seed >> 8) as u8;
            }
            let _ = decode(Image {
                base: BASE,
                bytes: &bytes,
            });
        }
        // num_syms = u32::MAX.
        let mut bytes = good.clone();
        let zero = memmem::find(&bytes, DIGIT_RUN).unwrap();
        for w in bytes[..zero].chunks_exact_mut(4) {
            if u32::from_le_bytes([w[0], w[1], w[2], w[3]]) == 604 {
                w.copy_from_slice(&u32::MAX.to_le_bytes());
            }
        }
        assert!(decode(Image {
            base: BASE,
            bytes: &bytes
        })
        .is_err());
    }

    #[test]
    fn crafted_memory_cannot_stall_the_search() {
        // A megabyte of zeros, then a real token table with nothing valid
        // before it: every zero is a markers candidate.
        let real = Builder::new(Layout::OffsetsFirst, sample_symbols(300)).build();
        let zero = memmem::find(&real, DIGIT_RUN).unwrap();
        let table_start = zero - 0x400; // somewhere before token 0
        let mut bytes = vec![0u8; 1 << 20];
        bytes.extend_from_slice(&real[table_start..]);
        let t = std::time::Instant::now();
        let r = decode(Image {
            base: BASE,
            bytes: &bytes,
        });
        assert!(r.is_err());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn unsorted_offsets_are_rejected() {
        let mut syms = sample_symbols(20);
        syms.swap(10, 11);
        let bytes = Builder::new(Layout::OffsetsFirst, syms).build();
        assert!(matches!(
            decode(Image {
                base: BASE,
                bytes: &bytes
            }),
            Err(TablesError::NoOffsets { .. })
        ));
    }
}

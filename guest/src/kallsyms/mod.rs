//! The guest kernel's symbol table, decoded from its own memory.
//!
//! Patches are resolved against the running kernel, not against a
//! System.map (Debian ships the real one only in a 283 MB -dbg package), so
//! the engine reads the compressed kallsyms tables the kernel itself uses
//! for /proc/kallsyms. Only the core kernel's symbols are there; module
//! symbols live in each module's own tables.

pub(crate) mod tables;

use crate::paging::{AddressSpace, MappedRun, PagingError, VirtRead};
use crate::Guest;

/// Synthetic kallsyms tables for tests and the fuzz targets.
#[cfg(any(test, feature = "synth"))]
pub use tables::synth;
pub use tables::{
    AddressMode, Image, Layout, NameLengths, TableAddrs, TablesError, MAX_DECODED_BYTES,
    MAX_SYMBOLS,
};

/// The end of the kernel image window (modules start here on x86_64).
pub const KERNEL_IMAGE_END: u64 = 0xffff_ffff_c000_0000;
/// We never copy more than this much of one mapped range while searching.
const MAX_RUN_BYTES: u64 = 256 << 20;

/// Errors of loading and querying kallsyms.
#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    /// The kernel image could not be read through the page tables.
    #[error("cannot read kernel memory while looking for kallsyms: {0}")]
    Memory(#[from] PagingError),
    /// No mapped range of the kernel image holds tables that decode.
    #[error(
        "no usable kallsyms tables in the kernel image ({runs} mapped ranges from {start:#x} \
         searched){}",
        last.as_ref().map(|e| format!("; last problem: {e}")).unwrap_or_default()
    )]
    NotFound {
        /// `_text`: where the search of the kernel image window began.
        start: u64,
        /// How many mapped ranges were searched.
        runs: usize,
        /// Why the last candidate table was refused, if one was found.
        last: Option<String>,
    },
    /// No kallsyms entry has this name.
    #[error("the symbol `{name}` is not in the guest kernel's kallsyms")]
    NoSymbol {
        /// The name looked up.
        name: String,
    },
    /// The name occurs more than once and no sympos was given.
    #[error(
        "the symbol `{name}` is ambiguous: the guest kernel has {count} of that name; \
         pick one with a sympos from 1 to {count}"
    )]
    Ambiguous {
        /// The name looked up.
        name: String,
        /// How many symbols have it.
        count: usize,
    },
    /// The sympos is past the symbols of that name.
    #[error("the symbol `{name}` occurs {count} time(s) in the guest kernel: there is no sympos {sympos}")]
    NoSuchPosition {
        /// The name looked up.
        name: String,
        /// The 1-based position asked for.
        sympos: u32,
        /// How many symbols have the name.
        count: usize,
    },
}

/// One kernel symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// The name as /proc/kallsyms shows it.
    pub name: String,
    /// `nm`-style type, as /proc/kallsyms shows it ('T', 't', 'D', 'A', ...).
    pub kind: char,
    /// Kernel-virtual address (KASLR applied), or a per-CPU offset when
    /// `absolute`.
    pub addr: u64,
    /// A per-CPU symbol: `addr` is an offset into each CPU's per-CPU area.
    pub absolute: bool,
}

/// A symbol found by name, with its klp `sympos` (1-based position among
/// the symbols of that name, in kallsyms order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found<'a> {
    /// 1-based position among the symbols of its name.
    pub sympos: u32,
    /// The symbol.
    pub symbol: &'a Symbol,
}

/// An address explained as symbol + offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located<'a> {
    /// The symbol at or below the address.
    pub symbol: &'a Symbol,
    /// The address minus the symbol's.
    pub offset: u64,
}

/// The decoded symbol table with name and address lookups.
#[derive(Debug, Clone)]
pub struct Kallsyms {
    symbols: Vec<Symbol>,
    /// Symbol indices sorted by name, ties in kallsyms order.
    by_name: Vec<u32>,
    /// Index of the first symbol that is a real address (the absolute
    /// per-CPU symbols sort first).
    first_relative: usize,
    relative_base: u64,
    layout: Layout,
    name_lengths: NameLengths,
    address_mode: AddressMode,
    addrs: TableAddrs,
}

impl Kallsyms {
    /// Finds and decodes the tables in a copy of kernel memory.
    pub fn from_image(image: Image<'_>) -> Result<Self, TablesError> {
        tables::decode(image).map(Self::from_decoded)
    }

    fn from_decoded(d: tables::Decoded) -> Self {
        let symbols: Vec<Symbol> = d
            .symbols
            .into_iter()
            .map(|s| Symbol {
                name: s.name,
                kind: s.kind,
                addr: s.addr,
                absolute: s.absolute,
            })
            .collect();
        let first_relative = symbols
            .iter()
            .position(|s| !s.absolute)
            .unwrap_or(symbols.len());
        // The table holds at most MAX_SYMBOLS entries, so indices fit in u32.
        let mut by_name: Vec<u32> = (0..symbols.len() as u32).collect();
        by_name.sort_unstable_by(|&a, &b| {
            name_of(&symbols, a)
                .cmp(name_of(&symbols, b))
                .then(a.cmp(&b))
        });
        Self {
            symbols,
            by_name,
            first_relative,
            relative_base: d.relative_base,
            layout: d.layout,
            name_lengths: d.name_lengths,
            address_mode: d.address_mode,
            addrs: d.addrs,
        }
    }

    /// Finds kallsyms in the running kernel: copies each mapped range of
    /// the kernel image from `text` up (read-only, non-executable ranges
    /// first: that is where .rodata is after boot) and decodes the first
    /// one that holds valid tables. The ranges share one search budget
    /// (`WORK_BUDGET` of the tables' search): page tables that split the window into
    /// many ranges, each holding a forged table, cost no more than one.
    pub fn load<G: Guest + ?Sized>(
        space: &AddressSpace<'_, G>,
        text: u64,
    ) -> Result<Self, KallsymsError> {
        Self::load_spending(space, text, &mut tables::Budget::new())
    }

    /// [`Kallsyms::load`] on a budget the caller may share between
    /// searches ([`crate::Kernel::open`] shares one between all the page
    /// tables it tries).
    pub(crate) fn load_spending<G: Guest + ?Sized>(
        space: &AddressSpace<'_, G>,
        text: u64,
        budget: &mut tables::Budget,
    ) -> Result<Self, KallsymsError> {
        let mut runs = space.mapped_runs(text, KERNEL_IMAGE_END)?;
        // Stable: rodata-like ranges first, then the rest in address order.
        runs.sort_by_key(|r: &MappedRun| r.writable || r.executable);
        // A range we cannot copy (too large, or backed by nothing) cannot
        // hold the tables we want; the search goes on.
        let images = runs.iter().map(|run| {
            space
                .read_vec(run.start, run.len(), MAX_RUN_BYTES, "a kernel image range")
                .map(|bytes| (run.start, bytes))
                .map_err(|e| e.to_string())
        });
        Self::search(images, budget).map_err(|(searched, last)| KallsymsError::NotFound {
            start: text,
            runs: searched,
            last,
        })
    }

    /// The first of `images` (base, bytes, or why it could not be read)
    /// that holds valid tables, all searched on one budget; else how many
    /// were searched and the last problem.
    fn search(
        images: impl IntoIterator<Item = Result<(u64, Vec<u8>), String>>,
        budget: &mut tables::Budget,
    ) -> Result<Self, (usize, Option<String>)> {
        let mut last = None;
        let mut searched = 0;
        for image in images {
            searched += 1;
            let (base, bytes) = match image {
                Ok(i) => i,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match tables::decode_spending(
                Image {
                    base,
                    bytes: &bytes,
                },
                budget,
            ) {
                Ok(d) => return Ok(Self::from_decoded(d)),
                Err(e) => last = Some(e.to_string()),
            }
            if budget.is_spent() {
                break;
            }
        }
        Err((searched, last))
    }

    /// Every symbol, in kallsyms order (sorted by address; per-CPU first).
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether there are no symbols.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// `kallsyms_relative_base` (the lowest non-per-CPU symbol address).
    pub fn relative_base(&self) -> u64 {
        self.relative_base
    }

    /// Where the offsets table was found (which kernel generation's layout).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// How the name entries' lengths were encoded.
    pub fn name_lengths(&self) -> NameLengths {
        self.name_lengths
    }

    /// How the 32-bit offsets became addresses.
    pub fn address_mode(&self) -> AddressMode {
        self.address_mode
    }

    /// Where the tables were found.
    pub fn table_addrs(&self) -> TableAddrs {
        self.addrs
    }

    /// All symbols called `name`, with their sympos, in kallsyms order.
    pub fn lookup(&self, name: &str) -> Vec<Found<'_>> {
        let lo = self
            .by_name
            .partition_point(|&i| name_of(&self.symbols, i) < name);
        let hi = self
            .by_name
            .partition_point(|&i| name_of(&self.symbols, i) <= name);
        self.by_name
            .get(lo..hi)
            .unwrap_or_default()
            .iter()
            .filter_map(|&i| self.symbols.get(i as usize))
            .zip(1u32..)
            .map(|(symbol, sympos)| Found { sympos, symbol })
            .collect()
    }

    /// klp's sympos rule: 0 means the name must be unique, n picks the
    /// n-th symbol of that name in kallsyms order.
    pub fn resolve(&self, name: &str, sympos: u32) -> Result<u64, KallsymsError> {
        let found = self.lookup(name);
        match (found.len(), sympos) {
            (0, _) => Err(KallsymsError::NoSymbol { name: name.into() }),
            (1, 0) => Ok(found[0].symbol.addr),
            (count, 0) => Err(KallsymsError::Ambiguous {
                name: name.into(),
                count,
            }),
            (count, n) => found
                .iter()
                .find(|f| f.sympos == n)
                .map(|f| f.symbol.addr)
                .ok_or(KallsymsError::NoSuchPosition {
                    name: name.into(),
                    sympos: n,
                    count,
                }),
        }
    }

    /// The address of the first symbol called `name` (for kernel-internal
    /// names like `init_task` that are unique in practice).
    pub fn addr(&self, name: &str) -> Result<u64, KallsymsError> {
        self.lookup(name)
            .first()
            .map(|f| f.symbol.addr)
            .ok_or_else(|| KallsymsError::NoSymbol { name: name.into() })
    }

    /// The symbol containing `addr`, as the kernel's `get_symbol_pos()`
    /// picks it: the first of the symbols at the highest address <= `addr`,
    /// provided `addr` is below the next higher symbol. Per-CPU offsets are
    /// not addresses and never match.
    pub fn locate(&self, addr: u64) -> Option<Located<'_>> {
        let real = self.symbols.get(self.first_relative..)?;
        let k = real.partition_point(|s| s.addr <= addr);
        let mut i = k.checked_sub(1)?;
        let sym_addr = real.get(i)?.addr;
        if let Some(next) = real.get(k) {
            if addr >= next.addr {
                return None;
            }
        } else if addr != sym_addr {
            return None; // past the last symbol: no known end
        }
        while i > 0 && real.get(i - 1).map(|s| s.addr) == Some(sym_addr) {
            i -= 1;
        }
        Some(Located {
            symbol: real.get(i)?,
            offset: addr - sym_addr,
        })
    }

    /// The extent of the symbol starting at `addr`: up to the next higher
    /// symbol (kallsyms records no sizes). None if no symbol starts there
    /// or it is the last one.
    pub fn extent(&self, addr: u64) -> Option<std::ops::Range<u64>> {
        let real = self.symbols.get(self.first_relative..)?;
        let k = real.partition_point(|s| s.addr <= addr);
        let start = real.get(k.checked_sub(1)?)?.addr;
        if start != addr {
            return None;
        }
        Some(start..real.get(k)?.addr)
    }
}

fn name_of(symbols: &[Symbol], i: u32) -> &str {
    symbols
        .get(i as usize)
        .map(|s| s.name.as_str())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::tables::tests::{sample_symbols, Builder, BASE};
    use super::*;

    fn sample() -> Kallsyms {
        let bytes = Builder::new(Layout::OffsetsFirst, sample_symbols(400)).build();
        Kallsyms::from_image(Image {
            base: BASE,
            bytes: &bytes,
        })
        .unwrap()
    }

    #[test]
    fn ranges_searched_share_one_budget() {
        // Ranges each holding a forged table that fails only at its last
        // name, after expanding 199 names of 1000 bytes: 400 of them would
        // expand 80 MB on budgets of their own.
        let syms = (0..200)
            .map(|i| {
                let name = if i == 199 { "~~" } else { "~" };
                ('T', name.to_string(), 0xffff_ffff_8100_0000 + i as u64 * 16)
            })
            .collect();
        let mut b = Builder::new(Layout::OffsetsAfterTokenIndex, syms);
        b.token_overrides = vec![(b'~', vec![b'a'; 1000])];
        let forged = b.build();
        assert!(matches!(
            Kallsyms::from_image(Image {
                base: BASE,
                bytes: &forged
            }),
            Err(TablesError::NameTooLong { index: 199, .. })
        ));
        let images = (0..400).map(|_| Ok((BASE, forged.clone())));
        let (searched, last) = Kallsyms::search(images, &mut tables::Budget::new()).unwrap_err();
        let last = last.unwrap_or_default();
        assert!(searched < 400, "{searched} ranges searched; last: {last}");
        assert!(last.contains("units of work"), "{last}");
        // The real table is still found behind ranges that fail cheaply.
        let real = Builder::new(Layout::OffsetsFirst, sample_symbols(400)).build();
        let images = (0..400)
            .map(|_| Ok((BASE, vec![0u8; 4096])))
            .chain([Err("unreadable".to_string()), Ok((BASE, real))]);
        assert_eq!(
            Kallsyms::search(images, &mut tables::Budget::new())
                .unwrap()
                .len(),
            404
        );
    }

    #[test]
    fn lookup_by_name_with_sympos() {
        let k = sample();
        let dups = k.lookup("dup_fn");
        assert_eq!(dups.len(), 8);
        assert_eq!(
            dups.iter().map(|f| f.sympos).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>()
        );
        assert!(dups.windows(2).all(|w| w[0].symbol.addr < w[1].symbol.addr));
        assert_eq!(k.resolve("dup_fn", 3).unwrap(), dups[2].symbol.addr);
        assert!(matches!(
            k.resolve("dup_fn", 0),
            Err(KallsymsError::Ambiguous { count: 8, .. })
        ));
        assert!(matches!(
            k.resolve("dup_fn", 9),
            Err(KallsymsError::NoSuchPosition { sympos: 9, .. })
        ));
        assert!(matches!(
            k.resolve("nope", 0),
            Err(KallsymsError::NoSymbol { .. })
        ));
        assert_eq!(k.resolve("_text", 0).unwrap(), 0xffff_ffff_8100_0000);
        assert_eq!(k.resolve("_text", 1).unwrap(), 0xffff_ffff_8100_0000);
    }

    #[test]
    fn locate_by_address() {
        let k = sample();
        // _text and startup_64 share an address: the first one wins.
        let l = k.locate(0xffff_ffff_8100_0010).unwrap();
        assert_eq!((l.symbol.name.as_str(), l.offset), ("_text", 0x10));
        let l = k.locate(0xffff_ffff_8100_1041).unwrap();
        assert_eq!((l.symbol.name.as_str(), l.offset), ("func_1_z", 1));
        assert!(
            k.locate(0x1fb80).is_none(),
            "per-CPU offsets are not addresses"
        );
        assert!(k.locate(0xffff_ffff_8000_0000).is_none());
        let last = k.symbols().last().unwrap().addr;
        assert_eq!(k.locate(last).unwrap().offset, 0);
        assert!(k.locate(last + 1).is_none());
        assert!(k.symbols()[1].absolute && !k.symbols()[2].absolute);
    }
}

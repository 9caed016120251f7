//! The kallsyms decoder over arbitrary kernel memory, then every lookup
//! the engine makes on a decoded table.
#![no_main]

use klpvisor_fuzz::WINDOW;
use klpvisor_guest::kallsyms::{Image, Symbol, MAX_DECODED_BYTES};
use klpvisor_guest::Kallsyms;
use libfuzzer_sys::fuzz_target;

/// Lookups per input: enough to reach every path, bounded per run.
const MAX_LOOKUPS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(k) = Kallsyms::from_image(Image {
        base: WINDOW,
        bytes: data,
    }) else {
        return;
    };
    // However the tokens expand, the decoded table stays within its bound.
    let decoded = k.len() * std::mem::size_of::<Symbol>()
        + k.symbols().iter().map(|s| s.name.len()).sum::<usize>();
    assert!(decoded <= MAX_DECODED_BYTES, "{decoded} bytes decoded");
    for s in k.symbols().iter().take(MAX_LOOKUPS) {
        // Every decoded name is found again, each at its sympos (the
        // first few: each resolve collects every symbol of the name, and a
        // table may have thousands of one name).
        let found = k.lookup(&s.name);
        assert!(found.iter().any(|f| std::ptr::eq(f.symbol, s)));
        for f in found.iter().take(MAX_LOOKUPS) {
            assert_eq!(k.resolve(&s.name, f.sympos).ok(), Some(f.symbol.addr));
        }
        let _ = k.resolve(&s.name, 0);
        let _ = k.locate(s.addr);
        let _ = k.locate(s.addr.wrapping_add(1));
        let _ = k.extent(s.addr);
    }
    let _ = k.addr("_text");
});

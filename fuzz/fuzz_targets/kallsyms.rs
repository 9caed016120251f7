//! The kallsyms decoder over arbitrary kernel memory, then every lookup
//! the engine makes on a decoded table.
#![no_main]

use klpvisor_fuzz::WINDOW;
use libfuzzer_sys::fuzz_target;
use klpvisor_guest::kallsyms::Image;
use klpvisor_guest::Kallsyms;

/// Lookups per input: enough to reach every path, bounded per run.
const MAX_LOOKUPS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(k) = Kallsyms::from_image(Image {
        base: WINDOW,
        bytes: data,
    }) else {
        return;
    };
    for s in k.symbols().iter().take(MAX_LOOKUPS) {
        // Every decoded name is found again, each at its sympos.
        let found = k.lookup(&s.name);
        assert!(found.iter().any(|f| f.symbol == s));
        for f in &found {
            assert_eq!(k.resolve(&s.name, f.sympos).ok(), Some(f.symbol.addr));
        }
        let _ = k.resolve(&s.name, 0);
        let _ = k.locate(s.addr);
        let _ = k.locate(s.addr.wrapping_add(1));
        let _ = k.extent(s.addr);
    }
    let _ = k.addr("_text");
});

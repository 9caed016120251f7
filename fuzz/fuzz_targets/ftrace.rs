//! The ftrace record walker (`FtraceRecords::load_in`: the list of
//! `struct ftrace_page` from `ftrace_pages_start`, each holding `index`
//! `struct dyn_ftrace` records) over arbitrary kernel memory: the input is
//! mapped at `WINDOW`, where the fixed kernel's `ftrace_pages_start` is
//! (`klpvisor_fuzz::FTRACE_PAGES_START`, just past the header).
//!
//! Header (64 bytes): the struct layouts as u16s (ftrace_page size, next,
//! records, index; dyn_ftrace size, ip, flags), then two extra ranges of
//! module text (start, end) as u64s; the rest is zero padding.
//!
//! Invariants: every record kept is in kernel text or an extra range, has
//! the address of its flags word, and the count
//! stays within the walker's bound.
#![no_main]

use klpvisor_engine::site::FtraceRecords;
use klpvisor_fuzz::{ftrace_kallsyms, Bytes, FtraceLayout, Window, ETEXT, STEXT, WINDOW};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = Bytes(data);
    let mut u = || u32::from(h.u16());
    let layout = FtraceLayout {
        page_size: u(),
        next: u(),
        records: u(),
        index: u(),
        rec_size: u(),
        ip: u(),
        flags: u(),
    };
    let _ = h.take(2);
    let extra = [h.u64()..h.u64(), h.u64()..h.u64()];
    let Some(btf) = layout.btf() else {
        return;
    };
    let mem = Window {
        base: WINDOW,
        bytes: data,
    };
    let Ok(records) = FtraceRecords::load_in(&mem, ftrace_kallsyms(), &btf, &extra) else {
        return;
    };
    assert!(records.len() as u64 <= (1 << 22));
    for ip in records.iter() {
        assert!((STEXT..ETEXT).contains(&ip) || extra.iter().any(|r| r.contains(&ip)));
        let word = records.flags_word(ip);
        assert!(word.is_some(), "{ip:#x} has no flags word");
    }
});

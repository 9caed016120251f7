//! A livepatch module (.ko) of arbitrary bytes, parsed against the klp
//! layouts of fixtures/klp.btf and, if it parses, linked against the fixed
//! kernel's kallsyms just past `_end`, as the engine places the arena; and
//! read offline with the built-in layouts, as `patcher info` reads it.
#![no_main]

use klpvisor_engine::link::alternatives::{Flavor, GuestCpu};
use klpvisor_engine::link::{self, Bases, LinkOptions, NOP5};
use klpvisor_engine::module::{inspect, KlpLayouts, Module};
use klpvisor_fuzz::{kallsyms, klp_btf, END, RELEASE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `patcher info`'s offline reading of the same bytes must not panic either.
    let _ = inspect(data, &KlpLayouts::builtin());
    let Ok(m) = Module::parse(data, klp_btf(), RELEASE) else {
        return;
    };
    let layout = m.layout();
    let text = END.next_multiple_of(2 << 20);
    let bases = Bases {
        text,
        rodata: text.saturating_add(layout.text),
        data: text
            .saturating_add(layout.text)
            .saturating_add(layout.rodata),
        percpu: 0x3_1000,
    };
    let options = LinkOptions {
        return_thunk: kallsyms().addr("__x86_return_thunk").ok(),
        // The input decides: a module linked both ways must not panic.
        plain_returns: data.last().is_some_and(|b| b & 1 == 1),
        // Both kernels' alternative rules, every feature present or none.
        alternatives: Some(GuestCpu {
            flavor: if data.last().is_some_and(|b| b & 2 == 2) {
                Flavor::V6_12
            } else {
                Flavor::V6_1
            },
            layout: if data.last().is_some_and(|b| b & 2 == 2) {
                Flavor::V6_12.default_layout()
            } else {
                Flavor::V6_1.default_layout()
            },
            caps: vec![
                if data.last().is_some_and(|b| b & 4 == 4) {
                    u32::MAX
                } else {
                    0
                };
                21
            ],
            pv_ops: None,
            bug_func: None,
            nop_func: None,
        }),
    };
    let Ok(l) = link::link(&m, kallsyms(), bases, &options) else {
        return;
    };
    // What module_link.rs checks of every real module: each segment is
    // its laid-out size and every fentry call became the 5-byte nop.
    assert_eq!(l.text.bytes.len() as u64, layout.text);
    assert_eq!(l.rodata.bytes.len() as u64, layout.rodata);
    assert_eq!(l.data.bytes.len() as u64, layout.data);
    for &va in &l.fentry_nops {
        assert_eq!(l.read(va, 5), Some(&NOP5[..]));
    }
});

//! The control socket's request decoding: JSON bodies of every type in
//! klpvisor_api (the VMM decodes `PATCH /vm`'s, the CLI decodes the
//! replies), query strings as axum's `Query` extractor decodes them, and
//! the hex numbers both take. The first byte picks the decoder, the rest
//! is the text.
//!
//! Invariant: whatever decodes, re-encodes to JSON that decodes to the same
//! JSON (compared as `serde_json::Value`, which keeps numbers exactly).
#![no_main]

use std::collections::HashMap;

use klpvisor_api::*;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: DeserializeOwned + Serialize>(text: &[u8]) {
    let Ok(v) = serde_json::from_slice::<T>(text) else {
        return;
    };
    let Ok(once) = serde_json::to_value(&v) else {
        return;
    };
    let again: T = match serde_json::from_value(once.clone()) {
        Ok(a) => a,
        Err(e) => panic!("{once} was encoded but does not decode: {e}"),
    };
    assert_eq!(serde_json::to_value(&again).ok(), Some(once));
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    match which % 18 {
        0 => round_trip::<StateChange>(text),
        1 => round_trip::<ErrorReply>(text),
        2 => round_trip::<VmInfo>(text),
        3 => round_trip::<KernelInfo>(text),
        4 => round_trip::<PauseReply>(text),
        5 => round_trip::<ResumeReply>(text),
        6 => round_trip::<RegsReply>(text),
        7 => round_trip::<MemoryReply>(text),
        8 => round_trip::<SymbolsReply>(text),
        9 => round_trip::<AddrReply>(text),
        10 => round_trip::<TasksReply>(text),
        11 => round_trip::<PatchesReply>(text),
        12 => round_trip::<TransitionReply>(text),
        13 => round_trip::<Vec<HistoryEntry>>(text),
        14 => round_trip::<RollbackReply>(text),
        15 => round_trip::<Hex>(text),
        16 => {
            // What `Query<HashMap<String, String>>` hands the handlers.
            let _ = serde_urlencoded::from_bytes::<HashMap<String, String>>(text);
        }
        _ => {
            // Hex addresses from query parameters: a parsed value prints
            // back as the same number.
            if let Ok(s) = std::str::from_utf8(text) {
                if let Ok(v) = parse_hex(s) {
                    assert_eq!(parse_hex(&Hex(v).to_string()), Ok(v));
                }
            }
        }
    }
});

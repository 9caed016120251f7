//! guest_hash SOCK: FNV-1a hashes of the kernel text and of the whole patch
//! arena but klpvisor's own code and data pages, installed on first use
//! and kept: the call gate's two (its mailbox records every call sent, and
//! so changes by design), the ftrace redirect handler's, and the switch
//! log's probe and ring (whose head counts every context switch while it
//! is registered), which are hashed as the zero pages they were before.
//! What a refused patch must leave untouched. It first waits for the VMM
//! to let go of ftrace redirects no patch uses and of the switch log.
#![forbid(unsafe_code)]

use std::process::ExitCode;

mod common;

fn main() -> ExitCode {
    let args = match common::args("guest_hash SOCK", 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| guest_hash(&args[0]))
}

fn guest_hash(sock: &str) -> Result<(), String> {
    let c = common::client(sock)?;
    // Not while the VMM lets go of unused ftrace redirects (their entries
    // are ftrace's until then).
    common::ops_settled(&c, std::time::Duration::from_secs(30))?;
    let text = common::text_hash(&c)?;
    let vm = c.vm().map_err(|e| e.to_string())?;
    let patches = c.patches().map_err(|e| e.to_string())?;
    let mut skip: Vec<u64> = patches
        .gate
        .map(|g| vec![g.data_gpa.0, g.text_gpa.0])
        .unwrap_or_default();
    skip.extend(patches.ftrace_handler_gpa.map(|h| h.0));
    if let Some(l) = &patches.switch_log {
        skip.push(l.probe_gpa.0);
        skip.extend((0..l.ring_bytes / 4096).map(|i| l.ring_gpa.0 + i * 4096));
    }
    let mut h = common::FNV_OFFSET;
    let start = vm.arena_gpa.0;
    common::read_phys_hex(&c, start, start + vm.arena_size, &skip, |hex| {
        for b in hex.bytes() {
            h = common::fnv(h, u64::from(b));
        }
    })?;
    println!("KLPV-RESULT guest-hash text={text:016x} arena={h:016x}");
    Ok(())
}

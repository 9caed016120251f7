//! guest_hash SOCK: FNV-1a hashes of the kernel text and of the whole patch
//! arena but the call gate's data page (its mailbox, which records every
//! callback sent and so changes by design): what a refused patch must
//! leave untouched.
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
    let text = common::text_hash(&c)?;
    let vm = c.vm().map_err(|e| e.to_string())?;
    let patches = c.patches().map_err(|e| e.to_string())?;
    let skip = patches.gate.map(|g| g.data_gpa.0);
    let mut h = common::FNV_OFFSET;
    let start = vm.arena_gpa.0;
    common::read_phys_hex(&c, start, start + vm.arena_size, skip, |hex| {
        for b in hex.bytes() {
            h = common::fnv(h, u64::from(b));
        }
    })?;
    println!("KLPV-RESULT guest-hash text={text:016x} arena={h:016x}");
    Ok(())
}

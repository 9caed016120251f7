//! text_hash SOCK [SITE...]: FNV-1a of the guest's kernel text read through
//! `GET /memory`, with the 5 bytes at each SITE (hex) — or, with none
//! given, at each live patch site — masked, so "unchanged outside the
//! sites" can be checked while a patch is on.
#![forbid(unsafe_code)]

use std::process::ExitCode;

mod common;

fn main() -> ExitCode {
    let args = match common::args("text_hash SOCK [SITE...]", 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| text_hash(&args[0], &args[1..]))
}

fn text_hash(sock: &str, given: &[String]) -> Result<(), String> {
    let c = common::client(sock)?;
    // Explicit sites (hex) to mask, or else the live ones.
    let sites = if given.is_empty() {
        common::live_sites(&c)?
    } else {
        given
            .iter()
            .map(|s| klpvisor_api::parse_hex(s))
            .collect::<Result<Vec<u64>, String>>()?
    };
    let h = common::text_hash_masked(&c, &sites)?;
    let list: Vec<String> = sites.iter().map(|s| format!("{s:#x}")).collect();
    println!(
        "KLPV-RESULT text-hash fnv={h:016x} masked_sites={} sites={}",
        sites.len(),
        if list.is_empty() {
            "-".into()
        } else {
            list.join(",")
        }
    );
    Ok(())
}

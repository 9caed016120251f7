//! text_hash SOCK [SITE...]: FNV-1a of the guest's kernel text read through
//! `GET /memory`, with the 5 bytes at each SITE masked, so "unchanged
//! outside the sites" can be checked while a patch is on. A SITE is an
//! address (hex), a kernel symbol (`ftrace_regs_call`: the call inside
//! ftrace's own entry code that ftrace points at the only registered
//! handler), `live`: every live patch site, or `none`: nothing masked.
//! None given: `live`.
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
    let live = ["live".to_string()];
    let given = if given.is_empty() { &live[..] } else { given };
    let mut sites = Vec::new();
    for s in given {
        if s == "none" {
            continue;
        } else if s == "live" {
            sites.extend(common::live_sites(&c)?);
        } else if s.starts_with("0x") {
            sites.push(klpvisor_api::parse_hex(s)?);
        } else {
            let r = c.symbol(s).map_err(|e| e.to_string())?;
            sites.push(
                r.symbols
                    .first()
                    .map(|x| x.addr.0)
                    .ok_or(format!("no {s}"))?,
            );
        }
    }
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

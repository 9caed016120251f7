//! kallsyms_forge corrupt|restore SOCK PID MEM_MIB ARENA_MIB: plays a
//! compromised guest. `corrupt` overwrites the digit tokens of
//! kallsyms_token_table in guest RAM (through the vmm process's own
//! mapping, /proc/PID/mem), which the VMM's kallsyms decoder anchors on,
//! saving where; `restore` writes the digits back.
#![forbid(unsafe_code)]

use std::process::ExitCode;

mod common;

use common::GuestMemory;

/// kallsyms_token_table's digit tokens, which the VMM's decoder anchors on.
const DIGIT_RUN: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
/// Where `corrupt` records the host addresses it changed, for `restore`.
const SAVED: &str = "/tmp/klpv-kallsyms-saved";

const USAGE: &str = "kallsyms_forge corrupt|restore SOCK PID MEM_MIB ARENA_MIB";

fn main() -> ExitCode {
    let args = match common::args(USAGE, 5) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| {
        let m = GuestMemory::from_args("kallsyms_forge", &args[1..])?;
        match args[0].as_str() {
            "corrupt" => corrupt(&m),
            "restore" => restore(&m),
            _ => Err(format!("usage: {USAGE}")),
        }
    })
}

fn corrupt(m: &GuestMemory) -> Result<(), String> {
    let mut hits = Vec::new();
    for &(start, len) in &m.regions {
        let mut region = vec![0u8; len as usize];
        m.read(start, &mut region)?;
        hits.extend(memchr::memmem::find_iter(&region, DIGIT_RUN).map(|i| start + i as u64));
    }
    if hits.is_empty() {
        return Err("no kallsyms token table in guest memory".into());
    }
    let mut saved = String::new();
    for &hit in &hits {
        // "0".."9" become "Z": still tokens, no longer the digits.
        let forged: Vec<u8> = DIGIT_RUN
            .iter()
            .map(|&c| if c == 0 { 0 } else { b'Z' })
            .collect();
        m.write(hit, &forged)?;
        saved.push_str(&format!("{hit:x}\n"));
    }
    std::fs::write(SAVED, saved).map_err(|e| format!("{SAVED}: {e}"))?;
    println!("KLPV-RESULT kallsyms-corrupt hits={}", hits.len());
    Ok(())
}

fn restore(m: &GuestMemory) -> Result<(), String> {
    let saved = std::fs::read_to_string(SAVED).map_err(|e| format!("{SAVED}: {e}"))?;
    let mut n = 0;
    for line in saved.lines() {
        let at = u64::from_str_radix(line.trim(), 16).map_err(|e| format!("{SAVED}: {e}"))?;
        m.write(at, DIGIT_RUN)?;
        n += 1;
    }
    println!("KLPV-RESULT kallsyms-restore hits={n}");
    Ok(())
}

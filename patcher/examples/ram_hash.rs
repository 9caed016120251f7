//! ram_hash SOCK PID MEM_MIB ARENA_MIB: a hash of all guest memory — RAM
//! (MEM_MIB as given to `vmm --mem`) read through the vmm process PID's
//! own mapping (/proc/PID/mem), the arena (`--arena`) by physical API
//! reads — so a scenario can prove a refused patch wrote nothing anywhere.
#![forbid(unsafe_code)]

use std::process::ExitCode;

mod common;

use common::GuestMemory;

fn main() -> ExitCode {
    let args = match common::args("ram_hash SOCK PID MEM_MIB ARENA_MIB", 4) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| ram_hash(&GuestMemory::from_args("ram_hash", &args)?))
}

fn ram_hash(m: &GuestMemory) -> Result<(), String> {
    // Word-wise FNV-style: fast enough for 256 MiB under TCG.
    let mut h = common::FNV_OFFSET;
    let mut total = 0u64;
    let mut mix = |b: &[u8]| {
        for w in b.chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
            h = common::fnv(h, v);
        }
        total += b.len() as u64;
    };
    m.chunks(|_, b| mix(b))?;
    let (gpa, end) = (m.arena.0, m.arena.0 + m.arena.1);
    common::read_phys_hex(&m.client, gpa, end, &[], |hex| mix(hex.as_bytes()))?;
    println!(
        "KLPV-RESULT ram-hash h={h:016x} bytes={total} regions={}",
        m.regions.len()
    );
    Ok(())
}

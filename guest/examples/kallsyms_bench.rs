//! Times introspection of a QEMU memory dump, step by step.
//!
//! Usage: cargo run --release -p klpvisor-guest --example kallsyms_bench [VMCORE] [ROUNDS]
//! (default build/dump/vmcore.elf from guest-images/dump-guest, 10 rounds)
#![forbid(unsafe_code)]

use std::error::Error;
use std::time::{Duration, Instant};

use klpvisor_guest::kallsyms::{Image, KERNEL_IMAGE_END};
use klpvisor_guest::Guest;
use klpvisor_guest::{kaslr, AddressSpace, Btf, DumpGuest, Kallsyms, Kernel, VirtRead};

type Res<T> = Result<T, Box<dyn Error>>;

/// The fastest of `rounds` runs of `f`.
fn best(rounds: u32, mut f: impl FnMut() -> Res<()>) -> Res<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../build/dump/vmcore.elf").to_string()
    });
    let rounds: u32 = args.next().map(|r| r.parse()).transpose()?.unwrap_or(10);
    let guest = DumpGuest::open(&path)?;

    let t = Instant::now();
    let kernel = Kernel::open(&guest)?;
    println!(
        "Kernel::open (probe + kallsyms + confirm + BTF): {:?}",
        t.elapsed()
    );
    println!(
        "  _text {:#x}, slide {:#x}, evidence {:?}, {} symbols, layout {:?}, {}-level paging",
        kernel.kaslr.text,
        kernel.kaslr.slide,
        kernel.kaslr.evidence,
        kernel.kallsyms.len(),
        kernel.kallsyms.layout(),
        if kernel.tables.five_level() { 5 } else { 4 }
    );

    let space = AddressSpace::new(&guest, kernel.tables);
    let probe = best(rounds, || Ok(kaslr::probe(&space).map(drop)?))?;
    let load = best(rounds, || {
        Ok(Kallsyms::load(&space, kernel.kaslr.text).map(drop)?)
    })?;
    // Decode alone, on the copy of the range holding the tables.
    let at = kernel.kallsyms.table_addrs().token_table;
    let run = space
        .mapped_runs(kernel.kaslr.text, KERNEL_IMAGE_END)?
        .into_iter()
        .find(|r| r.start <= at && at < r.end)
        .ok_or("no mapped range holds the kallsyms tables")?;
    let bytes = space.read_vec(run.start, run.len(), 1 << 30, "the rodata range")?;
    let image = Image {
        base: run.start,
        bytes: &bytes,
    };
    let decode = best(rounds, || Ok(Kallsyms::from_image(image).map(drop)?))?;
    let btf = best(
        rounds,
        || Ok(Btf::load(&space, &kernel.kallsyms).map(drop)?),
    )?;
    let mut ntasks = 0;
    let tasks = best(rounds, || {
        ntasks = kernel.tasks(&guest)?.len();
        Ok(())
    })?;
    println!("best of {rounds} rounds:");
    println!("  KASLR probe:                          {probe:?}");
    println!(
        "  kallsyms decode ({} KiB in memory): {decode:?}",
        bytes.len() >> 10
    );
    println!("  kallsyms load (scan + read + decode): {load:?}");
    println!(
        "  BTF load ({} types):              {btf:?}",
        kernel.btf.type_count()
    );
    println!("  task walk ({ntasks} tasks):                {tasks:?}");
    println!(
        "  ({} vCPUs, {} MiB RAM in the dump)",
        guest.vcpu_count(),
        guest.ram_bytes() >> 20
    );
    Ok(())
}

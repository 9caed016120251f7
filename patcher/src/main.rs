//! `patcher`: the client that pushes live patches to a running `vmm`.
//! The control socket arrives with the next milestone; for now this only
//! identifies itself.

use clap::Parser;

/// Live-patch a Linux guest from the hypervisor.
#[derive(Debug, Parser)]
#[command(name = "patcher", version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("patcher: no subcommands yet; the control socket is not implemented");
    std::process::exit(2);
}

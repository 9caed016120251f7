//! ops_settled SOCK [SECONDS]: waits until no function that no patch
//! redirects still has an ftrace redirect registered and the switch log is
//! not registered (the VMM lets those go once changes have paused for a
//! moment), so that a test reads the guest after that, never during it. Prints
//! `KLPV-RESULT ops-settled waited_ms=<ms>`; fails after SECONDS (30).
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

mod common;

fn main() -> ExitCode {
    let args = match common::args("ops_settled SOCK [SECONDS]", 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let limit = Duration::from_secs(common::num_or(&args, 1, 30));
    common::run(|| settle(&args[0], limit))
}

fn settle(sock: &str, limit: Duration) -> Result<(), String> {
    let c = common::client(sock)?;
    let waited = common::ops_settled(&c, limit)?;
    println!("KLPV-RESULT ops-settled waited_ms={}", waited.as_millis());
    Ok(())
}

//! qmp_query LABEL SOCKET: asks a QEMU QMP socket for `query-status` and
//! prints
//!   KLPV-RESULT qmp-status label=LABEL ok=1 running=<true|false> status=<status>
//! or, when the socket does not answer as QMP,
//!   KLPV-RESULT qmp-status label=LABEL ok=0 error=<why, blanks as _>
//! (exit 1). The end-to-end scenarios use it to show that QEMU's own
//! monitor still answers while and after `klpvisor-attach` holds another
//! of its sockets (the nested image's busybox has no Unix-socket client).
//!
//! Plain std and serde_json on purpose, not this crate's `Qmp`: a check of
//! QEMU's monitor that does not go through the code under test.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// Every wait on the socket.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Lines (events) skipped while waiting for one reply.
const MAX_SKIPPED: usize = 1000;

/// Reads lines until one that is a reply (`return` or `error`).
fn reply(r: &mut impl BufRead) -> Result<Value, String> {
    for _ in 0..MAX_SKIPPED {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Err("QEMU closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading: {e}")),
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line}"))?;
        if let Some(e) = v.get("error") {
            return Err(format!("QEMU refused: {e}"));
        }
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
    }
    Err(format!("{MAX_SKIPPED} lines without a reply"))
}

fn query(sock: &str) -> Result<(bool, String), String> {
    let s = UnixStream::connect(sock).map_err(|e| format!("connect {sock}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut w = s.try_clone().map_err(|e| format!("clone: {e}"))?;
    let mut r = BufReader::new(s);
    let mut greeting = String::new();
    r.read_line(&mut greeting)
        .map_err(|e| format!("no greeting: {e}"))?;
    if !greeting.contains("\"QMP\"") {
        return Err(format!("no QMP greeting: {}", greeting.trim()));
    }
    for cmd in ["qmp_capabilities", "query-status"] {
        writeln!(w, "{{\"execute\": \"{cmd}\"}}").map_err(|e| format!("writing {cmd}: {e}"))?;
        let v = reply(&mut r)?;
        if cmd == "query-status" {
            let running = v.get("running").and_then(Value::as_bool);
            let status = v.get("status").and_then(Value::as_str);
            return match (running, status) {
                (Some(r), Some(s)) => Ok((r, s.to_owned())),
                _ => Err(format!("query-status returned {v}")),
            };
        }
    }
    Err("unreachable: no query-status".into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [label, sock] = args.as_slice() else {
        eprintln!("usage: qmp_query LABEL SOCKET");
        return ExitCode::from(2);
    };
    match query(sock) {
        Ok((running, status)) => {
            println!("KLPV-RESULT qmp-status label={label} ok=1 running={running} status={status}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let e: String = e
                .chars()
                .map(|c| if c.is_whitespace() { '_' } else { c })
                .collect();
            println!("KLPV-RESULT qmp-status label={label} ok=0 error={e}");
            ExitCode::FAILURE
        }
    }
}

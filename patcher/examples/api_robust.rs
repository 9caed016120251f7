//! api_robust SOCK: drives a running `vmm --api-sock` the way hostile or
//! clumsy clients would: sixteen concurrent clients, every class of bad
//! input (malformed JSON, unknown routes, oversized bodies and uploads,
//! not HTTP at all), slow and vanishing clients, more connections than the
//! cap, another uid (run as uid 65534 through `api_robust --peer SOCK`).
//! Then checks the VMM still answers and the kernel text is unchanged.
//! Bad requests are written raw, byte for byte, on purpose: no client
//! library would send them.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use klpvisor_api::client::{Client, ClientError};

mod common;

use common::text_hash;

fn main() -> ExitCode {
    let args = match common::args("api_robust [--peer] SOCK", 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| match args.as_slice() {
        [flag, sock, ..] if flag == "--peer" => peer(Path::new(sock)),
        [sock, ..] => robust(Path::new(sock)),
        [] => Err("usage: api_robust [--peer] SOCK".into()),
    })
}

/// One raw HTTP exchange: writes `req`, reads until the server closes or
/// `limit` passes. Returns (status or 0, body, seconds until close).
fn raw(sock: &Path, req: &[u8], limit: Duration) -> Result<(u16, String, f64), String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    let start = Instant::now();
    // A server that refuses early (413 on Content-Length) may close before
    // the whole request is written: read its answer anyway.
    match s.write_all(req) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => return Err(format!("write: {e}")),
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(format!("read after {:?}: {e}", start.elapsed())),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body, start.elapsed().as_secs_f64()))
}

/// `{"error": "..."}` with a non-empty message.
fn json_error(body: &str) -> bool {
    serde_json::from_str::<klpvisor_api::ErrorReply>(body).is_ok_and(|e| !e.error.is_empty())
}

fn report(name: &str, status: u16, body: &str, extra: &str) {
    println!(
        "KLPV-RESULT api-bad class={name} status={status} json_error={} {extra}",
        u8::from(json_error(body))
    );
    println!("API-BAD {name}: {status} {}", body.trim());
}

fn request(method: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn alive(c: &Client) -> bool {
    c.vm().is_ok()
}

fn robust(sock: &Path) -> Result<(), String> {
    let c = Client::new(sock).map_err(|e| e.to_string())?;
    let info = c.vm().map_err(|e| e.to_string())?;
    let text_before = text_hash(&c)?;

    // The socket file.
    let meta = std::fs::metadata(sock).map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    println!(
        "KLPV-RESULT api-socket mode={:o} owner_is_vmm_user={}",
        meta.permissions().mode() & 0o777,
        u8::from(meta.uid() == euid)
    );

    // Another user: first the file mode stops them, then (mode loosened)
    // SO_PEERCRED does.
    let as_nobody = || -> Result<String, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let out = Command::new(exe)
            .arg("--peer")
            .arg(sock)
            .uid(65534)
            .gid(65534)
            .output()
            .map_err(|e| format!("run as uid 65534: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let by_mode = as_nobody()?;
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| e.to_string())?;
    let by_cred = as_nobody();
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    let by_cred = by_cred?;
    println!("API-PEER mode: {by_mode}");
    println!("API-PEER cred: {by_cred}");
    println!(
        "KLPV-RESULT api-peer mode_refused={} cred_refused={}",
        u8::from(by_mode.starts_with("refused-connect")),
        u8::from(by_cred.starts_with("refused-403"))
    );

    // Sixteen clients at once, each mixing reads with reads that pause the
    // VM (registers, tasks) so the pause gate is contended.
    let start = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let sock = sock.to_owned();
            let vcpus = info.vcpus;
            std::thread::spawn(move || -> (u32, u32, Vec<String>) {
                let c = match Client::new(&sock) {
                    Ok(c) => c,
                    Err(e) => return (0, 1, vec![e.to_string()]),
                };
                let (mut ok, mut bad, mut why) = (0, 0, Vec::new());
                for j in 0..20 {
                    let r: Result<(), ClientError> = match (i + j) % 4 {
                        0 => c.vm().map(drop),
                        1 => c.symbol("cmdline_proc_show").map(drop),
                        2 => c.regs((i + j) % vcpus).map(drop),
                        _ => c.tasks().map(|t| {
                            if t.count == 0 {
                                bad += 1;
                            }
                        }),
                    };
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            bad += 1;
                            why.push(e.to_string());
                        }
                    }
                }
                (ok, bad, why)
            })
        })
        .collect();
    let (mut ok, mut bad) = (0, 0);
    for t in threads {
        let (o, b, why) = t.join().map_err(|_| "client thread panicked")?;
        ok += o;
        bad += b;
        for w in why {
            println!("API-CONCURRENCY failure: {w}");
        }
    }
    println!(
        "KLPV-RESULT api-concurrency clients=16 ok={ok} failed={bad} secs={:.2}",
        start.elapsed().as_secs_f64()
    );

    // Each class of bad input.
    let t = Duration::from_secs(30);
    let (s, b, _) = raw(
        sock,
        &request(
            "PATCH",
            "/vm",
            "Content-Type: application/json\r\n",
            b"{\"state\":",
        ),
        t,
    )?;
    report("malformed-json", s, &b, "");
    let (s, b, _) = raw(
        sock,
        &request(
            "PATCH",
            "/vm",
            "Content-Type: application/json\r\n",
            b"{\"state\":\"asleep\"}",
        ),
        t,
    )?;
    report("bad-json-value", s, &b, "");
    let (s, b, _) = raw(sock, &request("GET", "/no/such/route", "", b""), t)?;
    report("unknown-route", s, &b, "");
    let (s, b, _) = raw(sock, &request("DELETE", "/vm", "", b""), t)?;
    report("wrong-method", s, &b, "");
    let (s, b, _) = raw(sock, &request("GET", "/memory?va=zz&len=4", "", b""), t)?;
    report("bad-query", s, &b, "");
    let (s, b, _) = raw(sock, &request("POST", "/rollback?to=last", "", b""), t)?;
    report("bad-rollback-target", s, &b, "");
    let (s, b, _) = raw(
        sock,
        &request("GET", "/memory?gpa=0x0&len=999999", "", b""),
        t,
    )?;
    report("oversized-read", s, &b, "");
    let (s, b, _) = raw(sock, &request("GET", "/vcpus/99/regs", "", b""), t)?;
    report("no-such-vcpu", s, &b, "");
    let big = vec![b' '; 2 << 20];
    let (s, b, _) = raw(
        sock,
        &request("PATCH", "/vm", "Content-Type: application/json\r\n", &big),
        t,
    )?;
    report("oversized-body", s, &b, "");
    // A module upload over the 16 MiB limit.
    let huge = vec![0u8; klpvisor_api::MAX_PATCH_BYTES + 1];
    let (s, b, _) = raw(
        sock,
        &request(
            "POST",
            "/patches",
            "Content-Type: application/octet-stream\r\n",
            &huge,
        ),
        t,
    )?;
    report("oversized-patch", s, &b, "");
    let (s, b, _) = raw(sock, b"\x00\x01\x02 this is not HTTP\r\n\r\n", t)?;
    report("not-http", s, &b, "");

    // A client that stops mid-headers is cut off by the server's header
    // timeout; others are served meanwhile.
    let slow = {
        let sock = sock.to_owned();
        std::thread::spawn(move || raw(&sock, b"GET /vm HTTP/1.1\r\nHost: local", t))
    };
    let served_meanwhile = alive(&c);
    let (s, b, secs) = slow.join().map_err(|_| "slow client panicked")??;
    report(
        "slow-headers",
        s,
        &b,
        &format!(
            "closed_after_s={secs:.1} others_served={}",
            u8::from(served_meanwhile)
        ),
    );
    // A body that never completes: 408.
    let (s, b, secs) = raw(
        sock,
        b"PATCH /vm HTTP/1.1\r\nHost: l\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sta",
        t,
    )?;
    report("slow-body", s, &b, &format!("closed_after_s={secs:.1}"));

    // Clients that vanish: mid-request, and before reading a large reply.
    for _ in 0..8 {
        if let Ok(mut s) = UnixStream::connect(sock) {
            let _ = s.write_all(b"GET /symbols/all HTTP/1.1\r\nHost: l\r\n");
        }
        if let Ok(mut s) = UnixStream::connect(sock) {
            let _ = s.write_all(b"GET /symbols/all HTTP/1.1\r\nHost: l\r\n\r\n");
            let mut buf = [0u8; 100];
            let _ = s.read(&mut buf);
        }
    }
    println!(
        "KLPV-RESULT api-vanished alive_after={}",
        u8::from(alive(&c))
    );

    // More connections than the cap: the surplus is refused with 503 at
    // once, and the VMM recovers when they close.
    let mut held = Vec::new();
    for _ in 0..64 {
        if let Ok(s) = UnixStream::connect(sock) {
            held.push(s);
        }
    }
    let (s, b, _) = raw(sock, &request("GET", "/vm", "", b""), t)?;
    drop(held);
    report("too-many-connections", s, &b, "");
    // The held connections close; their slots come back as the server
    // reads their EOF. Retry (bounded) until a request gets a slot.
    let recovered = (0..1000).any(|_| alive(&c));

    let after = c.vm().map_err(|e| e.to_string())?;
    let text_after = text_hash(&c)?;
    println!(
        "KLPV-RESULT api-after recovered={} state={} text_unchanged={} text_hash={text_before:016x}",
        u8::from(recovered),
        after.state,
        u8::from(text_before == text_after)
    );
    Ok(())
}

/// Run as another uid: reports how the VMM treated it.
fn peer(sock: &Path) -> Result<(), String> {
    match UnixStream::connect(sock) {
        Err(e) => {
            println!("refused-connect {e}");
            return Ok(());
        }
        Ok(s) => drop(s),
    }
    let (s, body, _) = raw(
        sock,
        &request("GET", "/vm", "", b""),
        Duration::from_secs(30),
    )?;
    if s == 403 && json_error(&body) {
        println!("refused-403 {}", body.trim());
    } else {
        println!("allowed status={s} {}", body.trim());
    }
    Ok(())
}

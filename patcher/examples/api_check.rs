//! api_check: drives a running `vmm --api-sock` the way hostile or clumsy
//! clients would, and measures it. Run by the end-to-end scenarios inside
//! the nested image; prints `KLPV-RESULT <name> key=value ...` lines.
//!
//!   api_check robust SOCK      concurrency, every bad-input class, peer refusal
//!   api_check bench SOCK N     N pause/resume round trips through the API
//!   api_check peer SOCK        (internal) one GET /vm as whoever runs it
//!   api_check guest-hash SOCK  hashes of the kernel text and the whole arena
//!                              but the call gate's data page (its mailbox)
//!   api_check cycle SOCK N     N transitions cycling enable klpv_v1 ->
//!                              enable klpv_v2 (replace) -> disable klpv_v2
//!                              (both loaded, neither enabled): each one's
//!                              pause, attempts, and the VMM heap after the
//!                              first 30 and at the end
//!   api_check alternate SOCK K A B
//!                              K transitions enabling loaded replace
//!                              patches A, B, A, ... (B enabled, A replaced
//!                              by it): pause and
//!                              request time, median and p99, and the
//!                              guest's task count
//!   api_check rollback SOCK N REPLACE
//!                              from the current stack, enable REPLACE,
//!                              then N times roll back and roll that back,
//!                              checking every patch site's bytes and every
//!                              patch's state each time
//!   api_check ram-hash SOCK PID MEM ARENA
//!                              hash of all guest memory (RAM, MiB as given
//!                              to vmm --mem, read through the vmm process
//!                              PID's own mapping, /proc/PID/mem; the
//!                              arena, --arena MiB, by physical API reads)
//!   api_check kallsyms-corrupt SOCK PID MEM ARENA
//!                              a compromised guest: overwrites the digit
//!                              tokens of kallsyms_token_table in guest RAM
//!                              (through /proc/PID/mem), saving the bytes
//!   api_check kallsyms-restore SOCK PID MEM ARENA
//!                              writes the saved bytes back
//!   api_check callbacks SOCK N PATCH
//!                              N disable/enable pairs of enabled PATCH:
//!                              request time, and each klp callback's time
//!                              in the guest (median, p99)
//!   api_check text-hash SOCK [SITE...]
//!                              hash of the guest's kernel text via GET
//!                              /memory with the 5 bytes at each SITE (hex),
//!                              or else at each live patch site, masked: so
//!                              "unchanged outside the sites" can be checked
//!                              while a patch is on

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use hyper::Method;
use klpvisor_api::client::{Client, ClientError};
use klpvisor_api::{
    MemoryReply, PauseReply, ResumeReply, SymbolsReply, TasksReply, TransitionReply, VmInfo,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(sock)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: api_check robust|bench|peer|text-hash SOCK [N | SITE...]");
        return ExitCode::from(2);
    };
    let sock = PathBuf::from(sock);
    let r = match mode.as_str() {
        "robust" => robust(&sock),
        "bench" => bench(
            &sock,
            args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1000),
        ),
        "peer" => peer(&sock),
        "rollback" => rollback(
            &sock,
            args.get(3).and_then(|n| n.parse().ok()).unwrap_or(100),
            args.get(4).map_or("klpv_v2", String::as_str),
        ),
        "alternate" => match (
            args.get(3).and_then(|k| k.parse().ok()),
            args.get(4),
            args.get(5),
        ) {
            (Some(k), Some(a), Some(b)) => alternate(&sock, k, a, b),
            _ => Err("usage: api_check alternate SOCK K A B".into()),
        },
        "callbacks" => match (args.get(3).and_then(|n| n.parse().ok()), args.get(4)) {
            (Some(n), Some(name)) => callbacks_bench(&sock, n, name),
            _ => Err("usage: api_check callbacks SOCK N PATCH".into()),
        },
        "cycle" => cycle(
            &sock,
            args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1000),
        ),
        "text-hash" => Client::new(&sock).map_err(|e| e.to_string()).and_then(|c| {
            // Explicit sites (hex) to mask, or else the live ones.
            let sites = match args.get(3..).filter(|a| !a.is_empty()) {
                Some(given) => given
                    .iter()
                    .map(|s| klpvisor_api::parse_hex(s))
                    .collect::<Result<Vec<u64>, String>>()?,
                None => live_sites(&c)?,
            };
            let h = text_hash_masked(&c, &sites)?;
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
        }),
        // These go through the vmm process's own mapping of guest RAM
        // (and physical reads of the API, which need no kernel view), so
        // they work before the VMM has looked at the guest kernel.
        "ram-hash" | "kallsyms-corrupt" | "kallsyms-restore" => {
            let num = |i: usize| args.get(i).and_then(|v| v.parse::<u64>().ok());
            match (num(3), num(4), num(5)) {
                (Some(pid), Some(mem), Some(arena)) => {
                    guest_memory(&sock, pid, mem << 20, arena << 20).and_then(|m| {
                        match mode.as_str() {
                            "ram-hash" => ram_hash(&m),
                            "kallsyms-corrupt" => kallsyms_corrupt(&m),
                            _ => kallsyms_restore(&m),
                        }
                    })
                }
                _ => Err(format!(
                    "usage: api_check {mode} SOCK PID MEM_MIB ARENA_MIB"
                )),
            }
        }
        "guest-hash" => Client::new(&sock)
            .map_err(|e| e.to_string())
            .and_then(|c| guest_hash(&c)),
        _ => Err(format!("unknown mode {mode}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("KLPV-RESULT api-check-error msg={}", e.replace(' ', "_"));
            ExitCode::FAILURE
        }
    }
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
    c.call::<VmInfo>(Method::GET, "/vm", None).is_ok()
}

fn robust(sock: &Path) -> Result<(), String> {
    let c = Client::new(sock).map_err(|e| e.to_string())?;
    let info: VmInfo = c
        .call(Method::GET, "/vm", None)
        .map_err(|e| e.to_string())?;
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
            .arg("peer")
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
                        0 => c.call::<VmInfo>(Method::GET, "/vm", None).map(drop),
                        1 => c
                            .call::<SymbolsReply>(
                                Method::GET,
                                "/symbols?name=cmdline_proc_show",
                                None,
                            )
                            .map(drop),
                        2 => c
                            .call::<klpvisor_api::RegsReply>(
                                Method::GET,
                                &format!("/vcpus/{}/regs", (i + j) % vcpus),
                                None,
                            )
                            .map(drop),
                        _ => c
                            .call::<klpvisor_api::TasksReply>(Method::GET, "/tasks", None)
                            .map(|t| {
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

    let after: VmInfo = c
        .call(Method::GET, "/vm", None)
        .map_err(|e| e.to_string())?;
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

/// FNV-1a of the kernel text and of the whole patch arena (what a refused
/// patch must leave untouched).
fn guest_hash(c: &Client) -> Result<(), String> {
    let text = text_hash(c)?;
    let vm: VmInfo = c
        .call(Method::GET, "/vm", None)
        .map_err(|e| e.to_string())?;
    // The call gate's data page records every callback sent (its
    // mailbox): it changes by design, so it is left out.
    let patches: klpvisor_api::PatchesReply = c
        .call(Method::GET, "/patches", None)
        .map_err(|e| e.to_string())?;
    let skip = patches.gate.map(|g| g.data_gpa.0);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut gpa = vm.arena_gpa.0;
    let end = gpa + vm.arena_size;
    while gpa < end {
        if Some(gpa) == skip {
            gpa += 4096;
            continue;
        }
        let len = (end - gpa).min(klpvisor_api::MAX_MEMORY_READ);
        let len = match skip.filter(|&s| s > gpa && s < gpa + len) {
            Some(s) => s - gpa,
            None => len,
        };
        let m: MemoryReply = c
            .call(
                Method::GET,
                &format!("/memory?gpa={gpa:#x}&len={len}"),
                None,
            )
            .map_err(|e| e.to_string())?;
        for b in m.bytes.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        gpa += len;
    }
    println!("KLPV-RESULT guest-hash text={text:016x} arena={h:016x}");
    Ok(())
}

/// The 5-byte sites of every live patched function.
fn live_sites(c: &Client) -> Result<Vec<u64>, String> {
    let v: klpvisor_api::PatchesReply = c
        .call(Method::GET, "/patches", None)
        .map_err(|e| e.to_string())?;
    Ok(v.patches
        .iter()
        .flat_map(|p| p.funcs.iter())
        .filter(|f| f.live)
        .map(|f| f.site.0)
        .collect())
}

/// FNV-1a over the kernel's text, `_text` to `_etext`, read through the API.
fn text_hash(c: &Client) -> Result<u64, String> {
    text_hash_masked(c, &[])
}

/// [`text_hash`] with the 5 bytes at each of `sites` hashed as zeros.
fn text_hash_masked(c: &Client, sites: &[u64]) -> Result<u64, String> {
    let addr = |name: &str| -> Result<u64, String> {
        let r: SymbolsReply = c
            .call(Method::GET, &format!("/symbols?name={name}"), None)
            .map_err(|e| e.to_string())?;
        r.symbols
            .first()
            .map(|s| s.addr.0)
            .ok_or(format!("no {name}"))
    };
    let (start, end) = (addr("_text")?, addr("_etext")?);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut va = start;
    while va < end {
        let len = (end - va).min(klpvisor_api::MAX_MEMORY_READ);
        let m: MemoryReply = c
            .call(Method::GET, &format!("/memory?va={va:#x}&len={len}"), None)
            .map_err(|e| e.to_string())?;
        for (i, b) in m.bytes.bytes().enumerate() {
            let at = va + (i / 2) as u64;
            let b = if sites.iter().any(|&s| (s..s + 5).contains(&at)) {
                b'0'
            } else {
                b
            };
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        va += len;
    }
    Ok(h)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn bench(sock: &Path, n: usize) -> Result<(), String> {
    let c = Client::new(sock).map_err(|e| e.to_string())?;
    let info: VmInfo = c
        .call(Method::GET, "/vm", None)
        .map_err(|e| e.to_string())?;
    let k = info.kernel.ok_or("guest kernel not found")?;
    let (mut rtt, mut out, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let p: PauseReply = c
            .call(Method::PUT, "/vm/pause", None)
            .map_err(|e| e.to_string())?;
        let r: ResumeReply = c
            .call(Method::PUT, "/vm/resume", None)
            .map_err(|e| e.to_string())?;
        rtt.push(t.elapsed().as_secs_f64() * 1e6);
        out.push(r.out_of_guest_us);
        lat.push(p.latency_us);
    }
    for v in [&mut rtt, &mut out, &mut lat] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "KLPV-RESULT api-bench cycles={n} rtt_median_us={:.0} rtt_p99_us={:.0} \
         out_of_guest_median_us={:.0} out_of_guest_p99_us={:.0} pause_latency_median_us={:.0} \
         pause_latency_p99_us={:.0} kallsyms_decode_ms={:.1} symbols={}",
        percentile(&rtt, 0.5),
        percentile(&rtt, 0.99),
        percentile(&out, 0.5),
        percentile(&out, 0.99),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        k.decode_ms,
        k.symbols
    );
    Ok(())
}

/// The stress loop: `n` transitions v1 -> v2 (replace) -> none -> v1 ...
fn cycle(sock: &Path, n: usize) -> Result<(), String> {
    const WARM: usize = 30;
    let c = Client::new(sock).map_err(|e| e.to_string())?;
    let heap = || -> Result<u64, String> {
        c.call::<VmInfo>(Method::GET, "/vm", None)
            .map(|v| v.heap_bytes)
            .map_err(|e| e.to_string())
    };
    let steps = [
        "/patches/klpv_v1/enable",
        "/patches/klpv_v2/enable",
        "/patches/klpv_v2/disable",
    ];
    let (mut pauses, mut attempts, mut failed) = (Vec::new(), Vec::new(), 0usize);
    let mut heap_warm = heap()?;
    let start = Instant::now();
    for i in 0..n {
        let path = steps[i % steps.len()];
        match c.call::<TransitionReply>(Method::POST, path, None) {
            Ok(r) => {
                pauses.push(r.pause_us);
                attempts.push(r.attempts);
            }
            Err(e) => {
                failed += 1;
                if failed <= 5 {
                    println!(
                        "KLPV-STRESS-ERROR {i} {path}: {}",
                        e.to_string().replace('\n', " ")
                    );
                }
                // The cycle only continues from a known state.
                return Err(format!("transition {i} ({path}) failed: {e}"));
            }
        }
        if i + 1 == WARM {
            heap_warm = heap()?;
        }
    }
    let total = start.elapsed();
    let heap_end = heap()?;
    pauses.sort_by(f64::total_cmp);
    let pct = |q: f64| percentile(&pauses, q);
    println!(
        "KLPV-RESULT stress transitions={n} ok={} failed={failed} pause_median_us={:.0} \
         pause_p99_us={:.0} pause_max_us={:.0} retried={} max_attempts={} total_ms={:.0} \
         heap_warm={heap_warm} heap_end={heap_end}",
        pauses.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        attempts.iter().filter(|&&a| a > 1).count(),
        attempts.iter().max().copied().unwrap_or(0),
        total.as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Every patch site of every loaded patch, its 5 entry bytes, and each
/// patch's state: what a rollback must restore exactly.
type StackShot = (Vec<(u64, String)>, Vec<(String, String)>);

fn stack_shot(c: &Client) -> Result<StackShot, String> {
    let v: klpvisor_api::PatchesReply = c
        .call(Method::GET, "/patches", None)
        .map_err(|e| e.to_string())?;
    let mut sites: Vec<u64> = v
        .patches
        .iter()
        .flat_map(|p| p.funcs.iter().map(|f| f.site.0))
        .collect();
    sites.sort_unstable();
    sites.dedup();
    let mut bytes = Vec::new();
    for site in sites {
        let m: MemoryReply = c
            .call(Method::GET, &format!("/memory?va={site:#x}&len=5"), None)
            .map_err(|e| e.to_string())?;
        bytes.push((site, m.bytes));
    }
    let states = v
        .patches
        .iter()
        .map(|p| (p.name.clone(), p.state.to_string()))
        .collect();
    Ok((bytes, states))
}

/// The rollback loop: from the current stack A, enable `replace` (a
/// replace patch) giving B; then `n` times roll back (B -> A) and roll
/// the rollback back (A -> B), comparing every patch site's bytes and
/// every patch's state with A and B each time.
fn rollback(sock: &Path, n: usize, replace: &str) -> Result<(), String> {
    let c = Client::new(sock).map_err(|e| e.to_string())?;
    let a = stack_shot(&c)?;
    c.call::<TransitionReply>(Method::POST, &format!("/patches/{replace}/enable"), None)
        .map_err(|e| format!("enable {replace}: {e}"))?;
    let b = stack_shot(&c)?;
    if a == b {
        return Err(format!("enabling {replace} changed nothing"));
    }
    let (mut pauses, mut mismatches) = (Vec::new(), 0usize);
    for i in 0..n {
        for (want, what) in [(&a, "before the replace"), (&b, "after the replace")] {
            let r: klpvisor_api::RollbackReply = c
                .call(Method::POST, "/rollback", None)
                .map_err(|e| format!("rollback {i} to {what}: {e}"))?;
            pauses.push(r.pause_us);
            let got = stack_shot(&c)?;
            if &got != want {
                mismatches += 1;
                if mismatches <= 3 {
                    println!("KLPV-ROLLBACK-MISMATCH {i} {what}: want {want:?} got {got:?}");
                }
            }
        }
    }
    pauses.sort_by(f64::total_cmp);
    println!(
        "KLPV-RESULT rollback loops={n} rollbacks={} mismatches={mismatches} sites={} \
         pause_median_us={:.0} pause_p99_us={:.0}",
        pauses.len(),
        a.0.len(),
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
    );
    Ok(())
}

/// The replace benchmark: `k` transitions between two loaded replace
/// patches, each a full atomic replace of every function they carry.
fn alternate(sock: &Path, k: usize, a: &str, b: &str) -> Result<(), String> {
    let c = Client::new(sock).map_err(|e| e.to_string())?;
    let tasks = c
        .call::<TasksReply>(Method::GET, "/tasks", None)
        .map_err(|e| e.to_string())?
        .count;
    let (mut pauses, mut requests, mut funcs) = (Vec::new(), Vec::new(), 0);
    for i in 0..k {
        let name = if i % 2 == 0 { a } else { b };
        let start = Instant::now();
        let r: TransitionReply = c
            .call(
                Method::POST,
                &format!("/patches/{name}/enable?timeout_ms=25000"),
                None,
            )
            .map_err(|e| format!("enable {name}: {e}"))?;
        requests.push(start.elapsed().as_secs_f64() * 1e3);
        pauses.push(r.pause_us);
        funcs = r.patch.funcs.len();
    }
    pauses.sort_by(f64::total_cmp);
    requests.sort_by(f64::total_cmp);
    println!(
        "KLPV-RESULT alternate a={a} b={b} funcs={funcs} tasks={tasks} transitions={k} \
         pause_median_us={:.0} pause_p99_us={:.0} request_median_ms={:.1} request_p99_ms={:.1}",
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
        percentile(&requests, 0.5),
        percentile(&requests, 0.99),
    );
    Ok(())
}

/// Guest memory as the vmm holds it: RAM in the vmm's own address space
/// (found by content: the ACPI RSDP page the VMM wrote at 0xe0000 is read
/// through the API and looked for page by page in the vmm's anonymous
/// mappings), the arena by physical reads of the API.
struct GuestMemory {
    mem: std::fs::File,
    /// (host address, bytes) of guest RAM from guest-physical 0.
    regions: Vec<(u64, u64)>,
    client: Client,
    arena: (u64, u64),
}

/// Where the VMM writes the ACPI RSDP.
const RSDP_GPA: u64 = 0xe0000;

fn guest_memory(sock: &Path, pid: u64, ram: u64, arena: u64) -> Result<GuestMemory, String> {
    use std::os::unix::fs::FileExt;
    if ram > 3 << 30 {
        return Err("RAM above 3 GiB is split around the MMIO hole; use less".into());
    }
    let client = Client::new(sock).map_err(|e| e.to_string())?;
    let m: MemoryReply = client
        .call(
            Method::GET,
            &format!("/memory?gpa={RSDP_GPA:#x}&len=4096"),
            None,
        )
        .map_err(|e| e.to_string())?;
    let page = (0..m.bytes.len() / 2)
        .map(|i| u8::from_str_radix(&m.bytes[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|e| format!("memory reply: {e}"))?;
    if !page.starts_with(b"RSD PTR ") {
        return Err(format!("no RSDP at guest-physical {RSDP_GPA:#x}"));
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 4096];
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Anonymous (no path), read-write, large enough to hold RAM.
        if f.len() != 5 || !f[1].starts_with("rw") {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let mut base = a;
        while base + ram <= b {
            if mem.read_exact_at(&mut buf, base + RSDP_GPA).is_ok() && buf == page {
                found.push(base);
            }
            base += 4096;
        }
    }
    match found.as_slice() {
        [base] => Ok(GuestMemory {
            mem,
            regions: vec![(*base, ram)],
            client,
            arena: (ram.next_multiple_of(2 << 20), arena),
        }),
        other => Err(format!(
            "{} places in vmm {pid} hold guest RAM's RSDP page; cannot tell which is RAM",
            other.len()
        )),
    }
}

impl GuestMemory {
    fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.mem
            .read_exact_at(buf, at)
            .map_err(|e| format!("reading guest memory at {at:#x}: {e}"))
    }

    fn write(&self, at: u64, buf: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.mem
            .write_all_at(buf, at)
            .map_err(|e| format!("writing guest memory at {at:#x}: {e}"))
    }

    /// Every region, 1 MiB at a time.
    fn chunks(&self, mut f: impl FnMut(u64, &[u8])) -> Result<(), String> {
        let mut buf = vec![0u8; 1 << 20];
        for &(start, len) in &self.regions {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                self.read(start + off, &mut buf[..n])?;
                f(start + off, &buf[..n]);
                off += n as u64;
            }
        }
        Ok(())
    }
}

fn ram_hash(m: &GuestMemory) -> Result<(), String> {
    // Word-wise FNV-style: fast enough for 256 MiB under TCG; this is an
    // equality check, not a cryptographic one.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut total = 0u64;
    let mut mix = |b: &[u8]| {
        for w in b.chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
            h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
        }
        total += b.len() as u64;
    };
    m.chunks(|_, b| mix(b))?;
    let (mut gpa, end) = (m.arena.0, m.arena.0 + m.arena.1);
    while gpa < end {
        let len = (end - gpa).min(klpvisor_api::MAX_MEMORY_READ);
        let r: MemoryReply = m
            .client
            .call(
                Method::GET,
                &format!("/memory?gpa={gpa:#x}&len={len}"),
                None,
            )
            .map_err(|e| e.to_string())?;
        mix(r.bytes.as_bytes());
        gpa += len;
    }
    println!(
        "KLPV-RESULT ram-hash h={h:016x} bytes={total} regions={}",
        m.regions.len()
    );
    Ok(())
}

/// kallsyms_token_table's digit tokens, which the VMM's decoder anchors on.
const DIGIT_RUN: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
const SAVED: &str = "/tmp/klpv-kallsyms-saved";

fn kallsyms_corrupt(m: &GuestMemory) -> Result<(), String> {
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

fn kallsyms_restore(m: &GuestMemory) -> Result<(), String> {
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

fn callbacks_bench(sock: &Path, n: usize, name: &str) -> Result<(), String> {
    let c = Client::new(sock).map_err(|e| e.to_string())?;
    let (mut request, mut pause, mut cb) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        for action in ["disable", "enable"] {
            let t = Instant::now();
            let r: TransitionReply = c
                .call(Method::POST, &format!("/patches/{name}/{action}"), None)
                .map_err(|e| format!("{action} {name}: {e}"))?;
            request.push(t.elapsed().as_secs_f64() * 1e3);
            pause.push(r.pause_us);
            for run in &r.callbacks {
                if !run.done {
                    return Err(format!("{} {} did not finish", run.patch, run.callback));
                }
                cb.push(run.ms);
            }
        }
    }
    for v in [&mut request, &mut pause, &mut cb] {
        v.sort_by(f64::total_cmp);
    }
    let stat = |v: &[f64]| {
        if v.is_empty() {
            (0.0, 0.0)
        } else {
            (percentile(v, 0.5), percentile(v, 0.99))
        }
    };
    let (rm, rp) = stat(&request);
    let (pm, pp) = stat(&pause);
    let (cm, cp) = stat(&cb);
    println!(
        "KLPV-RESULT callbacks-bench patch={name} transitions={} callbacks={} \
         request_median_ms={rm:.1} request_p99_ms={rp:.1} pause_median_us={pm:.0} \
         pause_p99_us={pp:.0} callback_median_ms={cm:.2} callback_p99_ms={cp:.2}",
        request.len(),
        cb.len()
    );
    Ok(())
}

//! `patcher` against a socket, as a script sees it: where `--api-sock`
//! may go, and which exit code and `--json` error each failure gives.
//! The replies come from a canned HTTP responder on a Unix socket (the
//! VMM's own replies are checked end to end in tests/api.rs).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn patcher(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_patcher"))
        .args(args)
        .env_remove("KLPV_API_SOCK")
        .output()
        .expect("run patcher")
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("klpv-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Answers one request on `sock` with `status` and `body`, then returns.
fn answer_once(
    sock: &Path,
    status: &'static str,
    body: &'static str,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).unwrap();
    })
}

#[test]
fn api_sock_may_follow_the_command_and_an_absent_vmm_is_exit_3() {
    let d = workdir("absent");
    let sock = d.join("no.sock");
    let sock = sock.to_str().unwrap();
    for args in [
        vec!["list", "--api-sock", sock],
        vec!["--api-sock", sock, "list"],
    ] {
        let o = patcher(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {err}");
        assert!(err.contains("cannot connect to"), "{err}");
    }
    let o = patcher(&["--json", "list", "--api-sock", sock]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON error on stdout");
    assert_eq!(v["kind"], "unreachable");
    assert!(v["error"].as_str().unwrap().contains("cannot connect"));
}

#[test]
fn each_kind_of_failure_has_its_exit_code() {
    let d = workdir("kinds");
    let cases: [(&str, &str, i32, &str); 6] = [
        (
            "409 Conflict",
            r#"{"error":"no safe point","kind":"blocked"}"#,
            4,
            "blocked",
        ),
        (
            "409 Conflict",
            r#"{"error":"another change runs","kind":"busy"}"#,
            5,
            "busy",
        ),
        (
            "409 Conflict",
            r#"{"error":"pinned","kind":"refused"}"#,
            1,
            "refused",
        ),
        (
            "422 Unprocessable Entity",
            r#"{"error":"bad module"}"#,
            1,
            "refused",
        ),
        (
            "503 Service Unavailable",
            r#"{"error":"still booting"}"#,
            6,
            "unavailable",
        ),
        (
            "500 Internal Server Error",
            r#"{"error":"bug","kind":"failed"}"#,
            7,
            "failed",
        ),
    ];
    for (i, (status, body, code, kind)) in cases.into_iter().enumerate() {
        let sock = d.join(format!("{i}.sock"));
        let server = answer_once(&sock, status, body);
        let o = patcher(&["--json", "--api-sock", sock.to_str().unwrap(), "list"]);
        server.join().unwrap();
        assert_eq!(o.status.code(), Some(code), "{status} {body}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["kind"], kind, "{body}");
        assert_eq!(
            v["status"].as_u64(),
            status.split(' ').next().unwrap().parse::<u64>().ok()
        );
    }
}

#[test]
fn an_oversized_module_is_refused_before_upload_naming_the_limit() {
    let d = workdir("big");
    let big = d.join("big.ko");
    std::fs::write(&big, vec![0u8; klpvisor_api::MAX_PATCH_BYTES + 1]).unwrap();
    // No VMM is needed to say it.
    let sock = d.join("no.sock");
    let o = patcher(&[
        "apply",
        big.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("16 MiB") && err.contains("strip -g"), "{err}");
}

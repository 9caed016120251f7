//! `patcher info` as a user runs it: offline (no VMM, no `--api-sock`),
//! on the module the repository commits (the fuzz target's seed, built by
//! plain gcc) and, in the dump tier, on a module kbuild built against the
//! test guest's headers.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn patcher(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_patcher"))
        .args(args)
        .env_remove("KLPV_API_SOCK")
        .output()
        .expect("run patcher")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh directory holding a copy of the seed module as `seed.ko`.
fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("klpv-cli-info-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        root().join("fuzz/seeds/module/livepatch.ko"),
        d.join("seed.ko"),
    )
    .unwrap();
    d
}

#[test]
fn info_describes_the_seed_module() {
    let d = workdir("text");
    let o = patcher(&[p("info"), &d.join("seed.ko")]);
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    for line in [
        "patch:      fuzz_livepatch",
        "format:     livepatch module (static struct klp_patch)",
        "built for:  6.1.0-fuzz",
        "replace:    no",
        "states:     id 7 version 1",
        "signature:  unsigned",
        "object vmlinux (2 functions)",
        "  cmdline_proc_show -> livepatch_cmdline_proc_show",
        "  dup_fn,2 -> livepatch_dup_fn",
        "  callback post_patch: post_patch",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("  .text") && l.ends_with("load (text)")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("  .init.text") && l.contains("never run")),
        "{text}"
    );

    let o = patcher(&[p("--json"), p("info"), &d.join("seed.ko")]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], "fuzz_livepatch");
    assert_eq!(v["replace"], false);
    assert_eq!(v["objects"][0]["name"], "vmlinux");
    assert_eq!(v["objects"][0]["funcs"][1]["old_name"], "dup_fn");
    assert_eq!(v["objects"][0]["funcs"][1]["sympos"], 2);
    assert_eq!(v["objects"][0]["callbacks"][0]["callback"], "post_patch");
    assert_eq!(v["states"][0]["id"], 7);
    assert_eq!(v["signature"]["signed"], false);
    assert_eq!(v["refused"], serde_json::json!([]));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn info_reports_and_checks_the_signature() {
    let d = workdir("sig");
    for key in ["ops", "rogue"] {
        let o = patcher(&[p("keygen"), p("--out"), &d.join(key)]);
        assert!(o.status.success(), "{o:?}");
        std::fs::create_dir_all(d.join(format!("trust-{key}"))).unwrap();
        std::fs::copy(
            d.join(format!("{key}.pub")),
            d.join(format!("trust-{key}/{key}.pub")),
        )
        .unwrap();
    }
    let signed = d.join("signed.ko");
    let o = patcher(&[
        p("sign"),
        p("--key"),
        &d.join("ops.key"),
        p("--level"),
        p("4"),
        &d.join("seed.ko"),
        p("-o"),
        &signed,
    ]);
    assert!(o.status.success(), "{o:?}");
    let id = std::fs::read_to_string(d.join("ops.pub")).unwrap();
    assert!(id.starts_with("klpvisor-ed25519-public"));

    let o = patcher(&[p("info"), &signed]);
    assert!(o.status.success(), "{o:?}");
    let line = stdout(&o)
        .lines()
        .find(|l| l.starts_with("signature:"))
        .unwrap()
        .to_owned();
    assert!(line.contains("at level 4, not checked"), "{line}");

    let o = patcher(&[
        p("info"),
        p("--trusted-keys"),
        &d.join("trust-ops"),
        &signed,
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        stdout(&o).contains("verified with ops.pub"),
        "{}",
        stdout(&o)
    );

    // Signed by a key the directory does not trust: described, and exit 1.
    let o = patcher(&[
        p("--json"),
        p("info"),
        p("--trusted-keys"),
        &d.join("trust-rogue"),
        &signed,
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["signature"]["signed"], true);
    assert_eq!(v["signature"]["level"], 4);
    assert_eq!(v["signature"]["verified"], false);
    assert!(v["refused"][0]
        .as_str()
        .is_some_and(|s| s.starts_with("signature:")));

    // Unsigned, under trusted keys: refused, and the text says why.
    let o = patcher(&[
        p("info"),
        p("--trusted-keys"),
        &d.join("trust-ops"),
        &d.join("seed.ko"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stdout(&o).contains("does NOT verify"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("klpvisor would refuse it"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn info_on_a_bad_file_names_the_problem() {
    let d = workdir("bad");
    std::fs::write(d.join("script.ko"), b"#!/bin/sh\necho hi\n").unwrap();
    let o = patcher(&[p("info"), &d.join("script.ko")]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let e = stderr(&o);
    assert!(
        e.contains("script.ko") && e.contains("not an ELF file"),
        "{e}"
    );
    assert!(o.stdout.is_empty(), "nothing described");

    // Half a module.
    let seed = std::fs::read(d.join("seed.ko")).unwrap();
    std::fs::write(d.join("half.ko"), &seed[..seed.len() / 2]).unwrap();
    let o = patcher(&[p("info"), &d.join("half.ko")]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("half.ko: "), "{}", stderr(&o));

    let o = patcher(&[p("--json"), p("info"), &d.join("script.ko")]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "refused");
    assert!(v["error"].as_str().unwrap().contains("not an ELF file"));

    let o = patcher(&[p("info"), &d.join("missing.ko")]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("missing.ko"), "{}", stderr(&o));

    // A BTF file that is not one.
    let o = patcher(&[
        p("info"),
        p("--btf"),
        &d.join("script.ko"),
        &d.join("seed.ko"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        stderr(&o).contains("not a usable BTF file"),
        "{}",
        stderr(&o)
    );

    // No file at all: a usage error.
    assert_eq!(patcher(&[p("info")]).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn completions_and_man_pages_come_from_the_cli_itself() {
    let o = patcher(&[p("completions"), p("bash")]);
    assert!(o.status.success(), "{o:?}");
    let script = stdout(&o);
    for word in ["info", "apply", "rollback", "--api-sock", "--trusted-keys"] {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
    let o = patcher(&[p("man")]);
    assert!(o.status.success(), "{o:?}");
    let page = stdout(&o);
    assert!(page.contains(".TH patcher 1"), "{page}");
    assert!(page.contains("info"), "{page}");

    let d = workdir("man");
    let o = patcher(&[p("man"), p("--dir"), &d.join("man1")]);
    assert!(o.status.success(), "{o:?}");
    for page in ["patcher.1", "patcher-info.1", "patcher-apply.1"] {
        let text = std::fs::read_to_string(d.join("man1").join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A module kbuild built against the test guest's headers
/// (guest-images/build-livepatch), as in the engine's dump tests: only
/// with KLPV_DUMP_TESTS=1, since the first build installs headers.
#[test]
fn info_describes_a_kbuild_module() {
    if std::env::var_os("KLPV_DUMP_TESTS").is_none_or(|v| v != "1") {
        eprintln!("skipped: needs kbuild and the guest's headers; run with KLPV_DUMP_TESTS=1");
        return;
    }
    let suffix = match std::env::var("KLPV_GUEST").as_deref() {
        Ok("6.12") => "-6.12",
        Ok("6.1-amd64") => "-6.1-amd64",
        _ => "",
    };
    let out = root().join(format!("build/patches{suffix}"));
    let status = Command::new(root().join("guest-images/build-livepatch"))
        .arg(root().join("guest-images/patches/module-pvpanic.c"))
        .arg(&out)
        .status()
        .expect("run guest-images/build-livepatch");
    assert!(status.success());
    let kver = std::fs::read_to_string(root().join(format!("build/guest{suffix}/kver"))).unwrap();
    let o = patcher(&[p("--json"), p("info"), &out.join("module-pvpanic.ko")]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], "module_pvpanic");
    assert_eq!(v["release"], kver.trim());
    let objects: Vec<&str> = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(objects, ["vmlinux", "pvpanic", "dummy"]);
    assert_eq!(v["objects"][1]["funcs"][0]["old_name"], "capability_show");
    assert_eq!(v["refused"], serde_json::json!([]));
}

/// A kbuild module with per-CPU variables of its own (percpu-uptime): its
/// `.data..percpu` is what the module loader would allocate per CPU, not
/// refused; only with KLPV_DUMP_TESTS=1, as above.
#[test]
fn info_shows_per_cpu_variables_as_the_loader_takes_them() {
    if std::env::var_os("KLPV_DUMP_TESTS").is_none_or(|v| v != "1") {
        eprintln!("skipped: needs kbuild and the guest's headers; run with KLPV_DUMP_TESTS=1");
        return;
    }
    let suffix = match std::env::var("KLPV_GUEST").as_deref() {
        Ok("6.12") => "-6.12",
        Ok("6.1-amd64") => "-6.1-amd64",
        _ => "",
    };
    let out = root().join(format!("build/patches{suffix}"));
    let status = Command::new(root().join("guest-images/build-livepatch"))
        .arg(root().join("guest-images/patches/percpu-uptime.c"))
        .arg(&out)
        .status()
        .expect("run guest-images/build-livepatch");
    assert!(status.success());
    let o = patcher(&[p("--json"), p("info"), &out.join("percpu-uptime.ko")]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], "percpu_uptime");
    let percpu = v["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == ".data..percpu")
        .expect("a .data..percpu section");
    assert_eq!(percpu["verdict"], "per-cpu", "{percpu}");
    assert_eq!(percpu["size"], 8);
    assert_eq!(v["refused"], serde_json::json!([]));
}

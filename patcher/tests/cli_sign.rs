//! `patcher keygen`, `sign` and `verify` as a user runs them: offline, no
//! VMM and no `--api-sock`, one line of output or error each.
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

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

fn workdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("klpv-cli-sign-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("trusted")).unwrap();
    d
}

#[test]
fn keygen_sign_verify_matrix() {
    let d = workdir();
    let module = d.join("m.ko");
    let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
    bytes.extend((0u8..=255).cycle().take(2000));
    std::fs::write(&module, &bytes).unwrap();

    let o = patcher(&[p("keygen"), p("--out"), &d.join("ops")]);
    assert!(o.status.success(), "{}", text(&o));
    let id = text(&o)
        .lines()
        .find_map(|l| l.strip_prefix("key ").map(str::to_owned))
        .unwrap();
    let o = patcher(&[p("keygen"), p("--out"), &d.join("rogue")]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::copy(d.join("ops.pub"), d.join("trusted/ops.pub")).unwrap();
    let trusted = d.join("trusted");

    let sign = |key: &str, out: &Path| {
        patcher(&[p("sign"), p("--key"), &d.join(key), &module, p("-o"), out])
    };
    let verify = |f: &Path| patcher(&[p("verify"), p("--trusted-keys"), &trusted, f]);

    let good = d.join("good.ko");
    assert!(sign("ops.key", &good).status.success());
    let o = verify(&good);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("verified: {id} (ops.pub)")),
        "{}",
        text(&o)
    );
    // The input is left as it was.
    assert_eq!(std::fs::read(&module).unwrap(), bytes);

    let rogue = d.join("rogue.ko");
    assert!(sign("rogue.key", &rogue).status.success());
    let o = verify(&rogue);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not among the trusted keys"),
        "{}",
        text(&o)
    );

    let tampered = d.join("tampered.ko");
    let mut t = std::fs::read(&good).unwrap();
    t[1000] ^= 1;
    std::fs::write(&tampered, t).unwrap();
    let o = verify(&tampered);
    assert!(!o.status.success());
    assert!(text(&o).contains("does not verify"), "{}", text(&o));

    let o = verify(&module);
    assert!(!o.status.success());
    assert!(text(&o).contains("patch is not signed"), "{}", text(&o));

    // Signing a signed module, or with the public key: refused, named.
    let o = patcher(&[
        p("sign"),
        p("--key"),
        &d.join("ops.key"),
        &good,
        p("-o"),
        &d.join("twice.ko"),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already signed"), "{}", text(&o));
    let o = sign("ops.pub", &d.join("x.ko"));
    assert!(!o.status.success());
    assert!(text(&o).contains("holds a public key"), "{}", text(&o));

    // In place by default.
    let inplace = d.join("inplace.ko");
    std::fs::copy(&module, &inplace).unwrap();
    let o = patcher(&[p("sign"), p("--key"), &d.join("ops.key"), &inplace]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(verify(&inplace).status.success());

    // The commands that talk to a VMM still say what they need.
    let o = patcher(&[p("list")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--api-sock"), "{}", text(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

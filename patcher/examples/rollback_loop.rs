//! rollback_loop SOCK [N] [REPLACE]: from the current stack A, enable
//! REPLACE (a replace patch; default klpv_v2) giving B; then N times
//! (default 100) roll back (B -> A) and roll the rollback back (A -> B),
//! comparing every patch site's 5 bytes and every patch's state with A and
//! B each time: a rollback must restore them exactly.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use klpvisor_api::client::{Client, Space, TransitionOptions};

mod common;

use common::percentile;

fn main() -> ExitCode {
    let args = match common::args("rollback_loop SOCK [N] [REPLACE]", 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| {
        let replace = args.get(2).map_or("klpv_v2", String::as_str);
        rollback(&args[0], common::num_or(&args, 1, 100), replace)
    })
}

/// Every patch site of every loaded patch, its 5 entry bytes, and each
/// patch's state: what a rollback must restore exactly.
type StackShot = (Vec<(u64, String)>, Vec<(String, String)>);

fn stack_shot(c: &Client) -> Result<StackShot, String> {
    let v = c.patches().map_err(|e| e.to_string())?;
    let mut sites: Vec<u64> = v
        .patches
        .iter()
        .flat_map(|p| p.funcs.iter().map(|f| f.site.0))
        .collect();
    sites.sort_unstable();
    sites.dedup();
    let mut bytes = Vec::new();
    for site in sites {
        let m = c
            .memory(Space::Virt, &format!("{site:#x}"), 5)
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

fn rollback(sock: &str, n: usize, replace: &str) -> Result<(), String> {
    let c = common::client(sock)?;
    let opts = TransitionOptions::default();
    let a = stack_shot(&c)?;
    c.enable(replace, opts)
        .map_err(|e| format!("enable {replace}: {e}"))?;
    let b = stack_shot(&c)?;
    if a == b {
        return Err(format!("enabling {replace} changed nothing"));
    }
    let (mut pauses, mut mismatches) = (Vec::new(), 0usize);
    for i in 0..n {
        for (want, what) in [(&a, "before the replace"), (&b, "after the replace")] {
            let r = c
                .rollback(None, opts)
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

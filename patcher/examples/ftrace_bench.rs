//! ftrace_bench SOCK N MODULE.ko: what redirecting through the guest's
//! ftrace costs a transition. N rounds of: apply MODULE.ko with no ops of
//! its functions registered (cold: the guest registers one `ftrace_ops`
//! per function through the call gate before the switch), disable, enable
//! again at once (warm: the ops are still registered, inert, so nothing is
//! registered), disable, then wait until the VMM has let every ops go and
//! remove the patch. Prints the request time of each kind (median, max)
//! and how long the release took.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use klpvisor_api::client::TransitionOptions;

mod common;

use common::percentile;

fn main() -> ExitCode {
    let usage = "ftrace_bench SOCK N MODULE.ko";
    let args = match common::args(usage, 3) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| match args[1].parse() {
        Ok(n) => ftrace_bench(&args[0], n, &args[2]),
        Err(_) => Err(format!("usage: {usage}")),
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn ftrace_bench(sock: &str, n: usize, path: &str) -> Result<(), String> {
    let c = common::client(sock)?;
    let module = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let opts = TransitionOptions::default();
    let (mut cold, mut warm, mut release) = (Vec::new(), Vec::new(), Vec::new());
    let (mut name, mut funcs, mut through) = (String::new(), 0, 0);
    common::ops_settled(&c, Duration::from_secs(600))?;
    for _ in 0..n {
        let t = Instant::now();
        let r = c
            .apply(module.clone(), opts)
            .map_err(|e| format!("apply {path}: {e}"))?;
        cold.push(ms(t));
        name = r.patch.name.clone();
        funcs = r.patch.funcs.len();
        through = r
            .patch
            .funcs
            .iter()
            .filter(|f| f.ftrace_ops.is_some())
            .count();
        c.disable(&name, opts)
            .map_err(|e| format!("disable {name}: {e}"))?;
        let t = Instant::now();
        c.enable(&name, opts)
            .map_err(|e| format!("enable {name}: {e}"))?;
        warm.push(ms(t));
        c.disable(&name, opts)
            .map_err(|e| format!("disable {name}: {e}"))?;
        release.push(common::ops_settled(&c, Duration::from_secs(600))?.as_secs_f64());
        c.remove(&name).map_err(|e| format!("remove {name}: {e}"))?;
    }
    for v in [&mut cold, &mut warm, &mut release] {
        v.sort_by(f64::total_cmp);
    }
    let med = |v: &[f64]| percentile(v, 0.5);
    let max = |v: &[f64]| v.last().copied().unwrap_or(0.0);
    println!(
        "KLPV-RESULT ftrace-bench patch={name} funcs={funcs} through_ftrace={through} rounds={n} \
         cold_median_ms={:.0} cold_max_ms={:.0} warm_median_ms={:.0} warm_max_ms={:.0} \
         release_median_s={:.1} release_max_s={:.1}",
        med(&cold),
        max(&cold),
        med(&warm),
        max(&warm),
        med(&release),
        max(&release)
    );
    Ok(())
}

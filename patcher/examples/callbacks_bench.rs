//! callbacks_bench SOCK N PATCH: N disable/enable pairs of the enabled
//! PATCH: request time, guest pause, and each klp callback's time in the
//! guest (median, p99) — what running callbacks through the call gate
//! costs a transition.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Instant;

use klpvisor_api::client::TransitionOptions;

mod common;

use common::percentile;

fn main() -> ExitCode {
    let args = match common::args("callbacks_bench SOCK N PATCH", 3) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| match args[1].parse() {
        Ok(n) => callbacks_bench(&args[0], n, &args[2]),
        Err(_) => Err("usage: callbacks_bench SOCK N PATCH".into()),
    })
}

fn callbacks_bench(sock: &str, n: usize, name: &str) -> Result<(), String> {
    let c = common::client(sock)?;
    let opts = TransitionOptions::default();
    let (mut request, mut pause, mut cb) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        for action in ["disable", "enable"] {
            let t = Instant::now();
            let r = if action == "enable" {
                c.enable(name, opts)
            } else {
                c.disable(name, opts)
            }
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

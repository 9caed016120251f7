//! transition_cycle SOCK [N]: the stress loop. N (default 1000)
//! transitions cycling enable klpv_v1 -> enable klpv_v2 (replace) ->
//! disable klpv_v2 (both loaded, neither enabled): each one's pause and
//! attempts, and the VMM's heap after the first 30 and at the end (a leak
//! per transition would show).
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Instant;

use klpvisor_api::client::TransitionOptions;

mod common;

use common::percentile;

fn main() -> ExitCode {
    let args = match common::args("transition_cycle SOCK [N]", 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| cycle(&args[0], common::num_or(&args, 1, 1000)))
}

/// `n` transitions v1 -> v2 (replace) -> none -> v1 ...
fn cycle(sock: &str, n: usize) -> Result<(), String> {
    const WARM: usize = 30;
    let c = common::client(sock)?;
    let heap =
        || -> Result<u64, String> { c.vm().map(|v| v.heap_bytes).map_err(|e| e.to_string()) };
    let steps = [
        ("enable", "klpv_v1"),
        ("enable", "klpv_v2"),
        ("disable", "klpv_v2"),
    ];
    let opts = TransitionOptions::default();
    let (mut pauses, mut attempts, mut failed) = (Vec::new(), Vec::new(), 0usize);
    let mut heap_warm = heap()?;
    let start = Instant::now();
    for i in 0..n {
        let (action, name) = steps[i % steps.len()];
        let r = if action == "enable" {
            c.enable(name, opts)
        } else {
            c.disable(name, opts)
        };
        match r {
            Ok(r) => {
                pauses.push(r.pause_us);
                attempts.push(r.attempts);
            }
            Err(e) => {
                failed += 1;
                if failed <= 5 {
                    println!(
                        "KLPV-STRESS-ERROR {i} {action} {name}: {}",
                        e.to_string().replace('\n', " ")
                    );
                }
                // The cycle only continues from a known state.
                return Err(format!("transition {i} ({action} {name}) failed: {e}"));
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

//! api_bench SOCK [N]: N (default 1000) pause/resume round trips through
//! the control socket: round-trip time, time out of guest mode and pause
//! latency (median, p99), and the kallsyms decode time the VMM measured.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Instant;

mod common;

use common::percentile;

fn main() -> ExitCode {
    let args = match common::args("api_bench SOCK [N]", 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| bench(&args[0], common::num_or(&args, 1, 1000)))
}

fn bench(sock: &str, n: usize) -> Result<(), String> {
    let c = common::client(sock)?;
    let info = c.vm().map_err(|e| e.to_string())?;
    let k = info.kernel.ok_or("guest kernel not found")?;
    let (mut rtt, mut out, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let p = c.pause().map_err(|e| e.to_string())?;
        let r = c.resume().map_err(|e| e.to_string())?;
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

//! replace_alternate SOCK K A B: the replace benchmark. K transitions
//! enabling loaded replace patches A, B, A, ... (each a full atomic replace
//! of every function they carry): pause and request time, median and p99,
//! and the guest's task count (the safe-point check walks every task).
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Instant;

use klpvisor_api::client::TransitionOptions;

mod common;

use common::percentile;

fn main() -> ExitCode {
    let args = match common::args("replace_alternate SOCK K A B", 4) {
        Ok(a) => a,
        Err(code) => return code,
    };
    common::run(|| match args[1].parse() {
        Ok(k) => alternate(&args[0], k, &args[2], &args[3]),
        Err(_) => Err("usage: replace_alternate SOCK K A B".into()),
    })
}

fn alternate(sock: &str, k: usize, a: &str, b: &str) -> Result<(), String> {
    let c = common::client(sock)?;
    let tasks = c.tasks().map_err(|e| e.to_string())?.count;
    let opts = TransitionOptions {
        force: false,
        timeout_ms: Some(25000),
    };
    let (mut pauses, mut requests, mut funcs) = (Vec::new(), Vec::new(), 0);
    for i in 0..k {
        let name = if i % 2 == 0 { a } else { b };
        let start = Instant::now();
        let r = c
            .enable(name, opts)
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

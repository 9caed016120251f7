//! Boots a guest through the `vmm` library and pauses and resumes it over and
//! over while it runs, reading every vCPU's registers in each pause. Used by
//! the pause/resume end-to-end test and by `scripts/bench`.
//!
//! Usage: [KLPV_COM2_OUT=PATH] pause_cycles KERNEL INITRD CPUS CMDLINE
//! Prints `KLPV-RESULT pause ...` with the number of cycles done after the
//! guest's boot marker and pause latency figures in microseconds. With
//! KLPV_COM2_OUT the guest gets COM2 writing to PATH (a FIFO the caller
//! reads): the test guest's init sends its command's output there, where
//! no kernel message can land inside one of its lines.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::devices::boot_timer::BootTimer;
use vmm::{Vm, VmConfig, VmError, VmExit};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn main() {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: pause_cycles KERNEL INITRD CPUS CMDLINE");
        std::process::exit(2);
    }
    let config = VmConfig {
        kernel: args[1].clone().into(),
        initrd: Some(args[2].clone().into()),
        cpus: args[3].parse().unwrap_or(2),
        cmdline: args[4].clone(),
        mem_mib: 256,
        arena_mib: 16,
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let com2: Option<Box<dyn std::io::Write + Send>> = match std::env::var_os("KLPV_COM2_OUT") {
        Some(path) => match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => Some(Box::new(f)),
            Err(e) => {
                eprintln!("pause_cycles: {}: {e}", path.to_string_lossy());
                std::process::exit(1);
            }
        },
        None => None,
    };
    let vm = match Vm::start(
        &config,
        Box::new(std::io::stdout()),
        com2,
        BootTimer::new(started),
    ) {
        Ok(vm) => Arc::new(vm),
        Err(e) => {
            eprintln!("pause_cycles: {e}");
            std::process::exit(1);
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let pauser = {
        let vm = vm.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            let mut paused_for = Vec::new();
            let mut bad_snapshots = 0u32;
            while !done.load(Ordering::Acquire) {
                let after_boot = vm.boot_time().is_some();
                let pause = match vm.pause() {
                    Ok(p) => p,
                    Err(VmError::NotRunning) => break,
                    Err(e) => {
                        eprintln!("pause_cycles: pause failed: {e}");
                        break;
                    }
                };
                for id in 0..vm.vcpu_count() as u8 {
                    match vm.vcpu_state(id) {
                        // Once the guest's init has run, the boot CPU is in the
                        // kernel proper with paging on (the bzImage decompressor
                        // may briefly drop to 32-bit mode without it).
                        Ok(s) if after_boot && id == 0 && s.sregs.cr0 & (1 << 31) == 0 => {
                            eprintln!("pause_cycles: vCPU 0 runs without paging: {s:?}");
                            bad_snapshots += 1
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("pause_cycles: {e}");
                            bad_snapshots += 1
                        }
                    }
                }
                let resume = match vm.resume() {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("pause_cycles: resume failed: {e}");
                        break;
                    }
                };
                if after_boot {
                    latencies.push(pause.latency.as_secs_f64() * 1e6);
                    paused_for.push(resume.paused_for.as_secs_f64() * 1e6);
                }
                // Let the guest run between pauses so it makes progress.
                std::thread::sleep(Duration::from_millis(2));
            }
            (latencies, paused_for, bad_snapshots)
        })
    };
    let exit = vm.wait();
    done.store(true, Ordering::Release);
    let (mut lat, mut held, bad) = pauser.join().unwrap_or_default();
    lat.sort_by(f64::total_cmp);
    held.sort_by(f64::total_cmp);
    println!(
        "KLPV-RESULT pause cycles={} bad_snapshots={} latency_median_us={:.0} latency_p99_us={:.0} paused_median_us={:.0} paused_p99_us={:.0} exit={}",
        lat.len(),
        bad,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&held, 0.5),
        percentile(&held, 0.99),
        match exit {
            VmExit::Guest(e) => format!("{e:?}"),
            other => format!("{other:?}").replace(' ', "_"),
        }
    );
}

//! `klpvisor-loadgen URL...`: HTTP/1.1 load on a server (the guest's nginx)
//! while klpvisor patches its kernel; prints one JSON result line. See the
//! library for what is measured and how.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use klpvisor_loadgen::{parse_duration, run_with_windows, Config, Error, Outcome, Report, Target};

/// HTTP/1.1 load generator: keep-alive connections, every request's latency
/// and result recorded, one JSON line at the end.
///
/// The line (on stdout): requests, ok, failed (bad_status, connect_errors,
/// timeouts, io_errors), duration_s, ok_per_s, and p50/p90/p99/p999/max
/// latency of the successful requests in microseconds (nearest rank).
/// Exit status: 0, or 1 with --fail-on-error when a request failed or none
/// succeeded, or 2 when the run could not start.
#[derive(Debug, Parser)]
#[command(name = "klpvisor-loadgen", version)]
struct Cli {
    /// http://HOST[:PORT]/PATH, one or more on the same host and port;
    /// each connection requests them in turn.
    #[arg(required = true)]
    urls: Vec<String>,
    /// Keep-alive connections, each with one request in flight.
    #[arg(short, long, default_value_t = 4)]
    connections: usize,
    /// Requests per second over all connections (default: closed loop,
    /// each connection sends again as soon as it has its answer). Under a
    /// rate, latency counts from the request's slot, so a stalled server's
    /// backlog shows as latency.
    #[arg(short, long)]
    rate: Option<f64>,
    /// How long to run: 500ms, 10s, 2m.
    #[arg(short, long, value_parser = parse_duration_arg)]
    duration: Option<Duration>,
    /// Stop once this file exists (with or without --duration).
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// A request without a complete response after this long fails.
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    timeout: Duration,
    /// The status of a successful response.
    #[arg(long, default_value_t = 200)]
    expect_status: u16,
    /// Exit 1 when any request failed or none succeeded.
    #[arg(long)]
    fail_on_error: bool,
    /// Print this word and a space before the JSON (e.g. KLPV-LOAD, for a
    /// scenario's tagged lines).
    #[arg(long)]
    prefix: Option<String>,
    /// Also print, on stderr as the run goes, one JSON line per interval
    /// (e.g. 1s) for the requests that ended in it: t_s (its end) and the
    /// fields of the result line. After --prefix P, the lines start "P-WINDOW ".
    #[arg(long, value_parser = parse_duration_arg)]
    interval: Option<Duration>,
    /// Write every request as a line "start_us latency_us result" to this
    /// file (result: the status code, or connect, timeout, io).
    #[arg(long)]
    records: Option<PathBuf>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// SIGINT or SIGTERM: stop as at the end of the duration, and still print
/// the line. Without a handler (it could not be installed) only the
/// duration or the stop file ends the run.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

fn write_records(path: &PathBuf, report: &Report) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut records = report.records.clone();
    records.sort_by_key(|r| r.start_us);
    for r in &records {
        let result = match r.outcome {
            Outcome::Ok(s) | Outcome::Status(s) => s.to_string(),
            Outcome::Connect => "connect".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Io => "io".into(),
        };
        writeln!(f, "{} {} {}", r.start_us, r.latency_us, result)?;
    }
    f.flush()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Target::from_urls(&cli.urls).map(|target| Config {
        target,
        connections: cli.connections,
        rate: cli.rate,
        duration: cli.duration,
        stop_file: cli.stop_file.clone(),
        timeout: cli.timeout,
        expect_status: cli.expect_status,
        interval: cli.interval,
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("klpvisor-loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
        .and_then(|rt| {
            let prefix = cli.prefix.as_ref().map(|p| format!("{p}-WINDOW"));
            rt.block_on(run_with_windows(&config, stop_signal(), |w| {
                eprintln!("{}", w.line(prefix.as_deref()));
            }))
        });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("klpvisor-loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &cli.records {
        if let Err(e) = write_records(path, &report) {
            eprintln!("klpvisor-loadgen: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    let summary = report.summary(&config);
    println!("{}", summary.line(cli.prefix.as_deref()));
    if cli.fail_on_error && summary.has_failures() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

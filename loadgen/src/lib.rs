//! An HTTP/1.1 load generator for a guest's web server while a patch goes
//! in: a fixed number of keep-alive connections, each sending one request
//! after another (closed loop) or on a fixed schedule (fixed rate), until a
//! duration has passed, a stop file appears or the process is told to
//! stop. Every request's start, latency and result is kept, and the run
//! ends in one JSON line ([`Summary`]) with the counts by outcome and the
//! latency percentiles, so a test can assert "no request failed and p99
//! stayed under X" across a live patch.
//!
//! HTTP comes from hyper's client connections: no HTTP is parsed here.
//! A connection that breaks counts its request as failed and is opened
//! again, so a server that restarts or stalls shows up in the counts
//! instead of ending the run.

pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

pub use stats::{nearest_rank, Outcome, Record, Summary};

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A URL that does not parse.
    #[error("{url}: not a URL: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// hyper's reason.
        reason: String,
    },
    /// Only plain `http://host[:port]/path` URLs are supported.
    #[error("{0}: only http:// URLs with a host are supported")]
    Unsupported(String),
    /// All URLs of a run share the connections, so they must name one
    /// server.
    #[error("{0}: every URL must name the same host and port as the first")]
    MixedAuthority(String),
    /// No URL at all.
    #[error("no URL given")]
    NoUrl,
    /// A duration that does not parse.
    #[error("{0}: not a duration (e.g. 500ms, 10s, 2m, 1.5s)")]
    BadDuration(String),
    /// A setting out of range.
    #[error("{0}")]
    Invalid(String),
    /// The async runtime could not be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Parses `500ms`, `10s`, `2m`, `1.5s` or a plain number of seconds.
/// (Small enough not to need a crate: three units.)
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let bad = || Error::BadDuration(s.to_string());
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    Duration::try_from_secs_f64(v * scale).map_err(|_| bad())
}

/// The server and the request targets of a run.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` to connect to.
    pub addr: String,
    /// The `Host` header.
    pub host_header: String,
    /// Paths (with query) requested in turn.
    pub paths: Vec<String>,
}

impl Target {
    /// Checks `urls`: plain http, one host and port for all.
    pub fn from_urls(urls: &[String]) -> Result<Self, Error> {
        let mut target: Option<Target> = None;
        for url in urls {
            let uri: Uri =
                url.parse()
                    .map_err(|e: hyper::http::uri::InvalidUri| Error::BadUrl {
                        url: url.clone(),
                        reason: e.to_string(),
                    })?;
            if uri.scheme_str() != Some("http") {
                return Err(Error::Unsupported(url.clone()));
            }
            let Some(authority) = uri.authority() else {
                return Err(Error::Unsupported(url.clone()));
            };
            let port = authority.port_u16().unwrap_or(80);
            let addr = format!("{}:{port}", authority.host());
            let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
            match &mut target {
                None => {
                    target = Some(Target {
                        addr,
                        host_header: authority.as_str().to_string(),
                        paths: vec![path],
                    })
                }
                Some(t) if t.addr == addr => t.paths.push(path),
                Some(_) => return Err(Error::MixedAuthority(url.clone())),
            }
        }
        target.ok_or(Error::NoUrl)
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to send requests.
    pub target: Target,
    /// Keep-alive connections, each with one request in flight at a time.
    pub connections: usize,
    /// Requests per second over all connections (`None`: each connection
    /// sends its next request as soon as the last one is answered).
    pub rate: Option<f64>,
    /// How long to run (`None`: until the stop file or a signal).
    pub duration: Option<Duration>,
    /// Stop once this file exists (polled every 50 ms).
    pub stop_file: Option<PathBuf>,
    /// A request with no complete response after this long fails, and its
    /// connection is opened again.
    pub timeout: Duration,
    /// The status a successful response has.
    pub expect_status: u16,
    /// Summarise the requests that ended in each interval of this length
    /// as the run goes (a latency spike while a patch goes in shows in its
    /// window, not only in the run's p99).
    pub interval: Option<Duration>,
}

impl Config {
    /// Checks the settings that the types allow but a run does not.
    pub fn validate(&self) -> Result<(), Error> {
        if self.connections == 0 {
            return Err(Error::Invalid("--connections must be at least 1".into()));
        }
        if let Some(r) = self.rate {
            if !r.is_finite() || r <= 0.0 {
                return Err(Error::Invalid("--rate must be a positive number".into()));
            }
        }
        if self.duration.is_none() && self.stop_file.is_none() {
            return Err(Error::Invalid(
                "nothing would end the run but a signal: give --duration or --stop-file".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::Invalid("--timeout must be more than 0".into()));
        }
        if self.interval.is_some_and(|i| i < Duration::from_millis(10)) {
            return Err(Error::Invalid("--interval must be at least 10ms".into()));
        }
        Ok(())
    }
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The duration passed.
    Duration,
    /// The stop file appeared.
    StopFile,
    /// SIGINT or SIGTERM (only when the caller passes a signal future).
    Signal,
}

/// The requests that ended in one interval of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Window {
    /// Seconds from the start of the run to the end of the window.
    pub t_s: f64,
    /// Its requests, summarised as the whole run is (`duration_s` is the
    /// window's length).
    #[serde(flatten)]
    pub summary: Summary,
}

impl Window {
    /// The window as one line of JSON (no newline), optionally after
    /// `prefix` and a space.
    pub fn line(&self, prefix: Option<&str>) -> String {
        // Plain numbers and an Option: serialising cannot fail.
        let json = serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"));
        match prefix {
            Some(p) => format!("{p} {json}"),
            None => json,
        }
    }
}

/// A finished run: every request, and why it ended.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every request, in no particular order across connections.
    pub records: Vec<Record>,
    /// With [`Config::interval`], every window in order (the last one cut
    /// short by the end of the run); else empty.
    pub windows: Vec<Window>,
    /// Wall-clock length of the run.
    pub elapsed: Duration,
    /// Why it ended.
    pub stop: StopReason,
}

impl Report {
    /// The summary line's data.
    pub fn summary(&self, config: &Config) -> Summary {
        Summary::new(
            &self.records,
            self.elapsed.as_secs_f64(),
            config.connections,
            config.rate,
        )
    }
}

/// Runs the load until the duration passes, the stop file appears or
/// `signal` completes, then waits for the requests in flight (each bounded
/// by the timeout) and returns every record.
pub async fn run<S>(config: &Config, signal: S) -> Result<Report, Error>
where
    S: std::future::Future<Output = ()>,
{
    run_with_windows(config, signal, |_| {}).await
}

/// [`run`], calling `on_window` with each window as it closes when
/// [`Config::interval`] is set (the binary prints them as they come).
pub async fn run_with_windows<S, F>(
    config: &Config,
    signal: S,
    mut on_window: F,
) -> Result<Report, Error>
where
    S: std::future::Future<Output = ()>,
    F: FnMut(&Window),
{
    config.validate()?;
    // Each finished request also goes to the window summaries.
    let (win_tx, mut win_rx) = mpsc::unbounded_channel::<Record>();
    let win_tx = config.interval.map(|_| win_tx);
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        target: config.target.clone(),
        timeout: config.timeout,
        expect_status: config.expect_status,
        run_start: start,
    });
    let mut workers = Vec::with_capacity(config.connections);
    for i in 0..config.connections {
        // Under a fixed rate each connection sends every `connections / rate`
        // seconds, the connections spread evenly over one period.
        let schedule = config.rate.map(|r| {
            let period = Duration::from_secs_f64(config.connections as f64 / r);
            let offset = period.mul_f64(i as f64 / config.connections as f64);
            (period, offset)
        });
        workers.push(tokio::spawn(worker(
            Arc::clone(&shared),
            i,
            schedule,
            stop_rx.clone(),
            win_tx.clone(),
        )));
    }
    // Only the workers hold senders now: the channel ends with them.
    drop(win_tx);

    let mut windows = Vec::new();
    let mut window: Vec<Record> = Vec::new();
    let mut close_window = |window: &mut Vec<Record>, end: Instant, len: Duration| {
        let w = Window {
            t_s: end.saturating_duration_since(start).as_secs_f64(),
            summary: Summary::new(window, len.as_secs_f64(), config.connections, config.rate),
        };
        window.clear();
        on_window(&w);
        windows.push(w);
    };
    let stop = match config.interval {
        None => wait_for_stop(config, signal).await,
        Some(iv) => {
            let mut ticker = tokio::time::interval_at((start + iv).into(), iv);
            let stop = wait_for_stop(config, signal);
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    reason = &mut stop => break reason,
                    Some(r) = win_rx.recv() => window.push(r),
                    t = ticker.tick() => close_window(&mut window, t.into_std(), iv),
                }
            }
        }
    };
    // Receivers are held by the workers; a send error means they are all
    // gone already, which is what stopping wants anyway.
    let _ = stop_tx.send(true);
    let mut records = Vec::new();
    for w in workers {
        // A worker that panicked lost its records; nothing in it panics
        // by design, so that would be a bug to see, not hide: its requests
        // are simply missing from the counts.
        if let Ok(mut r) = w.await {
            records.append(&mut r);
        }
    }
    if let Some(iv) = config.interval {
        // The requests that were in flight at the stop, in a last, shorter
        // window.
        while let Ok(r) = win_rx.try_recv() {
            window.push(r);
        }
        let now = Instant::now();
        let whole = (now.saturating_duration_since(start).as_secs_f64() / iv.as_secs_f64()).floor();
        let opened = start + iv.mul_f64(whole);
        close_window(&mut window, now, now.saturating_duration_since(opened));
    }
    Ok(Report {
        records,
        windows,
        elapsed: start.elapsed(),
        stop,
    })
}

/// Returns once the run should end, and why.
async fn wait_for_stop<S>(config: &Config, signal: S) -> StopReason
where
    S: std::future::Future<Output = ()>,
{
    let deadline = async {
        match config.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending::<()>().await,
        }
    };
    let stop_file = async {
        match &config.stop_file {
            Some(p) => {
                while !p.exists() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = deadline => StopReason::Duration,
        () = stop_file => StopReason::StopFile,
        () = signal => StopReason::Signal,
    }
}

/// Microseconds between `a` and `b` (0 when `b` is earlier).
fn us_between(a: Instant, b: Instant) -> u64 {
    u64::try_from(b.saturating_duration_since(a).as_micros()).unwrap_or(u64::MAX)
}

/// What every connection's loop shares.
struct Shared {
    target: Target,
    timeout: Duration,
    expect_status: u16,
    run_start: Instant,
}

/// One connection's loop: (re)connect when needed, send, record (and pass
/// each record on to `windows`).
async fn worker(
    shared: Arc<Shared>,
    index: usize,
    schedule: Option<(Duration, Duration)>,
    stop: watch::Receiver<bool>,
    windows: Option<mpsc::UnboundedSender<Record>>,
) -> Vec<Record> {
    let Shared {
        ref target,
        timeout,
        expect_status,
        run_start,
    } = *shared;
    let mut records = Vec::new();
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    // Each connection starts at another path, so with as many paths as
    // connections every path is in flight all the time.
    let mut next_path = index;
    let mut k: u32 = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        // The request's start: its slot under a fixed rate (waiting for it
        // unless already late), else now.
        let due = match schedule {
            Some((period, offset)) => {
                let due = run_start + offset + period.saturating_mul(k);
                k = k.saturating_add(1);
                let mut stop_wait = stop.clone();
                tokio::select! {
                    () = tokio::time::sleep_until(due.into()) => {}
                    _ = stop_wait.wait_for(|s| *s) => break,
                }
                due
            }
            None => Instant::now(),
        };
        let path = &target.paths[next_path % target.paths.len()];
        next_path = next_path.wrapping_add(1);
        // The timeout runs from the send, the latency from the due time:
        // a late request is not failed for the backlog before it.
        let outcome = match tokio::time::timeout(
            timeout,
            one_request(target, path, &mut sender, expect_status),
        )
        .await
        {
            Ok(o) => o,
            Err(_) => Outcome::Timeout,
        };
        if !outcome.is_ok() {
            // Whatever state the connection is in, the next request gets a
            // fresh one (a timed-out request may still be in flight on it).
            sender = None;
        }
        let record = Record {
            start_us: us_between(run_start, due),
            latency_us: us_between(due, Instant::now()),
            outcome,
        };
        records.push(record);
        if let Some(w) = &windows {
            // Closed only once the run is over and drained.
            let _ = w.send(record);
        }
        if outcome == Outcome::Connect {
            // A refused connection fails at once: do not spin on it.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    records
}

/// Sends one GET on the connection in `sender` (opening one first when
/// there is none) and reads the response body to its end.
async fn one_request(
    target: &Target,
    path: &str,
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
    expect_status: u16,
) -> Outcome {
    let s = match sender {
        Some(s) if !s.is_closed() => s,
        _ => match connect(target).await {
            Ok(s) => sender.insert(s),
            Err(o) => return o,
        },
    };
    if s.ready().await.is_err() {
        return Outcome::Io;
    }
    let req = match Request::get(path)
        .header(hyper::header::HOST, target.host_header.as_str())
        .body(Empty::<Bytes>::new())
    {
        Ok(r) => r,
        // Paths come from parsed URIs, so this does not happen; a request
        // that cannot be built is one that was not sent.
        Err(_) => return Outcome::Io,
    };
    let resp = match s.send_request(req).await {
        Ok(r) => r,
        Err(_) => return Outcome::Io,
    };
    let status = resp.status().as_u16();
    if resp.into_body().collect().await.is_err() {
        return Outcome::Io;
    }
    if status == expect_status {
        Outcome::Ok(status)
    } else {
        Outcome::Status(status)
    }
}

/// A new keep-alive HTTP/1.1 connection to the target; its driver runs as
/// a task of its own until the sender is dropped or the peer closes.
async fn connect(target: &Target) -> Result<SendRequest<Empty<Bytes>>, Outcome> {
    let stream = TcpStream::connect(&target.addr)
        .await
        .map_err(|_| Outcome::Connect)?;
    // Requests are small and latency is what is measured.
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Outcome::Connect)?;
    tokio::spawn(async move {
        // A connection error surfaces as the failure of the request on it.
        let _ = conn.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "s", "-1s", "abc", "1h", "NaNs", "infs"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls() {
        let t = Target::from_urls(&[
            "http://10.0.2.15/".into(),
            "http://10.0.2.15:80/ping?x=1".into(),
        ])
        .unwrap();
        assert_eq!(t.addr, "10.0.2.15:80");
        assert_eq!(t.host_header, "10.0.2.15");
        assert_eq!(t.paths, ["/", "/ping?x=1"]);
        let t = Target::from_urls(&["http://127.0.0.1:8080".into()]).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.paths[0].as_str()),
            ("127.0.0.1:8080", "/")
        );
        assert!(matches!(Target::from_urls(&[]), Err(Error::NoUrl)));
        assert!(matches!(
            Target::from_urls(&["https://a/".into()]),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            Target::from_urls(&["/path".into()]),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            Target::from_urls(&["http://a/".into(), "http://b/".into()]),
            Err(Error::MixedAuthority(_))
        ));
        assert!(matches!(
            Target::from_urls(&["http://a b/".into()]),
            Err(Error::BadUrl { .. })
        ));
    }

    #[test]
    fn config_checks() {
        let mut c = Config {
            target: Target::from_urls(&["http://127.0.0.1:1/".into()]).unwrap(),
            connections: 1,
            rate: None,
            duration: Some(Duration::from_secs(1)),
            stop_file: None,
            timeout: Duration::from_secs(1),
            expect_status: 200,
            interval: None,
        };
        assert!(c.validate().is_ok());
        c.connections = 0;
        assert!(c.validate().is_err());
        c.connections = 1;
        c.rate = Some(0.0);
        assert!(c.validate().is_err());
        c.rate = Some(f64::INFINITY);
        assert!(c.validate().is_err());
        c.rate = None;
        c.duration = None;
        assert!(c.validate().is_err());
        c.stop_file = Some("/nonexistent".into());
        assert!(c.validate().is_ok());
        c.timeout = Duration::ZERO;
        assert!(c.validate().is_err());
        c.timeout = Duration::from_secs(1);
        c.interval = Some(Duration::from_millis(1));
        assert!(c.validate().is_err());
        c.interval = Some(Duration::from_millis(100));
        assert!(c.validate().is_ok());
    }
}

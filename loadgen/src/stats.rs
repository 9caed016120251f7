//! What a run measured: every request's record, and the one-line summary
//! the tests and benchmarks read.

use serde::Serialize;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with the expected status, its body read to the end.
    Ok(u16),
    /// A response with another status (the server answered, but not as
    /// asked: counted as a failure).
    Status(u16),
    /// No TCP connection (refused, unreachable, or the handshake failed).
    Connect,
    /// No complete response within the per-request timeout.
    Timeout,
    /// The connection broke while sending or reading (reset, closed early,
    /// malformed response).
    Io,
}

impl Outcome {
    /// Whether the request counts as successful.
    pub fn is_ok(self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
}

/// One request: when it was due, how long it took, how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Microseconds from the start of the run to the request's start (its
    /// scheduled start under a fixed rate, so a stalled server's backlog
    /// shows as latency instead of as requests never sent).
    pub start_us: u64,
    /// Microseconds from that start to the end of the response body (or to
    /// the failure).
    pub latency_us: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// The `q`-quantile (0 < q <= 1) of `sorted` by the nearest-rank method:
/// the smallest value with at least `q` of the values at or below it, i.e.
/// the value at 1-based rank ceil(q * n). Always a measured value, never
/// an interpolation between two; `None` for no values.
pub fn nearest_rank(sorted: &[u64], q: f64) -> Option<u64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    // ceil(q * n) in 1..=n; the float only picks a rank, and `as` saturates
    // a NaN or negative product to 0, which the clamp then lifts to 1.
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted.get(rank - 1).copied()
}

/// The result line: counts by outcome and the latency distribution of the
/// successful requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Every request that was started and ended (successful or not).
    pub requests: u64,
    /// Successful requests.
    pub ok: u64,
    /// Everything else: `bad_status + connect_errors + timeouts + io_errors`.
    pub failed: u64,
    /// Responses with an unexpected status.
    pub bad_status: u64,
    /// Connections that could not be made.
    pub connect_errors: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Connections that broke mid-request.
    pub io_errors: u64,
    /// Wall-clock length of the run in seconds.
    pub duration_s: f64,
    /// Successful requests per second.
    pub ok_per_s: f64,
    /// Latency percentiles of the successful requests, microseconds
    /// (nearest rank; 0 when there were none).
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// The slowest successful request.
    pub max_us: u64,
    /// The slowest request of any outcome (a failure's time to fail).
    pub max_any_us: u64,
    /// Connections the run kept open.
    pub connections: usize,
    /// Requests per second asked for (fixed rate), or `None` (closed loop).
    pub rate: Option<f64>,
}

impl Summary {
    /// Summarises `records` of a run that lasted `duration_s` seconds.
    pub fn new(records: &[Record], duration_s: f64, connections: usize, rate: Option<f64>) -> Self {
        let mut ok_lat: Vec<u64> = records
            .iter()
            .filter(|r| r.outcome.is_ok())
            .map(|r| r.latency_us)
            .collect();
        ok_lat.sort_unstable();
        let count =
            |f: fn(&Outcome) -> bool| records.iter().filter(|r| f(&r.outcome)).count() as u64;
        let bad_status = count(|o| matches!(o, Outcome::Status(_)));
        let connect_errors = count(|o| matches!(o, Outcome::Connect));
        let timeouts = count(|o| matches!(o, Outcome::Timeout));
        let io_errors = count(|o| matches!(o, Outcome::Io));
        let ok = ok_lat.len() as u64;
        let pct = |q| nearest_rank(&ok_lat, q).unwrap_or(0);
        Summary {
            requests: records.len() as u64,
            ok,
            failed: bad_status + connect_errors + timeouts + io_errors,
            bad_status,
            connect_errors,
            timeouts,
            io_errors,
            duration_s,
            ok_per_s: if duration_s > 0.0 {
                ok as f64 / duration_s
            } else {
                0.0
            },
            p50_us: pct(0.50),
            p90_us: pct(0.90),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            max_us: ok_lat.last().copied().unwrap_or(0),
            max_any_us: records.iter().map(|r| r.latency_us).max().unwrap_or(0),
            connections,
            rate,
        }
    }

    /// The result as one line of JSON (no newline), optionally after
    /// `prefix` and a space, as the scenario scripts tag their lines.
    pub fn line(&self, prefix: Option<&str>) -> String {
        // Serialising plain numbers and an Option cannot fail; an empty
        // object would still be one line if it somehow did.
        let json = serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"));
        match prefix {
            Some(p) => format!("{p} {json}"),
            None => json,
        }
    }

    /// Whether the run counts as failed for `--fail-on-error`: any failed
    /// request, or none that succeeded at all.
    pub fn has_failures(&self) -> bool {
        self.failed > 0 || self.ok == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_of_one_to_a_hundred() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 0.50), Some(50));
        assert_eq!(nearest_rank(&v, 0.90), Some(90));
        assert_eq!(nearest_rank(&v, 0.99), Some(99));
        assert_eq!(nearest_rank(&v, 0.999), Some(100));
        assert_eq!(nearest_rank(&v, 1.0), Some(100));
        assert_eq!(nearest_rank(&v, 0.001), Some(1));
    }

    #[test]
    fn nearest_rank_edges() {
        assert_eq!(nearest_rank(&[], 0.5), None);
        assert_eq!(nearest_rank(&[7], 0.5), Some(7));
        assert_eq!(nearest_rank(&[7], 0.999), Some(7));
        // Ranks are ceilings: p50 of four values is the second.
        assert_eq!(nearest_rank(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(nearest_rank(&[1, 2, 3, 4], 0.51), Some(3));
        // Out-of-range quantiles clamp to the ends instead of panicking.
        assert_eq!(nearest_rank(&[1, 2, 3], 0.0), Some(1));
        assert_eq!(nearest_rank(&[1, 2, 3], -1.0), Some(1));
        assert_eq!(nearest_rank(&[1, 2, 3], 2.0), Some(3));
        assert_eq!(nearest_rank(&[1, 2, 3], f64::NAN), Some(1));
    }

    #[test]
    fn nearest_rank_p99_of_a_thousand_is_the_990th() {
        let v: Vec<u64> = (0..1000).map(|i| i * 10).collect();
        assert_eq!(nearest_rank(&v, 0.99), Some(9890));
    }

    fn rec(latency_us: u64, outcome: Outcome) -> Record {
        Record {
            start_us: 0,
            latency_us,
            outcome,
        }
    }

    #[test]
    fn summary_counts_and_percentiles_of_successes_only() {
        let mut records: Vec<Record> = (1..=100).map(|i| rec(i, Outcome::Ok(200))).collect();
        records.push(rec(5_000_000, Outcome::Timeout));
        records.push(rec(3, Outcome::Connect));
        records.push(rec(4, Outcome::Status(503)));
        records.push(rec(9, Outcome::Io));
        let s = Summary::new(&records, 2.0, 4, None);
        assert_eq!(s.requests, 104);
        assert_eq!(s.ok, 100);
        assert_eq!(s.failed, 4);
        assert_eq!(
            (s.bad_status, s.connect_errors, s.timeouts, s.io_errors),
            (1, 1, 1, 1)
        );
        assert_eq!(
            (s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us),
            (50, 90, 99, 100, 100)
        );
        assert_eq!(s.max_any_us, 5_000_000);
        assert_eq!(s.ok_per_s, 50.0);
        assert!(s.has_failures());
    }

    #[test]
    fn no_success_is_a_failure_and_zero_percentiles() {
        let s = Summary::new(&[], 1.0, 1, Some(10.0));
        assert_eq!(
            (s.requests, s.ok, s.failed, s.p50_us, s.max_us),
            (0, 0, 0, 0, 0)
        );
        assert!(s.has_failures());
        let s = Summary::new(&[rec(10, Outcome::Ok(200))], 0.0, 1, None);
        assert!(!s.has_failures());
        assert_eq!(s.ok_per_s, 0.0);
    }

    #[test]
    fn result_line_is_one_line_of_json_with_every_field() {
        let records = [
            rec(100, Outcome::Ok(200)),
            rec(300, Outcome::Ok(200)),
            rec(7, Outcome::Io),
        ];
        let s = Summary::new(&records, 0.5, 2, Some(100.0));
        let line = s.line(Some("KLPV-LOAD"));
        assert!(!line.contains('\n'));
        let json = line.strip_prefix("KLPV-LOAD ").expect("prefix");
        let v: serde_json::Value = serde_json::from_str(json).expect("json");
        assert_eq!(v["requests"], 3);
        assert_eq!(v["ok"], 2);
        assert_eq!(v["failed"], 1);
        assert_eq!(v["io_errors"], 1);
        assert_eq!(v["p50_us"], 100);
        assert_eq!(v["p99_us"], 300);
        assert_eq!(v["max_us"], 300);
        assert_eq!(v["ok_per_s"], 4.0);
        assert_eq!(v["connections"], 2);
        assert_eq!(v["rate"], 100.0);
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        for k in [
            "requests",
            "ok",
            "failed",
            "bad_status",
            "connect_errors",
            "timeouts",
            "io_errors",
            "duration_s",
            "ok_per_s",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "max_any_us",
            "connections",
            "rate",
        ] {
            assert!(keys.contains(&k), "missing {k} in {line}");
        }
        let closed = Summary::new(&records, 0.5, 2, None).line(None);
        assert!(closed.starts_with('{') && closed.contains("\"rate\":null"));
    }
}

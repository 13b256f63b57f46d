//! The load generator of the `http` suite: wrk (pinned to its own CPU when there are two), its
//! report parsed, and the server's CPU time read from `/proc`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::BoxError;
use crate::load::{Load, run_time};

/// Requests in flight at any time (one keep-alive connection each).
pub(crate) const CONCURRENCY: usize = 32;

/// Where the server and wrk run: with two or more CPUs and `taskset` present, the server process
/// on the first CPU and wrk on the last, so neither steals the other's core and the server's
/// capacity is what is measured (redis-server, in the Redis case, runs where the kernel puts it).
#[derive(Debug, Clone)]
pub(crate) struct Cpus {
    pub(crate) server: Option<String>,
    pub(crate) generator: Option<String>,
}

impl Cpus {
    pub(crate) fn plan() -> Cpus {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let taskset = Command::new("taskset")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if cpus >= 2 && taskset {
            Cpus {
                server: Some("0".to_owned()),
                generator: Some((cpus - 1).to_string()),
            }
        } else {
            Cpus::unpinned()
        }
    }

    /// Where the kernel puts them.
    pub(crate) fn unpinned() -> Cpus {
        Cpus {
            server: None,
            generator: None,
        }
    }
}

/// One wrk run against `addr` for `duration` (whole seconds, at least 1): its report.
pub(crate) fn wrk_run(
    addr: SocketAddr,
    duration: Duration,
    cpus: &Cpus,
) -> Result<String, BoxError> {
    let url = format!("http://{addr}/");
    let mut cmd = match &cpus.generator {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu, "wrk"]);
            c
        }
        None => Command::new("wrk"),
    };
    let out = cmd
        .args(["-t1", &format!("-c{CONCURRENCY}")])
        // wrk counts whole seconds.
        .arg(format!("-d{}s", duration.as_secs_f64().ceil().max(1.0)))
        .args(["--latency", &url])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(text)
}

/// The CPU time every thread of process `pid` has run so far (`/proc/PID/task/*/schedstat`,
/// nanoseconds), Linux only. Over a wrk run the difference is the server's CPU time; unlike the
/// throughput it leaves out the time the VM spends elsewhere, so it is the steadier measure of what
/// a request costs.
pub(crate) fn process_cpu(pid: u32) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        total += run_time(&task.ok()?.path().join("schedstat"))?;
    }
    Some(total)
}

/// wrk's `90662 requests in 1.00s, ...` line: the number of requests.
pub(crate) fn wrk_requests(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Parses wrk's `--latency` report: `Requests/sec`, the 50 % and 99 % latencies; `None` when a
/// line is missing or wrk saw errors or non-2xx answers (every request is meant to pass).
pub(crate) fn parse_wrk(text: &str) -> Option<Load> {
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        return None;
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let per_sec = field("Requests/sec:")?.parse::<f64>().ok()?;
    Some(Load {
        per_sec,
        p50: wrk_duration(field("50%")?)?,
        p99: wrk_duration(field("99%")?)?,
        calls: 0,
    })
}

/// wrk's durations: `412.00us`, `1.20ms`, `2.00s`, `1.50m`.
pub(crate) fn wrk_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 1s test @ http://127.0.0.1:40000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   351.20us  120.11us   4.28ms   90.12%
    Req/Sec    90.12k     2.01k   93.00k    80.00%
  Latency Distribution
     50%  331.00us
     75%  380.00us
     90%  450.00us
     99%    1.02ms
  90662 requests in 1.00s, 11.24MB read
Requests/sec:  90561.23
Transfer/sec:     11.22MB
";

    #[test]
    fn parses_a_wrk_report() {
        let load = parse_wrk(REPORT).expect("parsed");
        assert!((load.per_sec - 90_561.23).abs() < 1e-6);
        assert_eq!(load.p50, Duration::from_micros(331));
        assert_eq!(load.p99, Duration::from_micros(1020));
    }

    #[test]
    fn refuses_a_wrk_report_with_failures() {
        let failed = REPORT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\nRequests/sec",
        );
        assert!(parse_wrk(&failed).is_none());
        assert!(parse_wrk("garbage").is_none());
    }

    #[test]
    fn reads_wrk_durations() {
        assert_eq!(wrk_duration("412.00us"), Some(Duration::from_micros(412)));
        assert_eq!(wrk_duration("2.00s"), Some(Duration::from_secs(2)));
        assert_eq!(wrk_duration("1.50m"), Some(Duration::from_secs(90)));
        assert_eq!(wrk_duration("12"), None);
        assert_eq!(wrk_duration("3.0h"), None);
    }
}

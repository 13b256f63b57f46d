//! A closed-loop load: N tasks, each sending its next call when the last one answered.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::BoxError;
use crate::report::{median, ms, percentile, thousands};

/// Throughput and latency of one load run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    /// Calls per second.
    pub(crate) per_sec: f64,
    /// Median latency.
    pub(crate) p50: Duration,
    /// 99th percentile latency.
    pub(crate) p99: Duration,
    /// How many calls completed (0 where the generator does not say).
    pub(crate) calls: u64,
}

impl Load {
    /// `12,345/s (p50 0.123 ms, p99 0.456 ms)`.
    pub(crate) fn text(&self) -> String {
        format!(
            "{}/s (p50 {}, p99 {})",
            thousands(self.per_sec),
            ms(self.p50),
            ms(self.p99)
        )
    }
}

/// Runs `tasks` tasks, each calling its operation in a loop for `duration`; the operation answers
/// whether it succeeded (allowed, 200 OK). A failure is an error: the quotas are meant never to deny.
pub(crate) async fn drive<Op, Fut>(
    tasks: usize,
    duration: Duration,
    make_op: impl Fn() -> Op,
) -> Result<Load, BoxError>
where
    Op: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<bool, BoxError>> + Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let mut op = make_op();
        set.spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            loop {
                let t0 = Instant::now();
                if !op().await? {
                    return Err::<Vec<Duration>, BoxError>("a call was denied".into());
                }
                let t1 = Instant::now();
                latencies.push(t1 - t0);
                if t1 >= deadline {
                    return Ok(latencies);
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = set.join_next().await {
        all.extend(joined??);
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    Ok(Load {
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 50.0),
        p99: percentile(&all, 99.0),
        calls: all.len() as u64,
    })
}

/// The time a thread has run on a CPU so far: the first field of its `schedstat` file under
/// `/proc` (nanoseconds; Linux only).
pub(crate) fn run_time(schedstat: &std::path::Path) -> Option<Duration> {
    let stat = std::fs::read_to_string(schedstat).ok()?;
    Some(Duration::from_nanos(
        stat.split_whitespace().next()?.parse().ok()?,
    ))
}

/// The median of repeated runs, field by field.
pub(crate) fn median_load(loads: &[Load]) -> Load {
    let field = |f: fn(&Load) -> f64| median(&mut loads.iter().map(f).collect::<Vec<f64>>());
    Load {
        per_sec: field(|l| l.per_sec),
        p50: Duration::from_secs_f64(field(|l| l.p50.as_secs_f64())),
        p99: Duration::from_secs_f64(field(|l| l.p99.as_secs_f64())),
        calls: field(|l| l.calls as f64) as u64,
    }
}

//! Delivers webhooks through one rate-limit bucket per destination (seed 002), with tollgate's
//! plain `Limiter`.
//!
//! Run with (two destinations that accept POSTs; the example server's `/api/reports` will do):
//!
//! ```text
//! cargo run -p example-webhook-worker -- --destinations http://127.0.0.1:3000/api/reports,http://127.0.0.1:3001/hook --events 20 --rate 5/s
//! ```
//!
//! `webhook-worker --destinations URL[,URL...] --events N [--rate N/s|N/m] [--burst B]
//! [--concurrency C] [--redis URL]`
//!
//! Each destination gets `N` events (a small JSON body, POST) through its own bucket, keyed by its
//! host, port and path, so a slow or paused destination never holds up the others: each has its
//! own `C` delivery tasks. A delivery its bucket refuses (no token within a second), or that the
//! destination answers 429 (its `Retry-After` pauses that destination's bucket, fleet-wide with
//! `--redis`), is **rescheduled without counting an attempt**: rate-limited is not failed. A
//! transport error or a 5xx counts an attempt (3 at most, then the event has failed); any other
//! 4xx fails the event at once. With `--redis`, every worker sharing the Redis shares the
//! destinations' buckets. The last line on stdout is one JSON object:
//! `{"delivered":N,"rescheduled":N,"failed":N,"attempts":N,"upstream_429":N,"elapsed_ms":N,
//! "per_destination":{"URL":{"delivered":N,"elapsed_ms":N}}}`.

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use tollgate::core::Quota;
use tollgate::limiter::Limiter;
use tollgate::redis::RedisStore;

#[path = "../../shared/rate.rs"]
mod rate;

/// The one limit of the worker: every destination has its own bucket under it.
const LIMIT: &str = "destination";
/// The most attempts (transport errors, 5xx) an event gets before it has failed.
const MAX_ATTEMPTS: u32 = 3;
/// How long a delivery waits for its bucket before it is rescheduled.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Delivers N events to each destination, one rate-limit bucket per destination.
#[derive(Debug, Parser)]
#[command(name = "webhook-worker", version, about)]
struct Args {
    /// The destinations, comma-separated URLs.
    #[arg(long, value_delimiter = ',', required = true)]
    destinations: Vec<String>,
    /// How many events each destination gets.
    #[arg(long)]
    events: u64,
    /// Each destination's rate: N/s, N/m or N/h.
    #[arg(long, default_value = "10/s", value_parser = rate::parse_rate)]
    rate: Quota,
    /// Each destination's burst (default: the rate's count).
    #[arg(long)]
    burst: Option<u32>,
    /// Deliveries in flight per destination.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// Share the buckets with every worker on this Redis (redis://host:port).
    #[arg(long)]
    redis: Option<String>,
}

/// One destination: where it is, its bucket's identity, and what happened to its events.
struct Destination {
    url: String,
    /// The bucket's identity: host, port and path.
    identity: String,
    queue: Mutex<VecDeque<Event>>,
    /// Events delivered or failed (the destination is done when this reaches N).
    done: AtomicU64,
    delivered: AtomicU64,
    /// Microseconds from the start to the last delivery.
    last_delivery_us: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Event {
    id: u64,
    attempts: u32,
}

/// The counts of the JSON line.
#[derive(Default)]
struct Totals {
    delivered: AtomicU64,
    rescheduled: AtomicU64,
    failed: AtomicU64,
    attempts: AtomicU64,
    upstream_429: AtomicU64,
}

/// What one delivery came to.
enum Outcome {
    Delivered,
    /// Rescheduled without counting an attempt (the bucket refused, or a 429); the destination's
    /// tasks try again after this long.
    Rescheduled(Duration),
    /// Counted as an attempt and to be tried again (transport error, 5xx).
    Retry,
    /// Failed for good (another 4xx).
    Failed,
}

/// The bucket identity of a destination: its host, port and path.
fn identity(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("destination `{url}`: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("destination `{url}` has no host"))?;
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| format!("destination `{url}` has no port"))?;
    Ok(format!("{host}:{port}{}", parsed.path()))
}

async fn deliver(
    limiter: &Limiter,
    client: &reqwest::Client,
    dest: &Destination,
    event: Event,
    totals: &Totals,
) -> Outcome {
    match limiter.acquire(LIMIT, &dest.identity, MAX_WAIT).await {
        Ok(_) => {}
        // No token within a second (the destination is paused, or far behind): try again when
        // one could pass, at most a second from now.
        Err(e) if e.is_rate_limited() => {
            let retry = e
                .rate_limited()
                .and_then(|r| r.retry_after)
                .unwrap_or(MAX_WAIT);
            return Outcome::Rescheduled(retry.min(MAX_WAIT));
        }
        // The store is unavailable and the policy refuses: try again later, no attempt counted.
        Err(e) => {
            tracing::warn!("{}: {e}", dest.url);
            return Outcome::Rescheduled(Duration::from_millis(100));
        }
    }
    let body = serde_json::json!({ "event": event.id, "type": "example.delivered" }).to_string();
    let sent = client
        .post(&dest.url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => Outcome::Delivered,
        Ok(response) if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
            totals.upstream_429.fetch_add(1, Ordering::Relaxed);
            // The destination's pause (Retry-After, or its rate-limit headers; a second without
            // a hint), for every worker sharing the bucket.
            let pause = tollgate::outbound::signal(
                response.status(),
                response.headers(),
                SystemTime::now(),
            )
            .map_or(Duration::from_secs(1), |s| s.pause);
            if let Err(e) = limiter.pause(LIMIT, &dest.identity, pause).await {
                tracing::warn!("{}: cannot pause the bucket: {e}", dest.url);
            }
            // The next delivery waits for its bucket, which now holds nobody until the end of
            // the pause.
            Outcome::Rescheduled(Duration::ZERO)
        }
        Ok(response) if response.status().is_server_error() => Outcome::Retry,
        Ok(response) => {
            tracing::warn!(
                "{}: event {} refused with {}",
                dest.url,
                event.id,
                response.status()
            );
            Outcome::Failed
        }
        Err(e) => {
            tracing::warn!("{}: event {}: {e}", dest.url, event.id);
            Outcome::Retry
        }
    }
}

/// One delivery task of a destination: takes events from its queue until all are done.
async fn work(
    limiter: Limiter,
    client: reqwest::Client,
    dest: Arc<Destination>,
    totals: Arc<Totals>,
    events: u64,
    started: Instant,
) {
    while dest.done.load(Ordering::Acquire) < events {
        let next = dest
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        let Some(mut event) = next else {
            // The rest are in flight in the other tasks.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let requeue = |event: Event| {
            dest.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back(event);
        };
        let finish = || {
            dest.done.fetch_add(1, Ordering::AcqRel);
        };
        match deliver(&limiter, &client, &dest, event, &totals).await {
            Outcome::Delivered => {
                totals.attempts.fetch_add(1, Ordering::Relaxed);
                totals.delivered.fetch_add(1, Ordering::Relaxed);
                dest.delivered.fetch_add(1, Ordering::Relaxed);
                let at = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                dest.last_delivery_us.fetch_max(at, Ordering::Relaxed);
                finish();
            }
            Outcome::Rescheduled(after) => {
                totals.rescheduled.fetch_add(1, Ordering::Relaxed);
                requeue(event);
                tokio::time::sleep(after).await;
            }
            Outcome::Retry => {
                totals.attempts.fetch_add(1, Ordering::Relaxed);
                event.attempts += 1;
                if event.attempts >= MAX_ATTEMPTS {
                    totals.failed.fetch_add(1, Ordering::Relaxed);
                    finish();
                } else {
                    requeue(event);
                }
            }
            Outcome::Failed => {
                totals.attempts.fetch_add(1, Ordering::Relaxed);
                totals.failed.fetch_add(1, Ordering::Relaxed);
                finish();
            }
        }
    }
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    let quota = match args.burst {
        Some(b) => args.rate.with_burst(b),
        None => Ok(args.rate),
    }
    .map_err(|e| format!("--burst: {e}"))?;
    let mut builder = Limiter::builder()
        .limit(LIMIT, quota)
        .timeout(Duration::from_millis(500));
    if let Some(url) = &args.redis {
        let store = RedisStore::builder(url.clone())
            .timeout(Duration::from_millis(500))
            .build()
            .map_err(|e| format!("--redis: {e}"))?;
        builder = builder.store(store);
    }
    let limiter = builder.build().map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;

    let mut destinations = Vec::with_capacity(args.destinations.len());
    for url in &args.destinations {
        destinations.push(Arc::new(Destination {
            identity: identity(url)?,
            url: url.clone(),
            queue: Mutex::new(
                (0..args.events)
                    .map(|id| Event { id, attempts: 0 })
                    .collect(),
            ),
            done: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            last_delivery_us: AtomicU64::new(0),
        }));
    }
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for dest in &destinations {
        for _ in 0..args.concurrency {
            tasks.spawn(work(
                limiter.clone(),
                client.clone(),
                Arc::clone(dest),
                Arc::clone(&totals),
                args.events,
                started,
            ));
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| format!("a delivery task failed: {e}"))?;
    }
    let elapsed = started.elapsed();
    let per_destination: BTreeMap<String, serde_json::Value> = destinations
        .iter()
        .map(|d| {
            (
                d.url.clone(),
                serde_json::json!({
                    "delivered": d.delivered.load(Ordering::Relaxed),
                    "elapsed_ms": d.last_delivery_us.load(Ordering::Relaxed) / 1000,
                }),
            )
        })
        .collect();
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "delivered": count(&totals.delivered),
        "rescheduled": count(&totals.rescheduled),
        "failed": count(&totals.failed),
        "attempts": count(&totals.attempts),
        "upstream_429": count(&totals.upstream_429),
        "elapsed_ms": elapsed.as_millis(),
        "per_destination": per_destination,
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        // --help and --version print to stdout and succeed; mistakes say what is wrong.
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(args).await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("webhook-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        assert_eq!(
            identity("http://a.example/hooks/1?x=2").as_deref(),
            Ok("a.example:80/hooks/1")
        );
        assert_eq!(
            identity("https://a.example:8443/").as_deref(),
            Ok("a.example:8443/")
        );
        assert!(identity("not a url").is_err());
    }

    #[test]
    fn the_command_line() {
        let args = Args::try_parse_from([
            "webhook-worker",
            "--destinations",
            "http://a/x,http://b/y",
            "--events",
            "3",
            "--rate",
            "2/s",
        ])
        .expect("valid flags");
        assert_eq!(args.destinations, ["http://a/x", "http://b/y"]);
        assert_eq!((args.events, args.concurrency, args.burst), (3, 4, None));
        assert_eq!(args.rate, Quota::per_second(2).expect("a quota"));
        assert!(Args::try_parse_from(["webhook-worker", "--events", "3"]).is_err());
        assert!(
            Args::try_parse_from([
                "webhook-worker",
                "--destinations",
                "http://a",
                "--events",
                "3",
                "--concurrency",
                "0"
            ])
            .is_err()
        );
    }
}

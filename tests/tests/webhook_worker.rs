//! End-to-end tests of the `webhook-worker` example (issue 13, seed 002): the real binary,
//! delivering to local destinations that enforce their own limits, alone and as two workers
//! sharing a real `redis-server`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tollgate_e2e::webhook_worker_bin;
use tollgate_testkit::RedisServer;

/// What a destination saw.
#[derive(Default)]
struct Seen {
    accepted: Vec<Instant>,
    refused: usize,
}

/// How a destination answers.
#[derive(Clone, Copy)]
enum Kind {
    /// Its own token bucket: `rate` a second, `burst` at once; 429 + `Retry-After: 1` beyond,
    /// with a little tolerance for requests a few ms early (a real upstream's coarse clock).
    Limited { rate: u32, burst: u32 },
    /// 429 + `Retry-After: 2` to the first request, then 200 to everything.
    PausesOnce,
}

struct Destination {
    kind: Kind,
    seen: Mutex<Seen>,
    /// The token bucket's theoretical arrival time, for `Kind::Limited`.
    tat: Mutex<Option<Instant>>,
    started: Instant,
}

async fn receive(State(d): State<Arc<Destination>>, body: String) -> Response {
    assert!(body.contains("\"event\""), "{body}");
    let now = Instant::now();
    let allowed = match d.kind {
        Kind::PausesOnce => {
            let seen = d.seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.refused > 0 || !seen.accepted.is_empty()
        }
        Kind::Limited { rate, burst } => {
            let t = Duration::from_secs(1) / rate;
            let tau = t * burst;
            let jitter = Duration::from_millis(15);
            let mut tat = d.tat.lock().unwrap_or_else(PoisonError::into_inner);
            let current = tat.unwrap_or(d.started).max(now);
            if current + t <= now + tau + jitter {
                *tat = Some(current + t);
                true
            } else {
                false
            }
        }
    };
    let mut seen = d.seen.lock().unwrap_or_else(PoisonError::into_inner);
    if allowed {
        seen.accepted.push(now);
        (StatusCode::OK, "ok").into_response()
    } else {
        seen.refused += 1;
        let retry = match d.kind {
            Kind::PausesOnce => "2",
            Kind::Limited { .. } => "1",
        };
        (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry)],
            "slow down",
        )
            .into_response()
    }
}

/// Starts a destination on 127.0.0.1:0; its URL and what it saw.
async fn destination(kind: Kind, path: &str) -> (String, Arc<Destination>) {
    let state = Arc::new(Destination {
        kind,
        seen: Mutex::new(Seen::default()),
        tat: Mutex::new(None),
        started: Instant::now(),
    });
    let app = Router::new()
        .route(path, axum::routing::post(receive))
        .with_state(Arc::clone(&state));
    let addr = tollgate_e2e::serve_on_loopback(app).await;
    (format!("http://{addr}{path}"), state)
}

/// Runs the worker to completion (bounded) and returns its summary, the last line of stdout.
async fn run_worker(args: &[&str]) -> serde_json::Value {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(webhook_worker_bin())
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the worker finished within 60 s")
    .expect("the worker ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "webhook-worker {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("a summary line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"))
}

fn count(summary: &serde_json::Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no `{field}` in {summary}"))
}

/// Two destinations, one at 10/s and one that answers 429 + `Retry-After: 2` once: every event
/// delivered; the healthy one finishes in its own time, not held up by the other's pause; no 429
/// from the destination whose limit the bucket matches; the refused delivery is rescheduled
/// without counting an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_delivered_and_a_pause_holds_up_only_its_destination() {
    let (healthy, healthy_seen) =
        destination(Kind::Limited { rate: 10, burst: 5 }, "/hooks/a").await;
    let (pausing, pausing_seen) = destination(Kind::PausesOnce, "/hooks/b").await;
    let destinations = format!("{healthy},{pausing}");
    let summary = run_worker(&[
        "--destinations",
        &destinations,
        "--events",
        "20",
        "--rate",
        "10/s",
        "--burst",
        "5",
        "--concurrency",
        "4",
    ])
    .await;
    println!("{summary}");
    assert_eq!(count(&summary, "delivered"), 40);
    assert_eq!(count(&summary, "failed"), 0);
    assert_eq!(count(&summary, "upstream_429"), 1);
    // Attempts are deliveries answered 2xx (or failed); the 429 is not one.
    assert_eq!(count(&summary, "attempts"), 40);
    assert!(count(&summary, "rescheduled") >= 1);
    let healthy_seen = healthy_seen
        .seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    assert_eq!(healthy_seen.refused, 0, "the 10/s destination answered 429");
    assert_eq!(healthy_seen.accepted.len(), 20);
    let pausing_seen = pausing_seen
        .seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    assert_eq!((pausing_seen.refused, pausing_seen.accepted.len()), (1, 20));
    let per = &summary["per_destination"];
    let healthy_ms = per[healthy.as_str()]["elapsed_ms"]
        .as_u64()
        .expect("elapsed");
    let pausing_ms = per[pausing.as_str()]["elapsed_ms"]
        .as_u64()
        .expect("elapsed");
    // 20 events at 10/s with a burst of 5: about 1.5 s, whatever the other destination does.
    assert!(
        (1_200..2_000).contains(&healthy_ms),
        "the healthy destination took {healthy_ms} ms"
    );
    // The pausing one waited out its 2 s before the rest.
    assert!(
        pausing_ms >= 2_000,
        "the 429's Retry-After was not honoured: {pausing_ms} ms"
    );
    // Nothing reached it during the pause.
    let refused_at = pausing_seen
        .accepted
        .first()
        .copied()
        .expect("deliveries after the pause");
    assert!(pausing_seen.accepted.iter().all(|t| *t >= refused_at));
}

/// Two workers sharing a Redis share the destination's bucket: together they stay under its
/// limit (no 429) and deliver everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_redis_stay_under_the_destination_limit() {
    let redis = tokio::task::block_in_place(RedisServer::start).expect("redis-server starts");
    let (url, seen) = destination(Kind::Limited { rate: 10, burst: 5 }, "/hooks/shared").await;
    let redis_url = redis.url();
    let args = [
        "--destinations",
        url.as_str(),
        "--events",
        "15",
        "--rate",
        "10/s",
        "--burst",
        "5",
        "--redis",
        redis_url.as_str(),
    ];
    let started = Instant::now();
    let (one, two) = tokio::join!(run_worker(&args), run_worker(&args));
    let took = started.elapsed();
    println!("{one}\n{two}");
    assert_eq!(count(&one, "delivered") + count(&two, "delivered"), 30);
    assert_eq!(count(&one, "upstream_429") + count(&two, "upstream_429"), 0);
    let seen = seen.seen.lock().unwrap_or_else(PoisonError::into_inner);
    assert_eq!((seen.accepted.len(), seen.refused), (30, 0));
    // One shared bucket: 30 events at 10/s with a burst of 5 take about 2.5 s (two buckets
    // would have taken 1 s).
    assert!(took >= Duration::from_millis(2_200), "took {took:?}");
}

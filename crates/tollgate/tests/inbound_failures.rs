//! The inbound layer when its Redis store dies under load (a real `redis-server` from the
//! testkit, killed and restarted on the same port): `local` keeps limiting in memory behind the
//! circuit breaker and goes back to Redis once it returns; `fail_closed` answers 503 with
//! `Retry-After`; `fail_open` lets requests through, counted as `store_error`. Never a 500,
//! never a hang past the store timeout.
//!
//! A small recorder installed in this binary keeps the history of `rate_limiter_circuit_open`
//! and the counters; the tests take turns (one lock) so the `store="redis"` series are their own.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::routing::get;
use metrics::{
    Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tollgate::core::Quota;
use tollgate::inbound::{OnStoreError, Policy, RateLimitDecision, RateLimitLayer};
use tollgate::limiter::BreakerConfig;
use tollgate::metrics as m;
use tollgate::redis::RedisStore;
use tollgate_testkit::RedisServer;

/// The store timeout of these tests.
const TIMEOUT: Duration = Duration::from_millis(100);
/// What a response may take beyond the store timeout (loopback, debug build, a loaded machine).
const MARGIN: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------------------------
// A recorder: counters by name and labels, and the transitions of the circuit gauge.

#[derive(Default)]
struct Recorded {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    circuit: Arc<CircuitLog>,
}

/// The values `rate_limiter_circuit_open{store="redis"}` took, each change once.
#[derive(Default)]
struct CircuitLog(Mutex<Vec<f64>>);

impl CircuitLog {
    fn history(&self) -> Vec<f64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl GaugeFn for CircuitLog {
    fn increment(&self, _: f64) {
        panic!("the circuit gauge is only set");
    }

    fn decrement(&self, _: f64) {
        panic!("the circuit gauge is only set");
    }

    fn set(&self, value: f64) {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if log.last() != Some(&value) {
            log.push(value);
        }
    }
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    format!("{name}{labels:?}")
}

impl Recorded {
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&series(name, labels))
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

struct Handle(&'static Recorded);

impl Recorder for Handle {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        let counter = Arc::clone(
            self.0
                .counters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(series(key.name(), &labels))
                .or_default(),
        );
        Counter::from_arc(counter)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let redis = key
            .labels()
            .any(|l| l.key() == "store" && l.value() == "redis");
        if key.name() == m::CIRCUIT_OPEN && redis {
            Gauge::from_arc(Arc::clone(&self.0.circuit))
        } else {
            Gauge::noop()
        }
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<&'static Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let recorded: &'static Recorded = Box::leak(Box::default());
        metrics::set_global_recorder(Handle(recorded)).expect("the only recorder of this binary");
        recorded
    })
}

/// The tests take turns: they share the recorder's `store="redis"` series.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// The server under test.

/// The routes of the example, plus `/api/decision`: `store_error` or `decided`.
fn app() -> axum::Router {
    common::routes().route(
        "/api/decision",
        get(|Extension(d): Extension<RateLimitDecision>| async move {
            if d.store_error {
                "store_error"
            } else {
                "decided"
            }
        }),
    )
}

/// Starts a redis-server (blocking: the testkit waits for it to answer).
fn start_redis() -> RedisServer {
    tokio::task::block_in_place(|| RedisServer::start().expect("redis-server starts"))
}

fn redis_store(redis: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::builder(redis.url())
        .prefix(prefix)
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .build()
        .expect("a redis store")
}

/// The keys Redis holds under `prefix`.
fn redis_keys(redis: &RedisServer, prefix: &str) -> Vec<String> {
    let reply = redis
        .cmd(&["KEYS", &format!("{prefix}:*")])
        .expect("redis answers KEYS");
    reply
        .as_array()
        .expect("KEYS gives an array")
        .iter()
        .map(|k| k.as_str().expect("a key").to_owned())
        .collect()
}

/// One response as the client saw it.
#[derive(Debug)]
struct Seen {
    /// Since the start of the test.
    at: Duration,
    latency: Duration,
    status: u16,
    retry_after: Option<String>,
    content_type: Option<String>,
    body: String,
}

async fn send(client: &reqwest::Client, url: &str, user: &str, tier: &str, t0: Instant) -> Seen {
    let started = Instant::now();
    let response = client
        .get(url)
        .header("x-user", user)
        .header("x-tier", tier)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer for {user}: {e}"));
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII").to_owned())
    };
    let status = response.status().as_u16();
    let retry_after = header("retry-after");
    let content_type = header("content-type");
    let body = response.text().await.expect("a body");
    Seen {
        at: started - t0,
        latency: started.elapsed(),
        status,
        retry_after,
        content_type,
        body,
    }
}

/// Waits (bounded) until `done` holds, polling every 20 ms; false if it never did.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Sends as caller `warm` until `ready` accepts an answer (bounded): the first store calls open
/// the connection to Redis, which on a loaded machine may take longer than the store timeout.
async fn warm_up(client: &reqwest::Client, url: &str, tier: &str, ready: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = send(client, url, "warm", tier, Instant::now()).await;
        if ready(&seen) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the store never answered: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_bounded(seen: &[Seen]) {
    let slowest = seen.iter().max_by_key(|s| s.latency).expect("responses");
    assert!(
        slowest.latency < TIMEOUT + MARGIN,
        "a response took {:?}: {slowest:?}",
        slowest.latency
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_limits_in_memory_while_redis_is_down_and_returns_to_it() {
    const PREFIX: &str = "tg-local";
    const TASKS: usize = 6;
    const PER_TASK: usize = 2_000;
    let _serial = SERIAL.lock().await;
    let recorded = recorded();
    recorded.circuit.clear();

    let mut redis = start_redis();
    let policy = Policy::builder()
        // The load: never limited, and slow to refill, so its state stays in Redis for a while.
        .tier(
            "l-load",
            Quota::per_hour(100_000)
                .unwrap()
                .with_burst(100_000)
                .unwrap(),
        )
        .tier(
            "l-tight",
            Quota::per_hour(5).unwrap().with_burst(5).unwrap(),
        )
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy, common::by_header)
        .decision_extension(true)
        .store(redis_store(&redis, PREFIX))
        .on_store_error(OnStoreError::Local)
        .timeout(TIMEOUT)
        .breaker(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_millis(500),
        })
        .build()
        .expect("a valid layer");
    let server = common::serve(app().layer(layer)).await;
    let url = server.url("/api/hello");
    let client = common::client();
    let t0 = Instant::now();

    // The load: a few clients, bounded in count and time, each one its own key.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..TASKS)
        .map(|i| {
            let (client, url, stop) = (client.clone(), url.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) && seen.len() < PER_TASK {
                    assert!(Instant::now() < deadline, "the test did not stop the load");
                    seen.push(send(&client, &url, &format!("load-{i}"), "l-load", t0).await);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                seen
            })
        })
        .collect();

    // Redis up: decisions are made there. (On a loaded machine the first calls, which open the
    // connection, may time out and open the breaker for a moment: wait for it to be closed.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warm = wait_until(Duration::from_secs(5), || {
        recorded.circuit.history().last() != Some(&1.0) && !redis_keys(&redis, PREFIX).is_empty()
    })
    .await;
    assert!(
        warm,
        "the load's buckets are in Redis, the circuit closed: {:?}",
        recorded.circuit.history()
    );
    recorded.circuit.clear();

    // Redis killed.
    let errors = || recorded.counter(m::STORE_ERRORS_TOTAL, &[("store", "redis")]);
    let errors_at_stop = errors();
    tokio::task::block_in_place(|| redis.stop());
    let down_at = t0.elapsed();
    let opened = wait_until(Duration::from_secs(3), || {
        recorded.circuit.history().contains(&1.0)
    })
    .await;
    assert!(
        opened,
        "the breaker opened: {:?}",
        recorded.circuit.history()
    );

    // While down, the tier is still enforced, by the local store: burst 5, then 429.
    let mut tight = Vec::new();
    for _ in 0..8 {
        tight.push(send(&client, &url, "tight-down", "l-tight", t0).await);
    }
    let statuses: Vec<u16> = tight.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "{tight:?}"
    );
    assert_bounded(&tight);
    // Long enough for a probe or two to fail.
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Redis back, on the same port, empty.
    tokio::task::block_in_place(|| redis.restart()).expect("redis-server restarts");
    let up_at = t0.elapsed();
    let outage_errors = errors() - errors_at_stop;
    let closed = wait_until(Duration::from_secs(5), || {
        recorded.circuit.history().last() == Some(&0.0)
    })
    .await;
    assert!(
        closed,
        "the breaker closed: {:?}",
        recorded.circuit.history()
    );
    let back = wait_until(Duration::from_secs(3), || {
        !redis_keys(&redis, PREFIX).is_empty()
    })
    .await;
    assert!(back, "the load's buckets are in Redis again");

    // Decisions come from Redis again: a new tight caller gets burst 5 from Redis, where its
    // bucket is written. (A store call timing out on a loaded machine would be decided locally:
    // such an attempt is run again with a new caller, at most 3 times.)
    let mut tight_up = Vec::new();
    for attempt in 0..3 {
        let user = format!("tight-up-{attempt}");
        let errors_before = errors();
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(send(&client, &url, &user, "l-tight", t0).await);
        }
        let clean = errors() == errors_before && recorded.circuit.history().last() == Some(&0.0);
        let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
        tight_up.extend(seen);
        if !clean && attempt < 2 {
            continue;
        }
        assert_eq!(
            statuses,
            [200, 200, 200, 200, 200, 429, 429, 429],
            "{tight_up:?}"
        );
        let key = format!("{PREFIX}:{{user:{user}}}:t:l-tight");
        assert_eq!(
            redis.cmd(&["EXISTS", &key]).unwrap().as_int(),
            Some(1),
            "{key} in {:?}",
            redis_keys(&redis, PREFIX)
        );
        break;
    }
    assert_bounded(&tight_up);
    // ... and the caller denied by the local store during the outage is decided by Redis (which
    // restarted empty), not by a remembered local denial.
    let mut again = Vec::new();
    for _ in 0..3 {
        let errors_before = errors();
        again.push(send(&client, &url, "tight-down", "l-tight", t0).await);
        if errors() == errors_before && recorded.circuit.history().last() == Some(&0.0) {
            break;
        }
    }
    assert_eq!(again.last().map(|s| s.status), Some(200), "{again:?}");
    assert!(
        redis_keys(&redis, PREFIX).contains(&format!("{PREFIX}:{{user:tight-down}}:t:l-tight"))
    );
    tight_up.extend(again);

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for task in load {
        seen.extend(task.await.expect("a load task"));
    }
    seen.extend(tight);
    seen.extend(tight_up);

    eprintln!(
        "{} responses, slowest {:?}; Redis down {down_at:?}..{up_at:?}, {outage_errors} store \
         errors; circuit {:?}",
        seen.len(),
        seen.iter().map(|s| s.latency).max(),
        recorded.circuit.history()
    );
    // No 5xx at all, every answer in time, and the service kept answering during the outage.
    let server_errors: Vec<&Seen> = seen.iter().filter(|s| s.status >= 500).collect();
    assert!(server_errors.is_empty(), "{server_errors:?}");
    assert_bounded(&seen);
    let during = seen
        .iter()
        .filter(|s| s.at > down_at && s.at < up_at && s.status == 200)
        .count();
    assert!(
        during > 10,
        "only {during} requests answered while Redis was down"
    );
    // The outage was seen (and counted) as store errors; the breaker spared most calls.
    let down_requests = seen
        .iter()
        .filter(|s| s.at > down_at && s.at < up_at)
        .count() as u64;
    assert!(outage_errors >= 3, "{outage_errors} store errors");
    assert!(
        outage_errors < down_requests,
        "{outage_errors} store errors for {down_requests} requests during the outage"
    );
    // Local decisions are decisions: no request was counted as store_error.
    assert_eq!(
        recorded.counter(
            m::REQUESTS_TOTAL,
            &[("tier", "l-load"), ("outcome", "store_error")]
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_closed_answers_503_with_retry_after() {
    let _serial = SERIAL.lock().await;
    let recorded = recorded();
    let mut redis = start_redis();
    let policy = Policy::builder()
        .tier(
            "c-tier",
            Quota::per_hour(1000).unwrap().with_burst(1000).unwrap(),
        )
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy, common::by_header)
        .decision_extension(true)
        .store(redis_store(&redis, "tg-closed"))
        .on_store_error(OnStoreError::FailClosed)
        .timeout(TIMEOUT)
        .breaker(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_millis(500),
        })
        .build()
        .expect("a valid layer");
    let server = common::serve(app().layer(layer)).await;
    let url = server.url("/api/hello");
    let client = common::client();
    let t0 = Instant::now();

    warm_up(&client, &url, "c-tier", |s| s.status == 200).await;
    let store_errors_before = recorded.counter(
        m::REQUESTS_TOTAL,
        &[("tier", "c-tier"), ("outcome", "store_error")],
    );
    tokio::task::block_in_place(|| redis.stop());

    // Concurrent callers too: every one gets its 503 in time.
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..15 {
                    seen.push(send(&client, &url, &format!("u{i}"), "c-tier", t0).await);
                }
                seen
            })
        })
        .collect();
    let mut seen = Vec::new();
    for task in tasks {
        seen.extend(task.await.expect("a client task"));
    }
    assert_eq!(seen.len(), 60);
    for s in &seen {
        assert_eq!(s.status, 503, "{s:?}");
        let retry: u64 = s
            .retry_after
            .as_deref()
            .expect("Retry-After on a 503")
            .parse()
            .expect("Retry-After is whole seconds");
        assert!(retry >= 1, "{s:?}");
        assert_eq!(
            s.content_type.as_deref(),
            Some("application/problem+json"),
            "{s:?}"
        );
        let body: serde_json::Value = serde_json::from_str(&s.body).expect("a JSON problem");
        assert_eq!(body["status"], 503, "{body}");
        for member in ["type", "title", "detail"] {
            assert!(body[member].is_string(), "{member} in {body}");
        }
    }
    assert_bounded(&seen);
    assert_eq!(
        recorded.counter(
            m::REQUESTS_TOTAL,
            &[("tier", "c-tier"), ("outcome", "store_error")]
        ) - store_errors_before,
        60
    );

    // Back to 200 once Redis is (bounded wait: a probe every 500 ms).
    tokio::task::block_in_place(|| redis.restart()).expect("redis-server restarts");
    let deadline = Instant::now() + Duration::from_secs(5);
    let recovered = loop {
        let s = send(&client, &url, "u", "c-tier", t0).await;
        assert!(s.status == 200 || s.status == 503, "{s:?}");
        if s.status == 200 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(recovered, "fail_closed recovers once Redis is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_lets_requests_through_counted_as_store_errors() {
    let _serial = SERIAL.lock().await;
    let recorded = recorded();
    let mut redis = start_redis();
    let policy = Policy::builder()
        .tier("o-tier", Quota::per_hour(2).unwrap().with_burst(2).unwrap())
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy, common::by_header)
        .decision_extension(true)
        .store(redis_store(&redis, "tg-open"))
        .on_store_error(OnStoreError::FailOpen)
        .timeout(TIMEOUT)
        .breaker(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_millis(500),
        })
        .build()
        .expect("a valid layer");
    let server = common::serve(app().layer(layer)).await;
    let url = server.url("/api/decision");
    let client = common::client();
    let t0 = Instant::now();

    warm_up(&client, &url, "o-tier", |s| s.body == "decided").await;
    let count = |outcome| {
        recorded.counter(
            m::REQUESTS_TOTAL,
            &[("tier", "o-tier"), ("outcome", outcome)],
        )
    };
    let tokens = || recorded.counter(m::TOKENS_CONSUMED_TOTAL, &[("tier", "o-tier")]);
    let before = (
        count("allowed"),
        count("limited"),
        count("store_error"),
        tokens(),
    );

    // Redis up: the tier holds (burst 2). (A store call timing out on a loaded machine would be
    // let through: such an attempt is run again with a new caller, at most 3 times.)
    let store_errors = || recorded.counter(m::STORE_ERRORS_TOTAL, &[("store", "redis")]);
    let mut up = Vec::new();
    for attempt in 0..3 {
        let errors_before = store_errors();
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(send(&client, &url, &format!("up-{attempt}"), "o-tier", t0).await);
        }
        let clean = store_errors() == errors_before && seen.iter().all(|s| s.body != "store_error");
        let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
        up.extend(seen);
        if clean {
            assert_eq!(statuses, [200, 200, 429], "{up:?}");
            break;
        }
        assert!(attempt < 2, "the store kept failing while up: {up:?}");
    }

    tokio::task::block_in_place(|| redis.stop());
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(send(&client, &url, "down", "o-tier", t0).await);
    }
    for s in &seen {
        assert_eq!(s.status, 200, "{s:?}");
        assert_eq!(s.body, "store_error", "{s:?}");
    }
    assert_bounded(&seen);
    // The counters say what the clients saw.
    let all: Vec<&Seen> = up.iter().chain(&seen).collect();
    let decided = all.iter().filter(|s| s.body == "decided").count() as u64;
    let limited = all.iter().filter(|s| s.status == 429).count() as u64;
    let store_error = all.iter().filter(|s| s.body == "store_error").count() as u64;
    assert_eq!(decided + limited + store_error, all.len() as u64, "{all:?}");
    assert!(store_error >= 20);
    assert_eq!(
        (
            count("allowed") - before.0,
            count("limited") - before.1,
            count("store_error") - before.2,
            count("shadow_limited"),
        ),
        (decided, limited, store_error, 0)
    );
    // Let through, not spent: tokens are counted for the decided requests only.
    assert_eq!(tokens() - before.3, decided);
}

/// Sends as `user` until `want` answers come back with status `status` or `limit` requests were
/// sent; how many had that status.
async fn count_status(
    client: &reqwest::Client,
    url: &str,
    user: &str,
    tier: &str,
    status: u16,
    limit: usize,
) -> usize {
    let mut n = 0;
    for _ in 0..limit {
        if send(client, url, user, tier, Instant::now()).await.status == status {
            n += 1;
        }
    }
    n
}

/// Issue 12, defects 2 and 13, over a real socket and a real `redis-server` frozen with `SIGSTOP`:
///
/// * `fail_closed` answers 503 while Redis hangs, and the scripts still queued in Redis when it
///   wakes write nothing (they are past their deadline): the caller is not charged for requests it
///   was refused, and afterwards gets exactly what it had left (it used to get 429 for hours).
/// * `local` admits a fresh burst in memory during the outage (it cannot know what Redis holds);
///   once Redis is back the caller has what Redis held: across the outage, at most twice the
///   burst, the bound the docs state, and the late scripts charge nothing on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_answered_during_a_hang_are_not_charged_when_redis_wakes() {
    let _serial = SERIAL.lock().await;
    let recorded = recorded();
    for mode in [OnStoreError::FailClosed, OnStoreError::Local] {
        recorded.circuit.clear();
        let prefix = format!("tg-hang-{mode:?}");
        let mut redis = start_redis();
        let policy = Policy::builder()
            .tier("h-warm", Quota::per_hour(100_000).unwrap())
            .tier(
                "h-tight",
                Quota::per_hour(5).unwrap().with_burst(5).unwrap(),
            )
            .build()
            .unwrap();
        let layer = RateLimitLayer::builder(policy, common::by_header)
            .decision_extension(true)
            .store(redis_store(&redis, &prefix))
            .on_store_error(mode)
            .timeout(TIMEOUT)
            .denied_cache(None)
            .breaker(BreakerConfig {
                failure_threshold: 3,
                open_for: Duration::from_millis(300),
            })
            .build()
            .expect("a valid layer");
        let server = common::serve(app().layer(layer)).await;
        let client = common::client();
        let url = server.url("/api/hello");
        warm_up(&client, &url, "h-warm", |s| s.status == 200).await;

        // Two of five spent while Redis answers.
        assert_eq!(
            count_status(&client, &url, "carol", "h-tight", 200, 2).await,
            2
        );

        tokio::task::block_in_place(|| redis.pause()).expect("SIGSTOP");
        let during = count_status(&client, &url, "carol", "h-tight", 200, 8).await;
        match mode {
            // Every answer during the hang is a 503: nothing admitted.
            OnStoreError::FailClosed => assert_eq!(during, 0),
            // A fresh local burst.
            _ => assert_eq!(during, 5, "the local fallback admits one burst"),
        }
        tokio::task::block_in_place(|| redis.resume()).expect("SIGCONT");
        // Redis is back once the breaker probes it and closes (the warm caller's requests drive
        // the probes).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = send(&client, &url, "warm", "h-warm", Instant::now()).await;
            let history = recorded.circuit.history();
            if history.contains(&1.0) && history.last() == Some(&0.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the circuit never closed again: {history:?}, {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Redis holds what it held before the hang: three left, then 429.
        let after = count_status(&client, &url, "carol", "h-tight", 200, 6).await;
        assert_eq!(
            after, 3,
            "{mode:?}: the requests answered during the hang were charged when Redis woke"
        );
        // The bound: 2 before + what the outage admitted + 3 after, at most twice the burst.
        assert!(2 + during + after <= 2 * 5, "{mode:?}");
        let keys = redis_keys(&redis, &prefix);
        assert!(!keys.is_empty(), "{keys:?}");
    }
}

/// The bound on a response past the store timeout, while Redis hangs.
const HANG_MARGIN: Duration = Duration::from_millis(50);

/// How a hanging Redis is made.
#[derive(Debug, Clone, Copy)]
enum Hang {
    /// `SIGSTOP`: the port accepts and queues, nothing answers.
    Frozen,
    /// `iptables` DROP both ways: the open connection goes silent, new ones never connect.
    Blackholed,
}

/// Issue 15, hanging faults, over a real socket: while Redis hangs (frozen, then blackholed) for
/// 3 s under a steady load, the server answers every request within the store timeout + 50 ms
/// (measured around the layer; the client sees it within the timeout + MARGIN), none is a 5xx
/// (the local fallback decides), the breaker opens, probes Redis again every `open_for` (a few
/// store calls, not one per request), and closes by itself once the fault ends: decisions come
/// from Redis again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_redis_costs_at_most_the_timeout_and_the_breaker_probes_it_back() {
    let _serial = SERIAL.lock().await;
    let recorded = recorded();
    let store_errors = || recorded.counter(m::STORE_ERRORS_TOTAL, &[("store", "redis")]);
    const OPEN_FOR: Duration = Duration::from_millis(300);
    const FAULT: Duration = Duration::from_secs(3);
    for hang in [Hang::Frozen, Hang::Blackholed] {
        recorded.circuit.clear();
        let mut redis = start_redis();
        let policy = Policy::builder()
            .tier("hang-tier", Quota::per_second(100_000).unwrap())
            .build()
            .unwrap();
        let layer = RateLimitLayer::builder(policy, common::by_header)
            .decision_extension(true)
            .store(redis_store(&redis, &format!("tg-{hang:?}")))
            .on_store_error(OnStoreError::Local)
            .timeout(TIMEOUT)
            .denied_cache(None)
            .breaker(BreakerConfig {
                failure_threshold: 3,
                open_for: OPEN_FOR,
            })
            .build()
            .expect("a valid layer");
        // What the server takes per request, measured around the layer in the server: the
        // issue's bound. (The client's own view adds its scheduling and the socket; on a loaded
        // 2-core machine that is noise, bounded by MARGIN below.)
        let took: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let timed = {
            let took = Arc::clone(&took);
            axum::middleware::from_fn(move |request, next: axum::middleware::Next| {
                let took = Arc::clone(&took);
                async move {
                    let started = Instant::now();
                    let response = next.run(request).await;
                    took.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(started.elapsed());
                    response
                }
            })
        };
        let server = common::serve(app().layer(layer).layer(timed)).await;
        let url = server.url("/api/decision");
        let client = common::client();
        warm_up(&client, &url, "hang-tier", |s| s.body == "decided").await;

        // A steady load from four callers, until told to stop.
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let (client, url, stop) = (client.clone(), url.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        seen.push(send(&client, &url, &format!("h{i}"), "hang-tier", t0).await);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    seen
                })
            })
            .collect();

        tokio::time::sleep(Duration::from_millis(300)).await;
        let errors_before = store_errors();
        let began = t0.elapsed();
        let hole = tokio::task::block_in_place(|| match hang {
            Hang::Frozen => {
                redis.pause().expect("SIGSTOP");
                None
            }
            Hang::Blackholed => Some(tollgate_testkit::Blackhole::port(redis.port()).expect(
                "iptables DROP rules (root and the iptables package; scripts/test installs it)",
            )),
        });
        tokio::time::sleep(FAULT).await;
        let probes = store_errors() - errors_before;
        let opened = recorded.circuit.history();
        tokio::task::block_in_place(|| match hole {
            None => redis.resume().expect("SIGCONT"),
            Some(hole) => hole.lift().expect("iptables rules removed"),
        });
        let ended = t0.elapsed();
        // Back to Redis by itself: the breaker closes and answers come from Redis again.
        let back = wait_until(Duration::from_secs(3), || {
            recorded.circuit.history().last() == Some(&0.0)
        })
        .await;
        let closed_after = t0.elapsed() - ended;
        let errors_closed = store_errors();
        let tail_from = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let tail_errors = store_errors() - errors_closed;
        stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        for task in tasks {
            seen.extend(task.await.expect("a load task"));
        }

        let during: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.at >= began && s.at < ended)
            .collect();
        let slowest = seen.iter().map(|s| s.latency).max().unwrap_or_default();
        eprintln!(
            "{hang:?}: {} requests ({} during the fault), slowest {slowest:?}, {probes} store \
             calls failed during the fault, circuit {opened:?}, closed {closed_after:?} after",
            seen.len(),
            during.len()
        );
        let server_slowest = took
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .max()
            .unwrap_or_default();
        eprintln!("{hang:?}: slowest in the server {server_slowest:?}");
        assert!(
            server_slowest <= TIMEOUT + HANG_MARGIN,
            "{hang:?}: the server took {server_slowest:?} over a request, over the {TIMEOUT:?} \
             timeout + {HANG_MARGIN:?}"
        );
        for s in &seen {
            assert_eq!(s.status, 200, "{hang:?}: {s:?}");
            assert!(
                s.latency <= TIMEOUT + MARGIN,
                "{hang:?}: an answer took {:?}, over the {TIMEOUT:?} timeout + {MARGIN:?}: {s:?}",
                s.latency
            );
        }
        assert!(
            back,
            "{hang:?}: the breaker never closed after the fault: {opened:?}"
        );
        assert!(
            opened.contains(&1.0),
            "{hang:?}: the breaker never opened: {opened:?}"
        );
        // The breaker keeps Redis aside: the threshold's failures, then one probe per
        // `open_for` (a few more for calls already on their way when it opened).
        let most = 3 + (FAULT.as_millis() / OPEN_FOR.as_millis()) as u64 + 4;
        assert!(
            (4..=most).contains(&probes),
            "{hang:?}: {probes} store calls failed during the fault; expected the threshold and \
             at least one failed probe, at most {most}"
        );
        assert!(
            during.len() as u64 >= 5 * probes,
            "{hang:?}: too little load to tell probes from requests: {} requests",
            during.len()
        );
        // Closed, every request goes to Redis: with no store error, Redis decided them all.
        let tail = seen.iter().filter(|s| s.at >= tail_from).count();
        assert!(
            tail > 10,
            "{hang:?}: too little load after recovery: {tail}"
        );
        assert_eq!(
            tail_errors, 0,
            "{hang:?}: store calls still failing after the breaker closed"
        );
    }
}

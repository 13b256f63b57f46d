//! The outbound layer in process, over real loopback sockets: a `reqwest::Client` wrapped in
//! [`RateLimitLayer`] talking to a hand-made axum upstream that records the arrival time and the
//! answer of every request (and, where a test needs it, enforces its own limit).
//!
//! What is proved here, with measured times:
//! * a client configured at the upstream's own rate (10/s, burst 5) sends 25 requests with no
//!   429, in (25 − 5) / 10 s, and the upstream never sees more than the burst plus the rate allows
//!   in any interval;
//! * dropping a waiting call gives its place back (memory and Redis stores); a wait beyond
//!   `max_wait` fails at once with [`RateLimited`] carrying `retry_after`; `reject()` fails fast; a
//!   cost larger than the bucket is `RateLimited { retry_after: None }`; a refused connection is a
//!   transport error, never `RateLimited`;
//! * the upstream's headers pause the bucket before any 429 (`X-RateLimit-Remaining: 0` with a
//!   delta `X-RateLimit-Reset`, the IETF `RateLimit` header); malformed ones change nothing;
//! * a 429 + `Retry-After` pauses the calls that were already waiting for a place (none of them is
//!   sent during the pause) and the refused call is retried after it, at the bucket's rate;
//! * `max_in_flight(1)` serialises the calls;
//! * the outbound metrics (`rate_limiter_wait_seconds`, `rate_limiter_upstream_limited_total`)
//!   are emitted with the bucket's label.
//!
//! The stores read the system clock, so every time here is real (no paused tokio time); windows
//! are short (at most ~2.5 s per test) and the tests run one at a time ([`SERIAL`]) so they do not
//! disturb each other's timing. Tolerances are asymmetric: a rate limiter may be late under load,
//! never early.

mod common;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_util::debugging::DebugValue;
use tollgate::core::{DynStore, MemoryStore, Quota};
use tollgate::outbound::{Bucket, Error, FixedBuckets, RateLimit, RateLimitLayer, RateLimited};
use tollgate::redis::RedisStore;
use tollgate_testkit::RedisServer;
use tower::{Layer, ServiceExt};

/// The tests run one at a time: each measures real time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// The test upstream
// ---------------------------------------------------------------------------------------------

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    status: StatusCode,
}

/// What the upstream answers: a status and extra headers.
struct Reply {
    status: StatusCode,
    headers: Vec<(&'static str, HeaderValue)>,
}

impl Reply {
    fn ok() -> Reply {
        Reply {
            status: StatusCode::OK,
            headers: Vec::new(),
        }
    }

    fn with(status: StatusCode, headers: &[(&'static str, &str)]) -> Reply {
        Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (*k, HeaderValue::from_str(v).expect("a header value")))
                .collect(),
        }
    }
}

/// Decides the answer to a request from the requests seen so far and its arrival time.
type Answer = Box<dyn FnMut(&[Hit], Instant) -> Reply + Send>;

struct Log {
    hits: Vec<Hit>,
    answer: Answer,
    in_flight: usize,
    max_in_flight: usize,
}

struct UpstreamState {
    log: Mutex<Log>,
    /// How long each request is held before the answer.
    delay: Duration,
}

impl UpstreamState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An upstream on 127.0.0.1:0 answering every path; stopped when dropped.
struct Upstream {
    server: common::TestServer,
    state: Arc<UpstreamState>,
}

async fn handle(State(state): State<Arc<UpstreamState>>) -> Response {
    let now = Instant::now();
    let reply = {
        let mut guard = state.lock();
        let log = &mut *guard;
        let reply = (log.answer)(&log.hits, now);
        log.hits.push(Hit {
            at: now,
            status: reply.status,
        });
        log.in_flight += 1;
        log.max_in_flight = log.max_in_flight.max(log.in_flight);
        reply
    };
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    state.lock().in_flight -= 1;
    let mut response = (reply.status, "upstream").into_response();
    for (name, value) in reply.headers {
        response.headers_mut().append(name, value);
    }
    response
}

impl Upstream {
    async fn start(answer: Answer) -> Upstream {
        Upstream::start_slow(answer, Duration::ZERO).await
    }

    async fn start_slow(answer: Answer, delay: Duration) -> Upstream {
        let state = Arc::new(UpstreamState {
            log: Mutex::new(Log {
                hits: Vec::new(),
                answer,
                in_flight: 0,
                max_in_flight: 0,
            }),
            delay,
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        Upstream {
            server: common::serve(app).await,
            state,
        }
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.lock().hits.clone()
    }

    fn max_in_flight(&self) -> usize {
        self.state.lock().max_in_flight
    }
}

/// The upstream's own limit: a GCRA token bucket (`rate`/s, capacity `burst`) that admits a
/// request arriving up to `jitter` early, as a real upstream's coarse clock would (a strict one
/// would answer 429 to a client exactly on schedule whose request took 1 ms less on the wire than
/// the previous one). Refused requests get 429 + `Retry-After` in whole seconds, rounded up.
fn gcra(rate: u32, burst: u32, jitter: Duration) -> Answer {
    let interval = Duration::from_secs(1) / rate;
    let tau = interval * burst;
    let mut tat: Option<Instant> = None;
    Box::new(move |_, now| {
        let t = tat.map_or(now, |t| t.max(now));
        let earliest = (t + interval).checked_sub(tau).unwrap_or(now);
        if earliest <= now + jitter {
            tat = Some(t + interval);
            Reply::ok()
        } else {
            let secs = (earliest - now).as_secs_f64().ceil().max(1.0);
            Reply::with(
                StatusCode::TOO_MANY_REQUESTS,
                &[("retry-after", &format!("{secs}"))],
            )
        }
    })
}

/// Arrival times in ms after the earliest one, for messages.
fn offsets(times: &[Instant]) -> Vec<i64> {
    times
        .iter()
        .min()
        .map_or_else(Vec::new, |&first| common::offsets(times, first))
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

type Client = RateLimit<reqwest::Client, FixedBuckets>;

fn quota(rate: u32, burst: u32) -> Quota {
    Quota::per_second(rate)
        .expect("a rate")
        .with_burst(burst)
        .expect("a burst")
}

fn client(layer: RateLimitLayer<FixedBuckets>) -> Client {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a reqwest client");
    layer.layer(http)
}

async fn get(client: &Client, url: &str) -> Result<reqwest::Response, Error> {
    let request = reqwest::Request::new(reqwest::Method::GET, url.parse().expect("a URL"));
    client.clone().oneshot(request).await
}

/// The error of a call that must have been refused locally.
fn rate_limited(result: Result<reqwest::Response, Error>) -> RateLimited {
    match result {
        Ok(response) => panic!("expected RateLimited, got {}", response.status()),
        Err(e) => {
            assert!(e.is_rate_limited(), "expected RateLimited, got {e}");
            // The same refusal, however it is asked for.
            assert_eq!(e.rate_limited(), e.downcast_ref::<RateLimited>());
            e.rate_limited()
                .unwrap_or_else(|| panic!("expected RateLimited, got {e}"))
                .clone()
        }
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Acceptance 1: at the upstream's own quota (10/s, burst 5), 25 requests from 8 concurrent
/// workers get no 429 and take (25 − 5) / 10 = 2 s; the upstream never sees more than the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_upstream_rate_no_429_and_no_extra_burst() {
    let _serial = SERIAL.lock().await;
    const N: usize = 25;
    const RATE: u32 = 10;
    const BURST: u32 = 5;
    let jitter = Duration::from_millis(50);
    let upstream = Upstream::start(gcra(RATE, BURST, jitter)).await;
    let client = client(
        RateLimitLayer::builder(Bucket::new("at-rate", quota(RATE, BURST)).fixed())
            .max_wait(Duration::from_secs(10))
            .build(),
    );
    let url = upstream.url("/work");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, url, next) = (client.clone(), url.clone(), Arc::clone(&next));
        workers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < N {
                let response = get(&client, &url).await.expect("a response");
                statuses.push(response.status());
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(w.await.expect("a worker"));
    }
    let elapsed = started.elapsed();
    let hits = upstream.hits();
    let refused = hits
        .iter()
        .filter(|h| h.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    let times: Vec<Instant> = hits.iter().map(|h| h.at).collect();
    let most = common::assert_arrival_curve(&times, f64::from(RATE), BURST as usize, jitter);
    let expected = Duration::from_secs_f64((N - BURST as usize) as f64 / f64::from(RATE));
    println!(
        "at-rate: {N} requests in {} ms (expected {} ms), upstream 429s: {refused}, \
         most in 100 ms: {most}, arrivals (ms): {:?}",
        ms(elapsed),
        ms(expected),
        offsets(&times)
    );
    assert_eq!(statuses.len(), N);
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(refused, 0, "the upstream refused some requests");
    assert_eq!(hits.len(), N);
    assert!(
        elapsed >= expected.mul_f64(0.95) && elapsed <= expected.mul_f64(1.4),
        "took {elapsed:?}, expected ~{expected:?}"
    );
    assert!(most <= BURST as usize + 1, "{most} requests within 100 ms");
}

/// Acceptance 4 (first part), on one store: burst 1, 1/s. The second call would wait ~1 s; it is
/// dropped after 100 ms, and a third call then waits for that ~1 s slot, not the 2 s one after it.
async fn dropped_wait_gives_its_place_back(store: Arc<dyn DynStore>, name: &str) {
    let upstream = Upstream::start(Box::new(|_, _| Reply::ok())).await;
    let client = client(
        RateLimitLayer::builder(Bucket::new("drop", quota(1, 1)).fixed())
            .store(store)
            .max_wait(Duration::from_secs(5))
            .build(),
    );
    let url = upstream.url("/");
    let t0 = Instant::now();
    get(&client, &url).await.expect("the first call passes");
    let first = t0.elapsed();
    let second = tokio::time::timeout(Duration::from_millis(100), get(&client, &url)).await;
    assert!(second.is_err(), "the second call should still be waiting");
    // The place is given back by a task the drop spawns; let it run.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t3 = Instant::now();
    get(&client, &url).await.expect("the third call passes");
    let third = t3.elapsed();
    let slot = Duration::from_secs(1).saturating_sub(t3 - t0);
    println!(
        "drop ({name}): first call {} ms, third call waited {} ms (its slot was {} ms away)",
        ms(first),
        ms(third),
        ms(slot)
    );
    assert!(first < Duration::from_millis(100), "{first:?}");
    assert!(
        third + Duration::from_millis(30) >= slot && third <= slot + Duration::from_millis(300),
        "the third call waited {third:?}; its slot was {slot:?} away (2 s would mean the dropped \
         call kept its place)"
    );
    assert_eq!(
        upstream.hits().len(),
        2,
        "the dropped call must never be sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_waiting_call_gives_its_place_back_memory() {
    let _serial = SERIAL.lock().await;
    dropped_wait_gives_its_place_back(Arc::new(MemoryStore::new()), "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_waiting_call_gives_its_place_back_redis() {
    let _serial = SERIAL.lock().await;
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("join")
        .expect("redis-server starts");
    let store = RedisStore::builder(redis.url())
        .prefix("outbound-drop")
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect to redis");
    dropped_wait_gives_its_place_back(Arc::new(store), "redis").await;
}

/// Acceptance 4 (second part): a wait beyond `max_wait` fails at once with `retry_after`;
/// `reject()` fails fast; a cost the bucket can never hold is `retry_after: None`; a refused
/// connection is not `RateLimited`. None of the refused calls reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_refusals_are_fast_typed_and_not_transport_errors() {
    let _serial = SERIAL.lock().await;
    let upstream = Upstream::start(Box::new(|_, _| Reply::ok())).await;
    let url = upstream.url("/");

    // Waiting mode, max_wait 200 ms, the next place 1 s away.
    let waiting = client(
        RateLimitLayer::builder(Bucket::new("max-wait", quota(1, 1)).fixed())
            .max_wait(Duration::from_millis(200))
            .build(),
    );
    get(&waiting, &url).await.expect("the first call passes");
    let t = Instant::now();
    let err = rate_limited(get(&waiting, &url).await);
    let beyond_max_wait = t.elapsed();
    let retry = err.retry_after.expect("a retry_after");
    assert_eq!(err.bucket, "max-wait");
    assert!(
        beyond_max_wait < Duration::from_millis(100),
        "{beyond_max_wait:?}"
    );
    assert!(
        retry > Duration::from_millis(700) && retry <= Duration::from_secs(1),
        "{retry:?}"
    );

    // Reject mode.
    let rejecting = client(
        RateLimitLayer::builder(Bucket::new("reject", quota(1, 1)).fixed())
            .reject()
            .build(),
    );
    get(&rejecting, &url).await.expect("the first call passes");
    let t = Instant::now();
    let err = rate_limited(get(&rejecting, &url).await);
    let rejected = t.elapsed();
    assert!(rejected < Duration::from_millis(100), "{rejected:?}");
    assert!(
        err.retry_after
            .is_some_and(|r| r > Duration::from_millis(700))
    );

    // A cost above the capacity: never, in either mode, without waiting.
    for builder in [
        RateLimitLayer::builder(Bucket::new("too-big", quota(10, 2)).cost(5).fixed()),
        RateLimitLayer::builder(Bucket::new("too-big", quota(10, 2)).cost(5).fixed()).reject(),
    ] {
        let big = client(builder.build());
        let t = Instant::now();
        let err = rate_limited(get(&big, &url).await);
        assert_eq!(err.retry_after, None);
        assert!(t.elapsed() < Duration::from_millis(100));
        assert!(err.to_string().contains("costs more than the bucket holds"));
    }
    assert_eq!(
        upstream.hits().len(),
        2,
        "only the two first calls were sent"
    );

    // A closed port: a transport error, not RateLimited.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let open =
        client(RateLimitLayer::builder(Bucket::new("closed", quota(10, 10)).fixed()).build());
    let err = get(&open, &format!("http://{closed}/"))
        .await
        .expect_err("nothing listens there");
    assert!(!err.is_rate_limited() && !err.is::<RateLimited>(), "{err}");
    assert!(err.upstream_unavailable().is_none(), "{err}");
    let transport = err
        .downcast_ref::<reqwest::Error>()
        .unwrap_or_else(|| panic!("a reqwest error, got {err}"));
    assert!(transport.is_connect(), "{transport}");
    println!(
        "refusals: beyond max_wait in {} µs (retry_after {} ms), reject in {} µs, \
         closed port: {err}",
        beyond_max_wait.as_micros(),
        ms(retry),
        rejected.as_micros()
    );
}

/// A response's extra headers, named, and whether they must pause the bucket.
type Case = (&'static str, Vec<(&'static str, HeaderValue)>, bool);

/// Acceptance 5: a 200 saying the upstream's quota is spent pauses the bucket until its reset
/// (1 s), before any 429; malformed headers change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_headers_pause_before_any_429() {
    let _serial = SERIAL.lock().await;
    let cases: [Case; 4] = [
        (
            "x-ratelimit",
            vec![
                ("x-ratelimit-remaining", HeaderValue::from_static("0")),
                ("x-ratelimit-reset", HeaderValue::from_static("1")),
            ],
            true,
        ),
        (
            "ietf",
            vec![("ratelimit", HeaderValue::from_static("\"x\";r=0;t=1"))],
            true,
        ),
        (
            "malformed",
            vec![
                ("x-ratelimit-remaining", HeaderValue::from_static("none")),
                ("x-ratelimit-reset", HeaderValue::from_static("soon")),
                (
                    "ratelimit",
                    HeaderValue::from_static("\"x\";r=;t=x, ;;;=,r=0"),
                ),
                ("retry-after", HeaderValue::from_static("tomorrow")),
            ],
            false,
        ),
        (
            "non-utf8",
            vec![
                (
                    "x-ratelimit-remaining",
                    HeaderValue::from_bytes(b"\xff").expect("opaque bytes"),
                ),
                ("x-ratelimit-reset", HeaderValue::from_static("1")),
                (
                    "ratelimit",
                    HeaderValue::from_bytes(b"\"x\";r=0;t=\xfe").expect("opaque bytes"),
                ),
            ],
            false,
        ),
    ];
    for (name, headers, pauses) in cases {
        let mut first = Some(headers);
        let upstream = Upstream::start(Box::new(move |_, _| match first.take() {
            Some(headers) => Reply {
                status: StatusCode::OK,
                headers,
            },
            None => Reply::ok(),
        }))
        .await;
        let client = client(
            RateLimitLayer::builder(
                Bucket::new(format!("adaptive-{name}"), quota(100, 100)).fixed(),
            )
            .build(),
        );
        let url = upstream.url("/");
        let response = get(&client, &url).await.expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
        let t = Instant::now();
        get(&client, &url).await.expect("a response");
        let second = t.elapsed();
        let t = Instant::now();
        get(&client, &url).await.expect("a response");
        let third = t.elapsed();
        println!(
            "headers {name}: next call waited {} ms, the one after {} ms",
            ms(second),
            ms(third)
        );
        if pauses {
            assert!(
                second >= Duration::from_millis(900) && second <= Duration::from_millis(1400),
                "{name}: the call after `remaining 0, reset 1 s` waited {second:?}"
            );
        } else {
            assert!(second < Duration::from_millis(200), "{name}: {second:?}");
        }
        // After the pause the bucket refills at its rate (100/s), it does not stay shut.
        assert!(third < Duration::from_millis(200), "{name}: {third:?}");
        let hits = upstream.hits();
        assert_eq!(hits.len(), 3);
        assert!(hits.iter().all(|h| h.status == StatusCode::OK));
    }
}

/// A 429 + `Retry-After: 1` pauses the calls already waiting for a place, not only the next ones:
/// burst 1 at 10/s, five calls at once hold places 0, 100, …, 400 ms ahead; the first is refused,
/// and nothing reaches the upstream for the next second. Then the refused call is retried
/// (`retry_limited(1)`) and every call passes, one per 100 ms, not in a storm. The metrics carry
/// the bucket's label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_waiting_calls_and_the_refused_one_is_retried() {
    let _serial = SERIAL.lock().await;
    let snapshotter = common::snapshotter();
    let _ = snapshotter.snapshot(); // drop what earlier tests recorded
    let upstream = Upstream::start(Box::new(|hits: &[Hit], _| {
        if hits.is_empty() {
            Reply::with(StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "1")])
        } else {
            Reply::ok()
        }
    }))
    .await;
    let client = client(
        RateLimitLayer::builder(
            Bucket::new("retry:api", quota(10, 1))
                .label("retry-bucket")
                .fixed(),
        )
        .max_wait(Duration::from_secs(5))
        .retry_limited(1)
        .build(),
    );
    let url = upstream.url("/");
    let started = Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&client, &url).await.map(|r| r.status()) })
        })
        .collect();
    for call in calls {
        assert_eq!(
            call.await.expect("join").expect("a response"),
            StatusCode::OK
        );
    }
    let elapsed = started.elapsed();
    let hits = upstream.hits();
    let refused_at = hits[0].at;
    assert_eq!(hits[0].status, StatusCode::TOO_MANY_REQUESTS);
    let during_pause: Vec<u128> = hits[1..]
        .iter()
        .filter(|h| h.at - refused_at < Duration::from_millis(950))
        .map(|h| ms(h.at - refused_at))
        .collect();
    let times: Vec<Instant> = hits[1..].iter().map(|h| h.at).collect();
    let most = common::assert_arrival_curve(&times, 10.0, 1, Duration::from_millis(50));
    println!(
        "429 pause: arrivals after the 429 (ms): {:?}, most in 100 ms after it: {most}, \
         all done in {} ms",
        offsets(&hits.iter().map(|h| h.at).collect::<Vec<_>>()),
        ms(elapsed)
    );
    assert!(
        during_pause.is_empty(),
        "requests arrived {during_pause:?} ms after a 429 + Retry-After: 1"
    );
    assert_eq!(hits.len(), 6, "five calls and one retry");
    assert!(most <= 2, "{most} requests within 100 ms after the pause");

    // The metrics, with the bucket's label.
    let mut waits = 0;
    let mut limited = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        if !key
            .labels()
            .any(|l| l.key() == "bucket" && l.value() == "retry-bucket")
        {
            continue;
        }
        match (key.name(), value) {
            ("rate_limiter_wait_seconds", DebugValue::Histogram(v)) => waits += v.len(),
            ("rate_limiter_upstream_limited_total", DebugValue::Counter(n)) => limited += n,
            _ => {}
        }
    }
    assert_eq!(limited, 1, "one upstream 429");
    assert_eq!(waits, 6, "one wait per request sent");
}

/// Acceptance 6: `max_in_flight(1)` serialises calls to an upstream that holds each one 200 ms;
/// without it the same four calls overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_serialises_calls() {
    let _serial = SERIAL.lock().await;
    for cap in [Some(1), None] {
        let upstream =
            Upstream::start_slow(Box::new(|_, _| Reply::ok()), Duration::from_millis(200)).await;
        let builder = RateLimitLayer::builder(Bucket::new("in-flight", quota(100, 100)).fixed());
        let client = client(match cap {
            Some(n) => builder.max_in_flight(n).build(),
            None => builder.build(),
        });
        let url = upstream.url("/");
        let started = Instant::now();
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { get(&client, &url).await.map(|r| r.status()) })
            })
            .collect();
        for call in calls {
            assert_eq!(
                call.await.expect("join").expect("a response"),
                StatusCode::OK
            );
        }
        let elapsed = started.elapsed();
        let most = upstream.max_in_flight();
        println!(
            "max_in_flight {cap:?}: at most {most} concurrent at the upstream, 4 calls in {} ms",
            ms(elapsed)
        );
        if cap.is_some() {
            assert_eq!(most, 1);
            assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
        } else {
            assert!(most >= 2, "without a cap the calls overlap ({most})");
        }
    }
}

/// Calls queued behind `max_in_flight(1)` when a 429 + `Retry-After: 1` comes back are not sent
/// during the pause: the upstream holds each request 200 ms and refuses the first; the next
/// request arrives only after the pause, and all three calls then pass (the refused one retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_queued_for_an_in_flight_slot_respect_a_pause() {
    let _serial = SERIAL.lock().await;
    let upstream = Upstream::start_slow(
        Box::new(|hits: &[Hit], _| {
            if hits.is_empty() {
                Reply::with(StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "1")])
            } else {
                Reply::ok()
            }
        }),
        Duration::from_millis(200),
    )
    .await;
    let client = client(
        RateLimitLayer::builder(Bucket::new("queued", quota(100, 100)).fixed())
            .max_in_flight(1)
            .retry_limited(1)
            .build(),
    );
    let url = upstream.url("/");
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&client, &url).await.map(|r| r.status()) })
        })
        .collect();
    for call in calls {
        assert_eq!(
            call.await.expect("join").expect("a response"),
            StatusCode::OK
        );
    }
    let hits = upstream.hits();
    let arrivals = offsets(&hits.iter().map(|h| h.at).collect::<Vec<_>>());
    println!(
        "queued behind max_in_flight(1): arrivals (ms) {arrivals:?}, most in flight {}",
        upstream.max_in_flight()
    );
    assert_eq!(hits[0].status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(hits.len(), 4, "three calls and one retry");
    // The 429 was answered at ~200 ms and asked for 1 s.
    assert!(
        hits[1].at - hits[0].at >= Duration::from_millis(1150),
        "a queued call was sent during the pause: {arrivals:?}"
    );
    assert_eq!(upstream.max_in_flight(), 1);
}

/// `secs` after the Unix epoch in the two obsolete HTTP-date forms (RFC 9110, section 5.6.7):
/// RFC 850 and asctime.
fn obsolete_http_dates(secs: u64) -> [String; 2] {
    let (year, month, day, weekday) = common::civil(secs);
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let weekday = common::WEEKDAYS[weekday as usize];
    let mon = common::MONTHS[(month - 1) as usize];
    [
        format!(
            "{weekday}, {day:02}-{mon}-{:02} {h:02}:{m:02}:{s:02} GMT",
            year % 100
        ),
        format!(
            "{} {mon} {day:>2} {h:02}:{m:02}:{s:02} {year}",
            &weekday[..3]
        ),
    ]
}

/// A `Retry-After` HTTP-date in the obsolete RFC 850 or asctime form (RFC 9110: recipients MUST
/// accept both) is honoured: the retry waits until that time, instead of falling back to one
/// second and sending requests into the upstream's pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_dates_in_every_form_are_honoured() {
    let _serial = SERIAL.lock().await;
    for (i, form) in ["RFC 850", "asctime"].into_iter().enumerate() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        // Three whole seconds ahead: the pause is between 2 and 3 s from the 429.
        let date = obsolete_http_dates(now + 3)[i].clone();
        let answer = date.clone();
        let upstream = Upstream::start(Box::new(move |hits: &[Hit], _| {
            if hits.is_empty() {
                Reply::with(StatusCode::TOO_MANY_REQUESTS, &[("retry-after", &answer)])
            } else {
                Reply::ok()
            }
        }))
        .await;
        let client = client(
            RateLimitLayer::builder(Bucket::new(format!("dates:{form}"), quota(100, 100)).fixed())
                .max_wait(Duration::from_secs(10))
                .retry_limited(1)
                .build(),
        );
        let reply = get(&client, &upstream.url("/")).await.expect("a response");
        assert_eq!(reply.status(), StatusCode::OK, "{form}");
        let hits = upstream.hits();
        assert_eq!(hits.len(), 2, "{form}: one 429 and one retry");
        let gap = hits[1].at - hits[0].at;
        assert!(
            gap >= Duration::from_millis(1500),
            "{form} `Retry-After: {date}` was not honoured: retried after {gap:?}"
        );
    }
}

/// `rate_limiter_store_compensation_errors_total{store, op}` as this binary's recorder holds it.
fn compensation_errors(store: &str, op: &str) -> u64 {
    common::counter(
        "rate_limiter_store_compensation_errors_total",
        &[("store", store), ("op", op)],
    )
}

/// A dropped call whose place cannot be given back (Redis died meanwhile) is said in the log and
/// counted, not dropped in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_that_cannot_be_given_back_is_counted() {
    let _serial = SERIAL.lock().await;
    let _ = common::snapshotter();
    let mut redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("join")
        .expect("redis-server starts");
    let store = RedisStore::builder(redis.url())
        .prefix("outbound-cancel-fails")
        .timeout(Duration::from_millis(200))
        .connect()
        .await
        .expect("connect to redis");
    let upstream = Upstream::start(Box::new(|_, _| Reply::ok())).await;
    let client = client(
        RateLimitLayer::builder(Bucket::new("cancel-fails", quota(1, 1)).fixed())
            .store(store)
            .max_wait(Duration::from_secs(5))
            .build(),
    );
    let url = upstream.url("/");
    get(&client, &url).await.expect("the first call passes");
    // The second call holds a place ~1 s ahead and sleeps toward it.
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { get(&client, &url).await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    tokio::task::block_in_place(|| redis.stop());
    let _ = common::snapshotter().snapshot();
    waiting.abort();
    assert!(waiting.await.is_err_and(|e| e.is_cancelled()));
    // Snapshots drain: add up what each poll sees.
    let mut seen = 0;
    let counted = common::poll_until(Duration::from_secs(5), || {
        seen += compensation_errors("redis", "cancel");
        seen > 0
    })
    .await;
    assert!(counted, "the failed give-back was not counted");
}

/// The upstream failure breaker (issue 13): three 5xx in a row open it; while open no call is sent
/// (each fails at once with `UpstreamUnavailable`, counted); after the recovery time a call goes
/// through again, and its success closes the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_breaker_opens_stays_open_and_half_opens() {
    upstream_breaker_case(quota(100, 100)).await;
}

/// The same on a fixed-window bucket: the breaker's marker is a bucket of its own, so it opens
/// whatever the algorithm of the bucket it guards (a window cannot be paused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_breaker_opens_on_a_window_bucket_too() {
    let window = Quota::fixed_window(100, Duration::from_secs(1)).expect("a quota");
    upstream_breaker_case(window).await;
}

async fn upstream_breaker_case(bucket_quota: Quota) {
    use tollgate::outbound::{UpstreamBreaker, UpstreamUnavailable};
    let _serial = SERIAL.lock().await;
    let _ = common::snapshotter().snapshot();
    let upstream = Upstream::start(Box::new(|hits: &[Hit], _| {
        if hits.len() < 3 {
            Reply::with(StatusCode::BAD_GATEWAY, &[])
        } else {
            Reply::ok()
        }
    }))
    .await;
    let client = client(
        RateLimitLayer::builder(
            Bucket::new("flaky:api", bucket_quota)
                .label("flaky")
                .fixed(),
        )
        .upstream_breaker(UpstreamBreaker {
            failures: 3,
            recovery: Duration::from_millis(500),
        })
        .build(),
    );
    let url = upstream.url("/");
    for _ in 0..3 {
        let reply = get(&client, &url).await.expect("a response");
        assert_eq!(reply.status(), StatusCode::BAD_GATEWAY);
    }
    let opened = Instant::now();
    for _ in 0..5 {
        let e = get(&client, &url).await.expect_err("the breaker is open");
        assert!(!e.is_rate_limited(), "{e}");
        let open = e
            .upstream_unavailable()
            .unwrap_or_else(|| panic!("not UpstreamUnavailable: {e}"));
        assert_eq!(e.downcast_ref::<UpstreamUnavailable>(), Some(open));
        assert_eq!(open.bucket, "flaky:api");
        assert!(open.retry_after <= Duration::from_millis(500), "{open:?}");
    }
    assert_eq!(upstream.hits().len(), 3, "nothing sent while open");
    tokio::time::sleep(Duration::from_millis(550).saturating_sub(opened.elapsed())).await;
    let probe = get(&client, &url).await.expect("half-open: the call goes");
    assert_eq!(probe.status(), StatusCode::OK);
    for _ in 0..3 {
        assert_eq!(
            get(&client, &url).await.expect("closed").status(),
            StatusCode::OK
        );
    }
    assert_eq!(upstream.hits().len(), 7);
    let refused = common::counter("rate_limiter_upstream_open_total", &[("bucket", "flaky")]);
    assert_eq!(refused, 5, "each refusal counted");
}

/// The `reqwest-middleware` adapter (issue 13): `client.get(url).send()` waits for the bucket,
/// pauses on a 429 + `Retry-After` and retries after it; a local refusal is a `RateLimited` the
/// caller can tell from a transport failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reqwest_middleware_adapter_keeps_the_behaviour() {
    use tollgate::outbound::RateLimitMiddleware;
    let _serial = SERIAL.lock().await;
    let upstream = Upstream::start(Box::new(|hits: &[Hit], _| {
        if hits.is_empty() {
            Reply::with(StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "1")])
        } else {
            Reply::ok()
        }
    }))
    .await;
    let layer = RateLimitLayer::builder(Bucket::new("mw:api", quota(10, 2)).fixed())
        .max_wait(Duration::from_secs(5))
        .retry_limited(1)
        .build();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RateLimitMiddleware::new(layer))
        .build();
    let url = upstream.url("/");
    let started = Instant::now();
    let reply = client.get(&url).send().await.expect("a response");
    assert_eq!(reply.status(), StatusCode::OK, "retried after the pause");
    let hits = upstream.hits();
    assert_eq!(hits.len(), 2);
    assert!(
        hits[1].at - hits[0].at >= Duration::from_millis(950),
        "the retry did not wait out Retry-After: {:?}",
        hits[1].at - hits[0].at
    );
    assert!(started.elapsed() < Duration::from_secs(4));

    // Fail fast: a bucket of one, `reject()`.
    let layer = RateLimitLayer::builder(Bucket::new("mw:fast", quota(1, 1)).fixed())
        .reject()
        .build();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RateLimitMiddleware::new(layer))
        .build();
    assert!(client.get(&url).send().await.is_ok());
    let e = client.get(&url).send().await.expect_err("refused locally");
    let refused = match &e {
        reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<RateLimited>(),
        reqwest_middleware::Error::Reqwest(_) => None,
    };
    let refused = refused.unwrap_or_else(|| panic!("not RateLimited: {e:?}"));
    assert_eq!(refused.bucket, "mw:fast");
    assert_eq!(upstream.hits().len(), 3, "the refused call was never sent");
    // A transport failure stays a reqwest error.
    let roomy = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RateLimitMiddleware::new(
            RateLimitLayer::builder(Bucket::new("mw:closed", quota(10, 10)).fixed()).build(),
        ))
        .build();
    let closed = roomy.get("http://127.0.0.1:1/").send().await;
    assert!(
        matches!(closed, Err(reqwest_middleware::Error::Reqwest(_))),
        "{closed:?}"
    );
}

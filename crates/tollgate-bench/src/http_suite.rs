//! `http`: an axum hello-world route served in this process, bare and behind each limiter.
//!
//! The server runs on its own tokio runtime with one worker thread in every case; the load
//! generator (a hyper-util legacy client, HTTP/1 with keep-alive, `CONCURRENCY` tasks in a closed
//! loop) runs on another single-threaded runtime. The quotas are generous, so every request passes:
//! what is measured is the cost of the limiter on an allowed request. tollgate runs with its
//! defaults (both the IETF and the `X-RateLimit-*` headers on every response), and once more with
//! the headers off to show what they cost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate::headers::HeaderMode;
use tollgate::inbound::{Global, Policy, RateLimitLayer};
use tollgate_core::{MemoryStore, Quota};
use tollgate_redis::RedisStore;
use tollgate_testkit::RedisServer;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::GlobalKeyExtractor;

use crate::BoxError;
use crate::load::{Load, drive, median_load};
use crate::report::{Row, ms, thousands, throughput_ratio};

/// Requests in flight at any time (one keep-alive connection each).
const CONCURRENCY: usize = 32;

/// A million per second, a million at once: nothing is ever denied.
const RATE: u32 = 1_000_000;
const BURST: u32 = 1_000_000;

async fn hello() -> &'static str {
    "Hello, World!"
}

fn bare() -> Router {
    Router::new().route("/", get(hello))
}

fn tollgate_layer(
    store: impl tollgate_core::Store,
    headers: HeaderMode,
) -> Result<RateLimitLayer<Global>, BoxError> {
    let policy = Policy::builder()
        .tier("all", Quota::per_second(RATE)?.with_burst(BURST)?)
        .headers(headers)
        .build()?;
    Ok(RateLimitLayer::builder(policy, Global::new("all"))
        .store(store)
        .build())
}

fn governed() -> Result<Router, BoxError> {
    let config = GovernorConfigBuilder::default()
        .key_extractor(GlobalKeyExtractor)
        .period(Duration::from_secs(1) / RATE)
        .burst_size(BURST)
        .finish()
        .ok_or("invalid tower_governor config")?;
    Ok(bare().layer(GovernorLayer::new(Arc::new(config))))
}

/// Serves `app` on 127.0.0.1:0 on `runtime`; the server stops with the runtime.
fn serve(runtime: &tokio::runtime::Runtime, app: Router) -> Result<SocketAddr, BoxError> {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// Loads `addr` for `duration` after a short warm-up.
fn load(addr: SocketAddr, duration: Duration) -> Result<Load, BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(CONCURRENCY)
            .build_http();
        let uri: Uri = format!("http://{addr}/").parse()?;
        let make_op = || {
            let client = client.clone();
            let uri = uri.clone();
            move || {
                let request = client.get(uri.clone());
                async move {
                    let response = request.await?;
                    let ok = response.status() == StatusCode::OK;
                    response.into_body().collect().await?;
                    Ok(ok)
                }
            }
        };
        drive(CONCURRENCY, Duration::from_millis(300), &make_op).await?;
        drive(CONCURRENCY, duration, &make_op).await
    })
}

/// The cases, each served by a fresh server runtime.
/// `memory-no-headers` shows how much of tollgate's cost is its five rate-limit headers
/// (tower_governor sends none on an allowed request).
const CASES: [&str; 5] = [
    "bare",
    "memory",
    "memory-no-headers",
    "redis",
    "tower_governor",
];

/// Serves one case and loads it.
fn measure_case(case: &str, redis: &RedisServer, duration: Duration) -> Result<Load, BoxError> {
    // One worker thread in every case, nothing left over from the last case.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let app = match case {
        "bare" => bare(),
        "memory" => bare().layer(tollgate_layer(MemoryStore::new(), HeaderMode::default())?),
        "memory-no-headers" => bare().layer(tollgate_layer(MemoryStore::new(), HeaderMode::None)?),
        "redis" => {
            let store = runtime.block_on(RedisStore::builder(redis.url()).connect())?;
            bare().layer(tollgate_layer(store, HeaderMode::default())?)
        }
        _ => governed()?,
    };
    let addr = serve(&runtime, app)?;
    let measured = load(addr, duration);
    runtime.shutdown_timeout(Duration::from_secs(1));
    measured
}

/// Runs the http suite.
pub(crate) fn run(quick: bool) -> Result<Vec<Row>, BoxError> {
    // Rounds interleave the cases, so a drift in machine load hits all of them alike; each case
    // gets the median of its rounds (throughput and latencies separately).
    let (rounds, duration) = if quick {
        (2, Duration::from_millis(700))
    } else {
        (5, Duration::from_secs(1))
    };
    let redis = RedisServer::start()?;
    let mut samples: Vec<(&str, Vec<Load>)> = CASES.iter().map(|c| (*c, Vec::new())).collect();
    for round in 0..rounds {
        // Each round starts with a different case, so no case always runs first or last.
        for i in 0..samples.len() {
            let (case, loads) = &mut samples[(i + round) % CASES.len()];
            let measured = measure_case(case, &redis, duration)?;
            eprintln!("  http {case} (round {}): {}", round + 1, measured.text());
            loads.push(measured);
        }
    }
    let results: Vec<(&str, Load)> = samples
        .into_iter()
        .map(|(case, loads)| (case, median_load(&loads)))
        .collect();
    let get = |name: &str| {
        results
            .iter()
            .find(|(case, _)| *case == name)
            .map(|(_, load)| *load)
            .ok_or_else(|| format!("no result for {name}"))
    };
    let (bare, memory, quiet, redis, governor) = (
        get("bare")?,
        get("memory")?,
        get("memory-no-headers")?,
        get("redis")?,
        get("tower_governor")?,
    );
    let value = |l: &Load| format!("{} req/s (p99 {})", thousands(l.per_sec), ms(l.p99));
    let conc = format!("{CONCURRENCY} connections");
    Ok(vec![
        Row {
            case: format!("http: tollgate MemoryStore (req/s, {conc})"),
            tollgate: value(&memory),
            peer: "bare axum".into(),
            peer_value: value(&bare),
            ratio: throughput_ratio(memory.per_sec, bare.per_sec),
        },
        Row {
            case: format!("http: tollgate MemoryStore (req/s, {conc})"),
            tollgate: value(&memory),
            peer: "tower_governor (global key)".into(),
            peer_value: value(&governor),
            ratio: throughput_ratio(memory.per_sec, governor.per_sec),
        },
        Row {
            case: format!("http: tollgate MemoryStore, no rate-limit headers (req/s, {conc})"),
            tollgate: value(&quiet),
            peer: "bare axum".into(),
            peer_value: value(&bare),
            ratio: throughput_ratio(quiet.per_sec, bare.per_sec),
        },
        Row {
            case: format!("http: tollgate MemoryStore, no rate-limit headers (req/s, {conc})"),
            tollgate: value(&quiet),
            peer: "tower_governor (global key)".into(),
            peer_value: value(&governor),
            ratio: throughput_ratio(quiet.per_sec, governor.per_sec),
        },
        Row {
            case: format!("http: tollgate on Redis (req/s, {conc})"),
            tollgate: value(&redis),
            peer: "bare axum".into(),
            peer_value: value(&bare),
            ratio: throughput_ratio(redis.per_sec, bare.per_sec),
        },
        Row {
            case: format!("http: tollgate on Redis (req/s, {conc})"),
            tollgate: value(&redis),
            peer: "tower_governor (global key, in memory)".into(),
            peer_value: value(&governor),
            ratio: throughput_ratio(redis.per_sec, governor.per_sec),
        },
    ])
}

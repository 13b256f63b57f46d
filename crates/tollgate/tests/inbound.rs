//! The inbound layer end to end, over real sockets: an axum server on 127.0.0.1 behind
//! [`RateLimitLayer`], driven by a reqwest client.
//!
//! One suite ([`suite`]), written once against whatever store a [`Backend`] hands out
//! (`Arc<dyn DynStore>`), run three times: on the in-memory store, on a single `redis-server` and
//! on a 3-master Redis Cluster. Every check uses its own key namespace (a fresh `MemoryStore`, or
//! its own Redis key prefix) so the checks of one backend run concurrently. The layer is built
//! with `fail_closed` and a generous timeout: a store failure would show up as a 503, never be
//! hidden by the local fallback.
//!
//! What was observed and is asserted here (not all of it is spelled out by the contract):
//! * with `Router::layer` the limiter also wraps the router's fallback, so an **unknown path is
//!   limited**: it answers 404 with the rate-limit headers, spends the caller's quota and gets a
//!   429 once that is gone; with `Router::route_layer` an unknown path is a plain 404, never
//!   limited;
//! * non-UTF-8 and 64 KiB header values are answered normally (401 for a bad API key, 200 with
//!   the peer's own bucket for a forwarding header that cannot be used); 1 MiB of headers is a
//!   431 from hyper, before the limiter.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use tokio::task::{JoinHandle, JoinSet};
use tollgate::core::{DynStore, MemoryStore, Quota};
use tollgate::http::HeaderMode;
use tollgate::http::TrustedProxies;
use tollgate::inbound::{
    ApiKeyEntry, ApiKeys, ClientIp, OnStoreError, Policy, PolicyBuilder, RateLimitLayer, Route,
};
use tollgate::redis::RedisStore;
use tollgate_testkit::{RedisCluster, RedisServer};
use tower::ServiceBuilder;

/// The bound on one store call, for the store and the layer: loose, so a loaded machine does not
/// turn into store errors.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// Where the limit state of the suite lives.
enum Topology {
    /// One `MemoryStore` per namespace (shared by every layer asking for that namespace).
    Memory(Mutex<HashMap<String, Arc<dyn DynStore>>>),
    Redis(RedisServer),
    Cluster(RedisCluster),
}

struct Backend {
    name: &'static str,
    topology: Topology,
}

impl Backend {
    fn memory() -> Backend {
        Backend {
            name: "memory",
            topology: Topology::Memory(Mutex::new(HashMap::new())),
        }
    }

    async fn redis() -> Backend {
        let server = tokio::task::spawn_blocking(RedisServer::start)
            .await
            .expect("the start task")
            .expect("redis-server starts");
        Backend {
            name: "redis",
            topology: Topology::Redis(server),
        }
    }

    async fn cluster() -> Backend {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("the start task")
            .expect("a redis cluster starts");
        Backend {
            name: "redis-cluster",
            topology: Topology::Cluster(cluster),
        }
    }

    /// A store for the namespace `ns`: every call with the same `ns` sees the same state (on
    /// Redis through a new connection each time, as a second process would).
    async fn store(&self, ns: &str) -> Arc<dyn DynStore> {
        match &self.topology {
            Topology::Memory(stores) => Arc::clone(
                stores
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(ns.to_owned())
                    .or_insert_with(|| Arc::new(MemoryStore::new())),
            ),
            Topology::Redis(server) => Arc::new(
                RedisStore::builder(server.url())
                    .prefix(ns)
                    .timeout(STORE_TIMEOUT)
                    .connect()
                    .await
                    .expect("connect to redis"),
            ),
            Topology::Cluster(cluster) => Arc::new(
                RedisStore::cluster_builder(cluster.urls())
                    .prefix(ns)
                    .timeout(STORE_TIMEOUT)
                    .connect()
                    .await
                    .expect("connect to the redis cluster"),
            ),
        }
    }

    /// How many Redis keys the namespace holds (over every node); `None` in memory.
    fn redis_keys(&self, ns: &str) -> Option<usize> {
        let nodes: Vec<&RedisServer> = match &self.topology {
            Topology::Memory(_) => return None,
            Topology::Redis(server) => vec![server],
            Topology::Cluster(cluster) => cluster.nodes().iter().collect(),
        };
        let pattern = format!("{ns}:*");
        Some(
            nodes
                .iter()
                .map(|node| {
                    let reply = node.cmd(&["KEYS", &pattern]).expect("KEYS");
                    reply.as_array().expect("an array of keys").len()
                })
                .sum(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Servers and requests
// ---------------------------------------------------------------------------------------------

/// A server on 127.0.0.1 (peer address available as `ConnectInfo`), with a client for it;
/// stopped when dropped.
struct Server {
    addr: SocketAddr,
    client: reqwest::Client,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves any axum-compatible service (a `Router`, or a `ServiceBuilder` stack around one).
async fn serve<S>(service: S) -> Server
where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let make = axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
        SocketAddr,
    >(service);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, make).await;
    });
    Server {
        addr,
        client: common::client(),
        task,
    }
}

/// A response, read whole.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

type Headers<'a> = &'a [(&'a str, &'a [u8])];

const ALICE: Headers<'static> = &[("x-api-key", b"key-alice")];
const BOB: Headers<'static> = &[("x-api-key", b"key-bob")];
const CAROL: Headers<'static> = &[("x-api-key", b"key-carol")];
const ANON: Headers<'static> = &[];

impl Server {
    async fn send(&self, method: Method, path: &str, headers: Headers<'_>) -> Reply {
        let url = format!("http://{}{path}", self.addr);
        let mut request = self.client.request(method, &url);
        for &(name, value) in headers {
            request = request.header(
                name,
                HeaderValue::from_bytes(value).expect("a valid header value"),
            );
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.expect("a body");
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str, headers: Headers<'_>) -> Reply {
        self.send(Method::GET, path, headers).await
    }

    async fn post(&self, path: &str, headers: Headers<'_>) -> Reply {
        self.send(Method::POST, path, headers).await
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the headers and bodies
// ---------------------------------------------------------------------------------------------

/// One member of `RateLimit` / `RateLimit-Policy`: an sf-string with integer parameters.
/// What the rate-limit headers of a response say.
#[derive(Debug, Clone, PartialEq)]
struct Limits {
    policy: String,
    q: i64,
    w: i64,
    r: i64,
    t: i64,
}

const IETF_HEADERS: [&str; 2] = ["ratelimit", "ratelimit-policy"];
const LEGACY_HEADERS: [&str; 3] = [
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
];

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let value = values.next()?;
        assert!(values.next().is_none(), "{name} twice: {self:?}");
        Some(
            value
                .to_str()
                .unwrap_or_else(|_| panic!("{name}: not ASCII")),
        )
    }

    fn int_header(&self, name: &str) -> i64 {
        let value = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name}: {self:?}"));
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {value:?} is not an integer"))
    }

    /// `RateLimit-Policy` and `RateLimit`, parsed; they must name the same policy.
    fn ietf(&self) -> Limits {
        let policy = common::sf_member(
            self.header("ratelimit-policy")
                .unwrap_or_else(|| panic!("no RateLimit-Policy: {self:?}")),
        );
        let current = common::sf_member(
            self.header("ratelimit")
                .unwrap_or_else(|| panic!("no RateLimit: {self:?}")),
        );
        assert_eq!(policy.name, current.name, "{self:?}");
        let keys = |m: &common::SfMember| m.params.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&policy), ["q", "w"], "{self:?}");
        assert_eq!(keys(&current), ["r", "t"], "{self:?}");
        Limits {
            policy: policy.name,
            q: policy.params["q"],
            w: policy.params["w"],
            r: current.params["r"],
            t: current.params["t"],
        }
    }

    /// `X-RateLimit-Limit`, `-Remaining` and `-Reset`.
    fn legacy(&self) -> (i64, i64, i64) {
        (
            self.int_header("x-ratelimit-limit"),
            self.int_header("x-ratelimit-remaining"),
            self.int_header("x-ratelimit-reset"),
        )
    }

    /// Both families (the default mode), which must agree.
    fn limits(&self) -> Limits {
        let limits = self.ietf();
        assert_eq!(
            self.legacy(),
            (limits.q, limits.r, limits.t),
            "legacy and IETF headers disagree: {self:?}"
        );
        limits
    }

    fn assert_no_rate_limit_headers(&self) {
        for name in IETF_HEADERS.iter().chain(&LEGACY_HEADERS) {
            assert!(self.header(name).is_none(), "unexpected {name}: {self:?}");
        }
    }

    fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("Retry-After {v:?} is not whole seconds"))
        })
    }

    fn json(&self) -> serde_json::Value {
        let content_type = self.header("content-type").unwrap_or_default();
        assert_eq!(content_type, "application/problem+json", "{self:?}");
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{}: {e}", self.body))
    }
}

/// `actual` is a time in whole seconds, rounded up, that was `exact` at `since` and has been
/// counting down since (the store's clock ticks between requests).
#[track_caller]
fn near(actual: i64, exact: i64, since: Instant) {
    let slack = i64::try_from(since.elapsed().as_secs()).unwrap_or(i64::MAX);
    assert!(
        (exact.saturating_sub(slack)..=exact).contains(&actual),
        "{actual} s, expected {exact} s (less at most {slack} s)"
    );
}

/// A 200 reporting `policy` (quota `q`, window `w`) with `r` remaining, in both header families,
/// without `Retry-After`.
#[track_caller]
fn allowed(reply: &Reply, policy: &str, q: i64, w: i64, r: i64) -> Limits {
    assert_eq!(reply.status, 200, "{reply:?}");
    let limits = reply.limits();
    assert_eq!(
        (limits.policy.as_str(), limits.q, limits.w, limits.r),
        (policy, q, w, r),
        "{reply:?}"
    );
    assert_eq!(reply.retry_after(), None, "{reply:?}");
    limits
}

/// A 429 of `policy`: headers with `r` = 0, `Retry-After` ≥ 1 s, the problem+json body; returns
/// the headers and `Retry-After`.
#[track_caller]
fn denied(reply: &Reply, policy: &str, q: i64, w: i64) -> (Limits, i64) {
    assert_eq!(reply.status, 429, "{reply:?}");
    let limits = reply.limits();
    assert_eq!(
        (limits.policy.as_str(), limits.q, limits.w, limits.r),
        (policy, q, w, 0),
        "{reply:?}"
    );
    let retry = too_many_requests(reply, policy);
    (limits, retry)
}

/// The parts of a 429 every header mode keeps: `Retry-After` (whole seconds, at least 1) and the
/// problem+json body, whose `retry_after` is the same number. Returns it.
#[track_caller]
fn too_many_requests(reply: &Reply, policy: &str) -> i64 {
    assert_eq!(reply.status, 429, "{reply:?}");
    let retry = reply
        .retry_after()
        .unwrap_or_else(|| panic!("no Retry-After: {reply:?}"));
    assert!(retry >= 1, "{reply:?}");
    let json = reply.json();
    assert_eq!(
        json["type"].as_str(),
        Some(tollgate::http::problem::PROBLEM_TYPE),
        "{json}"
    );
    assert_eq!(json["title"].as_str(), Some("Too Many Requests"), "{json}");
    assert_eq!(json["status"].as_u64(), Some(429), "{json}");
    let detail = json["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(policy), "{json}");
    let violated = json["violated-policies"]
        .as_array()
        .unwrap_or_else(|| panic!("no violated-policies: {json}"));
    assert!(
        violated.iter().any(|v| v.as_str() == Some(policy)),
        "{policy} not in {json}"
    );
    assert_eq!(json["retry_after"].as_u64(), Some(retry), "{json}");
    i64::try_from(retry).expect("a sane retry")
}

/// A 401 for an unknown credential: problem+json, `WWW-Authenticate`, no rate-limit headers.
#[track_caller]
fn unauthorized(reply: &Reply) {
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer"),
        "{reply:?}"
    );
    let json = reply.json();
    assert_eq!(json["status"].as_u64(), Some(401), "{json}");
    assert_eq!(json["title"].as_str(), Some("Unauthorized"), "{json}");
    reply.assert_no_rate_limit_headers();
    assert_eq!(reply.retry_after(), None, "{reply:?}");
}

// ---------------------------------------------------------------------------------------------
// The application under test
// ---------------------------------------------------------------------------------------------

/// A token bucket holding `n`, refilled at `n` an hour: time does not matter in a test, and the
/// window `w` is always 3600 s (refill interval 3600 / `n` s).
fn hourly(n: u32) -> Quota {
    Quota::per_hour(n)
        .and_then(|q| q.with_burst(n))
        .expect("a quota")
}

/// The tiers of the example server (bursts 5 / 20 / 100), a costly route and a limited one.
fn tiers() -> PolicyBuilder {
    Policy::builder()
        .tier("anonymous", hourly(5))
        .tier("basic", hourly(20))
        .tier("pro", hourly(100))
        .route(Route::new("/api/reports").method(Method::POST).cost(5))
        .route(Route::new("/api/search").limit(hourly(3)))
        .exempt_path("/healthz")
}

fn build(policy: PolicyBuilder) -> Policy {
    policy.build().expect("a valid policy")
}

fn api_keys(trusted: TrustedProxies) -> ApiKeys {
    let key = |key: &str, user: &str, tier: &str| {
        (
            key.to_owned(),
            ApiKeyEntry {
                user: user.to_owned(),
                tier: tier.into(),
            },
        )
    };
    ApiKeys::new(
        [
            key("key-alice", "alice", "basic"),
            key("key-bob", "bob", "pro"),
            key("key-carol", "carol", "basic"),
        ],
        ClientIp::new("anonymous", trusted),
    )
}

/// The layer on the backend's store for namespace `ns`.
async fn limiter(
    backend: &Backend,
    ns: &str,
    policy: PolicyBuilder,
    trusted: TrustedProxies,
) -> RateLimitLayer<ApiKeys> {
    RateLimitLayer::builder(build(policy), api_keys(trusted))
        .decision_extension(true)
        .shared_store(backend.store(ns).await)
        .timeout(STORE_TIMEOUT)
        .on_store_error(OnStoreError::FailClosed)
        .build()
        .expect("a valid layer")
}

/// The test routes behind `Router::layer`, trusting no proxy.
async fn app(backend: &Backend, ns: &str, policy: PolicyBuilder) -> Server {
    let layer = limiter(backend, ns, policy, TrustedProxies::none()).await;
    serve(common::routes().layer(layer)).await
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// Exactly the burst of each tier passes, then 429; every caller has its own bucket.
async fn tier_bursts(b: &Backend) {
    let s = app(b, "bursts", tiers()).await;
    let start = Instant::now();
    for i in 1..=20 {
        let l = allowed(&s.get("/api/hello", ALICE).await, "basic", 20, 3600, 20 - i);
        near(l.t, 180 * i, start);
    }
    for _ in 0..2 {
        let (l, retry) = denied(&s.get("/api/hello", ALICE).await, "basic", 20, 3600);
        near(l.t, 3600, start);
        near(retry, 180, start);
    }
    // Same tier, other user: untouched by alice's 429s.
    allowed(&s.get("/api/hello", CAROL).await, "basic", 20, 3600, 19);
    let start = Instant::now();
    for i in 1..=100 {
        let l = allowed(&s.get("/api/hello", BOB).await, "pro", 100, 3600, 100 - i);
        near(l.t, 36 * i, start);
    }
    let (_, retry) = denied(&s.get("/api/hello", BOB).await, "pro", 100, 3600);
    near(retry, 36, start);
    let start = Instant::now();
    for i in 1..=5 {
        let l = allowed(
            &s.get("/api/hello", ANON).await,
            "anonymous",
            5,
            3600,
            5 - i,
        );
        near(l.t, 720 * i, start);
    }
    let (_, retry) = denied(&s.get("/api/hello", ANON).await, "anonymous", 5, 3600);
    near(retry, 720, start);
    allowed(&s.get("/api/hello", CAROL).await, "basic", 20, 3600, 18);
    denied(&s.get("/api/hello", ALICE).await, "basic", 20, 3600);
    // The state really is in Redis: alice, bob, carol and the client IP.
    if let Some(keys) = b.redis_keys("bursts") {
        assert_eq!(keys, 4, "redis keys of the namespace");
    }
}

/// `X-Api-Key` and `Authorization: Bearer` select user and tier; an unknown key is a 401 that
/// spends nothing; no key is the anonymous tier.
async fn api_keys_select_the_tier(b: &Backend) {
    let s = app(b, "keys", tiers()).await;
    allowed(&s.get("/api/hello", ALICE).await, "basic", 20, 3600, 19);
    // The bearer token is the same user: the same bucket.
    let bearer: Headers<'_> = &[("authorization", b"Bearer key-alice")];
    allowed(&s.get("/api/hello", bearer).await, "basic", 20, 3600, 18);
    let bearer_bob: Headers<'_> = &[("authorization", b"bearer key-bob")];
    allowed(&s.get("/api/hello", bearer_bob).await, "pro", 100, 3600, 99);
    allowed(&s.get("/api/hello", BOB).await, "pro", 100, 3600, 98);
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 5, 3600, 4);
    let unknown: [Headers<'_>; 5] = [
        &[("x-api-key", b"nope")],
        &[("x-api-key", b"KEY-ALICE")],
        &[("x-api-key", b"")],
        &[("authorization", b"Bearer nope")],
        &[("authorization", b"Bearer ")],
    ];
    for headers in unknown {
        for _ in 0..3 {
            unauthorized(&s.get("/api/hello", headers).await);
        }
    }
    // More than one credential is a 400: which one is meant would be a guess (an unknown
    // X-Api-Key is not rescued by a valid bearer token, nor the other way round).
    let two: [Headers<'_>; 3] = [
        &[
            ("x-api-key", b"nope"),
            ("authorization", b"Bearer key-alice"),
        ],
        &[("x-api-key", b"key-bob"), ("x-api-key", b"key-alice")],
        &[
            ("authorization", b"Bearer key-alice"),
            ("authorization", b"Bearer key-bob"),
        ],
    ];
    for headers in two {
        let reply = s.get("/api/hello", headers).await;
        assert_eq!(reply.status, 400, "{headers:?}: {reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        assert!(reply.body.contains("More than one credential"), "{reply:?}");
    }
    // The 401s spent nobody's quota: not the anonymous one, not alice's.
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 5, 3600, 3);
    allowed(&s.get("/api/hello", ALICE).await, "basic", 20, 3600, 17);
    // Basic auth is no API key: anonymous.
    let basic: Headers<'_> = &[("authorization", b"Basic YWxpY2U6c2VjcmV0")];
    allowed(&s.get("/api/hello", basic).await, "anonymous", 5, 3600, 2);
}

/// `POST /api/reports` costs 5: remaining falls by 5; a cost above what is left is a 429 that
/// charges nothing.
async fn route_costs(b: &Backend) {
    let s = app(b, "costs", tiers()).await;
    let start = Instant::now();
    for i in 1..=3 {
        let l = allowed(
            &s.post("/api/reports", ALICE).await,
            "basic",
            20,
            3600,
            20 - 5 * i,
        );
        near(l.t, 900 * i, start);
    }
    allowed(&s.get("/api/hello", ALICE).await, "basic", 20, 3600, 4);
    // 4 left, 5 needed: one more token, 180 s away.
    let (l, retry) = denied(&s.post("/api/reports", ALICE).await, "basic", 20, 3600);
    near(retry, 180, start);
    near(l.t, 16 * 180, start);
    allowed(&s.get("/api/hello", ALICE).await, "basic", 20, 3600, 3);
    // The anonymous burst holds exactly one report.
    allowed(&s.post("/api/reports", ANON).await, "anonymous", 5, 3600, 0);
    let (_, retry) = denied(&s.post("/api/reports", ANON).await, "anonymous", 5, 3600);
    near(retry, 3600, start);
}

/// `/api/search` has its own limit (3) per caller, on top of the tier (which it also charges).
async fn route_limits(b: &Backend) {
    let s = app(b, "search", tiers()).await;
    let start = Instant::now();
    for i in 1..=3 {
        let l = allowed(
            &s.get("/api/search", ALICE).await,
            "route:/api/search",
            3,
            3600,
            3 - i,
        );
        near(l.t, 1200 * i, start);
    }
    let (_, retry) = denied(
        &s.get("/api/search", ALICE).await,
        "route:/api/search",
        3,
        3600,
    );
    near(retry, 1200, start);
    // Per caller: bob's searches are his own.
    allowed(
        &s.get("/api/search", BOB).await,
        "route:/api/search",
        3,
        3600,
        2,
    );
    // Alice's three searches were charged to her tier too (the denied one was not).
    allowed(&s.get("/api/hello", ALICE).await, "basic", 20, 3600, 16);
}

/// The whole-service limit is one bucket for everyone: two users together exhaust it.
async fn global_limit(b: &Backend) {
    let s = app(b, "global", tiers().global(hourly(6))).await;
    let first = s.get("/api/whoami", ALICE).await;
    allowed(&first, "global", 6, 3600, 5);
    assert_eq!(first.body, "basic global 5");
    for i in 2..=6 {
        let who = if i % 2 == 0 { BOB } else { ALICE };
        allowed(&s.get("/api/hello", who).await, "global", 6, 3600, 6 - i);
    }
    let start = Instant::now();
    for who in [ALICE, BOB, ANON] {
        let (_, retry) = denied(&s.get("/api/hello", who).await, "global", 6, 3600);
        near(retry, 600, start);
    }
}

/// `ietf`, `legacy`, `both`, `none`: which headers an allowed and a denied response carry.
async fn header_modes(b: &Backend) {
    for mode in HeaderMode::ALL {
        // The keys' tiers are there too (the layer checks them), unused by this test.
        let policy = Policy::builder()
            .tier("anonymous", hourly(2))
            .tier("basic", hourly(20))
            .tier("pro", hourly(100))
            .headers(mode);
        let s = app(b, &format!("mode-{mode}"), policy).await;
        let start = Instant::now();
        for (status, r) in [(200, 1), (200, 0), (429, 0)] {
            let reply = s.get("/api/hello", ANON).await;
            assert_eq!(reply.status, status, "{mode}: {reply:?}");
            if mode.sends_ietf() {
                let l = reply.ietf();
                assert_eq!(
                    (l.policy.as_str(), l.q, l.w, l.r),
                    ("anonymous", 2, 3600, r),
                    "{mode}: {reply:?}"
                );
                near(
                    l.t,
                    if status == 200 { 1800 * (2 - r) } else { 3600 },
                    start,
                );
            } else {
                for name in IETF_HEADERS {
                    assert!(reply.header(name).is_none(), "{mode}: {reply:?}");
                }
            }
            if mode.sends_legacy() {
                let (limit, remaining, reset) = reply.legacy();
                assert_eq!((limit, remaining), (2, r), "{mode}: {reply:?}");
                near(
                    reset,
                    if status == 200 { 1800 * (2 - r) } else { 3600 },
                    start,
                );
            } else {
                for name in LEGACY_HEADERS {
                    assert!(reply.header(name).is_none(), "{mode}: {reply:?}");
                }
            }
            if status == 429 {
                // Every mode, `none` included, keeps Retry-After and the body.
                let retry = too_many_requests(&reply, "anonymous");
                near(retry, 1800, start);
            } else {
                assert_eq!(reply.retry_after(), None, "{mode}: {reply:?}");
            }
        }
    }
}

/// After waiting `Retry-After` seconds the same request passes.
async fn retry_after_is_honest(b: &Backend) {
    let policy = Policy::builder()
        .tier(
            "anonymous",
            Quota::per_second(1)
                .and_then(|q| q.with_burst(2))
                .expect("a quota"),
        )
        .tier("basic", hourly(20))
        .tier("pro", hourly(100));
    let s = app(b, "retry", policy).await;
    let start = Instant::now();
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 2, 2, 1);
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 2, 2, 0);
    let (l, retry) = denied(&s.get("/api/hello", ANON).await, "anonymous", 2, 2);
    assert_eq!(retry, 1, "one token, 1 s away");
    near(l.t, 2, start);
    tokio::time::sleep(Duration::from_secs(u64::try_from(retry).expect("seconds"))).await;
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 2, 2, 0);
    denied(&s.get("/api/hello", ANON).await, "anonymous", 2, 2);
}

/// `X-Forwarded-For` is ignored from an untrusted peer and believed from a trusted one.
async fn forwarded_for(b: &Backend) {
    let xff1: Headers<'_> = &[("x-forwarded-for", b"203.0.113.1")];
    let xff2: Headers<'_> = &[("x-forwarded-for", b"203.0.113.2")];

    // Untrusted: every forged address is the peer, 127.0.0.1; one bucket.
    let s = app(b, "xff-untrusted", tiers()).await;
    for i in 1..=5 {
        let forged = if i % 2 == 0 { xff1 } else { xff2 };
        allowed(
            &s.get("/api/hello", forged).await,
            "anonymous",
            5,
            3600,
            5 - i,
        );
    }
    for headers in [xff1, xff2, ANON] {
        denied(&s.get("/api/hello", headers).await, "anonymous", 5, 3600);
    }

    // Trusted: each forwarded client has its own bucket.
    let trusted = TrustedProxies::parse(["127.0.0.1/32"]).expect("a cidr");
    let layer = limiter(b, "xff-trusted", tiers(), trusted).await;
    let s = serve(common::routes().layer(layer)).await;
    for i in 1..=5 {
        allowed(
            &s.get("/api/hello", xff1).await,
            "anonymous",
            5,
            3600,
            5 - i,
        );
    }
    denied(&s.get("/api/hello", xff1).await, "anonymous", 5, 3600);
    allowed(&s.get("/api/hello", xff2).await, "anonymous", 5, 3600, 4);
    // The hop our proxy appended counts, not what the client wrote on the left.
    let chain: Headers<'_> = &[("x-forwarded-for", b"203.0.113.1, 203.0.113.2")];
    allowed(&s.get("/api/hello", chain).await, "anonymous", 5, 3600, 3);
    // Without the header: the proxy itself.
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 5, 3600, 4);
}

/// Shadow mode never denies, but its headers show the exhaustion.
async fn shadow_mode(b: &Backend) {
    let s = app(b, "shadow", tiers().shadow(true)).await;
    let start = Instant::now();
    for i in 1..=8 {
        let l = allowed(
            &s.get("/api/hello", ANON).await,
            "anonymous",
            5,
            3600,
            (5 - i).max(0),
        );
        near(l.t, 720 * i.min(5), start);
    }
    let who = s.get("/api/whoami", ANON).await;
    allowed(&who, "anonymous", 5, 3600, 0);
    assert_eq!(who.body, "anonymous anonymous 0");
}

/// An exempt path is never limited and carries no headers; unknown paths (see the module docs).
async fn exempt_and_unknown_paths(b: &Backend) {
    let policy = || {
        Policy::builder()
            .tier("anonymous", hourly(3))
            .tier("basic", hourly(20))
            .tier("pro", hourly(100))
            .exempt_path("/healthz")
    };
    let s = app(b, "paths", policy()).await;
    for _ in 0..10 {
        let reply = s.get("/healthz", ANON).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
        reply.assert_no_rate_limit_headers();
        assert_eq!(reply.retry_after(), None);
    }
    // Router::layer wraps the fallback as well: an unknown path is limited like any other.
    let unknown = s.get("/nope", ANON).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.limits().r, 2, "{unknown:?}");
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 3, 3600, 1);
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 3, 3600, 0);
    denied(&s.get("/nope", ANON).await, "anonymous", 3, 3600);
    denied(&s.get("/api/hello", ANON).await, "anonymous", 3, 3600);
    let health = s.get("/healthz", ANON).await;
    assert_eq!(health.status, 200, "{health:?}");
    health.assert_no_rate_limit_headers();

    // Router::route_layer only wraps matched routes: unknown paths are plain 404s.
    let layer = limiter(b, "paths-route-layer", policy(), TrustedProxies::none()).await;
    let s = serve(common::routes().route_layer(layer)).await;
    for _ in 0..5 {
        let reply = s.get("/nope", ANON).await;
        assert_eq!(reply.status, 404, "{reply:?}");
        reply.assert_no_rate_limit_headers();
    }
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 3, 3600, 2);
}

/// Non-UTF-8 and huge header values are answered, and the server keeps serving.
async fn hostile_headers(b: &Backend) {
    let trusted = TrustedProxies::parse(["127.0.0.1/32"]).expect("a cidr");
    let layer = limiter(b, "hostile", tiers(), trusted).await;
    let s = serve(common::routes().layer(layer)).await;
    allowed(&s.get("/api/hello", ANON).await, "anonymous", 5, 3600, 4);
    let big = vec![b'a'; 64 * 1024];
    let big_xff = "203.0.113.9, ".repeat(64 * 1024 / 13);
    let bad_keys: [Headers<'_>; 4] = [
        &[("x-api-key", b"\xff\xfe")],
        &[("x-api-key", b"key-alice\xff")],
        &[("authorization", b"Bearer \xff\xfe")],
        &[("x-api-key", &big)],
    ];
    for headers in bad_keys {
        unauthorized(&s.get("/api/hello", headers).await);
    }
    // A 64 KiB X-Forwarded-For is read from the right: its last entry, which the trusted proxy
    // appended, is the client (it used to be skipped whole, keying the request as the proxy).
    let padded: Headers<'_> = &[("x-forwarded-for", big_xff.as_bytes())];
    allowed(&s.get("/api/hello", padded).await, "anonymous", 5, 3600, 4);
    // Forwarding headers that cannot be used: the peer (the trusted proxy) is the client, so
    // these land in the same bucket as the plain request above. (`Forwarded` is not the header
    // these proxies write: never read.)
    let unusable: [Headers<'_>; 3] = [
        &[("x-forwarded-for", b"\xff")],
        &[("x-forwarded-for", b"203.0.113.9, garbage")],
        &[("forwarded", b"for=203.0.113.10")],
    ];
    for (i, headers) in (1..).zip(unusable) {
        allowed(
            &s.get("/api/hello", headers).await,
            "anonymous",
            5,
            3600,
            4 - i,
        );
    }
    // 1 MiB of headers is more than hyper reads: 431 before the limiter, nothing spent.
    let huge = vec![b'a'; 1024 * 1024];
    let reply = s.get("/api/hello", &[("x-junk", &huge)]).await;
    assert_eq!(reply.status, 431, "{reply:?}");
    reply.assert_no_rate_limit_headers();
    // A 64 KiB unrelated header is fine: the anonymous bucket's last token.
    let junk: Headers<'_> = &[("x-junk", &big)];
    allowed(&s.get("/api/hello", junk).await, "anonymous", 5, 3600, 0);
    // Still serving.
    let health = s.get("/healthz", ANON).await;
    assert_eq!(health.status, 200, "{health:?}");
    allowed(&s.get("/api/hello", ALICE).await, "basic", 20, 3600, 19);
    denied(&s.get("/api/hello", ANON).await, "anonymous", 5, 3600);
}

/// The handler sees the `RateLimitDecision` (tier, policy, remaining) in its request.
async fn decision_extension(b: &Backend) {
    let s = app(b, "whoami", tiers()).await;
    for (headers, tier, body) in [
        (ALICE, "basic", "basic basic 19"),
        (ALICE, "basic", "basic basic 18"),
        (
            &[("authorization", &b"Bearer key-bob"[..])][..],
            "pro",
            "pro pro 99",
        ),
        (ANON, "anonymous", "anonymous anonymous 4"),
    ] {
        let reply = s.get("/api/whoami", headers).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, body);
        assert_eq!(reply.limits().policy, tier);
    }
}

/// Without `decision_extension(true)` the handler finds no decision (the default: the extension
/// costs an allocation per request), but the response still carries the headers.
async fn no_decision_extension_by_default(b: &Backend) {
    let layer = RateLimitLayer::builder(build(tiers()), api_keys(TrustedProxies::none()))
        .shared_store(b.store("no-extension").await)
        .timeout(STORE_TIMEOUT)
        .build()
        .expect("a valid layer");
    let s = serve(common::routes().layer(layer)).await;
    let reply = s.get("/api/whoami", ALICE).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "none");
    assert_eq!(reply.limits().policy, "basic");
}

/// `Router::layer`, `Router::route_layer` and a `tower::ServiceBuilder` around the whole router.
async fn layer_forms(b: &Backend) {
    let policy = || {
        Policy::builder()
            .tier("anonymous", hourly(3))
            .tier("basic", hourly(20))
            .tier("pro", hourly(100))
            .exempt_path("/healthz")
    };
    let layer = |ns: &'static str| limiter(b, ns, policy(), TrustedProxies::none());
    let servers = [
        (
            "Router::layer",
            serve(common::routes().layer(layer("form-layer").await)).await,
        ),
        (
            "Router::route_layer",
            serve(common::routes().route_layer(layer("form-route-layer").await)).await,
        ),
        (
            "ServiceBuilder",
            serve(
                ServiceBuilder::new()
                    .map_response(IntoResponse::into_response)
                    .layer(layer("form-service-builder").await)
                    .service(common::routes()),
            )
            .await,
        ),
    ];
    for (form, s) in &servers {
        for i in 1..=3 {
            let reply = s.get("/api/hello", ANON).await;
            assert_eq!(reply.status, 200, "{form}: {reply:?}");
            allowed(&reply, "anonymous", 3, 3600, 3 - i);
        }
        let reply = s.get("/api/hello", ANON).await;
        assert_eq!(reply.status, 429, "{form}: {reply:?}");
        denied(&reply, "anonymous", 3, 3600);
        let who = s.get("/api/whoami", ALICE).await;
        assert_eq!(who.body, "basic basic 19", "{form}: {who:?}");
        let health = s.get("/healthz", ANON).await;
        assert_eq!(health.status, 200, "{form}: {health:?}");
        health.assert_no_rate_limit_headers();
    }
}

/// Two instances (two layers, two servers) on one store enforce one combined limit.
async fn two_instances_share_the_limit(b: &Backend) {
    let one = app(b, "shared", tiers()).await;
    let two = app(b, "shared", tiers()).await;
    for i in 1..=5 {
        let s = if i % 2 == 0 { &two } else { &one };
        allowed(
            &s.get("/api/hello", ANON).await,
            "anonymous",
            5,
            3600,
            5 - i,
        );
    }
    for s in [&one, &two] {
        denied(&s.get("/api/hello", ANON).await, "anonymous", 5, 3600);
    }
    for i in 1..=20 {
        let s = if i % 2 == 0 { &one } else { &two };
        allowed(&s.get("/api/hello", ALICE).await, "basic", 20, 3600, 20 - i);
    }
    for s in [&two, &one] {
        denied(&s.get("/api/hello", ALICE).await, "basic", 20, 3600);
    }
}

// ---------------------------------------------------------------------------------------------
// The suite, once per backend
// ---------------------------------------------------------------------------------------------

/// Runs every check against `backend`, concurrently (each in its own namespace); fails naming
/// every check that failed.
async fn suite(backend: Backend) {
    let backend = Arc::new(backend);
    let mut checks = JoinSet::new();
    let mut names = HashMap::new();
    macro_rules! spawn {
        ($($check:ident),* $(,)?) => {$(
            let b = Arc::clone(&backend);
            let handle = checks.spawn(async move { $check(&b).await });
            names.insert(handle.id(), stringify!($check));
        )*};
    }
    spawn!(
        tier_bursts,
        api_keys_select_the_tier,
        route_costs,
        route_limits,
        global_limit,
        header_modes,
        retry_after_is_honest,
        forwarded_for,
        shadow_mode,
        exempt_and_unknown_paths,
        hostile_headers,
        decision_extension,
        no_decision_extension_by_default,
        layer_forms,
        two_instances_share_the_limit,
    );
    let mut failures = Vec::new();
    while let Some(done) = checks.join_next_with_id().await {
        if let Err(e) = done {
            let name = names.get(&e.id()).copied().unwrap_or("?");
            let message = if e.is_panic() {
                let payload = e.into_panic();
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default()
            } else {
                e.to_string()
            };
            failures.push(format!("{name}: {message}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} check(s) failed on {}:\n{}",
        failures.len(),
        backend.name,
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store() {
    suite(Backend::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_single_node() {
    suite(Backend::redis().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster() {
    suite(Backend::cluster().await).await;
}

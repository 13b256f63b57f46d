//! Route shapes over real sockets, on memory, Redis and Redis Cluster: a route limit shared by
//! every caller (`shared_limit`), route limits by tier (`limits_by_tier`), and routes that
//! charge only failures (`charge: failures`). On Redis, two layers with their own connections
//! stand for two servers sharing the store.

mod common;

use axum::Router;
use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tollgate::config::Config;
use tollgate_testkit::{RedisCluster, RedisServer};

/// The backends, each with the YAML `store:` line that points at it.
enum Backend {
    Memory,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    fn redis() -> Backend {
        Backend::Redis(tokio::task::block_in_place(|| {
            RedisServer::start().expect("redis-server starts")
        }))
    }

    fn cluster() -> Backend {
        Backend::Cluster(tokio::task::block_in_place(|| {
            RedisCluster::start().expect("a redis cluster starts")
        }))
    }

    /// The `store:` section; a store failure is a 503 (`fail_closed`), so it cannot pass for a
    /// decision.
    fn store(&self) -> String {
        match self {
            Backend::Memory => "store: memory\n".to_owned(),
            Backend::Redis(server) => format!(
                "store: {{ redis: {{ url: \"{}\", prefix: \"shapes\", timeout_ms: 1000, on_error: fail_closed }} }}\n",
                server.url()
            ),
            Backend::Cluster(cluster) => format!(
                "store: {{ redis: {{ cluster: [{}], prefix: \"shapes\", timeout_ms: 1000, on_error: fail_closed }} }}\n",
                cluster
                    .urls()
                    .iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// How many servers share the state: one in memory (each process has its own), two on Redis.
    fn servers(&self) -> usize {
        match self {
            Backend::Memory => 1,
            _ => 2,
        }
    }
}

const TIERS: &str = "\
headers: both
rate_limits:
  anonymous: { requests_per_minute: 60, burst_limit: 10 }
  basic:     { requests_per_minute: 6000, burst_limit: 100 }
  pro:       { requests_per_minute: 6000, burst_limit: 100 }
api_keys:
  key-basic-1: { user: alice, tier: basic }
  key-basic-2: { user: bob,   tier: basic }
  key-pro:     { user: carol, tier: pro }
";

const ROUTES: &str = "\
routes:
  - path: /api/shared
    shared_limit: { requests_per_hour: 6, burst_limit: 6 }
  - path: /api/search
    limit: { requests_per_hour: 2, burst_limit: 2 }
    limits_by_tier:
      pro: { requests_per_hour: 5, burst_limit: 5 }
  - method: POST
    path: /api/login
    charge: failures
    limit: { requests_per_hour: 3, burst_limit: 3 }
";

/// `POST /api/login`: `password=letmein` in the query is 200, anything else 401.
async fn login(RawQuery(query): RawQuery) -> StatusCode {
    if query.as_deref() == Some("password=letmein") {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}

fn app(layer: tollgate::inbound::RateLimitLayer<tollgate::inbound::ApiKeys>) -> Router {
    Router::new()
        .route("/api/shared", get(|| async { "shared" }))
        .route("/api/search", get(|| async { "results" }))
        .route("/api/login", post(login))
        .layer(layer)
}

/// `n` servers, each with its own layer built from the same file (its own store connection).
async fn servers(backend: &Backend, n: usize) -> Vec<common::TestServer> {
    let text = format!("{}{TIERS}{ROUTES}", backend.store());
    let config = Config::parse(&text, "limits.yaml").expect("the test config loads");
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(common::serve(app(config.layer().expect("a layer"))).await);
    }
    out
}

async fn get_status(
    client: &reqwest::Client,
    server: &common::TestServer,
    path: &str,
    key: &str,
) -> reqwest::Response {
    client
        .get(server.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .expect("a response")
}

async fn two_callers_share_one_route_limit(backend: Backend) {
    let servers = servers(&backend, backend.servers()).await;
    let client = common::client();
    let mut admitted = 0;
    let mut last_denial = None;
    for i in 0..12 {
        // Alice and Bob take turns, each on "their" server.
        let (key, server) = if i % 2 == 0 {
            ("key-basic-1", &servers[0])
        } else {
            ("key-basic-2", &servers[servers.len() - 1])
        };
        let r = get_status(&client, server, "/api/shared", key).await;
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => last_denial = Some(r.text().await.unwrap()),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 6, "the route's shared burst, across both callers");
    let body = last_denial.expect("a denial");
    assert!(body.contains("shared:/api/shared"), "{body}");
    // Each caller's own tier is nearly untouched: the limit was the route's.
    let r = get_status(&client, &servers[0], "/api/search", "key-basic-1").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limit_memory() {
    two_callers_share_one_route_limit(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limit_redis_two_servers() {
    two_callers_share_one_route_limit(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limit_cluster_two_servers() {
    two_callers_share_one_route_limit(Backend::cluster()).await;
}

async fn tiers_get_their_own_route_limits(backend: Backend) {
    let servers = servers(&backend, 1).await;
    let client = common::client();
    for (key, expected, q) in [("key-basic-1", 2, "2"), ("key-pro", 5, "5")] {
        let mut admitted = 0;
        for _ in 0..8 {
            let r = get_status(&client, &servers[0], "/api/search", key).await;
            match r.status().as_u16() {
                200 => admitted += 1,
                429 => {
                    let policy = r.headers()["ratelimit-policy"].to_str().unwrap().to_owned();
                    assert!(
                        policy.starts_with("\"route:/api/search\"")
                            && policy.contains(&format!(";q={q};")),
                        "{key}: {policy}"
                    );
                }
                other => panic!("unexpected status {other}"),
            }
        }
        assert_eq!(admitted, expected, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_by_tier_memory() {
    tiers_get_their_own_route_limits(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_by_tier_redis() {
    tiers_get_their_own_route_limits(Backend::redis()).await;
}

async fn only_failures_are_charged(backend: Backend) {
    let servers = servers(&backend, backend.servers()).await;
    let client = common::client();
    let login = |server: &common::TestServer, password: &str| {
        client
            .post(server.url(&format!("/api/login?password={password}")))
            .header("x-api-key", "key-basic-1")
            .send()
    };
    for i in 0..10 {
        let r = login(&servers[i % servers.len()], "letmein").await.unwrap();
        assert_eq!(r.status(), 200, "correct login {i}");
    }
    let mut statuses = Vec::new();
    for i in 0..4 {
        let r = login(&servers[i % servers.len()], "guess").await.unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
    // Nothing left: even the right password waits now.
    let r = login(&servers[0], "letmein").await.unwrap();
    assert_eq!(r.status(), 429);
    let body = r.text().await.unwrap();
    assert!(body.contains("route:POST /api/login"), "{body}");
    // Another caller is not affected.
    let r = client
        .post(servers[0].url("/api/login?password=guess"))
        .header("x-api-key", "key-basic-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charge_failures_memory() {
    only_failures_are_charged(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charge_failures_redis_two_servers() {
    only_failures_are_charged(Backend::redis()).await;
}

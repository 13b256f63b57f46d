//! Adaptive limits over a real socket: while the test drives the handler's latency and the
//! requests in flight above the targets, the lowest-priority tier's effective quota (the `q` of
//! `RateLimit-Policy`, and the gauge `rate_limiter_adaptive_factor`) falls first, the next tier
//! only once the first is at its floor; after the load ends they come back in reverse order, and
//! never above the configured quota.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use tollgate::config::Config;

const CONFIG: &str = "\
store: memory
headers: ietf
rate_limits:
  anonymous: { requests_per_second: 1000, burst_limit: 1000 }
  basic:     { requests_per_minute: 6000, burst_limit: 100 }
  pro:       { requests_per_minute: 6000, burst_limit: 100 }
api_keys:
  key-basic: { user: alice, tier: basic }
  key-pro:   { user: carol, tier: pro }
adaptive:
  target_latency: 50ms
  max_in_flight: 4
  quantile: 0.5
  interval: 100ms
  decrease: 0.5
  increase: 0.3
  min_factor: 0.1
  priority: [basic, pro]
";

/// The `q` of the `RateLimit-Policy` a caller with `key` is shown now.
async fn quota(client: &reqwest::Client, server: &common::TestServer, key: &str) -> i64 {
    let r = client
        .get(server.url("/api/hello"))
        .header("x-api-key", key)
        .send()
        .await
        .expect("a response");
    assert_eq!(r.status(), 200, "{key} is never denied here");
    let policy = r.headers()["ratelimit-policy"].to_str().unwrap().to_owned();
    common::sf_member(&policy).params["q"]
}

/// The gauges `rate_limiter_adaptive_factor{tier}` recorded since the last snapshot, by tier
/// (the controller sets every tier's at each change).
fn factors() -> std::collections::HashMap<String, f64> {
    use metrics_util::debugging::DebugValue;
    common::snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let key = key.key();
            let tier = key.labels().find(|l| l.key() == "tier")?.value().to_owned();
            match value {
                DebugValue::Gauge(v) if key.name() == "rate_limiter_adaptive_factor" => {
                    Some((tier, v.into_inner()))
                }
                _ => None,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lowest_tier_falls_first_and_everything_recovers() {
    common::snapshotter();
    let config = Config::parse(CONFIG, "limits.yaml").expect("the config loads");
    let app = Router::new()
        .route("/api/hello", get(|| async { "hello" }))
        .route(
            "/api/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(120)).await;
                "slow"
            }),
        )
        .layer(config.layer().expect("a layer"));
    let server = Arc::new(common::serve(app).await);
    let client = common::client();
    assert_eq!(quota(&client, &server, "key-basic").await, 100);
    assert_eq!(quota(&client, &server, "key-pro").await, 100);

    // Load: anonymous callers (a tier the controller never lowers) keep 16 slow requests in
    // flight.
    let loading = Arc::new(AtomicBool::new(true));
    let mut load = Vec::new();
    for _ in 0..16 {
        let (client, server, loading) = (client.clone(), Arc::clone(&server), Arc::clone(&loading));
        load.push(tokio::spawn(async move {
            while loading.load(Ordering::Relaxed) {
                let r = client.get(server.url("/api/slow")).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut basic_seen = Vec::new();
    let mut pro_fell = false;
    while Instant::now() < deadline {
        let basic = quota(&client, &server, "key-basic").await;
        let pro = quota(&client, &server, "key-pro").await;
        basic_seen.push(basic);
        assert!(
            basic <= 100 && pro <= 100,
            "never above the quota: {basic} {pro}"
        );
        if pro < 100 {
            assert_eq!(
                basic, 10,
                "pro fell while basic ({basic}) was above its floor"
            );
            pro_fell = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pro_fell, "pro never fell; basic went {basic_seen:?}");
    assert!(
        basic_seen.iter().any(|&q| q < 100 && q > 10),
        "basic fell in steps: {basic_seen:?}"
    );
    let gauges = factors();
    assert!((gauges["basic"] - 0.1).abs() < 1e-6, "{gauges:?}");
    assert!(gauges["pro"] < 1.0, "{gauges:?}");

    loading.store(false, Ordering::Relaxed);
    for task in load {
        task.await.expect("a load task");
    }

    // Calm: pro comes back first, then basic, to the full quota.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut recovered = false;
    while Instant::now() < deadline {
        let basic = quota(&client, &server, "key-basic").await;
        let pro = quota(&client, &server, "key-pro").await;
        assert!(
            basic <= 100 && pro <= 100,
            "never above the quota: {basic} {pro}"
        );
        if basic > 10 {
            assert_eq!(pro, 100, "basic ({basic}) rose before pro was whole");
        }
        if basic == 100 && pro == 100 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the quotas did not come back");
    assert!(
        common::poll_until(Duration::from_secs(2), || {
            factors().get("basic") == Some(&1.0)
        })
        .await,
        "the gauge follows"
    );
}

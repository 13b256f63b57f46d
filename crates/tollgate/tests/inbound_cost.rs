//! A request costing more than its tier can ever hold is answered 403 (waiting would never help),
//! and a denial by several limits names every one of them.

mod common;

use std::time::Duration;

use http::Method;
use tollgate::core::Quota;
use tollgate::http::TrustedProxies;
use tollgate::inbound::{ClientIp, Policy, RateLimitLayer, Route};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_above_the_capacity_is_403_not_429() {
    let policy = Policy::builder()
        .tier("tiny", Quota::per_hour(3).unwrap())
        .route(Route::new("/api/reports").method(Method::POST).cost(5))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy, ClientIp::new("tiny", TrustedProxies::none()))
        .build()
        .expect("a valid layer");
    let server = common::serve(common::routes().layer(layer)).await;
    let client = common::client();
    let r = client
        .post(server.url("/api/reports"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("retry-after").is_none());
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], 403);
    assert!(
        body["detail"].as_str().unwrap().contains("costs 5"),
        "{body}"
    );
    // Nothing was spent: the tier still holds 3.
    let r = client.get(server.url("/api/hello")).send().await.unwrap();
    assert_eq!(r.headers()["x-ratelimit-remaining"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_violated_policy_is_named() {
    let policy = Policy::builder()
        .tier("t", Quota::per_hour(2).unwrap())
        .global(Quota::per_hour(2).unwrap())
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy, ClientIp::new("t", TrustedProxies::none()))
        .denied_cache(None)
        .build()
        .expect("a valid layer");
    let server = common::serve(common::routes().layer(layer)).await;
    let client = common::client();
    for _ in 0..2 {
        assert_eq!(
            client
                .get(server.url("/api/hello"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let r = client.get(server.url("/api/hello")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= Duration::from_secs(1790).as_secs(), "{retry}");
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        body["violated-policies"],
        serde_json::json!(["t", "global"])
    );
}

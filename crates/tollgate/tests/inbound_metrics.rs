//! The inbound layer's metrics (contract names and labels) match what clients saw, exactly.
//!
//! A [`DebuggingRecorder`] is installed globally, once, in this binary; its snapshots drain the
//! counters, so every metric assertion lives in the one test below.

mod common;

use std::collections::{BTreeMap, HashMap};

use axum::Extension;
use axum::http::Method;
use axum::routing::get;
use metrics_util::debugging::DebugValue;
use tollgate::core::Quota;
use tollgate::inbound::{Policy, RateLimitDecision, RateLimitLayer, Route};
use tollgate::metrics as m;

/// The routes of the example, plus `/api/outcome`: says whether the layer allowed the request
/// (`allowed`) or only let it through in shadow mode (`shadow_limited`).
fn app() -> axum::Router {
    common::routes().route(
        "/api/outcome",
        get(|Extension(d): Extension<RateLimitDecision>| async move {
            if d.decision.is_allowed() {
                "allowed"
            } else {
                "shadow_limited"
            }
        }),
    )
}

/// What the client saw, per tier: outcome counts, tokens spent, and how many requests a store
/// was asked about (all but the cached repeat denials).
#[derive(Debug, Default)]
struct Tally {
    outcomes: BTreeMap<(String, &'static str), u64>,
    tokens: BTreeMap<String, u64>,
    breaches: BTreeMap<String, u64>,
    store_calls: u64,
    /// Whether the last answer for a (user, route) was a 429, for the cache rule.
    denied: HashMap<(String, String), bool>,
}

impl Tally {
    async fn send(
        &mut self,
        client: &reqwest::Client,
        server: &common::TestServer,
        (method, path, cost): (&str, &str, u64),
        user: &str,
        tier: &str,
    ) -> u16 {
        let request = match method {
            "POST" => client.post(server.url(path)),
            _ => client.get(server.url(path)),
        };
        let response = request
            .header("x-user", user)
            .header("x-tier", tier)
            .send()
            .await
            .expect("the server answers");
        let status = response.status().as_u16();
        let body = response.text().await.expect("a body");
        let outcome = match status {
            200 if body == "shadow_limited" => "shadow_limited",
            200 => "allowed",
            429 => "limited",
            other => panic!("unexpected {other}: {body}"),
        };
        *self.outcomes.entry((tier.to_owned(), outcome)).or_default() += 1;
        if outcome == "allowed" {
            *self.tokens.entry(tier.to_owned()).or_default() += cost;
        }
        let was_denied = self
            .denied
            .insert((user.to_owned(), format!("{method} {path}")), status == 429)
            .unwrap_or(false);
        if status == 429 {
            *self.breaches.entry(tier.to_owned()).or_default() += 1;
        }
        // A repeat denial of the same caller and route is answered by the denied-until cache
        // (the quotas here refill in minutes, far beyond this test).
        if !(status == 429 && was_denied) {
            self.store_calls += 1;
        }
        status
    }
}

/// `(name, labels)` → counter value, gauge or histogram samples, from one snapshot.
type Metrics = HashMap<(String, BTreeMap<String, String>), DebugValue>;

fn collect() -> Metrics {
    common::snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

fn counter(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    match metrics.get(&(name.to_owned(), labels)) {
        Some(DebugValue::Counter(n)) => *n,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
        None => 0,
    }
}

const HELLO: (&str, &str, u64) = ("GET", "/api/hello", 1);
const REPORT: (&str, &str, u64) = ("POST", "/api/reports", 3);
const OUTCOME: (&str, &str, u64) = ("GET", "/api/outcome", 1);

#[tokio::test]
async fn metrics_match_the_responses() {
    let _ = common::snapshotter();
    // Nothing was recorded before the requests below.
    assert!(collect().is_empty());

    let per_hour = |n: u32, burst: u32| Quota::per_hour(n).unwrap().with_burst(burst).unwrap();
    let enforcing = Policy::builder()
        .tier("m-basic", per_hour(5, 5))
        .tier("m-pro", per_hour(100, 100))
        .route(Route::new("/api/reports").method(Method::POST).cost(3))
        .exempt_path("/healthz")
        .build()
        .unwrap();
    let shadow = Policy::builder()
        .tier("m-shadow", per_hour(2, 2))
        .shadow(true)
        .build()
        .unwrap();
    let enforcing = common::serve(
        app().layer(
            RateLimitLayer::builder(enforcing, common::by_header)
                .decision_extension(true)
                .build()
                .expect("a valid layer"),
        ),
    )
    .await;
    let shadow = common::serve(
        app().layer(
            RateLimitLayer::builder(shadow, common::by_header)
                .decision_extension(true)
                .build()
                .expect("a valid layer"),
        ),
    )
    .await;
    let client = common::client();
    let mut tally = Tally::default();

    // Basic user a: 5 allowed, then 3 denials (the last two from the cache).
    for i in 0..8 {
        let status = tally.send(&client, &enforcing, HELLO, "a", "m-basic").await;
        assert_eq!(status, if i < 5 { 200 } else { 429 });
    }
    // Basic user b: one report (cost 3 of 5), a second does not fit, nor a third (cached); the
    // 2 tokens left still pass 2 hellos, then a third is denied.
    for expected in [200, 429, 429] {
        assert_eq!(
            tally
                .send(&client, &enforcing, REPORT, "b", "m-basic")
                .await,
            expected
        );
    }
    for expected in [200, 200, 429] {
        assert_eq!(
            tally.send(&client, &enforcing, HELLO, "b", "m-basic").await,
            expected
        );
    }
    // Pro user c: everything passes.
    for _ in 0..4 {
        assert_eq!(
            tally.send(&client, &enforcing, HELLO, "c", "m-pro").await,
            200
        );
    }
    assert_eq!(
        tally.send(&client, &enforcing, REPORT, "c", "m-pro").await,
        200
    );
    // Shadow: 2 allowed, then 3 that would have been denied pass too.
    for i in 0u64..5 {
        assert_eq!(
            tally.send(&client, &shadow, OUTCOME, "s", "m-shadow").await,
            200
        );
        let shadowed = tally.outcomes.get(&("m-shadow".into(), "shadow_limited"));
        assert_eq!(shadowed.copied().unwrap_or(0), i.saturating_sub(1));
    }
    // Exempt: not counted anywhere.
    for _ in 0..3 {
        let response = client.get(enforcing.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }

    let metrics = collect();
    let mut checked = 0;
    for tier in ["m-basic", "m-pro", "m-shadow"] {
        for outcome in ["allowed", "limited", "shadow_limited", "store_error"] {
            let seen = tally
                .outcomes
                .get(&(tier.to_owned(), outcome))
                .copied()
                .unwrap_or(0);
            let recorded = counter(
                &metrics,
                m::REQUESTS_TOTAL,
                &[("tier", tier), ("outcome", outcome)],
            );
            assert_eq!(recorded, seen, "{} {tier} {outcome}", m::REQUESTS_TOTAL);
            checked += seen;
        }
        let tokens = tally.tokens.get(tier).copied().unwrap_or(0);
        assert_eq!(
            counter(&metrics, m::TOKENS_CONSUMED_TOTAL, &[("tier", tier)]),
            tokens,
            "{} {tier}",
            m::TOKENS_CONSUMED_TOTAL
        );
        let breaches = tally.breaches.get(tier).copied().unwrap_or(0);
        assert_eq!(
            counter(&metrics, m::BREACHES_TOTAL, &[("tier", tier)]),
            breaches,
            "{} {tier}",
            m::BREACHES_TOTAL
        );
    }
    // Every request was counted once, under its own tier (exempt ones not at all).
    assert_eq!(checked, 8 + 6 + 5 + 5);
    let total: u64 = metrics
        .iter()
        .filter(|((name, _), _)| name == m::REQUESTS_TOTAL)
        .map(|(_, v)| match v {
            DebugValue::Counter(n) => *n,
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(total, checked);

    // The numbers themselves, as worked out in the comments above.
    let count = |tier: &str, outcome: &'static str| {
        counter(
            &metrics,
            m::REQUESTS_TOTAL,
            &[("tier", tier), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (count("m-basic", "allowed"), count("m-basic", "limited")),
        (8, 6)
    );
    assert_eq!(
        (count("m-pro", "allowed"), count("m-pro", "limited")),
        (5, 0)
    );
    assert_eq!(
        (
            count("m-shadow", "allowed"),
            count("m-shadow", "shadow_limited"),
            count("m-shadow", "limited")
        ),
        (2, 3, 0)
    );
    let tokens = |tier| counter(&metrics, m::TOKENS_CONSUMED_TOTAL, &[("tier", tier)]);
    assert_eq!(
        (tokens("m-basic"), tokens("m-pro"), tokens("m-shadow")),
        (5 + 3 + 2, 4 + 3, 2)
    );
    let breaches = |tier| counter(&metrics, m::BREACHES_TOTAL, &[("tier", tier)]);
    assert_eq!(
        (breaches("m-basic"), breaches("m-pro"), breaches("m-shadow")),
        (6, 0, 0)
    );

    // One latency sample per store call: every request but the cached repeat denials.
    let latency = metrics
        .get(&(
            m::STORE_LATENCY_SECONDS.to_owned(),
            BTreeMap::from([("store".to_owned(), "memory".to_owned())]),
        ))
        .expect("store latency for the memory store");
    let DebugValue::Histogram(samples) = latency else {
        panic!("not a histogram: {latency:?}");
    };
    assert_eq!(samples.len() as u64, tally.store_calls, "{samples:?}");
    assert_eq!(tally.store_calls, 8 + 6 + 5 + 5 - 3);
    assert!(
        samples.iter().all(|s| s.0 >= 0.0 && s.0 < 1.0),
        "{samples:?}"
    );
    // The memory store never fails, and nothing here has a breaker to open.
    assert_eq!(
        counter(&metrics, m::STORE_ERRORS_TOTAL, &[("store", "memory")]),
        0
    );
    let names: Vec<_> = metrics.keys().map(|(name, _)| name.as_str()).collect();
    assert!(
        names.iter().all(|n| [
            m::REQUESTS_TOTAL,
            m::TOKENS_CONSUMED_TOTAL,
            m::BREACHES_TOTAL,
            m::STORE_LATENCY_SECONDS
        ]
        .contains(n)),
        "{names:?}"
    );
}

//! A shaping (leaky-bucket) tier holds requests back instead of denying them: each leaves at the
//! tier's spacing, up to its `max_delay`; beyond that the caller gets a 429. Checked over real
//! sockets with a built-in extractor (decided in `call`) and with a closure extractor (decided in
//! the response future), which must behave alike.

mod common;

use std::future::ready;
use std::time::{Duration, Instant};

use http::Request;
use tollgate::core::Quota;
use tollgate::inbound::{Global, Identity, Policy, RateLimitLayer, Rejection};

/// 10 per second, shaped: one now and two more queued 100 ms apart (a 250 ms wait at most).
fn shaping_policy() -> Policy {
    let quota = Quota::per_second(10)
        .and_then(|q| q.shaped(Duration::from_millis(250)))
        .expect("quota");
    assert_eq!(quota.limit(), 3);
    Policy::builder()
        .tier("shaped", quota)
        .build()
        .expect("policy")
}

/// Sends `n` requests at once; answers each one's status and when it came back, from one start.
async fn burst(server: &common::TestServer, n: usize) -> Vec<(u16, Duration)> {
    let client = common::client();
    let start = Instant::now();
    let calls = (0..n).map(|_| {
        let request = client.get(server.url("/api/hello"));
        async move {
            let response = request.send().await.expect("the server answers");
            (response.status().as_u16(), start.elapsed())
        }
    });
    all_at_once(calls).await
}

/// Joins the calls (spawned, so they are in flight together).
async fn all_at_once<F>(calls: impl Iterator<Item = F>) -> Vec<(u16, Duration)>
where
    F: std::future::Future<Output = (u16, Duration)> + Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("the call task"));
    }
    out
}

/// The allowed requests leave 100 ms apart at the earliest, and the ones beyond the queue are
/// denied at once with a Retry-After rather than held.
fn check(label: &str, answers: &[(u16, Duration)]) {
    let mut allowed: Vec<Duration> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, at)| *at)
        .collect();
    allowed.sort();
    let denied = answers.iter().filter(|(status, _)| *status == 429).count();
    assert_eq!(
        allowed.len() + denied,
        answers.len(),
        "{label}: only 200 and 429 expected: {answers:?}"
    );
    assert!(
        allowed.len() >= 3,
        "{label}: the queue admits 3: {answers:?}"
    );
    assert!(
        denied >= 1,
        "{label}: 6 at once overflow a queue of 3: {answers:?}"
    );
    // The k-th allowed request cannot come back before k spacings after the first one left.
    for (k, at) in allowed.iter().enumerate() {
        let earliest = Duration::from_millis(100) * u32::try_from(k).expect("small");
        assert!(
            *at + Duration::from_millis(5) >= earliest,
            "{label}: allowed request {k} came back after {at:?}, before its turn at {earliest:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shaped_tier_delays_then_denies_with_a_built_in_extractor() {
    let layer = RateLimitLayer::builder(shaping_policy(), Global::new("shaped"))
        .build()
        .expect("a valid layer");
    let server = common::serve(common::routes().layer(layer)).await;
    let answers = burst(&server, 6).await;
    check("Global", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shaped_tier_delays_then_denies_with_a_closure_extractor() {
    let extractor = |_: &Request<axum::body::Body>| {
        ready(Ok::<_, Rejection>(Identity::new("everyone", "shaped")))
    };
    let layer = RateLimitLayer::builder(shaping_policy(), extractor)
        .build()
        .expect("a valid layer");
    let server = common::serve(common::routes().layer(layer)).await;
    let answers = burst(&server, 6).await;
    check("closure", &answers);
}

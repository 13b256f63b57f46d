//! A configuration reload on a running layer: [`PolicyHandle::set`] and
//! [`ApiKeys::replace_with`] reach every service the layer made and every clone of them, at once,
//! while requests keep flowing from other threads; the bucket state stays.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::{Request, Response, StatusCode};
use tollgate::core::Quota;
use tollgate::http::TrustedProxies;
use tollgate::inbound::{ApiKeyEntry, ApiKeys, ClientIp, PeerAddr, Policy, RateLimitLayer};
use tower::{Layer, ServiceExt};

fn keys(entries: &[(&str, &str, &str)], anonymous: &str) -> ApiKeys {
    ApiKeys::new(
        entries.iter().map(|(key, user, tier)| {
            (
                (*key).to_owned(),
                ApiKeyEntry {
                    user: (*user).to_owned(),
                    tier: (*tier).into(),
                },
            )
        }),
        ClientIp::new(anonymous, TrustedProxies::none()),
    )
}

fn policy(anonymous: u32, shadow: bool) -> Policy {
    Policy::builder()
        .tier("anonymous", Quota::per_hour(anonymous).expect("quota"))
        .tier("guest", Quota::per_hour(1).expect("quota"))
        .tier("basic", Quota::per_hour(100).expect("quota"))
        .shadow(shadow)
        .build()
        .expect("policy")
}

/// A request from 203.0.113.9, with an API key or none.
fn request(api_key: Option<&str>) -> Request<()> {
    request_from(api_key, "203.0.113.9:4000")
}

fn request_from(api_key: Option<&str>, peer: &str) -> Request<()> {
    let mut request = Request::new(());
    *request.uri_mut() = "/api/hello".parse().expect("a URI");
    if let Some(key) = api_key {
        request
            .headers_mut()
            .insert("x-api-key", key.parse().expect("a header value"));
    }
    request
        .extensions_mut()
        .insert(PeerAddr(peer.parse().expect("an address")));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_every_service_and_clone_at_once() {
    let running = keys(&[("key-alice", "alice", "basic")], "anonymous");
    let layer = RateLimitLayer::builder(policy(1, false), running.clone())
        .build()
        .expect("a valid layer");
    let inner =
        tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let service = layer.layer(inner);
    let status = |service: &_, key| {
        let service: &tollgate::inbound::RateLimit<_, ApiKeys> = service;
        let service = service.clone();
        async move {
            service
                .oneshot(request(key))
                .await
                .expect("infallible")
                .status()
        }
    };

    // Before: alice is known, bob is not; the anonymous caller has one request an hour.
    assert_eq!(status(&service, Some("key-alice")).await, StatusCode::OK);
    assert_eq!(
        status(&service, Some("key-bob")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(status(&service, None).await, StatusCode::OK);
    assert_eq!(status(&service, None).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(&*running.anonymous_tier(), "anonymous");

    // Requests keep coming from other tasks (another caller) during the reloads below: none may
    // fail for it.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut background = Vec::new();
    for _ in 0..2 {
        let (service, stop, served) = (service.clone(), Arc::clone(&stop), Arc::clone(&served));
        background.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let reply = service
                    .clone()
                    .oneshot(request_from(None, "198.51.100.7:4000"))
                    .await
                    .expect("infallible");
                // Denied, or let through in shadow mode: never an error of the reload.
                assert!(
                    matches!(
                        reply.status(),
                        StatusCode::OK | StatusCode::TOO_MANY_REQUESTS
                    ),
                    "{}",
                    reply.status()
                );
                served.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }));
    }

    served_more(&served, 10).await;

    // New keys: bob in, alice out, callers without a key now `guest`, for every clone of the
    // extractor (the one inside the layer included).
    running.replace_with(&keys(&[("key-bob", "bob", "basic")], "guest"));
    assert_eq!(&*running.anonymous_tier(), "guest");
    let clone = service.clone();
    assert_eq!(status(&clone, Some("key-bob")).await, StatusCode::OK);
    assert_eq!(
        status(&service, Some("key-alice")).await,
        StatusCode::UNAUTHORIZED
    );
    // The guest tier's own bucket: one request, then denied.
    assert_eq!(status(&service, None).await, StatusCode::OK);
    assert_eq!(status(&clone, None).await, StatusCode::TOO_MANY_REQUESTS);

    // A new policy: shadow mode lets the denied caller through, with the same bucket state.
    layer.policy().set(policy(1, true));
    assert!(layer.policy().get().is_shadow());
    assert_eq!(status(&clone, None).await, StatusCode::OK);
    // And back: the bucket was kept, so the caller is denied again.
    layer.policy().set(policy(1, false));
    assert_eq!(status(&service, None).await, StatusCode::TOO_MANY_REQUESTS);

    served_more(&served, 10).await;
    stop.store(true, Ordering::Relaxed);
    for task in background {
        task.await.expect("a background task");
    }
}

/// Waits until the background tasks have served `n` more requests (they run while the test
/// reloads, not only before or after).
async fn served_more(served: &AtomicU64, n: u64) {
    let target = served.load(Ordering::Relaxed) + n;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while served.load(Ordering::Relaxed) < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the background requests stalled at {}",
            served.load(Ordering::Relaxed)
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

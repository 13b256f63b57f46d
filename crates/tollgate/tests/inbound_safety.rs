//! The inbound layer set up wrongly or fed hostile input, over real sockets (issue 12): a server
//! that gives no peer address, extractors naming tiers the policy lacks, header keys that must
//! not collide.

mod common;

use std::time::Duration;

use tollgate::core::Quota;
use tollgate::http::TrustedProxies;
use tollgate::inbound::{
    ApiKeyEntry, ApiKeys, BuildError, ClientIp, Global, HeaderValueKey, Policy, RateLimitLayer,
};

fn policy() -> Policy {
    Policy::builder()
        .tier("anonymous", Quota::per_hour(3).expect("quota"))
        .tier("basic", Quota::per_hour(20).expect("quota"))
        .build()
        .expect("policy")
}

/// The tests that read metrics take turns (a snapshot drains every metric).
static METRICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `rate_limiter_misconfigured_total{reason}` since the last snapshot of this binary's recorder.
fn misconfigured(reason: &str) -> u64 {
    common::counter("rate_limiter_misconfigured_total", &[("reason", reason)])
}

/// Defect 3: without a peer address every anonymous caller used to share the key `ip:0.0.0.0`,
/// silently. Now it is a 500 naming the fix, counted, unless a shared key was chosen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_peer_addresses_is_told_so() {
    let _turn = METRICS.lock().await;
    let _ = common::snapshotter().snapshot();
    let layer =
        RateLimitLayer::builder(policy(), ClientIp::new("anonymous", TrustedProxies::none()))
            .build()
            .expect("a valid layer");
    let server = common::serve_plain(common::routes().layer(layer)).await;
    let client = common::client();
    for _ in 0..5 {
        let reply = client
            .get(server.url("/api/hello"))
            .send()
            .await
            .expect("an answer");
        assert_eq!(reply.status(), 500);
        assert_eq!(reply.headers()["content-type"], "application/problem+json");
        let body = reply.text().await.expect("a body");
        assert!(
            body.contains("into_make_service_with_connect_info"),
            "{body}"
        );
        assert!(body.contains("fallback_key"), "{body}");
    }
    assert_eq!(misconfigured("no_peer_address"), 5);

    // The opt-in: such callers share one key, and are limited together (3 an hour).
    let layer = RateLimitLayer::builder(
        policy(),
        ClientIp::new("anonymous", TrustedProxies::none()).fallback_key("ip:unknown"),
    )
    .build()
    .expect("a valid layer");
    let server = common::serve_plain(common::routes().layer(layer)).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = client
            .get(server.url("/api/hello"))
            .send()
            .await
            .expect("an answer");
        statuses.push(reply.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
}

/// Defect 8: a tier the policy lacks, in the built-in extractors, is a `build()` error instead of
/// a 401 on every request; an empty API key too.
#[test]
fn extractors_are_checked_against_the_policy() {
    let entry = |user: &str, tier: &str| ApiKeyEntry {
        user: user.into(),
        tier: tier.into(),
    };
    let anonymous = || ClientIp::new("anonymous", TrustedProxies::none());
    let keys = ApiKeys::new([("k1".to_owned(), entry("alice", "platinum"))], anonymous());
    match RateLimitLayer::builder(policy(), keys).build() {
        Err(BuildError::UnknownTier { tier, used_by }) => {
            assert_eq!(tier, "platinum");
            assert!(used_by.contains("alice"), "{used_by}");
        }
        other => panic!("{other:?}"),
    }
    let keys = ApiKeys::new(
        [("k1".to_owned(), entry("alice", "basic"))],
        ClientIp::new("nobody", TrustedProxies::none()),
    );
    assert!(matches!(
        RateLimitLayer::builder(policy(), keys).build(),
        Err(BuildError::UnknownTier { tier, .. }) if tier == "nobody"
    ));
    for bad in ["", " k1", "k1\t"] {
        let keys = ApiKeys::new([(bad.to_owned(), entry("alice", "basic"))], anonymous());
        let e = RateLimitLayer::builder(policy(), keys)
            .build()
            .expect_err("an invalid key");
        assert!(matches!(e, BuildError::InvalidApiKey { .. }), "{e}");
        assert!(e.to_string().contains("alice"), "{e}");
    }
    assert!(
        RateLimitLayer::builder(policy(), ClientIp::new("gold", TrustedProxies::none()))
            .build()
            .is_err()
    );
    assert!(
        RateLimitLayer::builder(policy(), Global::new("gold"))
            .build()
            .is_err()
    );
    let header = HeaderValueKey::new(
        http::HeaderName::from_static("x-user"),
        ClientIp::new("gold", TrustedProxies::none()),
    );
    assert!(RateLimitLayer::builder(policy(), header).build().is_err());
    // The right ones build.
    let keys = ApiKeys::new([("k1".to_owned(), entry("alice", "basic"))], anonymous());
    assert!(RateLimitLayer::builder(policy(), keys).build().is_ok());
}

/// An extractor of the user's own that returns a tier the policy lacks: a 500 saying so, counted,
/// never a 401 blaming the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_tier_at_run_time_is_a_server_error() {
    let _turn = METRICS.lock().await;
    let _ = common::snapshotter().snapshot();
    let layer = RateLimitLayer::builder(policy(), common::by_header)
        .build()
        .expect("closures cannot be checked when building");
    let server = common::serve(common::routes().layer(layer)).await;
    let reply = common::client()
        .get(server.url("/api/hello"))
        .header("x-user", "u")
        .header("x-tier", "platinum")
        .send()
        .await
        .expect("an answer");
    assert_eq!(reply.status(), 500);
    let body = reply.text().await.expect("a body");
    assert!(body.contains("`platinum`"), "{body}");
    assert_eq!(misconfigured("unknown_tier"), 1);
}

/// Defect 6: header keys are lossless: values that differ only in bytes a lossy decoding turns
/// into U+FFFD have buckets of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_keys_never_collide() {
    let policy = Policy::builder()
        .tier("t", Quota::per_hour(1).expect("quota"))
        .build()
        .expect("policy");
    let extractor = HeaderValueKey::new(
        http::HeaderName::from_static("x-user"),
        ClientIp::new("t", TrustedProxies::none()),
    );
    let layer = RateLimitLayer::builder(policy, extractor)
        .build()
        .expect("a valid layer");
    let server = common::serve(common::routes().layer(layer)).await;
    let addr = server.addr;
    let values: [&[u8]; 3] = [b"a\xffb", b"a\xfeb", "a\u{FFFD}b".as_bytes()];
    for value in values {
        // Raw bytes on the wire: an HTTP client library would refuse to send some of them.
        let status = tokio::task::spawn_blocking(move || raw_get(addr, value))
            .await
            .expect("the request thread");
        assert_eq!(status, 200, "{value:?} shared another value's bucket");
    }
    let again = tokio::task::spawn_blocking(move || raw_get(addr, b"a\xffb"))
        .await
        .expect("the request thread");
    assert_eq!(again, 429, "the same value twice is the same bucket");
}

/// `GET /api/hello` with `X-User: <value>` written byte for byte; the response's status.
fn raw_get(addr: std::net::SocketAddr, value: &[u8]) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request =
        b"GET /api/hello HTTP/1.1\r\nhost: test\r\nconnection: close\r\nx-user: ".to_vec();
    request.extend_from_slice(value);
    request.extend_from_slice(b"\r\n\r\n");
    stream.write_all(&request).expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let head = String::from_utf8_lossy(&response);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head}"))
}

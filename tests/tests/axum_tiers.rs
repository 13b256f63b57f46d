//! End-to-end tests of the `axum-tiers` example server: the real binary, started on a free
//! loopback port with a configuration file written by the test, spoken to over HTTP.
//!
//! The test configuration uses the shipped tiers' bursts (anonymous 5, basic 20, pro 100) with
//! hourly refill rates, so no token comes back while a test runs and every count is exact.

use std::time::{Duration, Instant};

use reqwest::{Client, RequestBuilder};
use tollgate_e2e::{Reply, Server, client, metric, poll, send, workspace_root};
use tollgate_testkit::RedisServer;

/// Like the design's example, with hourly rates (refill every 720 s / 36 s / 7.2 s / 120 s).
const LIMITS: &str = r#"store: memory
headers: both
rate_limits:
  anonymous: { requests_per_hour: 10,  burst_limit: 5 }
  basic:     { requests_per_hour: 100, burst_limit: 20 }
  pro:       { requests_per_hour: 500, burst_limit: 100 }
routes:
  - { method: POST, path: /api/reports, cost: 5 }
  - { path: /api/search, limit: { requests_per_hour: 30, burst_limit: 10 } }
api_keys:
  key-alice: { user: alice, tier: basic }
  key-dave:  { user: dave,  tier: basic }
  key-bob:   { user: bob,   tier: pro }
trusted_proxies: ["127.0.0.1/32"]
"#;

const ALICE: (&str, &str) = ("x-api-key", "key-alice");
const DAVE: (&str, &str) = ("x-api-key", "key-dave");
const BOB: (&str, &str) = ("x-api-key", "key-bob");

/// Sends `n` requests one after the other and returns the replies.
async fn burst(n: usize, request: impl Fn() -> RequestBuilder) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        replies.push(send(request()).await);
    }
    replies
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}

/// `n` times `ok` (200, or 202 for reports) followed by `denied` 429s.
fn expect(ok: u16, n: usize, denied: usize) -> Vec<u16> {
    let mut v = vec![ok; n];
    v.extend(std::iter::repeat_n(429, denied));
    v
}

fn get(c: &Client, server: &Server, path: &str, header: Option<(&str, &str)>) -> RequestBuilder {
    let request = c.get(server.url(path));
    match header {
        Some((name, value)) => request.header(name, value),
        None => request,
    }
}

/// Checks a 429: problem+json body, `Retry-After` of at least 1 s, remaining 0.
fn assert_denied(reply: &Reply, policy: &str) {
    assert_eq!(reply.status, 429, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let retry_after = reply.header_u64("retry-after");
    assert!(retry_after >= 1, "{reply:?}");
    assert_eq!(reply.header_u64("x-ratelimit-remaining"), 0);
    let body = reply.json();
    assert_eq!(body["status"], 429);
    assert_eq!(body["retry_after"], retry_after);
    assert_eq!(
        body["violated-policies"],
        serde_json::json!([policy]),
        "{body}"
    );
    assert_eq!(
        reply
            .header("ratelimit")
            .map(|v| v.starts_with(&format!("\"{policy}\";r=0;"))),
        Some(true),
        "{reply:?}"
    );
}

#[tokio::test]
async fn tier_bursts_in_memory() {
    let server = Server::start(LIMITS);
    let c = client();

    // Anonymous (by client IP): 5, then 429; remaining counts down 4..0.
    let replies = burst(7, || get(&c, &server, "/api/hello", None)).await;
    assert_eq!(statuses(&replies), expect(200, 5, 2));
    let remaining: Vec<u64> = replies[..5]
        .iter()
        .map(|r| r.header_u64("x-ratelimit-remaining"))
        .collect();
    assert_eq!(remaining, [4, 3, 2, 1, 0]);
    assert_eq!(
        replies[0].header("ratelimit-policy"),
        Some("\"anonymous\";q=5;w=1800")
    );
    assert_eq!(replies[0].header_u64("x-ratelimit-limit"), 5);
    assert_eq!(replies[0].body, "hello, anonymous caller\n");
    assert_denied(&replies[5], "anonymous");

    // Basic: 20 per key; `Authorization: Bearer` is the same caller as `X-Api-Key`.
    let replies = burst(20, || get(&c, &server, "/api/hello", Some(ALICE))).await;
    assert_eq!(statuses(&replies), expect(200, 20, 0));
    assert_eq!(
        replies[0].header("ratelimit-policy"),
        Some("\"basic\";q=20;w=720")
    );
    assert_eq!(replies[0].header_u64("x-ratelimit-remaining"), 19);
    assert_eq!(replies[0].body, "hello, basic caller\n");
    let bearer = send(
        c.get(server.url("/api/hello"))
            .header("authorization", "Bearer key-alice"),
    )
    .await;
    assert_denied(&bearer, "basic");
    // Another basic key has its own bucket.
    let replies = burst(21, || get(&c, &server, "/api/hello", Some(DAVE))).await;
    assert_eq!(statuses(&replies), expect(200, 20, 1));

    // Pro: 100.
    let replies = burst(102, || get(&c, &server, "/api/hello", Some(BOB))).await;
    assert_eq!(statuses(&replies), expect(200, 100, 2));
    assert_eq!(
        replies[0].header("ratelimit-policy"),
        Some("\"pro\";q=100;w=720")
    );
    assert_eq!(replies[99].header_u64("x-ratelimit-remaining"), 0);
    assert_denied(&replies[100], "pro");
}

#[tokio::test]
async fn route_costs_and_limits() {
    let server = Server::start(LIMITS);
    let c = client();

    // POST /api/reports costs 5: remaining 15, 10, 5, 0, then 429 (and /api/hello too).
    let replies = burst(5, || {
        c.post(server.url("/api/reports")).header(ALICE.0, ALICE.1)
    })
    .await;
    assert_eq!(statuses(&replies), expect(202, 4, 1));
    let remaining: Vec<u64> = replies
        .iter()
        .map(|r| r.header_u64("x-ratelimit-remaining"))
        .collect();
    assert_eq!(remaining, [15, 10, 5, 0, 0]);
    assert_denied(&replies[4], "basic");
    assert_denied(
        &send(get(&c, &server, "/api/hello", Some(ALICE))).await,
        "basic",
    );
    // A cost of 5 does not fit in 4 tokens: 16 hellos leave 4, the report is refused, 4 more pass.
    let replies = burst(16, || get(&c, &server, "/api/hello", Some(DAVE))).await;
    assert_eq!(statuses(&replies), expect(200, 16, 0));
    let report = send(c.post(server.url("/api/reports")).header(DAVE.0, DAVE.1)).await;
    assert_eq!(report.status, 429, "{report:?}");
    let replies = burst(5, || get(&c, &server, "/api/hello", Some(DAVE))).await;
    assert_eq!(statuses(&replies), expect(200, 4, 1));

    // GET /api/search: 10 per caller on top of the tier (pro: 100).
    let replies = burst(12, || get(&c, &server, "/api/search", Some(BOB))).await;
    assert_eq!(statuses(&replies), expect(200, 10, 2));
    assert_eq!(
        replies[0].header("ratelimit-policy"),
        Some("\"route:/api/search\";q=10;w=1200")
    );
    assert_eq!(replies[0].header_u64("x-ratelimit-remaining"), 9);
    assert_denied(&replies[10], "route:/api/search");
    // The 10 searches came out of the tier too; the denied ones did not.
    let hello = send(get(&c, &server, "/api/hello", Some(BOB))).await;
    assert_eq!(hello.status, 200);
    assert_eq!(hello.header_u64("x-ratelimit-remaining"), 89);
    // Per caller: anonymous callers have their own 10 searches... but only 5 tier tokens.
    let replies = burst(6, || get(&c, &server, "/api/search", None)).await;
    assert_eq!(statuses(&replies), expect(200, 5, 1));
    assert_denied(&replies[5], "anonymous");
}

#[tokio::test]
async fn unknown_keys_unlimited_paths_and_404() {
    let server = Server::start(LIMITS);
    let c = client();

    // An unknown key is refused outright, never served as anonymous (or any tier).
    for request in [
        c.get(server.url("/api/hello"))
            .header("x-api-key", "key-mallory"),
        c.get(server.url("/api/hello"))
            .header("authorization", "Bearer key-mallory"),
        c.post(server.url("/api/reports"))
            .header("authorization", "Bearer key-eve"),
    ] {
        let reply = send(request).await;
        assert_eq!(reply.status, 401, "{reply:?}");
        assert_eq!(reply.header("x-ratelimit-limit"), None);
    }
    // ... and spent nothing: the anonymous caller still has its 5.
    let replies = burst(6, || get(&c, &server, "/api/hello", None)).await;
    assert_eq!(statuses(&replies), expect(200, 5, 1));

    // With the anonymous bucket empty: /healthz, /metrics and unknown paths are not limited.
    let replies = burst(30, || get(&c, &server, "/healthz", None)).await;
    assert_eq!(statuses(&replies), vec![200; 30]);
    assert_eq!(replies[0].body, "ok");
    assert_eq!(replies[0].header("x-ratelimit-limit"), None);
    assert_eq!(replies[0].header("ratelimit"), None);
    let replies = burst(10, || get(&c, &server, "/metrics", None)).await;
    assert_eq!(statuses(&replies), vec![200; 10]);
    let replies = burst(10, || get(&c, &server, "/nope", None)).await;
    assert_eq!(statuses(&replies), vec![404; 10]);
    assert_eq!(send(get(&c, &server, "/api/hello", None)).await.status, 429);
}

#[tokio::test]
async fn anonymous_callers_are_keyed_by_forwarded_ip_from_trusted_proxies() {
    let trusting = Server::start(LIMITS);
    let c = client();
    let from = |server: &Server, ip: &'static str| {
        c.get(server.url("/api/hello"))
            .header("x-forwarded-for", ip)
    };
    for ip in ["203.0.113.1", "203.0.113.2", "2001:db8::7"] {
        let replies = burst(6, || from(&trusting, ip)).await;
        assert_eq!(statuses(&replies), expect(200, 5, 1), "{ip}");
    }
    // The peer itself (no header) is yet another caller.
    let replies = burst(6, || get(&c, &trusting, "/api/hello", None)).await;
    assert_eq!(statuses(&replies), expect(200, 5, 1));

    // Without trusted proxies the header is ignored: one bucket for the peer, whatever it claims.
    let untrusting = Server::start(&LIMITS.replace("trusted_proxies: [\"127.0.0.1/32\"]", ""));
    let replies = burst(3, || from(&untrusting, "203.0.113.1")).await;
    assert_eq!(statuses(&replies), expect(200, 3, 0));
    let replies = burst(3, || from(&untrusting, "203.0.113.2")).await;
    assert_eq!(statuses(&replies), expect(200, 2, 1));
}

/// Counts of one tier's outcomes, as the test saw them.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    allowed: u64,
    limited: u64,
}

fn count(seen: &mut Seen, replies: &[Reply]) {
    for r in replies {
        match r.status {
            200 | 202 => seen.allowed += 1,
            429 => seen.limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
}

/// What `/metrics` says for a tier.
fn scraped(text: &str, tier: &str) -> (Seen, Option<f64>) {
    let requests = |outcome| {
        metric(
            text,
            "rate_limiter_requests_total",
            &[("tier", tier), ("outcome", outcome)],
        )
        .unwrap_or(0.0) as u64
    };
    let seen = Seen {
        allowed: requests("allowed"),
        limited: requests("limited"),
    };
    let breaches = metric(text, "rate_limiter_breaches_total", &[("tier", tier)]);
    (seen, breaches)
}

#[tokio::test]
async fn metrics_count_what_clients_saw() {
    let server = Server::start(LIMITS);
    let c = client();
    let mut anonymous = Seen::default();
    let mut basic = Seen::default();
    let mut pro = Seen::default();

    count(
        &mut anonymous,
        &burst(8, || get(&c, &server, "/api/hello", None)).await,
    );
    count(
        &mut basic,
        &burst(23, || get(&c, &server, "/api/hello", Some(ALICE))).await,
    );
    count(
        &mut basic,
        &burst(3, || {
            c.post(server.url("/api/reports")).header(DAVE.0, DAVE.1)
        })
        .await,
    );
    count(
        &mut pro,
        &burst(13, || get(&c, &server, "/api/search", Some(BOB))).await,
    );
    // Not limited, not counted.
    burst(5, || get(&c, &server, "/healthz", None)).await;
    burst(2, || get(&c, &server, "/nope", None)).await;
    burst(2, || {
        c.get(server.url("/api/hello")).header("x-api-key", "bad")
    })
    .await;

    assert_eq!(
        anonymous,
        Seen {
            allowed: 5,
            limited: 3
        }
    );
    assert_eq!(
        basic,
        Seen {
            allowed: 20 + 3,
            limited: 3
        }
    );
    assert_eq!(
        pro,
        Seen {
            allowed: 10,
            limited: 3
        }
    );

    // The counters are bumped before the response leaves; allow a moment anyway.
    let tiers = [("anonymous", &anonymous), ("basic", &basic), ("pro", &pro)];
    let deadline = Instant::now() + Duration::from_secs(3);
    let text = loop {
        let reply = send(get(&c, &server, "/metrics", None)).await;
        assert_eq!(reply.status, 200);
        let all_match = tiers.iter().all(|(tier, seen)| {
            let (counted, breaches) = scraped(&reply.body, tier);
            counted == **seen && breaches == Some(seen.limited as f64)
        });
        if all_match || Instant::now() >= deadline {
            break reply.body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (tier, seen) in tiers {
        let (counted, breaches) = scraped(&text, tier);
        assert_eq!(&counted, seen, "{tier}:\n{text}");
        assert_eq!(breaches, Some(seen.limited as f64), "{tier}:\n{text}");
    }
    let tokens = |tier| {
        metric(
            &text,
            "rate_limiter_tokens_consumed_total",
            &[("tier", tier)],
        )
    };
    assert_eq!(tokens("anonymous"), Some(5.0));
    assert_eq!(tokens("basic"), Some(20.0 + 15.0));
    assert_eq!(tokens("pro"), Some(10.0));
    assert!(
        text.contains("rate_limiter_store_latency_seconds") && text.contains("store=\"memory\""),
        "{text}"
    );
}

/// The shipped `examples/axum-tiers/limits.yaml` (per-minute rates) starts and enforces its tiers.
#[tokio::test]
async fn the_shipped_limits_yaml_works() {
    let path = workspace_root().join("examples/axum-tiers/limits.yaml");
    let server = Server::start_on_file(&path, &[]);
    let c = client();
    // Anonymous refills one token every 6 s: the burst of 5 is exact.
    let replies = burst(6, || get(&c, &server, "/api/hello", None)).await;
    assert_eq!(statuses(&replies), expect(200, 5, 1));
    for (key, tier, limit) in [
        ("demo-basic-key", "basic", 20),
        ("demo-pro-key", "pro", 100),
        ("demo-enterprise-key", "enterprise", 200),
    ] {
        let reply = send(get(&c, &server, "/api/hello", Some(("x-api-key", key)))).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header_u64("x-ratelimit-limit"), limit);
        assert_eq!(reply.header_u64("x-ratelimit-remaining"), limit - 1);
        assert_eq!(reply.body, format!("hello, {tier} caller\n"));
    }
}

#[tokio::test]
async fn redis_store_enforces_the_same_bursts() {
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let server = Server::start_with(LIMITS, &["--redis", &url]);
    let c = client();

    let replies = burst(6, || get(&c, &server, "/api/hello", None)).await;
    assert_eq!(statuses(&replies), expect(200, 5, 1));
    assert_denied(&replies[5], "anonymous");
    let replies = burst(21, || get(&c, &server, "/api/hello", Some(ALICE))).await;
    assert_eq!(statuses(&replies), expect(200, 20, 1));
    assert_eq!(
        replies
            .iter()
            .take(3)
            .map(|r| r.header_u64("x-ratelimit-remaining"))
            .collect::<Vec<_>>(),
        [19, 18, 17]
    );
    let replies = burst(3, || {
        c.post(server.url("/api/reports")).header(DAVE.0, DAVE.1)
    })
    .await;
    assert_eq!(
        replies
            .iter()
            .map(|r| r.header_u64("x-ratelimit-remaining"))
            .collect::<Vec<_>>(),
        [15, 10, 5]
    );
    let replies = burst(11, || get(&c, &server, "/api/search", Some(BOB))).await;
    assert_eq!(statuses(&replies), expect(200, 10, 1));

    // The state really is in Redis (not a local fallback): keys exist, no store errors.
    let keys = redis.cmd(&["DBSIZE"]).expect("DBSIZE").as_int();
    assert!(keys.is_some_and(|n| n >= 4), "DBSIZE = {keys:?}");
    let text = send(get(&c, &server, "/metrics", None)).await.body;
    assert!(text.contains("store=\"redis\""), "{text}");
    assert_eq!(
        metric(
            &text,
            "rate_limiter_store_errors_total",
            &[("store", "redis")]
        ),
        None
    );
    // The series may exist from the tier's first request on (registered once), at zero.
    let store_errors = metric(
        &text,
        "rate_limiter_requests_total",
        &[("tier", "basic"), ("outcome", "store_error")],
    );
    assert!(matches!(store_errors, None | Some(0.0)), "{store_errors:?}");
}

#[tokio::test]
async fn two_servers_on_one_redis_share_the_limit() {
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let a = Server::start_with(LIMITS, &["--redis", &url]);
    let b = Server::start_with(LIMITS, &["--redis", &url]);
    let c = client();

    // Alternate between the servers: together they let exactly one burst through.
    for (caller, burst_limit) in [(None, 5), (Some(ALICE), 20), (Some(BOB), 100)] {
        let mut ok = [0usize; 2];
        let mut denied = 0;
        for i in 0..burst_limit + 10 {
            let server = if i % 2 == 0 { &a } else { &b };
            match send(get(&c, server, "/api/hello", caller)).await.status {
                200 => ok[i % 2] += 1,
                429 => denied += 1,
                other => panic!("status {other}"),
            }
        }
        assert_eq!(ok[0] + ok[1], burst_limit, "{caller:?}: {ok:?}");
        assert_eq!(denied, 10, "{caller:?}");
        assert_eq!(ok[0], burst_limit.div_ceil(2), "{caller:?}");
    }
}

#[tokio::test]
async fn sighup_reloads_and_refuses_a_broken_file() {
    let mut server = Server::start(LIMITS);
    let c = client();
    let started = Instant::now();

    let replies = burst(5, || get(&c, &server, "/api/hello", Some(ALICE))).await;
    assert_eq!(statuses(&replies), expect(200, 5, 0));
    assert_eq!(
        replies[4].header("ratelimit-policy"),
        Some("\"basic\";q=20;w=720")
    );
    assert_eq!(replies[4].header_u64("x-ratelimit-remaining"), 15);
    let newcomer = ("x-api-key", "key-erin");
    assert_eq!(
        send(get(&c, &server, "/api/hello", Some(newcomer)))
            .await
            .status,
        401
    );
    let dave = send(get(&c, &server, "/api/hello", Some(DAVE))).await;
    assert_eq!(dave.status, 200);

    // Basic gets a burst of 50 (same rate), a new key appears and one goes.
    let reloaded = LIMITS
        .replace(
            "basic:     { requests_per_hour: 100, burst_limit: 20 }",
            "basic:     { requests_per_hour: 100, burst_limit: 50 }",
        )
        .replace(
            "api_keys:\n",
            "api_keys:\n  key-erin:  { user: erin,  tier: pro }\n",
        )
        .replace("  key-dave:  { user: dave,  tier: basic }\n", "");
    assert_ne!(reloaded, LIMITS);
    server.write_config(&reloaded);
    server.signal("HUP");
    let mut spent = 5;
    let reply = poll(Duration::from_secs(10), || {
        spent += 1;
        let request = get(&c, &server, "/api/hello", Some(ALICE));
        async move {
            let reply = send(request).await;
            assert_eq!(reply.status, 200, "{reply:?}");
            (reply.header_u64("x-ratelimit-limit") == 50).then_some(reply)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the new limit never showed up; stderr:\n{}",
            server.stderr()
        )
    });
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"basic\";q=50;w=1800")
    );
    // The bucket state survived the reload: what was spent is still spent (one token comes back
    // every 36 s).
    let refilled = started.elapsed().as_secs() / 36 + 1;
    let remaining = reply.header_u64("x-ratelimit-remaining");
    assert!(
        (50 - spent..=50 - spent + refilled).contains(&remaining),
        "remaining {remaining} after spending {spent}"
    );
    let erin = send(get(&c, &server, "/api/hello", Some(newcomer))).await;
    assert_eq!(erin.status, 200, "{erin:?}");
    assert_eq!(erin.header_u64("x-ratelimit-limit"), 100);
    let dave = send(get(&c, &server, "/api/hello", Some(DAVE))).await;
    assert_eq!(dave.status, 401, "a removed key is unknown now: {dave:?}");
    assert!(server.wait_for_stderr("configuration reloaded", 0, Duration::from_secs(5)));

    // A broken file is refused; the server keeps the limits it had.
    let lines_before = server.stderr().lines().count();
    server.write_config(&reloaded.replace("burst_limit: 50 }", "burst_limit: 70 ]"));
    server.signal("HUP");
    assert!(
        server.wait_for_stderr("reload refused", lines_before, Duration::from_secs(10)),
        "no `reload refused` line; stderr:\n{}",
        server.stderr()
    );
    let refused = server
        .stderr()
        .lines()
        .skip(lines_before)
        .find(|l| l.contains("reload refused"))
        .map(str::to_owned)
        .expect("found above");
    assert!(refused.contains("limits.yaml:5"), "{refused}");
    let reply = send(get(&c, &server, "/api/hello", Some(ALICE))).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header_u64("x-ratelimit-limit"), 50);
    assert_eq!(reply.header_u64("x-ratelimit-remaining"), remaining - 1);
    assert_eq!(
        send(get(&c, &server, "/api/hello", Some(newcomer)))
            .await
            .status,
        200
    );
    assert_eq!(send(get(&c, &server, "/healthz", None)).await.status, 200);
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the server died"
    );
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let mut server = Server::start(LIMITS);
    let c = client();
    // An idle keep-alive connection must not hold the shutdown up.
    assert_eq!(send(get(&c, &server, "/api/hello", None)).await.status, 200);
    let asked = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "still running 5 s after SIGTERM; stderr:\n{}",
            server.stderr()
        )
    });
    assert!(status.success(), "{status}; stderr:\n{}", server.stderr());
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert!(
        server.stderr().contains("shutting down"),
        "{}",
        server.stderr()
    );
    assert!(!server.stderr().contains("panicked"));
}

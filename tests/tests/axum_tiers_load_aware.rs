//! End-to-end tests of the load-aware limits on the `axum-tiers` binary: a tier's concurrency cap
//! on `/api/slow` (one server in memory; two servers sharing Redis; a server killed while it
//! holds leases), and `/api/login`, which charges only failed logins.

use std::time::{Duration, Instant};

use tollgate_e2e::{Reply, Server, client, metric, send};
use tollgate_testkit::RedisServer;

/// A basic caller may have 3 requests in flight; its rate never binds here (hourly refill, a
/// burst of 100). Leases of a dead server expire after 2 s.
const LIMITS: &str = r#"store: memory
headers: both
rate_limits:
  anonymous: { requests_per_hour: 10,  burst_limit: 5 }
  basic:     { requests_per_hour: 100, burst_limit: 100, concurrency: 3, lease_time: 2s }
routes:
  - { method: POST, path: /api/login, charge: failures, limit: { requests_per_hour: 3, burst_limit: 3 } }
api_keys:
  key-alice: { user: alice, tier: basic }
"#;

const ALICE: (&str, &str) = ("x-api-key", "key-alice");

/// Sends `n` requests for `/api/slow?ms=MS` at once, spread over `servers` in turn, and returns
/// the replies.
async fn at_once(servers: &[&Server], n: usize, ms: u64) -> Vec<Reply> {
    let c = client();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let request = c
                .get(servers[i % servers.len()].url(&format!("/api/slow?ms={ms}")))
                .header(ALICE.0, ALICE.1);
            tokio::spawn(send(request))
        })
        .collect();
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.expect("a request task"));
    }
    replies
}

/// Checks that exactly `ok` replies are 200 and the rest are the concurrency cap's 429.
fn assert_capped(replies: &[Reply], ok: usize) {
    let passed = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        passed,
        ok,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_eq!(reply.status, 429, "{reply:?}");
        assert_eq!(reply.header("retry-after"), Some("1"), "{reply:?}");
        let body = reply.json();
        assert_eq!(
            body["violated-policies"],
            serde_json::json!(["concurrency:basic"]),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_cap_admits_exactly_its_size_while_in_flight() {
    let server = Server::start(LIMITS);
    let replies = at_once(&[&server], 20, 500).await;
    assert_capped(&replies, 3);
    // They finished: the next three pass, together.
    assert_capped(&at_once(&[&server], 3, 100).await, 3);
    // Each refusal is counted as `limited` in the caller's tier.
    let text = send(client().get(server.url("/metrics"))).await.body;
    let limited = metric(
        &text,
        "rate_limiter_requests_total",
        &[("tier", "basic"), ("outcome", "limited")],
    );
    assert_eq!(limited, Some(17.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_failed_logins_are_charged() {
    let server = Server::start(LIMITS);
    let c = client();
    let login = |password: &str| {
        c.post(server.url("/api/login"))
            .header(ALICE.0, ALICE.1)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("password={password}"))
    };
    for i in 0..10 {
        assert_eq!(send(login("letmein")).await.status, 200, "login {i}");
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send(login("hunter2")).await.status);
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_redis_share_the_cap_and_a_dead_servers_leases_expire() {
    let redis = tokio::task::block_in_place(|| RedisServer::start().expect("redis-server starts"));
    let url = redis.url();
    let mut a = Server::start_with(LIMITS, &["--redis", &url]);
    let b = Server::start_with(LIMITS, &["--redis", &url]);

    // 20 at once, half to each server: 3 in flight fleet-wide.
    assert_capped(&at_once(&[&a, &b], 20, 500).await, 3);
    assert_capped(&at_once(&[&b, &a], 4, 100).await, 3);

    // Server A takes all three places with long requests, then dies holding them.
    let c = client();
    let long: Vec<_> = (0..3)
        .map(|_| {
            let request = c
                .get(a.url("/api/slow?ms=8000"))
                .header(ALICE.0, ALICE.1)
                .timeout(Duration::from_secs(20));
            tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let on_b = || send(c.get(b.url("/api/slow?ms=10")).header(ALICE.0, ALICE.1));
    // Give A's requests the time to take their places before B asks (B's own request would
    // take one of them otherwise).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = tollgate_e2e::poll(Duration::from_secs(1), || async {
        (on_b().await.status == 429).then_some(())
    })
    .await;
    assert!(held.is_some(), "A's requests never held the places");
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5)).expect("A exits");
    let killed = Instant::now();
    for task in long {
        assert!(
            task.await.expect("a request task").is_err(),
            "a request to the killed server cannot have been answered"
        );
    }
    // Nobody gave the leases back: B still refuses, until their lease time (2 s) ends.
    let refused = on_b().await;
    assert_eq!(refused.status, 429, "{refused:?}");
    let freed = tollgate_e2e::poll(Duration::from_secs(6), || async {
        (on_b().await.status == 200).then(|| killed.elapsed())
    })
    .await
    .expect("the dead server's leases never expired");
    eprintln!("the dead server's leases were free {freed:?} after the kill (lease time 2 s)");
    assert!(
        freed <= Duration::from_millis(2000 + 1500),
        "freed after {freed:?}, lease time 2 s"
    );
    assert!(
        freed >= Duration::from_millis(200),
        "freed after {freed:?}: too soon for an expiry"
    );
}

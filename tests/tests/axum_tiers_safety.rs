//! The `axum-tiers` server attacked as a hostile user would: each test here is one defect of the
//! 2026-12 review (issue 12), over real sockets against the real binary.

use std::time::{Duration, Instant};

use reqwest::{Client, RequestBuilder};
use tollgate_e2e::{Server, client, poll, send};

const LIMITS: &str = r#"store: memory
headers: both
rate_limits:
  anonymous: { requests_per_hour: 10, burst_limit: 5 }
  basic:     { requests_per_hour: 5,  burst_limit: 5 }
  pro:       { requests_per_hour: 500, burst_limit: 100 }
api_keys:
  key-alice: { user: alice, tier: basic }
  key-dave:  { user: dave,  tier: basic }
trusted_proxies: ["127.0.0.1/32"]
"#;

const ALICE: (&str, &str) = ("x-api-key", "key-alice");
const DAVE: (&str, &str) = ("x-api-key", "key-dave");

fn get(c: &Client, server: &Server, path: &str, headers: &[(&str, &str)]) -> RequestBuilder {
    headers
        .iter()
        .fold(c.get(server.url(path)), |r, (name, value)| {
            r.header(*name, *value)
        })
}

/// Spends a caller's burst of 5 and checks the next request is denied for a long time.
async fn exhaust(c: &Client, server: &Server, who: (&str, &str)) {
    for i in 0..5 {
        let reply = send(get(c, server, "/api/hello", &[who])).await;
        assert_eq!(reply.status, 200, "request {i} of {who:?}: {reply:?}");
    }
    let denied = send(get(c, server, "/api/hello", &[who])).await;
    assert_eq!(denied.status, 429, "{denied:?}");
    assert!(denied.header_u64("retry-after") > 60, "{denied:?}");
}

/// Reloads `config` with SIGHUP and waits for the server to say it applied it.
fn reload(server: &Server, config: &str) {
    let lines = server.stderr().lines().count();
    server.write_config(config);
    server.signal("HUP");
    assert!(
        server.wait_for_stderr("configuration reloaded", lines, Duration::from_secs(10)),
        "no reload line; stderr:\n{}",
        server.stderr()
    );
}

/// Defect 1: a denial remembered by the denied-until cache must not outlive the policy that
/// decided it. A caller moved to another tier is decided by that tier at once; a tier raised is
/// decided by its new quota (here a 36 ms refill, so a pass within a second).
#[tokio::test]
async fn a_reload_forgets_the_denials_it_changes() {
    let server = Server::start(LIMITS);
    let c = client();
    exhaust(&c, &server, ALICE).await;
    exhaust(&c, &server, DAVE).await;

    // Alice's tier is raised a hundred-thousandfold; Dave moves to `pro`.
    let raised = LIMITS
        .replace(
            "basic:     { requests_per_hour: 5,  burst_limit: 5 }",
            "basic:     { requests_per_hour: 100000 }",
        )
        .replace("user: dave,  tier: basic", "user: dave,  tier: pro");
    assert_ne!(raised, LIMITS);
    reload(&server, &raised);

    let dave = send(get(&c, &server, "/api/hello", &[DAVE])).await;
    assert_eq!(dave.status, 200, "moved to pro, still denied: {dave:?}");
    assert_eq!(dave.header_u64("x-ratelimit-limit"), 100);

    let started = Instant::now();
    let passed = poll(Duration::from_secs(3), || {
        let request = get(&c, &server, "/api/hello", &[ALICE]);
        async move {
            let reply = send(request).await;
            if reply.status == 429 {
                assert!(
                    reply.header_u64("retry-after") <= 1,
                    "the old tier's denial answered after the reload: {reply:?}"
                );
            }
            (reply.status == 200).then_some(reply)
        }
    })
    .await;
    assert!(
        passed.is_some(),
        "alice was not let through within {:?} of the reload",
        started.elapsed()
    );
}

//! The `axum-tiers` server attacked as a hostile user would: each test here is one defect of the
//! 2026-12 review (issue 12), over real sockets against the real binary.

use std::io::{Read, Write};
use std::net::TcpStream;
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

/// Defect 4: behind a trusted proxy that appends `X-Forwarded-For`, the client's own `Forwarded`
/// header used to win, and an `X-Forwarded-For` over 8 KiB was skipped whole (the request was
/// keyed as the proxy). Only the configured header is read, from the right.
#[tokio::test]
async fn forwarding_headers_cannot_be_forged_or_padded() {
    let server = Server::start(LIMITS);
    let c = client();
    // The test client is the "proxy" (127.0.0.1 is trusted); it appended 198.51.100.7.
    let mut statuses = Vec::new();
    for i in 0..8 {
        let forged = format!("for=203.0.113.{i}");
        let reply = send(get(
            &c,
            &server,
            "/api/hello",
            &[("forwarded", &forged), ("x-forwarded-for", "198.51.100.7")],
        ))
        .await;
        statuses.push(reply.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "a forged Forwarded chose the bucket"
    );

    // A client pads the header with 12 KiB of its own entries; the proxy's entry is last.
    let padding = "10.9.8.7, ".repeat(1200);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let padded = format!("{padding}198.51.100.8");
        let reply = send(get(
            &c,
            &server,
            "/api/hello",
            &[("x-forwarded-for", &padded)],
        ))
        .await;
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    // The proxy's own bucket (127.0.0.1) was not drained by the padded requests.
    let own = send(get(&c, &server, "/api/hello", &[])).await;
    assert_eq!(own.status, 200, "{own:?}");
    assert_eq!(own.header_u64("x-ratelimit-remaining"), 4);
}

/// `client_ip_header: forwarded`: then `Forwarded` is the one believed.
#[tokio::test]
async fn the_forwarded_header_when_configured() {
    let server = Server::start(&format!("{LIMITS}client_ip_header: forwarded\n"));
    let c = client();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let forged = format!("192.0.2.{i}");
        let reply = send(get(
            &c,
            &server,
            "/api/hello",
            &[
                ("x-forwarded-for", &forged),
                ("forwarded", "for=198.51.100.9"),
            ],
        ))
        .await;
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
}

/// Defect 7: a reload that changes what only a restart can change (the store) says so instead of
/// "configuration reloaded" alone; the rest of the file applies.
#[tokio::test]
async fn a_reload_says_what_it_cannot_apply() {
    let server = Server::start(LIMITS);
    let c = client();
    let lines = server.stderr().lines().count();
    let changed = format!(
        "{}\n",
        LIMITS
            .replace(
                "store: memory",
                "store: { redis: { url: \"redis://127.0.0.1:1\" } }"
            )
            .replace(
                "anonymous: { requests_per_hour: 10, burst_limit: 5 }",
                "anonymous: { requests_per_hour: 10, burst_limit: 7 }"
            )
    );
    server.write_config(&changed);
    server.signal("HUP");
    assert!(
        server.wait_for_stderr("needs a restart", lines, Duration::from_secs(10)),
        "stderr:\n{}",
        server.stderr()
    );
    let said = server.stderr();
    let line = said
        .lines()
        .skip(lines)
        .find(|l| l.contains("needs a restart"))
        .expect("the reload line");
    assert!(line.contains("store: memory"), "{line}");
    assert!(line.contains("redis at 127.0.0.1:1"), "{line}");
    // The limits applied; the store is still memory (Redis on port 1 would fail every call).
    let reply = send(get(&c, &server, "/api/hello", &[])).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header_u64("x-ratelimit-limit"), 7);
    assert_eq!(reply.header_u64("x-ratelimit-remaining"), 6);
}

/// Defect 12: connections that never finish a request head are closed after the header read
/// timeout (1 s here), whether they sent nothing or part of a head; the server keeps answering.
#[tokio::test]
async fn half_open_connections_are_closed() {
    let server = Server::start_with(LIMITS, &["--header-read-timeout", "1"]);
    let addr = server
        .url("")
        .trim_start_matches("http://")
        .parse::<std::net::SocketAddr>()
        .expect("a socket address");
    let closed = tokio::task::spawn_blocking(move || {
        let mut streams = Vec::new();
        for i in 0..40 {
            let mut stream = TcpStream::connect(addr).expect("connect");
            if i % 2 == 1 {
                stream
                    .write_all(b"GET /api/hello HTTP/1.1\r\nhost: x\r\nx-slow: ")
                    .expect("write");
            }
            streams.push(stream);
        }
        let started = Instant::now();
        let mut closed = 0;
        for mut stream in streams {
            stream
                .set_read_timeout(Some(Duration::from_secs(6)))
                .expect("timeout");
            let mut buf = [0u8; 512];
            // Closed: end of stream (or a reset), possibly after a 408 for a partial head.
            let ended = loop {
                match stream.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        break false;
                    }
                    Err(_) => break true,
                }
            };
            closed += usize::from(ended);
        }
        (closed, started.elapsed())
    })
    .await
    .expect("the client thread");
    assert_eq!(closed.0, 40, "connections still open after {:?}", closed.1);
    assert!(closed.1 < Duration::from_secs(5), "took {:?}", closed.1);
    let reply = send(get(&client(), &server, "/api/hello", &[])).await;
    assert_eq!(reply.status, 200);
}

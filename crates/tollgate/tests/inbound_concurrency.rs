//! A tier's concurrency cap over real sockets: a place is held from the decision until the
//! response body ends (not when the handler returns its head), given back when the client walks
//! away mid-body, exact when many ask at once, shared by two servers on Redis, and kept by the
//! local fallback while Redis is down.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::RawQuery;
use axum::routing::get;
use bytes::Bytes;
use http_body::Frame;
use tollgate::config::Config;
use tollgate_testkit::RedisServer;

/// A body that sends its one chunk after `wait`, then ends.
struct SlowBody {
    sleep: Pin<Box<tokio::time::Sleep>>,
    sent: bool,
}

impl http_body::Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent {
            return Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"the end\n")))))
    }
}

/// The milliseconds `name=MS` of a query string asks for (0 when absent).
fn millis(query: &str, name: &str) -> Duration {
    let ms = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map_or(0, |(_, value)| {
            value.parse().expect("a number of milliseconds")
        });
    Duration::from_millis(ms)
}

/// `/api/slow?head=MS&body=MS`: the head after `head`, then the body's one chunk after `body`.
async fn slow(RawQuery(query): RawQuery) -> Body {
    let query = query.unwrap_or_default();
    tokio::time::sleep(millis(&query, "head")).await;
    Body::new(SlowBody {
        sleep: Box::pin(tokio::time::sleep(millis(&query, "body"))),
        sent: false,
    })
}

fn config(store: &str, cap: u32) -> Config {
    let text = format!(
        "{store}
rate_limits:
  anonymous: {{ requests_per_hour: 10, burst_limit: 5 }}
  basic: {{ requests_per_hour: 1000, burst_limit: 1000, concurrency: {cap}, lease_time: 30s }}
api_keys:
  key-alice: {{ user: alice, tier: basic }}
"
    );
    Config::parse(&text, "limits.yaml").expect("the test config loads")
}

async fn server(config: &Config) -> common::TestServer {
    let app = Router::new()
        .route("/api/slow", get(slow))
        .layer(config.layer().expect("a layer"));
    common::serve(app).await
}

fn ask(
    client: &reqwest::Client,
    server: &common::TestServer,
    query: &str,
) -> reqwest::RequestBuilder {
    client
        .get(server.url(&format!("/api/slow?{query}")))
        .header("x-api-key", "key-alice")
}

/// Sends `n` requests at once (spread over `servers`) and counts the 200s, checking that the
/// others are the cap's 429.
async fn at_once(servers: &[&common::TestServer], n: usize, query: &str) -> usize {
    let client = common::client();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let request = ask(&client, servers[i % servers.len()], query);
            tokio::spawn(async move {
                let r = request.send().await.expect("a response");
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").cloned();
                let body = r.text().await.expect("a body");
                (status, retry, body)
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        let (status, retry, body) = task.await.expect("a request task");
        match status {
            200 => ok += 1,
            429 => {
                assert_eq!(retry.as_ref().map(|v| v.to_str().unwrap()), Some("1"));
                assert!(body.contains("concurrency:basic"), "{body}");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_at_once_pass_three_then_three_more() {
    let config = config("store: memory", 3);
    let server = server(&config).await;
    assert_eq!(at_once(&[&server], 20, "head=500").await, 3);
    assert_eq!(at_once(&[&server], 3, "head=50").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_at_once_over_two_servers_on_redis_pass_three() {
    let redis = tokio::task::block_in_place(|| RedisServer::start().expect("redis-server starts"));
    let store = format!(
        "store: {{ redis: {{ url: \"{}\", timeout_ms: 1000, on_error: fail_closed }} }}",
        redis.url()
    );
    let config = config(&store, 3);
    let (a, b) = (server(&config).await, server(&config).await);
    assert_eq!(at_once(&[&a, &b], 20, "head=500").await, 3);
    assert_eq!(at_once(&[&b, &a], 3, "head=50").await, 3);
}

/// The place is held while the body streams, and given back when it ends; a client that walks
/// away mid-body gives it back too.
async fn held_until_the_body_ends(store: &str) {
    let config = config(store, 1);
    let server = server(&config).await;
    let client = common::client();

    let first = ask(&client, &server, "body=600")
        .send()
        .await
        .expect("a head");
    assert_eq!(first.status(), 200);
    let started = Instant::now();
    // The head is here, the body is not: the place is still taken.
    let second = ask(&client, &server, "").send().await.unwrap();
    assert_eq!(
        second.status(),
        429,
        "a second request while the first body streams"
    );
    assert_eq!(first.text().await.unwrap(), "the end\n");
    assert!(started.elapsed() >= Duration::from_millis(400));
    let third = ask(&client, &server, "").send().await.unwrap();
    assert_eq!(third.status(), 200, "the body ended: the place is free");
    let _ = third.text().await;

    // Walk away mid-body: the server drops the body, and the place comes back.
    let walked = ask(&client, &server, "body=5000").send().await.unwrap();
    assert_eq!(walked.status(), 200);
    assert_eq!(
        ask(&client, &server, "").send().await.unwrap().status(),
        429
    );
    drop(walked);
    let client2 = common::client();
    let mut freed = false;
    for _ in 0..50 {
        let r = ask(&client2, &server, "").send().await.unwrap();
        if r.status() == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        freed,
        "the place of a body nobody reads was never given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_is_held_until_the_body_ends_memory() {
    held_until_the_body_ends("store: memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_is_held_until_the_body_ends_redis() {
    let redis = tokio::task::block_in_place(|| RedisServer::start().expect("redis-server starts"));
    held_until_the_body_ends(&format!(
        "store: {{ redis: {{ url: \"{}\", timeout_ms: 1000, on_error: fail_closed }} }}",
        redis.url()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_keeps_the_cap_while_redis_is_down() {
    // Nothing listens on port 1: every store call fails, and the fallback decides.
    let config = config(
        "store: { redis: { url: \"redis://127.0.0.1:1\", timeout_ms: 200, on_error: local } }",
        2,
    );
    let server = server(&config).await;
    assert_eq!(at_once(&[&server], 6, "head=400").await, 2);
    // Given back to the fallback, where they were taken.
    assert_eq!(at_once(&[&server], 2, "head=50").await, 2);
}

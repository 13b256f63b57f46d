//! The denied-until cache of the inbound layer: it provably removes store calls (a counting store
//! sees 6 calls for a 200-request flood instead of 200), answers exactly what the store would
//! (same statuses, same headers), and its cached 429s count `Retry-After` down.

mod common;

use std::future::{Future, Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use tollgate::core::{Limit, MemoryStore, Quota, Reservation, Reserve, Store, StoreError, Verdict};
use tollgate::inbound::{Identity, Policy, RateLimitLayer, Rejection};

/// A [`MemoryStore`] that counts the decisions asked of it, on both paths: `decide_now` (the
/// layer's fast path for stores without I/O) and `decide`.
#[derive(Clone, Default)]
struct CountingStore {
    inner: MemoryStore,
    decide_now: Arc<AtomicU64>,
    decide: Arc<AtomicU64>,
}

impl CountingStore {
    fn calls(&self) -> u64 {
        self.decide_now.load(Ordering::SeqCst) + self.decide.load(Ordering::SeqCst)
    }
}

impl Store for CountingStore {
    fn decide(
        &self,
        limits: &[Limit<'_>],
    ) -> impl Future<Output = Result<Verdict, StoreError>> + Send {
        self.decide.fetch_add(1, Ordering::SeqCst);
        self.inner.decide(limits)
    }

    fn peek(
        &self,
        limits: &[Limit<'_>],
    ) -> impl Future<Output = Result<Verdict, StoreError>> + Send {
        self.inner.peek(limits)
    }

    fn reserve(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> impl Future<Output = Result<Reserve, StoreError>> + Send {
        self.inner.reserve(limits, max_wait)
    }

    fn cancel(
        &self,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.cancel(reservation)
    }

    fn pause(
        &self,
        key: &str,
        quota: &Quota,
        duration: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.inner.pause(key, quota, duration)
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn decide_now(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        self.decide_now.fetch_add(1, Ordering::SeqCst);
        Store::decide_now(&self.inner, limits)
    }
}

/// Every caller is `user:<x-user>` in tier `t`.
fn by_user(request: &Request<Body>) -> Ready<Result<Identity, Rejection>> {
    let user = request
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("nobody");
    ready(Ok(Identity::new(&format!("user:{user}"), "t")))
}

/// A server whose tier `t` is `quota`, on a counting store, with or without the cache.
async fn server(quota: Quota, cache: bool) -> (common::TestServer, CountingStore) {
    let store = CountingStore::default();
    let policy = Policy::builder().tier("t", quota).build().unwrap();
    let mut builder = RateLimitLayer::builder(policy, by_user).store(store.clone());
    if !cache {
        builder = builder.denied_cache(None);
    }
    let app = common::routes().layer(builder.build().expect("a valid layer"));
    (common::serve(app).await, store)
}

/// What a client sees of one response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: u16,
    retry_after: Option<u64>,
    /// `r` and `t` of the `RateLimit` header.
    ratelimit: Option<(i64, i64)>,
    ratelimit_policy: Option<String>,
    x_remaining: Option<String>,
    x_limit: Option<String>,
    x_reset: Option<String>,
    /// The `retry_after` member of a problem+json body.
    body_retry_after: Option<u64>,
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("an ASCII header").to_owned())
}

/// `r` and `t` of a `RateLimit` value, parsed as an RFC 9651 list of one item named `"t"`.
fn parse_ratelimit(value: &str) -> (i64, i64) {
    let member = common::sf_member(value);
    assert_eq!(member.name, "t", "{value}");
    let param = |key: &str| {
        *member
            .params
            .get(key)
            .unwrap_or_else(|| panic!("{value}: no integer `{key}`"))
    };
    (param("r"), param("t"))
}

/// The same answer, give or take one second of countdown between the two requests.
fn assert_same(a: &Seen, b: &Seen) {
    let close = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => x.abs_diff(y) <= 1,
        (x, y) => x == y,
    };
    let t = |s: &Seen| s.ratelimit.map(|(_, t)| t.unsigned_abs());
    let reset = |s: &Seen| {
        s.x_reset
            .as_ref()
            .map(|v| v.parse::<u64>().expect("seconds"))
    };
    let ok = a.status == b.status
        && close(a.retry_after, b.retry_after)
        && close(a.body_retry_after, b.body_retry_after)
        && a.ratelimit.map(|(r, _)| r) == b.ratelimit.map(|(r, _)| r)
        && close(t(a), t(b))
        && close(reset(a), reset(b))
        && a.ratelimit_policy == b.ratelimit_policy
        && a.x_remaining == b.x_remaining
        && a.x_limit == b.x_limit;
    assert!(ok, "cached {a:?}\nuncached {b:?}");
}

async fn get(client: &reqwest::Client, server: &common::TestServer, user: &str) -> Seen {
    let response = client
        .get(server.url("/api/hello"))
        .header("x-user", user)
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    let retry_after = header(&response, "retry-after")
        .map(|v| v.parse::<u64>().expect("Retry-After is whole seconds"));
    let ratelimit = header(&response, "ratelimit").map(|v| parse_ratelimit(&v));
    let ratelimit_policy = header(&response, "ratelimit-policy");
    let x_remaining = header(&response, "x-ratelimit-remaining");
    let x_limit = header(&response, "x-ratelimit-limit");
    let x_reset = header(&response, "x-ratelimit-reset");
    let body_retry_after = if status == 429 {
        assert_eq!(
            header(&response, "content-type").as_deref(),
            Some("application/problem+json")
        );
        let body = response.bytes().await.expect("a body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("a JSON problem");
        assert_eq!(body["status"], 429, "{body}");
        assert_eq!(
            body["violated-policies"],
            serde_json::json!(["t"]),
            "{body}"
        );
        Some(
            body["retry_after"]
                .as_u64()
                .expect("retry_after is an integer"),
        )
    } else {
        None
    };
    Seen {
        status,
        retry_after,
        ratelimit,
        ratelimit_policy,
        x_remaining,
        x_limit,
        x_reset,
        body_retry_after,
    }
}

#[tokio::test]
async fn the_cache_removes_store_calls_and_changes_no_answer() {
    const FLOOD: usize = 200;
    let quota = Quota::per_hour(5).unwrap().with_burst(5).unwrap();
    let (cached, cached_store) = server(quota, true).await;
    let (uncached, uncached_store) = server(quota, false).await;
    let client = common::client();

    let mut with_cache = Vec::with_capacity(FLOOD);
    let mut without_cache = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        with_cache.push(get(&client, &cached, "flood").await);
        without_cache.push(get(&client, &uncached, "flood").await);
    }

    let statuses = |seen: &[Seen]| seen.iter().map(|s| s.status).collect::<Vec<_>>();
    let mut expected = vec![200; 5];
    expected.resize(FLOOD, 429);
    assert_eq!(statuses(&with_cache), expected);
    assert_eq!(statuses(&without_cache), expected);
    // Headers too: the two servers are asked one right after the other, so they say the same;
    // only the whole seconds counting down may tick between the two requests.
    for (cached, uncached) in with_cache.iter().zip(&without_cache) {
        assert_same(cached, uncached);
    }
    let mut last = u64::MAX;
    for seen in &with_cache[5..] {
        let retry = seen.retry_after.expect("Retry-After on a 429");
        // One token every 12 minutes: 720 s at the first denial, counting down (a slow machine
        // may take more than a second over the flood).
        assert!((700..=720).contains(&retry) && retry <= last, "{seen:?}");
        last = retry;
        assert_eq!(seen.body_retry_after, seen.retry_after, "{seen:?}");
        assert_eq!(seen.ratelimit.map(|(r, _)| r), Some(0), "{seen:?}");
        assert_eq!(seen.x_remaining.as_deref(), Some("0"), "{seen:?}");
    }

    // 5 allowed + the first denial reach the store; the other 194 denials are answered locally.
    assert_eq!(cached_store.calls(), 6);
    assert_eq!(uncached_store.calls(), FLOOD as u64);
    // A store without I/O is asked on the fast path only.
    assert_eq!(cached_store.decide.load(Ordering::SeqCst), 0);
    assert_eq!(uncached_store.decide.load(Ordering::SeqCst), 0);

    // Another caller is not affected by the first one's cached denial.
    assert_eq!(get(&client, &cached, "other").await.status, 200);
    assert_eq!(cached_store.calls(), 7);
}

#[tokio::test]
async fn cached_denials_count_down_and_end_on_time() {
    // Capacity 3, one token back every 3 s.
    let quota = Quota::per_minute(20).unwrap().with_burst(3).unwrap();
    let (cached, cached_store) = server(quota, true).await;
    let (uncached, _) = server(quota, false).await;
    let client = common::client();

    for server in [&cached, &uncached] {
        for _ in 0..3 {
            assert_eq!(get(&client, server, "c").await.status, 200);
        }
    }
    // First denial: decided by the store, remembered for ~3 s.
    let first = get(&client, &cached, "c").await;
    let first_uncached = get(&client, &uncached, "c").await;
    assert_eq!(first.status, 429);
    assert_same(&first, &first_uncached);
    assert_eq!(first.retry_after, Some(3), "{first:?}");
    assert_eq!(first.ratelimit, Some((0, 9)), "{first:?}");
    assert_eq!(cached_store.calls(), 4);

    // 1.5 s later: answered from the cache, counted down (ceil(1.5 s) = 2), and the same as
    // what the store itself says.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = get(&client, &cached, "c").await;
    let later_uncached = get(&client, &uncached, "c").await;
    assert_eq!(cached_store.calls(), 4, "the cache answered");
    assert_eq!(later.status, 429);
    assert_eq!(later.retry_after, Some(2), "{later:?}");
    assert_eq!(later.body_retry_after, Some(2), "{later:?}");
    let (r, t) = later.ratelimit.expect("RateLimit on a cached 429");
    assert_eq!(r, 0, "{later:?}");
    assert!((8..=9).contains(&t), "{later:?}");
    assert_eq!(later.x_remaining.as_deref(), Some("0"));
    assert_eq!(later.x_limit.as_deref(), Some("3"));
    assert_eq!(later.x_reset, Some(t.to_string()));
    assert_eq!(
        later.ratelimit_policy.as_deref(),
        Some(r#""t";q=3;w=9"#),
        "{later:?}"
    );
    assert_same(&later, &later_uncached);

    // After waiting Retry-After, a request passes: the cache does not outlive the denial.
    tokio::time::sleep(Duration::from_secs(later.retry_after.unwrap())).await;
    assert_eq!(get(&client, &cached, "c").await.status, 200);
    assert_eq!(get(&client, &uncached, "c").await.status, 200);
    assert_eq!(cached_store.calls(), 5);
}

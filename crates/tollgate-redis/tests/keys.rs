//! Key layout and expiry, checked on the server itself: `PREFIX:KEY` names, a TTL on every key
//! that is no longer than the state matters, no write on a token-bucket denial, a bounded and
//! collision-free sliding-window log, and values of another algorithm read as fresh.

mod common;

use std::time::{Duration, Instant};

use tollgate_core::{Limit, Outcome, Quota, Store, Verdict};
use tollgate_redis::{RedisStore, RedisStoreError};
use tollgate_testkit::{RedisServer, Reply};

fn cmd(server: &RedisServer, args: &[&str]) -> Reply {
    match server.cmd(args) {
        Ok(Reply::Error(e)) => panic!("{args:?}: error reply {e}"),
        Ok(reply) => reply,
        Err(e) => panic!("{args:?}: {e}"),
    }
}

fn int(server: &RedisServer, args: &[&str]) -> i64 {
    let reply = cmd(server, args);
    reply
        .as_int()
        .unwrap_or_else(|| panic!("{args:?}: not an integer: {reply:?}"))
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    int(server, &["PTTL", key])
}

fn exists(server: &RedisServer, key: &str) -> bool {
    int(server, &["EXISTS", key]) == 1
}

fn get(server: &RedisServer, key: &str) -> Option<String> {
    match cmd(server, &["GET", key]) {
        Reply::Bulk(None) => None,
        reply => Some(
            reply
                .as_str()
                .unwrap_or_else(|| panic!("GET {key}: {reply:?}"))
                .to_owned(),
        ),
    }
}

fn key_type(server: &RedisServer, key: &str) -> String {
    let reply = cmd(server, &["TYPE", key]);
    reply
        .as_str()
        .unwrap_or_else(|| panic!("TYPE {key}: {reply:?}"))
        .to_owned()
}

/// The server's clock, in µs.
fn server_time(server: &RedisServer) -> u64 {
    let reply = cmd(server, &["TIME"]);
    let parts: Vec<u64> = reply
        .as_array()
        .unwrap_or_else(|| panic!("TIME: {reply:?}"))
        .iter()
        .map(|p| p.as_str().and_then(|s| s.parse().ok()).expect("TIME part"))
        .collect();
    parts[0] * 1_000_000 + parts[1]
}

async fn decide(store: &RedisStore, key: &str, quota: &Quota, cost: u32) -> Verdict {
    let limits = [Limit::new(key, quota, cost)];
    match tokio::time::timeout(Duration::from_secs(10), store.decide(&limits)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("decide {key}: {e}"),
        Err(_) => panic!("decide {key}: no answer in 10 s"),
    }
}

async fn new_store(server: &RedisServer) -> RedisStore {
    common::connect(common::standalone_builder(server)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_prefix_colon_key() {
    let server = common::server();
    let app = common::connect(common::standalone_builder(&server).prefix("app")).await;
    let default = new_store(&server).await;
    assert_eq!(app.redis_key("user:1"), "app:user:1");
    assert_eq!(app.redis_key("{user:1}:route"), "app:{user:1}:route");
    assert_eq!(default.redis_key("user:1"), "tollgate:user:1");

    let quota = Quota::per_minute(10).unwrap();
    assert!(decide(&app, "user:1", &quota, 1).await.is_allowed());
    assert!(exists(&server, "app:user:1"));
    assert!(!exists(&server, "tollgate:user:1"));
    assert!(!exists(&server, "user:1"));
    assert_eq!(int(&server, &["DBSIZE"]), 1, "exactly one key written");

    // The two prefixes are two namespaces: the default store starts fresh on the same limit key.
    let v = decide(&default, "user:1", &quota, 1).await;
    assert_eq!(v.decisions()[0].remaining, 9);
    assert!(exists(&server, "tollgate:user:1"));
    assert_eq!(int(&server, &["DBSIZE"]), 2);

    for bad in ["a{b", "a}b", "{", "tenant{1}"] {
        match RedisStore::builder(server.url()).prefix(bad).build() {
            Err(RedisStoreError::InvalidPrefix(p)) => assert_eq!(p, bad),
            Err(e) => panic!("prefix {bad:?}: wrong error {e}"),
            Ok(_) => panic!("prefix {bad:?} accepted"),
        }
    }
    let e = RedisStore::builder(server.url())
        .prefix("x{")
        .build()
        .expect_err("rejected");
    assert!(e.to_string().contains("x{"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_has_a_ttl_no_longer_than_needed() {
    let server = common::server();
    let store = new_store(&server).await;

    // Token bucket, 100 ms per token: one request leaves the bucket full again in 100 ms.
    let tb = Quota::per_second(10).unwrap().with_burst(5).unwrap();
    decide(&store, "tb", &tb, 1).await;
    let t = pttl(&server, "tollgate:tb");
    assert!((1..=101).contains(&t), "token bucket PTTL {t}");

    // Leaky bucket: the same, one emission interval.
    let lb = Quota::per_second(10)
        .unwrap()
        .shaped(Duration::from_millis(500))
        .unwrap();
    decide(&store, "lb", &lb, 1).await;
    let t = pttl(&server, "tollgate:lb");
    assert!((1..=101).contains(&t), "leaky bucket PTTL {t}");

    // Fixed window of an hour: until the end of the aligned window, on the server's clock.
    let hour: u64 = 3_600_000_000;
    let fw = Quota::fixed_window(10, Duration::from_secs(3600)).unwrap();
    let (before, t, after) = loop {
        let before = server_time(&server);
        decide(&store, "fw", &fw, 1).await;
        let t = pttl(&server, "tollgate:fw");
        let after = server_time(&server);
        // Retry in the (unlikely) case an hour boundary fell in between.
        if before / hour == after / hour {
            break (before, t, after);
        }
        cmd(&server, &["DEL", "tollgate:fw"]);
    };
    let end = (before / hour + 1) * hour;
    let most = (end - before).div_ceil(1000) as i64;
    let least = ((end - after) / 1000) as i64 - 5;
    assert!(
        (least..=most).contains(&t) && t > 0,
        "fixed window PTTL {t}, want {least}..={most}"
    );

    // Sliding window log of 2 s: until the newest entry leaves the window.
    let log = Quota::sliding_window_log(10, Duration::from_secs(2)).unwrap();
    decide(&store, "log", &log, 1).await;
    let t = pttl(&server, "tollgate:log");
    assert!((1..=2000).contains(&t), "log PTTL {t}");
    assert_eq!(key_type(&server, "tollgate:log"), "zset");

    // Sliding window counter of 10 s: until the current window's count has slid out, at most two
    // windows; on the server's clock, the end of the next aligned window.
    let w: u64 = 10_000_000;
    let swc = Quota::sliding_window_counter(10, Duration::from_secs(10)).unwrap();
    let (before, t) = loop {
        let before = server_time(&server);
        decide(&store, "swc", &swc, 1).await;
        let t = pttl(&server, "tollgate:swc");
        let after = server_time(&server);
        if before / w == after / w {
            break (before, t);
        }
        cmd(&server, &["DEL", "tollgate:swc"]);
    };
    let end = (before / w + 2) * w;
    let most = (end - before).div_ceil(1000) as i64;
    assert!(
        t > 0 && t <= most && t <= 20_000,
        "counter PTTL {t}, want 1..={most}"
    );
    assert!(
        t > 10_000 - 1000,
        "counter PTTL {t}: shorter than one window"
    );

    // Nothing without a TTL anywhere.
    let keys = cmd(&server, &["KEYS", "*"]);
    let keys = keys.as_array().expect("KEYS");
    assert_eq!(keys.len(), 5, "{keys:?}");
    for k in keys {
        let k = k.as_str().expect("key name");
        assert!(pttl(&server, k) > 0, "{k} has no TTL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_denial_writes_nothing() {
    let server = common::server();
    let store = new_store(&server).await;
    let quota = Quota::per_hour(1).unwrap().with_burst(3).unwrap();
    let key = "tollgate:deny";

    for _ in 0..3 {
        assert!(decide(&store, "deny", &quota, 1).await.is_allowed());
    }
    let value = get(&server, key).expect("the bucket is written");
    assert!(value.starts_with("b:"), "{value}");
    let ttl = pttl(&server, key);
    assert!(ttl > 0);

    for _ in 0..5 {
        let v = decide(&store, "deny", &quota, 1).await;
        assert_eq!(v.outcome(), Outcome::Denied, "{v:?}");
    }
    // A cost it can never hold is not written either.
    let v = decide(&store, "deny", &quota, 4).await;
    assert_eq!(v.outcome(), Outcome::InsufficientCapacity, "{v:?}");
    assert_eq!(get(&server, key).as_deref(), Some(value.as_str()));
    let after = pttl(&server, key);
    assert!(after > 0 && after <= ttl, "TTL moved from {ttl} to {after}");

    // Nor is a fresh key that only ever sees requests it cannot pass, or cost-0 peeks.
    decide(&store, "never", &quota, 4).await;
    decide(&store, "peeked", &quota, 0).await;
    assert!(!exists(&server, "tollgate:never"));
    assert!(!exists(&server, "tollgate:peeked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_log_is_bounded_and_members_unique() {
    let server = common::server();
    let store = new_store(&server).await;

    let five = Quota::sliding_window_log(5, Duration::from_secs(10)).unwrap();
    let mut allowed = 0;
    for _ in 0..50 {
        if decide(&store, "bounded", &five, 1).await.is_allowed() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 5);
    assert_eq!(int(&server, &["ZCARD", "tollgate:bounded"]), 5);

    // Simultaneous requests from two "processes" (two stores, two call-id seeds), on the same
    // microsecond if the server is fast enough: every admitted unit is its own member.
    let twenty = Quota::sliding_window_log(20, Duration::from_secs(10)).unwrap();
    let other = new_store(&server).await;
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let s = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            let q = twenty;
            tokio::spawn(async move { decide(&s, "burst", &q, 1).await.is_allowed() })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        if t.await.expect("task") {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 20, "30 concurrent requests on a log of 20");
    assert_eq!(int(&server, &["ZCARD", "tollgate:burst"]), 20);

    // A cost of 3 adds three members.
    let v = decide(&store, "cost", &twenty, 3).await;
    assert!(v.is_allowed());
    assert_eq!(int(&server, &["ZCARD", "tollgate:cost"]), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_algorithm_counts_as_fresh() {
    let server = common::server();
    let store = new_store(&server).await;
    let long = Duration::from_secs(3600);
    let log = Quota::sliding_window_log(3, long).unwrap();
    let token = Quota::per_hour(1).unwrap().with_burst(3).unwrap();
    let fixed = Quota::fixed_window(3, long).unwrap();
    let leaky = Quota::per_hour(1).unwrap().shaped(long * 2).unwrap();
    let counter = Quota::sliding_window_counter(3, long).unwrap();
    assert_eq!(leaky.limit(), 3);

    // Fill the log, then walk the same key through every algorithm (never token straight to
    // leaky: both are `b:<tat>`, the same bucket) and back to a log.
    for _ in 0..3 {
        assert!(decide(&store, "shared", &log, 1).await.is_allowed());
    }
    assert_eq!(
        decide(&store, "shared", &log, 1).await.outcome(),
        Outcome::Denied
    );
    // fixed then counter, with the same window, is the pair where a misread value would show:
    // `w:<start>:<count>` read as `c:<start>:<previous>:<current>` has a previous count.
    let steps = [
        ("token", &token, "string"),
        ("fixed", &fixed, "string"),
        ("counter", &counter, "string"),
        ("leaky", &leaky, "string"),
        ("log", &log, "zset"),
        ("fixed", &fixed, "string"),
        ("log", &log, "zset"),
        ("counter", &counter, "string"),
        ("fixed", &fixed, "string"),
        ("token", &token, "string"),
    ];
    for (name, quota, ty) in steps {
        let v = decide(&store, "shared", quota, 1).await;
        assert!(v.is_allowed(), "{name} on another algorithm's key: {v:?}");
        assert_eq!(
            v.decisions()[0].remaining,
            2,
            "{name} on another algorithm's key is not fresh: {v:?}"
        );
        assert_eq!(key_type(&server, "tollgate:shared"), ty, "after {name}");
        assert!(pttl(&server, "tollgate:shared") > 0, "after {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_on_their_own() {
    let server = common::server();
    let store = new_store(&server).await;

    // 100 ms per token: the key is there at once, gone shortly after.
    let slow = Quota::per_second(10).unwrap().with_burst(1).unwrap();
    let written = Instant::now();
    decide(&store, "slow", &slow, 1).await;
    let t = pttl(&server, "tollgate:slow");
    if written.elapsed() < Duration::from_millis(80) {
        assert!((1..=101).contains(&t), "PTTL {t}");
    }
    // 10 ms per token.
    let fast = Quota::per_second(100).unwrap().with_burst(1).unwrap();
    let v = decide(&store, "fast", &fast, 1).await;
    assert_eq!(v.decisions()[0].reset_after, Duration::from_millis(10));

    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !exists(&server, "tollgate:fast"),
        "10 ms key still there after 50 ms"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while exists(&server, "tollgate:slow") {
        assert!(
            Instant::now() < deadline,
            "100 ms key still there after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        written.elapsed() >= Duration::from_millis(95),
        "the 100 ms key expired after {:?}",
        written.elapsed()
    );
    assert_eq!(int(&server, &["DBSIZE"]), 0);
}

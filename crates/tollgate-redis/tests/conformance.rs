//! One conformance suite, written once against the `Store` trait, run on `MemoryStore`, a single
//! Redis node, a 3-master Redis Cluster and a Sentinel-managed master (on Redis, once with `FCALL`
//! and once with `EVALSHA`); plus exactness under concurrency and clock skew.
//!
//! The Redis stores decide on Redis' clock, which the tests cannot stop, so quotas here are slow
//! (per hour) wherever an exact count matters, and times are compared with a tolerance.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tollgate_core::{
    Algorithm, Clock, Limit, ManualClock, MemoryStore, Outcome, Quota, Reserve, Store, SystemClock,
    Timestamp,
};
use tollgate_redis::{RedisStore, RedisStoreBuilder};
use tollgate_testkit::RedisServer;

fn close(actual: Duration, expected: Duration, tolerance: Duration) -> bool {
    actual <= expected + tolerance && actual + tolerance >= expected
}

async fn decide<S: Store>(store: &S, limits: &[Limit<'_>]) -> tollgate_core::Verdict {
    match store.decide(limits).await {
        Ok(v) => v,
        Err(e) => panic!("store error: {e}"),
    }
}

async fn one<S: Store>(store: &S, key: &str, quota: &Quota, cost: u32) -> tollgate_core::Decision {
    decide(store, &[Limit::new(key, quota, cost)])
        .await
        .decisions()[0]
}

/// The suite. `ns` keeps the keys of one run apart; `cross_slot` names a key that lives in
/// another cluster slot than `{ns}` keys (the same thing on a single node).
async fn suite<S: Store>(store: &S, ns: &str) {
    let tol = Duration::from_millis(500);

    // Exact bursts, and what remains, for every algorithm.
    for algorithm in Algorithm::ALL {
        let quota = match algorithm {
            Algorithm::TokenBucket => Quota::per_hour(3),
            Algorithm::LeakyBucket => {
                Quota::per_hour(1).and_then(|q| q.shaped(Duration::from_secs(7200)))
            }
            other => Quota::window(other, 3, Duration::from_secs(86_400)),
        }
        .expect("valid quota");
        let key = format!("{{{ns}}}:burst:{algorithm}");
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let d = one(store, &key, &quota, 1).await;
            assert_eq!(d.outcome, Outcome::Allowed, "{algorithm}");
            remaining.push(d.remaining);
        }
        assert_eq!(remaining, [2, 1, 0], "{algorithm}");
        let denied = one(store, &key, &quota, 1).await;
        assert_eq!(denied.outcome, Outcome::Denied, "{algorithm}");
        assert!(denied.retry_after > Duration::ZERO, "{algorithm}");
        assert_eq!(denied.limit, 3, "{algorithm}");
        // A cost the quota can never hold.
        let never = one(store, &format!("{key}:big"), &quota, 4).await;
        assert_eq!(never.outcome, Outcome::InsufficientCapacity, "{algorithm}");
        // Cost 0 peeks and changes nothing. (A full leaky bucket denies even a peek: its next
        // departure is beyond max_delay.)
        let peek = one(store, &key, &quota, 0).await;
        assert_eq!(peek.remaining, 0, "{algorithm}");
        assert_eq!(
            one(store, &key, &quota, 0).await.remaining,
            0,
            "{algorithm}"
        );
    }

    // Token bucket timing: 60 per minute, burst 2: the third waits a second.
    let quota = Quota::per_minute(60).unwrap().with_burst(2).unwrap();
    let key = format!("{{{ns}}}:timing");
    one(store, &key, &quota, 1).await;
    let second = one(store, &key, &quota, 1).await;
    assert!(
        close(second.reset_after, Duration::from_secs(2), tol),
        "{second:?}"
    );
    let third = one(store, &key, &quota, 1).await;
    assert_eq!(third.outcome, Outcome::Denied);
    assert!(
        close(third.retry_after, Duration::from_secs(1), tol),
        "{third:?}"
    );

    // Users are isolated.
    let quota = Quota::per_hour(1).unwrap();
    assert!(
        one(store, &format!("{{{ns}}}:user:a"), &quota, 1)
            .await
            .is_allowed()
    );
    assert!(
        one(store, &format!("{{{ns}}}:user:b"), &quota, 1)
            .await
            .is_allowed()
    );
    assert!(
        !one(store, &format!("{{{ns}}}:user:a"), &quota, 1)
            .await
            .is_allowed()
    );

    // All or nothing, within a slot and across slots (the global key has no tag).
    let tier = Quota::per_hour(1).unwrap().with_burst(5).unwrap();
    let route = Quota::fixed_window(2, Duration::from_secs(86_400)).unwrap();
    let global = Quota::sliding_window_log(100, Duration::from_secs(3600)).unwrap();
    let (tier_key, route_key, global_key) = (
        format!("{{{ns}}}:tier:alice"),
        format!("{{{ns}}}:route:alice"),
        format!("{ns}-global"),
    );
    let limits = |cost| {
        [
            Limit::new(&tier_key, &tier, cost),
            Limit::new(&route_key, &route, 1),
            Limit::new(&global_key, &global, cost),
        ]
    };
    assert!(decide(store, &limits(1)).await.is_allowed());
    assert!(decide(store, &limits(1)).await.is_allowed());
    let denied = decide(store, &limits(1)).await;
    assert_eq!(denied.outcome(), Outcome::Denied);
    let d = denied.decisions();
    assert_eq!(
        (d[0].outcome, d[0].remaining),
        (Outcome::Allowed, 3),
        "{d:?}"
    );
    assert_eq!(d[1].outcome, Outcome::Denied);
    assert_eq!(d[2].remaining, 98, "{d:?}");
    assert_eq!(denied.binding().map(|(i, _)| i), Some(1));
    let peek = store.peek(&limits(0)).await.expect("peek");
    assert_eq!(
        peek.decisions()[0].remaining,
        3,
        "a denial charged the tier"
    );
    assert_eq!(
        peek.decisions()[2].remaining,
        98,
        "a denial charged the global limit"
    );
    // A denial by the last (cross-slot) limit undoes the first ones.
    let tight = Quota::per_hour(1).unwrap();
    let tight_key = format!("{ns}-tight");
    assert!(one(store, &tight_key, &tight, 1).await.is_allowed());
    let route2_key = format!("{{{ns}}}:route2");
    let log2_key = format!("{{{ns}}}:log2");
    let counter_key = format!("{{{ns}}}:counter2");
    let window = Quota::fixed_window(5, Duration::from_secs(86_400)).unwrap();
    let log = Quota::sliding_window_log(5, Duration::from_secs(3600)).unwrap();
    let counter = Quota::sliding_window_counter(5, Duration::from_secs(3600)).unwrap();
    let spread = [
        Limit::new(&tier_key, &tier, 1),
        Limit::new(&route2_key, &window, 1),
        Limit::new(&log2_key, &log, 2),
        Limit::new(&counter_key, &counter, 1),
        Limit::new(&tight_key, &tight, 1),
    ];
    let denied = decide(store, &spread).await;
    assert_eq!(denied.outcome(), Outcome::Denied);
    let after = store
        .peek(&[
            Limit::new(&tier_key, &tier, 0),
            Limit::new(&route2_key, &window, 0),
            Limit::new(&log2_key, &log, 0),
            Limit::new(&counter_key, &counter, 0),
        ])
        .await
        .expect("peek");
    let left: Vec<u32> = after.decisions().iter().map(|d| d.remaining).collect();
    assert_eq!(
        left,
        [3, 5, 5, 5],
        "a cross-slot denial left a charge behind"
    );

    // The same key twice in one request sees its own first charge.
    let q = Quota::per_hour(1).unwrap().with_burst(3).unwrap();
    let dup = format!("{{{ns}}}:dup");
    assert!(
        !decide(store, &[Limit::new(&dup, &q, 2), Limit::new(&dup, &q, 2)])
            .await
            .is_allowed()
    );
    assert_eq!(one(store, &dup, &q, 0).await.remaining, 3);

    // Reservations: a place in line, given back on cancel.
    let q = Quota::per_second(1).unwrap();
    let api = format!("{{{ns}}}:reserve");
    let l = [Limit::new(&api, &q, 1)];
    let Ok(Reserve::Granted(first)) = store.reserve(&l, Duration::from_secs(5)).await else {
        panic!("a fresh bucket grants at once")
    };
    assert_eq!(first.wait(), Duration::ZERO);
    let Ok(Reserve::Granted(second)) = store.reserve(&l, Duration::from_secs(5)).await else {
        panic!("a second within five seconds")
    };
    assert!(
        close(second.wait(), Duration::from_secs(1), tol),
        "{second:?}"
    );
    store.cancel(&second).await.expect("cancel");
    let Ok(Reserve::Granted(third)) = store.reserve(&l, Duration::from_secs(5)).await else {
        panic!("granted")
    };
    assert!(
        close(third.wait(), Duration::from_secs(1), tol),
        "{third:?}: not given back"
    );
    match store.reserve(&l, Duration::from_millis(500)).await {
        Ok(Reserve::WouldExceed { retry_after }) => {
            assert!(
                close(retry_after, Duration::from_secs(2), tol),
                "{retry_after:?}"
            )
        }
        other => panic!("expected WouldExceed, got {other:?}"),
    }
    assert!(matches!(
        store
            .reserve(&[Limit::new(&api, &q, 2)], Duration::from_secs(60))
            .await,
        Ok(Reserve::Never)
    ));
    // Given back in part: a reservation of 3 with one of 1 behind it gives back 2 (its tokens
    // minus those reserved after it), so the next unit goes 2 s earlier than it would have.
    let q5 = Quota::per_second(1).unwrap().with_burst(2).unwrap();
    let part = format!("{{{ns}}}:partial");
    let l5 = |cost| [Limit::new(&part, &q5, cost)];
    let Ok(Reserve::Granted(_now)) = store.reserve(&l5(2), Duration::from_secs(60)).await else {
        panic!("the burst at once")
    };
    let Ok(Reserve::Granted(big)) = store.reserve(&l5(2), Duration::from_secs(60)).await else {
        panic!("two more within a minute")
    };
    assert!(close(big.wait(), Duration::from_secs(2), tol), "{big:?}");
    let Ok(Reserve::Granted(small)) = store.reserve(&l5(1), Duration::from_secs(60)).await else {
        panic!("one more")
    };
    assert!(
        close(small.wait(), Duration::from_secs(3), tol),
        "{small:?}"
    );
    store.cancel(&big).await.expect("cancel");
    let Ok(Reserve::Granted(next)) = store.reserve(&l5(1), Duration::from_secs(60)).await else {
        panic!("granted")
    };
    // Without the give-back: 4 s; the whole of it back (unsound, `small` holds 3 s): 2 s.
    assert!(
        close(next.wait(), Duration::from_secs(3), tol),
        "{next:?}: expected the 1 s that `small` did not take to come back"
    );

    // Across slots: one departure time for both buckets.
    let slow_key = format!("{ns}-slow");
    let both = [Limit::new(&api, &q, 1), Limit::new(&slow_key, &q, 1)];
    match store.reserve(&both, Duration::from_secs(10)).await {
        Ok(Reserve::Granted(r)) => {
            assert!(close(r.wait(), Duration::from_secs(2), tol), "{r:?}");
            assert_eq!(r.held().len(), 2);
        }
        other => panic!("expected a grant, got {other:?}"),
    }
    // Windows cannot hold a future place.
    let w = Quota::fixed_window(1, Duration::from_secs(86_400)).unwrap();
    let wkey = format!("{{{ns}}}:reserve-window");
    let wl = [Limit::new(&wkey, &w, 1)];
    assert!(matches!(
        store.reserve(&wl, Duration::ZERO).await,
        Ok(Reserve::Granted(_))
    ));
    assert!(matches!(
        store.reserve(&wl, Duration::from_secs(86_400 * 2)).await,
        Ok(Reserve::Retry { .. })
    ));

    // Pause: nothing passes for the duration, then one at a time.
    let q = Quota::per_second(10).unwrap().with_burst(5).unwrap();
    let paused = format!("{{{ns}}}:paused");
    assert_eq!(
        store.pause(&paused, &q, Duration::from_secs(3)).await.ok(),
        Some(true)
    );
    let d = one(store, &paused, &q, 1).await;
    assert_eq!(d.outcome, Outcome::Denied);
    assert!(close(d.retry_after, Duration::from_secs(3), tol), "{d:?}");
    assert_eq!(
        store.pause(&wkey, &w, Duration::from_secs(3)).await.ok(),
        Some(false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_memory_store() {
    suite(&MemoryStore::new(), "memory").await;
}

/// The suite on both paths (`FCALL`, `EVALSHA`), each in its own namespace, checking from the
/// servers' counts that each went its way.
async fn suite_both(nodes: &[RedisServer], builder: RedisStoreBuilder, ns: &str) {
    for (scripting, path) in common::PATHS {
        let store = common::connect(builder.clone().scripting(scripting)).await;
        let ns = format!("{ns}-{path}");
        common::on_path(nodes, scripting, || suite(&store, &ns)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_single_node() {
    let server = common::server();
    let builder = common::standalone_builder(&server);
    suite_both(std::slice::from_ref(&server), builder, "single").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_cluster() {
    let cluster = common::cluster();
    suite_both(
        cluster.nodes(),
        common::cluster_builder(&cluster),
        "cluster",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_sentinel() {
    let group = common::sentinel();
    suite_both(group.nodes(), common::sentinel_builder(&group), "sentinel").await;
}

/// Four independent connections × 50 concurrent tasks on one key admit exactly the burst; and
/// multi-limit requests (per user + global, across slots on the cluster) never overspend.
async fn exactness(stores: Vec<RedisStore>, label: &str) {
    let quota = Quota::per_hour(1).unwrap().with_burst(100).unwrap();
    let admitted = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for store in &stores {
        for _ in 0..50 {
            let (store, admitted) = (store.clone(), Arc::clone(&admitted));
            tasks.push(tokio::spawn(async move {
                for _ in 0..4 {
                    if one(&store, "{hot}:key", &quota, 1).await.is_allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        admitted.load(Ordering::Relaxed),
        100,
        "{label}: 800 attempts on a burst of 100"
    );

    let per_user = Quota::per_hour(1).unwrap().with_burst(20).unwrap();
    let global = Quota::per_hour(1).unwrap().with_burst(60).unwrap();
    let counts: Arc<Vec<AtomicU32>> = Arc::new((0..4).map(|_| AtomicU32::new(0)).collect());
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for t in 0..50 {
            let (store, counts) = (store.clone(), Arc::clone(&counts));
            tasks.push(tokio::spawn(async move {
                for i in 0..2 {
                    let u = (s + t + i) % 4;
                    let user_key = format!("{{user{u}}}:tier");
                    let limits = [
                        Limit::new(&user_key, &per_user, 1),
                        Limit::new("global", &global, 1),
                    ];
                    if decide(&store, &limits).await.is_allowed() {
                        counts[u].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    let counts: Vec<u32> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(counts.iter().sum::<u32>(), 60, "{label}: {counts:?}");
    assert!(counts.iter().all(|&c| c <= 20), "{label}: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactness_single_node() {
    let server = common::server();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(common::connect(common::standalone_builder(&server)).await);
    }
    exactness(stores, "single node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactness_cluster() {
    let cluster = common::cluster();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(common::connect(common::cluster_builder(&cluster)).await);
    }
    exactness(stores, "cluster").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactness_sentinel() {
    let group = common::sentinel();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(common::connect(common::sentinel_builder(&group)).await);
    }
    exactness(stores, "sentinel").await;
}

/// Two application servers whose clocks disagree by 30 s make the same decisions, because the
/// store uses Redis' clock. The same two deciding on their own clocks would not: shown too, so the
/// test can tell the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clients_agree_on_the_server_clock() {
    let server = common::server();
    let quota = Quota::per_minute(60).unwrap().with_burst(10).unwrap();
    let real = SystemClock::new();
    let skewed = ManualClock::new(Timestamp::from_micros(
        Clock::now(&real).as_micros() + 30_000_000,
    ));

    // The skew injected into each process's clock; with the server clock it is never read.
    let a = common::connect(common::standalone_builder(&server)).await;
    let b = common::connect(common::standalone_builder(&server)).await;
    let mut allowed = 0;
    let mut retries = Vec::new();
    for i in 0..30 {
        let store = if i % 2 == 0 { &a } else { &b };
        let d = one(store, "skew:server", &quota, 1).await;
        if d.is_allowed() {
            allowed += 1;
        } else {
            retries.push(d.retry_after);
        }
    }
    assert_eq!(allowed, 10, "server clock: one bucket, one burst");
    let (lo, hi) = (retries.iter().min(), retries.iter().max());
    assert!(
        hi.zip(lo)
            .is_some_and(|(hi, lo)| *hi - *lo < Duration::from_millis(200)),
        "both processes see the same retry time: {retries:?}"
    );

    // The counterfactual: each process using its own (skewed) clock double-spends.
    let a = common::connect(common::standalone_builder(&server).client_clock(real)).await;
    let b = common::connect(common::standalone_builder(&server).client_clock(skewed)).await;
    let mut allowed = 0;
    for i in 0..30 {
        let store = if i % 2 == 0 { &a } else { &b };
        if one(store, "skew:client", &quota, 1).await.is_allowed() {
            allowed += 1;
        }
    }
    assert!(
        allowed > 10,
        "client clocks 30 s apart should overspend, got {allowed}"
    );
}

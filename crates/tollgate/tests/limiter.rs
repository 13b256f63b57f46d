//! The plain `Limiter` (issue 13) on every store: `MemoryStore`, a real Redis node and a real
//! 3-master Redis Cluster (testkit). The core's vectors replayed through `check`; the behaviour of
//! `acquire`, `reserve`, `pause` and `peek`; typed errors for bad input; the failure policy when
//! Redis is killed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::core::{DynStore, ManualClock, MemoryStore, Quota, Timestamp};
use tollgate::limiter::{LimitError, Limiter, OnStoreError};
use tollgate::redis::RedisStore;
use tollgate_core::vectors;
use tollgate_testkit::{RedisCluster, RedisServer};

/// Generous: a loaded CI machine must not turn a slow answer into a failure.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The stores the checks run on.
enum Backend {
    Memory,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis(_) => "redis",
            Backend::Cluster(_) => "redis-cluster",
        }
    }

    /// A fresh store (a prefix of its own on Redis), on the system clock.
    async fn store(&self, prefix: &str) -> Arc<dyn DynStore> {
        match self {
            Backend::Memory => Arc::new(MemoryStore::new()),
            Backend::Redis(server) => Arc::new(
                RedisStore::builder(server.url())
                    .prefix(prefix)
                    .timeout(TIMEOUT)
                    .connect()
                    .await
                    .expect("connect to redis"),
            ),
            Backend::Cluster(cluster) => Arc::new(
                RedisStore::cluster_builder(cluster.urls())
                    .prefix(prefix)
                    .timeout(TIMEOUT)
                    .connect()
                    .await
                    .expect("connect to the cluster"),
            ),
        }
    }

    /// A fresh store on `clock` (Redis: the client's clock, for replaying vectors).
    async fn store_on(&self, prefix: &str, clock: &ManualClock) -> Arc<dyn DynStore> {
        let builder = match self {
            Backend::Memory => {
                return Arc::new(MemoryStore::builder().clock(clock.clone()).build());
            }
            Backend::Redis(server) => RedisStore::builder(server.url()),
            Backend::Cluster(cluster) => RedisStore::cluster_builder(cluster.urls()),
        };
        Arc::new(
            builder
                .prefix(prefix)
                .timeout(TIMEOUT)
                .client_clock(clock.clone())
                .connect()
                .await
                .expect("connect"),
        )
    }
}

fn limiter(store: Arc<dyn DynStore>, limits: &[(&str, Quota)]) -> Limiter {
    limits
        .iter()
        .fold(Limiter::builder(), |b, (name, quota)| b.limit(name, *quota))
        .shared_store(store)
        .timeout(TIMEOUT)
        .build()
        .expect("a valid limiter")
}

fn hourly(n: u32) -> Quota {
    Quota::per_hour(n).expect("a quota")
}

/// Every vector of the core, replayed through `check` with the vector's cost: the grant (or the
/// refusal) reports exactly the model's decision.
async fn vectors_through_check(b: &Backend) {
    let clock = ManualClock::new(Timestamp::ZERO);
    let store = b.store_on("limiter-vectors", &clock).await;
    let mut steps = 0;
    for v in vectors::load().expect("the vector file parses") {
        let limiter = limiter(Arc::clone(&store), &[("v", v.quota)]);
        for (i, step) in v.steps.iter().enumerate() {
            clock.set(step.now);
            let what = format!("{}: vector {} step {i}", b.name(), v.name);
            let e = step.expected;
            match limiter
                .request(&["v"], &v.name)
                .cost(step.cost)
                .check()
                .await
            {
                Ok(grant) => {
                    assert!(e.is_allowed(), "{what}: granted, expected {e:?}");
                    assert_eq!(
                        (grant.remaining, grant.reset_after, grant.delay),
                        (e.remaining, e.reset_after, e.delay),
                        "{what}"
                    );
                }
                Err(LimitError::RateLimited(r)) => {
                    assert_eq!(e.outcome, tollgate::core::Outcome::Denied, "{what}: {r}");
                    assert_eq!(
                        (r.retry_after, r.reset_after),
                        (Some(e.retry_after), e.reset_after),
                        "{what}"
                    );
                    assert_eq!(&*r.limit, "v");
                }
                Err(LimitError::CostTooHigh { cost, capacity, .. }) => {
                    assert_eq!(
                        e.outcome,
                        tollgate::core::Outcome::InsufficientCapacity,
                        "{what}"
                    );
                    assert_eq!((cost, capacity), (step.cost, e.limit), "{what}");
                }
                Err(other) => panic!("{what}: {other}"),
            }
            steps += 1;
        }
    }
    assert!(steps > 1_000, "only {steps} steps");
}

/// `check`: a burst, then a refusal naming the limit, with honest times and words.
async fn check_and_refusal(b: &Backend) {
    let limiter = limiter(b.store("limiter-check").await, &[("slack", hourly(3))]);
    for left in [2, 1, 0] {
        let grant = limiter.check("slack", "tier2:ws-a").await.expect("granted");
        assert_eq!(
            (&*grant.limit, grant.remaining),
            ("slack", left),
            "{}",
            b.name()
        );
    }
    let e = limiter
        .check("slack", "tier2:ws-a")
        .await
        .expect_err("refused");
    let r = e.rate_limited().expect("a RateLimited");
    assert_eq!(&*r.limit, "slack");
    let retry = r.retry_after.expect("it can pass later");
    assert!(
        retry > Duration::from_secs(1190) && retry <= Duration::from_secs(1200),
        "{}: {retry:?}",
        b.name()
    );
    assert!(r.reset_after > Duration::from_secs(3590), "{r:?}");
    let text = e.to_string();
    assert!(
        text.contains("`slack`") && text.contains("retry in 1200 s"),
        "{text}"
    );
    // Another identity has its own bucket.
    assert!(limiter.check("slack", "tier2:ws-b").await.is_ok());
}

/// Several limits, all or nothing: a refusal by one charges none of the others.
async fn all_or_nothing(b: &Backend) {
    let limiter = limiter(
        b.store("limiter-all").await,
        &[("api", hourly(10)), ("endpoint", hourly(2))],
    );
    let both = ["api", "endpoint"];
    for _ in 0..2 {
        limiter.request(&both, "u1").check().await.expect("granted");
    }
    for _ in 0..3 {
        let e = limiter
            .request(&both, "u1")
            .check()
            .await
            .expect_err("refused");
        assert_eq!(&*e.rate_limited().expect("limited").limit, "endpoint");
    }
    // `api` was charged twice, not five times.
    let api = limiter.peek("api", "u1").await.expect("a peek");
    assert_eq!(api.remaining, 8, "{}", b.name());
    // Costs count against every limit of the call.
    let e = limiter
        .request(&["api"], "u2")
        .cost(11)
        .check()
        .await
        .expect_err("too costly");
    assert!(
        matches!(
            e,
            LimitError::CostTooHigh {
                cost: 11,
                capacity: 10,
                ..
            }
        ),
        "{e}"
    );
    let grant = limiter
        .request(&["api"], "u2")
        .cost(4)
        .check()
        .await
        .expect("granted");
    assert_eq!(grant.remaining, 6);
}

/// `acquire`: waits for its turn at the limit's rate; refuses at once, consuming nothing, when the
/// wait would be too long; a dropped wait gives its place back.
async fn acquire_waits_and_refuses(b: &Backend) {
    // 10 a second, burst 1.
    let quota = Quota::per_second(10)
        .and_then(|q| q.with_burst(1))
        .expect("a quota");
    let limiter = limiter(b.store("limiter-acquire").await, &[("webhook", quota)]);
    let id = "https://a.example/hook";
    let started = Instant::now();
    for _ in 0..4 {
        limiter
            .acquire("webhook", id, Duration::from_secs(2))
            .await
            .expect("granted within 2 s");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(1500),
        "{}: 4 calls at 10/s took {took:?}",
        b.name()
    );
    // A wait longer than allowed fails at once and takes nothing.
    let refused_at = Instant::now();
    let e = limiter
        .acquire("webhook", id, Duration::from_millis(10))
        .await
        .expect_err("refused");
    let refused_in = refused_at.elapsed();
    assert!(e.is_rate_limited(), "{e}");
    println!(
        "{}: a too-long wait was refused in {refused_in:?}",
        b.name()
    );
    if matches!(b, Backend::Memory) {
        assert!(refused_in < Duration::from_millis(50), "{refused_in:?}");
    }
    // A dropped wait gives its place back: the next caller gets that place, not the one after.
    tokio::time::sleep(Duration::from_millis(200)).await;
    limiter
        .acquire("webhook", id, Duration::ZERO)
        .await
        .expect("a full bucket");
    let dropped = tokio::time::timeout(
        Duration::from_millis(30),
        limiter.acquire("webhook", id, Duration::from_secs(1)),
    )
    .await;
    assert!(dropped.is_err(), "the second call should still be waiting");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let next = Instant::now();
    limiter
        .acquire("webhook", id, Duration::from_secs(1))
        .await
        .expect("granted");
    let waited = next.elapsed();
    assert!(
        waited < Duration::from_millis(90),
        "{}: waited {waited:?}: the dropped call kept its place",
        b.name()
    );
}

/// `reserve`: a place with its delay; cancelled or dropped, it is given back; committed, kept.
async fn reservations(b: &Backend) {
    let quota = Quota::per_second(1).expect("a quota");
    let limiter = limiter(b.store("limiter-reserve").await, &[("sdk", quota)]);
    let first = limiter
        .reserve("sdk", "hook", Duration::from_secs(5))
        .await
        .expect("a place");
    assert_eq!(first.delay(), Duration::ZERO);
    first.commit();
    let second = limiter
        .reserve("sdk", "hook", Duration::from_secs(5))
        .await
        .expect("a place");
    let delay = second.delay();
    assert!(
        delay > Duration::from_millis(900),
        "{}: {delay:?}",
        b.name()
    );
    second.cancel().await;
    let third = limiter
        .reserve("sdk", "hook", Duration::from_secs(5))
        .await
        .expect("a place");
    assert!(
        third.delay() <= delay,
        "{}: the cancelled place was not given back ({:?} after {delay:?})",
        b.name(),
        third.delay()
    );
    drop(third);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fourth = limiter
        .reserve("sdk", "hook", Duration::from_secs(5))
        .await
        .expect("a place");
    assert!(
        fourth.delay() <= delay,
        "{}: the dropped place was not given back",
        b.name()
    );
    // Beyond the wait allowed: refused, nothing held.
    let e = limiter
        .reserve("sdk", "hook", Duration::from_millis(100))
        .await
        .expect_err("too far ahead");
    assert!(e.is_rate_limited(), "{e}");
    fourth.wait().await;
}

/// `pause`: nobody passes until it ends; waits in progress take a place after it.
async fn pauses(b: &Backend) {
    let quota = Quota::per_second(100).expect("a quota");
    let limiter = limiter(b.store("limiter-pause").await, &[("dest", quota)]);
    limiter.check("dest", "d1").await.expect("granted");
    let started = Instant::now();
    limiter
        .pause("dest", "d1", Duration::from_millis(400))
        .await
        .expect("paused");
    let e = limiter.check("dest", "d1").await.expect_err("paused");
    assert!(e.is_rate_limited(), "{e}");
    assert!(
        limiter.check("dest", "d2").await.is_ok(),
        "other identities go on"
    );
    limiter
        .acquire("dest", "d1", Duration::from_secs(2))
        .await
        .expect("after the pause");
    assert!(
        started.elapsed() >= Duration::from_millis(380),
        "{}: passed {:?} into a 400 ms pause",
        b.name(),
        started.elapsed()
    );

    // A window limit cannot be paused: said, not silently ignored.
    let window = Quota::fixed_window(100, Duration::from_secs(1)).expect("a quota");
    let windowed = crate::limiter(b.store("limiter-pause-window").await, &[("events", window)]);
    let e = windowed
        .pause("events", "d1", Duration::from_millis(400))
        .await
        .expect_err("a window limit cannot be paused");
    assert!(
        matches!(&e, LimitError::CannotPause { limit, .. } if limit == "events"),
        "{e:?}"
    );
    assert!(e.to_string().contains("fixed_window"), "{e}");
    assert!(
        windowed.check("events", "d1").await.is_ok(),
        "nothing paused"
    );
}

async fn run_all(b: &Backend) {
    vectors_through_check(b).await;
    check_and_refusal(b).await;
    all_or_nothing(b).await;
    acquire_waits_and_refuses(b).await;
    reservations(b).await;
    pauses(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_on_memory() {
    run_all(&Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_on_a_redis_node() {
    let server = tokio::task::block_in_place(RedisServer::start).expect("redis-server starts");
    run_all(&Backend::Redis(server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_on_a_redis_cluster() {
    let cluster = tokio::task::block_in_place(RedisCluster::start).expect("a cluster starts");
    run_all(&Backend::Cluster(cluster)).await;
}

/// Bad input is a typed error, never a panic.
#[tokio::test]
async fn bad_input_is_a_typed_error() {
    let limiter = Limiter::builder()
        .limit("slack", hourly(5))
        .build()
        .expect("a limiter");
    assert!(matches!(
        limiter.check("nope", "id").await,
        Err(LimitError::UnknownLimit { name }) if name == "nope"
    ));
    assert!(matches!(
        limiter.check("slack", "").await,
        Err(LimitError::InvalidIdentity { .. })
    ));
    let huge = "x".repeat(tollgate::limiter::MAX_IDENTITY_LEN + 1);
    assert!(matches!(
        limiter.check("slack", &huge).await,
        Err(LimitError::InvalidIdentity { .. })
    ));
    // Long identities are fingerprinted, not truncated: two that share a long prefix differ.
    let long_a = format!("{}a", "x".repeat(1000));
    let long_b = format!("{}b", "x".repeat(1000));
    for _ in 0..5 {
        limiter.check("slack", &long_a).await.expect("granted");
    }
    assert!(limiter.check("slack", &long_a).await.is_err());
    assert!(limiter.check("slack", &long_b).await.is_ok());
    assert!(matches!(
        limiter.request(&[], "id").check().await,
        Err(LimitError::NoLimit)
    ));
    assert!(matches!(
        Limiter::builder()
            .limit("a", hourly(1))
            .limit("a", hourly(2))
            .build(),
        Err(LimitError::DuplicateLimit { .. })
    ));
    assert!(matches!(
        Limiter::builder().limit("{a}", hourly(1)).build(),
        Err(LimitError::InvalidLimitName { .. })
    ));
}

/// Redis killed mid-run: each policy holds, with no panic and no hang past the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_follows_the_failure_policy() {
    for policy in [
        OnStoreError::Local,
        OnStoreError::FailOpen,
        OnStoreError::FailClosed,
    ] {
        let mut server =
            tokio::task::block_in_place(RedisServer::start).expect("redis-server starts");
        let store = RedisStore::builder(server.url())
            .timeout(Duration::from_millis(200))
            .connect()
            .await
            .expect("connect");
        let limiter = Limiter::builder()
            .limit("job", hourly(2))
            .store(store)
            .timeout(Duration::from_millis(200))
            .on_store_error(policy)
            .build()
            .expect("a limiter");
        limiter.check("job", "j").await.expect("granted");
        tokio::task::block_in_place(|| server.stop());
        let mut answers = Vec::new();
        for _ in 0..4 {
            let started = Instant::now();
            let answer = limiter.check("job", "j").await;
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "{policy:?}: took {:?}",
                started.elapsed()
            );
            answers.push(answer);
        }
        match policy {
            // The local store starts fresh: two, then refused.
            OnStoreError::Local => {
                assert!(answers[0].is_ok() && answers[1].is_ok(), "{answers:?}");
                assert!(answers[2].as_ref().is_err_and(LimitError::is_rate_limited));
            }
            OnStoreError::FailOpen => {
                assert!(
                    answers
                        .iter()
                        .all(|a| a.as_ref().is_ok_and(|g| g.store_error))
                );
            }
            OnStoreError::FailClosed => {
                assert!(
                    answers
                        .iter()
                        .all(|a| matches!(a, Err(LimitError::Unavailable)))
                );
            }
        }
        // `acquire` too never hangs.
        let started = Instant::now();
        let _ = limiter.acquire("job", "k", Duration::from_secs(1)).await;
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{policy:?}"
        );
    }
}

/// The blocking forms work from plain threads (several at once, exactly the burst between
/// them) and refuse clearly, at once, inside a runtime.
#[test]
fn blocking_forms_work_from_plain_threads() {
    let limiter = Limiter::builder()
        .limit("hook", hourly(20))
        .build()
        .expect("a limiter");
    let granted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let limiter = &limiter;
                s.spawn(move || {
                    (0..5)
                        .filter(|_| limiter.blocking().check("hook", "slack:ws").is_ok())
                        .count()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a thread"))
            .sum()
    });
    assert_eq!(granted, 20, "exactly the burst across 8 threads");
    // acquire sleeps the thread for its turn: 10 a second, burst 1.
    let paced = Limiter::builder()
        .limit(
            "sdk",
            Quota::per_second(10)
                .and_then(|q| q.with_burst(1))
                .expect("a quota"),
        )
        .build()
        .expect("a limiter");
    let started = Instant::now();
    for _ in 0..3 {
        paced
            .blocking()
            .acquire("sdk", "x", Duration::from_secs(2))
            .expect("granted");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(180),
        "{:?}",
        started.elapsed()
    );
    let e = paced
        .blocking()
        .acquire("sdk", "x", Duration::ZERO)
        .expect_err("no room now");
    assert!(e.is_rate_limited(), "{e}");
    // Inside a runtime: refused at once, with words that say what to do.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let inside = runtime.block_on(async { paced.blocking().check("sdk", "y") });
    match inside {
        Err(e @ LimitError::InsideRuntime) => {
            assert!(e.to_string().contains(".await"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // Dropping a limiter whose blocking runtime runs, inside an async task, is fine.
    runtime.block_on(async move { drop(paced) });
}

/// A Redis store for synchronous code, built in the limiter's own runtime.
#[test]
fn blocking_forms_on_redis() {
    let server = RedisServer::start().expect("redis-server starts");
    let url = server.url();
    let limiter = Limiter::builder()
        .limit("slack", hourly(3))
        .timeout(TIMEOUT)
        .store_with(|| {
            RedisStore::builder(url)
                .prefix("limiter-blocking")
                .timeout(TIMEOUT)
                .build()
        })
        .expect("a store")
        .build()
        .expect("a limiter");
    let blocking = limiter.blocking();
    for _ in 0..3 {
        let grant = blocking.check("slack", "ws").expect("granted");
        assert!(!grant.store_error);
    }
    assert!(
        blocking
            .check("slack", "ws")
            .is_err_and(|e| e.is_rate_limited())
    );
    let keys = server.cmd(&["KEYS", "limiter-blocking:*"]).expect("KEYS");
    assert_eq!(
        keys.as_array().map(<[_]>::len),
        Some(1),
        "the state is in Redis: {keys:?}"
    );
}

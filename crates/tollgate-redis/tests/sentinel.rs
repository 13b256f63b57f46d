//! The Sentinel-backed store through a failover, against real processes: a master, its replica
//! and three sentinels. Every call answers within the store timeout plus a margin while the
//! master changes, and decisions come from Redis (the new master) again within seconds.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate_core::{Limit, Quota, Store};
use tollgate_redis::RedisStore;
use tollgate_testkit::{RedisSentinel, Reply};

/// The store timeout of these tests: short, as in production, so a hang would show.
const TIMEOUT: Duration = Duration::from_millis(200);
/// What a call may take past the timeout on a shared, loaded CI machine.
const MARGIN: Duration = Duration::from_millis(300);
/// How long after the new master is known decisions must come from Redis again.
const RECOVERY: Duration = Duration::from_secs(5);

async fn store(group: &RedisSentinel) -> RedisStore {
    common::connect(
        RedisStore::sentinel_builder(group.master_name(), group.sentinel_urls())
            .prefix("sentinel-test")
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT),
    )
    .await
}

/// Calls running on `store` until stopped: how many, how many failed, the slowest.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    slowest_micros: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(store: &RedisStore, tasks: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let slowest_micros = Arc::new(AtomicU64::new(0));
        let tasks = (0..tasks)
            .map(|i| {
                let (store, stop, calls, errors, slowest) = (
                    store.clone(),
                    stop.clone(),
                    calls.clone(),
                    errors.clone(),
                    slowest_micros.clone(),
                );
                tokio::spawn(async move {
                    let quota = Quota::per_second(1_000_000).unwrap();
                    let key = format!("load:{i}");
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let result = store.decide(&[Limit::new(&key, &quota, 1)]).await;
                        let took = u64::try_from(started.elapsed().as_micros()).unwrap();
                        slowest.fetch_max(took, Ordering::Relaxed);
                        calls.fetch_add(1, Ordering::Relaxed);
                        if result.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            // The failure policy would answer; do not spin on a dead master.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            calls,
            errors,
            slowest_micros,
            tasks,
        }
    }

    /// Stops the load; returns (calls, errors, slowest call).
    async fn finish(self) -> (u64, u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        (
            self.calls.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            Duration::from_micros(self.slowest_micros.load(Ordering::Relaxed)),
        )
    }
}

/// Runs a blocking testkit call (they poll with `thread::sleep`) off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Waits (up to [`RECOVERY`]) until a decision succeeds and its key is on `master`: decisions
/// come from Redis, from the new master. Returns how long that took.
async fn decisions_reach(
    store: &RedisStore,
    group: &RedisSentinel,
    master: SocketAddr,
) -> Duration {
    let node = group.node_index(master).expect("the master is one of ours");
    let quota = Quota::per_hour(1_000).unwrap();
    let started = Instant::now();
    let mut last = String::new();
    let mut n = 0;
    while started.elapsed() < RECOVERY {
        n += 1;
        let key = format!("probe:{n}");
        match store.decide(&[Limit::new(&key, &quota, 1)]).await {
            Ok(_) => {
                let exists = group.nodes()[node]
                    .cmd(&["EXISTS", &store.redis_key(&key)])
                    .unwrap();
                if exists == Reply::Int(1) {
                    return started.elapsed();
                }
                last = format!("decided, but {key} is not on the new master {master}");
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("decisions did not reach the new master {master} within {RECOVERY:?}: {last}");
}

fn assert_bounded(label: &str, calls: u64, errors: u64, slowest: Duration) {
    eprintln!("{label}: {calls} calls, {errors} failed, slowest {slowest:?}");
    assert!(calls > 0, "{label}: no call ran");
    assert!(
        slowest <= TIMEOUT + MARGIN,
        "{label}: a call took {slowest:?}, more than the timeout {TIMEOUT:?} + {MARGIN:?}"
    );
}

/// `SENTINEL FAILOVER`, then the new master once every sentinel names it (off the runtime: the
/// testkit blocks).
async fn forced_failover(group: RedisSentinel, old: SocketAddr) -> (RedisSentinel, SocketAddr) {
    blocking(move || {
        let mut group = group;
        group.failover().unwrap();
        let new = group
            .wait_for_new_master(old, Duration::from_secs(20))
            .unwrap();
        (group, new)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_failover_is_followed_and_no_call_hangs() {
    let group = common::sentinel();
    let store = store(&group).await;
    let old = group.master_addr().unwrap();
    common::burst_is_exact(&store, "before").await;

    let load = Load::start(&store, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (group, new) = forced_failover(group, old).await;
    assert_ne!(new, old);
    let took = decisions_reach(&store, &group, new).await;
    eprintln!("decisions on the new master {took:?} after the sentinels named it");
    // Load keeps running on the new master for a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (calls, errors, slowest) = load.finish().await;
    assert_bounded("forced failover", calls, errors, slowest);
    common::burst_is_exact(&store, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_the_store_follows() {
    let group = common::sentinel();
    let store = store(&group).await;
    let old = group.master_addr().unwrap();

    let load = Load::start(&store, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (group, new) = blocking(move || {
        let mut group = group;
        let index = group.node_index(old).unwrap();
        group.node_mut(index).stop();
        let new = group
            .wait_for_new_master(old, Duration::from_secs(30))
            .unwrap();
        (group, new)
    })
    .await;
    let took = decisions_reach(&store, &group, new).await;
    eprintln!("decisions on the new master {took:?} after the sentinels named it");
    let (calls, errors, slowest) = load.finish().await;
    assert_bounded("killed master", calls, errors, slowest);
    assert!(errors > 0, "the master was killed, yet no call failed");
    common::burst_is_exact(&store, "after-kill").await;
}

/// A promoted replica may not have the script cached (the script cache does not replicate) and,
/// after a `FUNCTION FLUSH`, not the library either (libraries do replicate): the first call
/// after the failover loads what it uses (NOSCRIPT or "Function not found", then the code), and
/// decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_master_without_the_script_still_decides() {
    let group = common::sentinel();
    let store = store(&group).await;
    let old = group.master_addr().unwrap();
    common::burst_is_exact(&store, "before").await;
    let (group, new) = forced_failover(group, old).await;
    let node = &group.nodes()[group.node_index(new).unwrap()];
    // The library loaded on the old master came over with replication.
    assert!(
        common::has_library(node),
        "the promoted replica has no tollgate library"
    );
    for flush in [["SCRIPT", "FLUSH"], ["FUNCTION", "FLUSH"]] {
        assert_eq!(node.cmd(&flush).unwrap(), Reply::Status("OK".into()));
    }
    decisions_reach(&store, &group, new).await;
    common::burst_is_exact(&store, "after").await;
}

/// A group whose data nodes ask for a password: the store given it (`master_auth`) decides on
/// the master and follows a failover to the replica (same password); without it, every call
/// fails fast and says why. The option on a store that is not a Sentinel one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_behind_a_password_is_reached_with_master_auth() {
    let group =
        blocking(|| RedisSentinel::start_with_password("s3cret-pw").expect("a group")).await;
    let store = common::connect(
        RedisStore::sentinel_builder(group.master_name(), group.sentinel_urls())
            .master_auth(None, "s3cret-pw")
            .prefix("auth-test")
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT),
    )
    .await;
    assert!(
        !format!("{store:?}").contains("s3cret"),
        "the store's Debug shows the password"
    );
    common::burst_is_exact(&store, "auth:before").await;
    let old = group.master_addr().unwrap();
    let (group, new) = forced_failover(group, old).await;
    decisions_reach(&store, &group, new).await;
    common::burst_is_exact(&store, "auth:after").await;

    let no_auth = RedisStore::sentinel_builder(group.master_name(), group.sentinel_urls())
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .build()
        .unwrap();
    let quota = Quota::per_hour(10).unwrap();
    let started = Instant::now();
    let e = no_auth
        .decide(&[Limit::new("auth:none", &quota, 1)])
        .await
        .expect_err("a master that asks for a password refuses a store without it");
    assert!(
        started.elapsed() <= TIMEOUT + MARGIN,
        "{:?}",
        started.elapsed()
    );
    assert!(e.is_unavailable() || e.is_timeout(), "{:?}: {e}", e.kind());

    let builder = RedisStore::builder("redis://127.0.0.1:6379").master_auth(None, "pw");
    let e = builder
        .build()
        .expect_err("master_auth on a standalone store");
    assert!(e.to_string().contains("sentinel store only"), "{e}");
    let e = RedisStore::builder("redis://127.0.0.1:6379")
        .master_db(2)
        .build()
        .expect_err("master_db on a standalone store");
    assert!(e.to_string().contains("in the url"), "{e}");
    let builder = RedisStore::sentinel_builder("m", ["redis://127.0.0.1:26379"])
        .master_auth(Some("app"), "s3cret-pw");
    assert!(!format!("{builder:?}").contains("s3cret"), "{builder:?}");
}

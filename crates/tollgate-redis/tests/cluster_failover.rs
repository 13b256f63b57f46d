//! The cluster store through a failover, against a real Redis Cluster of three masters, each with
//! one replica: a master killed (or frozen) under load. Every call answers within the store
//! timeout plus a margin and fails only as unavailable or timed out; once a replica is promoted,
//! decisions come from Redis (the promoted replica) again within seconds, exactly; and the
//! cross-slot (global) limit admits no more than its burst outside the failure window.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_core::{Limit, Quota, Store};
use tollgate_redis::{RedisStore, Scripting};
use tollgate_testkit::{RedisCluster, RedisServer, Reply};

/// The store timeout of the load tests: short, as in production, so a hang would show.
const TIMEOUT: Duration = Duration::from_millis(200);
/// What a call may take past the timeout on a shared, loaded CI machine.
const MARGIN: Duration = Duration::from_millis(300);
/// How long a promotion may take (2 s node timeout, failure agreement, election).
const FAILOVER: Duration = Duration::from_secs(15);
/// How long after the promotion decisions must come from Redis again.
const RECOVERY: Duration = Duration::from_secs(5);

async fn store(urls: Vec<String>, timeout: Duration) -> RedisStore {
    store_scripted(urls, timeout, Scripting::Auto).await
}

async fn store_scripted(urls: Vec<String>, timeout: Duration, scripting: Scripting) -> RedisStore {
    common::connect(
        RedisStore::cluster_builder(urls)
            .prefix("failover-test")
            .scripting(scripting)
            .timeout(timeout)
            .connect_timeout(timeout),
    )
    .await
}

/// Runs blocking test-kit code (process control, waiting for the cluster) off the async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A hash tag whose keys (`{tag}:...`, under the store's prefix) node `master` serves.
fn tag_on(cluster: &RedisCluster, store: &RedisStore, master: usize) -> String {
    (0..100_000)
        .map(|n| format!("t{n}"))
        .find(|tag| {
            cluster
                .node_for_key(&store.redis_key(&format!("{{{tag}}}")))
                .expect("CLUSTER SLOTS")
                == master
        })
        .unwrap_or_else(|| panic!("no hash tag found on node {master}"))
}

/// A key without hash tag, starting with `base`, whose slot node `master` serves.
fn untagged_on(cluster: &RedisCluster, store: &RedisStore, base: &str, master: usize) -> String {
    (0..100_000)
        .map(|n| format!("{base}:{n}"))
        .find(|key| {
            cluster
                .node_for_key(&store.redis_key(key))
                .expect("CLUSTER SLOTS")
                == master
        })
        .unwrap_or_else(|| panic!("no {base} key found on node {master}"))
}

fn slot_of(node: &RedisServer, key: &str) -> i64 {
    let reply = node
        .cmd(&["CLUSTER", "KEYSLOT", key])
        .expect("CLUSTER KEYSLOT");
    reply.as_int().expect("a slot number")
}

/// The only replica of `master`.
fn replica_of(cluster: &RedisCluster, master: usize) -> usize {
    match cluster.replicas_of(master).expect("ROLE").as_slice() {
        [replica] => *replica,
        other => panic!("node {master} has replicas {other:?}, want exactly one"),
    }
}

/// Calls running on `store` until stopped, one task per key: how many, how many failed, how
/// many failed otherwise than unavailable or timed out, the slowest.
struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    slowest_micros: AtomicU64,
    /// Errors neither unavailable nor timeout: a bug (protocol, script, misrouted call).
    wrong: Mutex<Vec<String>>,
}

struct Finished {
    calls: u64,
    errors: u64,
    timeouts: u64,
    slowest: Duration,
    wrong: Vec<String>,
}

impl Load {
    fn start(store: &RedisStore, keys: &[String]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let tasks = keys
            .iter()
            .map(|key| {
                let (store, stop, stats, key) =
                    (store.clone(), stop.clone(), stats.clone(), key.clone());
                tokio::spawn(async move {
                    let quota = Quota::per_second(1_000_000).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let result = store.decide(&[Limit::new(&key, &quota, 1)]).await;
                        let took = u64::try_from(started.elapsed().as_micros()).unwrap();
                        stats.slowest_micros.fetch_max(took, Ordering::Relaxed);
                        stats.calls.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = result {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            if e.is_timeout() {
                                stats.timeouts.fetch_add(1, Ordering::Relaxed);
                            } else if !e.is_unavailable() {
                                stats
                                    .wrong
                                    .lock()
                                    .unwrap()
                                    .push(format!("{key}: {:?}: {e}", e.kind()));
                            }
                            // The failure policy would answer; do not spin on a dead master.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, stats, tasks }
    }

    async fn finish(self) -> Finished {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        let stats = &self.stats;
        Finished {
            calls: stats.calls.load(Ordering::Relaxed),
            errors: stats.errors.load(Ordering::Relaxed),
            timeouts: stats.timeouts.load(Ordering::Relaxed),
            slowest: Duration::from_micros(stats.slowest_micros.load(Ordering::Relaxed)),
            wrong: stats.wrong.lock().unwrap().clone(),
        }
    }
}

/// Every call answered within the timeout plus the margin, and failed, if at all, as
/// unavailable or timed out.
fn assert_bounded(label: &str, done: &Finished) {
    eprintln!(
        "{label}: {} calls, {} failed ({} timed out), slowest {:?}",
        done.calls, done.errors, done.timeouts, done.slowest
    );
    assert!(done.calls > 0, "{label}: no call ran");
    assert!(
        done.slowest <= TIMEOUT + MARGIN,
        "{label}: a call took {:?}, more than the timeout {TIMEOUT:?} + {MARGIN:?}",
        done.slowest
    );
    assert!(
        done.wrong.is_empty(),
        "{label}: {} calls failed otherwise than unavailable or timeout, first: {:?}",
        done.wrong.len(),
        done.wrong.first()
    );
}

/// Waits (up to [`RECOVERY`]) until a decision on a fresh key of hash tag `tag` succeeds and its
/// key is on node `master`: decisions come from Redis, from that node. Returns how long it took.
async fn decisions_reach(
    store: &RedisStore,
    cluster: &RedisCluster,
    tag: &str,
    master: usize,
) -> Duration {
    let quota = Quota::per_hour(1_000).unwrap();
    let started = Instant::now();
    let mut last = String::new();
    let mut n = 0;
    while started.elapsed() < RECOVERY {
        n += 1;
        let key = format!("{{{tag}}}:probe:{n}");
        match store.decide(&[Limit::new(&key, &quota, 1)]).await {
            Ok(_) => {
                let exists = cluster.nodes()[master]
                    .cmd(&["EXISTS", &store.redis_key(&key)])
                    .expect("EXISTS");
                if exists == Reply::Int(1) {
                    return started.elapsed();
                }
                last = format!("decided, but {key} is not on node {master}: {exists:?}");
            }
            Err(e) => last = format!("{:?}: {e}", e.kind()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("decisions did not reach node {master} within {RECOVERY:?}: {last}");
}

/// One load key per master (two tasks each): traffic on every master's slots.
fn load_keys(cluster: &RedisCluster, store: &RedisStore, masters: &[usize]) -> Vec<String> {
    masters
        .iter()
        .flat_map(|&m| {
            let tag = tag_on(cluster, store, m);
            [format!("{{{tag}}}:load:a"), format!("{{{tag}}}:load:b")]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_is_replaced_by_its_replica_and_the_store_follows() {
    let mut cluster = common::cluster_with_replicas();
    // Only the masters' URLs: the store discovers the replicas (and later the promoted one).
    // On EVALSHA: a promoted replica lacks the script cache (a Functions library replicates,
    // see `the_new_master_without_the_script_still_decides` in sentinel.rs), and the reload on
    // NOSCRIPT is what this test is about.
    let urls = cluster.master_urls().unwrap();
    let store = store_scripted(urls, TIMEOUT, Scripting::Eval).await;
    let masters = cluster.masters().unwrap();
    let victim = masters[0];
    let replica = replica_of(&cluster, victim);
    let tag = tag_on(&cluster, &store, victim);
    common::burst_is_exact(&store, &format!("{{{tag}}}:before")).await;

    // The promoted replica must not have the script cached: the store has to load it on NOSCRIPT.
    let sha = common::script_sha1(&cluster.nodes()[victim]);
    assert!(common::script_cached(&cluster.nodes()[victim], &sha));
    assert_eq!(
        cluster.nodes()[replica].cmd(&["SCRIPT", "FLUSH"]).unwrap(),
        Reply::Status("OK".into())
    );
    assert!(!common::script_cached(&cluster.nodes()[replica], &sha));

    let load = Load::start(&store, &load_keys(&cluster, &store, &masters));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    let new = blocking(|| {
        cluster.stop_node(victim);
        cluster.wait_for_failover(victim, FAILOVER)
    })
    .unwrap();
    let promoted_after = killed_at.elapsed();
    assert_eq!(new, replica, "the killed master's replica is promoted");
    let took = decisions_reach(&store, &cluster, &tag, new).await;
    eprintln!("promotion {promoted_after:?} after the kill; decisions on it {took:?} later");
    // Load keeps running on the new topology for a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = load.finish().await;
    assert_bounded("killed master", &done);
    assert!(done.errors > 0, "a master was killed, yet no call failed");

    assert!(
        common::script_cached(&cluster.nodes()[new], &sha),
        "the store decided on the promoted replica without loading the script?"
    );
    common::burst_is_exact(&store, &format!("{{{tag}}}:after")).await;
    // Every master's slots are served again, by the store too.
    for m in cluster.masters().unwrap() {
        let tag = tag_on(&cluster, &store, m);
        common::burst_is_exact(&store, &format!("{{{tag}}}:every-master")).await;
    }

    // The killed node comes back as a replica of the promoted one; the store, which never saw
    // it as anything but a dead master, keeps deciding on the promoted node.
    blocking(|| cluster.restart_node(victim)).unwrap();
    assert_eq!(cluster.master_of(victim).unwrap(), Some(new));
    assert_eq!(
        cluster
            .node_for_key(&store.redis_key(&format!("{{{tag}}}")))
            .unwrap(),
        new
    );
    decisions_reach(&store, &cluster, &tag, new).await;
    common::burst_is_exact(&store, &format!("{{{tag}}}:rejoined")).await;
}

/// Several tasks deciding `[own limit, global limit]` at once; the global limit's burst is `B` and
/// it refills one an hour. Returns how many calls were admitted and the errors.
async fn global_phase(
    store: &RedisStore,
    global: &str,
    tasks: usize,
    calls: usize,
) -> (usize, Vec<String>) {
    const _: () = assert!(GLOBAL_BURST > 0);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (store, global) = (store.clone(), global.to_owned());
            tokio::spawn(async move {
                let own = Quota::per_second(1_000_000).unwrap();
                let shared = Quota::per_hour(1)
                    .unwrap()
                    .with_burst(GLOBAL_BURST)
                    .unwrap();
                let user = format!("{{user:{t}}}:tier");
                let mut admitted = 0;
                let mut errors = Vec::new();
                for _ in 0..calls {
                    let limits = [Limit::new(&user, &own, 1), Limit::new(&global, &shared, 1)];
                    match store.decide(&limits).await {
                        Ok(v) if v.is_allowed() => admitted += 1,
                        Ok(_) => {}
                        Err(e) => {
                            errors.push(format!("{:?}: {e}", e.kind()));
                            // The failure policy would answer; do not spin on a dead master.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                (admitted, errors)
            })
        })
        .collect();
    let mut admitted = 0;
    let mut errors = Vec::new();
    for handle in handles {
        let (a, e) = handle.await.expect("phase task");
        admitted += a;
        errors.extend(e);
    }
    (admitted, errors)
}

const GLOBAL_BURST: u32 = 40;
const GLOBAL_TASKS: usize = 8;
const GLOBAL_CALLS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_limit_never_overshoots_before_or_after_a_failover() {
    let mut cluster = common::cluster_with_replicas();
    // All nodes' URLs, replicas included.
    let urls = cluster.urls();
    // A generous timeout: this test is about counts, not latency; a timed-out call's outcome is
    // unknown and would blur the count.
    let store = store(urls, common::TEST_TIMEOUT).await;
    let demand = GLOBAL_TASKS * GLOBAL_CALLS;
    assert!(
        demand > GLOBAL_BURST as usize * 2,
        "demand must exceed the burst"
    );

    let masters = cluster.masters().unwrap();
    let victim = masters[1];
    let global = untagged_on(&cluster, &store, "global-before", victim);
    let node = &cluster.nodes()[victim];
    for t in 0..GLOBAL_TASKS {
        let user = store.redis_key(&format!("{{user:{t}}}:tier"));
        assert_ne!(
            slot_of(node, &user),
            slot_of(node, &store.redis_key(&global)),
            "{user} and {global} must be in different slots: the decision is cross-slot"
        );
    }

    let (admitted, errors) = global_phase(&store, &global, GLOBAL_TASKS, GLOBAL_CALLS).await;
    eprintln!(
        "before the failover: {admitted} of {demand} admitted, {} errors",
        errors.len()
    );
    assert!(errors.is_empty(), "errors on a healthy cluster: {errors:?}");
    assert_eq!(
        admitted, GLOBAL_BURST as usize,
        "a global burst of {GLOBAL_BURST} under a demand of {demand}"
    );

    // Kill the master of the global key, with requests still coming (denied, or failing) through
    // the failure window (about 1000 calls a task, most failing after 5 ms each).
    let load = tokio::spawn({
        let (store, global) = (store.clone(), global.clone());
        async move { global_phase(&store, &global, 2, 1_000).await }
    });
    let new = blocking(|| {
        cluster.stop_node(victim);
        cluster.wait_for_failover(victim, FAILOVER)
    })
    .unwrap();
    let (during, errors) = load.await.expect("load during the failover");
    eprintln!(
        "during the failover: {during} admitted on the exhausted global key, {} errors",
        errors.len()
    );
    for e in &errors {
        assert!(
            e.starts_with("Unavailable") || e.starts_with("Timeout"),
            "an error otherwise than unavailable or timeout: {e}"
        );
    }

    // After recovery, a fresh global key on the promoted master.
    let global = untagged_on(&cluster, &store, "global-after", new);
    let tag = tag_on(&cluster, &store, new);
    decisions_reach(&store, &cluster, &tag, new).await;
    let (admitted, errors) = global_phase(&store, &global, GLOBAL_TASKS, GLOBAL_CALLS).await;
    eprintln!(
        "after the failover: {admitted} of {demand} admitted, {} errors",
        errors.len()
    );
    assert!(errors.is_empty(), "errors after the recovery: {errors:?}");
    assert_eq!(
        admitted, GLOBAL_BURST as usize,
        "a global burst of {GLOBAL_BURST} under a demand of {demand}, after the failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_paused_briefly_times_calls_out_and_the_store_recovers() {
    let mut cluster = common::cluster_with_replicas();
    let store = store(cluster.urls(), TIMEOUT).await;
    let masters = cluster.masters().unwrap();
    let victim = masters[2];
    let tag = tag_on(&cluster, &store, victim);
    common::burst_is_exact(&store, &format!("{{{tag}}}:before")).await;

    let load = Load::start(&store, &load_keys(&cluster, &store, &masters));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Shorter than the 2 s node timeout: usually no failover, but a loaded machine may see one.
    blocking(|| cluster.pause_node(victim)).unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    blocking(|| cluster.resume_node(victim)).unwrap();
    let resumed_at = Instant::now();
    blocking(|| cluster.wait_ok(Duration::from_secs(20))).unwrap();
    let owner = blocking(|| cluster.node_for_key(&store.redis_key(&format!("{{{tag}}}")))).unwrap();
    decisions_reach(&store, &cluster, &tag, owner).await;
    eprintln!(
        "after the resume: healthy, the slot on node {owner} (paused: node {victim}), decisions \
         {:?} after the resume",
        resumed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = load.finish().await;
    assert_bounded("paused master", &done);
    assert!(
        done.timeouts > 0,
        "a master was frozen for 1.5 s, yet no call timed out"
    );
    common::burst_is_exact(&store, &format!("{{{tag}}}:after")).await;
}

/// A replica that is down must not keep the store from loading the script on a master that lost
/// it (restarted, flushed): redis-rs sends `SCRIPT LOAD` to every node it knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_does_not_keep_the_script_from_loading() {
    let mut cluster = common::cluster_with_replicas();
    let store = store(cluster.urls(), TIMEOUT).await;
    let master = cluster.masters().unwrap()[0];
    let replica = replica_of(&cluster, master);
    let tag = tag_on(&cluster, &store, master);
    common::burst_is_exact(&store, &format!("{{{tag}}}:before")).await;

    blocking(|| cluster.stop_node(replica));
    // Until the others flag it failed, and after.
    for wait in [Duration::ZERO, Duration::from_secs(5)] {
        tokio::time::sleep(wait).await;
        let node = &cluster.nodes()[master];
        let sha = common::script_sha1(node);
        assert_eq!(
            node.cmd(&["SCRIPT", "FLUSH"]).unwrap(),
            Reply::Status("OK".into())
        );
        assert!(!common::script_cached(node, &sha));
        let key = format!("{{{tag}}}:after-{}", wait.as_secs());
        let quota = Quota::per_hour(1_000).unwrap();
        let mut last = String::new();
        let started = Instant::now();
        loop {
            match store.decide(&[Limit::new(&key, &quota, 1)]).await {
                Ok(_) => break,
                Err(e) => last = format!("{:?}: {e}", e.kind()),
            }
            assert!(
                started.elapsed() < RECOVERY,
                "no decision on node {master} (script flushed, replica {replica} down, {wait:?} \
                 after the stop) within {RECOVERY:?}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "{wait:?} after the stop: decided after {:?} ({last})",
            started.elapsed()
        );
    }
}

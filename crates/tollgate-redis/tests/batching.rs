//! Batching of decisions (`RedisStoreBuilder::batching`, on by default): the decisions queued
//! behind a call in flight go out as one script call that decides each on its own. Against real
//! servers: batches form under load and decide exactly what one call each would, a lone decision
//! goes out at once, one decision's denial leaves its batch's others alone, a batch that times
//! out fails each of its decisions and is never sent again, and a cluster batches slot by slot.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::vectors;
use tollgate_core::{Limit, ManualClock, Outcome, Quota, Store, Timestamp};
use tollgate_redis::{RedisStore, RedisStoreBuilder};
use tollgate_testkit::RedisServer;

/// The script calls (`FCALL` and `EVALSHA`) `nodes` ran so far.
fn script_calls(nodes: &[RedisServer]) -> u64 {
    common::calls(nodes, "fcall") + common::calls(nodes, "evalsha")
}

/// `tasks` tasks, released together, each deciding `limits` once on `store`; the verdicts'
/// `is_allowed`, in task order. Every call must answer.
async fn burst_of(
    store: &RedisStore,
    tasks: usize,
    limits: impl Fn(usize) -> Vec<(String, Quota)>,
) -> Vec<bool> {
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let (store, start, limits) = (store.clone(), Arc::clone(&start), limits(t));
        handles.push(tokio::spawn(async move {
            let limits: Vec<Limit<'_>> = limits.iter().map(|(k, q)| Limit::new(k, q, 1)).collect();
            start.wait().await;
            match store.decide(&limits).await {
                Ok(verdict) => verdict.is_allowed(),
                Err(e) => panic!("task {t}: {e}"),
            }
        }));
    }
    let mut allowed = Vec::with_capacity(tasks);
    for handle in handles {
        allowed.push(handle.await.expect("a task panicked"));
    }
    allowed
}

/// A burst of `burst` that does not refill while a test runs.
fn burst(burst: u32) -> Quota {
    Quota::per_hour(1)
        .and_then(|q| q.with_burst(burst))
        .expect("quota")
}

/// Replays the core's vectors on `builder`'s store, each step decided on `copies` keys at once
/// (the same state in each copy, so the same decision), and checks every decision against the
/// vector's. Returns the decisions made, in order, one per step and copy.
async fn replay(builder: RedisStoreBuilder, copies: usize, label: &str) -> Vec<String> {
    let clock = ManualClock::new(Timestamp::ZERO);
    let store = common::connect(builder.client_clock(clock.clone())).await;
    let all = vectors::load().expect("the vector file parses");
    let mut seen = Vec::new();
    for v in &all {
        for (i, step) in v.steps.iter().enumerate() {
            clock.set(step.now);
            let mut handles = Vec::with_capacity(copies);
            for copy in 0..copies {
                let (store, quota, cost) = (store.clone(), v.quota, step.cost);
                let key = format!("vector:{}:{copy}", v.name);
                handles.push(tokio::spawn(async move {
                    store.decide(&[Limit::new(&key, &quota, cost)]).await
                }));
            }
            for (copy, handle) in handles.into_iter().enumerate() {
                let verdict = match handle.await.expect("a task panicked") {
                    Ok(verdict) => verdict,
                    Err(e) => panic!("{label}: {} step {i} copy {copy}: {e}", v.name),
                };
                assert_eq!(
                    verdict.decisions(),
                    [step.expected],
                    "{label}: vector {} step {i} copy {copy} ({} at {})",
                    v.name,
                    step.cost,
                    step.now
                );
                seen.push(format!("{:?}", verdict.decisions()));
            }
        }
    }
    assert!(seen.len() > 1_000 * copies, "only {} decisions", seen.len());
    seen
}

/// The vectors decide the same batched (each step on 8 keys at once, so batches of several form)
/// as unbatched (one call each), on both script paths, and as the Rust model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_and_unbatched_decide_the_vectors_alike_on_both_paths() {
    let server = common::server();
    let nodes = std::slice::from_ref(&server);
    for (scripting, path) in common::PATHS {
        let builder = common::standalone_builder(&server).scripting(scripting);
        let before = script_calls(nodes);
        let mut batched = Vec::new();
        common::on_path(nodes, scripting, || async {
            batched = replay(
                builder.clone().prefix(format!("{path}-on")),
                8,
                &format!("{path} batched"),
            )
            .await;
        })
        .await;
        let calls = script_calls(nodes) - before;
        assert!(
            calls < batched.len() as u64,
            "{path}: {calls} script calls for {} decisions: no batch formed",
            batched.len()
        );
        let mut unbatched = Vec::new();
        let before = script_calls(nodes);
        common::on_path(nodes, scripting, || async {
            unbatched = replay(
                builder
                    .clone()
                    .prefix(format!("{path}-off"))
                    .batching(false),
                8,
                &format!("{path} unbatched"),
            )
            .await;
        })
        .await;
        assert_eq!(
            script_calls(nodes) - before,
            unbatched.len() as u64,
            "{path}: without batching, one call per decision"
        );
        assert_eq!(batched, unbatched, "{path}");
    }
}

/// 200 tasks on one store and one key with a burst of 50: batches form (fewer script calls than
/// decisions) and exactly 50 are admitted, on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_one_store_batch_and_admit_exactly_the_burst() {
    let server = common::server();
    let nodes = std::slice::from_ref(&server);
    for (scripting, path) in common::PATHS {
        let store = common::connect(
            common::standalone_builder(&server)
                .scripting(scripting)
                .prefix(path),
        )
        .await;
        let before = script_calls(nodes);
        let allowed = burst_of(&store, 200, |_| vec![("one".to_owned(), burst(50))]).await;
        let calls = script_calls(nodes) - before;
        let admitted = allowed.iter().filter(|a| **a).count();
        assert_eq!(admitted, 50, "{path}: a burst of 50 admitted {admitted}");
        assert!(
            calls < 200,
            "{path}: {calls} script calls for 200 decisions: no batch formed"
        );
        eprintln!("{path}: 200 decisions in {calls} script calls");
    }
}

/// Four stores (four connections, as four processes would have) with 50 tasks each on one key
/// with a burst of 50: exactly 50 admitted in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_stores_batching_on_one_key_admit_exactly_the_burst() {
    let server = common::server();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(common::connect(common::standalone_builder(&server)).await);
    }
    let before = script_calls(std::slice::from_ref(&server));
    let mut runs = Vec::new();
    for store in &stores {
        let store = store.clone();
        runs.push(tokio::spawn(async move {
            burst_of(&store, 50, |_| vec![("shared".to_owned(), burst(50))]).await
        }));
    }
    let mut admitted = 0;
    for run in runs {
        admitted += run
            .await
            .expect("a store's tasks panicked")
            .iter()
            .filter(|a| **a)
            .count();
    }
    let calls = script_calls(std::slice::from_ref(&server)) - before;
    assert_eq!(
        admitted, 50,
        "4 × 50 tasks on a burst of 50 admitted {admitted}"
    );
    assert!(calls < 200, "{calls} script calls for 200 decisions");
}

/// A decision alone on its connection is sent at once, as a call of its own: as many script
/// calls as decisions, each answered far within any linger, and no slower than unbatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_decision_goes_out_at_once_as_its_own_call() {
    let server = common::server();
    let nodes = std::slice::from_ref(&server);
    let quota = Quota::per_second(1_000_000).expect("quota");
    let mut medians = Vec::new();
    for batching in [true, false] {
        let store = common::connect(
            common::standalone_builder(&server)
                .batching(batching)
                .prefix(format!("lone-{batching}")),
        )
        .await;
        // The first call loads the library (a refused FCALL counts as a call).
        store
            .decide(&[Limit::new("warm", &quota, 1)])
            .await
            .expect("redis decides");
        let before = script_calls(nodes);
        let mut took = Vec::new();
        for _ in 0..100 {
            let start = Instant::now();
            let verdict = store
                .decide(&[Limit::new("lone", &quota, 1)])
                .await
                .expect("redis decides");
            took.push(start.elapsed());
            assert!(verdict.is_allowed());
        }
        assert_eq!(
            script_calls(nodes) - before,
            100,
            "batching {batching}: one call per lone decision"
        );
        took.sort_unstable();
        medians.push(took[50]);
        assert!(
            took[50] < Duration::from_millis(20),
            "batching {batching}: a lone decision took {:?} (median)",
            took[50]
        );
    }
    // No linger: the median with batching on is not a timer's worth above the one without.
    assert!(
        medians[0] < medians[1] + Duration::from_millis(5),
        "median {:?} batched against {:?} unbatched",
        medians[0],
        medians[1]
    );
}

/// In one burst of concurrent decisions (batches of several), a decision denied on an exhausted
/// key, alone or next to a fresh key, changes nothing for the others: every fresh single-key
/// decision is admitted, and the fresh keys of the denied decisions are left uncharged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_in_a_batch_leaves_the_other_decisions_alone() {
    let server = common::server();
    let nodes = std::slice::from_ref(&server);
    for (scripting, path) in common::PATHS {
        let store = common::connect(
            common::standalone_builder(&server)
                .scripting(scripting)
                .prefix(path),
        )
        .await;
        let one = burst(1);
        // Exhaust `full`.
        assert!(
            store
                .decide(&[Limit::new("full", &one, 1)])
                .await
                .expect("redis decides")
                .is_allowed()
        );
        let before = script_calls(nodes);
        // Even tasks: a fresh key of their own. Odd tasks: `full` then a fresh key of their
        // own (denied, all or nothing).
        let allowed = burst_of(&store, 60, |t| {
            let own = (format!("own:{t}"), burst(1));
            if t % 2 == 0 {
                vec![own]
            } else {
                vec![("full".to_owned(), burst(1)), own]
            }
        })
        .await;
        let calls = script_calls(nodes) - before;
        assert!(calls < 60, "{path}: {calls} calls for 60 decisions");
        for (t, allowed) in allowed.iter().enumerate() {
            assert_eq!(*allowed, t % 2 == 0, "{path}: task {t}");
        }
        // The denied decisions' own keys were not charged: each still admits its one.
        for t in (1..60).step_by(2) {
            let key = format!("own:{t}");
            let verdict = store
                .decide(&[Limit::new(&key, &one, 1)])
                .await
                .expect("redis decides");
            assert!(
                verdict.is_allowed(),
                "{path}: {key} was charged by a denial"
            );
        }
    }
}

/// Where a worker process of [`four_processes_batching_on_one_key_admit_exactly_the_burst`]
/// finds its server: the environment variable that makes [`burst_worker_process`] a worker.
const WORKER_URL: &str = "TOLLGATE_TEST_BURST_WORKER_URL";

/// What one burst process (or the in-process check) does: 50 tasks on one store, released
/// together, each deciding the shared key of burst 50 once; how many were admitted.
async fn fifty_on_the_shared_key(store: &RedisStore) -> usize {
    burst_of(store, 50, |_| vec![("shared".to_owned(), burst(50))])
        .await
        .iter()
        .filter(|a| **a)
        .count()
}

/// A worker of the four-process test when `WORKER_URL` is set: connects a store (batching on,
/// as by default), says `ready`, waits for the parent's line on stdin so that the four start
/// together, then decides 50 tasks at once on the shared key and says `admitted N`.
///
/// Run as a test of its own (no `WORKER_URL`), the same burst on a fresh server from one
/// process: exactly the burst admitted, in fewer script calls than decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_worker_process() {
    if let Ok(url) = std::env::var(WORKER_URL) {
        let store = common::connect(
            RedisStore::builder(url)
                .timeout(common::TEST_TIMEOUT)
                .connect_timeout(common::TEST_TIMEOUT),
        )
        .await;
        // Connected and the function loaded before the start, so the four race on deciding only.
        store.ping().await.expect("the worker reaches the server");
        println!("ready");
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .expect("the parent says start");
        println!("admitted {}", fifty_on_the_shared_key(&store).await);
        return;
    }
    let server = common::server();
    let store = common::connect(common::standalone_builder(&server)).await;
    let before = script_calls(std::slice::from_ref(&server));
    assert_eq!(fifty_on_the_shared_key(&store).await, 50);
    assert_eq!(
        fifty_on_the_shared_key(&store).await,
        0,
        "the burst was spent"
    );
    let calls = script_calls(std::slice::from_ref(&server)) - before;
    assert!(calls < 100, "{calls} script calls for 100 decisions");
}

/// Four processes (this test binary run four times as [`burst_worker_process`]), each a store
/// with 50 tasks deciding at once on one key with a burst of 50, batching on: exactly 50
/// admitted in all.
#[test]
fn four_processes_batching_on_one_key_admit_exactly_the_burst() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    let server = common::server();
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut workers = Vec::new();
    for _ in 0..4 {
        let child = Command::new(&exe)
            .args([
                "--exact",
                "burst_worker_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(WORKER_URL, server.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("a worker process starts");
        workers.push(child);
    }
    // Every worker connected before any decides.
    let mut outputs = Vec::new();
    for worker in &mut workers {
        let mut out = BufReader::new(worker.stdout.take().expect("the worker's stdout"));
        let mut line = String::new();
        loop {
            line.clear();
            let read = out.read_line(&mut line).expect("the worker's output");
            assert!(read > 0, "a worker ended before it was ready");
            // libtest prints the test's name first, on the same line.
            if line.trim_end().ends_with("ready") {
                break;
            }
        }
        outputs.push(out);
    }
    for worker in &mut workers {
        let mut stdin = worker.stdin.take().expect("the worker's stdin");
        stdin
            .write_all(b"start\n")
            .expect("a worker is told to start");
    }
    let mut admitted = Vec::new();
    for (worker, out) in workers.iter_mut().zip(outputs) {
        let said: Vec<String> = out
            .lines()
            .map(|l| l.expect("the worker's output"))
            .collect();
        let status = worker.wait().expect("a worker ends");
        assert!(status.success(), "a worker failed ({status}): {said:?}");
        let n = said
            .iter()
            .find_map(|l| l.split_once("admitted ").map(|(_, n)| n))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or_else(|| panic!("a worker said no count: {said:?}"));
        admitted.push(n);
    }
    assert_eq!(
        admitted.iter().sum::<usize>(),
        50,
        "4 processes × 50 tasks on a burst of 50 admitted {admitted:?}"
    );
}

/// A store on `server` with a short timeout, for the freezing tests.
async fn short_timeout_store(server: &RedisServer, timeout: Duration) -> RedisStore {
    common::connect(
        RedisStore::builder(server.url())
            .timeout(timeout)
            .connect_timeout(common::TEST_TIMEOUT),
    )
    .await
}

/// The server frozen while a call is in flight: the decisions queued behind it whose deadline
/// has not passed go out as one batch when the call in flight times out; that batch times out
/// too, every member of it gets a timeout, and nothing is sent again: once the server wakes, it
/// has run exactly the two calls (the one in flight and the batch), and both, running past their
/// deadlines, charged nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_times_out_fails_each_member_and_is_not_resent() {
    let mut server = common::server();
    let timeout = Duration::from_millis(400);
    let store = short_timeout_store(&server, timeout).await;
    let quota = burst(3);
    // One call in time (it also teaches the store the server's clock): 2 of 3 left.
    assert!(
        store
            .decide(&[Limit::new("frozen", &quota, 1)])
            .await
            .expect("redis is up")
            .is_allowed()
    );
    let before = script_calls(std::slice::from_ref(&server));
    server.pause().expect("SIGSTOP");
    let decide = |store: RedisStore, quota: Quota| {
        tokio::spawn(async move {
            let start = Instant::now();
            let result = store.decide(&[Limit::new("frozen", &quota, 1)]).await;
            (result, start.elapsed())
        })
    };
    let first = decide(store.clone(), quota);
    // Queued behind the first, with deadlines 200 ms after its own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued: Vec<_> = (0..10).map(|_| decide(store.clone(), quota)).collect();
    let (result, took) = first.await.expect("the first task");
    let e = result.expect_err("no answer from a frozen server");
    assert!(e.is_timeout(), "the first: {e}");
    assert!(took < timeout + Duration::from_millis(300), "{took:?}");
    for (i, task) in queued.into_iter().enumerate() {
        let (result, took) = task.await.expect("a queued task");
        let e = result.expect_err("no answer from a frozen server");
        assert!(e.is_timeout(), "queued {i}: {e}");
        assert!(
            took < timeout + Duration::from_millis(300),
            "queued {i}: {took:?}"
        );
    }
    server.resume().expect("SIGCONT");
    // The two calls waiting in the server run now, past their deadlines.
    let quiet = Instant::now() + Duration::from_secs(5);
    while script_calls(std::slice::from_ref(&server)) - before < 2 && Instant::now() < quiet {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        script_calls(std::slice::from_ref(&server)) - before,
        2,
        "the call in flight and one batch, each sent once"
    );
    // Nothing of them charged: the two left are still there.
    let store = short_timeout_store(&server, common::TEST_TIMEOUT).await;
    let outcomes: Vec<Outcome> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let verdict = store
                .decide(&[Limit::new("frozen", &quota, 1)])
                .await
                .expect("redis is up");
            v.push(verdict.outcome());
        }
        v
    };
    assert_eq!(
        outcomes,
        [Outcome::Allowed, Outcome::Allowed, Outcome::Denied],
        "a late call or batch charged the bucket"
    );
}

/// Whether `key` (under the default prefix) exists on `server`.
fn exists(server: &RedisServer, key: &str) -> bool {
    let reply = server
        .cmd(&["EXISTS", &format!("tollgate:{key}")])
        .expect("EXISTS");
    reply.as_int().expect("an integer") == 1
}

/// A decision whose deadline passes while it is queued fails with a timeout and is never sent,
/// while the one queued beside it, still waited for, is. The runtime (one thread) is kept busy
/// past the first's deadline, so when the batch is assembled one queued decision is past its
/// deadline and the other is not. The store is fresh (no clock offset learnt, so its calls
/// carry no server deadline): every call the frozen server runs once awake writes its key, and
/// the expired decision's key must stay absent.
#[tokio::test(flavor = "current_thread")]
async fn a_decision_whose_deadline_passes_in_the_queue_is_not_sent() {
    let mut server = common::server();
    let quota = burst(3);
    // Another store loads the library; this one only pings (no decision, no offset).
    let loader = short_timeout_store(&server, common::TEST_TIMEOUT).await;
    loader
        .decide(&[Limit::new("warm", &quota, 1)])
        .await
        .expect("redis is up");
    let timeout = Duration::from_millis(400);
    let store = short_timeout_store(&server, timeout).await;
    let before = script_calls(std::slice::from_ref(&server));
    server.pause().expect("SIGSTOP");
    let t0 = Instant::now();
    let decide = |key: &'static str| {
        let (store, quota) = (store.clone(), quota);
        tokio::spawn(async move { store.decide(&[Limit::new(key, &quota, 1)]).await })
    };
    // In flight until 400 ms.
    let in_flight = decide("sent-first");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Queued, deadline at 420 ms.
    let expired = decide("expired");
    tokio::time::sleep_until((t0 + Duration::from_millis(250)).into()).await;
    // Queued, deadline at 650 ms.
    let alive = decide("alive");
    tokio::time::sleep_until((t0 + Duration::from_millis(350)).into()).await;
    // The one runtime thread busy until 500 ms: past the first two deadlines.
    std::thread::sleep(Duration::from_millis(150));
    for (name, task) in [
        ("in flight", in_flight),
        ("expired", expired),
        ("alive", alive),
    ] {
        let e = task
            .await
            .expect("a task")
            .expect_err("no answer from a frozen server");
        assert!(e.is_timeout(), "{name}: {e}");
    }
    server.resume().expect("SIGCONT");
    let quiet = Instant::now() + Duration::from_secs(5);
    while script_calls(std::slice::from_ref(&server)) - before < 2 && Instant::now() < quiet {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        script_calls(std::slice::from_ref(&server)) - before,
        2,
        "the call in flight and the batch of the one still waited for"
    );
    assert!(exists(&server, "sent-first"), "the call in flight ran");
    assert!(
        exists(&server, "alive"),
        "the live queued decision was sent"
    );
    assert!(
        !exists(&server, "expired"),
        "a decision whose deadline passed in the queue was sent"
    );
}

/// On a cluster, with batching on, decisions on many slots (each batched in its slot) and
/// decisions across slots (the cross-slot path, unbatched) at once: each key admits exactly its
/// burst, and the shared cross-slot key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_batches_slot_by_slot_and_stays_exact() {
    let cluster = common::cluster();
    let store = common::connect(common::cluster_builder(&cluster)).await;
    let before = script_calls(cluster.nodes());
    // 12 hash tags (several slots on each of the three masters), 20 tasks each, burst 5.
    let allowed = burst_of(&store, 240, |t| {
        vec![(format!("{{tag{}}}:tier", t % 12), burst(5))]
    })
    .await;
    let calls = script_calls(cluster.nodes()) - before;
    for tag in 0..12 {
        let admitted = allowed
            .iter()
            .enumerate()
            .filter(|(t, a)| t % 12 == tag && **a)
            .count();
        assert_eq!(admitted, 5, "tag{tag}: a burst of 5 admitted {admitted}");
    }
    assert!(calls < 240, "{calls} script calls for 240 decisions");
    // Across slots: a roomy caller limit and a shared global limit of 20.
    let roomy = Quota::per_second(1_000).expect("quota");
    let allowed = burst_of(&store, 60, |t| {
        vec![
            (format!("{{user{}}}:tier", t % 6), roomy),
            ("global".to_owned(), burst(20)),
        ]
    })
    .await;
    let admitted = allowed.iter().filter(|a| **a).count();
    assert_eq!(admitted, 20, "the global burst of 20 admitted {admitted}");
}

/// The chosen scripting path is honoured by batches: `FCALL` only, or `EVALSHA` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_take_the_chosen_script_path() {
    let server = common::server();
    let nodes = std::slice::from_ref(&server);
    for (scripting, path) in common::PATHS {
        let store = common::connect(
            common::standalone_builder(&server)
                .scripting(scripting)
                .prefix(path),
        )
        .await;
        common::on_path(nodes, scripting, || async {
            let allowed = burst_of(&store, 40, |t| vec![(format!("k{}", t % 4), burst(5))]).await;
            assert_eq!(allowed.iter().filter(|a| **a).count(), 20, "{path}");
        })
        .await;
    }
}

/// One decision of a batch as the script reads it: its deadline (server µs, 0 = none), and per key
/// the key, limit, interval (µs) and cost.
struct Raw {
    deadline: u64,
    limits: Vec<(&'static str, u64, u64, u64)>,
}

/// Runs `decisions` through the script's batch mode (EVAL of the script's source) at `now` in
/// one call over `prefix`'s keys; the packed reply, or the server's error.
async fn raw_batch(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    now: u64,
    decisions: &[&Raw],
) -> redis::RedisResult<Vec<u8>> {
    let mut keys: Vec<String> = Vec::new();
    let mut packed = Vec::new();
    for d in decisions {
        packed.extend((d.limits.len() as u64).to_le_bytes());
        packed.extend(d.deadline.to_le_bytes());
        for &(key, limit, interval, cost) in &d.limits {
            let key = format!("{prefix}{key}");
            let place = match keys.iter().position(|k| *k == key) {
                Some(i) => i + 1,
                None => {
                    keys.push(key);
                    keys.len()
                }
            };
            for v in [place as u64, limit, interval, cost] {
                packed.extend(v.to_le_bytes());
            }
        }
    }
    redis::cmd("EVAL")
        .arg(tollgate_redis::script_source())
        .arg(keys.len())
        .arg(&keys)
        .arg("b")
        .arg(now.to_string())
        .arg(packed)
        .query_async(conn)
        .await
}

/// A plain connection to `server`, for calling the script directly.
async fn raw_connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// A reply's 64-bit words.
fn words(reply: &[u8]) -> Vec<i64> {
    reply
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect()
}

/// What Redis holds under `key`: its value and its TTL (ms).
async fn held(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (Option<String>, i64) {
    let value: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(conn)
        .await
        .expect("PTTL");
    (value, ttl)
}

/// Decisions sharing keys in one batch (the key read once, kept while the decisions go through
/// it, written once) answer and leave in Redis exactly what the same decisions leave sent one
/// call each: admissions until a key is used up, denials that charge nothing (not even their
/// other keys), a zero cost, a decision past its deadline that writes nothing.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_with_shared_keys_decides_and_writes_what_one_call_each_would() {
    let server = common::server();
    let mut conn = raw_connection(&server).await;
    const NOW: u64 = 1_700_000_000_000_000;
    const SECOND: u64 = 1_000_000;
    let on = |limits: Vec<(&'static str, u64, u64, u64)>| Raw {
        deadline: 0,
        limits,
    };
    let decisions = [
        on(vec![("a", 2, SECOND, 1)]),
        on(vec![("a", 2, SECOND, 1), ("b", 1, SECOND, 1)]),
        // `a` is used up: denied, and `c` is not charged.
        on(vec![("c", 3, SECOND, 1), ("a", 2, SECOND, 1)]),
        on(vec![("b", 1, SECOND, 1)]),
        on(vec![("a", 2, SECOND, 0)]),
        Raw {
            deadline: NOW - 1,
            limits: vec![("c", 3, SECOND, 1)],
        },
        on(vec![("c", 3, SECOND, 2)]),
        // More than the burst: never.
        on(vec![("c", 3, SECOND, 4)]),
        on(vec![("c", 3, SECOND, 1)]),
    ];
    let all: Vec<&Raw> = decisions.iter().collect();
    let batched = words(
        &raw_batch(&mut conn, "one:", NOW, &all)
            .await
            .expect("a batch"),
    );
    let mut alone = Vec::new();
    for d in &all {
        let reply = raw_batch(&mut conn, "each:", NOW, &[d]).await.expect("one");
        alone.extend(words(&reply));
    }
    assert_eq!(batched, alone, "one batch against one call each");
    // The allowed flags (the third value of each answer), in order; the late one's status.
    let (mut at, mut verdicts) = (0, Vec::new());
    while at < batched.len() {
        let count = usize::try_from(batched[at]).expect("a count");
        verdicts.push((batched[at + 1], batched[at + 3]));
        at += 1 + count;
    }
    const FAST: i64 = 5;
    const LATE: i64 = 4;
    assert_eq!(
        verdicts,
        [
            (FAST, 1),
            (FAST, 1),
            (FAST, 0),
            (FAST, 0),
            (FAST, 1),
            (LATE, 0),
            (FAST, 1),
            (FAST, 0),
            (FAST, 1),
        ]
    );
    for key in ["a", "b", "c"] {
        let (one, each) = (
            held(&mut conn, &format!("one:{key}")).await,
            held(&mut conn, &format!("each:{key}")).await,
        );
        assert!(one.0.is_some(), "{key} was never written");
        assert_eq!(one.0, each.0, "{key}'s state");
        assert!(
            (one.1 - each.1).abs() <= 50 && one.1 > 0,
            "{key}'s TTL: {} against {}",
            one.1,
            each.1
        );
    }
    // `c` took 2 + 1 of its 3 and nothing from the denied decisions: full at NOW + 3 s.
    assert_eq!(
        held(&mut conn, "one:c").await.0.as_deref(),
        Some(format!("b:{}", NOW + 3 * SECOND).as_str())
    );
}

/// A malformed batch (a key given no place, a key given twice, bytes cut short) is refused with
/// a clear error, and nothing of it is written, not even its well-formed decisions.
#[tokio::test(flavor = "current_thread")]
async fn a_malformed_batch_is_refused_and_writes_nothing() {
    let server = common::server();
    let mut conn = raw_connection(&server).await;
    let fine = Raw {
        deadline: 0,
        limits: vec![("a", 5, 1_000_000, 1)],
    };
    let mut packed = Vec::new();
    for v in [1u64, 0, 1, 5, 1_000_000, 1, 1, 0, 2, 5, 1_000_000, 1] {
        packed.extend(v.to_le_bytes());
    }
    let script = tollgate_redis::script_source();
    let run = |keys: Vec<&'static str>, packed: Vec<u8>| {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(keys.len())
            .arg(keys)
            .arg("b")
            .arg("")
            .arg(packed);
        cmd
    };
    let short = packed[..packed.len() - 8].to_vec();
    let cut = packed[..20].to_vec();
    for (label, cmd, expect) in [
        ("no key 2", run(vec!["bad:a"], packed.clone()), "no key 2"),
        (
            "twice",
            run(vec!["bad:a", "bad:a"], packed.clone()),
            "given twice",
        ),
        (
            "short",
            run(vec!["bad:a", "bad:b"], short),
            "malformed batch",
        ),
        ("cut", run(vec!["bad:a", "bad:b"], cut), "malformed batch"),
    ] {
        let e = cmd
            .query_async::<Vec<u8>>(&mut conn)
            .await
            .expect_err(label);
        assert!(e.to_string().contains(expect), "{label}: {e}");
        for key in ["bad:a", "bad:b"] {
            assert_eq!(held(&mut conn, key).await.0, None, "{label}: {key} written");
        }
    }
    // The same first decision alone is fine.
    let reply = raw_batch(&mut conn, "bad:", 0, &[&fine]).await;
    assert!(reply.is_ok(), "{reply:?}");
}

//! Faults that hang instead of refusing: a `redis-server` frozen with `SIGSTOP`, and a port
//! blackholed with `iptables` (packets dropped both ways, the connection left open and silent).
//! Under load, every call answers within the store timeout plus [`MARGIN`], and once the fault
//! ends the same store value decides again by itself, within [`RECOVERY`]: no wedged connection
//! is left behind.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tollgate_core::{Limit, Quota, Store};
use tollgate_redis::RedisStore;
use tollgate_testkit::{Blackhole, RedisServer};

/// The store's call timeout.
const TIMEOUT: Duration = Duration::from_millis(100);
/// What a call may take past its timeout: the bound.
const MARGIN: Duration = Duration::from_millis(50);
/// How long each fault lasts.
const FAULT: Duration = Duration::from_secs(3);
/// How soon after the fault ends decisions must succeed again.
const RECOVERY: Duration = Duration::from_secs(2);
/// Tasks deciding at once.
const TASKS: usize = 4;

/// What the load saw: every call's start (since the test began), latency and success.
#[derive(Default)]
struct Seen {
    calls: Vec<(Duration, Duration, bool)>,
}

impl Seen {
    fn slowest(&self) -> Duration {
        self.calls
            .iter()
            .map(|&(_, took, _)| took)
            .max()
            .unwrap_or_default()
    }

    /// The first successful call started at or after `from`.
    fn first_success_after(&self, from: Duration) -> Option<Duration> {
        self.calls
            .iter()
            .filter(|&&(at, _, ok)| ok && at >= from)
            .map(|&(at, _, _)| at)
            .min()
    }

    fn count(&self, from: Duration, to: Duration, ok: bool) -> usize {
        self.calls
            .iter()
            .filter(|&&(at, _, o)| o == ok && at >= from && at < to)
            .count()
    }
}

/// Runs `TASKS` tasks deciding on distinct keys until `stop`; each records its calls.
fn load(
    store: &RedisStore,
    t0: Instant,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    (0..TASKS)
        .map(|task| {
            let store = store.clone();
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let quota = Quota::per_second(100_000).expect("valid quota");
                let key = format!("hang-{task}");
                let mut seen = Seen::default();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let result = tokio::time::timeout(
                        Duration::from_secs(10),
                        store.decide(&[Limit::new(&key, &quota, 1)]),
                    )
                    .await
                    .expect("a store call ran 10 s: its deadline did not fire");
                    let took = start.elapsed();
                    if let Err(e) = &result {
                        assert!(
                            e.is_timeout() || e.is_unavailable(),
                            "a hang must fail as a timeout or unavailable, got {:?}: {e}",
                            e.kind()
                        );
                    }
                    seen.calls.push((start - t0, took, result.is_ok()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            })
        })
        .collect()
}

/// Runs the load around `fault` (started after 500 ms, ended after [`FAULT`]), then checks the
/// bounds. `start` begins the fault and returns what `end` needs to end it.
async fn under_load<F>(
    label: &str,
    server: &mut RedisServer,
    start: impl FnOnce(&mut RedisServer) -> F,
    end: impl FnOnce(&mut RedisServer, F),
) {
    let store = RedisStore::builder(server.url())
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .connect()
        .await
        .expect("redis is up");
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&store, t0, &stop);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let fault = tokio::task::block_in_place(|| start(server));
    let began = t0.elapsed();
    tokio::time::sleep(FAULT).await;
    tokio::task::block_in_place(|| end(server, fault));
    let ended = t0.elapsed();
    tokio::time::sleep(RECOVERY + Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let mut seen = Seen::default();
    for task in tasks {
        seen.calls
            .extend(task.await.expect("a load task panicked").calls);
    }
    let slowest = seen.slowest();
    let recovered = seen
        .first_success_after(ended)
        .map(|at| at.saturating_sub(ended));
    eprintln!(
        "{label}: {} calls; before {} ok; during {} ok / {} failed; slowest {slowest:?}; \
         first success {recovered:?} after the fault ended",
        seen.calls.len(),
        seen.count(Duration::ZERO, began, true),
        seen.count(began, ended, true),
        seen.count(began, ended, false),
    );
    assert!(
        seen.count(Duration::ZERO, began, true) > 0,
        "{label}: no decision before the fault"
    );
    assert!(
        seen.count(began + TIMEOUT * 2, ended, false) > 0,
        "{label}: no call failed during the fault: it was not one"
    );
    assert!(
        slowest <= TIMEOUT + MARGIN,
        "{label}: a call took {slowest:?}, over the {TIMEOUT:?} timeout + {MARGIN:?}"
    );
    let recovered = recovered.unwrap_or_else(|| {
        panic!("{label}: no decision succeeded after the fault ended (a wedged connection)")
    });
    assert!(
        recovered <= RECOVERY,
        "{label}: decisions came back {recovered:?} after the fault ended, over {RECOVERY:?}"
    );
    // Once back, it stays back: the last second is all successes.
    let tail = t0.elapsed().saturating_sub(Duration::from_secs(1));
    assert_eq!(
        seen.count(tail, Duration::MAX, false),
        0,
        "{label}: calls still failing after recovery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_costs_one_timeout_per_call_and_recovers() {
    let mut server = common::server();
    under_load(
        "SIGSTOP",
        &mut server,
        |s| s.pause().expect("SIGSTOP"),
        |s, ()| s.resume().expect("SIGCONT"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_connection_costs_one_timeout_per_call_and_recovers() {
    let mut server = common::server();
    under_load(
        "blackhole",
        &mut server,
        |s| Blackhole::port(s.port()).expect("iptables DROP rules"),
        |_, hole| hole.lift().expect("iptables rules removed"),
    )
    .await;
}

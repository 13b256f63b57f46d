//! The core's test vectors, replayed against Redis: decisions identical to the Rust model, for
//! every algorithm, on a single node, on a 3-master cluster and on a Sentinel-managed master, each
//! with `FCALL` and with `EVALSHA`.

mod common;

use tollgate_core::vectors;
use tollgate_core::{Limit, ManualClock, Store, Timestamp};
use tollgate_redis::RedisStoreBuilder;
use tollgate_testkit::RedisServer;

async fn replay(builder: RedisStoreBuilder, label: &str) {
    let clock = ManualClock::new(Timestamp::ZERO);
    let store = common::connect(builder.client_clock(clock.clone())).await;
    let all = vectors::load().expect("the vector file parses");
    let mut steps = 0;
    for v in &all {
        let key = format!("vector:{}", v.name);
        for (i, step) in v.steps.iter().enumerate() {
            clock.set(step.now);
            let verdict = match store.decide(&[Limit::new(&key, &v.quota, step.cost)]).await {
                Ok(verdict) => verdict,
                Err(e) => panic!("{label}: {} step {i}: {e}", v.name),
            };
            assert_eq!(
                verdict.decisions(),
                [step.expected],
                "{label}: vector {} step {i} ({} at {})",
                v.name,
                step.cost,
                step.now
            );
            steps += 1;
        }
    }
    assert!(steps > 1_000, "only {steps} steps replayed");
}

/// The replay on both paths (`FCALL`, `EVALSHA`), each under its own prefix, checking from the
/// servers' counts that each went its way.
async fn replay_both(nodes: &[RedisServer], builder: RedisStoreBuilder, label: &str) {
    for (scripting, path) in common::PATHS {
        let builder = builder.clone().scripting(scripting).prefix(path);
        let label = format!("{label} {path}");
        common::on_path(nodes, scripting, || replay(builder, &label)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_replay_on_a_single_node() {
    let server = common::server();
    let builder = common::standalone_builder(&server);
    replay_both(std::slice::from_ref(&server), builder, "standalone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_replay_on_a_cluster() {
    let cluster = common::cluster();
    replay_both(
        cluster.nodes(),
        common::cluster_builder(&cluster),
        "cluster",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_replay_on_a_sentinel_master() {
    let group = common::sentinel();
    replay_both(group.nodes(), common::sentinel_builder(&group), "sentinel").await;
}

/// A small deterministic generator (64-bit LCG), so the sequence is the same on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Multi-limit decisions (all or nothing, several costs, denials, a cost above a capacity) give
/// the very decisions of the Rust model (`MemoryStore` on the same clock), with `FCALL` and with
/// `EVALSHA`, on the script's token-bucket fast path (distinct token-bucket keys) and on its general path (a key listed twice,
/// a bucket next to a window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_limit_decisions_match_the_model_on_both_script_paths() {
    let server = common::server();
    for (scripting, path) in common::PATHS {
        let builder = common::standalone_builder(&server)
            .scripting(scripting)
            .prefix(path);
        common::on_path(std::slice::from_ref(&server), scripting, || {
            multi_limit_against_the_model(builder)
        })
        .await;
    }
}

/// The comparison of `multi_limit_decisions_match_the_model_on_both_script_paths` on one store.
async fn multi_limit_against_the_model(builder: RedisStoreBuilder) {
    use std::time::Duration;
    use tollgate_core::{MemoryStore, Quota};

    let clock = ManualClock::new(Timestamp::ZERO);
    let redis = common::connect(builder.client_clock(clock.clone())).await;
    let memory = MemoryStore::builder().clock(clock.clone()).build();
    let tier = Quota::per_second(3)
        .and_then(|q| q.with_burst(5))
        .expect("quota");
    let route = Quota::per_period(4, Duration::from_secs(2)).expect("quota");
    let global = Quota::per_minute(40)
        .and_then(|q| q.with_burst(8))
        .expect("quota");
    let window = Quota::fixed_window(6, Duration::from_secs(1)).expect("quota");
    // (label, limits as (key, quota)): the first two take the fast path, the others the general.
    let cases: [(&str, Vec<(&str, &Quota)>); 4] = [
        ("one bucket", vec![("m:one", &tier)]),
        (
            "three buckets",
            vec![("m:t", &tier), ("m:r", &route), ("m:g", &global)],
        ),
        (
            "a key twice",
            vec![("m:d", &tier), ("m:d2", &route), ("m:d", &tier)],
        ),
        ("bucket and window", vec![("m:b", &tier), ("m:w", &window)]),
    ];
    let mut rng = Lcg(7);
    let (mut allowed, mut denied, mut never) = (0, 0, 0);
    for (label, limits) in &cases {
        let mut now = 1_000_000_000_u64;
        for step in 0..300 {
            now += rng.below(400_000);
            clock.set(Timestamp::from_micros(now));
            let costs: Vec<u32> = limits
                .iter()
                .map(|_| match rng.below(20) {
                    0 => 0,
                    1 => 9, // above every capacity here: never
                    n => 1 + (n % 3) as u32,
                })
                .collect();
            let request: Vec<Limit<'_>> = limits
                .iter()
                .zip(&costs)
                .map(|((key, quota), cost)| Limit::new(key, quota, *cost))
                .collect();
            let ours = redis.decide(&request).await.expect("redis decides");
            let model = memory.decide(&request).await.expect("memory decides");
            assert_eq!(
                ours.decisions(),
                model.decisions(),
                "{label}: step {step} at {now} µs, costs {costs:?}"
            );
            assert_eq!(
                ours.is_allowed(),
                model.is_allowed(),
                "{label}: step {step}"
            );
            for d in ours.decisions() {
                match d.outcome {
                    tollgate_core::Outcome::Allowed => allowed += 1,
                    tollgate_core::Outcome::Denied => denied += 1,
                    tollgate_core::Outcome::InsufficientCapacity => never += 1,
                }
            }
        }
    }
    // The sequence reaches every outcome, so each branch of both paths was compared.
    assert!(
        allowed > 100 && denied > 100 && never > 20,
        "{allowed} {denied} {never}"
    );
}

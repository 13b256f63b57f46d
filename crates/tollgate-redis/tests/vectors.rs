//! The core's test vectors, replayed against Redis: decisions identical to the Rust model, for
//! every algorithm, on a single node and on a 3-master cluster.

mod common;

use tollgate_core::vectors;
use tollgate_core::{Limit, ManualClock, Store, Timestamp};
use tollgate_redis::RedisStoreBuilder;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_replay_on_a_single_node() {
    let server = common::server();
    replay(common::standalone_builder(&server), "standalone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_replay_on_a_cluster() {
    let cluster = common::cluster();
    replay(common::cluster_builder(&cluster), "cluster").await;
}

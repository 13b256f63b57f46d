//! The store against the pure algorithms: the in-place bucket path, inline and allocated keys, a
//! key changing algorithm, and the read-locked path racing the write-locked one.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::algorithm::{self, State};
use crate::{Decision, ManualClock};

const T0: Timestamp = Timestamp::from_micros(1_795_305_600_000_000);

/// Every algorithm, with small limits so that denials are common.
fn quotas() -> Vec<Quota> {
    vec![
        Quota::per_second(10).and_then(|q| q.with_burst(3)),
        Quota::per_second(100).and_then(|q| q.with_burst(5)),
        Quota::per_second(20).and_then(|q| q.shaped(Duration::from_millis(100))),
        Quota::fixed_window(4, Duration::from_millis(200)),
        Quota::sliding_window_log(4, Duration::from_millis(200)),
        Quota::sliding_window_counter(4, Duration::from_millis(200)),
    ]
    .into_iter()
    .collect::<Result<_, _>>()
    .expect("valid quotas")
}

/// Keys on both sides of the inline length, an empty one and a multi-byte one.
const KEYS: [&str; 6] = [
    "",
    "user:1",
    "0123456789012345678901",  // 22 bytes: the longest inline key
    "01234567890123456789012", // 23 bytes: allocated
    "tier:enterprise:route:/api/v1/orders:user:alice@example.com",
    "usér:ü",
];

/// The model: the pure algorithms over a map, all or nothing, as the store documents.
#[derive(Default)]
struct Model {
    states: HashMap<&'static str, State>,
}

impl Model {
    fn decide(&mut self, limits: &[Limit<'static>], now: Timestamp) -> Vec<Decision> {
        let mut next = Vec::new();
        let mut decisions = Vec::new();
        for limit in limits {
            let (d, s) =
                algorithm::decide(self.states.get(limit.key), now, limit.quota, limit.cost);
            decisions.push(d);
            next.push(s);
        }
        if decisions.iter().all(Decision::is_allowed) {
            for (limit, s) in limits.iter().zip(next) {
                if limit.cost > 0 {
                    self.states.insert(limit.key, s);
                }
            }
            decisions
        } else {
            limits
                .iter()
                .zip(decisions)
                .map(|(limit, d)| {
                    if d.is_allowed() {
                        algorithm::decide(self.states.get(limit.key), now, limit.quota, 0).0
                    } else {
                        d
                    }
                })
                .collect()
        }
    }
}

/// One request: (key, quota, cost) per limit (distinct keys), and the time since the last one.
type Step = (Vec<(usize, usize, u32)>, u64);

/// Requests of one to three limits, each key under its own quota; or of one limit, any key under
/// any quota (a key changing algorithm). Not both: when a multi-limit request is rolled back, a key
/// whose state another algorithm wrote is restored with an expiry computed for the request's quota,
/// which may forget it (as the store always has; a configuration change, not a steady state).
fn steps(mixed: bool) -> impl Strategy<Value = Vec<Step>> {
    let cost = prop_oneof![6 => Just(1u32), 1 => Just(0u32), 2 => 2u32..4];
    let limit = (0..KEYS.len(), 0..6usize, cost);
    let (most, fixed) = if mixed { (1, false) } else { (3, true) };
    let limits = proptest::collection::vec(limit, 1..=most).prop_map(move |mut l| {
        if fixed {
            for (k, q, _) in &mut l {
                *q = *k;
            }
        }
        let mut seen = Vec::new();
        l.retain(|(k, _, _)| {
            let new = !seen.contains(k);
            seen.push(*k);
            new
        });
        l
    });
    proptest::collection::vec((limits, 0u64..40_000), 1..150)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Single- and multi-limit decisions, each key under its own algorithm: the store answers
    /// exactly as the pure algorithms do.
    #[test]
    fn the_store_decides_as_the_algorithms_do(steps in steps(false)) {
        replay(steps)?;
    }

    /// Single-limit decisions, a key's algorithm changing between requests.
    #[test]
    fn keys_changing_algorithm_decide_as_the_algorithms_do(steps in steps(true)) {
        replay(steps)?;
    }
}

static QUOTAS: LazyLock<Vec<Quota>> = LazyLock::new(quotas);

fn replay(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let clock = ManualClock::new(T0);
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let mut model = Model::default();
    for (limits, gap) in steps {
        clock.advance(Duration::from_micros(gap));
        let limits: Vec<Limit<'static>> = limits
            .iter()
            .map(|&(k, q, cost)| Limit::new(KEYS[k], &QUOTAS[q], cost))
            .collect();
        let expected = model.decide(&limits, clock.now());
        let got = store.decide_now(&limits);
        prop_assert_eq!(got.decisions(), &expected[..], "{:?}", limits);
    }
    Ok(())
}

#[test]
fn inline_and_allocated_keys_are_kept_apart() {
    let quota = Quota::per_hour(1).and_then(|q| q.with_burst(2)).unwrap();
    let store = MemoryStore::builder().clock(ManualClock::new(T0)).build();
    for _ in 0..2 {
        for key in KEYS {
            assert!(store.decide_now(&[Limit::new(key, &quota, 1)]).is_allowed());
        }
    }
    for key in KEYS {
        assert!(!store.decide_now(&[Limit::new(key, &quota, 1)]).is_allowed());
    }
    // A prefix of an inline key, or the key with trailing NULs, is another key.
    assert!(
        store
            .decide_now(&[Limit::new("user:", &quota, 1)])
            .is_allowed()
    );
    assert!(
        store
            .decide_now(&[Limit::new("user:1\0", &quota, 1)])
            .is_allowed()
    );
    assert_eq!(store.len(), KEYS.len() + 2);
}

/// Threads on the read-locked path (one key) race threads taking the write lock for the same key
/// and another one (two limits): neither overspends, and nothing is lost.
#[test]
fn in_place_decisions_and_multi_limit_decisions_share_one_bucket_exactly() {
    let hot = Quota::per_hour(1)
        .and_then(|q| q.with_burst(3_000))
        .unwrap();
    let other = Quota::per_hour(1)
        .and_then(|q| q.with_burst(1_000))
        .unwrap();
    let store = MemoryStore::builder().clock(ManualClock::new(T0)).build();
    // The key exists before the race, so single decisions take the read lock.
    assert!(store.decide_now(&[Limit::new("hot", &hot, 1)]).is_allowed());
    let (single, multi) = (AtomicU32::new(1), AtomicU32::new(0));
    std::thread::scope(|s| {
        for t in 0..4 {
            let (store, single, multi) = (&store, &single, &multi);
            let (hot, other) = (&hot, &other);
            s.spawn(move || {
                for _ in 0..2_000 {
                    if t % 2 == 0 {
                        if store.decide_now(&[Limit::new("hot", hot, 1)]).is_allowed() {
                            single.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if store
                        .decide_now(&[Limit::new("hot", hot, 1), Limit::new("other", other, 1)])
                        .is_allowed()
                    {
                        multi.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let (single, multi) = (single.into_inner(), multi.into_inner());
    // The clock did not move: the hot bucket gave exactly its burst, the other one no more.
    assert_eq!(single + multi, 3_000, "{single} single, {multi} multi");
    assert!(multi <= 1_000);
    let left = store.peek_now(&[Limit::new("other", &other, 0)]);
    assert_eq!(left.decisions()[0].remaining, 1_000 - multi);
}

#[test]
fn a_full_shard_is_rebuilt_in_place_instead_of_growing() {
    let quota = Quota::per_hour(10).unwrap();
    let store = MemoryStore::builder()
        .clock(ManualClock::new(T0))
        .shards(1)
        .max_keys(1_792) // 7/8 of 2048 buckets: removals leave tombstones
        .build();
    let size = || read(&store.inner.shards[0]).entries.allocation_size();
    for i in 0..1_792 {
        store.decide_now(&[Limit::new(&format!("k{i}"), &quota, 1)]);
    }
    let full = size();
    // Evicting and adding leaves tombstones; the table must not double to make room.
    for i in 0..50_000 {
        store.decide_now(&[Limit::new(&format!("flood{i}"), &quota, 1)]);
        assert!(size() <= full, "grew from {full} to {} bytes", size());
    }
    assert_eq!(store.len(), 1_792);
}

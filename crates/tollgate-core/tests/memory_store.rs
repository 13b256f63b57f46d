//! `MemoryStore` behaviour: exactness under concurrency, all-or-nothing, expiry, the key cap,
//! reservations, and use through the `Store` / `DynStore` traits.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tollgate_core::{
    DynStore, Limit, ManualClock, MemoryStore, Outcome, Quota, Reserve, Store, Timestamp,
};

const T0: Timestamp = Timestamp::from_micros(1_795_305_600_000_000);

fn manual() -> (ManualClock, MemoryStore<ManualClock>) {
    let clock = ManualClock::new(T0);
    let store = MemoryStore::builder().clock(clock.clone()).build();
    (clock, store)
}

/// Polls a future that is ready at once (the memory store's are).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the memory store's futures are ready at once"),
    }
}

#[test]
fn many_threads_on_one_key_admit_exactly_the_burst() {
    for algorithm in tollgate_core::Algorithm::ALL {
        let quota = match algorithm {
            tollgate_core::Algorithm::TokenBucket => {
                Quota::per_hour(1).and_then(|q| q.with_burst(1_000))
            }
            tollgate_core::Algorithm::LeakyBucket => {
                // 1 per ms, 999 ms of queue: 1000 slots.
                Quota::per_second(1_000).and_then(|q| q.shaped(Duration::from_millis(999)))
            }
            other => Quota::window(other, 1_000, Duration::from_secs(3600)),
        }
        .unwrap();
        let (_clock, store) = manual();
        let admitted = Arc::new(AtomicU32::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (store, admitted) = (store.clone(), Arc::clone(&admitted));
                s.spawn(move || {
                    for _ in 0..500 {
                        if store
                            .decide_now(&[Limit::new("hot", &quota, 1)])
                            .is_allowed()
                        {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        // The clock did not move: the model admits exactly the quota's limit.
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000, "{algorithm}");
    }
}

#[test]
fn concurrent_multi_limit_requests_never_overspend_any_limit() {
    let (_clock, store) = manual();
    let per_user = Quota::per_hour(1).unwrap().with_burst(50).unwrap();
    let global = Quota::per_hour(1).unwrap().with_burst(120).unwrap();
    let users = ["u0", "u1", "u2", "u3"];
    let admitted: Vec<AtomicU32> = users.iter().map(|_| AtomicU32::new(0)).collect();
    std::thread::scope(|s| {
        for t in 0..8 {
            let (store, admitted) = (&store, &admitted);
            s.spawn(move || {
                for i in 0..200 {
                    let u = (t + i) % users.len();
                    let limits = [
                        Limit::new(users[u], &per_user, 1),
                        Limit::new("global", &global, 1),
                    ];
                    if store.decide_now(&limits).is_allowed() {
                        admitted[u].fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let counts: Vec<u32> = admitted.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    assert_eq!(counts.iter().sum::<u32>(), 120, "{counts:?}");
    assert!(counts.iter().all(|&c| c <= 50), "{counts:?}");
}

#[test]
fn a_multi_limit_denial_consumes_nothing() {
    let (_clock, store) = manual();
    let tier = Quota::per_minute(60).unwrap().with_burst(5).unwrap();
    let route = Quota::fixed_window(2, Duration::from_secs(60)).unwrap();
    let global = Quota::sliding_window_log(100, Duration::from_secs(60)).unwrap();
    let limits = |cost| {
        [
            Limit::new("tier:alice", &tier, cost),
            Limit::new("route:alice", &route, 1),
            Limit::new("global", &global, cost),
        ]
    };
    assert!(store.decide_now(&limits(1)).is_allowed());
    assert!(store.decide_now(&limits(1)).is_allowed());
    // The route limit (2 per window) denies the third: the others must not be charged.
    let denied = store.decide_now(&limits(1));
    assert_eq!(denied.outcome(), Outcome::Denied);
    let d = denied.decisions();
    assert_eq!(d[0].outcome, Outcome::Allowed);
    assert_eq!(
        d[0].remaining, 3,
        "tier reports its real state, not a charged one"
    );
    assert_eq!(d[1].outcome, Outcome::Denied);
    assert_eq!(d[2].remaining, 98);
    assert_eq!(denied.binding().map(|(i, _)| i), Some(1));
    let peek = store.peek_now(&limits(0));
    assert_eq!(peek.decisions()[0].remaining, 3);
    assert_eq!(peek.decisions()[2].remaining, 98);
    // A cost the tier can never hold is its own outcome, and charges nothing either.
    let never = store.decide_now(&limits(6));
    assert_eq!(never.outcome(), Outcome::InsufficientCapacity);
    assert_eq!(store.peek_now(&limits(0)).decisions()[2].remaining, 98);
}

#[test]
fn the_same_key_twice_in_one_request_is_charged_twice_or_not_at_all() {
    let (_clock, store) = manual();
    let q = Quota::per_hour(1).unwrap().with_burst(3).unwrap();
    let both = [Limit::new("k", &q, 2), Limit::new("k", &q, 2)];
    // 2 + 2 > 3: the second sees the first's charge, so the request is denied and nothing stays.
    assert!(!store.decide_now(&both).is_allowed());
    assert_eq!(
        store.peek_now(&[Limit::new("k", &q, 0)]).decisions()[0].remaining,
        3
    );
}

#[test]
fn keys_back_to_fresh_are_forgotten() {
    let (clock, store) = manual();
    let q = Quota::per_second(10).unwrap();
    for i in 0..1_000 {
        assert!(
            store
                .decide_now(&[Limit::new(&format!("k{i}"), &q, 1)])
                .is_allowed()
        );
    }
    assert_eq!(store.len(), 1_000);
    clock.advance(Duration::from_millis(99));
    store.purge();
    assert_eq!(store.len(), 1_000, "not refilled yet");
    clock.advance(Duration::from_millis(1));
    store.purge();
    assert!(store.is_empty());
    // Sweeps also happen as keys are added, without purge.
    for i in 0..1_000 {
        store.decide_now(&[Limit::new(&format!("a{i}"), &q, 1)]);
    }
    clock.advance(Duration::from_secs(1));
    for i in 0..1_000 {
        store.decide_now(&[Limit::new(&format!("b{i}"), &q, 1)]);
    }
    assert!(
        store.len() < 2_000,
        "{} keys: the a* keys were never swept",
        store.len()
    );
}

#[test]
fn a_flood_of_distinct_keys_stays_under_the_cap() {
    let (_clock, store) = manual();
    let capped = MemoryStore::builder()
        .clock(ManualClock::new(T0))
        .max_keys(10_000)
        .build();
    drop(store);
    let q = Quota::per_hour(10).unwrap();
    let mut refused = 0;
    for i in 0..1_000_000u32 {
        let key = format!("flood:{i}");
        let allowed = capped.decide_now(&[Limit::new(&key, &q, 1)]).is_allowed();
        // Before the cap is reached, every new key passes; past it, a new key may be taken for
        // an evicted one (see `eviction_never_gives_a_key_more_than_its_quota`).
        assert!(allowed || i >= 10_000, "key {i} refused below the cap");
        refused += u32::from(!allowed);
    }
    println!("flood of 1,000,000 keys at 10/hour into a cap of 10,000: {refused} refused");
    assert!(capped.max_keys() <= 10_000);
    assert!(capped.len() <= capped.max_keys(), "{} keys", capped.len());
    assert!(
        capped.len() > capped.max_keys() / 2,
        "the cap is used, not emptied"
    );
    // A key that keeps being used is still limited while the flood goes on around it, and never
    // gets more than its burst, however often it is forgotten.
    let hot = Quota::per_hour(1).unwrap().with_burst(3).unwrap();
    let mut admitted = 0;
    for i in 0..30_000u32 {
        if capped
            .decide_now(&[Limit::new("hot", &hot, 1)])
            .is_allowed()
        {
            admitted += 1;
        }
        let key = format!("flood2:{i}");
        capped.decide_now(&[Limit::new(&key, &q, 1)]);
    }
    assert!(admitted <= 3, "the hot key got {admitted}");
}

#[test]
fn eviction_never_gives_a_key_more_than_its_quota() {
    for algorithm in ["token", "window", "log", "counter"] {
        let clock = ManualClock::new(T0);
        let capped = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(10_000)
            .build();
        let q = match algorithm {
            "token" => Quota::per_hour(1).unwrap(),
            "window" => Quota::fixed_window(1, Duration::from_secs(3600)).unwrap(),
            "log" => Quota::window(
                tollgate_core::Algorithm::SlidingWindowLog,
                1,
                Duration::from_secs(3600),
            )
            .unwrap(),
            _ => Quota::window(
                tollgate_core::Algorithm::SlidingWindowCounter,
                1,
                Duration::from_secs(3600),
            )
            .unwrap(),
        };
        let keys: Vec<String> = (0..40_000u32)
            .map(|i| format!("{{ip:10.{i}}}:t:a"))
            .collect();
        let mut passed = vec![0u32; keys.len()];
        let mut first_round = 0;
        for round in 0..3 {
            let n = if round == 2 { 1_000 } else { keys.len() };
            for (i, key) in keys[..n].iter().enumerate() {
                if capped.decide_now(&[Limit::new(key, &q, 1)]).is_allowed() {
                    passed[i] += 1;
                    if round == 0 {
                        first_round += 1;
                    }
                }
            }
            clock.advance(Duration::from_secs(1));
        }
        let over: Vec<usize> = (0..keys.len()).filter(|&i| passed[i] > 1).collect();
        println!(
            "{algorithm}: {} keys into a cap of {}: {} new keys passed at first ({:.1} % \
             refused as possibly evicted), {} keys got more than their quota",
            keys.len(),
            capped.max_keys(),
            first_round,
            100.0 * (keys.len() - first_round) as f64 / keys.len() as f64,
            over.len()
        );
        assert!(
            over.is_empty(),
            "{algorithm}: {} keys passed twice",
            over.len()
        );
        assert!(capped.len() <= capped.max_keys());
        // Below the cap nothing is refused: the first 10,000 keys all passed.
        assert!(passed[..9_000].iter().all(|&p| p == 1), "{algorithm}");
    }
}

#[test]
fn reserve_waits_in_line_and_cancel_gives_the_place_back() {
    let (clock, store) = manual();
    let q = Quota::per_second(1).unwrap(); // burst 1
    let limit = [Limit::new("api", &q, 1)];
    let Reserve::Granted(first) = store.reserve_now(&limit, Duration::from_secs(5)) else {
        panic!("a fresh bucket grants at once")
    };
    assert_eq!(first.wait(), Duration::ZERO);
    let Reserve::Granted(second) = store.reserve_now(&limit, Duration::from_secs(5)) else {
        panic!("one second of wait is within five")
    };
    assert_eq!(second.wait(), Duration::from_secs(1));
    // Give the second back: the next caller takes its place, not one after it.
    store.cancel_now(&second);
    let Reserve::Granted(third) = store.reserve_now(&limit, Duration::from_secs(5)) else {
        panic!("granted")
    };
    assert_eq!(third.wait(), Duration::from_secs(1));
    // Too long a wait is refused without charging.
    assert_eq!(
        store.reserve_now(&limit, Duration::from_millis(1_500)),
        Reserve::WouldExceed {
            retry_after: Duration::from_secs(2)
        }
    );
    assert_eq!(
        store.reserve_now(&[Limit::new("api", &q, 2)], Duration::from_secs(60)),
        Reserve::Never
    );
    clock.advance(Duration::from_secs(1));
    // The refused attempt charged nothing: one more second after `third`.
    let Reserve::Granted(fourth) = store.reserve_now(&limit, Duration::from_secs(5)) else {
        panic!("granted")
    };
    assert_eq!(fourth.wait(), Duration::from_secs(1));
    // Cancelling an older reservation once a later one exists keeps the state.
    store.cancel_now(&third);
    let Reserve::WouldExceed { retry_after } = store.reserve_now(&limit, Duration::ZERO) else {
        panic!("busy")
    };
    assert_eq!(retry_after, Duration::from_secs(2));
}

#[test]
fn reserve_across_buckets_uses_one_departure_time() {
    let (_clock, store) = manual();
    let slow = Quota::per_second(1).unwrap();
    let fast = Quota::per_second(100).unwrap();
    let both = [Limit::new("slow", &slow, 1), Limit::new("fast", &fast, 1)];
    let Reserve::Granted(a) = store.reserve_now(&both, Duration::from_secs(5)) else {
        panic!()
    };
    let Reserve::Granted(b) = store.reserve_now(&both, Duration::from_secs(5)) else {
        panic!()
    };
    assert_eq!(
        (a.wait(), b.wait()),
        (Duration::ZERO, Duration::from_secs(1))
    );
    assert_eq!(b.held().len(), 2);
    // Windows cannot hold a future place: the answer is to ask again later.
    let window = Quota::fixed_window(1, Duration::from_secs(10)).unwrap();
    let w = [Limit::new("w", &window, 1)];
    assert!(matches!(
        store.reserve_now(&w, Duration::ZERO),
        Reserve::Granted(_)
    ));
    assert!(matches!(
        store.reserve_now(&w, Duration::from_secs(60)),
        Reserve::Retry { .. }
    ));
}

#[test]
fn the_store_traits_work_generically_and_dynamically() {
    async fn two_decisions<S: Store>(store: &S, quota: &Quota) -> (bool, bool) {
        let l = [Limit::new("k", quota, 1)];
        let a = store.decide(&l).await.map(|v| v.is_allowed());
        let b = store.decide(&l).await.map(|v| v.is_allowed());
        (a.unwrap_or(false), b.unwrap_or(true))
    }
    let q = Quota::per_hour(1).unwrap();
    let (_clock, store) = manual();
    assert_eq!(now(two_decisions(&store, &q)), (true, false));
    assert_eq!(store.kind(), "memory");
    let dynamic: Arc<dyn DynStore> = Arc::new(MemoryStore::new());
    assert_eq!(now(two_decisions(&dynamic, &q)), (true, false));
    assert_eq!(Store::kind(&dynamic), "memory");
    let peek = now(dynamic.peek(&[Limit::new("k", &q, 1)])).map(|v| v.outcome());
    assert_eq!(peek.ok(), Some(Outcome::Denied));
}

/// One step of a reservation history.
#[derive(Debug, Clone)]
enum Op {
    /// Move the clock on by this many ms, then reserve this cost.
    Reserve { after_ms: u64, cost: u32 },
    /// Give back the live reservation at this position (modulo how many are live).
    Cancel { pick: usize },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (0u64..400, 1u32..=3).prop_map(|(after_ms, cost)| Op::Reserve { after_ms, cost }),
        any::<usize>().prop_map(|pick| Op::Cancel { pick }),
    ]
}

proptest::proptest! {
    /// Giving reservations back (partly, when others reserved after them) is never more
    /// permissive than the model: the places kept, replayed at their departure times through a
    /// fresh bucket, all pass.
    #[test]
    fn giving_back_never_admits_what_the_model_refuses(
        ops in proptest::collection::vec(op(), 1..60),
        rate in 1u32..=20,
        burst in 3u32..=8,
    ) {
        let clock = ManualClock::new(T0);
        let store = MemoryStore::builder().clock(clock.clone()).build();
        let quota = Quota::per_second(rate).unwrap().with_burst(burst).unwrap();
        // (departure, cost, reservation, cancelled)
        let mut places: Vec<(Timestamp, u32, tollgate_core::Reservation, bool)> = Vec::new();
        for op in ops {
            match op {
                Op::Reserve { after_ms, cost } => {
                    clock.advance(Duration::from_millis(after_ms));
                    let limit = [Limit::new("k", &quota, cost)];
                    if let Reserve::Granted(r) = store.reserve_now(&limit, Duration::from_secs(3600)) {
                        places.push((store.now() + r.wait(), cost, r, false));
                    }
                }
                Op::Cancel { pick } => {
                    let now = store.now();
                    let live: Vec<usize> = (0..places.len())
                        .filter(|&i| !places[i].3 && places[i].0 > now)
                        .collect();
                    if live.is_empty() {
                        continue;
                    }
                    let i = live[pick % live.len()];
                    store.cancel_now(&places[i].2);
                    places[i].3 = true;
                }
            }
        }
        let mut kept: Vec<(Timestamp, u32)> = places
            .iter()
            .filter(|p| !p.3)
            .map(|p| (p.0, p.1))
            .collect();
        kept.sort_by_key(|&(at, _)| at);
        let mut state = None;
        for (at, cost) in kept {
            let (decision, next) = tollgate_core::algorithm::decide(state.as_ref(), at, &quota, cost);
            proptest::prop_assert!(
                decision.is_allowed(),
                "a kept place at {at:?} (cost {cost}) does not fit the bucket: {decision:?}"
            );
            state = Some(next);
        }
    }
}

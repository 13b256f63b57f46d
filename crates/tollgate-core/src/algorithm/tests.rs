//! Textbook cases checked by hand, and property tests for every algorithm.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::{Outcome, Quota};

const S: u64 = 1_000_000;

fn at(us: u64) -> Timestamp {
    Timestamp::from_micros(us)
}

/// Runs `steps` (time µs, cost) from a fresh key and returns the decisions.
fn run(quota: &Quota, steps: &[(u64, u32)]) -> Vec<Decision> {
    let mut state = None;
    steps
        .iter()
        .map(|&(t, cost)| {
            let (d, s) = decide(state.as_ref(), at(t), quota, cost);
            state = Some(s);
            d
        })
        .collect()
}

/// (outcome, remaining, reset µs, retry µs, delay µs)
fn short(d: &Decision) -> (Outcome, u32, u64, u64, u64) {
    (
        d.outcome,
        d.remaining,
        d.reset_after.as_micros() as u64,
        d.retry_after.as_micros() as u64,
        d.delay.as_micros() as u64,
    )
}

use Outcome::{Allowed as A, Denied as D, InsufficientCapacity as N};

#[test]
fn token_bucket_textbook() {
    let q = Quota::per_second(1).unwrap().with_burst(3).unwrap();
    let got: Vec<_> = run(
        &q,
        &[
            (0, 1),
            (0, 1),
            (0, 1),
            (0, 1),
            (S, 1),
            (3 * S / 2, 1),
            (10 * S, 4),
            (10 * S, 3),
        ],
    )
    .iter()
    .map(short)
    .collect();
    assert_eq!(
        got,
        [
            (A, 2, S, 0, 0),
            (A, 1, 2 * S, 0, 0),
            (A, 0, 3 * S, 0, 0),
            (D, 0, 3 * S, S, 0), // one token back after 1 s
            (A, 0, 3 * S, 0, 0), // at 1 s: tat 3 s -> 4 s
            (D, 0, 5 * S / 2, S / 2, 0),
            (N, 3, 0, 0, 0), // 4 > burst 3: never
            (A, 0, 3 * S, 0, 0),
        ]
    );
}

#[test]
fn leaky_bucket_textbook() {
    // 10/s, up to 250 ms of delay: one now and two queued.
    let q = Quota::per_second(10)
        .unwrap()
        .shaped(Duration::from_millis(250))
        .unwrap();
    let ms = 1_000;
    let got: Vec<_> = run(&q, &[(0, 1), (0, 1), (0, 1), (0, 1), (60 * ms, 1)])
        .iter()
        .map(short)
        .collect();
    assert_eq!(
        got,
        [
            (A, 2, 100 * ms, 0, 0),
            (A, 1, 200 * ms, 0, 100 * ms),
            (A, 0, 300 * ms, 0, 200 * ms),
            (D, 0, 300 * ms, 50 * ms, 0),
            (A, 0, 340 * ms, 0, 240 * ms),
        ]
    );
}

#[test]
fn fixed_window_textbook() {
    let q = Quota::fixed_window(2, Duration::from_secs(10)).unwrap();
    let got: Vec<_> = run(
        &q,
        &[(3 * S, 1), (3 * S, 1), (9 * S, 1), (10 * S, 1), (10 * S, 3)],
    )
    .iter()
    .map(short)
    .collect();
    assert_eq!(
        got,
        [
            (A, 1, 7 * S, 0, 0),
            (A, 0, 7 * S, 0, 0),
            (D, 0, S, S, 0),
            (A, 1, 10 * S, 0, 0),
            (N, 1, 10 * S, 0, 0),
        ]
    );
}

#[test]
fn sliding_window_log_textbook() {
    let q = Quota::sliding_window_log(2, Duration::from_secs(10)).unwrap();
    let got: Vec<_> = run(
        &q,
        &[(0, 1), (4 * S, 1), (9 * S, 1), (10 * S, 1), (10 * S, 1)],
    )
    .iter()
    .map(short)
    .collect();
    assert_eq!(
        got,
        [
            (A, 1, 10 * S, 0, 0),
            (A, 0, 10 * S, 0, 0),
            (D, 0, 5 * S, S, 0), // the request at 0 leaves the window at 10 s
            (A, 0, 10 * S, 0, 0),
            (D, 0, 10 * S, 4 * S, 0), // next to leave: the one at 4 s, at 14 s
        ]
    );
}

#[test]
fn sliding_window_counter_textbook() {
    let q = Quota::sliding_window_counter(10, Duration::from_secs(10)).unwrap();
    let mut steps = vec![(5 * S, 1); 10];
    steps.extend([(12 * S, 1), (12 * S, 1), (12 * S, 1), (13 * S, 1)]);
    let got: Vec<_> = run(&q, &steps).iter().map(short).collect();
    assert_eq!(got[9], (A, 0, 15 * S, 0, 0));
    // At 12 s the previous window (10 requests) weighs 10 × 8/10 = 8: two more fit.
    assert_eq!(got[10], (A, 1, 18 * S, 0, 0));
    assert_eq!(got[11], (A, 0, 18 * S, 0, 0));
    // 8 + 2 + 1 > 10. At 13 s: 10 × 7/10 + 2 + 1 = 10 fits, so retry after 1 s.
    assert_eq!(got[12], (D, 0, 18 * S, S, 0));
    assert_eq!(got[13], (A, 0, 17 * S, 0, 0));
}

#[test]
fn cost_zero_peeks_a_fresh_key() {
    for q in quotas_for_examples() {
        let (d, s) = decide(None, at(5 * S), &q, 0);
        assert!(d.is_allowed(), "{q}");
        assert_eq!(d.remaining, q.limit(), "{q}");
        assert_eq!(d.reset_after, Duration::ZERO, "{q}");
        assert!(s.expires_at(&q) <= at(5 * S), "{q}");
    }
}

#[test]
fn a_state_of_another_algorithm_counts_as_fresh() {
    let window = Quota::fixed_window(1, Duration::from_secs(60)).unwrap();
    let bucket = Quota::per_second(1).unwrap();
    let (_, s) = decide(None, at(0), &window, 1);
    assert!(decide(Some(&s), at(0), &bucket, 1).0.is_allowed());
}

#[test]
fn reserve_and_cancel_a_bucket() {
    let q = Quota::per_second(1).unwrap(); // burst 1
    let (_, s) = decide(None, at(0), &q, 1); // tat = 1 s
    let Earliest::At(t) = earliest(Some(&s), at(0), &q, 1) else {
        panic!("a bucket can always be reserved")
    };
    assert_eq!(t, at(S));
    let held = reserve_at(Some(&s), t, &q, 1).unwrap();
    assert_eq!(held.expires_at(&q), at(2 * S));
    let charge = Duration::from_secs(1);
    // Nobody reserved after: giving it back restores the bucket.
    assert_eq!(
        cancel(Some(&held), s.expires_at(&q), at(2 * S), charge),
        Some(s.clone())
    );
    // Somebody did, as much as it took: the state is kept.
    let later = reserve_at(Some(&held), at(2 * S), &q, 1).unwrap();
    assert_eq!(
        cancel(Some(&later), s.expires_at(&q), at(2 * S), charge),
        None
    );
    // A reservation of 3 with one of 1 after it gives 2 back (its tokens minus those reserved
    // after it).
    let roomy = Quota::per_second(1).unwrap().with_burst(5).unwrap();
    let big = reserve_at(None, at(0), &roomy, 3).unwrap(); // tat 3 s
    let small = reserve_at(Some(&big), at(0), &roomy, 1).unwrap(); // tat 4 s
    assert_eq!(
        cancel(Some(&small), at(0), at(3 * S), Duration::from_secs(3)),
        Some(State::Bucket(BucketState { tat: at(2 * S) }))
    );
    // A bucket below where the reservation left it is left alone.
    assert_eq!(cancel(Some(&s), at(0), at(2 * S), charge), None);
    assert_eq!(earliest(Some(&s), at(0), &q, 2), Earliest::Never);
    let window = Quota::fixed_window(1, Duration::from_secs(10)).unwrap();
    assert_eq!(reserve_at(None, at(0), &window, 1), None);
}

fn quotas_for_examples() -> Vec<Quota> {
    vec![
        Quota::per_second(2).unwrap().with_burst(3).unwrap(),
        Quota::per_second(2)
            .unwrap()
            .shaped(Duration::from_secs(1))
            .unwrap(),
        Quota::fixed_window(3, Duration::from_secs(2)).unwrap(),
        Quota::sliding_window_log(3, Duration::from_secs(2)).unwrap(),
        Quota::sliding_window_counter(3, Duration::from_secs(2)).unwrap(),
    ]
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

fn quota_strategy(algorithm: Algorithm) -> impl Strategy<Value = Quota> {
    (1u32..12, 1u64..2_000, 0u64..5_000).prop_map(move |(limit, period, delay)| {
        let q = Quota::from_parts(
            algorithm,
            limit,
            Duration::from_micros(period),
            Duration::from_micros(delay),
        );
        q.expect("small parts are valid")
    })
}

/// Requests as (gap since the previous one in µs, cost). Costs are mostly 1, sometimes 0, larger,
/// or above any limit in the strategy.
fn steps_strategy() -> impl Strategy<Value = Vec<(u64, u32)>> {
    let cost = prop_oneof![6 => Just(1u32), 1 => Just(0u32), 2 => 2u32..5, 1 => 10u32..14];
    proptest::collection::vec((0u64..3_000, cost), 1..120)
}

/// (time, cost, decision, state before, state after) of every step.
type Trace = Vec<(u64, u32, Decision, Option<State>, State)>;

fn trace(quota: &Quota, steps: &[(u64, u32)]) -> Trace {
    let mut now = 1_000_000_000u64; // not aligned with anything in particular
    let mut state: Option<State> = None;
    let mut out = Vec::new();
    for &(gap, cost) in steps {
        now += gap;
        let (d, s) = decide(state.as_ref(), at(now), quota, cost);
        out.push((now, cost, d, state.clone(), s.clone()));
        state = Some(s);
    }
    out
}

fn admitted(trace: &Trace) -> Vec<(u64, u64)> {
    trace
        .iter()
        .filter(|(_, cost, d, _, _)| d.is_allowed() && *cost > 0)
        .map(|(t, cost, _, _, _)| (*t, u64::from(*cost)))
        .collect()
}

/// Two states mean the same if every later request is decided the same way. For the log, that
/// is equality of the entries still in the window; for the others, plain equality (or both fresh).
fn equivalent(a: Option<&State>, b: &State, now: u64, quota: &Quota) -> bool {
    let fresh_a = a.is_none_or(|a| a.expires_at(quota) <= at(now));
    let fresh_b = b.expires_at(quota) <= at(now);
    if fresh_a && fresh_b {
        return true;
    }
    match (a, b) {
        (Some(State::Log(a)), State::Log(b)) => {
            let w = quota.interval_micros();
            let live = |l: &LogState| -> Vec<LogEntry> {
                l.entries
                    .iter()
                    .filter(|e| e.at.as_micros() + w > now)
                    .copied()
                    .collect()
            };
            live(a) == live(b)
        }
        (Some(a), b) => a == b,
        (None, _) => false,
    }
}

fn check_common(quota: &Quota, trace: &Trace) -> Result<(), TestCaseError> {
    for (now, cost, d, before, after) in trace {
        prop_assert_eq!(d.limit, quota.limit());
        prop_assert!(d.remaining <= quota.limit());
        if *cost > quota.limit() {
            prop_assert_eq!(d.outcome, Outcome::InsufficientCapacity);
        }
        if !d.is_allowed() || *cost == 0 {
            // Denials and peeks change nothing.
            prop_assert!(
                equivalent(before.as_ref(), after, *now, quota),
                "state changed by a denial or peek at {}: {:?} -> {:?}",
                now,
                before,
                after
            );
        }
        if d.is_allowed() {
            prop_assert_eq!(d.retry_after, Duration::ZERO);
        }
        if d.outcome == Outcome::Denied {
            // Waiting `retry_after` is enough, and exactly enough.
            let r = d.retry_after.as_micros() as u64;
            prop_assert!(r > 0);
            let later = decide(before.as_ref(), at(now + r), quota, *cost).0;
            prop_assert!(later.is_allowed(), "not allowed after retry_after {}", r);
            let earlier = decide(before.as_ref(), at(now + r - 1), quota, *cost).0;
            prop_assert!(
                !earlier.is_allowed(),
                "already allowed before retry_after {}",
                r
            );
        }
        // `remaining` unit requests pass right now, and not one more.
        let mut s = after.clone();
        for i in 0..d.remaining {
            let (next, s2) = decide(Some(&s), at(*now), quota, 1);
            prop_assert!(
                next.is_allowed(),
                "remaining {} but request {} denied",
                d.remaining,
                i
            );
            s = s2;
        }
        prop_assert!(!decide(Some(&s), at(*now), quota, 1).0.is_allowed());
        // After `reset_after` the quota is whole again.
        let reset = d.reset_after.as_micros() as u64;
        let whole = decide(Some(after), at(now + reset), quota, 0).0;
        prop_assert_eq!(
            whole.remaining,
            quota.limit(),
            "not whole after reset_after {}",
            reset
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn token_bucket_never_exceeds_burst_plus_rate(
        quota in quota_strategy(Algorithm::TokenBucket),
        steps in steps_strategy(),
    ) {
        let trace = trace(&quota, &steps);
        check_common(&quota, &trace)?;
        let t = quota.interval_micros();
        let ok = admitted(&trace);
        for i in 0..ok.len() {
            let mut sum = 0;
            for j in i..ok.len() {
                sum += ok[j].1;
                let span = ok[j].0 - ok[i].0;
                prop_assert!(
                    sum <= u64::from(quota.limit()) + span / t,
                    "{} admitted in {}µs with burst {} and interval {}", sum, span, quota.limit(), t
                );
            }
        }
    }

    #[test]
    fn leaky_bucket_spaces_departures(
        quota in quota_strategy(Algorithm::LeakyBucket),
        steps in steps_strategy(),
    ) {
        let trace = trace(&quota, &steps);
        check_common(&quota, &trace)?;
        let t = quota.interval_micros();
        let mut last: Option<(u64, u64)> = None; // (departure, cost)
        for (now, cost, d, _, _) in &trace {
            if d.is_allowed() && *cost > 0 {
                prop_assert!(d.delay <= quota.max_delay());
                let departure = now + d.delay.as_micros() as u64;
                if let Some((prev, prev_cost)) = last {
                    prop_assert!(departure >= prev + prev_cost * t,
                        "departures {} and {} closer than {}", prev, departure, prev_cost * t);
                }
                last = Some((departure, u64::from(*cost)));
            }
        }
    }

    #[test]
    fn fixed_window_never_exceeds_limit_per_window(
        quota in quota_strategy(Algorithm::FixedWindow),
        steps in steps_strategy(),
    ) {
        let trace = trace(&quota, &steps);
        check_common(&quota, &trace)?;
        let w = quota.interval_micros();
        let mut per_window = std::collections::BTreeMap::new();
        for (t, c) in admitted(&trace) {
            *per_window.entry(t / w).or_insert(0) += c;
        }
        for (window, n) in per_window {
            prop_assert!(n <= u64::from(quota.limit()), "{} in window {}", n, window);
        }
    }

    #[test]
    fn sliding_log_never_exceeds_limit_in_any_window(
        quota in quota_strategy(Algorithm::SlidingWindowLog),
        steps in steps_strategy(),
    ) {
        let trace = trace(&quota, &steps);
        check_common(&quota, &trace)?;
        let w = quota.interval_micros();
        let ok = admitted(&trace);
        for (j, &(tj, _)) in ok.iter().enumerate() {
            let sum: u64 = ok[..=j].iter().filter(|(t, _)| t + w > tj).map(|(_, c)| c).sum();
            prop_assert!(sum <= u64::from(quota.limit()), "{} in the window ending {}", sum, tj);
        }
        // Memory is bounded by the limit.
        for (_, _, _, _, after) in &trace {
            if let State::Log(log) = after {
                prop_assert!(log.entries.len() <= quota.limit() as usize);
            }
        }
    }

    #[test]
    fn sliding_counter_stays_within_its_bounds(
        quota in quota_strategy(Algorithm::SlidingWindowCounter),
        steps in steps_strategy(),
    ) {
        let trace = trace(&quota, &steps);
        check_common(&quota, &trace)?;
        let w = quota.interval_micros();
        let limit = u64::from(quota.limit());
        let ok = admitted(&trace);
        let mut per_window = std::collections::BTreeMap::new();
        for &(t, c) in &ok {
            *per_window.entry(t / w).or_insert(0) += c;
        }
        for (window, n) in per_window {
            prop_assert!(n <= limit, "{} in aligned window {}", n, window);
        }
        for (j, &(tj, _)) in ok.iter().enumerate() {
            let sum: u64 = ok[..=j].iter().filter(|(t, _)| t + w > tj).map(|(_, c)| c).sum();
            prop_assert!(sum <= 2 * limit, "{} in the window ending {}", sum, tj);
        }
    }

    #[test]
    fn reservations_respect_the_bucket(
        quota in quota_strategy(Algorithm::TokenBucket),
        gaps in proptest::collection::vec((0u64..3_000, 1u32..4), 1..60),
    ) {
        // Reserving at `earliest` and departing then admits no more than burst + rate·t, like
        // deciding does.
        let mut now = 0u64;
        let mut state: Option<State> = None;
        let mut departures = Vec::new();
        for (gap, cost) in gaps {
            now += gap;
            match earliest(state.as_ref(), at(now), &quota, cost) {
                Earliest::At(t) => {
                    prop_assert!(t >= at(now));
                    let s = reserve_at(state.as_ref(), t, &quota, cost).expect("a bucket");
                    departures.push((t.as_micros(), u64::from(cost)));
                    state = Some(s);
                }
                Earliest::Never => prop_assert!(cost > quota.limit()),
            }
        }
        departures.sort_unstable();
        let t = quota.interval_micros();
        for i in 0..departures.len() {
            let mut sum = 0;
            for j in i..departures.len() {
                sum += departures[j].1;
                let span = departures[j].0 - departures[i].0;
                prop_assert!(sum <= u64::from(quota.limit()) + span / t);
            }
        }
    }
}

#[test]
fn pause_holds_a_bucket_then_trickles() {
    let q = Quota::per_second(10).unwrap().with_burst(5).unwrap();
    let (_, s) = decide(None, at(0), &q, 1);
    let paused = pause(Some(&s), &q, at(2 * S)).unwrap();
    assert!(!decide(Some(&paused), at(2 * S - 1), &q, 1).0.is_allowed());
    let (d, s2) = decide(Some(&paused), at(2 * S), &q, 1);
    assert!(d.is_allowed());
    assert_eq!(
        d.remaining, 0,
        "one request at the end of the pause, then the rate"
    );
    assert_eq!(
        decide(Some(&s2), at(2 * S), &q, 1).0.retry_after,
        Duration::from_millis(100)
    );
    // A shorter pause never shortens a longer one.
    assert_eq!(pause(Some(&paused), &q, at(S)), Some(paused.clone()));
    let leaky = Quota::per_second(10)
        .unwrap()
        .shaped(Duration::from_secs(1))
        .unwrap();
    let p = pause(None, &leaky, at(3 * S)).unwrap();
    assert_eq!(
        decide(Some(&p), at(2 * S + S / 2), &leaky, 1).0.delay,
        Duration::from_millis(500)
    );
    let window = Quota::fixed_window(1, Duration::from_secs(10)).unwrap();
    assert_eq!(pause(None, &window, at(S)), None);
}

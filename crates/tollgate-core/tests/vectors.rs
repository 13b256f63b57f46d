//! The shared test vectors (`tests/vectors.txt`): kept in step with the model, and replayed
//! against the algorithms and the `MemoryStore`.
//!
//! To regenerate the file after a deliberate change of the model (then review the diff by hand):
//! `TOLLGATE_REGENERATE_VECTORS=1 cargo test -p tollgate-core --test vectors`

use std::time::Duration;

use tollgate_core::vectors::{self, Step, Vector};
use tollgate_core::{Limit, ManualClock, MemoryStore, Quota, Timestamp};

const HEADER: &str = "\
# tollgate test vectors: every store must give exactly these decisions.
#
# Produced from the Rust model (crates/tollgate-core/tests/vectors.rs; regenerate with
# TOLLGATE_REGENERATE_VECTORS=1). The `*_textbook` vectors were also worked out by hand.
# Each vector starts from a fresh key; times are the store's clock in microseconds.
#
# step <time_us> <cost> => <allow|deny|never> <limit> <remaining> <reset_after_us> <retry_after_us> <delay_us>

";

const S: u64 = 1_000_000;
/// A realistic Unix time in microseconds (2026-11-22), so the Redis scripts see numbers of the
/// size they will see in production.
const T0: u64 = 1_795_305_600_000_000;

/// A small deterministic generator (64-bit LCG), so the file does not depend on a crate.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_steps(seed: u64, quota: &Quota, n: usize) -> Vec<(u64, u32)> {
    let mut rng = Lcg(seed);
    let scale = quota.interval_micros().max(1);
    let mut t = T0 + rng.below(10 * S);
    (0..n)
        .map(|_| {
            // Mostly bursts and gaps around the interval, sometimes a long pause.
            t += match rng.below(10) {
                0..=3 => 0,
                4..=7 => rng.below(2 * scale),
                8 => rng.below(scale / 3 + 1),
                _ => rng.below(quota.window_span_micros() + 1),
            };
            let cost = match rng.below(20) {
                0 => 0,
                1 => quota.limit() + 1,
                2..=4 => 1 + rng.below(3) as u32,
                _ => 1,
            };
            (t, cost)
        })
        .collect()
}

fn q(r: Result<Quota, tollgate_core::QuotaError>) -> Quota {
    r.expect("the quotas here are valid")
}

/// A vector's input: name, quota, (time µs, cost) of each request.
type Case = (String, Quota, Vec<(u64, u32)>);

/// The vectors' inputs: hand-checked textbook cases first, then generated sequences.
fn cases() -> Vec<Case> {
    let ms = 1_000;
    let mut cases = vec![
        (
            "token_bucket_textbook".to_owned(),
            q(Quota::per_second(1).and_then(|q| q.with_burst(3))),
            vec![
                (0, 1),
                (0, 1),
                (0, 1),
                (0, 1),
                (S, 1),
                (3 * S / 2, 1),
                (10 * S, 4),
                (10 * S, 3),
            ],
        ),
        (
            "leaky_bucket_textbook".to_owned(),
            q(Quota::per_second(10).and_then(|q| q.shaped(Duration::from_millis(250)))),
            vec![(0, 1), (0, 1), (0, 1), (0, 1), (60 * ms, 1)],
        ),
        (
            "fixed_window_textbook".to_owned(),
            q(Quota::fixed_window(2, Duration::from_secs(10))),
            vec![(3 * S, 1), (3 * S, 1), (9 * S, 1), (10 * S, 1), (10 * S, 3)],
        ),
        (
            "sliding_window_log_textbook".to_owned(),
            q(Quota::sliding_window_log(2, Duration::from_secs(10))),
            vec![(0, 1), (4 * S, 1), (9 * S, 1), (10 * S, 1), (10 * S, 1)],
        ),
        (
            "sliding_window_counter_textbook".to_owned(),
            q(Quota::sliding_window_counter(10, Duration::from_secs(10))),
            [
                vec![(5 * S, 1); 10],
                vec![(12 * S, 1), (12 * S, 1), (12 * S, 1), (13 * S, 1)],
            ]
            .concat(),
        ),
    ];
    let quotas = [
        (
            "token_bucket_basic_tier",
            q(Quota::per_minute(100).and_then(|q| q.with_burst(20))),
        ),
        ("token_bucket_7_per_second", q(Quota::per_second(7))),
        (
            "token_bucket_burst_1",
            q(Quota::per_period(3, Duration::from_millis(10))),
        ),
        (
            "token_bucket_hourly",
            q(Quota::per_hour(5000).and_then(|q| q.with_burst(10))),
        ),
        (
            "leaky_bucket_shaping",
            q(Quota::per_second(20).and_then(|q| q.shaped(Duration::from_millis(300)))),
        ),
        (
            "leaky_bucket_no_delay",
            q(Quota::per_second(5).and_then(|q| q.shaped(Duration::ZERO))),
        ),
        (
            "fixed_window_minute",
            q(Quota::fixed_window(30, Duration::from_secs(60))),
        ),
        (
            "fixed_window_short",
            q(Quota::fixed_window(3, Duration::from_millis(700))),
        ),
        (
            "sliding_window_log_10s",
            q(Quota::sliding_window_log(8, Duration::from_secs(10))),
        ),
        (
            "sliding_window_log_short",
            q(Quota::sliding_window_log(3, Duration::from_millis(900))),
        ),
        (
            "sliding_window_counter_minute",
            q(Quota::sliding_window_counter(25, Duration::from_secs(60))),
        ),
        (
            "sliding_window_counter_short",
            q(Quota::sliding_window_counter(4, Duration::from_millis(800))),
        ),
    ];
    for (i, (name, quota)) in quotas.into_iter().enumerate() {
        for seed in 0..2u64 {
            let steps = random_steps(1_000 * i as u64 + seed, &quota, 60);
            cases.push((format!("{name}_{seed}"), quota, steps));
        }
    }
    cases
}

fn from_model() -> Vec<Vector> {
    cases()
        .into_iter()
        .map(|(name, quota, requests)| {
            let requests: Vec<_> = requests
                .into_iter()
                .map(|(t, c)| (Timestamp::from_micros(t), c))
                .collect();
            let decisions = vectors::replay_model(&quota, &requests);
            let steps = requests
                .iter()
                .zip(decisions)
                .map(|(&(now, cost), expected)| Step {
                    now,
                    cost,
                    expected,
                })
                .collect();
            Vector { name, quota, steps }
        })
        .collect()
}

#[test]
fn the_file_matches_the_model() {
    let rendered = format!("{HEADER}{}", vectors::render(&from_model()));
    if std::env::var_os("TOLLGATE_REGENERATE_VECTORS").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors.txt");
        std::fs::write(path, &rendered).expect("write tests/vectors.txt");
        return;
    }
    // Compare vector by vector so a failure names the first difference.
    let file = vectors::load().expect("tests/vectors.txt parses");
    let model = from_model();
    assert_eq!(file.len(), model.len(), "number of vectors");
    for (f, m) in file.iter().zip(&model) {
        assert_eq!(f.name, m.name);
        assert_eq!(f.quota, m.quota, "quota of {}", f.name);
        for (i, (fs, ms)) in f.steps.iter().zip(&m.steps).enumerate() {
            assert_eq!(fs, ms, "{} step {i}", f.name);
        }
        assert_eq!(f.steps.len(), m.steps.len(), "steps of {}", f.name);
    }
    assert_eq!(
        vectors::VECTORS,
        rendered,
        "formatting of tests/vectors.txt"
    );
}

#[test]
fn the_file_covers_every_algorithm_and_outcome() {
    let file = vectors::load().expect("tests/vectors.txt parses");
    for algorithm in tollgate_core::Algorithm::ALL {
        let steps: Vec<&Step> = file
            .iter()
            .filter(|v| v.quota.algorithm() == algorithm)
            .flat_map(|v| &v.steps)
            .collect();
        for outcome in [
            tollgate_core::Outcome::Allowed,
            tollgate_core::Outcome::Denied,
            tollgate_core::Outcome::InsufficientCapacity,
        ] {
            assert!(
                steps.iter().any(|s| s.expected.outcome == outcome),
                "{algorithm} has no {outcome:?} step"
            );
        }
    }
}

#[test]
fn memory_store_replays_every_vector() {
    let vectors = vectors::load().expect("tests/vectors.txt parses");
    for v in &vectors {
        let clock = ManualClock::new(Timestamp::ZERO);
        let store = MemoryStore::builder().clock(clock.clone()).build();
        for (i, step) in v.steps.iter().enumerate() {
            clock.set(step.now);
            let verdict = store.decide_now(&[Limit::new("k", &v.quota, step.cost)]);
            assert_eq!(verdict.decisions(), [step.expected], "{} step {i}", v.name);
        }
    }
}

#[test]
fn parse_errors_name_the_line() {
    let err = vectors::parse("vector a\nquota token_bucket limit=0 interval=5\n").unwrap_err();
    assert_eq!(err.line, 2);
    let err = vectors::parse(
        "vector a\nquota fixed_window limit=1 interval=5\nstep 1 1 => maybe 1 1 1 1 1\n",
    )
    .unwrap_err();
    assert_eq!(err.line, 3);
    assert!(err.to_string().contains("unknown outcome"));
    let err = vectors::parse("step 1 1 => allow 1 1 1 1 1\n").unwrap_err();
    assert_eq!(err.line, 1);
}

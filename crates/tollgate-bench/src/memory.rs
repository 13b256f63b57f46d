//! `memory`: a keyed token-bucket decision, `MemoryStore` against governor's keyed limiter.
//!
//! Both get the same quota, the same pre-built `String` keys and the same access pattern; each
//! keeps its own defaults otherwise (hasher, clock, sharding). The quota is generous so that
//! nothing is denied: the benchmark measures the decision, not 429s. Denials are counted and
//! reported if any happen.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, RateLimiter};
use tollgate_core::{Limit, MemoryStore, Quota};

use crate::BoxError;
use crate::report::{Row, median, time_ratio};

/// Refill rate per key, per second: a realistic per-caller rate, so a key visited every few
/// milliseconds keeps its state between visits.
const RATE: u32 = 100;
/// Burst: large enough that no key runs dry during a measurement.
const BURST: u32 = 1_000_000;
/// Decisions charged to one hot key before the next hot key takes over (well under `BURST`).
const HOT_ROUND: u64 = 400_000;
/// Keys of the many-keys case.
const MANY_KEYS: usize = 100_000;
/// A step through the keys that visits all of them in a scattered order (coprime to the count).
const STRIDE: usize = 48_271;
/// Decisions between two reads of the clock in the timed loop.
const CHUNK: u64 = 1024;

/// The key sets of the two cases.
enum Keys {
    /// One key at a time, everyone on it; a new one every `HOT_ROUND` decisions.
    Hot(Vec<String>),
    /// `MANY_KEYS` keys visited in turn.
    Many(Vec<String>),
}

impl Keys {
    fn hot() -> Keys {
        Keys::Hot((0..4096).map(|i| format!("user:hot:{i:04}")).collect())
    }

    fn many() -> Keys {
        Keys::Many((0..MANY_KEYS).map(|i| format!("user:{i:08}")).collect())
    }

    fn label(&self) -> &'static str {
        match self {
            Keys::Hot(_) => "1 hot key",
            Keys::Many(_) => "100k keys",
        }
    }
}

/// What one timed run gave.
struct Measured {
    /// Nanoseconds per decision, as each thread sees it (wall time over its own decisions).
    ns: f64,
    denied: u64,
}

/// Runs `decide` on `threads` threads for `duration`, after one untimed pass that creates every
/// key, and returns the cost of a decision per thread.
fn measure<F>(decide: &F, keys: &Keys, threads: usize, duration: Duration) -> Measured
where
    F: Fn(&String) -> bool + Sync,
{
    // Warm-up: create the keys (and fault in the tables) outside the timed part.
    match keys {
        Keys::Hot(hot) => {
            let _ = decide(&hot[0]);
        }
        Keys::Many(many) => {
            for key in many {
                let _ = decide(key);
            }
        }
    }
    let barrier = Barrier::new(threads);
    let results: Vec<(u64, u64, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    let mut done = 0u64;
                    let mut denied = 0u64;
                    let mut i = t * (MANY_KEYS / 2);
                    loop {
                        for _ in 0..CHUNK {
                            let key = match keys {
                                Keys::Hot(hot) => {
                                    // Threads share each hot key: together they charge it about
                                    // HOT_ROUND times.
                                    let round = done / (HOT_ROUND / threads as u64);
                                    &hot[1 + round as usize % (hot.len() - 1)]
                                }
                                Keys::Many(many) => {
                                    i = (i + STRIDE) % many.len();
                                    &many[i]
                                }
                            };
                            if !decide(black_box(key)) {
                                denied += 1;
                            }
                            done += 1;
                        }
                        let elapsed = started.elapsed();
                        if elapsed >= duration {
                            return (done, denied, elapsed);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, 0, Duration::ZERO)))
            .collect()
    });
    let per_thread: Vec<f64> = results
        .iter()
        .filter(|(done, _, _)| *done > 0)
        .map(|(done, _, elapsed)| elapsed.as_nanos() as f64 / *done as f64)
        .collect();
    Measured {
        ns: per_thread.iter().sum::<f64>() / per_thread.len().max(1) as f64,
        denied: results.iter().map(|r| r.1).sum(),
    }
}

fn governor_quota() -> Result<governor::Quota, BoxError> {
    let rate = NonZeroU32::new(RATE).ok_or("zero rate")?;
    let burst = NonZeroU32::new(BURST).ok_or("zero burst")?;
    Ok(governor::Quota::per_second(rate).allow_burst(burst))
}

/// Runs the memory suite.
pub(crate) fn run(quick: bool) -> Result<Vec<Row>, BoxError> {
    let (reps, duration) = if quick {
        (3, Duration::from_millis(250))
    } else {
        (7, Duration::from_millis(700))
    };
    let quota = Quota::per_second(RATE)?.with_burst(BURST)?;
    let g_quota = governor_quota()?;
    let mut rows = Vec::new();
    for threads in [1, 2] {
        for keys in [Keys::hot(), Keys::many()] {
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            let mut denied = 0;
            // Alternate the two so drifts in machine load hit both alike.
            for _ in 0..reps {
                let store = MemoryStore::new();
                let m = measure(
                    &|key: &String| store.decide_now(&[Limit::new(key, &quota, 1)]).is_allowed(),
                    &keys,
                    threads,
                    duration,
                );
                ours.push(m.ns);
                denied += m.denied;
                let limiter: DefaultKeyedRateLimiter<String> = RateLimiter::dashmap(g_quota);
                let m = measure(
                    // governor's keyed check takes `&K`: the pre-built key, cloned only when new.
                    &|key: &String| limiter.check_key(key).is_ok(),
                    &keys,
                    threads,
                    duration,
                );
                theirs.push(m.ns);
                denied += m.denied;
            }
            if denied > 0 {
                eprintln!("warning: {denied} decisions denied in the memory suite");
            }
            let ns = median(&mut ours);
            let peer = median(&mut theirs);
            let case = format!(
                "memory: {threads} thread{}, {} (ns/decision per thread)",
                if threads == 1 { "" } else { "s" },
                keys.label()
            );
            eprintln!("  {case}: tollgate {ns:.1} ns, governor {peer:.1} ns");
            rows.push(Row {
                case,
                tollgate: format!("{ns:.1} ns"),
                peer: "governor keyed (DashMap)".into(),
                peer_value: format!("{peer:.1} ns"),
                ratio: time_ratio(ns, peer),
            });
        }
    }
    Ok(rows)
}

//! The five algorithms, each a pure function of (state, now, quota, cost) returning
//! (decision, new state).
//!
//! No function here reads a clock or does I/O: a store reads the time once, loads the key's state,
//! calls [`decide`] and writes the new state back atomically. The Redis scripts of `tollgate-redis`
//! port exactly these functions, and the checked-in test vectors are replayed against both.
//!
//! | algorithm | state | module |
//! |---|---|---|
//! | token bucket (GCRA) | theoretical arrival time | [`token_bucket`] |
//! | leaky bucket (shaping) | next departure time | [`leaky_bucket`] |
//! | fixed window | window start + count | [`fixed_window`] |
//! | sliding window log | admitted (time, cost) entries | [`sliding_window_log`] |
//! | sliding window counter | window start + two counts | [`sliding_window_counter`] |
//!
//! A cost of 0 peeks: it reports the decision a unit-cost request would see in `remaining` and never
//! changes the state. A cost above [`Quota::limit`] is
//! [`Outcome::InsufficientCapacity`](crate::Outcome::InsufficientCapacity).
//!
//! ```
//! use std::time::Duration;
//! use tollgate_core::{algorithm, Quota, Timestamp};
//!
//! # fn main() -> Result<(), tollgate_core::QuotaError> {
//! let quota = Quota::fixed_window(2, Duration::from_secs(10))?;
//! let t = Timestamp::from_micros(3_000_000);
//! let (a, s) = algorithm::decide(None, t, &quota, 1);
//! let (b, s) = algorithm::decide(Some(&s), t, &quota, 1);
//! let (c, _) = algorithm::decide(Some(&s), t, &quota, 1);
//! assert!(a.is_allowed() && b.is_allowed() && !c.is_allowed());
//! assert_eq!(c.retry_after, Duration::from_secs(7)); // the window ends at 10 s
//! # Ok(())
//! # }
//! ```

pub mod fixed_window;
pub mod leaky_bucket;
pub mod sliding_window_counter;
pub mod sliding_window_log;
pub mod token_bucket;

pub use fixed_window::WindowState;
pub use sliding_window_counter::CounterState;
pub use sliding_window_log::{LogEntry, LogState};

use crate::{Algorithm, Decision, Quota, Timestamp};

/// The state of a token or leaky bucket: its theoretical arrival time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BucketState {
    /// Token bucket: when the bucket is full again. Leaky bucket: when the next request may leave.
    /// A time at or before now means an idle, full bucket.
    pub tat: Timestamp,
}

/// The state of one key under any algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum State {
    /// Token or leaky bucket.
    Bucket(BucketState),
    /// Fixed window.
    Window(WindowState),
    /// Sliding window counter.
    Counter(CounterState),
    /// Sliding window log.
    Log(LogState),
}

impl State {
    /// A placeholder state: a bucket idle since the epoch (as fresh as can be).
    pub const EMPTY: State = State::Bucket(BucketState {
        tat: Timestamp::ZERO,
    });

    /// The state of a key never seen before (full bucket, empty window) for `algorithm`.
    pub fn fresh(algorithm: Algorithm) -> State {
        match algorithm {
            Algorithm::TokenBucket | Algorithm::LeakyBucket => {
                State::Bucket(BucketState::default())
            }
            Algorithm::FixedWindow => State::Window(WindowState::default()),
            Algorithm::SlidingWindowCounter => State::Counter(CounterState::default()),
            Algorithm::SlidingWindowLog => State::Log(LogState::default()),
        }
    }

    /// The time from which this state says nothing a fresh one would not: the bucket is full
    /// again, the window has passed. A store may forget the key then (the Redis store uses it as the
    /// key's expiry).
    pub fn expires_at(&self, quota: &Quota) -> Timestamp {
        match self {
            State::Bucket(s) => s.tat,
            State::Window(s) => s.expires_at(quota),
            State::Counter(s) => s.expires_at(quota),
            State::Log(s) => s.expires_at(quota),
        }
    }

    /// A state at least as spent as any state of `quota`'s algorithm that stops mattering at
    /// `until` (`expires_at`): what a store assumes of a key it had to forget while its state
    /// still mattered, so that forgetting never gives the key more than it had. A bucket comes
    /// back with the arrival time `until` (exactly its own or later); a window algorithm comes
    /// back exhausted for the window(s) `until` reaches into.
    pub fn exhausted_until(quota: &Quota, now: Timestamp, until: Timestamp) -> State {
        let w = quota.interval_micros();
        let start = Timestamp::from_micros(now.as_micros() / w * w);
        match quota.algorithm() {
            Algorithm::TokenBucket | Algorithm::LeakyBucket => {
                State::Bucket(BucketState { tat: until })
            }
            Algorithm::FixedWindow => State::Window(WindowState {
                start,
                count: quota.limit(),
            }),
            Algorithm::SlidingWindowCounter => State::Counter(CounterState {
                start,
                previous: quota.limit(),
                current: quota.limit(),
            }),
            Algorithm::SlidingWindowLog => State::Log(LogState {
                entries: std::iter::once(LogEntry {
                    at: Timestamp::from_micros(until.as_micros().saturating_sub(w)),
                    cost: quota.limit(),
                })
                .collect(),
            }),
        }
    }

    fn matches(&self, algorithm: Algorithm) -> bool {
        matches!(
            (self, algorithm),
            (
                State::Bucket(_),
                Algorithm::TokenBucket | Algorithm::LeakyBucket
            ) | (State::Window(_), Algorithm::FixedWindow)
                | (State::Counter(_), Algorithm::SlidingWindowCounter)
                | (State::Log(_), Algorithm::SlidingWindowLog)
        )
    }

    fn bucket(state: Option<&State>) -> BucketState {
        match state {
            Some(State::Bucket(s)) => *s,
            _ => BucketState::default(),
        }
    }
}

/// Decides a request of `cost` at `now` against `quota`, given the key's state (`None` for a key
/// never seen, or forgotten).
///
/// A state written by a different algorithm (the configuration changed) counts as fresh.
pub fn decide(
    state: Option<&State>,
    now: Timestamp,
    quota: &Quota,
    cost: u32,
) -> (Decision, State) {
    let state = state.filter(|s| s.matches(quota.algorithm()));
    decide_owned(state.cloned(), now, quota, cost)
}

/// [`decide`], consuming the state instead of copying it. When the request is denied the returned
/// state is equivalent to the one given (expired entries may have been dropped), so a store may
/// always write it back.
pub fn decide_owned(
    state: Option<State>,
    now: Timestamp,
    quota: &Quota,
    cost: u32,
) -> (Decision, State) {
    let state = state.filter(|s| s.matches(quota.algorithm()));
    match quota.algorithm() {
        Algorithm::TokenBucket => {
            let (d, s) = token_bucket::decide(State::bucket(state.as_ref()), now, quota, cost);
            (d, State::Bucket(s))
        }
        Algorithm::LeakyBucket => {
            let (d, s) = leaky_bucket::decide(State::bucket(state.as_ref()), now, quota, cost);
            (d, State::Bucket(s))
        }
        Algorithm::FixedWindow => {
            let s = match state {
                Some(State::Window(s)) => s,
                _ => WindowState::default(),
            };
            let (d, s) = fixed_window::decide(s, now, quota, cost);
            (d, State::Window(s))
        }
        Algorithm::SlidingWindowCounter => {
            let s = match state {
                Some(State::Counter(s)) => s,
                _ => CounterState::default(),
            };
            let (d, s) = sliding_window_counter::decide(s, now, quota, cost);
            (d, State::Counter(s))
        }
        Algorithm::SlidingWindowLog => {
            let s = match state {
                Some(State::Log(s)) => s,
                _ => LogState::default(),
            };
            let (d, s) = sliding_window_log::decide(s, now, quota, cost);
            (d, State::Log(s))
        }
    }
}

/// When a request of `cost` could pass, for reserving a place ahead of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earliest {
    /// At this time (`now` or later).
    At(Timestamp),
    /// Never: the cost exceeds the quota's limit.
    Never,
}

/// The earliest time at or after `now` at which a request of `cost` passes.
///
/// For a bucket this is exact and a place at that time can be held with [`reserve_at`]. For a window
/// algorithm it is the time the decision would turn to allowed ([`Decision::retry_after`]); windows
/// cannot hold a place in the future, so a caller waits and decides again.
pub fn earliest(state: Option<&State>, now: Timestamp, quota: &Quota, cost: u32) -> Earliest {
    let state = state.filter(|s| s.matches(quota.algorithm()));
    let at = match quota.algorithm() {
        Algorithm::TokenBucket => token_bucket::earliest(State::bucket(state), now, quota, cost),
        Algorithm::LeakyBucket => leaky_bucket::earliest(State::bucket(state), now, quota, cost),
        _ => {
            let (d, _) = decide(state, now, quota, cost);
            match d.outcome {
                crate::Outcome::InsufficientCapacity => None,
                _ => Some(now + d.retry_after),
            }
        }
    };
    at.map_or(Earliest::Never, Earliest::At)
}

/// Holds a place for a request of `cost` leaving at `at` in a bucket: the new theoretical arrival
/// time is `max(tat, at) + cost·T`.
///
/// Only for buckets, and only with an `at` no earlier than [`earliest`] returned (otherwise the
/// bucket would overflow). Returns `None` for a window algorithm.
pub fn reserve_at(state: Option<&State>, at: Timestamp, quota: &Quota, cost: u32) -> Option<State> {
    if !quota.algorithm().is_bucket() {
        return None;
    }
    let tat = State::bucket(state.filter(|s| s.matches(quota.algorithm()))).tat;
    let next = tat.max(at).as_micros() + quota.interval_micros() * u64::from(cost);
    Some(State::Bucket(BucketState {
        tat: Timestamp::from_micros(next),
    }))
}

/// Gives a reservation back, as much of it as is sound.
///
/// If the bucket still stands where the reservation left it (`after`: nobody reserved since), it
/// returns to `before`. If others reserved after it, their places were computed with this one in
/// line and they keep them; what they took since (`tat - after`) is not given back, the rest of
/// this reservation's `charge` is (the rule of `golang.org/x/time/rate`: its tokens minus those
/// reserved after it). The bucket then never holds more room than it would have had without this
/// reservation, so no later request is admitted that the model without it would refuse. A
/// bucket that stands below `after` (someone else gave back) is left as it is.
pub fn cancel(
    state: Option<&State>,
    before: Timestamp,
    after: Timestamp,
    charge: std::time::Duration,
) -> Option<State> {
    let Some(State::Bucket(s)) = state else {
        return None;
    };
    if s.tat == after {
        return Some(State::Bucket(BucketState { tat: before }));
    }
    let since = s.tat.as_micros().checked_sub(after.as_micros())?;
    let charge = u64::try_from(charge.as_micros()).unwrap_or(u64::MAX);
    let give = charge.saturating_sub(since);
    (give > 0).then(|| {
        State::Bucket(BucketState {
            tat: Timestamp::from_micros(s.tat.as_micros() - give),
        })
    })
}

/// Pauses a bucket until `until`: nothing passes before then, and from then on it refills from
/// (nearly) empty, so a paused client resumes at the configured rate instead of in a burst (the
/// reaction to an upstream's `429` + `Retry-After`). A token bucket lets exactly one unit through
/// at `until`; a leaky bucket's next departure is `until`. Never shortens an existing wait.
///
/// Returns `None` for window algorithms, which have no way to express "nothing until then".
pub fn pause(state: Option<&State>, quota: &Quota, until: Timestamp) -> Option<State> {
    let target = match quota.algorithm() {
        Algorithm::TokenBucket => {
            until.as_micros() + quota.interval_micros() * u64::from(quota.limit() - 1)
        }
        Algorithm::LeakyBucket => until.as_micros(),
        _ => return None,
    };
    let tat = State::bucket(state.filter(|s| s.matches(quota.algorithm()))).tat;
    Some(State::Bucket(BucketState {
        tat: tat.max(Timestamp::from_micros(target)),
    }))
}

#[cfg(test)]
mod tests;

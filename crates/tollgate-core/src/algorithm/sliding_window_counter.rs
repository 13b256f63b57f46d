//! Sliding window counter: the two-window weighted approximation, in constant memory.
//!
//! Two counters are kept: the current aligned window's and the previous one's. At `e` into the
//! current window of length `W`, the estimate is `previous · (W - e) / W + current`; a request of cost
//! `c` passes when `estimate + c <= limit`. All of it is computed in integers scaled by `W`
//! (`previous · (W - e) + (current + c) · W <= limit · W`), so the Rust model and the Redis script agree
//! to the microsecond.
//!
//! Bounds: `current <= limit`, so never more than `limit` per aligned window; and never more than
//! `2 × limit` in any window of length `W` (reached only when the whole previous window's traffic
//! sits at its very end). A denial writes nothing.

use crate::{Decision, Outcome, Quota, Timestamp};

/// The state of one sliding-window-counter key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CounterState {
    /// Start of the window `current` belongs to.
    pub start: Timestamp,
    /// Cost admitted in the window before `start`.
    pub previous: u32,
    /// Cost admitted since `start`.
    pub current: u32,
}

impl CounterState {
    /// When this state stops mattering (both counters have slid out).
    pub fn expires_at(&self, quota: &Quota) -> Timestamp {
        let w = quota.interval_micros();
        let start = self.start.as_micros();
        Timestamp::from_micros(if self.current > 0 {
            start + 2 * w
        } else if self.previous > 0 {
            start + w
        } else {
            start
        })
    }
}

/// Decides a request of `cost` at `now`.
pub fn decide(
    state: CounterState,
    now: Timestamp,
    quota: &Quota,
    cost: u32,
) -> (Decision, CounterState) {
    let now_us = now.as_micros();
    let w = quota.interval_micros();
    let limit = u64::from(quota.limit());
    let start = now_us - now_us % w;
    let (previous, current) = if state.start.as_micros() == start {
        (u64::from(state.previous), u64::from(state.current))
    } else if state.start.as_micros() + w == start {
        (u64::from(state.current), 0)
    } else {
        (0, 0)
    };
    let elapsed = now_us - start;
    // previous · (W - e): the previous window's weight, scaled by W.
    let weighted = previous * (w - elapsed);
    let left = |current: u64| ((limit * w).saturating_sub(weighted) / w).saturating_sub(current);
    let reset = |current: u64| {
        if current > 0 {
            start + 2 * w - now_us
        } else if previous > 0 {
            start + w - now_us
        } else {
            0
        }
    };
    let cost64 = u64::from(cost);
    if cost64 > limit {
        let d = Decision::from_micros(
            Outcome::InsufficientCapacity,
            quota.limit(),
            left(current),
            reset(current),
            0,
            0,
        );
        return (d, state);
    }
    if weighted + (current + cost64) * w <= limit * w {
        let current = current + cost64;
        let d = Decision::from_micros(
            Outcome::Allowed,
            quota.limit(),
            left(current),
            reset(current),
            0,
            0,
        );
        let next = if cost == 0 {
            state
        } else {
            CounterState {
                start: Timestamp::from_micros(start),
                previous: previous as u32,
                current: current as u32,
            }
        };
        (d, next)
    } else {
        let retry_at = if current + cost64 <= limit {
            // Wait in this window until the previous window's weight has decayed enough:
            // previous · (W - e') <= (limit - current - cost) · W. `previous > 0` since we were denied.
            let budget = (limit - current - cost64) * w;
            start + w - (budget / previous).min(w)
        } else {
            // Wait for the next window, where this window's count becomes the previous one:
            // current · (W - e') <= (limit - cost) · W. `current > 0` since current + cost > limit.
            let budget = (limit - cost64) * w;
            start + 2 * w - (budget / current).min(w)
        };
        let d = Decision::from_micros(
            Outcome::Denied,
            quota.limit(),
            left(current),
            reset(current),
            retry_at.saturating_sub(now_us),
            0,
        );
        (d, state)
    }
}

//! Fixed window: a counter per aligned window.
//!
//! Windows are aligned to the clock's epoch (`now - now % window`), which for the system clock and
//! Redis is the Unix epoch, so a one-minute window is a wall-clock minute. A denial writes nothing.
//! At a window boundary up to `2 × limit` requests can pass within a short time; that is the nature
//! of the algorithm (use a sliding window or a token bucket where it matters).

use crate::{Decision, Outcome, Quota, Timestamp};

/// The state of one fixed-window key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WindowState {
    /// Start of the window `count` belongs to.
    pub start: Timestamp,
    /// Cost admitted in that window.
    pub count: u32,
}

impl WindowState {
    /// When this state stops mattering (its window ends).
    pub fn expires_at(&self, quota: &Quota) -> Timestamp {
        Timestamp::from_micros(self.start.as_micros() + quota.interval_micros())
    }
}

/// Decides a request of `cost` at `now`.
pub fn decide(
    state: WindowState,
    now: Timestamp,
    quota: &Quota,
    cost: u32,
) -> (Decision, WindowState) {
    let now_us = now.as_micros();
    let w = quota.interval_micros();
    let limit = quota.limit();
    let start = now_us - now_us % w;
    let count = if state.start.as_micros() == start {
        state.count
    } else {
        0
    };
    let end = start + w - now_us;
    let reset = |count: u32| if count == 0 { 0 } else { end };
    let left = u64::from(limit.saturating_sub(count));
    if cost > limit {
        let d = Decision::from_micros(
            Outcome::InsufficientCapacity,
            limit,
            left,
            reset(count),
            0,
            0,
        );
        return (d, state);
    }
    if u64::from(count) + u64::from(cost) <= u64::from(limit) {
        let count = count + cost;
        let d = Decision::from_micros(
            Outcome::Allowed,
            limit,
            u64::from(limit - count),
            reset(count),
            0,
            0,
        );
        let next = if cost == 0 {
            state
        } else {
            WindowState {
                start: Timestamp::from_micros(start),
                count,
            }
        };
        (d, next)
    } else {
        let d = Decision::from_micros(Outcome::Denied, limit, left, end, end, 0);
        (d, state)
    }
}

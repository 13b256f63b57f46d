//! Leaky bucket as a shaper (nginx `limit_req` without `nodelay`).
//!
//! Requests leave at a constant spacing, the emission interval `T`. The state is the time the
//! next request may leave (`tat`). A request arriving at `now` gets the slot `max(tat, now)`: it is
//! admitted with a **delay** of `slot - now` if that is at most `max_delay`, and then occupies
//! `cost·T`; otherwise it is denied until its delay would fit. The quota's limit is the queue length,
//! `max_delay / T + 1`. A denial writes nothing.

use super::BucketState;
use crate::{Decision, Outcome, Quota, Timestamp};

fn remaining(delay: u64, max_delay: u64, t: u64) -> u64 {
    if delay <= max_delay {
        (max_delay - delay) / t + 1
    } else {
        0
    }
}

/// Decides a request of `cost` at `now`; an allowed decision carries the delay to wait before
/// sending it.
pub fn decide(
    state: BucketState,
    now: Timestamp,
    quota: &Quota,
    cost: u32,
) -> (Decision, BucketState) {
    let now_us = now.as_micros();
    let t = quota.interval_micros();
    let max_delay = quota.max_delay_micros();
    let limit = quota.limit();
    let delay = state.tat.as_micros().saturating_sub(now_us);
    if cost > limit {
        let left = remaining(delay, max_delay, t);
        let d = Decision::from_micros(Outcome::InsufficientCapacity, limit, left, delay, 0, 0);
        return (d, state);
    }
    if delay <= max_delay {
        let busy = delay + t * u64::from(cost);
        let left = remaining(busy, max_delay, t);
        let d = Decision::from_micros(Outcome::Allowed, limit, left, busy, 0, delay);
        let next = if cost == 0 {
            state
        } else {
            BucketState {
                tat: Timestamp::from_micros(now_us + busy),
            }
        };
        (d, next)
    } else {
        let d = Decision::from_micros(Outcome::Denied, limit, 0, delay, delay - max_delay, 0);
        (d, state)
    }
}

/// The earliest time at or after `now` at which a request may leave, or `None` when the cost
/// exceeds the queue.
pub fn earliest(state: BucketState, now: Timestamp, quota: &Quota, cost: u32) -> Option<Timestamp> {
    if cost > quota.limit() {
        return None;
    }
    Some(now.max(state.tat))
}

//! Token bucket in its GCRA form.
//!
//! The state is one number, the *theoretical arrival time* (TAT): the time at which the bucket
//! would be full again. With emission interval `T` (the time one token takes to refill) and
//! capacity `B`, a request of cost `c` at `now` conforms when
//! `max(tat, now) + c·T - now <= B·T`. An idle key has `tat <= now` and is full, so a new key starts
//! full. A denial writes nothing.

use super::BucketState;
use crate::{Decision, Outcome, Quota, Timestamp};

/// Decides a request of `cost` tokens at `now`.
///
/// Returns the decision and the new state (equal to `state` unless the request was allowed with a
/// cost above zero).
pub fn decide(
    state: BucketState,
    now: Timestamp,
    quota: &Quota,
    cost: u32,
) -> (Decision, BucketState) {
    let now_us = now.as_micros();
    let t = quota.interval_micros();
    let limit = quota.limit();
    let tau = t * u64::from(limit);
    let used = state.tat.as_micros().saturating_sub(now_us);
    let left = tau.saturating_sub(used) / t;
    if cost > limit {
        let d = Decision::from_micros(Outcome::InsufficientCapacity, limit, left, used, 0, 0);
        return (d, state);
    }
    let needed = used + t * u64::from(cost);
    if needed <= tau {
        let d = Decision::from_micros(Outcome::Allowed, limit, (tau - needed) / t, needed, 0, 0);
        let next = if cost == 0 {
            state
        } else {
            BucketState {
                tat: Timestamp::from_micros(now_us + needed),
            }
        };
        (d, next)
    } else {
        let d = Decision::from_micros(Outcome::Denied, limit, left, used, needed - tau, 0);
        (d, state)
    }
}

/// The earliest time at or after `now` at which a request of `cost` conforms, or `None` when the
/// cost exceeds the capacity.
pub fn earliest(state: BucketState, now: Timestamp, quota: &Quota, cost: u32) -> Option<Timestamp> {
    if cost > quota.limit() {
        return None;
    }
    let t = quota.interval_micros();
    let tau = t * u64::from(quota.limit());
    let at = (state.tat.as_micros() + t * u64::from(cost)).saturating_sub(tau);
    Some(now.max(Timestamp::from_micros(at)))
}

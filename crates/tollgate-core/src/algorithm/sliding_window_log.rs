//! Sliding window log: exact, never more than `limit` in any window of length `window`.
//!
//! The state is the list of admitted requests still inside the window, oldest first, each with its
//! time and cost. A request at `now` sees the entries with `at + window > now`. The list never holds
//! more than `limit` entries (each admitted entry has a cost of at least 1), so a key's memory is
//! bounded by its limit. A denial adds nothing (expired entries are dropped, which changes nothing
//! observable).

use std::collections::VecDeque;

use crate::{Decision, Outcome, Quota, Timestamp};

/// One admitted request in a sliding-window log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogEntry {
    /// When it was admitted.
    pub at: Timestamp,
    /// Its cost (at least 1).
    pub cost: u32,
}

/// The state of one sliding-window-log key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LogState {
    /// Admitted requests, oldest first.
    pub entries: VecDeque<LogEntry>,
}

impl LogState {
    /// When this state stops mattering (its newest entry leaves the window).
    pub fn expires_at(&self, quota: &Quota) -> Timestamp {
        self.entries.back().map_or(Timestamp::ZERO, |e| {
            Timestamp::from_micros(e.at.as_micros() + quota.interval_micros())
        })
    }
}

/// Decides a request of `cost` at `now`.
pub fn decide(
    mut state: LogState,
    now: Timestamp,
    quota: &Quota,
    cost: u32,
) -> (Decision, LogState) {
    let now_us = now.as_micros();
    let w = quota.interval_micros();
    let limit = u64::from(quota.limit());
    while state
        .entries
        .front()
        .is_some_and(|e| e.at.as_micros() + w <= now_us)
    {
        state.entries.pop_front();
    }
    let used: u64 = state.entries.iter().map(|e| u64::from(e.cost)).sum();
    let left = limit.saturating_sub(used);
    let reset = |s: &LogState| s.expires_at(quota).as_micros().saturating_sub(now_us);
    if u64::from(cost) > limit {
        let d = Decision::from_micros(
            Outcome::InsufficientCapacity,
            quota.limit(),
            left,
            reset(&state),
            0,
            0,
        );
        return (d, state);
    }
    if used + u64::from(cost) <= limit {
        if cost > 0 {
            // Keep the list sorted even if the clock stepped back.
            let at = state.entries.partition_point(|e| e.at <= now);
            state.entries.insert(at, LogEntry { at: now, cost });
        }
        let d = Decision::from_micros(
            Outcome::Allowed,
            quota.limit(),
            left - u64::from(cost),
            reset(&state),
            0,
            0,
        );
        (d, state)
    } else {
        let need = used + u64::from(cost) - limit;
        let mut freed = 0;
        let mut retry = 0;
        for e in &state.entries {
            freed += u64::from(e.cost);
            if freed >= need {
                retry = (e.at.as_micros() + w).saturating_sub(now_us);
                break;
            }
        }
        let d = Decision::from_micros(
            Outcome::Denied,
            quota.limit(),
            left,
            reset(&state),
            retry,
            0,
        );
        (d, state)
    }
}

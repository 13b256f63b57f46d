//! Call deadlines on Redis' clock: a script that runs after the client gave up writes nothing.
//!
//! A call the client stopped waiting for (its timeout passed, the failure policy answered) may
//! still be sitting in the server's input buffer: a server paused by `SIGSTOP`, stuck in a slow
//! command or behind a congested link runs it when it wakes. Left alone, such a script would
//! charge a request that was already answered 503 (`fail_closed`) or decided locally (`local`).
//! So every `decide` and `reserve` carries its deadline, expressed on the server's clock, and the
//! script refuses to write once that time has passed (status 4, *late*).
//!
//! The client never reads Redis' clock directly; it learns the offset between its own monotonic
//! clock and the server's `TIME` from the `now` every reply carries. A reply sent at local time
//! `s` and received at `r`, reporting server time `R`, says the offset `θ` (server minus local)
//! lies in `[R - r, R - s]`. The estimate is the greatest lower bound seen, `R - r`, so the
//! deadline sent, `local deadline + estimate`, is never later than the moment the client gives up
//! (as the server's clock reads it); it is early by at most the return leg of the best sample's
//! round trip. A sample whose upper bound falls below the estimate proves that the server's clock
//! went back (a step, or drift), and the estimate restarts from that sample.
//!
//! The bound this gives: a decision can still be charged after the client gave up only if its
//! script started before the deadline and its reply was on the way back when the timeout fired
//! (within one network hop of the deadline). Until the first reply there is no estimate and the
//! first call carries no deadline.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use redis::cluster_routing::Slot;

/// The origin of the local clock the offset is measured against.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// No estimate yet.
const UNKNOWN: i64 = i64::MIN;

/// Microseconds of the local monotonic clock at `at` (negative before the origin).
pub(crate) fn local_micros(at: Instant) -> i64 {
    let micros = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    match at.checked_duration_since(*ORIGIN) {
        Some(after) => micros(after),
        None => -micros(ORIGIN.duration_since(at)),
    }
}

/// The offset between the local monotonic clock and one server's `TIME`, in µs.
#[derive(Debug)]
pub(crate) struct ClockOffset {
    lower: AtomicI64,
}

impl ClockOffset {
    pub(crate) fn new() -> ClockOffset {
        ClockOffset {
            lower: AtomicI64::new(UNKNOWN),
        }
    }

    /// The server time (µs) by which a call must have run to be waited for until `deadline`, or
    /// 0 (no deadline) before the first reply.
    pub(crate) fn server_deadline(&self, deadline: Instant) -> u64 {
        let lower = self.lower.load(Ordering::Relaxed);
        if lower == UNKNOWN {
            return 0;
        }
        u64::try_from(local_micros(deadline).saturating_add(lower))
            .unwrap_or(0)
            .max(1)
    }

    /// Learns from a reply sent at `sent`, received at `received`, that reported `server_now`.
    pub(crate) fn observe(&self, sent: Instant, received: Instant, server_now: u64) {
        let Ok(server_now) = i64::try_from(server_now) else {
            return;
        };
        let lower = server_now.saturating_sub(local_micros(received));
        let upper = server_now.saturating_sub(local_micros(sent));
        let mut current = self.lower.load(Ordering::Relaxed);
        loop {
            let next = if current == UNKNOWN || upper < current {
                // The first sample, or proof that the server's clock went back.
                lower
            } else if lower > current {
                lower
            } else {
                return;
            };
            match self.lower.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }
}

/// The number of Redis Cluster slots.
const SLOTS: u16 = 16_384;

/// The clock offsets a store keeps: one for a standalone server; one per slot on a cluster (each
/// node has its own clock, and a slot may move to another node).
#[derive(Debug)]
pub(crate) enum ClockOffsets {
    Standalone(ClockOffset),
    /// Every slot, filled when the store is built. redis-rs' [`Slot`] does not give out its
    /// number, so the table is keyed by the slot itself rather than indexed.
    Cluster(HashMap<Slot, ClockOffset>),
}

impl ClockOffsets {
    pub(crate) fn standalone() -> ClockOffsets {
        ClockOffsets::Standalone(ClockOffset::new())
    }

    pub(crate) fn cluster() -> ClockOffsets {
        ClockOffsets::Cluster(
            (0..SLOTS)
                .filter_map(Slot::new)
                .map(|slot| (slot, ClockOffset::new()))
                .collect(),
        )
    }

    /// The offset of the server holding the key `key`.
    pub(crate) fn of(&self, key: &str) -> &ClockOffset {
        match self {
            ClockOffsets::Standalone(offset) => offset,
            ClockOffsets::Cluster(slots) => slots
                .get(&Slot::for_key(key))
                .expect("the table holds every cluster slot"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn no_deadline_before_the_first_reply() {
        let offset = ClockOffset::new();
        assert_eq!(offset.server_deadline(Instant::now()), 0);
    }

    #[test]
    fn the_deadline_is_never_later_than_the_true_one() {
        let offset = ClockOffset::new();
        // The server's clock is 1,000,000,000 µs ahead of the local one.
        let theta = 1_000_000_000i64;
        let sent = Instant::now();
        let ran = sent + Duration::from_micros(300);
        let received = sent + Duration::from_micros(700);
        offset.observe(sent, received, (local_micros(ran) + theta) as u64);
        let deadline = received + Duration::from_millis(50);
        let true_deadline = local_micros(deadline) + theta;
        let sent_deadline = offset.server_deadline(deadline) as i64;
        assert!(sent_deadline <= true_deadline);
        // Early by the return leg (400 µs) only.
        assert_eq!(true_deadline - sent_deadline, 400);
        // A quicker sample tightens it.
        let sent = received;
        let ran = sent + Duration::from_micros(50);
        offset.observe(
            sent,
            ran + Duration::from_micros(10),
            (local_micros(ran) + theta) as u64,
        );
        assert_eq!(true_deadline - offset.server_deadline(deadline) as i64, 10);
        // A slow one does not loosen it.
        let sent = ran;
        let ran = sent + Duration::from_micros(5);
        offset.observe(
            sent,
            ran + Duration::from_millis(40),
            (local_micros(ran) + theta) as u64,
        );
        assert_eq!(true_deadline - offset.server_deadline(deadline) as i64, 10);
    }

    #[test]
    fn a_server_clock_that_goes_back_restarts_the_estimate() {
        let offset = ClockOffset::new();
        let theta = 5_000_000i64;
        let t0 = Instant::now() + Duration::from_secs(1);
        offset.observe(
            t0,
            t0 + Duration::from_micros(100),
            (local_micros(t0) + theta) as u64,
        );
        // The server's clock steps back by 2 s.
        let theta = theta - 2_000_000;
        let t1 = t0 + Duration::from_millis(1);
        let ran = t1 + Duration::from_micros(40);
        offset.observe(
            t1,
            ran + Duration::from_micros(60),
            (local_micros(ran) + theta) as u64,
        );
        let deadline = t1 + Duration::from_millis(50);
        let true_deadline = local_micros(deadline) + theta;
        let sent = offset.server_deadline(deadline) as i64;
        assert!(
            sent <= true_deadline && true_deadline - sent == 60,
            "{sent} {true_deadline}"
        );
    }

    #[test]
    fn a_cluster_keeps_one_offset_per_slot() {
        let ClockOffsets::Cluster(slots) = ClockOffsets::cluster() else {
            panic!("a cluster table");
        };
        assert_eq!(slots.len(), usize::from(SLOTS));
        let offsets = ClockOffsets::cluster();
        let sent = Instant::now();
        offsets
            .of("{user1000}.following")
            .observe(sent, sent, 5_000_000);
        // The same slot (hash tag) shares the estimate; another slot has none yet.
        assert_ne!(offsets.of("user1000").server_deadline(sent), 0);
        assert_eq!(offsets.of("foo").server_deadline(sent), 0);
        // A standalone server has one offset for every key.
        let offsets = ClockOffsets::standalone();
        offsets.of("foo").observe(sent, sent, 5_000_000);
        assert_ne!(offsets.of("bar").server_deadline(sent), 0);
    }
}

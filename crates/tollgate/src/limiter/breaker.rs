//! A circuit breaker that puts a failing store aside.
//!
//! When the rate-limit store (Redis, say) fails or times out again and again, waiting on it for
//! every request only adds latency to an outage. The [`CircuitBreaker`] counts consecutive
//! failures; once there are [`BreakerConfig::failure_threshold`] of them it *opens*, and callers
//! use their fallback (allow, deny, or a local limiter) without calling the store. After
//! [`BreakerConfig::open_for`] one caller is let through as a *probe*; its outcome decides whether
//! the circuit closes again or stays open for another `open_for`.
//!
//! | state      | [`admit`] answers                                          | on success                | on failure                       |
//! |------------|------------------------------------------------------------|---------------------------|----------------------------------|
//! | `Closed`   | [`Store`]                                                  | failure count reset       | count + 1; at the threshold → `Open` |
//! | `Open`     | [`Fallback`]; once `open_for` has passed, [`Probe`] to one caller → `HalfOpen` | (ignored)  | (ignored)                        |
//! | `HalfOpen` | [`Fallback`] while the probe is out; a new [`Probe`] if it has been out for `open_for` | probe: → `Closed` | probe: → `Open` for `open_for` |
//!
//! Only a [`Probe`]'s outcome moves the circuit out of `HalfOpen`; outcomes of [`Store`] calls
//! that finish after the circuit opened are ignored. A probe whose outcome is never reported
//! (its future was dropped) does not wedge the circuit: after another `open_for` the next caller
//! gets a fresh probe.
//!
//! In the `Closed` state, [`admit`] is a single atomic load, and a success is an atomic load too
//! (plus a store after a failure); a lock is taken only on transitions and while open.
//!
//! ```
//! use std::time::Duration;
//! use tollgate::limiter::breaker::{Admission, BreakerConfig, BreakerState, CircuitBreaker};
//! use tollgate::core::{ManualClock, Timestamp};
//!
//! let clock = ManualClock::new(Timestamp::ZERO);
//! let config = BreakerConfig { failure_threshold: 2, open_for: Duration::from_secs(1) };
//! let breaker = CircuitBreaker::with_clock(config, clock.clone());
//!
//! for _ in 0..2 {
//!     let admission = breaker.admit();
//!     assert_eq!(admission, Admission::Store);
//!     breaker.on_failure(admission); // the store timed out
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! assert_eq!(breaker.admit(), Admission::Fallback);
//!
//! clock.advance(Duration::from_secs(1));
//! let probe = breaker.admit();
//! assert_eq!(probe, Admission::Probe);
//! assert_eq!(breaker.admit(), Admission::Fallback); // one probe at a time
//! breaker.on_success(probe);
//! assert_eq!(breaker.state(), BreakerState::Closed);
//! ```
//!
//! [`admit`]: CircuitBreaker::admit
//! [`Store`]: Admission::Store
//! [`Probe`]: Admission::Probe
//! [`Fallback`]: Admission::Fallback

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tollgate_core::{Clock, SystemClock, Timestamp};

/// When a [`CircuitBreaker`] opens, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BreakerConfig {
    /// Consecutive failures (errors or timeouts) that open the circuit. Default 5; 0 counts as 1.
    pub failure_threshold: u32,
    /// How long the circuit stays open before a probe is let through, and how long a probe may
    /// stay unreported before another one is. Default 1 s.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(1),
        }
    }
}

/// The state of a [`CircuitBreaker`]; see the [module documentation](self) for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// The store is in use.
    Closed,
    /// The store is put aside; callers use their fallback.
    Open,
    /// One probe call is testing the store; everyone else uses the fallback.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    /// `closed`, `open` or `half-open`, for logs and metrics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        })
    }
}

/// What a caller may do, as answered by [`CircuitBreaker::admit`]. Hand it back to
/// [`CircuitBreaker::on_success`] or [`CircuitBreaker::on_failure`] with the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Admission {
    /// Use the store.
    Store,
    /// Use the store; this call decides whether the circuit closes.
    Probe,
    /// Do not call the store; use the fallback. Reporting its outcome is allowed and ignored.
    Fallback,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// A circuit breaker in front of a store. `Send + Sync`; share it through an `Arc`.
///
/// See the [module documentation](self) for the state machine and an example.
pub struct CircuitBreaker<C = SystemClock> {
    config: BreakerConfig,
    clock: C,
    /// `CLOSED`, `OPEN` or `HALF_OPEN`; read without the lock, written under it.
    state: AtomicU8,
    /// Consecutive failures while closed.
    failures: AtomicU32,
    /// While open: when a probe may go out. While half-open: when the outstanding probe is
    /// considered lost. Microseconds of the clock; written under the lock.
    retry_at: AtomicU64,
    /// Serialises transitions.
    transition: Mutex<()>,
}

impl CircuitBreaker {
    /// A closed breaker on the system clock.
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker::with_clock(config, SystemClock::new())
    }
}

impl Default for CircuitBreaker {
    /// A closed breaker with the default [`BreakerConfig`] on the system clock.
    fn default() -> Self {
        CircuitBreaker::new(BreakerConfig::default())
    }
}

impl<C: Clock> CircuitBreaker<C> {
    /// A closed breaker reading time from `clock`.
    pub fn with_clock(config: BreakerConfig, clock: C) -> Self {
        CircuitBreaker {
            config,
            clock,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            retry_at: AtomicU64::new(0),
            transition: Mutex::new(()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    /// Whether the caller may use the store now.
    ///
    /// Closed: [`Admission::Store`]. Open: [`Admission::Fallback`] until `open_for` has passed,
    /// then [`Admission::Probe`] to exactly one caller (the circuit turns half-open) and
    /// [`Admission::Fallback`] to the others while that probe is out. A probe unreported for
    /// `open_for` is considered lost and the next caller gets a new one.
    #[must_use = "the admission says whether to call the store, and must be reported back"]
    pub fn admit(&self) -> Admission {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Admission::Store;
        }
        let now = self.clock.now().as_micros();
        if now < self.retry_at.load(Ordering::Acquire) {
            return Admission::Fallback;
        }
        let _guard = self.lock();
        match self.state.load(Ordering::Acquire) {
            CLOSED => Admission::Store,
            // Another caller took the probe between our check and the lock.
            _ if now < self.retry_at.load(Ordering::Acquire) => Admission::Fallback,
            _ => {
                self.retry_at.store(self.deadline(now), Ordering::Release);
                self.state.store(HALF_OPEN, Ordering::Release);
                Admission::Probe
            }
        }
    }

    /// Reports that the call admitted with `admission` succeeded.
    ///
    /// A successful probe closes the circuit; while closed, any success resets the count of
    /// consecutive failures. Outcomes of [`Admission::Store`] calls reported while the circuit is
    /// open or half-open are ignored, as are [`Admission::Fallback`]s.
    pub fn on_success(&self, admission: Admission) {
        match admission {
            Admission::Fallback => {}
            Admission::Probe => {
                let _guard = self.lock();
                match self.state.load(Ordering::Acquire) {
                    HALF_OPEN => {
                        self.failures.store(0, Ordering::Release);
                        self.state.store(CLOSED, Ordering::Release);
                    }
                    CLOSED => self.reset_failures(),
                    _ => {}
                }
            }
            Admission::Store => {
                if self.state.load(Ordering::Acquire) == CLOSED {
                    self.reset_failures();
                }
            }
        }
    }

    /// Reports that the call admitted with `admission` failed or timed out.
    ///
    /// While closed, the failure is counted, and the circuit opens when the count of consecutive
    /// failures reaches [`BreakerConfig::failure_threshold`]. A failed probe opens the circuit
    /// again for [`BreakerConfig::open_for`]. Outcomes of [`Admission::Store`] calls reported
    /// while the circuit is open or half-open are ignored, as are [`Admission::Fallback`]s.
    pub fn on_failure(&self, admission: Admission) {
        match admission {
            Admission::Fallback => return,
            Admission::Probe => {
                let _guard = self.lock();
                match self.state.load(Ordering::Acquire) {
                    HALF_OPEN => {
                        self.open(self.clock.now().as_micros());
                        return;
                    }
                    CLOSED => {}
                    _ => return,
                }
            }
            Admission::Store => {}
        }
        if self.state.load(Ordering::Acquire) != CLOSED {
            return;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures >= self.config.failure_threshold.max(1) {
            let _guard = self.lock();
            if self.state.load(Ordering::Acquire) == CLOSED {
                self.open(self.clock.now().as_micros());
            }
        }
    }

    /// The current state. An open circuit reads `Open` until a caller takes the probe, even after
    /// `open_for` has passed.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// Whether the store is put aside: the state is `Open` or `HalfOpen`.
    pub fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) != CLOSED
    }

    /// Opens the circuit for `open_for` from `now`. Called under the lock.
    fn open(&self, now: u64) {
        self.retry_at.store(self.deadline(now), Ordering::Release);
        self.failures.store(0, Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
    }

    fn deadline(&self, now: u64) -> u64 {
        (Timestamp::from_micros(now) + self.config.open_for).as_micros()
    }

    fn reset_failures(&self) {
        // Read first so that successes, the common case, do not write to a shared cache line.
        if self.failures.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // Nothing panics while the lock is held, and the guarded data is (), so a poisoned lock
        // holds nothing inconsistent.
        self.transition
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl<C> fmt::Debug for CircuitBreaker<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        };
        f.debug_struct("CircuitBreaker")
            .field("config", &self.config)
            .field("state", &state)
            .field("failures", &self.failures.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::thread;
    use tollgate_core::ManualClock;

    const OPEN_FOR: Duration = Duration::from_secs(1);

    fn breaker(threshold: u32) -> (CircuitBreaker<ManualClock>, ManualClock) {
        let clock = ManualClock::new(Timestamp::from_micros(1_000_000));
        let config = BreakerConfig {
            failure_threshold: threshold,
            open_for: OPEN_FOR,
        };
        (CircuitBreaker::with_clock(config, clock.clone()), clock)
    }

    fn fail(b: &CircuitBreaker<ManualClock>) {
        let a = b.admit();
        assert_eq!(a, Admission::Store);
        b.on_failure(a);
    }

    fn open(b: &CircuitBreaker<ManualClock>) {
        for _ in 0..b.config().failure_threshold.max(1) {
            fail(b);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn send_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<CircuitBreaker>();
        assert_send_sync::<CircuitBreaker<ManualClock>>();
        assert_send_sync::<Arc<CircuitBreaker<Arc<dyn Clock>>>>();
    }

    #[test]
    fn defaults() {
        let c = BreakerConfig::default();
        assert_eq!(c.failure_threshold, 5);
        assert_eq!(c.open_for, Duration::from_secs(1));
        let b = CircuitBreaker::default();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.is_open());
        assert_eq!(b.admit(), Admission::Store);
        assert!(format!("{b:?}").contains("Closed"));
        assert_eq!(BreakerState::HalfOpen.to_string(), "half-open");
    }

    #[test]
    fn opens_after_exactly_n_consecutive_failures() {
        let (b, _) = breaker(5);
        for _ in 0..4 {
            fail(&b);
            assert_eq!(b.state(), BreakerState::Closed);
        }
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.is_open());
    }

    #[test]
    fn a_success_in_between_resets_the_count() {
        let (b, _) = breaker(3);
        for _ in 0..10 {
            fail(&b);
            fail(&b);
            let a = b.admit();
            b.on_success(a);
            assert_eq!(b.state(), BreakerState::Closed);
        }
        fail(&b);
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn zero_threshold_counts_as_one() {
        let (b, _) = breaker(0);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn fallback_while_open() {
        let (b, clock) = breaker(2);
        open(&b);
        for _ in 0..100 {
            assert_eq!(b.admit(), Admission::Fallback);
        }
        clock.advance(OPEN_FOR - Duration::from_micros(1));
        assert_eq!(b.admit(), Admission::Fallback);
        assert_eq!(b.state(), BreakerState::Open);
        // Reporting fallbacks changes nothing.
        b.on_success(Admission::Fallback);
        b.on_failure(Admission::Fallback);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn one_probe_after_open_for() {
        let (b, clock) = breaker(2);
        open(&b);
        clock.advance(OPEN_FOR);
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.is_open());
        for _ in 0..10 {
            assert_eq!(b.admit(), Admission::Fallback);
        }
    }

    #[test]
    fn concurrent_admits_give_exactly_one_probe() {
        for _ in 0..20 {
            let (b, clock) = breaker(1);
            let b = Arc::new(b);
            open(&b);
            clock.advance(OPEN_FOR);
            let threads = 8;
            let barrier = Arc::new(Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let b = Arc::clone(&b);
                    let barrier = Arc::clone(&barrier);
                    thread::spawn(move || {
                        barrier.wait();
                        (0..50).map(|_| b.admit()).collect::<Vec<_>>()
                    })
                })
                .collect();
            let all: Vec<Admission> = handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect();
            assert_eq!(all.iter().filter(|a| **a == Admission::Probe).count(), 1);
            assert_eq!(all.iter().filter(|a| **a == Admission::Store).count(), 0);
        }
    }

    #[test]
    fn failed_probe_reopens() {
        let (b, clock) = breaker(2);
        open(&b);
        clock.advance(OPEN_FOR);
        let probe = b.admit();
        assert_eq!(probe, Admission::Probe);
        clock.advance(Duration::from_millis(300));
        b.on_failure(probe);
        assert_eq!(b.state(), BreakerState::Open);
        // Open for a full open_for from the failure, not from the probe.
        clock.advance(OPEN_FOR - Duration::from_micros(1));
        assert_eq!(b.admit(), Admission::Fallback);
        clock.advance(Duration::from_micros(1));
        assert_eq!(b.admit(), Admission::Probe);
    }

    #[test]
    fn successful_probe_closes() {
        let (b, clock) = breaker(2);
        open(&b);
        clock.advance(OPEN_FOR);
        let probe = b.admit();
        assert_eq!(probe, Admission::Probe);
        b.on_success(probe);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.is_open());
        assert_eq!(b.admit(), Admission::Store);
        // The failure count starts again from zero.
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn lost_probe_recovers_after_open_for() {
        let (b, clock) = breaker(2);
        open(&b);
        clock.advance(OPEN_FOR);
        let lost = b.admit();
        assert_eq!(lost, Admission::Probe);
        // The probe's future is dropped: its outcome is never reported.
        clock.advance(OPEN_FOR - Duration::from_micros(1));
        assert_eq!(b.admit(), Admission::Fallback);
        clock.advance(Duration::from_micros(1));
        let probe = b.admit();
        assert_eq!(probe, Admission::Probe);
        assert_eq!(b.admit(), Admission::Fallback);
        b.on_success(probe);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn late_store_outcomes_are_ignored_while_open() {
        let (b, clock) = breaker(2);
        let slow = b.admit();
        open(&b);
        // A store call admitted before the circuit opened succeeds late: still open.
        b.on_success(slow);
        assert_eq!(b.state(), BreakerState::Open);
        b.on_failure(Admission::Store);
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(OPEN_FOR);
        let probe = b.admit();
        b.on_success(Admission::Store);
        b.on_failure(Admission::Store);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.on_success(probe);
        assert_eq!(b.state(), BreakerState::Closed);
        // A stale probe outcome while open changes nothing.
        open(&b);
        b.on_success(Admission::Probe);
        b.on_failure(Admission::Probe);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn probe_outcomes_while_closed_count_as_ordinary() {
        let (b, _) = breaker(2);
        b.on_failure(Admission::Probe);
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_success(Admission::Probe);
        b.on_failure(Admission::Probe);
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure(Admission::Probe);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn concurrent_failures_open_once_and_recover() {
        let (b, clock) = breaker(5);
        let b = Arc::new(b);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = Arc::clone(&b);
                thread::spawn(move || {
                    for _ in 0..100 {
                        let a = b.admit();
                        b.on_failure(a);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(OPEN_FOR);
        let probe = b.admit();
        assert_eq!(probe, Admission::Probe);
        b.on_success(probe);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn huge_open_for_does_not_overflow() {
        let clock = ManualClock::new(Timestamp::from_micros(u64::MAX - 10));
        let config = BreakerConfig {
            failure_threshold: 1,
            open_for: Duration::MAX,
        };
        let b = CircuitBreaker::with_clock(config, clock.clone());
        let a = b.admit();
        b.on_failure(a);
        assert_eq!(b.admit(), Admission::Fallback);
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.admit(), Admission::Probe);
    }
}

//! Time, injected: [`Timestamp`], the [`Clock`] trait, [`SystemClock`] and [`ManualClock`].

use std::fmt;
use std::ops::{Add, Sub};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time, in whole microseconds since a clock's epoch.
///
/// [`SystemClock`] and Redis both count from the Unix epoch, so fixed windows line up with wall-clock
/// minutes and hours. Microseconds keep every value an exact integer in the IEEE doubles of the
/// Redis Lua scripts for the next two centuries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The clock's epoch.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `micros` microseconds after the epoch.
    pub const fn from_micros(micros: u64) -> Timestamp {
        Timestamp(micros)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    pub const fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    /// Saturates at the largest representable time.
    fn add(self, rhs: Duration) -> Timestamp {
        let us = u64::try_from(rhs.as_micros()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(us))
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;

    /// Saturates at the epoch.
    fn sub(self, rhs: Duration) -> Timestamp {
        let us = u64::try_from(rhs.as_micros()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_sub(us))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}µs", self.0)
    }
}

/// A source of the current time.
///
/// Stores read the clock once per decision; algorithms never read it themselves. Implement it to
/// drive a store from your own time source.
pub trait Clock: Send + Sync + 'static {
    /// The current time. It must never go backwards.
    fn now(&self) -> Timestamp;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// The real clock: monotonic, counting from the Unix epoch.
///
/// It reads the wall clock once, when created, and from then on advances with a monotonic source,
/// so a wall-clock step (NTP, a manual change) never moves it backwards.
///
/// The source is [`quanta`], the clock governor uses. Where the CPU has an invariant time-stamp
/// counter (x86-64 with `rdtscp`; the generic timer on aarch64) it reads the counter and scales it
/// by a rate calibrated once per process against the OS monotonic clock; elsewhere it is the OS
/// monotonic clock, as [`std::time::Instant`] is. Why: a store reads the clock once per decision,
/// and in the benchmark VM `Instant::elapsed` (`clock_gettime` through the vDSO) cost 28–44 ns, a
/// third of a single-key decision, where the counter costs about 15 ns. What it costs: the
/// calibrated rate may differ from the OS clock's by a few parts per million (1–2 ppm measured
/// there), a fraction of a second a day, immaterial to rates; and it is monotonic across threads
/// only where the counters of all cores are synchronised (which the OS also requires before it uses
/// the counter as its own clock source). A reading a little older than another thread's only makes
/// that decision slightly stricter.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    source: &'static quanta::Clock,
    /// The source's raw reading at `origin_unix_us`.
    origin: u64,
    origin_unix_us: u64,
}

/// The process's one calibrated source (calibration, once, takes about a millisecond; quanta bounds
/// it at 200 ms).
static SOURCE: OnceLock<quanta::Clock> = OnceLock::new();

/// The process's source, calibrated on first use.
#[inline]
fn source() -> &'static quanta::Clock {
    SOURCE.get_or_init(quanta::Clock::new)
}

/// Times a short span (a store's latency, say) on [`SystemClock`]'s counter: two readings of the
/// counter where [`std::time::Instant::elapsed`] makes two system clock reads, which on the
/// in-memory store cost a quarter of its decision.
///
/// ```
/// let watch = tollgate_core::Stopwatch::start();
/// assert!(watch.elapsed() < std::time::Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    started: u64,
}

impl Stopwatch {
    /// Starts timing now.
    #[inline]
    pub fn start() -> Stopwatch {
        Stopwatch {
            started: source().raw(),
        }
    }

    /// The time since [`start`](Self::start).
    #[inline]
    pub fn elapsed(&self) -> std::time::Duration {
        let source = source();
        std::time::Duration::from_nanos(source.delta_as_nanos(self.started, source.raw()))
    }
}

impl SystemClock {
    /// Anchors a new clock at the current wall-clock time.
    pub fn new() -> SystemClock {
        let source = source();
        let origin_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        SystemClock {
            source,
            origin: source.raw(),
            origin_unix_us,
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Timestamp {
        let elapsed_ns = self.source.delta_as_nanos(self.origin, self.source.raw());
        Timestamp(self.origin_unix_us.saturating_add(elapsed_ns / 1_000))
    }
}

/// A clock that moves only when told to. Clones share one time.
///
/// ```
/// use std::time::Duration;
/// use tollgate_core::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::from_micros(1_000));
/// let shared = clock.clone();
/// clock.advance(Duration::from_millis(2));
/// assert_eq!(shared.now(), Timestamp::from_micros(3_000));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            now: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// Moves the time forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let us = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        // fetch_update cannot fail with a closure that always returns Some.
        let _ = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(us))
            });
    }

    /// Sets the time. Setting it backwards is allowed for tests of clock skew; stores handle it.
    pub fn set(&self, to: Timestamp) {
        self.now.store(to.0, Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_unix_aligned_and_monotonic() {
        let c = SystemClock::new();
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
        // After 2020-01-01 in microseconds.
        assert!(a.as_micros() > 1_577_836_800_000_000);
    }

    #[test]
    fn manual_clock_clones_share_time() {
        let c = ManualClock::new(Timestamp::ZERO);
        let d = c.clone();
        c.advance(Duration::from_secs(1));
        assert_eq!(d.now(), Timestamp::from_micros(1_000_000));
        d.set(Timestamp::from_micros(5));
        assert_eq!(c.now(), Timestamp::from_micros(5));
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        let t = Timestamp::from_micros(10);
        assert_eq!(t - Duration::from_secs(1), Timestamp::ZERO);
        assert_eq!(
            Timestamp::from_micros(u64::MAX) + Duration::from_secs(1),
            Timestamp::from_micros(u64::MAX)
        );
        assert_eq!(
            Timestamp::from_micros(30).saturating_since(t),
            Duration::from_micros(20)
        );
        assert_eq!(
            t.saturating_since(Timestamp::from_micros(30)),
            Duration::ZERO
        );
    }
}

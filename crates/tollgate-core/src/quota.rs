//! [`Quota`]: a validated description of one limit.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The largest time span any quota may describe, in microseconds (2^50 µs, about 35 years).
///
/// Every product the algorithms form (`interval × burst`, `limit × window`) stays below this bound,
/// and every sum they form (a Unix time in µs, about 2^50.7, plus a few such spans) stays below
/// 2^53, so the arithmetic is exact in `u64` here and in the IEEE doubles of the Redis Lua scripts.
pub const MAX_SPAN_MICROS: u64 = 1 << 50;

/// The largest `burst` / `limit` a quota accepts.
///
/// It bounds the memory of a sliding-window-log key (one entry per admitted request) and keeps the
/// arithmetic exact (see [`MAX_SPAN_MICROS`]).
pub const MAX_LIMIT: u32 = 1_000_000;

/// The algorithm a [`Quota`] is enforced with.
///
/// The names are the ones the YAML configuration uses (`token_bucket`, `leaky_bucket`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// GCRA form of the token bucket: capacity `burst`, refilled at the rate; denials consume nothing.
    #[default]
    TokenBucket,
    /// Shaping: requests are spaced at the emission interval and may be delayed up to `max_delay`.
    LeakyBucket,
    /// A counter per aligned window.
    FixedWindow,
    /// Exact: never more than `limit` in any window of length `window`.
    SlidingWindowLog,
    /// Two-window weighted approximation in constant memory.
    SlidingWindowCounter,
}

impl Algorithm {
    /// Every algorithm, in a fixed order.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::TokenBucket,
        Algorithm::LeakyBucket,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindowLog,
        Algorithm::SlidingWindowCounter,
    ];

    /// The configuration name of the algorithm, such as `"token_bucket"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::LeakyBucket => "leaky_bucket",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindowLog => "sliding_window_log",
            Algorithm::SlidingWindowCounter => "sliding_window_counter",
        }
    }

    /// Whether the algorithm keeps a theoretical arrival time (token and leaky bucket), which lets a
    /// caller reserve a place in the future and give it back.
    pub const fn is_bucket(self) -> bool {
        matches!(self, Algorithm::TokenBucket | Algorithm::LeakyBucket)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = QuotaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| QuotaError::UnknownAlgorithm(s.to_owned()))
    }
}

/// Why a [`Quota`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// A rate of zero requests.
    #[error("the rate must be at least 1 request per period")]
    ZeroRate,
    /// A burst of zero: nothing could ever pass.
    #[error("the burst must be at least 1")]
    ZeroBurst,
    /// A window limit of zero: nothing could ever pass.
    #[error("the limit must be at least 1")]
    ZeroLimit,
    /// A period or window shorter than a microsecond.
    #[error("the period must be at least 1µs")]
    ZeroPeriod,
    /// More than one request per microsecond.
    #[error("the rate is too high: at most one request per microsecond is supported")]
    RateTooHigh,
    /// A burst or limit above [`MAX_LIMIT`].
    #[error("{0} is too large: at most {MAX_LIMIT} is supported")]
    LimitTooLarge(u32),
    /// A time span beyond [`MAX_SPAN_MICROS`].
    #[error("the quota spans more than {MAX_SPAN_MICROS}µs (about 35 years)")]
    SpanTooLong,
    /// A setting that the quota's algorithm does not have.
    #[error("{setting} does not apply to the {algorithm} algorithm")]
    NotApplicable {
        /// The setting, such as `"burst"`.
        setting: &'static str,
        /// The quota's algorithm.
        algorithm: Algorithm,
    },
    /// An algorithm name that is not one of [`Algorithm::ALL`].
    #[error(
        "unknown algorithm `{0}`: expected token_bucket, leaky_bucket, fixed_window, sliding_window_log or sliding_window_counter"
    )]
    UnknownAlgorithm(String),
}

/// One limit: an algorithm and its parameters, validated.
///
/// Build it with the constructor that names what you mean:
///
/// ```
/// use std::time::Duration;
/// use tollgate_core::{Algorithm, Quota};
///
/// # fn main() -> Result<(), tollgate_core::QuotaError> {
/// // A token bucket holding 20 requests, refilled at 100 per minute (one every 600 ms).
/// let basic = Quota::per_minute(100)?.with_burst(20)?;
/// assert_eq!(basic.limit(), 20);
/// assert_eq!(basic.interval(), Duration::from_millis(600));
///
/// // At most 30 requests in any 10 seconds, exactly.
/// let search = Quota::sliding_window_log(30, Duration::from_secs(10))?;
/// assert_eq!(search.algorithm(), Algorithm::SlidingWindowLog);
///
/// // Zero is an error, never a panic.
/// assert!(Quota::per_second(0).is_err());
/// # Ok(())
/// # }
/// ```
///
/// Time is kept in whole microseconds. A bucket's emission interval (`period / n`) is rounded
/// **up** to the next microsecond, so the enforced rate never exceeds the one asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    algorithm: Algorithm,
    /// Bucket: burst (token) or queue length (leaky). Window: the limit per window.
    limit: u32,
    /// Bucket: emission interval. Window: window length.
    period_us: u64,
    /// Leaky bucket only: the longest a request may be delayed.
    max_delay_us: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn check_limit(n: u32, zero: QuotaError) -> Result<u32, QuotaError> {
    match n {
        0 => Err(zero),
        n if n > MAX_LIMIT => Err(QuotaError::LimitTooLarge(n)),
        n => Ok(n),
    }
}

fn check_span(units: u64, each_us: u64) -> Result<(), QuotaError> {
    match units.checked_mul(each_us) {
        Some(span) if span <= MAX_SPAN_MICROS => Ok(()),
        _ => Err(QuotaError::SpanTooLong),
    }
}

impl Quota {
    /// A token bucket refilled at `n` requests per second, holding `n` (change it with
    /// [`with_burst`](Self::with_burst)).
    pub fn per_second(n: u32) -> Result<Quota, QuotaError> {
        Quota::per_period(n, Duration::from_secs(1))
    }

    /// A token bucket refilled at `n` requests per minute, holding `n`.
    pub fn per_minute(n: u32) -> Result<Quota, QuotaError> {
        Quota::per_period(n, Duration::from_secs(60))
    }

    /// A token bucket refilled at `n` requests per hour, holding `n`.
    pub fn per_hour(n: u32) -> Result<Quota, QuotaError> {
        Quota::per_period(n, Duration::from_secs(3600))
    }

    /// A token bucket refilled at `n` requests per `period`, holding `n`.
    ///
    /// The emission interval `period / n` is rounded up to a whole microsecond.
    pub fn per_period(n: u32, period: Duration) -> Result<Quota, QuotaError> {
        let n = check_limit(n, QuotaError::ZeroRate)?;
        let period_us = micros(period);
        if period_us == 0 {
            return Err(QuotaError::ZeroPeriod);
        }
        if period_us < u64::from(n) {
            return Err(QuotaError::RateTooHigh);
        }
        let interval = period_us.div_ceil(u64::from(n));
        check_span(u64::from(n), interval)?;
        Ok(Quota {
            algorithm: Algorithm::TokenBucket,
            limit: n,
            period_us: interval,
            max_delay_us: 0,
        })
    }

    /// Sets the capacity of a token bucket: how many requests may pass at once after a quiet spell.
    ///
    /// A new key starts full. Applies to token buckets only.
    pub fn with_burst(self, burst: u32) -> Result<Quota, QuotaError> {
        if self.algorithm != Algorithm::TokenBucket {
            return Err(QuotaError::NotApplicable {
                setting: "burst",
                algorithm: self.algorithm,
            });
        }
        let burst = check_limit(burst, QuotaError::ZeroBurst)?;
        check_span(u64::from(burst), self.period_us)?;
        Ok(Quota {
            limit: burst,
            ..self
        })
    }

    /// Turns a rate into a shaping leaky bucket: requests leave at the emission interval and a request
    /// may wait up to `max_delay` for its turn (nginx `limit_req` without `nodelay`); beyond that it is
    /// denied. `max_delay` of zero admits only requests whose turn has come.
    ///
    /// ```
    /// use std::time::Duration;
    /// # fn main() -> Result<(), tollgate_core::QuotaError> {
    /// let q = tollgate_core::Quota::per_second(10)?.shaped(Duration::from_millis(500))?;
    /// assert_eq!(q.limit(), 6); // one now, five queued 100 ms apart
    /// # Ok(())
    /// # }
    /// ```
    pub fn shaped(self, max_delay: Duration) -> Result<Quota, QuotaError> {
        if !self.algorithm.is_bucket() {
            return Err(QuotaError::NotApplicable {
                setting: "max_delay",
                algorithm: self.algorithm,
            });
        }
        let max_delay_us = micros(max_delay);
        if max_delay_us > MAX_SPAN_MICROS {
            return Err(QuotaError::SpanTooLong);
        }
        let queue = max_delay_us / self.period_us + 1;
        if queue > u64::from(MAX_LIMIT) {
            return Err(QuotaError::LimitTooLarge(
                u32::try_from(queue).unwrap_or(u32::MAX),
            ));
        }
        Ok(Quota {
            algorithm: Algorithm::LeakyBucket,
            limit: queue as u32,
            period_us: self.period_us,
            max_delay_us,
        })
    }

    /// At most `limit` requests per aligned window of length `window`.
    pub fn fixed_window(limit: u32, window: Duration) -> Result<Quota, QuotaError> {
        Quota::window(Algorithm::FixedWindow, limit, window)
    }

    /// Never more than `limit` requests in any window of length `window` (exact; memory grows with
    /// `limit`).
    pub fn sliding_window_log(limit: u32, window: Duration) -> Result<Quota, QuotaError> {
        Quota::window(Algorithm::SlidingWindowLog, limit, window)
    }

    /// The weighted two-window approximation of a sliding window, in constant memory.
    ///
    /// It never admits more than `limit` per aligned window, and never more than `2 × limit` in any
    /// window of length `window` (the worst case needs every request of the previous window packed
    /// at its very end); with evenly spread traffic it tracks the exact log closely.
    pub fn sliding_window_counter(limit: u32, window: Duration) -> Result<Quota, QuotaError> {
        Quota::window(Algorithm::SlidingWindowCounter, limit, window)
    }

    /// A window quota for any window algorithm; `algorithm` must not be a bucket.
    pub fn window(algorithm: Algorithm, limit: u32, window: Duration) -> Result<Quota, QuotaError> {
        if algorithm.is_bucket() {
            return Err(QuotaError::NotApplicable {
                setting: "window",
                algorithm,
            });
        }
        let limit = check_limit(limit, QuotaError::ZeroLimit)?;
        let window_us = micros(window);
        if window_us == 0 {
            return Err(QuotaError::ZeroPeriod);
        }
        check_span(u64::from(limit), window_us)?;
        check_span(2, window_us)?;
        Ok(Quota {
            algorithm,
            limit,
            period_us: window_us,
            max_delay_us: 0,
        })
    }

    /// The algorithm this quota is enforced with.
    pub const fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The most unit-cost requests that can pass at once: the burst of a token bucket, the queue
    /// length of a leaky bucket (`max_delay / interval + 1`), the limit of a window.
    ///
    /// A request whose cost exceeds it can never pass
    /// ([`Outcome::InsufficientCapacity`](crate::Outcome::InsufficientCapacity)).
    pub const fn limit(&self) -> u32 {
        self.limit
    }

    /// The emission interval of a bucket (the time one token takes to refill); the window length of
    /// a window algorithm.
    pub const fn interval(&self) -> Duration {
        Duration::from_micros(self.period_us)
    }

    /// [`interval`](Self::interval) in microseconds.
    pub const fn interval_micros(&self) -> u64 {
        self.period_us
    }

    /// The longest a leaky bucket delays a request; zero for the other algorithms.
    pub const fn max_delay(&self) -> Duration {
        Duration::from_micros(self.max_delay_us)
    }

    /// [`max_delay`](Self::max_delay) in microseconds.
    pub const fn max_delay_micros(&self) -> u64 {
        self.max_delay_us
    }

    /// The window of the policy as reported in `RateLimit-Policy` (`w`): the time an empty bucket
    /// takes to fill again, or the window length.
    pub const fn window_span(&self) -> Duration {
        Duration::from_micros(self.window_span_micros())
    }

    /// [`window_span`](Self::window_span) in microseconds.
    pub const fn window_span_micros(&self) -> u64 {
        match self.algorithm {
            Algorithm::TokenBucket | Algorithm::LeakyBucket => self.period_us * self.limit as u64,
            _ => self.period_us,
        }
    }

    /// Rebuilds a quota from its raw parts (the form [`Display`](fmt::Display) prints and the test
    /// vectors use), validating them like the constructors do.
    pub fn from_parts(
        algorithm: Algorithm,
        limit: u32,
        period: Duration,
        max_delay: Duration,
    ) -> Result<Quota, QuotaError> {
        match algorithm {
            Algorithm::TokenBucket | Algorithm::LeakyBucket => {
                let period_us = micros(period);
                if period_us == 0 {
                    return Err(QuotaError::ZeroPeriod);
                }
                let bucket = Quota {
                    algorithm: Algorithm::TokenBucket,
                    limit: 1,
                    period_us,
                    max_delay_us: 0,
                };
                if algorithm == Algorithm::TokenBucket {
                    bucket.with_burst(limit)
                } else {
                    bucket.shaped(max_delay)
                }
            }
            _ => Quota::window(algorithm, limit, period),
        }
    }
}

/// `algorithm limit=N interval=µs [max_delay=µs]`: the raw form used by the test vectors.
impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} limit={} interval={}",
            self.algorithm, self.limit, self.period_us
        )?;
        if self.algorithm == Algorithm::LeakyBucket {
            write!(f, " max_delay={}", self.max_delay_us)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_validate() {
        assert_eq!(Quota::per_second(0), Err(QuotaError::ZeroRate));
        assert_eq!(
            Quota::per_second(5).and_then(|q| q.with_burst(0)),
            Err(QuotaError::ZeroBurst)
        );
        assert_eq!(
            Quota::fixed_window(0, Duration::from_secs(1)),
            Err(QuotaError::ZeroLimit)
        );
        assert_eq!(
            Quota::fixed_window(1, Duration::ZERO),
            Err(QuotaError::ZeroPeriod)
        );
        assert_eq!(
            Quota::per_period(2_000, Duration::from_millis(1)),
            Err(QuotaError::RateTooHigh)
        );
        assert_eq!(
            Quota::per_second(MAX_LIMIT + 1),
            Err(QuotaError::LimitTooLarge(MAX_LIMIT + 1))
        );
        assert_eq!(
            Quota::per_period(1, Duration::from_secs(40 * 365 * 86_400)),
            Err(QuotaError::SpanTooLong)
        );
        assert!(matches!(
            Quota::fixed_window(1, Duration::from_secs(1)).and_then(|q| q.with_burst(3)),
            Err(QuotaError::NotApplicable { .. })
        ));
        assert!(matches!(
            Quota::window(Algorithm::TokenBucket, 1, Duration::from_secs(1)),
            Err(QuotaError::NotApplicable { .. })
        ));
    }

    #[test]
    fn interval_rounds_up() {
        let q = Quota::per_second(3).unwrap();
        assert_eq!(q.interval_micros(), 333_334);
        assert_eq!(q.limit(), 3);
        let q = Quota::per_minute(100).unwrap().with_burst(20).unwrap();
        assert_eq!(q.interval_micros(), 600_000);
        assert_eq!(q.window_span(), Duration::from_secs(12));
    }

    #[test]
    fn shaped_queue_length() {
        let q = Quota::per_second(10)
            .unwrap()
            .shaped(Duration::from_millis(250))
            .unwrap();
        assert_eq!(q.algorithm(), Algorithm::LeakyBucket);
        assert_eq!(q.limit(), 3);
        assert_eq!(q.max_delay(), Duration::from_millis(250));
    }

    #[test]
    fn display_round_trips_through_parts() {
        for q in [
            Quota::per_minute(100).unwrap().with_burst(20).unwrap(),
            Quota::per_second(4)
                .unwrap()
                .shaped(Duration::from_secs(1))
                .unwrap(),
            Quota::sliding_window_counter(7, Duration::from_secs(9)).unwrap(),
        ] {
            let back = Quota::from_parts(q.algorithm(), q.limit(), q.interval(), q.max_delay());
            assert_eq!(back, Ok(q), "{q}");
        }
    }

    #[test]
    fn algorithm_names() {
        for a in Algorithm::ALL {
            assert_eq!(a.as_str().parse::<Algorithm>(), Ok(a));
        }
        assert!("gcra".parse::<Algorithm>().is_err());
    }
}

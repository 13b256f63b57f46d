//! Adaptive limits: lowers the tiers' effective rate while the inner service is overloaded, and
//! restores it as the load falls.
//!
//! # What it watches
//!
//! The layer brackets every request that reaches the inner service with a
//! [`Controller::start`] guard ([`InFlight`]); its drop records the request's latency and takes it out of the in-flight
//! count (so a cancelled request is counted out too). Once per [`AdaptiveConfig::interval`],
//! [`Controller::tick`] looks at what was recorded since the last step and calls the interval
//! **overloaded** when any of these holds:
//!
//! - [`target_latency`](AdaptiveConfig::target_latency) is set and the interval's
//!   [`quantile`](AdaptiveConfig::quantile) of latency (nearest rank over the requests that
//!   finished in the interval) is above it;
//! - [`max_in_flight`](AdaptiveConfig::max_in_flight) is set and the peak number of requests in
//!   flight during the interval is above it;
//! - `target_latency` is set, no request finished in the interval, requests are in flight, and
//!   nothing has finished for longer than `target_latency` (a stuck service, with nothing
//!   completing, must not look healthy).
//!
//! Any other interval is **healthy**, including a quiet one with nothing in flight. With only
//! `max_in_flight` set, a quiet interval is healthy as long as the in-flight count is not above
//! it.
//!
//! The latency test is exact, not read from histogram buckets: the target is known in advance,
//! so each finished request is counted as at most or above it (a two-bucket histogram split at
//! the target, one atomic counter, reset at each step), and the quantile is above the target
//! exactly when fewer than `ceil(quantile × finished)` requests were at most the target. An
//! interval holds up to 2³² finished requests.
//!
//! # AIMD
//!
//! The factors follow additive-increase / multiplicative-decrease, the rule of TCP congestion
//! control, and of the `AIMDLimit` of Netflix's concurrency-limits library (which applies it to
//! a concurrency limit; here it is applied to each tier's share of its configured quota):
//!
//! - An **overloaded** interval multiplies the factor of the lowest-priority tier that is still
//!   above [`min_factor`](AdaptiveConfig::min_factor) by [`decrease`](AdaptiveConfig::decrease)
//!   (never below `min_factor`). Only once that tier is at `min_factor` does the next tier, in
//!   priority order, start falling.
//! - A **healthy** interval adds [`increase`](AdaptiveConfig::increase) to the factor of the
//!   highest-priority tier that is below 1, capped at 1: tiers are restored in the reverse order
//!   of cutting, the most important first.
//!
//! One tier moves per interval. A factor is never above 1 (the configured quota) and never below
//! `min_factor`; tiers left out of the priority order are never cut. Factors are held as parts
//! per million (the resolution of [`Controller::factor_ppm`]): `min_factor` is rounded up to a
//! whole part per million, a product to the nearest one, and a tier restored is at exactly 1.0.
//!
//! The defaults ([`AdaptiveConfig::default`]): target latency 250 ms at the 0.9 quantile, no
//! in-flight limit, one step per second, decrease 0.7, increase 0.1, min factor 0.1.
//!
//! # One per process
//!
//! A controller measures the process it runs in. The processes of a fleet each measure their own
//! latency and may disagree; each then enforces its own factor, including on buckets shared
//! through Redis (a shared bucket's effective rate for a request is the one the process deciding
//! it applies). That is safe because a factor only ever lowers a quota, never raises it:
//! processes that disagree can make the fleet stricter than configured, never looser.
//!
//! ```
//! use std::sync::Arc;
//! use tollgate::inbound::adaptive::{AdaptiveConfig, Controller};
//!
//! // Three tiers; tier 0 is cut first, then tier 1; tier 2 is never cut.
//! let controller = Arc::new(Controller::new(AdaptiveConfig::default(), 3, vec![0, 1]));
//! let request = controller.start();
//! // ... the inner service handles the request ...
//! drop(request);
//! assert_eq!(controller.factor(0), 1.0);
//! assert_eq!(controller.in_flight(), 0);
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A factor of 1, in parts per million: the configured quota, unreduced.
pub const FULL_QUOTA_PPM: u32 = 1_000_000;

/// How the controller is set up (all fields public, with [`Default`]: target latency 250 ms,
/// no in-flight limit, interval 1 s, decrease 0.7, increase 0.1, min factor 0.1, quantile 0.9).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    /// Overloaded when the interval's latency [`quantile`](Self::quantile) is above it (and when
    /// nothing has finished for longer than it while requests are in flight).
    pub target_latency: Option<Duration>,
    /// Overloaded when the peak number of requests in flight in the interval is above it.
    pub max_in_flight: Option<u32>,
    /// Which latency quantile of the interval is compared with the target: 0 < q ≤ 1.
    pub quantile: f64,
    /// One control step per interval.
    pub interval: Duration,
    /// What an overloaded interval multiplies a factor by: 0 < decrease < 1.
    pub decrease: f64,
    /// What a healthy interval adds to a factor: 0 < increase ≤ 1.
    pub increase: f64,
    /// The lowest a factor goes: 0 < min_factor ≤ 1.
    pub min_factor: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            target_latency: Some(Duration::from_millis(250)),
            max_in_flight: None,
            quantile: 0.9,
            interval: Duration::from_secs(1),
            decrease: 0.7,
            increase: 0.1,
            min_factor: 0.1,
        }
    }
}

impl AdaptiveConfig {
    /// Checks the ranges documented on each field, and that at least one of
    /// [`target_latency`](Self::target_latency) and [`max_in_flight`](Self::max_in_flight) is
    /// set (else no interval could ever be overloaded). Zero durations and a zero in-flight
    /// limit are refused too.
    pub fn validate(&self) -> Result<(), AdaptiveError> {
        if self.target_latency.is_none() && self.max_in_flight.is_none() {
            return Err(AdaptiveError::NoSignal);
        }
        if let Some(target) = self.target_latency.filter(Duration::is_zero) {
            return Err(invalid("target_latency", &target, "must be above zero"));
        }
        if self.max_in_flight == Some(0) {
            return Err(invalid("max_in_flight", &0, "must be at least 1"));
        }
        if !(self.quantile > 0.0 && self.quantile <= 1.0) {
            return Err(invalid(
                "quantile",
                &self.quantile,
                "must be above 0 and at most 1",
            ));
        }
        if self.interval.is_zero() {
            return Err(invalid("interval", &self.interval, "must be above zero"));
        }
        if !(self.decrease > 0.0 && self.decrease < 1.0) {
            return Err(invalid(
                "decrease",
                &self.decrease,
                "must be above 0 and below 1",
            ));
        }
        if !(self.increase > 0.0 && self.increase <= 1.0) {
            return Err(invalid(
                "increase",
                &self.increase,
                "must be above 0 and at most 1",
            ));
        }
        if !(self.min_factor > 0.0 && self.min_factor <= 1.0) {
            return Err(invalid(
                "min_factor",
                &self.min_factor,
                "must be above 0 and at most 1",
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, value: &dyn fmt::Debug, reason: &'static str) -> AdaptiveError {
    AdaptiveError::Invalid {
        field,
        value: format!("{value:?}"),
        reason,
    }
}

/// What [`AdaptiveConfig::validate`] and [`Controller::try_new`] refuse; [`field`](Self::field)
/// names the setting at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdaptiveError {
    /// Neither `target_latency` nor `max_in_flight` is set: nothing could ever be overloaded.
    #[error("adaptive limits need `target_latency` or `max_in_flight` (or both): neither is set")]
    NoSignal,
    /// A setting out of its range.
    #[error("adaptive `{field}` is {value}: it {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// Its value, as written by `Debug`.
        value: String,
        /// The range it must be in.
        reason: &'static str,
    },
    /// The priority order names a tier the controller does not have.
    #[error("adaptive `priority` names tier {tier}, but there are only {tiers} tiers")]
    UnknownTier {
        /// The tier index.
        tier: usize,
        /// How many tiers there are.
        tiers: usize,
    },
    /// The priority order names a tier twice.
    #[error("adaptive `priority` names tier {0} twice")]
    DuplicateTier(usize),
}

impl AdaptiveError {
    /// The setting at fault: `target_latency`, `max_in_flight`, `quantile`, `interval`,
    /// `decrease`, `increase`, `min_factor` or `priority`. [`NoSignal`](Self::NoSignal), where
    /// two settings are both missing, names `target_latency`, the usual one to add.
    pub fn field(&self) -> &'static str {
        match self {
            AdaptiveError::NoSignal => "target_latency",
            AdaptiveError::Invalid { field, .. } => field,
            AdaptiveError::UnknownTier { .. } | AdaptiveError::DuplicateTier(_) => "priority",
        }
    }
}

/// The adaptive-limit controller: one per layer, cheap to call on every request ([`start`],
/// the [`InFlight`] drop and [`factor`] are a few atomic operations: no lock, no allocation).
///
/// [`start`]: Controller::start
/// [`factor`]: Controller::factor
pub struct Controller {
    config: AdaptiveConfig,
    /// Tier indices, lowest priority (cut first) to highest.
    priority: Box<[usize]>,
    /// Each tier's factor, in parts per million.
    factors: Box<[AtomicU32]>,
    /// `min_factor` in parts per million (at least 1, rounded up).
    min_ppm: u32,
    /// `increase` in parts per million (at least 1).
    increase_ppm: u32,
    /// The zero of the nanosecond timestamps below.
    epoch: Instant,
    in_flight: AtomicU32,
    /// The peak of `in_flight` since the last step.
    peak: AtomicU32,
    /// Since the last step: the requests finished (high 32 bits) and, of them, those slower than
    /// the target (low 32 bits), in one word so a step reads both at once.
    finished: AtomicU64,
    /// Nanoseconds after `epoch` of the last sign of progress: a request finishing, or one
    /// starting while none was in flight. While requests are in flight, nothing has finished
    /// since and one of them has been in flight since.
    progress: AtomicU64,
    /// One step at a time.
    step: Mutex<()>,
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let factors: Vec<u32> = (0..self.factors.len())
            .map(|tier| self.factor_ppm(tier))
            .collect();
        f.debug_struct("Controller")
            .field("config", &self.config)
            .field("priority", &self.priority)
            .field("factors_ppm", &factors)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller over `tiers` tiers, all at factor 1. `priority`: tier indices from lowest
    /// priority (cut first) to highest. Tiers not listed are never cut.
    ///
    /// # Panics
    ///
    /// If [`try_new`](Self::try_new) would refuse: `config` fails
    /// [`validate`](AdaptiveConfig::validate), or `priority` names a tier `>= tiers` or one
    /// tier twice.
    pub fn new(config: AdaptiveConfig, tiers: usize, priority: Vec<usize>) -> Controller {
        Controller::try_new(config, tiers, priority).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`new`](Self::new), with the config and priority order checked rather than a panic.
    pub fn try_new(
        config: AdaptiveConfig,
        tiers: usize,
        priority: Vec<usize>,
    ) -> Result<Controller, AdaptiveError> {
        config.validate()?;
        let mut listed = vec![false; tiers];
        for &tier in &priority {
            match listed.get_mut(tier) {
                None => return Err(AdaptiveError::UnknownTier { tier, tiers }),
                Some(true) => return Err(AdaptiveError::DuplicateTier(tier)),
                Some(seen) => *seen = true,
            }
        }
        let full = f64::from(FULL_QUOTA_PPM);
        // Rounded up, so a factor never goes below `min_factor` (the small allowance keeps an
        // exact product such as 0.1 × 10⁶ from being pushed to the next part).
        let min_ppm = to_ppm((config.min_factor * full - 1e-6).ceil());
        let increase_ppm = to_ppm((config.increase * full).round());
        Ok(Controller {
            priority: priority.into_boxed_slice(),
            factors: (0..tiers).map(|_| AtomicU32::new(FULL_QUOTA_PPM)).collect(),
            min_ppm,
            increase_ppm,
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            peak: AtomicU32::new(0),
            finished: AtomicU64::new(0),
            progress: AtomicU64::new(0),
            step: Mutex::new(()),
            config,
        })
    }

    /// A request entered the inner service; the guard's drop marks it finished and records its
    /// latency (so a cancelled request still leaves the in-flight count).
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(Instant::now())
    }

    /// [`start`](Self::start) with the time the request entered, for a caller that has just
    /// read the clock anyway.
    pub fn start_at(self: &Arc<Self>, now: Instant) -> InFlight {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.peak
            .fetch_max(before.saturating_add(1), Ordering::AcqRel);
        if before == 0 {
            self.progress.fetch_max(self.nanos(now), Ordering::AcqRel);
        }
        InFlight {
            controller: Arc::clone(self),
            started: now,
            #[cfg(test)]
            ended: false,
        }
    }

    /// A request that started at `started` finished at `ended`.
    fn finish(&self, started: Instant, ended: Instant) {
        let latency = ended.saturating_duration_since(started);
        let slow = matches!(self.config.target_latency, Some(target) if latency > target);
        self.finished
            .fetch_add((1 << 32) | u64::from(slow), Ordering::AcqRel);
        self.progress.fetch_max(self.nanos(ended), Ordering::AcqRel);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Nanoseconds from `epoch` to `at` (0 before it).
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The effective factor of tier `tier`, in (0, 1]: what its configured rate is multiplied
    /// by. One atomic load.
    ///
    /// # Panics
    ///
    /// If `tier` is not below the number of tiers the controller was made with.
    pub fn factor(&self, tier: usize) -> f64 {
        f64::from(self.factor_ppm(tier)) / f64::from(FULL_QUOTA_PPM)
    }

    /// [`factor`](Self::factor) as parts per million ([`FULL_QUOTA_PPM`] = the configured
    /// quota).
    ///
    /// # Panics
    ///
    /// If `tier` is not below the number of tiers the controller was made with.
    pub fn factor_ppm(&self, tier: usize) -> u32 {
        self.factors[tier].load(Ordering::Relaxed)
    }

    /// One control step at `now` over what was recorded since the last step; returns whether
    /// any factor changed (at most one changes per step). Pure of wall time apart from `now`
    /// (which only matters for a stuck service: how long nothing has finished), so tests drive
    /// it directly.
    pub fn tick(&self, now: Instant) -> bool {
        let _step = self.step.lock().unwrap_or_else(PoisonError::into_inner);
        let finished = self.finished.swap(0, Ordering::AcqRel);
        let (done, slow) = (finished >> 32, finished & u64::from(u32::MAX));
        let in_flight = self.in_flight.load(Ordering::Acquire);
        // The requests still in flight are the next interval's starting point.
        let peak = self.peak.swap(in_flight, Ordering::AcqRel).max(in_flight);

        let too_slow = match self.config.target_latency {
            Some(_) if done > 0 => done - slow < nearest_rank(self.config.quantile, done),
            Some(target) if in_flight > 0 => {
                let quiet = self
                    .nanos(now)
                    .saturating_sub(self.progress.load(Ordering::Acquire));
                Duration::from_nanos(quiet) > target
            }
            _ => false,
        };
        let too_many = matches!(self.config.max_in_flight, Some(max) if peak > max);

        let moved = if too_slow || too_many {
            self.cut()
        } else {
            self.restore()
        };
        if let Some((tier, ppm)) = moved {
            tracing::debug!(
                tier,
                factor = f64::from(ppm) / f64::from(FULL_QUOTA_PPM),
                overloaded = too_slow || too_many,
                too_slow,
                too_many,
                "adaptive limit: factor changed"
            );
        }
        moved.is_some()
    }

    /// Lowers the lowest-priority tier still above the minimum; its index and new factor.
    fn cut(&self) -> Option<(usize, u32)> {
        let tier = *self
            .priority
            .iter()
            .find(|&&tier| self.factor_ppm(tier) > self.min_ppm)?;
        let ppm = self.factor_ppm(tier);
        let scaled = to_ppm((f64::from(ppm) * self.config.decrease).round());
        // Strictly lower (a product rounded back to `ppm` would stall), never below the minimum.
        let next = scaled.min(ppm - 1).max(self.min_ppm);
        self.factors[tier].store(next, Ordering::Relaxed);
        Some((tier, next))
    }

    /// Raises the highest-priority tier below 1; its index and new factor.
    fn restore(&self) -> Option<(usize, u32)> {
        let tier = *self
            .priority
            .iter()
            .rev()
            .find(|&&tier| self.factor_ppm(tier) < FULL_QUOTA_PPM)?;
        let next = self
            .factor_ppm(tier)
            .saturating_add(self.increase_ppm)
            .min(FULL_QUOTA_PPM);
        self.factors[tier].store(next, Ordering::Relaxed);
        Some((tier, next))
    }

    /// Drives [`tick`](Self::tick) every [`interval`](AdaptiveConfig::interval) on the current
    /// tokio runtime until the controller is dropped (the task holds a `Weak`, and ends at the
    /// first step after the last `Arc` is gone); calls `on_change` after a step that changed a
    /// factor (the layer updates its gauges there). `on_change` must not hold an `Arc` of the
    /// controller, or the task never ends. A late step is taken late, not doubled.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(
        self: &Arc<Self>,
        on_change: impl Fn(&Controller) + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let controller = Arc::downgrade(self);
        let period = self.config.interval;
        tokio::spawn(async move {
            let mut steps = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            steps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                steps.tick().await;
                let Some(controller) = controller.upgrade() else {
                    return;
                };
                if controller.tick(Instant::now()) {
                    on_change(&controller);
                }
            }
        })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// The number of requests in the inner service now (started, guard not yet dropped).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The number of tiers.
    pub fn tiers(&self) -> usize {
        self.factors.len()
    }

    /// The tiers that can be cut, lowest priority (cut first) to highest.
    pub fn priority(&self) -> &[usize] {
        &self.priority
    }
}

/// A whole number of parts per million from a non-negative value, saturating.
fn to_ppm(value: f64) -> u32 {
    // `as` saturates (and NaN becomes 0); at least one part so no factor reaches zero.
    (value as u32).max(1)
}

/// The nearest rank of quantile `q` among `n` > 0 samples: `ceil(q × n)`, in `1..=n`.
fn nearest_rank(q: f64, n: u64) -> u64 {
    let exact = q * n as f64;
    // `q × n` is off by a few ulps at most: an integer product must not round up a rank.
    let rank = (exact - exact * 1e-12).ceil() as u64;
    rank.clamp(1, n)
}

/// A request in the inner service, from [`Controller::start`]; dropping it marks the request
/// finished and records its latency.
#[must_use = "the request counts as in flight until this guard is dropped: hold it while the inner service runs"]
pub struct InFlight {
    controller: Arc<Controller>,
    started: Instant,
    /// Ended by a test at a chosen instant: the drop does nothing more.
    #[cfg(test)]
    ended: bool,
}

impl InFlight {
    /// When the request entered the inner service.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Ends the request at `at` rather than when dropped.
    #[cfg(test)]
    fn end_at(mut self, at: Instant) {
        self.controller.finish(self.started, at);
        self.ended = true;
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        #[cfg(test)]
        if self.ended {
            return;
        }
        self.controller.finish(self.started, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Round numbers: a tier goes 1 → 0.5 → 0.25 (the minimum) and back in three steps.
    fn config() -> AdaptiveConfig {
        AdaptiveConfig {
            target_latency: Some(ms(100)),
            max_in_flight: None,
            quantile: 0.9,
            interval: ms(1000),
            decrease: 0.5,
            increase: 0.25,
            min_factor: 0.25,
        }
    }

    /// A controller and a clock that advances one interval per step.
    struct Sim {
        c: Arc<Controller>,
        now: Instant,
    }

    impl Sim {
        fn new(config: AdaptiveConfig, tiers: usize, priority: Vec<usize>) -> Sim {
            let c = Arc::new(Controller::new(config, tiers, priority));
            Sim {
                now: Instant::now(),
                c,
            }
        }

        /// A request that starts now and takes `latency`.
        fn request(&self, latency: Duration) {
            self.c.start_at(self.now).end_at(self.now + latency);
        }

        /// The step at the end of the interval.
        fn step(&mut self) -> bool {
            self.now += self.c.config().interval;
            self.c.tick(self.now)
        }

        fn overloaded(&mut self) -> bool {
            self.request(ms(500));
            self.step()
        }

        fn healthy(&mut self) -> bool {
            self.request(ms(10));
            self.step()
        }

        fn ppm(&self) -> Vec<u32> {
            (0..self.c.tiers()).map(|t| self.c.factor_ppm(t)).collect()
        }
    }

    const FULL: u32 = FULL_QUOTA_PPM;

    #[test]
    fn defaults() {
        let d = AdaptiveConfig::default();
        assert_eq!(d.target_latency, Some(ms(250)));
        assert_eq!(d.max_in_flight, None);
        assert_eq!(d.interval, Duration::from_secs(1));
        assert_eq!(
            (d.decrease, d.increase, d.min_factor, d.quantile),
            (0.7, 0.1, 0.1, 0.9)
        );
        assert_eq!(d.validate(), Ok(()));
        let c = Controller::new(d, 2, vec![0, 1]);
        assert_eq!(c.min_ppm, 100_000);
        assert_eq!(c.increase_ppm, 100_000);
        assert_eq!((c.factor(0), c.factor(1)), (1.0, 1.0));
    }

    #[test]
    fn cuts_the_lowest_priority_tier_first_and_the_next_only_at_the_minimum() {
        // Tier 2 is cut first, then tier 0; tier 1 is not listed.
        let mut s = Sim::new(config(), 3, vec![2, 0]);
        assert!(s.overloaded());
        assert_eq!(s.ppm(), [FULL, FULL, 500_000]);
        assert_eq!(s.c.factor(2), 0.5);
        assert!(s.overloaded());
        assert_eq!(s.ppm(), [FULL, FULL, 250_000]);
        assert!(s.overloaded());
        assert_eq!(s.ppm(), [500_000, FULL, 250_000]);
        assert!(s.overloaded());
        assert_eq!(s.ppm(), [250_000, FULL, 250_000]);
        // All listed tiers at the minimum: nothing moves, the minimum is never undercut, the
        // unlisted tier keeps its quota.
        for _ in 0..10 {
            assert!(!s.overloaded());
        }
        assert_eq!(s.ppm(), [250_000, FULL, 250_000]);
    }

    #[test]
    fn the_minimum_is_never_undercut_by_a_multiplication() {
        // 1 → 0.7 → 0.49 → 0.343 → 0.3 (not 0.2401).
        let mut s = Sim::new(
            AdaptiveConfig {
                decrease: 0.7,
                min_factor: 0.3,
                ..config()
            },
            1,
            vec![0],
        );
        let mut seen = Vec::new();
        while s.overloaded() {
            seen.push(s.c.factor_ppm(0));
        }
        assert_eq!(seen, [700_000, 490_000, 343_000, 300_000]);
    }

    #[test]
    fn restores_in_the_reverse_order_and_never_above_one() {
        let mut s = Sim::new(config(), 3, vec![2, 0]);
        for _ in 0..4 {
            assert!(s.overloaded());
        }
        assert_eq!(s.ppm(), [250_000, FULL, 250_000]);
        // Tier 0 (higher priority) first, all the way back, then tier 2.
        let mut seen = Vec::new();
        while s.healthy() {
            seen.push(s.ppm());
        }
        assert_eq!(
            seen,
            [
                [500_000, FULL, 250_000],
                [750_000, FULL, 250_000],
                [FULL, FULL, 250_000],
                [FULL, FULL, 500_000],
                [FULL, FULL, 750_000],
                [FULL, FULL, FULL],
            ]
        );
        // Capped: more healthy intervals change nothing.
        for _ in 0..5 {
            assert!(!s.healthy());
        }
        assert_eq!(s.c.factor(0), 1.0);
        assert_eq!(s.c.factor(2), 1.0);
    }

    #[test]
    fn an_increase_past_one_is_capped() {
        let mut s = Sim::new(
            AdaptiveConfig {
                increase: 0.4,
                ..config()
            },
            1,
            vec![0],
        );
        assert!(s.overloaded());
        assert!(s.healthy());
        assert_eq!(s.c.factor_ppm(0), 900_000);
        assert!(s.healthy());
        assert_eq!(s.c.factor(0), 1.0);
    }

    #[test]
    fn overload_during_a_restore_cuts_where_the_cutting_stopped() {
        let mut s = Sim::new(config(), 2, vec![0, 1]);
        for _ in 0..3 {
            assert!(s.overloaded());
        }
        assert_eq!(s.ppm(), [250_000, 500_000]);
        assert!(s.healthy());
        assert_eq!(s.ppm(), [250_000, 750_000]);
        // Tier 0 is at the minimum, so tier 1 is cut again.
        assert!(s.overloaded());
        assert_eq!(s.ppm(), [250_000, 375_000]);
    }

    #[test]
    fn the_latency_quantile_decides() {
        // q = 0.9 over 10 requests: the 9th fastest must be at most the target.
        let mut s = Sim::new(config(), 1, vec![0]);
        for _ in 0..9 {
            s.request(ms(50));
        }
        s.request(ms(101));
        assert!(!s.step(), "one slow request in ten is healthy");
        assert_eq!(s.c.factor(0), 1.0);
        for _ in 0..8 {
            s.request(ms(50));
        }
        s.request(ms(101));
        s.request(ms(101));
        assert!(s.step(), "two in ten is overloaded");
        assert_eq!(s.c.factor(0), 0.5);
        // Exactly the target is not above it.
        for _ in 0..10 {
            s.request(ms(100));
        }
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.75);
    }

    #[test]
    fn quantile_one_is_the_slowest_request() {
        let mut s = Sim::new(
            AdaptiveConfig {
                quantile: 1.0,
                ..config()
            },
            1,
            vec![0],
        );
        for _ in 0..999 {
            s.request(ms(1));
        }
        s.request(ms(101));
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.5);
    }

    #[test]
    fn each_step_sees_only_its_own_interval() {
        let mut s = Sim::new(config(), 1, vec![0]);
        s.request(ms(500));
        assert!(s.step());
        // The slow request is not counted again.
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.75);
    }

    #[test]
    fn a_quiet_interval_is_healthy_when_nothing_is_in_flight() {
        let mut s = Sim::new(config(), 1, vec![0]);
        assert!(s.overloaded());
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.75);
    }

    #[test]
    fn a_quiet_interval_with_a_stuck_request_is_overloaded() {
        let mut s = Sim::new(config(), 1, vec![0]);
        let stuck = s.c.start_at(s.now);
        assert_eq!(s.c.in_flight(), 1);
        // Nothing finished in the interval, and the request has been in for 1 s > 100 ms.
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.5);
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.25);
        // Requests keep arriving behind it: still stuck, the count never fell to zero.
        let behind = s.c.start_at(s.now);
        assert!(!s.step(), "already at the minimum");
        assert_eq!(s.c.factor(0), 0.25);
        let at = s.now;
        stuck.end_at(at);
        behind.end_at(at);
        // Both finished slow, in the interval now ending.
        assert!(!s.step());
        assert!(s.step(), "quiet and empty: healthy");
        assert_eq!(s.c.factor(0), 0.5);
    }

    #[test]
    fn a_quiet_interval_with_a_fresh_request_is_healthy() {
        let mut s = Sim::new(config(), 1, vec![0]);
        assert!(s.overloaded());
        // A request came in 50 ms before the step, after a second with nothing in flight.
        let fresh = s.c.start_at(s.now + ms(950));
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.75, "restored, not cut");
        // It finishes in 60 ms, while another one comes in and stays.
        let old = s.c.start_at(s.now);
        fresh.end_at(s.now + ms(10));
        assert!(s.step(), "one finished in time: healthy");
        assert_eq!(s.c.factor(0), 1.0);
        // Next interval: nothing finishes, the last progress was 1.99 s ago.
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.5);
        drop(old);
    }

    #[test]
    fn without_a_latency_target_a_quiet_interval_is_judged_by_the_count() {
        let mut s = Sim::new(
            AdaptiveConfig {
                target_latency: None,
                max_in_flight: Some(1),
                ..config()
            },
            1,
            vec![0],
        );
        let a = s.c.start_at(s.now);
        assert!(!s.step(), "one stuck request, not above the limit");
        let b = s.c.start_at(s.now);
        assert!(s.step(), "two: above the limit");
        assert_eq!(s.c.factor(0), 0.5);
        a.end_at(s.now + ms(900));
        b.end_at(s.now + ms(900));
        assert!(s.step(), "the peak was still two in this interval");
        assert_eq!(s.c.factor(0), 0.25);
        // Slow requests are not judged without a latency target.
        s.request(ms(900));
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.5);
    }

    #[test]
    fn max_in_flight_judges_the_peak_of_the_interval() {
        let mut s = Sim::new(
            AdaptiveConfig {
                target_latency: None,
                max_in_flight: Some(2),
                ..config()
            },
            1,
            vec![0],
        );
        let t = s.now;
        // Two at once: at the limit, healthy.
        let (a, b) = (s.c.start_at(t), s.c.start_at(t));
        a.end_at(t + ms(1));
        b.end_at(t + ms(1));
        assert!(!s.step());
        // Three at once, all finished quickly before the step: the peak still counts.
        let t = s.now;
        let (a, b, c) = (s.c.start_at(t), s.c.start_at(t), s.c.start_at(t));
        for r in [a, b, c] {
            r.end_at(t + ms(1));
        }
        assert_eq!(s.c.in_flight(), 0);
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.5);
        // The peak is reset at each step.
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.75);
    }

    #[test]
    fn both_signals_either_overloads() {
        let mut s = Sim::new(
            AdaptiveConfig {
                max_in_flight: Some(1),
                ..config()
            },
            1,
            vec![0],
        );
        // Fast but two at once.
        let t = s.now;
        let (a, b) = (s.c.start_at(t), s.c.start_at(t));
        a.end_at(t + ms(1));
        b.end_at(t + ms(1));
        assert!(s.step());
        assert_eq!(s.c.factor(0), 0.5);
        // One at a time but slow.
        assert!(s.overloaded());
        assert_eq!(s.c.factor(0), 0.25);
    }

    #[test]
    fn the_guard_counts_a_request_out_when_dropped() {
        let c = Arc::new(Controller::new(config(), 1, vec![0]));
        let a = c.start();
        let b = c.start();
        assert_eq!(c.in_flight(), 2);
        assert!(b.started() >= a.started());
        drop(a);
        assert_eq!(c.in_flight(), 1);
        // A cancelled request: its future (holding the guard) dropped before completing.
        let cancelled = async move {
            let _request = b;
            std::future::pending::<()>().await;
        };
        drop(cancelled);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.finished.load(Ordering::Relaxed) >> 32, 2);
        fn send<T: Send>(_: &T) {}
        send(&c.start());
    }

    #[test]
    fn concurrent_requests_and_steps_keep_the_count() {
        let c = Arc::new(Controller::new(config(), 2, vec![0, 1]));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        let request = c.start();
                        assert!(c.in_flight() >= 1);
                        drop(request);
                    }
                })
            })
            .collect();
        while !workers.iter().all(|w| w.is_finished()) {
            c.tick(Instant::now());
            for tier in 0..2 {
                assert!((0.25..=1.0).contains(&c.factor(tier)));
            }
        }
        for worker in workers {
            worker.join().unwrap();
        }
        assert_eq!(c.in_flight(), 0);
        c.tick(Instant::now());
        assert_eq!(
            c.finished.load(Ordering::Relaxed),
            0,
            "all counted by a step"
        );
        assert_eq!(c.peak.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn validate_names_the_field() {
        let cases: Vec<(AdaptiveConfig, &str)> = vec![
            (
                AdaptiveConfig {
                    target_latency: None,
                    ..config()
                },
                "target_latency",
            ),
            (
                AdaptiveConfig {
                    target_latency: Some(Duration::ZERO),
                    ..config()
                },
                "target_latency",
            ),
            (
                AdaptiveConfig {
                    max_in_flight: Some(0),
                    ..config()
                },
                "max_in_flight",
            ),
            (
                AdaptiveConfig {
                    quantile: 0.0,
                    ..config()
                },
                "quantile",
            ),
            (
                AdaptiveConfig {
                    quantile: 1.01,
                    ..config()
                },
                "quantile",
            ),
            (
                AdaptiveConfig {
                    quantile: f64::NAN,
                    ..config()
                },
                "quantile",
            ),
            (
                AdaptiveConfig {
                    interval: Duration::ZERO,
                    ..config()
                },
                "interval",
            ),
            (
                AdaptiveConfig {
                    decrease: 1.0,
                    ..config()
                },
                "decrease",
            ),
            (
                AdaptiveConfig {
                    decrease: 0.0,
                    ..config()
                },
                "decrease",
            ),
            (
                AdaptiveConfig {
                    increase: 0.0,
                    ..config()
                },
                "increase",
            ),
            (
                AdaptiveConfig {
                    increase: 1.5,
                    ..config()
                },
                "increase",
            ),
            (
                AdaptiveConfig {
                    min_factor: 0.0,
                    ..config()
                },
                "min_factor",
            ),
            (
                AdaptiveConfig {
                    min_factor: 1.1,
                    ..config()
                },
                "min_factor",
            ),
            (
                AdaptiveConfig {
                    min_factor: f64::INFINITY,
                    ..config()
                },
                "min_factor",
            ),
        ];
        for (config, field) in cases {
            let e = config.validate().expect_err(field);
            assert_eq!(e.field(), field, "{config:?}");
            assert!(e.to_string().contains(field), "{e}");
            assert_eq!(Controller::try_new(config, 1, vec![0]).err(), Some(e));
        }
        // The edges that are allowed.
        let edges = AdaptiveConfig {
            target_latency: None,
            max_in_flight: Some(1),
            quantile: 1.0,
            increase: 1.0,
            min_factor: 1.0,
            ..config()
        };
        assert_eq!(edges.validate(), Ok(()));
        let e = AdaptiveConfig {
            decrease: 1.5,
            ..config()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "adaptive `decrease` is 1.5: it must be above 0 and below 1"
        );
    }

    #[test]
    fn the_priority_order_is_checked() {
        let e = Controller::try_new(config(), 2, vec![0, 2]).unwrap_err();
        assert_eq!(e, AdaptiveError::UnknownTier { tier: 2, tiers: 2 });
        assert_eq!(e.field(), "priority");
        let e = Controller::try_new(config(), 2, vec![1, 1]).unwrap_err();
        assert_eq!(e, AdaptiveError::DuplicateTier(1));
        assert_eq!(e.field(), "priority");
        let c = Controller::try_new(config(), 3, vec![]).unwrap();
        assert_eq!((c.tiers(), c.priority()), (3, &[][..]));
    }

    #[test]
    #[should_panic(expected = "adaptive `decrease` is 2.0")]
    fn new_panics_on_a_bad_config() {
        let _ = Controller::new(
            AdaptiveConfig {
                decrease: 2.0,
                ..config()
            },
            1,
            vec![0],
        );
    }

    #[test]
    fn min_factor_one_never_cuts() {
        let mut s = Sim::new(
            AdaptiveConfig {
                min_factor: 1.0,
                ..config()
            },
            1,
            vec![0],
        );
        assert!(!s.overloaded());
        assert_eq!(s.c.factor(0), 1.0);
    }

    #[test]
    fn nearest_rank_of_round_products() {
        assert_eq!(nearest_rank(0.9, 10), 9);
        assert_eq!(nearest_rank(0.9, 11), 10);
        assert_eq!(nearest_rank(0.99, 100), 99);
        assert_eq!(nearest_rank(0.1, 30), 3);
        assert_eq!(nearest_rank(0.7, 10), 7);
        assert_eq!(nearest_rank(1.0, 7), 7);
        assert_eq!(nearest_rank(0.001, 7), 1);
    }

    #[tokio::test]
    async fn spawn_cuts_under_slow_requests_recovers_and_ends_with_the_controller() {
        use std::sync::atomic::AtomicUsize;
        let c = Arc::new(Controller::new(
            AdaptiveConfig {
                target_latency: Some(ms(5)),
                interval: ms(10),
                decrease: 0.5,
                increase: 0.5,
                ..config()
            },
            2,
            vec![0, 1],
        ));
        let changes = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&changes);
        let task = c.spawn(move |c| {
            assert!(c.factor(0) >= 0.25 && c.factor(0) <= 1.0);
            seen.fetch_add(1, Ordering::Relaxed);
        });
        // Slow requests (30 ms against a 5 ms target) until tier 0 is cut.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while c.factor(0) == 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "never cut");
            let request = c.start();
            tokio::time::sleep(ms(30)).await;
            drop(request);
        }
        assert!(c.factor(0) < 1.0);
        assert!(changes.load(Ordering::Relaxed) >= 1);
        // No more requests: healthy intervals restore both tiers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while c.factor(0) < 1.0 || c.factor(1) < 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "never recovered");
            tokio::time::sleep(ms(5)).await;
        }
        assert_eq!((c.factor(0), c.factor(1)), (1.0, 1.0));
        // The task holds only a Weak: dropping the controller ends it.
        drop(c);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the task ended")
            .expect("the task did not panic");
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// One control interval of the simulation.
        #[derive(Debug, Clone)]
        struct Interval {
            /// How many requests are held in flight across the step (started now, or kept from
            /// the last interval; extras are finished first).
            held: usize,
            /// The latencies (ms) of the requests that start and finish in the interval.
            latencies: Vec<u64>,
        }

        fn interval() -> impl Strategy<Value = Interval> {
            (
                0..4usize,
                prop::collection::vec(prop_oneof![0..150u64, 0..2_000u64], 0..12),
            )
                .prop_map(|(held, latencies)| Interval { held, latencies })
        }

        fn setup() -> impl Strategy<Value = (AdaptiveConfig, usize, Vec<usize>)> {
            (
                prop::option::of(1..300u64),
                prop::option::of(1..6u32),
                prop_oneof![Just(1.0), Just(0.9), Just(0.5), 0.01..=1.0f64],
                0.01..0.99f64,
                prop_oneof![Just(1.0), 0.001..=1.0f64],
                prop_oneof![Just(1.0), 0.000_000_1..=1.0f64],
                1..6usize,
            )
                .prop_filter("a signal", |(target, max, ..)| {
                    target.is_some() || max.is_some()
                })
                .prop_flat_map(
                    |(target, max, quantile, decrease, increase, min_factor, tiers)| {
                        let config = AdaptiveConfig {
                            target_latency: target.map(Duration::from_millis),
                            max_in_flight: max,
                            quantile,
                            interval: ms(1000),
                            decrease,
                            increase,
                            min_factor,
                        };
                        // Any subset of the tiers, in any order.
                        let priority = Just((0..tiers).collect::<Vec<_>>())
                            .prop_shuffle()
                            .prop_flat_map(move |order| {
                                (0..=order.len()).prop_map(move |n| order[..n].to_vec())
                            });
                        (Just(config), Just(tiers), priority)
                    },
                )
        }

        /// What the step should decide, computed from the interval's events by the test.
        struct Oracle {
            in_flight: usize,
            peak: usize,
            latencies: Vec<Duration>,
            /// The last finish, or start with nothing in flight.
            progress: Instant,
        }

        impl Oracle {
            fn start(&mut self, at: Instant) {
                if self.in_flight == 0 {
                    self.progress = self.progress.max(at);
                }
                self.in_flight += 1;
                self.peak = self.peak.max(self.in_flight);
            }

            fn finish(&mut self, started: Instant, at: Instant) {
                self.in_flight -= 1;
                self.latencies.push(at - started);
                self.progress = self.progress.max(at);
            }

            fn overloaded(&mut self, config: &AdaptiveConfig, now: Instant) -> bool {
                let mut latencies = std::mem::take(&mut self.latencies);
                latencies.sort();
                let peak = std::mem::replace(&mut self.peak, self.in_flight);
                let slow = match config.target_latency {
                    Some(target) if !latencies.is_empty() => {
                        let rank = nearest_rank(config.quantile, latencies.len() as u64);
                        latencies[rank as usize - 1] > target
                    }
                    Some(target) => {
                        self.in_flight > 0 && now.saturating_duration_since(self.progress) > target
                    }
                    None => false,
                };
                let many = config.max_in_flight.is_some_and(|max| peak > max as usize);
                slow || many
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn factors_follow_the_rules(
                (config, tiers, priority) in setup(),
                intervals in prop::collection::vec(interval(), 0..40),
            ) {
                let mut s = Sim::new(config.clone(), tiers, priority.clone());
                let min = s.c.min_ppm;
                prop_assert!(f64::from(min) / 1e6 >= config.min_factor - 1e-6);
                prop_assert!(f64::from(min) / 1e6 < config.min_factor + 1e-6 || min == 1);
                let mut oracle = Oracle {
                    in_flight: 0,
                    peak: 0,
                    latencies: Vec::new(),
                    progress: s.c.epoch,
                };
                let mut held: Vec<InFlight> = Vec::new();
                for step in &intervals {
                    let t = s.now;
                    while held.len() > step.held {
                        let request = held.pop().unwrap();
                        oracle.finish(request.started(), t);
                        request.end_at(t);
                    }
                    while held.len() < step.held {
                        oracle.start(t);
                        held.push(s.c.start_at(t));
                    }
                    let requests: Vec<InFlight> = step
                        .latencies
                        .iter()
                        .map(|_| {
                            oracle.start(t);
                            s.c.start_at(t)
                        })
                        .collect();
                    for (request, &latency) in requests.into_iter().zip(&step.latencies) {
                        oracle.finish(t, t + ms(latency));
                        request.end_at(t + ms(latency));
                    }
                    prop_assert_eq!(s.c.in_flight() as usize, oracle.in_flight);

                    let before = s.ppm();
                    let changed = s.step();
                    let after = s.ppm();
                    let overloaded = oracle.overloaded(&config, s.now);
                    prop_assert_eq!(changed, before != after);

                    for tier in 0..tiers {
                        prop_assert!(after[tier] >= min && after[tier] <= FULL, "{:?}", after);
                        prop_assert!(s.c.factor(tier) >= config.min_factor - 1e-6);
                        prop_assert!(s.c.factor(tier) <= 1.0);
                        if !priority.contains(&tier) {
                            prop_assert_eq!(after[tier], FULL);
                        }
                    }
                    let moved: Vec<usize> =
                        (0..tiers).filter(|&t| before[t] != after[t]).collect();
                    prop_assert!(moved.len() <= 1, "{:?} -> {:?}", before, after);
                    // Where a tier sits in the priority order.
                    let rank = |tier: usize| priority.iter().position(|&t| t == tier).unwrap();
                    if let Some(&tier) = moved.first() {
                        if after[tier] < before[tier] {
                            prop_assert!(overloaded);
                            // Every lower-priority tier was already at the minimum.
                            for &lower in &priority[..rank(tier)] {
                                prop_assert_eq!(before[lower], min);
                            }
                        } else {
                            prop_assert!(!overloaded);
                            // Every higher-priority tier was already whole.
                            for &higher in &priority[rank(tier) + 1..] {
                                prop_assert_eq!(before[higher], FULL);
                            }
                        }
                    } else if overloaded {
                        prop_assert!(priority.iter().all(|&t| before[t] == min));
                    } else {
                        prop_assert!(priority.iter().all(|&t| before[t] == FULL));
                    }
                }

                // Everything finishes; after enough healthy intervals every factor is whole.
                let t = s.now;
                for request in held.drain(..) {
                    request.end_at(t);
                }
                s.step();
                let per_tier = (1.0 / config.increase).ceil() as usize + 1;
                for _ in 0..per_tier * priority.len() {
                    s.step();
                }
                for tier in 0..tiers {
                    prop_assert_eq!(s.c.factor(tier), 1.0);
                }
                prop_assert!(!s.step());
            }
        }
    }
}

//! A limit as the file writes it ([`LimitSpec`]: a rate or `limit` + `window`, an algorithm, a
//! burst, a delay) made into a [`Quota`].

use std::time::Duration;

use tollgate_core::{Algorithm, Quota};

use super::ConfigError;
use super::duration::parse_duration;
use super::position::FieldPath;
use super::schema::LimitSpec;
use super::validate::Ctx;

impl Ctx<'_> {
    fn duration(&self, path: &FieldPath, text: &str) -> Result<Duration, ConfigError> {
        parse_duration(text).map_err(|e| self.error(path, e.to_string()))
    }

    /// The quota of the limit at `path`, which is not a tier: a concurrency cap is refused.
    pub(super) fn quota(&self, path: &FieldPath, spec: &LimitSpec) -> Result<Quota, ConfigError> {
        for (given, name) in [
            (spec.concurrency.is_some(), "concurrency"),
            (spec.lease_time.is_some(), "lease_time"),
        ] {
            if given {
                return Err(self.error(
                    &path.clone().key(name),
                    format!("`{name}` applies to tiers (rate_limits) only"),
                ));
            }
        }
        self.rate_quota(path, spec)
    }

    /// A tier's concurrency cap and lease time, if it has a cap.
    pub(super) fn concurrency(
        &self,
        path: &FieldPath,
        spec: &LimitSpec,
    ) -> Result<Option<(u32, Duration)>, ConfigError> {
        let lease = match &spec.lease_time {
            Some(text) => {
                let at = path.clone().key("lease_time");
                let lease = self.duration(&at, text)?;
                if lease.is_zero() {
                    return Err(self.error(&at, "lease_time must be more than 0"));
                }
                if spec.concurrency.is_none() {
                    return Err(self.error(&at, "lease_time needs a `concurrency` cap"));
                }
                lease
            }
            None => crate::inbound::DEFAULT_LEASE_TIME,
        };
        match spec.concurrency {
            None => Ok(None),
            Some(0) => Err(self.error(
                &path.clone().key("concurrency"),
                "concurrency must be at least 1 (0 would refuse every request)",
            )),
            Some(n) => Ok(Some((n, lease))),
        }
    }

    /// The rate quota of the limit at `path`.
    pub(super) fn rate_quota(
        &self,
        path: &FieldPath,
        spec: &LimitSpec,
    ) -> Result<Quota, ConfigError> {
        let algorithm = match &spec.algorithm {
            Some(name) => name
                .parse::<Algorithm>()
                .map_err(|e| self.error(&path.clone().key("algorithm"), e.to_string()))?,
            None => Algorithm::TokenBucket,
        };
        let rates = [
            (spec.requests_per_second, Duration::from_secs(1)),
            (spec.requests_per_minute, Duration::from_secs(60)),
            (spec.requests_per_hour, Duration::from_secs(3600)),
        ];
        let mut given = rates.iter().filter_map(|(n, p)| n.map(|n| (n.get(), *p)));
        let rate = given.next();
        if given.next().is_some() {
            return Err(self.error(
                path,
                "give only one of requests_per_second, requests_per_minute, requests_per_hour",
            ));
        }
        let window = match &spec.window {
            Some(w) => Some(self.duration(&path.clone().key("window"), w)?),
            None => None,
        };
        let (count, period) = match (rate, spec.limit, window) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(self.error(path, "give either a rate or limit + window, not both"));
            }
            (Some((n, p)), None, None) => (n, p),
            (None, Some(limit), Some(window)) => (limit.get(), window),
            (None, Some(_), None) => {
                return Err(self.error(&path.clone().key("window"), "`limit` needs a `window`"));
            }
            (None, None, Some(_)) => {
                return Err(self.error(&path.clone().key("limit"), "`window` needs a `limit`"));
            }
            (None, None, None) => {
                return Err(self.error(
                    path,
                    "missing rate: give requests_per_second, requests_per_minute, requests_per_hour, or limit + window",
                ));
            }
        };
        let field = |name: &str| path.clone().key(name);
        let quota = match algorithm {
            Algorithm::TokenBucket => {
                let q = Quota::per_period(count, period)
                    .map_err(|e| self.error(path, e.to_string()))?;
                match spec.burst_limit {
                    Some(b) => q
                        .with_burst(b.get())
                        .map_err(|e| self.error(&field("burst_limit"), e.to_string()))?,
                    None => q,
                }
            }
            Algorithm::LeakyBucket => {
                let q = Quota::per_period(count, period)
                    .map_err(|e| self.error(path, e.to_string()))?;
                let max_delay = match (&spec.max_delay, spec.burst_limit) {
                    (Some(d), _) => self.duration(&field("max_delay"), d)?,
                    (None, Some(b)) => q.interval() * (b.get() - 1),
                    (None, None) => Duration::ZERO,
                };
                q.shaped(max_delay)
                    .map_err(|e| self.error(&field("max_delay"), e.to_string()))?
            }
            other => {
                Quota::window(other, count, period).map_err(|e| self.error(path, e.to_string()))?
            }
        };
        if spec.max_delay.is_some() && algorithm != Algorithm::LeakyBucket {
            return Err(self.error(
                &field("max_delay"),
                "max_delay applies to the leaky_bucket algorithm only",
            ));
        }
        Ok(quota)
    }
}

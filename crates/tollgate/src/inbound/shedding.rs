//! [`Shedding`]: the adaptive limits at work in a layer: the controller, and each tier's limit
//! as it lowered it (built once per factor, not per request).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tollgate_core::{Algorithm, Quota};

use super::adaptive::Controller;
use super::policy::{LimitInfo, Policy};
use crate::metrics as m;

/// The controller's factor for the configured quota: parts per million.
const WHOLE: u32 = 1_000_000;

/// The adaptive limits of a layer.
pub(crate) struct Shedding {
    pub(crate) controller: Arc<Controller>,
    /// One slot per tier in the priority order: the lowered limit last built, with the factor
    /// and the policy it was built for.
    lowered: Box<[ArcSwapOption<Lowered>]>,
    /// The tiers it may lower, lowest priority first, as the policy the layer was built with
    /// named them (a reload keeps them: see `Config::needs_restart`).
    names: Vec<Arc<str>>,
    /// Drives the controller; ended when the layer is dropped.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Shedding {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Lowered {
    ppm: u32,
    policy: u64,
    limit: Arc<LimitInfo>,
}

impl Shedding {
    /// The adaptive limits of `policy`, if it has them; the controller runs on the current tokio
    /// runtime (without one, it is driven by nothing and the factors stay at 1: said in the log).
    pub(crate) fn new(policy: &Policy) -> Option<Shedding> {
        let adaptive = policy.adaptive()?;
        let n = adaptive.priority.len();
        let controller = Arc::new(Controller::new(
            adaptive.config.clone(),
            n,
            (0..n).collect(),
        ));
        let names = adaptive.priority.clone();
        let kept = names.clone();
        for name in &names {
            metrics::gauge!(m::ADAPTIVE_FACTOR, "tier" => name.to_string()).set(1.0);
        }
        let task = match tokio::runtime::Handle::try_current() {
            Ok(_) => Some(controller.spawn(move |c| {
                for (i, name) in names.iter().enumerate() {
                    metrics::gauge!(m::ADAPTIVE_FACTOR, "tier" => name.to_string())
                        .set(c.factor(i));
                }
            })),
            Err(_) => {
                tracing::error!(
                    "adaptive limits need a tokio runtime when the layer is built; without one \
                     they stay at the configured quotas"
                );
                None
            }
        };
        Some(Shedding {
            names: kept,
            controller,
            lowered: (0..n).map(|_| ArcSwapOption::empty()).collect(),
            task,
        })
    }

    /// The limit in force for the tier at `tier` of `policy`, when the controller lowered it.
    pub(crate) fn effective(&self, policy: &Policy, tier: usize) -> Option<Arc<LimitInfo>> {
        let name = &policy.tier_at(tier).limit.name;
        let rank = self.names.iter().position(|n| n == name)?;
        let slot = self.lowered.get(rank)?;
        let ppm = self.controller.factor_ppm(rank);
        if ppm >= WHOLE {
            return None;
        }
        if let Some(lowered) = &*slot.load()
            && lowered.ppm == ppm
            && lowered.policy == policy.id()
        {
            return Some(Arc::clone(&lowered.limit));
        }
        let configured = &policy.tier_at(tier).limit;
        let limit = LimitInfo::new(Arc::clone(&configured.name), scaled(&configured.quota, ppm));
        slot.store(Some(Arc::new(Lowered {
            ppm,
            policy: policy.id(),
            limit: Arc::clone(&limit),
        })));
        Some(limit)
    }
}

/// `quota` with its rate (and so its burst) scaled by `ppm` parts per million: a bucket refills
/// that much slower and holds that much less; a window admits that much less. Never below one
/// request, never above the quota.
pub(crate) fn scaled(quota: &Quota, ppm: u32) -> Quota {
    let factor = f64::from(ppm.min(WHOLE)) / f64::from(WHOLE);
    let fewer = |n: u32| ((f64::from(n) * factor).floor() as u32).clamp(1, n);
    let slower = quota.interval().div_f64(factor.max(1e-6));
    let rescaled = match quota.algorithm() {
        Algorithm::TokenBucket => Quota::from_parts(
            Algorithm::TokenBucket,
            fewer(quota.limit()),
            slower,
            quota.max_delay(),
        ),
        Algorithm::LeakyBucket => Quota::from_parts(
            Algorithm::LeakyBucket,
            quota.limit(),
            slower,
            quota.max_delay(),
        ),
        window => Quota::from_parts(
            window,
            fewer(quota.limit()),
            quota.interval(),
            quota.max_delay(),
        ),
    };
    rescaled.unwrap_or(*quota)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn scaling_lowers_rate_and_capacity_never_below_one() {
        let q = Quota::per_minute(100).unwrap().with_burst(20).unwrap();
        let half = scaled(&q, 500_000);
        assert_eq!(half.limit(), 10);
        assert_eq!(half.interval(), q.interval() * 2);
        assert_eq!(scaled(&q, WHOLE), q);
        assert_eq!(scaled(&q, 1).limit(), 1);
        let w = Quota::fixed_window(10, Duration::from_secs(60)).unwrap();
        assert_eq!(scaled(&w, 300_000).limit(), 3);
        assert_eq!(scaled(&w, 300_000).interval(), w.interval());
    }
}

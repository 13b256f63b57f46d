//! The decision for one request: the state every clone of the layer shares ([`Shared`]), the
//! denied-until cache, the store under its failure policy, the metrics, and which answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use tollgate_core::{Decision, Outcome, Verdict};

use super::decision::{After, Next, Planned, RateLimitDecision};
use super::denied::DeniedCache;
use super::identity::{Identity, Rejection};
use super::plan::Plan;
use super::policy::{Policy, PolicyHandle};
use super::response;
use crate::http::headers::HeaderMode;
use crate::http::key::fingerprint;
use crate::limiter::guarded::{Guarded, GuardedStore};
use crate::metrics::{self as m, outcome};

/// State shared by every clone of the layer and its services.
pub(crate) struct Shared {
    /// The policy in force (replaceable).
    pub(crate) policy: PolicyHandle,
    /// The store behind its timeout, breaker and failure policy.
    pub(crate) store: GuardedStore,
    pub(crate) denied: Option<DeniedCache>,
    /// The misconfigurations (by reason) logged already: the log says each once, the metric
    /// counts every request.
    pub(crate) misconfigured: std::sync::Mutex<Vec<&'static str>>,
    /// Whether a passing request carries its [`RateLimitDecision`] (the builder's
    /// `decision_extension`).
    pub(crate) decision_extension: bool,
}

/// Counts a decision in the tier's metrics.
fn count(plan: &Plan, outcome: &'static str) {
    let tm = plan.tier().metrics();
    match outcome {
        outcome::ALLOWED => {
            tm.allowed.increment(1);
            tm.tokens.increment(u64::from(plan.cost()));
        }
        outcome::LIMITED => tm.limited.increment(1),
        outcome::SHADOW_LIMITED => tm.shadow_limited.increment(1),
        _ => tm.store_error.increment(1),
    }
}

fn breach(plan: &Plan) {
    plan.tier().metrics().breaches.increment(1);
}

impl Shared {
    /// The answer to a request the extractor could not identify.
    pub(crate) fn reject(&self, rejection: &Rejection) -> Response<Bytes> {
        match rejection {
            Rejection::Unauthorized { detail } => response::unauthorized(detail),
            Rejection::BadRequest { detail } => response::bad_request(detail),
            Rejection::Misconfigured { reason, detail } => self.misconfigured(reason, detail),
        }
    }

    /// A request that cannot be decided as the server is set up: said once in the log (at error
    /// level: the operator must act), counted every time, answered 500 with the fix.
    fn misconfigured(&self, reason: &'static str, detail: &str) -> Response<Bytes> {
        metrics::counter!(m::MISCONFIGURED_TOTAL, "reason" => reason).increment(1);
        let mut logged = self
            .misconfigured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !logged.contains(&reason) {
            logged.push(reason);
            tracing::error!(reason, "rate limiter misconfigured: {detail}");
        }
        response::misconfigured(detail)
    }

    /// Works out the limits of a request and what the cache or a store without I/O says; the
    /// plan to decide asynchronously otherwise.
    pub(crate) fn plan<B>(
        &self,
        policy: Arc<Policy>,
        identity: Identity,
        request: &Request<B>,
    ) -> Planned {
        if policy.is_exempt_key(&identity.key) {
            return Planned::Decided(Next::pass());
        }
        let Some(tier) = policy.tier_index(&identity.tier) else {
            let detail = format!(
                "The key extractor put the caller in tier `{}`, which the policy does not define.",
                identity.tier
            );
            return Planned::Decided(Next::Respond(self.misconfigured("unknown_tier", &detail)));
        };
        let plan = Plan::new(
            policy,
            tier,
            identity.key,
            request.method(),
            request.uri().path(),
        );
        if !plan.policy.is_shadow()
            && let Some(cache) = &self.denied
        {
            cache.follow(plan.policy.id());
            if !cache.is_empty() {
                let now = Instant::now();
                if let Some(denied) = cache.get(&plan.cache_key(), now, plan.policy.id()) {
                    let decision = denied.at(now);
                    return Planned::Decided(self.deny(
                        &plan,
                        denied.binding,
                        &[denied.binding],
                        decision,
                        true,
                    ));
                }
            }
        }
        let (limits, n) = plan.limits();
        match self.store.decide_now(&limits[..n]) {
            Some(answer) => Planned::Decided(self.finish(plan, answer)),
            None => Planned::ToDecide(plan),
        }
    }

    /// Decides a plan on a store that does I/O, under the breaker, the timeout and the failure
    /// policy.
    pub(crate) async fn decide(self: Arc<Self>, plan: Plan) -> Next {
        let (limits, n) = plan.limits();
        let answer = self.store.decide(&limits[..n]).await;
        self.finish(plan, answer)
    }

    /// Turns the store's (or the failure policy's) answer into what to do with the request.
    fn finish(&self, owned: Plan, answer: Guarded<Verdict>) -> Next {
        let plan = &owned;
        // `from_store`: the verdict is the store's own, not the local fallback's.
        let (verdict, from_store) = match answer {
            Guarded::Store(verdict) => (verdict, true),
            Guarded::Local(verdict) => (verdict, false),
            Guarded::Open => {
                Self::store_failed(plan);
                return self.fail_open(plan);
            }
            Guarded::Closed => {
                Self::store_failed(plan);
                return Next::Respond(response::unavailable(self.store.retry_after_unavailable()));
            }
        };
        let Some((binding, decision)) = verdict.binding() else {
            return Next::pass();
        };
        let decision = *decision;
        if verdict.is_allowed() {
            count(plan, outcome::ALLOWED);
            tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::ALLOWED, "rate limit");
            return self.forward(owned, binding, decision, verdict.delay(), false);
        }
        if plan.policy.is_shadow() {
            count(plan, outcome::SHADOW_LIMITED);
            tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::SHADOW_LIMITED, "rate limit");
            return self.forward(owned, binding, decision, Duration::ZERO, true);
        }
        if verdict.outcome() == Outcome::InsufficientCapacity {
            return Self::never(plan, &verdict);
        }
        // Only the store's denials are remembered: the cache is exact for the store that decided,
        // and a denial of the local fallback must not outlive the outage (once the circuit
        // closes, the store decides again).
        if from_store && let Some(cache) = &self.denied {
            cache.insert(
                &plan.cache_key(),
                Instant::now(),
                decision,
                binding,
                verdict.retry_after(),
                plan.policy.id(),
            );
        }
        let decision = Decision {
            retry_after: verdict.retry_after(),
            ..decision
        };
        let violated: Vec<usize> = (0..verdict.decisions().len())
            .filter(|&i| !verdict.decisions()[i].is_allowed())
            .collect();
        self.deny(plan, binding, &violated, decision, false)
    }

    /// The store failed or timed out and the failure policy answers: counted and logged.
    fn store_failed(plan: &Plan) {
        count(plan, outcome::STORE_ERROR);
        tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::STORE_ERROR, "rate limit");
    }

    /// `fail_open`: the request passes without a decision; the handler sees `store_error`.
    fn fail_open(&self, plan: &Plan) -> Next {
        Next::Forward {
            after: None,
            delay: Duration::ZERO,
            extension: self.decision_extension.then(|| RateLimitDecision {
                tier: Arc::clone(plan.tier_name()),
                policy: Arc::clone(plan.tier_name()),
                decision: Decision {
                    outcome: Outcome::Allowed,
                    limit: plan.tier().limit.quota.limit(),
                    remaining: 0,
                    reset_after: Duration::ZERO,
                    retry_after: Duration::ZERO,
                    delay: Duration::ZERO,
                },
                store_error: true,
            }),
        }
    }

    /// A request costing more than one of its limits can ever hold: a 403 saying why.
    fn never(plan: &Plan, verdict: &Verdict) -> Next {
        count(plan, outcome::LIMITED);
        tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::LIMITED, "rate limit: cost above capacity");
        let (i, d) = verdict
            .decisions()
            .iter()
            .enumerate()
            .find(|(_, d)| d.outcome == Outcome::InsufficientCapacity)
            .unwrap_or((0, &verdict.decisions()[0]));
        Next::Respond(response::too_costly(
            plan.cost_of(i),
            &plan.limit(i).name,
            d.limit,
        ))
    }

    fn forward(
        &self,
        plan: Plan,
        binding: usize,
        decision: Decision,
        delay: Duration,
        shadow: bool,
    ) -> Next {
        let extension = self.decision_extension.then(|| RateLimitDecision {
            tier: Arc::clone(plan.tier_name()),
            policy: Arc::clone(&plan.limit(binding).name),
            decision,
            store_error: false,
        });
        let mode = plan.policy.header_mode();
        // Without headers to write (or a shadow Retry-After to remove), nothing to do afterwards.
        let after = (mode != HeaderMode::None || shadow).then(|| After {
            mode,
            slot: plan.slot(binding),
            policy: plan.policy,
            decision,
            shadow,
        });
        Next::Forward {
            after,
            delay,
            extension,
        }
    }

    fn deny(
        &self,
        plan: &Plan,
        binding: usize,
        violated: &[usize],
        decision: Decision,
        cached: bool,
    ) -> Next {
        count(plan, outcome::LIMITED);
        breach(plan);
        tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::LIMITED, cached, "rate limit");
        let names: Vec<&str> = violated.iter().map(|&i| &*plan.limit(i).name).collect();
        Next::Respond(response::too_many_requests(
            &names,
            plan.limit(binding),
            plan.policy.header_mode(),
            &decision,
        ))
    }
}

/// A caller's key in logs: shown as its 128-bit fingerprint, computed only when a log line is
/// actually written (never the raw key, which may be an API key).
struct KeyHash<'a>(&'a str);

impl std::fmt::Display for KeyHash<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", fingerprint(self.0.as_bytes()))
    }
}

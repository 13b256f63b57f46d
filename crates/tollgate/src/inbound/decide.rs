//! The decision for one request: the state every clone of the layer shares ([`Shared`]), the
//! denied-until cache, the store under its failure policy, the metrics, and which answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use tollgate_core::{Decision, Leased, Outcome, Verdict};

use super::decision::{After, DeferredCharge, Extra, LeaseGuard, Next, Planned, RateLimitDecision};
use super::denied::DeniedCache;
use super::identity::{Identity, Rejection};
use super::plan::{Indices, Plan, Slot};
use super::policy::{Policy, PolicyHandle};
use super::response;
use super::shedding::Shedding;
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
    /// The adaptive limits, when the policy has them.
    pub(crate) adaptive: Option<Shedding>,
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
    /// Charges the limits of a route that charges only failures, after a failed response:
    /// at once on a store without I/O (`true`), else `false` and the caller awaits
    /// [`charge`](Self::charge).
    pub(crate) fn charge_now(&self, plan: &Plan) -> bool {
        let (limits, n, _) = plan.deferred();
        match self.store.decide_now(&limits[..n]) {
            Some(answer) => {
                Self::charged(plan, &answer);
                true
            }
            None => false,
        }
    }

    /// [`charge_now`](Self::charge_now) on a store that does I/O.
    pub(crate) async fn charge(self: Arc<Self>, plan: Plan) {
        let (limits, n, _) = plan.deferred();
        let answer = self.store.decide(&limits[..n]).await;
        Self::charged(&plan, &answer);
    }

    /// A failure charged: a charge the limits refuse (failures that passed the check together)
    /// is said in the debug log.
    fn charged(plan: &Plan, answer: &Guarded<Verdict>) {
        if let Guarded::Store(v) | Guarded::Local(v) = answer
            && !v.is_allowed()
        {
            tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), "a failure found its route's limit spent by failures in flight at once");
        }
    }

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
        self: &Arc<Self>,
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
            return Planned::Decided(Next::respond(self.misconfigured("unknown_tier", &detail)));
        };
        let effective = self
            .adaptive
            .as_ref()
            .and_then(|a| a.effective(&policy, tier));
        // The plan stays here, borrowed by each step after it (it is moved only to a decision
        // that awaits the store, or cloned for a charge on failure): a plan moved from step to
        // step cost a copy of it each time.
        let mut plan = Plan::new(
            policy,
            tier,
            identity.key,
            request.method(),
            request.uri().path(),
            effective,
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
        if plan.charges_failures() {
            let (checks, m, at) = plan.deferred();
            let Some(answer) = self.store.peek_now(&checks[..m]) else {
                return Planned::ToDecide(plan);
            };
            if let Some(next) = self.check(&plan, answer, &at) {
                return Planned::Decided(next);
            }
        }
        let (limits, n, at) = plan.limits();
        let answer = match plan.lease() {
            Some(lease) => self.store.decide_leased_now(&limits[..n], &lease),
            None => self.store.decide_now(&limits[..n]).map(|answer| {
                answer.map(|verdict| Leased {
                    verdict,
                    lease: None,
                })
            }),
        };
        match answer {
            Some(answer) => Planned::Decided(self.finish(&mut plan, answer, n, &at)),
            None => Planned::ToDecide(plan),
        }
    }

    /// Decides a plan on a store that does I/O, under the breaker, the timeout and the failure
    /// policy.
    pub(crate) async fn decide(self: Arc<Self>, mut plan: Plan) -> Next {
        if plan.charges_failures() {
            let (checks, m, at) = plan.deferred();
            let answer = self.store.peek(&checks[..m]).await;
            if let Some(next) = self.check(&plan, answer, &at) {
                return next;
            }
        }
        let (limits, n, at) = plan.limits();
        let answer = match plan.lease() {
            Some(lease) => self.store.decide_leased(&limits[..n], &lease).await,
            None => self.store.decide(&limits[..n]).await.map(|verdict| Leased {
                verdict,
                lease: None,
            }),
        };
        self.finish(&mut plan, answer, n, &at)
    }

    /// The check of a route that charges only failures: `None` to go on and decide, or the
    /// answer when its limits have nothing left for the request (in shadow mode the request then
    /// passes, counted `shadow_limited`, charging nothing, as a denial would). A store failure
    /// goes on (the decision then meets the failure policy).
    fn check(
        self: &Arc<Self>,
        plan: &Plan,
        answer: Guarded<Verdict>,
        at: &Indices,
    ) -> Option<Next> {
        let (verdict, from_store) = match answer {
            Guarded::Store(verdict) => (verdict, true),
            Guarded::Local(verdict) => (verdict, false),
            Guarded::Open | Guarded::Closed => return None,
        };
        if verdict.is_allowed() {
            return None;
        }
        let (binding, decision) = verdict.binding()?;
        let (binding, decision) = (at.get(binding), *decision);
        if plan.policy.is_shadow() {
            count(plan, outcome::SHADOW_LIMITED);
            return Some(self.forward(plan, binding, decision, Duration::ZERO, true, None));
        }
        Some(self.refuse(plan, &verdict, at, binding, decision, from_store))
    }

    /// Turns the store's (or the failure policy's) answer into what to do with the request:
    /// `rates` rate limits were decided (then the lease, if any), at the plan's indices `at`.
    fn finish(
        self: &Arc<Self>,
        plan: &mut Plan,
        answer: Guarded<Leased>,
        rates: usize,
        at: &Indices,
    ) -> Next {
        // `from_store`: the verdict is the store's own, not the local fallback's.
        let (leased, from_store) = match answer {
            Guarded::Store(leased) => (leased, true),
            Guarded::Local(leased) => (leased, false),
            Guarded::Open => {
                Self::store_failed(plan);
                return self.fail_open(plan);
            }
            Guarded::Closed => {
                Self::store_failed(plan);
                return Next::respond(response::unavailable(self.store.retry_after_unavailable()));
            }
        };
        let lease = leased.lease.and_then(|id| {
            plan.take_lease_key().map(|key| LeaseGuard {
                shared: Arc::clone(self),
                key,
                id,
                local: !from_store,
            })
        });
        let plan = &*plan;
        let verdict = leased.verdict;
        // The headers report a rate limit: a lease's decision (after the limits') binds only
        // when it denies.
        let binding = if verdict.is_allowed() {
            let decisions = verdict.decisions();
            decisions[..rates.min(decisions.len())]
                .iter()
                .enumerate()
                .min_by_key(|(_, d)| d.remaining)
        } else {
            verdict.binding()
        };
        let Some((binding, decision)) = binding else {
            return Next::pass();
        };
        let decision = *decision;
        let binding = at.get(binding);
        if verdict.is_allowed() {
            count(plan, outcome::ALLOWED);
            tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::ALLOWED, "rate limit");
            return self.forward(plan, binding, decision, verdict.delay(), false, lease);
        }
        if plan.policy.is_shadow() {
            count(plan, outcome::SHADOW_LIMITED);
            tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::SHADOW_LIMITED, "rate limit");
            return self.forward(plan, binding, decision, Duration::ZERO, true, None);
        }
        self.refuse(plan, &verdict, at, binding, decision, from_store)
    }

    /// A denial by the store (or the fallback): 403 for a cost no limit can hold, else 429,
    /// remembered in the denied-until cache when exact.
    fn refuse(
        &self,
        plan: &Plan,
        verdict: &Verdict,
        at: &Indices,
        binding: usize,
        decision: Decision,
        from_store: bool,
    ) -> Next {
        if verdict.outcome() == Outcome::InsufficientCapacity {
            return Self::never(plan, verdict, at);
        }
        let violated: Vec<usize> = (0..verdict.decisions().len())
            .filter(|&i| !verdict.decisions()[i].is_allowed())
            .map(|i| at.get(i))
            .collect();
        // Only the store's denials are remembered: the cache is exact for the store that decided,
        // and a denial of the local fallback must not outlive the outage (once the circuit
        // closes, the store decides again). A full concurrency cap frees whenever a request
        // ends, so it is never remembered.
        let leases = violated.iter().any(|&i| plan.is_concurrency(i));
        if from_store
            && !leases
            && let Some(cache) = &self.denied
        {
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
            extension: self.decision_extension.then(|| {
                Box::new(RateLimitDecision {
                    tier: Arc::clone(plan.tier_name()),
                    policy: Arc::clone(plan.tier_name()),
                    decision: Decision {
                        outcome: Outcome::Allowed,
                        limit: plan.tier_limit().quota.limit(),
                        remaining: 0,
                        reset_after: Duration::ZERO,
                        retry_after: Duration::ZERO,
                        delay: Duration::ZERO,
                    },
                    store_error: true,
                })
            }),
            extra: None,
        }
    }

    /// A request costing more than one of its limits can ever hold: a 403 saying why.
    fn never(plan: &Plan, verdict: &Verdict, at: &Indices) -> Next {
        count(plan, outcome::LIMITED);
        tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::LIMITED, "rate limit: cost above capacity");
        let (i, d) = verdict
            .decisions()
            .iter()
            .enumerate()
            .find(|(_, d)| d.outcome == Outcome::InsufficientCapacity)
            .unwrap_or((0, &verdict.decisions()[0]));
        let i = at.get(i);
        Next::respond(response::too_costly(plan.cost_of(i), plan.name(i), d.limit))
    }

    fn forward(
        self: &Arc<Self>,
        plan: &Plan,
        binding: usize,
        decision: Decision,
        delay: Duration,
        shadow: bool,
        lease: Option<LeaseGuard>,
    ) -> Next {
        let extension = self.decision_extension.then(|| {
            Box::new(RateLimitDecision {
                tier: Arc::clone(plan.tier_name()),
                policy: Arc::clone(&plan.limit(binding).name),
                decision,
                store_error: false,
            })
        });
        let mode = plan.policy.header_mode();
        let slot = plan.slot(binding);
        let effective = match slot {
            Slot::Tier(_) => plan.effective().cloned(),
            _ => None,
        };
        let in_flight = self.adaptive.as_ref().map(|a| a.controller.start());
        // A route charging failures keeps a copy of the plan for the charge.
        let charge = plan.charges_failures().then(|| DeferredCharge {
            shared: Arc::clone(self),
            plan: plan.clone(),
        });
        // Without headers to write (or a shadow Retry-After to remove), nothing to do afterwards.
        let after = (mode != HeaderMode::None || shadow).then(|| After {
            mode,
            slot,
            policy: Arc::clone(&plan.policy),
            effective,
            decision,
            shadow,
        });
        // An `if`, not `bool::then`: a closure would take the (large) charge by value, a copy
        // on every request.
        let extra = if lease.is_some() || charge.is_some() || in_flight.is_some() {
            Some(Box::new(Extra {
                lease,
                charge,
                in_flight,
            }))
        } else {
            None
        };
        Next::Forward {
            after,
            delay,
            extension,
            extra,
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
        let names: Vec<&str> = violated.iter().map(|&i| plan.name(i)).collect();
        tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::LIMITED, cached, policy = plan.name(binding), "rate limit");
        if plan.is_concurrency(binding) {
            return Next::respond(response::too_many_in_flight(&names, decision.retry_after));
        }
        Next::respond(response::too_many_requests(
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

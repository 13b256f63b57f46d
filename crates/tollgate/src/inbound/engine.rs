//! The decision for one request: limits, store, failure policy, cache, metrics, the answer.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use tollgate_core::{Decision, Limit, Outcome, Verdict};

use super::denied::DeniedCache;
use super::identity::{Identity, Rejection, TIER_KEY_EXTRA};
use super::policy::{LimitInfo, Policy, PolicyHandle, Tier};
use crate::http::headers::{self, HeaderMode};
use crate::http::key::fingerprint;
use crate::http::problem;
use crate::limiter::guarded::{Guarded, GuardedStore};
use crate::metrics::{self as m, outcome};

/// The decision a handler can read from the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitDecision {
    /// The caller's tier.
    pub tier: Arc<str>,
    /// The policy closest to denial (the one reported in the headers).
    pub policy: Arc<str>,
    /// Its decision.
    pub decision: Decision,
    /// Whether the store failed and the failure policy let the request through.
    pub store_error: bool,
}

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
}

/// The headers to add to the response of a forwarded request.
#[derive(Debug, Clone)]
pub(crate) struct After {
    mode: HeaderMode,
    /// The policy of the request, and which of its limits the headers report.
    policy: Arc<Policy>,
    slot: Slot,
    decision: Decision,
    shadow: bool,
}

impl After {
    pub(crate) fn apply(&self, headers: &mut http::HeaderMap) {
        if let Some(limit) = self.slot.limit(&self.policy) {
            limit.headers.insert(headers, self.mode, &self.decision);
        }
        if self.shadow {
            // The request passed: no Retry-After on it.
            headers.remove(header::RETRY_AFTER);
        }
    }
}

/// One of the limits of a policy.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// The tier at this index.
    Tier(usize),
    /// The own limit of the route at this index.
    Route(usize),
    /// The whole-service limit.
    Global,
}

impl Slot {
    fn limit(self, policy: &Policy) -> Option<&Arc<LimitInfo>> {
        match self {
            Slot::Tier(i) => Some(&policy.tier_at(i).limit),
            Slot::Route(i) => policy.route_limit(i),
            Slot::Global => policy.global_limit(),
        }
    }
}

/// What to do with the request.
pub(crate) enum Next {
    /// Call the inner service (after `delay`), adding headers to its response.
    Forward {
        after: Option<After>,
        delay: Duration,
        extension: Option<RateLimitDecision>,
    },
    /// Answer without calling it.
    Respond(Response<Bytes>),
}

/// The limits of one request, owned so a decision can outlive the call that built it.
///
/// They are, in this order: the caller's tier, the route's own limit (if the request matched a
/// route that has one) and the whole-service limit (if the policy has one).
pub(crate) struct Plan {
    policy: Arc<Policy>,
    /// The caller's tier (an index into the policy's tiers).
    tier: usize,
    /// The route rule the request matched (an index into the policy's routes).
    route: Option<usize>,
    /// The tier's bucket key, `{<identity key>}:t:<tier>`, written around the identity key's own
    /// string: the identity key is `tier_key[1..=key_len]`.
    tier_key: String,
    key_len: usize,
    /// The bucket key of the route's own limit, `{<identity key>}:r:<route>`, when it has one.
    route_key: Option<String>,
    /// What the request costs against the tier and the route's limit.
    cost: u32,
}

/// The key of the whole-service limit.
const GLOBAL_KEY: &str = "global";

impl Plan {
    /// The identity key of the caller (logged only as its fingerprint).
    fn key(&self) -> &str {
        &self.tier_key[1..=self.key_len]
    }

    fn tier(&self) -> &Tier {
        self.policy.tier_at(self.tier)
    }

    fn tier_name(&self) -> &Arc<str> {
        &self.tier().limit.name
    }

    /// Which limit of the policy is at `index` in the order of the plan.
    fn slot(&self, index: usize) -> Slot {
        match (index, self.route, &self.route_key) {
            (0, _, _) => Slot::Tier(self.tier),
            (1, Some(route), Some(_)) => Slot::Route(route),
            _ => Slot::Global,
        }
    }

    /// The limit at `index` in the order of the plan.
    fn limit(&self, index: usize) -> &Arc<LimitInfo> {
        self.slot(index)
            .limit(&self.policy)
            .unwrap_or(&self.tier().limit)
    }

    /// What the request costs under the limit at `index`: the whole-service limit counts
    /// requests.
    fn cost_of(&self, index: usize) -> u32 {
        let global = 1 + usize::from(self.route_key.is_some());
        if index == global && self.policy.global_limit().is_some() {
            1
        } else {
            self.cost
        }
    }

    /// The limits to decide, in an array (the first `n` are used): no allocation.
    fn limits(&self) -> ([Limit<'_>; 3], usize) {
        let tier = Limit::new(&self.tier_key, &self.tier().limit.quota, self.cost);
        let mut limits = [tier; 3];
        let mut n = 1;
        if let Some(key) = &self.route_key
            && let Some(route) = self.route.and_then(|r| self.policy.route_limit(r))
        {
            limits[n] = Limit::new(key, &route.quota, self.cost);
            n += 1;
        }
        if let Some(global) = self.policy.global_limit() {
            limits[n] = Limit::new(GLOBAL_KEY, &global.quota, 1);
            n += 1;
        }
        (limits, n)
    }

    /// The key of the caller in the denied-until cache: what decided the denial, the caller's
    /// tier bucket (`{<key>}:t:<tier>`, so a caller moved to another tier is not answered by the
    /// old tier's denial) and the route. The cache also checks the policy's id (a reload).
    fn cache_key(&self) -> Cow<'_, str> {
        match self.route {
            Some(r) => Cow::Owned(format!(
                "{}\u{0}{}",
                self.tier_key,
                self.policy.route_at(r).name()
            )),
            None => Cow::Borrowed(&self.tier_key),
        }
    }

    fn cost(&self) -> u32 {
        self.cost
    }
}

fn problem_response(status: StatusCode, body: String) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(problem::PROBLEM_CONTENT_TYPE),
    );
    response
}

/// The 401 of a request whose credentials are not known.
fn unauthorized(detail: &str) -> Response<Bytes> {
    let mut response = problem_response(
        StatusCode::UNAUTHORIZED,
        problem::problem(401, "Unauthorized", detail),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

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
            Rejection::Unauthorized { detail } => unauthorized(detail),
            Rejection::BadRequest { detail } => problem_response(
                StatusCode::BAD_REQUEST,
                problem::problem(400, "Bad Request", detail),
            ),
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
        problem_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            problem::problem(500, "Rate Limiter Misconfigured", detail),
        )
    }

    /// Works out the limits of a request and what the cache or a store without I/O says; returns
    /// the plan to decide asynchronously otherwise.
    pub(crate) fn plan<B>(
        &self,
        policy: Arc<Policy>,
        identity: Identity,
        request: &Request<B>,
    ) -> Result<Next, Box<Plan>> {
        if policy.is_exempt_key(&identity.key) {
            return Ok(Next::Forward {
                after: None,
                delay: Duration::ZERO,
                extension: None,
            });
        }
        let Some(tier) = policy.tier_index(&identity.tier) else {
            let detail = format!(
                "The key extractor put the caller in tier `{}`, which the policy does not define.",
                identity.tier
            );
            return Ok(Next::Respond(self.misconfigured("unknown_tier", &detail)));
        };
        let route = policy.route_index(request.method(), request.uri().path());
        let cost = route.map_or(1, |r| policy.route_at(r).request_cost());
        // The caller's limits share a hash tag, so on Redis Cluster they are decided in one call;
        // the whole-service limit lives in its own slot.
        let tier_name = &policy.tier_at(tier).limit.name;
        let mut tier_key = identity.key;
        let key_len = tier_key.len();
        tier_key.reserve_exact(TIER_KEY_EXTRA + tier_name.len());
        tier_key.insert(0, '{');
        tier_key.push_str("}:t:");
        tier_key.push_str(tier_name);
        let route_key = route.filter(|&r| policy.route_limit(r).is_some()).map(|r| {
            let key = &tier_key[1..=key_len];
            let name = policy.route_at(r).name();
            let mut route_key = String::with_capacity(key.len() + name.len() + 5);
            route_key.push('{');
            route_key.push_str(key);
            route_key.push_str("}:r:");
            route_key.push_str(name);
            route_key
        });
        let plan = Plan {
            policy,
            tier,
            route,
            tier_key,
            key_len,
            route_key,
            cost,
        };
        if !plan.policy.is_shadow()
            && let Some(cache) = &self.denied
        {
            cache.follow(plan.policy.id());
            if !cache.is_empty() {
                let now = Instant::now();
                if let Some(denied) = cache.get(&plan.cache_key(), now, plan.policy.id()) {
                    let decision = denied.at(now);
                    return Ok(self.deny(&plan, denied.binding, &[denied.binding], decision, true));
                }
            }
        }
        let (limits, n) = plan.limits();
        match self.store.decide_now(&limits[..n]) {
            Some(answer) => Ok(self.finish(plan, answer)),
            None => Err(Box::new(plan)),
        }
    }

    /// Decides a plan on a store that does I/O, under the breaker, the timeout and the failure
    /// policy.
    pub(crate) async fn decide(self: Arc<Self>, plan: Box<Plan>) -> Next {
        let (limits, n) = plan.limits();
        let answer = self.store.decide(&limits[..n]).await;
        self.finish(*plan, answer)
    }

    /// Turns the store's (or the failure policy's) answer into what to do with the request.
    fn finish(&self, owned: Plan, answer: Guarded<Verdict>) -> Next {
        let plan = &owned;
        // `from_store`: the verdict is the store's own, not the local fallback's.
        let (verdict, from_store) = match answer {
            Guarded::Store(verdict) => (verdict, true),
            Guarded::Local(verdict) => (verdict, false),
            failure @ (Guarded::Open | Guarded::Closed) => {
                count(plan, outcome::STORE_ERROR);
                tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::STORE_ERROR, "rate limit");
                return match failure {
                    Guarded::Open => Next::Forward {
                        after: None,
                        delay: Duration::ZERO,
                        extension: Some(RateLimitDecision {
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
                    },
                    _ => {
                        let retry = self.store.retry_after_unavailable();
                        let mut response = problem_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            problem::problem(
                                503,
                                "Service Unavailable",
                                "The rate limiter cannot reach its store; try again shortly.",
                            ),
                        );
                        response
                            .headers_mut()
                            .insert(header::RETRY_AFTER, headers::retry_after_header(retry));
                        Next::Respond(response)
                    }
                };
            }
        };
        let Some((binding, decision)) = verdict.binding() else {
            return Next::Forward {
                after: None,
                delay: Duration::ZERO,
                extension: None,
            };
        };
        let decision = *decision;
        if verdict.is_allowed() {
            count(plan, outcome::ALLOWED);
            tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::ALLOWED, "rate limit");
            return Self::forward(owned, binding, decision, verdict.delay(), false);
        }
        if plan.policy.is_shadow() {
            count(plan, outcome::SHADOW_LIMITED);
            tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::SHADOW_LIMITED, "rate limit");
            return Self::forward(owned, binding, decision, Duration::ZERO, true);
        }
        if verdict.outcome() == Outcome::InsufficientCapacity {
            return self.never(plan, &verdict);
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

    /// A request costing more than one of its limits can ever hold: waiting never helps, so it is
    /// not a 429 (whose `Retry-After` promises a pass) but a 403 saying why.
    fn never(&self, plan: &Plan, verdict: &Verdict) -> Next {
        count(plan, outcome::LIMITED);
        tracing::debug!(tier = %plan.tier_name(), key = %KeyHash(plan.key()), outcome = outcome::LIMITED, "rate limit: cost above capacity");
        let (i, d) = verdict
            .decisions()
            .iter()
            .enumerate()
            .find(|(_, d)| d.outcome == Outcome::InsufficientCapacity)
            .unwrap_or((0, &verdict.decisions()[0]));
        let detail = format!(
            "This request costs {}, more than the policy \"{}\" can ever allow ({} at once).",
            plan.cost_of(i),
            plan.limit(i).name,
            d.limit
        );
        Next::Respond(problem_response(
            StatusCode::FORBIDDEN,
            problem::problem(403, "Request Too Costly", &detail),
        ))
    }

    fn forward(
        plan: Plan,
        binding: usize,
        decision: Decision,
        delay: Duration,
        shadow: bool,
    ) -> Next {
        let extension = RateLimitDecision {
            tier: Arc::clone(plan.tier_name()),
            policy: Arc::clone(&plan.limit(binding).name),
            decision,
            store_error: false,
        };
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
            extension: Some(extension),
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
        let mut response = problem_response(
            StatusCode::TOO_MANY_REQUESTS,
            problem::problem_json(&names, decision.retry_after),
        );
        plan.limit(binding).headers.insert(
            response.headers_mut(),
            plan.policy.header_mode(),
            &decision,
        );
        Next::Respond(response)
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

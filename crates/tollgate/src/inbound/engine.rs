//! The decision for one request: limits, store, failure policy, cache, metrics, the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use tollgate_core::{Decision, DynStore, Limit, MemoryStore, Outcome, Quota, StoreError, Verdict};

use super::identity::Identity;
use super::policy::Policy;
use crate::breaker::{Admission, CircuitBreaker};
use crate::client_ip::fingerprint;
use crate::denied::DeniedCache;
use crate::headers::{self, HeaderMode, RateLimitInfo};
use crate::metrics::{self as m, outcome};

/// What the layer does when the store fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// Let the request through (counted as `store_error`).
    FailOpen,
    /// Answer 503 with `Retry-After`.
    FailClosed,
    /// Decide in a local in-memory store while a circuit breaker keeps the failing store aside;
    /// the breaker probes it again and closes once it answers.
    #[default]
    Local,
}

impl std::str::FromStr for OnStoreError {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail_open" => Ok(OnStoreError::FailOpen),
            "fail_closed" => Ok(OnStoreError::FailClosed),
            "local" => Ok(OnStoreError::Local),
            other => Err(format!(
                "unknown on_error `{other}`: expected fail_open, fail_closed or local"
            )),
        }
    }
}

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
    pub(crate) store: Arc<dyn DynStore>,
    pub(crate) store_kind: &'static str,
    pub(crate) fallback: MemoryStore,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) on_error: OnStoreError,
    pub(crate) timeout: Duration,
    pub(crate) denied: Option<DeniedCache>,
    /// `rate_limiter_store_latency_seconds{store}`, registered on first use.
    pub(crate) latency: std::sync::OnceLock<metrics::Histogram>,
}

/// The headers to add to the response of a forwarded request.
#[derive(Debug, Clone)]
pub(crate) struct After {
    mode: HeaderMode,
    policy: Arc<str>,
    quota: Quota,
    decision: Decision,
    shadow: bool,
}

impl After {
    pub(crate) fn apply(&self, headers: &mut http::HeaderMap) {
        headers::insert_headers(
            headers,
            self.mode,
            &RateLimitInfo {
                policy: &self.policy,
                quota: &self.quota,
                decision: &self.decision,
            },
        );
        if self.shadow {
            // The request passed: no Retry-After on it.
            headers.remove(header::RETRY_AFTER);
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
pub(crate) struct Plan {
    policy: Arc<Policy>,
    tier: Arc<str>,
    keys: Vec<String>,
    quotas: Vec<Quota>,
    costs: Vec<u32>,
    names: Vec<Arc<str>>,
    cache_key: String,
    /// The identity key, logged only as its fingerprint.
    key: KeyHash,
}

impl Plan {
    fn limits(&self) -> Vec<Limit<'_>> {
        self.keys
            .iter()
            .zip(&self.quotas)
            .zip(&self.costs)
            .map(|((k, q), &c)| Limit::new(k, q, c))
            .collect()
    }

    fn cost(&self) -> u32 {
        self.costs.first().copied().unwrap_or(0)
    }
}

fn problem_response(status: StatusCode, body: String) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(headers::PROBLEM_CONTENT_TYPE),
    );
    response
}

/// The 401 of a request whose credentials are not known.
pub(crate) fn unauthorized(detail: &str) -> Response<Bytes> {
    let mut response = problem_response(
        StatusCode::UNAUTHORIZED,
        headers::problem(401, "Unauthorized", detail),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn count(plan: &Plan, outcome: &'static str) {
    let Some(tm) = plan.policy.tier_metrics(&plan.tier) else {
        return;
    };
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
    if let Some(tm) = plan.policy.tier_metrics(&plan.tier) {
        tm.breaches.increment(1);
    }
}

impl Shared {
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
        let Some((tier, tier_quota)) = policy.tier(&identity.tier) else {
            return Ok(Next::Respond(unauthorized(
                "The caller's tier is not configured.",
            )));
        };
        let route = policy.route(request.method(), request.uri().path());
        let cost = route.map_or(1, |r| r.request_cost());
        // The caller's limits share a hash tag, so on Redis Cluster they are decided in one call;
        // the whole-service limit lives in its own slot.
        let mut keys = vec![format!("{{{}}}:t:{tier}", identity.key)];
        let mut quotas = vec![*tier_quota];
        let mut costs = vec![cost];
        let mut names = vec![Arc::clone(tier)];
        if let Some(route) = route
            && let Some(quota) = route.quota()
        {
            keys.push(format!("{{{}}}:r:{}", identity.key, route.name()));
            quotas.push(*quota);
            costs.push(cost);
            names.push(Arc::clone(route.shared_name()));
        }
        if let Some(global) = policy.global() {
            keys.push("global".to_owned());
            quotas.push(*global);
            costs.push(1);
            names.push(Arc::clone(policy.global_name()));
        }
        let plan = Plan {
            tier: Arc::clone(tier),
            cache_key: match route {
                Some(r) => format!("{}\u{0}{}", identity.key, r.name()),
                None => identity.key.clone(),
            },
            key: KeyHash(identity.key),
            policy,
            keys,
            quotas,
            costs,
            names,
        };
        if !plan.policy.is_shadow()
            && let Some(cache) = &self.denied
            && let Some(denied) = cache.get(&plan.cache_key, Instant::now())
        {
            let decision = denied.at(Instant::now());
            return Ok(self.deny(&plan, denied.binding, &[denied.binding], decision, true));
        }
        let started = Instant::now();
        match self.store.decide_now_dyn(&plan.limits()) {
            Some(result) => {
                self.latency().record(started.elapsed().as_secs_f64());
                let from_store = result.is_ok();
                let result = result.or_else(|e| self.on_failure(&plan, &e, Admission::Store));
                Ok(self.finish(&plan, result, from_store))
            }
            None => Err(Box::new(plan)),
        }
    }

    /// Decides a plan on a store that does I/O, under the breaker, the timeout and the failure
    /// policy.
    pub(crate) async fn decide(self: Arc<Self>, plan: Box<Plan>) -> Next {
        let admission = self.breaker.admit();
        let mut from_store = false;
        let result = match admission {
            Admission::Fallback => self.unavailable(&plan),
            Admission::Store | Admission::Probe => {
                let started = Instant::now();
                let limits = plan.limits();
                let outcome = tokio::time::timeout(self.timeout, self.store.decide_boxed(&limits))
                    .await
                    .unwrap_or_else(|_| Err(StoreError::timeout()));
                self.latency().record(started.elapsed().as_secs_f64());
                match outcome {
                    Ok(verdict) => {
                        self.breaker.on_success(admission);
                        self.circuit_gauge();
                        from_store = true;
                        Ok(verdict)
                    }
                    Err(e) => self.on_failure(&plan, &e, admission),
                }
            }
        };
        self.finish(&plan, result, from_store)
    }

    fn latency(&self) -> &metrics::Histogram {
        self.latency.get_or_init(
            || metrics::histogram!(m::STORE_LATENCY_SECONDS, "store" => self.store_kind),
        )
    }

    fn circuit_gauge(&self) {
        metrics::gauge!(m::CIRCUIT_OPEN, "store" => self.store_kind)
            .set(if self.breaker.is_open() { 1.0 } else { 0.0 });
    }

    fn on_failure(
        &self,
        plan: &Plan,
        error: &StoreError,
        admission: Admission,
    ) -> Result<Verdict, Failure> {
        metrics::counter!(m::STORE_ERRORS_TOTAL, "store" => self.store_kind).increment(1);
        tracing::warn!(store = self.store_kind, error = %error, "rate-limit store failed");
        self.breaker.on_failure(admission);
        self.circuit_gauge();
        self.unavailable(plan)
    }

    fn unavailable(&self, plan: &Plan) -> Result<Verdict, Failure> {
        match self.on_error {
            OnStoreError::Local => Ok(self.fallback.decide_now(&plan.limits())),
            OnStoreError::FailOpen => Err(Failure::Open),
            OnStoreError::FailClosed => Err(Failure::Closed),
        }
    }

    /// `from_store`: the verdict is the store's own, not the local fallback's.
    fn finish(&self, plan: &Plan, result: Result<Verdict, Failure>, from_store: bool) -> Next {
        let verdict = match result {
            Ok(verdict) => verdict,
            Err(failure) => {
                count(plan, outcome::STORE_ERROR);
                tracing::debug!(tier = %plan.tier, key = %plan.key, outcome = outcome::STORE_ERROR, "rate limit");
                return match failure {
                    Failure::Open => Next::Forward {
                        after: None,
                        delay: Duration::ZERO,
                        extension: Some(RateLimitDecision {
                            tier: Arc::clone(&plan.tier),
                            policy: Arc::clone(&plan.tier),
                            decision: Decision {
                                outcome: Outcome::Allowed,
                                limit: plan.quotas[0].limit(),
                                remaining: 0,
                                reset_after: Duration::ZERO,
                                retry_after: Duration::ZERO,
                                delay: Duration::ZERO,
                            },
                            store_error: true,
                        }),
                    },
                    Failure::Closed => {
                        let retry = self.breaker.config().open_for.max(Duration::from_secs(1));
                        let mut response = problem_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            headers::problem(
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
            tracing::debug!(tier = %plan.tier, key = %plan.key, outcome = outcome::ALLOWED, "rate limit");
            return self.forward(plan, binding, decision, verdict.delay(), false);
        }
        if plan.policy.is_shadow() {
            count(plan, outcome::SHADOW_LIMITED);
            tracing::debug!(tier = %plan.tier, key = %plan.key, outcome = outcome::SHADOW_LIMITED, "rate limit");
            return self.forward(plan, binding, decision, Duration::ZERO, true);
        }
        if verdict.outcome() == Outcome::InsufficientCapacity {
            return self.never(plan, &verdict);
        }
        // Only the store's denials are remembered: the cache is exact for the store that decided,
        // and a denial of the local fallback must not outlive the outage (once the circuit
        // closes, the store decides again).
        if from_store && let Some(cache) = &self.denied {
            cache.insert(
                &plan.cache_key,
                Instant::now(),
                decision,
                binding,
                verdict.retry_after(),
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
        tracing::debug!(tier = %plan.tier, key = %plan.key, outcome = outcome::LIMITED, "rate limit: cost above capacity");
        let (i, d) = verdict
            .decisions()
            .iter()
            .enumerate()
            .find(|(_, d)| d.outcome == Outcome::InsufficientCapacity)
            .unwrap_or((0, &verdict.decisions()[0]));
        let detail = format!(
            "This request costs {}, more than the policy \"{}\" can ever allow ({} at once).",
            plan.costs[i], plan.names[i], d.limit
        );
        Next::Respond(problem_response(
            StatusCode::FORBIDDEN,
            headers::problem(403, "Request Too Costly", &detail),
        ))
    }

    fn forward(
        &self,
        plan: &Plan,
        binding: usize,
        decision: Decision,
        delay: Duration,
        shadow: bool,
    ) -> Next {
        let policy = Arc::clone(&plan.names[binding]);
        Next::Forward {
            after: Some(After {
                mode: plan.policy.header_mode(),
                policy: Arc::clone(&policy),
                quota: plan.quotas[binding],
                decision,
                shadow,
            }),
            delay,
            extension: Some(RateLimitDecision {
                tier: Arc::clone(&plan.tier),
                policy,
                decision,
                store_error: false,
            }),
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
        tracing::debug!(tier = %plan.tier, key = %plan.key, outcome = outcome::LIMITED, cached, "rate limit");
        let name = &plan.names[binding];
        let names: Vec<&str> = violated.iter().map(|&i| &*plan.names[i]).collect();
        let mut response = problem_response(
            StatusCode::TOO_MANY_REQUESTS,
            headers::problem_json(&names, decision.retry_after),
        );
        headers::insert_headers(
            response.headers_mut(),
            plan.policy.header_mode(),
            &RateLimitInfo {
                policy: name,
                quota: &plan.quotas[binding],
                decision: &decision,
            },
        );
        Next::Respond(response)
    }
}

/// A caller's key in logs: shown as its 128-bit fingerprint, computed only when a log line is
/// actually written (never the raw key, which may be an API key).
struct KeyHash(String);

impl std::fmt::Display for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", fingerprint(self.0.as_bytes()))
    }
}

/// The failure policy's answer when it does not decide locally.
enum Failure {
    Open,
    Closed,
}

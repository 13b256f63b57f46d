//! [`Policy`]: what the inbound layer enforces — tiers, per-route costs and limits, the
//! whole-service limit, headers, shadow mode and exemptions.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Method;
use tollgate_core::Quota;

use super::adaptive::AdaptiveConfig;
use crate::http::headers::{HeaderMode, PolicyHeaders};
use crate::metrics::TierMetrics;

/// A path pattern: `/api/reports` matches that path exactly; `/api/*` matches `/api` and
/// everything below it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPattern {
    path: String,
    prefix: bool,
}

impl PathPattern {
    /// Parses `pattern`: a trailing `/*` makes it a prefix match.
    pub fn new(pattern: &str) -> PathPattern {
        match pattern.strip_suffix("/*") {
            Some(base) => PathPattern {
                path: base.to_owned(),
                prefix: true,
            },
            None => PathPattern {
                path: pattern.to_owned(),
                prefix: false,
            },
        }
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        if self.prefix {
            path.strip_prefix(self.path.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        } else {
            path == self.path
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if self.prefix {
            f.write_str("/*")?;
        }
        Ok(())
    }
}

/// When a route's own limits are charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Charge {
    /// On every request that passes (the default).
    #[default]
    Always,
    /// Only when the response status is 400 or more (brute-force protection: only failed logins
    /// count). The route's limits are still checked before the request: a caller with nothing
    /// left is denied. The tier and whole-service limits are charged as for any request.
    ///
    /// The check and the charge are two store calls, so requests in flight at once can pass the
    /// check together: at most the limit plus the number of such requests in flight fail before
    /// the limit denies (a tier's [`concurrency`](PolicyBuilder::concurrency) bounds that).
    Failures,
}

/// A per-route rule: the cost of a request to it, and optional extra limits: one per caller
/// (the same for every tier, or one per tier) and one shared by every caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    method: Option<Method>,
    path: PathPattern,
    cost: u32,
    limit: Option<Quota>,
    by_tier: Vec<(Arc<str>, Quota)>,
    shared: Option<Quota>,
    charge: Charge,
    name: Arc<str>,
}

impl Route {
    /// A rule for `path` (any method) with cost 1 and no extra limit.
    pub fn new(path: &str) -> Route {
        let path = PathPattern::new(path);
        Route {
            name: format!("route:{path}").into(),
            method: None,
            path,
            cost: 1,
            limit: None,
            by_tier: Vec::new(),
            shared: None,
            charge: Charge::Always,
        }
    }

    /// Only requests with this method.
    pub fn method(mut self, method: Method) -> Route {
        self.name = format!("route:{method} {}", self.path).into();
        self.method = Some(method);
        self
    }

    /// What a request to the route costs against the caller's tier and the route's own limit
    /// (the whole-service limit counts requests). 0 makes the route free.
    pub fn cost(mut self, cost: u32) -> Route {
        self.cost = cost;
        self
    }

    /// An extra limit for the route, per caller, on top of the tier.
    pub fn limit(mut self, quota: Quota) -> Route {
        self.limit = Some(quota);
        self
    }

    /// The per-caller route limit for callers of `tier`, instead of [`limit`](Route::limit) (which
    /// still applies to the tiers not named).
    pub fn tier_limit(mut self, tier: &str, quota: Quota) -> Route {
        match self.by_tier.iter_mut().find(|(name, _)| **name == *tier) {
            Some(entry) => entry.1 = quota,
            None => self.by_tier.push((tier.into(), quota)),
        }
        self
    }

    /// One limit for the route across all callers (seed 004's per-endpoint limit), decided with
    /// the caller's own limits, all or nothing. On Redis Cluster it lives in its own slot, like
    /// the whole-service limit.
    pub fn shared_limit(mut self, quota: Quota) -> Route {
        self.shared = Some(quota);
        self
    }

    /// When the route's own limits are charged (see [`Charge`]).
    pub fn charge(mut self, charge: Charge) -> Route {
        self.charge = charge;
        self
    }

    /// The policy name reported in headers and metrics, such as `route:/api/search`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cost of a request to this route.
    pub fn request_cost(&self) -> u32 {
        self.cost
    }

    /// The route's own limit, if any.
    pub fn quota(&self) -> Option<&Quota> {
        self.limit.as_ref()
    }

    /// The route's limit shared by all callers, if any.
    pub fn shared_quota(&self) -> Option<&Quota> {
        self.shared.as_ref()
    }

    /// When the route's own limits are charged.
    pub fn charges(&self) -> Charge {
        self.charge
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && self.path.matches(path)
    }
}

/// A configuration mistake found while building a [`Policy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A tier name used twice.
    #[error("tier `{0}` is defined twice")]
    DuplicateTier(String),
    /// A route's cost exceeds what its own limit or the caller's tier could ever hold.
    #[error("route `{route}` costs {cost}, more than its limit can ever hold ({limit})")]
    CostTooHigh {
        /// The route's name.
        route: String,
        /// Its cost.
        cost: u32,
        /// The limit it exceeds.
        limit: u32,
    },
    /// A tier named by a route's per-tier limits, the concurrency caps or the adaptive priority
    /// that the policy does not define.
    #[error("{place} names tier `{tier}`, which the policy does not define")]
    UnknownTier {
        /// Where it is named.
        place: String,
        /// The tier.
        tier: String,
    },
    /// Adaptive limits set up wrong.
    #[error("adaptive: {0}")]
    Adaptive(String),
    /// A concurrency cap of 0, or a lease time of 0.
    #[error("tier `{0}`: a concurrency cap and its lease time must be more than 0")]
    ZeroConcurrency(String),
    /// More tiers, or more routes, than a policy holds.
    #[error("a policy holds at most {max} {what}; this one has {count}")]
    TooMany {
        /// `tiers` or `routes`.
        what: &'static str,
        /// How many it has.
        count: usize,
        /// The most it may have.
        max: usize,
    },
}

/// The most tiers, and the most routes, a policy holds: a request's plan keeps their indices in
/// 16 bits, which keeps the plan small enough to move without a copy loop.
pub(crate) const MAX_RULES: usize = u16::MAX as usize;

/// Everything the inbound layer enforces, immutable once built; swap a whole new one in with
/// [`PolicyHandle::set`] (a configuration reload keeps the bucket state, which lives in the store).
///
/// ```
/// use http::Method;
/// use std::time::Duration;
/// use tollgate::inbound::{Policy, Route};
/// use tollgate::core::Quota;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = Policy::builder()
///     .tier("anonymous", Quota::per_minute(10)?.with_burst(5)?)
///     .tier("basic", Quota::per_minute(100)?.with_burst(20)?)
///     .route(Route::new("/api/reports").method(Method::POST).cost(5))
///     .route(Route::new("/api/search").limit(Quota::per_minute(30)?.with_burst(10)?))
///     .global(Quota::per_second(1000)?.with_burst(2000)?)
///     .exempt_path("/healthz")
///     .build()?;
/// assert!(policy.tier("basic").is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    /// The tiers, in the order given; found by name with a scan (see [`Policy::tier_index`]).
    tiers: Vec<Tier>,
    routes: Vec<Route>,
    /// The own limits of each route (same index as `routes`).
    route_limits: Vec<RouteLimits>,
    global: Option<Arc<LimitInfo>>,
    headers: HeaderMode,
    shadow: bool,
    exempt_paths: Vec<PathPattern>,
    exempt_keys: HashSet<String>,
    adaptive: Option<Arc<AdaptivePolicy>>,
    /// Unique per built policy (clones share it): what state derived from a policy, such as the
    /// denied-until cache, checks to follow a reload.
    id: u64,
}

/// The id of the next policy built.
static NEXT_POLICY_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Debug, Clone)]
pub(crate) struct Tier {
    pub(crate) limit: Arc<LimitInfo>,
    /// The cap on the caller's requests in flight, if the tier has one.
    pub(crate) concurrency: Option<Arc<Concurrency>>,
    /// Registered on the tier's first request (a recorder installed after the policy was built
    /// still gets them).
    metrics: OnceLock<TierMetrics>,
}

/// A tier's cap on the requests of one caller in flight at once.
#[derive(Debug)]
pub(crate) struct Concurrency {
    /// `concurrency:<tier>`: the policy named in bodies and logs.
    pub(crate) name: Arc<str>,
    pub(crate) max: u32,
    /// How long a lease lives if it is never given back (a server that died holding it).
    pub(crate) lease: Duration,
}

/// The default lease time of a concurrency cap: a request running longer stops counting.
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_secs(60);

/// The adaptive limits of a policy: the controller's settings and the tiers it may lower.
#[derive(Debug)]
pub(crate) struct AdaptivePolicy {
    pub(crate) config: AdaptiveConfig,
    /// The tiers it may lower, lowest priority (lowered first) first.
    pub(crate) priority: Vec<Arc<str>>,
}

/// The own limits of one route.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteLimits {
    /// The per-caller limit for tiers without one of their own.
    own: Option<Arc<LimitInfo>>,
    /// The per-caller limit by tier index (empty when the route has none per tier).
    by_tier: Vec<Option<Arc<LimitInfo>>>,
    /// The limit shared by every caller, with its bucket key.
    pub(crate) shared: Option<(Arc<LimitInfo>, Box<str>)>,
}

impl RouteLimits {
    /// The per-caller limit for the tier at `tier`.
    pub(crate) fn per_caller(&self, tier: usize) -> Option<&Arc<LimitInfo>> {
        match self.by_tier.get(tier) {
            Some(Some(limit)) => Some(limit),
            _ => self.own.as_ref(),
        }
    }
}

impl Tier {
    /// The tier's metric handles (registered on first use).
    pub(crate) fn metrics(&self) -> &TierMetrics {
        self.metrics
            .get_or_init(|| TierMetrics::register(&self.limit.name))
    }
}

/// One limit of a policy (a tier, a route's own limit or the whole-service limit): its name, its
/// quota and the parts of its rate-limit headers that never change.
#[derive(Debug)]
pub(crate) struct LimitInfo {
    /// The name reported in headers, bodies and metrics.
    pub(crate) name: Arc<str>,
    pub(crate) quota: Quota,
    pub(crate) headers: PolicyHeaders,
}

impl LimitInfo {
    pub(crate) fn new(name: Arc<str>, quota: Quota) -> Arc<LimitInfo> {
        Arc::new(LimitInfo {
            headers: PolicyHeaders::new(&name, &quota),
            name,
            quota,
        })
    }
}

/// Builds a [`Policy`].
#[derive(Debug, Clone, Default)]
pub struct PolicyBuilder {
    tiers: Vec<(Arc<str>, Quota)>,
    concurrency: Vec<(String, u32, Duration)>,
    routes: Vec<Route>,
    global: Option<Quota>,
    headers: HeaderMode,
    shadow: bool,
    exempt_paths: Vec<PathPattern>,
    exempt_keys: HashSet<String>,
    adaptive: Option<(AdaptiveConfig, Vec<String>)>,
}

impl PolicyBuilder {
    /// Adaptive limits: under load (see [`AdaptiveConfig`]) the tiers in `priority` have their
    /// rates lowered, the first named first, and restored as the load falls, never above their
    /// quotas. Tiers not named are never lowered.
    pub fn adaptive(mut self, config: AdaptiveConfig, priority: &[&str]) -> Self {
        self.adaptive = Some((config, priority.iter().map(|s| (*s).to_owned()).collect()));
        self
    }

    /// Adds a tier: callers resolved to `name` are limited by `quota`.
    pub fn tier(mut self, name: &str, quota: Quota) -> Self {
        self.tiers.push((name.into(), quota));
        self
    }

    /// Caps the requests of one caller of `tier` in flight at once, fleet-wide on a shared
    /// store: at most `max`; one more is answered 429 with `Retry-After: 1`. A request holds a
    /// lease from the decision until its response body ends (or is dropped); a lease never given
    /// back (its server died) expires after `lease` ([`DEFAULT_LEASE_TIME`] is a good start). A
    /// request running longer than `lease` stops counting: the lease time bounds how long a
    /// request is counted, so set it above the slowest response you serve.
    pub fn concurrency(mut self, tier: &str, max: u32, lease: Duration) -> Self {
        self.concurrency.push((tier.to_owned(), max, lease));
        self
    }

    /// Adds a route rule; the first rule matching a request applies.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// A whole-service limit, shared by every caller, checked together with the tier.
    pub fn global(mut self, quota: Quota) -> Self {
        self.global = Some(quota);
        self
    }

    /// Which rate-limit headers responses carry (default: both families).
    pub fn headers(mut self, mode: HeaderMode) -> Self {
        self.headers = mode;
        self
    }

    /// Shadow mode: decide, count and send headers, but never deny.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Requests to this path pattern are never limited (and carry no headers).
    pub fn exempt_path(mut self, pattern: &str) -> Self {
        self.exempt_paths.push(PathPattern::new(pattern));
        self
    }

    /// Callers with this identity key (see [`Identity::key`](super::Identity)) are never limited.
    pub fn exempt_key(mut self, key: impl Into<String>) -> Self {
        self.exempt_keys.insert(key.into());
        self
    }

    /// Checks and builds the policy.
    pub fn build(self) -> Result<Policy, PolicyError> {
        for (what, count) in [("tiers", self.tiers.len()), ("routes", self.routes.len())] {
            if count > MAX_RULES {
                return Err(PolicyError::TooMany {
                    what,
                    count,
                    max: MAX_RULES,
                });
            }
        }
        let mut tiers: Vec<Tier> = Vec::with_capacity(self.tiers.len());
        for (name, quota) in self.tiers {
            if tiers.iter().any(|t| t.limit.name == name) {
                return Err(PolicyError::DuplicateTier(name.to_string()));
            }
            tiers.push(Tier {
                limit: LimitInfo::new(name, quota),
                concurrency: None,
                metrics: OnceLock::new(),
            });
        }
        for (tier, max, lease) in self.concurrency {
            let Some(at) = tiers.iter().position(|t| *t.limit.name == *tier) else {
                return Err(PolicyError::UnknownTier {
                    place: "a concurrency cap".into(),
                    tier,
                });
            };
            if max == 0 || lease.is_zero() {
                return Err(PolicyError::ZeroConcurrency(tier));
            }
            tiers[at].concurrency = Some(Arc::new(Concurrency {
                name: format!("concurrency:{tier}").into(),
                max,
                lease,
            }));
        }
        let mut route_limits = Vec::with_capacity(self.routes.len());
        for route in &self.routes {
            let quotas = route
                .limit
                .iter()
                .chain(route.shared.iter())
                .chain(route.by_tier.iter().map(|(_, q)| q));
            for quota in quotas {
                if route.cost > quota.limit() {
                    return Err(PolicyError::CostTooHigh {
                        route: route.name.to_string(),
                        cost: route.cost,
                        limit: quota.limit(),
                    });
                }
            }
            let mut limits = RouteLimits {
                own: route
                    .limit
                    .map(|quota| LimitInfo::new(Arc::clone(&route.name), quota)),
                by_tier: Vec::new(),
                shared: route.shared.map(|quota| {
                    let name: Arc<str> = format!("shared:{}", &route.name["route:".len()..]).into();
                    let key = format!("s:{name}").into_boxed_str();
                    (LimitInfo::new(name, quota), key)
                }),
            };
            if !route.by_tier.is_empty() {
                limits.by_tier = vec![None; tiers.len()];
                for (tier, quota) in &route.by_tier {
                    let Some(at) = tiers.iter().position(|t| t.limit.name == *tier) else {
                        return Err(PolicyError::UnknownTier {
                            place: format!("the per-tier limits of `{}`", route.name),
                            tier: tier.to_string(),
                        });
                    };
                    limits.by_tier[at] = Some(LimitInfo::new(Arc::clone(&route.name), *quota));
                }
            }
            route_limits.push(limits);
        }
        let adaptive = match self.adaptive {
            None => None,
            Some((config, names)) => {
                config
                    .validate()
                    .map_err(|e| PolicyError::Adaptive(e.to_string()))?;
                let mut priority: Vec<Arc<str>> = Vec::with_capacity(names.len());
                for name in names {
                    let Some(at) = tiers.iter().position(|t| *t.limit.name == *name) else {
                        return Err(PolicyError::UnknownTier {
                            place: "the adaptive priority".into(),
                            tier: name,
                        });
                    };
                    if priority.contains(&tiers[at].limit.name) {
                        return Err(PolicyError::Adaptive(format!(
                            "tier `{name}` is named twice in the priority"
                        )));
                    }
                    priority.push(Arc::clone(&tiers[at].limit.name));
                }
                Some(Arc::new(AdaptivePolicy { config, priority }))
            }
        };
        Ok(Policy {
            adaptive,
            tiers,
            routes: self.routes,
            route_limits,
            global: self
                .global
                .map(|quota| LimitInfo::new("global".into(), quota)),
            headers: self.headers,
            shadow: self.shadow,
            exempt_paths: self.exempt_paths,
            exempt_keys: self.exempt_keys,
            id: NEXT_POLICY_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
}

impl Policy {
    /// Starts a policy.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// The quota of a tier, with its shared name.
    pub fn tier(&self, name: &str) -> Option<(&Arc<str>, &Quota)> {
        let tier = &self.tiers[self.tier_index(name)?];
        Some((&tier.limit.name, &tier.limit.quota))
    }

    /// The index of a tier, for [`tier_at`](Policy::tier_at).
    ///
    /// A scan, not a map: a policy has a handful of tiers (`anonymous`, `free`, `basic`, `pro`,
    /// ...: quota classes, not callers), and comparing a few short names is cheaper than hashing
    /// one, with nothing to keep in step with `tiers`.
    pub(crate) fn tier_index(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| *t.limit.name == *name)
    }

    /// The tier at `index` (from [`tier_index`](Policy::tier_index)).
    pub(crate) fn tier_at(&self, index: usize) -> &Tier {
        &self.tiers[index]
    }

    /// The first route rule matching a request.
    pub fn route(&self, method: &Method, path: &str) -> Option<&Route> {
        self.route_index(method, path).map(|i| &self.routes[i])
    }

    /// The index of the first route rule matching a request.
    pub(crate) fn route_index(&self, method: &Method, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.matches(method, path))
    }

    /// The route rule at `index` (from [`route_index`](Policy::route_index)).
    pub(crate) fn route_at(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// The own limits of the route at `index`.
    pub(crate) fn route_limits(&self, index: usize) -> &RouteLimits {
        &self.route_limits[index]
    }

    /// The whole-service limit.
    pub fn global(&self) -> Option<&Quota> {
        self.global.as_ref().map(|g| &g.quota)
    }

    /// The whole-service limit, with its name and headers.
    pub(crate) fn global_limit(&self) -> Option<&Arc<LimitInfo>> {
        self.global.as_ref()
    }

    /// The header mode.
    pub fn header_mode(&self) -> HeaderMode {
        self.headers
    }

    /// Whether the policy only observes.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// Whether requests to `path` are exempt.
    pub fn is_exempt_path(&self, path: &str) -> bool {
        self.exempt_paths.iter().any(|p| p.matches(path))
    }

    /// Whether the identity key is exempt.
    pub fn is_exempt_key(&self, key: &str) -> bool {
        self.exempt_keys.contains(key)
    }

    /// The adaptive limits, if the policy has them.
    pub(crate) fn adaptive(&self) -> Option<&Arc<AdaptivePolicy>> {
        self.adaptive.as_ref()
    }

    /// Unique per built policy: a reload installs another id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// A shared, replaceable [`Policy`]: the layer reads it on every request; a reload swaps it.
///
/// Clones share one slot. Reading it takes no lock (an [`ArcSwap`]), so requests never wait for
/// each other or for a reload.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    current: Arc<ArcSwap<Policy>>,
}

impl PolicyHandle {
    /// A handle holding `policy`.
    pub fn new(policy: Policy) -> PolicyHandle {
        PolicyHandle {
            current: Arc::new(ArcSwap::from_pointee(policy)),
        }
    }

    /// The policy in force.
    pub fn get(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Replaces the policy; requests already in flight finish with the old one. Bucket state is
    /// kept (keys do not depend on the quotas).
    pub fn set(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_patterns() {
        let exact = PathPattern::new("/api/search");
        assert!(exact.matches("/api/search"));
        assert!(!exact.matches("/api/search/x"));
        let prefix = PathPattern::new("/api/*");
        assert!(prefix.matches("/api"));
        assert!(prefix.matches("/api/search"));
        assert!(!prefix.matches("/apis"));
        assert_eq!(prefix.to_string(), "/api/*");
    }

    #[test]
    fn first_matching_route_wins() {
        let policy = Policy::builder()
            .route(Route::new("/api/reports").method(Method::POST).cost(5))
            .route(Route::new("/api/*").cost(2))
            .build()
            .unwrap();
        let post = policy.route(&Method::POST, "/api/reports").unwrap();
        assert_eq!(
            (post.request_cost(), post.name()),
            (5, "route:POST /api/reports")
        );
        assert_eq!(
            policy
                .route(&Method::GET, "/api/reports")
                .unwrap()
                .request_cost(),
            2
        );
        assert!(policy.route(&Method::GET, "/other").is_none());
    }

    #[test]
    fn mistakes_are_errors() {
        let q = Quota::per_second(1).unwrap();
        assert_eq!(
            Policy::builder()
                .tier("a", q)
                .tier("a", q)
                .build()
                .unwrap_err(),
            PolicyError::DuplicateTier("a".into())
        );
        assert!(matches!(
            Policy::builder()
                .route(Route::new("/x").cost(3).limit(q))
                .build(),
            Err(PolicyError::CostTooHigh { .. })
        ));
    }

    /// A plan keeps tier and route indices in 16 bits: a policy with more is refused, not
    /// decided with indices cut short.
    #[test]
    fn more_tiers_or_routes_than_a_plan_indexes_are_refused() {
        let q = Quota::per_second(1).unwrap();
        let routes = (0..=MAX_RULES).fold(Policy::builder().tier("a", q), |b, i| {
            b.route(Route::new(&format!("/r{i}")))
        });
        assert_eq!(
            routes.build().unwrap_err(),
            PolicyError::TooMany {
                what: "routes",
                count: MAX_RULES + 1,
                max: MAX_RULES
            }
        );
        let tiers = (0..=MAX_RULES).fold(Policy::builder(), |b, i| b.tier(&format!("t{i}"), q));
        assert!(matches!(
            tiers.build(),
            Err(PolicyError::TooMany { what: "tiers", .. })
        ));
        let most = (0..MAX_RULES).fold(Policy::builder().tier("a", q), |b, i| {
            b.route(Route::new(&format!("/r{i}")))
        });
        let policy = most.build().expect("the most routes a policy holds");
        assert_eq!(
            policy.route_index(&Method::GET, "/r65534"),
            Some(MAX_RULES - 1)
        );
    }

    #[test]
    fn tiers_are_found_by_name_however_many() {
        let q = Quota::per_second(1).unwrap();
        let names: Vec<String> = (0..40).map(|i| format!("tier-{i}")).collect();
        let policy = names
            .iter()
            .fold(Policy::builder(), |b, name| b.tier(name, q))
            .build()
            .unwrap();
        for (i, name) in names.iter().enumerate() {
            assert_eq!(policy.tier_index(name), Some(i));
            assert_eq!(policy.tier(name).map(|(n, _)| &**n), Some(name.as_str()));
        }
        assert_eq!(policy.tier_index("tier-40"), None);
        assert_eq!(policy.tier_index(""), None);
        // A duplicate far down the list is still one.
        let twice = names
            .iter()
            .chain(std::iter::once(&names[30]))
            .fold(Policy::builder(), |b, name| b.tier(name, q))
            .build();
        assert_eq!(
            twice.unwrap_err(),
            PolicyError::DuplicateTier("tier-30".into())
        );
    }

    #[test]
    fn handle_swaps() {
        let handle = PolicyHandle::new(Policy::builder().build().unwrap());
        assert!(!handle.get().is_shadow());
        let clone = handle.clone();
        let before = handle.get();
        handle.set(Policy::builder().shadow(true).build().unwrap());
        assert!(handle.get().is_shadow());
        // Every clone sees the new one; a policy taken before keeps the old one.
        assert!(clone.get().is_shadow());
        assert!(!before.is_shadow());
    }
}

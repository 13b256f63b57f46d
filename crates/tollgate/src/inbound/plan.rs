//! [`Plan`]: the limits of one request (the caller's tier, the route's own limits, the
//! whole-service limit, the tier's concurrency cap), with their bucket keys and costs.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;
use tollgate_core::{Lease, Limit};

use super::identity::TIER_KEY_EXTRA;
use super::policy::{Charge, LimitInfo, Policy, Tier};

/// One of the limits of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The caller's tier (at this index of the policy's tiers).
    Tier(usize),
    /// The per-caller limit of the route at `route`, for the caller's tier at `tier`.
    Route { route: usize, tier: usize },
    /// The limit of the route at this index shared by every caller.
    Shared(usize),
    /// The whole-service limit.
    Global,
    /// The concurrency cap of the tier at this index.
    Concurrency(usize),
}

impl Slot {
    /// The limit's name, quota and headers as the policy has them (`None` for a concurrency cap,
    /// which has no rate-limit headers).
    pub(crate) fn limit(self, policy: &Policy) -> Option<&Arc<LimitInfo>> {
        match self {
            Slot::Tier(i) => Some(&policy.tier_at(i).limit),
            Slot::Route { route, tier } => policy.route_limits(route).per_caller(tier),
            Slot::Shared(r) => policy.route_limits(r).shared.as_ref().map(|(l, _)| l),
            Slot::Global => policy.global_limit(),
            Slot::Concurrency(_) => None,
        }
    }
}

/// The most limits a request has: its tier, the route's per-caller and shared limits, the
/// whole-service limit, and a concurrency cap.
pub(crate) const MAX_SLOTS: usize = 5;

/// The limits of one request, owned so a decision can outlive the call that built it.
///
/// They are, in this order: the caller's tier, the route's per-caller limit and its shared limit
/// (if the request matched a route that has them), the whole-service limit (if the policy has
/// one), and the tier's concurrency cap (if it has one). Decisions and denials refer to them by
/// their index in this order.
pub(crate) struct Plan {
    pub(crate) policy: Arc<Policy>,
    /// The caller's tier (an index into the policy's tiers).
    tier: usize,
    /// The route rule the request matched (an index into the policy's routes).
    route: Option<usize>,
    /// The tier's bucket key, `{<identity key>}:t:<tier>`, written around the identity key's own
    /// string: the identity key is `tier_key[1..=key_len]`.
    tier_key: String,
    key_len: usize,
    /// The bucket key of the route's per-caller limit, `{<identity key>}:r:<route>`, when it has
    /// one.
    route_key: Option<String>,
    /// The key of the caller's concurrency leases, `{<identity key>}:c:<tier>`, when the tier
    /// caps them.
    lease_key: Option<String>,
    /// What the request costs against the tier and the route's limits.
    cost: u32,
    slots: [Slot; MAX_SLOTS],
    n: usize,
    /// The route charges only failures: its limits are checked first and charged after a
    /// response of 400 or more.
    deferred: bool,
    /// The tier's limit as the adaptive controller lowered it, when it did.
    effective: Option<Arc<LimitInfo>>,
}

/// The key of the whole-service limit.
const GLOBAL_KEY: &str = "global";

/// Which limits of a plan one store call covers, by their index in the plan.
pub(crate) struct Indices {
    at: [usize; MAX_SLOTS],
    n: usize,
}

impl Indices {
    /// The index in the plan of the `i`th limit of the call.
    pub(crate) fn get(&self, i: usize) -> usize {
        self.at[i.min(self.n.saturating_sub(1))]
    }
}

impl Plan {
    /// The plan of a request to `method` `path` by the caller `key` in the tier at `tier`.
    ///
    /// The caller's limits share a hash tag, so on Redis Cluster they are decided in one call;
    /// the whole-service and shared limits live in slots of their own. `key` becomes the tier's
    /// bucket key in place (the built-in extractors left room for it).
    pub(crate) fn new(
        policy: Arc<Policy>,
        tier: usize,
        key: String,
        method: &Method,
        path: &str,
        effective: Option<Arc<LimitInfo>>,
    ) -> Plan {
        let route = policy.route_index(method, path);
        let cost = route.map_or(1, |r| policy.route_at(r).request_cost());
        let tier_info = policy.tier_at(tier);
        let tier_name = &tier_info.limit.name;
        let mut tier_key = key;
        let key_len = tier_key.len();
        tier_key.reserve_exact(TIER_KEY_EXTRA + tier_name.len());
        tier_key.insert(0, '{');
        tier_key.push_str("}:t:");
        tier_key.push_str(tier_name);
        let caller_key = |kind: &str, name: &str| {
            let key = &tier_key[1..=key_len];
            let mut out = String::with_capacity(key.len() + name.len() + 5);
            out.push('{');
            out.push_str(key);
            out.push_str("}:");
            out.push_str(kind);
            out.push(':');
            out.push_str(name);
            out
        };
        let mut slots = [Slot::Tier(tier); MAX_SLOTS];
        let mut n = 1;
        let mut route_key = None;
        let mut deferred = false;
        if let Some(r) = route {
            let limits = policy.route_limits(r);
            if limits.per_caller(tier).is_some() {
                route_key = Some(caller_key("r", policy.route_at(r).name()));
                slots[n] = Slot::Route { route: r, tier };
                n += 1;
            }
            if limits.shared.is_some() {
                slots[n] = Slot::Shared(r);
                n += 1;
            }
            deferred = n > 1 && policy.route_at(r).charges() == Charge::Failures;
        }
        if policy.global_limit().is_some() {
            slots[n] = Slot::Global;
            n += 1;
        }
        let lease_key = tier_info.concurrency.as_ref().map(|_| {
            slots[n] = Slot::Concurrency(tier);
            n += 1;
            caller_key("c", tier_name)
        });
        Plan {
            policy,
            tier,
            route,
            tier_key,
            key_len,
            route_key,
            lease_key,
            cost,
            slots,
            n,
            deferred,
            effective,
        }
    }

    /// The identity key of the caller (logged only as its fingerprint).
    pub(crate) fn key(&self) -> &str {
        &self.tier_key[1..=self.key_len]
    }

    pub(crate) fn tier(&self) -> &Tier {
        self.policy.tier_at(self.tier)
    }

    pub(crate) fn tier_name(&self) -> &Arc<str> {
        &self.tier().limit.name
    }

    /// The tier's limit in force: lowered by the adaptive controller, or as configured.
    pub(crate) fn tier_limit(&self) -> &Arc<LimitInfo> {
        self.effective.as_ref().unwrap_or(&self.tier().limit)
    }

    /// The tier's limit as lowered by the adaptive controller, if it is.
    pub(crate) fn effective(&self) -> Option<&Arc<LimitInfo>> {
        self.effective.as_ref()
    }

    /// Which limit of the request is at `index`.
    pub(crate) fn slot(&self, index: usize) -> Slot {
        self.slots[index.min(self.n - 1)]
    }

    /// The limit at `index`: its name, quota and headers (the tier's for a concurrency cap,
    /// which has none of its own).
    pub(crate) fn limit(&self, index: usize) -> &Arc<LimitInfo> {
        match self.slot(index) {
            Slot::Tier(_) | Slot::Concurrency(_) => self.tier_limit(),
            slot => slot.limit(&self.policy).unwrap_or(self.tier_limit()),
        }
    }

    /// The name of the limit at `index`, as bodies and logs give it.
    pub(crate) fn name(&self, index: usize) -> &str {
        match self.slot(index) {
            Slot::Concurrency(_) => self
                .tier()
                .concurrency
                .as_ref()
                .map_or("concurrency", |c| &c.name),
            _ => &self.limit(index).name,
        }
    }

    /// What the request costs under the limit at `index`: the whole-service limit counts
    /// requests, a concurrency cap leases.
    pub(crate) fn cost_of(&self, index: usize) -> u32 {
        match self.slot(index) {
            Slot::Global | Slot::Concurrency(_) => 1,
            _ => self.cost,
        }
    }

    fn limit_at(&self, index: usize, cost: u32) -> Limit<'_> {
        let key: &str = match self.slot(index) {
            Slot::Route { .. } => self.route_key.as_deref().unwrap_or(&self.tier_key),
            Slot::Shared(r) => self
                .policy
                .route_limits(r)
                .shared
                .as_ref()
                .map_or(GLOBAL_KEY, |(_, key)| key),
            Slot::Global => GLOBAL_KEY,
            Slot::Tier(_) | Slot::Concurrency(_) => &self.tier_key,
        };
        Limit::new(key, &self.limit(index).quota, cost)
    }

    /// Whether the limit at `index` is one of the route's, checked first and charged only on
    /// failure.
    fn is_deferred(&self, index: usize) -> bool {
        self.deferred && matches!(self.slot(index), Slot::Route { .. } | Slot::Shared(_))
    }

    /// The rate limits to decide and charge now, in an array (the first `n` are used; no
    /// allocation), with their indices in the plan.
    pub(crate) fn limits(&self) -> ([Limit<'_>; MAX_SLOTS], usize, Indices) {
        // The tier's limit is always the first, charged now (`Plan::new`): built once.
        debug_assert!(matches!(self.slot(0), Slot::Tier(_)) && !self.is_deferred(0));
        let first = self.limit_at(0, self.cost);
        let mut limits = [first; MAX_SLOTS];
        let mut at = [0; MAX_SLOTS];
        let mut n = 1;
        for index in 1..self.n {
            if matches!(self.slot(index), Slot::Concurrency(_)) || self.is_deferred(index) {
                continue;
            }
            limits[n] = self.limit_at(index, self.cost_of(index));
            at[n] = index;
            n += 1;
        }
        // The lease's decision comes after the limits'.
        if self.lease_key.is_some() {
            at[n] = self.n - 1;
        }
        (limits, n, Indices { at, n: n + 1 })
    }

    /// The route's limits that charge only failures, at the request's cost, with their indices:
    /// checked (peeked) before the request and charged after a failed response. Empty unless
    /// the route charges failures.
    pub(crate) fn deferred(&self) -> ([Limit<'_>; 2], usize, Indices) {
        let first = self.limit_at(0, self.cost);
        let mut limits = [first; 2];
        let mut at = [0; MAX_SLOTS];
        let mut n = 0;
        for index in 0..self.n {
            if self.is_deferred(index) {
                limits[n] = self.limit_at(index, self.cost);
                at[n] = index;
                n += 1;
            }
        }
        (limits, n, Indices { at, n })
    }

    /// Whether the route's limits are charged only after a failed response.
    pub(crate) fn charges_failures(&self) -> bool {
        self.deferred
    }

    /// The caller's concurrency lease to take with the decision, if the tier caps it.
    pub(crate) fn lease(&self) -> Option<Lease<'_>> {
        let key = self.lease_key.as_deref()?;
        let cap = self.tier().concurrency.as_ref()?;
        Some(Lease::new(key, cap.max, cap.lease))
    }

    /// The key of the caller's leases, taken to give a lease back later (the plan's lease is
    /// decided by then).
    pub(crate) fn take_lease_key(&mut self) -> Option<String> {
        self.lease_key.take()
    }

    /// Whether the limit at `index` is the concurrency cap.
    pub(crate) fn is_concurrency(&self, index: usize) -> bool {
        matches!(self.slot(index), Slot::Concurrency(_))
    }

    /// The key of the caller in the denied-until cache: what decided the denial, the caller's
    /// tier bucket (`{<key>}:t:<tier>`, so a caller moved to another tier is not answered by the
    /// old tier's denial) and the route. The cache also checks the policy's id (a reload).
    pub(crate) fn cache_key(&self) -> Cow<'_, str> {
        match self.route {
            Some(r) => Cow::Owned(format!(
                "{}\u{0}{}",
                self.tier_key,
                self.policy.route_at(r).name()
            )),
            None => Cow::Borrowed(&self.tier_key),
        }
    }

    /// What the request costs against the tier and the route's limits.
    pub(crate) fn cost(&self) -> u32 {
        self.cost
    }
}

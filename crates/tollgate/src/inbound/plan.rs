//! [`Plan`]: the limits of one request (the caller's tier, the route's own limit, the
//! whole-service limit), with their bucket keys and costs.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;
use tollgate_core::Limit;

use super::identity::TIER_KEY_EXTRA;
use super::policy::{LimitInfo, Policy, Tier};

/// One of the limits of a policy.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    /// The tier at this index.
    Tier(usize),
    /// The own limit of the route at this index.
    Route(usize),
    /// The whole-service limit.
    Global,
}

impl Slot {
    pub(crate) fn limit(self, policy: &Policy) -> Option<&Arc<LimitInfo>> {
        match self {
            Slot::Tier(i) => Some(&policy.tier_at(i).limit),
            Slot::Route(i) => policy.route_limit(i),
            Slot::Global => policy.global_limit(),
        }
    }
}

/// The limits of one request, owned so a decision can outlive the call that built it.
///
/// They are, in this order: the caller's tier, the route's own limit (if the request matched a
/// route that has one) and the whole-service limit (if the policy has one).
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
    /// The bucket key of the route's own limit, `{<identity key>}:r:<route>`, when it has one.
    route_key: Option<String>,
    /// What the request costs against the tier and the route's limit.
    cost: u32,
}

/// The key of the whole-service limit.
const GLOBAL_KEY: &str = "global";

impl Plan {
    /// The plan of a request to `method` `path` by the caller `key` in the tier at `tier`.
    ///
    /// The caller's limits share a hash tag, so on Redis Cluster they are decided in one call;
    /// the whole-service limit lives in its own slot. `key` becomes the tier's bucket key in
    /// place (the built-in extractors left room for it).
    pub(crate) fn new(
        policy: Arc<Policy>,
        tier: usize,
        key: String,
        method: &Method,
        path: &str,
    ) -> Plan {
        let route = policy.route_index(method, path);
        let cost = route.map_or(1, |r| policy.route_at(r).request_cost());
        let tier_name = &policy.tier_at(tier).limit.name;
        let mut tier_key = key;
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
        Plan {
            policy,
            tier,
            route,
            tier_key,
            key_len,
            route_key,
            cost,
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

    /// Which limit of the policy is at `index` in the order of the plan.
    pub(crate) fn slot(&self, index: usize) -> Slot {
        match (index, self.route, &self.route_key) {
            (0, _, _) => Slot::Tier(self.tier),
            (1, Some(route), Some(_)) => Slot::Route(route),
            _ => Slot::Global,
        }
    }

    /// The limit at `index` in the order of the plan.
    pub(crate) fn limit(&self, index: usize) -> &Arc<LimitInfo> {
        self.slot(index)
            .limit(&self.policy)
            .unwrap_or(&self.tier().limit)
    }

    /// What the request costs under the limit at `index`: the whole-service limit counts
    /// requests.
    pub(crate) fn cost_of(&self, index: usize) -> u32 {
        let global = 1 + usize::from(self.route_key.is_some());
        if index == global && self.policy.global_limit().is_some() {
            1
        } else {
            self.cost
        }
    }

    /// The limits to decide, in an array (the first `n` are used): no allocation.
    pub(crate) fn limits(&self) -> ([Limit<'_>; 3], usize) {
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

    /// What the request costs against the tier and the route's limit.
    pub(crate) fn cost(&self) -> u32 {
        self.cost
    }
}

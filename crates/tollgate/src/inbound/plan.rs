//! [`Plan`]: the limits of one request (the caller's tier, the route's own limits, the
//! whole-service limit, the tier's concurrency cap), with their bucket keys and costs.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;
use tollgate_core::{Lease, Limit};

use super::identity::TIER_KEY_EXTRA;
use super::policy::{Charge, LimitInfo, Policy, Tier};

/// One of the limits of a request. Indices are 16 bits (a policy holds at most
/// [`MAX_RULES`](super::policy::MAX_RULES) tiers and routes), so a slot is 6 bytes and a plan
/// small enough to move without a call to `memcpy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The caller's tier (at this index of the policy's tiers).
    Tier(u16),
    /// The per-caller limit of the route at `route`, for the caller's tier at `tier`.
    Route { route: u16, tier: u16 },
    /// The limit of the route at this index shared by every caller.
    Shared(u16),
    /// The whole-service limit.
    Global,
    /// The concurrency cap of the tier at this index.
    Concurrency(u16),
}

/// A tier's or a route's index as a plan keeps it: in 16 bits, which
/// [`MAX_RULES`](super::policy::MAX_RULES) (checked when the policy is built) guarantees.
fn short(index: usize) -> u16 {
    u16::try_from(index)
        .expect("a policy holds at most 65,535 tiers and routes (checked when built)")
}

impl Slot {
    /// The limit's name, quota and headers as the policy has them (`None` for a concurrency cap,
    /// which has no rate-limit headers).
    pub(crate) fn limit(self, policy: &Policy) -> Option<&Arc<LimitInfo>> {
        match self {
            Slot::Tier(i) => Some(&policy.tier_at(usize::from(i)).limit),
            Slot::Route { route, tier } => policy
                .route_limits(usize::from(route))
                .per_caller(usize::from(tier)),
            Slot::Shared(r) => policy
                .route_limits(usize::from(r))
                .shared
                .as_ref()
                .map(|(l, _)| l),
            Slot::Global => policy.global_limit(),
            Slot::Concurrency(_) => None,
        }
    }
}

/// The most limits a request has: its tier, the route's per-caller and shared limits, the
/// whole-service limit, and a concurrency cap.
pub(crate) const MAX_SLOTS: usize = 5;

/// The most rate limits a request has: its slots but the concurrency cap (a lease, not a rate).
/// The limits of a request fit in 4 × 32 bytes, which the compiler moves without `memcpy`.
const MAX_RATES: usize = MAX_SLOTS - 1;

/// The limits of one request, owned so a decision can outlive the call that built it.
///
/// They are, in this order: the caller's tier, the route's per-caller limit and its shared limit
/// (if the request matched a route that has them), the whole-service limit (if the policy has
/// one), and the tier's concurrency cap (if it has one). Decisions and denials refer to them by
/// their index in this order.
///
/// It is kept under 128 bytes (a test checks), the most the compiler moves with a few vector
/// stores instead of a call to `memcpy`.
#[derive(Clone)]
pub(crate) struct Plan {
    pub(crate) policy: Arc<Policy>,
    /// The caller's tier (an index into the policy's tiers).
    tier: u16,
    /// The route rule the request matched (an index into the policy's routes).
    route: Option<u16>,
    /// The tier's bucket key, `{<identity key>}:t:<tier>`, written around the identity key's own
    /// string: the identity key is `tier_key[1..=key_len]`.
    tier_key: String,
    key_len: usize,
    /// The bucket key of the route's per-caller limit, `{<identity key>}:r:<route>`, when it has
    /// one.
    route_key: Option<Box<str>>,
    /// The key of the caller's concurrency leases, `{<identity key>}:c:<tier>`, when the tier
    /// caps them.
    lease_key: Option<Box<str>>,
    /// What the request costs against the tier and the route's limits.
    cost: u32,
    slots: [Slot; MAX_SLOTS],
    n: u8,
    /// The route charges only failures: its limits are checked first and charged after a
    /// response of 400 or more.
    deferred: bool,
    /// The tier's limit as the adaptive controller lowered it, when it did.
    effective: Option<Arc<LimitInfo>>,
}

impl Drop for Plan {
    /// The tier key's buffer goes back to the thread's spare, for the next request's key.
    fn drop(&mut self) {
        super::identity::give_back(std::mem::take(&mut self.tier_key));
    }
}

/// The key of the whole-service limit.
const GLOBAL_KEY: &str = "global";

/// Which limits of a plan one store call covers, by their index in the plan.
pub(crate) struct Indices {
    at: [u8; MAX_SLOTS],
    n: u8,
}

impl Indices {
    /// The index in the plan of the `i`th limit of the call.
    pub(crate) fn get(&self, i: usize) -> usize {
        usize::from(self.at[i.min(usize::from(self.n.saturating_sub(1)))])
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
            out.into_boxed_str()
        };
        let (tier_index, tier) = (tier, short(tier));
        let mut slots = [Slot::Tier(tier); MAX_SLOTS];
        let mut n = 1;
        let mut route_key = None;
        let mut deferred = false;
        if let Some(r) = route {
            let limits = policy.route_limits(r);
            if limits.per_caller(tier_index).is_some() {
                route_key = Some(caller_key("r", policy.route_at(r).name()));
                slots[n] = Slot::Route {
                    route: short(r),
                    tier,
                };
                n += 1;
            }
            if limits.shared.is_some() {
                slots[n] = Slot::Shared(short(r));
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
            route: route.map(short),
            tier_key,
            key_len,
            route_key,
            lease_key,
            cost,
            slots,
            // At most `MAX_SLOTS`.
            n: n as u8,
            deferred,
            effective,
        }
    }

    /// The identity key of the caller (logged only as its fingerprint).
    pub(crate) fn key(&self) -> &str {
        &self.tier_key[1..=self.key_len]
    }

    pub(crate) fn tier(&self) -> &Tier {
        self.policy.tier_at(usize::from(self.tier))
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
        self.slots[index.min(usize::from(self.n) - 1)]
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
                .route_limits(usize::from(r))
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
    pub(crate) fn limits(&self) -> ([Limit<'_>; MAX_RATES], usize, Indices) {
        // The tier's limit is always the first, charged now (`Plan::new`): built once.
        debug_assert!(matches!(self.slot(0), Slot::Tier(_)) && !self.is_deferred(0));
        let first = self.limit_at(0, self.cost);
        let mut limits = [first; MAX_RATES];
        let mut at = [0; MAX_SLOTS];
        let mut n = 1;
        for index in 1..self.n {
            if matches!(self.slot(usize::from(index)), Slot::Concurrency(_))
                || self.is_deferred(usize::from(index))
            {
                continue;
            }
            limits[n] = self.limit_at(usize::from(index), self.cost_of(usize::from(index)));
            at[n] = index;
            n += 1;
        }
        // The lease's decision comes after the limits'.
        if self.lease_key.is_some() {
            at[n] = self.n - 1;
        }
        // `n` is at most `MAX_RATES`.
        (limits, n, Indices { at, n: n as u8 + 1 })
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
            if self.is_deferred(usize::from(index)) {
                limits[n] = self.limit_at(usize::from(index), self.cost);
                at[n] = index;
                n += 1;
            }
        }
        // `n` is at most 2.
        (limits, n, Indices { at, n: n as u8 })
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
        self.lease_key.take().map(String::from)
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
                self.policy.route_at(usize::from(r)).name()
            )),
            None => Cow::Borrowed(&self.tier_key),
        }
    }

    /// What the request costs against the tier and the route's limits.
    pub(crate) fn cost(&self) -> u32 {
        self.cost
    }
}

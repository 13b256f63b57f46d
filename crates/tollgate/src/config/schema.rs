//! The file as serde reads it: every section and field, before any validation. Every mapping is
//! read through [`NoRepeats`], so a key given twice is an error at the second key.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use serde::{Deserialize, Deserializer};

use super::store::StoreSpec;
use super::unique::{NoRepeats, no_repeated_keys};

no_repeated_keys!(File, LimitSpec, RouteSpec, ApiKeySpec, AdaptiveSpec);

#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub(super) struct File {
    #[serde(default)]
    pub(super) store: StoreSpec,
    #[serde(default)]
    pub(super) headers: Option<String>,
    #[serde(default)]
    pub(super) shadow: bool,
    #[serde(default)]
    pub(super) global: Option<LimitSpec>,
    #[serde(default)]
    pub(super) rate_limits: UniqueMap<LimitSpec>,
    #[serde(default)]
    pub(super) limits: UniqueMap<LimitSpec>,
    #[serde(default)]
    pub(super) routes: Vec<RouteSpec>,
    #[serde(default)]
    pub(super) api_keys: UniqueMap<ApiKeySpec>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    #[serde(default)]
    pub(super) client_ip_header: Option<String>,
    #[serde(default)]
    pub(super) exempt_paths: Vec<String>,
    #[serde(default)]
    pub(super) anonymous_tier: Option<String>,
    #[serde(default)]
    pub(super) adaptive: Option<AdaptiveSpec>,
}

/// The `adaptive` section: the controller's settings and the tiers it may lower.
#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub(super) struct AdaptiveSpec {
    #[serde(default)]
    pub(super) target_latency: Option<String>,
    #[serde(default)]
    pub(super) max_in_flight: Option<u32>,
    #[serde(default)]
    pub(super) quantile: Option<f64>,
    #[serde(default)]
    pub(super) interval: Option<String>,
    #[serde(default)]
    pub(super) decrease: Option<f64>,
    #[serde(default)]
    pub(super) increase: Option<f64>,
    #[serde(default)]
    pub(super) min_factor: Option<f64>,
    #[serde(default)]
    pub(super) priority: Vec<String>,
}

/// A limit: a tier, `global`, a route's `limit`, an entry of `limits`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub(super) struct LimitSpec {
    pub(super) requests_per_second: Option<NonZeroU32>,
    pub(super) requests_per_minute: Option<NonZeroU32>,
    pub(super) requests_per_hour: Option<NonZeroU32>,
    pub(super) burst_limit: Option<NonZeroU32>,
    pub(super) limit: Option<NonZeroU32>,
    pub(super) window: Option<String>,
    pub(super) algorithm: Option<String>,
    pub(super) max_delay: Option<String>,
    /// Tiers only: the cap on a caller's requests in flight.
    pub(super) concurrency: Option<u32>,
    /// Tiers only: how long a concurrency lease lives if never given back.
    pub(super) lease_time: Option<String>,
}

/// An entry of `routes`.
#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub(super) struct RouteSpec {
    #[serde(default)]
    pub(super) method: Option<String>,
    pub(super) path: String,
    #[serde(default)]
    pub(super) cost: Option<u32>,
    #[serde(default)]
    pub(super) limit: Option<LimitSpec>,
    #[serde(default)]
    pub(super) shared_limit: Option<LimitSpec>,
    #[serde(default)]
    pub(super) limits_by_tier: UniqueMap<LimitSpec>,
    #[serde(default)]
    pub(super) charge: Option<String>,
}

/// An entry of `api_keys`.
#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub(super) struct ApiKeySpec {
    pub(super) user: String,
    pub(super) tier: String,
}

/// A mapping of names (tiers, limits, API keys) whose keys must be unique.
#[derive(Debug)]
pub(super) struct UniqueMap<V>(BTreeMap<String, V>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<UniqueMap<V>, D::Error> {
        BTreeMap::deserialize(NoRepeats(d)).map(UniqueMap)
    }
}

impl<V> std::ops::Deref for UniqueMap<V> {
    type Target = BTreeMap<String, V>;

    fn deref(&self) -> &BTreeMap<String, V> {
        &self.0
    }
}

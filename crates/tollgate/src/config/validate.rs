//! The file, read by serde ([`File`]), checked and made into a [`Config`]: every error names the
//! file, the line (where the parser puts the field) and the field.

use std::path::Path;

use http::Method;

use super::load::Origin;
use super::position::{FieldPath, line_of, yaml_error};
use super::schema::{AdaptiveSpec, File, RouteSpec};
use super::store::StoreConfig;
use super::{Config, ConfigError};
use crate::http::forwarded::{ForwardedHeader, TrustedProxies, parse_cidr};
use crate::http::headers::HeaderMode;
use crate::inbound::adaptive::AdaptiveConfig;
use crate::inbound::{ApiKeyEntry, ApiKeys, Charge, ClientIp, Policy, Route};

/// The tiers of the file, for an error naming an unknown one.
fn tier_names(parsed: &File) -> String {
    parsed
        .rate_limits
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text being validated and the name errors give it.
pub(super) struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    /// An error at `path`: its line is where the parser finds the field (or the deepest part of
    /// the path the file has).
    pub(super) fn error(&self, path: &FieldPath, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: line_of(self.text, path),
            field: Some(path.to_string()),
            message: message.into(),
        }
    }
}

/// Reads and validates configuration `text`; `file` names it in errors.
pub(super) fn validate(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let parsed: File = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(file, &e))?;
    let ctx = Ctx { file, text };
    let top = FieldPath::top;

    let mut policy = Policy::builder().shadow(parsed.shadow);
    if let Some(mode) = &parsed.headers {
        let mode: HeaderMode =
            mode.parse()
                .map_err(|e: crate::http::headers::ParseHeaderModeError| {
                    ctx.error(&top("headers"), e.to_string())
                })?;
        policy = policy.headers(mode);
    }
    if parsed.rate_limits.is_empty() && parsed.limits.is_empty() {
        return Err(ctx.error(
            &top("rate_limits"),
            "at least one tier (rate_limits) or one limit (limits) is needed",
        ));
    }
    let mut limits = Vec::with_capacity(parsed.limits.len());
    for (name, spec) in parsed.limits.iter() {
        if name.is_empty() || name.contains(['{', '}']) {
            return Err(ctx.error(
                &top("limits"),
                format!("invalid limit name `{name}`: it must be non-empty, without {{ or }}"),
            ));
        }
        limits.push((name.clone(), ctx.quota(&top("limits").key(name), spec)?));
    }
    let mut largest_tier = 0;
    for (name, spec) in parsed.rate_limits.iter() {
        let at = top("rate_limits").key(name);
        let quota = ctx.rate_quota(&at, spec)?;
        largest_tier = largest_tier.max(quota.limit());
        policy = policy.tier(name, quota);
        if let Some((max, lease)) = ctx.concurrency(&at, spec)? {
            policy = policy.concurrency(name, max, lease);
        }
    }
    if let Some(spec) = &parsed.global {
        policy = policy.global(ctx.quota(&top("global"), spec)?);
    }
    for (i, spec) in parsed.routes.iter().enumerate() {
        policy = policy.route(ctx.route(&top("routes").index(i), spec, &parsed, largest_tier)?);
    }
    if let Some(spec) = &parsed.adaptive {
        let (config, priority) = ctx.adaptive(&top("adaptive"), spec, &parsed)?;
        let names: Vec<&str> = priority.iter().map(String::as_str).collect();
        policy = policy.adaptive(config, &names);
    }
    for path in &parsed.exempt_paths {
        policy = policy.exempt_path(path);
    }
    let keys = ctx.keys(&parsed)?;
    let policy = policy
        .build()
        .map_err(|e| ctx.error(&top("routes"), e.to_string()))?;
    let store = parsed.store.validate(&ctx)?;
    // Where an error building the store will point (`Config::layer` builds it, after loading);
    // looked up now, while the text is at hand, and only for a store that has a place in it.
    let store_line = match store.store {
        StoreConfig::Memory => None,
        _ => line_of(text, &top("store").key("redis")),
    };
    Ok(Config {
        policy,
        keys,
        origin: Origin {
            file: file.to_path_buf(),
            store: store.store.clone(),
            store_line,
        },
        store: store.store,
        on_error: store.on_error,
        timeout: store.timeout,
        limits,
    })
}

impl Ctx<'_> {
    /// The route at `at`; no tier holds more than `largest_tier`.
    fn route(
        &self,
        at: &FieldPath,
        spec: &RouteSpec,
        parsed: &File,
        largest_tier: u32,
    ) -> Result<Route, ConfigError> {
        let field = |name: &str| at.clone().key(name);
        if !spec.path.starts_with('/') {
            return Err(self.error(
                &field("path"),
                format!("route path `{}` must start with /", spec.path),
            ));
        }
        let mut route = Route::new(&spec.path);
        if let Some(method) = &spec.method {
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                .map_err(|_| self.error(&field("method"), format!("invalid method `{method}`")))?;
            route = route.method(method);
        }
        if let Some(cost) = spec.cost {
            if cost > largest_tier {
                return Err(self.error(
                    &field("cost"),
                    format!(
                        "the cost {cost} is more than any tier can ever allow (the largest \
                         holds {largest_tier}): every request to the route would be refused"
                    ),
                ));
            }
            route = route.cost(cost);
        }
        if let Some(limit) = &spec.limit {
            let quota = self.quota(&field("limit"), limit)?;
            if spec.cost.unwrap_or(1) > quota.limit() {
                return Err(self.error(
                    &field("cost"),
                    format!(
                        "the cost is more than the route's limit can ever hold ({})",
                        quota.limit()
                    ),
                ));
            }
            route = route.limit(quota);
        }
        let cost = spec.cost.unwrap_or(1);
        let too_costly =
            |limit: u32| format!("the cost {cost} is more than this limit can ever hold ({limit})");
        if let Some(shared) = &spec.shared_limit {
            let quota = self.quota(&field("shared_limit"), shared)?;
            if cost > quota.limit() {
                return Err(self.error(&field("shared_limit"), too_costly(quota.limit())));
            }
            route = route.shared_limit(quota);
        }
        for (tier, limit) in spec.limits_by_tier.iter() {
            let place = field("limits_by_tier").key(tier);
            if !parsed.rate_limits.contains_key(tier) {
                return Err(self.error(
                    &place,
                    format!("unknown tier `{tier}` (tiers: {})", tier_names(parsed)),
                ));
            }
            let quota = self.quota(&place, limit)?;
            if cost > quota.limit() {
                return Err(self.error(&place, too_costly(quota.limit())));
            }
            route = route.tier_limit(tier, quota);
        }
        match spec.charge.as_deref() {
            None | Some("always") => {}
            Some("failures") => {
                if spec.limit.is_none()
                    && spec.shared_limit.is_none()
                    && spec.limits_by_tier.is_empty()
                {
                    return Err(self.error(
                        &field("charge"),
                        "`charge: failures` needs a route limit to charge (limit, shared_limit or \
                         limits_by_tier)",
                    ));
                }
                route = route.charge(Charge::Failures);
            }
            Some(other) => {
                return Err(self.error(
                    &field("charge"),
                    format!("unknown charge `{other}`: expected always or failures"),
                ));
            }
        }
        Ok(route)
    }

    /// The `adaptive` section: the controller's settings and the tiers it may lower, lowest
    /// priority first.
    fn adaptive(
        &self,
        at: &FieldPath,
        spec: &AdaptiveSpec,
        parsed: &File,
    ) -> Result<(AdaptiveConfig, Vec<String>), ConfigError> {
        let field = |name: &str| at.clone().key(name);
        let mut config = AdaptiveConfig::default();
        match (&spec.target_latency, spec.max_in_flight) {
            (None, None) => {
                return Err(self.error(
                    at,
                    "adaptive needs a load signal: target_latency, max_in_flight or both",
                ));
            }
            (latency, in_flight) => {
                config.target_latency = match latency {
                    Some(text) => Some(
                        super::duration::parse_duration(text)
                            .map_err(|e| self.error(&field("target_latency"), e.to_string()))?,
                    ),
                    None => None,
                };
                config.max_in_flight = in_flight;
            }
        }
        if let Some(text) = &spec.interval {
            config.interval = super::duration::parse_duration(text)
                .map_err(|e| self.error(&field("interval"), e.to_string()))?;
        }
        if let Some(q) = spec.quantile {
            config.quantile = q;
        }
        if let Some(d) = spec.decrease {
            config.decrease = d;
        }
        if let Some(i) = spec.increase {
            config.increase = i;
        }
        if let Some(m) = spec.min_factor {
            config.min_factor = m;
        }
        config
            .validate()
            .map_err(|e| self.error(&field(e.field()), e.to_string()))?;
        if spec.priority.is_empty() {
            return Err(self.error(
                &field("priority"),
                "name the tiers the adaptive limits may lower, lowest priority first",
            ));
        }
        for (i, tier) in spec.priority.iter().enumerate() {
            let place = field("priority").index(i);
            if !parsed.rate_limits.contains_key(tier) {
                return Err(self.error(
                    &place,
                    format!("unknown tier `{tier}` (tiers: {})", tier_names(parsed)),
                ));
            }
            if spec.priority[..i].contains(tier) {
                return Err(self.error(&place, format!("tier `{tier}` is named twice")));
            }
        }
        Ok((config, spec.priority.clone()))
    }

    /// Who is calling: the API keys, and anonymous callers by their address.
    fn keys(&self, parsed: &File) -> Result<ApiKeys, ConfigError> {
        let top = FieldPath::top;
        let anonymous = parsed.anonymous_tier.as_deref().unwrap_or("anonymous");
        if !parsed.rate_limits.is_empty() && !parsed.rate_limits.contains_key(anonymous) {
            // Named by `anonymous_tier`, or the default the file did not define.
            let at = match parsed.anonymous_tier {
                Some(_) => top("anonymous_tier"),
                None => top("rate_limits"),
            };
            return Err(self.error(
                &at,
                format!("tier `{anonymous}` is needed for callers without an API key"),
            ));
        }
        let mut entries = Vec::with_capacity(parsed.api_keys.len());
        for (key, spec) in parsed.api_keys.iter() {
            if key.is_empty() || key.trim() != key {
                return Err(self.error(
                    &top("api_keys"),
                    format!(
                        "the API key of user `{}` is empty or starts or ends with whitespace; \
                         no request could present it as written",
                        spec.user
                    ),
                ));
            }
            if !parsed.rate_limits.contains_key(&spec.tier) {
                return Err(self.error(
                    &top("api_keys").key(key).key("tier"),
                    format!(
                        "unknown tier `{}` (tiers: {})",
                        spec.tier,
                        tier_names(parsed)
                    ),
                ));
            }
            entries.push((
                key.clone(),
                ApiKeyEntry {
                    user: spec.user.clone(),
                    tier: spec.tier.as_str().into(),
                },
            ));
        }
        let mut trusted = Vec::with_capacity(parsed.trusted_proxies.len());
        for (i, cidr) in parsed.trusted_proxies.iter().enumerate() {
            trusted.push(
                parse_cidr(cidr)
                    .map_err(|e| self.error(&top("trusted_proxies").index(i), e.to_string()))?,
            );
        }
        let header = match &parsed.client_ip_header {
            Some(name) => name
                .parse::<ForwardedHeader>()
                .map_err(|e| self.error(&top("client_ip_header"), e))?,
            None => ForwardedHeader::default(),
        };
        Ok(ApiKeys::new(
            entries,
            ClientIp::new(
                anonymous,
                trusted
                    .into_iter()
                    .collect::<TrustedProxies>()
                    .with_header(header),
            ),
        ))
    }
}

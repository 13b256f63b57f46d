//! The YAML configuration (feature `yaml`): tiers, routes, the global limit, API keys, trusted
//! proxies, headers, shadow mode and the store.
//!
//! ```yaml
//! store: memory                      # or: { redis: { url: "redis://127.0.0.1:6379", prefix: "tollgate", timeout_ms: 50, on_error: local } }
//!                                    #     { redis: { cluster: ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"] } }
//! headers: both                      # ietf | legacy | both | none
//! shadow: false                      # true: decide, count and send headers, but never deny
//! global: { requests_per_second: 1000, burst_limit: 2000 }
//! rate_limits:
//!   anonymous:  { requests_per_minute: 10,   burst_limit: 5 }
//!   basic:      { requests_per_minute: 100,  burst_limit: 20 }
//!   enterprise: { requests_per_minute: 1000, burst_limit: 200, algorithm: sliding_window_log }
//! routes:
//!   - { method: POST, path: /api/reports, cost: 5 }
//!   - { path: /api/search, limit: { requests_per_minute: 30, burst_limit: 10 } }
//! api_keys:
//!   key-alice: { user: alice, tier: basic }
//! trusted_proxies: ["127.0.0.1/32"]
//! client_ip_header: x-forwarded-for     # or forwarded: the one header the proxies write
//! exempt_paths: [/healthz, /metrics]
//! ```
//!
//! # Limits
//!
//! A limit (a tier, `global`, a route's `limit`) is written as a rate, `requests_per_second`,
//! `requests_per_minute` or `requests_per_hour` (exactly one), or as `limit` + `window` (`10s`,
//! `1m`, `250ms`...). `algorithm` is `token_bucket` (default), `leaky_bucket`, `fixed_window`,
//! `sliding_window_log` or `sliding_window_counter`.
//!
//! * Token bucket: capacity `burst_limit` (default: the rate's count), refilled at the rate; a
//!   new key starts full. With `limit` + `window`, the capacity is `limit`, refilled over `window`.
//! * Leaky bucket: requests leave at the rate's spacing; `max_delay` (default: the time
//!   `burst_limit` requests take to leave, or none) bounds how long one may wait.
//! * Window algorithms: `limit` requests per `window`; the rate form means `n` per second, minute
//!   or hour. `burst_limit` is accepted and has no effect on them (the window is the burst).
//!
//! Zero or negative rates, a `burst_limit` of 0, unknown keys, a key given twice (a tier, an API
//! key, a field), an unknown tier in `api_keys`, an empty API key, a route `cost` that no tier can
//! hold, a `timeout_ms` over [`MAX_STORE_TIMEOUT`](crate::limiter::MAX_STORE_TIMEOUT), a `store`
//! that is neither `memory` nor `{ redis: ... }`, and a bad duration are errors naming the file,
//! the line and the field.
//!
//! # Reloading
//!
//! A reload swaps the policy ([`PolicyHandle::set`](crate::inbound::PolicyHandle::set)) and the
//! API keys ([`ApiKeys::replace_with`]); the store, `on_error` and `timeout_ms` are fixed when the
//! layer is built, and [`Config::needs_restart`] lists what of a new file cannot apply. Bucket
//! state is kept: a bucket's state is the time it is full again, read under the new quota, so a
//! caller keeps what it spent (a raised tier refills at its new rate; a tier whose `burst_limit`
//! shrank below what a caller spent is empty for that caller until the debt refills). The
//! denied-until cache is emptied.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use serde::Deserialize;
use tollgate_core::{Algorithm, Quota, parse_duration};

use crate::http::forwarded::{ForwardedHeader, TrustedProxies, parse_cidr};
use crate::http::headers::HeaderMode;
use crate::inbound::{ApiKeyEntry, ApiKeys, ClientIp, OnStoreError, Policy, Route};

/// A configuration error: which file, which line, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or the name given to [`Config::parse`]).
    pub file: PathBuf,
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// The field, as a dotted path (`rate_limits.basic.burst_limit`), when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Errors found after loading (building the Redis store in `Config::layer`, for a URL
        // that may come from the command line) have no file: no empty `: ` prefix for them.
        let mut prefix = "";
        if !self.file.as_os_str().is_empty() {
            write!(f, "{}", self.file.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            prefix = ": ";
        }
        if let Some(field) = &self.field {
            write!(f, "{prefix}{field}")?;
            prefix = ": ";
        }
        write!(f, "{prefix}{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    store: StoreSpec,
    #[serde(default)]
    headers: Option<String>,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    global: Option<LimitSpec>,
    #[serde(default)]
    rate_limits: UniqueMap<LimitSpec>,
    #[serde(default)]
    limits: UniqueMap<LimitSpec>,
    #[serde(default)]
    routes: Vec<RouteSpec>,
    #[serde(default)]
    api_keys: UniqueMap<ApiKeySpec>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    client_ip_header: Option<String>,
    #[serde(default)]
    exempt_paths: Vec<String>,
    #[serde(default)]
    anonymous_tier: Option<String>,
}

/// `store:` is `memory` or `{ redis: { ... } }`. Read by hand rather than as an untagged enum,
/// whose only error is "data did not match any variant".
#[derive(Debug, Default)]
enum StoreSpec {
    #[default]
    Default,
    Memory,
    Redis(RedisSpec),
}

const STORE_EXPECTED: &str = "`memory` or `{ redis: { url: ... } }`";

impl<'de> Deserialize<'de> for StoreSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StoreSpec, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StoreSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(STORE_EXPECTED)
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StoreSpec, E> {
                match v {
                    "memory" => Ok(StoreSpec::Memory),
                    other => Err(E::custom(format!(
                        "unknown store `{other}`: expected {STORE_EXPECTED}"
                    ))),
                }
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StoreSpec, A::Error> {
                use serde::de::Error as _;
                let mut spec = None;
                while let Some(kind) = map.next_key::<String>()? {
                    match kind.as_str() {
                        "redis" if spec.is_none() => spec = Some(map.next_value::<RedisSpec>()?),
                        "redis" => return Err(A::Error::custom("`redis` is given twice")),
                        other => {
                            return Err(A::Error::custom(format!(
                                "unknown store `{other}`: expected {STORE_EXPECTED}"
                            )));
                        }
                    }
                }
                spec.map(StoreSpec::Redis).ok_or_else(|| {
                    A::Error::custom(format!("empty store: expected {STORE_EXPECTED}"))
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A YAML mapping whose keys must be unique: serde's maps quietly keep the last of two equal
/// keys, so a tier given twice (`basic` at 10/min, later `basic` at 99999/min) would take the
/// second without a word.
#[derive(Debug)]
struct UniqueMap<V>(BTreeMap<String, V>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

/// The message of a key given twice; [`yaml_error`] finds the line of the second one.
const GIVEN_TWICE: &str = "is given twice";

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UniqueMap<V>, D::Error> {
        struct Visitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
            type Value = UniqueMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueMap<V>, A::Error> {
                use serde::de::Error as _;
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(A::Error::custom(format!("`{key}` {GIVEN_TWICE}")));
                    }
                    let value = map.next_value()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

impl<V> std::ops::Deref for UniqueMap<V> {
    type Target = BTreeMap<String, V>;

    fn deref(&self) -> &BTreeMap<String, V> {
        &self.0
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisSpec {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    cluster: Option<Vec<String>>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    on_error: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitSpec {
    requests_per_second: Option<NonZeroU32>,
    requests_per_minute: Option<NonZeroU32>,
    requests_per_hour: Option<NonZeroU32>,
    burst_limit: Option<NonZeroU32>,
    limit: Option<NonZeroU32>,
    window: Option<String>,
    algorithm: Option<String>,
    max_delay: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    #[serde(default)]
    method: Option<String>,
    path: String,
    #[serde(default)]
    cost: Option<u32>,
    #[serde(default)]
    limit: Option<LimitSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeySpec {
    user: String,
    tier: String,
}

/// Where the limit state lives, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process.
    Memory,
    /// A standalone Redis.
    Redis {
        /// Its URL.
        url: String,
        /// Key prefix.
        prefix: String,
    },
    /// A Redis Cluster.
    Cluster {
        /// Node URLs.
        nodes: Vec<String>,
        /// Key prefix.
        prefix: String,
    },
}

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// What to enforce.
    pub policy: Policy,
    /// Who is calling: API keys, anonymous callers by IP.
    pub keys: ApiKeys,
    /// Where the state lives.
    pub store: StoreConfig,
    /// What to do when the store fails.
    pub on_error: OnStoreError,
    /// The store call timeout.
    pub timeout: Duration,
    /// The named limits of the plain [`Limiter`](crate::limiter::Limiter) (the `limits:`
    /// section), in the file's order of names.
    pub limits: Vec<(String, Quota)>,
}

/// Finds the line of a dotted field path in YAML text, for errors found after parsing: each path
/// component is searched as `name:` from the line of the previous one; a component `=text`
/// searches for a value (a route's path); `[i]` components are skipped.
fn locate(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = yaml_lines(text).collect();
    let mut from = 0;
    let mut found = None;
    for part in path {
        if part.starts_with('[') {
            continue;
        }
        if let Some(value) = part.strip_prefix('=') {
            // The whole value, not a prefix of a longer one (`/api` is not `/api/reports`).
            let whole = |line: &str| {
                line.match_indices(value).any(|(pos, _)| {
                    let before = line[..pos].chars().next_back();
                    let after = line[pos + value.len()..].chars().next();
                    let edge = |c: Option<char>| {
                        c.is_none_or(|c| matches!(c, ' ' | ',' | '}' | '{' | '"' | '\'' | ':'))
                    };
                    edge(before) && edge(after)
                })
            };
            let at = (from..lines.len()).find(|&i| whole(lines[i]))?;
            found = Some(at + 1);
            from = at;
            continue;
        }
        let needle_plain = format!("{part}:");
        let needle_quoted = format!("\"{part}\":");
        let at = (from..lines.len()).find(|&i| {
            let line = lines[i].split('#').next().unwrap_or("");
            line.match_indices(&needle_plain).any(|(pos, _)| {
                pos == 0
                    || !line.as_bytes()[pos - 1].is_ascii_alphanumeric()
                        && line.as_bytes()[pos - 1] != b'_'
            }) || line.contains(&needle_quoted)
        })?;
        found = Some(at + 1);
        from = at;
    }
    found
}

/// The lines of YAML text as the parser numbers them: a line ends at `\n`, `\r\n` or a lone
/// `\r` (YAML 1.2, section 5.4), so the lines an error names match the parser's.
fn yaml_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text).filter(|t| !t.is_empty());
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\n', '\r']) {
            Some(i) => {
                let skip = if current[i..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&current[i + skip..]).filter(|r| !r.is_empty());
                Some(&current[..i])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn error(&self, path: &[&str], message: impl Into<String>) -> ConfigError {
        let field =
            path.iter()
                .filter(|p| !p.starts_with('='))
                .fold(String::new(), |mut out, p| {
                    if !out.is_empty() && !p.starts_with('[') {
                        out.push('.');
                    }
                    out.push_str(p);
                    out
                });
        ConfigError {
            file: self.file.to_path_buf(),
            line: locate(self.text, path),
            field: Some(field),
            message: message.into(),
        }
    }

    fn duration(&self, path: &[&str], text: &str) -> Result<Duration, ConfigError> {
        parse_duration(text).map_err(|e| self.error(path, e.to_string()))
    }

    fn quota(&self, path: &[&str], spec: &LimitSpec) -> Result<Quota, ConfigError> {
        let algorithm = match &spec.algorithm {
            Some(name) => name
                .parse::<Algorithm>()
                .map_err(|e| self.error(&[path, &["algorithm"]].concat(), e.to_string()))?,
            None => Algorithm::TokenBucket,
        };
        let rates = [
            (spec.requests_per_second, Duration::from_secs(1)),
            (spec.requests_per_minute, Duration::from_secs(60)),
            (spec.requests_per_hour, Duration::from_secs(3600)),
        ];
        let mut given = rates.iter().filter_map(|(n, p)| n.map(|n| (n.get(), *p)));
        let rate = given.next();
        if given.next().is_some() {
            return Err(self.error(
                path,
                "give only one of requests_per_second, requests_per_minute, requests_per_hour",
            ));
        }
        let window = match &spec.window {
            Some(w) => Some(self.duration(&[path, &["window"]].concat(), w)?),
            None => None,
        };
        let (count, period) = match (rate, spec.limit, window) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(self.error(path, "give either a rate or limit + window, not both"));
            }
            (Some((n, p)), None, None) => (n, p),
            (None, Some(limit), Some(window)) => (limit.get(), window),
            (None, Some(_), None) => {
                return Err(self.error(&[path, &["window"]].concat(), "`limit` needs a `window`"));
            }
            (None, None, Some(_)) => {
                return Err(self.error(&[path, &["limit"]].concat(), "`window` needs a `limit`"));
            }
            (None, None, None) => {
                return Err(self.error(
                    path,
                    "missing rate: give requests_per_second, requests_per_minute, requests_per_hour, or limit + window",
                ));
            }
        };
        let field = |name: &'static str| [path, &[name]].concat();
        let quota = match algorithm {
            Algorithm::TokenBucket => {
                let q = Quota::per_period(count, period)
                    .map_err(|e| self.error(path, e.to_string()))?;
                match spec.burst_limit {
                    Some(b) => q
                        .with_burst(b.get())
                        .map_err(|e| self.error(&field("burst_limit"), e.to_string()))?,
                    None => q,
                }
            }
            Algorithm::LeakyBucket => {
                let q = Quota::per_period(count, period)
                    .map_err(|e| self.error(path, e.to_string()))?;
                let max_delay = match (&spec.max_delay, spec.burst_limit) {
                    (Some(d), _) => self.duration(&field("max_delay"), d)?,
                    (None, Some(b)) => q.interval() * (b.get() - 1),
                    (None, None) => Duration::ZERO,
                };
                q.shaped(max_delay)
                    .map_err(|e| self.error(&field("max_delay"), e.to_string()))?
            }
            other => {
                Quota::window(other, count, period).map_err(|e| self.error(path, e.to_string()))?
            }
        };
        if spec.max_delay.is_some() && algorithm != Algorithm::LeakyBucket {
            return Err(self.error(
                &field("max_delay"),
                "max_delay applies to the leaky_bucket algorithm only",
            ));
        }
        Ok(quota)
    }
}

fn yaml_error(file: &Path, text: &str, e: &serde_yaml_ng::Error) -> ConfigError {
    let message = e.to_string();
    // serde_yaml_ng writes "path.to.field: what ... at line L column C".
    let (field, rest) = match message.split_once(": ") {
        Some((field, rest))
            if !field.contains(' ') && field.chars().all(|c| c.is_ascii_graphic()) =>
        {
            (Some(field.to_owned()), rest.to_owned())
        }
        _ => (None, message.clone()),
    };
    // The position is reported as the line of the error; drop the parser's own copy of it
    // ("... at line 3 column 34, while parsing a flow mapping" -> "..., while parsing a flow
    // mapping").
    let rest = match rest.find(" at line ") {
        Some(i) => {
            let tail = &rest[i + " at line ".len()..];
            let skip = tail
                .find(|c: char| !(c.is_ascii_digit() || c == ' ' || c.is_ascii_alphabetic()))
                .unwrap_or(tail.len());
            format!("{}{}", &rest[..i], &tail[skip..])
        }
        None => rest,
    };
    // A key given twice is reported where its mapping starts: point at the second one.
    let twice = rest
        .strip_prefix("duplicate field `")
        .and_then(|r| r.strip_suffix('`'))
        .or_else(|| {
            rest.strip_prefix('`')
                .and_then(|r| r.strip_suffix(&format!("` {GIVEN_TWICE}")))
        });
    let line = match (e.location(), twice) {
        (Some(at), Some(key)) => {
            Some(second_key_line(text, at.line(), at.column(), key).unwrap_or(at.line()))
        }
        (at, _) => at.map(|l| l.line()),
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        field,
        message: rest,
    }
}

/// The line (1-based) of the second `key:` of the mapping that starts at `line`, `column`
/// (1-based, where the parser reports a key given twice), in block or flow style.
fn second_key_line(text: &str, line: usize, column: usize, key: &str) -> Option<usize> {
    let indent = column.checked_sub(1)?;
    let mut seen = 0;
    for (i, l) in yaml_lines(text).enumerate().skip(line.checked_sub(1)?) {
        let trimmed = l.trim_start();
        let own_indent = l.len() - trimmed.len();
        let first = i + 1 == line;
        if !first && !trimmed.is_empty() && !trimmed.starts_with('#') {
            if own_indent < indent {
                break;
            }
            if own_indent > indent {
                continue;
            }
        }
        let from = if first {
            indent.min(l.len())
        } else {
            own_indent
        };
        // The parser counts columns in characters: a byte offset past a multi-byte one may fall
        // inside a character, and then the whole line is searched.
        seen += key_occurrences(l.get(from..).unwrap_or(l), key);
        if seen >= 2 {
            return Some(i + 1);
        }
    }
    None
}

/// How many times `key` appears as a mapping key (`key:`, `"key":`, `'key':`) in `line`.
fn key_occurrences(line: &str, key: &str) -> usize {
    let line = line.split(" #").next().unwrap_or(line);
    let bytes = line.as_bytes();
    line.match_indices(key)
        .filter(|&(pos, _)| {
            let before = pos.checked_sub(1).map(|p| bytes[p]);
            let after = &line[pos + key.len()..];
            let quoted = matches!(before, Some(b'"' | b'\''));
            let key_start = match before {
                None => true,
                Some(b' ' | b'{' | b',') => true,
                Some(b'"' | b'\'') => pos < 2 || matches!(bytes[pos - 2], b' ' | b'{' | b','),
                _ => false,
            };
            let colon = if quoted {
                after.starts_with("\":") || after.starts_with("':")
            } else {
                after.starts_with(':')
            };
            key_start && colon
        })
        .count()
}

/// A store as a reload message names it (no password: only the host part of a URL).
fn describe_store(store: &StoreConfig) -> String {
    let host = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        rest.split('/').next().unwrap_or(rest).to_owned()
    };
    match store {
        StoreConfig::Memory => "memory".to_owned(),
        StoreConfig::Redis { url, prefix } => format!("redis at {} (prefix {prefix})", host(url)),
        StoreConfig::Cluster { nodes, prefix } => format!(
            "redis cluster at {} (prefix {prefix})",
            nodes.iter().map(|n| host(n)).collect::<Vec<_>>().join(", ")
        ),
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message: format!("cannot read the file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Validates configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let file = file.as_ref();
        let parsed: File = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(file, text, &e))?;
        let ctx = Ctx { file, text };

        let mut policy = Policy::builder().shadow(parsed.shadow);
        if let Some(mode) = &parsed.headers {
            let mode: HeaderMode =
                mode.parse()
                    .map_err(|e: crate::http::headers::ParseHeaderModeError| {
                        ctx.error(&["headers"], e.to_string())
                    })?;
            policy = policy.headers(mode);
        }
        if parsed.rate_limits.is_empty() && parsed.limits.is_empty() {
            return Err(ctx.error(
                &["rate_limits"],
                "at least one tier (rate_limits) or one limit (limits) is needed",
            ));
        }
        let mut limits = Vec::with_capacity(parsed.limits.len());
        for (name, spec) in parsed.limits.iter() {
            if name.is_empty() || name.contains(['{', '}']) {
                return Err(ctx.error(
                    &["limits"],
                    format!("invalid limit name `{name}`: it must be non-empty, without {{ or }}"),
                ));
            }
            limits.push((name.clone(), ctx.quota(&["limits", name], spec)?));
        }
        let mut tier_limits = Vec::with_capacity(parsed.rate_limits.len());
        for (name, spec) in parsed.rate_limits.iter() {
            let quota = ctx.quota(&["rate_limits", name], spec)?;
            tier_limits.push(quota.limit());
            policy = policy.tier(name, quota);
        }
        if let Some(spec) = &parsed.global {
            policy = policy.global(ctx.quota(&["global"], spec)?);
        }
        let largest_tier = tier_limits.iter().copied().max().unwrap_or(0);
        for (i, spec) in parsed.routes.iter().enumerate() {
            let index = format!("[{i}]");
            let value = format!("={}", spec.path);
            let at = |field: &'static str| ["routes", index.as_str(), value.as_str(), field];
            if !spec.path.starts_with('/') {
                return Err(ctx.error(
                    &at("path"),
                    format!("route path `{}` must start with /", spec.path),
                ));
            }
            let mut route = Route::new(&spec.path);
            if let Some(method) = &spec.method {
                let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                    .map_err(|_| ctx.error(&at("method"), format!("invalid method `{method}`")))?;
                route = route.method(method);
            }
            if let Some(cost) = spec.cost {
                if cost > largest_tier {
                    return Err(ctx.error(
                        &at("cost"),
                        format!(
                            "the cost {cost} is more than any tier can ever allow (the largest \
                             holds {largest_tier}): every request to the route would be refused"
                        ),
                    ));
                }
                route = route.cost(cost);
            }
            if let Some(limit) = &spec.limit {
                let quota = ctx.quota(&at("limit"), limit)?;
                if spec.cost.unwrap_or(1) > quota.limit() {
                    return Err(ctx.error(
                        &at("cost"),
                        format!(
                            "the cost is more than the route's limit can ever hold ({})",
                            quota.limit()
                        ),
                    ));
                }
                route = route.limit(quota);
            }
            policy = policy.route(route);
        }
        for path in &parsed.exempt_paths {
            policy = policy.exempt_path(path);
        }
        let anonymous = parsed
            .anonymous_tier
            .clone()
            .unwrap_or_else(|| "anonymous".to_owned());
        if !parsed.rate_limits.is_empty() && !parsed.rate_limits.contains_key(&anonymous) {
            return Err(ctx.error(
                &["rate_limits"],
                format!("tier `{anonymous}` is needed for callers without an API key"),
            ));
        }
        let mut entries = Vec::with_capacity(parsed.api_keys.len());
        for (key, spec) in parsed.api_keys.iter() {
            if key.is_empty() || key.trim() != key {
                return Err(ctx.error(
                    &["api_keys"],
                    format!(
                        "the API key of user `{}` is empty or starts or ends with whitespace; \
                         no request could present it as written",
                        spec.user
                    ),
                ));
            }
            if !parsed.rate_limits.contains_key(&spec.tier) {
                return Err(ctx.error(
                    &["api_keys", key, "tier"],
                    format!(
                        "unknown tier `{}` (tiers: {})",
                        spec.tier,
                        parsed
                            .rate_limits
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
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
        for cidr in &parsed.trusted_proxies {
            trusted.push(
                parse_cidr(cidr).map_err(|e| ctx.error(&["trusted_proxies"], e.to_string()))?,
            );
        }
        let header = match &parsed.client_ip_header {
            Some(name) => name
                .parse::<ForwardedHeader>()
                .map_err(|e| ctx.error(&["client_ip_header"], e))?,
            None => ForwardedHeader::default(),
        };
        let keys = ApiKeys::new(
            entries,
            ClientIp::new(
                &anonymous,
                trusted
                    .into_iter()
                    .collect::<TrustedProxies>()
                    .with_header(header),
            ),
        );
        let policy = policy
            .build()
            .map_err(|e| ctx.error(&["routes"], e.to_string()))?;

        let (store, on_error, timeout) = match &parsed.store {
            StoreSpec::Default | StoreSpec::Memory => (
                StoreConfig::Memory,
                OnStoreError::default(),
                crate::limiter::DEFAULT_STORE_TIMEOUT,
            ),
            StoreSpec::Redis(redis) => {
                let prefix = redis
                    .prefix
                    .clone()
                    .unwrap_or_else(|| "tollgate".to_owned());
                let store = match (&redis.url, &redis.cluster) {
                    (Some(url), None) => StoreConfig::Redis {
                        url: url.clone(),
                        prefix,
                    },
                    (None, Some(nodes)) if !nodes.is_empty() => StoreConfig::Cluster {
                        nodes: nodes.clone(),
                        prefix,
                    },
                    (None, None) => StoreConfig::Redis {
                        url: "redis://127.0.0.1:6379".to_owned(),
                        prefix,
                    },
                    _ => {
                        return Err(ctx.error(
                            &["store", "redis"],
                            "give either url or a non-empty cluster list",
                        ));
                    }
                };
                let on_error = match &redis.on_error {
                    Some(s) => s
                        .parse()
                        .map_err(|e: String| ctx.error(&["store", "redis", "on_error"], e))?,
                    None => OnStoreError::default(),
                };
                let timeout = match redis.timeout_ms {
                    Some(0) => {
                        return Err(ctx.error(
                            &["store", "redis", "timeout_ms"],
                            "the timeout must be at least 1 ms",
                        ));
                    }
                    Some(ms) if Duration::from_millis(ms) > crate::limiter::MAX_STORE_TIMEOUT => {
                        return Err(ctx.error(
                            &["store", "redis", "timeout_ms"],
                            format!(
                                "{ms} ms is too long: at most {} ms (a store call adds this much \
                                 latency to a request before the failure policy answers)",
                                crate::limiter::MAX_STORE_TIMEOUT.as_millis()
                            ),
                        ));
                    }
                    Some(ms) => Duration::from_millis(ms),
                    None => crate::limiter::DEFAULT_STORE_TIMEOUT,
                };
                (store, on_error, timeout)
            }
        };
        Ok(Config {
            policy,
            keys,
            store,
            on_error,
            timeout,
            limits,
        })
    }
}

impl Config {
    /// What of this (newly loaded) configuration a reload cannot apply to a layer built from
    /// `running`: a reload swaps the policy ([`PolicyHandle::set`](crate::inbound::PolicyHandle::set))
    /// and the API keys ([`ApiKeys::replace_with`]), but the store, its failure policy and its
    /// timeout are fixed when the layer is built. One line per field that differs, saying what
    /// stays in force until a restart; empty when the whole file applies.
    pub fn needs_restart(&self, running: &Config) -> Vec<String> {
        let mut out = Vec::new();
        if self.store != running.store {
            out.push(format!(
                "store: {} (the file says {})",
                describe_store(&running.store),
                describe_store(&self.store)
            ));
        }
        if self.on_error != running.on_error {
            out.push(format!(
                "store.redis.on_error: {:?} (the file says {:?})",
                running.on_error, self.on_error
            ));
        }
        if self.timeout != running.timeout {
            out.push(format!(
                "store.redis.timeout_ms: {} (the file says {})",
                running.timeout.as_millis(),
                self.timeout.as_millis()
            ));
        }
        out
    }

    /// Builds the inbound layer this configuration describes. A Redis store connects lazily (the
    /// application starts even while Redis is down; the failure policy covers the meantime), so
    /// this must run inside a Tokio runtime. Needs the `redis` feature for a Redis store.
    pub fn layer(&self) -> Result<crate::inbound::RateLimitLayer<ApiKeys>, ConfigError> {
        if self.policy.tier(&self.keys.anonymous_tier()).is_none() {
            return Err(ConfigError {
                file: PathBuf::new(),
                line: None,
                field: Some("rate_limits".to_owned()),
                message: "the configuration has no tiers for the inbound layer".to_owned(),
            });
        }
        let builder =
            crate::inbound::RateLimitLayer::builder(self.policy.clone(), self.keys.clone())
                .on_store_error(self.on_error)
                .timeout(self.timeout);
        let builder = match self.shared_store()? {
            Some(store) => builder.shared_store(store),
            None => builder,
        };
        // Everything `build` checks was checked against the file already; a mistake here is in a
        // configuration changed after loading.
        builder.build().map_err(|e| ConfigError {
            file: PathBuf::new(),
            line: None,
            field: None,
            message: e.to_string(),
        })
    }

    /// Builds the plain [`Limiter`](crate::limiter::Limiter) of the `limits:` section over the
    /// file's store, with its failure policy and timeout. A Redis store connects lazily, so this
    /// must run inside a Tokio runtime (for synchronous code, build the limiter yourself with
    /// [`LimiterBuilder::store_with`](crate::limiter::LimiterBuilder::store_with)).
    pub fn limiter(&self) -> Result<crate::limiter::Limiter, ConfigError> {
        let error = |message: String| ConfigError {
            file: PathBuf::new(),
            line: None,
            field: Some("limits".to_owned()),
            message,
        };
        if self.limits.is_empty() {
            return Err(error(
                "the configuration has no `limits:` section".to_owned(),
            ));
        }
        let builder = self
            .limits
            .iter()
            .fold(crate::limiter::Limiter::builder(), |b, (name, quota)| {
                b.limit(name, *quota)
            })
            .on_store_error(self.on_error)
            .timeout(self.timeout);
        let builder = match self.shared_store()? {
            Some(store) => builder.shared_store(store),
            None => builder,
        };
        builder.build().map_err(|e| error(e.to_string()))
    }

    /// The configured store, built; `None` for this process's memory (the builders' default).
    fn shared_store(
        &self,
    ) -> Result<Option<std::sync::Arc<dyn tollgate_core::DynStore>>, ConfigError> {
        match &self.store {
            StoreConfig::Memory => Ok(None),
            #[cfg(feature = "redis")]
            StoreConfig::Redis { url, prefix } => Ok(Some(std::sync::Arc::new(self.redis(
                tollgate_redis::RedisStore::builder(url.clone()).prefix(prefix.clone()),
            )?))),
            #[cfg(feature = "redis")]
            StoreConfig::Cluster { nodes, prefix } => Ok(Some(std::sync::Arc::new(self.redis(
                tollgate_redis::RedisStore::cluster_builder(nodes.clone()).prefix(prefix.clone()),
            )?))),
            #[cfg(not(feature = "redis"))]
            StoreConfig::Redis { .. } | StoreConfig::Cluster { .. } => Err(ConfigError {
                file: PathBuf::new(),
                line: None,
                field: Some("store".to_owned()),
                message: "a Redis store needs tollgate's `redis` feature".to_owned(),
            }),
        }
    }

    #[cfg(feature = "redis")]
    fn redis(
        &self,
        builder: tollgate_redis::RedisStoreBuilder,
    ) -> Result<tollgate_redis::RedisStore, ConfigError> {
        builder
            .timeout(self.timeout)
            .build()
            .map_err(|e| ConfigError {
                file: PathBuf::new(),
                line: None,
                field: Some("store.redis".to_owned()),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
store: memory
headers: both
shadow: false
global:
  requests_per_second: 1000
  burst_limit: 2000
rate_limits:
  anonymous:  { requests_per_minute: 10,   burst_limit: 5 }
  basic:      { requests_per_minute: 100,  burst_limit: 20 }
  pro:        { requests_per_minute: 500,  burst_limit: 100 }
  enterprise: { requests_per_minute: 1000, burst_limit: 200, algorithm: sliding_window_log }
  windowed:   { limit: 30, window: 10s, algorithm: fixed_window }
routes:
  - { method: POST, path: /api/reports, cost: 5 }
  - { path: /api/search, limit: { requests_per_minute: 30, burst_limit: 10 } }
api_keys:
  key-alice: { user: alice, tier: basic }
  key-bob:   { user: bob,   tier: pro }
trusted_proxies: ["127.0.0.1/32"]
"#;

    fn err(text: &str) -> ConfigError {
        Config::parse(text, "limits.yaml").unwrap_err()
    }

    #[test]
    fn the_design_example_loads() {
        let c = Config::parse(GOOD, "limits.yaml").unwrap();
        let (_, basic) = c.policy.tier("basic").unwrap();
        assert_eq!(basic.limit(), 20);
        assert_eq!(basic.interval(), Duration::from_millis(600));
        let (_, ent) = c.policy.tier("enterprise").unwrap();
        assert_eq!(ent.algorithm(), Algorithm::SlidingWindowLog);
        assert_eq!(
            (ent.limit(), ent.interval()),
            (1000, Duration::from_secs(60))
        );
        assert_eq!(c.policy.global().unwrap().limit(), 2000);
        assert_eq!(
            c.policy
                .route(&Method::POST, "/api/reports")
                .unwrap()
                .request_cost(),
            5
        );
        assert_eq!(c.store, StoreConfig::Memory);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err(&GOOD.replace("100,  burst_limit: 20 }", "100,  burst_limit: 0 }"));
        assert_eq!(e.line, Some(10), "{e}");
        assert!(
            e.to_string()
                .starts_with("limits.yaml:10: rate_limits.basic.burst_limit"),
            "{e}"
        );

        let e = err(&GOOD.replace("requests_per_minute: 100,", "requests_per_minute: 0,"));
        assert_eq!(e.line, Some(10), "{e}");

        let e = err(&GOOD.replace("tier: pro }", "tier: platinum }"));
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(19), Some("api_keys.key-bob.tier")),
            "{e}"
        );
        assert!(e.message.contains("platinum"));

        let e = err(&GOOD.replace("shadow: false", "shadow: false\nsurprise: 1"));
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("surprise"), "{e}");

        let e = err(&GOOD.replace("window: 10s", "window: 10 parsecs"));
        assert_eq!(e.line, Some(13), "{e}");
        assert_eq!(e.field.as_deref(), Some("rate_limits.windowed.window"));

        let e = err(&GOOD.replace(
            "requests_per_minute: 30, burst_limit: 10",
            "requests_per_minute: 30, burst_limit: 0",
        ));
        assert_eq!(e.line, Some(16), "{e}");
        let e = err(&GOOD.replace(
            "cost: 5",
            "cost: 5, limit: { requests_per_minute: 1, burst_limit: 2 }",
        ));
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(15), Some("routes[0].cost")),
            "{e}"
        );

        let e = err("rate_limits: [\n");
        assert!(e.line.is_some(), "{e}");
    }

    /// Found by the `config` fuzz target: a file with lone `\r` line ends (old Mac style) was
    /// numbered by the parser one way and by the error locator another.
    #[test]
    fn lines_are_counted_as_the_parser_counts_them() {
        assert_eq!(
            yaml_lines("a\nb\r\nc\rd").collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(yaml_lines("a\n").collect::<Vec<_>>(), ["a"]);
        assert_eq!(yaml_lines("").count(), 0);
        for eol in ["\n", "\r\n", "\r"] {
            let text = GOOD.replace('\n', eol);
            // Found after parsing (the locator): the unknown tier of key-bob, line 19.
            let e = err(&text.replace("tier: pro }", "tier: platinum }"));
            assert_eq!(e.line, Some(19), "{eol:?}: {e}");
            // Found by the parser.
            let e = err(&text.replace("shadow: false", "shadow: false\nsurprise: 1"));
            assert!(e.line.is_some_and(|l| l <= 25), "{eol:?}: {e}");
        }
    }

    #[test]
    fn a_key_given_twice_is_found_where_it_is_given_again() {
        let e = err(
            "rate_limits:\n  basic: { requests_per_hour: 1 }\n  pro: { requests_per_hour: 2 }\n  basic: { requests_per_hour: 3 }\n",
        );
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(4), Some("rate_limits")),
            "{e}"
        );
        assert!(e.message.contains("`basic` is given twice"), "{e}");
        // Flow style: the same line.
        let e = err("rate_limits: { a: { requests_per_hour: 1 }, a: { requests_per_hour: 2 } }\n");
        assert_eq!(e.line, Some(1), "{e}");
        // Multi-byte characters before the mapping do not throw the search off a character.
        let e = err(
            "rate_limits:\n  \u{e9}t\u{e9}: { requests_per_hour: 1 }\n  \u{e9}t\u{e9}: { requests_per_hour: 2 }\n",
        );
        assert_eq!(e.line, Some(3), "{e}");
        let e = err(
            "rate_limits: { \u{e9}\u{e9}\u{e9}: { requests_per_hour: 1 }, \u{e9}\u{e9}\u{e9}: { requests_per_hour: 2 } }\n",
        );
        assert!(e.line.is_some(), "{e}");
        // A field of a struct given twice.
        let e = err(
            "rate_limits:\n  a:\n    requests_per_hour: 1\n    burst_limit: 2\n    requests_per_hour: 3\n",
        );
        assert_eq!(e.line, Some(5), "{e}");
    }

    #[test]
    fn the_limits_section_builds_a_limiter() {
        let text = "limits:\n  slack:   { requests_per_second: 1, burst_limit: 20 }\n  webhook: { requests_per_second: 100, burst_limit: 10 }\n  events:  { limit: 30, window: 1m, algorithm: fixed_window }\n";
        let c = Config::parse(text, "limits.yaml").expect("a limits-only file loads");
        let names: Vec<&str> = c.limits.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["events", "slack", "webhook"]);
        let limiter = c.limiter().expect("a limiter");
        assert_eq!(limiter.quota("slack").map(Quota::limit), Some(20));
        assert_eq!(
            limiter.quota("events").map(Quota::algorithm),
            Some(Algorithm::FixedWindow)
        );
        // No tiers: the inbound layer cannot be built from it, and says why.
        let e = c.layer().expect_err("no tiers");
        assert!(e.to_string().contains("no tiers"), "{e}");
        // The same file:line:field errors as the tiers.
        let e = err(&text.replace("burst_limit: 10", "burst_limit: 0"));
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(3), Some("limits.webhook.burst_limit")),
            "{e}"
        );
        let e = err(&format!("{text}  slack: {{ requests_per_second: 2 }}\n"));
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("`slack` is given twice"), "{e}");
        let e = err("limits:\n  \"{x}\": { requests_per_second: 1 }\n");
        assert!(e.message.contains("invalid limit name"), "{e}");
        // Neither tiers nor limits: nothing to enforce.
        let e = err("headers: both\n");
        assert!(e.message.contains("at least one tier"), "{e}");
        // A file with tiers has no limiter unless it has limits.
        let tiers = Config::parse(GOOD, "limits.yaml").expect("loads");
        assert!(tiers.limiter().is_err());
    }

    #[test]
    fn errors_without_a_file_have_no_empty_prefix() {
        let e = ConfigError {
            file: PathBuf::new(),
            line: None,
            field: Some("store.redis".to_owned()),
            message: "invalid redis url `x`".to_owned(),
        };
        assert_eq!(e.to_string(), "store.redis: invalid redis url `x`");
        let e = ConfigError { field: None, ..e };
        assert_eq!(e.to_string(), "invalid redis url `x`");
    }
}

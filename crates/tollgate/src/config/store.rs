//! The `store:` section: `memory` or `{ redis: { ... } }` (a URL, a cluster or a Sentinel
//! group), read, validated, and built.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::position::FieldPath;
use super::unique::{NoRepeats, no_repeated_keys};
use super::validate::Ctx;
use super::{Config, ConfigError};
use crate::inbound::OnStoreError;

/// Where the limit state lives, as configured.
///
/// Its `Debug` form (what a log line prints) never shows a password: the one in a URL
/// (`redis://:secret@host`) and the Sentinel master's are replaced with `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
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
    /// The master of a Redis Sentinel group, found (and followed through a failover) through
    /// its sentinels.
    Sentinel {
        /// The name the sentinels monitor the master under.
        master: String,
        /// The sentinels' URLs (with the sentinels' own credentials, if they have any).
        nodes: Vec<String>,
        /// Key prefix.
        prefix: String,
        /// The ACL user the master's password belongs to (`None`: the `default` user).
        username: Option<String>,
        /// The master's (and its replicas') password, `None` for none.
        password: Option<String>,
        /// The database number on the master.
        db: i64,
    },
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Memory => f.write_str("Memory"),
            StoreConfig::Redis { url, prefix } => f
                .debug_struct("Redis")
                .field("url", &redact_url(url))
                .field("prefix", prefix)
                .finish(),
            StoreConfig::Cluster { nodes, prefix } => f
                .debug_struct("Cluster")
                .field("nodes", &redact_urls(nodes))
                .field("prefix", prefix)
                .finish(),
            StoreConfig::Sentinel {
                master,
                nodes,
                prefix,
                username,
                password,
                db,
            } => f
                .debug_struct("Sentinel")
                .field("master", master)
                .field("nodes", &redact_urls(nodes))
                .field("prefix", prefix)
                .field("username", username)
                .field("password", &password.as_ref().map(|_| "<redacted>"))
                .field("db", db)
                .finish(),
        }
    }
}

/// [`redact_url`] of each.
fn redact_urls(urls: &[String]) -> Vec<String> {
    urls.iter().map(|u| redact_url(u)).collect()
}

/// `url` with the password of its user part, if any, replaced with `<redacted>`.
pub(super) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The user part ends at the last `@` before the path.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:<redacted>@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// `store:` as written. Read by hand rather than as an untagged enum, whose only error is "data
/// did not match any variant".
#[derive(Debug, Default)]
pub(super) enum StoreSpec {
    #[default]
    Default,
    Memory,
    Redis(Box<RedisSpec>),
}

/// `store: { redis: { ... } }`.
#[derive(Clone, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub(super) struct RedisSpec {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    cluster: Option<Vec<String>>,
    #[serde(default)]
    sentinel: Option<SentinelSpec>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    on_error: Option<String>,
}

no_repeated_keys!(RedisSpec);

impl fmt::Debug for RedisSpec {
    /// Never a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSpec")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("cluster", &self.cluster.as_deref().map(redact_urls))
            .field("sentinel", &self.sentinel)
            .field("prefix", &self.prefix)
            .field("timeout_ms", &self.timeout_ms)
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// `store: { redis: { sentinel: { master: NAME, nodes: [URL, ..], username, password, db } } }`.
#[derive(Clone, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub(super) struct SentinelSpec {
    master: String,
    nodes: Vec<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    db: Option<i64>,
}

impl fmt::Debug for SentinelSpec {
    /// Never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelSpec")
            .field("master", &self.master)
            .field("nodes", &redact_urls(&self.nodes))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

no_repeated_keys!(SentinelSpec);

const STORE_EXPECTED: &str = "`memory` or `{ redis: { url: ... } }`";

impl<'de> Deserialize<'de> for StoreSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<StoreSpec, D::Error> {
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
                // `redis` given twice is refused by `NoRepeats`, at the second one.
                while let Some(kind) = map.next_key::<String>()? {
                    match kind.as_str() {
                        "redis" => spec = Some(map.next_value::<RedisSpec>()?),
                        other => {
                            return Err(A::Error::custom(format!(
                                "unknown store `{other}`: expected {STORE_EXPECTED}"
                            )));
                        }
                    }
                }
                spec.map(|s| StoreSpec::Redis(Box::new(s))).ok_or_else(|| {
                    A::Error::custom(format!("empty store: expected {STORE_EXPECTED}"))
                })
            }
        }
        NoRepeats(d).deserialize_any(Visitor)
    }
}

/// The store section, validated: where the state lives, the failure policy, the store timeout.
pub(super) struct StoreSettings {
    pub(super) store: StoreConfig,
    pub(super) on_error: OnStoreError,
    pub(super) timeout: Duration,
}

impl StoreSpec {
    pub(super) fn validate(&self, ctx: &Ctx<'_>) -> Result<StoreSettings, ConfigError> {
        let redis = match self {
            StoreSpec::Default | StoreSpec::Memory => {
                return Ok(StoreSettings {
                    store: StoreConfig::Memory,
                    on_error: OnStoreError::default(),
                    timeout: crate::limiter::DEFAULT_STORE_TIMEOUT,
                });
            }
            StoreSpec::Redis(redis) => redis,
        };
        let field = |name: &str| FieldPath::top("store").key("redis").key(name);
        let prefix = redis
            .prefix
            .clone()
            .unwrap_or_else(|| "tollgate".to_owned());
        let store = match (&redis.url, &redis.cluster, &redis.sentinel) {
            (None, None, Some(sentinel)) => {
                let at = |name: &str| field("sentinel").key(name);
                if sentinel.master.is_empty() {
                    return Err(ctx.error(
                        &at("master"),
                        "the master name (as the sentinels monitor it) must not be empty",
                    ));
                }
                if sentinel.nodes.is_empty() {
                    return Err(ctx.error(
                        &at("nodes"),
                        "give at least one sentinel url (`redis://host:26379`)",
                    ));
                }
                if sentinel.password.as_deref() == Some("") {
                    return Err(ctx.error(
                        &at("password"),
                        "an empty password: leave `password` out if the master has none",
                    ));
                }
                if sentinel.username.is_some() && sentinel.password.is_none() {
                    return Err(ctx.error(
                        &at("username"),
                        "a username needs its `password` (the master's ACL user)",
                    ));
                }
                let db = sentinel.db.unwrap_or(0);
                if db < 0 {
                    return Err(ctx.error(
                        &at("db"),
                        format!("database {db}: a database number is 0 or more"),
                    ));
                }
                StoreConfig::Sentinel {
                    master: sentinel.master.clone(),
                    nodes: sentinel.nodes.clone(),
                    prefix,
                    username: sentinel.username.clone(),
                    password: sentinel.password.clone(),
                    db,
                }
            }
            (Some(url), None, None) => StoreConfig::Redis {
                url: url.clone(),
                prefix,
            },
            (None, Some(nodes), None) if !nodes.is_empty() => StoreConfig::Cluster {
                nodes: nodes.clone(),
                prefix,
            },
            (None, None, None) => StoreConfig::Redis {
                url: "redis://127.0.0.1:6379".to_owned(),
                prefix,
            },
            _ => {
                return Err(ctx.error(
                    &FieldPath::top("store").key("redis"),
                    "give one of url, a non-empty cluster list, or sentinel",
                ));
            }
        };
        let on_error = match &redis.on_error {
            Some(s) => s
                .parse()
                .map_err(|e: String| ctx.error(&field("on_error"), e))?,
            None => OnStoreError::default(),
        };
        let timeout = match redis.timeout_ms {
            Some(0) => {
                return Err(ctx.error(&field("timeout_ms"), "the timeout must be at least 1 ms"));
            }
            Some(ms) if Duration::from_millis(ms) > crate::limiter::MAX_STORE_TIMEOUT => {
                return Err(ctx.error(
                    &field("timeout_ms"),
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
        Ok(StoreSettings {
            store,
            on_error,
            timeout,
        })
    }
}

/// A store as a reload message names it (no password: only the host part of a URL).
pub(super) fn describe_store(store: &StoreConfig) -> String {
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
        StoreConfig::Sentinel {
            master,
            nodes,
            prefix,
            ..
        } => format!(
            "redis master `{master}` through the sentinels at {} (prefix {prefix})",
            nodes.iter().map(|n| host(n)).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The configured store, built; `None` for this process's memory (the builders' default).
pub(super) fn build(
    config: &Config,
) -> Result<Option<Arc<dyn tollgate_core::DynStore>>, ConfigError> {
    match &config.store {
        StoreConfig::Memory => Ok(None),
        #[cfg(feature = "redis")]
        StoreConfig::Redis { url, prefix } => redis(
            config,
            tollgate_redis::RedisStore::builder(url.clone()).prefix(prefix.clone()),
        ),
        #[cfg(feature = "redis")]
        StoreConfig::Cluster { nodes, prefix } => redis(
            config,
            tollgate_redis::RedisStore::cluster_builder(nodes.clone()).prefix(prefix.clone()),
        ),
        #[cfg(feature = "redis")]
        StoreConfig::Sentinel {
            master,
            nodes,
            prefix,
            username,
            password,
            db,
        } => {
            let mut builder =
                tollgate_redis::RedisStore::sentinel_builder(master.clone(), nodes.clone())
                    .prefix(prefix.clone());
            if let Some(password) = password {
                builder = builder.master_auth(username.as_deref(), password.clone());
            }
            if *db != 0 {
                builder = builder.master_db(*db);
            }
            redis(config, builder)
        }
        #[cfg(not(feature = "redis"))]
        StoreConfig::Redis { .. } | StoreConfig::Cluster { .. } | StoreConfig::Sentinel { .. } => {
            Err(config.store_error("store", "a Redis store needs tollgate's `redis` feature"))
        }
    }
}

#[cfg(feature = "redis")]
fn redis(
    config: &Config,
    builder: tollgate_redis::RedisStoreBuilder,
) -> Result<Option<Arc<dyn tollgate_core::DynStore>>, ConfigError> {
    let store = builder
        .timeout(config.timeout)
        .build()
        .map_err(|e| config.store_error("store.redis", e))?;
    Ok(Some(Arc::new(store)))
}

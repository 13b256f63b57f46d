//! [`Config`]: loading a file or text, what a reload cannot apply, and building the inbound layer
//! and the plain limiter from it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tollgate_core::Quota;

use super::ConfigError;
use super::store::{self, StoreConfig, describe_store};
use super::validate::validate;
use crate::inbound::{ApiKeys, OnStoreError, Policy};

/// The name errors give text parsed without one ([`Config::from_str`], or [`Config::parse`] with
/// an empty name).
pub(super) const INLINE: &str = "(inline config)";

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
    /// Where it was read from, for the errors found after loading.
    pub(super) origin: Origin,
}

/// Where a [`Config`] was read from.
#[derive(Debug, Clone)]
pub(super) struct Origin {
    /// The file, or the name the text was given.
    pub(super) file: PathBuf,
    /// The store as the file gives it: a different [`Config::store`] was set after loading.
    pub(super) store: StoreConfig,
    /// The line of the file's `store: { redis: ... }`, if it has one.
    pub(super) store_line: Option<usize>,
}

impl Config {
    /// Reads and validates a configuration file. Its errors, and those of [`Config::layer`] and
    /// [`Config::limiter`] later, name `path`.
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

    /// Validates configuration text; `file` names it in errors (`(inline config)` when empty).
    ///
    /// ```
    /// use tollgate::config::Config;
    ///
    /// let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 0 }\n";
    /// let e = Config::parse(text, "limits.yaml").unwrap_err();
    /// assert_eq!(e.to_string(), "limits.yaml:2: rate_limits.anonymous.burst_limit: \
    ///                            invalid value: integer `0`, expected a nonzero u32");
    /// ```
    pub fn parse(text: &str, file: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let file = file.as_ref();
        let file = if file.as_os_str().is_empty() {
            Path::new(INLINE)
        } else {
            file
        };
        validate(text, file)
    }

    /// Where this configuration was read from: the path given to [`Config::load`], the name given
    /// to [`Config::parse`], or `(inline config)`.
    pub fn source(&self) -> &Path {
        &self.origin.file
    }

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
        let adaptive = |c: &Config| {
            c.policy
                .adaptive()
                .map(|a| (a.config.clone(), a.priority.clone()))
        };
        if adaptive(self) != adaptive(running) {
            out.push(
                "adaptive: the settings and priority it started with (the quotas it lowers \
                 do follow the file)"
                    .to_owned(),
            );
        }
        out
    }

    /// Builds the inbound layer this configuration describes. A Redis store connects lazily (the
    /// application starts even while Redis is down; the failure policy covers the meantime), so
    /// this must run inside a Tokio runtime. Needs the `redis` feature for a Redis store. Its
    /// errors name where the configuration came from ([`Config::source`]).
    pub fn layer(&self) -> Result<crate::inbound::RateLimitLayer<ApiKeys>, ConfigError> {
        let builder = self.layer_builder()?;
        // Everything `build` checks was checked against the file already; a mistake here is in a
        // configuration changed after loading.
        builder.build().map_err(|e| self.error(None, e))
    }

    /// The builder of [`layer`](Self::layer), set up from this configuration, for what the file
    /// does not say: the breaker, the decision extension for handlers
    /// ([`decision_extension`](crate::inbound::RateLimitLayerBuilder::decision_extension)), the
    /// denied-until cache's size. Its errors are [`layer`](Self::layer)'s.
    pub fn layer_builder(
        &self,
    ) -> Result<crate::inbound::RateLimitLayerBuilder<ApiKeys>, ConfigError> {
        if self.policy.tier(&self.keys.anonymous_tier()).is_none() {
            return Err(self.error(
                Some("rate_limits"),
                "the configuration has no tiers for the inbound layer",
            ));
        }
        let builder =
            crate::inbound::RateLimitLayer::builder(self.policy.clone(), self.keys.clone())
                .on_store_error(self.on_error)
                .timeout(self.timeout);
        Ok(match store::build(self)? {
            Some(store) => builder.shared_store(store),
            None => builder,
        })
    }

    /// Builds the plain [`Limiter`](crate::limiter::Limiter) of the `limits:` section over the
    /// file's store, with its failure policy and timeout. A Redis store connects lazily, so this
    /// must run inside a Tokio runtime (for synchronous code, build the limiter yourself with
    /// [`LimiterBuilder::store_with`](crate::limiter::LimiterBuilder::store_with)). Its errors
    /// name where the configuration came from ([`Config::source`]).
    pub fn limiter(&self) -> Result<crate::limiter::Limiter, ConfigError> {
        if self.limits.is_empty() {
            return Err(self.error(Some("limits"), "the configuration has no `limits:` section"));
        }
        let builder = self
            .limits
            .iter()
            .fold(crate::limiter::Limiter::builder(), |b, (name, quota)| {
                b.limit(name, *quota)
            })
            .on_store_error(self.on_error)
            .timeout(self.timeout);
        let builder = match store::build(self)? {
            Some(store) => builder.shared_store(store),
            None => builder,
        };
        builder.build().map_err(|e| self.error(Some("limits"), e))
    }

    /// An error found after loading, in `field`: it names where the configuration came from.
    fn error(&self, field: Option<&str>, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.origin.file.clone(),
            line: None,
            field: field.map(str::to_owned),
            message: message.to_string(),
        }
    }

    /// An error building the store, in `field`: at the file's store section, or, for a store set
    /// after loading, saying that the file is not where it came from.
    pub(super) fn store_error(&self, field: &str, message: impl fmt::Display) -> ConfigError {
        if self.store == self.origin.store {
            ConfigError {
                line: self.origin.store_line,
                ..self.error(Some(field), message)
            }
        } else {
            self.error(
                Some(field),
                format!(
                    "{message} (in a store set after loading; the file's store is {})",
                    describe_store(&self.origin.store)
                ),
            )
        }
    }
}

/// Validates configuration text, named `(inline config)` in errors.
impl FromStr for Config {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, INLINE)
    }
}

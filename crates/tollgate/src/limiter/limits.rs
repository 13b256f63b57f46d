//! [`Limits`]: what every clone of a [`Limiter`](super::Limiter) shares (its named limits,
//! its store, the runtime of its blocking forms), and the store keys of a call.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tollgate_core::Quota;

use super::error::{LimitError, RateLimited};
use super::guarded::GuardedStore;
use super::runtime::OwnRuntime;
use super::wait;
use crate::http::key::bounded_key;
use crate::metrics as m;

/// The longest identity accepted, in bytes; longer ones are refused ([`LimitError::InvalidIdentity`]).
pub const MAX_IDENTITY_LEN: usize = 4096;

/// A limiter's named limits over its guarded store.
pub(super) struct Limits {
    pub(super) store: Arc<GuardedStore>,
    quotas: HashMap<Arc<str>, Quota>,
    /// The runtime of the blocking forms, started on first use (or by
    /// [`LimiterBuilder::store_with`](super::LimiterBuilder::store_with)).
    runtime: OnceLock<OwnRuntime>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.quotas.keys().map(|n| &**n).collect();
        names.sort_unstable();
        f.debug_struct("Limiter")
            .field("limits", &names)
            .field("store", &self.store.kind())
            .finish_non_exhaustive()
    }
}

impl Limits {
    pub(super) fn new(
        store: Arc<GuardedStore>,
        quotas: HashMap<Arc<str>, Quota>,
        runtime: Option<OwnRuntime>,
    ) -> Limits {
        let once = OnceLock::new();
        if let Some(own) = runtime {
            let _ = once.set(own);
        }
        Limits {
            store,
            quotas,
            runtime: once,
        }
    }

    /// The quota of a limit, if there is one by that name.
    pub(super) fn quota(&self, limit: &str) -> Option<&Quota> {
        self.quotas.get(limit)
    }

    /// The runtime of the blocking forms, started now if it was not yet.
    pub(super) fn runtime(&self) -> Result<&tokio::runtime::Runtime, LimitError> {
        let runtime = match self.runtime.get() {
            Some(runtime) => runtime,
            None => {
                // Another thread may start one meanwhile: either serves, the other is dropped.
                let _ = self.runtime.set(OwnRuntime::start()?);
                self.runtime
                    .get()
                    .ok_or_else(|| LimitError::Runtime("no runtime after starting one".into()))?
            }
        };
        runtime.get()
    }

    /// Lets nobody pass `identity`'s `limit` for `duration`: see
    /// [`Limiter::pause`](super::Limiter::pause).
    pub(super) async fn pause(
        &self,
        limit: &str,
        identity: &str,
        duration: Duration,
    ) -> Result<(), LimitError> {
        let keys = self.keys(&[limit], identity)?;
        let (key, quota) = &keys[0];
        if !quota.algorithm().is_bucket() {
            return Err(LimitError::CannotPause {
                limit: limit.to_owned(),
                algorithm: quota.algorithm(),
            });
        }
        wait::pause(&self.store, key, quota, duration).await;
        Ok(())
    }

    /// The store keys and quotas of `limits` for `identity`, checked.
    pub(super) fn keys(
        &self,
        limits: &[&str],
        identity: &str,
    ) -> Result<Vec<(String, Quota)>, LimitError> {
        if identity.is_empty() {
            return Err(LimitError::InvalidIdentity {
                reason: "it is empty",
            });
        }
        if identity.len() > MAX_IDENTITY_LEN {
            return Err(LimitError::InvalidIdentity {
                reason: "it is longer than MAX_IDENTITY_LEN bytes",
            });
        }
        if limits.is_empty() {
            return Err(LimitError::NoLimit);
        }
        let id = bounded_key(identity);
        limits
            .iter()
            .map(|name| {
                let quota = self
                    .quotas
                    .get(*name)
                    .ok_or_else(|| LimitError::UnknownLimit {
                        name: (*name).to_owned(),
                    })?;
                let mut key = String::with_capacity(id.len() + name.len() + 5);
                key.push('{');
                key.push_str(&id);
                key.push_str("}:l:");
                key.push_str(name);
                Ok((key, *quota))
            })
            .collect()
    }

    /// The name the limiter holds for `name` (shared, for errors and metrics).
    pub(super) fn name(&self, name: &str) -> Arc<str> {
        self.quotas
            .get_key_value(name)
            .map_or_else(|| name.into(), |(k, _)| Arc::clone(k))
    }

    pub(super) fn rejected(&self, limited: RateLimited) -> LimitError {
        metrics::counter!(m::REJECTIONS_TOTAL, "limit" => Arc::clone(&limited.limit)).increment(1);
        LimitError::RateLimited(limited)
    }
}

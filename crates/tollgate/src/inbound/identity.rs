//! Who is calling: [`Identity`], the [`KeyExtractor`] trait and the built-in extractors.

use std::collections::HashMap;
use std::future::{Future, Ready, ready};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderName, Request, header};

use super::error::BuildError;
use crate::http::forwarded::{TrustedProxies, client_ip};
use crate::http::key::{DEFAULT_V6_PREFIX, MAX_KEY_LEN, bounded_key, push_ip_key};

/// The caller of a request, as the limiter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The bucket key of the caller, such as `user:alice` or `ip:203.0.113.7`; bounded in length
    /// (see [`bounded_key`]).
    pub key: String,
    /// The caller's tier: a name of the [`Policy`](super::Policy).
    pub tier: Arc<str>,
}

impl Identity {
    /// An identity with `key` in `tier`. Keys longer than
    /// [`MAX_KEY_LEN`](crate::http::key::MAX_KEY_LEN) are replaced by their fingerprint.
    pub fn new(key: &str, tier: impl Into<Arc<str>>) -> Identity {
        let tier = tier.into();
        let bounded = bounded_key(key);
        let mut owned = key_buffer(bounded.len(), &tier);
        owned.push_str(&bounded);
        Identity { key: owned, tier }
    }
}

/// What the layer appends to an identity key to make its tier's bucket key (`{<key>}:t:<tier>`).
pub(crate) const TIER_KEY_EXTRA: usize = "{}:t:".len();

/// The largest key buffer kept for reuse (a bounded key with its tier suffix fits many times).
const MAX_SPARE: usize = 1024;

thread_local! {
    /// The key buffer of the last plan this thread dropped, emptied, for the next request's key:
    /// one allocation and one free fewer per request (about 120 of the layer's instructions).
    static SPARE: std::cell::Cell<Option<String>> = const { std::cell::Cell::new(None) };
}

/// An empty key with room for `len` bytes and the tier suffix the layer appends, so building the
/// bucket key does not reallocate: the buffer a plan gave back on this thread when it is large
/// enough, else a new one.
fn key_buffer(len: usize, tier: &str) -> String {
    let need = len + TIER_KEY_EXTRA + tier.len();
    // `try_with`: during a thread's teardown the spare may be gone already.
    match SPARE.try_with(std::cell::Cell::take) {
        Ok(Some(spare)) if spare.capacity() >= need => spare,
        _ => String::with_capacity(need),
    }
}

/// Gives a plan's key buffer back for the next request on this thread (emptied first: nothing of
/// one caller's key is handed to the next but the memory a freed buffer would also keep).
pub(crate) fn give_back(mut key: String) {
    if key.capacity() <= MAX_SPARE {
        key.clear();
        // A plan dropped while its thread is torn down frees its key instead.
        let _ = SPARE.try_with(|spare| spare.set(Some(key)));
    }
}

/// `prefix` followed by `rest`, as [`bounded_key`] bounds it, with room for the tier suffix.
fn prefixed_key(prefix: &str, rest: &str, tier: &str) -> String {
    let len = prefix.len() + rest.len();
    if len > MAX_KEY_LEN {
        let mut key = String::with_capacity(len);
        key.push_str(prefix);
        key.push_str(rest);
        return bounded_key(&key).into_owned();
    }
    let mut key = key_buffer(len, tier);
    key.push_str(prefix);
    key.push_str(rest);
    key
}

/// Why a request gets no identity: it is answered without reaching the service, with an
/// `application/problem+json` body saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// 401: a credential was presented and is not known. Never a free pass, never another tier.
    Unauthorized {
        /// Said in the problem+json body.
        detail: String,
    },
    /// 400: the request is ambiguous about who it is (more than one credential).
    BadRequest {
        /// Said in the problem+json body.
        detail: String,
    },
    /// 500: the server is set up so that the caller cannot be known (no peer address, a tier
    /// the policy lacks). Never a guess: every such request would land in one bucket. The layer
    /// logs it (once) and counts it in `rate_limiter_misconfigured_total{reason}`.
    Misconfigured {
        /// A short, stable name for the metric's `reason` label (`no_peer_address`,
        /// `unknown_tier`).
        reason: &'static str,
        /// What is wrong and how to fix it, said in the log and the problem+json body.
        detail: String,
    },
}

/// The detail of the rejection of a request without a peer address.
const NO_PEER_ADDRESS: &str = "The server gives the rate limiter no client address, so it \
    cannot tell anonymous callers apart. Serve the app with \
    `into_make_service_with_connect_info::<SocketAddr>()` (axum, feature `axum`), or insert a \
    `tollgate::inbound::PeerAddr` into each request (other servers); or choose a shared key for \
    such requests with `ClientIp::fallback_key`.";

/// Finds the [`Identity`] of a request. Async-capable, so a lookup can hit a database.
///
/// Implemented for closures `Fn(&Request<B>) -> impl Future<Output = Result<Identity, Rejection>>`:
///
/// ```
/// use std::future::ready;
/// use tollgate::inbound::{Identity, KeyExtractor, Rejection};
///
/// fn assert_extractor<K: KeyExtractor<()>>(_: K) {}
/// assert_extractor(|req: &http::Request<()>| {
///     let user = req
///         .headers()
///         .get("x-user")
///         .and_then(|v| v.to_str().ok())
///         .unwrap_or("anonymous");
///     ready(Ok::<_, Rejection>(Identity::new(&format!("user:{user}"), "basic")))
/// });
/// ```
pub trait KeyExtractor<B>: Clone + Send + Sync + 'static {
    /// The lookup in progress.
    type Future: Future<Output = Result<Identity, Rejection>> + Send + 'static;

    /// Starts finding the identity of `request`.
    fn extract(&self, request: &Request<B>) -> Self::Future;

    /// The identity of `request` when it is known without waiting (no I/O), else `None` (the
    /// default). When it is known, and the store also decides without I/O (`MemoryStore`), the
    /// layer decides in `call` and calls the inner service straight away: no clone of it and no
    /// extra states. The built-in extractors answer here; [`extract`](Self::extract) must give the
    /// same answer.
    fn extract_now(&self, request: &Request<B>) -> Option<Result<Identity, Rejection>> {
        let _ = request;
        None
    }
}

impl<B, F, Fut> KeyExtractor<B> for F
where
    F: Fn(&Request<B>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Identity, Rejection>> + Send + 'static,
{
    type Future = Fut;

    fn extract(&self, request: &Request<B>) -> Fut {
        self(request)
    }
}

/// The peer address of a connection, as a request extension, for servers other than axum (which
/// provides `ConnectInfo`): insert it in your accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The address the request came from: axum's `ConnectInfo<SocketAddr>` (feature `axum`) or
/// [`PeerAddr`]; `None` when neither is there (the server was not set up to say).
pub fn peer_ip<B>(request: &Request<B>) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0.ip());
    }
    request.extensions().get::<PeerAddr>().map(|p| p.0.ip())
}

/// Keys requests by client IP address (`ip:...`, IPv6 grouped per /64), believing the
/// forwarding header of the [`TrustedProxies`] only from them; every caller is in one tier.
///
/// The address comes from the connection ([`peer_ip`]). A request without one (a server not set
/// up to provide it) is **not** guessed at: it is answered 500 with a problem body naming the
/// fix, logged once and counted (`rate_limiter_misconfigured_total{reason="no_peer_address"}`),
/// unless you chose a shared key for such requests with [`fallback_key`](Self::fallback_key).
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: Arc<TrustedProxies>,
    tier: Arc<str>,
    v6_prefix: u8,
    fallback: Option<Arc<str>>,
}

impl ClientIp {
    /// Callers in `tier`, trusting the forwarding header from `trusted` peers.
    pub fn new(tier: &str, trusted: TrustedProxies) -> ClientIp {
        ClientIp {
            trusted: Arc::new(trusted),
            tier: tier.into(),
            v6_prefix: DEFAULT_V6_PREFIX,
            fallback: None,
        }
    }

    /// Groups IPv6 clients by this prefix length instead of /64.
    pub fn v6_prefix(mut self, prefix: u8) -> ClientIp {
        self.v6_prefix = prefix;
        self
    }

    /// Puts every request without a peer address under this one key (bounded as
    /// [`Identity::new`] bounds keys), instead of answering it 500: **all such callers then share
    /// one bucket**. For servers that truly cannot know the address (some test harnesses, a
    /// Unix socket behind a proxy that sends no forwarding header).
    pub fn fallback_key(mut self, key: &str) -> ClientIp {
        self.fallback = Some(bounded_key(key).into());
        self
    }

    /// The tier of every caller.
    pub(crate) fn tier(&self) -> &Arc<str> {
        &self.tier
    }

    fn identity<B>(&self, request: &Request<B>) -> Result<Identity, Rejection> {
        let Some(peer) = peer_ip(request) else {
            return match &self.fallback {
                Some(key) => {
                    let mut owned = key_buffer(key.len(), &self.tier);
                    owned.push_str(key);
                    Ok(Identity {
                        key: owned,
                        tier: Arc::clone(&self.tier),
                    })
                }
                None => Err(Rejection::Misconfigured {
                    reason: "no_peer_address",
                    detail: NO_PEER_ADDRESS.to_owned(),
                }),
            };
        };
        let ip = client_ip(peer, request.headers(), &self.trusted);
        // The longest IP key: an IPv6 address and its prefix length.
        let mut key = key_buffer("ip:".len() + 39 + 4, &self.tier);
        key.push_str("ip:");
        push_ip_key(&mut key, ip, self.v6_prefix);
        Ok(Identity {
            key,
            tier: Arc::clone(&self.tier),
        })
    }
}

impl<B> KeyExtractor<B> for ClientIp {
    type Future = Ready<Result<Identity, Rejection>>;

    fn extract(&self, request: &Request<B>) -> Self::Future {
        ready(self.identity(request))
    }

    fn extract_now(&self, request: &Request<B>) -> Option<Result<Identity, Rejection>> {
        Some(self.identity(request))
    }
}

/// One key for every request (a limit on the whole service).
#[derive(Debug, Clone)]
pub struct Global {
    tier: Arc<str>,
}

impl Global {
    /// Every request is the caller `global` in `tier`.
    pub fn new(tier: &str) -> Global {
        Global { tier: tier.into() }
    }

    /// The tier of every caller.
    pub(crate) fn tier(&self) -> &Arc<str> {
        &self.tier
    }
}

impl Global {
    fn identity(&self) -> Identity {
        let mut key = key_buffer("global".len(), &self.tier);
        key.push_str("global");
        Identity {
            key,
            tier: Arc::clone(&self.tier),
        }
    }
}

impl<B> KeyExtractor<B> for Global {
    type Future = Ready<Result<Identity, Rejection>>;

    fn extract(&self, _request: &Request<B>) -> Self::Future {
        ready(Ok(self.identity()))
    }

    fn extract_now(&self, _request: &Request<B>) -> Option<Result<Identity, Rejection>> {
        Some(Ok(self.identity()))
    }
}

/// Keys requests by the value of a header; requests without it are keyed by client IP. Every
/// caller is in one tier.
///
/// The key keeps the value's bytes exactly, so two different values never share a bucket: a
/// value that is valid UTF-8 is keyed `header:<value>`; any other (HTTP allows bytes 0x80–0xFF in
/// values) is keyed `header#<hex of its bytes>`, which no UTF-8 value can produce. Long keys are
/// bounded as [`Identity::new`] bounds them.
#[derive(Debug, Clone)]
pub struct HeaderValueKey {
    header: HeaderName,
    fallback: ClientIp,
}

impl HeaderValueKey {
    /// Keys by `header`, falling back to `fallback` (by IP) without it.
    pub fn new(header: HeaderName, fallback: ClientIp) -> HeaderValueKey {
        HeaderValueKey { header, fallback }
    }

    /// The tier of every caller.
    pub(crate) fn tier(&self) -> &Arc<str> {
        &self.fallback.tier
    }
}

impl<B> KeyExtractor<B> for HeaderValueKey {
    type Future = Ready<Result<Identity, Rejection>>;

    fn extract(&self, request: &Request<B>) -> Self::Future {
        ready(self.identity(request))
    }

    fn extract_now(&self, request: &Request<B>) -> Option<Result<Identity, Rejection>> {
        Some(self.identity(request))
    }
}

impl HeaderValueKey {
    fn identity<B>(&self, request: &Request<B>) -> Result<Identity, Rejection> {
        let Some(value) = request.headers().get(&self.header) else {
            return self.fallback.identity(request);
        };
        let tier = &self.fallback.tier;
        let key = match std::str::from_utf8(value.as_bytes()) {
            Ok(text) => prefixed_key("header:", text, tier),
            Err(_) => {
                use std::fmt::Write as _;
                let mut hex = String::with_capacity(2 * value.len());
                for b in value.as_bytes() {
                    // Writing into a String cannot fail.
                    let _ = write!(hex, "{b:02x}");
                }
                prefixed_key("header#", &hex, tier)
            }
        };
        Ok(Identity {
            key,
            tier: Arc::clone(tier),
        })
    }
}

/// One configured API key: who it belongs to and their tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyEntry {
    /// The user the key belongs to; their bucket key is `user:<user>`.
    pub user: String,
    /// Their tier.
    pub tier: Arc<str>,
}

/// API keys from `X-Api-Key: KEY` or `Authorization: Bearer KEY`: a configured key selects its
/// user and tier; an **unknown key is rejected with 401** (never a free pass, never another tier);
/// no key means the anonymous tier, keyed by client IP.
///
/// Clones share one table, which [`replace_with`](ApiKeys::replace_with) swaps (a configuration
/// reload). Reading it takes no lock (an [`ArcSwap`]).
#[derive(Debug, Clone)]
pub struct ApiKeys {
    table: Arc<ArcSwap<KeyTable>>,
}

#[derive(Debug)]
struct KeyTable {
    keys: HashMap<String, ApiKeyEntry>,
    anonymous: ClientIp,
}

impl ApiKeys {
    /// A table of keys; callers without a key are `anonymous` (an IP-keyed extractor).
    pub fn new(
        keys: impl IntoIterator<Item = (String, ApiKeyEntry)>,
        anonymous: ClientIp,
    ) -> ApiKeys {
        ApiKeys {
            table: Arc::new(ArcSwap::from_pointee(KeyTable {
                keys: keys.into_iter().collect(),
                anonymous,
            })),
        }
    }

    /// Makes every clone of `self` use the keys (and anonymous rule) of `other` from now on.
    pub fn replace_with(&self, other: &ApiKeys) {
        self.table.store(other.table.load_full());
    }

    /// The tier of callers without a key.
    pub fn anonymous_tier(&self) -> Arc<str> {
        Arc::clone(&self.current().anonymous.tier)
    }

    /// The table in force (a guard: no reference count is taken on the request path).
    fn current(&self) -> arc_swap::Guard<Arc<KeyTable>> {
        self.table.load()
    }

    /// The checks [`RateLimitLayerBuilder::build`](super::RateLimitLayerBuilder::build) makes:
    /// every tier named is in the policy, and no key is empty.
    pub(crate) fn check(&self, tier_known: impl Fn(&str) -> bool) -> Result<(), BuildError> {
        let table = self.current();
        let anonymous = &table.anonymous.tier;
        if !tier_known(anonymous) {
            return Err(BuildError::UnknownTier {
                tier: anonymous.to_string(),
                used_by: "callers without an API key".to_owned(),
            });
        }
        let mut keys: Vec<(&String, &ApiKeyEntry)> = table.keys.iter().collect();
        keys.sort_by(|a, b| a.1.user.cmp(&b.1.user));
        for (key, entry) in keys {
            let reason = if key.is_empty() {
                Some("it is empty, so a request with an empty X-Api-Key header would match it")
            } else if key.trim() != key {
                Some("it starts or ends with whitespace, which HTTP strips from header values")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(BuildError::InvalidApiKey {
                    user: entry.user.clone(),
                    reason,
                });
            }
            if !tier_known(&entry.tier) {
                return Err(BuildError::UnknownTier {
                    tier: entry.tier.to_string(),
                    used_by: format!("the API key of user `{}`", entry.user),
                });
            }
        }
        Ok(())
    }

    /// The credential of a request: `None` without one; a rejection when it presents more than
    /// one (two `X-Api-Key` headers, or one beside a bearer token: which is meant is a guess).
    fn presented<B>(request: &Request<B>) -> Result<Option<&[u8]>, Rejection> {
        let headers = request.headers();
        let mut found: Option<&[u8]> = None;
        let mut count = 0;
        for value in headers.get_all("x-api-key") {
            found = Some(value.as_bytes());
            count += 1;
        }
        for auth in headers.get_all(header::AUTHORIZATION) {
            // `Bearer` with an empty token (HTTP strips the trailing space of `Bearer `) is a
            // credential presented, and not a known one: a 401, never anonymous.
            let token = auth
                .as_bytes()
                .split_at_checked(6)
                .and_then(|(scheme, token)| {
                    (scheme.eq_ignore_ascii_case(b"bearer")
                        && token.first().is_none_or(|b| matches!(b, b' ' | b'\t')))
                    .then(|| token.trim_ascii())
                });
            if let Some(token) = token {
                found = Some(token);
                count += 1;
            }
        }
        if count > 1 {
            return Err(Rejection::BadRequest {
                detail: "More than one credential was presented (X-Api-Key headers and bearer \
                         tokens together); send exactly one."
                    .to_owned(),
            });
        }
        Ok(found)
    }
}

impl<B> KeyExtractor<B> for ApiKeys {
    type Future = Ready<Result<Identity, Rejection>>;

    fn extract(&self, request: &Request<B>) -> Self::Future {
        ready(self.identify(request))
    }

    fn extract_now(&self, request: &Request<B>) -> Option<Result<Identity, Rejection>> {
        Some(self.identify(request))
    }
}

impl ApiKeys {
    fn identify<B>(&self, request: &Request<B>) -> Result<Identity, Rejection> {
        let table = self.current();
        let Some(presented) = Self::presented(request)? else {
            return table.anonymous.identity(request);
        };
        let entry = std::str::from_utf8(presented)
            .ok()
            .and_then(|k| table.keys.get(k.trim()));
        match entry {
            Some(entry) => Ok(Identity {
                key: prefixed_key("user:", &entry.user, &entry.tier),
                tier: Arc::clone(&entry.tier),
            }),
            None => Err(Rejection::Unauthorized {
                detail: "The API key is not known.".to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;

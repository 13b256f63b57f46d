//! Who is calling: [`Identity`], the [`KeyExtractor`] trait and the built-in extractors.

use std::collections::HashMap;
use std::future::{Future, Ready, ready};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use http::{HeaderName, Request, header};

use crate::client_ip::{
    DEFAULT_V6_PREFIX, MAX_KEY_LEN, TrustedProxies, bounded_key, client_ip, push_ip_key,
};

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
    /// [`MAX_KEY_LEN`](crate::client_ip::MAX_KEY_LEN) are replaced by their fingerprint.
    pub fn new(key: &str, tier: impl Into<Arc<str>>) -> Identity {
        Identity {
            key: bounded_key(key).into_owned(),
            tier: tier.into(),
        }
    }
}

/// What the layer appends to an identity key to make its tier's bucket key (`{<key>}:t:<tier>`).
pub(crate) const TIER_KEY_EXTRA: usize = "{}:t:".len();

/// An empty key with room for `len` bytes and the tier suffix the layer appends, so building the
/// bucket key does not reallocate.
fn key_buffer(len: usize, tier: &str) -> String {
    String::with_capacity(len + TIER_KEY_EXTRA + tier.len())
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

/// Why a request gets no identity: it is answered without reaching the service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// 401: a credential was presented and is not known. Never a free pass, never another tier.
    Unauthorized {
        /// Said in the problem+json body.
        detail: String,
    },
}

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
/// [`PeerAddr`]; `0.0.0.0` when neither is there (all such requests then share one key).
pub fn peer_ip<B>(request: &Request<B>) -> IpAddr {
    #[cfg(feature = "axum")]
    if let Some(info) = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return info.0.ip();
    }
    request
        .extensions()
        .get::<PeerAddr>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip())
}

/// Keys requests by client IP address (`ip:...`, IPv6 grouped per /64), believing
/// `X-Forwarded-For` / `Forwarded` only from trusted proxies; every caller is in one tier.
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: Arc<TrustedProxies>,
    tier: Arc<str>,
    v6_prefix: u8,
}

impl ClientIp {
    /// Callers in `tier`, trusting the forwarding headers from `trusted` peers.
    pub fn new(tier: &str, trusted: TrustedProxies) -> ClientIp {
        ClientIp {
            trusted: Arc::new(trusted),
            tier: tier.into(),
            v6_prefix: DEFAULT_V6_PREFIX,
        }
    }

    /// Groups IPv6 clients by this prefix length instead of /64.
    pub fn v6_prefix(mut self, prefix: u8) -> ClientIp {
        self.v6_prefix = prefix;
        self
    }

    fn identity<B>(&self, request: &Request<B>) -> Identity {
        let ip = client_ip(peer_ip(request), request.headers(), &self.trusted);
        // The longest IP key: an IPv6 address and its prefix length.
        let mut key = key_buffer("ip:".len() + 39 + 4, &self.tier);
        key.push_str("ip:");
        push_ip_key(&mut key, ip, self.v6_prefix);
        Identity {
            key,
            tier: Arc::clone(&self.tier),
        }
    }
}

impl<B> KeyExtractor<B> for ClientIp {
    type Future = Ready<Result<Identity, Rejection>>;

    fn extract(&self, request: &Request<B>) -> Self::Future {
        ready(Ok(self.identity(request)))
    }

    fn extract_now(&self, request: &Request<B>) -> Option<Result<Identity, Rejection>> {
        Some(Ok(self.identity(request)))
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

/// Keys requests by the value of a header (`header:<value>`); requests without it are keyed by
/// client IP. Every caller is in one tier.
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
}

impl<B> KeyExtractor<B> for HeaderValueKey {
    type Future = Ready<Result<Identity, Rejection>>;

    fn extract(&self, request: &Request<B>) -> Self::Future {
        ready(Ok(self.identity(request)))
    }

    fn extract_now(&self, request: &Request<B>) -> Option<Result<Identity, Rejection>> {
        Some(Ok(self.identity(request)))
    }
}

impl HeaderValueKey {
    fn identity<B>(&self, request: &Request<B>) -> Identity {
        match request.headers().get(&self.header) {
            // Any bytes will do as a key: non-UTF-8 is hex-escaped by the lossless debug form.
            Some(value) => Identity {
                key: prefixed_key(
                    "header:",
                    &String::from_utf8_lossy(value.as_bytes()),
                    &self.fallback.tier,
                ),
                tier: Arc::clone(&self.fallback.tier),
            },
            None => self.fallback.identity(request),
        }
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
/// reload).
#[derive(Debug, Clone)]
pub struct ApiKeys {
    table: Arc<RwLock<Arc<KeyTable>>>,
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
            table: Arc::new(RwLock::new(Arc::new(KeyTable {
                keys: keys.into_iter().collect(),
                anonymous,
            }))),
        }
    }

    /// Makes every clone of `self` use the keys (and anonymous rule) of `other` from now on.
    pub fn replace_with(&self, other: &ApiKeys) {
        let next = Arc::clone(&other.table.read().unwrap_or_else(PoisonError::into_inner));
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = next;
    }

    fn current(&self) -> Arc<KeyTable> {
        Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn presented<B>(request: &Request<B>) -> Option<&[u8]> {
        if let Some(v) = request.headers().get("x-api-key") {
            return Some(v.as_bytes());
        }
        // `Bearer` with an empty token (HTTP strips the trailing space of `Bearer `) is a
        // credential presented, and not a known one: a 401, never anonymous.
        let auth = request.headers().get(header::AUTHORIZATION)?.as_bytes();
        let (scheme, token) = auth.split_at_checked(6)?;
        (scheme.eq_ignore_ascii_case(b"bearer")
            && token.first().is_none_or(|b| matches!(b, b' ' | b'\t')))
        .then(|| token.trim_ascii())
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
        let Some(presented) = Self::presented(request) else {
            return Ok(table.anonymous.identity(request));
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
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn now<F: Future>(f: F) -> F::Output {
        match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("ready futures only"),
        }
    }

    fn keys() -> ApiKeys {
        ApiKeys::new(
            [(
                "key-alice".to_owned(),
                ApiKeyEntry {
                    user: "alice".into(),
                    tier: "basic".into(),
                },
            )],
            ClientIp::new("anonymous", TrustedProxies::none()),
        )
    }

    fn request(headers: &[(&str, &[u8])]) -> Request<()> {
        let mut req = Request::new(());
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        req.extensions_mut()
            .insert(PeerAddr("203.0.113.9:5555".parse().unwrap()));
        req
    }

    #[test]
    fn api_keys() {
        let k = keys();
        let alice = now(k.extract(&request(&[("x-api-key", b"key-alice")]))).unwrap();
        assert_eq!((alice.key.as_str(), &*alice.tier), ("user:alice", "basic"));
        let bearer = now(k.extract(&request(&[("authorization", b"Bearer key-alice")]))).unwrap();
        assert_eq!(bearer, alice);
        let anon = now(k.extract(&request(&[]))).unwrap();
        assert_eq!(
            (anon.key.as_str(), &*anon.tier),
            ("ip:203.0.113.9", "anonymous")
        );
        for bad in [&b"nope"[..], b"\xff\xfe", &[b'a'; 65_536]] {
            assert!(matches!(
                now(k.extract(&request(&[("x-api-key", bad)]))),
                Err(Rejection::Unauthorized { .. })
            ));
        }
        // A bearer scheme without a token is an unknown key, not anonymous.
        for empty in [&b"Bearer"[..], b"bearer \t"] {
            assert!(matches!(
                now(k.extract(&request(&[("authorization", empty)]))),
                Err(Rejection::Unauthorized { .. })
            ));
        }
        // Basic auth (or a scheme that only starts like `Bearer`) is not an API key: anonymous.
        let other = now(k.extract(&request(&[("authorization", b"Bearerkey-alice")]))).unwrap();
        assert_eq!(&*other.tier, "anonymous");
        let basic = now(k.extract(&request(&[("authorization", b"Basic Zm9v")]))).unwrap();
        assert_eq!(&*basic.tier, "anonymous");
    }

    #[test]
    fn header_keys_are_bounded() {
        let k = HeaderValueKey::new(
            HeaderName::from_static("x-user"),
            ClientIp::new("basic", TrustedProxies::none()),
        );
        let long = vec![b'x'; 65_536];
        let id = now(k.extract(&request(&[("x-user", &long)]))).unwrap();
        assert!(id.key.len() <= crate::client_ip::MAX_KEY_LEN);
        let id = now(k.extract(&request(&[("x-user", b"\xff")]))).unwrap();
        assert!(id.key.starts_with("header:"));
    }
}

//! [`RedisStore`]: the [`Store`] on Redis or Redis Cluster, and its builder. The script call's
//! wire codec is in `protocol.rs`, the cross-slot protocol in `cluster.rs`.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use tollgate_core::{
    Clock, Lease, LeaseId, Leased, Limit, Outcome, Quota, Reservation, Reserve, Store, StoreError,
    StoreErrorKind, Verdict,
};

use crate::batch::Lanes;
use crate::cluster::lease_member;

use crate::deadline::ClockOffsets;
use crate::protocol::{Budget, map_error, micros, protocol};
use crate::script::{Mode, Scripting, ScriptingState};
use crate::sentinel::SentinelConnection;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "tollgate";
/// The default time one store call may take, end to end.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// The default time to open a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Limit state in Redis or Redis Cluster, shared by every process that uses the same server and
/// prefix. See the [crate docs](crate) for the key layout, expiry, time source and failure
/// semantics.
///
/// Cheap to clone: clones share one multiplexed connection (or one cluster connection).
///
/// Three topologies, one code path: a standalone server ([`builder`](Self::builder)), a Redis
/// Cluster ([`cluster_builder`](Self::cluster_builder)), or the master of a Sentinel group
/// ([`sentinel_builder`](Self::sentinel_builder), which follows a failover by itself).
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) conn: Connection,
    prefix: String,
    timeout: Duration,
    pub(crate) clock: Option<Arc<dyn Clock>>,
    pub(crate) ids: CallIds,
    /// The offset of the server's clock, one per slot on a cluster (each node has its own
    /// clock), one for a standalone server: see [`crate::deadline`].
    pub(crate) offsets: ClockOffsets,
    /// `FCALL` or `EVALSHA`.
    pub(crate) scripting: ScriptingState,
    /// Whether fast-path decisions are batched ([`RedisStoreBuilder::batching`]).
    pub(crate) batching: bool,
    /// The batch queues, one per connection (per slot on a cluster): see [`crate::batch`].
    pub(crate) lanes: Lanes,
}

#[derive(Clone)]
pub(crate) enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConnection),
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "topology",
                &match self.inner.conn {
                    Connection::Standalone(_) => "standalone",
                    Connection::Cluster(_) => "cluster",
                    Connection::Sentinel(_) => "sentinel",
                },
            )
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Unique call ids: a random 64-bit store seed and a counter. They name the sliding-window-log
/// members a call adds, so two simultaneous requests never collide, and let a cross-slot
/// decision undo exactly its own members. Lease ids are the seed (high 64 bits) and the counter
/// (low 64 bits).
pub(crate) struct CallIds {
    seed: u64,
    next: AtomicU64,
}

impl CallIds {
    fn new() -> Self {
        // std's RandomState is seeded from the OS once per thread and differs for every instance
        // after; the time and the process id are hashed in as well, so two stores (in one process
        // or in two) draw different seeds.
        let mut hasher = RandomState::new().build_hasher();
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hasher.write_u128(since_epoch);
        hasher.write_u32(std::process::id());
        CallIds {
            seed: hasher.finish(),
            next: AtomicU64::new(0),
        }
    }

    /// A new call id, `<seed>.<counter>` in lowercase hex (written by hand: `format!` costs a
    /// decision on the client about as much as the rest of its arguments).
    pub(crate) fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(33);
        push_hex(&mut id, self.seed);
        id.push('.');
        push_hex(&mut id, n);
        id
    }

    /// A new lease id: unique to this store, and across stores but for a 64-bit seed collision.
    pub(crate) fn lease(&self) -> LeaseId {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        LeaseId::from_u128((u128::from(self.seed) << 64) | u128::from(n))
    }
}

/// Appends `v` in lowercase hex without leading zeros, as `{:x}` writes it.
fn push_hex(out: &mut String, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    let mut at = buf.len();
    let mut v = v;
    loop {
        at -= 1;
        // The low 4 bits index the digits: always in bounds.
        buf[at] = DIGITS[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    for &digit in &buf[at..] {
        out.push(char::from(digit));
    }
}

/// Why a [`RedisStore`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisStoreError {
    /// A URL that redis-rs does not accept.
    #[error("invalid redis url `{url}`")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
    /// A prefix containing `{` or `}` would change the keys' hash tags.
    #[error("invalid key prefix `{0}`: it must not contain `{{` or `}}`")]
    InvalidPrefix(String),
    /// A cluster with no node.
    #[error("a redis cluster needs at least one node url")]
    NoClusterNodes,
    /// A Sentinel group with no sentinel.
    #[error("a redis sentinel store needs at least one sentinel url")]
    NoSentinelNodes,
    /// A Sentinel group with an empty master name.
    #[error("a redis sentinel store needs the name of the master the sentinels monitor")]
    NoMasterName,
    /// [`RedisStoreBuilder::master_auth`] or [`RedisStoreBuilder::master_db`] on a store that is
    /// not a Sentinel one (a standalone or cluster URL carries its own credentials and database).
    #[error(
        "master_auth and master_db apply to a sentinel store only; give the credentials and \
         database in the url (`redis://user:password@host:port/db`)"
    )]
    MasterOptionsWithoutSentinel,
    /// [`RedisStoreBuilder::connect`] could not reach the server.
    #[error("cannot reach redis")]
    Unreachable(#[source] StoreError),
}

/// What a Sentinel store sends the master when it connects: credentials and database.
#[derive(Clone, Default)]
struct MasterInfo {
    username: Option<String>,
    password: Option<String>,
    db: Option<i64>,
}

impl MasterInfo {
    fn is_set(&self) -> bool {
        self.password.is_some() || self.db.is_some()
    }

    /// As redis-rs takes it, or `None` for no password and database 0.
    fn connection_info(&self) -> Option<redis::RedisConnectionInfo> {
        if !self.is_set() {
            return None;
        }
        let mut info = redis::RedisConnectionInfo::default().set_db(self.db.unwrap_or(0));
        if let Some(username) = &self.username {
            info = info.set_username(username);
        }
        if let Some(password) = &self.password {
            info = info.set_password(password);
        }
        Some(info)
    }
}

impl fmt::Debug for MasterInfo {
    /// Never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterInfo")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

/// Builds a [`RedisStore`]: see [`RedisStore::builder`] and [`RedisStore::cluster_builder`].
#[derive(Clone)]
pub struct RedisStoreBuilder {
    nodes: Vec<String>,
    cluster: bool,
    /// The master name, for a store on a Sentinel group (`nodes` are then the sentinels).
    sentinel: Option<String>,
    /// The master's (and replicas') credentials and database, for a Sentinel store.
    master: MasterInfo,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    clock: Option<Arc<dyn Clock>>,
    scripting: Scripting,
    batching: bool,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("nodes", &self.nodes)
            .field("cluster", &self.cluster)
            .field("sentinel", &self.sentinel)
            .field("master", &self.master)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("scripting", &self.scripting)
            .field("batching", &self.batching)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key (default [`DEFAULT_PREFIX`]); keys are `PREFIX:KEY`. Use one prefix
    /// per application sharing a server. It must not contain `{` or `}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one store call may take, end to end (default [`DEFAULT_TIMEOUT`], 50 ms).
    /// Past it the call fails with [`StoreError::is_timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest opening a connection may take (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// **Sentinel only**: the password the master (and the replica that may replace it) asks
    /// for, and the ACL user it belongs to (`None` for the `default` user). The sentinels' own
    /// credentials, if they have any, go in their URLs (`redis://:password@host:26379`): a
    /// Sentinel and the nodes it watches are often set up with different passwords.
    pub fn master_auth(mut self, username: Option<&str>, password: impl Into<String>) -> Self {
        self.master.username = username.map(str::to_owned);
        self.master.password = Some(password.into());
        self
    }

    /// **Sentinel only**: the database number to use on the master (default 0).
    pub fn master_db(mut self, db: i64) -> Self {
        self.master.db = Some(db);
        self
    }

    /// How the Lua code runs on the server (default [`Scripting::Auto`]): as a Redis Functions
    /// library (`FCALL`, Redis 7 or later), as a script (`EVALSHA`), or the first where the
    /// server has it and the second otherwise. Both answer the same; see "Functions or
    /// EVALSHA" in the [crate docs](crate).
    pub fn scripting(mut self, scripting: Scripting) -> Self {
        self.scripting = scripting;
        self
    }

    /// Whether decisions waiting on the same connection go out together (default `true`): while
    /// a script call is in flight, the token-bucket decisions that arrive queue up, and when it
    /// completes they go out as one call that decides each of them on its own, all or nothing on
    /// its own limits. A decision that finds nothing in flight is sent at once, never held back
    /// for company. With `false`, every decision is a script call of its own. See "Batching" in
    /// the [crate docs](crate).
    pub fn batching(mut self, on: bool) -> Self {
        self.batching = on;
        self
    }

    /// Decides with this clock instead of Redis' `TIME`. **For tests only** (replaying test
    /// vectors, showing what clock skew would do): with several processes, each one's clock
    /// would count, which is exactly what the server clock avoids.
    pub fn client_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    fn check(&self) -> Result<(), RedisStoreError> {
        if self.prefix.contains(['{', '}']) {
            return Err(RedisStoreError::InvalidPrefix(self.prefix.clone()));
        }
        match &self.sentinel {
            None if self.master.is_set() => Err(RedisStoreError::MasterOptionsWithoutSentinel),
            Some(_) if self.nodes.is_empty() => Err(RedisStoreError::NoSentinelNodes),
            Some(master) if master.is_empty() => Err(RedisStoreError::NoMasterName),
            None if self.nodes.is_empty() => Err(RedisStoreError::NoClusterNodes),
            _ => Ok(()),
        }
    }

    /// Builds the store without connecting: the connection opens on first use and reopens by
    /// itself after a failure, so an application can start while Redis is down (its calls fail
    /// with [`StoreError::is_unavailable`] or [`StoreError::is_timeout`] meanwhile). Must be
    /// called within a Tokio runtime.
    pub fn build(self) -> Result<RedisStore, RedisStoreError> {
        self.check()?;
        let invalid = |url: &String, source| RedisStoreError::InvalidUrl {
            url: url.clone(),
            source,
        };
        let conn = if let Some(master) = &self.sentinel {
            let conn = SentinelConnection::new(
                master,
                &self.nodes,
                self.master.connection_info(),
                self.connect_timeout,
                self.timeout,
            )
            .map_err(|e| invalid(&self.nodes.join(", "), e))?;
            Connection::Sentinel(conn)
        } else if self.cluster {
            let client = ClusterClientBuilder::new(self.nodes.iter().map(String::as_str))
                .connection_timeout(self.connect_timeout)
                .response_timeout(self.timeout)
                // Redirections (MOVED, ASK, TRYAGAIN) are retried; see the crate docs on replays.
                .retries(2)
                .min_retry_wait(1)
                .max_retry_wait(10)
                .build()
                .map_err(|e| invalid(&self.nodes[0], e))?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(self.connect_timeout)
                .set_response_timeout(self.timeout);
            Connection::Cluster(client.get_pending_async_connection_with_config(config))
        } else {
            let url = &self.nodes[0];
            let client = redis::Client::open(url.as_str()).map_err(|e| invalid(url, e))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.connect_timeout))
                .set_response_timeout(Some(self.timeout))
                // One quick attempt per reconnection; the next call triggers another.
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(100));
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| invalid(url, e))?;
            Connection::Standalone(manager)
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix: self.prefix,
                timeout: self.timeout,
                clock: self.clock,
                ids: CallIds::new(),
                scripting: ScriptingState::new(self.scripting),
                batching: self.batching,
                lanes: Lanes::new(self.cluster),
                offsets: if self.cluster {
                    ClockOffsets::cluster()
                } else {
                    ClockOffsets::standalone()
                },
            }),
        })
    }

    /// Builds the store and checks that Redis answers (loading the script on every node it
    /// reaches), waiting up to the connect timeout plus the call timeout.
    pub async fn connect(self) -> Result<RedisStore, RedisStoreError> {
        let store = self.build()?;
        store.ping().await.map_err(RedisStoreError::Unreachable)?;
        Ok(store)
    }
}

impl RedisStore {
    /// A store on the standalone server at `url` (`redis://[:password@]host:port[/db]`,
    /// `rediss://` needs a TLS feature of redis-rs).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            nodes: vec![url.into()],
            cluster: false,
            sentinel: None,
            master: MasterInfo::default(),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            clock: None,
            scripting: Scripting::Auto,
            batching: true,
        }
    }

    /// A store on the Redis Cluster reachable through `nodes` (any subset of its masters).
    pub fn cluster_builder<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisStoreBuilder {
            nodes: nodes.into_iter().map(Into::into).collect(),
            cluster: true,
            ..RedisStore::builder(String::new())
        }
    }

    /// A store on the master of the Sentinel group whose sentinels are at `sentinels`
    /// (`redis://host:port` each) and which monitors it as `master`. The store asks the
    /// sentinels for the master on first use and again whenever the master stops answering as
    /// one (a failover): see the crate docs, "Sentinel".
    pub fn sentinel_builder<I, S>(master: impl Into<String>, sentinels: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisStoreBuilder {
            nodes: sentinels.into_iter().map(Into::into).collect(),
            sentinel: Some(master.into()),
            ..RedisStore::builder(String::new())
        }
    }

    /// Whether this store talks to a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.conn, Connection::Cluster(_))
    }

    /// The Redis key a limit key is stored under: `PREFIX:KEY`.
    pub fn redis_key(&self, key: &str) -> String {
        let prefix = &self.inner.prefix;
        if prefix.is_empty() {
            return key.to_owned();
        }
        // Not `format!`: this runs for every key of every decision.
        let mut out = String::with_capacity(prefix.len() + 1 + key.len());
        out.push_str(prefix);
        out.push(':');
        out.push_str(key);
        out
    }

    /// Checks that Redis answers, within the call timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let cmd = redis::cmd("PING");
        self.within(self.deadline(), async {
            let reply: String = match self.inner.conn.clone() {
                Connection::Standalone(mut c) => cmd.query_async(&mut c).await,
                Connection::Cluster(mut c) => cmd.query_async(&mut c).await,
                Connection::Sentinel(mut c) => cmd.query_async(&mut c).await,
            }
            .map_err(map_error)?;
            if reply == "PONG" {
                Ok(())
            } else {
                Err(protocol(format!("unexpected PING reply `{reply}`")))
            }
        })
        .await
    }

    /// The deadline of an operation starting now: the call timeout from now.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.inner.timeout
    }

    /// Runs `f` until `deadline`; past it, a timeout whose outcome is unknown.
    pub(crate) async fn within<T>(
        &self,
        deadline: Instant,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout_at(deadline.into(), f).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::new(
                StoreErrorKind::Timeout,
                format!(
                    "no answer from redis within {:?}; if the call was sent, its outcome is unknown",
                    self.inner.timeout
                ),
            )),
        }
    }
}

impl Store for RedisStore {
    async fn decide(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        self.decide_items(limits).await
    }

    async fn peek(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        self.peek_items(limits).await
    }

    async fn reserve(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> Result<Reserve, StoreError> {
        self.reserve_items(limits, max_wait).await
    }

    async fn cancel(&self, reservation: &Reservation) -> Result<(), StoreError> {
        self.cancel_held(reservation.held()).await
    }

    async fn pause(
        &self,
        key: &str,
        quota: &Quota,
        duration: Duration,
    ) -> Result<bool, StoreError> {
        let limits = [Limit::new(key, quota, 0)];
        let items = self.items(&limits);
        let id = self.inner.ids.next();
        let answer = self
            .call(
                Mode::Pause,
                &items,
                &id,
                micros(duration),
                0,
                Budget::unguarded(self.deadline()),
            )
            .await?;
        // The script reports a paused limit with outcome code 1.
        Ok(answer
            .rows
            .first()
            .is_some_and(|r| r.decision.outcome == Outcome::Denied))
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    /// One script call on a standalone server, or on a cluster when the lease shares its slot
    /// with the limits (a hash tag); otherwise the cross-slot protocol, the lease in its slot's
    /// group. See "Concurrency leases" in the [crate docs](crate).
    async fn decide_leased(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Result<Leased, StoreError> {
        self.decide_leased_items(limits, lease).await
    }

    /// One `ZREM` of the lease's member, routed by its key.
    async fn release(&self, key: &str, id: LeaseId) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.redis_key(key)).arg(lease_member(id));
        self.within(self.deadline(), async {
            // 1 if it was held, 0 if it had expired or was given back already: both are fine.
            let _removed: i64 = match self.inner.conn.clone() {
                Connection::Standalone(mut c) => cmd.query_async(&mut c).await,
                Connection::Cluster(mut c) => cmd.query_async(&mut c).await,
                Connection::Sentinel(mut c) => cmd.query_async(&mut c).await,
            }
            .map_err(map_error)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_written_as_format_writes_it() {
        for v in [
            0,
            1,
            9,
            10,
            15,
            16,
            255,
            0x1234_abcd,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = String::from("x");
            push_hex(&mut out, v);
            assert_eq!(out, format!("x{v:x}"), "{v}");
        }
    }

    #[test]
    fn call_ids_are_seed_dot_counter_and_never_repeat() {
        let ids = CallIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_eq!(a, format!("{:x}.0", ids.seed));
        assert_eq!(b, format!("{:x}.1", ids.seed));
        assert_ne!(a, b);
    }
}

//! [`RedisStore`]: the [`Store`] on Redis or Redis Cluster.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use tollgate_core::{
    Clock, Decision, Held, Limit, MAX_SPAN_MICROS, Outcome, Quota, Reservation, Reserve, Store,
    StoreError, StoreErrorKind, Timestamp, Verdict,
};

use crate::deadline::ClockOffset;
use crate::script::{Mode, SCRIPT, algorithm_code};
use crate::slot::slot;

/// The status of a script call that ran after its deadline and wrote nothing (`late` in
/// `lua/common.lua`).
const LATE: i64 = 4;

/// The counter of compensating writes (undoing a cross-slot charge, giving a reservation back)
/// that failed, leaving a charge in place: `tollgate::metrics::COMPENSATION_ERRORS_TOTAL`.
const COMPENSATION_ERRORS_TOTAL: &str = "rate_limiter_store_compensation_errors_total";

/// When a store operation must be answered by, and whether its script calls carry that deadline
/// to the server (only the calls that charge: `decide`, `reserve`).
#[derive(Debug, Clone, Copy)]
struct Budget {
    deadline: Instant,
    guard: bool,
}

impl Budget {
    fn guarded(deadline: Instant) -> Budget {
        Budget {
            deadline,
            guard: true,
        }
    }

    fn unguarded(deadline: Instant) -> Budget {
        Budget {
            deadline,
            guard: false,
        }
    }
}

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
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Connection,
    prefix: String,
    timeout: Duration,
    clock: Option<Arc<dyn Clock>>,
    ids: CallIds,
    /// The offset of the server's clock, one per slot on a cluster (each node has its own
    /// clock), one for a standalone server: see [`crate::deadline`].
    offsets: Box<[ClockOffset]>,
}

#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "topology",
                &match self.inner.conn {
                    Connection::Standalone(_) => "standalone",
                    Connection::Cluster(_) => "cluster",
                },
            )
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Unique call ids: a random 64-bit process seed and a counter. They name the sliding-window-log
/// members a call adds, so two simultaneous requests never collide, and let a cross-slot
/// decision undo exactly its own members.
struct CallIds {
    seed: u64,
    next: AtomicU64,
}

impl CallIds {
    fn new() -> Self {
        CallIds {
            seed: RandomState::new().build_hasher().finish(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:x}.{:x}", self.seed, n)
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
    /// [`RedisStoreBuilder::connect`] could not reach the server.
    #[error("cannot reach redis")]
    Unreachable(#[source] StoreError),
}

/// Builds a [`RedisStore`]: see [`RedisStore::builder`] and [`RedisStore::cluster_builder`].
#[derive(Clone)]
pub struct RedisStoreBuilder {
    nodes: Vec<String>,
    cluster: bool,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("nodes", &self.nodes)
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
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
        if self.nodes.is_empty() {
            return Err(RedisStoreError::NoClusterNodes);
        }
        Ok(())
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
        let conn = if self.cluster {
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
        let offsets = if self.cluster { 16_384 } else { 1 };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix: self.prefix,
                timeout: self.timeout,
                clock: self.clock,
                ids: CallIds::new(),
                offsets: (0..offsets).map(|_| ClockOffset::new()).collect(),
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

/// One limit as the script sees it.
struct Item<'a> {
    key: String,
    limit: &'a Limit<'a>,
    /// The cost the script is given: the limit's, or for a give-back, the reservation's charge
    /// in µs.
    cost: u64,
    a: u64,
    b: u64,
}

/// The script's answer.
struct Answer {
    status: i64,
    now: u64,
    wait: u64,
    rows: Vec<Row>,
}

#[derive(Clone, Copy)]
struct Row {
    decision: Decision,
    a: u64,
    b: u64,
}

fn protocol(message: String) -> StoreError {
    StoreError::new(StoreErrorKind::Other, message)
}

fn map_error(e: redis::RedisError) -> StoreError {
    let kind = if e.is_timeout() {
        StoreErrorKind::Timeout
    } else if e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::BusyLoading
                    // A redirection the cluster client gave up following: the slot's owner could
                    // not be reached (a node down sends the request to a random node, which
                    // answers MOVED back to it). The script had not run.
                    | redis::ServerErrorKind::Moved
                    | redis::ServerErrorKind::Ask
            ) | redis::ErrorKind::ClusterConnectionNotFound
        )
    {
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Other
    };
    StoreError::new(kind, e)
}

/// The script's reply, `3 + 8 n` little-endian 64-bit integers in one string (see `packed` in
/// `lua/common.lua`), as integers.
fn unpack(reply: &[u8], n: usize) -> Result<Vec<i64>, StoreError> {
    let expected = n
        .checked_mul(8)
        .and_then(|v| v.checked_add(3))
        .and_then(|v| v.checked_mul(8));
    if expected != Some(reply.len()) {
        return Err(protocol(format!(
            "unexpected script reply: {} bytes for {n} limits ({} expected)",
            reply.len(),
            expected.map_or_else(|| "more than can be".to_owned(), |e| e.to_string())
        )));
    }
    Ok(reply
        .chunks_exact(8)
        .map(|b| {
            let mut word = [0; 8];
            word.copy_from_slice(b);
            i64::from_le_bytes(word)
        })
        .collect())
}

/// A count or a time of the reply, which the script never sends negative.
fn non_negative(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| protocol(format!("unexpected script reply: {what} is {v}")))
}

/// A limit's count or remaining, which fits a `u32` (quotas are validated for it).
fn count(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| protocol(format!("unexpected script reply: {what} is {v}")))
}

/// Reads the reply's values. Anything the script never sends (an unknown status or outcome code,
/// a negative time, a count past `u32`) is a protocol error, never a plausible decision: the
/// failure policy decides then.
fn parse(values: &[i64], n: usize) -> Result<Answer, StoreError> {
    if values.len() != 3 + 8 * n {
        return Err(protocol(format!(
            "unexpected script reply: {} values for {n} limits",
            values.len()
        )));
    }
    let status = values[0];
    if !(0..=LATE).contains(&status) {
        return Err(protocol(format!(
            "unexpected script reply: unknown status {status}"
        )));
    }
    let now = non_negative(values[1], "the server time")?;
    let wait = non_negative(values[2], "the wait")?;
    let mut rows = Vec::with_capacity(n);
    if status != LATE {
        for r in values[3..].chunks_exact(8) {
            let outcome = match r[0] {
                0 => Outcome::Allowed,
                1 => Outcome::Denied,
                2 => Outcome::InsufficientCapacity,
                code => {
                    return Err(protocol(format!(
                        "unexpected script reply: unknown outcome code {code}"
                    )));
                }
            };
            rows.push(Row {
                decision: Decision {
                    outcome,
                    limit: count(r[1], "a limit")?,
                    remaining: count(r[2], "the remaining count")?,
                    reset_after: Duration::from_micros(non_negative(r[3], "reset_after")?),
                    retry_after: Duration::from_micros(non_negative(r[4], "retry_after")?),
                    delay: Duration::from_micros(non_negative(r[5], "a delay")?),
                },
                a: non_negative(r[6], "a state time")?,
                b: non_negative(r[7], "a state time")?,
            });
        }
    }
    Ok(Answer {
        status,
        now,
        wait,
        rows,
    })
}

/// Decodes a script reply for `n` limits, as the store does. For the fuzz targets and tests of
/// the decoder; not part of the API.
#[doc(hidden)]
pub fn decode_reply(reply: &[u8], n: usize) -> Result<(), StoreError> {
    parse(&unpack(reply, n)?, n).map(|_| ())
}

/// A compensating write (an undo, a give-back) failed: the charge stays, which errs toward
/// denial; said in the log and counted.
fn compensation_failed(op: &'static str, error: &StoreError) {
    tracing::warn!(%error, op, "redis: could not undo a charge; it stays until it expires");
    metrics::counter!(COMPENSATION_ERRORS_TOTAL, "store" => "redis", "op" => op).increment(1);
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .min(MAX_SPAN_MICROS)
}

impl RedisStore {
    /// A store on the standalone server at `url` (`redis://[:password@]host:port[/db]`,
    /// `rediss://` needs a TLS feature of redis-rs).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            nodes: vec![url.into()],
            cluster: false,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            clock: None,
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

    /// Whether this store talks to a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.conn, Connection::Cluster(_))
    }

    /// The Redis key a limit key is stored under: `PREFIX:KEY`.
    pub fn redis_key(&self, key: &str) -> String {
        if self.inner.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}:{key}", self.inner.prefix)
        }
    }

    /// Checks that Redis answers, within the call timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let cmd = redis::cmd("PING");
        self.within(self.deadline(), async {
            let reply: String = match self.inner.conn.clone() {
                Connection::Standalone(mut c) => cmd.query_async(&mut c).await,
                Connection::Cluster(mut c) => cmd.query_async(&mut c).await,
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
    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.timeout
    }

    async fn within<T>(
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

    /// One script call over the connection, whatever its type.
    async fn invoke<C: ConnectionLike>(
        conn: &mut C,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<Vec<u8>, StoreError> {
        invocation.invoke_async(conn).await.map_err(map_error)
    }

    /// The clock offset of the server holding `items` (all in one slot).
    fn offset(&self, items: &[Item<'_>]) -> &ClockOffset {
        let offsets = &self.inner.offsets;
        match items.first() {
            Some(item) if offsets.len() > 1 => &offsets[usize::from(slot(item.key.as_bytes()))],
            _ => &offsets[0],
        }
    }

    async fn call(
        &self,
        mode: Mode,
        items: &[Item<'_>],
        id: &str,
        arg4: u64,
        floor: u64,
        budget: Budget,
    ) -> Result<Answer, StoreError> {
        let mut invocation = SCRIPT.prepare_invoke();
        for item in items {
            invocation.key(&item.key);
        }
        let now = self
            .inner
            .clock
            .as_ref()
            .map_or(String::new(), |c| c.now().as_micros().to_string());
        // A client clock (test-vector replays) is not Redis' clock: no deadline on it.
        let offset = self.offset(items);
        let deadline = if budget.guard && self.inner.clock.is_none() {
            offset.server_deadline(budget.deadline)
        } else {
            0
        };
        invocation
            .arg(mode.as_str())
            .arg(now)
            .arg(id)
            .arg(arg4)
            .arg(floor)
            .arg(deadline);
        for item in items {
            let q = item.limit.quota;
            invocation
                .arg(algorithm_code(q.algorithm()))
                .arg(q.limit())
                .arg(q.interval_micros())
                .arg(q.max_delay_micros())
                .arg(item.cost)
                .arg(item.a)
                .arg(item.b);
        }
        let sent = Instant::now();
        let reply = self
            .within(budget.deadline, async {
                match self.inner.conn.clone() {
                    Connection::Standalone(mut c) => Self::invoke(&mut c, &invocation).await,
                    Connection::Cluster(mut c) => Self::invoke(&mut c, &invocation).await,
                }
            })
            .await?;
        let answer = parse(&unpack(&reply, items.len())?, items.len())?;
        if self.inner.clock.is_none() {
            offset.observe(sent, Instant::now(), answer.now);
        }
        if answer.status == LATE {
            return Err(StoreError::new(
                StoreErrorKind::Timeout,
                "redis ran the call after its deadline, so it wrote nothing",
            ));
        }
        Ok(answer)
    }

    fn items<'a>(&self, limits: &'a [Limit<'a>]) -> Vec<Item<'a>> {
        limits
            .iter()
            .map(|limit| Item {
                key: self.redis_key(limit.key),
                limit,
                cost: u64::from(limit.cost),
                a: 0,
                b: 0,
            })
            .collect()
    }

    /// The limits grouped by cluster slot, in order of first appearance; one group on a
    /// standalone server.
    fn groups(&self, items: &[Item<'_>]) -> Vec<Vec<usize>> {
        if !self.is_cluster() {
            return vec![(0..items.len()).collect()];
        }
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let s = slot(item.key.as_bytes());
            match groups.iter_mut().find(|(g, _)| *g == s) {
                Some((_, members)) => members.push(i),
                None => groups.push((s, vec![i])),
            }
        }
        groups.into_iter().map(|(_, members)| members).collect()
    }

    fn subset<'a>(items: &[Item<'a>], group: &[usize]) -> Vec<Item<'a>> {
        group
            .iter()
            .map(|&i| Item {
                key: items[i].key.clone(),
                limit: items[i].limit,
                cost: items[i].cost,
                a: items[i].a,
                b: items[i].b,
            })
            .collect()
    }

    async fn decide_items(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        let items = self.items(limits);
        let groups = self.groups(&items);
        let id = self.inner.ids.next();
        let deadline = self.deadline();
        if let [only] = groups.as_slice() {
            debug_assert_eq!(only.len(), items.len());
            let answer = self
                .call(Mode::Decide, &items, &id, 0, 0, Budget::guarded(deadline))
                .await?;
            return Ok(Verdict::new(
                answer.rows.iter().map(|r| r.decision).collect(),
            ));
        }
        // Cross-slot on a cluster: one atomic call per slot, in order; a denial undoes the groups
        // already charged (see the crate docs).
        let mut decisions: Vec<Option<Decision>> = vec![None; items.len()];
        let mut charged: Vec<(Vec<Item<'_>>, Vec<Row>)> = Vec::new();
        for group in &groups {
            let sub = Self::subset(&items, group);
            let answer = match self
                .call(Mode::Decide, &sub, &id, 0, 0, Budget::guarded(deadline))
                .await
            {
                Ok(answer) => answer,
                Err(e) => {
                    self.undo(&charged, &id).await;
                    return Err(e);
                }
            };
            let allowed = answer.rows.iter().all(|r| r.decision.is_allowed());
            for (&i, row) in group.iter().zip(&answer.rows) {
                decisions[i] = Some(row.decision);
            }
            if allowed {
                charged.push((sub, answer.rows));
                continue;
            }
            // Denied: give back what earlier groups took, then report every other limit as it
            // stands (a peek at cost 0, as the script does within a group).
            self.undo(&charged, &id).await;
            let uncharged: Vec<Limit<'_>> = limits
                .iter()
                .map(|l| Limit::new(l.key, l.quota, 0))
                .collect();
            let uncharged = self.items(&uncharged);
            for other in &groups {
                if other == group {
                    continue;
                }
                let sub = Self::subset(&uncharged, other);
                let peek = self
                    .call(Mode::Peek, &sub, &id, 0, 0, Budget::unguarded(deadline))
                    .await?;
                for (&i, row) in other.iter().zip(&peek.rows) {
                    decisions[i] = Some(row.decision);
                }
            }
            break;
        }
        decisions
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map(Verdict::new)
            .ok_or_else(|| protocol("a limit got no decision".into()))
    }

    /// Undoes charged groups, best effort, each within a fresh timeout: a failure here leaves a
    /// charge in place, which only ever errs on the side of denial; it is logged and counted
    /// (`rate_limiter_store_compensation_errors_total{store="redis",op="undo"}`).
    async fn undo(&self, charged: &[(Vec<Item<'_>>, Vec<Row>)], id: &str) {
        for (items, rows) in charged {
            let undo: Vec<Item<'_>> = items
                .iter()
                .zip(rows)
                .enumerate()
                .map(|(i, (item, row))| {
                    let log =
                        item.limit.quota.algorithm() == tollgate_core::Algorithm::SlidingWindowLog;
                    Item {
                        key: item.key.clone(),
                        limit: item.limit,
                        cost: item.cost,
                        // A log's members are named after their index in the call that added them.
                        a: if log { i as u64 + 1 } else { row.a },
                        b: row.b,
                    }
                })
                .collect();
            let budget = Budget::unguarded(self.deadline());
            if let Err(error) = self.call(Mode::Undo, &undo, id, 0, 0, budget).await {
                compensation_failed("undo", &error);
            }
        }
    }

    async fn reserve_items(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> Result<Reserve, StoreError> {
        let items = self.items(limits);
        let groups = self.groups(&items);
        let id = self.inner.ids.next();
        let max_wait = micros(max_wait);
        let deadline = self.deadline();
        if let [_] = groups.as_slice() {
            let answer = self
                .call(
                    Mode::Reserve,
                    &items,
                    &id,
                    max_wait,
                    0,
                    Budget::guarded(deadline),
                )
                .await?;
            return self.reserve_answer(&items, answer);
        }
        // Cross-slot: agree on one departure time, then hold it in every group; if someone took
        // it in between, give back and try again (a few times).
        for _ in 0..3 {
            let mut at = 0;
            let mut first_now = None;
            for group in &groups {
                let sub = Self::subset(&items, group);
                let answer = self
                    .call(Mode::Earliest, &sub, &id, 0, 0, Budget::unguarded(deadline))
                    .await?;
                match answer.status {
                    0 => {}
                    3 => return Ok(Reserve::Never),
                    status => {
                        return Err(protocol(format!(
                            "unexpected script reply: earliest status {status}"
                        )));
                    }
                }
                first_now.get_or_insert(answer.now);
                at = at.max(answer.now + answer.wait);
            }
            let now = first_now.unwrap_or(at);
            let wait = at.saturating_sub(now);
            if wait > max_wait {
                return Ok(Reserve::WouldExceed {
                    retry_after: Duration::from_micros(wait),
                });
            }
            if wait > 0 && !limits.iter().all(|l| l.quota.algorithm().is_bucket()) {
                return Ok(Reserve::Retry {
                    after: Duration::from_micros(wait),
                });
            }
            let mut held = Vec::new();
            let mut lost = false;
            for group in &groups {
                let sub = Self::subset(&items, group);
                let budget = Budget::guarded(deadline);
                let answer = match self
                    .call(Mode::Reserve, &sub, &id, MAX_SPAN_MICROS, at, budget)
                    .await
                {
                    Ok(answer) => answer,
                    Err(error) => {
                        // The places held in the groups before are given back.
                        if let Err(e) = self.cancel_held(&held).await {
                            compensation_failed("cancel", &e);
                        }
                        return Err(error);
                    }
                };
                match answer.status {
                    0 => {
                        if let Reserve::Granted(r) = self.reserve_answer(&sub, answer)? {
                            held.extend_from_slice(r.held());
                        }
                    }
                    _ => {
                        lost = true;
                        break;
                    }
                }
            }
            if !lost {
                return Ok(Reserve::Granted(Reservation::new(
                    Duration::from_micros(wait),
                    held,
                )));
            }
            self.cancel_held(&held).await?;
        }
        Ok(Reserve::Retry {
            after: Duration::ZERO,
        })
    }

    fn reserve_answer(&self, items: &[Item<'_>], answer: Answer) -> Result<Reserve, StoreError> {
        let wait = Duration::from_micros(answer.wait);
        Ok(match answer.status {
            0 => {
                let held = items
                    .iter()
                    .zip(&answer.rows)
                    .filter(|(item, _)| item.limit.quota.algorithm().is_bucket())
                    .map(|(item, row)| Held {
                        key: item.limit.key.to_owned(),
                        before: Timestamp::from_micros(row.a),
                        after: Timestamp::from_micros(row.b),
                        charge: item.limit.quota.interval() * item.limit.cost,
                    })
                    .collect();
                Reserve::Granted(Reservation::new(wait, held))
            }
            1 => Reserve::WouldExceed { retry_after: wait },
            2 => Reserve::Retry { after: wait },
            3 => Reserve::Never,
            status => {
                return Err(protocol(format!(
                    "unexpected script reply: reserve status {status}"
                )));
            }
        })
    }

    async fn cancel_held(&self, held: &[Held]) -> Result<(), StoreError> {
        if held.is_empty() {
            return Ok(());
        }
        // The cancel script reads only the keys, the before/after times and the charge (given
        // as the cost, in µs).
        let quota = Quota::per_second(1).map_err(|e| protocol(e.to_string()))?;
        let limits: Vec<Limit<'_>> = held.iter().map(|h| Limit::new(&h.key, &quota, 0)).collect();
        let mut items = self.items(&limits);
        for (item, h) in items.iter_mut().zip(held) {
            item.a = h.before.as_micros();
            item.b = h.after.as_micros();
            item.cost = micros(h.charge);
        }
        let id = self.inner.ids.next();
        let budget = Budget::unguarded(self.deadline());
        for group in self.groups(&items) {
            let sub = Self::subset(&items, &group);
            self.call(Mode::Cancel, &sub, &id, 0, 0, budget).await?;
        }
        Ok(())
    }
}

impl Store for RedisStore {
    async fn decide(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        self.decide_items(limits).await
    }

    async fn peek(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        let items = self.items(limits);
        let id = self.inner.ids.next();
        let budget = Budget::unguarded(self.deadline());
        let mut decisions = vec![None; items.len()];
        for group in self.groups(&items) {
            let sub = Self::subset(&items, &group);
            let answer = self.call(Mode::Peek, &sub, &id, 0, 0, budget).await?;
            for (&i, row) in group.iter().zip(&answer.rows) {
                decisions[i] = Some(row.decision);
            }
        }
        decisions
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map(Verdict::new)
            .ok_or_else(|| protocol("a limit got no decision".into()))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(values: &[i64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn unpacks_the_script_reply() {
        let values: Vec<i64> = (0..11).map(|i| i * 1_000_000_007 - 3).collect();
        assert_eq!(unpack(&packed(&values), 1).ok(), Some(values));
        let big = vec![0, 1_763_800_000_000_000, i64::MAX, -1, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(unpack(&packed(&big), 1).ok(), Some(big));
    }

    /// A reply of one allowed row: status, now, wait, then the row's eight values.
    fn one_row() -> Vec<i64> {
        vec![0, 1_000, 0, 0, 10, 9, 1_000, 0, 0, 0, 0]
    }

    #[test]
    fn reads_a_plausible_reply() {
        let answer = parse(&one_row(), 1).expect("a valid reply");
        assert_eq!((answer.status, answer.now), (0, 1_000));
        assert_eq!(answer.rows[0].decision.outcome, Outcome::Allowed);
        assert_eq!(answer.rows[0].decision.remaining, 9);
        // A late call has no rows to read.
        let mut late = vec![0; 11];
        late[0] = LATE;
        assert!(parse(&late, 1).expect("a late reply").rows.is_empty());
    }

    #[test]
    fn codes_it_does_not_know_are_errors_not_decisions() {
        // (index, value): an outcome code, a status, negatives, a count past u32.
        for (i, v) in [
            (3, 3),
            (3, -1),
            (0, 5),
            (0, -1),
            (1, -1),
            (2, -7),
            (5, -1),
            (6, -1),
            (7, -2),
            (8, -3),
            (9, -4),
            (10, -5),
            (4, i64::from(u32::MAX) + 1),
            (5, i64::from(u32::MAX) + 1),
        ] {
            let mut values = one_row();
            values[i] = v;
            let e = match parse(&values, 1) {
                Ok(_) => panic!("value {v} at {i} was read as a decision"),
                Err(e) => e,
            };
            assert!(e.to_string().contains("unexpected script reply"), "{e}");
            assert!(!e.is_timeout() && !e.is_unavailable(), "{e}");
        }
    }

    proptest::proptest! {
        /// Any values the script can pack, for any number of limits, unpack to themselves.
        #[test]
        fn packed_replies_unpack_to_what_was_packed(
            n in 0usize..8,
            seed in proptest::collection::vec(proptest::prelude::any::<i64>(), 67),
        ) {
            let values = &seed[..3 + 8 * n];
            proptest::prop_assert_eq!(unpack(&packed(values), n).ok(), Some(values.to_vec()));
            // One byte short or long is refused.
            let bytes = packed(values);
            proptest::prop_assert!(unpack(&bytes[1..], n).is_err());
            proptest::prop_assert!(unpack(&[&bytes[..], &[0]].concat(), n).is_err());
        }
    }

    #[test]
    fn refuses_a_reply_of_the_wrong_size() {
        let eleven = packed(&[0; 11]);
        for bad in [&eleven[..87], &eleven[..], &[][..]] {
            let n = if bad.len() == 88 { 2 } else { 1 };
            let e = unpack(bad, n).expect_err("refused");
            assert!(e.to_string().contains("unexpected script reply"), "{e}");
        }
    }
}

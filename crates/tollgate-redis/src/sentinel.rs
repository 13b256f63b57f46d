//! The connection of a Sentinel-backed store: a multiplexed connection to the master the
//! sentinels name, dropped when the master stops being one or the sentinels name another, found
//! again through the sentinels by the next call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError,
    RedisFuture, Value,
};

/// How often the store asks a sentinel which node is the master. A forced failover (`SENTINEL
/// FAILOVER`) leaves the old master writable for seconds, so an error reply cannot be waited
/// for: this bounds how long the store keeps writing to a master the sentinels replaced.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// A master's `(host, port)`.
type Addr = (String, u16);

/// A connection to the master of a Sentinel group. Clones share one multiplexed connection.
///
/// A call goes to the current master's connection. When it fails in a way that says this
/// server is not (or no longer) the master to talk to (the connection refused, dropped, timed
/// out; `READONLY` from a demoted master; `MASTERDOWN`), the connection is forgotten, and the
/// next call asks the sentinels for the master again. The failed call itself is not replayed:
/// its error goes up to the failure policy. A background task also asks a sentinel every
/// [`WATCH_INTERVAL`] which node is the master, and forgets the connection when the answer
/// changes; it ends when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct SentinelConnection {
    shared: Arc<Shared>,
}

struct Shared {
    /// The sentinels, locked by the one resolution running at a time.
    client: tokio::sync::Mutex<SentinelClient>,
    /// The sentinels again, for the watcher's queries, and the master's name.
    sentinels: Vec<Client>,
    master: String,
    /// Whether the watcher task runs.
    watching: AtomicBool,
    state: Mutex<State>,
    config: AsyncConnectionConfig,
    /// Bound on one resolution: asking the sentinels, checking the master, connecting.
    resolve_timeout: Duration,
}

#[derive(Default)]
struct State {
    /// The current master's connection and its generation.
    current: Option<(u64, MultiplexedConnection)>,
    /// The current master's address, as the sentinels named it.
    addr: Option<Addr>,
    /// Generations handed out so far.
    generation: u64,
    /// When the last resolution failed, and why.
    failure: Option<(Instant, RedisError)>,
}

impl SentinelConnection {
    /// A connection to the master named `master` by the sentinels at `sentinels`, opened with
    /// `node_info` (credentials, database; `None` for neither); nothing is opened until the
    /// first call.
    pub(crate) fn new(
        master: &str,
        sentinels: &[String],
        node_info: Option<redis::RedisConnectionInfo>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<SentinelConnection, RedisError> {
        let clients = sentinels
            .iter()
            .map(|url| Client::open(url.as_str()))
            .collect::<Result<Vec<_>, _>>()?;
        let node_info = node_info
            .map(|info| SentinelNodeConnectionInfo::default().set_redis_connection_info(info));
        let client = SentinelClient::build(
            sentinels.to_vec(),
            master.to_owned(),
            node_info,
            SentinelServerType::Master,
        )?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        Ok(SentinelConnection {
            shared: Arc::new(Shared {
                client: tokio::sync::Mutex::new(client),
                sentinels: clients,
                master: master.to_owned(),
                watching: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                config,
                // Sentinel lookup, then the master's ROLE check, then the connection itself.
                resolve_timeout: connect_timeout * 3,
            }),
        })
    }

    /// The current master's connection, found through the sentinels if there is none.
    ///
    /// The lookup runs in a task of its own, so a call that reaches its deadline meanwhile
    /// does not waste it: the next call finds its result.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), RedisError> {
        if let Some(current) = self.shared.state().current.clone() {
            return Ok(current);
        }
        let shared = Arc::clone(&self.shared);
        let asked = Instant::now();
        tokio::spawn(async move { shared.resolve(asked).await })
            .await
            .map_err(|e| {
                RedisError::from((
                    ErrorKind::Io,
                    "the sentinel lookup task failed",
                    e.to_string(),
                ))
            })?
    }

    /// Runs `request` on the master's connection; forgets the connection if the error says the
    /// master is gone or changed.
    async fn run<T>(
        &self,
        request: impl AsyncFnOnce(&mut MultiplexedConnection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let (generation, mut conn) = self.connection().await?;
        let result = request(&mut conn).await;
        if let Err(e) = &result
            && master_is_gone(e)
        {
            self.shared.forget(generation, e);
        }
        result
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a few plain fields, consistent after any panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets connection `generation` (if it is still the current one) after `error`.
    fn forget(&self, generation: u64, error: &RedisError) {
        let mut state = self.state();
        if state
            .current
            .as_ref()
            .is_some_and(|(g, _)| *g == generation)
        {
            state.current = None;
            state.addr = None;
            tracing::warn!(
                %error,
                "redis master connection lost or no longer a master; the next call asks the sentinels"
            );
        }
    }

    /// Starts the watcher, once.
    fn watch(self: &Arc<Self>) {
        if !self.watching.swap(true, Ordering::AcqRel) {
            tokio::spawn(watch(Arc::downgrade(self), self.config.clone()));
        }
    }

    /// Forgets connection `generation` if the sentinels now name `reported`, not its master.
    fn switched(&self, generation: u64, reported: &Addr) {
        let mut state = self.state();
        let current = state.current.as_ref().map(|(g, _)| *g);
        if current == Some(generation) && state.addr.as_ref().is_some_and(|a| a != reported) {
            tracing::warn!(
                old = ?state.addr,
                new = ?reported,
                "the sentinels name a new redis master; the next call connects to it"
            );
            state.current = None;
            state.addr = None;
        }
    }

    /// The master the first sentinel that answers names, reusing (or opening) a connection to
    /// each sentinel in `conns`.
    async fn ask(
        &self,
        config: &AsyncConnectionConfig,
        conns: &mut [Option<MultiplexedConnection>],
    ) -> Option<Addr> {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("GET-MASTER-ADDR-BY-NAME").arg(&self.master);
        for (client, slot) in self.sentinels.iter().zip(conns.iter_mut()) {
            if slot.is_none() {
                *slot = client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
                    .ok();
            }
            let Some(conn) = slot.as_mut() else { continue };
            match cmd.query_async::<Option<Addr>>(conn).await {
                Ok(Some(addr)) => return Some(addr),
                // This sentinel does not know the master, or does not answer: ask the next.
                Ok(None) => {}
                Err(_) => *slot = None,
            }
        }
        None
    }

    /// Asks the sentinels for the master and connects to it, unless another lookup did it (or
    /// failed) since `asked`: then its result is the answer, so a crowd of waiting calls makes
    /// one lookup, not one each.
    async fn resolve(
        self: &Arc<Self>,
        asked: Instant,
    ) -> Result<(u64, MultiplexedConnection), RedisError> {
        let mut client = self.client.lock().await;
        {
            let state = self.state();
            if let Some(current) = state.current.clone() {
                return Ok(current);
            }
            if let Some((at, error)) = &state.failure
                && *at >= asked
            {
                return Err(error.clone());
            }
        }
        let lookup = async {
            let master = client.async_get_client().await?;
            let addr = tcp_addr(master.get_connection_info().addr());
            let conn = master
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            Ok::<_, RedisError>((conn, addr))
        };
        let found = match tokio::time::timeout(self.resolve_timeout, lookup).await {
            Ok(found) => found,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "no redis master found through the sentinels in time",
                format!("{:?}", self.resolve_timeout),
            ))),
        };
        let mut state = self.state();
        match found {
            Ok((conn, addr)) => {
                state.generation += 1;
                state.failure = None;
                state.addr = addr;
                let current = (state.generation, conn);
                state.current = Some(current.clone());
                drop(state);
                self.watch();
                Ok(current)
            }
            Err(e) => {
                // Whatever the sentinels said, the store cannot reach a master: unavailable.
                let error = RedisError::from((
                    ErrorKind::Io,
                    "no redis master reachable through the sentinels",
                    e.to_string(),
                ));
                state.failure = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }
}

/// The watcher: every [`WATCH_INTERVAL`], while the store lives, asks a sentinel for the master
/// and forgets the connection if it leads elsewhere.
async fn watch(shared: Weak<Shared>, config: AsyncConnectionConfig) {
    let mut conns: Vec<Option<MultiplexedConnection>> = Vec::new();
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        conns.resize(shared.sentinels.len(), None);
        let current = {
            let state = shared.state();
            state.current.as_ref().map(|(g, _)| *g)
        };
        if let Some(generation) = current
            && let Some(reported) = shared.ask(&config, &mut conns).await
        {
            shared.switched(generation, &reported);
        }
    }
}

/// The host and port of a TCP address.
fn tcp_addr(addr: &ConnectionAddr) -> Option<Addr> {
    match addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Some((host.clone(), *port))
        }
        _ => None,
    }
}

/// Whether `e` says the connection no longer leads to a usable master.
fn master_is_gone(e: &RedisError) -> bool {
    e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_io_error()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
            )
        )
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.run(async move |c| c.req_packed_command(cmd).await))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(self.run(async move |c| c.req_packed_commands(pipeline, offset, count).await))
    }

    fn get_db(&self) -> i64 {
        self.shared
            .state()
            .current
            .as_ref()
            .map_or(0, |(_, c)| c.get_db())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_that_send_the_store_back_to_the_sentinels() {
        let gone = [
            RedisError::from((ErrorKind::Io, "connection refused")),
            RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        ];
        for e in &gone {
            assert!(master_is_gone(e), "{e}");
        }
        let kept = [
            RedisError::from((ErrorKind::UnexpectedReturnType, "not a string")),
            RedisError::from((
                ErrorKind::Server(redis::ServerErrorKind::NoScript),
                "NOSCRIPT",
            )),
        ];
        for e in &kept {
            assert!(!master_is_gone(e), "{e}");
        }
    }

    #[test]
    fn tcp_addresses() {
        let addr = ConnectionAddr::Tcp("10.0.0.1".into(), 6380);
        assert_eq!(tcp_addr(&addr), Some(("10.0.0.1".to_owned(), 6380)));
        assert_eq!(
            tcp_addr(&ConnectionAddr::Unix("/tmp/redis.sock".into())),
            None
        );
    }
}

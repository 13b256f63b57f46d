//! A Redis Sentinel group: one master, one replica and three sentinels, each a `redis-server`
//! child process.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::resp::Reply;
use crate::server::{Mode, RedisServer, info_field};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "tollgate";
/// Number of sentinels.
const SENTINELS: usize = 3;
/// Sentinels that must agree the master is down before a failover starts.
const QUORUM: usize = 2;
/// `down-after-milliseconds`: how long a node must be unreachable to be considered down.
const DOWN_AFTER_MS: u32 = 1_000;
/// `failover-timeout`: small, so a failover (and a retry of one) finishes in seconds.
const FAILOVER_TIMEOUT_MS: u32 = 3_000;
/// Bound on waiting for the group to form (replication up, every sentinel seeing every node).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of each probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between probes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Log lines per process included in a [`Error::NotReady`].
const LOG_LINES: usize = 20;

/// A Sentinel-managed Redis: node 0 starts as the master, node 1 as its replica
/// (`--replicaof`), and three sentinels monitor the master as [`MASTER_NAME`] with quorum 2,
/// `down-after-milliseconds 1000` and `failover-timeout 3000`, so a failover (forced with
/// [`failover`](Self::failover), or after the master is killed or paused) completes in a few
/// seconds.
///
/// [`start`](Self::start) returns once the replica is in sync and every sentinel knows the
/// master, the replica and the two other sentinels. Dropping the value kills every process;
/// during a panic each one's log tail is printed, as for a [`RedisServer`].
#[derive(Debug)]
pub struct RedisSentinel {
    nodes: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
}

impl RedisSentinel {
    /// Starts the group and waits (up to 30 s) until it is formed.
    ///
    /// # Errors
    ///
    /// [`Error::NotInstalled`] if `redis-server` is missing, [`Error::NotReady`] if a process
    /// does not start or the group does not form in time (with every process's log tail).
    pub fn start() -> Result<RedisSentinel> {
        Self::start_secured(None)
    }

    /// Starts the group with data nodes that ask for `password` (`requirepass`, and
    /// `masterauth` so either can replicate from the other); the sentinels know it
    /// (`sentinel auth-pass`) and have none of their own.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with_password(password: &str) -> Result<RedisSentinel> {
        Self::start_secured(Some(password))
    }

    fn start_secured(password: Option<&str>) -> Result<RedisSentinel> {
        let master = RedisServer::start_secured(Mode::Standalone, password)?;
        let replica = RedisServer::start_secured(Mode::Replica(master.port()), password)?;
        let mut lines = format!(
            "sentinel monitor {MASTER_NAME} 127.0.0.1 {port} {QUORUM}\n\
             sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            port = master.port()
        );
        if let Some(password) = password {
            lines.push_str(&format!("sentinel auth-pass {MASTER_NAME} {password}\n"));
        }
        let sentinels = (0..SENTINELS)
            .map(|_| RedisServer::start_mode(Mode::Sentinel(lines.clone())))
            .collect::<Result<Vec<_>>>()?;
        let group = RedisSentinel {
            nodes: vec![master, replica],
            sentinels,
        };
        group.wait_formed(READY_TIMEOUT)?;
        Ok(group)
    }

    /// The name the master is monitored under ([`MASTER_NAME`]).
    pub fn master_name(&self) -> &'static str {
        MASTER_NAME
    }

    /// The sentinels' URLs, `redis://127.0.0.1:PORT`.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// The data nodes: node 0 started as the master, node 1 as the replica.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Mutable access to data node `i`, to [`stop`](RedisServer::stop),
    /// [`pause`](RedisServer::pause) or [`restart`](RedisServer::restart) it.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The sentinels.
    pub fn sentinels(&self) -> &[RedisServer] {
        &self.sentinels
    }

    /// Mutable access to sentinel `i`.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn sentinel_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.sentinels[i]
    }

    /// The index of the data node at `addr`, if it is one of ours.
    pub fn node_index(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr() == addr)
    }

    /// The master's address as the first sentinel that answers reports it
    /// (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] if no sentinel answers with an address.
    pub fn master_addr(&self) -> Result<SocketAddr> {
        let mut problems = Vec::new();
        for sentinel in &self.sentinels {
            match master_addr_of(sentinel) {
                Ok(addr) => return Ok(addr),
                Err(why) => problems.push(format!("sentinel {}: {why}", sentinel.port())),
            }
        }
        Err(self.not_ready(format!(
            "no sentinel reports the master: {}",
            problems.join("; ")
        )))
    }

    /// Forces a failover (`SENTINEL FAILOVER`, sent to the first sentinel that accepts it),
    /// without waiting for it: see [`wait_for_new_master`](Self::wait_for_new_master).
    ///
    /// # Errors
    ///
    /// [`Error::Command`] if every sentinel refuses (say `NOGOODSLAVE`) or cannot be reached.
    pub fn failover(&self) -> Result<()> {
        let mut problems = Vec::new();
        for sentinel in &self.sentinels {
            match sentinel.cmd(&["SENTINEL", "FAILOVER", MASTER_NAME]) {
                Ok(Reply::Status(ok)) if ok == "OK" => return Ok(()),
                Ok(reply) => problems.push(format!("sentinel {}: {reply:?}", sentinel.port())),
                Err(e) => problems.push(format!("sentinel {}: {e}", sentinel.port())),
            }
        }
        Err(Error::Command {
            command: format!("SENTINEL FAILOVER {MASTER_NAME}"),
            status: "refused by every sentinel".to_owned(),
            output: problems.join("\n"),
        })
    }

    /// Waits until every running sentinel reports a master other than `old` and that node
    /// says it is a master (`INFO replication`); returns its address.
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] (with every log tail) if that does not happen within `timeout`.
    pub fn wait_for_new_master(
        &mut self,
        old: SocketAddr,
        timeout: Duration,
    ) -> Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.new_master(old);
            match seen {
                Ok(addr) => return Ok(addr),
                Err(why) if Instant::now() >= deadline => {
                    return Err(self.not_ready(format!(
                        "no new master (other than {old}) within {timeout:?}: {why}"
                    )));
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// Waits until every running sentinel reports the same master, whichever it is, and that
    /// node says it is a master; returns its address. For a group a fault may have left in
    /// either state (a frozen master replaced, or back in its place).
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] (with every log tail) if that does not happen within `timeout`.
    pub fn wait_for_master(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.agreed_master(None) {
                Ok(addr) => return Ok(addr),
                Err(why) if Instant::now() >= deadline => {
                    return Err(self.not_ready(format!(
                        "the sentinels agree on no master within {timeout:?}: {why}"
                    )));
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// The master every running sentinel agrees on, if it is not `old` and says it is one.
    fn new_master(&mut self, old: SocketAddr) -> std::result::Result<SocketAddr, String> {
        self.agreed_master(Some(old))
    }

    /// The master every running sentinel agrees on, if it is not `old` (when given) and says it
    /// is one.
    fn agreed_master(
        &mut self,
        old: Option<SocketAddr>,
    ) -> std::result::Result<SocketAddr, String> {
        let mut agreed = None;
        for sentinel in &mut self.sentinels {
            if !sentinel.is_running() {
                continue;
            }
            let addr = master_addr_of(sentinel)?;
            if Some(addr) == old {
                return Err(format!("sentinel {} still reports {addr}", sentinel.port()));
            }
            if agreed.is_some_and(|a| a != addr) {
                return Err(format!("sentinels disagree: {agreed:?} and {addr}"));
            }
            agreed = Some(addr);
        }
        let addr = agreed.ok_or("no sentinel is running")?;
        let node = self.nodes.iter().find(|n| n.addr() == addr).ok_or(format!(
            "the sentinels report {addr}, which is none of ours"
        ))?;
        let role = role_of(node)?;
        if role == "master" {
            Ok(addr)
        } else {
            Err(format!("{addr} reports role:{role}"))
        }
    }

    /// Waits until the replica's link to the master is up and every sentinel sees the master
    /// (as a master), one replica and the two other sentinels.
    fn wait_formed(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let problems = self.formation_problems();
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "sentinel group not formed after {timeout:?}:\n{}",
                    problems.join("\n")
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn formation_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.nodes[1].cmd_timeout(&["INFO", "replication"], PROBE_TIMEOUT) {
            Ok(reply) => {
                let link = reply
                    .as_str()
                    .and_then(|t| info_field(t, "master_link_status"));
                if link != Some("up") {
                    problems.push(format!("replica: master_link_status {link:?}"));
                }
            }
            Err(e) => problems.push(format!("replica: {e}")),
        }
        for sentinel in &self.sentinels {
            let fields =
                match sentinel.cmd_timeout(&["SENTINEL", "MASTER", MASTER_NAME], PROBE_TIMEOUT) {
                    Ok(reply) => pairs(&reply),
                    Err(e) => {
                        problems.push(format!("sentinel {}: {e}", sentinel.port()));
                        continue;
                    }
                };
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            let others = (SENTINELS - 1).to_string();
            let expected = [
                ("flags", "master"),
                ("num-slaves", "1"),
                ("num-other-sentinels", others.as_str()),
            ];
            for (name, want) in expected {
                if field(name) != Some(want) {
                    problems.push(format!(
                        "sentinel {}: {name} is {:?}, want {want}",
                        sentinel.port(),
                        field(name)
                    ));
                }
            }
        }
        problems
    }

    fn not_ready(&self, what: String) -> Error {
        let log = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("node {i}"), n))
            .chain(
                self.sentinels
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("sentinel {i}"), s)),
            )
            .map(|(name, server)| {
                format!(
                    "== {name} (port {}, dir {}) ==\n{}",
                    server.port(),
                    server.dir().display(),
                    server.log_tail(LOG_LINES)
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        Error::NotReady { what, log }
    }
}

/// The master's address as `sentinel` reports it.
fn master_addr_of(sentinel: &RedisServer) -> std::result::Result<SocketAddr, String> {
    let reply = sentinel
        .cmd_timeout(
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
            PROBE_TIMEOUT,
        )
        .map_err(|e| e.to_string())?;
    let parts = reply.as_array().unwrap_or_default();
    match parts {
        [host, port] => {
            let (Some(host), Some(port)) = (host.as_str(), port.as_str()) else {
                return Err(format!("unexpected reply {reply:?}"));
            };
            format!("{host}:{port}")
                .parse()
                .map_err(|e| format!("bad address {host}:{port}: {e}"))
        }
        _ => Err(format!("unexpected reply {reply:?}")),
    }
}

/// The `role` field of `node`'s `INFO replication`.
fn role_of(node: &RedisServer) -> std::result::Result<String, String> {
    let reply = node
        .cmd_timeout(&["INFO", "replication"], PROBE_TIMEOUT)
        .map_err(|e| format!("{}: {e}", node.addr()))?;
    reply
        .as_str()
        .and_then(|t| info_field(t, "role"))
        .map(str::to_owned)
        .ok_or(format!("{}: no role in {reply:?}", node.addr()))
}

/// A flat `[key, value, key, value, ..]` reply as pairs (non-text elements are skipped).
fn pairs(reply: &Reply) -> Vec<(String, String)> {
    let items = reply.as_array().unwrap_or_default();
    items
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())),
            _ => None,
        })
        .collect()
}

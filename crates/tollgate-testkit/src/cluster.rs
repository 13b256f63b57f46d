//! A Redis Cluster made of several `redis-server` child processes.

use std::fs::{self, File};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::resp::Reply;
use crate::server::{RedisServer, find_program, info_field};

/// Number of masters used by [`RedisCluster::start`].
const DEFAULT_MASTERS: usize = 3;
/// Redis Cluster's number of hash slots.
const SLOTS: &str = "16384";
/// Bound on `redis-cli --cluster create`.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on waiting for `cluster_state:ok` after creating the cluster or restarting a node.
const OK_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of each `CLUSTER INFO` probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between probes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Log lines per node included in a [`Error::NotReady`].
const LOG_LINES: usize = 20;
/// Where the output of `redis-cli --cluster create` is kept (in node 0's directory).
const CREATE_LOG: &str = "cluster-create.log";

/// A Redis Cluster of N masters (no replicas), each a [`RedisServer`] with cluster mode on.
///
/// The masters are joined with `redis-cli --cluster create ... --cluster-replicas 0
/// --cluster-yes`, so the 16384 slots are split evenly between them, and
/// [`start`](Self::start) returns only once every node reports `cluster_state:ok`.
/// Nodes use a 2 s `cluster-node-timeout`, so failures are detected (and healed) quickly.
///
/// Dropping the cluster drops (kills) every node.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts a cluster of 3 masters and waits until it is healthy.
    ///
    /// # Errors
    ///
    /// See [`start_with`](Self::start_with).
    pub fn start() -> Result<RedisCluster> {
        Self::start_with(DEFAULT_MASTERS)
    }

    /// Starts a cluster of `masters` masters and waits (up to 30 s) until every node
    /// reports `cluster_state:ok`.
    ///
    /// # Errors
    ///
    /// [`Error::NotInstalled`] if `redis-server` or `redis-cli` is missing,
    /// [`Error::Command`] if `redis-cli --cluster create` fails, [`Error::NotReady`] if a
    /// node does not start or the cluster does not become healthy in time.
    ///
    /// # Panics
    ///
    /// If `masters < 3` (Redis Cluster needs at least 3 masters).
    pub fn start_with(masters: usize) -> Result<RedisCluster> {
        assert!(
            masters >= 3,
            "a Redis Cluster needs at least 3 masters, got {masters}"
        );
        let cli = find_program("redis-cli")?;
        let nodes = (0..masters)
            .map(|_| RedisServer::start_cluster_node())
            .collect::<Result<Vec<_>>>()?;
        let cluster = RedisCluster { nodes };

        let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr().to_string()).collect();
        let mut command = Command::new(&cli);
        command.args(["--cluster", "create"]).args(&addrs).args([
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]);
        let command_line = format!(
            "{} --cluster create {} --cluster-replicas 0 --cluster-yes",
            cli.display(),
            addrs.join(" ")
        );
        let log_path = cluster.nodes[0].dir().join(CREATE_LOG);
        run_bounded(command, &command_line, &log_path, CREATE_TIMEOUT)?;

        cluster.wait_ok(OK_TIMEOUT)?;
        Ok(cluster)
    }

    /// The nodes' URLs, `redis://127.0.0.1:PORT`, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, in the order they were started.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Mutable access to node `i`.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// Kills node `i` (see [`RedisServer::stop`]). Once the other nodes notice (about
    /// 2-4 s), the cluster reports `cluster_state:fail`, since its slots are uncovered.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Restarts node `i` on the same port with the same `nodes.conf`, so it rejoins with
    /// its old identity and slots (but no data), then waits (up to 30 s) until every node
    /// reports `cluster_state:ok` again.
    ///
    /// # Errors
    ///
    /// As [`RedisServer::restart`] and [`wait_ok`](Self::wait_ok).
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].restart()?;
        self.wait_ok(OK_TIMEOUT)
    }

    /// Waits until every node reports, in `CLUSTER INFO`, `cluster_state:ok`, all nodes
    /// known (`cluster_known_nodes`), and all 16384 slots assigned and ok.
    ///
    /// A stopped node never reports anything, so this times out while one is stopped.
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] listing what was still wrong at the deadline, with log tails.
    pub fn wait_ok(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let problems: Vec<String> = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, node)| {
                    self.node_problem(node)
                        .map(|why| format!("node {i} (port {}): {why}", node.port()))
                })
                .collect();
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, node)| {
                        format!(
                            "== node {i} (port {}, dir {}) ==\n{}",
                            node.port(),
                            node.dir().display(),
                            node.log_tail(LOG_LINES)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(Error::NotReady {
                    what: format!("cluster not ok after {timeout:?}:\n{}", problems.join("\n")),
                    log,
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// What is wrong with `node`'s view of the cluster, if anything.
    fn node_problem(&self, node: &RedisServer) -> Option<String> {
        let reply = match node.cmd_timeout(&["CLUSTER", "INFO"], PROBE_TIMEOUT) {
            Ok(reply) => reply,
            Err(e) => return Some(e.to_string()),
        };
        let Some(text) = reply.as_str() else {
            return Some(format!("unexpected CLUSTER INFO reply {reply:?}"));
        };
        let known = self.nodes.len().to_string();
        let expected = [
            ("cluster_state", "ok"),
            ("cluster_known_nodes", known.as_str()),
            ("cluster_slots_assigned", SLOTS),
            ("cluster_slots_ok", SLOTS),
        ];
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|&(field, want)| {
                let got = info_field(text, field);
                (got != Some(want)).then(|| format!("{field}:{} (want {want})", got.unwrap_or("?")))
            })
            .collect();
        (!wrong.is_empty()).then(|| wrong.join(", "))
    }

    /// The index of the node that owns the hash slot of `key` (per `CLUSTER KEYSLOT` and
    /// `CLUSTER SLOTS`, asked of the first node that answers).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if no node answers, [`Error::Protocol`] if the replies do not make
    /// sense or no node owns the slot.
    pub fn node_for_key(&self, key: &str) -> Result<usize> {
        let mut last_err = None;
        for node in &self.nodes {
            match Self::owner_port(node, key) {
                Ok(port) => {
                    return self
                        .nodes
                        .iter()
                        .position(|n| n.port() == port)
                        .ok_or_else(|| {
                            Error::Protocol(format!("slot of {key:?} owned by unknown port {port}"))
                        });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Protocol("cluster has no nodes".into())))
    }

    fn owner_port(node: &RedisServer, key: &str) -> Result<u16> {
        let bad = |what: &str, reply: &Reply| Error::Protocol(format!("{what}: {reply:?}"));
        let reply = node.cmd(&["CLUSTER", "KEYSLOT", key])?;
        let slot = reply
            .as_int()
            .ok_or_else(|| bad("CLUSTER KEYSLOT", &reply))?;
        let reply = node.cmd(&["CLUSTER", "SLOTS"])?;
        let ranges = reply
            .as_array()
            .ok_or_else(|| bad("CLUSTER SLOTS", &reply))?;
        for range in ranges {
            // [start, end, [ip, port, id, ...], replicas...]
            let fields = range
                .as_array()
                .ok_or_else(|| bad("CLUSTER SLOTS entry", range))?;
            let (Some(start), Some(end), Some(master)) = (
                fields.first().and_then(Reply::as_int),
                fields.get(1).and_then(Reply::as_int),
                fields.get(2).and_then(Reply::as_array),
            ) else {
                return Err(bad("CLUSTER SLOTS entry", range));
            };
            if (start..=end).contains(&slot) {
                return master
                    .get(1)
                    .and_then(Reply::as_int)
                    .and_then(|port| u16::try_from(port).ok())
                    .ok_or_else(|| bad("CLUSTER SLOTS master", range));
            }
        }
        Err(Error::Protocol(format!(
            "no node owns slot {slot} of {key:?}"
        )))
    }
}

/// Runs `command` with its output going to `log_path`, killing it after `timeout`.
fn run_bounded(
    mut command: Command,
    command_line: &str,
    log_path: &std::path::Path,
    timeout: Duration,
) -> Result<()> {
    let out = File::create(log_path)?;
    let err = out.try_clone()?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| Error::Spawn {
            program: command_line.to_owned(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    match status {
        Some(status) if status.success() => Ok(()),
        status => Err(Error::Command {
            command: command_line.to_owned(),
            status: status
                .map_or_else(|| format!("timed out after {timeout:?}"), |s| s.to_string()),
            output: fs::read(log_path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
        }),
    }
}

//! A Redis Cluster made of several `redis-server` child processes.

use std::fs::{self, File};
use std::process::{Command, Stdio};
use std::sync::Mutex;
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

/// A Redis Cluster of N masters, each with R replicas (none by default), each node a
/// [`RedisServer`] with cluster mode on.
///
/// The nodes are joined with `redis-cli --cluster create ... --cluster-replicas R
/// --cluster-yes`, so the 16384 slots are split evenly between the masters, and
/// [`start`](Self::start) returns only once the cluster is healthy (see
/// [`wait_ok`](Self::wait_ok)). `redis-cli` chooses which nodes become masters and which
/// replica follows which master: ask [`masters`](Self::masters),
/// [`replicas_of`](Self::replicas_of) and [`master_of`](Self::master_of) instead of assuming
/// it from the start order.
///
/// Nodes use a 2 s `cluster-node-timeout`, so failures are detected (and healed) quickly, and
/// `cluster-replica-validity-factor 0`, so a replica is always eligible for promotion: a
/// killed master's replica takes over its slots a few seconds after the kill (see
/// [`wait_for_failover`](Self::wait_for_failover)).
///
/// Dropping the cluster drops (kills) every node.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// Masters at creation: the number of nodes that serve slots in a healthy cluster.
    masters: usize,
    replicas_per_master: usize,
    /// The topology of the last healthy state seen (by `start`, `wait_ok`, `wait_for_failover`):
    /// which slots the killed master served, and which nodes were its replicas.
    healthy: Mutex<Option<Topology>>,
}

/// Slot ranges `(first, last, index of the serving node)`.
type SlotMap = Vec<(i64, i64, usize)>;

/// Who serves what, as every running node agreed at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Topology {
    /// Slot ranges `(first, last, node index)`, sorted.
    slots: SlotMap,
    /// For each node, the master it replicates (`None`: a master, or not running).
    master_of: Vec<Option<usize>>,
}

/// A node's role as its `ROLE` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Master,
    /// A replica of the node on `master_port`; `state` is `connected` once in sync.
    Replica {
        master_port: u16,
        state: String,
    },
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

    /// Starts a cluster of `masters` masters (no replicas) and waits (up to 30 s) until it is
    /// healthy (see [`wait_ok`](Self::wait_ok)).
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
        Self::start_with_replicas(masters, 0)
    }

    /// Starts a cluster of `masters` masters with `replicas_per_master` replicas each
    /// (`masters * (1 + replicas_per_master)` nodes) and waits (up to 30 s) until it is
    /// healthy and every master has its replicas, each in sync (`ROLE` says `connected`).
    ///
    /// # Errors
    ///
    /// As [`start_with`](Self::start_with).
    ///
    /// # Panics
    ///
    /// If `masters < 3` (Redis Cluster needs at least 3 masters).
    pub fn start_with_replicas(masters: usize, replicas_per_master: usize) -> Result<RedisCluster> {
        assert!(
            masters >= 3,
            "a Redis Cluster needs at least 3 masters, got {masters}"
        );
        let cli = find_program("redis-cli")?;
        let nodes = (0..masters * (1 + replicas_per_master))
            .map(|_| RedisServer::start_cluster_node())
            .collect::<Result<Vec<_>>>()?;
        let cluster = RedisCluster {
            nodes,
            masters,
            replicas_per_master,
            healthy: Mutex::new(None),
        };

        let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr().to_string()).collect();
        let replicas = replicas_per_master.to_string();
        let mut command = Command::new(&cli);
        command.args(["--cluster", "create"]).args(&addrs).args([
            "--cluster-replicas",
            &replicas,
            "--cluster-yes",
        ]);
        let command_line = format!(
            "{} --cluster create {} --cluster-replicas {replicas} --cluster-yes",
            cli.display(),
            addrs.join(" ")
        );
        let log_path = cluster.nodes[0].dir().join(CREATE_LOG);
        run_bounded(command, &command_line, &log_path, CREATE_TIMEOUT)?;

        cluster.wait_until(OK_TIMEOUT, None, true)?;
        Ok(cluster)
    }

    /// The nodes' URLs, `redis://127.0.0.1:PORT`, in node order (masters and replicas).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The URLs of the nodes that serve slots now (see [`masters`](Self::masters)).
    ///
    /// # Errors
    ///
    /// As [`masters`](Self::masters).
    pub fn master_urls(&self) -> Result<Vec<String>> {
        Ok(self
            .masters()?
            .into_iter()
            .map(|i| self.nodes[i].url())
            .collect())
    }

    /// The nodes, in the order they were started.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Mutable access to node `i`, to [`stop`](RedisServer::stop),
    /// [`pause`](RedisServer::pause), [`resume`](RedisServer::resume) or
    /// [`restart`](RedisServer::restart) it.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The index of the node listening on `port`, if it is one of ours.
    pub fn node_index(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// Kills node `i` (see [`RedisServer::stop`]). Once the other nodes notice (about
    /// 2-4 s), a master's replica is promoted in its place; a master without replicas leaves
    /// its slots uncovered, and the cluster reports `cluster_state:fail`.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Freezes node `i` with `SIGSTOP` (see [`RedisServer::pause`]). Frozen for longer than the
    /// 2 s node timeout, a master is failed over as if it had been killed.
    ///
    /// # Errors
    ///
    /// As [`RedisServer::pause`].
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn pause_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].pause()
    }

    /// Lets a [`pause_node`](Self::pause_node)d node run again (`SIGCONT`).
    ///
    /// # Errors
    ///
    /// As [`RedisServer::resume`].
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn resume_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].resume()
    }

    /// Restarts node `i` on the same port with the same `nodes.conf`, so it rejoins with
    /// its old identity (but no data), then waits (up to 30 s) until the cluster is healthy
    /// again (see [`wait_ok`](Self::wait_ok)). A master without replicas serves its old
    /// slots again; a master whose replica was promoted meanwhile rejoins as a replica of the
    /// new master (the other nodes tell it the slots moved), and this returns once it says so
    /// and is in sync.
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

    /// The indexes of the nodes that serve slots now, sorted, per `CLUSTER SLOTS` of the first
    /// running node that answers.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if no running node answers, [`Error::Protocol`] if the reply does not make
    /// sense or names a node that is not ours.
    pub fn masters(&self) -> Result<Vec<usize>> {
        let map = self.first_answer(|node| self.slot_owners(node))?;
        let mut masters: Vec<usize> = map.iter().map(|&(_, _, i)| i).collect();
        masters.sort_unstable();
        masters.dedup();
        Ok(masters)
    }

    /// The indexes of the running nodes that say (`ROLE`) they replicate node `master`, sorted.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if a running node does not answer (its role is unknown),
    /// [`Error::Protocol`] if a `ROLE` reply does not make sense.
    ///
    /// # Panics
    ///
    /// If `master` is out of range.
    pub fn replicas_of(&self, master: usize) -> Result<Vec<usize>> {
        let port = self.nodes[master].port();
        let mut replicas = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if i == master || !node.is_started() {
                continue;
            }
            if let Role::Replica { master_port, .. } = role_of(node)?
                && master_port == port
            {
                replicas.push(i);
            }
        }
        Ok(replicas)
    }

    /// The master node `i` replicates, as node `i` reports it (`ROLE`): `None` for a master.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if node `i` does not answer, [`Error::Protocol`] if the reply does not make
    /// sense or names a master that is not ours.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn master_of(&self, i: usize) -> Result<Option<usize>> {
        match role_of(&self.nodes[i])? {
            Role::Master => Ok(None),
            Role::Replica { master_port, .. } => {
                self.node_index(master_port).map(Some).ok_or_else(|| {
                    Error::Protocol(format!(
                        "node {i} replicates port {master_port}, which is none of ours"
                    ))
                })
            }
        }
    }

    /// Waits until the cluster is healthy: every running node (a stopped one is skipped, a
    /// paused one is not) reports, in `CLUSTER INFO`, `cluster_state:ok`, all nodes known
    /// (`cluster_known_nodes`, replicas included), all 16384 slots assigned and ok and as many
    /// masters serving them as the cluster was created with; they all agree on who serves which
    /// slots (`CLUSTER SLOTS`); every slot is served by a running node; and every running node
    /// is either one of those masters or an in-sync replica of one (`ROLE`).
    ///
    /// So this times out while a master is stopped and no replica has replaced it, or while a
    /// restarted old master has not yet learnt that its replica took over.
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] listing what was still wrong at the deadline, with log tails.
    pub fn wait_ok(&self, timeout: Duration) -> Result<()> {
        self.wait_until(timeout, None, false).map(|_| ())
    }

    /// Waits until a replica of `old_master` (as the cluster last was when healthy) has been
    /// promoted: it reports `role:master`, every running node but `old_master` agrees that it
    /// serves every slot `old_master` served, and the cluster is healthy otherwise (as in
    /// [`wait_ok`](Self::wait_ok), `old_master` left out: it may be stopped or paused).
    /// Returns the new master's index.
    ///
    /// Call it after [`stop_node`](Self::stop_node) or [`pause_node`](Self::pause_node) of a
    /// master; with the 2 s node timeout, a promotion usually takes 3-6 s.
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] (with every log tail) if `old_master` served no slots or had no
    /// replica when the cluster was last healthy, if its slots were taken over by a node that
    /// was not its replica, or if no promotion happened within `timeout`.
    ///
    /// # Panics
    ///
    /// If `old_master` is out of range.
    pub fn wait_for_failover(&self, old_master: usize, timeout: Duration) -> Result<usize> {
        let before = self.last_healthy();
        let old_slots: Vec<(i64, i64)> = before
            .slots
            .iter()
            .filter(|&&(_, _, owner)| owner == old_master)
            .map(|&(first, last, _)| (first, last))
            .collect();
        let replicas: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| before.master_of[i] == Some(old_master))
            .collect();
        if old_slots.is_empty() || replicas.is_empty() {
            return Err(self.not_ready(format!(
                "no failover of node {old_master} to wait for: when the cluster was last healthy \
                 it served slots {old_slots:?} and had replicas {replicas:?}"
            )));
        }
        let topology = self.wait_until(timeout, Some(old_master), false)?;
        let owners: Vec<usize> = old_slots
            .iter()
            .map(|&(first, _)| {
                topology
                    .slots
                    .iter()
                    .find(|&&(f, l, _)| (f..=l).contains(&first))
                    .map_or(usize::MAX, |&(_, _, owner)| owner)
            })
            .collect();
        match owners.as_slice() {
            [new, rest @ ..] if rest.iter().all(|o| o == new) && replicas.contains(new) => Ok(*new),
            _ => Err(self.not_ready(format!(
                "the slots {old_slots:?} of node {old_master} are served by nodes {owners:?} \
                 (usize::MAX: nobody), not by one of its replicas {replicas:?}"
            ))),
        }
    }

    /// The topology last seen healthy (set by `start`, so always there).
    fn last_healthy(&self) -> Topology {
        self.healthy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .expect("a started cluster has been healthy once")
    }

    /// Polls [`health`](Self::health) until it is fine (then remembers the topology) or the
    /// deadline passes.
    fn wait_until(&self, timeout: Duration, skip: Option<usize>, formed: bool) -> Result<Topology> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.health(skip, formed) {
                Ok(topology) => {
                    *self
                        .healthy
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(topology.clone());
                    return Ok(topology);
                }
                Err(problems) if Instant::now() >= deadline => {
                    let left_out = skip.map_or(String::new(), |i| format!(" (node {i} left out)"));
                    return Err(self.not_ready(format!(
                        "cluster not ok after {timeout:?}{left_out}:\n{}",
                        problems.join("\n")
                    )));
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// The cluster's topology if it is healthy (see [`wait_ok`](Self::wait_ok)), node `skip`
    /// left out; with `formed`, every master must also have all its replicas. Otherwise what
    /// is wrong.
    fn health(
        &self,
        skip: Option<usize>,
        formed: bool,
    ) -> std::result::Result<Topology, Vec<String>> {
        let mut problems = Vec::new();
        let mut agreed: Option<(usize, SlotMap)> = None;
        let mut roles: Vec<Option<Role>> = vec![None; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            if Some(i) == skip || !node.is_started() {
                continue;
            }
            let name = format!("node {i} (port {})", node.port());
            if let Some(why) = self.info_problem(node) {
                problems.push(format!("{name}: {why}"));
                continue;
            }
            match self.slot_owners(node) {
                Ok(map) => match &agreed {
                    None => agreed = Some((i, map)),
                    Some((j, theirs)) if *theirs != map => problems.push(format!(
                        "{name} says slots are served by {}, node {j} by {}",
                        describe(&map),
                        describe(theirs)
                    )),
                    Some(_) => {}
                },
                Err(e) => problems.push(format!("{name}: {e}")),
            }
            match role_of(node) {
                Ok(role) => roles[i] = Some(role),
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        let Some((_, slots)) = agreed else {
            problems.push("no running node reports the slots".to_owned());
            return Err(problems);
        };
        let mut owners: Vec<usize> = slots.iter().map(|&(_, _, owner)| owner).collect();
        owners.sort_unstable();
        owners.dedup();
        if owners.len() != self.masters {
            problems.push(format!(
                "{} nodes serve slots ({owners:?}), want {}",
                owners.len(),
                self.masters
            ));
        }
        for &owner in &owners {
            if Some(owner) == skip || !self.nodes[owner].is_started() {
                problems.push(format!(
                    "node {owner} serves slots but is stopped (or being failed over): {}",
                    describe(&slots)
                ));
            }
        }
        let mut master_of = vec![None; self.nodes.len()];
        for (i, role) in roles.iter().enumerate() {
            match role {
                None => {}
                Some(Role::Master) if !owners.contains(&i) => {
                    problems.push(format!("node {i} says it is a master but serves no slots"));
                }
                Some(Role::Master) => {}
                Some(Role::Replica { master_port, state }) => {
                    match self.node_index(*master_port) {
                        Some(m) if owners.contains(&m) => master_of[i] = Some(m),
                        _ => problems.push(format!(
                            "node {i} replicates port {master_port}, which serves no slots"
                        )),
                    }
                    if state != "connected" {
                        problems.push(format!("node {i}: replication link {state}, not connected"));
                    } else if let Some(m) = master_of[i] {
                        // The replica says `connected` as soon as it has loaded the snapshot; the
                        // master streams the writes since then (and counts it for `WAIT`) only
                        // once it has the replica's first ack: `state=online` on its side.
                        let port = self.nodes[i].port();
                        match replica_state_on_master(&self.nodes[m], port) {
                            Ok(Some(online)) if online == "online" => {}
                            Ok(other) => problems.push(format!(
                                "node {i}: its master, node {m}, reports it as {other:?}, not online"
                            )),
                            Err(e) => problems.push(format!("node {m}: {e}")),
                        }
                    }
                }
            }
        }
        if formed {
            for &owner in &owners {
                let replicas = master_of.iter().filter(|&&m| m == Some(owner)).count();
                if replicas != self.replicas_per_master {
                    problems.push(format!(
                        "node {owner} has {replicas} replicas, want {}",
                        self.replicas_per_master
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(Topology { slots, master_of })
        } else {
            Err(problems)
        }
    }

    /// What is wrong with `node`'s `CLUSTER INFO`, if anything.
    fn info_problem(&self, node: &RedisServer) -> Option<String> {
        let reply = match node.cmd_timeout(&["CLUSTER", "INFO"], PROBE_TIMEOUT) {
            Ok(reply) => reply,
            Err(e) => return Some(e.to_string()),
        };
        let Some(text) = reply.as_str() else {
            return Some(format!("unexpected CLUSTER INFO reply {reply:?}"));
        };
        let known = self.nodes.len().to_string();
        let size = self.masters.to_string();
        let expected = [
            ("cluster_state", "ok"),
            ("cluster_known_nodes", known.as_str()),
            ("cluster_slots_assigned", SLOTS),
            ("cluster_slots_ok", SLOTS),
            ("cluster_size", size.as_str()),
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

    fn not_ready(&self, what: String) -> Error {
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
        Error::NotReady { what, log }
    }

    /// The index of the node that serves the hash slot of `key` now (per `CLUSTER KEYSLOT` and
    /// `CLUSTER SLOTS`, asked of the first running node that answers): after a failover, once
    /// the nodes know (see [`wait_for_failover`](Self::wait_for_failover)), the promoted
    /// replica.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if no node answers, [`Error::Protocol`] if the replies do not make
    /// sense or no node owns the slot.
    pub fn node_for_key(&self, key: &str) -> Result<usize> {
        self.first_answer(|node| {
            let reply = node.cmd_timeout(&["CLUSTER", "KEYSLOT", key], PROBE_TIMEOUT)?;
            let slot = reply
                .as_int()
                .ok_or_else(|| Error::Protocol(format!("CLUSTER KEYSLOT: {reply:?}")))?;
            self.slot_owners(node)?
                .iter()
                .find(|&&(first, last, _)| (first..=last).contains(&slot))
                .map(|&(_, _, owner)| owner)
                .ok_or_else(|| Error::Protocol(format!("no node owns slot {slot} of {key:?}")))
        })
    }

    /// `f` of the first running node for which it succeeds; the last error if none does.
    fn first_answer<T>(&self, f: impl Fn(&RedisServer) -> Result<T>) -> Result<T> {
        let mut last_err = None;
        for node in self.nodes.iter().filter(|n| n.is_started()) {
            match f(node) {
                Ok(value) => return Ok(value),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Protocol("no node of the cluster is running".into())))
    }

    /// `node`'s `CLUSTER SLOTS`: ranges `(first, last, index of the serving node)`, sorted.
    fn slot_owners(&self, node: &RedisServer) -> Result<SlotMap> {
        let bad = |what: &str, reply: &Reply| Error::Protocol(format!("{what}: {reply:?}"));
        let reply = node.cmd_timeout(&["CLUSTER", "SLOTS"], PROBE_TIMEOUT)?;
        let ranges = reply
            .as_array()
            .ok_or_else(|| bad("CLUSTER SLOTS", &reply))?;
        let mut map = Vec::with_capacity(ranges.len());
        for range in ranges {
            // [start, end, [ip, port, id, ...], replicas...]
            let fields = range
                .as_array()
                .ok_or_else(|| bad("CLUSTER SLOTS entry", range))?;
            let (Some(first), Some(last), Some(port)) = (
                fields.first().and_then(Reply::as_int),
                fields.get(1).and_then(Reply::as_int),
                fields
                    .get(2)
                    .and_then(Reply::as_array)
                    .and_then(|m| m.get(1))
                    .and_then(Reply::as_int)
                    .and_then(|p| u16::try_from(p).ok()),
            ) else {
                return Err(bad("CLUSTER SLOTS entry", range));
            };
            let owner = self.node_index(port).ok_or_else(|| {
                Error::Protocol(format!(
                    "slots {first}-{last} served by port {port}, which is none of ours"
                ))
            })?;
            map.push((first, last, owner));
        }
        map.sort_unstable();
        Ok(map)
    }
}

/// Slot ranges as `0-5460:node 2, ...`.
fn describe(slots: &[(i64, i64, usize)]) -> String {
    slots
        .iter()
        .map(|(first, last, owner)| format!("{first}-{last}:node {owner}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `state` (`wait_bgsave`, `send_bulk`, `online`) `master`'s `INFO replication` gives the
/// replica on `port`, if it lists it.
fn replica_state_on_master(master: &RedisServer, port: u16) -> Result<Option<String>> {
    let reply = master.cmd_timeout(&["INFO", "replication"], PROBE_TIMEOUT)?;
    let text = reply
        .as_str()
        .ok_or_else(|| Error::Protocol(format!("unexpected INFO replication reply {reply:?}")))?;
    // slave0:ip=127.0.0.1,port=6380,state=online,offset=42,lag=0
    let port = port.to_string();
    Ok(text
        .lines()
        .filter(|line| line.starts_with("slave"))
        .filter_map(|line| line.split_once(':'))
        .map(|(_, fields)| {
            fields
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .collect::<Vec<_>>()
        })
        .find(|fields| fields.contains(&("port", port.as_str())))
        .and_then(|fields| {
            fields
                .iter()
                .find(|(k, _)| *k == "state")
                .map(|(_, v)| (*v).to_owned())
        }))
}

/// `node`'s role per `ROLE`: `["master", offset, replicas]` or
/// `["slave", ip, port, state, offset]`.
fn role_of(node: &RedisServer) -> Result<Role> {
    let reply = node.cmd_timeout(&["ROLE"], PROBE_TIMEOUT)?;
    let bad = || {
        Error::Protocol(format!(
            "unexpected ROLE reply from port {}: {reply:?}",
            node.port()
        ))
    };
    let fields = reply.as_array().ok_or_else(bad)?;
    match fields.first().and_then(Reply::as_str) {
        Some("master") => Ok(Role::Master),
        Some("slave") => {
            let master_port = fields
                .get(2)
                .and_then(Reply::as_int)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(bad)?;
            let state = fields.get(3).and_then(Reply::as_str).ok_or_else(bad)?;
            Ok(Role::Replica {
                master_port,
                state: state.to_owned(),
            })
        }
        _ => Err(bad()),
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

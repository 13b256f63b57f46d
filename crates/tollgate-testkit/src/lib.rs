//! Real `redis-server` processes for tollgate's tests.
//!
//! Tests of Redis-backed stores should run against the real thing, not a mock. This crate
//! starts `redis-server` child processes on `127.0.0.1`, each on a free port with its own
//! temporary directory, so tests can run in parallel (threads or processes, as under
//! `cargo nextest`) without sharing ports or files:
//!
//! - [`RedisServer`]: a standalone node, which can be stopped and restarted on the same
//!   port to simulate outages.
//! - [`RedisCluster`]: N masters (3 by default), optionally each with replicas, joined into a
//!   Redis Cluster with `redis-cli --cluster create`; single nodes can be stopped, paused and
//!   restarted, and [`RedisCluster::wait_for_failover`] waits for a replica to replace a
//!   killed master.
//! - [`RedisSentinel`]: a master, its replica and three sentinels (quorum 2), with helpers to
//!   force a failover and wait for the new master.
//! - [`Blackhole`]: a port whose packets are dropped (two `iptables` rules), a network
//!   partition rather than a refused connection.
//!
//! Nothing is persisted (no RDB, no AOF): a restarted server is empty. Processes are
//! killed and reaped when the values are dropped. If that happens during a panic, the tail
//! of each server's log and its (kept) directory are printed to stderr. A process that dies
//! without dropping them (a test harness's timeout, `kill -9`) leaves no server behind either:
//! a small `sh` watchdog per server, on a pipe from the owner, kills it when the pipe closes.
//!
//! [`RedisServer::cmd`] sends one command over a plain TCP connection and parses the RESP2
//! reply, enough for setting up and checking state without a Redis client crate.
//!
//! # Installing Redis
//!
//! `redis-server` and `redis-cli` (Redis 7) must be on `PATH`. On Debian/Ubuntu:
//!
//! ```text
//! apt-get install redis-server
//! ```
//!
//! (`scripts/test` installs it.) If either program is missing, starting fails with
//! [`Error::NotInstalled`], whose message says how to install it.
//!
//! # Example
//!
//! ```
//! use tollgate_testkit::{RedisServer, Reply};
//!
//! let mut server = RedisServer::start()?;
//! assert_eq!(server.cmd(&["SET", "greeting", "hello"])?, Reply::Status("OK".into()));
//! assert_eq!(server.cmd(&["GET", "greeting"])?.as_str(), Some("hello"));
//!
//! // Simulate an outage: the port refuses connections until the restart.
//! server.stop();
//! assert!(server.cmd(&["PING"]).is_err());
//! server.restart()?;
//! assert_eq!(server.cmd(&["GET", "greeting"])?, Reply::Bulk(None));
//! # Ok::<(), tollgate_testkit::Error>(())
//! ```
//!
//! A cluster (takes a second or two to form):
//!
//! ```no_run
//! use tollgate_testkit::RedisCluster;
//!
//! let mut cluster = RedisCluster::start()?;
//! let urls = cluster.urls(); // hand these to the client under test
//! # let _ = urls;
//! cluster.stop_node(1);
//! cluster.restart_node(1)?; // waits for cluster_state:ok on every node
//! # Ok::<(), tollgate_testkit::Error>(())
//! ```

mod cluster;
mod error;
mod net;
mod resp;
mod sentinel;
mod server;

pub use cluster::RedisCluster;
pub use error::{Error, Result};
pub use net::Blackhole;
pub use resp::Reply;
pub use sentinel::{MASTER_NAME, RedisSentinel};
pub use server::RedisServer;

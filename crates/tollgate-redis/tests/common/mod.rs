//! Shared helpers: real servers from tollgate-testkit and stores on them.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use tollgate_redis::{RedisStore, RedisStoreBuilder, Scripting};
use tollgate_testkit::{RedisCluster, RedisSentinel, RedisServer, Reply};

/// A generous timeout for tests about decisions, so a loaded CI machine does not turn a slow
/// answer into a failure; the fault tests set their own.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(2);

pub fn server() -> RedisServer {
    match RedisServer::start() {
        Ok(s) => s,
        Err(e) => panic!("cannot start redis-server: {e}"),
    }
}

pub fn cluster() -> RedisCluster {
    match RedisCluster::start() {
        Ok(c) => c,
        Err(e) => panic!("cannot start a redis cluster: {e}"),
    }
}

/// Three masters, each with one replica (6 nodes), for failover tests.
pub fn cluster_with_replicas() -> RedisCluster {
    match RedisCluster::start_with_replicas(3, 1) {
        Ok(c) => c,
        Err(e) => panic!("cannot start a redis cluster with replicas: {e}"),
    }
}

pub fn sentinel() -> RedisSentinel {
    match RedisSentinel::start() {
        Ok(s) => s,
        Err(e) => panic!("cannot start a redis sentinel group: {e}"),
    }
}

pub fn sentinel_builder(group: &RedisSentinel) -> RedisStoreBuilder {
    RedisStore::sentinel_builder(group.master_name(), group.sentinel_urls())
        .timeout(TEST_TIMEOUT)
        .connect_timeout(TEST_TIMEOUT)
}

pub fn standalone_builder(server: &RedisServer) -> RedisStoreBuilder {
    RedisStore::builder(server.url())
        .timeout(TEST_TIMEOUT)
        .connect_timeout(TEST_TIMEOUT)
}

pub fn cluster_builder(cluster: &RedisCluster) -> RedisStoreBuilder {
    RedisStore::cluster_builder(cluster.urls())
        .timeout(TEST_TIMEOUT)
        .connect_timeout(TEST_TIMEOUT)
}

pub async fn connect(builder: RedisStoreBuilder) -> RedisStore {
    match builder.connect().await {
        Ok(s) => s,
        Err(e) => panic!("cannot connect: {e}"),
    }
}

/// Both ways the store runs its Lua code, each forced (no silent fallback), with a label: the
/// suites that must answer the same on both run once per path.
pub const PATHS: [(Scripting, &str); 2] = [
    (Scripting::Functions, "fcall"),
    (Scripting::Eval, "evalsha"),
];

/// How many times `nodes` ran `command` (`fcall`, `evalsha`), from `INFO commandstats`.
pub fn calls(nodes: &[RedisServer], command: &str) -> u64 {
    let field = format!("cmdstat_{command}:calls=");
    nodes
        .iter()
        .map(|node| {
            let info = node
                .cmd(&["INFO", "commandstats"])
                .expect("INFO commandstats");
            let text = info.as_str().expect("INFO is a string").to_owned();
            text.lines()
                .find_map(|l| l.strip_prefix(field.as_str()))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |n| n.parse::<u64>().expect("a call count"))
        })
        .sum()
}

/// Runs `run` with `scripting`, and checks from the servers' own counts that its calls went
/// that way: `FCALL` only, or `EVALSHA` only.
pub async fn on_path<F: Future<Output = ()>>(
    nodes: &[RedisServer],
    scripting: Scripting,
    run: impl FnOnce() -> F,
) {
    let before = (calls(nodes, "fcall"), calls(nodes, "evalsha"));
    run().await;
    let after = (calls(nodes, "fcall"), calls(nodes, "evalsha"));
    let (fcalls, evalshas) = (after.0 - before.0, after.1 - before.1);
    match scripting {
        Scripting::Functions => assert!(
            fcalls > 0 && evalshas == 0,
            "functions path: {fcalls} FCALL, {evalshas} EVALSHA"
        ),
        _ => assert!(
            evalshas > 0 && fcalls == 0,
            "eval path: {fcalls} FCALL, {evalshas} EVALSHA"
        ),
    }
}

/// Whether `node` holds this version's function library (`FUNCTION LIST LIBRARYNAME`).
pub fn has_library(node: &RedisServer) -> bool {
    let name = tollgate_redis::function_library_name();
    match node.cmd(&["FUNCTION", "LIST", "LIBRARYNAME", name]) {
        Ok(Reply::Array(Some(libraries))) => !libraries.is_empty(),
        other => panic!("FUNCTION LIST answered {other:?}"),
    }
}

//! Shared helpers: real servers from tollgate-testkit and stores on them.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use tollgate_redis::{RedisStore, RedisStoreBuilder};
use tollgate_testkit::{RedisCluster, RedisSentinel, RedisServer};

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

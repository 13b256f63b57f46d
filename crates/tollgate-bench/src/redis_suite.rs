//! `redis`: decisions per second from one process on a `redis-server` the runner starts.
//!
//! * tollgate: `RedisStore::decide`, by `FCALL` of tollgate's function library (the store's
//!   default on Redis 7), from N tokio tasks sharing the store's one multiplexed connection, on
//!   one runtime thread, with the store's defaults: batching on (the decisions queued behind a
//!   call in flight go out as one call). The `batching on vs off` rows set the same load against
//!   a store with batching off (one call per decision), at every task count, so what batching
//!   costs a lone caller shows beside what it gains under load.
//! * ceiling: `redis-benchmark` (one thread, `-c N -P 1`) sending the very same `EVALSHA` with the
//!   same keys and arguments: what the server can do with this script, client cost aside.
//! * naive: the multi-round-trip approach of the seed guide (004): per limit, `GET` the bucket,
//!   compute the refill in the client, `SET` it back (no atomicity). A 3-limit decision is 6
//!   round trips. Measured twice: on one multiplexed connection shared by every task, like
//!   tollgate (its strongest form: concurrent tasks' commands are pipelined), and with a
//!   connection per task, as the seed's `redis.asyncio` client runs it (each in-flight command
//!   holds a connection of the pool, so every command is a round trip of its own).
//!
//! Every task decides on the same keys (a hot key, as the service-wide limit is for every
//! request): a batch's decisions then share all their keys, which the batch reads and writes
//! once each. The `a tier key per task` rows give each task a tier key of its own (the route and
//! global keys still shared), as many callers have, against the naive peer on the same keys.
//!
//! Besides decisions per second and latencies: the client's CPU time per decision, tollgate's
//! against the naive peer's (on the shared connection); and Redis' own CPU time per decision
//! (`INFO commandstats`: the usec of `FCALL` / `EVALSHA` over their calls), tollgate's script
//! against a textbook GCRA script of our own ([`TEXTBOOK`]) driven the same way over the same
//! keys: the command time over the decisions made, with the store's defaults (batching on) at 16
//! tasks, and beside it at 1 task (every call a batch of one) and 128, and with batching off (one
//! call per decision) at 16, each against the textbook script at the same task count. One runtime thread drives every client task and the connections' own
//! tasks, so its CPU time over a run is the client side's.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use tollgate_core::{Limit, Quota, Store};
use tollgate_redis::RedisStore;
use tollgate_testkit::{RedisServer, Reply};

use crate::BoxError;
use crate::load::{Load, drive, median_load, run_time};
use crate::report::{Row, median, throughput_ratio, time_ratio};

/// Concurrent tasks (and `redis-benchmark` connections).
const TASKS: [usize; 3] = [1, 16, 128];
/// The limits of a decision: tier, route and global, sharing one hash tag (one cluster slot).
const KEYS: [&str; 3] = ["{bench}:tier", "{bench}:route", "{bench}:global"];

/// The peer of the Redis CPU rows: the textbook GCRA script, written for this benchmark. Per key
/// a `GET` of the theoretical arrival time, the arithmetic, and a `SET ... PX` of each only when
/// all allow. `ARGV`: per key, the emission interval (µs) and the burst.
const TEXTBOOK: &str = r"local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tats, all = {}, true
for i = 1, #KEYS do
  local interval, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then
    tat = now
  end
  tats[i] = tat + interval
  if tats[i] - now > interval * burst then
    all = false
  end
end
if all then
  for i = 1, #KEYS do
    local ttl = math.ceil((tats[i] - now) / 1000)
    redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', ttl)
  end
end
return all and 1 or 0
";

/// The generous quota every limit gets: a million per second, a million at once.
fn quota() -> Result<Quota, BoxError> {
    Ok(Quota::per_second(1_000_000)?.with_burst(1_000_000)?)
}

/// Whose keys a load's decisions use: the same [`KEYS`] for every task (a hot tier key: every
/// decision of a batch shares all its keys), or a tier key of each task's own with the route
/// and global keys shared (many callers, as the default inbound policy has them).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keys {
    Shared,
    TierPerTask,
}

/// The keys of task `task`'s decisions over `n` limits.
fn task_keys(keys: Keys, n: usize, task: usize) -> Vec<String> {
    KEYS[..n]
        .iter()
        .enumerate()
        .map(|(i, k)| match keys {
            Keys::TierPerTask if i == 0 => format!("{k}:{task}"),
            _ => (*k).to_owned(),
        })
        .collect()
}

/// tollgate's own store.
async fn tollgate_load(
    store: &RedisStore,
    n: usize,
    tasks: usize,
    duration: Duration,
) -> Result<Load, BoxError> {
    tollgate_load_on(store, n, tasks, duration, Keys::Shared).await
}

/// tollgate's own store, on `keys`.
async fn tollgate_load_on(
    store: &RedisStore,
    n: usize,
    tasks: usize,
    duration: Duration,
    keys: Keys,
) -> Result<Load, BoxError> {
    let quota = quota()?;
    let next = std::sync::atomic::AtomicUsize::new(0);
    drive(tasks, duration, || {
        let store = store.clone();
        let task = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let names = Arc::new(task_keys(keys, n, task));
        move || {
            let (store, names) = (store.clone(), Arc::clone(&names));
            async move {
                let limits: Vec<Limit<'_>> =
                    names.iter().map(|k| Limit::new(k, &quota, 1)).collect();
                Ok(store.decide(&limits).await?.is_allowed())
            }
        }
    })
    .await
}

/// Seed 004's token bucket: per limit a `GET`, the refill computed here, a `SET` back; the first
/// limit that denies ends the check (earlier limits stay charged).
async fn naive_decide(
    mut conn: MultiplexedConnection,
    keys: Arc<Vec<String>>,
) -> Result<bool, BoxError> {
    const RATE: f64 = 1_000_000.0;
    const BURST: f64 = 1_000_000.0;
    for key in keys.iter() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let state: Option<String> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
        let (tokens, last) = state
            .as_deref()
            .and_then(|s| s.split_once(':'))
            .and_then(|(t, l)| Some((t.parse::<f64>().ok()?, l.parse::<f64>().ok()?)))
            .unwrap_or((BURST, now));
        let tokens = (tokens + (now - last).max(0.0) * RATE).min(BURST);
        if tokens < 1.0 {
            return Ok(false);
        }
        let () = redis::cmd("SET")
            .arg(key)
            .arg(format!("{}:{now}", tokens - 1.0))
            .arg("PX")
            .arg(2000)
            .query_async(&mut conn)
            .await?;
    }
    Ok(true)
}

/// The naive peer with `tasks` tasks over `conns`: one connection shared by all, or one each.
async fn naive_load(
    conns: &[MultiplexedConnection],
    n: usize,
    tasks: usize,
    duration: Duration,
) -> Result<Load, BoxError> {
    naive_load_on(conns, n, tasks, duration, Keys::Shared).await
}

/// The naive peer on `keys`.
async fn naive_load_on(
    conns: &[MultiplexedConnection],
    n: usize,
    tasks: usize,
    duration: Duration,
    keys: Keys,
) -> Result<Load, BoxError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    drive(tasks, duration, || {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn = conns[i % conns.len()].clone();
        let names: Arc<Vec<String>> = Arc::new(
            task_keys(keys, n, i)
                .into_iter()
                .map(|k| format!("naive:{k}"))
                .collect(),
        );
        move || naive_decide(conn.clone(), Arc::clone(&names))
    })
    .await
}

/// `count` connections of their own, for the pooled form of the naive peer.
async fn connections(url: &str, count: usize) -> Result<Vec<MultiplexedConnection>, BoxError> {
    let client = redis::Client::open(url)?;
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        conns.push(client.get_multiplexed_async_connection().await?);
    }
    Ok(conns)
}

/// The CPU time this thread has run so far (`/proc/thread-self/schedstat`, Linux). The runtime
/// that drives the clients (their tasks and their connections' tasks) runs on this thread alone,
/// so over a load run the difference is the client side's CPU time.
fn thread_cpu() -> Option<Duration> {
    run_time(std::path::Path::new("/proc/thread-self/schedstat"))
}

/// A load run, and the client CPU time it took per call (when the OS tells).
fn with_cpu(
    runtime: &tokio::runtime::Runtime,
    load: impl std::future::Future<Output = Result<Load, BoxError>>,
) -> Result<(Load, Option<f64>), BoxError> {
    let (cpu0, started) = (thread_cpu(), std::time::Instant::now());
    let run = runtime.block_on(load)?;
    let calls = run.per_sec * started.elapsed().as_secs_f64();
    let per_call = match (cpu0, thread_cpu()) {
        (Some(before), Some(after)) if calls >= 1.0 => Some((after - before).as_secs_f64() / calls),
        _ => None,
    };
    Ok((run, per_call))
}

/// The median of the per-call CPU times, when every run has one.
fn median_cpu(runs: &[Option<f64>]) -> Option<f64> {
    let mut values: Vec<f64> = runs.iter().copied().collect::<Option<_>>()?;
    (!values.is_empty()).then(|| median(&mut values))
}

/// The `EVALSHA` arguments tollgate's store sends for a decision over the first `n` limits.
fn evalsha_args(store: &RedisStore, sha: &str, n: usize) -> Result<Vec<String>, BoxError> {
    let quota = quota()?;
    let mut args = vec!["EVALSHA".to_owned(), sha.to_owned(), n.to_string()];
    args.extend(KEYS[..n].iter().map(|k| store.redis_key(k)));
    // The fast path's compact layout, as the store sends a decision over token buckets: 'd',
    // now ('' = the server's TIME), deadline (0 = none: a benchmark's repeated command cannot
    // carry one), then limit, interval µs and cost per key.
    args.extend(["d", "", "0"].map(str::to_owned));
    for _ in 0..n {
        args.extend([
            quota.limit().to_string(),
            quota.interval_micros().to_string(),
            "1".to_owned(),
        ]);
    }
    Ok(args)
}

/// Parses the `--csv` output of `redis-benchmark`: the result line's rps, p50 and p99 (ms).
fn parse_csv(output: &str) -> Option<Load> {
    let line = output
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with("\"test\""))?;
    let fields: Vec<f64> = line
        .rsplit(',')
        .take(7)
        .map(|f| f.trim().trim_matches('"').parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()?;
    // Reversed: max, p99, p95, p50, min, avg, rps.
    let [_max, p99, _p95, p50, _min, _avg, rps] = fields.as_slice() else {
        return None;
    };
    Some(Load {
        per_sec: *rps,
        p50: Duration::from_secs_f64(p50 / 1000.0),
        p99: Duration::from_secs_f64(p99 / 1000.0),
        calls: 0,
    })
}

/// Runs `redis-benchmark` with `clients` connections, no pipelining, `requests` requests.
fn redis_benchmark(
    port: u16,
    clients: usize,
    requests: u64,
    command: &[String],
) -> Result<Load, BoxError> {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-P", "1"])
        .args(["-n", &requests.to_string(), "--csv"])
        .args(command)
        .output()
        .map_err(|e| {
            format!(
                "cannot run redis-benchmark ({e}): install it with `apt-get install redis-tools`"
            )
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "redis-benchmark failed: {}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    parse_csv(&stdout).ok_or_else(|| format!("unexpected redis-benchmark output: {stdout}").into())
}

/// Checks that the script answers the benchmark's `EVALSHA` with an allowed decision, so the
/// ceiling measures real decisions and not error replies.
fn check_evalsha(server: &RedisServer, command: &[String], n: usize) -> Result<(), BoxError> {
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    // The reply is one string of little-endian 64-bit integers. A decision over token buckets
    // takes the fast path: status 5, now, 1 when every limit allowed (the call wrote), then each
    // bucket's state as read (the client works the decisions out from them).
    let values: Vec<i64> = match server.cmd(&args)? {
        Reply::Bulk(Some(bytes)) if bytes.len() % 8 == 0 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .collect(),
        other => return Err(format!("EVALSHA answered {other:?}").into()),
    };
    let allowed = values.len() == 3 + n && values[0] == 5 && values[2] == 1;
    if allowed {
        Ok(())
    } else {
        Err(format!("EVALSHA did not allow: {values:?}").into())
    }
}

/// The textbook script over the same keys as tollgate's decision over `n` limits, from `tasks`
/// tasks sharing one multiplexed connection, as the store shares its own.
async fn textbook_load(
    store: &RedisStore,
    conn: &MultiplexedConnection,
    n: usize,
    tasks: usize,
    duration: Duration,
) -> Result<Load, BoxError> {
    let quota = quota()?;
    let script = Arc::new(redis::Script::new(TEXTBOOK));
    let keys: Arc<Vec<String>> = Arc::new(KEYS[..n].iter().map(|k| store.redis_key(k)).collect());
    drive(tasks, duration, || {
        let (conn, script, keys) = (conn.clone(), Arc::clone(&script), Arc::clone(&keys));
        move || {
            let (mut conn, script, keys) = (conn.clone(), Arc::clone(&script), Arc::clone(&keys));
            async move {
                let mut call = script.prepare_invoke();
                call.key(keys.as_slice());
                for _ in 0..keys.len() {
                    call.arg(quota.interval_micros()).arg(quota.limit());
                }
                let allowed: i64 = call.invoke_async(&mut conn).await?;
                Ok(allowed == 1)
            }
        }
    })
    .await
}

/// Redis' script calls and their command time since the last `CONFIG RESETSTAT`: the calls and
/// usec of `FCALL` and `EVALSHA` (`INFO commandstats`).
fn redis_script_stats(server: &RedisServer) -> Result<(u64, u64), BoxError> {
    let info = server.cmd(&["INFO", "commandstats"])?;
    let text = info.as_str().ok_or("INFO commandstats is not a string")?;
    let (mut calls, mut usec) = (0u64, 0u64);
    for line in text.lines() {
        let Some(fields) = ["cmdstat_fcall:", "cmdstat_evalsha:"]
            .iter()
            .find_map(|p| line.strip_prefix(p))
        else {
            continue;
        };
        for field in fields.trim().split(',') {
            match field.split_once('=') {
                Some(("calls", v)) => calls += v.parse::<u64>()?,
                Some(("usec", v)) => usec += v.parse::<u64>()?,
                _ => {}
            }
        }
    }
    if calls == 0 {
        return Err("no FCALL or EVALSHA ran".into());
    }
    Ok((calls, usec))
}

/// Redis' command time per script call since the last `CONFIG RESETSTAT`, in seconds.
fn redis_cpu_per_call(server: &RedisServer) -> Result<f64, BoxError> {
    let (calls, usec) = redis_script_stats(server)?;
    Ok(usec as f64 / calls as f64 / 1e6)
}

/// The Redis CPU rows: per decision, the script calls' command time (`INFO commandstats`) over
/// the decisions made, against the textbook script driven the same way (same keys, same
/// connection, same task count), rounds interleaved, the median of each. The rows the design
/// names measure the store as it ships (batching on) at 16 tasks; beside them the same store at
/// 1 task (every call a batch of one) and 128, and a store with batching off (one call per
/// decision, so per call is per decision) at 16.
fn redis_cpu_rows(
    runtime: &tokio::runtime::Runtime,
    server: &RedisServer,
    unbatched: &RedisStore,
    batched: &RedisStore,
    conn: &MultiplexedConnection,
    rounds: usize,
    duration: Duration,
) -> Result<Vec<Row>, BoxError> {
    /// The task counts of the batching-on rows; the design's rows are at 16.
    const TASKS: [usize; 3] = [1, 16, 128];
    const AT_16: usize = 1;
    let us = |v: f64| format!("{:.2} µs", v * 1e6);
    let mut rows = Vec::new();
    let mut more = Vec::new();
    for n in [1, 3] {
        let mut off = Vec::new();
        let mut on = vec![Vec::new(); TASKS.len()];
        let mut textbook = vec![Vec::new(); TASKS.len()];
        for _ in 0..rounds {
            server.cmd(&["CONFIG", "RESETSTAT"])?;
            runtime.block_on(tollgate_load(unbatched, n, 16, duration))?;
            off.push(redis_cpu_per_call(server)?);
            // An idle server between calls costs each call more than a busy one: the textbook
            // script at each task count.
            for (i, tasks) in TASKS.iter().enumerate() {
                server.cmd(&["CONFIG", "RESETSTAT"])?;
                let load = runtime.block_on(tollgate_load(batched, n, *tasks, duration))?;
                let (_, usec) = redis_script_stats(server)?;
                on[i].push(usec as f64 / load.calls.max(1) as f64 / 1e6);
                server.cmd(&["CONFIG", "RESETSTAT"])?;
                runtime.block_on(textbook_load(unbatched, conn, n, *tasks, duration))?;
                textbook[i].push(redis_cpu_per_call(server)?);
            }
        }
        let label = format!(
            "redis: Redis CPU per decision, {n} limit{}",
            if n == 1 { "" } else { "s" }
        );
        let off = median(&mut off);
        let on: Vec<f64> = on.iter_mut().map(|runs| median(runs)).collect();
        let textbook: Vec<f64> = textbook.iter_mut().map(|runs| median(runs)).collect();
        eprintln!(
            "  {label}: tollgate {} (batching off {}), textbook {}",
            us(on[AT_16]),
            us(off),
            us(textbook[AT_16])
        );
        rows.push(Row {
            case: format!(
                "{label} (µs of command time over the decisions, the store's defaults: batching on, 16 tasks; ratio = textbook / tollgate)"
            ),
            tollgate: us(on[AT_16]),
            peer: "textbook GCRA script (one call per decision, 16 tasks)".to_owned(),
            peer_value: us(textbook[AT_16]),
            ratio: time_ratio(on[AT_16], textbook[AT_16]),
        });
        more.push(Row {
            case: format!(
                "{label}, batching off, 16 tasks (µs of command time; one call per decision; ratio = textbook / tollgate)"
            ),
            tollgate: us(off),
            peer: "textbook GCRA script (one call per decision, 16 tasks)".to_owned(),
            peer_value: us(textbook[AT_16]),
            ratio: time_ratio(off, textbook[AT_16]),
        });
        for (i, tasks) in TASKS.iter().enumerate() {
            if i == AT_16 {
                continue;
            }
            let tasks = format!("{tasks} task{}", if *tasks == 1 { "" } else { "s" });
            eprintln!(
                "  {label}, batching on, {tasks}: tollgate {}, textbook {}",
                us(on[i]),
                us(textbook[i])
            );
            more.push(Row {
                case: format!(
                    "{label}, batching on, {tasks} (µs of command time over the decisions; ratio = textbook / tollgate)"
                ),
                tollgate: us(on[i]),
                peer: format!("textbook GCRA script (one call per decision, {tasks})"),
                peer_value: us(textbook[i]),
                ratio: time_ratio(on[i], textbook[i]),
            });
        }
    }
    rows.extend(more);
    Ok(rows)
}

/// Runs the redis suite.
pub(crate) fn run(quick: bool) -> Result<Vec<Row>, BoxError> {
    let (rounds, duration) = if quick {
        (1, Duration::from_millis(700))
    } else {
        (3, Duration::from_secs(1))
    };
    let server = RedisServer::start()?;
    // One runtime thread, like redis-benchmark's one thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sha = match server.cmd(&["SCRIPT", "LOAD", tollgate_redis::script_source()])? {
        Reply::Bulk(Some(sha)) => String::from_utf8(sha)?,
        other => return Err(format!("SCRIPT LOAD answered {other:?}").into()),
    };
    let url = server.url();
    let (store, unbatched, naive) = runtime.block_on(async {
        let store = RedisStore::builder(url.as_str())
            .timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let unbatched = RedisStore::builder(url.as_str())
            .timeout(Duration::from_secs(2))
            .batching(false)
            .connect()
            .await?;
        let naive = connections(&url, 1).await?;
        Ok::<_, BoxError>((store, unbatched, naive))
    })?;
    // Warm up: connections, the script cache, the server's allocator.
    runtime.block_on(tollgate_load(&store, 3, 16, Duration::from_millis(200)))?;
    runtime.block_on(tollgate_load(&unbatched, 3, 16, Duration::from_millis(200)))?;
    // Batching on against off, after the rows against the peers.
    let mut batching_rows = Vec::new();
    let mut rows = Vec::new();
    // The client's CPU time per decision, after the throughput rows.
    let mut cpu_rows = Vec::new();
    for n in [1, 3] {
        let command = evalsha_args(&store, &sha, n)?;
        check_evalsha(&server, &command, n)?;
        for tasks in TASKS {
            // One connection per task for the pooled naive peer (with one task, the same as the
            // shared connection: not measured twice).
            let pool = if tasks > 1 {
                runtime.block_on(connections(&url, tasks))?
            } else {
                Vec::new()
            };
            // Rounds interleave tollgate and its peers; each gets the median of its rounds.
            let (mut ours, mut ceiling, mut naive_runs, mut pooled_runs) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut our_cpu, mut naive_cpu) = (Vec::new(), Vec::new());
            let mut off_runs = Vec::new();
            for _ in 0..rounds {
                let (run, cpu) = with_cpu(&runtime, tollgate_load(&store, n, tasks, duration))?;
                our_cpu.push(cpu);
                off_runs.push(runtime.block_on(tollgate_load(&unbatched, n, tasks, duration))?);
                // As many requests as tollgate did in the same time, so both run about as long.
                let requests = ((run.per_sec * duration.as_secs_f64()) as u64).max(2_000);
                ours.push(run);
                ceiling.push(redis_benchmark(server.port(), tasks, requests, &command)?);
                let (naive_run, cpu) = with_cpu(&runtime, naive_load(&naive, n, tasks, duration))?;
                naive_runs.push(naive_run);
                naive_cpu.push(cpu);
                if !pool.is_empty() {
                    pooled_runs.push(runtime.block_on(naive_load(&pool, n, tasks, duration))?);
                }
            }
            let (ours, ceiling, naive_load) = (
                median_load(&ours),
                median_load(&ceiling),
                median_load(&naive_runs),
            );
            let label = format!(
                "redis: {n} limit{}, {tasks} task{}",
                if n == 1 { "" } else { "s" },
                if tasks == 1 { "" } else { "s" },
            );
            let case = format!("{label} (decisions/s)");
            let off = median_load(&off_runs);
            eprintln!("  {label}: batching on {}, off {}", ours.text(), off.text());
            batching_rows.push(Row {
                case: format!("{label}, batching on vs off (decisions/s)"),
                tollgate: ours.text(),
                peer: "tollgate, batching off (one call per decision)".to_owned(),
                peer_value: off.text(),
                ratio: throughput_ratio(ours.per_sec, off.per_sec),
            });
            if let (Some(ours), Some(naive)) = (median_cpu(&our_cpu), median_cpu(&naive_cpu)) {
                let us = |v: f64| format!("{:.2} µs", v * 1e6);
                cpu_rows.push(Row {
                    case: format!("{label} (client CPU per decision)"),
                    tollgate: us(ours),
                    peer: format!("naive GET+SET per limit ({} round trips)", 2 * n),
                    peer_value: us(naive),
                    ratio: time_ratio(ours, naive),
                });
            }
            eprintln!(
                "  {case}: tollgate {}, redis-benchmark {}, naive {}",
                ours.text(),
                ceiling.text(),
                naive_load.text()
            );
            rows.push(Row {
                case: case.clone(),
                tollgate: ours.text(),
                peer: format!("redis-benchmark EVALSHA, same script (-c {tasks} -P 1)"),
                peer_value: ceiling.text(),
                ratio: throughput_ratio(ours.per_sec, ceiling.per_sec),
            });
            rows.push(Row {
                case: case.clone(),
                tollgate: ours.text(),
                peer: format!("naive GET+SET per limit ({} round trips)", 2 * n),
                peer_value: naive_load.text(),
                ratio: throughput_ratio(ours.per_sec, naive_load.per_sec),
            });
            if !pooled_runs.is_empty() {
                let pooled = median_load(&pooled_runs);
                eprintln!("  {case}: naive, a connection per task {}", pooled.text());
                rows.push(Row {
                    case,
                    tollgate: ours.text(),
                    peer: format!(
                        "naive GET+SET per limit, a connection per task ({} round trips)",
                        2 * n
                    ),
                    peer_value: pooled.text(),
                    ratio: throughput_ratio(ours.per_sec, pooled.per_sec),
                });
            }
        }
    }
    // Many callers: a tier key of each task's own (route and global shared), so that a batch's
    // decisions share only some of their keys.
    for n in [1, 3] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ours.push(runtime.block_on(tollgate_load_on(
                &store,
                n,
                128,
                duration,
                Keys::TierPerTask,
            ))?);
            theirs.push(runtime.block_on(naive_load_on(
                &naive,
                n,
                128,
                duration,
                Keys::TierPerTask,
            ))?);
        }
        let (ours, theirs) = (median_load(&ours), median_load(&theirs));
        let label = format!(
            "redis: {n} limit{}, 128 tasks, a tier key per task",
            if n == 1 { "" } else { "s" }
        );
        eprintln!(
            "  {label}: tollgate {}, naive {}",
            ours.text(),
            theirs.text()
        );
        rows.push(Row {
            case: format!("{label} (decisions/s)"),
            tollgate: ours.text(),
            peer: format!("naive GET+SET per limit ({} round trips)", 2 * n),
            peer_value: theirs.text(),
            ratio: throughput_ratio(ours.per_sec, theirs.per_sec),
        });
    }
    rows.extend(batching_rows);
    rows.extend(cpu_rows);
    rows.extend(redis_cpu_rows(
        &runtime, &server, &unbatched, &store, &naive[0], rounds, duration,
    )?);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_csv() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"EVALSHA abc 1 k decide  bench.0 0 0\",\"38461.54\",\"0.071\",\"0.016\",\"0.063\",\"0.127\",\"0.271\",\"4.663\"\n";
        let load = parse_csv(out).expect("parsed");
        assert!((load.per_sec - 38461.54).abs() < 1e-6);
        assert_eq!(load.p50, Duration::from_micros(63));
        assert_eq!(load.p99, Duration::from_micros(271));
        assert!(parse_csv("garbage").is_none());
    }
}

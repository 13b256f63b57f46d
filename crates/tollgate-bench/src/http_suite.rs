//! `http`: an axum hello-world route served by a child process, bare and behind each limiter.
//!
//! Every measurement starts the server in a fresh child process (this binary with `--serve CASE`),
//! on a tokio runtime with one worker thread, so no heap state is carried from one case or suite to
//! the next. The load generator is wrk when it is installed (`wrk -t1 -c32`, HTTP/1.1 keep-alive;
//! with two or more CPUs the server is pinned to the first and wrk to the last with `taskset`, so
//! what is measured is the server's capacity on one core), else a built-in hyper-util client (32
//! tasks in a closed loop on a single-threaded runtime of this process). The
//! quotas are generous, so every request passes: what is measured is the cost of the limiter on an
//! allowed request. tollgate runs with its defaults (both the IETF and the `X-RateLimit-*` headers
//! on every response), and once more with the headers off to show what they cost.
//!
//! With valgrind installed, each case except Redis is also served once under callgrind, and the
//! rows give its user-space instructions per request: a count that hardly moves from run to run,
//! where the timings of a shared VM move by more than the differences they are meant to show (see
//! [`callgrind`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate::http::HeaderMode;
use tollgate::inbound::{Global, Policy, RateLimitLayer};
use tollgate_core::{MemoryStore, Quota};
use tollgate_redis::RedisStore;
use tollgate_testkit::RedisServer;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::GlobalKeyExtractor;

use crate::load::{Load, drive, median_load};
use crate::report::{Row, median, ms, thousands, throughput_ratio, time_ratio};
use crate::wrk::{CONCURRENCY, Cpus, parse_wrk, process_cpu, wrk_requests, wrk_run};
use crate::{BoxError, callgrind};

/// A million per second, a million at once: nothing is ever denied.
const RATE: u32 = 1_000_000;
const BURST: u32 = 1_000_000;

async fn hello() -> &'static str {
    "Hello, World!"
}

fn bare() -> Router {
    Router::new().route("/", get(hello))
}

/// The five header values tollgate's default mode writes on an allowed request of this suite's
/// tier (a million at once, a million a second), so the `bare axum + same headers` peer puts the
/// same bytes on the wire (a test checks they match what the layer writes).
const SAME_HEADERS: [(&str, &str); 5] = [
    ("ratelimit-policy", "\"all\";q=1000000;w=1"),
    ("ratelimit", "\"all\";r=999999;t=1"),
    ("x-ratelimit-limit", "1000000"),
    ("x-ratelimit-remaining", "999999"),
    ("x-ratelimit-reset", "1"),
];

async fn hello_with_headers() -> impl axum::response::IntoResponse {
    (
        SAME_HEADERS.map(|(name, value)| {
            (
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            )
        }),
        "Hello, World!",
    )
}

/// Bare axum whose route returns tollgate's five header values as static strings: the wire cost
/// of the headers, common to both, without a limiter.
fn bare_with_headers() -> Router {
    Router::new().route("/", get(hello_with_headers))
}

fn tollgate_layer(
    store: impl tollgate_core::Store,
    headers: HeaderMode,
) -> Result<RateLimitLayer<Global>, BoxError> {
    let policy = Policy::builder()
        .tier("all", Quota::per_second(RATE)?.with_burst(BURST)?)
        .headers(headers)
        .build()?;
    Ok(RateLimitLayer::builder(policy, Global::new("all"))
        .store(store)
        .build()?)
}

fn governed() -> Result<Router, BoxError> {
    let config = GovernorConfigBuilder::default()
        .key_extractor(GlobalKeyExtractor)
        .period(Duration::from_secs(1) / RATE)
        .burst_size(BURST)
        .finish()
        .ok_or("invalid tower_governor config")?;
    Ok(bare().layer(GovernorLayer::new(Arc::new(config))))
}

/// tower_governor in its `use_headers()` mode: `x-ratelimit-limit` / `-remaining` on allowed
/// responses, like tollgate's default headers.
fn governed_with_headers() -> Result<Router, BoxError> {
    let config = GovernorConfigBuilder::default()
        .key_extractor(GlobalKeyExtractor)
        .period(Duration::from_secs(1) / RATE)
        .burst_size(BURST)
        .use_headers()
        .finish()
        .ok_or("invalid tower_governor config")?;
    Ok(bare().layer(GovernorLayer::new(Arc::new(config))))
}

/// The hidden first argument that makes the runner serve one case instead of measuring: the
/// parent starts `tollgate-bench --serve CASE REDIS_URL` once per measurement, so every case runs
/// in a fresh process (no heap or allocator state carried over from earlier cases or suites).
pub(crate) const SERVE_FLAG: &str = "--serve";

/// The child's side: serves `case` on 127.0.0.1:0 with one runtime worker thread, prints
/// `listening ADDR` and serves until the parent kills it or goes away (its end of our stdin
/// closes, even when it is killed itself, so no server outlives an interrupted run).
pub(crate) fn serve_child(args: &[String]) -> Result<(), BoxError> {
    let [case, redis_url] = args else {
        return Err(format!("usage: tollgate-bench {SERVE_FLAG} CASE REDIS_URL").into());
    };
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let app = match case.as_str() {
        "bare" => bare(),
        "bare-headers" => bare_with_headers(),
        "bare-layered" => bare().layer(tower::layer::util::Identity::new()),
        "memory" => bare().layer(tollgate_layer(MemoryStore::new(), HeaderMode::default())?),
        "memory-no-headers" => bare().layer(tollgate_layer(MemoryStore::new(), HeaderMode::None)?),
        "redis" => {
            let store = runtime.block_on(RedisStore::builder(redis_url.as_str()).connect())?;
            bare().layer(tollgate_layer(store, HeaderMode::default())?)
        }
        "tower_governor" => governed()?,
        "tower_governor-headers" => governed_with_headers()?,
        other => return Err(format!("unknown case `{other}`").into()),
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", listener.local_addr()?);
        std::io::Write::flush(&mut std::io::stdout())?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}

/// A server child process, killed when dropped.
struct Child {
    process: std::process::Child,
    addr: SocketAddr,
}

impl Child {
    /// Starts the server of `case` (on the server CPU when pinning, under `wrapper` when it is
    /// not empty: a profiler and its arguments) and waits for its address.
    fn start(
        case: &str,
        redis_url: &str,
        cpus: &Cpus,
        wrapper: &[String],
    ) -> Result<Child, BoxError> {
        let exe = std::env::current_exe()?;
        let mut program: Vec<std::ffi::OsString> = Vec::new();
        if let Some(cpu) = &cpus.server {
            program.extend(["taskset".into(), "-c".into(), cpu.into()]);
        }
        program.extend(wrapper.iter().map(Into::into));
        program.push(exe.into_os_string());
        let mut cmd = Command::new(&program[0]);
        cmd.args(&program[1..]);
        let mut process = cmd
            .args([SERVE_FLAG, case, redis_url])
            // Held open for the child's life: it exits when this end closes.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = process.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let addr = line.trim().strip_prefix("listening ").map(str::parse);
        match addr {
            Some(Ok(addr)) => Ok(Child { process, addr }),
            _ => {
                let _ = process.kill();
                let _ = process.wait();
                Err(format!("the `{case}` server did not start (it said {line:?})").into())
            }
        }
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The load generator: wrk when it is installed (one thread, `CONCURRENCY` connections), else the
/// built-in hyper client. Chosen once per run, the same for every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Generator {
    /// `wrk -t1 -c32`, pinned to the last CPU with `taskset` when there are two or more.
    Wrk,
    /// A hyper-util legacy client on a single-threaded runtime of this process.
    Hyper,
}

impl Generator {
    /// wrk when `wrk --version` runs (it prints its banner and exits non-zero), else hyper.
    fn detect() -> Generator {
        match Command::new("wrk").arg("--version").output() {
            Ok(out) if String::from_utf8_lossy(&out.stdout).contains("wrk") => Generator::Wrk,
            _ => Generator::Hyper,
        }
    }

    /// How the load was made, for the table.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Generator::Wrk => "wrk, 1 thread",
            Generator::Hyper => "built-in hyper client",
        }
    }

    fn load(self, server: &Child, duration: Duration, cpus: &Cpus) -> Result<Measured, BoxError> {
        match self {
            Generator::Wrk => wrk_load(server, duration, cpus),
            Generator::Hyper => Ok(Measured {
                load: hyper_load(server.addr, duration)?,
                cpu_per_request: None,
            }),
        }
    }
}

/// One case's load run.
#[derive(Debug, Clone, Copy)]
struct Measured {
    load: Load,
    /// The server's CPU time per request (with wrk; the built-in client does not count requests
    /// exactly).
    cpu_per_request: Option<Duration>,
}

/// Runs wrk against `addr`: a 1 s warm-up, then `duration` (rounded up to whole seconds) measured.
fn wrk_load(server: &Child, duration: Duration, cpus: &Cpus) -> Result<Measured, BoxError> {
    let run = |d: Duration| wrk_run(server.addr, d, cpus);
    run(Duration::from_secs(1))?;
    let cpu_before = process_cpu(server.pid());
    let text = run(duration)?;
    let cpu_after = process_cpu(server.pid());
    let load = parse_wrk(&text).ok_or_else(|| format!("unexpected wrk output: {text}"))?;
    let cpu_per_request = match (cpu_before, cpu_after, wrk_requests(&text)) {
        (Some(before), Some(after), Some(n)) if n > 0 && after > before => {
            Some((after - before) / u32::try_from(n).unwrap_or(u32::MAX))
        }
        _ => None,
    };
    Ok(Measured {
        load,
        cpu_per_request,
    })
}

/// Loads `addr` with the built-in hyper client for `duration` after a short warm-up.
fn hyper_load(addr: SocketAddr, duration: Duration) -> Result<Load, BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(CONCURRENCY)
            .build_http();
        let uri: Uri = format!("http://{addr}/").parse()?;
        let make_op = || {
            let client = client.clone();
            let uri = uri.clone();
            move || {
                let request = client.get(uri.clone());
                async move {
                    let response = request.await?;
                    let ok = response.status() == StatusCode::OK;
                    response.into_body().collect().await?;
                    Ok(ok)
                }
            }
        };
        drive(CONCURRENCY, Duration::from_millis(300), &make_op).await?;
        drive(CONCURRENCY, duration, &make_op).await
    })
}

/// The cases, each served by a fresh server process.
/// `memory-no-headers` shows how much of tollgate's cost is its five rate-limit headers
/// (tower_governor sends none on an allowed request).
const CASES: [&str; 7] = [
    "bare",
    "bare-headers",
    "memory",
    "memory-no-headers",
    "redis",
    "tower_governor",
    "tower_governor-headers",
];

/// Serves one case in a fresh child process and loads it.
fn measure_case(
    case: &str,
    redis: &RedisServer,
    duration: Duration,
    generator: Generator,
    cpus: &Cpus,
) -> Result<Measured, BoxError> {
    let server = Child::start(case, &redis.url(), cpus, &[])?;
    generator.load(&server, duration, cpus)
}

/// The cases counted under callgrind (the Redis case is left out: its decisions are spent in
/// redis-server, not in the server process). `bare-layered` is bare axum with a layer that does
/// nothing (`tower::layer::util::Identity`) put on with `Router::layer`: what axum charges any
/// layer, the floor under every limiter put on that way.
const COUNTED: [&str; 7] = [
    "bare",
    "bare-headers",
    "bare-layered",
    "memory",
    "memory-no-headers",
    "tower_governor",
    "tower_governor-headers",
];

/// Instructions per request of `case`'s server under callgrind, over a wrk run of `duration`
/// after a 1 s warm-up (see [`callgrind`]).
fn instructions_per_request(
    case: &str,
    redis: &RedisServer,
    cpus: &Cpus,
    scratch: &callgrind::Scratch,
    duration: Duration,
) -> Result<f64, BoxError> {
    let server = Child::start(case, &redis.url(), cpus, &scratch.wrapper(case))?;
    wrk_run(server.addr, Duration::from_secs(1), cpus)?;
    scratch.control("-z", server.pid())?;
    let text = wrk_run(server.addr, duration, cpus)?;
    scratch.control("-d", server.pid())?;
    drop(server);
    // Every request answered 200 in time, or the count is not of what it claims.
    parse_wrk(&text).ok_or_else(|| format!("wrk saw errors under callgrind: {text}"))?;
    let requests = wrk_requests(&text)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("unexpected wrk output: {text}"))?;
    let per_request = scratch.last_dump_total(case)? as f64 / requests as f64;
    eprintln!(
        "  http {case}: {} instructions per request (callgrind, {requests} requests)",
        thousands(per_request)
    );
    Ok(per_request)
}

/// The rows of instructions per request, when valgrind is installed (and wrk, which loads the
/// servers); none otherwise, or when callgrind fails (say, where ptrace is not allowed), with a
/// note on stderr: the timings measured before are kept.
fn instruction_rows(
    redis: &RedisServer,
    cpus: &Cpus,
    generator: Generator,
    duration: Duration,
) -> Vec<Row> {
    if generator != Generator::Wrk || !callgrind::installed() {
        eprintln!(
            "  instructions per request: skipped (needs valgrind and wrk: apt-get install valgrind wrk)"
        );
        return Vec::new();
    }
    match count_instructions(redis, cpus, duration) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("  instructions per request: skipped, callgrind failed: {e}");
            Vec::new()
        }
    }
}

/// Counts every case of [`COUNTED`] under callgrind and compares tollgate's counts with its
/// peers'.
fn count_instructions(
    redis: &RedisServer,
    cpus: &Cpus,
    duration: Duration,
) -> Result<Vec<Row>, BoxError> {
    let scratch = callgrind::Scratch::new()?;
    let mut counts = Vec::new();
    for case in COUNTED {
        counts.push((
            case,
            instructions_per_request(case, redis, cpus, &scratch, duration)?,
        ));
    }
    let count = |name: &str| {
        counts
            .iter()
            .find(|(case, _)| *case == name)
            .map(|(_, n)| *n)
    };
    let mut rows = Vec::new();
    if let (Some(layered), Some(bare)) = (count("bare-layered"), count("bare")) {
        rows.push(Row {
            case: "http: a layer that does nothing, put on with Router::layer (instructions per request, callgrind)".into(),
            tollgate: thousands(layered),
            peer: "bare axum".into(),
            peer_value: thousands(bare),
            ratio: time_ratio(layered, bare),
        });
    }
    rows.extend(cost_rows(
        "instructions per request, callgrind",
        count,
        thousands,
    ));
    Ok(rows)
}

/// The peers every tollgate row is compared with: the case and its label (contract labels).
const PEERS: [(&str, &str); 4] = [
    ("bare", "bare axum"),
    ("bare-headers", "bare axum + same headers"),
    ("tower_governor", "tower_governor (global key)"),
    (
        "tower_governor-headers",
        "tower_governor (global key, headers)",
    ),
];

/// The rows comparing a cost per request (`cost` of a case, shown by `show`) of tollgate on
/// `MemoryStore`, with and without its headers, with bare axum's and tower_governor's; none
/// where a case has no value.
fn cost_rows(
    measure: &str,
    cost: impl Fn(&str) -> Option<f64>,
    show: impl Fn(f64) -> String,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (name, label) in [
        ("memory", "tollgate MemoryStore"),
        (
            "memory-no-headers",
            "tollgate MemoryStore, no rate-limit headers",
        ),
    ] {
        let Some(ours) = cost(name) else { continue };
        for (peer_case, peer) in PEERS {
            let Some(peer_cost) = cost(peer_case) else {
                continue;
            };
            rows.push(Row {
                case: format!("http: {label} ({measure})"),
                tollgate: show(ours),
                peer: peer.into(),
                peer_value: show(peer_cost),
                ratio: time_ratio(ours, peer_cost),
            });
        }
    }
    rows
}

/// Runs the http suite.
pub(crate) fn run(quick: bool) -> Result<Vec<Row>, BoxError> {
    // Rounds interleave the cases, so a drift in machine load hits all of them alike; each case
    // gets the median of its rounds (throughput and latencies separately).
    let (rounds, duration) = if quick {
        (2, Duration::from_millis(700))
    } else {
        (8, Duration::from_secs(2))
    };
    let redis_server = RedisServer::start()?;
    let generator = Generator::detect();
    // Pinning keeps the server and wrk apart; the built-in client runs in this process, so it
    // shares the CPUs with the server as the kernel sees fit.
    let cpus = if generator == Generator::Wrk {
        Cpus::plan()
    } else {
        Cpus::unpinned()
    };
    eprintln!(
        "  load generator: {}{}",
        generator.describe(),
        match (&cpus.server, &cpus.generator) {
            (Some(s), Some(g)) => format!(" on CPU {g}, server on CPU {s}"),
            _ => String::new(),
        }
    );
    let mut samples: Vec<(&str, Vec<Measured>)> = CASES.iter().map(|c| (*c, Vec::new())).collect();
    for round in 0..rounds {
        // Each round starts with a different case, so no case always runs first or last.
        for i in 0..samples.len() {
            let (case, runs) = &mut samples[(i + round) % CASES.len()];
            let measured = measure_case(case, &redis_server, duration, generator, &cpus)?;
            eprintln!(
                "  http {case} (round {}): {}{}",
                round + 1,
                measured.load.text(),
                measured
                    .cpu_per_request
                    .map(|c| format!(", server CPU {:.2} µs/request", c.as_secs_f64() * 1e6))
                    .unwrap_or_default()
            );
            runs.push(measured);
        }
    }
    // Medians: throughput and latencies field by field; CPU per request likewise.
    let results: Vec<(&str, Load, Option<f64>)> = samples
        .into_iter()
        .map(|(case, runs)| {
            let loads: Vec<Load> = runs.iter().map(|m| m.load).collect();
            let mut cpu: Vec<f64> = runs
                .iter()
                .filter_map(|m| m.cpu_per_request.map(|c| c.as_secs_f64() * 1e6))
                .collect();
            let cpu = (cpu.len() == runs.len()).then(|| median(&mut cpu));
            (case, median_load(&loads), cpu)
        })
        .collect();
    let find = |name: &str| {
        results
            .iter()
            .find(|(case, ..)| *case == name)
            .ok_or_else(|| format!("no result for {name}"))
    };
    let get = |name: &str| find(name).map(|(_, load, _)| *load);
    let cpu_of = |name: &str| find(name).map(|(.., cpu)| *cpu);
    let (bare, redis, governor) = (get("bare")?, get("redis")?, get("tower_governor")?);
    let value = |l: &Load| format!("{} req/s (p99 {})", thousands(l.per_sec), ms(l.p99));
    let conc = format!(
        "{CONCURRENCY} connections, {}",
        match generator {
            Generator::Wrk => "wrk",
            Generator::Hyper => "hyper client",
        }
    );
    let mut rows = Vec::new();
    for (name, label) in [
        ("memory", "tollgate MemoryStore"),
        (
            "memory-no-headers",
            "tollgate MemoryStore, no rate-limit headers",
        ),
    ] {
        let ours = get(name)?;
        for (peer_case, peer) in PEERS {
            let theirs = get(peer_case)?;
            rows.push(Row {
                case: format!("http: {label} (req/s, {conc})"),
                tollgate: value(&ours),
                peer: peer.into(),
                peer_value: value(&theirs),
                ratio: throughput_ratio(ours.per_sec, theirs.per_sec),
            });
        }
    }
    rows.extend([
        Row {
            case: format!("http: tollgate on Redis (req/s, {conc})"),
            tollgate: value(&redis),
            peer: "bare axum".into(),
            peer_value: value(&bare),
            ratio: throughput_ratio(redis.per_sec, bare.per_sec),
        },
        Row {
            case: format!("http: tollgate on Redis (req/s, {conc})"),
            tollgate: value(&redis),
            peer: "tower_governor (global key, in memory)".into(),
            peer_value: value(&governor),
            ratio: throughput_ratio(redis.per_sec, governor.per_sec),
        },
    ]);
    // With wrk on its own CPU: the server's CPU time per request, the steadier measure (the
    // Redis case is left out: its decisions are spent in redis-server, not in this process).
    rows.extend(cost_rows(
        &format!("server CPU per request, {conc}"),
        |name| cpu_of(name).ok().flatten(),
        |v| format!("{v:.2} µs"),
    ));
    // Counted over at least 3 s in a full run: the fixed costs of a run (wrk's connections, the
    // runtime's idle work) weigh less the more requests they are spread over.
    let counted = if quick {
        duration
    } else {
        duration.max(Duration::from_secs(3))
    };
    rows.extend(instruction_rows(&redis_server, &cpus, generator, counted));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    fn headers_of(app: Router) -> Vec<(String, String)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let response = runtime
            .block_on(app.oneshot(http::Request::new(axum::body::Body::empty())))
            .expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
        let mut headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter(|(name, _)| name.as_str().contains("ratelimit"))
            .map(|(n, v)| (n.to_string(), v.to_str().expect("ASCII").to_owned()))
            .collect();
        headers.sort();
        headers
    }

    /// The `bare axum + same headers` peer writes exactly the rate-limit headers tollgate writes
    /// on the first request of the suite's tier, so the wire cost is the same.
    #[test]
    fn the_same_headers_are_the_layers() {
        let layer = tollgate_layer(MemoryStore::new(), HeaderMode::default()).expect("a layer");
        let ours = headers_of(bare().layer(layer));
        assert_eq!(ours.len(), 5, "{ours:?}");
        assert_eq!(headers_of(bare_with_headers()), ours);
        assert!(headers_of(bare()).is_empty());
    }

    /// tower_governor's `use_headers()` mode writes its `x-ratelimit-*` headers.
    #[test]
    fn the_governor_peer_with_headers_writes_them() {
        let with = headers_of(governed_with_headers().expect("a router"));
        assert!(
            with.iter().any(|(n, _)| n == "x-ratelimit-remaining"),
            "{with:?}"
        );
        assert!(headers_of(governed().expect("a router")).is_empty());
    }
}

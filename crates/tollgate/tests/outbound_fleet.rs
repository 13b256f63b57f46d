//! The outbound layer as a fleet: two `reqwest-client` processes (the example binary) against
//! one in-process axum upstream on loopback, with and without a shared Redis bucket.
//!
//! * **Shared limit**: the upstream enforces 10/s with a burst of 5 and answers 429 +
//!   `Retry-After` beyond it. Two clients each configured at that quota and sharing one Redis
//!   bucket (`--redis URL --bucket NAME`) stay within it together (no 429, all ok, the upstream
//!   never sees more than the burst plus the rate allows); the same two without Redis each spend
//!   the whole quota and get 429s.
//! * **Fleet-wide pause**: an upstream that answers `429` + `Retry-After: 2` to everyone for two
//!   seconds, from a moment when both clients are busy, gets no request from either process for
//!   those two seconds (including the calls already waiting for a place when the 429 came), then
//!   every call succeeds, resuming at the bucket's rate rather than in a storm.
//!
//! The binary is built once per test process with `$CARGO build -p example-reqwest-client --bin
//! reqwest-client` (a no-op when up to date) and its path taken from Cargo's JSON messages, so
//! `CARGO_TARGET_DIR` and `build.target-dir` are respected. Each child runs with a bounded
//! timeout and is killed when its handle is dropped; each test starts its own `redis-server`
//! (tollgate-testkit). The tests run one at a time ([`SERIAL`]): they measure real time.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle as ThreadHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tollgate_testkit::RedisServer;

/// The tests run one at a time: each measures real time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The longest a client process may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest the build of the client may take (waiting for Cargo's lock included).
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------------
// The test upstream
// ---------------------------------------------------------------------------------------------

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    path: String,
    status: StatusCode,
}

/// Decides the status of a request (and its `Retry-After`, if any) from the requests seen so far,
/// its path and its arrival time.
type Answer = Box<dyn FnMut(&[Hit], &str, Instant) -> (StatusCode, Option<u64>) + Send>;

struct Log {
    hits: Vec<Hit>,
    answer: Answer,
}

/// An upstream on 127.0.0.1:0 recording every request; stopped when dropped.
struct Upstream {
    server: common::TestServer,
    log: Arc<Mutex<Log>>,
}

async fn handle(State(log): State<Arc<Mutex<Log>>>, uri: Uri) -> Response {
    let now = Instant::now();
    let (status, retry_after) = {
        let mut guard = log.lock().unwrap_or_else(PoisonError::into_inner);
        let log = &mut *guard;
        let answer = (log.answer)(&log.hits, uri.path(), now);
        log.hits.push(Hit {
            at: now,
            path: uri.path().to_owned(),
            status: answer.0,
        });
        answer
    };
    let mut response = (status, "upstream").into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
    }
    response
}

impl Upstream {
    async fn start(answer: Answer) -> Upstream {
        let log = Arc::new(Mutex::new(Log {
            hits: Vec::new(),
            answer,
        }));
        let app = Router::new().fallback(handle).with_state(Arc::clone(&log));
        Upstream {
            server: common::serve(app).await,
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    fn hits(&self) -> Vec<Hit> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hits
            .clone()
    }
}

/// The upstream's own limit: a GCRA token bucket (`rate`/s, capacity `burst`) admitting a request
/// up to `jitter` early (loopback and scheduling jitter; a strict one would refuse a client exactly
/// on schedule whose request spent 1 ms less on the way than the previous one). Beyond it: 429 +
/// `Retry-After` in whole seconds, rounded up.
fn gcra(rate: u32, burst: u32, jitter: Duration) -> Answer {
    let interval = Duration::from_secs(1) / rate;
    let tau = interval * burst;
    let mut tat: Option<Instant> = None;
    Box::new(move |_, _, now| {
        let t = tat.map_or(now, |t| t.max(now));
        let earliest = (t + interval).checked_sub(tau).unwrap_or(now);
        if earliest <= now + jitter {
            tat = Some(t + interval);
            (StatusCode::OK, None)
        } else {
            let secs = (earliest - now).as_secs_f64().ceil().max(1.0) as u64;
            (StatusCode::TOO_MANY_REQUESTS, Some(secs))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The client processes
// ---------------------------------------------------------------------------------------------

/// The workspace root.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/tollgate lives in the workspace")
        .to_path_buf()
}

/// The `reqwest-client` executable, built once per test process; its path is the one Cargo
/// reports, in the target directory this build uses.
fn client_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args([
                "build",
                "--quiet",
                "-p",
                "example-reqwest-client",
                "--bin",
                "reqwest-client",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(workspace_root());
        let (status, stdout, stderr) = Running::spawn(cargo).wait(BUILD_TIMEOUT);
        assert!(
            status.success(),
            "building reqwest-client failed ({status}):\n{stderr}"
        );
        stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| {
                m["reason"] == "compiler-artifact" && m["target"]["name"] == "reqwest-client"
            })
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no reqwest-client executable")
    })
}

/// The last line of a client's stdout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Summary {
    sent: u64,
    ok: u64,
    rate_limited_locally: u64,
    upstream_429: u64,
    errors: u64,
    elapsed_ms: u64,
}

impl std::ops::Add for Summary {
    type Output = Summary;

    fn add(self, o: Summary) -> Summary {
        Summary {
            sent: self.sent + o.sent,
            ok: self.ok + o.ok,
            rate_limited_locally: self.rate_limited_locally + o.rate_limited_locally,
            upstream_429: self.upstream_429 + o.upstream_429,
            errors: self.errors + o.errors,
            elapsed_ms: self.elapsed_ms.max(o.elapsed_ms),
        }
    }
}

/// A child process whose output is collected; killed and reaped when dropped.
struct Running {
    child: Child,
    stdout: Option<ThreadHandle<String>>,
    stderr: Option<ThreadHandle<String>>,
}

fn collect(mut pipe: impl Read + Send + 'static) -> ThreadHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn join(handle: Option<ThreadHandle<String>>) -> String {
    handle
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default()
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command:?}: {e}"));
        let stdout = child.stdout.take().map(collect);
        let stderr = child.stderr.take().map(collect);
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits at most `timeout` for the exit (else kills the process and panics with its stderr);
    /// returns the status, stdout and stderr.
    fn wait(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait().expect("wait for the child") {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "still running after {timeout:?}; stderr:\n{}",
                        join(self.stderr.take())
                    );
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        (status, join(self.stdout.take()), join(self.stderr.take()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `reqwest-client` with `args` (bounded by [`CLIENT_TIMEOUT`]) and parses its summary.
fn finish(client: Running) -> Summary {
    let (status, stdout, stderr) = client.wait(CLIENT_TIMEOUT);
    assert!(
        status.success(),
        "reqwest-client failed ({status}); stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    let json: serde_json::Value = last
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary line; stdout:\n{stdout}\nstderr:\n{stderr}"));
    let field = |name: &str| {
        json[name]
            .as_u64()
            .unwrap_or_else(|| panic!("`{name}` missing from {json}"))
    };
    Summary {
        sent: field("sent"),
        ok: field("ok"),
        rate_limited_locally: field("rate_limited_locally"),
        upstream_429: field("upstream_429"),
        errors: field("errors"),
        elapsed_ms: field("elapsed_ms"),
    }
}

/// Runs one client per argument list, all at once, and returns their summaries (in order).
async fn run_clients(runs: Vec<Vec<String>>) -> Vec<Summary> {
    tokio::task::spawn_blocking(move || {
        client_bin();
        let children: Vec<Running> = runs
            .iter()
            .map(|args| {
                let mut command = Command::new(client_bin());
                command.args(args).env("RUST_LOG", "warn");
                Running::spawn(command)
            })
            .collect();
        children.into_iter().map(finish).collect()
    })
    .await
    .expect("the clients' thread")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn start_redis() -> RedisServer {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("join")
        .expect("redis-server starts")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

const RATE: u32 = 10;
const BURST: u32 = 5;
const PER_CLIENT: u64 = 12;

/// The arguments of one client at the upstream's quota, with or without a shared bucket.
fn at_upstream_quota(url: &str, redis: Option<&str>) -> Vec<String> {
    let mut a = args(&[
        "--url",
        url,
        "--requests",
        &PER_CLIENT.to_string(),
        "--rate",
        &format!("{RATE}/s"),
        "--burst",
        &BURST.to_string(),
        "--concurrency",
        "4",
        "--max-wait",
        "20",
    ]);
    if let Some(redis) = redis {
        a.extend(args(&["--redis", redis, "--bucket", "fleet-shared"]));
    }
    a
}

/// Acceptance 2, shared: two processes drawing from one Redis bucket at the upstream's quota stay
/// within it together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_a_redis_bucket_stay_within_the_upstream_limit() {
    let _serial = SERIAL.lock().await;
    let jitter = Duration::from_millis(50);
    let redis = start_redis().await;
    let upstream = Upstream::start(gcra(RATE, BURST, jitter)).await;
    let url = redis.url();
    let summaries = run_clients(vec![
        at_upstream_quota(&upstream.url("/a"), Some(&url)),
        at_upstream_quota(&upstream.url("/b"), Some(&url)),
    ])
    .await;
    let total = summaries[0] + summaries[1];
    let hits = upstream.hits();
    let times: Vec<Instant> = hits.iter().map(|h| h.at).collect();
    let refused = hits
        .iter()
        .filter(|h| h.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    let span = times.iter().max().copied().zip(times.iter().min().copied());
    let span = span.map_or(Duration::ZERO, |(last, first)| last - first);
    let expected =
        Duration::from_secs_f64((2 * PER_CLIENT - u64::from(BURST)) as f64 / f64::from(RATE));
    println!(
        "shared bucket: {summaries:?}; upstream saw {} requests over {} ms (at least {} ms \
         expected), {refused} refused; arrivals (ms): {:?}",
        hits.len(),
        span.as_millis(),
        expected.as_millis(),
        common::offsets(&times, times[0])
    );
    for (s, path) in summaries.iter().zip(["/a", "/b"]) {
        assert!(
            hits.iter().any(|h| h.path == path),
            "no request from {path}"
        );
        assert_eq!(s.sent, PER_CLIENT);
    }
    assert_eq!(total.upstream_429, 0, "{summaries:?}");
    assert_eq!(refused, 0);
    assert_eq!(total.ok, 2 * PER_CLIENT, "{summaries:?}");
    assert_eq!((total.errors, total.rate_limited_locally), (0, 0));
    assert_eq!(hits.len() as u64, 2 * PER_CLIENT);
    let most = common::assert_arrival_curve(&times, f64::from(RATE), BURST as usize, jitter);
    assert!(most <= BURST as usize + 1, "{most} requests within 100 ms");
    assert!(
        span >= expected.mul_f64(0.95),
        "the fleet sent {} requests in {span:?}, faster than the shared quota allows",
        hits.len()
    );
}

/// Acceptance 2, not shared: the same two processes without Redis each spend the whole quota, so
/// together they exceed the upstream's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_without_redis_exceed_the_upstream_limit() {
    let _serial = SERIAL.lock().await;
    let upstream = Upstream::start(gcra(RATE, BURST, Duration::from_millis(50))).await;
    let summaries = run_clients(vec![
        at_upstream_quota(&upstream.url("/a"), None),
        at_upstream_quota(&upstream.url("/b"), None),
    ])
    .await;
    let total = summaries[0] + summaries[1];
    let refused = upstream
        .hits()
        .iter()
        .filter(|h| h.status == StatusCode::TOO_MANY_REQUESTS)
        .count() as u64;
    println!("separate buckets: {summaries:?}; the upstream refused {refused}");
    assert!(total.upstream_429 > 0, "{summaries:?}");
    assert_eq!(total.upstream_429, refused, "every 429 sent was counted");
    assert_eq!(total.sent, 2 * PER_CLIENT);
}

/// Acceptance 3: once both processes are busy, the upstream answers 429 + `Retry-After: 2` to
/// every request for two seconds. No request arrives from either process in the 1.8 s after the
/// first 429 (50 ms allowed for requests already on the wire), every call then succeeds (the
/// refused ones retried), and the fleet resumes at the bucket's rate: at most burst + 1 requests
/// in the first 100 ms after the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_pauses_the_whole_fleet() {
    let _serial = SERIAL.lock().await;
    const BURST: usize = 2;
    const PER_CLIENT: u64 = 12;
    let redis = start_redis().await;
    let pause = Duration::from_secs(2);
    let mut closed_from: Option<Instant> = None;
    let upstream = Upstream::start(Box::new(move |hits, _, now| {
        if closed_from.is_none() {
            let from = |p: &str| hits.iter().filter(|h| h.path == p).count();
            if from("/a") >= 3 && from("/b") >= 3 {
                closed_from = Some(now);
            }
        }
        match closed_from {
            Some(t0) if now < t0 + pause => (StatusCode::TOO_MANY_REQUESTS, Some(2)),
            _ => (StatusCode::OK, None),
        }
    }))
    .await;
    let client = |path: &str| {
        args(&[
            "--url",
            &upstream.url(path),
            "--requests",
            &PER_CLIENT.to_string(),
            "--rate",
            "10/s",
            "--burst",
            &BURST.to_string(),
            "--concurrency",
            "4",
            "--max-wait",
            "20",
            "--redis",
            &redis.url(),
            "--bucket",
            "fleet-pause",
        ])
    };
    let summaries = run_clients(vec![client("/a"), client("/b")]).await;
    let total = summaries[0] + summaries[1];
    let hits = upstream.hits();
    let first_429 = hits
        .iter()
        .find(|h| h.status == StatusCode::TOO_MANY_REQUESTS)
        .expect("the upstream refused something")
        .at;
    let times: Vec<Instant> = hits.iter().map(|h| h.at).collect();
    let on_wire = Duration::from_millis(50);
    let quiet = Duration::from_millis(1800);
    let in_pause: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.at > first_429 + on_wire && h.at < first_429 + quiet)
        .collect();
    let after: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| *t >= first_429 + quiet)
        .collect();
    let resumed = after
        .iter()
        .min()
        .copied()
        .expect("requests after the pause");
    let first_100ms = after
        .iter()
        .filter(|t| **t - resumed <= Duration::from_millis(100))
        .count();
    let refused = hits
        .iter()
        .filter(|h| h.status == StatusCode::TOO_MANY_REQUESTS)
        .count() as u64;
    println!(
        "fleet pause: {summaries:?}; {refused} refused; arrivals relative to the first 429 \
         (ms): /a {:?} /b {:?}; resumed {} ms after it, {first_100ms} in its first 100 ms",
        common::offsets(
            &hits
                .iter()
                .filter(|h| h.path == "/a")
                .map(|h| h.at)
                .collect::<Vec<_>>(),
            first_429
        ),
        common::offsets(
            &hits
                .iter()
                .filter(|h| h.path == "/b")
                .map(|h| h.at)
                .collect::<Vec<_>>(),
            first_429
        ),
        (resumed - first_429).as_millis()
    );
    assert!(
        in_pause.is_empty(),
        "requests arrived during the pause: {:?}",
        in_pause
            .iter()
            .map(|h| (h.path.as_str(), (h.at - first_429).as_millis()))
            .collect::<Vec<_>>()
    );
    assert_eq!(total.ok, 2 * PER_CLIENT, "{summaries:?}");
    assert_eq!(
        (total.errors, total.rate_limited_locally),
        (0, 0),
        "{summaries:?}"
    );
    assert_eq!(total.upstream_429, refused, "every 429 sent was counted");
    for path in ["/a", "/b"] {
        assert!(
            hits.iter()
                .any(|h| h.path == path && h.at >= first_429 + quiet),
            "{path} never resumed"
        );
    }
    assert!(
        !hits
            .iter()
            .any(|h| h.at >= first_429 + quiet && h.status != StatusCode::OK),
        "a request after the pause was refused"
    );
    assert!(
        first_100ms <= BURST + 1,
        "{first_100ms} requests in the first 100 ms after the pause"
    );
    common::assert_arrival_curve(&after, 10.0, BURST, Duration::from_millis(50));
}

//! Helpers for tollgate's end-to-end tests.
//!
//! The tests in `tests/tests/` run the real example binaries as child processes and talk to them
//! over loopback HTTP, the way a user (or a load balancer) would:
//!
//! - [`axum_tiers_bin`] builds the `axum-tiers` example once per test process (`cargo build -p
//!   example-axum-tiers --bin axum-tiers`, a no-op when it is up to date) and returns the path
//!   of the executable Cargo reports, so `CARGO_TARGET_DIR`, `--target-dir` and
//!   `build.target-dir` are all respected (the default is the workspace's `target/debug/`).
//!   [`webhook_worker_bin`] and [`reqwest_client_bin`] do the same for the other examples.
//! - [`Server`] starts it on `127.0.0.1:0` with a configuration file in its own [`TempDir`],
//!   waits (bounded) for the `listening on http://…` line, collects stderr for assertions and
//!   failure messages, and kills and reaps the process when dropped.
//! - [`run_to_exit`] runs the binary to completion (bounded), for the start-up error cases.
//! - [`client`], [`send`], [`Reply`] and [`metric`] are small HTTP and Prometheus-text helpers;
//!   [`help_description`] reads a flag's line of `--help` output.
//!
//! Every wait is bounded: a broken server fails the test with its stderr instead of hanging.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server may take to print its `listening on` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a process that should exit (bad configuration, SIGTERM) may take to do so.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// The `axum-tiers` executable, built on first use.
///
/// Runs `$CARGO build -p example-axum-tiers --bin axum-tiers` (with the Cargo that runs the
/// tests) and takes the executable's path from Cargo's JSON messages, so the binary is the one in
/// the target directory this build uses (`CARGO_TARGET_DIR` when set, else the workspace's
/// `target/`). Panics with Cargo's output if the build fails.
pub fn axum_tiers_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("example-axum-tiers", "axum-tiers"))
}

/// The `limiter-burst` helper process of this package, built on first use.
pub fn limiter_burst_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("tollgate-e2e", "limiter-burst"))
}

/// The `webhook-worker` executable, built on first use (as [`axum_tiers_bin`]).
pub fn webhook_worker_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("example-webhook-worker", "webhook-worker"))
}

/// The `reqwest-client` executable, built on first use (as [`axum_tiers_bin`]).
pub fn reqwest_client_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("example-reqwest-client", "reqwest-client"))
}

fn build_bin(package: &str, bin: &str) -> PathBuf {
    let output = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .expect("cannot run cargo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "`cargo build -p {package} --bin {bin}` failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == bin)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo built {package} but reported no `{bin}` executable"))
}

/// A fresh, uniquely named directory under the system temp directory, removed on drop (kept, and
/// its path printed, when the thread is panicking, so the files can be inspected).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates the directory (`tollgate-e2e-<pid>-<nanos>-<n>`).
    pub fn new() -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "tollgate-e2e-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `name` in the directory, atomically (a temporary file renamed over the
    /// target, so a server reloading at that moment never reads half a file); returns the path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let target = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &target)
            .unwrap_or_else(|e| panic!("cannot rename to {}: {e}", target.display()));
        target
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("(test files kept in {})", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Text collected from a child's pipe by a background thread.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<String>>);

impl Collected {
    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn push_line(&self, line: &str) {
        let mut text = self.0.lock().unwrap_or_else(|e| e.into_inner());
        text.push_str(line);
        text.push('\n');
    }

    /// Reads `pipe` line by line into the buffer until EOF; `on_line` sees each line first.
    fn spawn(
        &self,
        pipe: impl Read + Send + 'static,
        mut on_line: impl FnMut(&str) + Send + 'static,
    ) -> JoinHandle<()> {
        let out = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']);
                        on_line(line);
                        out.push_line(line);
                    }
                }
            }
        })
    }
}

/// The command for the `axum-tiers` binary with a deterministic log setup (`RUST_LOG=info`, no
/// colours), whatever the environment of the test run says.
fn axum_tiers_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(axum_tiers_bin());
    cmd.args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A running `axum-tiers` server on `127.0.0.1` and a free port.
///
/// Dropping it kills (`SIGKILL`) and reaps the process; if the thread is panicking, the server's
/// stderr is printed first, so a failing test shows the server's side of the story.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    base: String,
    config: PathBuf,
    stdout: Collected,
    stderr: Collected,
    readers: Vec<JoinHandle<()>>,
    dir: TempDir,
}

impl Server {
    /// Starts the server with `config` (YAML) as its configuration file.
    pub fn start(config: &str) -> Server {
        Server::start_with(config, &[])
    }

    /// Starts the server with `config` (YAML) as its configuration file and extra command-line
    /// arguments (such as `["--redis", url]`).
    pub fn start_with(config: &str, extra_args: &[&str]) -> Server {
        let dir = TempDir::new();
        let path = dir.write("limits.yaml", config);
        Server::launch(dir, path, extra_args)
    }

    /// Starts the server on an existing configuration file (such as the shipped
    /// `examples/axum-tiers/limits.yaml`), which is never modified.
    pub fn start_on_file(path: &Path, extra_args: &[&str]) -> Server {
        Server::launch(TempDir::new(), path.to_path_buf(), extra_args)
    }

    fn launch(dir: TempDir, config: PathBuf, extra_args: &[&str]) -> Server {
        let config_arg = config.to_str().expect("temp paths are UTF-8").to_owned();
        let mut args = vec!["--config", &config_arg, "--addr", "127.0.0.1:0"];
        args.extend_from_slice(extra_args);
        let mut child = axum_tiers_command(&args)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", axum_tiers_bin().display()));
        let stdout = Collected::default();
        let stderr = Collected::default();
        let (tx, rx) = mpsc::channel();
        let mut readers = vec![
            stdout.spawn(child.stdout.take().expect("piped"), move |line| {
                if let Some((_, url)) = line.split_once("listening on ") {
                    let _ = tx.send(url.trim().trim_end_matches('/').to_owned());
                }
            }),
        ];
        readers.push(stderr.spawn(child.stderr.take().expect("piped"), |_| {}));
        let mut server = Server {
            child: Some(child),
            base: String::new(),
            config,
            stdout,
            stderr,
            readers,
            dir,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(base) => {
                assert!(
                    base.starts_with("http://127.0.0.1:"),
                    "unexpected listening line: {base}"
                );
                server.base = base;
                server
            }
            Err(e) => {
                // Timed out, or stdout closed because the process exited: show why.
                let status = server.kill();
                panic!(
                    "axum-tiers did not print `listening on` ({e:?}); status {status:?}\n\
                     stdout:\n{}\nstderr:\n{}",
                    server.stdout.get(),
                    server.stderr.get()
                );
            }
        }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The configuration file the server was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Replaces the configuration file's contents (atomically; see [`TempDir::write`]). Only for
    /// servers started with [`Server::start`] or [`Server::start_with`].
    pub fn write_config(&self, text: &str) {
        assert_eq!(
            self.config.parent(),
            Some(self.dir.path()),
            "write_config on a file the test does not own"
        );
        self.dir.write("limits.yaml", text);
    }

    /// Sends a signal with `kill -SIG PID` (`sig` like `HUP` or `TERM`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("cannot run kill");
        assert!(
            status.success(),
            "kill -{sig} {} failed: {status}",
            self.pid()
        );
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.get()
    }

    /// Waits until a stderr line after the first `skip_lines` lines contains `needle`; `false`
    /// if none does within `timeout`.
    pub fn wait_for_stderr(&self, needle: &str, skip_lines: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .stderr()
                .lines()
                .skip(skip_lines)
                .any(|l| l.contains(needle))
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                self.join_readers();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        let status = child.wait().ok();
        self.join_readers();
        status
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- axum-tiers at {} (config {}) stderr:\n{}---",
                self.base,
                self.config.display(),
                self.stderr.get()
            );
        }
    }
}

/// How a process run by [`run_to_exit`] ended.
#[derive(Debug)]
pub struct Exited {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Exited {
    /// The one stderr line of a refused start, after checking what every refusal of an example
    /// binary shares: a non-zero exit (not a signal), within 5 s, no panic, exactly one line on
    /// stderr, starting `PROGRAM: ` and saying something after it.
    pub fn refusal_line(&self, program: &str) -> &str {
        assert!(
            !self.status.success(),
            "exited with {} (stdout: {:?}, stderr: {:?})",
            self.status,
            self.stdout,
            self.stderr
        );
        assert!(
            self.status.code().is_some(),
            "killed by a signal: {}",
            self.status
        );
        assert!(
            self.elapsed < Duration::from_secs(5),
            "took {:?}",
            self.elapsed
        );
        for out in [&self.stdout, &self.stderr] {
            assert!(!out.contains("panicked"), "{out}");
        }
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "stderr must be one line: {:?}", self.stderr);
        let line = lines[0];
        let prefix = format!("{program}: ");
        assert!(line.starts_with(&prefix), "{line}");
        assert!(line.len() > prefix.len() + 10, "{line}");
        line
    }
}

impl Exited {
    /// Checks a `--help` run (`flag` is how it was asked): it exited 0 with nothing on stderr,
    /// its stdout holds `usage`, and each flag's one-line description holds every one of its
    /// words.
    pub fn assert_help(&self, flag: &str, usage: &str, flags: &[(&str, &[&str])]) {
        assert!(
            self.status.success(),
            "{flag}: exited with {} (stdout: {:?}, stderr: {:?})",
            self.status,
            self.stdout,
            self.stderr
        );
        assert!(self.stderr.is_empty(), "{flag}: stderr: {}", self.stderr);
        assert!(self.stdout.contains(usage), "{}", self.stdout);
        for (name, words) in flags {
            let description = help_description(&self.stdout, name);
            for word in *words {
                assert!(
                    description.contains(word),
                    "{name}: `{word}` missing: {description}"
                );
            }
        }
    }
}

/// Serves `app` on a free port of 127.0.0.1 in a task of the current runtime: its address.
pub async fn serve_on_loopback(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a local address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Runs `axum-tiers ARGS` and waits for it to exit (at most [`EXIT_TIMEOUT`]; a process still
/// running then is killed and the test fails).
pub fn run_to_exit(args: &[&str]) -> Exited {
    // Built first: the time bound is the process's, not Cargo's (which may wait for the build
    // lock while other tests build).
    let mut command = axum_tiers_command(args);
    let started = Instant::now();
    let mut child = command.spawn().expect("cannot start axum-tiers");
    let stdout = Collected::default();
    let stderr = Collected::default();
    let readers = [
        stdout.spawn(child.stdout.take().expect("piped"), |_| {}),
        stderr.spawn(child.stderr.take().expect("piped"), |_| {}),
    ];
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > EXIT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "axum-tiers {args:?} still running after {EXIT_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                stdout.get(),
                stderr.get()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    for reader in readers {
        let _ = reader.join();
    }
    Exited {
        status,
        stdout: stdout.get(),
        stderr: stderr.get(),
        elapsed,
    }
}

/// The one-line description `--help` gives `flag`: the text after `--flag <VALUE>` on the line
/// that lists it. Panics, showing the help, if the flag is not listed or has no description.
pub fn help_description<'a>(help: &'a str, flag: &str) -> &'a str {
    let line = help
        .lines()
        .map(str::trim_start)
        .find(|line| {
            line.strip_prefix(flag)
                .is_some_and(|rest| rest.starts_with([' ', '=']))
        })
        .unwrap_or_else(|| panic!("`{flag}` is not listed in the help:\n{help}"));
    let rest = line[flag.len()..].trim_start();
    // The value's name, `<PATH>`, when the flag takes one.
    let rest = match rest.strip_prefix('<') {
        Some(value) => value.split_once('>').map_or("", |(_, after)| after),
        None => rest,
    };
    let description = rest.trim();
    assert!(
        description.split_whitespace().count() >= 3,
        "`{flag}` has no description in the help:\n{help}"
    );
    description
}

/// An HTTP client for loopback tests: no proxies (whatever `HTTP_PROXY` says), 10 s timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("cannot build the HTTP client")
}

/// A received response, body included.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body, as text.
    pub body: String,
}

impl Reply {
    /// A header's value as text (`None` when absent or not ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A header that must be present and hold a non-negative integer.
    pub fn header_u64(&self, name: &str) -> u64 {
        let value = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"));
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: `{value}` is not an integer"))
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Sends a request and reads the whole response; panics on transport errors (a test server that
/// does not answer is a failure, not a status).
pub async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("HTTP request failed");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.expect("cannot read the body");
    Reply {
        status,
        headers,
        body,
    }
}

/// The value of the Prometheus sample `name{labels}` in exposition text: the labels must match
/// exactly (same set, any order). `None` when there is no such sample.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, got) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let mut got: Vec<String> = if got.is_empty() {
                Vec::new()
            } else {
                got.split(',').map(str::to_owned).collect()
            };
            got.sort();
            (got == want).then(|| value.parse().ok()).flatten()
        })
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
pub async fn poll<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

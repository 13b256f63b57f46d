//! A single `redis-server` child process.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::resp::{self, Reply};

/// How long [`RedisServer::cmd`] waits for connect, write and read (each).
const CMD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a freshly spawned server gets to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of each probe while polling for readiness.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Attempts (each with a new port) for [`RedisServer::start`].
const START_ATTEMPTS: u32 = 5;
/// Attempts (same port) for [`RedisServer::restart`].
const RESTART_ATTEMPTS: u32 = 5;
/// Lines of log printed when a server is dropped during a panic.
const PANIC_LOG_LINES: usize = 50;
/// Cluster bus port = client port + this.
const BUS_PORT_OFFSET: u16 = 10_000;
/// Highest client port usable for a cluster node (its bus port must fit too).
const MAX_CLUSTER_PORT: u16 = 55_000;
/// Cluster node timeout in milliseconds: small, so tests notice failures and recover fast.
pub(crate) const CLUSTER_NODE_TIMEOUT_MS: u32 = 2_000;

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LOG_FILE: &str = "redis.log";
const NODES_FILE: &str = "nodes.conf";
const SENTINEL_CONF: &str = "sentinel.conf";

/// A single `redis-server` child process listening on `127.0.0.1` and a free port.
///
/// Each server has its own temporary directory (see [`dir`](Self::dir)) holding its log
/// and, for cluster nodes, its `nodes.conf`. Nothing is persisted: no RDB snapshots, no
/// AOF, so [`restart`](Self::restart) brings the server back empty.
///
/// Dropping the value kills the process (`SIGKILL`) and reaps it. The temporary directory
/// is removed, unless the thread is panicking: then it is kept for inspection and the tail
/// of the log is printed to stderr together with the directory's path.
#[derive(Debug)]
pub struct RedisServer {
    program: PathBuf,
    port: u16,
    dir: PathBuf,
    mode: Mode,
    /// `requirepass` (and `masterauth`, so it can replicate from a node with the same
    /// password); [`cmd`](Self::cmd) authenticates with it.
    password: Option<String>,
    child: Option<Child>,
    /// Kills `child` if this process dies without dropping us (see [`Watchdog`]).
    watchdog: Option<Watchdog>,
}

/// What a [`RedisServer`] runs as.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    /// A standalone master.
    Standalone,
    /// A node with cluster mode on.
    Cluster,
    /// A replica of the server on `127.0.0.1:PORT` (`--replicaof`).
    Replica(u16),
    /// A sentinel (`redis-server sentinel.conf --sentinel`); the string holds the `sentinel ...`
    /// lines written to its config file before the first start.
    Sentinel(String),
}

/// A `sh` that waits on a pipe from this process and, when the pipe closes without a word, kills
/// the server with `SIGKILL`. A pipe closes however its owner ends, a `SIGKILL` or a panic in
/// another thread included, when `Drop` never runs; so a test process killed by a timeout
/// leaves no `redis-server` behind. Best effort: without `sh` there is no watchdog.
#[derive(Debug)]
struct Watchdog {
    shell: Child,
}

impl Watchdog {
    fn guard(pid: u32) -> Option<Watchdog> {
        Command::new("sh")
            .arg("-c")
            // `read` returns at end of input: the pipe's owner is gone.
            .arg(r#"read -r _ || kill -9 "$0" 2>/dev/null"#)
            .arg(pid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .map(|shell| Watchdog { shell })
    }

    /// Stands down without killing anything: the shell is killed before its pipe closes.
    fn dismiss(mut self) {
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

impl RedisServer {
    /// Starts a standalone server and waits until it answers `PING`.
    ///
    /// If the process dies or never becomes ready (say another process grabbed the port
    /// first), it is retried a few times on a new port.
    ///
    /// # Errors
    ///
    /// [`Error::NotInstalled`] if `redis-server` is not on `PATH`; otherwise the error of
    /// the last failed attempt (usually [`Error::NotReady`], with the log tail).
    pub fn start() -> Result<RedisServer> {
        Self::start_mode(Mode::Standalone)
    }

    /// Starts a server with cluster mode enabled (not yet part of any cluster).
    pub(crate) fn start_cluster_node() -> Result<RedisServer> {
        Self::start_mode(Mode::Cluster)
    }

    /// Starts a server in `mode` (retried on new ports as [`start`](Self::start) is).
    pub(crate) fn start_mode(mode: Mode) -> Result<RedisServer> {
        Self::start_secured(mode, None)
    }

    /// Starts a standalone server that asks for `password` (`requirepass`); [`cmd`](Self::cmd)
    /// sends it (`AUTH`) before each command.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with_password(password: &str) -> Result<RedisServer> {
        Self::start_secured(Mode::Standalone, Some(password))
    }

    /// Starts a server in `mode`, with `password` as its `requirepass` and `masterauth`.
    pub(crate) fn start_secured(mode: Mode, password: Option<&str>) -> Result<RedisServer> {
        let cluster = matches!(mode, Mode::Cluster);
        let program = find_program("redis-server")?;
        let mut attempt = 1;
        loop {
            let mut server = RedisServer {
                program: program.clone(),
                port: free_port(cluster)?,
                dir: make_temp_dir()?,
                mode: mode.clone(),
                password: password.map(str::to_owned),
                child: None,
                watchdog: None,
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                // A program that cannot be spawned will not get better on another port.
                Err(e @ Error::Spawn { .. }) => return Err(e),
                // Dropping `server` removes its directory; the error carries the log tail.
                Err(e) if attempt >= START_ATTEMPTS => return Err(e),
                Err(_) => attempt += 1,
            }
        }
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{LOCALHOST}:{}", self.port)
    }

    /// The server's socket address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((LOCALHOST, self.port))
    }

    /// The server's own temporary directory (working dir, `redis.log`, `nodes.conf`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The contents of the server's log file (all runs), or `""` if it cannot be read.
    pub fn log(&self) -> String {
        fs::read(self.dir.join(LOG_FILE))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            // Exited (and now reaped), or cannot be queried: treat as gone.
            Ok(Some(_)) | Err(_) => {
                self.child = None;
                if let Some(watchdog) = self.watchdog.take() {
                    watchdog.dismiss();
                }
                false
            }
        }
    }

    /// Whether a process was started and not [`stop`](Self::stop)ped since (without reaping or
    /// probing it: a paused server counts as started).
    pub(crate) fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process with `SIGKILL` and waits for it, so no zombie is left and the port
    /// is closed when this returns. Idempotent. The port and directory are kept, ready for
    /// [`restart`](Self::restart).
    pub fn stop(&mut self) {
        // First, so it cannot kill a process that later reuses the server's pid.
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.dismiss();
        }
        if let Some(mut child) = self.child.take() {
            // Fails only if the process already exited, which is what we want anyway.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process with `SIGSTOP`: its port stays open and the kernel keeps accepting
    /// connections and queueing what clients send, but nothing is answered, as with a server
    /// stuck or a host that hangs. [`resume`](Self::resume) lets it run the queued commands.
    /// Dropping a paused server kills it as usual.
    ///
    /// # Errors
    ///
    /// [`Error::Command`] if the server is not running or `kill` fails.
    pub fn pause(&mut self) -> Result<()> {
        self.signal("STOP")
    }

    /// Lets a [`pause`](Self::pause)d process run again (`SIGCONT`).
    ///
    /// # Errors
    ///
    /// [`Error::Command`] if the server is not running or `kill` fails.
    pub fn resume(&mut self) -> Result<()> {
        self.signal("CONT")
    }

    fn signal(&mut self, signal: &str) -> Result<()> {
        let command = format!("kill -{signal} <redis-server on port {}>", self.port);
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return Err(Error::Command {
                command,
                status: "not run".to_owned(),
                output: "the server is not running".to_owned(),
            });
        };
        let output = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .output()?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::Command {
                command,
                status: output.status.to_string(),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
    }

    /// Stops the server if it is running, then starts it again on the same port with the
    /// same directory (and, for a cluster node, the same `nodes.conf`, so it rejoins), and
    /// waits until it answers `PING`. Data is gone: nothing is persisted.
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] (with the log tail) if it did not come back after a few attempts,
    /// e.g. because another process took the port meanwhile.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let mut attempt = 1;
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e @ Error::Spawn { .. }) => return Err(e),
                Err(e) if attempt >= RESTART_ATTEMPTS => return Err(e),
                Err(_) => {
                    thread::sleep(Duration::from_millis(200) * attempt);
                    attempt += 1;
                }
            }
        }
    }

    /// Sends one command over a fresh TCP connection and returns the reply.
    ///
    /// Connecting, writing and reading are each bounded by a 5 s timeout. A Redis error
    /// reply is `Ok(Reply::Error(..))`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the server cannot be reached (e.g. it is stopped) or times out,
    /// [`Error::Protocol`] if the reply is not valid RESP2.
    pub fn cmd(&self, args: &[&str]) -> Result<Reply> {
        self.cmd_timeout(args, CMD_TIMEOUT)
    }

    /// [`cmd`](Self::cmd) with a custom timeout.
    pub(crate) fn cmd_timeout(&self, args: &[&str], timeout: Duration) -> Result<Reply> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        resp::request(self.addr(), self.password.as_deref(), &args, timeout)
    }

    fn args(&self) -> Result<Vec<OsString>> {
        let mut args: Vec<OsString> = Vec::new();
        if let Mode::Sentinel(lines) = &self.mode {
            // A sentinel needs a config file it can rewrite; kept across restarts.
            let conf = self.dir.join(SENTINEL_CONF);
            if !conf.exists() {
                fs::write(&conf, lines)?;
            }
            args.push(conf.into_os_string());
            args.push("--sentinel".into());
        }
        let mut push = |key: &str, value: &OsStr| {
            args.push(key.into());
            args.push(value.to_owned());
        };
        push("--port", self.port.to_string().as_ref());
        push("--bind", "127.0.0.1".as_ref());
        if !matches!(self.mode, Mode::Sentinel(_)) {
            push("--save", "".as_ref());
            push("--appendonly", "no".as_ref());
        }
        push("--dir", self.dir.as_os_str());
        push("--logfile", self.dir.join(LOG_FILE).as_os_str());
        push("--daemonize", "no".as_ref());
        push("--protected-mode", "no".as_ref());
        if let Some(password) = &self.password {
            push("--requirepass", password.as_ref());
            push("--masterauth", password.as_ref());
        }
        if matches!(self.mode, Mode::Cluster) {
            push("--cluster-enabled", "yes".as_ref());
            push(
                "--cluster-config-file",
                self.dir.join(NODES_FILE).as_os_str(),
            );
            push(
                "--cluster-node-timeout",
                CLUSTER_NODE_TIMEOUT_MS.to_string().as_ref(),
            );
            // A replica may always be promoted, however long ago it last heard from its master
            // (the default refuses replicas whose data is older than 10 node timeouts), and
            // replicas stay with the master `redis-cli` paired them with.
            push("--cluster-replica-validity-factor", "0".as_ref());
            push("--cluster-replica-no-failover", "no".as_ref());
            push("--cluster-allow-replica-migration", "no".as_ref());
            // A replica's first sync starts at once, not after the default 5 s wait for more
            // replicas to share the snapshot.
            push("--repl-diskless-sync-delay", "0".as_ref());
        }
        if let Mode::Replica(master) = self.mode {
            // Host and port are two words: two arguments, or redis-server quotes them as one.
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.to_string().into(),
            ]);
        }
        Ok(args)
    }

    /// Spawns the process and waits until it is ready; on failure it is killed again.
    fn launch(&mut self) -> Result<()> {
        debug_assert!(self.child.is_none());
        let child = Command::new(&self.program)
            .args(self.args()?)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: self.program.display().to_string(),
                source,
            })?;
        let pid = child.id();
        self.child = Some(child);
        self.watchdog = Watchdog::guard(pid);
        let ready = self.wait_ready(pid);
        if ready.is_err() {
            self.stop();
        }
        ready
    }

    /// Polls `PING` until `PONG`, then checks (via `INFO server`) that the answer came from
    /// our process and not from another server that owns the port.
    fn wait_ready(&mut self, pid: u32) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                if let Some(watchdog) = self.watchdog.take() {
                    watchdog.dismiss();
                }
                return Err(self.not_ready(format!(
                    "redis-server on port {} exited during startup ({status})",
                    self.port
                )));
            }
            let pong = matches!(
                self.cmd_timeout(&["PING"], PROBE_TIMEOUT),
                Ok(Reply::Status(ref s)) if s == "PONG"
            );
            // If INFO fails, keep polling: the next round notices if our process died.
            let info = if pong {
                self.cmd_timeout(&["INFO", "server"], PROBE_TIMEOUT).ok()
            } else {
                None
            };
            if let Some(info) = info {
                let owner = info
                    .as_str()
                    .and_then(|text| info_field(text, "process_id"));
                if owner == Some(pid.to_string().as_str()) {
                    return Ok(());
                }
                return Err(self.not_ready(format!(
                    "port {} is served by another redis-server (process_id {}), not ours ({pid})",
                    self.port,
                    owner.unwrap_or("?")
                )));
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}",
                    self.port
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn not_ready(&self, what: String) -> Error {
        Error::NotReady {
            what: format!("{what} (dir {})", self.dir.display()),
            log: self.log_tail(PANIC_LOG_LINES),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "--- tollgate-testkit: redis-server on port {} (dir kept: {}), last {PANIC_LOG_LINES} log lines ---\n{}\n--- end of log ---",
                self.port,
                self.dir.display(),
                self.log_tail(PANIC_LOG_LINES)
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Looks up the value of `field` in `INFO`/`CLUSTER INFO` output (`field:value` lines).
pub(crate) fn info_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == field).then(|| value.trim())
    })
}

/// Finds `program` on `PATH`.
pub(crate) fn find_program(program: &'static str) -> Result<PathBuf> {
    find_program_in(program, std::env::var_os("PATH").as_deref())
}

/// Finds `program` in the directories of the `PATH`-style list `path`.
pub(crate) fn find_program_in(program: &'static str, path: Option<&OsStr>) -> Result<PathBuf> {
    path.into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or(Error::NotInstalled { program })
}

fn is_executable(path: &Path) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

/// Creates a fresh directory `tollgate-testkit-<pid>-<counter>-<nanos>` in the temp dir.
fn make_temp_dir() -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "tollgate-testkit-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(name);
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Picks a port that is free right now (for cluster nodes: one <= 55000 whose bus port,
/// port + 10000, is free too). Another process may still take it before redis-server binds
/// it; callers retry.
fn free_port(cluster: bool) -> Result<u16> {
    // Let the kernel choose.
    for _ in 0..200 {
        let listener = TcpListener::bind((LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if !cluster {
            return Ok(port);
        }
        if port <= MAX_CLUSTER_PORT
            && TcpListener::bind((LOCALHOST, port + BUS_PORT_OFFSET)).is_ok()
        {
            return Ok(port);
        }
    }
    // The ephemeral range is (mostly) above 55000: probe pseudo-random ports ourselves.
    random_cluster_port()
}

/// Probes pseudo-random ports in 10000..=55000 for one whose bus port is free too.
fn random_cluster_port() -> Result<u16> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut state = (u64::from(std::process::id()) ^ nanos) | 1;
    for _ in 0..2_000 {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = 10_000 + (state % u64::from(MAX_CLUSTER_PORT - 10_000 + 1)) as u16;
        if let Ok(_listener) = TcpListener::bind((LOCALHOST, port))
            && TcpListener::bind((LOCALHOST, port + BUS_PORT_OFFSET)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free port (with free cluster bus port) found",
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_is_not_installed() {
        let err =
            find_program_in("redis-server", Some(OsStr::new("/nonexistent/tollgate"))).unwrap_err();
        assert!(matches!(
            err,
            Error::NotInstalled {
                program: "redis-server"
            }
        ));
        assert!(matches!(
            find_program_in("redis-cli", None),
            Err(Error::NotInstalled {
                program: "redis-cli"
            })
        ));
    }

    #[test]
    fn info_fields() {
        let text = "# Cluster\r\ncluster_state:ok\r\ncluster_known_nodes:3\r\n";
        assert_eq!(info_field(text, "cluster_state"), Some("ok"));
        assert_eq!(info_field(text, "cluster_known_nodes"), Some("3"));
        assert_eq!(info_field(text, "cluster_size"), None);
    }

    #[test]
    fn cluster_ports_leave_room_for_the_bus() {
        for _ in 0..20 {
            let port = free_port(true).unwrap();
            assert!(port <= MAX_CLUSTER_PORT);
            let port = random_cluster_port().unwrap();
            assert!((10_000..=MAX_CLUSTER_PORT).contains(&port));
        }
    }

    #[test]
    fn temp_dirs_are_unique() {
        let a = make_temp_dir().unwrap();
        let b = make_temp_dir().unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        fs::remove_dir(a).unwrap();
        fs::remove_dir(b).unwrap();
    }
}

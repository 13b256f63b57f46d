//! An axum server with tier-based rate limits from YAML.
//!
//! Run with:
//!
//! ```text
//! cargo run -p example-axum-tiers
//! curl -i localhost:3000/api/hello                                  # anonymous: 5 at once
//! curl -i -H 'X-Api-Key: demo-basic-key' localhost:3000/api/hello   # basic: 20 at once
//! curl -i -X POST -H 'X-Api-Key: demo-pro-key' localhost:3000/api/reports   # costs 5
//! curl -s localhost:3000/metrics | grep rate_limiter
//! curl -i 'localhost:3000/api/slow?ms=500'                          # answers after 500 ms
//! curl -i -X POST -d password=letmein localhost:3000/api/login      # 200; a wrong one 401
//! ```
//!
//! `axum-tiers [--config PATH] [--addr HOST:PORT] [--redis URL] [--header-read-timeout SECS]`:
//! the limits come from `examples/axum-tiers/limits.yaml` by default; `--redis` keeps the state in
//! Redis (shared by every server started with the same URL). `kill -HUP` reloads the file,
//! keeping the buckets. A connection that does not send a whole request head within the header
//! read timeout (10 s by default; idle keep-alive connections included) is closed. `--help` lists
//! the flags; a bad flag or value is one line on stderr naming it (exit code 2), as is a bad
//! configuration file or a taken port (exit code 1).

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tollgate::config::{Config, StoreConfig};
use tollgate::inbound::{ApiKeys, PolicyHandle, RateLimitDecision, RateLimitLayer};

#[path = "../../shared/cli.rs"]
mod cli;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// An axum server with tier-based rate limits from YAML: `kill -HUP` reloads the file, keeping
/// the buckets.
#[derive(Debug, PartialEq, Eq, clap::Parser)]
#[command(
    name = "axum-tiers",
    version,
    override_usage = "axum-tiers [--config PATH] [--addr HOST:PORT] [--redis URL] \
                      [--header-read-timeout SECS]"
)]
struct Args {
    /// The rate limits, tiers and API keys (YAML).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "examples/axum-tiers/limits.yaml"
    )]
    config: PathBuf,
    /// Where to listen; port 0 picks a free one (the `listening on` line says which).
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:3000",
        value_parser = parse_addr
    )]
    addr: String,
    /// Keep the buckets in this Redis (redis://host:port), whatever store the file names.
    #[arg(long, value_name = "URL", value_parser = parse_redis_url)]
    redis: Option<String>,
    /// Seconds a connection has to send a request head, idle keep-alive included (up to 3600).
    #[arg(
        long,
        value_name = "SECS",
        default_value = "10",
        value_parser = parse_header_read_timeout,
        allow_negative_numbers = true
    )]
    header_read_timeout: Duration,
}

/// `--redis`: a URL redis-rs can connect to (`redis://`, `rediss://`, `redis+unix://`), checked
/// here so a typo is the flag's error, not the configuration file's.
fn parse_redis_url(text: &str) -> Result<String, String> {
    use redis::IntoConnectionInfo as _;
    text.into_connection_info()
        .map(|_| text.to_owned())
        .map_err(|e| format!("invalid redis url `{text}`: {e}"))
}

/// `--addr`: `HOST:PORT`, an IP address (IPv6 in brackets) or a host name and a port number. The
/// name is resolved when the server binds.
fn parse_addr(text: &str) -> Result<String, String> {
    if text.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(text.to_owned());
    }
    let shape = "expected HOST:PORT, such as 127.0.0.1:3000 or localhost:0";
    let (host, port) = text.rsplit_once(':').ok_or(shape)?;
    if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
        return Err(shape.to_owned());
    }
    port.parse::<u16>()
        .map_err(|_| format!("`{port}` is not a port number (0 to 65535)"))?;
    Ok(text.to_owned())
}

/// `--header-read-timeout`: seconds (fractions allowed), more than 0 and at most an hour.
fn parse_header_read_timeout(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs > 0.0 && *secs <= 3600.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| "not a number of seconds between 0 and 3600".to_owned())
}

/// The application: the limited API under the rate-limit layer, `/healthz` and `/metrics` beside
/// it (never limited), 404 for anything else.
pub fn app(state: AppState, limiter: RateLimitLayer<ApiKeys>) -> Router {
    let api = Router::new()
        .route("/api/hello", get(hello))
        .route("/api/reports", post(report))
        .route("/api/search", get(search))
        .route("/api/slow", get(slow))
        .route("/api/login", post(login))
        .route_layer(limiter);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(state)
}

async fn hello(decision: Option<Extension<RateLimitDecision>>) -> String {
    match decision {
        Some(Extension(d)) => format!("hello, {} caller\n", d.tier),
        None => "hello\n".to_owned(),
    }
}

async fn report() -> (StatusCode, &'static str) {
    (StatusCode::ACCEPTED, "report queued\n")
}

async fn search() -> &'static str {
    "no results\n"
}

/// The longest `/api/slow` waits, whatever `ms` asks.
const SLOWEST: Duration = Duration::from_secs(60);

/// `GET /api/slow?ms=N`: answers after N milliseconds (200 by default, at most a minute). A bad
/// `ms` is a 400 naming it.
async fn slow(RawQuery(query): RawQuery) -> Result<String, (StatusCode, String)> {
    let ms = match query_value(query.as_deref().unwrap_or(""), "ms") {
        None => 200,
        Some(text) => text.parse::<u64>().map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                format!("ms must be a whole number of milliseconds, not `{text}`\n"),
            )
        })?,
    };
    let wait = Duration::from_millis(ms).min(SLOWEST);
    tokio::time::sleep(wait).await;
    Ok(format!("answered after {} ms\n", wait.as_millis()))
}

/// `POST /api/login`: `password=letmein` in the query or the form body answers 200, anything
/// else 401 (the route charges only failures: see limits.yaml).
async fn login(RawQuery(query): RawQuery, body: String) -> (StatusCode, &'static str) {
    let password = query_value(query.as_deref().unwrap_or(""), "password")
        .or_else(|| query_value(&body, "password"));
    match password {
        Some("letmein") => (StatusCode::OK, "welcome\n"),
        _ => (StatusCode::UNAUTHORIZED, "wrong password\n"),
    }
}

/// The value of `name` in a query string or form body (`a=1&b=2`), taken as written.
fn query_value<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.trim_end_matches(['\r', '\n'])
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// Reloads the configuration on every SIGHUP: new limits and keys take effect, bucket state stays;
/// a broken file is refused and the running configuration stays. What a reload cannot change
/// (the store, its failure policy and timeout) is said in the log and stays as it was until a
/// restart. `redis` is the `--redis` override, applied to every reload as at start.
#[cfg(unix)]
fn reload_on_sighup(
    path: PathBuf,
    redis: Option<String>,
    running: Config,
    policy: PolicyHandle,
    keys: ApiKeys,
) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups =
        signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match load(&path, redis.as_deref()) {
                Ok(config) => {
                    policy.set(config.policy.clone());
                    keys.replace_with(&config.keys);
                    let kept = config.needs_restart(&running);
                    if kept.is_empty() {
                        tracing::info!(config = %path.display(), "configuration reloaded");
                    } else {
                        tracing::warn!(
                            config = %path.display(),
                            "configuration reloaded, except what needs a restart; still in force: {}",
                            kept.join("; ")
                        );
                    }
                }
                Err(e) => tracing::error!("configuration reload refused, keeping the old one: {e}"),
            }
        }
    });
    Ok(())
}

/// Loads the configuration file, with the `--redis` override.
fn load(path: &std::path::Path, redis: Option<&str>) -> Result<Config, String> {
    let mut config = Config::load(path).map_err(|e| e.to_string())?;
    if let Some(url) = redis {
        config.store = StoreConfig::Redis {
            url: url.to_owned(),
            prefix: "tollgate".to_owned(),
        };
    }
    Ok(config)
}

/// Serves `app` on `listener` until `shutdown` ends, then lets open connections finish (for at
/// most 10 s). Each request carries its connection's peer address (`ConnectInfo`), which the rate
/// limiter keys anonymous callers by. A connection must send its request head within
/// `header_read_timeout` (the first byte included), or it is closed.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use tower_service::Service;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(header_read_timeout);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                app.clone().call(request)
            });
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // The protocol is told from the first bytes, before hyper's own header timeout
            // runs: a client that sends nothing at all is timed out here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => {
                    tracing::debug!(%peer, "closing a connection that sent nothing");
                    return;
                }
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing them");
    }
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// Installs the Prometheus recorder behind `/metrics`: the latency metrics as histograms with
/// buckets suited to their range (`_bucket` series a fleet can aggregate), every metric
/// described (its `# HELP` line).
fn install_metrics() -> Result<PrometheusHandle, String> {
    use metrics_exporter_prometheus::Matcher;
    use tollgate::metrics as m;
    let histograms = [
        (m::STORE_LATENCY_SECONDS, m::STORE_LATENCY_BUCKETS),
        (m::WAIT_SECONDS, m::WAIT_BUCKETS),
    ];
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in histograms {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .map_err(|e| format!("cannot set the buckets of {name}: {e}"))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    m::describe();
    Ok(handle)
}

async fn run(args: Args) -> Result<(), String> {
    let config = load(&args.config, args.redis.as_deref())?;
    let metrics = install_metrics()?;
    // `hello` shows the caller's decision: the layer puts it in the request (off by default).
    let limiter = config
        .layer_builder()
        .map_err(|e| e.to_string())?
        .decision_extension(true)
        .build()
        .map_err(|e| e.to_string())?;
    #[cfg(unix)]
    reload_on_sighup(
        args.config.clone(),
        args.redis.clone(),
        config.clone(),
        limiter.policy().clone(),
        config.keys.clone(),
    )?;

    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    println!("listening on http://{local}");
    tracing::info!(store = ?config.store, "serving");
    serve(
        listener,
        app(AppState { metrics }, limiter),
        args.header_read_timeout,
        shutdown(),
    )
    .await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match cli::parse::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axum-tiers: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(list: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("axum-tiers").chain(list.iter().copied()))
    }

    #[test]
    fn flags_and_defaults() {
        let a = args(&[
            "--config",
            "x.yaml",
            "--addr=0.0.0.0:0",
            "--redis",
            "redis://h",
        ])
        .expect("valid");
        assert_eq!(
            a,
            Args {
                config: "x.yaml".into(),
                addr: "0.0.0.0:0".into(),
                redis: Some("redis://h".into()),
                header_read_timeout: Duration::from_secs(10),
            }
        );
        let a = args(&[]).expect("valid");
        assert_eq!(a.config, PathBuf::from("examples/axum-tiers/limits.yaml"));
        assert_eq!((a.addr.as_str(), a.redis), ("127.0.0.1:3000", None));
        assert_eq!(
            args(&["--header-read-timeout", "1.5"])
                .expect("valid")
                .header_read_timeout,
            Duration::from_millis(1500)
        );
        for good in ["localhost:0", "[::1]:8080", "example.com:65535"] {
            assert_eq!(args(&["--addr", good]).expect(good).addr, good);
        }
    }

    #[test]
    fn mistakes() {
        assert!(args(&["--port", "1"]).is_err());
        assert!(args(&["--addr"]).is_err());
        for bad in [
            "nowhere",
            ":80",
            "host:",
            "host:http",
            "host:65536",
            "::1:80",
            "a b:1",
        ] {
            assert!(args(&["--addr", bad]).is_err(), "{bad}");
        }
        for bad in ["0", "-1", "soon", "NaN", "inf", "1e9"] {
            assert!(args(&["--header-read-timeout", bad]).is_err(), "{bad}");
        }
    }
}

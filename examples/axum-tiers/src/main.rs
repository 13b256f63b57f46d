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
//! ```
//!
//! `axum-tiers [--config PATH] [--addr HOST:PORT] [--redis URL]`: the limits come from
//! `examples/axum-tiers/limits.yaml` by default; `--redis` keeps the state in Redis (shared by
//! every server started with the same URL). `kill -HUP` reloads the file, keeping the buckets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tollgate::config::{Config, StoreConfig};
use tollgate::inbound::{ApiKeys, PolicyHandle, RateLimitDecision, RateLimitLayer};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// The command line.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    config: PathBuf,
    addr: String,
    redis: Option<String>,
}

const USAGE: &str = "usage: axum-tiers [--config PATH] [--addr HOST:PORT] [--redis URL]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        config: PathBuf::from("examples/axum-tiers/limits.yaml"),
        addr: "127.0.0.1:3000".to_owned(),
        redis: None,
    };
    while let Some(flag) = args.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value ({USAGE})"))
        };
        match name.as_str() {
            "--config" => parsed.config = PathBuf::from(value()?),
            "--addr" => parsed.addr = value()?,
            "--redis" => parsed.redis = Some(value()?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown flag `{other}` ({USAGE})")),
        }
    }
    Ok(parsed)
}

/// The application: the limited API under the rate-limit layer, `/healthz` and `/metrics` beside
/// it (never limited), 404 for anything else.
pub fn app(state: AppState, limiter: RateLimitLayer<ApiKeys>) -> Router {
    let api = Router::new()
        .route("/api/hello", get(hello))
        .route("/api/reports", post(report))
        .route("/api/search", get(search))
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

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// Reloads the configuration on every SIGHUP: new limits and keys take effect, bucket state stays;
/// a broken file is refused and the running configuration stays.
#[cfg(unix)]
fn reload_on_sighup(path: PathBuf, policy: PolicyHandle, keys: ApiKeys) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups =
        signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match Config::load(&path) {
                Ok(config) => {
                    policy.set(config.policy);
                    keys.replace_with(&config.keys);
                    tracing::info!(config = %path.display(), "configuration reloaded");
                }
                Err(e) => tracing::error!("configuration reload refused, keeping the old one: {e}"),
            }
        }
    });
    Ok(())
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

async fn run() -> Result<(), String> {
    let args = parse_args(std::env::args().skip(1))?;
    let mut config = Config::load(&args.config).map_err(|e| e.to_string())?;
    if let Some(url) = args.redis {
        config.store = StoreConfig::Redis {
            url,
            prefix: "tollgate".to_owned(),
        };
    }
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let limiter = config.layer().map_err(|e| e.to_string())?;
    #[cfg(unix)]
    reload_on_sighup(
        args.config.clone(),
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
    axum::serve(
        listener,
        app(AppState { metrics }, limiter).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown())
    .await
    .map_err(|e| format!("server error: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axum-tiers: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn flags() {
        let a = args(&[
            "--config",
            "x.yaml",
            "--addr=0.0.0.0:0",
            "--redis",
            "redis://h",
        ])
        .unwrap();
        assert_eq!(
            a,
            Args {
                config: "x.yaml".into(),
                addr: "0.0.0.0:0".into(),
                redis: Some("redis://h".into())
            }
        );
        assert!(
            args(&["--port", "1"])
                .unwrap_err()
                .contains("unknown flag `--port`")
        );
        assert!(
            args(&["--addr"])
                .unwrap_err()
                .contains("--addr needs a value")
        );
        assert_eq!(args(&[]).unwrap().addr, "127.0.0.1:3000");
    }
}

//! A `reqwest` client that stays within an upstream's rate limit, alone or with a fleet.
//!
//! Run with (against the example server, started with `cargo run -p example-axum-tiers`):
//!
//! ```text
//! cargo run -p example-reqwest-client -- --url http://127.0.0.1:3000/api/hello --requests 20 --rate 10/m --burst 5
//! ```
//!
//! `reqwest-client --url URL [--requests N] [--rate N/s|N/m] [--burst B] [--concurrency C]
//! [--max-wait SECS] [--redis URL --bucket NAME]`
//!
//! Sends N GET requests through `reqwest::Client` wrapped in tollgate's outbound layer: each
//! waits for a token (up to `--max-wait`), a 429 pauses the bucket for the upstream's
//! `Retry-After` (fleet-wide with `--redis`: every process sharing `--bucket` pauses) and is
//! retried after the pause (3 attempts at most). The last line of stdout is one JSON object:
//! `{"sent":N,"ok":N,"rate_limited_locally":N,"upstream_429":N,"errors":N,"elapsed_ms":N}`:
//! `sent` calls, `ok` 2xx answers, `rate_limited_locally` calls refused by the client's own bucket
//! (`RateLimited`, never sent), `upstream_429` every 429 received (retried ones included),
//! `errors` transport failures, other statuses and calls still refused after the retries.
//!
//! `--help` lists the flags and their defaults (10 requests at 10/s, burst the rate's N, 4 in
//! flight, 60 s of waiting at most). A bad flag or value is one line on stderr naming it, exit
//! code 2; a failure once running (a Redis that cannot be reached, say) exits 1.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate::core::Quota;
use tollgate::outbound::{Bucket, RateLimitLayer, RateLimited};
use tollgate::redis::RedisStore;
use tower::{Service, ServiceBuilder, ServiceExt};

#[path = "../../shared/cli.rs"]
mod cli;
#[path = "../../shared/rate.rs"]
mod rate;

/// Sends N GET requests through a rate-limited reqwest client, alone or sharing its bucket with a
/// fleet through Redis, and prints a JSON summary as its last line.
#[derive(Debug, Clone, PartialEq, clap::Parser)]
#[command(
    name = "reqwest-client",
    version,
    override_usage = "reqwest-client --url URL [--requests N] [--rate N/s|N/m] [--burst B] \
                      [--concurrency C] [--max-wait SECS] [--redis URL --bucket NAME]"
)]
struct Args {
    /// The URL every request GETs.
    #[arg(long, value_name = "URL")]
    url: reqwest::Url,
    /// How many requests to send.
    #[arg(long, value_name = "N", default_value_t = 10)]
    requests: u64,
    /// The client's rate: N per second, minute or hour (N/s, N/m, N/h).
    #[arg(
        long,
        value_name = "N/s|N/m",
        default_value = "10/s",
        value_parser = rate::parse_rate
    )]
    rate: Quota,
    /// How many requests may go at once after a quiet spell [default: the rate's N].
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u32).range(1..))]
    burst: Option<u32>,
    /// How many requests are in flight at once.
    #[arg(
        long,
        value_name = "C",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    concurrency: u32,
    /// How long a request may wait for a token before it counts as rate_limited_locally (seconds).
    #[arg(
        long,
        value_name = "SECS",
        default_value = "60",
        value_parser = parse_max_wait,
        allow_negative_numbers = true
    )]
    max_wait: Duration,
    /// Share the bucket with every client on this Redis (redis://host:port); needs --bucket.
    #[arg(long, value_name = "URL", requires = "bucket")]
    redis: Option<String>,
    /// The name of the bucket shared through --redis.
    #[arg(long, value_name = "NAME", requires = "redis")]
    bucket: Option<String>,
}

/// `--max-wait`: a number of seconds, zero or more (fractions allowed).
fn parse_max_wait(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|secs| *secs >= 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| "not a number of seconds, zero or more".to_owned())
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    ok: AtomicU64,
    rate_limited_locally: AtomicU64,
    upstream_429: AtomicU64,
    errors: AtomicU64,
}

async fn run(args: Args) -> Result<String, String> {
    let quota = match args.burst {
        Some(burst) => args
            .rate
            .with_burst(burst)
            .map_err(|e| format!("--burst: {e}"))?,
        None => args.rate,
    };
    let bucket_name = args.bucket.clone().unwrap_or_else(|| {
        args.url
            .host_str()
            .map_or_else(|| "client".to_owned(), |h| format!("client:{h}"))
    });
    let builder = RateLimitLayer::builder(Bucket::new(bucket_name, quota).fixed())
        .max_wait(args.max_wait)
        .retry_limited(2);
    let layer = match &args.redis {
        Some(url) => builder
            .store(
                RedisStore::builder(url.clone())
                    .timeout(Duration::from_millis(500))
                    .connect()
                    .await
                    .map_err(|e| format!("--redis {url}: {e}"))?,
            )
            .build(),
        None => builder.build(),
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let url = args.url;
    let counts = Arc::new(Counts::default());
    // Every 429 the upstream sends is counted, including those the layer retried after the pause.
    let seen = Arc::clone(&counts);
    let client = ServiceBuilder::new()
        .layer(layer)
        .map_response(move |response: reqwest::Response| {
            if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
                seen.upstream_429.fetch_add(1, Ordering::Relaxed);
            }
            response
        })
        .service(http);

    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (mut client, counts, next, url, total) = (
            client.clone(),
            Arc::clone(&counts),
            Arc::clone(&next),
            url.clone(),
            args.requests,
        );
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                counts.sent.fetch_add(1, Ordering::Relaxed);
                let request = reqwest::Request::new(reqwest::Method::GET, url.clone());
                let result = match client.ready().await {
                    Ok(svc) => svc.call(request).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(response) if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                        // Counted when received; still refused after the retries.
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) if response.status().is_success() => {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => {
                        tracing::warn!(status = %response.status(), "upstream error");
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.is::<RateLimited>() => {
                        counts.rate_limited_locally.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "request failed");
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.map_err(|e| format!("a worker failed: {e}"))?;
    }
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(format!(
        "{{\"sent\":{},\"ok\":{},\"rate_limited_locally\":{},\"upstream_429\":{},\"errors\":{},\"elapsed_ms\":{}}}",
        get(&counts.sent),
        get(&counts.ok),
        get(&counts.rate_limited_locally),
        get(&counts.upstream_429),
        get(&counts.errors),
        started.elapsed().as_millis()
    ))
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
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("reqwest-client: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(list: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("reqwest-client").chain(list.iter().copied()))
    }

    #[test]
    fn flags_and_defaults() {
        let a = args(&["--url", "http://x/"]).expect("valid");
        assert_eq!(a.url.as_str(), "http://x/");
        assert_eq!((a.requests, a.burst, a.concurrency), (10, None, 4));
        assert_eq!(a.rate, Quota::per_second(10).expect("a quota"));
        assert_eq!(a.max_wait, Duration::from_secs(60));
        assert_eq!((a.redis, a.bucket), (None, None));

        let a = args(&[
            "--url",
            "http://x",
            "--rate",
            "5/m",
            "--burst=2",
            "--max-wait",
            "1.5",
            "--redis",
            "redis://h",
            "--bucket",
            "b",
        ])
        .expect("valid");
        assert_eq!(a.rate, Quota::per_minute(5).expect("a quota"));
        assert_eq!(
            (a.burst, a.max_wait),
            (Some(2), Duration::from_millis(1500))
        );
        assert_eq!(
            (a.redis.as_deref(), a.bucket.as_deref()),
            (Some("redis://h"), Some("b"))
        );
    }

    #[test]
    fn mistakes() {
        for bad in [
            &[][..],
            &["--url", "not a url"],
            &["--url", "u", "--rate", "5"],
            &["--url", "http://x", "--redis", "r"],
            &["--url", "http://x", "--bucket", "b"],
            &["--url", "http://x", "--nope"],
            &["--url", "http://x", "--concurrency", "0"],
            &["--url", "http://x", "--burst", "0"],
            &["--url", "http://x", "--max-wait", "-1"],
            &["--url", "http://x", "--max-wait", "1e300"],
            &["--url", "http://x", "--max-wait", "NaN"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }
}

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

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate::core::Quota;
use tollgate::outbound::{Bucket, RateLimitLayer, RateLimited};
use tollgate::redis::RedisStore;
use tower::{Service, ServiceBuilder, ServiceExt};

const USAGE: &str = "usage: reqwest-client --url URL [--requests N] [--rate N/s|N/m] [--burst B] [--concurrency C] [--max-wait SECS] [--redis URL --bucket NAME]";

/// The command line.
#[derive(Debug, Clone, PartialEq)]
struct Args {
    url: String,
    requests: u64,
    rate: (u32, Duration),
    burst: Option<u32>,
    concurrency: usize,
    max_wait: Duration,
    redis: Option<String>,
    bucket: Option<String>,
}

fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let (n, unit) = text
        .split_once('/')
        .ok_or_else(|| format!("--rate `{text}`: expected N/s or N/m"))?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("--rate `{text}`: `{n}` is not a whole number"))?;
    let period = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(format!("--rate `{text}`: the unit must be s, m or h")),
    };
    Ok((n, period))
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut url = None;
    let mut parsed = Args {
        url: String::new(),
        requests: 10,
        rate: (10, Duration::from_secs(1)),
        burst: None,
        concurrency: 4,
        max_wait: Duration::from_secs(60),
        redis: None,
        bucket: None,
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
        let number = |v: String| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{name}: `{v}` is not a whole number"))
        };
        match name.as_str() {
            "--url" => url = Some(value()?),
            "--requests" => parsed.requests = number(value()?)?,
            "--rate" => parsed.rate = parse_rate(&value()?)?,
            "--burst" => {
                parsed.burst = Some(
                    u32::try_from(number(value()?)?)
                        .map_err(|_| "--burst is too large".to_owned())?,
                )
            }
            "--concurrency" => {
                parsed.concurrency = usize::try_from(number(value()?)?)
                    .map_err(|_| "--concurrency is too large".to_owned())?
                    .max(1)
            }
            "--max-wait" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .map_err(|_| format!("--max-wait: `{v}` is not a number of seconds"))?;
                if !secs.is_finite() || secs < 0.0 {
                    return Err(format!("--max-wait: `{v}` is not a number of seconds"));
                }
                parsed.max_wait = Duration::from_secs_f64(secs);
            }
            "--redis" => parsed.redis = Some(value()?),
            "--bucket" => parsed.bucket = Some(value()?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown flag `{other}` ({USAGE})")),
        }
    }
    parsed.url = url.ok_or_else(|| format!("--url is required ({USAGE})"))?;
    if parsed.redis.is_some() != parsed.bucket.is_some() {
        return Err("--redis and --bucket go together".to_owned());
    }
    Ok(parsed)
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    ok: AtomicU64,
    rate_limited_locally: AtomicU64,
    upstream_429: AtomicU64,
    errors: AtomicU64,
}

async fn run() -> Result<String, String> {
    let args = parse_args(std::env::args().skip(1))?;
    let (n, period) = args.rate;
    let mut quota = Quota::per_period(n, period).map_err(|e| format!("--rate: {e}"))?;
    if let Some(burst) = args.burst {
        quota = quota
            .with_burst(burst)
            .map_err(|e| format!("--burst: {e}"))?;
    }
    let bucket_name = args.bucket.clone().unwrap_or_else(|| {
        reqwest::Url::parse(&args.url)
            .ok()
            .and_then(|u| u.host_str().map(|h| format!("client:{h}")))
            .unwrap_or_else(|| "client".to_owned())
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
    let url = reqwest::Url::parse(&args.url).map_err(|e| format!("--url `{}`: {e}", args.url))?;
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
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
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn flags() {
        let a = args(&[
            "--url",
            "http://x",
            "--rate",
            "5/m",
            "--burst=2",
            "--max-wait",
            "1.5",
        ])
        .unwrap();
        assert_eq!(a.rate, (5, Duration::from_secs(60)));
        assert_eq!(
            (a.burst, a.max_wait),
            (Some(2), Duration::from_millis(1500))
        );
        assert!(args(&[]).unwrap_err().contains("--url is required"));
        assert!(
            args(&["--url", "u", "--rate", "5"])
                .unwrap_err()
                .contains("N/s")
        );
        assert!(
            args(&["--url", "u", "--redis", "r"])
                .unwrap_err()
                .contains("together")
        );
        assert!(
            args(&["--url", "u", "--nope"])
                .unwrap_err()
                .contains("unknown flag")
        );
    }
}

//! `flood`: how many store calls the denied-until cache saves while one caller floods.
//!
//! One caller limited to `RATE`/s (burst `BURST`) sends `FLOOD_RATE` requests a second through the
//! inbound layer, in process (`tower::ServiceExt::oneshot`), for a while. The store is a
//! `MemoryStore` wrapped in a counter of store calls. Run once with the cache (the default) and
//! once without it.
//!
//! With the cache, a denial is answered locally until its retry time; after it, one call passes
//! (a token came back) and the next is denied and cached again: about two store calls per refill
//! interval, so the share avoided is about `1 - 2 * RATE / FLOOD_RATE`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::time::MissedTickBehavior;
use tollgate::inbound::{Global, Policy, RateLimitLayer};
use tollgate_core::{Limit, MemoryStore, Quota, Reservation, Reserve, Store, StoreError, Verdict};
use tower::{ServiceBuilder, ServiceExt, service_fn};

use crate::BoxError;
use crate::report::{Row, thousands};

/// The caller's limit.
const RATE: u32 = 100;
const BURST: u32 = 10;
/// Requests per second the caller sends: a hundred times its limit.
const FLOOD_RATE: u64 = 10_000;
/// Requests per tick of the pacing timer (ticks every millisecond).
const PER_TICK: u64 = FLOOD_RATE / 1000;

/// A `MemoryStore` that counts the decisions it is asked for.
#[derive(Clone)]
struct Counting {
    inner: MemoryStore,
    calls: Arc<AtomicU64>,
}

impl Store for Counting {
    async fn decide(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Store::decide(&self.inner, limits).await
    }

    async fn peek(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        Store::peek(&self.inner, limits).await
    }

    async fn reserve(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> Result<Reserve, StoreError> {
        Store::reserve(&self.inner, limits, max_wait).await
    }

    async fn cancel(&self, reservation: &Reservation) -> Result<(), StoreError> {
        Store::cancel(&self.inner, reservation).await
    }

    async fn pause(
        &self,
        key: &str,
        quota: &Quota,
        duration: Duration,
    ) -> Result<bool, StoreError> {
        Store::pause(&self.inner, key, quota, duration).await
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn decide_now(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Store::decide_now(&self.inner, limits)
    }
}

/// What one flood gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flood {
    requests: u64,
    allowed: u64,
    store_calls: u64,
}

async fn flood(cache: bool, duration: Duration) -> Result<Flood, BoxError> {
    let calls = Arc::new(AtomicU64::new(0));
    let store = Counting {
        inner: MemoryStore::new(),
        calls: Arc::clone(&calls),
    };
    let policy = Policy::builder()
        .tier("caller", Quota::per_second(RATE)?.with_burst(BURST)?)
        .build()?;
    let mut builder = RateLimitLayer::builder(policy, Global::new("caller")).store(store);
    if !cache {
        builder = builder.denied_cache(None);
    }
    let service = ServiceBuilder::new()
        .layer(builder.build()?)
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        }));
    let ticks = duration.as_millis() as u64;
    let mut timer = tokio::time::interval(Duration::from_millis(1));
    timer.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut result = Flood {
        requests: 0,
        allowed: 0,
        store_calls: 0,
    };
    for _ in 0..ticks {
        timer.tick().await;
        for _ in 0..PER_TICK {
            let response = service.clone().oneshot(Request::new(())).await?;
            result.requests += 1;
            match response.status() {
                StatusCode::OK => result.allowed += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => return Err(format!("unexpected status {other}").into()),
            }
        }
    }
    result.store_calls = calls.load(Ordering::Relaxed);
    Ok(result)
}

/// The share of requests that did not reach the store.
fn avoided(f: &Flood) -> f64 {
    1.0 - f.store_calls as f64 / f.requests.max(1) as f64
}

/// Runs the flood suite.
pub(crate) fn run(quick: bool) -> Result<Vec<Row>, BoxError> {
    let duration = if quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let with = runtime.block_on(flood(true, duration))?;
    let without = runtime.block_on(flood(false, duration))?;
    eprintln!("  flood: with cache {with:?}, without {without:?}");
    // Calls per request, so a flood that managed a few more or fewer requests compares fairly.
    let per_request = |f: &Flood| f.store_calls as f64 / f.requests.max(1) as f64;
    let ratio = per_request(&without) / per_request(&with).max(f64::MIN_POSITIVE);
    Ok(vec![Row {
        case: format!(
            "flood: 1 caller at {} req/s past {RATE}/s (burst {BURST}), {} s (store calls avoided)",
            thousands(FLOOD_RATE as f64),
            duration.as_secs()
        ),
        tollgate: format!(
            "{:.1}% avoided ({} store calls for {} requests, {} allowed)",
            avoided(&with) * 100.0,
            thousands(with.store_calls as f64),
            thousands(with.requests as f64),
            thousands(with.allowed as f64)
        ),
        peer: "tollgate without the denied-until cache".into(),
        peer_value: format!(
            "{:.1}% avoided ({} store calls for {} requests, {} allowed)",
            avoided(&without) * 100.0,
            thousands(without.store_calls as f64),
            thousands(without.requests as f64),
            thousands(without.allowed as f64)
        ),
        ratio: if ratio.is_finite() { ratio } else { 0.0 },
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_avoided() {
        let f = Flood {
            requests: 1000,
            allowed: 20,
            store_calls: 25,
        };
        assert!((avoided(&f) - 0.975).abs() < 1e-12);
    }
}

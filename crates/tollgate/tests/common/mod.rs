//! Shared helpers of the inbound tests: a real axum server on 127.0.0.1:0 behind the layer, and
//! a client.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::http::Request;
use axum::routing::{get, post};
use metrics_util::debugging::{DebuggingRecorder, Snapshotter};
use sfv::{BareItem, List, ListEntry, Parser};
use tokio::task::JoinHandle;
use tollgate::inbound::{Identity, RateLimitDecision, Rejection};

/// A server running in the background; stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TestServer {
    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on a free port of 127.0.0.1, with the peer address available to the layer.
pub async fn serve(app: Router) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    TestServer { addr, task }
}

/// Serves `app` with axum's plain `into_make_service`: the requests carry no peer address.
pub async fn serve_plain(app: Router) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app.into_make_service()).await;
    });
    TestServer { addr, task }
}

/// The routes of the example server: `/api/hello`, `POST /api/reports`, `/api/search`, and
/// `/healthz`; `/api/whoami` echoes the decision the layer put in the request.
pub fn routes() -> Router {
    Router::new()
        .route("/api/hello", get(|| async { "hello" }))
        .route("/api/reports", post(|| async { "report queued" }))
        .route("/api/search", get(|| async { "results" }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/api/whoami",
            get(
                |decision: Option<Extension<RateLimitDecision>>| async move {
                    match decision {
                        Some(Extension(d)) => {
                            format!("{} {} {}", d.tier, d.policy, d.decision.remaining)
                        }
                        None => "none".to_owned(),
                    }
                },
            ),
        )
}

/// A client with a short timeout, no pooling surprises.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a reqwest client")
}

/// One member of an RFC 9651 List: its String name and its integer parameters.
#[derive(Debug, PartialEq)]
pub struct SfMember {
    pub name: String,
    pub params: BTreeMap<String, i64>,
}

/// Parses `value` as an RFC 9651 List holding exactly one Item: a String with integer parameters.
pub fn sf_member(value: &str) -> SfMember {
    let list: List = Parser::new(value)
        .parse()
        .unwrap_or_else(|e| panic!("{value:?} is not an sf-list: {e}"));
    assert_eq!(list.len(), 1, "{value:?}: one member");
    let ListEntry::Item(item) = &list[0] else {
        panic!("{value:?}: the member is an inner list");
    };
    let BareItem::String(name) = &item.bare_item else {
        panic!("{value:?}: the policy name is not an sf-string");
    };
    let params = item
        .params
        .iter()
        .map(|(k, v)| {
            let n = v
                .as_integer()
                .unwrap_or_else(|| panic!("{value:?}: {k:?} is not an integer"));
            (k.as_str().to_owned(), i64::from(n))
        })
        .collect();
    SfMember {
        name: name.as_str().to_owned(),
        params,
    }
}

/// The caller is `user:<x-user>` in tier `<x-tier>`.
pub fn by_header(request: &Request<Body>) -> Ready<Result<Identity, Rejection>> {
    let value = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned()
    };
    ready(Ok(Identity::new(
        &format!("user:{}", value("x-user")),
        value("x-tier"),
    )))
}

/// The metrics recorder of this test binary, installed on first use.
pub fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snapshotter
    })
}

/// Checks the token-bucket arrival curve: in every interval `[t_i, t_j]` at most
/// `burst + rate × (t_j − t_i + slack)` requests. Returns the most requests in any 100 ms.
pub fn assert_arrival_curve(times: &[Instant], rate: f64, burst: usize, slack: Duration) -> usize {
    let mut times = times.to_vec();
    times.sort();
    let mut most_in_100ms = 0;
    for i in 0..times.len() {
        for j in i..times.len() {
            let span = times[j] - times[i];
            let count = j - i + 1;
            let allowed = burst as f64 + rate * (span + slack).as_secs_f64();
            assert!(
                count as f64 <= allowed,
                "{count} requests arrived within {span:?} (at most {allowed:.2} allowed): \
                 arrivals (ms) {:?}",
                offsets(&times, times[0])
            );
            if span <= Duration::from_millis(100) {
                most_in_100ms = most_in_100ms.max(count);
            }
        }
    }
    most_in_100ms
}

/// Times in ms from `origin` (negative before it), for messages.
pub fn offsets(times: &[Instant], origin: Instant) -> Vec<i64> {
    times
        .iter()
        .map(|t| {
            if *t >= origin {
                (*t - origin).as_millis() as i64
            } else {
                -((origin - *t).as_millis() as i64)
            }
        })
        .collect()
}

/// Polls `check` every 20 ms until it holds, for at most `timeout`; whether it did.
pub async fn poll_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The civil date of `secs` after the Unix epoch (UTC): year, month (1-12), day (1-31), and the
/// weekday (0 = Monday), by Howard Hinnant's days-to-civil algorithm; for writing HTTP-dates.
pub fn civil(secs: u64) -> (u64, u64, u64, u64) {
    let days = secs / 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    // 1970-01-01 was a Thursday.
    (year, month, day, (days + 3) % 7)
}

/// The English names HTTP-dates use, Monday first, and the months.
pub const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
/// The months' three-letter names.
pub const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The sum of the counters `name` whose labels include every one of `labels`, counted since the
/// last snapshot of this binary's recorder (`snapshotter` installs it): a snapshot drains every
/// metric, so tests reading metrics take turns.
pub fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    use metrics_util::debugging::DebugValue;
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let key = key.key();
            let matches = key.name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
            match value {
                DebugValue::Counter(n) if matches => Some(n),
                _ => None,
            }
        })
        .sum()
}

//! What an upstream says about its limits: any `Retry-After`, `RateLimit`, `X-RateLimit-*`
//! values give a bounded pause or none, never a panic.

#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use tollgate::outbound::{MAX_PAUSE, parse_http_date, parse_retry_after, reset_delay, signal};

const NAMES: [&str; 4] = [
    "retry-after",
    "ratelimit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let status = match selector % 4 {
        0 => StatusCode::OK,
        1 => StatusCode::TOO_MANY_REQUESTS,
        2 => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_764_600_000);
    let mut headers = HeaderMap::new();
    for (i, part) in rest.split(|&b| b == 0).enumerate() {
        if let Ok(value) = HeaderValue::from_bytes(part) {
            headers.append(NAMES[i % NAMES.len()], value);
        }
        if let Ok(text) = std::str::from_utf8(part) {
            let _ = parse_http_date(text);
            if let Some(pause) = parse_retry_after(text, now) {
                let _ = pause;
            }
            if let Ok(reset) = text.trim().parse::<f64>() {
                if let Some(delay) = reset_delay(reset, now) {
                    assert!(delay <= MAX_PAUSE);
                }
            }
        }
    }
    if let Some(signal) = signal(status, &headers, now) {
        assert!(signal.pause <= MAX_PAUSE, "{signal:?}");
        assert!(!signal.limited || status != StatusCode::OK);
    }
    // Dates around "now" do not wrap either.
    let _ = signal(status, &headers, SystemTime::UNIX_EPOCH);
});

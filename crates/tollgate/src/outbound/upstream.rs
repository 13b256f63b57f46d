//! Reading what an upstream says about its own limits: `Retry-After` (seconds or HTTP-date), the
//! IETF `RateLimit` header, `X-RateLimit-Remaining` / `-Reset` (delta seconds, epoch seconds or
//! epoch milliseconds, detected) and GitHub's lowercase `x-ratelimit-*`. Malformed values are
//! ignored, never a panic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};

/// What a response says about when to send again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSignal {
    /// Pause the buckets this long from now.
    pub pause: Duration,
    /// The upstream refused the request (429, or 503 with `Retry-After`): the call may be retried
    /// after the pause.
    pub limited: bool,
}

/// The longest pause an upstream may impose (a day): a bogus header cannot freeze a client for
/// years.
pub const MAX_PAUSE: Duration = Duration::from_secs(86_400);

/// Reads a response's status and headers. `now` is the local wall clock (for HTTP-dates and epoch
/// resets).
pub fn signal(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Option<UpstreamSignal> {
    let limited = status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::SERVICE_UNAVAILABLE && headers.contains_key("retry-after"));
    let retry_after = header_str(headers, "retry-after").and_then(|v| parse_retry_after(v, now));
    let exhausted = exhausted_for(headers, now);
    let pause = match (limited, retry_after, exhausted) {
        (_, Some(r), e) => Some(e.map_or(r, |e| e.max(r))),
        (_, None, Some(e)) => Some(e),
        // A 429 without any hint: back off one second.
        (true, None, None) => Some(Duration::from_secs(1)),
        (false, None, None) => None,
    }?;
    Some(UpstreamSignal {
        pause: pause.min(MAX_PAUSE),
        limited,
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// `Retry-After`: delay seconds, or an HTTP-date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// When the upstream says its quota is used up (remaining 0), how long until it resets.
fn exhausted_for(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    // IETF draft: RateLimit: "policy";r=0;t=5 (a list; any item with r=0 counts).
    if let Some(value) = header_str(headers, "ratelimit") {
        let mut longest: Option<Duration> = None;
        for item in value.split(',') {
            let (mut r, mut t) = (None, None);
            for param in item.split(';').skip(1) {
                match param.trim().split_once('=') {
                    Some(("r", v)) => r = v.trim().parse::<u64>().ok(),
                    Some(("t", v)) => t = v.trim().parse::<u64>().ok(),
                    _ => {}
                }
            }
            if r == Some(0)
                && let Some(t) = t
            {
                longest =
                    Some(longest.map_or(Duration::from_secs(t), |l| l.max(Duration::from_secs(t))));
            }
        }
        if longest.is_some() {
            return longest;
        }
    }
    // Legacy and GitHub: X-RateLimit-Remaining: 0 with X-RateLimit-Reset.
    let remaining = header_str(headers, "x-ratelimit-remaining")?
        .parse::<f64>()
        .ok()?;
    if remaining > 0.0 {
        return None;
    }
    let reset = header_str(headers, "x-ratelimit-reset")?
        .parse::<f64>()
        .ok()?;
    reset_delay(reset, now)
}

/// `X-RateLimit-Reset` comes as delta seconds, epoch seconds or epoch milliseconds: tell them
/// apart by size (an epoch in seconds is past 10^9 since 2001, in ms past 10^12).
pub fn reset_delay(reset: f64, now: SystemTime) -> Option<Duration> {
    if !reset.is_finite() || reset < 0.0 {
        return None;
    }
    let now_secs = now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    let delay = if reset >= 1e12 {
        reset / 1000.0 - now_secs
    } else if reset >= 1e9 {
        reset - now_secs
    } else {
        reset
    };
    Some(Duration::from_secs_f64(
        delay.clamp(0.0, MAX_PAUSE.as_secs_f64()),
    ))
}

/// Parses an HTTP-date in any of the three forms RFC 9110 (section 5.6.7) says recipients must
/// accept: the IMF-fixdate senders must use (`Sun, 06 Nov 1994 08:49:37 GMT`), and the obsolete
/// RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`) forms.
/// Parsing is the `httpdate` crate's (hyper's own), which also checks the weekday.
pub fn parse_http_date(value: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(value.trim()).ok()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(list: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(at(784_111_777))
        );
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(at(0))
        );
        assert_eq!(
            parse_http_date("Sun, 22 Nov 2026 08:00:00 GMT"),
            Some(at(1_795_334_400))
        );
        // The obsolete forms RFC 9110 says a recipient must accept too.
        assert_eq!(
            parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(at(784_111_777))
        );
        assert_eq!(
            parse_http_date("Sun Nov  6 08:49:37 1994"),
            Some(at(784_111_777))
        );
        assert_eq!(
            parse_http_date("Tuesday, 01-Dec-26 20:50:00 GMT"),
            Some(at(1_796_158_200))
        );
        for bad in [
            "",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nox 1994 08:49:37 GMT",
            "Mon, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-1994 08:49:37 GMT",
            "Sun Nov 6 08:49:37 1994",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = at(784_111_770);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn signals() {
        let now = at(1_700_000_000);
        let s = signal(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "2")]),
            now,
        )
        .unwrap();
        assert_eq!((s.pause, s.limited), (Duration::from_secs(2), true));
        let s = signal(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), now).unwrap();
        assert_eq!(s.pause, Duration::from_secs(1));
        assert_eq!(signal(StatusCode::OK, &HeaderMap::new(), now), None);
        assert_eq!(
            signal(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), now),
            None
        );
        let s = signal(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[("retry-after", "3")]),
            now,
        )
        .unwrap();
        assert!(s.limited);
        // Remaining 0 before any 429: pause until the reset, not limited.
        let s = signal(
            StatusCode::OK,
            &headers(&[("ratelimit", "\"default\";r=0;t=4")]),
            now,
        )
        .unwrap();
        assert_eq!((s.pause, s.limited), (Duration::from_secs(4), false));
        assert_eq!(
            signal(
                StatusCode::OK,
                &headers(&[("ratelimit", "\"default\";r=3;t=4")]),
                now
            ),
            None
        );
        // Reset as delta, epoch seconds, epoch milliseconds (GitHub sends epoch seconds).
        for reset in ["5", "1700000005", "1700000005000"] {
            let s = signal(
                StatusCode::OK,
                &headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", reset)]),
                now,
            )
            .unwrap();
            assert_eq!(s.pause, Duration::from_secs(5), "{reset}");
        }
        assert_eq!(
            signal(
                StatusCode::OK,
                &headers(&[("x-ratelimit-remaining", "7"), ("x-ratelimit-reset", "5")]),
                now
            ),
            None
        );
        // Garbage is ignored; absurd values are capped.
        assert_eq!(
            signal(
                StatusCode::OK,
                &headers(&[("x-ratelimit-remaining", "zero"), ("ratelimit", ";;;=")]),
                now
            ),
            None
        );
        let s = signal(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "99999999999")]),
            now,
        )
        .unwrap();
        assert_eq!(s.pause, MAX_PAUSE);
        let mut bad = HeaderMap::new();
        bad.insert("retry-after", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(
            signal(StatusCode::TOO_MANY_REQUESTS, &bad, now)
                .unwrap()
                .pause,
            Duration::from_secs(1)
        );
    }
}

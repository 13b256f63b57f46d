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

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form RFC 9110 requires senders to
/// use.
pub fn parse_http_date(value: &str) -> Option<SystemTime> {
    let b = value.trim().as_bytes();
    if b.len() != 29 || &b[3..5] != b", " || &b[25..] != b" GMT" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        std::str::from_utf8(&b[r]).ok()?.parse().ok()
    };
    let day = num(5..7)?;
    let month = match &b[8..11] {
        b"Jan" => 1,
        b"Feb" => 2,
        b"Mar" => 3,
        b"Apr" => 4,
        b"May" => 5,
        b"Jun" => 6,
        b"Jul" => 7,
        b"Aug" => 8,
        b"Sep" => 9,
        b"Oct" => 10,
        b"Nov" => 11,
        b"Dec" => 12,
        _ => return None,
    };
    let year = num(12..16)?;
    let (hour, min, sec) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if b[7] != b' ' || b[11] != b' ' || b[16] != b' ' || b[19] != b':' || b[22] != b':' {
        return None;
    }
    if !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 || year < 1970 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    let days_since_epoch = days.checked_sub(719_468)?;
    let secs = days_since_epoch * 86_400 + hour * 3600 + min * 60 + sec;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
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
        for bad in [
            "",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nox 1994 08:49:37 GMT",
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

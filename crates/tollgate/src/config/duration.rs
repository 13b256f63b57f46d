//! Durations as the configuration writes them: `250ms`, `10s`, `1m30s`.

use std::time::Duration;

/// Why a duration such as `"10s"` could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration `{input}`: {reason} (expected a number and a unit, such as 250ms, 10s, 1m, 1h or 1m30s)"
)]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Parses a duration written as whole numbers with units: `us`/`µs`, `ms`, `s`, `m`, `h`, `d`,
/// possibly combined (`"1m30s"`).
///
/// ```
/// use std::time::Duration;
/// use tollgate::config::parse_duration;
///
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert!(parse_duration("10").is_err()); // a unit is required
/// ```
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err("a number is missing"));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| err("the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit())
            .map_or(rest.len(), |(i, _)| i);
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit.trim() {
            "us" | "µs" => Some(Duration::from_micros(value)),
            "ms" => Some(Duration::from_millis(value)),
            "s" => Some(Duration::from_secs(value)),
            "m" => value.checked_mul(60).map(Duration::from_secs),
            "h" => value.checked_mul(3600).map(Duration::from_secs),
            "d" => value.checked_mul(86_400).map(Duration::from_secs),
            "" => return Err(err("a unit is missing")),
            _ => return Err(err("the unit is not one of us, ms, s, m, h, d")),
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| err("it is too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration(" 2d "), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("1h1m1s"), Ok(Duration::from_secs(3661)));
        assert_eq!(parse_duration("5us"), Ok(Duration::from_micros(5)));
        for bad in [
            "",
            "s",
            "10",
            "10x",
            "-1s",
            "1.5s",
            "99999999999999999999s",
            "ms10",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().contains("invalid duration"), "{bad}: {e}");
        }
    }
}

//! The `--rate N/s|N/m|N/h` syntax of the example binaries, shared by including this file
//! (`#[path = "../../shared/rate.rs"] mod rate;`) and used as a clap value parser.

use std::time::Duration;

use tollgate::core::Quota;

/// Parses `N/s`, `N/m` or `N/h` into a token bucket refilled at N per second, minute or hour and
/// holding N (`--burst` changes that). The error says what is wrong (clap adds the flag and the
/// value): the shape, the count, the unit, or a rate the quota refuses (such as `0/s`).
pub(crate) fn parse_rate(text: &str) -> Result<Quota, String> {
    let (count, unit) = text
        .split_once('/')
        .ok_or("expected N/s, N/m or N/h, such as 10/s")?;
    let count: u32 = count
        .parse()
        .map_err(|_| format!("`{count}` is not a whole number"))?;
    let period = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(format!("the unit `{unit}` is not s, m or h")),
    };
    Quota::per_period(count, period).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("5/m"),
            Quota::per_minute(5).map_err(|e| e.to_string())
        );
        assert_eq!(
            parse_rate("10/s"),
            Quota::per_second(10).map_err(|e| e.to_string())
        );
        assert_eq!(
            parse_rate("3600/h"),
            Quota::per_hour(3600).map_err(|e| e.to_string())
        );
        for (bad, why) in [
            ("5", "expected N/s"),
            ("x/s", "`x` is not a whole number"),
            ("-1/s", "`-1` is not a whole number"),
            ("5/d", "the unit `d` is not s, m or h"),
            ("5/", "the unit `` is not"),
            ("0/s", "at least 1"),
        ] {
            let e = parse_rate(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}

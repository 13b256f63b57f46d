//! Rows, the Markdown table, the JSON file and the chart of ratios.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

/// One line of a suite's table: tollgate against one peer in one case.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    /// What was measured, with its unit.
    pub(crate) case: String,
    /// tollgate's value, with its unit.
    pub(crate) tollgate: String,
    /// Who tollgate is compared with.
    pub(crate) peer: String,
    /// The peer's value, with its unit.
    pub(crate) peer_value: String,
    /// Higher is better for tollgate: peer / tollgate for times, tollgate / peer for throughputs.
    pub(crate) ratio: f64,
}

/// `peer / tollgate`: the ratio of two times (or costs), higher when tollgate takes less.
pub(crate) fn time_ratio(tollgate: f64, peer: f64) -> f64 {
    finite(peer / tollgate)
}

/// `tollgate / peer`: the ratio of two throughputs, higher when tollgate does more.
pub(crate) fn throughput_ratio(tollgate: f64, peer: f64) -> f64 {
    finite(tollgate / peer)
}

/// JSON has no infinity or NaN: a ratio that cannot be computed is 0.
fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

/// Six decimals keep the JSON file readable, and enough of the ratio that the two decimals
/// shown (in the table, or in the chart drawn from the file) round as the exact value does: from
/// three, 0.28515 would be stored as 0.285 and shown as 0.28.
fn rounded(ratio: f64) -> f64 {
    (ratio * 1e6).round() / 1e6
}

/// `12345.6` as `12,346`.
pub(crate) fn thousands(x: f64) -> String {
    let n = x.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency in milliseconds with three significant-ish decimals.
pub(crate) fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.3} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// A ratio as printed in the table.
pub(crate) fn ratio_text(ratio: f64) -> String {
    if ratio >= 100.0 {
        format!("{ratio:.0}")
    } else {
        format!("{ratio:.2}")
    }
}

/// The rows as a Markdown table with the contract's columns.
pub(crate) fn markdown(rows: &[Row]) -> String {
    let mut out =
        String::from("| case | tollgate | peer | peer value | ratio |\n|---|---|---|---|---|\n");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            cell(&row.case),
            cell(&row.tollgate),
            cell(&row.peer),
            cell(&row.peer_value),
            // Rounded as in the JSON file, so the table, the file and the chart agree.
            ratio_text(row.ratio)
        );
    }
    out
}

/// A table cell: a `|` would end it early.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The rows as the JSON list of `target/bench/<suite>.json`.
pub(crate) fn to_json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "case": r.case,
                    "tollgate": r.tollgate,
                    "peer": r.peer,
                    "peer value": r.peer_value,
                    "ratio": rounded(r.ratio),
                })
            })
            .collect(),
    )
}

/// Reads back a list written by [`to_json`]; entries that are not rows are skipped.
pub(crate) fn from_json(value: &Value) -> Vec<Row> {
    let Some(items) = value.as_array() else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let text = |key: &str| item.get(key)?.as_str().map(str::to_owned);
            Some(Row {
                case: text("case")?,
                tollgate: text("tollgate")?,
                peer: text("peer")?,
                peer_value: text("peer value")?,
                ratio: item.get("ratio")?.as_f64()?,
            })
        })
        .collect()
}

/// Escapes text for SVG.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The text before a unit in parentheses: `"memory: 1 thread (ns)"` gives `"memory: 1 thread"`.
fn short(text: &str) -> &str {
    text.split(" (").next().unwrap_or(text).trim()
}

/// What a case measures: the start of its parenthesized part, `"req/s"` for
/// `"http: bare (req/s, 32 connections)"`.
fn measure(text: &str) -> Option<&str> {
    let (_, rest) = text.split_once(" (")?;
    rest.split([',', ')']).next().map(str::trim)
}

/// A bar's label: the case and the peer, without units or the suite's prefix; with what the case
/// measures when another row of its suite would get the same label otherwise (the http suite
/// gives the same comparison in req/s, CPU time and instructions).
fn bar_label(row: &Row, suite: &[Row]) -> String {
    let plain = |r: &Row| {
        let case = short(&r.case);
        let case = case.split_once(": ").map_or(case, |(_, rest)| rest);
        format!("{case} vs {}", short(&r.peer))
    };
    let label = plain(row);
    let shared = suite.iter().filter(|r| plain(r) == label).count() > 1;
    match measure(&row.case) {
        Some(what) if shared => format!("{label} ({what})"),
        _ => label,
    }
}

/// A horizontal bar chart of the ratios, one bar per row, on a log scale with a line at 1.0:
/// bars right of it are where tollgate does better than the peer.
pub(crate) fn svg_chart(suites: &[(String, Vec<Row>)], title: &str) -> String {
    const PLOT_W: f64 = 420.0;
    const BAR_H: f64 = 16.0;
    const GAP: f64 = 6.0;
    const HEADER_H: f64 = 22.0;
    const TOP: f64 = 48.0;
    // Log scale from 0.1 to 100 (ratios outside are clamped to the edges).
    const MIN_EXP: f64 = -1.0;
    const MAX_EXP: f64 = 2.0;
    let longest = suites
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|r| bar_label(r, rows).chars().count()))
        .max()
        .unwrap_or(20);
    // About 6.2 px per character at 11 px sans-serif.
    let label_w = 20.0 + longest as f64 * 6.2;
    let x_of = |ratio: f64| {
        let e = ratio.max(1e-9).log10().clamp(MIN_EXP, MAX_EXP);
        label_w + (e - MIN_EXP) / (MAX_EXP - MIN_EXP) * PLOT_W
    };
    let bars: usize = suites.iter().map(|(_, rows)| rows.len()).sum();
    let height = TOP + suites.len() as f64 * HEADER_H + bars as f64 * (BAR_H + GAP) + 40.0;
    let width = label_w + PLOT_W + 60.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>
<text x="10" y="20" font-size="14" font-weight="bold">{}</text>
<text x="10" y="36" fill="#555">ratio, log scale: right of the line at 1.0 tollgate does better than the peer</text>"##,
        xml(title)
    );
    let plot_bottom = height - 30.0;
    for (tick, label) in [
        (0.1, "0.1"),
        (0.3, "0.3"),
        (1.0, "1"),
        (3.0, "3"),
        (10.0, "10"),
        (30.0, "30"),
        (100.0, "100"),
    ] {
        let x = x_of(tick);
        let (stroke, w) = if tick == 1.0 {
            ("#000000", 1.5)
        } else {
            ("#dddddd", 1.0)
        };
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{plot_bottom}" stroke="{stroke}" stroke-width="{w}"/>
<text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{label}</text>"##,
            plot_bottom + 14.0
        );
    }
    let mut y = TOP;
    for (suite, rows) in suites {
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.1}" font-weight="bold">{}</text>"#,
            y + 15.0,
            xml(suite)
        );
        y += HEADER_H;
        for row in rows {
            let x1 = x_of(1.0);
            let x2 = x_of(row.ratio);
            let (from, to) = if x2 >= x1 { (x1, x2) } else { (x2, x1) };
            let fill = if row.ratio >= 1.0 {
                "#2e7d32"
            } else {
                "#c62828"
            };
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>
<rect x="{from:.1}" y="{y:.1}" width="{:.1}" height="{BAR_H}" fill="{fill}"/>
<text x="{:.1}" y="{:.1}">{}</text>"#,
                label_w - 8.0,
                y + 12.0,
                xml(&bar_label(row, rows)),
                (to - from).max(1.0),
                to + 4.0,
                y + 12.0,
                ratio_text(row.ratio)
            );
            y += BAR_H + GAP;
        }
    }
    out.push_str("</svg>\n");
    out
}

/// The `p`-th percentile (0–100) of sorted samples, nearest rank.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of some repeated measurements.
pub(crate) fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if !values.len().is_multiple_of(2) {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ratio: f64) -> Row {
        Row {
            case: "memory: 1 thread, hot key (ns/decision)".into(),
            tollgate: "20.0 ns".into(),
            peer: "governor keyed".into(),
            peer_value: "30.0 ns".into(),
            ratio,
        }
    }

    #[test]
    fn ratios_are_higher_when_tollgate_is_better() {
        // tollgate takes 20 ns where the peer takes 30: better, so above 1.
        assert!((time_ratio(20.0, 30.0) - 1.5).abs() < 1e-12);
        // tollgate serves 900 req/s where the peer serves 1000: worse, so below 1.
        assert!((throughput_ratio(900.0, 1000.0) - 0.9).abs() < 1e-12);
        assert_eq!(throughput_ratio(1.0, 0.0), 0.0, "no infinity in JSON");
    }

    #[test]
    fn table_has_the_contract_columns() {
        let table = markdown(&[row(1.5)]);
        let mut lines = table.lines();
        assert_eq!(
            lines.next(),
            Some("| case | tollgate | peer | peer value | ratio |")
        );
        assert_eq!(lines.next(), Some("|---|---|---|---|---|"));
        assert_eq!(
            lines.next(),
            Some(
                "| memory: 1 thread, hot key (ns/decision) | 20.0 ns | governor keyed | 30.0 ns | 1.50 |"
            )
        );
        assert_eq!(lines.next(), None);
        assert!(
            markdown(&[Row {
                case: "a|b".into(),
                ..row(1.0)
            }])
            .contains("a\\|b")
        );
    }

    #[test]
    fn json_has_the_contract_keys_and_round_trips() {
        let json = to_json(&[row(1.234_567_89)]);
        let object = json[0].as_object().expect("an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["case", "peer", "peer value", "ratio", "tollgate"]);
        assert_eq!(json[0]["ratio"].as_f64(), Some(1.234_568));
        let back = from_json(&json);
        assert_eq!(back, vec![row(1.234_568)]);
        // What the table shows rounds the exact ratio once, not a rounded one again.
        assert_eq!(ratio_text(28_307.0 / 99_270.0), "0.29");
        assert_eq!(
            ratio_text(from_json(&to_json(&[row(28_307.0 / 99_270.0)]))[0].ratio),
            "0.29"
        );
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(ms(Duration::from_micros(1500)), "1.500 ms");
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&sorted, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&sorted, 99.0), Duration::from_millis(99));
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn chart_draws_one_bar_per_row_and_the_line_at_one() {
        let svg = svg_chart(
            &[("memory".into(), vec![row(1.5), row(0.5)])],
            "tollgate <vs> peers",
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<rect").count(), 3, "background and two bars");
        assert!(svg.contains("tollgate &lt;vs&gt; peers"));
        assert!(svg.contains(r##"stroke="#000000""##), "the line at 1.0");
        assert!(svg.contains("#2e7d32") && svg.contains("#c62828"));
        // Units and the suite prefix are left out of a bar's label, unless another row of the
        // suite would get the same label: then what each measures tells them apart.
        assert!(svg.contains(">1 thread, hot key vs governor keyed (ns/decision)<"));
        let alone = svg_chart(&[("memory".into(), vec![row(1.5)])], "t");
        assert!(alone.contains(">1 thread, hot key vs governor keyed<"));
        let mut cpu = row(0.9);
        cpu.case = "memory: 1 thread, hot key (CPU per decision, 2 threads)".into();
        let both = svg_chart(&[("memory".into(), vec![row(1.5), cpu])], "t");
        assert!(both.contains(">1 thread, hot key vs governor keyed (ns/decision)<"));
        assert!(both.contains(">1 thread, hot key vs governor keyed (CPU per decision)<"));
    }
}

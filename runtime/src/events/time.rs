//! Times of events: now in Unix milliseconds, RFC 3339 formatting, and what `since`
//! accepts (an RFC 3339 time, a span back from now like `10m`, or Unix milliseconds).

use super::{EventError, invalid};
use std::time::{SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// `ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339(ms: u64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    // Millisecond precision, always `Z`.
    let t = t
        .replace_nanosecond(t.millisecond() as u32 * 1_000_000)
        .unwrap_or(t);
    let s = t.format(&Rfc3339).unwrap_or_default();
    match s.strip_suffix('Z') {
        Some(body) if !body.contains('.') => format!("{body}.000Z"),
        Some(body) => {
            let (whole, frac) = body.split_once('.').unwrap_or((body, ""));
            format!("{whole}.{:0<3}Z", &frac[..frac.len().min(3)])
        }
        None => s,
    }
}

/// Parses an RFC 3339 time with `Z` or a `±HH:MM` offset, to Unix ms.
fn parse_rfc3339(s: &str) -> Result<u64, EventError> {
    let bad = || {
        invalid(
            "since",
            format!("`{s}` is not a time like 2024-05-01T12:00:00Z"),
        )
    };
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad())
}

/// What `--since` / `?since=` accept, as Unix ms: an RFC 3339 time
/// (`2024-05-01T12:00:00Z`), a span back from `now_ms` (`90s`, `10m`, `2h`, `7d`), or a
/// plain number of Unix milliseconds.
///
/// # Errors
/// [`EventError::Invalid`] on `since` for anything else.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64, EventError> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let unit = match s.chars().last() {
        Some('s') => Some(1_000u64),
        Some('m') => Some(60_000),
        Some('h') => Some(3_600_000),
        Some('d') => Some(86_400_000),
        _ => None,
    };
    if let Some(unit) = unit
        && let Ok(n) = s[..s.len() - 1].parse::<u64>()
    {
        return Ok(now_ms.saturating_sub(n.saturating_mul(unit)));
    }
    parse_rfc3339(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn since_accepts_times_spans_and_milliseconds() {
        assert_eq!(parse_since("1700000000000", T0).unwrap(), T0);
        assert_eq!(parse_since("10m", T0).unwrap(), T0 - 600_000);
        assert_eq!(parse_since("2h", T0).unwrap(), T0 - 7_200_000);
        assert_eq!(parse_since("1d", T0).unwrap(), T0 - 86_400_000);
        assert_eq!(parse_since("90s", T0).unwrap(), T0 - 90_000);
        assert_eq!(parse_since("2023-11-14T22:13:20Z", 0).unwrap(), T0);
        assert_eq!(parse_since("2023-11-14T22:13:20.5Z", 0).unwrap(), T0 + 500);
        assert_eq!(parse_since("2023-11-15T00:13:20+02:00", 0).unwrap(), T0);
        assert_eq!(parse_since("2023-11-14T20:13:20-02:00", 0).unwrap(), T0);
        for bad in [
            "yesterday",
            "10x",
            "2023-13-01T00:00:00Z",
            "2023-11-14",
            "",
            "99999999999999-01-01T00:00:00Z",
            "2023-11-14T22:13:20+999999999999:00",
            "1969-12-31T23:59:59Z",
        ] {
            let e = parse_since(bad, T0).unwrap_err().to_string();
            assert!(e.starts_with("since:"), "{bad}: {e}");
        }
    }

    /// Formatting then parsing gives the same instant, over many days of four centuries
    /// (a seeded sweep: leap years, month ends, the year 2000 and 2100).
    #[test]
    fn rfc3339_round_trips() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ms = x % 13_000_000_000_000; // up to the year 2381
            let s = format_rfc3339(ms);
            assert_eq!(parse_since(&s, 0).unwrap(), ms, "{s}");
        }
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_rfc3339(951_782_400_120), "2000-02-29T00:00:00.120Z");
    }
}

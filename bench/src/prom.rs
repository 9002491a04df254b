//! Histograms from Prometheus text exposition (the coordinator's `/metrics`), so a
//! benchmark can compare what it measured with what the server recorded in the same window.

/// Why two scrapes cannot be subtracted.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum PromError {
    /// The earlier scrape has a bucket bound the later one lacks.
    #[error("bucket le={0} of the earlier scrape is missing from the later one")]
    BoundsMismatch(f64),
    /// A count went down between the scrapes: the process restarted in between.
    #[error("counts went down between the scrapes (counter reset)")]
    CounterReset,
}

/// One histogram from a scrape: cumulative bucket counts by upper bound (`le`, ascending,
/// `+Inf` last), the sum and the count of the observations.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending by `le`.
    pub buckets: Vec<(f64, f64)>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: f64,
}

/// Parses `text` and returns the histogram named `name` (its `_bucket`, `_sum` and
/// `_count` series), summed across label sets other than `le` like PromQL's
/// `sum by (le)`, so the label sets should share bucket bounds (they do when buckets are
/// configured per metric). `None` when no series of `name` is present. Lines that do not
/// parse are skipped.
pub fn histogram(text: &str, name: &str) -> Option<Histogram> {
    let (bucket, sum, count) = (
        format!("{name}_bucket"),
        format!("{name}_sum"),
        format!("{name}_count"),
    );
    let mut h = Histogram {
        buckets: Vec::new(),
        sum: 0.0,
        count: 0.0,
    };
    let mut found = false;
    for s in text.lines().filter_map(parse_line) {
        if s.name == bucket {
            let Some(le) = s
                .labels
                .iter()
                .find(|(k, _)| *k == "le")
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .filter(|le| !le.is_nan())
            else {
                continue;
            };
            match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += s.value,
                None => h.buckets.push((le, s.value)),
            }
        } else if s.name == sum {
            h.sum += s.value;
        } else if s.name == count {
            h.count += s.value;
        } else {
            continue;
        }
        found = true;
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    found.then_some(h)
}

impl Histogram {
    /// `self - before`: the observations made between two scrapes. Buckets missing from
    /// `before` count as 0 (e.g. an empty `before` when the series did not exist yet).
    ///
    /// # Errors
    /// [`PromError::BoundsMismatch`] if `before` has a bound `self` lacks;
    /// [`PromError::CounterReset`] if any count went down.
    pub fn since(&self, before: &Histogram) -> Result<Histogram, PromError> {
        let count_at = |le: f64| before.buckets.iter().find(|b| b.0 == le).map(|b| b.1);
        if let Some(&(le, _)) = before
            .buckets
            .iter()
            .find(|b| !self.buckets.iter().any(|a| a.0 == b.0))
        {
            return Err(PromError::BoundsMismatch(le));
        }
        let h = Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, c - count_at(le).unwrap_or(0.0)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        };
        if h.count < 0.0 || h.buckets.iter().any(|b| b.1 < 0.0) {
            return Err(PromError::CounterReset);
        }
        Ok(h)
    }

    /// Estimates the `q` quantile like Prometheus' `histogram_quantile`: linear
    /// interpolation within the bucket holding the rank (the lowest bucket starting at 0),
    /// the largest finite bound when the rank falls in the `+Inf` bucket. NaN when there
    /// are no observations, fewer than two buckets or no `+Inf` bucket, or `q` is NaN;
    /// -∞ for `q < 0` and +∞ for `q > 1`. Unlike Prometheus, `q = 0` gives the lower
    /// edge of the first non-empty bucket rather than NaN.
    pub fn quantile(&self, q: f64) -> f64 {
        if !(0.0..=1.0).contains(&q) {
            return if q < 0.0 {
                f64::NEG_INFINITY
            } else if q > 1.0 {
                f64::INFINITY
            } else {
                f64::NAN
            };
        }
        let b = &self.buckets;
        let total = match b.last() {
            Some(&(le, c)) if le == f64::INFINITY && b.len() >= 2 && c > 0.0 => c,
            _ => return f64::NAN,
        };
        let rank = q * total;
        let i = b[..b.len() - 1].partition_point(|&(_, c)| !(c >= rank && c > 0.0));
        if i == b.len() - 1 {
            return b[i - 1].0;
        }
        let (end, c) = b[i];
        if i == 0 && end <= 0.0 {
            return end;
        }
        let (start, below) = if i == 0 { (0.0, 0.0) } else { b[i - 1] };
        start + (end - start) * ((rank - below) / (c - below))
    }

    /// Index of the bucket whose range (previous `le`, `le`] contains `value`; `None`
    /// for NaN or a value above the last bound.
    pub fn bucket_of(&self, value: f64) -> Option<usize> {
        self.buckets.iter().position(|&(le, _)| value <= le)
    }
}

/// One sample line.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

/// Parses `name{label="value",...} value [timestamp]`; `None` for comments, blank lines
/// and malformed lines.
fn parse_line(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    if end == 0 {
        return None;
    }
    let (name, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(r) => parse_labels(r)?,
        None => (Vec::new(), rest),
    };
    let mut fields = rest.split_whitespace();
    let value = fields.next()?.parse().ok()?;
    // An optional timestamp may follow; nothing else may.
    if fields.nth(1).is_some() {
        return None;
    }
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses the labels after `{` up to and including `}`, unescaping `\\`, `\"` and `\n`
/// in values; returns them and the rest of the line.
fn parse_labels(s: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Some((labels, r));
        }
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
        if end == 0 {
            return None;
        }
        let (key, r) = rest.split_at(end);
        let r = r.trim_start().strip_prefix('=')?.trim_start();
        let r = r.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = r.char_indices();
        let after = loop {
            match chars.next()? {
                (i, '"') => break &r[i + 1..],
                (_, '\\') => value.push(match chars.next()?.1 {
                    'n' => '\n',
                    c => c,
                }),
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        rest = after.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTFT: &str = "xpyd_coordinator_ttft_seconds";

    /// As metrics-exporter-prometheus 0.17 renders it, with two label sets, one of them
    /// with escapes, and neighbours whose names share the prefix.
    const SCRAPE: &str = r#"# HELP xpyd_coordinator_ttft_seconds Coordinator: time to first token.
# TYPE xpyd_coordinator_ttft_seconds histogram
xpyd_coordinator_ttft_seconds_bucket{route="chat",le="0.1"} 2
xpyd_coordinator_ttft_seconds_bucket{route="chat",le="0.5"} 5
xpyd_coordinator_ttft_seconds_bucket{route="chat",le="1"} 6
xpyd_coordinator_ttft_seconds_bucket{route="chat",le="+Inf"} 7
xpyd_coordinator_ttft_seconds_sum{route="chat"} 3.5
xpyd_coordinator_ttft_seconds_count{route="chat"} 7
xpyd_coordinator_ttft_seconds_bucket{route="a \"b\", c}\\",le="0.1"} 0
xpyd_coordinator_ttft_seconds_bucket{route="a \"b\", c}\\",le="0.5"} 1
xpyd_coordinator_ttft_seconds_bucket{route="a \"b\", c}\\",le="1"} 2
xpyd_coordinator_ttft_seconds_bucket{route="a \"b\", c}\\",le="+Inf"} 3
xpyd_coordinator_ttft_seconds_sum{route="a \"b\", c}\\"} 2.5
xpyd_coordinator_ttft_seconds_count{route="a \"b\", c}\\"} 3
# TYPE xpyd_coordinator_ttft_seconds_extra histogram
xpyd_coordinator_ttft_seconds_extra_bucket{le="+Inf"} 100
xpyd_coordinator_ttft_seconds_extra_count 100
xpyd_coordinator_requests_total{api="http",code="200"} 10
"#;

    fn h(buckets: &[(f64, f64)]) -> Histogram {
        Histogram {
            buckets: buckets.to_vec(),
            sum: 0.0,
            count: buckets.last().map_or(0.0, |b| b.1),
        }
    }

    #[test]
    fn merges_label_sets() {
        let got = histogram(SCRAPE, TTFT).unwrap();
        assert_eq!(
            got.buckets,
            vec![(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (f64::INFINITY, 10.0)]
        );
        assert_eq!((got.sum, got.count), (6.0, 10.0));
        assert_eq!(histogram(SCRAPE, "xpyd_coordinator_e2e_seconds"), None);
        assert_eq!(histogram(SCRAPE, "xpyd_coordinator"), None);
    }

    #[test]
    fn unlabelled_series_with_timestamps_and_junk() {
        let text = "\
m_bucket{le=\"1\"} 1 1700000000000
m_bucket{ le = \"+Inf\" , } 4
m_bucket{le=\"2\" 5
m_sum 2.5
m_count 4
m_count{le=\"x\"} 4 5 6
{le=\"1\"} 3
";
        let got = histogram(text, "m").unwrap();
        assert_eq!(got.buckets, vec![(1.0, 1.0), (f64::INFINITY, 4.0)]);
        assert_eq!((got.sum, got.count), (2.5, 4.0));
    }

    #[test]
    fn since_subtracts_and_checks() {
        let before = histogram(SCRAPE, TTFT).unwrap();
        let mut after = before.clone();
        after.buckets[1].1 += 3.0;
        after.buckets[2].1 += 3.0;
        after.buckets[3].1 += 4.0;
        after.sum += 2.0;
        after.count += 4.0;
        let w = after.since(&before).unwrap();
        let inf = f64::INFINITY;
        assert_eq!(
            w.buckets,
            vec![(0.1, 0.0), (0.5, 3.0), (1.0, 3.0), (inf, 4.0)]
        );
        assert_eq!((w.sum, w.count), (2.0, 4.0));
        let empty = h(&[]);
        assert_eq!(after.since(&empty).unwrap(), after);
        assert_eq!(
            after.since(&h(&[(0.25, 1.0)])),
            Err(PromError::BoundsMismatch(0.25))
        );
        assert_eq!(before.since(&after), Err(PromError::CounterReset));
    }

    #[test]
    fn quantile_like_prometheus() {
        let inf = f64::INFINITY;
        let x = h(&[(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (inf, 10.0)]);
        assert!((x.quantile(0.5) - 0.4).abs() < 1e-12); // rank 5: 0.1 + 0.4 * 3/4
        assert!((x.quantile(0.1) - 0.05).abs() < 1e-12); // rank 1 in the first bucket
        assert_eq!(x.quantile(0.7), 0.75); // rank 7: 0.5 + 0.5 * 1/2
        assert_eq!(x.quantile(0.9), 1.0); // in +Inf: the largest finite bound
        assert_eq!(x.quantile(0.0), 0.0);
        assert_eq!(x.quantile(-0.1), -inf);
        assert_eq!(x.quantile(1.1), inf);
        assert!(x.quantile(f64::NAN).is_nan());
        let first_empty = h(&[(0.1, 0.0), (0.5, 4.0), (inf, 4.0)]);
        assert_eq!(first_empty.quantile(0.0), 0.1);
        assert_eq!(first_empty.quantile(1.0), 0.5);
        assert!(h(&[(0.1, 0.0), (inf, 0.0)]).quantile(0.5).is_nan());
        assert!(h(&[(0.1, 1.0), (0.5, 4.0)]).quantile(0.5).is_nan());
        assert!(h(&[(inf, 4.0)]).quantile(0.5).is_nan());
        let negative = h(&[(-1.0, 2.0), (1.0, 4.0), (inf, 4.0)]);
        assert_eq!(negative.quantile(0.25), -1.0);
    }

    #[test]
    fn bucket_of_uses_upper_inclusive_bounds() {
        let x = histogram(SCRAPE, TTFT).unwrap();
        assert_eq!(x.bucket_of(0.0), Some(0));
        assert_eq!(x.bucket_of(0.1), Some(0));
        assert_eq!(x.bucket_of(0.10001), Some(1));
        assert_eq!(x.bucket_of(1e9), Some(3));
        assert_eq!(x.bucket_of(f64::NAN), None);
        assert_eq!(h(&[(1.0, 1.0)]).bucket_of(2.0), None);
    }

    fn escape(v: &str) -> String {
        v.replace('\\', r"\\")
            .replace('"', "\\\"")
            .replace('\n', r"\n")
    }

    proptest! {
        #[test]
        fn label_values_round_trip(v in any::<String>(), n in 0u32..1000) {
            let line = format!("m_bucket{{k=\"{}\",le=\"0.5\"}} {n}", escape(&v));
            let s = parse_line(&line).unwrap();
            prop_assert_eq!(s.name, "m_bucket");
            prop_assert_eq!(&s.labels[0], &("k", v));
            prop_assert_eq!(s.value, f64::from(n));
        }

        #[test]
        fn parser_never_panics(text in any::<String>()) {
            let _ = histogram(&text, "m");
        }
    }
}

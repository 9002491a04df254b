//! Dependency-free SVG line charts (e.g. SLO attainment against request rate, one line
//! per serving mode, with the attainment target as a dashed line).

/// One line on a chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)`; drawn in ascending `x`, points with a non-finite coordinate skipped.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chart {
    /// Heading.
    pub title: String,
    /// Horizontal axis label.
    pub x_label: String,
    /// Vertical axis label.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Labelled horizontal reference lines, e.g. `("90% target", 0.9)`.
    pub hlines: Vec<(String, f64)>,
}

/// Tableau 10; later series get golden-angle hues.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
/// Margins around the plot area, in pixels.
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// Rough width of a 12px character, for sizing the legend.
const CHAR_WIDTH: f64 = 7.0;

impl Chart {
    /// Renders the chart as a standalone SVG document of `width` × `height` pixels. Axes
    /// get about five ticks at 1, 2 or 5 × 10^k that cover all finite points and
    /// reference lines.
    pub fn to_svg(&self, width: u32, height: u32) -> String {
        let (w, h) = (f64::from(width), f64::from(height));
        let lines: Vec<Vec<(f64, f64)>> = self
            .series
            .iter()
            .map(|s| {
                let mut p: Vec<_> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect();
                p.sort_by(|a, b| a.0.total_cmp(&b.0));
                p
            })
            .collect();
        let hlines: Vec<_> = self.hlines.iter().filter(|(_, y)| y.is_finite()).collect();
        let all = || lines.iter().flatten();
        let xt = nice_ticks(range(all().map(|p| p.0)), 5);
        let yt = nice_ticks(
            range(all().map(|p| p.1).chain(hlines.iter().map(|l| l.1))),
            5,
        );

        let longest = self.series.iter().map(|s| s.name.chars().count()).max();
        let legend = longest.map_or(0.0, |n| (30.0 + CHAR_WIDTH * n as f64).min(w / 3.0));
        let (pl, pt) = (LEFT, TOP);
        let pr = (w - RIGHT - legend).max(pl + 1.0);
        let pb = (h - BOTTOM).max(pt + 1.0);
        let sx = scale(&xt, pl, pr);
        let sy = scale(&yt, pb, pt);

        let mut out = vec![
            format!(
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
            ),
            r#"<rect width="100%" height="100%" fill="white"/>"#.to_owned(),
            format!(
                r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
                w / 2.0,
                escape(&self.title)
            ),
        ];
        for (t, label) in labelled(&xt) {
            let x = sx(t);
            out.push(format!(
                r##"<line x1="{x:.1}" y1="{pt:.1}" x2="{x:.1}" y2="{pb:.1}" stroke="#ddd"/>"##
            ));
            out.push(format!(
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                pb + 16.0
            ));
        }
        for (t, label) in labelled(&yt) {
            let y = sy(t);
            out.push(format!(
                r##"<line x1="{pl:.1}" y1="{y:.1}" x2="{pr:.1}" y2="{y:.1}" stroke="#ddd"/>"##
            ));
            out.push(format!(
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
                pl - 6.0,
                y + 4.0
            ));
        }
        out.push(format!(
            r#"<rect x="{pl:.1}" y="{pt:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
            pr - pl,
            pb - pt
        ));
        out.push(format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            (pl + pr) / 2.0,
            h - 12.0,
            escape(&self.x_label)
        ));
        out.push(format!(
            r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (pt + pb) / 2.0,
            escape(&self.y_label)
        ));
        for (label, y) in hlines {
            let y = sy(*y);
            out.push(format!(
                r##"<line x1="{pl:.1}" y1="{y:.1}" x2="{pr:.1}" y2="{y:.1}" stroke="#555" stroke-dasharray="6 4"/>"##
            ));
            out.push(format!(
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11" fill="#555">{}</text>"##,
                pr - 4.0,
                y - 4.0,
                escape(label)
            ));
        }
        for (i, (series, points)) in self.series.iter().zip(&lines).enumerate() {
            let c = colour(i);
            if !points.is_empty() {
                let coords: Vec<String> = points
                    .iter()
                    .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                    .collect();
                out.push(format!(
                    r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
                    coords.join(" ")
                ));
                for &(x, y) in points {
                    out.push(format!(
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                        sx(x),
                        sy(y)
                    ));
                }
            }
            let (lx, ly) = (pr + 12.0, pt + 12.0 + 18.0 * i as f64);
            out.push(format!(
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="2"/>"#,
                lx + 18.0
            ));
            out.push(format!(
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 24.0,
                ly + 4.0,
                escape(&series.name)
            ));
        }
        out.push("</svg>\n".to_owned());
        out.join("\n")
    }
}

/// `(min, max)` of finite `values`, `(0, 1)` when there are none.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    if lo <= hi { (lo, hi) } else { (0.0, 1.0) }
}

/// About `target` ticks, 1, 2 or 5 × 10^k apart, from a multiple of the step at or below
/// `lo` to one at or above `hi`; a degenerate range is widened first. Falls back to
/// `[lo, hi]` where floating point cannot produce such ticks.
fn nice_ticks((lo, hi): (f64, f64), target: usize) -> Vec<f64> {
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() / 10.0 };
        (lo - pad, hi + pad)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    // The slack absorbs rounding in `raw` (0.2 computed as 0.20000000000000004).
    let step = [1.0, 2.0, 5.0, 10.0]
        .map(|m| m * mag)
        .into_iter()
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag);
    let (first, last) = ((lo / step).floor(), (hi / step).ceil());
    if !(step > 0.0 && first < last && last - first <= 4.0 * target as f64 + 4.0) {
        return vec![lo, hi];
    }
    (first as i64..=last as i64)
        .map(|k| k as f64 * step)
        .collect()
}

/// Ticks with labels carrying as many decimals as the tick spacing needs.
fn labelled(ticks: &[f64]) -> impl Iterator<Item = (f64, String)> + '_ {
    let step = ticks.get(1).map_or(1.0, |t| t - ticks[0]);
    let decimals = (-step.log10().floor()).clamp(0.0, 10.0) as usize;
    ticks.iter().map(move |&t| (t, format!("{t:.decimals$}")))
}

/// Maps the span of `ticks` (at least two, ascending) onto pixels `from..to`.
fn scale(ticks: &[f64], from: f64, to: f64) -> impl Fn(f64) -> f64 {
    let (lo, hi) = (ticks[0], ticks[ticks.len() - 1]);
    move |v| from + (v - lo) / (hi - lo) * (to - from)
}

fn colour(i: usize) -> String {
    PALETTE.get(i).map_or_else(
        || format!("hsl({:.0},65%,45%)", (i as f64 * 137.508) % 360.0),
        |c| (*c).to_owned(),
    )
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every tag closed in order, no stray `<` or `>` in text.
    fn well_formed(svg: &str) -> bool {
        let mut stack = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            if rest[..i].contains('>') {
                return false;
            }
            let Some(j) = rest[i..].find('>').map(|j| i + j) else {
                return false;
            };
            let tag = &rest[i + 1..j];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop() != Some(name) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or(""));
            }
            rest = &rest[j + 1..];
        }
        stack.is_empty() && !rest.contains('>')
    }

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.to_owned(),
            points: points.to_vec(),
        }
    }

    fn chart(series: Vec<Series>) -> Chart {
        Chart {
            title: "Attainment <vs> rate".into(),
            x_label: "rate (req/s)".into(),
            y_label: "SLO attainment".into(),
            series,
            hlines: vec![("90% target".into(), 0.9)],
        }
    }

    #[test]
    fn one_polyline_per_non_empty_series() {
        let c = chart(vec![
            series("disagg", &[(4.0, 0.7), (1.0, 0.99), (2.0, 0.95)]),
            series("empty", &[]),
            series("all NaN", &[(f64::NAN, 1.0), (1.0, f64::INFINITY)]),
            series("single", &[(3.0, 0.5)]),
            series("agg", &[(1.0, 0.9), (f64::NAN, 0.5), (2.0, 0.6)]),
        ]);
        let svg = c.to_svg(800, 500);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(well_formed(&svg), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert_eq!(svg.matches("<circle").count(), 3 + 1 + 2);
        // NaN skipped, points drawn in ascending x.
        let agg = svg
            .lines()
            .filter(|l| l.starts_with("<polyline"))
            .nth(2)
            .unwrap();
        let coords = agg.split('"').nth(1).unwrap();
        assert_eq!(coords.split(' ').count(), 2);
        for name in ["disagg", "empty", "all NaN", "single", "agg", "90% target"] {
            assert!(svg.contains(&format!(">{name}</text>")), "{name}");
        }
    }

    #[test]
    fn text_is_escaped() {
        let svg = chart(vec![series(r#"a<b & "c""#, &[(1.0, 1.0)])]).to_svg(400, 300);
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot;"));
        assert!(svg.contains("Attainment &lt;vs&gt; rate"));
        assert!(well_formed(&svg));
    }

    #[test]
    fn degenerate_charts_render() {
        for c in [Chart::default(), chart(vec![series("one", &[(2.0, 2.0)])])] {
            for (w, h) in [(0, 0), (1, 1), (640, 480)] {
                let svg = c.to_svg(w, h);
                assert!(well_formed(&svg) && !svg.contains("NaN") && !svg.contains("inf"));
            }
        }
    }

    #[test]
    fn series_get_distinct_colours() {
        let many: Vec<Series> = (0..14)
            .map(|i| series(&format!("s{i}"), &[(1.0, 1.0)]))
            .collect();
        let svg = chart(many).to_svg(800, 600);
        let mut strokes: Vec<&str> = svg
            .lines()
            .filter(|l| l.starts_with("<polyline"))
            .filter_map(|l| l.split("stroke=\"").nth(1)?.split('"').next())
            .collect();
        strokes.sort_unstable();
        strokes.dedup();
        assert_eq!(strokes.len(), 14);
    }

    #[test]
    fn nice_ticks_examples() {
        assert_eq!(nice_ticks((0.0, 10.0), 5), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(
            nice_ticks((-3.0, 7.0), 5),
            [-4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0]
        );
        assert_eq!(
            nice_ticks((0.0, 1000.0), 5),
            [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
        );
        assert_eq!(
            nice_ticks((12.0, 37.0), 5),
            [10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0]
        );
        let t = nice_ticks((0.13, 0.87), 5);
        assert_eq!(t.len(), 6);
        assert!((t[1] - 0.2).abs() < 1e-12 && (t[5] - 1.0).abs() < 1e-12);
        // A single value is widened around itself.
        let t = nice_ticks((5.0, 5.0), 5);
        assert!(t[0] < 5.0 && 5.0 < t[t.len() - 1]);
        assert_eq!(nice_ticks((0.0, 0.0), 5), [-1.0, -0.5, 0.0, 0.5, 1.0]);
    }

    #[test]
    fn labels_use_the_decimals_of_the_step() {
        let labels = |t: &[f64]| labelled(t).map(|(_, l)| l).collect::<Vec<_>>();
        assert_eq!(
            labels(&[0.1, 0.2, 0.30000000000000004]),
            ["0.1", "0.2", "0.3"]
        );
        assert_eq!(labels(&[0.0, 0.05]), ["0.00", "0.05"]);
        assert_eq!(labels(&[0.0, 500.0, 1000.0]), ["0", "500", "1000"]);
    }

    proptest! {
        #[test]
        fn nice_ticks_cover_with_nice_steps(lo in -1e6f64..1e6, span in 1e-3f64..1e6) {
            let hi = lo + span;
            let t = nice_ticks((lo, hi), 5);
            prop_assert!(t[0] <= lo && hi <= t[t.len() - 1]);
            prop_assert!((3..=8).contains(&t.len()), "{t:?}");
            let step = t[1] - t[0];
            let mantissa = step / 10f64.powf(step.log10().floor());
            prop_assert!([1.0, 2.0, 5.0, 10.0].iter().any(|m| (mantissa - m).abs() < 1e-6), "{step}");
        }
    }
}

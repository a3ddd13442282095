//! A minimal SVG writer for the report's two kinds of plot: horizontal bars with whiskers
//! and target markers, and lines over linear or logarithmic axes. Plain text, no
//! dependencies; the output opens in any browser and renders on GitHub.

use std::fmt::Write;

/// Colours of the series, in order (Tableau 10).
pub const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#af7aa1", "#9c755f", "#bab0ab",
];

const WIDTH: f64 = 900.0;
const FONT: &str = "font-family=\"sans-serif\" font-size=\"12\"";

/// One bar: `value` with a whisker from `lo` to `hi`, and optionally a marker (e.g. the
/// target) drawn as a short vertical line.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
    /// Index into [`PALETTE`].
    pub color: usize,
    pub marker: Option<f64>,
}

/// Horizontal bars, one row per bar, sharing one linear axis from 0.
#[derive(Clone, Debug, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub axis_label: String,
    pub bars: Vec<Bar>,
    /// (name, colour index) for the legend.
    pub legend: Vec<(String, usize)>,
    /// Legend text of the markers, if any bar has one.
    pub marker_label: Option<String>,
}

/// A polyline through `points` (x ascending), optionally dashed, with dots at the points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: usize,
    pub dashed: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_x: bool,
    pub log_y: bool,
}

/// Escape text for use in SVG content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `ticks` intervals over
/// `range`.
pub fn nice_step(range: f64, ticks: usize) -> f64 {
    if !(range.is_finite() && range > 0.0) {
        return 1.0;
    }
    let raw = range / ticks.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let frac = raw / mag;
    let nice = if frac <= 1.0 {
        1.0
    } else if frac <= 2.0 {
        2.0
    } else if frac <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Linear ticks from 0 covering `max`; returns (ticks, axis end).
fn linear_ticks(max: f64) -> (Vec<f64>, f64) {
    let step = nice_step(max, 5);
    let end = (max / step).ceil().max(1.0) * step;
    let n = (end / step).round() as usize;
    ((0..=n).map(|i| i as f64 * step).collect(), end)
}

/// Powers of ten covering `[lo, hi]` (both > 0).
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    (
        10f64.powf(lo.log10().floor()),
        10f64.powf(hi.log10().ceil()),
    )
}

/// Format a tick value compactly (no trailing zeros, scientific below 0.001).
pub fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() < 0.001 || v.abs() >= 1e6 {
        format!("{v:e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn header(out: &mut String, height: f64, title: &str) {
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" {FONT}>"
    );
    let _ = writeln!(
        out,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        WIDTH / 2.0,
        escape(title)
    );
}

impl BarChart {
    pub fn render(&self) -> String {
        let (left, right, top, row) = (300.0, 30.0, 60.0, 22.0);
        let plot_h = row * self.bars.len().max(1) as f64;
        let height = top + plot_h + 50.0;
        let max = self
            .bars
            .iter()
            .flat_map(|b| [b.value, b.hi, b.marker.unwrap_or(0.0)])
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let (ticks, end) = linear_ticks(max);
        let plot_w = WIDTH - left - right;
        let x = |v: f64| left + plot_w * (v.max(0.0) / end);
        let mut out = String::new();
        header(&mut out, height, &self.title);

        // Legend.
        let mut lx = left;
        for (name, color) in &self.legend {
            let _ = writeln!(
                out,
                "<rect x=\"{lx:.1}\" y=\"34\" width=\"12\" height=\"12\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"44\">{}</text>",
                PALETTE[color % PALETTE.len()],
                lx + 16.0,
                escape(name)
            );
            lx += 30.0 + 7.0 * name.len() as f64;
        }
        if let Some(label) = &self.marker_label {
            let _ = writeln!(
                out,
                "<line x1=\"{lx:.1}\" y1=\"33\" x2=\"{lx:.1}\" y2=\"47\" stroke=\"black\" stroke-width=\"2\"/>\
                 <text x=\"{:.1}\" y=\"44\">{}</text>",
                lx + 6.0,
                escape(label)
            );
        }

        // Grid and axis.
        for t in &ticks {
            let _ = writeln!(
                out,
                "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
                x(*t),
                top + plot_h,
                top + plot_h + 16.0,
                fmt_tick(*t)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            left + plot_w / 2.0,
            top + plot_h + 36.0,
            escape(&self.axis_label)
        );

        for (i, b) in self.bars.iter().enumerate() {
            let y = top + row * i as f64;
            let color = PALETTE[b.color % PALETTE.len()];
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                left - 8.0,
                y + row * 0.7,
                escape(&b.label)
            );
            if b.value.is_finite() {
                let _ = writeln!(
                    out,
                    "<rect x=\"{left}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\">\
                     <title>{}: {:.1}</title></rect>",
                    y + 3.0,
                    x(b.value) - left,
                    row - 6.0,
                    escape(&b.label),
                    b.value
                );
                let _ = writeln!(
                    out,
                    "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{:.1}</text>",
                    x(b.hi.max(b.value)) + 4.0,
                    y + row * 0.7,
                    b.value
                );
            }
            if b.lo.is_finite() && b.hi.is_finite() && b.hi > b.lo {
                let ym = y + row / 2.0;
                let _ = writeln!(
                    out,
                    "<line x1=\"{:.1}\" y1=\"{ym:.1}\" x2=\"{:.1}\" y2=\"{ym:.1}\" stroke=\"#333\"/>",
                    x(b.lo),
                    x(b.hi)
                );
            }
            if let Some(m) = b.marker.filter(|m| m.is_finite()) {
                let _ = writeln!(
                    out,
                    "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"black\" stroke-width=\"2\"/>",
                    x(m),
                    y + 1.0,
                    y + row - 1.0
                );
            }
        }
        out.push_str("</svg>\n");
        out
    }
}

impl LineChart {
    pub fn render(&self) -> String {
        let (left, right, top, bottom) = (80.0, 200.0, 40.0, 60.0);
        let height = 480.0;
        let (plot_w, plot_h) = (WIDTH - left - right, height - top - bottom);
        let points: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| {
                x.is_finite()
                    && y.is_finite()
                    && (!self.log_x || *x > 0.0)
                    && (!self.log_y || *y > 0.0)
            })
            .collect();
        let (x0, x1) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.0), b.max(p.0))
            });
        let (y0, y1) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        let (x0, x1) = if points.is_empty() {
            (1.0, 10.0)
        } else {
            (x0, x1)
        };
        let (y0, y1) = if points.is_empty() {
            (1.0, 10.0)
        } else {
            (y0, y1)
        };
        let axis = |lo: f64, hi: f64, log: bool| -> (f64, f64, Vec<f64>) {
            if log {
                let (a, b) = decades(lo, hi.max(lo * 10.0));
                let n = (b.log10() - a.log10()).round() as i32;
                let ticks = (0..=n).map(|i| a * 10f64.powi(i)).collect();
                (a, b, ticks)
            } else {
                let (ticks, end) = linear_ticks(hi);
                (0.0, end, ticks)
            }
        };
        let (xa, xb, xt) = axis(x0, x1, self.log_x);
        let (ya, yb, yt) = axis(y0, y1, self.log_y);
        let scale = |v: f64, a: f64, b: f64, log: bool| -> f64 {
            if log {
                (v.log10() - a.log10()) / (b.log10() - a.log10())
            } else {
                (v - a) / (b - a)
            }
        };
        let px = |v: f64| left + plot_w * scale(v, xa, xb, self.log_x);
        let py = |v: f64| top + plot_h * (1.0 - scale(v, ya, yb, self.log_y));

        let mut out = String::new();
        header(&mut out, height, &self.title);
        for t in &xt {
            let _ = writeln!(
                out,
                "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
                px(*t),
                top + plot_h,
                top + plot_h + 16.0,
                fmt_tick(*t)
            );
        }
        for t in &yt {
            let _ = writeln!(
                out,
                "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>",
                py(*t),
                left + plot_w,
                left - 6.0,
                py(*t) + 4.0,
                fmt_tick(*t)
            );
        }
        let _ = writeln!(
            out,
            "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#888\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
             <text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            left + plot_w / 2.0,
            height - 18.0,
            escape(&self.x_label),
            top + plot_h / 2.0,
            escape(&self.y_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[s.color % PALETTE.len()];
            let pts: Vec<String> = s
                .points
                .iter()
                .filter(|(x, y)| {
                    x.is_finite()
                        && y.is_finite()
                        && (!self.log_x || *x > 0.0)
                        && (!self.log_y || *y > 0.0)
                })
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let dash = if s.dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>",
                pts.join(" ")
            );
            if !s.dashed {
                for p in &pts {
                    let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                    let _ = writeln!(
                        out,
                        "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{color}\"/>"
                    );
                }
            }
            let ly = top + 10.0 + 20.0 * i as f64;
            let lx = left + plot_w + 12.0;
            let _ = writeln!(
                out,
                "<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                lx + 24.0,
                lx + 30.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_one_two_five() {
        assert_eq!(nice_step(100.0, 5), 20.0);
        assert_eq!(nice_step(7.0, 5), 2.0);
        assert_eq!(nice_step(0.3, 5), 0.1);
        assert_eq!(nice_step(0.0, 5), 1.0);
        let (ticks, end) = linear_ticks(93.0);
        assert_eq!((ticks.first(), end), (Some(&0.0), 100.0));
        assert_eq!(ticks.len(), 6);
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
        let chart = BarChart {
            title: "x < y".into(),
            axis_label: "ns".into(),
            bars: vec![Bar {
                label: "R&D".into(),
                value: 1.0,
                lo: 0.5,
                hi: 1.5,
                color: 0,
                marker: None,
            }],
            legend: vec![],
            marker_label: None,
        };
        let svg = chart.render();
        assert!(svg.contains("x &lt; y") && svg.contains("R&amp;D"));
        assert!(!svg.contains("R&D"));
    }

    #[test]
    fn bar_chart_scales_bars_to_the_largest_value() {
        let bar = |label: &str, value: f64, marker| Bar {
            label: label.into(),
            value,
            lo: value,
            hi: value,
            color: 1,
            marker,
        };
        let chart = BarChart {
            title: "t".into(),
            axis_label: "ns/packet".into(),
            bars: vec![bar("a", 50.0, Some(100.0)), bar("b", 25.0, None)],
            legend: vec![("ours".into(), 1)],
            marker_label: Some("target".into()),
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Axis 0..100 over 570 px: 50 -> 285 px wide, 25 -> 142.5.
        assert!(svg.contains("width=\"285.0\""), "{svg}");
        assert!(svg.contains("width=\"142.5\""), "{svg}");
        assert_eq!(svg.matches("<rect x=\"300\"").count(), 2);
        assert!(svg.contains("stroke-width=\"2\"/>"), "target marker drawn");
    }

    #[test]
    fn log_log_line_chart_places_decades_evenly() {
        let chart = LineChart {
            title: "disruption".into(),
            x_label: "N".into(),
            y_label: "fraction".into(),
            series: vec![
                Series {
                    name: "ideal".into(),
                    points: vec![(1.0, 1.0), (10.0, 0.1), (100.0, 0.01)],
                    color: 0,
                    dashed: true,
                },
                Series {
                    name: "skip".into(),
                    points: vec![(0.0, 1.0), (10.0, f64::NAN)],
                    color: 1,
                    dashed: false,
                },
            ],
            log_x: true,
            log_y: true,
        };
        let svg = chart.render();
        assert!(!svg.contains("NaN"));
        // x: 1..100 over 620 px from 80; y: 0.01..1 over 380 px from 40.
        assert!(
            svg.contains("points=\"80.0,40.0 390.0,230.0 700.0,420.0\""),
            "{svg}"
        );
        assert!(
            svg.contains("points=\"\""),
            "points off a log axis are left out"
        );
        for tick in [">0.01<", ">0.1<", ">1<", ">10<", ">100<"] {
            assert!(svg.contains(tick), "tick {tick}");
        }
    }
}

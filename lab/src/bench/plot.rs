//! Line charts as hand-written SVG: the latency CDFs and the RSS timelines of a bench run,
//! drawn from the run's own numbers. A figure is a column of panels (one per mode) sharing
//! the x range, so panels compare at a glance. Plain SVG 1.1 with a white background and
//! no scripts or external fonts, so GitHub renders it as an image in both colour schemes.

use std::fmt::Write as _;

/// How values map onto an axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scale {
    Linear,
    /// Base-10 logarithmic; values must be positive.
    Log,
    /// For a fraction `f` in 0..1: `-log10(1 - f)`, so 90%, 99% and 99.9% are evenly
    /// spaced and a CDF's tail gets as much room as its body. Tops out at 99.99%.
    Percentile,
}

#[derive(Debug, Clone)]
pub(crate) struct Axis {
    pub(crate) label: String,
    pub(crate) scale: Scale,
    /// Fixed range in data units; `None` fits the data of every panel.
    pub(crate) range: Option<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) color: &'static str,
    pub(crate) dashed: bool,
    pub(crate) points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Panel {
    pub(crate) title: String,
    pub(crate) series: Vec<Series>,
}

#[derive(Debug, Clone)]
pub(crate) struct Figure {
    pub(crate) title: String,
    pub(crate) x: Axis,
    pub(crate) y: Axis,
    pub(crate) panels: Vec<Panel>,
}

/// Colours that stay apart for the colour-blind (Okabe-Ito).
pub(crate) const PALETTE: [&str; 6] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
];

const WIDTH: f64 = 920.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 200.0;
const TITLE_HEIGHT: f64 = 40.0;
const PANEL_HEIGHT: f64 = 290.0;
const PANEL_TOP: f64 = 30.0;
const PLOT_HEIGHT: f64 = 210.0;
/// The percentile scale's top: 99.99%.
const PERCENTILE_MAX: f64 = 4.0;

/// Renders `figure` as a standalone SVG document.
pub(crate) fn render(figure: &Figure) -> String {
    let height = TITLE_HEIGHT + PANEL_HEIGHT * figure.panels.len().max(1) as f64 + 10.0;
    let plot_width = WIDTH - LEFT - RIGHT;
    let all_points = || {
        figure
            .panels
            .iter()
            .flat_map(|p| &p.series)
            .flat_map(|s| &s.points)
    };
    let x_range = figure
        .x
        .range
        .unwrap_or_else(|| fit(figure.x.scale, all_points().map(|p| p.0)));
    let y_range = figure
        .y
        .range
        .unwrap_or_else(|| fit(figure.y.scale, all_points().map(|p| p.1)));

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        escape(&figure.title)
    );
    for (i, panel) in figure.panels.iter().enumerate() {
        let top = TITLE_HEIGHT + PANEL_HEIGHT * i as f64 + PANEL_TOP;
        let frame = Frame {
            left: LEFT,
            top,
            width: plot_width,
            height: PLOT_HEIGHT,
            x: (figure.x.scale, x_range),
            y: (figure.y.scale, y_range),
        };
        draw_panel(&mut svg, figure, panel, &frame);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Where a panel's plot area is and what it shows.
#[derive(Debug)]
struct Frame {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x: (Scale, (f64, f64)),
    y: (Scale, (f64, f64)),
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        self.left + self.width * unit(self.x.0, self.x.1, x)
    }

    fn py(&self, y: f64) -> f64 {
        self.top + self.height * (1.0 - unit(self.y.0, self.y.1, y))
    }
}

fn draw_panel(svg: &mut String, figure: &Figure, panel: &Panel, frame: &Frame) {
    let (left, top, width, height) = (frame.left, frame.top, frame.width, frame.height);
    let bottom = top + height;
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        top - 10.0,
        escape(&panel.title)
    );
    // Grid and tick labels.
    for (value, label) in ticks(frame.x.0, frame.x.1) {
        let x = frame.px(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#e0e0e0"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#333">{}</text>"##,
            bottom + 16.0,
            escape(&label)
        );
    }
    for (value, label) in ticks(frame.y.0, frame.y.1) {
        let y = frame.py(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end" fill="#333">{}</text>"##,
            left + width,
            left - 6.0,
            y + 4.0,
            escape(&label)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#555"/>"##
    );
    // Axis labels.
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#333">{}</text>"##,
        left + width / 2.0,
        bottom + 34.0,
        escape(&figure.x.label)
    );
    let (lx, ly) = (left - 52.0, top + height / 2.0);
    let _ = writeln!(
        svg,
        r##"<text x="{lx}" y="{ly:.1}" text-anchor="middle" fill="#333" transform="rotate(-90 {lx} {ly:.1})">{}</text>"##,
        escape(&figure.y.label)
    );
    // Curves, clipped to the plot area by clamping (no clipPath needed for monotone data).
    for series in &panel.series {
        let points: Vec<String> = series
            .points
            .iter()
            .filter(|(x, y)| plottable(frame.x.0, *x) && plottable(frame.y.0, *y))
            .map(|&(x, y)| format!("{:.1},{:.1}", frame.px(x), frame.py(y)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let dash = if series.dashed {
            r#" stroke-dasharray="7 4""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
            series.color,
            points.join(" ")
        );
    }
    // Legend, right of the plot.
    for (i, series) in panel.series.iter().enumerate() {
        let y = top + 14.0 + 20.0 * i as f64;
        let x = left + width + 14.0;
        let dash = if series.dashed {
            r#" stroke-dasharray="7 4""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            x + 26.0,
            series.color,
            x + 32.0,
            y + 4.0,
            escape(&series.label)
        );
    }
}

/// Whether `value` can be placed on an axis of `scale`.
fn plottable(scale: Scale, value: f64) -> bool {
    match scale {
        Scale::Log => value > 0.0 && value.is_finite(),
        Scale::Linear | Scale::Percentile => value.is_finite(),
    }
}

/// Position of `value` within `range` on `scale`, 0 at the start and 1 at the end, clamped.
fn unit(scale: Scale, (lo, hi): (f64, f64), value: f64) -> f64 {
    let (lo, hi, v) = match scale {
        Scale::Linear => (lo, hi, value),
        Scale::Log => (lo.log10(), hi.log10(), value.max(f64::MIN_POSITIVE).log10()),
        Scale::Percentile => (tail(lo), tail(hi), tail(value)),
    };
    if hi <= lo {
        return 0.5;
    }
    ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// The percentile scale's transform, capped at 99.99%.
fn tail(fraction: f64) -> f64 {
    (-(1.0 - fraction).max(1e-12).log10()).clamp(0.0, PERCENTILE_MAX)
}

/// A range that holds every value, widened to whole decades on a log scale and to a
/// zero-based, slightly padded range on a linear one.
fn fit(scale: Scale, values: impl Iterator<Item = f64>) -> (f64, f64) {
    let values: Vec<f64> = values.filter(|v| plottable(scale, *v)).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match scale {
        _ if values.is_empty() => match scale {
            Scale::Log => (1.0, 10.0),
            Scale::Linear => (0.0, 1.0),
            Scale::Percentile => (0.0, 0.9999),
        },
        Scale::Log => {
            let lo = 10f64.powf(lo.log10().floor());
            let hi = 10f64.powf(hi.log10().ceil());
            (lo, if hi > lo { hi } else { lo * 10.0 })
        }
        Scale::Linear => {
            let lo = lo.min(0.0);
            let hi = if hi > lo { hi * 1.05 } else { lo + 1.0 };
            (lo, hi)
        }
        Scale::Percentile => (0.0, 0.9999),
    }
}

/// Tick positions and labels for `range` on `scale`.
fn ticks(scale: Scale, (lo, hi): (f64, f64)) -> Vec<(f64, String)> {
    match scale {
        Scale::Percentile => [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999]
            .into_iter()
            .filter(|f| (lo..=hi).contains(f))
            .map(|f| (f, percent_label(f)))
            .collect(),
        Scale::Log => {
            let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
            // With few decades, 2 and 5 get labels too.
            let steps: &[f64] = if last - first <= 3 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            let mut ticks = Vec::new();
            for decade in first..=last {
                for step in steps {
                    let value = step * 10f64.powi(decade);
                    if value >= lo * 0.999 && value <= hi * 1.001 {
                        ticks.push((value, number_label(value)));
                    }
                }
            }
            ticks
        }
        Scale::Linear => {
            let step = nice_step((hi - lo) / 5.0);
            let mut ticks = Vec::new();
            let mut value = (lo / step).ceil() * step;
            while value <= hi + step * 1e-9 {
                ticks.push((value, number_label(value)));
                value += step;
            }
            ticks
        }
    }
}

/// The 1, 2 or 5 times a power of ten nearest above `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw > 0.0 && raw.is_finite()) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= raw * 0.999)
        .unwrap_or(10.0 * magnitude)
}

/// `0.5` → `p50`, `0.999` → `p99.9`, `0.0` → `min`.
fn percent_label(fraction: f64) -> String {
    if fraction == 0.0 {
        return "min".to_owned();
    }
    let text = format!("{:.2}", fraction * 100.0);
    format!("p{}", text.trim_end_matches('0').trim_end_matches('.'))
}

/// Shortest plain rendering: `0.1`, `2`, `1000`, `12.5`.
fn number_label(value: f64) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(points: Vec<(f64, f64)>) -> Figure {
        Figure {
            title: "Latency <p99> & more".to_owned(),
            x: Axis {
                label: "latency (ms)".to_owned(),
                scale: Scale::Log,
                range: None,
            },
            y: Axis {
                label: "percentile".to_owned(),
                scale: Scale::Percentile,
                range: None,
            },
            panels: vec![Panel {
                title: "saturation".to_owned(),
                series: vec![
                    Series {
                        label: "orderflow".to_owned(),
                        color: PALETTE[0],
                        dashed: false,
                        points: points.clone(),
                    },
                    Series {
                        label: "baseline".to_owned(),
                        color: PALETTE[1],
                        dashed: true,
                        points,
                    },
                ],
            }],
        }
    }

    #[test]
    fn renders_a_standalone_escaped_document() {
        let svg = render(&figure(vec![(1.5, 0.1), (3.0, 0.5), (40.0, 1.0)]));
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Latency &lt;p99&gt; &amp; more"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("stroke-dasharray"));
        assert!(svg.contains(">latency (ms)<") && svg.contains(">percentile<"));
        assert!(svg.contains(">orderflow<") && svg.contains(">baseline<"));
        // Decades 1..100 with 2 and 5 between.
        for label in [">1<", ">2<", ">5<", ">10<", ">100<", ">p99<", ">p99.9<"] {
            assert!(svg.contains(label), "missing tick {label}");
        }
        // Every tag that opens closes: a cheap well-formedness check.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn log_scale_drops_non_positive_points() {
        let svg = render(&figure(vec![(0.0, 0.1), (-1.0, 0.2)]));
        assert_eq!(svg.matches("<polyline").count(), 0);
    }

    #[test]
    fn scales_map_ranges_to_unit_interval() {
        assert_eq!(unit(Scale::Linear, (0.0, 10.0), 5.0), 0.5);
        assert_eq!(unit(Scale::Linear, (0.0, 10.0), 20.0), 1.0);
        assert!((unit(Scale::Log, (1.0, 100.0), 10.0) - 0.5).abs() < 1e-9);
        assert!((unit(Scale::Percentile, (0.0, 0.9999), 0.99) - 0.5).abs() < 1e-9);
        assert_eq!(unit(Scale::Percentile, (0.0, 0.9999), 1.0), 1.0);
        assert_eq!(unit(Scale::Linear, (3.0, 3.0), 3.0), 0.5);
    }

    #[test]
    fn fits_decades_and_padded_linear_ranges() {
        assert_eq!(fit(Scale::Log, [0.3, 42.0].into_iter()), (0.1, 100.0));
        assert_eq!(fit(Scale::Log, [10.0].into_iter()), (10.0, 100.0));
        let (lo, hi) = fit(Scale::Linear, [20.0, 40.0].into_iter());
        assert_eq!(lo, 0.0);
        assert!(hi > 40.0);
        assert_eq!(fit(Scale::Linear, std::iter::empty()), (0.0, 1.0));
    }

    #[test]
    fn ticks_are_round_numbers() {
        let labels: Vec<String> = ticks(Scale::Linear, (0.0, 47.0))
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert_eq!(labels, ["0", "10", "20", "30", "40"]);
        let labels: Vec<String> = ticks(Scale::Log, (0.1, 100_000.0))
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert_eq!(labels, ["0.1", "1", "10", "100", "1000", "10000", "100000"]);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(1.2), 2.0);
        assert_eq!(nice_step(0.03), 0.05);
    }

    #[test]
    fn percentile_labels() {
        assert_eq!(percent_label(0.0), "min");
        assert_eq!(percent_label(0.5), "p50");
        assert_eq!(percent_label(0.99), "p99");
        assert_eq!(percent_label(0.999), "p99.9");
        assert_eq!(percent_label(0.9999), "p99.99");
    }
}

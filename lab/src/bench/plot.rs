//! Line charts of a bench run, drawn with `plotters` into SVG: the latency CDFs and the RSS
//! timelines, from the run's own numbers. A figure is a column of panels (one per mode)
//! sharing both ranges, so panels compare at a glance. White background, no scripts or
//! external fonts, so GitHub renders it as an image in both colour schemes.

use std::ops::Range;

use anyhow::{Result, anyhow};
use plotters::{
    coord::{
        Shift,
        ranged1d::{AsRangedCoord, ValueFormatter},
    },
    prelude::*,
};

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
}

#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) color: RGBColor,
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
pub(crate) const PALETTE: [RGBColor; 6] = [
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0xD5, 0x5E, 0x00),
];

const WIDTH: u32 = 920;
const TITLE_HEIGHT: u32 = 40;
const PANEL_HEIGHT: u32 = 290;
/// The percentile scale's top: 99.99%.
const PERCENTILE_MAX: f64 = 4.0;
const FONT: &str = "sans-serif";

/// Renders `figure` as a standalone SVG document.
pub(crate) fn render(figure: &Figure) -> Result<String> {
    let panels = figure.panels.len().max(1) as u32;
    let height = TITLE_HEIGHT + PANEL_HEIGHT * panels + 10;
    let points = || {
        figure
            .panels
            .iter()
            .flat_map(|p| &p.series)
            .flat_map(|s| &s.points)
    };
    let x = fit(figure.x.scale, points().map(|p| p.0));
    let y = fit(figure.y.scale, points().map(|p| p.1));

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let root = root
            .titled(&figure.title, (FONT, 18).into_font().style(FontStyle::Bold))
            .map_err(drawing)?;
        for (area, panel) in root
            .split_evenly((panels as usize, 1))
            .iter()
            .zip(&figure.panels)
        {
            // Each scale is its own coordinate type; the percentile scale is drawn on its
            // transform, with labels that name the percentiles.
            match figure.x.scale {
                Scale::Log => draw_on_y(area, figure, panel, (x.clone()).log_scale(), &y)?,
                Scale::Linear | Scale::Percentile => draw_on_y(area, figure, panel, x.clone(), &y)?,
            }
        }
        root.present().map_err(drawing)?;
    }
    Ok(svg)
}

fn draw_on_y<X>(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    figure: &Figure,
    panel: &Panel,
    x: X,
    y: &Range<f64>,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    match figure.y.scale {
        Scale::Log => draw_panel(area, figure, panel, x, y.clone().log_scale()),
        Scale::Linear | Scale::Percentile => draw_panel(area, figure, panel, x, y.clone()),
    }
}

fn draw_panel<X, Y>(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    figure: &Figure,
    panel: &Panel,
    x: X,
    y: Y,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 14).into_font().style(FontStyle::Bold))
        .margin(10)
        .margin_right(30)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(drawing)?;
    let (x_scale, y_scale) = (figure.x.scale, figure.y.scale);
    let x_label = move |v: &f64| label(x_scale, *v);
    let y_label = move |v: &f64| label(y_scale, *v);
    chart
        .configure_mesh()
        .x_labels(ticks(x_scale))
        .y_labels(ticks(y_scale))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(0xe0, 0xe0, 0xe0))
        .x_desc(figure.x.label.as_str())
        .y_desc(figure.y.label.as_str())
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style((FONT, 12))
        .draw()
        .map_err(drawing)?;
    for series in &panel.series {
        let points: Vec<(f64, f64)> = series
            .points
            .iter()
            .filter(|(x, y)| plottable(x_scale, *x) && plottable(y_scale, *y))
            .map(|&(x, y)| (onto(x_scale, x), onto(y_scale, y)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let style = series.color.stroke_width(2);
        let drawn = if series.dashed {
            chart.draw_series(DashedLineSeries::new(points, 7, 4, style))
        } else {
            chart.draw_series(LineSeries::new(points, style))
        };
        drawn
            .map_err(drawing)?
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 26, y)], style));
    }
    if !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0x55, 0x55, 0x55))
            .label_font((FONT, 12))
            .draw()
            .map_err(drawing)?;
    }
    Ok(())
}

fn drawing<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow!("drawing a chart: {error:?}")
}

/// Whether `value` can be placed on an axis of `scale`.
fn plottable(scale: Scale, value: f64) -> bool {
    match scale {
        Scale::Log => value > 0.0 && value.is_finite(),
        Scale::Linear | Scale::Percentile => value.is_finite(),
    }
}

/// Where a data value sits on the chart's coordinate: itself, except on the percentile
/// scale, which is drawn on its transform.
fn onto(scale: Scale, value: f64) -> f64 {
    match scale {
        Scale::Percentile => tail(value),
        Scale::Linear | Scale::Log => value,
    }
}

/// The percentile scale's transform, capped at 99.99%.
fn tail(fraction: f64) -> f64 {
    (-(1.0 - fraction).max(1e-12).log10()).clamp(0.0, PERCENTILE_MAX)
}

/// How many ticks plotters may place: on the percentile scale, one per "nine" (min, p90,
/// p99, p99.9, p99.99), which fall on whole coordinates.
fn ticks(scale: Scale) -> usize {
    match scale {
        Scale::Percentile => PERCENTILE_MAX as usize + 1,
        Scale::Linear | Scale::Log => 10,
    }
}

/// The tick label of coordinate `value` on `scale`.
fn label(scale: Scale, value: f64) -> String {
    match scale {
        Scale::Percentile => percent_label(1.0 - 10f64.powf(-value)),
        Scale::Linear | Scale::Log => number_label(value),
    }
}

/// The chart range that holds every value, in chart coordinates: widened to whole decades
/// on a log scale, zero-based and slightly padded on a linear one, min to p99.99 on the
/// percentile scale.
fn fit(scale: Scale, values: impl Iterator<Item = f64>) -> Range<f64> {
    let values: Vec<f64> = values.filter(|v| plottable(scale, *v)).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match scale {
        Scale::Percentile => 0.0..PERCENTILE_MAX,
        Scale::Log if values.is_empty() => 1.0..10.0,
        Scale::Linear if values.is_empty() => 0.0..1.0,
        Scale::Log => {
            let lo = 10f64.powf(lo.log10().floor());
            let hi = 10f64.powf(hi.log10().ceil());
            lo..if hi > lo { hi } else { lo * 10.0 }
        }
        Scale::Linear => {
            let lo = lo.min(0.0);
            lo..if hi > lo { hi * 1.05 } else { lo + 1.0 }
        }
    }
}

/// `0.5` → `p50`, `0.999` → `p99.9`, `0.0` → `min`.
fn percent_label(fraction: f64) -> String {
    if fraction <= 1e-9 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(points: Vec<(f64, f64)>) -> Figure {
        Figure {
            title: "Latency <p99> & more".to_owned(),
            x: Axis {
                label: "latency (ms)".to_owned(),
                scale: Scale::Log,
            },
            y: Axis {
                label: "percentile".to_owned(),
                scale: Scale::Percentile,
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
        let svg = render(&figure(vec![(1.5, 0.1), (3.0, 0.5), (40.0, 0.999)])).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Latency &lt;p99&gt; &amp; more"));
        // plotters writes each text on a line of its own.
        let text = |t: &str| svg.contains(&format!("\n{t}\n"));
        assert!(text("latency (ms)") && text("percentile") && text("saturation"));
        assert!(text("orderflow") && text("baseline"));
        assert!(svg.contains(r##"stroke="#0072B2""##), "orderflow's colour");
        assert!(svg.contains(r##"stroke="#E69F00""##), "baseline's colour");
        for label in ["1", "10", "100", "min", "p90", "p99", "p99.9", "p99.99"] {
            assert!(text(label), "missing tick {label}");
        }
        assert!(!text("p68.38"), "ticks fall on whole nines only");
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn log_scale_drops_non_positive_points() {
        let drawn = render(&figure(vec![(2.0, 0.1), (3.0, 0.2)])).unwrap();
        let dropped = render(&figure(vec![(0.0, 0.1), (-1.0, 0.2)])).unwrap();
        assert!(drawn.contains(r##"stroke="#0072B2""##));
        assert!(!dropped.contains(r##"stroke="#0072B2""##));
    }

    #[test]
    fn the_percentile_scale_spaces_the_tail_evenly() {
        assert!((tail(0.9) - 1.0).abs() < 1e-9);
        assert!((tail(0.99) - 2.0).abs() < 1e-9);
        assert_eq!(tail(1.0), PERCENTILE_MAX);
        assert_eq!(label(Scale::Percentile, 2.0), "p99");
        assert_eq!(label(Scale::Percentile, 0.0), "min");
    }

    #[test]
    fn fits_decades_and_padded_linear_ranges() {
        assert_eq!(fit(Scale::Log, [0.3, 42.0].into_iter()), 0.1..100.0);
        assert_eq!(fit(Scale::Log, [10.0].into_iter()), 10.0..100.0);
        let linear = fit(Scale::Linear, [20.0, 40.0].into_iter());
        assert_eq!(linear.start, 0.0);
        assert!(linear.end > 40.0);
        assert_eq!(fit(Scale::Linear, std::iter::empty()), 0.0..1.0);
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

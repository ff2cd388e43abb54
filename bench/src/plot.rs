//! SVG plots (plotters, SVG backend: text is emitted as SVG <text>, so no font files needed).

use plotters::prelude::*;

type Res = Result<(), String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("plot: {e:?}")
}

fn percentile_label(x: f64) -> String {
    // x = 1 / (1 - q)
    let q = 100.0 * (1.0 - 1.0 / x);
    if q < 1e-9 {
        "0%".into()
    } else {
        let s = format!("{q:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}%")
    }
}

/// A line named `label` in the legend, drawn there with the same style.
fn labeled_line<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pts: impl IntoIterator<Item = CT::From>,
    style: ShapeStyle,
    label: &str,
) -> Res
where
    CT::From: Clone + 'static,
{
    chart
        .draw_series(LineSeries::new(pts, style))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    Ok(())
}

/// The legend of the labeled lines, upper left.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Res {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// Latency by percentile (HdrHistogram style: x = 1/(1-q) on a log axis), one line per series.
pub fn latency(path: &str, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Res {
    let series: Vec<&(String, Vec<(f64, f64)>)> =
        series.iter().filter(|s| !s.1.is_empty()).collect();
    if series.is_empty() {
        return Ok(());
    }
    let xmax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(10.0f64, f64::max)
        .max(10.0);
    let xmax = 10f64.powf(xmax.log10().ceil());
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .margin_right(40)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((1f64..xmax).log_scale(), 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in series.iter().map(|s| (&s.0, &s.1)).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        labeled_line(&mut chart, pts.iter().copied(), color.stroke_width(2), name)?;
    }
    legend(&mut chart)?;
    root.present().map_err(err)
}

/// One stacked chart of a timeline plot: a quantity over time.
pub struct Panel {
    pub label: &'static str,
    pub values: Vec<f64>,
    pub color: RGBColor,
}

/// Quantities over time (open connections, server RSS, kernel memory, CPU), one chart each,
/// stacked on a shared time axis.
pub fn timeline(path: &str, title: &str, t: &[f64], panels: &[Panel]) -> Res {
    if t.is_empty() || panels.is_empty() {
        return Ok(());
    }
    let height = 80 + 340 * panels.len() as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = root.split_evenly((panels.len(), 1));
    let tmax = t.iter().copied().fold(0.1f64, f64::max);
    for (area, p) in areas.iter().zip(panels) {
        let hi = p.values.iter().copied().fold(0.0f64, f64::max).max(1e-3) * 1.05;
        let mut c = ChartBuilder::on(area)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..tmax, 0f64..hi)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc("seconds")
            .y_desc(p.label)
            .y_label_formatter(&|y| {
                if hi >= 100.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()
            .map_err(err)?;
        c.draw_series(LineSeries::new(
            t.iter().copied().zip(p.values.iter().copied()),
            p.color.stroke_width(2),
        ))
        .map_err(err)?;
    }
    root.present().map_err(err)
}

/// Ladder: time until the last member has the message (p50 and p95) by room size.
pub fn ladder(path: &str, title: &str, pts: &[(u64, f64, f64)], bound_ms: f64) -> Res {
    if pts.is_empty() {
        return Ok(());
    }
    let xmax = pts.iter().map(|p| p.0).max().unwrap_or(1) as f64 * 1.05;
    let ymax = pts
        .iter()
        .map(|p| p.2)
        .filter(|v| v.is_finite())
        .fold(bound_ms, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("room members")
        .y_desc("last member has it (ms)")
        .draw()
        .map_err(err)?;
    let clip = |v: f64| if v.is_finite() { v.min(ymax) } else { ymax };
    labeled_line(
        &mut c,
        pts.iter().map(|p| (p.0 as f64, clip(p.1))),
        BLUE.stroke_width(2),
        "p50",
    )?;
    labeled_line(
        &mut c,
        pts.iter().map(|p| (p.0 as f64, clip(p.2))),
        RED.stroke_width(2),
        "p95",
    )?;
    labeled_line(
        &mut c,
        [(0.0, bound_ms), (xmax, bound_ms)],
        BLACK.mix(0.5).into(),
        "bound",
    )?;
    legend(&mut c)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(1000.0), "99.9%");
    }

    #[test]
    fn svg_files_render_with_text() {
        let dir = std::env::temp_dir().join(format!("megasock-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("lat.svg");
        let pts: Vec<(f64, f64)> = (0..50)
            .map(|i| (1.0 + i as f64 * 20.0, 10.0 + i as f64))
            .collect();
        latency(p.to_str().unwrap(), "latency", &[("rtt".into(), pts)]).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("<svg") && svg.contains("percentile") && svg.contains("rtt"));
        let t = dir.join("t.svg");
        let panel = |label, values: &[f64]| Panel {
            label,
            values: values.to_vec(),
            color: BLUE,
        };
        timeline(
            t.to_str().unwrap(),
            "conns",
            &[0.0, 1.0, 2.0],
            &[
                panel("open connections", &[0.0, 10.0, 20.0]),
                panel("server RSS (MiB)", &[1.0, 2.0, 3.0]),
            ],
        )
        .unwrap();
        assert!(std::fs::read_to_string(&t).unwrap().contains("server RSS"));
        let l = dir.join("l.svg");
        ladder(
            l.to_str().unwrap(),
            "ladder",
            &[(1000, 1.0, 2.0), (2000, 3.0, f64::INFINITY)],
            250.0,
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Loss curves of one or more runs as an SVG (plotters).

use crate::error::{PfcError, Result};
use plotters::prelude::*;
use std::path::Path;

/// Draws each `(label, losses)` curve against the step number into an SVG at `path`. The curves
/// are smoothed by a moving average of `smooth` steps (1 = raw) so that runs can be compared.
pub fn plot_losses(
    path: &Path,
    title: &str,
    curves: &[(String, Vec<f32>)],
    smooth: usize,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| PfcError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let smooth = smooth.max(1);
    let smoothed: Vec<(String, Vec<(f32, f32)>)> = curves
        .iter()
        .map(|(label, losses)| {
            let points = (0..losses.len())
                .map(|i| {
                    let lo = i.saturating_sub(smooth - 1);
                    let w = &losses[lo..=i];
                    ((i + 1) as f32, w.iter().sum::<f32>() / w.len() as f32)
                })
                .collect();
            (label.clone(), points)
        })
        .collect();
    let steps = curves
        .iter()
        .map(|(_, l)| l.len())
        .max()
        .unwrap_or(1)
        .max(2) as f32;
    let (lo, hi) = smoothed
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .filter(|y| y.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    let (lo, hi) = if lo < hi { (lo, hi) } else { (0.0, 1.0) };
    let pad = (hi - lo) * 0.05;

    // Drawn into memory, then written atomically: a failure midway (or plotters writing what it
    // has when its backend drops) never truncates an existing file at `path`.
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(1f32..steps, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(format!("loss (moving average of {smooth})"))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (label, points)) in smoothed.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    crate::atomic_file::write_bytes_atomic(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_both_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let curves = vec![
            ("r = 1.0".to_string(), vec![5.0, 4.0, 3.0, 2.5]),
            ("r = 0.1".to_string(), vec![5.0, 4.2, 3.1, 2.4]),
        ];
        plot_losses(&path, "loss", &curves, 2).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("r = 0.1") && svg.contains("polyline"));
        let bad = dir.path().join("no/such/dir/loss.svg");
        assert!(plot_losses(&bad, "loss", &curves, 1).is_err());
    }
}

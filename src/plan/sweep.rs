//! Per-GPU memory against the number of classes, for model parallel (r = 1), Partial FC at the
//! configured r, and fused logits: the picture the paper argues from, as numbers and as an SVG.

use super::buffers::LogitsMode;
use super::config::{PlanConfig, MAX_SHARD_CLASSES};
use crate::error::{PfcError, Result};

/// The three regimes a sweep compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Model parallel: every class of the shard, logits materialized (r = 1).
    ModelParallel,
    /// Partial FC at the configuration's sample rate, logits materialized.
    PartialFc,
    /// Partial FC at the configuration's sample rate, logits never materialized.
    Fused,
}

impl Regime {
    /// All regimes, in plot order.
    pub const ALL: [Regime; 3] = [Regime::ModelParallel, Regime::PartialFc, Regime::Fused];

    /// The configuration this regime turns `base` into.
    pub fn apply(self, base: &PlanConfig) -> PlanConfig {
        match self {
            Regime::ModelParallel => PlanConfig {
                sample_rate: 1.0,
                logits: LogitsMode::Materialized,
                ..*base
            },
            Regime::PartialFc => PlanConfig {
                logits: LogitsMode::Materialized,
                ..*base
            },
            Regime::Fused => PlanConfig {
                logits: LogitsMode::Fused,
                ..*base
            },
        }
    }

    /// A legend label, with the sample rate where it matters.
    pub fn label(self, sample_rate: f64) -> String {
        match self {
            Regime::ModelParallel => "model parallel (r = 1)".to_string(),
            Regime::PartialFc => format!("Partial FC (r = {sample_rate})"),
            Regime::Fused => format!("Partial FC, fused logits (r = {sample_rate})"),
        }
    }
}

/// One class count of a sweep: rank 0's total bytes (reserve included) in each regime, `None`
/// where the class count is not a valid configuration (fewer classes than GPUs, a shard over
/// 2^31 − 1 classes, or bytes beyond 2^63).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// Number of classes C.
    pub classes: u64,
    /// Bytes per GPU in the order of [`Regime::ALL`].
    pub bytes: [Option<u64>; 3],
}

/// `points` class counts spaced evenly on a log scale from `from` to `to` (both included,
/// duplicates removed), and the memory of each regime at each.
///
/// Every input of `base` but its class count is validated first ([`PlanConfig::validate`]):
/// `gpus = 0`, for one, is a [`PfcError::Param`] naming it.
///
/// ```
/// use partial_fc::plan::{PlanConfig, sweep::sweep};
/// let cfg = PlanConfig::new(1_000_000, 8, 32 << 30);
/// let points = sweep(&cfg, 100_000, 10_000_000, 5).unwrap();
/// assert_eq!(points.len(), 5);
/// // model parallel needs more than Partial FC, which needs more than fused logits
/// let b = points[4].bytes.map(Option::unwrap);
/// assert!(b[0] > b[1] && b[1] > b[2]);
/// ```
pub fn sweep(base: &PlanConfig, from: u64, to: u64, points: usize) -> Result<Vec<SweepPoint>> {
    // The sweep sets the class count itself; one class per GPU passes the class checks, so the
    // error (if any) names another input.
    PlanConfig {
        classes: base.gpus,
        ..*base
    }
    .validate()?;
    if from == 0 || from >= to {
        return Err(PfcError::param(
            "sweep",
            format!("{from}..{to}"),
            "must be a range FROM..TO with 0 < FROM < TO",
        ));
    }
    if points < 2 {
        return Err(PfcError::param("sweep points", points, "must be >= 2"));
    }
    let (lf, lt) = ((from as f64).ln(), (to as f64).ln());
    let mut classes: Vec<u64> = (0..points)
        .map(|i| {
            let t = i as f64 / (points - 1) as f64;
            ((lf + t * (lt - lf)).exp().round() as u64).clamp(from, to)
        })
        .collect();
    classes[0] = from;
    classes[points - 1] = to;
    classes.dedup();
    Ok(classes
        .into_iter()
        .map(|c| SweepPoint {
            classes: c,
            bytes: Regime::ALL.map(|regime| {
                let cfg = PlanConfig {
                    classes: c,
                    ..regime.apply(base)
                };
                let valid = c >= cfg.gpus && c.div_ceil(cfg.gpus) <= MAX_SHARD_CLASSES;
                if valid {
                    cfg.rank0_total()
                } else {
                    None
                }
            }),
        })
        .collect())
}

/// At most `max` class counts in `first..=last` to mark on a log-scale class axis, in order.
///
/// plotters' own log-scale ticks repeat one (over a decade and a bit it marks 10^k, 2·10^k …
/// 10·10^k and 10^(k+1) again: two "10M" labels) and mark nothing in a range within a decade that
/// holds no power of ten (2M..5M). Here, a range of a decade or more is marked at the same places
/// in every decade, the finest that fits: tenths, 1 to 9, 1-2-5, powers of ten, every k-th power
/// of ten; a shorter one at the multiples of a 1-2-5 step, as a linear axis would be. Only counts
/// that [`format_count`](super::units::format_count) shows exactly are kept (four significant
/// digits at most), so distinct ticks have distinct labels.
#[cfg(feature = "plot")]
fn class_ticks(first: u64, last: u64, max: usize) -> Vec<u64> {
    use super::units::{format_count, parse_count};
    let shown_exactly =
        |t: u64| (t as f64) as u64 == t && parse_count("tick", &format_count(t)).ok() == Some(t);
    let keep = |ticks: Vec<u128>| -> Vec<u64> {
        ticks
            .into_iter()
            .filter_map(|t| u64::try_from(t).ok())
            .filter(|&t| shown_exactly(t))
            .collect()
    };
    let (lo, hi) = (u128::from(first.max(1)), u128::from(last));
    if hi < lo {
        return Vec::new();
    }
    let decades = || (0..=20u32).map(|d| 10u128.pow(d));
    if hi >= lo * 10 {
        // Mantissas in tenths of the decade's power of ten.
        let mantissas: [Vec<u128>; 4] = [
            (10..100).collect(),
            (1..10).map(|m| m * 10).collect(),
            vec![10, 20, 50],
            vec![10],
        ];
        for set in &mantissas {
            let ticks = keep(
                decades()
                    .flat_map(|p| set.iter().map(move |m| m * p))
                    .filter(|t| t % 10 == 0 && (lo..=hi).contains(&(t / 10)))
                    .map(|t| t / 10)
                    .collect(),
            );
            if ticks.len() <= max {
                return ticks;
            }
        }
        for k in 2..=20 {
            let ticks = keep(
                decades()
                    .step_by(k)
                    .filter(|t| (lo..=hi).contains(t))
                    .collect(),
            );
            if ticks.len() <= max {
                return ticks;
            }
        }
        return Vec::new();
    }
    let mut best = Vec::new();
    for step in decades().flat_map(|p| [p, 2 * p, 5 * p]) {
        if step > hi - lo {
            break;
        }
        if hi / step - (lo - 1) / step > max as u128 {
            continue;
        }
        let start = lo.div_ceil(step) * step;
        let ticks = keep(
            std::iter::successors(Some(start), |t| Some(t + step))
                .take_while(|&t| t <= hi)
                .collect(),
        );
        if ticks.len() >= 2 {
            return ticks;
        }
        if ticks.len() > best.len() {
            best = ticks;
        }
    }
    best
}

/// Draws a sweep as an SVG: GiB per GPU against classes (log scale), one line per regime, the
/// device capacity as a horizontal line. Lines stop where they leave the chart (at 4× the
/// capacity) so that model parallel does not flatten the others.
#[cfg(feature = "plot")]
pub fn plot_svg(path: &std::path::Path, base: &PlanConfig, points: &[SweepPoint]) -> Result<()> {
    use plotters::prelude::*;
    let io = |msg: String| PfcError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(msg),
    };
    let (first, last) = match (points.first(), points.last()) {
        (Some(f), Some(l)) if l.classes > f.classes => (f.classes, l.classes),
        _ => {
            return Err(io(
                "a plot needs a sweep of at least two class counts".into()
            ))
        }
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let capacity = gib(base.gpu_memory);
    let highest = points
        .iter()
        .flat_map(|p| p.bytes.iter().flatten().map(|&b| gib(b)))
        .fold(0.0, f64::max);
    let y_max = highest.clamp(capacity * 1.25, capacity * 4.0);
    // plotters' defaults: 10 labels to an axis, 10 light grid lines to a label
    const LABELS: usize = 10;
    let ticks = |max| {
        class_ticks(first, last, max)
            .into_iter()
            .map(|t| t as f64)
            .collect::<Vec<_>>()
    };
    // Drawn into memory, then written atomically: a failure midway (or plotters writing what it
    // has when its backend drops) never truncates an existing file at `path`.
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| io(e.to_string()))?;
        // The curves include the reserve when one is given: say so, or the title reads as the
        // FC layer's alone.
        let what = if base.reserved > 0 {
            format!("FC memory + {:.1} GiB reserve", gib(base.reserved))
        } else {
            "FC memory".to_string()
        };
        let title = format!(
            "{what} per GPU: {} GPUs, {} images/GPU, d = {}",
            base.gpus, base.batch_per_gpu, base.dim
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(
                (first as f64..last as f64)
                    .log_scale()
                    .with_key_points(ticks(LABELS))
                    .with_light_points(ticks(LABELS * 10)),
                0.0..y_max,
            )
            .map_err(|e| io(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("classes")
            .y_desc("GiB per GPU")
            .x_label_formatter(&|x| super::units::format_count(x.round() as u64))
            .draw()
            .map_err(|e| io(e.to_string()))?;
        let colors = [RED, BLUE, GREEN];
        for (i, regime) in Regime::ALL.into_iter().enumerate() {
            let line: Vec<(f64, f64)> = points
                .iter()
                .filter_map(|p| p.bytes[i].map(|b| (p.classes as f64, gib(b))))
                .take_while(|&(_, y)| y <= y_max)
                .collect();
            let color = colors[i];
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(|e| io(e.to_string()))?
                .label(regime.label(base.sample_rate))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .draw_series(LineSeries::new(
                vec![(first as f64, capacity), (last as f64, capacity)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| io(e.to_string()))?
            .label(format!("device capacity ({capacity:.1} GiB)"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| io(e.to_string()))?;
        root.present().map_err(|e| io(e.to_string()))?;
    }
    crate::atomic_file::write_bytes_atomic(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_endpoints_and_order() {
        let cfg = PlanConfig::new(1000, 8, 32 << 30);
        let pts = sweep(&cfg, 4, 1000, 10).unwrap();
        assert_eq!(pts.first().unwrap().classes, 4);
        assert_eq!(pts.last().unwrap().classes, 1000);
        assert!(pts.windows(2).all(|w| w[0].classes < w[1].classes));
        // 4 classes on 8 GPUs is not a configuration
        assert_eq!(pts[0].bytes, [None, None, None]);
        assert!(sweep(&cfg, 10, 10, 5).is_err());
        assert!(sweep(&cfg, 0, 10, 5).is_err());
    }

    #[test]
    fn invalid_base_configs_are_refused_before_the_sweep() {
        // gpus = 0 used to divide by zero in the per-point validity check.
        let ok = PlanConfig::new(1000, 8, 32 << 30);
        for (cfg, name) in [
            (PlanConfig { gpus: 0, ..ok }, "gpus"),
            (PlanConfig { dim: 0, ..ok }, "dim"),
            (
                PlanConfig {
                    reserved: u64::MAX,
                    ..ok
                },
                "reserved",
            ),
            (
                PlanConfig {
                    sample_rate: f64::NAN,
                    ..ok
                },
                "sample_rate",
            ),
        ] {
            match sweep(&cfg, 10, 1000, 5) {
                Err(PfcError::Param { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{cfg:?} gave {other:?}"),
            }
        }
        // The base's own class count does not matter: the sweep replaces it.
        let few = PlanConfig { classes: 1, ..ok };
        assert_eq!(sweep(&few, 10, 1000, 5).unwrap().len(), 5);
    }

    #[cfg(feature = "plot")]
    #[test]
    fn class_ticks_are_in_range_in_order_and_labelled_apart() {
        use crate::plan::units::format_count;
        let mut ranges = vec![
            (1, u64::MAX),
            (8, 1_000_000_000_000),
            (1_000_000, 1_000_001),
        ];
        for first in [1, 2, 8, 99, 1_000, 2_000_000, 12_345_678, 999_999_999_999] {
            for ratio in [1.001, 1.1, 1.5, 2.5, 9.9, 10.0, 11.0, 20.0, 100.0, 1e4, 1e9] {
                ranges.push((first, (first as f64 * ratio).round() as u64));
            }
        }
        for (first, last) in ranges {
            for max in [10, 100] {
                let ticks = class_ticks(first, last, max);
                let labels: Vec<String> = ticks.iter().map(|&t| format_count(t)).collect();
                let what = format!("{first}..{last} (at most {max}): {labels:?}");
                assert!(ticks.len() <= max, "{what}");
                assert!(ticks.iter().all(|t| (first..=last).contains(t)), "{what}");
                assert!(ticks.windows(2).all(|w| w[0] < w[1]), "{what}");
                let distinct: std::collections::BTreeSet<&String> = labels.iter().collect();
                assert_eq!(distinct.len(), labels.len(), "{what}");
                // a range 1% wide holds two counts that four significant digits show exactly
                if last as f64 >= first as f64 * 1.01 {
                    assert!(ticks.len() >= 2, "{what}");
                }
            }
        }
    }

    #[cfg(feature = "plot")]
    #[test]
    fn plot_writes_an_svg() {
        let cfg = PlanConfig::new(1_000_000, 8, 32 << 30);
        let pts = sweep(&cfg, 100_000, 100_000_000, 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.svg");
        plot_svg(&path, &cfg, &pts).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("model parallel"));
    }
}

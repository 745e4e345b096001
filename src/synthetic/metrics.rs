//! Face-recognition metrics on held-out identities: verification TAR at a fixed FAR over all
//! genuine/impostor pairs, and 1:N identification top-1.

use crate::cpu::gemm::gemm_nt;
use crate::error::{PfcError, Result};
use rayon::prelude::*;

/// True-accept rate at a false-accept rate: the threshold is the smallest score that at most
/// `far · impostors` impostor pairs exceed, and TAR is the fraction of genuine pairs strictly
/// above it. `impostor` is reordered (partially selected) in place.
///
/// ```
/// use partial_fc::synthetic::metrics::tar_at_far;
/// // 1000 impostors 0.000..0.999; at FAR = 1e-2 the threshold is 0.989 (10 impostors above).
/// let mut impostor: Vec<f32> = (0..1000).map(|i| i as f32 / 1000.0).collect();
/// let genuine = [0.5, 0.98, 0.99, 1.5];
/// assert_eq!(tar_at_far(&genuine, &mut impostor, 1e-2).unwrap(), 0.5);
/// ```
pub fn tar_at_far(genuine: &[f32], impostor: &mut [f32], far: f64) -> Result<f64> {
    if !(far > 0.0 && far <= 1.0) {
        return Err(PfcError::param("far", far, "must lie in (0, 1]"));
    }
    if genuine.is_empty() || impostor.is_empty() {
        return Err(PfcError::Shape(format!(
            "TAR needs genuine and impostor pairs, got {} and {}",
            genuine.len(),
            impostor.len()
        )));
    }
    let allowed = (far * impostor.len() as f64).floor() as usize;
    let threshold = if allowed >= impostor.len() {
        f32::NEG_INFINITY
    } else {
        // The (allowed + 1)-th largest impostor score: at most `allowed` lie strictly above it.
        *impostor
            .select_nth_unstable_by(allowed, |a, b| b.total_cmp(a))
            .1
    };
    let accepted = genuine.iter().filter(|&&s| s > threshold).count();
    Ok(accepted as f64 / genuine.len() as f64)
}

/// Verification and identification results on one set of embeddings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalMetrics {
    /// TAR at FAR = 1e-3.
    pub tar_far_1e3: f64,
    /// TAR at FAR = 1e-4.
    pub tar_far_1e4: f64,
    /// 1:N identification top-1 accuracy (gallery: each identity's first sample; probes: the rest).
    pub top1: f64,
    /// Number of genuine pairs.
    pub genuine_pairs: usize,
    /// Number of impostor pairs.
    pub impostor_pairs: usize,
}

/// Scores every pair of `embeddings` (`rows × dim`) by cosine similarity and computes
/// [`EvalMetrics`]. Rows of one identity must be contiguous (identity-major order) and each
/// identity needs at least two rows.
pub fn evaluate(embeddings: &[f32], labels: &[u64], dim: usize) -> Result<EvalMetrics> {
    let n = labels.len();
    if dim == 0 || n.checked_mul(dim) != Some(embeddings.len()) {
        return Err(PfcError::Shape(format!(
            "{} embedding values for {n} labels of dim {dim}",
            embeddings.len()
        )));
    }
    let mut unit = embeddings.to_vec();
    unit.par_chunks_mut(dim).for_each(|row| {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    });
    let pairs = n
        .checked_mul(n)
        .filter(|&p| p <= isize::MAX as usize / std::mem::size_of::<f32>())
        .ok_or_else(|| PfcError::Shape(format!("{n} × {n} similarities do not fit in memory")))?;
    let mut sim = vec![0.0f32; pairs];
    gemm_nt(n, n, dim, &unit, &unit, &mut sim)?;

    // Gallery: first row of each identity run.
    let gallery: Vec<usize> = (0..n)
        .filter(|&i| i == 0 || labels[i] != labels[i - 1])
        .collect();
    if gallery.len() < 2 || gallery.len() * 2 > n {
        return Err(PfcError::Shape(format!(
            "evaluation needs >= 2 identities with >= 2 contiguous samples each, got {} identities in {n} rows",
            gallery.len()
        )));
    }

    let (mut genuine, mut impostor) = (Vec::new(), Vec::with_capacity(n * (n - 1) / 2));
    for i in 0..n {
        for j in i + 1..n {
            let s = sim[i * n + j];
            if labels[i] == labels[j] {
                genuine.push(s);
            } else {
                impostor.push(s);
            }
        }
    }
    let tar_far_1e3 = tar_at_far(&genuine, &mut impostor, 1e-3)?;
    let tar_far_1e4 = tar_at_far(&genuine, &mut impostor, 1e-4)?;

    let probes: Vec<usize> = (0..n)
        .filter(|i| gallery.binary_search(i).is_err())
        .collect();
    let hits = probes
        .par_iter()
        .filter(|&&p| {
            let best = gallery
                .iter()
                .max_by(|&&a, &&b| sim[p * n + a].total_cmp(&sim[p * n + b]))
                .copied();
            best.is_some_and(|g| labels[g] == labels[p])
        })
        .count();
    Ok(EvalMetrics {
        tar_far_1e3,
        tar_far_1e4,
        top1: hits as f64 / probes.len() as f64,
        genuine_pairs: genuine.len(),
        impostor_pairs: impostor.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_on_a_constructed_score_set() {
        // 100_000 impostors, distinct, uniform on [0, 1): at FAR 1e-3 exactly 100 lie above the
        // threshold (0.99899), at 1e-4 exactly 10 (0.99989).
        let mut impostor: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0).collect();
        // Shuffle deterministically so selection, not input order, does the work.
        impostor.reverse();
        impostor.swap(3, 77_777);
        let genuine = [0.5, 0.9989, 0.9991, 0.99985, 0.9999, 1.0, 1.2, 0.0];
        assert_eq!(
            tar_at_far(&genuine, &mut impostor, 1e-3).unwrap(),
            5.0 / 8.0
        );
        assert_eq!(
            tar_at_far(&genuine, &mut impostor, 1e-4).unwrap(),
            3.0 / 8.0
        );
        // FAR = 1 accepts every pair.
        assert_eq!(tar_at_far(&genuine, &mut impostor, 1.0).unwrap(), 1.0);
    }

    #[test]
    fn tar_rejects_bad_input() {
        assert!(tar_at_far(&[1.0], &mut [0.0], 0.0).is_err());
        assert!(tar_at_far(&[1.0], &mut [0.0], f64::NAN).is_err());
        assert!(tar_at_far(&[], &mut [0.0], 0.1).is_err());
        assert!(tar_at_far(&[1.0], &mut [], 0.1).is_err());
    }

    #[test]
    fn perfect_and_random_embeddings() {
        // Three identities, two samples each, on orthogonal axes: everything is perfect.
        let e = [
            1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.1, 0.0, 0.0, 1.0, 0.1, 0.0,
            1.0,
        ];
        let labels = [7, 7, 8, 8, 9, 9];
        let m = evaluate(&e, &labels, 3).unwrap();
        assert_eq!((m.tar_far_1e3, m.tar_far_1e4, m.top1), (1.0, 1.0, 1.0));
        assert_eq!((m.genuine_pairs, m.impostor_pairs), (3, 12));

        // Swap one sample's identity: its probe is now wrong.
        let e2 = [
            1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.1, 0.0, 0.0, 1.0, 0.1, 0.0,
            1.0,
        ];
        let m = evaluate(&e2, &labels, 3).unwrap();
        assert!((m.top1 - 2.0 / 3.0).abs() < 1e-12);
        assert!(m.tar_far_1e3 < 1.0);
    }

    #[test]
    fn evaluate_rejects_bad_shapes() {
        assert!(evaluate(&[1.0; 5], &[0, 0, 1], 2).is_err());
        assert!(evaluate(&[1.0; 4], &[0, 0], 2).is_err()); // one identity
        assert!(evaluate(&[1.0; 6], &[0, 1, 2], 2).is_err()); // singletons
    }
}

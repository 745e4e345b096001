//! A two-layer MLP backbone, `x → ReLU(x·W1 + b1) → ·W2 + b2`, trained with plain SGD.
//!
//! Batched forward and backward through the crate's CPU GEMMs (the `gemm` crate, multi-threaded
//! over rayon); the element-wise parts run in parallel over rows.

use crate::cpu::gemm::{gemm_nn, gemm_nt, gemm_tn};
use crate::error::{PfcError, Result};
use crate::rng::philox4x32_10;
use rayon::prelude::*;

/// The MLP's parameters.
///
/// ```
/// use partial_fc::synthetic::backbone::Mlp;
/// let mut mlp = Mlp::new(4, 8, 3, 0).unwrap();
/// let x = vec![0.5f32; 2 * 4];
/// let fwd = mlp.forward(&x, 2).unwrap();
/// assert_eq!(fwd.output.len(), 2 * 3);
/// mlp.backward_sgd(&x, &fwd, &[0.1; 6], 0.01).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Mlp {
    input: usize,
    hidden: usize,
    output: usize,
    /// `input × hidden`, row-major.
    w1: Vec<f32>,
    b1: Vec<f32>,
    /// `hidden × output`, row-major.
    w2: Vec<f32>,
    b2: Vec<f32>,
}

/// What the backward pass needs from a forward pass.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Rows of the batch.
    pub rows: usize,
    /// Hidden activations after ReLU, `rows × hidden`.
    pub hidden: Vec<f32>,
    /// Embeddings, `rows × output`.
    pub output: Vec<f32>,
}

/// `rows × cols` zeros, or a typed error naming `what` when the count overflows or the memory
/// cannot be had (rather than a capacity-overflow panic or an allocation abort).
fn zeros(rows: usize, cols: usize, what: &'static str) -> Result<Vec<f32>> {
    let len = rows.checked_mul(cols).ok_or_else(|| {
        PfcError::param(
            what,
            format!("{rows} × {cols}"),
            "the element count overflows usize",
        )
    })?;
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| {
        PfcError::param(
            what,
            format!("{rows} × {cols}"),
            format!("cannot allocate {len} f32 values"),
        )
    })?;
    out.resize(len, 0.0);
    Ok(out)
}

/// Uniform values in [-bound, bound) keyed by (seed, layer), into `out`.
fn uniform(seed: u64, layer: u32, mut out: Vec<f32>, bound: f32) -> Vec<f32> {
    out.par_chunks_mut(4).enumerate().for_each(|(i, quad)| {
        let bits = philox4x32_10(
            [i as u32, (i >> 32) as u32, layer, 0x0b1a_5000],
            [seed as u32, (seed >> 32) as u32],
        );
        for (o, b) in quad.iter_mut().zip(bits) {
            *o = (b as f32 / 4_294_967_296.0 * 2.0 - 1.0) * bound;
        }
    });
    out
}

impl Mlp {
    /// He-uniform initialization of both layers (variance 2/fan_in), zero biases.
    pub fn new(input: usize, hidden: usize, output: usize, seed: u64) -> Result<Mlp> {
        for (name, v) in [
            ("input", input),
            ("hidden", hidden),
            ("embedding_dim", output),
        ] {
            if v == 0 {
                return Err(PfcError::param(name, v, "must be >= 1"));
            }
        }
        let (w1, w2) = (
            zeros(input, hidden, "hidden")?,
            zeros(hidden, output, "embedding_dim")?,
        );
        let he = |fan_in: usize| (6.0 / fan_in as f32).sqrt();
        Ok(Mlp {
            input,
            hidden,
            output,
            w1: uniform(seed, 1, w1, he(input)),
            b1: zeros(1, hidden, "hidden")?,
            w2: uniform(seed, 2, w2, he(hidden)),
            b2: zeros(1, output, "embedding_dim")?,
        })
    }

    /// Input dimension.
    pub fn input_dim(&self) -> usize {
        self.input
    }

    /// Embedding (output) dimension.
    pub fn output_dim(&self) -> usize {
        self.output
    }

    /// Embeddings of `rows` inputs (`rows × input`).
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Forward> {
        if rows.checked_mul(self.input) != Some(x.len()) {
            return Err(PfcError::Shape(format!(
                "MLP input of {} values for {rows} rows of {}",
                x.len(),
                self.input
            )));
        }
        let (h, o) = (self.hidden, self.output);
        let mut hidden = zeros(rows, h, "rows")?;
        gemm_nn(rows, h, self.input, x, &self.w1, &mut hidden)?;
        hidden.par_chunks_mut(h).for_each(|row| {
            for (v, b) in row.iter_mut().zip(&self.b1) {
                *v = (*v + b).max(0.0);
            }
        });
        let mut output = zeros(rows, o, "rows")?;
        gemm_nn(rows, o, h, &hidden, &self.w2, &mut output)?;
        output.par_chunks_mut(o).for_each(|row| {
            row.iter_mut().zip(&self.b2).for_each(|(v, b)| *v += b);
        });
        Ok(Forward {
            rows,
            hidden,
            output,
        })
    }

    /// Backpropagates `grad_output` (d loss / d embeddings, `rows × output`) and takes one plain
    /// SGD step `θ ← θ − lr·∇θ`.
    pub fn backward_sgd(
        &mut self,
        x: &[f32],
        fwd: &Forward,
        grad_output: &[f32],
        lr: f32,
    ) -> Result<()> {
        let grads = self.backward(x, fwd, grad_output)?;
        self.apply_sgd(&grads, lr)
    }

    /// One plain SGD step `θ ← θ − lr·g` with gradients from [`Mlp::backward`] (a sum of
    /// several, for gradient accumulation).
    ///
    /// # Errors
    ///
    /// [`PfcError::Param`] for a NaN, infinite or negative `lr`.
    pub fn apply_sgd(&mut self, grads: &MlpGrads, lr: f32) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(PfcError::param("lr", lr, "must be finite and >= 0"));
        }
        let sgd = |w: &mut [f32], g: &[f32]| {
            w.par_iter_mut().zip(g.par_iter()).for_each(|(w, g)| {
                *w -= lr * g;
            })
        };
        sgd(&mut self.w1, &grads.w1);
        sgd(&mut self.b1, &grads.b1);
        sgd(&mut self.w2, &grads.w2);
        sgd(&mut self.b2, &grads.b2);
        Ok(())
    }

    /// The parameters' gradients for `grad_output` (d loss / d embeddings, `rows × output`).
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when `x`, `fwd` or `grad_output` do not hold `rows` rows of this
    /// MLP's widths.
    pub fn backward(&self, x: &[f32], fwd: &Forward, grad_output: &[f32]) -> Result<MlpGrads> {
        let (n, d, h, o) = (fwd.rows, self.input, self.hidden, self.output);
        if n.checked_mul(d) != Some(x.len())
            || n.checked_mul(o) != Some(grad_output.len())
            || n.checked_mul(h) != Some(fwd.hidden.len())
        {
            return Err(PfcError::Shape(format!(
                "MLP backward: {} inputs, {} output grads for {n} rows of {d} → {o}",
                x.len(),
                grad_output.len()
            )));
        }
        // Layer 2: dW2 = Hᵀ·dY, db2 = Σ dY, dH = dY·W2ᵀ masked by ReLU.
        let mut grad_w2 = vec![0.0f32; h * o];
        gemm_tn(h, o, n, &fwd.hidden, grad_output, &mut grad_w2)?;
        let grad_b2 = column_sums(grad_output, o);
        let mut grad_hidden = vec![0.0f32; n * h];
        gemm_nt(n, h, o, grad_output, &self.w2, &mut grad_hidden)?;
        grad_hidden
            .par_iter_mut()
            .zip(fwd.hidden.par_iter())
            .for_each(|(g, &a)| {
                if a <= 0.0 {
                    *g = 0.0;
                }
            });
        // Layer 1: dW1 = Xᵀ·dH, db1 = Σ dH.
        let mut grad_w1 = vec![0.0f32; d * h];
        gemm_tn(d, h, n, x, &grad_hidden, &mut grad_w1)?;
        let grad_b1 = column_sums(&grad_hidden, h);
        Ok(MlpGrads {
            w1: grad_w1,
            b1: grad_b1,
            w2: grad_w2,
            b2: grad_b2,
        })
    }
}

/// The MLP's parameter gradients ([`Mlp::backward`]): summed over micro-batches with
/// [`MlpGrads::add`], applied with [`Mlp::apply_sgd`]. Opaque: the demo's backbone is a means to
/// train the classifier, not an API.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpGrads {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

impl MlpGrads {
    /// Adds `other` (gradients of the same MLP) to these: a sum over micro-batches.
    pub fn add(&mut self, other: &MlpGrads) {
        for (sum, g) in [
            (&mut self.w1, &other.w1),
            (&mut self.b1, &other.b1),
            (&mut self.w2, &other.w2),
            (&mut self.b2, &other.b2),
        ] {
            sum.iter_mut().zip(g).for_each(|(s, g)| *s += g);
        }
    }
}

fn column_sums(m: &[f32], cols: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; cols];
    for row in m.chunks(cols) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loss = Σ y·c for a fixed c, so d loss / d y = c: compare the SGD step's parameter change
    /// with a central finite difference of the loss.
    #[test]
    fn backward_matches_finite_differences() {
        let (n, d, h, o) = (3, 5, 7, 4);
        let mlp = Mlp::new(d, h, o, 9).unwrap();
        let x: Vec<f32> = (0..n * d)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let c: Vec<f32> = (0..n * o)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 3.0)
            .collect();
        let loss = |m: &Mlp| -> f64 {
            let y = m.forward(&x, n).unwrap().output;
            y.iter().zip(&c).map(|(a, b)| f64::from(a * b)).sum()
        };
        let fwd = mlp.forward(&x, n).unwrap();
        let mut stepped = mlp.clone();
        stepped.backward_sgd(&x, &fwd, &c, 1.0).unwrap();
        let eps = 1e-2f32;
        for (which, idx) in [(1, 0), (1, 17), (2, 3), (2, 20), (3, 2), (4, 1)] {
            let (mut plus, mut minus) = (mlp.clone(), mlp.clone());
            *param(&mut plus, which, idx) += eps;
            *param(&mut minus, which, idx) -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * f64::from(eps));
            let analytic =
                f64::from(*param(&mut mlp.clone(), which, idx) - *param(&mut stepped, which, idx));
            assert!(
                (numeric - analytic).abs() < 1e-2 * (1.0 + numeric.abs()),
                "param {which}[{idx}]: numeric {numeric}, analytic {analytic}"
            );
        }
    }

    fn param(m: &mut Mlp, which: u8, idx: usize) -> &mut f32 {
        match which {
            1 => &mut m.w1[idx],
            2 => &mut m.w2[idx],
            3 => &mut m.b1[idx],
            _ => &mut m.b2[idx],
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut mlp = Mlp::new(2, 3, 2, 0).unwrap();
        assert!(mlp.forward(&[1.0; 3], 2).is_err());
        let fwd = mlp.forward(&[1.0; 4], 2).unwrap();
        assert!(mlp.backward_sgd(&[1.0; 4], &fwd, &[0.0; 3], 0.1).is_err());
        assert!(mlp
            .backward_sgd(&[1.0; 4], &fwd, &[0.0; 4], f32::NAN)
            .is_err());
        assert!(Mlp::new(0, 3, 2, 0).is_err());
    }

    #[test]
    fn overflowing_sizes_are_param_errors() {
        // 2^40 × 2^40 used to overflow the weight count (a panic in debug, a wrapped size in
        // release); 2 × 2^62 fits in usize but not in memory (a capacity-overflow panic).
        for (input, hidden, output) in [(1 << 40, 1 << 40, 1), (2, 1 << 62, 4)] {
            let r = Mlp::new(input, hidden, output, 0);
            assert!(matches!(r, Err(PfcError::Param { .. })), "{r:?}");
        }
        let mlp = Mlp::new(2, 3, 2, 0).unwrap();
        assert!(matches!(
            mlp.forward(&[], usize::MAX),
            Err(PfcError::Shape(_))
        ));
    }
}

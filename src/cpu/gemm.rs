//! GEMMs of the step on the CPU, through the `gemm` crate (a maintained, multi-threaded,
//! SIMD-dispatching GEMM that reaches most of a core's FMA peak; we do not hand-write one).
//!
//! Each function checks its shapes against its slices before the unsafe call, with overflow-
//! checked arithmetic: a shape that overflows `usize` or a slice shorter than its shape is a
//! [`PfcError::Shape`], never an out-of-bounds read or write.

use crate::error::{PfcError, Result};
use gemm::Parallelism;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    // Small products are faster on one thread than through rayon's fork/join.
    if m.saturating_mul(n).saturating_mul(k) < 64 * 64 * 64 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// Checks that each operand `(name, rows, cols, len)` holds `rows × cols` elements, computing
/// the product without overflow.
fn check_operands(op: &str, operands: [(&str, usize, usize, usize); 3]) -> Result<()> {
    for (name, rows, cols, len) in operands {
        let need = rows.checked_mul(cols).ok_or_else(|| {
            PfcError::Shape(format!(
                "{op}: {name} of {rows} × {cols} elements overflows usize"
            ))
        })?;
        if len < need {
            return Err(PfcError::Shape(format!(
                "{op}: {name} holds {len} elements, {rows} × {cols} = {need} needed"
            )));
        }
    }
    Ok(())
}

/// `c[m × n] = a[m × k] · b[n × k]ᵀ`, row-major.
///
/// # Errors
///
/// [`PfcError::Shape`] when a slice holds fewer elements than its shape or a shape overflows
/// `usize`; `c` is untouched then.
pub fn gemm_nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    check_operands(
        "gemm_nt",
        [
            ("a", m, k, a.len()),
            ("b", n, k, b.len()),
            ("c", m, n, c.len()),
        ],
    )?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: `check_operands` bounds every index the strides below can reach: with m, n >= 1
    // every dimension and stride is at most a slice's length, so no offset overflows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
    Ok(())
}

/// `c[m × n] = a[m × k] · b[k × n]`, row-major.
///
/// # Errors
///
/// As [`gemm_nt`].
pub fn gemm_nn(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    check_operands(
        "gemm_nn",
        [
            ("a", m, k, a.len()),
            ("b", k, n, b.len()),
            ("c", m, n, c.len()),
        ],
    )?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: `check_operands` bounds every index the strides below can reach: with m, n >= 1
    // every dimension and stride is at most a slice's length, so no offset overflows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
    Ok(())
}

/// `c[m × n] = a[k × m]ᵀ · b[k × n]`, row-major.
///
/// # Errors
///
/// As [`gemm_nt`].
pub fn gemm_tn(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    check_operands(
        "gemm_tn",
        [
            ("a", k, m, a.len()),
            ("b", k, n, b.len()),
            ("c", m, n, c.len()),
        ],
    )?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: `check_operands` bounds every index the strides below can reach: with m, n >= 1
    // every dimension and stride is at most a slice's length, so no offset overflows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            m as isize,
            1,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn three_layouts_match_naive() {
        let (m, n, k) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32).sin()).collect();
        let mut c = vec![0.0; m * n];
        gemm_nt(m, n, k, &a, &bt, &mut c).unwrap();
        let want = naive(m, n, k, |i, p| a[i * k + p], |p, j| bt[j * k + p]);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));

        let b: Vec<f32> = (0..k * n).map(|i| (i as f32).cos()).collect();
        gemm_nn(m, n, k, &a, &b, &mut c).unwrap();
        let want = naive(m, n, k, |i, p| a[i * k + p], |p, j| b[p * n + j]);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));

        let at: Vec<f32> = (0..k * m).map(|i| i as f32 * 0.25).collect();
        gemm_tn(m, n, k, &at, &b, &mut c).unwrap();
        let want = naive(m, n, k, |i, p| at[p * m + i], |p, j| b[p * n + j]);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-4));
    }

    #[test]
    fn overflowing_shapes_are_errors_not_wrapped_sizes() {
        // In release, 2^63 × 2 used to wrap to 0, pass the length assert and run the unsafe
        // GEMM over 2^63 rows of an empty slice.
        let b = [0.0f32; 4];
        let huge = 1usize << (usize::BITS - 1);
        for r in [
            gemm_nt(huge, 2, 2, &[], &b, &mut []),
            gemm_nn(huge, 2, 2, &[], &b, &mut []),
            gemm_tn(huge, 2, 2, &[], &b, &mut []),
            gemm_nt(2, huge, 2, &b, &[], &mut []),
            gemm_tn(2, 2, huge, &[], &[], &mut [0.0; 4]),
        ] {
            assert!(
                matches!(r, Err(PfcError::Shape(ref m)) if m.contains("overflows")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn short_operands_are_errors_and_leave_c_untouched() {
        let (a, b) = ([1.0f32; 6], [1.0f32; 6]);
        let mut c = [7.0f32; 4];
        assert!(matches!(
            gemm_nt(2, 2, 3, &a[..5], &b, &mut c),
            Err(PfcError::Shape(_))
        ));
        assert!(matches!(
            gemm_nn(2, 2, 3, &a, &b[..5], &mut c),
            Err(PfcError::Shape(_))
        ));
        assert!(matches!(
            gemm_tn(2, 2, 3, &a, &b, &mut c[..3]),
            Err(PfcError::Shape(_))
        ));
        assert_eq!(c, [7.0; 4]);
        gemm_nt(2, 2, 3, &a, &b, &mut c).unwrap();
        assert_eq!(c, [3.0; 4]);
    }
}

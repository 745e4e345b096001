//! GEMMs of the step on the CPU, through the `gemm` crate (a maintained, multi-threaded,
//! SIMD-dispatching GEMM that reaches most of a core's FMA peak; we do not hand-write one).

use gemm::Parallelism;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    // Small products are faster on one thread than through rayon's fork/join.
    if m * n * k < 64 * 64 * 64 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// `c[m × n] = a[m × k] · b[n × k]ᵀ`, row-major.
pub fn gemm_nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above bound every index the strides below can reach.
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
}

/// `c[m × n] = a[m × k] · b[k × n]`, row-major.
pub fn gemm_nn(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above bound every index the strides below can reach.
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
}

/// `c[m × n] = a[k × m]ᵀ · b[k × n]`, row-major.
pub fn gemm_tn(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= k * m && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above bound every index the strides below can reach.
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
        gemm_nt(m, n, k, &a, &bt, &mut c);
        let want = naive(m, n, k, |i, p| a[i * k + p], |p, j| bt[j * k + p]);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));

        let b: Vec<f32> = (0..k * n).map(|i| (i as f32).cos()).collect();
        gemm_nn(m, n, k, &a, &b, &mut c);
        let want = naive(m, n, k, |i, p| a[i * k + p], |p, j| b[p * n + j]);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));

        let at: Vec<f32> = (0..k * m).map(|i| i as f32 * 0.25).collect();
        gemm_tn(m, n, k, &at, &b, &mut c);
        let want = naive(m, n, k, |i, p| at[p * m + i], |p, j| b[p * n + j]);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-4));
    }
}

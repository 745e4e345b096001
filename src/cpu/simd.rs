//! Helpers that let the compiler vectorize the CPU kernels without changing their results.
//!
//! Rust keeps IEEE order for float reductions, so a plain `sum()` runs one add at a time. Here
//! reductions keep `LANES` independent partial results, which the compiler maps onto SIMD
//! registers; the lane order is fixed, so results are the same on every machine. `exp` from libm
//! is a call per element; [`exp`] is a branch-free version (Cody–Waite range reduction and a
//! degree-6 polynomial, within 2 ulp of the exact result on the range the softmax uses) that
//! vectorizes. Hot row kernels are compiled twice, generic and with AVX2+FMA enabled, and picked
//! at run time (the `with_avx2!` macro); without explicit `mul_add` both give bit-identical results.

/// Independent accumulators per reduction.
pub const LANES: usize = 16;

/// `e^x` for f32, branch-free: within 2 ulp of libm for x in [−87, 88]; inputs are clamped to
/// that range (the softmax only feeds it x <= 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer.
    let x = x.clamp(-87.336_55, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Minimax polynomial of e^r on [−ln2/2, ln2/2] (Cephes expf coefficients).
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // The integer n sits in the low mantissa bits of `shifted`; 2^n is built from bits alone,
    // which vectorizes where a float-to-int conversion would not.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `Σ a[i] · b[i]` with [`LANES`] partial sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Whether the AVX2+FMA versions of the kernels can run here (checked once).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs the `#[inline(always)]` function `$generic` compiled with AVX2
/// enabled when the CPU has it, and as it is otherwise.
macro_rules! with_avx2 {
    ($(#[$meta:meta])* $vis:vis fn $name:ident = $generic:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if $crate::cpu::simd::has_avx2() {
                    // SAFETY: the CPU supports the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use with_avx2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}) = {got}, libm {want}, {ulps} ulp");
            x += 0.0137;
        }
        assert!(exp(-200.0) < 1e-37);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn dot_matches_sequential_sum_closely() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-4);
    }
}

//! The margin softmax on 16-bit cosines (`*16` passes, used with bf16/f16 GEMMs) against the f32
//! passes on the same cosines widened to f32: row max, target cosine, row sum and loss identical
//! bit for bit, and the gradient equal to the f32 gradient rounded to the 16-bit type. This pins
//! the CPU twins to the f32 semantics; tests/cuda_kernels.rs then pins the GPU kernels to them.

use partial_fc::cpu::margin_softmax16::{narrow, widen, F16_MAX};
use partial_fc::plan::Dtype;
use partial_fc::LogitsShape;
use partial_fc::{Backend, CpuBackend, GradMode, Margin, TargetFallback};

mod common;

use common::Rng;

fn margins() -> Vec<Margin> {
    let mut filtered = Margin::arcface();
    filtered.interclass_filter = Some(0.3);
    let mut exact = Margin::combined(64.0, 1.0, 0.3, 0.2);
    exact.grad_mode = GradMode::Exact;
    exact.fallback = TargetFallback::Monotonic;
    exact.interclass_filter = Some(0.25);
    vec![Margin::arcface(), Margin::cosface(), filtered, exact]
}

/// 16-bit cosines in [−1.02, 1.02] (some clipped), exact ±1 and ±0, padding rows (label −1), and
/// targets on clipped cosines.
fn inputs(rng: &mut Rng, rows: usize, cols: usize, dtype: Dtype) -> (Vec<u16>, Vec<i32>) {
    let mut cos: Vec<u16> = (0..rows * cols)
        .map(|k| {
            let v = match k % 97 {
                3 => 1.0,
                5 => -1.0,
                7 => 0.0,
                11 => -0.0,
                _ => -1.02 + 2.04 * rng.uniform() as f32,
            };
            narrow(v, dtype)
        })
        .collect();
    let labels: Vec<i32> = (0..rows)
        .map(|i| {
            if i % 5 == 4 {
                -1
            } else {
                rng.below(cols as u64) as i32
            }
        })
        .collect();
    for (i, raw) in [(0usize, 1.01f32), (2, -1.015)] {
        if labels[i] >= 0 {
            cos[i * cols + labels[i] as usize] = narrow(raw, dtype);
        }
    }
    (cos, labels)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The three 16-bit passes equal the three f32 passes on the widened cosines.
#[test]
fn three_passes_on_16_bit_cosines_equal_the_f32_passes() {
    let cpu = CpuBackend;
    let mut rng = Rng::new(0x16b1);
    for dtype in [Dtype::Bf16, Dtype::F16] {
        for cols in [64usize, 61] {
            for margin in margins() {
                let p = margin.params();
                let rows = 10;
                let (cos, labels) = inputs(&mut rng, rows, cols, dtype);
                let grad_scale = 1.0;
                // f32 reference on the widened cosines.
                let mut z: Vec<f32> = cos.iter().map(|&b| widen(b, dtype)).collect();
                let (mut max, mut tcos, mut sum, mut loss) = (
                    vec![0f32; rows],
                    vec![0f32; rows],
                    vec![0f32; rows],
                    vec![0f32; 2 * rows],
                );
                cpu.margin_rowmax(
                    &mut z,
                    LogitsShape::dense(rows, cols),
                    &labels,
                    &p,
                    None,
                    &mut max,
                    &mut tcos,
                )
                .unwrap();
                cpu.exp_rowsum(&z, LogitsShape::dense(rows, cols), &max, &mut sum)
                    .unwrap();
                cpu.softmax_loss_grad(
                    &mut z,
                    LogitsShape::dense(rows, cols),
                    &labels,
                    &p,
                    None,
                    &max,
                    &sum,
                    &tcos,
                    grad_scale,
                    &mut loss,
                )
                .unwrap();
                // 16-bit passes.
                let mut c16 = cos.clone();
                let (mut max16, mut tcos16, mut sum16, mut loss16) = (
                    vec![0f32; rows],
                    vec![0f32; rows],
                    vec![0f32; rows],
                    vec![0f32; 2 * rows],
                );
                cpu.margin_rowmax16(
                    &c16,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &labels,
                    &p,
                    None,
                    &mut max16,
                    &mut tcos16,
                )
                .unwrap();
                cpu.exp_rowsum16(
                    &c16,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &labels,
                    &p,
                    None,
                    &max16,
                    &mut sum16,
                )
                .unwrap();
                cpu.softmax_loss_grad16(
                    &mut c16,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &labels,
                    &p,
                    None,
                    &max16,
                    &sum16,
                    &tcos16,
                    grad_scale,
                    &mut loss16,
                )
                .unwrap();
                let what = format!("{dtype:?} cols {cols} {margin:?}");
                assert_eq!(bits(&max16), bits(&max), "{what}: row max");
                assert_eq!(bits(&tcos16), bits(&tcos), "{what}: target cos");
                assert_eq!(bits(&sum16), bits(&sum), "{what}: row sum");
                assert_eq!(bits(&loss16), bits(&loss), "{what}: loss");
                let want: Vec<u16> = z.iter().map(|&g| narrow(g, dtype)).collect();
                assert_eq!(c16, want, "{what}: gradient");
                assert!(
                    c16.iter().zip(&cos).any(|(g, c)| g != c),
                    "{what}: nothing written"
                );
            }
        }
    }
}

/// The one-kernel 16-bit softmax equals the f32 one on the widened cosines.
#[test]
fn fused_on_16_bit_cosines_equals_the_f32_fused() {
    let cpu = CpuBackend;
    let mut rng = Rng::new(0xf05e);
    for dtype in [Dtype::Bf16, Dtype::F16] {
        for cols in [128usize, 37] {
            for margin in margins() {
                let p = margin.params();
                let rows = 10;
                let (cos, labels) = inputs(&mut rng, rows, cols, dtype);
                let mut z: Vec<f32> = cos.iter().map(|&b| widen(b, dtype)).collect();
                let mut loss = vec![0f32; 2 * rows];
                cpu.margin_softmax_fused(
                    &mut z,
                    LogitsShape::dense(rows, cols),
                    &labels,
                    &p,
                    None,
                    1.0,
                    &mut loss,
                )
                .unwrap();
                let mut c16 = cos.clone();
                let mut loss16 = vec![0f32; 2 * rows];
                cpu.margin_softmax_fused16(
                    &mut c16,
                    LogitsShape::dense(rows, cols),
                    dtype,
                    &labels,
                    &p,
                    None,
                    1.0,
                    &mut loss16,
                )
                .unwrap();
                let what = format!("{dtype:?} cols {cols} {margin:?}");
                assert_eq!(bits(&loss16), bits(&loss), "{what}: loss");
                let want: Vec<u16> = z.iter().map(|&g| narrow(g, dtype)).collect();
                assert_eq!(c16, want, "{what}: gradient");
            }
        }
    }
}

/// With the mean kept out of the softmax (grad scale 1, as the step does for 16-bit logits) the
/// non-target gradients of a wide row at initialization (cosines within ±0.05, as random
/// 512-d vectors are) stay normal f16 numbers; with 1/rows folded in they would fall below f16's
/// smallest normal, 2⁻¹⁴. And a gradient beyond f16's range saturates.
#[test]
fn f16_gradients_stay_in_range() {
    let cpu = CpuBackend;
    let (rows, cols) = (2usize, 4096usize);
    let p = Margin::arcface().params();
    let dtype = Dtype::F16;
    let mut rng = Rng::new(99);
    let mut cos: Vec<u16> = (0..rows * cols)
        .map(|_| narrow(-0.05 + 0.1 * rng.uniform() as f32, dtype))
        .collect();
    let labels = vec![5i32, 9];
    let mut loss = vec![0f32; 2 * rows];
    cpu.margin_softmax_fused16(
        &mut cos,
        LogitsShape::dense(rows, cols),
        dtype,
        &labels,
        &p,
        None,
        1.0,
        &mut loss,
    )
    .unwrap();
    let smallest_normal = 2f32.powi(-14);
    let nontarget: Vec<f32> = (0..rows * cols)
        .filter(|k| k % cols != labels[k / cols] as usize)
        .map(|k| widen(cos[k], dtype))
        .collect();
    assert!(
        nontarget.iter().all(|&g| g >= smallest_normal),
        "a non-target gradient fell below f16's normals"
    );
    // Folding 1/1024 in would have made them subnormal: the reason for the GEMMs' alpha.
    assert!(nontarget.iter().any(|&g| g / 1024.0 < smallest_normal));

    let mut huge = vec![narrow(0.0, dtype); 8];
    let mut loss = vec![0f32; 2];
    cpu.margin_softmax_fused16(
        &mut huge,
        LogitsShape::dense(1, 8),
        dtype,
        &vec![0],
        &p,
        None,
        1e4,
        &mut loss,
    )
    .unwrap();
    assert_eq!(widen(huge[0], dtype), -F16_MAX, "target gradient saturates");
}

#[test]
fn bad_input_is_a_typed_error() {
    let cpu = CpuBackend;
    let p = Margin::arcface().params();
    let cos = vec![0u16; 8];
    let (mut max, mut tcos) = (vec![0f32; 2], vec![0f32; 2]);
    assert!(cpu
        .margin_rowmax16(
            &cos,
            LogitsShape::dense(2, 4),
            Dtype::F32,
            &vec![0, 1],
            &p,
            None,
            &mut max,
            &mut tcos
        )
        .is_err());
    assert!(cpu
        .margin_rowmax16(
            &cos,
            LogitsShape::dense(3, 4),
            Dtype::Bf16,
            &vec![0, 1, 2],
            &p,
            None,
            &mut max,
            &mut tcos
        )
        .is_err());
    assert!(cpu
        .gemm_nt16(1, 1, 1, &vec![0.0], &vec![0.0], &mut vec![0u16])
        .is_err());
}

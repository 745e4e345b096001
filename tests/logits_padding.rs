//! The padded logits layout (`LogitsShape`, rows `ld ≥ cols` elements apart) on the CPU: every
//! softmax pass computes on a padded row exactly what it computes on the dense row (bit for bit:
//! the same row function runs on the same values), reads nothing from the padding (a padding
//! value that would win the row max changes nothing), leaves it untouched where it only reads or
//! writes logits (pass 1), and writes +0.0 over it where it writes the gradient (pass 3, the one
//! kernel, and their 16-bit forms), which is what lets the backward GEMMs run over all `ld`
//! columns. The CUDA kernels are checked against these on the same layouts in
//! tests/cuda_kernels.rs (`padded_logits_rows_match_cpu`).

use partial_fc::cpu::margin_softmax16::narrow;
use partial_fc::plan::Dtype;
use partial_fc::{Backend, CpuBackend, LogitsShape, Margin, MarginParams};

/// Padding values a pass that read them would notice: a cosine of 3 clamps to 1, the largest
/// logit a row can have, and a NaN poisons any sum it gets into.
const PAD: [f32; 2] = [3.0, f32::NAN];

struct Case {
    rows: usize,
    cols: usize,
    ld: usize,
    dense: Vec<f32>,
    labels: Vec<i32>,
}

impl Case {
    fn new(rows: usize, cols: usize, ld: usize, seed: u64) -> Case {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let dense = (0..rows * cols).map(|_| 2.04 * next() - 1.02).collect();
        let labels = (0..rows)
            .map(|i| {
                if i % 4 == 3 {
                    -1
                } else {
                    (next() * cols as f32) as i32 % cols as i32
                }
            })
            .collect();
        Case {
            rows,
            cols,
            ld,
            dense,
            labels,
        }
    }

    fn shape(&self) -> LogitsShape {
        LogitsShape {
            rows: self.rows,
            cols: self.cols,
            ld: self.ld,
        }
    }

    fn padded<T: Copy>(&self, dense: &[T], pad: T) -> Vec<T> {
        let mut out = Vec::with_capacity(self.rows * self.ld);
        for row in dense.chunks(self.cols) {
            out.extend_from_slice(row);
            out.extend(std::iter::repeat_n(pad, self.ld - self.cols));
        }
        out
    }

    /// The class columns of a padded buffer, and its padding.
    fn split<T: Copy>(&self, padded: &[T]) -> (Vec<T>, Vec<T>) {
        let (mut values, mut pad) = (Vec::new(), Vec::new());
        for row in padded.chunks(self.ld) {
            values.extend_from_slice(&row[..self.cols]);
            pad.extend_from_slice(&row[self.cols..]);
        }
        (values, pad)
    }
}

fn cases() -> Vec<Case> {
    [
        (5, 13, 16),
        (4, 13, 15),
        (3, 1, 8),
        (6, 8, 8),
        (2, 1001, 1008),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(r, c, ld))| Case::new(r, c, ld, i as u64 + 1))
    .collect()
}

fn margins() -> Vec<MarginParams> {
    let mut filtered = Margin::arcface();
    filtered.interclass_filter = Some(0.5);
    vec![
        Margin::arcface().params(),
        Margin::cosface().params(),
        filtered.params(),
    ]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[track_caller]
fn assert_pad(what: &str, pad: &[f32], want: f32) {
    assert!(
        pad.iter().all(|p| p.to_bits() == want.to_bits()),
        "{what}: padding {pad:?}, want {want}"
    );
}

#[test]
fn f32_passes_on_padded_rows_equal_dense_rows() {
    let cpu = CpuBackend;
    for case in cases() {
        let (rows, dense_shape) = (case.rows, LogitsShape::dense(case.rows, case.cols));
        for p in margins() {
            for pad in PAD {
                let what = format!("{}x{} ld {} pad {pad}", rows, case.cols, case.ld);
                let stats = || (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
                let (mut want, mut got) = (case.dense.clone(), case.padded(&case.dense, pad));
                let ((mut mx, mut tc, mut sum), (mut gmx, mut gtc, mut gsum)) = (stats(), stats());
                let (mut loss, mut gloss) = (vec![0f32; 2 * rows], vec![0f32; 2 * rows]);
                let l = &case.labels;
                cpu.margin_rowmax(&mut want, dense_shape, l, &p, None, &mut mx, &mut tc)
                    .unwrap();
                cpu.margin_rowmax(&mut got, case.shape(), l, &p, None, &mut gmx, &mut gtc)
                    .unwrap();
                let (values, padding) = case.split(&got);
                assert_eq!(bits(&values), bits(&want), "{what}: pass 1 logits");
                assert_pad(&format!("{what}: pass 1"), &padding, pad);
                assert_eq!(bits(&gmx), bits(&mx), "{what}: row max");
                assert_eq!(bits(&gtc), bits(&tc), "{what}: target cos");

                cpu.exp_rowsum(&want, dense_shape, &mx, &mut sum).unwrap();
                cpu.exp_rowsum(&got, case.shape(), &gmx, &mut gsum).unwrap();
                assert_eq!(bits(&gsum), bits(&sum), "{what}: row sum");

                let (st, gst) = ((&mx, &sum, &tc), (&gmx, &gsum, &gtc));
                cpu.softmax_loss_grad(
                    &mut want,
                    dense_shape,
                    l,
                    &p,
                    None,
                    st.0,
                    st.1,
                    st.2,
                    0.5,
                    &mut loss,
                )
                .unwrap();
                cpu.softmax_loss_grad(
                    &mut got,
                    case.shape(),
                    l,
                    &p,
                    None,
                    gst.0,
                    gst.1,
                    gst.2,
                    0.5,
                    &mut gloss,
                )
                .unwrap();
                let (values, padding) = case.split(&got);
                assert_eq!(bits(&values), bits(&want), "{what}: pass 3 gradient");
                assert_pad(&format!("{what}: pass 3"), &padding, 0.0);
                assert_eq!(bits(&gloss), bits(&loss), "{what}: loss");
                assert!(loss.iter().all(|l| l.is_finite()), "{what}: loss {loss:?}");

                let (mut want, mut got) = (case.dense.clone(), case.padded(&case.dense, pad));
                cpu.margin_softmax_fused(&mut want, dense_shape, l, &p, None, 0.5, &mut loss)
                    .unwrap();
                cpu.margin_softmax_fused(&mut got, case.shape(), l, &p, None, 0.5, &mut gloss)
                    .unwrap();
                let (values, padding) = case.split(&got);
                assert_eq!(bits(&values), bits(&want), "{what}: fused gradient");
                assert_pad(&format!("{what}: fused"), &padding, 0.0);
                assert_eq!(bits(&gloss), bits(&loss), "{what}: fused loss");
            }
        }
    }
}

#[test]
fn sixteen_bit_passes_on_padded_rows_equal_dense_rows() {
    let cpu = CpuBackend;
    for dtype in [Dtype::Bf16, Dtype::F16] {
        for case in cases() {
            let (rows, dense_shape) = (case.rows, LogitsShape::dense(case.rows, case.cols));
            let cos: Vec<u16> = case.dense.iter().map(|&v| narrow(v, dtype)).collect();
            for p in margins() {
                for pad in PAD {
                    let what = format!("{dtype:?} {}x{} ld {} pad {pad}", rows, case.cols, case.ld);
                    let pad16 = narrow(pad, dtype);
                    let l = &case.labels;
                    let stats = || (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
                    let ((mut mx, mut tc, mut sum), (mut gmx, mut gtc, mut gsum)) =
                        (stats(), stats());
                    let (mut loss, mut gloss) = (vec![0f32; 2 * rows], vec![0f32; 2 * rows]);
                    let (mut want, mut got) = (cos.clone(), case.padded(&cos, pad16));
                    cpu.margin_rowmax16(&want, dense_shape, dtype, l, &p, None, &mut mx, &mut tc)
                        .unwrap();
                    cpu.margin_rowmax16(&got, case.shape(), dtype, l, &p, None, &mut gmx, &mut gtc)
                        .unwrap();
                    assert_eq!(bits(&gmx), bits(&mx), "{what}: row max");
                    assert_eq!(bits(&gtc), bits(&tc), "{what}: target cos");
                    cpu.exp_rowsum16(&want, dense_shape, dtype, l, &p, None, &mx, &mut sum)
                        .unwrap();
                    cpu.exp_rowsum16(&got, case.shape(), dtype, l, &p, None, &gmx, &mut gsum)
                        .unwrap();
                    assert_eq!(bits(&gsum), bits(&sum), "{what}: row sum");
                    cpu.softmax_loss_grad16(
                        &mut want,
                        dense_shape,
                        dtype,
                        l,
                        &p,
                        None,
                        &mx,
                        &sum,
                        &tc,
                        1.0,
                        &mut loss,
                    )
                    .unwrap();
                    cpu.softmax_loss_grad16(
                        &mut got,
                        case.shape(),
                        dtype,
                        l,
                        &p,
                        None,
                        &gmx,
                        &gsum,
                        &gtc,
                        1.0,
                        &mut gloss,
                    )
                    .unwrap();
                    let (values, padding) = case.split(&got);
                    assert_eq!(values, want, "{what}: pass 3 gradient");
                    assert!(padding.iter().all(|&b| b == 0), "{what}: pass 3 padding");
                    assert_eq!(bits(&gloss), bits(&loss), "{what}: loss");

                    let (mut want, mut got) = (cos.clone(), case.padded(&cos, pad16));
                    cpu.margin_softmax_fused16(
                        &mut want,
                        dense_shape,
                        dtype,
                        l,
                        &p,
                        None,
                        1.0,
                        &mut loss,
                    )
                    .unwrap();
                    cpu.margin_softmax_fused16(
                        &mut got,
                        case.shape(),
                        dtype,
                        l,
                        &p,
                        None,
                        1.0,
                        &mut gloss,
                    )
                    .unwrap();
                    let (values, padding) = case.split(&got);
                    assert_eq!(values, want, "{what}: fused gradient");
                    assert!(padding.iter().all(|&b| b == 0), "{what}: fused padding");
                    assert_eq!(bits(&gloss), bits(&loss), "{what}: fused loss");
                }
            }
        }
    }
}

#[test]
fn a_stride_shorter_than_the_row_or_a_short_buffer_is_an_error() {
    let cpu = CpuBackend;
    let (mut mx, mut tc) = (vec![0f32; 2], vec![0f32; 2]);
    let p = Margin::arcface().params();
    let overlapping = LogitsShape {
        rows: 2,
        cols: 5,
        ld: 4,
    };
    let mut logits = vec![0f32; 10];
    assert!(cpu
        .margin_rowmax(
            &mut logits,
            overlapping,
            &vec![0, 1],
            &p,
            None,
            &mut mx,
            &mut tc
        )
        .is_err());
    // Two rows of 5 padded to 8 need 16 elements; 13 hold the classes but not the stride.
    let padded = LogitsShape::aligned(2, 5).unwrap();
    let mut short = vec![0f32; 13];
    assert!(cpu
        .margin_rowmax(&mut short, padded, &vec![0, 1], &p, None, &mut mx, &mut tc)
        .is_err());
    assert!(
        short.iter().all(|&v| v == 0.0),
        "an error leaves the buffer"
    );
}

/// The padding rows of the sampled centers must hold finite values (the backward GEMMs multiply
/// them by the padding's zero gradient, and 0 · NaN is NaN). A step with a smaller sample than an
/// earlier one finds the earlier step's rows there; here they are the non-finite rows of a
/// diverged layer, and the layer must give, after its weights are replaced by clean ones, exactly
/// what a fresh layer with those weights gives. (Found by review: the rows had been zeroed only
/// at allocation.)
#[test]
fn a_smaller_sample_after_a_diverged_larger_one_is_clean() {
    use partial_fc::collective::SingleRank;
    use partial_fc::{LayerConfig, PartialFc, Sgd, StateDtype};
    let (classes, d, n) = (64u64, 8usize, 4usize);
    let mut cfg = LayerConfig::new(classes, d, n);
    cfg.sample_rate = 1.0;
    cfg.optimizer = Some(
        Sgd {
            momentum: 0.0,
            weight_decay: 1.0,
            state_dtype: StateDtype::F32,
        }
        .into(),
    );
    let mut layer = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let clean = layer.weight().unwrap();
    let x: Vec<f32> = (0..n * d)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1 + 0.05)
        .collect();
    let labels = [0i64, 1, 2, 3];
    let large: Vec<i64> = (0..16).collect();
    // Steps with an absurd learning rate drive the 16 sampled rows to ±inf; one more forward
    // gathers them (NaN after normalization) into rows 0..16 of the sampled centers.
    for _ in 0..3 {
        layer
            .forward_backward_with_sample(&x, &labels, &large)
            .unwrap();
        let _ = layer.step(f32::MAX);
    }
    assert!(layer.weight().unwrap().iter().any(|w| !w.is_finite()));
    layer
        .forward_backward_with_sample(&x, &labels, &large)
        .unwrap();

    // Clean weights, and a sample of 9 (logits rows padded to 16: rows 9..16 are padding).
    layer.set_weight(&clean).unwrap();
    let small: Vec<i64> = (0..9).collect();
    let got = layer
        .forward_backward_with_sample(&x, &labels, &small)
        .unwrap();
    let mut fresh = PartialFc::new(cfg, CpuBackend, SingleRank).unwrap();
    fresh.set_weight(&clean).unwrap();
    let want = fresh
        .forward_backward_with_sample(&x, &labels, &small)
        .unwrap();
    assert!(want.grad_embeddings.iter().all(|g| g.is_finite()));
    assert_eq!(got.loss.to_bits(), want.loss.to_bits());
    assert_eq!(bits(&got.grad_embeddings), bits(&want.grad_embeddings));
    assert_eq!(
        bits(&layer.weight_grad_dense().unwrap()),
        bits(&fresh.weight_grad_dense().unwrap())
    );
}

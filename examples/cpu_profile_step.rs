//! Where the time of one CPU step goes: each reference kernel alone at the benchmark shapes
//! (C = 200,000, batch 512, d 512, r 0.1). `cargo run --release --example cpu_profile_step`

use partial_fc::cpu::*;
use partial_fc::LogitsShape;
use std::time::Instant;
fn t<R>(name: &str, f: impl FnOnce() -> R) -> R {
    let s = Instant::now();
    let r = f();
    eprintln!("{name:>24}: {:8.2} ms", s.elapsed().as_secs_f64() * 1e3);
    r
}
fn main() {
    let (c, m, d, s) = (200_000usize, 512usize, 512usize, 20_000usize);
    let w = partial_fc::init::normal_rows(1, 0, c, d, 0.01);
    let x = partial_fc::init::normal_rows(2, 0, m, d, 1.0);
    let mut labels: Vec<i32> = (0..m as i32).map(|i| i * 37).collect();
    let mut keys = vec![0u64; c];
    let mut sampled = vec![0i32; s];
    let args = partial_fc::SampleArgs {
        shard_len: c,
        shard_start: 0,
        num_sample: s,
        rows: m,
        seed: 1,
        step: 0,
        hard_fraction: 0.0,
    };
    for _ in 0..2 {
        let n = t("sample", || {
            sampling::sample_classes(&args, &mut labels.clone(), None, &mut keys, &mut sampled)
        });
        let mut xh = vec![0f32; m * d];
        let mut xn = vec![0f32; m];
        t("normalize x", || {
            normalize::normalize_rows(&x, m, d, &mut xh, &mut xn)
        });
        // The layer's layout: logits rows (and sampled-center rows) padded to a multiple of 8.
        let shape = LogitsShape::aligned(m, s).unwrap();
        let ld = shape.ld;
        let mut wh = vec![0f32; ld * d];
        let mut wn = vec![0f32; s];
        t("gather_normalize", || {
            normalize::gather_normalize_rows(&w, d, &sampled[..n], &mut wh, &mut wn)
        });
        let mut logits = vec![0f32; m * ld];
        t("gemm_nt", || gemm::gemm_nt(m, ld, d, &xh, &wh, &mut logits)).unwrap();
        let p = partial_fc::Margin::arcface().params();
        let (mut mx, mut sm, mut tc, mut ls) = (
            vec![0f32; m],
            vec![0f32; m],
            vec![0f32; m],
            vec![0f32; 2 * m],
        );
        for l in labels.iter_mut() {
            *l = (*l).min(s as i32 - 1);
        }
        t("margin_rowmax", || {
            margin_softmax::margin_rowmax(&mut logits, shape, &labels, &p, None, &mut mx, &mut tc)
        });
        t("exp_rowsum", || {
            margin_softmax::exp_rowsum(&logits, shape, &mx, &mut sm)
        });
        t("softmax_loss_grad", || {
            margin_softmax::softmax_loss_grad(
                &mut logits,
                shape,
                &labels,
                &p,
                None,
                &mx,
                &sm,
                &tc,
                1.0 / m as f32,
                &mut ls,
            )
        });
        let mut gx = vec![0f32; m * d];
        let mut gw = vec![0f32; ld * d];
        t("gemm_nn", || gemm::gemm_nn(m, d, ld, &logits, &wh, &mut gx)).unwrap();
        t("gemm_tn", || gemm::gemm_tn(ld, d, m, &logits, &xh, &mut gw)).unwrap();
        t("normalize_backward x", || {
            normalize::normalize_backward(&mut gx, &xh, &xn, m, d)
        });
        t("normalize_backward w", || {
            normalize::normalize_backward(&mut gw, &wh, &wn, s, d)
        });
        let mut w2 = w.clone();
        let mut mom = vec![1f32; c * d];
        t("sgd_sparse", || {
            optimizer::sgd_momentum_sparse(&mut w2, &mut mom, &gw, &sampled[..n], d, 0.1, 0.9, 5e-4)
        });
        eprintln!("---");
    }
}

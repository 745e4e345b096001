//! Public functions fed lengths, shapes, indices and sizes that do not fit: each returns a typed
//! error (matched by variant) instead of panicking, overflowing, or reading out of bounds, and
//! writes nothing. Files are replaced atomically: a failed write leaves neither a truncated file
//! nor a temporary one behind.

use partial_fc::backend::{Backend, Collective, SampleArgs, StateBuf};
use partial_fc::collective::{HostStaged, ThreadGroup};
use partial_fc::cpu::gemm::{gemm_nn, gemm_nt, gemm_tn};
use partial_fc::plan::sweep::{plot_svg, sweep};
use partial_fc::plan::{Dtype, PlanConfig};
use partial_fc::LogitsShape;
use partial_fc::{CpuBackend, Margin, PfcError, StateDtype};
use std::path::Path;

fn is_shape<T: std::fmt::Debug>(r: Result<T, PfcError>) -> bool {
    matches!(r, Err(PfcError::Shape(_)))
}

/// Asserts a `PfcError::Shape`, with the call's text in the message when it is something else.
macro_rules! shape_err {
    ($e:expr) => {
        let r = $e;
        assert!(
            matches!(r, Err(PfcError::Shape(_))),
            "{}: {r:?}",
            stringify!($e)
        );
    };
}

// ---- 1. the public GEMMs -------------------------------------------------------------------

#[test]
fn gemm_shapes_that_overflow_usize_are_errors() {
    // 2^63 × 2 wrapped to 0 in release: the length assert passed and the unsafe GEMM ran over
    // 2^63 rows of an empty slice (SIGSEGV); in debug the multiplication panicked.
    let huge = 1usize << (usize::BITS - 1);
    shape_err!(gemm_nt(huge, 2, 2, &[], &[0.0; 4], &mut []));
    shape_err!(gemm_nn(huge, 2, 2, &[], &[0.0; 4], &mut []));
    shape_err!(gemm_tn(huge, 2, 2, &[], &[0.0; 4], &mut []));
    shape_err!(gemm_nt(2, 2, huge, &[], &[], &mut [0.0; 4]));
    shape_err!(gemm_nn(2, huge, 2, &[0.0; 4], &[], &mut []));
    shape_err!(gemm_tn(usize::MAX, usize::MAX, 0, &[], &[], &mut []));
}

#[test]
fn gemm_operands_shorter_than_their_shape_are_errors() {
    let (a, b) = (vec![1.0f32; 12], vec![1.0f32; 12]);
    let mut c = vec![5.0f32; 9];
    shape_err!(gemm_nt(3, 3, 4, &a[..11], &b, &mut c));
    shape_err!(gemm_nn(3, 3, 4, &a, &b[..11], &mut c));
    shape_err!(gemm_tn(3, 3, 4, &a, &b, &mut c[..8]));
    assert_eq!(c, vec![5.0; 9], "a refused GEMM wrote its output");
    // And through the backend, as the layer calls it.
    let cpu = CpuBackend;
    shape_err!(cpu.gemm_nt(3, 3, 4, &a[..11].to_vec(), &b, &mut c));
    shape_err!(cpu.gemm_nn(3, 3, 4, &a, &b, &mut vec![0.0; 8]));
    shape_err!(cpu.gemm_tn(3, 3, 4, &a, &b[..3].to_vec(), &mut c));
    cpu.gemm_nt(3, 3, 4, &a, &b, &mut c).unwrap();
    assert_eq!(c, vec![4.0; 9]);
}

// ---- 2. CpuBackend methods -----------------------------------------------------------------

#[test]
fn buffer_moves_with_overflowing_offsets_or_sizes() {
    let cpu = CpuBackend;
    let mut dst = vec![0.0f32; 4];
    // offset + len overflowed (a panic in debug, a slice panic in release).
    shape_err!(cpu.upload_at(&[1.0], &mut dst, usize::MAX));
    shape_err!(cpu.upload_at(&[1.0, 2.0], &mut dst, 3));
    assert_eq!(dst, vec![0.0; 4]);
    cpu.upload_at(&[1.0], &mut dst, 3).unwrap();
    assert_eq!(dst, vec![0.0, 0.0, 0.0, 1.0]);
    // `len × size_of` in the allocation failure's message overflowed.
    let r = cpu.alloc::<f32>(usize::MAX);
    assert!(matches!(r, Err(PfcError::Device(_))), "{r:?}");
}

#[test]
fn normalization_with_short_buffers_zero_dim_or_bad_indices() {
    let cpu = CpuBackend;
    let weight = vec![1.0f32; 4 * 2]; // 4 rows of dim 2
    let (mut out, mut norms) = (vec![0.0f32; 8], vec![0.0f32; 4]);
    // count 2 with a 1-element index: a slice panic before.
    shape_err!(cpu.gather_normalize_rows(&weight, 2, &vec![0], 2, &mut out, &mut norms));
    // Index values outside the shard's rows: a slice panic before.
    for bad in [4, -1, i32::MAX, i32::MIN] {
        shape_err!(cpu.gather_normalize_rows(&weight, 2, &vec![0, bad], 2, &mut out, &mut norms));
    }
    shape_err!(cpu.gather_normalize_rows(&weight, 0, &vec![0], 1, &mut out, &mut norms));
    shape_err!(cpu.gather_normalize_rows(&weight, 2, &vec![0, 1], 2, &mut out, &mut vec![0.0]));
    assert_eq!((&out, &norms), (&vec![0.0; 8], &vec![0.0; 4]));
    cpu.gather_normalize_rows(&weight, 2, &vec![3, 0], 2, &mut out, &mut norms)
        .unwrap();
    assert!((norms[0] - 2f32.sqrt()).abs() < 1e-6);

    // dim = 0: "chunk_size must not be zero" before.
    shape_err!(cpu.normalize_rows(&weight, 2, 0, &mut out, &mut norms));
    shape_err!(cpu.normalize_rows(&weight, 5, 2, &mut out, &mut norms));
    shape_err!(cpu.normalize_rows(&weight, usize::MAX, 2, &mut out, &mut norms));
    shape_err!(cpu.normalize_backward(&mut out, &weight, &norms, 2, 0));
    shape_err!(cpu.normalize_backward(&mut out, &weight, &norms, 5, 2));
    shape_err!(cpu.normalize_backward(&mut out, &weight, &vec![1.0], 2, 2));
    cpu.normalize_rows(&weight, 0, 0, &mut out, &mut norms)
        .unwrap();

    // The f32 wire: rows × (dim + 2) overflowed.
    let (mut labels, mut x_hat) = (vec![0i64; 4], vec![0.0f32; 8]);
    shape_err!(cpu.unpack_normalize_f32(
        &vec![0.0; 8],
        2,
        usize::MAX,
        &mut labels,
        &mut x_hat,
        &mut norms
    ));
    shape_err!(cpu.unpack_normalize_f32(&vec![1.0; 8], 2, 0, &mut labels, &mut x_hat, &mut norms));
    shape_err!(cpu.unpack_normalize_f32(&vec![1.0; 7], 2, 2, &mut labels, &mut x_hat, &mut norms));
    // The 16-bit wire.
    let mut packed = vec![0u16; 12];
    shape_err!(cpu.pack_embeddings(&vec![1.0; 3], &vec![0; 2], 2, 2, Dtype::F16, &mut packed));
    shape_err!(cpu.pack_embeddings(
        &vec![1.0; 4],
        &vec![0; 2],
        2,
        2,
        Dtype::F16,
        &mut packed[..11].to_vec()
    ));
    shape_err!(cpu.pack_embeddings(&vec![1.0; 4], &vec![0; 2], 2, 0, Dtype::F16, &mut packed));
    cpu.pack_embeddings(&vec![1.0; 4], &vec![7, 9], 2, 2, Dtype::F16, &mut packed)
        .unwrap();
    shape_err!(cpu.unpack_normalize(
        &packed,
        3,
        2,
        Dtype::F16,
        &mut labels,
        &mut x_hat,
        &mut norms
    ));
    shape_err!(cpu.unpack_normalize(
        &packed,
        2,
        usize::MAX - 1,
        Dtype::F16,
        &mut labels,
        &mut x_hat,
        &mut norms
    ));
    cpu.unpack_normalize(
        &packed,
        2,
        2,
        Dtype::F16,
        &mut labels,
        &mut x_hat,
        &mut norms,
    )
    .unwrap();
    assert_eq!(&labels[..2], &[7, 9]);
}

#[test]
fn scatter_and_sparse_update_with_bad_lengths_or_indices() {
    let cpu = CpuBackend;
    let rows = vec![1.0f32; 4];
    let mut dense = vec![9.0f32; 4];
    // shard_len 10 on a 4-element buffer: a slice panic before.
    shape_err!(cpu.scatter_rows(&rows, &vec![0, 1], 2, 2, &mut dense, 10));
    shape_err!(cpu.scatter_rows(&rows, &vec![0, 1], 2, 2, &mut dense, usize::MAX));
    shape_err!(cpu.scatter_rows(&rows, &vec![0], 2, 2, &mut dense, 2));
    shape_err!(cpu.scatter_rows(&rows[..3].to_vec(), &vec![0, 1], 2, 2, &mut dense, 2));
    for bad in [2, -1] {
        shape_err!(cpu.scatter_rows(&rows, &vec![0, bad], 2, 2, &mut dense, 2));
    }
    assert_eq!(dense, vec![9.0; 4], "a refused scatter zeroed the buffer");
    cpu.scatter_rows(&rows, &vec![1], 1, 2, &mut dense, 2)
        .unwrap();
    assert_eq!(dense, vec![0.0, 0.0, 1.0, 1.0]);
    // The accumulating scatter checks the same and adds.
    shape_err!(cpu.scatter_add_rows(&rows, &vec![0, 1], 2, 2, &mut dense, 10));
    shape_err!(cpu.scatter_add_rows(&rows, &vec![0], 2, 2, &mut dense, 2));
    for bad in [2, -1] {
        shape_err!(cpu.scatter_add_rows(&rows, &vec![0, bad], 2, 2, &mut dense, 2));
    }
    assert_eq!(
        dense,
        vec![0.0, 0.0, 1.0, 1.0],
        "a refused scatter changed the buffer"
    );
    cpu.scatter_add_rows(&rows, &vec![1, 0], 2, 2, &mut dense, 2)
        .unwrap();
    assert_eq!(dense, vec![1.0, 1.0, 2.0, 2.0]);

    let mut weight = vec![1.0f32; 4];
    let mut momentum = StateBuf::<CpuBackend>::alloc(&cpu, StateDtype::F32, 4).unwrap();
    // count × dim overflowed.
    shape_err!(cpu.sgd_momentum_sparse(
        &mut weight,
        &mut momentum,
        &vec![0.0; 4],
        &vec![0],
        2,
        usize::MAX,
        0.1,
        0.9,
        0.0
    ));
    assert_eq!(weight, vec![1.0; 4]);
}

#[test]
fn softmax_passes_with_labels_beyond_the_columns_or_short_buffers() {
    let cpu = CpuBackend;
    let p = Margin::arcface().params();
    let (rows, cols) = (2, 3);
    let mut logits = vec![0.5f32; rows * cols];
    let (mut max, mut sum, mut tcos, mut loss) = (
        vec![0.0f32; 2],
        vec![1.0f32; 2],
        vec![0.0f32; 2],
        vec![0.0f32; 4],
    );
    // Label 3 of 3 columns indexed past the row (a slice panic) before.
    let bad = vec![0, 3];
    shape_err!(cpu.margin_rowmax(
        &mut logits,
        LogitsShape::dense(rows, cols),
        &bad,
        &p,
        None,
        &mut max,
        &mut tcos
    ));
    shape_err!(cpu.softmax_loss_grad(
        &mut logits,
        LogitsShape::dense(rows, cols),
        &bad,
        &p,
        None,
        &max,
        &sum,
        &tcos,
        1.0,
        &mut loss
    ));
    shape_err!(cpu.margin_softmax_fused(
        &mut logits,
        LogitsShape::dense(rows, cols),
        &bad,
        &p,
        None,
        1.0,
        &mut loss
    ));
    assert_eq!(logits, vec![0.5; 6], "a refused pass wrote the logits");
    // Short buffers and overflowing shapes.
    let good = vec![0, -1];
    shape_err!(cpu.margin_rowmax(
        &mut logits,
        LogitsShape::dense(3, cols),
        &good,
        &p,
        None,
        &mut max,
        &mut tcos
    ));
    shape_err!(cpu.margin_rowmax(
        &mut logits,
        LogitsShape::dense(rows, cols),
        &good,
        &p,
        None,
        &mut vec![0.0],
        &mut tcos
    ));
    shape_err!(cpu.exp_rowsum(
        &logits,
        LogitsShape::dense(rows, usize::MAX),
        &max,
        &mut sum
    ));
    shape_err!(cpu.exp_rowsum(
        &logits,
        LogitsShape::dense(rows, cols),
        &max,
        &mut vec![0.0]
    ));
    shape_err!(cpu.softmax_loss_grad(
        &mut logits,
        LogitsShape::dense(rows, cols),
        &good,
        &p,
        None,
        &max,
        &vec![1.0],
        &tcos,
        1.0,
        &mut loss
    ));
    shape_err!(cpu.margin_softmax_fused(
        &mut logits,
        LogitsShape::dense(rows, cols),
        &good,
        &p,
        None,
        1.0,
        &mut vec![]
    ));
    cpu.margin_softmax_fused(
        &mut logits,
        LogitsShape::dense(rows, cols),
        &good,
        &p,
        None,
        1.0,
        &mut loss,
    )
    .unwrap();
    assert!(loss[0] > 0.0 && loss[1] == 0.0);

    // The 16-bit passes check their labels the same way.
    let mut cos = vec![0x3800u16; rows * cols]; // 0.5 in f16
    shape_err!(cpu.margin_rowmax16(
        &cos,
        LogitsShape::dense(rows, cols),
        Dtype::F16,
        &bad,
        &p,
        None,
        &mut max,
        &mut tcos
    ));
    shape_err!(cpu.margin_softmax_fused16(
        &mut cos,
        LogitsShape::dense(rows, cols),
        Dtype::F16,
        &bad,
        &p,
        None,
        1.0,
        &mut loss
    ));
    assert_eq!(cos, vec![0x3800; 6]);
}

#[test]
fn sampler_with_labels_outside_the_shard_or_short_buffers() {
    let cpu = CpuBackend;
    let args = SampleArgs {
        shard_len: 10,
        shard_start: 0,
        num_sample: 3,
        rows: 2,
        seed: 1,
        step: 0,
        hard_fraction: 0.5,
    };
    let (mut keys, mut sampled) = (vec![0u64; 10], vec![0i32; 10]);
    // A shard-local label >= shard_len indexed past the keys (a slice panic) before.
    shape_err!(cpu.sample_classes(&args, &mut vec![1, 10], None, &mut keys, &mut sampled));
    shape_err!(cpu.sample_classes(&args, &mut vec![1], None, &mut keys, &mut sampled));
    shape_err!(cpu.sample_classes(&args, &mut vec![1, 2], None, &mut vec![0; 9], &mut sampled));
    shape_err!(cpu.sample_classes(&args, &mut vec![1, 2], None, &mut keys, &mut vec![0; 2]));
    shape_err!(cpu.sample_classes(
        &args,
        &mut vec![1, 2],
        Some(&vec![0.0; 9]),
        &mut keys,
        &mut sampled
    ));
    // Global class ids past u64::MAX: `shard_start + class` overflowed.
    let far = SampleArgs {
        shard_start: u64::MAX - 5,
        ..args
    };
    shape_err!(cpu.sample_classes(&far, &mut vec![1, 2], None, &mut keys, &mut sampled));
    let mut labels = vec![1, -1];
    let n = cpu
        .sample_classes(&args, &mut labels, None, &mut keys, &mut sampled)
        .unwrap();
    assert_eq!(n, 3);
    assert!(sampled[..n].contains(&1));
}

#[test]
fn hard_negative_scores_with_zero_dim_or_short_scratch() {
    let cpu = CpuBackend;
    let (shard, dim, rows) = (6, 2, 2);
    let weight = vec![1.0f32; shard * dim];
    let x_hat = vec![0.5f32; rows * dim];
    let row_labels = vec![0i64, 1];
    let mut scores = vec![7.0f32; shard];
    let call = |dim: usize, cw: usize, cc: usize, scores: &mut Vec<f32>| {
        cpu.class_max_cosine(
            &weight,
            shard,
            dim,
            &x_hat,
            &row_labels,
            rows,
            &mut vec![0.0; cw],
            &mut vec![0.0; cc],
            scores,
        )
    };
    // Scratch that cannot hold one class: a slice panic before.
    assert!(is_shape(call(dim, 1, 4, &mut scores)));
    assert!(is_shape(call(dim, 4, 1, &mut scores)));
    assert!(is_shape(call(usize::MAX, 4, 4, &mut scores)));
    assert!(is_shape(call(dim, 4, 4, &mut vec![0.0; 5])));
    // dim = 0 divided by zero before; now there is nothing to score, as on CUDA.
    call(0, 4, 4, &mut scores).unwrap();
    assert_eq!(scores, vec![7.0; shard]);
    call(dim, 4, 4, &mut scores).unwrap();
    assert!(scores.iter().all(|&s| (s - 2f32.sqrt() / 2.0).abs() < 1e-5));
}

// ---- 3. the planner ------------------------------------------------------------------------

#[test]
fn sweep_of_zero_gpus_and_totals_of_huge_reserves() {
    let ok = PlanConfig::new(1_000_000, 8, 32 << 30);
    // gpus = 0 divided by zero in the sweep's validity check.
    match sweep(&PlanConfig { gpus: 0, ..ok }, 100, 10_000, 4) {
        Err(PfcError::Param { name, .. }) => assert_eq!(name, "gpus"),
        other => panic!("{other:?}"),
    }
    // fc + u64::MAX overflowed.
    let huge = PlanConfig {
        reserved: u64::MAX,
        ..ok
    };
    assert_eq!(huge.rank0_total(), None);
    assert!(ok.rank0_total().is_some());
}

// ---- 4. host-staged collectives ------------------------------------------------------------

#[test]
fn host_staged_counts_whose_group_length_overflows() {
    let count = usize::MAX / 2 + 1; // × 2 ranks overflows usize
    let results = ThreadGroup::run(2, |c| {
        let staged = HostStaged::new(c);
        let cpu = CpuBackend;
        let f32s = staged.reduce_scatter_f32(&cpu, &vec![0.0f32; 4], count, &mut vec![0.0; 4]);
        let halves =
            staged.reduce_scatter_16(&cpu, &vec![0u16; 4], count, &mut vec![0; 4], Dtype::Bf16);
        let gathered = staged.all_gather(&cpu, &vec![0u16; 4], count, &mut vec![0; 8]);
        // A rank refused before a collective breaks the group (it cannot know whether its
        // peers were refused too or are waiting for it): a later call fails at once, no hang.
        let mut v = vec![1.0f32, 2.0];
        let later = staged.reduce_scatter_f32(&cpu, &vec![1.0f32, 2.0], 1, &mut v);
        (f32s, halves, gathered, later)
    });
    for (f32s, halves, gathered, later) in results {
        for r in [f32s, halves, gathered] {
            assert!(matches!(r, Err(PfcError::Collective(_))), "{r:?}");
        }
        match later {
            Err(PfcError::Collective(msg)) => assert!(msg.contains("aborted"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}

// ---- 5. the synthetic demo -----------------------------------------------------------------

#[test]
fn synthetic_sizes_that_overflow() {
    use partial_fc::synthetic::backbone::Mlp;
    use partial_fc::synthetic::data::all_views;
    let r = Mlp::new(1 << 40, 1 << 40, 1, 0);
    assert!(matches!(r, Err(PfcError::Param { .. })), "{r:?}");
    let r = all_views(u64::MAX, 2, 1);
    assert!(matches!(r, Err(PfcError::Param { .. })), "{r:?}");
    assert_eq!(all_views(u64::MAX - 1, 1, 3).unwrap().len(), 3);
}

// ---- 7. atomic file writes -----------------------------------------------------------------

/// Names in `dir` other than those in `keep`.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

/// A non-empty folder at `path`: renaming a file over it fails, as a full disk would fail a write.
fn occupied(path: &Path) {
    std::fs::create_dir(path).unwrap();
    std::fs::write(path.join("inside"), "x").unwrap();
}

fn sweep_points() -> (PlanConfig, Vec<partial_fc::plan::sweep::SweepPoint>) {
    let cfg = PlanConfig::new(1_000_000, 8, 32 << 30);
    let points = sweep(&cfg, 100_000, 10_000_000, 6).unwrap();
    (cfg, points)
}

#[test]
fn memory_plot_replaces_the_file_instead_of_writing_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.svg");
    std::fs::write(&path, "old plot").unwrap();
    // A second name for the old file: written in place (truncated, then rewritten), it would
    // read the new plot, or half of it after a failed write.
    std::fs::hard_link(&path, dir.path().join("old.svg")).unwrap();
    let (cfg, points) = sweep_points();
    plot_svg(&path, &cfg, &points).unwrap();
    assert!(std::fs::read_to_string(&path).unwrap().starts_with("<svg"));
    let old = std::fs::read_to_string(dir.path().join("old.svg")).unwrap();
    assert_eq!(old, "old plot");
    assert!(leftovers(dir.path(), &["memory.svg", "old.svg"]).is_empty());

    let taken = dir.path().join("taken.svg");
    occupied(&taken);
    let r = plot_svg(&taken, &cfg, &points);
    assert!(matches!(r, Err(PfcError::Io { .. })), "{r:?}");
    let left = leftovers(dir.path(), &["memory.svg", "old.svg", "taken.svg"]);
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

#[test]
fn loss_plot_replaces_the_file_instead_of_writing_into_it() {
    use partial_fc::synthetic::plot::plot_losses;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.svg");
    std::fs::write(&path, "old plot").unwrap();
    std::fs::hard_link(&path, dir.path().join("old.svg")).unwrap();
    let curves = vec![("r = 0.1".to_string(), vec![5.0, 4.0, 3.0])];
    plot_losses(&path, "loss", &curves, 1).unwrap();
    assert!(std::fs::read_to_string(&path).unwrap().contains("r = 0.1"));
    let old = std::fs::read_to_string(dir.path().join("old.svg")).unwrap();
    assert_eq!(old, "old plot");

    let taken = dir.path().join("taken.svg");
    occupied(&taken);
    let r = plot_losses(&taken, "loss", &curves, 1);
    assert!(matches!(r, Err(PfcError::Io { .. })), "{r:?}");
    let left = leftovers(dir.path(), &["loss.svg", "old.svg", "taken.svg"]);
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

#[test]
fn failed_id_file_write_leaves_no_temporary_file() {
    use partial_fc::rendezvous::{write_id_file, UniqueId};
    let dir = tempfile::tempdir().unwrap();
    let id = UniqueId::from_hex(&"ab".repeat(128)).unwrap();
    let path = dir.path().join("nccl.id");
    occupied(&path);
    let r = write_id_file(&path, &id);
    assert!(matches!(r, Err(PfcError::Io { .. })), "{r:?}");
    let left = leftovers(dir.path(), &["nccl.id"]);
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
    // And a successful write leaves only the file.
    let good = dir.path().join("good.id");
    write_id_file(&good, &id).unwrap();
    assert_eq!(std::fs::read_to_string(&good).unwrap(), "ab".repeat(128));
    assert!(leftovers(dir.path(), &["nccl.id", "good.id"]).is_empty());
}

/// A safetensors file of one f32 tensor "w" with the given header fields and `data` bytes.
fn tensor_file_with(shape: &str, offsets: &str, data: &[u8]) -> Vec<u8> {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":{offsets}}},"__metadata__":{{"k":"v"}}}}"#
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn tensor_files_whose_header_and_data_disagree_are_format_errors() {
    use partial_fc::tensor_file::TensorFile;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    // The well-formed file reads back.
    std::fs::write(&path, tensor_file_with("[2]", "[0,8]", &data)).unwrap();
    let file = TensorFile::read(&path).unwrap();
    assert_eq!(file.f32("w").unwrap().unwrap(), (vec![1.0, 2.0], vec![2]));
    assert_eq!(file.metadata()["k"], "v");
    let mut padded = data.clone();
    padded.extend_from_slice(&[0; 4]);
    let bad = [
        ("padded", tensor_file_with("[2]", "[0,8]", &padded)),
        ("truncated", tensor_file_with("[2]", "[0,8]", &data[..6])),
        ("shape vs offsets", tensor_file_with("[3]", "[0,8]", &data)),
        (
            "offsets not from 0",
            tensor_file_with("[1]", "[4,8]", &data),
        ),
        (
            "shape overflows",
            tensor_file_with("[4611686018427387904,8]", "[0,8]", &data),
        ),
        ("negative dim", tensor_file_with("[-2]", "[0,8]", &data)),
    ];
    for (what, bytes) in bad {
        std::fs::write(&path, bytes).unwrap();
        match TensorFile::read(&path) {
            Err(PfcError::Format { .. }) => {}
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
    // A tensor of another dtype than asked is an error, not a reinterpretation.
    std::fs::write(&path, tensor_file_with("[2]", "[0,8]", &data)).unwrap();
    let file = TensorFile::read(&path).unwrap();
    assert!(matches!(file.i64("w"), Err(PfcError::Format { .. })));
    assert!(file.f32("absent").unwrap().is_none());
}

#[test]
fn a_checkpoint_of_several_streaming_blocks_round_trips() {
    // 40,000 × 512 = 20.5M values per tensor: the save streams each tensor in two blocks of at
    // most 2^24 values, with a bf16 momentum widened block by block.
    use partial_fc::{collective::SingleRank, LayerConfig, PartialFc};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let mut cfg = LayerConfig::new(40_000, 512, 4);
    if let Some(o) = cfg.optimizer.as_mut() {
        o.set_state_dtype(StateDtype::Bf16);
    }
    let mut layer = PartialFc::new(cfg.clone(), CpuBackend, SingleRank).unwrap();
    let (x, labels) = (
        partial_fc::init::normal_rows(5, 0, 4, 512, 1.0),
        vec![3i64, 17, 39_999, 20_000],
    );
    layer.forward_backward(&x, &labels).unwrap();
    layer.step(0.1).unwrap();
    layer.save(&path).unwrap();
    let mut other = PartialFc::zeroed(cfg, CpuBackend, SingleRank).unwrap();
    other.load(&path).unwrap();
    assert!(other.weight().unwrap() == layer.weight().unwrap());
    assert!(other.momentum().unwrap() == layer.momentum().unwrap());
    assert_eq!(other.steps(), layer.steps());
}

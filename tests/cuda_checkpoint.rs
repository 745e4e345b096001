//! Checkpoints through the CUDA backend: a run saved by 3 CPU ranks loads into a CUDA layer
//! (`load_resharded`: block uploads at offsets, the bf16 momentum's rounding on the device) and
//! saves back (block downloads) exactly as a CPU layer does, byte for byte. The shard (70,001 ×
//! 257 values) spans two 64 MiB blocks, the second starting inside a row.
#![cfg(feature = "cuda")]

mod cuda_device;

use cuda_device::gpu;
use partial_fc::collective::{SingleRank, ThreadGroup};
use partial_fc::{Collective, CpuBackend, LayerConfig, PartialFc, StateDtype};

const CLASSES: u64 = 70_001;
const DIM: usize = 257;

fn config(state: StateDtype) -> LayerConfig {
    let mut cfg = LayerConfig::new(CLASSES, DIM, 8);
    cfg.sample_rate = 0.5;
    cfg.optimizer.as_mut().unwrap().set_state_dtype(state);
    cfg
}

#[test]
fn a_cuda_layer_loads_and_saves_checkpoints_as_the_cpu_does() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let saved: Vec<_> = ThreadGroup::run(3, |comm| {
        let rank = comm.rank();
        let mut layer = PartialFc::new(config(StateDtype::F32), CpuBackend, comm).unwrap();
        let x = partial_fc::init::normal_rows(5, rank as u64 * 8, 8, DIM, 1.0);
        let labels: Vec<i64> = (0..8)
            .map(|i| (i * 6007 + rank as i64 * 7) % 70_001)
            .collect();
        layer.forward_backward(&x, &labels).unwrap();
        layer.step(0.5).unwrap();
        let path = root.join(format!("rank{rank}.safetensors"));
        layer.save(&path).unwrap();
        path
    });
    for state in [StateDtype::F32, StateDtype::Bf16] {
        let Some(g) = gpu() else { return };
        let mut on_gpu = PartialFc::zeroed(config(state), g, SingleRank).unwrap();
        on_gpu.load_resharded(&saved).unwrap();
        let mut on_cpu = PartialFc::zeroed(config(state), CpuBackend, SingleRank).unwrap();
        on_cpu.load_resharded(&saved).unwrap();
        assert_eq!(on_gpu.steps(), 1);
        assert_eq!(
            on_gpu.weight().unwrap(),
            on_cpu.weight().unwrap(),
            "{state}"
        );
        let (m_gpu, m_cpu) = (on_gpu.momentum().unwrap(), on_cpu.momentum().unwrap());
        assert!(m_gpu.is_some());
        assert_eq!(m_gpu, m_cpu, "{state} momentum");
        let (a, b) = (root.join("gpu.safetensors"), root.join("cpu.safetensors"));
        on_gpu.save(&a).unwrap();
        on_cpu.save(&b).unwrap();
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{state}: the files differ"
        );
    }
}

/// `CheckpointSet::predict_top_k_on` with the CUDA backend (`pfc predict --backend cuda`): the
/// same classes as on the CPU (9,001 classes in 3 files: three blocks of up to 4,096 classes,
/// the first two spanning two files), scores within 1e-5.
#[test]
fn checkpoint_prediction_on_cuda_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let paths: Vec<_> = ThreadGroup::run(3, |comm| {
        let comm_rank = comm.rank();
        let layer = PartialFc::new(LayerConfig::new(9001, 24, 4), CpuBackend, comm).unwrap();
        let path = root.join(format!("rank{}.safetensors", comm_rank));
        layer.save(&path).unwrap();
        path
    });
    let set = partial_fc::checkpoint::CheckpointSet::open(&paths).unwrap();
    let x = partial_fc::init::normal_rows(3, 0, 37, 24, 1.0);
    let cpu = set.predict_top_k(&x, 6, &|_| {}).unwrap();
    let gpu = set.predict_top_k_on(&g, &x, 6, &|_| {}).unwrap();
    assert_eq!(gpu.classes, cpu.classes);
    for (a, b) in gpu.scores.iter().zip(&cpu.scores) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

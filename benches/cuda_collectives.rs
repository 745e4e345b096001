//! The embedding all-gather through NCCL with one rank on the device (issue: all-gather + unpack
//! and normalize of 1024 × 512 embeddings no slower than NCCL's own all-gather of the same bytes
//! plus one read and write of them), for the f32 path and the bf16 wire, and the reduce-scatter
//! of the embedding gradient likewise, in f32 and in bf16 (cast, 16-bit reduce-scatter, cast
//! back: `LayerConfig::grad_wire`).
//!
//! Without a CUDA device or NCCL it prints why and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion};
use partial_fc::cuda::nccl::{nccl_available, new_unique_id, NcclCollective};
use partial_fc::cuda::CudaBackend;
use partial_fc::plan::Dtype;
use partial_fc::{Backend, Collective};
use std::io::Write;

fn setup() -> Option<(CudaBackend, NcclCollective)> {
    let g = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({e})");
            return None;
        }
    };
    if let Err(e) = nccl_available() {
        let _ = writeln!(std::io::stderr(), "skipped: {e}");
        return None;
    }
    let comm = NcclCollective::new(&g, 0, 1, new_unique_id().ok()?, None).ok()?;
    Some((g, comm))
}

fn all_gather(c: &mut Criterion) {
    let Some((g, comm)) = setup() else { return };
    let (rows, dim) = (1024usize, 512usize);
    let x = partial_fc::init::normal_rows(1, 0, rows, dim, 1.0);
    let labels: Vec<i64> = (0..rows as i64).collect();
    let mut gx = g.alloc::<f32>(rows * dim).unwrap();
    g.upload(&x, &mut gx).unwrap();
    let mut gathered = g.alloc::<f32>(rows * dim).unwrap();
    let mut copy = g.alloc::<f32>(rows * dim).unwrap();
    let mut gathered_labels = g.alloc::<i64>(rows).unwrap();
    let (mut xh, mut norms) = (
        g.alloc::<f32>(rows * dim).unwrap(),
        g.alloc::<f32>(rows).unwrap(),
    );
    // The packed rows as the layer builds them on the host (src/cpu/wire.rs).
    let row = partial_fc::cpu::wire::packed_row_len(dim);
    let mut host16 = vec![0u16; rows * row];
    partial_fc::cpu::wire::pack_embeddings(&x, &labels, rows, dim, Dtype::Bf16, &mut host16);
    let (mut send, mut recv) = (
        g.alloc::<u16>(rows * row).unwrap(),
        g.alloc::<u16>(rows * row).unwrap(),
    );
    g.upload(&host16, &mut send).unwrap();
    let row_f32 = partial_fc::cpu::wire::packed_row_len_f32(dim);
    let mut host32 = vec![0f32; rows * row_f32];
    partial_fc::cpu::wire::pack_embeddings_f32(&x, &labels, rows, dim, &mut host32);
    let (mut send_f32, mut recv_f32) = (
        g.alloc::<f32>(rows * row_f32).unwrap(),
        g.alloc::<f32>(rows * row_f32).unwrap(),
    );
    g.upload(&host32, &mut send_f32).unwrap();

    let (mut grad_send, mut grad_recv) = (
        g.alloc::<u16>(rows * dim).unwrap(),
        g.alloc::<u16>(rows * dim).unwrap(),
    );

    let mut group = c.benchmark_group("all_gather_1024x512");
    group.bench_function("baseline_nccl_all_gather_f32_plus_read_write", |b| {
        b.iter(|| {
            comm.all_gather(&g, &gx, rows * dim, &mut gathered).unwrap();
            g.copy(&gathered, &mut copy, rows * dim).unwrap();
            g.synchronize().unwrap();
        })
    });
    // What the layer runs on the device: rows packed with their labels on the host (uploaded
    // before, as the embeddings always are), one all-gather, one unpack + normalize kernel.
    let mut packed_all_gather = |comm: &NcclCollective| {
        comm.all_gather(&g, &send_f32, rows * row_f32, &mut recv_f32)
            .unwrap();
        g.unpack_normalize_f32(
            &recv_f32,
            rows,
            dim,
            &mut gathered_labels,
            &mut xh,
            &mut norms,
        )
        .unwrap();
        g.synchronize().unwrap();
    };
    group.bench_function("f32_packed_all_gather_unpack_normalize", |b| {
        b.iter(|| packed_all_gather(&comm))
    });
    // The same all-gather through a communicator with a timeout, as a job should run: non-
    // blocking from NCCL 2.14 on, each call polled until NCCL has it on the stream, then the
    // stream polled under the timeout (src/cuda/nccl). Against the blocking one above, this is
    // what the bounded waits cost per collective.
    if let Ok(timed) = new_unique_id()
        .and_then(|id| NcclCollective::new(&g, 0, 1, id, Some(std::time::Duration::from_secs(60))))
    {
        let kind = if timed.is_nonblocking() {
            "nonblocking"
        } else {
            "blocking"
        };
        group.bench_function(
            format!("f32_packed_all_gather_unpack_normalize_timeout_{kind}"),
            |b| b.iter(|| packed_all_gather(&timed)),
        );
    }
    group.bench_function("bf16_wire_all_gather_unpack_normalize", |b| {
        b.iter(|| {
            comm.all_gather(&g, &send, rows * row, &mut recv).unwrap();
            g.unpack_normalize(
                &recv,
                rows,
                dim,
                Dtype::Bf16,
                &mut gathered_labels,
                &mut xh,
                &mut norms,
            )
            .unwrap();
            g.synchronize().unwrap();
        })
    });
    group.bench_function("baseline_nccl_reduce_scatter_f32_plus_read_write", |b| {
        b.iter(|| {
            comm.reduce_scatter_f32(&g, &gx, rows * dim, &mut gathered)
                .unwrap();
            g.copy(&gathered, &mut copy, rows * dim).unwrap();
            g.synchronize().unwrap();
        })
    });
    group.bench_function("reduce_scatter_f32", |b| {
        b.iter(|| {
            comm.reduce_scatter_f32(&g, &gx, rows * dim, &mut gathered)
                .unwrap();
            g.synchronize().unwrap();
        })
    });
    // The embedding gradient in bf16 (`LayerConfig::grad_wire`): what the layer runs instead of
    // the f32 reduce-scatter above, casts included, at half its bytes on the wire.
    group.bench_function("bf16_grad_wire_cast_reduce_scatter_cast_back", |b| {
        b.iter(|| {
            g.cast_to_wire(&gx, rows * dim, Dtype::Bf16, &mut grad_send)
                .unwrap();
            comm.reduce_scatter_16(&g, &grad_send, rows * dim, &mut grad_recv, Dtype::Bf16)
                .unwrap();
            g.cast_from_wire(&grad_recv, rows * dim, Dtype::Bf16, &mut gathered)
                .unwrap();
            g.synchronize().unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, all_gather);
criterion_main!(benches);

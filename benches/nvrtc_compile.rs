//! Start-up cost of the CUDA backend: the six kernel families compiled with NVRTC to a CUBIN
//! (sm_90), each on a thread of its own (`compile_families`, what a backend runs once per
//! process) against the baseline of one compile after another, in the same run. Needs NVRTC but
//! no GPU (`bash scripts/install-nvrtc.sh`, then its lib folder on LD_LIBRARY_PATH); without it,
//! it prints "skipped" and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion};
use partial_fc::cuda::compile::{
    compile, compile_families, nvrtc_available, program_source, FAMILIES,
};
use std::time::Duration;

fn nvrtc_compile(c: &mut Criterion) {
    if let Err(e) = nvrtc_available() {
        println!("skipped: {e}");
        return;
    }
    let arch = "sm_90";
    let mut group = c.benchmark_group("nvrtc_six_families_sm_90");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(25));
    group.bench_function("one_after_another", |b| {
        b.iter(|| {
            for (name, src) in FAMILIES {
                compile(name, &program_source(src), arch, &[]).unwrap();
            }
        })
    });
    group.bench_function("a_thread_each", |b| {
        b.iter(|| compile_families(arch).unwrap())
    });
    group.finish();
}

criterion_group!(benches, nvrtc_compile);
criterion_main!(benches);

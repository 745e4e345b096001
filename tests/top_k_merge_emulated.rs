//! The GPU `top_k_merge` kernel launched directly on the CPU emulator, against the CPU merge, on
//! inputs the layer never produces: −inf cosines (which the CPU merge never admits, since an
//! empty slot (−inf, −1) beats them) and ties. Found by a review: the kernel's rounds took a
//! −inf chunk entry after an empty slot, out of the CPU's order. Emulator only: on a machine
//! with a GPU the kernel's other tests run it for real (tests/predict.rs, through class_top_k).
#![cfg(unix)]

use partial_fc::cpu::top_k::top_k_merge;
use pfc_cuda_emulator::raw;
use std::ffi::c_void;

fn emulator() -> bool {
    pfc_cuda_emulator::install_for_test()
}

fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// The kernel's merge of one chunk into each row's top k (one block of 256 threads per row, as
/// the backend launches it).
fn gpu_merge(
    cosines: &[f32],
    rows: usize,
    len: usize,
    start: i32,
    k: usize,
    scores: &mut [f32],
    ids: &mut [i32],
) {
    let (mut c, mut s, mut i) = (
        cosines.as_ptr() as *mut c_void,
        scores.as_mut_ptr() as *mut c_void,
        ids.as_mut_ptr() as *mut c_void,
    );
    let (mut len_i, mut start_i, mut k_i) = (len as i32, start, k as i32);
    let mut args = vec![
        arg(&mut c),
        arg(&mut len_i),
        arg(&mut start_i),
        arg(&mut k_i),
        arg(&mut s),
        arg(&mut i),
    ];
    // SAFETY: the arguments match top_k_merge's parameters; the emulated device memory is host
    // memory, and the slices hold rows × len cosines and rows × k slots.
    unsafe { raw::launch("top_k_merge", rows as u32, 256, &mut args) }.unwrap();
}

#[test]
fn minus_infinity_and_ties_merge_as_on_the_cpu() {
    if !emulator() {
        return;
    }
    let k = 4;
    let ni = f32::NEG_INFINITY;
    // chunks of 3 classes; rows: a −inf beside one real value, all −inf, ties, a full top k
    let chunks: [[f32; 6]; 2] = [[0.5, ni, ni, ni, ni, ni], [0.25, 0.25, ni, 0.9, 0.1, 0.1]];
    let rows = 2;
    let (mut cpu_s, mut cpu_i) = (vec![ni; rows * k], vec![-1; rows * k]);
    let (mut gpu_s, mut gpu_i) = (cpu_s.clone(), cpu_i.clone());
    for (n, chunk) in chunks.iter().enumerate() {
        let start = 3 * n as i32;
        top_k_merge(chunk, rows, 3, start, k, &mut cpu_s, &mut cpu_i).unwrap();
        gpu_merge(chunk, rows, 3, start, k, &mut gpu_s, &mut gpu_i);
        assert_eq!(gpu_i, cpu_i, "ids after chunk {n}");
        assert_eq!(gpu_s, cpu_s, "scores after chunk {n}");
    }
    assert_eq!(cpu_i, [0, 3, 4, -1, 3, 4, 5, -1]);
}

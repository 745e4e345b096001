//! What the golden-file tests share: finding the files, and the comparison they are held to
//! (which tests/cuda_step_fuzz.rs uses too).

use std::path::{Path, PathBuf};

/// The golden step files, from `PFC_GOLDEN_DIR` or `../shared/golden`; `None` if the folder is
/// absent.
#[allow(dead_code)] // tests/cuda_step_fuzz.rs shares only the comparison
pub fn golden_files() -> Option<Vec<PathBuf>> {
    let dir = std::env::var_os("PFC_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Some(files)
}

/// Element-wise `|got − want| <= 1e-6 + 1e-4 · max(|want|, row scale)`, where the row scale is the
/// largest magnitude of the element's row. f32 cancellation leaves the small entries of a row
/// noisy at the 1e-3 level in any f32 implementation: against an f64 evaluation, the published
/// implementation's own grad_weight is off by up to 8e-3 relative on such entries (arcface_full,
/// element 32236), and a GPU sums in another order than the CPU, so a bound on the bare element
/// would test rounding luck, not correctness.
#[track_caller]
pub fn assert_close_in_row(what: &str, got: &[f32], want: &[f32], row: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (r, (g_row, w_row)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
        let scale = w_row.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
        for (j, (&g, &w)) in g_row.iter().zip(w_row).enumerate() {
            let err = (g as f64 - w as f64).abs();
            let tol = 1e-6 + 1e-4 * (w as f64).abs().max(scale);
            assert!(
                err <= tol,
                "{what}[{r}, {j}]: got {g}, want {w} (err {err:e} > {tol:e})"
            );
            worst = worst.max(err / (1e-6 + (w as f64).abs().max(scale)));
        }
    }
    eprintln!("  {what}: worst error relative to its row {worst:.2e}");
}

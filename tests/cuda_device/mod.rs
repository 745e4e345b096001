//! The device of the CUDA tests: the real GPU where there is one, else the CPU emulator of the
//! CUDA driver (crates/cuda-emulator), so that every kernel, its launch glue and the whole step
//! still run against the CPU reference in CI. `PFC_CUDA_EMULATOR=0` turns the emulator off
//! (the tests then print that they were skipped); `PFC_CUDA_EMULATOR=only` refuses a real GPU.
//! With `CI=true` or `PFC_REQUIRE_CUDA_TESTS=1` a test that can use neither fails instead of
//! skipping.

use partial_fc::cuda::CudaBackend;

/// Prints past the test harness's output capture.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Where the tests run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Device {
    Gpu,
    Emulator,
}

/// Makes the CUDA backend loadable: the real driver if present, else the emulator. `None`
/// (with the reason printed) where neither can run.
pub fn device() -> Option<Device> {
    static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    let found = DEVICE.get_or_init(|| {
        let mode = std::env::var("PFC_CUDA_EMULATOR").unwrap_or_default();
        let mut no_gpu = String::from("PFC_CUDA_EMULATOR=only");
        if mode != "only" {
            match partial_fc::cuda::check_available() {
                Ok(()) => return Ok(Device::Gpu),
                Err(e) if mode == "0" => return Err(format!("no CUDA device ({e})")),
                Err(e) => no_gpu = e.to_string(),
            }
        }
        install_emulator()
            .and_then(|()| partial_fc::cuda::check_available().map_err(|e| e.to_string()))
            .map(|()| Device::Emulator)
            .map_err(|e| format!("no CUDA device ({no_gpu}), and no emulator ({e})"))
    });
    match found {
        Ok(d) => Some(*d),
        Err(e) => {
            must_run(e);
            say!("skipped: {e}");
            None
        }
    }
}

/// In CI (and under scripts/test.sh) the emulator is installed: a skip there would hide every
/// CUDA test, so it fails instead, unless the emulator was turned off on purpose.
#[track_caller]
pub fn must_run(why: &str) {
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("PFC_REQUIRE_CUDA_TESTS").is_ok_and(|v| v == "1");
    let off = std::env::var("PFC_CUDA_EMULATOR").is_ok_and(|v| v == "0");
    assert!(
        !required || off,
        "the CUDA tests must run here (CI=true or PFC_REQUIRE_CUDA_TESTS=1), on a GPU or the emulator: {why}"
    );
}

/// True where the tests run on the emulator, which must not refuse what a GPU's NCCL might.
#[allow(dead_code)] // used by some of the test binaries that share this module
pub fn on_emulator() -> bool {
    device() == Some(Device::Emulator)
}

#[cfg(unix)]
fn install_emulator() -> Result<(), String> {
    pfc_cuda_emulator::install()
}

#[cfg(not(unix))]
fn install_emulator() -> Result<(), String> {
    Err("the CUDA emulator runs on x86-64 Linux only".into())
}

/// The backend on device 0, or `None` after printing why the test is skipped.
pub fn gpu() -> Option<CudaBackend> {
    let device = device()?;
    match CudaBackend::new(0) {
        Ok(g) => {
            if device == Device::Emulator {
                say!("note: running on the CPU emulator of the CUDA driver, not a GPU");
            }
            Some(g)
        }
        Err(e) => {
            must_run(&e.to_string());
            say!("skipped: no CUDA device ({e})");
            None
        }
    }
}

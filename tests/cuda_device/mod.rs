//! The device of the CUDA tests: the real GPU where there is one, else the CPU emulator of the
//! CUDA driver (crates/cuda-emulator), so that every kernel, its launch glue and the whole step
//! still run against the CPU reference in CI. `PFC_CUDA_EMULATOR=0` turns the emulator off
//! (the tests then print that they were skipped); `PFC_CUDA_EMULATOR=only` refuses a real GPU.
//! With `CI=true` a test that can use neither fails instead of skipping.

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
            // In CI the emulator is installed by scripts/test.sh: a skip there would hide every
            // CUDA test, so it fails instead (unless turned off on purpose).
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            let off = std::env::var("PFC_CUDA_EMULATOR").is_ok_and(|v| v == "0");
            assert!(
                !ci || off,
                "CI=true: the CUDA tests must run, on a GPU or the emulator: {e}"
            );
            say!("skipped: {e}");
            None
        }
    }
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
            say!("skipped: no CUDA device ({e})");
            None
        }
    }
}

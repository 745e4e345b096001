//! The CUDA backend (feature `cuda`): the kernels of `cuda/*.cu`, compiled at run time with NVRTC
//! for the device's exact architecture, and cuBLAS SGEMMs, on one stream.
//!
//! Every method mirrors the CPU reference of the same name in `src/cpu/`. Libraries are loaded
//! dynamically (cudarc), so the crate builds anywhere; [`CudaBackend::new`] checks the driver,
//! NVRTC and cuBLAS first and returns [`PfcError::BackendUnavailable`] naming the missing piece
//! instead of letting a missing library panic.
//!
//! ```no_run
//! use partial_fc::cuda::CudaBackend;
//! match CudaBackend::new(0) {
//!     Ok(gpu) => println!("running on {}", gpu.device_name()),
//!     Err(e) => println!("no CUDA: {e}"),
//! }
//! ```

pub mod compile;
mod launch;
pub mod nccl;
mod pool;

pub use pool::MemoryPool;

use crate::error::{PfcError, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use std::collections::HashMap;
use std::sync::Arc;

/// The CUDA backend on one device: context, stream, kernels and cuBLAS handle.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    device_name: String,
    compute_capability: (i32, i32),
    /// Scratch of `sample_classes`, kept between calls (taken while in use).
    sample_scratch: std::sync::Mutex<Option<launch::SampleScratch>>,
    precision: Precision,
    /// The 16-bit copies of the GEMM operands, kept between GEMMs (see
    /// [`crate::Backend::reserve_gemm_operands`]); locked while a GEMM uses them.
    gemm_operands: std::sync::Mutex<launch::GemmOperands>,
    /// Test hook: the plain sampler's candidate list length instead of its default.
    sampler_candidates: Option<usize>,
}

/// Every kernel name of `cuda/*.cu`, by family: the backend loads each of them at start-up, and
/// the compile test checks that each is an entry of its family's PTX for every architecture.
pub const KERNELS: [(&str, &[&str]); 6] = [
    (
        "sampling",
        &[
            "localize_labels",
            "iota",
            "random_keys",
            "sampling_init",
            "force_positives",
            "score_keys",
            "promote_chosen",
            "radix_pass",
            "collect_candidates",
            "count_selected",
            "compact_selected",
            "remap_labels",
        ],
    ),
    (
        "normalize",
        &[
            "normalize_rows",
            "gather_normalize_rows",
            "unpack_normalize_f32",
            "normalize_backward",
            "row_max_into",
            "top_k_merge",
        ],
    ),
    (
        "margin_softmax",
        &[
            "margin_rowmax",
            "exp_rowsum",
            "softmax_loss_grad",
            "margin_softmax_fused",
            "margin_rowmax16",
            "exp_rowsum16",
            "softmax_loss_grad16",
            "margin_softmax_fused16",
            "scale_rows",
            "scale_rows16",
        ],
    ),
    (
        "optimizer",
        &[
            "scatter_rows",
            "scatter_add_rows",
            "sgd_momentum_sparse",
            "sgd_momentum_sparse_bf16",
            "sgd_momentum_dense",
            "sgd_momentum_dense_bf16",
            "adamw_sparse_f32",
            "adamw_sparse_bf16",
            "adamw_dense_f32",
            "adamw_dense_bf16",
        ],
    ),
    ("precision", &["cast_f32_to_bf16", "cast_f32_to_f16"]),
    (
        "wire",
        &[
            "pack_embeddings",
            "unpack_normalize",
            "cast_to_wire",
            "cast_from_wire",
        ],
    ),
];

/// Operand precision of the step's GEMMs: the layer option [`crate::GemmPrecision`], under the
/// name this module has always used. With `Bf16` or `F16` both operands are rounded to 16 bits
/// into buffers the backend keeps (see [`crate::Backend::reserve_gemm_operands`]) and multiplied by
/// `cublasGemmEx` with f32 accumulation. Each product then carries a relative error of at most
/// about 2·2⁻⁸ (bf16) or 2·2⁻¹¹ (f16), so a dot product is off by at most that times the sum of
/// its terms' magnitudes (tests/cuda_kernels.rs `half_precision_gemms_match_f32`).
///
/// ```no_run
/// use partial_fc::cuda::{CudaBackend, Precision};
/// let gpu = CudaBackend::new(0)?.with_precision(Precision::Bf16);
/// assert_eq!(gpu.precision(), Precision::Bf16);
/// # Ok::<(), partial_fc::PfcError>(())
/// ```
pub use crate::config::GemmPrecision as Precision;

pub(crate) fn dev<E: std::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> PfcError {
    move |e| PfcError::Device(format!("{what}: {e:?}"))
}

/// Checks that the driver, NVRTC and cuBLAS libraries can be loaded and that a device exists;
/// the error names what is missing and how to get it.
pub fn check_available() -> Result<()> {
    // SAFETY: each call only tries to open a shared library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(PfcError::BackendUnavailable(
            "the CUDA driver library (libcuda.so.1) was not found: install the NVIDIA driver"
                .into(),
        ));
    }
    compile::nvrtc_available()?;
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(PfcError::BackendUnavailable(
            "cuBLAS (libcublas.so.12 or .13) was not found: install the CUDA toolkit or \
             `pip install nvidia-cublas-cu12` and add its lib directory to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| PfcError::BackendUnavailable(format!("no usable CUDA driver: {e:?}")))?;
    if count < 1 {
        return Err(PfcError::BackendUnavailable("no CUDA device".into()));
    }
    Ok(())
}

/// The driver's CUDA version, as `cuDriverGetVersion` gives it (1000·major + 10·minor).
fn driver_version() -> Result<i32> {
    let mut version = 0;
    // SAFETY: one out-pointer to a live integer; the driver library is loaded (check_available).
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    status.result().map_err(dev("cuDriverGetVersion"))?;
    Ok(version)
}

/// Refuses an NVRTC that cannot serve this driver and device, before it compiles anything:
/// cudarc loads the first of `libnvrtc.so`, `.so.13`, `.so.12` it finds, which need not be the
/// one that matches. A CUBIN from a newer CUDA major than the driver's does not load (minor
/// versions are compatible), and CUDA 13's NVRTC no longer targets Volta (sm_70, sm_72).
fn check_toolchain(nvrtc: (i32, i32), driver: i32, cc: (i32, i32)) -> Result<()> {
    let (driver_major, driver_minor) = (driver / 1000, driver % 1000 / 10);
    let fix = "put a matching libnvrtc first on LD_LIBRARY_PATH (`bash scripts/install-nvrtc.sh` \
               installs CUDA 12.9's, which serves sm_70 to sm_90 and every driver of CUDA 12 or \
               later)";
    if nvrtc.0 > driver_major {
        return Err(PfcError::BackendUnavailable(format!(
            "NVRTC {}.{} is newer than the driver (CUDA {driver_major}.{driver_minor}): the \
             kernels it compiles would not load; {fix}, or update the NVIDIA driver",
            nvrtc.0, nvrtc.1
        )));
    }
    if nvrtc.0 >= 13 && cc.0 == 7 && cc.1 < 5 {
        return Err(PfcError::BackendUnavailable(format!(
            "NVRTC {}.{} cannot compile for this sm_{}{} device (CUDA 13 dropped Volta): {fix}",
            nvrtc.0, nvrtc.1, cc.0, cc.1
        )));
    }
    Ok(())
}

/// cuBLAS's (major, minor) version: whichever `libcublas` cudarc loaded.
fn cublas_version() -> Result<(i32, i32)> {
    use cudarc::cublas::sys::{cublasGetProperty, libraryPropertyType};
    let (mut major, mut minor) = (0, 0);
    // SAFETY: out-pointers to live integers; the library is loaded (check_available).
    let status = unsafe {
        (
            cublasGetProperty(libraryPropertyType::MAJOR_VERSION, &mut major),
            cublasGetProperty(libraryPropertyType::MINOR_VERSION, &mut minor),
        )
    };
    for s in [status.0, status.1] {
        s.result().map_err(dev("cublasGetProperty"))?;
    }
    Ok((major, minor))
}

/// Refuses a cuBLAS newer than the driver: its CUDA runtime needs a driver of its own major, and
/// `cublasCreate` would otherwise fail with a bare `NOT_INITIALIZED`. cudarc loads the first
/// `libcublas` it finds, so a CUDA 13 toolkit's can shadow the CUDA 12 one a driver needs.
fn check_cublas(cublas: (i32, i32), driver: i32) -> Result<()> {
    let (driver_major, driver_minor) = (driver / 1000, driver % 1000 / 10);
    if cublas.0 > driver_major {
        return Err(PfcError::BackendUnavailable(format!(
            "cuBLAS {}.{} is newer than the driver (CUDA {driver_major}.{driver_minor}), which \
             cannot run it: put a libcublas of CUDA {driver_major} first on LD_LIBRARY_PATH \
             (`pip install nvidia-cublas-cu{driver_major}`), or update the NVIDIA driver",
            cublas.0, cublas.1
        )));
    }
    Ok(())
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles the kernels for its architecture (once per process) and
    /// creates the cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        check_available()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            PfcError::BackendUnavailable(format!("cannot open CUDA device {ordinal}: {e:?}"))
        })?;
        // One stream per backend: cudarc's cross-stream event tracking is not needed.
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let compute_capability = ctx
            .compute_capability()
            .map_err(dev("compute capability"))?;
        let device_name = ctx.name().map_err(dev("device name"))?;
        // A stream of its own, not the legacy default stream: several backends on one device
        // (virtual ranks, several NCCL ranks per GPU) must not serialize behind each other.
        let stream = ctx.new_stream().map_err(dev("creating a stream"))?;
        let arch = format!("sm_{}{}", compute_capability.0, compute_capability.1);
        let driver = driver_version()?;
        check_toolchain(compile::nvrtc_version()?, driver, compute_capability)?;
        check_cublas(cublas_version()?, driver)?;
        let mut kernels = HashMap::new();
        for (family, image) in compile::compiled_families(&arch)? {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image))
                .map_err(dev("loading a kernel module"))?;
            let names = KERNELS
                .iter()
                .find(|(f, _)| *f == family)
                .map(|(_, n)| *n)
                .unwrap_or(&[]);
            for &name in names {
                let f = module.load_function(name).map_err(|e| {
                    PfcError::Device(format!("kernel {name} missing from {family}.cu: {e:?}"))
                })?;
                kernels.insert(name, f);
            }
        }
        let blas = CudaBlas::new(stream.clone()).map_err(dev("cublasCreate"))?;
        // cuBLAS may otherwise add split-k partial sums in a 16-bit output type (gemm_nt16's
        // logits); keep every reduction in f32, as the accuracy bounds of the tests assume.
        // Default math otherwise: no TF32 for the f32 GEMMs.
        let mode =
            cudarc::cublas::sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
        // SAFETY: a live handle, created just above.
        let status = unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(PfcError::Device(format!("cublasSetMathMode: {status:?}")));
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            kernels,
            device_name,
            compute_capability,
            sample_scratch: std::sync::Mutex::new(None),
            precision: Precision::F32,
            gemm_operands: std::sync::Mutex::new(launch::GemmOperands::default()),
            sampler_candidates: None,
        })
    }

    /// The same backend with the step's GEMMs in `precision` (see [`Precision`]). The 16-bit
    /// operand buffers then grow to the largest GEMM seen; a layer sizes them up front instead
    /// (`LayerConfig::precision`), so that no GEMM allocates.
    pub fn with_precision(mut self, precision: Precision) -> CudaBackend {
        self.precision = precision;
        self
    }

    /// The same backend with the plain sampler's candidate list limited to `len` keys, so that
    /// tests can drive its overflow path (all keys walked by one block; same result, slower).
    #[doc(hidden)]
    pub fn with_sampler_candidates(mut self, len: usize) -> CudaBackend {
        self.sampler_candidates = Some(len);
        self
    }

    /// For tests: how many keys the last plain sampling call put on its candidate list, and
    /// the list's length; a count above the length means it took the slow path.
    #[doc(hidden)]
    pub fn sampler_candidates_seen(&self) -> Result<Option<(u64, usize)>> {
        self.candidates_seen()
    }

    /// Operand precision of the step's GEMMs.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The stream every kernel of this backend runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context of the device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn func(&self, name: &'static str) -> Result<&CudaFunction> {
        self.kernels
            .get(name)
            .ok_or_else(|| PfcError::Device(format!("kernel {name} was not loaded")))
    }
}

#[cfg(test)]
mod tests {
    use super::{check_cublas, check_toolchain};

    #[test]
    fn a_cublas_newer_than_the_driver_is_refused_by_name() {
        check_cublas((12, 9), 12_020).unwrap();
        check_cublas((12, 9), 13_000).unwrap();
        check_cublas((13, 1), 13_000).unwrap();
        let newer = check_cublas((13, 0), 12_080).unwrap_err().to_string();
        assert!(
            newer.contains("cuBLAS 13.0 is newer than the driver (CUDA 12.8)")
                && newer.contains("nvidia-cublas-cu12"),
            "{newer}"
        );
    }

    #[test]
    fn an_nvrtc_that_cannot_serve_the_driver_or_device_is_refused_by_name() {
        // Same or older major than the driver: fine, whatever the minors (minor compatibility).
        check_toolchain((12, 9), 12_020, (9, 0)).unwrap();
        check_toolchain((12, 9), 13_000, (7, 0)).unwrap();
        check_toolchain((13, 0), 13_000, (9, 0)).unwrap();
        check_toolchain((13, 0), 13_000, (7, 5)).unwrap();
        let newer = check_toolchain((13, 0), 12_080, (9, 0))
            .unwrap_err()
            .to_string();
        assert!(
            newer.contains("NVRTC 13.0 is newer than the driver (CUDA 12.8)"),
            "{newer}"
        );
        let volta = check_toolchain((13, 0), 13_000, (7, 0))
            .unwrap_err()
            .to_string();
        assert!(
            volta.contains("sm_70") && volta.contains("install-nvrtc.sh"),
            "{volta}"
        );
    }
}

//! A CPU emulator of the CUDA driver and cuBLAS calls partial-fc makes, so that its CUDA
//! backend — the kernels of `cuda/*.cu`, their launch glue, the sampler's multi-kernel pipeline,
//! the 16-bit GEMM paths and the whole step — runs, and is tested against the CPU backend, on a
//! machine without a GPU. For tests only (`publish = false`).
//!
//! The build compiles every kernel family as C++ (with `PFC_EMULATOR` defined) into a host
//! library named `libcuda.so`, beside the driver calls cudarc makes, a `libcublas.so` with the
//! GEMMs, and a `libnccl.so` whose ranks are threads of the process. [`install`] loads them; cudarc's own `dlopen("libcuda.so")` then finds them, as
//! the dynamic loader matches a library already loaded by its soname. NVRTC is the real one: the
//! kernels are still compiled by it (the CUBIN is then ignored).
//!
//! What the emulator checks: the kernels' arithmetic, indexing and launch shapes; their
//! barriers and warp collectives as PTX defines them (a barrier nobody can reach fails the
//! launch instead of hanging); results that depend on the order of blocks (each launch runs
//! them in another permutation) or on the order of a block's threads between two barriers
//! (another permutation between every two synchronization points, so a missing barrier shows);
//! reads of shared memory nobody wrote (it starts as all-ones bytes in every block) and of fresh
//! allocations (two garbage patterns, where they are not zeroed); and memory errors, as
//! compute-sanitizer's memcheck would: an access past either end of an allocation hits a guard
//! page, a write into the allocation's rounding slack is found when it is freed, an index past a
//! shared or local array's bound traps, and the process stops naming the kernel, block, thread
//! and allocation; copies and memsets outside an allocation are errors, as on a GPU. What it
//! does not: timing, the GPU memory model (blocks run one after another, so inter-block races
//! cannot show), reads (not writes) in an allocation's rounding slack, and the accuracy of the
//! GPU's fast-math intrinsics (the host's accurate functions stand in). Fused multiply-adds:
//! a GPU contracts a·b + c into one rounding; the emulator's kernels and GEMMs are built without
//! contraction, or with g++'s (`PFC_EMULATOR_FMA=1` at build time), which fuses other products
//! than ptxas but breaks a test that holds only when every product is rounded on its own; the
//! repository's test script runs the CUDA tests both ways. docs/cuda.md in the repository says
//! more.

#[cfg(unix)]
use std::sync::OnceLock;

/// Where the build put the emulated driver (or `"not built: <why>"` where it could not be built:
/// it needs x86-64 Linux and g++ 12 or later).
pub const LIBCUDA: &str = env!("PFC_EMULATOR_LIBCUDA");
/// Where the build put the emulated cuBLAS.
pub const LIBCUBLAS: &str = env!("PFC_EMULATOR_LIBCUBLAS");
/// Where the build put the emulated NCCL.
pub const LIBNCCL: &str = env!("PFC_EMULATOR_LIBNCCL");

/// The device name the emulated driver reports.
pub const DEVICE_NAME: &str = "partial-fc CPU emulator (not a GPU)";

/// Whether a test must run rather than skip: under `CI=true` or `PFC_REQUIRE_CUDA_TESTS=1` a
/// missing emulator (or device) is a failure, elsewhere a printed skip.
pub fn tests_are_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("PFC_REQUIRE_CUDA_TESTS").is_ok_and(|v| v == "1")
}

/// [`install`] for a test: `true` when the emulator is loaded; otherwise prints
/// "skipped: …" and returns `false`, or panics where the tests are required
/// ([`tests_are_required`]), so that CI cannot pass by skipping.
pub fn install_for_test() -> bool {
    match install() {
        Ok(()) => true,
        Err(e) => {
            assert!(!tests_are_required(), "the emulator must run here: {e}");
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// The emulator is not built off Unix: this says so.
#[cfg(not(unix))]
pub fn install() -> Result<(), String> {
    Err("the CUDA emulator runs on x86-64 Linux only".into())
}

/// Loads the emulated `libcuda.so`, `libcublas.so` and `libnccl.so` for the rest of the process.
/// Call it only where no real driver was found: a process that already loaded the real
/// `libcuda.so` keeps it.
#[cfg(unix)]
pub fn install() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            for path in [LIBCUDA, LIBCUBLAS, LIBNCCL] {
                if let Some(why) = path.strip_prefix("not built: ") {
                    return Err(format!("the CUDA emulator was not built: {why}"));
                }
                // SAFETY: the libraries' initializers only register the kernels in a map.
                let lib = unsafe {
                    libloading::os::unix::Library::open(
                        Some(path),
                        libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                    )
                }
                .map_err(|e| format!("loading the CUDA emulator {path}: {e}"))?;
                // Kept for the life of the process: cudarc holds its symbols.
                std::mem::forget(lib);
            }
            Ok(())
        })
        .clone()
}

/// Direct calls into the emulated libraries, for the emulator's own tests: launching a kernel
/// by name on host buffers (the emulated device memory is host memory) and the GEMM entry.
#[cfg(unix)]
pub mod raw {
    use std::ffi::{c_void, CString};

    type GetFunction = unsafe extern "C" fn(*mut *const c_void, *mut c_void, *const i8) -> i32;
    type Launch = unsafe extern "C" fn(
        *const c_void,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> i32;

    fn library(path: &str) -> Result<libloading::Library, String> {
        super::install()?;
        // SAFETY: already loaded by `install`; this only takes another reference.
        unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())
    }

    /// Launches the kernel `name` over `grid` × `block`; `args` point to the argument values
    /// (as for `cuLaunchKernel`). The error is the driver's result code.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters, and every pointer among them must be valid
    /// for what the kernel touches.
    pub unsafe fn launch(
        name: &str,
        grid: u32,
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), i32> {
        let lib = library(super::LIBCUDA).map_err(|_| -1)?;
        let get: libloading::Symbol<GetFunction> =
            lib.get(b"cuModuleGetFunction").map_err(|_| -1)?;
        let launch: libloading::Symbol<Launch> = lib.get(b"cuLaunchKernel").map_err(|_| -1)?;
        let cname = CString::new(name).map_err(|_| -1)?;
        let mut f = std::ptr::null();
        match get(&mut f, std::ptr::null_mut(), cname.as_ptr()) {
            0 => {}
            e => return Err(e),
        }
        let args_ptr = args.as_mut_ptr();
        match launch(
            f,
            grid,
            1,
            1,
            block,
            1,
            1,
            0,
            std::ptr::null_mut(),
            args_ptr,
            std::ptr::null_mut(),
        ) {
            0 => Ok(()),
            e => Err(e),
        }
    }

    fn driver_call<F: Copy>(name: &[u8]) -> Result<F, i32> {
        let lib = library(super::LIBCUDA).map_err(|_| -1)?;
        // SAFETY: the caller names a symbol of the emulated driver with its C signature.
        let f = unsafe { lib.get::<F>(name) }.map_err(|_| -1)?;
        Ok(*f)
    }

    /// `cuMemAlloc_v2`: emulated device memory of `bytes` (between guard pages).
    pub fn alloc(bytes: usize) -> Result<u64, i32> {
        let f: unsafe extern "C" fn(*mut u64, usize) -> i32 = driver_call(b"cuMemAlloc_v2")?;
        let mut p = 0u64;
        // SAFETY: `p` is a valid out-pointer.
        match unsafe { f(&mut p, bytes) } {
            0 => Ok(p),
            e => Err(e),
        }
    }

    /// `cuMemFree_v2`; the emulator checks the allocation's slack for writes past its ends.
    pub fn free(p: u64) -> Result<(), i32> {
        let f: unsafe extern "C" fn(u64) -> i32 = driver_call(b"cuMemFree_v2")?;
        // SAFETY: the driver checks that `p` is a live allocation.
        match unsafe { f(p) } {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// `cuMemcpyHtoD_v2` of `src` to the device address `dst`.
    pub fn copy_to_device(dst: u64, src: &[u8]) -> Result<(), i32> {
        let f: unsafe extern "C" fn(u64, *const u8, usize) -> i32 =
            driver_call(b"cuMemcpyHtoD_v2")?;
        // SAFETY: `src` is readable for its length; the driver checks the device range.
        match unsafe { f(dst, src.as_ptr(), src.len()) } {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// `cublasGemmEx` of the emulated cuBLAS with f32 compute (column-major, as cuBLAS).
    ///
    /// # Safety
    /// The buffers must hold the matrices their types, shapes and leading dimensions describe.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_ex(
        trans: (i32, i32),
        (m, n, k): (i32, i32, i32),
        alpha: f32,
        (a, a_type, lda): (*const c_void, i32, i32),
        (b, b_type, ldb): (*const c_void, i32, i32),
        beta: f32,
        (c, c_type, ldc): (*mut c_void, i32, i32),
    ) -> i32 {
        type Create = unsafe extern "C" fn(*mut *mut c_void) -> i32;
        type GemmEx = unsafe extern "C" fn(
            *mut c_void,
            i32,
            i32,
            i32,
            i32,
            i32,
            *const c_void,
            *const c_void,
            i32,
            i32,
            *const c_void,
            i32,
            i32,
            *const c_void,
            *mut c_void,
            i32,
            i32,
            i32,
            i32,
        ) -> i32;
        let Ok(lib) = library(super::LIBCUBLAS) else {
            return -1;
        };
        let (Ok(create), Ok(gemm)) = (
            lib.get::<Create>(b"cublasCreate_v2"),
            lib.get::<GemmEx>(b"cublasGemmEx"),
        ) else {
            return -1;
        };
        let mut handle = std::ptr::null_mut();
        create(&mut handle);
        gemm(
            handle,
            trans.0,
            trans.1,
            m,
            n,
            k,
            &alpha as *const f32 as *const c_void,
            a,
            a_type,
            lda,
            b,
            b_type,
            ldb,
            &beta as *const f32 as *const c_void,
            c,
            c_type,
            ldc,
            68, // CUBLAS_COMPUTE_32F
            -1, // CUBLAS_GEMM_DEFAULT
        )
    }
}

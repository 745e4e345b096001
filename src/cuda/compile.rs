//! The kernel sources, embedded at build time, and their compilation with NVRTC at run time.
//!
//! Each family in `cuda/` starts with `#include "common.cuh"`; the include is expanded here, so a
//! program is one self-contained translation unit and needs no CUDA headers. The device path
//! compiles straight to a CUBIN for the device's exact architecture (`sm_XY`): a CUBIN from a
//! newer NVRTC of the same major version loads on an older driver, where PTX might not. The
//! compile test targets the virtual architectures (`compute_XY`) and gets PTX.
//!
//! NVRTC calls used: nvrtcCreateProgram, nvrtcCompileProgram, nvrtcGetProgramLog(Size),
//! nvrtcGetPTX(Size), nvrtcGetCUBIN(Size), nvrtcDestroyProgram, nvrtcVersion — all present in
//! CUDA 11.1+, 12.x and 13.x, so the cuda-13000 bindings load either libnvrtc.so.12 or .so.13.

use crate::error::{PfcError, Result};
use cudarc::nvrtc::{result, sys};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::{Mutex, OnceLock};

/// The shared header: reductions and the Philox generator.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// Every kernel family: (name, source before the include is expanded).
pub const FAMILIES: [(&str, &str); 6] = [
    ("sampling", include_str!("../../cuda/sampling.cu")),
    ("normalize", include_str!("../../cuda/normalize.cu")),
    (
        "margin_softmax",
        include_str!("../../cuda/margin_softmax.cu"),
    ),
    ("optimizer", include_str!("../../cuda/optimizer.cu")),
    ("precision", include_str!("../../cuda/precision.cu")),
    ("wire", include_str!("../../cuda/wire.cu")),
];

/// The full source of a family, with `common.cuh` expanded in place.
pub fn program_source(family_source: &str) -> String {
    family_source.replace("#include \"common.cuh\"", COMMON)
}

/// Checks that NVRTC can be loaded, with a message that says how to get it.
pub fn nvrtc_available() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(PfcError::BackendUnavailable(
            "NVRTC (libnvrtc.so.12 or libnvrtc.so.13) not found: install the CUDA toolkit \
             (12.x for V100/sm_70, 12.x or 13.x otherwise), or run `bash scripts/install-nvrtc.sh` \
             and add the lib directory it prints to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    status
        .result()
        .map_err(|e| PfcError::Device(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// Compiles one program for `arch`: `compute_XY` gives PTX text, `sm_XY` a CUBIN.
pub fn compile(name: &str, source: &str, arch: &str, include_paths: &[String]) -> Result<Vec<u8>> {
    nvrtc_available()?;
    let src = CString::new(source).map_err(|_| PfcError::Device("NUL in kernel source".into()))?;
    let cname = CString::new(format!("{name}.cu")).expect("family names hold no NUL");
    let prog = result::create_program(&src, Some(&cname))
        .map_err(|e| PfcError::Device(format!("nvrtcCreateProgram({name}): {e:?}")))?;
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++14".to_string(),
        "--fmad=true".to_string(),
    ];
    options.extend(include_paths.iter().map(|p| format!("--include-path={p}")));
    // SAFETY: `prog` is a live program, destroyed exactly once below.
    let out = unsafe {
        let compiled = result::compile_program(prog, &options);
        let out = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(PfcError::Device(format!(
                    "NVRTC failed to compile {name}.cu for {arch} ({e:?}):\n{log}"
                )))
            }
            Ok(()) if arch.starts_with("sm_") => get_cubin(prog),
            Ok(()) => result::get_ptx(prog)
                .map(|p| p.into_iter().map(|c| c as u8).collect())
                .map_err(|e| PfcError::Device(format!("nvrtcGetPTX: {e:?}"))),
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
}

/// # Safety
/// `prog` must be a successfully compiled program for a real architecture.
unsafe fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(prog, &mut size)
        .result()
        .map_err(|e| PfcError::Device(format!("nvrtcGetCUBINSize: {e:?}")))?;
    let mut cubin = vec![0u8; size];
    sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _)
        .result()
        .map_err(|e| PfcError::Device(format!("nvrtcGetCUBIN: {e:?}")))?;
    Ok(cubin)
}

/// Every family compiled for `arch`, compiled once per process and architecture
/// ([`compile_families`] the first time, its result after).
pub fn compiled_families(arch: &str) -> Result<Vec<(&'static str, Vec<u8>)>> {
    type Cache = Mutex<HashMap<String, Vec<(&'static str, Vec<u8>)>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(hit) = cache.get(arch) {
        return Ok(hit.clone());
    }
    let out = compile_families(arch)?;
    cache.insert(arch.to_string(), out.clone());
    Ok(out)
}

/// Every family compiled for `arch` now, in [`FAMILIES`] order, each on a thread of its own
/// (benches/nvrtc_compile.rs times it against one compile after another).
pub fn compile_families(arch: &str) -> Result<Vec<(&'static str, Vec<u8>)>> {
    // One thread per family: NVRTC allows concurrent compiles of distinct programs, and the
    // process start (every rank of a job pays it) went from 1.8 s to 1.0 s on a 2-core machine
    // (NVRTC 12.9, sm_90); with more cores it is bounded by the largest family.
    let compiled: Vec<Result<Vec<u8>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = FAMILIES
            .iter()
            .map(|&(name, src)| scope.spawn(move || compile(name, &program_source(src), arch, &[])))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(PfcError::Device("an NVRTC compile thread panicked".into()))
                })
            })
            .collect()
    });
    FAMILIES
        .iter()
        .zip(compiled)
        .map(|(&(name, _), cubin)| Ok((name, cubin?)))
        .collect::<Result<Vec<_>>>()
}

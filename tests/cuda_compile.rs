//! Every kernel family compiles with NVRTC for every supported architecture (no GPU needed).
//!
//! NVRTC comes from the CUDA toolkit or from `bash scripts/install-nvrtc.sh` (put the printed lib
//! directory on LD_LIBRARY_PATH). With CI=true a missing NVRTC fails the test; elsewhere it skips
//! and says so. PFC_NVRTC_INCLUDE (or .nvrtc/nvidia/cuda_runtime/include) is passed as an include
//! path, though the kernels are self-contained today.
#![cfg(feature = "cuda")]

/// Prints past the test harness's output capture (which only intercepts the print macros),
/// so a skipped test says so in a plain `cargo test` run.
macro_rules! skip {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use partial_fc::cuda::compile::{
    compile, compiled_families, nvrtc_available, nvrtc_version, program_source, FAMILIES,
};
use partial_fc::cuda::KERNELS;

const ARCHS: [&str; 6] = [
    "compute_70",
    "compute_75",
    "compute_80",
    "compute_86",
    "compute_89",
    "compute_90",
];

fn include_paths() -> Vec<String> {
    let from_env = std::env::var("PFC_NVRTC_INCLUDE").ok();
    let cache = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.nvrtc/nvidia/cuda_runtime/include"
    );
    from_env
        .into_iter()
        .chain(
            std::path::Path::new(cache)
                .is_dir()
                .then(|| cache.to_string()),
        )
        .collect()
}

/// False (after saying why) where NVRTC is missing; a failure under CI=true.
fn have_nvrtc() -> bool {
    match nvrtc_available() {
        Ok(()) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and NVRTC is missing: {e}")
        }
        Err(e) => {
            skip!("skipped: NVRTC not found ({e})");
            false
        }
    }
}

#[test]
fn every_kernel_compiles_for_every_arch() {
    if !have_nvrtc() {
        return;
    }
    let (major, minor) = nvrtc_version().unwrap();
    println!("NVRTC {major}.{minor}");
    let includes = include_paths();
    let mut compiled = 0;
    for arch in ARCHS {
        if major >= 13 && arch == "compute_70" {
            println!(
                "NVRTC {major}.{minor} cannot target {arch} (CUDA 13 dropped sm_70); not counted"
            );
            continue;
        }
        for (name, src) in FAMILIES {
            let ptx = compile(name, &program_source(src), arch, &includes)
                .unwrap_or_else(|e| panic!("{name}.cu for {arch}: {e}"));
            let text = String::from_utf8_lossy(&ptx);
            assert!(
                text.contains(".entry"),
                "{name}.cu for {arch}: no kernel in the PTX"
            );
            let registered = KERNELS.iter().find(|(f, _)| *f == name);
            let (_, kernels) = registered.unwrap_or_else(|| panic!("{name}: not in KERNELS"));
            for kernel in kernels.iter() {
                assert!(
                    text.contains(&format!(".entry {kernel}(")),
                    "{name}.cu for {arch}: no entry {kernel} in the PTX"
                );
            }
            compiled += 1;
        }
    }
    println!("compiled {compiled} programs");
    assert!(compiled >= 4 * 5);
}

/// What a backend loads: every family as a CUBIN for a real architecture, compiled on threads of
/// its own, in `FAMILIES` order, the same bytes as a compile on this thread, and cached.
#[test]
fn compiled_families_are_cubins_in_family_order() {
    if !have_nvrtc() {
        return;
    }
    let arch = "sm_80";
    let families = compiled_families(arch).unwrap();
    assert_eq!(families.len(), FAMILIES.len());
    for ((name, cubin), (family, src)) in families.iter().zip(FAMILIES) {
        assert_eq!(*name, family);
        assert!(cubin.starts_with(b"\x7fELF"), "{name}: not an ELF CUBIN");
        let alone = compile(name, &program_source(src), arch, &[]).unwrap();
        assert!(
            *cubin == alone,
            "{name}: threaded compile differs from a serial one"
        );
    }
    let again = compiled_families(arch).unwrap();
    assert!(
        again == families,
        "the second call must return the cached CUBINs"
    );
}

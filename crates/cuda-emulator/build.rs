//! Builds the emulator's three host libraries into OUT_DIR: `libcuda.so` (the driver calls, the
//! block scheduler and every kernel of `cuda/*.cu` compiled as C++ with `PFC_EMULATOR` defined),
//! `libcublas.so` (the GEMMs) and `libnccl.so` (collectives between ranks that are threads). `cc`
//! finds the C++ compiler and its flags; the objects are then linked as shared libraries with the
//! sonames the CUDA libraries have, which is what lets cudarc's `dlopen("libcuda.so")` find them
//! once `install` has loaded them.
//!
//! The kernel sources are copied with each `__shared__` declaration followed, on the same line,
//! by `EMU_POISON_SHARED(name);`, which fills the variable with all-ones bytes when the first
//! thread of a block reaches it: shared memory starts as garbage on a GPU, not as the previous
//! block's values.
//!
//! The emulator needs Linux on x86-64 (its fiber switch) and a C++17 compiler with `_Float16`
//! (g++ 12 or later). Where the build fails, it says so in a warning and builds nothing:
//! `install` then returns the reason, and the CUDA tests skip (or fail under `CI=true`).

use std::path::{Path, PathBuf};

fn kernel_names(source: &str) -> Vec<String> {
    let marker = "extern \"C\" __global__ void ";
    source
        .match_indices(marker)
        .filter_map(|(at, _)| {
            let mut rest = &source[at + marker.len()..];
            // `__launch_bounds__(N) name(`: the name follows the bounds.
            if let Some(bounded) = rest.strip_prefix("__launch_bounds__(") {
                rest = bounded[bounded.find(')')? + 1..].trim_start();
            }
            let end = rest.find('(')?;
            Some(rest[..end].trim().to_string())
        })
        .collect()
}

/// The names a `__shared__` declaration line declares (`__shared__ float a[N], b[N];` gives a, b).
fn shared_names(line: &str) -> Vec<String> {
    let Some(decl) = line.trim_start().strip_prefix("__shared__ ") else {
        return Vec::new();
    };
    let decl = decl.split(';').next().unwrap_or("");
    decl.split(',')
        .filter_map(|part| {
            let part = part.split('[').next()?.trim_end();
            let name: String = part
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// `source` with every `__shared__` declaration poisoned (same lines, so `#line` keeps compiler
/// messages pointing at the original).
fn poison_shared(source: &str, original: &Path) -> String {
    let mut out = format!("#line 1 \"{}\"\n", original.display());
    for line in source.lines() {
        out.push_str(line);
        for name in shared_names(line) {
            out.push_str(&format!(" EMU_POISON_SHARED({name});"));
        }
        out.push('\n');
    }
    out
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernels_dir = manifest.join("../../cuda");
    let cpp = manifest.join("cpp");
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    println!("cargo:rerun-if-changed={}", cpp.display());
    println!("cargo:rerun-if-env-changed=PFC_EMULATOR_FMA");
    let libs = match build(&out, &kernels_dir, &cpp) {
        Ok(libs) => libs,
        Err(why) => {
            println!("cargo:warning=the CUDA emulator was not built ({why}); the CUDA tests will skip without a GPU");
            let reason = format!("not built: {why}");
            [reason.clone(), reason.clone(), reason]
        }
    };
    for (var, lib) in ["LIBCUDA", "LIBCUBLAS", "LIBNCCL"].iter().zip(libs) {
        println!("cargo:rustc-env=PFC_EMULATOR_{var}={lib}");
    }
}

/// The three libraries' paths, or why they could not be built.
fn build(out: &Path, kernels_dir: &Path, cpp: &Path) -> Result<[String; 3], String> {
    let target = std::env::var("TARGET").unwrap_or_default();
    if !(target.starts_with("x86_64") && target.contains("linux")) {
        return Err(format!("it needs x86_64 Linux, the target is {target}"));
    }
    let sources = out.join("kernels");
    std::fs::create_dir_all(&sources).map_err(|e| e.to_string())?;
    let mut families: Vec<PathBuf> = std::fs::read_dir(kernels_dir)
        .map_err(|e| format!("reading {}: {e}", kernels_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    families.sort();
    families.push(cpp.join("selftest.cu"));
    let mut units = vec![cpp.join("fiber.cpp"), cpp.join("driver.cpp")];
    for family in &families {
        let source = std::fs::read_to_string(family).map_err(|e| e.to_string())?;
        let file = family.file_name().unwrap().to_string_lossy().into_owned();
        let copy = sources.join(&file);
        std::fs::write(&copy, poison_shared(&source, family)).map_err(|e| e.to_string())?;
        if file.ends_with(".cuh") {
            continue;
        }
        let stem = family.file_stem().unwrap().to_string_lossy().into_owned();
        let mut unit = format!(
            "// Generated by build.rs: {file} for the emulator.\n#include \"emu.h\"\n#include \"{}\"\n",
            copy.display()
        );
        for name in kernel_names(&source) {
            unit.push_str(&format!("EMU_KERNEL({name})\n"));
        }
        let path = out.join(format!("family_{stem}.cpp"));
        std::fs::write(&path, unit).map_err(|e| e.to_string())?;
        units.push(path);
    }
    let cuda = link(out, "cuda", &units, &[cpp, &sources])?;
    let cublas = link(out, "cublas", &[cpp.join("cublas.cpp")], &[cpp])?;
    let nccl = link(out, "nccl", &[cpp.join("nccl.cpp")], &[cpp])?;
    Ok([cuda, cublas, nccl].map(|p| p.display().to_string()))
}

/// Compiles `units` and links them into `OUT_DIR/emu-<name>/lib<name>.so` with soname
/// `lib<name>.so`.
fn link(out: &Path, name: &str, units: &[PathBuf], includes: &[&Path]) -> Result<PathBuf, String> {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .pic(true)
        .opt_level(2)
        .define("PFC_EMULATOR", None)
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .cargo_warnings(false)
        .out_dir(out.join(format!("obj-{name}")));
    if std::env::var("PFC_EMULATOR_FMA").as_deref() == Ok("1") {
        // A GPU fuses a·b + c into one rounding (ptxas contracts by default, and cuBLAS
        // accumulates with FMA); the host's compiler does not unless told. g++ fuses other
        // products than ptxas, but a test that holds only when every product is rounded on its
        // own fails either way: scripts/test.sh runs the CUDA tests built both ways.
        build.flag("-mfma").flag("-ffp-contract=fast");
    }
    if name == "cuda" {
        // An index past a shared or local array's bound traps (SIGILL), and so does a load or
        // store through a pointer not aligned to its type (a float4 at an address that is not a
        // multiple of 16: x86 allows it, a GPU stops the kernel with "misaligned address").
        // fiber.cpp's fault handler names the kernel and thread: no sanitizer runtime is linked.
        build
            .flag("-fsanitize=bounds")
            .flag("-fsanitize=alignment")
            .flag("-fsanitize-undefined-trap-on-error");
    }
    for dir in includes {
        build.include(dir);
    }
    build.files(units);
    let objects = build
        .try_compile_intermediates()
        .map_err(|e| format!("compiling lib{name}.so: {e}"))?;
    let dir = out.join(format!("emu-{name}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let lib = dir.join(format!("lib{name}.so"));
    let compiler = build.try_get_compiler().map_err(|e| e.to_string())?;
    let status = compiler
        .to_command()
        .arg("-shared")
        .arg(format!("-Wl,-soname,lib{name}.so"))
        .arg("-o")
        .arg(&lib)
        .args(&objects)
        .arg("-lpthread")
        .arg("-ldl")
        .status()
        .map_err(|e| format!("running the C++ compiler to link lib{name}.so: {e}"))?;
    if !status.success() {
        return Err(format!("linking lib{name}.so failed"));
    }
    Ok(lib)
}

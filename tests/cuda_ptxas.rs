//! No kernel spills registers, on any supported architecture (no GPU needed).
//!
//! Every family is compiled to PTX with NVRTC for compute_70, 75, 80, 86, 89 and 90 (the options
//! of `compile`, which the device path also uses), and `ptxas -v --gpu-name sm_XY` assembles it
//! with its default -O3, as NVRTC does in-process when the device path asks it for an `sm_XY`
//! CUBIN. The test reads ptxas's per-function report and asserts that every kernel in `KERNELS`
//! was reported and that none has spill stores or spill loads. It prints a kernel × architecture
//! table of registers (docs/cuda.md has the measured one).
//!
//! ptxas comes from `bash scripts/install-nvrtc.sh` (the nvidia-cuda-nvcc-cu12 wheel, same 12.9
//! release as NVRTC), found through PFC_PTXAS or at .nvrtc/nvidia/cuda_nvcc/bin/ptxas. With
//! CI=true a missing NVRTC or ptxas fails the test; elsewhere it skips and says so.
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
    compile, nvrtc_available, nvrtc_version, program_source, FAMILIES,
};
use partial_fc::cuda::KERNELS;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: [u32; 6] = [70, 75, 80, 86, 89, 90];

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn include_paths() -> Vec<String> {
    let from_env = std::env::var("PFC_NVRTC_INCLUDE").ok();
    let cache = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.nvrtc/nvidia/cuda_runtime/include"
    );
    from_env
        .into_iter()
        .chain(Path::new(cache).is_dir().then(|| cache.to_string()))
        .collect()
}

/// PFC_PTXAS, else the copy `scripts/install-nvrtc.sh` puts in the repository's cache.
fn find_ptxas() -> Result<PathBuf, String> {
    let cache = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.nvrtc/nvidia/cuda_nvcc/bin/ptxas"
    );
    let path = match std::env::var_os("PFC_PTXAS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(cache),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no ptxas at {} (run `bash scripts/install-nvrtc.sh`, or set PFC_PTXAS)",
            path.display()
        ))
    }
}

/// ptxas's (major, minor) release, from `ptxas --version` ("... release 12.9, V12.9.86").
fn ptxas_version(ptxas: &Path) -> Result<(i32, i32), String> {
    let out = Command::new(ptxas)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let release = text
        .split("release ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .ok_or_else(|| format!("no release in `ptxas --version`: {text}"))?;
    let (major, minor) = release
        .split_once('.')
        .ok_or_else(|| format!("odd ptxas release {release:?}"))?;
    let parse = |s: &str| s.trim().parse::<i32>().map_err(|e| format!("{s:?}: {e}"));
    Ok((parse(major)?, parse(minor)?))
}

/// One function in ptxas's `-v` report.
#[derive(Debug, Clone, PartialEq, Default)]
struct FunctionInfo {
    name: String,
    /// The `sm_XY` of its "Compiling entry function" line; empty for a non-entry function.
    arch: String,
    /// False for a device function that was not inlined (reported without "Used N registers").
    entry: bool,
    registers: Option<u32>,
    stack_frame: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// The number in front of `suffix` in `line` ("0 bytes spill stores" -> 0).
fn number_before(line: &str, suffix: &str) -> Option<u32> {
    let head = &line[..line.find(suffix)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// Parses the info lines of `ptxas -v`:
///
/// ```text
/// ptxas info    : Compiling entry function 'iota' for 'sm_80'
/// ptxas info    : Function properties for iota
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 8 registers, used 0 barriers, 364 bytes cmem[0]
/// ```
///
/// A "Function properties" block for a name without an entry line is a called device function:
/// it is kept (entry = false), so its spills count too.
fn parse_ptxas_report(text: &str) -> Result<Vec<FunctionInfo>, String> {
    let mut functions: Vec<FunctionInfo> = Vec::new();
    let mut current_entry: Option<usize> = None;
    let mut properties_for: Option<usize> = None;
    let quoted = |s: &str, n: usize| s.split('\'').nth(2 * n + 1).map(str::to_string);
    for line in text.lines() {
        if line.contains("Compiling entry function") {
            let (Some(name), Some(arch)) = (quoted(line, 0), quoted(line, 1)) else {
                return Err(format!("unparsed ptxas line: {line}"));
            };
            functions.push(FunctionInfo {
                name,
                arch,
                entry: true,
                ..Default::default()
            });
            current_entry = Some(functions.len() - 1);
            properties_for = None;
        } else if let Some((_, name)) = line.split_once("Function properties for ") {
            let name = name.trim();
            let known = functions.iter().rposition(|f| f.name == name);
            let index = match known {
                Some(i) if current_entry == Some(i) => i,
                _ => {
                    functions.push(FunctionInfo {
                        name: name.to_string(),
                        ..Default::default()
                    });
                    functions.len() - 1
                }
            };
            properties_for = Some(index);
        } else if line.contains("bytes stack frame") {
            let f = properties_for
                .take()
                .and_then(|i| functions.get_mut(i))
                .ok_or_else(|| format!("stack frame line outside a function: {line}"))?;
            let field = |suffix| {
                number_before(line, suffix).ok_or_else(|| format!("unparsed ptxas line: {line}"))
            };
            f.stack_frame = field("bytes stack frame")?;
            f.spill_stores = field("bytes spill stores")?;
            f.spill_loads = field("bytes spill loads")?;
        } else if line.contains("Used ") && line.contains(" registers") {
            let f = current_entry
                .and_then(|i| functions.get_mut(i))
                .ok_or_else(|| format!("register line outside an entry: {line}"))?;
            f.registers =
                Some(number_before(line, " registers").ok_or_else(|| format!("unparsed: {line}"))?);
        }
    }
    if let Some(f) = functions.iter().find(|f| f.entry && f.registers.is_none()) {
        return Err(format!("ptxas reported no register count for {}", f.name));
    }
    Ok(functions)
}

#[test]
fn parses_ptxas_reports() {
    let text = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'remap_labels' for 'sm_80'
ptxas info    : Function properties for remap_labels
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 0 barriers, 388 bytes cmem[0]
ptxas info    : Compile time = 5.345 ms
ptxas info    : Function properties for _Z6helperPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'big' for 'sm_90'
ptxas info    : Function properties for big
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 256 bytes smem
";
    let got = parse_ptxas_report(text).unwrap();
    let want = [
        ("remap_labels", "sm_80", true, Some(14), 0, 0, 0),
        ("_Z6helperPf", "", false, None, 8, 4, 4),
        ("big", "sm_90", true, Some(255), 48, 40, 36),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (f, (name, arch, entry, registers, stack, stores, loads)) in got.iter().zip(want) {
        let expected = FunctionInfo {
            name: name.into(),
            arch: arch.into(),
            entry,
            registers,
            stack_frame: stack,
            spill_stores: stores,
            spill_loads: loads,
        };
        assert_eq!(*f, expected);
    }
    assert!(
        parse_ptxas_report("ptxas info    : Compiling entry function 'x' for 'sm_80'\n").is_err()
    );
}

#[test]
fn no_kernel_spills_on_any_arch() {
    let missing = nvrtc_available()
        .map_err(|e| format!("NVRTC not found ({e})"))
        .and_then(|()| find_ptxas().map_err(|e| format!("ptxas not found: {e}")));
    let ptxas = match missing {
        Ok(p) => p,
        Err(e) if in_ci() => panic!("CI=true and {e}"),
        Err(e) => {
            skip!("skipped: {e}");
            return;
        }
    };
    let (major, minor) = nvrtc_version().unwrap();
    let ptxas_release = ptxas_version(&ptxas).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "NVRTC {major}.{minor}, ptxas {}.{} ({})",
        ptxas_release.0,
        ptxas_release.1,
        ptxas.display()
    );
    if ptxas_release < (major, minor) {
        // Its PTX ISA may be too new for this ptxas, and the counts would not be NVRTC's own.
        let e = format!(
            "ptxas {}.{} is older than NVRTC {major}.{minor}: install the matching \
             nvidia-cuda-nvcc wheel or set PFC_PTXAS",
            ptxas_release.0, ptxas_release.1
        );
        if in_ci() {
            panic!("CI=true and {e}");
        }
        skip!("skipped: {e}");
        return;
    }

    let includes = include_paths();
    let dir = tempfile::tempdir().expect("temporary directory");
    let archs: Vec<u32> = ARCHS
        .into_iter()
        .filter(|&a| {
            let dropped = major >= 13 && a == 70;
            if dropped {
                println!("NVRTC {major}.{minor} cannot target sm_70 (CUDA 13 dropped it)");
            }
            !dropped
        })
        .collect();
    // (family, function, arch) -> report, in family then ptxas order.
    let mut reports: Vec<(&str, u32, FunctionInfo)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for &arch in &archs {
        for (family, src) in FAMILIES {
            let ptx = compile(
                family,
                &program_source(src),
                &format!("compute_{arch}"),
                &includes,
            )
            .unwrap_or_else(|e| panic!("{family}.cu for compute_{arch}: {e}"));
            let ptx_path = dir.path().join(format!("{family}_{arch}.ptx"));
            let cubin_path = dir.path().join(format!("{family}_{arch}.cubin"));
            std::fs::write(&ptx_path, &ptx).expect("write PTX");
            let out = Command::new(&ptxas)
                .arg("-v")
                .arg("--gpu-name")
                .arg(format!("sm_{arch}"))
                .arg("-o")
                .arg(&cubin_path)
                .arg(&ptx_path)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.display()));
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "ptxas failed on {family}.cu for sm_{arch} ({}):\n{text}",
                out.status
            );
            let functions = parse_ptxas_report(&text)
                .unwrap_or_else(|e| panic!("{family}.cu for sm_{arch}: {e}\n{text}"));

            let (_, kernels) = KERNELS
                .iter()
                .find(|(f, _)| *f == family)
                .unwrap_or_else(|| panic!("{family}: not in KERNELS"));
            for kernel in kernels.iter() {
                match functions.iter().find(|f| f.entry && f.name == *kernel) {
                    None => failures.push(format!(
                        "{family}.cu for sm_{arch}: ptxas reported no entry {kernel}"
                    )),
                    Some(f) if f.arch != format!("sm_{arch}") => failures.push(format!(
                        "{kernel}: compiled for {} instead of sm_{arch}",
                        f.arch
                    )),
                    Some(_) => {}
                }
            }
            for f in &functions {
                if f.spill_stores != 0 || f.spill_loads != 0 {
                    failures.push(format!(
                        "{}{} ({family}.cu) spills on sm_{arch}: {} bytes spill stores, {} bytes \
                         spill loads, {} bytes stack frame, {} registers",
                        if f.entry { "" } else { "device function " },
                        f.name,
                        f.spill_stores,
                        f.spill_loads,
                        f.stack_frame,
                        f.registers.map_or("?".to_string(), |r| r.to_string()),
                    ));
                }
                reports.push((family, arch, f.clone()));
            }
        }
    }

    print_table(&archs, &reports);
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    let checked = reports.iter().filter(|(_, _, f)| f.entry).count();
    let expected: usize = KERNELS.iter().map(|(_, k)| k.len()).sum::<usize>() * archs.len();
    assert!(
        checked >= expected,
        "{checked} kernels checked, {expected} expected"
    );
    println!("{checked} kernel compilations checked, no spills");
}

/// One row per function, one column per architecture: registers, then `+N` for an N-byte stack
/// frame and `!S/L` for spill stores/loads, when not zero.
fn print_table(archs: &[u32], reports: &[(&str, u32, FunctionInfo)]) {
    let mut rows: Vec<(&str, &str)> = Vec::new();
    for (family, _, f) in reports {
        if !rows.iter().any(|(fa, n)| fa == family && *n == f.name) {
            rows.push((family, &f.name));
        }
    }
    // KERNELS order within a family; device functions (if any) after the family's kernels.
    let rank = |family: &str, name: &str| {
        let fam = FAMILIES.iter().position(|(f, _)| *f == family);
        let kernels = KERNELS.iter().find(|(f, _)| *f == family).map(|(_, k)| *k);
        let pos = kernels.and_then(|k| k.iter().position(|n| *n == name));
        (fam, pos.unwrap_or(usize::MAX))
    };
    rows.sort_by_key(|(family, name)| rank(family, name));
    let width = rows.iter().map(|(_, n)| n.len()).max().unwrap_or(6).max(6);
    let mut header = format!("{:width$}", "kernel");
    for a in archs {
        header.push_str(&format!(" {:>7}", format!("sm_{a}")));
    }
    println!("registers per kernel (+stack frame bytes, !spill stores/loads bytes)");
    println!("{header}");
    for (family, name) in rows {
        let mut line = format!("{name:width$}");
        for &a in archs {
            let cell = reports
                .iter()
                .find(|(fa, ar, f)| *fa == family && *ar == a && f.name == name)
                .map_or("-".to_string(), |(_, _, f)| {
                    let mut c = f.registers.map_or("?".to_string(), |r| r.to_string());
                    if f.stack_frame != 0 {
                        c.push_str(&format!("+{}", f.stack_frame));
                    }
                    if f.spill_stores != 0 || f.spill_loads != 0 {
                        c.push_str(&format!("!{}/{}", f.spill_stores, f.spill_loads));
                    }
                    c
                });
            line.push_str(&format!(" {cell:>7}"));
        }
        println!("{line}");
    }
}

//! `pfc plan` as a user runs it: the JSON contract scripts read, and bad input.

use std::process::Command;

fn pfc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(args)
        .output()
        .expect("run pfc")
}

const PAPER: [&str; 9] = [
    "plan",
    "--classes",
    "29M",
    "--gpus",
    "8",
    "--gpu-memory",
    "32GiB",
    "--sample-rate",
    "0.1",
];

/// `pfc plan` of the paper's configuration with `extra` options, as JSON.
fn json_of(extra: &[&str]) -> serde_json::Value {
    let mut args = PAPER.to_vec();
    args.extend_from_slice(extra);
    args.push("--json");
    let out = pfc(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
}

#[test]
fn json_is_one_object_with_the_documented_keys() {
    let mut args = PAPER.to_vec();
    args.push("--json");
    let out = pfc(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(json["total_bytes"].is_u64());
    assert_eq!(json["fits"], true);
    assert!(json["max_classes"].as_u64().unwrap() > 29_000_000);
    let bound = json["upper_bound_classes"].as_u64().unwrap();
    assert!(bound >= json["max_classes"].as_u64().unwrap());
    assert!(json["upper_bound_gpus"].as_u64().unwrap() >= 1);
    let components = json["components"].as_object().unwrap();
    // S = 362,500 sampled classes, each logits row padded to 362,504 (a multiple of 8).
    assert_eq!(components["logits"], 1024 * 362_504 * 4);
    assert_eq!(components["weight_shard"], 3_625_000u64 * 512 * 4);
    assert_eq!(components["reserved"], 0);
    let sum: u64 = components.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(sum, json["total_bytes"].as_u64().unwrap());
}

#[test]
fn table_ends_with_one_verdict_line() {
    let out = pfc(&PAPER);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("weight_shard") && text.contains("logits"));
    let verdicts: Vec<_> = text.lines().filter(|l| l.starts_with("verdict:")).collect();
    assert_eq!(verdicts.len(), 1);
    assert!(verdicts[0].contains("FITS"));
    let tight = pfc(&[
        "plan",
        "--classes",
        "29M",
        "--gpus",
        "8",
        "--gpu-memory",
        "8GiB",
    ]);
    assert!(String::from_utf8(tight.stdout)
        .unwrap()
        .contains("verdict: DOES NOT FIT"));
}

#[test]
fn bad_input_is_one_line_naming_the_flag_and_exit_2() {
    let cases: [(&str, &str, &str); 10] = [
        ("--gpus", "0", "--gpus"),
        // negative numbers reach the parser (not clap's "unexpected argument")
        ("--batch", "-5", "must not be negative"),
        ("--sample-rate", "-0.1", "--sample-rate"),
        // a bare small number is a forgotten unit, not a 32-byte GPU
        ("--gpu-memory", "32", "did you mean 32GiB?"),
        // a count's unit is K, M or B; the message shows counts
        ("--classes", "100T", "29M"),
        ("--sample-rate", "1.5", "--sample-rate"),
        ("--sample-rate", "x", "--sample-rate"),
        ("--gpu-memory", "32XB", "--gpu-memory"),
        ("--batch", "0", "--batch"),
        ("--classes", "1.5", "--classes"),
    ];
    for (flag, value, named) in cases {
        let mut args: Vec<&str> = vec![
            "plan",
            "--classes",
            "29M",
            "--gpus",
            "8",
            "--gpu-memory",
            "32GiB",
        ];
        if let Some(i) = args.iter().position(|a| *a == flag) {
            args[i + 1] = value;
        } else {
            args.extend([flag, value]);
        }
        let out = pfc(&args);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(named), "{err}");
        assert!(out.stdout.is_empty());
    }
    // clap's own errors exit 2 as well
    let out = pfc(&[
        "plan",
        "--classes",
        "29M",
        "--gpus",
        "8",
        "--gpu-memory",
        "32GiB",
        "--optimizer",
        "lion",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sweep_and_plot_write_an_svg() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("memory.svg");
    let mut args = PAPER.to_vec();
    let svg_arg = svg.to_str().unwrap().to_string();
    args.extend(["--sweep", "1M..100M", "--plot", &svg_arg, "--json"]);
    let out = pfc(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sweep = json["sweep"].as_array().unwrap();
    assert_eq!(sweep.first().unwrap()["classes"], 1_000_000);
    assert_eq!(sweep.last().unwrap()["classes"], 100_000_000);
    for p in sweep {
        let mp = p["model_parallel_bytes"].as_u64().unwrap();
        let pfc = p["partial_fc_bytes"].as_u64().unwrap();
        let fused = p["fused_bytes"].as_u64().unwrap();
        assert!(mp > pfc && pfc > fused);
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("device capacity"));
}

/// Whether this process runs as root (who may write in a read-only folder).
#[cfg(unix)]
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `--plot` replaces an old plot, but never a checkpoint shard, a folder or a pipe: refused before
/// any work, the file kept.
#[test]
fn plot_never_replaces_a_shard_a_folder_or_a_pipe() {
    use partial_fc::collective::SingleRank;
    use partial_fc::{CpuBackend, LayerConfig, PartialFc};
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("rank0.safetensors");
    PartialFc::new(LayerConfig::new(10, 4, 2), CpuBackend, SingleRank)
        .unwrap()
        .save(&shard)
        .unwrap();
    let before = std::fs::read(&shard).unwrap();
    let plot = |path: &std::path::Path| {
        let mut args = PAPER.to_vec();
        let path = path.to_str().unwrap().to_string();
        args.extend(["--plot", &path]);
        pfc(&args)
    };
    let out = plot(&shard);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is a partial-fc checkpoint shard"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&shard).unwrap(), before);
    let out = plot(dir.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("names a folder"));
    // A name that ends in a separator is a folder's, and a folder that takes no file is found
    // before the work.
    let out = plot(&dir.path().join("new/"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("names a folder"));
    #[cfg(unix)]
    if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
        let out = plot(&locked.join("p.svg"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot write in the folder"), "{stderr}");
    } else {
        eprintln!("skipped the read-only folder case: root writes anywhere");
    }
    #[cfg(unix)]
    {
        let fifo = dir.path().join("fifo");
        let made = Command::new("mkfifo").arg(&fifo).status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "mkfifo (coreutils) is needed"
        );
        let out = plot(&fifo);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("not a regular file"), "{stderr}");
        // A link to the pipe is replaced by the plot (the rename replaces the link), without
        // opening the pipe (which would block); the pipe stays.
        let link = dir.path().join("link.svg");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let out = plot(&link);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
    }
    // `dir/.` names a folder too.
    let out = plot(&dir.path().join("new").join("."));
    assert!(String::from_utf8_lossy(&out.stderr).contains("names a folder"));
    // An old plot is replaced.
    let svg = dir.path().join("old.svg");
    std::fs::write(&svg, "old").unwrap();
    assert!(plot(&svg).status.success());
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
}

/// The tick labels of an SVG's class axis, left to right: the `<text>` elements that sit on one
/// row (same `y`, centred) and read as class counts ("10", "2.5M"); the axis title and the caption
/// are on rows of their own.
fn class_axis_labels(svg: &str) -> Vec<String> {
    use partial_fc::plan::units::parse_count;
    let mut rows: Vec<(String, Vec<(i64, String)>)> = Vec::new();
    for element in svg.split("<text").skip(1) {
        let (attributes, rest) = element.split_once('>').unwrap();
        let text = rest.split_once("</text>").unwrap().0.trim().to_string();
        let attribute = |name: &str| {
            let (_, value) = attributes.split_once(&format!(" {name}=\"")).unwrap();
            value.split_once('"').unwrap().0.to_string()
        };
        if attribute("text-anchor") != "middle" || parse_count("label", &text).is_err() {
            continue;
        }
        let (y, x) = (attribute("y"), attribute("x").parse::<i64>().unwrap());
        match rows.iter_mut().find(|(row, _)| *row == y) {
            Some((_, labels)) => labels.push((x, text)),
            None => rows.push((y, vec![(x, text)])),
        }
    }
    assert_eq!(rows.len(), 1, "one row of class labels: {rows:?}");
    let mut labels = rows.pop().unwrap().1;
    labels.sort();
    labels.into_iter().map(|(_, text)| text).collect()
}

/// plotters' own log-scale ticks repeated a label: over one decade and a bit it marks 10^k, then
/// 2·10^k … 10·10^k, and 10^(k+1) once more ("1M … 9M, 10M, 10M", "10 … 100, 100, 200"); within
/// a decade and short of its power of ten (2M..5M) it marked nothing. Every range gets at least two
/// labels, in order, none repeated, each the count its tick stands at.
#[test]
fn plot_class_axis_labels_are_distinct() {
    use partial_fc::plan::units::parse_count;
    let dir = tempfile::tempdir().unwrap();
    for range in [
        "1M..10M",
        "100K..1M",
        "1M..20M",
        "8..200",
        "10..100",
        "2M..5M",
        "1M..1.5M",
        "12.3M..12.4M",
        "3M..30M",
        "1M..100M",
        "10K..10M",
        "8..1000B",
    ] {
        let svg = dir.path().join(format!("{range}.svg"));
        let svg_arg = svg.to_str().unwrap().to_string();
        let mut args = PAPER.to_vec();
        args.extend(["--sweep", range, "--plot", &svg_arg]);
        let out = pfc(&args);
        assert!(
            out.status.success(),
            "{range}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let labels = class_axis_labels(&std::fs::read_to_string(&svg).unwrap());
        let (from, to) = range.split_once("..").unwrap();
        let (from, to) = (
            parse_count("from", from).unwrap(),
            parse_count("to", to).unwrap(),
        );
        let counts: Vec<u64> = labels
            .iter()
            .map(|l| parse_count("label", l).unwrap())
            .collect();
        assert!(
            counts.len() >= 2 && counts.windows(2).all(|w| w[0] < w[1]),
            "{range}: labels {labels:?} are not distinct and in order"
        );
        assert!(
            counts.iter().all(|c| (from..=to).contains(c)),
            "{range}: labels {labels:?} outside the sweep"
        );
    }
}

/// `--gemm-precision bf16` adds the 16-bit operand copies of x̂ and ŵ: M = 1024, S = 362 500
/// padded to 362 504 rows (a multiple of 8), d = 512, so 2·(M·d + S·d) bytes, and halves the
/// logits (2·M·S instead of 4·M·S); f32 (the default) adds no copies.
#[test]
fn gemm_precision_flag_adds_the_operand_copies_and_halves_the_logits() {
    let component = |extra: &[&str], name: &str| {
        let mut args = PAPER.to_vec();
        args.push("--json");
        args.extend_from_slice(extra);
        let out = pfc(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["components"][name].as_u64().unwrap()
    };
    let (m, s, d) = (1024u64, 362_504u64, 512u64);
    assert_eq!(component(&[], "gemm_operands"), 0);
    assert_eq!(component(&[], "logits"), 4 * m * s);
    for precision in ["bf16", "f16"] {
        let flag = ["--gemm-precision", precision];
        assert_eq!(component(&flag, "gemm_operands"), 2 * (m * d + s * d));
        assert_eq!(component(&flag, "logits"), 2 * m * s);
    }
    assert!(!pfc(&[
        "plan",
        "--classes",
        "1M",
        "--gpus",
        "1",
        "--gpu-memory",
        "8GiB",
        "--gemm-precision",
        "tf32"
    ])
    .status
    .success());
}

/// `--state-dtype bf16` halves the optimizer state (2 bytes per weight) and nothing else, and
/// answers 100M classes on 64 × 11 GiB RTX 2080 Ti, which f32 momentum does not fit.
#[test]
fn state_dtype_bf16_halves_the_momentum() {
    let (f32_plan, bf16_plan) = (json_of(&[]), json_of(&["--state-dtype", "bf16"]));
    let state = |j: &serde_json::Value| j["components"]["optimizer_state"].as_u64().unwrap();
    assert_eq!(state(&f32_plan), 3_625_000u64 * 512 * 4);
    assert_eq!(state(&bf16_plan), 3_625_000u64 * 512 * 2);
    let total = |j: &serde_json::Value| j["total_bytes"].as_u64().unwrap();
    assert_eq!(total(&f32_plan) - total(&bf16_plan), 3_625_000u64 * 512 * 2);

    let fits = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--classes",
            "100M",
            "--gpus",
            "64",
            "--gpu-memory",
            "11GiB",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = pfc(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["fits"] == true
    };
    assert!(
        !fits(&[]),
        "f32 momentum: 100M on 64 × 11 GiB should not fit"
    );
    assert!(
        fits(&["--state-dtype", "bf16"]),
        "bf16 momentum: it should fit"
    );
}

#[test]
fn grad_wire_dtype_adds_the_16_bit_reduce_scatter_buffers() {
    let staging = |extra: &[&str]| {
        let mut args = PAPER.to_vec();
        args.push("--json");
        args.extend_from_slice(extra);
        let out = pfc(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["components"]["collective_staging"].as_u64().unwrap()
    };
    // N = 128, k = 8, d = 512: a send buffer of N·k·d and a receive buffer of N·d, 2 bytes each.
    let (n, m, d) = (128u64, 1024u64, 512u64);
    let f32_wire = staging(&[]);
    // The f32 gradient rows and the all-gather's send buffer (N packed rows of d + 2 words).
    assert_eq!(f32_wire, n * d * 4 + n * (d + 2) * 4);
    for dtype in ["bf16", "f16"] {
        assert_eq!(
            staging(&["--grad-wire-dtype", dtype]),
            f32_wire + (m * d + n * d) * 2,
            "{dtype}"
        );
    }
    let bad = pfc(&[
        "plan",
        "--classes",
        "1M",
        "--gpus",
        "8",
        "--gpu-memory",
        "32GiB",
        "--grad-wire-dtype",
        "f8",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--grad-wire-dtype"));
}

/// The `pfc plan` output printed in README.md and docs/memory-model.md is what the command prints
/// today, line for line (lines the docs elide with "..." aside): a change to the planner that
/// moves a number must move the docs too (a review found both a few thousand classes stale
/// after the logits rows were padded).
#[test]
fn documented_plan_output_is_current() {
    let mut args = PAPER.to_vec();
    args.extend(["--batch", "128", "--dim", "512"]);
    let out = pfc(&args);
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let printed: Vec<&str> = printed.lines().map(str::trim_end).collect();
    let root = env!("CARGO_MANIFEST_DIR");
    for doc in ["README.md", "docs/memory-model.md"] {
        let text = std::fs::read_to_string(format!("{root}/{doc}")).unwrap();
        let first = "29M classes on 8 GPUs of 32.0 GiB, 128 images/GPU, d = 512, r = 0.1";
        let start = text
            .find(first)
            .unwrap_or_else(|| panic!("{doc}: no `pfc plan` output for the paper's 29M"));
        let block = &text[start..start + text[start..].find("```").unwrap()];
        let mut checked = 0;
        for line in block.lines().map(str::trim_end) {
            if line.is_empty() || line == "..." {
                continue;
            }
            assert!(
                printed.contains(&line),
                "{doc}: `{line}` is not in what `pfc {}` prints now:\n{}",
                args.join(" "),
                printed.join("\n")
            );
            checked += 1;
        }
        assert!(checked >= 10, "{doc}: only {checked} lines checked");
    }
}

#[test]
fn nothing_fits_anywhere_says_so() {
    // a 1 MiB GPU holds not one class of a 128 × 512 batch's buffers on any cluster size
    let tiny = [
        "plan",
        "--classes",
        "1000",
        "--gpus",
        "2",
        "--gpu-memory",
        "1MiB",
    ];
    let out = pfc(&tiny);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("upper bound over cluster sizes: none (not one class fits"),
        "{text}"
    );
    assert!(!text.contains("first reached at"), "{text}");
    let out = pfc(&[&tiny[..], &["--json"]].concat());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["upper_bound_classes"], 0);
    assert!(json["upper_bound_gpus"].is_null(), "{json}");
}

#[test]
fn the_largest_sample_rate_shown_fits() {
    // 29M on 8 × 24 GiB: the rate is found to f64 precision and shown floored to 4 places,
    // so the printed rate must fit when fed back
    let base = [
        "plan",
        "--classes",
        "29M",
        "--gpus",
        "8",
        "--gpu-memory",
        "24GiB",
    ];
    let json_at = |r: &str| {
        let out = pfc(&[&base[..], &["--sample-rate", r, "--json"]].concat());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let exact = json_at("0.1")["max_sample_rate"].as_f64().unwrap();
    assert!(exact > 0.0 && exact < 1.0, "{exact}");
    let text = String::from_utf8(pfc(&base).stdout).unwrap();
    let shown = text
        .lines()
        .find_map(|l| l.strip_prefix("largest sample rate that fits: "))
        .unwrap();
    assert!(shown.parse::<f64>().unwrap() <= exact, "{shown} > {exact}");
    assert_eq!(json_at(shown)["fits"], true, "{shown}");
}

#[test]
fn hard_negatives_flag_adds_their_scratch() {
    let scratch = |extra: &[&str]| {
        let mut args = PAPER.to_vec();
        args.push("--json");
        args.extend_from_slice(extra);
        let out = pfc(&args);
        assert!(out.status.success());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["components"]["hard_negative_scratch"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(scratch(&[]), 0);
    // the shard's scores (3,625,000 × 4 bytes) and a 4096-center chunk against d = 512 and the
    // 1024 gathered rows
    assert_eq!(
        scratch(&["--hard-negatives"]),
        3_625_000 * 4 + 4096 * 512 * 4 + 4096 * 1024 * 4
    );
}

/// `--check` makes "does not fit" exit status 1 (text and JSON alike, the output printed as
/// usual); without it the status stays 0 whatever the verdict, and bad input stays 2.
#[test]
fn check_exits_1_when_it_does_not_fit() {
    // 100M on 64 × 11 GiB misses by 3.5% (docs/memory-model.md)
    let tight = [
        "plan",
        "--classes",
        "100M",
        "--gpus",
        "64",
        "--gpu-memory",
        "11GiB",
    ];
    let out = pfc(&tight);
    assert_eq!(out.status.code(), Some(0), "the default is unchanged");
    let out = pfc(&[&tight[..], &["--check"]].concat());
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("verdict: DOES NOT FIT"), "{text}");
    assert!(out.stderr.is_empty());
    let out = pfc(&[&tight[..], &["--check", "--json"]].concat());
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["fits"], false);
    for json in [false, true] {
        let mut args = PAPER.to_vec();
        args.push("--check");
        if json {
            args.push("--json");
        }
        assert_eq!(pfc(&args).status.code(), Some(0), "it fits (json: {json})");
    }
    let out = pfc(&[&tight[..], &["--check", "--batch", "0"]].concat());
    assert_eq!(out.status.code(), Some(2), "bad input");
}

/// A decimal `--gpu-memory` (SI: `80GB` = 80·10⁹ bytes) is shown in GiB with the binary
/// spelling of the number, which is what a card sold as "80GB" holds; a binary one is not
/// remarked on. With `--json` the note goes to stderr and stdout stays one object.
#[test]
fn a_decimal_gpu_memory_is_shown_in_gib_with_what_the_card_holds() {
    let run = |memory: &str, json: bool| {
        let mut args = vec![
            "plan",
            "--classes",
            "29M",
            "--gpus",
            "8",
            "--gpu-memory",
            memory,
        ];
        if json {
            args.push("--json");
        }
        let out = pfc(&args);
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (text, _) = run("80GB", false);
    assert!(
        text.contains(
            "note: --gpu-memory 80GB is 80·10⁹ bytes = 74.5 GiB; a GPU sold as \"80GB\" holds \
             80 GiB: write 80GiB"
        ),
        "{text}"
    );
    let (text, _) = run("11G", false);
    assert!(
        text.contains("11G is 11·10⁹ bytes = 10.2 GiB") && text.contains("write 11GiB"),
        "{text}"
    );
    let (text, _) = run("2.5T", false);
    assert!(text.contains("write 2.5TiB"), "{text}");
    for binary in ["80GiB", "85899345920"] {
        let (text, _) = run(binary, false);
        assert!(!text.contains("--gpu-memory"), "{binary}: {text}");
    }
    let (stdout, stderr) = run("80GB", true);
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    serde_json::from_str::<serde_json::Value>(&stdout).unwrap();
    assert!(stderr.contains("write 80GiB"), "{stderr}");
    // --help says it too
    let help = String::from_utf8(pfc(&["plan", "--help"]).stdout).unwrap();
    assert!(help.contains("80GB is 80·10⁹ bytes = 74.5 GiB"), "{help}");
}

/// Under the verdict: that the default `--reserved 0` counts the FC layer alone (only when it
/// fits), and the what-ifs given (options the planner sizes but the layer cannot run); `--json`
/// lists the what-ifs in `what_ifs` and keeps its other keys.
#[test]
fn the_verdict_says_what_it_leaves_out_and_what_the_layer_cannot_run() {
    let text = |extra: &[&str]| {
        let out = pfc(&[&PAPER[..], extra].concat());
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let reserve_note = "note: the FC layer alone (--reserved 0)";
    let plain = text(&[]);
    assert!(plain.contains(reserve_note), "{plain}");
    assert!(!plain.contains("what-if"), "{plain}");
    let reserved = text(&["--reserved", "4.5GiB"]);
    assert!(!reserved.contains("note:"), "{reserved}");
    let out = pfc(&[
        "plan",
        "--classes",
        "29M",
        "--gpus",
        "8",
        "--gpu-memory",
        "8GiB",
    ]);
    let tight = String::from_utf8(out.stdout).unwrap();
    assert!(
        tight.contains("DOES NOT FIT") && !tight.contains(reserve_note),
        "a reserve cannot make a miss fit: {tight}"
    );
    let what_ifs = text(&["--weight-dtype", "bf16", "--logits", "fused"]);
    assert!(what_ifs.contains("verdict: FITS"), "{what_ifs}");
    assert!(
        what_ifs.contains(
            "note: a what-if: the layer cannot run --weight-dtype bf16 (it keeps f32 master \
             weights) or --logits fused (not implemented yet)"
        ),
        "{what_ifs}"
    );
    let one = text(&["--weight-dtype", "f16"]);
    assert!(
        one.contains("the layer cannot run --weight-dtype f16 (it keeps f32 master weights)\n"),
        "{one}"
    );
    let json = |extra: &[&str]| {
        let out = pfc(&[&PAPER[..], extra, &["--json"]].concat());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(json(&[])["what_ifs"], serde_json::json!([]));
    let both = json(&["--weight-dtype", "bf16", "--logits", "fused"]);
    assert_eq!(
        both["what_ifs"],
        serde_json::json!(["--weight-dtype bf16", "--logits fused"])
    );
    assert_eq!(both["fits"], true);
    assert!(both["components"].is_object() && both["total_bytes"].is_u64());
}

/// Class counts are shown to four significant digits in the largest unit (a review found
/// `102465.8K classes`), cut rather than rounded, with the exact count beside them; a count
/// the user gave is shown as it can be typed.
#[test]
fn counts_scale_to_k_m_b_with_the_exact_count_beside() {
    let out = pfc(&PAPER);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("largest class count on 8 GPUs: 55.81M (55812920)\n"),
        "{text}"
    );
    assert!(
        text.contains("upper bound over cluster sizes: 584.2M classes (584286075), first"),
        "{text}"
    );
    let out = pfc(&[
        "plan",
        "--classes",
        "100001",
        "--gpus",
        "1",
        "--gpu-memory",
        "11GiB",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("100001 classes on 1 GPU of 11.0 GiB"),
        "{text}"
    );
    assert!(text.contains("fewest GPUs for 100001 classes: 1"), "{text}");
}

/// `--accumulate K`: the step's batch in K passes, each sized like a plain step of batch / K
/// with the dense update; the JSON says K, the text both batches; a batch that does not split
/// into whole passes is refused.
#[test]
fn accumulate_plans_passes_of_batch_over_k_with_the_dense_update() {
    let mut accumulated = json_of(&["--batch", "128", "--accumulate", "4"]);
    let mut plain = json_of(&["--batch", "32", "--update", "dense"]);
    assert_eq!(accumulated["accumulate"], 4);
    assert_eq!(plain["accumulate"], 1);
    // The question as planned is in the answer, spelled as the options are.
    assert_eq!(accumulated["update"], "dense");
    assert_eq!(accumulated["batch_per_gpu"], 32);
    let sparse_default = json_of(&[]);
    for (key, want) in [
        ("update", "sparse"),
        ("optimizer", "sgd-momentum"),
        ("state_dtype", "f32"),
        ("weight_dtype", "f32"),
        ("logits", "materialized"),
        ("gemm_precision", "f32"),
        ("wire_dtype", "f32"),
        ("grad_wire_dtype", "f32"),
    ] {
        assert_eq!(sparse_default[key], want, "{key}");
    }
    assert_eq!(sparse_default["hard_negatives"], false);
    assert_eq!(sparse_default["reserved_bytes"], 0);
    for j in [&mut accumulated, &mut plain] {
        j.as_object_mut().unwrap().remove("accumulate");
    }
    assert_eq!(accumulated, plain);
    // The dense gradient is what the sparse default would not hold.
    let sparse = json_of(&["--batch", "32"]);
    assert!(
        accumulated["total_bytes"].as_u64() > sparse["total_bytes"].as_u64(),
        "{accumulated} against {sparse}"
    );
    let mut args = PAPER.to_vec();
    args.extend_from_slice(&["--batch", "128", "--accumulate", "4"]);
    let text = String::from_utf8(pfc(&args).stdout).unwrap();
    assert!(
        text.contains("128 images/GPU in 4 passes of 32 (gradient accumulation: dense update)")
            && text.contains("per pass"),
        "{text}"
    );
    for (bad, why) in [("3", "must be a multiple of it"), ("0", "at least 1")] {
        let mut args = PAPER.to_vec();
        args.extend_from_slice(&["--batch", "128", "--accumulate", bad]);
        let out = pfc(&args);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--accumulate") && err.contains(why), "{err}");
    }
}

/// From a cluster-sizing user trial: `--check` fails a what-if the layer cannot run; a miss says
/// by how much; a unitless `--reserved` is refused as a forgotten unit; `--accumulate` with an
/// explicit sparse update is refused; a closed pipe ends `pfc` without a panic.
#[test]
fn check_what_ifs_misses_units_and_closed_pipes() {
    let run = |extra: &[&str]| {
        let mut args = PAPER.to_vec();
        args.extend_from_slice(extra);
        pfc(&args)
    };
    assert_eq!(
        run(&["--weight-dtype", "f16", "--check"]).status.code(),
        Some(1)
    );
    assert_eq!(run(&["--check"]).status.code(), Some(0));
    let model_parallel = [
        "plan",
        "--classes",
        "29M",
        "--gpus",
        "8",
        "--gpu-memory",
        "32GiB",
        "--sample-rate",
        "1",
    ];
    let miss = String::from_utf8(pfc(&model_parallel).stdout).unwrap();
    assert!(
        miss.contains("DOES NOT FIT") && miss.contains(" over"),
        "{miss}"
    );
    for (extra, why) in [
        (&["--reserved", "20"][..], "20 bytes is no reserve"),
        (
            &["--accumulate", "2", "--update", "sparse"][..],
            "needs the dense update",
        ),
    ] {
        let out = run(extra);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{extra:?}: {err}");
    }
    assert_eq!(run(&["--reserved", "0", "--check"]).status.code(), Some(0));
    // `pfc plan ... | head -1`: the reader goes away before pfc writes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pfc"))
        .args(PAPER)
        .args(["--sweep", "1M..100M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && out.status.code() != Some(101),
        "{err}"
    );
}

/// `--gpus-per-node G`: the fewest whole nodes, found among multiples of G (not the fewest GPUs
/// rounded up). At 1,137,266,238 classes on 80 GiB GPUs with a 20 GiB reserve (the upper bound)
/// only 942 GPUs fit (941 and 943 do not: memory is not monotone in k), so no whole number of
/// 8-GPU nodes does.
#[test]
fn gpus_per_node_answers_in_whole_nodes() {
    let paper = json_of(&["--gpus-per-node", "8"]);
    assert_eq!(paper["gpus_per_node"], 8);
    assert_eq!(paper["min_nodes"], 1);
    assert!(paper["min_gpus"].as_u64().unwrap() <= 8);
    let edge = [
        "plan",
        "--classes",
        "1137266238",
        "--gpus",
        "942",
        "--gpu-memory",
        "80GiB",
        "--reserved",
        "20GiB",
        "--gpus-per-node",
        "8",
    ];
    let out = pfc(&edge);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("fewest GPUs for 1137266238 classes: 942"),
        "{text}"
    );
    assert!(
        text.contains("fewest nodes of 8 GPUs for 1137266238 classes: none"),
        "{text}"
    );
    let mut json_args = edge.to_vec();
    json_args.push("--json");
    let json: serde_json::Value = serde_json::from_slice(&pfc(&json_args).stdout).unwrap();
    assert!(json["min_nodes"].is_null(), "{json}");
    let single = json_of(&["--gpus-per-node", "1"]);
    assert_eq!(
        single["min_nodes"], single["min_gpus"],
        "one GPU a node is the GPU count"
    );
    let mut bad = PAPER.to_vec();
    bad.extend_from_slice(&["--gpus-per-node", "0"]);
    let out = pfc(&bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gpus-per-node"));
}

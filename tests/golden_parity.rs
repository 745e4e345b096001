//! Parity with the published PyTorch implementation on the golden cases of ../shared/golden,
//! for 1, 2 and 3 ranks (threads).

/// Prints past the test harness's output capture (which only intercepts the print macros),
/// so a skipped test says so in a plain `cargo test` run.
macro_rules! skip {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod golden_support;

use golden_support::{assert_close_in_row as assert_close, golden_files};
use partial_fc::golden::{read_expected, StepCase};

#[test]
fn golden_cases_match_for_one_two_and_three_ranks() {
    let Some(files) = golden_files() else {
        skip!("skipped: ../shared/golden not found (set PFC_GOLDEN_DIR)");
        return;
    };
    assert!(
        !files.is_empty(),
        "golden folder holds no .safetensors files"
    );
    for file in &files {
        let case = StepCase::read(file).unwrap();
        let want = read_expected(file).unwrap();
        for k in [1, 2, 3] {
            eprintln!("{} with {k} ranks", file.display());
            let got = case.run_threads(k).unwrap();
            assert_close("loss", &[got.loss], &[want.loss], 1);
            assert_close(
                "grad_embeddings",
                &got.grad_embeddings,
                &want.grad_embeddings,
                case.dim,
            );
            assert_close("grad_weight", &got.grad_weight, &want.grad_weight, case.dim);
            if let Some(index) = &case.sampled_index {
                assert_eq!(&got.sampled_index, index);
            }
        }
    }
}

#[test]
fn a_given_sample_does_not_hide_an_invalid_rate() {
    let Some(files) = golden_files() else {
        skip!("skipped: ../shared/golden not found (set PFC_GOLDEN_DIR)");
        return;
    };
    let with_sample = files
        .iter()
        .map(|f| StepCase::read(f).unwrap())
        .find(|c| c.sampled_index.is_some());
    let Some(mut case) = with_sample else {
        panic!("no golden case gives its sample; this test needs one");
    };
    for rate in [f64::NAN, -0.5, 2.0] {
        case.sample_rate = rate;
        let err = case.run_threads(2).err();
        assert!(
            matches!(
                err,
                Some(partial_fc::PfcError::Param {
                    name: "sample_rate",
                    ..
                })
            ),
            "rate {rate}: {err:?}"
        );
    }
}

//! `pfc step` (to be written).

/// Arguments of `pfc step`.
#[derive(clap::Args)]
pub struct StepArgs {}

/// Runs `pfc step`.
pub fn run(_args: StepArgs) -> Result<(), String> {
    Err("pfc step is not implemented yet".into())
}

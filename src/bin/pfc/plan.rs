//! `pfc plan` (to be written).

/// Arguments of `pfc plan`.
#[derive(clap::Args)]
pub struct PlanArgs {}

/// Runs `pfc plan`.
pub fn run(_args: PlanArgs) -> Result<(), String> {
    Err("pfc plan is not implemented yet".into())
}

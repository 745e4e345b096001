//! Small pieces of the commands' English.

/// `count` and the noun in the number it takes: `1 file`, `2 files`, `0 files`.
pub fn plural(count: u64, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

/// A run's progress as its checkpoint records it: "step N" when every pass was an optimizer
/// step, "pass N, optimizer step M" when passes were accumulated (the pass counter alone would
/// read as the training step).
pub fn progress(passes: u64, optimizer_steps: u64) -> String {
    if passes == optimizer_steps {
        format!("step {passes}")
    } else {
        format!("pass {passes}, optimizer step {optimizer_steps}")
    }
}

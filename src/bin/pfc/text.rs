//! Small pieces of the commands' English.

/// `count` and the noun in the number it takes: `1 file`, `2 files`, `0 files`.
pub fn plural(count: u64, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

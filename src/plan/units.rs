//! Human units for the planner: byte sizes (`32GiB`, `11G`) and class counts (`29M`, `1.5B`).
//!
//! Parsing is exact decimal arithmetic on integers, never `f64`, so that `1.1M` is 1,100,000 and
//! not 1,099,999. A value that does not parse, is not a whole number of bytes or classes, or
//! does not fit in 64 bits is a [`PfcError::Param`] naming the parameter.

use crate::error::{PfcError, Result};

/// Parses a byte size: a plain number of bytes, or a number with a decimal suffix
/// (`K`, `M`, `G`, `T`, `P`, `E`, optionally followed by `B`: powers of 1000) or a binary one
/// (`KiB`, `MiB`, `GiB`, `TiB`, `PiB`, `EiB`: powers of 1024). Suffixes are case-insensitive; a fraction is
/// allowed when the result is a whole number of bytes (`1.5KiB` = 1536).
///
/// `name` is the parameter the value belongs to; errors carry it.
///
/// ```
/// use partial_fc::plan::units::parse_size;
/// assert_eq!(parse_size("gpu_memory", "32GiB").unwrap(), 32 << 30);
/// assert_eq!(parse_size("gpu_memory", "11G").unwrap(), 11_000_000_000);
/// assert_eq!(parse_size("gpu_memory", "1.5KiB").unwrap(), 1536);
/// assert_eq!(parse_size("gpu_memory", "1EiB").unwrap(), 1 << 60);
/// assert!(parse_size("gpu_memory", "lots").is_err());
/// ```
pub fn parse_size(name: &'static str, text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, suffix) = (t[..split].trim(), t[split..].trim());
    let multiplier: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "p" | "pb" => 1_000_000_000_000_000,
        "e" | "eb" => 1_000_000_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "pib" => 1 << 50,
        "eib" => 1 << 60,
        _ => {
            return Err(PfcError::param(
                name,
                text,
                "unknown size unit (use K, M, G, T, P, E or KiB, MiB, GiB, TiB, PiB, EiB)",
            ))
        }
    };
    scaled_decimal(name, text, number, multiplier, "bytes")
}

/// Parses a class count: a plain integer (`100000`, `100_000`) or a number with a decimal
/// suffix `K` (thousand), `M` (million) or `B` (billion), case-insensitive, e.g. `29M`, `1.5B`.
///
/// ```
/// use partial_fc::plan::units::parse_count;
/// assert_eq!(parse_count("classes", "29M").unwrap(), 29_000_000);
/// assert_eq!(parse_count("classes", "1.5B").unwrap(), 1_500_000_000);
/// assert_eq!(parse_count("classes", "100000").unwrap(), 100_000);
/// assert!(parse_count("classes", "1.5").is_err());
/// ```
pub fn parse_count(name: &'static str, text: &str) -> Result<u64> {
    let t = text.trim();
    let (number, multiplier) = match t.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&t[..t.len() - 1], 1_000),
        Some('m') => (&t[..t.len() - 1], 1_000_000),
        Some('b') => (&t[..t.len() - 1], 1_000_000_000),
        _ => (t, 1),
    };
    scaled_decimal(name, text, number.trim(), multiplier, "classes")
}

/// `number × multiplier` for a decimal `number` (digits, `_` separators, at most one `.`),
/// exactly, as long as the product is a whole number that fits in a `u64`.
fn scaled_decimal(
    name: &'static str,
    text: &str,
    number: &str,
    multiplier: u64,
    what: &str,
) -> Result<u64> {
    let bad = |reason: &str| PfcError::param(name, text, reason.to_string());
    if number.starts_with('-') {
        return Err(bad("must not be negative"));
    }
    let digits: String = number.chars().filter(|&c| c != '_').collect();
    let (int_part, frac_part) = match digits.split_once('.') {
        Some((i, f)) => (i, f),
        None => (digits.as_str(), ""),
    };
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty())
        || !all_digits(int_part)
        || !all_digits(frac_part)
    {
        return Err(bad(if what == "bytes" {
            "not a size (expected e.g. 32GiB, 11G, 4096; units K, M, G, T, P, E or KiB .. EiB)"
        } else {
            "not a count (expected e.g. 29M, 1.5B, 100000; units K, M or B)"
        }));
    }
    if frac_part.len() > 18 {
        return Err(bad("too many decimal places"));
    }
    let overflow = || bad("too large");
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| overflow())?
    };
    let frac: u128 = if frac_part.is_empty() {
        0
    } else {
        frac_part.parse().map_err(|_| overflow())?
    };
    let scale = 10u128.pow(frac_part.len() as u32);
    let m = u128::from(multiplier);
    let frac_scaled = frac * m;
    if !frac_scaled.is_multiple_of(scale) {
        return Err(bad(&format!("not a whole number of {what}")));
    }
    let value = int
        .checked_mul(m)
        .and_then(|v| v.checked_add(frac_scaled / scale))
        .ok_or_else(overflow)?;
    u64::try_from(value).map_err(|_| overflow())
}

/// A byte count in binary units with three significant decimals: `7.42 GiB`, `512 B`.
///
/// ```
/// use partial_fc::plan::units::format_bytes;
/// assert_eq!(format_bytes(512), "512 B");
/// assert_eq!(format_bytes(3 << 29), "1.50 GiB");
/// ```
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.decimals$} {}", UNITS[unit])
}

/// A class count for people: below 1000 as it is, above in the largest of `K`, `M`, `B` it
/// reaches, to four significant digits, trailing zeros dropped: `29M`, `1.5B`, `102.4M`,
/// `55.81M`, `999`. The digits past the fourth are cut, never rounded up, so that a largest
/// count that fits is never shown larger than it is (102,465,800 is `102.4M`); whether the text
/// is exact is whether [`parse_count`] gives the count back (`--json` carries exact counts).
///
/// ```
/// use partial_fc::plan::units::format_count;
/// assert_eq!(format_count(29_000_000), "29M");
/// assert_eq!(format_count(1_500_000_000), "1.5B");
/// assert_eq!(format_count(102_465_800), "102.4M");
/// assert_eq!(format_count(55_812_928), "55.81M");
/// assert_eq!(format_count(999), "999");
/// ```
pub fn format_count(count: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("B", 1_000_000_000), ("M", 1_000_000), ("K", 1_000)];
    let Some(&(suffix, unit)) = UNITS.iter().find(|(_, unit)| count >= *unit) else {
        return count.to_string();
    };
    let whole = count / unit;
    // 1 to 3 digits in K and M; B holds up to 11 (u64::MAX is 18446744073B)
    let digits = whole.to_string().len() as u32;
    let decimals = 4u32.saturating_sub(digits);
    let fraction = (count % unit) / (unit / 10u64.pow(decimals));
    if fraction == 0 {
        return format!("{whole}{suffix}");
    }
    let fraction = format!("{fraction:0width$}", width = decimals as usize);
    format!("{whole}.{}{suffix}", fraction.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_decimal_and_binary_units() {
        let p = |s| parse_size("gpu_memory", s).unwrap();
        assert_eq!(p("0"), 0);
        assert_eq!(p("4096"), 4096);
        assert_eq!(p("4096B"), 4096);
        assert_eq!(p("32K"), 32_000);
        assert_eq!(p("32KB"), 32_000);
        assert_eq!(p("11G"), 11_000_000_000);
        assert_eq!(p("2T"), 2_000_000_000_000);
        assert_eq!(p("32GiB"), 34_359_738_368);
        assert_eq!(p("32gib"), 34_359_738_368);
        assert_eq!(p(" 5 GiB "), 5 << 30);
        assert_eq!(p("1TiB"), 1 << 40);
        assert_eq!(p("1.5MiB"), 3 << 19);
        assert_eq!(p("0.5K"), 500);
        assert_eq!(p("1_000M"), 1_000_000_000);
        assert_eq!(p("2P"), 2_000_000_000_000_000);
        assert_eq!(p("1PiB"), 1 << 50);
        assert_eq!(p("1EiB"), 1 << 60);
        assert_eq!(p("15EB"), 15_000_000_000_000_000_000);
    }

    #[test]
    fn errors_say_what_went_wrong_in_the_right_units() {
        let reason = |r: Result<u64>| match r {
            Err(PfcError::Param { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(parse_count("batch", "-5")), "must not be negative");
        assert_eq!(
            reason(parse_size("reserved", "-1G")),
            "must not be negative"
        );
        // a count's error shows counts, a size's shows sizes
        let count = reason(parse_count("classes", "100T"));
        assert!(count.contains("29M") && !count.contains("GiB"), "{count}");
        let size = reason(parse_size("gpu_memory", "1.2.3G"));
        assert!(size.contains("32GiB") && !size.contains("29M"), "{size}");
        assert!(
            parse_size("gpu_memory", "16EiB").is_err(),
            "2^64 does not fit"
        );
    }

    #[test]
    fn bad_sizes_are_typed_errors_naming_the_parameter() {
        for bad in [
            "",
            "GiB",
            "1.2.3G",
            "-1G",
            "12XB",
            "1.0000001K",
            "0.3B",
            "99999999999T",
            "1e9",
        ] {
            match parse_size("gpu_memory", bad) {
                Err(PfcError::Param { name, .. }) => assert_eq!(name, "gpu_memory", "{bad}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn class_counts() {
        let p = |s| parse_count("classes", s).unwrap();
        assert_eq!(p("29M"), 29_000_000);
        assert_eq!(p("29m"), 29_000_000);
        assert_eq!(p("1.5B"), 1_500_000_000);
        assert_eq!(p("1.1M"), 1_100_000);
        assert_eq!(p("125K"), 125_000);
        assert_eq!(p("100000"), 100_000);
        assert_eq!(p("100_000"), 100_000);
        assert_eq!(p("0.000001M"), 1);
    }

    #[test]
    fn bad_counts() {
        for bad in [
            "",
            "M",
            "1.5",
            "0.0000001M",
            "12G",
            "-5",
            "x",
            "99999999999999B",
        ] {
            assert!(
                matches!(
                    parse_count("classes", bad),
                    Err(PfcError::Param {
                        name: "classes",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn counts_scale_to_the_largest_unit_with_four_digits_cut_not_rounded() {
        let cases: [(u64, &str); 18] = [
            (0, "0"),
            (999, "999"),
            (1_000, "1K"),
            (1_234, "1.234K"),
            (12_345, "12.34K"),
            (100_001, "100K"),
            (125_000, "125K"),
            (999_999, "999.9K"),
            (2_500_000, "2.5M"),
            (29_000_000, "29M"),
            (55_812_928, "55.81M"),
            // a review found "102465.8K": the count had a decimal in K but not in M
            (102_465_800, "102.4M"),
            (584_286_075, "584.2M"),
            (1_500_000_000, "1.5B"),
            (54_600_000_000, "54.6B"),
            (1_234_567_890_123, "1234B"),
            (u64::MAX, "18446744073B"),
            (1_999_999_999, "1.999B"),
        ];
        for (count, text) in cases {
            assert_eq!(format_count(count), text, "{count}");
            // what is shown parses, and is never more than the count
            let back = parse_count("classes", text).unwrap();
            assert!(back <= count, "{count}: {text} is {back}");
        }
        // exact counts of up to four significant digits round-trip
        for c in [
            1u64,
            999,
            125_000,
            29_000_000,
            1_500_000_000,
            2_500_000,
            1_234,
        ] {
            assert_eq!(parse_count("classes", &format_count(c)).unwrap(), c);
        }
    }

    #[test]
    fn byte_sizes_in_binary_units() {
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.00 KiB");
        assert_eq!(format_bytes(32 << 30), "32.0 GiB");
        assert_eq!(format_bytes(300 << 20), "300 MiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }
}

//! Human sizes: `4096`, `64K`, `64KiB`, `1G`, `1.5M` (binary multiples; `KB`/`MB` mean the same).

use crate::error::StoreError;

/// Parse a size such as `4096`, `64K`, `2MiB` or `1G` (all multiples are powers of 1024).
///
/// ```
/// assert_eq!(memsync_core::size::parse_size("64K").unwrap(), 65536);
/// assert_eq!(memsync_core::size::parse_size("1GiB").unwrap(), 1 << 30);
/// assert!(memsync_core::size::parse_size("12Q").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, StoreError> {
    let bad = |why: &str| StoreError::Config(format!("bad size {s:?}: {why}"));
    let t = s.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        _ => return Err(bad("unknown unit (use K, M, G, T or P)")),
    };
    if num.is_empty() {
        return Err(bad("no number"));
    }
    if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') || frac.is_empty() || frac.len() > 6 {
            return Err(bad("malformed fraction"));
        }
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad("too large"))?
        };
        let frac_v: u64 = frac.parse().map_err(|_| bad("malformed fraction"))?;
        let scale = 10u64.pow(frac.len() as u32);
        let whole = int.checked_mul(mult).ok_or_else(|| bad("too large"))?;
        let part = (u128::from(frac_v) * u128::from(mult) / u128::from(scale)) as u64;
        whole.checked_add(part).ok_or_else(|| bad("too large"))
    } else {
        let n: u64 = num.parse().map_err(|_| bad("too large"))?;
        n.checked_mul(mult).ok_or_else(|| bad("too large"))
    }
}

/// Format a byte count with a binary unit, e.g. `1.0 GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("16EiB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("20000000P").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("1..2").is_err());
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(format_size(12), "12 B");
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn roundtrip_plain(n in 0u64..u64::MAX) {
            prop_assert_eq!(parse_size(&n.to_string()).unwrap(), n);
        }
    }
}

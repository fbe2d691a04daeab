//! Human sizes: `4096`, `64K`, `64KiB`, `1G`, `1.5M` (binary multiples; `KB`/`MB` mean the same).

use std::time::Duration;

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

/// Longest duration accepted anywhere (a timeout, an interval, an emulated RTT): one day.
pub const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// Parse a duration such as `500us`, `10ms`, `1.5s`, `2m`, `1h`; a plain number is seconds.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(memsync_core::size::parse_duration("10ms").unwrap(), Duration::from_millis(10));
/// assert_eq!(memsync_core::size::parse_duration("5").unwrap(), Duration::from_secs(5));
/// assert!(memsync_core::size::parse_duration("-1s").is_err());
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, StoreError> {
    let bad = |why: &str| StoreError::Config(format!("bad duration {s:?}: {why}"));
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(bad(
                "unknown unit (use ns, us, ms, s, m or h; e.g. 10s, 500ms)",
            ));
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| bad("not a number (e.g. 10s, 500ms)"))?;
    let secs = v * scale;
    if !secs.is_finite() || secs > MAX_DURATION.as_secs_f64() {
        return Err(bad("longer than a day"));
    }
    Ok(Duration::from_secs_f64(secs))
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
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("0ms").unwrap(), Duration::ZERO);
        for bad in ["", "x", "-1s", "1.2.3s", "10parsecs", "2d", "25h", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_size(&s);
            let _ = parse_duration(&s);
        }

        #[test]
        fn roundtrip_plain(n in 0u64..u64::MAX) {
            prop_assert_eq!(parse_size(&n.to_string()).unwrap(), n);
        }
    }
}

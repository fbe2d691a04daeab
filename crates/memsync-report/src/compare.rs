//! `memsync bench compare`: an A/B of two builds. Each side is the `--json` output of one or more
//! rounds of the same suites (`scripts/ab.sh` runs the two binaries in alternation, so a load
//! change on the machine falls on both). A measurement is matched by suite, case, subject and
//! metric; the side's figure is the median of its rounds' medians, and the verdict says whether
//! the new build is slower *beyond noise*: worse by more than [`TOLERANCE`] and worse in every
//! round than the base's worst round, so that one noisy round cannot make a verdict.
//!
//! Which way is better comes from the unit: rates (`GB/s`, `MB/s`, `ops/s`) are better higher,
//! times (`us`, `ms`, `s`) lower. Same-run ratios and published figures are not compared (they
//! are derived or quoted, not measured), nor is a unit with no known direction.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::Record;

/// A relative difference smaller than this is never a verdict, whatever the spread says.
pub const TOLERANCE: f64 = 0.05;

/// Whether a larger figure is better, from the unit; `None` when the unit does not say.
pub fn higher_is_better(unit: &str) -> Option<bool> {
    match unit {
        "GB/s" | "MB/s" | "ops/s" | "IOPS" => Some(true),
        "ns" | "us" | "µs" | "ms" | "s" | "CPU-s/GiB" => Some(false),
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Better beyond noise.
    Faster,
    /// Within noise.
    Same,
    /// Worse beyond noise.
    Slower,
}

/// One measurement of both builds.
#[derive(Clone, Debug)]
pub struct Row {
    pub suite: String,
    pub case: String,
    pub subject: String,
    pub metric: String,
    pub unit: String,
    /// Medians of the rounds' medians.
    pub base: f64,
    pub new: f64,
    /// new / base for rates, base / new for times: above 1 the new build is better.
    pub speed: f64,
    pub verdict: Verdict,
    /// Rounds each side contributed.
    pub rounds: (usize, usize),
}

type Key = (String, String, String, String, String);

fn key(r: &Record) -> Key {
    (
        r.suite.clone(),
        r.case.clone(),
        r.subject.clone(),
        r.metric.clone(),
        r.unit.clone(),
    )
}

fn group(records: &[Record]) -> BTreeMap<Key, Vec<f64>> {
    let mut m: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    for r in records {
        if r.is_ratio() || r.is_published() || !r.value.is_finite() {
            continue;
        }
        if higher_is_better(&r.unit).is_none() {
            continue;
        }
        m.entry(key(r)).or_default().push(r.value);
    }
    m
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Compare every measurement both sides have, in suite/case order. Measurements only one side
/// has are returned by name in the second list (a renamed case must not pass unnoticed).
pub fn compare(base: &[Record], new: &[Record]) -> (Vec<Row>, Vec<String>) {
    let b = group(base);
    let n = group(new);
    let mut rows = Vec::new();
    let mut unmatched = Vec::new();
    for (k, bv) in &b {
        let Some(nv) = n.get(k) else {
            unmatched.push(format!("base only: {} {} {} {}", k.0, k.1, k.2, k.3));
            continue;
        };
        let up = higher_is_better(&k.4).unwrap_or(true);
        let (mut bv, mut nv) = (bv.clone(), nv.clone());
        let (bm, nm) = (median(&mut bv), median(&mut nv));
        // Both sorted now: [0] is the lowest round, last the highest.
        let (b_lo, b_hi) = (bv[0], bv[bv.len() - 1]);
        let (n_lo, n_hi) = (nv[0], nv[nv.len() - 1]);
        let speed = if up { nm / bm } else { bm / nm };
        let worse = if up { n_hi < b_lo } else { n_lo > b_hi };
        let better = if up { n_lo > b_hi } else { n_hi < b_lo };
        let verdict = if speed < 1.0 - TOLERANCE && worse {
            Verdict::Slower
        } else if speed > 1.0 + TOLERANCE && better {
            Verdict::Faster
        } else {
            Verdict::Same
        };
        rows.push(Row {
            suite: k.0.clone(),
            case: k.1.clone(),
            subject: k.2.clone(),
            metric: k.3.clone(),
            unit: k.4.clone(),
            base: bm,
            new: nm,
            speed,
            verdict,
            rounds: (bv.len(), nv.len()),
        });
    }
    for k in n.keys() {
        if !b.contains_key(k) {
            unmatched.push(format!("new only: {} {} {} {}", k.0, k.1, k.2, k.3));
        }
    }
    (rows, unmatched)
}

/// The rows as a fixed-width table with a summary line at the end.
pub fn render(rows: &[Row], unmatched: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<30} {:<22} {:<14} {:>11} {:>11} {:<5} {:>6}  verdict",
        "suite", "case", "subject", "metric", "base", "new", "unit", "speed"
    );
    for r in rows {
        let v = match r.verdict {
            Verdict::Faster => "faster",
            Verdict::Same => "same",
            Verdict::Slower => "SLOWER",
        };
        let _ = writeln!(
            s,
            "{:<8} {:<30} {:<22} {:<14} {:>11.3} {:>11.3} {:<5} {:>5.2}x  {v}",
            r.suite, r.case, r.subject, r.metric, r.base, r.new, r.unit, r.speed
        );
    }
    for u in unmatched {
        let _ = writeln!(s, "{u}");
    }
    let slower = rows.iter().filter(|r| r.verdict == Verdict::Slower).count();
    let faster = rows.iter().filter(|r| r.verdict == Verdict::Faster).count();
    let mut speeds: Vec<f64> = rows.iter().map(|r| r.speed).collect();
    let med = if speeds.is_empty() {
        f64::NAN
    } else {
        median(&mut speeds)
    };
    let _ = writeln!(
        s,
        "{} measurements: {slower} slower beyond noise, {faster} faster, median speed {med:.2}x \
         (above 1: the new build is better)",
        rows.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(case: &str, unit: &str, value: f64) -> Record {
        Record {
            suite: "lazy".into(),
            case: case.into(),
            subject: "memsync".into(),
            metric: "m".into(),
            value,
            unit: unit.into(),
            runs: 3,
            min: value,
            max: value,
        }
    }

    #[test]
    fn direction_follows_the_unit() {
        let base = [rec("r", "GB/s", 2.0), rec("t", "us", 10.0)];
        let new = [rec("r", "GB/s", 1.0), rec("t", "us", 5.0)];
        let (rows, un) = compare(&base, &new);
        assert!(un.is_empty());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].case, "r");
        assert!((rows[0].speed - 0.5).abs() < 1e-9);
        assert_eq!(rows[0].verdict, Verdict::Slower);
        assert!((rows[1].speed - 2.0).abs() < 1e-9);
        assert_eq!(rows[1].verdict, Verdict::Faster);
    }

    #[test]
    fn overlapping_rounds_are_noise() {
        // The new build's median is 20% lower, but one of its rounds beats the base's worst.
        let base = [rec("r", "GB/s", 1.0), rec("r", "GB/s", 1.1)];
        let new = [rec("r", "GB/s", 0.7), rec("r", "GB/s", 1.05)];
        let (rows, _) = compare(&base, &new);
        assert_eq!(rows[0].rounds, (2, 2));
        assert_eq!(rows[0].verdict, Verdict::Same);
        // Every round worse than the base's worst: slower.
        let new = [rec("r", "GB/s", 0.7), rec("r", "GB/s", 0.8)];
        assert_eq!(compare(&base, &new).0[0].verdict, Verdict::Slower);
        // A difference under the tolerance is never a verdict, even in every round.
        let base = [rec("r", "GB/s", 1.0), rec("r", "GB/s", 1.02)];
        let new = [rec("r", "GB/s", 0.98), rec("r", "GB/s", 0.99)];
        assert_eq!(compare(&base, &new).0[0].verdict, Verdict::Same);
    }

    #[test]
    fn ratios_published_and_unknown_units_are_left_out_and_renames_reported() {
        let mut ratio = rec("r", "x", 1.0);
        ratio.metric = "ratio".into();
        let mut published = rec("p", "GB/s", 2.4);
        published.runs = 0;
        let base = [
            ratio.clone(),
            published.clone(),
            rec("u", "msgs", 3.0),
            rec("old", "s", 1.0),
        ];
        let new = [
            ratio,
            published,
            rec("u", "msgs", 3.0),
            rec("renamed", "s", 1.0),
        ];
        let (rows, un) = compare(&base, &new);
        assert!(rows.is_empty(), "{rows:?}");
        assert_eq!(
            un,
            vec![
                "base only: lazy old memsync m".to_owned(),
                "new only: lazy renamed memsync m".to_owned()
            ]
        );
        let text = render(&rows, &un);
        assert!(text.contains("0 measurements: 0 slower"), "{text}");
    }

    #[test]
    fn nan_values_are_skipped() {
        let base = [rec("r", "GB/s", f64::NAN), rec("r", "GB/s", 1.0)];
        let new = [rec("r", "GB/s", 1.0)];
        let (rows, _) = compare(&base, &new);
        assert_eq!(rows[0].rounds, (1, 1));
        assert_eq!(rows[0].verdict, Verdict::Same);
    }
}

//! Which plots the report draws, from the figures a run has: each function looks for the cases
//! of one suite and returns nothing when the run lacks them (a failed or changed suite costs a
//! plot, never the report).

use std::collections::BTreeMap;

use crate::results::{Machine, Record};
use crate::svg::{Bar, Body, Chart, Series, Style};

/// One plot of the report.
#[derive(Clone, Debug)]
pub struct Plot {
    /// The suite whose section shows it.
    pub suite: String,
    /// The SVG's file name in the report directory.
    pub file: String,
    pub chart: Chart,
    /// Markdown under the plot: what to read from it, what it leaves out.
    pub caption: String,
}

/// Every plot the records allow.
pub fn all(records: &[Record], machine: &Machine) -> Vec<Plot> {
    let sub = machine.one_line();
    let mut out = Vec::new();
    out.extend(mount_rtt(records, &sub));
    out.extend(latency_summaries(records, &sub));
    out.extend(nbd(records, &sub));
    out.extend(migrate(records, &sub));
    out.extend(stores(records, &sub));
    out.extend(sync(records, &sub));
    out
}

fn measured<'a>(records: &'a [Record], suite: &'a str) -> impl Iterator<Item = &'a Record> {
    records
        .iter()
        .filter(move |r| r.suite == suite && !r.is_ratio() && !r.is_published())
}

fn range(r: &Record) -> Option<(f64, f64)> {
    (r.runs > 1 && r.min.is_finite() && r.max.is_finite()).then_some((r.min, r.max))
}

fn bar(r: &Record) -> Bar {
    Bar {
        value: r.value,
        range: range(r),
    }
}

/// A grouped bar chart from (category, group, record) triples, categories and groups in first
/// appearance order.
fn bars<'a>(items: impl IntoIterator<Item = (String, String, &'a Record)>) -> Body {
    let mut categories: Vec<String> = Vec::new();
    let mut groups: Vec<(String, BTreeMap<usize, Bar>)> = Vec::new();
    for (c, g, r) in items {
        let ci = categories.iter().position(|x| *x == c).unwrap_or_else(|| {
            categories.push(c);
            categories.len() - 1
        });
        let gi = groups.iter().position(|x| x.0 == g).unwrap_or_else(|| {
            groups.push((g, BTreeMap::new()));
            groups.len() - 1
        });
        groups[gi].1.insert(ci, bar(r));
    }
    let n = categories.len();
    Body::Bars {
        categories,
        groups: groups
            .into_iter()
            .map(|(g, m)| (g, (0..n).map(|i| m.get(&i).copied()).collect()))
            .collect(),
    }
}

fn body_is_empty(b: &Body) -> bool {
    match b {
        Body::Lines(s) => s.iter().all(|s| s.points.is_empty()),
        Body::Bars { categories, .. } => categories.is_empty(),
    }
}

fn plot(suite: &str, file: &str, chart: Chart, caption: &str) -> Option<Plot> {
    (!body_is_empty(&chart.body)).then(|| Plot {
        suite: suite.to_owned(),
        file: file.to_owned(),
        chart,
        caption: caption.to_owned(),
    })
}

/// The predecessor's managed mount by RTT, as its thesis published it (see
/// `../shared/ANCHORS.md`): 2.4 GB/s at RTT 0, then with 4096 workers ~1.0 at 10 ms, ~0.62 at
/// 20 ms, ~0.35 at 40 ms; with 16384 workers 1.13 GB/s at 30 ms.
const R3MAP_MANAGED_4096: &[(f64, f64)] = &[(0.0, 2.4), (10.0, 1.0), (20.0, 0.62), (40.0, 0.35)];
const R3MAP_MANAGED_16384: &[(f64, f64)] = &[(30.0, 1.13)];

/// `seq-read rtt=10ms` → 10.
fn rtt_of(case: &str) -> Option<f64> {
    let rest = case.split("rtt=").nth(1)?;
    let ms = rest.split("ms").next()?;
    ms.parse().ok()
}

fn mount_rtt(records: &[Record], sub: &str) -> Option<Plot> {
    let mut series: Vec<Series> = Vec::new();
    for r in measured(records, "mount") {
        if !r.case.starts_with("seq-read rtt=") || r.metric != "throughput" {
            continue;
        }
        let Some(rtt) = rtt_of(&r.case) else { continue };
        // The direct (unproxied) variant of a case is another subject, not the same line.
        let name = match r.case.split_once("ms ") {
            Some((_, variant)) => format!("{} ({variant})", r.subject),
            None => r.subject.clone(),
        };
        let i = series
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| {
                series.push(Series::new(name, Style::Measured));
                series.len() - 1
            });
        let s = std::mem::replace(&mut series[i], Series::new("", Style::Measured));
        series[i] = s.point(rtt, r.value, range(r));
    }
    if series.is_empty() {
        return None;
    }
    let mut p = Series::new("r3map managed, 4096 workers (published)", Style::Published);
    for &(x, y) in R3MAP_MANAGED_4096 {
        p = p.point(x, y, None);
    }
    series.push(p);
    let mut p = Series::new("r3map managed, 16384 workers (published)", Style::Published);
    for &(x, y) in R3MAP_MANAGED_16384 {
        p = p.point(x, y, None);
    }
    series.push(p);
    plot(
        "mount",
        "mount-throughput-rtt.svg",
        Chart {
            title: "Managed mount: sequential read throughput against RTT".into(),
            subtitle: sub.into(),
            x_label: "round-trip time added by the delay proxy (ms)".into(),
            y_label: "throughput (GB/s)".into(),
            log_y: false,
            body: Body::Lines(series),
            notes: vec![
                "Solid: measured in this run (median; whiskers min–max).".into(),
                "Dashed: r3map's thesis (laptop, RTT as a sleep in the backend, no data \
                 returned): quoted, not measured here."
                    .into(),
            ],
        },
        "Solid lines are this run's medians (whiskers: lowest and highest run); `nbdcopy` reads \
         the same export through the same proxy, `fuse-local-file` is the FUSE ceiling of this \
         machine (no network, drawn at every RTT it was measured at). The dashed lines are the \
         predecessor's published managed-mount curve (its thesis; a laptop, RTT emulated by a \
         sleep in a backend that returned no data): quoted for orientation, not comparable \
         like for like, and never turned into a ratio.",
    )
}

/// The latency metrics of a fault or request: `p50`/`p99`, `fault-p50`/`fault-p99`, ...
fn percentile(metric: &str) -> Option<&'static str> {
    match metric.rsplit('-').next()? {
        "p50" => Some("p50"),
        "p99" => Some("p99"),
        _ => None,
    }
}

/// Fault latency distributions as the suites record them: the p50 and p99 of each subject
/// (the suites keep no full histogram), one chart per suite.
fn latency_summaries(records: &[Record], sub: &str) -> Vec<Plot> {
    let mut out = Vec::new();
    for (suite, title) in [
        (
            "lazy",
            "Lazy region: random 4 KiB first-touch fault latency, p50 and p99",
        ),
        (
            "vmm",
            "VM snapshot restore: random 4 KiB fault latency, p50 and p99",
        ),
        ("dsm", "DSM: fault latency per manager scheme, p50 and p99"),
        (
            "migrate",
            "Post-copy migration: fault latency at the destination, p50",
        ),
    ] {
        let rs: Vec<&Record> = measured(records, suite)
            .filter(|r| percentile(&r.metric).is_some() && r.value.is_finite() && r.value > 0.0)
            .collect();
        let cases: Vec<&str> = {
            let mut v: Vec<&str> = rs.iter().map(|r| r.case.as_str()).collect();
            v.dedup();
            v
        };
        let one_case = cases.len() == 1;
        let items = rs.iter().map(|r| {
            let c = if one_case {
                r.subject.clone()
            } else if r.subject == "memsync" {
                r.case.clone()
            } else {
                format!("{} {}", r.case, r.subject)
            };
            (c, percentile(&r.metric).unwrap_or("?").to_owned(), *r)
        });
        let chart = Chart {
            title: title.into(),
            subtitle: sub.into(),
            x_label: if one_case {
                format!("subject (case {})", cases[0])
            } else {
                "case and subject".into()
            },
            y_label: "latency (µs, log scale)".into(),
            log_y: true,
            body: bars(items),
            notes: vec![
                "Bars: median over the runs of each run's percentile; whiskers: lowest and \
                 highest run."
                    .into(),
            ],
        };
        out.extend(plot(
            suite,
            &format!("{suite}-fault-latency.svg"),
            chart,
            "Each run records the p50 and p99 of its faults; the bar is the median of those \
             over the runs and the whisker their lowest and highest. The suites keep \
             percentiles, not whole histograms, so this is the distribution's summary.",
        ));
    }
    out
}

fn nbd(records: &[Record], sub: &str) -> Vec<Plot> {
    let thr = measured(records, "nbd")
        .filter(|r| r.unit == "GB/s")
        .map(|r| (r.case.clone(), r.subject.clone(), r));
    let lat = measured(records, "nbd")
        .filter(|r| r.unit == "us")
        .map(|r| (r.case.clone(), r.subject.clone(), r));
    let mut out = Vec::new();
    out.extend(plot(
        "nbd",
        "nbd-throughput.svg",
        Chart {
            title: "NBD: throughput of memsync and its peers, driven by nbdcopy".into(),
            subtitle: sub.into(),
            x_label: "case (transport)".into(),
            y_label: "throughput (GB/s)".into(),
            log_y: false,
            body: bars(thr),
            notes: vec!["Same run, subjects in alternation; whiskers min–max.".into()],
        },
        "`write`/`read`: nbdcopy against `memsync serve` and the peer server; `client-read`: \
         the memsync client against nbdcopy reading the same peer export, both timed as whole \
         commands.",
    ));
    out.extend(plot(
        "nbd",
        "nbd-latency.svg",
        Chart {
            title: "NBD: one 4 KiB request in flight, µs per request".into(),
            subtitle: sub.into(),
            x_label: "case (transport)".into(),
            y_label: "latency (µs)".into(),
            log_y: false,
            body: bars(lat),
            notes: vec!["Lower is better.".into()],
        },
        "",
    ));
    out
}

/// `precopy-50MBps-rtt30ms` → ("precopy", "50 MB/s, 30 ms RTT").
fn migrate_case(case: &str) -> Option<(String, String)> {
    let (mode, rest) = case.split_once('-')?;
    if !matches!(mode, "precopy" | "postcopy" | "hybrid") {
        return None;
    }
    let mut parts = rest.split('-');
    let rate = parts.next()?.strip_suffix("MBps")?;
    let mut label = format!("{rate} MB/s");
    for p in parts {
        match p.strip_prefix("rtt") {
            Some(r) => label.push_str(&format!(", {} RTT", r.replace("ms", " ms"))),
            None => label.push_str(&format!(", {p}")),
        }
    }
    Some((mode.to_owned(), label))
}

fn migrate(records: &[Record], sub: &str) -> Vec<Plot> {
    let mut out = Vec::new();
    for (metric, file, title, y, log) in [
        (
            "downtime",
            "migrate-downtime.svg",
            "Live migration of a store under a writer: downtime per mode and dirty rate",
            "downtime (ms, log scale)",
            true,
        ),
        (
            "bytes-sent",
            "migrate-bytes-sent.svg",
            "Live migration: bytes sent per region byte, per mode and dirty rate",
            "bytes sent / region size",
            false,
        ),
    ] {
        let items = measured(records, "migrate")
            .filter(|r| r.metric == metric && r.subject == "memsync")
            .filter_map(|r| {
                let (mode, label) = migrate_case(&r.case)?;
                Some((label, mode, r))
            });
        out.extend(plot(
            "migrate",
            file,
            Chart {
                title: title.into(),
                subtitle: sub.into(),
                x_label: "writer's dirty rate (random 4 KiB pages), link".into(),
                y_label: y.into(),
                log_y: log,
                body: bars(items),
                notes: vec!["Store-level migration (memsync migrate); whiskers min–max.".into()],
            },
            "",
        ));
    }
    out
}

fn stores(records: &[Record], sub: &str) -> Vec<Plot> {
    let mut out = Vec::new();
    let items = measured(records, "stores")
        .filter(|r| r.unit == "GB/s" && r.case.starts_with("seq_read_direct_"))
        .map(|r| {
            let c = r
                .case
                .trim_start_matches("seq_read_direct_")
                .replace('_', " ");
            let g = if r.subject.starts_with("memsync") {
                "memsync".to_owned()
            } else {
                r.subject.clone()
            };
            (c, g, r)
        });
    out.extend(plot(
        "stores",
        "stores-throughput.svg",
        Chart {
            title: "Stores: sequential read throughput per store and chunk size".into(),
            subtitle: sub.into(),
            x_label: "store and chunk size".into(),
            y_label: "throughput (GB/s)".into(),
            log_y: false,
            body: bars(items),
            notes: vec!["Each store beside its third-party peer, same run.".into()],
        },
        "",
    ));
    let items = measured(records, "store")
        .filter(|r| r.unit == "GB/s")
        .map(|r| (r.case.clone(), r.subject.clone(), r));
    out.extend(plot(
        "store",
        "store-throughput.svg",
        Chart {
            title: "Local stores: throughput per operation against memcpy/pread".into(),
            subtitle: sub.into(),
            x_label: "case".into(),
            y_label: "throughput (GB/s)".into(),
            log_y: false,
            body: bars(items),
            notes: vec!["Same run, subjects in alternation; whiskers min–max.".into()],
        },
        "",
    ));
    out
}

fn sync(records: &[Record], sub: &str) -> Vec<Plot> {
    let items = measured(records, "sync")
        .filter(|r| r.unit == "s")
        .map(|r| (r.case.clone(), r.subject.clone(), r));
    plot(
        "sync",
        "sync-time.svg",
        Chart {
            title: "Delta sync: time to sync against rsync".into(),
            subtitle: sub.into(),
            x_label: "case".into(),
            y_label: "time (s, log scale)".into(),
            log_y: true,
            body: bars(items),
            notes: vec!["Lower is better; same run.".into()],
        },
        "",
    )
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names() {
        assert_eq!(rtt_of("seq-read rtt=30ms"), Some(30.0));
        assert_eq!(rtt_of("seq-read rtt=0ms direct"), Some(0.0));
        assert_eq!(rtt_of("proxy-cost"), None);
        assert_eq!(
            migrate_case("precopy-50MBps-rtt30ms"),
            Some(("precopy".into(), "50 MB/s, 30 ms RTT".into()))
        );
        assert_eq!(migrate_case("region-tracking"), None);
        assert_eq!(percentile("fault-p99"), Some("p99"));
        assert_eq!(percentile("throughput"), None);
    }
}

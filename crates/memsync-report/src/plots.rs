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

const PERCENTILE_CAPTION: &str = "Each run records the p50 and p99 of its faults; a bar is the \
    median of those over the runs and its whisker their lowest and highest. The suites keep \
    percentiles, not whole histograms, so this is the distribution's summary.";

fn latency_chart(title: String, sub: &str, x_label: &str, body: Body, notes: &[&str]) -> Chart {
    Chart {
        title,
        subtitle: sub.into(),
        x_label: x_label.into(),
        y_label: "latency (µs, log scale)".into(),
        log_y: true,
        body,
        notes: notes.iter().map(|n| (*n).to_owned()).collect(),
    }
}

/// Fault latency distributions as the suites record them: the p50 and p99 of each subject.
fn latency_summaries(records: &[Record], sub: &str) -> Vec<Plot> {
    let mut out = Vec::new();
    let pct = |suite: &'static str| {
        measured(records, suite)
            .filter(|r| percentile(&r.metric).is_some() && r.value.is_finite() && r.value > 0.0)
    };
    // lazy: one chart per case, its subjects side by side.
    let mut cases: Vec<&str> = pct("lazy").map(|r| r.case.as_str()).collect();
    cases.dedup();
    for case in cases {
        let items = pct("lazy").filter(|r| r.case == case).map(|r| {
            (
                r.subject.clone(),
                percentile(&r.metric).unwrap_or("?").into(),
                r,
            )
        });
        out.extend(plot(
            "lazy",
            &format!("lazy-{case}.svg"),
            latency_chart(
                format!("Lazy region: {case} fault latency, p50 and p99"),
                sub,
                "where the fault is served (subject)",
                bars(items),
                &["Lower is better; whiskers: lowest and highest run."],
            ),
            PERCENTILE_CAPTION,
        ));
    }
    let items = pct("vmm").map(|r| {
        (
            format!("{} ({})", r.subject, r.case),
            percentile(&r.metric).unwrap_or("?").into(),
            r,
        )
    });
    out.extend(plot(
        "vmm",
        "vmm-fault-latency.svg",
        latency_chart(
            "VM snapshot restore: random 4 KiB fault latency, p50 and p99".into(),
            sub,
            "handler (case)",
            bars(items),
            &["minimal-copy: one UFFDIO_COPY per 4 KiB fault, the upstream example's design."],
        ),
        PERCENTILE_CAPTION,
    ));
    // dsm: a chart per percentile, the schemes side by side per case.
    for p in ["p50", "p99"] {
        let items = pct("dsm")
            .filter(|r| r.metric == p)
            .map(|r| (r.case.replace("-copies", " copies"), r.subject.clone(), r));
        out.extend(plot(
            "dsm",
            &format!("dsm-fault-{p}.svg"),
            latency_chart(
                format!("DSM: fault latency {p} per manager scheme"),
                sub,
                "fault kind (-netns: owner and faulting node in two network namespaces)",
                bars(items),
                &["Lower is better; whiskers: lowest and highest run."],
            ),
            if p == "p50" { PERCENTILE_CAPTION } else { "" },
        ));
    }
    // migrate: post-copy faults at the destination, QEMU's published figure beside.
    let items = records
        .iter()
        .filter(|r| r.suite == "migrate" && r.metric == "fault-p50" && !r.is_ratio())
        .filter(|r| r.value.is_finite() && r.value > 0.0)
        .map(|r| {
            let g = if r.is_published() {
                r.subject.clone()
            } else {
                "memsync".to_owned()
            };
            (r.case.clone(), g, r)
        });
    out.extend(plot(
        "migrate",
        "migrate-fault-p50.svg",
        latency_chart(
            "Post-copy migration: fault latency p50 at the destination".into(),
            sub,
            "case (mode, dirty rate, link)",
            bars(items),
            &[
                "Dashed: QEMU's published figure (10 GbE), quoted, not measured here.",
                "At 30 ms RTT a fault costs a round trip.",
            ],
        ),
        "",
    ));
    out
}

/// A case as a category label: `seq_read_direct_dir_chunk1M` → `dir, chunk 1M` (the chart's
/// title says what is read).
fn case_label(case: &str) -> String {
    let c = case.strip_prefix("seq_read_direct_").unwrap_or(case);
    match c.split_once("_chunk") {
        Some((store, chunk)) if !store.contains('_') => format!("{store}, chunk {chunk}"),
        _ => c.replace('_', " "),
    }
}

/// A chart of the figures of one unit in `suite` whose case passes `keep`: categories are the
/// cases, groups the subjects (renamed by `group`).
#[allow(clippy::too_many_arguments)]
fn by_case(
    records: &[Record],
    suite: &str,
    unit: &str,
    keep: &dyn Fn(&Record) -> bool,
    group: &dyn Fn(&Record) -> String,
    title: &str,
    sub: &str,
    y_label: &str,
    log_y: bool,
) -> Chart {
    let items = measured(records, suite)
        .filter(|r| r.unit == unit && keep(r))
        .map(|r| (case_label(&r.case), group(r), r));
    Chart {
        title: title.into(),
        subtitle: sub.into(),
        x_label: "case".into(),
        y_label: y_label.into(),
        log_y,
        body: bars(items),
        notes: vec!["Same run, subjects in alternation; whiskers: lowest and highest run.".into()],
    }
}

fn nbd(records: &[Record], sub: &str) -> Vec<Plot> {
    let subject = |r: &Record| r.subject.clone();
    let mut out = Vec::new();
    out.extend(plot(
        "nbd",
        "nbd-throughput.svg",
        by_case(
            records,
            "nbd",
            "GB/s",
            &|_| true,
            &subject,
            "NBD: throughput of memsync against nbdkit, qemu-nbd and nbdcopy",
            sub,
            "throughput (GB/s)",
            false,
        ),
        "`write`/`read`: nbdcopy against `memsync serve`, `nbdkit memory` and `qemu-nbd` \
         serving a file on tmpfs; `client-read`: the memsync client against nbdcopy reading the \
         same nbdkit export, both timed as whole commands.",
    ));
    out.extend(plot(
        "nbd",
        "nbd-latency.svg",
        by_case(
            records,
            "nbd",
            "us",
            &|_| true,
            &subject,
            "NBD: one 4 KiB request in flight, µs per request",
            sub,
            "latency (µs)",
            false,
        ),
        "",
    ));
    out
}

/// `precopy-50MBps-rtt30ms` → ("precopy", "50 MB/s, 30 ms RTT"); `region-` cases give the mode
/// `region precopy`. Other variants (`-1GbE-...`) are not on the dirty-rate axis: None.
fn migrate_case(case: &str) -> Option<(String, String)> {
    let (region, rest) = match case.strip_prefix("region-") {
        Some(r) => (true, r),
        None => (false, case),
    };
    let (mode, rest) = rest.split_once('-')?;
    if !matches!(mode, "precopy" | "postcopy" | "hybrid") {
        return None;
    }
    let mut parts = rest.split('-');
    let rate = parts.next()?.strip_suffix("MBps")?;
    let mut label = format!("{rate} MB/s");
    for p in parts {
        match p.strip_prefix("rtt") {
            Some(r) => label.push_str(&format!(", {} RTT", r.replace("ms", " ms"))),
            None if p == "netns" => label.push_str(", two netns"),
            None => return None,
        }
    }
    let mode = if region {
        format!("region {mode}")
    } else {
        mode.to_owned()
    };
    Some((mode, label))
}

fn migrate(records: &[Record], sub: &str) -> Vec<Plot> {
    let mut out = Vec::new();
    for region in [false, true] {
        let what = if region {
            "a memsync region"
        } else {
            "a store under a writer"
        };
        for (metric, name, y, log) in [
            ("downtime", "downtime", "downtime (ms, log scale)", true),
            (
                "bytes-sent",
                "bytes sent",
                "bytes sent / region size",
                false,
            ),
        ] {
            let items: Vec<(String, String, &Record)> = records
                .iter()
                .filter(|r| r.suite == "migrate" && r.metric == metric && !r.is_ratio())
                .filter_map(|r| {
                    if r.is_published() {
                        // Quoted beside the store case it belongs to, never in a ratio.
                        let (_, label) = migrate_case(&r.case)?;
                        return (!region).then(|| (label, r.subject.clone(), r));
                    }
                    let (mode, label) = migrate_case(&r.case)?;
                    (mode.starts_with("region ") == region).then_some((label, mode, r))
                })
                .collect();
            let mut notes = vec!["Whiskers: lowest and highest run.".to_owned()];
            if region {
                notes.push("Changes found by the engine's dirty tracker.".into());
            }
            if items.iter().any(|(_, _, r)| r.is_published()) {
                notes.push("Dashed: QEMU's published figure, quoted, not measured here.".into());
            }
            let file = format!(
                "migrate-{}{}.svg",
                if region { "region-" } else { "" },
                metric
            );
            out.extend(plot(
                "migrate",
                &file,
                Chart {
                    title: format!("Live migration of {what}: {name} per mode and dirty rate"),
                    subtitle: sub.into(),
                    x_label: "writer's dirty rate (random 4 KiB pages), link".into(),
                    y_label: y.into(),
                    log_y: log,
                    body: bars(items),
                    notes,
                },
                "",
            ));
        }
    }
    out
}

fn stores(records: &[Record], sub: &str) -> Vec<Plot> {
    let mut out = Vec::new();
    let memsync_or_peer = |r: &Record| {
        if r.subject.starts_with("memsync-")
            && !r.subject.contains("http-client")
            && !r.subject.contains("cache")
        {
            "memsync".to_owned()
        } else {
            r.subject.clone()
        }
    };
    out.extend(plot(
        "stores",
        "stores-throughput.svg",
        by_case(
            records,
            "stores",
            "GB/s",
            &|r| r.case.starts_with("seq_read_direct_"),
            &memsync_or_peer,
            "Stores: sequential read per store and chunk size, against each store's peer",
            sub,
            "throughput (GB/s)",
            false,
        ),
        "Direct reads with many requests in flight, each store beside a third-party client of the \
         same server in the same run: `pread` for `dir:`, `redis-benchmark` for Redis, boto3 and \
         memsync's bare HTTP client for S3 (s3s-fs on loopback).",
    ));
    // Through the cache layer of a managed mount, beside the predecessor's published managed
    // figure for the same kind of store (its backends returned no data).
    let items = records
        .iter()
        .filter(|r| r.suite == "stores" && !r.is_ratio())
        .filter_map(|r| {
            if r.is_published() && r.case.starts_with("seq_read_managed_") {
                let store = r.case.trim_start_matches("seq_read_managed_");
                let store = store.split('_').next().unwrap_or(store).to_owned();
                return Some((store, "r3map managed (published)".to_owned(), r));
            }
            let rest = r.case.strip_prefix("seq_read_cache_")?;
            let store = rest.split('_').next()?.to_owned();
            r.subject
                .contains("-cache")
                .then(|| (store, "memsync through the cache".to_owned(), r))
        });
    out.extend(plot(
        "stores",
        "stores-managed.svg",
        Chart {
            title: "Stores through a managed mount's cache, beside r3map's published figures"
                .into(),
            subtitle: sub.into(),
            x_label: "store".into(),
            y_label: "throughput (GB/s)".into(),
            log_y: false,
            body: bars(items),
            notes: vec![
                "Dashed: r3map's thesis (laptop; its backends returned no data), quoted; S3 \
                 there was MinIO, here s3s-fs."
                    .into(),
            ],
        },
        "",
    ));
    out.extend(plot(
        "store",
        "store-throughput.svg",
        by_case(
            records,
            "store",
            "GB/s",
            &|_| true,
            &|r| r.subject.clone(),
            "Local stores: sequential 1 MiB reads and writes against memcpy / pread / pwrite",
            sub,
            "throughput (GB/s)",
            false,
        ),
        "",
    ));
    out.extend(plot(
        "lazy",
        "lazy-seq-first-touch.svg",
        by_case(
            records,
            "lazy",
            "GB/s",
            &|_| true,
            &|r| r.subject.clone(),
            "Lazy region: sequential first touch against memcpy and the NBD client",
            sub,
            "throughput (GB/s of region)",
            false,
        ),
        "memcpy-fresh is a memcpy into never-touched memory (the region must allocate and zero \
         its pages too); from NBD the limits are the client's own reads.",
    ));
    out
}

fn sync(records: &[Record], sub: &str) -> Vec<Plot> {
    let mut out = Vec::new();
    out.extend(plot(
        "sync",
        "sync-time.svg",
        by_case(
            records,
            "sync",
            "s",
            &|r| r.metric == "time",
            &|r| r.subject.clone(),
            "Delta sync of a file against rsync: time",
            sub,
            "time (s, log scale)",
            true,
        ),
        "",
    ));
    out.extend(plot(
        "sync",
        "sync-bytes.svg",
        by_case(
            records,
            "sync",
            "MB",
            &|r| r.metric == "bytes",
            &|r| r.subject.clone(),
            "Delta sync of a file against rsync: bytes moved",
            sub,
            "MB moved (log scale)",
            true,
        ),
        "",
    ));
    out
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
        assert_eq!(
            migrate_case("region-postcopy-0MBps-netns"),
            Some(("region postcopy".into(), "0 MB/s, two netns".into()))
        );
        assert_eq!(migrate_case("precopy-0MBps-1GbE-text"), None);
        assert_eq!(percentile("fault-p99"), Some("p99"));
        assert_eq!(case_label("seq_read_direct_s3_chunk4M"), "s3, chunk 4M");
        assert_eq!(case_label("read tcp"), "read tcp");
        assert_eq!(percentile("throughput"), None);
    }
}

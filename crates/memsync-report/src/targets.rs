//! The targets the issues set for figures the suites measure, checked against a run: the report
//! says for each whether this run met it, missed it, or did not measure it.
//!
//! They live here, in one table, because the suites state them only in prose (their docs and
//! the issues) and print no target lines; a case pattern that no longer matches shows up in the
//! report as "not measured", not as a silent pass.

use crate::results::Record;

/// Which side of the bound is good.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub suite: &'static str,
    /// The case; `*` matches any run of characters, `?` any one.
    pub case: &'static str,
    pub subject: &'static str,
    pub metric: &'static str,
    pub bound: Bound,
    pub unit: &'static str,
    /// Where the target was set.
    pub source: &'static str,
}

const fn t(
    suite: &'static str,
    case: &'static str,
    subject: &'static str,
    metric: &'static str,
    bound: Bound,
    unit: &'static str,
    source: &'static str,
) -> Target {
    Target {
        suite,
        case,
        subject,
        metric,
        bound,
        unit,
        source,
    }
}

use Bound::{AtLeast, AtMost};

// One target a line: a table reads better than rustfmt's one field a line.
#[rustfmt::skip]
pub const TARGETS: &[Target] = &[
    t("nbd", "read *", "memsync/nbdkit", "ratio", AtLeast(1.1), "x", "issue 14"),
    t("nbd", "write *", "memsync/nbdkit", "ratio", AtLeast(1.1), "x", "issue 14"),
    t("nbd", "client-read*", "memsync-client/nbdcopy", "ratio", AtLeast(1.0), "x", "issue 14"),
    t("lazy", "seq-first-touch*", "lazy-2M*/memcpy-?thr", "ratio", AtLeast(0.8), "x", "issue 14"),
    t("lazy", "rand-4k-first-touch", "lazy-default", "p50", AtMost(15.0), "us", "issue 14"),
    t("mount", "seq-read rtt=0ms direct", "lazy-region", "throughput", AtLeast(2.4), "GB/s", "issue 14"),
    t("mount", "seq-read rtt=30ms", "lazy-region", "throughput", AtLeast(1.5), "GB/s", "issue 14"),
    t("mount", "seq-read rtt=0ms direct", "lazy-region-shm", "throughput", AtLeast(2.4), "GB/s", "issue 14"),
    t("mount", "seq-read rtt=30ms", "lazy-region-shm", "throughput", AtLeast(1.5), "GB/s", "issue 14"),
    t("mount", "seq-read rtt=*", "fuse/fuse-local-file", "ratio", AtLeast(0.9), "x", "issue 14"),
    t("mount", "mmap-write rtt=*", "fuse-mmap", "write-before-fsync", AtLeast(230.0), "MB/s", "issue 14"),
    t("mount", "proxy-cost", "nbdcopy-proxy/nbdcopy-direct", "ratio", AtLeast(0.9), "x", "issue 14"),
    t("migrate", "precopy-50MBps", "memsync", "downtime", AtMost(20.0), "ms", "issue 12"),
    t("migrate", "postcopy-50MBps", "memsync", "downtime", AtMost(5.0), "ms", "issue 12"),
    t("migrate", "*-50MBps", "memsync", "bytes-sent", AtMost(1.3), "x region", "issue 12"),
    t("migrate", "region-postcopy-0MBps-netns", "memsync", "fault-p50", AtMost(100.0), "us", "issue 12"),
    t("sync", "* 1%", "memsync/rsync*", "ratio", AtLeast(5.0), "x", "issue 13"),
    t("sync", "*", "memsync", "bytes/changed", AtMost(1.1), "x", "issue 13"),
    // An unchanged file costs at least one round trip to a peer, so the 20 ms can hold only
    // locally and at RTT 0.
    t("sync", "local 0%", "memsync", "time", AtMost(0.02), "s", "issue 13"),
    t("sync", "peer rtt=0ms 0%", "memsync", "time", AtMost(0.02), "s", "issue 13"),
    t("dsm", "read-fault-netns", "*", "p50", AtMost(60.0), "us", "issue 16"),
    t("dsm", "write-fault-1-copies-netns", "*", "p50", AtMost(100.0), "us", "issue 16"),
];

/// `pattern` with `*` as any run of characters and `?` as any one character.
pub fn glob(pattern: &str, s: &str) -> bool {
    if let Some((head, rest)) = pattern.split_once('?')
        && !head.contains('*')
    {
        let Some(s) = s.strip_prefix(head) else {
            return false;
        };
        let mut c = s.chars();
        return c.next().is_some() && glob(rest, c.as_str());
    }
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(s) = s.strip_prefix(head) else {
                return false;
            };
            (0..=s.len())
                .filter(|&i| s.is_char_boundary(i))
                .any(|i| glob(rest, &s[i..]))
        }
    }
}

impl Target {
    pub fn matches(&self, r: &Record) -> bool {
        r.suite == self.suite
            && glob(self.case, &r.case)
            && self.subject_matches(&r.subject)
            && r.metric == self.metric
            && !r.is_published()
    }

    fn subject_matches(&self, subject: &str) -> bool {
        // A ratio's subject is `a/b`, or `a/b metric` in a case with several metrics; a target
        // on `a/b` is about the throughput, whichever way the case names it.
        glob(self.subject, subject)
            || subject
                .strip_suffix(" throughput")
                .is_some_and(|s| glob(self.subject, s))
    }

    pub fn met(&self, value: f64) -> Option<bool> {
        if !value.is_finite() {
            return None;
        }
        Some(match self.bound {
            AtMost(b) => value <= b,
            AtLeast(b) => value >= b,
        })
    }

    /// `≤ 15 us`.
    pub fn describe(&self) -> String {
        let (op, b) = match self.bound {
            AtMost(b) => ("≤", b),
            AtLeast(b) => ("≥", b),
        };
        format!("{op} {b} {}", self.unit)
    }
}

/// One target checked against one measured figure.
#[derive(Debug)]
pub struct Check<'a> {
    pub target: &'a Target,
    pub record: Option<&'a Record>,
    /// None when not measured or not a finite figure.
    pub met: Option<bool>,
}

/// Every target of `suite` against the run's records: one check per matching record, or one
/// "not measured" check when none matches.
pub fn check<'a>(suite: &str, records: &'a [Record]) -> Vec<Check<'a>> {
    let mut out = Vec::new();
    for tg in TARGETS.iter().filter(|t| t.suite == suite) {
        let mut any = false;
        for r in records.iter().filter(|r| tg.matches(r)) {
            any = true;
            out.push(Check {
                target: tg,
                record: Some(r),
                met: tg.met(r.value),
            });
        }
        if !any {
            out.push(Check {
                target: tg,
                record: None,
                met: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("a*", "abc"));
        assert!(glob("*-50MBps", "precopy-50MBps"));
        assert!(!glob("*-50MBps", "precopy-50MBps-rtt30ms"));
        assert!(glob("seq-read rtt=*", "seq-read rtt=10ms"));
        assert!(glob("*1%*", "local 1%"));
        assert!(glob("µ*s", "µs"));
        assert!(!glob("abc", "ab"));
        assert!(glob("lazy-2M*/memcpy-?thr", "lazy-2M-pull/memcpy-2thr"));
        assert!(!glob("lazy-2M*/memcpy-?thr", "lazy-2M/memcpy-fresh-2thr"));
        assert!(!glob("a?", "a"));
    }

    #[test]
    fn a_ratio_target_reads_the_throughput_ratio_of_a_case_with_several_metrics() {
        let t = TARGETS
            .iter()
            .find(|t| t.suite == "mount" && t.subject == "fuse/fuse-local-file")
            .expect("the FUSE ceiling target");
        let r = |subject: &str| Record {
            suite: "mount".into(),
            case: "seq-read rtt=10ms".into(),
            subject: subject.into(),
            metric: "ratio".into(),
            value: 0.5,
            unit: "x".into(),
            runs: 3,
            min: 0.5,
            max: 0.5,
        };
        assert!(t.matches(&r("fuse/fuse-local-file")));
        assert!(t.matches(&r("fuse/fuse-local-file throughput")));
        assert!(!t.matches(&r("fuse/fuse-local-file cpu")));
    }

    fn rec(case: &str, subject: &str, metric: &str, value: f64) -> Record {
        Record {
            suite: "migrate".into(),
            case: case.into(),
            subject: subject.into(),
            metric: metric.into(),
            value,
            unit: "ms".into(),
            runs: 3,
            min: value,
            max: value,
        }
    }

    #[test]
    fn checks_say_met_missed_or_not_measured() {
        let rs = vec![
            rec("precopy-50MBps", "memsync", "downtime", 25.0),
            rec("postcopy-50MBps", "memsync", "downtime", 1.0),
            rec("postcopy-50MBps", "memsync", "bytes-sent", f64::NAN),
        ];
        let c = check("migrate", &rs);
        let find = |case: &str, metric: &str| {
            c.iter()
                .find(|c| c.target.case == case && c.target.metric == metric)
                .unwrap()
        };
        assert_eq!(find("precopy-50MBps", "downtime").met, Some(false));
        assert_eq!(find("postcopy-50MBps", "downtime").met, Some(true));
        assert_eq!(find("*-50MBps", "bytes-sent").met, None, "NaN is no figure");
        let nm = find("region-postcopy-0MBps-netns", "fault-p50");
        assert!(nm.record.is_none() && nm.met.is_none());
    }
}

//! Reading what `memsync bench all --out DIR` wrote: `results.jsonl` (one measurement a line,
//! the suites' `--json` format) and `machine.json`. Bad input is an error naming the file, the
//! line and what is wrong, never a panic.

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// One line of `results.jsonl`.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub suite: String,
    pub case: String,
    pub subject: String,
    pub metric: String,
    /// The median; NaN when the suite had no finite sample (JSON `null`).
    pub value: f64,
    pub unit: String,
    /// 0 for a published figure (quoted, not measured here).
    pub runs: u64,
    pub min: f64,
    pub max: f64,
}

impl Record {
    /// A ratio of two same-run subjects (`subject` is `a/b` or `a/b metric`).
    pub fn is_ratio(&self) -> bool {
        self.metric == "ratio"
    }

    /// A figure quoted from elsewhere: never measured here, never part of a ratio.
    pub fn is_published(&self) -> bool {
        self.runs == 0 && !self.is_ratio()
    }
}

/// Parse the lines of `results.jsonl` (`name` is the file, for errors). Blank lines are skipped.
pub fn parse_results(name: &str, text: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let r = parse_line(line).with_context(|| format!("{name} line {}", i + 1))?;
        out.push(r);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<Record> {
    let v: Value = serde_json::from_str(line).context("not a JSON object")?;
    let Some(o) = v.as_object() else {
        bail!("not a JSON object: {}", short(line))
    };
    let s = |k: &str| -> Result<String> {
        match o.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!("field {k:?} is not a string: {other}"),
            None => bail!("field {k:?} is missing"),
        }
    };
    // The suites write a median of no finite sample (and the min and max of no samples) as
    // NaN or an infinity, which serde_json writes as null.
    let n = |k: &str| -> Result<f64> {
        match o.get(k) {
            Some(Value::Number(x)) => Ok(x.as_f64().unwrap_or(f64::NAN)),
            Some(Value::Null) => Ok(f64::NAN),
            Some(other) => bail!("field {k:?} is not a number: {other}"),
            None => bail!("field {k:?} is missing"),
        }
    };
    let runs = || -> Result<u64> {
        match o.get("runs") {
            Some(Value::Number(x)) => x
                .as_u64()
                .with_context(|| format!("field \"runs\" is not a count: {x}")),
            Some(other) => bail!("field \"runs\" is not a number: {other}"),
            None => bail!("field \"runs\" is missing"),
        }
    };
    // Fields in the order the suites write them, so the first bad one is the one named.
    Ok(Record {
        suite: s("suite")?,
        case: s("case")?,
        subject: s("subject")?,
        metric: s("metric")?,
        value: n("value")?,
        unit: s("unit")?,
        runs: runs()?,
        min: n("min")?,
        max: n("max")?,
    })
}

fn short(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s.to_owned()
    }
}

/// What `machine.json` says, with every field optional: an older or hand-made record still
/// makes a report, which then says what it does not know.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub cpu: Option<String>,
    pub cpus: Option<u64>,
    pub kernel: Option<String>,
    pub memory_bytes: Option<u64>,
    pub commit: Option<String>,
    pub dirty: Option<bool>,
    pub mode: Option<String>,
    pub runs: Option<u64>,
    pub build: Option<String>,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub suites: Vec<SuiteRun>,
}

/// One suite's outcome in a run.
#[derive(Clone, Debug, PartialEq)]
pub struct SuiteRun {
    pub suite: String,
    pub ok: bool,
    pub seconds: Option<f64>,
    /// The load average (1, 5, 15 min) when the suite started.
    pub load: Option<String>,
    pub error: Option<String>,
    pub about: Option<String>,
}

/// Parse `machine.json` (`name` is the file, for errors).
pub fn parse_machine(name: &str, text: &str) -> Result<Machine> {
    let v: Value = serde_json::from_str(text).with_context(|| format!("{name}: not JSON"))?;
    if !v.is_object() {
        bail!("{name}: not a JSON object");
    }
    let st = |v: &Value| v.as_str().map(str::to_owned);
    let run = &v["run"];
    let mut suites = Vec::new();
    if let Some(list) = run["suites"].as_array() {
        for (i, s) in list.iter().enumerate() {
            let suite = st(&s["suite"])
                .with_context(|| format!("{name}: run.suites[{i}] has no \"suite\" name"))?;
            suites.push(SuiteRun {
                suite,
                ok: s["status"].as_str() == Some("ok"),
                seconds: s["seconds"].as_f64(),
                load: st(&s["load"]),
                error: st(&s["error"]),
                about: st(&s["about"]),
            });
        }
    }
    Ok(Machine {
        cpu: st(&v["cpu"]),
        cpus: v["cpus"].as_u64(),
        kernel: st(&v["kernel"]),
        memory_bytes: v["memory_bytes"].as_u64(),
        commit: st(&v["commit"]),
        dirty: v["dirty"].as_bool(),
        mode: st(&run["mode"]),
        runs: run["runs"].as_u64(),
        build: st(&run["build"]),
        started: st(&run["started"]),
        finished: st(&run["finished"]),
        suites,
    })
}

impl Machine {
    /// One line naming the machine, for every plot's subtitle.
    pub fn one_line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.cpu {
            parts.push(c.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        if let Some(n) = self.cpus {
            parts.push(format!("{n} vCPUs"));
        }
        if let Some(m) = self.memory_bytes {
            parts.push(format!("{:.0} GiB", m as f64 / (1u64 << 30) as f64));
        }
        if let Some(k) = &self.kernel {
            parts.push(format!("Linux {k}"));
        }
        if let Some(d) = &self.started {
            parts.push(d.get(..10).unwrap_or(d).to_owned());
        }
        let mut s = if parts.is_empty() {
            "machine not recorded".to_owned()
        } else {
            parts.join(", ")
        };
        if let Some(m) = &self.mode {
            s.push_str(&format!("; {m} run"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"suite":"nbd","case":"read tcp","subject":"memsync","metric":"throughput","value":4.1,"unit":"GB/s","runs":3,"min":3.9,"max":4.3}"#;

    #[test]
    fn parses_lines_and_skips_blank_ones() {
        let text = format!("{LINE}\n\n{}\n", LINE.replace("4.1", "null"));
        let r = parse_results("results.jsonl", &text).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].subject, "memsync");
        assert_eq!(r[0].value, 4.1);
        assert_eq!(r[0].runs, 3);
        assert!(r[1].value.is_nan(), "null is a median of no samples");
        assert!(!r[0].is_published() && !r[0].is_ratio());
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line() {
        for (bad, says) in [
            ("{not json", "not a JSON object"),
            ("[1,2]", "not a JSON object"),
            (r#"{"suite":"x"}"#, "\"case\" is missing"),
            (
                &LINE.replace("\"value\":4.1", "\"value\":\"fast\""),
                "\"value\" is not a number",
            ),
            (
                &LINE.replace("\"runs\":3", "\"runs\":-1"),
                "\"runs\" is not a count",
            ),
            (
                &LINE.replace("\"suite\":\"nbd\"", "\"suite\":7"),
                "\"suite\" is not a string",
            ),
            ("\u{0}\u{ffff}", "not a JSON object"),
        ] {
            let text = format!("{LINE}\n{bad}\n");
            let e = parse_results("r.jsonl", &text).unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains("r.jsonl line 2"), "{msg}");
            assert!(msg.contains(says), "{bad}: {msg}");
        }
    }

    #[test]
    fn machine_record_fields_are_optional() {
        let m = parse_machine("m.json", "{}").unwrap();
        assert_eq!(m.one_line(), "machine not recorded");
        assert!(parse_machine("m.json", "[]").is_err());
        assert!(parse_machine("m.json", "{").is_err());
        let bad = r#"{"run":{"suites":[{"status":"ok"}]}}"#;
        let e = parse_machine("m.json", bad).unwrap_err();
        assert!(format!("{e:#}").contains("run.suites[0]"), "{e:#}");
        let m = parse_machine(
            "m.json",
            r#"{"cpu":"Intel  Xeon","cpus":2,"kernel":"6.18.0","memory_bytes":25769803776,
               "run":{"mode":"quick","started":"2026-12-06T02:10:00Z",
                      "suites":[{"suite":"nbd","status":"failed","error":"no nbdkit"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            m.one_line(),
            "Intel Xeon, 2 vCPUs, 24 GiB, Linux 6.18.0, 2026-12-06; quick run"
        );
        assert!(!m.suites[0].ok);
        assert_eq!(m.suites[0].error.as_deref(), Some("no nbdkit"));
    }
}

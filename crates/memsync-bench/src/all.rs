//! `memsync bench all`: every suite of [`SUITES`](crate::SUITES) in one run, and the record of
//! the machine it ran on, which `memsync bench report` turns into `docs/bench/`.
//!
//! A suite that fails (a peer missing, an error, a panic) does not stop the others: the run
//! goes on, says which failed and why, and fails at the end. With an output directory the
//! measurements go to `DIR/results.jsonl` as they come (so a crash leaves what was measured) and
//! the machine and the suites' outcomes to `DIR/machine.json`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{Bench, BenchConfig, Env, Results, SUITES, Suite};

/// The file names in an output directory, shared with the report.
pub const RESULTS_FILE: &str = "results.jsonl";
pub const MACHINE_FILE: &str = "machine.json";

/// How one suite of the run ended.
#[derive(Debug)]
pub struct Outcome {
    pub suite: &'static str,
    pub seconds: f64,
    /// The load average (1, 5, 15 min) when it started: the machine is shared, and a figure
    /// taken under load reads differently.
    pub load: Option<String>,
    /// The error (with its causes) or panic message of a failed suite.
    pub error: Option<String>,
}

/// Run every suite; with `out`, write `results.jsonl` and `machine.json` there. Fails if any
/// suite failed, after all have run.
pub fn run_all(config: BenchConfig, out: Option<&Path>, env: &Env<'_>) -> Result<()> {
    run_suites(SUITES, config, out, env)
}

fn run_suites(
    suites: &[Suite],
    mut config: BenchConfig,
    out: Option<&Path>,
    env: &Env<'_>,
) -> Result<()> {
    let started = SystemTime::now();
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(RESULTS_FILE);
        let f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        config.results = Some(Results::new(f));
        // Written before the suites too, so an interrupted run still names its machine.
        write_machine(dir, &config, started, None, &[], suites)?;
    }
    let mut outcomes = Vec::new();
    for s in suites {
        if crate::interrupted() {
            eprintln!("== memsync bench: interrupted, the remaining suites do not run");
            break;
        }
        eprintln!("== memsync bench {}", s.name);
        let load = load_average();
        let t = Instant::now();
        let mut b = Bench::new(s.name, config.clone());
        let error = match catch_unwind(AssertUnwindSafe(|| (s.run)(&mut b, env))) {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(p) => Some(format!("panicked: {}", panic_message(&*p))),
        };
        let seconds = t.elapsed().as_secs_f64();
        match &error {
            None => eprintln!("== {}: done in {seconds:.1} s", s.name),
            Some(e) => eprintln!("== {}: FAILED after {seconds:.1} s: {e}", s.name),
        }
        outcomes.push(Outcome {
            suite: s.name,
            seconds,
            load,
            error,
        });
        if let Some(dir) = out {
            write_machine(dir, &config, started, None, &outcomes, suites)?;
        }
    }
    if let Some(dir) = out {
        write_machine(
            dir,
            &config,
            started,
            Some(SystemTime::now()),
            &outcomes,
            suites,
        )?;
    }
    eprintln!("== summary");
    for o in &outcomes {
        let status = o
            .error
            .as_deref()
            .map_or("ok".to_owned(), |e| format!("FAILED: {e}"));
        eprintln!("{:<8} {:>7.1} s  {status}", o.suite, o.seconds);
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.error.is_some())
        .map(|o| o.suite)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} suites failed: {}",
            failed.len(),
            outcomes.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

fn write_machine(
    dir: &Path,
    config: &BenchConfig,
    started: SystemTime,
    finished: Option<SystemTime>,
    outcomes: &[Outcome],
    suites: &[Suite],
) -> Result<()> {
    let mut m = machine();
    let run = json!({
        "mode": if config.quick { "quick" } else { "full" },
        "runs": config.runs(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "started": utc(started),
        "finished": finished.map(utc),
        "suites": outcomes.iter().map(|o| json!({
            "suite": o.suite,
            "status": if o.error.is_some() { "failed" } else { "ok" },
            "seconds": (o.seconds * 10.0).round() / 10.0,
            "load": o.load,
            "error": o.error,
            "about": suites.iter().find(|s| s.name == o.suite).map(|s| s.about),
        })).collect::<Vec<_>>(),
    });
    m["run"] = run;
    let path = dir.join(MACHINE_FILE);
    let text = serde_json::to_string_pretty(&m)? + "\n";
    // Replaced whole, so a reader never sees half a record.
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What the figures were measured on: CPU, cores, kernel, memory, and the commit built.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_owned());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let usable = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "HEAD"]);
    let dirty = commit
        .as_ref()
        .and_then(|_| git(&["status", "--porcelain", "--untracked-files=no"]))
        .map(|s| !s.is_empty());
    json!({
        "cpu": cpu,
        "cpus": cpus,
        "usable_cpus": usable,
        "kernel": kernel,
        "memory_bytes": mem_kib.map(|k| k * 1024),
        "memsync": env!("CARGO_PKG_VERSION"),
        "commit": commit,
        "dirty": dirty,
    })
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a day count since
/// 1970-01-01 (no date crate for one line of the machine record).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.
        let t = UNIX_EPOCH + Duration::from_secs(951_827_696);
        assert_eq!(utc(t), "2000-02-29T12:34:56Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(utc(t), "2026-12-31T23:59:59Z");
    }

    fn ok(b: &mut Bench, _: &Env<'_>) -> Result<()> {
        b.record("case", "memsync", "throughput", "GB/s", &[1.0, 2.0, 3.0]);
        Ok(())
    }

    fn fails(b: &mut Bench, _: &Env<'_>) -> Result<()> {
        b.record("before", "memsync", "latency", "us", &[5.0]);
        bail!("no peer here")
    }

    fn panics(_: &mut Bench, _: &Env<'_>) -> Result<()> {
        panic!("a suite bug")
    }

    /// A failed or panicking suite is reported and the next one still runs; what each printed
    /// is in results.jsonl and each outcome in machine.json.
    #[test]
    fn a_failed_suite_does_not_stop_the_others() {
        let suites = [
            Suite {
                name: "one",
                about: "first",
                run: fails,
            },
            Suite {
                name: "two",
                about: "second",
                run: panics,
            },
            Suite {
                name: "three",
                about: "third",
                run: ok,
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let registry = memsync_core::Registry::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let env = Env {
            registry: &registry,
            rt: &rt,
            exe: PathBuf::from("/nonexistent"),
        };
        let config = BenchConfig {
            quick: true,
            json: true,
            runs: Some(1),
            scratch: dir.path().to_owned(),
            results: None,
        };
        let e = run_suites(&suites, config, Some(dir.path()), &env).unwrap_err();
        assert_eq!(e.to_string(), "2 of 3 suites failed: one, two");

        let lines = std::fs::read_to_string(dir.path().join(RESULTS_FILE)).unwrap();
        let lines: Vec<Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["suite"], "one");
        assert_eq!(lines[1]["suite"], "three");
        assert_eq!(lines[1]["value"], 2.0);

        let m: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(MACHINE_FILE)).unwrap())
                .unwrap();
        let s = m["run"]["suites"].as_array().unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0]["status"], "failed");
        assert_eq!(s[0]["error"], "no peer here");
        assert_eq!(s[1]["error"], "panicked: a suite bug");
        assert_eq!(s[2]["status"], "ok");
        assert_eq!(s[2]["about"], "third");
        assert_eq!(m["run"]["mode"], "quick");
        assert!(m["run"]["finished"].is_string());
    }

    #[test]
    fn machine_names_kernel_and_cpus() {
        let m = machine();
        assert!(m["cpus"].as_u64().unwrap() >= 1, "{m}");
        assert!(m["kernel"].as_str().is_some_and(|k| !k.is_empty()), "{m}");
    }
}

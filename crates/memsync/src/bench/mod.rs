//! The benchmark harness behind `memsync bench SUITE`.
//!
//! A case runs its subject several times and reports the median with min and max. Every case
//! that has a peer or a physical limit measures it in the same run and prints the ratio, so that
//! figures taken on a noisy shared machine stay comparable. With `--json` each measurement is
//! one JSON object per line:
//! `{"suite","case","subject","metric","value","unit","runs","min","max"}`.

pub mod lazy;
pub mod mount;
pub mod nbd;
pub mod store;
pub mod stores;
pub mod sync;

use std::io::Write;
use std::time::Duration;

use serde_json::json;

/// How a suite run is configured.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Fewer runs and smaller sizes (a CI smoke run: each suite under 30 s).
    pub quick: bool,
    /// Print JSON lines instead of a table.
    pub json: bool,
    /// Repetitions per case (overrides the default).
    pub runs: Option<usize>,
    /// Where suites put scratch files.
    pub scratch: std::path::PathBuf,
}

impl BenchConfig {
    /// Repetitions per case.
    pub fn runs(&self) -> usize {
        self.runs.unwrap_or(if self.quick { 3 } else { 7 }).max(1)
    }
}

/// One reported figure.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub suite: String,
    pub case: String,
    pub subject: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    pub runs: usize,
    pub min: f64,
    pub max: f64,
}

impl Measurement {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "suite": self.suite, "case": self.case, "subject": self.subject,
            "metric": self.metric, "value": self.value, "unit": self.unit,
            "runs": self.runs, "min": self.min, "max": self.max,
        })
    }
}

/// Collects and prints measurements for one suite.
#[derive(Debug)]
pub struct Bench {
    pub config: BenchConfig,
    suite: String,
}

/// The median of samples (mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> f64 {
    let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Whether larger values are better for a unit (throughput) or smaller (latency).
fn higher_is_better(unit: &str) -> bool {
    !matches!(unit, "us" | "ns" | "ms" | "s")
}

impl Bench {
    pub fn new(suite: &str, config: BenchConfig) -> Self {
        Bench {
            config,
            suite: suite.to_owned(),
        }
    }

    /// Record a case from per-run samples and print it.
    pub fn record(
        &mut self,
        case: &str,
        subject: &str,
        metric: &str,
        unit: &str,
        samples: &[f64],
    ) -> f64 {
        let value = median(samples);
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let m = Measurement {
            suite: self.suite.clone(),
            case: case.to_owned(),
            subject: subject.to_owned(),
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            runs: samples.len(),
            min,
            max,
        };
        self.print(&m);
        value
    }

    /// Run `f` `runs()` times; each call returns one sample.
    pub fn measure(
        &mut self,
        case: &str,
        subject: &str,
        metric: &str,
        unit: &str,
        mut f: impl FnMut() -> anyhow::Result<f64>,
    ) -> anyhow::Result<f64> {
        let mut samples = Vec::with_capacity(self.config.runs());
        for _ in 0..self.config.runs() {
            samples.push(f()?);
        }
        Ok(self.record(case, subject, metric, unit, &samples))
    }

    /// Report `memsync / peer` for a case (for latency units the ratio is peer / memsync, so a
    /// ratio above 1 always means memsync is better).
    pub fn ratio(
        &mut self,
        case: &str,
        peer: &str,
        unit: &str,
        memsync: f64,
        peer_value: f64,
    ) -> f64 {
        let r = if higher_is_better(unit) {
            memsync / peer_value
        } else {
            peer_value / memsync
        };
        let m = Measurement {
            suite: self.suite.clone(),
            case: case.to_owned(),
            subject: format!("memsync/{peer}"),
            metric: "ratio".to_owned(),
            value: r,
            unit: "x".to_owned(),
            runs: self.config.runs(),
            min: r,
            max: r,
        };
        self.print(&m);
        r
    }

    fn print(&self, m: &Measurement) {
        let mut out = std::io::stdout().lock();
        if self.config.json {
            let _ = writeln!(out, "{}", m.to_json());
        } else if m.metric == "ratio" {
            let _ = writeln!(
                out,
                "{:<8} {:<28} {:<16} ratio {:>10.3}",
                m.suite, m.case, m.subject, m.value
            );
        } else {
            let _ = writeln!(
                out,
                "{:<8} {:<28} {:<16} {:<10} {:>10.3} {:<5} (min {:.3}, max {:.3}, {} runs)",
                m.suite, m.case, m.subject, m.metric, m.value, m.unit, m.min, m.max, m.runs
            );
        }
    }
}

/// GB/s (10^9 bytes per second) for `bytes` moved in `elapsed`.
pub fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

/// A child process (a server or peer) killed and reaped on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Wait (up to 10 s) until something accepts connections on 127.0.0.1:`port`.
pub fn wait_tcp(port: u16) -> anyhow::Result<()> {
    for _ in 0..1000 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("nothing listens on port {port}")
}

/// The suites `memsync bench` knows.
pub const SUITES: &[(&str, &str)] = &[
    (
        "store",
        "sequential and random 4 KiB reads and writes per local store, against memcpy/pread",
    ),
    (
        "nbd",
        "memsync serve and the memsync NBD client against nbdkit, driven by nbdcopy",
    ),
    (
        "stores",
        "sequential read (direct with many requests in flight, and through the cache layer of a managed mount) and first-access latency from redis://, s3:// and dir: on real servers, per chunk size, vs redis-benchmark / a bare HTTP GET loop / pread, beside r3map's published figures",
    ),
    (
        "lazy",
        "lazy userfaultfd regions from a mem: store: sequential first touch vs memcpy, random 4 KiB fault latency vs an anonymous fault",
    ),
    (
        "sync",
        "delta sync of a 1 GiB file with 0/1/10% of random 4 KiB pages changed, local and to a peer through the delay proxy at 0 and 30 ms RTT, vs rsync -B4096 --inplace --no-whole-file and rsync's default, same run; continuous push rounds vs dirty rate",
    ),
    (
        "mount",
        "managed mounts (cache + FUSE file + lazy region) over memsync serve through the delay proxy at RTT 0/10/30 ms, vs nbdcopy, the FUSE ceiling and r3map's published figures",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn ratio_direction() {
        let cfg = BenchConfig {
            quick: true,
            json: true,
            runs: Some(1),
            scratch: std::env::temp_dir(),
        };
        let mut b = Bench::new("t", cfg);
        assert_eq!(b.ratio("c", "p", "GB/s", 2.0, 4.0), 0.5);
        assert_eq!(b.ratio("c", "p", "us", 2.0, 4.0), 2.0);
    }
}

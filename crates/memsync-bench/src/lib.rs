//! The benchmark harness and suites behind `memsync bench SUITE`.
//!
//! A library so that the shipped binary's own code stays thin: the binary hands [`run`] its
//! store registry, its runtime and its own path ([`Env`]), and the suites start that binary as
//! servers, proxies and clients (`memsync serve`, `memsync proxy`, `memsync bench-nbd-read`,
//! `memsync sync --listen`). Test servers (redis-server, s3s-fs) come from `memsync-testkit`,
//! a dependency of this crate only.
//!
//! A case runs its subject several times and reports the median with min and max. Every case
//! that has a peer or a physical limit measures it in the same run and prints the ratio, so that
//! figures taken on a noisy shared machine stay comparable. With `--json` each measurement is
//! one JSON object per line:
//! `{"suite","case","subject","metric","value","unit","runs","min","max"}`.

pub mod all;
pub mod dsm;
pub mod lazy;
pub mod migrate;
pub mod mount;
pub mod nbd;
pub mod store;
pub mod stores;
pub mod sync;
pub mod vmm;

/// The TCP delay proxy the suites put between peers; `memsync proxy` runs it on its own.
pub use memsync_testkit::proxy;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use memsync_core::Registry;
use serde_json::json;

/// What the suites run with, from the binary that calls them.
#[derive(Debug)]
pub struct Env<'a> {
    /// Every store compiled into the binary.
    pub registry: &'a Registry,
    /// The binary's runtime; suites block on it from the calling thread.
    pub rt: &'a tokio::runtime::Runtime,
    /// The `memsync` binary, started as servers, proxies and clients.
    pub exe: PathBuf,
}

/// Run the suite `suite` (one of [`SUITES`]).
pub fn run(suite: &str, config: BenchConfig, env: &Env<'_>) -> Result<()> {
    let Some(s) = SUITES.iter().find(|s| s.name == suite) else {
        bail!("unknown suite {suite:?}")
    };
    let mut b = Bench::new(suite, config);
    (s.run)(&mut b, env)
}

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
    /// A file that also gets every measurement as a JSON line, whatever `json` says
    /// (`bench all --out`: the report is made from it while the terminal shows the table).
    pub results: Option<Results>,
}

/// A JSON-lines file shared by the suites of one run.
#[derive(Clone, Debug)]
pub struct Results(std::sync::Arc<parking_lot::Mutex<std::fs::File>>);

impl Results {
    pub fn new(file: std::fs::File) -> Self {
        Results(std::sync::Arc::new(parking_lot::Mutex::new(file)))
    }

    fn append(&self, m: &Measurement) {
        let line = format!("{}\n", m.to_json());
        // One write per line, so a suite that dies mid-run leaves whole lines behind.
        if let Err(e) = self.0.lock().write_all(line.as_bytes()) {
            eprintln!("memsync bench: cannot append to the results file: {e}");
        }
    }
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
/// The one rule of which way a unit is better (a unit with no known direction, like a count,
/// is treated as a rate).
fn higher_is_better(unit: &str) -> bool {
    memsync_report::compare::higher_is_better(unit).unwrap_or(true)
}

/// One subject of a compared case: its name and one run of it, which gives one value per metric
/// of the case.
pub struct Subject<'a> {
    name: String,
    run: Box<dyn FnMut() -> Result<Vec<f64>> + 'a>,
    /// Run once after the timed rounds, before anything is recorded ([`checked`](Self::checked)).
    check: Option<Box<dyn FnOnce() -> Result<()> + 'a>>,
}

impl<'a> Subject<'a> {
    /// A subject of a case with one metric.
    pub fn new(name: impl Into<String>, mut run: impl FnMut() -> Result<f64> + 'a) -> Self {
        Subject {
            name: name.into(),
            run: Box::new(move || Ok(vec![run()?])),
            check: None,
        }
    }

    /// A subject of a case with several metrics: each run returns one value per metric, in
    /// the case's order.
    pub fn multi(name: impl Into<String>, run: impl FnMut() -> Result<Vec<f64>> + 'a) -> Self {
        Subject {
            name: name.into(),
            run: Box::new(run),
            check: None,
        }
    }

    /// `check` runs once after the timed rounds, outside them, and before the case records
    /// anything: a figure for bytes that turn out wrong is not a figure, so a failed check
    /// fails the case and nothing of it is recorded.
    pub fn checked(mut self, check: impl FnOnce() -> Result<()> + 'a) -> Self {
        self.check = Some(Box::new(check));
        self
    }
}

impl std::fmt::Debug for Subject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject").field("name", &self.name).finish()
    }
}

/// The samples of a compared case ([`Bench::compare`]): every subject ran once per round, so
/// all have the same number of samples, taken in alternation. Ratios come only from here.
#[derive(Debug)]
pub struct Compared {
    case: String,
    metrics: Vec<(String, String)>,
    /// Per subject: its name and, per metric, one sample per round.
    samples: Vec<(String, Vec<Vec<f64>>)>,
}

impl Compared {
    /// The subjects, in the order they were given.
    pub fn subjects(&self) -> impl Iterator<Item = &str> {
        self.samples.iter().map(|(s, _)| s.as_str())
    }

    fn metric_index(&self, metric: &str) -> Result<usize> {
        self.metrics
            .iter()
            .position(|(m, _)| m == metric)
            .with_context(|| format!("case {}: no metric {metric}", self.case))
    }

    /// One sample per round of `subject`'s `metric`.
    pub fn samples(&self, subject: &str, metric: &str) -> Result<&[f64]> {
        let m = self.metric_index(metric)?;
        self.samples
            .iter()
            .find(|(s, _)| s == subject)
            .map(|(_, v)| &v[m][..])
            .with_context(|| format!("case {}: no subject {subject}", self.case))
    }

    /// The median of `subject`'s `metric`.
    pub fn median(&self, subject: &str, metric: &str) -> Result<f64> {
        Ok(median(self.samples(subject, metric)?))
    }
}

impl Bench {
    pub fn new(suite: &str, config: BenchConfig) -> Self {
        Bench {
            config,
            suite: suite.to_owned(),
        }
    }

    /// Record a figure from per-run samples and print it: a case without a peer, or a detail of
    /// a compared one. It takes part in no ratio.
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

    /// Measure `subjects` in alternation and record each: round `r` of `runs()` runs every
    /// subject once, starting with subject `r mod n`, so that each goes first equally often
    /// and a load change on this shared machine hits all alike (measuring all of one subject's
    /// runs before another's turned a load change into a difference between them). `metrics`
    /// are the (metric, unit) pairs each run returns. Ratios between the subjects are then
    /// printed with [`ratio`](Self::ratio).
    pub fn compare(
        &mut self,
        case: &str,
        metrics: &[(&str, &str)],
        mut subjects: Vec<Subject<'_>>,
    ) -> Result<Compared> {
        let n = subjects.len();
        let rounds = self.config.runs();
        let mut samples: Vec<Vec<Vec<f64>>> =
            vec![vec![Vec::with_capacity(rounds); metrics.len()]; n];
        for r in 0..rounds {
            for k in 0..n {
                if interrupted() {
                    bail!("{case}: interrupted");
                }
                let i = (r + k) % n;
                let s = &mut subjects[i];
                let v = (s.run)().with_context(|| format!("{case}: {}", s.name))?;
                anyhow::ensure!(
                    v.len() == metrics.len(),
                    "{case}: {} gave {} values for {} metrics",
                    s.name,
                    v.len(),
                    metrics.len()
                );
                for (m, x) in v.into_iter().enumerate() {
                    samples[i][m].push(x);
                }
            }
        }
        for s in &mut subjects {
            if let Some(check) = s.check.take() {
                check().with_context(|| {
                    format!(
                        "{case}: {}: the data check after the timed runs failed",
                        s.name
                    )
                })?;
            }
        }
        let c = Compared {
            case: case.to_owned(),
            metrics: metrics
                .iter()
                .map(|(m, u)| ((*m).to_owned(), (*u).to_owned()))
                .collect(),
            samples: subjects.into_iter().map(|s| s.name).zip(samples).collect(),
        };
        for (subject, per_metric) in &c.samples {
            for ((metric, unit), v) in c.metrics.iter().zip(per_metric) {
                self.record(case, subject, metric, unit, v);
            }
        }
        Ok(c)
    }

    /// [`compare`](Self::compare) two subjects of one metric and print the ratio of the first
    /// to the second.
    pub fn pair(
        &mut self,
        case: &str,
        (metric, unit): (&str, &str),
        subject: Subject<'_>,
        peer: Subject<'_>,
    ) -> Result<f64> {
        let (a, b) = (subject.name.clone(), peer.name.clone());
        let c = self.compare(case, &[(metric, unit)], vec![subject, peer])?;
        self.ratio(&c, &a, &b, metric)
    }

    /// Print the ratio `subject / peer` of `metric` in a compared case (`peer / subject` for
    /// latency units, so that a ratio above 1 always means the subject is better): the ratio
    /// of the medians, over the real number of rounds, with the lowest and highest ratio of one
    /// round. Only same-run figures have ratios: published ones never do
    /// ([`published`](Self::published)).
    pub fn ratio(&mut self, c: &Compared, subject: &str, peer: &str, metric: &str) -> Result<f64> {
        let unit = &c.metrics[c.metric_index(metric)?].1;
        let (a, b) = (c.samples(subject, metric)?, c.samples(peer, metric)?);
        let of = |x: f64, y: f64| {
            if higher_is_better(unit) { x / y } else { y / x }
        };
        let per_round: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| of(x, y)).collect();
        let r = of(median(a), median(b));
        let name = if c.metrics.len() > 1 {
            format!("{subject}/{peer} {metric}")
        } else {
            format!("{subject}/{peer}")
        };
        let m = Measurement {
            suite: self.suite.clone(),
            case: c.case.clone(),
            subject: name,
            metric: "ratio".to_owned(),
            value: r,
            unit: "x".to_owned(),
            runs: per_round.len(),
            min: per_round.iter().copied().fold(f64::INFINITY, f64::min),
            max: per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        };
        self.print(&m);
        Ok(r)
    }

    /// Print a figure published elsewhere (not measured here), for reading beside the same-run
    /// ones: its subject says `published`, its run count is 0, and no ratio uses it.
    pub fn published(&mut self, case: &str, subject: &str, metric: &str, unit: &str, value: f64) {
        let m = Measurement {
            suite: self.suite.clone(),
            case: case.to_owned(),
            subject: format!("{subject} (published)"),
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            runs: 0,
            min: value,
            max: value,
        };
        self.print(&m);
    }

    fn print(&self, m: &Measurement) {
        if let Some(r) = &self.config.results {
            r.append(m);
        }
        let mut out = std::io::stdout().lock();
        if self.config.json {
            let _ = writeln!(out, "{}", m.to_json());
        } else if m.metric == "ratio" {
            let _ = writeln!(
                out,
                "{:<8} {:<28} {:<16} ratio {:>10.3}   (per round {:.3}..{:.3}, {} rounds)",
                m.suite, m.case, m.subject, m.value, m.min, m.max, m.runs
            );
        } else if m.runs == 0 {
            let _ = writeln!(
                out,
                "{:<8} {:<28} {:<16} {:<10} {:>10.3} {:<5} (not measured here)",
                m.suite, m.case, m.subject, m.metric, m.value, m.unit
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

/// The BLAKE3 hash of a file's contents, for the suites' data checks.
pub fn hash_file(path: &std::path::Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
    )?;
    Ok(h.finalize())
}

/// GB/s (10^9 bytes per second) for `bytes` moved in `elapsed`.
pub fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

/// The unit of [`Rate::cpu`]: CPU time of the whole machine per GiB moved.
pub const CPU_PER_GIB: &str = "CPU-s/GiB";

/// Wall time and the whole machine's busy CPU time from one point to another: what a pipeline
/// of several processes costs (servers, proxies and peers in children, the bench's own threads,
/// the kernel's work for all of them), so that a case can show whether it ran out of CPU. Other
/// load on the machine counts too: read it from a quiet run.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    t: Instant,
    busy: Option<Duration>,
}

/// What a [`Span`] moved: GB/s, and busy CPU-seconds per GiB (`NaN` where `/proc/stat` cannot be
/// read).
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub gbps: f64,
    pub cpu: f64,
}

impl Rate {
    /// The values of a case's `("throughput", "GB/s")` and `("cpu", CPU_PER_GIB)` metrics.
    pub fn metrics(self) -> Vec<f64> {
        vec![self.gbps, self.cpu]
    }
}

impl Span {
    pub fn start() -> Span {
        Span {
            busy: machine_busy(),
            t: Instant::now(),
        }
    }

    /// The rate of `bytes` moved since the start.
    pub fn rate(&self, bytes: u64) -> Rate {
        let el = self.t.elapsed();
        let cpu = match (self.busy, machine_busy()) {
            (Some(a), Some(b)) => {
                b.saturating_sub(a).as_secs_f64() / (bytes as f64 / (1u64 << 30) as f64)
            }
            _ => f64::NAN,
        };
        Rate {
            gbps: gbps(bytes, el),
            cpu,
        }
    }
}

/// Busy time of all CPUs since boot, from the first line of `/proc/stat`: user, nice, system,
/// irq and softirq (guest time is inside user; idle, iowait and steal, the time the hypervisor
/// gave to others, are not busy). The file counts in USER_HZ, which is 100 on x86-64 and every
/// other architecture memsync builds for.
fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_busy(stat.lines().next()?)
}

fn parse_busy(line: &str) -> Option<Duration> {
    let mut f = line.split_ascii_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(7).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let &[user, nice, system, _idle, _iowait, irq, softirq] = v.as_slice() else {
        return None;
    };
    let ticks = user + nice + system + irq + softirq;
    Some(Duration::from_millis(ticks.checked_mul(10)?))
}

/// Set by [`interrupt`]: every compared case stops before its next run.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The FUSE mounts this process serves and reads itself.
static OWN_FUSE: parking_lot::Mutex<Vec<memsync_fuse::AbortHandle>> =
    parking_lot::Mutex::new(Vec::new());

/// Mounts FUSE for a suite that reads or maps the file from this process. Such a process must
/// never die by a signal while one of its threads waits for its own mount: the kernel then
/// waits for a reply (uninterruptibly, once the request was read) from request threads that
/// are gone, through a `/dev/fuse` that the waiting thread keeps open, and the process never
/// ends. [`interrupt`] aborts every mount made here first.
pub(crate) fn mount_fuse(
    store: memsync_core::DynStore,
    rt: tokio::runtime::Handle,
    mountpoint: &std::path::Path,
    opts: memsync_fuse::FuseOptions,
) -> Result<memsync_fuse::FuseMount> {
    let m = memsync_fuse::mount(store, rt, mountpoint, opts)?;
    let mut own = OWN_FUSE.lock();
    // A handle does nothing once its mount's unmount has ended; keep the list short anyway.
    if own.len() >= 64 {
        own.drain(..32);
    }
    own.push(m.abort_handle());
    Ok(m)
}

/// What SIGINT and SIGTERM do during a suite (`memsync bench` installs it): abort the FUSE
/// mounts this process serves (a read of one fails at once instead of hanging), and make every
/// compared case fail before its next run, so that the suite unwinds: children are killed and
/// mounts removed on the way out.
pub fn interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    for h in OWN_FUSE.lock().drain(..) {
        if let Err(e) = h.abort() {
            eprintln!("memsync: bench: aborting a FUSE mount: {e}");
        }
    }
}

/// Whether [`interrupt`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// A child process (a server or peer) killed and reaped on drop.
#[derive(Debug)]
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Wait (up to 10 s) until something accepts connections on 127.0.0.1:`port`.
pub fn wait_tcp(port: u16) -> Result<()> {
    for _ in 0..1000 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("nothing listens on port {port}")
}

/// One benchmark suite.
#[derive(Debug)]
pub struct Suite {
    pub name: &'static str,
    /// What it compares, for `--help`.
    pub about: &'static str,
    pub run: fn(&mut Bench, &Env<'_>) -> Result<()>,
}

/// The suites `memsync bench` knows, in the order `memsync bench all` runs them: the one list
/// that [`run`], [`all::run_all`] and the CLI's `--help` use.
pub const SUITES: &[Suite] = &[
    Suite {
        name: "store",
        about: "sequential and random 4 KiB reads and writes per local store, against memcpy/pread",
        run: |b, e| store::run(b, e.registry),
    },
    Suite {
        name: "nbd",
        about: "memsync serve and the memsync NBD client against nbdkit and qemu-nbd, driven by nbdcopy",
        run: nbd::run,
    },
    Suite {
        name: "stores",
        about: "sequential read (direct with many requests in flight, and through the cache layer of a managed mount) and first-access latency from redis://, s3:// and dir: on real servers, per chunk size, vs redis-benchmark / a bare HTTP GET loop / pread, beside r3map's published figures",
        run: |b, e| stores::run(b, e.registry),
    },
    Suite {
        name: "lazy",
        about: "lazy userfaultfd regions from a mem: store: sequential first touch vs memcpy, random 4 KiB fault latency vs an anonymous fault",
        run: lazy::run,
    },
    Suite {
        name: "sync",
        about: "delta sync of a 1 GiB file with 0/1/10% of random 4 KiB pages changed, local and to a peer through the delay proxy at 0 and 30 ms RTT, vs rsync -B4096 --inplace --no-whole-file and rsync's default, same run; continuous push rounds vs dirty rate",
        run: sync::run,
    },
    Suite {
        name: "migrate",
        about: "live migration of a 1 GiB store while a writer dirties random 4 KiB pages at 0/50/500 MB/s: pre-copy, post-copy, hybrid, also at 30 ms RTT through the delay proxy (downtime, total, bytes sent per region byte, passes, post-copy fault p50); the writer with and without write tracking; QEMU's published figures beside",
        run: migrate::run,
    },
    Suite {
        name: "vmm",
        about: "VM snapshot restore: memsync's Firecracker UFFD handler vs a minimal handler of the upstream example's design (one UFFDIO_COPY per 4 KiB fault from the file in memory), same file, same run: time to first fault served, random 4 KiB fault p50/p99; memsync from an NBD export; time until the whole memory is resident with the background pull vs faults only",
        run: vmm::run,
    },
    Suite {
        name: "dsm",
        about: "distributed shared memory, nodes over loopback TCP, per manager scheme: read/write fault p50/p99 (0/1/3 copies to invalidate), messages per fault, forwarding chain, ping-pong of one page, false sharing, Jacobi on 1/2/4 nodes vs one process",
        run: dsm::run,
    },
    Suite {
        name: "mount",
        about: "managed mounts (cache + FUSE file + lazy region) over memsync serve through the delay proxy at RTT 0/10/30 ms, vs nbdcopy, the FUSE ceiling and r3map's published figures",
        run: mount::run,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_read_from_the_cpu_line() {
        let line = "cpu  4705 150 1120 16250 520 30 45 7 0 0";
        assert_eq!(
            parse_busy(line),
            Some(Duration::from_millis((4705 + 150 + 1120 + 30 + 45) * 10))
        );
        assert_eq!(parse_busy("cpu0 1 2 3 4 5 6 7"), None);
        assert_eq!(parse_busy("cpu 1 2 x 4 5 6 7"), None);
        assert_eq!(parse_busy("cpu 1 2 3"), None);
        // Burning CPU shows up as busy time (the counters tick every 10 ms; how soon depends on
        // what else the machine and its host do, so no figure is asserted, only that it moves).
        let span = Span::start();
        let started = Instant::now();
        let r = loop {
            for _ in 0..1_000_000 {
                std::hint::black_box(0u64);
            }
            let r = span.rate(1 << 30);
            if r.cpu > 0.0 || started.elapsed() > Duration::from_secs(30) {
                break r;
            }
        };
        assert!(r.cpu > 0.0 && r.cpu.is_finite(), "{r:?}");
        assert!(r.gbps > 0.0 && r.gbps.is_finite(), "{r:?}");
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    fn quiet(runs: usize) -> Bench {
        Bench::new(
            "t",
            BenchConfig {
                quick: true,
                json: true,
                runs: Some(runs),
                scratch: std::env::temp_dir(),
                results: None,
            },
        )
    }

    #[test]
    fn ratio_direction() {
        let mut b = quiet(1);
        let c = b
            .compare(
                "c",
                &[("throughput", "GB/s"), ("latency", "us")],
                vec![
                    Subject::multi("m", || Ok(vec![2.0, 2.0])),
                    Subject::multi("p", || Ok(vec![4.0, 4.0])),
                ],
            )
            .unwrap();
        assert_eq!(b.ratio(&c, "m", "p", "throughput").unwrap(), 0.5);
        assert_eq!(b.ratio(&c, "m", "p", "latency").unwrap(), 2.0);
        assert!(b.ratio(&c, "m", "nobody", "latency").is_err());
        assert!(b.ratio(&c, "m", "p", "p50").is_err());
    }

    /// Every subject runs once per round, the first one rotating, and has one sample per round.
    #[test]
    fn compare_alternates_subjects() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut b = quiet(4);
        let subject = |name: &'static str| {
            let order = &order;
            Subject::new(name, move || {
                order.borrow_mut().push(name);
                Ok(order.borrow().len() as f64)
            })
        };
        let c = b
            .compare(
                "c",
                &[("throughput", "GB/s")],
                vec![subject("a"), subject("b"), subject("c")],
            )
            .unwrap();
        assert_eq!(
            order.borrow().join(""),
            ["abc", "bca", "cab", "abc"].concat()
        );
        assert_eq!(c.samples("a", "throughput").unwrap(), [1.0, 6.0, 8.0, 10.0]);
        assert_eq!(c.samples("c", "throughput").unwrap().len(), 4);
        // The ratio of the medians: a's is (6 + 8) / 2, c's (5 + 7) / 2.
        assert_eq!(c.median("c", "throughput").unwrap(), 6.0);
        assert_eq!(b.ratio(&c, "a", "c", "throughput").unwrap(), 7.0 / 6.0);
    }

    #[test]
    fn a_subject_with_the_wrong_number_of_metrics_fails() {
        let mut b = quiet(1);
        let e = b
            .compare(
                "c",
                &[("p50", "us"), ("p99", "us")],
                vec![Subject::new("m", || Ok(1.0))],
            )
            .unwrap_err();
        assert!(e.to_string().contains("1 values for 2 metrics"), "{e}");
    }

    /// A subject's check runs once, after all its timed runs; a failed one fails the case
    /// before any figure of it is recorded.
    #[test]
    fn a_failed_check_fails_the_case_and_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let mut b = quiet(3);
        b.config.results = Some(Results::new(std::fs::File::create(&path).unwrap()));
        let runs = std::cell::Cell::new(0);
        let checked_after = std::cell::Cell::new(None);
        let e = b
            .compare(
                "c",
                &[("throughput", "GB/s")],
                vec![
                    Subject::new("good", || Ok(1.0)).checked(|| Ok(())),
                    Subject::new("bad", || {
                        runs.set(runs.get() + 1);
                        Ok(1.0)
                    })
                    .checked(|| {
                        checked_after.set(Some(runs.get()));
                        anyhow::bail!("wrong bytes")
                    }),
                ],
            )
            .unwrap_err();
        assert_eq!(checked_after.get(), Some(3));
        let e = format!("{e:#}");
        assert!(
            e.contains("c: bad: the data check") && e.contains("wrong bytes"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}

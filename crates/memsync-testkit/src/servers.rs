//! Real peer servers for tests and benchmarks: redis-server (single node and a 3-master
//! cluster) and an S3-compatible server (s3s-fs), started on loopback on free ports in their own
//! temporary directories, and killed when dropped. Every wait is bounded.
//!
//! A missing server binary skips the caller (with a printed reason) only outside CI: with
//! `CI` set in the environment it panics, so a missing `scripts/setup.sh` step is caught
//! ([`crate::skip`]).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where `scripts/setup.sh` installs tools that are built from source (`cargo install --root`).
pub const TOOLS_DIR: &str = "/var/tmp/memsync-tools/bin";

/// Find an executable on `PATH` or in [`TOOLS_DIR`].
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from(TOOLS_DIR));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Find a tool, or decide to skip (see [`crate::skip`]): prints why and returns `None` outside
/// CI; panics under CI.
pub fn require_tool(name: &str, why: &str) -> Option<PathBuf> {
    if let Some(p) = find_tool(name) {
        return Some(p);
    }
    crate::skip::skip(
        why,
        &format!("{name} is not installed; run scripts/setup.sh"),
    );
    None
}

/// A port on 127.0.0.1 that is free now (and, if `with_bus`, port + 10000 too, for a Redis
/// Cluster bus). Ports come from 20000..30000, away from the ephemeral range.
pub fn free_port(with_bus: bool) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..5000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (seed.wrapping_add(n.wrapping_mul(37)) % 10000) as u16;
        let ok = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && (!with_bus || TcpListener::bind(("127.0.0.1", port + 10000)).is_ok());
        if ok {
            return port;
        }
    }
    panic!("no free port found");
}

/// Wait until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, timeout: Duration) -> Result<(), String> {
    let end = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("nothing listens on port {port} after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "memsync-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process that can be killed and restarted with the same arguments.
#[derive(Debug)]
pub struct Proc {
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Start `program args...`, logging to `log`, and wait for `port` (bounded).
    pub fn start(program: &Path, args: Vec<String>, port: u16, log: PathBuf) -> Proc {
        let mut p = Proc {
            program: program.to_owned(),
            args,
            port,
            child: None,
            log,
        };
        p.restart();
        p
    }

    /// Start again after [`Proc::kill`] (same port).
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open server log");
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program.display()));
        self.child = Some(child);
        if let Err(e) = wait_port(self.port, Duration::from_secs(20)) {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!(
                "{} did not come up: {e}\n--- log ---\n{}",
                self.program.display(),
                log.chars()
                    .rev()
                    .take(3000)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>()
            );
        }
    }

    /// Kill the process (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run a command to completion within `timeout`; returns its stdout, or an error with stderr.
pub fn run_bounded(program: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > end => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} {args:?} timed out", program.display()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{} {args:?} failed ({}): {stdout}{}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn redis_args(port: u16, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        &dir.to_string_lossy(),
        "--protected-mode",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// One redis-server on loopback.
#[derive(Debug)]
pub struct RedisServer {
    pub proc: Proc,
    pub dir: TempDir,
}

impl RedisServer {
    /// Start one; `None` (with a printed reason) if redis-server is missing outside CI.
    pub fn start() -> Option<RedisServer> {
        Self::start_with(&[])
    }

    /// Start one with extra arguments (e.g. TLS settings).
    pub fn start_with(extra: &[&str]) -> Option<RedisServer> {
        let bin = require_tool("redis-server", "the Redis tests")?;
        let dir = TempDir::new("redis");
        let port = free_port(false);
        let proc = Proc::start(
            &bin,
            redis_args(port, dir.path(), extra),
            port,
            dir.path().join("log"),
        );
        Some(RedisServer { proc, dir })
    }

    pub fn port(&self) -> u16 {
        self.proc.port()
    }

    /// `redis-cli -p PORT args...` (bounded to 10 s).
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        redis_cli(self.port(), args)
    }
}

/// `redis-cli -p PORT args...` against 127.0.0.1 (bounded to 10 s).
pub fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let cli = find_tool("redis-cli").ok_or("redis-cli is not installed")?;
    let p = port.to_string();
    let mut a = vec!["-h", "127.0.0.1", "-p", &p];
    a.extend_from_slice(args);
    run_bounded(&cli, &a, Duration::from_secs(10))
}

/// A Redis Cluster of `n` masters (no replicas) on loopback.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Start `n` (≥ 3) masters and join them with `redis-cli --cluster create`.
    pub fn start(n: usize) -> Option<RedisCluster> {
        let bin = require_tool("redis-server", "the Redis Cluster tests")?;
        let cli = require_tool("redis-cli", "the Redis Cluster tests")?;
        let mut nodes = Vec::new();
        for _ in 0..n {
            let dir = TempDir::new("redis-cluster");
            let port = free_port(true);
            let args = redis_args(
                port,
                dir.path(),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            );
            let proc = Proc::start(&bin, args, port, dir.path().join("log"));
            nodes.push(RedisServer { proc, dir });
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(|s| s.as_str()));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        run_bounded(&cli, &args, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
        let end = Instant::now() + Duration::from_secs(30);
        'wait: loop {
            let mut all = true;
            for s in &nodes {
                let info = s.cli(&["cluster", "info"]).unwrap_or_default();
                all &= info.contains("cluster_state:ok");
            }
            if all {
                break 'wait;
            }
            assert!(
                Instant::now() < end,
                "cluster did not reach cluster_state:ok in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(RedisCluster { nodes })
    }

    /// `host:port,host:port,...` of all nodes.
    pub fn hosts(&self) -> String {
        self.nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Credentials the test S3 server accepts.
pub const S3_ACCESS_KEY: &str = "memsync-test";
/// Secret of [`S3_ACCESS_KEY`].
pub const S3_SECRET_KEY: &str = "memsync-test-secret";

/// An S3-compatible server (s3s-fs 0.14.1) on loopback, storing into a temp dir.
#[derive(Debug)]
pub struct S3Server {
    pub proc: Proc,
    pub dir: TempDir,
}

impl S3Server {
    /// Start s3s-fs; `None` (with a printed reason) if it is missing outside CI.
    pub fn start() -> Option<S3Server> {
        let bin = require_tool("s3s-fs", "the S3 tests (cargo install s3s-fs via setup.sh)")?;
        let dir = TempDir::new("s3");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("create s3 data dir");
        let port = free_port(false);
        let args = vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--access-key".into(),
            S3_ACCESS_KEY.into(),
            "--secret-key".into(),
            S3_SECRET_KEY.into(),
            data.to_string_lossy().into_owned(),
        ];
        let proc = Proc::start(&bin, args, port, dir.path().join("log"));
        Some(S3Server { proc, dir })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.proc.port())
    }

    /// Where s3s-fs keeps bucket `b`'s objects (one file per object).
    pub fn bucket_dir(&self, b: &str) -> PathBuf {
        self.dir.path().join("data").join(b)
    }
}

//! Tests that must watch a process die (SIGBUS, SIGKILL) or run as another user re-execute
//! their own test binary as a child running one test. These are the shared pieces.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether this process is the child part `name` (the env var `env` names it).
pub fn is_child(env: &str, name: &str) -> bool {
    std::env::var(env).is_ok_and(|v| v == name)
}

/// Run only `test` of the test binary `exe` (libtest arguments, so it also works under
/// nextest), let `setup` add env vars or a user, and wait at most `timeout`. On timeout the
/// child is killed and the caller panics, so a hung child never hangs the test run.
pub fn run_test_binary(
    exe: &Path,
    test: &str,
    timeout: Duration,
    setup: impl FnOnce(&mut Command),
) -> Output {
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    setup(&mut cmd);
    let mut child = spawn_retrying_busy(&mut cmd).expect("spawning the test binary");
    // Drain both pipes on their own threads so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child test {test} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Spawn `cmd`, retrying for up to 2 s while the executable is busy (`ETXTBSY`). A test that
/// has just written the binary it runs (a copy that another user may execute) can meet a
/// child forked meanwhile by another test thread of the same process: until that child execs,
/// it holds an inherited descriptor open for writing on the new file, and the kernel refuses
/// to execute a file open for writing. The descriptor goes away at that child's exec.
fn spawn_retrying_busy(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match cmd.spawn() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// A child's status and output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fresh directory under the system temp dir, mode 0755 so that a child running as another
/// user can reach what is copied into it; removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Create `memsync-TAG-PID-NANOS`.
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("memsync-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod of the temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_timeout_kills_and_panics() {
        let r = std::panic::catch_unwind(|| {
            run_test_binary(
                Path::new("/bin/sleep"),
                "x",
                Duration::from_millis(200),
                |c| {
                    // `sleep` ignores the libtest arguments only if we replace them.
                    *c = Command::new("/bin/sleep");
                    c.arg("30").stdout(Stdio::piped()).stderr(Stdio::piped());
                },
            )
        });
        assert!(r.is_err(), "a child past its deadline must fail the test");
    }

    /// The race `spawn_retrying_busy` absorbs, made on purpose: the binary is still open for
    /// writing when the spawn starts, and closed a moment later.
    #[test]
    fn a_binary_busy_for_a_moment_still_runs() {
        let d = TempDir::new("child-busy");
        let exe = d.0.join("echo-copy");
        std::fs::copy("/bin/echo", &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let writer = std::fs::OpenOptions::new().write(true).open(&exe).unwrap();
        assert_eq!(
            Command::new(&exe).arg("x").output().unwrap_err().kind(),
            std::io::ErrorKind::ExecutableFileBusy,
            "the kernel refuses a binary open for writing"
        );
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(writer);
        });
        let out = run_test_binary(&exe, "ran", Duration::from_secs(10), |_| {});
        closer.join().unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("ran"));
    }

    #[test]
    fn output_is_collected() {
        let out = run_test_binary(
            Path::new("/bin/echo"),
            "hello",
            Duration::from_secs(10),
            |_| {},
        );
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hello"),
            "{}",
            describe(&out)
        );
        let d = TempDir::new("child-test");
        assert!(d.0.is_dir());
        let p = d.0.clone();
        drop(d);
        assert!(!p.exists());
    }
}

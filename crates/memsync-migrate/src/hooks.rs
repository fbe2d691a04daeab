//! How the application is suspended at the source and resumed (at the destination after the
//! commit, or at the source after an abort).

use std::fmt;
use std::time::Duration;

use memsync_core::{Result, StoreError, async_trait};
use rustix::process::{Pid, Signal, kill_process};

/// Suspends and resumes the application whose memory (or file) is migrated.
#[async_trait]
pub trait Hooks: Send + Sync + fmt::Debug {
    /// Stop the application; when this returns, it makes no more writes (a write it had begun
    /// has completed, so the change source has seen it).
    async fn suspend(&self) -> Result<()>;
    /// Let it run again.
    async fn resume(&self) -> Result<()>;
}

/// No application (or one that the caller suspends and resumes itself).
#[derive(Debug, Default)]
pub struct NoHooks;

#[async_trait]
impl Hooks for NoHooks {
    async fn suspend(&self) -> Result<()> {
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        Ok(())
    }
}

/// SIGSTOP and SIGCONT of a process. Suspending waits until every thread of it is stopped
/// (`/proc/PID/task/*/stat` state `T`): SIGSTOP takes effect when a thread next returns to
/// user space, so a write system call in progress completes first.
#[derive(Debug)]
pub struct SignalHooks {
    pub pid: i32,
    /// Give up waiting for the stop after this long.
    pub timeout: Duration,
}

impl SignalHooks {
    pub fn new(pid: i32) -> Self {
        SignalHooks {
            pid,
            timeout: Duration::from_secs(10),
        }
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        let pid = Pid::from_raw(self.pid)
            .ok_or_else(|| StoreError::Config(format!("bad pid {}", self.pid)))?;
        kill_process(pid, sig).map_err(|e| {
            StoreError::io("kill", std::io::Error::from(e))
                .context(format!("sending {sig:?} to process {}", self.pid))
        })
    }

    fn all_stopped(&self) -> std::io::Result<bool> {
        for t in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            let stat = std::fs::read_to_string(t?.path().join("stat"))?;
            // The state follows the command name, which is in parentheses and may hold any byte.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if !matches!(state, Some('T' | 't' | 'Z' | 'X')) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[async_trait]
impl Hooks for SignalHooks {
    async fn suspend(&self) -> Result<()> {
        self.signal(Signal::STOP)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match self.all_stopped() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    return Err(StoreError::io("reading /proc", e)
                        .context(format!("waiting for process {} to stop", self.pid)));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Timeout {
                    op: "suspend",
                    after_ms: self.timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    async fn resume(&self) -> Result<()> {
        self.signal(Signal::CONT)
    }
}

/// Hooks for threads of this process that write a migrated region (the embedding case): a
/// writer holds a [`GatePass`] ([`Gate::enter`]) while it may write, e.g. around each batch of
/// writes. Suspending closes the gate (new passes wait) and returns once every pass is
/// dropped, so a write in progress completes first; resuming opens it.
#[derive(Debug, Default)]
pub struct Gate {
    st: std::sync::Mutex<GateSt>,
    open: std::sync::Condvar,
    empty: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct GateSt {
    closed: bool,
    inside: usize,
}

/// Leave to write while it lives (see [`Gate`]).
#[derive(Debug)]
pub struct GatePass<'a>(&'a Gate);

impl Gate {
    pub fn new() -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate::default())
    }

    /// Wait while the gate is closed, then hold it open until the pass is dropped.
    pub fn enter(&self) -> GatePass<'_> {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        while st.closed {
            st = self.open.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.inside += 1;
        GatePass(self)
    }

    /// Whether the gate is closed (the application is suspended).
    pub fn is_closed(&self) -> bool {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).closed
    }
}

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        let mut st = self.0.st.lock().unwrap_or_else(|e| e.into_inner());
        st.inside -= 1;
        if st.inside == 0 && st.closed {
            // A permit: a suspend that checks just before this still wakes.
            self.0.empty.notify_one();
        }
    }
}

#[async_trait]
impl Hooks for Gate {
    async fn suspend(&self) -> Result<()> {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        loop {
            if self.st.lock().unwrap_or_else(|e| e.into_inner()).inside == 0 {
                return Ok(());
            }
            self.empty.notified().await;
        }
    }

    async fn resume(&self) -> Result<()> {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).closed = false;
        self.open.notify_all();
        Ok(())
    }
}

/// Shell commands (`sh -c`), each of which must exit 0.
#[derive(Debug, Default)]
pub struct CommandHooks {
    pub suspend: Option<String>,
    pub resume: Option<String>,
}

async fn run(what: &str, cmd: &Option<String>) -> Result<()> {
    let Some(cmd) = cmd else { return Ok(()) };
    let st = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .await
        .map_err(|e| StoreError::io("spawn", e).context(format!("{what} command {cmd:?}")))?;
    if !st.success() {
        return Err(StoreError::backend(format!(
            "{what} command {cmd:?} failed: {st}"
        )));
    }
    Ok(())
}

#[async_trait]
impl Hooks for CommandHooks {
    async fn suspend(&self) -> Result<()> {
        run("suspend", &self.suspend).await
    }
    async fn resume(&self) -> Result<()> {
        run("resume", &self.resume).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32) -> char {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        s.rsplit_once(')')
            .unwrap()
            .1
            .trim_start()
            .chars()
            .next()
            .unwrap()
    }

    #[tokio::test]
    async fn signals_stop_and_continue_a_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let h = SignalHooks::new(child.id() as i32);
        h.suspend().await.unwrap();
        // suspend returns only once the process is stopped.
        assert_eq!(state(child.id()), 'T');
        h.resume().await.unwrap();
        while state(child.id()) == 'T' {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // A process that is gone: a clear error.
        let e = h.suspend().await.unwrap_err();
        assert!(
            e.chain().contains("SIGSTOP") || e.chain().contains("STOP"),
            "{}",
            e.chain()
        );
    }

    #[tokio::test]
    async fn commands_must_succeed() {
        let h = CommandHooks {
            suspend: Some("true".into()),
            resume: Some("exit 3".into()),
        };
        h.suspend().await.unwrap();
        let e = h.resume().await.unwrap_err();
        assert!(e.chain().contains("exit 3"), "{}", e.chain());
        NoHooks.suspend().await.unwrap();
    }
}

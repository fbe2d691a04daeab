//! Reserved huge pages (`vm.nr_hugepages`) for the tests of hugetlb memory: none are reserved on
//! a fresh machine, and only root can reserve them.

use std::fs::File;

const SYSCTL: &str = "/proc/sys/vm/nr_hugepages";
/// Held by every [`HugePages`] guard: tests in other processes (nextest runs each test in its
/// own) would otherwise raise and restore the sysctl over each other.
const LOCK: &str = "memsync-testkit-hugepages.lock";

/// Free huge pages of the default size (`HugePages_Free` of `/proc/meminfo`).
pub fn free() -> u64 {
    meminfo_field("HugePages_Free:")
}

fn meminfo_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn read_sysctl() -> Result<u64, String> {
    std::fs::read_to_string(SYSCTL)
        .map_err(|e| format!("reading {SYSCTL}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("parsing {SYSCTL}: {e}"))
}

fn write_sysctl(v: u64) -> Result<(), String> {
    std::fs::write(SYSCTL, format!("{v}\n"))
        .map_err(|e| format!("writing {v} to {SYSCTL} (needs root): {e}"))
}

/// At least `n` free huge pages for the guard's lifetime; the sysctl is put back on drop. Holds
/// a lock that serialises the huge page tests of all processes.
#[derive(Debug)]
pub struct HugePages {
    old: Option<u64>,
    _lock: File,
}

impl HugePages {
    /// `Err(reason)` if the pages cannot be had (not root, or memory too fragmented even after
    /// compaction).
    pub fn reserve(n: u64) -> Result<Self, String> {
        let path = std::env::temp_dir().join(LOCK);
        let lock = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        lock.lock()
            .map_err(|e| format!("locking {}: {e}", path.display()))?;
        let mut guard = HugePages {
            old: None,
            _lock: lock,
        };
        let have = free();
        if have >= n {
            return Ok(guard);
        }
        let old = read_sysctl()?;
        write_sysctl(old + n - have)?;
        guard.old = Some(old);
        if free() < n {
            // Fragmented memory: compact it and ask again.
            let _ = std::fs::write("/proc/sys/vm/compact_memory", "1\n");
            write_sysctl(old + n - have)?;
        }
        let got = free();
        if got < n {
            return Err(format!(
                "the kernel found only {got} free huge pages of {n} (memory fragmented?)"
            ));
        }
        Ok(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            let _ = write_sysctl(old);
        }
    }
}

//! Tests inside a virtual machine: a stock Debian kernel booted by `qemu-system-x86_64` under TCG
//! with a busybox initramfs that holds the binaries and the script of a test.
//!
//! Two things cannot be tested on the host: the kernel's own clients (the NBD block device,
//! whose module this host's kernel lacks) and older kernels (6.1 LTS has no UFFDIO_MOVE,
//! UFFDIO_POISON or WP_ASYNC, so the fallbacks only run there). `scripts/setup.sh` installs qemu
//! and busybox-static and unpacks the kernels into [`VM_DIR`]; nothing else is needed.
//!
//! ```no_run
//! use memsync_testkit::vm::{Kernel, Vm};
//! use std::time::Duration;
//! let Some(kernel) = Kernel::debian("6.1", "my_test") else { return }; // a skip outside CI
//! let out = Vm::new(&kernel)
//!     .with_binary("/path/to/memsync") // any executable; its shared libraries come along
//!     .with_modules(&["nbd"])
//!     .run_script("uname -r\nls /dev/nbd0", Duration::from_secs(120));
//! assert!(out.output.contains("6.1."));
//! ```
//!
//! The guest: `/bin` holds busybox (all applets), the added binaries and their libraries (at
//! the paths `ldd` names); `/lib/modules/NAME.ko` the added modules, loaded by `/init` in
//! dependency order; `/proc`, `/sys`, `/dev` (devtmpfs), `/tmp` and `/dev/shm` (tmpfs) are
//! mounted; `/etc/passwd` knows `root` and `nobody`. The script runs as root under `sh -e` in
//! `/tmp`, its stdout and stderr on the serial console between two markers; its exit status
//! is the guest's result. The guest has no network (loopback only) and TCG emulates every
//! instruction: expect a boot of 4-6 s (of the uncompressed kernel, [`Kernel::boot_image`])
//! and code to run several times slower than on the host, so give timeouts room and never
//! read guest timings as performance.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::child::TempDir;

/// Where `scripts/setup.sh` unpacks the guest kernels: `VM_DIR/6.1` and `VM_DIR/6.12` link to
/// the unpacked `linux-image-*` packages (`boot/vmlinuz-RELEASE`, `lib/modules/RELEASE`).
pub const VM_DIR: &str = "/var/tmp/memsync-tools/vm";

/// Set in the guest's environment (to `1`): see [`in_guest`].
pub const GUEST_ENV: &str = "MEMSYNC_VM_GUEST";
/// Set on the host (to `1`) to copy the guest's console to stderr as it comes, for debugging a
/// guest that hangs.
pub const ECHO_ENV: &str = "MEMSYNC_VM_ECHO";

/// Whether this process runs inside a guest of [`Vm`]: a test that boots guests returns at once
/// there, so that running its own binary in the guest does not recurse.
pub fn in_guest() -> bool {
    std::env::var_os(GUEST_ENV).is_some()
}

const BEGIN: &str = "@@memsync-vm-begin@@";
const END: &str = "@@memsync-vm-end rc=";
const PANIC: &str = "Kernel panic - not syncing";

/// An unpacked kernel package: the image and its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The name it was asked for ("6.1").
    pub name: String,
    /// The full release (`uname -r` in the guest), e.g. "6.1.0-57-amd64".
    pub release: String,
    root: PathBuf,
}

impl Kernel {
    /// The Debian kernel `scripts/setup.sh` unpacked as `name` ("6.1" or "6.12"), or a
    /// [`crate::skip::skip`] of `test` when it (or qemu, or busybox) is missing: `None` outside
    /// CI, a panic under CI.
    pub fn debian(name: &str, test: &str) -> Option<Kernel> {
        match Self::find(Path::new(VM_DIR), name) {
            Ok(k) => Some(k),
            Err(why) => {
                crate::skip::skip(test, &format!("{why}; run scripts/setup.sh"));
                None
            }
        }
    }

    /// The kernel unpacked at `dir/name` (a directory holding `boot/vmlinuz-*`), after
    /// checking that qemu and busybox are installed.
    pub fn find(dir: &Path, name: &str) -> Result<Kernel, String> {
        for tool in ["qemu-system-x86_64", "busybox"] {
            if crate::servers::find_tool(tool).is_none() {
                return Err(format!("{tool} is not installed"));
            }
        }
        let root = dir.join(name);
        let boot = std::fs::read_dir(root.join("boot"))
            .map_err(|e| format!("no kernel {name} in {}: {e}", dir.display()))?;
        let release = boot
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find_map(|f| f.strip_prefix("vmlinuz-").map(str::to_owned))
            .ok_or_else(|| format!("no vmlinuz-* in {}", root.join("boot").display()))?;
        Ok(Kernel {
            name: name.to_owned(),
            release,
            root,
        })
    }

    /// The kernel image.
    pub fn image(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// What qemu boots: the uncompressed `vmlinux` of [`Self::image`] (PVH entry), extracted
    /// once and kept beside it, or the bzImage itself when the kernel has no PVH entry or the
    /// extraction fails (said on stderr). Under TCG the bzImage's own decompressor is slow:
    /// measured here, 6.1's xz payload took 6-10 s of every boot, against 0.2 s for qemu to load
    /// the 63 MiB ELF.
    pub fn boot_image(&self) -> PathBuf {
        match self.vmlinux() {
            Ok(p) => p,
            Err(why) => {
                eprintln!(
                    "memsync-testkit: booting the compressed {} ({why})",
                    self.image().display()
                );
                self.image()
            }
        }
    }

    fn vmlinux(&self) -> Result<PathBuf, String> {
        let config = self
            .root
            .join("boot")
            .join(format!("config-{}", self.release));
        let config = std::fs::read_to_string(&config)
            .map_err(|e| format!("reading {}: {e}", config.display()))?;
        if !config.lines().any(|l| l == "CONFIG_PVH=y") {
            return Err("no CONFIG_PVH".into());
        }
        let out = self
            .root
            .join("boot")
            .join(format!("vmlinux-{}", self.release));
        if std::fs::metadata(&out).is_ok_and(|m| m.len() > 0) {
            return Ok(out);
        }
        let image = std::fs::read(self.image()).map_err(|e| format!("reading the image: {e}"))?;
        let (payload, size) = bzimage_payload(&image)?;
        let tool = if payload.starts_with(b"\xfd7zXZ\0") {
            "xz"
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            "zstd"
        } else if payload.starts_with(&[0x1f, 0x8b]) {
            "gzip"
        } else {
            return Err("a payload compressed other than by xz, zstd or gzip".into());
        };
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("running {tool}: {e}"))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = payload.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input));
        let got = child
            .wait_with_output()
            .map_err(|e| format!("{tool} -dc: {e}"))?;
        let _ = feeder.join();
        if !got.status.success()
            || got.stdout.len() as u64 != size
            || !got.stdout.starts_with(b"\x7fELF")
        {
            return Err(format!(
                "{tool} -dc gave {} bytes ({}), not the {size}-byte ELF the image announces",
                got.stdout.len(),
                got.status
            ));
        }
        // Tests may extract at once (threads of one process too): each writes a file of its
        // own and renames it into place.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = out.with_file_name(format!(
            "vmlinux-{}.tmp-{}-{seq}",
            self.release,
            std::process::id()
        ));
        std::fs::write(&tmp, &got.stdout)
            .and_then(|()| std::fs::rename(&tmp, &out))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("writing {}: {e}", out.display())
            })?;
        Ok(out)
    }

    /// `(major, minor)` of the release.
    pub fn version(&self) -> (u32, u32) {
        crate::skip::parse_kernel_version(&self.release).unwrap_or((0, 0))
    }

    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// The module files (paths under [`Self::modules_dir`]) to load for `names`, each after
    /// the modules it depends on, from the `modules.dep` that setup's `depmod` wrote.
    fn module_closure(&self, names: &[String]) -> Result<Vec<String>, String> {
        let dep_file = self.modules_dir().join("modules.dep");
        let text = std::fs::read_to_string(&dep_file)
            .map_err(|e| format!("reading {}: {e}", dep_file.display()))?;
        let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
        for line in text.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let list = rest.split_whitespace().map(module_name).collect();
            deps.insert(module_name(path), (path.to_owned(), list));
        }
        fn visit(
            name: &str,
            deps: &BTreeMap<String, (String, Vec<String>)>,
            seen: &mut HashSet<String>,
            order: &mut Vec<String>,
        ) -> Result<(), String> {
            if !seen.insert(name.to_owned()) {
                return Ok(());
            }
            let (path, list) = deps
                .get(name)
                .ok_or_else(|| format!("no module {name} in modules.dep"))?;
            for d in list {
                visit(d, deps, seen, order)?;
            }
            order.push(path.clone());
            Ok(())
        }
        let (mut seen, mut order) = (HashSet::new(), Vec::new());
        for n in names {
            visit(&module_name(n), &deps, &mut seen, &mut order)?;
        }
        Ok(order)
    }
}

/// The compressed kernel inside a bzImage (boot protocol 2.08+: `setup_sects` at 0x1f1,
/// `payload_offset` and `payload_length` at 0x248 from the protected-mode code, which starts
/// after the setup sectors) without its last 4 bytes, and the uncompressed size those announce.
fn bzimage_payload(image: &[u8]) -> Result<(&[u8], u64), String> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
    };
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS)".into());
    }
    let sects = match image.get(0x1f1).copied() {
        Some(0) => 4,
        Some(n) => usize::from(n),
        None => return Err("a truncated bzImage".into()),
    };
    let (off, len) = u32_at(0x248)
        .zip(u32_at(0x24c))
        .ok_or("a truncated bzImage")?;
    let start = (sects + 1) * 512 + off as usize;
    let end = start + len as usize;
    let payload = image
        .get(start..end)
        .filter(|p| p.len() > 4)
        .ok_or("the payload lies outside the image")?;
    let size = u32::from_le_bytes(payload[payload.len() - 4..].try_into().expect("4 bytes"));
    Ok((&payload[..payload.len() - 4], u64::from(size)))
}

/// `kernel/fs/ext4/ext4.ko.xz` → `ext4`; `crc32c-generic` → `crc32c_generic` (the kernel treats
/// `-` and `_` in module names alike).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// What a guest printed, after a run whose script exited with 0.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// The script's stdout and stderr (the console between the markers, without `\r`; kernel
    /// messages of level warning and above may be interleaved).
    pub output: String,
    /// The whole serial console: firmware, kernel log, `/init`, the script.
    pub console: String,
    /// From starting qemu to the script's start (boot, unpacking, module loading).
    pub boot: Duration,
    /// From starting qemu to its exit.
    pub total: Duration,
}

/// Why a guest run failed. Its `Display` holds the console log.
#[derive(Debug, Clone)]
pub enum GuestFailure {
    /// Building the initramfs or starting qemu failed (on the host).
    Setup(String),
    /// The script exited with a non-zero status (or `/init` failed before it: 125).
    Exit { code: i32, console: String },
    /// The guest kernel panicked.
    Panic { console: String },
    /// No result within the timeout; qemu was killed.
    Timeout { after: Duration, console: String },
    /// qemu exited without the end marker.
    NoResult { status: String, console: String },
}

impl GuestFailure {
    /// The console log, if the guest ran.
    pub fn console(&self) -> &str {
        match self {
            GuestFailure::Setup(_) => "",
            GuestFailure::Exit { console, .. }
            | GuestFailure::Panic { console }
            | GuestFailure::Timeout { console, .. }
            | GuestFailure::NoResult { console, .. } => console,
        }
    }
}

impl fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestFailure::Setup(why) => return write!(f, "VM setup failed: {why}"),
            GuestFailure::Exit { code, .. } => write!(f, "the guest's script exited with {code}")?,
            GuestFailure::Panic { .. } => write!(f, "the guest kernel panicked")?,
            GuestFailure::Timeout { after, .. } => {
                write!(f, "the guest gave no result within {after:?} (qemu killed)")?
            }
            GuestFailure::NoResult { status, .. } => {
                write!(f, "qemu exited ({status}) without the script's result")?
            }
        }
        write!(f, "\n--- guest console ---\n{}", self.console())
    }
}

/// A guest to boot: a kernel, the files of its initramfs, and qemu's settings. Each
/// [`Vm::run_script`] boots a fresh guest.
#[derive(Debug, Clone)]
pub struct Vm {
    kernel: Kernel,
    /// (host path, guest path) of executables, their libraries copied too.
    binaries: Vec<(PathBuf, String)>,
    files: Vec<(String, Vec<u8>, u32)>,
    modules: Vec<String>,
    env: Vec<(String, String)>,
    memory_mib: u32,
    cpus: u32,
    cmdline: String,
}

impl Vm {
    /// A guest of `kernel` with 2 CPUs and 1 GiB of memory.
    pub fn new(kernel: &Kernel) -> Vm {
        Vm {
            kernel: kernel.clone(),
            binaries: Vec::new(),
            files: Vec::new(),
            modules: Vec::new(),
            env: Vec::new(),
            memory_mib: 1024,
            cpus: 2,
            cmdline: String::new(),
        }
    }

    /// Add the executable at `path` as `/bin/FILE-NAME`, with the shared libraries it needs.
    pub fn with_binary(self, path: impl AsRef<Path>) -> Vm {
        let path = path.as_ref();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.with_binary_as(path, &name)
    }

    /// Add the executable at `path` as `/bin/NAME` (e.g. a test binary `region-HASH` as
    /// `region`), with the shared libraries it needs.
    pub fn with_binary_as(mut self, path: impl AsRef<Path>, name: &str) -> Vm {
        self.binaries
            .push((path.as_ref().to_owned(), format!("bin/{name}")));
        self
    }

    /// Add a file at the absolute guest path `path` with `mode` (e.g. 0o755 for a script).
    pub fn with_file(mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Vm {
        self.files.push((
            path.trim_start_matches('/').to_owned(),
            contents.into(),
            mode,
        ));
        self
    }

    /// Load these kernel modules (and the modules they depend on) before the script, e.g.
    /// `["nbd"]` or `["ext4", "crc32c_generic"]` (ext4 asks for crc32c at mount time).
    pub fn with_modules(mut self, names: &[&str]) -> Vm {
        self.modules.extend(names.iter().map(|n| n.to_string()));
        self
    }

    /// Export `key=value` to the script.
    pub fn with_env(mut self, key: &str, value: &str) -> Vm {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Guest memory in MiB (default 1024; the initramfs is unpacked into it).
    pub fn with_memory_mib(mut self, mib: u32) -> Vm {
        self.memory_mib = mib;
        self
    }

    /// Guest CPUs (default 2).
    pub fn with_cpus(mut self, cpus: u32) -> Vm {
        self.cpus = cpus;
        self
    }

    /// Append to the kernel command line.
    pub fn with_cmdline(mut self, args: &str) -> Vm {
        self.cmdline.push(' ');
        self.cmdline.push_str(args);
        self
    }

    /// Boot, run `script` (shell, under `sh -e`), and return its output; panic with the
    /// console log if the script fails, the kernel panics or no result comes within `timeout`
    /// (which covers the boot).
    #[track_caller]
    pub fn run_script(&self, script: &str, timeout: Duration) -> GuestOutput {
        match self.try_run_script(script, timeout) {
            Ok(out) => out,
            Err(e) => panic!("VM test on Linux {}: {e}", self.kernel.release),
        }
    }

    /// [`Vm::run_script`] returning the failure instead of panicking.
    pub fn try_run_script(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<GuestOutput, GuestFailure> {
        let dir = TempDir::new("vm");
        let initrd = self
            .build_initramfs(&dir.0, script)
            .map_err(GuestFailure::Setup)?;
        match self.boot(&initrd, timeout) {
            // A panic before the script began is the emulator's, not the test's: TCG's
            // multi-threaded cross-modifying code sometimes breaks the kernel's early text
            // patching (seen once: an int3 Oops in sched_clock_cpu during the 6.12 boot, 2 s
            // in). One more boot tells that apart from a kernel that cannot boot at all.
            Err(GuestFailure::Panic { console }) if !console.contains(BEGIN) => {
                eprintln!(
                    "memsync-testkit: the Linux {} guest panicked while booting, before the \
                     script; booting it once more. Its console:\n{console}",
                    self.kernel.release
                );
                self.boot(&initrd, timeout)
            }
            r => r,
        }
    }

    fn build_initramfs(&self, dir: &Path, script: &str) -> Result<PathBuf, String> {
        let root = dir.join("root");
        for d in [
            "bin",
            "sbin",
            "etc",
            "proc",
            "sys",
            "dev",
            "tmp",
            "root",
            "lib/modules",
        ] {
            mkdir(&root.join(d))?;
        }
        let busybox = crate::servers::find_tool("busybox").ok_or("busybox is not installed")?;
        let mut binaries = vec![(busybox, "bin/busybox".to_owned())];
        binaries.extend(self.binaries.iter().cloned());
        let mut libs = HashSet::new();
        for (host, guest) in &binaries {
            copy_executable(host, &root.join(guest))?;
            for lib in shared_libraries(host)? {
                if libs.insert(lib.clone()) {
                    let dst = root.join(lib.trim_start_matches('/'));
                    mkdir(dst.parent().expect("a library path has a parent"))?;
                    std::fs::copy(&lib, &dst).map_err(|e| format!("copying {lib}: {e}"))?;
                }
            }
        }
        let modules = self.kernel.module_closure(&self.modules)?;
        let mut insmods = String::new();
        for m in &modules {
            let name = module_name(m);
            let dst = root.join(format!("lib/modules/{name}.ko"));
            unpack_module(&self.kernel.modules_dir().join(m), &dst)?;
            insmods.push_str(&format!(
                "insmod /lib/modules/{name}.ko || fail 'insmod {name}'\n"
            ));
        }
        write(
            &root.join("etc/passwd"),
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )?;
        write(
            &root.join("etc/group"),
            b"root:x:0:\nnogroup:x:65534:\n",
            0o644,
        )?;
        for (path, contents, mode) in &self.files {
            let dst = root.join(path);
            mkdir(dst.parent().expect("a file path has a parent"))?;
            write(&dst, contents, *mode)?;
        }
        write(&root.join("run.sh"), script.as_bytes(), 0o755)?;
        let mut env = String::new();
        for (k, v) in &self.env {
            env.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        let init = format!(
            r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin HOME=/root TMPDIR=/tmp {GUEST_ENV}=1
fail() {{ echo "memsync-vm: $1 failed"; echo "{END}125@@"; poweroff -f; }}
mount -t proc proc /proc || fail 'mount /proc'
mount -t sysfs sysfs /sys || fail 'mount /sys'
mount -t devtmpfs devtmpfs /dev || fail 'mount /dev'
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm || fail 'mount /dev/shm'
mount -t tmpfs tmpfs /tmp || fail 'mount /tmp'
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up || fail 'loopback'
{insmods}{env}cd /tmp
echo "{BEGIN}"
sh -e /run.sh </dev/null 2>&1
echo "{END}$?@@"
poweroff -f
"#
        );
        write(&root.join("init"), init.as_bytes(), 0o755)?;

        // `busybox cpio -o -H newc` takes the file list on stdin, parents first.
        let mut list = Vec::new();
        list_tree(&root, Path::new("."), &mut list)?;
        let initrd = dir.join("initrd.cpio");
        let out = std::fs::File::create(&initrd).map_err(|e| format!("creating initrd: {e}"))?;
        let mut cpio = Command::new(crate::servers::find_tool("busybox").expect("checked above"))
            .args(["cpio", "-o", "-H", "newc"])
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("running busybox cpio: {e}"))?;
        let mut stdin = cpio.stdin.take().expect("piped stdin");
        stdin
            .write_all(list.join("\n").as_bytes())
            .and_then(|()| stdin.write_all(b"\n"))
            .map_err(|e| format!("writing the cpio list: {e}"))?;
        drop(stdin);
        let status = cpio.wait().map_err(|e| format!("busybox cpio: {e}"))?;
        if !status.success() {
            return Err(format!("busybox cpio failed: {status}"));
        }
        Ok(initrd)
    }

    fn boot(&self, initrd: &Path, timeout: Duration) -> Result<GuestOutput, GuestFailure> {
        let qemu = crate::servers::find_tool("qemu-system-x86_64")
            .ok_or_else(|| GuestFailure::Setup("qemu-system-x86_64 is not installed".into()))?;
        let start = Instant::now();
        // Only TCG: /dev/kvm here is a PVM hypervisor that needs its own guest kernel.
        let child = Command::new(qemu)
            // One host thread runs every vCPU in turn (thread=single). With a host thread per
            // vCPU (MTTCG, qemu's default) the guests were slower and their times varied
            // widely on this loaded 2-CPU host (likely a descheduled vCPU thread holding up
            // the others' IPIs, TLB flushes and locks). Measured, two guests side by side at
            // load 6: the direct-mount tests 62.7 / 74.3 s -> 33.5 / 38.1 s; the region
            // matrix on 6.12 took 17-113 s with MTTCG, 21.5 s with one thread.
            .args([
                "-accel",
                "tcg,thread=single",
                "-M",
                "pc",
                "-nographic",
                "-no-reboot",
                "-nic",
                "none",
            ])
            .args([
                "-smp",
                &self.cpus.to_string(),
                "-m",
                &self.memory_mib.to_string(),
            ])
            .arg("-kernel")
            .arg(self.kernel.boot_image())
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            // loglevel=4: warnings and worse reach the console, so that a kernel splat is in
            // the log but routine messages do not interleave with the script's output.
            .arg(format!(
                "console=ttyS0 panic=-1 oops=panic loglevel=4{}",
                self.cmdline
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| GuestFailure::Setup(format!("starting qemu: {e}")))?;
        let mut qemu = Qemu(child);
        let console = Arc::new(Mutex::new(Vec::new()));
        let began = Arc::new(Mutex::new(None));
        let reader = {
            let mut stdout = qemu.0.stdout.take().expect("piped stdout");
            let (console, began) = (console.clone(), began.clone());
            let echo = std::env::var_os(ECHO_ENV).is_some_and(|v| !v.is_empty() && v != "0");
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if echo {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    let mut c = console.lock();
                    c.extend_from_slice(&buf[..n]);
                    let mut b = began.lock();
                    if b.is_none() && find(&c, BEGIN.as_bytes()).is_some() {
                        *b = Some(start.elapsed());
                    }
                }
            })
        };
        let stderr = {
            let mut e = qemu.0.stderr.take().expect("piped stderr");
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = e.read_to_end(&mut v);
                v
            })
        };
        let status = loop {
            match qemu.0.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if start.elapsed() >= timeout => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(GuestFailure::Setup(format!("waiting for qemu: {e}"))),
            }
        };
        let total = start.elapsed();
        if status.is_none() {
            qemu.kill();
        }
        let _ = reader.join();
        let qemu_err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
        let mut console = String::from_utf8_lossy(&console.lock()).replace('\r', "");
        if !qemu_err.trim().is_empty() {
            console.push_str("\n--- qemu stderr ---\n");
            console.push_str(&qemu_err);
        }
        let Some(status) = status else {
            return Err(GuestFailure::Timeout {
                after: timeout,
                console,
            });
        };
        if console.contains(PANIC) {
            return Err(GuestFailure::Panic { console });
        }
        let code = console.rfind(END).and_then(|i| {
            let rest = &console[i + END.len()..];
            rest[..rest.find("@@")?].trim().parse::<i32>().ok()
        });
        let output = console
            .find(BEGIN)
            .map(|b| {
                let body = &console[b + BEGIN.len()..];
                body[..body.rfind(END).unwrap_or(body.len())]
                    .trim_start_matches('\n')
                    .to_owned()
            })
            .unwrap_or_default();
        match code {
            Some(0) => Ok(GuestOutput {
                output,
                boot: began.lock().unwrap_or(total),
                total,
                console,
            }),
            Some(code) => Err(GuestFailure::Exit { code, console }),
            None => Err(GuestFailure::NoResult {
                status: status.to_string(),
                console,
            }),
        }
    }
}

/// Run the tests of the libtest binary `exe` (usually the calling test's own,
/// `std::env::current_exe()`) inside a guest of `kernel` with the libtest arguments `args`
/// (filters: the tests whose names contain one of them; `--skip NAME`; `--exact`), two at a
/// time and with `--nocapture` (so that `SKIPPED` lines are in the output), with `CI=true` (so
/// a test may skip only for a feature the guest kernel predates, see [`crate::skip`]). Tests
/// whose names contain `kernel_matrix` are left out (they boot the guests). Panics with the
/// console log unless every selected test passes; returns the output for further checks.
#[track_caller]
pub fn run_test_binary(
    kernel: &Kernel,
    exe: &Path,
    args: &[&str],
    timeout: Duration,
) -> GuestOutput {
    let mut script = String::from("tests --test-threads=2 --nocapture --skip kernel_matrix");
    for a in args {
        script.push(' ');
        script.push_str(&shell_quote(a));
    }
    let out = Vm::new(kernel)
        .with_binary_as(exe, "tests")
        .with_env("CI", "true")
        .with_env("RUST_BACKTRACE", "1")
        .run_script(&script, timeout);
    let summary = out
        .output
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or("no summary");
    assert!(
        summary.starts_with("test result: ok") && !summary.contains(" 0 passed"),
        "Linux {}: {summary}\n{}",
        kernel.release,
        out.console
    );
    eprintln!(
        "Linux {}: {summary} (boot {:.1?}, total {:.1?})",
        kernel.release, out.boot, out.total
    );
    out
}

/// qemu, killed when dropped (a panicking test never leaves a guest running).
struct Qemu(Child);

impl Qemu {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn mkdir(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()))
}

fn write(p: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    std::fs::write(p, contents).map_err(|e| format!("writing {}: {e}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", p.display()))
}

/// Copy an executable without its debug info (test binaries carry hundreds of MiB of it, which
/// the guest would have to unpack into its memory); a plain copy where `strip` fails.
fn copy_executable(src: &Path, dst: &Path) -> Result<(), String> {
    mkdir(dst.parent().expect("a guest path has a parent"))?;
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(dst)
        .arg(src)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(src, dst).map_err(|e| format!("copying {}: {e}", src.display()))?;
    }
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", dst.display()))
}

/// The absolute paths of the shared libraries and the loader that `ldd` lists for `exe`
/// (none for a static executable).
fn shared_libraries(exe: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| format!("running ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static executable: ldd says so and fails.
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(format!("ldd {} failed: {text}{err}", exe.display()));
    }
    Ok(parse_ldd(&text))
}

fn parse_ldd(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

fn unpack_module(src: &Path, dst: &Path) -> Result<(), String> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::copy(src, dst)
            .map(drop)
            .map_err(|e| format!("copying {name}: {e}")),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(src)
                .output()
                .map_err(|e| format!("running {tool} for {name}: {e}"))?;
            if !out.status.success() {
                return Err(format!("{tool} -dc {name} failed"));
            }
            write(dst, &out.stdout, 0o644)
        }
    }
}

/// Every path under `root` relative to it, each directory before its contents.
fn list_tree(root: &Path, rel: &Path, out: &mut Vec<String>) -> Result<(), String> {
    out.push(rel.to_string_lossy().into_owned());
    let dir = root.join(rel);
    if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    entries.sort();
    for e in entries {
        list_tree(root, &rel.join(e), out)?;
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parses() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn bzimage_payload_is_found_by_the_setup_header() {
        // One setup sector after the boot sector: the protected-mode code starts at 1024.
        let mut image = vec![0u8; 1100];
        image[0x1f1] = 1;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&10u32.to_le_bytes());
        image[1040..1046].copy_from_slice(b"packed");
        image[1046..1050].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(bzimage_payload(&image).unwrap(), (&b"packed"[..], 4096));
        image[0x24c..0x250].copy_from_slice(&100u32.to_le_bytes());
        assert!(bzimage_payload(&image).is_err(), "past the end");
        assert!(bzimage_payload(b"\x7fELF not a bzImage").is_err());
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
        assert_eq!(
            module_name("kernel/crypto/crc32c_generic.ko"),
            "crc32c_generic"
        );
        assert_eq!(module_name("crc32c-generic"), "crc32c_generic");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}

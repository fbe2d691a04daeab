//! Integration tests of memsync-sys on real memory: every userfaultfd ioctl,
//! the events, `PAGEMAP_SCAN`, `SCM_RIGHTS` and the unprivileged path.
//!
//! Tests needing another process re-execute this binary with a test filter
//! and an environment variable (`MEMSYNC_SYS_CHILD`, `MEMSYNC_SYS_UNPRIV`);
//! the `child_*` and `unprivileged_child` tests do nothing without it. Every
//! wait is bounded, so a kernel or handler bug fails a test instead of
//! hanging it. A test whose kernel feature is missing prints `SKIPPED: ...`
//! and passes, unless CI is set and the kernel is new enough to have it
//! (`memsync_testkit::skip`).

use memsync_testkit::child::{self, TempDir, describe};
use memsync_testkit::skip;
use memsync_testkit::uffd::wait_in_userfault;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use memsync_sys::{
    Advice, ContinueMode, CopyMode, Event, Features, Install, Ioctls, MapOptions, Mapping,
    MemfdFlags, MoveMode, OpenFlags, PageCategories, PageFaultFlags, PageRegion, PagemapScanner,
    RegisterMode, ScanArgs, ScanFlags, SigbusResolver, Uffd, UffdMsg, euid, ftruncate, gettid,
    memfd_create, page_size, pmd_size, raw, recv_fds, send_fds,
};

/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn page() -> usize {
    page_size()
}

/// Deterministic test bytes.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(131)
                .wrapping_add(u32::from(seed) * 7 + (i as u32 >> 12)) as u8
        })
        .collect()
}

/// Flags that work for the current user: a full userfaultfd as root,
/// user-mode-only otherwise.
fn flags() -> OpenFlags {
    if euid() == 0 {
        OpenFlags::default()
    } else {
        OpenFlags {
            user_mode_only: true,
            ..OpenFlags::default()
        }
    }
}

/// The Linux version that introduced each userfaultfd feature.
fn feature_since(f: Features) -> (u32, u32) {
    [
        (Features::PAGEFAULT_FLAG_WP, (5, 7)),
        (Features::SIGBUS, (4, 14)),
        (Features::THREAD_ID, (4, 14)),
        (Features::MINOR_HUGETLBFS, (5, 13)),
        (Features::MINOR_SHMEM, (5, 14)),
        (Features::EXACT_ADDRESS, (5, 18)),
        (Features::WP_HUGETLBFS_SHMEM, (5, 19)),
        (Features::WP_UNPOPULATED, (6, 4)),
        (Features::POISON, (6, 6)),
        (Features::WP_ASYNC, (6, 7)),
        (Features::MOVE, (6, 8)),
    ]
    .into_iter()
    .find_map(|(g, v)| (g == f).then_some(v))
    // The events and hugetlbfs/shmem MISSING support came with Linux 4.11.
    .unwrap_or((4, 11))
}

/// Whether the kernel supports `features`; if not, skips `test` per
/// `memsync_testkit::skip::kernel_feature` (a failure under CI on a kernel
/// that should have them).
fn kernel_has(test: &str, features: Features) -> bool {
    let supported = Uffd::probe_features().expect("probing userfaultfd features");
    let missing = features - supported;
    for (name, f) in missing.iter_names() {
        skip::kernel_feature(test, &format!("UFFD_FEATURE_{name}"), feature_since(f));
    }
    missing.is_empty()
}

/// Opens a userfaultfd with `features` enabled, or skips the test ([`kernel_has`])
/// and returns `None` if the kernel does not support them.
fn uffd_or_skip(test: &str, features: Features) -> Option<Uffd> {
    if !kernel_has(test, features) {
        return None;
    }
    let (uffd, info) = Uffd::with_features(flags(), features).expect("userfaultfd + UFFDIO_API");
    assert!(info.enabled.contains(features));
    assert_eq!(uffd.features(), info.enabled);
    Some(uffd)
}

/// Runs `f` on a new thread; its result arrives on the returned channel.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Waits (bounded) for a [`spawn`]ed thread's result.
#[track_caller]
fn join<T>(rx: &mpsc::Receiver<T>) -> T {
    match rx.recv_timeout(WAIT) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => panic!("thread did not finish within {WAIT:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("thread panicked"),
    }
}

/// Asserts that a [`spawn`]ed thread is still running (blocked) after `d`.
#[track_caller]
fn assert_blocked<T>(rx: &mpsc::Receiver<T>, d: Duration) {
    match rx.recv_timeout(d) {
        Err(RecvTimeoutError::Timeout) => {}
        Ok(_) => panic!("thread finished although it should be blocked on a fault"),
        Err(RecvTimeoutError::Disconnected) => panic!("thread panicked"),
    }
}

#[track_caller]
fn next_event(uffd: &Uffd) -> Event {
    uffd.next_event(Some(WAIT))
        .expect("reading a userfaultfd event")
        .expect("no event within timeout")
}

/// Waits for a page fault and returns `(addr, flags, thread id)`.
#[track_caller]
fn next_fault(uffd: &Uffd) -> (usize, PageFaultFlags, Option<u32>) {
    match next_event(uffd) {
        Event::PageFault {
            addr,
            flags,
            thread_id,
        } => (addr, flags, thread_id),
        other => panic!("expected a page fault, got {other:?}"),
    }
}

/// Asserts that no event arrives within `d`.
#[track_caller]
fn assert_no_event(uffd: &Uffd, d: Duration) {
    if let Some(ev) = uffd.next_event(Some(d)).unwrap() {
        panic!("unexpected event {ev:?}");
    }
}

fn page_down(addr: usize) -> usize {
    addr & !(page() - 1)
}

/// Whether this process runs the child part `name` of a multi-process test.
fn is_child(name: &str) -> bool {
    child::is_child("MEMSYNC_SYS_CHILD", name)
}

/// Re-executes `exe` running only `test`, with a bounded wait.
fn run_test_process(exe: &Path, test: &str, cmd_setup: impl FnOnce(&mut Command)) -> Output {
    child::run_test_binary(exe, test, WAIT, cmd_setup)
}

fn regions(list: &[PageRegion], base: usize) -> Vec<(usize, usize)> {
    list.iter()
        .map(|r| ((r.start() - base) / page(), (r.end() - base) / page()))
        .collect()
}

// ---------------------------------------------------------------------------
// Handshake, features, ioctl numbers
// ---------------------------------------------------------------------------

#[test]
fn api_handshake_and_feature_probe() {
    let supported = Uffd::probe_features().unwrap();
    eprintln!("supported userfaultfd features: {supported:?}");
    // What memsync uses: absent only on kernels that predate it (see kernel_has).
    kernel_has(
        "api_handshake_and_feature_probe",
        Features::MOVE | Features::POISON | Features::WP_ASYNC | Features::MINOR_SHMEM,
    );

    let uffd = Uffd::open(OpenFlags {
        nonblock: true,
        ..flags()
    })
    .unwrap();
    assert_eq!(uffd.features(), Features::empty());
    let wanted = (Features::THREAD_ID | Features::WP_ASYNC | Features::EVENT_REMOVE) & supported;
    let info = uffd.api(wanted).unwrap();
    assert_eq!(info.supported, supported);
    assert!(info.enabled.contains(wanted));
    if wanted.contains(Features::WP_ASYNC) {
        assert!(
            info.enabled.contains(Features::WP_UNPOPULATED),
            "WP_ASYNC implies WP_UNPOPULATED"
        );
    }
    assert!(
        info.ioctls
            .contains(Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER),
        "{:?}",
        info.ioctls
    );
    assert_eq!(uffd.features(), info.enabled);

    // The handshake works once per descriptor.
    let again = uffd.api(Features::empty()).unwrap_err();
    assert_eq!(again.raw_os_error(), Some(libc::EINVAL));

    // Nothing pending on a non-blocking descriptor.
    let mut msgs: Vec<UffdMsg> = (0..4).map(|_| UffdMsg::default()).collect();
    assert_eq!(uffd.read_events(&mut msgs).unwrap(), 0);
    assert!(!uffd.poll_readable(Some(Duration::from_millis(10))).unwrap());
    assert!(uffd.read_event().unwrap().is_none());
    assert!(
        uffd.next_event(Some(Duration::from_millis(10)))
            .unwrap()
            .is_none()
    );

    // poll(2) is meaningless on a blocking userfaultfd (the kernel says POLLERR).
    let blocking = Uffd::open(OpenFlags {
        nonblock: false,
        ..flags()
    })
    .unwrap();
    assert!(!blocking.is_nonblocking() && uffd.is_nonblocking());
    blocking.api(Features::empty()).unwrap();
    let err = blocking.poll_readable(Some(Duration::ZERO)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

    // from_fd accepts a userfaultfd (reading its features) and nothing else.
    let dup = Uffd::from_fd(uffd.as_fd().try_clone_to_owned().unwrap()).unwrap();
    assert_eq!(dup.features(), info.enabled);
    let memfd = memfd_create("not-a-uffd", MemfdFlags::default()).unwrap();
    assert_eq!(
        Uffd::from_fd(memfd).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
}

#[test]
fn ioctl_numbers_match_c_headers() {
    // Compile-time pins cover the literal values; this cross-checks against
    // the C preprocessor of this machine (where a compiler exists). Headers
    // older than the ioctl get it from a local definition of the struct.
    let dir = TempDir::new("ioctl");
    let src = dir.0.join("n.c");
    std::fs::write(
        &src,
        r#"
#include <stdio.h>
#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/userfaultfd.h>
struct t_move { __u64 dst, src, len, mode; __s64 move; };
struct t_poison { struct uffdio_range range; __u64 mode; __s64 updated; };
struct t_pm_scan_arg { __u64 f[12]; };
#ifndef UFFDIO_MOVE
#define UFFDIO_MOVE _IOWR(UFFDIO, 0x05, struct t_move)
#endif
#ifndef UFFDIO_POISON
#define UFFDIO_POISON _IOWR(UFFDIO, 0x08, struct t_poison)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN _IOWR('f', 16, struct t_pm_scan_arg)
#endif
#define P(x) printf(#x " %lu\n", (unsigned long)(x))
int main(void) {
  P(UFFDIO_API); P(UFFDIO_REGISTER); P(UFFDIO_UNREGISTER); P(UFFDIO_WAKE);
  P(UFFDIO_COPY); P(UFFDIO_ZEROPAGE); P(UFFDIO_MOVE); P(UFFDIO_WRITEPROTECT);
  P(UFFDIO_CONTINUE); P(UFFDIO_POISON); P(USERFAULTFD_IOC_NEW); P(PAGEMAP_SCAN);
  return 0;
}
"#,
    )
    .unwrap();
    let bin = dir.0.join("n");
    const TEST: &str = "ioctl_numbers_match_c_headers";
    let out = match Command::new("cc").arg("-o").arg(&bin).arg(&src).output() {
        Ok(o) => o,
        Err(e) => {
            skip::skip(TEST, &format!("no C compiler (cc: {e})"));
            return;
        }
    };
    if !out.status.success() {
        skip::skip(
            TEST,
            &format!(
                "the kernel headers do not compile here (libc6-dev, linux-libc-dev): {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        );
        return;
    }
    let out = Command::new(&bin).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let numbers = raw::ioctl_numbers();
    assert_eq!(text.lines().count(), numbers.len(), "{text}");
    for line in text.lines() {
        let (name, value) = line.split_once(' ').unwrap();
        let value: u64 = value.parse().unwrap();
        let (_, ours, _) = numbers.iter().find(|(n, _, _)| *n == name).unwrap();
        assert_eq!(u64::from(*ours), value, "{name}: {ours:#x} vs C {value:#x}");
    }
}

// ---------------------------------------------------------------------------
// MISSING faults on anonymous memory
// ---------------------------------------------------------------------------

#[test]
fn missing_fault_resolved_with_copy() {
    let features = Features::THREAD_ID | Features::EXACT_ADDRESS;
    let Some(uffd) = uffd_or_skip("missing_fault_resolved_with_copy", features) else {
        return;
    };
    let m = Arc::new(Mapping::anonymous(4 * page()).unwrap());
    let ioctls = uffd.register(&m, RegisterMode::MISSING).unwrap();
    assert!(
        ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE),
        "{ioctls:?}"
    );

    // A write fault: exact address, WRITE flag, thread id.
    let data = pattern(1, page());
    let (tid_tx, tid_rx) = mpsc::channel();
    let writer = {
        let m = Arc::clone(&m);
        spawn(move || {
            tid_tx.send(gettid()).unwrap();
            m.write_at(page() + 5, b"X");
            m.read_vec(page(), page())
        })
    };
    let tid = tid_rx.recv_timeout(WAIT).unwrap();
    let (addr, flags, thread_id) = next_fault(&uffd);
    assert_eq!(
        addr,
        m.addr() + page() + 5,
        "EXACT_ADDRESS reports the byte"
    );
    assert!(flags.contains(PageFaultFlags::WRITE), "{flags:?}");
    assert!(
        !flags.contains(PageFaultFlags::WP | PageFaultFlags::MINOR),
        "{flags:?}"
    );
    assert_eq!(thread_id, Some(tid));
    assert_eq!(
        uffd.copy(page_down(addr), &data, CopyMode::empty())
            .unwrap(),
        Install::Done(page())
    );
    let mut expected = data.clone();
    expected[5] = b'X';
    assert_eq!(join(&writer), expected);

    // A read fault: no WRITE flag, the reader sees exactly the copied bytes.
    let data = pattern(2, page());
    let reader = {
        let m = Arc::clone(&m);
        spawn(move || m.read_vec(3 * page(), page()))
    };
    let (addr, flags, _) = next_fault(&uffd);
    assert_eq!(addr, m.addr() + 3 * page());
    assert!(!flags.contains(PageFaultFlags::WRITE), "{flags:?}");
    assert_eq!(
        uffd.copy(addr, &data, CopyMode::empty()).unwrap(),
        Install::Done(page())
    );
    assert_eq!(join(&reader), data);
    assert_no_event(&uffd, Duration::from_millis(50));
}

#[test]
fn missing_fault_resolved_with_zeropage() {
    let Some(uffd) = uffd_or_skip("missing_fault_resolved_with_zeropage", Features::empty()) else {
        return;
    };
    let m = Arc::new(Mapping::anonymous(2 * page()).unwrap());
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let reader = {
        let m = Arc::clone(&m);
        spawn(move || {
            let zeros = m.read_vec(page(), page());
            m.write_at(page() + 1, b"ok");
            (zeros, m.read_vec(page(), 4))
        })
    };
    let (addr, _, thread_id) = next_fault(&uffd);
    assert_eq!(
        addr,
        m.addr() + page(),
        "without EXACT_ADDRESS the page start is reported"
    );
    assert_eq!(thread_id, None, "no THREAD_ID feature");
    assert_eq!(
        uffd.zeropage(addr, page(), false).unwrap(),
        Install::Done(page())
    );
    let (zeros, after) = join(&reader);
    assert!(zeros.iter().all(|&b| b == 0));
    assert_eq!(after, [0, b'o', b'k', 0]);
    // The write hit the zero page (COW), not a userfault.
    assert_no_event(&uffd, Duration::from_millis(50));
    assert_eq!(uffd.zeropage(addr, page(), false).unwrap(), Install::Exists);
}

#[test]
fn copy_exists_partial_progress_and_wake() {
    let Some(uffd) = uffd_or_skip("copy_exists_partial_progress_and_wake", Features::THREAD_ID)
    else {
        return;
    };
    let m = Arc::new(Mapping::anonymous(8 * page()).unwrap());
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let base = m.addr();
    let one = pattern(3, page());
    let two = pattern(4, 2 * page());

    // Without a waiting thread a copy just installs.
    assert_eq!(
        uffd.copy(base, &one, CopyMode::empty()).unwrap(),
        Install::Done(page())
    );
    assert_eq!(m.read_vec(0, page()), one);
    // Already present: EEXIST.
    assert_eq!(
        uffd.copy(base, &one, CopyMode::empty()).unwrap(),
        Install::Exists
    );
    // Page 3 present, page 2 missing: copying 2..4 installs page 2 and stops.
    assert_eq!(
        uffd.copy(base + 3 * page(), &one, CopyMode::empty())
            .unwrap(),
        Install::Done(page())
    );
    assert_eq!(
        uffd.copy(base + 2 * page(), &two, CopyMode::empty())
            .unwrap(),
        Install::Again { done: page() }
    );
    assert_eq!(m.read_vec(2 * page(), page()), two[..page()]);
    assert_eq!(
        m.read_vec(3 * page(), page()),
        one,
        "the existing page is untouched"
    );
    // Errors other than EEXIST/EAGAIN are errors: unaligned destination.
    assert_eq!(
        uffd.copy(base + 1, &one, CopyMode::empty())
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EINVAL)
    );
    // Unregistered destination.
    let other = Mapping::anonymous(page()).unwrap();
    let err = uffd
        .copy(other.addr(), &one, CopyMode::empty())
        .unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)),
        "{err}"
    );

    // DONTWAKE leaves the faulting thread asleep until UFFDIO_WAKE.
    let data = pattern(5, page());
    let reader = {
        let m = Arc::clone(&m);
        spawn(move || m.read_vec(5 * page(), page()))
    };
    let (addr, _, tid) = next_fault(&uffd);
    assert_eq!(addr, base + 5 * page());
    // Wait until the faulting thread sleeps: a copy racing with its last
    // check of the page table would let it continue without a wake.
    wait_in_userfault(tid.expect("THREAD_ID gives the thread id"), WAIT);
    assert_eq!(
        uffd.copy(addr, &data, CopyMode::DONTWAKE).unwrap(),
        Install::Done(page())
    );
    assert_blocked(&reader, Duration::from_millis(300));
    uffd.wake(addr, page()).unwrap();
    assert_eq!(join(&reader), data);

    // Exists + wake: a second handler resolving the same fault.
    let reader = {
        let m = Arc::clone(&m);
        spawn(move || m.read_vec(6 * page(), 8))
    };
    let (addr, _, tid) = next_fault(&uffd);
    wait_in_userfault(tid.expect("THREAD_ID gives the thread id"), WAIT);
    assert_eq!(
        uffd.copy(addr, &data, CopyMode::DONTWAKE).unwrap(),
        Install::Done(page())
    );
    assert_eq!(
        uffd.copy(addr, &data, CopyMode::empty()).unwrap(),
        Install::Exists
    );
    uffd.wake(addr, page()).unwrap();
    assert_eq!(join(&reader), data[..8]);
}

#[test]
fn missing_faults_resolved_with_move() {
    let Some(uffd) = uffd_or_skip("missing_faults_resolved_with_move", Features::MOVE) else {
        return;
    };
    let chunk = pmd_size();
    let region = Arc::new(
        Mapping::anonymous_with(
            2 * chunk,
            MapOptions {
                align: chunk,
                ..MapOptions::default()
            },
        )
        .unwrap(),
    );
    region.advise(0, region.len(), Advice::HugePage).unwrap();
    let ioctls = uffd.register(&region, RegisterMode::MISSING).unwrap();
    assert!(ioctls.contains(Ioctls::MOVE), "{ioctls:?}");

    // 4 KiB: one page from a small staging buffer.
    let staging = Mapping::anonymous(page()).unwrap();
    let small = pattern(6, page());
    staging.write_at(0, &small);
    let reader = {
        let region = Arc::clone(&region);
        spawn(move || region.read_vec(3 * page(), page()))
    };
    let (addr, _, _) = next_fault(&uffd);
    assert_eq!(addr, region.addr() + 3 * page());
    assert_eq!(
        uffd.move_pages(addr, &staging, 0, page(), MoveMode::empty())
            .unwrap(),
        Install::Done(page())
    );
    assert_eq!(join(&reader), small);
    assert_eq!(
        staging.read_vec(0, page()),
        vec![0; page()],
        "the source page moved away"
    );

    // 2 MiB: a whole chunk from an aligned staging buffer (a THP if the
    // kernel gave one; moved as a PMD then).
    let staging = Mapping::anonymous_with(
        chunk,
        MapOptions {
            align: chunk,
            ..MapOptions::default()
        },
    )
    .unwrap();
    staging.advise(0, chunk, Advice::HugePage).unwrap();
    let big = pattern(7, chunk);
    staging.write_at(0, &big);
    let huge_before = PagemapScanner::new()
        .unwrap()
        .scan_all(
            &ScanArgs {
                category_mask: PageCategories::HUGE,
                ..ScanArgs::new(staging.addr(), staging.addr() + chunk)
            },
            &mut Vec::new(),
        )
        .unwrap();
    let reader = {
        let region = Arc::clone(&region);
        spawn(move || {
            let mut probe = [0u8; 16];
            region.read_at(chunk + chunk / 2 + 7, &mut probe);
            region.read_vec(chunk, chunk)
        })
    };
    let (addr, _, _) = next_fault(&uffd);
    assert_eq!(page_down(addr), region.addr() + chunk + chunk / 2);
    let start = addr & !(chunk - 1);
    assert_eq!(
        uffd.move_pages(start, &staging, 0, chunk, MoveMode::empty())
            .unwrap(),
        Install::Done(chunk)
    );
    assert!(join(&reader) == big, "2 MiB chunk moved intact");
    eprintln!("staging was huge-page backed: {}", huge_before > 0);

    // Source holes: refused unless ALLOW_SRC_HOLES, which leaves the
    // destination page missing.
    let holes = Mapping::anonymous(2 * page()).unwrap();
    holes.write_at(0, &small);
    let dst = region.addr() + 10 * page();
    let res = uffd
        .move_pages(dst, &holes, 0, 2 * page(), MoveMode::ALLOW_SRC_HOLES)
        .unwrap();
    assert_eq!(res, Install::Done(2 * page()));
    assert_eq!(region.read_vec(10 * page(), page()), small);
    let mut out = Vec::new();
    PagemapScanner::new()
        .unwrap()
        .scan_all(
            &ScanArgs {
                category_mask: PageCategories::PRESENT,
                ..ScanArgs::new(dst, dst + 2 * page())
            },
            &mut out,
        )
        .unwrap();
    assert_eq!(regions(&out, dst), [(0, 1)], "the hole stays missing");
    let hole = Mapping::anonymous(page()).unwrap();
    let err = uffd
        .move_pages(dst + page(), &hole, 0, page(), MoveMode::empty())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    // Out-of-bounds source range.
    let err = uffd
        .move_pages(dst + page(), &hole, page(), page(), MoveMode::empty())
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

// ---------------------------------------------------------------------------
// MINOR faults on shmem
// ---------------------------------------------------------------------------

#[test]
fn minor_fault_on_memfd_resolved_with_continue() {
    let Some(uffd) = uffd_or_skip(
        "minor_fault_on_memfd_resolved_with_continue",
        Features::MINOR_SHMEM,
    ) else {
        return;
    };
    let fd = memfd_create("memsync-minor", MemfdFlags::default()).unwrap();
    ftruncate(fd.as_fd(), 4 * page() as u64).unwrap();
    let registered = Arc::new(Mapping::shared_fd(fd.as_fd(), 4 * page(), 0).unwrap());
    let backing = Mapping::shared_fd(fd.as_fd(), 4 * page(), 0).unwrap();
    let ioctls = uffd.register(&registered, RegisterMode::MINOR).unwrap();
    assert!(ioctls.contains(Ioctls::CONTINUE), "{ioctls:?}");

    // Fill the page cache through the alias, then fault on the registered view.
    let data = pattern(8, page());
    backing.write_at(page(), &data);
    let reader = {
        let registered = Arc::clone(&registered);
        spawn(move || registered.read_vec(page(), page()))
    };
    let (addr, flags, _) = next_fault(&uffd);
    assert_eq!(addr, registered.addr() + page());
    assert!(flags.contains(PageFaultFlags::MINOR), "{flags:?}");
    assert_eq!(
        uffd.continue_range(addr, page(), ContinueMode::empty())
            .unwrap(),
        Install::Done(page())
    );
    assert_eq!(join(&reader), data);
    assert_eq!(
        uffd.continue_range(addr, page(), ContinueMode::empty())
            .unwrap(),
        Install::Exists
    );

    // A hole is not a minor fault: the kernel fills it without an event.
    assert_eq!(registered.read_vec(2 * page(), 4), [0; 4]);
    assert_no_event(&uffd, Duration::from_millis(50));

    // Writes through the registered view reach the alias.
    registered.write_at(page() + 9, b"shared");
    assert_eq!(backing.read_vec(page() + 9, 6), b"shared");
}

// ---------------------------------------------------------------------------
// Write protection
// ---------------------------------------------------------------------------

#[test]
fn write_protect_faults_and_unprotect() {
    let Some(uffd) = uffd_or_skip(
        "write_protect_faults_and_unprotect",
        Features::PAGEFAULT_FLAG_WP,
    ) else {
        return;
    };
    let m = Arc::new(Mapping::anonymous(4 * page()).unwrap());
    m.fill(0, m.len(), 0x11);
    let ioctls = uffd
        .register(&m, RegisterMode::WP | RegisterMode::MISSING)
        .unwrap();
    assert!(ioctls.contains(Ioctls::WRITEPROTECT), "{ioctls:?}");
    uffd.write_protect(m.addr(), m.len()).unwrap();

    // Reads are not affected.
    assert_eq!(m.read_vec(2 * page(), 2), [0x11, 0x11]);
    // A write faults with WP|WRITE and waits for the un-protect.
    let writer = {
        let m = Arc::clone(&m);
        spawn(move || {
            m.write_at(2 * page() + 9, b"w");
            m.read_vec(2 * page() + 8, 3)
        })
    };
    let (addr, flags, _) = next_fault(&uffd);
    assert_eq!(addr, m.addr() + 2 * page());
    assert!(
        flags.contains(PageFaultFlags::WP | PageFaultFlags::WRITE),
        "{flags:?}"
    );
    assert_blocked(&writer, Duration::from_millis(100));
    uffd.write_unprotect(addr, page(), false).unwrap();
    assert_eq!(join(&writer), [0x11, b'w', 0x11]);
    // Un-protected now: no more faults there; the other pages still fault.
    m.write_at(2 * page(), b"again");
    assert_no_event(&uffd, Duration::from_millis(20));
    let writer = {
        let m = Arc::clone(&m);
        spawn(move || m.write_at(0, b"first"))
    };
    let (addr, flags, _) = next_fault(&uffd);
    assert_eq!((addr, flags.contains(PageFaultFlags::WP)), (m.addr(), true));
    uffd.write_unprotect(addr, page(), false).unwrap();
    join(&writer);
    // Un-protecting without waking (nobody waits here).
    uffd.write_unprotect(m.addr(), m.len(), true).unwrap();
    m.write_at(3 * page(), b"free");
    assert_no_event(&uffd, Duration::from_millis(20));

    // COPY with MODE_WP installs a write-protected page.
    let fresh = Arc::new(Mapping::anonymous(page()).unwrap());
    uffd.register(&fresh, RegisterMode::WP | RegisterMode::MISSING)
        .unwrap();
    let data = pattern(9, page());
    assert_eq!(
        uffd.copy(fresh.addr(), &data, CopyMode::WP).unwrap(),
        Install::Done(page())
    );
    let writer = {
        let fresh = Arc::clone(&fresh);
        spawn(move || fresh.write_at(1, b"z"))
    };
    let (addr, flags, _) = next_fault(&uffd);
    assert_eq!(addr, fresh.addr());
    assert!(flags.contains(PageFaultFlags::WP), "{flags:?}");
    uffd.write_unprotect(addr, page(), false).unwrap();
    join(&writer);
    assert_eq!(fresh.read_vec(0, 3), [data[0], b'z', data[2]]);
}

#[test]
fn wp_async_dirty_tracking_with_pagemap_scan() {
    let Some(uffd) = uffd_or_skip(
        "wp_async_dirty_tracking_with_pagemap_scan",
        Features::WP_ASYNC,
    ) else {
        return;
    };
    let n = 64;
    let m = Mapping::anonymous(n * page()).unwrap();
    let (start, end) = (m.addr(), m.addr() + m.len());
    uffd.register(&m, RegisterMode::WP).unwrap();
    uffd.write_protect(start, m.len()).unwrap();
    let scanner = PagemapScanner::new().unwrap();
    let arm = ScanArgs::written_and_rearm(start, end);

    let mut out = Vec::new();
    let r = scanner.scan(&arm, &mut out).unwrap();
    assert_eq!(
        (r.regions, r.walk_end),
        (0, end),
        "nothing written yet: {out:?}"
    );

    // Writes are resolved by the kernel (no event) and recorded.
    for p in [3, 7, 8, 9, 40] {
        m.write_at(p * page() + 1, &[p as u8]);
    }
    assert_no_event(&uffd, Duration::from_millis(20));
    let r = scanner.scan(&arm, &mut out).unwrap();
    assert_eq!(r.regions, 3);
    assert_eq!(regions(&out, start), [(3, 4), (7, 10), (40, 41)]);
    assert!(
        out.iter()
            .all(|r| r.categories() == PageCategories::WRITTEN),
        "{out:?}"
    );

    // The scan re-armed the protection: nothing is written now.
    out.clear();
    assert_eq!(scanner.scan(&arm, &mut out).unwrap().regions, 0, "{out:?}");
    m.write_at(8 * page(), b"dirty again");
    m.write_at(9 * page(), b"and again");
    // max_pages bounds one call; walk_end tells where to resume.
    let one = ScanArgs {
        max_pages: 1,
        ..arm
    };
    let r = scanner.scan(&one, &mut out).unwrap();
    assert_eq!(r.regions, 1);
    assert!(
        r.walk_end < end && r.walk_end > start + 8 * page(),
        "{:#x}",
        r.walk_end
    );
    let r2 = scanner
        .scan(
            &ScanArgs {
                start: r.walk_end,
                ..one
            },
            &mut out,
        )
        .unwrap();
    assert_eq!(r2.regions, 1);
    assert_eq!(regions(&out, start), [(8, 9), (9, 10)]);
    out.clear();
    assert_eq!(scanner.scan_all(&arm, &mut out).unwrap(), 0);

    // A read-only query: everything is in an async-WP range, the written
    // pages are present.
    out.clear();
    scanner
        .scan_all(
            &ScanArgs {
                category_mask: PageCategories::PRESENT,
                return_mask: PageCategories::PRESENT | PageCategories::WPALLOWED,
                ..ScanArgs::new(start, end)
            },
            &mut out,
        )
        .unwrap();
    assert_eq!(regions(&out, start), [(3, 4), (7, 10), (40, 41)]);
    assert!(
        out.iter()
            .all(|r| r.categories() == PageCategories::PRESENT | PageCategories::WPALLOWED)
    );

    // CHECK_WPASYNC refuses memory that is not registered for async WP.
    let plain = Mapping::anonymous(page()).unwrap();
    let err = scanner
        .scan(
            &ScanArgs::written_and_rearm(plain.addr(), plain.addr() + page()),
            &mut out,
        )
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    // Bad arguments are EINVAL.
    let err = scanner
        .scan(
            &ScanArgs {
                start: start + 1,
                flags: ScanFlags::all(),
                ..arm
            },
            &mut out,
        )
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
}

// ---------------------------------------------------------------------------
// POISON (child process)
// ---------------------------------------------------------------------------

#[test]
fn poison_raises_sigbus() {
    if kernel_has("poison_raises_sigbus", Features::POISON) {
        let exe = std::env::current_exe().unwrap();
        let out = run_test_process(&exe, "child_poison", |c| {
            c.env("MEMSYNC_SYS_CHILD", "poison");
        });
        assert_died_of_sigbus(&out, "poisoned; touching");
    }
}

/// Child of `poison_raises_sigbus`: must die of SIGBUS.
#[test]
fn child_poison() {
    if !is_child("poison") {
        return;
    }
    no_core_dump();
    let uffd = uffd_or_skip("child_poison", Features::POISON).unwrap();
    let m = Mapping::anonymous(2 * page()).unwrap();
    let ioctls = uffd.register(&m, RegisterMode::MISSING).unwrap();
    assert!(ioctls.contains(Ioctls::POISON), "{ioctls:?}");
    assert_eq!(
        uffd.poison(m.addr() + page(), page(), false).unwrap(),
        Install::Done(page())
    );
    // Poisoning again is harmless (this kernel reports Done; others may say Exists).
    let again = uffd.poison(m.addr() + page(), page(), false).unwrap();
    assert!(
        matches!(again, Install::Done(_) | Install::Exists),
        "{again:?}"
    );
    // Whether COPY may replace a poison marker differs between kernels
    // (this one allows it), so only report it, on another page.
    assert!(uffd.poison(m.addr(), page(), false).unwrap().is_done());
    let over = uffd
        .copy(m.addr(), &pattern(1, page()), CopyMode::empty())
        .unwrap();
    eprintln!("COPY over a poisoned page: {over:?}");
    eprintln!("poisoned; touching");
    let byte = m.read_vec(page(), 1);
    panic!("reading a poisoned page returned {byte:?} instead of raising SIGBUS");
}

// ---------------------------------------------------------------------------
// A range that raises SIGBUS (the fallback for kernels without POISON)
// ---------------------------------------------------------------------------

/// A `SigbusFile` mapped over the middle of a registered range: a kernel
/// access there fails with `EFAULT`, the pages around it stay registered,
/// and a thread that was blocked on a fault in the range gets `SIGBUS` once
/// woken (in a child process, which it kills).
#[test]
fn map_sigbus_raises_sigbus() {
    let exe = std::env::current_exe().unwrap();
    let out = run_test_process(&exe, "child_map_sigbus", |c| {
        c.env("MEMSYNC_SYS_CHILD", "map_sigbus");
    });
    assert_died_of_sigbus(&out, "neighbours served; waking");
}

/// Child of `map_sigbus_raises_sigbus`: must die of SIGBUS.
#[test]
fn child_map_sigbus() {
    if !is_child("map_sigbus") {
        return;
    }
    no_core_dump();
    // No EVENT_UNMAP: with it, map_sigbus would wait for this thread to read
    // the unmap event.
    let uffd = uffd_or_skip("child_map_sigbus", Features::empty()).unwrap();
    let m = Arc::new(Mapping::anonymous(3 * page()).unwrap());
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let blocked = {
        let m = Arc::clone(&m);
        spawn(move || m.read_vec(page() + 5, 1))
    };
    let (addr, _, _) = next_fault(&uffd);
    assert_eq!(addr, m.addr() + page());
    let file = memsync_sys::SigbusFile::new().unwrap();
    m.map_sigbus(page(), page(), &file).unwrap();
    drop(file);
    let err = memsync_sys::read_after_fork(m.addr() + page(), 8, WAIT).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    // The pages on both sides are still registered.
    for k in [0, 2] {
        let reader = {
            let m = Arc::clone(&m);
            spawn(move || m.read_vec(k * page(), 8))
        };
        let (addr, _, _) = next_fault(&uffd);
        assert_eq!(addr, m.addr() + k * page());
        let data = pattern(k as u8, page());
        assert!(uffd.copy(addr, &data, CopyMode::empty()).unwrap().is_done());
        assert_eq!(join(&reader), data[..8]);
    }
    eprintln!("neighbours served; waking");
    uffd.wake(m.addr() + page(), page()).unwrap();
    let byte = join(&blocked);
    panic!("the woken access returned {byte:?} instead of raising SIGBUS");
}

/// `MADV_DONTFORK` hides a range from a forked child, `MADV_DOFORK` undoes it.
#[test]
fn dontfork_hides_a_range_from_a_child() {
    let m = Mapping::anonymous(2 * page()).unwrap();
    let data = pattern(9, 2 * page());
    m.write_at(0, &data);
    let read = || memsync_sys::read_after_fork(m.addr(), 2 * page(), WAIT);
    assert_eq!(read().unwrap(), data);
    m.advise(0, 2 * page(), Advice::DontFork).unwrap();
    assert_eq!(read().unwrap_err().raw_os_error(), Some(libc::EFAULT));
    m.advise(0, 2 * page(), Advice::DoFork).unwrap();
    assert_eq!(read().unwrap(), data);
}

// ---------------------------------------------------------------------------
// Non-cooperative events
// ---------------------------------------------------------------------------

#[test]
fn remove_event_and_again_while_pending() {
    let Some(uffd) = uffd_or_skip(
        "remove_event_and_again_while_pending",
        Features::EVENT_REMOVE,
    ) else {
        return;
    };
    let m = Arc::new(Mapping::anonymous(4 * page()).unwrap());
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let data = pattern(10, page());
    assert!(
        uffd.copy(m.addr(), &data, CopyMode::empty())
            .unwrap()
            .is_done()
    );

    // MADV_DONTNEED blocks until the Remove event is read.
    let advisor = {
        let m = Arc::clone(&m);
        spawn(move || m.advise(0, 2 * page(), Advice::DontNeed))
    };
    assert!(uffd.poll_readable(Some(WAIT)).unwrap(), "no Remove event");
    // While the event is pending, installs report Again without progress.
    assert_eq!(
        uffd.copy(m.addr() + 2 * page(), &data, CopyMode::empty())
            .unwrap(),
        Install::Again { done: 0 }
    );
    assert_eq!(
        uffd.zeropage(m.addr() + 2 * page(), page(), false).unwrap(),
        Install::Again { done: 0 }
    );
    let err = uffd.write_protect(m.addr(), page()).unwrap_err();
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::EAGAIN | libc::ENOENT | libc::EINVAL)
        ),
        "{err}"
    );
    match next_event(&uffd) {
        Event::Remove { start, end } => assert_eq!((start, end), (m.addr(), m.addr() + 2 * page())),
        other => panic!("expected Remove, got {other:?}"),
    }
    join(&advisor).unwrap();
    // Drained: installs work again, and the removed page is missing again.
    assert!(
        uffd.copy(m.addr() + 2 * page(), &data, CopyMode::empty())
            .unwrap()
            .is_done()
    );
    assert!(
        uffd.copy(m.addr(), &data, CopyMode::empty())
            .unwrap()
            .is_done(),
        "page 0 was removed"
    );
}

#[test]
fn unmap_event() {
    let Some(uffd) = uffd_or_skip("unmap_event", Features::EVENT_UNMAP) else {
        return;
    };
    let m = Mapping::anonymous(3 * page()).unwrap();
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let range = m.range();
    // munmap blocks until the event is read.
    let unmapper = spawn(move || drop(m));
    match next_event(&uffd) {
        Event::Unmap { start, end } => assert_eq!(start..end, range),
        other => panic!("expected Unmap, got {other:?}"),
    }
    join(&unmapper);
}

#[test]
fn remap_event_and_registration_follows() {
    let Some(uffd) = uffd_or_skip(
        "remap_event_and_registration_follows",
        Features::EVENT_REMAP,
    ) else {
        return;
    };
    let mut m = Mapping::anonymous(2 * page()).unwrap();
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let data = pattern(11, page());
    assert!(
        uffd.copy(m.addr(), &data, CopyMode::empty())
            .unwrap()
            .is_done()
    );
    let old = m.addr();
    let mover = spawn(move || {
        m.relocate().unwrap();
        m
    });
    let (from, to, len) = match next_event(&uffd) {
        Event::Remap { from, to, len } => (from, to, len),
        other => panic!("expected Remap, got {other:?}"),
    };
    let m = Arc::new(join(&mover));
    assert_eq!((from, to, len), (old, m.addr(), 2 * page()));
    assert_eq!(m.read_vec(0, page()), data, "contents moved along");
    // Still registered at the new address.
    let reader = {
        let m = Arc::clone(&m);
        spawn(move || m.read_vec(page(), 4))
    };
    let (addr, _, _) = next_fault(&uffd);
    assert_eq!(addr, to + page());
    assert!(uffd.copy(addr, &data, CopyMode::empty()).unwrap().is_done());
    assert_eq!(join(&reader), data[..4]);
}

#[test]
fn fork_event() {
    if euid() != 0 {
        skip::skip("fork_event", "EVENT_FORK needs CAP_SYS_PTRACE (root)");
        return;
    }
    if !kernel_has("fork_event", Features::EVENT_FORK) {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = run_test_process(&exe, "child_fork", |c| {
        c.env("MEMSYNC_SYS_CHILD", "fork");
    });
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("grandchild exited 0"),
        "{}",
        describe(&out)
    );
}

/// Child of `fork_event`: forks (in a process of its own, as fork(2) in the
/// multi-threaded test harness is only done here) and serves the
/// grandchild's fault through the descriptor of the Fork event.
#[test]
fn child_fork() {
    if !is_child("fork") {
        return;
    }
    let uffd = Arc::new(uffd_or_skip("child_fork", Features::EVENT_FORK).unwrap());
    let m = Mapping::anonymous(2 * page()).unwrap();
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let expected = pattern(12, page());
    // fork() holds libc's malloc locks until the Fork event is read, so the
    // handler must be fully started (thread start-up allocates) and on its
    // allocation-free poll path before the fork.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = {
        let uffd = Arc::clone(&uffd);
        let expected = expected.clone();
        let ready = Arc::clone(&ready);
        spawn(move || -> Result<usize, String> {
            ready.store(true, std::sync::atomic::Ordering::Release);
            let ev = uffd
                .next_event(Some(WAIT))
                .map_err(|e| e.to_string())?
                .ok_or("no Fork event")?;
            let Event::Fork { uffd: child } = ev else {
                return Err(format!("expected Fork, got {ev:?}"));
            };
            if !child.features().contains(Features::EVENT_FORK) {
                return Err(format!(
                    "inherited features not read: {:?}",
                    child.features()
                ));
            }
            let ev = child
                .next_event(Some(WAIT))
                .map_err(|e| e.to_string())?
                .ok_or("no grandchild fault")?;
            let Event::PageFault { addr, .. } = ev else {
                return Err(format!("expected a fault, got {ev:?}"));
            };
            match child
                .copy(addr, &expected, CopyMode::empty())
                .map_err(|e| e.to_string())?
            {
                Install::Done(_) => Ok(addr),
                other => Err(format!("copy into the grandchild: {other:?}")),
            }
        })
    };
    while !ready.load(std::sync::atomic::Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: fork(2) in a multi-threaded process is sound as long as the
    // child only performs async-signal-safe operations before exiting: it
    // reads the mapping with atomic loads into a stack buffer (no
    // allocation, no locks), compares, and calls _exit(2).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut buf = [0u8; 64];
        m.read_at(0, &mut buf);
        let ok = buf[..] == expected[..64];
        // SAFETY: _exit(2) ends the forked child without running any
        // destructor or atexit handler of the parent's state.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    assert!(pid > 0, "fork failed: {}", io::Error::last_os_error());
    let handled = join(&handler);
    let mut status = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        // SAFETY: waitpid(2) writes one int to `status`, which outlives the call.
        let r = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) only sends a signal, to our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("grandchild did not exit (handler: {handled:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(handled, Ok(m.addr()));
    assert!(libc::WIFEXITED(status), "grandchild status {status:#x}");
    eprintln!("grandchild exited {}", libc::WEXITSTATUS(status));
    assert_eq!(libc::WEXITSTATUS(status), 0);
    // The parent's page is still missing: the grandchild's copy was private.
    assert_no_event(&uffd, Duration::from_millis(20));
}

// ---------------------------------------------------------------------------
// SCM_RIGHTS
// ---------------------------------------------------------------------------

#[test]
fn scm_rights_round_trip() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let memfd = memfd_create("memsync-scm", MemfdFlags::default()).unwrap();
    ftruncate(memfd.as_fd(), page() as u64).unwrap();
    let original = Mapping::shared_fd(memfd.as_fd(), page(), 0).unwrap();
    let uffd = Uffd::with_features(flags(), Features::THREAD_ID).unwrap().0;

    assert_eq!(
        send_fds(&a, b"fds", &[memfd.as_fd(), uffd.as_fd()]).unwrap(),
        3
    );
    let mut buf = [0; 16];
    let (n, mut fds) = recv_fds(&b, &mut buf, 4).unwrap();
    assert_eq!((&buf[..n], fds.len()), (&b"fds"[..], 2));

    // Received descriptors are close-on-exec.
    // SAFETY: fcntl(F_GETFD) on an open descriptor only returns its flags.
    let fd_flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fds[0]), libc::F_GETFD) };
    assert_eq!(fd_flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);

    // Write through the received memfd, read through the original mapping.
    let received_uffd = Uffd::from_fd(fds.pop().unwrap()).unwrap();
    assert_eq!(received_uffd.features(), Features::THREAD_ID);
    let file = std::fs::File::from(fds.pop().unwrap());
    file.write_all_at(b"through the socket", 100).unwrap();
    assert_eq!(original.read_vec(100, 18), b"through the socket");
    let mut file = file;
    file.seek(SeekFrom::Start(100)).unwrap();
    let mut back = [0; 7];
    file.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"through");
    file.write_all(b"!").unwrap();

    // The received userfaultfd controls the same context.
    let m = Mapping::anonymous(page()).unwrap();
    received_uffd.register(&m, RegisterMode::MISSING).unwrap();
    let err = uffd.register(&m, RegisterMode::MISSING);
    assert!(
        err.is_ok(),
        "same context: re-registering is a no-op: {err:?}"
    );
}

/// This binary's tests inside guests of Debian 12's kernels: 6.1 LTS, which lacks MOVE,
/// POISON, WP_ASYNC and PAGEMAP_SCAN (their tests must say that the kernel predates them and
/// the rest must pass), and 6.12, which has them all. One boot per kernel, a test each.
fn kernel_matrix(name: &str) {
    use memsync_testkit::vm;
    if vm::in_guest() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let test = format!("kernel_matrix_{}", name.replace('.', "_"));
    let Some(kernel) = vm::Kernel::debian(name, &test) else {
        return;
    };
    // The guest has no C compiler for the header check.
    let out = vm::run_test_binary(
        &kernel,
        &exe,
        &["--skip", "ioctl_numbers_match_c_headers"],
        Duration::from_secs(300),
    );
    let predates = out.output.matches("predates").count();
    if kernel.version() < (6, 4) {
        for f in [
            "UFFD_FEATURE_MOVE",
            "UFFD_FEATURE_POISON",
            "UFFD_FEATURE_WP_ASYNC",
        ] {
            assert!(
                out.output.contains(&format!("predates {f}")),
                "{name}: {f}:\n{}",
                out.output
            );
        }
    } else {
        assert_eq!(predates, 0, "{name}: nothing is missing:\n{}", out.output);
    }
}

#[test]
fn kernel_matrix_6_1() {
    kernel_matrix("6.1");
}

#[test]
fn kernel_matrix_6_12() {
    kernel_matrix("6.12");
}

// ---------------------------------------------------------------------------
// Unprivileged use (user-mode-only userfaultfd)
// ---------------------------------------------------------------------------

#[test]
fn unprivileged_user_mode_only() {
    if euid() != 0 {
        unprivileged_checks();
        return;
    }
    // Run this binary as nobody. The cargo target directory may sit below a
    // directory nobody cannot traverse (/root), so run a copy.
    let dir = TempDir::new("unpriv");
    let exe = dir.0.join("memsync-sys-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_test_process(&exe, "unprivileged_child", |c| {
        c.uid(65534)
            .gid(65534)
            .current_dir(&dir.0)
            .env("MEMSYNC_SYS_UNPRIV", "1");
    });
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unprivileged checks passed"),
        "{}",
        describe(&out)
    );
}

/// Child of `unprivileged_user_mode_only` (runs as uid 65534).
#[test]
fn unprivileged_child() {
    if std::env::var_os("MEMSYNC_SYS_UNPRIV").is_none() {
        return;
    }
    unprivileged_checks();
}

fn unprivileged_checks() {
    assert_ne!(euid(), 0, "must run unprivileged");
    let sysctl =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if sysctl.trim() == "0" {
        let err = Uffd::open(OpenFlags::default()).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{msg}");
        assert!(
            msg.contains("/dev/userfaultfd") && msg.contains("vm.unprivileged_userfaultfd"),
            "{msg}"
        );
        let open_err = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<memsync_sys::OpenError>())
            .unwrap();
        assert_eq!(open_err.syscall.raw_os_error(), Some(libc::EPERM));
    }

    let supported = Uffd::probe_features().unwrap();
    let uffd = Uffd::new_user_mode().unwrap();
    let wanted = Features::THREAD_ID | (supported & Features::MOVE);
    uffd.api(wanted).unwrap();
    let err = Uffd::new_user_mode()
        .unwrap()
        .api(Features::EVENT_FORK)
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EPERM),
        "EVENT_FORK needs CAP_SYS_PTRACE"
    );

    let m = Arc::new(Mapping::anonymous(4 * page()).unwrap());
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let data = pattern(13, page());
    let reader = {
        let m = Arc::clone(&m);
        spawn(move || (gettid(), m.read_vec(0, page())))
    };
    let (addr, _, tid) = next_fault(&uffd);
    assert_eq!(addr, m.addr());
    assert!(uffd.copy(addr, &data, CopyMode::empty()).unwrap().is_done());
    let (reader_tid, got) = join(&reader);
    assert_eq!((tid, got), (Some(reader_tid), data.clone()));

    if wanted.contains(Features::MOVE) {
        let staging = Mapping::anonymous(page()).unwrap();
        staging.write_at(0, &data);
        let reader = {
            let m = Arc::clone(&m);
            spawn(move || m.read_vec(2 * page(), page()))
        };
        let (addr, _, _) = next_fault(&uffd);
        assert_eq!(addr, m.addr() + 2 * page());
        assert!(
            uffd.move_pages(addr, &staging, 0, page(), MoveMode::empty())
                .unwrap()
                .is_done()
        );
        assert_eq!(join(&reader), data);
    } else {
        kernel_has("unprivileged_user_mode_only (MOVE part)", Features::MOVE);
    }

    // PAGEMAP_SCAN works without privileges on the own process (Linux 6.7+: an older
    // kernel, such as the 6.1 of the VM tests, knows no such ioctl).
    let mut out = Vec::new();
    let scanned = PagemapScanner::new().unwrap().scan_all(
        &ScanArgs {
            category_mask: PageCategories::PRESENT,
            ..ScanArgs::new(m.addr(), m.addr() + m.len())
        },
        &mut out,
    );
    if scanned
        .as_ref()
        .is_err_and(|e| e.raw_os_error() == Some(libc::ENOTTY))
    {
        skip::kernel_feature(
            "unprivileged_user_mode_only (PAGEMAP_SCAN part)",
            "PAGEMAP_SCAN",
            (6, 7),
        );
        eprintln!("unprivileged checks passed");
        return;
    }
    scanned.unwrap();
    let expected: &[(usize, usize)] = if wanted.contains(Features::MOVE) {
        &[(0, 1), (2, 3)]
    } else {
        &[(0, 1)]
    };
    assert_eq!(regions(&out, m.addr()), expected);
    eprintln!("unprivileged checks passed");
}

// ---------------------------------------------------------------------------
// Staging buffers (memsync-region's install path)
// ---------------------------------------------------------------------------

#[test]
fn staging_fill_then_move_and_copy() {
    use memsync_sys::Staging;
    let Some(uffd) = uffd_or_skip("staging_fill_then_move_and_copy", Features::MOVE) else {
        return;
    };
    let pmd = pmd_size();
    let region = Arc::new(
        Mapping::anonymous_with(
            2 * pmd,
            MapOptions {
                align: pmd,
                ..MapOptions::default()
            },
        )
        .unwrap(),
    );
    uffd.register(&region, RegisterMode::MISSING).unwrap();
    let mut staging = Staging::new(pmd).unwrap();
    assert_eq!(staging.len(), pmd);
    assert_eq!(
        staging.addr() % pmd,
        0,
        "a huge staging buffer is PMD aligned"
    );
    let data = pattern(42, pmd);
    staging.as_mut_slice().copy_from_slice(&data);
    assert_eq!(&staging.as_slice()[..16], &data[..16]);

    // A whole PMD moves in one call and resolves the fault.
    let reader = {
        let r = Arc::clone(&region);
        spawn(move || r.read_vec(pmd - 8, 8))
    };
    let (addr, _, _) = next_fault(&uffd);
    assert_eq!(page_down(addr), region.addr() + pmd - page());
    let moved = staging
        .move_to(&uffd, region.addr(), 0, pmd, MoveMode::empty())
        .unwrap();
    assert_eq!(moved, Install::Done(pmd));
    assert_eq!(join(&reader), data[pmd - 8..]);
    assert_eq!(region.read_vec(0, pmd), data);
    // The moved-out buffer reads as zeros and can be refilled.
    assert!(staging.as_slice().iter().all(|&b| b == 0));
    staging.as_mut_slice()[..page()].copy_from_slice(&data[..page()]);
    // Moving onto a present page reports Exists; copying elsewhere works.
    assert_eq!(
        staging
            .move_to(&uffd, region.addr(), 0, page(), MoveMode::empty())
            .unwrap(),
        Install::Exists
    );
    let dst = region.addr() + pmd;
    assert_eq!(
        staging
            .copy_to(&uffd, dst, 0, page(), CopyMode::empty())
            .unwrap(),
        Install::Done(page())
    );
    assert_eq!(region.read_vec(pmd, page()), data[..page()]);
    // Out-of-range requests are rejected before any ioctl.
    let err = staging
        .move_to(&uffd, dst, pmd, page(), MoveMode::empty())
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

// ---------------------------------------------------------------------------
// SIGBUS mode: resolving on the faulting thread (the experiment)
// ---------------------------------------------------------------------------

/// A small xorshift generator: random bytes and orders without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn shuffled(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
        v
    }
}

fn sigbus_supported(test: &str) -> bool {
    kernel_has(test, Features::SIGBUS)
}

/// A resolver over `pages` fresh pages whose source holds random bytes.
fn sigbus_resolver(pages: usize, chunk: usize, seed: u64) -> (SigbusResolver, Vec<u8>) {
    let data = XorShift(seed).bytes(pages * page());
    let source = Mapping::anonymous(data.len()).unwrap();
    source.write_at(0, &data);
    let region = Mapping::anonymous(data.len()).unwrap();
    let r = SigbusResolver::new(region, Arc::new(source), chunk).expect("SIGBUS resolver");
    (r, data)
}

#[test]
fn sigbus_resolves_on_the_faulting_thread() {
    if !sigbus_supported("sigbus_resolves_on_the_faulting_thread") {
        return;
    }
    const PAGES: usize = 64;
    for (chunk_pages, seed) in [(1, 0x9E37_79B9_7F4A_7C15), (4, 0xD1B5_4A32_D192_ED03)] {
        let chunk = chunk_pages * page();
        let (r, data) = sigbus_resolver(PAGES, chunk, seed);
        assert_eq!(r.chunk_size(), chunk);
        let (r, data) = (Arc::new(r), Arc::new(data));
        // Two threads touch every page, each in its own random order, and
        // check every byte of the page they touched.
        let touchers: Vec<_> = (0..2u64)
            .map(|t| {
                let (r, data) = (Arc::clone(&r), Arc::clone(&data));
                spawn(move || {
                    let mut rng = XorShift(seed ^ (t + 1).wrapping_mul(0xA24B_AED4_963E_E407));
                    for p in rng.shuffled(PAGES) {
                        let got = r.region().read_vec(p * page(), page());
                        assert!(
                            got == data[p * page()..(p + 1) * page()],
                            "thread {t}: page {p} differs from the source"
                        );
                    }
                })
            })
            .collect();
        for t in &touchers {
            join(t);
        }
        assert_eq!(r.region().read_vec(0, PAGES * page()), *data);
        // Every page was installed exactly once (UFFDIO_COPY never
        // overwrites); each fault was resolved, at least one per chunk, at
        // most one per touch.
        assert_eq!(r.installed_pages(), PAGES as u64, "chunk {chunk}");
        let handled = r.handled();
        assert!(
            (PAGES / chunk_pages) as u64 <= handled && handled <= 2 * PAGES as u64,
            "chunk {chunk}: {handled} faults handled"
        );
        assert_eq!(r.failed(), 0);
        // Present pages no longer fault.
        let _ = r.region().read_vec(0, PAGES * page());
        assert_eq!(r.handled(), handled);
    }
    // The slot is free again after drop: more resolvers than slots, one
    // after the other.
    for i in 0..memsync_sys::MAX_SIGBUS_REGIONS + 2 {
        let (r, data) = sigbus_resolver(2, page(), 7 + i as u64);
        assert_eq!(r.region().read_vec(page(), page()), data[page()..]);
        assert_eq!(r.handled(), 1);
    }
}

/// Runs the SIGBUS child `name`.
fn run_sigbus_child(name: &str) -> Output {
    let exe = std::env::current_exe().unwrap();
    run_test_process(&exe, &format!("child_{name}"), |c| {
        c.env("MEMSYNC_SYS_CHILD", name);
    })
}

/// A `SIGBUS` outside the resolver's region still gets the disposition that
/// was there before: the default action (death by `SIGBUS`) for an access
/// past the end of a file and for a poisoned page, and a handler installed
/// earlier, which receives the kernel's siginfo.
#[test]
fn sigbus_outside_the_region_is_not_swallowed() {
    if !sigbus_supported("sigbus_outside_the_region_is_not_swallowed") {
        return;
    }
    let out = run_sigbus_child("sigbus_eof");
    assert_died_of_sigbus(&out, "resolved; touching past EOF");
    if kernel_has(
        "sigbus_outside_the_region_is_not_swallowed (poisoned page)",
        Features::POISON,
    ) {
        let out = run_sigbus_child("sigbus_poison");
        assert_died_of_sigbus(&out, "resolved; touching a poisoned page");
    }
    let out = run_sigbus_child("sigbus_chain");
    // The earlier handler exits with 40 + si_code (BUS_ADRERR = 2).
    assert_eq!(
        out.status.code(),
        Some(40 + libc::BUS_ADRERR),
        "{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("earlier SIGBUS handler ran"),
        "{}",
        describe(&out)
    );
}

fn no_core_dump() {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit(2) reads one `rlimit` struct that outlives the call.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &raw const no_core) };
}

/// Starts a resolver and checks that it resolves a fault (so its handler is
/// installed when the child then raises a foreign SIGBUS).
fn working_resolver() -> SigbusResolver {
    let (r, data) = sigbus_resolver(4, page(), 99);
    assert_eq!(
        r.region().read_vec(2 * page(), page()),
        data[2 * page()..3 * page()]
    );
    assert_eq!(r.handled(), 1);
    r
}

/// A one-page shared mapping of an empty memfd: touching it raises SIGBUS
/// (`BUS_ADRERR`, like a userfaultfd in SIGBUS mode).
fn past_eof() -> (std::os::fd::OwnedFd, Mapping) {
    let fd = memfd_create("memsync-sigbus", MemfdFlags::default()).unwrap();
    ftruncate(fd.as_fd(), page() as u64).unwrap();
    let m = Mapping::shared_fd(fd.as_fd(), page(), 0).unwrap();
    ftruncate(fd.as_fd(), 0).unwrap();
    (fd, m)
}

/// Child of `sigbus_outside_the_region_is_not_swallowed`: must die of SIGBUS.
#[test]
fn child_sigbus_eof() {
    if !is_child("sigbus_eof") {
        return;
    }
    no_core_dump();
    let r = working_resolver();
    let (_fd, m) = past_eof();
    eprintln!("resolved; touching past EOF");
    let byte = m.read_vec(0, 1);
    panic!("reading past EOF returned {byte:?} (resolver {r:?}) instead of raising SIGBUS");
}

/// Child of `sigbus_outside_the_region_is_not_swallowed`: must die of SIGBUS.
#[test]
fn child_sigbus_poison() {
    if !is_child("sigbus_poison") {
        return;
    }
    no_core_dump();
    let r = working_resolver();
    let uffd = uffd_or_skip("child_sigbus_poison", Features::POISON).unwrap();
    let m = Mapping::anonymous(page()).unwrap();
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    assert!(uffd.poison(m.addr(), page(), false).unwrap().is_done());
    eprintln!("resolved; touching a poisoned page");
    let byte = m.read_vec(0, 1);
    panic!("reading a poisoned page returned {byte:?} (resolver {r:?}) instead of raising SIGBUS");
}

/// The handler the `sigbus_chain` child installs before the resolver's:
/// reports and exits with 40 + si_code.
extern "C" fn earlier_sigbus_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    const MSG: &[u8] = b"earlier SIGBUS handler ran\n";
    // SAFETY: the kernel (or the chaining handler, with the kernel's
    // arguments) passes a valid siginfo_t.
    let code = unsafe { (*info).si_code };
    // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is static.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(40 + code);
    }
}

/// Child of `sigbus_outside_the_region_is_not_swallowed`: must exit with
/// 40 + BUS_ADRERR from the earlier handler.
#[test]
fn child_sigbus_chain() {
    if !is_child("sigbus_chain") {
        return;
    }
    // SAFETY: sigaction is plain old data for which all-zero is valid.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = earlier_sigbus_handler as *const () as libc::sighandler_t;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa` is a fully initialised sigaction (empty mask from
    // zeroing) whose handler only calls async-signal-safe functions.
    let ret = unsafe { libc::sigaction(libc::SIGBUS, &raw const sa, std::ptr::null_mut()) };
    assert_eq!(ret, 0);
    let r = working_resolver();
    let (_fd, m) = past_eof();
    eprintln!("resolved; touching past EOF");
    let byte = m.read_vec(0, 1);
    panic!("reading past EOF returned {byte:?} (resolver {r:?}) instead of raising SIGBUS");
}

/// The child died of `SIGBUS` after printing `marker` (the step it reached).
fn assert_died_of_sigbus(out: &std::process::Output, marker: &str) {
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{}", describe(out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(marker),
        "{}",
        describe(out)
    );
}

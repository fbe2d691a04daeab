//! A page-fault handler for Firecracker's UFFD snapshot restore.
//!
//! Firecracker (`PUT /snapshot/load` with `"mem_backend": {"backend_type":
//! "Uffd", "backend_path": SOCKET}`) maps the guest memory anonymously,
//! registers it with a userfaultfd (`UFFD_FEATURE_EVENT_REMOVE`,
//! non-blocking, not user-mode-only, `MISSING` mode), connects to
//! `SOCKET` and sends one message: the userfaultfd (`SCM_RIGHTS`) and a JSON
//! array with one object per guest memory region:
//!
//! ```json
//! [{"base_host_virt_addr":140...,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]
//! ```
//!
//! `offset` is where the region's bytes start in the guest memory file
//! (cumulative over the regions), `page_size` is 4096 or 2 MiB (hugetlbfs),
//! and the deprecated `page_size_kib` holds the same value, in bytes despite
//! its name. Nothing else is sent; Firecracker may close the socket right
//! away (the design followed is that of `src/firecracker/examples/uffd/` and
//! `docs/snapshotting/handling-page-faults-on-snapshot-resume.md` at
//! firecracker commit 81b38b9d, August 2026).
//!
//! The handler serves the faults from a store (the guest memory file's
//! bytes, at the same offsets) with memsync's fault engine
//! ([`ForeignRegion`]): missing chunks are copied in (`UFFDIO_COPY`),
//! chunks the store's extents show to be holes or zeros (a sparse snapshot
//! file) are installed as zero pages without a read (`UFFDIO_ZEROPAGE`;
//! extents asked once at the start, best effort, see
//! [`HandlerConfig::extents_within`]), the whole memory is pulled in the background from the first
//! fault on (in the order of a page-access hint if one is given), pages the
//! guest dropped (balloon, `UFFD_EVENT_REMOVE`) read as zeros afterwards, a
//! chunk the store cannot deliver before the deadline is poisoned (the vCPU
//! touching it gets `SIGBUS`: never wrong memory), and the handler stops
//! when the VMM exits (a pidfd of the peer found with `SO_PEERCRED`).

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use memsync_core::DynStore;
use memsync_region::{
    Backing, ChunkError, ForeignOptions, ForeignRange, ForeignRegion, PullPriority, RegionConfig,
    RegionStats, Sequential,
};
use memsync_sys::{PeerCred, Pidfd, Uffd, peer_credentials, poll_readable, recv_fds};
use serde_json::Value;

use crate::{Error, HintOrder, SnapshotSource, io};

/// Largest handshake message accepted (the upstream example reads 1 KiB,
/// which a VM with many memory regions can exceed).
pub const MAX_MESSAGE: usize = 64 << 10;
/// Most regions accepted in one handshake.
pub const MAX_REGIONS: usize = 4096;
const HUGE_PAGE: u64 = 2 << 20;

/// One guest memory region of the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRegion {
    /// Where the region is mapped in the VMM.
    pub base_host_virt_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Where its bytes start in the guest memory file.
    pub offset: u64,
    /// 4096, or 2 MiB for hugetlbfs memory.
    pub page_size: u64,
}

fn bad(m: impl Into<String>) -> Error {
    Error::Protocol(m.into())
}

fn field(obj: &serde_json::Map<String, Value>, i: usize, name: &str) -> Result<Option<u64>, Error> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            bad(format!(
                "region {i}: {name} is not an unsigned integer: {v}"
            ))
        }),
    }
}

/// Parses and checks the JSON of a handshake: an array of 1 to
/// [`MAX_REGIONS`] regions, each with `base_host_virt_addr`, `size`,
/// `offset` and `page_size` or the deprecated `page_size_kib` (in bytes; if
/// both are given they must agree; unknown fields are ignored), page sizes
/// of 4096 or 2 MiB and the same for every region, addresses and sizes
/// aligned to it, no two regions overlapping in the VMM, and offsets that
/// tile the memory file from 0 (cumulative, in any order).
///
/// # Errors
///
/// [`Error::Protocol`] naming the first thing wrong.
pub fn parse_regions(json: &[u8]) -> Result<Vec<GuestRegion>, Error> {
    if json.len() > MAX_MESSAGE {
        return Err(bad(format!(
            "the handshake is larger than {MAX_MESSAGE} bytes"
        )));
    }
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| bad(format!("the handshake is not valid JSON: {e}")))?;
    let arr = v
        .as_array()
        .ok_or_else(|| bad("the handshake is not a JSON array of regions"))?;
    if arr.is_empty() || arr.len() > MAX_REGIONS {
        return Err(bad(format!(
            "the handshake has {} regions (1 to {MAX_REGIONS} accepted)",
            arr.len()
        )));
    }
    let mut regions = Vec::with_capacity(arr.len());
    for (i, r) in arr.iter().enumerate() {
        let obj = r
            .as_object()
            .ok_or_else(|| bad(format!("region {i} is not an object")))?;
        let need = |name: &str| {
            field(obj, i, name)?.ok_or_else(|| bad(format!("region {i} has no {name}")))
        };
        let base = need("base_host_virt_addr")?;
        let size = need("size")?;
        let offset = need("offset")?;
        let page_size = match (field(obj, i, "page_size")?, field(obj, i, "page_size_kib")?) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(format!(
                    "region {i}: page_size {a} and page_size_kib {b} disagree (page_size_kib holds bytes)"
                )));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(bad(format!("region {i} has no page_size"))),
        };
        if page_size != 4096 && page_size != HUGE_PAGE {
            return Err(bad(format!(
                "region {i}: page size {page_size} (4096 or 2 MiB supported)"
            )));
        }
        if size == 0 || size % page_size != 0 || base % page_size != 0 {
            return Err(bad(format!(
                "region {i}: base {base:#x} and size {size} must be non-zero multiples of the page size {page_size}"
            )));
        }
        if base.checked_add(size).is_none() || offset.checked_add(size).is_none() {
            return Err(bad(format!("region {i}: address or offset overflows")));
        }
        regions.push(GuestRegion {
            base_host_virt_addr: base,
            size,
            offset,
            page_size,
        });
    }
    if regions.iter().any(|r| r.page_size != regions[0].page_size) {
        return Err(bad("the regions have different page sizes"));
    }
    let mut by_addr: Vec<&GuestRegion> = regions.iter().collect();
    by_addr.sort_by_key(|r| r.base_host_virt_addr);
    for w in by_addr.windows(2) {
        if w[0].base_host_virt_addr + w[0].size > w[1].base_host_virt_addr {
            return Err(bad(format!(
                "regions at {:#x} (+{}) and {:#x} overlap",
                w[0].base_host_virt_addr, w[0].size, w[1].base_host_virt_addr
            )));
        }
    }
    let mut by_off: Vec<&GuestRegion> = regions.iter().collect();
    by_off.sort_by_key(|r| r.offset);
    let mut next = 0u64;
    for r in by_off {
        if r.offset != next {
            return Err(bad(format!(
                "region offsets must be cumulative over the memory file: one starts at {} where {next} was expected",
                r.offset
            )));
        }
        next += r.size;
    }
    Ok(regions)
}

/// What the VMM sent, and who it is.
#[derive(Debug)]
pub struct Handshake {
    /// The guest memory's userfaultfd.
    pub uffd: Uffd,
    /// The regions, as sent.
    pub regions: Vec<GuestRegion>,
    /// The VMM process (`SO_PEERCRED`).
    pub peer: PeerCred,
}

impl Handshake {
    /// Bytes of guest memory (the memory file's size).
    #[must_use]
    pub fn memory_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// Receives the VMM's one message on `stream`, waiting at most `timeout`.
///
/// # Errors
///
/// [`Error::Protocol`] for a message without a userfaultfd (or with
/// another descriptor, or more than one), larger than [`MAX_MESSAGE`], or
/// whose JSON [`parse_regions`] refuses; [`Error::Io`] for socket errors,
/// the timeout and a peer that closed without sending.
pub fn receive_handshake(stream: &UnixStream, timeout: Duration) -> Result<Handshake, Error> {
    let peer = peer_credentials(stream.as_fd()).map_err(io("SO_PEERCRED on the VMM's socket"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("setting the handshake timeout"))?;
    // One byte more than accepted, to tell a message that fits from one
    // that was cut.
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let (n, fds) = recv_fds(stream, &mut buf, 1).map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            Error::Io {
                context: format!(
                    "the VMM (pid {}) sent no handshake within {timeout:?}",
                    peer.pid
                ),
                source: e,
            }
        } else {
            Error::Io {
                context: "receiving the VMM's handshake".into(),
                source: e,
            }
        }
    })?;
    stream
        .set_read_timeout(None)
        .map_err(io("clearing the handshake timeout"))?;
    if n == 0 {
        return Err(bad(format!(
            "the VMM (pid {}) closed the socket without a handshake",
            peer.pid
        )));
    }
    if n > MAX_MESSAGE {
        return Err(bad(format!(
            "the handshake is larger than {MAX_MESSAGE} bytes"
        )));
    }
    let Some(fd) = fds.into_iter().next() else {
        return Err(bad("the handshake carries no userfaultfd (SCM_RIGHTS)"));
    };
    let uffd = Uffd::from_fd(fd).map_err(|e| bad(format!("the handshake's descriptor: {e}")))?;
    let regions = parse_regions(&buf[..n])?;
    Ok(Handshake {
        uffd,
        regions,
        peer,
    })
}

/// Checks in `/proc/PID/maps` that every region lies inside the VMM's
/// mappings. `Ok` without checking if the file cannot be read.
///
/// # Errors
///
/// [`Error::Protocol`] naming a region that is not mapped.
pub fn check_mapped(pid: i32, regions: &[GuestRegion]) -> Result<(), Error> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        tracing::warn!(
            pid,
            "cannot read the VMM's /proc/PID/maps: its regions are not checked"
        );
        return Ok(());
    };
    let mut vmas: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .collect();
    vmas.sort_unstable();
    for r in regions {
        let (mut at, end) = (r.base_host_virt_addr, r.base_host_virt_addr + r.size);
        for &(s, e) in &vmas {
            if s <= at && at < e {
                at = e;
            }
            if at >= end {
                break;
            }
        }
        if at < end {
            return Err(bad(format!(
                "region at {:#x} (+{} bytes) is not mapped in the VMM (pid {pid}) beyond {at:#x}",
                r.base_host_virt_addr, r.size
            )));
        }
    }
    Ok(())
}

/// How the handler serves.
#[derive(Clone, Debug)]
pub struct HandlerConfig {
    /// Bytes fetched per fault (a power of two, at least the page size):
    /// lowered to the largest power of two that divides every region.
    pub chunk_size: usize,
    /// Pull the whole memory in the background from the first fault on.
    pub pull: bool,
    /// The pull's order: the hint's chunks first.
    pub hint: Option<String>,
    /// How long a fault waits for the store before the chunk is poisoned.
    pub fetch_deadline: Duration,
    /// Fault-handler threads.
    pub handler_threads: usize,
    /// Check the regions against the VMM's `/proc/PID/maps`.
    pub check_maps: bool,
    /// The runtime that store futures need (network stores).
    pub runtime: Option<tokio::runtime::Handle>,
    /// How long [`Handler::start`] waits for the store's extents (at most
    /// [`fetch_deadline`](Self::fetch_deadline)): chunks they show to be
    /// entirely hole or zero are installed as zero pages without a read.
    /// A store without extents, or whose query fails or takes longer, has
    /// every chunk read. The VMM's faults wait meanwhile.
    pub extents_within: Duration,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            chunk_size: 64 << 10,
            pull: true,
            hint: None,
            fetch_deadline: Duration::from_secs(30),
            handler_threads: 2,
            check_maps: true,
            runtime: None,
            extents_within: Duration::from_secs(5),
        }
    }
}

/// Why [`Handler::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The VMM process exited.
    VmmExited,
    /// The caller's stop flag was set.
    Stopped,
}

/// A running handler: the fault engine on the VMM's memory.
#[derive(Debug)]
pub struct Handler {
    region: ForeignRegion,
    source: Arc<SnapshotSource>,
    peer: PeerCred,
    pidfd: Option<Pidfd>,
    memory: u64,
    chunk: usize,
    started: Instant,
    second_messages: usize,
}

impl Handler {
    /// Starts serving the VMM of `hs` from `store`.
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] if the store is smaller than the guest memory or
    /// a region is not mapped in the VMM; [`Error::Region`] if the engine
    /// refuses; a bad hint.
    pub fn start(hs: Handshake, store: DynStore, cfg: HandlerConfig) -> Result<Self, Error> {
        let memory = hs.memory_size();
        let page = hs.regions[0].page_size;
        if cfg.check_maps {
            check_mapped(hs.peer.pid, &hs.regions)?;
        }
        let source = Arc::new(SnapshotSource::new(store, memory, page)?);
        // The largest power of two up to the asked chunk size that divides
        // every region (each is a multiple of the page size).
        let mut chunk = cfg.chunk_size.max(page as usize).next_power_of_two();
        while hs.regions.iter().any(|r| r.size % chunk as u64 != 0) {
            chunk /= 2;
        }
        let priority: Box<dyn PullPriority> = match &cfg.hint {
            Some(text) => Box::new(HintOrder::parse(text, memory, chunk)?),
            None => Box::new(Sequential::default()),
        };
        let ranges: Vec<ForeignRange> = hs
            .regions
            .iter()
            .map(|r| ForeignRange {
                remote: r.base_host_virt_addr as usize,
                len: r.size as usize,
                offset: r.offset,
            })
            .collect();
        let rcfg = RegionConfig {
            chunk_size: chunk,
            backing: if page == HUGE_PAGE {
                Backing::Hugetlb
            } else {
                Backing::Anonymous
            },
            prefetch: cfg.pull,
            priority,
            fetch_deadline: cfg.fetch_deadline,
            handler_threads: cfg.handler_threads.max(1),
            use_move: false,
            runtime: cfg.runtime,
            ..RegionConfig::default()
        };
        let tap_source = Arc::clone(&source);
        let region = ForeignRegion::new(
            hs.uffd,
            &ranges,
            Arc::clone(&source) as Arc<dyn memsync_region::ChunkSource>,
            rcfg,
            ForeignOptions {
                pull_after_first_fault: true,
                on_remove: Some(Box::new(move |r| tap_source.remove(r))),
                extents_within: cfg.extents_within,
            },
        )?;
        let pidfd = match Pidfd::open(hs.peer.pid) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(pid = hs.peer.pid, error = %e, "no pidfd for the VMM: its exit is not noticed");
                None
            }
        };
        tracing::info!(
            pid = hs.peer.pid,
            regions = hs.regions.len(),
            memory,
            chunk,
            "memsync-vmm: serving the VMM's guest memory"
        );
        Ok(Self {
            region,
            source,
            peer: hs.peer,
            pidfd,
            memory,
            chunk,
            started: Instant::now(),
            second_messages: 0,
        })
    }

    /// Serves until the VMM exits or `stop` is set. Watches `socket` (the
    /// handshake's): a second message is refused (logged, its descriptors
    /// closed, counted in [`second_messages`](Self::second_messages)) and
    /// the first one is served on; the VMM closing it changes nothing.
    pub fn run(&mut self, socket: Option<&UnixStream>, stop: &AtomicBool) -> Exit {
        let mut socket = socket;
        loop {
            if stop.load(Ordering::Acquire) {
                return Exit::Stopped;
            }
            let mut fds = Vec::new();
            if let Some(p) = &self.pidfd {
                fds.push(p.as_fd());
            }
            if let Some(s) = socket {
                fds.push(s.as_fd());
            }
            if fds.is_empty() {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let ready = poll_readable(&fds, Some(Duration::from_millis(50))).unwrap_or_default();
            if self.pidfd.is_some() && ready.first().copied().unwrap_or(false) {
                tracing::info!(pid = self.peer.pid, "memsync-vmm: the VMM exited");
                return Exit::VmmExited;
            }
            let sock_ready = ready.get(usize::from(self.pidfd.is_some())).copied();
            if let (Some(s), Some(true)) = (socket, sock_ready) {
                let mut buf = vec![0u8; MAX_MESSAGE + 1];
                match recv_fds(s, &mut buf, 4) {
                    Ok((0, _)) | Err(_) => socket = None,
                    Ok((n, fds)) => {
                        self.second_messages += 1;
                        tracing::error!(
                            pid = self.peer.pid,
                            bytes = n,
                            descriptors = fds.len(),
                            "memsync-vmm: refused a second message from the VMM (one handshake per connection); still serving the first"
                        );
                    }
                }
            }
        }
    }

    /// The VMM.
    #[must_use]
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// Bytes of guest memory.
    #[must_use]
    pub fn memory_size(&self) -> u64 {
        self.memory
    }

    /// Bytes fetched per fault.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Messages refused after the handshake.
    #[must_use]
    pub fn second_messages(&self) -> usize {
        self.second_messages
    }

    /// The engine's counters.
    #[must_use]
    pub fn stats(&self) -> &RegionStats {
        self.region.stats()
    }

    /// Chunk errors (store failures, install failures).
    #[must_use]
    pub fn errors(&self) -> Vec<ChunkError> {
        self.region.errors()
    }

    /// The fault engine.
    #[must_use]
    pub fn region(&self) -> &ForeignRegion {
        &self.region
    }

    /// The source (removed pages).
    #[must_use]
    pub fn source(&self) -> &SnapshotSource {
        &self.source
    }

    /// Since [`start`](Self::start).
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Binds the handler's socket at `path`, replacing a stale socket file (a
/// handler that died leaves one; anything else there is an error).
fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
    {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(io("a non-blocking listener"))?;
    Ok(listener)
}

/// The next VMM to connect, or `None` once `stop` is set.
fn accept(listener: &UnixListener, stop: &AtomicBool) -> Result<Option<UnixStream>, Error> {
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(io("a blocking VMM socket"))?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = poll_readable(&[listener.as_fd()], Some(Duration::from_millis(100)));
            }
            Err(e) => return Err(io("accepting the VMM")(e)),
        }
    }
}

/// Receives the handshake on `stream` (10 s at most), then serves that VMM
/// until it exits or `stop` is set.
fn serve_stream(
    stream: &UnixStream,
    store: DynStore,
    cfg: HandlerConfig,
    stop: &AtomicBool,
) -> Result<(Handler, Exit), Error> {
    let hs = receive_handshake(stream, Duration::from_secs(10))?;
    let mut h = Handler::start(hs, store, cfg)?;
    let exit = h.run(Some(stream), stop);
    Ok((h, exit))
}

/// Listens on `path` (replacing a stale socket file), accepts one VMM,
/// receives its handshake (10 s at most), serves it until it exits or
/// `stop` is set, and returns the handler (for its statistics).
///
/// # Errors
///
/// As for [`receive_handshake`] and [`Handler::start`]; binding and
/// accepting.
pub fn serve_one(
    path: &Path,
    store: DynStore,
    cfg: HandlerConfig,
    stop: &AtomicBool,
    on_listening: impl FnOnce(),
) -> Result<(Handler, Exit), Error> {
    let listener = bind(path)?;
    on_listening();
    let stream = accept(&listener, stop)?.ok_or_else(|| bad("stopped before a VMM connected"))?;
    serve_stream(&stream, store, cfg, stop)
}

/// One VMM served by [`serve_many`]: its handler when it ran (for its
/// statistics), or why it could not be served (a bad handshake, a region
/// the handler refused).
pub type Served = Result<(Handler, Exit), Error>;

/// Like [`serve_one`] for many VMMs at once from one store: each VMM that
/// connects gets its own handler (its own userfaultfd, fault threads and
/// pull) on a thread of its own, so that one process serves a fleet of
/// microVMs restored from one snapshot (and one cache of it). Stops
/// accepting after `max` VMMs (`None`: until `stop` is set), and returns
/// when every VMM accepted has been served; `on_served` gets each as it
/// ends. A VMM whose handshake fails is reported there and does not stop
/// the others.
///
/// # Errors
///
/// Binding and accepting.
pub fn serve_many(
    path: &Path,
    store: DynStore,
    cfg: &HandlerConfig,
    stop: &AtomicBool,
    max: Option<usize>,
    on_listening: impl FnOnce(),
    on_served: impl Fn(Served) + Sync,
) -> Result<usize, Error> {
    let listener = bind(path)?;
    on_listening();
    let mut n = 0;
    std::thread::scope(|s| {
        while max.is_none_or(|m| n < m) {
            let Some(stream) = accept(&listener, stop)? else {
                break;
            };
            n += 1;
            let (store, cfg, on_served) = (store.clone(), cfg.clone(), &on_served);
            std::thread::Builder::new()
                .name(format!("memsync-vmm-{n}"))
                .spawn_scoped(s, move || {
                    on_served(serve_stream(&stream, store, cfg, stop))
                })
                .map_err(io("starting a VMM's handler thread"))?;
        }
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(extra: &str) -> String {
        format!(r#"[{{"base_host_virt_addr":1048576,"size":8192,"offset":0{extra}}}]"#)
    }

    #[test]
    fn regions_parse_with_both_page_size_fields() {
        let r = parse_regions(one(r#","page_size":4096,"page_size_kib":4096"#).as_bytes()).unwrap();
        assert_eq!(r[0].page_size, 4096);
        let r = parse_regions(one(r#","page_size_kib":4096"#).as_bytes()).unwrap();
        assert_eq!(r[0].size, 8192);
        let two = r#"[{"base_host_virt_addr":8388608,"size":4194304,"offset":4194304,"page_size":2097152},
                      {"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size":2097152,"unknown":1}]"#;
        assert_eq!(parse_regions(two.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn bad_handshakes_are_refused_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("[", "not valid JSON"),
            ("{}", "not a JSON array"),
            ("[]", "0 regions"),
            ("[1]", "not an object"),
            (
                r#"[{"size":4096,"offset":0,"page_size":4096}]"#,
                "no base_host_virt_addr",
            ),
            (&one(""), "no page_size"),
            (&one(r#","page_size":4096,"page_size_kib":4"#), "disagree"),
            (&one(r#","page_size":65536"#), "4096 or 2 MiB"),
            (&one(r#","page_size":-1"#), "not an unsigned integer"),
            (
                r#"[{"base_host_virt_addr":4096,"size":100,"offset":0,"page_size":4096}]"#,
                "multiples",
            ),
            (
                r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},
                    {"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]"#,
                "overlap",
            ),
            (
                r#"[{"base_host_virt_addr":4096,"size":4096,"offset":4096,"page_size":4096}]"#,
                "cumulative",
            ),
            (
                r#"[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0,"page_size":4096}]"#,
                "overflows",
            ),
        ];
        for (json, want) in cases {
            let e = parse_regions(json.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert!(
            parse_regions(&big)
                .unwrap_err()
                .to_string()
                .contains("larger")
        );
    }
}

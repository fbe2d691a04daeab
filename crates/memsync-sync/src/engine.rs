//! One sync: compare chunk digests of both sides, then send only what differs, page by page.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memsync_core::{DynStore, Result, StoreError};
use tokio::sync::Semaphore;

use crate::delta::{Run, Theirs, diff_runs, diff_runs_copied};
use crate::dest::{DestStats, DynDest, PatchOutcome, SourceDigests, source_digests};
use crate::digest::{self, Digest, Layout, PAGE, ScanStats};
use crate::index::{IndexFile, IndexStatus};

/// Sync settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncOptions {
    /// Chunks patched at once (many, so that a long link stays busy: each chunk costs two
    /// round trips to a peer, but they overlap; a chunk waiting for its page digests holds no
    /// data).
    pub window: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions { window: 4096 }
    }
}

/// The default chunk size: with 1% of random pages changed, 64 KiB chunks keep both the digest
/// lists and the page-digest queries small (about 10% of the changed bytes together).
pub const DEFAULT_CHUNK: u64 = 64 << 10;

/// Where a sync reads from.
#[derive(Clone, Debug)]
pub struct Source {
    pub store: DynStore,
    /// The index of the store's file (for a `file:` store), if indexing is on.
    pub index: Option<IndexFile>,
}

/// Progress callbacks (the CLI draws a bar).
pub trait Progress: Send + Sync {
    /// A new phase of `total` bytes (or chunks) begins.
    fn phase(&self, name: &str, total: u64);
    fn inc(&self, n: u64);
}

/// No progress output.
#[derive(Debug)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str, _: u64) {}
    fn inc(&self, _: u64) {}
}

/// What a sync did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub size: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    /// Source: bytes read and hashed, bytes skipped as holes, what happened with its index.
    pub src_scan: ScanStats,
    pub src_index: String,
    /// Destination counters (from the peer, for a remote destination).
    pub dest: DestStats,
    /// Chunks whose digests differed, and those now updated.
    pub differing: u64,
    pub updated: u64,
    /// Chunks sent whole after a patch failed its strong check.
    pub resent_whole: u64,
    /// Bytes of data sent, and bytes zeroed without sending data.
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Bytes on the wire in each direction (remote destinations).
    pub wire_sent: u64,
    pub wire_received: u64,
    /// Chunks that differed and are not confirmed updated (after an error): each still holds
    /// its old bytes, except as said in `uncertain`.
    pub pending: Vec<Range<u64>>,
    /// Chunks whose patch was being written when the error happened: their runs may be
    /// partly written.
    pub uncertain: Vec<u64>,
    pub hash_time: Duration,
    pub elapsed: Duration,
}

impl Report {
    /// Add what pushing (or pulling) one chunk did.
    pub(crate) fn count(&mut self, p: &Pushed) {
        self.data_bytes += p.data_bytes;
        self.zero_bytes += p.zero_bytes;
        self.resent_whole += p.resent_whole as u64;
        self.updated += (!p.unchanged) as u64;
    }
}

/// A failed sync: the error and what had been done.
#[derive(Debug, thiserror::Error)]
#[error("{}", error.chain())]
pub struct SyncError {
    pub error: StoreError,
    pub report: Box<Report>,
}

/// What pushing one chunk did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pushed {
    /// The digest the destination chunk now has.
    pub digest: Digest,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub resent_whole: bool,
    /// The chunk already had these bytes; nothing was sent.
    pub unchanged: bool,
}

/// Push chunk `i` of `src` to `dest`, which holds `dest_digest` there if known. Reads the chunk
/// once; the digest sent is that of the bytes read, so a source changing meanwhile still leaves
/// the destination with bytes the source really had.
pub async fn push_chunk(
    src: &DynStore,
    layout: Layout,
    dest: &DynDest,
    i: u64,
    dest_digest: Option<Digest>,
) -> Result<Pushed> {
    let n = dest.digest_len();
    let zero_there = dest_digest.is_some_and(|d| digest::same(&d, &layout.zero_digest(i), n));
    if let Some(local) = dest.as_local() {
        return push_local(src, layout, local, i, dest_digest, zero_there).await;
    }
    // Ask for the destination's page digests first; the read follows, so no chunk waits in
    // memory for an answer.
    let theirs = if zero_there {
        None
    } else {
        Some(dest.page_digests(i).await?)
    };
    let data = digest::read_chunk(&**src, layout, i).await?.freeze();
    let want = digest::chunk_digest(&data);
    if dest_digest.is_some_and(|d| digest::same(&d, &want, n)) {
        return Ok(Pushed {
            digest: want,
            unchanged: true,
            ..Pushed::default()
        });
    }
    push_remote_data(dest, i, data, want, theirs).await
}

/// Make chunk `i` of a remote `dest` equal to `data` (digest `want`), given the destination's
/// page digests of the chunk (`None`: it is all zeros).
async fn push_remote_data(
    dest: &DynDest,
    i: u64,
    data: bytes::Bytes,
    want: Digest,
    theirs: Option<Vec<u32>>,
) -> Result<Pushed> {
    if let Some(t) = &theirs
        && t.len() as u64 != data.len().div_ceil(PAGE as usize) as u64
    {
        return Err(StoreError::backend(format!(
            "destination sent {} page digests for chunk {i} of {} bytes",
            t.len(),
            data.len()
        )));
    }
    let runs = if digest::is_zero(&data) {
        vec![Run {
            off: 0,
            len: data.len() as u32,
            data: None,
        }]
    } else {
        match &theirs {
            Some(t) => diff_runs(&data, Theirs::Pages(t)),
            None => diff_runs(&data, Theirs::Zero),
        }
    };
    let (mut data_bytes, zero_bytes) = run_bytes(&runs);
    let mut resent_whole = false;
    if dest.patch(i, want, runs).await? == PatchOutcome::Mismatch {
        // The page digests hid a difference (or the destination changed): send it all.
        resent_whole = true;
        let whole = vec![Run {
            off: 0,
            len: data.len() as u32,
            data: Some(data.clone()),
        }];
        data_bytes += data.len() as u64;
        if dest.patch(i, want, whole).await? != PatchOutcome::Applied {
            return Err(StoreError::backend(format!(
                "destination refused the whole chunk {i} with its own digest"
            )));
        }
    }
    Ok(Pushed {
        digest: want,
        data_bytes,
        zero_bytes,
        resent_whole,
        unchanged: false,
    })
}

pub(crate) fn run_bytes(runs: &[Run]) -> (u64, u64) {
    runs.iter().fold((0, 0), |(d, z), r| match r.data {
        Some(_) => (d + r.len as u64, z),
        None => (d, z + r.len as u64),
    })
}

/// [`push_chunk`] to a store in this process: pages are compared byte for byte, which is exact,
/// so no page digests and no second strong check are needed.
async fn push_local(
    src: &DynStore,
    layout: Layout,
    local: &crate::dest::LocalDest,
    i: u64,
    dest_digest: Option<Digest>,
    zero_there: bool,
) -> Result<Pushed> {
    let data = digest::read_chunk(&**src, layout, i).await?;
    let want = digest::chunk_digest(&data);
    if dest_digest == Some(want) {
        return Ok(Pushed {
            digest: want,
            unchanged: true,
            ..Pushed::default()
        });
    }
    push_local_data(local, i, &data, want, zero_there).await
}

/// Make chunk `i` of `local` equal to `data`, whose digest is `want`.
async fn push_local_data(
    local: &crate::dest::LocalDest,
    i: u64,
    data: &[u8],
    want: Digest,
    zero_there: bool,
) -> Result<Pushed> {
    let runs = if zero_there {
        diff_runs_copied(data, Theirs::Zero)
    } else {
        let old = local.read_chunk(i).await?;
        diff_runs_copied(data, Theirs::Bytes(&old))
    };
    local.apply_exact(i, want, &runs).await?;
    let (data_bytes, zero_bytes) = run_bytes(&runs);
    Ok(Pushed {
        digest: want,
        data_bytes,
        zero_bytes,
        resent_whole: false,
        unchanged: runs.is_empty(),
    })
}

/// Collapse sorted chunk numbers into ranges.
pub fn ranges(mut v: Vec<u64>) -> Vec<Range<u64>> {
    v.sort_unstable();
    let mut out: Vec<Range<u64>> = Vec::new();
    for i in v {
        match out.last_mut() {
            Some(r) if r.end == i => r.end += 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Sync `src` into `dest` (same size). See the crate docs for what a reader of the destination
/// may observe and what an interrupted sync leaves.
pub async fn sync(
    src: &Source,
    dest: DynDest,
    opts: SyncOptions,
    progress: &dyn Progress,
) -> Result<Report, SyncError> {
    sync_held(src, dest, opts, progress).await.map(|(r, _)| r)
}

/// [`sync`], also returning the digest of every chunk the destination now holds.
pub async fn sync_held(
    src: &Source,
    dest: DynDest,
    opts: SyncOptions,
    progress: &dyn Progress,
) -> Result<(Report, Vec<Digest>), SyncError> {
    let t0 = Instant::now();
    let layout = dest.layout();
    let mut report = Report {
        size: layout.size,
        chunk_size: layout.chunk_size,
        chunks: layout.chunks(),
        ..Report::default()
    };
    let fail = |error: StoreError, report: &Report| SyncError {
        error,
        report: Box::new(report.clone()),
    };
    if src.store.size() != layout.size {
        let e = StoreError::Config(format!(
            "the source has {} bytes and the destination {}: sync needs equal sizes",
            src.store.size(),
            layout.size
        ));
        return Err(fail(e, &report));
    }
    progress.phase("hash", layout.size);
    let inc = |n| progress.inc(n);
    // The destination's digests are fetched while the source is scanned; the scan patches each
    // changed chunk as soon as both digests of it are known, while its bytes are in memory.
    let inline = Arc::new(Inline::new(layout, opts.window));
    let hook = inline_hook(dest.clone(), inline.clone());
    let (s, d) = tokio::join!(
        source_digests(&src.store, layout, src.index.as_ref(), &inc, Some(hook)),
        inline.theirs(&dest)
    );
    // Remote patches the scan started.
    let tasks = std::mem::take(&mut *inline.tasks.lock());
    for t in tasks {
        if let Err(e) = t.await {
            inline.fail(StoreError::backend(format!("chunk task failed: {e}")));
        }
    }
    let inline_done = std::mem::take(&mut *inline.done.lock());
    let inline_started: Vec<u64> = inline.started.lock().iter().copied().collect();
    let inline_error = inline.error.lock().take();
    let SourceDigests {
        digests: src_digests,
        stats: scan,
        status,
        save,
    } = match s {
        Ok(s) if inline_error.is_none() => s,
        s => {
            // Chunks the scan patched are new; every other one still holds its old bytes,
            // except those being patched when the scan failed.
            let e = inline_error.unwrap_or_else(|| {
                s.err()
                    .unwrap_or_else(|| StoreError::backend("scan failed"))
            });
            let done: std::collections::HashSet<u64> = inline_done.iter().map(|x| x.0).collect();
            for (_, p) in &inline_done {
                report.count(p);
            }
            let (ws, wr) = dest.wire();
            report.wire_sent = ws;
            report.wire_received = wr;
            report.pending = ranges((0..layout.chunks()).filter(|i| !done.contains(i)).collect());
            report.uncertain = inline_started;
            report.elapsed = t0.elapsed();
            return Err(fail(e, &report));
        }
    };
    let dst_digests = d.map(|d| d.to_vec()).map_err(|e| fail(e, &report))?;
    report.src_scan = scan;
    report.src_index = status_text(&status);
    report.hash_time = t0.elapsed();
    let n = dest.digest_len();
    let differing: Vec<u64> = (0..layout.chunks())
        .filter(|&i| !digest::same(&src_digests[i as usize], &dst_digests[i as usize], n))
        .collect();
    report.differing = differing.len() as u64;
    // What the scan did not patch (holes of the source, or chunks of a trusted source index).
    let patched: std::collections::HashSet<u64> = inline_done.iter().map(|x| x.0).collect();
    let work: Vec<_> = differing
        .iter()
        .filter(|i| !patched.contains(i))
        .map(|&i| (i, Some(dst_digests[i as usize])))
        .collect();
    progress.phase("send", work.len() as u64);
    let (mut done, error) =
        push_chunks(&src.store, layout, &dest, work, opts.window, Some(progress)).await;
    done.extend(inline_done);
    // What the destination now holds: the source's digest where they matched (the destination
    // may have sent a prefix only), the pushed digest where a chunk was sent.
    let mut held = src_digests.clone();
    for &i in &differing {
        held[i as usize] = dst_digests[i as usize];
    }
    for (i, p) in &done {
        report.count(p);
        held[*i as usize] = p.digest;
    }
    let (ws, wr) = dest.wire();
    report.wire_sent = ws;
    report.wire_received = wr;
    if let Some((e, started)) = error {
        let done: std::collections::HashSet<u64> = done.into_iter().map(|(i, _)| i).collect();
        report.pending = ranges(
            differing
                .iter()
                .copied()
                .filter(|i| !done.contains(i))
                .collect(),
        );
        // A chunk whose patch was sent and not answered may have been applied (a patch is
        // applied whole or not at all by a live peer; a local write error can leave part).
        report.uncertain = started;
        report.elapsed = t0.elapsed();
        return Err(fail(e, &report));
    }
    match dest.commit().await {
        Ok(stats) => report.dest = stats,
        Err(e) => return Err(fail(e.context("committing the destination"), &report)),
    }
    let (ws, wr) = dest.wire();
    report.wire_sent = ws;
    report.wire_received = wr;
    if let (Some(index), Some((before, key, fps))) = (&src.index, save) {
        let index = index.clone();
        let saved = tokio::task::spawn_blocking(move || {
            index.save(
                layout,
                &src_digests,
                Some((&key, &fps)),
                Some(before),
                false,
            )
        })
        .await;
        if let Ok(Err(e)) | Err(e) = saved.map_err(std::io::Error::other) {
            tracing::warn!("could not save the source's digest index: {e}");
        }
    }
    report.elapsed = t0.elapsed();
    Ok((report, held))
}

/// Chunks a scan patched in passing (see [`inline_hook`]).
struct Inline {
    layout: Layout,
    /// The destination's digests, or why they could not be had.
    theirs: tokio::sync::OnceCell<Result<Arc<Vec<Digest>>, String>>,
    done: parking_lot::Mutex<Vec<(u64, Pushed)>>,
    /// Being patched now.
    started: parking_lot::Mutex<std::collections::BTreeSet<u64>>,
    /// Patches of a remote destination under way, and a bound on the chunks they hold.
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    held: Arc<Semaphore>,
    /// The first failed patch.
    error: parking_lot::Mutex<Option<StoreError>>,
}

/// Bytes of changed chunks held for a remote destination's answers.
const INLINE_HELD: u64 = 64 << 20;

impl Inline {
    fn new(layout: Layout, window: usize) -> Self {
        let held = (INLINE_HELD / layout.chunk_size).clamp(1, window.max(1) as u64);
        Inline {
            layout,
            theirs: tokio::sync::OnceCell::new(),
            done: Default::default(),
            started: Default::default(),
            tasks: Default::default(),
            held: Arc::new(Semaphore::new(held as usize)),
            error: Default::default(),
        }
    }

    /// The destination's digests (fetched once, by whoever asks first).
    async fn theirs(&self, dest: &DynDest) -> Result<Arc<Vec<Digest>>> {
        let r = self
            .theirs
            .get_or_init(|| async {
                let d = dest
                    .digests()
                    .await
                    .map_err(|e| e.context("destination digests").chain().to_string())?;
                if d.len() as u64 != self.layout.chunks() {
                    return Err(format!(
                        "destination sent {} digests for {} chunks",
                        d.len(),
                        self.layout.chunks()
                    ));
                }
                Ok(Arc::new(d))
            })
            .await;
        r.clone().map_err(StoreError::backend)
    }

    fn fail(&self, e: StoreError) {
        self.error.lock().get_or_insert(e);
    }

    fn finish(&self, i: u64, r: Result<Pushed>) {
        match r {
            Ok(p) => {
                self.started.lock().remove(&i);
                self.done.lock().push((i, p));
            }
            Err(e) => self.fail(e.context(format!("chunk {i}"))),
        }
    }
}

/// A scan hook that patches every chunk whose digest differs from the destination's with the
/// bytes just hashed, so a changed chunk is read and hashed once: in place for a destination
/// in this process, else by a task that asks for the destination's page digests and sends the
/// changed pages (holding at most [`INLINE_HELD`] bytes of chunks; the scan waits beyond).
fn inline_hook(dest: DynDest, inline: Arc<Inline>) -> digest::PieceHook {
    Arc::new(move |first, buf, digests| {
        let rt = tokio::runtime::Handle::current();
        let layout = inline.layout;
        let theirs = rt.block_on(inline.theirs(&dest))?;
        let n = dest.digest_len();
        let mut off = 0usize;
        for (k, want) in digests.iter().enumerate() {
            if inline.error.lock().is_some() {
                return Err(StoreError::backend("stopped after a failed chunk"));
            }
            let i = first + k as u64;
            let len = layout.chunk(i).1 as usize;
            let data = &buf[off..off + len];
            off += len;
            let have = theirs[i as usize];
            if digest::same(want, &have, n) {
                continue;
            }
            let zero_there = digest::same(&have, &layout.zero_digest(i), n);
            if let Some(local) = dest.as_local() {
                inline.started.lock().insert(i);
                let r = rt.block_on(push_local_data(local, i, data, *want, zero_there));
                inline.finish(i, r);
                continue;
            }
            let permit = rt
                .block_on(inline.held.clone().acquire_owned())
                .map_err(|_| StoreError::backend("patch window closed"))?;
            inline.started.lock().insert(i);
            let data = bytes::Bytes::copy_from_slice(data);
            let (dest, inline2, want) = (dest.clone(), inline.clone(), *want);
            let task = rt.spawn(async move {
                let r = async {
                    let pages = if zero_there {
                        None
                    } else {
                        Some(dest.page_digests(i).await?)
                    };
                    push_remote_data(&dest, i, data, want, pages).await
                }
                .await;
                drop(permit);
                inline2.finish(i, r);
            });
            inline.tasks.lock().push(task);
        }
        Ok(())
    })
}

/// Push chunks `(index, digest the destination holds if known)` with `window` in flight.
/// Returns what was pushed and, after a failure, the first error and the chunks that were
/// started but not confirmed. After a failure no new chunk starts; those in flight finish.
pub async fn push_chunks(
    src: &DynStore,
    layout: Layout,
    dest: &DynDest,
    work: Vec<(u64, Option<Digest>)>,
    window: usize,
    progress: Option<&dyn Progress>,
) -> (Vec<(u64, Pushed)>, Option<(StoreError, Vec<u64>)>) {
    let (src, dest) = (src.clone(), dest.clone());
    run_window(work, window, progress, move |i, have| {
        let (store, dest) = (src.clone(), dest.clone());
        async move { push_chunk(&store, layout, &dest, i, have).await }
    })
    .await
}

/// Run `f` on every `(chunk, item)` of `work` with `window` in flight. Returns what was done
/// and, after a failure, the first error and the chunks started but not confirmed. After a
/// failure no new chunk starts; those in flight finish.
pub async fn run_window<T, F, Fut>(
    work: Vec<(u64, T)>,
    window: usize,
    progress: Option<&dyn Progress>,
    f: F,
) -> (Vec<(u64, Pushed)>, Option<(StoreError, Vec<u64>)>)
where
    T: Send + 'static,
    F: Fn(u64, T) -> Fut,
    Fut: std::future::Future<Output = Result<Pushed>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(window.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut error: Option<StoreError> = None;
    let mut done = Vec::new();
    let mut started = std::collections::BTreeSet::new();
    let mut next = work.into_iter();
    loop {
        // Start chunks while the window has room and nothing failed.
        while error.is_none() {
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                break;
            };
            let Some((i, item)) = next.next() else {
                drop(permit);
                break;
            };
            started.insert(i);
            let fut = f(i, item);
            tasks.spawn(async move {
                let r = fut.await;
                drop(permit);
                (i, r)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        match joined {
            Ok((i, Ok(p))) => {
                done.push((i, p));
                started.remove(&i);
                if let Some(pr) = progress {
                    pr.inc(1);
                }
            }
            Ok((i, Err(e))) => {
                error.get_or_insert(e.context(format!("chunk {i}")));
            }
            Err(e) => {
                error.get_or_insert(StoreError::backend(format!("chunk task failed: {e}")));
            }
        }
    }
    (done, error.map(|e| (e, started.into_iter().collect())))
}

fn status_text(s: &IndexStatus) -> String {
    match s {
        IndexStatus::None => "none".into(),
        IndexStatus::Missing => "missing".into(),
        IndexStatus::Stale(why) => format!("stale: {why}"),
        IndexStatus::Used => "used".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_neighbours() {
        assert_eq!(ranges(vec![5, 1, 2, 3, 7]), vec![1..4, 5..6, 7..8]);
    }
}

//! Pull: the source is a memsync peer (`memsync sync memsync://HOST:PORT file:DST`), the
//! destination a store in this process.
//!
//! The peer sends the digests of its chunks (from its index, or hashing its store where it is);
//! this side has its own from its index or a scan. For each chunk that differs this side sends
//! the page digests of its copy, the peer answers with the chunk's strong digest and the pages
//! that differ, and the chunk is written only if the patched bytes have that digest
//! ([`LocalDest::patch`]); otherwise the whole chunk is asked for. What a reader of the
//! destination sees and what an interruption leaves are as for a push (see the crate docs).

use std::sync::Arc;
use std::time::Instant;

use memsync_core::StoreError;

use crate::dest::{Dest, LocalDest, PatchOutcome};
use crate::digest::{self, Digest};
use crate::engine::{
    Progress, Pushed, Report, SyncError, SyncOptions, ranges, run_bytes, run_window,
};
use crate::peer::RemoteDest;

/// Make `local` equal to the peer's store behind `remote` (connected with
/// [`crate::peer::Connect::pull`] and the digests asked for).
pub async fn pull(
    remote: Arc<RemoteDest>,
    local: Arc<LocalDest>,
    opts: SyncOptions,
    progress: &dyn Progress,
) -> Result<Report, SyncError> {
    let t0 = Instant::now();
    let layout = local.layout();
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
    if remote.layout() != layout {
        let e = StoreError::Config("the peer connection uses another layout".into());
        return Err(fail(e, &report));
    }
    progress.phase("hash", layout.size);
    let (theirs, mine) = tokio::join!(remote.digests(), local.digests());
    let theirs = theirs.map_err(|e| fail(e.context("the peer's digests"), &report))?;
    let mine = mine.map_err(|e| fail(e.context("the destination's digests"), &report))?;
    progress.inc(layout.size);
    report.hash_time = t0.elapsed();
    let n = remote.digest_len();
    let differing: Vec<u64> = (0..layout.chunks())
        .filter(|&i| !digest::same(&theirs[i as usize], &mine[i as usize], n))
        .collect();
    report.differing = differing.len() as u64;
    progress.phase("send", differing.len() as u64);
    let work = differing.iter().map(|&i| (i, ())).collect();
    let (r, l) = (remote.clone(), local.clone());
    let (done, error) = run_window(work, opts.window, Some(progress), move |i, ()| {
        let (remote, local) = (r.clone(), l.clone());
        async move { pull_chunk(&remote, &local, i).await }
    })
    .await;
    for (_, p) in &done {
        report.count(p);
    }
    let (ws, wr) = remote.wire();
    report.wire_sent = ws;
    report.wire_received = wr;
    if let Some((e, started)) = error {
        let done: std::collections::HashSet<u64> = done.into_iter().map(|(i, _)| i).collect();
        report.pending = ranges(
            differing
                .into_iter()
                .filter(|i| !done.contains(i))
                .collect(),
        );
        report.uncertain = started;
        report.elapsed = t0.elapsed();
        return Err(fail(e, &report));
    }
    // The peer's counters (what it hashed and read), then this side made durable.
    match remote.commit().await {
        Ok(s) => {
            report.src_scan = s.scan;
            report.src_index = if s.index_used { "used (peer)" } else { "peer" }.into();
        }
        Err(e) => return Err(fail(e.context("ending the pull at the peer"), &report)),
    }
    match local.commit().await {
        Ok(stats) => report.dest = stats,
        Err(e) => return Err(fail(e.context("committing the destination"), &report)),
    }
    let (ws, wr) = remote.wire();
    report.wire_sent = ws;
    report.wire_received = wr;
    report.elapsed = t0.elapsed();
    Ok(report)
}

async fn pull_chunk(
    remote: &RemoteDest,
    local: &LocalDest,
    i: u64,
) -> memsync_core::Result<Pushed> {
    let mine = local.read_chunk(i).await?;
    let (want, runs) = remote.pull_chunk(i, digest::page_digests(&mine)).await?;
    drop(mine);
    let (mut data_bytes, zero_bytes) = run_bytes(&runs);
    let unchanged = runs.is_empty();
    let mut resent_whole = false;
    if local.patch(i, want, runs).await? == PatchOutcome::Mismatch {
        // A page-digest collision, or the chunk changed here meanwhile: take all of it.
        resent_whole = true;
        let (again, runs): (Digest, _) = remote.pull_chunk(i, Vec::new()).await?;
        data_bytes += run_bytes(&runs).0;
        if again != want || local.patch(i, want, runs).await? != PatchOutcome::Applied {
            return Err(StoreError::backend(format!(
                "chunk {i} from the peer does not have the digest the peer sent"
            )));
        }
    }
    Ok(Pushed {
        digest: want,
        data_bytes,
        zero_bytes,
        resent_whole,
        unchanged,
    })
}

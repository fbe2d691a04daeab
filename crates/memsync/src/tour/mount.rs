//! Tour step: the NBD export mounted through FUSE with a local cache (a managed mount).

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use memsync_bench::gbps;
use memsync_cache::{CacheConfig, open_cache};
use memsync_core::DynStore;
use memsync_core::size::format_size;
use memsync_fuse::FuseOptions;

use super::{Tour, check_interrupted};
use crate::context::progress;

/// Why a FUSE mount cannot work here, if it cannot.
fn unavailable() -> Option<&'static str> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse does not exist");
    }
    // The owner of /proc/self is this process's effective user.
    match std::fs::metadata("/proc/self") {
        Ok(m) if m.uid() == 0 => None,
        Ok(_) => Some("mounting FUSE here needs root"),
        Err(_) => Some("cannot tell whether this process is root (no /proc)"),
    }
}

pub(super) fn run(t: &mut Tour<'_>, url: &str, want: blake3::Hash) -> Result<()> {
    let ctx = t.ctx;
    t.step(
        "mount the export through FUSE with a local cache",
        "The same NBD export becomes the remote of a managed mount: a cache directory that\n\
         keeps every chunk it fetches (1 MiB chunks, background pull) shown as one FUSE file\n\
         any process can read or mmap, as `memsync mount --cache DIR --fuse MNT` does.\n\
         Reading the file must give the source's BLAKE3.",
    )?;
    if let Some(why) = unavailable() {
        outln!("   skipped: {why}");
        t.figure("FUSE mount", format!("skipped ({why})"));
        return Ok(());
    }
    let cache_dir = t.path("cache");
    let mp = t.path("mnt");
    std::fs::create_dir_all(&mp)?;
    let cfg = CacheConfig {
        chunk_size: 1 << 20,
        pull: true,
        ..CacheConfig::default()
    };
    let cache = ctx
        .rt
        .block_on(open_cache(&ctx.registry, url, &cache_dir, cfg))
        .context("opening the cache")?;
    let store: DynStore = cache.clone();
    let m = memsync_fuse::mount(store, ctx.rt.handle().clone(), &mp, FuseOptions::default())
        .with_context(|| format!("mounting FUSE on {}", mp.display()))?;
    let file = m.file_path().to_path_buf();
    outln!("   mounted {}", file.display());
    let read = (|| {
        let mut f = std::fs::File::open(&file)?;
        let len = f.metadata()?.len();
        let pb = progress(len, "read");
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        loop {
            check_interrupted()?;
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            pb.inc(n as u64);
        }
        pb.finish_and_clear();
        anyhow::Ok((h.finalize(), len, start.elapsed()))
    })();
    let unmounted = m.unmount();
    let closed = ctx.rt.block_on(crate::mount::close_cache(&cache));
    let (got, len, el) = read?;
    unmounted.context("unmounting")?;
    let stats = closed?;
    outln!(
        "   read {} through the mount in {:.3} s ({:.2} GB/s)",
        format_size(len),
        el.as_secs_f64(),
        gbps(len, el)
    );
    outln!("   cache: {stats}");
    if got != want {
        bail!("the mounted file has blake3 {got}, the source {want}");
    }
    outln!("   mounted file checksum matches: {got}");
    t.figure(
        "FUSE mount read (cold cache)",
        format!("{:.2} GB/s", gbps(len, el)),
    );
    Ok(())
}

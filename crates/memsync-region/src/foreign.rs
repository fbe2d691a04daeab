//! [`ForeignRegion`]: the fault engine serving another process's memory
//! through the userfaultfd that process handed over (a VMM's guest memory:
//! Firecracker's UFFD handler protocol).
//!
//! The other process's ranges are laid out, in this process, one after the
//! other in the order of their source offsets inside a
//! [`Mapping::placeholder`]; the userfaultfd translates between the two
//! ([`memsync_sys::Remap`]). So the engine, the chunk table, the fault path
//! and the puller are exactly those of a [`LazyRegion`](crate::LazyRegion),
//! with chunk `i` at source offset `i * chunk`. What differs: nothing is
//! mapped or registered here, pages are installed with `COPY`/`ZEROPAGE`
//! (`MOVE` cannot cross processes; `ZEROPAGE` for the chunks the source's
//! extents show to be zero, asked once within
//! [`ForeignOptions::extents_within`]), a chunk the source cannot deliver is
//! poisoned (`UFFDIO_POISON`) or, without it, left missing so that the next
//! access retries (a SIGBUS mapping here would not reach the other
//! process), and `REMOVE` events are reported to the driver as source
//! ranges the moment they are read.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use memsync_sys::{Features, Mapping, Remap, RemapRange, Uffd};

use crate::config::{Backing, RegionConfig, WriteTracking};
use crate::engine::{Engine, RemoveTap};
use crate::error::{Error, sys};
use crate::fault::{Core, CoreParts, Settings};
use crate::puller::Puller;
use crate::region::zero_map;
use crate::running::Running;
use crate::source::{ChunkSource, FaultHooks};
use crate::state::Geometry;

/// One range of the other process's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignRange {
    /// Its start address in the other process.
    pub remote: usize,
    /// Length in bytes.
    pub len: usize,
    /// Where its data starts in the source.
    pub offset: u64,
}

/// What a [`ForeignRegion`] does beyond a [`RegionConfig`].
pub struct ForeignOptions {
    /// Start the background pull at the first fault (instead of at once, or
    /// never, as [`RegionConfig::prefetch`] says).
    pub pull_after_first_fault: bool,
    /// Told, on the thread that read it and before any fault read after it
    /// is served, the source range of every `REMOVE` event (the other
    /// process dropped those pages, e.g. a balloon: a source that serves
    /// zeros there from now on is what Firecracker expects).
    pub on_remove: Option<Box<dyn Fn(Range<u64>) + Send + Sync>>,
    /// With [`RegionConfig::zero_detect`]: how long [`ForeignRegion::new`]
    /// waits for the source's extents. Chunks they show to be entirely
    /// zero or hole are installed with `UFFDIO_ZEROPAGE` without a read
    /// (counted in [`chunks_zero`](crate::RegionStatsSnapshot::chunks_zero)).
    /// Best effort: a source without extents, a query that fails or one
    /// not answered within this time leaves every chunk to be read, as
    /// without `zero_detect` (logged). The other process's faults wait
    /// meanwhile, so keep it short (bounded by
    /// [`RegionConfig::fetch_deadline`] too).
    pub extents_within: Duration,
}

impl Default for ForeignOptions {
    /// No pull at the first fault, no `REMOVE` tap, extents within 5 s.
    fn default() -> Self {
        Self {
            pull_after_first_fault: false,
            on_remove: None,
            extents_within: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for ForeignOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignOptions")
            .field("pull_after_first_fault", &self.pull_after_first_fault)
            .field("on_remove", &self.on_remove.is_some())
            .field("extents_within", &self.extents_within)
            .finish()
    }
}

/// Starts the pull at the first fault served.
#[derive(Debug)]
struct PullOnFault {
    pull: Arc<Puller>,
    armed: AtomicBool,
}

impl FaultHooks for PullOnFault {
    fn missing(&self, _chunk: usize) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.pull.start();
        }
    }
}

/// Another process's memory served by this process's fault engine (see the
/// module docs). Dropping it stops the handler and puller threads; the
/// other process's registration is left as it is (its later faults wait
/// for a handler).
#[derive(Debug)]
pub struct ForeignRegion {
    run: Running,
}

impl ForeignRegion {
    /// Serves the faults of `uffd` (another process's userfaultfd, e.g.
    /// from [`Uffd::from_fd`]) on `ranges` from `source`.
    ///
    /// The ranges must tile the source: sorted by offset they start at 0,
    /// follow each other without gaps and end at `source.size()`; their
    /// offsets and lengths must be multiples of `cfg.chunk_size` (which is a
    /// power of two of at least one page, 2 MiB with
    /// [`Backing::Hugetlb`], which says the ranges are hugetlb memory).
    /// `cfg.backing` other than anonymous or hugetlb, write tracking and a
    /// budget are refused.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for ranges or a configuration that do not fit;
    /// [`Error::Sys`] if the placeholder or the threads cannot be created.
    pub fn new(
        uffd: Uffd,
        ranges: &[ForeignRange],
        source: Arc<dyn ChunkSource>,
        mut cfg: RegionConfig,
        opts: ForeignOptions,
    ) -> Result<Self, Error> {
        if matches!(cfg.backing, Backing::Memfd | Backing::Shared) {
            return Err(Error::Config(
                "another process's memory is anonymous or hugetlb here, not a memfd or the \
                 source's memory"
                    .into(),
            ));
        }
        if cfg.write_tracking != WriteTracking::Off || cfg.budget.is_some() {
            return Err(Error::Config(
                "write tracking and budgets need this process's own memory".into(),
            ));
        }
        let page = cfg.install_page()?;
        let chunk = cfg.chunk_size;
        let size = source.size();
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.offset);
        let mut next = 0u64;
        for r in &sorted {
            if r.offset != next {
                return Err(Error::Config(format!(
                    "the ranges must tile the source: a range starts at offset {} where {next} was expected",
                    r.offset
                )));
            }
            if r.len == 0 || r.len % chunk != 0 || r.remote % page != 0 {
                return Err(Error::Config(format!(
                    "range at offset {} ({} bytes at {:#x}) is empty or not aligned to the chunk size {chunk} and page size {page}",
                    r.offset, r.len, r.remote
                )));
            }
            next = r
                .offset
                .checked_add(r.len as u64)
                .ok_or_else(|| Error::Config("range offsets overflow".into()))?;
        }
        if next != size || size == 0 {
            return Err(Error::Config(format!(
                "the ranges cover {next} bytes of a source of {size}"
            )));
        }
        let geo = Geometry::new(size, chunk, page)
            .ok_or_else(|| Error::Config(format!("cannot serve a source of {size} bytes")))?;
        let map = Mapping::placeholder(geo.map_len(), memsync_sys::pmd_size().max(page)).map_err(
            sys("reserving address space for the other process's memory"),
        )?;
        let base = map.addr();
        let remap = Remap::new(
            sorted
                .iter()
                .map(|r| RemapRange {
                    local: base + r.offset as usize,
                    remote: r.remote,
                    len: r.len,
                })
                .collect(),
        )
        .map_err(|e| Error::Config(format!("the ranges: {e}")))?;
        let uffd = uffd.with_remap(remap);
        let tap = opts.on_remove.map(|f| {
            RemoveTap(Box::new(move |s: usize, e: usize| {
                if s >= base && e > s {
                    f((s - base) as u64..(e - base) as u64);
                }
            }) as Box<dyn Fn(usize, usize) + Send + Sync>)
        });
        let engine = Engine::foreign(uffd, map, cfg.spin, cfg.standby(), tap)?;
        // The received descriptor's features are the other process's
        // choice; UFFDIO_POISON only needs the kernel to have it.
        let use_poison =
            cfg.use_poison && Uffd::probe_features().is_ok_and(|f| f.contains(Features::POISON));
        if !use_poison {
            tracing::warn!(
                "memsync-region: no UFFDIO_POISON: a chunk the source cannot deliver stays missing and the next access retries"
            );
        }
        let pull = Arc::new(Puller::new(
            cfg.take_priority(),
            cfg.prefetch && !opts.pull_after_first_fault,
        ));
        let hooks: Arc<dyn FaultHooks> = if opts.pull_after_first_fault && cfg.prefetch {
            Arc::new(PullOnFault {
                pull: Arc::clone(&pull),
                armed: AtomicBool::new(true),
            })
        } else {
            Arc::new(())
        };
        let zero = if cfg.zero_detect {
            let within = opts.extents_within.min(cfg.fetch_deadline);
            match zero_map(&*source, &geo, cfg.runtime.as_ref(), Some(within)) {
                Ok(bits) => bits,
                Err(e) => {
                    tracing::warn!(error = %e, "memsync-region: no zero map (the source's extents failed or did not come within {within:?}): every chunk is read");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let core = Core::new(CoreParts {
            engine,
            geo,
            source,
            hooks,
            zero,
            cfg: Settings::new(&cfg, use_poison),
            use_move: false,
            tracking: WriteTracking::Off,
            dirty: None,
            budget: None,
        })?;
        Ok(Self {
            run: Running::start(core, pull, &cfg)?,
        })
    }

    /// Whether a chunk the source cannot deliver is poisoned (the
    /// accessing thread of the other process gets `SIGBUS`).
    #[must_use]
    pub fn uses_poison(&self) -> bool {
        self.run.core.cfg.use_poison
    }

    crate::running::engine_accessors!();
}

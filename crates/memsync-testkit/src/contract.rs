//! The store contract suite: every store and layer must pass it.
//!
//! [`run`] exercises a store against a shadow model (a `Vec<u8>` copy of the first
//! [`ContractOpts::window`] bytes) and panics with the failed check's name, what went wrong and
//! the seed that reproduces it. [`try_run`] returns the [`Failure`] instead. Checks that do not
//! apply to a store (per its [`Caps`]) are skipped and listed in the [`Report`]; stores with
//! `block_size > 1` get aligned requests only.
//!
//! | check | what |
//! | --- | --- |
//! | `caps` | caps are self-consistent (block size divides size, preferred and max I/O) |
//! | `fresh_zero` / `load_model` | a fresh store reads zeros (if expected), else the model is loaded |
//! | `bounds` | first/last byte, zero-length at the end, one past the end and `offset+len` overflow are `OutOfRange`, misaligned requests are `Misaligned` |
//! | `random_io` | random writes and reads at random (unaligned) offsets and lengths match the model |
//! | `chunk_boundaries` | unaligned ranges crossing `preferred_io` boundaries, spanning up to three units |
//! | `trim`, `write_zeroes` | zeroed ranges (whole units, partial, unaligned, empty, at the end) read as zeros and leave neighbours intact |
//! | `extents` | extents cover the requested range exactly, sorted and gap-free, and Hole/Zero extents read as zeros |
//! | `flush` | flush succeeds; write, flush, read back |
//! | `concurrent_disjoint` | writer tasks on disjoint (unaligned) regions while readers read everything |
//! | `concurrent_overlap` | writers on overlapping atomic units; every unit ends with one writer's value |
//! | `read_only` | a read-only store rejects write, trim and write-zeroes with `ReadOnly` |
//! | `final_verify` | the whole window still matches the model |
//!
//! The run uses `tokio::spawn` and `tokio::time`: call it inside a tokio runtime with time
//! enabled, multi-threaded to get real parallelism (`#[tokio::test(flavor = "multi_thread")]`).
//! Set `MEMSYNC_CONTRACT_SEED` to replay a failure.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use memsync_core::range::align_down;
use memsync_core::{Bytes, Caps, DynStore, Store, StoreError};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Environment variable that fixes the seed when [`ContractOpts::seed`] is `None`.
pub const SEED_ENV: &str = "MEMSYNC_CONTRACT_SEED";

/// Tuning for [`run`]. Build with [`ContractOpts::default`] and the setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ContractOpts {
    /// Seed of the random generator; `None`: [`SEED_ENV`] or a random one (printed on failure).
    pub seed: Option<u64>,
    /// A fresh store must read as zeros (default `true`). When `false` the model starts from
    /// what the store holds.
    pub expect_zero_initialised: bool,
    /// Bytes at the start of the store that are tracked in the model (default 64 MiB). The end of
    /// larger stores is still checked for bounds.
    pub window: u64,
    /// Random operations in `random_io` (default 1000).
    pub random_ops: usize,
    /// Longest random request (default 256 KiB).
    pub max_len: u64,
    /// Concurrent writer tasks (default 4).
    pub writers: usize,
    /// Concurrent reader tasks (default 2).
    pub readers: usize,
    /// Operations per concurrent task (default 128).
    pub ops_per_task: usize,
    /// The size of the units a store writes atomically, for `concurrent_overlap`. `None`: the
    /// store's `block_size` (the contract's minimum). Must be a multiple of it.
    pub atomic_unit: Option<u64>,
    /// Run the concurrency checks (default `true`).
    pub concurrency: bool,
    /// A check that takes longer than this fails (default 60 s), so a deadlock cannot hang CI.
    pub check_timeout: Duration,
}

impl Default for ContractOpts {
    fn default() -> Self {
        ContractOpts {
            seed: None,
            expect_zero_initialised: true,
            window: 64 << 20,
            random_ops: 1000,
            max_len: 256 << 10,
            writers: 4,
            readers: 2,
            ops_per_task: 128,
            atomic_unit: None,
            concurrency: true,
            check_timeout: Duration::from_secs(60),
        }
    }
}

impl ContractOpts {
    /// Fix the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
    /// Whether a fresh store must read as zeros.
    pub fn expect_zero_initialised(mut self, yes: bool) -> Self {
        self.expect_zero_initialised = yes;
        self
    }
    /// Bytes tracked by the model.
    pub fn window(mut self, bytes: u64) -> Self {
        self.window = bytes;
        self
    }
    /// Number of random operations.
    pub fn random_ops(mut self, n: usize) -> Self {
        self.random_ops = n;
        self
    }
    /// Longest random request.
    pub fn max_len(mut self, bytes: u64) -> Self {
        self.max_len = bytes;
        self
    }
    /// Concurrent writer and reader tasks.
    pub fn tasks(mut self, writers: usize, readers: usize) -> Self {
        self.writers = writers;
        self.readers = readers;
        self
    }
    /// Operations per concurrent task.
    pub fn ops_per_task(mut self, n: usize) -> Self {
        self.ops_per_task = n;
        self
    }
    /// The units the store writes atomically.
    pub fn atomic_unit(mut self, bytes: u64) -> Self {
        self.atomic_unit = Some(bytes);
        self
    }
    /// Whether to run the concurrency checks.
    pub fn concurrency(mut self, yes: bool) -> Self {
        self.concurrency = yes;
        self
    }
    /// Per-check time limit.
    pub fn check_timeout(mut self, limit: Duration) -> Self {
        self.check_timeout = limit;
        self
    }
}

/// What a successful run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed used.
    pub seed: u64,
    /// Checks that passed, with their run time.
    pub passed: Vec<(&'static str, Duration)>,
    /// Checks that were skipped, with the reason.
    pub skipped: Vec<(&'static str, &'static str)>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "contract passed (seed {}):", self.seed)?;
        for (name, t) in &self.passed {
            write!(f, " {name} {:.0?}", t)?;
        }
        for (name, why) in &self.skipped {
            write!(f, "; skipped {name} ({why})")?;
        }
        Ok(())
    }
}

/// A failed contract check.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Name of the check (see the module docs).
    pub check: &'static str,
    /// What went wrong, with the request and the store's error chain.
    pub message: String,
    /// The seed that reproduces the run.
    pub seed: u64,
    /// The store, as its `Debug` output (shortened).
    pub store: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "contract check `{}` failed for {}: {}\n(seed {}; replay with {SEED_ENV}={})",
            self.check, self.store, self.message, self.seed, self.seed
        )
    }
}

impl std::error::Error for Failure {}

type CheckResult = Result<(), String>;

/// Adds context to a store result.
trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, String>;
}

impl<T> Ctx<T> for Result<T, StoreError> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, String> {
        self.map_err(|e| format!("{}: {}", what(), e.chain()))
    }
}

fn expect_root<T>(
    r: Result<T, StoreError>,
    what: &str,
    want: &str,
    pred: impl FnOnce(&StoreError) -> bool,
) -> CheckResult {
    match r {
        Ok(_) => Err(format!("{what}: expected {want}, got Ok")),
        Err(e) if pred(e.root()) => Ok(()),
        Err(e) => Err(format!("{what}: expected {want}, got {}", e.chain())),
    }
}

fn expect_oor<T>(r: Result<T, StoreError>, what: &str) -> CheckResult {
    expect_root(r, what, "OutOfRange", |e| {
        matches!(e, StoreError::OutOfRange { .. })
    })
}

/// Describe how `got` differs from `want` (the bytes at store offset `off`), or `None`.
fn diff(what: &str, off: u64, got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    let last = got
        .iter()
        .zip(want)
        .rposition(|(a, b)| a != b)
        .unwrap_or(first);
    let count = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let show = |b: &[u8]| format!("{:02x?}", &b[first..(first + 8).min(b.len())]);
    Some(format!(
        "{what} ({} bytes at {off}): {count} bytes differ from the model, from offset {} to {}; \
         got {} want {} at {}",
        got.len(),
        off + first as u64,
        off + last as u64,
        show(got),
        show(want),
        off + first as u64,
    ))
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

struct Suite {
    store: DynStore,
    caps: Caps,
    size: u64,
    /// `caps.block_size`, at least 1.
    bs: u64,
    /// Boundary unit: `preferred_io` (or less in a small window), a multiple of `bs`.
    unit: u64,
    window: u64,
    shadow: Vec<u8>,
    rng: SmallRng,
    opts: ContractOpts,
}

impl Suite {
    fn writable(&self) -> bool {
        !self.caps.read_only
    }

    fn data(&mut self, len: u64) -> Bytes {
        let mut v = vec![0u8; len as usize];
        self.rng.fill_bytes(&mut v);
        Bytes::from(v)
    }

    /// A random block-aligned range inside the window, at most `max_len` long.
    fn range(&mut self, max_len: u64) -> (u64, u64) {
        random_range(&mut self.rng, 0, self.window, self.bs, max_len, self.unit)
    }

    async fn write(&mut self, off: u64, data: Bytes) -> CheckResult {
        let len = data.len();
        self.store
            .write(off, data.clone())
            .await
            .ctx(|| format!("write {off}+{len}"))?;
        let end = off as usize + len;
        if end <= self.shadow.len() {
            self.shadow[off as usize..end].copy_from_slice(&data);
        }
        Ok(())
    }

    fn zero_model(&mut self, off: u64, len: u64) {
        let end = ((off + len) as usize).min(self.shadow.len());
        let start = (off as usize).min(end);
        self.shadow[start..end].fill(0);
    }

    async fn read(&self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len as usize];
        self.store
            .read(off, &mut buf)
            .await
            .ctx(|| format!("read {off}+{len}"))?;
        Ok(buf)
    }

    async fn verify(&self, what: &str, off: u64, len: u64) -> CheckResult {
        let got = self.read(off, len).await?;
        let want = &self.shadow[off as usize..(off + len) as usize];
        diff(what, off, &got, want).map_or(Ok(()), Err)
    }

    /// Read the range `off..off+len` of the window in large requests and compare with the model.
    async fn verify_span(&self, what: &str, off: u64, len: u64) -> CheckResult {
        let step = align_down(self.caps.max_io.min(8 << 20), self.bs).max(self.bs);
        let mut pos = off;
        while pos < off + len {
            let n = step.min(off + len - pos);
            self.verify(what, pos, n).await?;
            pos += n;
        }
        Ok(())
    }

    async fn verify_all(&self, what: &str) -> CheckResult {
        self.verify_span(what, 0, self.window).await
    }
}

/// A random `bs`-aligned range within `lo..hi` (itself aligned), at most `max_len` long, biased
/// towards tiny and around-`unit` lengths.
fn random_range(
    rng: &mut SmallRng,
    lo: u64,
    hi: u64,
    bs: u64,
    max_len: u64,
    unit: u64,
) -> (u64, u64) {
    let units = (hi - lo) / bs;
    let max_units = (max_len / bs).clamp(1, units.max(1));
    let len = match rng.random_range(0..4) {
        0 => rng.random_range(1..=max_units.min(16)),
        1 | 2 => rng.random_range(1..=max_units.min(2 * unit / bs).max(1)),
        _ => rng.random_range(1..=max_units),
    };
    let off = rng.random_range(0..=units.saturating_sub(len));
    (lo + off * bs, len.min(units) * bs)
}

fn describe(store: &dyn Store) -> String {
    let mut s = format!("{store:?}");
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Run the contract suite; panic with the failed check, its context and the seed.
///
/// `store` is any [`Store`] by value: a concrete store, an `Arc` of one, or a [`DynStore`].
pub async fn run<S: Store>(store: S, opts: ContractOpts) -> Report {
    match try_run(store, opts).await {
        Ok(report) => report,
        Err(failure) => panic!("{failure}"),
    }
}

/// Run the contract suite and return the first failure instead of panicking.
pub async fn try_run<S: Store>(store: S, opts: ContractOpts) -> Result<Report, Failure> {
    let store: DynStore = Arc::new(store);
    let seed = opts
        .seed
        .or_else(|| {
            std::env::var(SEED_ENV)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        })
        .unwrap_or_else(|| rand::rng().random());
    let caps = store.caps();
    let size = store.size();
    let bs = caps.block_size.max(1);
    let window = align_down(size.min(opts.window), bs);
    let mut unit = align_down(caps.preferred_io, bs).max(bs);
    if unit.saturating_mul(2) > window {
        unit = align_down(window / 2, bs).max(bs);
    }
    let description = describe(&*store);
    let mut s = Suite {
        store,
        caps,
        size,
        bs,
        unit,
        window,
        shadow: vec![0u8; window as usize],
        rng: SmallRng::seed_from_u64(seed),
        opts,
    };
    let mut report = Report {
        seed,
        passed: Vec::new(),
        skipped: Vec::new(),
    };
    let limit = s.opts.check_timeout;

    macro_rules! step {
        ($name:literal, $skip:expr, $check:expr) => {{
            let skip: Option<&'static str> = $skip;
            if let Some(why) = skip {
                report.skipped.push(($name, why));
            } else {
                let start = Instant::now();
                let result = match tokio::time::timeout(limit, $check).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("did not finish within {limit:?} (deadlock?)")),
                };
                match result {
                    Ok(()) => report.passed.push(($name, start.elapsed())),
                    Err(message) => {
                        return Err(Failure {
                            check: $name,
                            message,
                            seed,
                            store: description,
                        });
                    }
                }
            }
        }};
    }

    let read_only = s.caps.read_only.then_some("read-only store");
    let tiny = (s.window < 2 * s.bs).then_some("store (window) smaller than two blocks");
    let writes = read_only.or(tiny);
    let concurrency = if s.opts.concurrency {
        writes
    } else {
        Some("disabled by options")
    };

    step!("caps", None, check_caps(&s));
    if s.opts.expect_zero_initialised {
        step!("fresh_zero", None, check_fresh_zero(&s));
    } else {
        step!("load_model", None, load_model(&mut s));
    }
    step!("bounds", None, check_bounds(&mut s));
    step!("random_io", tiny, check_random_io(&mut s));
    step!("chunk_boundaries", tiny, check_chunk_boundaries(&mut s));
    let trim_skip = writes.or((!s.caps.trim).then_some("caps.trim is false"));
    step!("trim", trim_skip, check_zeroing(&mut s, Zeroing::Trim));
    step!(
        "write_zeroes",
        writes,
        check_zeroing(&mut s, Zeroing::WriteZeroes)
    );
    step!("extents", tiny, check_extents(&mut s));
    step!("flush", None, check_flush(&mut s));
    step!(
        "concurrent_disjoint",
        concurrency,
        check_concurrent_disjoint(&mut s)
    );
    step!(
        "concurrent_overlap",
        concurrency,
        check_concurrent_overlap(&mut s)
    );
    let writable = (!s.caps.read_only).then_some("store is writable");
    step!("read_only", writable, check_read_only(&s));
    step!(
        "final_verify",
        None,
        s.verify_all("final read of the window")
    );
    Ok(report)
}

async fn check_caps(s: &Suite) -> CheckResult {
    let c = &s.caps;
    if c.block_size == 0 {
        return Err("caps.block_size is 0 (use 1 for byte-addressable stores)".into());
    }
    if !s.size.is_multiple_of(c.block_size) {
        return Err(format!(
            "size {} is not a multiple of caps.block_size {}: the last block is unreachable",
            s.size, c.block_size
        ));
    }
    if c.preferred_io == 0 || !c.preferred_io.is_multiple_of(c.block_size) {
        return Err(format!(
            "caps.preferred_io {} is not a positive multiple of block_size {}",
            c.preferred_io, c.block_size
        ));
    }
    if c.max_io < c.block_size || !c.max_io.is_multiple_of(c.block_size) {
        return Err(format!(
            "caps.max_io {} is not a positive multiple of block_size {}",
            c.max_io, c.block_size
        ));
    }
    if s.store.caps().read_only != c.read_only || s.store.size() != s.size {
        return Err("size() or caps().read_only changed between calls".into());
    }
    Ok(())
}

async fn check_fresh_zero(s: &Suite) -> CheckResult {
    // The model starts as zeros, so comparing the window with it checks the store is zero.
    s.verify_all("fresh store must read as zeros").await?;
    if s.size > s.window && s.size >= s.bs {
        let last = s.read(s.size - s.bs, s.bs).await?;
        if !is_zero(&last) {
            return Err(format!(
                "fresh store: last block at {} is not zero",
                s.size - s.bs
            ));
        }
    }
    Ok(())
}

async fn load_model(s: &mut Suite) -> CheckResult {
    let step = align_down(s.caps.max_io.min(8 << 20), s.bs).max(s.bs);
    let mut pos = 0;
    while pos < s.window {
        let n = step.min(s.window - pos);
        let data = s.read(pos, n).await?;
        s.shadow[pos as usize..(pos + n) as usize].copy_from_slice(&data);
        pos += n;
    }
    Ok(())
}

async fn check_bounds(s: &mut Suite) -> CheckResult {
    let (size, bs) = (s.size, s.bs);
    let far = align_down(u64::MAX, bs);
    let st = Arc::clone(&s.store);
    st.read(0, &mut [])
        .await
        .ctx(|| "zero-length read at 0".into())?;
    st.read(size, &mut [])
        .await
        .ctx(|| format!("zero-length read at the end ({size})"))?;
    let mut block = vec![0u8; bs as usize];
    let mut two = vec![0u8; 2 * bs as usize];
    expect_oor(
        st.read(size, &mut block).await,
        "read of the block just past the end",
    )?;
    expect_oor(
        st.read(size + bs, &mut []).await,
        "zero-length read one block past the end",
    )?;
    if size >= bs {
        expect_oor(
            st.read(size - bs, &mut two).await,
            "read straddling the end",
        )?;
    }
    expect_oor(
        st.read(far, &mut two).await,
        "read whose offset+len overflows u64",
    )?;
    expect_oor(st.extents(size, bs).await, "extents past the end")?;
    expect_oor(
        st.extents(far, 2 * bs).await,
        "extents whose offset+len overflows u64",
    )?;
    if bs > 1 && size >= 2 * bs {
        expect_root(
            st.read(1, &mut block).await,
            "read at offset 1",
            "Misaligned",
            |e| matches!(e, StoreError::Misaligned { .. }),
        )?;
        expect_root(
            st.read(0, &mut two[..bs as usize + 1]).await,
            "read of block+1 bytes",
            "Misaligned",
            |e| matches!(e, StoreError::Misaligned { .. }),
        )?;
    }
    if size < bs {
        return Ok(());
    }
    if s.window >= bs {
        s.verify("first block", 0, bs).await?;
    }
    let last = size - bs;
    let in_window = size <= s.window;
    if in_window {
        s.verify("last block", last, bs).await?;
    } else {
        st.read(last, &mut block)
            .await
            .ctx(|| format!("read of the last block at {last}"))?;
    }
    if !s.writable() {
        return Ok(());
    }
    let first = s.data(bs);
    s.write(0, first).await?;
    s.verify("first block after writing it", 0, bs).await?;
    let data = s.data(bs);
    s.write(last, data.clone()).await?;
    let check_last = |got: Vec<u8>, what: &str| diff(what, last, &got, &data).map_or(Ok(()), Err);
    check_last(s.read(last, bs).await?, "last block after writing it")?;
    st.write(size, Bytes::new())
        .await
        .ctx(|| format!("zero-length write at the end ({size})"))?;
    st.write(0, Bytes::new())
        .await
        .ctx(|| "zero-length write at 0".into())?;
    let junk = Bytes::from(vec![0xA5u8; 2 * bs as usize]);
    expect_oor(
        st.write(size, junk.slice(..bs as usize)).await,
        "write of the block past the end",
    )?;
    expect_oor(
        st.write(last, junk.clone()).await,
        "write straddling the end",
    )?;
    expect_oor(
        st.write(far, junk.clone()).await,
        "write whose offset+len overflows u64",
    )?;
    expect_oor(st.write_zeroes(size, bs).await, "write_zeroes past the end")?;
    expect_oor(
        st.write_zeroes(last, 2 * bs).await,
        "write_zeroes straddling the end",
    )?;
    expect_oor(
        st.write_zeroes(bs, far).await,
        "write_zeroes whose offset+len overflows u64",
    )?;
    st.write_zeroes(size, 0)
        .await
        .ctx(|| "zero-length write_zeroes at the end".into())?;
    if s.caps.trim {
        expect_oor(st.trim(size, bs).await, "trim past the end")?;
        expect_oor(st.trim(last, 2 * bs).await, "trim straddling the end")?;
        expect_oor(
            st.trim(bs, far).await,
            "trim whose offset+len overflows u64",
        )?;
        st.trim(size, 0)
            .await
            .ctx(|| "zero-length trim at the end".into())?;
    }
    check_last(
        s.read(last, bs).await?,
        "last block after rejected requests past the end",
    )?;
    s.verify("first block after rejected requests", 0, bs)
        .await?;
    Ok(())
}

async fn check_random_io(s: &mut Suite) -> CheckResult {
    let max_len = s.opts.max_len;
    for i in 0..s.opts.random_ops {
        let (off, len) = s.range(max_len);
        if s.writable() && s.rng.random_bool(0.6) {
            let data = s.data(len);
            s.write(off, data)
                .await
                .map_err(|e| format!("op {i}: {e}"))?;
        } else {
            s.verify(&format!("op {i}: read"), off, len).await?;
        }
    }
    s.verify_all("whole window after random I/O").await
}

async fn check_chunk_boundaries(s: &mut Suite) -> CheckResult {
    let (u, bs, w) = (s.unit, s.bs, s.window);
    let count = w / u;
    if count < 2 {
        return Ok(());
    }
    let mut ks = vec![1, count - 1];
    for _ in 0..6 {
        ks.push(s.rng.random_range(1..count));
    }
    let (lefts, rights) = if bs == 1 {
        (vec![1, 3, 511, u - 1], vec![1, 5, 4097, u + 1, 2 * u + 7])
    } else {
        (vec![bs, 2 * bs, u], vec![bs, u + bs, 2 * u + bs])
    };
    for k in ks {
        let b = k * u;
        for _ in 0..4 {
            let l = lefts[s.rng.random_range(0..lefts.len())].min(b);
            let r = rights[s.rng.random_range(0..rights.len())].min(w - b);
            if l + r == 0 {
                continue;
            }
            let (off, len) = (b - l, l + r);
            let what = format!("range {off}+{len} around boundary {b} (unit {u})");
            if s.writable() {
                let data = s.data(len);
                s.write(off, data)
                    .await
                    .map_err(|e| format!("{what}: {e}"))?;
            }
            s.verify(&what, off, len).await?;
            let lo = b.saturating_sub(u);
            let hi = (b + 2 * u).min(w);
            s.verify(&format!("{what}, surrounding units"), lo, hi - lo)
                .await?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Zeroing {
    Trim,
    WriteZeroes,
}

async fn check_zeroing(s: &mut Suite, how: Zeroing) -> CheckResult {
    let (u, bs, w) = (s.unit, s.bs, s.window);
    let mut cases: Vec<(u64, u64)> = Vec::new();
    let units = w / u;
    for _ in 0..3 {
        if units >= 1 {
            let n = s.rng.random_range(1..=units.min(3));
            let k = s.rng.random_range(0..=units - n);
            cases.push((k * u, n * u)); // whole units
        }
        let range = s.range(2 * u);
        cases.push(range); // anywhere
    }
    if units >= 2 {
        let k = s.rng.random_range(1..units);
        cases.push((k * u - bs, u + 2 * bs)); // crossing a boundary, unaligned to it
        cases.push((k * u + bs, (u - bs).max(bs))); // inside one unit, touching its end
    }
    cases.push((w - bs, bs)); // the end of the window
    cases.push((s.range(u).0, 0)); // empty
    for (off, len) in cases {
        let len = len.min(w - off);
        let lo = off.saturating_sub(u);
        let hi = (off + len + u).min(w);
        let data = s.data(hi - lo);
        s.write(lo, data).await?;
        let what = format!("{how:?} {off}+{len}");
        let r = match how {
            Zeroing::Trim => s.store.trim(off, len).await,
            Zeroing::WriteZeroes => s.store.write_zeroes(off, len).await,
        };
        r.ctx(|| what.clone())?;
        s.zero_model(off, len);
        s.verify(&format!("{what}, then read {lo}+{}", hi - lo), lo, hi - lo)
            .await?;
    }
    Ok(())
}

async fn check_extents(s: &mut Suite) -> CheckResult {
    let (bs, w, size) = (s.bs, s.window, s.size);
    // A trimmed or zeroed hole next to data, so there is something to describe.
    if s.writable() && w >= 3 * s.unit {
        let u = s.unit;
        let data = s.data(3 * u);
        s.write(0, data).await?;
        let r = if s.caps.trim {
            s.store.trim(u, u).await
        } else {
            s.store.write_zeroes(u, u).await
        };
        r.ctx(|| format!("zeroing {u}+{u}"))?;
        s.zero_model(u, u);
    }
    let mut ranges = vec![(0, w), (0, size), (w / 2 / bs * bs, 0)];
    for _ in 0..6 {
        let r = s.range(4 * s.unit);
        ranges.push(r);
    }
    if w >= 2 * s.unit {
        ranges.push((s.unit - bs, 2 * bs));
    }
    for (off, len) in ranges {
        let what = format!("extents {off}+{len}");
        let ex = s.store.extents(off, len).await.ctx(|| what.clone())?;
        if len == 0 {
            if !ex.is_empty() {
                return Err(format!("{what}: expected no extents, got {ex:?}"));
            }
            continue;
        }
        let show = |ex: &[memsync_core::Extent]| {
            let mut t = format!("{:?}", &ex[..ex.len().min(6)]);
            if ex.len() > 6 {
                t.push_str(&format!(" … ({} extents)", ex.len()));
            }
            t
        };
        let mut pos = off;
        for e in &ex {
            if e.offset != pos || e.len == 0 {
                return Err(format!(
                    "{what}: extents are not sorted, gap-free and non-empty at {pos}: {}",
                    show(&ex)
                ));
            }
            pos = e.end();
        }
        if pos != off + len {
            return Err(format!(
                "{what}: extents end at {pos}, not {}: {}",
                off + len,
                show(&ex)
            ));
        }
        for e in ex.iter().filter(|e| e.kind.reads_zero()) {
            // Within the window the model knows the data (already verified to match the store).
            let mend = e.end().min(w);
            if e.offset < mend {
                let m = &s.shadow[e.offset as usize..mend as usize];
                if let Some(i) = m.iter().position(|&b| b != 0) {
                    return Err(format!(
                        "{what}: extent {e:?} should read as zeros but the model has data at {}",
                        e.offset + i as u64
                    ));
                }
            }
        }
        for e in ex.iter().filter(|e| e.kind.reads_zero()).take(16) {
            // Read the start of the extent from the store too (aligned out to whole blocks).
            let lo = align_down(e.offset, bs);
            let hi = (align_down(e.end().min(e.offset + (1 << 20)) + bs - 1, bs)).min(size);
            let got = s.read(lo, hi - lo).await?;
            let a = (e.offset - lo) as usize;
            let b = (e.end().min(hi) - lo) as usize;
            if let Some(i) = got[a..b].iter().position(|&x| x != 0) {
                return Err(format!(
                    "{what}: extent {e:?} should read as zeros but byte {} is {:#04x}",
                    e.offset + i as u64,
                    got[a + i]
                ));
            }
        }
    }
    Ok(())
}

async fn check_flush(s: &mut Suite) -> CheckResult {
    s.store.flush().await.ctx(|| "flush".into())?;
    if s.writable() && s.window >= 2 * s.bs {
        let (off, len) = s.range(s.opts.max_len);
        let data = s.data(len);
        s.write(off, data).await?;
        s.store
            .flush()
            .await
            .ctx(|| format!("flush after write {off}+{len}"))?;
        s.verify("read after write and flush", off, len).await?;
    }
    s.store.flush().await.ctx(|| "second flush".into())
}

async fn join<T: Send + 'static>(
    tasks: Vec<tokio::task::JoinHandle<Result<T, String>>>,
) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for (i, r) in join_all(tasks).await.into_iter().enumerate() {
        match r {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => return Err(format!("task {i}: {e}")),
            Err(e) => return Err(format!("task {i} panicked or was cancelled: {e}")),
        }
    }
    Ok(out)
}

fn spawn<F, T>(f: F) -> tokio::task::JoinHandle<Result<T, String>>
where
    F: Future<Output = Result<T, String>> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(f)
}

async fn check_concurrent_disjoint(s: &mut Suite) -> CheckResult {
    let bs = s.bs;
    let total = align_down(s.window.min(16 << 20), bs);
    let blocks = total / bs;
    let writers = (s.opts.writers.max(1) as u64).min(blocks) as usize;
    // Region borders at random (for byte-addressable stores unaligned, so that neighbours share
    // chunks and a lost update shows up).
    let mut cuts: Vec<u64> = (1..writers)
        .map(|_| s.rng.random_range(1..blocks) * bs)
        .collect();
    cuts.push(0);
    cuts.push(total);
    cuts.sort_unstable();
    cuts.dedup();
    let (ops, max_len, unit) = (s.opts.ops_per_task, s.opts.max_len, s.unit);
    let mut tasks = Vec::new();
    for pair in cuts.windows(2) {
        let (lo, hi) = (pair[0], pair[1]);
        let store = Arc::clone(&s.store);
        let mut model = s.shadow[lo as usize..hi as usize].to_vec();
        let mut rng = SmallRng::seed_from_u64(s.rng.random());
        tasks.push(spawn(async move {
            for i in 0..ops {
                let (off, len) = random_range(&mut rng, lo, hi, bs, max_len, unit);
                let at = (off - lo) as usize..(off - lo + len) as usize;
                if rng.random_bool(0.7) {
                    let mut v = vec![0u8; len as usize];
                    rng.fill_bytes(&mut v);
                    model[at].copy_from_slice(&v);
                    store
                        .write(off, Bytes::from(v))
                        .await
                        .ctx(|| format!("op {i}: write {off}+{len}"))?;
                } else {
                    let mut got = vec![0u8; len as usize];
                    store
                        .read(off, &mut got)
                        .await
                        .ctx(|| format!("op {i}: read {off}+{len}"))?;
                    if let Some(d) = diff(
                        &format!("op {i}: read of own region"),
                        off,
                        &got,
                        &model[at],
                    ) {
                        return Err(d);
                    }
                }
                if i % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            Ok((lo, model))
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..s.opts.readers {
        let store = Arc::clone(&s.store);
        let mut rng = SmallRng::seed_from_u64(s.rng.random());
        readers.push(spawn(async move {
            for i in 0..ops {
                let (off, len) = random_range(&mut rng, 0, total, bs, max_len, unit);
                let mut buf = vec![0u8; len as usize];
                store
                    .read(off, &mut buf)
                    .await
                    .ctx(|| format!("reader op {i}: read {off}+{len}"))?;
                if i % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            Ok(())
        }));
    }
    let results = join(tasks).await.map_err(|e| format!("writer {e}"))?;
    join(readers).await.map_err(|e| format!("reader {e}"))?;
    for (lo, model) in results {
        s.shadow[lo as usize..lo as usize + model.len()].copy_from_slice(&model);
    }
    s.verify_span("disjoint regions after concurrent writers", 0, total)
        .await
}

async fn check_concurrent_overlap(s: &mut Suite) -> CheckResult {
    let bs = s.bs;
    let u = s.opts.atomic_unit.unwrap_or(bs).max(bs).div_ceil(bs) * bs;
    let units = ((256u64 << 10) / u).clamp(16, 4096).min(s.window / u);
    if units < 2 {
        return Ok(());
    }
    let writers = s.opts.writers.clamp(2, 8) as u64;
    let rounds = (254 / writers).min(16);
    let base = s.rng.random_range(0..=s.window / u - units) * u;
    let region = base as usize..(base + units * u) as usize;
    // Each round, every writer writes one random run of units filled with its own tag, all
    // starting together (barrier); then every unit must hold exactly one of the tags written
    // to it that round, or its previous value if no writer touched it.
    for round in 0..rounds {
        let barrier = Arc::new(tokio::sync::Barrier::new(writers as usize));
        let mut tasks = Vec::new();
        let mut writes = Vec::new();
        // Half of the rounds, every writer writes the same run: writers that progress in step
        // over the same units are what exposes a torn unit.
        let same = round % 2 == 0;
        let shared_n = s.rng.random_range(1..=(units / 2).max(1));
        let shared_a = s.rng.random_range(0..=units - shared_n);
        for w in 0..writers {
            let tag = (1 + round * writers + w) as u8;
            let n = if same {
                shared_n
            } else {
                s.rng.random_range(1..=(units / 2).max(1))
            };
            let a = if same {
                shared_a
            } else {
                s.rng.random_range(0..=units - n)
            };
            writes.push((tag, a, a + n));
            let store = Arc::clone(&s.store);
            let barrier = Arc::clone(&barrier);
            tasks.push(spawn(async move {
                barrier.wait().await;
                let (off, len) = (base + a * u, n * u);
                let data = Bytes::from(vec![tag; len as usize]);
                store
                    .write(off, data)
                    .await
                    .ctx(|| format!("write of tag {tag} at {off}+{len}"))
            }));
        }
        join(tasks)
            .await
            .map_err(|e| format!("round {round}: writer {e}"))?;
        let got = s.read(base, units * u).await?;
        for i in 0..units {
            let bytes = &got[(i * u) as usize..((i + 1) * u) as usize];
            let off = base + i * u;
            let tags: Vec<u8> = writes
                .iter()
                .filter(|(_, a, b)| (*a..*b).contains(&i))
                .map(|t| t.0)
                .collect();
            if tags.is_empty() {
                let want = &s.shadow[off as usize..(off + u) as usize];
                if let Some(d) = diff(
                    &format!("round {round}: unit no writer touched"),
                    off,
                    bytes,
                    want,
                ) {
                    return Err(d);
                }
            } else if !tags.contains(&bytes[0]) || bytes.iter().any(|&b| b != bytes[0]) {
                let mut seen: Vec<u8> = bytes.to_vec();
                seen.sort_unstable();
                seen.dedup();
                return Err(format!(
                    "round {round}: unit {off}+{u} (atomic unit) holds bytes {seen:02x?}; expected \
                     all one of the tags written to it {tags:02x?}"
                ));
            }
        }
        s.shadow[region.clone()].copy_from_slice(&got);
    }
    Ok(())
}

async fn check_read_only(s: &Suite) -> CheckResult {
    let bs = s.bs;
    let len = if s.size >= bs { bs } else { 0 };
    let is_ro = |e: &StoreError| matches!(e, StoreError::ReadOnly);
    expect_root(
        s.store.write(0, Bytes::from(vec![1u8; len as usize])).await,
        "write",
        "ReadOnly",
        is_ro,
    )?;
    expect_root(
        s.store.write_zeroes(0, len).await,
        "write_zeroes",
        "ReadOnly",
        is_ro,
    )?;
    let trim_ok = |e: &StoreError| {
        matches!(e, StoreError::ReadOnly)
            || (!s.caps.trim && matches!(e, StoreError::Unsupported { .. }))
    };
    expect_root(s.store.trim(0, len).await, "trim", "ReadOnly", trim_ok)?;
    if s.window >= len && len > 0 {
        s.verify("first block after rejected writes", 0, len)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsync_core::{Extent, ExtentKind, async_trait, check_range, check_write};
    use parking_lot::Mutex;

    /// Ways to break the reference store, to prove the suite notices.
    #[derive(Clone, Copy, Debug, Default)]
    struct Bugs {
        /// Writes that cross a 64 KiB boundary lose their last byte.
        drop_last_byte_across_boundary: bool,
        /// Reads past the end return zeros instead of failing.
        no_bounds_check: bool,
        /// Extents report everything as a hole.
        all_holes: bool,
        /// Trim does nothing.
        trim_noop: bool,
        /// Declared read-only, but accepts writes.
        writable_read_only: bool,
        /// Writes land in 1000-byte pieces with yields in between (torn under concurrency).
        torn_writes: bool,
        /// Extents leave a gap.
        extent_gap: bool,
    }

    /// A simple correct store (`Vec<u8>` under a lock) with optional bugs.
    #[derive(Debug)]
    struct VecStore {
        data: Mutex<Vec<u8>>,
        bugs: Bugs,
    }

    impl VecStore {
        fn new(size: usize, bugs: Bugs) -> Self {
            VecStore {
                data: Mutex::new(vec![0; size]),
                bugs,
            }
        }
    }

    #[async_trait]
    impl Store for VecStore {
        fn size(&self) -> u64 {
            self.data.lock().len() as u64
        }
        fn caps(&self) -> Caps {
            let mut c = Caps::basic();
            c.trim = true;
            c.extents = true;
            c.read_only = self.bugs.writable_read_only;
            c
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> memsync_core::Result<()> {
            let d = self.data.lock();
            if self.bugs.no_bounds_check {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = offset
                        .checked_add(i as u64)
                        .and_then(|o| d.get(o as usize))
                        .copied()
                        .unwrap_or(0);
                }
                return Ok(());
            }
            check_range(d.len() as u64, 1, offset, buf.len() as u64)?;
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        async fn write(&self, offset: u64, data: Bytes) -> memsync_core::Result<()> {
            let size = self.size();
            if !self.bugs.writable_read_only {
                check_write(&self.caps(), size, offset, data.len() as u64)?;
            } else {
                check_range(size, 1, offset, data.len() as u64)?;
            }
            let mut n = data.len();
            let end = offset + n as u64;
            if self.bugs.drop_last_byte_across_boundary && n > 0 && offset >> 16 != (end - 1) >> 16
            {
                n -= 1;
            }
            let o = offset as usize;
            if self.bugs.torn_writes {
                for start in (0..n).step_by(1000) {
                    let stop = (start + 1000).min(n);
                    self.data.lock()[o + start..o + stop].copy_from_slice(&data[start..stop]);
                    tokio::task::yield_now().await;
                }
            } else {
                self.data.lock()[o..o + n].copy_from_slice(&data[..n]);
            }
            Ok(())
        }
        async fn flush(&self) -> memsync_core::Result<()> {
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u64) -> memsync_core::Result<()> {
            check_write(&self.caps(), self.size(), offset, len)?;
            if !self.bugs.trim_noop {
                self.data.lock()[offset as usize..(offset + len) as usize].fill(0);
            }
            Ok(())
        }
        async fn extents(&self, offset: u64, len: u64) -> memsync_core::Result<Vec<Extent>> {
            let d = self.data.lock();
            check_range(d.len() as u64, 1, offset, len)?;
            let mut out: Vec<Extent> = Vec::new();
            for i in offset..offset + len {
                let kind = if self.bugs.all_holes || d[i as usize] == 0 {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Data
                };
                match out.last_mut() {
                    Some(e) if e.kind == kind => e.len += 1,
                    _ => out.push(Extent {
                        offset: i,
                        len: 1,
                        kind,
                    }),
                }
            }
            if self.bugs.extent_gap && out.len() > 1 {
                out.remove(1);
            }
            Ok(out)
        }
    }

    fn quick() -> ContractOpts {
        ContractOpts::default()
            .seed(42)
            .random_ops(300)
            .ops_per_task(32)
            .window(4 << 20)
    }

    async fn failure(bugs: Bugs, opts: ContractOpts) -> Failure {
        match try_run(VecStore::new(4 << 20, bugs), opts).await {
            Ok(r) => panic!("{bugs:?} went unnoticed: {r}"),
            Err(f) => f,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn correct_store_passes() {
        let r = try_run(
            VecStore::new(4 << 20, Bugs::default()),
            quick().atomic_unit(4096),
        )
        .await;
        let r = r.unwrap_or_else(|f| panic!("{f}"));
        assert!(
            r.passed.iter().any(|(n, _)| *n == "concurrent_overlap"),
            "{r}"
        );
        assert_eq!(r.skipped, vec![("read_only", "store is writable")]);
        // A store larger than the window, and one that is not zero to begin with.
        let big = VecStore::new(8 << 20, Bugs::default());
        big.data.lock()[5 << 20] = 1;
        let r = try_run(big, quick().window(1 << 20).expect_zero_initialised(false)).await;
        r.unwrap_or_else(|f| panic!("{f}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bugs_are_caught() {
        let b = Bugs::default();
        let f = failure(
            Bugs {
                drop_last_byte_across_boundary: true,
                ..b
            },
            quick(),
        )
        .await;
        assert!(
            ["bounds", "random_io", "chunk_boundaries"].contains(&f.check),
            "{f}"
        );
        assert!(f.to_string().contains("seed 42"), "{f}");
        let f = failure(
            Bugs {
                no_bounds_check: true,
                ..b
            },
            quick(),
        )
        .await;
        assert_eq!(f.check, "bounds", "{f}");
        assert!(f.message.contains("expected OutOfRange"), "{f}");
        let f = failure(
            Bugs {
                all_holes: true,
                ..b
            },
            quick(),
        )
        .await;
        assert_eq!(f.check, "extents", "{f}");
        let f = failure(
            Bugs {
                extent_gap: true,
                ..b
            },
            quick(),
        )
        .await;
        assert_eq!(f.check, "extents", "{f}");
        let f = failure(
            Bugs {
                trim_noop: true,
                ..b
            },
            quick(),
        )
        .await;
        assert_eq!(f.check, "trim", "{f}");
        let f = failure(
            Bugs {
                writable_read_only: true,
                ..b
            },
            quick().expect_zero_initialised(false),
        )
        .await;
        assert_eq!(f.check, "read_only", "{f}");
        let f = failure(
            Bugs {
                torn_writes: true,
                ..b
            },
            quick().atomic_unit(4096),
        )
        .await;
        assert_eq!(f.check, "concurrent_overlap", "{f}");
        assert!(f.message.contains("expected all one of the tags"), "{f}");
    }

    #[tokio::test]
    async fn timeouts_fail_instead_of_hanging() {
        #[derive(Debug)]
        struct Stuck;
        #[async_trait]
        impl Store for Stuck {
            fn size(&self) -> u64 {
                1 << 20
            }
            fn caps(&self) -> Caps {
                Caps::basic()
            }
            async fn read(&self, _: u64, _: &mut [u8]) -> memsync_core::Result<()> {
                std::future::pending().await
            }
            async fn write(&self, _: u64, _: Bytes) -> memsync_core::Result<()> {
                Ok(())
            }
            async fn flush(&self) -> memsync_core::Result<()> {
                Ok(())
            }
        }
        let f = try_run(Stuck, quick().check_timeout(Duration::from_millis(50)))
            .await
            .unwrap_err();
        assert_eq!(f.check, "fresh_zero");
        assert!(f.message.contains("did not finish"), "{f}");
    }
}

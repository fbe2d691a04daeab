//! The persisted digest index of a local file: its chunk digests plus what the file looked like
//! when they were right (size, device, inode, mtime, ctime), so that a later sync of an
//! unchanged file hashes nothing.
//!
//! It lives next to the file as `.NAME.memsync-idx` (written to a temporary name and renamed, so
//! a reader never sees half an index) and ends with a BLAKE3 of its own bytes: a torn or altered
//! index is ignored, never trusted.
//!
//! **When it is trusted.** Only if size, device, inode, mtime and ctime all match, and the file's
//! last change (ctime) lies at least [`RACY_NS`] before the index was written. File systems stamp
//! times from a clock that advances once per kernel tick (up to 10 ms), so a write in the same
//! tick as the indexed state would leave every field unchanged; the save therefore waits, if
//! needed, until a tick has passed since the file's last change, and a later write then always
//! changes ctime. ctime cannot be set from user space, so `touch -d` or a restored mtime still
//! invalidates the index. An index saved without a flush of the file (a source, which memsync only
//! reads, or a destination synced with `durable` off) also records the kernel's boot id and is
//! trusted in that boot only: a crash can lose page-cache bytes while the file's times survive.
//! On top of that a few chunks (a sample that differs each time) are read
//! and hashed and must match.
//!
//! **When the file changed.** The index also holds a fingerprint of every chunk (keyed XXH3-128,
//! see [`crate::digest::FpKey`]; the key is stored in the index, which only its owner may read).
//! An index that is not trusted still spares work: the next scan reads and fingerprints every
//! chunk, and hashes with BLAKE3 only the chunks whose fingerprints changed
//! ([`IndexFile::known`]). Nothing of the file's times is trusted for that.
//!
//! **What it cannot see.** A write by another program *during* a sync, in the same clock tick as
//! memsync's own last write, followed by no other change: syncing a file while another program
//! writes it gives no guarantee (use continuous push, or stop the writer). A file changed through
//! a block device under it (not through the file system) keeps its times.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::digest::{Digest, FP_SECRET, FpKey, Known, Layout};

const MAGIC: &[u8; 8] = b"MSIDX\0\0\x03";
/// magic, chunk size, size, dev, ino, mtime ns, ctime ns, saved-at ns, count, boot id,
/// fingerprints present (0 or 1).
const HEADER: usize = 8 + 8 * 8 + 16 + 8;
/// Bytes per chunk: a digest, plus a fingerprint if present.
const FP_LEN: usize = 16;
/// Largest index accepted: 2^24 chunks (1 TiB at 64 KiB chunks, 256 TiB at 16 MiB).
pub const MAX_CHUNKS: u64 = 1 << 24;
/// How long after a file's last change its index may be trusted: more than one tick of the
/// coarse clock that stamps file times (4 ms at HZ=250, 10 ms at HZ=100).
pub const RACY_NS: i64 = 12_000_000;

/// What the file looked like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileState {
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl FileState {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(FileState {
            size: m.len(),
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        })
    }
}

/// A parsed index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexData {
    pub chunk_size: u64,
    pub state: FileState,
    pub saved_at_ns: i64,
    /// `None`: the file was flushed (`fdatasync`) before the index was saved, so the digests
    /// hold across a crash. `Some(boot id)`: they describe the page cache of that boot only.
    pub boot: Option<[u8; 16]>,
    pub digests: Vec<Digest>,
    /// Each chunk's fingerprint when it had its digest (see [`FpKey`]), if recorded.
    pub fps: Option<(FpKey, Vec<u128>)>,
}

impl PartialEq for FpKey {
    fn eq(&self, other: &Self) -> bool {
        self.same(other)
    }
}

impl Eq for FpKey {}

/// The kernel's id of this boot (all zeros if unknown, which no index trusts).
pub fn boot_id() -> [u8; 16] {
    static ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let hex: Vec<u8> = text
            .bytes()
            .filter(u8::is_ascii_hexdigit)
            .map(|c| (c as char).to_digit(16).unwrap_or(0) as u8)
            .collect();
        let mut id = [0u8; 16];
        if hex.len() == 32 {
            for (k, b) in id.iter_mut().enumerate() {
                *b = hex[2 * k] << 4 | hex[2 * k + 1];
            }
        }
        id
    })
}

/// Why an index file was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("not a memsync index (bad magic)")]
    Magic,
    #[error("index is {0} bytes, which does not match its header")]
    Length(usize),
    #[error("index has {0} chunks (at most {MAX_CHUNKS})")]
    TooMany(u64),
    #[error("index checksum mismatch (torn or altered)")]
    Checksum,
    #[error("index has an unknown fingerprint flag {0}")]
    Flag(u64),
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

/// Parse index bytes. Never panics; every length is checked before use.
pub fn parse(b: &[u8]) -> Result<IndexData, IndexError> {
    if b.len() < HEADER + 32 {
        return Err(IndexError::Length(b.len()));
    }
    if &b[..8] != MAGIC {
        return Err(IndexError::Magic);
    }
    let count = u64_at(b, 64);
    if count > MAX_CHUNKS {
        return Err(IndexError::TooMany(count));
    }
    let mut boot = [0u8; 16];
    boot.copy_from_slice(&b[72..88]);
    let has_fps = match u64_at(b, 88) {
        0 => false,
        1 => true,
        f => return Err(IndexError::Flag(f)),
    };
    let digests_end = HEADER + count as usize * 32;
    let body = if has_fps {
        digests_end + FP_SECRET + count as usize * FP_LEN
    } else {
        digests_end
    };
    if b.len() != body + 32 {
        return Err(IndexError::Length(b.len()));
    }
    if blake3::hash(&b[..body]).as_bytes() != &b[body..] {
        return Err(IndexError::Checksum);
    }
    let fps = has_fps.then(|| {
        let key = FpKey::from_bytes(&b[digests_end..digests_end + FP_SECRET]);
        let fps = b[digests_end + FP_SECRET..body]
            .chunks_exact(FP_LEN)
            .map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0; FP_LEN])))
            .collect();
        key.map(|k| (k, fps))
    });
    let digests = b[HEADER..digests_end]
        .chunks_exact(32)
        .map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            d
        })
        .collect();
    Ok(IndexData {
        chunk_size: u64_at(b, 8),
        state: FileState {
            size: u64_at(b, 16),
            dev: u64_at(b, 24),
            ino: u64_at(b, 32),
            mtime_ns: u64_at(b, 40) as i64,
            ctime_ns: u64_at(b, 48) as i64,
        },
        saved_at_ns: u64_at(b, 56) as i64,
        boot: (boot != [0; 16]).then_some(boot),
        digests,
        fps: fps.flatten(),
    })
}

/// Encode an index.
pub fn encode(d: &IndexData) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + d.digests.len() * (32 + FP_LEN) + FP_SECRET + 32);
    // Fingerprints are stored only if there is one per digest.
    let fps = d.fps.as_ref().filter(|(_, f)| f.len() == d.digests.len());
    b.extend_from_slice(MAGIC);
    for v in [
        d.chunk_size,
        d.state.size,
        d.state.dev,
        d.state.ino,
        d.state.mtime_ns as u64,
        d.state.ctime_ns as u64,
        d.saved_at_ns as u64,
        d.digests.len() as u64,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&d.boot.unwrap_or([0; 16]));
    b.extend_from_slice(&(fps.is_some() as u64).to_le_bytes());
    for x in &d.digests {
        b.extend_from_slice(x);
    }
    if let Some((key, fps)) = fps {
        b.extend_from_slice(key.bytes());
        for f in fps {
            b.extend_from_slice(&f.to_le_bytes());
        }
    }
    let h = blake3::hash(&b);
    b.extend_from_slice(h.as_bytes());
    b
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The index file of a local file.
#[derive(Clone, Debug)]
pub struct IndexFile {
    file: PathBuf,
    index: PathBuf,
}

/// Why a stored index was not used (for the report), or `Used`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexStatus {
    /// Not a local file, or indexing is off.
    None,
    /// No index yet.
    Missing,
    /// An index exists but was not trusted (the reason).
    Stale(String),
    /// The digests came from the index (after the sampled check).
    Used,
}

impl IndexFile {
    /// The index of `file` (`.NAME.memsync-idx` in the same directory).
    pub fn for_file(file: &Path) -> Self {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let index = file.with_file_name(format!(".{name}.memsync-idx"));
        IndexFile {
            file: file.to_owned(),
            index,
        }
    }

    pub fn path(&self) -> &Path {
        &self.index
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The stored digests if the index matches the file as it is now (not yet sample-checked).
    pub fn load(&self, layout: Layout) -> Result<Vec<Digest>, IndexStatus> {
        let bytes = match std::fs::read(&self.index) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IndexStatus::Missing);
            }
            Err(e) => return Err(IndexStatus::Stale(format!("reading it: {e}"))),
        };
        let d = parse(&bytes).map_err(|e| IndexStatus::Stale(e.to_string()))?;
        let now = FileState::of(&self.file)
            .map_err(|e| IndexStatus::Stale(format!("stat of the file: {e}")))?;
        if d.chunk_size != layout.chunk_size {
            return Err(IndexStatus::Stale(format!(
                "chunk size {} (this sync uses {})",
                d.chunk_size, layout.chunk_size
            )));
        }
        if d.state != now || now.size != layout.size {
            return Err(IndexStatus::Stale("the file changed".into()));
        }
        if let Some(boot) = d.boot
            && (boot != boot_id() || boot == [0; 16])
        {
            // Saved from the page cache without a flush, in another boot: after a crash the
            // file may hold older bytes under the same times.
            return Err(IndexStatus::Stale(
                "saved unflushed before the last boot".into(),
            ));
        }
        if d.digests.len() as u64 != layout.chunks() {
            return Err(IndexStatus::Stale("chunk count differs".into()));
        }
        if now.ctime_ns.max(now.mtime_ns) + RACY_NS > d.saved_at_ns {
            return Err(IndexStatus::Stale(
                "the file changed too close to when the index was written".into(),
            ));
        }
        Ok(d.digests)
    }

    /// The digests and fingerprints of a stored index whose file changed since, for a rescan
    /// that hashes only the chunks whose fingerprints changed ([`crate::digest::scan_with`]).
    /// The file's times do not matter here: every chunk is read and fingerprinted again.
    pub fn known(&self, layout: Layout) -> Option<Known> {
        let d = parse(&std::fs::read(&self.index).ok()?).ok()?;
        let (key, fps) = d.fps?;
        (d.chunk_size == layout.chunk_size
            && d.state.size == layout.size
            && d.digests.len() as u64 == layout.chunks())
        .then_some(Known {
            key,
            fps,
            digests: d.digests,
        })
    }

    /// Remove the index (the file is about to change in ways the index cannot follow).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.index);
    }

    /// The file's state now and the time it was taken: take it before hashing the file, and
    /// pass it to [`IndexFile::save`], which then stores the digests only if the file is still
    /// in that state.
    pub fn state_now(&self) -> std::io::Result<(FileState, i64)> {
        let t = now_ns();
        Ok((FileState::of(&self.file)?, t))
    }

    /// Store `digests` for the file.
    ///
    /// With `before` (the state taken by [`IndexFile::state_now`] before the digests were
    /// computed from the file) they are stored only if the file is still in that state, with
    /// that time as the index time. Without it (the digests describe what this process just
    /// wrote) the save waits, if the file changed less than [`RACY_NS`] ago, until that much
    /// time has passed (see the module docs).
    ///
    /// `flushed`: the file's data was made durable (after the digests' bytes were written)
    /// before this save; otherwise the index is trusted in this boot only, since a crash can
    /// lose page-cache bytes while the file's times survive.
    /// `fps`: the chunks' fingerprints (taken from the same bytes as the digests), if known.
    pub fn save(
        &self,
        layout: Layout,
        digests: &[Digest],
        fps: Option<(&FpKey, &[u128])>,
        before: Option<(FileState, i64)>,
        flushed: bool,
    ) -> std::io::Result<()> {
        let (state, saved_at_ns) = match before {
            Some((state, t)) => (state, t),
            None => {
                let state = FileState::of(&self.file)?;
                let wait = state.ctime_ns.max(state.mtime_ns) + RACY_NS + 1_000_000 - now_ns();
                if wait > 0 {
                    std::thread::sleep(Duration::from_nanos(wait as u64));
                }
                (state, now_ns())
            }
        };
        if FileState::of(&self.file)? != state {
            self.remove();
            return Ok(());
        }
        let data = IndexData {
            chunk_size: layout.chunk_size,
            state,
            saved_at_ns,
            boot: (!flushed).then(boot_id),
            digests: digests.to_vec(),
            fps: fps.map(|(k, f)| (k.clone(), f.to_vec())),
        };
        let tmp = self
            .index
            .with_extension(format!("tmp{}", std::process::id()));
        // Owner only: whoever reads the fingerprint key could craft changes it cannot see.
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &encode(&data)))?;
        std::fs::rename(&tmp, &self.index).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IndexData {
        IndexData {
            chunk_size: 65536,
            state: FileState {
                size: 3 << 16,
                dev: 1,
                ino: 2,
                mtime_ns: 3,
                ctime_ns: 4,
            },
            saved_at_ns: 5,
            boot: Some([6; 16]),
            digests: vec![[7; 32], [8; 32], [9; 32]],
            fps: Some((
                FpKey::from_bytes(&[10; FP_SECRET]).unwrap(),
                vec![11, 12, 13],
            )),
        }
    }

    #[test]
    fn roundtrip_and_every_corruption_is_refused() {
        let d = sample();
        let b = encode(&d);
        assert_eq!(parse(&b).unwrap(), d);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(parse(&c).is_err(), "flipped byte {i} accepted");
        }
        for n in 0..b.len() {
            assert!(parse(&b[..n]).is_err());
        }
        let mut big = b.clone();
        big[64..72].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse(&big), Err(IndexError::TooMany(u64::MAX)));
        let durable = IndexData { boot: None, ..d };
        assert_eq!(parse(&encode(&durable)).unwrap(), durable);
        let plain = IndexData {
            fps: None,
            ..durable
        };
        let b = encode(&plain);
        assert_eq!(parse(&b).unwrap(), plain);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(
                parse(&c).is_err(),
                "flipped byte {i} of an index without fingerprints"
            );
        }
    }

    #[test]
    fn an_unflushed_index_is_trusted_in_its_own_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.img");
        std::fs::write(&f, vec![1u8; 8192]).unwrap();
        let layout = Layout::new(8192, 4096).unwrap();
        let idx = IndexFile::for_file(&f);
        assert_ne!(boot_id(), [0; 16], "no boot id on this machine");
        idx.save(layout, &[[1; 32], [2; 32]], None, None, false)
            .unwrap();
        assert_eq!(idx.load(layout).unwrap(), vec![[1; 32], [2; 32]]);
        // The same index as another boot left it: after a crash the file may hold older bytes.
        let mut data = parse(&std::fs::read(idx.path()).unwrap()).unwrap();
        assert_eq!(data.boot, Some(boot_id()));
        data.boot = Some([9; 16]);
        std::fs::write(idx.path(), encode(&data)).unwrap();
        assert!(matches!(idx.load(layout), Err(IndexStatus::Stale(_))));
        // Saved after a flush, it holds in any boot.
        data.boot = None;
        std::fs::write(idx.path(), encode(&data)).unwrap();
        assert_eq!(idx.load(layout).unwrap(), vec![[1; 32], [2; 32]]);
    }

    #[test]
    fn load_refuses_changed_and_racy_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.img");
        std::fs::write(&f, vec![1u8; 8192]).unwrap();
        let layout = Layout::new(8192, 4096).unwrap();
        let idx = IndexFile::for_file(&f);
        assert_eq!(idx.load(layout), Err(IndexStatus::Missing));
        idx.save(layout, &[[1; 32], [2; 32]], None, None, true)
            .unwrap();
        assert_eq!(idx.load(layout).unwrap(), vec![[1; 32], [2; 32]]);
        // A different chunk size is not this index.
        assert!(matches!(
            idx.load(Layout::new(8192, 8192).unwrap()),
            Err(IndexStatus::Stale(_))
        ));
        // Any write changes ctime (the save waited a tick), so the index is stale.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .and_then(|h| std::os::unix::fs::FileExt::write_at(&h, b"x", 5))
            .unwrap();
        assert!(matches!(idx.load(layout), Err(IndexStatus::Stale(_))));
    }
}

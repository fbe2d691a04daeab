//! The cache directory: the data file, its description, the persisted chunk map and the
//! write-intent file.
//!
//! ```text
//! DIR/meta    "memsync-cache 2\nsize N\nchunk N\nregion N\nremote ID\n" (written once, checked on reopen)
//! DIR/data    the local copy (a sparse file of the remote's size)
//! DIR/map     one byte per chunk: bit 0 = the chunk's data is in DIR/data, bit 1 = dirty
//! DIR/intent  one byte per region of `region` bytes: 1 = chunks of the region may differ
//!             from the remote whatever the map says
//! ```
//!
//! Crash safety rests on two orderings:
//! - A checkpoint snapshots the chunk states, then `fdatasync`s DIR/data, then writes and
//!   `fdatasync`s DIR/map. A chunk becomes local or dirty in memory only after its data was
//!   written to DIR/data, so every chunk the map marks present had its data on disk before the
//!   map said so. Each chunk's state is a single byte, so a torn map write mixes states that
//!   were each true at some checkpoint: an old "present" is still true (data is only ever
//!   replaced by newer data, and see below for writes), an old "dirty" only causes a harmless
//!   re-push.
//! - Before anything writes to DIR/data for a user write, the region's intent byte is durable
//!   in DIR/intent (written and `fdatasync`ed, once for all writers waiting at that moment). On
//!   open, every present chunk of a region with its intent byte set is treated as dirty and
//!   pushed again, so a map that still says "clean" for a chunk written after the last
//!   checkpoint is never believed. A byte is cleared only after a checkpoint found the
//!   region's chunks clean (pushed, remote-flushed, local data durable) with no write started
//!   since; clearing needs no `fdatasync` (a set byte that survives only costs a re-push).
//!
//! The `remote` line records which remote the directory caches (an identity given by the
//! caller, such as the URL without credentials and tuning parameters); a directory opened for
//! another remote, size, chunk size or format is refused, unless the caller asks to
//! re-initialise it ([`Reinit`]), which is refused in turn while it may hold writes not yet
//! pushed, unless forced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memsync_core::{Result, StoreError};

/// Map byte: the chunk's data is in the data file.
pub const MAP_PRESENT: u8 = 1;
/// Map byte: the chunk has writes not yet pushed to the remote.
pub const MAP_DIRTY: u8 = 2;

const MAGIC: &str = "memsync-cache 2";
/// Longest meta file read (the identity line is bounded by this).
const MAX_META: u64 = 16 * 1024;

fn io_err(op: &'static str, path: &Path, e: io::Error) -> StoreError {
    StoreError::io(op, e).context(format!("cache map {}", path.display()))
}

/// Whether and how to start a cache directory over, discarding what it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reinit {
    /// Reuse the directory if it was made for this remote; refuse it otherwise.
    #[default]
    No,
    /// Start over, unless the directory may hold writes not yet pushed to its remote.
    IfClean,
    /// Start over even if that discards writes not yet pushed.
    Force,
}

/// What a cache directory is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirIdentity {
    pub size: u64,
    pub chunk: u64,
    /// Bytes per write-intent region (a multiple of `chunk`).
    pub region: u64,
    /// The remote's identity (one line); `None`: not known, not checked.
    pub remote: Option<String>,
}

impl DirIdentity {
    fn encode(&self) -> String {
        let remote = self
            .remote
            .as_deref()
            .map(|r| r.replace(['\n', '\r'], " "))
            .unwrap_or_else(|| "-".into());
        format!(
            "{MAGIC}\nsize {}\nchunk {}\nregion {}\nremote {remote}\n",
            self.size, self.chunk, self.region
        )
    }

    /// Parse a meta file; `Err` with what is wrong (another format included).
    fn parse(s: &str) -> std::result::Result<DirIdentity, String> {
        let mut lines = s.lines();
        match lines.next() {
            Some(MAGIC) => {}
            Some(m) if m.starts_with("memsync-cache ") => {
                return Err(format!(
                    "it was made by another version of memsync ({m:?}) and does not record its remote"
                ));
            }
            _ => return Err("its meta file is not a memsync cache's".into()),
        }
        let mut field = |name: &str| -> std::result::Result<String, String> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_owned)
                .ok_or_else(|| format!("its meta file lacks the {name:?} line"))
        };
        let num = |v: String, name: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("its meta file has a bad {name} {v:?}"))
        };
        let size = num(field("size")?, "size")?;
        let chunk = num(field("chunk")?, "chunk")?;
        let region = num(field("region")?, "region")?;
        let remote = field("remote")?;
        if chunk == 0 || region == 0 || region % chunk != 0 {
            return Err(format!(
                "its meta file has a bad chunk {chunk} or region {region}"
            ));
        }
        Ok(DirIdentity {
            size,
            chunk,
            region,
            remote: (remote != "-").then_some(remote),
        })
    }

    fn chunks(&self) -> usize {
        self.size.div_ceil(self.chunk) as usize
    }

    fn regions(&self) -> usize {
        self.size.div_ceil(self.region) as usize
    }

    /// Why `self` (what the directory was made for) is not `want`, if it is not.
    fn mismatch(&self, want: &DirIdentity) -> Option<String> {
        if self.size != want.size || self.chunk != want.chunk {
            return Some(format!(
                "it was made for a remote of {} bytes in chunks of {} (this one: {} bytes in chunks of {})",
                self.size, self.chunk, want.size, want.chunk
            ));
        }
        match (&self.remote, &want.remote) {
            (Some(a), Some(b)) if a != b => {
                Some(format!("it was made for the remote {a:?}, not {b:?}"))
            }
            _ => None,
        }
    }
}

/// The persisted map file.
#[derive(Debug)]
pub struct MapFile {
    file: File,
    path: PathBuf,
}

/// The persisted write-intent file.
#[derive(Debug)]
pub struct IntentFile {
    file: File,
    path: PathBuf,
}

/// What opening a cache directory found.
#[derive(Debug)]
pub struct Opened {
    pub map: MapFile,
    /// One byte per chunk (all zero for a new cache).
    pub bytes: Vec<u8>,
    pub intent: IntentFile,
    /// One byte per region (all zero for a new cache).
    pub intent_bytes: Vec<u8>,
    /// What the directory is for (the region size is the one it was made with).
    pub identity: DirIdentity,
    /// The directory held a cache already.
    pub resumed: bool,
}

fn read_prefix(path: &Path, len: usize) -> Result<Option<Vec<u8>>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path, e)),
    };
    let mut bytes = vec![0u8; len];
    let have = file
        .metadata()
        .map_err(|e| io_err("stat", path, e))?
        .len()
        .min(len as u64) as usize;
    file.read_exact_at(&mut bytes[..have], 0)
        .map_err(|e| io_err("read", path, e))?;
    Ok(Some(bytes))
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err("open", path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("fsync", dir, e))
}

/// Chunks of a directory's map that may hold writes the remote lacks: dirty ones, and present
/// ones in a region with its intent set (any region: the region size is in the meta, which
/// may be of another format). Counted from the files as they are.
fn possibly_dirty(dir: &Path) -> Result<u64> {
    let read = |name: &str| match std::fs::read(dir.join(name)) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", &dir.join(name), e)),
    };
    let map = read("map")?.unwrap_or_default();
    // No intent file (an older format, or lost): nothing in the map can be trusted.
    let any_intent = read("intent")?.is_none_or(|b| b.iter().any(|&b| b != 0));
    Ok(map
        .iter()
        .filter(|&&b| b & MAP_DIRTY != 0 || (any_intent && b & MAP_PRESENT != 0))
        .count() as u64)
}

/// Open or create the cache directory's files for `want`. A directory made for something else
/// is an error unless `reinit` says to start it over.
pub fn open_dir(dir: &Path, want: &DirIdentity, reinit: Reinit) -> Result<Opened> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("mkdir", dir, e))?;
    let meta_path = dir.join("meta");
    let have = match File::open(&meta_path) {
        Ok(f) => {
            let mut s = Vec::new();
            io::Read::read_to_end(&mut io::Read::take(f, MAX_META), &mut s)
                .map_err(|e| io_err("read", &meta_path, e))?;
            Some(String::from_utf8_lossy(&s).into_owned())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("read", &meta_path, e)),
    };
    if let Some(have) = have {
        let why = match DirIdentity::parse(&have) {
            Ok(id) => id.mismatch(want).map(|w| (w, Some(id))),
            Err(w) => Some((w, None)),
        };
        match (why, reinit) {
            (None, Reinit::No) => {
                let id = DirIdentity::parse(&have).map_err(StoreError::Config)?;
                // The recorded identity wins where the caller knows none.
                let identity = DirIdentity {
                    region: id.region,
                    remote: id.remote.clone().or_else(|| want.remote.clone()),
                    ..want.clone()
                };
                return resume(dir, identity);
            }
            (Some((why, _)), Reinit::No) => {
                return Err(StoreError::Config(format!(
                    "cache directory {} cannot be used: {why}; use another directory, or start this one over with --cache-reinit (CacheConfig::reinit)",
                    dir.display()
                )));
            }
            (_, Reinit::IfClean) => {
                let n = possibly_dirty(dir)?;
                if n > 0 {
                    return Err(StoreError::Config(format!(
                        "cache directory {} holds {n} chunks that may have writes not yet pushed to the remote it was made for; re-initialising would discard them. Mount it with its own remote to push them, or discard them with --cache-reinit-force (Reinit::Force)",
                        dir.display()
                    )));
                }
            }
            (_, Reinit::Force) => {}
        }
        // Start over: the meta goes first, so that a crash from here on leaves a directory
        // that is created afresh next time.
        std::fs::remove_file(&meta_path).map_err(|e| io_err("remove", &meta_path, e))?;
        sync_dir(dir)?;
        tracing::warn!("cache: re-initialising {}", dir.display());
    }
    create(dir, want)
}

fn resume(dir: &Path, identity: DirIdentity) -> Result<Opened> {
    let map_path = dir.join("map");
    let intent_path = dir.join("intent");
    let bytes = read_prefix(&map_path, identity.chunks())?.unwrap_or_else(|| vec![0; 0]);
    let mut bytes = bytes;
    bytes.resize(identity.chunks(), 0);
    let intent_bytes = read_prefix(&intent_path, identity.regions())?;
    let intent_bytes = match intent_bytes {
        Some(b) => b,
        // Lost (it is created before the meta): the map cannot be trusted anywhere.
        None => vec![1; identity.regions()],
    };
    Ok(Opened {
        map: MapFile {
            file: open_rw(&map_path)?,
            path: map_path,
        },
        bytes,
        intent: IntentFile {
            file: open_rw(&intent_path)?,
            path: intent_path,
        },
        intent_bytes,
        identity,
        resumed: true,
    })
}

fn create(dir: &Path, want: &DirIdentity) -> Result<Opened> {
    let meta_path = dir.join("meta");
    let map_path = dir.join("map");
    let intent_path = dir.join("intent");
    // A fresh cache: remove stale files (from a crash before meta was written, or a reinit).
    for stale in [&map_path, &intent_path, &dir.join("data")] {
        match std::fs::remove_file(stale) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", stale, e)),
        }
    }
    let mk = |path: &Path, len: usize| -> Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io_err("create", path, e))?;
        file.set_len(len as u64)
            .map_err(|e| io_err("set size", path, e))?;
        file.sync_all().map_err(|e| io_err("fsync", path, e))?;
        Ok(file)
    };
    let map = mk(&map_path, want.chunks())?;
    let intent = mk(&intent_path, want.regions())?;
    let tmp = dir.join("meta.tmp");
    std::fs::write(&tmp, want.encode()).map_err(|e| io_err("write", &tmp, e))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("fsync", &tmp, e))?;
    std::fs::rename(&tmp, &meta_path).map_err(|e| io_err("rename", &meta_path, e))?;
    sync_dir(dir)?;
    Ok(Opened {
        map: MapFile {
            file: map,
            path: map_path,
        },
        bytes: vec![0u8; want.chunks()],
        intent: IntentFile {
            file: intent,
            path: intent_path,
        },
        intent_bytes: vec![0u8; want.regions()],
        identity: want.clone(),
        resumed: false,
    })
}

impl MapFile {
    /// Write the whole map and make it durable (blocking: call from a blocking context).
    pub fn store(&self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, 0)
            .map_err(|e| io_err("write", &self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| io_err("fdatasync", &self.path, e))
    }
}

impl IntentFile {
    /// Write the whole intent file, and make it durable if `durable` (blocking).
    pub fn store(&self, bytes: &[u8], durable: bool) -> Result<()> {
        self.file
            .write_all_at(bytes, 0)
            .map_err(|e| io_err("write", &self.path, e))?;
        if durable {
            self.file
                .sync_data()
                .map_err(|e| io_err("fdatasync", &self.path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(remote: Option<&str>) -> DirIdentity {
        DirIdentity {
            size: 1 << 20,
            chunk: 4096,
            region: 65536,
            remote: remote.map(str::to_owned),
        }
    }

    #[test]
    fn meta_round_trips_and_rejects_garbage() {
        let a = id(Some("nbd://h:1/x"));
        assert_eq!(DirIdentity::parse(&a.encode()).unwrap(), a);
        assert_eq!(DirIdentity::parse(&id(None).encode()).unwrap(), id(None));
        for bad in [
            "",
            "memsync-cache 1\nsize 1\nchunk 4096\n",
            "memsync-cache 2\nsize x\n",
            "memsync-cache 2\nsize 1\nchunk 0\nregion 0\nremote -\n",
            "memsync-cache 2\nsize 1\nchunk 4096\nregion 5000\nremote -\n",
            "\u{0}\u{1}",
        ] {
            assert!(DirIdentity::parse(bad).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// The meta file is outside bytes: any content parses to a value or an error.
        #[test]
        fn meta_parse_never_panics(s in "(memsync-cache 2\n)?((size|chunk|region|remote) [0-9a-z:/-]{0,24}\n){0,6}.{0,16}") {
            if let Ok(id) = DirIdentity::parse(&s) {
                proptest::prop_assert!(id.chunk > 0 && id.region % id.chunk == 0);
            }
        }
    }

    #[test]
    fn reopen_checks_the_identity_and_reinit_checks_dirty_chunks() {
        let d = tempfile::tempdir().unwrap();
        let a = id(Some("nbd://h:1/x"));
        let o = open_dir(d.path(), &a, Reinit::No).unwrap();
        assert!(!o.resumed);
        o.map.store(&[MAP_PRESENT | MAP_DIRTY]).unwrap();
        drop(o);
        assert!(open_dir(d.path(), &a, Reinit::No).unwrap().resumed);
        // Unknown identity: accepted, and the recorded one is kept.
        let o = open_dir(d.path(), &id(None), Reinit::No).unwrap();
        assert_eq!(o.identity.remote.as_deref(), Some("nbd://h:1/x"));
        drop(o);
        let b = id(Some("nbd://h:1/y"));
        let e = open_dir(d.path(), &b, Reinit::No).unwrap_err().to_string();
        assert!(
            e.contains("nbd://h:1/x") && e.contains("--cache-reinit"),
            "{e}"
        );
        let e = open_dir(d.path(), &b, Reinit::IfClean)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 chunks") && e.contains("force"), "{e}");
        let o = open_dir(d.path(), &b, Reinit::Force).unwrap();
        assert!(!o.resumed);
        assert!(o.bytes.iter().all(|&x| x == 0));
        drop(o);
        // A clean directory is re-initialised without force.
        assert!(!open_dir(d.path(), &a, Reinit::IfClean).unwrap().resumed);
        // Another size.
        let c = DirIdentity {
            size: 2 << 20,
            ..a.clone()
        };
        let e = open_dir(d.path(), &c, Reinit::No).unwrap_err().to_string();
        assert!(e.contains("bytes in chunks"), "{e}");
    }
}

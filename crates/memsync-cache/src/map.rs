//! The cache directory: the data file, its description and the persisted chunk map.
//!
//! ```text
//! DIR/meta   "memsync-cache 1\nsize N\nchunk N\n"   (written once, checked on reopen)
//! DIR/data   the local copy (a sparse file of the remote's size)
//! DIR/map    one byte per chunk: bit 0 = the chunk's data is in DIR/data, bit 1 = dirty
//! ```
//!
//! Crash safety rests on one ordering: a checkpoint snapshots the chunk states, then
//! `fdatasync`s DIR/data, then writes and `fdatasync`s DIR/map. A chunk becomes local or dirty in
//! memory only after its data was written to DIR/data, so every chunk the map marks present had
//! its data on disk before the map said so. Each chunk's state is a single byte, so a torn map
//! write mixes states that were each true at some checkpoint: an old "present" is still true
//! (data is only ever replaced by newer data), an old "dirty" only causes a harmless re-push.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memsync_core::{Result, StoreError};

/// Map byte: the chunk's data is in the data file.
pub const MAP_PRESENT: u8 = 1;
/// Map byte: the chunk has writes not yet pushed to the remote.
pub const MAP_DIRTY: u8 = 2;

const MAGIC: &str = "memsync-cache 1";

fn io_err(op: &'static str, path: &Path, e: io::Error) -> StoreError {
    StoreError::io(op, e).context(format!("cache map {}", path.display()))
}

/// The persisted map file.
#[derive(Debug)]
pub struct MapFile {
    file: File,
    path: PathBuf,
}

/// What opening a cache directory found.
#[derive(Debug)]
pub struct Opened {
    pub map: MapFile,
    /// One byte per chunk (all zero for a new cache).
    pub bytes: Vec<u8>,
    /// The directory held a cache already.
    pub resumed: bool,
}

/// Open or create the cache directory's meta and map files for a store of `size` bytes in
/// chunks of `chunk` bytes. A directory made for another size or chunk size is an error.
pub fn open_dir(dir: &Path, size: u64, chunk: u64) -> Result<Opened> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("mkdir", dir, e))?;
    let meta_path = dir.join("meta");
    let want = format!("{MAGIC}\nsize {size}\nchunk {chunk}\n");
    let chunks = size.div_ceil(chunk) as usize;
    let map_path = dir.join("map");
    match std::fs::read_to_string(&meta_path) {
        Ok(have) => {
            if have != want {
                return Err(StoreError::Config(format!(
                    "cache directory {} was made for another store or chunk size ({:?}, expected {:?}); use another directory",
                    dir.display(),
                    have.replace('\n', " "),
                    want.replace('\n', " ")
                )));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&map_path)
                .map_err(|e| io_err("open", &map_path, e))?;
            let mut bytes = vec![0u8; chunks];
            let len = file
                .metadata()
                .map_err(|e| io_err("stat", &map_path, e))?
                .len();
            let n = (len as usize).min(chunks);
            file.read_exact_at(&mut bytes[..n], 0)
                .map_err(|e| io_err("read", &map_path, e))?;
            Ok(Opened {
                map: MapFile {
                    file,
                    path: map_path,
                },
                bytes,
                resumed: true,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A fresh cache: remove a stale map and data (from a crash before meta was written).
            let _ = std::fs::remove_file(&map_path);
            let _ = std::fs::remove_file(dir.join("data"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&map_path)
                .map_err(|e| io_err("create", &map_path, e))?;
            file.set_len(chunks as u64)
                .map_err(|e| io_err("set size", &map_path, e))?;
            file.sync_all().map_err(|e| io_err("fsync", &map_path, e))?;
            let tmp = dir.join("meta.tmp");
            std::fs::write(&tmp, &want).map_err(|e| io_err("write", &tmp, e))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("fsync", &tmp, e))?;
            std::fs::rename(&tmp, &meta_path).map_err(|e| io_err("rename", &meta_path, e))?;
            File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("fsync", dir, e))?;
            Ok(Opened {
                map: MapFile {
                    file,
                    path: map_path,
                },
                bytes: vec![0u8; chunks],
                resumed: false,
            })
        }
        Err(e) => Err(io_err("read", &meta_path, e)),
    }
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

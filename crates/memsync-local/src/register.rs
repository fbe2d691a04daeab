//! URL openers for `mem:`, `file:` and `dir:`.

use std::sync::Arc;

use memsync_core::size::parse_size;
use memsync_core::{DynStore, Registry, Result, StoreUrl};

use crate::{DirOptions, DirStore, FileOptions, FileStore, MemStore};

/// Register the `mem`, `file` and `dir` schemes.
///
/// - `mem:SIZE` or `mem:?size=SIZE`, optional `chunk=` (default 64K): [`MemStore`].
/// - `file:PATH` or `file:///PATH`, optional `size=`, `create`, `readonly`: [`FileStore`].
/// - `dir:PATH?size=SIZE`, optional `chunk=` (default 64K), `max_open=` (default 256),
///   `init=` ([`memsync_core::MetaInit`]): [`DirStore`].
///
/// Every opener rejects unknown query parameters, and errors name the bad part of the URL.
pub fn register(reg: &mut Registry) {
    reg.register(
        "mem",
        "mem:SIZE[?chunk=64K]  sparse process memory, lost on exit",
        open_mem,
    );
    reg.register(
        "file",
        "file:PATH[?size=1G&create&readonly]  a regular file or block device",
        open_file,
    );
    reg.register(
        "dir",
        "dir:PATH?size=1G[&chunk=64K&max_open=256&init=auto|adopt|force]  a directory with one \
         file per chunk",
        open_dir,
    );
}

fn no_host(url: &StoreUrl) -> Result<()> {
    match url.authority.as_deref() {
        None | Some("" | "localhost") => Ok(()),
        Some(h) => Err(url.error(
            "host",
            format!("{h:?}: {} URLs cannot name a host", url.scheme),
        )),
    }
}

fn path_of(url: &StoreUrl) -> Result<&str> {
    no_host(url)?;
    if url.path.is_empty() {
        return Err(url.error(
            "path",
            format!("missing (e.g. {}:/var/lib/disk)", url.scheme),
        ));
    }
    Ok(&url.path)
}

async fn open_mem(url: StoreUrl) -> Result<DynStore> {
    url.ensure_params(&["size", "chunk"])?;
    if url.authority.is_some() {
        return Err(url.error("host", "mem URLs take no host (use mem:1G)"));
    }
    let from_path = if url.path.is_empty() {
        None
    } else {
        Some(parse_size(&url.path).map_err(|e| url.error("size", e))?)
    };
    let size = match (from_path, url.size_param("size")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(url.error("size", format!("given twice and different ({a} and {b})")));
        }
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => return Err(url.error("size", "missing (e.g. mem:1G)")),
    };
    let chunk = url
        .size_param("chunk")?
        .unwrap_or(MemStore::DEFAULT_CHUNK_SIZE);
    let store = MemStore::with_chunk_size(size, chunk)
        .map_err(|e| url.error("query parameter \"chunk\"", e))?;
    Ok(Arc::new(store))
}

async fn open_file(url: StoreUrl) -> Result<DynStore> {
    url.ensure_params(&["size", "create", "readonly"])?;
    let path = path_of(&url)?;
    let opts = FileOptions {
        size: url.size_param("size")?,
        create: url.bool_param("create")?,
        read_only: url.bool_param("readonly")?.unwrap_or(false),
    };
    Ok(Arc::new(FileStore::open(path, opts)?))
}

async fn open_dir(url: StoreUrl) -> Result<DynStore> {
    url.ensure_params(&["size", "chunk", "max_open", "init"])?;
    let path = path_of(&url)?;
    let max_open = url.count_param("max_open", DirStore::DEFAULT_MAX_OPEN, 1 << 20)?;
    let opts = DirOptions {
        size: url.size_param("size")?,
        chunk_size: url.size_param("chunk")?,
        max_open,
        init: memsync_core::MetaInit::from_url(&url)?,
    };
    Ok(Arc::new(DirStore::open(path, opts)?))
}

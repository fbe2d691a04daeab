//! The two S3 stores: one object per chunk ([`S3ChunkStore`], wrapped in `Chunked` by the URL
//! opener), and one existing object, read-only ([`S3ObjectStore`]).

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::try_join_all;
use memsync_core::range::chunk_pieces;
use memsync_core::{
    Caps, Result, Store, StoreError, StoreId, async_trait, check_range, check_write,
};

use crate::client::S3Client;

/// Chunk `i` is the object `PREFIX/i` (or `i` with an empty prefix). Requests must be aligned to
/// the chunk size (`block_size` = chunk); wrap it in `memsync_core::layers::Chunked` for any
/// byte range. A missing object reads as zeros; trim and write-zeroes delete objects.
pub struct S3ChunkStore {
    client: Arc<S3Client>,
    prefix: String,
    chunk: u64,
    size: u64,
    id: Option<StoreId>,
}

impl fmt::Debug for S3ChunkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3ChunkStore")
            .field("client", &self.client)
            .field("prefix", &self.prefix)
            .field("chunk", &self.chunk)
            .field("size", &self.size)
            .finish()
    }
}

impl S3ChunkStore {
    pub fn new(client: Arc<S3Client>, prefix: String, chunk: u64, size: u64) -> Self {
        S3ChunkStore {
            client,
            prefix,
            chunk,
            size,
            id: None,
        }
    }

    /// The identity to report (the one in the store's metadata record).
    pub fn with_identity(mut self, id: Option<StoreId>) -> Self {
        self.id = id;
        self
    }

    /// The object key of chunk `index`.
    pub fn key(&self, index: u64) -> String {
        if self.prefix.is_empty() {
            index.to_string()
        } else {
            format!("{}/{}", self.prefix, index)
        }
    }

    fn ctx(&self, index: u64) -> impl FnOnce(StoreError) -> StoreError + use<> {
        let k = format!("S3 object {} (chunk {index})", self.key(index));
        move |e| e.context(k)
    }

    async fn delete_range(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.caps(), self.size, offset, len)?;
        let futs = chunk_pieces(offset, len, self.chunk).map(|p| async move {
            self.client
                .delete(&self.key(p.index))
                .await
                .map_err(self.ctx(p.index))
        });
        try_join_all(futs).await?;
        Ok(())
    }
}

#[async_trait]
impl Store for S3ChunkStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn identity(&self) -> Option<StoreId> {
        self.id
    }

    fn caps(&self) -> Caps {
        let mut c = Caps::basic();
        c.block_size = self.chunk;
        c.preferred_io = self.chunk;
        c.max_io = self.chunk.saturating_mul(16);
        c.trim = true;
        c.fast_zero = true;
        c.multi_conn = true;
        c
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // The short last chunk may end at the store's size, unaligned.
        let align = if offset + buf.len() as u64 == self.size {
            1
        } else {
            self.chunk
        };
        check_range(self.size, 1, offset, buf.len() as u64)?;
        if !offset.is_multiple_of(self.chunk) || !(buf.len() as u64).is_multiple_of(align) {
            return Err(StoreError::Misaligned {
                offset,
                len: buf.len() as u64,
                align: self.chunk,
            });
        }
        let mut rest = buf;
        let mut futs = Vec::new();
        for p in chunk_pieces(offset, rest.len() as u64, self.chunk) {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(p.len as usize);
            rest = tail;
            futs.push(async move {
                let key = self.key(p.index);
                match self.client.get_into(&key, None, part).await {
                    Ok(None) => part.fill(0),
                    Ok(Some(n)) => {
                        let n = n.min(part.len());
                        part[n..].fill(0)
                    }
                    Err(e) => return Err(self.ctx(p.index)(e)),
                }
                Ok(())
            });
        }
        try_join_all(futs).await?;
        Ok(())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.size, offset, data.len() as u64).or_else(|e| {
            // Allow the short tail chunk.
            if offset + data.len() as u64 == self.size && offset.is_multiple_of(self.chunk) {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        let futs = chunk_pieces(offset, data.len() as u64, self.chunk).map(|p| {
            let body = data.slice(p.pos as usize..(p.pos + p.len) as usize);
            async move {
                self.client
                    .put(&self.key(p.index), body)
                    .await
                    .map_err(self.ctx(p.index))
            }
        });
        try_join_all(futs).await?;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        // A completed PUT is durable in S3.
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.delete_range(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.delete_range(offset, len).await
    }
}

/// One existing object, read-only, read with ranged GETs (at most `piece` bytes each, run
/// concurrently). Its size comes from HEAD when opened.
pub struct S3ObjectStore {
    client: Arc<S3Client>,
    key: String,
    size: u64,
    piece: u64,
}

impl fmt::Debug for S3ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3ObjectStore")
            .field("client", &self.client)
            .field("key", &self.key)
            .field("size", &self.size)
            .finish()
    }
}

impl S3ObjectStore {
    pub fn new(client: Arc<S3Client>, key: String, size: u64, piece: u64) -> Self {
        S3ObjectStore {
            client,
            key,
            size,
            piece: piece.max(1),
        }
    }
}

#[async_trait]
impl Store for S3ObjectStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let mut c = Caps::basic();
        c.read_only = true;
        c.block_size = 1;
        c.preferred_io = self.piece;
        c.max_io = self.piece.saturating_mul(16);
        c.multi_conn = true;
        c
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.size, 1, offset, buf.len() as u64)?;
        let mut rest = buf;
        let mut futs = Vec::new();
        for p in chunk_pieces(offset, rest.len() as u64, self.piece) {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(p.len as usize);
            rest = tail;
            let start = offset + p.pos;
            futs.push(async move {
                let end = start + part.len() as u64;
                match self.client.get_into(&self.key, Some((start, end)), part).await? {
                    Some(n) if n == part.len() => Ok(()),
                    Some(n) => Err(StoreError::backend(format!(
                        "S3 object {}: ranged GET {start}..{end} returned {n} bytes (object changed?)",
                        self.key
                    ))),
                    None => Err(StoreError::backend(format!(
                        "S3 object {} disappeared",
                        self.key
                    ))),
                }
            });
        }
        try_join_all(futs).await?;
        Ok(())
    }

    async fn write(&self, _offset: u64, _data: Bytes) -> Result<()> {
        Err(StoreError::ReadOnly)
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(StoreError::ReadOnly)
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(StoreError::ReadOnly)
    }
}

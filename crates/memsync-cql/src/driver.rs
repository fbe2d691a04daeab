//! The real backend over the `scylla` driver (feature `scylla`). Not verified against a live
//! server here; see the crate documentation.

use std::fmt;
use std::sync::Arc;

use futures_util::future::try_join_all;
use memsync_core::layers::Chunked;
use memsync_core::range::chunk_pieces;
use memsync_core::{
    Bytes, Caps, DynStore, Result, Store, StoreError, StoreUrl, async_trait, check_range,
    check_write,
};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use tokio::sync::Semaphore;

use crate::CqlConfig;

struct CqlStore {
    session: Session,
    select: PreparedStatement,
    insert: PreparedStatement,
    delete: PreparedStatement,
    chunk: u64,
    size: u64,
    limit: Semaphore,
    desc: String,
}

impl fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CqlStore")
            .field("url", &self.desc)
            .field("chunk", &self.chunk)
            .finish()
    }
}

fn err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend_with(format!("CQL {what} failed"), e)
}

pub(crate) async fn open(u: &StoreUrl, cfg: CqlConfig) -> Result<DynStore> {
    let st = cfg.statements();
    let session = SessionBuilder::new()
        .known_nodes(&cfg.hosts)
        .connection_timeout(cfg.timeout)
        .build()
        .await
        .map_err(|e| err(&format!("connect to {}", cfg.hosts.join(",")), e))?;
    if cfg.create {
        session
            .query_unpaged(st.create_keyspace.as_str(), &[])
            .await
            .map_err(|e| err("CREATE KEYSPACE", e))?;
        session
            .query_unpaged(st.create_table.as_str(), &[])
            .await
            .map_err(|e| err("CREATE TABLE", e))?;
    }
    let select = session
        .prepare(st.select.as_str())
        .await
        .map_err(|e| err("prepare SELECT", e))?;
    let insert = session
        .prepare(st.insert.as_str())
        .await
        .map_err(|e| err("prepare INSERT", e))?;
    let delete = session
        .prepare(st.delete.as_str())
        .await
        .map_err(|e| err("prepare DELETE", e))?;
    let inner = CqlStore {
        session,
        select,
        insert,
        delete,
        chunk: cfg.chunk,
        size: cfg.size,
        limit: Semaphore::new(cfg.conns),
        desc: u.to_string(),
    };
    let store = Chunked::new(inner, cfg.chunk)?.with_max_concurrency(cfg.conns);
    Ok(Arc::new(store))
}

impl CqlStore {
    fn aligned(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, 1, offset, len)?;
        let tail_ok = offset + len == self.size;
        if !offset.is_multiple_of(self.chunk) || !(tail_ok || len.is_multiple_of(self.chunk)) {
            return Err(StoreError::Misaligned {
                offset,
                len,
                align: self.chunk,
            });
        }
        Ok(())
    }

    async fn delete_range(&self, offset: u64, len: u64) -> Result<()> {
        if self.caps().read_only {
            return Err(StoreError::ReadOnly);
        }
        self.aligned(offset, len)?;
        let futs = chunk_pieces(offset, len, self.chunk).map(|p| async move {
            let _permit = self.limit.acquire().await.map_err(|e| err("limit", e))?;
            self.session
                .execute_unpaged(&self.delete, (p.index as i64,))
                .await
                .map_err(|e| err("DELETE", e))?;
            Ok::<_, StoreError>(())
        });
        try_join_all(futs).await?;
        Ok(())
    }
}

#[async_trait]
impl Store for CqlStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let mut c = Caps::basic();
        c.block_size = self.chunk;
        c.preferred_io = self.chunk;
        c.max_io = self.chunk.saturating_mul(64);
        c.trim = true;
        c.fast_zero = true;
        c
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.aligned(offset, buf.len() as u64)?;
        let mut rest = buf;
        let mut futs = Vec::new();
        for p in chunk_pieces(offset, rest.len() as u64, self.chunk) {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(p.len as usize);
            rest = tail;
            futs.push(async move {
                let _permit = self.limit.acquire().await.map_err(|e| err("limit", e))?;
                let res = self
                    .session
                    .execute_unpaged(&self.select, (p.index as i64,))
                    .await
                    .map_err(|e| err("SELECT", e))?;
                let rows = res
                    .into_rows_result()
                    .map_err(|e| err("SELECT result", e))?;
                let row: Option<(Option<Vec<u8>>,)> =
                    rows.maybe_first_row().map_err(|e| err("SELECT row", e))?;
                let data = row.and_then(|r| r.0).unwrap_or_default();
                let n = data.len().min(part.len());
                part[..n].copy_from_slice(&data[..n]);
                part[n..].fill(0);
                Ok::<_, StoreError>(())
            });
        }
        try_join_all(futs).await?;
        Ok(())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.size, offset, data.len() as u64).or_else(|e| match e {
            StoreError::Misaligned { .. } => self.aligned(offset, data.len() as u64),
            other => Err(other),
        })?;
        let futs = chunk_pieces(offset, data.len() as u64, self.chunk).map(|p| {
            let body = data.slice(p.pos as usize..(p.pos + p.len) as usize);
            async move {
                let _permit = self.limit.acquire().await.map_err(|e| err("limit", e))?;
                self.session
                    .execute_unpaged(&self.insert, (p.index as i64, body.to_vec()))
                    .await
                    .map_err(|e| err("INSERT", e))?;
                Ok::<_, StoreError>(())
            }
        });
        try_join_all(futs).await?;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.delete_range(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.delete_range(offset, len).await
    }
}

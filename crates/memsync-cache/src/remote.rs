//! Opening a cache of a remote given by URL: the one way the CLI (`memsync mount`,
//! `memsync map --cache`) and the benchmarks open one.

use std::path::Path;
use std::sync::Arc;

use memsync_core::{DynStore, Registry, Result, StoreUrl};

use crate::{Cache, CacheConfig, Opener, Reconnect};

/// A reconnecting remote opened through the registry.
pub async fn reconnecting(registry: &Registry, url: &str) -> Result<Arc<Reconnect>> {
    let registry = registry.clone();
    let url = url.to_owned();
    let opener: Opener = Arc::new(move || {
        let registry = registry.clone();
        let url = url.clone();
        Box::pin(async move { registry.open(&url).await })
    });
    Ok(Arc::new(Reconnect::new(opener).await?))
}

/// The cache's two remotes: one for the background pull and push, and one of its own for
/// demand misses, so they never queue behind the pull. Opened concurrently: over a long link
/// each open is several round trips.
pub async fn remote_pair(
    registry: &Registry,
    url: &str,
) -> Result<(Arc<Reconnect>, Arc<Reconnect>)> {
    tokio::try_join!(reconnecting(registry, url), reconnecting(registry, url))
}

/// What a cache directory records as its remote: the URL's scheme, host, path and the query
/// parameters that select data (`prefix`, `object`), never credentials (query parameters in
/// store URLs) or tuning parameters (so `connections=4` or a new password do not make it another
/// remote).
pub fn remote_identity(url: &str) -> Result<String> {
    let u = StoreUrl::parse(url)?;
    let mut id = format!("{}:", u.scheme);
    if let Some(a) = &u.authority {
        id.push_str("//");
        // Never the user's credentials: only the host part.
        id.push_str(a.rsplit('@').next().unwrap_or(a));
    }
    id.push_str(&u.path);
    let mut sep = '?';
    for key in ["prefix", "object"] {
        if let Some(v) = u.param(key) {
            id.push_str(&format!("{sep}{key}={v}"));
            sep = '&';
        }
    }
    Ok(id)
}

/// Open (or resume) a cache of the remote `url` in `dir` (created if missing): the remotes come
/// from [`remote_pair`], the second serving demand misses; the directory records
/// [`remote_identity`]; the rest is `cfg`.
pub async fn open_remote(
    registry: &Registry,
    url: &str,
    dir: &Path,
    cfg: CacheConfig,
) -> Result<Cache> {
    let (remote, demand) = remote_pair(registry, url)
        .await
        .map_err(|e| e.context(format!("cannot open {}", memsync_core::redact(url))))?;
    let cfg = CacheConfig {
        demand_remote: Some(demand as DynStore),
        remote_id: Some(remote_identity(url)?),
        ..cfg
    };
    Cache::open(remote as DynStore, dir, cfg)
        .await
        .map_err(|e| e.context(format!("opening the cache in {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_identity_keeps_what_selects_data_only() {
        assert_eq!(
            remote_identity("nbd://127.0.0.1:10809/disk?connections=4").unwrap(),
            "nbd://127.0.0.1:10809/disk"
        );
        assert_eq!(
            remote_identity("redis://h:6379/2?size=1G&prefix=vm1&timeout=3s&password=p").unwrap(),
            "redis://h:6379/2?prefix=vm1"
        );
        assert_eq!(
            remote_identity("s3://b/p?size=1G&secret_key=S&access_key=A&endpoint=http://e")
                .unwrap(),
            "s3://b/p"
        );
        assert_eq!(remote_identity("file:/x.img").unwrap(), "file:/x.img");
    }
}

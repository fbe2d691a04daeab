//! memsync store over Cassandra/ScyllaDB: chunk `i` is the row `key = i` of a table
//! `(key bigint PRIMARY KEY, chunk blob)`; a missing row reads as zeros, trim deletes rows.
//!
//! ```text
//! cql://HOST[:PORT][,HOST:PORT...]/KEYSPACE/TABLE?size=1G[&chunk=64K&replication=1&conns=64&timeout=10s]
//! ```
//!
//! The URL, schema and statement layer ([`CqlConfig`], [`Statements`]) always builds and is unit
//! tested. The driver (`scylla` crate) is behind the cargo feature `scylla`, off by default;
//! without it, opening a `cql://` URL fails with an error saying so. This backend has **not been
//! verified against a live Cassandra/ScyllaDB server** (none can be installed here); its
//! integration tests run only when `MEMSYNC_CQL_ENDPOINT` names one.

use std::time::Duration;

use memsync_core::{DynStore, Registry, Result, StoreUrl};

#[cfg(feature = "scylla")]
mod driver;

/// Default chunk (blob) size.
pub const DEFAULT_CHUNK: u64 = 64 << 10;
/// Largest chunk: large blobs hurt Cassandra (its default `max_value_size` is 256 MiB, and
/// anything over a few MiB is discouraged).
pub const MAX_CHUNK: u64 = 16 << 20;

const PARAMS: &[&str] = &["size", "chunk", "replication", "conns", "timeout", "create"];

/// Register the `cql` scheme (always; without the `scylla` feature it explains how to get it).
pub fn register(reg: &mut Registry) {
    reg.register(
        "cql",
        "cql://HOST[:PORT]/KEYSPACE/TABLE?size=1G[&chunk=64K&replication=1]  one Cassandra/ScyllaDB \
         row per chunk (needs a build with the `cql` feature)",
        |u: StoreUrl| async move { open(&u).await },
    );
}

/// Is the driver compiled in?
pub const fn enabled() -> bool {
    cfg!(feature = "scylla")
}

/// Everything a `cql://` URL says, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CqlConfig {
    pub hosts: Vec<String>,
    pub keyspace: String,
    pub table: String,
    pub size: u64,
    pub chunk: u64,
    pub replication: u32,
    pub conns: usize,
    pub timeout: Duration,
    /// Create the keyspace and table if absent (default true).
    pub create: bool,
}

/// A CQL identifier we accept unquoted: a letter, then letters, digits, `_`; at most 48 chars.
pub fn valid_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic())
        && s.len() <= 48
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

impl CqlConfig {
    /// Parse and check a `cql://` URL; errors name the bad part.
    pub fn from_url(u: &StoreUrl) -> Result<Self> {
        u.ensure_params(PARAMS)?;
        let auth = u.authority.as_deref().unwrap_or("");
        if auth.is_empty() {
            return Err(u.error(
                "host",
                "missing (e.g. cql://127.0.0.1:9042/ks/table?size=1G)",
            ));
        }
        let mut hosts = Vec::new();
        for h in auth.split(',') {
            let addr = match h.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && !host.ends_with(']') || host.ends_with(']') =>
                {
                    if port.parse::<u16>().ok().filter(|p| *p > 0).is_none() {
                        return Err(u.error("port", format!("{port:?} is not a TCP port")));
                    }
                    h.to_owned()
                }
                Some(_) => return Err(u.error("host", format!("{h:?} has no host name"))),
                None if h.is_empty() => return Err(u.error("host", "empty entry in the host list")),
                None => format!("{h}:9042"),
            };
            hosts.push(addr);
        }
        let parts: Vec<&str> = u.path.trim_matches('/').split('/').collect();
        let [keyspace, table] = parts.as_slice() else {
            return Err(u.error("path", "must be /KEYSPACE/TABLE"));
        };
        for (what, id) in [("keyspace", keyspace), ("table", table)] {
            if !valid_identifier(id) {
                return Err(u.error(
                    what,
                    format!("{id:?} is not a valid CQL name (a letter, then letters, digits, _)"),
                ));
            }
        }
        let size = u
            .size_param("size")?
            .ok_or_else(|| u.error("query parameter \"size\"", "missing (e.g. size=1G)"))?;
        let chunk = u.size_param("chunk")?.unwrap_or(DEFAULT_CHUNK);
        if chunk == 0 || chunk > MAX_CHUNK {
            return Err(u.error(
                "query parameter \"chunk\"",
                format!("{chunk} must be between 1 and {MAX_CHUNK} bytes"),
            ));
        }
        let num = |k: &str, d: usize, max: usize| u.count_param(k, d, max);
        let replication = num("replication", 1, 32)? as u32;
        let conns = num("conns", 64, 4096)?;
        let timeout = u
            .duration_param("timeout")?
            .unwrap_or(Duration::from_secs(10));
        if timeout.is_zero() {
            return Err(u.error("query parameter \"timeout\"", "must be greater than 0"));
        }
        Ok(CqlConfig {
            hosts,
            keyspace: keyspace.to_string(),
            table: table.to_string(),
            size,
            chunk,
            replication,
            conns,
            timeout,
            create: u.bool_param("create")?.unwrap_or(true),
        })
    }

    /// The CQL statements for this configuration.
    pub fn statements(&self) -> Statements {
        Statements::new(&self.keyspace, &self.table, self.replication)
    }
}

/// The CQL text of every statement the store uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statements {
    pub create_keyspace: String,
    pub create_table: String,
    /// `SELECT chunk ... WHERE key = ?`
    pub select: String,
    /// `INSERT ... (key, chunk) VALUES (?, ?)`
    pub insert: String,
    /// `DELETE ... WHERE key = ?`
    pub delete: String,
}

impl Statements {
    /// Statements for `keyspace.table` (names must pass [`valid_identifier`]).
    pub fn new(keyspace: &str, table: &str, replication: u32) -> Statements {
        let t = format!("{keyspace}.{table}");
        Statements {
            create_keyspace: format!(
                "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
                 {{'class': 'SimpleStrategy', 'replication_factor': {replication}}}"
            ),
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {t} (key bigint PRIMARY KEY, chunk blob)"
            ),
            select: format!("SELECT chunk FROM {t} WHERE key = ?"),
            insert: format!("INSERT INTO {t} (key, chunk) VALUES (?, ?)"),
            delete: format!("DELETE FROM {t} WHERE key = ?"),
        }
    }
}

/// Open a `cql://` URL.
pub async fn open(u: &StoreUrl) -> Result<DynStore> {
    let cfg = CqlConfig::from_url(u)?;
    #[cfg(feature = "scylla")]
    {
        driver::open(u, cfg).await
    }
    #[cfg(not(feature = "scylla"))]
    {
        let _ = cfg;
        Err(memsync_core::StoreError::Config(
            "this memsync binary was built without CQL (Cassandra/ScyllaDB) support; rebuild \
             with `cargo build -p memsync --features cql`"
                .to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Result<CqlConfig> {
        CqlConfig::from_url(&StoreUrl::parse(s)?)
    }

    #[test]
    fn urls_and_statements() {
        let c = cfg("cql://127.0.0.1:9042,10.0.0.2/memsync/chunks?size=1G&chunk=1M&replication=3")
            .unwrap();
        assert_eq!(c.hosts, vec!["127.0.0.1:9042", "10.0.0.2:9042"]);
        assert_eq!(
            (c.keyspace.as_str(), c.table.as_str()),
            ("memsync", "chunks")
        );
        assert_eq!((c.size, c.chunk, c.replication), (1 << 30, 1 << 20, 3));
        let s = c.statements();
        assert_eq!(
            s.create_keyspace,
            "CREATE KEYSPACE IF NOT EXISTS memsync WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 3}"
        );
        assert_eq!(
            s.create_table,
            "CREATE TABLE IF NOT EXISTS memsync.chunks (key bigint PRIMARY KEY, chunk blob)"
        );
        assert_eq!(s.select, "SELECT chunk FROM memsync.chunks WHERE key = ?");
        assert_eq!(
            s.insert,
            "INSERT INTO memsync.chunks (key, chunk) VALUES (?, ?)"
        );
        assert_eq!(s.delete, "DELETE FROM memsync.chunks WHERE key = ?");
    }

    #[test]
    fn bad_urls_name_the_part() {
        for (url, part) in [
            ("cql:///ks/t?size=1M", "host"),
            ("cql://h:0/ks/t?size=1M", "port"),
            ("cql://h/ks?size=1M", "path"),
            ("cql://h/ks/t/x?size=1M", "path"),
            ("cql://h/1ks/t?size=1M", "keyspace"),
            ("cql://h/ks/t;drop?size=1M", "table"),
            ("cql://h/ks/t", "size"),
            ("cql://h/ks/t?size=1M&chunk=1G", "chunk"),
            ("cql://h/ks/t?size=1M&replication=0", "replication"),
            ("cql://h/ks/t?size=1M&bogus=1", "bogus"),
        ] {
            let e = cfg(url).unwrap_err().to_string();
            assert!(e.contains(part), "{url}: {e}");
        }
        assert!(valid_identifier("a_1") && !valid_identifier("_a") && !valid_identifier("a-b"));
    }

    #[cfg(not(feature = "scylla"))]
    #[tokio::test]
    async fn without_the_feature_the_error_says_so() {
        let e = match open(&StoreUrl::parse("cql://127.0.0.1/ks/t?size=1M").unwrap()).await {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("built without CQL"), "{e}");
    }
}

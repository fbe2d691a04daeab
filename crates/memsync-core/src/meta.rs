//! What a persistent store belongs to: its size, chunk size and identity, recorded once when
//! the store is created and checked on every open.
//!
//! Without it, a store that keeps its data as chunk-addressed objects (a directory, Redis keys,
//! S3 objects) cannot tell whether the URL that opens it describes the same layout: the same
//! bytes read back with another chunk size come out scrambled, silently. Each such store keeps
//! one small [`StoreMeta`] record next to its chunks (`dir:` a file, Redis the key
//! `PREFIX:meta`, S3 the object `PREFIX/.memsync-meta`) and goes through [`resolve`] on open.
//!
//! The record is text, one `key=value` a line, so that a person can read it:
//!
//! ```text
//! # memsync store metadata. Do not edit.
//! format=memsync-store
//! version=1
//! size=1073741824
//! chunk=65536
//! id=5f0c2d8e7a9b41c6a3e1d2f4b5c6d7e8
//! ```
//!
//! The `dir:` store's earlier record (`format=memsync-dir 1`, with `size` and `chunk` and no
//! `id`) is still read, as version 0.

use std::fmt;

use crate::error::{Result, StoreError};
use crate::id::StoreId;
use crate::size::format_size;
use crate::url::StoreUrl;

/// Longest record accepted, in bytes.
pub const MAX_META_LEN: usize = 1024;
/// Most lines accepted in a record (comments included).
const MAX_META_LINES: usize = 32;
const FORMAT: &str = "memsync-store";
/// The version this build writes; records of a later version are refused.
pub const META_VERSION: u32 = 1;
const LEGACY_DIR_FORMAT: &str = "memsync-dir 1";

/// The metadata record of a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreMeta {
    /// Format version of the record (0: the `dir:` store's earlier record).
    pub version: u32,
    /// Store size in bytes.
    pub size: u64,
    /// Chunk size in bytes: the unit in which data is laid out.
    pub chunk_size: u64,
    /// Identity, chosen at creation (none in a version-0 record).
    pub id: Option<StoreId>,
}

fn bad(why: impl fmt::Display) -> StoreError {
    StoreError::Config(format!("bad store metadata: {why}"))
}

impl StoreMeta {
    /// A record for a new store, with a new identity.
    pub fn new(size: u64, chunk_size: u64) -> Self {
        StoreMeta {
            version: META_VERSION,
            size,
            chunk_size,
            id: Some(StoreId::random()),
        }
    }

    /// The record as text (at most [`MAX_META_LEN`] bytes).
    pub fn encode(&self) -> String {
        let Some(id) = self.id else {
            // A version-0 record has no identity; written back in its own format.
            return format!(
                "# memsync directory store: one file per chunk. Do not edit.\nformat={LEGACY_DIR_FORMAT}\nsize={}\nchunk={}\n",
                self.size, self.chunk_size
            );
        };
        format!(
            "# memsync store metadata. Do not edit.\nformat={FORMAT}\nversion={}\nsize={}\nchunk={}\nid={id}\n",
            self.version.max(META_VERSION),
            self.size,
            self.chunk_size
        )
    }

    /// Parse a record. Bytes from outside: never panics, errors on anything malformed (not
    /// UTF-8, too long, a repeated or malformed line, a missing field, a later version).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_META_LEN {
            return Err(bad(format!("longer than {MAX_META_LEN} bytes")));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
        let mut format = None;
        let mut version = None;
        let mut size = None;
        let mut chunk = None;
        let mut id = None;
        for (n, line) in text.lines().enumerate() {
            if n == MAX_META_LINES {
                return Err(bad(format!("more than {MAX_META_LINES} lines")));
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad(format!("line {line:?} is not key=value")))?;
            let (k, v) = (k.trim(), v.trim());
            let num = || {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{k}={v:?} is not a number")))
            };
            let slot_taken = match k {
                "format" => format.replace(v.to_owned()).is_some(),
                "version" => version
                    .replace(
                        v.parse::<u32>()
                            .map_err(|_| bad(format!("version={v:?} is not a number")))?,
                    )
                    .is_some(),
                "size" => size.replace(num()?).is_some(),
                "chunk" => chunk.replace(num()?).is_some(),
                "id" => id
                    .replace(
                        StoreId::parse(v)
                            .ok_or_else(|| bad(format!("id={v:?} is not 32 hex digits")))?,
                    )
                    .is_some(),
                // A later version may add keys; the version check below refuses records that
                // need them understood.
                _ => false,
            };
            if slot_taken {
                return Err(bad(format!("{k} given twice")));
            }
        }
        let version = match (format.as_deref(), version) {
            (Some(FORMAT), Some(v)) if (1..=META_VERSION).contains(&v) => v,
            (Some(FORMAT), Some(v)) if v > META_VERSION => {
                return Err(bad(format!(
                    "version {v} was written by a later memsync (this one reads up to {META_VERSION})"
                )));
            }
            (Some(FORMAT), v) => return Err(bad(format!("version {v:?} is not valid"))),
            // A version-0 record never had an identity: one with an id= line was not written
            // by memsync (and would be written back as version 1, changing its meaning).
            (Some(LEGACY_DIR_FORMAT), None) if id.is_some() => {
                return Err(bad(format!("id= in a {LEGACY_DIR_FORMAT:?} record")));
            }
            (Some(LEGACY_DIR_FORMAT), None) => 0,
            (f, _) => return Err(bad(format!("format is {f:?}, expected {FORMAT:?}"))),
        };
        let (Some(size), Some(chunk_size)) = (size, chunk) else {
            return Err(bad("size or chunk missing"));
        };
        if chunk_size == 0 {
            return Err(bad("chunk=0"));
        }
        if version >= 1 && id.is_none() {
            return Err(bad("id missing"));
        }
        Ok(StoreMeta {
            version,
            size,
            chunk_size,
            id,
        })
    }

    /// Fail, naming both values, if `size` or `chunk_size` (when given) differ from the record.
    pub fn check(&self, size: Option<u64>, chunk_size: Option<u64>) -> Result<()> {
        let differ = |what: &str, have: u64, want: u64| {
            StoreError::Config(format!(
                "was created with {what}={have} ({}), not {what}={want} ({}); open it with \
                 {what}={have} or without {what}=, or re-initialise it with init=force (its data \
                 then counts as laid out in the new geometry)",
                format_size(have),
                format_size(want)
            ))
        };
        if let Some(c) = chunk_size.filter(|&c| c != self.chunk_size) {
            return Err(differ("chunk", self.chunk_size, c));
        }
        if let Some(s) = size.filter(|&s| s != self.size) {
            return Err(differ("size", self.size, s));
        }
        Ok(())
    }
}

/// What to do about a store's metadata record on open (URL parameter `init=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetaInit {
    /// Create the record when the store is new; verify it when present. A store that holds
    /// chunks but no record is refused (its layout is unknown).
    #[default]
    Auto,
    /// As `Auto`, but a store that holds chunks without a record gets one from the URL's size
    /// and chunk size (for data written before memsync recorded its layout).
    Adopt,
    /// Write a new record (a new identity) from the URL's size and chunk size, whatever is
    /// recorded (what the URL leaves out is kept from the old record). The data stays as it is.
    Force,
}

impl MetaInit {
    /// The URL's `init=` parameter (`auto`, `adopt` or `force`; absent: `auto`).
    pub fn from_url(u: &StoreUrl) -> Result<Self> {
        match u.param("init") {
            None | Some("auto") => Ok(MetaInit::Auto),
            Some("adopt") => Ok(MetaInit::Adopt),
            Some("force") => Ok(MetaInit::Force),
            Some(v) => Err(u.error(
                "query parameter \"init\"",
                format!("{v:?} is not one of auto, adopt, force"),
            )),
        }
    }
}

/// The outcome of [`resolve`]: the record the store now has, and whether it must be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub meta: StoreMeta,
    pub write: bool,
}

/// Decide a store's record on open. `found` is the record the store holds (if any),
/// `has_chunks` whether it holds chunk data (`false` when the store cannot tell cheaply),
/// `size` and `chunk_size` what the URL asks for, `default_chunk` the store's default.
/// Errors are plain ([`StoreError::Config`]); the caller adds which store it is.
pub fn resolve(
    found: Option<StoreMeta>,
    has_chunks: bool,
    size: Option<u64>,
    chunk_size: Option<u64>,
    default_chunk: u64,
    init: MetaInit,
) -> Result<Resolved> {
    let new = |size: Option<u64>, chunk: Option<u64>| -> Result<Resolved> {
        let size = size.ok_or_else(|| {
            StoreError::Config("holds no store metadata; give size= to create one".into())
        })?;
        Ok(Resolved {
            meta: StoreMeta::new(size, chunk.unwrap_or(default_chunk)),
            write: true,
        })
    };
    match (found, init) {
        // What the URL leaves out is kept from the old record.
        (found, MetaInit::Force) => new(
            size.or(found.as_ref().map(|m| m.size)),
            chunk_size.or(found.as_ref().map(|m| m.chunk_size)),
        ),
        (Some(m), _) => {
            m.check(size, chunk_size)?;
            Ok(Resolved {
                meta: m,
                write: false,
            })
        }
        (None, MetaInit::Auto) if has_chunks => Err(StoreError::Config(
            "holds chunks but no store metadata, so their layout is unknown; add init=adopt \
             (with the size= and chunk= they were written with) to record it"
                .into(),
        )),
        (None, _) => new(size, chunk_size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_legacy() {
        let m = StoreMeta::new(1 << 30, 65536);
        assert_eq!(StoreMeta::parse(m.encode().as_bytes()).unwrap(), m);
        assert!(m.encode().len() <= MAX_META_LEN);
        assert_ne!(m.id, StoreMeta::new(1 << 30, 65536).id);
        let old = StoreMeta::parse(b"# x\nformat=memsync-dir 1\nsize=100\nchunk=4096\n").unwrap();
        assert_eq!(
            (old.version, old.size, old.chunk_size, old.id),
            (0, 100, 4096, None)
        );
    }

    #[test]
    fn malformed_records_are_errors() {
        let good = StoreMeta::new(10, 4096).encode();
        for bad in [
            String::new(),
            "garbage".into(),
            good.replace("version=1", "version=2"),
            good.replace("version=1", "version=x"),
            good.replace("version=1\n", ""),
            good.replace("size=10", "size=-1"),
            good.replace("chunk=4096", "chunk=0"),
            good.replace("chunk=4096\n", ""),
            format!("{good}size=10\n"),
            good.replace("id=", "id=zz"),
            good.replace("format=memsync-store", "format=other"),
            format!("{good}{}", "#\n".repeat(40)),
            format!("{good}# {}\n", "x".repeat(MAX_META_LEN)),
            "format=memsync-dir 1\nversion=1\nsize=1\nchunk=1\n".into(),
        ] {
            assert!(StoreMeta::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(StoreMeta::parse(&[0xff, 0xfe]).is_err());
        let e = StoreMeta::parse(good.replace("version=1", "version=9").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("later memsync"), "{e}");
    }

    #[test]
    fn resolve_creates_verifies_and_forces() {
        let r = resolve(None, false, Some(100), None, 64, MetaInit::Auto).unwrap();
        assert!(r.write);
        assert_eq!((r.meta.size, r.meta.chunk_size), (100, 64));
        let m = r.meta;
        // Present: verified, not rewritten; the URL may leave size and chunk out.
        let r = resolve(Some(m.clone()), true, None, None, 64, MetaInit::Auto).unwrap();
        assert_eq!(
            r,
            Resolved {
                meta: m.clone(),
                write: false
            }
        );
        let e = resolve(
            Some(m.clone()),
            true,
            Some(100),
            Some(128),
            64,
            MetaInit::Auto,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("chunk=64") && e.contains("not chunk=128"), "{e}");
        let e = resolve(Some(m.clone()), true, Some(200), None, 64, MetaInit::Adopt)
            .unwrap_err()
            .to_string();
        assert!(e.contains("size=100") && e.contains("init=force"), "{e}");
        let r = resolve(
            Some(m.clone()),
            true,
            Some(200),
            Some(128),
            64,
            MetaInit::Force,
        )
        .unwrap();
        assert!(r.write && r.meta.id != m.id);
        assert_eq!((r.meta.size, r.meta.chunk_size), (200, 128));
        let r = resolve(Some(m.clone()), true, None, Some(32), 64, MetaInit::Force).unwrap();
        assert_eq!((r.meta.size, r.meta.chunk_size), (100, 32));
        // Chunks without a record: refused unless adopted.
        let e = resolve(None, true, Some(100), None, 64, MetaInit::Auto).unwrap_err();
        assert!(e.to_string().contains("init=adopt"), "{e}");
        assert!(
            resolve(None, true, Some(100), None, 64, MetaInit::Adopt)
                .unwrap()
                .write
        );
        let e = resolve(None, false, None, None, 64, MetaInit::Auto).unwrap_err();
        assert!(e.to_string().contains("size="), "{e}");
    }

    #[test]
    fn init_param() {
        let u = |s: &str| StoreUrl::parse(s).unwrap();
        assert_eq!(MetaInit::from_url(&u("dir:/x")).unwrap(), MetaInit::Auto);
        assert_eq!(
            MetaInit::from_url(&u("dir:/x?init=adopt")).unwrap(),
            MetaInit::Adopt
        );
        assert_eq!(
            MetaInit::from_url(&u("dir:/x?init=force")).unwrap(),
            MetaInit::Force
        );
        let e = MetaInit::from_url(&u("dir:/x?init=yes")).unwrap_err();
        assert!(e.to_string().contains("init"), "{e}");
    }

    /// Found by `parse_never_panics_textish`: a legacy record with an id= line parsed as
    /// version 0 with an identity, which encodes as version 1.
    #[test]
    fn a_legacy_record_with_an_id_is_refused() {
        let s = "chunk=1\nsize=0\nformat=memsync-dir 1\nid=0a000aa00aa0a0aaaaaa0a000a0aaaa0\n";
        let e = StoreMeta::parse(s.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("id="), "{e}");
        let legacy = "format=memsync-dir 1\nsize=4096\nchunk=1024\n";
        let m = StoreMeta::parse(legacy.as_bytes()).unwrap();
        assert_eq!((m.version, m.id), (0, None));
        assert_eq!(StoreMeta::parse(m.encode().as_bytes()).unwrap(), m);
    }

    proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = StoreMeta::parse(&b);
        }

        #[test]
        fn parse_never_panics_textish(s in "(# [a-z]{0,4}\n|format=memsync-(store|dir 1)\n|version=[0-9]{1,3}\n|size=[0-9]{1,21}\n|chunk=[0-9]{1,6}\n|id=[0-9a-f]{30,34}\n|[a-z]{1,4}=[a-z0-9]{0,4}\n){0,10}") {
            if let Ok(m) = StoreMeta::parse(s.as_bytes()) {
                prop_assert_eq!(StoreMeta::parse(m.encode().as_bytes()).unwrap(), m);
            }
        }
    }
}

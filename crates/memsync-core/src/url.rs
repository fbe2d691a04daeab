//! Store URLs, parsed in one place, and the registry that opens them.
//!
//! Grammar: `SCHEME:[//AUTHORITY]PATH[?KEY=VALUE&...]`. Examples: `mem:1G`, `file:/tmp/disk.img`,
//! `file:///tmp/disk.img?size=1G`, `dir:/var/cache/x?size=1G&chunk=64K`,
//! `nbd://127.0.0.1:10809/export`. `%XX` escapes are decoded in the path and in query values.
//! Errors name the part of the URL that is wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::error::{Result, StoreError};
use crate::size::parse_size;
use crate::store::DynStore;

/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 4096;
/// Most query parameters accepted.
pub const MAX_PARAMS: usize = 32;

/// A parsed store URL.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    original: String,
    /// Lower-case scheme, e.g. `file`.
    pub scheme: String,
    /// `host[:port]` after `//`, if the URL has one (may be empty, as in `file:///x`).
    pub authority: Option<String>,
    /// The decoded path (or opaque part, such as `1G` in `mem:1G`).
    pub path: String,
    /// Decoded query parameters in order.
    pub params: Vec<(String, String)>,
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({:?})", self.original)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

fn url_err(url: &str, part: &str, why: impl fmt::Display) -> StoreError {
    StoreError::Config(format!("bad store URL {url:?}: {part}: {why}"))
}

fn percent_decode(url: &str, part: &str, s: &str) -> Result<String> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .ok_or_else(|| url_err(url, part, "truncated %-escape"))?;
            let hex = std::str::from_utf8(hex).map_err(|_| url_err(url, part, "bad %-escape"))?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| url_err(url, part, "bad %-escape"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| url_err(url, part, "escape decodes to invalid UTF-8"))
}

impl StoreUrl {
    /// Parse a store URL. Never panics; errors name the bad part.
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() > MAX_URL_LEN {
            return Err(url_err(
                &s[..64],
                "length",
                format!("longer than {MAX_URL_LEN} bytes"),
            ));
        }
        if s.chars().any(|c| c.is_control()) {
            return Err(url_err(
                s,
                "characters",
                "control characters are not allowed",
            ));
        }
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| url_err(s, "scheme", "missing (e.g. file:, mem:)"))?;
        if scheme.is_empty()
            || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(url_err(
                s,
                "scheme",
                format!("{scheme:?} is not a valid scheme"),
            ));
        }
        if rest.contains('#') {
            return Err(url_err(s, "fragment", "'#' fragments are not allowed"));
        }
        let (hier, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = if let Some(after) = hier.strip_prefix("//") {
            match after.find('/') {
                Some(i) => (Some(after[..i].to_owned()), &after[i..]),
                None => (Some(after.to_owned()), ""),
            }
        } else {
            (None, hier)
        };
        if let Some(a) = &authority
            && a.contains(|c: char| c.is_whitespace() || c == '@')
        {
            return Err(url_err(
                s,
                "host",
                format!("{a:?} is not a valid host[:port]"),
            ));
        }
        let path = percent_decode(s, "path", path)?;
        let mut params = Vec::new();
        if let Some(q) = query {
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                if params.len() == MAX_PARAMS {
                    return Err(url_err(
                        s,
                        "query",
                        format!("more than {MAX_PARAMS} parameters"),
                    ));
                }
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if k.is_empty() {
                    return Err(url_err(
                        s,
                        "query",
                        format!("parameter {pair:?} has no name"),
                    ));
                }
                let k = percent_decode(s, "query", k)?;
                let v = percent_decode(s, &format!("query parameter {k:?}"), v)?;
                params.push((k, v));
            }
        }
        Ok(StoreUrl {
            original: s.to_owned(),
            scheme: scheme.to_ascii_lowercase(),
            authority,
            path,
            params,
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// The last value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter parsed as a size (`64K`, `1G`).
    pub fn size_param(&self, key: &str) -> Result<Option<u64>> {
        match self.param(key) {
            None => Ok(None),
            Some(v) => parse_size(v)
                .map(Some)
                .map_err(|e| self.error(&format!("query parameter {key:?}"), e)),
        }
    }

    /// A query parameter parsed as a duration (`10s`, `500ms`; a plain number is seconds).
    pub fn duration_param(&self, key: &str) -> Result<Option<std::time::Duration>> {
        match self.param(key) {
            None => Ok(None),
            Some(v) => crate::size::parse_duration(v)
                .map(Some)
                .map_err(|e| self.error(&format!("query parameter {key:?}"), e)),
        }
    }

    /// A query parameter parsed as a count from 1 to `max`; `default` when absent.
    pub fn count_param(&self, key: &str, default: usize, max: usize) -> Result<usize> {
        match self.param(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    self.error(
                        &format!("query parameter {key:?}"),
                        format!("{v:?} must be a number from 1 to {max}"),
                    )
                }),
        }
    }

    /// A query parameter parsed as a boolean (`true/false/1/0/yes/no`, empty = true).
    pub fn bool_param(&self, key: &str) -> Result<Option<bool>> {
        match self.param(key) {
            None => Ok(None),
            Some("" | "1" | "true" | "yes" | "on") => Ok(Some(true)),
            Some("0" | "false" | "no" | "off") => Ok(Some(false)),
            Some(v) => Err(self.error(
                &format!("query parameter {key:?}"),
                format!("{v:?} is not a boolean"),
            )),
        }
    }

    /// Fail if the URL has a query parameter not in `known` (catches typos like `chunck=`).
    pub fn ensure_params(&self, known: &[&str]) -> Result<()> {
        for (k, _) in &self.params {
            if !known.contains(&k.as_str()) {
                let hint = if known.is_empty() {
                    "this store takes no parameters".to_owned()
                } else {
                    format!("known parameters: {}", known.join(", "))
                };
                return Err(self.error(
                    &format!("query parameter {k:?}"),
                    format!("unknown; {hint}"),
                ));
            }
        }
        Ok(())
    }

    /// An error about `part` of this URL.
    pub fn error(&self, part: &str, why: impl fmt::Display) -> StoreError {
        url_err(&self.original, part, why)
    }
}

type Opener = Arc<dyn Fn(StoreUrl) -> BoxFuture<'static, Result<DynStore>> + Send + Sync>;

struct Scheme {
    help: &'static str,
    open: Opener,
}

/// Maps URL schemes to functions that open stores. Each store crate registers its schemes;
/// the `memsync` binary builds one registry with everything compiled in.
#[derive(Default, Clone)]
pub struct Registry {
    schemes: BTreeMap<String, Arc<Scheme>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.schemes.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `scheme` (without the colon) with a one-line usage text and an opener.
    pub fn register<F, Fut>(&mut self, scheme: &str, help: &'static str, open: F)
    where
        F: Fn(StoreUrl) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<DynStore>> + Send + 'static,
    {
        let open: Opener = Arc::new(move |u| Box::pin(open(u)));
        self.schemes
            .insert(scheme.to_ascii_lowercase(), Arc::new(Scheme { help, open }));
    }

    /// Registered schemes with their usage text, sorted by scheme.
    pub fn schemes(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.schemes.iter().map(|(k, v)| (k.as_str(), v.help))
    }

    /// Parse `url` and open the store it names.
    pub async fn open(&self, url: &str) -> Result<DynStore> {
        let parsed = StoreUrl::parse(url)?;
        let scheme = self.schemes.get(&parsed.scheme).ok_or_else(|| {
            let known: Vec<_> = self.schemes.keys().map(|k| format!("{k}:")).collect();
            parsed.error(
                "scheme",
                format!(
                    "{:?} is not supported (supported: {})",
                    parsed.scheme,
                    known.join(" ")
                ),
            )
        })?;
        (scheme.open)(parsed).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forms() {
        let u = StoreUrl::parse("mem:1G").unwrap();
        assert_eq!(
            (u.scheme.as_str(), u.authority.as_deref(), u.path.as_str()),
            ("mem", None, "1G")
        );
        let u = StoreUrl::parse("file:///tmp/a%20b.img?size=1G&create").unwrap();
        assert_eq!(u.authority.as_deref(), Some(""));
        assert_eq!(u.path, "/tmp/a b.img");
        assert_eq!(u.size_param("size").unwrap(), Some(1 << 30));
        assert_eq!(u.bool_param("create").unwrap(), Some(true));
        let u = StoreUrl::parse("NBD://127.0.0.1:10809/exp").unwrap();
        assert_eq!(u.scheme, "nbd");
        assert_eq!(u.authority.as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(u.path, "/exp");
        let u = StoreUrl::parse("dir:rel/path?chunk=64K").unwrap();
        assert_eq!(u.path, "rel/path");
    }

    #[test]
    fn errors_name_the_part() {
        let e = StoreUrl::parse("/tmp/x").unwrap_err().to_string();
        assert!(e.contains("scheme"), "{e}");
        let e = StoreUrl::parse("file:/x?size=12Q")
            .unwrap()
            .size_param("size")
            .unwrap_err();
        assert!(e.to_string().contains("\"size\""), "{e}");
        let e = StoreUrl::parse("file:/x%zz").unwrap_err().to_string();
        assert!(e.contains("path"), "{e}");
        let u = StoreUrl::parse("redis://h?conns=0&pipeline=7").unwrap();
        let e = u.count_param("conns", 4, 256).unwrap_err().to_string();
        assert!(e.contains("\"conns\"") && e.contains("1 to 256"), "{e}");
        assert_eq!(u.count_param("pipeline", 32, 4096).unwrap(), 7);
        assert_eq!(u.count_param("absent", 32, 4096).unwrap(), 32);
        let big = StoreUrl::parse("x:y?n=99999999999999999999999").unwrap();
        assert!(big.count_param("n", 1, 9).is_err());
        let e = StoreUrl::parse("dir:/x?chunck=4K")
            .unwrap()
            .ensure_params(&["chunk"])
            .unwrap_err();
        assert!(e.to_string().contains("chunck"), "{e}");
        assert!(StoreUrl::parse("1ab:x").is_err());
        assert!(StoreUrl::parse("file:/x#frag").is_err());
        assert!(StoreUrl::parse(&"a:".repeat(3000)).is_err());
    }

    #[tokio::test]
    async fn unknown_scheme_lists_known() {
        let mut r = Registry::new();
        r.register("mem", "mem:SIZE", |u: StoreUrl| async move {
            Err(u.error("x", "y"))
        });
        let e = r.open("s4://bucket").await.unwrap_err().to_string();
        assert!(
            e.contains("\"s4\" is not supported") && e.contains("mem:"),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = StoreUrl::parse(&s);
        }

        #[test]
        fn parse_never_panics_urlish(s in "[a-z]{1,5}:(//[a-z0-9.:]{0,12})?[/a-z%0-9]{0,12}(\\?[a-z=&%0-9]{0,16})?") {
            if let Ok(u) = StoreUrl::parse(&s) {
                let _ = u.size_param("size");
                let _ = u.bool_param("create");
            }
        }
    }
}

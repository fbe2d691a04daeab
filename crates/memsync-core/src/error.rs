//! The one error type every store and layer returns.

use std::io;

/// Result alias used throughout memsync stores.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed.
///
/// Variants keep their cause (`source`) so that a failure deep in a stack of layers still says
/// what went wrong at the bottom. `errno()` maps each variant to the errno a protocol frontend
/// (NBD, FUSE) should report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The request reaches past the end of the store.
    #[error("range {offset}+{len} is outside the store (size {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },

    /// The request is not aligned to the store's required block size.
    #[error("range {offset}+{len} is not aligned to the required block size {align}")]
    Misaligned { offset: u64, len: u64, align: u64 },

    /// A write-type request was sent to a read-only store.
    #[error("the store is read-only")]
    ReadOnly,

    /// The store does not implement this optional operation.
    #[error("{op} is not supported by this store")]
    Unsupported { op: &'static str },

    /// An operating-system I/O call failed.
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// A fault-injection layer failed the call on purpose (tests only).
    #[error("injected fault in {op}")]
    Injected { op: &'static str },

    /// The operation did not finish before its deadline.
    #[error("{op} timed out after {after_ms} ms")]
    Timeout { op: &'static str, after_ms: u64 },

    /// A layer wraps an error from the store below it with context.
    #[error("{context}")]
    Layer {
        context: String,
        #[source]
        source: Box<StoreError>,
    },

    /// A remote or backend-specific failure, with its cause.
    #[error("{message}")]
    Backend {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

    /// Bad configuration (for example a malformed store URL).
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// Wrap an `io::Error` with the name of the operation that failed.
    pub fn io(op: &'static str, source: io::Error) -> Self {
        StoreError::Io { op, source }
    }

    /// A backend error with a message and no further cause.
    pub fn backend(message: impl Into<String>) -> Self {
        StoreError::Backend {
            message: message.into(),
            source: None,
        }
    }

    /// A backend error with a message and its cause.
    pub fn backend_with(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// Add context while keeping this error as the cause.
    pub fn context(self, context: impl Into<String>) -> Self {
        StoreError::Layer {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The innermost error of a chain of [`StoreError::Layer`] wrappers.
    pub fn root(&self) -> &StoreError {
        match self {
            StoreError::Layer { source, .. } => source.root(),
            other => other,
        }
    }

    /// Whether retrying cannot help: the request itself is wrong (bounds,
    /// alignment, a write to a read-only store, an operation the store does
    /// not have, bad configuration), whatever layers wrap it. Everything
    /// else (I/O, timeouts, a backend's failure, injected faults) may pass,
    /// and the layers that retry ([`crate::retry`]) try again until their
    /// deadline.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.root(),
            StoreError::OutOfRange { .. }
                | StoreError::Misaligned { .. }
                | StoreError::ReadOnly
                | StoreError::Unsupported { .. }
                | StoreError::Config(_)
        )
    }

    /// The errno a block or file protocol should report for this error.
    pub fn errno(&self) -> i32 {
        const EIO: i32 = 5;
        const EPERM: i32 = 1;
        const EINVAL: i32 = 22;
        const ENOSPC: i32 = 28;
        const EOPNOTSUPP: i32 = 95;
        const ETIMEDOUT: i32 = 110;
        match self {
            StoreError::OutOfRange { .. } => ENOSPC,
            StoreError::Misaligned { .. } | StoreError::Config(_) => EINVAL,
            StoreError::ReadOnly => EPERM,
            StoreError::Unsupported { .. } => EOPNOTSUPP,
            StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(EIO),
            StoreError::Timeout { .. } => ETIMEDOUT,
            StoreError::Layer { source, .. } => source.errno(),
            StoreError::Injected { .. } | StoreError::Backend { .. } => EIO,
        }
    }

    /// The error and all its causes on one line, joined by ": ".
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            let s = e.to_string();
            if !out.ends_with(&s) {
                out.push_str(": ");
                out.push_str(&s);
            }
            cur = e.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_keeps_every_cause() {
        let e = StoreError::io("pread", io::Error::from_raw_os_error(5))
            .context("chunk 3 of dir:/x")
            .context("cache fill");
        let s = e.chain();
        assert!(
            s.starts_with("cache fill: chunk 3 of dir:/x: pread failed"),
            "{s}"
        );
        assert_eq!(e.errno(), 5);
        assert!(matches!(e.root(), StoreError::Io { op: "pread", .. }));
    }

    #[test]
    fn permanent_through_layers() {
        assert!(
            StoreError::ReadOnly
                .context("a")
                .context("b")
                .is_permanent()
        );
        assert!(StoreError::Config("x".into()).is_permanent());
        assert!(!StoreError::backend("reset").context("a").is_permanent());
        assert!(
            !StoreError::Timeout {
                op: "read",
                after_ms: 1
            }
            .is_permanent()
        );
        assert!(!StoreError::Injected { op: "read" }.is_permanent());
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(StoreError::ReadOnly.errno(), 1);
        assert_eq!(
            StoreError::OutOfRange {
                offset: 0,
                len: 1,
                size: 0
            }
            .errno(),
            28
        );
        assert_eq!(StoreError::Unsupported { op: "trim" }.errno(), 95);
    }
}

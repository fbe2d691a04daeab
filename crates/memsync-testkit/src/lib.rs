//! Test support shared by every memsync store and layer crate.
//!
//! The heart is the [`contract`] suite: one call checks that a [`Store`](memsync_core::Store)
//! keeps the trait's contract (data round-trips byte for byte against a shadow model, bounds,
//! chunk boundaries, trim/write-zeroes/extents, concurrency, flush, read-only rejection).
//!
//! ```
//! use memsync_testkit::contract::{self, ContractOpts};
//! # async fn demo(store: memsync_core::DynStore) {
//! // In an integration test, inside a multi-threaded tokio runtime:
//! contract::run(store, ContractOpts::default()).await;
//! # }
//! ```

pub mod child;
pub mod contract;
pub mod failfs;
pub mod hugepages;
pub mod nbd;
pub mod netns;
pub mod proxy;
pub mod servers;
pub mod skip;
pub mod uffd;
pub mod vm;

pub use contract::{ContractOpts, Failure, Report};

use memsync_core::{Bytes, StoreError};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// `len` pseudo-random bytes determined by `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    Bytes::from(v)
}

/// Panic unless `err`'s full chain ([`StoreError::chain`]) contains every string of `parts`, in
/// order. Use it to check that an error names what failed and keeps its cause.
#[track_caller]
pub fn assert_error_chain(err: &StoreError, parts: &[&str]) {
    let chain = err.chain();
    let mut rest = chain.as_str();
    for part in parts {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => panic!("error chain {chain:?} lacks {part:?} (expected, in order: {parts:?})"),
        }
    }
}

/// Panic unless the innermost error of `result` (below any layer context) matches `pred`.
/// Returns the error for further checks.
#[track_caller]
pub fn assert_root_err<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    what: &str,
    pred: impl FnOnce(&StoreError) -> bool,
) -> StoreError {
    match result {
        Ok(v) => panic!("expected {what}, got Ok({v:?})"),
        Err(e) if pred(e.root()) => e,
        Err(e) => panic!("expected {what}, got {}", e.chain()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_deterministic() {
        assert_eq!(random_bytes(7, 100), random_bytes(7, 100));
        assert_ne!(random_bytes(7, 100), random_bytes(8, 100));
        assert_eq!(random_bytes(1, 0).len(), 0);
    }

    #[test]
    fn error_chain_helper() {
        let e = StoreError::io("pread", std::io::Error::from_raw_os_error(5)).context("chunk 3");
        assert_error_chain(&e, &["chunk 3", "pread failed"]);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_error_chain(&e, &["pread", "chunk 3"])
        }));
        assert!(r.is_err(), "order matters");
        assert_root_err::<()>(Err(e), "an I/O error", |e| {
            matches!(e, StoreError::Io { .. })
        });
    }
}

//! A store's metadata record is read back from a directory, a Redis key or an S3 object, which
//! anyone with access may have changed: parsing must never panic, must enforce its length
//! limit, and whatever it accepts must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memsync_core::StoreMeta;
use memsync_core::meta::MAX_META_LEN;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = StoreMeta::parse(data) {
        assert!(data.len() <= MAX_META_LEN);
        let text = m.encode();
        assert!(text.len() <= MAX_META_LEN);
        assert_eq!(StoreMeta::parse(text.as_bytes()).unwrap(), m);
        m.check(Some(m.size), Some(m.chunk_size)).unwrap();
        m.check(Some(m.size ^ 1), None).unwrap_err();
    }
});

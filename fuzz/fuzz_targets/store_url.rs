//! Store URLs come from users and config files: parsing must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memsync_core::StoreUrl;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = StoreUrl::parse(s) {
            let _ = u.size_param("size");
            let _ = u.size_param("chunk");
            let _ = u.bool_param("readonly");
            let _ = u.ensure_params(&["size", "chunk"]);
            assert!(u.as_str().len() <= memsync_core::url::MAX_URL_LEN);
            assert!(u.params.len() <= memsync_core::url::MAX_PARAMS);
        }
    }
});

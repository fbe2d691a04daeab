//! Store URLs come from users and config files: parsing must never panic, nor redacting.
//!
//! libFuzzer caps inputs at 4 KiB by default (`-max_len`), exactly `MAX_URL_LEN`, which hid the
//! panic on an over-long URL cut inside a character. So an input whose first byte is odd is
//! repeated past the limit, and the README runs this target with `-max_len=16384`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memsync_core::StoreUrl;
use memsync_core::url::{MAX_PARAMS, MAX_URL_LEN, redact};

fuzz_target!(|data: &[u8]| {
    let Some((&stretch, data)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut url = s.to_owned();
    if stretch & 1 == 1 && !s.is_empty() {
        while url.len() <= MAX_URL_LEN {
            url.push_str(s);
        }
    }
    let _ = redact(&url);
    match StoreUrl::parse(&url) {
        Ok(u) => {
            let _ = u.size_param("size");
            let _ = u.size_param("chunk");
            let _ = u.bool_param("readonly");
            let _ = u.ensure_params(&["size", "chunk"]);
            let _ = memsync_core::MetaInit::from_url(&u);
            let _ = u.to_string();
            assert!(u.as_str().len() <= MAX_URL_LEN);
            assert!(u.params.len() <= MAX_PARAMS);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

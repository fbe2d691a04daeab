//! Sizes and durations come from the command line and URLs: parsing must never panic or wrap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = memsync_core::size::parse_size(s);
        let _ = memsync_core::size::parse_duration(s);
    }
});

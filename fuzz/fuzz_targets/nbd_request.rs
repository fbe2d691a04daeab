//! Request headers, compact and extended: never a panic; what parses round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use memsync_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    for ext in [false, true] {
        if let Ok(r) = parse_request(data, ext) {
            let mut b = bytes::BytesMut::new();
            encode_request(&mut b, &r, ext);
            assert_eq!(parse_request(&b, ext).unwrap(), r);
        }
    }
});

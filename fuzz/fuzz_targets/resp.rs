//! The RESP2/RESP3 parser of memsync-redis on arbitrary bytes: it must never panic, and
//! `scan` and `decode` must agree with `parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memsync_redis::resp;

fuzz_target!(|data: &[u8]| {
    match resp::scan(data) {
        Ok(resp::Scan::Complete(n)) => {
            assert!(n <= data.len());
            let frame = bytes::Bytes::copy_from_slice(&data[..n]);
            assert!(resp::decode(&frame).is_ok());
        }
        Ok(resp::Scan::Incomplete(need)) => assert!(need > data.len()),
        Err(_) => {}
    }
    let _ = resp::parse(data);
});

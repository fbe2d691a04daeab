//! Sync protocol frames and the persisted digest index: never a panic; what parses round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use memsync_sync::{index, proto};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = memsync_core::wire::frame_len(data[..4].try_into().unwrap(), proto::MAX_FRAME);
    }
    if let Ok(m) = proto::Msg::decode(bytes::Bytes::copy_from_slice(data)) {
        let f = m.encode();
        assert_eq!(proto::Msg::decode(f.slice(4..)).unwrap(), m);
    }
    if let Ok(d) = index::parse(data) {
        assert_eq!(index::encode(&d), data);
    }
});

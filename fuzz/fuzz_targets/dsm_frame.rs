//! DSM protocol frames: a frame body and a stream of frames never panic; what parses encodes
//! back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use memsync_dsm::proto::{self, Msg};

fuzz_target!(|data: &[u8]| {
    let b = bytes::Bytes::copy_from_slice(data);
    if let Ok(m) = Msg::decode(b.clone()) {
        assert_eq!(&m.encode()[4..], data);
    }
    let (msgs, _) = proto::decode_stream(b);
    for m in msgs {
        assert_eq!(Msg::decode(m.encode().slice(4..)).unwrap(), m);
    }
});

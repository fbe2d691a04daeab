//! Migration protocol frames: a frame body and a stream of frames never panic; what parses
//! encodes back to the same bytes; bitmap segments apply to a chunk set without panicking; an
//! LZ4 chunk decompresses (or is refused) without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use memsync_migrate::proto::{self, Msg};
use memsync_migrate::set::ChunkSet;

fuzz_target!(|data: &[u8]| {
    let b = bytes::Bytes::copy_from_slice(data);
    if let Ok(m) = Msg::decode(b.clone()) {
        assert_eq!(&m.encode()[4..], data);
        if let Msg::Dirty(s) | Msg::Held(s) = &m {
            let mut set = ChunkSet::new(1 << 12);
            let _ = set.apply(s);
        }
        if let Msg::ChunkLz4 { data, .. } = &m {
            for len in [4096, data.len(), data.len() * 3] {
                if let Ok(d) = proto::decompress_chunk(data, len) {
                    assert_eq!(d.len(), len);
                }
            }
        }
    }
    let (msgs, _) = proto::decode_stream(b);
    for m in msgs {
        assert_eq!(Msg::decode(m.encode().slice(4..)).unwrap(), m);
    }
});

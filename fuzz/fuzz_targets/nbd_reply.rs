//! Reply headers and structured reply payloads as the client parses them: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use memsync_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    let _ = parse_reply_header(data);
    if data.len() >= 2 {
        let typ = u16::from_be_bytes([data[0], data[1]]);
        let p = &data[2..];
        let _ = parse_error_chunk(typ, p);
        let _ = parse_offset_hole(p);
        let _ = parse_block_status(p, false);
        let _ = parse_block_status(p, true);
    }
});

//! Option requests and option replies as a server and client parse them: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use memsync_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_option_header(data) {
        let rest = data.get(OPTION_HEADER_LEN..).unwrap_or(&[]);
        if let Ok(opt) = parse_option(h.option, rest) {
            // What parses must encode back to the same option.
            let mut b = bytes::BytesMut::new();
            encode_opt(&mut b, &opt);
            let h2 = parse_option_header(&b).unwrap();
            assert_eq!(parse_option(h2.option, &b[OPTION_HEADER_LEN..]).unwrap(), opt);
        }
    }
    if data.len() >= 2 {
        let option = u32::from(data[0]) % 16;
        let _ = parse_option(option, &data[1..]);
    }
    let _ = parse_opt_reply_header(data);
    let _ = parse_info(data);
    let _ = parse_rep_server(data);
    let _ = parse_rep_meta_context(data);
});

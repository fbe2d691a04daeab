//! The VMM handshakes: Firecracker's JSON regions and Cloud Hypervisor's migration config and
//! frames never panic; accepted regions hold the documented invariants.
#![no_main]
use libfuzzer_sys::fuzz_target;
use memsync_vmm::{ch, firecracker};

fuzz_target!(|data: &[u8]| {
    if let Ok(regions) = firecracker::parse_regions(data) {
        assert!(!regions.is_empty() && regions.len() <= firecracker::MAX_REGIONS);
        let total: u64 = regions.iter().map(|r| r.size).sum();
        let mut offs: Vec<_> = regions.iter().map(|r| (r.offset, r.size)).collect();
        offs.sort_unstable();
        let mut next = 0;
        for (o, s) in offs {
            assert_eq!(o, next);
            assert!(s > 0 && s % regions[0].page_size == 0);
            next += s;
        }
        assert_eq!(next, total);
    }
    if let Ok(slots) = ch::parse_slots(data) {
        let mut off = 0;
        for s in &slots {
            assert_eq!(s.store_offset, off);
            off += s.size;
        }
    }
    if let Ok(b) = <&[u8; 16]>::try_from(data.get(..16).unwrap_or(&[])) {
        let (code, h, len) = ch::parse_frame(b);
        assert_eq!(&ch::frame(code, h, len), b);
    }
});

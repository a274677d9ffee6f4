//! The write-ahead log check (`keel_storage::wal_check`) on arbitrary bytes:
//! a node reads its log files before it opens them, whatever a crash or a
//! damaged disk left in them, so nothing in them may make the check panic.
//!
//! The first four input bytes are the file's number (little-endian), the
//! rest is the file. Whatever the scan reports must be consistent: the end
//! lies inside the file, a record found after the end lies after it, and
//! the same bytes scan the same way twice.

#![no_main]

use keel_storage::wal_check;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let number = u32::from_le_bytes(data[..4].try_into().unwrap()) as u64;
    let file = &data[4..];
    let s = wal_check::scan(file, number);
    assert!(s.end_at <= file.len(), "{s:?}");
    if let Some(at) = s.own_after_end {
        assert!(at > s.end_at && at < file.len(), "{s:?}");
    }
    if s.end == wal_check::End::Eof {
        assert_eq!(s.end_at, file.len(), "{s:?}");
        assert!(s.own_after_end.is_none() && !s.end_is_own, "{s:?}");
    }
    assert_eq!(wal_check::scan(file, number), s, "the scan is not deterministic");
});

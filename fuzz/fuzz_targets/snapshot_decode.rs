//! The snapshot file decoder (`keel_storage::snapshot::format`) on arbitrary
//! bytes: a node reads snapshot files that arrive from peers and that sit on
//! disk, so nothing in them may make it panic, hang or allocate without
//! bound, and its two decoders must agree.
//!
//! - `SnapshotReader` (install, `keel snapshot inspect`/`restore`) reads the
//!   input as a file and yields every record;
//! - `StreamVerifier` (the receiving side of a transfer, `verify_file`) is fed
//!   the same bytes in slices whose sizes the input chooses.
//!
//! Both must accept exactly the same inputs, with the same header and
//! totals; the verifier's resume offset must always be a prefix of what it
//! was fed; a rejected stream resumed from that offset must be accepted when
//! the rest is valid (checked on the input's own accepted prefix).

#![no_main]

use keel_storage::snapshot::format::SnapshotError;
use keel_storage::snapshot::format::SnapshotHeader;
use keel_storage::snapshot::format::SnapshotReader;
use keel_storage::snapshot::format::SnapshotSummary;
use keel_storage::snapshot::format::StreamVerifier;
use libfuzzer_sys::fuzz_target;

fn read(data: &[u8]) -> Result<(SnapshotHeader, SnapshotSummary, u64), SnapshotError> {
    let mut r = SnapshotReader::new(data)?;
    let mut records = 0u64;
    while r.next_record()?.is_some() {
        records += 1;
    }
    let summary = r.summary().expect("a reader that reached the end has totals");
    Ok((r.header().clone(), summary, records))
}

fuzz_target!(|data: &[u8]| {
    let read = read(data);

    let mut v = StreamVerifier::new();
    let (mut fed, mut step) = (0usize, 1 + data.first().map_or(0, |b| *b as usize % 61));
    let mut verdict = Ok(());
    while fed < data.len() {
        let n = step.min(data.len() - fed);
        let before = v.verified_len();
        let res = v.feed(&data[fed..fed + n]);
        fed += n;
        assert!(v.verified_len() as usize <= fed, "verified beyond what was fed");
        assert!(v.verified_len() >= before, "the verified length went backwards");
        if let Err(e) = res {
            verdict = Err(e);
            break;
        }
        step = step * 7 % 4093 + 1;
    }
    let complete = verdict.is_ok() && v.is_complete();

    match &read {
        Ok((header, summary, records)) => {
            assert!(complete, "the reader accepted what the verifier did not: {verdict:?}");
            assert_eq!(v.header(), Some(header));
            assert_eq!(v.summary(), Some(*summary));
            assert_eq!(summary.file_bytes, data.len() as u64);
            assert_eq!(summary.records, *records);
        }
        Err(e) => assert!(!complete, "the verifier accepted what the reader refused ({e})"),
    }

    // Resuming: the verified prefix, fed again to a fresh verifier, verifies
    // to the same offset (what a receiver does after a cut transfer).
    let prefix = v.verified_len() as usize;
    let mut again = StreamVerifier::new();
    again.feed(&data[..prefix]).expect("a verified prefix verifies again");
    assert_eq!(again.verified_len() as usize, prefix);
});

//! A check of the log database's write-ahead log files, run before RocksDB
//! opens them.
//!
//! The log reuses ("recycles") old write-ahead log files instead of
//! creating new ones: an overwrite inside a file's existing size is synced
//! without a second write for the file's size (an overwrite's fdatasync
//! took 0.074 ms on the benchmark machine, an append's 0.163;
//! bench/README.md, change 28). A recycled file holds the new records, then
//! whatever the file held before. RocksDB tells the two apart by the file
//! number that every recyclable record carries under its checksum, and it
//! only allows recycling in point-in-time recovery, which ends the replay
//! at the first record it cannot read. That is right for a record torn by a
//! crash, and wrong for a record damaged later: the replay would end there
//! silently, and every entry and vote after it would be gone. This module
//! finds that case first and refuses to open the log.
//!
//! The rules, for each file `NNNNNN.log` in the directory:
//! 1. From the start, records are read while they are whole, pass their
//!    checksum and carry this file's number. The first one that does not is
//!    where the file's own data ends.
//! 2. If any record of this file (checksum good, this file's number) comes
//!    after that point, the data ended at damage, not at its real end:
//!    refused. Looked for at every later block start (each block begins
//!    with a record) and right after the failing record, when its length
//!    fits its block.
//! 3. If the end is a record that carries this file's number but fails its
//!    checksum or is cut short, and a later file holds records, the end is
//!    damage too (a crash cuts short only the file being written): refused.
//!
//! What the rules cannot see: damage to the newest file's last record (the
//! last write before the node stopped; any later record of the file would
//! expose it) looks exactly like a write that a crash cut short, and is
//! dropped like one (see ARCHITECTURE.md).
//!
//! A torn end that passes ([`Report::torn`]) is cut off the file before
//! RocksDB opens it ([`cut_torn_tail`]), so that a file that reappears
//! after a power loss, next to newer files, does not read as damage under
//! rule 3.
//!
//! The record format is RocksDB's (`db/log_format.h`): 32 KiB blocks; each
//! physical record is a masked CRC-32C (4 bytes), a length (2), a type (1),
//! for recyclable types the low 32 bits of the file's number (4), then the
//! payload; the checksum covers the type, the number and the payload. A
//! block's last bytes, too few for a header, are padding.

use std::fmt;
use std::io;
use std::path::Path;
use std::path::PathBuf;

const BLOCK: usize = 32 * 1024;
const HEADER: usize = 7;
const RECYCLABLE_HEADER: usize = 11;

/// Record types whose header carries the file's number.
fn recyclable(t: u8) -> bool {
    matches!(t, 5..=8 | 11 | 131)
}

/// Record types of the legacy header (no file number).
fn legacy(t: u8) -> bool {
    matches!(t, 1..=4 | 9 | 10 | 130)
}

/// Why a file's own data ended where it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The end of the file, at a record boundary.
    Eof,
    /// A whole record, checksum good, of an earlier use of the file.
    Stale,
    /// Anything else: a cut-short or failing record, zeroes, garbage.
    Unreadable(Flaw),
}

/// What was wrong with the record where a file's data ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flaw {
    /// The file ends inside the record.
    CutShort,
    /// The record's length runs past its block.
    BadLength,
    /// The record fails its checksum.
    Checksum,
    /// The header is zeroes.
    Zeroes,
    /// The record type is unknown.
    UnknownType,
}

impl fmt::Display for Flaw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flaw::CutShort => "is cut short",
            Flaw::BadLength => "has a length that runs past its block",
            Flaw::Checksum => "fails its checksum",
            Flaw::Zeroes => "is zeroes",
            Flaw::UnknownType => "has an unknown type",
        })
    }
}

/// One file, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileScan {
    /// Records of this file read before its data ended.
    pub records: u64,
    /// Where the data ended (the file's length at [`End::Eof`]).
    pub end_at: usize,
    /// Why.
    pub end: End,
    /// The record at the end carries this file's number (a record of this
    /// file, damaged or cut short, not an earlier use's leftovers).
    pub end_is_own: bool,
    /// A record of this file after the end, if any: damage (rule 2).
    pub own_after_end: Option<usize>,
    /// Whether the file holds records of an earlier use (it was recycled).
    pub recycled: bool,
}

/// What [`check_dir`] found in a directory whose files passed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Write-ahead log files read.
    pub files: usize,
    /// Of them, files that hold an earlier use's records after their own.
    pub recycled: usize,
    /// Records read in all files.
    pub records: u64,
    /// Files whose data ends at a record of their own that is cut short or
    /// fails its checksum, with no newer file holding records: a write that
    /// a crash cut short. Each with the byte where its data ends, for
    /// [`cut_torn_tail`].
    pub torn: Vec<(PathBuf, usize)>,
}

/// A physical record's header and where its payload lies.
struct Header {
    kind: u8,
    size: usize,
    len: usize,
    own: bool,
}

enum Parsed {
    /// A good record of this file; the next one starts at the offset.
    Own(usize),
    /// A good record of an earlier use of the file.
    Stale,
    /// Padding to the end of the block; the next record starts there.
    Padding(usize),
    Eof,
    Bad(Flaw, Option<Header>),
}

/// Reads the record at `pos`, in a file whose recyclable records carry
/// `number`. `legacy_own` says whether legacy records belong to this file
/// (a file written without recycling) or to an earlier use.
fn parse(bytes: &[u8], pos: usize, number: u32, legacy_own: bool) -> Parsed {
    if pos >= bytes.len() {
        return Parsed::Eof;
    }
    let block_left = BLOCK - pos % BLOCK;
    if block_left < HEADER {
        return Parsed::Padding(pos + block_left);
    }
    let rest = &bytes[pos..bytes.len().min(pos + block_left)];
    if rest.len() < HEADER {
        return Parsed::Bad(Flaw::CutShort, None);
    }
    let kind = rest[6];
    if kind == 0 {
        // A recycling writer pads a block's last 7-10 bytes with zeroes.
        if block_left < RECYCLABLE_HEADER && rest.iter().all(|&b| b == 0) {
            return Parsed::Padding(pos + block_left);
        }
        return Parsed::Bad(Flaw::Zeroes, None);
    }
    let size = if recyclable(kind) { RECYCLABLE_HEADER } else { HEADER };
    if rest.len() < size {
        return Parsed::Bad(Flaw::CutShort, None);
    }
    let len = u16::from_le_bytes([rest[4], rest[5]]) as usize;
    let own = if recyclable(kind) {
        u32::from_le_bytes(rest[7..11].try_into().expect("4 bytes")) == number
    } else {
        legacy_own
    };
    let h = Header { kind, size, len, own };
    if !recyclable(kind) && !legacy(kind) {
        return Parsed::Bad(Flaw::UnknownType, Some(h));
    }
    if size + len > block_left {
        return Parsed::Bad(Flaw::BadLength, Some(h));
    }
    if size + len > rest.len() {
        return Parsed::Bad(Flaw::CutShort, Some(h));
    }
    let stored = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
    let crc = crc32c::extend(crc32c::extend(0, &[kind]), &rest[7..size + len]);
    if unmask(stored) != crc {
        return Parsed::Bad(Flaw::Checksum, Some(h));
    }
    if h.own {
        Parsed::Own(pos + size + len)
    } else {
        Parsed::Stale
    }
}

/// RocksDB stores a checksum rotated and offset ("masked").
const MASK_DELTA: u32 = 0xa282_ead8;

fn unmask(masked: u32) -> u32 {
    masked.wrapping_sub(MASK_DELTA).rotate_left(15)
}

#[cfg(any(test, feature = "wal-writer"))]
fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// Reads one write-ahead log file (its bytes and its number).
pub fn scan(bytes: &[u8], number: u64) -> FileScan {
    let number = number as u32;
    // A file written without recycling has legacy records only; a recycling
    // writer uses recyclable types for data, so legacy records in its files
    // are an earlier use's.
    let legacy_own = bytes.len() > 6 && legacy(bytes[6]);
    let mut pos = 0;
    let mut records = 0;
    let (end, end_is_own, resume) = loop {
        match parse(bytes, pos, number, legacy_own) {
            Parsed::Own(next) => {
                records += 1;
                pos = next;
            }
            Parsed::Padding(next) => pos = next,
            Parsed::Eof => break (End::Eof, false, None),
            Parsed::Stale => break (End::Stale, false, None),
            Parsed::Bad(flaw, h) => {
                let own = h.as_ref().is_some_and(|h| h.own && recyclable(h.kind));
                // A failing record whose length fits its block: the next
                // record of the block may follow it.
                let resume = h.and_then(|h| {
                    let next = pos + h.size + h.len;
                    (h.size + h.len <= BLOCK - pos % BLOCK).then_some(next)
                });
                break (End::Unreadable(flaw), own, resume);
            }
        }
    };
    let end_at = pos.min(bytes.len());
    let mut own_after_end = None;
    let mut recycled = end == End::Stale;
    if end != End::Eof {
        let first_block = end_at / BLOCK + 1;
        let starts = resume
            .into_iter()
            .chain((first_block..).map(|b| b * BLOCK).take_while(|&p| p < bytes.len()));
        // Each block starts with a record; a failing record whose length
        // fits its block is followed by the next one.
        for start in starts {
            match parse(bytes, start, number, legacy_own) {
                Parsed::Own(_) => {
                    own_after_end = Some(start);
                    break;
                }
                Parsed::Stale => recycled = true,
                Parsed::Padding(_) | Parsed::Eof | Parsed::Bad(..) => {}
            }
        }
    }
    FileScan {
        records,
        end_at,
        end,
        end_is_own,
        own_after_end,
        recycled,
    }
}

/// The number of a write-ahead log file (`000123.log` is 123).
fn wal_number(path: &Path) -> Option<u64> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".log")?;
    if stem.is_empty() || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The write-ahead log files in `dir` with their numbers, oldest first; none
/// for a directory that does not exist yet.
pub fn wal_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files: Vec<(u64, PathBuf)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| wal_number(&p).map(|n| (n, p)))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    files.sort();
    Ok(files)
}

/// Checks every write-ahead log file in `dir` (rules in the module docs).
/// Damage is an error of kind `InvalidData` that names the file and the
/// offsets; a directory that does not exist yet holds no damage.
pub fn check_dir(dir: &Path) -> io::Result<Report> {
    let files = wal_files(dir)?;
    let mut report = Report::default();
    // Newest first, so that each file knows whether a later one holds records.
    let mut later_has_records = false;
    for (n, path) in files.iter().rev() {
        let s = scan(&std::fs::read(path)?, *n);
        if let Some(at) = s.own_after_end {
            return Err(damage(
                path,
                &s,
                &format!("a record of the same file follows at byte {at}"),
            ));
        }
        if s.end_is_own && later_has_records {
            return Err(damage(path, &s, "a newer log file holds records"));
        }
        if s.end_is_own {
            report.torn.push((path.clone(), s.end_at));
        }
        later_has_records |= s.records > 0;
        report.files += 1;
        report.recycled += usize::from(s.recycled);
        report.records += s.records;
    }
    Ok(report)
}

/// Cuts a file whose data ends at a torn record ([`Report::torn`]) at that
/// record, durably, before RocksDB replays it.
///
/// The replay ends at the torn record anyway, and the node then writes to
/// newer files. Left in place, the torn record would be read as damage
/// (rule 3) by every later check for as long as the file exists: RocksDB
/// deletes or reuses the file once the memtables it fed are flushed, but
/// that deletion is not synced to the directory, so a power loss can bring
/// the file back next to newer files with records, and the node would
/// refuse to start. Cut, the file ends cleanly where its data does. Only
/// bytes at and after the torn record go, which no replay reads: rule 2
/// already found no record of the file after it.
pub fn cut_torn_tail(path: &Path, at: usize) -> io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(at as u64)?;
    f.sync_all()
}

fn damage(path: &Path, s: &FileScan, after: &str) -> io::Error {
    let what = match s.end {
        End::Unreadable(flaw) => flaw.to_string(),
        End::Stale => "belongs to an earlier use of the file".into(),
        End::Eof => "ends the file".into(),
    };
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "corrupt write-ahead log {}: the record at byte {} {what}, but {after}; \
             replaying it would silently drop the log entries after that point, so the \
             log is not opened (replace this node: remove it from the cluster, empty its \
             data directory, add it again)",
            path.display(),
            s.end_at
        ),
    )
}

/// CRC-32C (Castagnoli), the checksum of RocksDB's log records.
mod crc32c {
    const POLY: u32 = 0x82f6_3b78;

    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };

    /// Extends the checksum `crc` (0 for none yet) with `data`.
    pub fn extend(crc: u32, data: &[u8]) -> u32 {
        let mut c = !crc;
        for &b in data {
            c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        !c
    }

    #[cfg(test)]
    #[test]
    fn matches_the_published_check_value() {
        assert_eq!(extend(0, b"123456789"), 0xe306_9283);
        assert_eq!(extend(extend(0, b"1234"), b"56789"), 0xe306_9283);
    }
}

#[cfg(any(test, feature = "wal-writer"))]
/// Writes records the way RocksDB's log writer does, for a file `number`,
/// recyclable or legacy: for tests and the fuzz seeds only (feature
/// `wal-writer`).
pub struct WalWriter {
    /// The file so far.
    pub out: Vec<u8>,
    number: u32,
    recycle: bool,
    /// Physical records written (fragments count one each).
    pub records: u64,
}

#[cfg(any(test, feature = "wal-writer"))]
impl WalWriter {
    /// A file `number`; `recycle` picks the recyclable record types.
    pub fn new(number: u32, recycle: bool) -> Self {
        Self {
            out: Vec::new(),
            number,
            recycle,
            records: 0,
        }
    }

    /// One logical record, split into fragments at block ends; returns
    /// where its first fragment starts.
    pub fn add(&mut self, mut payload: &[u8]) -> usize {
        let size = if self.recycle { RECYCLABLE_HEADER } else { HEADER };
        let mut first = true;
        let mut at = self.out.len();
        loop {
            let left = BLOCK - self.out.len() % BLOCK;
            if left < size {
                self.out.extend(std::iter::repeat_n(0, left));
                continue;
            }
            if first {
                at = self.out.len();
            }
            let n = payload.len().min(left - size);
            let last = n == payload.len();
            let t = match (first, last) {
                (true, true) => 1,
                (true, false) => 2,
                (false, false) => 3,
                (false, true) => 4,
            } + if self.recycle { 4 } else { 0 };
            self.physical(t, &payload[..n]);
            payload = &payload[n..];
            first = false;
            if last {
                return at;
            }
        }
    }

    fn physical(&mut self, t: u8, data: &[u8]) {
        let mut crc = crc32c::extend(0, &[t]);
        let mut head = Vec::new();
        head.extend((data.len() as u16).to_le_bytes());
        head.push(t);
        if recyclable(t) {
            crc = crc32c::extend(crc, &self.number.to_le_bytes());
            head.extend(self.number.to_le_bytes());
        }
        crc = crc32c::extend(crc, data);
        self.out.extend(mask(crc).to_le_bytes());
        self.out.extend(head);
        self.out.extend(data);
        self.records += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i * 31 + k) as u8).collect()
    }

    /// A file `number` that reused an older file: `fresh` new records
    /// written over `stale` records of the old use. Returns the bytes, where
    /// each new record starts, and how many physical records the new use
    /// wrote.
    fn recycled_file(number: u32, fresh: usize, stale: usize) -> (Vec<u8>, Vec<usize>, u64) {
        let mut old = WalWriter::new(number - 3, true);
        for i in 0..stale {
            old.add(&payload(i, 300 + i % 700));
        }
        let mut new = WalWriter::new(number, true);
        let at: Vec<usize> = (0..fresh).map(|i| new.add(&payload(i + 7, 200 + i % 900))).collect();
        let mut bytes = old.out;
        assert!(new.out.len() < bytes.len(), "the new use is shorter than the old");
        bytes[..new.out.len()].copy_from_slice(&new.out);
        (bytes, at, new.records)
    }

    #[test]
    fn a_recycled_file_ends_at_the_earlier_use_without_damage() {
        let (bytes, at, written) = recycled_file(40, 150, 400);
        let s = scan(&bytes, 40);
        assert_eq!(s.records, written);
        assert!(written > at.len() as u64, "some records span a block end");
        assert!(s.recycled);
        assert_eq!(s.own_after_end, None);
        assert!(!s.end_is_own, "{s:?}");
        assert!(matches!(s.end, End::Stale | End::Unreadable(_)), "{s:?}");
    }

    #[test]
    fn a_fresh_file_reads_to_its_end() {
        let mut w = WalWriter::new(9, true);
        for i in 0..50 {
            w.add(&payload(i, 100));
        }
        let s = scan(&w.out, 9);
        assert_eq!((s.records, s.end, s.recycled), (50, End::Eof, false));
        let mut legacy = WalWriter::new(9, false);
        for i in 0..50 {
            legacy.add(&payload(i, 100));
        }
        let s = scan(&legacy.out, 9);
        assert_eq!((s.records, s.end, s.own_after_end), (50, End::Eof, None));
    }

    #[test]
    fn records_longer_than_a_block_are_read_in_fragments() {
        let mut w = WalWriter::new(12, true);
        w.add(&payload(1, 70_000));
        w.add(&payload(2, 10));
        let s = scan(&w.out, 12);
        // 70,000 bytes take three fragments, then one more record.
        assert_eq!((s.records, s.end), (4, End::Eof));
    }

    #[test]
    fn a_flipped_bit_followed_by_records_of_the_file_is_damage() {
        let (mut bytes, at, _) = recycled_file(40, 150, 400);
        // Inside the payload of the 20th record, and inside its header's
        // length, type and number: each is found.
        for offset in [at[20] + 40, at[20] + 4, at[20] + 6, at[20] + 8, at[20]] {
            let keep = bytes[offset];
            bytes[offset] ^= 0x10;
            let s = scan(&bytes, 40);
            assert_eq!(s.end_at, at[20], "flip at {offset}: {s:?}");
            assert!(s.own_after_end.is_some(), "flip at {offset} not found: {s:?}");
            bytes[offset] = keep;
        }
    }

    #[test]
    fn a_cut_short_last_record_is_a_torn_write_not_damage() {
        let (bytes, at, _) = recycled_file(40, 150, 400);
        let last = *at.last().unwrap();
        // The last record's payload overwritten from its 20th byte on with
        // the old bytes: what a crash in the middle of its write leaves.
        let mut torn = bytes.clone();
        let (old, _, _) = recycled_file(40, 0, 400);
        torn[last + 20..].copy_from_slice(&old[last + 20..]);
        let s = scan(&torn, 40);
        assert_eq!(s.end_at, last, "{s:?}");
        assert!(s.end_is_own && s.own_after_end.is_none(), "{s:?}");
        // And a fresh file cut inside its last record.
        let mut w = WalWriter::new(9, true);
        let ats: Vec<usize> = (0..30).map(|i| w.add(&payload(i, 500))).collect();
        let s = scan(&w.out[..ats[29] + 100], 9);
        assert_eq!(
            (s.records, s.end, s.end_is_own),
            (29, End::Unreadable(Flaw::CutShort), true)
        );
        assert_eq!(s.own_after_end, None);
    }

    #[test]
    fn a_zeroed_block_inside_a_legacy_file_is_found() {
        let mut w = WalWriter::new(5, false);
        for i in 0..400 {
            w.add(&payload(i, 400));
        }
        let mut bytes = w.out;
        bytes[BLOCK..2 * BLOCK].fill(0);
        let s = scan(&bytes, 5);
        assert!(s.end_at < 2 * BLOCK && s.own_after_end.is_some(), "{s:?}");
    }

    fn write(dir: &Path, number: u64, bytes: &[u8]) {
        std::fs::write(dir.join(format!("{number:06}.log")), bytes).unwrap();
    }

    #[test]
    fn the_directory_check_names_the_damaged_file() {
        let td = tempfile::tempdir().unwrap();
        let (mut bytes, at, written) = recycled_file(40, 150, 400);
        write(td.path(), 40, &bytes);
        std::fs::write(td.path().join("LOG"), b"not a write-ahead log").unwrap();
        let r = check_dir(td.path()).expect("clean");
        assert_eq!((r.files, r.recycled, r.records), (1, 1, written));
        bytes[at[3] + 30] ^= 1;
        write(td.path(), 40, &bytes);
        let e = check_dir(td.path()).expect_err("damage");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let msg = e.to_string();
        assert!(msg.contains("corrupt") && msg.contains("000040.log"), "{msg}");
        assert!(msg.contains(&format!("byte {}", at[3])), "{msg}");
        assert!(check_dir(&td.path().join("missing")).unwrap() == Report::default());
    }

    #[test]
    fn a_damaged_end_is_damage_once_a_newer_file_holds_records() {
        let td = tempfile::tempdir().unwrap();
        let (bytes, at, _) = recycled_file(40, 150, 400);
        let last = *at.last().unwrap();
        let mut bad = bytes.clone();
        bad[last + 30] ^= 4;
        write(td.path(), 40, &bad);
        // The newest file: a damaged last record reads as a torn write.
        check_dir(td.path()).expect("a torn end of the newest file");
        // With a newer file holding records, it cannot be a torn write.
        let mut newer = WalWriter::new(44, true);
        newer.add(b"next");
        write(td.path(), 44, &newer.out);
        let msg = check_dir(td.path()).expect_err("damage").to_string();
        assert!(msg.contains("newer log file"), "{msg}");
        // An empty newer file (just created) is not evidence.
        write(td.path(), 44, b"");
        check_dir(td.path()).expect("an empty newer file");
        // Nor is a clean end followed by a newer file.
        write(td.path(), 40, &bytes);
        write(td.path(), 44, &newer.out);
        check_dir(td.path()).expect("clean files");
    }

    #[test]
    fn a_torn_end_cut_at_the_start_stays_clean_once_newer_files_hold_records() {
        let td = tempfile::tempdir().unwrap();
        let (bytes, at, written) = recycled_file(40, 150, 400);
        let last = *at.last().unwrap();
        let mut torn = bytes.clone();
        torn[last + 30] ^= 4;
        write(td.path(), 40, &torn);
        let r = check_dir(td.path()).expect("a torn end of the newest file");
        let path = td.path().join("000040.log");
        assert_eq!(r.torn, vec![(path.clone(), last)]);
        // Each torn file is cut where its data ends; the records before it
        // are all still there.
        for (p, at) in &r.torn {
            cut_torn_tail(p, *at).unwrap();
        }
        let cut = std::fs::read(&path).unwrap();
        assert_eq!(cut, bytes[..last]);
        let s = scan(&cut, 40);
        assert_eq!((s.end, s.end_at, s.end_is_own), (End::Eof, last, false));
        assert!(s.records > 0 && s.records < written, "{s:?}");
        // The file survives a power loss that takes back RocksDB's deletion
        // of it, and the node went on writing to a newer file: no refusal.
        let mut newer = WalWriter::new(44, true);
        newer.add(b"next");
        write(td.path(), 44, &newer.out);
        let r = check_dir(td.path()).expect("clean once cut");
        assert!(r.torn.is_empty(), "{r:?}");
        // Files that end cleanly are never reported as torn.
        write(td.path(), 40, &bytes);
        assert!(check_dir(td.path()).unwrap().torn.is_empty());
    }
}

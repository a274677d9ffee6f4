//! The file side of a resumable snapshot transfer: naming a snapshot file
//! across attempts ([`SnapshotId`]), checking a stored file before it is
//! sent ([`identify`], [`SourceCheck`]), and the receiver's partial file
//! ([`Incoming`]) that survives cut connections and restarts.
//!
//! The network side (offer, resume offset, resend) lives in `keel-raft`; the
//! protocol as a whole is described in `DESIGN.md` beside this file.

use std::fs;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;

use super::format::MAGIC;
use super::format::SnapshotError;
use super::format::SnapshotHeader;
use super::format::StreamVerifier;
use crate::failpoints;
use crate::fsutil;

const PRELUDE_LEN: u64 = 16;
const CHUNK_HEAD_LEN: u64 = 13;
const TRAILER_LEN: u64 = 41;
/// Largest header frame accepted (the format's limit).
const MAX_HEADER: u64 = 64 << 20;

/// Names one snapshot file: the same id means byte-identical files, so a
/// receiver can keep the bytes it verified and ask only for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotId {
    /// Index of the last log entry the snapshot includes.
    pub last_index: u64,
    /// Term of that entry.
    pub last_term: u64,
    /// File size in bytes.
    pub len: u64,
    /// CRC32 over the header frame's CRC and the whole trailer frame. The
    /// header CRC covers the header (its creation time included); the
    /// trailer carries the CRC chain of every chunk and its own CRC: so this
    /// changes whenever any frame of the file does.
    pub fingerprint: u32,
}

impl SnapshotId {
    /// Name of the receiver's partial file for this snapshot.
    pub fn part_name(&self) -> String {
        format!(
            "{:020}-{:020}-{}-{:08x}.part",
            self.last_index, self.last_term, self.len, self.fingerprint
        )
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-{} ({} bytes, {:08x})",
            self.last_term, self.last_index, self.len, self.fingerprint
        )
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn read_exact_at(file: &File, len: u64, at: u64) -> Result<Vec<u8>, SnapshotError> {
    let mut buf = vec![0; len as usize];
    match file.read_exact_at(&mut buf, at) {
        Ok(()) => Ok(buf),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(SnapshotError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Checks a stored snapshot cheaply and names it: the header frame (magic,
/// version, CRC), the trailer frame (CRC) and that the file size equals what
/// the trailer's totals imply. Reads the header and the last 41 bytes only,
/// with positional reads (the handle's offset is left alone). Corrupt chunk
/// bodies are found by [`SourceCheck`] while the file is streamed.
pub fn identify(file: &File) -> Result<(SnapshotHeader, SnapshotId), SnapshotError> {
    let len = file.metadata()?.len();
    if len < PRELUDE_LEN {
        return Err(SnapshotError::Truncated);
    }
    let prelude = read_exact_at(file, PRELUDE_LEN, 0)?;
    if &prelude[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let header_len = le32(&prelude, 12) as u64;
    if header_len > MAX_HEADER {
        return Err(SnapshotError::HeaderCorrupt);
    }
    let header_frame_len = PRELUDE_LEN + header_len + 4;
    if len < header_frame_len + TRAILER_LEN {
        return Err(SnapshotError::Truncated);
    }
    let mut v = StreamVerifier::new();
    v.feed(&prelude)?;
    v.feed(&read_exact_at(file, header_len + 4, PRELUDE_LEN)?)?;
    let header = v.header().cloned().ok_or(SnapshotError::HeaderCorrupt)?;
    let header_crc = read_exact_at(file, 4, PRELUDE_LEN + header_len)?;
    let trailer = read_exact_at(file, TRAILER_LEN, len - TRAILER_LEN)?;
    if trailer[0] != b'T' || crc32fast::hash(&trailer[..37]) != le32(&trailer, 37) {
        return Err(SnapshotError::TrailerCorrupt);
    }
    let (chunks, compressed) = (le64(&trailer, 1), le64(&trailer, 25));
    let expected = chunks
        .checked_mul(CHUNK_HEAD_LEN)
        .and_then(|h| h.checked_add(compressed))
        .and_then(|b| b.checked_add(header_frame_len + TRAILER_LEN));
    if expected != Some(len) {
        return Err(SnapshotError::Malformed(format!(
            "file is {len} bytes, its trailer accounts for {expected:?}"
        )));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&header_crc);
    h.update(&trailer);
    let id = SnapshotId {
        last_index: header.last_index,
        last_term: header.last_term,
        len,
        fingerprint: h.finalize(),
    };
    Ok((header, id))
}

/// The sender's own check of the file it streams: every byte it reads is
/// verified (CRC and decoding of each chunk) before it leaves, so a snapshot
/// corrupted on the sender's disk is caught there instead of being resent
/// forever. Resent ranges are not verified twice.
#[derive(Default)]
pub struct SourceCheck {
    v: StreamVerifier,
    fed: u64,
}

impl SourceCheck {
    /// A check that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leading bytes of the file already checked (or being).
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// True once the whole file, trailer included, passed.
    pub fn is_complete(&self) -> bool {
        self.v.is_complete()
    }

    /// Checks `buf`, the bytes of the file at offset `at`. Bytes before
    /// [`Self::fed`] were checked already; `at` must not lie beyond it.
    pub fn observe(&mut self, at: u64, buf: &[u8]) -> Result<(), SnapshotError> {
        assert!(at <= self.fed, "source check skipped bytes {}..{at}", self.fed);
        let end = at + buf.len() as u64;
        if end <= self.fed {
            return Ok(());
        }
        let new = &buf[(self.fed - at) as usize..];
        self.v.feed(new)?;
        self.fed = end;
        Ok(())
    }

    /// Checks the file from [`Self::fed`] up to `upto` (reading it), so
    /// that a transfer may resume at `upto`.
    pub fn catch_up(&mut self, file: &File, upto: u64) -> Result<(), SnapshotError> {
        let mut buf = vec![0; 256 << 10];
        while self.fed < upto {
            let n = ((upto - self.fed) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], self.fed)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => SnapshotError::Truncated,
                    _ => SnapshotError::Io(e),
                })?;
            let at = self.fed;
            self.observe(at, &buf[..n])?;
        }
        Ok(())
    }
}

/// A snapshot being received: `incoming/<id>.part`, whose verified prefix
/// is kept across cut connections, resends and restarts of either node.
///
/// Invariant between calls: the file holds exactly [`Self::verified_len`]
/// bytes once [`Self::settle`] ran, and the verifier's state is the one at
/// that offset.
pub struct Incoming {
    /// The snapshot this file is becoming.
    pub id: SnapshotId,
    /// Where it lives.
    pub path: PathBuf,
    file: File,
    len: u64,
    v: StreamVerifier,
}

impl Incoming {
    /// Opens the partial file for `id` in `dir`, or creates it. Other
    /// partial files there are removed (a receiver takes one snapshot at a
    /// time). What an existing file holds is verified again from its first
    /// byte and cut back to the last complete, verified frame.
    pub fn open(dir: &Path, id: SnapshotId) -> io::Result<Self> {
        fsutil::create_private_dir(dir)?;
        let name = id.part_name();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let other = entry.file_name().to_string_lossy().to_string();
            if other != name && other.ends_with(".part") {
                tracing::info!(file = %other, "removing a partial snapshot of another transfer");
                fs::remove_file(entry.path())?;
            }
        }
        let path = dir.join(&name);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut inc = Self {
            id,
            path,
            file,
            len: 0,
            v: StreamVerifier::new(),
        };
        let on_disk = inc.file.metadata()?.len();
        let mut buf = vec![0; 256 << 10];
        let mut at = 0;
        while at < on_disk {
            let n = ((on_disk - at) as usize).min(buf.len());
            inc.file.read_exact_at(&mut buf[..n], at)?;
            if inc.v.feed(&buf[..n]).is_err() {
                break;
            }
            at += n as u64;
        }
        inc.v.rewind();
        inc.len = on_disk;
        inc.settle()?;
        if inc.verified_len() > 0 {
            tracing::info!(snapshot = %id, verified = inc.verified_len(), "keeping the verified part of an earlier transfer");
        }
        Ok(inc)
    }

    /// Bytes received and verified: where the next transfer resumes.
    pub fn verified_len(&self) -> u64 {
        self.v.verified_len()
    }

    /// True once the trailer arrived and the whole file verified.
    pub fn is_complete(&self) -> bool {
        self.v.is_complete()
    }

    /// Appends bytes that follow what the file holds, then verifies them.
    /// On a frame that fails verification the file is cut back to the last
    /// verified frame and the error returned: the sender resends from
    /// [`Self::verified_len`].
    pub fn write(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        if data.len() as u64 > self.id.len.saturating_sub(self.len) {
            return Err(SnapshotError::Malformed(format!(
                "sender sent more than the announced {} bytes",
                self.id.len
            )));
        }
        self.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        let chunks_before = self.v.chunks_verified();
        let res = self.v.feed(data);
        for _ in chunks_before..self.v.chunks_verified() {
            failpoints::crash_point("snap-recv-chunk");
        }
        if let Err(e) = res {
            self.settle()?;
            return Err(e);
        }
        Ok(())
    }

    /// After an interrupted attempt: drops bytes past the verified prefix.
    pub fn settle(&mut self) -> io::Result<()> {
        self.v.rewind();
        let keep = self.verified_len();
        if self.len != keep {
            self.file.set_len(keep)?;
            self.len = keep;
        }
        Ok(())
    }

    /// Makes the complete file durable and hands over its path.
    pub fn finish(self) -> io::Result<PathBuf> {
        if !self.is_complete() || self.len != self.id.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot transfer is not complete",
            ));
        }
        self.file.sync_all()?;
        if let Some(dir) = self.path.parent() {
            fsutil::fsync_dir(dir)?;
        }
        Ok(self.path)
    }

    /// Gives the partial file up.
    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::format::SnapshotWriter;

    fn snapshot_bytes(records: usize, created: u64) -> Vec<u8> {
        let header = SnapshotHeader {
            cluster_id: "c".into(),
            meta: vec![1, 2, 3],
            last_index: 77,
            last_term: 3,
            created_unix_ms: created,
        };
        let mut w = SnapshotWriter::with_chunk_target(Vec::new(), &header, 2000).unwrap();
        for i in 0..records {
            let v: Vec<u8> = (0..100).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
            w.put(format!("k/{i:06}").as_bytes(), &v).unwrap();
        }
        w.finish().unwrap().1
    }

    fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> File {
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        File::open(p).unwrap()
    }

    #[test]
    fn identify_names_files_and_catches_broken_frames() {
        let td = tempfile::tempdir().unwrap();
        let bytes = snapshot_bytes(300, 1);
        let (header, id) = identify(&write_file(td.path(), "a", &bytes)).unwrap();
        assert_eq!((header.last_index, id.last_index, id.last_term), (77, 77, 3));
        assert_eq!(id.len, bytes.len() as u64);
        // Same content, other creation time: another id.
        let (_, other) = identify(&write_file(td.path(), "b", &snapshot_bytes(300, 2))).unwrap();
        assert_ne!(id, other);
        // Header, trailer, truncation and extension are all caught cheaply.
        for (at, name) in [(20usize, "h"), (bytes.len() - 10, "t")] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(identify(&write_file(td.path(), name, &b)).is_err(), "flip at {at}");
        }
        assert!(identify(&write_file(td.path(), "cut", &bytes[..bytes.len() - 100])).is_err());
        let longer = [&bytes[..], &[0u8; 5]].concat();
        assert!(identify(&write_file(td.path(), "long", &longer)).is_err());
        // A flipped chunk byte passes identify but not the source check.
        let mut b = bytes.clone();
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
        let f = write_file(td.path(), "mid", &b);
        assert!(identify(&f).is_ok());
        let mut check = SourceCheck::new();
        assert!(check.catch_up(&f, b.len() as u64).is_err());
        let mut check = SourceCheck::new();
        check
            .catch_up(&write_file(td.path(), "ok", &bytes), bytes.len() as u64)
            .unwrap();
        assert!(check.is_complete());
    }

    #[test]
    fn incoming_keeps_the_verified_prefix_across_attempts_and_reopens() {
        let td = tempfile::tempdir().unwrap();
        let bytes = snapshot_bytes(400, 1);
        let (_, id) = identify(&write_file(td.path(), "src", &bytes)).unwrap();
        let dir = td.path().join("incoming");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("stale.part"), b"old").unwrap();

        // Attempt 1 is cut after 40% of the bytes, mid-frame.
        let mut inc = Incoming::open(&dir, id).unwrap();
        assert!(!dir.join("stale.part").exists());
        assert_eq!(inc.verified_len(), 0);
        let cut = bytes.len() * 2 / 5;
        for piece in bytes[..cut].chunks(333) {
            inc.write(piece).unwrap();
        }
        inc.settle().unwrap();
        let kept = inc.verified_len();
        assert!(kept > 0 && kept < cut as u64);
        assert_eq!(fs::metadata(&inc.path).unwrap().len(), kept);
        drop(inc);

        // The receiver restarted: reopening finds the same prefix.
        let mut inc = Incoming::open(&dir, id).unwrap();
        assert_eq!(inc.verified_len(), kept);
        // Attempt 2 carries a flipped bit: rejected, cut back, resent.
        let from = kept as usize;
        let mut bad = bytes[from..].to_vec();
        bad[5000] ^= 0x10;
        let err = inc.write(&bad).unwrap_err();
        assert!(matches!(err, SnapshotError::ChunkCorrupt { .. }), "{err:?}");
        let again = inc.verified_len() as usize;
        assert!(again >= from && again < from + 5000 + 1);
        assert_eq!(fs::metadata(&inc.path).unwrap().len(), again as u64);
        inc.write(&bytes[again..]).unwrap();
        assert!(inc.is_complete());
        let path = inc.finish().unwrap();
        assert_eq!(fs::read(path).unwrap(), bytes);

        // A different snapshot replaces the partial file of the old one.
        let (_, id2) = identify(&write_file(td.path(), "src2", &snapshot_bytes(10, 9))).unwrap();
        let inc = Incoming::open(&dir, id2).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        assert!(inc.write_too_much_is_refused());
    }

    impl Incoming {
        fn write_too_much_is_refused(mut self) -> bool {
            let n = self.id.len as usize + 1;
            self.write(&vec![0; n]).is_err()
        }
    }
}

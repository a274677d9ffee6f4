//! Byte format of keel snapshots: encoding, decoding and verification.
//!
//! A snapshot holds the whole replicated key/value state (records in key order) behind a
//! header carrying the Raft snapshot meta. [`SnapshotWriter`] streams records into
//! LZ4-compressed, CRC-checked chunks; [`SnapshotReader`] streams them back while verifying
//! every chunk and the trailer; [`verify_file`] checks a file on disk; [`StreamVerifier`]
//! checks a snapshot arriving over the network in arbitrary slices and says from which
//! offset an interrupted transfer can resume. None of them ever holds a whole snapshot in
//! memory: at most one chunk (about [`DEFAULT_CHUNK_TARGET`] bytes raw, never more than
//! 64 MiB) is buffered at a time. The exact byte layout is in `FORMAT.md` beside this file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use bincode::Options;
use serde::{Deserialize, Serialize};

/// Magic bytes that open every snapshot file.
pub const MAGIC: &[u8; 8] = b"KEELSNAP";
/// Version of the layout this module writes; readers reject every other version.
pub const FORMAT_VERSION: u32 = 1;
/// Default raw size (1 MiB) at which the writer closes a chunk.
pub const DEFAULT_CHUNK_TARGET: usize = 1 << 20;

/// Largest accepted header or raw chunk, so a corrupt length cannot force a huge allocation.
const MAX_FRAME: usize = 64 << 20;
const PRELUDE_LEN: usize = 16;
const CHUNK_HEAD_LEN: usize = 13;
const TRAILER_LEN: usize = 41;
const TAG_CHUNK: u8 = b'C';
const TAG_TRAILER: u8 = b'T';

/// Header stored at the start of a snapshot, describing the state it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// Identifier of the cluster the snapshot belongs to.
    pub cluster_id: String,
    /// Opaque Raft snapshot meta (last log id, membership), serialized by the caller.
    pub meta: Vec<u8>,
    /// Index of the last log entry included in the snapshot.
    pub last_index: u64,
    /// Term of the last log entry included in the snapshot.
    pub last_term: u64,
    /// Creation time in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

/// Totals of a complete snapshot, as written in its trailer and checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotSummary {
    /// Number of chunks.
    pub chunks: u64,
    /// Number of key/value records.
    pub records: u64,
    /// Sum of the raw (uncompressed) chunk payload sizes.
    pub raw_bytes: u64,
    /// Sum of the compressed chunk payload sizes.
    pub compressed_bytes: u64,
    /// Size of the whole file, header and trailer included.
    pub file_bytes: u64,
    /// CRC32 over the CRCs of all chunks in order, each fed as 4 little-endian bytes.
    pub crc: u32,
}

/// Everything that can go wrong while writing, reading or verifying a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The underlying reader or writer failed.
    #[error("snapshot I/O error: {0}")]
    Io(#[from] io::Error),
    /// The data does not start with [`MAGIC`].
    #[error("not a keel snapshot (bad magic bytes)")]
    BadMagic,
    /// The snapshot was written in a format version this build cannot read.
    #[error("unsupported snapshot format version {0} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// The header failed its CRC, is longer than 64 MiB, or does not decode.
    #[error("snapshot header is corrupt")]
    HeaderCorrupt,
    /// A chunk failed its CRC, has invalid lengths, or its payload does not decode.
    #[error("snapshot chunk {chunk} (counting from 0) is corrupt")]
    ChunkCorrupt {
        /// Zero-based index of the chunk.
        chunk: u64,
    },
    /// The trailer failed its CRC.
    #[error("snapshot trailer is corrupt")]
    TrailerCorrupt,
    /// The data ended before the trailer was complete.
    #[error("snapshot is truncated")]
    Truncated,
    /// The data is wrong in a way the message describes, or a record is too large to write.
    #[error("malformed snapshot: {0}")]
    Malformed(String),
}

type Result<T> = std::result::Result<T, SnapshotError>;

fn bincode_opts() -> impl Options {
    let opts = bincode::DefaultOptions::new().with_fixint_encoding();
    opts.with_limit(MAX_FRAME as u64)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Checks magic, version and header length of the 16-byte prelude and returns the header length.
fn parse_prelude(p: &[u8]) -> Result<usize> {
    if &p[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    match (le32(p, 8), le32(p, 12) as usize) {
        (FORMAT_VERSION, len) if len <= MAX_FRAME => Ok(len),
        (FORMAT_VERSION, _) => Err(SnapshotError::HeaderCorrupt),
        (v, _) => Err(SnapshotError::UnsupportedVersion(v)),
    }
}

struct ChunkHead {
    raw_len: usize,
    comp_len: usize,
    crc: u32,
}

impl ChunkHead {
    /// Parses and bounds-checks the 13 bytes that open a chunk frame (tag included).
    fn parse(h: &[u8], chunk: u64) -> Result<Self> {
        let (raw_len, comp_len) = (le32(h, 1) as usize, le32(h, 5) as usize);
        let max_comp = 20 + raw_len * 110 / 100; // fixed by the format; LZ4 never needs more
        if !(1..=MAX_FRAME).contains(&raw_len) || !(1..=max_comp).contains(&comp_len) {
            return Err(SnapshotError::ChunkCorrupt { chunk });
        }
        Ok(Self {
            raw_len,
            comp_len,
            crc: le32(h, 9),
        })
    }
}

/// Splits the first record off `buf`, returning key, value and the number of bytes used.
fn split_record(buf: &[u8]) -> Option<(&[u8], &[u8], usize)> {
    let klen = le32(buf.get(..4)?, 0) as usize;
    let key = buf.get(4..)?.get(..klen)?;
    let rest = &buf[4 + klen..];
    let vlen = le32(rest.get(..4)?, 0) as usize;
    let value = rest.get(4..)?.get(..vlen)?;
    Some((key, value, 8 + klen + vlen))
}

/// Running totals of the frames verified or written so far.
#[derive(Default)]
struct Totals {
    /// Counts so far; `file_bytes` excludes the trailer and `crc` is unused.
    sum: SnapshotSummary,
    chain: crc32fast::Hasher,
}

impl Totals {
    fn after_header(header_len: usize) -> Self {
        let mut totals = Self::default();
        totals.sum.file_bytes = (PRELUDE_LEN + header_len + 4) as u64;
        totals
    }

    fn add_chunk(&mut self, head: &ChunkHead, records: u64) {
        self.sum.chunks += 1;
        self.sum.records += records;
        self.sum.raw_bytes += head.raw_len as u64;
        self.sum.compressed_bytes += head.comp_len as u64;
        self.sum.file_bytes += (CHUNK_HEAD_LEN + head.comp_len) as u64;
        self.chain.update(&head.crc.to_le_bytes());
    }

    fn summary(&self) -> SnapshotSummary {
        let file_bytes = self.sum.file_bytes + TRAILER_LEN as u64;
        SnapshotSummary {
            file_bytes,
            crc: self.chain.clone().finalize(),
            ..self.sum
        }
    }

    fn trailer(&self) -> [u8; TRAILER_LEN] {
        let s = self.summary();
        let mut t = [TAG_TRAILER; TRAILER_LEN];
        let counts = [s.chunks, s.records, s.raw_bytes, s.compressed_bytes];
        for (i, v) in counts.iter().enumerate() {
            t[1 + 8 * i..9 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        t[33..37].copy_from_slice(&s.crc.to_le_bytes());
        let crc = crc32fast::hash(&t[..37]);
        t[37..].copy_from_slice(&crc.to_le_bytes());
        t
    }
}

/// Reads exactly `n` bytes into `buf`, replacing its contents; a short read is `Truncated`.
fn read_n<R: Read>(r: &mut R, n: usize, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    r.take(n as u64).read_to_end(buf)?;
    if buf.len() < n {
        return Err(SnapshotError::Truncated);
    }
    Ok(())
}

/// Streams records into chunks and writes them to any [`Write`] (a `BufWriter<File>` in practice).
///
/// After any error the writer must be dropped, as its output is then incomplete.
pub struct SnapshotWriter<W: Write> {
    out: W,
    target: usize,
    raw: Vec<u8>,
    comp: Vec<u8>,
    chunk_records: u64,
    totals: Totals,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the file header and returns a writer that closes chunks at [`DEFAULT_CHUNK_TARGET`].
    pub fn new(out: W, header: &SnapshotHeader) -> Result<Self> {
        Self::with_chunk_target(out, header, DEFAULT_CHUNK_TARGET)
    }

    /// Writes the file header and returns a writer that closes chunks at `target` raw bytes.
    ///
    /// The target is clamped to 1..=64 MiB.
    pub fn with_chunk_target(mut out: W, header: &SnapshotHeader, target: usize) -> Result<Self> {
        let body = bincode_opts()
            .serialize(header)
            .map_err(|e| SnapshotError::Malformed(format!("cannot encode header: {e}")))?;
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&(body.len() as u32).to_le_bytes())?;
        out.write_all(&body)?;
        out.write_all(&crc32fast::hash(&body).to_le_bytes())?;
        let (raw, comp, totals) = (Vec::new(), Vec::new(), Totals::after_header(body.len()));
        let target = target.clamp(1, MAX_FRAME);
        Ok(Self {
            out,
            target,
            raw,
            comp,
            chunk_records: 0,
            totals,
        })
    }

    /// Appends one record; a record larger than the chunk target gets a chunk of its own.
    ///
    /// A chunk never exceeds the target unless it holds a single record. A record whose
    /// encoding (8 + key + value bytes) exceeds 64 MiB is rejected as `Malformed`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let len = key.len().saturating_add(value.len()).saturating_add(8);
        if len > MAX_FRAME {
            let msg = format!("record of {len} bytes exceeds the {MAX_FRAME}-byte chunk limit");
            return Err(SnapshotError::Malformed(msg));
        }
        if !self.raw.is_empty() && self.raw.len() + len > self.target {
            self.write_chunk()?;
        }
        for part in [key, value] {
            self.raw.extend_from_slice(&(part.len() as u32).to_le_bytes());
            self.raw.extend_from_slice(part);
        }
        self.chunk_records += 1;
        if self.raw.len() >= self.target {
            self.write_chunk()?;
        }
        Ok(())
    }

    fn write_chunk(&mut self) -> Result<()> {
        let max = lz4_flex::block::get_maximum_output_size(self.raw.len());
        if self.comp.len() < max {
            self.comp.resize(max, 0);
        }
        let n = lz4_flex::block::compress_into(&self.raw, &mut self.comp)
            .map_err(|e| SnapshotError::Malformed(format!("lz4 compression failed: {e}")))?;
        let crc = crc32fast::hash(&self.comp[..n]);
        self.out.write_all(&[TAG_CHUNK])?;
        for field in [self.raw.len() as u32, n as u32, crc] {
            self.out.write_all(&field.to_le_bytes())?;
        }
        self.out.write_all(&self.comp[..n])?;
        let head = ChunkHead {
            raw_len: self.raw.len(),
            comp_len: n,
            crc,
        };
        self.totals.add_chunk(&head, self.chunk_records);
        self.raw.clear();
        self.chunk_records = 0;
        Ok(())
    }

    /// Writes the last chunk and the trailer, flushes, and returns the summary and the inner
    /// writer, so the caller can fsync the file.
    pub fn finish(mut self) -> Result<(SnapshotSummary, W)> {
        if !self.raw.is_empty() {
            self.write_chunk()?;
        }
        self.out.write_all(&self.totals.trailer())?;
        self.out.flush()?;
        Ok((self.totals.summary(), self.out))
    }
}

/// Reads records back from any [`Read`], verifying each chunk before yielding its records.
///
/// Wrap unbuffered sources in a `BufReader`. After an error every later call fails too.
pub struct SnapshotReader<R: Read> {
    input: R,
    header: SnapshotHeader,
    v: StreamVerifier,
    buf: Vec<u8>,
    pos: usize,
    failed: bool,
}

impl<R: Read> SnapshotReader<R> {
    /// Reads the file header and checks its magic, version and CRC.
    pub fn new(mut input: R) -> Result<Self> {
        let (mut v, mut buf) = (StreamVerifier::new(), Vec::new());
        Self::pull_frame(&mut input, &mut v, &mut buf)?;
        let header = v.header.clone().ok_or(SnapshotError::HeaderCorrupt)?;
        Ok(Self {
            input,
            header,
            v,
            buf,
            pos: 0,
            failed: false,
        })
    }

    /// Reads exactly one frame into `v`; after the trailer, also checks that the input ends there.
    fn pull_frame(input: &mut R, v: &mut StreamVerifier, buf: &mut Vec<u8>) -> Result<()> {
        let start = v.verified_len();
        while v.verified_len() == start {
            let res = read_n(input, v.need()? - v.pending.len(), buf);
            v.feed(buf)?; // bytes first, so that e.g. a bad magic wins over truncation
            res?;
        }
        if v.is_complete() {
            match read_n(input, 1, buf) {
                Err(SnapshotError::Truncated) => {}
                Err(e) => return Err(e),
                Ok(()) => v.feed(buf)?,
            }
        }
        Ok(())
    }

    /// Returns the verified file header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// Returns the next record, decoding and CRC-checking the next chunk when needed.
    ///
    /// Returns `Ok(None)` only once the trailer was read and verified (counts and chunk CRC chain
    /// match, and no data follows it); a missing trailer is [`SnapshotError::Truncated`].
    pub fn next_record(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.failed {
            return Err(SnapshotError::Malformed("reader already failed".into()));
        }
        self.failed = true;
        while self.pos == self.v.raw.len() {
            if self.v.is_complete() {
                self.failed = false;
                return Ok(None);
            }
            Self::pull_frame(&mut self.input, &mut self.v, &mut self.buf)?;
            self.pos = 0;
        }
        let chunk = self.v.totals.sum.chunks - 1;
        let (k, v, used) = split_record(&self.v.raw[self.pos..]).ok_or(SnapshotError::ChunkCorrupt { chunk })?;
        self.pos += used;
        self.failed = false;
        Ok(Some((k.to_vec(), v.to_vec())))
    }

    /// Returns the verified totals; `Some` only after [`Self::next_record`] returned `Ok(None)`.
    pub fn summary(&self) -> Option<SnapshotSummary> {
        self.v.summary.filter(|_| !self.failed)
    }
}

/// Reads a whole snapshot file, verifying every chunk and the trailer without keeping records,
/// and returns its header and summary.
pub fn verify_file(path: &Path) -> Result<(SnapshotHeader, SnapshotSummary)> {
    let mut file = File::open(path)?;
    let (mut v, mut buf) = (StreamVerifier::new(), vec![0; 256 << 10]);
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => v.feed(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    match (v.header, v.summary) {
        (Some(header), Some(summary)) => Ok((header, summary)),
        _ => Err(SnapshotError::Truncated),
    }
}

/// Incremental, chunk-granular verifier for a snapshot arriving in arbitrary byte slices.
///
/// It buffers at most one frame (header, chunk or trailer; no frame may exceed 64 MiB raw) and
/// tracks the end of the last fully verified frame, so an interrupted transfer can resume from
/// [`Self::verified_len`]. When [`Self::feed`] fails, the partial frame is dropped and the state
/// is again the one at `verified_len`, so the sender can resend from there.
#[derive(Default)]
pub struct StreamVerifier {
    pending: Vec<u8>,
    raw: Vec<u8>,
    header: Option<SnapshotHeader>,
    totals: Totals,
    summary: Option<SnapshotSummary>,
}

impl StreamVerifier {
    /// Creates a verifier expecting the first byte of a snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes the next bytes of the stream, failing as soon as a frame fails its checks.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<()> {
        let res = self.feed_frames(bytes);
        if res.is_err() {
            self.pending.clear();
        }
        res
    }

    fn feed_frames(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let take = (self.need()? - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.need()? == self.pending.len() {
                self.finish_frame()?;
            }
        }
        Ok(())
    }

    /// Returns the total length of the frame being buffered, as far as its bytes so far tell.
    fn need(&self) -> Result<usize> {
        let (p, chunk) = (&self.pending, self.totals.sum.chunks);
        if self.header.is_none() {
            let m = p.len().min(MAGIC.len());
            return match p.len() {
                _ if p[..m] != MAGIC[..m] => Err(SnapshotError::BadMagic),
                n if n < PRELUDE_LEN => Ok(PRELUDE_LEN),
                _ => Ok(PRELUDE_LEN + parse_prelude(p)? + 4),
            };
        }
        match p.first() {
            _ if self.summary.is_some() => Err(SnapshotError::Malformed("data after the trailer".into())),
            None => Ok(1),
            Some(&TAG_CHUNK) if p.len() < CHUNK_HEAD_LEN => Ok(CHUNK_HEAD_LEN),
            Some(&TAG_CHUNK) => Ok(CHUNK_HEAD_LEN + ChunkHead::parse(p, chunk)?.comp_len),
            Some(&TAG_TRAILER) => Ok(TRAILER_LEN),
            Some(tag) => Err(SnapshotError::Malformed(format!(
                "unknown frame tag {tag:#04x} after chunk {chunk}"
            ))),
        }
    }

    /// Verifies the complete frame in `pending` and adds it to the totals.
    fn finish_frame(&mut self) -> Result<()> {
        let (p, chunk) = (std::mem::take(&mut self.pending), self.totals.sum.chunks);
        let crc_ok = |body: &[u8], at: usize| crc32fast::hash(body) == le32(&p, at);
        if self.header.is_none() {
            let body = &p[PRELUDE_LEN..p.len() - 4];
            if !crc_ok(body, p.len() - 4) {
                return Err(SnapshotError::HeaderCorrupt);
            }
            let header = bincode_opts().deserialize(body);
            self.header = Some(header.map_err(|_| SnapshotError::HeaderCorrupt)?);
            self.totals = Totals::after_header(body.len());
        } else if p[0] == TAG_CHUNK {
            let head = ChunkHead::parse(&p, chunk)?;
            let records = self
                .decode_chunk(&head, &p[CHUNK_HEAD_LEN..])
                .ok_or(SnapshotError::ChunkCorrupt { chunk })?;
            self.totals.add_chunk(&head, records);
        } else if !crc_ok(&p[..37], 37) {
            return Err(SnapshotError::TrailerCorrupt);
        } else if p[..] != self.totals.trailer() {
            return Err(SnapshotError::Malformed(
                "trailer totals do not match the chunks read".into(),
            ));
        } else {
            self.summary = Some(self.totals.summary());
            self.raw = Vec::new();
        }
        self.pending = p;
        self.pending.clear();
        Ok(())
    }

    /// Checks a chunk's CRC, decompresses it into `raw` and returns its record count.
    fn decode_chunk(&mut self, head: &ChunkHead, comp: &[u8]) -> Option<u64> {
        if crc32fast::hash(comp) != head.crc {
            return None;
        }
        self.raw.clear();
        self.raw.resize(head.raw_len, 0);
        let n = lz4_flex::block::decompress_into(comp, &mut self.raw).ok()?;
        let (mut pos, mut records) = (0, 0);
        while pos < n && n == head.raw_len {
            pos += split_record(&self.raw[pos..])?.2;
            records += 1;
        }
        (n == head.raw_len).then_some(records)
    }

    /// Returns the number of leading bytes that form complete, verified frames.
    pub fn verified_len(&self) -> u64 {
        self.summary.unwrap_or(self.totals.sum).file_bytes
    }

    /// Returns the number of chunks verified so far.
    pub fn chunks_verified(&self) -> u64 {
        self.totals.sum.chunks
    }

    /// Returns the header once its frame has been verified.
    pub fn header(&self) -> Option<&SnapshotHeader> {
        self.header.as_ref()
    }

    /// Tells whether the trailer has been seen and verified.
    pub fn is_complete(&self) -> bool {
        self.summary.is_some()
    }

    /// Returns the verified totals once the trailer has been verified.
    pub fn summary(&self) -> Option<SnapshotSummary> {
        self.summary
    }

    /// Drops the partially buffered frame, so feeding can go on from [`Self::verified_len`].
    pub fn rewind(&mut self) {
        self.pending.clear();
    }

    /// Forgets everything, as after [`Self::new`]; the caller then re-feeds the file from offset 0.
    pub fn reset(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Records = Vec<(Vec<u8>, Vec<u8>)>;

    /// Xorshift64, enough randomness for slicing and garbage without a dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
        /// Random bytes, fewer than `max` of them.
        fn bytes(&mut self, max: usize) -> Vec<u8> {
            (0..self.below(max)).map(|_| self.below(256) as u8).collect()
        }
    }

    fn header() -> SnapshotHeader {
        let (cluster_id, meta) = ("c1".to_string(), vec![0, 1, 255, 7]);
        let (last_index, last_term, created_unix_ms) = (42, 7, 1_700_000_000_000);
        SnapshotHeader {
            cluster_id,
            meta,
            last_index,
            last_term,
            created_unix_ms,
        }
    }

    /// Sorted records of varied sizes (every fifth value empty), half of them compressible.
    fn records(n: usize, seed: u64) -> Records {
        let mut rng = Rng(seed);
        let value = |i: usize, rng: &mut Rng| match (i % 5, i % 2) {
            (0, _) => Vec::new(),
            (_, 0) => vec![b'x'; rng.below(120)],
            _ => rng.bytes(120),
        };
        (0..n)
            .map(|i| (format!("key/{i:06}").into_bytes(), value(i, &mut rng)))
            .collect()
    }

    fn build(recs: &Records, target: usize) -> (Vec<u8>, SnapshotSummary) {
        let mut w = SnapshotWriter::with_chunk_target(Vec::new(), &header(), target).unwrap();
        for (k, v) in recs {
            w.put(k, v).unwrap();
        }
        let (summary, out) = w.finish().unwrap();
        (out, summary)
    }

    fn read_all(bytes: &[u8]) -> Result<(SnapshotHeader, Records, SnapshotSummary)> {
        let mut r = SnapshotReader::new(bytes)?;
        let mut recs = Vec::new();
        while let Some(rec) = r.next_record()? {
            recs.push(rec);
        }
        Ok((r.header().clone(), recs, r.summary().unwrap()))
    }

    fn stream(bytes: &[u8]) -> Result<StreamVerifier> {
        let mut v = StreamVerifier::new();
        v.feed(bytes).map(|()| v)
    }

    /// Offsets where frames end, computed independently: 0, header, each chunk, trailer.
    fn boundaries(f: &[u8]) -> Vec<usize> {
        let mut ends = vec![0, PRELUDE_LEN + le32(f, 12) as usize + 4];
        while f[ends[ends.len() - 1]] == TAG_CHUNK {
            let at = ends[ends.len() - 1];
            ends.push(at + CHUNK_HEAD_LEN + le32(f, at + 5) as usize);
        }
        ends.push(ends[ends.len() - 1] + TRAILER_LEN);
        ends
    }

    fn check_roundtrip(recs: Records, target: usize) -> SnapshotSummary {
        let (bytes, summary) = build(&recs, target);
        assert_eq!(read_all(&bytes).unwrap(), (header(), recs.clone(), summary));
        let raw: usize = recs.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let ends = boundaries(&bytes);
        let comp = bytes.len() - ends[1] - TRAILER_LEN - CHUNK_HEAD_LEN * (ends.len() - 3);
        let (chunks, records) = (ends.len() as u64 - 3, recs.len() as u64);
        let (raw_bytes, compressed_bytes, file_bytes) = (raw as u64, comp as u64, bytes.len() as u64);
        let expected = SnapshotSummary {
            chunks,
            records,
            raw_bytes,
            compressed_bytes,
            file_bytes,
            ..summary
        };
        assert_eq!(summary, expected);
        let v = stream(&bytes).unwrap();
        assert_eq!(
            (v.header(), v.summary(), v.verified_len()),
            (Some(&header()), Some(summary), file_bytes)
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        assert_eq!(verify_file(file.path()).unwrap(), (header(), summary));
        summary
    }

    #[test]
    fn round_trips() {
        let empty = check_roundtrip(Vec::new(), DEFAULT_CHUNK_TARGET);
        assert_eq!((empty.chunks, empty.crc), (0, 0));
        let one = vec![(b"k".to_vec(), b"v".to_vec())];
        assert_eq!(check_roundtrip(one, DEFAULT_CHUNK_TARGET).chunks, 1);
        assert_eq!(check_roundtrip(vec![(vec![], vec![]); 3], 1).chunks, 3);
        assert!(check_roundtrip(records(500, 1), 512).chunks > 20);
        assert_eq!(check_roundtrip(records(500, 2), DEFAULT_CHUNK_TARGET).chunks, 1);
        // A record larger than the target gets a chunk of its own.
        let big = vec![
            (b"a".to_vec(), vec![1; 9]),
            (b"b".to_vec(), vec![2; 5000]),
            (b"c".to_vec(), vec![]),
        ];
        assert_eq!(check_roundtrip(big, 100).chunks, 3);
        let mut w = SnapshotWriter::new(Vec::new(), &header()).unwrap();
        assert!(matches!(
            w.put(b"k", &vec![0; MAX_FRAME]),
            Err(SnapshotError::Malformed(_))
        ));
    }

    #[test]
    fn bit_flips_are_detected_in_the_right_frame() {
        let (bytes, _) = build(&records(300, 3), 600);
        let ends = boundaries(&bytes);
        for at in (0..bytes.len()).step_by(3) {
            let mut b = bytes.clone();
            b[at] ^= 1 << (at % 8);
            let r = read_all(&b).unwrap_err();
            // A verifier still waiting for bytes (a length grew) sees a truncated stream.
            let s = stream(&b).err().unwrap_or(SnapshotError::Truncated);
            let k = ends.iter().position(|&e| e > at).unwrap(); // the flip is in frame k - 1
            let (off, in_chunk) = (at - ends[k - 1], k > 1 && k < ends.len() - 1);
            let expected = |e: &SnapshotError| match e {
                SnapshotError::BadMagic => at < 8,
                SnapshotError::UnsupportedVersion(_) => (8..12).contains(&at),
                SnapshotError::HeaderCorrupt => (12..ends[1]).contains(&at),
                SnapshotError::Truncated => (12..16).contains(&at) || in_chunk && (5..9).contains(&off),
                SnapshotError::Malformed(_) => k > 1 && off == 0, // a frame tag
                SnapshotError::ChunkCorrupt { chunk } => in_chunk && off > 0 && *chunk == k as u64 - 2,
                SnapshotError::TrailerCorrupt => k == ends.len() - 1 && off > 0,
                SnapshotError::Io(_) => false,
            };
            assert!(
                expected(&r) && expected(&s),
                "offset {at}: reader {r:?}, verifier {s:?}"
            );
        }
    }

    #[test]
    fn truncation_is_an_error_never_a_panic() {
        let (bytes, _) = build(&records(200, 4), 400);
        let ends = boundaries(&bytes);
        let path = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        for cut in 0..bytes.len() {
            assert!(read_all(&bytes[..cut]).is_err(), "cut at {cut} read fine");
            let v = stream(&bytes[..cut]).unwrap();
            let k = ends.iter().position(|&e| e == v.verified_len() as usize).unwrap();
            assert!(!v.is_complete() && ends[k] <= cut && cut < ends[k + 1]);
            if cut % 97 == 0 {
                std::fs::write(&path, &bytes[..cut]).unwrap();
                assert!(matches!(verify_file(&path), Err(SnapshotError::Truncated)));
            }
        }
        let longer = [&bytes[..], b"x"].concat();
        assert!(matches!(read_all(&longer), Err(SnapshotError::Malformed(_))));
        assert!(stream(&longer).is_err());
    }

    #[test]
    fn verifier_fed_random_slices_agrees_with_reader() {
        let (bytes, summary) = build(&records(400, 5), 700);
        let ends = boundaries(&bytes);
        let mut rng = Rng(99);
        for _ in 0..20 {
            let (mut v, mut at) = (StreamVerifier::new(), 0);
            while at < bytes.len() {
                let n = (1 + rng.below(300)).min(bytes.len() - at);
                v.feed(&bytes[at..at + n]).unwrap();
                at += n;
                let k = ends.iter().position(|&e| e == v.verified_len() as usize).unwrap();
                assert!(ends[k] <= at && ends.get(k + 1).is_none_or(|&next| at < next));
            }
            assert_eq!((v.header(), v.summary()), (Some(&header()), Some(summary)));
        }
    }

    #[test]
    fn transfer_resumes_from_verified_len() {
        let (bytes, summary) = build(&records(300, 6), 500);
        for cut in (0..bytes.len()).step_by(7) {
            let mut v = stream(&bytes[..cut]).unwrap();
            let from = v.verified_len() as usize;
            v.rewind();
            v.feed(&bytes[from..]).unwrap();
            assert_eq!(v.summary(), Some(summary));
            v.reset();
            assert_eq!((v.verified_len(), v.header()), (0, None));
            v.feed(&bytes[..from]).unwrap();
            v.feed(&bytes[from..]).unwrap();
            assert_eq!(v.summary(), Some(summary));
        }
        // A corrupt chunk leaves the verifier at the chunk's start, ready for a resend.
        let ends = boundaries(&bytes);
        let mut bad = bytes.clone();
        bad[ends[3] - 1] ^= 0x10;
        let mut v = StreamVerifier::new();
        assert!(matches!(v.feed(&bad), Err(SnapshotError::ChunkCorrupt { chunk: 1 })));
        assert_eq!(v.verified_len() as usize, ends[2]);
        v.feed(&bytes[ends[2]..]).unwrap();
        assert_eq!(v.summary(), Some(summary));
    }

    #[test]
    fn garbage_never_panics() {
        let (bytes, _) = build(&records(100, 7), 300);
        let header_frame = &bytes[..boundaries(&bytes)[1]];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..300 {
            let input = match i % 3 {
                0 => rng.bytes(4096),
                1 => [header_frame, &rng.bytes(4096)].concat(),
                _ => {
                    // One changed byte is always caught: CRC32 detects every burst up to 32 bits.
                    let mut b = bytes.clone();
                    b[rng.below(bytes.len())] ^= 1 + rng.below(255) as u8;
                    b
                }
            };
            assert!(read_all(&input).is_err());
            let (mut v, mut rest) = (StreamVerifier::new(), &input[..]);
            while !rest.is_empty() {
                let n = (1 + rng.below(512)).min(rest.len());
                let _ = v.feed(&rest[..n]);
                rest = &rest[n..];
            }
            assert!(!v.is_complete());
        }
    }
}

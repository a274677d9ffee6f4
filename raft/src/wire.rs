//! The peer protocol on the wire: routes, headers and the compact binary
//! (bincode) encoding of every message.
//!
//! Every peer request is an HTTP/2 POST carrying `x-keel-cluster` (the
//! cluster name; a mismatch is refused with 412) and `x-keel-from` (the
//! sender's node id, which must equal the id in its certificate).

use std::io;

use keel_storage::model::Request;
use keel_storage::model::Response;
use keel_storage::snapshot::transfer::SnapshotId;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Raft AppendEntries.
pub const PATH_APPEND: &str = "/raft/append";
/// Pipelined AppendEntries: one long HTTP/2 stream carrying length-prefixed
/// requests one way and their results, in order, the other.
pub const PATH_STREAM_APPEND: &str = "/raft/stream-append";
/// Raft RequestVote.
pub const PATH_VOTE: &str = "/raft/vote";
/// Raft pre-vote (an election probe that does not bump terms).
pub const PATH_PRE_VOTE: &str = "/raft/pre-vote";
/// Leadership handoff to the receiver.
pub const PATH_TRANSFER_LEADER: &str = "/raft/transfer-leader";
/// A snapshot, streamed in the request body from the offset the receiver
/// asked for (see [`SnapshotEnvelope`]).
pub const PATH_SNAPSHOT: &str = "/raft/snapshot";
/// A sender offering a snapshot; the receiver answers where to start.
pub const PATH_SNAPSHOT_OFFER: &str = "/raft/snapshot-offer";
/// A client write forwarded by a follower to the leader.
pub const PATH_FORWARD_WRITE: &str = "/keel/forward-write";
/// Several writes a follower relays to the leader in one call: a
/// [`ForwardWrites`] body, answered by one [`ForwardReply`] per write, in
/// order.
pub const PATH_FORWARD_WRITES: &str = "/keel/forward-writes";
/// Most writes one [`PATH_FORWARD_WRITES`] call may carry.
pub const MAX_FORWARD_BATCH: usize = 1024;
/// A follower asking the leader for a read index (linearizable reads).
pub const PATH_READ_INDEX: &str = "/keel/read-index";
/// An admin API call relayed by a follower to the leader (membership
/// changes and leader transfer run on the leader).
pub const PATH_API_FORWARD: &str = "/keel/api-forward";

/// Header naming the cluster the sender belongs to.
pub const HDR_CLUSTER: &str = "x-keel-cluster";
/// Header naming the sender's node id.
pub const HDR_FROM: &str = "x-keel-from";

/// Content type of every peer message.
pub const CONTENT_TYPE: &str = "application/x-keel-bincode";

/// Largest non-snapshot message accepted (a batch of log entries).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Encodes a message.
pub fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    encode_into(&mut out, v)?;
    Ok(out)
}

/// A first guess at an encoded message's size: a replication frame of a
/// few writes fits without growing the buffer.
const ENCODE_CAPACITY: usize = 1024;

/// Appends the encoding of `v` to `out`, in one pass: bincode's own
/// `serialize` walks the value twice, once to size the buffer and to check
/// the limit, once to write it. The limit is checked on the result instead.
fn encode_into<T: Serialize>(out: &mut Vec<u8>, v: &T) -> io::Result<()> {
    use bincode::Options;
    let start = out.len();
    options()
        .with_no_limit()
        .serialize_into(&mut *out, v)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if out.len() - start > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "message of {} bytes exceeds the {MAX_MESSAGE}-byte limit",
                out.len() - start
            ),
        ));
    }
    Ok(())
}

/// Varint integers, little endian, no trailing bytes, bounded allocations.
fn options() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(MAX_MESSAGE as u64)
}

/// Decodes a message, refusing trailing garbage and absurd lengths.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    use bincode::Options;
    options()
        .deserialize(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed peer message: {e}")))
}

/// Encodes `v` as one frame of a framed stream: `u32 LE length ++ bincode`.
pub fn frame<T: Serialize>(v: &T) -> io::Result<bytes::Bytes> {
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.extend_from_slice(&[0; 4]);
    encode_into(&mut out, v)?;
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out.into())
}

/// Splits a byte stream into frames written by [`frame`], keeping at most one
/// partial frame buffered.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Adds bytes as they arrive.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's message, if one is buffered.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> io::Result<Option<T>> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let n = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if n > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {n} bytes"),
            ));
        }
        if self.buf.len() < 4 + n {
            return Ok(None);
        }
        let v = decode(&self.buf[4..4 + n])?;
        self.buf.drain(..4 + n);
        Ok(Some(v))
    }

    /// True when no partial frame is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Reply of the leader to a forwarded write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    /// Applied at `index` with this response.
    Applied {
        /// Log index of the write.
        index: u64,
        /// The state machine's answer.
        response: Response,
    },
    /// The receiver is not the leader; `leader` is who it thinks is.
    NotLeader {
        /// The leader it knows of, if any.
        leader: Option<u64>,
    },
    /// The write failed for another reason (it may still have committed).
    Failed(String),
}

/// Reply of the leader to a read-index request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadIndexReply {
    /// Reads are linearizable once the asker has applied up to `index`.
    Ready {
        /// The log index to wait for.
        index: u64,
    },
    /// The receiver is not the leader.
    NotLeader {
        /// The leader it knows of, if any.
        leader: Option<u64>,
    },
    /// Leadership could not be confirmed.
    Failed(String),
}

/// A forwarded write.
pub type ForwardWrite = Request;
/// Forwarded writes, proposed in this order.
pub type ForwardWrites = Vec<Request>;

/// An API request relayed to the leader. The body is opaque here; the
/// receiving node runs it through its own API router as `caller`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiForward {
    /// HTTP method.
    pub method: String,
    /// Path and query string.
    pub path_and_query: String,
    /// The request headers that matter to the handler (e.g. `if-match`).
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Vec<u8>,
    /// The identity of the original caller as the relaying node verified it
    /// (`node/3`, `admin/ops`, ...); `None` in insecure mode.
    pub caller: Option<String>,
    /// The original caller's socket address.
    pub remote: String,
}

/// The leader's answer to a relayed API request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiForwardReply {
    /// HTTP status.
    pub status: u16,
    /// Response headers worth passing on (`content-type`, `etag`, `retry-after`).
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

/// First part of a snapshot transfer, before the file bytes: the body is
/// `u32 LE length ++ bincode(envelope)`, then the file from `offset` on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotEnvelope {
    /// The sending leader's vote.
    pub vote: keel_storage::types::Vote,
    /// Snapshot metadata (last included log id, membership).
    pub meta: keel_storage::types::SnapshotMeta,
    /// Which file this is (size and fingerprint included).
    pub id: SnapshotId,
    /// Offset of the first byte that follows: what the receiver said it has.
    pub offset: u64,
}

/// A sender proposing a snapshot before streaming it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotOffer {
    /// The sending leader's vote.
    pub vote: keel_storage::types::Vote,
    /// Snapshot metadata (last included log id, membership).
    pub meta: keel_storage::types::SnapshotMeta,
    /// Which file this is.
    pub id: SnapshotId,
}

/// The receiver's answer to a [`SnapshotOffer`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OfferReply {
    /// Send the file from this offset: the receiver holds (and verified)
    /// every byte before it from an earlier attempt; 0 means from the start.
    Resume {
        /// First byte to send.
        from: u64,
    },
    /// The receiver has committed this snapshot's state already (e.g. it
    /// installed it and the answer got lost): nothing to send.
    Covered {
        /// The receiver's vote.
        vote: keel_storage::types::Vote,
    },
    /// Another transfer is still finishing; offer again shortly.
    Busy,
    /// The receiver will not take this snapshot.
    Refused(String),
}

/// The receiver's answer once a snapshot transfer attempt ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapshotReply {
    /// Complete, verified and handed to Raft.
    Installed(openraft::raft::SnapshotResponse<keel_storage::TypeConfig>),
    /// A frame failed verification or the stream ended before the trailer:
    /// resend from `from`, the end of the last verified frame.
    Resend {
        /// First byte to send again.
        from: u64,
        /// What went wrong.
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_any_byte_boundary() {
        let mut bytes = Vec::new();
        for i in 0..50u64 {
            bytes.extend_from_slice(&frame(&(i, "x".repeat(i as usize))).unwrap());
        }
        for step in [1, 3, 7, 64, 4096] {
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(step) {
                r.push(chunk);
                while let Some(v) = r.next_message::<(u64, String)>().unwrap() {
                    got.push(v.0);
                }
            }
            assert_eq!(got, (0..50).collect::<Vec<_>>());
            assert!(r.is_empty());
        }
        let mut r = FrameReader::default();
        r.push(&u32::MAX.to_le_bytes());
        assert!(r.next_message::<u64>().is_err(), "oversized frame must be refused");
    }

    #[test]
    fn one_pass_encoding_matches_bincode() {
        // The format is what peers of other versions decode: it must not
        // move when the encoder does.
        use bincode::Options;
        let reference = |v: &(u64, String, Vec<u8>)| bincode::DefaultOptions::new().serialize(v).unwrap();
        for n in [0, 1, 300, ENCODE_CAPACITY, 10 * ENCODE_CAPACITY + 3] {
            let v = (n as u64 * 1_000_003, "k".repeat(n % 17), vec![7u8; n]);
            let want = reference(&v);
            assert_eq!(encode(&v).unwrap(), want);
            let f = frame(&v).unwrap();
            assert_eq!(&f[..4], &(want.len() as u32).to_le_bytes());
            assert_eq!(&f[4..], &want[..]);
        }
        let over = encode(&vec![0u8; MAX_MESSAGE]).unwrap_err();
        assert!(over.to_string().contains("exceeds"), "{over}");
    }

    #[test]
    fn decode_refuses_garbage_and_trailing_bytes() {
        let bytes = encode(&ReadIndexReply::Ready { index: 7 }).unwrap();
        assert!(matches!(
            decode::<ReadIndexReply>(&bytes).unwrap(),
            ReadIndexReply::Ready { index: 7 }
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode::<ReadIndexReply>(&longer).is_err());
        assert!(decode::<ReadIndexReply>(&[0xff; 3]).is_err());
        // A length prefix claiming far more than the limit is refused, not allocated.
        assert!(decode::<Vec<u8>>(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}

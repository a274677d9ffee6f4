//! The peer protocol decoder (`keel_raft::wire`) on arbitrary bytes: every
//! message type a node decodes from a peer's request or answer, and the
//! framed append stream. Decoding must never panic, overflow the stack
//! (nested transactions) or allocate beyond the message limit, and whatever
//! decodes must encode and decode again to the same bytes.
//!
//! The first input byte picks the message type; the rest is the body.

#![no_main]

use keel_raft::wire;
use keel_storage::TypeConfig;
use libfuzzer_sys::fuzz_target;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decodes; if that works, the message must survive a second round trip
/// byte for byte (the first one may normalise, e.g. over-long varints).
fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) {
    if let Ok(v) = wire::decode::<T>(body) {
        let bytes = wire::encode(&v).expect("a decoded message encodes");
        let again: T = wire::decode(&bytes).expect("an encoded message decodes");
        assert_eq!(wire::encode(&again).expect("encodes"), bytes, "encoding is not stable");
    }
}

/// The append stream: frames of `u32 LE length ++ bincode`, fed in slices
/// the input chooses, until the reader reports an error.
fn frames<T: DeserializeOwned>(body: &[u8]) {
    let mut r = wire::FrameReader::default();
    let mut step = 1 + body.first().map_or(0, |b| *b as usize % 29);
    for piece in body.chunks(step) {
        r.push(piece);
        loop {
            match r.next_message::<T>() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        step = step * 5 % 251 + 1;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 16 {
        0 => round_trip::<AppendEntriesRequest<TypeConfig>>(body),
        1 => round_trip::<AppendEntriesResponse<TypeConfig>>(body),
        2 => round_trip::<VoteRequest<TypeConfig>>(body),
        3 => round_trip::<VoteResponse<TypeConfig>>(body),
        4 => round_trip::<TransferLeaderRequest<TypeConfig>>(body),
        5 => round_trip::<wire::ForwardWrite>(body),
        6 => round_trip::<wire::ForwardReply>(body),
        7 => round_trip::<wire::ReadIndexReply>(body),
        8 => round_trip::<wire::ApiForward>(body),
        9 => round_trip::<wire::ApiForwardReply>(body),
        10 => round_trip::<wire::SnapshotOffer>(body),
        11 => round_trip::<wire::OfferReply>(body),
        12 => round_trip::<wire::SnapshotEnvelope>(body),
        13 => round_trip::<wire::SnapshotReply>(body),
        14 => frames::<AppendEntriesRequest<TypeConfig>>(body),
        _ => frames::<StreamAppendResult<TypeConfig>>(body),
    }
});

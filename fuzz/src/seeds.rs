//! Writes the seed corpus of the fuzz targets: a few small valid inputs, so
//! the fuzzer starts from real snapshot files, peer messages and log files
//! instead of discovering the formats byte by byte.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --bin seeds -- fuzz/seeds`
//! (re)writes `fuzz/seeds/<target>/*`; the files are committed.

use std::path::Path;

use keel_raft::wire;
use keel_storage::TypeConfig;
use keel_storage::model::Command;
use keel_storage::model::Expect;
use keel_storage::model::Request;
use keel_storage::model::Response;
use keel_storage::model::Txn;
use keel_storage::snapshot::format::SnapshotHeader;
use keel_storage::snapshot::format::SnapshotWriter;
use keel_storage::types::Entry;
use keel_storage::types::LogId;
use keel_storage::types::Vote;
use keel_storage::wal_check::WalWriter;
use openraft::entry::RaftEntry;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::raft::AppendEntriesRequest;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn snapshot(records: &[(&str, &str)], target: usize) -> Vec<u8> {
    let header = SnapshotHeader {
        cluster_id: "seed".into(),
        meta: vec![1, 2, 3],
        last_index: 7,
        last_term: 2,
        created_unix_ms: 1_700_000_000_000,
    };
    let mut w = SnapshotWriter::with_chunk_target(Vec::new(), &header, target).unwrap();
    for (k, v) in records {
        w.put(k.as_bytes(), v.as_bytes()).unwrap();
    }
    w.finish().unwrap().1
}

fn request(command: Command) -> Request {
    Request {
        time_ms: 1_700_000_000_000,
        idempotency_key: Some("idem-1".into()),
        command,
    }
}

/// One input of `peer_decode`: the type selector byte, then the body.
fn peer(dir: &Path, name: &str, which: u8, body: &[u8]) {
    write(dir, "peer_decode", name, &[&[which][..], body].concat());
}

/// One input of `wal_scan`: the file's number (4 bytes), then the file.
fn wal(dir: &Path, name: &str, number: u32, file: &[u8]) {
    write(dir, "wal_scan", name, &[&number.to_le_bytes()[..], file].concat());
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: seeds <output dir>");
    let dir = Path::new(&dir);

    // A fresh file, a legacy one, and a reused one: new records over an
    // earlier use's.
    let mut fresh = WalWriter::new(7, true);
    let mut legacy = WalWriter::new(7, false);
    let mut old = WalWriter::new(3, true);
    for i in 0..6u8 {
        fresh.add(&[i; 40]);
        legacy.add(&[i; 40]);
        old.add(&[i; 90]);
    }
    wal(dir, "fresh.log", 7, &fresh.out);
    wal(dir, "legacy.log", 7, &legacy.out);
    let mut reused = old.out.clone();
    reused[..fresh.out.len()].copy_from_slice(&fresh.out);
    wal(dir, "reused.log", 7, &reused);

    write(dir, "snapshot_decode", "empty.snap", &snapshot(&[], 1 << 20));
    let records = [
        ("kv/a", "1"),
        ("kv/b", "\"two\""),
        ("kv/c", ""),
        ("workers/w1", "{\"url\":\"http://w\"}"),
    ];
    write(dir, "snapshot_decode", "three-chunks.snap", &snapshot(&records, 24));

    let put = Command::Put {
        key: "kv/a".into(),
        value: b"{\"x\":1}".to_vec(),
        expect: Some(Expect::Revision(3)),
    };
    let txn = Command::Txn(Txn {
        compares: vec![("kv/a".into(), Expect::Present)],
        success: vec![
            put.clone(),
            Command::Delete {
                key: "kv/b".into(),
                expect: None,
            },
        ],
        failure: vec![Command::CounterAdd {
            name: "c".into(),
            delta: -2,
        }],
    });
    let log_id = |index| LogId::new(LeaderId { term: 2, node_id: 1 }, index);
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new(2, 1),
        prev_log_id: Some(log_id(4)),
        entries: vec![
            Entry::new_blank(log_id(5)),
            Entry::new_normal(log_id(6), request(put.clone())),
            Entry::new_normal(log_id(7), request(txn.clone())),
        ],
        leader_commit: Some(log_id(4)),
    };
    peer(dir, "append", 0, &wire::encode(&append).unwrap());
    peer(dir, "forward-write", 5, &wire::encode(&request(txn)).unwrap());
    let reply = wire::ForwardReply::Applied {
        index: 9,
        response: Response::Txn {
            succeeded: true,
            revision: 9,
            results: vec![Response::Written {
                revision: 9,
                created: true,
            }],
        },
    };
    peer(dir, "forward-reply", 6, &wire::encode(&reply).unwrap());
    peer(
        dir,
        "read-index-reply",
        7,
        &wire::encode(&wire::ReadIndexReply::Ready { index: 3 }).unwrap(),
    );
    let forward = wire::ApiForward {
        method: "POST".into(),
        path_and_query: "/admin/members?force=true".into(),
        headers: vec![("if-match".into(), "3".into())],
        body: b"{\"id\":4}".to_vec(),
        caller: Some("admin/ops".into()),
        remote: "127.0.0.1:5000".into(),
    };
    peer(dir, "api-forward", 8, &wire::encode(&forward).unwrap());
    peer(
        dir,
        "offer-reply",
        11,
        &wire::encode(&wire::OfferReply::Resume { from: 4096 }).unwrap(),
    );
    let stream = [wire::frame(&append).unwrap(), wire::frame(&append).unwrap()].concat();
    peer(dir, "append-stream", 14, &stream);
}

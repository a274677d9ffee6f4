//! Disaster recovery: seeding the members of a new cluster with the state
//! of a backup snapshot (`keel snapshot restore`, once per member).
//!
//! The backup carries the old cluster's name and membership. Neither is
//! kept: the new node's data directory is recorded for the new cluster's
//! name, and the membership becomes the new cluster's initial members (all
//! voters), recorded at the snapshot's last log id. The state (every key,
//! value and revision) and the last log id are kept, so revisions continue
//! where the backup left off. A vote at the snapshot's term is stored too:
//! the first election of the new cluster then happens in a later term than
//! any entry the snapshot covers, as Raft requires.
//!
//! The procedure is in `DESIGN.md` beside this file.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::io::BufReader;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::RaftLogStorage;

use super::SnapshotFile;
use super::format::SnapshotReader;
use super::snap_err;
use crate::NoHooks;
use crate::types::KeelNode;
use crate::types::LogId;
use crate::types::Membership;
use crate::types::NodeId;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;
use crate::types::Vote;

/// Where and as what the backup is restored.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// The new node's data directory; must not exist or be empty.
    pub data_dir: PathBuf,
    /// The new cluster's name.
    pub cluster_name: String,
    /// The new node's id, one of `members`.
    pub node_id: NodeId,
    /// The new cluster's initial members.
    pub members: BTreeMap<NodeId, KeelNode>,
}

/// What was restored.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The cluster the backup was taken from.
    pub source_cluster: String,
    /// Voters of the backup's membership.
    pub source_voters: Vec<NodeId>,
    /// Last log id the state includes.
    pub last_log_id: LogId,
    /// Number of records restored.
    pub records: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Restores `backup` into a new data directory (see the module docs).
pub async fn restore(backup: &Path, target: &RestoreTarget) -> io::Result<RestoreReport> {
    if !target.members.contains_key(&target.node_id) {
        return Err(invalid(format!(
            "node {} is not among the new cluster's members {:?}",
            target.node_id,
            target.members.keys().collect::<Vec<_>>()
        )));
    }
    if fs::read_dir(&target.data_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(invalid(format!(
            "data directory {} is not empty; restore only into a new one",
            target.data_dir.display()
        )));
    }
    let path = backup.to_path_buf();
    let (header, summary) = tokio::task::spawn_blocking(move || super::format::verify_file(&path))
        .await
        .map_err(io::Error::other)?
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("backup failed verification: {e}")))?;
    let old = super::decode_meta(&header)?;
    let last = old
        .last_log_id
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "backup has no last log id"))?;
    let voters: BTreeSet<NodeId> = target.members.keys().copied().collect();
    let membership = Membership::new(vec![voters], target.members.clone()).map_err(|e| invalid(e.to_string()))?;
    let meta = SnapshotMeta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(Some(last), membership),
    };
    let storage = crate::open(&target.data_dir, &target.cluster_name, Arc::new(NoHooks))
        .await
        .map_err(io::Error::other)?;
    let shared = storage.state_machine.shared.clone();
    let (src, cluster, new_meta) = (backup.to_path_buf(), target.cluster_name.clone(), meta.clone());
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        // The same records under a header for the new cluster, installed
        // through the ordinary (verified, atomic) install path.
        let mut r = SnapshotReader::new(BufReader::new(fs::File::open(&src)?)).map_err(snap_err)?;
        let records = std::iter::from_fn(|| r.next_record().map_err(snap_err).transpose());
        let tmp = shared.snapshots.write_temp(&cluster, &new_meta, records)?;
        super::install(&shared, &new_meta, SnapshotFile::open(tmp)?)?;
        Ok(())
    })
    .await
    .map_err(io::Error::other)??;
    let mut log = storage.log;
    log.save_vote(&Vote::new(last.leader_id.term, target.node_id)).await?;
    let source_voters = old.last_membership.membership().voter_ids().collect();
    Ok(RestoreReport {
        source_cluster: header.cluster_id,
        source_voters,
        last_log_id: last,
        records: summary.records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StateMachineStore;
    use openraft::RaftSnapshotBuilder;
    use openraft::storage::RaftStateMachine;

    fn node(port: u16) -> KeelNode {
        KeelNode {
            raft_addr: format!("127.0.0.1:{port}"),
            api_addr: format!("127.0.0.1:{}", port + 1),
        }
    }

    #[tokio::test]
    async fn restore_keeps_the_state_and_replaces_name_and_membership() {
        let td = tempfile::tempdir().unwrap();
        // A source state machine with some data, as a backup file.
        let src = td.path().join("src");
        let sm = StateMachineStore::open(&src, "old-cluster", Arc::new(NoHooks)).unwrap();
        {
            let db = sm.shared.db();
            let data = db.cf_handle(crate::state_machine::CF_DATA).unwrap();
            let meta = db.cf_handle(crate::state_machine::CF_META).unwrap();
            for i in 0..500u32 {
                db.put_cf(data, format!("kv/{i:04}"), i.to_le_bytes()).unwrap();
            }
            let last = openraft::testing::log_id::<crate::TypeConfig>(7, 2, 1234);
            db.put_cf(
                meta,
                crate::state_machine::KEY_APPLIED,
                crate::codec::encode(&last).unwrap(),
            )
            .unwrap();
        }
        let src_hash = sm.reader().state_hash().unwrap();
        let mut sm2 = sm;
        let backup = sm2.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let backup_path = backup.snapshot.path.clone();

        let target = RestoreTarget {
            data_dir: td.path().join("new"),
            cluster_name: "new-cluster".into(),
            node_id: 4,
            members: [(4, node(9000)), (5, node(9002))].into_iter().collect(),
        };
        let report = restore(&backup_path, &target).await.unwrap();
        assert_eq!((report.source_cluster.as_str(), report.records), ("old-cluster", 500));
        assert_eq!(report.last_log_id.index, 1234);

        // The log's fsync thread lets go of its database shortly after the
        // store is dropped.
        let mut tries = 0;
        let s = loop {
            match crate::open(&target.data_dir, "new-cluster", Arc::new(NoHooks)).await {
                Ok(s) => break s,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let h = s.reader.state_hash().unwrap();
        assert_eq!((h.records, &h.hash, h.applied_index), (500, &src_hash.hash, 1234));
        let mut sm = s.state_machine;
        let (applied, membership) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(1234));
        assert_eq!(membership.membership().voter_ids().collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(s.log.stored_vote().unwrap().map(|v| v.leader_id.term), Some(7));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        let (header, _) = super::super::format::verify_file(&current.snapshot.path).unwrap();
        assert_eq!(header.cluster_id, "new-cluster");
        drop((sm, s.log));

        // Refusals: a non-empty directory, a node that is not a member.
        assert!(restore(&backup_path, &target).await.is_err());
        let mut t2 = target.clone();
        t2.data_dir = td.path().join("other");
        t2.node_id = 6;
        assert!(restore(&backup_path, &t2).await.is_err());
        assert!(!t2.data_dir.exists());
        // A corrupt backup is refused before anything is created.
        let mut bytes = fs::read(&backup_path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x08;
        let bad = td.path().join("bad.snap");
        fs::write(&bad, bytes).unwrap();
        t2.node_id = 4;
        assert!(restore(&bad, &t2).await.is_err());
        assert!(!t2.data_dir.exists());
    }
}

//! The RocksDB side of snapshots: the directory of finished snapshot files,
//! building a snapshot from a consistent view of the state machine, and
//! installing a received one as a new state machine generation.

use std::fs;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Instant;
use std::time::SystemTime;

use openraft::RaftSnapshotBuilder;
use rocksdb::IteratorMode;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;

use super::SnapshotFile;
use super::decode_meta;
use super::format;
use super::format::SnapshotHeader;
use super::format::SnapshotReader;
use super::format::SnapshotWriter;
use super::quarantine;
use super::transfer;
use crate::codec::db_err;
use crate::codec::decode;
use crate::codec::encode;
use crate::failpoints::crash_point;
use crate::fsutil;
use crate::state_machine::CF_DATA;
use crate::state_machine::CF_META;
use crate::state_machine::KEY_APPLIED;
use crate::state_machine::KEY_MEMBERSHIP;
use crate::state_machine::Shared;
use crate::types::LogId;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;
use crate::types::TypeConfig;

pub(super) fn snap_err(e: format::SnapshotError) -> io::Error {
    match e {
        format::SnapshotError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// The directory of finished snapshots (`<index>-<term>.snap`, newest kept)
/// and of transfers in progress (`incoming/`).
pub(crate) struct SnapshotStore {
    dir: PathBuf,
    cluster_name: String,
    seq: AtomicU64,
}

impl SnapshotStore {
    pub(crate) fn open(dir: &Path, cluster_name: &str) -> io::Result<Self> {
        fsutil::create_private_dir(dir)?;
        fsutil::create_private_dir(&dir.join("incoming"))?;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with("tmp-") {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            cluster_name: cluster_name.to_string(),
            seq: AtomicU64::new(0),
        })
    }

    pub(super) fn temp_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("tmp-{}-{n}", std::process::id()))
    }

    /// Writes `records` (in key order) as a snapshot file with the header
    /// for `cluster_name` and `meta` into a new temporary file of this
    /// store, fsynced; returns its path, ready to publish or install.
    pub(super) fn write_temp<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        cluster_name: &str,
        meta: &SnapshotMeta,
        records: impl Iterator<Item = io::Result<(K, V)>>,
    ) -> io::Result<PathBuf> {
        let tmp = self.temp_path();
        let out = BufWriter::new(fs::File::create(&tmp)?);
        let mut w = SnapshotWriter::new(out, &header_for(cluster_name, meta)?).map_err(snap_err)?;
        for record in records {
            let (k, v) = record?;
            w.put(k.as_ref(), v.as_ref()).map_err(snap_err)?;
        }
        let (_, out) = w.finish().map_err(snap_err)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(tmp)
    }

    fn final_path(&self, meta: &SnapshotMeta) -> PathBuf {
        let (index, term) = meta
            .last_log_id
            .as_ref()
            .map(|l| (l.index, l.leader_id.term))
            .unwrap_or_default();
        self.dir.join(format!("{index:020}-{term:020}.snap"))
    }

    /// Paths of finished snapshots, oldest first.
    fn finished(&self) -> io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "snap"))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Moves a complete, fsynced snapshot file into place and drops older ones.
    fn publish(&self, from: &Path, meta: &SnapshotMeta) -> io::Result<PathBuf> {
        let to = self.final_path(meta);
        fs::File::open(from)?.sync_all()?;
        fs::rename(from, &to)?;
        fsutil::fsync_dir(&self.dir)?;
        for old in self.finished()? {
            if old < to {
                fsutil::remove_if_present(&old)?;
            }
        }
        Ok(to)
    }

    /// The newest finished snapshot that passes the cheap check (header,
    /// trailer, size), if any. A stored file failing it is set aside as
    /// `.corrupt`; the second value tells whether that happened now or
    /// earlier (a corrupt file is still there), so the caller can rebuild.
    fn newest_valid(
        &self,
    ) -> io::Result<(
        Option<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>>,
        bool,
    )> {
        self.newest_valid_listed(|| self.finished())
    }

    /// [`Self::newest_valid`] over the listings `list` gives. A snapshot
    /// being built meanwhile publishes a newer file and removes the older
    /// ones, maybe between a listing and the open of a file in it: a listed
    /// file that is gone means a newer one is in place, so the listing is
    /// taken again (a bounded number of times; publishing takes a fsync of
    /// a whole snapshot, far longer than a listing and an open).
    fn newest_valid_listed(
        &self,
        mut list: impl FnMut() -> io::Result<Vec<PathBuf>>,
    ) -> io::Result<(
        Option<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>>,
        bool,
    )> {
        let mut lost = self.has_quarantined()?;
        let mut relisted = 0;
        'listing: loop {
            for path in list()?.into_iter().rev() {
                let file = match SnapshotFile::open(path.clone()) {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound && relisted < RELIST_LIMIT => {
                        relisted += 1;
                        continue 'listing;
                    }
                    Err(e) => return Err(e),
                };
                let checked = transfer::identify(&file.file)
                    .map_err(snap_err)
                    .and_then(|(header, _)| decode_meta(&header));
                match checked {
                    Ok(meta) => {
                        return Ok((
                            Some(openraft::type_config::alias::SnapshotOf::<TypeConfig, SnapshotFile> {
                                meta,
                                snapshot: file,
                            }),
                            lost,
                        ));
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "stored snapshot is corrupt; setting it aside");
                        quarantine(&file)?;
                        lost = true;
                    }
                }
            }
            return Ok((None, lost));
        }
    }

    fn has_quarantined(&self) -> io::Result<bool> {
        Ok(fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".corrupt")))
    }
}

/// How many times [`SnapshotStore::newest_valid`] lists the directory again
/// after a listed file vanished.
const RELIST_LIMIT: usize = 8;

/// The snapshot openraft should use: the newest stored one that passes the
/// cheap check, or, when a stored snapshot was found corrupt and none is
/// left, a new one built from the state machine (never a corrupt one).
pub(crate) fn current_or_rebuild(
    shared: &Shared,
) -> io::Result<Option<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>>> {
    let (found, lost) = shared.snapshots.newest_valid()?;
    if found.is_some() || !lost {
        return Ok(found);
    }
    if crate::state_machine::read_applied(&shared.db())?.0.is_none() {
        return Ok(None);
    }
    tracing::warn!("no intact stored snapshot left: building a new one from the state machine");
    let start = Instant::now();
    let res = build(shared);
    let bytes = res.as_ref().ok().and_then(|s| s.snapshot.len().ok()).unwrap_or(0);
    shared.hooks.snapshot_built(res.is_ok(), start.elapsed(), bytes);
    res.map(Some)
}

/// Builds snapshots from a consistent RocksDB view; writes continue meanwhile.
pub struct SnapshotBuilder {
    pub(crate) shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let shared = self.shared.clone();
        let start = Instant::now();
        let res = tokio::task::spawn_blocking(move || build(&shared))
            .await
            .map_err(io::Error::other)?;
        let bytes = res.as_ref().ok().and_then(|s| s.snapshot.len().ok()).unwrap_or(0);
        self.shared.hooks.snapshot_built(res.is_ok(), start.elapsed(), bytes);
        if let Ok(s) = &res {
            tracing::info!(last = ?s.meta.last_log_id, bytes, ms = start.elapsed().as_millis() as u64, "snapshot built");
        }
        res
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn header_for(cluster_name: &str, meta: &SnapshotMeta) -> io::Result<SnapshotHeader> {
    let (last_index, last_term) = meta
        .last_log_id
        .as_ref()
        .map(|l| (l.index, l.leader_id.term))
        .unwrap_or_default();
    Ok(SnapshotHeader {
        cluster_id: cluster_name.to_string(),
        meta: encode(meta)?,
        last_index,
        last_term,
        created_unix_ms: now_ms(),
    })
}

fn build(shared: &Shared) -> io::Result<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>> {
    let db = shared.db();
    let view = db.snapshot();
    // Everything the view holds becomes durable before the log may be purged
    // up to it. Flushed after the view is taken, so the flush covers every
    // entry the snapshot does (and any applied since): after a crash the
    // state machine starts at or past the snapshot, not behind the purge.
    crate::state_machine::persist(&db)?;
    let meta_cf = db.cf_handle(CF_META).expect("meta column family");
    let last_log_id: Option<LogId> = match view.get_cf(meta_cf, KEY_APPLIED).map_err(db_err)? {
        Some(b) => Some(decode(&b, "last_applied")?),
        None => None,
    };
    let last_membership: StoredMembership = match view.get_cf(meta_cf, KEY_MEMBERSHIP).map_err(db_err)? {
        Some(b) => decode(&b, "membership")?,
        None => StoredMembership::default(),
    };
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
    };
    let store = &shared.snapshots;
    let data_cf = db.cf_handle(CF_DATA).expect("data column family");
    let records = view
        .iterator_cf(data_cf, IteratorMode::Start)
        .map(|item| item.map_err(db_err));
    let tmp = store.write_temp(&store.cluster_name, &meta, records)?;
    // Opened before it is published: once in place, the file may be
    // replaced and removed by a newer snapshot at any moment.
    let file = fs::File::open(&tmp)?;
    let path = store.publish(&tmp, &meta)?;
    crash_point("snap-build-published");
    Ok(openraft::type_config::alias::SnapshotOf::<TypeConfig, SnapshotFile> {
        meta,
        snapshot: SnapshotFile { path, file },
    })
}

/// Installs a received snapshot. Returns the new applied index, or `None`
/// when the snapshot is not newer than the applied state (it is then left
/// alone: `last_applied` never moves backwards).
///
/// The steps and what a crash after each leaves are in `DESIGN.md`; each
/// step boundary has a failpoint (see [`crate::failpoints`]).
pub(crate) fn install(shared: &Shared, meta: &SnapshotMeta, snapshot: SnapshotFile) -> io::Result<Option<u64>> {
    let applied = crate::state_machine::read_applied(&shared.db())?.0;
    if meta.last_log_id <= applied {
        tracing::warn!(snapshot = ?meta.last_log_id, ?applied, "refusing a snapshot that is not newer than the applied state");
        // openraft may now purge the log up to the snapshot: make sure the
        // applied state that covers it is durable first.
        crate::state_machine::persist(&shared.db())?;
        return Ok(None);
    }
    // 1. Verify everything before changing anything.
    let (header, summary) = format::verify_file(&snapshot.path).map_err(snap_err)?;
    if header.cluster_id != shared.snapshots.cluster_name {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "snapshot belongs to cluster {:?}, this node to {:?}",
                header.cluster_id, shared.snapshots.cluster_name
            ),
        ));
    }
    let file_meta: SnapshotMeta = decode_meta(&header)?;
    if file_meta.last_log_id != meta.last_log_id {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot file does not match the metadata it was sent with",
        ));
    }
    crash_point("snap-verified");
    // 2. Build the next generation beside the live one. Its writes skip the
    // WAL: the generation becomes live only after every column family is
    // flushed to (synced) table files, and a crash before the switch throws
    // the whole directory away.
    let sm_dir = &shared.sm_dir;
    let current = crate::state_machine::current_generation_of(sm_dir)?;
    let next = current + 1;
    let next_dir = crate::state_machine::generation_dir(sm_dir, next);
    if next_dir.exists() {
        fs::remove_dir_all(&next_dir)?;
    }
    {
        let db = crate::state_machine::open_generation(&next_dir)?;
        let data_cf = db.cf_handle(CF_DATA).expect("data column family");
        let meta_cf = db.cf_handle(CF_META).expect("meta column family");
        let mut no_wal = WriteOptions::default();
        no_wal.disable_wal(true);
        let mut reader = SnapshotReader::new(BufReader::new(fs::File::open(&snapshot.path)?)).map_err(snap_err)?;
        let mut batch = WriteBatch::default();
        while let Some((k, v)) = reader.next_record().map_err(snap_err)? {
            batch.put_cf(data_cf, k, v);
            if batch.size_in_bytes() > 4 << 20 {
                db.write_opt(std::mem::take(&mut batch), &no_wal).map_err(db_err)?;
            }
        }
        if let Some(l) = &meta.last_log_id {
            batch.put_cf(meta_cf, KEY_APPLIED, encode(l)?);
        }
        batch.put_cf(meta_cf, KEY_MEMBERSHIP, encode(&meta.last_membership)?);
        db.write_opt(batch, &no_wal).map_err(db_err)?;
        db.flush_cf(data_cf).map_err(db_err)?;
        db.flush_cf(meta_cf).map_err(db_err)?;
    }
    fsutil::fsync_dir(sm_dir)?;
    // 3. Keep the file as this node's current snapshot, before the switch:
    // openraft requires a stored snapshot covering the state machine
    // whenever the state machine is ahead of the log, and after a crash
    // between here and the switch it installs this file again at start.
    let published = shared.snapshots.publish(&snapshot.path, meta)?;
    drop(snapshot);
    // 4. The switch: one atomic rename of CURRENT, then a directory fsync.
    let current_path = sm_dir.join("CURRENT");
    let tmp = sm_dir.join(".CURRENT.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(format!("gen-{next}\n").as_bytes())?;
        f.sync_all()?;
    }
    crash_point("snap-before-switch");
    fs::rename(&tmp, &current_path)?;
    crash_point("snap-before-dir-fsync");
    fsutil::fsync_dir(sm_dir)?;
    crash_point("snap-after-dir-fsync");
    let db = Arc::new(crate::state_machine::open_generation(&next_dir)?);
    let old = std::mem::replace(&mut *shared.db.write().expect("state machine lock poisoned"), db);
    crash_point("snap-after-switch");
    retire(old, sm_dir.clone(), next);
    tracing::info!(last = ?meta.last_log_id, records = summary.records, generation = next, file = %published.display(), "snapshot installed");
    Ok(meta.last_log_id.as_ref().map(|l| l.index))
}

/// Removes the replaced generation once no reader holds it any more. With
/// no reader left (always so for `keel snapshot restore`), it is closed here
/// and now: a database still closing in a detached thread when the process
/// exits aborts in RocksDB's static destructors ("pthread lock: Invalid
/// argument").
fn retire(old: Arc<rocksdb::DB>, sm_dir: PathBuf, keep: u64) {
    let remove = move |sm_dir: &PathBuf| {
        if let Err(e) = crate::state_machine::remove_stale_generations(sm_dir, keep) {
            tracing::warn!(error = %e, "could not remove the replaced state machine generation");
        }
    };
    let old = match Arc::try_unwrap(old) {
        Ok(db) => {
            drop(db);
            remove(&sm_dir);
            return;
        }
        Err(shared) => shared,
    };
    std::thread::spawn(move || {
        for _ in 0..600 {
            if Arc::strong_count(&old) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        drop(old);
        remove(&sm_dir);
    });
}

#[cfg(test)]
mod tests {
    use openraft::impls::leader_id_adv::LeaderId;

    use super::*;

    /// Publishes an empty snapshot whose last log id has `index`.
    fn publish_at(store: &SnapshotStore, index: u64) -> PathBuf {
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(LeaderId { term: 1, node_id: 1 }, index)),
            last_membership: StoredMembership::default(),
        };
        let no_records = std::iter::empty::<io::Result<(Vec<u8>, Vec<u8>)>>();
        let tmp = store.write_temp("test", &meta, no_records).unwrap();
        store.publish(&tmp, &meta).unwrap()
    }

    fn index_of(found: Option<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>>) -> Option<u64> {
        found.and_then(|s| s.meta.last_log_id.map(|l| l.index))
    }

    #[test]
    fn a_snapshot_replaced_between_listing_and_opening_is_found_anew() {
        let td = tempfile::TempDir::new().unwrap();
        let store = SnapshotStore::open(td.path(), "test").unwrap();
        let old = publish_at(&store, 10);
        // A reader lists the directory, then a newer snapshot is published
        // (which removes the older one) before the reader opens its file.
        let stale = vec![old.clone()];
        publish_at(&store, 20);
        assert!(!old.exists(), "publishing removes older snapshots");
        let mut listings = vec![stale].into_iter();
        let (found, lost) = store
            .newest_valid_listed(|| listings.next().map_or_else(|| store.finished(), Ok))
            .expect("a vanished file is not an error");
        assert_eq!(index_of(found), Some(20));
        assert!(!lost);
    }

    #[test]
    fn a_directory_that_keeps_changing_is_an_error_not_a_loop() {
        let td = tempfile::TempDir::new().unwrap();
        let store = SnapshotStore::open(td.path(), "test").unwrap();
        let gone = td.path().join("00000000000000000005-00000000000000000001.snap");
        let mut listings = 0;
        let err = store
            .newest_valid_listed(|| {
                listings += 1;
                Ok(vec![gone.clone()])
            })
            .expect_err("gives up");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(listings, RELIST_LIMIT + 1);
    }

    #[test]
    fn a_snapshot_held_open_stays_readable_after_a_newer_one_replaces_it() {
        let td = tempfile::TempDir::new().unwrap();
        let store = SnapshotStore::open(td.path(), "test").unwrap();
        publish_at(&store, 10);
        let (found, _) = store.newest_valid().unwrap();
        let held = found.expect("a snapshot");
        publish_at(&store, 20);
        assert!(!held.snapshot.path.exists());
        // The handle still reads the whole file, as a transfer in progress needs.
        let (header, _) = transfer::identify(&held.snapshot.file).expect("still readable");
        assert_eq!(header.last_index, 10);
        assert_eq!(index_of(store.newest_valid().unwrap().0), Some(20));
    }
}

//! The replicated state machine on RocksDB.
//!
//! Layout under `<data_dir>/sm/`: `CURRENT` names the live generation
//! directory (`gen-<n>`), a RocksDB with column families `data` (key ->
//! checksummed [`Object`]) and `meta` (`last_applied`, `membership`).
//! A snapshot install builds generation `n+1` beside the live one and switches
//! by replacing `CURRENT` atomically (temp file, fsync, rename, directory
//! fsync), so a crash leaves the old state or the new one, never a mix.
//!
//! Each batch of entries is applied in one `WriteBatch` together with
//! `last_applied` and the last membership, without RocksDB's write-ahead log:
//! the Raft log already holds every applied entry durably, so the state
//! machine's own log would only write each put a second time. What is on
//! disk is the memtables RocksDB has flushed, and every column family is
//! flushed together (`atomic_flush`), so the stored `last_applied` always
//! matches the stored data. After a crash (of the process or the machine)
//! the node starts from that older state and re-applies the committed tail
//! from the log (openraft's `get_initial_state`). A graceful close flushes
//! the memtables. They are flushed before a snapshot is built ([`persist`]),
//! because only then may the log be purged.

use std::collections::BTreeMap;
use std::fs;
use std::hash::Hasher;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Instant;

use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::entry::RaftEntry;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::IteratorMode;
use rocksdb::Options;
use rocksdb::ReadOptions;
use rocksdb::WriteBatch;
use tokio::sync::watch;

use crate::codec::db_err;
use crate::codec::decode;
use crate::codec::encode;
use crate::hooks::StorageHooks;
use crate::model;
use crate::model::Object;
use crate::model::Overlay;
use crate::model::ReadState;
use crate::model::Response;
use crate::snapshot::SnapshotBuilder;
use crate::snapshot::SnapshotFile;
use crate::snapshot::SnapshotStore;
use crate::types::LogId;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;
use crate::types::TypeConfig;

pub(crate) const CF_DATA: &str = "data";
pub(crate) const CF_META: &str = "meta";
pub(crate) const KEY_APPLIED: &[u8] = b"last_applied";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"membership";

/// State shared by the state machine, its snapshot builder and readers.
pub(crate) struct Shared {
    pub(crate) sm_dir: PathBuf,
    pub(crate) db: RwLock<Arc<DB>>,
    pub(crate) snapshots: SnapshotStore,
    pub(crate) hooks: Arc<dyn StorageHooks>,
    /// Last applied log index, for readers waiting on the state machine.
    pub(crate) applied_tx: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn db(&self) -> Arc<DB> {
        self.db.read().expect("state machine lock poisoned").clone()
    }
}

/// Opens a state machine database generation with keel's column families.
pub(crate) fn open_generation(dir: &Path) -> io::Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // A corrupt record in the middle of the write-ahead log fails the open
    // instead of silently dropping it and everything after it (RocksDB's
    // default, point-in-time recovery); only an incomplete last record, one
    // a crash cut short before its sync returned, is tolerated.
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
    // Applies skip the WAL: without atomic flushes a crash could leave the
    // data column family flushed past the `last_applied` in `meta`, and the
    // re-apply would apply those entries a second time.
    opts.set_atomic_flush(true);
    let cfs = [CF_DATA, CF_META].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    DB::open_cf_descriptors(&opts, dir, cfs).map_err(db_err)
}

/// Makes everything applied to `db` so far durable: flushes the memtables
/// of both column families, atomically, and waits for the table files.
/// Applies write no WAL, so this is the only way they reach the disk short
/// of RocksDB's own flushes; it must run before the log may be purged.
pub(crate) fn persist(db: &DB) -> io::Result<()> {
    let data = db.cf_handle(CF_DATA).expect("data column family");
    let meta = db.cf_handle(CF_META).expect("meta column family");
    db.flush_cfs_opt(&[&data, &meta], &rocksdb::FlushOptions::default())
        .map_err(db_err)
}

/// Reads `(last_applied, membership)` from a state machine database.
pub(crate) fn read_applied(db: &DB) -> io::Result<(Option<LogId>, StoredMembership)> {
    let meta = db.cf_handle(CF_META).expect("meta column family");
    let applied = read_last_applied(db)?;
    let membership = match db.get_cf(meta, KEY_MEMBERSHIP).map_err(db_err)? {
        Some(b) => decode(&b, "membership")?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// The last applied log id alone: what every applied batch checks, without
/// decoding the membership as well.
fn read_last_applied(db: &DB) -> io::Result<Option<LogId>> {
    let meta = db.cf_handle(CF_META).expect("meta column family");
    match db.get_cf(meta, KEY_APPLIED).map_err(db_err)? {
        Some(b) => Ok(Some(decode(&b, "last_applied")?)),
        None => Ok(None),
    }
}

/// Name of the live generation, from `CURRENT`, or `None` for a fresh directory.
pub(crate) fn current_generation(sm_dir: &Path) -> io::Result<Option<u64>> {
    match fs::read_to_string(sm_dir.join("CURRENT")) {
        Ok(s) => s
            .trim()
            .strip_prefix("gen-")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| crate::codec::corrupt("sm/CURRENT", &format!("unexpected content {s:?}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The live generation number (0 when `CURRENT` is missing).
pub(crate) fn current_generation_of(sm_dir: &Path) -> io::Result<u64> {
    Ok(current_generation(sm_dir)?.unwrap_or(0))
}

/// Points `CURRENT` at generation `gen`, atomically and durably.
pub(crate) fn switch_generation(sm_dir: &Path, generation: u64) -> io::Result<()> {
    crate::fsutil::write_atomic(&sm_dir.join("CURRENT"), format!("gen-{generation}\n").as_bytes())
}

pub(crate) fn generation_dir(sm_dir: &Path, generation: u64) -> PathBuf {
    sm_dir.join(format!("gen-{generation}"))
}

/// Removes generation directories other than `keep` (leftovers of an install
/// that crashed before or after its switch).
pub(crate) fn remove_stale_generations(sm_dir: &Path, keep: u64) -> io::Result<()> {
    for entry in fs::read_dir(sm_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("gen-") && name != format!("gen-{keep}") {
            tracing::info!(dir = %entry.path().display(), "removing stale state machine generation");
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// Read options for a scan of `prefix`: the iterator stops at the first key
/// past it. Without the bound, a scan of a prefix with no live key after it
/// walks every deletion tombstone that follows (the history range is dense
/// with them) before it can tell that nothing matches.
fn prefix_bounded(prefix: &str) -> ReadOptions {
    let mut ro = ReadOptions::default();
    if let Some(end) = prefix_end(prefix.as_bytes()) {
        ro.set_iterate_upper_bound(end);
    }
    ro
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// when there is none (an empty prefix, or all `0xff` bytes).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A point-in-time view of the data column family for [`model::apply`].
struct DbView<'a>(&'a DB);

impl ReadState for DbView<'_> {
    fn get(&self, key: &str) -> io::Result<Option<Object>> {
        let cf = self.0.cf_handle(CF_DATA).expect("data column family");
        match self.0.get_cf(cf, key.as_bytes()).map_err(db_err)? {
            Some(b) => decode(&b, "object").map(Some),
            None => Ok(None),
        }
    }

    fn scan(&self, prefix: &str, limit: usize) -> io::Result<Vec<(String, Object)>> {
        self.scan_from(prefix, prefix, limit)
    }
}

impl DbView<'_> {
    /// Up to `limit` objects with keys in `[start, ..)` that start with `prefix`.
    fn scan_from(&self, start: &str, prefix: &str, limit: usize) -> io::Result<Vec<(String, Object)>> {
        let cf = self.0.cf_handle(CF_DATA).expect("data column family");
        let from = if start > prefix { start } else { prefix };
        let mode = IteratorMode::From(from.as_bytes(), rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.0.iterator_cf_opt(cf, prefix_bounded(prefix), mode) {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(prefix.as_bytes()) || out.len() >= limit {
                break;
            }
            let key = String::from_utf8(k.to_vec()).map_err(|_| crate::codec::corrupt("key", "not UTF-8"))?;
            out.push((key, decode(&v, "object")?));
        }
        Ok(out)
    }
}

/// The state machine openraft drives.
pub struct StateMachineStore {
    pub(crate) shared: Arc<Shared>,
    /// The apply's write options: no WAL (module docs). Made once, not per
    /// batch.
    no_wal: rocksdb::WriteOptions,
}

impl StateMachineStore {
    /// Opens the state machine under `<data_dir>/sm` and its snapshots under
    /// `<data_dir>/snapshots`.
    pub fn open(data_dir: &Path, cluster_name: &str, hooks: Arc<dyn StorageHooks>) -> io::Result<Self> {
        let sm_dir = data_dir.join("sm");
        crate::fsutil::create_private_dir(&sm_dir)?;
        let generation = match current_generation(&sm_dir)? {
            Some(g) => g,
            None => {
                switch_generation(&sm_dir, 0)?;
                0
            }
        };
        remove_stale_generations(&sm_dir, generation)?;
        let db = open_generation(&generation_dir(&sm_dir, generation))?;
        let applied = read_applied(&db)?.0.map(|l| l.index).unwrap_or(0);
        let snapshots = SnapshotStore::open(&data_dir.join("snapshots"), cluster_name)?;
        let (applied_tx, _) = watch::channel(applied);
        let mut no_wal = rocksdb::WriteOptions::default();
        no_wal.disable_wal(true);
        Ok(Self {
            shared: Arc::new(Shared {
                sm_dir,
                db: RwLock::new(Arc::new(db)),
                snapshots,
                hooks,
                applied_tx,
            }),
            no_wal,
        })
    }

    /// A read handle for the API layer.
    pub fn reader(&self) -> StateReader {
        StateReader {
            shared: self.shared.clone(),
        }
    }
}

/// How many times a batch that no client waits on yields before it is
/// applied. tokio runs a yielded task again only after every task that was
/// ready, and every task those woke, has run and the event loop has polled
/// its sockets: one yield already lets a follower's append handler and the
/// connection that writes its answer go first. The second lets a busy
/// follower also take in the appends that arrived meanwhile and start their
/// sync before it spends the CPU on the apply: ahead in throughput at 64
/// clients in each of four A/B rounds against one yield (bench/README.md,
/// change 29).
pub const APPLY_YIELDS_WITHOUT_CLIENT: usize = 2;

/// Answers owed to clients once a batch is applied.
type Answers = Vec<(openraft::storage::ApplyResponder<TypeConfig>, Response)>;

/// Applies entries to `db` in one write batch; returns the responses for
/// entries that have a responder, and the last applied index.
fn apply_batch(
    db: &DB,
    no_wal: &rocksdb::WriteOptions,
    entries: Vec<EntryResponder<TypeConfig>>,
) -> io::Result<(Answers, Option<u64>)> {
    let applied_index = read_last_applied(db)?.map(|l| l.index);
    let base = DbView(db);
    let mut overlay = Overlay::new(&base);
    let data = db.cf_handle(CF_DATA).expect("data column family");
    let meta = db.cf_handle(CF_META).expect("meta column family");
    let mut batch = WriteBatch::default();
    let mut last: Option<LogId> = None;
    let mut membership: Option<StoredMembership> = None;
    let mut responses = Vec::with_capacity(entries.len());
    for (entry, responder) in entries {
        let log_id = entry.log_id();
        // An entry at or below last_applied was applied before (openraft may
        // replay after a snapshot race); applying it twice would diverge.
        if applied_index.is_some_and(|a| log_id.index <= a) {
            tracing::warn!(index = log_id.index, "skipping already-applied entry");
            if let Some(r) = responder {
                responses.push((r, Response::None));
            }
            continue;
        }
        let (writes, response) = match entry.payload {
            EntryPayload::Normal(ref req) => model::apply(&overlay, req, log_id.index)?,
            EntryPayload::Blank => (model::apply_without_command(log_id.index), Response::None),
            EntryPayload::Membership(ref m) => {
                membership = Some(StoredMembership::new(Some(log_id), m.clone()));
                (model::apply_without_command(log_id.index), Response::None)
            }
        };
        for w in &writes {
            match w {
                model::Write::Put(k, o) => batch.put_cf(data, k.as_bytes(), encode(o)?),
                model::Write::Delete(k) => batch.delete_cf(data, k.as_bytes()),
            }
        }
        overlay.record(&writes);
        last = Some(log_id);
        if let Some(r) = responder {
            responses.push((r, response));
        }
    }
    let last_index = last.as_ref().map(|l| l.index);
    if let Some(l) = &last {
        batch.put_cf(meta, KEY_APPLIED, encode(l)?);
    }
    if let Some(m) = &membership {
        batch.put_cf(meta, KEY_MEMBERSHIP, encode(m)?);
    }
    // Not in RocksDB's WAL: the Raft log has these entries (module docs).
    db.write_opt(batch, no_wal).map_err(db_err)?;
    Ok((responses, last_index))
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        read_applied(&self.shared.db())
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        while let Some(item) = entries.try_next().await? {
            batch.push(item);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        // No client waits on this batch here (a follower's, or a leader's
        // blank entry): what its commit woke goes first. On a follower that
        // is the answer to the append that carried the commit index: the
        // leader's commit of that append's entries waits for the answer,
        // not for this apply.
        if batch.iter().all(|(_, responder)| responder.is_none()) {
            for _ in 0..APPLY_YIELDS_WITHOUT_CLIENT {
                tokio::task::yield_now().await;
            }
        }
        let db = self.shared.db();
        let start = Instant::now();
        // On this task's own worker thread: a batch is memtable inserts and
        // one unsynced write (no fsync), shorter than a hop to the blocking
        // pool and back (measured: bench/README.md). `block_in_place` moves
        // this worker's other tasks away meanwhile; a single-threaded runtime
        // (some tests) has no other worker to move them to.
        let multi = tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
        let (responses, last) = if multi {
            tokio::task::block_in_place(|| apply_batch(&db, &self.no_wal, batch))?
        } else {
            apply_batch(&db, &self.no_wal, batch)?
        };
        self.shared.hooks.apply(n, start.elapsed());
        if let Some(i) = last {
            self.shared.applied_tx.send_replace(i);
        }
        for (responder, response) in responses {
            responder.send(response);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> Result<(), io::Error> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        let start = Instant::now();
        let res = tokio::task::spawn_blocking(move || crate::snapshot::install(&shared, &meta, snapshot))
            .await
            .map_err(io::Error::other)?;
        self.shared.hooks.snapshot_installed(res.is_ok(), start.elapsed());
        if let Ok(Some(index)) = &res {
            self.shared.applied_tx.send_replace(*index);
        }
        res.map(|_| ())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || crate::snapshot::current_or_rebuild(&shared))
            .await
            .map_err(io::Error::other)?
    }
}

/// Read access to the applied state, for the API layer. Reads see the state
/// as of the last applied entry; linearizability is the caller's business
/// (wait for a read index first).
#[derive(Clone)]
pub struct StateReader {
    shared: Arc<Shared>,
}

impl StateReader {
    /// The object stored under `key`.
    pub fn get(&self, key: &str) -> io::Result<Option<Object>> {
        DbView(&self.shared.db()).get(key)
    }

    /// Objects whose key starts with `prefix`, in key order, at most `limit`.
    pub fn list(&self, prefix: &str, limit: usize) -> io::Result<Vec<(String, Object)>> {
        DbView(&self.shared.db()).scan(prefix, limit)
    }

    /// Up to `limit` objects with keys in `[start, ..)` that start with `prefix`.
    pub fn scan_from(&self, start: &str, prefix: &str, limit: usize) -> io::Result<Vec<(String, Object)>> {
        DbView(&self.shared.db()).scan_from(start, prefix, limit)
    }

    /// Last applied log index (0 before anything was applied).
    pub fn applied_index(&self) -> u64 {
        *self.shared.applied_tx.borrow()
    }

    /// A watch that changes whenever the applied index advances.
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    /// Applied index and a hash of every key and value, from one consistent
    /// view: equal on two replicas at the same applied index.
    pub fn state_hash(&self) -> io::Result<StateHash> {
        let db = self.shared.db();
        let snap = db.snapshot();
        let meta = db.cf_handle(CF_META).expect("meta column family");
        let applied: Option<LogId> = match snap.get_cf(meta, KEY_APPLIED).map_err(db_err)? {
            Some(b) => Some(decode(&b, "last_applied")?),
            None => None,
        };
        let cf = db.cf_handle(CF_DATA).expect("data column family");
        let mut h = std::hash::DefaultHasher::new();
        let mut records = 0u64;
        for item in snap.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            h.write(&k);
            h.write(&v);
            records += 1;
        }
        Ok(StateHash {
            applied_index: applied.map(|l| l.index).unwrap_or(0),
            records,
            hash: format!("{:016x}", h.finish()),
        })
    }

    /// Number of objects per key prefix up to the first `/` (e.g. `kv`).
    /// Internal records (`~hist/`, `~idem/`, ...) are not counted: they sort
    /// after every client namespace, and the history range is dense with
    /// deletion tombstones that would make every count walk them all.
    pub fn counts(&self) -> io::Result<BTreeMap<String, u64>> {
        let db = self.shared.db();
        let cf = db.cf_handle(CF_DATA).expect("data column family");
        let mut out = BTreeMap::new();
        for item in db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(db_err)?;
            if k.first() == Some(&b'~') {
                break;
            }
            let ns = k.split(|b| *b == b'/').next().unwrap_or_default();
            *out.entry(String::from_utf8_lossy(ns).to_string()).or_insert(0) += 1;
        }
        Ok(out)
    }
}

/// A fingerprint of the whole state at one applied index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateHash {
    /// The applied index the hash was taken at.
    pub applied_index: u64,
    /// Number of stored objects.
    pub records: u64,
    /// Hash of every key and value in key order.
    pub hash: String,
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_just_past_its_last_key() {
        assert_eq!(prefix_end(b"workers/"), Some(b"workers0".to_vec()));
        assert_eq!(prefix_end(b"~idem/"), Some(b"~idem0".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xff, 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}

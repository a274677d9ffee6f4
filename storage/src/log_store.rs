//! The Raft log on RocksDB.
//!
//! Durability contract with openraft: `save_vote`, `truncate_after` and `purge`
//! return only after a synced write; `append` writes its entries before it
//! returns (so they are readable) and reports them flushed only after an
//! fsync of the WAL. A leader's own appends are group-committed: a dedicated
//! thread drains every pending flush request and covers them all with one
//! `flush_wal(true)`, while replication runs in parallel. Entries another
//! leader created reach this log by replication; this node must sync them
//! before it answers that leader anyway, so when appends arrive one entry
//! at a time (a single entry, none in the last [`IDLE_BEFORE_INLINE_SYNC`],
//! no group commit pending) `append` syncs them itself: two thread
//! hand-offs fewer on a quiet follower. Under load the follower keeps
//! group-committing, so its event loop goes on reading the next appends
//! while the fsync runs, and one fsync covers several appends.
//!
//! The newest entries also stay in memory for the readers right behind the
//! appends (replication and the apply), and the commit index openraft
//! reports is written with the next append rather than on its own.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::vote::RaftLeaderId;
use rocksdb::ColumnFamily;
use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::Options;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;

use crate::codec::db_err;
use crate::codec::decode;
use crate::codec::encode;
use crate::codec::index_key;
use crate::codec::key_index;
use crate::hooks::StorageHooks;
use crate::types::Entry;
use crate::types::LogId;
use crate::types::TypeConfig;
use crate::types::Vote;

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_CLUSTER: &[u8] = b"cluster_name";
const KEY_LAYOUT: &[u8] = b"data_layout";

/// The RocksDB-backed Raft log, cheap to clone (clones share one database).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: mpsc::Sender<IOFlushed<TypeConfig>>,
    hooks: Arc<dyn StorageHooks>,
    purged: Purged,
    /// Flush requests handed to the group-commit thread and not completed.
    pending: Arc<AtomicU64>,
    /// This node's id, once known: entries created by another leader are
    /// synced in `append` itself while appends arrive one at a time.
    local: Option<u64>,
    /// When the previous append arrived, in microseconds since `epoch`.
    last_append_us: Arc<AtomicU64>,
    epoch: Instant,
    /// The newest commit index openraft reported and no write has carried
    /// yet: it rides in the next append's batch instead of a write of its own.
    committed: Arc<Mutex<Option<LogId>>>,
    /// The newest entries, for the readers that follow right behind the
    /// appends (see [`Recent`]).
    recent: Arc<Mutex<Recent>>,
}

/// The most recently appended entries, a contiguous run of indexes ending at
/// the log's last entry. Replication to every follower and the apply read
/// each new entry back soon after it is appended; from RocksDB every read is
/// an iterator, a checksum and a decode. An entry enters after its write
/// succeeded and leaves before a truncation or purge deletes it, so whatever
/// the run holds is what the database holds at that index; a range it does
/// not cover whole is read from the database, as before.
#[derive(Default)]
struct Recent {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

/// At most this many entries stay in [`Recent`]...
const RECENT_ENTRIES: usize = 4096;
/// ...and at most this many bytes of them (encoded size).
const RECENT_BYTES: usize = 8 << 20;

impl Recent {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.index())
    }

    fn last(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.index())
    }

    /// Adds entries just written; a gap or an overlap with what is held
    /// (which a truncation should already have removed) restarts the run.
    fn push(&mut self, written: Vec<(Entry, usize)>) {
        for (e, size) in written {
            if self.last().is_some_and(|l| l + 1 != e.index()) {
                self.clear();
            }
            self.bytes += size;
            self.entries.push_back((e, size));
        }
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            let (_, size) = self.entries.pop_front().expect("over a limit, so not empty");
            self.bytes -= size;
        }
    }

    /// Forgets entries at `from` and after.
    fn truncate(&mut self, from: u64) {
        while self.last().is_some_and(|l| l >= from) {
            let (_, size) = self.entries.pop_back().expect("a last entry");
            self.bytes -= size;
        }
    }

    /// Forgets entries up to and including `upto`.
    fn purge(&mut self, upto: u64) {
        while self.first().is_some_and(|f| f <= upto) {
            let (_, size) = self.entries.pop_front().expect("a first entry");
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries `start..end` if the run holds every one of them.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first()?;
        if start < first || start >= end || end > self.last()? + 1 {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(self.entries.range(from..to).map(|(e, _)| e.clone()).collect())
    }
}

/// A follower syncs an append itself only if the previous one arrived at
/// least this long before. A single writer's appends come about one round
/// trip apart (near a millisecond); under load they come much closer, and
/// syncing each on the event loop would serialize the fsyncs that group
/// commit merges (measured in bench/README.md, change 12).
pub const IDLE_BEFORE_INLINE_SYNC: std::time::Duration = std::time::Duration::from_micros(500);

/// ... and only if it carries at most this many entries. A single writer's
/// appends carry one entry each. Under load the leader batches, and its
/// appends can come further apart than [`IDLE_BEFORE_INLINE_SYNC`] while
/// carrying many entries each (64 writers on two cores: some 11 entries
/// on average), so the time alone sent most of a loaded follower's syncs
/// down the inline path (bench/README.md, change 22).
pub const INLINE_SYNC_MAX_ENTRIES: usize = 1;

/// Write-ahead log files kept for reuse once RocksDB no longer needs them.
pub const WAL_FILES_KEPT: usize = 4;
/// The write-ahead log files' total size at which RocksDB flushes the
/// memtables that hold the oldest file, so that it can be reused.
pub const WAL_TOTAL_BYTES: u64 = 4 << 20;
/// Each column family's memtable size: a full one switches to the next
/// write-ahead log file.
pub const MEMTABLE_BYTES: usize = 1 << 20;

/// The index of the last purged entry, shared with the replication client,
/// which must not ask for entries that are gone, without a database read.
#[derive(Clone, Debug, Default)]
pub struct Purged(Arc<AtomicU64>);

impl Purged {
    /// The last purged index, `None` while nothing was purged.
    pub fn last(&self) -> Option<u64> {
        self.0.load(Ordering::Acquire).checked_sub(1)
    }

    fn raise(&self, index: u64) {
        self.0.fetch_max(index + 1, Ordering::AcqRel);
    }
}

impl LogStore {
    /// Opens (creating if needed) the log database in `dir`.
    pub fn open(dir: &Path, hooks: Arc<dyn StorageHooks>) -> io::Result<Self> {
        // A damaged record in the middle of a write-ahead log fails the open
        // here, before RocksDB's point-in-time recovery could end its replay
        // there silently and drop every entry and vote after it (module docs
        // of `wal_check`); only a last record that a crash cut short is
        // dropped, and cut off its file first, so that it never reads as
        // damage later.
        let report = crate::wal_check::check_dir(dir)?;
        tracing::debug!(
            files = report.files,
            recycled = report.recycled,
            records = report.records,
            "write-ahead log checked"
        );
        for (path, at) in &report.torn {
            tracing::warn!(
                file = %path.display(),
                byte = at,
                "the write-ahead log ends in a record a crash cut short; \
                 the file is cut there and that write is dropped"
            );
            crate::wal_check::cut_torn_tail(path, *at)?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Write-ahead log files are reused: a sync of an overwrite inside a
        // file's size needs no second write for the size (bench/README.md,
        // change 28). RocksDB allows reuse only in point-in-time recovery;
        // the check above stands in for the stricter mode (its module docs
        // say what it cannot tell apart). Small memtables and a small limit
        // on the log files' total size put files up for reuse within
        // seconds of a start, and lower a node's peak memory.
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        opts.set_recycle_log_file_num(WAL_FILES_KEPT);
        opts.set_max_total_wal_size(WAL_TOTAL_BYTES);
        let cfs = [CF_LOGS, CF_META].map(|n| {
            let mut cf = Options::default();
            cf.set_write_buffer_size(MEMTABLE_BYTES);
            ColumnFamilyDescriptor::new(n, cf)
        });
        let db = Arc::new(DB::open_cf_descriptors(&opts, dir, cfs).map_err(db_err)?);
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        // A weak handle: the database closes when the last `LogStore` is
        // dropped (in the thread that drops it), never later in this thread,
        // where it could race with the process's exit and abort in RocksDB's
        // static destructors.
        let flush_db = Arc::downgrade(&db);
        let flush_hooks = hooks.clone();
        let pending = Arc::new(AtomicU64::new(0));
        let flush_pending = pending.clone();
        std::thread::Builder::new()
            .name("keel-log-fsync".into())
            .spawn(move || group_commit(flush_db, rx, flush_hooks, flush_pending))?;
        let store = Self {
            db,
            flusher: tx,
            hooks,
            purged: Purged::default(),
            pending,
            local: None,
            last_append_us: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            committed: Arc::new(Mutex::new(None)),
            recent: Arc::default(),
        };
        if let Some(last) = store.get_meta::<LogId>(KEY_PURGED)? {
            store.purged.raise(last.index);
        }
        Ok(store)
    }

    /// Tells the log which node it belongs to. From then on, entries that
    /// another leader created (this node follows) are synced before `append`
    /// returns, unless a group commit is still pending; entries this node
    /// created as leader keep going through the group-commit thread, so its
    /// fsync overlaps replication.
    pub fn with_local_node(mut self, node_id: u64) -> Self {
        self.local = Some(node_id);
        self
    }

    /// Where the log's purged prefix ends, kept current as entries are purged.
    pub fn purged(&self) -> Purged {
        self.purged.clone()
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.db.get_cf(self.cf(CF_META), key).map_err(db_err)? {
            None => Ok(None),
            Some(bytes) => decode(&bytes, "log metadata").map(Some),
        }
    }

    /// Writes `batch` with `sync = true` off the async thread: the data is on
    /// disk when this returns.
    async fn write_synced(&self, batch: WriteBatch) -> io::Result<()> {
        let db = self.db.clone();
        let hooks = self.hooks.clone();
        tokio::task::spawn_blocking(move || {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            let start = Instant::now();
            let res = db.write_opt(batch, &wo).map_err(db_err);
            hooks.fsync(start.elapsed());
            res
        })
        .await
        .map_err(io::Error::other)?
    }

    /// The cluster name this data directory belongs to, if recorded.
    pub fn cluster_name(&self) -> io::Result<Option<String>> {
        self.get_meta(KEY_CLUSTER)
    }

    /// Records the cluster name durably (first start of a data directory).
    pub async fn set_cluster_name(&self, name: &str) -> io::Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_META), KEY_CLUSTER, encode(&name.to_string())?);
        self.write_synced(b).await
    }

    /// The data layout version recorded in this directory, if any (builds
    /// before the record existed wrote layout 1 without recording it).
    pub fn data_layout(&self) -> io::Result<Option<u32>> {
        self.get_meta(KEY_LAYOUT)
    }

    /// Records the data layout version durably.
    pub async fn set_data_layout(&self, version: u32) -> io::Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_META), KEY_LAYOUT, encode(&version)?);
        self.write_synced(b).await
    }

    /// Reads the stored vote without going through openraft (used at startup).
    pub fn stored_vote(&self) -> io::Result<Option<Vote>> {
        self.get_meta(KEY_VOTE)
    }

    /// True when this log has never held a vote or an entry (a fresh node).
    pub fn is_pristine(&self) -> io::Result<bool> {
        let no_entry = self
            .db
            .iterator_cf(self.cf(CF_LOGS), IteratorMode::Start)
            .next()
            .is_none();
        Ok(no_entry && self.stored_vote()?.is_none() && self.get_meta::<LogId>(KEY_PURGED)?.is_none())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_range<RB: RangeBounds<u64>>(&self, range: RB) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.checked_add(1),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if let Some(end) = end
            && let Some(hit) = self.recent().get(start, end)
        {
            return Ok(hit);
        }
        let from = index_key(start);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_LOGS), IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item.map_err(db_err)?;
            let index = key_index(&k)?;
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = decode(&v, "log entry")?;
            if entry.index() != index {
                return Err(crate::codec::corrupt("log entry", "stored under the wrong index"));
            }
            if let Some(prev) = out.last().map(|e: &Entry| e.index())
                && prev + 1 != index
            {
                return Err(crate::codec::corrupt(
                    "log",
                    &format!("hole between {prev} and {index}"),
                ));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

/// The group-commit loop: waits for a flush request, takes every other one
/// queued behind it, fsyncs the WAL once, then completes them all.
fn group_commit(
    db: std::sync::Weak<DB>,
    rx: mpsc::Receiver<IOFlushed<TypeConfig>>,
    hooks: Arc<dyn StorageHooks>,
    pending: Arc<AtomicU64>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let start = Instant::now();
        // A flush request comes from a live `LogStore`, which holds the database open.
        let res = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(Some),
            None => Err(None),
        };
        hooks.fsync(start.elapsed());
        hooks.append_batch(batch.len());
        let done = batch.len() as u64;
        for cb in batch {
            cb.io_completed(res.clone().map_err(|e| match e {
                Some(e) => db_err(e),
                None => io::Error::other("the log database is closed"),
            }));
        }
        // After the callbacks: an inline sync in `append` must not complete a
        // later append before these are reported.
        pending.fetch_sub(done, Ordering::AcqRel);
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read_range(range)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_PURGED)?;
        let last = match self.db.iterator_cf(self.cf(CF_LOGS), IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(db_err)?;
                Some(decode::<Entry>(&v, "log entry")?.log_id())
            }
        };
        Ok(LogState {
            last_log_id: last.or(last_purged_log_id),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_META), KEY_VOTE, encode(vote)?);
        self.write_synced(b).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Kept in memory and written with the next append, not on its own:
        // a commit advance would otherwise cost a database write (a WAL
        // record and a syscall) on every node, on the leader between the
        // quorum's answer and the apply. The stored value may lag by one
        // append, or be lost with a crash: either only means re-learning the
        // commit index from the leader. It lets a restarted node re-apply
        // what it knew to be committed without waiting for a leader.
        let Some(c) = committed else { return Ok(()) };
        let mut pending = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_none_or(|p| p < c) {
            *pending = Some(c);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let pending = *self.committed.lock().unwrap_or_else(|e| e.into_inner());
        let stored: Option<LogId> = self.get_meta(KEY_COMMITTED)?;
        Ok(pending.max(stored))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut b = WriteBatch::default();
        let mut replicated = false;
        let mut written = Vec::new();
        for e in entries {
            replicated |= self.local.is_some_and(|me| *e.log_id().leader_id.node_id() != me);
            let bytes = encode(&e)?;
            b.put_cf(self.cf(CF_LOGS), index_key(e.index()), &bytes);
            written.push((e, bytes.len()));
        }
        // Every committed entry is already in the log, so the batch that
        // carries the commit index never makes it point past the log's end.
        if let Some(c) = self.committed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.put_cf(self.cf(CF_META), KEY_COMMITTED, encode(&c)?);
        }
        let now_us = self.epoch.elapsed().as_micros() as u64 + IDLE_BEFORE_INLINE_SYNC.as_micros() as u64;
        let previous = self.last_append_us.swap(now_us, Ordering::AcqRel);
        let quiet = now_us.saturating_sub(previous) >= IDLE_BEFORE_INLINE_SYNC.as_micros() as u64;
        // Callbacks complete in order: the inline sync is taken only when no
        // group commit is outstanding.
        let single = written.len() <= INLINE_SYNC_MAX_ENTRIES;
        if replicated && quiet && single && self.pending.load(Ordering::Acquire) == 0 {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            let start = Instant::now();
            self.db.write_opt(b, &wo).map_err(db_err)?;
            self.recent().push(written);
            self.hooks.fsync(start.elapsed());
            self.hooks.append_batch(1);
            callback.io_completed(Ok(()));
            return Ok(());
        }
        // Written (readable) now; durable once the group-commit thread has
        // fsynced the WAL and completed the callback.
        self.db.write(b).map_err(db_err)?;
        self.recent().push(written);
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.flusher.send(callback).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            io::Error::other("log fsync thread has stopped")
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        self.recent().truncate(from);
        let mut b = WriteBatch::default();
        b.delete_range_cf(self.cf(CF_LOGS), index_key(from), index_key(u64::MAX));
        b.delete_cf(self.cf(CF_LOGS), index_key(u64::MAX));
        self.write_synced(b).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        crate::failpoints::crash_point("log-before-purge");
        // The purge marker and the deletion go in one synced batch: after a
        // crash either both happened or neither did.
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_META), KEY_PURGED, encode(&log_id)?);
        b.delete_range_cf(self.cf(CF_LOGS), index_key(0), index_key(log_id.index + 1));
        // Raised before the deletion: openraft purges only what no current
        // replication needs, so a request that still reads these entries is
        // stale from this moment on.
        self.purged.raise(log_id.index);
        self.recent().purge(log_id.index);
        self.write_synced(b).await
    }
}

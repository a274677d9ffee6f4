//! The replicated state machine's logic as plain, deterministic functions.
//!
//! `apply(state, request, index)` reads the current state through [`ReadState`]
//! and returns the writes to make and the response to give; it performs no I/O
//! of its own and never reads a clock: the only time it may use is the one the
//! proposing node put into the [`Request`]. The RocksDB plumbing that turns
//! [`Write`]s into a `WriteBatch` lives in `state_machine.rs`, so this module is
//! tested without RocksDB or a network.

pub mod control;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io;

use serde::Deserialize;
use serde::Serialize;

/// A replicated write as proposed by a node and stored in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Milliseconds since the Unix epoch, taken by the proposing node. Apply
    /// uses this and never the applying node's clock, so every replica
    /// computes the same state.
    pub time_ms: u64,
    /// A client-chosen key that makes retries of the same write apply once:
    /// a second request with the key gets the first one's response.
    pub idempotency_key: Option<String>,
    /// What to do.
    pub command: Command,
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.command {
            Command::Put { key, value, expect } => {
                write!(f, "put {key} ({} bytes", value.len())?;
                if let Some(e) = expect {
                    write!(f, ", expect {e:?}")?;
                }
                write!(f, ")")
            }
            Command::Delete { key, expect } => match expect {
                Some(e) => write!(f, "delete {key} (expect {e:?})"),
                None => write!(f, "delete {key}"),
            },
            Command::PutWorker { spec, .. } => write!(f, "put worker {}", spec.id),
            Command::Heartbeat { id } => write!(f, "heartbeat {id}"),
            Command::HealthReport { id, ok, .. } => write!(f, "health {id} ok={ok}"),
            Command::PutAffinity { session, worker_id, .. } => write!(f, "affinity {session} -> {worker_id}"),
            Command::PutRateLimit { name, .. } => write!(f, "put ratelimit {name}"),
            Command::Acquire { name, tokens, .. } => write!(f, "acquire {tokens} from {name}"),
            Command::CounterAdd { name, delta } => write!(f, "counter {name} += {delta}"),
            Command::Expire => write!(f, "expire"),
            Command::Txn(t) => write!(f, "txn ({} compares)", t.compares.len()),
        }
    }
}

/// One state-changing operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets `key` to `value`, if the precondition holds.
    Put {
        /// The object's key, e.g. `kv/alpha`.
        key: String,
        /// The object's value (the API stores JSON text here).
        #[serde(with = "byte_string")]
        value: Vec<u8>,
        /// A condition on the current object; the write is refused when it fails.
        expect: Option<Expect>,
    },
    /// Removes `key`, if the precondition holds.
    Delete {
        /// The object's key.
        key: String,
        /// A condition on the current object.
        expect: Option<Expect>,
    },
    /// Registers or replaces a worker; health and circuit state are kept
    /// across replacements, the lease restarts.
    PutWorker {
        /// The worker as the client describes it.
        spec: control::WorkerSpec,
        /// A condition on the current object.
        expect: Option<Expect>,
    },
    /// Renews a worker's lease.
    Heartbeat {
        /// Worker id.
        id: String,
    },
    /// Records a health-check result and drives the circuit breaker.
    HealthReport {
        /// Worker id.
        id: String,
        /// Whether the check passed.
        ok: bool,
        /// The failure, when it did not.
        error: Option<String>,
    },
    /// Maps a session key to a worker for a while.
    PutAffinity {
        /// The session key.
        session: String,
        /// The worker it sticks to.
        worker_id: String,
        /// How long the mapping lives, in milliseconds.
        ttl_ms: u64,
        /// A condition on the current object.
        expect: Option<Expect>,
    },
    /// Creates or replaces a rate limit (its counters restart).
    PutRateLimit {
        /// The limit's name.
        name: String,
        /// Its kind and parameters.
        spec: control::RateLimitSpec,
        /// A condition on the current object.
        expect: Option<Expect>,
    },
    /// Takes tokens from a rate limit, if there are enough.
    Acquire {
        /// The limit's name.
        name: String,
        /// How many tokens.
        tokens: u64,
        /// Optional tenant: each key has its own bucket or window.
        key: Option<String>,
    },
    /// Adds `delta` to a counter (created at 0).
    CounterAdd {
        /// The counter's name.
        name: String,
        /// The amount, possibly negative.
        delta: i64,
    },
    /// Removes every worker whose lease lapsed and every affinity that
    /// expired at `Request::time_ms`. Proposed by the leader.
    Expire,
    /// Several commands applied all-or-nothing in one entry, chosen by
    /// preconditions.
    Txn(Txn),
}

/// A transaction: if every compare holds, apply `success`, else `failure`;
/// if any chosen operation fails, nothing changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// Conditions on current objects.
    pub compares: Vec<(String, Expect)>,
    /// Operations when all compares hold.
    #[serde(deserialize_with = "nesting::bounded")]
    pub success: Vec<Command>,
    /// Operations when some compare fails.
    #[serde(deserialize_with = "nesting::bounded")]
    pub failure: Vec<Command>,
}

/// A `Vec<u8>` field encoded as one byte string instead of a sequence of
/// single bytes. bincode writes both alike (a length, then the bytes) and
/// JSON writes both as an array of numbers, so stored data and peers of
/// earlier versions are unaffected; but serde's default for `Vec<u8>` calls
/// the encoder once per byte, which for a 256-byte value was about a tenth
/// of the instructions a put costs a leader (bench/README.md, change 16).
pub mod byte_string {
    use std::fmt;

    use serde::Deserializer;
    use serde::Serializer;
    use serde::de::SeqAccess;
    use serde::de::Visitor;

    /// Serializes the bytes in one call.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Accepts a byte string, or a sequence of bytes (JSON's array form).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The hint comes from the input: cap what it may reserve.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// Bounds how deeply transactions (and their responses) nest when decoded.
///
/// `Command` and `Response` are recursive types, and serde's derived decoders
/// recurse once per level: a few hundred kilobytes of nested `Txn` tags from a
/// peer (or a corrupt log entry) would otherwise overflow the decoding
/// thread's stack and abort the whole process. Apply refuses a transaction
/// inside a transaction anyway, so a legitimate value nests one level deep;
/// anything deeper than [`nesting::MAX_DEPTH`] is a decoding error. The count
/// is per thread, which is exact: decoding is synchronous.
pub mod nesting {
    use std::cell::Cell;

    use serde::Deserialize;
    use serde::Deserializer;
    use serde::de::Error;

    /// Deepest nesting of transactions (or transaction responses) accepted.
    pub const MAX_DEPTH: usize = 8;

    thread_local! {
        static DEPTH: Cell<usize> = const { Cell::new(0) };
    }

    /// One level entered; leaving it (also by an error) drops the count again.
    struct Level;

    impl Drop for Level {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(d.get() - 1));
        }
    }

    /// Decodes `T` one nesting level deeper, refusing more than [`MAX_DEPTH`] levels.
    pub fn bounded<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
        let depth = DEPTH.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        let _level = Level;
        if depth > MAX_DEPTH {
            return Err(D::Error::custom(format!(
                "transactions nested more than {MAX_DEPTH} levels deep"
            )));
        }
        T::deserialize(d)
    }
}

/// A precondition on the object a command touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// The object exists and its revision is this one.
    Revision(u64),
    /// The object does not exist (create-only).
    Absent,
    /// The object exists, whatever its revision.
    Present,
}

/// A stored object with its revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    /// The value bytes.
    #[serde(with = "byte_string")]
    pub value: Vec<u8>,
    /// Log index of the object's last change.
    pub revision: u64,
    /// Log index at which the object was created.
    pub create_revision: u64,
    /// Number of writes since creation (1 after the first put).
    pub version: u64,
}

/// The result of applying one log entry, returned to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry: nothing for a client.
    None,
    /// A put took effect at `revision`.
    Written {
        /// Log index of the write.
        revision: u64,
        /// True when the put created the object.
        created: bool,
    },
    /// A delete took effect at `revision`.
    Deleted {
        /// Log index of the delete.
        revision: u64,
    },
    /// The precondition failed; nothing changed.
    Conflict {
        /// The object's current revision, `None` when it does not exist.
        current_revision: Option<u64>,
    },
    /// A delete of an object that does not exist; nothing changed.
    NotFound,
    /// The command cannot apply to the current state; nothing changed.
    Invalid(String),
    /// The answer to an acquire.
    Acquired {
        /// Whether the tokens were granted.
        granted: bool,
        /// Tokens left (for the key) after this request.
        remaining: u64,
        /// When not granted: milliseconds until enough tokens could be
        /// there (`None` if never, e.g. more than the capacity).
        retry_after_ms: Option<u64>,
        /// Log index of the acquire.
        revision: u64,
    },
    /// A counter's new value.
    Counter {
        /// The value after the add.
        value: i64,
        /// Log index of the add.
        revision: u64,
    },
    /// What an expiry sweep removed.
    Expired {
        /// Worker ids whose lease lapsed.
        workers: Vec<String>,
        /// Session keys whose affinity expired.
        affinities: Vec<String>,
    },
    /// The outcome of a transaction.
    Txn {
        /// Whether the compares held (the success branch ran).
        succeeded: bool,
        /// Log index of the transaction.
        revision: u64,
        /// One response per operation of the branch that ran.
        #[serde(deserialize_with = "nesting::bounded")]
        results: Vec<Response>,
    },
}

/// A state change produced by [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Store this object under this key.
    Put(String, Object),
    /// Remove this key.
    Delete(String),
}

/// Read access to the state as of the entry being applied.
pub trait ReadState {
    /// The object stored under `key`, if any.
    fn get(&self, key: &str) -> io::Result<Option<Object>>;
    /// Up to `limit` objects whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &str, limit: usize) -> io::Result<Vec<(String, Object)>>;
}

impl ReadState for HashMap<String, Object> {
    fn get(&self, key: &str) -> io::Result<Option<Object>> {
        Ok(HashMap::get(self, key).cloned())
    }
    fn scan(&self, prefix: &str, limit: usize) -> io::Result<Vec<(String, Object)>> {
        let mut v: Vec<(String, Object)> = self
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.truncate(limit);
        Ok(v)
    }
}

/// Keys under this prefix are keel's own bookkeeping, not client objects.
pub const INTERNAL_PREFIX: &str = "~";
/// Change history for watches: `~hist/<index, 20 digits>` -> events.
pub const HISTORY_PREFIX: &str = "~hist/";
/// Idempotency records: `~idem/<key>` -> the first response.
pub const IDEM_PREFIX: &str = "~idem/";
/// How many log indexes of change history are kept for watches.
pub const HISTORY_KEEP: u64 = 10_000;
/// How long an idempotency key is remembered (by command time).
pub const IDEM_TTL_MS: u64 = 10 * 60 * 1000;

/// The history key of log index `index`.
pub fn history_key(index: u64) -> String {
    format!("{HISTORY_PREFIX}{index:020}")
}

/// One change to a client object, as watches report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The object's key, e.g. `workers/w1`.
    pub key: String,
    /// `put` or `delete`.
    pub kind: String,
    /// The new value (JSON text) for a put.
    pub value: Option<String>,
}

/// The first response to an idempotent request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdemRecord {
    pub(crate) time_ms: u64,
    pub(crate) response: Response,
}

/// Applies `request`, committed at log `index`, to `state`.
///
/// Deterministic: the same state, request and index always give the same
/// writes and response. An `Err` means the state could not be read (an I/O
/// failure, which must stop the node), never that the request was invalid:
/// invalid requests get a response such as [`Response::Conflict`] and change
/// nothing.
pub fn apply(state: &impl ReadState, request: &Request, index: u64) -> io::Result<(Vec<Write>, Response)> {
    let idem = request.idempotency_key.as_ref().map(|k| format!("{IDEM_PREFIX}{k}"));
    if let Some(k) = &idem
        && let Some(o) = state.get(k)?
    {
        let rec: IdemRecord = from_json(&o.value)?;
        return Ok((forget_history(index), rec.response));
    }
    let base: &dyn ReadState = state;
    let mut ov = Overlay::new(base);
    let response = run(&mut ov, &request.command, request.time_ms, index)?;
    let mut writes = ov.into_writes(index);
    let events: Vec<Event> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Put(k, o) if !k.starts_with(INTERNAL_PREFIX) => Some(Event {
                key: k.clone(),
                kind: "put".into(),
                value: Some(String::from_utf8_lossy(&o.value).into_owned()),
            }),
            Write::Delete(k) if !k.starts_with(INTERNAL_PREFIX) => Some(Event {
                key: k.clone(),
                kind: "delete".into(),
                value: None,
            }),
            _ => None,
        })
        .collect();
    if !events.is_empty() {
        writes.push(Write::Put(history_key(index), internal_object(&events, index)?));
    }
    writes.extend(forget_history(index));
    if let Some(k) = idem {
        let rec = IdemRecord {
            time_ms: request.time_ms,
            response: response.clone(),
        };
        writes.push(Write::Put(k, internal_object(&rec, index)?));
    }
    Ok((writes, response))
}

/// The writes of a log entry that carries no command (a blank entry or a
/// membership change): it forgets the history that left the window at its
/// index, like every other entry.
pub fn apply_without_command(index: u64) -> Vec<Write> {
    forget_history(index)
}

/// Keeps `HISTORY_KEEP` indexes of history: every log entry, with or without
/// a command, deletes by key the record of the one index that leaves the
/// window at it (`index - HISTORY_KEEP`), whether that record exists or not.
/// The window is exact and each entry adds one deletion.
///
/// Never a scan from the start of the prefix: that would walk the
/// tombstones of every earlier deletion (until RocksDB compacts them) and,
/// inside one applied batch, every pending record, so each write would cost
/// more than the one before (measured: puts fell from ~1,900/s to ~100/s
/// after some 30,000 writes; see bench/README.md).
fn forget_history(index: u64) -> Vec<Write> {
    match index.checked_sub(HISTORY_KEEP) {
        Some(horizon) if horizon >= 1 => vec![Write::Delete(history_key(horizon))],
        _ => Vec::new(),
    }
}

fn internal_object<T: Serialize>(v: &T, index: u64) -> io::Result<Object> {
    Ok(Object {
        value: serde_json::to_vec(v).map_err(io::Error::other)?,
        revision: index,
        create_revision: index,
        version: 1,
    })
}

/// Decodes a stored JSON value.
pub fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("stored object: {e}")))
}

/// True for responses that mean "this operation did not take effect".
fn failed(r: &Response) -> bool {
    matches!(
        r,
        Response::Conflict { .. }
            | Response::NotFound
            | Response::Invalid(_)
            | Response::Acquired { granted: false, .. }
    )
}

/// Puts `value` under `key` in `ov`, keeping revisions.
pub(crate) fn put_object<S: ReadState + ?Sized>(
    ov: &mut Overlay<'_, S>,
    key: &str,
    value: Vec<u8>,
    current: Option<&Object>,
    index: u64,
) -> Response {
    let (create_revision, version) = match current {
        Some(obj) => (obj.create_revision, obj.version + 1),
        None => (index, 1),
    };
    ov.put(
        key,
        Object {
            value,
            revision: index,
            create_revision,
            version,
        },
    );
    Response::Written {
        revision: index,
        created: current.is_none(),
    }
}

/// Runs one command against the overlay; writes only if it succeeds.
fn run(ov: &mut Overlay<'_, dyn ReadState + '_>, cmd: &Command, time_ms: u64, index: u64) -> io::Result<Response> {
    match cmd {
        Command::Put { key, value, expect } => {
            let current = ov.get(key)?;
            if let Some(conflict) = check(expect, current.as_ref()) {
                return Ok(conflict);
            }
            Ok(put_object(ov, key, value.clone(), current.as_ref(), index))
        }
        Command::Delete { key, expect } => {
            let current = ov.get(key)?;
            if let Some(conflict) = check(expect, current.as_ref()) {
                return Ok(conflict);
            }
            if current.is_none() {
                return Ok(Response::NotFound);
            }
            ov.delete(key);
            Ok(Response::Deleted { revision: index })
        }
        Command::Txn(txn) => {
            let mut holds = true;
            for (key, expect) in &txn.compares {
                let current = ov.get(key)?;
                holds &= check(&Some(*expect), current.as_ref()).is_none();
            }
            let branch = if holds { &txn.success } else { &txn.failure };
            let view: &dyn ReadState = &*ov;
            let mut nested = Overlay::new(view);
            let mut results = Vec::with_capacity(branch.len());
            for op in branch {
                if matches!(op, Command::Txn(_) | Command::Expire) {
                    return Ok(Response::Invalid(
                        "a transaction cannot contain transactions or expiry sweeps".into(),
                    ));
                }
                let r = run(&mut nested, op, time_ms, index)?;
                let bad = failed(&r);
                results.push(r);
                if bad {
                    // All or nothing: the nested overlay is dropped unrecorded.
                    return Ok(Response::Invalid(format!(
                        "transaction operation {} did not apply ({:?}); nothing changed",
                        results.len() - 1,
                        results.last().expect("just pushed")
                    )));
                }
            }
            let pending = nested.pending;
            ov.pending.extend(pending);
            Ok(Response::Txn {
                succeeded: holds,
                revision: index,
                results,
            })
        }
        other => control::run(ov, other, time_ms, index),
    }
}

/// Returns the conflict response when `expect` does not hold for `current`.
pub(crate) fn check(expect: &Option<Expect>, current: Option<&Object>) -> Option<Response> {
    let holds = match (expect, current) {
        (None, _) => true,
        (Some(Expect::Absent), cur) => cur.is_none(),
        (Some(Expect::Present), cur) => cur.is_some(),
        (Some(Expect::Revision(rev)), Some(obj)) => obj.revision == *rev,
        (Some(Expect::Revision(_)), None) => false,
    };
    (!holds).then(|| Response::Conflict {
        current_revision: current.map(|o| o.revision),
    })
}

/// A view that layers pending writes over a base state, so a command (or a
/// batch of entries applied in one `WriteBatch`) sees its own writes.
pub struct Overlay<'a, S: ReadState + ?Sized> {
    base: &'a S,
    pending: BTreeMap<String, Option<Object>>,
}

impl<'a, S: ReadState + ?Sized> Overlay<'a, S> {
    /// An overlay with no pending writes.
    pub fn new(base: &'a S) -> Self {
        Self {
            base,
            pending: BTreeMap::new(),
        }
    }

    /// Records writes so later reads through the overlay see them.
    pub fn record(&mut self, writes: &[Write]) {
        for w in writes {
            match w {
                Write::Put(k, o) => self.pending.insert(k.clone(), Some(o.clone())),
                Write::Delete(k) => self.pending.insert(k.clone(), None),
            };
        }
    }

    pub(crate) fn put(&mut self, key: &str, o: Object) {
        self.pending.insert(key.to_string(), Some(o));
    }

    pub(crate) fn delete(&mut self, key: &str) {
        self.pending.insert(key.to_string(), None);
    }

    /// The pending writes in key order (deterministic).
    fn into_writes(self, _index: u64) -> Vec<Write> {
        self.pending
            .into_iter()
            .map(|(k, v)| match v {
                Some(o) => Write::Put(k, o),
                None => Write::Delete(k),
            })
            .collect()
    }
}

impl<S: ReadState + ?Sized> ReadState for Overlay<'_, S> {
    fn get(&self, key: &str) -> io::Result<Option<Object>> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan(&self, prefix: &str, limit: usize) -> io::Result<Vec<(String, Object)>> {
        // Ask the base for enough to survive pending deletes, then merge.
        let extra = self.pending.keys().filter(|k| k.starts_with(prefix)).count();
        let mut merged: BTreeMap<String, Object> = self
            .base
            .scan(prefix, limit.saturating_add(extra))?
            .into_iter()
            .collect();
        for (k, v) in self.pending.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(o) => merged.insert(k.clone(), o.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

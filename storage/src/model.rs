//! The replicated state machine's logic as plain, deterministic functions.
//!
//! `apply(state, request, index)` reads the current state through [`ReadState`]
//! and returns the writes to make and the response to give; it performs no I/O
//! of its own and never reads a clock: the only time it may use is the one the
//! proposing node put into the [`Request`]. The RocksDB plumbing that turns
//! [`Write`]s into a `WriteBatch` lives in `state_machine.rs`, so this module is
//! tested without RocksDB or a network.

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
}

impl ReadState for HashMap<String, Object> {
    fn get(&self, key: &str) -> io::Result<Option<Object>> {
        Ok(HashMap::get(self, key).cloned())
    }
}

/// Applies `request`, committed at log `index`, to `state`.
///
/// Deterministic: the same state, request and index always give the same
/// writes and response. An `Err` means the state could not be read (an I/O
/// failure, which must stop the node), never that the request was invalid:
/// invalid requests get a response such as [`Response::Conflict`].
pub fn apply(state: &impl ReadState, request: &Request, index: u64) -> io::Result<(Vec<Write>, Response)> {
    match &request.command {
        Command::Put { key, value, expect } => {
            let current = state.get(key)?;
            if let Some(conflict) = check(expect, current.as_ref()) {
                return Ok((vec![], conflict));
            }
            let (create_revision, version) = match &current {
                Some(obj) => (obj.create_revision, obj.version + 1),
                None => (index, 1),
            };
            let object = Object {
                value: value.clone(),
                revision: index,
                create_revision,
                version,
            };
            let created = current.is_none();
            Ok((
                vec![Write::Put(key.clone(), object)],
                Response::Written {
                    revision: index,
                    created,
                },
            ))
        }
        Command::Delete { key, expect } => {
            let current = state.get(key)?;
            if let Some(conflict) = check(expect, current.as_ref()) {
                return Ok((vec![], conflict));
            }
            if current.is_none() {
                return Ok((vec![], Response::NotFound));
            }
            Ok((vec![Write::Delete(key.clone())], Response::Deleted { revision: index }))
        }
    }
}

/// Returns the conflict response when `expect` does not hold for `current`.
fn check(expect: &Option<Expect>, current: Option<&Object>) -> Option<Response> {
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

/// A view that layers the writes of earlier entries in the same batch over a
/// base state, so a batch applied in one `WriteBatch` sees its own writes.
pub struct Overlay<'a, S: ReadState> {
    base: &'a S,
    pending: HashMap<String, Option<Object>>,
}

impl<'a, S: ReadState> Overlay<'a, S> {
    /// An overlay with no pending writes.
    pub fn new(base: &'a S) -> Self {
        Self {
            base,
            pending: HashMap::new(),
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
}

impl<S: ReadState> ReadState for Overlay<'_, S> {
    fn get(&self, key: &str) -> io::Result<Option<Object>> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, expect: Option<Expect>) -> Request {
        Request {
            time_ms: 1,
            command: Command::Put {
                key: key.into(),
                value: value.as_bytes().to_vec(),
                expect,
            },
        }
    }

    fn del(key: &str, expect: Option<Expect>) -> Request {
        Request {
            time_ms: 1,
            command: Command::Delete {
                key: key.into(),
                expect,
            },
        }
    }

    /// Applies and commits the writes into the map, like the RocksDB plumbing does.
    fn run(state: &mut HashMap<String, Object>, req: &Request, index: u64) -> Response {
        let (writes, resp) = apply(state, req, index).unwrap();
        for w in writes {
            match w {
                Write::Put(k, o) => state.insert(k, o),
                Write::Delete(k) => state.remove(&k),
            };
        }
        resp
    }

    #[test]
    fn put_creates_then_updates_with_revisions() {
        let mut s = HashMap::new();
        assert_eq!(
            run(&mut s, &put("a", "1", None), 5),
            Response::Written {
                revision: 5,
                created: true
            }
        );
        assert_eq!(
            run(&mut s, &put("a", "2", None), 7),
            Response::Written {
                revision: 7,
                created: false
            }
        );
        let o = &s["a"];
        assert_eq!((o.revision, o.create_revision, o.version), (7, 5, 2));
        assert_eq!(o.value, b"2");
    }

    #[test]
    fn revision_precondition_allows_exactly_one_of_two_racers() {
        let mut s = HashMap::new();
        run(&mut s, &put("w", "0", None), 3);
        let first = run(&mut s, &put("w", "a", Some(Expect::Revision(3))), 4);
        let second = run(&mut s, &put("w", "b", Some(Expect::Revision(3))), 5);
        assert_eq!(
            first,
            Response::Written {
                revision: 4,
                created: false
            }
        );
        assert_eq!(
            second,
            Response::Conflict {
                current_revision: Some(4)
            }
        );
        assert_eq!(s["w"].value, b"a");
    }

    #[test]
    fn create_only_refuses_an_existing_object() {
        let mut s = HashMap::new();
        assert!(matches!(
            run(&mut s, &put("k", "1", Some(Expect::Absent)), 1),
            Response::Written { .. }
        ));
        assert_eq!(
            run(&mut s, &put("k", "2", Some(Expect::Absent)), 2),
            Response::Conflict {
                current_revision: Some(1)
            }
        );
    }

    #[test]
    fn revision_precondition_on_missing_object_conflicts() {
        let mut s = HashMap::new();
        assert_eq!(
            run(&mut s, &put("k", "1", Some(Expect::Revision(9))), 1),
            Response::Conflict { current_revision: None }
        );
        assert!(s.is_empty());
    }

    #[test]
    fn delete_of_missing_object_is_not_found_and_changes_nothing() {
        let mut s = HashMap::new();
        assert_eq!(run(&mut s, &del("k", None), 1), Response::NotFound);
        run(&mut s, &put("k", "1", None), 2);
        assert_eq!(
            run(&mut s, &del("k", Some(Expect::Revision(1))), 3),
            Response::Conflict {
                current_revision: Some(2)
            }
        );
        assert_eq!(
            run(&mut s, &del("k", Some(Expect::Present)), 4),
            Response::Deleted { revision: 4 }
        );
        assert!(s.is_empty());
    }

    #[test]
    fn overlay_sees_earlier_writes_of_the_same_batch() {
        let base = HashMap::new();
        let mut ov = Overlay::new(&base);
        let (w, _) = apply(&ov, &put("k", "1", None), 1).unwrap();
        ov.record(&w);
        let (_, resp) = apply(&ov, &put("k", "2", Some(Expect::Absent)), 2).unwrap();
        assert_eq!(
            resp,
            Response::Conflict {
                current_revision: Some(1)
            }
        );
        let (w, _) = apply(&ov, &del("k", None), 3).unwrap();
        ov.record(&w);
        assert_eq!(ov.get("k").unwrap(), None);
    }

    #[test]
    fn apply_is_deterministic() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        let reqs = [
            put("x", "1", None),
            put("y", "2", None),
            del("x", None),
            put("y", "3", Some(Expect::Revision(2))),
        ];
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(run(&mut a, r, i as u64 + 1), run(&mut b, r, i as u64 + 1));
        }
        assert_eq!(a, b);
    }
}

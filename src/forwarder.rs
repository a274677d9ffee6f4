//! Writes a follower relays to the leader, batched.
//!
//! Every client write that lands on a follower must reach the leader. One
//! peer RPC per write costs an HTTP/2 stream, its headers and a Raft
//! proposal each, on both ends. Instead, one task per node queues them and
//! keeps at most [`MAX_IN_FLIGHT`] calls to [`wire::PATH_FORWARD_WRITES`] in
//! flight: whatever queued while those were busy goes out together, as one
//! message to the leader's Raft core (`client_write_many`). Under light load
//! a batch holds one write and nothing waits; under heavy load batches grow
//! by themselves. No timer holds a write back.
//!
//! Outcomes keep the single-write rules: a batch that never reached the
//! leader may be retried; one that was sent and failed leaves every write
//! in it unknown. A leader too old to know the batch route (404 during a
//! rolling upgrade) did nothing with it, so its writes go one by one over
//! [`wire::PATH_FORWARD_WRITE`] instead.

use std::collections::VecDeque;
use std::time::Duration;
use std::time::Instant;

use hyper::StatusCode;
use keel_raft::client::PeerError;
use keel_raft::client::PeerPool;
use keel_raft::wire;
use keel_storage::model::Request;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// Batch calls in flight at once (across leaders; there is one leader).
pub const MAX_IN_FLIGHT: usize = 4;
/// Writes queued before callers wait for room.
const QUEUE: usize = 4096;

type Outcome = Result<wire::ForwardReply, PeerError>;

struct Pending {
    leader: u64,
    addr: String,
    req: Request,
    deadline: Instant,
    reply: oneshot::Sender<Outcome>,
}

/// Handle on the batching task.
#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<Pending>,
}

impl Forwarder {
    /// Starts the task; it ends when every handle is dropped.
    pub fn start(pool: PeerPool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, rx));
        Self { tx }
    }

    /// Relays `req` to `leader` at `addr` and waits for its outcome, up to
    /// `deadline`. `Err(Unreachable)` means it was never sent.
    pub async fn forward(&self, leader: u64, addr: &str, req: Request, deadline: Instant) -> Outcome {
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            leader,
            addr: addr.to_string(),
            req,
            deadline,
            reply,
        };
        let never_sent = |why: &str| PeerError::Unreachable {
            target: leader,
            addr: addr.to_string(),
            why: why.into(),
        };
        if self.tx.send(pending).await.is_err() {
            return Err(never_sent("the forwarding task has stopped"));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, rx).await {
            Ok(Ok(outcome)) => outcome,
            // The task dropped it unsent (shutting down).
            Ok(Err(_)) => Err(never_sent("the forwarding task has stopped")),
            Err(_) => Err(PeerError::Failed {
                target: leader,
                path: wire::PATH_FORWARD_WRITES,
                why: format!("no answer within {remaining:?}"),
            }),
        }
    }
}

async fn run(pool: PeerPool, mut rx: mpsc::Receiver<Pending>) {
    let mut queue: VecDeque<Pending> = VecDeque::new();
    let mut in_flight = JoinSet::new();
    loop {
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => queue.push_back(p),
                None if in_flight.is_empty() => return,
                None => {}
            },
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
        while let Ok(p) = rx.try_recv() {
            queue.push_back(p);
        }
        while in_flight.len() < MAX_IN_FLIGHT && !queue.is_empty() {
            let batch = take_batch(&mut queue);
            in_flight.spawn(send(pool.clone(), batch));
        }
    }
}

/// The longest run at the head of the queue bound for one leader, up to
/// [`wire::MAX_FORWARD_BATCH`] writes; callers that gave up are dropped.
fn take_batch(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut batch: Vec<Pending> = Vec::new();
    let mut bound: Option<(u64, String)> = None;
    while let Some(p) = queue.front() {
        let same = bound.as_ref().is_none_or(|(l, a)| *l == p.leader && *a == p.addr);
        if !same || batch.len() >= wire::MAX_FORWARD_BATCH {
            break;
        }
        let p = queue.pop_front().expect("front exists");
        bound.get_or_insert_with(|| (p.leader, p.addr.clone()));
        if !p.reply.is_closed() {
            batch.push(p);
        }
    }
    batch
}

async fn send(pool: PeerPool, batch: Vec<Pending>) {
    let Some(first) = batch.first() else { return };
    let (leader, addr) = (first.leader, first.addr.clone());
    let deadline = batch.iter().map(|p| p.deadline).max().expect("batch is not empty");
    let timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    // Encoded from references: the same bytes as a `wire::ForwardWrites`.
    let reqs: Vec<&Request> = batch.iter().map(|p| &p.req).collect();
    let outcome = call(&pool, leader, &addr, &reqs, timeout).await;
    match outcome {
        Ok(Some(replies)) if replies.len() == batch.len() => {
            for (p, r) in batch.into_iter().zip(replies) {
                let _ = p.reply.send(Ok(r));
            }
        }
        Ok(Some(replies)) => {
            let why = format!("{} replies to {} writes", replies.len(), batch.len());
            for p in batch {
                let _ = p.reply.send(Err(PeerError::Failed {
                    target: leader,
                    path: wire::PATH_FORWARD_WRITES,
                    why: why.clone(),
                }));
            }
        }
        // The leader does not know the batch route: one by one.
        Ok(None) => {
            let mut each = JoinSet::new();
            for p in batch {
                let (pool, addr) = (pool.clone(), addr.clone());
                each.spawn(async move {
                    let remaining = p.deadline.saturating_duration_since(Instant::now());
                    let r = pool
                        .call(leader, &addr, wire::PATH_FORWARD_WRITE, &p.req, remaining)
                        .await;
                    let _ = p.reply.send(r);
                });
            }
            while each.join_next().await.is_some() {}
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

/// One batch call. `Ok(None)`: the route is unknown there (nothing ran).
async fn call(
    pool: &PeerPool,
    leader: u64,
    addr: &str,
    reqs: &[&Request],
    timeout: Duration,
) -> Result<Option<Vec<wire::ForwardReply>>, PeerError> {
    let path = wire::PATH_FORWARD_WRITES;
    let failed = |why: String| PeerError::Failed {
        target: leader,
        path,
        why,
    };
    let body = wire::encode(&reqs).map_err(|e| failed(e.to_string()))?;
    let (status, body) = pool
        .call_raw(leader, addr, path, keel_raft::client::full(body), timeout)
        .await?;
    if status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if status != StatusCode::OK {
        return Err(failed(format!("{status}: {}", String::from_utf8_lossy(&body))));
    }
    wire::decode(&body).map(Some).map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use keel_storage::model::Command;

    use super::*;

    fn pending(leader: u64) -> (Pending, oneshot::Receiver<Outcome>) {
        let (reply, rx) = oneshot::channel();
        let p = Pending {
            leader,
            addr: format!("node{leader}:7000"),
            req: Request {
                time_ms: 0,
                idempotency_key: None,
                command: Command::Delete {
                    key: "k".into(),
                    expect: None,
                },
            },
            deadline: Instant::now(),
            reply,
        };
        (p, rx)
    }

    #[test]
    fn a_batch_is_the_run_bound_for_one_leader_without_callers_that_gave_up() {
        let mut q = VecDeque::new();
        let mut keep = Vec::new();
        for leader in [1, 1, 1, 2, 1] {
            let (p, rx) = pending(leader);
            q.push_back(p);
            keep.push(rx);
        }
        // The second caller gave up (its receiver is gone).
        drop(keep.remove(1));
        let b = take_batch(&mut q);
        assert_eq!(b.iter().map(|p| p.leader).collect::<Vec<_>>(), vec![1, 1]);
        assert_eq!(q.len(), 2, "the write for leader 2 and the one after it wait");
        assert_eq!(take_batch(&mut q).len(), 1);
        assert_eq!(take_batch(&mut q).len(), 1);
        assert!(q.is_empty());
    }

    /// A leader from before the batch route answers 404 to it, having done
    /// nothing: the writes then go one by one, and every caller gets its
    /// own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_without_the_batch_route_gets_the_writes_one_by_one() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicU64;
        use std::sync::atomic::Ordering;

        use bytes::Bytes;
        use http_body_util::Full;
        use keel_storage::model::Response;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let singles = Arc::new(AtomicU64::new(0));
        let seen = singles.clone();
        tokio::spawn(keel_raft::serve::serve(
            listener,
            None,
            move |_| {
                let seen = seen.clone();
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (status, body) = if req.uri().path() == wire::PATH_FORWARD_WRITE {
                            let index = 10 + seen.fetch_add(1, Ordering::SeqCst);
                            let reply = wire::ForwardReply::Applied {
                                index,
                                response: Response::None,
                            };
                            (StatusCode::OK, wire::encode(&reply).unwrap())
                        } else {
                            (StatusCode::NOT_FOUND, b"no peer route".to_vec())
                        };
                        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                })
            },
            stop_rx,
            keel_raft::serve::ServeOptions::default(),
        ));

        let pool = PeerPool::new(2, "test", None, Arc::new(keel_raft::hooks::NoNetHooks));
        let f = Forwarder::start(pool);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut calls = JoinSet::new();
        for _ in 0..5 {
            let (f, addr) = (f.clone(), addr.clone());
            calls.spawn(async move { f.forward(1, &addr, pending(1).0.req, deadline).await });
        }
        let mut indexes = Vec::new();
        while let Some(r) = calls.join_next().await {
            match r.unwrap() {
                Ok(wire::ForwardReply::Applied { index, .. }) => indexes.push(index),
                other => panic!("expected an applied write, got {other:?}"),
            }
        }
        indexes.sort_unstable();
        assert_eq!(indexes, vec![10, 11, 12, 13, 14], "each write got its own answer");
        assert_eq!(singles.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn a_batch_encoded_from_references_decodes_as_forward_writes() {
        let reqs = vec![pending(1).0.req, pending(1).0.req];
        let refs: Vec<&Request> = reqs.iter().collect();
        let bytes = wire::encode(&refs.as_slice()).unwrap();
        assert_eq!(bytes, wire::encode(&reqs).unwrap());
        let back: wire::ForwardWrites = wire::decode(&bytes).unwrap();
        assert_eq!(back.len(), 2);
    }

    #[test]
    fn a_batch_holds_at_most_the_wire_limit() {
        let mut q = VecDeque::new();
        let mut keep = Vec::new();
        for _ in 0..wire::MAX_FORWARD_BATCH + 5 {
            let (p, rx) = pending(3);
            q.push_back(p);
            keep.push(rx);
        }
        assert_eq!(take_batch(&mut q).len(), wire::MAX_FORWARD_BATCH);
        assert_eq!(take_batch(&mut q).len(), 5);
    }
}

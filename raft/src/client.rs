//! The sending side of the peer protocol: one multiplexed HTTP/2 connection
//! per peer, reused by every RPC to it, with connect backoff.
//!
//! [`PeerPool`] owns the connections; [`NetworkFactory`] hands openraft a
//! [`PeerNetwork`] per target that speaks through the pool.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::Full;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::StatusCode;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use keel_storage::KeelNode;
use keel_storage::NodeId;
use keel_storage::SnapshotFile;
use keel_storage::TypeConfig;
use keel_storage::log_store::Purged;
use keel_storage::types::Vote;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendError;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::os::unix::fs::FileExt;

use keel_storage::snapshot::format::SnapshotError;
use keel_storage::snapshot::transfer::SnapshotId;
use keel_storage::snapshot::transfer::SourceCheck;
use keel_storage::snapshot::transfer::identify;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::hooks::NetHooks;
use crate::tls::Identity;
use crate::wire;

/// Body type of every outgoing peer request.
pub type ReqBody = UnsyncBoxBody<Bytes, io::Error>;

/// Why a peer call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// No connection could be made (or we are backing off after failures).
    #[error("peer {target} at {addr} unreachable: {why}")]
    Unreachable {
        /// The peer's node id.
        target: NodeId,
        /// Its address.
        addr: String,
        /// The cause.
        why: String,
    },
    /// The call was sent but failed or timed out; it may have taken effect.
    #[error("peer {target} call {path} failed: {why}")]
    Failed {
        /// The peer's node id.
        target: NodeId,
        /// The route.
        path: &'static str,
        /// The cause.
        why: String,
    },
}

impl PeerError {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<TypeConfig, E> {
        match self {
            PeerError::Unreachable { .. } => RPCError::Unreachable(Unreachable::from_string(self.to_string())),
            PeerError::Failed { .. } => RPCError::Network(NetworkError::from_string(self.to_string())),
        }
    }

    fn into_streaming(self) -> StreamingError<TypeConfig> {
        match self {
            PeerError::Unreachable { .. } => StreamingError::Unreachable(Unreachable::from_string(self.to_string())),
            PeerError::Failed { .. } => StreamingError::Network(NetworkError::from_string(self.to_string())),
        }
    }
}

/// One peer's connection slot.
#[derive(Default)]
struct Slot {
    sender: Option<SendRequest<ReqBody>>,
    /// Consecutive connect failures, for backoff.
    failures: u32,
    /// No new connect attempt before this instant.
    retry_at: Option<Instant>,
}

/// Longest wait between connect attempts to an unreachable peer.
const MAX_BACKOFF: Duration = Duration::from_millis(1000);
/// Longest wait for a TCP connect plus TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections to every peer, shared by all Raft replication streams and by
/// request forwarding.
#[derive(Clone)]
pub struct PeerPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    self_id: NodeId,
    cluster: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    slots: std::sync::Mutex<HashMap<NodeId, Arc<Mutex<Slot>>>>,
    hooks: Arc<dyn NetHooks>,
    /// Per peer: the highest log index it acknowledged to this node as the
    /// leader of the given vote. See [`PeerPool::check_reversion`].
    matched: std::sync::Mutex<HashMap<NodeId, (Vote, u64)>>,
}

impl PeerPool {
    /// A pool for node `self_id` of `cluster`; `tls` is `None` only in
    /// insecure mode.
    pub fn new(
        self_id: NodeId,
        cluster: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        hooks: Arc<dyn NetHooks>,
    ) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                self_id,
                cluster: cluster.to_string(),
                tls,
                slots: Default::default(),
                hooks,
                matched: Default::default(),
            }),
        }
    }

    fn slot(&self, target: NodeId) -> Arc<Mutex<Slot>> {
        self.inner
            .slots
            .lock()
            .expect("pool lock poisoned")
            .entry(target)
            .or_default()
            .clone()
    }

    /// The metrics hooks this pool reports to.
    pub fn hooks(&self) -> Arc<dyn NetHooks> {
        self.inner.hooks.clone()
    }

    /// Drops the connection to `target` (e.g. after its address changed).
    pub fn forget(&self, target: NodeId) {
        self.inner.slots.lock().expect("pool lock poisoned").remove(&target);
    }

    /// Forgets what `target` acknowledged: call it when the node leaves the
    /// membership, so that adding it again replicates to it from scratch.
    pub fn reset_matched(&self, target: NodeId) {
        self.inner.matched.lock().expect("pool lock poisoned").remove(&target);
    }

    /// Records that `target` holds the log up to `index` for the leader of `vote`.
    fn note_matched(&self, target: NodeId, vote: &Vote, index: u64) {
        let mut m = self.inner.matched.lock().expect("pool lock poisoned");
        match m.get_mut(&target) {
            Some((v, i)) if v == vote => *i = (*i).max(index),
            _ => {
                m.insert(target, (*vote, index));
            }
        }
    }

    /// A follower that reports a conflict at or below an index it already
    /// acknowledged to the same leader has lost its log: its data directory
    /// was wiped or lost. openraft treats such a reversion as a bug (a debug
    /// assertion, and replication stuck in release builds), so the conflict
    /// is turned into a network error here and the node stays cut off until
    /// an operator removes it and adds it again.
    fn check_reversion(&self, target: NodeId, vote: &Vote, conflict: u64) -> Result<(), String> {
        let m = self.inner.matched.lock().expect("pool lock poisoned");
        match m.get(&target) {
            Some((v, acked)) if v == vote && conflict <= *acked => Err(format!(
                "node {target} lost log entries it had acknowledged (up to index {acked}, now missing index \
                 {conflict}): its data was wiped or lost; remove it from the cluster and add it again"
            )),
            _ => Ok(()),
        }
    }

    async fn sender(&self, target: NodeId, addr: &str) -> Result<SendRequest<ReqBody>, PeerError> {
        let slot = self.slot(target);
        let mut slot = slot.lock().await;
        if let Some(s) = &slot.sender
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        slot.sender = None;
        if let Some(at) = slot.retry_at
            && Instant::now() < at
        {
            return Err(PeerError::Unreachable {
                target,
                addr: addr.to_string(),
                why: format!("backing off after {} failed connects", slot.failures),
            });
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect(target, addr)).await {
            Ok(Ok(s)) => {
                slot.failures = 0;
                slot.retry_at = None;
                slot.sender = Some(s.clone());
                Ok(s)
            }
            res => {
                let why = match res {
                    Ok(Err(e)) => e,
                    _ => "connect timed out".to_string(),
                };
                slot.failures = slot.failures.saturating_add(1);
                let backoff = Duration::from_millis(25u64 << slot.failures.min(6)).min(MAX_BACKOFF);
                slot.retry_at = Some(Instant::now() + backoff);
                Err(PeerError::Unreachable {
                    target,
                    addr: addr.to_string(),
                    why,
                })
            }
        }
    }

    async fn connect(&self, target: NodeId, addr: &str) -> Result<SendRequest<ReqBody>, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let mut h2 = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(5)))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20);
        let sender = match &self.inner.tls {
            Some(cfg) => {
                let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                // The certificate must be the node we meant to reach, not
                // merely some member of the cluster.
                match crate::tls::server_identity(tls.get_ref().1) {
                    Some(Identity::Node(id)) if id == target => {}
                    other => {
                        return Err(format!("expected the certificate of node {target}, got {other:?}"));
                    }
                }
                let (sender, conn) = h2.handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                sender
            }
            None => {
                let (sender, conn) = h2.handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                sender
            }
        };
        Ok(sender)
    }

    /// Sends one request to `target` and returns the response once its
    /// headers arrived (within `timeout`); the body streams on.
    pub async fn send(
        &self,
        target: NodeId,
        addr: &str,
        path: &'static str,
        body: ReqBody,
        timeout: Duration,
    ) -> Result<hyper::Response<hyper::body::Incoming>, PeerError> {
        let mut sender = self.sender(target, addr).await?;
        let failed = |why: String| PeerError::Failed { target, path, why };
        let req = hyper::Request::post(format!("http://{addr}{path}"))
            .header(hyper::header::CONTENT_TYPE, wire::CONTENT_TYPE)
            .header(wire::HDR_CLUSTER, &self.inner.cluster)
            .header(wire::HDR_FROM, self.inner.self_id.to_string())
            .body(body)
            .map_err(|e| failed(e.to_string()))?;
        match tokio::time::timeout(timeout, sender.send_request(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(_) => Err(failed(format!("no answer within {timeout:?}"))),
        }
    }

    /// Sends one request to `target` and returns status and whole body.
    pub async fn call_raw(
        &self,
        target: NodeId,
        addr: &str,
        path: &'static str,
        body: ReqBody,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        let start = Instant::now();
        let failed = |why: String| PeerError::Failed { target, path, why };
        let work = async {
            let resp = self.send(target, addr, path, body, timeout).await?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), wire::MAX_MESSAGE)
                .collect()
                .await
                .map_err(|e| failed(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        let res = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(failed(format!("no answer within {timeout:?}"))),
        };
        self.inner.hooks.rpc(path, target, start.elapsed(), res.is_ok());
        res
    }

    /// Sends a bincode message and decodes the bincode answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: NodeId,
        addr: &str,
        path: &'static str,
        msg: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let bytes = wire::encode(msg).map_err(|e| PeerError::Failed {
            target,
            path,
            why: e.to_string(),
        })?;
        let (status, body) = self.call_raw(target, addr, path, full(bytes), timeout).await?;
        if status != StatusCode::OK {
            return Err(PeerError::Failed {
                target,
                path,
                why: format!("{status}: {}", String::from_utf8_lossy(&body)),
            });
        }
        wire::decode(&body).map_err(|e| PeerError::Failed {
            target,
            path,
            why: e.to_string(),
        })
    }
}

/// A complete request body.
pub fn full(bytes: Vec<u8>) -> ReqBody {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Hands openraft one [`PeerNetwork`] per target.
#[derive(Clone)]
pub struct NetworkFactory {
    pool: PeerPool,
    purged: Purged,
}

impl NetworkFactory {
    /// A factory speaking through `pool`.
    pub fn new(pool: PeerPool) -> Self {
        Self {
            pool,
            purged: Purged::default(),
        }
    }

    /// Lets replication streams see where this node's log was purged, so a
    /// stream that asks for purged entries fails instead of idling forever.
    pub fn with_purged(mut self, purged: Purged) -> Self {
        self.purged = purged;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &KeelNode) -> PeerNetwork {
        PeerNetwork {
            pool: self.pool.clone(),
            target,
            addr: node.raft_addr.clone(),
            purged: self.purged.clone(),
        }
    }
}

/// openraft's view of one peer.
pub struct PeerNetwork {
    pool: PeerPool,
    target: NodeId,
    addr: String,
    purged: Purged,
}

/// The request side of one append call, as the HTTP/2 body polls it.
///
/// hyper polls a request body for as long as its HTTP/2 stream lives, which
/// can outlast the call: after a timeout the call has failed while the
/// stream may still be open. openraft shares one request producer among a
/// peer's successive calls, so a body left polling takes requests meant for
/// the next call and sends them into the dead stream. That happened after a
/// follower was cut off: a commit update vanished into the old stream, the
/// new call saw no request at all, and openraft then resumed a payload it
/// had superseded long before. Dropping the [`InputCloser`] drops the
/// producer (and whatever it was waiting on); the body then ends.
struct ClosableInput<S>(Arc<std::sync::Mutex<Option<S>>>);

/// How long a request without entries (in a replication stream, a commit
/// update) is held back in case a request with entries follows, which then
/// goes in its place.
const COMMIT_UPDATE_HOLD: Duration = Duration::from_millis(1);

/// A commit update is held only while requests with entries come at most
/// this far apart: then the next one is likely to come within the hold.
/// Slower writes (a control plane's usual pace) would only make each
/// follower's apply, and the watchers there, wait out the hold.
const COMMIT_UPDATE_HOLD_WHEN_WITHIN: Duration = Duration::from_millis(2);

/// Holds each request without entries back for up to `hold`, and drops it
/// if another request comes from openraft meanwhile; only while requests
/// with entries come at most `within` apart.
///
/// A commit wakes the apply and the replication streams. With no new
/// entries to send, openraft sends each follower an empty append with the
/// new commit index, and each follower then makes a round trip of its own
/// for it (read, openraft's handling, answer, and the leader's read of the
/// answer). Under load, and between one writer's back-to-back puts, the
/// next append comes soon after, and it carries a commit index as new or
/// newer. The update is dropped then, and the follower learns of the
/// commit with that append. Otherwise it goes out after `hold`, or at once
/// when openraft ends the call: a heartbeat is a call of one request and
/// is never held. When the last two requests with entries came more than
/// `within` apart (or there were not two yet), the update is not held: it
/// goes out after one yield. The hold and the yield both put it after the
/// tasks already woken, so the leader's apply and the client's answer
/// never wait for the socket writes to the followers.
///
/// Dropping is safe: an empty append only repeats an entry the follower
/// already matched and carries a commit index, and the next request
/// carries one at least as new. openraft matches the answers to its
/// requests by log id, not one by one: the next answer acknowledges the
/// dropped request as well. What waits is a follower's apply (and its local
/// reads and watches), by at most `hold` when no append follows. A
/// linearizable read through a follower waits for that apply, but the
/// leader's read index goes out as a heartbeat, which carries the commit
/// index.
fn commit_updates_held<S>(
    requests: S,
    hold: Duration,
    within: Duration,
) -> futures::stream::BoxStream<'static, AppendEntriesRequest<TypeConfig>>
where
    S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + 'static,
{
    use futures::StreamExt;
    // When the last request with entries came, and how long after the one
    // before it.
    struct Pace {
        last: Option<std::time::Instant>,
        gap: Option<Duration>,
    }
    futures::stream::unfold(
        (
            Box::pin(requests.fuse()),
            None::<AppendEntriesRequest<TypeConfig>>,
            Pace { last: None, gap: None },
        ),
        move |(mut inner, mut held, mut pace)| async move {
            loop {
                let next = match held.take() {
                    None => inner.next().await,
                    Some(h) => match tokio::time::timeout(hold, inner.next()).await {
                        Ok(Some(next)) => Some(next),
                        // Nothing else came, or the call ends: send it now.
                        Ok(None) | Err(_) => return Some((h, (inner, None, pace))),
                    },
                };
                match next {
                    None => return None,
                    Some(req) if req.entries.is_empty() => {
                        if pace.gap.is_some_and(|g| g <= within) {
                            held = Some(req);
                        } else {
                            tokio::task::yield_now().await;
                            return Some((req, (inner, None, pace)));
                        }
                    }
                    Some(req) => {
                        let now = std::time::Instant::now();
                        pace.gap = pace.last.map(|t| now.saturating_duration_since(t));
                        pace.last = Some(now);
                        return Some((req, (inner, None, pace)));
                    }
                }
            }
        },
    )
    .boxed()
}

/// Closes the [`ClosableInput`] it was made with when dropped.
struct InputCloser<S>(Arc<std::sync::Mutex<Option<S>>>);

fn closable<S>(input: S) -> (ClosableInput<S>, InputCloser<S>) {
    let slot = Arc::new(std::sync::Mutex::new(Some(input)));
    (ClosableInput(slot.clone()), InputCloser(slot))
}

impl<S: futures::Stream + Unpin> futures::Stream for ClosableInput<S> {
    type Item = S::Item;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<S::Item>> {
        let mut slot = self.0.lock().expect("input lock poisoned");
        match slot.as_mut() {
            Some(input) => std::pin::Pin::new(input).poll_next(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl<S> Drop for InputCloser<S> {
    fn drop(&mut self) {
        // Dropped outside the lock: the producer may hold openraft's locks.
        let input = self.0.lock().map(|mut s| s.take()).unwrap_or(None);
        drop(input);
    }
}

/// Whether an append request cannot carry entries: it follows an entry
/// below the purge point, so the entries after it are gone.
///
/// openraft (0.10.0-alpha.37) can resume a replication payload that was
/// superseded long ago: after a follower was cut off while the log was
/// compacted, a call restarted from the very first entry. Its reads of the
/// purged entries come back empty, openraft turns each into an entry-less
/// request that never advances, every 10 ms on the same call, and the
/// follower got no entry again. A current payload never reaches below the
/// purge point (openraft purges only what no replication in flight needs,
/// and sends a snapshot instead). Heartbeats and commit updates may: they
/// follow what the follower last matched, which can be far behind, but each
/// is a call of one request. So the second such request in one call marks a
/// stale payload, and failing the call makes openraft plan the follower's
/// replication afresh.
///
/// Returns the last purged index when the request reaches below it.
fn below_purge(req: &AppendEntriesRequest<TypeConfig>, purged: &Purged) -> Option<u64> {
    let last = purged.last()?;
    let next = req.prev_log_id.as_ref().map_or(0, |l| l.index + 1);
    (next <= last).then_some(last)
}

impl PeerNetwork {
    async fn rpc<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &'static str,
        msg: &Req,
        option: &RPCOption,
    ) -> Result<Resp, PeerError> {
        self.pool
            .call(self.target, &self.addr, path, msg, option.hard_ttl())
            .await
    }
}

/// Results of a pipelined append stream, in request order.
type AppendResults = BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>;

impl PeerNetwork {
    /// Opens one HTTP/2 stream to the peer carrying every request of `input`
    /// back to back, without waiting for earlier answers (pipelining); the
    /// peer answers each, in order, on the same stream as it flushes them.
    async fn open_append_stream<S>(&self, input: S, option: RPCOption) -> Result<AppendResults, RPCError<TypeConfig>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        use futures::StreamExt;
        let net = |e: String| RPCError::Network(NetworkError::from_string(e));
        // Requests handed over but not yet answered: a silent peer is an
        // error only while something is outstanding, and so is a response
        // that ends before answering them all.
        let pending = Arc::new(AtomicU64::new(0));
        let sent = pending.clone();
        // Every request of one stream carries the same leader vote.
        let stream_vote: Arc<std::sync::Mutex<Option<Vote>>> = Default::default();
        let seen_vote = stream_vote.clone();
        // openraft sleeps out its retry backoff while producing the first
        // request of a stream. Take that request before connecting: an
        // unreachable peer is then retried at the backoff's pace instead of
        // in a busy loop of instant connect refusals.
        let mut input = input;
        let Some(first) = input.next().await else {
            return Ok(Box::pin(futures::stream::empty()));
        };
        let (input, closer) = closable(input);
        // Counted from the moment openraft produced it: it is in openraft's
        // list of requests awaiting an answer even if the body never sends it.
        pending.store(1, Ordering::Relaxed);
        let (purged, target) = (self.purged.clone(), self.target);
        let (mut first_taken, mut behind) = (false, 0u32);
        let requests = commit_updates_held(
            futures::stream::iter([first]).chain(input),
            COMMIT_UPDATE_HOLD,
            COMMIT_UPDATE_HOLD_WHEN_WITHIN,
        );
        let frames = requests.map(move |req| {
            if first_taken {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            first_taken = true;
            // One request below the purge point is a heartbeat or a commit
            // update (each a call of one request, following what the follower
            // last matched); a second in the same call is a stale payload.
            if let Some(last) = below_purge(&req, &purged) {
                behind += 1;
                if behind > 1 {
                    let why = format!(
                        "stale append request: it follows entry {:?}, but the log is purged up to {last}; \
                         replication starts over",
                        req.prev_log_id.as_ref().map(|l| l.index)
                    );
                    tracing::warn!(target, "{why}");
                    return Err(io::Error::other(why));
                }
            }
            seen_vote.lock().expect("vote lock poisoned").get_or_insert(req.vote);
            wire::frame(&req).map(hyper::body::Frame::data)
        });
        let body = http_body_util::StreamBody::new(frames).boxed_unsync();
        // openraft's per-RPC budget is about a heartbeat (100 ms here); a
        // follower's fsync on a busy machine can take longer. Tearing the
        // stream down for that only restarts replication, so give results
        // a few seconds; a dead peer is caught by HTTP/2 keep-alive.
        let ttl = option.hard_ttl().max(Duration::from_secs(3));
        let resp = self
            .pool
            .send(self.target, &self.addr, wire::PATH_STREAM_APPEND, body, ttl)
            .await
            .map_err(PeerError::into_rpc)?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let text = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(net(format!(
                "stream-append refused: {status}: {}",
                String::from_utf8_lossy(&text)
            )));
        }
        // The result stream owns the closer: when openraft is done with this
        // call, the body stops taking its requests.
        let state = (resp.into_body(), wire::FrameReader::default(), pending, closer, false);
        let (pool, target) = (self.pool.clone(), self.target);
        let results = futures::stream::unfold(state, move |(mut body, mut reader, pending, closer, done)| {
            let (pool, stream_vote) = (pool.clone(), stream_vote.clone());
            async move {
                if done {
                    return None;
                }
                loop {
                    match reader.next_message::<StreamAppendResult<TypeConfig>>() {
                        Ok(Some(r)) => {
                            pending.fetch_sub(1, Ordering::Relaxed);
                            let vote = *stream_vote.lock().expect("vote lock poisoned");
                            if let Some(vote) = vote {
                                match &r {
                                    Ok(Some(matched)) => pool.note_matched(target, &vote, matched.index),
                                    Err(StreamAppendError::Conflict(c)) => {
                                        if let Err(e) = pool.check_reversion(target, &vote, c.index) {
                                            tracing::error!(target, "{e}");
                                            return Some((Err(net(e)), (body, reader, pending, closer, true)));
                                        }
                                    }
                                    _ => {}
                                }
                            }
                            return Some((Ok(r), (body, reader, pending, closer, false)));
                        }
                        Ok(None) => {}
                        Err(e) => return Some((Err(net(e.to_string())), (body, reader, pending, closer, true))),
                    }
                    let next = match tokio::time::timeout(ttl, body.frame()).await {
                        Ok(f) => f,
                        Err(_) if pending.load(Ordering::Relaxed) == 0 => continue,
                        Err(_) => {
                            let e = net(format!("no append result within {ttl:?}"));
                            return Some((Err(e), (body, reader, pending, closer, true)));
                        }
                    };
                    match next {
                        // A response that ends with requests unanswered is a
                        // failed call, not a finished one: openraft would
                        // otherwise keep the unanswered payload as work left
                        // over and resume it later, after it went stale.
                        None => match pending.load(Ordering::Relaxed) {
                            0 => return None,
                            n => {
                                let e = net(format!("append stream ended with {n} requests unanswered"));
                                return Some((Err(e), (body, reader, pending, closer, true)));
                            }
                        },
                        Some(Err(e)) => return Some((Err(net(e.to_string())), (body, reader, pending, closer, true))),
                        Some(Ok(f)) => {
                            if let Ok(d) = f.into_data() {
                                reader.push(&d);
                            }
                        }
                    }
                }
            }
        });
        Ok(Box::pin(results))
    }
}

/// Size of the pieces a snapshot file is read and sent in.
const SNAPSHOT_PIECE: usize = 256 << 10;
/// How long an offer may take.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts in a row that fail without progress before `full_snapshot` gives up
/// (openraft then retries with its own backoff).
const MAX_FAILURES: u32 = 5;
/// Rejected-data resends tolerated within one `full_snapshot` call.
const MAX_RESENDS: u32 = 16;

/// Shared between `full_snapshot` and the task feeding one attempt's body.
struct SendState {
    file: SnapshotFile,
    id: SnapshotId,
    check: std::sync::Mutex<SourceCheck>,
    /// Set when the stored file failed the sender's own verification.
    source_corrupt: std::sync::Mutex<Option<String>>,
    /// File bytes handed to HTTP/2 over all attempts.
    sent: AtomicU64,
}

impl PeerNetwork {
    /// One attempt: the envelope, then the file from `from`, as one HTTP/2
    /// request; returns the receiver's answer or why there is none.
    async fn snapshot_attempt(
        &self,
        st: &Arc<SendState>,
        vote: &keel_storage::types::Vote,
        meta: &keel_storage::types::SnapshotMeta,
        from: u64,
        timeout: Duration,
    ) -> Result<wire::SnapshotReply, String> {
        let envelope = wire::encode(&wire::SnapshotEnvelope {
            vote: *vote,
            meta: meta.clone(),
            id: st.id,
            offset: from,
        })
        .map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, io::Error>>(4);
        let (st2, target, hooks) = (st.clone(), self.target, self.pool.inner.hooks.clone());
        // Reads one piece at a time, verifies it, sends it: memory stays
        // bounded by the channel depth times the piece size.
        let producer = tokio::spawn(async move {
            let mut head = Vec::with_capacity(envelope.len() + 4);
            head.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
            head.extend_from_slice(&envelope);
            if tx.send(Ok(hyper::body::Frame::data(Bytes::from(head)))).await.is_err() {
                return;
            }
            let len = st2.id.len;
            let mut pos = from;
            let mut last_report = Instant::now();
            while pos < len {
                let n = ((len - pos) as usize).min(SNAPSHOT_PIECE);
                let st3 = st2.clone();
                let read = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, SnapshotError> {
                    let mut check = st3.check.lock().expect("source check lock poisoned");
                    check.catch_up(&st3.file.file, pos)?;
                    let mut buf = vec![0; n];
                    st3.file.file.read_exact_at(&mut buf, pos)?;
                    check.observe(pos, &buf)?;
                    Ok(buf)
                })
                .await;
                let mut buf = match read {
                    Ok(Ok(buf)) => buf,
                    Ok(Err(SnapshotError::Io(e))) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Ok(Err(e)) => {
                        let why = format!("stored snapshot {} failed verification at byte {pos}: {e}", st2.id);
                        *st2.source_corrupt.lock().expect("lock poisoned") = Some(why.clone());
                        let _ = tx.send(Err(io::Error::new(io::ErrorKind::InvalidData, why))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::other(e))).await;
                        return;
                    }
                };
                if keel_storage::failpoints::flag_point("snap-send-corrupt").is_some() {
                    let at = buf.len() / 2;
                    buf[at] ^= 0x01;
                    tracing::warn!(
                        target,
                        offset = pos + at as u64,
                        "failpoint snap-send-corrupt: flipped a bit in transit"
                    );
                }
                if tx.send(Ok(hyper::body::Frame::data(Bytes::from(buf)))).await.is_err() {
                    return;
                }
                st2.sent.fetch_add(n as u64, Ordering::Relaxed);
                hooks.snapshot_bytes(true, n as u64);
                pos += n as u64;
                if last_report.elapsed() >= Duration::from_secs(5) {
                    last_report = Instant::now();
                    tracing::info!(target, snapshot = %st2.id, offset = pos, total = len, "snapshot transfer progress");
                }
                if pos < len && keel_storage::failpoints::flag_point("snap-send-cut").is_some() {
                    // Like a connection dying once the bytes sent so far arrived.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    tracing::warn!(
                        target,
                        offset = pos,
                        "failpoint snap-send-cut: breaking the transfer off"
                    );
                    let _ = tx.send(Err(io::Error::other("failpoint snap-send-cut"))).await;
                    return;
                }
            }
        });
        let body = http_body_util::StreamBody::new(tokio_stream_from(rx)).boxed_unsync();
        let res = self
            .pool
            .call_raw(self.target, &self.addr, wire::PATH_SNAPSHOT, body, timeout)
            .await;
        producer.abort();
        let (status, body) = res.map_err(|e| e.to_string())?;
        if status != StatusCode::OK {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        wire::decode(&body).map_err(|e| e.to_string())
    }

    /// Waits `d` unless replication is cancelled first.
    async fn pause<F: Future<Output = ReplicationClosed> + Unpin>(
        d: Duration,
        cancel: &mut F,
    ) -> Result<(), StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(wire::PATH_APPEND, &rpc, &option)
            .await
            .map_err(PeerError::into_rpc)
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let results: BoxStream<'s, _> = self.open_append_stream(input, option).await?;
            Ok(results)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(wire::PATH_VOTE, &rpc, &option)
            .await
            .map_err(PeerError::into_rpc)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(wire::PATH_PRE_VOTE, &rpc, &option)
            .await
            .map_err(PeerError::into_rpc)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(wire::PATH_TRANSFER_LEADER, &req, &option)
            .await
            .map_err(PeerError::into_rpc)
    }

    /// Sends a snapshot, resuming where the receiver's verified copy ends.
    ///
    /// Each attempt first offers the snapshot (its id: last log id, size,
    /// fingerprint); the receiver answers the offset it holds verified bytes
    /// up to, and the attempt streams the file from there. A cut connection
    /// or a rejected (corrupt) frame leads to another offer and a resend
    /// from the last verified frame. The sender verifies every byte it reads:
    /// a stored snapshot that fails is set aside, never sent, and openraft's
    /// next try gets a freshly built one. The call has its own deadline (at
    /// least openraft's timeout, and 30 s plus 1 s per MiB) and honours
    /// `cancel` at every step.
    async fn full_snapshot(
        &mut self,
        vote: keel_storage::types::Vote,
        snapshot: openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let net = |m: String| StreamingError::Network(NetworkError::from_string(m));
        let target = self.target;
        let started = Instant::now();
        let meta = snapshot.meta;
        let file = snapshot.snapshot;
        let (file, checked) = tokio::task::spawn_blocking(move || {
            let r = identify(&file.file);
            (file, r)
        })
        .await
        .map_err(|e| net(e.to_string()))?;
        let id = match checked {
            Ok((_, id)) => id,
            Err(e) => {
                tracing::error!(target, file = %file.path.display(), error = %e, "stored snapshot failed its check; not sending it");
                let _ = keel_storage::snapshot::quarantine(&file);
                return Err(net(format!("stored snapshot is corrupt: {e}")));
            }
        };
        let budget = option
            .hard_ttl()
            .max(Duration::from_secs(30) + Duration::from_secs(id.len >> 20));
        let deadline = Instant::now() + budget;
        let st = Arc::new(SendState {
            file,
            id,
            check: std::sync::Mutex::new(SourceCheck::new()),
            source_corrupt: std::sync::Mutex::new(None),
            sent: AtomicU64::new(0),
        });
        let mut cancel = Box::pin(cancel);
        let (mut failures, mut resends, mut attempts) = (0u32, 0u32, 0u32);
        let mut offsets: Vec<u64> = Vec::new();
        tracing::info!(target, snapshot = %id, "sending snapshot");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(net(format!(
                    "snapshot {id} to node {target}: not done within {budget:?} ({} bytes sent)",
                    st.sent.load(Ordering::Relaxed)
                )));
            }
            let backoff = Duration::from_millis(200u64 << failures.min(3));
            let offer = wire::SnapshotOffer {
                vote,
                meta: meta.clone(),
                id,
            };
            let reply = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                r = self.pool.call::<_, wire::OfferReply>(target, &self.addr, wire::PATH_SNAPSHOT_OFFER, &offer, remaining.min(OFFER_TIMEOUT)) => r,
            };
            let from = match reply {
                Ok(wire::OfferReply::Resume { from }) if from <= id.len => from,
                Ok(wire::OfferReply::Resume { from }) => {
                    return Err(net(format!(
                        "node {target} claims {from} bytes of a {}-byte snapshot",
                        id.len
                    )));
                }
                Ok(wire::OfferReply::Covered { vote: theirs }) => {
                    tracing::info!(target, snapshot = %id, "receiver already holds the snapshot's state");
                    if let Some(last) = &meta.last_log_id {
                        self.pool.note_matched(target, &vote, last.index);
                    }
                    return Ok(SnapshotResponse::new(theirs));
                }
                Ok(wire::OfferReply::Busy) => {
                    Self::pause(Duration::from_millis(500), &mut cancel).await?;
                    continue;
                }
                Ok(wire::OfferReply::Refused(why)) => {
                    return Err(net(format!("node {target} refused snapshot {id}: {why}")));
                }
                Err(e) => {
                    failures += 1;
                    // Not reached yet: let openraft back off and fetch the
                    // then-current snapshot. Once a transfer began, retry here
                    // to resume it.
                    if attempts == 0 || failures > MAX_FAILURES {
                        return Err(e.into_streaming());
                    }
                    tracing::debug!(target, error = %e, "snapshot offer failed; retrying");
                    Self::pause(backoff, &mut cancel).await?;
                    continue;
                }
            };
            attempts += 1;
            offsets.push(from);
            if from > 0 {
                tracing::info!(target, snapshot = %id, from, "resuming snapshot transfer");
            }
            let sent_before = st.sent.load(Ordering::Relaxed);
            let outcome = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                r = self.snapshot_attempt(&st, &vote, &meta, from, remaining) => r,
            };
            if let Some(why) = st.source_corrupt.lock().expect("lock poisoned").take() {
                tracing::error!(target, %why, "not sending a corrupt stored snapshot; setting it aside");
                let _ = keel_storage::snapshot::quarantine(&st.file);
                return Err(net(why));
            }
            match outcome {
                Ok(wire::SnapshotReply::Installed(resp)) => {
                    let elapsed = started.elapsed();
                    let sent = st.sent.load(Ordering::Relaxed);
                    tracing::info!(
                        target,
                        snapshot = %id,
                        file_bytes = id.len,
                        sent_bytes = sent,
                        attempts,
                        resends,
                        offsets = ?offsets,
                        ms = elapsed.as_millis() as u64,
                        mb_per_s = format!("{:.1}", sent as f64 / 1e6 / elapsed.as_secs_f64().max(1e-6)),
                        "snapshot sent"
                    );
                    if let Some(last) = &meta.last_log_id {
                        self.pool.note_matched(target, &vote, last.index);
                    }
                    return Ok(resp);
                }
                Ok(wire::SnapshotReply::Resend { from, why }) => {
                    resends += 1;
                    tracing::warn!(target, snapshot = %id, from, %why, "receiver rejected snapshot data; resending from its last verified frame");
                    if resends > MAX_RESENDS {
                        return Err(net(format!(
                            "snapshot {id} to node {target}: {resends} resends, last: {why}"
                        )));
                    }
                }
                Err(why) => {
                    let progressed = st.sent.load(Ordering::Relaxed) > sent_before;
                    failures = if progressed { 0 } else { failures + 1 };
                    tracing::warn!(target, snapshot = %id, %why, sent_bytes = st.sent.load(Ordering::Relaxed), "snapshot transfer interrupted; will resume");
                    if failures > MAX_FAILURES {
                        return Err(net(format!("snapshot {id} to node {target}: {why}")));
                    }
                    Self::pause(backoff, &mut cancel).await?;
                }
            }
        }
    }
}

/// Adapts an mpsc receiver into a `Stream` of body frames.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + Sync + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use openraft::raft::StreamAppendResult;

    use super::*;

    /// A peer whose stream-append route answers the first `answers`
    /// requests it reads and then ends the response.
    async fn peer_answering(answers: usize) -> (String, tokio::sync::watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(crate::serve::serve(
            listener,
            None,
            move |_| {
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                    assert_eq!(req.uri().path(), wire::PATH_STREAM_APPEND);
                    let mut body = req.into_body();
                    let mut reader = wire::FrameReader::default();
                    let mut out = Vec::new();
                    while out.len() < answers {
                        match reader.next_message::<AppendEntriesRequest<TypeConfig>>() {
                            Ok(Some(r)) => {
                                let res: StreamAppendResult<TypeConfig> = Ok(r.prev_log_id);
                                out.push(wire::frame(&res).unwrap());
                                continue;
                            }
                            Ok(None) => {}
                            Err(e) => panic!("bad frame: {e}"),
                        }
                        match body.frame().await {
                            Some(Ok(f)) => reader.push(&f.into_data().unwrap()),
                            _ => break,
                        }
                    }
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(out.concat()))))
                })
            },
            stop_rx,
            crate::serve::ServeOptions::default(),
        ));
        (addr, stop)
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: vec![],
        }
    }

    /// Whether a task woken just after the request arrived has run by the
    /// time `commit_updates_held` hands the request on.
    async fn woken_task_ran_first(request: AppendEntriesRequest<TypeConfig>) -> bool {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let notify = Arc::new(tokio::sync::Notify::new());
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = tokio::spawn({
            let (notify, ran) = (notify.clone(), ran.clone());
            async move {
                notify.notified().await;
                ran.store(true, Ordering::SeqCst);
            }
        });
        let reader = tokio::spawn({
            let ran = ran.clone();
            async move {
                let mut requests = std::pin::pin!(commit_updates_held(
                    rx,
                    COMMIT_UPDATE_HOLD,
                    COMMIT_UPDATE_HOLD_WHEN_WITHIN,
                ));
                requests.next().await.expect("a request");
                ran.load(Ordering::SeqCst)
            }
        });
        // Both tasks wait: the reader on the stream, the other on `notify`.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // The reader is woken first, the other task second.
        tx.unbounded_send(request).unwrap();
        notify.notify_one();
        let seen = reader.await.unwrap();
        other.await.unwrap();
        seen
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_update_waits_for_the_tasks_already_woken() {
        assert!(woken_task_ran_first(heartbeat()).await);
        let mut with_entry = heartbeat();
        let leader = openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 };
        with_entry.entries.push(keel_storage::types::Entry {
            log_id: keel_storage::types::LogId::new(leader, 1),
            payload: openraft::EntryPayload::Blank,
        });
        assert!(!woken_task_ran_first(with_entry).await, "entries go out at once");
    }

    fn with_entries(commit: u64, indexes: std::ops::RangeInclusive<u64>) -> AppendEntriesRequest<TypeConfig> {
        let leader = openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 };
        let mut r = commit_update(commit);
        r.entries = indexes
            .map(|i| keel_storage::types::Entry {
                log_id: keel_storage::types::LogId::new(leader, i),
                payload: openraft::EntryPayload::Blank,
            })
            .collect();
        r
    }

    fn commit_update(commit: u64) -> AppendEntriesRequest<TypeConfig> {
        let leader = openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 };
        let mut r = heartbeat();
        r.leader_commit = Some(keel_storage::types::LogId::new(leader, commit));
        r
    }

    fn commits(reqs: &[AppendEntriesRequest<TypeConfig>]) -> Vec<(Option<u64>, usize)> {
        reqs.iter()
            .map(|r| (r.leader_commit.as_ref().map(|c| c.index), r.entries.len()))
            .collect()
    }

    /// Two requests with entries, so that the stream has seen their pace.
    fn paced(tx: &futures::channel::mpsc::UnboundedSender<AppendEntriesRequest<TypeConfig>>) {
        tx.unbounded_send(with_entries(0, 1..=1)).unwrap();
        tx.unbounded_send(with_entries(0, 2..=2)).unwrap();
    }

    /// A commit update that a request with entries follows within the hold
    /// is dropped; two in a row leave the newer; one that nothing follows
    /// goes out once the hold has passed, or when openraft ends the call.
    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_update_gives_way_to_the_next_request() {
        let (hold, within) = (Duration::from_secs(3600), Duration::from_secs(3600));
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = std::pin::pin!(commit_updates_held(rx, hold, within));
        paced(&tx);
        tx.unbounded_send(commit_update(1)).unwrap();
        tx.unbounded_send(commit_update(2)).unwrap();
        tx.unbounded_send(with_entries(2, 3..=4)).unwrap();
        let mut first = vec![];
        for _ in 0..3 {
            first.push(out.next().await.expect("a request"));
        }
        assert_eq!(
            commits(&first),
            vec![(Some(0), 1), (Some(0), 1), (Some(2), 2)],
            "the updates gave way"
        );
        tx.unbounded_send(commit_update(3)).unwrap();
        tx.unbounded_send(commit_update(4)).unwrap();
        drop(tx);
        let rest: Vec<_> = out.collect().await;
        assert_eq!(
            commits(&rest),
            vec![(Some(4), 0)],
            "the newest update goes out as the call ends"
        );

        let hold = Duration::from_millis(50);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = std::pin::pin!(commit_updates_held(rx, hold, within));
        paced(&tx);
        out.next().await.expect("a request");
        out.next().await.expect("a request");
        let start = std::time::Instant::now();
        tx.unbounded_send(commit_update(5)).unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(30), out.next())
            .await
            .expect("sent after the hold")
            .expect("a request");
        assert!(start.elapsed() >= hold, "held for {:?}", start.elapsed());
        assert_eq!(commits(&[sent]), vec![(Some(5), 0)]);
        drop(tx);
    }

    /// While requests with entries come further apart than `within` (or
    /// before two have come), a commit update is not held: each goes out,
    /// none gives way.
    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_update_is_not_held_when_writes_are_slow() {
        let (hold, within) = (Duration::from_secs(3600), Duration::ZERO);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = std::pin::pin!(commit_updates_held(rx, hold, within));
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(30), out.next())
                .await
                .expect("not held")
                .expect("a request")
        };
        // Before any request with entries.
        tx.unbounded_send(commit_update(1)).unwrap();
        tx.unbounded_send(commit_update(2)).unwrap();
        assert_eq!(commits(&[next().await, next().await]), vec![(Some(1), 0), (Some(2), 0)]);
        // Two requests with entries further apart than `within`.
        tx.unbounded_send(with_entries(2, 3..=3)).unwrap();
        next().await;
        std::thread::sleep(Duration::from_millis(2));
        tx.unbounded_send(with_entries(2, 4..=4)).unwrap();
        next().await;
        tx.unbounded_send(commit_update(3)).unwrap();
        tx.unbounded_send(commit_update(4)).unwrap();
        assert_eq!(commits(&[next().await, next().await]), vec![(Some(3), 0), (Some(4), 0)]);
    }

    async fn results_of(addr: &str, requests: usize) -> Vec<Result<StreamAppendResult<TypeConfig>, String>> {
        // Each with an entry: requests without one may give way to the next
        // (`commit_updates_held`), and these tests count requests.
        let requests = (1..=requests as u64).map(|i| with_entries(0, i..=i)).collect();
        results_with(addr, requests, Purged::default()).await
    }

    async fn results_with(
        addr: &str,
        requests: Vec<AppendEntriesRequest<TypeConfig>>,
        purged: Purged,
    ) -> Vec<Result<StreamAppendResult<TypeConfig>, String>> {
        let pool = PeerPool::new(1, "test", None, Arc::new(crate::hooks::NoNetHooks));
        let node = KeelNode {
            raft_addr: addr.to_string(),
            api_addr: addr.to_string(),
        };
        let mut net = NetworkFactory::new(pool).with_purged(purged).new_client(2, &node).await;
        let input = futures::stream::iter(requests);
        let option = RPCOption::new(Duration::from_secs(5));
        match net.stream_append(input, option).await {
            Ok(results) => results.map(|r| r.map_err(|e| e.to_string())).collect().await,
            Err(e) => vec![Err(format!("the call failed to open: {e}"))],
        }
    }

    #[test]
    fn only_a_request_reaching_below_the_purge_point_is_behind_it() {
        use openraft::impls::leader_id_adv::LeaderId;
        let after = |index: Option<u64>| AppendEntriesRequest::<TypeConfig> {
            prev_log_id: index.map(|i| keel_storage::types::LogId::new(LeaderId { term: 1, node_id: 1 }, i)),
            ..heartbeat()
        };
        let nothing_purged = Purged::default();
        assert_eq!(below_purge(&after(None), &nothing_purged), None);
        assert_eq!(below_purge(&after(Some(1)), &nothing_purged), None);

        let store_dir = tempfile::TempDir::new().unwrap();
        let purged = purged_up_to(store_dir.path(), 10);
        assert!(
            below_purge(&after(None), &purged).is_some(),
            "from the start (as heartbeats to a new learner are)"
        );
        assert!(below_purge(&after(Some(1)), &purged).is_some());
        assert!(below_purge(&after(Some(9)), &purged).is_some());
        assert_eq!(
            below_purge(&after(Some(10)), &purged),
            None,
            "the purge point itself is known"
        );
        assert_eq!(below_purge(&after(Some(11)), &purged), None);
    }

    /// A purge mark at `index`, from a real log store.
    fn purged_up_to(dir: &std::path::Path, index: u64) -> Purged {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        rt.block_on(purged_at(dir, index))
    }

    async fn purged_at(dir: &std::path::Path, index: u64) -> Purged {
        use openraft::impls::leader_id_adv::LeaderId;
        use openraft::storage::RaftLogStorage;
        let mut log = keel_storage::LogStore::open(dir, Arc::new(keel_storage::NoHooks)).unwrap();
        let upto = keel_storage::types::LogId::new(LeaderId { term: 1, node_id: 1 }, index);
        log.purge(upto).await.unwrap();
        log.purged()
    }

    /// A heartbeat follows what the follower last matched, which may be
    /// below the purge point while a snapshot is on its way: as the one
    /// request of its call it goes through. A second request below the
    /// purge point in one call is a stale payload, and the call fails.
    /// (openraft produces a stale payload's requests 10 ms apart, beyond
    /// `COMMIT_UPDATE_HOLD`, so those without entries do not give way to
    /// each other; here both carry an entry and cannot.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_request_below_the_purge_point_fails_the_call() {
        use openraft::impls::leader_id_adv::LeaderId;
        let dir = tempfile::TempDir::new().unwrap();
        let purged = purged_at(dir.path(), 10).await;
        let behind = AppendEntriesRequest::<TypeConfig> {
            prev_log_id: Some(keel_storage::types::LogId::new(LeaderId { term: 1, node_id: 1 }, 3)),
            ..heartbeat()
        };

        let (addr, _stop) = peer_answering(1).await;
        let results = results_with(&addr, vec![behind.clone()], purged.clone()).await;
        assert_eq!(results.len(), 1, "{results:?}");
        assert!(matches!(&results[0], Ok(Ok(Some(l))) if l.index == 3), "{results:?}");

        let (addr, _stop) = peer_answering(2).await;
        let behind_with_entry = AppendEntriesRequest::<TypeConfig> {
            prev_log_id: behind.prev_log_id,
            ..with_entries(0, 4..=4)
        };
        let results = results_with(&addr, vec![behind_with_entry.clone(), behind_with_entry], purged).await;
        assert!(matches!(results.last(), Some(Err(_))), "{results:?}");
    }

    /// Once the call's results are dropped, the body takes no more requests
    /// from openraft's producer, and the producer itself is dropped.
    #[tokio::test]
    async fn a_finished_call_stops_taking_requests() {
        let producer = Arc::new(());
        let held = producer.clone();
        let input = futures::stream::iter(0..10).map(move |i| {
            let _ = &held;
            i
        });
        let (mut input, closer) = closable(input);
        assert_eq!(input.next().await, Some(0));
        assert_eq!(Arc::strong_count(&producer), 2);
        drop(closer);
        assert_eq!(input.next().await, None, "no request after the call ended");
        assert_eq!(Arc::strong_count(&producer), 1, "the producer was dropped");
    }

    /// Every request answered, then the end: a finished call.
    #[tokio::test]
    async fn a_stream_that_answers_every_request_ends_cleanly() {
        let (addr, _stop) = peer_answering(2).await;
        let results = results_of(&addr, 2).await;
        assert_eq!(results.len(), 2, "{results:?}");
        assert!(results.iter().all(|r| matches!(r, Ok(Ok(None)))), "{results:?}");
    }

    /// A response that ends before answering every request is a failed
    /// call. Ending quietly would let openraft keep the unanswered request
    /// as work left over and resume it later, when it may be stale: a
    /// follower cut off during compaction then never got entries again.
    #[tokio::test]
    async fn a_stream_that_ends_with_requests_unanswered_is_an_error() {
        for answered in [0, 1] {
            let (addr, _stop) = peer_answering(answered).await;
            let results = results_of(&addr, 2).await;
            assert_eq!(results.len(), answered + 1, "{results:?}");
            let last = results.last().unwrap();
            assert!(
                matches!(last, Err(e) if e.contains("unanswered")),
                "answered {answered}: {results:?}"
            );
        }
    }
}

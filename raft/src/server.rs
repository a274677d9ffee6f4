//! The receiving side of the peer protocol: routes each peer request to the
//! local Raft node after checking that the sender belongs to this cluster and
//! is the node its certificate names.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::Full;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::Request;
use hyper::Response;
use hyper::StatusCode;
use hyper::body::Incoming;
use keel_storage::NodeId;
use keel_storage::SnapshotFile;
use keel_storage::TypeConfig;
use keel_storage::snapshot::transfer::Incoming as IncomingSnapshot;
use openraft::ReadPolicy;
use openraft::errors::ClientWriteError;
use openraft::errors::LinearizableReadError;
use openraft::errors::RaftError;
use openraft::raft::VoteRequest;
use openraft::type_config::async_runtime::watch::WatchReceiver;

use crate::Raft;
use crate::hooks::NetHooks;
use crate::serve::ConnInfo;
use crate::tls::Identity;
use crate::wire;

/// Runs an API request relayed by another node (see [`wire::PATH_API_FORWARD`]).
/// Implemented by the binary, which owns the API router.
pub trait ApiForwardHandler: Send + Sync {
    /// Serves `req`, relayed by node `from`.
    fn handle(&self, from: NodeId, req: wire::ApiForward)
    -> futures::future::BoxFuture<'static, wire::ApiForwardReply>;
}

/// What the peer service needs.
pub struct PeerService {
    /// The local Raft node.
    pub raft: Raft,
    /// This node's id.
    pub node_id: NodeId,
    /// The cluster name every peer must present.
    pub cluster: String,
    /// True in `--insecure` mode: no certificates, `x-keel-from` is trusted.
    pub insecure: bool,
    /// Where incoming snapshots are written before install.
    pub incoming_dir: PathBuf,
    /// Metrics hooks.
    pub hooks: Arc<dyn NetHooks>,
    /// Serves API requests relayed to this node as the leader; `None`
    /// refuses them.
    pub api_forward: Option<Arc<dyn ApiForwardHandler>>,
    /// The snapshot transfer in progress, if any.
    pub inbox: SnapshotInbox,
    /// When the leader last sent an append (read by [`crate::failover`]).
    pub contact: Arc<crate::failover::LeaderContact>,
}

/// The receiving end of snapshot transfers, one at a time: the partial file
/// of the snapshot last offered, kept between attempts.
pub struct SnapshotInbox {
    slot: tokio::sync::Mutex<Option<IncomingSnapshot>>,
    /// Bumped by every offer, so that a transfer still streaming into the
    /// slot (its sender gone quiet) gives way to the new attempt.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Default for SnapshotInbox {
    fn default() -> Self {
        Self {
            slot: tokio::sync::Mutex::new(None),
            epoch: tokio::sync::watch::channel(0).0,
        }
    }
}

/// Longest wait for the inbox when another transfer holds it.
const INBOX_WAIT: Duration = Duration::from_secs(5);
/// A transfer that receives nothing for this long is given up (kept for resumption).
const SNAPSHOT_IDLE: Duration = Duration::from_secs(30);
/// Received bytes are verified and written in pieces of about this size.
const RECEIVE_PIECE: usize = 1 << 20;

/// Why a transfer attempt stopped before its end.
enum Stop {
    Cut(String),
    Idle,
    Preempted,
}

type Resp = Response<UnsyncBoxBody<Bytes, io::Error>>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed_unsync());
    *r.status_mut() = status;
    r
}

fn ok_msg<T: serde::Serialize>(v: &T) -> Resp {
    match wire::encode(v) {
        Ok(b) => reply(StatusCode::OK, b),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn read_msg<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Resp> {
    let body = http_body_util::Limited::new(req.into_body(), wire::MAX_MESSAGE)
        .collect()
        .await
        .map_err(|e| reply(StatusCode::PAYLOAD_TOO_LARGE, format!("reading body: {e}")))?
        .to_bytes();
    wire::decode(&body).map_err(|e| reply(StatusCode::BAD_REQUEST, e.to_string()))
}

impl PeerService {
    /// Handles one request from the connection described by `conn`.
    pub async fn handle(self: Arc<Self>, conn: ConnInfo, req: Request<Incoming>) -> Result<Resp, Infallible> {
        Ok(match self.check(&conn, &req) {
            Err(r) => *r,
            Ok(from) => self.route(from, req).await,
        })
    }

    /// Checks cluster name and sender identity; returns the sender's id.
    fn check(&self, conn: &ConnInfo, req: &Request<Incoming>) -> Result<NodeId, Box<Resp>> {
        if req.method() != hyper::Method::POST {
            return Err(Box::new(reply(StatusCode::METHOD_NOT_ALLOWED, "peer routes take POST")));
        }
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        match header(wire::HDR_CLUSTER) {
            Some(c) if c == self.cluster => {}
            other => {
                tracing::warn!(remote = %conn.remote, claimed = ?other, "peer request from another cluster refused");
                return Err(Box::new(reply(
                    StatusCode::PRECONDITION_FAILED,
                    format!(
                        "cluster mismatch: this node belongs to {:?}, request claims {other:?}",
                        self.cluster
                    ),
                )));
            }
        }
        let from: NodeId = header(wire::HDR_FROM)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Box::new(reply(StatusCode::BAD_REQUEST, "missing or malformed x-keel-from")))?;
        if !self.insecure {
            match &conn.identity {
                Some(Identity::Node(id)) if *id == from => {}
                other => {
                    tracing::warn!(remote = %conn.remote, claimed = from, cert = ?other, "peer identity mismatch refused");
                    return Err(Box::new(reply(
                        StatusCode::FORBIDDEN,
                        format!("certificate identity {other:?} does not match claimed node {from}"),
                    )));
                }
            }
        }
        Ok(from)
    }

    async fn route(self: Arc<Self>, from: NodeId, req: Request<Incoming>) -> Resp {
        let fatal = |e: &dyn std::fmt::Display| reply(StatusCode::SERVICE_UNAVAILABLE, format!("raft stopped: {e}"));
        match req.uri().path() {
            wire::PATH_APPEND => match read_msg(req).await {
                Ok(m) => {
                    self.contact.touch();
                    match self.raft.append_entries(m).await {
                        Ok(r) => ok_msg(&r),
                        Err(e) => fatal(&e),
                    }
                }
                Err(r) => r,
            },
            wire::PATH_STREAM_APPEND => {
                tracing::debug!(from, "append stream opened");
                self.stream_append(req)
            }
            wire::PATH_VOTE => match read_msg::<VoteRequest<TypeConfig>>(req).await {
                Ok(m) => match self.refuse_vote_with_empty_log(from, &m) {
                    Some(r) => r,
                    None => {
                        let (transfer, candidate_log) = (m.leadership_transfer, m.last_log_id);
                        match self.raft.vote(m).await {
                            Ok(r) => {
                                // A fast-failover candidate lost on the log:
                                // the next survivor in line may go now.
                                if transfer && !r.vote_granted && r.last_log_id > candidate_log {
                                    self.contact.refused_shorter_log(from);
                                }
                                ok_msg(&r)
                            }
                            Err(e) => fatal(&e),
                        }
                    }
                },
                Err(r) => r,
            },
            wire::PATH_PRE_VOTE => match read_msg(req).await {
                Ok(m) => match self.refuse_vote_with_empty_log(from, &m) {
                    Some(r) => r,
                    None => match self.raft.pre_vote(m).await {
                        Ok(r) => ok_msg(&r),
                        Err(e) => fatal(&e),
                    },
                },
                Err(r) => r,
            },
            wire::PATH_TRANSFER_LEADER => match read_msg(req).await {
                Ok(m) => match self.raft.handle_transfer_leader(m).await {
                    Ok(r) => ok_msg(&r),
                    Err(e) => fatal(&e),
                },
                Err(r) => r,
            },
            wire::PATH_FORWARD_WRITE => match read_msg::<wire::ForwardWrite>(req).await {
                Ok(m) => ok_msg(&self.forward_write(m).await),
                Err(r) => r,
            },
            wire::PATH_FORWARD_WRITES => match read_msg::<wire::ForwardWrites>(req).await {
                Ok(m) if m.len() > wire::MAX_FORWARD_BATCH => reply(
                    StatusCode::BAD_REQUEST,
                    format!("{} writes in one batch; at most {}", m.len(), wire::MAX_FORWARD_BATCH),
                ),
                Ok(m) => ok_msg(&self.forward_writes(m).await),
                Err(r) => r,
            },
            wire::PATH_READ_INDEX => ok_msg(&self.read_index().await),
            wire::PATH_API_FORWARD => match (&self.api_forward, read_msg::<wire::ApiForward>(req).await) {
                (_, Err(r)) => r,
                (None, Ok(_)) => reply(StatusCode::NOT_FOUND, "this node does not serve relayed API calls"),
                (Some(h), Ok(m)) => ok_msg(&h.handle(from, m).await),
            },
            wire::PATH_SNAPSHOT_OFFER => match read_msg::<wire::SnapshotOffer>(req).await {
                Ok(m) => ok_msg(&self.snapshot_offer(from, m).await),
                Err(r) => r,
            },
            wire::PATH_SNAPSHOT => {
                // In a task of its own: hyper drops this handler when the
                // sender resets the stream, but the receiving side must still
                // settle its partial file and free the inbox.
                let this = self.clone();
                match tokio::spawn(async move { this.receive_snapshot(from, req).await }).await {
                    Ok(Ok(r)) => ok_msg(&r),
                    Ok(Err(e)) => {
                        tracing::warn!(from, error = %e, "snapshot transfer failed");
                        reply(StatusCode::BAD_REQUEST, e.to_string())
                    }
                    Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            other => reply(StatusCode::NOT_FOUND, format!("no peer route {other}")),
        }
    }

    /// Pipelined appends: requests arrive as frames on one stream and are
    /// handed to openraft as they come; each result goes back, in order, as
    /// soon as the entries are flushed.
    fn stream_append(&self, req: Request<Incoming>) -> Resp {
        use futures::StreamExt;
        let contact = self.contact.clone();
        let input = futures::stream::unfold(
            (req.into_body(), wire::FrameReader::default(), contact),
            |(mut body, mut reader, contact)| async move {
                loop {
                    match reader.next_message::<openraft::raft::AppendEntriesRequest<TypeConfig>>() {
                        Ok(Some(r)) => {
                            contact.touch();
                            return Some((r, (body, reader, contact)));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "malformed append stream");
                            return None;
                        }
                    }
                    match body.frame().await {
                        None => return None,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "append stream closed by peer");
                            return None;
                        }
                        Some(Ok(f)) => {
                            if let Ok(d) = f.into_data() {
                                reader.push(&d);
                            }
                        }
                    }
                }
            },
        );
        let results = self.raft.stream_append(input).map(|item| match item {
            Ok(r) => wire::frame(&r).map(hyper::body::Frame::data),
            Err(fatal) => Err(io::Error::other(format!("raft stopped: {fatal}"))),
        });
        Response::new(http_body_util::StreamBody::new(results).boxed_unsync())
    }

    /// A node whose log holds nothing beyond the initial membership entry
    /// refuses to vote for a candidate whose log is longer. Such a node is
    /// either brand new (and a new node is added as a learner, so it holds
    /// the log before it ever becomes a voter) or a member whose data
    /// directory was wiped: its vote would let a candidate that lacks
    /// committed entries win, and it forgot whom it voted for. It must be
    /// removed from the cluster and added again. Cluster formation is not
    /// affected: the first candidate's log ends at the initial entry.
    fn refuse_vote_with_empty_log(&self, from: NodeId, req: &openraft::raft::VoteRequest<TypeConfig>) -> Option<Resp> {
        let local = self.raft.metrics().borrow_watched().last_log_index.unwrap_or(0);
        let candidate = req.last_log_id.as_ref().map(|l| l.index).unwrap_or(0);
        if local > 0 || candidate == 0 {
            return None;
        }
        tracing::warn!(
            candidate = from,
            candidate_last_index = candidate,
            "vote refused: this node's log is empty but the cluster's is not; if this node's data was lost, \
             remove it from the cluster and add it again"
        );
        Some(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {} has an empty log and does not vote for a candidate with entries up to {candidate}; \
                 it must be removed from the cluster and added again",
                self.node_id
            ),
        ))
    }

    /// A single relayed write (followers from before the batch route): a
    /// batch of one.
    async fn forward_write(&self, req: wire::ForwardWrite) -> wire::ForwardReply {
        let mut replies = self.forward_writes(vec![req]).await;
        replies.pop().expect("one reply per write")
    }

    /// Proposes a batch in one message to the Raft core; one reply per
    /// write, in order.
    async fn forward_writes(&self, reqs: wire::ForwardWrites) -> Vec<wire::ForwardReply> {
        use futures::StreamExt;
        let n = reqs.len();
        let mut stream = match self.raft.client_write_many(reqs).await {
            Ok(s) => s,
            Err(fatal) => return vec![wire::ForwardReply::Failed(fatal.to_string()); n],
        };
        let mut out = Vec::with_capacity(n);
        while let Some(item) = stream.next().await {
            out.push(match item {
                Ok(Ok(r)) => wire::ForwardReply::Applied {
                    index: r.log_id.index,
                    response: r.response,
                },
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => wire::ForwardReply::NotLeader { leader: f.leader_id },
                Ok(Err(e)) => wire::ForwardReply::Failed(e.to_string()),
                Err(fatal) => wire::ForwardReply::Failed(fatal.to_string()),
            });
        }
        // A stream cut short (the core stopped) leaves the rest unknown.
        out.resize_with(n, || wire::ForwardReply::Failed("raft stopped before answering".into()));
        out
    }

    async fn read_index(&self) -> wire::ReadIndexReply {
        match self.raft.get_read_log_id(ReadPolicy::ReadIndex).await {
            Ok((read, _)) => wire::ReadIndexReply::Ready { index: read.index() },
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                wire::ReadIndexReply::NotLeader { leader: f.leader_id }
            }
            Err(e) => wire::ReadIndexReply::Failed(e.to_string()),
        }
    }

    /// Answers an offer: where the sender should start (the verified
    /// prefix kept from earlier attempts at the same file), or that nothing
    /// needs sending.
    async fn snapshot_offer(&self, from: NodeId, offer: wire::SnapshotOffer) -> wire::OfferReply {
        let (committed, vote) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.local_committed, m.vote)
        };
        if offer.meta.last_log_id.is_some() && offer.meta.last_log_id <= committed {
            tracing::info!(from, snapshot = %offer.id, ?committed, "offered snapshot already covered by committed state");
            return wire::OfferReply::Covered { vote };
        }
        if let Err(e) = self.check_installable(&offer.vote, &offer.meta) {
            return wire::OfferReply::Refused(e.to_string());
        }
        // A transfer still streaming into the slot gives way.
        self.inbox.epoch.send_modify(|e| *e += 1);
        let Ok(mut slot) = tokio::time::timeout(INBOX_WAIT, self.inbox.slot.lock()).await else {
            return wire::OfferReply::Busy;
        };
        if slot.as_ref().is_none_or(|inc| inc.id != offer.id) {
            drop(slot.take());
            let (dir, id) = (self.incoming_dir.clone(), offer.id);
            match tokio::task::spawn_blocking(move || IncomingSnapshot::open(&dir, id)).await {
                Ok(Ok(inc)) => *slot = Some(inc),
                Ok(Err(e)) => return wire::OfferReply::Refused(format!("cannot open the incoming snapshot file: {e}")),
                Err(e) => return wire::OfferReply::Refused(e.to_string()),
            }
        }
        let resume = slot.as_ref().map(|i| i.verified_len()).unwrap_or(0);
        tracing::info!(from, snapshot = %offer.id, resume_from = resume, "snapshot offered");
        wire::OfferReply::Resume { from: resume }
    }

    /// Receives one attempt of a snapshot transfer into the partial file
    /// the offer opened, verifying every frame as it arrives. Memory use is
    /// one piece (about 1 MiB) plus one chunk in the verifier. A rejected
    /// frame is answered with the offset to resend from; a cut connection
    /// leaves the verified prefix for the next attempt; a complete file is
    /// installed.
    async fn receive_snapshot(&self, from: NodeId, req: Request<Incoming>) -> io::Result<wire::SnapshotReply> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let mut body = req.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let env: wire::SnapshotEnvelope = loop {
            if buf.len() >= 4 {
                let n = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if n > 1 << 20 {
                    return Err(bad(format!("snapshot envelope of {n} bytes")));
                }
                if buf.len() >= 4 + n {
                    let env = wire::decode(&buf[4..4 + n])?;
                    buf.drain(..4 + n);
                    break env;
                }
            }
            match tokio::time::timeout(SNAPSHOT_IDLE, body.frame()).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                Ok(Some(Err(e))) => return Err(bad(format!("reading snapshot body: {e}"))),
                Ok(None) => return Err(bad("snapshot body ended before its envelope".into())),
                Err(_) => return Err(bad("no snapshot envelope in time".into())),
            }
        };
        let mut epoch = self.inbox.epoch.subscribe();
        epoch.borrow_and_update();
        let mut slot = tokio::time::timeout(INBOX_WAIT, self.inbox.slot.lock())
            .await
            .map_err(|_| io::Error::other("another snapshot transfer is in progress"))?;
        let mut inc = match slot.take() {
            Some(inc) if inc.id == env.id => inc,
            other => {
                *slot = other;
                return Err(bad(format!("snapshot {} was not offered first", env.id)));
            }
        };
        if inc.verified_len() != env.offset {
            let from_offset = inc.verified_len();
            *slot = Some(inc);
            return Ok(wire::SnapshotReply::Resend {
                from: from_offset,
                why: format!("sent from offset {}, but {from_offset} bytes are held", env.offset),
            });
        }
        if env.offset > 0 {
            tracing::info!(from, snapshot = %env.id, resume_from = env.offset, "snapshot transfer resumed");
        }
        let start = std::time::Instant::now();
        let mut last_report = start;
        let mut received = buf.len() as u64;
        self.hooks.snapshot_bytes(false, received);
        let mut stop: Option<Stop> = None;
        loop {
            let end_of_body = loop {
                if buf.len() >= RECEIVE_PIECE {
                    break false;
                }
                tokio::select! {
                    biased;
                    _ = epoch.changed() => {
                        stop = Some(Stop::Preempted);
                        break true;
                    }
                    f = tokio::time::timeout(SNAPSHOT_IDLE, body.frame()) => match f {
                        Err(_) => {
                            stop = Some(Stop::Idle);
                            break true;
                        }
                        Ok(None) => break true,
                        Ok(Some(Err(e))) => {
                            stop = Some(Stop::Cut(e.to_string()));
                            break true;
                        }
                        Ok(Some(Ok(f))) => {
                            if let Ok(d) = f.into_data() {
                                received += d.len() as u64;
                                self.hooks.snapshot_bytes(false, d.len() as u64);
                                buf.extend_from_slice(&d);
                            }
                        }
                    },
                }
            };
            // Verify and write what arrived (also after a cut: it is good
            // up to the last complete frame).
            let piece = std::mem::take(&mut buf);
            let (back, res) = tokio::task::spawn_blocking(move || {
                let res = inc.write(&piece);
                (inc, res)
            })
            .await
            .map_err(io::Error::other)?;
            inc = back;
            if let Err(e) = res {
                let resend = inc.verified_len();
                tracing::warn!(from, snapshot = %env.id, error = %e, resend_from = resend, "snapshot data rejected; asking for it again");
                *slot = Some(inc);
                return Ok(wire::SnapshotReply::Resend {
                    from: resend,
                    why: e.to_string(),
                });
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = std::time::Instant::now();
                tracing::info!(from, snapshot = %env.id, verified = inc.verified_len(), total = env.id.len, "snapshot transfer progress");
            }
            if end_of_body {
                break;
            }
        }
        if let Some(stop) = stop {
            let why = match stop {
                Stop::Cut(e) => format!("connection cut: {e}"),
                Stop::Idle => format!("nothing received for {SNAPSHOT_IDLE:?}"),
                Stop::Preempted => "a new offer arrived".to_string(),
            };
            let kept = inc.verified_len();
            let settled = tokio::task::spawn_blocking(move || inc.settle().map(|()| inc))
                .await
                .map_err(io::Error::other)??;
            *slot = Some(settled);
            tracing::warn!(from, snapshot = %env.id, received, kept, %why, "snapshot transfer interrupted; keeping the verified part");
            return Err(io::Error::other(format!("snapshot transfer interrupted: {why}")));
        }
        if !inc.is_complete() {
            let resend = inc.verified_len();
            let settled = tokio::task::spawn_blocking(move || inc.settle().map(|()| inc))
                .await
                .map_err(io::Error::other)??;
            *slot = Some(settled);
            return Ok(wire::SnapshotReply::Resend {
                from: resend,
                why: "the stream ended before the trailer".into(),
            });
        }
        let elapsed = start.elapsed();
        let path = tokio::task::spawn_blocking(move || inc.finish())
            .await
            .map_err(io::Error::other)??;
        tracing::info!(
            from,
            snapshot = %env.id,
            resumed_from = env.offset,
            received_bytes = received,
            file_bytes = env.id.len,
            ms = elapsed.as_millis() as u64,
            mb_per_s = format!("{:.1}", received as f64 / 1e6 / elapsed.as_secs_f64().max(1e-6)),
            "snapshot received"
        );
        self.check_installable(&env.vote, &env.meta)?;
        let snapshot = openraft::type_config::alias::SnapshotOf::<TypeConfig, SnapshotFile> {
            meta: env.meta,
            snapshot: SnapshotFile::open(path.clone())?,
        };
        let resp = self
            .raft
            .install_full_snapshot(env.vote, snapshot)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        // Not installed (openraft found it not newer): drop the file.
        if path.exists() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        drop(slot);
        Ok(wire::SnapshotReply::Installed(resp))
    }

    /// Refuses a snapshot that openraft would treat as corruption (and
    /// panic on): one whose last log id lies beyond the sender's vote, or
    /// one that contradicts what this node has committed.
    fn check_installable(
        &self,
        vote: &keel_storage::types::Vote,
        meta: &keel_storage::types::SnapshotMeta,
    ) -> io::Result<()> {
        let Some(last) = &meta.last_log_id else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot without a last log id",
            ));
        };
        if last.leader_id > vote.leader_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot last log id {last} is beyond the sender's vote {vote}"),
            ));
        }
        let committed = self.raft.metrics().borrow_watched().local_committed;
        if let Some(c) = committed
            && *last > c
            && last.index <= c.index
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot last log id {last} contradicts the locally committed {c}"),
            ));
        }
        Ok(())
    }
}

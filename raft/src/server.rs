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
use keel_storage::snapshot::format::StreamVerifier;
use openraft::ReadPolicy;
use openraft::errors::ClientWriteError;
use openraft::errors::LinearizableReadError;
use openraft::errors::RaftError;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use tokio::io::AsyncWriteExt;

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

    async fn route(&self, from: NodeId, req: Request<Incoming>) -> Resp {
        let fatal = |e: &dyn std::fmt::Display| reply(StatusCode::SERVICE_UNAVAILABLE, format!("raft stopped: {e}"));
        match req.uri().path() {
            wire::PATH_APPEND => match read_msg(req).await {
                Ok(m) => match self.raft.append_entries(m).await {
                    Ok(r) => ok_msg(&r),
                    Err(e) => fatal(&e),
                },
                Err(r) => r,
            },
            wire::PATH_STREAM_APPEND => {
                tracing::debug!(from, "append stream opened");
                self.stream_append(req)
            }
            wire::PATH_VOTE => match read_msg(req).await {
                Ok(m) => match self.refuse_vote_with_empty_log(from, &m) {
                    Some(r) => r,
                    None => match self.raft.vote(m).await {
                        Ok(r) => ok_msg(&r),
                        Err(e) => fatal(&e),
                    },
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
            wire::PATH_READ_INDEX => ok_msg(&self.read_index().await),
            wire::PATH_API_FORWARD => match (&self.api_forward, read_msg::<wire::ApiForward>(req).await) {
                (_, Err(r)) => r,
                (None, Ok(_)) => reply(StatusCode::NOT_FOUND, "this node does not serve relayed API calls"),
                (Some(h), Ok(m)) => ok_msg(&h.handle(from, m).await),
            },
            wire::PATH_SNAPSHOT => match self.receive_snapshot(from, req).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(from, error = %e, "snapshot transfer refused");
                    reply(StatusCode::BAD_REQUEST, e.to_string())
                }
            },
            other => reply(StatusCode::NOT_FOUND, format!("no peer route {other}")),
        }
    }

    /// Pipelined appends: requests arrive as frames on one stream and are
    /// handed to openraft as they come; each result goes back, in order, as
    /// soon as the entries are flushed.
    fn stream_append(&self, req: Request<Incoming>) -> Resp {
        use futures::StreamExt;
        let input = futures::stream::unfold(
            (req.into_body(), wire::FrameReader::default()),
            |(mut body, mut reader)| async move {
                loop {
                    match reader.next_message::<openraft::raft::AppendEntriesRequest<TypeConfig>>() {
                        Ok(Some(r)) => return Some((r, (body, reader))),
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

    async fn forward_write(&self, req: wire::ForwardWrite) -> wire::ForwardReply {
        match self.raft.client_write(req).await {
            Ok(r) => wire::ForwardReply::Applied {
                index: r.log_id.index,
                response: r.data,
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                wire::ForwardReply::NotLeader { leader: f.leader_id }
            }
            Err(e) => wire::ForwardReply::Failed(e.to_string()),
        }
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

    /// Streams a snapshot to a file in `incoming/`, verifying every frame
    /// as it arrives, then installs it. Memory use is one body frame.
    async fn receive_snapshot(&self, from: NodeId, req: Request<Incoming>) -> io::Result<Resp> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let mut body = req.into_body();
        let mut pending: Vec<u8> = Vec::new();
        let mut envelope: Option<wire::SnapshotEnvelope> = None;
        let mut file: Option<(PathBuf, tokio::fs::File)> = None;
        let mut verifier = StreamVerifier::new();
        let mut received = 0u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
        loop {
            let frame = tokio::time::timeout_at(deadline, body.frame())
                .await
                .map_err(|_| bad("snapshot transfer took too long".into()))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| bad(format!("reading snapshot body: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            let mut data: &[u8] = &data;
            if envelope.is_none() {
                pending.extend_from_slice(data);
                if pending.len() < 4 {
                    continue;
                }
                let n = u32::from_le_bytes([pending[0], pending[1], pending[2], pending[3]]) as usize;
                if n > 1 << 20 {
                    return Err(bad(format!("snapshot envelope of {n} bytes")));
                }
                if pending.len() < 4 + n {
                    continue;
                }
                let env: wire::SnapshotEnvelope = wire::decode(&pending[4..4 + n])?;
                let index = env.meta.last_log_id.as_ref().map(|l| l.index).unwrap_or(0);
                let path = self.incoming_dir.join(format!("from-{from}-{index}.part"));
                let f = tokio::fs::File::create(&path).await?;
                file = Some((path, f));
                envelope = Some(env);
                let rest = pending.split_off(4 + n);
                pending = rest;
                data = &pending;
            }
            if let Some((_, f)) = file.as_mut() {
                verifier
                    .feed(data)
                    .map_err(|e| bad(format!("snapshot chunk rejected: {e}")))?;
                f.write_all(data).await?;
                received += data.len() as u64;
                self.hooks.snapshot_bytes(false, data.len() as u64);
            }
            pending.clear();
        }
        let (Some(env), Some((path, mut f))) = (envelope, file) else {
            return Err(bad("snapshot body ended before its envelope".into()));
        };
        f.flush().await?;
        f.sync_all().await?;
        drop(f);
        if received != env.len || !verifier.is_complete() {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(bad(format!(
                "snapshot incomplete: {received} of {} bytes, trailer {}",
                env.len,
                if verifier.is_complete() { "ok" } else { "missing" }
            )));
        }
        self.check_installable(&env)?;
        let snapshot = openraft::type_config::alias::SnapshotOf::<TypeConfig, SnapshotFile> {
            meta: env.meta,
            snapshot: SnapshotFile::open(path)?,
        };
        let resp = self
            .raft
            .install_full_snapshot(env.vote, snapshot)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(ok_msg(&resp))
    }

    /// Refuses a snapshot that openraft would treat as corruption (and
    /// panic on): one whose last log id lies beyond the sender's vote, or
    /// one that contradicts what this node has committed.
    fn check_installable(&self, env: &wire::SnapshotEnvelope) -> io::Result<()> {
        let Some(last) = &env.meta.last_log_id else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot without a last log id",
            ));
        };
        if last.leader_id > env.vote.leader_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot last log id {last} is beyond the sender's vote {}", env.vote),
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

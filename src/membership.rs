//! Membership changes and leadership: the admin REST API that grows,
//! shrinks and hands over the cluster, the `/cluster/join` route a new node
//! calls, the graceful hand-off before a leader stops, and the join loop of
//! `keel serve --join`.
//!
//! Every change runs on the leader, the only node that knows how far each
//! member has replicated and when it last answered. A follower relays these
//! calls to the leader over the peer port ([`wire::PATH_API_FORWARD`]); the
//! leader runs them through its own router as the original caller.
//!
//! Safety rules, checked on the leader before anything is proposed:
//! - a change that would leave a configuration (old or new, as joint
//!   consensus needs both) without a majority of members that answered
//!   within one election timeout is refused (`quorum_at_risk`) unless the
//!   caller passes `force=true`;
//! - a learner is promoted only once it is reachable and at most
//!   [`MAX_LAG`] entries behind (`learner_lagging`, with its lag);
//! - a leader transfer starts only towards a reachable, caught-up voter,
//!   because openraft cannot abort a transfer once it began;
//! - every change carries the membership log id it was decided on as a
//!   precondition, so two concurrent changes never silently overwrite one
//!   another; `If-Match: <membership_log_id>` lets the caller pin it too.
//!
//! Calls are idempotent: adding a member that exists with the same
//! addresses, promoting a voter or removing a non-member changes nothing
//! and answers `"changed": false`.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use axum::Extension;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::Query;
use axum::extract::Request;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::delete;
use axum::routing::get;
use axum::routing::post;
use keel_raft::KeelNode;
use keel_raft::client::PeerError;
use keel_raft::serve::ConnInfo;
use keel_raft::server::ApiForwardHandler;
use keel_raft::tls::Identity;
use keel_raft::wire;
use keel_storage::types::LogId;
use openraft::ChangeMembers;
use openraft::Instant as _;
use openraft::ServerState;
use openraft::errors::ChangeMembershipError;
use openraft::errors::ClientWriteError;
use openraft::errors::RaftError;
use openraft::raft::Precondition;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use serde::Deserialize;
use serde::Serialize;
use serde_json::Value;
use serde_json::json;
use tower::ServiceExt;

use crate::api::Access;
use crate::api::ApiState;
use crate::api::authorize;
use crate::cluster::Cluster;
use crate::error::ApiError;

/// Most entries a learner may be behind the leader to be promoted, and a
/// voter to receive leadership.
pub const MAX_LAG: u64 = 256;

/// Longest a relayed call may take on the leader (a leader transfer waits
/// for the new leader).
const RELAY_TIMEOUT: Duration = Duration::from_secs(30);

/// Serializes membership changes and transfers on this node.
static CHANGE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The routes of this module, merged into the API router.
pub fn router(state: &ApiState) -> Router<ApiState> {
    Router::new()
        .route("/admin/members", get(list).post(add))
        .route("/admin/members/{id}", delete(remove))
        .route("/admin/members/{id}/promote", post(promote))
        .route("/admin/transfer-leader", post(transfer))
        .route("/cluster/join", post(join))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), to_leader))
}

// ---------------------------------------------------------------------------
// Relaying to the leader
// ---------------------------------------------------------------------------

/// Marks a request relayed by another node: it is served here, not relayed again.
#[derive(Clone, Copy)]
struct Relayed;

/// Request headers a relayed call keeps.
const RELAYED_REQUEST_HEADERS: &[&str] = &["content-type", "if-match"];
/// Response headers a relayed answer keeps.
const RELAYED_RESPONSE_HEADERS: &[&str] = &["content-type", "etag", "retry-after"];

/// Serves the call here if this node leads, otherwise relays it to the leader.
async fn to_leader(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if req.extensions().get::<Relayed>().is_some() || s.cluster.raft().is_leader() {
        return next.run(req).await;
    }
    let conn = req.extensions().get::<ConnInfo>().cloned();
    if !s.insecure && conn.as_ref().and_then(|c| c.identity.as_ref()).is_none() {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a client certificate signed by the cluster CA is required",
        )
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, crate::api::MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return ApiError::bad_request("invalid_body", e.to_string()).into_response(),
    };
    let msg = wire::ApiForward {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| parts.uri.path().to_string()),
        headers: RELAYED_REQUEST_HEADERS
            .iter()
            .filter_map(|h| {
                parts
                    .headers
                    .get(*h)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| (h.to_string(), v.to_string()))
            })
            .collect(),
        body: body.to_vec(),
        caller: conn.as_ref().and_then(|c| c.identity.as_ref()).map(|i| i.to_string()),
        remote: conn.map(|c| c.remote.to_string()).unwrap_or_default(),
    };
    match relay(&s.cluster, &msg).await {
        Ok(reply) => {
            let mut resp = Response::new(Body::from(reply.body));
            *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
            for (k, v) in reply.headers {
                if let (Ok(k), Ok(v)) = (
                    axum::http::HeaderName::try_from(k),
                    axum::http::HeaderValue::try_from(v),
                ) {
                    resp.headers_mut().insert(k, v);
                }
            }
            resp
        }
        // The leader may have become this node meanwhile.
        Err(None) => {
            let req = Request::from_parts(parts, Body::from(body));
            next.run(req).await
        }
        Err(Some(e)) => e.into_response(),
    }
}

/// Sends `msg` to the leader. `Err(None)` means this node leads now.
async fn relay(cluster: &Cluster, msg: &wire::ApiForward) -> Result<wire::ApiForwardReply, Option<ApiError>> {
    let deadline = Instant::now() + cluster.request_timeout();
    loop {
        let (leader, addr) = {
            let m = cluster.raft().metrics();
            let m = m.borrow_watched();
            let addr = m.current_leader.and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.raft_addr.clone())
            });
            (m.current_leader, addr)
        };
        match (leader, addr) {
            (Some(l), _) if l == cluster.node_id() => return Err(None),
            (Some(l), Some(addr)) => match cluster
                .pool()
                .call::<_, wire::ApiForwardReply>(l, &addr, wire::PATH_API_FORWARD, msg, RELAY_TIMEOUT)
                .await
            {
                Ok(r) => return Ok(r),
                // Never sent: try again (the leader may change).
                Err(PeerError::Unreachable { .. }) => {}
                Err(e @ PeerError::Failed { .. }) => {
                    return Err(Some(ApiError::unavailable(
                        "leader_unreachable",
                        format!(
                            "relaying to leader {l} failed, the call may or may not have taken effect \
                             (membership calls are idempotent: retry it): {e}"
                        ),
                    )));
                }
            },
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(Some(ApiError::unavailable(
                "no_leader",
                "no reachable leader to serve this call; retry later",
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves calls relayed by other nodes through the API router, as the
/// caller the relaying node authenticated.
pub struct Forwarder {
    router: Router,
}

impl Forwarder {
    /// Serves relayed calls with `router` (the whole API router).
    pub fn new(router: Router) -> Self {
        Self { router }
    }
}

impl ApiForwardHandler for Forwarder {
    fn handle(&self, from: u64, req: wire::ApiForward) -> futures::future::BoxFuture<'static, wire::ApiForwardReply> {
        let router = self.router.clone();
        Box::pin(async move {
            let fail = |status: StatusCode, m: String| wire::ApiForwardReply {
                status: status.as_u16(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: serde_json::to_vec(&json!({"error": {"code": "bad_relay", "message": m}})).unwrap_or_default(),
            };
            // Only the routes that must run on the leader are relayed.
            if !(req.path_and_query.starts_with("/admin/") || req.path_and_query.starts_with("/cluster/join")) {
                return fail(StatusCode::FORBIDDEN, format!("{} is not relayed", req.path_and_query));
            }
            let mut builder = Request::builder().method(req.method.as_str()).uri(&req.path_and_query);
            for (k, v) in &req.headers {
                if RELAYED_REQUEST_HEADERS.contains(&k.as_str()) {
                    builder = builder.header(k, v);
                }
            }
            let mut request = match builder.body(Body::from(req.body)) {
                Ok(r) => r,
                Err(e) => return fail(StatusCode::BAD_REQUEST, e.to_string()),
            };
            let identity = req.caller.as_deref().and_then(parse_identity);
            if req.caller.is_some() && identity.is_none() {
                return fail(StatusCode::BAD_REQUEST, format!("unknown caller {:?}", req.caller));
            }
            tracing::debug!(from, path = %req.path_and_query, caller = ?req.caller, "serving a relayed call");
            request.extensions_mut().insert(ConnInfo {
                identity,
                remote: req.remote.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            });
            request.extensions_mut().insert(Relayed);
            let resp = match router.oneshot(request).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let status = resp.status().as_u16();
            let headers = RELAYED_RESPONSE_HEADERS
                .iter()
                .filter_map(|h| {
                    resp.headers()
                        .get(*h)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| (h.to_string(), v.to_string()))
                })
                .collect();
            let body = axum::body::to_bytes(resp.into_body(), wire::MAX_MESSAGE)
                .await
                .map(|b| b.to_vec())
                .unwrap_or_default();
            wire::ApiForwardReply { status, headers, body }
        })
    }
}

/// Parses an identity as [`Identity`]'s `Display` writes it.
fn parse_identity(s: &str) -> Option<Identity> {
    let (kind, name) = s.split_once('/')?;
    match kind {
        "node" => name.parse().ok().map(Identity::Node),
        "client" => Some(Identity::Client(name.to_string())),
        "admin" => Some(Identity::Admin(name.to_string())),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The leader's view
// ---------------------------------------------------------------------------

/// What the leader knows about the membership and every member's progress.
struct LeaderView {
    me: u64,
    term: u64,
    last_log_index: u64,
    log_id: Option<LogId>,
    committed: bool,
    configs: Vec<BTreeSet<u64>>,
    nodes: BTreeMap<u64, KeelNode>,
    matched: BTreeMap<u64, Option<u64>>,
    ack_age: BTreeMap<u64, Option<Duration>>,
    /// A member is reachable if it answered within this window.
    window: Duration,
}

impl LeaderView {
    /// The leader's view, or 503 `not_leader` on any other node.
    fn of(cluster: &Cluster) -> Result<Self, ApiError> {
        let raft = cluster.raft();
        let m = raft.metrics();
        let m = m.borrow_watched();
        if m.state != ServerState::Leader {
            return Err(ApiError::unavailable(
                "not_leader",
                format!(
                    "node {} is not the leader (leader: {:?}); retry: calls are relayed to the leader",
                    cluster.node_id(),
                    m.current_leader
                ),
            ));
        }
        let membership = m.membership_config.membership();
        Ok(LeaderView {
            me: cluster.node_id(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            log_id: *m.membership_config.log_id(),
            committed: m.membership_config.log_id() == m.committed_membership_config.log_id(),
            configs: membership.get_joint_config().clone(),
            nodes: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            matched: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.as_ref().map(|l| l.index))).collect())
                .unwrap_or_default(),
            ack_age: m
                .heartbeat
                .as_ref()
                .map(|h| h.iter().map(|(id, t)| (*id, t.as_ref().map(|t| t.elapsed()))).collect())
                .unwrap_or_default(),
            window: Duration::from_millis(raft.config().election_timeout_min),
        })
    }

    fn voters(&self) -> BTreeSet<u64> {
        self.configs.iter().flatten().copied().collect()
    }

    fn is_voter(&self, id: u64) -> bool {
        self.configs.iter().any(|c| c.contains(&id))
    }

    /// Entries `id` is behind the leader's last log entry.
    fn lag(&self, id: u64) -> u64 {
        if id == self.me {
            return 0;
        }
        match self.matched.get(&id).copied().flatten() {
            Some(m) => self.last_log_index.saturating_sub(m),
            None => self.last_log_index + 1,
        }
    }

    /// Time since `id` last answered the leader, if it ever did.
    fn last_ack(&self, id: u64) -> Option<Duration> {
        if id == self.me {
            return Some(Duration::ZERO);
        }
        self.ack_age.get(&id).copied().flatten()
    }

    fn reachable(&self, id: u64) -> bool {
        self.last_ack(id).is_some_and(|a| a <= self.window)
    }

    fn membership_tag(&self) -> String {
        fmt_log_id(self.log_id.as_ref())
    }

    /// Refuses the change if the current configurations or `new_voters`
    /// would lack a majority of reachable members.
    fn quorum_check(&self, new_voters: &BTreeSet<u64>, force: bool) -> Result<(), ApiError> {
        if force {
            return Ok(());
        }
        for cfg in self.configs.iter().chain(std::iter::once(new_voters)) {
            let up: BTreeSet<u64> = cfg.iter().copied().filter(|id| self.reachable(*id)).collect();
            let need = cfg.len() / 2 + 1;
            if up.len() < need {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "quorum_at_risk",
                    format!(
                        "refused: the voter set {cfg:?} would need {need} reachable members but only {up:?} answered \
                         within {} ms; bring members back first, or pass force=true to accept the risk",
                        self.window.as_millis()
                    ),
                )
                .with("voters", cfg.iter().copied().collect::<Vec<_>>())
                .with("reachable", up.into_iter().collect::<Vec<_>>())
                .with("needed", need));
            }
        }
        Ok(())
    }

    /// Checks `If-Match` against the current membership log id.
    fn check_if_match(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(v) = headers.get("if-match") else {
            return Ok(());
        };
        let v = v
            .to_str()
            .map_err(|_| ApiError::bad_request("invalid_header", "If-Match is not ASCII"))?
            .trim()
            .trim_matches('"');
        if v == "*" || v == self.membership_tag() {
            return Ok(());
        }
        Err(membership_changed(&self.membership_tag(), v))
    }

    fn precondition(&self) -> Precondition<keel_storage::TypeConfig> {
        Precondition::LastMembershipLogId {
            last_membership_log_id: self.log_id,
        }
    }

    fn info(&self, id: u64, node: &KeelNode) -> MemberInfo {
        MemberInfo {
            id,
            role: if self.is_voter(id) { "voter" } else { "learner" }.into(),
            leader: id == self.me,
            raft_addr: node.raft_addr.clone(),
            api_addr: node.api_addr.clone(),
            matched_index: if id == self.me {
                Some(self.last_log_index)
            } else {
                self.matched.get(&id).copied().flatten()
            },
            lag: self.lag(id),
            reachable: self.reachable(id),
            last_ack_ms: self.last_ack(id).map(|d| d.as_millis() as u64),
        }
    }

    fn members(&self) -> MembersView {
        MembersView {
            membership_log_id: self.membership_tag(),
            committed: self.committed,
            joint: self.configs.len() > 1,
            leader_id: self.me,
            term: self.term,
            last_log_index: self.last_log_index,
            members: self.nodes.iter().map(|(id, n)| self.info(*id, n)).collect(),
        }
    }
}

/// `term-node-index` of a log id, or `none`.
pub fn fmt_log_id(l: Option<&LogId>) -> String {
    match l {
        Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
        None => "none".into(),
    }
}

fn membership_changed(current: &str, expected: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "membership_changed",
        format!("the membership is now {current}, not {expected}; read it again and decide anew"),
    )
    .with("membership_log_id", current)
}

/// One member as `GET /admin/members` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberInfo {
    /// Node id.
    pub id: u64,
    /// `voter` or `learner`.
    pub role: String,
    /// True for the leader (the node that answered).
    pub leader: bool,
    /// Peer address.
    pub raft_addr: String,
    /// Client API address.
    pub api_addr: String,
    /// Last log index the leader knows the member holds.
    pub matched_index: Option<u64>,
    /// Entries behind the leader's last log entry.
    pub lag: u64,
    /// Answered the leader within one election timeout.
    pub reachable: bool,
    /// Milliseconds since it last answered the leader.
    pub last_ack_ms: Option<u64>,
}

/// The body of `GET /admin/members`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MembersView {
    /// Log id of the current membership (`term-node-index`): the value for `If-Match`.
    pub membership_log_id: String,
    /// The current membership is committed.
    pub committed: bool,
    /// A change is half-way (joint consensus).
    pub joint: bool,
    /// The leader.
    pub leader_id: u64,
    /// The leader's term.
    pub term: u64,
    /// The leader's last log index.
    pub last_log_index: u64,
    /// Every member, voters and learners.
    pub members: Vec<MemberInfo>,
}

/// Maps a failed membership change to the API error.
fn change_error(e: RaftError<keel_storage::TypeConfig, ClientWriteError<keel_storage::TypeConfig>>) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ApiError::unavailable(
            "not_leader",
            format!(
                "leadership moved (to {:?}) before the change was proposed; retry",
                f.leader_id
            ),
        ),
        RaftError::APIError(ClientWriteError::PreconditionFailed(p)) => ApiError::new(
            StatusCode::CONFLICT,
            "membership_changed",
            format!("the membership changed while this call was decided; read it again: {p}"),
        ),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(p))) => {
            let mut e = ApiError::new(
                StatusCode::CONFLICT,
                "change_in_progress",
                format!("another membership change is not committed yet: {p}; retry shortly"),
            );
            e.retry_after = Some(1);
            e
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ApiError::new(StatusCode::CONFLICT, "invalid_change", c.to_string())
        }
        RaftError::APIError(e @ ClientWriteError::LogEntryDiscarded(_)) => ApiError::unavailable(
            "outcome_unknown",
            format!("the change may or may not have been applied; read the membership and retry: {e}"),
        ),
        RaftError::Fatal(f) => ApiError::internal(format!("raft stopped: {f}")),
    }
}

/// The answer to a membership call: whether it changed anything, the
/// member's role afterwards and the membership's log id (also the `ETag`).
fn answer(status: StatusCode, tag: &str, id: u64, changed: bool, role: Option<&str>) -> Response {
    let body = json!({
        "changed": changed,
        "id": id,
        "role": role,
        "membership_log_id": tag,
    });
    with_etag((status, Json(body)).into_response(), tag)
}

fn with_etag(mut r: Response, tag: &str) -> Response {
    if let Ok(v) = axum::http::HeaderValue::try_from(format!("\"{tag}\"")) {
        r.headers_mut().insert("etag", v);
    }
    r
}

/// The log id of this node's current membership, after a change (this node
/// may have stopped leading meanwhile: the change is done all the same).
fn current_tag(cluster: &Cluster) -> String {
    fmt_log_id(
        cluster
            .raft()
            .metrics()
            .borrow_watched()
            .membership_config
            .log_id()
            .as_ref(),
    )
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceParam {
    force: Option<bool>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

fn parse_force(q: Result<Query<ForceParam>, axum::extract::rejection::QueryRejection>) -> Result<bool, ApiError> {
    let Query(p) = q.map_err(|e| ApiError::bad_request("invalid_parameter", e.body_text()))?;
    Ok(p.force.unwrap_or(false))
}

async fn list(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Admin)?;
    let view = LeaderView::of(&s.cluster)?;
    Ok(with_etag(Json(view.members()).into_response(), &view.membership_tag()))
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    id: u64,
    raft_addr: String,
    api_addr: String,
}

fn check_addr(key: &str, addr: &str) -> Result<(), ApiError> {
    let ok = addr
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_address",
            format!("{key} = {addr:?}: expected host:port"),
        ))
    }
}

async fn add(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Admin)?;
    let b: AddBody = parse_json(&body)?;
    let _g = CHANGE_LOCK.lock().await;
    let view = LeaderView::of(&s.cluster)?;
    view.check_if_match(&headers)?;
    add_learner(&s.cluster, &view, &b).await
}

async fn add_learner(cluster: &Cluster, view: &LeaderView, b: &AddBody) -> Result<Response, ApiError> {
    if b.id == 0 {
        return Err(ApiError::bad_request("invalid_id", "node id 0 is not allowed"));
    }
    check_addr("raft_addr", &b.raft_addr)?;
    check_addr("api_addr", &b.api_addr)?;
    let node = KeelNode {
        raft_addr: b.raft_addr.clone(),
        api_addr: b.api_addr.clone(),
    };
    if let Some(existing) = view.nodes.get(&b.id) {
        if *existing == node {
            return Ok(answer(
                StatusCode::OK,
                &view.membership_tag(),
                b.id,
                false,
                Some(role(view, b.id)),
            ));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "member_exists",
            format!(
                "node {} is already a member at {existing}; remove it first to add it with other addresses",
                b.id
            ),
        )
        .with("raft_addr", existing.raft_addr.clone())
        .with("api_addr", existing.api_addr.clone()));
    }
    // A node added again after a removal starts from scratch.
    cluster.pool().reset_matched(b.id);
    cluster
        .raft()
        .change_membership_if(
            ChangeMembers::AddNodes(BTreeMap::from([(b.id, node)])),
            true,
            [view.precondition()],
        )
        .await
        .map_err(change_error)?;
    tracing::info!(id = b.id, raft = %b.raft_addr, api = %b.api_addr, "learner added");
    Ok(answer(
        StatusCode::CREATED,
        &current_tag(cluster),
        b.id,
        true,
        Some("learner"),
    ))
}

fn role(view: &LeaderView, id: u64) -> &'static str {
    if view.is_voter(id) { "voter" } else { "learner" }
}

async fn promote(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<u64>,
    q: Result<Query<ForceParam>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Admin)?;
    let force = parse_force(q)?;
    let _g = CHANGE_LOCK.lock().await;
    let view = LeaderView::of(&s.cluster)?;
    view.check_if_match(&headers)?;
    promote_learner(&s.cluster, &view, id, force).await
}

async fn promote_learner(cluster: &Cluster, view: &LeaderView, id: u64, force: bool) -> Result<Response, ApiError> {
    if !view.nodes.contains_key(&id) {
        return Err(ApiError::not_found(format!("node {id} is not a member; add it first")));
    }
    if view.is_voter(id) {
        return Ok(answer(StatusCode::OK, &view.membership_tag(), id, false, Some("voter")));
    }
    let lag = view.lag(id);
    if !view.reachable(id) || lag > MAX_LAG {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "learner_lagging",
            format!(
                "learner {id} is not caught up ({lag} entries behind, reachable: {}); it is promoted once it \
                 answers and is at most {MAX_LAG} entries behind",
                view.reachable(id)
            ),
        )
        .with("lag", lag)
        .with("reachable", view.reachable(id))
        .with("max_lag", MAX_LAG));
    }
    let mut new_voters = view.voters();
    new_voters.insert(id);
    view.quorum_check(&new_voters, force)?;
    cluster
        .raft()
        .change_membership_if(
            ChangeMembers::AddVoterIds(BTreeSet::from([id])),
            true,
            [view.precondition()],
        )
        .await
        .map_err(change_error)?;
    tracing::info!(id, force, "learner promoted to voter");
    Ok(answer(StatusCode::OK, &current_tag(cluster), id, true, Some("voter")))
}

async fn remove(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<u64>,
    q: Result<Query<ForceParam>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Admin)?;
    let force = parse_force(q)?;
    let _g = CHANGE_LOCK.lock().await;
    let view = LeaderView::of(&s.cluster)?;
    view.check_if_match(&headers)?;
    if !view.nodes.contains_key(&id) {
        return Ok(answer(StatusCode::OK, &view.membership_tag(), id, false, None));
    }
    let change = if view.is_voter(id) {
        let mut new_voters = view.voters();
        new_voters.remove(&id);
        if new_voters.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "last_voter",
                format!("node {id} is the only voter; a cluster needs at least one"),
            ));
        }
        view.quorum_check(&new_voters, force)?;
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    s.cluster
        .raft()
        .change_membership_if(change, false, [view.precondition()])
        .await
        .map_err(change_error)?;
    s.cluster.pool().reset_matched(id);
    tracing::info!(id, force, "member removed");
    // A removed leader hands over leadership on its own (openraft steps it
    // down once the change commits).
    Ok(answer(StatusCode::OK, &current_tag(&s.cluster), id, true, None))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    to: Option<u64>,
}

async fn transfer(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Admin)?;
    let b: TransferBody = parse_json(&body)?;
    let _g = CHANGE_LOCK.lock().await;
    let done = transfer_leadership(&s.cluster, b.to).await?;
    Ok(Json(done).into_response())
}

/// The outcome of a completed leader transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transferred {
    /// The new leader.
    pub leader_id: u64,
    /// The node that led before.
    pub previous_leader_id: u64,
    /// False when the target already led.
    pub changed: bool,
    /// How long the old leader refused writes, in milliseconds.
    pub elapsed_ms: u64,
}

/// Picks and checks the target, hands leadership to it and waits until it
/// leads. Refuses up front (409) what cannot succeed, because openraft
/// cannot abort a transfer: the old leader stops taking writes at once.
pub async fn transfer_leadership(cluster: &Cluster, to: Option<u64>) -> Result<Transferred, ApiError> {
    let view = LeaderView::of(cluster)?;
    let refuse = |code: &'static str, m: String| ApiError::new(StatusCode::CONFLICT, code, m);
    let target = match to {
        Some(t) if t == view.me => {
            return Ok(Transferred {
                leader_id: t,
                previous_leader_id: t,
                changed: false,
                elapsed_ms: 0,
            });
        }
        Some(t) => {
            if !view.nodes.contains_key(&t) {
                return Err(refuse("target_not_member", format!("node {t} is not a member")));
            }
            if !view.is_voter(t) {
                return Err(refuse(
                    "target_is_learner",
                    format!("node {t} is a learner; only a voter can lead (promote it first)"),
                ));
            }
            if !view.reachable(t) {
                return Err(refuse(
                    "target_unreachable",
                    format!(
                        "node {t} has not answered the leader for {} (limit {} ms); a transfer to it would leave \
                         the cluster without a leader until an election",
                        view.last_ack(t)
                            .map(|d| format!("{} ms", d.as_millis()))
                            .unwrap_or_else(|| "ever".into()),
                        view.window.as_millis()
                    ),
                )
                .with("last_ack_ms", view.last_ack(t).map(|d| d.as_millis() as u64)));
            }
            let lag = view.lag(t);
            if lag > MAX_LAG {
                return Err(refuse(
                    "target_lagging",
                    format!("node {t} is {lag} entries behind (limit {MAX_LAG}); wait until it caught up"),
                )
                .with("lag", lag));
            }
            t
        }
        None => view
            .voters()
            .into_iter()
            .filter(|id| *id != view.me && view.reachable(*id) && view.lag(*id) <= MAX_LAG)
            .min_by_key(|id| (view.lag(*id), *id))
            .ok_or_else(|| {
                refuse(
                    "no_transfer_target",
                    "no other voter is reachable and caught up; leadership stays here".into(),
                )
            })?,
    };
    // Other voters to hand leadership to if the target does not take over
    // (it died or froze after the checks): the old leader no longer takes
    // writes, so waiting for an election would stall the cluster for
    // seconds.
    let fallbacks: Vec<u64> = {
        let mut v: Vec<u64> = view
            .voters()
            .into_iter()
            .filter(|id| *id != view.me && *id != target && view.reachable(*id) && view.lag(*id) <= MAX_LAG)
            .collect();
        v.sort_by_key(|id| (view.lag(*id), *id));
        v
    };
    let raft = cluster.raft();
    let cfg = raft.config();
    let retrigger = Duration::from_millis(cfg.heartbeat_interval * 3);
    let fallback_after = Duration::from_millis((cfg.election_timeout_min / 2).max(cfg.heartbeat_interval * 5));
    let deadline_after = Duration::from_millis(cfg.election_timeout_max * 2 + 1000);
    let start = Instant::now();
    tracing::info!(target, lag = view.lag(target), "transferring leadership");
    let mut current = target;
    let mut next_fallback = fallbacks.into_iter();
    let mut since_switch = Instant::now();
    raft.trigger()
        .transfer_leader(current)
        .await
        .map_err(|e| ApiError::internal(format!("raft stopped: {e}")))?;
    let mut last_trigger = Instant::now();
    let mut rx = raft.metrics();
    loop {
        let (state, leader) = {
            let m = rx.borrow_watched();
            (m.state, m.current_leader)
        };
        if let Some(l) = leader
            && l != view.me
            && state != ServerState::Leader
        {
            let elapsed = start.elapsed().as_millis() as u64;
            if l == target || to.is_none() {
                tracing::info!(new_leader = l, elapsed_ms = elapsed, "leadership transferred");
                return Ok(Transferred {
                    leader_id: l,
                    previous_leader_id: view.me,
                    changed: true,
                    elapsed_ms: elapsed,
                });
            }
            return Err(ApiError::unavailable(
                "transfer_failed",
                format!("node {target} did not take over; node {l} leads instead (after {elapsed} ms)"),
            )
            .with("leader_id", l));
        }
        if start.elapsed() > deadline_after {
            return Err(ApiError::unavailable(
                "transfer_timeout",
                format!(
                    "no node took over within {} ms; the cluster elects a leader on its own",
                    deadline_after.as_millis()
                ),
            ));
        }
        if state == ServerState::Leader {
            if since_switch.elapsed() >= fallback_after
                && let Some(f) = next_fallback.next()
            {
                tracing::warn!(
                    target = current,
                    fallback = f,
                    "the transfer target did not take over; handing leadership to another voter"
                );
                current = f;
                since_switch = Instant::now();
                let _ = raft.trigger().transfer_leader(current).await;
                last_trigger = Instant::now();
            } else if last_trigger.elapsed() >= retrigger {
                // The target ignores the request if some of our entries had
                // not reached it yet; asking again sends the final last log id.
                let _ = raft.trigger().transfer_leader(current).await;
                last_trigger = Instant::now();
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
    }
}

/// Before a leader stops: hands leadership to the most caught-up reachable
/// voter, so the cluster does not wait an election timeout for a new one.
/// Does nothing on a follower or when no voter qualifies.
pub async fn hand_off(cluster: &Cluster) {
    if !cluster.raft().is_leader() {
        return;
    }
    let Ok(_g) = tokio::time::timeout(Duration::from_secs(5), CHANGE_LOCK.lock()).await else {
        tracing::warn!("a membership change is still running; stopping without handing off leadership");
        return;
    };
    match transfer_leadership(cluster, None).await {
        Ok(t) => tracing::info!(
            new_leader = t.leader_id,
            elapsed_ms = t.elapsed_ms,
            "leadership handed off before stopping"
        ),
        Err(e) => tracing::warn!(code = e.code, reason = %e.message, "stopping without handing off leadership"),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    id: u64,
    raft_addr: String,
    api_addr: String,
    #[serde(default)]
    promote: bool,
}

/// `POST /cluster/join`: a node asks to be added (as a learner) and, with
/// `promote`, to become a voter once caught up. An admin certificate may
/// call it for any id; a node certificate only for its own id: the
/// operator's signature on a node certificate is the permission to join.
async fn join(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: JoinBody = parse_json(&body)?;
    if !s.insecure {
        match &conn.identity {
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "a node or admin certificate signed by the cluster CA is required",
                ));
            }
            Some(Identity::Admin(_)) => {}
            Some(Identity::Node(n)) if *n == b.id => {}
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("{other} may not join the cluster as node {}", b.id),
                ));
            }
        }
    }
    let _g = CHANGE_LOCK.lock().await;
    let view = LeaderView::of(&s.cluster)?;
    let add = AddBody {
        id: b.id,
        raft_addr: b.raft_addr.clone(),
        api_addr: b.api_addr.clone(),
    };
    match view.nodes.get(&b.id) {
        Some(_) if !view.is_voter(b.id) && b.promote => promote_learner(&s.cluster, &view, b.id, false).await,
        _ => add_learner(&s.cluster, &view, &add).await,
    }
}

// ---------------------------------------------------------------------------
// Joining, from the new node's side
// ---------------------------------------------------------------------------

/// How a starting node joins a running cluster (`keel serve --join`).
pub struct JoinPlan {
    /// API URL of any member.
    pub url: String,
    /// This node.
    pub id: u64,
    /// Advertised peer address.
    pub raft_addr: String,
    /// Advertised API address.
    pub api_addr: String,
    /// Become a voter once caught up.
    pub auto_promote: bool,
    /// The node's own TLS material (its node certificate authenticates the call).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Asks the cluster to add this node, then (with `auto_promote`) to promote
/// it, until it is a member in the wanted role. Every call is idempotent, so
/// a restarted node simply confirms its membership. Runs until done or the
/// node stops.
pub async fn join_loop(plan: JoinPlan, cluster: Cluster) {
    let http = match &plan.tls {
        Some(tls) => reqwest::Client::builder().use_preconfigured_tls((**tls).clone()),
        None => reqwest::Client::builder(),
    }
    .timeout(RELAY_TIMEOUT + Duration::from_secs(5))
    .build();
    let http = match http {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client to join the cluster");
            return;
        }
    };
    let url = format!("{}/cluster/join", plan.url.trim_end_matches('/'));
    let body = JoinBody {
        id: plan.id,
        raft_addr: plan.raft_addr.clone(),
        api_addr: plan.api_addr.clone(),
        promote: plan.auto_promote,
    };
    let mut wait = Duration::from_millis(200);
    let mut last_note = String::new();
    loop {
        if cluster.is_stopping() {
            return;
        }
        let note = match http.post(&url).json(&body).send().await {
            Ok(r) => {
                let status = r.status();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                if status.is_success() {
                    let role = v["role"].as_str().unwrap_or("?").to_string();
                    if role == "voter" || !plan.auto_promote {
                        tracing::info!(role = %role, via = %plan.url, "joined the cluster");
                        return;
                    }
                    format!("member as {role}, waiting to be promoted")
                } else if v["error"]["code"] == "learner_lagging" {
                    wait = Duration::from_millis(200);
                    format!("catching up ({} entries behind) before promotion", v["error"]["lag"])
                } else {
                    format!("join refused: {status}: {v}")
                }
            }
            Err(e) => format!("cannot reach {url}: {e}"),
        };
        if note != last_note && !note.starts_with("catching up") {
            tracing::info!("{note}");
        }
        last_note = note;
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_display() {
        for id in [
            Identity::Node(7),
            Identity::Admin("ops".into()),
            Identity::Client("gw-1".into()),
        ] {
            assert_eq!(parse_identity(&id.to_string()), Some(id));
        }
        assert_eq!(parse_identity("node/x"), None);
        assert_eq!(parse_identity("root/1"), None);
    }

    fn view(voters: &[u64], learners: &[u64], acked: &[(u64, u64)], last: u64, matched: &[(u64, u64)]) -> LeaderView {
        let nodes = voters
            .iter()
            .chain(learners)
            .map(|id| (*id, KeelNode::default()))
            .collect();
        LeaderView {
            me: voters[0],
            term: 3,
            last_log_index: last,
            log_id: None,
            committed: true,
            configs: vec![voters.iter().copied().collect()],
            nodes,
            matched: matched.iter().map(|(id, m)| (*id, Some(*m))).collect(),
            ack_age: acked
                .iter()
                .map(|(id, ms)| (*id, Some(Duration::from_millis(*ms))))
                .collect(),
            window: Duration::from_millis(1000),
        }
    }

    #[test]
    fn quorum_check_counts_reachable_members_of_old_and_new_configs() {
        // Voters 1 (leader), 2, 3; node 3 silent for 5 s.
        let v = view(&[1, 2, 3], &[], &[(2, 50), (3, 5000)], 100, &[(2, 100), (3, 40)]);
        // Removing 2 leaves {1, 3} with only 1 reachable: refused.
        let e = v.quorum_check(&BTreeSet::from([1, 3]), false).unwrap_err();
        assert_eq!(e.code, "quorum_at_risk");
        assert!(v.quorum_check(&BTreeSet::from([1, 3]), true).is_ok());
        // Removing the silent node 3 is fine.
        assert!(v.quorum_check(&BTreeSet::from([1, 2]), false).is_ok());
        assert_eq!(v.lag(3), 60);
        assert_eq!(v.lag(1), 0);
        assert!(!v.reachable(3) && v.reachable(2) && v.reachable(1));
    }

    #[test]
    fn if_match_compares_the_membership_log_id() {
        let mut v = view(&[1], &[], &[], 10, &[]);
        v.log_id = Some(LogId::new(
            openraft::impls::leader_id_adv::LeaderId { term: 2, node_id: 1 },
            7,
        ));
        assert_eq!(v.membership_tag(), "2-1-7");
        let mut h = HeaderMap::new();
        assert!(v.check_if_match(&h).is_ok());
        h.insert("if-match", "\"2-1-7\"".parse().unwrap());
        assert!(v.check_if_match(&h).is_ok());
        h.insert("if-match", "2-1-6".parse().unwrap());
        assert_eq!(v.check_if_match(&h).unwrap_err().code, "membership_changed");
    }
}

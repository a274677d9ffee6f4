//! Operations views: `GET /metrics`, `GET /ha/health`, `GET /ha/status`
//! and `POST /ha/shutdown`, merged into the API router by [`routes`].
//!
//! `/metrics`, `/ha/health` and `/ha/status` need a client certificate of
//! the cluster CA like every other route (give Prometheus one: see
//! `docs/metrics.md`); only `/livez` and `/readyz` are open. `/ha/shutdown`
//! needs an admin certificate, or this node's own node certificate, so a
//! Kubernetes `preStop` hook inside the pod can call it.

use axum::Extension;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use axum::routing::post;
use keel_raft::serve::ConnInfo;
use keel_raft::tls::Identity;
use openraft::Instant as _;
use openraft::ServerState;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use serde::Deserialize;
use serde::Serialize;
use serde_json::json;

use crate::api::Access;
use crate::api::ApiState;
use crate::api::authorize;
use crate::cluster::role_name;
use crate::error::ApiError;
use crate::observe;

/// The routes of this module.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ha/health", get(health))
        .route("/ha/status", get(status))
        .route("/ha/shutdown", post(shutdown))
        .route("/ha/workers", get(workers))
        .route("/ha/policies", get(policies))
}

/// OpenMetrics when the scraper asks for it (Prometheus does), otherwise
/// the classic text format (curl, `promtool check metrics`).
async fn metrics(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = crate::metrics::get().encode_for(accept);
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// Health of a member as `/ha/status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum NodeStatus {
    /// Not heard from yet by this node (or unknown: see the module docs).
    Init,
    /// Recently heard from.
    Alive,
    /// Silent for longer than an election timeout.
    Suspected,
    /// Silent for longer than twice the longest election timeout.
    Down,
    /// Shutting down, or being removed from the membership.
    Leaving,
}

/// One member in `/ha/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: u64,
    /// `node-<id>`.
    pub name: String,
    /// `voter` or `learner`.
    pub role: String,
    /// Client API address.
    pub api_addr: String,
    /// Peer address.
    pub raft_addr: String,
    /// INIT, ALIVE, SUSPECTED, DOWN or LEAVING.
    pub status: NodeStatus,
    /// Milliseconds since this node last heard from it, where known.
    pub last_contact_ms: Option<u64>,
}

/// The body of `GET /ha/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaStatus {
    /// `node-<id>` of the answering node.
    pub node_name: String,
    /// Its id.
    pub node_id: u64,
    /// The cluster name.
    pub cluster_name: String,
    /// Its Raft role.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader_id: Option<u64>,
    /// Whether peer statuses come from the leader's heartbeat
    /// acknowledgements (`leader`) or from a follower, which knows only
    /// itself and its contact with the leader (`follower`; other members
    /// are INIT: ask the leader).
    pub view: String,
    /// Members, voters and learners.
    pub node_count: usize,
    /// Every member.
    pub nodes: Vec<NodeView>,
    /// Applied index of the answering node.
    pub applied_index: u64,
    /// Objects in the applied state by kind (`kv`, `workers`, ...).
    pub store: std::collections::BTreeMap<String, u64>,
}

fn classify(age: Option<std::time::Duration>, suspect: std::time::Duration, down: std::time::Duration) -> NodeStatus {
    match age {
        None => NodeStatus::Init,
        Some(a) if a <= suspect => NodeStatus::Alive,
        Some(a) if a <= down => NodeStatus::Suspected,
        Some(_) => NodeStatus::Down,
    }
}

async fn status(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let cluster = &s.cluster;
    let raft = cluster.raft();
    let me = cluster.node_id();
    let m = raft.metrics().borrow_watched().clone();
    let contact = observe::leader_contact_age(cluster, &m).await;
    let suspect = observe::suspect_threshold(raft);
    let down = observe::contact_threshold(raft);
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let joint = membership.get_joint_config();
    let leaving = |id: u64| joint.len() > 1 && !joint.last().is_some_and(|c| c.contains(&id)) && voters.contains(&id);
    let is_leader = m.state == ServerState::Leader;
    let nodes = membership
        .nodes()
        .map(|(id, n)| {
            let id = *id;
            let age = if id == me {
                Some(std::time::Duration::ZERO)
            } else if is_leader {
                m.heartbeat
                    .as_ref()
                    .and_then(|h| h.get(&id).cloned().flatten())
                    .map(|t| t.elapsed())
            } else if m.current_leader == Some(id) {
                contact
            } else {
                None
            };
            let status = if (id == me && cluster.is_stopping()) || leaving(id) {
                NodeStatus::Leaving
            } else {
                classify(age, suspect, down)
            };
            NodeView {
                id,
                name: format!("node-{id}"),
                role: if voters.contains(&id) { "voter" } else { "learner" }.into(),
                api_addr: n.api_addr.clone(),
                raft_addr: n.raft_addr.clone(),
                status,
                last_contact_ms: age.map(|a| a.as_millis() as u64),
            }
        })
        .collect::<Vec<_>>();
    let reader = cluster.reader().clone();
    let store = tokio::task::spawn_blocking(move || reader.counts())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(HaStatus {
        node_name: format!("node-{me}"),
        node_id: me,
        cluster_name: raft.config().cluster_name.clone(),
        role: role_name(m.state).into(),
        term: m.current_term,
        leader_id: m.current_leader,
        view: if is_leader { "leader" } else { "follower" }.into(),
        node_count: nodes.len(),
        nodes,
        applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
        store,
    })
    .into_response())
}

async fn health(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let cluster = &s.cluster;
    let m = cluster.raft().metrics().borrow_watched().clone();
    let r = observe::readiness_of(cluster, &m).await;
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let quorum = voters.len() / 2 + 1;
    // Only the leader knows who answers: voters that acknowledged it recently.
    let alive = (m.state == ServerState::Leader).then(|| {
        let down = observe::contact_threshold(cluster.raft());
        voters
            .iter()
            .filter(|id| {
                **id == cluster.node_id()
                    || m.heartbeat
                        .as_ref()
                        .and_then(|h| h.get(*id).cloned().flatten())
                        .is_some_and(|t| t.elapsed() <= down)
            })
            .count()
    });
    let healthy = r.not_ready.is_none();
    let body = json!({
        "healthy": healthy,
        "node_id": cluster.node_id(),
        "role": role_name(m.state),
        "leader_id": m.current_leader,
        "reason": r.not_ready,
        "leader_contact_ms": r.contact_age.map(|a| a.as_millis() as u64),
        "voters": voters.len(),
        "quorum": quorum,
        "voters_alive": alive,
        "failure_tolerance": alive.map(|a| a as i64 - quorum as i64),
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((code, Json(body)).into_response())
}

async fn shutdown(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    let own_node_cert = matches!(conn.identity, Some(Identity::Node(id)) if id == s.cluster.node_id());
    if !own_node_cert {
        authorize(&s, &conn, Access::Admin)?;
    }
    tracing::info!(caller = ?conn.identity.as_ref().map(|i| i.to_string()), "shutdown requested over the API");
    s.cluster.begin_shutdown();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"shutting_down": true, "node_id": s.cluster.node_id()})),
    )
        .into_response())
}

/// A local (stale) list of one namespace, for gateways' HA views.
fn local_list(s: &ApiState, prefix: &str) -> Result<Response, ApiError> {
    let reader = s.cluster.reader();
    let revision = reader.applied_index();
    let items: Vec<serde_json::Value> = reader
        .list(prefix, 100_000)?
        .into_iter()
        .map(|(k, o)| {
            let value: serde_json::Value = serde_json::from_slice(&o.value).unwrap_or(serde_json::Value::Null);
            json!({"id": &k[prefix.len()..], "value": value, "revision": o.revision})
        })
        .collect();
    Ok(Json(json!({"items": items, "revision": revision, "node_id": s.cluster.node_id()})).into_response())
}

/// `GET /ha/workers`: this node's view of the worker registry.
async fn workers(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    local_list(&s, keel_storage::model::control::WORKERS)
}

/// `GET /ha/policies`: this node's view of the routing policies.
async fn policies(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    local_list(&s, keel_storage::model::control::POLICIES)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn contact_ages_map_to_statuses() {
        let s = Duration::from_secs(1);
        let d = Duration::from_secs(4);
        assert_eq!(classify(None, s, d), NodeStatus::Init);
        assert_eq!(classify(Some(Duration::from_millis(100)), s, d), NodeStatus::Alive);
        assert_eq!(classify(Some(Duration::from_secs(2)), s, d), NodeStatus::Suspected);
        assert_eq!(classify(Some(Duration::from_secs(9)), s, d), NodeStatus::Down);
        assert_eq!(serde_json::to_value(NodeStatus::Suspected).unwrap(), json!("SUSPECTED"));
    }
}

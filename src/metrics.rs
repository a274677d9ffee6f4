//! Every metric keel exports, and the only place their names are written.
//!
//! One process-wide registry ([`get`]) holds them; `GET /metrics` encodes it
//! in the OpenMetrics text format, which Prometheus scrapes natively. Raft
//! gauges are filled by the sampler in `observe.rs` from openraft's metrics
//! channel; the storage and network crates report through the hook traits
//! implemented here ([`StorageMetrics`], [`NetMetrics`]); HTTP requests are
//! counted by the [`track_http`] middleware. `docs/metrics.md` lists every
//! name (a unit test keeps the two in step).

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use std::time::Instant;

use axum::extract::MatchedPath;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use keel_raft::hooks::NetHooks;
use keel_storage::NodeId;
use keel_storage::StorageHooks;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the OpenMetrics exposition (what Prometheus asks for).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The `Content-Type` of the classic Prometheus text format (everyone else:
/// curl, `promtool check metrics`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A gauge holding seconds (or any fraction).
pub type FGauge = Gauge<f64, AtomicU64>;
type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Label: a Raft role.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    /// leader, follower, candidate, learner or shutdown.
    pub role: &'static str,
}

/// Label: a peer node id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The peer's node id.
    pub peer: String,
}

/// Labels of a peer RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// append, vote, pre-vote, transfer-leader, snapshot, forward-writes (batched
    /// writes from a follower), forward-write, read-index.
    pub rpc: &'static str,
    /// The peer's node id.
    pub peer: String,
}

/// Label: why a proposal failed (the API error code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// e.g. no_leader, outcome_unknown.
    pub reason: &'static str,
}

/// Labels of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route pattern (e.g. `/v1/kv/{*key}`), or `unmatched`.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Status code.
    pub status: u16,
}

/// Labels of an HTTP latency observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route pattern, or `unmatched`.
    pub route: String,
    /// HTTP method.
    pub method: String,
}

/// Label: a namespace of the replicated state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// kv, workers, policies, ratelimits, ...
    pub kind: String,
}

/// Labels of the node information gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    /// This node's id.
    pub node_id: String,
    /// The cluster name.
    pub cluster: String,
    /// keel's version.
    pub version: &'static str,
}

/// Namespaces always exported by `keel_state_objects`, even when empty.
pub const STATE_KINDS: &[&str] = &["kv", "workers", "policies", "ratelimits"];

/// Every role `raft_role` reports (one series each, 1 for the current one).
pub const ROLES: &[&str] = &["leader", "follower", "candidate", "learner", "shutdown"];

/// Every metric of one process.
pub struct Metrics {
    registry: Registry,
    /// Registered names (counters without `_total`).
    names: Vec<&'static str>,
    /// `raft_role{role}`: 1 for the current role, 0 for the others.
    pub raft_role: Family<RoleLabel, Gauge>,
    /// `raft_term`.
    pub raft_term: Gauge,
    /// `raft_leader_id` (0: none known).
    pub raft_leader_id: Gauge,
    /// `raft_has_leader`.
    pub raft_has_leader: Gauge,
    /// `raft_leader_changes_total`.
    pub raft_leader_changes: Counter,
    /// `raft_last_log_index`.
    pub raft_last_log_index: Gauge,
    /// `raft_commit_index`.
    pub raft_commit_index: Gauge,
    /// `raft_last_applied_index`.
    pub raft_last_applied_index: Gauge,
    /// `raft_snapshot_index`.
    pub raft_snapshot_index: Gauge,
    /// `raft_voters`.
    pub raft_voters: Gauge,
    /// `raft_learners`.
    pub raft_learners: Gauge,
    /// `raft_leader_contact_age_seconds`.
    pub raft_leader_contact_age: FGauge,
    /// `raft_replication_lag_entries{peer}` (leader only).
    pub raft_replication_lag_entries: Family<PeerLabel, Gauge>,
    /// `raft_replication_lag_seconds{peer}` (leader only).
    pub raft_replication_lag_seconds: Family<PeerLabel, FGauge>,
    /// `raft_peer_last_ack_age_seconds{peer}` (leader only).
    pub raft_peer_last_ack_age: Family<PeerLabel, FGauge>,
    /// `raft_proposals_committed_total`.
    pub raft_proposals_committed: Counter,
    /// `raft_proposals_failed_total{reason}`.
    pub raft_proposals_failed: Family<ReasonLabel, Counter>,
    /// `raft_append_batch_size`.
    pub raft_append_batch_size: Histogram,
    /// `raft_rpc_duration_seconds{rpc,peer}`.
    pub raft_rpc_duration: HistFamily<RpcLabels>,
    /// `raft_rpc_failures_total{rpc,peer}`.
    pub raft_rpc_failures: Family<RpcLabels, Counter>,
    /// `raft_snapshot_sent_bytes_total`.
    pub raft_snapshot_sent_bytes: Counter,
    /// `raft_snapshot_received_bytes_total`.
    pub raft_snapshot_received_bytes: Counter,
    /// `raft_snapshot_build_duration_seconds`.
    pub raft_snapshot_build_duration: Histogram,
    /// `raft_snapshot_build_failures_total`.
    pub raft_snapshot_build_failures: Counter,
    /// `raft_snapshot_size_bytes`.
    pub raft_snapshot_size_bytes: Gauge,
    /// `raft_snapshot_install_duration_seconds`.
    pub raft_snapshot_install_duration: Histogram,
    /// `raft_snapshot_install_failures_total`.
    pub raft_snapshot_install_failures: Counter,
    /// `keel_storage_fsync_duration_seconds`.
    pub storage_fsync_duration: Histogram,
    /// `keel_storage_apply_duration_seconds`.
    pub storage_apply_duration: Histogram,
    /// `keel_storage_apply_batch_entries`.
    pub storage_apply_batch_entries: Histogram,
    /// `keel_http_requests_total{route,method,status}`.
    pub http_requests: Family<HttpLabels, Counter>,
    /// `keel_http_request_duration_seconds{route,method}`.
    pub http_request_duration: HistFamily<RouteLabels>,
    /// `keel_watchers`.
    pub watchers: Gauge,
    /// `keel_state_objects{kind}`.
    pub state_objects: Family<KindLabel, Gauge>,
    /// `keel_ready`.
    pub ready: Gauge,
    /// `keel_node_info{node_id,cluster,version}`.
    pub node_info: Family<InfoLabels, Gauge>,
}

fn latency_buckets() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

fn rpc_buckets() -> Histogram {
    // 250 µs .. ~16 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 17))
}

fn slow_buckets() -> Histogram {
    // 10 ms .. ~164 s (snapshot build and install)
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

fn size_buckets() -> Histogram {
    // 1 .. 4096
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let mut names = Vec::new();
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                names.push($name);
                m
            }};
        }
        // Counters are registered without `_total`; the encoder appends it.
        Metrics {
            raft_role: reg!(
                "raft_role",
                "1 for this node's current Raft role, 0 for the others",
                Family::default()
            ),
            raft_term: reg!("raft_term", "Current Raft term", Gauge::default()),
            raft_leader_id: reg!(
                "raft_leader_id",
                "Node id of the leader this node knows of (0: none)",
                Gauge::default()
            ),
            raft_has_leader: reg!(
                "raft_has_leader",
                "1 if this node knows a leader and heard from it (or, as leader, from a quorum) recently",
                Gauge::default()
            ),
            raft_leader_changes: reg!(
                "raft_leader_changes",
                "Leader changes seen by this node",
                Counter::default()
            ),
            raft_last_log_index: reg!(
                "raft_last_log_index",
                "Index of the last entry in this node's log",
                Gauge::default()
            ),
            raft_commit_index: reg!(
                "raft_commit_index",
                "Index of the last entry this node knows to be committed",
                Gauge::default()
            ),
            raft_last_applied_index: reg!(
                "raft_last_applied_index",
                "Index of the last entry applied to this node's state machine",
                Gauge::default()
            ),
            raft_snapshot_index: reg!(
                "raft_snapshot_index",
                "Last log index covered by this node's latest snapshot",
                Gauge::default()
            ),
            raft_voters: reg!(
                "raft_voters",
                "Voters in the membership this node uses",
                Gauge::default()
            ),
            raft_learners: reg!(
                "raft_learners",
                "Learners in the membership this node uses",
                Gauge::default()
            ),
            raft_leader_contact_age: reg!(
                "raft_leader_contact_age_seconds",
                "Leader: seconds since a quorum last acknowledged it; follower: seconds since it last accepted an append or heartbeat from the leader",
                FGauge::default()
            ),
            raft_replication_lag_entries: reg!(
                "raft_replication_lag_entries",
                "Leader only: log entries a peer has not yet acknowledged",
                Family::default()
            ),
            raft_replication_lag_seconds: reg!(
                "raft_replication_lag_seconds",
                "Leader only: age of the oldest log entry a peer has not yet acknowledged (0 when caught up)",
                Family::default()
            ),
            raft_peer_last_ack_age: reg!(
                "raft_peer_last_ack_age_seconds",
                "Leader only: seconds since a peer last acknowledged an append or heartbeat",
                Family::default()
            ),
            raft_proposals_committed: reg!(
                "raft_proposals_committed",
                "Writes proposed through this node that were committed and applied",
                Counter::default()
            ),
            raft_proposals_failed: reg!(
                "raft_proposals_failed",
                "Writes proposed through this node that failed, by error code",
                Family::default()
            ),
            raft_append_batch_size: reg!(
                "raft_append_batch_size",
                "Append calls covered by one group-commit fsync of the log",
                size_buckets()
            ),
            raft_rpc_duration: reg!(
                "raft_rpc_duration_seconds",
                "Latency of request-response peer RPCs sent by this node, by RPC and peer",
                HistFamily::new_with_constructor(rpc_buckets as fn() -> Histogram)
            ),
            raft_rpc_failures: reg!(
                "raft_rpc_failures",
                "Peer RPCs sent by this node that failed, by RPC and peer",
                Family::default()
            ),
            raft_snapshot_sent_bytes: reg!(
                "raft_snapshot_sent_bytes",
                "Snapshot bytes streamed to peers",
                Counter::default()
            ),
            raft_snapshot_received_bytes: reg!(
                "raft_snapshot_received_bytes",
                "Snapshot bytes received from the leader",
                Counter::default()
            ),
            raft_snapshot_build_duration: reg!(
                "raft_snapshot_build_duration_seconds",
                "Time to build a snapshot",
                slow_buckets()
            ),
            raft_snapshot_build_failures: reg!(
                "raft_snapshot_build_failures",
                "Snapshot builds that failed",
                Counter::default()
            ),
            raft_snapshot_size_bytes: reg!(
                "raft_snapshot_size_bytes",
                "Size of the last snapshot built",
                Gauge::default()
            ),
            raft_snapshot_install_duration: reg!(
                "raft_snapshot_install_duration_seconds",
                "Time to install a snapshot received from the leader",
                slow_buckets()
            ),
            raft_snapshot_install_failures: reg!(
                "raft_snapshot_install_failures",
                "Snapshot installs that failed or were refused",
                Counter::default()
            ),
            storage_fsync_duration: reg!(
                "keel_storage_fsync_duration_seconds",
                "Duration of one fsync of the Raft log (synced write or WAL flush)",
                latency_buckets()
            ),
            storage_apply_duration: reg!(
                "keel_storage_apply_duration_seconds",
                "Time to apply one batch of committed entries to the state machine",
                latency_buckets()
            ),
            storage_apply_batch_entries: reg!(
                "keel_storage_apply_batch_entries",
                "Entries applied in one state machine batch",
                size_buckets()
            ),
            http_requests: reg!(
                "keel_http_requests",
                "API requests answered, by route pattern, method and status",
                Family::default()
            ),
            http_request_duration: reg!(
                "keel_http_request_duration_seconds",
                "API request latency until the response head, by route pattern and method",
                HistFamily::new_with_constructor(latency_buckets as fn() -> Histogram)
            ),
            watchers: reg!("keel_watchers", "Open watch streams on this node", Gauge::default()),
            state_objects: reg!(
                "keel_state_objects",
                "Objects in the applied state, by kind (key namespace)",
                Family::default()
            ),
            ready: reg!(
                "keel_ready",
                "1 when /readyz reports ready, as last sampled",
                Gauge::default()
            ),
            node_info: reg!(
                "keel_node_info",
                "Constant 1, labelled with this node's id, cluster name and version",
                Family::default()
            ),
            registry: r,
            names,
        }
    }

    /// Every registered metric name (counters without their `_total`).
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The same metrics in the classic Prometheus text format (0.0.4):
    /// a counter family is named like its samples (`x_total`), and there is
    /// no `# EOF` or `# UNIT` line.
    pub fn encode_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    /// The exposition and its content type for a request's `Accept` header.
    pub fn encode_for(&self, accept: Option<&str>) -> (&'static str, String) {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (OPENMETRICS_CONTENT_TYPE, self.encode())
        } else {
            (TEXT_CONTENT_TYPE, self.encode_text())
        }
    }

    /// Records the outcome of one write proposed through this node.
    pub fn proposal<T>(&self, res: &Result<T, crate::error::ApiError>) {
        match res {
            Ok(_) => {
                self.raft_proposals_committed.inc();
            }
            Err(e) => {
                self.raft_proposals_failed
                    .get_or_create(&ReasonLabel { reason: e.code })
                    .inc();
            }
        }
    }
}

/// Rewrites an OpenMetrics exposition (as prometheus-client writes it) in
/// the Prometheus text format.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        match meta {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

static NODE_ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Records this process's node id for log lines written outside its tasks.
pub fn set_node_id(id: u64) {
    let _ = NODE_ID.set(id);
}

/// Node id, term and leader (0: none) for a log line, from the gauges.
fn raft_context() -> (u64, i64, i64) {
    let m = get();
    (
        NODE_ID.get().copied().unwrap_or(0),
        m.raft_term.get(),
        m.raft_leader_id.get(),
    )
}

/// The storage hooks: fsync, group commit, apply and snapshot timings.
pub struct StorageMetrics;

impl StorageHooks for StorageMetrics {
    fn fsync(&self, elapsed: Duration) {
        get().storage_fsync_duration.observe(elapsed.as_secs_f64());
    }

    fn append_batch(&self, appends: usize) {
        get().raft_append_batch_size.observe(appends as f64);
    }

    fn apply(&self, entries: usize, elapsed: Duration) {
        let m = get();
        m.storage_apply_duration.observe(elapsed.as_secs_f64());
        m.storage_apply_batch_entries.observe(entries as f64);
    }

    // Successes are logged by the storage itself; failures get the node's
    // Raft context here.
    fn snapshot_built(&self, ok: bool, elapsed: Duration, bytes: u64) {
        let m = get();
        if ok {
            m.raft_snapshot_build_duration.observe(elapsed.as_secs_f64());
            m.raft_snapshot_size_bytes.set(bytes as i64);
        } else {
            m.raft_snapshot_build_failures.inc();
            let (node_id, term, leader) = raft_context();
            tracing::warn!(
                node_id,
                term,
                leader,
                elapsed_ms = elapsed.as_millis() as u64,
                "snapshot build failed"
            );
        }
    }

    fn snapshot_installed(&self, ok: bool, elapsed: Duration) {
        let m = get();
        if ok {
            m.raft_snapshot_install_duration.observe(elapsed.as_secs_f64());
        } else {
            m.raft_snapshot_install_failures.inc();
            let (node_id, term, leader) = raft_context();
            tracing::warn!(
                node_id,
                term,
                leader,
                elapsed_ms = elapsed.as_millis() as u64,
                "snapshot install failed"
            );
        }
    }
}

/// The peer network hooks: RPC latency and snapshot bytes.
pub struct NetMetrics;

/// The `rpc` label of a peer route: its last path segment.
pub fn rpc_name(path: &'static str) -> &'static str {
    path.rsplit('/').next().unwrap_or(path)
}

impl NetHooks for NetMetrics {
    fn rpc(&self, path: &'static str, peer: NodeId, elapsed: Duration, ok: bool) {
        let m = get();
        let labels = RpcLabels {
            rpc: rpc_name(path),
            peer: peer.to_string(),
        };
        m.raft_rpc_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if !ok {
            m.raft_rpc_failures.get_or_create(&labels).inc();
        }
        if labels.rpc == "snapshot" {
            let (node_id, term, leader) = raft_context();
            tracing::info!(
                node_id,
                term,
                leader,
                peer,
                ok,
                elapsed_ms = elapsed.as_millis() as u64,
                "snapshot transfer to peer finished"
            );
        }
    }

    fn snapshot_bytes(&self, sent: bool, bytes: u64) {
        let m = get();
        if sent {
            m.raft_snapshot_sent_bytes.inc_by(bytes);
        } else {
            m.raft_snapshot_received_bytes.inc_by(bytes);
        }
    }
}

/// Middleware counting API requests by route pattern (never the raw path:
/// keys must not become label values) and timing them.
pub async fn track_http(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = get();
    m.http_request_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
            method: method.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&HttpLabels {
            route,
            method,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_in_the_docs_table() {
        let doc = std::fs::read_to_string(crate::source_file("docs/metrics.md")).unwrap();
        let names = get().names();
        assert!(names.len() >= 30, "{names:?}");
        // Counters are listed as Prometheus sees them, with `_total`.
        let text = get().encode();
        for n in names {
            let counter = text.contains(&format!("# TYPE {n} counter"));
            let shown = if counter {
                format!("`{n}_total`")
            } else {
                format!("`{n}`")
            };
            let prefix = format!("`{n}");
            assert!(
                doc.contains(&shown) || (!text.contains(&format!("# TYPE {n} ")) && doc.contains(&prefix)),
                "docs/metrics.md does not list {shown}"
            );
        }
    }

    #[test]
    fn exposition_is_openmetrics_with_help_and_eof() {
        let m = get();
        m.raft_proposals_committed.inc();
        m.raft_rpc_duration
            .get_or_create(&RpcLabels {
                rpc: "vote",
                peer: "2".into(),
            })
            .observe(0.003);
        let text = m.encode();
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# HELP raft_term "));
        assert!(text.contains("raft_proposals_committed_total "));
        assert!(text.contains("raft_rpc_duration_seconds_bucket{"));
        let classic = m.encode_text();
        assert!(classic.contains("# TYPE raft_proposals_committed_total counter\n"));
        assert!(classic.contains("# HELP raft_proposals_committed_total Writes"));
        assert!(!classic.contains("# EOF"));
        assert_eq!(
            m.encode_for(Some("application/openmetrics-text;version=1.0.0")).0,
            OPENMETRICS_CONTENT_TYPE
        );
        assert_eq!(m.encode_for(Some("*/*")).0, TEXT_CONTENT_TYPE);
        assert_eq!(rpc_name("/raft/pre-vote"), "pre-vote");
        assert_eq!(rpc_name("/keel/forward-write"), "forward-write");
    }
}

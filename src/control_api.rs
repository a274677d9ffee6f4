//! The control-plane resources of the public API: workers, policies,
//! session affinity, rate limits, counters and transactions. Watches are in
//! `watch.rs`.
//!
//! Handlers validate input into typed commands (unknown fields and bad
//! parameters are a 400 naming the problem), propose them through
//! [`crate::cluster::Cluster`], and render the state machine's answer.

use std::collections::BTreeMap;

use axum::Extension;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::Query;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use axum::routing::post;
use keel_raft::serve::ConnInfo;
use keel_storage::model::Command;
use keel_storage::model::Expect;
use keel_storage::model::Object;
use keel_storage::model::Txn;
use keel_storage::model::control;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::json;

use crate::api::Access;
use crate::api::ApiState;
use crate::api::authorize;
use crate::api::consistent;
use crate::api::idempotency_key;
use crate::api::precondition;
use crate::api::with_revision;
use crate::api::write_response;
use crate::error::ApiError;

/// The routes of this module.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/workers", get(list_workers))
        .route(
            "/v1/workers/{id}",
            get(get_worker).put(put_worker).delete(delete_worker),
        )
        .route("/v1/workers/{id}/heartbeat", post(heartbeat))
        .route("/v1/workers/{id}/health", post(health))
        .route("/v1/policies", get(list_policies))
        .route(
            "/v1/policies/{name}",
            get(get_policy).put(put_policy).delete(delete_policy),
        )
        .route(
            "/v1/affinity/{session}",
            get(get_affinity).put(put_affinity).delete(delete_affinity),
        )
        .route("/v1/ratelimits", get(list_ratelimits))
        .route(
            "/v1/ratelimits/{name}",
            get(get_ratelimit).put(put_ratelimit).delete(delete_ratelimit),
        )
        .route("/v1/ratelimits/{name}/acquire", post(acquire))
        .route("/v1/counters/{name}", get(get_counter))
        .route("/v1/counters/{name}/add", post(counter_add))
        .route("/v1/txn", post(txn))
}

/// Ids and names: 1-128 of `[A-Za-z0-9._:-]`.
fn name(kind: &str, s: &str) -> Result<String, ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(ApiError::bad_request(
            "invalid_name",
            format!("{kind} must be 1-128 characters of A-Z a-z 0-9 . _ - :, got {s:?}"),
        ))
    }
}

/// Parses a JSON body into `T`, refusing unknown fields with a clear message.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request("invalid_body", format!("request body: {e}")))
}

fn object_json(key: &str, prefix: &str, o: &Object) -> Value {
    let value: Value = serde_json::from_slice(&o.value).unwrap_or(Value::Null);
    json!({
        "id": key.strip_prefix(prefix).unwrap_or(key),
        "value": value,
        "revision": o.revision,
        "create_revision": o.create_revision,
        "version": o.version,
    })
}

/// Reads one object (linearizable unless `?consistency=stale`).
async fn read_one(s: &ApiState, key: &str, prefix: &str, consistency: Option<&str>) -> Result<Response, ApiError> {
    consistent(s, consistency).await?;
    let revision = s.cluster.reader().applied_index();
    match s.cluster.reader().get(key)? {
        Some(o) => Ok(with_revision(
            Json(object_json(key, prefix, &o)).into_response(),
            revision,
        )),
        None => Err(ApiError::not_found(format!("no {}", key.trim_end_matches('/')))),
    }
}

/// Reads every object under `prefix` that `keep` accepts.
async fn read_all(
    s: &ApiState,
    prefix: &str,
    consistency: Option<&str>,
    keep: impl Fn(&Value) -> bool,
) -> Result<Response, ApiError> {
    consistent(s, consistency).await?;
    let revision = s.cluster.reader().applied_index();
    let items: Vec<Value> = s
        .cluster
        .reader()
        .list(prefix, 100_000)?
        .iter()
        .map(|(k, o)| object_json(k, prefix, o))
        .filter(|v| keep(&v["value"]))
        .collect();
    Ok(with_revision(
        Json(json!({"items": items, "revision": revision})).into_response(),
        revision,
    ))
}

async fn write(s: &ApiState, headers: &HeaderMap, command: Command) -> Result<Response, ApiError> {
    write_response(s.cluster.propose(command, idempotency_key(headers)?).await?)
}

/// `?consistency=` of single-object reads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    consistency: Option<String>,
}

type Q<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn query<T>(q: Q<T>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request("invalid_parameter", e.body_text()))
}

// ---- workers ----

/// A worker as a client registers it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerInput {
    url: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    worker_type: control::WorkerType,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    priority: u32,
    #[serde(default = "one")]
    cost: u64,
    #[serde(default = "one_u32")]
    weight: u32,
    lease_ttl_ms: Option<u64>,
    breaker: Option<control::BreakerConfig>,
}

fn one() -> u64 {
    1
}

fn one_u32() -> u32 {
    1
}

async fn put_worker(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let id = name("worker id", &id)?;
    let w: WorkerInput = body(&bytes)?;
    if !(w.url.starts_with("http://") || w.url.starts_with("https://")) || w.url.len() > 2048 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "url must be an http:// or https:// URL",
        ));
    }
    if w.lease_ttl_ms.is_some_and(|t| !(1_000..=86_400_000).contains(&t)) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "lease_ttl_ms must be 1000-86400000",
        ));
    }
    let breaker = w.breaker.unwrap_or_default();
    if breaker.failure_threshold == 0 || breaker.success_threshold == 0 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "breaker thresholds must be at least 1",
        ));
    }
    let spec = control::WorkerSpec {
        id,
        url: w.url,
        models: w.models,
        worker_type: w.worker_type,
        labels: w.labels,
        priority: w.priority,
        cost: w.cost,
        weight: w.weight,
        lease_ttl_ms: w.lease_ttl_ms,
        breaker,
    };
    let expect = precondition(&headers)?;
    write(&s, &headers, Command::PutWorker { spec, expect }).await
}

async fn get_worker(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let q = query(q)?;
    let id = name("worker id", &id)?;
    read_one(
        &s,
        &format!("{}{id}", control::WORKERS),
        control::WORKERS,
        q.consistency.as_deref(),
    )
    .await
}

async fn delete_worker(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let key = format!("{}{}", control::WORKERS, name("worker id", &id)?);
    let expect = precondition(&headers)?;
    write(&s, &headers, Command::Delete { key, expect }).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerFilter {
    model: Option<String>,
    label: Option<String>,
    status: Option<String>,
    consistency: Option<String>,
}

async fn list_workers(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    q: Q<WorkerFilter>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let f = query(q)?;
    let label = match &f.label {
        Some(l) => Some(
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ApiError::bad_request("invalid_parameter", "label must be key=value"))?,
        ),
        None => None,
    };
    if let Some(st) = &f.status
        && !["unknown", "healthy", "unhealthy"].contains(&st.as_str())
    {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "status must be unknown, healthy or unhealthy",
        ));
    }
    read_all(&s, control::WORKERS, f.consistency.as_deref(), |v| {
        f.model.as_ref().is_none_or(|m| {
            v["models"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == m.as_str()))
        }) && label.as_ref().is_none_or(|(k, val)| v["labels"][k] == val.as_str())
            && f.status.as_ref().is_none_or(|st| v["health"] == st.as_str())
    })
    .await
}

async fn heartbeat(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let id = name("worker id", &id)?;
    write(&s, &headers, Command::Heartbeat { id }).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthInput {
    ok: bool,
    error: Option<String>,
}

async fn health(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let id = name("worker id", &id)?;
    let h: HealthInput = body(&bytes)?;
    let error = h.error.map(|e| e.chars().take(1024).collect());
    write(&s, &headers, Command::HealthReport { id, ok: h.ok, error }).await
}

// ---- policies ----

/// Kinds of routing policy and the parameters each accepts.
const POLICY_KINDS: &[(&str, &[&str])] = &[
    ("round_robin", &[]),
    ("random", &[]),
    ("power_of_two", &[]),
    ("least_load", &[]),
    ("weighted", &[]),
    ("priority", &[]),
    (
        "cache_aware",
        &[
            "cache_threshold",
            "balance_abs_threshold",
            "balance_rel_threshold",
            "eviction_interval_secs",
            "max_tree_size",
        ],
    ),
    ("consistent_hash", &["hash_key", "virtual_nodes"]),
];

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct PolicyInput {
    kind: String,
    #[serde(default)]
    params: serde_json::Map<String, Value>,
    #[serde(default)]
    weights: BTreeMap<String, u32>,
    model: Option<String>,
}

fn validate_policy(p: &PolicyInput) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_policy", m);
    let Some((_, allowed)) = POLICY_KINDS.iter().find(|(k, _)| *k == p.kind) else {
        let kinds: Vec<&str> = POLICY_KINDS.iter().map(|(k, _)| *k).collect();
        return Err(bad(format!("unknown policy kind {:?}; one of {kinds:?}", p.kind)));
    };
    for (k, v) in &p.params {
        if !allowed.contains(&k.as_str()) {
            return Err(bad(format!(
                "policy kind {} has no parameter {k:?}; allowed: {allowed:?}",
                p.kind
            )));
        }
        let ok = match k.as_str() {
            "cache_threshold" => v.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)),
            "balance_rel_threshold" => v.as_f64().is_some_and(|x| x >= 1.0),
            "balance_abs_threshold" | "eviction_interval_secs" | "max_tree_size" => v.as_u64().is_some(),
            "virtual_nodes" => v.as_u64().is_some_and(|x| (1..=10_000).contains(&x)),
            "hash_key" => v
                .as_str()
                .is_some_and(|s| s == "session" || s == "user" || s.starts_with("header:")),
            _ => false,
        };
        if !ok {
            return Err(bad(format!("parameter {k} has an invalid value {v}")));
        }
    }
    for w in p.weights.keys() {
        name("weights key (a worker id)", w)?;
    }
    Ok(())
}

async fn put_policy(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let n = name("policy name", &n)?;
    let p: PolicyInput = body(&bytes)?;
    validate_policy(&p)?;
    let command = Command::Put {
        key: format!("{}{n}", control::POLICIES),
        value: serde_json::to_vec(&p).expect("serializes"),
        expect: precondition(&headers)?,
    };
    write(&s, &headers, command).await
}

async fn get_policy(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let q = query(q)?;
    let key = format!("{}{}", control::POLICIES, name("policy name", &n)?);
    read_one(&s, &key, control::POLICIES, q.consistency.as_deref()).await
}

async fn delete_policy(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let key = format!("{}{}", control::POLICIES, name("policy name", &n)?);
    let expect = precondition(&headers)?;
    write(&s, &headers, Command::Delete { key, expect }).await
}

async fn list_policies(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let q = query(q)?;
    read_all(&s, control::POLICIES, q.consistency.as_deref(), |_| true).await
}

// ---- affinity ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AffinityInput {
    worker_id: String,
    ttl_ms: u64,
}

async fn put_affinity(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(session): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let session = name("session key", &session)?;
    let a: AffinityInput = body(&bytes)?;
    let worker_id = name("worker_id", &a.worker_id)?;
    if !(1..=7 * 86_400_000).contains(&a.ttl_ms) {
        return Err(ApiError::bad_request("invalid_body", "ttl_ms must be 1-604800000"));
    }
    let expect = precondition(&headers)?;
    let command = Command::PutAffinity {
        session,
        worker_id,
        ttl_ms: a.ttl_ms,
        expect,
    };
    write(&s, &headers, command).await
}

async fn get_affinity(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(session): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let q = query(q)?;
    let key = format!("{}{}", control::AFFINITY, name("session key", &session)?);
    consistent(&s, q.consistency.as_deref()).await?;
    let revision = s.cluster.reader().applied_index();
    let Some(o) = s.cluster.reader().get(&key)? else {
        return Err(ApiError::not_found("no such session affinity"));
    };
    let a: control::Affinity = keel_storage::model::from_json(&o.value)?;
    // Expired mappings are hidden at once; the leader's sweep removes them
    // from the replicated state shortly after.
    if a.expires_ms <= crate::cluster::now_ms() {
        return Err(ApiError::not_found("no such session affinity (expired)"));
    }
    Ok(with_revision(
        Json(object_json(&key, control::AFFINITY, &o)).into_response(),
        revision,
    ))
}

async fn delete_affinity(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(session): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let key = format!("{}{}", control::AFFINITY, name("session key", &session)?);
    let expect = precondition(&headers)?;
    write(&s, &headers, Command::Delete { key, expect }).await
}

// ---- rate limits and counters ----

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum RateLimitInput {
    TokenBucket { capacity: u64, refill_per_sec: f64 },
    FixedWindow { limit: u64, window_ms: u64 },
}

async fn put_ratelimit(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let n = name("rate limit name", &n)?;
    let spec = match body::<RateLimitInput>(&bytes)? {
        RateLimitInput::TokenBucket {
            capacity,
            refill_per_sec,
        } => {
            if capacity == 0 || capacity > 1_000_000_000_000 {
                return Err(ApiError::bad_request("invalid_body", "capacity must be 1-10^12"));
            }
            if !refill_per_sec.is_finite() || !(0.0..=1e12).contains(&refill_per_sec) {
                return Err(ApiError::bad_request("invalid_body", "refill_per_sec must be 0-10^12"));
            }
            control::RateLimitSpec::TokenBucket {
                capacity,
                refill_milli_per_sec: (refill_per_sec * 1000.0).round() as u64,
            }
        }
        RateLimitInput::FixedWindow { limit, window_ms } => {
            if limit == 0 || !(1..=86_400_000 * 31).contains(&window_ms) {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "limit must be at least 1 and window_ms 1-2678400000",
                ));
            }
            control::RateLimitSpec::FixedWindow { limit, window_ms }
        }
    };
    let expect = precondition(&headers)?;
    write(&s, &headers, Command::PutRateLimit { name: n, spec, expect }).await
}

async fn get_ratelimit(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let q = query(q)?;
    let key = format!("{}{}", control::RATELIMITS, name("rate limit name", &n)?);
    read_one(&s, &key, control::RATELIMITS, q.consistency.as_deref()).await
}

async fn delete_ratelimit(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let key = format!("{}{}", control::RATELIMITS, name("rate limit name", &n)?);
    let expect = precondition(&headers)?;
    write(&s, &headers, Command::Delete { key, expect }).await
}

async fn list_ratelimits(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let q = query(q)?;
    read_all(&s, control::RATELIMITS, q.consistency.as_deref(), |_| true).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcquireInput {
    tokens: u64,
    key: Option<String>,
}

async fn acquire(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let n = name("rate limit name", &n)?;
    let a: AcquireInput = body(&bytes)?;
    if a.tokens == 0 {
        return Err(ApiError::bad_request("invalid_body", "tokens must be at least 1"));
    }
    let key = a.key.map(|k| name("key", &k)).transpose()?;
    write(
        &s,
        &headers,
        Command::Acquire {
            name: n,
            tokens: a.tokens,
            key,
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterInput {
    delta: i64,
}

async fn counter_add(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let n = name("counter name", &n)?;
    let c: CounterInput = body(&bytes)?;
    write(
        &s,
        &headers,
        Command::CounterAdd {
            name: n,
            delta: c.delta,
        },
    )
    .await
}

async fn get_counter(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(n): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let q = query(q)?;
    let key = format!("{}{}", control::COUNTERS, name("counter name", &n)?);
    read_one(&s, &key, control::COUNTERS, q.consistency.as_deref()).await
}

// ---- transactions ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareInput {
    key: String,
    revision: Option<u64>,
    exists: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum OpInput {
    Put { key: String, value: Value },
    Delete { key: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnInput {
    #[serde(default)]
    compare: Vec<CompareInput>,
    #[serde(default)]
    success: Vec<OpInput>,
    #[serde(default)]
    failure: Vec<OpInput>,
}

/// Namespaces a transaction may touch, and whether it may put there.
fn txn_key(key: &str, put: bool) -> Result<String, ApiError> {
    let (ns, rest) = key.split_once('/').unwrap_or(("", ""));
    let allowed = match ns {
        "kv" | "policies" => true,
        "workers" | "affinity" | "ratelimits" | "counters" => !put,
        _ => false,
    };
    if !allowed || rest.is_empty() || key.len() > 600 {
        return Err(ApiError::bad_request(
            "invalid_txn",
            format!(
                "key {key:?}: compares and deletes may name kv/, policies/, workers/, affinity/, ratelimits/ or counters/ keys; puts only kv/ and policies/ (use the resource APIs for the others)"
            ),
        ));
    }
    Ok(key.to_string())
}

fn txn_ops(ops: Vec<OpInput>) -> Result<Vec<Command>, ApiError> {
    ops.into_iter()
        .map(|op| match op {
            OpInput::Put { key, value } => {
                let key = txn_key(&key, true)?;
                if key.starts_with(control::POLICIES) {
                    let p: PolicyInput = serde_json::from_value(value.clone())
                        .map_err(|e| ApiError::bad_request("invalid_policy", format!("{key}: {e}")))?;
                    validate_policy(&p)?;
                }
                Ok(Command::Put {
                    key,
                    value: serde_json::to_vec(&value).expect("serializes"),
                    expect: None,
                })
            }
            OpInput::Delete { key } => Ok(Command::Delete {
                key: txn_key(&key, false)?,
                expect: None,
            }),
        })
        .collect()
}

async fn txn(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let t: TxnInput = body(&bytes)?;
    if t.compare.len() + t.success.len() + t.failure.len() > 128 {
        return Err(ApiError::bad_request(
            "invalid_txn",
            "at most 128 compares and operations",
        ));
    }
    let mut compares = Vec::new();
    for c in t.compare {
        let key = txn_key(&c.key, false)?;
        let expect = match (c.revision, c.exists) {
            (Some(r), None) => Expect::Revision(r),
            (None, Some(true)) => Expect::Present,
            (None, Some(false)) => Expect::Absent,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_txn",
                    format!("compare on {key}: give exactly one of revision or exists"),
                ));
            }
        };
        compares.push((key, expect));
    }
    let txn = Txn {
        compares,
        success: txn_ops(t.success)?,
        failure: txn_ops(t.failure)?,
    };
    write(&s, &headers, Command::Txn(txn)).await
}

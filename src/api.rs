//! The client API: JSON over HTTPS (HTTP/1.1 and HTTP/2).
//!
//! Every route except the probes needs a client certificate of the cluster
//! CA; `/admin/*` needs an admin certificate. Handlers are thin: they parse
//! and validate, then call [`Cluster`] (propose, linearize, status) or read
//! the applied state.

use axum::Extension;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::Path;
use axum::extract::Query;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use keel_raft::serve::ConnInfo;
use keel_raft::tls::Identity;
use keel_storage::model::Command;
use keel_storage::model::Expect;
use keel_storage::model::Object;
use serde::Deserialize;
use serde_json::Value;
use serde_json::json;

use crate::cluster::Cluster;
use crate::error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Longest key accepted.
pub const MAX_KEY: usize = 512;

/// Shared state of the API handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The local node.
    pub cluster: Cluster,
    /// No TLS: every caller is trusted.
    pub insecure: bool,
    /// Fan-out of applied changes to watchers.
    pub watch: crate::watch::WatchHub,
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/openapi.json", get(|| async { Json(crate::openapi::document()) }))
        .route("/v1/kv", get(kv_list))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/admin/state-hash", get(state_hash))
        .route("/v1/watch", get(crate::watch::watch))
        .merge(crate::control_api::routes())
        .merge(crate::ha::routes())
        .merge(crate::snapshot_api::routes())
        .merge(crate::membership::router(&state))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .with_state(state)
}

/// Turns the plain-text rejections of axum's extractors (413 body too large,
/// 405 method not allowed, 415, malformed paths) into the API's one JSON
/// error shape, so every error a client sees looks the same.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/event-stream"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "not_found",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_string();
    }
    let mut out = ApiError::new(status, code, message).into_response();
    for (k, v) in parts.headers.iter() {
        if k == axum::http::header::ALLOW || k == "retry-after" {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// Who may call a route.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Any certificate of the cluster CA.
    Client,
    /// Only an admin certificate.
    Admin,
}

pub(crate) fn authorize(state: &ApiState, conn: &ConnInfo, access: Access) -> Result<(), ApiError> {
    if state.insecure {
        return Ok(());
    }
    match (&conn.identity, access) {
        (None, _) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a client certificate signed by the cluster CA is required",
        )),
        (Some(_), Access::Client) => Ok(()),
        (Some(Identity::Admin(_)), Access::Admin) => Ok(()),
        (Some(other), Access::Admin) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{other} is not an admin; this call needs an admin certificate"),
        )),
    }
}

async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(s): State<ApiState>) -> Response {
    // Rules in observe.rs: leader contact, caught up, not a learner, not stopping.
    match crate::observe::readiness(&s.cluster).await.not_ready {
        None => Json(json!({"ready": true})).into_response(),
        Some(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": r})),
        )
            .into_response(),
    }
}

async fn status(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    Ok(Json(s.cluster.status()).into_response())
}

async fn state_hash(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Admin)?;
    let reader = s.cluster.reader().clone();
    let h = tokio::task::spawn_blocking(move || reader.state_hash())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(h).into_response())
}

fn kv_key(key: &str) -> Result<String, ApiError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(ApiError::bad_request(
            "invalid_key",
            format!("key must be 1-{MAX_KEY} bytes, got {}", key.len()),
        ));
    }
    if key.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request(
            "invalid_key",
            "key must not contain control characters",
        ));
    }
    Ok(format!("kv/{key}"))
}

/// Reads the optional `Idempotency-Key` header: a retried write with the
/// same key applies once and gets the first answer.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::bad_request("invalid_header", "Idempotency-Key is not ASCII"))?;
    if v.is_empty() || v.len() > 128 || v.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request(
            "invalid_header",
            "Idempotency-Key must be 1-128 printable characters",
        ));
    }
    Ok(Some(v.to_string()))
}

/// Parses `If-Match: <revision>` and `If-None-Match: *` into a precondition.
pub(crate) fn precondition(headers: &HeaderMap) -> Result<Option<Expect>, ApiError> {
    let get = |name: &str| -> Result<Option<String>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .map_err(|_| ApiError::bad_request("invalid_header", format!("{name} is not ASCII")))
            })
            .transpose()
    };
    match (get("if-match")?, get("if-none-match")?) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "invalid_header",
            "use either If-Match or If-None-Match, not both",
        )),
        (Some(m), None) if m == "*" => Ok(Some(Expect::Present)),
        (Some(m), None) => m.parse().map(|r| Some(Expect::Revision(r))).map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("If-Match must be a revision number or *, got {m:?}"),
            )
        }),
        (None, Some(m)) if m == "*" => Ok(Some(Expect::Absent)),
        (None, Some(m)) => Err(ApiError::bad_request(
            "invalid_header",
            format!("If-None-Match supports only *, got {m:?}"),
        )),
        (None, None) => Ok(None),
    }
}

/// `consistency` query parameter of reads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    consistency: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    prefix: Option<String>,
    limit: Option<usize>,
    consistency: Option<String>,
}

/// Makes the read linearizable unless `?consistency=stale`.
pub(crate) async fn consistent(s: &ApiState, consistency: Option<&str>) -> Result<(), ApiError> {
    match consistency {
        None | Some("linearizable") => s.cluster.linearize().await,
        Some("stale") => Ok(()),
        Some(other) => Err(ApiError::bad_request(
            "invalid_parameter",
            format!("consistency must be linearizable or stale, got {other:?}"),
        )),
    }
}

fn object_json(key: &str, o: &Object) -> Value {
    let value: Value = serde_json::from_slice(&o.value).unwrap_or(Value::Null);
    json!({
        "key": key.strip_prefix("kv/").unwrap_or(key),
        "value": value,
        "revision": o.revision,
        "create_revision": o.create_revision,
        "version": o.version,
    })
}

/// Adds the `x-keel-revision` header. Marked sensitive, which HTTP/2
/// encodes as a literal never added to the connection's header table
/// (HPACK): under writes nearly every answer carries a new revision, and
/// each would otherwise enter the table, push out the headers that do repeat
/// (`content-type`) and make the encoder search the growing list of stale
/// revisions for the next one (about 2.5 % of a leader's samples at 64
/// clients; bench/README.md, change 26).
pub(crate) fn with_revision(mut r: Response, revision: u64) -> Response {
    let mut v = axum::http::HeaderValue::from(revision);
    v.set_sensitive(true);
    r.headers_mut().insert("x-keel-revision", v);
    r
}

async fn kv_get(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(key): Path<String>,
    params: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request("invalid_parameter", e.body_text()))?;
    let key = kv_key(&key)?;
    consistent(&s, params.consistency.as_deref()).await?;
    let revision = s.cluster.reader().applied_index();
    match s.cluster.reader().get(&key)? {
        Some(o) => Ok(with_revision(Json(object_json(&key, &o)).into_response(), revision)),
        None => Err(ApiError::not_found(format!(
            "no key {:?}",
            key.strip_prefix("kv/").unwrap_or(&key)
        ))),
    }
}

async fn kv_list(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request("invalid_parameter", e.body_text()))?;
    let limit = params.limit.unwrap_or(1000);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::bad_request("invalid_parameter", "limit must be 1-10000"));
    }
    consistent(&s, params.consistency.as_deref()).await?;
    let prefix = format!("kv/{}", params.prefix.unwrap_or_default());
    let revision = s.cluster.reader().applied_index();
    let items: Vec<Value> = s
        .cluster
        .reader()
        .list(&prefix, limit)?
        .iter()
        .map(|(k, o)| object_json(k, o))
        .collect();
    Ok(with_revision(
        Json(json!({"items": items, "revision": revision})).into_response(),
        revision,
    ))
}

async fn kv_put(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let key = kv_key(&key)?;
    let expect = precondition(&headers)?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body must be a JSON value: {e}")))?;
    let command = Command::Put {
        key,
        value: serde_json::to_vec(&value).expect("a parsed value serializes"),
        expect,
    };
    write_response(s.cluster.propose(command, idempotency_key(&headers)?).await?)
}

async fn kv_delete(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let key = kv_key(&key)?;
    let expect = precondition(&headers)?;
    let idem = idempotency_key(&headers)?;
    write_response(s.cluster.propose(Command::Delete { key, expect }, idem).await?)
}

/// The JSON form of a state-machine answer (used inside transactions too).
pub(crate) fn response_json(r: &keel_storage::model::Response) -> Value {
    use keel_storage::model::Response as R;
    match r {
        R::None => json!({}),
        R::Written { revision, created } => json!({"revision": revision, "created": created}),
        R::Deleted { revision } => json!({"revision": revision, "deleted": true}),
        R::Conflict { current_revision } => json!({"conflict": true, "current_revision": current_revision}),
        R::NotFound => json!({"not_found": true}),
        R::Invalid(m) => json!({"rejected": m}),
        R::Acquired {
            granted,
            remaining,
            retry_after_ms,
            revision,
        } => {
            json!({"granted": granted, "remaining": remaining, "retry_after_ms": retry_after_ms, "revision": revision})
        }
        R::Counter { value, revision } => json!({"value": value, "revision": revision}),
        R::Expired { workers, affinities } => json!({"workers": workers, "affinities": affinities}),
        R::Txn {
            succeeded,
            revision,
            results,
        } => {
            json!({"succeeded": succeeded, "revision": revision, "results": results.iter().map(response_json).collect::<Vec<_>>()})
        }
    }
}

/// Maps the state machine's answer to a write onto HTTP.
pub(crate) fn write_response((index, response): (u64, keel_storage::model::Response)) -> Result<Response, ApiError> {
    use keel_storage::model::Response as R;
    let body = response_json(&response);
    match response {
        R::Written { revision, created } => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(with_revision((status, Json(body)).into_response(), revision))
        }
        R::Deleted { revision } | R::Counter { revision, .. } | R::Txn { revision, .. } => {
            Ok(with_revision(Json(body).into_response(), revision))
        }
        R::Acquired {
            granted: true,
            revision,
            ..
        } => Ok(with_revision(Json(body).into_response(), revision)),
        R::Acquired {
            granted: false,
            remaining,
            retry_after_ms,
            ..
        } => {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                match retry_after_ms {
                    Some(ms) => format!("not enough tokens; retry after {ms} ms"),
                    None => "not enough tokens, and there never will be: the request exceeds the limit".to_string(),
                },
            )
            .with("granted", false)
            .with("remaining", remaining)
            .with("retry_after_ms", retry_after_ms);
            e.retry_after = retry_after_ms.map(|ms| ms.div_ceil(1000).max(1));
            Err(e)
        }
        R::Conflict { current_revision } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            match current_revision {
                Some(r) => format!("precondition failed: the current revision is {r}"),
                None => "precondition failed: the object does not exist".to_string(),
            },
        )
        .with("current_revision", current_revision)),
        R::NotFound => Err(ApiError::not_found("no such object").with("revision", index)),
        R::Invalid(m) => Err(ApiError::new(StatusCode::CONFLICT, "rejected", m)),
        R::Expired { .. } => Ok(Json(body).into_response()),
        R::None => Err(ApiError::internal("the state machine gave no answer to a write")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preconditions_parse_and_reject_nonsense() {
        let mut h = HeaderMap::new();
        assert_eq!(precondition(&h).unwrap(), None);
        h.insert("if-match", "\"42\"".parse().unwrap());
        assert_eq!(precondition(&h).unwrap(), Some(Expect::Revision(42)));
        h.insert("if-none-match", "*".parse().unwrap());
        assert!(precondition(&h).is_err());
        h.remove("if-match");
        assert_eq!(precondition(&h).unwrap(), Some(Expect::Absent));
        h.insert("if-none-match", "7".parse().unwrap());
        assert!(precondition(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert("if-match", "abc".parse().unwrap());
        assert_eq!(precondition(&h).unwrap_err().code, "invalid_header");
    }

    #[test]
    fn the_revision_header_stays_out_of_the_hpack_table() {
        let r = with_revision(StatusCode::OK.into_response(), 1234);
        let v = &r.headers()["x-keel-revision"];
        assert_eq!(v, "1234");
        assert!(
            v.is_sensitive(),
            "a new revision per answer must not enter the header table"
        );
    }

    #[test]
    fn keys_are_validated() {
        assert_eq!(kv_key("a/b").unwrap(), "kv/a/b");
        assert!(kv_key("").is_err());
        assert!(kv_key(&"x".repeat(MAX_KEY + 1)).is_err());
        assert!(kv_key("a\nb").is_err());
    }
}

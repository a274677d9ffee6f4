//! Admin routes for snapshots (admin certificate required):
//!
//! - `POST /admin/snapshot` builds a snapshot of everything applied so far
//!   and answers once it is on disk: `{"snapshot": {"index", "term"},
//!   "applied_index", "purged_index"}`.
//! - `GET /admin/snapshot` streams the node's newest snapshot file (keel's
//!   snapshot format, `Content-Length` set). The file is verified completely
//!   before the first byte goes out; a corrupt one is set aside, a new one
//!   is built, and the call answers 503 so the client retries.

use std::os::unix::fs::FileExt;
use std::time::Duration;
use std::time::Instant;

use axum::Extension;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use keel_raft::serve::ConnInfo;
use keel_storage::snapshot::transfer::SourceCheck;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use serde_json::json;

use crate::api::Access;
use crate::api::ApiState;
use crate::api::authorize;
use crate::error::ApiError;

/// Longest a `POST /admin/snapshot` waits for the snapshot to be built.
const BUILD_WAIT: Duration = Duration::from_secs(300);

/// The snapshot routes, merged into the API router.
pub fn routes() -> Router<ApiState> {
    Router::new().route("/admin/snapshot", get(download).post(trigger))
}

fn index_term(l: &Option<keel_storage::types::LogId>) -> serde_json::Value {
    match l {
        Some(l) => json!({"index": l.index, "term": l.leader_id.term}),
        None => serde_json::Value::Null,
    }
}

async fn trigger(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Admin)?;
    let raft = s.cluster.raft().clone();
    let applied = raft.metrics().borrow_watched().last_applied;
    if applied.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "nothing_applied",
            "this node has applied nothing yet; there is nothing to snapshot",
        ));
    }
    let start = Instant::now();
    loop {
        raft.trigger()
            .snapshot()
            .await
            .map_err(|e| ApiError::unavailable("raft_stopped", e.to_string()))?;
        // A build already under way may predate `applied`: then trigger again.
        let done = raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.snapshot.is_some() && m.snapshot >= applied,
                "snapshot covers applied",
            )
            .await;
        if done.is_ok() {
            break;
        }
        if start.elapsed() > BUILD_WAIT {
            return Err(ApiError::unavailable(
                "snapshot_timeout",
                format!("no snapshot covering the applied state within {BUILD_WAIT:?}"),
            ));
        }
    }
    let m = raft.metrics().borrow_watched().clone();
    tracing::info!(snapshot = ?m.snapshot, ms = start.elapsed().as_millis() as u64, "snapshot built on request");
    Ok(Json(json!({
        "snapshot": index_term(&m.snapshot),
        "applied_index": m.last_applied.map(|l| l.index),
        "purged_index": m.purged.map(|l| l.index),
        "ms": start.elapsed().as_millis() as u64,
    }))
    .into_response())
}

async fn download(State(s): State<ApiState>, Extension(conn): Extension<ConnInfo>) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Admin)?;
    let raft = s.cluster.raft().clone();
    let snap = raft
        .get_snapshot()
        .await
        .map_err(|e| ApiError::unavailable("raft_stopped", e.to_string()))?
        .ok_or_else(|| ApiError::not_found("this node has no snapshot yet; POST /admin/snapshot builds one"))?;
    let last = snap.meta.last_log_id;
    let file = snap.snapshot;
    // Never serve a stored snapshot without checking every byte of it.
    let (file, checked) = tokio::task::spawn_blocking(move || {
        let res = file.len().map_err(|e| e.to_string()).and_then(|len| {
            let mut check = SourceCheck::new();
            check.catch_up(&file.file, len).map_err(|e| e.to_string())?;
            if check.is_complete() {
                Ok(len)
            } else {
                Err("the file ends before its trailer".to_string())
            }
        });
        (file, res)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let len = match checked {
        Ok(len) => len,
        Err(why) => {
            tracing::error!(file = %file.path.display(), %why, "stored snapshot failed verification; not serving it");
            keel_storage::snapshot::quarantine(&file)?;
            let _ = raft.trigger().snapshot().await;
            return Err(ApiError::unavailable(
                "snapshot_corrupt",
                format!(
                    "the stored snapshot failed verification ({why}); it was set aside and a new one is being built: retry"
                ),
            ));
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut pos = 0u64;
        while pos < len {
            let n = ((len - pos) as usize).min(256 << 10);
            let mut buf = vec![0; n];
            let res = file.file.read_exact_at(&mut buf, pos).map(|()| bytes::Bytes::from(buf));
            let failed = res.is_err();
            if tx.blocking_send(res).is_err() || failed {
                return;
            }
            pos += n as u64;
        }
    });
    let mut rx = rx;
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, len.into());
    if let Some(l) = last {
        h.insert("x-keel-snapshot-index", l.index.into());
        h.insert("x-keel-snapshot-term", l.leader_id.term.into());
    }
    tracing::info!(snapshot = ?last, bytes = len, "serving a snapshot download");
    Ok(resp)
}

//! Watches: `GET /v1/watch?prefix=workers/&from_revision=N` streams every
//! change under a prefix as Server-Sent Events, in revision order, resumable
//! from any revision still in the retained history (`HISTORY_KEEP` log
//! indexes); older ones get 410 Gone with the current revision, so the
//! client relists.
//!
//! One [`WatchHub`] task per node reads each newly applied history entry
//! once and broadcasts it; watchers first catch up from the stored history,
//! then follow the broadcast. A watcher too slow for the broadcast buffer
//! falls back to reading the stored history, so writers never wait for
//! watchers.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Extension;
use axum::extract::Query;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::response::sse::Event as SseEvent;
use axum::response::sse::KeepAlive;
use axum::response::sse::Sse;
use futures::Stream;
use keel_raft::serve::ConnInfo;
use keel_storage::StateReader;
use keel_storage::model::Event;
use keel_storage::model::HISTORY_KEEP;
use keel_storage::model::HISTORY_PREFIX;
use keel_storage::model::from_json;
use keel_storage::model::history_key;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast;

use crate::api::Access;
use crate::api::ApiState;
use crate::api::authorize;
use crate::error::ApiError;

/// Changes of one log index.
type Batch = Arc<(u64, Vec<Event>)>;

/// Fans applied changes out to every watcher on this node.
#[derive(Clone)]
pub struct WatchHub {
    tx: broadcast::Sender<Batch>,
    watchers: Arc<AtomicUsize>,
}

impl WatchHub {
    /// Starts the hub's reader task.
    pub fn start(reader: StateReader) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let hub = Self {
            tx: tx.clone(),
            watchers: Arc::new(AtomicUsize::new(0)),
        };
        tokio::spawn(async move {
            let mut applied = reader.watch_applied();
            let mut last = reader.applied_index();
            loop {
                if applied.changed().await.is_err() {
                    return;
                }
                let now = *applied.borrow_and_update();
                if now <= last {
                    continue;
                }
                // Nobody watching: do not read and decode every write's
                // history for nothing. A watcher that subscribes later
                // catches up from storage, and the first batch it sees
                // above its position makes it read the gap from storage
                // too (see `events`).
                if tx.receiver_count() == 0 {
                    last = now;
                    continue;
                }
                match read_history(&reader, last + 1, now) {
                    Ok(batches) => {
                        for b in batches {
                            // The last watcher may have just left.
                            let _ = tx.send(b);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "reading change history for watchers"),
                }
                last = now;
            }
        });
        hub
    }

    /// Number of open watches on this node.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

/// History entries with index in `from..=to`.
fn read_history(reader: &StateReader, from: u64, to: u64) -> std::io::Result<Vec<Batch>> {
    let mut out = Vec::new();
    let mut start = history_key(from);
    loop {
        let page = reader.scan_from(&start, HISTORY_PREFIX, 512)?;
        let n = page.len();
        for (k, o) in page {
            let index: u64 = k[HISTORY_PREFIX.len()..].parse().unwrap_or(u64::MAX);
            if index > to {
                return Ok(out);
            }
            out.push(Arc::new((index, from_json(&o.value)?)));
            start = history_key(index + 1);
        }
        if n < 512 {
            return Ok(out);
        }
    }
}

/// Query of `GET /v1/watch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    /// Only keys starting with this (e.g. `workers/`); empty = everything.
    prefix: Option<String>,
    /// First revision to deliver; default: the next one.
    from_revision: Option<u64>,
}

/// Decrements the watcher count when a stream ends.
struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        let n = self.0.fetch_sub(1, Ordering::Relaxed) - 1;
        crate::metrics::get().watchers.set(n as i64);
    }
}

/// `GET /v1/watch`.
pub async fn watch(
    State(s): State<ApiState>,
    Extension(conn): Extension<ConnInfo>,
    headers: HeaderMap,
    q: Result<Query<WatchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &conn, Access::Client)?;
    let Query(p) = q.map_err(|e| ApiError::bad_request("invalid_parameter", e.body_text()))?;
    let reader = s.cluster.reader().clone();
    let applied = reader.applied_index();
    // `Last-Event-ID` (sent by SSE clients on reconnect) resumes after it.
    let last_event = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let from = p
        .from_revision
        .or(last_event.map(|l| l + 1))
        .unwrap_or(applied + 1)
        .max(1);
    let oldest = applied.saturating_sub(HISTORY_KEEP) + 1;
    if from < oldest {
        return Err(ApiError::new(
            StatusCode::GONE,
            "compacted",
            format!("revision {from} is older than the retained history (oldest {oldest}); list again and watch from the listed revision"),
        )
        .with("current_revision", applied));
    }
    let prefix = p.prefix.unwrap_or_default();
    let hub = s.watch.clone();
    let n = hub.watchers.fetch_add(1, Ordering::Relaxed) + 1;
    crate::metrics::get().watchers.set(n as i64);
    let guard = Guard(hub.watchers.clone());
    let stream = events(reader, hub.tx.subscribe(), from, prefix, guard);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
        .into_response())
}

fn sse(index: u64, e: &Event) -> SseEvent {
    let value: serde_json::Value = e
        .value
        .as_deref()
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or(serde_json::Value::Null);
    SseEvent::default()
        .id(index.to_string())
        .event(e.kind.clone())
        .data(json!({"revision": index, "key": e.key, "kind": e.kind, "value": value}).to_string())
}

/// The event stream of one watcher: stored history first, then live
/// batches, never a revision twice, never one skipped.
fn events(
    reader: StateReader,
    mut rx: broadcast::Receiver<Batch>,
    from: u64,
    prefix: String,
    guard: Guard,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream(move |tx| async move {
        let _guard = guard;
        // `next` is the first revision not yet delivered.
        let mut next = from;
        loop {
            // Catch up from storage up to what is applied now.
            let upto = reader.applied_index();
            if next <= upto {
                let batches = match read_history(&reader, next, upto) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(SseEvent::default().event("error").data(e.to_string())).await;
                        return;
                    }
                };
                for b in batches {
                    for e in b.1.iter().filter(|e| e.key.starts_with(&prefix)) {
                        if tx.send(sse(b.0, e)).await.is_err() {
                            return;
                        }
                    }
                }
                next = upto + 1;
            }
            // Follow the broadcast until it laps us.
            loop {
                match rx.recv().await {
                    Ok(b) if b.0 < next => {}
                    // A gap (changes applied between catch-up and this batch):
                    // read them from storage rather than skip any.
                    Ok(b) if b.0 > next => break,
                    Ok(b) => {
                        for e in b.1.iter().filter(|e| e.key.starts_with(&prefix)) {
                            if tx.send(sse(b.0, e)).await.is_err() {
                                return;
                            }
                        }
                        next = b.0 + 1;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
            let oldest = reader.applied_index().saturating_sub(HISTORY_KEEP) + 1;
            if next < oldest {
                let _ = tx
                    .send(SseEvent::default().event("error").data(format!(
                        "fell behind the retained history at revision {next}; list again and watch from the listed revision"
                    )))
                    .await;
                return;
            }
        }
    })
}

/// A stream fed by an async producer through a small channel.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok)))
}

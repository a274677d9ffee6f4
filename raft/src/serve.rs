//! One accept loop for both ports: TLS handshake (with the peer's identity
//! taken from its certificate), HTTP/1.1 or HTTP/2, and graceful shutdown.
//!
//! On shutdown the listener closes at once, every connection is asked to
//! finish (HTTP/2 GOAWAY, HTTP/1 close after the current response) and the
//! function returns when in-flight requests are done or `drain` has passed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::tls::Identity;
use crate::tls::peer_identity;

/// What a request handler knows about the connection it arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The identity in the client's certificate; `None` without TLS.
    pub identity: Option<Identity>,
    /// The remote socket address.
    pub remote: SocketAddr,
}

/// Limits of one server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Longest wait for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest wait for in-flight requests at shutdown.
    pub drain: Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the server has accepted
    /// them; one more and the connection is closed with `GOAWAY
    /// ENHANCE_YOUR_CALM`. This is the defence against rapid reset
    /// (CVE-2023-44487): opening and cancelling streams in a loop would
    /// otherwise make the server start work that nobody waits for.
    pub max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams the server may reset because the client broke the
    /// protocol on them, before it closes the connection (a flood of bad
    /// frames costs the server a reset each).
    pub max_local_error_reset_streams: usize,
    /// Largest HTTP/2 header list (`SETTINGS_MAX_HEADER_LIST_SIZE`) accepted.
    pub max_header_list_size: u32,
    /// Longest wait for the headers of an HTTP/1 request (slow-loris); also
    /// how long an idle HTTP/1 keep-alive connection is kept.
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            max_concurrent_streams: 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            max_header_list_size: 16 << 10,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `listener` until `shutdown` turns true, then drains.
///
/// `make` builds the service for each connection from its [`ConnInfo`].
pub async fn serve<F, S, B>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    make: F,
    mut shutdown: watch::Receiver<bool>,
    opts: ServeOptions,
) where
    F: Fn(ConnInfo) -> S + Send + Sync + 'static,
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(opts.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Explicit limits, not the libraries' defaults of the day: every one of
    // them bounds what a single connection can make this process hold.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(opts.max_concurrent_streams)
        .max_pending_accept_reset_streams(opts.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(opts.max_local_error_reset_streams)
        .max_header_list_size(opts.max_header_list_size)
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let acceptor = tls.map(TlsAcceptor::from);
    let make = Arc::new(make);
    loop {
        let permit = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (tcp, remote) = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let make = make.clone();
        let handshake_timeout = opts.handshake_timeout;
        // The handshake runs in the connection's own task so a slow or
        // hostile client cannot stall the accept loop.
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let identity = peer_identity(tls.get_ref().1);
                    let svc = make(ConnInfo { identity, remote });
                    let conn = builder.serve_connection(TokioIo::new(tls), svc);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                None => {
                    let svc = make(ConnInfo { identity: None, remote });
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(opts.drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after the drain period; closing them");
    }
}

/// Resolves once the shutdown flag is true (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

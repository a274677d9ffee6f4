//! Slow and lossy links: a TCP proxy in front of a node's peer port.
//!
//! Peers dial the proxy (the node advertises the proxy's address and
//! listens elsewhere), so every Raft message into the node crosses it. The
//! proxy forwards bytes in order and, while impaired, holds each chunk for
//! a random delay and closes a connection at random (both directions, in
//! the middle of whatever was being sent), which is what a lossy path looks
//! like to TCP's user: stalls and broken connections. `tc netem` would do this in the kernel; it is
//! not available here.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;

/// How a proxy impairs its links now.
#[derive(Default)]
pub struct Impair {
    /// Each chunk is held for a random 0..=`max_delay_ms`.
    pub max_delay_ms: AtomicU64,
    /// Chance, in thousandths, that forwarding a chunk cuts the connection.
    pub cut_per_mille: AtomicU64,
    /// Connections cut so far.
    pub cuts: AtomicU64,
}

impl Impair {
    pub fn set(&self, max_delay_ms: u64, cut_per_mille: u64) {
        self.max_delay_ms.store(max_delay_ms, Ordering::SeqCst);
        self.cut_per_mille.store(cut_per_mille, Ordering::SeqCst);
    }
}

pub struct Proxy {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `listen` and forwards each connection to `target`.
pub async fn start(listen: &str, target: String, impair: Arc<Impair>) -> Proxy {
    let l = TcpListener::bind(listen).await.expect("bind the proxy");
    let task = tokio::spawn(async move {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        loop {
            let Ok((inbound, _)) = l.accept().await else {
                continue;
            };
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (target, impair) = (target.clone(), impair.clone());
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(&target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                // Either direction ending (or being cut) ends both.
                tokio::select! {
                    _ = pump(ri, wo, impair.clone(), seed) => {}
                    _ = pump(ro, wi, impair, seed ^ 0xFFFF) => {}
                }
            });
        }
    });
    Proxy { task }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    impair: Arc<Impair>,
    mut x: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let max = impair.max_delay_ms.load(Ordering::SeqCst);
        if max > 0 {
            tokio::time::sleep(Duration::from_millis(x % (max + 1))).await;
        }
        let cut = impair.cut_per_mille.load(Ordering::SeqCst);
        if cut > 0 && (x >> 20) % 1000 < cut {
            impair.cuts.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

//! `keel bench`: load against a running cluster through the public API.
//!
//! The loop, the histograms and the JSON report come from
//! `keel-bench-driver` (`bench/driver`), which the etcd driver
//! (`bench/etcd-load`) shares, so both systems are measured the same way.
//! This module only knows keel's side: HTTP/2 connections (TLS with a client
//! certificate, or plaintext h2c against an `--insecure` cluster), spread
//! over the endpoints, and the request each workload sends.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use anyhow::anyhow;
use anyhow::bail;
use clap::Args;
use keel_bench_driver::LoadArgs;
use keel_bench_driver::Recorder;
use keel_bench_driver::Report;
use keel_bench_driver::Workload;
use keel_bench_driver::finish_watch;

/// Options of `keel bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to run and how hard.
    #[command(flatten)]
    pub load: LoadArgs,
    /// API URLs, comma separated: `https://…` (with certificates) or
    /// `http://…` for an `--insecure` cluster; connections are spread over them.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// A `cluster.json` written by `keel dev-cluster`: every node becomes an
    /// endpoint, and its client certificate is used.
    #[arg(long)]
    pub cluster_file: Option<PathBuf>,
    /// CA certificate (PEM), for https endpoints.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for https endpoints.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM), for https endpoints.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Do not write the key space before read workloads (it is there already).
    #[arg(long)]
    pub no_preload: bool,
}

/// One HTTP/2 connection to one node.
struct Conn {
    http: reqwest::Client,
    base: String,
}

/// Every connection, shared by the clients.
struct Target {
    conns: Vec<Conn>,
    load: LoadArgs,
    /// The body of every put: a JSON string of exactly `value_size` bytes.
    value_body: bytes::Bytes,
}

impl Target {
    fn conn(&self, client: usize) -> &Conn {
        &self.conns[client % self.conns.len()]
    }

    async fn put(&self, client: usize, key: &str, body: bytes::Bytes) -> Result<(), String> {
        let c = self.conn(client);
        let r = c
            .http
            .put(format!("{}/v1/kv/{key}", c.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("put: {e}"))?;
        check(r, &[200, 201]).await
    }

    async fn get(&self, client: usize, key: &str, stale: bool) -> Result<(), String> {
        let c = self.conn(client);
        let q = if stale { "?consistency=stale" } else { "" };
        let r = c
            .http
            .get(format!("{}/v1/kv/{key}{q}", c.base))
            .send()
            .await
            .map_err(|e| format!("get: {e}"))?;
        check(r, &[200]).await
    }

    async fn acquire(&self, client: usize) -> Result<(), String> {
        let c = self.conn(client);
        let r = c
            .http
            .post(format!("{}/v1/ratelimits/{ACQUIRE_LIMIT}/acquire", c.base))
            .header("content-type", "application/json")
            .body(r#"{"tokens":1}"#)
            .send()
            .await
            .map_err(|e| format!("acquire: {e}"))?;
        // 429 is an answer too: the acquire went through the log.
        check(r, &[200, 429]).await
    }

    /// One operation of the workload.
    async fn op(&self, client: usize, seq: u64) -> Result<(), String> {
        let read = self.load.is_read(seq);
        let key = self.load.key_for(seq, read);
        match self.load.workload {
            Workload::Put | Workload::Watch => self.put(client, &key, self.value_body.clone()).await,
            Workload::Get => self.get(client, &key, false).await,
            Workload::StaleGet => self.get(client, &key, true).await,
            Workload::Mixed if read => self.get(client, &key, false).await,
            Workload::Mixed => self.put(client, &key, self.value_body.clone()).await,
            Workload::Acquire => self.acquire(client).await,
        }
    }
}

/// The rate limit the `acquire` workload spends (it never runs dry).
const ACQUIRE_LIMIT: &str = "bench-acquire";

/// Reads the whole answer and checks its status.
async fn check(r: reqwest::Response, ok: &[u16]) -> Result<(), String> {
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| format!("reading the answer: {e}"))?;
    if ok.contains(&status) {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&body);
        Err(format!("{status}: {}", text.chars().take(200).collect::<String>()))
    }
}

/// A JSON string of exactly `n` bytes (quotes included).
fn json_string_of_len(n: usize) -> bytes::Bytes {
    format!("\"{}\"", "v".repeat(n.saturating_sub(2))).into()
}

/// Endpoints and TLS files from the flags and the cluster file.
fn endpoints_and_tls(args: &BenchArgs) -> anyhow::Result<(Vec<String>, Option<keel_raft::tls::TlsFiles>)> {
    let file = match &args.cluster_file {
        Some(p) => Some(crate::dev_cluster::ClusterFile::read(p)?),
        None => None,
    };
    let mut endpoints: Vec<String> = args
        .endpoints
        .iter()
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty()
        && let Some(f) = &file
    {
        endpoints = f.nodes.iter().map(|n| format!("https://{}", n.api_addr)).collect();
    }
    if endpoints.is_empty() {
        bail!("give --endpoints or --cluster-file");
    }
    for e in &endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            bail!("endpoint {e:?} must start with http:// or https://");
        }
    }
    if endpoints.iter().all(|e| e.starts_with("http://")) {
        return Ok((endpoints, None));
    }
    let pick = |given: &Option<PathBuf>, from_file: Option<PathBuf>, what: &str| {
        given
            .clone()
            .or(from_file)
            .ok_or_else(|| anyhow!("--{what} is required for https endpoints (or --cluster-file)"))
    };
    let tls = keel_raft::tls::TlsFiles {
        ca: pick(&args.ca, file.as_ref().map(|f| f.ca_cert.clone()), "ca")?,
        cert: pick(&args.cert, file.as_ref().map(|f| f.client_cert.clone()), "cert")?,
        key: pick(&args.key, file.as_ref().map(|f| f.client_key.clone()), "key")?,
    };
    Ok((endpoints, Some(tls)))
}

/// Opens the connections: one HTTP/2 client each, endpoints in turn.
fn connect(
    args: &BenchArgs,
    endpoints: &[String],
    tls: Option<&keel_raft::tls::TlsFiles>,
) -> anyhow::Result<Vec<Conn>> {
    let tls = match tls {
        Some(files) => Some(keel_raft::tls::TlsMaterial::load(files)?.client_config(true)?),
        None => None,
    };
    (0..args.load.connections())
        .map(|j| {
            // One reqwest client with HTTP/2 prior knowledge multiplexes all
            // its requests on one connection per host: one connection here.
            let mut b = reqwest::Client::builder()
                .http2_prior_knowledge()
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(args.timeout_secs));
            if let Some(t) = &tls {
                b = b.use_preconfigured_tls((**t).clone());
            }
            Ok(Conn {
                http: b.build()?,
                base: endpoints[j % endpoints.len()].clone(),
            })
        })
        .collect()
}

/// `keel bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.load.validate().map_err(|e| anyhow!(e))?;
    let (endpoints, tls) = endpoints_and_tls(&args)?;
    let conns = connect(&args, &endpoints, tls.as_ref())?;
    let target = Arc::new(Target {
        conns,
        load: args.load.clone(),
        value_body: json_string_of_len(args.load.value_size),
    });
    match args.load.workload {
        w if w.needs_preload() && !args.no_preload => preload(&target).await?,
        Workload::Acquire => create_limit(&target).await?,
        _ => {}
    }
    let (rec, elapsed) = if args.load.workload == Workload::Watch {
        watch(&target).await?
    } else {
        let t = target.clone();
        keel_bench_driver::run(&args.load, move |client, seq| {
            let t = t.clone();
            async move { t.op(client, seq).await }
        })
        .await
    };
    Report::new("keel", &args.load, endpoints.len(), &rec, elapsed).print(args.load.json);
    if rec.ops == 0 {
        bail!("no operation succeeded");
    }
    Ok(())
}

/// Writes every key of the key space once, 64 at a time (not measured).
async fn preload(target: &Arc<Target>) -> anyhow::Result<()> {
    let mut load = target.load.clone();
    load.workload = Workload::Put;
    load.clients = 64.min(load.keys as usize);
    load.count = Some(load.keys);
    load.duration = None;
    load.rate = None;
    let t = target.clone();
    let (rec, _) = keel_bench_driver::run(&load, move |client, seq| {
        let t = t.clone();
        async move {
            let key = t.load.key(seq);
            t.put(client, &key, t.value_body.clone()).await
        }
    })
    .await;
    if rec.errors > 0 {
        bail!("preloading {} keys: {} writes failed", load.keys, rec.errors);
    }
    Ok(())
}

/// Creates the rate limit `acquire` spends, large enough never to refuse.
async fn create_limit(target: &Target) -> anyhow::Result<()> {
    let c = target.conn(0);
    let r = c
        .http
        .put(format!("{}/v1/ratelimits/{ACQUIRE_LIMIT}", c.base))
        .json(&serde_json::json!({"kind": "token_bucket", "capacity": 1_000_000_000_000u64, "refill_per_sec": 1e12}))
        .send()
        .await
        .context("creating the rate limit")?;
    check(r, &[200, 201])
        .await
        .map_err(|e| anyhow!("creating the rate limit: {e}"))
}

/// The watch fan-out: `clients` watchers on the key prefix, one writer at
/// the target rate; each event's latency is from the writer's clock stamp
/// in the value to its arrival at a watcher. Events that never arrive
/// (within 5 s of the last write) count as errors.
async fn watch(target: &Arc<Target>) -> anyhow::Result<(Recorder, Duration)> {
    let load = &target.load;
    let delivered = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut watchers = Vec::new();
    for w in 0..load.clients {
        let c = target.conn(w);
        // The watch is registered once its answer's head arrives.
        let resp = c
            .http
            .get(format!("{}/v1/watch?prefix=kv/k", c.base))
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await
            .context("opening a watch")?;
        if !resp.status().is_success() {
            bail!("opening a watch: {}", resp.status());
        }
        let (delivered, mut stop) = (delivered.clone(), stop_rx.clone());
        watchers.push(tokio::spawn(async move {
            let mut rec = Recorder::new();
            let mut resp = resp;
            let mut buf = Vec::new();
            loop {
                tokio::select! {
                    _ = stop.changed() => return rec,
                    chunk = resp.chunk() => match chunk {
                        Ok(Some(bytes)) => {
                            buf.extend_from_slice(&bytes);
                            let now = keel_bench_driver::now_micros();
                            while let Some(end) = find(&buf, b"\n\n") {
                                let event: Vec<u8> = buf.drain(..end + 2).collect();
                                if let Some(stamp) = sse_stamp(&event) {
                                    rec.record_micros(now.saturating_sub(stamp));
                                    delivered.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(None) => { rec.error("the watch stream ended"); return rec; }
                        Err(e) => { rec.error(format!("watch stream: {e}")); return rec; }
                    }
                }
            }
        }));
    }
    let mut writer = load.clone();
    writer.clients = 4;
    let t = target.clone();
    let (wrec, elapsed) = keel_bench_driver::run(&writer, move |client, seq| {
        let t = t.clone();
        async move {
            let key = t.load.key(seq);
            let mut value = t.load.stamped_value(keel_bench_driver::now_micros());
            value.truncate(t.load.value_size.saturating_sub(2).max(1));
            let body: bytes::Bytes = serde_json::to_vec(&value).expect("a string serializes").into();
            t.put(client, &key, body).await
        }
    })
    .await;
    let rec = finish_watch(&wrec, load.clients, &delivered, stop_tx, watchers).await;
    Ok((rec, elapsed))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The writer's time stamp in one SSE event (`data: {"value": "t=…;vvv"}`).
fn sse_stamp(event: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.lines().find_map(|l| l.strip_prefix("data:"))?;
    let v: serde_json::Value = serde_json::from_str(data.trim()).ok()?;
    keel_bench_driver::parse_stamp(v.get("value")?.as_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_bodies_are_exactly_value_size_bytes() {
        assert_eq!(json_string_of_len(256).len(), 256);
        let v: serde_json::Value = serde_json::from_slice(&json_string_of_len(256)).unwrap();
        assert!(v.is_string());
    }

    #[test]
    fn sse_events_yield_their_stamp() {
        let e =
            b"id: 7\nevent: put\ndata: {\"revision\":7,\"key\":\"kv/k1\",\"kind\":\"put\",\"value\":\"t=123;vv\"}\n\n";
        assert_eq!(sse_stamp(e), Some(123));
        assert_eq!(sse_stamp(b":keep-alive\n\n"), None);
    }
}

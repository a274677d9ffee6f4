//! `etcd-load`: the workloads of `keel bench` against etcd, through the
//! `etcd-client` crate (etcd's own gRPC API), with the same options and the
//! same JSON report (`keel-bench-driver`).
//!
//! put = `Put`; get = linearizable `Range`; stale-get = serializable
//! `Range`; mixed = both; watch = `--clients` watchers on the key prefix
//! and one writer. There is no rate-limit acquire in etcd.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::anyhow;
use anyhow::bail;
use clap::Parser;
use etcd_client::Client;
use etcd_client::GetOptions;
use etcd_client::WatchOptions;
use keel_bench_driver::LoadArgs;
use keel_bench_driver::Recorder;
use keel_bench_driver::finish_watch;
use keel_bench_driver::Report;
use keel_bench_driver::Workload;

#[derive(Parser)]
#[command(name = "etcd-load", about = "keel bench's workloads against etcd")]
struct Cli {
    #[command(flatten)]
    load: LoadArgs,
    /// Client URLs, comma separated (http://127.0.0.1:2379,...).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Do not write the key space before read workloads.
    #[arg(long)]
    no_preload: bool,
}

struct Target {
    /// One gRPC channel (one HTTP/2 connection) each.
    conns: Vec<Client>,
    load: LoadArgs,
    value: Vec<u8>,
}

impl Target {
    fn conn(&self, client: usize) -> Client {
        self.conns[client % self.conns.len()].clone()
    }

    async fn op(&self, client: usize, seq: u64) -> Result<(), String> {
        let read = self.load.is_read(seq);
        let key = self.load.key_for(seq, read);
        let mut c = self.conn(client);
        let res = match self.load.workload {
            Workload::Get | Workload::Mixed if read => c.get(key, None).await.map(|_| ()),
            Workload::StaleGet => c.get(key, Some(GetOptions::new().with_serializable())).await.map(|_| ()),
            Workload::Put | Workload::Mixed | Workload::Watch => c.put(key, self.value.clone(), None).await.map(|_| ()),
            Workload::Get => unreachable!("get is always a read"),
            Workload::Acquire => return Err("etcd has no rate limits".into()),
        };
        res.map_err(|e| e.to_string())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.load.validate().map_err(|e| anyhow!(e))?;
    if cli.load.workload == Workload::Acquire {
        bail!("etcd has no rate-limit acquire");
    }
    let mut conns = Vec::new();
    for j in 0..cli.load.connections() {
        let ep = &cli.endpoints[j % cli.endpoints.len()];
        conns.push(Client::connect([ep.as_str()], None).await?);
    }
    let target = Arc::new(Target {
        conns,
        load: cli.load.clone(),
        value: cli.load.value().into_bytes(),
    });
    if cli.load.workload.needs_preload() && !cli.no_preload {
        preload(&target).await?;
    }
    let (rec, elapsed) = if cli.load.workload == Workload::Watch {
        watch(&target).await?
    } else {
        let t = target.clone();
        keel_bench_driver::run(&cli.load, move |client, seq| {
            let t = t.clone();
            async move { t.op(client, seq).await }
        })
        .await
    };
    Report::new("etcd", &cli.load, cli.endpoints.len(), &rec, elapsed).print(cli.load.json);
    if rec.ops == 0 {
        bail!("no operation succeeded");
    }
    Ok(())
}

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
            let mut c = t.conn(client);
            c.put(t.load.key(seq), t.value.clone(), None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    if rec.errors > 0 {
        bail!("preloading {} keys: {} writes failed", load.keys, rec.errors);
    }
    Ok(())
}

/// Same method as `keel bench --workload watch`.
async fn watch(target: &Arc<Target>) -> anyhow::Result<(Recorder, Duration)> {
    let load = &target.load;
    let delivered = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut watchers = Vec::new();
    for w in 0..load.clients {
        let mut c = target.conn(w);
        let (_watcher, mut stream) = c.watch("k", Some(WatchOptions::new().with_prefix())).await?;
        let (delivered, mut stop) = (delivered.clone(), stop_rx.clone());
        watchers.push(tokio::spawn(async move {
            let _keep = _watcher;
            let mut rec = Recorder::new();
            loop {
                tokio::select! {
                    _ = stop.changed() => return rec,
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            let now = keel_bench_driver::now_micros();
                            for e in resp.events() {
                                let stamp = e.kv().and_then(|kv| kv.value_str().ok()).and_then(keel_bench_driver::parse_stamp);
                                if let Some(stamp) = stamp {
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
            let mut c = t.conn(client);
            let value = t.load.stamped_value(keel_bench_driver::now_micros());
            c.put(t.load.key(seq), value, None).await.map(|_| ()).map_err(|e| e.to_string())
        }
    })
    .await;
    let rec = finish_watch(&wrec, load.clients, &delivered, stop_tx, watchers).await;
    Ok((rec, elapsed))
}

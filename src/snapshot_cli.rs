//! `keel snapshot …`: build a snapshot on a node, back it up to a file,
//! check a backup, and seed a new cluster from one (disaster recovery).
//! The procedure is described in `storage/src/snapshot/DESIGN.md`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::anyhow;
use anyhow::bail;
use clap::Subcommand;
use futures::StreamExt;
use keel_storage::KeelNode;
use keel_storage::snapshot::format::SnapshotHeader;
use keel_storage::snapshot::format::SnapshotSummary;
use keel_storage::snapshot::format::StreamVerifier;
use keel_storage::snapshot::restore::RestoreTarget;
use serde_json::Value;
use serde_json::json;

use crate::cli::ClientArgs;

/// The `keel snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Build a snapshot on a node now (admin certificate).
    Trigger {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download a consistent snapshot of a node's whole state to FILE (admin
    /// certificate). The node builds a fresh one first unless --no-trigger.
    Save {
        /// Where to write the snapshot (written as FILE.part, renamed when verified).
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
        /// Download the node's newest stored snapshot as it is.
        #[arg(long)]
        no_trigger: bool,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Verify a snapshot file completely and print its header and totals.
    Inspect {
        /// The snapshot file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seed a member of a new cluster with a snapshot's state (disaster
    /// recovery); run it for every member (at least a majority, the lowest id
    /// among them). The new cluster's name and members replace the ones in
    /// the snapshot.
    Restore {
        /// The snapshot file (from `keel snapshot save`).
        file: PathBuf,
        /// The new node's config file (node_id, cluster_name, data_dir, initial_members).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory to create (must not exist or be empty).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The new cluster's name.
        #[arg(long)]
        cluster_name: Option<String>,
        /// This node's id.
        #[arg(long)]
        node_id: Option<u64>,
        /// The new cluster's members: `ID=RAFT_ADDR/API_ADDR`, comma separated.
        #[arg(long)]
        initial_members: Option<String>,
    },
}

/// Runs a `keel snapshot` subcommand.
pub async fn run(cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Trigger { client } => trigger(&client).await.map(|v| {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }),
        SnapshotCmd::Save {
            file,
            client,
            no_trigger,
            force,
        } => save(&client, &file, !no_trigger, force).await,
        SnapshotCmd::Inspect { file, json } => inspect(&file, json).await,
        SnapshotCmd::Restore {
            file,
            config,
            data_dir,
            cluster_name,
            node_id,
            initial_members,
        } => {
            let file_cfg = match &config {
                Some(p) => crate::config::read_file(p)?,
                None => Default::default(),
            };
            let members = match initial_members {
                Some(s) => crate::config::parse_members(&s)?,
                None => file_cfg.initial_members.unwrap_or_default(),
            };
            let target = RestoreTarget {
                data_dir: data_dir
                    .or(file_cfg.data_dir)
                    .ok_or_else(|| anyhow!("give --data-dir (or --config)"))?,
                cluster_name: cluster_name
                    .or(file_cfg.cluster_name)
                    .ok_or_else(|| anyhow!("give --cluster-name (or --config)"))?,
                node_id: node_id
                    .or(file_cfg.node_id)
                    .ok_or_else(|| anyhow!("give --node-id (or --config)"))?,
                members: members
                    .into_iter()
                    .map(|m| {
                        (
                            m.id,
                            KeelNode {
                                raft_addr: m.raft_addr,
                                api_addr: m.api_addr,
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>(),
            };
            if target.members.is_empty() {
                bail!("give the new cluster's --initial-members (or --config with initial_members)");
            }
            restore(&file, &target).await
        }
    }
}

/// An admin client with a timeout suited to `what` (building or streaming
/// a large snapshot takes longer than an ordinary request).
fn admin_client(args: &ClientArgs, min_timeout: Duration) -> anyhow::Result<crate::cli::ApiClient> {
    let mut args = args.clone();
    args.admin = true;
    args.timeout_secs = args.timeout_secs.max(min_timeout.as_secs());
    args.client()
}

async fn trigger(args: &ClientArgs) -> anyhow::Result<Value> {
    let c = admin_client(args, Duration::from_secs(330))?;
    let url = format!("{}/admin/snapshot", c.base);
    let resp = c.http.post(&url).send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        bail!("POST {url}: {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("POST {url}: unexpected body {body:?}"))
}

/// A progress line on stderr: a bar on a terminal, a line every 5 s otherwise.
struct Progress {
    total: Option<u64>,
    start: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    fn new(total: Option<u64>) -> Self {
        let now = Instant::now();
        Self {
            total,
            start: now,
            last: now - Duration::from_secs(10),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, done: u64, last: bool) {
        let every = if self.tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        if !last && self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / 1e6 / secs;
        let line = match self.total {
            Some(t) if t > 0 => {
                let frac = (done as f64 / t as f64).min(1.0);
                let filled = (frac * 30.0) as usize;
                format!(
                    "[{}{}] {:5.1}%  {:.1}/{:.1} MB  {:.1} MB/s",
                    "#".repeat(filled),
                    "-".repeat(30 - filled),
                    frac * 100.0,
                    done as f64 / 1e6,
                    t as f64 / 1e6,
                    rate
                )
            }
            _ => format!("{:.1} MB  {:.1} MB/s", done as f64 / 1e6, rate),
        };
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r{line}");
            if last {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
    }
}

async fn save(args: &ClientArgs, file: &Path, build_first: bool, force: bool) -> anyhow::Result<()> {
    if file.exists() && !force {
        bail!("{} exists; use --force to replace it", file.display());
    }
    if build_first {
        let v = trigger(args).await?;
        eprintln!(
            "snapshot built at index {} (term {})",
            v["snapshot"]["index"], v["snapshot"]["term"]
        );
    }
    let c = admin_client(args, Duration::from_secs(24 * 3600))?;
    let url = format!("{}/admin/snapshot", c.base);
    let resp = c.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("GET {url}: {status}: {body}");
    }
    let total = resp.content_length();
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut out = std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let mut verifier = StreamVerifier::new();
    let mut progress = Progress::new(total);
    let mut done = 0u64;
    let mut stream = resp.bytes_stream();
    let res: anyhow::Result<()> = async {
        while let Some(piece) = stream.next().await {
            let piece = piece.context("download interrupted")?;
            verifier
                .feed(&piece)
                .map_err(|e| anyhow!("the downloaded snapshot is corrupt: {e}"))?;
            out.write_all(&piece)?;
            done += piece.len() as u64;
            progress.show(done, false);
        }
        progress.show(done, true);
        if !verifier.is_complete() || total.is_some_and(|t| t != done) {
            bail!("download ended early: {done} of {total:?} bytes");
        }
        out.sync_all()?;
        Ok(())
    }
    .await;
    if let Err(e) = res {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, file)?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        keel_storage::fsutil::fsync_dir(dir)?;
    }
    let header = verifier.header().cloned().expect("complete");
    let summary = verifier.summary().expect("complete");
    eprintln!(
        "saved {} ({} bytes, {} records, cluster {:?}, last log index {} term {}, verified)",
        file.display(),
        summary.file_bytes,
        summary.records,
        header.cluster_id,
        header.last_index,
        header.last_term
    );
    Ok(())
}

fn describe(path: &Path, header: &SnapshotHeader, summary: &SnapshotSummary) -> anyhow::Result<Value> {
    let meta = keel_storage::snapshot::decode_meta(header)?;
    let membership = meta.last_membership.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let nodes: BTreeMap<String, Value> = membership
        .nodes()
        .map(|(id, n)| {
            (
                id.to_string(),
                json!({"raft_addr": n.raft_addr, "api_addr": n.api_addr, "voter": voters.contains(id)}),
            )
        })
        .collect();
    Ok(json!({
        "file": path.display().to_string(),
        "format_version": keel_storage::snapshot::format::FORMAT_VERSION,
        "verified": true,
        "cluster": header.cluster_id,
        "last_log_id": meta.last_log_id.map(|l| json!({
            "index": l.index,
            "term": l.leader_id.term,
            "leader": l.leader_id.node_id,
        })),
        "membership": {
            "log_index": meta.last_membership.log_id().map(|l| l.index),
            "voters": voters,
            "nodes": nodes,
        },
        "created_unix_ms": header.created_unix_ms,
        "records": summary.records,
        "chunks": summary.chunks,
        "raw_bytes": summary.raw_bytes,
        "compressed_bytes": summary.compressed_bytes,
        "file_bytes": summary.file_bytes,
        "chunk_crc_chain": format!("{:08x}", summary.crc),
    }))
}

async fn inspect(file: &Path, as_json: bool) -> anyhow::Result<()> {
    let path = file.to_path_buf();
    let (header, summary) = tokio::task::spawn_blocking(move || keel_storage::snapshot::format::verify_file(&path))
        .await?
        .map_err(|e| anyhow!("{} failed verification: {e}", file.display()))?;
    let v = describe(file, &header, &summary)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_millis() as u64).saturating_sub(header.created_unix_ms) / 1000)
        .unwrap_or(0);
    println!("file:          {} ({} bytes)", file.display(), summary.file_bytes);
    println!(
        "verified:      yes (format v{}, {} chunk CRCs, trailer)",
        v["format_version"], summary.chunks
    );
    println!("cluster:       {}", header.cluster_id);
    println!(
        "last log id:   index {} term {} (leader node {})",
        v["last_log_id"]["index"], v["last_log_id"]["term"], v["last_log_id"]["leader"]
    );
    println!("voters:        {}", v["membership"]["voters"]);
    if let Some(nodes) = v["membership"]["nodes"].as_object() {
        for (id, n) in nodes {
            println!(
                "  node {id:<5} raft={} api={}",
                n["raft_addr"].as_str().unwrap_or(""),
                n["api_addr"].as_str().unwrap_or("")
            );
        }
    }
    println!("created:       {} unix ms ({age} s ago)", header.created_unix_ms);
    println!("records:       {}", summary.records);
    println!(
        "bytes:         {} raw, {} compressed in {} chunks ({:.2}x)",
        summary.raw_bytes,
        summary.compressed_bytes,
        summary.chunks,
        summary.raw_bytes as f64 / summary.compressed_bytes.max(1) as f64
    );
    println!("crc chain:     {:08x}", summary.crc);
    Ok(())
}

async fn restore(file: &Path, target: &RestoreTarget) -> anyhow::Result<()> {
    let start = Instant::now();
    let report = keel_storage::snapshot::restore::restore(file, target)
        .await
        .with_context(|| format!("restoring {} into {}", file.display(), target.data_dir.display()))?;
    println!(
        "restored {} records of cluster {:?} (last log index {} term {}) into {} in {:.1} s",
        report.records,
        report.source_cluster,
        report.last_log_id.index,
        report.last_log_id.leader_id.term,
        target.data_dir.display(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "cluster {:?}, node {}, members {:?} (the snapshot's members {:?} are not kept)",
        target.cluster_name,
        target.node_id,
        target.members.keys().collect::<Vec<_>>(),
        report.source_voters
    );
    println!(
        "next: restore the same file for every other member (at least a majority, the lowest id among them), \
         then start them all with `keel serve`; a member left empty receives the state by snapshot"
    );
    Ok(())
}

//! `keel dev-cluster`: a local cluster on loopback for trying keel out.
//!
//! It generates a CA and certificates, writes one config per node, starts
//! each node as a child process of its own (`keel serve`), waits until they
//! agree on a leader, writes `cluster.json`, and on Ctrl-C stops every node
//! with SIGTERM (SIGKILL only after a grace period). Run again with the same
//! directory and it restarts the same cluster with its data.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use serde::Deserialize;
use serde::Serialize;

use crate::cluster::StatusView;

/// One node in `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Node id.
    pub id: u64,
    /// API address, `host:port`.
    pub api_addr: String,
    /// Peer address, `host:port`.
    pub raft_addr: String,
    /// Process id of the running node.
    pub pid: u32,
    /// Data directory (absolute).
    pub data_dir: PathBuf,
    /// Config file (absolute).
    pub config: PathBuf,
}

/// The contents of `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The nodes.
    pub nodes: Vec<NodeEntry>,
    /// CA certificate.
    pub ca_cert: PathBuf,
    /// Client certificate.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
    /// Admin certificate.
    pub admin_cert: PathBuf,
    /// Admin key.
    pub admin_key: PathBuf,
}

impl ClusterFile {
    /// Reads and parses a cluster file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Addresses of one node of the dev cluster.
struct Plan {
    id: u64,
    api_addr: String,
    raft_addr: String,
    dir: PathBuf,
}

/// Free loopback ports, or the ones an earlier run of this directory used.
fn plan(dir: &Path, nodes: u64) -> anyhow::Result<Vec<Plan>> {
    let previous = ClusterFile::read(&dir.join("cluster.json")).ok();
    if let Some(p) = previous.filter(|p| p.nodes.len() as u64 == nodes) {
        return Ok(p
            .nodes
            .into_iter()
            .map(|n| Plan {
                dir: dir.join(format!("node-{}", n.id)),
                id: n.id,
                api_addr: n.api_addr,
                raft_addr: n.raft_addr,
            })
            .collect());
    }
    let mut held = Vec::new();
    let mut port = || -> anyhow::Result<String> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let a = l.local_addr()?.to_string();
        held.push(l);
        Ok(a)
    };
    (1..=nodes)
        .map(|id| {
            Ok(Plan {
                id,
                api_addr: port()?,
                raft_addr: port()?,
                dir: dir.join(format!("node-{id}")),
            })
        })
        .collect()
}

fn toml_str(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// Writes the node's config file and returns its path.
fn write_config(p: &Plan, all: &[Plan], certs: &Path, cluster_name: &str) -> anyhow::Result<PathBuf> {
    keel_storage::fsutil::create_private_dir(&p.dir)?;
    let mut s = format!(
        "node_id = {}\ncluster_name = \"{cluster_name}\"\ndata_dir = {}\napi_listen = \"{}\"\nraft_listen = \"{}\"\n",
        p.id,
        toml_str(&p.dir.join("data")),
        p.api_addr,
        p.raft_addr
    );
    s.push_str("\n[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 1000\nelection_timeout_max_ms = 2000\n");
    s.push_str(&format!(
        "\n[tls]\nca = {}\ncert = {}\nkey = {}\n",
        toml_str(&certs.join("ca.pem")),
        toml_str(&certs.join(format!("node-{}.pem", p.id))),
        toml_str(&certs.join(format!("node-{}-key.pem", p.id)))
    ));
    for m in all {
        s.push_str(&format!(
            "\n[[initial_members]]\nid = {}\nraft_addr = \"{}\"\napi_addr = \"{}\"\n",
            m.id, m.raft_addr, m.api_addr
        ));
    }
    let path = p.dir.join("keel.toml");
    std::fs::write(&path, s)?;
    Ok(path)
}

/// Runs the dev cluster until SIGINT or SIGTERM.
pub async fn run(nodes: u64, dir: &Path) -> anyhow::Result<()> {
    if !(1..=9).contains(&nodes) {
        bail!("--nodes must be 1-9, got {nodes}");
    }
    // Take over Ctrl-C before any node exists, so an early interrupt still
    // stops the nodes instead of killing only us.
    let mut signals = Signals::new()?;
    let dir = std::path::absolute(dir)?;
    keel_storage::fsutil::create_private_dir(&dir)?;
    let certs = dir.join("certs");
    let ids: Vec<u64> = (1..=nodes).collect();
    crate::cert::create_dev_set(&certs, &ids)?;
    let name_file = dir.join("cluster-name");
    let cluster_name = match std::fs::read_to_string(&name_file) {
        Ok(s) => s.trim().to_string(),
        Err(_) => {
            let n = format!("dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            std::fs::write(&name_file, &n)?;
            n
        }
    };
    let plans = plan(&dir, nodes)?;
    let exe = std::env::current_exe().context("locating the keel binary")?;
    let mut children = Vec::new();
    let mut entries = Vec::new();
    for p in &plans {
        let config = write_config(p, &plans, &certs, &cluster_name)?;
        let log = std::fs::File::create(p.dir.join("keel.log"))?;
        let child = tokio::process::Command::new(&exe)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C reaches only us, and we stop
            // the nodes in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node {}", p.id))?;
        entries.push(NodeEntry {
            id: p.id,
            api_addr: p.api_addr.clone(),
            raft_addr: p.raft_addr.clone(),
            pid: child.id().unwrap_or(0),
            data_dir: p.dir.join("data"),
            config,
        });
        children.push((p.id, child));
    }
    let file = ClusterFile {
        nodes: entries,
        ca_cert: certs.join("ca.pem"),
        client_cert: certs.join("client-dev.pem"),
        client_key: certs.join("client-dev-key.pem"),
        admin_cert: certs.join("admin-dev.pem"),
        admin_key: certs.join("admin-dev-key.pem"),
    };
    let cluster_json = dir.join("cluster.json");
    keel_storage::fsutil::write_atomic(&cluster_json, serde_json::to_string_pretty(&file)?.as_bytes())?;

    let leader = tokio::select! {
        l = wait_for_leader(&file, Duration::from_secs(90)) => Some(l),
        _ = signals.recv() => None,
    };
    println!("keel dev cluster {cluster_name:?} ({nodes} nodes) in {}", dir.display());
    for n in &file.nodes {
        println!(
            "  node {}: https://{}  (pid {}, log {})",
            n.id,
            n.api_addr,
            n.pid,
            dir.join(format!("node-{}/keel.log", n.id)).display()
        );
    }
    match &leader {
        Some(Ok(l)) => println!("leader: node {l}"),
        Some(Err(e)) => println!("warning: no agreed leader yet: {e:#}"),
        None => {}
    }
    if leader.is_some() {
        println!("cluster file: {}", cluster_json.display());
        println!("try: keel status --cluster-file {}", cluster_json.display());
        println!("Ctrl-C stops every node.");
        wait_signal_or_exit(&mut children, &mut signals).await;
    }
    println!("stopping nodes...");
    for (_, c) in &children {
        if let Some(pid) = c.id() {
            terminate(pid);
        }
    }
    for (id, c) in &mut children {
        match tokio::time::timeout(Duration::from_secs(20), c.wait()).await {
            Ok(Ok(st)) => println!("node {id} stopped ({st})"),
            _ => {
                let _ = c.kill().await;
                println!("node {id} killed after 20 s");
            }
        }
    }
    Ok(())
}

/// Sends SIGTERM to a node we started.
fn terminate(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        eprintln!("could not signal pid {pid}: {e}");
    }
}

/// SIGINT and SIGTERM, installed once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::SignalKind;
        use tokio::signal::unix::signal;
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

async fn wait_signal_or_exit(children: &mut [(u64, tokio::process::Child)], signals: &mut Signals) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = signals.recv() => return,
            _ = tick.tick() => {
                for (id, c) in children.iter_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        eprintln!("node {id} exited ({st}); see its keel.log");
                    }
                }
                if children.iter_mut().all(|(_, c)| matches!(c.try_wait(), Ok(Some(_)))) {
                    eprintln!("every node has exited");
                    return;
                }
            }
        }
    }
}

/// Polls every node's `/status` until all name the same leader.
async fn wait_for_leader(file: &ClusterFile, limit: Duration) -> anyhow::Result<u64> {
    let args = crate::cli::ClientArgs {
        endpoint: None,
        cluster_file: None,
        ca: Some(file.ca_cert.clone()),
        cert: Some(file.client_cert.clone()),
        key: Some(file.client_key.clone()),
        admin: false,
        timeout_secs: 2,
    };
    let start = Instant::now();
    loop {
        let mut leaders = Vec::new();
        for n in &file.nodes {
            let mut a = args.clone();
            a.endpoint = Some(format!("https://{}", n.api_addr));
            let s: Option<StatusView> = match a.client() {
                Ok(c) => c.get_json("/status").await.ok(),
                Err(_) => None,
            };
            leaders.push(s.and_then(|s| s.leader_id));
        }
        if let Some(Some(l)) = leaders.first()
            && leaders.iter().all(|x| *x == Some(*l))
        {
            return Ok(*l);
        }
        if start.elapsed() > limit {
            bail!("nodes report leaders {leaders:?} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

//! A test cluster of real `keel` processes on loopback.
//!
//! Tests start nodes with `keel serve`, kill them with SIGKILL or stop them
//! with SIGTERM, restart them with their data, and talk to them over HTTPS
//! with client and admin certificates. Every wait polls a condition with a
//! generous deadline; nothing sleeps for a fixed time hoping for the best.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use keel::cluster::StatusView;
use keel_raft::tls::TlsFiles;
use keel_raft::tls::TlsMaterial;
use serde_json::Value;

/// Generous deadline for cluster-level conditions on a busy 2-core machine.
pub const WAIT: Duration = Duration::from_secs(60);

/// One node process.
pub struct NodeProc {
    pub id: u64,
    pub api_addr: String,
    pub raft_addr: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub child: std::sync::Mutex<Option<Child>>,
    /// Among `initial_members` (false for nodes prepared to join later).
    pub initial: bool,
    /// Where the node listens for peers when that differs from `raft_addr`
    /// (the address peers dial, e.g. a fault-injecting proxy).
    pub raft_listen: Option<String>,
    /// The network namespace the node runs in (`ip netns exec`), if any.
    pub netns: Option<String>,
}

/// Where a node of a [`TestCluster::prepare_placed`] cluster lives.
#[derive(Debug, Clone)]
pub struct Placement {
    pub api_addr: String,
    /// The address peers dial.
    pub raft_addr: String,
    /// Where the node listens for peers, if not `raft_addr`.
    pub raft_listen: Option<String>,
    pub netns: Option<String>,
    /// Extra names for the node's certificate (the IPs clients and peers dial).
    pub cert_hosts: Vec<String>,
}

impl NodeProc {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("keel.log")
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }
    pub fn is_running(&self) -> bool {
        self.child.lock().unwrap().is_some()
    }
}

/// The result of an HTTP call: status and JSON body (Null if none).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub revision: Option<u64>,
}

pub struct TestCluster {
    pub root: tempfile::TempDir,
    pub certs: PathBuf,
    pub cluster_name: String,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub client: reqwest::Client,
    pub admin: reqwest::Client,
    pub extra_args: Vec<String>,
    /// Extra environment for every node process (e.g. `FAILPOINTS`).
    pub env: Vec<(String, String)>,
}

/// A loopback address for a node to listen on.
///
/// Ports come from 20000..32000, below Linux's ephemeral range
/// (32768..60999): a port the kernel hands to an outgoing connection can
/// never be one a stopped node will bind again on restart. Each test process
/// walks its own slice of the range (offset by pid) with a counter, so no
/// port is handed out twice in one run; each candidate is test-bound first
/// to skip ports something else holds.
fn free_addr() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() % 24) * 500,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().unwrap().to_string();
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

pub fn http_client(certs: &Path, cert: &str, key: &str) -> reqwest::Client {
    let files = TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(cert),
        key: certs.join(key),
    };
    let tls = TlsMaterial::load(&files)
        .expect("load client TLS")
        .client_config(false)
        .expect("client config");
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("build http client")
}

impl TestCluster {
    /// Writes certificates and configs for `n` nodes and starts them all.
    pub fn start(n: u64) -> Self {
        let c = Self::prepare(n, &[]);
        for id in 1..=n {
            c.spawn(id);
        }
        c
    }

    /// Like [`TestCluster::start`] but with extra `keel serve` flags for every node.
    pub fn start_with(n: u64, extra: &[&str]) -> Self {
        let c = Self::prepare(n, extra);
        for id in 1..=n {
            c.spawn(id);
        }
        c
    }

    /// Certificates and configs only; nothing started.
    pub fn prepare(n: u64, extra: &[&str]) -> Self {
        Self::prepare_placed(n, extra, |_| Placement {
            api_addr: free_addr(),
            raft_addr: free_addr(),
            raft_listen: None,
            netns: None,
            cert_hosts: Vec::new(),
        })
    }

    /// Like [`TestCluster::prepare`], with each node's addresses, namespace
    /// and certificate names from `place(id)`.
    pub fn prepare_placed(n: u64, extra: &[&str], place: impl Fn(u64) -> Placement) -> Self {
        let root = tempfile::Builder::new()
            .prefix("keel-test-")
            .tempdir()
            .expect("temp dir");
        let certs = root.path().join("certs");
        let ids: Vec<u64> = (1..=n).collect();
        keel::cert::create_dev_set(&certs, &ids).expect("create certificates");
        let cluster_name = format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let dir = root.path().join(format!("node-{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            let at = place(id);
            if !at.cert_hosts.is_empty() {
                keel::cert::create_node(&certs, id, &at.cert_hosts, &keel::cert::CertOptions::default(), true)
                    .expect("node certificate");
            }
            nodes.insert(
                id,
                NodeProc {
                    id,
                    api_addr: at.api_addr,
                    raft_addr: at.raft_addr,
                    config: dir.join("keel.toml"),
                    dir,
                    child: std::sync::Mutex::new(None),
                    initial: true,
                    raft_listen: at.raft_listen,
                    netns: at.netns,
                },
            );
        }
        let members: String = nodes
            .values()
            .map(|p| format!("{}={}/{}", p.id, p.raft_addr, p.api_addr))
            .collect::<Vec<_>>()
            .join(",");
        for p in nodes.values() {
            write_config(p, &certs, &cluster_name);
        }
        let mut extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        extra_args.push(format!("--initial-members={members}"));
        let client = http_client(&certs, "client-dev.pem", "client-dev-key.pem");
        let admin = http_client(&certs, "admin-dev.pem", "admin-dev-key.pem");
        TestCluster {
            root,
            certs,
            cluster_name,
            nodes,
            client,
            admin,
            extra_args,
            env: Vec::new(),
        }
    }

    /// Prepares (certificate, config, directory; nothing started) a node
    /// that is not among the initial members, to join the cluster later.
    pub fn prepare_joiner(&mut self, id: u64) {
        assert!(!self.nodes.contains_key(&id), "node {id} exists");
        keel::cert::create_node(&self.certs, id, &[], &keel::cert::CertOptions::default(), true)
            .expect("node certificate");
        let dir = self.root.path().join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let p = NodeProc {
            id,
            api_addr: free_addr(),
            raft_addr: free_addr(),
            config: dir.join("keel.toml"),
            dir,
            child: std::sync::Mutex::new(None),
            initial: false,
            raft_listen: None,
            netns: None,
        };
        write_config(&p, &self.certs, &self.cluster_name);
        self.nodes.insert(id, p);
    }

    /// Starts node `id` (again) with its config and data.
    pub fn spawn(&self, id: u64) {
        self.spawn_with(id, &[]);
    }

    /// Starts node `id` with extra flags (e.g. `--join URL`). Nodes that are
    /// not initial members do not get `--initial-members`.
    pub fn spawn_with(&self, id: u64, args: &[&str]) {
        let p = &self.nodes[&id];
        let mut extra = self.extra_args.clone();
        // A node that joins (or is not an initial member) must not get the
        // initial member list: the two are exclusive.
        let joining = !p.initial || args.iter().any(|a| a.starts_with("--join"));
        extra.retain(|a| !(joining && a.starts_with("--initial-members")));
        extra.extend(args.iter().map(|a| a.to_string()));
        let mut slot = p.child.lock().unwrap();
        assert!(slot.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.log())
            .unwrap();
        // `ip netns exec` execs keel in place: the child's pid is keel's.
        let mut cmd = match &p.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_keel")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_keel")),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&p.config)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn keel");
        *slot = Some(child);
    }

    /// SIGKILL: the process dies at once, mid-whatever.
    pub fn kill(&self, id: u64) {
        if let Some(mut c) = self.nodes[&id].child.lock().unwrap().take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(&self, id: u64) -> std::process::ExitStatus {
        let mut c = self.nodes[&id].child.lock().unwrap().take().expect("node running");
        signal(c.id(), nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > WAIT {
                c.kill().ok();
                panic!("node {id} did not exit within {WAIT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status of node `id` if its process has ended on its own.
    pub fn exited(&self, id: u64) -> Option<std::process::ExitStatus> {
        self.nodes[&id]
            .child
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes.values().filter(|p| p.is_running()).map(|p| p.id).collect()
    }

    pub fn url(&self, id: u64, path: &str) -> String {
        format!("https://{}{path}", self.nodes[&id].api_addr)
    }

    pub fn log_tail(&self, id: u64) -> String {
        let s = std::fs::read_to_string(self.nodes[&id].log()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub async fn status(&self, id: u64) -> Option<StatusView> {
        let r = self
            .client
            .get(self.url(id, "/status"))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Waits until every running node names the same leader; returns it.
    pub async fn wait_leader(&self) -> u64 {
        self.wait_leader_among(&self.running()).await
    }

    pub async fn wait_leader_among(&self, ids: &[u64]) -> u64 {
        let start = Instant::now();
        loop {
            let mut seen = Vec::new();
            for id in ids {
                seen.push(self.status(*id).await.and_then(|s| s.leader_id));
            }
            if let Some(Some(l)) = seen.first()
                && seen.iter().all(|x| *x == Some(*l))
                && ids.contains(l)
            {
                return *l;
            }
            if start.elapsed() > WAIT {
                for id in ids {
                    eprintln!("--- node {id} log ---\n{}", self.log_tail(*id));
                }
                panic!("nodes {ids:?} did not agree on a live leader within {WAIT:?}: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every node in `ids` has applied at least `index`.
    pub async fn wait_applied(&self, ids: &[u64], index: u64) {
        let start = Instant::now();
        loop {
            let mut applied = Vec::new();
            for id in ids {
                let a = self.status(*id).await.map(|s| s.applied_index).unwrap_or(0);
                applied.push((*id, a));
            }
            if applied.iter().all(|(_, a)| *a >= index) {
                return;
            }
            if start.elapsed() > WAIT {
                for id in ids {
                    eprintln!("--- node {id} log ---\n{}", self.log_tail(*id));
                }
                panic!("nodes {ids:?} did not apply index {index} within {WAIT:?}: (node, applied) {applied:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn reply(r: reqwest::Response) -> Reply {
        let status = r.status().as_u16();
        let revision = r
            .headers()
            .get("x-keel-revision")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, body, revision }
    }

    /// PUT a JSON value; `Err` carries a transport error (outcome unknown).
    pub async fn put(&self, id: u64, key: &str, value: &Value) -> Result<Reply, String> {
        let r = self
            .client
            .put(self.url(id, &format!("/v1/kv/{key}")))
            .json(value)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self::reply(r).await)
    }

    pub async fn put_with(&self, id: u64, key: &str, value: &Value, header: (&str, &str)) -> Reply {
        let r = self
            .client
            .put(self.url(id, &format!("/v1/kv/{key}")))
            .header(header.0, header.1)
            .json(value)
            .send()
            .await
            .expect("request");
        Self::reply(r).await
    }

    pub async fn get(&self, id: u64, key: &str, stale: bool) -> Result<Reply, String> {
        let q = if stale { "?consistency=stale" } else { "" };
        let r = self
            .client
            .get(self.url(id, &format!("/v1/kv/{key}{q}")))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self::reply(r).await)
    }

    /// All `kv/` entries under `prefix` as key -> value, read from node `id`.
    pub async fn list(&self, id: u64, prefix: &str, stale: bool) -> BTreeMap<String, Value> {
        let c = if stale { "&consistency=stale" } else { "" };
        let r = self
            .client
            .get(self.url(id, &format!("/v1/kv?prefix={prefix}&limit=10000{c}")))
            .send()
            .await
            .expect("list request");
        let rep = Self::reply(r).await;
        assert_eq!(rep.status, 200, "list from node {id}: {:?}", rep.body);
        rep.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["key"].as_str().unwrap().to_string(), o["value"].clone()))
            .collect()
    }

    pub async fn state_hash(&self, id: u64) -> Value {
        let r = self
            .admin
            .get(self.url(id, "/admin/state-hash"))
            .send()
            .await
            .expect("state-hash");
        let rep = Self::reply(r).await;
        assert_eq!(rep.status, 200, "state hash from node {id}: {:?}", rep.body);
        rep.body
    }

    /// Waits until all `ids` report the same applied index, then returns
    /// their state hashes at that index (asserting they agree).
    pub async fn assert_converged(&self, ids: &[u64]) -> Value {
        let start = Instant::now();
        loop {
            let mut hashes = Vec::new();
            for id in ids {
                hashes.push(self.state_hash(*id).await);
            }
            let idx: Vec<u64> = hashes.iter().map(|h| h["applied_index"].as_u64().unwrap()).collect();
            if idx.iter().all(|i| *i == idx[0]) {
                for (id, h) in ids.iter().zip(&hashes) {
                    assert_eq!(
                        h, &hashes[0],
                        "node {id} state differs from node {} at index {}",
                        ids[0], idx[0]
                    );
                }
                return hashes[0].clone();
            }
            assert!(start.elapsed() < WAIT, "applied indexes never converged: {idx:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Writes the config file of node `p`.
fn write_config(p: &NodeProc, certs: &Path, cluster_name: &str) {
    let cfg = format!(
        "node_id = {}\ncluster_name = \"{cluster_name}\"\ndata_dir = \"{}\"\napi_listen = \"{}\"\nraft_listen = \"{}\"\nlog_level = \"info,openraft=warn\"\n\n[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 1000\nelection_timeout_max_ms = 2000\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        p.id,
        p.data_dir().display(),
        p.api_addr,
        p.raft_listen.as_ref().unwrap_or(&p.raft_addr),
        certs.join("ca.pem").display(),
        certs.join(format!("node-{}.pem", p.id)).display(),
        certs.join(format!("node-{}-key.pem", p.id)).display(),
    );
    let cfg = match &p.raft_listen {
        Some(_) => cfg.replacen(
            "\n\n[raft]",
            &format!("\nraft_advertise = \"{}\"\n\n[raft]", p.raft_addr),
            1,
        ),
        None => cfg,
    };
    std::fs::write(&p.config, cfg).unwrap();
}

impl TestCluster {
    /// An admin call to node `id`; `Err` carries a transport error.
    pub async fn admin_call(
        &self,
        id: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Reply, String> {
        let mut req = self
            .admin
            .request(method, self.url(id, path))
            .timeout(Duration::from_secs(45));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.map_err(|e| e.to_string())?;
        Ok(Self::reply(r).await)
    }

    /// `GET /admin/members` through node `id`, which must succeed.
    pub async fn members(&self, id: u64) -> Value {
        let r = self
            .admin_call(id, reqwest::Method::GET, "/admin/members", None)
            .await
            .expect("members request");
        assert_eq!(r.status, 200, "members via node {id}: {:?}", r.body);
        r.body
    }

    /// Waits until `/readyz` of node `id` answers 200.
    pub async fn wait_ready(&self, id: u64) {
        let start = Instant::now();
        loop {
            let ok = self
                .client
                .get(self.url(id, "/readyz"))
                .timeout(Duration::from_secs(3))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                return;
            }
            if start.elapsed() > WAIT {
                eprintln!("--- node {id} log ---\n{}", self.log_tail(id));
                panic!("node {id} not ready within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `cond` (every 100 ms) until it holds, panicking with `what` after [`WAIT`].
    pub async fn wait_until<F, Fut>(&self, what: &str, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !cond().await {
            if start.elapsed() > WAIT {
                for id in self.running() {
                    eprintln!("--- node {id} log ---\n{}", self.log_tail(id));
                }
                panic!("timed out after {WAIT:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `f` until it returns `Some`, within [`WAIT`]; returns the value.
    pub async fn wait_until_value<T, F, Fut>(&self, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if start.elapsed() > WAIT {
                for id in self.running() {
                    eprintln!("--- node {id} log ---\n{}", self.log_tail(id));
                }
                panic!("timed out after {WAIT:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes node `id`'s data directory (the node must be stopped).
    pub fn wipe(&self, id: u64) {
        assert!(!self.nodes[&id].is_running(), "stop node {id} before wiping it");
        let _ = std::fs::remove_dir_all(self.nodes[&id].data_dir());
    }
}

/// `promtool`: on PATH, or where scripts/prereqs-obs.sh puts it.
pub fn promtool_path() -> std::path::PathBuf {
    let on_path = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return "promtool".into();
    }
    let dir = std::env::var_os("KEEL_TOOLS_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/keel-tools")))
        .unwrap_or_default();
    let p = dir.join("bin/promtool");
    assert!(
        p.exists(),
        "promtool is not installed: run scripts/prereqs-obs.sh (it takes promtool from Debian's `prometheus` package)"
    );
    p
}

/// A log line without its terminal colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal a child we own");
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for p in self.nodes.values() {
            if let Some(mut c) = p.child.lock().unwrap().take() {
                c.kill().ok();
                c.wait().ok();
            }
        }
    }
}

//! Client-side command-line tools: an HTTPS client with the caller's
//! certificate, and `keel status`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use anyhow::anyhow;
use clap::Args;

use crate::cluster::StatusView;

/// How the CLI reaches and authenticates to a node.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// A node's API URL, e.g. https://127.0.0.1:7001.
    #[arg(long, env = "KEEL_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// A `cluster.json` written by `keel dev-cluster`: supplies the endpoint
    /// (first node) and certificate paths not given otherwise.
    #[arg(long, env = "KEEL_CLUSTER_FILE", global = true)]
    pub cluster_file: Option<PathBuf>,
    /// CA certificate (PEM).
    #[arg(long, env = "KEEL_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "KEEL_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "KEEL_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Use the admin certificate from the cluster file.
    #[arg(long, global = true)]
    pub admin: bool,
    /// Request timeout in seconds.
    #[arg(long, default_value_t = 10, global = true)]
    pub timeout_secs: u64,
}

/// A configured HTTP client plus the base URL.
pub struct ApiClient {
    /// The underlying client.
    pub http: reqwest::Client,
    /// Base URL, without a trailing slash.
    pub base: String,
}

impl ClientArgs {
    /// Builds the client, filling gaps from the cluster file.
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        let file = match &self.cluster_file {
            Some(p) => Some(crate::dev_cluster::ClusterFile::read(p)?),
            None => None,
        };
        let base = match (&self.endpoint, &file) {
            (Some(e), _) => e.trim_end_matches('/').to_string(),
            (None, Some(f)) => {
                let n = f.nodes.first().ok_or_else(|| anyhow!("cluster file lists no nodes"))?;
                format!("https://{}", n.api_addr)
            }
            (None, None) => return Err(anyhow!("give --endpoint or --cluster-file")),
        };
        let pick = |given: &Option<PathBuf>, from_file: Option<PathBuf>, what: &str| {
            given
                .clone()
                .or(from_file)
                .ok_or_else(|| anyhow!("--{what} is required for an https endpoint (or --cluster-file)"))
        };
        let http = if base.starts_with("http://") {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(self.timeout_secs))
                .build()?
        } else {
            let (fc, fk) = match &file {
                Some(f) if self.admin => (Some(f.admin_cert.clone()), Some(f.admin_key.clone())),
                Some(f) => (Some(f.client_cert.clone()), Some(f.client_key.clone())),
                None => (None, None),
            };
            let files = keel_raft::tls::TlsFiles {
                ca: pick(&self.ca, file.as_ref().map(|f| f.ca_cert.clone()), "ca")?,
                cert: pick(&self.cert, fc, "cert")?,
                key: pick(&self.key, fk, "key")?,
            };
            let tls = keel_raft::tls::TlsMaterial::load(&files)?.client_config(false)?;
            reqwest::Client::builder()
                .use_preconfigured_tls((*tls).clone())
                .timeout(Duration::from_secs(self.timeout_secs))
                .build()?
        };
        Ok(ApiClient { http, base })
    }
}

impl ApiClient {
    /// GETs `path` and decodes JSON, turning API errors into readable ones.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            return Err(anyhow!("GET {url}: {status}: {body}"));
        }
        serde_json::from_str(&body).with_context(|| format!("GET {url}: unexpected body {body:?}"))
    }
}

/// `keel status`.
pub async fn status(args: &ClientArgs, json: bool) -> anyhow::Result<()> {
    let client = args.client()?;
    let s: StatusView = client.get_json("/status").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("node {} is {} in term {}", s.node_id, s.role, s.term);
    match s.leader_id {
        Some(l) => println!("leader: node {l}"),
        None => println!("leader: none known"),
    }
    println!(
        "log: last {}  committed {}  applied {}",
        s.last_log_index, s.commit_index, s.applied_index
    );
    println!("{:<6} {:<8} {:<24} {:<24}", "ID", "ROLE", "API", "RAFT");
    for m in &s.members {
        println!("{:<6} {:<8} {:<24} {:<24}", m.id, m.role, m.api_addr, m.raft_addr);
    }
    Ok(())
}

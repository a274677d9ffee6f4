//! `keel worker|policy|ratelimit|watch`: the control-plane resources from
//! the command line. Each prints the API's JSON answer; errors print the
//! API's error message and exit non-zero.

use anyhow::anyhow;
use clap::Subcommand;
use serde_json::Value;
use serde_json::json;

use crate::cli::ApiClient;
use crate::cli::ClientArgs;

/// `keel worker ...`
#[derive(Debug, Subcommand)]
pub enum WorkerCmd {
    /// List workers, optionally filtered.
    List {
        /// Only workers serving this model.
        #[arg(long)]
        model: Option<String>,
        /// Only workers with this label (key=value).
        #[arg(long)]
        label: Option<String>,
        /// Only workers in this health status.
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one worker.
    Get {
        /// Worker id.
        id: String,
    },
    /// Register or replace a worker.
    Put {
        /// Worker id.
        id: String,
        /// Base URL.
        #[arg(long)]
        url: String,
        /// Model served (repeatable).
        #[arg(long = "model")]
        models: Vec<String>,
        /// Label key=value (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// regular, prefill or decode.
        #[arg(long, default_value = "regular")]
        worker_type: String,
        /// Lease length in ms (renew with heartbeats).
        #[arg(long)]
        lease_ttl_ms: Option<u64>,
    },
    /// Remove a worker.
    Rm {
        /// Worker id.
        id: String,
    },
}

/// `keel policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// List policies.
    List,
    /// Show one policy.
    Get {
        /// Policy name.
        name: String,
    },
    /// Create or replace a policy from JSON, e.g. '{"kind":"round_robin"}'.
    Put {
        /// Policy name.
        name: String,
        /// The policy as JSON.
        json: String,
    },
    /// Remove a policy.
    Rm {
        /// Policy name.
        name: String,
    },
}

/// `keel ratelimit ...`
#[derive(Debug, Subcommand)]
pub enum RateLimitCmd {
    /// List rate limits.
    List,
    /// Show one rate limit.
    Get {
        /// Name.
        name: String,
    },
    /// Create or replace a rate limit from JSON, e.g.
    /// '{"kind":"token_bucket","capacity":100,"refill_per_sec":10}'.
    Put {
        /// Name.
        name: String,
        /// The limit as JSON.
        json: String,
    },
    /// Take tokens.
    Acquire {
        /// Name.
        name: String,
        /// Tokens to take.
        #[arg(long, default_value_t = 1)]
        tokens: u64,
        /// Tenant key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Remove a rate limit.
    Rm {
        /// Name.
        name: String,
    },
}

async fn call(c: &ApiClient, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let mut r = c.http.request(method.clone(), format!("{}{path}", c.base));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.map_err(|e| anyhow!("{method} {path}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let msg = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string());
        return Err(anyhow!("{method} {path}: {status}: {msg}"));
    }
    Ok(v)
}

fn print(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn parse_json(s: &str) -> anyhow::Result<Value> {
    serde_json::from_str(s).map_err(|e| anyhow!("not valid JSON: {e}"))
}

/// Runs `keel worker ...`.
pub async fn worker(args: &ClientArgs, cmd: WorkerCmd) -> anyhow::Result<()> {
    let c = args.client()?;
    use reqwest::Method as M;
    let v = match cmd {
        WorkerCmd::List { model, label, status } => {
            let mut q = Vec::new();
            for (k, v) in [("model", model), ("label", label), ("status", status)] {
                if let Some(v) = v {
                    q.push(format!("{k}={v}"));
                }
            }
            call(&c, M::GET, &format!("/v1/workers?{}", q.join("&")), None).await?
        }
        WorkerCmd::Get { id } => call(&c, M::GET, &format!("/v1/workers/{id}"), None).await?,
        WorkerCmd::Put {
            id,
            url,
            models,
            labels,
            worker_type,
            lease_ttl_ms,
        } => {
            let labels: serde_json::Map<String, Value> = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), json!(v)))
                        .ok_or_else(|| anyhow!("--label {l:?}: expected key=value"))
                })
                .collect::<anyhow::Result<_>>()?;
            let mut body = json!({"url": url, "models": models, "labels": labels, "worker_type": worker_type});
            if let Some(t) = lease_ttl_ms {
                body["lease_ttl_ms"] = json!(t);
            }
            call(&c, M::PUT, &format!("/v1/workers/{id}"), Some(body)).await?
        }
        WorkerCmd::Rm { id } => call(&c, M::DELETE, &format!("/v1/workers/{id}"), None).await?,
    };
    print(&v)
}

/// Runs `keel policy ...`.
pub async fn policy(args: &ClientArgs, cmd: PolicyCmd) -> anyhow::Result<()> {
    let c = args.client()?;
    use reqwest::Method as M;
    let v = match cmd {
        PolicyCmd::List => call(&c, M::GET, "/v1/policies", None).await?,
        PolicyCmd::Get { name } => call(&c, M::GET, &format!("/v1/policies/{name}"), None).await?,
        PolicyCmd::Put { name, json } => {
            call(&c, M::PUT, &format!("/v1/policies/{name}"), Some(parse_json(&json)?)).await?
        }
        PolicyCmd::Rm { name } => call(&c, M::DELETE, &format!("/v1/policies/{name}"), None).await?,
    };
    print(&v)
}

/// Runs `keel ratelimit ...`.
pub async fn ratelimit(args: &ClientArgs, cmd: RateLimitCmd) -> anyhow::Result<()> {
    let c = args.client()?;
    use reqwest::Method as M;
    let v = match cmd {
        RateLimitCmd::List => call(&c, M::GET, "/v1/ratelimits", None).await?,
        RateLimitCmd::Get { name } => call(&c, M::GET, &format!("/v1/ratelimits/{name}"), None).await?,
        RateLimitCmd::Put { name, json } => {
            call(&c, M::PUT, &format!("/v1/ratelimits/{name}"), Some(parse_json(&json)?)).await?
        }
        RateLimitCmd::Acquire { name, tokens, key } => {
            let body = json!({"tokens": tokens, "key": key});
            call(&c, M::POST, &format!("/v1/ratelimits/{name}/acquire"), Some(body)).await?
        }
        RateLimitCmd::Rm { name } => call(&c, M::DELETE, &format!("/v1/ratelimits/{name}"), None).await?,
    };
    print(&v)
}

/// Runs `keel watch`: prints one JSON line per change until interrupted
/// (or after `max_events`).
pub async fn watch(args: &ClientArgs, prefix: &str, from: Option<u64>, max_events: Option<u64>) -> anyhow::Result<()> {
    use futures::StreamExt;
    let c = args.client()?;
    let mut url = format!("{}/v1/watch?prefix={prefix}", c.base);
    if let Some(f) = from {
        url.push_str(&format!("&from_revision={f}"));
    }
    let resp = c
        .http
        .get(&url)
        .timeout(std::time::Duration::from_secs(365 * 86_400))
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(anyhow!(
            "GET {url}: {status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut n = 0;
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            if let Some(d) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                println!("{}", d.trim());
                n += 1;
                if max_events.is_some_and(|m| n >= m) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

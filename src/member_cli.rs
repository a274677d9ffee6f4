//! Operator commands for membership and leadership (`keel member …`,
//! `keel leader transfer`) over the admin API, and the offline quorum-loss
//! recovery `keel recover --force-new-cluster`.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::Context;
use anyhow::anyhow;
use anyhow::bail;
use clap::Args;
use clap::Subcommand;
use keel_raft::KeelNode;
use keel_storage::NoHooks;
use keel_storage::types::Entry;
use keel_storage::types::LogId;
use keel_storage::types::Vote;
use openraft::Membership;
use openraft::RaftLogReader;
use openraft::entry::RaftEntry;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use reqwest::Method;
use serde_json::Value;
use serde_json::json;

use crate::cli::ClientArgs;
use crate::config::Config;
use crate::config::ServeArgs;
use crate::membership::MembersView;

/// `keel member …`
#[derive(Debug, Subcommand)]
pub enum MemberCmd {
    /// List members with role, addresses, replication progress and reachability.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a node as a learner; it starts receiving the log.
    Add {
        #[command(flatten)]
        client: ClientArgs,
        /// The new node's id (never reuse the id of a node that still has its data).
        #[arg(long)]
        id: u64,
        /// Its advertised peer address, host:port.
        #[arg(long)]
        raft_addr: String,
        /// Its advertised API address, host:port.
        #[arg(long)]
        api_addr: String,
        /// Only if the membership is still this one (`membership_log_id` from `member list`).
        #[arg(long)]
        if_match: Option<String>,
    },
    /// Make a caught-up learner a voter.
    Promote {
        #[command(flatten)]
        client: ClientArgs,
        /// The learner's id.
        id: u64,
        /// Skip the quorum check.
        #[arg(long)]
        force: bool,
        /// Only if the membership is still this one.
        #[arg(long)]
        if_match: Option<String>,
    },
    /// Remove a voter or learner from the cluster.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        /// The member's id.
        id: u64,
        /// Skip the quorum check.
        #[arg(long)]
        force: bool,
        /// Only if the membership is still this one.
        #[arg(long)]
        if_match: Option<String>,
    },
}

/// `keel leader …`
#[derive(Debug, Subcommand)]
pub enum LeaderCmd {
    /// Hand leadership to a voter (by default the most caught-up one) and
    /// wait until it leads.
    Transfer {
        #[command(flatten)]
        client: ClientArgs,
        /// The new leader's id.
        #[arg(long)]
        to: Option<u64>,
    },
}

/// `keel recover`
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Required: make this node the only member of a new one-node cluster,
    /// keeping its data. UNSAFE: see the README before using it.
    #[arg(long)]
    pub force_new_cluster: bool,
    /// The stopped node's configuration (the same flags as `serve`).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Sends an admin call and returns the JSON answer, or an error naming the
/// API's error code and message.
async fn call(
    client: &ClientArgs,
    method: Method,
    path: &str,
    body: Option<Value>,
    if_match: Option<&str>,
) -> anyhow::Result<Value> {
    let mut args = client.clone();
    // Membership calls need the admin certificate of a cluster file.
    args.admin = true;
    let c = args.client()?;
    let url = format!("{}{path}", c.base);
    let mut req = c.http.request(method.clone(), &url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    if let Some(m) = if_match {
        req = req.header("if-match", m);
    }
    let resp = req.send().await.with_context(|| format!("{method} {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if !status.is_success() {
        let e = &v["error"];
        let mut msg = format!(
            "{status}: {}: {}",
            e["code"].as_str().unwrap_or("?"),
            e["message"].as_str().unwrap_or(&text)
        );
        if let Some(obj) = e.as_object() {
            for (k, val) in obj.iter().filter(|(k, _)| *k != "code" && *k != "message") {
                msg.push_str(&format!("\n  {k}: {val}"));
            }
        }
        return Err(anyhow!(msg));
    }
    Ok(v)
}

fn print_change(what: &str, v: &Value) {
    let changed = v["changed"].as_bool().unwrap_or(false);
    println!(
        "{what}: {} (membership {})",
        if changed { "done" } else { "nothing to change" },
        v["membership_log_id"].as_str().unwrap_or("?")
    );
}

/// Runs `keel member …`.
pub async fn member(cmd: MemberCmd) -> anyhow::Result<()> {
    match cmd {
        MemberCmd::List { client, json } => {
            let v = call(&client, Method::GET, "/admin/members", None, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let m: MembersView = serde_json::from_value(v)?;
            println!(
                "membership {} ({}{}), leader node {} in term {}, last log index {}",
                m.membership_log_id,
                if m.committed { "committed" } else { "not yet committed" },
                if m.joint { ", joint" } else { "" },
                m.leader_id,
                m.term,
                m.last_log_index
            );
            println!(
                "{:<6} {:<8} {:<22} {:<22} {:>10} {:>8} {:>10}",
                "ID", "ROLE", "API", "RAFT", "MATCHED", "LAG", "LAST ACK"
            );
            for x in &m.members {
                let role = if x.leader { "leader" } else { &x.role };
                let ack = match (x.reachable, x.last_ack_ms) {
                    (_, None) => "never".to_string(),
                    (true, Some(ms)) => format!("{ms} ms"),
                    (false, Some(ms)) => format!("{ms} ms (!)"),
                };
                println!(
                    "{:<6} {:<8} {:<22} {:<22} {:>10} {:>8} {:>10}",
                    x.id,
                    role,
                    x.api_addr,
                    x.raft_addr,
                    x.matched_index.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
                    x.lag,
                    ack
                );
            }
        }
        MemberCmd::Add {
            client,
            id,
            raft_addr,
            api_addr,
            if_match,
        } => {
            let body = json!({"id": id, "raft_addr": raft_addr, "api_addr": api_addr});
            let v = call(&client, Method::POST, "/admin/members", Some(body), if_match.as_deref()).await?;
            print_change(&format!("add learner {id}"), &v);
        }
        MemberCmd::Promote {
            client,
            id,
            force,
            if_match,
        } => {
            let path = format!("/admin/members/{id}/promote{}", if force { "?force=true" } else { "" });
            let v = call(&client, Method::POST, &path, None, if_match.as_deref()).await?;
            print_change(&format!("promote {id}"), &v);
        }
        MemberCmd::Remove {
            client,
            id,
            force,
            if_match,
        } => {
            let path = format!("/admin/members/{id}{}", if force { "?force=true" } else { "" });
            let v = call(&client, Method::DELETE, &path, None, if_match.as_deref()).await?;
            print_change(&format!("remove {id}"), &v);
        }
    }
    Ok(())
}

/// Runs `keel leader …`.
pub async fn leader(cmd: LeaderCmd) -> anyhow::Result<()> {
    match cmd {
        LeaderCmd::Transfer { client, to } => {
            let v = call(
                &client,
                Method::POST,
                "/admin/transfer-leader",
                Some(json!({ "to": to })),
                None,
            )
            .await?;
            if v["changed"].as_bool() == Some(false) {
                println!("node {} already leads", v["leader_id"]);
            } else {
                println!(
                    "leadership moved from node {} to node {} in {} ms",
                    v["previous_leader_id"], v["leader_id"], v["elapsed_ms"]
                );
            }
        }
    }
    Ok(())
}

/// Runs `keel recover`.
pub async fn recover(args: RecoverArgs) -> anyhow::Result<()> {
    if !args.force_new_cluster {
        bail!("keel recover needs --force-new-cluster (the only recovery it performs); read the README first");
    }
    let config = Config::load(&args.serve)?;
    let summary = force_new_cluster(&config).await?;
    println!("{summary}");
    Ok(())
}

/// Makes the (stopped) node of `config` the only voter of its cluster,
/// keeping every entry of its log.
///
/// It appends one membership entry `{voters: [self], nodes: [self]}` after
/// the last entry, in a new term led by this node, and records a vote for
/// that term. On start the node is the only voter of its effective
/// membership, elects itself, and its first commit commits that entry and
/// everything before it. Entries the old cluster had not committed are kept
/// and become committed: nothing this node holds is thrown away.
pub async fn force_new_cluster(config: &Config) -> anyhow::Result<String> {
    let storage = keel_storage::open(&config.data_dir, &config.cluster_name, Arc::new(NoHooks))
        .await
        .with_context(|| {
            format!(
                "opening {} (is the node still running? stop it first)",
                config.data_dir.display()
            )
        })?;
    let mut log = storage.log;
    if log.is_pristine()? {
        bail!(
            "{} holds no log: there is nothing to recover; start a new cluster instead",
            config.data_dir.display()
        );
    }
    let state = log.get_log_state().await?;
    let last = state
        .last_log_id
        .ok_or_else(|| anyhow!("the log holds a vote but no entry: nothing to recover"))?;
    let vote = log.read_vote().await?;
    let term = vote.map(|v| v.leader_id.term).unwrap_or(0).max(last.leader_id.term) + 1;
    let me = config.node_id;
    let node = KeelNode {
        raft_addr: config.raft_advertise.clone(),
        api_addr: config.api_advertise.clone(),
    };
    let membership = Membership::new(vec![BTreeSet::from([me])], BTreeMap::from([(me, node)]))
        .map_err(|e| anyhow!("building the one-node membership: {e}"))?;
    let log_id = LogId::new(LeaderId { term, node_id: me }, last.index + 1);
    let entry = Entry::new_membership(log_id, membership);
    log.append([entry], IOFlushed::noop()).await?;
    // A synced write: it also makes the entry above durable (one WAL).
    log.save_vote(&Vote::new(term, me)).await?;
    drop(log);
    Ok(format!(
        "node {me} is now the only member of cluster {:?}: membership entry at index {} in term {term}, \
         keeping the log up to index {}.\nStart it with `keel serve`, check it with `keel member list`, then \
         add new nodes (new ids, empty data directories) with `keel serve --join` or `keel member add`.",
        config.cluster_name,
        last.index + 1,
        last.index
    ))
}

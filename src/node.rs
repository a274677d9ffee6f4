//! Wiring of one node: storage, Raft, the peer and API servers, bootstrap,
//! and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use keel_raft::KeelNode;
use keel_raft::Raft;
use keel_raft::client::NetworkFactory;
use keel_raft::client::PeerPool;
use keel_raft::serve::ConnInfo;
use keel_raft::serve::ServeOptions;
use keel_raft::server::PeerService;
use keel_raft::tls::Identity;
use keel_raft::tls::TlsMaterial;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::membership;

/// Builds openraft's configuration from ours.
fn raft_config(c: &Config) -> anyhow::Result<openraft::Config> {
    let rc = openraft::Config {
        cluster_name: c.cluster_name.clone(),
        heartbeat_interval: c.heartbeat_ms,
        election_timeout_min: c.election_timeout_ms.0,
        election_timeout_max: c.election_timeout_ms.1,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_every),
        max_in_snapshot_log_to_keep: c.keep_after_snapshot,
        // A node that cannot win an election must not bump terms and
        // disrupt a healthy leader.
        enable_pre_vote: Some(true),
        // A leader that restarts campaigns like any other node; it does not
        // take its old term back. It may have answered clients for entries
        // whose commit it never stored (the commit index is stored with the
        // next append), and its state machine restarts from its last flush:
        // a restored leader would compute read indexes from that stale
        // commit index and serve reads that miss acknowledged writes. A new
        // term's first entry commits everything before it.
        // (`tests/cluster_core.rs`: a killed single node restarted at once.)
        enable_leader_restore: Some(false),
        install_snapshot_timeout: 60_000,
        ..Default::default()
    };
    rc.validate().context("invalid raft settings")
}

/// Runs a node until SIGTERM or SIGINT, then shuts it down gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let material = match &config.tls {
        Some(files) => {
            let m = TlsMaterial::load(files)?;
            match m.identity()? {
                Identity::Node(id) if id == config.node_id => {}
                other => bail!(
                    "certificate {} names {other}, but this node's id is {}; use the certificate made for node {}",
                    files.cert.display(),
                    config.node_id,
                    config.node_id
                ),
            }
            Some(m)
        }
        None => {
            tracing::warn!(
                "RUNNING WITHOUT TLS (--insecure): anyone who can reach the ports can read and write all data and \
                 inject Raft messages. Never use this outside an isolated test machine."
            );
            None
        }
    };

    let storage = keel_storage::open(
        &config.data_dir,
        &config.cluster_name,
        Arc::new(crate::metrics::StorageMetrics),
    )
    .await
    .map_err(anyhow::Error::new)?;
    let pristine = storage.log.is_pristine()?;
    let led_before =
        (storage.log.stored_vote()?).filter(|v| keel_raft::failover::led_before_restart(v, config.node_id));
    let purged = storage.log.purged();
    let reader = storage.reader.clone();

    let client_tls = material.as_ref().map(|m| m.client_config(true)).transpose()?;
    let api_client_tls = material.as_ref().map(|m| m.client_config(false)).transpose()?;
    let pool = PeerPool::new(
        config.node_id,
        &config.cluster_name,
        client_tls,
        Arc::new(crate::metrics::NetMetrics),
    );
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config(&config)?),
        NetworkFactory::new(pool.clone()).with_purged(purged),
        storage.log.with_local_node(config.node_id),
        storage.state_machine,
    )
    .await
    .context("starting raft")?;

    let raft_listener = TcpListener::bind(config.raft_listen)
        .await
        .with_context(|| format!("binding the peer port {}", config.raft_listen))?;
    let api_listener = TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the API port {}", config.api_listen))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // The peer port stops last, after Raft: in-flight client requests may
    // still need it to reach the leader, and its long-lived replication
    // streams only end once Raft has stopped.
    let (peer_stop_tx, peer_stop_rx) = watch::channel(false);

    let cluster = Cluster::new(
        config.node_id,
        raft.clone(),
        reader,
        pool.clone(),
        config.request_timeout,
    );
    let watch = crate::watch::WatchHub::start(cluster.reader().clone());
    crate::observe::spawn(cluster.clone(), &config.cluster_name);
    let router = api::router(api::ApiState {
        cluster: cluster.clone(),
        insecure: config.insecure,
        watch,
    });
    let contact = Arc::new(keel_raft::failover::LeaderContact::default());
    let peer = Arc::new(PeerService {
        raft: raft.clone(),
        node_id: config.node_id,
        cluster: config.cluster_name.clone(),
        insecure: config.insecure,
        incoming_dir: keel_storage::snapshot::incoming_dir(&config.data_dir),
        hooks: Arc::new(crate::metrics::NetMetrics),
        inbox: Default::default(),
        contact: contact.clone(),
        api_forward: Some(Arc::new(membership::Forwarder::new(router.clone()))),
    });
    let peer_tls = material.as_ref().map(|m| m.peer_server_config()).transpose()?;
    let peer_task = tokio::spawn(keel_raft::serve::serve(
        raft_listener,
        peer_tls,
        move |conn: ConnInfo| {
            let peer = peer.clone();
            hyper::service::service_fn(move |req| peer.clone().handle(conn.clone(), req))
        },
        peer_stop_rx,
        ServeOptions::default(),
    ));

    tokio::spawn(crate::expiry::run(cluster.clone(), stop_rx.clone()));
    tokio::spawn(keel_raft::failover::watch_leader(
        raft.clone(),
        config.node_id,
        contact,
        Duration::from_millis(config.heartbeat_ms),
        stop_rx.clone(),
    ));
    if let Some(led) = led_before {
        let (raft, pool, me) = (raft.clone(), pool.clone(), config.node_id);
        tokio::spawn(async move { keel_raft::failover::campaign_after_restart(&raft, pool, me, led).await });
    }
    let api_tls = material.as_ref().map(|m| m.api_server_config()).transpose()?;
    let api_task = tokio::spawn(keel_raft::serve::serve(
        api_listener,
        api_tls,
        move |conn: ConnInfo| {
            hyper_util::service::TowerToHyperService::new(router.clone().layer(axum::Extension(conn)))
        },
        stop_rx,
        ServeOptions::default(),
    ));

    tracing::info!(
        node_id = config.node_id,
        api = %config.api_advertise,
        raft = %config.raft_advertise,
        cluster = %config.cluster_name,
        "node started"
    );
    bootstrap(&config, &raft, pristine).await?;
    if let Some(url) = &config.join {
        let plan = membership::JoinPlan {
            url: url.clone(),
            id: config.node_id,
            raft_addr: config.raft_advertise.clone(),
            api_addr: config.api_advertise.clone(),
            auto_promote: config.auto_promote,
            tls: api_client_tls,
        };
        tokio::spawn(membership::join_loop(plan, cluster.clone()));
    }

    tokio::select! {
        _ = wait_for_signal() => {}
        _ = cluster.shutdown_requested() => {}
    }
    tracing::info!("shutting down: no longer ready, handing off leadership, draining requests");
    cluster.begin_shutdown();
    membership::hand_off(&cluster).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), api_task).await;
    raft.shutdown().await.context("stopping raft")?;
    let _ = peer_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), peer_task).await;
    tracing::info!("stopped");
    Ok(())
}

/// Forms a new cluster on first start: the lowest-id initial member
/// initializes it, once, and only from an empty log. Restarts and the other
/// members do nothing here: they learn the membership from the leader.
async fn bootstrap(config: &Config, raft: &Raft, pristine: bool) -> anyhow::Result<()> {
    if !pristine {
        tracing::info!("data directory holds a log: rejoining with it");
        return Ok(());
    }
    let Some(first) = config.initial_members.keys().next() else {
        tracing::info!("no initial members: waiting to be added to a cluster (--join, or an operator's add)");
        return Ok(());
    };
    if !config.initial_members.contains_key(&config.node_id) {
        bail!(
            "node {} is not among initial_members {:?}; add it there or start it with --join",
            config.node_id,
            config.initial_members.keys().collect::<Vec<_>>()
        );
    }
    if *first != config.node_id {
        tracing::info!(
            initializer = first,
            "waiting for the initial member with the lowest id to form the cluster"
        );
        return Ok(());
    }
    let members: std::collections::BTreeMap<u64, KeelNode> = config
        .initial_members
        .values()
        .map(|m| {
            (
                m.id,
                KeelNode {
                    raft_addr: m.raft_addr.clone(),
                    api_addr: m.api_addr.clone(),
                },
            )
        })
        .collect();
    match raft.initialize(members).await {
        Ok(()) => tracing::info!("cluster initialized"),
        Err(openraft::errors::RaftError::APIError(openraft::errors::InitializeError::NotAllowed(e))) => {
            tracing::info!(reason = %e, "cluster already initialized");
        }
        Err(e) => return Err(anyhow::Error::new(e).context("initializing the cluster")),
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::SignalKind;
    use tokio::signal::unix::signal;
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

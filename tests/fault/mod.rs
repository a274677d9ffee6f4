//! The fault-injection suite's machinery: private networks with kernel-made
//! partitions ([`net`]), a linearizability checker ([`lin`]) and recorded
//! clients with the checks run after each scenario ([`run`]).

pub mod lin;
pub mod net;
pub mod proxy;
pub mod run;

use std::sync::Arc;

use crate::common::Placement;
use crate::common::TestCluster;

/// Ports every node uses on its own address.
const API_PORT: u16 = 7000;
pub const RAFT_PORT: u16 = 7001;

/// A cluster whose nodes each run in their own network namespace.
/// Field order matters: the nodes stop before their network is removed.
pub struct NetCluster {
    pub c: Arc<TestCluster>,
    pub net: net::Net,
    /// Proxies in front of the peer ports (see [`start_proxied`]); they
    /// run until dropped.
    _proxies: Vec<proxy::Proxy>,
    pub impair: Arc<proxy::Impair>,
}

/// Prepares (nothing started) `n` nodes in namespaces, with `env` for
/// every node process.
pub fn prepare(n: u64, extra: &[&str], env: &[(&str, &str)]) -> NetCluster {
    if let Err(e) = net::available() {
        panic!(
            "the fault suite needs network namespaces (root and iproute2's `ip`): {e}; \
             run it as root, or skip it with `cargo test -- --skip faults`"
        );
    }
    let net = net::Net::new(n);
    let mut c = TestCluster::prepare_placed(n, extra, |id| Placement {
        api_addr: format!("{}:{API_PORT}", net.host(id)),
        raft_addr: format!("{}:{RAFT_PORT}", net.host(id)),
        raft_listen: None,
        netns: Some(net.netns(id)),
        cert_hosts: vec![net.host(id)],
    });
    c.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    NetCluster {
        c: Arc::new(c),
        net,
        _proxies: Vec::new(),
        impair: Arc::default(),
    }
}

/// A started cluster whose peer traffic into every node crosses a proxy
/// ([`proxy`]) on the bridge, impaired through `impair`.
pub async fn start_proxied(n: u64, extra: &[&str]) -> NetCluster {
    let net = net::Net::new(n);
    let gw = net.gateway();
    let mut c = TestCluster::prepare_placed(n, extra, |id| Placement {
        api_addr: format!("{}:{API_PORT}", net.host(id)),
        raft_addr: format!("{gw}:{}", RAFT_PORT + 100 + id as u16),
        raft_listen: Some(format!("{}:{RAFT_PORT}", net.host(id))),
        netns: Some(net.netns(id)),
        cert_hosts: vec![net.host(id), gw.clone()],
    });
    c.env = Vec::new();
    let impair: Arc<proxy::Impair> = Arc::default();
    let mut proxies = Vec::new();
    for id in 1..=n {
        let listen = c.nodes[&id].raft_addr.clone();
        let target = format!("{}:{RAFT_PORT}", net.host(id));
        proxies.push(proxy::start(&listen, target, impair.clone()).await);
    }
    for id in 1..=n {
        c.spawn(id);
    }
    NetCluster {
        c: Arc::new(c),
        net,
        _proxies: proxies,
        impair,
    }
}

/// Like [`prepare`], with every node started.
pub fn start(n: u64, extra: &[&str], env: &[(&str, &str)]) -> NetCluster {
    let nc = prepare(n, extra, env);
    for id in 1..=n {
        nc.c.spawn(id);
    }
    nc
}

/// True when the long set was asked for (`KEEL_FAULTS=long`).
pub fn long() -> bool {
    std::env::var("KEEL_FAULTS").is_ok_and(|v| v == "long")
}

/// Appends a scenario's result line to `$KEEL_FAULT_REPORT`, if set (the
/// test script prints the file after the run).
pub fn report(line: &str) {
    if let Some(path) = std::env::var_os("KEEL_FAULT_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

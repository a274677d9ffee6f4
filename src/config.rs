//! Node configuration: one TOML file, every key overridable by a flag and a
//! `KEEL_…` environment variable (flag > environment > file > default),
//! validated into a [`Config`] with errors that name the key at fault.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use anyhow::anyhow;
use anyhow::bail;
use clap::Args;
use serde::Deserialize;
use serde::Serialize;

/// One member of the initial cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberAddr {
    /// Node id (never reused).
    pub id: u64,
    /// Advertised peer (Raft) address, `host:port`.
    pub raft_addr: String,
    /// Advertised client API address, `host:port`.
    pub api_addr: String,
}

/// Raft timing and log-compaction settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftFile {
    /// Leader heartbeat interval in milliseconds.
    pub heartbeat_ms: Option<u64>,
    /// Lower bound of the randomized election timeout, milliseconds.
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the randomized election timeout, milliseconds.
    pub election_timeout_max_ms: Option<u64>,
    /// Build a snapshot after this many new log entries.
    pub snapshot_every: Option<u64>,
    /// Log entries kept after a snapshot (for slow followers).
    pub keep_after_snapshot: Option<u64>,
}

/// TLS file paths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The cluster CA certificate (PEM).
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM), naming `keel://node/<id>`.
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key: Option<PathBuf>,
}

/// The TOML file as written by operators; every key optional here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// This node's id.
    pub node_id: Option<u64>,
    /// Name shared by every node of the cluster; a data directory or peer of
    /// another cluster is refused.
    pub cluster_name: Option<String>,
    /// Data directory (created with mode 0700).
    pub data_dir: Option<PathBuf>,
    /// Client API listen address.
    pub api_listen: Option<String>,
    /// Client API address other nodes and clients use.
    pub api_advertise: Option<String>,
    /// Peer port listen address.
    pub raft_listen: Option<String>,
    /// Peer port address other nodes use.
    pub raft_advertise: Option<String>,
    /// Members of a new cluster (ignored once the data directory holds a log).
    pub initial_members: Option<Vec<MemberAddr>>,
    /// URL of any member of an existing cluster to join.
    pub join: Option<String>,
    /// With `join`: become a voter once caught up (otherwise stay a learner
    /// until an operator promotes this node).
    pub auto_promote: Option<bool>,
    /// Serve without TLS (testing only).
    pub insecure: Option<bool>,
    /// How long a client request may wait for a leader, milliseconds.
    pub request_timeout_ms: Option<u64>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// A tracing filter, e.g. `info` or `keel=debug,openraft=info`.
    pub log_level: Option<String>,
    /// Threads of the node's event loop: 1 (the default) runs every task on
    /// one thread, 0 one per CPU, N > 1 that many. Fsyncs, RocksDB's own
    /// work and snapshot file work run on threads of their own either way.
    pub worker_threads: Option<usize>,
    /// Raft settings.
    #[serde(default)]
    pub raft: RaftFile,
    /// TLS settings.
    #[serde(default)]
    pub tls: TlsFile,
}

/// Flags of `keel serve`; each also reads a `KEEL_…` environment variable.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short, env = "KEEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node id.
    #[arg(long, env = "KEEL_NODE_ID")]
    pub node_id: Option<u64>,
    /// Cluster name.
    #[arg(long, env = "KEEL_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Data directory.
    #[arg(long, env = "KEEL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client API listen address.
    #[arg(long, env = "KEEL_API_LISTEN")]
    pub api_listen: Option<String>,
    /// Client API advertised address.
    #[arg(long, env = "KEEL_API_ADVERTISE")]
    pub api_advertise: Option<String>,
    /// Peer listen address.
    #[arg(long, env = "KEEL_RAFT_LISTEN")]
    pub raft_listen: Option<String>,
    /// Peer advertised address.
    #[arg(long, env = "KEEL_RAFT_ADVERTISE")]
    pub raft_advertise: Option<String>,
    /// Initial members: `ID=RAFT_ADDR/API_ADDR`, comma separated.
    #[arg(long, env = "KEEL_INITIAL_MEMBERS")]
    pub initial_members: Option<String>,
    /// Join an existing cluster through this member's API URL.
    #[arg(long, env = "KEEL_JOIN")]
    pub join: Option<String>,
    /// With --join: become a voter once caught up.
    #[arg(long, env = "KEEL_AUTO_PROMOTE", num_args = 0..=1, default_missing_value = "true")]
    pub auto_promote: Option<bool>,
    /// Serve without TLS. Anyone who can reach the ports can read, write and
    /// inject Raft messages: for tests on an isolated machine only.
    #[arg(long, env = "KEEL_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// Client request timeout in milliseconds.
    #[arg(long, env = "KEEL_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "KEEL_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter.
    #[arg(long, env = "KEEL_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Event-loop threads: 1 (default), 0 for one per CPU, or N.
    #[arg(long, env = "KEEL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Heartbeat interval, ms.
    #[arg(long, env = "KEEL_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Election timeout lower bound, ms.
    #[arg(long, env = "KEEL_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Election timeout upper bound, ms.
    #[arg(long, env = "KEEL_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Snapshot every N entries (default 100,000, as etcd's snapshot-count).
    #[arg(long, env = "KEEL_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Entries kept after a snapshot.
    #[arg(long, env = "KEEL_KEEP_AFTER_SNAPSHOT")]
    pub keep_after_snapshot: Option<u64>,
    /// CA certificate.
    #[arg(long, env = "KEEL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Node certificate.
    #[arg(long, env = "KEEL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Node private key.
    #[arg(long, env = "KEEL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id.
    pub node_id: u64,
    /// Cluster name.
    pub cluster_name: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Client API listen address.
    pub api_listen: SocketAddr,
    /// Client API advertised address.
    pub api_advertise: String,
    /// Peer listen address.
    pub raft_listen: SocketAddr,
    /// Peer advertised address.
    pub raft_advertise: String,
    /// Members of a new cluster, by id.
    pub initial_members: BTreeMap<u64, MemberAddr>,
    /// API URL of a member to join through.
    pub join: Option<String>,
    /// Ask to become a voter once caught up (with `join`).
    pub auto_promote: bool,
    /// No TLS.
    pub insecure: bool,
    /// Client request timeout.
    pub request_timeout: Duration,
    /// Log format is JSON.
    pub log_json: bool,
    /// Log filter.
    pub log_level: String,
    /// Event-loop threads: 1 is a single-threaded loop, 0 one per CPU.
    pub worker_threads: usize,
    /// Heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Election timeout bounds, ms.
    pub election_timeout_ms: (u64, u64),
    /// Snapshot every N entries.
    pub snapshot_every: u64,
    /// Entries kept after a snapshot.
    pub keep_after_snapshot: u64,
    /// TLS files; `None` only when insecure.
    pub tls: Option<keel_raft::tls::TlsFiles>,
}

/// Parses `ID=RAFT_ADDR/API_ADDR,...`.
pub fn parse_members(s: &str) -> anyhow::Result<Vec<MemberAddr>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|part| {
            let (id, addrs) = part
                .trim()
                .split_once('=')
                .ok_or_else(|| anyhow!("initial member {part:?}: expected ID=RAFT_ADDR/API_ADDR"))?;
            let (raft_addr, api_addr) = addrs
                .split_once('/')
                .ok_or_else(|| anyhow!("initial member {part:?}: expected ID=RAFT_ADDR/API_ADDR"))?;
            Ok(MemberAddr {
                id: id
                    .parse()
                    .with_context(|| format!("initial member {part:?}: node id is not a number"))?,
                raft_addr: raft_addr.to_string(),
                api_addr: api_addr.to_string(),
            })
        })
        .collect()
}

/// Checks that an advertised address is `host:port` with a usable host.
fn check_advertised(key: &str, addr: &str) -> anyhow::Result<()> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("{key} = {addr:?}: expected host:port"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow!("{key} = {addr:?}: port must be 1-65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("{key} = {addr:?}: host is empty");
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>()
        && ip.is_unspecified()
    {
        bail!(
            "{key} = {addr:?}: an unspecified address cannot be reached by other nodes; advertise a routable address"
        );
    }
    Ok(())
}

fn parse_listen(key: &str, addr: &str) -> anyhow::Result<SocketAddr> {
    addr.parse()
        .with_context(|| format!("{key} = {addr:?}: expected an IP:port to listen on"))
}

impl Config {
    /// Merges flags and environment (already in `args`) over the file over
    /// defaults, and validates the result.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    fn merge(a: &ServeArgs, f: FileConfig) -> anyhow::Result<Config> {
        let node_id = a
            .node_id
            .or(f.node_id)
            .ok_or_else(|| anyhow!("node_id is required (--node-id, KEEL_NODE_ID or node_id in the file)"))?;
        if node_id == 0 {
            bail!("node_id must be at least 1");
        }
        let cluster_name = a
            .cluster_name
            .clone()
            .or(f.cluster_name)
            .unwrap_or_else(|| "keel".into());
        if cluster_name.is_empty() || cluster_name.len() > 64 {
            bail!("cluster_name must be 1-64 characters");
        }
        let data_dir = a
            .data_dir
            .clone()
            .or(f.data_dir)
            .ok_or_else(|| anyhow!("data_dir is required"))?;
        let api_listen_s = a
            .api_listen
            .clone()
            .or(f.api_listen)
            .unwrap_or_else(|| "127.0.0.1:7001".into());
        let raft_listen_s = a
            .raft_listen
            .clone()
            .or(f.raft_listen)
            .unwrap_or_else(|| "127.0.0.1:7101".into());
        let api_listen = parse_listen("api_listen", &api_listen_s)?;
        let raft_listen = parse_listen("raft_listen", &raft_listen_s)?;
        let api_advertise = a.api_advertise.clone().or(f.api_advertise).unwrap_or(api_listen_s);
        let raft_advertise = a.raft_advertise.clone().or(f.raft_advertise).unwrap_or(raft_listen_s);
        check_advertised("api_advertise", &api_advertise)?;
        check_advertised("raft_advertise", &raft_advertise)?;
        let members = match &a.initial_members {
            Some(s) => parse_members(s)?,
            None => f.initial_members.unwrap_or_default(),
        };
        let mut initial_members = BTreeMap::new();
        for m in members {
            if m.id == 0 {
                bail!("initial_members: node id 0 is not allowed");
            }
            check_advertised(&format!("initial_members[{}].raft_addr", m.id), &m.raft_addr)?;
            check_advertised(&format!("initial_members[{}].api_addr", m.id), &m.api_addr)?;
            if initial_members.insert(m.id, m.clone()).is_some() {
                bail!("initial_members: node id {} appears twice", m.id);
            }
        }
        if let Some(me) = initial_members.get(&node_id)
            && (me.raft_addr != raft_advertise || me.api_addr != api_advertise)
        {
            bail!(
                "initial_members[{node_id}] = {}/{} differs from this node's advertised addresses {raft_advertise}/{api_advertise}",
                me.raft_addr,
                me.api_addr
            );
        }
        let join = a.join.clone().or(f.join);
        if join.is_some() && !initial_members.is_empty() {
            bail!("set either initial_members (new cluster) or join (existing cluster), not both");
        }
        if let Some(url) = &join
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            bail!("join = {url:?}: expected the API URL of a member, e.g. https://node1.example:7001");
        }
        let auto_promote = a.auto_promote.or(f.auto_promote).unwrap_or(false);
        if auto_promote && join.is_none() {
            bail!("auto_promote needs join (the URL of a member of the cluster to join)");
        }
        let insecure = a.insecure.or(f.insecure).unwrap_or(false);
        let heartbeat_ms = a.heartbeat_ms.or(f.raft.heartbeat_ms).unwrap_or(100);
        let emin = a
            .election_timeout_min_ms
            .or(f.raft.election_timeout_min_ms)
            .unwrap_or(1000);
        let emax = a
            .election_timeout_max_ms
            .or(f.raft.election_timeout_max_ms)
            .unwrap_or(2000);
        if heartbeat_ms == 0 || emin <= heartbeat_ms || emax <= emin {
            bail!(
                "raft timing: need 0 < heartbeat_ms ({heartbeat_ms}) < election_timeout_min_ms ({emin}) < election_timeout_max_ms ({emax})"
            );
        }
        let snapshot_every = a.snapshot_every.or(f.raft.snapshot_every).unwrap_or(100_000);
        let keep_after_snapshot = a.keep_after_snapshot.or(f.raft.keep_after_snapshot).unwrap_or(5_000);
        if snapshot_every == 0 {
            bail!("snapshot_every must be at least 1");
        }
        let tls = if insecure {
            None
        } else {
            let pick = |flag: &Option<PathBuf>, file: Option<PathBuf>, key: &str| {
                flag.clone().or(file).ok_or_else(|| {
                    anyhow!("tls.{key} is required (or run with --insecure, which disables all authentication)")
                })
            };
            Some(keel_raft::tls::TlsFiles {
                ca: pick(&a.tls_ca, f.tls.ca, "ca")?,
                cert: pick(&a.tls_cert, f.tls.cert, "cert")?,
                key: pick(&a.tls_key, f.tls.key, "key")?,
            })
        };
        let worker_threads = a.worker_threads.or(f.worker_threads).unwrap_or(1);
        if worker_threads > 1024 {
            bail!("worker_threads = {worker_threads}: at most 1024 (0 = one per CPU)");
        }
        let log_format = a.log_format.clone().or(f.log_format).unwrap_or_else(|| "text".into());
        let log_json = match log_format.as_str() {
            "text" => false,
            "json" => true,
            other => bail!("log_format = {other:?}: expected text or json"),
        };
        Ok(Config {
            node_id,
            cluster_name,
            data_dir,
            api_listen,
            api_advertise,
            raft_listen,
            raft_advertise,
            initial_members,
            join,
            auto_promote,
            insecure,
            request_timeout: Duration::from_millis(a.request_timeout_ms.or(f.request_timeout_ms).unwrap_or(5000)),
            log_json,
            log_level: a.log_level.clone().or(f.log_level).unwrap_or_else(|| "info".into()),
            worker_threads,
            heartbeat_ms,
            election_timeout_ms: (emin, emax),
            snapshot_every,
            keep_after_snapshot,
            tls,
        })
    }
}

/// Reads and parses a TOML file, naming the file in errors.
pub fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ServeArgs {
        ServeArgs {
            node_id: Some(1),
            data_dir: Some("d".into()),
            insecure: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn flags_override_file_values() {
        let file: FileConfig = toml::from_str(
            "node_id = 2\ndata_dir = \"x\"\ninsecure = true\napi_listen = \"127.0.0.1:9000\"\n[raft]\nheartbeat_ms = 50\n",
        )
        .unwrap();
        let a = ServeArgs {
            node_id: Some(7),
            ..Default::default()
        };
        let c = Config::merge(&a, file).unwrap();
        assert_eq!(c.node_id, 7);
        assert_eq!(c.api_listen.port(), 9000);
        assert_eq!(c.api_advertise, "127.0.0.1:9000");
        assert_eq!(c.heartbeat_ms, 50);
    }

    #[test]
    fn one_event_loop_thread_unless_configured() {
        assert_eq!(Config::merge(&base(), FileConfig::default()).unwrap().worker_threads, 1);
        let file: FileConfig = toml::from_str("worker_threads = 0\n").unwrap();
        assert_eq!(Config::merge(&base(), file.clone()).unwrap().worker_threads, 0);
        let mut a = base();
        a.worker_threads = Some(4);
        assert_eq!(Config::merge(&a, file.clone()).unwrap().worker_threads, 4);
        a.worker_threads = Some(100_000);
        let err = Config::merge(&a, file).unwrap_err().to_string();
        assert!(err.contains("worker_threads") && err.contains("1024"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<FileConfig>("node_id = 1\nnode_idd = 2\n").unwrap_err();
        assert!(err.to_string().contains("node_idd"), "{err}");
    }

    #[test]
    fn unspecified_advertised_address_is_refused() {
        let mut a = base();
        a.api_listen = Some("0.0.0.0:7001".into());
        let err = Config::merge(&a, FileConfig::default()).unwrap_err().to_string();
        assert!(err.contains("api_advertise") && err.contains("unspecified"), "{err}");
        a.api_advertise = Some("10.0.0.5:7001".into());
        assert!(Config::merge(&a, FileConfig::default()).is_ok());
    }

    #[test]
    fn tls_is_required_unless_insecure() {
        let mut a = base();
        a.insecure = None;
        let err = Config::merge(&a, FileConfig::default()).unwrap_err().to_string();
        assert!(err.contains("tls.ca") && err.contains("--insecure"), "{err}");
    }

    #[test]
    fn member_list_parses_and_rejects_duplicates() {
        let m = parse_members("1=127.0.0.1:7101/127.0.0.1:7001, 2=h:7102/h:7002").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].api_addr, "h:7002");
        assert!(parse_members("1=nope").is_err());
        let mut a = base();
        a.initial_members = Some("2=h:1/h:2,2=h:3/h:4".into());
        assert!(
            Config::merge(&a, FileConfig::default())
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = crate::source_file("config/node1.toml");
        let c = Config::load(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.initial_members.len(), 3);
        assert_eq!(c.api_advertise, "node1.example:7001");
        assert!(c.tls.is_some());
    }

    #[test]
    fn join_needs_a_url_and_auto_promote_needs_join() {
        let mut a = base();
        a.auto_promote = Some(true);
        let err = Config::merge(&a, FileConfig::default()).unwrap_err().to_string();
        assert!(err.contains("auto_promote needs join"), "{err}");
        a.join = Some("node1:7001".into());
        let err = Config::merge(&a, FileConfig::default()).unwrap_err().to_string();
        assert!(err.contains("expected the API URL"), "{err}");
        a.join = Some("https://node1:7001".into());
        let c = Config::merge(&a, FileConfig::default()).unwrap();
        assert!(c.auto_promote);
        a.initial_members = Some("2=h:1/h:2".into());
        let err = Config::merge(&a, FileConfig::default()).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
        assert!(
            Config::merge(&a, FileConfig::default()).is_err(),
            "join and initial_members exclude each other"
        );
    }

    #[test]
    fn bad_timing_is_refused() {
        let mut a = base();
        a.heartbeat_ms = Some(500);
        a.election_timeout_min_ms = Some(400);
        assert!(
            Config::merge(&a, FileConfig::default())
                .unwrap_err()
                .to_string()
                .contains("heartbeat_ms")
        );
    }
}

//! The `keel` command.

use std::path::PathBuf;

use clap::Parser;
use clap::Subcommand;
use keel::config::Config;
use keel::config::ServeArgs;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "A Raft-replicated control plane for LLM inference gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Generate certificates (CA, node, client, admin).
    #[command(subcommand)]
    Cert(CertCmd),
    /// Print a node's view of the cluster.
    Status {
        #[command(flatten)]
        client: keel::cli::ClientArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Membership: list, add, promote, remove.
    #[command(subcommand)]
    Member(keel::member_cli::MemberCmd),
    /// Leadership: transfer.
    #[command(subcommand)]
    Leader(keel::member_cli::LeaderCmd),
    /// Recover a stopped node after the loss of quorum (unsafe; see the README).
    Recover(Box<keel::member_cli::RecoverArgs>),
    /// Workers: list, get, put, rm.
    Worker {
        #[command(flatten)]
        client: keel::cli::ClientArgs,
        #[command(subcommand)]
        cmd: keel::resource_cli::WorkerCmd,
    },
    /// Routing policies: list, get, put, rm.
    Policy {
        #[command(flatten)]
        client: keel::cli::ClientArgs,
        #[command(subcommand)]
        cmd: keel::resource_cli::PolicyCmd,
    },
    /// Rate limits: list, get, put, acquire, rm.
    Ratelimit {
        #[command(flatten)]
        client: keel::cli::ClientArgs,
        #[command(subcommand)]
        cmd: keel::resource_cli::RateLimitCmd,
    },
    /// Print changes under a prefix as JSON lines.
    Watch {
        #[command(flatten)]
        client: keel::cli::ClientArgs,
        /// Key prefix, e.g. workers/.
        #[arg(long, default_value = "")]
        prefix: String,
        /// First revision to print (default: the next change).
        #[arg(long)]
        from_revision: Option<u64>,
        /// Stop after this many events.
        #[arg(long)]
        max_events: Option<u64>,
    },
    /// Snapshots: build one now, back up, inspect, restore into a new cluster.
    #[command(subcommand)]
    Snapshot(keel::snapshot_cli::SnapshotCmd),
    /// Load a running cluster and report throughput and latency percentiles.
    Bench(Box<keel::bench::BenchArgs>),
    /// Time small log writes + fdatasync on a device, alone and as several
    /// nodes sharing it would (a quorum of them).
    DiskCheck(keel::disk_check::DiskCheckArgs),
    /// Run a local cluster on loopback with generated certificates until Ctrl-C.
    DevCluster {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Directory for certificates, configs, data and logs.
        #[arg(long, default_value = "keel-dev")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create the cluster CA (ca.pem, ca-key.pem).
    Ca {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create a node certificate signed by the CA in DIR.
    Node {
        /// Directory holding the CA; output goes there too.
        #[arg(long)]
        dir: PathBuf,
        /// Node id.
        #[arg(long)]
        id: u64,
        /// Extra DNS names or IP addresses the node is reached at.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create a client (or, with --admin, an admin) certificate.
    Client {
        /// Directory holding the CA; output goes there too.
        #[arg(long)]
        dir: PathBuf,
        /// Client name.
        #[arg(long)]
        name: String,
        /// Grant admin rights.
        #[arg(long)]
        admin: bool,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn init_logging(json: bool, level: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    // Test builds only (see keel_storage::failpoints); inert otherwise.
    let _failpoints = keel_storage::failpoints::setup();
    let cli = Cli::parse();
    // A node's configuration chooses its runtime; every other command uses
    // one worker per CPU (`keel bench` is a load generator).
    let config = match &cli.command {
        Cmd::Serve(args) => match Config::load(args) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("keel: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let rt = runtime(config.as_ref().map_or(0, |c| c.worker_threads));
    let res = rt.block_on(async move {
        match cli.command {
            Cmd::Serve(_) => {
                let config = config.expect("loaded above");
                init_logging(config.log_json, &config.log_level);
                keel::node::run(config).await
            }
            Cmd::Cert(c) => cert(c),
            Cmd::Status { client, json } => keel::cli::status(&client, json).await,
            Cmd::Member(c) => keel::member_cli::member(c).await,
            Cmd::Leader(c) => keel::member_cli::leader(c).await,
            Cmd::Recover(a) => keel::member_cli::recover(*a).await,
            Cmd::Worker { client, cmd } => keel::resource_cli::worker(&client, cmd).await,
            Cmd::Policy { client, cmd } => keel::resource_cli::policy(&client, cmd).await,
            Cmd::Ratelimit { client, cmd } => keel::resource_cli::ratelimit(&client, cmd).await,
            Cmd::Watch {
                client,
                prefix,
                from_revision,
                max_events,
            } => keel::resource_cli::watch(&client, &prefix, from_revision, max_events).await,
            Cmd::Snapshot(c) => keel::snapshot_cli::run(c).await,
            Cmd::Bench(a) => keel::bench::run(*a).await,
            Cmd::DiskCheck(a) => keel::disk_check::run(a).await,
            Cmd::DevCluster { nodes, dir } => {
                init_logging(false, "warn");
                keel::dev_cluster::run(nodes, &dir).await
            }
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The tokio runtime: `threads == 1` a single-threaded event loop (a node's
/// default: measured in bench/README.md, the hops of a write between tasks
/// then never wake another thread), 0 one worker per CPU, N that many.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut b = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    b.enable_all().build().expect("building the tokio runtime")
}

fn cert(c: CertCmd) -> anyhow::Result<()> {
    use keel::cert::CertOptions;
    let opts = |days| CertOptions {
        days,
        ..CertOptions::default()
    };
    match c {
        CertCmd::Ca { dir, days, force } => {
            keel::cert::create_ca(&dir, &opts(days), force)?;
            println!("created {}", dir.join("ca.pem").display());
        }
        CertCmd::Node {
            dir,
            id,
            hosts,
            days,
            force,
        } => {
            let (cert, key) = keel::cert::create_node(&dir, id, &hosts, &opts(days), force)?;
            println!("created {} and {}", cert.display(), key.display());
        }
        CertCmd::Client {
            dir,
            name,
            admin,
            days,
            force,
        } => {
            let (cert, key) = keel::cert::create_client(&dir, &name, admin, &opts(days), force)?;
            println!("created {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}

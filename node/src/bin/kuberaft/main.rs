//! `kuberaft`: the command line. Data commands (put, get, ...), admin
//! commands (the Ratis shell's counterparts), a local cluster for newcomers
//! (`local up`) and a load generator (`bench`).
//!
//! Every failure prints one line saying what failed and why, and exits
//! non-zero.
//!
//! This file holds the command-line grammar and the dispatch; the commands
//! live in `data`, `admin`, `local` and `bench`.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use kuberaft_node::client::{Client, ClientOptions, DEFAULT_GROUP};
use kuberaft_proto::v1 as pb;

mod admin;
mod bench;
mod data;
mod local;

use bench::bench;
use local::local_up;

#[derive(Parser, Debug)]
#[command(
    name = "kuberaft",
    version,
    about = "kuberaft command line: data, admin, local cluster, benchmark"
)]
struct Cli {
    /// Members to talk to (host:port, comma separated).
    #[arg(
        long,
        global = true,
        env = "KUBERAFT_PEERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    )]
    peers: Vec<String>,
    /// Group to address.
    #[arg(long, global = true, env = "KUBERAFT_GROUP", default_value = DEFAULT_GROUP)]
    group: String,
    /// Deadline of one command, retries included.
    #[arg(long, global = true, default_value = "20s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a cluster of kuberaft-node processes on this machine.
    Local {
        #[command(subcommand)]
        cmd: LocalCmd,
    },
    /// Set KEY to VALUE.
    Put { key: String, value: String },
    /// Print KEY's value (linearizable read).
    Get { key: String },
    /// Delete KEY.
    Delete { key: String },
    /// Set KEY to NEW if it holds EXPECTED ("" with --absent: if it is missing).
    Cas {
        key: String,
        expected: String,
        new: String,
        /// Require the key to be absent instead of holding EXPECTED.
        #[arg(long)]
        absent: bool,
    },
    /// Print every key starting with PREFIX.
    Scan { prefix: String },
    /// Wait until log INDEX reaches a replication level.
    Watch {
        index: u64,
        #[arg(long, default_value = "majority", value_parser = ["majority", "all", "majority-committed", "all-committed"])]
        level: String,
    },
    /// Groups and their members.
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Membership changes.
    Peer {
        #[command(subcommand)]
        cmd: PeerCmd,
    },
    /// Leadership and elections.
    Election {
        #[command(subcommand)]
        cmd: ElectionCmd,
    },
    /// Snapshots.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Load generator: throughput and latency of writes and reads.
    Bench(BenchArgs),
}

#[derive(Subcommand, Debug)]
enum LocalCmd {
    /// Start (or restart, on the same --dir) N members and create the groups.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "kuberaft-local")]
        dir: PathBuf,
        /// Member i serves gRPC on P+i and HTTP on P+100+i.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// Groups to create: "default", then "group-2", "group-3", ...
        #[arg(long, default_value_t = 1)]
        groups: usize,
        /// Passed to every node (e.g. `--snapshot-threshold=100`).
        #[arg(long = "node-arg", allow_hyphen_values = true)]
        node_args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Groups hosted by each peer.
    List,
    /// Each member's role, leader, term, indexes and configuration.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Create the group on every peer with all of them as voters.
    Create {
        #[arg(long, default_value = "kv")]
        state_machine: String,
    },
}

#[derive(Subcommand, Debug)]
enum PeerCmd {
    /// Add a member (creates the group on it first if needed).
    Add {
        /// Member id; asked from the new member when omitted.
        #[arg(long)]
        id: Option<u64>,
        #[arg(long)]
        address: String,
        #[arg(long, default_value_t = 0)]
        priority: u32,
        /// Add as a non-voting listener.
        #[arg(long)]
        listener: bool,
    },
    /// Remove a member.
    Remove {
        #[arg(long)]
        id: u64,
    },
    /// Change priorities: ID=N ...
    SetPriority {
        #[arg(required = true)]
        assignments: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ElectionCmd {
    /// Hand leadership to a member.
    Transfer {
        #[arg(long)]
        to: u64,
    },
    /// The leader steps down in favour of the best caught-up voter.
    StepDown,
    /// Stop a member from starting elections.
    Pause {
        #[arg(long)]
        member: u64,
    },
    /// Let a member start elections again.
    Resume {
        #[arg(long)]
        member: u64,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take a snapshot on a member now.
    Create {
        #[arg(long)]
        member: u64,
    },
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 128)]
    value_size: usize,
    /// Fraction of operations that are linearizable reads.
    #[arg(long, default_value_t = 0.0)]
    read_ratio: f64,
    /// Distinct keys written and read.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Client connections the clients share (default: min(clients, 8)).
    #[arg(long)]
    connections: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 500ms, 10s or 2m"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("{s:?} is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("kuberaft: {e:#}");
        std::process::exit(1);
    }
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    let opts = ClientOptions {
        timeout: cli.timeout,
        ..Default::default()
    };
    Ok(Client::new(&cli.peers, cli.group.as_bytes(), opts)?)
}

fn gid(cli: &Cli) -> Option<pb::GroupId> {
    Some(pb::GroupId {
        id: Bytes::from(cli.group.clone().into_bytes()),
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Local { cmd } => match cmd {
            LocalCmd::Up {
                nodes,
                dir,
                base_port,
                groups,
                node_args,
            } => local_up(*nodes, dir, *base_port, *groups, node_args).await,
        },
        Cmd::Put { .. }
        | Cmd::Get { .. }
        | Cmd::Delete { .. }
        | Cmd::Cas { .. }
        | Cmd::Scan { .. }
        | Cmd::Watch { .. } => data::run(cli).await,
        Cmd::Group { .. } | Cmd::Peer { .. } | Cmd::Election { .. } | Cmd::Snapshot { .. } => {
            admin::run(cli).await
        }
        Cmd::Bench(b) => bench(&cli, b).await,
    }
}

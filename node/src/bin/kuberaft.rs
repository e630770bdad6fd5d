//! `kuberaft`: the command line. Data commands (put, get, ...), admin
//! commands (the Ratis shell's counterparts), a local cluster for newcomers
//! (`local up`) and a load generator (`bench`).
//!
//! Every failure prints one line saying what failed and why, and exits
//! non-zero.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use kuberaft_node::client::{Client, ClientOptions, DEFAULT_GROUP};
use kuberaft_node::rpc::peer::channel;
use kuberaft_proto::v1 as pb;
use kuberaft_proto::v1::admin_protocol_service_client::AdminProtocolServiceClient;
use tonic::transport::Channel;

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
        Cmd::Put { key, value } => {
            let index = client(&cli)?.put(key.as_bytes(), value.as_bytes()).await?;
            println!("OK (index {index})");
            Ok(())
        }
        Cmd::Get { key } => match client(&cli)?.get(key.as_bytes()).await? {
            Some(v) => {
                println!("{}", text(&v));
                Ok(())
            }
            None => bail!("key {key:?} not found"),
        },
        Cmd::Delete { key } => {
            let existed = client(&cli)?.delete(key.as_bytes()).await?;
            println!("{}", if existed { "deleted" } else { "not found" });
            Ok(())
        }
        Cmd::Cas {
            key,
            expected,
            new,
            absent,
        } => {
            let exp = (!absent).then_some(expected.as_bytes());
            let (ok, current) = client(&cli)?
                .cas(key.as_bytes(), exp, new.as_bytes())
                .await?;
            if ok {
                println!("OK");
                Ok(())
            } else {
                let cur = current.map_or("(absent)".to_string(), |v| text(&v));
                bail!("compare failed: {key:?} holds {cur}")
            }
        }
        Cmd::Scan { prefix } => {
            for (k, v) in client(&cli)?.scan(prefix.as_bytes()).await? {
                println!("{}\t{}", text(&k), text(&v));
            }
            Ok(())
        }
        Cmd::Watch { index, level } => {
            let level = match level.as_str() {
                "all" => pb::ReplicationLevel::All,
                "majority-committed" => pb::ReplicationLevel::MajorityCommitted,
                "all-committed" => pb::ReplicationLevel::AllCommitted,
                _ => pb::ReplicationLevel::Majority,
            };
            client(&cli)?.watch(*index, level).await?;
            println!("index {index} reached {level:?}");
            Ok(())
        }
        Cmd::Group { cmd } => match cmd {
            GroupCmd::List => group_list(&cli).await,
            GroupCmd::Info { json } => group_info(&cli, *json).await,
            GroupCmd::Create { state_machine } => {
                let members = member_ids(&cli.peers).await?;
                create_group(&members, cli.group.as_bytes(), state_machine).await?;
                println!("group {} created on {} members", cli.group, members.len());
                Ok(())
            }
        },
        Cmd::Peer { cmd } => peer_cmd(&cli, cmd).await,
        Cmd::Election { cmd } => election_cmd(&cli, cmd).await,
        Cmd::Snapshot {
            cmd: SnapshotCmd::Create { member },
        } => {
            let addr = member_address(&cli, *member).await?;
            let r = admin(&addr)
                .await?
                .snapshot_management(pb::SnapshotManagementRequest {
                    group_id: gid(&cli),
                    create: true,
                    timeout_ms: cli.timeout.as_millis() as u64,
                })
                .await?
                .into_inner();
            check(&r)?;
            println!("snapshot at index {} on member {member}", r.log_index);
            Ok(())
        }
        Cmd::Bench(b) => bench(&cli, b).await,
    }
}

// ---------------------------------------------------------------------------
// Admin helpers
// ---------------------------------------------------------------------------

async fn admin(address: &str) -> anyhow::Result<AdminProtocolServiceClient<Channel>> {
    let ch = channel(address).with_context(|| format!("bad address {address}"))?;
    Ok(AdminProtocolServiceClient::new(ch))
}

fn check(r: &pb::AdminReply) -> anyhow::Result<()> {
    if r.success {
        Ok(())
    } else if r.error.is_empty() {
        bail!("the request failed without a reason")
    } else {
        bail!("{}", r.error)
    }
}

/// (address, member id) of every reachable peer.
async fn member_ids(peers: &[String]) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for p in peers {
        let r = admin(p)
            .await?
            .group_list(pb::GroupListRequest {})
            .await
            .map_err(|s| anyhow!("{p}: {}", s.message()))?;
        out.push((p.clone(), r.into_inner().server_id));
    }
    Ok(out)
}

async fn infos(cli: &Cli) -> Vec<(String, Result<pb::GroupInfoReply, String>)> {
    let mut out = Vec::new();
    for p in &cli.peers {
        let r = async {
            let mut a = admin(p).await.map_err(|e| e.to_string())?;
            a.group_info(pb::GroupInfoRequest { group_id: gid(cli) })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string())
        }
        .await;
        out.push((p.clone(), r));
    }
    out
}

/// The leader's address, found by asking the peers.
async fn leader_address(cli: &Cli) -> anyhow::Result<String> {
    let deadline = Instant::now() + cli.timeout;
    loop {
        for (addr, info) in infos(cli).await {
            let Ok(info) = info else { continue };
            if info.role() == pb::RaftRole::Leader {
                return Ok(addr);
            }
            if let Some(p) = info
                .configuration
                .iter()
                .flat_map(|c| &c.peers)
                .find(|p| p.id == info.leader_id && info.leader_id != 0)
            {
                return Ok(p.address.clone());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no leader of group {} found through {}",
                cli.group,
                cli.peers.join(",")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn member_address(cli: &Cli, member: u64) -> anyhow::Result<String> {
    for (addr, id) in member_ids(&cli.peers).await? {
        if id == member {
            return Ok(addr);
        }
    }
    bail!(
        "member {member} is not among --peers {}",
        cli.peers.join(",")
    )
}

async fn group_list(cli: &Cli) -> anyhow::Result<()> {
    for p in &cli.peers {
        match admin(p).await?.group_list(pb::GroupListRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                let names: Vec<String> = r
                    .group_ids
                    .iter()
                    .map(|g| kuberaft_node::server::group::display_group(&g.id))
                    .collect();
                println!("{p}\tmember {}\t{}", r.server_id, names.join(","));
            }
            Err(s) => println!("{p}\tunreachable: {}", s.message()),
        }
    }
    Ok(())
}

fn role_name(r: pb::RaftRole) -> &'static str {
    match r {
        pb::RaftRole::Leader => "leader",
        pb::RaftRole::Candidate => "candidate",
        pb::RaftRole::Listener => "listener",
        _ => "follower",
    }
}

async fn group_info(cli: &Cli, json: bool) -> anyhow::Result<()> {
    let infos = infos(cli).await;
    if json {
        let v: Vec<serde_json::Value> = infos
            .iter()
            .map(|(addr, r)| match r {
                Ok(i) => serde_json::json!({
                    "address": addr,
                    "member_id": i.server_id,
                    "role": role_name(i.role()),
                    "leader_id": i.leader_id,
                    "term": i.term,
                    "last_index": i.last_index,
                    "commit_index": i.commit_index,
                    "applied_index": i.applied_index,
                    "snapshot_index": i.snapshot_index,
                    "elections_paused": i.elections_paused,
                    "storage_healthy": i.storage.as_ref().is_none_or(|s| s.healthy),
                    "peers": i.configuration.iter().flat_map(|c| &c.peers).map(|p| serde_json::json!({
                        "id": p.id, "address": p.address, "priority": p.priority,
                        "voter": p.role() != pb::PeerRole::Listener,
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => serde_json::json!({"address": addr, "error": e}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("group {}", cli.group);
    let mut any = false;
    for (addr, r) in &infos {
        match r {
            Ok(i) => {
                any = true;
                println!(
                    "  member {:<17} {:<22} {:<9} leader {:<17} term {:<4} last {:<8} commit {:<8} applied {:<8} snapshot {}{}{}",
                    i.server_id,
                    addr,
                    role_name(i.role()),
                    i.leader_id,
                    i.term,
                    i.last_index,
                    i.commit_index,
                    i.applied_index,
                    i.snapshot_index,
                    if i.elections_paused {
                        " (elections paused)"
                    } else {
                        ""
                    },
                    i.storage
                        .as_ref()
                        .filter(|s| !s.healthy)
                        .map_or(String::new(), |s| format!(" STORAGE: {}", s.message)),
                );
            }
            Err(e) => println!("  {addr}: {e}"),
        }
    }
    if let Some(Ok(i)) = infos.iter().map(|(_, r)| r).find(|r| r.is_ok()) {
        println!("  configuration:");
        for p in i.configuration.iter().flat_map(|c| &c.peers) {
            let kind = if p.role() == pb::PeerRole::Listener {
                "listener"
            } else {
                "voter"
            };
            println!("    {} {} {kind} priority {}", p.id, p.address, p.priority);
        }
    }
    if !any {
        bail!("no peer answered for group {}", cli.group);
    }
    Ok(())
}

async fn create_group(members: &[(String, u64)], group: &[u8], sm: &str) -> anyhow::Result<()> {
    let peers: Vec<pb::Peer> = members
        .iter()
        .map(|(addr, id)| pb::Peer {
            id: *id,
            address: addr.clone(),
            role: pb::PeerRole::Voter as i32,
            ..Default::default()
        })
        .collect();
    for (addr, _) in members {
        let r = admin(addr)
            .await?
            .group_management(pb::GroupManagementRequest {
                op: Some(pb::group_management_request::Op::Add(pb::GroupAdd {
                    group_id: Some(pb::GroupId {
                        id: Bytes::copy_from_slice(group),
                    }),
                    peers: peers.clone(),
                    listeners: Vec::new(),
                    state_machine: sm.to_string(),
                })),
            })
            .await?
            .into_inner();
        check(&r).with_context(|| format!("creating the group on {addr}"))?;
    }
    Ok(())
}

/// An admin request only the leader can serve.
enum LeaderCall {
    SetConfiguration(pb::SetConfigurationRequest),
    Transfer(pb::TransferLeadershipRequest),
}

/// Sends an admin request to the leader, following NotLeader answers.
async fn at_leader(cli: &Cli, call: LeaderCall) -> anyhow::Result<pb::AdminReply> {
    let deadline = Instant::now() + cli.timeout;
    loop {
        let addr = leader_address(cli).await?;
        let mut a = admin(&addr).await?;
        let r = match &call {
            LeaderCall::SetConfiguration(r) => a.set_configuration(r.clone()).await?,
            LeaderCall::Transfer(r) => a.transfer_leadership(r.clone()).await?,
        }
        .into_inner();
        let not_leader = matches!(
            r.exception.as_ref().and_then(|e| e.kind.as_ref()),
            Some(pb::raft_exception::Kind::NotLeader(_))
        );
        if !not_leader || Instant::now() > deadline {
            check(&r)?;
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn current_peers(cli: &Cli) -> anyhow::Result<(Vec<pb::Peer>, Vec<pb::Peer>)> {
    let addr = leader_address(cli).await?;
    let info = admin(&addr)
        .await?
        .group_info(pb::GroupInfoRequest { group_id: gid(cli) })
        .await?
        .into_inner();
    let peers = info.configuration.unwrap_or_default().peers;
    Ok(peers
        .into_iter()
        .partition(|p| p.role() != pb::PeerRole::Listener))
}

async fn peer_cmd(cli: &Cli, cmd: &PeerCmd) -> anyhow::Result<()> {
    let timeout_ms = cli.timeout.as_millis() as u64;
    match cmd {
        PeerCmd::Add {
            id,
            address,
            priority,
            listener,
        } => {
            let mut a = admin(address).await?;
            let list = a
                .group_list(pb::GroupListRequest {})
                .await
                .map_err(|s| anyhow!("new member {address}: {}", s.message()))?
                .into_inner();
            if let Some(id) = id.filter(|id| *id != list.server_id) {
                bail!("{address} is member {}, not {id}", list.server_id);
            }
            if !list.group_ids.iter().any(|g| g.id == cli.group.as_bytes()) {
                let r = a
                    .group_management(pb::GroupManagementRequest {
                        op: Some(pb::group_management_request::Op::Add(pb::GroupAdd {
                            group_id: gid(cli),
                            ..Default::default()
                        })),
                    })
                    .await?
                    .into_inner();
                check(&r).context("creating the group on the new member")?;
            }
            let peer = pb::Peer {
                id: list.server_id,
                address: address.clone(),
                priority: *priority,
                role: if *listener {
                    pb::PeerRole::Listener
                } else {
                    pb::PeerRole::Voter
                } as i32,
                ..Default::default()
            };
            let (peers, listeners) = if *listener {
                (vec![], vec![peer])
            } else {
                (vec![peer], vec![])
            };
            let r = at_leader(
                cli,
                LeaderCall::SetConfiguration(pb::SetConfigurationRequest {
                    group_id: gid(cli),
                    mode: pb::SetConfigurationMode::Add as i32,
                    peers: peers.clone(),
                    listeners: listeners.clone(),
                    timeout_ms,
                    ..Default::default()
                }),
            )
            .await?;
            println!(
                "member {} added (configuration at index {})",
                list.server_id, r.log_index
            );
        }
        PeerCmd::Remove { id } => {
            let (voters, listeners) = current_peers(cli).await?;
            if !voters.iter().chain(&listeners).any(|p| p.id == *id) {
                bail!("member {id} is not in group {}", cli.group);
            }
            let keep = |v: &[pb::Peer]| {
                v.iter()
                    .filter(|p| p.id != *id)
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let r = at_leader(
                cli,
                LeaderCall::SetConfiguration(pb::SetConfigurationRequest {
                    group_id: gid(cli),
                    mode: pb::SetConfigurationMode::CompareAndSet as i32,
                    peers: keep(&voters),
                    listeners: keep(&listeners),
                    expected_peers: voters.clone(),
                    expected_listeners: listeners.clone(),
                    timeout_ms,
                }),
            )
            .await?;
            println!(
                "member {id} removed (configuration at index {})",
                r.log_index
            );
        }
        PeerCmd::SetPriority { assignments } => {
            let mut wanted = Vec::new();
            for a in assignments {
                let (id, n) = a
                    .split_once('=')
                    .and_then(|(i, n)| Some((i.parse::<u64>().ok()?, n.parse::<u32>().ok()?)))
                    .ok_or_else(|| anyhow!("{a:?}: expected ID=PRIORITY, e.g. 12345=2"))?;
                wanted.push((id, n));
            }
            let (voters, listeners) = current_peers(cli).await?;
            let mut new = voters.clone();
            for (id, n) in &wanted {
                let p = new
                    .iter_mut()
                    .find(|p| p.id == *id)
                    .ok_or_else(|| anyhow!("member {id} is not a voter of group {}", cli.group))?;
                p.priority = *n;
            }
            at_leader(
                cli,
                LeaderCall::SetConfiguration(pb::SetConfigurationRequest {
                    group_id: gid(cli),
                    mode: pb::SetConfigurationMode::CompareAndSet as i32,
                    peers: new.clone(),
                    listeners: listeners.clone(),
                    expected_peers: voters.clone(),
                    expected_listeners: listeners.clone(),
                    timeout_ms,
                }),
            )
            .await?;
            println!("priorities set");
        }
    }
    Ok(())
}

async fn election_cmd(cli: &Cli, cmd: &ElectionCmd) -> anyhow::Result<()> {
    let timeout_ms = cli.timeout.as_millis().min(60_000) as u64;
    match cmd {
        ElectionCmd::Transfer { to } => {
            at_leader(
                cli,
                LeaderCall::Transfer(pb::TransferLeadershipRequest {
                    group_id: gid(cli),
                    target_id: *to,
                    timeout_ms,
                }),
            )
            .await?;
            println!("member {to} leads group {}", cli.group);
        }
        ElectionCmd::StepDown => {
            at_leader(
                cli,
                LeaderCall::Transfer(pb::TransferLeadershipRequest {
                    group_id: gid(cli),
                    target_id: 0,
                    timeout_ms,
                }),
            )
            .await?;
            println!("the leader stepped down");
        }
        ElectionCmd::Pause { member } | ElectionCmd::Resume { member } => {
            let pause = matches!(cmd, ElectionCmd::Pause { .. });
            let addr = member_address(cli, *member).await?;
            let r = admin(&addr)
                .await?
                .leader_election_management(pb::LeaderElectionManagementRequest {
                    group_id: gid(cli),
                    pause,
                })
                .await?
                .into_inner();
            check(&r)?;
            println!(
                "elections {} on member {member}",
                if pause { "paused" } else { "resumed" }
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// local up
// ---------------------------------------------------------------------------

fn node_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the kuberaft binary")?;
    let p = me.with_file_name("kuberaft-node");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "kuberaft-node is not next to {}; build both with `cargo build --release -p kuberaft-node`",
            me.display()
        )
    }
}

/// Polls every member's /readyz (every group has a leader, storage is
/// healthy) until all answer 200.
async fn wait_ready(members: &[Member], limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    for m in members {
        loop {
            let why = match http_get(&m.http, "/readyz").await {
                Ok((200, _)) => break,
                Ok((_, body)) => format!("member {}: {}", m.index, body.trim()),
                Err(e) => format!("member {}: {e}", m.index),
            };
            if Instant::now() >= deadline {
                return Err(why.lines().next().unwrap_or("").to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// A bare HTTP/1.1 GET: (status, body).
async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

struct Member {
    index: usize,
    addr: String,
    http: String,
    child: tokio::process::Child,
    running: bool,
}

fn spawn_member(
    bin: &Path,
    dir: &Path,
    i: usize,
    base: u16,
    extra: &[String],
) -> anyhow::Result<Member> {
    let addr = format!("127.0.0.1:{}", base as usize + i);
    let http = format!("127.0.0.1:{}", base as usize + 100 + i);
    let data = dir.join(format!("node-{i}"));
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let log_path = dir.join(format!("node-{i}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let child = tokio::process::Command::new(bin)
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(&addr)
        .arg("--http-listen")
        .arg(&http)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Member {
        index: i,
        addr,
        http,
        child,
        running: true,
    })
}

async fn wait_serving(m: &mut Member, dir: &Path) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = m.child.try_wait()? {
            bail!(
                "member {} exited at start ({status}); see {}",
                m.index,
                dir.join(format!("node-{}.log", m.index)).display()
            );
        }
        if let Ok(mut a) = admin(&m.addr).await
            && let Ok(r) = a.group_list(pb::GroupListRequest {}).await
        {
            return Ok(r.into_inner().server_id);
        }
        if Instant::now() > deadline {
            bail!(
                "member {} did not start serving on {} within 30 s",
                m.index,
                m.addr
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn group_name(i: usize) -> String {
    if i == 0 {
        DEFAULT_GROUP.to_string()
    } else {
        format!("group-{}", i + 1)
    }
}

fn terminate(members: &mut [Member]) {
    for m in members.iter_mut().filter(|m| m.running) {
        if let Some(pid) = m.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

async fn local_up(
    n: usize,
    dir: &Path,
    base: u16,
    groups: usize,
    extra: &[String],
) -> anyhow::Result<()> {
    if n == 0 || n > 99 {
        bail!("--nodes must be between 1 and 99");
    }
    if base as usize + 100 + n > u16::MAX as usize {
        bail!("--base-port {base} leaves no room for {n} members' ports");
    }
    let bin = node_binary()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let spawned = Instant::now();
    let mut members = Vec::new();
    for i in 0..n {
        members.push(spawn_member(&bin, dir, i, base, extra)?);
    }
    let started = async {
        let mut ids = Vec::new();
        for m in members.iter_mut() {
            ids.push(wait_serving(m, dir).await?);
        }
        let all: Vec<(String, u64)> = members
            .iter()
            .map(|m| m.addr.clone())
            .zip(ids.iter().copied())
            .collect();
        // What each member hosts already (a restart on the same --dir).
        let mut hosted = Vec::new();
        for (addr, _) in &all {
            let list = admin(addr)
                .await?
                .group_list(pb::GroupListRequest {})
                .await?
                .into_inner();
            let ids: std::collections::HashSet<Bytes> =
                list.group_ids.into_iter().map(|g| g.id).collect();
            hosted.push(ids);
        }
        for g in 0..groups {
            let name = group_name(g);
            let mut missing = Vec::new();
            let mut present = 0;
            for ((addr, id), ids) in all.iter().zip(&hosted) {
                if ids.contains(name.as_bytes()) {
                    present += 1;
                } else {
                    missing.push((addr.clone(), *id));
                }
            }
            if present == 0 {
                create_group(&all, name.as_bytes(), "kv").await?;
            } else if !missing.is_empty() {
                eprintln!(
                    "group {name} exists on {present} of {n} members; leaving it as it is (add the others with `kuberaft peer add`)"
                );
            }
        }
        anyhow::Ok(all)
    };
    let all = match started.await {
        Ok(all) => all,
        Err(e) => {
            terminate(&mut members);
            return Err(e);
        }
    };
    let peers: Vec<String> = all.iter().map(|(a, _)| a.clone()).collect();
    // Wait for leaders so the printed commands work right away.
    let cli_like = Cli {
        peers: peers.clone(),
        group: DEFAULT_GROUP.into(),
        timeout: Duration::from_secs(30),
        cmd: Cmd::Group {
            cmd: GroupCmd::List,
        },
    };
    let leader = leader_address(&cli_like).await.ok();
    let ready = wait_ready(&members, Duration::from_secs(60)).await;
    println!(
        "kuberaft local cluster: {n} members, data in {}",
        dir.display()
    );
    match ready {
        Ok(()) => println!(
            "  every group has a leader on every member, {:.1} s after the members started",
            spawned.elapsed().as_secs_f64()
        ),
        Err(why) => println!("  not every group has a leader yet: {why}"),
    }
    for (m, (_, id)) in members.iter().zip(&all) {
        println!(
            "  member {} id {id}: gRPC {}  HTTP http://{}/status",
            m.index, m.addr, m.http
        );
    }
    if let Some(l) = leader {
        println!("  group {DEFAULT_GROUP}: leader at {l}");
    }
    println!();
    println!("Talk to it (another terminal):");
    println!("  export KUBERAFT_PEERS={}", peers.join(","));
    println!("  kuberaft put hello world && kuberaft get hello");
    println!("  kuberaft group info");
    println!("  kuberaft bench --clients 64 --duration 10s");
    println!(
        "Logs: {}/node-*.log. Ctrl-C stops the cluster; run again with the same --dir to restart it.",
        dir.display()
    );

    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                for m in members.iter_mut().filter(|m| m.running) {
                    if let Ok(Some(status)) = m.child.try_wait() {
                        m.running = false;
                        eprintln!(
                            "member {} ({}) exited: {status}; the others keep running (log: {}/node-{}.log)",
                            m.index, m.addr, dir.display(), m.index
                        );
                    }
                }
            }
        }
    }
    eprintln!("stopping the cluster...");
    terminate(&mut members);
    let deadline = Instant::now() + Duration::from_secs(15);
    for m in members.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, m.child.wait()).await.is_err() {
            let _ = m.child.kill().await;
        }
    }
    eprintln!("stopped");
    Ok(())
}

// ---------------------------------------------------------------------------
// bench
// ---------------------------------------------------------------------------

async fn bench(cli: &Cli, b: &BenchArgs) -> anyhow::Result<()> {
    if b.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if !(0.0..=1.0).contains(&b.read_ratio) {
        bail!("--read-ratio must be between 0 and 1");
    }
    let conns = b.connections.unwrap_or(b.clients.min(8)).max(1);
    let clients: Vec<Client> = (0..conns)
        .map(|_| client(cli))
        .collect::<anyhow::Result<_>>()?;
    // Find the leader before the clock starts.
    clients[0]
        .put(b"bench-warmup", b"x")
        .await
        .context("the cluster does not take writes")?;
    for c in &clients[1..] {
        c.put(b"bench-warmup", b"x").await?;
    }
    let value = Bytes::from(vec![b'v'; b.value_size]);
    let start = Instant::now();
    let end = start + b.duration;
    let mut tasks = Vec::new();
    for i in 0..b.clients {
        let c = clients[i % conns].clone();
        let value = value.clone();
        let (keys, ratio) = (b.keys.max(1), b.read_ratio);
        tasks.push(tokio::spawn(async move {
            let mut h =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let (mut writes, mut reads, mut errors) = (0u64, 0u64, 0u64);
            let mut last_error = None;
            while Instant::now() < end {
                let key = format!("bench-{}", rand::random::<u64>() % keys);
                let read = ratio > 0.0 && rand::random::<f64>() < ratio;
                let t = Instant::now();
                let r = if read {
                    c.get(key.as_bytes()).await.map(|_| ())
                } else {
                    c.put(key.as_bytes(), &value).await.map(|_| ())
                };
                match r {
                    Ok(()) => {
                        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                        if read { reads += 1 } else { writes += 1 }
                    }
                    Err(e) => {
                        errors += 1;
                        last_error = Some(e.to_string());
                    }
                }
            }
            (h, writes, reads, errors, last_error)
        }));
    }
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut writes, mut reads, mut errors) = (0, 0, 0);
    let mut last_error = None;
    for t in tasks {
        let (th, w, r, e, le) = t.await?;
        h.add(th).expect("same bounds");
        writes += w;
        reads += r;
        errors += e;
        last_error = last_error.or(le);
    }
    let secs = start.elapsed().as_secs_f64();
    let ops = writes + reads;
    let ops_per_sec = ops as f64 / secs;
    if b.json {
        let v = serde_json::json!({
            "clients": b.clients,
            "connections": conns,
            "duration_s": secs,
            "value_size": b.value_size,
            "read_ratio": b.read_ratio,
            "ops": ops,
            "writes": writes,
            "reads": reads,
            "ops_per_sec": ops_per_sec,
            "p50_us": h.value_at_quantile(0.5),
            "p90_us": h.value_at_quantile(0.9),
            "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999),
            "max_us": h.max(),
            "errors": errors,
        });
        println!("{v}");
    } else {
        println!(
            "{ops} ops in {secs:.1} s: {ops_per_sec:.0} ops/s ({writes} writes, {reads} reads), {errors} errors; {} clients, {} B values",
            b.clients, b.value_size
        );
        println!(
            "latency: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.value_at_quantile(0.999) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        );
        if let Some(e) = last_error {
            println!("last error: {e}");
        }
    }
    if ops == 0 {
        bail!("no operation succeeded");
    }
    Ok(())
}

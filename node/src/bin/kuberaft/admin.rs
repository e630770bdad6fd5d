//! Admin commands (group, peer, election, snapshot), spoken to members over
//! the admin gRPC service. Calls only a leader can serve go through
//! `at_leader`, which finds the leader by asking the `--peers` and follows
//! NotLeader answers until `--timeout`; calls addressed to one member
//! (`--member`) find it through `member_address`, which asks the `--peers`
//! in turn. Removals and priority changes are compare-and-set against the
//! configuration just read, so a concurrent change makes them fail instead
//! of being overwritten.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use kuberaft_node::rpc::peer::channel;
use kuberaft_proto::v1 as pb;
use kuberaft_proto::v1::admin_protocol_service_client::AdminProtocolServiceClient;
use tonic::transport::Channel;

use super::{Cli, Cmd, ElectionCmd, GroupCmd, PeerCmd, SnapshotCmd, gid};

pub(super) async fn admin(address: &str) -> anyhow::Result<AdminProtocolServiceClient<Channel>> {
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
pub(super) async fn leader_address(cli: &Cli) -> anyhow::Result<String> {
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

/// Where to reach `member` for a command addressed to it. Each of the
/// `--peers` is asked in turn until one knows: a peer that is the member,
/// or one whose configuration of the group lists it. A peer that is down
/// only costs its turn, since a member being down is exactly when an
/// operator reaches for these commands.
async fn member_address(cli: &Cli, member: u64) -> anyhow::Result<String> {
    let mut problems = Vec::new();
    for p in &cli.peers {
        match whereis(cli, p, member).await {
            Ok(Some(addr)) => return Ok(addr),
            Ok(None) => {}
            Err(why) => problems.push(format!("{p}: {why}")),
        }
    }
    let mut msg = format!(
        "member {member} of group {} is not known to any of --peers {}",
        cli.group,
        cli.peers.join(",")
    );
    if !problems.is_empty() {
        msg.push_str(&format!(" (unanswered: {})", problems.join("; ")));
    }
    Err(anyhow!(msg))
}

/// What peer `p` knows of `member`'s address: `None` if it does not know
/// the member, an error if it could not be asked.
async fn whereis(cli: &Cli, p: &str, member: u64) -> Result<Option<String>, String> {
    let mut a = admin(p).await.map_err(|e| format!("{e:#}"))?;
    let info = match a
        .group_info(pb::GroupInfoRequest { group_id: gid(cli) })
        .await
    {
        Ok(r) => r.into_inner(),
        // A member outside the group can still be the one addressed; the
        // command itself then says what is wrong.
        Err(s) if s.code() == tonic::Code::NotFound => {
            let list = a
                .group_list(pb::GroupListRequest {})
                .await
                .map_err(|s| s.message().to_string())?;
            return Ok((list.into_inner().server_id == member).then(|| p.to_string()));
        }
        Err(s) => return Err(s.message().to_string()),
    };
    if info.server_id == member {
        return Ok(Some(p.to_string()));
    }
    let listed = info
        .configuration
        .iter()
        .flat_map(|c| c.peers.iter().chain(&c.old_peers))
        .find(|m| m.id == member);
    Ok(listed.map(|m| {
        [&m.admin_address, &m.client_address, &m.address]
            .into_iter()
            .find(|a| !a.is_empty())
            .cloned()
            .unwrap_or_default()
    }))
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

pub(super) async fn create_group(
    members: &[(String, u64)],
    group: &[u8],
    sm: &str,
) -> anyhow::Result<()> {
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
                .await
                .map_err(|s| anyhow!("member {member} at {addr}: {}", s.message()))?
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

/// Runs an admin command; `main` routes no other here.
pub(super) async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
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
                .await
                .map_err(|s| anyhow!("member {member} at {addr}: {}", s.message()))?
                .into_inner();
            check(&r)?;
            println!("snapshot at index {} on member {member}", r.log_index);
            Ok(())
        }
        _ => unreachable!("not an admin command"),
    }
}

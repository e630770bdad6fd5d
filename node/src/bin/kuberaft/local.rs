//! `local up`: runs N kuberaft-node processes on this machine, each with its
//! own data directory and log under `--dir`, creates the groups no member
//! hosts yet and waits (up to a minute) for every member to be ready. Ctrl-C
//! or SIGTERM stops the cluster: each member gets SIGTERM, and a kill if it
//! has not exited 15 s later. Running again on the same `--dir` restarts it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use kuberaft_node::client::DEFAULT_GROUP;
use kuberaft_proto::v1 as pb;

use super::admin::{admin, create_group, leader_address};
use super::{Cli, Cmd, GroupCmd};

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

pub(super) async fn local_up(
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

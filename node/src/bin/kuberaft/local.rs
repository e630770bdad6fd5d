//! `local up`: runs N kuberaft-node processes on this machine, each with its
//! own data directory and log under `--dir`, creates the groups no member
//! hosts yet and waits (up to a minute) for every member to be ready. Ctrl-C
//! or SIGTERM stops the cluster: each member gets SIGTERM, and a kill if it
//! has not exited 15 s later. Running again on the same `--dir` restarts it.
//!
//! A restarted member that cannot start (a corrupt log, say) does not stop
//! the others: they serve without it, as a real cluster would, and `local up`
//! prints the member's own error and how to replace it. Only a new cluster
//! needs every member, since its groups are created with all of them.

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
async fn wait_ready(members: &[&Member], limit: Duration) -> Result<(), String> {
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
    /// Why it could not start, in one line.
    failure: Option<String>,
    /// Its log, and the log's length before this run: what it says from
    /// there on is about this run.
    log: PathBuf,
    log_start: u64,
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
    let log_start = log.metadata().map_or(0, |m| m.len());
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
        failure: None,
        log: log_path,
        log_start,
    })
}

impl Member {
    /// Why the member stopped, in its own words: the last error it logged
    /// in this run. `kuberaft-node` ends with one `kuberaft-node: ...` line
    /// when it fails; a crash may leave only an ERROR event.
    fn last_error(&self) -> Option<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.log).ok()?;
        f.seek(SeekFrom::Start(self.log_start)).ok()?;
        let mut log = Vec::new();
        f.read_to_end(&mut log).ok()?;
        let run = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = run.lines().collect();
        let own = lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("kuberaft-node: "));
        own.or_else(|| lines.iter().rev().find(|l| l.contains(" ERROR ")).copied())
            .map(|l| l.trim().to_string())
    }

    /// One line on why the member exited, with where its log is.
    fn exit_report(&self, status: std::process::ExitStatus) -> String {
        match self.last_error() {
            Some(e) => format!(
                "member {} ({}) exited ({status}): {e} (log: {})",
                self.index,
                self.addr,
                self.log.display()
            ),
            None => format!(
                "member {} ({}) exited ({status}); see {}",
                self.index,
                self.addr,
                self.log.display()
            ),
        }
    }
}

/// How to replace a member that cannot start: its data goes aside and it
/// comes back as a new member (docs/storage.md: a member with damaged
/// storage is restored from its healthy peers, never patched up).
fn repair_advice(m: &Member, dir: &Path, groups: usize) -> String {
    let data = dir.join(format!("node-{}", m.index));
    let old_id = std::fs::read_to_string(data.join("member-id"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "<its old member id>".into());
    let each = if groups > 1 {
        "\n    (3 and 4 for every group, each with --group NAME)"
    } else {
        ""
    };
    format!(
        "  The other members serve without it. To replace it:\n\
         \x20   1. stop local up (Ctrl-C) and move its data aside: mv {data} {data}.broken\n\
         \x20   2. run local up again with the same --dir: member {i} starts empty, as a new member\n\
         \x20   3. kuberaft peer remove --id {old_id}\n\
         \x20   4. kuberaft peer add --address {addr}{each}",
        data = data.display(),
        i = m.index,
        addr = m.addr,
    )
}

/// Waits until the member serves; `None` if it exited instead.
async fn wait_serving(m: &mut Member) -> anyhow::Result<Option<u64>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = m.child.try_wait()? {
            m.running = false;
            m.failure = Some(m.exit_report(status));
            return Ok(None);
        }
        if let Ok(mut a) = admin(&m.addr).await
            && let Ok(r) = a.group_list(pb::GroupListRequest {}).await
        {
            return Ok(Some(r.into_inner().server_id));
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
            ids.push(wait_serving(m).await?);
        }
        let failed: Vec<&Member> = members.iter().filter(|m| !m.running).collect();
        if failed.len() == n {
            let why: Vec<String> = failed.iter().filter_map(|m| m.failure.clone()).collect();
            bail!("no member could start: {}", why.join("; "));
        }
        let live: Vec<(String, u64)> = members
            .iter()
            .zip(&ids)
            .filter_map(|(m, id)| Some((m.addr.clone(), (*id)?)))
            .collect();
        // What each member hosts already (a restart on the same --dir).
        let mut hosted = Vec::new();
        for (addr, _) in &live {
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
            for ((addr, id), ids) in live.iter().zip(&hosted) {
                if ids.contains(name.as_bytes()) {
                    present += 1;
                } else {
                    missing.push((addr.clone(), *id));
                }
            }
            if present == 0 && !failed.is_empty() {
                // Created without them, the group would never have them.
                let why: Vec<String> = failed.iter().filter_map(|m| m.failure.clone()).collect();
                bail!(
                    "group {name} is new and needs every member, but {}",
                    why.join("; ")
                );
            } else if present == 0 {
                create_group(&live, name.as_bytes(), "kv").await?;
            } else if !missing.is_empty() {
                eprintln!(
                    "group {name} exists on {present} of {n} members; leaving it as it is (add the others with `kuberaft peer add`)"
                );
            }
        }
        anyhow::Ok(ids)
    };
    let ids = match started.await {
        Ok(ids) => ids,
        Err(e) => {
            terminate(&mut members);
            return Err(e);
        }
    };
    let peers: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
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
    let running: Vec<&Member> = members.iter().filter(|m| m.running).collect();
    let ready = wait_ready(&running, Duration::from_secs(60)).await;
    println!(
        "kuberaft local cluster: {n} members, data in {}",
        dir.display()
    );
    match ready {
        Ok(()) => println!(
            "  every group has a leader on every running member, {:.1} s after the members started",
            spawned.elapsed().as_secs_f64()
        ),
        Err(why) => println!("  not every group has a leader yet: {why}"),
    }
    for (m, id) in members.iter().zip(&ids) {
        match id {
            Some(id) => println!(
                "  member {} id {id}: gRPC {}  HTTP http://{}/status",
                m.index, m.addr, m.http
            ),
            None => println!("  member {}: NOT RUNNING, it could not start", m.index),
        }
    }
    if let Some(l) = leader {
        println!("  group {DEFAULT_GROUP}: leader at {l}");
    }
    // On stdout with the rest of the report, where a reader of the banner
    // finds it.
    for m in members.iter().filter(|m| !m.running) {
        println!();
        println!("{}", m.failure.as_deref().unwrap_or_default());
        println!("{}", repair_advice(m, dir, groups));
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
                        eprintln!("{}; the others keep running", m.exit_report(status));
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

//! Real `kuberaft-node` processes on loopback for the cluster tests.
//!
//! Ports come from binding port 0 (so parallel tests never collide), every
//! wait polls a condition against a deadline, and `Drop` kills every process
//! a test started, also when the test fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kuberaft_node::client::{Client, ClientOptions};
use kuberaft_node::core::FEATURE_LEVEL;
use kuberaft_node::rpc::peer::channel;
use kuberaft_proto::v1 as pb;
use kuberaft_proto::v1::admin_protocol_service_client::AdminProtocolServiceClient;
use tonic::transport::Channel;

pub const NODE: &str = env!("CARGO_BIN_EXE_kuberaft-node");
pub const CLI: &str = env!("CARGO_BIN_EXE_kuberaft");

/// Generous: the test machine has two cores shared with other tests.
pub const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[derive(Debug)]
pub struct Member {
    pub addr: String,
    pub http: String,
    pub data: PathBuf,
    pub id: u64,
    /// Flags for this member only, after the cluster's (a member playing
    /// an older version, say); used from its next (re)start.
    pub args: Vec<String>,
    child: Option<Child>,
}

#[derive(Debug)]
pub struct Cluster {
    pub members: Vec<Member>,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

pub async fn poll<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn admin(addr: &str) -> AdminProtocolServiceClient<Channel> {
    AdminProtocolServiceClient::new(channel(addr).expect("address"))
}

pub fn gid(name: &str) -> Option<pb::GroupId> {
    Some(pb::GroupId {
        id: Bytes::copy_from_slice(name.as_bytes()),
    })
}

impl Cluster {
    /// Starts `n` nodes (with `extra` flags) and waits until they serve.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        let mut c = Cluster {
            members: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for _ in 0..n {
            c.add_member().await;
        }
        c
    }

    /// Starts one more node (not in any group yet); returns its index.
    pub async fn add_member(&mut self) -> usize {
        let i = self.members.len();
        self.members.push(Member {
            addr: format!("127.0.0.1:{}", free_port()),
            http: format!("127.0.0.1:{}", free_port()),
            data: self.dir.path().join(format!("node-{i}")),
            id: 0,
            args: Vec::new(),
            child: None,
        });
        self.restart(i).await;
        i
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}.log"))
    }

    /// (Re)starts member `i` on its data directory and waits until it serves.
    pub async fn restart(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("log file");
        let m = &mut self.members[i];
        let child = Command::new(NODE)
            .args(["--data-dir", m.data.to_str().expect("utf-8 path")])
            .args(["--listen", &m.addr, "--http-listen", &m.http])
            .args(&self.extra)
            .args(&m.args)
            .env("KUBERAFT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start kuberaft-node");
        m.child = Some(child);
        let addr = m.addr.clone();
        let id = poll(&format!("member {i} to serve"), || {
            let addr = addr.clone();
            async move {
                let mut a = admin(&addr).await;
                a.group_list(pb::GroupListRequest {})
                    .await
                    .ok()
                    .map(|r| r.into_inner().server_id)
            }
        })
        .await;
        assert!(
            self.members[i].id == 0 || self.members[i].id == id,
            "a restarted member keeps its id"
        );
        self.members[i].id = id;
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns whether the process exited successfully in time.
    pub fn terminate(&mut self, i: usize) -> bool {
        let Some(mut c) = self.members[i].child.take() else {
            return false;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addrs(&self, which: &[usize]) -> Vec<String> {
        which
            .iter()
            .map(|i| self.members[*i].addr.clone())
            .collect()
    }

    pub fn all(&self) -> Vec<usize> {
        (0..self.members.len()).collect()
    }

    fn peer(&self, i: usize) -> pb::Peer {
        pb::Peer {
            id: self.members[i].id,
            address: self.members[i].addr.clone(),
            role: pb::PeerRole::Voter as i32,
            ..Default::default()
        }
    }

    /// Creates `group` on `on` with those members as voters.
    pub async fn create_group(&self, group: &str, sm: &str, on: &[usize]) {
        let peers: Vec<pb::Peer> = on.iter().map(|i| self.peer(*i)).collect();
        for i in on {
            let r = admin(&self.members[*i].addr)
                .await
                .group_management(pb::GroupManagementRequest {
                    op: Some(pb::group_management_request::Op::Add(pb::GroupAdd {
                        group_id: gid(group),
                        peers: peers.clone(),
                        listeners: Vec::new(),
                        state_machine: sm.into(),
                    })),
                })
                .await
                .expect("groupManagement")
                .into_inner();
            assert!(r.success, "creating {group} on member {i}: {}", r.error);
        }
    }

    pub async fn info(&self, i: usize, group: &str) -> Option<pb::GroupInfoReply> {
        let mut a = admin(&self.members[i].addr).await;
        a.group_info(pb::GroupInfoRequest {
            group_id: gid(group),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
    }

    /// Waits until one of `among` leads `group` and the others agree;
    /// returns its index.
    pub async fn leader(&self, group: &str, among: &[usize]) -> usize {
        poll(&format!("a leader of {group}"), || async {
            let mut leader = None;
            for i in among {
                let info = self.info(*i, group).await?;
                if info.role() == pb::RaftRole::Leader {
                    leader = Some(*i);
                }
            }
            let l = leader?;
            for i in among {
                if self.info(*i, group).await?.leader_id != self.members[l].id {
                    return None;
                }
            }
            Some(l)
        })
        .await
    }

    /// Waits until member `i` leads `group`.
    pub async fn becomes_leader(&self, i: usize, group: &str) {
        poll(&format!("member {i} to lead {group}"), || async {
            let info = self.info(i, group).await?;
            (info.role() == pb::RaftRole::Leader).then_some(())
        })
        .await
    }

    /// Waits until member `i`, leading `group`, has raised the group's
    /// cluster level and committed its whole log: from then on the log
    /// moves only on what a test sends.
    pub async fn settled(&self, i: usize, group: &str) {
        poll(&format!("member {i} to settle {group}"), || async {
            let g = self.group_status(i, group)?;
            let level = g["cluster_level"].as_u64()? == u64::from(FEATURE_LEVEL);
            (g["role"] == "leader" && level && g["commit_index"] == g["last_index"]).then_some(())
        })
        .await
    }

    /// Member `i`'s `/status` entry for `group`.
    pub fn group_status(&self, i: usize, group: &str) -> Option<serde_json::Value> {
        let (_, body) = self.http_get(i, "/status");
        let mut status: serde_json::Value = serde_json::from_str(&body).ok()?;
        let groups = status["groups"].as_array_mut()?;
        let at = groups.iter().position(|g| g["group"] == group)?;
        Some(groups.swap_remove(at))
    }

    /// Waits until member `i` applied everything the leader committed.
    pub async fn caught_up(&self, i: usize, group: &str, leader: usize) {
        poll(&format!("member {i} to catch up"), || async {
            let l = self.info(leader, group).await?;
            let m = self.info(i, group).await?;
            (m.applied_index >= l.commit_index && l.commit_index > 0).then_some(())
        })
        .await
    }

    pub fn client(&self, group: &str, which: &[usize]) -> Client {
        let opts = ClientOptions {
            timeout: Duration::from_secs(30),
            ..Default::default()
        };
        Client::new(&self.addrs(which), group.as_bytes(), opts).expect("client")
    }

    /// Runs the `kuberaft` CLI against `which`; returns (success, stdout, stderr).
    pub fn cli(&self, which: &[usize], args: &[&str]) -> (bool, String, String) {
        let out = Command::new(CLI)
            .arg("--peers")
            .arg(self.addrs(which).join(","))
            .args(args)
            .output()
            .expect("run kuberaft");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// GET an HTTP path of member `i`: (status code, body).
    pub fn http_get(&self, i: usize, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.members[i].http).expect("connect http");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut buf = String::new();
        s.read_to_string(&mut buf).expect("read");
        let code = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (code, body)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for i in 0..self.members.len() {
                let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- member {i} log (last lines) ---");
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

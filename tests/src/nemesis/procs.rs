//! `kuberaft-node` processes on loopback, behind the proxies of [`Net`]:
//! start, SIGKILL and restart, SIGSTOP and SIGCONT, and a data directory on
//! a small tmpfs that can be filled up. Every process is killed and every
//! mount undone when the [`Procs`] is dropped, also on a panic.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use kuberaft_node::rpc::peer::channel;
use kuberaft_proto::v1 as pb;
use kuberaft_proto::v1::admin_protocol_service_client::AdminProtocolServiceClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::TcpListener;

use super::net::{Net, source_ip};

/// Finds the `kuberaft-node` binary next to the running executable (the
/// same target directory and profile), building it when it is missing and
/// this runs under cargo.
pub fn node_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable without a directory")?;
    // Integration tests run from target/<profile>/deps.
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps without a parent")?;
    }
    let bin = dir.join("kuberaft-node");
    if bin.exists() {
        return Ok(bin);
    }
    let Some(cargo) = std::env::var_os("CARGO") else {
        bail!(
            "{} is missing; build it first: cargo build --release -p kuberaft-node",
            bin.display()
        );
    };
    let release = dir.ends_with("release");
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "kuberaft-node", "--bin", "kuberaft-node"]);
    if release {
        build.arg("--release");
    }
    let ok = build.status().context("running cargo build")?.success();
    if !ok || !bin.exists() {
        bail!("could not build {}", bin.display());
    }
    Ok(bin)
}

/// One member: its ports, its data and its process (if running).
#[derive(Debug)]
pub struct Member {
    pub id: u64,
    /// The proxy's address: what peers and clients use.
    pub addr: String,
    listen: SocketAddr,
    http: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub stopped: bool,
    /// The tmpfs the data lives on, when this member can have a full disk.
    tmpfs: Option<PathBuf>,
}

/// The members of a test cluster.
#[derive(Debug)]
pub struct Procs {
    pub members: Vec<Member>,
    pub net: Net,
    bin: PathBuf,
    extra: Vec<String>,
}

async fn free_listener() -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

async fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(free_listener().await?.local_addr()?)
}

impl Procs {
    pub fn new(bin: PathBuf, extra: &[&str]) -> Self {
        Procs {
            members: Vec::new(),
            net: Net::default(),
            bin,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Adds and starts member `members.len()` with its data under `root`;
    /// with `tmpfs_mb`, its data directory is a tmpfs of that size.
    pub async fn add(&mut self, root: &Path, tmpfs_mb: Option<u64>) -> anyhow::Result<usize> {
        let i = self.members.len();
        let proxy = free_listener().await?;
        let addr = proxy.local_addr()?;
        let listen = free_port().await?;
        let data = root.join(format!("member-{i}"));
        std::fs::create_dir_all(&data)?;
        let mut tmpfs = None;
        if let Some(mb) = tmpfs_mb {
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
                .arg(&data)
                .output()
                .context("running mount")?;
            if !out.status.success() {
                bail!(
                    "mounting a tmpfs on {}: {}",
                    data.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            tmpfs = Some(data.clone());
        }
        self.net.proxy(proxy, i, listen);
        self.members.push(Member {
            id: 0,
            addr: addr.to_string(),
            listen,
            http: free_port().await?,
            data,
            log: root.join(format!("member-{i}.log")),
            child: None,
            stopped: false,
            tmpfs,
        });
        self.start(i).await?;
        Ok(i)
    }

    /// Starts member `i`'s process and waits until it answers.
    pub async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        let log = File::options().create(true).append(true).open(&m.log)?;
        let child = Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen", &m.listen.to_string()])
            .args(["--advertise", &m.addr])
            .args(["--http-listen", &m.http.to_string()])
            .args(["--source-address", &source_ip(i).to_string()])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        m.child = Some(child);
        m.stopped = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(list) = self
                .admin(i)
                .await
                .group_list(pb::GroupListRequest {})
                .await
            {
                self.members[i].id = list.into_inner().server_id;
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "member {i} exited at start ({status}); see {}",
                    self.members[i].log.display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!("member {i} did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.members[i].stopped = false;
    }

    /// The process id of a running member (to signal it from another task).
    pub fn pid(&self, i: usize) -> Option<i32> {
        self.members[i].child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGSTOP (`stop`) or SIGCONT.
    pub fn pause(&mut self, i: usize, stop: bool) {
        if let Some(c) = &self.members[i].child {
            let sig = if stop {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            };
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
            self.members[i].stopped = stop;
        }
    }

    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Fills member `i`'s tmpfs (`full`) or frees it again. Returns false if
    /// the member has no tmpfs.
    pub fn fill_disk(&self, i: usize, full: bool) -> anyhow::Result<bool> {
        let Some(dir) = &self.members[i].tmpfs else {
            return Ok(false);
        };
        let ballast = dir.join("ballast");
        if !full {
            let _ = std::fs::remove_file(&ballast);
            return Ok(true);
        }
        let mut f = File::create(&ballast)?;
        let chunk = vec![0u8; 1 << 20];
        loop {
            use std::io::Write;
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // Whatever page is left goes too.
        let _ = f.sync_all();
        Ok(true)
    }

    pub async fn admin(&self, i: usize) -> AdminProtocolServiceClient<tonic::transport::Channel> {
        let ch = channel(&self.members[i].addr).expect("a valid address");
        AdminProtocolServiceClient::new(ch)
    }

    pub fn peer(&self, i: usize) -> pb::Peer {
        pb::Peer {
            id: self.members[i].id,
            address: self.members[i].addr.clone(),
            role: pb::PeerRole::Voter as i32,
            ..Default::default()
        }
    }

    /// The last lines of member `i`'s log, for a report.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.pause(i, false);
            self.kill(i);
            if let Some(dir) = &self.members[i].tmpfs {
                let _ = Command::new("umount").arg(dir).status();
            }
        }
    }
}

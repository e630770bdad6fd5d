//! The multi-group registry (Ratis's RaftServerProxy): one per process.
//!
//! Layout of a data directory:
//! - `member-id`: this node's member id, created on first start. A node that
//!   starts on an empty directory is a new member with a new id, never an old
//!   one (a wiped member reusing its id could vote twice in a term);
//! - `groups/<hex group id>/`: one directory per hosted group, with the
//!   group's storage and a `GROUP` file naming its state machine. `GROUP` is
//!   written last when a group is created, so a directory without it is an
//!   unfinished creation and is ignored;
//! - `removed/`: groups removed without deleting their data.
//!
//! The set of groups therefore survives a restart: `Node::open` starts a task
//! for every complete group directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::group::{
    GroupHandle, GroupMsg, GroupOptions, GroupStart, Transport, display_group, spawn_group,
};
use super::metrics::Metrics;
use crate::core::{Membership, NodeId, PeerInfo};
use crate::statemachine;
use crate::storage::fs::{FileSystem, StdFs, write_atomic};
use crate::storage::{GroupStorageOptions, LogPool, Meta, MetaStore, open_group};

/// Groups by id, shared by the registry and the transport (which delivers
/// peers' replies to groups).
pub type Router = Arc<RwLock<HashMap<Bytes, GroupHandle>>>;

pub const MAX_GROUP_ID_BYTES: usize = 64;
const MEMBER_ID_FILE: &str = "member-id";
const GROUP_FILE: &str = "GROUP";

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    /// The address peers and clients reach this node at (host:port).
    pub advertise: String,
    pub group: GroupOptions,
    pub storage: GroupStorageOptions,
    /// Threads writing the groups' logs (see `storage::LogPool`).
    pub log_threads: usize,
}

/// Why a node or group operation failed; says what to do.
///
/// A variant either spells its cause out in its message or wraps it
/// transparently, never both: whoever prints the chain of causes (`{:#}`
/// in the binaries) would otherwise print the cause twice.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "group {0} does not exist on this node; create it with groupManagement add \
         (on the command line: kuberaft group create --group NAME)"
    )]
    UnknownGroup(String),
    #[error("group {0} already exists on this node")]
    GroupExists(String),
    #[error("invalid group id: {0}")]
    BadGroupId(String),
    #[error("invalid peers: {0}")]
    BadPeers(String),
    #[error(transparent)]
    StateMachine(#[from] statemachine::StateMachineError),
    /// Names the file and what to do about it.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + use<> {
    let path = path.to_path_buf();
    move |error| NodeError::Io { what, path, error }
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Bytes> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

#[derive(Debug)]
pub struct Node {
    pub id: NodeId,
    pub opts: NodeOptions,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    transport: Arc<dyn Transport>,
    tasks: Mutex<HashMap<Bytes, JoinHandle<()>>>,
    fs: Arc<dyn FileSystem>,
    log_pool: LogPool,
    /// Serialises group creation and removal.
    admin: tokio::sync::Mutex<()>,
}

/// Reads this node's member id, creating one for an empty data directory.
pub fn load_member_id(data_dir: &Path) -> Result<NodeId, NodeError> {
    std::fs::create_dir_all(data_dir).map_err(io_err("create data directory", data_dir))?;
    let path = data_dir.join(MEMBER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<NodeId>().ok().filter(|id| *id != 0).ok_or_else(|| {
            NodeError::Start(format!(
                "{} does not hold a member id; restore it, or wipe the data directory to join as a new member",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if data_dir.join("groups").exists() {
                return Err(NodeError::Start(format!(
                    "{} holds groups but no member id; restore {MEMBER_ID_FILE}, or wipe the directory to join as a new member",
                    data_dir.display()
                )));
            }
            // 53 bits: exact in JSON numbers and JavaScript tooling.
            let id = (rand::random::<u64>() >> 11).max(1);
            write_atomic(&StdFs, &path, id.to_string().as_bytes())
                .map_err(io_err("write member id", &path))?;
            Ok(id)
        }
        Err(e) => Err(io_err("read member id", &path)(e)),
    }
}

impl Node {
    /// Opens the data directory and starts every group it holds.
    /// `transport` is built once the member id is known.
    pub fn open(
        opts: NodeOptions,
        transport: impl FnOnce(NodeId, Router) -> Arc<dyn Transport>,
    ) -> Result<Arc<Node>, NodeError> {
        let id = load_member_id(&opts.data_dir)?;
        let router: Router = Arc::default();
        let node = Arc::new(Node {
            id,
            transport: transport(id, router.clone()),
            router,
            metrics: Arc::new(Metrics::new()),
            tasks: Mutex::default(),
            fs: Arc::new(StdFs),
            log_pool: LogPool::new(opts.log_threads)
                .map_err(|e| NodeError::Start(format!("starting the log threads: {e}")))?,
            admin: tokio::sync::Mutex::new(()),
            opts,
        });
        let groups_dir = node.opts.data_dir.join("groups");
        std::fs::create_dir_all(&groups_dir).map_err(io_err("create", &groups_dir))?;
        let mut names: Vec<String> = std::fs::read_dir(&groups_dir)
            .map_err(io_err("list", &groups_dir))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            let dir = groups_dir.join(&name);
            let Some(gid) = unhex(&name) else {
                tracing::warn!(dir = %dir.display(), "ignoring a directory that is not a group");
                continue;
            };
            let sm = match std::fs::read_to_string(dir.join(GROUP_FILE)) {
                Ok(s) => s.trim().to_string(),
                Err(_) => {
                    tracing::warn!(dir = %dir.display(), "removing an unfinished group creation");
                    std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
                    continue;
                }
            };
            node.start_group(gid, &dir, &sm)?;
        }
        Ok(node)
    }

    fn group_dir(&self, id: &[u8]) -> PathBuf {
        self.opts.data_dir.join("groups").join(hex(id))
    }

    fn start_group(&self, id: Bytes, dir: &Path, sm_name: &str) -> Result<(), NodeError> {
        let recovered = open_group(self.fs.clone(), dir, &self.opts.storage)?;
        let state_machine = statemachine::builtin(sm_name)?;
        let (handle, task) = spawn_group(GroupStart {
            id: id.clone(),
            node_id: self.id,
            recovered,
            state_machine,
            sm_name: if sm_name.is_empty() { "kv" } else { sm_name }.to_string(),
            opts: self.opts.group.clone(),
            transport: self.transport.clone(),
            metrics: self.metrics.clone(),
            log_pool: self.log_pool.clone(),
        })
        .map_err(|e| NodeError::Start(format!("group {}: {e}", display_group(&id))))?;
        tracing::info!(group = %display_group(&id), "group started");
        self.router
            .write()
            .expect("router lock")
            .insert(id.clone(), handle);
        self.tasks.lock().expect("tasks lock").insert(id, task);
        Ok(())
    }

    /// How this node's groups reach their peers.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    pub fn group(&self, id: &[u8]) -> Option<GroupHandle> {
        self.router.read().expect("router lock").get(id).cloned()
    }

    pub fn groups(&self) -> Vec<GroupHandle> {
        let mut v: Vec<GroupHandle> = self
            .router
            .read()
            .expect("router lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Creates a group on this node with its initial members (none for a
    /// member that will be added by setConfiguration).
    pub async fn add_group(
        &self,
        id: Bytes,
        voters: &[PeerInfo],
        listeners: &[PeerInfo],
        state_machine: &str,
    ) -> Result<(), NodeError> {
        if id.is_empty() || id.len() > MAX_GROUP_ID_BYTES {
            return Err(NodeError::BadGroupId(format!(
                "{} bytes; use 1 to {MAX_GROUP_ID_BYTES} bytes",
                id.len()
            )));
        }
        statemachine::builtin(state_machine)?;
        let membership = if voters.is_empty() && listeners.is_empty() {
            Membership::default()
        } else {
            Membership::from_lists(voters, listeners)
                .map_err(|e| NodeError::BadPeers(e.to_string()))?
        };
        if let Some(p) = voters
            .iter()
            .chain(listeners)
            .find(|p| p.address.is_empty())
        {
            return Err(NodeError::BadPeers(format!(
                "member {} has no address; give every member host:port",
                p.id
            )));
        }
        let _guard = self.admin.lock().await;
        if self.group(&id).is_some() {
            return Err(NodeError::GroupExists(display_group(&id)));
        }
        let dir = self.group_dir(&id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err("remove stale", &dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let meta = Meta {
            initial_membership: membership,
            ..Default::default()
        };
        MetaStore::new(self.fs.clone(), &dir).store(&meta)?;
        let name = if state_machine.is_empty() {
            "kv"
        } else {
            state_machine
        };
        write_atomic(self.fs.as_ref(), &dir.join(GROUP_FILE), name.as_bytes())
            .map_err(io_err("write", &dir))?;
        self.start_group(id, &dir, name)
    }

    /// Stops a group and deletes its data, or moves it to `removed/`.
    pub async fn remove_group(&self, id: &[u8], delete_data: bool) -> Result<(), NodeError> {
        let _guard = self.admin.lock().await;
        let handle = self
            .router
            .write()
            .expect("router lock")
            .remove(id)
            .ok_or_else(|| NodeError::UnknownGroup(display_group(id)))?;
        stop_group(&handle, false).await;
        let task = self.tasks.lock().expect("tasks lock").remove(id);
        if let Some(t) = task {
            let _ = t.await;
        }
        self.metrics.remove_group(&display_group(id));
        let dir = self.group_dir(id);
        if delete_data {
            std::fs::remove_dir_all(&dir).map_err(io_err("delete", &dir))?;
        } else {
            let removed = self.opts.data_dir.join("removed");
            std::fs::create_dir_all(&removed).map_err(io_err("create", &removed))?;
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let dest = removed.join(format!("{}-{stamp}", hex(id)));
            std::fs::rename(&dir, &dest).map_err(io_err("move removed group", &dir))?;
        }
        tracing::info!(group = %display_group(id), delete_data, "group removed");
        Ok(())
    }

    /// Stops every group; leaders hand leadership over first.
    pub async fn shutdown(&self) {
        let groups = self.groups();
        let stops = groups.iter().map(|g| stop_group(g, true));
        futures_util::future::join_all(stops).await;
        let tasks: Vec<JoinHandle<()>> = self
            .tasks
            .lock()
            .expect("tasks lock")
            .drain()
            .map(|(_, t)| t)
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

async fn stop_group(g: &GroupHandle, transfer: bool) {
    let (tx, rx) = oneshot::channel();
    if g.tx
        .send(GroupMsg::Shutdown {
            transfer,
            reply: tx,
        })
        .await
        .is_ok()
    {
        let _ = rx.await;
    }
}

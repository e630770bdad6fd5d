//! The group owner task: one tokio task per hosted group (Ratis's "division")
//! that owns the group's [`RaftCore`], its state machine ([`Applier`]), its
//! snapshot store and, through a [`LogWorker`] on the node's log threads,
//! its log.
//!
//! Everything that touches the group is a [`GroupMsg`] in the task's inbox:
//! peer messages, client requests, admin calls. The task handles every
//! message queued (up to a batch limit), then drains the core's Readies, so
//! many client writes that arrive together become one log append and one
//! fsync. Executing a Ready follows the rules in `core/ready.rs`:
//!
//! 1. the persistence part goes to the log worker as one
//!    [`WriteBatch`](crate::storage::WriteBatch);
//! 2. `messages` leave at once; `persisted_messages` wait until the batch
//!    (or, for a Ready with nothing to persist, every batch before it) is
//!    reported durable;
//! 3. committed entries are applied in order and their waiting clients
//!    answered; reads whose index is applied are served.
//!
//! Replies to peer requests (vote, append, read index, install snapshot
//! replies) go back the way the request came ([`ReplyPath`]): on the
//! append stream the request arrived on, or as the answer of a unary call.
//! That is why a member added to a group can answer its leader before it
//! knows the leader's address.
//!
//! This file holds the group's types, its start (`spawn_group`) and the
//! handles others keep; the task's work is split into `run` (the loop),
//! `requests` (the inbox), `ready` (executing Readies), `snapshot` and `view`
//! (the published [`GroupView`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kuberaft_proto::v1 as pb;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use super::apply::Applier;
use super::limits::{PendingLimits, Permit};
use super::metrics::{GroupLabel, Metrics};
use super::retry_cache::CallKey;
use crate::core::{
    ConfChangeRequest, Config, Envelope, Index, InstallSnapshot, Membership, Message, NodeId,
    PeerInfo, RaftCore, SnapshotMeta, Term,
};
use crate::statemachine::{SnapshotFiles, StateMachine};
use crate::storage::{
    LogPool, LogWorker, RecoveredGroup, SnapshotStore, SyncObserver, WorkerState,
};

mod clock;
mod ready;
mod requests;
mod run;
mod snapshot;
mod view;

use snapshot::read_snapshot_files;
pub use view::{GroupView, PeerView};

/// Tuning of every group a node hosts.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    pub tick: Duration,
    pub election_timeout_min_ticks: u64,
    pub election_timeout_max_ticks: u64,
    pub heartbeat_interval_ticks: u64,
    pub leader_lease: bool,
    /// Let idle groups go quiet (see `core::Config::quiesce`).
    pub quiesce: bool,
    /// Take a snapshot after this many entries were applied since the last.
    pub snapshot_threshold: u64,
    /// ... or after entries of this many bytes were: the core holds every
    /// entry since the last snapshot in memory, so large values must not
    /// wait for an entry count.
    pub snapshot_threshold_bytes: u64,
    /// Exactly-once window for retried writes, in log time.
    pub retry_ttl_ms: u64,
    pub max_pending_requests: u64,
    pub max_pending_bytes: u64,
    /// How long a leader waits for a transferee when the node shuts down.
    pub shutdown_transfer_timeout: Duration,
    /// The group's task woke this much later than it meant to: the process
    /// was not running, so a leader steps down (see `clock.rs`).
    pub stall_threshold: Duration,
    /// The cluster level this node reports (`core::FEATURE_LEVEL`); lower
    /// only to play a node of an older version in tests.
    pub feature_level: u32,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            tick: Duration::from_millis(50),
            election_timeout_min_ticks: 10,
            election_timeout_max_ticks: 20,
            heartbeat_interval_ticks: 2,
            leader_lease: false,
            quiesce: true,
            snapshot_threshold: 10_000,
            snapshot_threshold_bytes: 256 << 20,
            retry_ttl_ms: 60_000,
            max_pending_requests: 8192,
            max_pending_bytes: 64 << 20,
            shutdown_transfer_timeout: Duration::from_secs(3),
            stall_threshold: Duration::from_secs(1),
            feature_level: crate::core::FEATURE_LEVEL,
        }
    }
}

impl GroupOptions {
    /// Checks the consensus settings these options make, so that a node
    /// refuses bad flags at start instead of when its first group starts.
    pub fn validate(&self) -> Result<(), crate::core::ConfigError> {
        self.core_config(1).validate()
    }

    fn core_config(&self, id: NodeId) -> Config {
        let mut c = Config::new(id);
        c.election_timeout_min_ticks = self.election_timeout_min_ticks;
        c.election_timeout_max_ticks = self.election_timeout_max_ticks;
        c.heartbeat_interval_ticks = self.heartbeat_interval_ticks;
        c.leader_lease = self.leader_lease;
        c.lease_ticks = self.election_timeout_min_ticks * 7 / 10;
        c.quiesce = self.quiesce;
        // Quiet heartbeats every six election timeouts; quiet followers
        // give up on them after three and a third of that (3 s and 10 s
        // with the core's defaults).
        c.quiet_heartbeat_ticks = 6 * self
            .election_timeout_min_ticks
            .max(self.heartbeat_interval_ticks);
        c.quiet_timeout_ticks = c.quiet_heartbeat_ticks * 10 / 3;
        c.rng_seed = rand::random();
        c.feature_level = self.feature_level;
        c
    }

    fn ticks(&self, d: Duration) -> u64 {
        (d.as_millis() / self.tick.as_millis().max(1)).max(1) as u64
    }
}

/// Why a client request failed; the rpc layer turns it into a
/// `RaftException`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("not the leader; leader is {}", leader.as_ref().map_or("unknown".to_string(), |p| format!("member {} at {}", p.id, p.address)))]
    NotLeader {
        leader: Option<PeerInfo>,
        peers: Vec<PeerInfo>,
    },
    #[error("leadership is being transferred; retry at the new leader")]
    SteppingDown,
    #[error(
        "the leader of term {term} has not applied its predecessors' entries yet; retry shortly"
    )]
    NotReady { term: Term },
    #[error("state machine: {message}")]
    StateMachine {
        message: String,
        rejected_before_logging: bool,
    },
    #[error("{resource} exhausted: {message}")]
    ResourceUnavailable {
        resource: &'static str,
        message: String,
    },
    #[error("index {index} did not reach {level:?} yet")]
    NotReplicated { index: Index, level: i32 },
    #[error("group is closed: {0}")]
    Closed(String),
}

/// A served request: the log index it was applied (or read) at and its
/// result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub index: Index,
    pub payload: Bytes,
}

pub type ClientResult = Result<Served, ClientError>;

/// Why an admin request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("not the leader; leader is {leader:?}")]
    NotLeader { leader: Option<PeerInfo> },
    #[error("{0}")]
    Failed(String),
}

pub type AdminResult = Result<Index, AdminError>;

/// Where the reply to a peer request goes.
#[derive(Debug)]
pub enum ReplyPath {
    /// Nothing waits (replies come as requests of their own).
    None,
    /// The response side of the append stream the request came on.
    Stream(mpsc::Sender<pb::AppendEntriesReply>),
    /// The answer of a unary call.
    Once(oneshot::Sender<Message>),
}

/// Everything a group task is asked to do.
#[derive(Debug)]
pub enum GroupMsg {
    Step {
        from: NodeId,
        msg: Message,
        reply: ReplyPath,
    },
    Write {
        client: Bytes,
        call: u64,
        /// The client's watermark (`ClientRequest.answered_below`).
        answered_below: u64,
        payload: Bytes,
        permit: Permit,
        reply: oneshot::Sender<ClientResult>,
    },
    Read {
        query: Bytes,
        linearizable: bool,
        reply: oneshot::Sender<ClientResult>,
    },
    StaleRead {
        query: Bytes,
        min_index: Index,
        reply: oneshot::Sender<ClientResult>,
    },
    Watch {
        index: Index,
        level: pb::ReplicationLevel,
        reply: oneshot::Sender<ClientResult>,
    },
    ChangeMembership {
        req: ConfChangeRequest,
        reply: oneshot::Sender<AdminResult>,
    },
    Transfer {
        target: Option<NodeId>,
        timeout: Duration,
        reply: oneshot::Sender<AdminResult>,
    },
    TakeSnapshot {
        reply: oneshot::Sender<AdminResult>,
    },
    PauseElections {
        pause: bool,
    },
    /// A snapshot fully received from the leader.
    InstallSnapshot {
        from: NodeId,
        term: Term,
        meta: SnapshotMeta,
        files: Vec<(String, Vec<u8>)>,
        reply: oneshot::Sender<Message>,
    },
    /// Streaming our snapshot to `to` failed.
    SnapshotFailed {
        to: NodeId,
    },
    /// Node liveness: `peer` stopped answering, or answered again after a
    /// silence or a restart. A quiet group with that member wakes up.
    PeerChanged {
        peer: NodeId,
    },
    /// Stop the group; a leader first hands leadership over if `transfer`.
    Shutdown {
        transfer: bool,
        reply: oneshot::Sender<()>,
    },
}

/// How a group reaches its peers. The rpc layer implements it; replies to
/// what it sends come back to the group as [`GroupMsg::Step`].
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// Sends a request-type message (append, vote, start election, read
    /// index). May drop it: Raft retries.
    fn send(&self, group: &Bytes, env: Envelope);
    /// Streams a snapshot to `to`; on failure the group gets
    /// [`GroupMsg::SnapshotFailed`], on success the follower's reply.
    fn send_snapshot(
        &self,
        group: &Bytes,
        to: NodeId,
        install: InstallSnapshot,
        files: Vec<(String, Vec<u8>)>,
    );
    /// Addresses of members, learned from a group's membership.
    fn learn(&self, membership: &Membership);
    /// Node liveness: peer `from` pinged this node, saying it started as
    /// `incarnation`. Returns this node's incarnation, for the reply.
    fn pinged(&self, from: NodeId, incarnation: u64) -> u64 {
        let _ = (from, incarnation);
        0
    }
}

/// The handle the registry and the rpc layer keep for a group.
#[derive(Clone, Debug)]
pub struct GroupHandle {
    pub id: Bytes,
    pub tx: mpsc::Sender<GroupMsg>,
    pub view: Arc<Mutex<GroupView>>,
    pub limits: PendingLimits,
}

impl GroupHandle {
    pub fn view(&self) -> GroupView {
        self.view.lock().expect("view lock").clone()
    }
}

/// A client waiting for its write at one index.
#[derive(Debug)]
struct Waiter {
    term: Term,
    key: Option<CallKey>,
    reply: oneshot::Sender<ClientResult>,
    _permit: Option<Permit>,
}

#[derive(Debug)]
struct WatchWaiter {
    index: Index,
    level: pb::ReplicationLevel,
    reply: oneshot::Sender<ClientResult>,
}

const KIND_VOTE: u8 = 1;
const KIND_READ: u8 = 2;
const KIND_INSTALL: u8 = 3;

/// A snapshot received from the leader and stored, waiting for the core to
/// install it: its files and whether the log continues it.
type Incoming = (SnapshotMeta, SnapshotFiles, bool);

struct Group {
    id: Bytes,
    label: GroupLabel,
    node_id: NodeId,
    opts: GroupOptions,
    core: RaftCore,
    applier: Applier,
    /// Shared with the blocking threads that write snapshots.
    snapshots: Arc<SnapshotStore>,
    last_snapshot: Index,
    /// Bytes of entries applied since the group started, and that count
    /// when the newest snapshot was taken (for the byte threshold).
    applied_bytes: u64,
    applied_bytes_at_snapshot: u64,
    /// A snapshot of this index is being written off the task; those who
    /// asked for one wait for it.
    snapshot_writing: Option<Index>,
    snapshot_waiters: Vec<oneshot::Sender<AdminResult>>,
    snapshot_io: mpsc::UnboundedSender<snapshot::SnapshotIo>,
    /// A snapshot from the leader is being written to the store.
    receiving: bool,
    worker: Option<LogWorker>,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    /// This group's series of `metrics.append`, looked up once.
    append_latency: Histogram,
    view: Arc<Mutex<GroupView>>,
    limits: PendingLimits,
    sm_name: String,
    /// Readies sent to the worker and the newest reported durable.
    last_submitted: u64,
    last_durable: u64,
    submitted_at: VecDeque<(u64, Instant)>,
    held: VecDeque<(u64, Vec<Envelope>)>,
    writes: BTreeMap<Index, Vec<Waiter>>,
    next_read: u64,
    reads: HashMap<u64, (Bytes, oneshot::Sender<ClientResult>)>,
    ready_reads: BTreeMap<Index, Vec<(Bytes, oneshot::Sender<ClientResult>)>>,
    watches: Vec<WatchWaiter>,
    conf_reply: Option<oneshot::Sender<AdminResult>>,
    transfer_reply: Option<oneshot::Sender<AdminResult>>,
    shutdown_reply: Option<oneshot::Sender<()>>,
    append_sinks: HashMap<NodeId, mpsc::Sender<pb::AppendEntriesReply>>,
    once: HashMap<(NodeId, u8, u64), oneshot::Sender<Message>>,
    incoming: Option<Incoming>,
    sending_snapshot: HashSet<NodeId>,
    /// After a failed automatic snapshot, when to try again.
    snapshot_retry_at: Option<Instant>,
    learned: Membership,
    storage_error: Option<String>,
    failed: bool,
    leader_changes: u64,
    snapshots_installed: u64,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("id", &self.id).finish()
    }
}

/// Printable form of a group id: UTF-8 text as is, anything else in hex.
pub fn display_group(id: &[u8]) -> String {
    match std::str::from_utf8(id) {
        Ok(s) if !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()) => s.to_string(),
        _ => id.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// Everything needed to start a group's task.
#[derive(Debug)]
pub struct GroupStart {
    pub id: Bytes,
    pub node_id: NodeId,
    pub recovered: RecoveredGroup,
    pub state_machine: Box<dyn StateMachine>,
    pub sm_name: String,
    pub opts: GroupOptions,
    pub transport: Arc<dyn Transport>,
    pub metrics: Arc<Metrics>,
    pub log_pool: LogPool,
}

/// Restores the group from its storage and starts its task.
pub fn spawn_group(
    start: GroupStart,
) -> Result<(GroupHandle, tokio::task::JoinHandle<()>), String> {
    let GroupStart {
        id,
        node_id,
        recovered,
        state_machine,
        sm_name,
        opts,
        transport,
        metrics,
        log_pool,
    } = start;
    let RecoveredGroup {
        meta,
        snapshot,
        snapshot_info,
        entries,
        log,
        meta_store,
        snapshots,
    } = recovered;
    let mut applier = Applier::new(state_machine, opts.retry_ttl_ms);
    if let Some(info) = &snapshot_info {
        let files = read_snapshot_files(&snapshots, info).map_err(|e| e.to_string())?;
        applier
            .restore(info.meta.index, &files)
            .map_err(|e| format!("restoring snapshot {}: {e}", info.meta.index))?;
    }
    let mut core = RaftCore::new(
        opts.core_config(node_id),
        meta.hard_state,
        snapshot.clone(),
        entries,
    )
    .map_err(|e| e.to_string())?;
    core.note_cluster_level(applier.cluster_level());
    let label = GroupLabel {
        group: display_group(&id),
    };
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let mut state = WorkerState::new(log, meta_store, meta);
    let fsync = metrics.fsync.get_or_create(&label).clone();
    state.on_sync = Some(SyncObserver(Box::new(move |d| {
        fsync.observe(d.as_secs_f64())
    })));
    let worker = LogWorker::spawn_in(&log_pool, state, Duration::from_millis(500), move |c| {
        let _ = done_tx.send(c);
    });
    let (tx, rx) = mpsc::channel(4096);
    let limits = PendingLimits::new(opts.max_pending_requests, opts.max_pending_bytes);
    let view = Arc::new(Mutex::new(GroupView {
        group: label.group.clone(),
        ..Default::default()
    }));
    transport.learn(core.membership());
    let append_latency = metrics.append.get_or_create(&label).clone();
    let (written_tx, written_rx) = mpsc::unbounded_channel();
    let mut g = Group {
        id: id.clone(),
        label,
        node_id,
        core,
        applier,
        snapshots: Arc::new(snapshots),
        last_snapshot: snapshot.index,
        applied_bytes: 0,
        applied_bytes_at_snapshot: 0,
        snapshot_writing: None,
        snapshot_waiters: Vec::new(),
        snapshot_io: written_tx,
        receiving: false,
        worker: Some(worker),
        transport,
        append_latency,
        metrics,
        view: view.clone(),
        limits: limits.clone(),
        sm_name,
        last_submitted: 0,
        last_durable: 0,
        submitted_at: VecDeque::new(),
        held: VecDeque::new(),
        writes: BTreeMap::new(),
        next_read: 1,
        reads: HashMap::new(),
        ready_reads: BTreeMap::new(),
        watches: Vec::new(),
        conf_reply: None,
        transfer_reply: None,
        shutdown_reply: None,
        append_sinks: HashMap::new(),
        once: HashMap::new(),
        incoming: None,
        sending_snapshot: HashSet::new(),
        snapshot_retry_at: None,
        learned: Membership::default(),
        storage_error: None,
        failed: false,
        leader_changes: 0,
        snapshots_installed: 0,
        opts,
    };
    g.publish();
    let handle = GroupHandle {
        id,
        tx,
        view,
        limits,
    };
    let task = tokio::spawn(async move { g.run(rx, done_rx, written_rx).await });
    Ok((handle, task))
}

/// Runs blocking file work without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

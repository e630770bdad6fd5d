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
//! 1. the persistence part goes to the log worker as one [`WriteBatch`];
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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kuberaft_proto::v1 as pb;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::apply::{Applier, LoggedCall, encode_logged};
use super::limits::{PendingLimits, Permit};
use super::metrics::{GroupLabel, Metrics};
use super::retry_cache::{CachedReply, CallKey, Lookup};
use crate::convert::append_reply_to_pb;
use crate::core::{
    ConfChangeError, ConfChangeRequest, Config, Envelope, Event, Index, InstallSnapshot,
    Membership, Message, NodeId, PeerInfo, ProposeError, RaftCore, ReadError, Role, SnapshotMeta,
    Term, TransferError,
};
use crate::statemachine::{SnapshotFiles, StateMachine};
use crate::storage::{
    Completion, LogPool, LogWorker, RecoveredGroup, SnapshotInfo, SnapshotStore, SyncObserver,
    WorkerState, WriteBatch,
};

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
    /// Exactly-once window for retried writes, in log time.
    pub retry_ttl_ms: u64,
    pub max_pending_requests: u64,
    pub max_pending_bytes: u64,
    /// How long a leader waits for a transferee when the node shuts down.
    pub shutdown_transfer_timeout: Duration,
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
            retry_ttl_ms: 60_000,
            max_pending_requests: 8192,
            max_pending_bytes: 64 << 20,
            shutdown_transfer_timeout: Duration::from_secs(3),
        }
    }
}

impl GroupOptions {
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
    /// The runtime stalled: a leader must not trust its lease or its view.
    StepDown,
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

/// A member as status pages show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerView {
    pub id: NodeId,
    pub address: String,
    pub priority: u32,
    pub voter: bool,
}

/// What the group looks like now, published after every batch for
/// groupInfo, /status, /readyz and /metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupView {
    pub group: String,
    pub state_machine: String,
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: Term,
    pub last_index: Index,
    pub commit_index: Index,
    pub applied_index: Index,
    pub snapshot_index: Index,
    pub peers: Vec<PeerView>,
    pub old_voters: Vec<NodeId>,
    /// (member, match index, commit index), on the leader.
    pub progress: Vec<(NodeId, Index, Index)>,
    pub storage_healthy: bool,
    pub storage_message: String,
    pub elections_paused: bool,
    pub leader_changes: u64,
    pub pending_requests: u64,
    pub retry_cache_hits: u64,
    /// Replies the retry cache holds for retries.
    pub retry_cache_entries: u64,
    /// Snapshots received from a leader and installed.
    pub snapshots_installed: u64,
    /// Idle and quiet: no heartbeats, no election timer (see
    /// `core::Config::quiesce`).
    pub quiet: bool,
    /// The group's task has ended (removed, shut down or storage failed).
    pub stopped: bool,
}

impl GroupView {
    pub fn membership_pb(&self) -> pb::Configuration {
        let peer = |p: &PeerView, role: pb::PeerRole| pb::Peer {
            id: p.id,
            address: p.address.clone(),
            priority: p.priority,
            role: role as i32,
            ..Default::default()
        };
        pb::Configuration {
            peers: self
                .peers
                .iter()
                .map(|p| {
                    let role = if p.voter {
                        pb::PeerRole::Voter
                    } else {
                        pb::PeerRole::Listener
                    };
                    peer(p, role)
                })
                .collect(),
            old_peers: self
                .old_voters
                .iter()
                .map(|id| pb::Peer {
                    id: *id,
                    role: pb::PeerRole::Voter as i32,
                    ..Default::default()
                })
                .collect(),
            log_index: 0,
        }
    }
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
const MAX_BATCH: usize = 1024;
/// A quiet group's task wakes once per this many ticks (a second on the
/// default 50 ms tick) instead of every tick.
const QUIET_STRIDE_TICKS: u32 = 20;

/// Why the group's task woke.
enum Woke {
    Done(Completion),
    Msg(GroupMsg),
    Tick,
}
const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);

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
    snapshots: SnapshotStore,
    last_snapshot: Index,
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    let core = RaftCore::new(
        opts.core_config(node_id),
        meta.hard_state,
        snapshot.clone(),
        entries,
    )
    .map_err(|e| e.to_string())?;
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
    let mut g = Group {
        id: id.clone(),
        label,
        node_id,
        core,
        applier,
        snapshots,
        last_snapshot: snapshot.index,
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
    let task = tokio::spawn(async move { g.run(rx, done_rx).await });
    Ok((handle, task))
}

fn read_snapshot_files(
    store: &SnapshotStore,
    info: &SnapshotInfo,
) -> Result<Vec<(String, Vec<u8>)>, crate::storage::StorageError> {
    info.files
        .iter()
        .map(|(name, _, _)| Ok((name.clone(), store.read_file(info, name)?)))
        .collect()
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

impl Group {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<GroupMsg>,
        mut done: mpsc::UnboundedReceiver<Completion>,
    ) {
        let tick = self.opts.tick;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A quiet group is not ticked every tick: it sleeps for a stride and
        // its core is then told how many ticks went by. `quiet_since` is
        // the instant up to which the core has been told.
        let stride = tick * QUIET_STRIDE_TICKS;
        let mut quiet_since: Option<tokio::time::Instant> = None;
        let quiet_sleep = tokio::time::sleep(stride);
        tokio::pin!(quiet_sleep);
        loop {
            let woke = tokio::select! {
                biased;
                Some(c) = done.recv() => Woke::Done(c),
                msg = inbox.recv() => match msg {
                    Some(m) => Woke::Msg(m),
                    None => break,
                },
                _ = ticker.tick(), if quiet_since.is_none() => Woke::Tick,
                _ = &mut quiet_sleep, if quiet_since.is_some() => {
                    quiet_sleep.as_mut().reset(tokio::time::Instant::now() + stride);
                    Woke::Tick
                }
            };
            // Time spent quiet is counted before anything else happens, so
            // that a leader woken by a read judges its lease by real time.
            if let Some(since) = quiet_since {
                let ticks = (since.elapsed().as_nanos() / tick.as_nanos().max(1)) as u32;
                if ticks > 0 {
                    self.core.tick_by(u64::from(ticks));
                    quiet_since = Some(since + tick * ticks);
                }
            }
            match woke {
                Woke::Done(c) => {
                    self.on_completion(c);
                    while let Ok(c) = done.try_recv() {
                        self.on_completion(c);
                    }
                }
                Woke::Msg(m) => {
                    self.handle(m);
                    for _ in 0..MAX_BATCH {
                        match inbox.try_recv() {
                            Ok(m) => self.handle(m),
                            Err(_) => break,
                        }
                    }
                }
                Woke::Tick if quiet_since.is_none() => self.core.tick(),
                Woke::Tick => {}
            }
            if self.failed {
                self.fail_everything("storage failed; the group stopped");
                self.publish();
                return;
            }
            self.process_ready();
            self.after_batch();
            self.publish();
            if self.shutdown_reply.is_some() && self.transfer_reply.is_none() {
                break;
            }
            match (self.core.is_quiet(), quiet_since) {
                (true, None) => {
                    let now = tokio::time::Instant::now();
                    quiet_since = Some(now);
                    quiet_sleep.as_mut().reset(now + stride);
                }
                (false, Some(_)) => {
                    quiet_since = None;
                    ticker.reset();
                }
                _ => {}
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        self.fail_everything("the group is shutting down");
        if let Some(w) = self.worker.take() {
            blocking(move || drop(w.stop()));
        }
        let mut v = self.view.lock().expect("view lock");
        v.stopped = true;
        drop(v);
        if let Some(r) = self.shutdown_reply.take() {
            let _ = r.send(());
        }
    }

    fn not_leader(&self) -> ClientError {
        let m = self.core.membership();
        let leader = self.core.leader().filter(|l| *l != self.node_id);
        ClientError::NotLeader {
            leader: leader.map(|id| m.peer(id).cloned().unwrap_or_else(|| PeerInfo::new(id))),
            peers: m.members().filter_map(|id| m.peer(id).cloned()).collect(),
        }
    }

    fn handle(&mut self, msg: GroupMsg) {
        match msg {
            GroupMsg::Step { from, msg, reply } => self.step(from, msg, reply),
            GroupMsg::Write {
                client,
                call,
                answered_below,
                payload,
                permit,
                reply,
            } => self.write(
                LoggedCall {
                    client,
                    call,
                    answered_below,
                    logged_at_ms: now_ms(),
                    payload,
                },
                permit,
                reply,
            ),
            GroupMsg::Read {
                query,
                linearizable,
                reply,
            } => {
                if linearizable {
                    let ctx = self.next_read;
                    self.next_read += 1;
                    self.reads.insert(ctx, (query, reply));
                    self.core.read_index(ctx);
                } else {
                    self.serve(query, reply);
                }
            }
            GroupMsg::StaleRead {
                query,
                min_index,
                reply,
            } => self
                .ready_reads
                .entry(min_index)
                .or_default()
                .push((query, reply)),
            GroupMsg::Watch {
                index,
                level,
                reply,
            } => self.watches.push(WatchWaiter {
                index,
                level,
                reply,
            }),
            GroupMsg::ChangeMembership { req, reply } => {
                // New members are staged (sent the log) before they appear
                // in any configuration entry: the transport needs their
                // addresses now.
                let named = Membership {
                    voters: req.voters.iter().map(|p| (p.id, p.clone())).collect(),
                    listeners: req.listeners.iter().map(|p| (p.id, p.clone())).collect(),
                    old_voters: None,
                };
                self.transport.learn(&named);
                match self.core.change_membership(req) {
                    Ok(()) => self.conf_reply = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(self.conf_error(e)));
                    }
                }
            }
            GroupMsg::Transfer {
                target,
                timeout,
                reply,
            } => {
                let ticks = self.opts.ticks(timeout);
                match self.core.transfer_leadership(target, ticks) {
                    Ok(()) => self.transfer_reply = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(self.transfer_error(e)));
                    }
                }
            }
            GroupMsg::TakeSnapshot { reply } => {
                let _ = reply.send(self.take_snapshot().map_err(AdminError::Failed));
            }
            GroupMsg::PauseElections { pause } => self.core.set_elections_paused(pause),
            GroupMsg::InstallSnapshot {
                from,
                term,
                meta,
                files,
                reply,
            } => self.install_snapshot(from, term, meta, files, reply),
            GroupMsg::SnapshotFailed { to } => {
                self.sending_snapshot.remove(&to);
                self.core.report_snapshot_failure(to);
            }
            GroupMsg::StepDown => self.core.step_down(),
            GroupMsg::PeerChanged { peer } => {
                if self.core.is_quiet() && self.core.membership().members().any(|m| m == peer) {
                    self.core.wake();
                }
            }
            GroupMsg::Shutdown { transfer, reply } => {
                self.shutdown_reply = Some(reply);
                let others = self.core.membership().voters.len() > 1;
                if transfer && others && self.core.role() == Role::Leader {
                    let (tx, _rx) = oneshot::channel();
                    let ticks = self.opts.ticks(self.opts.shutdown_transfer_timeout);
                    if self.core.transfer_leadership(None, ticks).is_ok() {
                        self.transfer_reply = Some(tx);
                    }
                }
            }
        }
    }

    fn conf_error(&self, e: ConfChangeError) -> AdminError {
        match e {
            ConfChangeError::NotLeader { .. } => AdminError::NotLeader {
                leader: self.leader_peer(),
            },
            e => AdminError::Failed(e.to_string()),
        }
    }

    fn transfer_error(&self, e: TransferError) -> AdminError {
        match e {
            TransferError::NotLeader { .. } => AdminError::NotLeader {
                leader: self.leader_peer(),
            },
            e => AdminError::Failed(e.to_string()),
        }
    }

    fn leader_peer(&self) -> Option<PeerInfo> {
        let id = self.core.leader()?;
        Some(
            self.core
                .membership()
                .peer(id)
                .cloned()
                .unwrap_or_else(|| PeerInfo::new(id)),
        )
    }

    fn step(&mut self, from: NodeId, msg: Message, reply: ReplyPath) {
        match reply {
            ReplyPath::None => {}
            ReplyPath::Stream(s) => {
                let same = self
                    .append_sinks
                    .get(&from)
                    .is_some_and(|old| old.same_channel(&s));
                if !same {
                    self.append_sinks.insert(from, s);
                }
            }
            ReplyPath::Once(tx) => {
                let key = match &msg {
                    Message::RequestVote(v) => (from, KIND_VOTE, v.pre_vote as u64),
                    Message::ReadIndex(r) => (from, KIND_READ, r.ctx),
                    // The key the core's InstallSnapshotReply is routed by;
                    // any other key would leave the leader's transfer
                    // waiting for an answer that never comes.
                    Message::InstallSnapshot(_) => (from, KIND_INSTALL, 0),
                    _ => (from, 0, 0),
                };
                if self.once.len() > 4096 {
                    self.once.retain(|_, tx| !tx.is_closed());
                }
                self.once.insert(key, tx);
            }
        }
        if let Message::InstallSnapshotReply(_) = &msg {
            self.sending_snapshot.remove(&from);
        }
        self.core.step(from, msg);
    }

    fn write(&mut self, call: LoggedCall, permit: Permit, reply: oneshot::Sender<ClientResult>) {
        if self.core.role() != Role::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        // Until the leader applied an entry of its own term, its retry cache
        // may miss calls its predecessors committed: a retry would be logged
        // again (then skipped when applied, but answered with another index).
        let term = self.core.term();
        if self.core.log().term(self.applier.applied_index()) != Some(term) {
            let _ = reply.send(Err(ClientError::NotReady { term }));
            return;
        }
        let key = (!call.client.is_empty()).then(|| CallKey {
            client: call.client.clone(),
            call: call.call,
        });
        if let Some(key) = &key {
            match self.applier.retry_cache().lookup(key, call.logged_at_ms) {
                Lookup::New => {}
                Lookup::Done(r) => {
                    let _ = reply.send(cached(r));
                    return;
                }
                Lookup::Answered { below } => {
                    let _ = reply.send(Err(ClientError::StateMachine {
                        message: Lookup::answered_message(key.call, below),
                        rejected_before_logging: true,
                    }));
                    return;
                }
                Lookup::Pending { index } => {
                    if let Some(term) = self.core.log().term(index) {
                        self.writes.entry(index).or_default().push(Waiter {
                            term,
                            key: Some(key.clone()),
                            reply,
                            _permit: Some(permit),
                        });
                        return;
                    }
                    self.applier.retry_cache().abandoned(key, index);
                }
            }
        }
        if let Err(e) = self
            .applier
            .state_machine()
            .start_transaction(&call.payload)
        {
            let _ = reply.send(Err(ClientError::StateMachine {
                message: e.to_string(),
                rejected_before_logging: true,
            }));
            return;
        }
        let data = encode_logged(call);
        match self.core.propose(data) {
            Ok((term, index)) => {
                if let Some(key) = &key {
                    self.applier.retry_cache().appended(key.clone(), index);
                }
                self.writes.entry(index).or_default().push(Waiter {
                    term,
                    key,
                    reply,
                    _permit: Some(permit),
                });
            }
            Err(ProposeError::NotLeader { .. }) => {
                let _ = reply.send(Err(self.not_leader()));
            }
            Err(ProposeError::SteppingDown) => {
                let _ = reply.send(Err(ClientError::SteppingDown));
            }
        }
    }

    fn serve(&mut self, query: Bytes, reply: oneshot::Sender<ClientResult>) {
        let index = self.applier.applied_index();
        let result = self
            .applier
            .state_machine()
            .query(&query)
            .map(|payload| Served { index, payload })
            .map_err(|e| ClientError::StateMachine {
                message: e.to_string(),
                rejected_before_logging: true,
            });
        let _ = reply.send(result);
    }

    fn install_snapshot(
        &mut self,
        from: NodeId,
        term: Term,
        meta: SnapshotMeta,
        files: Vec<(String, Vec<u8>)>,
        reply: oneshot::Sender<Message>,
    ) {
        if term < self.core.term() || meta.index <= self.core.log().committed() {
            // Stale, or already covered: the core answers without
            // installing; nothing to write.
            self.step(from, install_msg(term, meta), ReplyPath::Once(reply));
            return;
        }
        let keep = self.core.log().term(meta.index) == Some(meta.term);
        let written = blocking(|| -> Result<(), crate::storage::StorageError> {
            let mut w = self.snapshots.begin(meta.clone())?;
            for (name, data) in &files {
                w.write_chunk(name, 0, data)?;
            }
            w.finish()?;
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!(group = %self.label.group, error = %e, "could not store a snapshot from the leader");
            let _ = reply.send(Message::InstallSnapshotReply(
                crate::core::InstallSnapshotReply {
                    term: self.core.term(),
                    snapshot_index: 0,
                    accepted: false,
                },
            ));
            return;
        }
        self.incoming = Some((meta.clone(), files, keep));
        self.once.insert((from, KIND_INSTALL, 0), reply);
        self.core.step(from, install_msg(term, meta));
    }

    fn on_completion(&mut self, c: Completion) {
        match c {
            Completion::Durable { ready, .. } => {
                self.core.on_persisted(ready);
                self.last_durable = self.last_durable.max(ready);
                while let Some((n, at)) = self.submitted_at.front().copied() {
                    if n > ready {
                        break;
                    }
                    self.append_latency.observe(at.elapsed().as_secs_f64());
                    self.submitted_at.pop_front();
                }
                while self.held.front().is_some_and(|(n, _)| *n <= ready) {
                    let (_, msgs) = self.held.pop_front().expect("checked");
                    for env in msgs {
                        self.route(env);
                    }
                }
            }
            Completion::Unhealthy { reason, .. } => {
                tracing::error!(group = %self.label.group, %reason, "storage unhealthy; retrying");
                self.storage_error = Some(reason);
            }
            Completion::Healthy => {
                tracing::info!(group = %self.label.group, "storage healthy again");
                self.storage_error = None;
            }
            Completion::Failed { reason } => {
                tracing::error!(group = %self.label.group, %reason, "storage failed; stopping the group, restart the node");
                self.storage_error = Some(format!("{reason}; restart the node"));
                self.failed = true;
            }
        }
    }

    fn process_ready(&mut self) {
        loop {
            let ready = self.core.take_ready();
            if ready.is_empty() {
                return;
            }
            let mut batch = WriteBatch {
                ready: ready.number,
                hard_state: ready.hard_state,
                entries: ready.entries,
                ..Default::default()
            };
            if let Some(meta) = ready.snapshot {
                match self.incoming.take() {
                    Some((m, files, keep)) if m == meta => {
                        if let Err(e) = self.applier.restore(meta.index, &files) {
                            // The files passed their checksums; a state
                            // machine that cannot read them cannot go on.
                            tracing::error!(group = %self.label.group, error = %e, "restoring a received snapshot failed");
                            self.storage_error = Some(format!("snapshot restore failed: {e}"));
                            self.failed = true;
                            return;
                        }
                        self.last_snapshot = meta.index;
                        self.snapshots_installed += 1;
                        if keep {
                            batch.purge_to = Some(meta.index);
                        } else {
                            batch.reset_to = Some(meta.index);
                        }
                    }
                    _ => unreachable!("the core installs only the snapshot it was given"),
                }
            }
            if !batch.is_empty() {
                self.last_submitted = ready.number;
                self.submitted_at.push_back((ready.number, Instant::now()));
                if let Some(w) = &self.worker {
                    w.submit(batch);
                }
            }
            for env in ready.messages {
                self.route(env);
            }
            if !ready.persisted_messages.is_empty() {
                if self.last_durable >= self.last_submitted {
                    for env in ready.persisted_messages {
                        self.route(env);
                    }
                } else {
                    self.held
                        .push_back((self.last_submitted, ready.persisted_messages));
                }
            }
            if let Some(last) = ready.committed_entries.last().map(|e| e.index) {
                let outcomes = self.applier.apply(&ready.committed_entries);
                for o in outcomes {
                    let Some(waiters) = self.writes.remove(&o.index) else {
                        continue;
                    };
                    for w in waiters {
                        let result = if w.term == o.term {
                            o.result
                                .clone()
                                .map(|payload| Served {
                                    index: o.index,
                                    payload,
                                })
                                .map_err(|message| ClientError::StateMachine {
                                    message,
                                    rejected_before_logging: false,
                                })
                        } else {
                            if let Some(k) = &w.key {
                                self.applier.retry_cache().abandoned(k, o.index);
                            }
                            Err(self.not_leader())
                        };
                        let _ = w.reply.send(result);
                    }
                }
                // Waiters at indexes that turned out not to hold their
                // command (replaced by a new leader's entries).
                let rest = self.writes.split_off(&(last + 1));
                let replaced = std::mem::replace(&mut self.writes, rest);
                for (index, ws) in replaced {
                    for w in ws {
                        if let Some(k) = &w.key {
                            self.applier.retry_cache().abandoned(k, index);
                        }
                        let _ = w.reply.send(Err(self.not_leader()));
                    }
                }
                self.core.applied(last);
            }
            for to in ready.send_snapshot {
                self.send_snapshot(to);
            }
            for ev in ready.events {
                self.on_event(ev);
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::ReadReady { ctx, index } => {
                if let Some((q, r)) = self.reads.remove(&ctx) {
                    self.ready_reads.entry(index).or_default().push((q, r));
                }
            }
            Event::ReadFailed { ctx, error } => {
                if let Some((_, r)) = self.reads.remove(&ctx) {
                    let e = match error {
                        ReadError::SteppingDown => ClientError::SteppingDown,
                        _ => self.not_leader(),
                    };
                    let _ = r.send(Err(e));
                }
            }
            Event::ConfChangeDone(res) => {
                let res = res.map_err(|e| self.conf_error(e));
                if let Some(r) = self.conf_reply.take() {
                    let _ = r.send(res);
                }
            }
            Event::TransferDone(res) => {
                let res = res
                    .map(|_| self.core.log().last_index())
                    .map_err(|e| self.transfer_error(e));
                if let Some(r) = self.transfer_reply.take() {
                    let _ = r.send(res);
                }
            }
            Event::LeaderChanged { term, leader } => {
                self.leader_changes += 1;
                self.metrics.leader_changes.get_or_create(&self.label).inc();
                tracing::info!(group = %self.label.group, term, leader = ?leader, "leader changed");
                if leader != Some(self.node_id) {
                    let writes = std::mem::take(&mut self.writes);
                    for (index, ws) in writes {
                        for w in ws {
                            if let Some(k) = &w.key {
                                self.applier.retry_cache().abandoned(k, index);
                            }
                            let _ = w.reply.send(Err(self.not_leader()));
                        }
                    }
                }
            }
        }
    }

    /// Sends a message, or hands a reply to the path its request came by.
    fn route(&mut self, env: Envelope) {
        match &env.msg {
            Message::AppendEntriesReply(r) => {
                if let Some(s) = self.append_sinks.get(&env.to) {
                    let pb = append_reply_to_pb(&self.id, env.from, r);
                    if s.try_send(pb).is_err() {
                        tracing::debug!(
                            to = env.to,
                            "append reply dropped (stream full or closed)"
                        );
                    }
                }
            }
            Message::RequestVoteReply(r) => {
                if let Some(tx) = self.once.remove(&(env.to, KIND_VOTE, r.pre_vote as u64)) {
                    let _ = tx.send(env.msg);
                }
            }
            Message::ReadIndexReply(r) => {
                if let Some(tx) = self.once.remove(&(env.to, KIND_READ, r.ctx)) {
                    let _ = tx.send(env.msg);
                }
            }
            Message::InstallSnapshotReply(_) => {
                if let Some(tx) = self.once.remove(&(env.to, KIND_INSTALL, 0)) {
                    let _ = tx.send(env.msg);
                }
            }
            _ => self.transport.send(&self.id, env),
        }
    }

    fn send_snapshot(&mut self, to: NodeId) {
        if !self.sending_snapshot.insert(to) {
            return;
        }
        let loaded = blocking(|| -> Result<_, crate::storage::StorageError> {
            let Some(info) = self.snapshots.latest()? else {
                return Ok(None);
            };
            let files = read_snapshot_files(&self.snapshots, &info)?;
            Ok(Some((info, files)))
        });
        match loaded {
            Ok(Some((info, files))) => {
                let install = InstallSnapshot {
                    term: self.core.term(),
                    meta: info.meta,
                };
                self.transport.send_snapshot(&self.id, to, install, files);
            }
            other => {
                tracing::warn!(group = %self.label.group, to, result = ?other.err(), "no snapshot to send");
                self.sending_snapshot.remove(&to);
                self.core.report_snapshot_failure(to);
            }
        }
    }

    /// Snapshots the state machine at the applied index and queues the log
    /// purge behind earlier writes.
    fn take_snapshot(&mut self) -> Result<Index, String> {
        let index = self.applier.applied_index();
        if index <= self.last_snapshot {
            return Ok(self.last_snapshot);
        }
        let meta = self
            .core
            .snapshot_meta(index)
            .ok_or_else(|| format!("index {index} is not in the log"))?;
        let files = self.applier.snapshot();
        blocking(|| -> Result<(), crate::storage::StorageError> {
            let mut w = self.snapshots.begin(meta)?;
            for (name, data) in &files {
                w.write_chunk(name, 0, data)?;
            }
            w.finish()?;
            Ok(())
        })
        .map_err(|e| format!("writing snapshot at {index}: {e}"))?;
        self.last_snapshot = index;
        self.core.compact(index);
        if let Some(w) = &self.worker {
            w.submit(WriteBatch {
                ready: self.last_submitted,
                purge_to: Some(index),
                ..Default::default()
            });
        }
        tracing::info!(group = %self.label.group, index, "snapshot taken");
        Ok(index)
    }

    /// Work that depends on the state after a batch: reads whose index is
    /// applied, watches, automatic snapshots, learned addresses.
    fn after_batch(&mut self) {
        let applied = self.applier.applied_index();
        if self.ready_reads.len() > 1024 {
            // Stale reads waiting for an index that may never come, whose
            // clients gave up.
            self.ready_reads.retain(|_, rs| {
                rs.retain(|(_, r)| !r.is_closed());
                !rs.is_empty()
            });
        }
        while self
            .ready_reads
            .first_key_value()
            .is_some_and(|(i, _)| *i <= applied)
        {
            let (_, rs) = self.ready_reads.pop_first().expect("checked");
            for (q, r) in rs {
                self.serve(q, r);
            }
        }
        if !self.watches.is_empty() {
            let watches = std::mem::take(&mut self.watches);
            for w in watches {
                if w.reply.is_closed() {
                    continue;
                }
                match self.watch_reached(w.index, w.level) {
                    Some(Ok(())) => {
                        let _ = w.reply.send(Ok(Served {
                            index: w.index,
                            payload: Bytes::new(),
                        }));
                    }
                    Some(Err(e)) => {
                        let _ = w.reply.send(Err(e));
                    }
                    None => self.watches.push(w),
                }
            }
        }
        if self.applier.applied_index() >= self.last_snapshot + self.opts.snapshot_threshold
            && self.snapshot_retry_at.is_none_or(|t| Instant::now() >= t)
        {
            // Writing the snapshot blocks this task for an fsync; clients
            // were already answered, so the view shows their writes first.
            self.publish();
            match self.take_snapshot() {
                Ok(_) => self.snapshot_retry_at = None,
                Err(e) => {
                    // Not again after every batch: a full disk stays full
                    // for a while.
                    self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
                    tracing::warn!(group = %self.label.group, error = %e, "automatic snapshot failed; retrying in a second");
                }
            }
        }
        if self.core.membership() != &self.learned {
            self.learned = self.core.membership().clone();
            self.transport.learn(&self.learned);
        }
    }

    /// `Some(Ok)` once `index` reached `level`; `Some(Err)` if this member
    /// cannot tell.
    fn watch_reached(&self, index: Index, level: pb::ReplicationLevel) -> Option<ClientResult2> {
        use pb::ReplicationLevel as L;
        let commit = self.core.log().committed();
        if self.core.role() != Role::Leader {
            // A follower knows only its own commit index: committed means
            // stored on a majority.
            return match level {
                L::Majority | L::Unspecified if commit >= index => Some(Ok(())),
                L::Majority | L::Unspecified => None,
                _ => Some(Err(self.not_leader())),
            };
        }
        let progress = self.core.progress();
        let m = self.core.membership();
        let of = |pick: fn(&(NodeId, Index, Index)) -> Index| {
            let map: HashMap<NodeId, Index> = progress.iter().map(|p| (p.0, pick(p))).collect();
            move |id: NodeId| map.get(&id).copied().unwrap_or(0)
        };
        let reached = match level {
            L::Majority | L::Unspecified => m.quorum_index(of(|p| p.1)) >= index,
            L::MajorityCommitted => m.quorum_index(of(|p| p.2)) >= index,
            L::All => progress.iter().all(|p| p.1 >= index),
            L::AllCommitted => progress.iter().all(|p| p.2 >= index),
        };
        reached.then_some(Ok(()))
    }

    fn fail_everything(&mut self, why: &str) {
        let err = || ClientError::Closed(why.to_string());
        for (_, ws) in std::mem::take(&mut self.writes) {
            for w in ws {
                let _ = w.reply.send(Err(err()));
            }
        }
        for (_, (_, r)) in self.reads.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, rs) in std::mem::take(&mut self.ready_reads) {
            for (_, r) in rs {
                let _ = r.send(Err(err()));
            }
        }
        for w in self.watches.drain(..) {
            let _ = w.reply.send(Err(err()));
        }
        for r in [self.conf_reply.take(), self.transfer_reply.take()]
            .into_iter()
            .flatten()
        {
            let _ = r.send(Err(AdminError::Failed(why.to_string())));
        }
    }

    fn publish(&mut self) {
        let st = self.core.status();
        let m = self.core.membership();
        let peer = |p: &PeerInfo, voter| PeerView {
            id: p.id,
            address: p.address.clone(),
            priority: p.priority,
            voter,
        };
        // Runs after every batch: nothing is allocated unless it changed.
        let mut v = self.view.lock().expect("view lock");
        if v.state_machine != self.sm_name {
            v.state_machine = self.sm_name.clone();
        }
        let role = match st.role {
            Role::Leader => "leader",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Follower if m.is_listener(self.node_id) => "listener",
            Role::Follower => "follower",
        };
        if v.role != role {
            v.role = role.to_string();
        }
        v.leader = st.leader;
        v.term = st.term;
        v.last_index = st.last_index;
        v.commit_index = st.commit_index;
        v.applied_index = self.applier.applied_index();
        v.snapshot_index = self.last_snapshot;
        let members = || {
            m.voters
                .values()
                .map(|p| (p, true))
                .chain(m.listeners.values().map(|p| (p, false)))
        };
        let same = v.peers.len() == m.voters.len() + m.listeners.len()
            && v.peers.iter().zip(members()).all(|(a, (p, voter))| {
                a.id == p.id
                    && a.address == p.address
                    && a.priority == p.priority
                    && a.voter == voter
            });
        if !same {
            v.peers = members().map(|(p, voter)| peer(p, voter)).collect();
        }
        v.old_voters.clear();
        v.old_voters
            .extend(m.old_voters.iter().flat_map(|o| o.keys().copied()));
        if st.role == Role::Leader || !v.progress.is_empty() {
            v.progress = self.core.progress();
        }
        v.storage_healthy = self.storage_error.is_none();
        match &self.storage_error {
            Some(e) if *e != v.storage_message => v.storage_message = e.clone(),
            Some(_) => {}
            None => v.storage_message.clear(),
        }
        v.elections_paused = st.elections_paused;
        v.leader_changes = self.leader_changes;
        v.pending_requests = self.limits.pending().0;
        v.retry_cache_hits = self.applier.retry_cache().hits();
        v.retry_cache_entries = self.applier.retry_cache().len() as u64;
        v.snapshots_installed = self.snapshots_installed;
        v.quiet = st.quiet;
    }
}

type ClientResult2 = Result<(), ClientError>;

fn install_msg(term: Term, meta: SnapshotMeta) -> Message {
    Message::InstallSnapshot(InstallSnapshot { term, meta })
}

fn cached(r: CachedReply) -> ClientResult {
    r.result
        .map(|payload| Served {
            index: r.index,
            payload,
        })
        .map_err(|message| ClientError::StateMachine {
            message,
            rejected_before_logging: false,
        })
}

//! Deterministic simulation of a kuberaft group.
//!
//! Every member is a [`RaftCore`] driven by a simulated shell: a disk that
//! makes writes durable after a random latency (a crash loses what was not
//! yet durable), a network that delays, drops, duplicates and reorders
//! messages and can be partitioned (also one way), and clocks that tick at
//! different rates. Clients issue put / get / compare-and-set operations,
//! retry with the same call id, and their history is recorded.
//!
//! Everything random comes from one seed, events are ordered by (time,
//! sequence number) and only ordered maps are used, so a seed replays
//! exactly. After every event the invariants of `check_step` are checked;
//! at the end the network heals, every pending operation must complete within
//! a bound, and the history must be linearizable.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use kuberaft_node::core::{
    ConfChangeMode, ConfChangeRequest, Config, Entry, EntryPayload, Envelope, Event, Fetch,
    HardState, Index, Membership, Message, NodeId, PeerInfo, RaftCore, ReadError, Ready, Role,
    SnapshotMeta, Term,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::history::{Operation, RegisterOp, check_linearizable};
use crate::kv::{Command, Kv, WriteOp, WriteResult};

/// Virtual time in microseconds.
type Time = u64;

const MS: Time = 1_000;
const BASE_TICK: Time = 10 * MS;

/// What a run is made of. Everything not given here is drawn from the seed.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    /// Voters at start (3 or 5).
    pub members: usize,
    /// How long faults are injected, in virtual milliseconds.
    pub chaos_ms: u64,
    /// After healing, every pending operation must complete within this.
    pub liveness_bound_ms: u64,
    /// Print a line per notable event.
    pub verbose: bool,
}

impl SimOptions {
    pub fn new(seed: u64, members: usize) -> Self {
        SimOptions {
            seed,
            members,
            chaos_ms: 8_000,
            liveness_bound_ms: 30_000,
            verbose: false,
        }
    }

    /// The single command that replays this run exactly.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run --release -p kuberaft-tests --bin sim -- --seeds {}..{} --members {} --chaos-ms {} --verbose",
            self.seed,
            self.seed + 1,
            self.members,
            self.chaos_ms
        )
    }
}

/// Figures of one run.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub events: u64,
    pub ops_completed: u64,
    pub writes_acked: u64,
    pub reads_done: u64,
    pub leaders_elected: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub snapshots_installed: u64,
    pub conf_changes_ok: u64,
    pub conf_changes_failed: u64,
    pub transfers_ok: u64,
    pub transfers_failed: u64,
    pub pauses: u64,
    /// Times a leader went quiet.
    pub quiet_spells: u64,
    /// Entries a leader read back from storage for a follower behind its
    /// snapshot, and reads that found them purged (the snapshot went then).
    pub entries_fetched: u64,
    pub fetches_purged: u64,
    pub virtual_ms: u64,
}

/// A broken invariant, with the run's log tail for context.
#[derive(Debug)]
pub struct Violation {
    pub what: String,
    pub at_ms: u64,
    pub replay: String,
    pub trace_tail: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "VIOLATION at {} ms: {}", self.at_ms, self.what)?;
        writeln!(f, "last events:")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay with: {}", self.replay)
    }
}

/// Features of a run drawn from its seed.
#[derive(Clone, Debug)]
struct Features {
    lease: bool,
    pre_vote: bool,
    check_quorum: bool,
    membership_changes: bool,
    transfers: bool,
    pauses: bool,
    priorities: bool,
    drop_rate: f64,
    dup_rate: f64,
    max_delay: Time,
    disk_latency_max: Time,
    snapshot_every: u64,
    clients: usize,
    keys: u64,
    /// Operations each client completes after the heal (liveness).
    ops_after_heal: u64,
    /// Idle groups go quiet; the nemesis then also hushes every client now
    /// and then so that they do.
    quiesce: bool,
    /// Node liveness stands in as an oracle: shortly after a member crashes
    /// or restarts or the links change, every member is woken. Without it,
    /// quiet followers rely on their own long timeout.
    liveness_oracle: bool,
    /// Entries storage keeps behind a local snapshot, for followers that
    /// are behind it (see `core/raft/fetch.rs`).
    purge_keep: u64,
}

#[derive(Clone, Debug)]
enum Payload {
    Raft(Message),
    /// A whole snapshot, standing for the chunk stream of installSnapshot.
    Snapshot {
        term: Term,
        meta: SnapshotMeta,
        data: Arc<Kv>,
    },
    Request {
        client: usize,
        call: u64,
        op: ClientOp,
    },
    Response {
        call: u64,
        result: Result<OpResult, Retry>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientOp {
    Write(WriteOp),
    Get { key: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpResult {
    Write(WriteResult),
    Read(Option<u64>),
}

/// Why a request should be retried, possibly elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Retry {
    leader_hint: Option<NodeId>,
}

#[derive(Debug)]
enum EventKind {
    Tick {
        node: NodeId,
        incarnation: u64,
    },
    Deliver {
        from: Endpoint,
        to: Endpoint,
        payload: Payload,
    },
    DiskDone {
        node: NodeId,
        incarnation: u64,
    },
    /// A leader's read of entries behind its snapshot is done.
    FetchDone {
        node: NodeId,
        incarnation: u64,
        fetch: Fetch,
    },
    ClientWake {
        client: usize,
    },
    Nemesis,
    Restart {
        node: NodeId,
    },
    Heal,
    /// Node liveness noticed a change: every quiet member wakes.
    Wake,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Endpoint {
    Node(NodeId),
    Client(usize),
}

struct QueuedEvent {
    at: Time,
    seq: u64,
    kind: EventKind,
}

impl PartialEq for QueuedEvent {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for QueuedEvent {}
impl PartialOrd for QueuedEvent {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for QueuedEvent {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// What survives a crash.
#[derive(Clone, Debug, Default)]
struct Disk {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    snapshot_data: Arc<Kv>,
    log: BTreeMap<Index, Entry>,
}

struct DiskJob {
    /// The Ready this job persists; `None` for a local snapshot.
    number: Option<u64>,
    done_at: Time,
    hard_state: Option<HardState>,
    /// A snapshot received from the leader.
    snapshot: Option<(SnapshotMeta, Arc<Kv>)>,
    /// A snapshot this member took: written, then the log purged up to it,
    /// in order behind every earlier write (a purge that overtook a pending
    /// truncation left a stale suffix behind the snapshot: seed 108249).
    local_snapshot: Option<(SnapshotMeta, Arc<Kv>)>,
    entries: Vec<Entry>,
    messages: Vec<Envelope>,
}

struct Node {
    id: NodeId,
    up: bool,
    incarnation: u64,
    tick_interval: Time,
    core: Option<RaftCore>,
    disk: Disk,
    jobs: VecDeque<DiskJob>,
    kv: Kv,
    applied: Index,
    /// Snapshot received from a leader, waiting for the core to install it.
    incoming_snapshot: Option<(SnapshotMeta, Arc<Kv>)>,
    /// Proposals waiting to be applied: index → (term, client, call).
    proposals: BTreeMap<Index, (Term, usize, u64)>,
    next_ctx: u64,
    /// Reads waiting for a read index: ctx → (client, call, key).
    reads: BTreeMap<u64, (usize, u64, u64)>,
    /// Reads with a read index, waiting for the state machine to reach it.
    ready_reads: Vec<(Index, usize, u64, u64)>,
    /// Highest commit index seen in this incarnation.
    seen_commit: Index,
    /// Index of the last local snapshot queued for writing.
    snapshot_queued: Index,
    last_role: Role,
    last_term: Term,
    /// Whether the member was a quiet leader after the last drive.
    was_quiet: bool,
}

#[derive(Clone, Debug)]
struct Pending {
    call: u64,
    op: ClientOp,
    invoked_at: Time,
    deadline: Time,
}

struct Client {
    id: usize,
    next_call: u64,
    /// Operations issued after the heal.
    issued_after_heal: u64,
    pending: Option<Pending>,
    leader_hint: Option<NodeId>,
    last_seen: BTreeMap<u64, u64>,
}

/// Facts the invariants are checked against, gathered across all members.
#[derive(Default)]
struct Oracle {
    /// term → its leader.
    leaders: BTreeMap<Term, NodeId>,
    /// (index, term) → (payload, previous entry's term) for log matching.
    entries: BTreeMap<(Index, Term), (EntryPayload, Option<Term>)>,
    /// index → (term, payload) of the committed entry.
    committed: BTreeMap<Index, (Term, EntryPayload)>,
    /// index → (term, payload) of the applied entry.
    applied: BTreeMap<Index, (Term, EntryPayload)>,
    /// index → command bytes of writes acknowledged to clients.
    acked: BTreeMap<Index, EntryPayload>,
}

#[allow(missing_debug_implementations)]
pub struct Sim {
    opts: SimOptions,
    f: Features,
    rng: SmallRng,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<QueuedEvent>>,
    nodes: BTreeMap<NodeId, Node>,
    clients: Vec<Client>,
    /// Links that drop everything: (from, to).
    blocked: BTreeSet<(NodeId, NodeId)>,
    healed: bool,
    /// Clients start nothing new before this (a quiet spell).
    hush_until: Time,
    heal_at: Time,
    history: Vec<Operation>,
    oracle: Oracle,
    stats: SimStats,
    trace: VecDeque<String>,
    violation: Option<String>,
}

impl Sim {
    pub fn new(opts: SimOptions) -> Self {
        assert!(opts.members >= 1, "need at least one member");
        let mut rng = SmallRng::seed_from_u64(opts.seed ^ 0x6b75_6265_7261_6674);
        let f = Features {
            lease: rng.random_bool(0.5),
            pre_vote: rng.random_bool(0.8),
            check_quorum: rng.random_bool(0.8),
            membership_changes: rng.random_bool(0.6),
            transfers: rng.random_bool(0.6),
            pauses: rng.random_bool(0.4),
            priorities: rng.random_bool(0.3),
            drop_rate: [0.0, 0.01, 0.05, 0.15][rng.random_range(0..4)],
            dup_rate: [0.0, 0.02, 0.1][rng.random_range(0..3)],
            max_delay: [2 * MS, 10 * MS, 40 * MS][rng.random_range(0..3)],
            disk_latency_max: [MS / 2, 3 * MS, 20 * MS, 60 * MS][rng.random_range(0..4)],
            snapshot_every: [15, 40, 1_000_000][rng.random_range(0..3)],
            clients: rng.random_range(2..=5),
            keys: rng.random_range(1..=4),
            ops_after_heal: 5,
            quiesce: rng.random_bool(0.7),
            liveness_oracle: rng.random_bool(0.8),
            // Drawn apart, so that every seed keeps the features above.
            purge_keep: [0, 5, 30, 200]
                [SmallRng::seed_from_u64(opts.seed ^ 0x7075_7267_6500).random_range(0..4)],
        };
        let spares = 2;
        let total = opts.members + spares;
        let voters: Vec<PeerInfo> = (1..=opts.members as NodeId)
            .map(|id| {
                let priority = if f.priorities { (id % 3) as u32 } else { 0 };
                PeerInfo::new(id).with_priority(priority)
            })
            .collect();
        let initial = Membership::with_voters(voters);
        let mut nodes = BTreeMap::new();
        for id in 1..=total as NodeId {
            // Spare members start with an empty membership: they are added
            // later, exactly like a fresh node given a group by the operator.
            let membership = if id as usize <= opts.members {
                initial.clone()
            } else {
                Membership::default()
            };
            let disk = Disk {
                snapshot: SnapshotMeta {
                    index: 0,
                    term: 0,
                    membership,
                },
                ..Disk::default()
            };
            let rate = rng.random_range(0.9..1.1);
            nodes.insert(
                id,
                Node {
                    id,
                    up: false,
                    incarnation: 0,
                    tick_interval: (BASE_TICK as f64 * rate) as Time,
                    core: None,
                    disk,
                    jobs: VecDeque::new(),
                    kv: Kv::default(),
                    applied: 0,
                    incoming_snapshot: None,
                    proposals: BTreeMap::new(),
                    next_ctx: 0,
                    reads: BTreeMap::new(),
                    ready_reads: Vec::new(),
                    seen_commit: 0,
                    snapshot_queued: 0,
                    last_role: Role::Follower,
                    last_term: 0,
                    was_quiet: false,
                },
            );
        }
        let clients = (0..f.clients)
            .map(|id| Client {
                id,
                next_call: 1,
                issued_after_heal: 0,
                pending: None,
                leader_hint: None,
                last_seen: BTreeMap::new(),
            })
            .collect();
        let heal_at = opts.chaos_ms * MS;
        let mut sim = Sim {
            opts,
            f,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            clients,
            blocked: BTreeSet::new(),
            healed: false,
            hush_until: 0,
            heal_at,
            history: Vec::new(),
            oracle: Oracle::default(),
            stats: SimStats::default(),
            trace: VecDeque::new(),
            violation: None,
        };
        let ids: Vec<NodeId> = sim.nodes.keys().copied().collect();
        for id in ids {
            sim.start_node(id);
        }
        for c in 0..sim.clients.len() {
            let at = sim.rng.random_range(0..100 * MS);
            sim.schedule(at, EventKind::ClientWake { client: c });
        }
        sim.schedule(500 * MS, EventKind::Nemesis);
        sim.schedule(heal_at, EventKind::Heal);
        sim
    }

    /// Runs to the end; `Err` describes the first violation.
    pub fn run(mut self) -> Result<SimStats, Box<Violation>> {
        let deadline = self.heal_at + self.opts.liveness_bound_ms * MS;
        while let Some(Reverse(ev)) = self.queue.pop() {
            if ev.at > deadline {
                break;
            }
            self.now = ev.at;
            self.stats.events += 1;
            self.handle(ev.kind);
            if self.violation.is_none() {
                self.check_step();
            }
            if let Some(what) = self.violation.take() {
                return Err(self.violation_report(what));
            }
            // Done once every client finished and a leader stands: an
            // election (a priority hand-over, say) may be under way at the
            // moment the last client finishes; it must end within the bound.
            if self.healed && self.all_clients_done() && self.leader().is_some() {
                break;
            }
        }
        self.stats.virtual_ms = self.now / MS;
        if let Err(what) = self.check_end() {
            return Err(self.violation_report(what));
        }
        Ok(self.stats)
    }

    fn violation_report(&self, what: String) -> Box<Violation> {
        Box::new(Violation {
            what,
            at_ms: self.now / MS,
            replay: self.opts.replay_command(),
            trace_tail: self.trace.iter().cloned().collect(),
        })
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        let line = format!("{:>9.3}ms {}", self.now as f64 / MS as f64, line());
        if self.opts.verbose {
            println!("{line}");
        }
        self.trace.push_back(line);
        if self.trace.len() > 60 {
            self.trace.pop_front();
        }
    }

    fn fail(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    fn schedule(&mut self, at: Time, kind: EventKind) {
        self.seq += 1;
        self.queue.push(Reverse(QueuedEvent {
            at,
            seq: self.seq,
            kind,
        }));
    }

    // ------------------------------------------------------------------
    // Members
    // ------------------------------------------------------------------

    fn core_config(&self, id: NodeId, incarnation: u64) -> Config {
        let mut c = Config::new(id);
        c.pre_vote = self.f.pre_vote;
        c.check_quorum = self.f.check_quorum;
        c.leader_lease = self.f.lease;
        c.quiesce = self.f.quiesce;
        c.max_inflight_appends = 8;
        c.max_append_bytes = 2_000;
        c.staging_catch_up_gap = 20;
        c.rng_seed = self
            .opts
            .seed
            .wrapping_mul(31)
            .wrapping_add(id * 1_000 + incarnation);
        c
    }

    fn start_node(&mut self, id: NodeId) {
        let incarnation = self.nodes[&id].incarnation + 1;
        let cfg = self.core_config(id, incarnation);
        let node = self.nodes.get_mut(&id).expect("node");
        let entries: Vec<Entry> = node.disk.log.values().cloned().collect();
        let core = RaftCore::new(
            cfg,
            node.disk.hard_state,
            node.disk.snapshot.clone(),
            entries,
        );
        let core = match core {
            Ok(core) => core,
            Err(e) => return self.fail(format!("n{id} cannot restart from its disk: {e}")),
        };
        let node = self.nodes.get_mut(&id).expect("node");
        node.up = true;
        node.incarnation = incarnation;
        node.kv = (*node.disk.snapshot_data).clone();
        node.applied = node.disk.snapshot.index;
        node.seen_commit = core.log().committed();
        node.snapshot_queued = node.disk.snapshot.index;
        node.last_role = Role::Follower;
        node.last_term = core.term();
        node.core = Some(core);
        if self.now > 0 {
            self.liveness_changed();
        }
        let node = self.nodes.get_mut(&id).expect("node");
        let tick = node.tick_interval;
        let phase = self.rng.random_range(0..tick);
        self.schedule(
            self.now + phase,
            EventKind::Tick {
                node: id,
                incarnation,
            },
        );
    }

    fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node");
        if !node.up {
            return;
        }
        node.up = false;
        node.core = None;
        node.jobs.clear();
        node.proposals.clear();
        node.reads.clear();
        node.ready_reads.clear();
        node.incoming_snapshot = None;
        self.stats.crashes += 1;
        self.note(|| format!("crash n{id}"));
        self.liveness_changed();
    }

    fn core(&mut self, id: NodeId) -> Option<&mut RaftCore> {
        self.nodes.get_mut(&id).and_then(|n| n.core.as_mut())
    }

    /// Takes and executes Readies until the core has nothing more to say.
    fn drive(&mut self, id: NodeId) {
        for _ in 0..16 {
            let Some(core) = self.core(id) else { return };
            let ready = core.take_ready();
            if ready.is_empty() {
                break;
            }
            self.persist(id, ready);
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let quiet_leader = node
            .core
            .as_ref()
            .is_some_and(|c| c.is_quiet() && c.role() == Role::Leader);
        if quiet_leader && !node.was_quiet {
            self.stats.quiet_spells += 1;
            self.note(|| format!("n{id} leads a quiet group"));
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.was_quiet = quiet_leader;
        }
    }

    /// Node liveness would notice this change of who is up or reachable:
    /// every member wakes a little later.
    fn liveness_changed(&mut self) {
        if self.f.liveness_oracle {
            let after = self.rng.random_range(10 * MS..60 * MS);
            self.schedule(self.now + after, EventKind::Wake);
        }
    }

    fn persist(&mut self, id: NodeId, ready: Ready) {
        let Ready {
            number,
            hard_state,
            snapshot,
            entries,
            messages,
            persisted_messages,
            committed_entries,
            send_snapshot,
            fetch,
            events,
        } = ready;
        self.check_appended(id, &entries);
        // 1. The snapshot is restored now; its files become durable with the job.
        let snapshot = snapshot.map(|meta| {
            let node = self.nodes.get_mut(&id).expect("node");
            let data = match node.incoming_snapshot.take() {
                Some((m, data)) if m == meta => data,
                other => panic!("core installs snapshot {meta:?} but the shell holds {other:?}"),
            };
            node.kv = (*data).clone();
            node.applied = meta.index;
            node.proposals.retain(|i, _| *i > meta.index);
            self.stats.snapshots_installed += 1;
            (meta, data)
        });
        // 2. Messages that may leave now.
        for env in messages {
            self.send_raft(env);
        }
        // 3. The disk job, in order behind earlier ones.
        let empty = hard_state.is_none() && snapshot.is_none() && entries.is_empty();
        let latency = if empty {
            0
        } else {
            self.rng.random_range(MS / 10..=self.f.disk_latency_max)
        };
        let job = DiskJob {
            number: Some(number),
            done_at: 0,
            hard_state,
            snapshot,
            local_snapshot: None,
            entries,
            messages: persisted_messages,
        };
        self.enqueue(id, job, latency);
        // 4. Apply.
        self.apply(id, committed_entries);
        // 5. Snapshots for lagging followers.
        for to in send_snapshot {
            let node = &self.nodes[&id];
            let term = node.core.as_ref().map_or(0, |c| c.term());
            let payload = Payload::Snapshot {
                term,
                meta: node.disk.snapshot.clone(),
                data: node.disk.snapshot_data.clone(),
            };
            self.send(Endpoint::Node(id), Endpoint::Node(to), payload);
        }
        // 6. Reads of compacted entries, answered after a disk's latency:
        // a purge may come first.
        for fetch in fetch {
            let latency = self.rng.random_range(MS / 10..=self.f.disk_latency_max);
            let incarnation = self.nodes[&id].incarnation;
            self.schedule(
                self.now + latency,
                EventKind::FetchDone {
                    node: id,
                    incarnation,
                    fetch,
                },
            );
        }
        // 7. Events.
        for ev in events {
            self.on_event(id, ev);
        }
        self.serve_ready_reads(id);
        self.maybe_snapshot(id);
    }

    /// Queues a disk job behind the earlier ones; one with nothing to write
    /// and nothing ahead of it completes at once.
    fn enqueue(&mut self, id: NodeId, mut job: DiskJob, latency: Time) {
        let node = self.nodes.get_mut(&id).expect("node");
        if latency == 0 && node.jobs.is_empty() {
            return self.complete_job(id, job);
        }
        let prev_done = node.jobs.back().map_or(self.now, |j| j.done_at);
        job.done_at = prev_done.max(self.now) + latency;
        let (done_at, incarnation) = (job.done_at, node.incarnation);
        node.jobs.push_back(job);
        self.schedule(
            done_at,
            EventKind::DiskDone {
                node: id,
                incarnation,
            },
        );
    }

    fn complete_job(&mut self, id: NodeId, job: DiskJob) {
        let node = self.nodes.get_mut(&id).expect("node");
        if let Some(hs) = job.hard_state {
            node.disk.hard_state = hs;
        }
        // A snapshot from the leader older than one this member took itself
        // meanwhile is already covered by it: installing it would move the
        // snapshot backwards and drop entries only the newer one covers
        // (found by seed 138; the storage layer keeps the same rule).
        if let Some((meta, data)) = job
            .snapshot
            .filter(|(m, _)| m.index > node.disk.snapshot.index)
        {
            let keep = node
                .disk
                .log
                .get(&meta.index)
                .is_some_and(|e| e.term == meta.term);
            if keep {
                node.disk.log.retain(|i, _| *i > meta.index);
            } else {
                node.disk.log.clear();
            }
            node.disk.snapshot = meta;
            node.disk.snapshot_data = data;
        }
        if let Some(first) = job.entries.first() {
            let _ = node.disk.log.split_off(&first.index);
            for e in job.entries {
                if e.index > node.disk.snapshot.index {
                    node.disk.log.insert(e.index, e);
                }
            }
        }
        let mut compact = None;
        if let Some((meta, data)) = job.local_snapshot {
            if meta.index > node.disk.snapshot.index {
                // Storage keeps a tail behind the snapshot for followers.
                let keep_from = meta.index.saturating_sub(self.f.purge_keep);
                node.disk.log.retain(|i, _| *i > keep_from);
                node.disk.snapshot = meta.clone();
                node.disk.snapshot_data = data;
            }
            compact = Some(meta.index);
        }
        for env in job.messages {
            self.send_raft(env);
        }
        self.check_disk(id, "disk write");
        if let Some(core) = self.core(id) {
            if let Some(number) = job.number {
                core.on_persisted(number);
            }
            // Only a durable snapshot lets the core forget entries.
            if let Some(index) = compact.filter(|i| *i > core.log().snapshot_index()) {
                core.compact(index);
            }
        }
    }

    /// The simulated disk must always restore: entries contiguous after the
    /// snapshot. A hole here is a bug in the shell contract or in this shell.
    fn check_disk(&mut self, id: NodeId, after: &str) {
        let disk = &self.nodes[&id].disk;
        let after_snapshot = disk.log.keys().filter(|i| **i > disk.snapshot.index);
        let hole = (disk.snapshot.index + 1..)
            .zip(after_snapshot)
            .find(|(want, got)| want != *got);
        if let Some((want, got)) = hole {
            let what = format!(
                "n{id} disk has a hole after {after}: snapshot at {}, expected entry {want}, found {got}",
                disk.snapshot.index
            );
            self.fail(what);
        }
    }

    fn apply(&mut self, id: NodeId, entries: Vec<Entry>) {
        let Some(last) = entries.last().map(|e| e.index) else {
            return;
        };
        for e in entries {
            self.check_applied(id, &e);
            let node = self.nodes.get_mut(&id).expect("node");
            assert_eq!(e.index, node.applied + 1, "n{id} applies out of order");
            node.applied = e.index;
            let result = match &e.payload {
                EntryPayload::Command(data) => {
                    let cmd = Command::decode(data).expect("simulation writes valid commands");
                    node.kv.apply(&cmd)
                }
                _ => None,
            };
            // Answer the proposal made at this index, if this member made it.
            let Some((term, client, call)) = node.proposals.remove(&e.index) else {
                continue;
            };
            let reply = if term == e.term {
                match result {
                    Some(r) => {
                        self.oracle.acked.insert(e.index, e.payload.clone());
                        Ok(OpResult::Write(r))
                    }
                    None => continue,
                }
            } else {
                Err(Retry { leader_hint: None })
            };
            self.send(
                Endpoint::Node(id),
                Endpoint::Client(client),
                Payload::Response {
                    call,
                    result: reply,
                },
            );
        }
        // Proposals at indexes now applied with another entry were lost.
        let node = self.nodes.get_mut(&id).expect("node");
        let lost: Vec<(Index, (Term, usize, u64))> = node
            .proposals
            .range(..=last)
            .map(|(i, p)| (*i, *p))
            .collect();
        for (i, _) in &lost {
            node.proposals.remove(i);
        }
        for (_, (_, client, call)) in lost {
            let payload = Payload::Response {
                call,
                result: Err(Retry { leader_hint: None }),
            };
            self.send(Endpoint::Node(id), Endpoint::Client(client), payload);
        }
        if let Some(core) = self.core(id) {
            core.applied(last);
        }
    }

    fn on_event(&mut self, id: NodeId, ev: Event) {
        match ev {
            Event::ReadReady { ctx, index } => {
                let node = self.nodes.get_mut(&id).expect("node");
                if let Some((client, call, key)) = node.reads.remove(&ctx) {
                    node.ready_reads.push((index, client, call, key));
                }
            }
            Event::ReadFailed { ctx, error } => {
                let node = self.nodes.get_mut(&id).expect("node");
                if let Some((client, call, _)) = node.reads.remove(&ctx) {
                    let leader_hint = match error {
                        ReadError::NotLeader { leader } => leader,
                        _ => None,
                    };
                    let payload = Payload::Response {
                        call,
                        result: Err(Retry { leader_hint }),
                    };
                    self.send(Endpoint::Node(id), Endpoint::Client(client), payload);
                }
            }
            Event::ConfChangeDone(r) => {
                if r.is_ok() {
                    self.stats.conf_changes_ok += 1;
                } else {
                    self.stats.conf_changes_failed += 1;
                }
                self.note(|| format!("n{id} membership change done: {r:?}"));
            }
            Event::TransferDone(r) => {
                if r.is_ok() {
                    self.stats.transfers_ok += 1;
                } else {
                    self.stats.transfers_failed += 1;
                }
                self.note(|| format!("n{id} transfer done: {r:?}"));
            }
            Event::LeaderChanged { .. } => {}
        }
    }

    fn serve_ready_reads(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node");
        let applied = node.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = node
            .ready_reads
            .drain(..)
            .partition(|(index, ..)| *index <= applied);
        node.ready_reads = waiting;
        let answers: Vec<_> = ready
            .into_iter()
            .map(|(_, client, call, key)| (client, call, node.kv.get(key)))
            .collect();
        for (client, call, value) in answers {
            let payload = Payload::Response {
                call,
                result: Ok(OpResult::Read(value)),
            };
            self.send(Endpoint::Node(id), Endpoint::Client(client), payload);
        }
    }

    /// Takes a snapshot every `snapshot_every` applied entries and compacts
    /// the log up to it (sometimes keeping a few entries for laggards).
    fn maybe_snapshot(&mut self, id: NodeId) {
        let every = self.f.snapshot_every;
        let node = self.nodes.get_mut(&id).expect("node");
        let Some(core) = node.core.as_mut() else {
            return;
        };
        if node.applied < node.snapshot_queued + every {
            return;
        }
        let index = node.applied;
        let Some(meta) = core.snapshot_meta(index) else {
            return;
        };
        node.snapshot_queued = index;
        let job = DiskJob {
            number: None,
            done_at: 0,
            hard_state: None,
            snapshot: None,
            local_snapshot: Some((meta, Arc::new(node.kv.clone()))),
            entries: Vec::new(),
            messages: Vec::new(),
        };
        let latency = self.rng.random_range(MS / 10..=self.f.disk_latency_max);
        self.enqueue(id, job, latency);
    }

    // ------------------------------------------------------------------
    // Network
    // ------------------------------------------------------------------

    fn send_raft(&mut self, env: Envelope) {
        self.send(
            Endpoint::Node(env.from),
            Endpoint::Node(env.to),
            Payload::Raft(env.msg),
        );
    }

    fn send(&mut self, from: Endpoint, to: Endpoint, payload: Payload) {
        self.stats.messages_sent += 1;
        if let (Endpoint::Node(a), Endpoint::Node(b)) = (from, to)
            && self.blocked.contains(&(a, b))
        {
            self.stats.messages_dropped += 1;
            return;
        }
        let drop_rate = if self.healed { 0.0 } else { self.f.drop_rate };
        if self.rng.random_bool(drop_rate) {
            self.stats.messages_dropped += 1;
            return;
        }
        let copies = if !self.healed && self.rng.random_bool(self.f.dup_rate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.random_range(MS / 10..=self.f.max_delay);
            self.schedule(
                self.now + delay,
                EventKind::Deliver {
                    from,
                    to,
                    payload: payload.clone(),
                },
            );
        }
    }

    fn deliver(&mut self, from: Endpoint, to: Endpoint, payload: Payload) {
        match to {
            Endpoint::Client(c) => {
                if let Payload::Response { call, result, .. } = payload {
                    self.client_response(c, from, call, result);
                }
            }
            Endpoint::Node(id) => {
                if !self.nodes[&id].up {
                    return;
                }
                match payload {
                    Payload::Raft(msg) => {
                        let Endpoint::Node(src) = from else { return };
                        self.core(id).expect("up").step(src, msg);
                    }
                    Payload::Snapshot { term, meta, data } => {
                        let Endpoint::Node(src) = from else { return };
                        let node = self.nodes.get_mut(&id).expect("node");
                        node.incoming_snapshot = Some((meta.clone(), data));
                        let msg = kuberaft_node::core::InstallSnapshot { term, meta };
                        self.core(id)
                            .expect("up")
                            .step(src, Message::InstallSnapshot(msg));
                    }
                    Payload::Request { client, call, op } => {
                        self.node_request(id, client, call, op)
                    }
                    Payload::Response { .. } => {}
                }
                self.drive(id);
            }
        }
    }

    fn node_request(&mut self, id: NodeId, client: usize, call: u64, op: ClientOp) {
        let node = self.nodes.get_mut(&id).expect("node");
        let core = node.core.as_mut().expect("up");
        match op {
            ClientOp::Write(w) => {
                let cmd = Command {
                    client: client as u64,
                    call,
                    op: w,
                };
                match core.propose(cmd.encode()) {
                    Ok((term, index)) => {
                        node.proposals.insert(index, (term, client, call));
                    }
                    Err(e) => {
                        let leader_hint = match e {
                            kuberaft_node::core::ProposeError::NotLeader { leader } => leader,
                            _ => None,
                        };
                        let payload = Payload::Response {
                            call,
                            result: Err(Retry { leader_hint }),
                        };
                        self.send(Endpoint::Node(id), Endpoint::Client(client), payload);
                    }
                }
            }
            ClientOp::Get { key } => {
                node.next_ctx += 1;
                let ctx = node.next_ctx;
                node.reads.insert(ctx, (client, call, key));
                core.read_index(ctx);
            }
        }
    }

    // ------------------------------------------------------------------
    // Clients
    // ------------------------------------------------------------------

    fn all_clients_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.pending.is_none() && c.issued_after_heal >= self.f.ops_after_heal)
    }

    fn client_wake(&mut self, c: usize) {
        let now = self.now;
        let timeout = 400 * MS;
        match &self.clients[c].pending {
            Some(p) if now >= p.deadline => {
                // Timed out: retry the same call elsewhere.
                let p = p.clone();
                self.clients[c].leader_hint = None;
                self.client_send(c, p.call, p.op);
                self.clients[c].pending.as_mut().expect("pending").deadline = now + timeout;
                self.schedule(now + timeout, EventKind::ClientWake { client: c });
            }
            Some(_) => {}
            None if now < self.hush_until && !self.healed => {
                self.schedule(self.hush_until, EventKind::ClientWake { client: c });
            }
            None if !self.healed || self.clients[c].issued_after_heal < self.f.ops_after_heal => {
                let key = self.rng.random_range(0..self.f.keys);
                let client = &mut self.clients[c];
                let call = client.next_call;
                client.next_call += 1;
                if self.healed {
                    client.issued_after_heal += 1;
                }
                let value = (c as u64 + 1) * 1_000_000 + call;
                let op = match self.rng.random_range(0..10) {
                    0..=3 => ClientOp::Get { key },
                    4..=7 => ClientOp::Write(WriteOp::Put { key, value }),
                    _ => {
                        let expected = client.last_seen.get(&key).copied().unwrap_or(0);
                        ClientOp::Write(WriteOp::Cas {
                            key,
                            expected,
                            new: value,
                        })
                    }
                };
                client.pending = Some(Pending {
                    call,
                    op,
                    invoked_at: now,
                    deadline: now + timeout,
                });
                self.client_send(c, call, op);
                self.schedule(now + timeout, EventKind::ClientWake { client: c });
            }
            None => {}
        }
    }

    fn client_send(&mut self, c: usize, call: u64, op: ClientOp) {
        let n = self.nodes.len() as NodeId;
        // Reads go to any member now and then, to exercise follower reads.
        let target = match (op, self.clients[c].leader_hint) {
            (ClientOp::Get { .. }, _) if self.rng.random_bool(0.3) => self.rng.random_range(1..=n),
            (_, Some(h)) => h,
            _ => self.rng.random_range(1..=n),
        };
        self.send(
            Endpoint::Client(c),
            Endpoint::Node(target),
            Payload::Request {
                client: c,
                call,
                op,
            },
        );
    }

    fn client_response(
        &mut self,
        c: usize,
        from: Endpoint,
        call: u64,
        result: Result<OpResult, Retry>,
    ) {
        let now = self.now;
        let Some(p) = self.clients[c].pending.clone() else {
            return;
        };
        if p.call != call {
            return;
        }
        match result {
            Err(Retry { leader_hint }) => {
                self.clients[c].leader_hint = leader_hint;
                // Back off a little before retrying.
                let backoff = self.rng.random_range(5 * MS..30 * MS);
                let pending = self.clients[c].pending.as_mut().expect("pending");
                pending.deadline = now + backoff;
                self.schedule(now + backoff, EventKind::ClientWake { client: c });
            }
            Ok(r) => {
                if let Endpoint::Node(n) = from
                    && matches!(p.op, ClientOp::Write(_))
                {
                    self.clients[c].leader_hint = Some(n);
                }
                let (key, op) = match (p.op, r) {
                    (ClientOp::Get { key }, OpResult::Read(v)) => {
                        self.stats.reads_done += 1;
                        if let Some(v) = v {
                            self.clients[c].last_seen.insert(key, v);
                        }
                        (key, RegisterOp::Get(v))
                    }
                    (
                        ClientOp::Write(WriteOp::Put { key, value }),
                        OpResult::Write(WriteResult::Put),
                    ) => {
                        self.stats.writes_acked += 1;
                        (key, RegisterOp::Put(value))
                    }
                    (
                        ClientOp::Write(WriteOp::Cas { key, expected, new }),
                        OpResult::Write(WriteResult::Cas(ok)),
                    ) => {
                        self.stats.writes_acked += 1;
                        (key, RegisterOp::Cas { expected, new, ok })
                    }
                    (op, r) => {
                        self.fail(format!(
                            "client {c} call {call}: {op:?} answered with {r:?}"
                        ));
                        return;
                    }
                };
                self.history.push(Operation {
                    client: self.clients[c].id,
                    key,
                    invoked_at: p.invoked_at,
                    returned_at: now,
                    op,
                });
                self.stats.ops_completed += 1;
                self.clients[c].pending = None;
                let think = self.rng.random_range(0..80 * MS);
                self.schedule(now + think, EventKind::ClientWake { client: c });
            }
        }
    }

    // ------------------------------------------------------------------
    // Faults
    // ------------------------------------------------------------------

    fn handle(&mut self, kind: EventKind) {
        match kind {
            EventKind::Tick { node, incarnation } => {
                let n = &self.nodes[&node];
                if !n.up || n.incarnation != incarnation {
                    return;
                }
                let next = self.now + n.tick_interval;
                self.core(node).expect("up").tick();
                self.drive(node);
                self.schedule(next, EventKind::Tick { node, incarnation });
            }
            EventKind::Deliver { from, to, payload } => self.deliver(from, to, payload),
            EventKind::DiskDone { node, incarnation } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if !n.up || n.incarnation != incarnation {
                    return;
                }
                let job = n.jobs.pop_front().expect("a job per DiskDone");
                self.complete_job(node, job);
                self.drive(node);
            }
            EventKind::FetchDone {
                node,
                incarnation,
                fetch,
            } => {
                let n = &self.nodes[&node];
                if !n.up || n.incarnation != incarnation {
                    return;
                }
                let entries = read_disk(&n.disk, fetch);
                match &entries {
                    Some(es) => self.stats.entries_fetched += es.len() as u64 - 1,
                    None => self.stats.fetches_purged += 1,
                }
                if let Some(core) = self.core(node) {
                    core.fetched(fetch.to, fetch.prev, entries);
                }
                self.drive(node);
            }
            EventKind::ClientWake { client } => self.client_wake(client),
            EventKind::Restart { node } => {
                if !self.nodes[&node].up {
                    self.note(|| format!("restart n{node}"));
                    self.start_node(node);
                }
            }
            EventKind::Nemesis => {
                if !self.healed {
                    self.nemesis();
                    let next = self.now + self.rng.random_range(100 * MS..600 * MS);
                    self.schedule(next, EventKind::Nemesis);
                }
            }
            EventKind::Heal => self.heal(),
            EventKind::Wake => {
                let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                for id in ids {
                    if let Some(core) = self.core(id) {
                        core.wake();
                        self.drive(id);
                    }
                }
            }
        }
    }

    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .values()
            .filter_map(|n| n.core.as_ref())
            .filter(|c| c.role() == Role::Leader)
            .max_by_key(|c| c.term())
            .map(|c| c.id())
    }

    fn nemesis(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let down = self.nodes.values().filter(|n| !n.up).count();
        let choice = self.rng.random_range(0..100);
        match choice {
            0..=14 if down < self.opts.members.div_ceil(2) => {
                let id = ids[self.rng.random_range(0..ids.len())];
                self.crash(id);
                let after = self.rng.random_range(50 * MS..1500 * MS);
                self.schedule(self.now + after, EventKind::Restart { node: id });
            }
            88..=91 => {
                // Power loss: every member crashes at once and loses whatever
                // it had not made durable, then they come back one by one.
                self.note(|| "power loss: all members crash".into());
                for id in ids.clone() {
                    self.crash(id);
                    let after = self.rng.random_range(10 * MS..800 * MS);
                    self.schedule(self.now + after, EventKind::Restart { node: id });
                }
            }
            92..=95 => {
                // Crash the leader and restart it at once, racing its
                // followers' elections with whatever it kept.
                if let Some(l) = self.leader() {
                    self.crash(l);
                    let after = self.rng.random_range(MS..30 * MS);
                    self.schedule(self.now + after, EventKind::Restart { node: l });
                }
            }
            15..=24 => {
                // Symmetric partition into two sides.
                self.blocked.clear();
                let side: Vec<NodeId> = ids
                    .iter()
                    .copied()
                    .filter(|_| self.rng.random_bool(0.5))
                    .collect();
                for a in &ids {
                    for b in &ids {
                        if side.contains(a) != side.contains(b) {
                            self.blocked.insert((*a, *b));
                        }
                    }
                }
                self.stats.partitions += 1;
                self.note(|| format!("partition {side:?} | rest"));
                self.liveness_changed();
            }
            25..=31 => {
                // One-way loss.
                let a = ids[self.rng.random_range(0..ids.len())];
                let b = ids[self.rng.random_range(0..ids.len())];
                if a != b {
                    self.blocked.insert((a, b));
                    self.stats.partitions += 1;
                    self.note(|| format!("one-way cut n{a} -> n{b}"));
                    self.liveness_changed();
                }
            }
            32..=39 => {
                // Isolate the leader.
                if let Some(l) = self.leader() {
                    for b in &ids {
                        if *b != l {
                            self.blocked.insert((l, *b));
                            self.blocked.insert((*b, l));
                        }
                    }
                    self.stats.partitions += 1;
                    self.note(|| format!("isolate leader n{l}"));
                    self.liveness_changed();
                }
            }
            40..=54 => {
                self.blocked.clear();
                self.note(|| "network healed".into());
                self.liveness_changed();
            }
            96..=99 if self.f.quiesce => {
                // A quiet spell: no client starts anything for a while, so
                // the group goes quiet (faults may still strike meanwhile).
                let spell = self.rng.random_range(300 * MS..1_500 * MS);
                self.hush_until = self.now + spell;
                self.note(|| format!("clients hush for {} ms", spell / MS));
            }
            55..=69 if self.f.membership_changes => self.inject_membership_change(),
            70..=79 if self.f.transfers => {
                if let Some(l) = self.leader() {
                    let voters: Vec<NodeId> = self.nodes[&l]
                        .core
                        .as_ref()
                        .expect("up")
                        .membership()
                        .voters
                        .keys()
                        .copied()
                        .collect();
                    let target = if self.rng.random_bool(0.3) {
                        None
                    } else {
                        Some(voters[self.rng.random_range(0..voters.len())])
                    };
                    let r = self.core(l).expect("up").transfer_leadership(target, 30);
                    self.note(|| format!("n{l} transfer to {target:?}: {r:?}"));
                    self.drive(l);
                }
            }
            80..=87 if self.f.pauses => {
                let id = ids[self.rng.random_range(0..ids.len())];
                let pause = self.rng.random_bool(0.6);
                if let Some(core) = self.core(id) {
                    core.set_elections_paused(pause);
                    self.stats.pauses += 1;
                    self.note(|| format!("n{id} elections paused={pause}"));
                    self.drive(id);
                }
            }
            _ => {}
        }
    }

    fn inject_membership_change(&mut self) {
        let Some(l) = self.leader() else { return };
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        let m = self.nodes[&l]
            .core
            .as_ref()
            .expect("up")
            .membership()
            .clone();
        if m.is_joint() {
            return;
        }
        let voters: Vec<PeerInfo> = m.voters.values().cloned().collect();
        let listeners: Vec<PeerInfo> = m.listeners.values().cloned().collect();
        let outside: Vec<NodeId> = all.iter().copied().filter(|id| !m.contains(*id)).collect();
        let pick =
            |rng: &mut SmallRng, v: &[NodeId]| v.get(rng.random_range(0..v.len().max(1))).copied();
        let req = match self.rng.random_range(0..6) {
            // Add a voter.
            0 => pick(&mut self.rng, &outside).map(|id| ConfChangeRequest {
                mode: ConfChangeMode::Add,
                voters: vec![PeerInfo::new(id)],
                listeners: vec![],
            }),
            // Remove a voter (the leader included), keeping at least three.
            1 if voters.len() > 3 => {
                let gone = voters[self.rng.random_range(0..voters.len())].id;
                Some(ConfChangeRequest {
                    mode: ConfChangeMode::SetUnconditionally,
                    voters: voters.iter().filter(|p| p.id != gone).cloned().collect(),
                    listeners: listeners.clone(),
                })
            }
            // Add a listener.
            2 => pick(&mut self.rng, &outside).map(|id| ConfChangeRequest {
                mode: ConfChangeMode::Add,
                voters: vec![],
                listeners: vec![PeerInfo::new(id)],
            }),
            // Promote a listener.
            3 => listeners.first().map(|p| ConfChangeRequest {
                mode: ConfChangeMode::Add,
                voters: vec![p.clone()],
                listeners: vec![],
            }),
            // Replace a voter, compare-and-set against what we saw.
            4 => pick(&mut self.rng, &outside).map(|new| {
                let gone = voters[self.rng.random_range(0..voters.len())].id;
                let mut next: Vec<PeerInfo> =
                    voters.iter().filter(|p| p.id != gone).cloned().collect();
                next.push(PeerInfo::new(new));
                ConfChangeRequest {
                    mode: ConfChangeMode::CompareAndSet {
                        voters: voters.clone(),
                        listeners: listeners.clone(),
                    },
                    voters: next,
                    listeners: listeners.clone(),
                }
            }),
            // Drop all listeners.
            _ => (!listeners.is_empty()).then(|| ConfChangeRequest {
                mode: ConfChangeMode::SetUnconditionally,
                voters: voters.clone(),
                listeners: vec![],
            }),
        };
        let Some(req) = req else { return };
        let r = self.core(l).expect("up").change_membership(req.clone());
        self.note(|| format!("n{l} membership change {req:?}: {r:?}"));
        self.drive(l);
    }

    fn heal(&mut self) {
        self.healed = true;
        self.blocked.clear();
        self.note(|| "HEAL: network repaired, all members restarted, elections resumed".into());
        self.liveness_changed();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if !self.nodes[&id].up {
                self.start_node(id);
            }
            if let Some(core) = self.core(id) {
                core.set_elections_paused(false);
            }
            self.drive(id);
        }
    }

    // ------------------------------------------------------------------
    // Invariants
    // ------------------------------------------------------------------

    fn check_appended(&mut self, id: NodeId, entries: &[Entry]) {
        let Some(core) = self.nodes[&id].core.as_ref() else {
            return;
        };
        let log = core.log();
        let mut found = None;
        for e in entries {
            let prev_term = if e.index > log.first_index() {
                log.term(e.index - 1)
            } else {
                None
            };
            match self.oracle.entries.get(&(e.index, e.term)) {
                Some((payload, known_prev)) => {
                    if *payload != e.payload
                        || matches!((known_prev, prev_term), (Some(a), Some(b)) if *a != b)
                    {
                        found = Some(format!(
                            "log matching: n{id} holds a different entry at ({}, term {}) or before it",
                            e.index, e.term
                        ));
                        break;
                    }
                }
                None => {
                    self.oracle
                        .entries
                        .insert((e.index, e.term), (e.payload.clone(), prev_term));
                }
            }
        }
        if let Some(f) = found {
            self.fail(f);
        }
    }

    fn check_applied(&mut self, id: NodeId, e: &Entry) {
        // Applied means committed; record it here too, since the entry may be
        // compacted before the end-of-event check looks at the log.
        match self.oracle.committed.get(&e.index) {
            Some((t, p)) if *t != e.term || *p != e.payload => self.fail(format!(
                "n{id} applies term {} at {} where term {t} was committed",
                e.term, e.index
            )),
            Some(_) => {}
            None => {
                self.oracle
                    .committed
                    .insert(e.index, (e.term, e.payload.clone()));
            }
        }
        match self.oracle.applied.get(&e.index) {
            Some((term, payload)) if *term != e.term || *payload != e.payload => {
                self.fail(format!(
                    "state machine safety: n{id} applies (term {}) at {} where another member applied term {term}",
                    e.term, e.index
                ));
            }
            Some(_) => {}
            None => {
                self.oracle
                    .applied
                    .insert(e.index, (e.term, e.payload.clone()));
            }
        }
    }

    fn check_step(&mut self) {
        let mut problems = Vec::new();
        let mut new_leaders = Vec::new();
        for node in self.nodes.values_mut() {
            let Some(core) = node.core.as_ref() else {
                continue;
            };
            if let Err(e) = core.check_invariants() {
                problems.push(format!("n{}: {e}", node.id));
            }
            let commit = core.log().committed();
            if commit < node.seen_commit {
                problems.push(format!(
                    "n{}: commit index went back {} -> {commit}",
                    node.id, node.seen_commit
                ));
            }
            for i in (node.seen_commit + 1)..=commit {
                if let Some(e) = core.log().get(i) {
                    match self.oracle.committed.get(&i) {
                        Some((t, p)) if *t != e.term || *p != e.payload => problems.push(format!(
                            "n{} committed term {} at {i} where term {t} was committed",
                            node.id, e.term
                        )),
                        Some(_) => {}
                        None => {
                            self.oracle.committed.insert(i, (e.term, e.payload.clone()));
                        }
                    }
                }
            }
            node.seen_commit = commit;
            let is_new_leader = core.role() == Role::Leader
                && (node.last_role != Role::Leader || node.last_term != core.term());
            node.last_role = core.role();
            node.last_term = core.term();
            if is_new_leader {
                new_leaders.push((node.id, core.term()));
                let log = core.log();
                if let Some((i, _)) = self
                    .oracle
                    .acked
                    .range(log.snapshot_index() + 1..)
                    .find(|(i, p)| log.get(**i).is_none_or(|e| e.payload != **p))
                {
                    problems.push(format!(
                        "acknowledged write at {i} missing from n{} leading term {}",
                        node.id,
                        core.term()
                    ));
                }
                // Leader completeness: every committed entry is in its log.
                let log = core.log();
                for (i, (t, _)) in self.oracle.committed.range(log.snapshot_index() + 1..) {
                    if log.term(*i) != Some(*t) {
                        problems.push(format!(
                            "leader completeness: n{} leads term {} without committed entry {i} (term {t})",
                            node.id,
                            core.term()
                        ));
                        break;
                    }
                }
            }
        }
        for (id, term) in new_leaders {
            self.stats.leaders_elected += 1;
            self.note(|| format!("n{id} leads term {term}"));
            if let Some(other) = self.oracle.leaders.insert(term, id)
                && other != id
            {
                problems.push(format!(
                    "election safety: n{other} and n{id} both led term {term}"
                ));
            }
        }
        if let Some(p) = problems.into_iter().next() {
            self.fail(p);
        }
    }

    /// One line per member that is up: role, term, leader, log, voters.
    fn member_summary(&self) -> String {
        let mut s = String::new();
        for n in self.nodes.values() {
            if let Some(core) = &n.core {
                let st = core.status();
                let _ = write!(
                    s,
                    " n{} {:?}{} t{} leader {:?} commit {} last {} voters {:?};",
                    n.id,
                    st.role,
                    if st.quiet { " (quiet)" } else { "" },
                    st.term,
                    st.leader,
                    st.commit_index,
                    st.last_index,
                    core.membership().voters.keys().collect::<Vec<_>>()
                );
            }
        }
        s
    }

    fn check_end(&mut self) -> Result<(), String> {
        if !self.all_clients_done() {
            let mut s =
                String::from("liveness: operations still pending after the network healed:");
            for c in &self.clients {
                if let Some(p) = &c.pending {
                    let _ = write!(s, " client {} call {} {:?};", c.id, p.call, p.op);
                }
            }
            let _ = write!(s, " members:{}", self.member_summary());
            return Err(s);
        }
        for (i, payload) in &self.oracle.acked {
            if self
                .oracle
                .committed
                .get(i)
                .is_none_or(|(_, p)| p != payload)
            {
                return Err(format!(
                    "acknowledged write at index {i} lost: not what is committed there"
                ));
            }
        }
        if self.leader().is_none() {
            return Err(format!(
                "liveness: no leader after the network healed; members:{}",
                self.member_summary()
            ));
        }
        check_linearizable(&self.history).map_err(|(key, ops)| {
            let mut s = format!(
                "history of key {key} is not linearizable ({} operations):",
                ops.len()
            );
            for op in ops.iter().take(80) {
                let _ = write!(
                    s,
                    "\n    client {} [{:.3}ms, {:.3}ms] {:?}",
                    op.client,
                    op.invoked_at as f64 / MS as f64,
                    op.returned_at as f64 / MS as f64,
                    op.op
                );
            }
            s
        })
    }
}

/// Runs one seed.
///
/// A panic inside the core or the harness is reported as a violation too, so
/// that it comes with the replay command.
pub fn run(opts: SimOptions) -> Result<SimStats, Box<Violation>> {
    let replay = opts.replay_command();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Sim::new(opts).run())) {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Box::new(Violation {
                what: format!("panic: {msg}"),
                at_ms: 0,
                replay,
                trace_tail: vec![],
            }))
        }
    }
}

/// What a member's log storage returns for a fetch: the entries from `prev`
/// on, as many as `max_bytes` allows (two at least), if it still holds them.
fn read_disk(disk: &Disk, f: Fetch) -> Option<Vec<Entry>> {
    let mut out: Vec<Entry> = Vec::new();
    let mut bytes = 0;
    for i in f.prev..=f.hi {
        let e = disk.log.get(&i)?;
        bytes += e.size_bytes();
        if out.len() >= 2 && bytes > f.max_bytes {
            break;
        }
        out.push(e.clone());
    }
    Some(out)
}

//! [`RaftCore`]: one member of one group, as a deterministic state machine.
//!
//! Inputs are method calls (`tick`, `step`, `propose`, `read_index`,
//! `change_membership`, `transfer_leadership`, `on_persisted`, `applied`, ...);
//! outputs accumulate until the shell calls [`RaftCore::take_ready`] (see
//! `ready.rs` for what the shell must do with them, and in which order).
//!
//! Sending is deferred to `take_ready`: every proposal or read registered in
//! one batch of inputs shares one append per follower and one heartbeat round,
//! which is where most of the throughput comes from.
//!
//! Safety rules implemented here, with where they live:
//! - one vote per term, persisted before the vote is sent (`handle_vote`);
//! - a vote only for a log at least as up to date (`RaftLog::is_up_to_date`);
//! - commit only an entry of the current term, by a quorum of every voter
//!   set in force, counting the leader only up to what it made durable
//!   (`maybe_commit`);
//! - a leader's messages leave before its fsync only once its term is durable
//!   (`send`);
//! - a follower that heard from a leader within the minimum election timeout
//!   grants no vote and takes no term from a candidate (leader stickiness; also
//!   what makes the optional lease safe), unless the leader itself ordered the
//!   election (transfer);
//! - one membership change at a time, through joint consensus.
//!
//! This file holds the state, the constructor, the accessors and the dispatch
//! of inputs (`tick`, `step`, `take_ready`); the protocol itself is split by
//! concern into `replication`, `election`, `transfer`, `read`, `membership`
//! and `quiesce`, each adding methods to [`RaftCore`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::config::{Config, StartError};
use super::log::RaftLog;
use super::membership::{Membership, PeerInfo};
use super::message::*;
use super::ready::Ready;
use super::types::*;

mod election;
mod fetch;
mod level;
mod membership;
mod quiesce;
mod read;
mod replication;
mod transfer;

/// How a membership change request combines with the current membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfChangeMode {
    /// Replace voters and listeners with the given ones.
    SetUnconditionally,
    /// Add the given voters and listeners (a listener named as voter is
    /// promoted).
    Add,
    /// Replace only if the current voters and listeners are these.
    CompareAndSet {
        voters: Vec<PeerInfo>,
        listeners: Vec<PeerInfo>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfChangeRequest {
    pub mode: ConfChangeMode,
    pub voters: Vec<PeerInfo>,
    pub listeners: Vec<PeerInfo>,
}

/// A snapshot of the member's state for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub last_index: Index,
    pub commit_index: Index,
    pub applied_index: Index,
    pub snapshot_index: Index,
    pub durable_index: Index,
    pub elections_paused: bool,
    /// In the configuration in force (as a voter or listener).
    pub member: bool,
    /// Was a member here and the configuration in force left it out: it
    /// takes no part any more and may be shut down.
    pub removed: bool,
    /// The group's cluster level as far as this member applied its log.
    pub cluster_level: u32,
    pub quiet: bool,
    pub transferring: bool,
    pub changing_membership: bool,
}

/// Replication state of one follower, as the leader tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Unknown match: one append at a time until one succeeds.
    Probe,
    /// Known match: appends pipelined up to the in-flight bounds.
    Replicate,
    /// The next entry is compacted: waiting for a snapshot, since `since`.
    Snapshot { since: u64 },
}

#[derive(Clone, Debug)]
struct Inflight {
    last: Index,
    bytes: usize,
    sent_tick: u64,
}

#[derive(Clone, Debug)]
struct Progress {
    match_index: Index,
    next_index: Index,
    state: ProgressState,
    probe_sent: bool,
    inflight: VecDeque<Inflight>,
    inflight_bytes: usize,
    /// Heard from since the last check-quorum.
    active: bool,
    /// Latest heartbeat round acknowledged, and the leader tick it was sent.
    acked_round: u64,
    acked_tick: u64,
    /// The follower's commit index as last reported.
    commit: Index,
    /// The follower answered the current quiesce round: it is quiet.
    quiet: bool,
    /// The cluster level the follower's version knows, as last reported
    /// (0 until it answers, or from a version before levels).
    feature_level: u32,
    /// Entries for this follower are being read from storage (see
    /// `fetch.rs`) since this tick; nothing else is sent meanwhile.
    fetching: Option<u64>,
}

#[derive(Clone, Debug)]
enum ConfPhase {
    /// New voters receive the log until caught up.
    Staging {
        staged: BTreeSet<NodeId>,
        last_progress_tick: u64,
        matches: BTreeMap<NodeId, Index>,
    },
    /// The joint membership is appended at `index`.
    Joint { index: Index },
    /// The final membership is appended at `index`.
    Final { index: Index },
}

#[derive(Clone, Debug)]
struct ConfChange {
    target: Membership,
    phase: ConfPhase,
    /// Whether a caller waits for `ConfChangeDone` (false when a new leader
    /// finishes a change it inherited).
    notify: bool,
    /// The cluster level a staged member's version must know (see
    /// `level.rs`), fixed when the change starts.
    required_level: u32,
}

#[derive(Clone, Debug)]
struct Transfer {
    target: NodeId,
    deadline: u64,
    notify: bool,
    /// Asked for by step-down (no target named): any other leader is success.
    any: bool,
}

/// A transfer whose leader stepped down: its outcome is known only once the
/// next leader is, or when the transfer's deadline passes.
#[derive(Clone, Copy, Debug)]
struct TransferOutcome {
    target: NodeId,
    any: bool,
    notify: bool,
    /// Term in which this member stopped leading (reported on success).
    term: Term,
    deadline: u64,
}

/// Back-off of automatic hand-overs to a higher-priority voter. Kept across
/// terms: a voter that cannot win fails every hand-over, whoever leads.
#[derive(Clone, Copy, Debug, Default)]
struct HandOverBackoff {
    /// Hand-overs that failed in a row.
    failures: u32,
    /// No automatic hand-over before this tick.
    not_before: u64,
}

#[derive(Clone, Debug)]
struct PendingRead {
    ctx: u64,
    /// Follower that forwarded the read; `None` for a local read.
    origin: Option<NodeId>,
    index: Index,
    /// Confirmed once a quorum acknowledged this heartbeat round.
    round: u64,
}

#[derive(Debug)]
struct LeaderState {
    progress: BTreeMap<NodeId, Progress>,
    /// Current heartbeat round; appends carry it and replies echo it.
    round: u64,
    /// Leader tick at which each recent round started (for the lease).
    round_ticks: VecDeque<(u64, u64)>,
    /// Reads with a known index, waiting for their round.
    reads: VecDeque<PendingRead>,
    /// Reads that arrived before an entry of this term was committed.
    reads_before_commit: Vec<(u64, Option<NodeId>)>,
    conf_change: Option<ConfChange>,
    transfer: Option<Transfer>,
    /// Appends are owed to followers (new entries or commit index).
    broadcast_pending: bool,
    /// The round of the quiesce heartbeat that nothing has followed yet:
    /// replies to it with `quiet` count towards the group going quiet.
    quiesce_round: Option<u64>,
    /// A StartElection left in this term: its target may win a later term
    /// with votes that ignore our leadership, so no lease for the rest of
    /// this term, even if the transfer times out.
    start_election_sent: bool,
    /// Members leaving the group: replicated to until they hold the final
    /// configuration that removes them (so they learn they are out), or
    /// until the tick given here.
    departing: BTreeMap<NodeId, (Index, u64)>,
    /// A `ClusterLevel` entry was appended in this term.
    level_proposed: bool,
}

/// A taken Ready whose writes are not yet durable.
#[derive(Clone, Copy, Debug)]
struct Unpersisted {
    number: u64,
    /// Last entry the Ready wrote, if any.
    last: Option<(Index, Term)>,
    /// The term the Ready's hard state carries (or the one already durable).
    term: Term,
}

/// One member of one Raft group. See the module docs.
#[derive(Debug)]
pub struct RaftCore {
    cfg: Config,
    id: NodeId,
    term: Term,
    voted_for: Option<NodeId>,
    hard_state_dirty: bool,
    /// Highest term known durable; a leader's messages wait for their term.
    durable_term: Term,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,
    rng: SmallRng,
    now: u64,
    election_elapsed: u64,
    randomized_timeout: u64,
    /// Ticks since a leader was last heard from; 0 at start-up so that a
    /// member that restarts honours a lease it may have acknowledged before.
    leader_contact_elapsed: u64,
    heartbeat_elapsed: u64,
    elections_paused: bool,
    /// Was in a configuration in force since it started (see `Status::removed`).
    was_member: bool,
    /// Idle and quiet (see `Config::quiesce`): a quiet follower runs no
    /// election timer, a quiet leader sends only the rare quiet heartbeat
    /// and does not check its quorum.
    quiet: bool,
    /// Ticks since the last quiet heartbeat was sent (leader) or received
    /// (follower).
    quiet_elapsed: u64,
    /// The leader's last activity (an entry, a read, a change, a wake-up).
    active_at: u64,
    votes: BTreeMap<NodeId, bool>,
    leader_state: Option<LeaderState>,
    /// The outcome of a transfer this member stepped down for, owed to the
    /// shell once the next leader is known.
    transfer_outcome: Option<TransferOutcome>,
    hand_over: HandOverBackoff,
    /// The group's cluster level as far as this member applied its log
    /// (see `level.rs`).
    cluster_level: u32,
    /// Last index handed to the shell to apply.
    apply_cursor: Index,
    applied: Index,
    /// Reads forwarded to the leader, failed if leadership changes.
    remote_reads: BTreeSet<u64>,
    ready_number: u64,
    /// Taken Readies not yet durable: number, last entry written, term.
    unpersisted: VecDeque<Unpersisted>,
    out: Ready,
}

impl RaftCore {
    /// Starts a member from its durable state: hard state, latest snapshot
    /// (for a new group: index 0 carrying the initial membership; for a member
    /// that will be added later: index 0 with an empty membership) and the log
    /// entries after the snapshot.
    pub fn new(
        cfg: Config,
        hard_state: HardState,
        snapshot: SnapshotMeta,
        entries: Vec<Entry>,
    ) -> Result<Self, StartError> {
        cfg.validate()?;
        let mut rng = SmallRng::seed_from_u64(cfg.rng_seed);
        let randomized_timeout =
            rng.random_range(cfg.election_timeout_min_ticks..cfg.election_timeout_max_ticks);
        let applied = snapshot.index;
        // A snapshot or an entry of term T proves T began, even when a crash
        // came between storing them and storing the hard state that raised
        // the term: starting below T would let a stale leader's append pass.
        // No vote was ever sent in a term that was not durable, so a raised
        // term starts with none.
        let seen = snapshot.term.max(entries.last().map_or(0, |e| e.term));
        let (term, voted_for) = if seen > hard_state.term {
            (seen, None)
        } else {
            (hard_state.term, hard_state.voted_for)
        };
        Ok(RaftCore {
            id: cfg.id,
            term,
            voted_for,
            hard_state_dirty: term != hard_state.term,
            durable_term: hard_state.term,
            role: Role::Follower,
            leader: None,
            log: RaftLog::restore(snapshot, entries)?,
            rng,
            now: 0,
            election_elapsed: 0,
            randomized_timeout,
            leader_contact_elapsed: 0,
            heartbeat_elapsed: 0,
            elections_paused: false,
            quiet: false,
            quiet_elapsed: 0,
            active_at: 0,
            votes: BTreeMap::new(),
            leader_state: None,
            was_member: false,
            transfer_outcome: None,
            hand_over: HandOverBackoff::default(),
            cluster_level: 1,
            apply_cursor: applied,
            applied,
            remote_reads: BTreeSet::new(),
            ready_number: 0,
            unpersisted: VecDeque::new(),
            out: Ready::default(),
            cfg,
        })
    }

    // ----------------------------------------------------------------------
    // Accessors
    // ----------------------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn term(&self) -> Term {
        self.term
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    pub fn log(&self) -> &RaftLog {
        &self.log
    }

    pub fn membership(&self) -> &Membership {
        self.log.membership()
    }

    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            voted_for: self.voted_for,
        }
    }

    pub fn status(&self) -> Status {
        let ls = self.leader_state.as_ref();
        Status {
            id: self.id,
            role: self.role,
            term: self.term,
            leader: self.leader,
            last_index: self.log.last_index(),
            commit_index: self.log.committed(),
            applied_index: self.applied,
            snapshot_index: self.log.snapshot_index(),
            durable_index: self.log.durable(),
            elections_paused: self.elections_paused,
            member: self.membership().contains(self.id),
            removed: self.was_member && !self.membership().contains(self.id),
            cluster_level: self.cluster_level,
            quiet: self.quiet,
            transferring: ls.is_some_and(|l| l.transfer.is_some()),
            changing_membership: ls.is_some_and(|l| l.conf_change.is_some()),
        }
    }

    /// Each member's match and commit index as the leader knows them (empty
    /// on followers). The leader reports itself at its durable index.
    pub fn progress(&self) -> Vec<(NodeId, Index, Index)> {
        let Some(ls) = &self.leader_state else {
            return Vec::new();
        };
        let mut out = vec![(self.id, self.log.durable(), self.log.committed())];
        out.extend(
            ls.progress
                .iter()
                .map(|(id, p)| (*id, p.match_index, p.commit)),
        );
        out
    }

    /// Metadata for a snapshot of the state machine at `index` (which must be
    /// applied and not yet compacted).
    pub fn snapshot_meta(&self, index: Index) -> Option<SnapshotMeta> {
        if index > self.applied {
            return None;
        }
        Some(SnapshotMeta {
            index,
            term: self.log.term(index)?,
            membership: self.log.membership_at(index).clone(),
        })
    }

    /// Invariants across the member's state; `Err` names the broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.log.check_invariants()?;
        let (s, a, c, l) = (
            self.log.snapshot_index(),
            self.applied,
            self.log.committed(),
            self.log.last_index(),
        );
        if !(s <= c && a <= self.apply_cursor && self.apply_cursor <= c && c <= l) {
            return Err(format!(
                "index order broken: snapshot {s} applied {a} cursor {} commit {c} last {l}",
                self.apply_cursor
            ));
        }
        if self.role == Role::Leader && self.leader != Some(self.id) {
            return Err("leader does not name itself leader".into());
        }
        if self.role == Role::Leader && self.voted_for != Some(self.id) {
            return Err("leader did not vote for itself in its term".into());
        }
        Ok(())
    }

    // ----------------------------------------------------------------------
    // Inputs from the shell
    // ----------------------------------------------------------------------

    /// Advances time by one tick.
    pub fn tick(&mut self) {
        self.tick_by(1);
    }

    /// Advances time by `n` ticks, as `n` calls of [`Self::tick`] would. A
    /// quiet member takes any number at once, so a shell may tick its quiet
    /// groups rarely and catch up in one call.
    pub fn tick_by(&mut self, n: u64) {
        for done in 0..n {
            if self.quiet {
                self.tick_quiet(n - done);
                return;
            }
            self.tick_once();
        }
    }

    fn tick_once(&mut self) {
        self.now += 1;
        self.leader_contact_elapsed = self.leader_contact_elapsed.saturating_add(1);
        if self.role == Role::Leader {
            self.tick_leader();
            return;
        }
        self.settle_transfer_outcome(None);
        self.election_elapsed += 1;
        if self.election_elapsed >= self.randomized_timeout {
            self.reset_election_timer();
            if self.can_campaign() {
                self.campaign(self.cfg.pre_vote, false);
            } else if self.role != Role::Follower {
                // A candidate that may no longer campaign (paused, removed)
                // goes back to waiting for a leader.
                self.become_follower(self.term, None);
            }
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_timeout_min_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_active() {
                self.become_follower(self.term, None);
                return;
            }
            for pr in self.ls().progress.values_mut() {
                pr.active = false;
            }
        }
        let now = self.now;
        if let Some(t) = &self.ls().transfer
            && now >= t.deadline
        {
            let t = self.ls().transfer.take().expect("checked");
            self.transfer_timed_out(t);
        }
        self.check_staging_timeout();
        self.expire_fetches();
        // Departing members that cannot be reached are not waited for.
        let ls = self.ls();
        let expired: Vec<NodeId> = ls
            .departing
            .iter()
            .filter(|(_, (_, until))| now >= *until)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            ls.departing.remove(&id);
            ls.progress.remove(&id);
        }
        let (retransmit, snapshot_timeout) =
            (self.cfg.retransmit_ticks, self.cfg.snapshot_timeout_ticks);
        for pr in self.ls().progress.values_mut() {
            match pr.state {
                ProgressState::Replicate
                    if pr
                        .inflight
                        .front()
                        .is_some_and(|f| now - f.sent_tick >= retransmit) =>
                {
                    pr.become_probe();
                }
                ProgressState::Snapshot { since } if now - since >= snapshot_timeout => {
                    pr.become_probe();
                }
                _ => {}
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_interval_ticks {
            self.heartbeat_elapsed = 0;
            let quiesce = self.can_quiesce();
            self.broadcast_heartbeat(quiesce);
            self.resend_start_election();
            self.maybe_hand_over_to_priority();
            self.maybe_raise_cluster_level();
            // A group without followers has nobody to wait for.
            self.maybe_go_quiet();
        }
    }

    /// The shell made the Ready numbered `number` (and all before it) durable.
    pub fn on_persisted(&mut self, number: u64) {
        let mut advanced = false;
        while let Some(u) = self
            .unpersisted
            .front()
            .copied()
            .filter(|u| u.number <= number)
        {
            self.unpersisted.pop_front();
            self.durable_term = self.durable_term.max(u.term);
            if let Some((index, entry_term)) = u.last {
                advanced |= self.log.persisted(index, entry_term);
            }
        }
        if advanced && self.role == Role::Leader {
            self.maybe_commit();
        }
    }

    /// The state machine applied everything up to `index`.
    pub fn applied(&mut self, index: Index) {
        assert!(
            index <= self.apply_cursor,
            "applied {index} beyond what was handed out"
        );
        self.applied = self.applied.max(index);
    }

    /// The shell saved a snapshot at `index` (≤ applied) and it is durable;
    /// entries up to it may go. Storage purges its own log files, but only
    /// after every write of the Readies taken before the snapshot: a purge
    /// that overtakes a pending truncation leaves a stale suffix behind the
    /// snapshot for the next start to trip over.
    pub fn compact(&mut self, index: Index) {
        assert!(
            index <= self.applied,
            "compacting {index} beyond applied {}",
            self.applied
        );
        self.log.compact(index);
    }

    /// Processes a message from another member.
    pub fn step(&mut self, from: NodeId, msg: Message) {
        if from == self.id {
            return;
        }
        if self.quiet && !self.keeps_quiet(from, &msg) {
            self.wake();
        }
        let term = msg.term();
        if term > self.term {
            match &msg {
                // Vote requests decide themselves whether to take the term
                // (stickiness), and a granted pre-vote carries a term nobody
                // has entered.
                Message::RequestVote(_) => {}
                Message::RequestVoteReply(r) if r.pre_vote && r.granted() => {}
                // A forwarded read carries the follower's term; it says
                // nothing about leadership.
                Message::ReadIndex(_) => {}
                Message::AppendEntries(_)
                | Message::InstallSnapshot(_)
                | Message::StartElection(_) => self.become_follower(term, Some(from)),
                _ => self.become_follower(term, None),
            }
        } else if term < self.term {
            match msg {
                // Tell a stale leader about the newer term.
                Message::AppendEntries(m) => {
                    let reply = self.append_reply(AppendResult::NotLeader, 0, 0, 0, 0, m.round);
                    self.send(from, Message::AppendEntriesReply(reply), true);
                    return;
                }
                Message::InstallSnapshot(_) => {
                    let reply = InstallSnapshotReply {
                        term: self.term,
                        snapshot_index: 0,
                        accepted: false,
                    };
                    self.send(from, Message::InstallSnapshotReply(reply), true);
                    return;
                }
                Message::RequestVote(m) => {
                    let reply = RequestVoteReply {
                        term: self.term,
                        pre_vote: m.pre_vote,
                        refusal: Some(VoteRefusal::StaleTerm),
                    };
                    self.send(from, Message::RequestVoteReply(reply), true);
                    return;
                }
                Message::ReadIndex(_) => {}
                Message::ReadIndexReply(m) => return self.handle_stale_read_index_reply(m),
                _ => return,
            }
        }
        match msg {
            Message::AppendEntries(m) => self.handle_append(from, m),
            Message::AppendEntriesReply(m) => self.handle_append_reply(from, m),
            Message::RequestVote(m) => self.handle_vote(from, m),
            Message::RequestVoteReply(m) => self.handle_vote_reply(from, m),
            Message::StartElection(m) => self.handle_start_election(from, m),
            Message::InstallSnapshot(m) => self.handle_install_snapshot(from, m),
            Message::InstallSnapshotReply(m) => self.handle_install_snapshot_reply(from, m),
            Message::ReadIndex(m) => self.handle_read_index(from, m),
            Message::ReadIndexReply(m) => self.handle_read_index_reply(m),
        }
    }

    /// Collects everything the shell must do now. See `ready.rs`.
    pub fn take_ready(&mut self) -> Ready {
        self.was_member |= self.membership().contains(self.id);
        self.flush_leader();
        let mut ready = std::mem::take(&mut self.out);
        if self.hard_state_dirty {
            self.hard_state_dirty = false;
            ready.hard_state = Some(self.hard_state());
        }
        ready.entries = self.log.take_unstable();
        let commit = self.log.committed();
        if commit > self.apply_cursor {
            ready.committed_entries = self
                .log
                .slice(self.apply_cursor + 1, commit, usize::MAX)
                .expect("entries after the apply cursor are never compacted");
            self.apply_cursor = commit;
            let committed = std::mem::take(&mut ready.committed_entries);
            self.note_applied_levels(&committed);
            ready.committed_entries = committed;
        }
        self.ready_number += 1;
        ready.number = self.ready_number;
        if ready.hard_state.is_some() || ready.snapshot.is_some() || !ready.entries.is_empty() {
            let last = ready.entries.last().map(|e| (e.index, e.term));
            self.unpersisted.push_back(Unpersisted {
                number: ready.number,
                last,
                term: self.term,
            });
        }
        ready
    }

    fn ls(&mut self) -> &mut LeaderState {
        self.leader_state
            .as_mut()
            .expect("leader state on a leader")
    }

    /// The message goes out now if nothing it depends on is still volatile,
    /// else after this Ready is persisted.
    fn send(&mut self, to: NodeId, msg: Message, after_persist: bool) {
        let env = Envelope {
            from: self.id,
            to,
            msg,
        };
        // A leader's own messages need its term durable first: a leader that
        // crashed before persisting its term could otherwise lead that term
        // twice.
        let volatile_term = self.hard_state_dirty || self.durable_term < self.term;
        if after_persist || volatile_term {
            self.out.persisted_messages.push(env);
        } else {
            self.out.messages.push(env);
        }
    }

    fn committed_in_term(&self) -> bool {
        self.log.term(self.log.committed()) == Some(self.term)
    }
}

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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::config::{Config, StartError};
use super::error::{ConfChangeError, ProposeError, ReadError, TransferError, Transferred};
use super::log::RaftLog;
use super::membership::{Membership, PeerInfo};
use super::message::*;
use super::ready::{Event, Ready};
use super::types::*;

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
}

impl Progress {
    fn new(next_index: Index) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            active: false,
            acked_round: 0,
            acked_tick: 0,
            commit: 0,
            quiet: false,
        }
    }

    fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.next_index = self.match_index + 1;
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    fn free_up_to(&mut self, index: Index) {
        while self.inflight.front().is_some_and(|f| f.last <= index) {
            let f = self.inflight.pop_front().expect("checked");
            self.inflight_bytes -= f.bytes;
        }
    }
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
}

#[derive(Clone, Debug)]
struct Transfer {
    target: NodeId,
    deadline: u64,
    notify: bool,
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
        Ok(RaftCore {
            id: cfg.id,
            term: hard_state.term,
            voted_for: hard_state.voted_for,
            hard_state_dirty: false,
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

    /// Whether the group is quiet here (see `Config::quiesce`).
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// Leaves the quiet state: timers and check-quorum run again, and a
    /// leader heartbeats at the next tick, which wakes its followers. The
    /// shell calls this when a peer of the group stopped answering or came
    /// back; a member that is not quiet is not changed.
    pub fn wake(&mut self) {
        if !self.quiet {
            return;
        }
        self.quiet = false;
        self.quiet_elapsed = 0;
        self.active_at = self.now;
        if self.role == Role::Leader {
            // A fresh check-quorum window that counts only new replies.
            self.election_elapsed = 0;
            self.heartbeat_elapsed = self.cfg.heartbeat_interval_ticks;
            let ls = self.ls();
            ls.quiesce_round = None;
            for pr in ls.progress.values_mut() {
                pr.quiet = false;
                pr.active = false;
            }
        } else {
            // Counted from now: the leader was heard from when this member
            // went quiet, and its stickiness held ever since.
            self.reset_election_timer();
        }
    }

    fn tick_quiet(&mut self, n: u64) {
        self.now += n;
        self.quiet_elapsed = self.quiet_elapsed.saturating_add(n);
        if self.role == Role::Leader {
            if self.quiet_elapsed >= self.cfg.quiet_heartbeat_ticks {
                self.quiet_elapsed = 0;
                self.broadcast_heartbeat(true);
            }
        } else if self.quiet_elapsed >= self.cfg.quiet_timeout_ticks {
            self.wake();
        }
    }

    fn tick_once(&mut self) {
        self.now += 1;
        self.leader_contact_elapsed = self.leader_contact_elapsed.saturating_add(1);
        if self.role == Role::Leader {
            self.tick_leader();
            return;
        }
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

    /// Pauses or resumes elections on this member. A paused member still
    /// votes and follows, but never starts an election on its own.
    pub fn set_elections_paused(&mut self, paused: bool) {
        self.elections_paused = paused;
        if paused && matches!(self.role, Role::PreCandidate | Role::Candidate) {
            self.become_follower(self.term, None);
        }
    }

    /// Stops leading at once (the shell saw a long runtime stall, so its
    /// lease and its view of the followers may be stale). Always safe: the
    /// member keeps its term and log and may be elected again.
    pub fn step_down(&mut self) {
        if self.role == Role::Leader {
            self.become_follower(self.term, None);
        }
    }

    /// Appends a command; returns the (term, index) it was appended at.
    pub fn propose(&mut self, data: Bytes) -> Result<(Term, Index), ProposeError> {
        self.check_can_write()?;
        Ok(self.append_entry(EntryPayload::Command(data)))
    }

    fn check_can_write(&self) -> Result<(), ProposeError> {
        match &self.leader_state {
            None => Err(ProposeError::NotLeader {
                leader: self.leader,
            }),
            Some(ls) if ls.transfer.is_some() => Err(ProposeError::SteppingDown),
            Some(_) => Ok(()),
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

    /// Sending a snapshot to `to` failed; probe it again.
    pub fn report_snapshot_failure(&mut self, to: NodeId) {
        if let Some(pr) = self
            .leader_state
            .as_mut()
            .and_then(|l| l.progress.get_mut(&to))
            && matches!(pr.state, ProgressState::Snapshot { .. })
        {
            pr.become_probe();
        }
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

    /// Whether `msg` is the quiet traffic of a quiet group: the leader's quiet
    /// heartbeat, or a follower's reply that it is quiet. Anything else wakes
    /// a quiet member.
    fn keeps_quiet(&self, from: NodeId, msg: &Message) -> bool {
        match msg {
            Message::AppendEntries(m) => {
                m.quiesce && m.term == self.term && self.leader == Some(from)
            }
            Message::AppendEntriesReply(r) => {
                r.quiet && r.term == self.term && r.result == AppendResult::Success
            }
            _ => false,
        }
    }

    /// Collects everything the shell must do now. See `ready.rs`.
    pub fn take_ready(&mut self) -> Ready {
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

    // ----------------------------------------------------------------------
    // Elections
    // ----------------------------------------------------------------------

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        self.randomized_timeout = self
            .rng
            .random_range(self.cfg.election_timeout_min_ticks..self.cfg.election_timeout_max_ticks);
    }

    fn can_campaign(&self) -> bool {
        self.membership().is_voter(self.id) && !self.elections_paused
    }

    fn campaign(&mut self, pre_vote: bool, transfer: bool) {
        self.votes.clear();
        self.votes.insert(self.id, true);
        let term = if pre_vote {
            self.role = Role::PreCandidate;
            self.term + 1
        } else {
            self.term += 1;
            self.voted_for = Some(self.id);
            self.hard_state_dirty = true;
            self.role = Role::Candidate;
            self.term
        };
        if self.leader.take().is_some() {
            self.out.events.push(Event::LeaderChanged {
                term: self.term,
                leader: None,
            });
        }
        self.fail_remote_reads();
        self.reset_election_timer();
        let request = RequestVote {
            term,
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
            pre_vote,
            transfer,
            priority: self.membership().priority(self.id),
        };
        let voters: Vec<NodeId> = self.voter_ids().filter(|id| *id != self.id).collect();
        for to in voters {
            // A real vote request follows a term change that must be durable
            // first; a pre-vote changes nothing.
            self.send(to, Message::RequestVote(request.clone()), !pre_vote);
        }
        self.check_election_result();
    }

    fn voter_ids(&self) -> impl Iterator<Item = NodeId> + use<> {
        let m = self.membership();
        let mut ids: Vec<NodeId> = m.voters.keys().copied().collect();
        if let Some(old) = &m.old_voters {
            ids.extend(old.keys().copied());
        }
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
    }

    fn check_election_result(&mut self) {
        let m = self.membership();
        let won = m.has_quorum(|id| self.votes.get(&id) == Some(&true));
        let lost = !m.quorum_possible(|id| self.votes.get(&id) == Some(&false));
        if won {
            if self.role == Role::PreCandidate {
                self.campaign(false, false);
            } else {
                self.become_leader();
            }
        } else if lost {
            self.become_follower(self.term, None);
        }
    }

    /// Whether this member has recently heard from a live leader (or is one),
    /// in which case it refuses to help elect anybody else.
    fn leader_is_alive(&self) -> bool {
        self.role == Role::Leader
            || self.leader_contact_elapsed < self.cfg.election_timeout_min_ticks
    }

    fn handle_vote(&mut self, from: NodeId, m: RequestVote) {
        let refuse = |core: &mut Self, refusal: VoteRefusal| {
            let reply = RequestVoteReply {
                term: core.term,
                pre_vote: m.pre_vote,
                refusal: Some(refusal),
            };
            core.send(from, Message::RequestVoteReply(reply), true);
        };
        if !m.transfer && self.leader_is_alive() && m.term > self.term {
            return refuse(self, VoteRefusal::LeaderAlive);
        }
        if !m.pre_vote && m.term > self.term {
            self.become_follower(m.term, None);
        }
        let can_vote = self.voted_for == Some(from)
            || (self.voted_for.is_none() && self.leader.is_none())
            || (m.pre_vote && m.term > self.term);
        if !can_vote {
            return refuse(self, VoteRefusal::AlreadyVoted);
        }
        if !self.log.is_up_to_date(m.last_index, m.last_term) {
            return refuse(self, VoteRefusal::LogBehind);
        }
        // A voter with an equal log and a higher priority would rather lead
        // itself, provided it is able to campaign.
        let equal_log =
            m.last_index == self.log.last_index() && m.last_term == self.log.last_term();
        if !m.transfer
            && equal_log
            && self.can_campaign()
            && self.membership().priority(self.id) > m.priority
        {
            return refuse(self, VoteRefusal::LowerPriority);
        }
        if m.pre_vote {
            let reply = RequestVoteReply {
                term: m.term,
                pre_vote: true,
                refusal: None,
            };
            self.send(from, Message::RequestVoteReply(reply), true);
        } else {
            self.voted_for = Some(from);
            self.hard_state_dirty = true;
            self.reset_election_timer();
            let reply = RequestVoteReply {
                term: self.term,
                pre_vote: false,
                refusal: None,
            };
            self.send(from, Message::RequestVoteReply(reply), true);
        }
    }

    fn handle_vote_reply(&mut self, from: NodeId, m: RequestVoteReply) {
        let expected = match self.role {
            Role::PreCandidate => m.pre_vote,
            Role::Candidate => !m.pre_vote && m.term == self.term,
            _ => false,
        };
        if !expected {
            return;
        }
        self.votes.entry(from).or_insert(m.granted());
        self.check_election_result();
    }

    fn handle_start_election(&mut self, from: NodeId, m: StartElection) {
        let holds_leader_log =
            self.log.last_index() == m.last_index && self.log.last_term() == m.last_term;
        if m.term == self.term
            && self.leader == Some(from)
            && holds_leader_log
            && self.membership().is_voter(self.id)
        {
            self.campaign(false, true);
        }
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        let was_leader = self.role == Role::Leader;
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            self.hard_state_dirty = true;
        }
        self.role = Role::Follower;
        self.votes.clear();
        self.quiet = false;
        if was_leader {
            self.step_down_leader();
        }
        if self.leader != leader {
            self.leader = leader;
            self.fail_remote_reads();
            self.out.events.push(Event::LeaderChanged {
                term: self.term,
                leader,
            });
        }
        if leader.is_some() {
            self.leader_contact_elapsed = 0;
        }
        self.reset_election_timer();
    }

    fn fail_remote_reads(&mut self) {
        for ctx in std::mem::take(&mut self.remote_reads) {
            self.out.events.push(Event::ReadFailed {
                ctx,
                error: ReadError::LeaderChanged,
            });
        }
    }

    /// Fails everything a leader was waiting for when it stops leading.
    fn step_down_leader(&mut self) {
        let Some(ls) = self.leader_state.take() else {
            return;
        };
        let reads = ls.reads.iter().map(|r| (r.ctx, r.origin));
        for (ctx, origin) in reads.chain(ls.reads_before_commit.iter().copied()) {
            self.answer_read(ctx, origin, Err(ReadError::LeaderChanged));
        }
        if let Some(cc) = ls.conf_change
            && cc.notify
        {
            self.out
                .events
                .push(Event::ConfChangeDone(Err(ConfChangeError::LeaderChanged)));
        }
        if let Some(t) = ls.transfer
            && t.notify
        {
            let done = Transferred {
                term: self.term,
                target: t.target,
            };
            self.out.events.push(Event::TransferDone(Ok(done)));
        }
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.quiet = false;
        self.leader = Some(self.id);
        self.votes.clear();
        self.out.events.push(Event::LeaderChanged {
            term: self.term,
            leader: Some(self.id),
        });
        let next = self.log.last_index() + 1;
        let progress = self
            .membership()
            .members()
            .filter(|id| *id != self.id)
            .map(|id| (id, Progress::new(next)))
            .collect();
        // A change an earlier leader left half done is finished by this one;
        // until then, no new change may start.
        let membership = self.membership().clone();
        let index = self.log.membership_index();
        let conf_change = (membership.is_joint() || index > self.log.committed()).then(|| {
            let phase = if membership.is_joint() {
                ConfPhase::Joint { index }
            } else {
                ConfPhase::Final { index }
            };
            ConfChange {
                target: leave_joint(&membership),
                phase,
                notify: false,
            }
        });
        self.leader_state = Some(LeaderState {
            progress,
            round: 0,
            round_ticks: VecDeque::new(),
            reads: VecDeque::new(),
            reads_before_commit: Vec::new(),
            conf_change,
            transfer: None,
            broadcast_pending: true,
            quiesce_round: None,
        });
        self.heartbeat_elapsed = 0;
        self.election_elapsed = 0;
        self.append_entry(EntryPayload::Noop);
        // A joint membership already committed before this leader: leave it.
        self.advance_conf_change();
        self.maybe_commit();
    }

    // ----------------------------------------------------------------------
    // Leader: ticks, proposals, replication
    // ----------------------------------------------------------------------

    fn ls(&mut self) -> &mut LeaderState {
        self.leader_state
            .as_mut()
            .expect("leader state on a leader")
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
            if t.notify {
                let err = TransferError::Timeout { target: t.target };
                self.out.events.push(Event::TransferDone(Err(err)));
            }
        }
        self.check_staging_timeout();
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
            // A group without followers has nobody to wait for.
            self.maybe_go_quiet();
        }
    }

    /// Whether this leader may ask its group to go quiet: idle for an
    /// election timeout, everything durable and committed in its own term,
    /// every member holding the whole log, and nothing in progress.
    fn can_quiesce(&self) -> bool {
        let Some(ls) = &self.leader_state else {
            return false;
        };
        let last = self.log.last_index();
        self.cfg.quiesce
            && self.now.saturating_sub(self.active_at) >= self.cfg.election_timeout_min_ticks
            && self.log.committed() == last
            && self.log.durable() >= last
            && self.committed_in_term()
            && self.unpersisted.is_empty()
            && ls.conf_change.is_none()
            && ls.transfer.is_none()
            && ls.reads.is_empty()
            && ls.reads_before_commit.is_empty()
            && ls.progress.values().all(|p| {
                p.state == ProgressState::Replicate
                    && p.match_index == last
                    && p.inflight.is_empty()
            })
    }

    /// Goes quiet once every follower answered the current quiesce round
    /// with `quiet` and nothing happened meanwhile.
    fn maybe_go_quiet(&mut self) {
        if self.quiet || self.role != Role::Leader {
            return;
        }
        let all_quiet = self
            .leader_state
            .as_ref()
            .is_some_and(|ls| ls.quiesce_round.is_some() && ls.progress.values().all(|p| p.quiet));
        if all_quiet && self.can_quiesce() {
            self.quiet = true;
            self.quiet_elapsed = 0;
        }
    }

    fn quorum_active(&self) -> bool {
        let ls = self.leader_state.as_ref().expect("leader");
        self.membership()
            .has_quorum(|id| id == self.id || ls.progress.get(&id).is_some_and(|p| p.active))
    }

    fn append_entry(&mut self, payload: EntryPayload) -> (Term, Index) {
        self.wake();
        self.active_at = self.now;
        let index = self.log.last_index() + 1;
        let entry = Entry {
            term: self.term,
            index,
            payload,
        };
        let is_membership = matches!(entry.payload, EntryPayload::Membership(_));
        self.log.append_new(entry);
        if is_membership {
            self.sync_progress_with_membership();
        }
        self.ls().broadcast_pending = true;
        (self.term, index)
    }

    /// Progress exists exactly for the members in force plus staged ones.
    fn sync_progress_with_membership(&mut self) {
        let members: BTreeSet<NodeId> = self.membership().members().collect();
        let next = self.log.last_index() + 1;
        let id = self.id;
        let ls = self.ls();
        let staged: BTreeSet<NodeId> = match &ls.conf_change {
            Some(ConfChange {
                phase: ConfPhase::Staging { staged, .. },
                ..
            }) => staged.clone(),
            _ => BTreeSet::new(),
        };
        ls.progress
            .retain(|p, _| members.contains(p) || staged.contains(p));
        for m in members {
            if m != id {
                ls.progress.entry(m).or_insert_with(|| Progress::new(next));
            }
        }
    }

    /// Sends what is owed: new entries to every follower with room, the
    /// heartbeat round reads are waiting for, and answers to confirmed reads.
    fn flush_leader(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        if std::mem::take(&mut self.ls().broadcast_pending) {
            let peers: Vec<NodeId> = self.ls().progress.keys().copied().collect();
            for to in peers {
                self.send_append(to);
            }
        }
        let round = self.ls().round;
        if self.ls().reads.back().is_some_and(|r| r.round > round) {
            self.broadcast_heartbeat(false);
        }
        self.confirm_reads();
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

    fn send_append(&mut self, to: NodeId) {
        let now = self.now;
        let max_bytes = self.cfg.max_append_bytes;
        let (max_count, max_inflight_bytes) =
            (self.cfg.max_inflight_appends, self.cfg.max_inflight_bytes);
        let last = self.log.last_index();
        let commit = self.log.committed();
        let term = self.term;
        // May be called right after this member stepped down (a removed
        // leader committing its own removal): then there is nothing to send.
        let Some(round) = self.leader_state.as_ref().map(|l| l.round) else {
            return;
        };
        let Some(pr) = self
            .leader_state
            .as_mut()
            .and_then(|l| l.progress.get_mut(&to))
        else {
            return;
        };
        match pr.state {
            ProgressState::Snapshot { .. } => return,
            ProgressState::Probe if pr.probe_sent => return,
            ProgressState::Replicate
                if pr.inflight.len() >= max_count || pr.inflight_bytes >= max_inflight_bytes =>
            {
                return;
            }
            ProgressState::Replicate if pr.next_index > last => return,
            _ => {}
        }
        let prev_index = pr.next_index - 1;
        let Some(prev_term) = self.log.term(prev_index) else {
            pr.state = ProgressState::Snapshot { since: now };
            self.out.send_snapshot.push(to);
            return;
        };
        let entries = self
            .log
            .slice(pr.next_index, last, max_bytes)
            .expect("prev is not compacted");
        match pr.state {
            ProgressState::Replicate => {
                let sent_last = entries.last().expect("checked not empty").index;
                let bytes = entries.iter().map(Entry::size_bytes).sum();
                pr.next_index = sent_last + 1;
                pr.inflight_bytes += bytes;
                pr.inflight.push_back(Inflight {
                    last: sent_last,
                    bytes,
                    sent_tick: now,
                });
            }
            _ => pr.probe_sent = true,
        }
        self.ls().quiesce_round = None;
        let msg = AppendEntries {
            term,
            prev_index,
            prev_term,
            entries,
            leader_commit: commit,
            round,
            quiesce: false,
        };
        self.send(to, Message::AppendEntries(msg), false);
    }

    /// An empty append to every member, starting a new round. Its `prev` is
    /// the follower's known match, so it always passes the consistency check
    /// and safely carries the commit index (the follower commits only up to
    /// `prev`).
    fn broadcast_heartbeat(&mut self, quiesce: bool) {
        let now = self.now;
        let horizon = now.saturating_sub(self.cfg.election_timeout_max_ticks);
        let ls = self.ls();
        ls.round += 1;
        let round = ls.round;
        ls.quiesce_round = quiesce.then_some(round);
        for pr in ls.progress.values_mut() {
            pr.quiet = false;
        }
        ls.round_ticks.push_back((round, now));
        while ls.round_ticks.front().is_some_and(|(_, t)| *t < horizon) {
            ls.round_ticks.pop_front();
        }
        let peers: Vec<(NodeId, Index, ProgressState)> = ls
            .progress
            .iter()
            .map(|(id, p)| (*id, p.match_index, p.state))
            .collect();
        for (to, match_index, state) in peers {
            if state == ProgressState::Probe {
                // Probing followers are retried with entries instead.
                if let Some(pr) = self.ls().progress.get_mut(&to) {
                    pr.probe_sent = false;
                }
                self.send_append(to);
                continue;
            }
            let (prev_index, prev_term) = match self.log.term(match_index) {
                Some(t) => (match_index, t),
                None => (self.log.snapshot_index(), self.log.snapshot_term()),
            };
            let msg = AppendEntries {
                term: self.term,
                prev_index,
                prev_term,
                entries: Vec::new(),
                leader_commit: self.log.committed(),
                round,
                quiesce,
            };
            self.send(to, Message::AppendEntries(msg), false);
        }
    }

    fn handle_append_reply(&mut self, from: NodeId, m: AppendEntriesReply) {
        if self.role != Role::Leader {
            return;
        }
        let tick_of_round = self
            .ls()
            .round_ticks
            .iter()
            .find(|(r, _)| *r == m.round)
            .map(|(_, t)| *t);
        let quiesce_round = self.ls().quiesce_round;
        let Some(pr) = self.ls().progress.get_mut(&from) else {
            return;
        };
        pr.active = true;
        pr.quiet = m.quiet && m.result == AppendResult::Success && quiesce_round == Some(m.round);
        if m.round > pr.acked_round {
            pr.acked_round = m.round;
            if let Some(t) = tick_of_round {
                pr.acked_tick = pr.acked_tick.max(t);
            }
        }
        pr.commit = pr.commit.max(m.follower_commit);
        match m.result {
            AppendResult::NotLeader => {}
            AppendResult::Success => {
                let progressed = m.match_index > pr.match_index;
                if progressed {
                    pr.match_index = m.match_index;
                }
                pr.free_up_to(pr.match_index);
                match pr.state {
                    ProgressState::Probe => {
                        pr.state = ProgressState::Replicate;
                        pr.probe_sent = false;
                        pr.next_index = pr.match_index + 1;
                    }
                    ProgressState::Snapshot { .. } => {}
                    ProgressState::Replicate => {
                        pr.next_index = pr.next_index.max(pr.match_index + 1);
                    }
                }
                if progressed {
                    self.maybe_commit();
                    self.check_staging();
                }
                self.maybe_start_election_at_target(from);
                self.send_append(from);
            }
            AppendResult::Inconsistency => {
                if m.rejected_prev <= pr.match_index {
                    return;
                }
                if pr.state == ProgressState::Probe && m.rejected_prev != pr.next_index - 1 {
                    return;
                }
                if matches!(pr.state, ProgressState::Snapshot { .. }) {
                    return;
                }
                let next = match (
                    m.conflict_term,
                    self.log.last_index_of_term(m.conflict_term),
                ) {
                    (0, _) => m.next_index,
                    (_, Some(l)) if l >= m.next_index && l < m.rejected_prev => l + 1,
                    _ => m.next_index,
                };
                let pr = self.ls().progress.get_mut(&from).expect("checked");
                pr.become_probe();
                pr.next_index =
                    next.clamp(pr.match_index + 1, m.rejected_prev.max(pr.match_index + 1));
                self.send_append(from);
            }
        }
        self.confirm_reads();
        self.maybe_go_quiet();
    }

    fn maybe_commit(&mut self) {
        let Some(ls) = &self.leader_state else { return };
        let durable = self.log.durable();
        let index = self.membership().quorum_index(|id| {
            if id == self.id {
                durable
            } else {
                ls.progress.get(&id).map_or(0, |p| p.match_index)
            }
        });
        // Only an entry of the current term is committed by counting
        // replicas (Raft §5.4.2, the Figure 8 case); earlier ones follow.
        if index > self.log.committed() && self.log.term(index) == Some(self.term) {
            self.log.commit_to(index);
            self.ls().broadcast_pending = true;
            self.on_commit_advanced();
        }
    }

    fn committed_in_term(&self) -> bool {
        self.log.term(self.log.committed()) == Some(self.term)
    }

    fn on_commit_advanced(&mut self) {
        if self.committed_in_term() {
            let commit = self.log.committed();
            let ls = self.ls();
            let round = ls.round + 1;
            for (ctx, origin) in std::mem::take(&mut ls.reads_before_commit) {
                ls.reads.push_back(PendingRead {
                    ctx,
                    origin,
                    index: commit,
                    round,
                });
            }
        }
        self.advance_conf_change();
    }

    // ----------------------------------------------------------------------
    // Followers: append and snapshot
    // ----------------------------------------------------------------------

    fn append_reply(
        &self,
        result: AppendResult,
        match_index: Index,
        next_index: Index,
        conflict_term: Term,
        rejected_prev: Index,
        round: u64,
    ) -> AppendEntriesReply {
        AppendEntriesReply {
            term: self.term,
            result,
            match_index,
            next_index,
            conflict_term,
            rejected_prev,
            follower_commit: self.log.committed(),
            round,
            quiet: false,
        }
    }

    fn recognise_leader(&mut self, from: NodeId) {
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(self.term, Some(from));
        }
        self.leader_contact_elapsed = 0;
        self.election_elapsed = 0;
    }

    fn handle_append(&mut self, from: NodeId, mut m: AppendEntries) {
        self.recognise_leader(from);
        let quiesce = m.quiesce.then_some((m.prev_index, m.leader_commit));
        // Entries up to our commit index are known to match the leader's
        // (leader completeness); skip them so a delayed request overlapping
        // a compacted prefix still succeeds.
        let committed = self.log.committed();
        if m.prev_index < committed {
            let skip = (committed - m.prev_index).min(m.entries.len() as Index) as usize;
            debug_assert!(
                m.entries[..skip]
                    .iter()
                    .all(|e| self.log.term(e.index).is_none_or(|t| t == e.term))
            );
            m.entries.drain(..skip);
            m.prev_index = committed;
            m.prev_term = self
                .log
                .term(committed)
                .expect("commit index is never compacted past");
            if let Some(first) = m.entries.first() {
                // Entries are contiguous: prev is the one before the first kept.
                debug_assert_eq!(first.index, committed + 1);
            }
        }
        match self.log.term(m.prev_index) {
            Some(t) if t == m.prev_term => {}
            found => {
                let (hint, conflict_term) = match found {
                    None => (self.log.last_index() + 1, 0),
                    Some(t) => (
                        self.log
                            .first_index_of_term_at(m.prev_index)
                            .max(committed + 1),
                        t,
                    ),
                };
                let reply = self.append_reply(
                    AppendResult::Inconsistency,
                    0,
                    hint,
                    conflict_term,
                    m.prev_index,
                    m.round,
                );
                self.send(from, Message::AppendEntriesReply(reply), true);
                return;
            }
        }
        let last_new = self.log.append_from_leader(m.prev_index, m.entries);
        let commit = m.leader_commit.min(last_new);
        self.log.commit_to(commit.max(self.log.committed()));
        // Quiet only with exactly the leader's log, all of it committed: a
        // longer log holds entries the leader never sent in this term, which
        // only a real append may truncate.
        let quiet = self.cfg.quiesce
            && quiesce.is_some_and(|(prev, commit)| {
                prev == commit && self.log.last_index() == prev && self.log.committed() == commit
            });
        if quiet {
            self.quiet = true;
            self.quiet_elapsed = 0;
        } else {
            self.wake();
        }
        let mut reply = self.append_reply(
            AppendResult::Success,
            last_new,
            self.log.last_index() + 1,
            0,
            0,
            m.round,
        );
        reply.quiet = quiet;
        self.send(from, Message::AppendEntriesReply(reply), true);
    }

    fn handle_install_snapshot(&mut self, from: NodeId, m: InstallSnapshot) {
        self.recognise_leader(from);
        let index = if m.meta.index <= self.log.committed() {
            // Already have everything it covers.
            self.log.committed()
        } else {
            self.log.install_snapshot(&m.meta);
            self.apply_cursor = m.meta.index;
            self.applied = m.meta.index;
            self.out.snapshot = Some(m.meta.clone());
            m.meta.index
        };
        let reply = InstallSnapshotReply {
            term: self.term,
            snapshot_index: index,
            accepted: true,
        };
        self.send(from, Message::InstallSnapshotReply(reply), true);
    }

    fn handle_install_snapshot_reply(&mut self, from: NodeId, m: InstallSnapshotReply) {
        if self.role != Role::Leader {
            return;
        }
        let Some(pr) = self.ls().progress.get_mut(&from) else {
            return;
        };
        pr.active = true;
        if m.accepted {
            pr.match_index = pr.match_index.max(m.snapshot_index);
        }
        pr.become_probe();
        self.maybe_commit();
        self.check_staging();
        self.send_append(from);
    }

    // ----------------------------------------------------------------------
    // Reads
    // ----------------------------------------------------------------------

    /// Asks for a linearizable read index; the answer comes as
    /// `Event::ReadReady { ctx, .. }` or `Event::ReadFailed { ctx, .. }`.
    pub fn read_index(&mut self, ctx: u64) {
        match self.role {
            Role::Leader => self.register_read(ctx, None),
            _ => match self.leader {
                Some(leader) => {
                    self.remote_reads.insert(ctx);
                    let msg = ReadIndexRequest {
                        term: self.term,
                        ctx,
                    };
                    self.send(leader, Message::ReadIndex(msg), false);
                }
                None => {
                    let error = ReadError::NotLeader { leader: None };
                    self.out.events.push(Event::ReadFailed { ctx, error });
                }
            },
        }
    }

    fn register_read(&mut self, ctx: u64, origin: Option<NodeId>) {
        self.wake();
        self.active_at = self.now;
        if self.ls().transfer.is_some() {
            return self.answer_read(ctx, origin, Err(ReadError::SteppingDown));
        }
        if !self.committed_in_term() {
            self.ls().reads_before_commit.push((ctx, origin));
            return;
        }
        let index = self.log.committed();
        if self.lease_valid() {
            return self.answer_read(ctx, origin, Ok(index));
        }
        let ls = self.ls();
        let round = ls.round + 1;
        ls.reads.push_back(PendingRead {
            ctx,
            origin,
            index,
            round,
        });
    }

    /// A quorum acknowledged a round sent less than `lease_ticks` ago, so no
    /// other leader can exist yet (its voters are still sticky to us).
    fn lease_valid(&self) -> bool {
        let Some(ls) = &self.leader_state else {
            return false;
        };
        if !self.cfg.leader_lease || ls.transfer.is_some() {
            return false;
        }
        let start = self.membership().quorum_index(|id| {
            if id == self.id {
                self.now
            } else {
                ls.progress.get(&id).map_or(0, |p| p.acked_tick)
            }
        });
        // acked_tick 0 means "never": no lease from it.
        start > 0 && self.now < start + self.cfg.lease_ticks
    }

    fn confirm_reads(&mut self) {
        let Some(ls) = &self.leader_state else { return };
        let confirmed = self.membership().quorum_index(|id| {
            if id == self.id {
                ls.round
            } else {
                ls.progress.get(&id).map_or(0, |p| p.acked_round)
            }
        });
        while self
            .ls()
            .reads
            .front()
            .is_some_and(|r| r.round <= confirmed)
        {
            let r = self.ls().reads.pop_front().expect("checked");
            self.answer_read(r.ctx, r.origin, Ok(r.index));
        }
    }

    fn answer_read(&mut self, ctx: u64, origin: Option<NodeId>, result: Result<Index, ReadError>) {
        match origin {
            None => self.out.events.push(match result {
                Ok(index) => Event::ReadReady { ctx, index },
                Err(error) => Event::ReadFailed { ctx, error },
            }),
            Some(to) => {
                let msg = ReadIndexReply {
                    term: self.term,
                    ctx,
                    result,
                };
                self.send(to, Message::ReadIndexReply(msg), false);
            }
        }
    }

    fn handle_read_index(&mut self, from: NodeId, m: ReadIndexRequest) {
        if self.role == Role::Leader {
            self.register_read(m.ctx, Some(from));
        } else {
            self.answer_read(
                m.ctx,
                Some(from),
                Err(ReadError::NotLeader {
                    leader: self.leader,
                }),
            );
        }
    }

    fn handle_read_index_reply(&mut self, m: ReadIndexReply) {
        if self.remote_reads.remove(&m.ctx) {
            self.out.events.push(match m.result {
                Ok(index) => Event::ReadReady { ctx: m.ctx, index },
                Err(error) => Event::ReadFailed { ctx: m.ctx, error },
            });
        }
    }

    // ----------------------------------------------------------------------
    // Membership changes
    // ----------------------------------------------------------------------

    /// Starts a membership change; completion is reported by
    /// `Event::ConfChangeDone`. Errors here mean nothing was started.
    pub fn change_membership(&mut self, req: ConfChangeRequest) -> Result<(), ConfChangeError> {
        if self.role == Role::Leader {
            self.wake();
            self.active_at = self.now;
        }
        let Some(ls) = &self.leader_state else {
            return Err(ConfChangeError::NotLeader {
                leader: self.leader,
            });
        };
        if ls.transfer.is_some() {
            return Err(ConfChangeError::SteppingDown);
        }
        if ls.conf_change.is_some() || self.log.membership_index() > self.log.committed() {
            return Err(ConfChangeError::InProgress);
        }
        let current = self.membership().clone();
        let target = match &req.mode {
            ConfChangeMode::SetUnconditionally => {
                Membership::from_lists(&req.voters, &req.listeners)?
            }
            ConfChangeMode::CompareAndSet { voters, listeners } => {
                let expected = Membership::from_lists(voters, listeners)?;
                if !expected.same_members(&current) {
                    return Err(ConfChangeError::CompareMismatch {
                        current: Box::new(current),
                    });
                }
                Membership::from_lists(&req.voters, &req.listeners)?
            }
            ConfChangeMode::Add => {
                let mut voters: Vec<PeerInfo> = current.voters.values().cloned().collect();
                let mut listeners: Vec<PeerInfo> = current
                    .listeners
                    .values()
                    .filter(|p| !req.voters.iter().any(|v| v.id == p.id))
                    .cloned()
                    .collect();
                for v in &req.voters {
                    match voters.iter_mut().find(|p| p.id == v.id) {
                        Some(p) => *p = v.clone(),
                        None => voters.push(v.clone()),
                    }
                }
                for l in &req.listeners {
                    match listeners.iter_mut().find(|p| p.id == l.id) {
                        Some(p) => *p = l.clone(),
                        None => listeners.push(l.clone()),
                    }
                }
                Membership::from_lists(&voters, &listeners)?
            }
        };
        if target == current {
            self.out
                .events
                .push(Event::ConfChangeDone(Ok(self.log.membership_index())));
            return Ok(());
        }
        let staged: BTreeSet<NodeId> = target
            .voters
            .keys()
            .filter(|id| !current.voters.contains_key(id))
            .copied()
            .collect();
        let next = self.log.last_index() + 1;
        let now = self.now;
        let me = self.id;
        let ls = self.ls();
        for id in target.members() {
            if id != me {
                ls.progress.entry(id).or_insert_with(|| Progress::new(next));
            }
        }
        let matches = staged.iter().map(|id| (*id, 0)).collect();
        ls.conf_change = Some(ConfChange {
            target,
            phase: ConfPhase::Staging {
                staged,
                last_progress_tick: now,
                matches,
            },
            notify: true,
        });
        ls.broadcast_pending = true;
        self.check_staging();
        Ok(())
    }

    /// Moves a staged change to joint consensus once every new voter is
    /// within `staging_catch_up_gap` of the leader's log.
    fn check_staging(&mut self) {
        let last = self.log.last_index();
        let gap = self.cfg.staging_catch_up_gap;
        let Some(ls) = &self.leader_state else { return };
        let Some(ConfChange {
            phase: ConfPhase::Staging { staged, .. },
            target,
            ..
        }) = &ls.conf_change
        else {
            return;
        };
        let caught_up = staged.iter().all(|id| {
            ls.progress
                .get(id)
                .is_some_and(|p| p.match_index + gap >= last && p.match_index > 0)
        });
        if !caught_up {
            return;
        }
        let target = target.clone();
        let current = self.membership().clone();
        if target.voters.keys().eq(current.voters.keys()) {
            // Only listeners, addresses or priorities change: quorums stay
            // the same, so no joint phase is needed.
            let (_, index) = self.append_entry(EntryPayload::Membership(target));
            self.set_phase(ConfPhase::Final { index });
        } else {
            let joint = Membership {
                voters: target.voters.clone(),
                old_voters: Some(current.voters.clone()),
                listeners: target.listeners.clone(),
            };
            let (_, index) = self.append_entry(EntryPayload::Membership(joint));
            self.set_phase(ConfPhase::Joint { index });
        }
        self.maybe_commit();
    }

    fn set_phase(&mut self, phase: ConfPhase) {
        if let Some(cc) = self.ls().conf_change.as_mut() {
            cc.phase = phase;
        }
    }

    fn check_staging_timeout(&mut self) {
        let now = self.now;
        let timeout = self.cfg.staging_timeout_ticks;
        let ls = self.ls();
        let Some(ConfChange {
            phase:
                ConfPhase::Staging {
                    staged,
                    last_progress_tick,
                    matches,
                },
            ..
        }) = &mut ls.conf_change
        else {
            return;
        };
        for id in staged.iter() {
            let m = ls.progress.get(id).map_or(0, |p| p.match_index);
            let seen = matches.entry(*id).or_insert(0);
            if m > *seen {
                *seen = m;
                *last_progress_tick = now;
            }
        }
        if now - *last_progress_tick < timeout {
            return;
        }
        let peers: Vec<NodeId> = staged.iter().copied().collect();
        let notify = ls.conf_change.take().is_some_and(|c| c.notify);
        self.sync_progress_with_membership();
        if notify {
            self.out.events.push(Event::ConfChangeDone(Err(
                ConfChangeError::StagingTimeout { peers },
            )));
        }
    }

    /// Joint committed → append the final membership; final committed → done
    /// (and step down if this leader is no longer a voter).
    fn advance_conf_change(&mut self) {
        let commit = self.log.committed();
        let Some(cc) = self
            .leader_state
            .as_ref()
            .and_then(|l| l.conf_change.clone())
        else {
            return;
        };
        match cc.phase {
            ConfPhase::Joint { index } if commit >= index => {
                let (_, index) = self.append_entry(EntryPayload::Membership(cc.target.clone()));
                self.set_phase(ConfPhase::Final { index });
                self.maybe_commit();
            }
            ConfPhase::Final { index } if commit >= index => {
                self.ls().conf_change = None;
                if cc.notify {
                    self.out.events.push(Event::ConfChangeDone(Ok(index)));
                }
                if !self.membership().is_voter(self.id) {
                    self.become_follower(self.term, None);
                }
            }
            _ => {}
        }
    }

    // ----------------------------------------------------------------------
    // Leadership transfer
    // ----------------------------------------------------------------------

    /// Hands leadership to `target` (or, with `None`, to the most caught-up
    /// voter). Writes are refused meanwhile; the outcome comes as
    /// `Event::TransferDone`.
    pub fn transfer_leadership(
        &mut self,
        target: Option<NodeId>,
        timeout_ticks: u64,
    ) -> Result<(), TransferError> {
        if self.role == Role::Leader {
            self.wake();
            self.active_at = self.now;
        }
        self.start_transfer(target, timeout_ticks, true)
    }

    fn start_transfer(
        &mut self,
        target: Option<NodeId>,
        timeout_ticks: u64,
        notify: bool,
    ) -> Result<(), TransferError> {
        let Some(ls) = &self.leader_state else {
            return Err(TransferError::NotLeader {
                leader: self.leader,
            });
        };
        if ls.transfer.is_some() {
            return Err(TransferError::InProgress);
        }
        if ls.conf_change.is_some() {
            return Err(TransferError::MembershipChanging);
        }
        let membership = self.membership();
        let target = match target {
            Some(t) if t == self.id => {
                let done = Transferred {
                    term: self.term,
                    target: t,
                };
                self.out.events.push(Event::TransferDone(Ok(done)));
                return Ok(());
            }
            Some(t) if !membership.voters.contains_key(&t) => {
                return Err(TransferError::NotAVoter(t));
            }
            Some(t) => t,
            None => membership
                .voters
                .values()
                .filter(|p| p.id != self.id)
                .max_by_key(|p| {
                    (
                        ls.progress.get(&p.id).map_or(0, |pr| pr.match_index),
                        p.priority,
                    )
                })
                .map(|p| p.id)
                .ok_or(TransferError::NoCandidate)?,
        };
        let deadline = self.now + timeout_ticks.max(1);
        self.ls().transfer = Some(Transfer {
            target,
            deadline,
            notify,
        });
        self.maybe_start_election_at_target(target);
        self.send_append(target);
        Ok(())
    }

    fn maybe_start_election_at_target(&mut self, from: NodeId) {
        let last = self.log.last_index();
        let Some(ls) = &self.leader_state else { return };
        let Some(t) = &ls.transfer else { return };
        if t.target == from
            && ls
                .progress
                .get(&from)
                .is_some_and(|p| p.match_index == last)
        {
            let msg = StartElection {
                term: self.term,
                last_index: last,
                last_term: self.log.last_term(),
            };
            self.send(from, Message::StartElection(msg), false);
        }
    }

    fn resend_start_election(&mut self) {
        if let Some(target) = self.ls().transfer.as_ref().map(|t| t.target) {
            self.maybe_start_election_at_target(target);
        }
    }

    /// A leader yields to a caught-up voter of higher priority.
    fn maybe_hand_over_to_priority(&mut self) {
        if !self.committed_in_term() {
            return;
        }
        let last = self.log.last_index();
        let me = self.membership().priority(self.id);
        let ls = self.leader_state.as_ref().expect("leader");
        let better = self
            .membership()
            .voters
            .values()
            .filter(|p| {
                p.priority > me
                    && ls
                        .progress
                        .get(&p.id)
                        .is_some_and(|pr| pr.match_index == last)
            })
            .max_by_key(|p| p.priority)
            .map(|p| p.id);
        if let Some(target) = better {
            let timeout = self.cfg.election_timeout_max_ticks * 2;
            // Busy (another change or transfer running) just means: later.
            let _ = self.start_transfer(Some(target), timeout, false);
        }
    }
}

/// The final membership a joint one leads to.
fn leave_joint(m: &Membership) -> Membership {
    Membership {
        voters: m.voters.clone(),
        old_voters: None,
        listeners: m.listeners.clone(),
    }
}

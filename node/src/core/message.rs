//! Messages between members of one group, as the core sees them. The rpc
//! layer maps them to and from `kuberaft.v1` protobufs; the simulation passes
//! them as they are.

use super::error::ReadError;
use super::types::{Entry, Index, NodeId, SnapshotMeta, Term};

/// A message with its sender and receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub from: NodeId,
    pub to: NodeId,
    pub msg: Message,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    AppendEntries(AppendEntries),
    AppendEntriesReply(AppendEntriesReply),
    RequestVote(RequestVote),
    RequestVoteReply(RequestVoteReply),
    /// Leader → transferee: campaign now, skipping pre-vote.
    StartElection(StartElection),
    /// Leader → follower: a snapshot has been fully transferred by the shell.
    InstallSnapshot(InstallSnapshot),
    InstallSnapshotReply(InstallSnapshotReply),
    /// Follower → leader: confirm leadership and tell me a read index.
    ReadIndex(ReadIndexRequest),
    ReadIndexReply(ReadIndexReply),
}

impl Message {
    /// The sender's term, for the term rules every message obeys.
    pub fn term(&self) -> Term {
        match self {
            Message::AppendEntries(m) => m.term,
            Message::AppendEntriesReply(m) => m.term,
            Message::RequestVote(m) => m.term,
            Message::RequestVoteReply(m) => m.term,
            Message::StartElection(m) => m.term,
            Message::InstallSnapshot(m) => m.term,
            Message::InstallSnapshotReply(m) => m.term,
            Message::ReadIndex(m) => m.term,
            Message::ReadIndexReply(m) => m.term,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendEntries {
    pub term: Term,
    pub prev_index: Index,
    pub prev_term: Term,
    pub entries: Vec<Entry>,
    pub leader_commit: Index,
    /// Heartbeat round the request belongs to; echoed in the reply to
    /// confirm read-index rounds and the leader lease.
    pub round: u64,
    /// A heartbeat of an idle leader whose log every member holds: go quiet
    /// if your log ends at `prev_index` and commits `leader_commit`.
    pub quiesce: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendResult {
    Success,
    /// The sender's term is stale.
    NotLeader,
    /// `prev` did not match; resume at the hint.
    Inconsistency,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendEntriesReply {
    pub term: Term,
    pub result: AppendResult,
    /// Success: the last index known to match the leader's log.
    pub match_index: Index,
    /// Inconsistency: where the follower suggests resuming. Success: the
    /// follower's last index + 1.
    pub next_index: Index,
    /// Inconsistency: term of the follower's entry at the rejected prev index
    /// (0 when its log is shorter).
    pub conflict_term: Term,
    /// Inconsistency: the prev index that was rejected (to spot stale replies).
    pub rejected_prev: Index,
    pub follower_commit: Index,
    pub round: u64,
    /// The follower is quiet (it went or stayed quiet on a quiesce
    /// heartbeat).
    pub quiet: bool,
    /// The highest cluster level the follower's version knows (0 from a
    /// version before levels, which counts as 1).
    pub feature_level: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestVote {
    /// Pre-vote: the term the candidate would campaign in.
    pub term: Term,
    pub last_index: Index,
    pub last_term: Term,
    pub pre_vote: bool,
    /// Campaign ordered by the leader (transfer): voters waive stickiness and
    /// priority.
    pub transfer: bool,
    pub priority: u32,
}

/// Why a vote was refused, for logs and the simulation's statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteRefusal {
    StaleTerm,
    AlreadyVoted,
    LogBehind,
    LowerPriority,
    /// The voter heard from a live leader recently.
    LeaderAlive,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestVoteReply {
    pub term: Term,
    pub pre_vote: bool,
    pub refusal: Option<VoteRefusal>,
}

impl RequestVoteReply {
    pub fn granted(&self) -> bool {
        self.refusal.is_none()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartElection {
    pub term: Term,
    pub last_index: Index,
    pub last_term: Term,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallSnapshot {
    pub term: Term,
    pub meta: SnapshotMeta,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallSnapshotReply {
    pub term: Term,
    /// The follower now holds everything up to here.
    pub snapshot_index: Index,
    pub accepted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadIndexRequest {
    pub term: Term,
    pub ctx: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadIndexReply {
    pub term: Term,
    pub ctx: u64,
    pub result: Result<Index, ReadError>,
}

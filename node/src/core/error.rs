//! Errors the core reports to its shell. Each maps to a client-visible
//! exception in the rpc layer (NotLeader, LeaderSteppingDown, ...).

use super::membership::{Membership, MembershipError};
use super::types::{NodeId, Term};

/// A proposal was refused; nothing was appended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader; try member {leader:?}")]
    NotLeader { leader: Option<NodeId> },
    #[error("leadership is being transferred; retry shortly at the new leader")]
    SteppingDown,
}

/// A linearizable read could not be given a read index.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("not the leader and no leader known; retry later")]
    NotLeader { leader: Option<NodeId> },
    #[error("leadership changed before the read was confirmed; retry")]
    LeaderChanged,
    #[error("leadership is being transferred; retry at the new leader")]
    SteppingDown,
}

/// A membership change failed; the membership is unchanged unless said.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfChangeError {
    #[error("not the leader; send the change to member {leader:?}")]
    NotLeader { leader: Option<NodeId> },
    #[error("another membership change is in progress; wait for it to finish")]
    InProgress,
    #[error("leadership is being transferred; retry at the new leader")]
    SteppingDown,
    #[error("the current membership is not the expected one (current: {current:?})")]
    CompareMismatch { current: Box<Membership> },
    #[error("invalid membership: {0}")]
    Invalid(#[from] MembershipError),
    #[error(
        "new member(s) {peers:?} made no progress catching up; check they are running and reachable"
    )]
    StagingTimeout { peers: Vec<NodeId> },
    #[error("leadership was lost during the change; it may still complete under the new leader")]
    LeaderChanged,
}

/// A leadership transfer failed; the leader serves again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("not the leader; leader is {leader:?}")]
    NotLeader { leader: Option<NodeId> },
    #[error("a transfer is already in progress")]
    InProgress,
    #[error("member {0} is not a voter of this group")]
    NotAVoter(NodeId),
    #[error("no other voter can take over")]
    NoCandidate,
    #[error("a membership change is in progress; transfer after it completes")]
    MembershipChanging,
    #[error("target {target} did not take over within the timeout; leadership kept")]
    Timeout { target: NodeId },
    #[error("target {target} did not take over: member {leader} leads instead")]
    OtherLeader { target: NodeId, leader: NodeId },
}

/// How a transfer ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transferred {
    /// The term in which this member stopped leading.
    pub term: Term,
    pub target: NodeId,
}

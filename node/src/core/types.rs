//! Plain data the core exchanges with its shell: log entries, the hard state
//! that must survive a crash, and snapshot metadata.

use bytes::Bytes;

use super::membership::Membership;

/// A member id. Unique within a group and never reused by a member that lost
/// its data: a wiped member that rejoined under its old id could vote twice in
/// one term.
pub type NodeId = u64;
/// A Raft term. Term 0 is "before any election".
pub type Term = u64;
/// A log index. Index 0 is the empty prefix; the first entry has index 1.
pub type Index = u64;

/// What a log entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryPayload {
    /// Appended by a new leader so that it can commit entries of earlier terms
    /// (Raft §5.4.2) and learn the commit index before serving reads.
    Noop,
    /// An opaque state-machine command.
    Command(Bytes),
    /// A membership configuration; takes effect as soon as it is appended.
    Membership(Membership),
    /// Raises the group's cluster level (see `Config::feature_level`).
    ClusterLevel(u32),
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: Term,
    pub index: Index,
    pub payload: EntryPayload,
}

impl Entry {
    /// Approximate wire size, used to bound in-flight bytes. Exactness does
    /// not matter; monotonicity in the payload size does.
    pub fn size_bytes(&self) -> usize {
        const HEADER: usize = 24;
        HEADER
            + match &self.payload {
                EntryPayload::Noop => 0,
                EntryPayload::Command(data) => data.len(),
                EntryPayload::Membership(m) => 32 * m.len(),
                EntryPayload::ClusterLevel(_) => 4,
            }
    }
}

/// State that must be durable before any message that depends on it leaves
/// the member: the current term and the vote cast in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    pub voted_for: Option<NodeId>,
}

/// Describes a snapshot: the last entry it covers and the membership in force
/// at that entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
    pub membership: Membership,
}

/// The role a member plays in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Asking for pre-votes; its term has not changed yet.
    PreCandidate,
    Candidate,
    Leader,
}

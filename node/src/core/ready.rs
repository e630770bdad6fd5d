//! What the core asks its shell to do after a batch of inputs.
//!
//! # The persistence rule
//!
//! For each [`Ready`], in order:
//! 1. persist: install `snapshot` (if any), truncate the log from
//!    `entries[0].index` and append `entries`, write `hard_state`;
//! 2. `messages` may be sent at once, before or during step 1;
//! 3. `persisted_messages` may be sent only after step 1 is durable (fsync);
//! 4. apply `committed_entries` in order, then report `applied`;
//! 5. once step 1 is durable, call `RaftCore::on_persisted(ready.number)`
//!    (a Ready with nothing to persist needs no call, but its
//!    `persisted_messages` still wait for the Readies before it).
//!
//! Readies must be persisted in the order they were taken. Step 2 being safe
//! before step 1 is the core's responsibility: it puts in `messages` only what
//! depends on nothing unpersisted (a leader's appends once its term is
//! durable, pre-votes, read-index traffic) and everything else — votes, append
//! acknowledgements, a candidate's vote requests — in `persisted_messages`.

use super::error::{ConfChangeError, ReadError, TransferError, Transferred};
use super::message::Envelope;
use super::types::{Entry, HardState, Index, NodeId, SnapshotMeta, Term};

#[derive(Debug, Default)]
pub struct Ready {
    /// Pass to `on_persisted` once this Ready's writes are durable.
    pub number: u64,
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader to install (the shell holds its
    /// data): drop log entries up to `snapshot.index`, or all of them if the
    /// entry there has another term, and restore the state machine from it.
    pub snapshot: Option<SnapshotMeta>,
    /// Truncate from `entries[0].index`, then append.
    pub entries: Vec<Entry>,
    pub messages: Vec<Envelope>,
    pub persisted_messages: Vec<Envelope>,
    /// Apply in order. A proposal succeeded iff the entry applied at its index
    /// has the term `propose` returned.
    pub committed_entries: Vec<Entry>,
    /// Followers whose next entry was compacted: stream them the latest
    /// snapshot, then deliver `Message::InstallSnapshot` to their core, or
    /// call `report_snapshot_failure`.
    pub send_snapshot: Vec<NodeId>,
    /// Entries the core no longer holds, wanted for a follower behind its
    /// snapshot: read them from the log storage and answer with
    /// `RaftCore::fetched`, always, also when storage no longer has them.
    /// Every one is committed, but read it only after the writes of every
    /// Ready taken before this one: the core compacts memory once the
    /// snapshot is written, which may be before an earlier truncation of a
    /// stale suffix reached the disk.
    pub fetch: Vec<Fetch>,
    pub events: Vec<Event>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.committed_entries.is_empty()
            && self.send_snapshot.is_empty()
            && self.fetch.is_empty()
            && self.events.is_empty()
    }
}

/// A read of compacted entries from storage, for one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetch {
    pub to: NodeId,
    /// Read from this index (its entry gives the term the follower's log
    /// must match, the rest are sent; for 0, which is never stored, read
    /// from 1: the term before it is 0)...
    pub prev: Index,
    /// ... up to this one, fewer if `max_bytes` are reached first (at least
    /// two entries when `hi > prev`).
    pub hi: Index,
    pub max_bytes: usize,
}

/// Outcomes of earlier requests and notable changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Serve read `ctx` once the state machine has applied `index`.
    ReadReady {
        ctx: u64,
        index: Index,
    },
    ReadFailed {
        ctx: u64,
        error: ReadError,
    },
    /// The membership change asked for finished (index of the final entry).
    ConfChangeDone(Result<Index, ConfChangeError>),
    TransferDone(Result<Transferred, TransferError>),
    /// The member learned of a new term or leader.
    LeaderChanged {
        term: Term,
        leader: Option<NodeId>,
    },
}

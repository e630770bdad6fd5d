//! The sans-IO Raft consensus core.
//!
//! One [`RaftCore`] is one member of one group. It never awaits, never reads
//! a clock, never touches a file or socket: time is [`RaftCore::tick`],
//! network input is [`RaftCore::step`], and everything it wants done comes out
//! of [`RaftCore::take_ready`] as a [`Ready`]. The rules for executing a
//! `Ready` — persist before sending `persisted_messages`, apply in order — are
//! stated once, in `ready.rs`.
//!
//! What lives here, by file:
//! - `types`, `message`, `error`: the vocabulary;
//! - `membership`: voter sets, joint consensus and quorum arithmetic;
//! - `log`: the in-memory log view, commit and durability indexes;
//! - `config`: tuning with `validate()`;
//! - `raft`: elections (pre-vote, priorities, check-quorum, lease, pause),
//!   replication (probe / pipelined replicate / snapshot), membership changes,
//!   leadership transfer, read index, snapshot hand-off.
//!
//! This module must not import tokio, tonic, std::fs, std::net or
//! std::time; the simulation in `kuberaft-tests` relies on it being
//! deterministic given its inputs and `Config::rng_seed`.

mod config;
mod error;
mod log;
mod membership;
mod message;
mod raft;
mod ready;
mod types;

#[cfg(test)]
mod tests;

pub use config::{Config, ConfigError, FEATURE_LEVEL, StartError};
pub use error::{ConfChangeError, ProposeError, ReadError, TransferError, Transferred};
pub use log::{RaftLog, RestoreError};
pub use membership::{Membership, MembershipError, PeerInfo};
pub use message::*;
pub use raft::{ConfChangeMode, ConfChangeRequest, ProgressState, RaftCore, Status};
pub use ready::{Event, Fetch, Ready};
pub use types::{Entry, EntryPayload, HardState, Index, NodeId, Role, SnapshotMeta, Term};

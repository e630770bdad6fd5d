//! State machines: what a group replicates.
//!
//! The server calls [`StateMachine::start_transaction`] on the leader before a
//! command is logged (a refusal there costs nothing and is reported as a
//! StateMachine exception "rejected before logging"), [`StateMachine::apply`]
//! on every member for every committed command in log order, and
//! [`StateMachine::query`] for reads. `apply` must be deterministic: the same
//! commands in the same order give the same state and results everywhere. A
//! command `apply` refuses (malformed, e.g. from a newer client) changes
//! nothing and its error goes back to the client.
//!
//! Snapshots are a set of named files, written by the snapshot store.

mod counter;
mod kv;

use bytes::Bytes;

pub use counter::Counter;
pub use kv::{Kv, MAX_KEY_BYTES, MAX_SCAN_LIMIT};

use crate::core::Index;

/// A state machine's files at one applied index.
pub type SnapshotFiles = Vec<(String, Vec<u8>)>;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateMachineError {
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("refused: {0}")]
    Rejected(String),
    #[error("snapshot cannot be restored: {0}")]
    BadSnapshot(String),
    #[error("unknown state machine {0:?}; the built-ins are \"kv\" and \"counter\"")]
    Unknown(String),
}

pub trait StateMachine: Send + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Checks a command before it is logged; no state changes.
    fn start_transaction(&self, command: &[u8]) -> Result<(), StateMachineError>;
    /// Applies the committed command at `index`; returns the client's result.
    fn apply(&mut self, index: Index, command: &[u8]) -> Result<Bytes, StateMachineError>;
    fn query(&self, query: &[u8]) -> Result<Bytes, StateMachineError>;
    /// Index of the last command applied (or restored).
    fn applied_index(&self) -> Index;
    fn snapshot(&self) -> SnapshotFiles;
    /// Replaces the state with a snapshot taken at `index`. `files` holds
    /// what [`Self::snapshot`] returned plus files of the server's own (the
    /// retry cache's); look yours up by name and ignore the rest.
    fn restore(
        &mut self,
        index: Index,
        files: &[(String, Vec<u8>)],
    ) -> Result<(), StateMachineError>;
}

/// A built-in state machine by name.
pub fn builtin(name: &str) -> Result<Box<dyn StateMachine>, StateMachineError> {
    match name {
        "" | "kv" => Ok(Box::new(Kv::default())),
        "counter" => Ok(Box::new(Counter::default())),
        other => Err(StateMachineError::Unknown(other.to_string())),
    }
}

fn malformed(what: &'static str, e: impl std::fmt::Display) -> StateMachineError {
    StateMachineError::Malformed {
        what,
        reason: e.to_string(),
    }
}

fn file<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> Result<&'a [u8], StateMachineError> {
    files
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, d)| d.as_slice())
        .ok_or_else(|| StateMachineError::BadSnapshot(format!("file {name:?} is missing")))
}

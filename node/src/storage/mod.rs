//! Durable storage of one group: the segmented log, the metadata file (term,
//! vote, initial membership), snapshots, and the worker that group-commits
//! writes.
//!
//! What storage must never do: acknowledge (report durable) anything not
//! fsynced; silently repair damage that could hide committed entries; or let
//! a purge overtake an earlier write (see `RaftCore::compact`).
//!
//! Every file operation goes through the [`fs::FileSystem`] seam, so tests
//! can inject full disks and failing fsyncs; the on-disk format lives in
//! [`format`] alone.

pub mod format;
pub mod fs;
mod group;
mod log;
mod mem;
mod meta;
mod snapshot;
pub mod testing;
mod worker;

use std::io;
use std::path::{Path, PathBuf};

pub use group::{GroupStorageOptions, RecoveredGroup, open_group};
pub use log::{LogOptions, SegmentedLog};
pub use mem::MemLog;
pub use meta::{Meta, MetaStore};
pub use snapshot::{SnapshotInfo, SnapshotStore, SnapshotWriter};
pub use worker::{Completion, LogPool, LogWorker, SyncObserver, WorkerState, WriteBatch};

use crate::core::{Entry, Index, Term};

/// What every log implementation offers; `testing::conformance` checks it.
pub trait LogStore {
    /// First index still held (one past what was purged).
    fn first_index(&self) -> Index;
    /// Last index held; `first_index() - 1` when empty.
    fn last_index(&self) -> Index;
    fn term(&self, index: Index) -> Option<Term>;
    /// Entries `lo..=hi`, all of them or an error.
    fn entries(&self, lo: Index, hi: Index) -> Result<Vec<Entry>, StorageError>;
    /// Appends contiguous entries; an overlap with the log truncates it from
    /// the first overlapping index first. Not durable until `sync`.
    ///
    /// A failed append (a full disk) may have taken some of the entries:
    /// retry the whole call. Appends are idempotent, since an overlap
    /// truncates first.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError>;
    /// Makes every appended entry durable; returns the last index.
    fn sync(&mut self) -> Result<Index, StorageError>;
    /// Drops entries from `from` on (a conflicting suffix).
    fn truncate(&mut self, from: Index) -> Result<(), StorageError>;
    /// Drops whole segments holding only entries up to `upto` (covered by a
    /// snapshot); may keep some of them.
    fn purge(&mut self, upto: Index) -> Result<(), StorageError>;
    /// Drops everything; the log continues after `base` (an installed
    /// snapshot that did not match the log).
    fn reset(&mut self, base: Index) -> Result<(), StorageError>;
}

/// The common start of every `append`: an overlap truncates the log from
/// `first` on, then `first` must follow the last entry.
pub(crate) fn prepare_append<L: LogStore + ?Sized>(
    log: &mut L,
    first: Index,
) -> Result<(), StorageError> {
    if first <= log.last_index() {
        log.truncate(first)?;
    }
    if first != log.last_index() + 1 {
        return Err(StorageError::NotContiguous {
            last: log.last_index(),
            first,
        });
    }
    Ok(())
}

/// The error for entries `lo..=hi` that `log` does not hold.
pub(crate) fn unavailable<L: LogStore + ?Sized>(log: &L, lo: Index, hi: Index) -> StorageError {
    StorageError::Unavailable {
        lo,
        hi,
        first: log.first_index(),
        last: log.last_index(),
    }
}

/// A storage failure. Corruption names the file and byte offset and says
/// what the operator can do.
///
/// The operating system's error is part of the message, not a `source`:
/// a printer of the whole chain (`{:#}`) would repeat it.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {}: {error}{}", path.display(), io_hint(error))]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error(
        "{} is corrupt at byte {offset}: {reason}. The member cannot start safely: replace it from \
         its healthy peers (move its data directory aside, start it empty, `kuberaft peer remove \
         --id <its old id>`, then `kuberaft peer add --address <its address>`)",
        file.display()
    )]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "log entries are missing: expected a segment starting at {expected} but {} starts at {found}. \
         A segment file was deleted or moved; restore it, or replace this member",
        file.display()
    )]
    Gap {
        file: PathBuf,
        expected: Index,
        found: Index,
    },
    #[error("entries {lo}..={hi} are not in the log (it holds {first}..={last})")]
    Unavailable {
        lo: Index,
        hi: Index,
        first: Index,
        last: Index,
    },
    #[error("append starting at {first} does not follow the last entry {last}")]
    NotContiguous { last: Index, first: Index },
    #[error(
        "entry {index} is {bytes} bytes, over the {} byte record limit",
        format::MAX_RECORD_LEN
    )]
    TooLarge { index: Index, bytes: usize },
    #[error("storage stopped after a failed fsync: {0}")]
    Poisoned(String),
    #[error("{} is corrupt: {reason}. The term and vote it held cannot be trusted: delete this member's data \
             directory and add it back under a new member id", file.display())]
    CorruptMeta { file: PathBuf, reason: String },
}

impl StorageError {
    pub fn io(op: &'static str, path: &Path, error: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.to_path_buf(),
            error,
        }
    }

    /// A full disk: writes can resume once space is freed.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StorageError::Io { error, .. } if error.kind() == io::ErrorKind::StorageFull)
    }
}

fn io_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::StorageFull => " (free disk space; writes resume by themselves)",
        io::ErrorKind::PermissionDenied => " (check the data directory's owner and permissions)",
        _ => "",
    }
}

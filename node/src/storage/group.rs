//! Opening one group's storage: what a restart reads, in order.
//!
//! Layout of a group directory: `raft-meta` (term, vote, initial
//! membership), `log/` (segments), `snapshots/`.
//!
//! On open: the metadata (absent for a brand-new member), the newest valid
//! snapshot, then the log after it. If the log does not continue the snapshot
//! — it holds another term at the snapshot's index (a snapshot from the
//! leader was published but the crash came before the log was reset), or it
//! ends before the snapshot — the log is reset to the snapshot, which covers
//! everything committed up to there. A log that starts after the snapshot is
//! missing entries: an error.

use std::path::Path;
use std::sync::Arc;

use super::fs::FileSystem;
use super::snapshot::{SnapshotInfo, SnapshotStore};
use super::{LogOptions, LogStore, Meta, MetaStore, SegmentedLog, StorageError};
use crate::core::{Entry, SnapshotMeta};

#[derive(Clone, Debug)]
pub struct GroupStorageOptions {
    pub log: LogOptions,
    /// Snapshots kept on disk (the newest ones).
    pub snapshots_retained: usize,
}

impl Default for GroupStorageOptions {
    fn default() -> Self {
        GroupStorageOptions {
            log: LogOptions::default(),
            snapshots_retained: 2,
        }
    }
}

/// Everything a group needs to restart its core and state machine.
#[derive(Debug)]
pub struct RecoveredGroup {
    pub meta: Meta,
    /// The newest snapshot, or index 0 carrying the initial membership.
    pub snapshot: SnapshotMeta,
    pub snapshot_info: Option<SnapshotInfo>,
    /// Log entries after the snapshot.
    pub entries: Vec<Entry>,
    pub log: SegmentedLog,
    pub meta_store: MetaStore,
    pub snapshots: SnapshotStore,
}

pub fn open_group(
    fs: Arc<dyn FileSystem>,
    dir: &Path,
    opts: &GroupStorageOptions,
) -> Result<RecoveredGroup, StorageError> {
    fs.create_dir_all(dir)
        .map_err(|e| StorageError::io("create group directory", dir, e))?;
    let meta_store = MetaStore::new(fs.clone(), dir);
    let meta = meta_store.load()?.unwrap_or_default();
    let snapshots =
        SnapshotStore::open(fs.clone(), &dir.join("snapshots"), opts.snapshots_retained)?;
    let snapshot_info = snapshots.latest()?;
    let snapshot = match &snapshot_info {
        Some(info) => info.meta.clone(),
        None => SnapshotMeta {
            index: 0,
            term: 0,
            membership: meta.initial_membership.clone(),
        },
    };
    let log_dir = dir.join("log");
    let mut log = SegmentedLog::open(fs.clone(), &log_dir, opts.log.clone(), snapshot.index)?;
    let continues = match log.term(snapshot.index) {
        Some(t) => t == snapshot.term,
        None if log.last_index() <= snapshot.index => false,
        None if log.first_index() == snapshot.index + 1 => true,
        None => {
            return Err(StorageError::Gap {
                file: log_dir,
                expected: snapshot.index + 1,
                found: log.first_index(),
            });
        }
    };
    if !continues {
        if log.last_index() >= log.first_index() {
            tracing::warn!(
                snapshot = snapshot.index,
                "the log does not continue the snapshot; resetting it"
            );
        }
        log.reset(snapshot.index)?;
    }
    let entries = if log.last_index() > snapshot.index {
        log.entries(snapshot.index + 1, log.last_index())?
    } else {
        Vec::new()
    };
    Ok(RecoveredGroup {
        meta,
        snapshot,
        snapshot_info,
        entries,
        log,
        meta_store,
        snapshots,
    })
}

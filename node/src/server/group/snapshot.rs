//! Snapshots: taking one of the state machine (then compacting the core and
//! queueing the log purge behind earlier writes), streaming the latest one to
//! a follower, and storing one received from the leader. A received snapshot
//! is durable in the store before the core sees it; a failed send makes the
//! core probe that follower again.
//!
//! Every file operation runs on a blocking thread, never on the group's
//! task: a large snapshot and its fsyncs would otherwise stop heartbeats and
//! replies for as long as they take. The result comes back to the task as a
//! [`SnapshotIo`], handled by [`Group::snapshot_io_done`]. One of each kind
//! runs at a time.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{AdminError, AdminResult, Group, KIND_INSTALL, ReplyPath};
use crate::core::{
    Index, InstallSnapshot, InstallSnapshotReply, Message, NodeId, SnapshotMeta, Term,
};
use crate::statemachine::SnapshotFiles;
use crate::storage::{SnapshotInfo, SnapshotStore, StorageError, WriteBatch};

/// After a failed automatic snapshot, how long until the next try.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);

/// Snapshot file work done off the group's task, back with its outcome.
#[derive(Debug)]
pub(super) enum SnapshotIo {
    /// This member's own snapshot at `index` is written (or not).
    Taken {
        index: Index,
        /// The group's applied bytes when the snapshot was copied.
        bytes_at: u64,
        result: Result<(), String>,
    },
    /// A snapshot from the leader is stored (or not); the core has not seen
    /// it yet.
    Received {
        from: NodeId,
        term: Term,
        meta: SnapshotMeta,
        files: SnapshotFiles,
        reply: oneshot::Sender<Message>,
        result: Result<(), String>,
    },
    /// The newest snapshot is read, to be streamed to `to` by the leader of
    /// `term`.
    Loaded {
        to: NodeId,
        term: Term,
        result: Result<Option<(SnapshotInfo, SnapshotFiles)>, String>,
    },
}

impl Group {
    /// Runs `work` on a blocking thread; its outcome comes back to the task.
    fn off_task(&self, work: impl FnOnce(&SnapshotStore) -> SnapshotIo + Send + 'static) {
        let store = self.snapshots.clone();
        let done = self.snapshot_io.clone();
        tokio::task::spawn_blocking(move || {
            // The group may have stopped meanwhile; nobody to tell then.
            let _ = done.send(work(&store));
        });
    }

    pub(super) fn snapshot_io_done(&mut self, io: SnapshotIo) {
        match io {
            SnapshotIo::Taken {
                index,
                bytes_at,
                result,
            } => self.snapshot_written(index, bytes_at, result),
            SnapshotIo::Received {
                from,
                term,
                meta,
                files,
                reply,
                result,
            } => self.snapshot_received(from, term, meta, files, reply, result),
            SnapshotIo::Loaded { to, term, result } => self.snapshot_loaded(to, term, result),
        }
    }

    pub(super) fn install_snapshot(
        &mut self,
        from: NodeId,
        term: Term,
        meta: SnapshotMeta,
        files: SnapshotFiles,
        reply: oneshot::Sender<Message>,
    ) {
        if term < self.core.term() || meta.index <= self.core.log().committed() {
            // Stale, or already covered: the core answers without
            // installing; nothing to write.
            self.step(from, install_msg(term, meta), ReplyPath::Once(reply));
            return;
        }
        if self.receiving || self.incoming.is_some() {
            // One install at a time: a second one would overwrite the first
            // before the core installed it. Refused; the leader probes this
            // member again and sends the newest.
            tracing::warn!(group = %self.label.group, from, index = meta.index, "a snapshot install is already under way; refusing another");
            return self.refuse_install(reply);
        }
        self.receiving = true;
        self.off_task(move |store| {
            let result = guarded(|| write_snapshot(store, meta.clone(), &files));
            SnapshotIo::Received {
                from,
                term,
                meta,
                files,
                reply,
                result,
            }
        });
    }

    /// A snapshot from the leader is durable in the store: now the core may
    /// install it, if it still wants it (the term or the commit index may
    /// have moved on while it was written).
    fn snapshot_received(
        &mut self,
        from: NodeId,
        term: Term,
        meta: SnapshotMeta,
        files: SnapshotFiles,
        reply: oneshot::Sender<Message>,
        result: Result<(), String>,
    ) {
        self.receiving = false;
        if let Err(e) = result {
            tracing::warn!(group = %self.label.group, error = %e, "could not store a snapshot from the leader");
            return self.refuse_install(reply);
        }
        if term < self.core.term() || meta.index <= self.core.log().committed() {
            self.step(from, install_msg(term, meta), ReplyPath::Once(reply));
            return;
        }
        let keep = self.core.log().term(meta.index) == Some(meta.term);
        self.incoming = Some((meta.clone(), files, keep));
        self.once.insert((from, KIND_INSTALL, 0), reply);
        self.core.step(from, install_msg(term, meta));
    }

    /// Answers the leader that this snapshot was not installed; it probes
    /// this member again and sends the newest one.
    fn refuse_install(&self, reply: oneshot::Sender<Message>) {
        let _ = reply.send(Message::InstallSnapshotReply(InstallSnapshotReply {
            term: self.core.term(),
            snapshot_index: 0,
            accepted: false,
        }));
    }

    /// The core asked for a snapshot to be streamed to `to`: read the newest
    /// one off the task, then hand it to the transport.
    pub(super) fn send_snapshot(&mut self, to: NodeId) {
        if !self.sending_snapshot.insert(to) {
            return;
        }
        let term = self.core.term();
        self.off_task(move |store| {
            let result = guarded(|| load_latest(store));
            SnapshotIo::Loaded { to, term, result }
        });
    }

    fn snapshot_loaded(
        &mut self,
        to: NodeId,
        term: Term,
        result: Result<Option<(SnapshotInfo, SnapshotFiles)>, String>,
    ) {
        let still_leading =
            self.core.role() == crate::core::Role::Leader && self.core.term() == term;
        match result {
            // Only in the term it was asked for: sent in a later one, by a
            // member no longer leading, it would make the follower take
            // that member for its leader.
            Ok(Some((info, files))) if still_leading => {
                let install = InstallSnapshot {
                    term,
                    meta: info.meta,
                };
                self.transport.send_snapshot(&self.id, to, install, files);
            }
            Ok(Some(_)) => {
                tracing::debug!(group = %self.label.group, to, "no longer leading in the term the snapshot was asked for; not sent");
                self.sending_snapshot.remove(&to);
                self.core.report_snapshot_failure(to);
            }
            other => {
                tracing::warn!(group = %self.label.group, to, result = ?other.err(), "no snapshot to send");
                self.sending_snapshot.remove(&to);
                self.core.report_snapshot_failure(to);
            }
        }
    }

    /// Snapshots the state machine at the applied index; the files are
    /// written off the task and [`Self::snapshot_written`] finishes the job.
    pub(super) fn take_snapshot(&mut self, waiter: Option<oneshot::Sender<AdminResult>>) {
        let index = self.applier.applied_index();
        if index <= self.last_snapshot {
            if let Some(w) = waiter {
                let _ = w.send(Ok(self.last_snapshot));
            }
            return;
        }
        self.snapshot_waiters.extend(waiter);
        if self.snapshot_writing.is_some() {
            return;
        }
        let Some(meta) = self.core.snapshot_meta(index) else {
            self.snapshot_finished(Err(format!("index {index} is not in the log")));
            return;
        };
        // The state is copied here, in order with the applied entries; only
        // the writing leaves the task.
        let files = self.applier.snapshot();
        self.snapshot_writing = Some(index);
        let bytes_at = self.applied_bytes;
        self.off_task(move |store| {
            let result = guarded(|| write_snapshot(store, meta, &files))
                .map_err(|e| format!("writing snapshot at {index}: {e}"));
            SnapshotIo::Taken {
                index,
                bytes_at,
                result,
            }
        });
    }

    /// This member's snapshot is durable: entries up to it may go from the
    /// core, and the log purge is queued behind earlier writes.
    fn snapshot_written(&mut self, index: Index, bytes_at: u64, result: Result<(), String>) {
        self.snapshot_writing = None;
        if let Err(e) = result {
            return self.snapshot_finished(Err(e));
        }
        // A snapshot installed from the leader meanwhile may be newer.
        if index > self.last_snapshot {
            self.last_snapshot = index;
            self.applied_bytes_at_snapshot = bytes_at;
            self.core.compact(index);
            if let Some(worker) = &self.worker {
                worker.submit(WriteBatch {
                    ready: self.last_submitted,
                    purge_to: Some(index),
                    ..Default::default()
                });
            }
            tracing::info!(group = %self.label.group, index, "snapshot taken");
        }
        self.snapshot_finished(Ok(self.last_snapshot));
    }

    fn snapshot_finished(&mut self, result: Result<Index, String>) {
        match &result {
            Ok(_) => self.snapshot_retry_at = None,
            Err(e) => {
                // Not again after every batch: a full disk stays full for a
                // while.
                self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
                tracing::warn!(group = %self.label.group, error = %e, "snapshot failed; an automatic one is retried in a second");
            }
        }
        for w in self.snapshot_waiters.drain(..) {
            let _ = w.send(result.clone().map_err(AdminError::Failed));
        }
    }
}

/// Runs file work, turning a panic into an error: the task waiting for the
/// outcome must hear of it, or it would wait (and refuse installs) forever.
fn guarded<T>(work: impl FnOnce() -> Result<T, StorageError>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("snapshot file work panicked (see the log)".to_string()),
    }
}

fn load_latest(
    store: &SnapshotStore,
) -> Result<Option<(SnapshotInfo, SnapshotFiles)>, StorageError> {
    let Some(info) = store.latest()? else {
        return Ok(None);
    };
    let files = read_snapshot_files(store, &info)?;
    Ok(Some((info, files)))
}

fn write_snapshot(
    store: &SnapshotStore,
    meta: SnapshotMeta,
    files: &SnapshotFiles,
) -> Result<(), StorageError> {
    let mut w = store.begin(meta)?;
    for (name, data) in files {
        w.write_chunk(name, 0, data)?;
    }
    w.finish()?;
    Ok(())
}

pub(super) fn read_snapshot_files(
    store: &SnapshotStore,
    info: &SnapshotInfo,
) -> Result<SnapshotFiles, StorageError> {
    info.files
        .iter()
        .map(|(name, _, _)| Ok((name.clone(), store.read_file(info, name)?)))
        .collect()
}

fn install_msg(term: Term, meta: SnapshotMeta) -> Message {
    Message::InstallSnapshot(InstallSnapshot { term, meta })
}

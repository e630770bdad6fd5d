//! Snapshots: taking one of the state machine (then compacting the core and
//! queueing the log purge behind earlier writes), streaming the latest one to
//! a follower, and storing one received from the leader. A received snapshot
//! is durable in the store before the core sees it; a failed send makes the
//! core probe that follower again.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{AdminError, AdminResult, Group, KIND_INSTALL, ReplyPath, blocking};
use crate::statemachine::SnapshotFiles;

/// After a failed automatic snapshot, how long until the next try.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);
use crate::core::{
    Index, InstallSnapshot, InstallSnapshotReply, Message, NodeId, SnapshotMeta, Term,
};
use crate::storage::{SnapshotInfo, SnapshotStore, WriteBatch};

impl Group {
    pub(super) fn install_snapshot(
        &mut self,
        from: NodeId,
        term: Term,
        meta: SnapshotMeta,
        files: Vec<(String, Vec<u8>)>,
        reply: oneshot::Sender<Message>,
    ) {
        if term < self.core.term() || meta.index <= self.core.log().committed() {
            // Stale, or already covered: the core answers without
            // installing; nothing to write.
            self.step(from, install_msg(term, meta), ReplyPath::Once(reply));
            return;
        }
        if self.incoming.is_some() {
            // One install at a time: a second one in the same batch would
            // overwrite the first before the core installed it. Refused;
            // the leader sends the newest again.
            tracing::warn!(group = %self.label.group, from, index = meta.index, "a snapshot install is already under way; refusing another");
            return self.refuse_install(reply);
        }
        let keep = self.core.log().term(meta.index) == Some(meta.term);
        let written = blocking(|| -> Result<(), crate::storage::StorageError> {
            let mut w = self.snapshots.begin(meta.clone())?;
            for (name, data) in &files {
                w.write_chunk(name, 0, data)?;
            }
            w.finish()?;
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!(group = %self.label.group, error = %e, "could not store a snapshot from the leader");
            return self.refuse_install(reply);
        }
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

    pub(super) fn send_snapshot(&mut self, to: NodeId) {
        if !self.sending_snapshot.insert(to) {
            return;
        }
        let loaded = blocking(|| -> Result<_, crate::storage::StorageError> {
            let Some(info) = self.snapshots.latest()? else {
                return Ok(None);
            };
            let files = read_snapshot_files(&self.snapshots, &info)?;
            Ok(Some((info, files)))
        });
        match loaded {
            Ok(Some((info, files))) => {
                let install = InstallSnapshot {
                    term: self.core.term(),
                    meta: info.meta,
                };
                self.transport.send_snapshot(&self.id, to, install, files);
            }
            other => {
                tracing::warn!(group = %self.label.group, to, result = ?other.err(), "no snapshot to send");
                self.sending_snapshot.remove(&to);
                self.core.report_snapshot_failure(to);
            }
        }
    }

    /// Snapshots the state machine at the applied index. The files are
    /// written on a blocking thread, never on this task: a large snapshot
    /// and its fsyncs would otherwise stop heartbeats and replies for as
    /// long as they take. [`Self::snapshot_written`] finishes the job.
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
        let store = self.snapshots.clone();
        let done = self.snapshot_written.clone();
        tokio::task::spawn_blocking(move || {
            let result = write_snapshot(&store, meta, &files)
                .map_err(|e| format!("writing snapshot at {index}: {e}"));
            // The group may have stopped meanwhile; nobody to tell then.
            let _ = done.send(Written { index, result });
        });
    }

    /// A snapshot written off the task is durable: entries up to it may go
    /// from the core, and the log purge is queued behind earlier writes.
    pub(super) fn snapshot_written(&mut self, w: Written) {
        self.snapshot_writing = None;
        if let Err(e) = w.result {
            return self.snapshot_finished(Err(e));
        }
        // A snapshot installed from the leader meanwhile may be newer.
        if w.index > self.last_snapshot {
            self.last_snapshot = w.index;
            self.core.compact(w.index);
            if let Some(worker) = &self.worker {
                worker.submit(WriteBatch {
                    ready: self.last_submitted,
                    purge_to: Some(w.index),
                    ..Default::default()
                });
            }
            tracing::info!(group = %self.label.group, index = w.index, "snapshot taken");
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

/// A snapshot written off the group's task, and how that went.
#[derive(Debug)]
pub(super) struct Written {
    index: Index,
    result: Result<(), String>,
}

fn write_snapshot(
    store: &SnapshotStore,
    meta: SnapshotMeta,
    files: &SnapshotFiles,
) -> Result<(), crate::storage::StorageError> {
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
) -> Result<Vec<(String, Vec<u8>)>, crate::storage::StorageError> {
    info.files
        .iter()
        .map(|(name, _, _)| Ok((name.clone(), store.read_file(info, name)?)))
        .collect()
}

fn install_msg(term: Term, meta: SnapshotMeta) -> Message {
    Message::InstallSnapshot(InstallSnapshot { term, meta })
}

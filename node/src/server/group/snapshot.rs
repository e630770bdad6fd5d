//! Snapshots: taking one of the state machine (then compacting the core and
//! queueing the log purge behind earlier writes), streaming the latest one to
//! a follower, and storing one received from the leader. A received snapshot
//! is durable in the store before the core sees it; a failed send makes the
//! core probe that follower again.

use tokio::sync::oneshot;

use super::{Group, KIND_INSTALL, ReplyPath, blocking};
use crate::core::{Index, InstallSnapshot, Message, NodeId, SnapshotMeta, Term};
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
            let _ = reply.send(Message::InstallSnapshotReply(
                crate::core::InstallSnapshotReply {
                    term: self.core.term(),
                    snapshot_index: 0,
                    accepted: false,
                },
            ));
            return;
        }
        self.incoming = Some((meta.clone(), files, keep));
        self.once.insert((from, KIND_INSTALL, 0), reply);
        self.core.step(from, install_msg(term, meta));
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

    /// Snapshots the state machine at the applied index and queues the log
    /// purge behind earlier writes.
    pub(super) fn take_snapshot(&mut self) -> Result<Index, String> {
        let index = self.applier.applied_index();
        if index <= self.last_snapshot {
            return Ok(self.last_snapshot);
        }
        let meta = self
            .core
            .snapshot_meta(index)
            .ok_or_else(|| format!("index {index} is not in the log"))?;
        let files = self.applier.snapshot();
        blocking(|| -> Result<(), crate::storage::StorageError> {
            let mut w = self.snapshots.begin(meta)?;
            for (name, data) in &files {
                w.write_chunk(name, 0, data)?;
            }
            w.finish()?;
            Ok(())
        })
        .map_err(|e| format!("writing snapshot at {index}: {e}"))?;
        self.last_snapshot = index;
        self.core.compact(index);
        if let Some(w) = &self.worker {
            w.submit(WriteBatch {
                ready: self.last_submitted,
                purge_to: Some(index),
                ..Default::default()
            });
        }
        tracing::info!(group = %self.label.group, index, "snapshot taken");
        Ok(index)
    }
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

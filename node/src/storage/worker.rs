//! The log worker: group commit for one group's log.
//!
//! The group's owner task hands over the persistence part of each `Ready` as
//! a [`WriteBatch`] and goes on; a dedicated thread takes every batch queued
//! by the time it is free, writes them all, makes them durable with **one**
//! fsync, then reports each batch durable in order ([`Completion::Durable`]),
//! which the owner turns into `RaftCore::on_persisted`. Under load, many
//! client requests share one fdatasync.
//!
//! Nothing is reported durable before its fsync returned. When a write fails
//! for lack of space, the batches stay queued, `Completion::Unhealthy` says
//! why, and the worker retries (on the next batch or every `retry_interval`)
//! until space returns; the retry rewrites the same entries, which appends
//! allow. A failed fsync poisons the log (see `log.rs`): the worker reports
//! `Completion::Failed` and the group must be restarted.
//!
//! A blocking thread rather than a tokio task: fsync blocks for its whole
//! duration and must not stall a runtime worker.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{LogStore, Meta, MetaStore, SegmentedLog, StorageError};
use crate::core::{Entry, EntryPayload, HardState, Index};

/// What one Ready asks storage to make durable, in this order: reset the log
/// (an installed snapshot that did not match it) or purge it up to the
/// snapshot (one that did), write the hard state, append the entries; after
/// the fsync, purge up to a local snapshot.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    /// The Ready's number, reported back when durable.
    pub ready: u64,
    pub reset_to: Option<Index>,
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    /// Drop segments covered by a snapshot up to here. Queued like any write
    /// so that it never overtakes an earlier truncation (see
    /// `RaftCore::compact`).
    pub purge_to: Option<Index>,
}

impl WriteBatch {
    /// Whether there is anything to write.
    pub fn is_empty(&self) -> bool {
        self.reset_to.is_none()
            && self.hard_state.is_none()
            && self.entries.is_empty()
            && self.purge_to.is_none()
    }
}

/// Told how long each group fsync took (for latency histograms).
pub struct SyncObserver(pub Box<dyn FnMut(std::time::Duration) + Send>);

impl std::fmt::Debug for SyncObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncObserver")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Everything of Ready `ready` (and all before it) is durable; the log
    /// ends at `last_index`.
    Durable { ready: u64, last_index: Index },
    /// Writes are failing and will be retried; nothing new is durable.
    Unhealthy { reason: String, no_space: bool },
    /// Writes succeed again after being unhealthy.
    Healthy,
    /// Storage cannot continue; restart the group.
    Failed { reason: String },
}

enum Msg {
    Write(WriteBatch),
    Stop,
}

/// Owns the log and the metadata file on a thread of its own.
#[derive(Debug)]
pub struct LogWorker {
    tx: Sender<Msg>,
    handle: Option<JoinHandle<SegmentedLog>>,
}

/// The worker's state, also usable without a thread (tests, tools).
#[derive(Debug)]
pub struct WorkerState {
    pub log: SegmentedLog,
    pub meta_store: MetaStore,
    pub meta: Meta,
    pending: Vec<WriteBatch>,
    unhealthy: bool,
    pub on_sync: Option<SyncObserver>,
}

impl WorkerState {
    pub fn new(log: SegmentedLog, meta_store: MetaStore, meta: Meta) -> Self {
        WorkerState {
            log,
            meta_store,
            meta,
            pending: Vec::new(),
            unhealthy: false,
            on_sync: None,
        }
    }

    /// Writes every pending batch plus `batches` with one log fsync (and at
    /// most one metadata write), and says what happened.
    pub fn commit_group(&mut self, batches: Vec<WriteBatch>) -> Vec<Completion> {
        self.pending.extend(batches);
        if self.pending.is_empty() {
            return Vec::new();
        }
        match self.write_pending() {
            Ok(last_index) => {
                let mut out = Vec::new();
                if std::mem::take(&mut self.unhealthy) {
                    out.push(Completion::Healthy);
                }
                let ready = self.pending.last().expect("not empty").ready;
                self.pending.clear();
                out.push(Completion::Durable { ready, last_index });
                out
            }
            Err(e @ StorageError::Poisoned(_)) | Err(e @ StorageError::CorruptMeta { .. }) => {
                vec![Completion::Failed {
                    reason: e.to_string(),
                }]
            }
            Err(e) if matches!(e, StorageError::Io { op: "fsync", .. }) => {
                vec![Completion::Failed {
                    reason: e.to_string(),
                }]
            }
            Err(e) => {
                self.unhealthy = true;
                vec![Completion::Unhealthy {
                    no_space: e.is_no_space(),
                    reason: e.to_string(),
                }]
            }
        }
    }

    fn write_pending(&mut self) -> Result<Index, StorageError> {
        let mut meta_dirty = false;
        for b in &self.pending {
            if let Some(base) = b.reset_to {
                self.log.reset(base)?;
            }
            if let Some(hs) = b.hard_state {
                self.meta.hard_state = hs;
                meta_dirty = true;
            }
            let newest_membership = b.entries.iter().rev().find_map(|e| match &e.payload {
                EntryPayload::Membership(m) => Some((e.index, m.clone())),
                _ => None,
            });
            if newest_membership.is_some() {
                self.meta.latest_membership = newest_membership;
                meta_dirty = true;
            }
            self.log.append(&b.entries)?;
        }
        // The hard state of the whole group in one atomic write; it must be
        // durable before any message of these Readies leaves, which the
        // caller guarantees by waiting for `Durable`.
        if meta_dirty {
            self.meta_store.store(&self.meta)?;
        }
        let started = std::time::Instant::now();
        let last = self.log.sync()?;
        if let Some(SyncObserver(observe)) = &mut self.on_sync {
            observe(started.elapsed());
        }
        if let Some(upto) = self.pending.iter().filter_map(|b| b.purge_to).max() {
            self.log.purge(upto)?;
        }
        Ok(last)
    }
}

impl LogWorker {
    /// Starts the worker thread; `on_complete` runs on that thread.
    pub fn spawn(
        mut state: WorkerState,
        retry_interval: Duration,
        mut on_complete: impl FnMut(Completion) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx): (Sender<Msg>, Receiver<Msg>) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("kuberaft-log".into())
            .spawn(move || {
                let mut stop = false;
                while !stop {
                    let first = if state.pending.is_empty() {
                        rx.recv().ok()
                    } else {
                        match rx.recv_timeout(retry_interval) {
                            Ok(m) => Some(m),
                            Err(RecvTimeoutError::Timeout) => None,
                            Err(RecvTimeoutError::Disconnected) => Some(Msg::Stop),
                        }
                    };
                    let mut batches = Vec::new();
                    for m in first
                        .into_iter()
                        .chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    {
                        match m {
                            Msg::Write(b) => batches.push(b),
                            Msg::Stop => stop = true,
                        }
                    }
                    if first_is_disconnect(&batches, stop, &state) {
                        break;
                    }
                    for c in state.commit_group(batches) {
                        let failed = matches!(c, Completion::Failed { .. });
                        on_complete(c);
                        if failed {
                            return state.log;
                        }
                    }
                }
                state.log
            })?;
        Ok(LogWorker {
            tx,
            handle: Some(handle),
        })
    }

    /// Queues a batch. Batches are made durable in the order submitted.
    pub fn submit(&self, batch: WriteBatch) {
        // The worker only goes away after `stop` or a fatal failure, which
        // was reported through `Completion::Failed`.
        let _ = self.tx.send(Msg::Write(batch));
    }

    /// Writes what is queued, stops the thread and hands the log back.
    pub fn stop(mut self) -> Option<SegmentedLog> {
        let _ = self.tx.send(Msg::Stop);
        self.handle.take().and_then(|h| h.join().ok())
    }
}

impl Drop for LogWorker {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Stop right away only if there is nothing to write.
fn first_is_disconnect(batches: &[WriteBatch], stop: bool, state: &WorkerState) -> bool {
    stop && batches.is_empty() && state.pending.is_empty()
}

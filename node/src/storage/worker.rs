//! The log worker: group commit for one group's log.
//!
//! The group's owner task hands over the persistence part of each `Ready` as
//! a [`WriteBatch`] and goes on; a log thread takes every batch queued by the
//! time it gets to the log, writes them all, makes them durable with **one**
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
//! Blocking threads rather than tokio tasks: fsync blocks for its whole
//! duration and must not stall a runtime worker. The threads are a
//! [`LogPool`] the node's groups share: one log is written by one thread at a
//! time, so its batches stay in order.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{LogStore, Meta, MetaStore, SegmentedLog, StorageError};
use crate::core::{Entry, EntryPayload, Fetch, HardState, Index};

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
    /// Read compacted entries for a follower once everything before is
    /// written (see `RaftCore::fetched`); answered with
    /// [`Completion::Fetched`]. Queued like a write, so every write queued
    /// before it is done, and so is every purge queued before it (one
    /// queued after it but handled in the same group may be too: the read
    /// then finds nothing and the follower gets the snapshot).
    pub fetch: Option<Fetch>,
}

impl WriteBatch {
    /// Whether there is anything to write.
    pub fn is_empty(&self) -> bool {
        self.reset_to.is_none()
            && self.hard_state.is_none()
            && self.entries.is_empty()
            && self.purge_to.is_none()
            && self.fetch.is_none()
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
    /// A fetch's entries from `fetch.prev` on, or `None` when the log no
    /// longer holds them (purged) or could not read them.
    Fetched {
        fetch: Fetch,
        entries: Option<Vec<Entry>>,
    },
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
                out.push(Completion::Durable { ready, last_index });
                for fetch in self.pending.drain(..).filter_map(|b| b.fetch) {
                    // Entry 0 is never stored: a follower with nothing reads
                    // from the first entry (its previous term is 0).
                    let lo = fetch.prev.max(1);
                    let entries = self.log.read_bounded(lo, fetch.hi, fetch.max_bytes);
                    match &entries {
                        Err(e @ StorageError::Unavailable { .. }) => {
                            tracing::debug!(error = %e, ?fetch, "a fetch found its entries purged; the follower gets the snapshot");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, ?fetch, "reading committed entries for a follower failed; it gets the snapshot");
                        }
                        Ok(_) => {}
                    }
                    out.push(Completion::Fetched {
                        fetch,
                        entries: entries.ok(),
                    });
                }
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
        // Fetches alone write nothing: every batch before them is durable
        // already (batches are handled in order), so no fsync is owed.
        let writes = self.pending.iter().any(|b| {
            b.reset_to.is_some()
                || b.hard_state.is_some()
                || !b.entries.is_empty()
                || b.purge_to.is_some()
        });
        if !writes {
            return Ok(self.log.last_index());
        }
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

/// Threads that run the logs of many groups: a group's batches are written
/// by one thread at a time, in order, while different groups' fsyncs run on
/// different threads. A node hosting a thousand groups needs a handful of
/// threads, not a thousand (each with a stack and a wakeup of its own).
#[derive(Clone, Debug)]
pub struct LogPool {
    inner: Arc<PoolInner>,
    /// When the last handle goes, the threads end.
    _alive: Arc<PoolAlive>,
}

#[derive(Debug, Default)]
struct PoolInner {
    queue: Mutex<RunQueue>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct RunQueue {
    ready: VecDeque<Arc<Slot>>,
    /// Logs whose writes failed for lack of space, retried at the instant.
    retries: Vec<(Instant, Arc<Slot>)>,
    closed: bool,
}

#[derive(Debug)]
struct PoolAlive(Arc<PoolInner>);

impl Drop for PoolAlive {
    fn drop(&mut self) {
        self.0.queue.lock().expect("pool lock").closed = true;
        self.0.wake.notify_all();
    }
}

impl LogPool {
    /// Starts `threads` log threads.
    pub fn new(threads: usize) -> std::io::Result<LogPool> {
        let inner = Arc::new(PoolInner::default());
        for i in 0..threads.max(1) {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("kuberaft-log-{i}"))
                .spawn(move || run_pool_thread(&inner))?;
        }
        Ok(LogPool {
            _alive: Arc::new(PoolAlive(inner.clone())),
            inner,
        })
    }

    fn schedule(&self, slot: Arc<Slot>) {
        self.inner
            .queue
            .lock()
            .expect("pool lock")
            .ready
            .push_back(slot);
        self.inner.wake.notify_one();
    }
}

/// One group's log in the pool.
struct Slot {
    /// Held by the thread writing it; `submit` never waits for it.
    work: Mutex<Work>,
    q: Mutex<SlotQueue>,
    /// Signalled when a run ends (for `stop`).
    idle: Condvar,
    retry_interval: Duration,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

struct Work {
    state: Option<WorkerState>,
    on_complete: Box<dyn FnMut(Completion) + Send>,
}

#[derive(Default)]
struct SlotQueue {
    batches: Vec<WriteBatch>,
    /// In the run queue, in the retry list or running.
    scheduled: bool,
    running: bool,
    /// Stopping or failed: the pool leaves it alone.
    closed: bool,
}

fn run_pool_thread(inner: &PoolInner) {
    loop {
        let slot = {
            let mut q = inner.queue.lock().expect("pool lock");
            loop {
                let now = Instant::now();
                let due: Vec<Arc<Slot>> = {
                    let (due, later) = q.retries.drain(..).partition(|(at, _)| *at <= now);
                    q.retries = later;
                    due.into_iter().map(|(_, s)| s).collect()
                };
                q.ready.extend(due);
                if let Some(s) = q.ready.pop_front() {
                    break s;
                }
                if q.closed {
                    return;
                }
                q = match q.retries.iter().map(|(at, _)| *at).min() {
                    Some(at) => {
                        let wait = at.saturating_duration_since(now);
                        inner.wake.wait_timeout(q, wait).expect("pool lock").0
                    }
                    None => inner.wake.wait(q).expect("pool lock"),
                };
            }
        };
        match run_slot(&slot) {
            Next::Idle => {}
            Next::Again => inner.queue.lock().expect("pool lock").ready.push_back(slot),
            Next::RetryAt(at) => inner
                .queue
                .lock()
                .expect("pool lock")
                .retries
                .push((at, slot)),
        }
    }
}

/// What a log needs after a run.
enum Next {
    /// Nothing until the next submit.
    Idle,
    /// More batches came meanwhile: back of the run queue.
    Again,
    /// A write failed for lack of space: try again then.
    RetryAt(Instant),
}

/// Writes what `slot` has queued with one fsync and says what it needs next.
fn run_slot(slot: &Arc<Slot>) -> Next {
    let batches = {
        let mut q = slot.q.lock().expect("slot lock");
        if q.closed {
            q.scheduled = false;
            slot.idle.notify_all();
            return Next::Idle;
        }
        q.running = true;
        std::mem::take(&mut q.batches)
    };
    let (failed, unhealthy) = {
        let mut w = slot.work.lock().expect("work lock");
        let Work { state, on_complete } = &mut *w;
        let state = state.as_mut().expect("a slot in the pool has its log");
        let mut failed = false;
        for c in state.commit_group(batches) {
            failed |= matches!(c, Completion::Failed { .. });
            on_complete(c);
        }
        (failed, !state.pending.is_empty())
    };
    let mut q = slot.q.lock().expect("slot lock");
    q.running = false;
    q.closed |= failed;
    let next = if q.closed {
        Next::Idle
    } else if !q.batches.is_empty() {
        Next::Again
    } else if unhealthy {
        Next::RetryAt(Instant::now() + slot.retry_interval)
    } else {
        Next::Idle
    };
    q.scheduled = !matches!(next, Next::Idle);
    slot.idle.notify_all();
    next
}

/// Owns one group's log and metadata file, written by a [`LogPool`].
#[derive(Debug)]
pub struct LogWorker {
    pool: LogPool,
    slot: Arc<Slot>,
    stopped: bool,
}

impl LogWorker {
    /// Runs the log on a pool of its own with one thread (tests, tools);
    /// `on_complete` runs on that thread.
    pub fn spawn(
        state: WorkerState,
        retry_interval: Duration,
        on_complete: impl FnMut(Completion) + Send + 'static,
    ) -> std::io::Result<Self> {
        Ok(Self::spawn_in(
            &LogPool::new(1)?,
            state,
            retry_interval,
            on_complete,
        ))
    }

    /// Runs the log on `pool`; `on_complete` runs on the pool's threads,
    /// for one log on one thread at a time.
    pub fn spawn_in(
        pool: &LogPool,
        state: WorkerState,
        retry_interval: Duration,
        on_complete: impl FnMut(Completion) + Send + 'static,
    ) -> Self {
        LogWorker {
            pool: pool.clone(),
            slot: Arc::new(Slot {
                work: Mutex::new(Work {
                    state: Some(state),
                    on_complete: Box::new(on_complete),
                }),
                q: Mutex::new(SlotQueue::default()),
                idle: Condvar::new(),
                retry_interval,
            }),
            stopped: false,
        }
    }

    /// Queues a batch. Batches are made durable in the order submitted.
    pub fn submit(&self, batch: WriteBatch) {
        let mut q = self.slot.q.lock().expect("slot lock");
        // A closed log failed (reported through `Completion::Failed`) or is
        // stopping.
        if q.closed {
            return;
        }
        q.batches.push(batch);
        if !q.scheduled {
            q.scheduled = true;
            drop(q);
            self.pool.schedule(self.slot.clone());
        }
    }

    /// Writes what is queued, stops and hands the log back.
    pub fn stop(mut self) -> Option<SegmentedLog> {
        self.finish()
    }

    fn finish(&mut self) -> Option<SegmentedLog> {
        if std::mem::replace(&mut self.stopped, true) {
            return None;
        }
        let (batches, failed) = {
            let mut q = self.slot.q.lock().expect("slot lock");
            let failed = q.closed;
            q.closed = true;
            // Wait out a run in progress; a slot waiting in a queue is
            // dropped by the pool when it comes up.
            while q.running {
                q = self.slot.idle.wait(q).expect("slot lock");
            }
            (std::mem::take(&mut q.batches), failed)
        };
        let mut w = self.slot.work.lock().expect("work lock");
        let Work { state, on_complete } = &mut *w;
        let mut state = state.take()?;
        // A failed log takes no more writes; it was reported once.
        if !failed && (!batches.is_empty() || !state.pending.is_empty()) {
            for c in state.commit_group(batches) {
                on_complete(c);
            }
        }
        Some(state.log)
    }
}

impl Drop for LogWorker {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

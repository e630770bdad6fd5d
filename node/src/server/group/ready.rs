//! Executing the core's Readies in the order `core/ready.rs` prescribes: the
//! writes go to the log worker as one batch, `persisted_messages` are held
//! until that batch is durable, committed entries are applied in order and
//! their writers answered (or told their entry was replaced). Then what
//! follows a batch: reads whose index is applied, watches, automatic
//! snapshots and newly learned addresses.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use kuberaft_proto::v1 as pb;

use super::{ClientError, Group, KIND_INSTALL, KIND_READ, KIND_VOTE, Served};
use crate::convert::append_reply_to_pb;
use crate::core::{Envelope, Event, Index, Message, NodeId, ReadError, Role};
use crate::storage::{Completion, WriteBatch};

type ClientResult2 = Result<(), ClientError>;

impl Group {
    pub(super) fn on_completion(&mut self, c: Completion) {
        match c {
            Completion::Durable { ready, .. } => {
                self.core.on_persisted(ready);
                self.last_durable = self.last_durable.max(ready);
                while let Some((n, at)) = self.submitted_at.front().copied() {
                    if n > ready {
                        break;
                    }
                    self.append_latency.observe(at.elapsed().as_secs_f64());
                    self.submitted_at.pop_front();
                }
                while self.held.front().is_some_and(|(n, _)| *n <= ready) {
                    let (_, msgs) = self.held.pop_front().expect("checked");
                    for env in msgs {
                        self.route(env);
                    }
                }
            }
            Completion::Unhealthy { reason, .. } => {
                tracing::error!(group = %self.label.group, %reason, "storage unhealthy; retrying");
                self.storage_error = Some(reason);
            }
            Completion::Healthy => {
                tracing::info!(group = %self.label.group, "storage healthy again");
                self.storage_error = None;
            }
            Completion::Failed { reason } => {
                tracing::error!(group = %self.label.group, %reason, "storage failed; stopping the group, restart the node");
                self.storage_error = Some(format!("{reason}; restart the node"));
                self.failed = true;
            }
            Completion::Fetched { fetch, entries } => {
                self.core.fetched(fetch.to, fetch.prev, entries);
            }
        }
    }

    pub(super) fn process_ready(&mut self) {
        loop {
            let ready = self.core.take_ready();
            if ready.is_empty() {
                if self.incoming.take().is_some() {
                    // The core declined the snapshot after all; its files
                    // stay in the store, newer than nothing the log needs.
                    tracing::warn!(group = %self.label.group, "a received snapshot was not installed");
                }
                return;
            }
            let mut batch = WriteBatch {
                ready: ready.number,
                hard_state: ready.hard_state,
                entries: ready.entries,
                ..Default::default()
            };
            if let Some(meta) = ready.snapshot {
                match self.incoming.take() {
                    Some((m, files, keep)) if m == meta => {
                        if let Err(e) = self.applier.restore(meta.index, &files) {
                            // The files passed their checksums; a state
                            // machine that cannot read them cannot go on.
                            tracing::error!(group = %self.label.group, error = %e, "restoring a received snapshot failed");
                            self.storage_error = Some(format!("snapshot restore failed: {e}"));
                            self.failed = true;
                            return;
                        }
                        self.core.note_cluster_level(self.applier.cluster_level());
                        self.last_snapshot = meta.index;
                        self.applied_bytes_at_snapshot = self.applied_bytes;
                        self.snapshots_installed += 1;
                        if keep {
                            batch.purge_to = Some(meta.index);
                        } else {
                            batch.reset_to = Some(meta.index);
                        }
                    }
                    _ => unreachable!("the core installs only the snapshot it was given"),
                }
            }
            if !batch.is_empty() {
                self.last_submitted = ready.number;
                self.submitted_at.push_back((ready.number, Instant::now()));
                if let Some(w) = &self.worker {
                    w.submit(batch);
                }
            }
            for env in ready.messages {
                self.route(env);
            }
            if !ready.persisted_messages.is_empty() {
                if self.last_durable >= self.last_submitted {
                    for env in ready.persisted_messages {
                        self.route(env);
                    }
                } else {
                    self.held
                        .push_back((self.last_submitted, ready.persisted_messages));
                }
            }
            if let Some(last) = ready.committed_entries.last().map(|e| e.index) {
                self.applied_bytes += ready
                    .committed_entries
                    .iter()
                    .map(|e| e.size_bytes() as u64)
                    .sum::<u64>();
                let outcomes = self.applier.apply(&ready.committed_entries);
                for o in outcomes {
                    let Some(waiters) = self.writes.remove(&o.index) else {
                        continue;
                    };
                    for w in waiters {
                        let result = if w.term == o.term {
                            o.result
                                .clone()
                                .map(|payload| Served {
                                    index: o.index,
                                    payload,
                                })
                                .map_err(|message| ClientError::StateMachine {
                                    message,
                                    rejected_before_logging: false,
                                })
                        } else {
                            if let Some(k) = &w.key {
                                self.applier.retry_cache().abandoned(k, o.index);
                            }
                            Err(self.not_leader())
                        };
                        let _ = w.reply.send(result);
                    }
                }
                // Waiters at indexes that turned out not to hold their
                // command (replaced by a new leader's entries).
                let rest = self.writes.split_off(&(last + 1));
                let replaced = std::mem::replace(&mut self.writes, rest);
                for (index, ws) in replaced {
                    for w in ws {
                        if let Some(k) = &w.key {
                            self.applier.retry_cache().abandoned(k, index);
                        }
                        let _ = w.reply.send(Err(self.not_leader()));
                    }
                }
                self.core.applied(last);
            }
            for to in ready.send_snapshot {
                self.send_snapshot(to);
            }
            // Entries behind the snapshot, read on the log's thread in order
            // with the writes (and purges) before them.
            for fetch in ready.fetch {
                if let Some(w) = &self.worker {
                    w.submit(WriteBatch {
                        ready: self.last_submitted,
                        fetch: Some(fetch),
                        ..Default::default()
                    });
                }
            }
            for ev in ready.events {
                self.on_event(ev);
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::ReadReady { ctx, index } => {
                if let Some((q, r)) = self.reads.remove(&ctx) {
                    self.ready_reads.entry(index).or_default().push((q, r));
                }
            }
            Event::ReadFailed { ctx, error } => {
                if let Some((_, r)) = self.reads.remove(&ctx) {
                    let e = match error {
                        ReadError::SteppingDown => ClientError::SteppingDown,
                        _ => self.not_leader(),
                    };
                    let _ = r.send(Err(e));
                }
            }
            Event::ConfChangeDone(res) => {
                let res = res.map_err(|e| self.conf_error(e));
                if let Some(r) = self.conf_reply.take() {
                    let _ = r.send(res);
                }
            }
            Event::TransferDone(res) => {
                let res = res
                    .map(|_| self.core.log().last_index())
                    .map_err(|e| self.transfer_error(e));
                if let Some(r) = self.transfer_reply.take() {
                    let _ = r.send(res);
                }
            }
            Event::LeaderChanged { term, leader } => {
                self.leader_changes += 1;
                self.metrics.leader_changes.get_or_create(&self.label).inc();
                tracing::info!(group = %self.label.group, term, leader = ?leader, "leader changed");
                if leader != Some(self.node_id) {
                    let writes = std::mem::take(&mut self.writes);
                    for (index, ws) in writes {
                        for w in ws {
                            if let Some(k) = &w.key {
                                self.applier.retry_cache().abandoned(k, index);
                            }
                            let _ = w.reply.send(Err(self.not_leader()));
                        }
                    }
                }
            }
        }
    }

    /// Sends a message, or hands a reply to the path its request came by.
    fn route(&mut self, env: Envelope) {
        match &env.msg {
            Message::AppendEntriesReply(r) => {
                if let Some(s) = self.append_sinks.get(&env.to) {
                    let pb = append_reply_to_pb(&self.id, env.from, r);
                    if s.try_send(pb).is_err() {
                        tracing::debug!(
                            to = env.to,
                            "append reply dropped (stream full or closed)"
                        );
                    }
                }
            }
            Message::RequestVoteReply(r) => {
                if let Some(tx) = self.once.remove(&(env.to, KIND_VOTE, r.pre_vote as u64)) {
                    let _ = tx.send(env.msg);
                }
            }
            Message::ReadIndexReply(r) => {
                if let Some(tx) = self.once.remove(&(env.to, KIND_READ, r.ctx)) {
                    let _ = tx.send(env.msg);
                }
            }
            Message::InstallSnapshotReply(_) => {
                if let Some(tx) = self.once.remove(&(env.to, KIND_INSTALL, 0)) {
                    let _ = tx.send(env.msg);
                }
            }
            _ => self.transport.send(&self.id, env),
        }
    }

    /// Work that depends on the state after a batch: reads whose index is
    /// applied, watches, automatic snapshots, learned addresses.
    pub(super) fn after_batch(&mut self) {
        let applied = self.applier.applied_index();
        if self.ready_reads.len() > 1024 {
            // Stale reads waiting for an index that may never come, whose
            // clients gave up.
            self.ready_reads.retain(|_, rs| {
                rs.retain(|(_, r)| !r.is_closed());
                !rs.is_empty()
            });
        }
        while self
            .ready_reads
            .first_key_value()
            .is_some_and(|(i, _)| *i <= applied)
        {
            let (_, rs) = self.ready_reads.pop_first().expect("checked");
            for (q, r) in rs {
                self.serve(q, r);
            }
        }
        if !self.watches.is_empty() {
            let watches = std::mem::take(&mut self.watches);
            for w in watches {
                if w.reply.is_closed() {
                    continue;
                }
                match self.watch_reached(w.index, w.level) {
                    Some(Ok(())) => {
                        let _ = w.reply.send(Ok(Served {
                            index: w.index,
                            payload: Bytes::new(),
                        }));
                    }
                    Some(Err(e)) => {
                        let _ = w.reply.send(Err(e));
                    }
                    None => self.watches.push(w),
                }
            }
        }
        let by_count =
            self.applier.applied_index() >= self.last_snapshot + self.opts.snapshot_threshold;
        let by_bytes = self.applied_bytes - self.applied_bytes_at_snapshot
            >= self.opts.snapshot_threshold_bytes;
        if (by_count || by_bytes)
            && self.applier.applied_index() > self.last_snapshot
            && self.snapshot_writing.is_none()
            && self.snapshot_retry_at.is_none_or(|t| Instant::now() >= t)
        {
            self.take_snapshot(None);
        }
        if self.core.membership() != &self.learned {
            self.learned = self.core.membership().clone();
            self.transport.learn(&self.learned);
        }
    }

    /// `Some(Ok)` once `index` reached `level`; `Some(Err)` if this member
    /// cannot tell.
    fn watch_reached(&self, index: Index, level: pb::ReplicationLevel) -> Option<ClientResult2> {
        use pb::ReplicationLevel as L;
        let commit = self.core.log().committed();
        if self.core.role() != Role::Leader {
            // A follower knows only its own commit index: committed means
            // stored on a majority.
            return match level {
                L::Majority | L::Unspecified if commit >= index => Some(Ok(())),
                L::Majority | L::Unspecified => None,
                _ => Some(Err(self.not_leader())),
            };
        }
        let progress = self.core.progress();
        let m = self.core.membership();
        let of = |pick: fn(&(NodeId, Index, Index)) -> Index| {
            let map: HashMap<NodeId, Index> = progress.iter().map(|p| (p.0, pick(p))).collect();
            move |id: NodeId| map.get(&id).copied().unwrap_or(0)
        };
        let reached = match level {
            L::Majority | L::Unspecified => m.quorum_index(of(|p| p.1)) >= index,
            L::MajorityCommitted => m.quorum_index(of(|p| p.2)) >= index,
            L::All => progress.iter().all(|p| p.1 >= index),
            L::AllCommitted => progress.iter().all(|p| p.2 >= index),
        };
        reached.then_some(Ok(()))
    }
}

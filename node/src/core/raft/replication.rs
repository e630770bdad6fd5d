//! Log replication, leader side and follower side: each follower's progress
//! (probe, pipelined replicate, snapshot), appends and heartbeats and their
//! replies, snapshot hand-off, and commit. The leader sends nothing new while
//! a follower's in-flight window is full, and commits only an entry of its own
//! term, counting itself only up to what it made durable; a follower skips
//! what it already committed, so a late append never truncates committed
//! entries.

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;

use super::{ConfChange, ConfPhase, Inflight, PendingRead, Progress, ProgressState, RaftCore};
use crate::core::error::ProposeError;
use crate::core::message::{
    AppendEntries, AppendEntriesReply, AppendResult, InstallSnapshot, InstallSnapshotReply, Message,
};
use crate::core::ready::Fetch;
use crate::core::types::{Entry, EntryPayload, Index, NodeId, Role, Term};

impl Progress {
    pub(super) fn new(next_index: Index) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            active: false,
            acked_round: 0,
            acked_tick: 0,
            commit: 0,
            quiet: false,
            feature_level: 0,
            fetching: None,
        }
    }

    pub(super) fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.next_index = self.match_index + 1;
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    fn free_up_to(&mut self, index: Index) {
        while self.inflight.front().is_some_and(|f| f.last <= index) {
            let f = self.inflight.pop_front().expect("checked");
            self.inflight_bytes -= f.bytes;
        }
    }
}

impl RaftCore {
    /// Appends a command; returns the (term, index) it was appended at.
    pub fn propose(&mut self, data: Bytes) -> Result<(Term, Index), ProposeError> {
        self.check_can_write()?;
        Ok(self.append_entry(EntryPayload::Command(data)))
    }

    fn check_can_write(&self) -> Result<(), ProposeError> {
        match &self.leader_state {
            None => Err(ProposeError::NotLeader {
                leader: self.leader,
            }),
            Some(ls) if ls.transfer.is_some() => Err(ProposeError::SteppingDown),
            Some(_) => Ok(()),
        }
    }

    /// Sending a snapshot to `to` failed; probe it again.
    pub fn report_snapshot_failure(&mut self, to: NodeId) {
        if let Some(pr) = self
            .leader_state
            .as_mut()
            .and_then(|l| l.progress.get_mut(&to))
            && matches!(pr.state, ProgressState::Snapshot { .. })
        {
            pr.become_probe();
        }
    }

    pub(super) fn append_entry(&mut self, payload: EntryPayload) -> (Term, Index) {
        self.wake();
        self.active_at = self.now;
        let index = self.log.last_index() + 1;
        let entry = Entry {
            term: self.term,
            index,
            payload,
        };
        let is_membership = matches!(entry.payload, EntryPayload::Membership(_));
        self.log.append_new(entry);
        if is_membership {
            self.sync_progress_with_membership();
        }
        self.ls().broadcast_pending = true;
        (self.term, index)
    }

    /// Progress exists exactly for the members in force plus staged ones.
    pub(super) fn sync_progress_with_membership(&mut self) {
        let members: BTreeSet<NodeId> = self.membership().members().collect();
        let next = self.log.last_index() + 1;
        let id = self.id;
        let (now, depart_ticks) = (self.now, self.cfg.staging_timeout_ticks * 2);
        let removal = self.log.membership_index();
        let ls = self.ls();
        let staged: BTreeSet<NodeId> = match &ls.conf_change {
            Some(ConfChange {
                phase: ConfPhase::Staging { staged, .. },
                ..
            }) => staged.clone(),
            _ => BTreeSet::new(),
        };
        // A member the new configuration leaves out is still sent the log
        // until it holds the entry that removes it: otherwise it would never
        // learn it is out, and would go on campaigning in the old one.
        for p in ls.progress.keys() {
            if !members.contains(p) && !staged.contains(p) {
                ls.departing
                    .entry(*p)
                    .or_insert((removal, now + depart_ticks));
            }
        }
        ls.departing.retain(|p, _| !members.contains(p));
        let departing = &mut ls.departing;
        ls.progress.retain(|p, pr| {
            members.contains(p)
                || staged.contains(p)
                || departing.get(p).is_some_and(|(at, _)| pr.match_index < *at)
        });
        let progress = &ls.progress;
        departing.retain(|p, _| progress.contains_key(p));
        for m in members {
            if m != id {
                ls.progress.entry(m).or_insert_with(|| Progress::new(next));
            }
        }
    }

    /// Sends what is owed: new entries to every follower with room, the
    /// heartbeat round reads are waiting for, and answers to confirmed reads.
    pub(super) fn flush_leader(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        if std::mem::take(&mut self.ls().broadcast_pending) {
            let peers: Vec<NodeId> = self.ls().progress.keys().copied().collect();
            for to in peers {
                self.send_append(to);
            }
        }
        let round = self.ls().round;
        if self.ls().reads.back().is_some_and(|r| r.round > round) {
            self.broadcast_heartbeat(false);
        }
        self.confirm_reads();
    }

    pub(super) fn send_append(&mut self, to: NodeId) {
        let now = self.now;
        let max_bytes = self.cfg.max_append_bytes;
        let (max_count, max_inflight_bytes) =
            (self.cfg.max_inflight_appends, self.cfg.max_inflight_bytes);
        let last = self.log.last_index();
        // May be called right after this member stepped down (a removed
        // leader committing its own removal): then there is nothing to send.
        let Some(pr) = self
            .leader_state
            .as_mut()
            .and_then(|l| l.progress.get_mut(&to))
        else {
            return;
        };
        if pr.fetching.is_some() {
            return;
        }
        match pr.state {
            ProgressState::Snapshot { .. } => return,
            ProgressState::Probe if pr.probe_sent => return,
            ProgressState::Replicate
                if pr.inflight.len() >= max_count || pr.inflight_bytes >= max_inflight_bytes =>
            {
                return;
            }
            ProgressState::Replicate if pr.next_index > last => return,
            _ => {}
        }
        let prev_index = pr.next_index - 1;
        let Some(prev_term) = self.log.term(prev_index) else {
            // Behind the snapshot: the entries are read back from storage,
            // which keeps some behind it, and sent when they come; only if
            // storage no longer has them does the follower get the snapshot.
            pr.fetching = Some(now);
            let hi = self.log.snapshot_index();
            self.out.fetch.push(Fetch {
                to,
                prev: prev_index,
                hi,
                max_bytes,
            });
            return;
        };
        let entries = self
            .log
            .slice(pr.next_index, last, max_bytes)
            .expect("prev is not compacted");
        self.send_entries(to, prev_index, prev_term, entries);
    }

    /// Sends `entries` after `prev_index` to `to`, as the next append of its
    /// progress (in flight when replicating, the one probe when probing).
    pub(super) fn send_entries(
        &mut self,
        to: NodeId,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
    ) {
        let now = self.now;
        let commit = self.log.committed();
        let term = self.term;
        let Some(ls) = self.leader_state.as_mut() else {
            return;
        };
        let round = ls.round;
        let Some(pr) = ls.progress.get_mut(&to) else {
            return;
        };
        match pr.state {
            ProgressState::Replicate => {
                // Callers send at least one entry when replicating.
                let Some(sent_last) = entries.last().map(|e| e.index) else {
                    return;
                };
                let bytes = entries.iter().map(Entry::size_bytes).sum();
                pr.next_index = sent_last + 1;
                pr.inflight_bytes += bytes;
                pr.inflight.push_back(Inflight {
                    last: sent_last,
                    bytes,
                    sent_tick: now,
                });
            }
            _ => pr.probe_sent = true,
        }
        self.ls().quiesce_round = None;
        let msg = AppendEntries {
            term,
            prev_index,
            prev_term,
            entries,
            leader_commit: commit,
            round,
            quiesce: false,
        };
        self.send(to, Message::AppendEntries(msg), false);
    }

    /// An empty append to every member, starting a new round. Its `prev` is
    /// the follower's known match, so it always passes the consistency check
    /// and safely carries the commit index (the follower commits only up to
    /// `prev`).
    pub(super) fn broadcast_heartbeat(&mut self, quiesce: bool) {
        let now = self.now;
        let horizon = now.saturating_sub(self.cfg.election_timeout_max_ticks);
        let ls = self.ls();
        ls.round += 1;
        let round = ls.round;
        ls.quiesce_round = quiesce.then_some(round);
        for pr in ls.progress.values_mut() {
            pr.quiet = false;
        }
        ls.round_ticks.push_back((round, now));
        while ls.round_ticks.front().is_some_and(|(_, t)| *t < horizon) {
            ls.round_ticks.pop_front();
        }
        let peers: Vec<(NodeId, Index, ProgressState, bool)> = ls
            .progress
            .iter()
            .map(|(id, p)| (*id, p.match_index, p.state, p.fetching.is_some()))
            .collect();
        for (to, match_index, state, fetching) in peers {
            // A follower waiting for entries read back from storage still
            // hears the heartbeat, or it would time out and campaign when
            // the read is slow.
            if state == ProgressState::Probe && !fetching {
                // Probing followers are retried with entries instead.
                if let Some(pr) = self.ls().progress.get_mut(&to) {
                    pr.probe_sent = false;
                }
                self.send_append(to);
                continue;
            }
            let (prev_index, prev_term) = match self.log.term(match_index) {
                Some(t) => (match_index, t),
                None => (self.log.snapshot_index(), self.log.snapshot_term()),
            };
            let msg = AppendEntries {
                term: self.term,
                prev_index,
                prev_term,
                entries: Vec::new(),
                leader_commit: self.log.committed(),
                round,
                quiesce,
            };
            self.send(to, Message::AppendEntries(msg), false);
        }
    }

    pub(super) fn handle_append_reply(&mut self, from: NodeId, m: AppendEntriesReply) {
        if self.role != Role::Leader {
            return;
        }
        let tick_of_round = self
            .ls()
            .round_ticks
            .iter()
            .find(|(r, _)| *r == m.round)
            .map(|(_, t)| *t);
        let quiesce_round = self.ls().quiesce_round;
        // Within the wire bounds but impossible: a follower cannot hold
        // more than this leader sent, nor answer a round not yet started.
        // Believed, the first would push next_index past the log, the second
        // would confirm every later read round without a heartbeat.
        let (last, round) = (self.log.last_index(), self.ls().round);
        if m.match_index > last || m.round > round {
            return;
        }
        let Some(pr) = self.ls().progress.get_mut(&from) else {
            return;
        };
        pr.active = true;
        pr.feature_level = m.feature_level;
        pr.quiet = m.quiet && m.result == AppendResult::Success && quiesce_round == Some(m.round);
        if m.round > pr.acked_round {
            pr.acked_round = m.round;
            if let Some(t) = tick_of_round {
                pr.acked_tick = pr.acked_tick.max(t);
            }
        }
        pr.commit = pr.commit.max(m.follower_commit);
        match m.result {
            AppendResult::NotLeader => {}
            AppendResult::Success => {
                let progressed = m.match_index > pr.match_index;
                if progressed {
                    pr.match_index = m.match_index;
                }
                pr.free_up_to(pr.match_index);
                match pr.state {
                    ProgressState::Probe => {
                        pr.state = ProgressState::Replicate;
                        pr.probe_sent = false;
                        pr.next_index = pr.match_index + 1;
                    }
                    ProgressState::Snapshot { .. } => {}
                    ProgressState::Replicate => {
                        pr.next_index = pr.next_index.max(pr.match_index + 1);
                    }
                }
                if progressed {
                    self.maybe_commit();
                    self.check_staging();
                    // (Committing may have ended this member's leadership:
                    // a leader that removed itself steps down.)
                    if let Some(ls) = self.leader_state.as_mut()
                        && ls
                            .departing
                            .get(&from)
                            .is_some_and(|(at, _)| m.match_index >= *at)
                    {
                        // It holds the entry that removes it: done with it.
                        ls.departing.remove(&from);
                        ls.progress.remove(&from);
                    }
                }
                self.maybe_start_election_at_target(from);
                self.send_append(from);
            }
            AppendResult::Inconsistency => {
                if m.rejected_prev <= pr.match_index {
                    return;
                }
                if pr.state == ProgressState::Probe && m.rejected_prev != pr.next_index - 1 {
                    return;
                }
                if matches!(pr.state, ProgressState::Snapshot { .. }) {
                    return;
                }
                let next = match (
                    m.conflict_term,
                    self.log.last_index_of_term(m.conflict_term),
                ) {
                    (0, _) => m.next_index,
                    (_, Some(l)) if l >= m.next_index && l < m.rejected_prev => l + 1,
                    _ => m.next_index,
                };
                let pr = self.ls().progress.get_mut(&from).expect("checked");
                pr.become_probe();
                pr.next_index =
                    next.clamp(pr.match_index + 1, m.rejected_prev.max(pr.match_index + 1));
                self.send_append(from);
            }
        }
        self.confirm_reads();
        self.maybe_go_quiet();
    }

    pub(super) fn maybe_commit(&mut self) {
        let Some(ls) = &self.leader_state else { return };
        let durable = self.log.durable();
        let index = self.membership().quorum_index(|id| {
            if id == self.id {
                durable
            } else {
                ls.progress.get(&id).map_or(0, |p| p.match_index)
            }
        });
        // Only an entry of the current term is committed by counting
        // replicas (Raft §5.4.2, the Figure 8 case); earlier ones follow.
        if index > self.log.committed() && self.log.term(index) == Some(self.term) {
            self.log.commit_to(index);
            self.ls().broadcast_pending = true;
            self.on_commit_advanced();
        }
    }

    fn on_commit_advanced(&mut self) {
        if self.committed_in_term() {
            let commit = self.log.committed();
            let ls = self.ls();
            let round = ls.round + 1;
            for (ctx, origin) in std::mem::take(&mut ls.reads_before_commit) {
                ls.reads.push_back(PendingRead {
                    ctx,
                    origin,
                    index: commit,
                    round,
                });
            }
        }
        self.advance_conf_change();
    }

    pub(super) fn append_reply(
        &self,
        result: AppendResult,
        match_index: Index,
        next_index: Index,
        conflict_term: Term,
        rejected_prev: Index,
        round: u64,
    ) -> AppendEntriesReply {
        AppendEntriesReply {
            term: self.term,
            result,
            match_index,
            next_index,
            conflict_term,
            rejected_prev,
            follower_commit: self.log.committed(),
            round,
            quiet: false,
            feature_level: self.cfg.feature_level,
        }
    }

    fn recognise_leader(&mut self, from: NodeId) {
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(self.term, Some(from));
        }
        self.leader_contact_elapsed = 0;
        self.election_elapsed = 0;
    }

    pub(super) fn handle_append(&mut self, from: NodeId, mut m: AppendEntries) {
        self.recognise_leader(from);
        let quiesce = m.quiesce.then_some((m.prev_index, m.leader_commit));
        // Entries up to our commit index are known to match the leader's
        // (leader completeness); skip them so a delayed request overlapping
        // a compacted prefix still succeeds.
        let committed = self.log.committed();
        if m.prev_index < committed {
            let skip = (committed - m.prev_index).min(m.entries.len() as Index) as usize;
            debug_assert!(
                m.entries[..skip]
                    .iter()
                    .all(|e| self.log.term(e.index).is_none_or(|t| t == e.term))
            );
            m.entries.drain(..skip);
            m.prev_index = committed;
            m.prev_term = self
                .log
                .term(committed)
                .expect("commit index is never compacted past");
            if let Some(first) = m.entries.first() {
                // Entries are contiguous: prev is the one before the first kept.
                debug_assert_eq!(first.index, committed + 1);
            }
        }
        match self.log.term(m.prev_index) {
            Some(t) if t == m.prev_term => {}
            found => {
                let (hint, conflict_term) = match found {
                    None => (self.log.last_index() + 1, 0),
                    Some(t) => (
                        self.log
                            .first_index_of_term_at(m.prev_index)
                            .max(committed + 1),
                        t,
                    ),
                };
                let reply = self.append_reply(
                    AppendResult::Inconsistency,
                    0,
                    hint,
                    conflict_term,
                    m.prev_index,
                    m.round,
                );
                self.send(from, Message::AppendEntriesReply(reply), true);
                return;
            }
        }
        let last_new = self.log.append_from_leader(m.prev_index, m.entries);
        let commit = m.leader_commit.min(last_new);
        self.log.commit_to(commit.max(self.log.committed()));
        // Quiet only with exactly the leader's log, all of it committed: a
        // longer log holds entries the leader never sent in this term, which
        // only a real append may truncate.
        let quiet = self.cfg.quiesce
            && quiesce.is_some_and(|(prev, commit)| {
                prev == commit && self.log.last_index() == prev && self.log.committed() == commit
            });
        if quiet {
            self.quiet = true;
            self.quiet_elapsed = 0;
        } else {
            self.wake();
        }
        let mut reply = self.append_reply(
            AppendResult::Success,
            last_new,
            self.log.last_index() + 1,
            0,
            0,
            m.round,
        );
        reply.quiet = quiet;
        self.send(from, Message::AppendEntriesReply(reply), true);
    }

    pub(super) fn handle_install_snapshot(&mut self, from: NodeId, m: InstallSnapshot) {
        self.recognise_leader(from);
        let index = if m.meta.index <= self.log.committed() {
            // Already have everything it covers.
            self.log.committed()
        } else {
            self.log.install_snapshot(&m.meta);
            self.apply_cursor = m.meta.index;
            self.applied = m.meta.index;
            self.out.snapshot = Some(m.meta.clone());
            m.meta.index
        };
        let reply = InstallSnapshotReply {
            term: self.term,
            snapshot_index: index,
            accepted: true,
        };
        self.send(from, Message::InstallSnapshotReply(reply), true);
    }

    pub(super) fn handle_install_snapshot_reply(&mut self, from: NodeId, m: InstallSnapshotReply) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        let Some(pr) = self.ls().progress.get_mut(&from) else {
            return;
        };
        pr.active = true;
        if m.accepted && m.snapshot_index <= last {
            pr.match_index = pr.match_index.max(m.snapshot_index);
        }
        pr.become_probe();
        self.maybe_commit();
        self.check_staging();
        self.send_append(from);
    }
}

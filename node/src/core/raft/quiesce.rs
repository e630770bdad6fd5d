//! Quiet groups (`Config::quiesce`). An idle leader whose followers all hold
//! its whole, committed log asks them to go quiet; quiet members run no
//! election timer and the quiet leader sends only rare quiet heartbeats and
//! skips check-quorum. Anything but that quiet exchange, or a follower's quiet
//! timeout, wakes a member, and waking restarts its timers so the quiet spell
//! never counts towards an election or a check-quorum.

use super::{ProgressState, RaftCore};
use crate::core::message::{AppendResult, Message};
use crate::core::types::{NodeId, Role};

impl RaftCore {
    /// Whether the group is quiet here (see `Config::quiesce`).
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// Leaves the quiet state: timers and check-quorum run again, and a
    /// leader heartbeats at the next tick, which wakes its followers. The
    /// shell calls this when a peer of the group stopped answering or came
    /// back; a member that is not quiet is not changed.
    pub fn wake(&mut self) {
        if !self.quiet {
            return;
        }
        self.quiet = false;
        self.quiet_elapsed = 0;
        self.active_at = self.now;
        if self.role == Role::Leader {
            // A fresh check-quorum window that counts only new replies.
            self.election_elapsed = 0;
            self.heartbeat_elapsed = self.cfg.heartbeat_interval_ticks;
            let ls = self.ls();
            ls.quiesce_round = None;
            for pr in ls.progress.values_mut() {
                pr.quiet = false;
                pr.active = false;
            }
        } else {
            // Counted from now: the leader was heard from when this member
            // went quiet, and its stickiness held ever since.
            self.reset_election_timer();
        }
    }

    pub(super) fn tick_quiet(&mut self, n: u64) {
        self.now += n;
        self.quiet_elapsed = self.quiet_elapsed.saturating_add(n);
        if self.role == Role::Leader {
            if self.quiet_elapsed >= self.cfg.quiet_heartbeat_ticks {
                self.quiet_elapsed = 0;
                self.broadcast_heartbeat(true);
            }
        } else if self.quiet_elapsed >= self.cfg.quiet_timeout_ticks {
            self.wake();
        }
    }

    /// Whether `msg` is the quiet traffic of a quiet group: the leader's quiet
    /// heartbeat, or a follower's reply that it is quiet. Anything else wakes
    /// a quiet member.
    pub(super) fn keeps_quiet(&self, from: NodeId, msg: &Message) -> bool {
        match msg {
            Message::AppendEntries(m) => {
                m.quiesce && m.term == self.term && self.leader == Some(from)
            }
            Message::AppendEntriesReply(r) => {
                r.quiet && r.term == self.term && r.result == AppendResult::Success
            }
            _ => false,
        }
    }

    /// Whether this leader may ask its group to go quiet: idle for an
    /// election timeout, everything durable and committed in its own term,
    /// every member holding the whole log, and nothing in progress.
    pub(super) fn can_quiesce(&self) -> bool {
        let Some(ls) = &self.leader_state else {
            return false;
        };
        let last = self.log.last_index();
        self.cfg.quiesce
            && self.now.saturating_sub(self.active_at) >= self.cfg.election_timeout_min_ticks
            && self.log.committed() == last
            && self.log.durable() >= last
            && self.committed_in_term()
            && self.unpersisted.is_empty()
            && ls.conf_change.is_none()
            && ls.transfer.is_none()
            && ls.reads.is_empty()
            && ls.reads_before_commit.is_empty()
            && ls.progress.values().all(|p| {
                p.state == ProgressState::Replicate
                    && p.match_index == last
                    && p.inflight.is_empty()
            })
    }

    /// Goes quiet once every follower answered the current quiesce round
    /// with `quiet` and nothing happened meanwhile.
    pub(super) fn maybe_go_quiet(&mut self) {
        if self.quiet || self.role != Role::Leader {
            return;
        }
        let all_quiet = self
            .leader_state
            .as_ref()
            .is_some_and(|ls| ls.quiesce_round.is_some() && ls.progress.values().all(|p| p.quiet));
        if all_quiet && self.can_quiesce() {
            self.quiet = true;
            self.quiet_elapsed = 0;
        }
    }
}

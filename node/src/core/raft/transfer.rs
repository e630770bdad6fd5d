//! Leadership transfer: the leader hands over to a named voter, or to the
//! most caught-up one, by ordering it to campaign once it holds the whole log;
//! it also yields on its own to a caught-up voter of higher priority. While a
//! transfer runs the leader takes no writes, reads or membership changes, and
//! the target campaigns only if it holds exactly the leader's log and term.

use super::{RaftCore, Transfer, TransferOutcome};
use crate::core::error::{TransferError, Transferred};
use crate::core::message::{Message, StartElection};
use crate::core::ready::Event;
use crate::core::types::{NodeId, Role};

/// Failed automatic hand-overs double the wait before the next, up to this
/// many times the first wait.
const HAND_OVER_BACKOFF_MAX_DOUBLINGS: u32 = 6;

impl RaftCore {
    pub(super) fn handle_start_election(&mut self, from: NodeId, m: StartElection) {
        let holds_leader_log =
            self.log.last_index() == m.last_index && self.log.last_term() == m.last_term;
        if m.term == self.term
            && self.leader == Some(from)
            && holds_leader_log
            && self.membership().is_voter(self.id)
            && !self.elections_paused
        {
            self.campaign(false, true);
        }
    }

    /// Hands leadership to `target` (or, with `None`, to the most caught-up
    /// voter). Writes are refused meanwhile; the outcome comes as
    /// `Event::TransferDone`.
    pub fn transfer_leadership(
        &mut self,
        target: Option<NodeId>,
        timeout_ticks: u64,
    ) -> Result<(), TransferError> {
        if self.role == Role::Leader {
            self.wake();
            self.active_at = self.now;
        }
        self.start_transfer(target, timeout_ticks, true)
    }

    fn start_transfer(
        &mut self,
        target: Option<NodeId>,
        timeout_ticks: u64,
        notify: bool,
    ) -> Result<(), TransferError> {
        let requested = target;
        let Some(ls) = &self.leader_state else {
            return Err(TransferError::NotLeader {
                leader: self.leader,
            });
        };
        if ls.transfer.is_some() {
            return Err(TransferError::InProgress);
        }
        if ls.conf_change.is_some() {
            return Err(TransferError::MembershipChanging);
        }
        let membership = self.membership();
        let target = match target {
            Some(t) if t == self.id => {
                let done = Transferred {
                    term: self.term,
                    target: t,
                };
                self.out.events.push(Event::TransferDone(Ok(done)));
                return Ok(());
            }
            Some(t) if !membership.voters.contains_key(&t) => {
                return Err(TransferError::NotAVoter(t));
            }
            Some(t) => t,
            None => membership
                .voters
                .values()
                .filter(|p| p.id != self.id)
                .max_by_key(|p| {
                    (
                        ls.progress.get(&p.id).map_or(0, |pr| pr.match_index),
                        p.priority,
                    )
                })
                .map(|p| p.id)
                .ok_or(TransferError::NoCandidate)?,
        };
        let deadline = self.now + timeout_ticks.max(1);
        self.ls().transfer = Some(Transfer {
            target,
            deadline,
            notify,
            any: requested.is_none(),
        });
        self.maybe_start_election_at_target(target);
        self.send_append(target);
        Ok(())
    }

    pub(super) fn maybe_start_election_at_target(&mut self, from: NodeId) {
        let last = self.log.last_index();
        let Some(ls) = &self.leader_state else { return };
        let Some(t) = &ls.transfer else { return };
        if t.target == from
            && ls
                .progress
                .get(&from)
                .is_some_and(|p| p.match_index == last)
        {
            let msg = StartElection {
                term: self.term,
                last_index: last,
                last_term: self.log.last_term(),
            };
            self.ls().start_election_sent = true;
            self.send(from, Message::StartElection(msg), false);
        }
    }

    pub(super) fn resend_start_election(&mut self) {
        if let Some(target) = self.ls().transfer.as_ref().map(|t| t.target) {
            self.maybe_start_election_at_target(target);
        }
    }

    /// A leader yields to a caught-up voter of higher priority.
    pub(super) fn maybe_hand_over_to_priority(&mut self) {
        if !self.committed_in_term() || self.now < self.hand_over.not_before {
            return;
        }
        let last = self.log.last_index();
        let me = self.membership().priority(self.id);
        let ls = self.leader_state.as_ref().expect("leader");
        let better = self
            .membership()
            .voters
            .values()
            .filter(|p| {
                p.priority > me
                    && ls
                        .progress
                        .get(&p.id)
                        .is_some_and(|pr| pr.match_index == last)
            })
            .max_by_key(|p| p.priority)
            .map(|p| p.id);
        if let Some(target) = better {
            let timeout = self.cfg.election_timeout_max_ticks * 2;
            // Busy (another change or transfer running) just means: later.
            let _ = self.start_transfer(Some(target), timeout, false);
        }
    }

    /// A transfer's deadline passed while this member still leads: it keeps
    /// leading. An automatic hand-over that failed waits longer next time,
    /// or a voter that cannot win would keep the group refusing writes.
    pub(super) fn transfer_timed_out(&mut self, t: Transfer) {
        if t.notify {
            let err = TransferError::Timeout { target: t.target };
            self.out.events.push(Event::TransferDone(Err(err)));
        } else {
            self.hand_over_failed();
        }
    }

    fn hand_over_failed(&mut self) {
        let b = &mut self.hand_over;
        let first = self.cfg.election_timeout_max_ticks * 2;
        let wait = first << b.failures.min(HAND_OVER_BACKOFF_MAX_DOUBLINGS);
        b.failures = b.failures.saturating_add(1);
        b.not_before = self.now + wait;
    }

    /// This member stops leading during a transfer: whether it succeeded is
    /// known once the next leader is.
    pub(super) fn transfer_pending_outcome(&mut self, t: Transfer) {
        self.transfer_outcome = Some(TransferOutcome {
            target: t.target,
            any: t.any,
            notify: t.notify,
            term: self.term,
            deadline: t.deadline,
        });
    }

    /// A leader is known (`leader`), or the deadline passed (`None`): settle
    /// the outcome of the transfer this member stepped down for.
    pub(super) fn settle_transfer_outcome(&mut self, leader: Option<NodeId>) {
        let Some(o) = self.transfer_outcome else {
            return;
        };
        let result = match leader {
            Some(l) if l == o.target || (o.any && l != self.id) => Ok(Transferred {
                term: o.term,
                target: l,
            }),
            Some(l) => Err(TransferError::OtherLeader {
                target: o.target,
                leader: l,
            }),
            None if self.now >= o.deadline => Err(TransferError::Timeout { target: o.target }),
            None => return,
        };
        self.transfer_outcome = None;
        match (&result, o.notify) {
            (_, true) => self.out.events.push(Event::TransferDone(result)),
            (Ok(_), false) => self.hand_over = Default::default(),
            (Err(_), false) => self.hand_over_failed(),
        }
    }
}

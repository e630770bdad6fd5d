//! Elections and role changes: pre-vote and vote, campaigns, becoming follower
//! or leader, and the leader stepping down (check-quorum, removal, stall).
//! One vote per term, sent only after it is persisted; a member that heard
//! from a live leader helps elect nobody else unless the leader ordered it
//! (transfer). Ceasing to lead answers everything the leader was holding.

use std::collections::{BTreeMap, VecDeque};

use rand::Rng;

use super::membership::leave_joint;
use super::{ConfChange, ConfPhase, LeaderState, Progress, RaftCore};
use crate::core::error::{ConfChangeError, ReadError};
use crate::core::message::{Message, RequestVote, RequestVoteReply, VoteRefusal};
use crate::core::ready::Event;
use crate::core::types::{EntryPayload, NodeId, Role, Term};

impl RaftCore {
    /// Pauses or resumes elections on this member. A paused member still
    /// votes and follows, but never starts an election on its own.
    pub fn set_elections_paused(&mut self, paused: bool) {
        self.elections_paused = paused;
        if paused && matches!(self.role, Role::PreCandidate | Role::Candidate) {
            self.become_follower(self.term, None);
        }
    }

    /// Stops leading at once (the shell saw a long runtime stall, so its
    /// lease and its view of the followers may be stale). Always safe: the
    /// member keeps its term and log and may be elected again.
    pub fn step_down(&mut self) {
        if self.role == Role::Leader {
            self.become_follower(self.term, None);
        }
    }

    pub(super) fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        self.randomized_timeout = self
            .rng
            .random_range(self.cfg.election_timeout_min_ticks..self.cfg.election_timeout_max_ticks);
    }

    pub(super) fn can_campaign(&self) -> bool {
        self.membership().is_voter(self.id) && !self.elections_paused
    }

    pub(super) fn campaign(&mut self, pre_vote: bool, transfer: bool) {
        self.votes.clear();
        self.votes.insert(self.id, true);
        let term = if pre_vote {
            self.role = Role::PreCandidate;
            self.term + 1
        } else {
            self.term += 1;
            self.voted_for = Some(self.id);
            self.hard_state_dirty = true;
            self.role = Role::Candidate;
            self.term
        };
        if self.leader.take().is_some() {
            self.out.events.push(Event::LeaderChanged {
                term: self.term,
                leader: None,
            });
        }
        self.fail_remote_reads();
        self.reset_election_timer();
        let request = RequestVote {
            term,
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
            pre_vote,
            transfer,
            priority: self.membership().priority(self.id),
        };
        let voters: Vec<NodeId> = self.voter_ids().filter(|id| *id != self.id).collect();
        for to in voters {
            // A real vote request follows a term change that must be durable
            // first; a pre-vote changes nothing.
            self.send(to, Message::RequestVote(request.clone()), !pre_vote);
        }
        self.check_election_result();
    }

    fn voter_ids(&self) -> impl Iterator<Item = NodeId> + use<> {
        let m = self.membership();
        let mut ids: Vec<NodeId> = m.voters.keys().copied().collect();
        if let Some(old) = &m.old_voters {
            ids.extend(old.keys().copied());
        }
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
    }

    fn check_election_result(&mut self) {
        let m = self.membership();
        let won = m.has_quorum(|id| self.votes.get(&id) == Some(&true));
        let lost = !m.quorum_possible(|id| self.votes.get(&id) == Some(&false));
        if won {
            if self.role == Role::PreCandidate {
                self.campaign(false, false);
            } else {
                self.become_leader();
            }
        } else if lost {
            self.become_follower(self.term, None);
        }
    }

    /// Whether this member has recently heard from a live leader (or is one),
    /// in which case it refuses to help elect anybody else.
    fn leader_is_alive(&self) -> bool {
        self.role == Role::Leader
            || self.leader_contact_elapsed < self.cfg.election_timeout_min_ticks
    }

    pub(super) fn handle_vote(&mut self, from: NodeId, m: RequestVote) {
        let refuse = |core: &mut Self, refusal: VoteRefusal| {
            let reply = RequestVoteReply {
                term: core.term,
                pre_vote: m.pre_vote,
                refusal: Some(refusal),
            };
            core.send(from, Message::RequestVoteReply(reply), true);
        };
        if !m.transfer && self.leader_is_alive() && m.term > self.term {
            return refuse(self, VoteRefusal::LeaderAlive);
        }
        if !m.pre_vote && m.term > self.term {
            self.become_follower(m.term, None);
        }
        let can_vote = self.voted_for == Some(from)
            || (self.voted_for.is_none() && self.leader.is_none())
            || (m.pre_vote && m.term > self.term);
        if !can_vote {
            return refuse(self, VoteRefusal::AlreadyVoted);
        }
        if !self.log.is_up_to_date(m.last_index, m.last_term) {
            return refuse(self, VoteRefusal::LogBehind);
        }
        // A voter with an equal log and a higher priority would rather lead
        // itself, provided it is able to campaign.
        let equal_log =
            m.last_index == self.log.last_index() && m.last_term == self.log.last_term();
        if !m.transfer
            && equal_log
            && self.can_campaign()
            && self.membership().priority(self.id) > m.priority
        {
            return refuse(self, VoteRefusal::LowerPriority);
        }
        if m.pre_vote {
            let reply = RequestVoteReply {
                term: m.term,
                pre_vote: true,
                refusal: None,
            };
            self.send(from, Message::RequestVoteReply(reply), true);
        } else {
            self.voted_for = Some(from);
            self.hard_state_dirty = true;
            self.reset_election_timer();
            let reply = RequestVoteReply {
                term: self.term,
                pre_vote: false,
                refusal: None,
            };
            self.send(from, Message::RequestVoteReply(reply), true);
        }
    }

    pub(super) fn handle_vote_reply(&mut self, from: NodeId, m: RequestVoteReply) {
        let expected = match self.role {
            // A grant names the term it was asked for: one from an earlier
            // pre-vote round does not count towards this one.
            Role::PreCandidate => m.pre_vote && (!m.granted() || m.term == self.term + 1),
            Role::Candidate => !m.pre_vote && m.term == self.term,
            _ => false,
        };
        if !expected {
            return;
        }
        self.votes.entry(from).or_insert(m.granted());
        self.check_election_result();
    }

    pub(super) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        let was_leader = self.role == Role::Leader;
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            self.hard_state_dirty = true;
        }
        self.role = Role::Follower;
        self.votes.clear();
        self.quiet = false;
        if was_leader {
            self.step_down_leader();
        }
        if self.leader != leader {
            self.leader = leader;
            self.fail_remote_reads();
            self.out.events.push(Event::LeaderChanged {
                term: self.term,
                leader,
            });
        }
        if leader.is_some() {
            self.leader_contact_elapsed = 0;
            self.settle_transfer_outcome(leader);
        }
        self.reset_election_timer();
    }

    /// Fails everything a leader was waiting for when it stops leading.
    fn step_down_leader(&mut self) {
        let Some(ls) = self.leader_state.take() else {
            return;
        };
        let reads = ls.reads.iter().map(|r| (r.ctx, r.origin));
        for (ctx, origin) in reads.chain(ls.reads_before_commit.iter().copied()) {
            self.answer_read(ctx, origin, Err(ReadError::LeaderChanged));
        }
        if let Some(cc) = ls.conf_change
            && cc.notify
        {
            self.out
                .events
                .push(Event::ConfChangeDone(Err(ConfChangeError::LeaderChanged)));
        }
        if let Some(t) = ls.transfer {
            // Stepping down is not success: that is the target leading.
            self.transfer_pending_outcome(t);
        }
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.quiet = false;
        self.leader = Some(self.id);
        self.votes.clear();
        self.out.events.push(Event::LeaderChanged {
            term: self.term,
            leader: Some(self.id),
        });
        let next = self.log.last_index() + 1;
        let progress = self
            .membership()
            .members()
            .filter(|id| *id != self.id)
            .map(|id| (id, Progress::new(next)))
            .collect();
        // A change an earlier leader left half done is finished by this one;
        // until then, no new change may start.
        let membership = self.membership().clone();
        let index = self.log.membership_index();
        let conf_change = (membership.is_joint() || index > self.log.committed()).then(|| {
            let phase = if membership.is_joint() {
                ConfPhase::Joint { index }
            } else {
                ConfPhase::Final { index }
            };
            ConfChange {
                target: leave_joint(&membership),
                phase,
                notify: false,
                required_level: 1,
            }
        });
        self.leader_state = Some(LeaderState {
            progress,
            round: 0,
            round_ticks: VecDeque::new(),
            reads: VecDeque::new(),
            reads_before_commit: Vec::new(),
            conf_change,
            transfer: None,
            broadcast_pending: true,
            quiesce_round: None,
            start_election_sent: false,
            departing: BTreeMap::new(),
            level_proposed: false,
        });
        self.settle_transfer_outcome(Some(self.id));
        self.heartbeat_elapsed = 0;
        self.election_elapsed = 0;
        self.append_entry(EntryPayload::Noop);
        // A joint membership already committed before this leader: leave it.
        self.advance_conf_change();
        self.maybe_commit();
    }

    pub(super) fn quorum_active(&self) -> bool {
        let ls = self.leader_state.as_ref().expect("leader");
        self.membership()
            .has_quorum(|id| id == self.id || ls.progress.get(&id).is_some_and(|p| p.active))
    }
}

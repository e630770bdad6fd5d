//! Linearizable reads by read index. A leader answers at its commit index once
//! a quorum acknowledged a heartbeat round started after the read (or at once
//! under a valid lease); followers forward reads to it. No read is answered
//! before the leader committed an entry of its own term, and a forwarded read
//! fails rather than waits when leadership changes.

use super::{PendingRead, RaftCore};
use crate::core::error::ReadError;
use crate::core::message::{Message, ReadIndexReply, ReadIndexRequest};
use crate::core::ready::Event;
use crate::core::types::{Index, NodeId, Role};

impl RaftCore {
    pub(super) fn fail_remote_reads(&mut self) {
        for ctx in std::mem::take(&mut self.remote_reads) {
            self.out.events.push(Event::ReadFailed {
                ctx,
                error: ReadError::LeaderChanged,
            });
        }
    }

    /// Asks for a linearizable read index; the answer comes as
    /// `Event::ReadReady { ctx, .. }` or `Event::ReadFailed { ctx, .. }`.
    pub fn read_index(&mut self, ctx: u64) {
        match self.role {
            Role::Leader => self.register_read(ctx, None),
            _ => match self.leader {
                Some(leader) => {
                    self.remote_reads.insert(ctx);
                    let msg = ReadIndexRequest {
                        term: self.term,
                        ctx,
                    };
                    self.send(leader, Message::ReadIndex(msg), false);
                }
                None => {
                    let error = ReadError::NotLeader { leader: None };
                    self.out.events.push(Event::ReadFailed { ctx, error });
                }
            },
        }
    }

    fn register_read(&mut self, ctx: u64, origin: Option<NodeId>) {
        self.wake();
        self.active_at = self.now;
        if self.ls().transfer.is_some() {
            return self.answer_read(ctx, origin, Err(ReadError::SteppingDown));
        }
        if !self.committed_in_term() {
            self.ls().reads_before_commit.push((ctx, origin));
            return;
        }
        let index = self.log.committed();
        if self.lease_valid() {
            return self.answer_read(ctx, origin, Ok(index));
        }
        let ls = self.ls();
        let round = ls.round + 1;
        ls.reads.push_back(PendingRead {
            ctx,
            origin,
            index,
            round,
        });
    }

    /// A quorum acknowledged a round sent less than `lease_ticks` ago, so no
    /// other leader can exist yet (its voters are still sticky to us).
    fn lease_valid(&self) -> bool {
        let Some(ls) = &self.leader_state else {
            return false;
        };
        if !self.cfg.leader_lease || ls.transfer.is_some() || ls.start_election_sent {
            return false;
        }
        let start = self.membership().quorum_index(|id| {
            if id == self.id {
                self.now
            } else {
                ls.progress.get(&id).map_or(0, |p| p.acked_tick)
            }
        });
        // acked_tick 0 means "never": no lease from it.
        start > 0 && self.now < start + self.cfg.lease_ticks
    }

    pub(super) fn confirm_reads(&mut self) {
        let Some(ls) = &self.leader_state else { return };
        let confirmed = self.membership().quorum_index(|id| {
            if id == self.id {
                ls.round
            } else {
                ls.progress.get(&id).map_or(0, |p| p.acked_round)
            }
        });
        while self
            .ls()
            .reads
            .front()
            .is_some_and(|r| r.round <= confirmed)
        {
            let r = self.ls().reads.pop_front().expect("checked");
            self.answer_read(r.ctx, r.origin, Ok(r.index));
        }
    }

    pub(super) fn answer_read(
        &mut self,
        ctx: u64,
        origin: Option<NodeId>,
        result: Result<Index, ReadError>,
    ) {
        match origin {
            None => self.out.events.push(match result {
                Ok(index) => Event::ReadReady { ctx, index },
                Err(error) => Event::ReadFailed { ctx, error },
            }),
            Some(to) => {
                let msg = ReadIndexReply {
                    term: self.term,
                    ctx,
                    result,
                };
                self.send(to, Message::ReadIndexReply(msg), false);
            }
        }
    }

    pub(super) fn handle_read_index(&mut self, from: NodeId, m: ReadIndexRequest) {
        if self.role == Role::Leader {
            self.register_read(m.ctx, Some(from));
        } else {
            self.answer_read(
                m.ctx,
                Some(from),
                Err(ReadError::NotLeader {
                    leader: self.leader,
                }),
            );
        }
    }

    /// An answer from a term this member has left: the read it answers is
    /// failed (the client retries) rather than left waiting forever.
    pub(super) fn handle_stale_read_index_reply(&mut self, m: ReadIndexReply) {
        if self.remote_reads.remove(&m.ctx) {
            self.out.events.push(Event::ReadFailed {
                ctx: m.ctx,
                error: ReadError::LeaderChanged,
            });
        }
    }

    pub(super) fn handle_read_index_reply(&mut self, m: ReadIndexReply) {
        if self.remote_reads.remove(&m.ctx) {
            self.out.events.push(match m.result {
                Ok(index) => Event::ReadReady { ctx: m.ctx, index },
                Err(error) => Event::ReadFailed { ctx: m.ctx, error },
            });
        }
    }
}

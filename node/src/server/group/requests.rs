//! The inbox: client writes, reads and watches, admin calls, and peer
//! messages, turned into calls on the core. A write is taken only by a leader
//! that applied an entry of its own term (until then its retry cache may miss
//! calls), and a retried call is answered from the retry cache instead of
//! being logged twice. A peer request's reply path is kept so that the core's
//! reply goes back the way the request came.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{
    AdminError, ClientError, ClientResult, Group, GroupMsg, KIND_INSTALL, KIND_READ, KIND_VOTE,
    ReplyPath, Served, Waiter, WatchWaiter,
};
use crate::core::{
    ConfChangeError, Membership, Message, NodeId, PeerInfo, ProposeError, Role, TransferError,
};
use crate::server::apply::{LoggedCall, encode_logged};
use crate::server::limits::Permit;
use crate::server::retry_cache::{CachedReply, CallKey, Lookup};

impl Group {
    pub(super) fn not_leader(&self) -> ClientError {
        let m = self.core.membership();
        let leader = self.core.leader().filter(|l| *l != self.node_id);
        ClientError::NotLeader {
            leader: leader.map(|id| m.peer(id).cloned().unwrap_or_else(|| PeerInfo::new(id))),
            peers: m.members().filter_map(|id| m.peer(id).cloned()).collect(),
        }
    }

    pub(super) fn handle(&mut self, msg: GroupMsg) {
        match msg {
            GroupMsg::Step { from, msg, reply } => self.step(from, msg, reply),
            GroupMsg::Write {
                client,
                call,
                answered_below,
                payload,
                permit,
                reply,
            } => self.write(
                LoggedCall {
                    client,
                    call,
                    answered_below,
                    logged_at_ms: now_ms(),
                    retry_ttl_ms: self.opts.retry_ttl_ms,
                    payload,
                },
                permit,
                reply,
            ),
            GroupMsg::Read {
                query,
                linearizable,
                reply,
            } => {
                if linearizable {
                    let ctx = self.next_read;
                    self.next_read += 1;
                    self.reads.insert(ctx, (query, reply));
                    self.core.read_index(ctx);
                } else {
                    self.serve(query, reply);
                }
            }
            GroupMsg::StaleRead {
                query,
                min_index,
                reply,
            } => self
                .ready_reads
                .entry(min_index)
                .or_default()
                .push((query, reply)),
            GroupMsg::Watch {
                index,
                level,
                reply,
            } => self.watches.push(WatchWaiter {
                index,
                level,
                reply,
            }),
            GroupMsg::ChangeMembership { req, reply } => {
                // New members are staged (sent the log) before they appear
                // in any configuration entry: the transport needs their
                // addresses now.
                let named = Membership {
                    voters: req.voters.iter().map(|p| (p.id, p.clone())).collect(),
                    listeners: req.listeners.iter().map(|p| (p.id, p.clone())).collect(),
                    old_voters: None,
                };
                self.transport.learn(&named);
                match self.core.change_membership(req) {
                    Ok(()) => self.conf_reply = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(self.conf_error(e)));
                    }
                }
            }
            GroupMsg::Transfer {
                target,
                timeout,
                reply,
            } => {
                let ticks = self.opts.ticks(timeout);
                match self.core.transfer_leadership(target, ticks) {
                    Ok(()) => self.transfer_reply = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(self.transfer_error(e)));
                    }
                }
            }
            GroupMsg::TakeSnapshot { reply } => {
                self.take_snapshot(Some(reply));
            }
            GroupMsg::PauseElections { pause } => self.core.set_elections_paused(pause),
            GroupMsg::InstallSnapshot {
                from,
                term,
                meta,
                files,
                reply,
            } => self.install_snapshot(from, term, meta, files, reply),
            GroupMsg::SnapshotFailed { to } => {
                self.sending_snapshot.remove(&to);
                self.core.report_snapshot_failure(to);
            }
            GroupMsg::PeerChanged { peer } => {
                if self.core.is_quiet() && self.core.membership().members().any(|m| m == peer) {
                    self.core.wake();
                }
            }
            GroupMsg::Shutdown { transfer, reply } => {
                self.shutdown_reply = Some(reply);
                let others = self.core.membership().voters.len() > 1;
                if transfer && others && self.core.role() == Role::Leader {
                    let (tx, _rx) = oneshot::channel();
                    let ticks = self.opts.ticks(self.opts.shutdown_transfer_timeout);
                    if self.core.transfer_leadership(None, ticks).is_ok() {
                        self.transfer_reply = Some(tx);
                    }
                }
            }
        }
    }

    pub(super) fn conf_error(&self, e: ConfChangeError) -> AdminError {
        match e {
            ConfChangeError::NotLeader { .. } => AdminError::NotLeader {
                leader: self.leader_peer(),
            },
            e => AdminError::Failed(e.to_string()),
        }
    }

    pub(super) fn transfer_error(&self, e: TransferError) -> AdminError {
        match e {
            TransferError::NotLeader { .. } => AdminError::NotLeader {
                leader: self.leader_peer(),
            },
            e => AdminError::Failed(e.to_string()),
        }
    }

    fn leader_peer(&self) -> Option<PeerInfo> {
        let id = self.core.leader()?;
        Some(
            self.core
                .membership()
                .peer(id)
                .cloned()
                .unwrap_or_else(|| PeerInfo::new(id)),
        )
    }

    pub(super) fn step(&mut self, from: NodeId, msg: Message, reply: ReplyPath) {
        match reply {
            ReplyPath::None => {}
            ReplyPath::Stream(s) => {
                let same = self
                    .append_sinks
                    .get(&from)
                    .is_some_and(|old| old.same_channel(&s));
                if !same {
                    self.append_sinks.insert(from, s);
                }
            }
            ReplyPath::Once(tx) => {
                let key = match &msg {
                    Message::RequestVote(v) => (from, KIND_VOTE, v.pre_vote as u64),
                    Message::ReadIndex(r) => (from, KIND_READ, r.ctx),
                    // The key the core's InstallSnapshotReply is routed by;
                    // any other key would leave the leader's transfer
                    // waiting for an answer that never comes.
                    Message::InstallSnapshot(_) => (from, KIND_INSTALL, 0),
                    _ => (from, 0, 0),
                };
                if self.once.len() > 4096 {
                    self.once.retain(|_, tx| !tx.is_closed());
                }
                self.once.insert(key, tx);
            }
        }
        if let Message::InstallSnapshotReply(_) = &msg {
            self.sending_snapshot.remove(&from);
        }
        self.core.step(from, msg);
    }

    fn write(&mut self, call: LoggedCall, permit: Permit, reply: oneshot::Sender<ClientResult>) {
        if self.core.role() != Role::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        // Until the leader applied an entry of its own term, its retry cache
        // may miss calls its predecessors committed: a retry would be logged
        // again (then skipped when applied, but answered with another index).
        let term = self.core.term();
        if self.core.log().term(self.applier.applied_index()) != Some(term) {
            let _ = reply.send(Err(ClientError::NotReady { term }));
            return;
        }
        let key = (!call.client.is_empty()).then(|| CallKey {
            client: call.client.clone(),
            call: call.call,
        });
        if let Some(key) = &key {
            match self.applier.retry_cache().lookup(key, call.logged_at_ms) {
                Lookup::New => {}
                Lookup::Done(r) => {
                    let _ = reply.send(cached(r));
                    return;
                }
                Lookup::Answered { below } => {
                    let _ = reply.send(Err(ClientError::StateMachine {
                        message: Lookup::answered_message(key.call, below),
                        rejected_before_logging: true,
                    }));
                    return;
                }
                Lookup::Pending { index } => {
                    if let Some(term) = self.core.log().term(index) {
                        self.writes.entry(index).or_default().push(Waiter {
                            term,
                            key: Some(key.clone()),
                            reply,
                            _permit: Some(permit),
                        });
                        return;
                    }
                    self.applier.retry_cache().abandoned(key, index);
                }
            }
        }
        if let Err(e) = self
            .applier
            .state_machine()
            .start_transaction(&call.payload)
        {
            let _ = reply.send(Err(ClientError::StateMachine {
                message: e.to_string(),
                rejected_before_logging: true,
            }));
            return;
        }
        let data = encode_logged(call);
        match self.core.propose(data) {
            Ok((term, index)) => {
                if let Some(key) = &key {
                    self.applier.retry_cache().appended(key.clone(), index);
                }
                self.writes.entry(index).or_default().push(Waiter {
                    term,
                    key,
                    reply,
                    _permit: Some(permit),
                });
            }
            Err(ProposeError::NotLeader { .. }) => {
                let _ = reply.send(Err(self.not_leader()));
            }
            Err(ProposeError::SteppingDown) => {
                let _ = reply.send(Err(ClientError::SteppingDown));
            }
        }
    }

    pub(super) fn serve(&mut self, query: Bytes, reply: oneshot::Sender<ClientResult>) {
        let index = self.applier.applied_index();
        let result = self
            .applier
            .state_machine()
            .query(&query)
            .map(|payload| Served { index, payload })
            .map_err(|e| ClientError::StateMachine {
                message: e.to_string(),
                rejected_before_logging: true,
            });
        let _ = reply.send(result);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn cached(r: CachedReply) -> ClientResult {
    r.result
        .map(|payload| Served {
            index: r.index,
            payload,
        })
        .map_err(|message| ClientError::StateMachine {
            message,
            rejected_before_logging: false,
        })
}

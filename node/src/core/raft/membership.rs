//! Membership changes through joint consensus. New voters are first staged
//! (sent the log) until caught up, then the joint membership and the final
//! one are appended, each only after the previous one committed. One change
//! at a time; staging that stops progressing is abandoned, and a leader that
//! is no longer a voter steps down once the final membership commits.

use std::collections::BTreeSet;

use super::{ConfChange, ConfChangeMode, ConfChangeRequest, ConfPhase, Progress, RaftCore};
use crate::core::error::ConfChangeError;
use crate::core::membership::{Membership, PeerInfo};
use crate::core::ready::Event;
use crate::core::types::{EntryPayload, NodeId, Role};

impl RaftCore {
    /// Starts a membership change; completion is reported by
    /// `Event::ConfChangeDone`. Errors here mean nothing was started.
    pub fn change_membership(&mut self, req: ConfChangeRequest) -> Result<(), ConfChangeError> {
        if self.role == Role::Leader {
            self.wake();
            self.active_at = self.now;
        }
        let Some(ls) = &self.leader_state else {
            return Err(ConfChangeError::NotLeader {
                leader: self.leader,
            });
        };
        if ls.transfer.is_some() {
            return Err(ConfChangeError::SteppingDown);
        }
        if ls.conf_change.is_some() || self.log.membership_index() > self.log.committed() {
            return Err(ConfChangeError::InProgress);
        }
        let current = self.membership().clone();
        let target = match &req.mode {
            ConfChangeMode::SetUnconditionally => {
                Membership::from_lists(&req.voters, &req.listeners)?
            }
            ConfChangeMode::CompareAndSet { voters, listeners } => {
                let expected = Membership::from_lists(voters, listeners)?;
                if !expected.same_members(&current) {
                    return Err(ConfChangeError::CompareMismatch {
                        current: Box::new(current),
                    });
                }
                Membership::from_lists(&req.voters, &req.listeners)?
            }
            ConfChangeMode::Add => {
                let mut voters: Vec<PeerInfo> = current.voters.values().cloned().collect();
                let mut listeners: Vec<PeerInfo> = current
                    .listeners
                    .values()
                    .filter(|p| !req.voters.iter().any(|v| v.id == p.id))
                    .cloned()
                    .collect();
                for v in &req.voters {
                    match voters.iter_mut().find(|p| p.id == v.id) {
                        Some(p) => *p = v.clone(),
                        None => voters.push(v.clone()),
                    }
                }
                for l in &req.listeners {
                    match listeners.iter_mut().find(|p| p.id == l.id) {
                        Some(p) => *p = l.clone(),
                        None => listeners.push(l.clone()),
                    }
                }
                Membership::from_lists(&voters, &listeners)?
            }
        };
        if target == current {
            self.out
                .events
                .push(Event::ConfChangeDone(Ok(self.log.membership_index())));
            return Ok(());
        }
        // New voters are staged until they caught up. Past cluster level 1,
        // new listeners are too: a member must report a version that knows
        // the group's level before it gets any part in the group, or it
        // would apply the log the old way (see `level.rs`).
        let required_level = self.log_level();
        let staged: BTreeSet<NodeId> = target
            .voters
            .keys()
            .filter(|id| !current.voters.contains_key(id))
            .chain(
                target
                    .listeners
                    .keys()
                    .filter(|id| required_level > 1 && !current.contains(**id)),
            )
            .copied()
            .collect();
        let next = self.log.last_index() + 1;
        let now = self.now;
        let me = self.id;
        let ls = self.ls();
        for id in target.members() {
            // A member removed a moment ago and added again is no longer
            // departing: its progress must stay.
            ls.departing.remove(&id);
            if id != me {
                ls.progress.entry(id).or_insert_with(|| Progress::new(next));
            }
        }
        let matches = staged.iter().map(|id| (*id, 0)).collect();
        ls.conf_change = Some(ConfChange {
            target,
            phase: ConfPhase::Staging {
                staged,
                last_progress_tick: now,
                matches,
            },
            notify: true,
            required_level,
        });
        ls.broadcast_pending = true;
        self.check_staging();
        Ok(())
    }

    /// Moves a staged change to joint consensus once every new voter is
    /// within `staging_catch_up_gap` of the leader's log.
    pub(super) fn check_staging(&mut self) {
        let last = self.log.last_index();
        let gap = self.cfg.staging_catch_up_gap;
        let Some(ls) = &self.leader_state else { return };
        let Some(ConfChange {
            phase: ConfPhase::Staging { staged, .. },
            target,
            required_level,
            ..
        }) = &ls.conf_change
        else {
            return;
        };
        // A member whose version does not know the group's level would apply
        // the log the old way: it stays staged (and the change times out).
        let caught_up = staged.iter().all(|id| {
            ls.progress
                .get(id)
                .is_some_and(|p| p.match_index + gap >= last && p.match_index > 0)
                && self.reported_level(*id) >= *required_level
        });
        if !caught_up {
            return;
        }
        let target = target.clone();
        let current = self.membership().clone();
        if target.voters.keys().eq(current.voters.keys()) {
            // Only listeners, addresses or priorities change: quorums stay
            // the same, so no joint phase is needed.
            let (_, index) = self.append_entry(EntryPayload::Membership(target));
            self.set_phase(ConfPhase::Final { index });
        } else {
            let joint = Membership {
                voters: target.voters.clone(),
                old_voters: Some(current.voters.clone()),
                listeners: target.listeners.clone(),
            };
            let (_, index) = self.append_entry(EntryPayload::Membership(joint));
            self.set_phase(ConfPhase::Joint { index });
        }
        self.maybe_commit();
    }

    fn set_phase(&mut self, phase: ConfPhase) {
        if let Some(cc) = self.ls().conf_change.as_mut() {
            cc.phase = phase;
        }
    }

    pub(super) fn check_staging_timeout(&mut self) {
        let now = self.now;
        let timeout = self.cfg.staging_timeout_ticks;
        let ls = self.ls();
        let Some(ConfChange {
            phase:
                ConfPhase::Staging {
                    staged,
                    last_progress_tick,
                    matches,
                },
            ..
        }) = &mut ls.conf_change
        else {
            return;
        };
        for id in staged.iter() {
            let m = ls.progress.get(id).map_or(0, |p| p.match_index);
            let seen = matches.entry(*id).or_insert(0);
            if m > *seen {
                *seen = m;
                *last_progress_tick = now;
            }
        }
        if now - *last_progress_tick < timeout {
            return;
        }
        let peers: Vec<NodeId> = staged.iter().copied().collect();
        let notify = ls.conf_change.take().is_some_and(|c| c.notify);
        self.sync_progress_with_membership();
        if notify {
            self.out.events.push(Event::ConfChangeDone(Err(
                ConfChangeError::StagingTimeout { peers },
            )));
        }
    }

    /// Joint committed → append the final membership; final committed → done
    /// (and step down if this leader is no longer a voter).
    pub(super) fn advance_conf_change(&mut self) {
        let commit = self.log.committed();
        let Some(cc) = self
            .leader_state
            .as_ref()
            .and_then(|l| l.conf_change.clone())
        else {
            return;
        };
        match cc.phase {
            ConfPhase::Joint { index } if commit >= index => {
                let (_, index) = self.append_entry(EntryPayload::Membership(cc.target.clone()));
                self.set_phase(ConfPhase::Final { index });
                self.maybe_commit();
            }
            ConfPhase::Final { index } if commit >= index => {
                self.ls().conf_change = None;
                if cc.notify {
                    self.out.events.push(Event::ConfChangeDone(Ok(index)));
                }
                if !self.membership().is_voter(self.id) {
                    self.become_follower(self.term, None);
                }
            }
            _ => {}
        }
    }
}

/// The final membership a joint one leads to.
pub(super) fn leave_joint(m: &Membership) -> Membership {
    Membership {
        voters: m.voters.clone(),
        old_voters: None,
        listeners: m.listeners.clone(),
    }
}

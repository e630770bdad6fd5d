//! The group's cluster level: which replicated behaviour is on. A leader
//! raises it with a `ClusterLevel` entry once every member (voters and
//! listeners) has reported, in its append replies, a version that knows the
//! level; from that entry on, every member applies the log the new way,
//! and before it every member applies it the old way, whatever version it
//! runs. That is what makes a rolling upgrade safe for behaviour that
//! decides what apply does (see `core::config::FEATURE_LEVEL`).
//!
//! The level only rises. A member learns it from the entries it hands out
//! to apply, and from the shell for what a snapshot covered. A member whose
//! version reports less than the group's level is not promoted to voter (its
//! staging never completes), so a group never goes back to an older level.

use super::RaftCore;
use crate::core::types::{Entry, EntryPayload, NodeId};

impl RaftCore {
    /// The shell restored state that covers a `ClusterLevel` entry the log
    /// no longer holds (a snapshot, at start or from the leader).
    pub fn note_cluster_level(&mut self, level: u32) {
        self.cluster_level = self.cluster_level.max(level);
    }

    /// Committed entries handed out to apply carry the level forward.
    pub(super) fn note_applied_levels(&mut self, entries: &[Entry]) {
        for e in entries {
            if let EntryPayload::ClusterLevel(level) = e.payload {
                self.note_cluster_level(level);
            }
        }
    }

    /// The highest level this member's log holds, applied or not: a level
    /// entry a new leader has not applied yet still binds what it admits.
    pub(super) fn log_level(&self) -> u32 {
        let (from, to) = (self.apply_cursor + 1, self.log.last_index());
        let pending = (from <= to)
            .then(|| self.log.slice(from, to, usize::MAX))
            .flatten()
            .into_iter()
            .flatten()
            .filter_map(|e| match e.payload {
                EntryPayload::ClusterLevel(l) => Some(l),
                _ => None,
            });
        pending.fold(self.cluster_level, u32::max)
    }

    /// The level a member's version knows, as it reported it.
    pub(super) fn reported_level(&self, id: NodeId) -> u32 {
        if id == self.id {
            return self.cfg.feature_level;
        }
        self.leader_state
            .as_ref()
            .and_then(|ls| ls.progress.get(&id))
            // A version from before levels reports nothing: level 1.
            // Not heard from yet: unknown, which counts as too old.
            .map_or(0, |p| {
                if p.match_index > 0 {
                    p.feature_level.max(1)
                } else {
                    0
                }
            })
    }

    /// On a heartbeat: append a `ClusterLevel` entry once every member knows
    /// this leader's level and nothing else is under way.
    pub(super) fn maybe_raise_cluster_level(&mut self) {
        let target = self.cfg.feature_level;
        let Some(ls) = &self.leader_state else { return };
        if self.cluster_level >= target
            || ls.level_proposed
            || ls.conf_change.is_some()
            || ls.transfer.is_some()
            || !self.committed_in_term()
        {
            return;
        }
        let every_member_knows = self
            .membership()
            .members()
            .all(|id| self.reported_level(id) >= target);
        if every_member_knows {
            self.ls().level_proposed = true;
            self.append_entry(EntryPayload::ClusterLevel(target));
        }
    }
}

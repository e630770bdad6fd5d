//! The group's published view ([`GroupView`]): what status pages, groupInfo,
//! /readyz and /metrics read without asking the task. The task refreshes it
//! after every batch and allocates only for what changed.

use kuberaft_proto::v1 as pb;
use serde::Serialize;

use super::Group;
use crate::core::{Index, NodeId, PeerInfo, Role, Term};

/// A member as status pages show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerView {
    pub id: NodeId,
    pub address: String,
    pub priority: u32,
    pub voter: bool,
}

/// What the group looks like now, published after every batch for
/// groupInfo, /status, /readyz and /metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupView {
    pub group: String,
    pub state_machine: String,
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: Term,
    pub last_index: Index,
    pub commit_index: Index,
    pub applied_index: Index,
    pub snapshot_index: Index,
    pub peers: Vec<PeerView>,
    pub old_voters: Vec<NodeId>,
    /// (member, match index, commit index), on the leader.
    pub progress: Vec<(NodeId, Index, Index)>,
    pub storage_healthy: bool,
    pub storage_message: String,
    pub elections_paused: bool,
    pub leader_changes: u64,
    pub pending_requests: u64,
    pub retry_cache_hits: u64,
    /// Replies the retry cache holds for retries.
    pub retry_cache_entries: u64,
    /// Snapshots received from a leader and installed.
    pub snapshots_installed: u64,
    /// Idle and quiet: no heartbeats, no election timer (see
    /// `core::Config::quiesce`).
    pub quiet: bool,
    /// This member was in the group's configuration and the configuration
    /// in force has left it out: it takes no further part and can go.
    pub removed: bool,
    /// The group's cluster level as applied here (see
    /// `core::config::FEATURE_LEVEL`): a rolling upgrade is complete for the
    /// group once this reaches the new version's level.
    pub cluster_level: u32,
    /// The cluster level this member's version knows.
    pub feature_level: u32,
    /// The group's task has ended (removed, shut down or storage failed).
    pub stopped: bool,
}

impl GroupView {
    pub fn membership_pb(&self) -> pb::Configuration {
        let peer = |p: &PeerView, role: pb::PeerRole| pb::Peer {
            id: p.id,
            address: p.address.clone(),
            priority: p.priority,
            role: role as i32,
            ..Default::default()
        };
        pb::Configuration {
            peers: self
                .peers
                .iter()
                .map(|p| {
                    let role = if p.voter {
                        pb::PeerRole::Voter
                    } else {
                        pb::PeerRole::Listener
                    };
                    peer(p, role)
                })
                .collect(),
            old_peers: self
                .old_voters
                .iter()
                .map(|id| pb::Peer {
                    id: *id,
                    role: pb::PeerRole::Voter as i32,
                    ..Default::default()
                })
                .collect(),
            log_index: 0,
        }
    }
}

impl Group {
    pub(super) fn publish(&mut self) {
        let st = self.core.status();
        let m = self.core.membership();
        let peer = |p: &PeerInfo, voter| PeerView {
            id: p.id,
            address: p.address.clone(),
            priority: p.priority,
            voter,
        };
        // Runs after every batch: nothing is allocated unless it changed.
        let mut v = self.view.lock().expect("view lock");
        if v.state_machine != self.sm_name {
            v.state_machine = self.sm_name.clone();
        }
        let role = match st.role {
            Role::Leader => "leader",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Follower if m.is_listener(self.node_id) => "listener",
            Role::Follower => "follower",
        };
        if v.role != role {
            v.role = role.to_string();
        }
        v.leader = st.leader;
        v.term = st.term;
        v.last_index = st.last_index;
        v.commit_index = st.commit_index;
        v.applied_index = self.applier.applied_index();
        v.snapshot_index = self.last_snapshot;
        let members = || {
            m.voters
                .values()
                .map(|p| (p, true))
                .chain(m.listeners.values().map(|p| (p, false)))
        };
        let same = v.peers.len() == m.voters.len() + m.listeners.len()
            && v.peers.iter().zip(members()).all(|(a, (p, voter))| {
                a.id == p.id
                    && a.address == p.address
                    && a.priority == p.priority
                    && a.voter == voter
            });
        if !same {
            v.peers = members().map(|(p, voter)| peer(p, voter)).collect();
        }
        v.old_voters.clear();
        v.old_voters
            .extend(m.old_voters.iter().flat_map(|o| o.keys().copied()));
        if st.role == Role::Leader || !v.progress.is_empty() {
            v.progress = self.core.progress();
        }
        v.storage_healthy = self.storage_error.is_none();
        match &self.storage_error {
            Some(e) if *e != v.storage_message => v.storage_message = e.clone(),
            Some(_) => {}
            None => v.storage_message.clear(),
        }
        v.elections_paused = st.elections_paused;
        v.leader_changes = self.leader_changes;
        v.pending_requests = self.limits.pending().0;
        v.retry_cache_hits = self.applier.retry_cache().hits();
        v.retry_cache_entries = self.applier.retry_cache().len() as u64;
        v.snapshots_installed = self.snapshots_installed;
        v.quiet = st.quiet;
        if st.removed && !v.removed {
            tracing::warn!(group = %self.label.group, member = self.node_id, "this member was removed from the group's configuration; it no longer votes or campaigns and can be shut down");
        }
        v.removed = st.removed;
        v.cluster_level = st.cluster_level;
        v.feature_level = self.opts.feature_level;
    }
}

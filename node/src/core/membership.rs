//! Group membership: voters, listeners and joint consensus.
//!
//! A [`Membership`] is what a configuration log entry carries. During a change
//! the leader appends a *joint* membership (`old_voters` set), in which every
//! decision needs a majority of the old voters **and** a majority of the new
//! ones, then the final membership. Listeners never vote and never count
//! towards a quorum; they only receive the log.
//!
//! Invariants kept by [`Membership::validate`]: at least one voter, no member
//! both voter and listener, no id 0, one entry per id.

use std::collections::BTreeMap;

use super::types::{Index, NodeId};

/// One member of a group as a configuration names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerInfo {
    pub id: NodeId,
    /// Where the member serves peer traffic; opaque to the core.
    pub address: String,
    /// Higher wins elections among equally up-to-date voters.
    pub priority: u32,
}

impl PeerInfo {
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            address: String::new(),
            priority: 0,
        }
    }

    pub fn with_priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }
}

/// Why a proposed membership is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("a configuration needs at least one voter")]
    NoVoters,
    #[error("member id 0 is reserved; give every member a non-zero id")]
    ZeroId,
    #[error("member {0} is listed more than once; list each member id once")]
    DuplicateId(NodeId),
    #[error("member {0} is both a voter and a listener; make it one or the other")]
    VoterAndListener(NodeId),
}

/// The members of a group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: BTreeMap<NodeId, PeerInfo>,
    /// `Some` during joint consensus: the outgoing voters.
    pub old_voters: Option<BTreeMap<NodeId, PeerInfo>>,
    pub listeners: BTreeMap<NodeId, PeerInfo>,
}

impl Membership {
    /// A membership of the given voters and no listeners.
    pub fn with_voters(voters: impl IntoIterator<Item = PeerInfo>) -> Self {
        Self {
            voters: voters.into_iter().map(|p| (p.id, p)).collect(),
            ..Self::default()
        }
    }

    /// Builds a membership from lists, rejecting duplicates (which a map
    /// would otherwise silently merge).
    pub fn from_lists(
        voters: &[PeerInfo],
        listeners: &[PeerInfo],
    ) -> Result<Self, MembershipError> {
        let mut m = Membership::default();
        for p in voters {
            if m.voters.insert(p.id, p.clone()).is_some() {
                return Err(MembershipError::DuplicateId(p.id));
            }
        }
        for p in listeners {
            if m.voters.contains_key(&p.id) {
                return Err(MembershipError::VoterAndListener(p.id));
            }
            if m.listeners.insert(p.id, p.clone()).is_some() {
                return Err(MembershipError::DuplicateId(p.id));
            }
        }
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), MembershipError> {
        if self.voters.is_empty() {
            return Err(MembershipError::NoVoters);
        }
        if self.members().any(|id| id == 0) {
            return Err(MembershipError::ZeroId);
        }
        if let Some(id) = self.listeners.keys().find(|id| self.is_voter(**id)) {
            return Err(MembershipError::VoterAndListener(*id));
        }
        Ok(())
    }

    pub fn is_joint(&self) -> bool {
        self.old_voters.is_some()
    }

    /// Votes in at least one of the (possibly joint) voter sets.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains_key(&id)
            || self
                .old_voters
                .as_ref()
                .is_some_and(|o| o.contains_key(&id))
    }

    pub fn is_listener(&self, id: NodeId) -> bool {
        self.listeners.contains_key(&id) && !self.is_voter(id)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.listeners.contains_key(&id)
    }

    /// Every member id, voters (old and new) and listeners, each once.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        let mut ids: Vec<NodeId> = self.voters.keys().copied().collect();
        if let Some(old) = &self.old_voters {
            ids.extend(old.keys().copied());
        }
        ids.extend(self.listeners.keys().copied());
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
    }

    /// Number of distinct members.
    pub fn len(&self) -> usize {
        self.members().count()
    }

    pub fn is_empty(&self) -> bool {
        self.voters.is_empty() && self.listeners.is_empty()
    }

    pub fn peer(&self, id: NodeId) -> Option<&PeerInfo> {
        self.voters
            .get(&id)
            .or_else(|| self.old_voters.as_ref().and_then(|o| o.get(&id)))
            .or_else(|| self.listeners.get(&id))
    }

    pub fn priority(&self, id: NodeId) -> u32 {
        self.peer(id).map_or(0, |p| p.priority)
    }

    /// The largest index that a quorum (both majorities when joint) has
    /// reached, given each voter's index. 0 when there are no voters.
    pub fn quorum_index(&self, index_of: impl Fn(NodeId) -> Index) -> Index {
        let new = majority_index(self.voters.keys().map(|id| index_of(*id)).collect());
        match &self.old_voters {
            Some(old) => new.min(majority_index(old.keys().map(|id| index_of(*id)).collect())),
            None => new,
        }
    }

    /// Whether the voters for which `yes` holds form a quorum.
    pub fn has_quorum(&self, yes: impl Fn(NodeId) -> bool) -> bool {
        self.quorum_index(|id| u64::from(yes(id))) == 1
    }

    /// Whether a quorum is still reachable when the voters for which `no`
    /// holds are lost for sure.
    pub fn quorum_possible(&self, no: impl Fn(NodeId) -> bool) -> bool {
        self.has_quorum(|id| !no(id))
    }

    /// Same voters, listeners and joint state, ignoring addresses and priorities.
    pub fn same_members(&self, other: &Membership) -> bool {
        let keys = |m: &BTreeMap<NodeId, PeerInfo>| m.keys().copied().collect::<Vec<_>>();
        keys(&self.voters) == keys(&other.voters)
            && keys(&self.listeners) == keys(&other.listeners)
            && self.old_voters.as_ref().map(keys) == other.old_voters.as_ref().map(keys)
    }
}

/// The value reached by a majority of `values`: sort descending and take the
/// element at position n/2. 0 for an empty set, so an empty voter set never
/// commits anything.
fn majority_index(mut values: Vec<Index>) -> Index {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voters(ids: &[NodeId]) -> BTreeMap<NodeId, PeerInfo> {
        ids.iter().map(|id| (*id, PeerInfo::new(*id))).collect()
    }

    #[test]
    fn t10_majority_of_three_and_four() {
        let m = Membership::with_voters([1, 2, 3].map(PeerInfo::new));
        assert_eq!(m.quorum_index(|id| [0, 5, 3, 9][id as usize]), 5);
        let m = Membership::with_voters([1, 2, 3, 4].map(PeerInfo::new));
        // 4 voters need 3: sorted desc 9,5,3,1 -> 3.
        assert_eq!(m.quorum_index(|id| [0, 5, 3, 9, 1][id as usize]), 3);
    }

    #[test]
    fn t10_joint_needs_both_majorities() {
        let m = Membership {
            voters: voters(&[3, 4, 5]),
            old_voters: Some(voters(&[1, 2, 3])),
            listeners: BTreeMap::new(),
        };
        // Old majority {1,2} at 10, new set only 3 at 10 -> new majority at 0.
        assert_eq!(m.quorum_index(|id| if id <= 3 { 10 } else { 0 }), 0);
        assert!(!m.has_quorum(|id| id <= 2));
        assert!(m.has_quorum(|id| id == 1 || id == 3 || id == 4));
    }

    #[test]
    fn t10_validation_errors() {
        assert_eq!(
            Membership::from_lists(&[], &[]),
            Err(MembershipError::NoVoters)
        );
        let p = PeerInfo::new(1);
        assert_eq!(
            Membership::from_lists(&[p.clone(), p.clone()], &[]),
            Err(MembershipError::DuplicateId(1))
        );
        assert_eq!(
            Membership::from_lists(std::slice::from_ref(&p), std::slice::from_ref(&p)),
            Err(MembershipError::VoterAndListener(1))
        );
        assert_eq!(
            Membership::from_lists(&[PeerInfo::new(0)], &[]),
            Err(MembershipError::ZeroId)
        );
    }
}

//! Conversions between the core's types and the `kuberaft.v1` protobufs.
//!
//! Used by storage (log records are encoded as `LogEntry` messages) and by the
//! rpc layer. Decoding never panics: a message missing a required part is a
//! [`DecodeError`] that names the part.

use kuberaft_proto::v1 as pb;

use crate::core::{Entry, EntryPayload, Membership, PeerInfo};

/// A protobuf that does not describe a valid core value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("log entry {index} has no payload")]
    MissingPayload { index: u64 },
    #[error("configuration is invalid: {0}")]
    Membership(#[from] crate::core::MembershipError),
    #[error("malformed protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

pub fn peer_to_pb(p: &PeerInfo, role: pb::PeerRole) -> pb::Peer {
    pb::Peer {
        id: p.id,
        address: p.address.clone(),
        priority: p.priority,
        role: role as i32,
        ..Default::default()
    }
}

pub fn peer_from_pb(p: &pb::Peer) -> PeerInfo {
    PeerInfo {
        id: p.id,
        address: p.address.clone(),
        priority: p.priority,
    }
}

pub fn membership_to_pb(m: &Membership) -> pb::Configuration {
    let voters = m
        .voters
        .values()
        .map(|p| peer_to_pb(p, pb::PeerRole::Voter));
    let listeners = m
        .listeners
        .values()
        .map(|p| peer_to_pb(p, pb::PeerRole::Listener));
    pb::Configuration {
        peers: voters.chain(listeners).collect(),
        old_peers: m
            .old_voters
            .iter()
            .flat_map(|o| o.values())
            .map(|p| peer_to_pb(p, pb::PeerRole::Voter))
            .collect(),
        log_index: 0,
    }
}

/// An empty configuration decodes to the empty membership (a member that
/// has not been added to a group yet); anything else must validate.
pub fn membership_from_pb(c: &pb::Configuration) -> Result<Membership, DecodeError> {
    let (listeners, voters): (Vec<&pb::Peer>, Vec<&pb::Peer>) = c
        .peers
        .iter()
        .partition(|p| p.role() == pb::PeerRole::Listener);
    let voters: Vec<PeerInfo> = voters.into_iter().map(peer_from_pb).collect();
    let listeners: Vec<PeerInfo> = listeners.into_iter().map(peer_from_pb).collect();
    if voters.is_empty() && listeners.is_empty() && c.old_peers.is_empty() {
        return Ok(Membership::default());
    }
    let mut m = Membership::from_lists(&voters, &listeners)?;
    if !c.old_peers.is_empty() {
        let old: Vec<PeerInfo> = c.old_peers.iter().map(peer_from_pb).collect();
        m.old_voters = Some(Membership::from_lists(&old, &[])?.voters);
    }
    Ok(m)
}

pub fn entry_to_pb(e: &Entry) -> pb::LogEntry {
    let payload = match &e.payload {
        EntryPayload::Noop => pb::log_entry::Payload::NoOp(pb::NoOp {}),
        EntryPayload::Command(data) => pb::log_entry::Payload::Command(data.clone()),
        EntryPayload::Membership(m) => pb::log_entry::Payload::Configuration(membership_to_pb(m)),
    };
    pb::LogEntry {
        term: e.term,
        index: e.index,
        payload: Some(payload),
    }
}

pub fn entry_from_pb(e: pb::LogEntry) -> Result<Entry, DecodeError> {
    let payload = match e.payload {
        None => return Err(DecodeError::MissingPayload { index: e.index }),
        Some(pb::log_entry::Payload::NoOp(_)) => EntryPayload::Noop,
        Some(pb::log_entry::Payload::Command(data)) => EntryPayload::Command(data),
        Some(pb::log_entry::Payload::Configuration(c)) => {
            EntryPayload::Membership(membership_from_pb(&c)?)
        }
    };
    Ok(Entry {
        term: e.term,
        index: e.index,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use prost::Message;

    use super::*;

    #[test]
    fn entries_round_trip_including_joint_membership() {
        let mut m = Membership::from_lists(
            &[PeerInfo::new(1), PeerInfo::new(2).with_priority(3)],
            &[PeerInfo::new(9)],
        )
        .unwrap();
        m.old_voters = Some(Membership::with_voters([PeerInfo::new(1)]).voters);
        for payload in [
            EntryPayload::Noop,
            EntryPayload::Command(Bytes::from_static(b"abc")),
            EntryPayload::Membership(m),
        ] {
            let e = Entry {
                term: 3,
                index: 7,
                payload,
            };
            let bytes = entry_to_pb(&e).encode_to_vec();
            let back = entry_from_pb(pb::LogEntry::decode(bytes.as_slice()).unwrap()).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn invalid_configuration_is_an_error() {
        let dup = pb::Configuration {
            peers: vec![
                peer_to_pb(&PeerInfo::new(1), pb::PeerRole::Voter),
                peer_to_pb(&PeerInfo::new(1), pb::PeerRole::Voter),
            ],
            ..Default::default()
        };
        assert!(matches!(
            membership_from_pb(&dup),
            Err(DecodeError::Membership(_))
        ));
        let none = pb::LogEntry {
            term: 1,
            index: 1,
            payload: None,
        };
        assert_eq!(
            entry_from_pb(none),
            Err(DecodeError::MissingPayload { index: 1 })
        );
    }
}

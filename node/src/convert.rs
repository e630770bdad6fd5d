//! Conversions between the core's types and the `kuberaft.v1` protobufs.
//!
//! Used by storage (log records are encoded as `LogEntry` messages) and by the
//! rpc layer. Decoding never panics: a message missing a required part is a
//! [`DecodeError`] that names the part.

use kuberaft_proto::v1 as pb;

use bytes::Bytes;

use crate::core::{
    AppendEntries, AppendEntriesReply, AppendResult, Entry, EntryPayload, InstallSnapshotReply,
    Membership, NodeId, PeerInfo, ReadError, ReadIndexReply, ReadIndexRequest, RequestVote,
    RequestVoteReply, StartElection, VoteRefusal,
};

/// A protobuf that does not describe a valid core value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("log entry {index} has no payload")]
    MissingPayload { index: u64 },
    #[error("configuration is invalid: {0}")]
    Membership(#[from] crate::core::MembershipError),
    #[error("malformed protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid peer message: {0}")]
    Invalid(String),
    #[error("{field} {value} is beyond the largest possible ({MAX_TERM_OR_INDEX})")]
    OutOfRange { field: &'static str, value: u64 },
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
        EntryPayload::ClusterLevel(level) => {
            pb::log_entry::Payload::ClusterLevel(pb::ClusterLevel { level: *level })
        }
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
        Some(pb::log_entry::Payload::ClusterLevel(c)) => EntryPayload::ClusterLevel(c.level),
    };
    Ok(Entry {
        term: e.term,
        index: e.index,
        payload,
    })
}

// ---------------------------------------------------------------------------
// Peer messages. Each function takes the group id and the sender/receiver
// the protobuf names, so the transport can multiplex groups on one stream.
// ---------------------------------------------------------------------------

pub fn group_pb(group: &Bytes) -> Option<pb::GroupId> {
    Some(pb::GroupId { id: group.clone() })
}

fn term_index(term: u64, index: u64) -> Option<pb::TermIndex> {
    Some(pb::TermIndex { term, index })
}

pub fn append_to_pb(
    group: &Bytes,
    from: NodeId,
    to: NodeId,
    m: &AppendEntries,
) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        group_id: group_pb(group),
        leader_id: from,
        follower_id: to,
        leader_term: m.term,
        previous: term_index(m.prev_term, m.prev_index),
        entries: m.entries.iter().map(entry_to_pb).collect(),
        leader_commit: m.leader_commit,
        call_id: m.round,
        commit_infos: Vec::new(),
        quiesce: m.quiesce,
    }
}

/// The largest term or log index a peer may send. Far beyond any real
/// cluster's (2^62 elections at a million a second take 146,000 years), and
/// low enough that `+ 1` anywhere in the core cannot overflow: a forged or
/// corrupted number is refused here instead.
pub const MAX_TERM_OR_INDEX: u64 = 1 << 62;

/// `v` if it is a term or index a peer may send; `field` names it in the
/// error.
pub fn bounded(field: &'static str, v: u64) -> Result<u64, DecodeError> {
    if v > MAX_TERM_OR_INDEX {
        return Err(DecodeError::OutOfRange { field, value: v });
    }
    Ok(v)
}

pub fn append_from_pb(r: pb::AppendEntriesRequest) -> Result<AppendEntries, DecodeError> {
    let prev = r.previous.unwrap_or_default();
    bounded("leader term", r.leader_term)?;
    bounded("previous term", prev.term)?;
    bounded("previous index", prev.index)?;
    bounded("leader commit", r.leader_commit)?;
    // The round comes back in the reply, where the leader compares it with
    // its own counter; one no leader can reach is refused at either end.
    bounded("round", r.call_id)?;
    if r.entries.len() as u64 > MAX_TERM_OR_INDEX - prev.index {
        return Err(DecodeError::Invalid(
            "entries run past the largest index".into(),
        ));
    }
    let entries = r
        .entries
        .into_iter()
        .map(entry_from_pb)
        .collect::<Result<Vec<_>, _>>()?;
    // A leader's entries are contiguous and follow `previous`; anything else
    // is a malformed request, refused before the core sees it.
    for (i, e) in entries.iter().enumerate() {
        bounded("entry term", e.term)?;
        if e.index != prev.index + 1 + i as u64 {
            return Err(DecodeError::Invalid(format!(
                "entry {} does not follow previous index {} contiguously",
                e.index, prev.index
            )));
        }
    }
    Ok(AppendEntries {
        term: r.leader_term,
        prev_index: prev.index,
        prev_term: prev.term,
        entries,
        leader_commit: r.leader_commit,
        round: r.call_id,
        quiesce: r.quiesce,
    })
}

pub fn append_reply_to_pb(
    group: &Bytes,
    from: NodeId,
    m: &AppendEntriesReply,
) -> pb::AppendEntriesReply {
    let result = match m.result {
        AppendResult::Success => pb::AppendResult::Success,
        AppendResult::NotLeader => pb::AppendResult::NotLeader,
        AppendResult::Inconsistency => pb::AppendResult::Inconsistency,
    };
    pb::AppendEntriesReply {
        group_id: group_pb(group),
        follower_id: from,
        term: m.term,
        result: result as i32,
        next_index: m.next_index,
        match_index: m.match_index,
        follower_commit: m.follower_commit,
        call_id: m.round,
        conflict_term: m.conflict_term,
        rejected_previous: m.rejected_prev,
        quiet: m.quiet,
        feature_level: m.feature_level,
    }
}

pub fn append_reply_from_pb(r: &pb::AppendEntriesReply) -> Result<AppendEntriesReply, DecodeError> {
    let result = match r.result() {
        pb::AppendResult::Success => AppendResult::Success,
        pb::AppendResult::NotLeader => AppendResult::NotLeader,
        pb::AppendResult::Inconsistency => AppendResult::Inconsistency,
        pb::AppendResult::Unspecified => {
            return Err(DecodeError::Invalid("append reply without a result".into()));
        }
    };
    Ok(AppendEntriesReply {
        term: bounded("term", r.term)?,
        result,
        match_index: bounded("match index", r.match_index)?,
        next_index: bounded("next index", r.next_index)?,
        conflict_term: bounded("conflict term", r.conflict_term)?,
        rejected_prev: bounded("rejected previous index", r.rejected_previous)?,
        follower_commit: bounded("follower commit", r.follower_commit)?,
        round: bounded("round", r.call_id)?,
        quiet: r.quiet,
        feature_level: r.feature_level,
    })
}

pub fn vote_to_pb(
    group: &Bytes,
    from: NodeId,
    to: NodeId,
    m: &RequestVote,
) -> pb::RequestVoteRequest {
    pb::RequestVoteRequest {
        group_id: group_pb(group),
        candidate_id: from,
        voter_id: to,
        term: m.term,
        last_entry: term_index(m.last_term, m.last_index),
        pre_vote: m.pre_vote,
        leadership_transfer: m.transfer,
        candidate_priority: m.priority,
    }
}

pub fn vote_from_pb(r: &pb::RequestVoteRequest) -> Result<RequestVote, DecodeError> {
    let last = r.last_entry.unwrap_or_default();
    Ok(RequestVote {
        term: bounded("term", r.term)?,
        last_index: bounded("last index", last.index)?,
        last_term: bounded("last term", last.term)?,
        pre_vote: r.pre_vote,
        transfer: r.leadership_transfer,
        priority: r.candidate_priority,
    })
}

const REFUSALS: [(VoteRefusal, &str); 5] = [
    (VoteRefusal::StaleTerm, "stale term"),
    (VoteRefusal::AlreadyVoted, "already voted in this term"),
    (VoteRefusal::LogBehind, "candidate's log is behind"),
    (VoteRefusal::LowerPriority, "candidate has lower priority"),
    (VoteRefusal::LeaderAlive, "a leader is alive"),
];

pub fn vote_reply_to_pb(group: &Bytes, from: NodeId, m: &RequestVoteReply) -> pb::RequestVoteReply {
    let reason = m
        .refusal
        .and_then(|r| REFUSALS.iter().find(|(k, _)| *k == r))
        .map_or("", |(_, s)| s);
    pb::RequestVoteReply {
        group_id: group_pb(group),
        voter_id: from,
        term: m.term,
        granted: m.granted(),
        pre_vote: m.pre_vote,
        reason: reason.to_string(),
    }
}

pub fn vote_reply_from_pb(r: &pb::RequestVoteReply) -> Result<RequestVoteReply, DecodeError> {
    let refusal = (!r.granted).then(|| {
        REFUSALS
            .iter()
            .find(|(_, s)| *s == r.reason)
            .map_or(VoteRefusal::StaleTerm, |(k, _)| *k)
    });
    Ok(RequestVoteReply {
        term: bounded("term", r.term)?,
        pre_vote: r.pre_vote,
        refusal,
    })
}

pub fn start_election_to_pb(
    group: &Bytes,
    from: NodeId,
    to: NodeId,
    m: &StartElection,
) -> pb::StartLeaderElectionRequest {
    pb::StartLeaderElectionRequest {
        group_id: group_pb(group),
        leader_id: from,
        target_id: to,
        leader_term: m.term,
        leader_last_entry: term_index(m.last_term, m.last_index),
    }
}

pub fn start_election_from_pb(
    r: &pb::StartLeaderElectionRequest,
) -> Result<StartElection, DecodeError> {
    let last = r.leader_last_entry.unwrap_or_default();
    Ok(StartElection {
        term: bounded("leader term", r.leader_term)?,
        last_index: bounded("last index", last.index)?,
        last_term: bounded("last term", last.term)?,
    })
}

pub fn read_index_to_pb(group: &Bytes, from: NodeId, m: &ReadIndexRequest) -> pb::ReadIndexRequest {
    pb::ReadIndexRequest {
        group_id: group_pb(group),
        follower_id: from,
        context: m.ctx,
        term: m.term,
    }
}

pub fn read_index_from_pb(r: &pb::ReadIndexRequest) -> Result<ReadIndexRequest, DecodeError> {
    Ok(ReadIndexRequest {
        term: bounded("term", r.term)?,
        ctx: r.context,
    })
}

pub fn read_index_reply_to_pb(group: &Bytes, m: &ReadIndexReply) -> pb::ReadIndexReply {
    use pb::raft_exception::Kind;
    let (success, read_index, exception) = match &m.result {
        Ok(index) => (true, *index, None),
        Err(e) => {
            let kind = match e {
                ReadError::NotLeader { leader } => Kind::NotLeader(pb::NotLeaderException {
                    suggested_leader: leader.map(|id| pb::Peer {
                        id,
                        ..Default::default()
                    }),
                    peers: Vec::new(),
                }),
                ReadError::SteppingDown => {
                    Kind::LeaderSteppingDown(pb::LeaderSteppingDownException {
                        message: e.to_string(),
                    })
                }
                ReadError::LeaderChanged => Kind::AlreadyClosed(pb::AlreadyClosedException {
                    message: e.to_string(),
                }),
            };
            (false, 0, Some(pb::RaftException { kind: Some(kind) }))
        }
    };
    pb::ReadIndexReply {
        group_id: group_pb(group),
        context: m.ctx,
        success,
        read_index,
        term: m.term,
        exception,
    }
}

pub fn read_index_reply_from_pb(r: &pb::ReadIndexReply) -> Result<ReadIndexReply, DecodeError> {
    use pb::raft_exception::Kind;
    let result = if r.success {
        Ok(bounded("read index", r.read_index)?)
    } else {
        Err(match r.exception.as_ref().and_then(|e| e.kind.as_ref()) {
            // Member 0 does not exist: a suggestion of it is no suggestion.
            Some(Kind::NotLeader(n)) => ReadError::NotLeader {
                leader: n
                    .suggested_leader
                    .as_ref()
                    .map(|p| p.id)
                    .filter(|id| *id != 0),
            },
            Some(Kind::LeaderSteppingDown(_)) => ReadError::SteppingDown,
            _ => ReadError::LeaderChanged,
        })
    };
    Ok(ReadIndexReply {
        term: bounded("term", r.term)?,
        ctx: r.context,
        result,
    })
}

pub fn install_reply_to_pb(
    group: &Bytes,
    from: NodeId,
    m: &InstallSnapshotReply,
) -> pb::InstallSnapshotReply {
    let result = if m.accepted {
        pb::InstallSnapshotResult::Success
    } else {
        pb::InstallSnapshotResult::NotLeader
    };
    pb::InstallSnapshotReply {
        group_id: group_pb(group),
        follower_id: from,
        term: m.term,
        result: result as i32,
        request_index: 0,
        snapshot_index: m.snapshot_index,
        message: String::new(),
    }
}

pub fn install_reply_from_pb(
    r: &pb::InstallSnapshotReply,
) -> Result<InstallSnapshotReply, DecodeError> {
    Ok(InstallSnapshotReply {
        term: bounded("term", r.term)?,
        snapshot_index: bounded("snapshot index", r.snapshot_index)?,
        accepted: matches!(
            r.result(),
            pb::InstallSnapshotResult::Success | pb::InstallSnapshotResult::AlreadyInstalled
        ),
    })
}

#[cfg(test)]
mod tests {
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
            EntryPayload::ClusterLevel(2),
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

    fn append_reply() -> AppendEntriesReply {
        AppendEntriesReply {
            term: 4,
            result: AppendResult::Inconsistency,
            match_index: 9,
            next_index: 11,
            conflict_term: 3,
            rejected_prev: 12,
            follower_commit: 8,
            round: 77,
            quiet: false,
            feature_level: 2,
        }
    }

    #[test]
    fn replies_round_trip() {
        let g = Bytes::from_static(b"g");
        let a = append_reply();
        assert_eq!(append_reply_from_pb(&append_reply_to_pb(&g, 2, &a)), Ok(a));
        for refusal in [None, Some(VoteRefusal::LogBehind)] {
            let v = RequestVoteReply {
                term: 5,
                pre_vote: true,
                refusal,
            };
            assert_eq!(vote_reply_from_pb(&vote_reply_to_pb(&g, 2, &v)), Ok(v));
        }
        for result in [Ok(41), Err(ReadError::NotLeader { leader: Some(3) })] {
            let r = ReadIndexReply {
                term: 6,
                ctx: 99,
                result,
            };
            assert_eq!(
                read_index_reply_from_pb(&read_index_reply_to_pb(&g, &r)),
                Ok(r)
            );
        }
        let i = InstallSnapshotReply {
            term: 7,
            snapshot_index: 500,
            accepted: true,
        };
        assert_eq!(
            install_reply_from_pb(&install_reply_to_pb(&g, 2, &i)),
            Ok(i)
        );
    }

    /// Sets one numeric field of every kind of reply to `v` and decodes it.
    fn decode_with(field: &str, v: u64) -> Result<(), DecodeError> {
        let g = Bytes::from_static(b"g");
        let mut a = append_reply_to_pb(&g, 2, &append_reply());
        let mut vote = vote_reply_to_pb(
            &g,
            2,
            &RequestVoteReply {
                term: 5,
                pre_vote: false,
                refusal: None,
            },
        );
        let read = ReadIndexReply {
            term: 6,
            ctx: 1,
            result: Ok(3),
        };
        let mut read = read_index_reply_to_pb(&g, &read);
        let install = InstallSnapshotReply {
            term: 7,
            snapshot_index: 5,
            accepted: true,
        };
        let mut install = install_reply_to_pb(&g, 2, &install);
        match field {
            "append term" => a.term = v,
            "match index" => a.match_index = v,
            "next index" => a.next_index = v,
            "conflict term" => a.conflict_term = v,
            "rejected previous index" => a.rejected_previous = v,
            "follower commit" => a.follower_commit = v,
            "round" => a.call_id = v,
            "vote term" => vote.term = v,
            "read term" => read.term = v,
            "read index" => read.read_index = v,
            "install term" => install.term = v,
            "snapshot index" => install.snapshot_index = v,
            _ => unreachable!("{field}"),
        }
        append_reply_from_pb(&a)?;
        vote_reply_from_pb(&vote)?;
        read_index_reply_from_pb(&read)?;
        install_reply_from_pb(&install)?;
        Ok(())
    }

    #[test]
    fn replies_with_numbers_past_the_bound_are_refused_naming_the_field() {
        let fields = [
            ("append term", "term"),
            ("match index", "match index"),
            ("next index", "next index"),
            ("conflict term", "conflict term"),
            ("rejected previous index", "rejected previous index"),
            ("follower commit", "follower commit"),
            ("round", "round"),
            ("vote term", "term"),
            ("read term", "term"),
            ("read index", "read index"),
            ("install term", "term"),
            ("snapshot index", "snapshot index"),
        ];
        for (which, named) in fields {
            assert_eq!(decode_with(which, MAX_TERM_OR_INDEX), Ok(()), "{which}");
            for v in [MAX_TERM_OR_INDEX + 1, u64::MAX] {
                let e = decode_with(which, v).unwrap_err();
                assert_eq!(
                    e,
                    DecodeError::OutOfRange {
                        field: named,
                        value: v
                    },
                    "{which}"
                );
                assert!(e.to_string().starts_with(&format!("{named} {v} ")), "{e}");
            }
        }
    }

    #[test]
    fn a_failed_read_ignores_its_index_and_member_0_is_no_leader() {
        let r = pb::ReadIndexReply {
            success: false,
            read_index: u64::MAX,
            exception: Some(pb::RaftException {
                kind: Some(pb::raft_exception::Kind::NotLeader(
                    pb::NotLeaderException {
                        suggested_leader: Some(pb::Peer::default()),
                        peers: Vec::new(),
                    },
                )),
            }),
            ..Default::default()
        };
        let got = read_index_reply_from_pb(&r).unwrap();
        assert_eq!(got.result, Err(ReadError::NotLeader { leader: None }));
    }

    #[test]
    fn append_requests_bound_their_round() {
        let a = AppendEntries {
            term: 1,
            prev_index: 0,
            prev_term: 0,
            entries: Vec::new(),
            leader_commit: 0,
            round: MAX_TERM_OR_INDEX,
            quiesce: false,
        };
        let g = Bytes::from_static(b"g");
        let mut r = append_to_pb(&g, 1, 2, &a);
        assert_eq!(append_from_pb(r.clone()), Ok(a));
        r.call_id = u64::MAX;
        assert_eq!(
            append_from_pb(r),
            Err(DecodeError::OutOfRange {
                field: "round",
                value: u64::MAX
            })
        );
    }
}

//! Arbitrary bytes decoded as every peer message, request or reply, and
//! converted for the core: converted or refused, never a panic, and nothing
//! out of bounds reaches the core.
#![no_main]

use kuberaft_node::convert::{self, MAX_TERM_OR_INDEX};
use kuberaft_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = pb::AppendEntriesRequest::decode(data)
        && let Ok(a) = convert::append_from_pb(r)
    {
        assert!(a.term <= MAX_TERM_OR_INDEX && a.prev_index <= MAX_TERM_OR_INDEX);
    }
    if let Ok(r) = pb::AppendEntriesReply::decode(data)
        && let Ok(a) = convert::append_reply_from_pb(&r)
    {
        let numbers = [
            a.term,
            a.match_index,
            a.next_index,
            a.conflict_term,
            a.rejected_prev,
            a.follower_commit,
            a.round,
        ];
        assert!(numbers.iter().all(|v| *v <= MAX_TERM_OR_INDEX));
    }
    if let Ok(r) = pb::RequestVoteReply::decode(data)
        && let Ok(v) = convert::vote_reply_from_pb(&r)
    {
        assert!(v.term <= MAX_TERM_OR_INDEX);
    }
    if let Ok(r) = pb::ReadIndexReply::decode(data)
        && let Ok(m) = convert::read_index_reply_from_pb(&r)
    {
        assert!(m.term <= MAX_TERM_OR_INDEX);
        assert!(m.result.is_err() || m.result.is_ok_and(|i| i <= MAX_TERM_OR_INDEX));
    }
    if let Ok(r) = pb::InstallSnapshotReply::decode(data)
        && let Ok(i) = convert::install_reply_from_pb(&r)
    {
        assert!(i.term <= MAX_TERM_OR_INDEX && i.snapshot_index <= MAX_TERM_OR_INDEX);
    }
    if let Ok(r) = pb::RequestVoteRequest::decode(data) {
        let _ = convert::vote_from_pb(&r);
    }
    if let Ok(r) = pb::StartLeaderElectionRequest::decode(data) {
        let _ = convert::start_election_from_pb(&r);
    }
    if let Ok(r) = pb::ReadIndexRequest::decode(data) {
        let _ = convert::read_index_from_pb(&r);
    }
    if let Ok(c) = pb::Configuration::decode(data) {
        let _ = convert::membership_from_pb(&c);
    }
    if let Ok(e) = pb::LogEntry::decode(data) {
        let _ = convert::entry_from_pb(e);
    }
});

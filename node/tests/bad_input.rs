//! Property tests of everything that decodes bytes from outside: log
//! records and whole segmented logs after arbitrary damage, snapshot files
//! of the built-in state machines and of the retry cache, and the peer
//! messages with arbitrary field values. Nothing may panic; damage is either
//! recovered (a prefix of what was written, never different data) or
//! refused with an error that says what and where.
//!
//! The same inputs are fuzz targets under `fuzz/` (cargo-fuzz).

use std::sync::Arc;

use bytes::Bytes;
use kuberaft_node::convert::{self, MAX_TERM_OR_INDEX};
use kuberaft_node::core::{Entry, EntryPayload};
use kuberaft_node::server::apply::{Applier, RETRY_CACHE_FILE};
use kuberaft_node::statemachine::builtin;
use kuberaft_node::storage::format::{Record, read_record};
use kuberaft_node::storage::fs::StdFs;
use kuberaft_node::storage::{LogOptions, LogStore, SegmentedLog};
use kuberaft_proto::v1 as pb;
use proptest::prelude::*;
use prost::Message;

fn options() -> LogOptions {
    LogOptions {
        // Small segments, so damage lands in closed and open ones.
        segment_size_max_bytes: 2048,
        preallocate_bytes: 1024,
        ..Default::default()
    }
}

#[derive(Clone, Debug)]
enum Damage {
    Truncate { file: usize, at: usize },
    Flip { file: usize, at: usize, xor: u8 },
    Append { file: usize, garbage: Vec<u8> },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(file, at)| Damage::Truncate { file, at }),
        (any::<usize>(), any::<usize>(), 1u8..=255).prop_map(|(file, at, xor)| Damage::Flip {
            file,
            at,
            xor
        }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(file, garbage)| Damage::Append { file, garbage }),
    ]
}

/// A number a peer might send: anything, mostly the edges of the bound.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..1000,
        Just(MAX_TERM_OR_INDEX),
        Just(MAX_TERM_OR_INDEX + 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_log_recovers_a_prefix_or_says_what_is_wrong(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..40),
        damage in damage(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(StdFs);
        let written: Vec<Entry> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Entry {
                term: 1,
                index: i as u64 + 1,
                payload: EntryPayload::Command(Bytes::from(p.clone())),
            })
            .collect();
        {
            let mut log = SegmentedLog::open(fs.clone(), dir.path(), options(), 0).unwrap();
            log.append(&written).unwrap();
            log.sync().unwrap();
        }
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        prop_assume!(!files.is_empty());
        let pick = |i: usize| files[i % files.len()].clone();
        match &damage {
            Damage::Truncate { file, at } => {
                let f = pick(*file);
                let len = std::fs::metadata(&f).unwrap().len() as usize;
                let data = std::fs::read(&f).unwrap();
                std::fs::write(&f, &data[..at % (len + 1)]).unwrap();
            }
            Damage::Flip { file, at, xor } => {
                let f = pick(*file);
                let mut data = std::fs::read(&f).unwrap();
                prop_assume!(!data.is_empty());
                let i = at % data.len();
                data[i] ^= xor;
                std::fs::write(&f, &data).unwrap();
            }
            Damage::Append { file, garbage } => {
                let f = pick(*file);
                let mut data = std::fs::read(&f).unwrap();
                data.extend_from_slice(garbage);
                std::fs::write(&f, &data).unwrap();
            }
        }
        match SegmentedLog::open(fs, dir.path(), options(), 0) {
            Ok(log) => {
                let last = log.last_index();
                prop_assert!(last as usize <= written.len());
                if last > 0 {
                    let got = log.entries(1, last).unwrap();
                    // Never different data: what survives is what was written.
                    prop_assert_eq!(&got[..], &written[..last as usize]);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains(&dir.path().display().to_string()) || msg.contains("segment"),
                    "the error names the damaged file: {}", msg
                );
            }
        }
    }

    #[test]
    fn arbitrary_bytes_are_never_a_panic_as_log_records(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        pos in 0usize..600,
    ) {
        match read_record(&bytes, pos) {
            Record::Valid { next, payload } => {
                prop_assert!(next <= bytes.len());
                prop_assert!(payload.len() < bytes.len());
            }
            Record::End | Record::Invalid { .. } => {}
        }
    }

    #[test]
    fn arbitrary_snapshot_files_are_restored_or_refused(
        sm in prop_oneof![Just("kv"), Just("counter")],
        data in prop::collection::vec(any::<u8>(), 0..256),
        cache in prop::collection::vec(any::<u8>(), 0..256),
        name_is_right in any::<bool>(),
    ) {
        let name = if name_is_right { sm.to_string() } else { "other".to_string() };
        let mut m = builtin(sm).unwrap();
        let _ = m.restore(7, &[(name.clone(), data.clone())]);
        let mut a = Applier::new(builtin(sm).unwrap(), 60_000);
        let files = vec![(name, data), (RETRY_CACHE_FILE.to_string(), cache)];
        if a.restore(7, &files).is_ok() {
            prop_assert_eq!(a.applied_index(), 7);
        }
    }

    #[test]
    fn peer_requests_with_any_numbers_are_converted_or_refused(
        term in any::<u64>(),
        prev in (any::<u64>(), any::<u64>()),
        commit in any::<u64>(),
        entries in prop::collection::vec((any::<u64>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..16)), 0..4),
        contiguous in any::<bool>(),
    ) {
        let entries: Vec<pb::LogEntry> = entries
            .into_iter()
            .enumerate()
            .map(|(i, (t, idx, data))| pb::LogEntry {
                term: t,
                index: if contiguous { prev.1.wrapping_add(1 + i as u64) } else { idx },
                payload: Some(pb::log_entry::Payload::Command(Bytes::from(data))),
            })
            .collect();
        let req = pb::AppendEntriesRequest {
            leader_term: term,
            previous: Some(pb::TermIndex { term: prev.0, index: prev.1 }),
            leader_commit: commit,
            entries,
            ..Default::default()
        };
        if let Ok(a) = convert::append_from_pb(req) {
            for v in [a.term, a.prev_index, a.prev_term, a.leader_commit] {
                prop_assert!(v <= MAX_TERM_OR_INDEX);
            }
            for (i, e) in a.entries.iter().enumerate() {
                prop_assert_eq!(e.index, a.prev_index + 1 + i as u64);
                prop_assert!(e.index <= MAX_TERM_OR_INDEX && e.term <= MAX_TERM_OR_INDEX);
            }
        }
        let vote = pb::RequestVoteRequest {
            term,
            last_entry: Some(pb::TermIndex { term: prev.0, index: prev.1 }),
            ..Default::default()
        };
        let ok = [term, prev.0, prev.1].iter().all(|v| *v <= MAX_TERM_OR_INDEX);
        prop_assert_eq!(convert::vote_from_pb(&vote).is_ok(), ok);
        let start = pb::StartLeaderElectionRequest {
            leader_term: term,
            leader_last_entry: Some(pb::TermIndex { term: prev.0, index: prev.1 }),
            ..Default::default()
        };
        prop_assert_eq!(convert::start_election_from_pb(&start).is_ok(), ok);
        let read = pb::ReadIndexRequest { term, ..Default::default() };
        prop_assert_eq!(convert::read_index_from_pb(&read).is_ok(), term <= MAX_TERM_OR_INDEX);
    }

    #[test]
    fn peer_replies_with_any_numbers_are_converted_or_refused(
        n in prop::array::uniform8(number()),
        result in -2i32..6,
        flags in any::<(bool, bool, bool)>(),
        reason in prop_oneof![Just(String::new()), Just("a leader is alive".to_string()), ".{0,20}"],
    ) {
        let within = |vs: &[u64]| vs.iter().all(|v| *v <= MAX_TERM_OR_INDEX);
        let append = pb::AppendEntriesReply {
            term: n[0],
            result,
            match_index: n[1],
            next_index: n[2],
            conflict_term: n[3],
            rejected_previous: n[4],
            follower_commit: n[5],
            call_id: n[6],
            quiet: flags.0,
            ..Default::default()
        };
        let known = (1..=3).contains(&result);
        match convert::append_reply_from_pb(&append) {
            Ok(a) => {
                prop_assert!(known);
                let got = [a.term, a.match_index, a.next_index, a.conflict_term, a.rejected_prev, a.follower_commit, a.round];
                prop_assert_eq!(&got[..], &n[..7]);
                prop_assert!(within(&got));
            }
            Err(_) => prop_assert!(!known || !within(&n[..7])),
        }
        let vote = pb::RequestVoteReply {
            term: n[0],
            granted: flags.0,
            pre_vote: flags.1,
            reason,
            ..Default::default()
        };
        match convert::vote_reply_from_pb(&vote) {
            Ok(v) => {
                prop_assert_eq!(v.term, n[0]);
                prop_assert!(v.term <= MAX_TERM_OR_INDEX);
                prop_assert_eq!(v.granted(), flags.0);
                prop_assert_eq!(v.pre_vote, flags.1);
            }
            Err(_) => prop_assert!(n[0] > MAX_TERM_OR_INDEX),
        }
        let read = pb::ReadIndexReply {
            term: n[0],
            context: n[7],
            success: flags.2,
            read_index: n[1],
            ..Default::default()
        };
        // A failed read carries no index, so only a successful one's counts.
        let counted: &[u64] = if flags.2 { &[n[0], n[1]] } else { &[n[0]] };
        match convert::read_index_reply_from_pb(&read) {
            Ok(r) => {
                prop_assert!(within(counted));
                prop_assert_eq!(r.term, n[0]);
                prop_assert_eq!(r.ctx, n[7]);
                if let Ok(i) = r.result {
                    prop_assert!(flags.2);
                    prop_assert_eq!(i, n[1]);
                }
            }
            Err(_) => prop_assert!(!within(counted)),
        }
        let install = pb::InstallSnapshotReply {
            term: n[0],
            result,
            snapshot_index: n[1],
            ..Default::default()
        };
        match convert::install_reply_from_pb(&install) {
            Ok(i) => {
                prop_assert!(within(&[i.term, i.snapshot_index]));
                prop_assert_eq!((i.term, i.snapshot_index), (n[0], n[1]));
            }
            Err(_) => prop_assert!(!within(&n[..2])),
        }
    }

    #[test]
    fn arbitrary_bytes_as_peer_messages_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(r) = pb::AppendEntriesRequest::decode(bytes.as_slice()) {
            let _ = convert::append_from_pb(r);
        }
        if let Ok(r) = pb::AppendEntriesReply::decode(bytes.as_slice())
            && let Ok(a) = convert::append_reply_from_pb(&r)
        {
            for v in [a.term, a.match_index, a.next_index, a.conflict_term, a.rejected_prev, a.follower_commit, a.round] {
                prop_assert!(v <= MAX_TERM_OR_INDEX);
            }
        }
        if let Ok(r) = pb::RequestVoteReply::decode(bytes.as_slice())
            && let Ok(v) = convert::vote_reply_from_pb(&r)
        {
            prop_assert!(v.term <= MAX_TERM_OR_INDEX);
        }
        if let Ok(r) = pb::ReadIndexReply::decode(bytes.as_slice())
            && let Ok(m) = convert::read_index_reply_from_pb(&r)
        {
            prop_assert!(m.term <= MAX_TERM_OR_INDEX);
            prop_assert!(m.result.is_err() || m.result.clone().is_ok_and(|i| i <= MAX_TERM_OR_INDEX));
        }
        if let Ok(r) = pb::InstallSnapshotReply::decode(bytes.as_slice())
            && let Ok(i) = convert::install_reply_from_pb(&r)
        {
            prop_assert!(i.term <= MAX_TERM_OR_INDEX && i.snapshot_index <= MAX_TERM_OR_INDEX);
        }
        if let Ok(c) = pb::Configuration::decode(bytes.as_slice()) {
            let _ = convert::membership_from_pb(&c);
        }
        if let Ok(e) = pb::LogEntry::decode(bytes.as_slice()) {
            let _ = convert::entry_from_pb(e);
        }
    }
}

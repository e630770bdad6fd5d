//! Applying committed entries: the state machine plus the retry cache.
//!
//! Every member runs the same [`Applier`] over the same committed entries and
//! reaches the same state: a logged call already applied within the retry
//! window (judged by the log time stamped by the leader, never by a local
//! clock) is answered with its first result instead of being applied again.
//! This is what makes a retried write exactly-once even when a leader change
//! let the retry be logged twice.

use bytes::Bytes;
use kuberaft_proto::v1 as pb;
use prost::Message;

use super::retry_cache::{CachedReply, CallKey, RetryCache};
use crate::core::{Entry, EntryPayload, Index, Term};
use crate::statemachine::{SnapshotFiles, StateMachine, StateMachineError};

/// The retry cache's file in every snapshot, next to the state machine's.
pub const RETRY_CACHE_FILE: &str = "kuberaft.retry-cache";

/// What one committed command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub index: Index,
    pub term: Term,
    /// `None` for a call without a client id (no retry protection).
    pub call: Option<CallKey>,
    pub result: Result<Bytes, String>,
    /// Answered from the retry cache; the state machine did not see it.
    pub duplicate: bool,
}

/// A client's call as the leader logs it.
#[derive(Clone, Debug, Default)]
pub struct LoggedCall {
    pub client: Bytes,
    pub call: u64,
    /// The client's watermark: every call below it was answered (0: none).
    pub answered_below: u64,
    pub logged_at_ms: u64,
    /// The leader's exactly-once window (see `RetryCache::use_logged_ttl`).
    pub retry_ttl_ms: u64,
    pub payload: Bytes,
}

/// Wraps a client's command for the log.
pub fn encode_logged(c: LoggedCall) -> Bytes {
    Bytes::from(
        pb::LoggedCommand {
            client_id: c.client,
            call_id: c.call,
            logged_at_ms: c.logged_at_ms,
            payload: c.payload,
            answered_below: c.answered_below,
            retry_ttl_ms: c.retry_ttl_ms,
        }
        .encode_to_vec(),
    )
}

#[derive(Debug)]
pub struct Applier {
    sm: Box<dyn StateMachine>,
    cache: RetryCache,
    applied: Index,
}

impl Applier {
    pub fn new(sm: Box<dyn StateMachine>, retry_ttl_ms: u64) -> Self {
        Applier {
            applied: sm.applied_index(),
            sm,
            cache: RetryCache::new(retry_ttl_ms),
        }
    }

    pub fn state_machine(&self) -> &dyn StateMachine {
        self.sm.as_ref()
    }

    pub fn state_machine_mut(&mut self) -> &mut dyn StateMachine {
        self.sm.as_mut()
    }

    pub fn retry_cache(&mut self) -> &mut RetryCache {
        &mut self.cache
    }

    pub fn applied_index(&self) -> Index {
        self.applied
    }

    /// The group's cluster level as applied here (see
    /// `core::config::FEATURE_LEVEL`).
    pub fn cluster_level(&self) -> u32 {
        self.cache.level()
    }

    /// The state machine's snapshot files plus the retry cache's.
    pub fn snapshot(&self) -> SnapshotFiles {
        let mut files = self.sm.snapshot();
        files.push((RETRY_CACHE_FILE.to_string(), self.cache.encode()));
        files
    }

    /// Replaces the state with a snapshot taken at `index` (installed from
    /// the leader, or loaded at start), retry cache included.
    pub fn restore(
        &mut self,
        index: Index,
        files: &[(String, Vec<u8>)],
    ) -> Result<(), crate::statemachine::StateMachineError> {
        // The state machine looks its files up by name and ignores the
        // cache's; no copy of a possibly large snapshot is made.
        self.sm.restore(index, files)?;
        match files.iter().find(|(name, _)| name == RETRY_CACHE_FILE) {
            Some((_, bytes)) => self
                .cache
                .restore(bytes)
                .map_err(StateMachineError::BadSnapshot)?,
            // Written by a version that did not save the cache.
            None => tracing::warn!(
                index,
                "snapshot has no retry cache: calls it covers are not recognised if retried"
            ),
        }
        self.applied = index;
        Ok(())
    }

    /// Applies committed entries in order; one outcome per command.
    pub fn apply(&mut self, entries: &[Entry]) -> Vec<Outcome> {
        let mut out = Vec::new();
        for e in entries {
            assert_eq!(
                e.index,
                self.applied + 1,
                "entries are applied in order, without gaps"
            );
            self.applied = e.index;
            match &e.payload {
                EntryPayload::Command(data) => out.push(self.apply_command(e.index, e.term, data)),
                EntryPayload::ClusterLevel(level) => self.cache.raise_level(*level),
                EntryPayload::Noop | EntryPayload::Membership(_) => {}
            }
        }
        out
    }

    fn apply_command(&mut self, index: Index, term: Term, data: &Bytes) -> Outcome {
        let outcome = |call, result, duplicate| Outcome {
            index,
            term,
            call,
            result,
            duplicate,
        };
        let logged = match pb::LoggedCommand::decode(data.clone()) {
            Ok(l) => l,
            // Written by something other than this server: refused the same
            // way on every member.
            Err(e) => return outcome(None, Err(format!("malformed log entry: {e}")), false),
        };
        if logged.client_id.is_empty() {
            let result = self
                .sm
                .apply(index, &logged.payload)
                .map_err(|e| e.to_string());
            return outcome(None, result, false);
        }
        let key = CallKey {
            client: logged.client_id,
            call: logged.call_id,
        };
        self.cache.use_logged_ttl(logged.retry_ttl_ms);
        let duplicate = self.cache.duplicate(&key, logged.logged_at_ms);
        self.cache.client_said(&key, logged.answered_below);
        if let Some(result) = duplicate {
            return outcome(Some(key), result, true);
        }
        let result = self
            .sm
            .apply(index, &logged.payload)
            .map_err(|e| e.to_string());
        let reply = CachedReply {
            index,
            result: result.clone(),
        };
        self.cache.applied(key.clone(), reply, logged.logged_at_ms);
        outcome(Some(key), result, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::retry_cache::Lookup;
    use crate::statemachine::{Counter, builtin};

    fn add(n: i64) -> Bytes {
        Bytes::from(pb::CounterCommand { add: n }.encode_to_vec())
    }

    fn logged(index: Index, client: &'static [u8], call: u64, at: u64, payload: Bytes) -> Entry {
        logged_below(index, client, call, 0, at, payload)
    }

    fn logged_below(
        index: Index,
        client: &'static [u8],
        call: u64,
        answered_below: u64,
        at: u64,
        payload: Bytes,
    ) -> Entry {
        stamped(index, client, call, answered_below, at, 0, payload)
    }

    /// A call as a leader logs it, `ttl` being the leader's window (0: a
    /// leader of a version from before levels, which sends none).
    fn stamped(
        index: Index,
        client: &'static [u8],
        call: u64,
        answered_below: u64,
        at: u64,
        ttl: u64,
        payload: Bytes,
    ) -> Entry {
        let data = encode_logged(LoggedCall {
            client: Bytes::from_static(client),
            call,
            answered_below,
            logged_at_ms: at,
            retry_ttl_ms: ttl,
            payload,
        });
        Entry {
            term: 1,
            index,
            payload: EntryPayload::Command(data),
        }
    }

    fn counter(a: &Applier) -> i64 {
        pb::CounterResult::decode(a.state_machine().query(&[]).unwrap())
            .unwrap()
            .value
    }

    #[test]
    fn a_call_logged_twice_is_applied_once_and_both_get_the_first_result() {
        let mut a = Applier::new(Box::new(Counter::default()), 60_000);
        let log = [
            logged(1, b"c1", 1, 1_000, add(5)),
            Entry {
                term: 2,
                index: 2,
                payload: EntryPayload::Noop,
            },
            // The retry, logged again by a new leader.
            logged(3, b"c1", 1, 1_500, add(5)),
        ];
        let out = a.apply(&log);
        assert_eq!(counter(&a), 5, "applied once");
        assert_eq!(out.len(), 2);
        assert!(!out[0].duplicate && out[1].duplicate);
        assert_eq!(out[0].result, out[1].result);
    }

    #[test]
    fn every_member_reaches_the_same_state_and_a_restart_rebuilds_the_cache() {
        let log: Vec<Entry> = (1..=50)
            .map(|i| {
                logged(
                    i,
                    if i % 2 == 0 { b"a" } else { b"b" },
                    i / 3,
                    1_000 + i * 10,
                    add(i as i64),
                )
            })
            .collect();
        let mut x = Applier::new(builtin("counter").unwrap(), 60_000);
        let mut y = Applier::new(builtin("counter").unwrap(), 60_000);
        assert_eq!(x.apply(&log), y.apply(&log));
        assert_eq!(counter(&x), counter(&y));
        // A member replaying its log after a restart knows the calls again.
        let key = CallKey {
            client: Bytes::from_static(b"a"),
            call: 10,
        };
        assert!(matches!(
            y.retry_cache().lookup(&key, 1_600),
            Lookup::Done(_)
        ));
    }

    #[test]
    fn a_member_restored_from_a_snapshot_skips_the_same_duplicates() {
        // Member x applies the whole log; member y gets a snapshot taken by x
        // at index 2 and applies the rest. The entry at 3 is a retry of the
        // call at 1, which the snapshot covers: both must skip it.
        let head = [
            logged(1, b"c1", 1, 1_000, add(5)),
            logged(2, b"c2", 1, 1_100, add(1)),
        ];
        let tail = [logged(3, b"c1", 1, 1_500, add(5))];
        let mut x = Applier::new(builtin("counter").unwrap(), 60_000);
        x.apply(&head);
        let files = x.snapshot();
        assert!(files.iter().any(|(n, _)| n == RETRY_CACHE_FILE));
        let out_x = x.apply(&tail);
        let mut y = Applier::new(builtin("counter").unwrap(), 60_000);
        y.restore(2, &files).unwrap();
        let out_y = y.apply(&tail);
        assert_eq!(out_x, out_y);
        assert!(out_y[0].duplicate);
        assert_eq!((counter(&x), counter(&y)), (6, 6));
        // A damaged cache file is a bad snapshot, not a silent empty cache.
        let mut bad = files.clone();
        for (n, b) in &mut bad {
            if n == RETRY_CACHE_FILE {
                *b = vec![0xff; 3];
            }
        }
        let mut z = Applier::new(builtin("counter").unwrap(), 60_000);
        assert!(matches!(
            z.restore(2, &bad),
            Err(StateMachineError::BadSnapshot(_))
        ));
    }

    /// Applies `log` on a member with a 1 s window of its own, and on one
    /// (with `y_ttl_ms`) restored from the first's snapshot at `cut`: every
    /// later answer, the state and the cache must be the same.
    fn restored_member_agrees(
        log: &[Entry],
        cut: usize,
        y_ttl_ms: u64,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let mut x = Applier::new(builtin("counter").unwrap(), 1_000);
        x.apply(&log[..cut]);
        let files = x.snapshot();
        let tail_x = x.apply(&log[cut..]);
        let mut y = Applier::new(builtin("counter").unwrap(), y_ttl_ms);
        y.restore(cut as Index, &files).unwrap();
        let tail_y = y.apply(&log[cut..]);
        proptest::prop_assert_eq!(tail_x, tail_y);
        proptest::prop_assert_eq!(counter(&x), counter(&y));
        proptest::prop_assert_eq!(x.snapshot(), y.snapshot());
        Ok(())
    }

    proptest::proptest! {
        // Cheap (well under a second) and the bugs it finds hide between two
        // sweeps of the cache, so it gets more cases than the default.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4_000))]
        /// Members that restored a snapshot at any point answer every later
        /// entry as the member that applied the whole log does, and end with
        /// the same state and the same cache, whatever the clients' call
        /// ids, watermarks and the leaders' (skewed) clocks were.
        #[test]
        fn a_restored_member_answers_every_later_entry_the_same(
            calls in proptest::collection::vec((0usize..3, 1u64..24, 0u64..24, 0u64..3_000), 1..120),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            const CLIENTS: [&[u8]; 3] = [b"a", b"b", b"c"];
            let log: Vec<Entry> = calls
                .iter()
                .enumerate()
                .map(|(i, &(c, call, below, at))| {
                    logged_below(i as Index + 1, CLIENTS[c], call, below.min(call), at, add(1))
                })
                .collect();
            restored_member_agrees(&log, cut.index(log.len() + 1), 1_000)?;
        }

        /// The same past cluster level 2, where every call carries the window
        /// of the leader that logged it (a rolling change of the flag: each
        /// call's window drawn anew) and the members' own flags differ: a
        /// member restored at any point still answers every later entry as
        /// the one that applied the whole log.
        #[test]
        fn a_restored_member_answers_alike_when_every_leader_logs_its_own_window(
            calls in proptest::collection::vec(
                (0usize..3, 1u64..24, 0u64..24, 0u64..3_000, 0usize..3), 1..120),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            const CLIENTS: [&[u8]; 3] = [b"a", b"b", b"c"];
            const WINDOWS: [u64; 3] = [200, 1_000, 5_000];
            let mut log = vec![level(1, 2)];
            log.extend(calls.iter().enumerate().map(|(i, &(c, call, below, at, w))| {
                stamped(i as Index + 2, CLIENTS[c], call, below.min(call), at, WINDOWS[w], add(1))
            }));
            // The restored member's own flag differs: it must not matter.
            restored_member_agrees(&log, cut.index(log.len() + 1), 60_000)?;
        }
    }

    #[test]
    fn a_watermark_that_expired_under_a_short_window_stays_expired_under_a_longer_one() {
        // Found by review: the watermark's life was recomputed from the
        // window in force now, so a later call with a longer window brought
        // an expired watermark back, on members that still held the session
        // only (a restored member had dropped it).
        let log = [
            level(1, 2),
            stamped(2, b"a", 1, 0, 0, 60_000, add(1)),
            stamped(3, b"c", 5, 5, 100, 1_000, add(1)),
            stamped(4, b"d", 1, 0, 2_000, 1_000, add(1)),
        ];
        let late = [stamped(5, b"c", 3, 0, 3_000, 60_000, add(1))];
        let mut x = Applier::new(Box::new(Counter::default()), 60_000);
        x.apply(&log);
        let mut y = Applier::new(Box::new(Counter::default()), 60_000);
        y.restore(4, &x.snapshot()).unwrap();
        let (ox, oy) = (outcomes(&mut x, &late), outcomes(&mut y, &late));
        assert_eq!(ox, oy, "the full member and the restored one agree");
        assert!(
            !ox[0].0,
            "c's watermark expired at 1.1 s: call 3 is new at 3 s"
        );
    }

    fn level(index: Index, level: u32) -> Entry {
        Entry {
            term: 1,
            index,
            payload: EntryPayload::ClusterLevel(level),
        }
    }

    /// One call, retried by clients at 3 s and 8 s of log time, each retry
    /// logged again (a leader change lost the first answer), every entry
    /// carrying a 5 s window from its leader.
    fn retries_with_a_logged_window(first: Index) -> Vec<Entry> {
        [1_000, 4_000, 9_000]
            .into_iter()
            .enumerate()
            .map(|(i, at)| stamped(first + i as u64, b"c1", 1, 0, at, 5_000, add(1)))
            .collect()
    }

    fn outcomes(a: &mut Applier, log: &[Entry]) -> Vec<(bool, Result<Bytes, String>)> {
        a.apply(log)
            .into_iter()
            .map(|o| (o.duplicate, o.result))
            .collect()
    }

    #[test]
    fn members_with_different_windows_decide_alike_once_the_window_is_logged() {
        // A rolling change of --retry-ttl-ms: one member at 1 s, one at
        // 100 s. Past cluster level 2 both judge by the leader's 5 s.
        let mut log = vec![level(1, 2)];
        log.extend(retries_with_a_logged_window(2));
        let mut short = Applier::new(Box::new(Counter::default()), 1_000);
        let mut long = Applier::new(Box::new(Counter::default()), 100_000);
        let (s, l) = (outcomes(&mut short, &log), outcomes(&mut long, &log));
        assert_eq!(s, l, "every member decides alike");
        let dup: Vec<bool> = s.iter().map(|(d, _)| *d).collect();
        assert_eq!(dup, [false, true, false], "by the logged 5 s window");
        assert_eq!(counter(&short), counter(&long));
        assert_eq!(short.snapshot(), long.snapshot());
        // The window and the level travel in the snapshot: a member restored
        // from it, whatever its own flag, goes on deciding alike.
        let mut restored = Applier::new(Box::new(Counter::default()), 100_000);
        restored.restore(4, &short.snapshot()).unwrap();
        assert_eq!(restored.cluster_level(), 2);
        let later = [
            stamped(5, b"c1", 2, 0, 9_500, 5_000, add(1)),
            stamped(6, b"c1", 2, 0, 12_000, 5_000, add(1)),
        ];
        assert_eq!(
            outcomes(&mut restored, &later),
            outcomes(&mut short, &later)
        );
    }

    #[test]
    fn before_the_level_is_raised_every_member_keeps_its_own_window_as_an_older_version_does() {
        // A member of the previous version does not know the field: to it
        // the log carries no window. Until the group's level says every
        // member knows it, a new member must decide as that one does.
        let stamped_log = retries_with_a_logged_window(1);
        let stripped: Vec<Entry> = [1_000, 4_000, 9_000]
            .into_iter()
            .enumerate()
            .map(|(i, at)| stamped(1 + i as u64, b"c1", 1, 0, at, 0, add(1)))
            .collect();
        let mut new = Applier::new(Box::new(Counter::default()), 60_000);
        let mut old = Applier::new(Box::new(Counter::default()), 60_000);
        assert_eq!(
            outcomes(&mut new, &stamped_log),
            outcomes(&mut old, &stripped)
        );
        assert_eq!(counter(&new), 1, "within its own 60 s window, applied once");
        assert_eq!(new.cluster_level(), 1);
    }

    #[test]
    fn past_the_retry_window_by_log_time_a_call_is_new_again() {
        let mut a = Applier::new(Box::new(Counter::default()), 1_000);
        a.apply(&[
            logged(1, b"c", 1, 1_000, add(1)),
            logged(2, b"c", 1, 2_000, add(1)),
        ]);
        assert_eq!(
            counter(&a),
            2,
            "the window is part of the contract: retries must come within it"
        );
    }

    #[test]
    fn malformed_entries_and_state_machine_errors_are_results_not_panics() {
        let mut a = Applier::new(builtin("kv").unwrap(), 60_000);
        let junk = Entry {
            term: 1,
            index: 1,
            payload: EntryPayload::Command(Bytes::from_static(b"\xff\xff")),
        };
        let bad_kv = logged(2, b"c", 1, 1_000, Bytes::from_static(b"\xff\xff"));
        let out = a.apply(&[junk, bad_kv]);
        assert!(
            out[0]
                .result
                .as_ref()
                .unwrap_err()
                .contains("malformed log entry")
        );
        assert!(out[1].result.as_ref().unwrap_err().contains("malformed"));
        assert_eq!(a.applied_index(), 2);
    }
}

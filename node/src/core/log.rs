//! The core's view of the replicated log.
//!
//! Owns the entries after the last snapshot, the commit index, how far the
//! entries are known durable, and the membership history (so that truncating
//! a configuration entry reverts to the one before it, as Raft requires).
//!
//! Invariants (checked by [`RaftLog::check_invariants`] in debug builds and by
//! the simulation after every step):
//! `snapshot_index <= committed <= last_index`, `durable <= last_index`,
//! entries are contiguous from `snapshot_index + 1`, terms never decrease
//! along the log, and no committed entry is ever truncated.
//!
//! Entries are kept in memory: the storage layer persists them and may later
//! evict payloads from this cache; the core only ever needs terms to decide.

use std::collections::VecDeque;

use super::membership::Membership;
use super::types::{Entry, EntryPayload, Index, SnapshotMeta, Term};

/// Durable state that cannot be a Raft log. Never repaired silently: the
/// storage layer reports it with the file and offset and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("log entry {expected} is missing (the next entry found is {found})")]
    Gap { expected: Index, found: Index },
    #[error("log entry {index} has term {term}, lower than the {previous} before it")]
    TermRegression {
        index: Index,
        term: Term,
        previous: Term,
    },
}

#[derive(Debug, Default)]
pub struct RaftLog {
    snapshot_index: Index,
    snapshot_term: Term,
    /// Membership in force at `snapshot_index`.
    snapshot_membership: Membership,
    entries: VecDeque<Entry>,
    committed: Index,
    /// Highest index known durable with the term the log now has there.
    durable: Index,
    /// Lowest index changed since the last [`RaftLog::take_unstable`]: the
    /// shell must truncate from here and write everything after it.
    unstable_from: Option<Index>,
    /// Membership entries after the snapshot, in log order.
    memberships: Vec<(Index, Membership)>,
}

impl RaftLog {
    /// A log restored from durable state: the latest snapshot and the entries
    /// after it. Everything passed in is durable by definition.
    pub fn restore(snapshot: SnapshotMeta, entries: Vec<Entry>) -> Result<Self, RestoreError> {
        let mut log = RaftLog {
            snapshot_index: snapshot.index,
            snapshot_term: snapshot.term,
            snapshot_membership: snapshot.membership,
            committed: snapshot.index,
            durable: snapshot.index,
            ..Default::default()
        };
        for e in entries {
            if e.index <= log.snapshot_index {
                continue;
            }
            if e.index != log.last_index() + 1 {
                return Err(RestoreError::Gap {
                    expected: log.last_index() + 1,
                    found: e.index,
                });
            }
            if e.term < log.last_term() {
                let previous = log.last_term();
                return Err(RestoreError::TermRegression {
                    index: e.index,
                    term: e.term,
                    previous,
                });
            }
            log.push(e);
        }
        log.durable = log.last_index();
        Ok(log)
    }

    fn push(&mut self, e: Entry) {
        if let EntryPayload::Membership(m) = &e.payload {
            self.memberships.push((e.index, m.clone()));
        }
        self.entries.push_back(e);
    }

    pub fn snapshot_index(&self) -> Index {
        self.snapshot_index
    }

    pub fn snapshot_term(&self) -> Term {
        self.snapshot_term
    }

    pub fn first_index(&self) -> Index {
        self.snapshot_index + 1
    }

    pub fn last_index(&self) -> Index {
        self.snapshot_index + self.entries.len() as Index
    }

    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.snapshot_term, |e| e.term)
    }

    pub fn committed(&self) -> Index {
        self.committed
    }

    pub fn durable(&self) -> Index {
        self.durable
    }

    /// The term of the entry at `index`, if the log still knows it (the
    /// snapshot's last entry included).
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        self.get(index).map(|e| e.term)
    }

    pub fn get(&self, index: Index) -> Option<&Entry> {
        if index <= self.snapshot_index {
            return None;
        }
        self.entries.get((index - self.snapshot_index - 1) as usize)
    }

    /// Whether a candidate whose last entry is (`term`, `index`) is at least
    /// as up to date as this log (Raft §5.4.1).
    pub fn is_up_to_date(&self, index: Index, term: Term) -> bool {
        term > self.last_term() || (term == self.last_term() && index >= self.last_index())
    }

    /// Entries `lo..=hi`, stopping early once `max_bytes` is reached (at least
    /// one entry is returned when any is available). `None` when `lo` was
    /// compacted away.
    pub fn slice(&self, lo: Index, hi: Index, max_bytes: usize) -> Option<Vec<Entry>> {
        if lo <= self.snapshot_index {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut i = lo;
        while i <= hi {
            let Some(e) = self.get(i) else { break };
            bytes += e.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
            i += 1;
        }
        Some(out)
    }

    /// Index of the first entry of `term` at or before `index`, walking back
    /// while the term stays the same. Used for the follower's next-index hint.
    pub fn first_index_of_term_at(&self, index: Index) -> Index {
        let Some(term) = self.term(index) else {
            return index;
        };
        let mut i = index;
        while i > self.first_index() && self.term(i - 1) == Some(term) {
            i -= 1;
        }
        i
    }

    /// Last index holding an entry of `term`, if any (for the leader skipping
    /// a follower's conflicting term).
    pub fn last_index_of_term(&self, term: Term) -> Option<Index> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.term == term)
            .map(|e| e.index)
    }

    /// Appends entries at the leader (which never conflict).
    pub fn append_new(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        debug_assert!(entry.term >= self.last_term());
        self.unstable_from.get_or_insert(entry.index);
        self.push(entry);
    }

    /// Appends the leader's `entries` after a successful consistency check,
    /// truncating a conflicting suffix. Returns the index of the last entry
    /// the request covered.
    ///
    /// # Panics
    /// If a committed entry would be truncated: that would mean two different
    /// entries were committed at one index, a safety violation elsewhere.
    pub fn append_from_leader(&mut self, prev_index: Index, entries: Vec<Entry>) -> Index {
        let last_new = prev_index + entries.len() as Index;
        for e in entries {
            match self.term(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    assert!(
                        e.index > self.committed,
                        "conflicting entry at {} but committed is {}",
                        e.index,
                        self.committed
                    );
                    self.truncate_from(e.index);
                }
                None => {}
            }
            if e.index <= self.snapshot_index {
                continue;
            }
            self.unstable_from = Some(self.unstable_from.map_or(e.index, |u| u.min(e.index)));
            self.push(e);
        }
        last_new
    }

    fn truncate_from(&mut self, index: Index) {
        let keep = (index - self.snapshot_index - 1) as usize;
        self.entries.truncate(keep);
        self.memberships.retain(|(i, _)| *i < index);
        self.durable = self.durable.min(index - 1);
    }

    /// Entries changed since the last call: the shell truncates its log from
    /// the first one's index and appends them all.
    pub fn take_unstable(&mut self) -> Vec<Entry> {
        match self.unstable_from.take() {
            Some(from) => {
                let from = from.max(self.first_index());
                self.slice(from, self.last_index(), usize::MAX)
                    .unwrap_or_default()
            }
            None => Vec::new(),
        }
    }

    /// The shell reports that entries up to `index`, written with `term` at
    /// that index, are durable. A report about an entry since replaced (its
    /// term no longer matches) proves nothing and is ignored.
    pub fn persisted(&mut self, index: Index, term: Term) -> bool {
        if index > self.durable && index <= self.last_index() && self.term(index) == Some(term) {
            self.durable = index;
            true
        } else {
            false
        }
    }

    /// Raises the commit index; never lowers it.
    pub fn commit_to(&mut self, index: Index) -> bool {
        if index > self.committed {
            assert!(
                index <= self.last_index(),
                "commit {index} beyond last {}",
                self.last_index()
            );
            self.committed = index;
            true
        } else {
            false
        }
    }

    /// The membership in force: the latest one in the log, appended or not.
    pub fn membership(&self) -> &Membership {
        self.memberships
            .last()
            .map_or(&self.snapshot_membership, |(_, m)| m)
    }

    /// Index of the entry that introduced the membership in force.
    pub fn membership_index(&self) -> Index {
        self.memberships
            .last()
            .map_or(self.snapshot_index, |(i, _)| *i)
    }

    /// The membership in force at `index` (for snapshot metadata).
    pub fn membership_at(&self, index: Index) -> &Membership {
        self.memberships
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or(&self.snapshot_membership, |(_, m)| m)
    }

    /// Drops entries up to `index` after the state machine snapshotted them.
    pub fn compact(&mut self, index: Index) {
        if index <= self.snapshot_index {
            return;
        }
        assert!(
            index <= self.committed,
            "compacting uncommitted index {index}"
        );
        self.snapshot_membership = self.membership_at(index).clone();
        self.snapshot_term = self.term(index).expect("committed entry present");
        let drop = (index - self.snapshot_index) as usize;
        self.entries.drain(..drop);
        self.memberships.retain(|(i, _)| *i > index);
        self.snapshot_index = index;
    }

    /// Installs a snapshot received from the leader. Keeps the entries after
    /// it if the log holds the snapshot's last entry (same term there);
    /// otherwise the whole log is replaced. Returns whether a suffix was kept.
    pub fn install_snapshot(&mut self, meta: &SnapshotMeta) -> bool {
        let keep = self.term(meta.index) == Some(meta.term);
        if keep {
            let drop = (meta.index - self.snapshot_index) as usize;
            self.entries.drain(..drop);
            self.memberships.retain(|(i, _)| *i > meta.index);
        } else {
            self.entries.clear();
            self.memberships.clear();
            self.durable = meta.index;
            self.unstable_from = None;
        }
        self.snapshot_index = meta.index;
        self.snapshot_term = meta.term;
        self.snapshot_membership = meta.membership.clone();
        self.committed = self.committed.max(meta.index);
        self.durable = self.durable.max(meta.index);
        if let Some(u) = self.unstable_from {
            self.unstable_from = Some(u.max(meta.index + 1));
        }
        keep
    }

    /// Debug-build check of the invariants in the module docs.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.committed < self.snapshot_index || self.committed > self.last_index() {
            return Err(format!(
                "commit {} outside [{}, {}]",
                self.committed,
                self.snapshot_index,
                self.last_index()
            ));
        }
        if self.durable > self.last_index() {
            return Err(format!(
                "durable {} beyond last {}",
                self.durable,
                self.last_index()
            ));
        }
        let mut prev_term = self.snapshot_term;
        for (i, e) in self.entries.iter().enumerate() {
            if e.index != self.snapshot_index + 1 + i as Index {
                return Err(format!("entry {} out of place at offset {i}", e.index));
            }
            if e.term < prev_term {
                return Err(format!(
                    "term goes back at {}: {} < {}",
                    e.index, e.term, prev_term
                ));
            }
            prev_term = e.term;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(term: Term, index: Index) -> Entry {
        Entry {
            term,
            index,
            payload: EntryPayload::Noop,
        }
    }

    fn log_of(terms: &[Term]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, t)| e(*t, i as Index + 1))
            .collect();
        RaftLog::restore(SnapshotMeta::default(), entries).unwrap()
    }

    #[test]
    fn t10_conflicting_suffix_is_truncated_and_reported_unstable() {
        let mut log = log_of(&[1, 1, 2, 2]);
        let last = log.append_from_leader(2, vec![e(3, 3), e(3, 4), e(3, 5)]);
        assert_eq!(last, 5);
        assert_eq!(log.last_index(), 5);
        assert_eq!(log.term(3), Some(3));
        assert_eq!(log.durable(), 2, "truncation lowers durable");
        let unstable = log.take_unstable();
        assert_eq!(unstable.first().map(|e| e.index), Some(3));
        assert_eq!(unstable.len(), 3);
        log.check_invariants().unwrap();
    }

    #[test]
    fn t10_restore_refuses_gaps_and_term_regressions() {
        let snap = SnapshotMeta {
            index: 15,
            term: 2,
            ..Default::default()
        };
        // A stale entry behind a newer snapshot (the purge-overtook-truncation
        // case): refused, not loaded.
        assert_eq!(
            RaftLog::restore(snap.clone(), vec![e(1, 16)]).err(),
            Some(RestoreError::TermRegression {
                index: 16,
                term: 1,
                previous: 2
            })
        );
        assert_eq!(
            RaftLog::restore(snap, vec![e(2, 17)]).err(),
            Some(RestoreError::Gap {
                expected: 16,
                found: 17
            })
        );
    }

    #[test]
    fn t10_duplicate_append_changes_nothing() {
        let mut log = log_of(&[1, 1, 2]);
        log.append_from_leader(1, vec![e(1, 2)]);
        assert_eq!(
            log.last_index(),
            3,
            "a stale, matching append must not truncate"
        );
        assert!(log.take_unstable().is_empty());
    }

    #[test]
    fn t10_persisted_report_for_replaced_entry_is_ignored() {
        let mut log = log_of(&[1]);
        log.append_new(e(1, 2));
        log.append_from_leader(1, vec![e(2, 2)]);
        assert!(!log.persisted(2, 1));
        assert_eq!(log.durable(), 1);
        assert!(log.persisted(2, 2));
    }

    #[test]
    #[should_panic(expected = "conflicting entry")]
    fn t10_truncating_committed_entry_panics() {
        let mut log = log_of(&[1, 1]);
        log.commit_to(2);
        log.append_from_leader(1, vec![e(2, 2)]);
    }

    #[test]
    fn t10_compact_and_install_snapshot() {
        let mut log = log_of(&[1, 1, 2, 2, 3]);
        log.commit_to(4);
        log.compact(3);
        assert_eq!(log.first_index(), 4);
        assert_eq!(log.term(3), Some(2));
        assert_eq!(log.slice(3, 5, usize::MAX), None);
        // A snapshot at (4, 2) matches: the suffix (5) is kept.
        let keep = log.install_snapshot(&SnapshotMeta {
            index: 4,
            term: 2,
            ..Default::default()
        });
        assert!(keep);
        assert_eq!(log.last_index(), 5);
        // A snapshot that does not match replaces everything.
        let keep = log.install_snapshot(&SnapshotMeta {
            index: 9,
            term: 7,
            ..Default::default()
        });
        assert!(!keep);
        assert_eq!(
            (log.last_index(), log.last_term(), log.committed()),
            (9, 7, 9)
        );
        log.check_invariants().unwrap();
    }

    #[test]
    fn t10_membership_reverts_when_its_entry_is_truncated() {
        let mut log = log_of(&[1]);
        let m = Membership::with_voters([1, 2].map(super::super::membership::PeerInfo::new));
        log.append_new(Entry {
            term: 1,
            index: 2,
            payload: EntryPayload::Membership(m.clone()),
        });
        assert_eq!(log.membership(), &m);
        log.append_from_leader(1, vec![e(2, 2)]);
        assert!(log.membership().is_empty());
    }
}

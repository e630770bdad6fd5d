//! A conformance suite every [`LogStore`] must pass: append and read
//! ranges, overlap truncation (across segments), explicit truncation, purge,
//! reset, and restart keeping exactly what was synced.
//!
//! Public so that every implementation, here or in other crates, runs the
//! same checks. Each check panics with what went wrong.

use bytes::Bytes;

use super::LogStore;
use crate::core::{Entry, EntryPayload, Index, Term};

/// Makes logs for the suite. `reopen` stands for a restart: it drops the
/// log and opens what is on its storage again.
pub trait LogFactory {
    type Log: LogStore;
    fn create(&mut self) -> Self::Log;
    fn reopen(&mut self, log: Self::Log) -> Self::Log;
}

/// An entry whose payload is derived from (term, index), so any mix-up shows.
pub fn entry(term: Term, index: Index) -> Entry {
    let payload = format!(
        "entry {index} of term {term} {}",
        "x".repeat((index % 7) as usize * 10)
    );
    Entry {
        term,
        index,
        payload: EntryPayload::Command(Bytes::from(payload)),
    }
}

fn entries(term: Term, range: std::ops::RangeInclusive<Index>) -> Vec<Entry> {
    range.map(|i| entry(term, i)).collect()
}

fn check_holds<L: LogStore>(log: &L, expected: &[Entry], what: &str) {
    let (Some(first), Some(last)) = (expected.first(), expected.last()) else {
        return;
    };
    assert_eq!(log.last_index(), last.index, "{what}: last index");
    let got = log
        .entries(first.index, last.index)
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    assert_eq!(got, expected, "{what}: entries differ");
    for e in expected {
        assert_eq!(
            log.term(e.index),
            Some(e.term),
            "{what}: term of {}",
            e.index
        );
    }
}

/// Runs every check on fresh logs from `factory`.
pub fn run_conformance<F: LogFactory>(factory: &mut F) {
    append_and_read(factory);
    overlap_truncates_conflicting_suffix(factory);
    explicit_truncate_and_append_again(factory);
    purge_keeps_what_follows(factory);
    reset_starts_after_a_snapshot(factory);
    restart_keeps_synced_entries(factory);
    refuses_gaps_and_missing_ranges(factory);
}

fn append_and_read<F: LogFactory>(f: &mut F) {
    let mut log = f.create();
    assert_eq!((log.first_index(), log.last_index()), (1, 0), "empty log");
    let mut all = entries(1, 1..=40);
    all.extend(entries(2, 41..=60));
    for chunk in all.chunks(7) {
        log.append(chunk).unwrap();
    }
    check_holds(&log, &all, "after appends");
    assert_eq!(
        log.entries(10, 12).unwrap(),
        all[9..12].to_vec(),
        "a middle range"
    );
    assert_eq!(
        log.entries(60, 60).unwrap(),
        all[59..].to_vec(),
        "the last entry"
    );
}

fn overlap_truncates_conflicting_suffix<F: LogFactory>(f: &mut F) {
    let mut log = f.create();
    let mut old = entries(1, 1..=30);
    old.extend(entries(2, 31..=50));
    log.append(&old).unwrap();
    log.sync().unwrap();
    // The new leader's entries replace 21.. across the term-2 segment.
    let new = entries(3, 21..=25);
    log.append(&new).unwrap();
    let mut want = old[..20].to_vec();
    want.extend(new);
    check_holds(&log, &want, "after an overlapping append");
    assert_eq!(log.term(26), None, "the old suffix is gone");
    log.sync().unwrap();
    let log = f.reopen(log);
    check_holds(&log, &want, "after restart");
}

fn explicit_truncate_and_append_again<F: LogFactory>(f: &mut F) {
    let mut log = f.create();
    let mut all = entries(1, 1..=20);
    all.extend(entries(2, 21..=40));
    log.append(&all).unwrap();
    log.sync().unwrap();
    log.truncate(15).unwrap();
    check_holds(&log, &all[..14], "after truncate");
    log.truncate(100).unwrap();
    check_holds(&log, &all[..14], "truncating past the end changes nothing");
    let more = entries(4, 15..=18);
    log.append(&more).unwrap();
    log.sync().unwrap();
    let mut want = all[..14].to_vec();
    want.extend(more);
    let log = f.reopen(log);
    check_holds(&log, &want, "after truncate, append and restart");
}

fn purge_keeps_what_follows<F: LogFactory>(f: &mut F) {
    let mut log = f.create();
    let mut all = Vec::new();
    for term in 1..=6 {
        all.extend(entries(term, (term - 1) * 10 + 1..=term * 10));
    }
    log.append(&all).unwrap();
    log.sync().unwrap();
    log.purge(35).unwrap();
    assert!(
        log.first_index() <= 36,
        "purge removes nothing after its index"
    );
    let first = log.first_index();
    check_holds(&log, &all[(first - 1) as usize..], "after purge");
    assert!(
        log.entries(first - 1, first).is_err() || first == 1,
        "purged entries are gone"
    );
    let log = f.reopen(log);
    assert!(log.first_index() <= 36);
    check_holds(&log, &all[35..], "after purge and restart");
}

fn reset_starts_after_a_snapshot<F: LogFactory>(f: &mut F) {
    let mut log = f.create();
    log.append(&entries(1, 1..=10)).unwrap();
    log.sync().unwrap();
    log.reset(100).unwrap();
    assert_eq!(
        (log.first_index(), log.last_index()),
        (101, 100),
        "reset empties the log"
    );
    let next = entries(5, 101..=105);
    log.append(&next).unwrap();
    log.sync().unwrap();
    let log = f.reopen(log);
    check_holds(&log, &next, "after reset and restart");
}

fn restart_keeps_synced_entries<F: LogFactory>(f: &mut F) {
    let mut log = f.create();
    let all = entries(1, 1..=25);
    log.append(&all).unwrap();
    assert_eq!(log.sync().unwrap(), 25);
    let log = f.reopen(log);
    check_holds(&log, &all, "after restart");
    assert_eq!(log.first_index(), 1);
}

fn refuses_gaps_and_missing_ranges<F: LogFactory>(f: &mut F) {
    let mut log = f.create();
    log.append(&entries(1, 1..=5)).unwrap();
    assert!(log.append(&entries(1, 7..=8)).is_err(), "a gap is refused");
    assert!(
        log.entries(3, 9).is_err(),
        "reading past the end is an error"
    );
    check_holds(&log, &entries(1, 1..=5), "a refused append changes nothing");
}

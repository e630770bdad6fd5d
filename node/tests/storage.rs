//! Storage tests: the conformance suite on both log implementations, then
//! what the segmented log does with damaged files, a full disk and a failed
//! fsync, and the metadata file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kuberaft_node::core::{HardState, Membership, PeerInfo};
use kuberaft_node::storage::fs::{FaultyFs, FileSystem, StdFs};
use kuberaft_node::storage::testing::{LogFactory, entry, run_conformance};
use kuberaft_node::storage::{
    LogOptions, LogStore, MemLog, Meta, MetaStore, SegmentedLog, StorageError,
};

struct MemFactory;

impl LogFactory for MemFactory {
    type Log = MemLog;
    fn create(&mut self) -> MemLog {
        MemLog::new(0)
    }
    fn reopen(&mut self, log: MemLog) -> MemLog {
        log
    }
}

/// Segmented logs in fresh directories, with small segments so every check
/// crosses segment boundaries.
struct SegFactory {
    root: tempfile::TempDir,
    n: usize,
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
}

fn small() -> LogOptions {
    LogOptions {
        segment_size_max_bytes: 1024,
        preallocate_bytes: 256,
        write_buffer_bytes: 100,
        cache_max_bytes: 2048,
        truncate_on_corruption: false,
        purge_keep_entries: 0,
    }
}

impl SegFactory {
    fn new(fs: Arc<dyn FileSystem>) -> Self {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().to_path_buf();
        SegFactory {
            root,
            n: 0,
            fs,
            dir,
        }
    }
}

impl LogFactory for SegFactory {
    type Log = SegmentedLog;
    fn create(&mut self) -> SegmentedLog {
        self.n += 1;
        self.dir = self.root.path().join(format!("log{}", self.n));
        SegmentedLog::open(self.fs.clone(), &self.dir, small(), 0).unwrap()
    }
    fn reopen(&mut self, log: SegmentedLog) -> SegmentedLog {
        let base = log.first_index() - 1;
        drop(log);
        SegmentedLog::open(self.fs.clone(), &self.dir, small(), base).unwrap()
    }
}

#[test]
fn t10_mem_log_passes_the_conformance_suite() {
    run_conformance(&mut MemFactory);
}

#[test]
fn t10_segmented_log_passes_the_conformance_suite() {
    run_conformance(&mut SegFactory::new(Arc::new(StdFs)));
    run_conformance(&mut SegFactory::new(Arc::new(FaultyFs::new())));
}

#[test]
fn t10_segments_roll_on_size_and_on_term_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(Arc::new(StdFs), dir.path(), small(), 0).unwrap();
    log.append(&(1..=3).map(|i| entry(1, i)).collect::<Vec<_>>())
        .unwrap();
    log.append(&[entry(2, 4)]).unwrap();
    log.sync().unwrap();
    let names = list(dir.path());
    assert_eq!(
        names,
        vec!["log_1-3", "log_inprogress_4"],
        "a new term starts a new segment"
    );
    log.append(&(5..=60).map(|i| entry(2, i)).collect::<Vec<_>>())
        .unwrap();
    log.sync().unwrap();
    assert!(log.segment_count() > 3, "1 KiB segments roll by size");
}

#[test]
fn t10_the_open_segment_grows_by_doubling_chunks_of_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions::default();
    let cap = opts.preallocate_bytes;
    let mut log = SegmentedLog::open(Arc::new(StdFs), dir.path(), opts, 0).unwrap();
    let size = |dir: &Path| {
        std::fs::metadata(dir.join("log_inprogress_1"))
            .unwrap()
            .len()
    };
    log.append(&[entry(1, 1)]).unwrap();
    log.sync().unwrap();
    let first = size(dir.path());
    assert!(
        (64 << 10..(64 << 10) + 4096).contains(&first),
        "one entry costs the smallest chunk (64 KiB past the header), not {cap} bytes: {first}"
    );
    // Past 4 MiB of entries the chunks reach their cap and stay there.
    let mut last = 1;
    let mut sizes = Vec::new();
    while sizes.last().is_none_or(|s| *s < 8 << 20) {
        let batch: Vec<_> = (last + 1..=last + 2_000).map(|i| entry(1, i)).collect();
        last += 2_000;
        log.append(&batch).unwrap();
        log.sync().unwrap();
        let s = size(dir.path());
        if sizes.last() != Some(&s) {
            sizes.push(s);
        }
    }
    let steps: Vec<u64> = sizes.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        steps.iter().all(|s| *s <= cap),
        "no chunk above the cap: {steps:?}"
    );
    assert!(
        steps.contains(&cap),
        "large segments grow by the cap: {steps:?}"
    );
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// A log of 60 entries over several segments, synced and closed.
fn written_log() -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentedLog::open(Arc::new(StdFs), dir.path(), small(), 0).unwrap();
    log.append(&(1..=30).map(|i| entry(1, i)).collect::<Vec<_>>())
        .unwrap();
    log.append(&(31..=60).map(|i| entry(2, i)).collect::<Vec<_>>())
        .unwrap();
    log.sync().unwrap();
    drop(log);
    let names = list(dir.path());
    (dir, names)
}

fn open(dir: &Path) -> Result<SegmentedLog, StorageError> {
    SegmentedLog::open(Arc::new(StdFs), dir, small(), 0)
}

fn flip_byte(path: &Path, offset: u64) {
    let mut data = std::fs::read(path).unwrap();
    data[offset as usize] ^= 0x5a;
    std::fs::write(path, data).unwrap();
}

#[test]
fn t20_torn_tail_of_the_open_segment_is_cut_off() {
    let (dir, names) = written_log();
    let open_seg = dir.path().join(names.last().unwrap());
    let len = std::fs::metadata(&open_seg).unwrap().len();
    // Half of the last record is gone, as if the machine died mid-write.
    let data = std::fs::read(&open_seg).unwrap();
    let data_end = data.iter().rposition(|b| *b != 0).unwrap() as u64 + 1;
    assert!(data_end <= len);
    std::fs::write(&open_seg, &data[..(data_end - 10) as usize]).unwrap();
    let log = open(dir.path()).expect("a torn tail is not an error");
    assert_eq!(log.last_index(), 59, "only the torn entry is lost");
    assert_eq!(log.entries(59, 59).unwrap(), vec![entry(2, 59)]);
}

#[test]
fn t20_flipped_byte_inside_the_open_segment_is_refused_with_file_and_offset() {
    let (dir, names) = written_log();
    let open_seg = dir.path().join(names.last().unwrap());
    // Damage the first record (right after the 16-byte header); valid
    // records follow it, so this is not a torn write.
    flip_byte(&open_seg, 16 + 6);
    let err = open(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, StorageError::Corrupt { offset: 16, .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&names.last().unwrap().to_string()) && msg.contains("byte 16"),
        "{msg}"
    );
    // What to do, with the commands a user has (no node flag drops
    // records a voter may have acknowledged).
    assert!(
        msg.contains("peer remove") && msg.contains("peer add"),
        "says what to do: {msg}"
    );
}

#[test]
fn t20_flipped_byte_in_a_closed_segment_is_refused_or_truncated_on_request() {
    let (dir, names) = written_log();
    let closed = dir.path().join(&names[1]);
    flip_byte(&closed, 40);
    let err = open(dir.path()).unwrap_err();
    assert!(
        matches!(err, StorageError::Corrupt { ref file, .. } if file == &closed),
        "{err}"
    );
    // With the explicit option, the log is cut at the bad record.
    let opts = LogOptions {
        truncate_on_corruption: true,
        ..small()
    };
    let log = SegmentedLog::open(Arc::new(StdFs), dir.path(), opts, 0).unwrap();
    let first_of_damaged: u64 = names[1]
        .trim_start_matches("log_")
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        log.last_index() < first_of_damaged + 2,
        "cut at the damaged record"
    );
    assert_eq!(
        log.entries(1, 3).unwrap(),
        (1..=3).map(|i| entry(1, i)).collect::<Vec<_>>()
    );
}

#[test]
fn t20_truncated_closed_segment_is_refused() {
    let (dir, names) = written_log();
    let closed = dir.path().join(&names[0]);
    let data = std::fs::read(&closed).unwrap();
    std::fs::write(&closed, &data[..data.len() - 3]).unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
}

#[test]
fn t20_deleted_middle_segment_is_a_gap() {
    let (dir, names) = written_log();
    assert!(names.len() >= 3);
    std::fs::remove_file(dir.path().join(&names[1])).unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(matches!(err, StorageError::Gap { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn t20_garbage_segment_header_is_refused() {
    let (dir, names) = written_log();
    std::fs::write(
        dir.path().join(&names[0]),
        b"this is not a log segment at all",
    )
    .unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("wrong magic"), "{err}");
}

/// A log on a fault-injecting file system holding entries 1..=10, synced.
fn faulty_log_with_ten_entries() -> (tempfile::TempDir, FaultyFs, SegmentedLog) {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultyFs::new();
    let mut log = SegmentedLog::open(Arc::new(fs.clone()), dir.path(), small(), 0).unwrap();
    log.append(&(1..=10).map(|i| entry(1, i)).collect::<Vec<_>>())
        .unwrap();
    log.sync().unwrap();
    (dir, fs, log)
}

#[test]
fn t30_full_disk_fails_the_write_keeps_synced_entries_and_recovers() {
    let (dir, fs, mut log) = faulty_log_with_ten_entries();
    fs.set(|f| f.space_left = Some(50));
    let more: Vec<_> = (11..=40).map(|i| entry(1, i)).collect();
    let err = log.append(&more).and_then(|_| log.sync()).unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert!(
        err.to_string().contains("free disk space"),
        "says what to do: {err}"
    );
    // Space returns: retrying the same append on the same log finishes it.
    fs.set(|f| f.space_left = None);
    log.append(&more).unwrap();
    assert_eq!(log.sync().unwrap(), 40);
    drop(log);
    let log = SegmentedLog::open(Arc::new(StdFs), dir.path(), small(), 0).unwrap();
    assert_eq!(
        log.entries(1, 40).unwrap(),
        (1..=40).map(|i| entry(1, i)).collect::<Vec<_>>()
    );
}

#[test]
fn t30_full_disk_then_crash_loses_nothing_synced() {
    let (dir, fs, mut log) = faulty_log_with_ten_entries();
    fs.set(|f| f.space_left = Some(30));
    let _ = log
        .append(&(11..=40).map(|i| entry(1, i)).collect::<Vec<_>>())
        .and_then(|_| log.sync());
    drop(log); // the member dies with a partly written record on disk
    let log = SegmentedLog::open(Arc::new(StdFs), dir.path(), small(), 0).unwrap();
    assert!(log.last_index() >= 10);
    assert_eq!(
        log.entries(1, 10).unwrap(),
        (1..=10).map(|i| entry(1, i)).collect::<Vec<_>>()
    );
}

#[test]
fn t10_purge_keeps_the_configured_margin_and_cache_eviction_keeps_reads_working() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        purge_keep_entries: 20,
        cache_max_bytes: 0,
        ..small()
    };
    let mut log = SegmentedLog::open(Arc::new(StdFs), dir.path(), opts, 0).unwrap();
    let all: Vec<_> = (1..=80).map(|i| entry(1 + i / 10, i)).collect();
    log.append(&all).unwrap();
    log.sync().unwrap();
    log.purge(60).unwrap();
    assert!(
        log.first_index() <= 41,
        "entries 41..=60 stay for lagging followers"
    );
    // With no cache budget every closed segment below 70 is evicted; reads
    // then come from the files and are still right.
    log.evict_cache(70);
    let first = log.first_index();
    assert_eq!(
        log.entries(first, 80).unwrap(),
        all[(first - 1) as usize..].to_vec()
    );
}

#[test]
fn t30_slow_disk_still_commits_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultyFs::new();
    fs.set(|f| f.slow_sync = std::time::Duration::from_millis(5));
    let mut log = SegmentedLog::open(Arc::new(fs.clone()), dir.path(), small(), 0).unwrap();
    for i in 1..=5 {
        log.append(&[entry(1, i)]).unwrap();
        assert_eq!(log.sync().unwrap(), i);
    }
}

#[test]
fn t30_failed_fsync_stops_the_log_until_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultyFs::new();
    let mut log = SegmentedLog::open(Arc::new(fs.clone()), dir.path(), small(), 0).unwrap();
    log.append(&[entry(1, 1)]).unwrap();
    fs.set(|f| f.fail_sync = true);
    assert!(log.sync().is_err());
    fs.set(|f| f.fail_sync = false);
    let err = log.sync().unwrap_err();
    assert!(matches!(err, StorageError::Poisoned(_)), "{err}");
    assert!(err.to_string().contains("restart"), "{err}");
    assert!(log.append(&[entry(1, 2)]).is_err(), "no more writes");
}

#[test]
fn t40_metadata_round_trips_and_garbage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = MetaStore::new(Arc::new(StdFs), dir.path());
    assert_eq!(store.load().unwrap(), None, "a new member has no metadata");
    let meta = Meta {
        hard_state: HardState {
            term: 7,
            voted_for: Some(3),
        },
        initial_membership: Membership::with_voters([1, 2, 3].map(PeerInfo::new)),
        latest_membership: Some((42, Membership::with_voters([1, 2, 3, 4].map(PeerInfo::new)))),
    };
    store.store(&meta).unwrap();
    assert_eq!(store.load().unwrap(), Some(meta.clone()));
    let next = Meta {
        hard_state: HardState {
            term: 8,
            voted_for: None,
        },
        ..meta
    };
    store.store(&next).unwrap();
    assert_eq!(store.load().unwrap(), Some(next));
    std::fs::write(dir.path().join("raft-meta"), b"garbage garbage garbage").unwrap();
    let err = store.load().unwrap_err();
    assert!(matches!(err, StorageError::CorruptMeta { .. }), "{err}");
    assert!(
        err.to_string().contains("new member id"),
        "says what to do: {err}"
    );
}

// --------------------------------------------------------------------------
// The log worker (group commit)
// --------------------------------------------------------------------------

mod worker {
    use std::sync::mpsc;
    use std::time::Duration;

    use kuberaft_node::storage::{Completion, LogWorker, WorkerState, WriteBatch};

    use super::*;

    fn big_segments() -> LogOptions {
        LogOptions {
            segment_size_max_bytes: 64 << 20,
            ..LogOptions::default()
        }
    }

    fn state(fs: &FaultyFs, dir: &Path) -> WorkerState {
        let fs: Arc<dyn FileSystem> = Arc::new(fs.clone());
        let log = SegmentedLog::open(fs.clone(), dir, big_segments(), 0).unwrap();
        WorkerState::new(log, MetaStore::new(fs, dir), Meta::default())
    }

    fn batch(ready: u64) -> WriteBatch {
        WriteBatch {
            ready,
            entries: vec![entry(1, ready)],
            ..Default::default()
        }
    }

    /// Storage reads for a leader's followers behind its snapshot: bounded
    /// by bytes (two entries at least), read after the writes queued before
    /// them, and `None` once a purge queued before them dropped the entries.
    #[test]
    fn t60_fetches_read_bounded_entries_in_order_and_see_purges_before_them() {
        use kuberaft_node::core::Fetch;
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let fs_dyn: Arc<dyn FileSystem> = Arc::new(fs.clone());
        let opts = LogOptions {
            purge_keep_entries: 0,
            cache_max_bytes: 0,
            ..small()
        };
        let log = SegmentedLog::open(fs_dyn.clone(), dir.path(), opts, 0).unwrap();
        let mut st = WorkerState::new(log, MetaStore::new(fs_dyn, dir.path()), Meta::default());
        let all: Vec<_> = (1..=80).map(|i| entry(1 + i / 10, i)).collect();
        let fetch = |prev, hi, max_bytes| WriteBatch {
            ready: 1,
            fetch: Some(Fetch {
                to: 2,
                prev,
                hi,
                max_bytes,
            }),
            ..Default::default()
        };
        let write = WriteBatch {
            ready: 1,
            entries: all.clone(),
            ..Default::default()
        };
        // Written and read in one group: the read sees the write before it.
        let done = st.commit_group(vec![write, fetch(5, 60, 1 << 20), fetch(5, 60, 1)]);
        let fetched: Vec<_> = done
            .iter()
            .filter_map(|c| match c {
                Completion::Fetched { entries, .. } => Some(entries.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(fetched[0].as_deref(), Some(&all[4..60]), "all of 5..=60");
        assert_eq!(
            fetched[1].as_deref(),
            Some(&all[4..6]),
            "one byte: two entries"
        );
        // A purge queued before a fetch has happened when it reads.
        let purge = WriteBatch {
            ready: 1,
            purge_to: Some(40),
            ..Default::default()
        };
        let done = st.commit_group(vec![purge, fetch(5, 60, 1 << 20), fetch(70, 80, 1 << 20)]);
        let fetched: Vec<_> = done
            .iter()
            .filter_map(|c| match c {
                Completion::Fetched { entries, .. } => Some(entries.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(fetched[0], None, "purged: the follower needs the snapshot");
        assert_eq!(fetched[1].as_deref(), Some(&all[69..80]));
        // Reads alone cost no fsync.
        let before = fs.syncs();
        let done = st.commit_group(vec![fetch(70, 80, 1 << 20)]);
        assert!(
            matches!(
                &done[..],
                [
                    Completion::Durable { .. },
                    Completion::Fetched {
                        entries: Some(_),
                        ..
                    }
                ]
            ),
            "{done:?}"
        );
        assert_eq!(fs.syncs(), before, "no fsync for a read");
    }

    #[test]
    fn t50_one_fsync_for_a_whole_group_of_batches() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let mut st = state(&fs, dir.path());
        let before = fs.syncs();
        let done = st.commit_group((1..=100).map(batch).collect());
        assert_eq!(
            done,
            vec![Completion::Durable {
                ready: 100,
                last_index: 100
            }]
        );
        assert_eq!(fs.syncs() - before, 1, "100 requests, one fdatasync");
    }

    #[test]
    fn t50_hard_state_is_written_with_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let mut st = state(&fs, dir.path());
        let hs = HardState {
            term: 4,
            voted_for: Some(2),
        };
        let b = WriteBatch {
            ready: 1,
            hard_state: Some(hs),
            entries: vec![entry(4, 1)],
            ..Default::default()
        };
        st.commit_group(vec![b]);
        let meta = MetaStore::new(Arc::new(StdFs), dir.path())
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(meta.hard_state, hs);
        // A membership entry updates the latest membership in the same write.
        let m = Membership::with_voters([1, 2].map(PeerInfo::new));
        let e = kuberaft_node::core::Entry {
            term: 4,
            index: 2,
            payload: kuberaft_node::core::EntryPayload::Membership(m.clone()),
        };
        st.commit_group(vec![WriteBatch {
            ready: 2,
            entries: vec![e],
            ..Default::default()
        }]);
        let meta = MetaStore::new(Arc::new(StdFs), dir.path())
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(meta.latest_membership, Some((2, m)));
        assert_eq!(meta.hard_state, hs, "the hard state is kept");
    }

    #[test]
    fn t50_full_disk_is_reported_retried_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let mut st = state(&fs, dir.path());
        assert!(matches!(
            st.commit_group(vec![batch(1)])[..],
            [Completion::Durable { ready: 1, .. }]
        ));
        // Preallocation already holds the next few entries; make the disk
        // full for what comes after them.
        fs.set(|f| f.space_left = Some(0));
        let big: Vec<_> = (2..=2000).map(batch).collect();
        let out = st.commit_group(big);
        assert!(
            matches!(&out[..], [Completion::Unhealthy { no_space: true, .. }]),
            "{out:?}"
        );
        fs.set(|f| f.space_left = None);
        let out = st.commit_group(vec![]);
        assert_eq!(
            out,
            vec![
                Completion::Healthy,
                Completion::Durable {
                    ready: 2000,
                    last_index: 2000
                }
            ]
        );
    }

    #[test]
    fn t50_failed_fsync_is_fatal_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let mut st = state(&fs, dir.path());
        fs.set(|f| f.fail_sync = true);
        let out = st.commit_group(vec![batch(1)]);
        assert!(matches!(&out[..], [Completion::Failed { .. }]), "{out:?}");
    }

    #[test]
    fn t50_worker_thread_reports_every_batch_durable_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let (tx, rx) = mpsc::channel();
        let worker = LogWorker::spawn(
            state(&fs, dir.path()),
            Duration::from_millis(20),
            move |c| {
                let _ = tx.send(c);
            },
        )
        .unwrap();
        for i in 1..=300 {
            worker.submit(batch(i));
        }
        let mut last_ready = 0;
        while last_ready < 300 {
            match rx
                .recv_timeout(Duration::from_secs(30))
                .expect("worker answers within 30 s")
            {
                Completion::Durable { ready, last_index } => {
                    assert!(ready > last_ready, "in order");
                    assert_eq!(last_index, ready);
                    last_ready = ready;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let log = worker.stop().expect("log handed back");
        assert_eq!(log.last_index(), 300);
    }
}

// --------------------------------------------------------------------------
// Snapshots and whole-group recovery
// --------------------------------------------------------------------------

mod snapshots {
    use kuberaft_node::core::SnapshotMeta;
    use kuberaft_node::storage::SnapshotStore;

    use super::*;

    fn meta(term: u64, index: u64) -> SnapshotMeta {
        SnapshotMeta {
            index,
            term,
            membership: Membership::with_voters([1, 2, 3].map(PeerInfo::new)),
        }
    }

    fn write(store: &SnapshotStore, term: u64, index: u64, body: &[u8]) {
        let mut w = store.begin(meta(term, index)).unwrap();
        w.write_chunk("state", 0, body).unwrap();
        w.write_chunk("extra", 0, b"x").unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn t70_written_snapshot_is_found_verified_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(Arc::new(StdFs), dir.path(), 2).unwrap();
        assert_eq!(store.latest().unwrap(), None);
        // A received snapshot arrives in chunks.
        let mut w = store.begin(meta(2, 10)).unwrap();
        w.write_chunk("state", 0, b"hello ").unwrap();
        w.write_chunk("state", 6, b"world").unwrap();
        let info = w.finish().unwrap();
        assert_eq!(info.meta, meta(2, 10));
        let latest = store.latest().unwrap().unwrap();
        assert_eq!(latest, info);
        assert_eq!(store.read_file(&latest, "state").unwrap(), b"hello world");
    }

    #[test]
    fn t70_retention_keeps_the_newest_n() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(Arc::new(StdFs), dir.path(), 2).unwrap();
        for i in 1..=4 {
            write(&store, 1, i * 10, b"s");
        }
        assert_eq!(list(dir.path()), vec!["snapshot_1_30", "snapshot_1_40"]);
    }

    #[test]
    fn t70_unfinished_snapshot_is_never_seen_and_is_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SnapshotStore::open(Arc::new(StdFs), dir.path(), 2).unwrap();
            write(&store, 1, 10, b"old");
            let mut w = store.begin(meta(1, 20)).unwrap();
            w.write_chunk("state", 0, b"half of it").unwrap();
            // The member crashes here: the writer is dropped unfinished.
            assert_eq!(store.latest().unwrap().unwrap().meta.index, 10);
        }
        let store = SnapshotStore::open(Arc::new(StdFs), dir.path(), 2).unwrap();
        assert_eq!(
            list(dir.path()),
            vec!["snapshot_1_10"],
            "the .tmp directory is gone"
        );
        assert_eq!(store.latest().unwrap().unwrap().meta.index, 10);
    }

    #[test]
    fn t70_damaged_newest_snapshot_falls_back_to_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(Arc::new(StdFs), dir.path(), 3).unwrap();
        write(&store, 1, 10, b"older");
        write(&store, 1, 20, b"newer");
        flip_byte(&dir.path().join("snapshot_1_20").join("state"), 2);
        assert_eq!(store.latest().unwrap().unwrap().meta.index, 10);
        let err = store.verify(&dir.path().join("snapshot_1_20")).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn t70_bad_file_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(Arc::new(StdFs), dir.path(), 2).unwrap();
        let mut w = store.begin(meta(1, 1)).unwrap();
        assert!(w.write_chunk("../escape", 0, b"x").is_err());
        assert!(w.write_chunk("MANIFEST", 0, b"x").is_err());
    }
}

mod recovery {
    use bytes::Bytes;
    use kuberaft_node::core::{Config, EntryPayload, RaftCore, Ready, Role};
    use kuberaft_node::storage::{
        GroupStorageOptions, RecoveredGroup, WorkerState, WriteBatch, open_group,
    };

    use super::*;

    /// Runs a Ready through storage the way the node will: persist through
    /// the worker state, then tell the core; apply committed commands.
    fn execute(core: &mut RaftCore, st: &mut WorkerState, ready: Ready, applied: &mut Vec<Bytes>) {
        let batch = WriteBatch {
            ready: ready.number,
            reset_to: None,
            hard_state: ready.hard_state,
            entries: ready.entries,
            purge_to: None,
            fetch: None,
        };
        let fetches = ready.fetch.into_iter().map(|f| WriteBatch {
            ready: ready.number,
            fetch: Some(f),
            ..Default::default()
        });
        let batches = std::iter::once(batch).chain(fetches).collect();
        for c in st.commit_group(batches) {
            match c {
                Completion::Durable { ready, .. } => core.on_persisted(ready),
                Completion::Fetched { fetch, entries } => {
                    core.fetched(fetch.to, fetch.prev, entries)
                }
                _ => {}
            }
        }
        if let Some(last) = ready.committed_entries.last().map(|e| e.index) {
            for e in &ready.committed_entries {
                if let EntryPayload::Command(b) = &e.payload {
                    applied.push(b.clone());
                }
            }
            core.applied(last);
        }
    }

    fn drive(core: &mut RaftCore, st: &mut WorkerState, applied: &mut Vec<Bytes>) {
        for _ in 0..10 {
            let ready = core.take_ready();
            if ready.is_empty() {
                return;
            }
            execute(core, st, ready, applied);
        }
    }

    /// Ticks a single-member group until it leads; returns what it applied.
    fn elect_alone(core: &mut RaftCore, st: &mut WorkerState) -> Vec<Bytes> {
        let mut applied = Vec::new();
        for _ in 0..30 {
            core.tick();
            drive(core, st, &mut applied);
        }
        assert_eq!(core.role(), Role::Leader);
        applied
    }

    fn opts() -> GroupStorageOptions {
        GroupStorageOptions {
            log: small(),
            snapshots_retained: 2,
        }
    }

    fn start(g: RecoveredGroup) -> (RaftCore, WorkerState) {
        let core = RaftCore::new(
            Config::new(1),
            g.meta.hard_state,
            g.snapshot.clone(),
            g.entries,
        )
        .unwrap();
        (core, WorkerState::new(g.log, g.meta_store, g.meta))
    }

    use kuberaft_node::storage::Completion;

    #[test]
    fn t80_group_restarts_from_snapshot_plus_log() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(StdFs);
        let initial = Membership::with_voters([PeerInfo::new(1)]);
        let g = open_group(fs.clone(), dir.path(), &opts()).unwrap();
        g.meta_store
            .store(&Meta {
                initial_membership: initial.clone(),
                ..Meta::default()
            })
            .unwrap();
        let g = open_group(fs.clone(), dir.path(), &opts()).unwrap();
        assert_eq!(
            g.snapshot.membership, initial,
            "a new group starts from its initial membership"
        );
        let (mut core, mut st) = start(g);
        let mut applied = elect_alone(&mut core, &mut st);
        for i in 0..50 {
            core.propose(Bytes::from(format!("cmd {i}"))).unwrap();
            drive(&mut core, &mut st, &mut applied);
        }
        assert_eq!(applied.len(), 50);
        // Snapshot at 30, then compact and purge.
        let snap = core.snapshot_meta(30).unwrap();
        let g_snap = snapshot_store(&fs, dir.path());
        let mut w = g_snap.begin(snap.clone()).unwrap();
        w.write_chunk("state", 0, format!("{} commands", 29).as_bytes())
            .unwrap();
        w.finish().unwrap();
        core.compact(30);
        st.log.purge(30).unwrap();
        let last = core.log().last_index();
        // The commands the log holds after the snapshot (the leader's own
        // entries, a no-op and a cluster level, sit among them).
        let commands_after = core
            .log()
            .slice(31, last, usize::MAX)
            .unwrap()
            .iter()
            .filter(|e| matches!(e.payload, EntryPayload::Command(_)))
            .count();
        assert!(commands_after >= 20, "{commands_after}");
        let term = core.term();
        drop((core, st));

        let g = open_group(fs.clone(), dir.path(), &opts()).unwrap();
        assert_eq!(g.snapshot, snap, "the newest snapshot is loaded");
        assert_eq!(g.meta.hard_state.term, term);
        assert_eq!(
            g.entries.first().map(|e| e.index),
            Some(31),
            "the log replays after it"
        );
        assert_eq!(g.entries.last().map(|e| e.index), Some(last));
        let (mut core, mut st) = start(g);
        let applied = elect_alone(&mut core, &mut st);
        assert_eq!(
            applied.len(),
            commands_after,
            "commands after the snapshot are applied again"
        );
        assert_eq!(applied.last().unwrap(), &Bytes::from("cmd 49"));
    }

    fn snapshot_store(
        fs: &Arc<dyn FileSystem>,
        dir: &Path,
    ) -> kuberaft_node::storage::SnapshotStore {
        kuberaft_node::storage::SnapshotStore::open(fs.clone(), &dir.join("snapshots"), 2).unwrap()
    }

    #[test]
    fn t80_log_that_does_not_continue_the_snapshot_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(StdFs);
        let g = open_group(fs.clone(), dir.path(), &opts()).unwrap();
        let mut log = g.log;
        log.append(&(1..=20).map(|i| entry(1, i)).collect::<Vec<_>>())
            .unwrap();
        log.sync().unwrap();
        drop(log);
        // A leader's snapshot at (15, term 3) was published; the crash came
        // before the log was reset.
        let store = snapshot_store(&fs, dir.path());
        let mut w = store
            .begin(kuberaft_node::core::SnapshotMeta {
                index: 15,
                term: 3,
                membership: Membership::with_voters([PeerInfo::new(1)]),
            })
            .unwrap();
        w.write_chunk("state", 0, b"s").unwrap();
        w.finish().unwrap();
        let g = open_group(fs, dir.path(), &opts()).unwrap();
        assert_eq!(g.snapshot.index, 15);
        assert!(
            g.entries.is_empty(),
            "the stale term-1 suffix is not replayed"
        );
        assert_eq!(g.log.first_index(), 16);
    }
}

/// The binaries print an error with its chain of causes (`{:#}`); a cause
/// that is also spelled out in its wrapper's message came out twice.
#[test]
fn storage_and_node_errors_name_their_cause_once() {
    use kuberaft_node::server::node::NodeError;
    let path = Path::new("/data/groups/x/log/log_inprogress_1");
    let errors = [
        NodeError::from(StorageError::Corrupt {
            file: path.into(),
            offset: 0,
            reason: "not a log segment file (wrong magic)".into(),
        }),
        NodeError::from(StorageError::io(
            "read",
            path,
            std::io::Error::other("disk on fire"),
        )),
        NodeError::Io {
            what: "create",
            path: path.into(),
            error: std::io::Error::other("disk on fire"),
        },
    ];
    for e in errors {
        let shown = format!("{:#}", anyhow::Error::from(e).context("cannot open"));
        assert_eq!(shown.matches(path.to_str().unwrap()).count(), 1, "{shown}");
        assert!(shown.matches("disk on fire").count() <= 1, "{shown}");
    }
}

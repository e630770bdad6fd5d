//! Crash test: a child process appends to a segmented log and reports what
//! is durable; it is SIGKILLed at random points (seeded, so a failure can be
//! replayed), restarted on the same directory, killed again. After every
//! kill, every entry it reported durable must be present and intact, and
//! whatever else recovery kept must be valid too.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use kuberaft_node::storage::fs::StdFs;
use kuberaft_node::storage::testing::entry;
use kuberaft_node::storage::{LogOptions, LogStore, SegmentedLog};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Kills the child when dropped, also when the test fails.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn term_of(index: u64) -> u64 {
    1 + index / 200
}

fn check(dir: &Path, reported: u64, round: usize, seed: u64) {
    let log =
        SegmentedLog::open(Arc::new(StdFs), dir, LogOptions::default(), 0).unwrap_or_else(|e| {
            panic!("seed {seed} round {round}: the log does not open after a kill: {e}")
        });
    let last = log.last_index();
    assert!(
        last >= reported,
        "seed {seed} round {round}: reported durable up to {reported}, recovered only {last}"
    );
    if last > 0 {
        let got = log.entries(1, last).unwrap();
        for e in got {
            assert_eq!(
                e,
                entry(term_of(e.index), e.index),
                "seed {seed} round {round}: entry {} damaged",
                e.index
            );
        }
    }
}

#[test]
fn t60_sigkill_at_random_points_loses_nothing_reported_durable() {
    let seed = 20261124;
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut reported = 0;
    for round in 0..12 {
        let child = Command::new(env!("CARGO_BIN_EXE_logcrash"))
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start logcrash");
        let mut child = Killed(child);
        let stdout = child.0.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let kill_after = rng.random_range(1..150);
        for _ in 0..kill_after {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("seed {seed} round {round}: logcrash stopped early"))
                .unwrap();
            let n: u64 = line.trim_start_matches("durable ").parse().unwrap();
            assert!(n >= reported, "durable index went back");
            reported = n;
        }
        // Killed while it is in the middle of its next batch.
        drop(child);
        check(dir.path(), reported, round, seed);
    }
    assert!(
        reported > 100,
        "the child made progress ({reported} entries)"
    );
}

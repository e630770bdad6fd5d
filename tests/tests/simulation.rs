//! The deterministic simulation as part of `cargo test`: a few hundred seeds
//! over 3- and 5-member groups. Any violation fails the test with the seed,
//! the last events and the one command that replays it.

use std::time::Instant;

use kuberaft_tests::sim::{SimOptions, SimStats, run};

fn run_seeds(members: usize, seeds: std::ops::Range<u64>) -> SimStats {
    run_seeds_with(members, seeds, SimOptions::new(0, members).chaos_ms)
}

fn run_seeds_with(members: usize, seeds: std::ops::Range<u64>, chaos_ms: u64) -> SimStats {
    let started = Instant::now();
    let mut total = SimStats::default();
    let count = seeds.end - seeds.start;
    for seed in seeds {
        let mut opts = SimOptions::new(seed, members);
        opts.chaos_ms = chaos_ms;
        match run(opts) {
            Ok(s) => {
                total.ops_completed += s.ops_completed;
                total.crashes += s.crashes;
                total.partitions += s.partitions;
                total.leaders_elected += s.leaders_elected;
                total.conf_changes_ok += s.conf_changes_ok;
                total.transfers_ok += s.transfers_ok;
                total.snapshots_installed += s.snapshots_installed;
                total.quiet_spells += s.quiet_spells;
                total.entries_fetched += s.entries_fetched;
                total.fetches_purged += s.fetches_purged;
            }
            Err(v) => panic!("seed {seed} ({members} members) failed:\n{v}"),
        }
    }
    println!(
        "{count} seeds x {members} members in {:?}: {} operations checked, {} leaders, {} crashes, \
         {} partitions, {} membership changes, {} transfers, {} snapshots installed, \
         {} quiet spells, {} entries read back from storage for followers behind a snapshot \
         ({} reads found them purged)",
        started.elapsed(),
        total.ops_completed,
        total.leaders_elected,
        total.crashes,
        total.partitions,
        total.conf_changes_ok,
        total.transfers_ok,
        total.snapshots_installed,
        total.quiet_spells,
        total.entries_fetched,
        total.fetches_purged
    );
    // The runs must have exercised what they claim to.
    assert!(
        total.ops_completed > count * 50,
        "too few operations completed"
    );
    assert!(total.crashes > 0 && total.partitions > 0 && total.leaders_elected > count);
    assert!(total.conf_changes_ok > 0 && total.transfers_ok > 0 && total.snapshots_installed > 0);
    assert!(total.quiet_spells > 0, "no group ever went quiet");
    assert!(
        total.entries_fetched > 0,
        "no follower was served from storage behind a snapshot"
    );
    total
}

#[test]
fn t80_three_member_groups_1500_seeds() {
    run_seeds(3, 0..1500);
}

#[test]
fn t80_five_member_groups_800_seeds() {
    run_seeds(5, 10_000..10_800);
}

/// Longer runs: faults for 40 virtual seconds, so logs grow, snapshots roll
/// and membership drifts far from where it started.
#[test]
fn t80_long_chaos_150_seeds() {
    run_seeds_with(3, 20_000..20_100, 40_000);
    run_seeds_with(5, 30_000..30_050, 40_000);
}

#[test]
fn t80_a_seed_replays_exactly() {
    let a = run(SimOptions::new(42, 3)).expect("seed 42 passes");
    let b = run(SimOptions::new(42, 3)).expect("seed 42 passes");
    assert_eq!(
        (
            a.events,
            a.ops_completed,
            a.messages_sent,
            a.leaders_elected,
            a.virtual_ms
        ),
        (
            b.events,
            b.ops_completed,
            b.messages_sent,
            b.leaders_elected,
            b.virtual_ms
        )
    );
}

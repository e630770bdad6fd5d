//! The nemesis in its short mode, as part of `cargo test`: real node
//! processes, every fault kind, and the histories checked. The long mode is
//! `cargo run --release -p kuberaft-tests --bin nemesis -- --duration 10m`.

use std::time::Duration;

use kuberaft_tests::nemesis::{NemesisOptions, Report, run};

/// Runs the nemesis and fails on any anomaly, or on a run that exercised
/// too little to mean anything (few operations checked, few faults).
async fn run_clean(opts: NemesisOptions, min_ops: usize, min_faults: u64) -> Report {
    let report = run(opts).await.expect("the nemesis could not run");
    println!("{report}");
    assert!(
        report.anomalies.is_empty(),
        "anomalies found:\n{report}\n{}",
        report.timeline.join("\n")
    );
    assert!(report.ops_checked > min_ops, "{report}");
    assert!(
        report.faults.values().sum::<u64>() >= min_faults,
        "{report}"
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_nemesis_finds_no_anomaly() {
    // A fixed seed keeps the fault schedule the same from run to run; the
    // timing still differs, as it does on any real machine.
    let opts = NemesisOptions::new(20261124, Duration::from_secs(45));
    let report = run_clean(opts, 1000, 5).await;
    assert!(report.counter_acked > 100, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_nemesis_with_the_leader_lease_finds_no_anomaly() {
    // Lease reads are linearizable only if the lease runs out on real time,
    // also for a leader that is cut off and starved of CPU.
    let mut opts = NemesisOptions::new(20261201, Duration::from_secs(30));
    opts.leader_lease = true;
    // Drawn uniformly from the list: three entries make the starved leader
    // the common case, which this run is for.
    opts.faults = [
        "throttle-leader",
        "throttle-leader",
        "throttle-leader",
        "isolate-leader",
        "pause",
        "partition",
        "kill",
    ]
    .map(String::from)
    .to_vec();
    let report = run_clean(opts, 500, 3).await;
    assert!(
        report.faults.get("throttle-leader").is_some_and(|n| *n > 0),
        "the run must starve a leader at least once:\n{report}"
    );
}

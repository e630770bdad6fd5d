//! Runs simulation seeds: `sim --seeds A..B [--members N]`. Prints one line
//! per seed and exits non-zero at the first violation, after printing it and
//! the command that replays it.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kuberaft_tests::sim::{SimOptions, run};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of kuberaft's consensus core")]
struct Args {
    /// Seed range, `A..B` (B exclusive) or a single seed.
    #[arg(long, default_value = "0..100")]
    seeds: String,
    /// Voters at start (spare members are added for membership changes).
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Virtual milliseconds of fault injection before the network heals.
    #[arg(long, default_value_t = 8_000)]
    chaos_ms: u64,
    /// Print every notable event of each run.
    #[arg(long)]
    verbose: bool,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--seeds takes A..B or a single number, got {s:?}");
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a >= b {
                return Err(format!("--seeds {s}: the range is empty (B is exclusive)"));
            }
            Ok((a, b))
        }
        None => {
            let a: u64 = s.parse().map_err(|_| bad())?;
            Ok((a, a + 1))
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (from, to) = match parse_range(&args.seeds) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let mut ops = 0;
    for seed in from..to {
        let mut opts = SimOptions::new(seed, args.members);
        opts.chaos_ms = args.chaos_ms;
        opts.verbose = args.verbose;
        let t = Instant::now();
        match run(opts) {
            Ok(s) => {
                ops += s.ops_completed;
                println!(
                    "seed {seed}: ok in {:?}: {} ops ({} writes, {} reads), {} leaders, {} crashes, \
                     {} partitions, {} snapshots installed, membership {} ok / {} failed, \
                     transfers {} ok / {} failed, {} msgs ({} dropped), {} virtual ms",
                    t.elapsed(),
                    s.ops_completed,
                    s.writes_acked,
                    s.reads_done,
                    s.leaders_elected,
                    s.crashes,
                    s.partitions,
                    s.snapshots_installed,
                    s.conf_changes_ok,
                    s.conf_changes_failed,
                    s.transfers_ok,
                    s.transfers_failed,
                    s.messages_sent,
                    s.messages_dropped,
                    s.virtual_ms
                );
            }
            Err(v) => {
                println!("seed {seed}: FAILED\n{v}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "{} seeds with {} members passed in {:?} ({ops} client operations checked)",
        to - from,
        args.members,
        started.elapsed()
    );
    ExitCode::SUCCESS
}

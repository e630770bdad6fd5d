//! Runs the nemesis against real `kuberaft-node` processes:
//! `nemesis --duration 10m --seed S`. Prints a summary (operations checked,
//! faults injected, anomalies found) and exits non-zero on any anomaly.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kuberaft_tests::nemesis::{FAULTS, NemesisOptions, run};

#[derive(Parser, Debug)]
#[command(about = "Fault injection on a local kuberaft cluster, with the histories checked")]
struct Args {
    /// How long to inject faults, e.g. 90s, 10m, 1h.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the fault schedule and the clients' choices (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Register clients (put, get, compare-and-set).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Counter clients (exactly-once adds).
    #[arg(long, default_value_t = 3)]
    counter_clients: usize,
    /// Fault kinds to use, comma separated (default: all).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Print every fault as it is injected.
    #[arg(long)]
    verbose: bool,
    /// Keep the members' data and logs (they are kept anyway when an
    /// anomaly is found).
    #[arg(long)]
    keep: bool,
    /// Run the members with `--leader-lease` (lease reads are checked too).
    #[arg(long)]
    leader_lease: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected a number with s, m or h, e.g. 90s or 10m");
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = n.parse().map_err(|_| bad())?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(bad()),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut opts = NemesisOptions::new(seed, args.duration);
    opts.register_clients = args.clients;
    opts.counter_clients = args.counter_clients;
    opts.verbose = args.verbose;
    opts.keep = args.keep;
    opts.leader_lease = args.leader_lease;
    if !args.faults.is_empty() {
        opts.faults = args.faults;
    }
    eprintln!(
        "nemesis: seed {seed}, {:?} of faults from {}",
        args.duration,
        opts.faults.join(", ")
    );
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match rt.block_on(run(opts)) {
        Ok(report) => {
            print!("{report}");
            if report.anomalies.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "replay the schedule: cargo run --release -p kuberaft-tests --bin nemesis -- --duration {}s --seed {seed}",
                    args.duration.as_secs()
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("nemesis could not run: {e:#}");
            eprintln!("known faults: {}", FAULTS.join(", "));
            ExitCode::from(2)
        }
    }
}

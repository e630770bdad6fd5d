//! Log append benchmark (not a test): appends per second and MB/s with an
//! fdatasync per batch, for 128 B and 4 KiB entries and batches of 1 to 1024
//! entries, through the segmented log on the real file system. Also measures
//! the disk's bare fdatasync latency, to read the figures against.
//!
//! `cargo run --release -p kuberaft-tests --bin logbench -- [--dir D] [--seconds S]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use kuberaft_node::core::{Entry, EntryPayload};
use kuberaft_node::storage::fs::{FileSystem, StdFs};
use kuberaft_node::storage::{LogOptions, LogStore, SegmentedLog};

#[derive(Parser, Debug)]
#[command(about = "Benchmark kuberaft's segmented log with fsync on")]
struct Args {
    /// Directory on the disk to measure (a fresh subdirectory is used).
    #[arg(long, default_value = "target/logbench")]
    dir: PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

fn fdatasync_latency(dir: &std::path::Path, budget: Duration) -> anyhow::Result<(f64, f64)> {
    let fs = StdFs;
    let path = dir.join("fsync-probe");
    let mut f = fs.open(&path, true)?;
    let block = vec![7u8; 4096];
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut off = 0;
    while started.elapsed() < budget || samples.len() < 20 {
        f.write_at(&block, off)?;
        let t = Instant::now();
        f.sync_data()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        off += 4096;
    }
    samples.sort_by(f64::total_cmp);
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    fs.remove_file(&path)?;
    Ok((p50, p99))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let budget = Duration::from_secs_f64(args.seconds);
    std::fs::create_dir_all(&args.dir)?;
    let run_dir = args.dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let (p50, p99) = fdatasync_latency(&run_dir, budget)?;
    println!("disk: fdatasync of a 4 KiB write: p50 {p50:.3} ms, p99 {p99:.3} ms");
    println!(
        "{:>8} {:>6} {:>12} {:>10} {:>10}",
        "entry", "batch", "appends/s", "MB/s", "syncs/s"
    );
    for size in [128usize, 4096] {
        for batch in [1usize, 8, 64, 256, 1024] {
            let dir = run_dir.join(format!("log-{size}-{batch}"));
            let mut log = SegmentedLog::open(Arc::new(StdFs), &dir, LogOptions::default(), 0)?;
            let payload = Bytes::from(vec![b'x'; size]);
            let started = Instant::now();
            let (mut n, mut syncs, mut next) = (0u64, 0u64, 1u64);
            while started.elapsed() < budget {
                let entries: Vec<Entry> = (next..next + batch as u64)
                    .map(|index| Entry {
                        term: 1,
                        index,
                        payload: EntryPayload::Command(payload.clone()),
                    })
                    .collect();
                next += batch as u64;
                log.append(&entries)?;
                log.sync()?;
                n += batch as u64;
                syncs += 1;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{:>7}B {:>6} {:>12.0} {:>10.1} {:>10.0}",
                size,
                batch,
                n as f64 / secs,
                n as f64 * size as f64 / secs / 1e6,
                syncs as f64 / secs
            );
            drop(log);
            std::fs::remove_dir_all(&dir)?;
        }
    }
    std::fs::remove_dir_all(&run_dir)?;
    Ok(())
}

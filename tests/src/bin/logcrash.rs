//! Crash-test child: appends to a segmented log in `DIR` forever (at most a
//! minute), fsyncs after every batch and prints `durable N` once entries up
//! to N are durable. The crash test SIGKILLs it at random moments and checks
//! that everything it reported is still there.
//!
//! Entry `i` has term `1 + i / 200` (so segments also roll on term changes)
//! and the payload `storage::testing::entry` derives from (term, i).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kuberaft_node::storage::fs::StdFs;
use kuberaft_node::storage::testing::entry;
use kuberaft_node::storage::{LogOptions, LogStore, SegmentedLog};

fn term_of(index: u64) -> u64 {
    1 + index / 200
}

fn main() -> anyhow::Result<()> {
    let dir: PathBuf = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: logcrash DIR"))?
        .into();
    let opts = LogOptions {
        segment_size_max_bytes: 64 << 10,
        preallocate_bytes: 16 << 10,
        ..Default::default()
    };
    let mut log = SegmentedLog::open(Arc::new(StdFs), &dir, opts, 0)?;
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut batch = 1u64;
    while started.elapsed() < Duration::from_secs(60) {
        let next = log.last_index() + 1;
        let n = 1 + (batch * 7919) % 40;
        let entries: Vec<_> = (next..next + n).map(|i| entry(term_of(i), i)).collect();
        log.append(&entries)?;
        let durable = log.sync()?;
        writeln!(out, "durable {durable}")?;
        out.flush()?;
        batch += 1;
    }
    Ok(())
}

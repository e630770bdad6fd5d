//! Arbitrary bytes as the only segment of a log: recovery either opens it
//! or refuses with an error, and never panics.
#![no_main]

use std::sync::Arc;

use kuberaft_node::storage::fs::StdFs;
use kuberaft_node::storage::{LogOptions, LogStore, SegmentedLog};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log_inprogress_1"), data).unwrap();
    if let Ok(log) = SegmentedLog::open(Arc::new(StdFs), dir.path(), LogOptions::default(), 0) {
        let last = log.last_index();
        if last > 0 {
            log.entries(1, last).expect("recovered entries are readable");
        }
    }
});

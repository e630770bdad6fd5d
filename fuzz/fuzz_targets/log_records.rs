//! Every position of arbitrary bytes read as a log record: no panic, and a
//! valid record never points past the buffer.
#![no_main]

use kuberaft_node::storage::format::{Record, read_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for pos in 0..=data.len() {
        if let Record::Valid { next, .. } = read_record(data, pos) {
            assert!(next <= data.len());
        }
    }
});

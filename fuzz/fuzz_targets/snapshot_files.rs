//! Arbitrary snapshot files for the built-in state machines and the retry
//! cache: restored or refused, never a panic.
#![no_main]

use kuberaft_node::server::apply::{Applier, RETRY_CACHE_FILE};
use kuberaft_node::statemachine::builtin;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(0) as usize % (data.len() + 1);
    let (a, b) = data.split_at(split);
    for sm in ["kv", "counter"] {
        let mut applier = Applier::new(builtin(sm).unwrap(), 60_000);
        let files = vec![
            (sm.to_string(), a.to_vec()),
            (RETRY_CACHE_FILE.to_string(), b.to_vec()),
        ];
        let _ = applier.restore(1, &files);
    }
});

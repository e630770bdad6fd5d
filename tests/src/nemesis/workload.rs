//! The clients of a nemesis run and what they record.
//!
//! - Register clients put, get and compare-and-set keys of the `reg` group
//!   (kv). Every value is unique, every operation is recorded with its
//!   invocation and response time, and a write whose answer never came is
//!   recorded as possibly taken effect ([`NEVER_RETURNED`]). The keys move
//!   on every few hundred operations so each key's history stays small
//!   enough for the linearizability checker.
//! - Counter clients add 1 to the `ctr` group (counter). Each acknowledged
//!   add returns the running total, so a call applied twice shows up as a
//!   final value above the acknowledged plus the unknown adds, and two
//!   calls answered with the same total show a lost or merged write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use kuberaft_node::client::{Client, ClientError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::history::{NEVER_RETURNED, Operation, RegisterOp};

/// Keys in use at a time.
pub const KEYS_PER_SET: u64 = 8;
/// Operations before the clients move on to the next keys.
pub const OPS_PER_SET: u64 = 240;

pub fn key_name(key: u64) -> String {
    format!("r{key:010}")
}

pub fn parse_key(name: &[u8]) -> Option<u64> {
    std::str::from_utf8(name.strip_prefix(b"r")?)
        .ok()?
        .parse()
        .ok()
}

/// Everything the clients saw.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    pub ops: Mutex<Vec<Operation>>,
    /// Answers that are bugs whatever the faults (e.g. a value no one wrote).
    pub anomalies: Mutex<Vec<String>>,
    /// Totals returned by acknowledged counter adds.
    pub counter_acked: Mutex<Vec<i64>>,
    pub counter_unknown: AtomicU64,
    /// Failed operations by reason (timeouts, refusals).
    pub errors: Mutex<HashMap<String, u64>>,
    pub next_op: AtomicU64,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder {
            start: Instant::now(),
            ops: Mutex::default(),
            anomalies: Mutex::default(),
            counter_acked: Mutex::default(),
            counter_unknown: AtomicU64::new(0),
            errors: Mutex::default(),
            next_op: AtomicU64::new(0),
        })
    }

    /// Microseconds since the run started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn record(&self, op: Operation) {
        self.ops.lock().expect("lock").push(op);
    }

    pub fn anomaly(&self, what: String) {
        self.anomalies.lock().expect("lock").push(what);
    }

    fn error(&self, e: &ClientError) {
        let kind = match e {
            ClientError::Timeout { .. } => "timeout",
            ClientError::StateMachine { .. } => "refused",
            ClientError::UnknownGroup { .. } => "unknown group",
            ClientError::Invalid(_) => "invalid",
            ClientError::Decode(_) => "decode",
        };
        *self
            .errors
            .lock()
            .expect("lock")
            .entry(kind.into())
            .or_default() += 1;
    }

    /// Whether an error can happen under faults; anything else is a bug.
    fn expected(&self, e: &ClientError) -> bool {
        self.error(e);
        // The client retries everything else a fault can cause (no leader,
        // full queues, a closed group); the workload's commands are valid,
        // so a refusal is a bug.
        matches!(e, ClientError::Timeout { .. })
    }
}

fn value_of(client: usize, n: u64) -> u64 {
    ((client as u64 + 1) << 40) | n
}

fn parse_value(rec: &Recorder, key: u64, v: Option<Bytes>) -> Option<Option<u64>> {
    match v {
        None => Some(None),
        Some(b) => match std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok()) {
            Some(v) => Some(Some(v)),
            None => {
                rec.anomaly(format!("key {key} holds {b:?}, which no client wrote"));
                None
            }
        },
    }
}

/// One register client until `stop`.
pub async fn register_client(
    id: usize,
    client: Client,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (id as u64) << 32);
    let mut written = 0u64;
    // The last value this client saw in each key, to compare-and-set from.
    let mut seen: HashMap<u64, u64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let n = rec.next_op.fetch_add(1, Ordering::Relaxed);
        let key = (n / OPS_PER_SET) * KEYS_PER_SET + rng.random_range(0..KEYS_PER_SET);
        let name = key_name(key);
        let roll = rng.random_range(0..10);
        let invoked_at = rec.now();
        let op = if roll < 4 {
            let got = client.get(name.as_bytes()).await;
            match got {
                Ok(v) => {
                    let Some(v) = parse_value(&rec, key, v) else {
                        continue;
                    };
                    if let Some(v) = v {
                        seen.insert(key, v);
                    }
                    Some((RegisterOp::Get(v), rec.now()))
                }
                Err(e) => {
                    if !rec.expected(&e) {
                        rec.anomaly(format!("get {name}: {e}"));
                    }
                    // A read that failed had no effect.
                    None
                }
            }
        } else if roll < 7 || !seen.contains_key(&key) {
            written += 1;
            let v = value_of(id, written);
            match client.put(name.as_bytes(), v.to_string().as_bytes()).await {
                Ok(_) => {
                    seen.insert(key, v);
                    Some((RegisterOp::Put(v), rec.now()))
                }
                Err(e) => write_failed(&rec, &e, &name, RegisterOp::Put(v)),
            }
        } else {
            written += 1;
            let new = value_of(id, written);
            let expected = seen[&key];
            let r = client
                .cas(
                    name.as_bytes(),
                    Some(expected.to_string().as_bytes()),
                    new.to_string().as_bytes(),
                )
                .await;
            match r {
                Ok((ok, _)) => {
                    if ok {
                        seen.insert(key, new);
                    }
                    Some((RegisterOp::Cas { expected, new, ok }, rec.now()))
                }
                Err(e) => write_failed(&rec, &e, &name, RegisterOp::CasUnknown { expected, new }),
            }
        };
        if let Some((op, returned_at)) = op {
            rec.record(Operation {
                client: id,
                key,
                invoked_at,
                returned_at,
                op,
            });
        }
    }
}

/// A write that got no answer may still take effect: it is recorded as
/// never returning. One refused before logging had no effect.
fn write_failed(
    rec: &Recorder,
    e: &ClientError,
    name: &str,
    op: RegisterOp,
) -> Option<(RegisterOp, u64)> {
    if !rec.expected(e) {
        rec.anomaly(format!("write to {name}: {e}"));
    }
    match e {
        ClientError::StateMachine {
            rejected_before_logging: true,
            ..
        } => None,
        _ => Some((op, NEVER_RETURNED)),
    }
}

/// One counter client until `stop`.
pub async fn counter_client(client: Client, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match client.counter_add(1).await {
            Ok(total) => rec.counter_acked.lock().expect("lock").push(total),
            Err(e) => {
                if !rec.expected(&e) {
                    rec.anomaly(format!("counter add: {e}"));
                }
                if !matches!(
                    e,
                    ClientError::StateMachine {
                        rejected_before_logging: true,
                        ..
                    }
                ) {
                    rec.counter_unknown.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Checks the counter: every acknowledged add applied exactly once.
pub fn check_counter(rec: &Recorder, final_value: i64) -> Vec<String> {
    let mut out = Vec::new();
    let mut acked = rec.counter_acked.lock().expect("lock").clone();
    let unknown = rec.counter_unknown.load(Ordering::Relaxed) as i64;
    acked.sort_unstable();
    if let Some(w) = acked.windows(2).find(|w| w[0] == w[1]) {
        out.push(format!(
            "counter: two acknowledged adds were both answered with total {}",
            w[0]
        ));
    }
    let n = acked.len() as i64;
    if final_value < n {
        out.push(format!(
            "counter: {n} adds acknowledged but the final value is {final_value} (acknowledged writes lost)"
        ));
    }
    if final_value > n + unknown {
        out.push(format!(
            "counter: final value {final_value} exceeds {n} acknowledged + {unknown} unanswered adds (a call applied twice)"
        ));
    }
    if acked.last().is_some_and(|m| *m > final_value) {
        out.push(format!(
            "counter: an add was answered with {} but the final value is {final_value}",
            acked.last().expect("checked")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_check_sees_duplicates_and_losses() {
        let rec = Recorder::new();
        rec.counter_acked.lock().unwrap().extend([1, 2, 3]);
        assert!(check_counter(&rec, 3).is_empty());
        assert!(!check_counter(&rec, 4).is_empty(), "applied twice");
        assert!(!check_counter(&rec, 2).is_empty(), "lost");
        rec.counter_unknown.store(1, Ordering::Relaxed);
        assert!(
            check_counter(&rec, 4).is_empty(),
            "the unanswered add took effect"
        );
        rec.counter_acked.lock().unwrap().push(3);
        assert!(!check_counter(&rec, 5).is_empty(), "same total twice");
    }

    #[test]
    fn key_names_round_trip() {
        assert_eq!(parse_key(key_name(42).as_bytes()), Some(42));
        assert_eq!(parse_key(b"x1"), None);
    }
}

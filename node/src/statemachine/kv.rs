//! The `kv` built-in: a sorted map of byte keys to byte values with put,
//! delete, compare-and-set, get and prefix scan (`kuberaft.v1.Kv*`).

use std::collections::BTreeMap;

use bytes::Bytes;
use kuberaft_proto::v1 as pb;
use prost::Message;

use super::{SnapshotFiles, StateMachine, StateMachineError, file, malformed};
use crate::core::Index;

/// Keys longer than this are refused before logging.
pub const MAX_KEY_BYTES: usize = 4096;
/// A scan returns at most this many pairs (and says it was truncated).
pub const MAX_SCAN_LIMIT: u32 = 1000;
const SNAPSHOT_FILE: &str = "kv";

#[derive(Clone, PartialEq, prost::Message)]
struct KvSnapshot {
    #[prost(message, repeated, tag = "1")]
    pairs: Vec<pb::KvPair>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kv {
    data: BTreeMap<Bytes, Bytes>,
    applied: Index,
}

fn decode_command(command: &[u8]) -> Result<pb::kv_command::Op, StateMachineError> {
    let c = pb::KvCommand::decode(command).map_err(|e| malformed("kv command", e))?;
    let op =
        c.op.ok_or_else(|| malformed("kv command", "no operation set"))?;
    let key = match &op {
        pb::kv_command::Op::Put(p) => &p.key,
        pb::kv_command::Op::Delete(d) => &d.key,
        pb::kv_command::Op::CompareAndSet(c) => &c.key,
    };
    if key.is_empty() {
        return Err(malformed("kv command", "the key is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(malformed(
            "kv command",
            format!("the key is {} bytes, over {MAX_KEY_BYTES}", key.len()),
        ));
    }
    Ok(op)
}

fn result(r: pb::KvResult) -> Bytes {
    Bytes::from(r.encode_to_vec())
}

impl Kv {
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        self.data.get(key)
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl StateMachine for Kv {
    fn name(&self) -> &'static str {
        "kv"
    }

    fn start_transaction(&self, command: &[u8]) -> Result<(), StateMachineError> {
        decode_command(command).map(|_| ())
    }

    fn apply(&mut self, index: Index, command: &[u8]) -> Result<Bytes, StateMachineError> {
        self.applied = index;
        let out = match decode_command(command)? {
            pb::kv_command::Op::Put(p) => {
                self.data.insert(p.key, p.value);
                pb::KvResult {
                    ok: true,
                    ..Default::default()
                }
            }
            pb::kv_command::Op::Delete(d) => {
                let existed = self.data.remove(&d.key).is_some();
                pb::KvResult {
                    ok: existed,
                    ..Default::default()
                }
            }
            pb::kv_command::Op::CompareAndSet(c) => {
                let current = self.data.get(&c.key);
                let holds = match current {
                    None => c.expect_absent,
                    Some(v) => !c.expect_absent && *v == c.expected,
                };
                if holds {
                    self.data.insert(c.key, c.value);
                    pb::KvResult {
                        ok: true,
                        ..Default::default()
                    }
                } else {
                    pb::KvResult {
                        ok: false,
                        value: current.cloned(),
                        ..Default::default()
                    }
                }
            }
        };
        Ok(result(out))
    }

    fn query(&self, query: &[u8]) -> Result<Bytes, StateMachineError> {
        let q = pb::KvQuery::decode(query).map_err(|e| malformed("kv query", e))?;
        let out = match q
            .op
            .ok_or_else(|| malformed("kv query", "no operation set"))?
        {
            pb::kv_query::Op::Get(g) => {
                let value = self.data.get(&g.key).cloned();
                pb::KvResult {
                    ok: value.is_some(),
                    value,
                    ..Default::default()
                }
            }
            pb::kv_query::Op::Scan(s) => {
                let limit = if s.limit == 0 {
                    MAX_SCAN_LIMIT
                } else {
                    s.limit.min(MAX_SCAN_LIMIT)
                } as usize;
                let start = std::ops::Bound::Excluded(s.start_after.clone());
                let from = if s.start_after.is_empty() || s.start_after < s.prefix {
                    std::ops::Bound::Included(s.prefix.clone())
                } else {
                    start
                };
                let mut matching = self
                    .data
                    .range((from, std::ops::Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(&s.prefix));
                let pairs: Vec<pb::KvPair> = matching
                    .by_ref()
                    .take(limit)
                    .map(|(k, v)| pb::KvPair {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect();
                let truncated = matching.next().is_some();
                pb::KvResult {
                    ok: true,
                    pairs,
                    truncated,
                    ..Default::default()
                }
            }
        };
        Ok(result(out))
    }

    fn applied_index(&self) -> Index {
        self.applied
    }

    fn snapshot(&self) -> SnapshotFiles {
        let pairs = self
            .data
            .iter()
            .map(|(k, v)| pb::KvPair {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        vec![(
            SNAPSHOT_FILE.to_string(),
            KvSnapshot { pairs }.encode_to_vec(),
        )]
    }

    fn restore(
        &mut self,
        index: Index,
        files: &[(String, Vec<u8>)],
    ) -> Result<(), StateMachineError> {
        let snap = KvSnapshot::decode(file(files, SNAPSHOT_FILE)?)
            .map_err(|e| StateMachineError::BadSnapshot(format!("kv file: {e}")))?;
        self.data = snap.pairs.into_iter().map(|p| (p.key, p.value)).collect();
        self.applied = index;
        Ok(())
    }
}

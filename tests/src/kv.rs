//! The simulation's state machine: a map of u64 keys to u64 values with put,
//! get and compare-and-set, and a per-client record of the last call applied
//! so that a retried call is answered from the record instead of applied
//! twice (what the node's retry cache does, but derived from the log and so
//! identical on every replica).

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A write as it travels through the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Put { key: u64, value: u64 },
    Cas { key: u64, expected: u64, new: u64 },
}

impl WriteOp {
    pub fn key(&self) -> u64 {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Cas { key, .. } => *key,
        }
    }
}

/// A write command: who sent it, which call, what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command {
    pub client: u64,
    pub call: u64,
    pub op: WriteOp,
}

impl Command {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(41);
        b.put_u64(self.client);
        b.put_u64(self.call);
        match self.op {
            WriteOp::Put { key, value } => {
                b.put_u8(1);
                b.put_u64(key);
                b.put_u64(value);
                b.put_u64(0);
            }
            WriteOp::Cas { key, expected, new } => {
                b.put_u8(2);
                b.put_u64(key);
                b.put_u64(expected);
                b.put_u64(new);
            }
        }
        b.freeze()
    }

    pub fn decode(mut b: &[u8]) -> Option<Command> {
        if b.len() != 41 {
            return None;
        }
        let client = b.get_u64();
        let call = b.get_u64();
        let tag = b.get_u8();
        let (key, x, y) = (b.get_u64(), b.get_u64(), b.get_u64());
        let op = match tag {
            1 => WriteOp::Put { key, value: x },
            2 => WriteOp::Cas {
                key,
                expected: x,
                new: y,
            },
            _ => return None,
        };
        Some(Command { client, call, op })
    }
}

/// What a write returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteResult {
    Put,
    Cas(bool),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kv {
    pub data: BTreeMap<u64, u64>,
    /// client → (last call applied, its result).
    pub sessions: BTreeMap<u64, (u64, WriteResult)>,
}

impl Kv {
    /// Applies a command; `None` for a stale duplicate of a call older than
    /// the client's latest (its client has already moved on).
    pub fn apply(&mut self, cmd: &Command) -> Option<WriteResult> {
        if let Some((call, result)) = self.sessions.get(&cmd.client) {
            if *call == cmd.call {
                return Some(*result);
            }
            if *call > cmd.call {
                return None;
            }
        }
        let result = match cmd.op {
            WriteOp::Put { key, value } => {
                self.data.insert(key, value);
                WriteResult::Put
            }
            WriteOp::Cas { key, expected, new } => {
                let ok = self.data.get(&key) == Some(&expected);
                if ok {
                    self.data.insert(key, new);
                }
                WriteResult::Cas(ok)
            }
        };
        self.sessions.insert(cmd.client, (cmd.call, result));
        Some(result)
    }

    pub fn get(&self, key: u64) -> Option<u64> {
        self.data.get(&key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_round_trips_and_garbage_is_rejected() {
        let c = Command {
            client: 3,
            call: 9,
            op: WriteOp::Cas {
                key: 1,
                expected: 2,
                new: 3,
            },
        };
        assert_eq!(Command::decode(&c.encode()), Some(c));
        assert_eq!(Command::decode(b"short"), None);
    }

    #[test]
    fn retried_call_is_applied_once() {
        let mut kv = Kv::default();
        let put = Command {
            client: 1,
            call: 1,
            op: WriteOp::Put { key: 7, value: 10 },
        };
        let cas = Command {
            client: 1,
            call: 2,
            op: WriteOp::Cas {
                key: 7,
                expected: 10,
                new: 11,
            },
        };
        assert_eq!(kv.apply(&put), Some(WriteResult::Put));
        assert_eq!(kv.apply(&cas), Some(WriteResult::Cas(true)));
        // The retry of call 2 gets the first answer, not a failed second CAS.
        assert_eq!(kv.apply(&cas), Some(WriteResult::Cas(true)));
        assert_eq!(kv.apply(&put), None);
        assert_eq!(kv.get(7), Some(11));
    }
}

//! The `counter` built-in: one signed 64-bit counter; commands add to it
//! (wrapping), every result and query returns the value.

use bytes::Bytes;
use kuberaft_proto::v1 as pb;
use prost::Message;

use super::{SnapshotFiles, StateMachine, StateMachineError, file, malformed};
use crate::core::Index;

const SNAPSHOT_FILE: &str = "counter";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    value: i64,
    applied: Index,
}

impl Counter {
    pub fn value(&self) -> i64 {
        self.value
    }

    fn result(&self) -> Bytes {
        Bytes::from(pb::CounterResult { value: self.value }.encode_to_vec())
    }
}

impl StateMachine for Counter {
    fn name(&self) -> &'static str {
        "counter"
    }

    fn start_transaction(&self, command: &[u8]) -> Result<(), StateMachineError> {
        pb::CounterCommand::decode(command)
            .map(|_| ())
            .map_err(|e| malformed("counter command", e))
    }

    fn apply(&mut self, index: Index, command: &[u8]) -> Result<Bytes, StateMachineError> {
        self.applied = index;
        let c = pb::CounterCommand::decode(command).map_err(|e| malformed("counter command", e))?;
        self.value = self.value.wrapping_add(c.add);
        Ok(self.result())
    }

    fn query(&self, _query: &[u8]) -> Result<Bytes, StateMachineError> {
        Ok(self.result())
    }

    fn applied_index(&self) -> Index {
        self.applied
    }

    fn snapshot(&self) -> SnapshotFiles {
        vec![(SNAPSHOT_FILE.to_string(), self.value.to_le_bytes().to_vec())]
    }

    fn restore(
        &mut self,
        index: Index,
        files: &[(String, Vec<u8>)],
    ) -> Result<(), StateMachineError> {
        let bytes: [u8; 8] = file(files, SNAPSHOT_FILE)?
            .try_into()
            .map_err(|_| StateMachineError::BadSnapshot("counter file is not 8 bytes".into()))?;
        self.value = i64::from_le_bytes(bytes);
        self.applied = index;
        Ok(())
    }
}

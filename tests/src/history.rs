//! Client histories and their linearizability check.
//!
//! Every operation is recorded with its invocation and response times; the
//! history is split per key (operations on different keys commute) and each
//! part is checked with the Wing–Gong–Lowe checker of `todc-utils` against a
//! sequential specification of one register with compare-and-set.

use std::collections::BTreeMap;

use todc_utils::{Action, History, Specification, WGLChecker};

/// One operation on one key, with its outcome once known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterOp {
    Put(u64),
    /// The value read (`None`: the key was absent).
    Get(Option<u64>),
    Cas {
        expected: u64,
        new: u64,
        ok: bool,
    },
}

/// A register holding an optional u64.
#[derive(Debug)]
pub struct RegisterSpec;

impl Specification for RegisterSpec {
    type State = Option<u64>;
    type Operation = RegisterOp;

    fn init() -> Self::State {
        None
    }

    fn apply(op: &RegisterOp, state: &Option<u64>) -> (bool, Option<u64>) {
        match *op {
            RegisterOp::Put(v) => (true, Some(v)),
            RegisterOp::Get(v) => (v == *state, *state),
            RegisterOp::Cas {
                expected,
                new,
                ok: true,
            } => (*state == Some(expected), Some(new)),
            RegisterOp::Cas {
                expected,
                ok: false,
                ..
            } => (*state != Some(expected), *state),
        }
    }
}

/// A completed operation.
#[derive(Clone, Debug)]
pub struct Operation {
    pub client: usize,
    pub key: u64,
    pub invoked_at: u64,
    pub returned_at: u64,
    pub op: RegisterOp,
}

/// Checks the operations per key; returns the first key whose history is not
/// linearizable, with that history for the report.
pub fn check_linearizable(ops: &[Operation]) -> Result<(), (u64, Vec<Operation>)> {
    let mut by_key: BTreeMap<u64, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key).or_default().push(op);
    }
    for (key, key_ops) in by_key {
        // Calls and responses in time order; at equal times a response goes
        // first (the operations did not overlap).
        let mut actions: Vec<(u64, u8, usize, Action<RegisterOp>)> = Vec::new();
        for (i, op) in key_ops.iter().enumerate() {
            actions.push((op.invoked_at, 1, i, Action::Call(op.op)));
            actions.push((op.returned_at, 0, i, Action::Response(op.op)));
        }
        actions.sort_by_key(|(t, kind, i, _)| (*t, *kind, *i));
        let history = History::from_actions(
            actions
                .into_iter()
                .map(|(_, _, i, a)| (key_ops[i].client, a))
                .collect(),
        );
        if !WGLChecker::<RegisterSpec>::is_linearizable(history) {
            return Err((key, key_ops.into_iter().cloned().collect()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, invoked_at: u64, returned_at: u64, op: RegisterOp) -> Operation {
        Operation {
            client,
            key: 1,
            invoked_at,
            returned_at,
            op,
        }
    }

    #[test]
    fn accepts_concurrent_write_and_read_either_way() {
        let ops = [
            op(0, 0, 10, RegisterOp::Put(1)),
            op(1, 5, 6, RegisterOp::Get(Some(1))),
        ];
        assert!(check_linearizable(&ops).is_ok());
        let ops = [
            op(0, 0, 10, RegisterOp::Put(1)),
            op(1, 5, 6, RegisterOp::Get(None)),
        ];
        assert!(check_linearizable(&ops).is_ok());
    }

    #[test]
    fn rejects_stale_read_after_acknowledged_write() {
        let ops = [
            op(0, 0, 10, RegisterOp::Put(1)),
            op(1, 11, 12, RegisterOp::Get(None)),
        ];
        assert!(check_linearizable(&ops).is_err());
    }

    #[test]
    fn rejects_cas_success_on_wrong_value() {
        let ops = [
            op(0, 0, 1, RegisterOp::Put(1)),
            op(
                1,
                2,
                3,
                RegisterOp::Cas {
                    expected: 2,
                    new: 3,
                    ok: true,
                },
            ),
        ];
        assert!(check_linearizable(&ops).is_err());
    }
}

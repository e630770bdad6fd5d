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
    /// A compare-and-set whose answer never came: it may or may not have
    /// taken effect (recorded with a response at the end of time).
    CasUnknown {
        expected: u64,
        new: u64,
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
            RegisterOp::CasUnknown { expected, new } if *state == Some(expected) => {
                (true, Some(new))
            }
            RegisterOp::CasUnknown { .. } => (true, *state),
        }
    }
}

/// Response time of an operation whose outcome is unknown: it may take
/// effect at any point after its invocation.
pub const NEVER_RETURNED: u64 = u64::MAX;

/// A completed operation (or one whose outcome is unknown, returned at
/// [`NEVER_RETURNED`]).
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
        let lanes = lanes(&key_ops);
        let history = History::from_actions(
            actions
                .into_iter()
                .map(|(_, _, i, a)| (lanes[i], a))
                .collect(),
        );
        if !WGLChecker::<RegisterSpec>::is_linearizable(history) {
            return Err((key, key_ops.into_iter().cloned().collect()));
        }
    }
    Ok(())
}

/// Gives every operation a process ("lane") whose operations never
/// overlap: the checker pairs calls and responses per process in order, so
/// a client that went on after a call whose answer never came (it returns
/// at the end of time) must continue as a new process.
fn lanes(ops: &[&Operation]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|i| (ops[*i].invoked_at, *i));
    // When each lane is free again.
    let mut free_at: Vec<u64> = Vec::new();
    let mut lane = vec![0; ops.len()];
    for i in order {
        let op = ops[i];
        let l = match free_at.iter().position(|t| *t < op.invoked_at) {
            Some(l) => l,
            None => {
                free_at.push(0);
                free_at.len() - 1
            }
        };
        free_at[l] = op.returned_at;
        lane[i] = l;
    }
    lane
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
    fn an_unknown_outcome_may_or_may_not_have_happened_but_only_after_its_call() {
        let unknown_put = op(0, 5, NEVER_RETURNED, RegisterOp::Put(2));
        let unknown_cas = op(
            2,
            5,
            NEVER_RETURNED,
            RegisterOp::CasUnknown {
                expected: 1,
                new: 3,
            },
        );
        let put1 = op(1, 0, 1, RegisterOp::Put(1));
        let seen = |v| op(1, 10, 11, RegisterOp::Get(v));
        for v in [Some(1), Some(2), Some(3)] {
            let ops = [
                put1.clone(),
                unknown_put.clone(),
                unknown_cas.clone(),
                seen(v),
            ];
            assert!(check_linearizable(&ops).is_ok(), "{v:?}");
        }
        // The unknown put cannot be seen before it was called.
        let early = op(1, 2, 3, RegisterOp::Get(Some(2)));
        assert!(check_linearizable(&[put1.clone(), unknown_put, early]).is_err());
        // Nor can a value no operation wrote.
        assert!(check_linearizable(&[put1, unknown_cas, seen(Some(9))]).is_err());
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

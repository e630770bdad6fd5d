//! The built-in state machines: every operation, refusals before logging,
//! determinism, and snapshots.

use bytes::Bytes;
use kuberaft_node::statemachine::{
    Counter, Kv, MAX_KEY_BYTES, StateMachine, StateMachineError, builtin,
};
use kuberaft_proto::v1 as pb;
use prost::Message;

fn cmd(op: pb::kv_command::Op) -> Vec<u8> {
    pb::KvCommand { op: Some(op) }.encode_to_vec()
}

fn put(k: &str, v: &str) -> Vec<u8> {
    cmd(pb::kv_command::Op::Put(pb::KvPut {
        key: k.as_bytes().to_vec().into(),
        value: v.as_bytes().to_vec().into(),
    }))
}

fn cas(k: &str, expected: Option<&str>, v: &str) -> Vec<u8> {
    cmd(pb::kv_command::Op::CompareAndSet(pb::KvCompareAndSet {
        key: k.as_bytes().to_vec().into(),
        expected: expected.unwrap_or("").as_bytes().to_vec().into(),
        expect_absent: expected.is_none(),
        value: v.as_bytes().to_vec().into(),
    }))
}

fn del(k: &str) -> Vec<u8> {
    cmd(pb::kv_command::Op::Delete(pb::KvDelete {
        key: k.as_bytes().to_vec().into(),
    }))
}

fn res(b: Bytes) -> pb::KvResult {
    pb::KvResult::decode(b).unwrap()
}

fn get(sm: &Kv, k: &str) -> Option<String> {
    let q = pb::KvQuery {
        op: Some(pb::kv_query::Op::Get(pb::KvGet {
            key: k.as_bytes().to_vec().into(),
        })),
    };
    res(sm.query(&q.encode_to_vec()).unwrap())
        .value
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

fn scan(sm: &Kv, prefix: &str, limit: u32, after: &str) -> (Vec<String>, bool) {
    let q = pb::KvQuery {
        op: Some(pb::kv_query::Op::Scan(pb::KvScan {
            prefix: prefix.as_bytes().to_vec().into(),
            limit,
            start_after: after.as_bytes().to_vec().into(),
        })),
    };
    let r = res(sm.query(&q.encode_to_vec()).unwrap());
    (
        r.pairs
            .iter()
            .map(|p| String::from_utf8(p.key.to_vec()).unwrap())
            .collect(),
        r.truncated,
    )
}

#[test]
fn kv_put_get_delete_and_compare_and_set() {
    let mut sm = Kv::default();
    assert!(res(sm.apply(1, &put("a", "1")).unwrap()).ok);
    assert_eq!(get(&sm, "a").as_deref(), Some("1"));
    assert_eq!(get(&sm, "missing"), None);
    // CAS that holds, then one that does not (and reports the current value).
    assert!(res(sm.apply(2, &cas("a", Some("1"), "2")).unwrap()).ok);
    let failed = res(sm.apply(3, &cas("a", Some("1"), "3")).unwrap());
    assert!(!failed.ok);
    assert_eq!(failed.value.as_deref(), Some(&b"2"[..]));
    // CAS on an absent key.
    assert!(res(sm.apply(4, &cas("b", None, "new")).unwrap()).ok);
    assert!(!res(sm.apply(5, &cas("b", None, "again")).unwrap()).ok);
    assert!(res(sm.apply(6, &del("a")).unwrap()).ok);
    assert!(
        !res(sm.apply(7, &del("a")).unwrap()).ok,
        "deleting a missing key says so"
    );
    assert_eq!(get(&sm, "a"), None);
    assert_eq!(sm.applied_index(), 7);
}

#[test]
fn kv_prefix_scan_pages_in_order() {
    let mut sm = Kv::default();
    for (i, k) in ["app/1", "app/2", "app/3", "apple", "b/1"]
        .iter()
        .enumerate()
    {
        sm.apply(i as u64 + 1, &put(k, "v")).unwrap();
    }
    assert_eq!(
        scan(&sm, "app/", 0, ""),
        (vec!["app/1".into(), "app/2".into(), "app/3".into()], false)
    );
    assert_eq!(
        scan(&sm, "app", 2, ""),
        (vec!["app/1".into(), "app/2".into()], true)
    );
    assert_eq!(
        scan(&sm, "app", 2, "app/2"),
        (vec!["app/3".into(), "apple".into()], false)
    );
    assert_eq!(scan(&sm, "zzz", 0, ""), (vec![], false));
}

#[test]
fn kv_refuses_bad_commands_before_logging_and_apply_changes_nothing() {
    let sm = Kv::default();
    assert!(matches!(
        sm.start_transaction(b"\xff\xff\xff"),
        Err(StateMachineError::Malformed { .. })
    ));
    let empty = pb::KvCommand { op: None }.encode_to_vec();
    assert!(sm.start_transaction(&empty).is_err());
    assert!(sm.start_transaction(&put("", "v")).is_err(), "empty key");
    let long = "k".repeat(MAX_KEY_BYTES + 1);
    let err = sm.start_transaction(&put(&long, "v")).unwrap_err();
    assert!(err.to_string().contains("over"), "{err}");
    assert!(sm.start_transaction(&put("ok", "v")).is_ok());
    // Applied anyway (e.g. from a newer client), it is an error and a no-op.
    let mut sm = Kv::default();
    assert!(sm.apply(1, b"\xff\xff\xff").is_err());
    assert!(sm.is_empty());
    assert_eq!(sm.applied_index(), 1, "the entry still counts as applied");
}

#[test]
fn kv_is_deterministic_and_snapshots_round_trip() {
    let log: Vec<Vec<u8>> = (0..200)
        .map(|i| match i % 4 {
            0 => put(&format!("k{}", i % 17), &format!("v{i}")),
            1 => cas(
                &format!("k{}", i % 13),
                Some(&format!("v{}", i - 1)),
                &format!("c{i}"),
            ),
            2 => del(&format!("k{}", i % 11)),
            _ => cas(&format!("n{i}"), None, "x"),
        })
        .collect();
    let (mut a, mut b) = (Kv::default(), Kv::default());
    for (i, c) in log.iter().enumerate() {
        assert_eq!(a.apply(i as u64 + 1, c), b.apply(i as u64 + 1, c));
    }
    assert_eq!(a, b);
    let files = a.snapshot();
    let mut restored = Kv::default();
    restored.restore(200, &files).unwrap();
    assert_eq!(restored, a);
    assert!(
        restored
            .restore(1, &[("kv".into(), vec![0xff, 0xff])])
            .is_err()
    );
    assert!(matches!(
        restored.restore(1, &[]),
        Err(StateMachineError::BadSnapshot(_))
    ));
}

#[test]
fn counter_adds_wraps_and_snapshots() {
    let add = |n: i64| pb::CounterCommand { add: n }.encode_to_vec();
    let mut c = Counter::default();
    c.apply(1, &add(5)).unwrap();
    let r = pb::CounterResult::decode(c.apply(2, &add(-7)).unwrap()).unwrap();
    assert_eq!(r.value, -2);
    c.apply(3, &add(i64::MAX)).unwrap();
    assert_eq!(c.value(), i64::MAX - 2);
    let mut d = Counter::default();
    d.restore(3, &c.snapshot()).unwrap();
    assert_eq!(d, c);
    assert!(c.start_transaction(b"\xff").is_err());
}

#[test]
fn builtins_by_name() {
    assert_eq!(builtin("kv").unwrap().name(), "kv");
    assert_eq!(builtin("").unwrap().name(), "kv", "kv is the default");
    assert_eq!(builtin("counter").unwrap().name(), "counter");
    let err = builtin("redis").unwrap_err();
    assert!(err.to_string().contains("\"kv\" and \"counter\""), "{err}");
}

//! Multi-process tests: real `kuberaft-node` processes on loopback, driven
//! through the client library, the `kuberaft` CLI and the admin API.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use harness::{Cluster, admin, gid, poll};
use kuberaft_proto::v1 as pb;
use prost::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_library_write_read_and_report() {
    let c = Cluster::start(3, &[]).await;
    c.create_group("default", "kv", &c.all()).await;
    let leader = c.leader("default", &c.all()).await;

    let all = c.all();
    let (ok, out, err) = c.cli(&all, &["put", "greeting", "hello"]);
    assert!(ok, "put failed: {err}");
    assert!(out.starts_with("OK"), "{out}");
    let (ok, out, _) = c.cli(&all, &["get", "greeting"]);
    assert!(ok);
    assert_eq!(out.trim(), "hello");

    // The library sees the CLI's write, and the CLI the library's.
    let cl = c.client("default", &[2, 1, 0]);
    assert_eq!(
        cl.get(b"greeting").await.unwrap(),
        Some(Bytes::from("hello"))
    );
    cl.put(b"k/1", b"one").await.unwrap();
    cl.put(b"k/2", b"two").await.unwrap();
    let (ok, out, _) = c.cli(&all, &["scan", "k/"]);
    assert!(ok);
    assert_eq!(out, "k/1\tone\nk/2\ttwo\n");

    let (ok, _, _) = c.cli(&all, &["cas", "k/1", "one", "uno"]);
    assert!(ok);
    let (ok, _, err) = c.cli(&all, &["cas", "k/1", "one", "eins"]);
    assert!(!ok, "a failed compare exits non-zero");
    assert!(
        err.contains("compare failed") && err.contains("uno"),
        "{err}"
    );
    let (ok, out, _) = c.cli(&all, &["delete", "k/2"]);
    assert!(ok && out.contains("deleted"));
    let (ok, _, err) = c.cli(&all, &["get", "k/2"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("not found"), "{err}");

    // Unknown group: one clear line, non-zero exit.
    let (ok, _, err) = c.cli(&all, &["--group", "nope", "--timeout", "2s", "get", "x"]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");

    // group info --json names every member and the leader.
    let (ok, out, err) = c.cli(&all, &["group", "info", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    let leaders: Vec<_> = arr.iter().filter(|m| m["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1);
    assert_eq!(leaders[0]["member_id"], c.members[leader].id);
    assert_eq!(arr[0]["peers"].as_array().unwrap().len(), 3);

    // Watch: an applied index reaches every level.
    let (ok, out, err) = c.cli(&all, &["watch", "2", "--level", "all-committed"]);
    assert!(ok, "{err}");
    assert!(out.contains("reached"));

    // HTTP endpoints.
    assert_eq!(c.http_get(0, "/livez").0, 200);
    let ready = poll("readyz", || async {
        (c.http_get(1, "/readyz").0 == 200).then_some(())
    });
    ready.await;
    let (code, metrics) = c.http_get(leader, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "kuberaft_term",
        "kuberaft_commit_index",
        "kuberaft_log_fsync_seconds_bucket",
        "kuberaft_role",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    let (code, status) = c.http_get(2, "/status");
    assert_eq!(code, 200);
    let s: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(s["member_id"], c.members[2].id);
    assert_eq!(s["groups"][0]["group"], "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_writes_go_on_and_the_restarted_member_catches_up() {
    let mut c = Cluster::start(3, &[]).await;
    c.create_group("default", "kv", &c.all()).await;
    let leader = c.leader("default", &c.all()).await;
    let cl = c.client("default", &c.all());
    for i in 0..30 {
        cl.put(format!("a{i}").as_bytes(), b"1").await.unwrap();
    }
    c.kill(leader);
    let rest: Vec<usize> = c.all().into_iter().filter(|i| *i != leader).collect();
    for i in 0..30 {
        cl.put(format!("b{i}").as_bytes(), b"2").await.unwrap();
    }
    let new_leader = c.leader("default", &rest).await;
    assert_ne!(new_leader, leader);
    c.restart(leader).await;
    c.caught_up(leader, "default", new_leader).await;
    // Every acknowledged write is there, read through the restarted member
    // (a follower read confirmed by the leader).
    let via_old = c.client("default", &[leader]);
    for i in 0..30 {
        assert_eq!(
            via_old.get(format!("a{i}").as_bytes()).await.unwrap(),
            Some(Bytes::from("1"))
        );
        assert_eq!(
            via_old.get(format!("b{i}").as_bytes()).await.unwrap(),
            Some(Bytes::from("2"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_a_purged_log_catches_up_from_a_snapshot() {
    // Small segments, nothing kept behind a snapshot: the lagger's entries
    // are really gone from the leader's log, only the snapshot can help.
    let mut c = Cluster::start(
        3,
        &[
            "--snapshot-threshold=40",
            "--purge-keep-entries=0",
            "--segment-size-max-bytes=4096",
        ],
    )
    .await;
    c.create_group("default", "kv", &c.all()).await;
    let leader = c.leader("default", &c.all()).await;
    let lagger = (leader + 1) % 3;
    c.kill(lagger);
    let cl = c.client("default", &c.all());
    for i in 0..200 {
        cl.put(format!("k{i:03}").as_bytes(), format!("v{i}").as_bytes())
            .await
            .unwrap();
    }
    let l = c.info(leader, "default").await.unwrap();
    assert!(
        l.snapshot_index >= 160,
        "the leader snapshotted: {}",
        l.snapshot_index
    );
    c.restart(lagger).await;
    c.caught_up(lagger, "default", leader).await;
    let (_, status) = c.http_get(lagger, "/status");
    let s: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(
        s["groups"][0]["snapshots_installed"].as_u64().unwrap() >= 1,
        "caught up through installSnapshot: {status}"
    );
    // Its state machine holds everything, read locally at the leader's index.
    let local = c.client("default", &[lagger]);
    let r = local
        .stale_read(
            Bytes::from(
                pb::KvQuery {
                    op: Some(pb::kv_query::Op::Scan(pb::KvScan {
                        prefix: Bytes::from_static(b"k"),
                        ..Default::default()
                    })),
                }
                .encode_to_vec(),
            ),
            l.commit_index,
        )
        .await
        .unwrap();
    let res = pb::KvResult::decode(r.payload).unwrap();
    assert_eq!(res.pairs.len(), 200);
    // And it survives its own restart from the installed snapshot.
    c.kill(lagger);
    c.restart(lagger).await;
    c.caught_up(lagger, "default", leader).await;
}

/// Large values trigger a snapshot by bytes long before the entry count:
/// the entries since the last snapshot are held in memory, so memory stays
/// bounded by the byte threshold whatever the value size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_trigger_snapshots_by_bytes() {
    let c = Cluster::start(
        3,
        &[
            "--snapshot-threshold=100000",
            "--snapshot-threshold-bytes=1048576",
        ],
    )
    .await;
    c.create_group("default", "kv", &c.all()).await;
    let leader = c.leader("default", &c.all()).await;
    let cl = c.client("default", &c.all());
    let value = vec![b'x'; 64 << 10];
    for i in 0..40 {
        cl.put(format!("big{i}").as_bytes(), &value).await.unwrap();
    }
    poll("a snapshot by bytes on every member", || async {
        let mut all = true;
        for i in c.all() {
            all &= c.info(i, "default").await?.snapshot_index > 0;
        }
        all.then_some(())
    })
    .await;
    let l = c.info(leader, "default").await.unwrap();
    assert!(
        l.commit_index - l.snapshot_index < 30,
        "2.5 MiB written, a snapshot at least every 1 MiB: {} committed, snapshot at {}",
        l.commit_index,
        l.snapshot_index
    );
}

/// A member down while the leader wrote thousands of entries and snapshotted
/// several times (a rolling upgrade's restart) catches up by entries read
/// back from the leader's log, not by a full state transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_the_snapshot_catches_up_by_entries_from_storage() {
    const KEYS: usize = 5000;
    let mut c = Cluster::start(
        3,
        &["--snapshot-threshold=300", "--purge-keep-entries=10000"],
    )
    .await;
    c.create_group("default", "kv", &c.all()).await;
    let leader = c.leader("default", &c.all()).await;
    let lagger = (leader + 1) % 3;
    c.kill(lagger);
    let cl = c.client("default", &c.all());
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let cl = cl.clone();
            tokio::spawn(async move {
                for i in (w..KEYS).step_by(8) {
                    cl.put(format!("k{i:05}").as_bytes(), b"v").await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let l = c.info(leader, "default").await.unwrap();
    assert!(
        l.snapshot_index >= 4_000,
        "the leader snapshotted past what the lagger has: {}",
        l.snapshot_index
    );
    let started = std::time::Instant::now();
    c.restart(lagger).await;
    c.caught_up(lagger, "default", leader).await;
    let took = started.elapsed();
    let s = c.group_status(lagger, "default").unwrap();
    assert_eq!(
        s["snapshots_installed"].as_u64(),
        Some(0),
        "caught up without a snapshot: {s}"
    );
    // Its state machine holds every key, read locally page by page at the
    // leader's index.
    let local = c.client("default", &[lagger]);
    let (mut seen, mut after) = (0, Bytes::new());
    loop {
        let query = pb::KvQuery {
            op: Some(pb::kv_query::Op::Scan(pb::KvScan {
                prefix: Bytes::from_static(b"k"),
                start_after: after.clone(),
                ..Default::default()
            })),
        };
        let r = local
            .stale_read(Bytes::from(query.encode_to_vec()), l.commit_index)
            .await
            .unwrap();
        let pairs = pb::KvResult::decode(r.payload).unwrap().pairs;
        let Some(last) = pairs.last() else { break };
        after = last.key.clone();
        seen += pairs.len();
    }
    assert_eq!(seen, KEYS);
    println!(
        "{} entries behind, caught up by entries in {took:?}",
        l.commit_index
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_under_load() {
    let mut c = Cluster::start(3, &[]).await;
    c.create_group("default", "kv", &[0, 1, 2]).await;
    let leader = c.leader("default", &[0, 1, 2]).await;
    let newcomer = c.add_member().await;

    let stop = Arc::new(AtomicBool::new(false));
    let cl = c.client("default", &[0, 1, 2, newcomer]);
    let load = {
        let (cl, stop) = (cl.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load{i}");
                cl.put(key.as_bytes(), b"x")
                    .await
                    .expect("writes go on during changes");
                acked.push(key);
                i += 1;
            }
            acked
        })
    };
    let addr = c.members[newcomer].addr.clone();
    let (ok, out, err) = c.cli(&[0, 1, 2], &["peer", "add", "--address", &addr]);
    assert!(ok, "peer add: {err}");
    assert!(out.contains("added"), "{out}");
    let removed = (leader + 1) % 3;
    let rid = c.members[removed].id.to_string();
    let (ok, _, err) = c.cli(&[0, 1, 2], &["peer", "remove", "--id", &rid]);
    assert!(ok, "peer remove: {err}");
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert!(!acked.is_empty());

    let members: Vec<usize> = [0, 1, 2, newcomer]
        .into_iter()
        .filter(|i| *i != removed)
        .collect();
    let leader = c.leader("default", &members).await;
    let info = c.info(leader, "default").await.unwrap();
    let ids: Vec<u64> = info
        .configuration
        .unwrap()
        .peers
        .iter()
        .map(|p| p.id)
        .collect();
    assert!(ids.contains(&c.members[newcomer].id));
    assert!(!ids.contains(&c.members[removed].id));
    assert_eq!(ids.len(), 3);
    // The removed member itself learns the final configuration (it was
    // replicated to until it held it), stops campaigning and says so.
    let rid = c.members[removed].id;
    poll(
        "the removed member to hold the final configuration",
        || async {
            let (_, status) = c.http_get(removed, "/status");
            let info = c.info(removed, "default").await?;
            let conf = info.configuration?;
            let out = conf.old_peers.is_empty() && conf.peers.iter().all(|p| p.id != rid);
            (out && status.contains("\"removed\":true")).then_some(())
        },
    )
    .await;
    c.caught_up(newcomer, "default", leader).await;
    let check = c.client("default", &members);
    for key in &acked {
        assert_eq!(
            check.get(key.as_bytes()).await.unwrap(),
            Some(Bytes::from("x")),
            "{key} lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_pause_and_sigterm_hand_over_leadership() {
    let mut c = Cluster::start(3, &[]).await;
    c.create_group("default", "kv", &c.all()).await;
    let leader = c.leader("default", &c.all()).await;
    let target = (leader + 1) % 3;
    let tid = c.members[target].id.to_string();
    let (ok, out, err) = c.cli(&c.all(), &["election", "transfer", "--to", &tid]);
    assert!(ok, "transfer: {err}");
    assert!(out.contains("leads"));
    assert_eq!(c.leader("default", &c.all()).await, target);

    // Pause elections on one follower; when the leader dies only the other
    // follower may campaign.
    let paused = (target + 1) % 3;
    let other = (target + 2) % 3;
    let pid = c.members[paused].id.to_string();
    let (ok, _, err) = c.cli(&c.all(), &["election", "pause", "--member", &pid]);
    assert!(ok, "pause: {err}");
    assert!(c.info(paused, "default").await.unwrap().elections_paused);
    c.kill(target);
    assert_eq!(c.leader("default", &[paused, other]).await, other);
    let (ok, _, _) = c.cli(&[paused, other], &["election", "resume", "--member", &pid]);
    assert!(ok);
    c.restart(target).await;

    // SIGTERM on the leader: it hands over, then exits cleanly.
    let leader = c.leader("default", &c.all()).await;
    let cl = c.client("default", &c.all());
    cl.put(b"before", b"1").await.unwrap();
    assert!(c.terminate(leader), "the node stops cleanly on SIGTERM");
    let rest: Vec<usize> = c.all().into_iter().filter(|i| *i != leader).collect();
    let next = c.leader("default", &rest).await;
    assert_ne!(next, leader);
    assert_eq!(cl.get(b"before").await.unwrap(), Some(Bytes::from("1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_groups_in_one_process() {
    let c = Cluster::start(1, &[]).await;
    for g in 0..100 {
        c.create_group(&format!("g{g}"), "kv", &[0]).await;
    }
    for g in 0..100 {
        let name = format!("g{g}");
        c.leader(&name, &[0]).await;
        let cl = c.client(&name, &[0]);
        cl.put(b"k", name.as_bytes()).await.unwrap();
    }
    for g in (0..100).step_by(7) {
        let name = format!("g{g}");
        let cl = c.client(&name, &[0]);
        assert_eq!(cl.get(b"k").await.unwrap(), Some(Bytes::from(name)));
    }
    let list = admin(&c.members[0].addr)
        .await
        .group_list(pb::GroupListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.group_ids.len(), 100);
    // Removing one keeps the others; the set survives a restart.
    let r = admin(&c.members[0].addr)
        .await
        .group_management(pb::GroupManagementRequest {
            op: Some(pb::group_management_request::Op::Remove(pb::GroupRemove {
                group_id: gid("g5"),
                delete_data: false,
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{}", r.error);
    let mut c = c;
    c.kill(0);
    c.restart(0).await;
    let list = admin(&c.members[0].addr)
        .await
        .group_list(pb::GroupListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.group_ids.len(), 99);
    c.leader("g99", &[0]).await;
    let cl = c.client("g99", &[0]);
    assert_eq!(cl.get(b"k").await.unwrap(), Some(Bytes::from("g99")));
}

fn add(n: i64) -> Bytes {
    Bytes::from(pb::CounterCommand { add: n }.encode_to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_writes_are_applied_once_across_leader_changes_and_restarts() {
    let mut c = Cluster::start(3, &[]).await;
    c.create_group("ctr", "counter", &c.all()).await;
    let leader = c.leader("ctr", &c.all()).await;
    let cl = c.client("ctr", &c.all());
    let first = cl.write_call(7, add(5)).await.unwrap();
    let again = cl.write_call(7, add(5)).await.unwrap();
    assert_eq!(
        first.index, again.index,
        "the retry got the first call's answer"
    );
    assert_eq!(first.payload, again.payload);
    cl.write_call(8, add(1)).await.unwrap();
    assert_eq!(cl.counter_get().await.unwrap(), 6);

    // A new leader knows the call from the log.
    c.kill(leader);
    let retry = cl.write_call(7, add(5)).await.unwrap();
    assert_eq!(retry.index, first.index);
    c.restart(leader).await;

    // So does every member after a full restart (the log is replayed), and
    // so does a new client process that retries under the old client id.
    for i in c.all() {
        c.kill(i);
    }
    for i in c.all() {
        c.restart(i).await;
    }
    c.leader("ctr", &c.all()).await;
    let reborn = c
        .client("ctr", &c.all())
        .with_client_id(cl.client_id().clone())
        .unwrap();
    let retry = reborn.write_call(7, add(5)).await.unwrap();
    assert_eq!(retry.index, first.index);
    assert_eq!(
        reborn.counter_get().await.unwrap(),
        6,
        "applied exactly once"
    );

    // A state machine refusal is an error, not a retry loop.
    let err = cl.write(Bytes::from_static(b"\xff\xff")).await.unwrap_err();
    assert!(err.to_string().contains("malformed"), "{err}");
}

/// The leader's `retry_cache_entries` gauge of `group`.
fn retry_cache_entries(c: &Cluster, leader: usize, group: &str) -> u64 {
    let (code, body) = c.http_get(leader, "/metrics");
    assert_eq!(code, 200);
    let series = format!("kuberaft_retry_cache_entries{{group=\"{group}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"))
        .trim()
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_client_costs_the_retry_cache_only_its_calls_in_flight() {
    let c = Cluster::start(3, &[]).await;
    c.create_group("w", "counter", &c.all()).await;
    let leader = c.leader("w", &c.all()).await;
    let cl = c.client("w", &c.all());
    // 8 writers, 400 writes: the client's watermark follows them.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let cl = cl.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    cl.write(add(1)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(cl.counter_get().await.unwrap(), 400);
    let held = poll("the leader's published view", || async {
        let n = retry_cache_entries(&c, leader, "w");
        (n > 0).then_some(n)
    })
    .await;
    assert!(held <= 32, "{held} replies held for 8 calls in flight");

    // A late copy of an answered call is refused, not applied again.
    let err = cl.write_call(5, add(100)).await.unwrap_err();
    assert!(err.to_string().contains("answered before"), "{err}");
    assert_eq!(cl.counter_get().await.unwrap(), 400);

    // A watermark covers only ids the client handed out itself: the replies
    // of caller-numbered calls stay for the whole retry window.
    let other = c.client("w", &c.all());
    for call in 0..100 {
        other.write_call(1_000 + call, add(1)).await.unwrap();
    }
    let held = poll("the view with 100 more replies", || async {
        let n = retry_cache_entries(&c, leader, "w");
        (n >= 100).then_some(n)
    })
    .await;
    assert!(held <= 100 + 32, "{held}");
    let retry = other.write_call(1_000, add(1)).await.unwrap();
    assert_eq!(
        cl.counter_get().await.unwrap(),
        500,
        "the retry was not applied"
    );
    assert!(retry.index > 0);
}

/// Pids of processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(needle)
        {
            out.push(pid);
        }
    }
    out
}

/// A base port P with P..P+2 and P+100..P+102 free.
fn free_block() -> u16 {
    loop {
        let p = 20_000 + (rand::random::<u16>() % 20_000);
        let free = (0..3)
            .flat_map(|i| [p + i, p + 100 + i])
            .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        if free {
            return p;
        }
    }
}

/// Runs `kuberaft local up` until its banner appears. Drop kills it and
/// every member it started: a killed `local up` cannot stop its children.
struct LocalUp {
    child: std::process::Child,
    dir: String,
    /// Every line it printed so far, stdout and stderr.
    output: Arc<std::sync::Mutex<String>>,
}

impl LocalUp {
    fn start(dir: &std::path::Path, base: u16) -> LocalUp {
        use std::io::{BufRead, BufReader, Read};
        let mut child = std::process::Command::new(harness::CLI)
            .args([
                "local",
                "up",
                "--nodes",
                "3",
                "--base-port",
                &base.to_string(),
                "--dir",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(std::sync::Mutex::new(String::new()));
        // Both pipes are drained for the whole run, so the child never
        // blocks on a full one.
        let drain = |pipe: Box<dyn Read + Send>| {
            let output = output.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut o = output.lock().unwrap();
                    o.push_str(&l);
                    o.push('\n');
                }
            });
        };
        drain(Box::new(child.stdout.take().unwrap()));
        drain(Box::new(child.stderr.take().unwrap()));
        let mut up = LocalUp {
            child,
            dir: dir.display().to_string(),
            output,
        };
        let deadline = std::time::Instant::now() + harness::WAIT;
        while !up.output().contains("Talk to it") {
            let exited = up.child.try_wait().unwrap();
            assert!(
                exited.is_none() && std::time::Instant::now() < deadline,
                "local up printed no banner (exit: {exited:?}):\n{}",
                up.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        up
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    fn interrupt(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        self.child.wait().unwrap().success()
    }
}

impl Drop for LocalUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids_with(&self.dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_runs_survives_a_dead_member_and_restarts_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_block();
    let peers = format!(
        "127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
        base,
        base + 1,
        base + 2
    );
    let cli = |args: &[&str]| {
        std::process::Command::new(harness::CLI)
            .args(["--peers", &peers])
            .args(args)
            .output()
            .unwrap()
    };
    let mut up = LocalUp::start(dir.path(), base);
    assert!(cli(&["put", "k", "v1"]).status.success());
    // One member dies: local up keeps the others, and they keep serving.
    let node1 = format!("{}", dir.path().join("node-1").display());
    for pid in pids_with(&node1) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let out = cli(&["put", "k", "v2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(up.interrupt(), "Ctrl-C stops local up cleanly");
    let node_dir = format!("{}", dir.path().join("node-").display());
    assert!(
        pids_with(&node_dir).is_empty(),
        "no member outlives local up"
    );

    // Again on the same directory: the same cluster, with its data.
    let mut again = LocalUp::start(dir.path(), base);
    let out = cli(&["get", "k"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v2");
    assert!(again.interrupt());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_stall_makes_the_leader_step_down() {
    let c = Cluster::start(1, &["--stall-threshold-ms=300"]).await;
    c.create_group("default", "kv", &[0]).await;
    c.leader("default", &[0]).await;
    let before = c.http_get(0, "/status").1;
    let changes = |s: &str| {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["groups"][0]["leader_changes"].as_u64().unwrap()
    };
    let n0 = changes(&before);
    let pid = nix::unistd::Pid::from_raw(pids_with(&c.members[0].addr)[0]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Longer than a quiet group's stride (1 s) plus the threshold: the task
    // of a quiet group only notices a stall that outlasts its own sleep.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    poll("the stall to be noticed", || async {
        let log = std::fs::read_to_string(c.log_path(0)).unwrap_or_default();
        log.contains("runtime stalled").then_some(())
    })
    .await;
    // It stepped down (a leader change) and, alone, was elected again.
    poll("a step-down and re-election", || async {
        (changes(&c.http_get(0, "/status").1) >= n0 + 2).then_some(())
    })
    .await;
    c.leader("default", &[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    use kuberaft_proto::v1::raft_client_protocol_service_client::RaftClientProtocolServiceClient;
    use kuberaft_proto::v1::raft_server_protocol_service_client::RaftServerProtocolServiceClient;
    let c = Cluster::start(1, &[]).await;
    c.create_group("default", "kv", &[0]).await;
    c.settled(0, "default").await;
    let before = c.info(0, "default").await.unwrap();
    let addr = c.members[0].addr.clone();
    let ch = kuberaft_node::rpc::peer::channel(&addr).unwrap();
    let mut peer = RaftServerProtocolServiceClient::new(ch.clone());

    // Unknown group.
    let e = peer
        .request_vote(pb::RequestVoteRequest {
            group_id: gid("nope"),
            voter_id: c.members[0].id,
            candidate_id: 424242,
            term: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("does not exist"), "{}", e.message());
    // Addressed to another member.
    let e = peer
        .request_vote(pb::RequestVoteRequest {
            group_id: gid("default"),
            voter_id: 12345,
            term: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("stale"), "{}", e.message());
    // Pings: from no member, or from this member itself, are refused; a
    // real peer's gets this node's incarnation.
    for from in [0, c.members[0].id] {
        let e = peer
            .ping(pb::PingRequest {
                from,
                incarnation: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    }
    let pong = peer
        .ping(pb::PingRequest {
            from: 777,
            incarnation: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pong.server_id, c.members[0].id);
    assert_ne!(pong.incarnation, 0);
    // A snapshot stream that lies about its files.
    let bad = pb::InstallSnapshotRequest {
        group_id: gid("default"),
        leader_id: 424242,
        follower_id: c.members[0].id,
        leader_term: 1,
        last_included: Some(pb::TermIndex { term: 1, index: 5 }),
        files: vec![pb::SnapshotFile {
            name: "kv".into(),
            size: 3,
            crc32c: 0,
        }],
        done: false,
        ..Default::default()
    };
    let chunk = pb::InstallSnapshotRequest {
        chunk: Some(pb::SnapshotChunk {
            file_name: "kv".into(),
            offset: 0,
            data: Bytes::from_static(b"abc"),
            done: true,
        }),
        done: true,
        ..Default::default()
    };
    let e = peer
        .install_snapshot(tokio_stream::iter(vec![bad, chunk]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss, "{}", e.message());

    // Admin: invalid configurations are refused with the reason.
    let mut a = admin(&addr).await;
    let dup = pb::Peer {
        id: 7,
        address: "127.0.0.1:1".into(),
        ..Default::default()
    };
    let r = a
        .set_configuration(pb::SetConfigurationRequest {
            group_id: gid("default"),
            mode: pb::SetConfigurationMode::SetUnconditionally as i32,
            peers: vec![dup.clone(), dup],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.success);
    assert!(r.error.contains("more than once"), "{}", r.error);
    let r = a
        .set_configuration(pb::SetConfigurationRequest {
            group_id: gid("default"),
            mode: pb::SetConfigurationMode::SetUnconditionally as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.error.contains("at least one voter"), "{}", r.error);
    let e = a
        .set_configuration(pb::SetConfigurationRequest {
            group_id: gid("default"),
            peers: vec![pb::Peer {
                id: 0,
                address: "x:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let r = a
        .group_management(pb::GroupManagementRequest {
            op: Some(pb::group_management_request::Op::Add(pb::GroupAdd {
                group_id: gid(&"x".repeat(65)),
                ..Default::default()
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.error.contains("64 bytes"), "{}", r.error);

    // Client: oversized and kindless requests.
    let mut client = RaftClientProtocolServiceClient::new(ch);
    let huge = pb::ClientRequest {
        group_id: gid("default"),
        kind: Some(pb::client_request::Kind::Write(pb::WriteRequest {
            payload: Bytes::from(vec![0u8; 17 << 20]),
        })),
        ..Default::default()
    };
    let res = client.unordered(tokio_stream::iter(vec![huge])).await;
    let failed = match res {
        Err(_) => true,
        Ok(r) => r.into_inner().message().await.is_err(),
    };
    assert!(failed, "a request over the message limit is refused");
    let none = pb::ClientRequest {
        group_id: gid("default"),
        ..Default::default()
    };
    let mut replies = client
        .unordered(tokio_stream::iter(vec![none]))
        .await
        .unwrap()
        .into_inner();
    let r = replies.message().await.unwrap().unwrap();
    assert!(!r.success);
    assert!(format!("{:?}", r.exception).contains("no kind"));

    // Nothing of this reached the log.
    let info = c.info(0, "default").await.unwrap();
    assert_eq!(
        info.last_index, before.last_index,
        "no bad request changed the log"
    );
    let cl = c.client("default", &[0]);
    cl.put(b"still", b"works").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_stream_applies_pipelined_writes_in_order_and_admin_commands_work() {
    use kuberaft_proto::v1::raft_client_protocol_service_client::RaftClientProtocolServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("node.conf");
    // The config file sets the snapshot threshold.
    std::fs::write(&conf, "# test\nsnapshot-threshold = 50\n").unwrap();
    let c = Cluster::start(3, &["--config", conf.to_str().unwrap()]).await;
    c.create_group("ctr", "counter", &c.all()).await;
    let leader = c.leader("ctr", &c.all()).await;

    // A new leader answers LeaderNotReady until it applied an entry of its
    // term; the library retries that, the raw stream below does not.
    c.client("ctr", &[leader]).write(add(0)).await.unwrap();

    // 200 pipelined counter additions on one ordered stream: each reply
    // carries the running total, so order is visible.
    let ch = kuberaft_node::rpc::peer::channel(&c.members[leader].addr).unwrap();
    let mut client = RaftClientProtocolServiceClient::new(ch);
    let reqs: Vec<pb::ClientRequest> = (1..=200u64)
        .map(|i| pb::ClientRequest {
            group_id: gid("ctr"),
            client_id: Bytes::from_static(b"ordered-client"),
            call_id: i,
            sequence_number: i,
            kind: Some(pb::client_request::Kind::Write(pb::WriteRequest {
                payload: add(i as i64),
            })),
            ..Default::default()
        })
        .collect();
    let mut replies = client
        .ordered(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut total = 0i64;
    let mut last_index = 0;
    for i in 1..=200u64 {
        let r = replies
            .message()
            .await
            .unwrap()
            .expect("a reply per request");
        assert!(r.success, "{:?}", r.exception);
        assert_eq!(r.sequence_number, i, "replies in request order");
        total += i as i64;
        let v = pb::CounterResult::decode(r.payload).unwrap().value;
        assert_eq!(v, total, "request {i} applied after every earlier one");
        assert!(r.log_index > last_index);
        last_index = r.log_index;
    }

    // The config file's threshold is in force: automatic snapshots.
    let follower = (leader + 2) % 3;
    c.caught_up(follower, "ctr", leader).await;
    // The view is published before the snapshot is written (so commit
    // progress is visible meanwhile): wait for the snapshot to show.
    poll("the follower's automatic snapshot", || async {
        let info = c.info(follower, "ctr").await?;
        (info.snapshot_index >= 150).then_some(())
    })
    .await;

    // Admin commands through the CLI.
    let all = c.all();
    let (ok, out, err) = c.cli(
        &all,
        &[
            "--group",
            "ctr",
            "snapshot",
            "create",
            "--member",
            &c.members[leader].id.to_string(),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("snapshot at index"), "{out}");
    assert!(c.info(leader, "ctr").await.unwrap().snapshot_index >= 200);
    let other = (leader + 1) % 3;
    let assignment = format!("{}=5", c.members[other].id);
    let (ok, _, err) = c.cli(
        &all,
        &["--group", "ctr", "peer", "set-priority", &assignment],
    );
    assert!(ok, "{err}");
    // A caught-up voter of higher priority is handed leadership (after the
    // command returns: the hand-over follows the committed configuration).
    c.becomes_leader(other, "ctr").await;
    assert_eq!(c.leader("ctr", &all).await, other);
    let info = c.info(other, "ctr").await.unwrap();
    let p = info
        .configuration
        .unwrap()
        .peers
        .into_iter()
        .find(|p| p.id == c.members[other].id)
        .unwrap();
    assert_eq!(p.priority, 5);
    let (ok, out, _) = c.cli(&all, &["--group", "ctr", "group", "list"]);
    assert!(
        ok && out.lines().count() == 3 && out.contains("ctr"),
        "{out}"
    );

    let (ok, out, err) = c.cli(
        &all,
        &[
            "--group",
            "ctr",
            "bench",
            "--clients",
            "4",
            "--duration",
            "1s",
            "--json",
            "--keys",
            "10",
        ],
    );
    // The bench writes kv commands: the counter group refuses them, which
    // bench reports as a failure with the reason.
    assert!(
        !ok && err.contains("the cluster does not take writes"),
        "{out} {err}"
    );
    c.create_group("default", "kv", &all).await;
    c.leader("default", &all).await;
    let (ok, out, err) = c.cli(
        &all,
        &["bench", "--clients", "4", "--duration", "1s", "--json"],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["ops_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(v["errors"], 0);
    assert!(v["p99_us"].as_u64().unwrap() >= v["p50_us"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_priorities_step_down_and_watch_levels() {
    use prost::Message;
    let mut c = Cluster::start(3, &[]).await;
    let voters = [0, 1, 2];
    c.create_group("default", "kv", &voters).await;
    let first = c.leader("default", &voters).await;

    // `election step-down` hands leadership to another voter.
    let (ok, out, err) = c.cli(&voters, &["election", "step-down"]);
    assert!(ok, "step-down: {err}");
    assert!(out.contains("stepped down"), "{out}");
    let second = c.leader("default", &voters).await;
    assert_ne!(
        second, first,
        "a stepped-down leader does not lead again at once"
    );

    // `peer add --listener`: the member gets the log but is no voter.
    let listener = c.add_member().await;
    let addr = c.members[listener].addr.clone();
    let (ok, out, err) = c.cli(&voters, &["peer", "add", "--address", &addr, "--listener"]);
    assert!(ok, "peer add --listener: {err}");
    assert!(out.contains("added"), "{out}");
    let cl = c.client("default", &voters);
    let index = cl.put(b"seen-by-listener", b"yes").await.unwrap();
    c.caught_up(listener, "default", second).await;
    let info = c.info(listener, "default").await.unwrap();
    assert_eq!(info.role(), pb::RaftRole::Listener);
    let conf = c
        .info(second, "default")
        .await
        .unwrap()
        .configuration
        .unwrap();
    let lid = c.members[listener].id;
    let as_listener = conf
        .peers
        .iter()
        .find(|p| p.id == lid)
        .expect("listener in conf");
    assert_eq!(as_listener.role(), pb::PeerRole::Listener);
    assert_eq!(
        conf.peers
            .iter()
            .filter(|p| p.role() == pb::PeerRole::Voter)
            .count(),
        3
    );
    let query = pb::KvQuery {
        op: Some(pb::kv_query::Op::Get(pb::KvGet {
            key: Bytes::from_static(b"seen-by-listener"),
        })),
    }
    .encode_to_vec();
    let local = c.client("default", &[listener]);
    let r = local.stale_read(Bytes::from(query), index).await.unwrap();
    let v = pb::KvResult::decode(r.payload).unwrap().value;
    assert_eq!(
        v,
        Some(Bytes::from("yes")),
        "the listener applied the write"
    );

    // Watch levels: with every member up, ALL is reached; with the
    // listener down, MAJORITY is reached but ALL and ALL_COMMITTED are not.
    let idx = index.to_string();
    for level in ["majority", "all", "majority-committed", "all-committed"] {
        let (ok, out, err) = c.cli(&voters, &["watch", &idx, "--level", level]);
        assert!(ok, "watch {level}: {err}");
        assert!(out.contains("reached"), "{out}");
    }
    c.kill(listener);
    let index = cl.put(b"after-listener", b"1").await.unwrap().to_string();
    for level in ["majority", "majority-committed"] {
        let (ok, _, err) = c.cli(&voters, &["watch", &index, "--level", level]);
        assert!(ok, "watch {level} with one listener down: {err}");
    }
    for level in ["all", "all-committed"] {
        let (ok, out, err) = c.cli(
            &voters,
            &["--timeout", "2s", "watch", &index, "--level", level],
        );
        assert!(
            !ok,
            "watch {level} cannot be reached with a member down: {out}"
        );
        assert!(err.contains("not replicated"), "{err}");
    }

    // `peer add --priority`: a caught-up voter with a higher priority than
    // everyone else is handed leadership.
    let favourite = c.add_member().await;
    let addr = c.members[favourite].addr.clone();
    let (ok, _, err) = c.cli(
        &voters,
        &["peer", "add", "--address", &addr, "--priority", "7"],
    );
    assert!(ok, "peer add --priority: {err}");
    let now_voters = [0, 1, 2, favourite];
    c.becomes_leader(favourite, "default").await;
    assert_eq!(c.leader("default", &now_voters).await, favourite);
    let conf = c
        .info(favourite, "default")
        .await
        .unwrap()
        .configuration
        .unwrap();
    let p = conf
        .peers
        .iter()
        .find(|p| p.id == c.members[favourite].id)
        .unwrap();
    assert_eq!((p.priority, p.role()), (7, pb::PeerRole::Voter));
    assert_eq!(
        cl.get(b"after-listener").await.unwrap(),
        Some(Bytes::from("1"))
    );
}

/// One arbitrary request to any of the node's services.
#[derive(Clone, Debug)]
enum AnyRequest {
    SetConfiguration(pb::SetConfigurationRequest),
    GroupManagement(pb::GroupManagementRequest),
    Transfer(pb::TransferLeadershipRequest),
    Snapshot(pb::SnapshotManagementRequest),
    Elections(pb::LeaderElectionManagementRequest),
    Info(pb::GroupInfoRequest),
    Client(pb::ClientRequest),
    Vote(pb::RequestVoteRequest),
    ReadIndex(pb::ReadIndexRequest),
    Append(pb::AppendEntriesRequest),
    StartElection(pb::StartLeaderElectionRequest),
    InstallSnapshot(Vec<pb::InstallSnapshotRequest>),
}

/// `term` is the real group's: snapshots from a plausible leader stay below
/// it, and requests from no member go beyond it.
fn any_request(
    real_group: &'static str,
    member: u64,
    term: u64,
) -> impl proptest::strategy::Strategy<Value = AnyRequest> {
    use proptest::prelude::*;
    let bytes = |max| prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from);
    // Group ids: empty, random, oversized; the real group only where the
    // request cannot take it apart (see below).
    let other_group = prop_oneof![
        Just(None),
        bytes(300)
            .prop_filter("not the real group", move |b| b != real_group.as_bytes())
            .prop_map(|id| Some(pb::GroupId { id })),
    ];
    let group = prop_oneof![Just(gid(real_group)), other_group.clone(),];
    let peer = (any::<u64>(), "[a-z0-9.:]{0,30}", any::<u32>(), 0i32..4).prop_map(
        |(id, address, priority, role)| pb::Peer {
            id,
            address,
            priority,
            role,
            ..Default::default()
        },
    );
    let peers = prop::collection::vec(peer, 0..4);
    let big = prop_oneof![any::<u64>(), 0u64..10, Just(u64::MAX)];
    // No member, or the member itself: refused whatever else the request
    // says, so these may name the real group with any numbers.
    let nobody = prop_oneof![Just(0u64), Just(member)];
    let sizes = prop_oneof![
        0u64..8,
        Just(u64::MAX),
        Just(1u64 << 63),
        Just((1u64 << 62) + 1),
        any::<u64>()
    ];
    let name = prop_oneof![
        Just("kv".to_string()),
        Just("x".to_string()),
        "[a-z./]{0,6}"
    ];
    let files = prop::collection::vec((name.clone(), sizes.clone()), 0..4);
    let chunks = prop::collection::vec((name, sizes, bytes(16), any::<bool>()), 0..4);
    prop_oneof![
        (group.clone(), peers.clone(), peers.clone(), 0i32..5).prop_map(|(g, p, e, mode)| {
            AnyRequest::SetConfiguration(pb::SetConfigurationRequest {
                group_id: g,
                mode,
                peers: p,
                expected_peers: e,
                timeout_ms: 500,
                ..Default::default()
            })
        }),
        (
            other_group.clone(),
            peers.clone(),
            any::<bool>(),
            "[a-z]{0,8}"
        )
            .prop_map(|(g, p, add, sm)| {
                use pb::group_management_request::Op;
                let op = if add {
                    Op::Add(pb::GroupAdd {
                        group_id: g,
                        peers: p,
                        listeners: Vec::new(),
                        state_machine: sm,
                    })
                } else {
                    Op::Remove(pb::GroupRemove {
                        group_id: g,
                        delete_data: true,
                    })
                };
                AnyRequest::GroupManagement(pb::GroupManagementRequest { op: Some(op) })
            }),
        (group.clone(), big.clone()).prop_map(|(g, t)| {
            AnyRequest::Transfer(pb::TransferLeadershipRequest {
                group_id: g,
                target_id: t,
                timeout_ms: 300,
            })
        }),
        group
            .clone()
            .prop_map(|g| AnyRequest::Snapshot(pb::SnapshotManagementRequest {
                group_id: g,
                ..Default::default()
            })),
        (other_group.clone(), any::<bool>()).prop_map(|(g, pause)| {
            AnyRequest::Elections(pb::LeaderElectionManagementRequest { group_id: g, pause })
        }),
        group
            .clone()
            .prop_map(|g| AnyRequest::Info(pb::GroupInfoRequest { group_id: g })),
        (group.clone(), bytes(64), bytes(2048), any::<u64>(), 0u8..5).prop_map(
            |(g, client, payload, call, kind)| {
                use pb::client_request::Kind;
                let kind = match kind {
                    0 => None,
                    1 => Some(Kind::Write(pb::WriteRequest { payload })),
                    2 => Some(Kind::Read(pb::ReadRequest {
                        query: payload,
                        non_linearizable: false,
                    })),
                    3 => Some(Kind::StaleRead(pb::StaleReadRequest {
                        query: payload,
                        min_index: call % 10,
                    })),
                    _ => Some(Kind::Watch(pb::WatchRequest {
                        index: call % 10,
                        level: (call % 6) as i32,
                    })),
                };
                AnyRequest::Client(pb::ClientRequest {
                    group_id: g,
                    client_id: client,
                    call_id: call,
                    timeout_ms: 500,
                    kind,
                    ..Default::default()
                })
            }
        ),
        // Peer requests carry the member's own id and the real group only
        // with numbers no real peer can send (forged but well-formed peer
        // traffic is trusted by design: peers are authenticated by the
        // network, e.g. mTLS, not by the protocol).
        (other_group.clone(), big.clone(), big.clone()).prop_map(move |(g, t, i)| {
            AnyRequest::Vote(pb::RequestVoteRequest {
                group_id: g,
                voter_id: member,
                candidate_id: 424242,
                term: t,
                last_entry: Some(pb::TermIndex { term: t, index: i }),
                ..Default::default()
            })
        }),
        (other_group, big.clone()).prop_map(move |(g, t)| {
            AnyRequest::ReadIndex(pb::ReadIndexRequest {
                group_id: g,
                follower_id: member,
                term: t,
                ..Default::default()
            })
        }),
        (big.clone(), big.clone()).prop_map(move |(t, i)| {
            AnyRequest::Append(pb::AppendEntriesRequest {
                group_id: gid(real_group),
                leader_id: 424242,
                follower_id: member,
                leader_term: (1u64 << 62) + 1 + t % 1000,
                previous: Some(pb::TermIndex { term: t, index: i }),
                ..Default::default()
            })
        }),
        (nobody.clone(), 0u8..5, big.clone(), big.clone()).prop_map(move |(from, kind, t, i)| {
            let last = Some(pb::TermIndex { term: t, index: i });
            // Sane numbers too: the sender alone makes these bad.
            let t = if t % 2 == 0 { term + 1 } else { t };
            match kind {
                0 => AnyRequest::Vote(pb::RequestVoteRequest {
                    group_id: gid(real_group),
                    voter_id: member,
                    candidate_id: from,
                    term: t,
                    last_entry: last,
                    ..Default::default()
                }),
                1 => AnyRequest::ReadIndex(pb::ReadIndexRequest {
                    group_id: gid(real_group),
                    follower_id: from,
                    term: t,
                    ..Default::default()
                }),
                2 => AnyRequest::StartElection(pb::StartLeaderElectionRequest {
                    group_id: gid(real_group),
                    leader_id: from,
                    target_id: member,
                    leader_term: t,
                    leader_last_entry: last,
                }),
                3 => AnyRequest::Append(pb::AppendEntriesRequest {
                    group_id: gid(real_group),
                    leader_id: from,
                    follower_id: member,
                    leader_term: t,
                    previous: last,
                    ..Default::default()
                }),
                _ => AnyRequest::InstallSnapshot(vec![pb::InstallSnapshotRequest {
                    group_id: gid(real_group),
                    leader_id: from,
                    follower_id: member,
                    leader_term: t,
                    last_included: Some(pb::TermIndex {
                        term: t,
                        index: i % 1000 + 1000,
                    }),
                    done: true,
                    ..Default::default()
                }]),
            }
        }),
        // A snapshot from a plausible leader with any declared sizes and
        // chunks. Its term is older (a snapshot of the current term from
        // another member would be believed: peers are trusted), so even one
        // that arrives whole changes nothing.
        (
            prop_oneof![0..term.max(1), Just(u64::MAX)],
            0u64..3,
            files,
            chunks,
        )
            .prop_map(move |(t, index, files, chunks)| {
                let head = pb::InstallSnapshotRequest {
                    group_id: gid(real_group),
                    leader_id: 424242,
                    follower_id: member,
                    leader_term: t,
                    last_included: Some(pb::TermIndex { term: t, index }),
                    files: files
                        .into_iter()
                        .map(|(name, size)| pb::SnapshotFile {
                            name,
                            size,
                            crc32c: 0,
                        })
                        .collect(),
                    done: chunks.is_empty(),
                    ..Default::default()
                };
                let n = chunks.len();
                let rest = chunks
                    .into_iter()
                    .enumerate()
                    .map(|(k, (name, offset, data, at))| {
                        pb::InstallSnapshotRequest {
                            chunk: Some(pb::SnapshotChunk {
                                file_name: name,
                                // Mostly where the file's received bytes end.
                                offset: if at { 0 } else { offset },
                                data,
                                done: k + 1 == n,
                            }),
                            done: k + 1 == n,
                            ..Default::default()
                        }
                    });
                AnyRequest::InstallSnapshot(std::iter::once(head).chain(rest).collect())
            }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_requests_to_every_service_are_answered_and_change_nothing() {
    use kuberaft_proto::v1::raft_client_protocol_service_client::RaftClientProtocolServiceClient;
    use kuberaft_proto::v1::raft_server_protocol_service_client::RaftServerProtocolServiceClient;
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, TestRunner};
    use std::time::Duration;

    let c = Cluster::start(1, &[]).await;
    c.create_group("default", "kv", &[0]).await;
    c.leader("default", &[0]).await;
    let cl = c.client("default", &[0]);
    for i in 0..20 {
        cl.put(format!("keep-{i}").as_bytes(), b"v").await.unwrap();
    }
    let before = c.info(0, "default").await.unwrap();
    let addr = c.members[0].addr.clone();
    let ch = kuberaft_node::rpc::peer::channel(&addr).unwrap();
    let strategy = any_request("default", c.members[0].id, before.term);
    let mut runner = TestRunner::new(Config {
        cases: 200,
        ..Config::default()
    });
    let mut answered = 0;
    for case in 0..200 {
        let req = strategy.new_tree(&mut runner).unwrap().current();
        let mut a = admin(&addr).await;
        let mut peer = RaftServerProtocolServiceClient::new(ch.clone());
        let mut client = RaftClientProtocolServiceClient::new(ch.clone());
        let call = async {
            // Ok or a status with a message: both are answers. A status
            // without a message is not a clear error.
            let status = match req.clone() {
                AnyRequest::SetConfiguration(r) => a.set_configuration(r).await.err(),
                AnyRequest::GroupManagement(r) => a.group_management(r).await.err(),
                AnyRequest::Transfer(r) => a.transfer_leadership(r).await.err(),
                AnyRequest::Snapshot(r) => a.snapshot_management(r).await.err(),
                AnyRequest::Elections(r) => a.leader_election_management(r).await.err(),
                AnyRequest::Info(r) => a.group_info(r).await.err(),
                AnyRequest::Client(r) => {
                    let mut s = client
                        .unordered(tokio_stream::iter(vec![r]))
                        .await
                        .map_err(Some)
                        .unwrap_or_else(|_| panic!("the client stream opens"))
                        .into_inner();
                    s.message().await.err()
                }
                AnyRequest::Vote(r) => peer.request_vote(r).await.err(),
                AnyRequest::ReadIndex(r) => peer.read_index(r).await.err(),
                AnyRequest::Append(r) => {
                    let mut s = peer
                        .append_entries(tokio_stream::iter(vec![r]))
                        .await
                        .unwrap()
                        .into_inner();
                    // A refused append ends the stream with the reason; an
                    // append for a group or member this is not gets nothing.
                    tokio::time::timeout(Duration::from_millis(200), s.message())
                        .await
                        .ok()
                        .and_then(|r| r.err())
                }
                AnyRequest::StartElection(r) => peer.start_leader_election(r).await.err(),
                AnyRequest::InstallSnapshot(r) => {
                    match peer.install_snapshot(tokio_stream::iter(r)).await {
                        Ok(s) => s.into_inner().message().await.err(),
                        Err(s) => Some(s),
                    }
                }
            };
            if let Some(s) = status {
                assert!(
                    !s.message().is_empty(),
                    "case {case}: {req:?} got a bare {s:?}"
                );
            }
        };
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap_or_else(|_| panic!("case {case}: no answer within 10 s to {req:?}"));
        answered += 1;
    }
    assert_eq!(answered, 200);
    // The node is alive, the group kept its term and leader, and nothing
    // written before was lost.
    let after = c.info(0, "default").await.expect("the node still answers");
    assert_eq!(after.role(), pb::RaftRole::Leader);
    assert_eq!(after.term, before.term, "no forged term took hold");
    assert!(after.commit_index >= before.commit_index);
    for i in 0..20 {
        assert_eq!(
            cl.get(format!("keep-{i}").as_bytes()).await.unwrap(),
            Some(Bytes::from("v"))
        );
    }
    cl.put(b"after-fuzz", b"1").await.unwrap();
}

/// The `kuberaft_groups_quiet` gauge of member `i`.
fn quiet_groups(c: &Cluster, i: usize) -> Option<u64> {
    let (code, body) = c.http_get(i, "/metrics");
    if code != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix("kuberaft_groups_quiet "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_go_quiet_and_elect_fast_when_their_leader_dies() {
    const GROUPS: usize = 6;
    let mut c = Cluster::start(3, &[]).await;
    let names: Vec<String> = (0..GROUPS).map(|g| format!("q{g}")).collect();
    for n in &names {
        c.create_group(n, "kv", &c.all()).await;
        c.client(n, &c.all()).put(b"k", b"before").await.unwrap();
    }
    poll("every group quiet on every member", || async {
        let all = (0..3).all(|i| quiet_groups(&c, i) == Some(GROUPS as u64));
        all.then_some(())
    })
    .await;

    // Kill the member leading the most groups. Quiet followers run no
    // election timer; the survivors' pings notice the silence and wake them.
    let mut led = [0usize; 3];
    for n in &names {
        led[c.leader(n, &c.all()).await] += 1;
    }
    let victim = (0..3).max_by_key(|i| led[*i]).unwrap();
    let rest: Vec<usize> = c.all().into_iter().filter(|i| *i != victim).collect();
    let killed = std::time::Instant::now();
    c.kill(victim);
    for n in &names {
        c.leader(n, &rest).await;
    }
    let took = killed.elapsed();
    println!("quiet groups of a killed leader re-elected after {took:?}");
    // Without liveness the quiet followers would wait out their own
    // backstop (20 s with these defaults) before an election of 1-2 s.
    assert!(
        took < std::time::Duration::from_secs(12),
        "every group of the dead member had a new leader after {took:?}"
    );
    for n in &names {
        let cl = c.client(n, &rest);
        assert_eq!(cl.get(b"k").await.unwrap(), Some(Bytes::from("before")));
        cl.put(b"k", b"after").await.unwrap();
    }

    // The restarted member learns its leaders from the woken groups, and
    // everything goes quiet again, on it too.
    c.restart(victim).await;
    poll("every group quiet again on every member", || async {
        let all = (0..3).all(|i| quiet_groups(&c, i) == Some(GROUPS as u64));
        all.then_some(())
    })
    .await;
    for n in &names {
        let l = c.leader(n, &c.all()).await;
        c.caught_up(victim, n, l).await;
    }
    let cl = c.client(&names[0], &[victim]);
    assert_eq!(cl.get(b"k").await.unwrap(), Some(Bytes::from("after")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_no_member_hosts_is_refused_at_once_and_nothing_may_take_effect() {
    use kuberaft_node::client::ClientError;
    use std::time::{Duration, Instant};
    // Member 0 hosts no group: a client that asks it first must still reach
    // the group through the others, so only a refusal by every member is
    // taken as the answer.
    let c = Cluster::start(3, &[]).await;
    c.create_group("default", "kv", &[1, 2]).await;
    c.leader("default", &[1, 2]).await;
    c.client("default", &c.all()).put(b"k", b"v").await.unwrap();

    // Well inside the client's 30 s deadline: nothing is retried.
    let quick = Duration::from_secs(3);
    let started = Instant::now();
    let err = c
        .client("nope", &c.all())
        .put(b"k", b"v")
        .await
        .unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    assert!(took < quick, "answered after {took:?}: {msg}");
    assert!(
        msg.contains("nope") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(!msg.contains("may still take effect"), "{msg}");
    assert!(
        matches!(&err, ClientError::UnknownGroup { group, .. } if group == "nope"),
        "{err:?}"
    );

    // The CLI, with its default 20 s deadline: one line, the same answer.
    let started = Instant::now();
    let (ok, _, err) = c.cli(&c.all(), &["--group", "nope", "put", "k", "v"]);
    let took = started.elapsed();
    assert!(!ok);
    assert!(took < quick, "answered after {took:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("nope") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("may still take effect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_addressed_admin_commands_work_with_the_first_listed_peer_down() {
    let mut c = Cluster::start(3, &[]).await;
    c.create_group("default", "kv", &c.all()).await;
    c.leader("default", &c.all()).await;
    c.client("default", &c.all()).put(b"k", b"v").await.unwrap();
    // The first of --peers is down: exactly when an operator reaches for
    // these commands.
    c.kill(0);
    let id = |i: usize| c.members[i].id.to_string();

    let (ok, out, err) = c.cli(&c.all(), &["snapshot", "create", "--member", &id(1)]);
    assert!(ok, "snapshot create: {err}");
    assert!(out.contains("snapshot at index"), "{out}");

    let (ok, _, err) = c.cli(&c.all(), &["election", "pause", "--member", &id(2)]);
    assert!(ok, "election pause: {err}");
    assert!(c.info(2, "default").await.unwrap().elections_paused);

    // A member missing from --peers is found in the configuration a live
    // peer reports.
    let (ok, _, err) = c.cli(&[0, 1], &["election", "resume", "--member", &id(2)]);
    assert!(ok, "election resume: {err}");
    assert!(!c.info(2, "default").await.unwrap().elections_paused);

    // A member no one knows: refused, saying which peers were asked.
    let (ok, _, err) = c.cli(&c.all(), &["snapshot", "create", "--member", "12345"]);
    assert!(!ok);
    assert!(err.contains("member 12345"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

/// Overwrites the header of every log segment of every group under a
/// member's data directory; returns how many it damaged.
fn corrupt_logs(data: &std::path::Path) -> usize {
    use std::io::{Seek, SeekFrom, Write};
    let mut n = 0;
    for group in std::fs::read_dir(data.join("groups")).unwrap().flatten() {
        for seg in std::fs::read_dir(group.path().join("log"))
            .unwrap()
            .flatten()
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(seg.path())
                .unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(b"garbage!").unwrap();
            f.sync_all().unwrap();
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_keeps_serving_when_a_member_cannot_start_and_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_block();
    let peers = format!(
        "127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
        base,
        base + 1,
        base + 2
    );
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(harness::CLI)
            .args(["--peers", &peers])
            .args(args)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let mut up = LocalUp::start(dir.path(), base);
    let (ok, _, err) = cli(&["put", "k", "v1"]);
    assert!(ok, "{err}");
    assert!(up.interrupt());

    assert!(
        corrupt_logs(&dir.path().join("node-1")) > 0,
        "a segment to damage"
    );
    let mut up = LocalUp::start(dir.path(), base);
    let out = up.output();
    println!("local up with member 1 damaged:\n{out}");

    // The two healthy members serve.
    let (ok, _, err) = cli(&["put", "k", "v2"]);
    assert!(ok, "put: {err}\nlocal up said:\n{out}");
    let (ok, got, err) = cli(&["get", "k"]);
    assert!(ok, "get: {err}");
    assert_eq!(got.trim(), "v2");

    // The member's own error, once, on the line naming it, with the repair.
    let failing: Vec<&str> = out.lines().filter(|l| l.contains("is corrupt")).collect();
    assert_eq!(failing.len(), 1, "the error once:\n{out}");
    let line = failing[0];
    assert!(line.contains("member 1"), "{line}");
    let file = line
        .split_whitespace()
        .find(|w| w.contains("/log/"))
        .unwrap_or_else(|| panic!("the damaged file is named: {line}"));
    assert_eq!(
        line.matches(file).count(),
        1,
        "the error does not repeat itself: {line}"
    );
    let node1 = dir.path().join("node-1");
    assert!(
        out.contains(&node1.display().to_string()) && out.contains("peer add"),
        "how to repair it:\n{out}"
    );
    assert!(up.interrupt(), "Ctrl-C stops local up cleanly");

    // The repair it printed works: data aside, up again, replace the member.
    let old_id = std::fs::read_to_string(node1.join("member-id")).unwrap();
    let old_id = old_id.trim();
    let old: u64 = old_id.parse().unwrap();
    std::fs::rename(&node1, dir.path().join("node-1.broken")).unwrap();
    let mut up = LocalUp::start(dir.path(), base);
    let (ok, _, err) = cli(&["peer", "remove", "--id", old_id]);
    assert!(ok, "peer remove: {err}\nlocal up said:\n{}", up.output());
    let node1_addr = format!("127.0.0.1:{}", base + 1);
    let (ok, _, err) = cli(&["peer", "add", "--address", &node1_addr]);
    assert!(ok, "peer add: {err}");
    let (ok, got, err) = cli(&["get", "k"]);
    assert!(ok, "get: {err}");
    assert_eq!(got.trim(), "v2");
    poll("the new member 1 to catch up", || async {
        let (ok, info, _) = cli(&["group", "info", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&info).ok().filter(|_| ok)?;
        let m = v.as_array()?.iter().find(|m| m["address"] == node1_addr)?;
        let caught_up = m["member_id"].as_u64()? != old
            && m["applied_index"].as_u64()? >= m["commit_index"].as_u64()?
            && m["peers"].as_array()?.len() == 3;
        caught_up.then_some(())
    })
    .await;
    assert!(up.interrupt());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_level_waits_for_a_member_of_the_previous_version() {
    use kuberaft_node::core::FEATURE_LEVEL;
    let mut c = Cluster::start(3, &[]).await;
    // Member 2 plays the previous version: it knows no newer level.
    c.members[2].args = vec!["--feature-level".into(), "1".into()];
    c.kill(2);
    c.restart(2).await;
    c.create_group("default", "kv", &[0, 1, 2]).await;
    let leader = c.leader("default", &[0, 1, 2]).await;
    let cl = c.client("default", &[0, 1, 2]);
    for i in 0..20 {
        cl.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    for i in 0..3 {
        c.caught_up(i, "default", leader).await;
    }
    let level = |c: &Cluster, i| c.group_status(i, "default")?["cluster_level"].as_u64();
    for i in 0..3 {
        assert_eq!(
            level(&c, i),
            Some(1),
            "member {i}: no level above the oldest member's"
        );
    }
    // Upgraded: the same data, the current version.
    c.members[2].args.clear();
    c.kill(2);
    c.restart(2).await;
    poll("every member to reach the current level", || async {
        (0..3)
            .all(|i| level(&c, i) == Some(u64::from(FEATURE_LEVEL)))
            .then_some(())
    })
    .await;
    assert_eq!(cl.get(b"k19").await.unwrap(), Some(Bytes::from("v")));
}

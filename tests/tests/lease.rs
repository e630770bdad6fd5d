//! The leader lease against real time, on real processes: a leader that is
//! starved of CPU the way a container quota starves it (frozen for most of
//! every period) and then cut off from its peers must stop serving lease
//! reads, and step down on check-quorum, when real time says so, not when
//! its starved task gets round to counting ticks.
//!
//! Timing here is the point, so the margins are wide: a correct node stops
//! lease reads within 350 ms of the cut and steps down within about 1.2 s;
//! a node that counts its ticks by wake-ups under this throttle (one tick per
//! 200 ms period instead of four) serves lease reads until about 1.4 s and
//! steps down after 2 s at the earliest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kuberaft_node::client::{Client, ClientOptions};
use kuberaft_proto::v1 as pb;
use kuberaft_tests::nemesis::net::Link;
use kuberaft_tests::nemesis::procs::{Procs, node_binary};
use kuberaft_tests::nemesis::{create_group, group_info};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::Mutex;

const GROUP: &str = "reg";
/// The throttle: runnable for `RUN` of every `PERIOD`, as a CPU quota of a
/// tenth of a core does with a 200 ms period.
const PERIOD: Duration = Duration::from_millis(200);
const RUN: Duration = Duration::from_millis(20);
/// Lease: 7 ticks of 50 ms with a 500 ms election timeout.
const LEASE_BOUND: Duration = Duration::from_millis(800);
/// Check-quorum every 500 ms: stepped down within two periods, plus the
/// throttle's delay in answering.
const STEP_DOWN_BOUND: Duration = Duration::from_millis(1800);

/// Freezes and thaws a process in the background until dropped; always
/// leaves it running.
struct Throttle {
    on: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Throttle {
    fn start(pid: i32) -> Throttle {
        let on = Arc::new(AtomicBool::new(true));
        let flag = on.clone();
        let task = tokio::spawn(async move {
            let pid = Pid::from_raw(pid);
            while flag.load(Ordering::Relaxed) {
                let _ = kill(pid, Signal::SIGSTOP);
                tokio::time::sleep(PERIOD - RUN).await;
                let _ = kill(pid, Signal::SIGCONT);
                tokio::time::sleep(RUN).await;
            }
        });
        Throttle {
            on,
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        self.on.store(false, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // A failed test: the task ends at its next turn and thaws first.
        self.on.store(false, Ordering::Relaxed);
    }
}

async fn leader(procs: &Procs) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for i in 0..procs.members.len() {
            if group_info(procs, i, GROUP)
                .await
                .is_some_and(|g| g.role() == pb::RaftRole::Leader)
            {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no leader within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_cut_off_leader_stops_lease_reads_and_steps_down_on_real_time() {
    let root = tempfile::tempdir().unwrap();
    let bin = node_binary().expect("the node binary");
    let mut procs = Procs::new(bin, &["--leader-lease", "--election-timeout-ms", "500"]);
    for _ in 0..3 {
        procs.add(root.path(), None).await.expect("a member starts");
    }
    create_group(&procs, GROUP, "kv", &[0, 1, 2]).await.unwrap();
    let l = leader(&procs).await;
    // Reads go to the leader only, each given up quickly.
    let opts = ClientOptions {
        timeout: Duration::from_millis(400),
        attempt_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let client = Client::new(&[procs.members[l].addr.clone()], GROUP.as_bytes(), opts).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.put(b"k", b"0").await.is_err() {
        assert!(Instant::now() < deadline, "no write through the leader");
    }

    let throttle = Throttle::start(procs.pid(l).unwrap());
    // Successful reads: when they were sent and the value they saw.
    let served = Arc::new(Mutex::new(Vec::<(Instant, u64)>::new()));
    let reading = Arc::new(AtomicBool::new(true));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (client, served, reading) = (client.clone(), served.clone(), reading.clone());
            tokio::spawn(async move {
                while reading.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    if let Ok(Some(v)) = client.get(b"k").await {
                        let v = std::str::from_utf8(&v).unwrap().parse().unwrap();
                        served.lock().await.push((sent, v));
                    }
                }
            })
        })
        .collect();
    // Starved but connected, it leads and serves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cut = Instant::now();
    for o in (0..3).filter(|o| *o != l) {
        procs.net.set(l, o, Link::Down);
        procs.net.set(o, l, Link::Down);
    }
    // The majority elects a new leader and takes writes: a read the old
    // leader serves after one of them was acknowledged would be stale.
    let majority: Vec<String> = (0..3)
        .filter(|o| *o != l)
        .map(|o| procs.members[o].addr.clone())
        .collect();
    let writer = Client::new(&majority, GROUP.as_bytes(), ClientOptions::default()).unwrap();
    let acked = Arc::new(Mutex::new(Vec::<(Instant, u64)>::new()));
    let writing = {
        let (acked, reading) = (acked.clone(), reading.clone());
        tokio::spawn(async move {
            let mut n = 1u64;
            while reading.load(Ordering::Relaxed) {
                if writer.put(b"k", n.to_string().as_bytes()).await.is_ok() {
                    acked.lock().await.push((Instant::now(), n));
                    n += 1;
                }
            }
        })
    };
    let stepped_down = loop {
        let info = group_info(&procs, l, GROUP).await;
        if info.is_some_and(|g| g.role() != pb::RaftRole::Leader) {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "the cut-off leader never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Until the majority has acknowledged writes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().await.len() < 5 {
        assert!(Instant::now() < deadline, "the majority took no writes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reading.store(false, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    writing.await.unwrap();
    throttle.stop().await;
    procs.net.heal();

    let served = served.lock().await;
    let acked = acked.lock().await;
    for (sent, seen) in served.iter() {
        let newest_acked = acked
            .iter()
            .filter(|(at, _)| at < sent)
            .map(|(_, v)| *v)
            .max();
        assert!(
            newest_acked.is_none_or(|v| v <= *seen),
            "stale read: sent {:?} after the cut, it saw {seen} though {newest_acked:?} was acknowledged before",
            sent.saturating_duration_since(cut)
        );
    }
    let before = served.iter().filter(|(t, _)| *t < cut).count();
    assert!(
        before > 0,
        "the starved leader served no read while connected"
    );
    let last = served
        .iter()
        .map(|(t, _)| *t)
        .max()
        .expect("reads were served");
    let last_after_cut = last.saturating_duration_since(cut);
    assert!(
        last_after_cut < LEASE_BOUND,
        "a read sent {last_after_cut:?} after the cut was served on the lease (bound {LEASE_BOUND:?})"
    );
    assert!(
        stepped_down < STEP_DOWN_BOUND,
        "stepped down {stepped_down:?} after the cut (bound {STEP_DOWN_BOUND:?})"
    );
    println!(
        "{before} reads served while starved; last lease read sent {last_after_cut:?} after the cut; \
         stepped down after {stepped_down:?}"
    );
}

//! The nemesis: real `kuberaft-node` processes on loopback, clients writing
//! and reading through the client library, and faults injected while they
//! run. Afterwards every key's history is checked for linearizability (the
//! same checker as the simulation), the counter for exactly-once, and the
//! members' states for equality.
//!
//! One run: three voters of two groups (`reg`, kv; `ctr`, counter) plus a
//! spare member that membership changes add and remove. Faults, one at a
//! time with a quiet spell between them:
//!
//! | fault | what |
//! |---|---|
//! | `kill` | SIGKILL a member, restart it on the same data |
//! | `pause` | SIGSTOP a member, SIGCONT it |
//! | `partition` | cut the members into two sides |
//! | `isolate-leader` | cut a leader off from every peer (clients still reach it) |
//! | `throttle-leader` | cut a leader off and starve it as a CPU quota does (stopped 180 ms of every 200), while clients still reach it: its lease must run out on real time |
//! | `one-way` | drop one direction between two members |
//! | `slow` | delay every link by 5–80 ms |
//! | `full-disk` | fill the tmpfs one member's data lives on |
//!
//! While a fault holds, a leadership transfer or a membership change (the
//! spare in or out of `reg`) runs half of the time.

pub mod net;
pub mod procs;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use kuberaft_node::client::{Client, ClientOptions};
use kuberaft_proto::v1 as pb;
use prost::Message;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::history::{Operation, RegisterOp, check_linearizable};
use net::Link;
use procs::{Procs, node_binary};
use workload::{Recorder, check_counter, counter_client, key_name, parse_key, register_client};

const REG: &str = "reg";
const CTR: &str = "ctr";
const VOTERS: usize = 3;
const SPARE: usize = 3;
/// How long members may take to catch up once every fault is healed.
const CONVERGE: Duration = Duration::from_secs(20);
/// Member whose data lives on a tmpfs that `full-disk` fills.
const DISK_MEMBER: usize = 2;

/// Every fault kind, by name.
pub const FAULTS: [&str; 8] = [
    "kill",
    "pause",
    "partition",
    "isolate-leader",
    "throttle-leader",
    "one-way",
    "slow",
    "full-disk",
];

#[derive(Clone, Debug)]
pub struct NemesisOptions {
    pub seed: u64,
    /// How long faults are injected; checking comes after.
    pub duration: Duration,
    pub register_clients: usize,
    pub counter_clients: usize,
    /// Fault kinds to draw from (names in [`FAULTS`]).
    pub faults: Vec<String>,
    /// Print every fault as it is injected.
    pub verbose: bool,
    /// Keep the members' data and logs even when nothing was found.
    pub keep: bool,
    /// Run the members with `--leader-lease`: reads served on the lease are
    /// checked like every other.
    pub leader_lease: bool,
}

impl NemesisOptions {
    pub fn new(seed: u64, duration: Duration) -> Self {
        NemesisOptions {
            seed,
            duration,
            register_clients: 8,
            counter_clients: 3,
            faults: FAULTS.iter().map(|s| s.to_string()).collect(),
            verbose: false,
            keep: false,
            leader_lease: false,
        }
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub elapsed: Duration,
    /// Register operations checked for linearizability (final reads included).
    pub ops_checked: usize,
    /// Of those, writes whose outcome stayed unknown.
    pub ops_unknown: usize,
    pub keys: usize,
    pub counter_acked: usize,
    pub counter_unknown: u64,
    pub counter_final: i64,
    pub faults: BTreeMap<String, u64>,
    pub admin: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub anomalies: Vec<String>,
    /// Where the members' logs are kept when anomalies were found.
    pub kept: Option<PathBuf>,
    pub timeline: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} ran {:.1}s: {} register operations on {} keys checked ({} with unknown outcome), \
             {} counter adds acknowledged ({} unanswered), final counter {}",
            self.seed,
            self.elapsed.as_secs_f64(),
            self.ops_checked,
            self.keys,
            self.ops_unknown,
            self.counter_acked,
            self.counter_unknown,
            self.counter_final
        )?;
        let list = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            f,
            "faults: {} ({} in all)",
            list(&self.faults),
            self.faults.values().sum::<u64>()
        )?;
        writeln!(f, "admin actions during faults: {}", list(&self.admin))?;
        writeln!(f, "client errors: {}", list(&self.errors))?;
        writeln!(f, "anomalies: {}", self.anomalies.len())?;
        for a in &self.anomalies {
            writeln!(f, "  - {a}")?;
        }
        if let Some(dir) = &self.kept {
            writeln!(f, "member logs and data kept in {}", dir.display())?;
        }
        Ok(())
    }
}

struct Run {
    procs: Procs,
    rng: SmallRng,
    started: Instant,
    report: Report,
    verbose: bool,
    disk: bool,
}

/// Runs the nemesis once. An `Err` is a harness failure (the cluster could
/// not be started); anomalies are in the report.
pub async fn run(opts: NemesisOptions) -> anyhow::Result<Report> {
    for f in &opts.faults {
        if !FAULTS.contains(&f.as_str()) {
            bail!("unknown fault {f:?}; known: {}", FAULTS.join(", "));
        }
    }
    // Kept when the run fails or finds anomalies: the members' logs are
    // the evidence.
    let root = tempfile::Builder::new()
        .prefix("kuberaft-nemesis-")
        .tempdir()?
        .keep();
    let keep = opts.keep;
    let result = run_in(&root, opts).await;
    match result {
        Ok(mut report) if report.anomalies.is_empty() && !keep => {
            let _ = std::fs::remove_dir_all(&root);
            report.kept = None;
            Ok(report)
        }
        Ok(mut report) => {
            report.kept = Some(root);
            Ok(report)
        }
        Err(e) => Err(e.context(format!("member logs kept in {}", root.display()))),
    }
}

async fn run_in(root: &std::path::Path, opts: NemesisOptions) -> anyhow::Result<Report> {
    let bin = node_binary()?;
    let mut extra = vec!["--snapshot-threshold", "300"];
    if opts.leader_lease {
        extra.push("--leader-lease");
    }
    let mut procs = Procs::new(bin, &extra);
    let wants_disk = opts.faults.iter().any(|f| f == "full-disk");
    let mut disk = false;
    let mut notes = Vec::new();
    for i in 0..=SPARE {
        let tmpfs = (i == DISK_MEMBER && wants_disk).then_some(64);
        match procs.add(root, tmpfs).await {
            Ok(_) => disk |= tmpfs.is_some(),
            Err(e) if tmpfs.is_some() => {
                // Mounting needs root; without it, no full-disk faults.
                notes.push(format!("full-disk skipped: {e:#}"));
                procs.add(root, None).await?;
            }
            Err(e) => return Err(e),
        }
    }
    for (group, sm) in [(REG, "kv"), (CTR, "counter")] {
        create_group(&procs, group, sm, &(0..VOTERS).collect::<Vec<_>>()).await?;
    }
    let addrs: Vec<String> = procs.members.iter().map(|m| m.addr.clone()).collect();
    let client_opts = ClientOptions {
        timeout: Duration::from_secs(15),
        ..Default::default()
    };
    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..opts.register_clients {
        let cl = Client::new(&addrs, REG.as_bytes(), client_opts.clone())?;
        tasks.push(tokio::spawn(register_client(
            c,
            cl,
            rec.clone(),
            stop.clone(),
            opts.seed,
        )));
    }
    for _ in 0..opts.counter_clients {
        let cl = Client::new(&addrs, CTR.as_bytes(), client_opts.clone())?;
        tasks.push(tokio::spawn(counter_client(cl, rec.clone(), stop.clone())));
    }

    let mut run = Run {
        procs,
        rng: SmallRng::seed_from_u64(opts.seed),
        started: Instant::now(),
        report: Report {
            seed: opts.seed,
            ..Default::default()
        },
        verbose: opts.verbose,
        disk,
    };
    for n in notes {
        run.note(n);
    }
    while run.started.elapsed() < opts.duration {
        let quiet = run.rng.random_range(500..2000);
        tokio::time::sleep(Duration::from_millis(quiet)).await;
        let fault = opts.faults[run.rng.random_range(0..opts.faults.len())].clone();
        run.fault(&fault).await?;
    }

    // Heal everything, let the clients finish, then check.
    run.heal().await?;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    run.note("clients stopped".into());
    run.check(&rec, &addrs, client_opts).await?;
    run.note("checked".into());
    run.report.elapsed = run.started.elapsed();
    // Stop the members (and unmount) before the caller removes the data.
    drop(run.procs);
    Ok(run.report)
}

/// Creates `group` with state machine `sm` on the members `on`.
pub async fn create_group(
    procs: &Procs,
    group: &str,
    sm: &str,
    on: &[usize],
) -> anyhow::Result<()> {
    let peers: Vec<pb::Peer> = on.iter().map(|i| procs.peer(*i)).collect();
    for i in on {
        let r = procs
            .admin(*i)
            .await
            .group_management(pb::GroupManagementRequest {
                op: Some(pb::group_management_request::Op::Add(pb::GroupAdd {
                    group_id: gid(group),
                    peers: peers.clone(),
                    listeners: Vec::new(),
                    state_machine: sm.into(),
                })),
            })
            .await?
            .into_inner();
        if !r.success {
            bail!("creating {group} on member {i}: {}", r.error);
        }
    }
    Ok(())
}

fn gid(name: &str) -> Option<pb::GroupId> {
    Some(pb::GroupId {
        id: Bytes::copy_from_slice(name.as_bytes()),
    })
}

/// Member `i`'s view of `group`, or `None` when it does not answer within
/// 3 s.
pub async fn group_info(procs: &Procs, i: usize, group: &str) -> Option<pb::GroupInfoReply> {
    let mut a = procs.admin(i).await;
    within(a.group_info(pb::GroupInfoRequest {
        group_id: gid(group),
    }))
    .await
    .map(|r| r.into_inner())
}

/// An admin call that gives up after 3 s (a paused member never answers).
async fn within<T>(f: impl Future<Output = Result<T, tonic::Status>>) -> Option<T> {
    match tokio::time::timeout(Duration::from_secs(3), f).await {
        Ok(Ok(t)) => Some(t),
        _ => None,
    }
}

impl Run {
    fn note(&mut self, what: String) {
        let line = format!("{:7.2}s {what}", self.started.elapsed().as_secs_f64());
        if self.verbose {
            eprintln!("{line}");
        }
        self.report.timeline.push(line);
    }

    fn count(&mut self, fault: &str) {
        *self.report.faults.entry(fault.into()).or_default() += 1;
    }

    fn members(&self) -> Vec<usize> {
        (0..self.procs.members.len()).collect()
    }

    /// Members that run and are not paused.
    fn awake(&self) -> Vec<usize> {
        self.members()
            .into_iter()
            .filter(|i| self.procs.running(*i) && !self.procs.members[*i].stopped)
            .collect()
    }

    async fn info(&self, i: usize, group: &str) -> Option<pb::GroupInfoReply> {
        group_info(&self.procs, i, group).await
    }

    /// The member that leads `group` in the highest term, as far as the
    /// awake members say.
    async fn leader(&self, group: &str) -> Option<(usize, pb::GroupInfoReply)> {
        let mut best: Option<(usize, pb::GroupInfoReply)> = None;
        for i in self.awake() {
            if let Some(info) = self.info(i, group).await
                && info.role() == pb::RaftRole::Leader
                && best.as_ref().is_none_or(|(_, b)| b.term < info.term)
            {
                best = Some((i, info));
            }
        }
        best
    }

    /// The leader of `group`, waiting up to `wait` for one: a fault aimed at
    /// the leader that finds an election under way waits for its outcome
    /// instead of being skipped.
    async fn leader_within(
        &self,
        group: &str,
        wait: Duration,
    ) -> Option<(usize, pb::GroupInfoReply)> {
        let until = Instant::now() + wait;
        loop {
            let found = self.leader(group).await;
            if found.is_some() || Instant::now() >= until {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn hold(&mut self) -> anyhow::Result<()> {
        let hold = Duration::from_millis(self.rng.random_range(1000..4000));
        let until = Instant::now() + hold;
        if self.rng.random_bool(0.5) {
            tokio::time::sleep(Duration::from_millis(self.rng.random_range(0..500))).await;
            if self.rng.random_bool(0.5) {
                self.transfer().await;
            } else {
                self.membership().await?;
            }
        }
        tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        Ok(())
    }

    async fn fault(&mut self, fault: &str) -> anyhow::Result<()> {
        let n = self.procs.members.len();
        match fault {
            "kill" => {
                let i = self.rng.random_range(0..n);
                self.note(format!("kill member {i}"));
                self.procs.kill(i);
                self.hold().await?;
                self.note(format!("restart member {i}"));
                self.procs.start(i).await?;
            }
            "pause" => {
                let i = self.rng.random_range(0..n);
                self.note(format!("pause member {i}"));
                self.procs.pause(i, true);
                self.hold().await?;
                self.procs.pause(i, false);
                self.note(format!("resume member {i}"));
            }
            "partition" => {
                let mut all = self.members();
                all.shuffle(&mut self.rng);
                let k = self.rng.random_range(1..n);
                let (a, b) = all.split_at(k);
                self.note(format!("partition {a:?} | {b:?}"));
                for x in a {
                    for y in b {
                        self.procs.net.set(*x, *y, Link::Down);
                        self.procs.net.set(*y, *x, Link::Down);
                    }
                }
                self.hold().await?;
                self.procs.net.heal();
                self.note("healed".into());
            }
            "isolate-leader" => {
                let group = if self.rng.random_bool(0.5) { REG } else { CTR };
                let Some((l, _)) = self.leader_within(group, Duration::from_secs(5)).await else {
                    self.note(format!("isolate-leader: {group} has no leader now"));
                    return Ok(());
                };
                self.note(format!("isolate member {l}, leader of {group}"));
                for o in self.members().into_iter().filter(|o| *o != l) {
                    self.procs.net.set(l, o, Link::Down);
                    self.procs.net.set(o, l, Link::Down);
                }
                self.hold().await?;
                self.procs.net.heal();
                self.note("healed".into());
            }
            "throttle-leader" => {
                let group = if self.rng.random_bool(0.5) { REG } else { CTR };
                let Some((l, _)) = self.leader_within(group, Duration::from_secs(5)).await else {
                    self.note(format!("throttle-leader: {group} has no leader now"));
                    return Ok(());
                };
                self.note(format!(
                    "isolate and throttle member {l}, leader of {group}"
                ));
                for o in self.members().into_iter().filter(|o| *o != l) {
                    self.procs.net.set(l, o, Link::Down);
                    self.procs.net.set(o, l, Link::Down);
                }
                // What a CPU quota does to a container (`docker run
                // --cpus=0.1` with a 200 ms period): runnable for a slice of
                // every period, then frozen until the next, several ticks
                // long. Ticks the task misses meanwhile must still count
                // against the lease.
                let until =
                    Instant::now() + Duration::from_millis(self.rng.random_range(1500..4000));
                while Instant::now() < until {
                    self.procs.pause(l, true);
                    tokio::time::sleep(Duration::from_millis(180)).await;
                    self.procs.pause(l, false);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                self.procs.net.heal();
                self.note("healed and unthrottled".into());
            }
            "one-way" => {
                let a = self.rng.random_range(0..n);
                let b = (a + self.rng.random_range(1..n)) % n;
                self.note(format!("drop {a} -> {b}"));
                self.procs.net.set(a, b, Link::Down);
                self.hold().await?;
                self.procs.net.heal();
                self.note("healed".into());
            }
            "slow" => {
                let ms = self.rng.random_range(5..80);
                self.note(format!("every link {ms} ms slower"));
                for a in 0..n {
                    for b in 0..n {
                        if a != b {
                            self.procs
                                .net
                                .set(a, b, Link::Slow(Duration::from_millis(ms)));
                        }
                    }
                }
                self.hold().await?;
                self.procs.net.heal();
                self.note("healed".into());
            }
            "full-disk" => {
                if !self.disk {
                    return Ok(());
                }
                self.note(format!("fill member {DISK_MEMBER}'s disk"));
                self.procs.fill_disk(DISK_MEMBER, true)?;
                self.hold().await?;
                self.procs.fill_disk(DISK_MEMBER, false)?;
                self.note(format!("free member {DISK_MEMBER}'s disk"));
            }
            other => bail!("unknown fault {other}"),
        }
        self.count(fault);
        Ok(())
    }

    /// Hands a group's leadership to another voter.
    async fn transfer(&mut self) {
        let group = if self.rng.random_bool(0.5) { REG } else { CTR };
        let Some((l, info)) = self.leader(group).await else {
            self.admin_done("transfer: no leader");
            return;
        };
        let others: Vec<u64> = info
            .configuration
            .map(|c| c.peers)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.id != info.server_id && p.role() == pb::PeerRole::Voter)
            .map(|p| p.id)
            .collect();
        if others.is_empty() {
            return;
        }
        let target = others[self.rng.random_range(0..others.len())];
        self.note(format!("transfer {group} from member {l} to id {target}"));
        let mut a = self.procs.admin(l).await;
        let r = within(a.transfer_leadership(pb::TransferLeadershipRequest {
            group_id: gid(group),
            target_id: target,
            timeout_ms: 2000,
        }))
        .await;
        let ok = r.is_some_and(|r| r.into_inner().success);
        self.admin_done(if ok { "transfer ok" } else { "transfer failed" });
    }

    /// Adds the spare member to `reg`, or removes it.
    async fn membership(&mut self) -> anyhow::Result<()> {
        let Some((l, info)) = self.leader(REG).await else {
            self.admin_done("membership: no leader");
            return Ok(());
        };
        let conf = info.configuration.unwrap_or_default();
        let spare_id = self.procs.members[SPARE].id;
        let has_spare = conf.peers.iter().any(|p| p.id == spare_id);
        let req = if has_spare {
            self.note("remove the spare from reg".into());
            // The configuration lists voters and listeners together; this
            // run has voters only.
            let keep: Vec<pb::Peer> = conf
                .peers
                .iter()
                .filter(|p| p.id != spare_id)
                .cloned()
                .collect();
            pb::SetConfigurationRequest {
                group_id: gid(REG),
                mode: pb::SetConfigurationMode::CompareAndSet as i32,
                peers: keep,
                expected_peers: conf.peers.clone(),
                timeout_ms: 3000,
                ..Default::default()
            }
        } else {
            self.note("add the spare to reg".into());
            // The spare hosts the group (empty, waiting for the leader)
            // before it is added; it may host it already.
            let mut a = self.procs.admin(SPARE).await;
            let _ = within(a.group_management(pb::GroupManagementRequest {
                op: Some(pb::group_management_request::Op::Add(pb::GroupAdd {
                    group_id: gid(REG),
                    state_machine: "kv".into(),
                    ..Default::default()
                })),
            }))
            .await;
            pb::SetConfigurationRequest {
                group_id: gid(REG),
                mode: pb::SetConfigurationMode::Add as i32,
                peers: vec![self.procs.peer(SPARE)],
                timeout_ms: 3000,
                ..Default::default()
            }
        };
        let mut a = self.procs.admin(l).await;
        let r = within(a.set_configuration(req)).await;
        let ok = r.is_some_and(|r| r.into_inner().success);
        self.admin_done(match (has_spare, ok) {
            (true, true) => "remove ok",
            (true, false) => "remove failed",
            (false, true) => "add ok",
            (false, false) => "add failed",
        });
        Ok(())
    }

    fn admin_done(&mut self, what: &str) {
        *self.report.admin.entry(what.into()).or_default() += 1;
    }

    async fn heal(&mut self) -> anyhow::Result<()> {
        self.procs.net.heal();
        for i in self.members() {
            self.procs.pause(i, false);
            if !self.procs.running(i) {
                self.procs.start(i).await?;
            }
        }
        if self.disk {
            self.procs.fill_disk(DISK_MEMBER, false)?;
        }
        self.note("all healed; clients stop".into());
        Ok(())
    }

    async fn check(
        &mut self,
        rec: &Arc<Recorder>,
        addrs: &[String],
        opts: ClientOptions,
    ) -> anyhow::Result<()> {
        let mut anomalies: Vec<String> = rec.anomalies.lock().expect("lock").clone();
        let reg = Client::new(addrs, REG.as_bytes(), opts.clone())?;
        let ctr = Client::new(addrs, CTR.as_bytes(), opts)?;

        // Final reads: every key ever touched, in one linearizable scan.
        let mut ops: Vec<Operation> = rec.ops.lock().expect("lock").clone();
        let keys: BTreeSet<u64> = ops.iter().map(|o| o.key).collect();
        let invoked_at = rec.now();
        let pairs = reg
            .scan(b"r")
            .await
            .context("the final scan failed after healing")?;
        let returned_at = rec.now();
        let mut last: HashMap<u64, Option<u64>> = keys.iter().map(|k| (*k, None)).collect();
        for (k, v) in &pairs {
            let Some(key) = parse_key(k) else {
                anomalies.push(format!("unexpected key {k:?} in the final scan"));
                continue;
            };
            match std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()) {
                Some(v) => {
                    last.insert(key, Some(v));
                }
                None => anomalies.push(format!("key {key} holds {v:?}, which no client wrote")),
            }
        }
        for (key, v) in last {
            ops.push(Operation {
                client: usize::MAX,
                key,
                invoked_at,
                returned_at,
                op: RegisterOp::Get(v),
            });
        }
        self.report.ops_checked = ops.len();
        self.report.keys = keys.len();
        self.report.ops_unknown = ops
            .iter()
            .filter(|o| o.returned_at == crate::history::NEVER_RETURNED)
            .count();
        if let Err((key, history)) = check_linearizable(&ops) {
            let mut text = format!("key {key} ({}): history not linearizable:", key_name(key));
            let mut h = history;
            h.sort_by_key(|o| o.invoked_at);
            for o in h.iter().take(60) {
                text.push_str(&format!(
                    "\n      client {:>3} [{} .. {}] {:?}",
                    o.client as i64, o.invoked_at, o.returned_at as i64, o.op
                ));
            }
            anomalies.push(text);
        }

        // The counter: every acknowledged add applied exactly once.
        let final_value = ctr
            .counter_get()
            .await
            .context("reading the counter after healing")?;
        self.report.counter_final = final_value;
        self.report.counter_acked = rec.counter_acked.lock().expect("lock").len();
        self.report.counter_unknown = rec.counter_unknown.load(Ordering::Relaxed);
        anomalies.extend(check_counter(rec, final_value));

        self.note("history and counter checked".into());
        // Every member of `reg` reaches the same state.
        anomalies.extend(self.compare_replicas().await?);

        self.report.errors = rec
            .errors
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if !anomalies.is_empty() {
            anomalies.push(format!("timeline:\n{}", self.report.timeline.join("\n")));
        }
        self.report.anomalies = anomalies;
        Ok(())
    }

    /// Waits until every member of `reg` applied the leader's commit index,
    /// then compares their states key by key. A member still behind
    /// [`CONVERGE`] after healing is an anomaly too: a cluster that has
    /// healed must catch everyone up.
    async fn compare_replicas(&self) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + CONVERGE;
        let mut last_seen = String::from("no leader");
        let (members, commit) = loop {
            if Instant::now() > deadline {
                return Ok(vec![format!(
                    "the members of {REG} did not catch up within {CONVERGE:?} after healing: {last_seen}"
                )]);
            }
            if let Some((_, info)) = self.leader(REG).await {
                let ids: Vec<u64> = info
                    .configuration
                    .unwrap_or_default()
                    .peers
                    .iter()
                    .map(|p| p.id)
                    .collect();
                let members: Vec<usize> = self
                    .members()
                    .into_iter()
                    .filter(|i| ids.contains(&self.procs.members[*i].id))
                    .collect();
                let mut all = true;
                let mut lag = Vec::new();
                for i in &members {
                    let applied = self.info(*i, REG).await.map(|r| r.applied_index);
                    all &= applied.is_some_and(|a| a >= info.commit_index);
                    lag.push((*i, applied));
                }
                last_seen = format!(
                    "commit {}, applied (member, index) {lag:?}",
                    info.commit_index
                );
                if all {
                    break (members, info.commit_index);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut states = Vec::new();
        for i in &members {
            states.push((*i, self.local_state(*i).await?));
        }
        let mut out = Vec::new();
        let (first, base) = &states[0];
        for (i, s) in &states[1..] {
            if s != base {
                let differing = base
                    .iter()
                    .find(|(k, v)| s.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .or_else(|| s.keys().find(|k| !base.contains_key(*k)).cloned());
                out.push(format!(
                    "members {first} and {i} applied index {commit} of {REG} but hold different states (first difference at {differing:?})"
                ));
            }
        }
        Ok(out)
    }

    /// Member `i`'s own copy of `reg`, read without going to the leader.
    async fn local_state(&self, i: usize) -> anyhow::Result<BTreeMap<Bytes, Bytes>> {
        let opts = ClientOptions {
            timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let cl = Client::new(&[self.procs.members[i].addr.clone()], REG.as_bytes(), opts)?;
        let mut out = BTreeMap::new();
        let mut after = Bytes::new();
        loop {
            let q = pb::KvQuery {
                op: Some(pb::kv_query::Op::Scan(pb::KvScan {
                    prefix: Bytes::from_static(b""),
                    limit: 0,
                    start_after: after.clone(),
                })),
            };
            let r = cl
                .read_local(Bytes::from(q.encode_to_vec()))
                .await
                .with_context(|| format!("reading member {i}'s state"))?;
            let r = pb::KvResult::decode(r.payload)?;
            if let Some(last) = r.pairs.last() {
                after = last.key.clone();
            }
            out.extend(r.pairs.into_iter().map(|p| (p.key, p.value)));
            if !r.truncated {
                return Ok(out);
            }
        }
    }
}

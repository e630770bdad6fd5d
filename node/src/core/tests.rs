//! Deterministic scenario tests of the core: the Raft paper's cases and every
//! membership and transfer path, the failing ones included.
//!
//! A tiny synchronous harness ([`Net`]) delivers messages in FIFO order,
//! persists every Ready at once (unless a member's persistence is held back),
//! and can cut members off. Names follow `tNN_`: 20 elections, 30
//! replication, 40 membership, 50 transfer, 60 reads, 70 restarts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::*;

fn cfg(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.election_timeout_min_ticks = 10;
    c.election_timeout_max_ticks = 20;
    c.heartbeat_interval_ticks = 2;
    c.staging_timeout_ticks = 30;
    // Level 1 (no level entries) keeps the indexes of the scenarios plain;
    // the `cluster_level` tests ask for the current level.
    c.feature_level = 1;
    c
}

#[derive(Clone, Debug, Default)]
struct Disk {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    log: BTreeMap<Index, Entry>,
}

/// Decides whether a message is delivered, seeing the whole network.
type Filter = dyn Fn(&Net, &Envelope) -> bool;

#[derive(Default)]
struct Net {
    nodes: BTreeMap<NodeId, RaftCore>,
    disks: BTreeMap<NodeId, Disk>,
    queue: VecDeque<Envelope>,
    /// Members cut off from everyone.
    cut: BTreeSet<NodeId>,
    /// Links that drop messages: (from, to).
    blocked: BTreeSet<(NodeId, NodeId)>,
    /// Members whose Readies are not persisted until released.
    hold: BTreeSet<NodeId>,
    held: BTreeMap<NodeId, Vec<Ready>>,
    events: BTreeMap<NodeId, Vec<Event>>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    snapshot_requests: Vec<(NodeId, NodeId)>,
    /// Every message delivered, for tests that count round trips.
    delivered: Vec<Envelope>,
    /// Drops the messages for which it returns false.
    filter: Option<Box<Filter>>,
    /// Every storage read a leader asked for, answered from its disk.
    fetches: Vec<(NodeId, Fetch)>,
    /// Storage reads are not answered (a slow or full disk).
    hold_fetches: bool,
}

impl Net {
    fn new(n: u64) -> Net {
        Self::with_membership(Membership::with_voters((1..=n).map(PeerInfo::new)), 1..=n)
    }

    fn with_membership(m: Membership, ids: impl IntoIterator<Item = NodeId>) -> Net {
        let logs = ids.into_iter().map(|id| (id, 0, Vec::new())).collect();
        Self::restored(m, logs, |_| {})
    }

    /// Members `1..=n` of a new group, each config adjusted by `tweak`.
    fn with_config(n: u64, tweak: impl Fn(&mut Config)) -> Net {
        let m = Membership::with_voters((1..=n).map(PeerInfo::new));
        Self::restored(m, (1..=n).map(|id| (id, 0, Vec::new())).collect(), tweak)
    }

    /// Members restarting from (id, term, log), all voters of `m`.
    fn restored(
        m: Membership,
        logs: Vec<(NodeId, Term, Vec<Entry>)>,
        tweak: impl Fn(&mut Config),
    ) -> Net {
        let mut net = Net::default();
        for (id, term, entries) in logs {
            let disk = Disk {
                hard_state: HardState {
                    term,
                    voted_for: None,
                },
                snapshot: SnapshotMeta {
                    membership: m.clone(),
                    ..Default::default()
                },
                log: entries.into_iter().map(|e| (e.index, e)).collect(),
            };
            net.disks.insert(id, disk);
            let mut c = cfg(id);
            tweak(&mut c);
            net.start(id, c);
        }
        net
    }

    /// Adds a member with an empty membership, as a new node would be.
    fn add_empty(&mut self, id: NodeId) {
        self.disks.insert(id, Disk::default());
        self.start(id, cfg(id));
    }

    fn start(&mut self, id: NodeId, c: Config) {
        let d = self.disks[&id].clone();
        let core =
            RaftCore::new(c, d.hard_state, d.snapshot, d.log.into_values().collect()).unwrap();
        self.nodes.insert(id, core);
    }

    fn crash(&mut self, id: NodeId) {
        self.nodes.remove(&id);
        self.held.remove(&id);
        self.queue.retain(|e| e.to != id && e.from != id);
    }

    fn core(&mut self, id: NodeId) -> &mut RaftCore {
        self.nodes.get_mut(&id).expect("member is up")
    }

    fn persist(&mut self, id: NodeId, ready: Ready) {
        let disk = self.disks.get_mut(&id).unwrap();
        if let Some(hs) = ready.hard_state {
            disk.hard_state = hs;
        }
        if let Some(meta) = &ready.snapshot {
            let keep = disk
                .log
                .get(&meta.index)
                .is_some_and(|e| e.term == meta.term);
            if keep {
                disk.log.retain(|i, _| *i > meta.index);
            } else {
                disk.log.clear();
            }
            disk.snapshot = meta.clone();
        }
        if let Some(first) = ready.entries.first() {
            let _ = disk.log.split_off(&first.index);
            for e in &ready.entries {
                disk.log.insert(e.index, e.clone());
            }
        }
        self.queue.extend(ready.persisted_messages);
        if let Some(core) = self.nodes.get_mut(&id) {
            core.on_persisted(ready.number);
        }
    }

    fn drain(&mut self, id: NodeId) {
        let Some(core) = self.nodes.get_mut(&id) else {
            return;
        };
        let mut ready = core.take_ready();
        core.check_invariants().unwrap();
        self.queue.extend(std::mem::take(&mut ready.messages));
        self.events
            .entry(id)
            .or_default()
            .extend(std::mem::take(&mut ready.events));
        for to in std::mem::take(&mut ready.send_snapshot) {
            self.snapshot_requests.push((id, to));
        }
        let fetch = std::mem::take(&mut ready.fetch);
        let committed = std::mem::take(&mut ready.committed_entries);
        if let Some(last) = committed.last().map(|e| e.index) {
            self.applied.entry(id).or_default().extend(committed);
            self.core(id).applied(last);
        }
        if self.hold.contains(&id) {
            self.held.entry(id).or_default().push(ready);
        } else {
            self.persist(id, ready);
        }
        // Storage reads are answered at once, and what the answers make the
        // core do is collected right away.
        if !fetch.is_empty() && !self.hold_fetches {
            for f in fetch {
                let entries = self.read_disk(id, f);
                self.fetches.push((id, f));
                self.core(id).fetched(f.to, f.prev, entries);
            }
            self.drain(id);
        }
    }

    /// What `id`'s log storage returns for a fetch: the entries from `prev`
    /// on, as many as fit in `max_bytes` (two at least), if it holds `prev`.
    fn read_disk(&self, id: NodeId, f: Fetch) -> Option<Vec<Entry>> {
        let log = &self.disks[&id].log;
        log.contains_key(&f.prev).then_some(())?;
        let mut out: Vec<Entry> = Vec::new();
        let mut bytes = 0;
        for i in f.prev..=f.hi {
            let e = log.get(&i)?;
            bytes += e.size_bytes();
            if out.len() >= 2 && bytes > f.max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }

    /// Drops `id`'s durable log up to `index`, as storage purges what a
    /// snapshot covers.
    fn purge(&mut self, id: NodeId, index: Index) {
        self.disks
            .get_mut(&id)
            .unwrap()
            .log
            .retain(|i, _| *i > index);
    }

    /// Makes everything `id` was holding back durable.
    fn release(&mut self, id: NodeId) {
        self.hold.remove(&id);
        for ready in self.held.remove(&id).unwrap_or_default() {
            self.persist(id, ready);
        }
        self.flush();
    }

    /// Delivers messages until nothing moves.
    fn flush(&mut self) {
        for _ in 0..10_000 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.drain(id);
            }
            let Some(env) = self.queue.pop_front() else {
                return;
            };
            let dropped = self.cut.contains(&env.from)
                || self.cut.contains(&env.to)
                || self.blocked.contains(&(env.from, env.to))
                || self.filter.as_ref().is_some_and(|f| !f(self, &env));
            if dropped || !self.nodes.contains_key(&env.to) {
                continue;
            }
            self.delivered.push(env.clone());
            self.core(env.to).step(env.from, env.msg);
        }
        panic!("messages kept flowing for 10000 deliveries");
    }

    fn tick_all(&mut self, ticks: u64) {
        for _ in 0..ticks {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.core(id).tick();
            }
            self.flush();
        }
    }

    /// Makes `id` leader: everyone else pauses elections while `id` times out.
    fn elect(&mut self, id: NodeId) {
        let others: Vec<NodeId> = self.nodes.keys().copied().filter(|o| *o != id).collect();
        for o in &others {
            self.core(*o).set_elections_paused(true);
        }
        for _ in 0..200 {
            if self.nodes[&id].role() == Role::Leader {
                break;
            }
            self.tick_all(1);
        }
        assert_eq!(
            self.nodes[&id].role(),
            Role::Leader,
            "n{id} did not get elected"
        );
        for o in &others {
            self.core(*o).set_elections_paused(false);
        }
        self.flush();
    }

    fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|c| c.role() == Role::Leader)
            .map(|c| c.id())
            .collect()
    }

    fn propose(&mut self, id: NodeId, data: &'static str) -> (Term, Index) {
        let r = self
            .core(id)
            .propose(Bytes::from_static(data.as_bytes()))
            .unwrap();
        self.flush();
        r
    }

    fn take_events(&mut self, id: NodeId) -> Vec<Event> {
        self.events.remove(&id).unwrap_or_default()
    }

    fn commit(&self, id: NodeId) -> Index {
        self.nodes[&id].log().committed()
    }

    fn applied_commands(&self, id: NodeId) -> Vec<Bytes> {
        self.applied
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|e| match &e.payload {
                EntryPayload::Command(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }
}

fn cmd(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

fn entry(term: Term, index: Index) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Command(cmd("x")),
    }
}

fn conf_done(events: &[Event]) -> Option<Result<Index, ConfChangeError>> {
    events.iter().find_map(|e| match e {
        Event::ConfChangeDone(r) => Some(r.clone()),
        _ => None,
    })
}

fn transfer_done(events: &[Event]) -> Option<Result<Transferred, TransferError>> {
    events.iter().find_map(|e| match e {
        Event::TransferDone(r) => Some(r.clone()),
        _ => None,
    })
}

// --------------------------------------------------------------------------
// 20: elections
// --------------------------------------------------------------------------

#[test]
fn t20_single_member_elects_itself_and_commits_once_durable() {
    let mut net = Net::new(1);
    net.hold.insert(1);
    net.tick_all(25);
    assert_eq!(net.leaders(), vec![1]);
    let (_, index) = net.core(1).propose(cmd("a")).unwrap();
    net.flush();
    assert!(
        net.commit(1) < index,
        "nothing commits before the leader's own fsync"
    );
    net.release(1);
    net.tick_all(1);
    assert_eq!(net.commit(1), index);
    assert_eq!(net.applied_commands(1), vec![cmd("a")]);
}

#[test]
fn t20_three_members_elect_one_leader_and_replicate() {
    let mut net = Net::new(3);
    net.tick_all(40);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1, "exactly one leader, got {leaders:?}");
    let l = leaders[0];
    let (_, index) = net.propose(l, "a");
    net.tick_all(3);
    for id in 1..=3 {
        assert_eq!(net.commit(id), index, "n{id} commit");
        assert_eq!(net.applied_commands(id), vec![cmd("a")]);
    }
}

#[test]
fn t20_candidate_with_shorter_log_is_refused() {
    let mut net = Net::new(3);
    net.elect(1);
    net.cut.insert(3);
    net.propose(1, "a");
    net.cut.clear();
    // n3 missed "a": n2 refuses it, so it cannot win even with n1 gone.
    net.crash(1);
    net.core(2).set_elections_paused(true);
    net.tick_all(60);
    assert_ne!(net.nodes[&3].role(), Role::Leader);
    net.core(2).set_elections_paused(false);
    net.tick_all(60);
    assert_eq!(net.leaders(), vec![2]);
}

#[test]
fn t20_pre_vote_keeps_a_returning_member_from_disrupting_the_leader() {
    let mut net = Net::new(3);
    net.elect(1);
    let term = net.nodes[&1].term();
    net.cut.insert(3);
    net.tick_all(100);
    assert_eq!(
        net.nodes[&3].term(),
        term,
        "pre-vote: an isolated member does not raise its term"
    );
    net.cut.clear();
    net.tick_all(5);
    assert_eq!(net.leaders(), vec![1]);
    assert_eq!(net.nodes[&1].term(), term);
}

#[test]
fn t20_followers_that_hear_a_leader_refuse_votes_without_pre_vote_too() {
    let mut net = Net::with_config(3, |c| c.pre_vote = false);
    net.elect(1);
    let term = net.nodes[&1].term();
    // n3 cannot hear the leader but can still reach n2.
    net.blocked.insert((1, 3));
    net.tick_all(60);
    assert_eq!(net.leaders(), vec![1], "n2 stays with its live leader");
    assert_eq!(net.nodes[&2].term(), term, "and does not take n3's term");
}

#[test]
fn t20_equal_log_voter_with_higher_priority_refuses_then_leads() {
    let voters = [
        PeerInfo::new(1),
        PeerInfo::new(2).with_priority(5),
        PeerInfo::new(3),
    ];
    let mut net = Net::with_membership(Membership::with_voters(voters), 1..=3);
    net.tick_all(80);
    assert_eq!(
        net.leaders(),
        vec![2],
        "the higher-priority member ends up leading"
    );
}

#[test]
fn t20_leader_hands_over_to_caught_up_higher_priority_member() {
    let voters = [
        PeerInfo::new(1),
        PeerInfo::new(2),
        PeerInfo::new(3).with_priority(9),
    ];
    let mut net = Net::with_membership(Membership::with_voters(voters), 1..=3);
    net.cut.insert(3);
    net.elect(1);
    net.propose(1, "a");
    net.cut.clear();
    net.tick_all(30);
    assert_eq!(net.leaders(), vec![3]);
    assert_eq!(net.applied_commands(3), vec![cmd("a")]);
}

#[test]
fn t20_check_quorum_makes_an_isolated_leader_step_down() {
    let mut net = Net::new(3);
    net.elect(1);
    net.cut.insert(1);
    net.tick_all(25);
    assert_ne!(net.nodes[&1].role(), Role::Leader);
    assert_eq!(net.leaders().len(), 1, "the majority elected a new leader");
}

#[test]
fn t20_paused_member_never_campaigns_but_still_votes() {
    let mut net = Net::new(3);
    for id in 1..=3 {
        net.core(id).set_elections_paused(true);
    }
    net.tick_all(100);
    assert!(net.leaders().is_empty());
    net.core(2).set_elections_paused(false);
    net.tick_all(40);
    assert_eq!(net.leaders(), vec![2], "paused n1 and n3 voted for n2");
}

/// Raft paper, Figure 8: an entry from an earlier term replicated on a
/// majority must not be committed by counting replicas, because a member with
/// a later-term entry at that index can still be elected and overwrite it.
#[test]
fn t20_figure8_old_term_entry_on_majority_is_not_committed() {
    // n1 led term 2 and got (2, term 2) to n2 only; n5 led term 3 and wrote
    // (2, term 3) nowhere else. Now n1 campaigns in term 4.
    let logs = vec![
        (1, 3, vec![entry(1, 1), entry(2, 2)]),
        (2, 2, vec![entry(1, 1), entry(2, 2)]),
        (3, 1, vec![entry(1, 1)]),
        (4, 1, vec![entry(1, 1)]),
        (5, 3, vec![entry(1, 1), entry(3, 2)]),
    ];
    let m = Membership::with_voters((1..=5).map(PeerInfo::new));
    // One entry per append, so the old entry can reach a follower without
    // the new leader's own no-op.
    let mut net2 = Net::restored(m, logs, |c| c.max_append_bytes = 1);
    net2.cut.extend([4, 5]);
    // n3 gets (2, term 2) but nothing after it: once it holds index 2,
    // appends carrying anything later are dropped.
    net2.filter = Some(Box::new(|net, env| {
        env.to != 3
            || net.nodes[&3].log().last_index() < 2
            || !matches!(&env.msg, Message::AppendEntries(a) if a.entries.iter().any(|e| e.index > 2))
    }));
    net2.elect(1);
    net2.tick_all(3);
    let n3_log = net2.nodes[&3].log();
    assert_eq!(n3_log.term(2), Some(2), "n3 holds the old entry");
    assert_eq!(n3_log.last_index(), 2);
    assert!(
        net2.commit(1) < 2,
        "index 2 (term 2) is on a majority but must not be committed by counting"
    );
    // Now n1 is lost; n5 (last term 3) wins with n3 and n4 and overwrites it.
    net2.crash(1);
    net2.cut.clear();
    net2.filter = None;
    net2.core(2).set_elections_paused(true);
    net2.core(3).set_elections_paused(true);
    net2.core(4).set_elections_paused(true);
    for _ in 0..200 {
        if net2.nodes[&5].role() == Role::Leader {
            break;
        }
        net2.tick_all(1);
    }
    assert_eq!(net2.nodes[&5].role(), Role::Leader);
    net2.tick_all(5);
    for id in 2..=5 {
        assert_eq!(
            net2.nodes[&id].log().term(2),
            Some(3),
            "n{id} has n5's entry at 2"
        );
    }
}

// --------------------------------------------------------------------------
// 30: replication
// --------------------------------------------------------------------------

#[test]
fn t30_divergent_follower_is_truncated_and_backs_up_by_term() {
    // n3 holds a long uncommitted suffix of term 2 that n1 never had.
    let mut n3_log = vec![entry(1, 1)];
    n3_log.extend((2..=30).map(|i| entry(2, i)));
    let logs = vec![
        (1, 3, vec![entry(1, 1), entry(3, 2)]),
        (2, 3, vec![entry(1, 1), entry(3, 2)]),
        (3, 2, n3_log),
    ];
    let mut net = Net::restored(
        Membership::with_voters((1..=3).map(PeerInfo::new)),
        logs,
        |_| {},
    );
    net.elect(1);
    net.tick_all(3);
    let log3 = net.nodes[&3].log();
    assert_eq!(log3.last_index(), net.nodes[&1].log().last_index());
    assert_eq!(log3.term(2), Some(3), "the term-2 suffix is gone");
    let rejections = net
        .delivered
        .iter()
        .filter(|e| {
            e.to == 1
                && matches!(&e.msg, Message::AppendEntriesReply(r) if r.result == AppendResult::Inconsistency)
        })
        .count();
    assert!(
        rejections <= 2,
        "the hint skips the whole conflicting term ({rejections} rejections)"
    );
}

#[test]
fn t30_in_flight_appends_are_bounded() {
    let mut net = Net::with_config(3, |c| {
        c.max_inflight_appends = 2;
        c.max_append_bytes = 1;
    });
    net.elect(1);
    // n3 receives but its replies are lost.
    net.blocked.insert((3, 1));
    net.delivered.clear();
    for _ in 0..10 {
        net.core(1).propose(cmd("p")).unwrap();
    }
    net.flush();
    let to3 = net
        .delivered
        .iter()
        .filter(|e| {
            e.to == 3 && matches!(&e.msg, Message::AppendEntries(a) if !a.entries.is_empty())
        })
        .count();
    assert_eq!(
        to3, 2,
        "at most max_inflight_appends unacknowledged appends"
    );
    net.blocked.clear();
    net.tick_all(15);
    assert_eq!(
        net.nodes[&3].log().last_index(),
        net.nodes[&1].log().last_index()
    );
}

#[test]
fn t30_compacted_leader_asks_for_a_snapshot_and_follower_installs_it() {
    let mut net = Net::new(3);
    net.elect(1);
    net.cut.insert(3);
    for _ in 0..5 {
        net.propose(1, "a");
    }
    let commit = net.commit(1);
    net.core(1).compact(commit);
    // Storage purged the entries too: only the snapshot can help n3.
    net.purge(1, commit);
    net.cut.clear();
    net.tick_all(2);
    assert!(!net.fetches.is_empty(), "storage was asked first");
    assert!(net.snapshot_requests.contains(&(1, 3)));
    // The shell streams the snapshot, then hands it to n3's core.
    let meta = net.nodes[&1].snapshot_meta(commit).unwrap();
    let term = net.nodes[&1].term();
    net.core(3).step(
        1,
        Message::InstallSnapshot(InstallSnapshot {
            term,
            meta: meta.clone(),
        }),
    );
    net.flush();
    assert_eq!(net.nodes[&3].log().snapshot_index(), commit);
    assert_eq!(net.disks[&3].snapshot, meta);
    let (_, index) = net.propose(1, "b");
    net.tick_all(3);
    assert_eq!(net.commit(3), index);
}

#[test]
fn t30_follower_acknowledges_only_after_its_fsync() {
    let mut net = Net::new(3);
    net.elect(1);
    net.cut.insert(3);
    net.hold.insert(2);
    let (_, index) = net.propose(1, "a");
    assert!(net.commit(1) < index, "n2 has not persisted: no quorum yet");
    net.release(2);
    assert_eq!(net.commit(1), index);
}

// --------------------------------------------------------------------------
// 40: membership
// --------------------------------------------------------------------------

fn add_voter(id: NodeId) -> ConfChangeRequest {
    ConfChangeRequest {
        mode: ConfChangeMode::Add,
        voters: vec![PeerInfo::new(id)],
        listeners: vec![],
    }
}

#[test]
fn t40_new_voter_is_staged_then_joint_then_final() {
    let mut net = Net::new(3);
    net.elect(1);
    for _ in 0..5 {
        net.propose(1, "a");
    }
    net.add_empty(4);
    net.core(1).change_membership(add_voter(4)).unwrap();
    net.flush();
    net.tick_all(5);
    let done = conf_done(&net.take_events(1)).expect("change finished");
    let index = done.unwrap();
    for id in 1..=4 {
        let m = net.nodes[&id].membership();
        assert!(!m.is_joint(), "n{id} left the joint membership");
        assert_eq!(
            m.voters.keys().copied().collect::<Vec<_>>(),
            vec![1, 2, 3, 4],
            "n{id}"
        );
    }
    // The joint entry came before the final one.
    let log = net.nodes[&1].log();
    let joint = (1..index).any(|i| {
        matches!(log.get(i).map(|e| &e.payload), Some(EntryPayload::Membership(m)) if m.is_joint())
    });
    assert!(joint, "joint consensus was used");
    assert_eq!(
        net.applied_commands(4).len(),
        5,
        "the new member has the whole log"
    );
}

#[test]
fn t40_staged_member_that_makes_no_progress_fails_the_change_cleanly() {
    let mut net = Net::new(3);
    net.elect(1);
    // Member 4 never starts.
    net.core(1).change_membership(add_voter(4)).unwrap();
    net.flush();
    net.tick_all(40);
    let done = conf_done(&net.take_events(1)).expect("change ended");
    assert_eq!(
        done,
        Err(ConfChangeError::StagingTimeout { peers: vec![4] })
    );
    assert_eq!(
        net.nodes[&1].membership().voters.len(),
        3,
        "membership unchanged"
    );
    assert!(
        net.nodes[&1].progress().iter().all(|(id, ..)| *id != 4),
        "staged progress dropped"
    );
    // The group works and another change may start.
    net.propose(1, "a");
    net.add_empty(5);
    net.core(1).change_membership(add_voter(5)).unwrap();
    net.tick_all(10);
    assert_eq!(
        conf_done(&net.take_events(1)),
        Some(Ok(net.nodes[&1].log().membership_index()))
    );
}

#[test]
fn t40_one_change_at_a_time_and_compare_and_set_mismatch() {
    let mut net = Net::new(3);
    net.elect(1);
    net.core(1).change_membership(add_voter(4)).unwrap();
    assert_eq!(
        net.core(1).change_membership(add_voter(5)),
        Err(ConfChangeError::InProgress)
    );
    let mut net = Net::new(3);
    net.elect(1);
    let wrong = ConfChangeRequest {
        mode: ConfChangeMode::CompareAndSet {
            voters: vec![PeerInfo::new(1)],
            listeners: vec![],
        },
        voters: vec![PeerInfo::new(1), PeerInfo::new(2)],
        listeners: vec![],
    };
    assert!(matches!(
        net.core(1).change_membership(wrong),
        Err(ConfChangeError::CompareMismatch { .. })
    ));
    assert!(matches!(
        net.core(2).change_membership(add_voter(4)),
        Err(ConfChangeError::NotLeader { leader: Some(1) })
    ));
}

#[test]
fn t40_invalid_memberships_are_refused_with_the_reason() {
    let mut net = Net::new(3);
    net.elect(1);
    let none = ConfChangeRequest {
        mode: ConfChangeMode::SetUnconditionally,
        voters: vec![],
        listeners: vec![],
    };
    assert_eq!(
        net.core(1).change_membership(none),
        Err(MembershipError::NoVoters.into())
    );
    let dup = ConfChangeRequest {
        mode: ConfChangeMode::SetUnconditionally,
        voters: vec![PeerInfo::new(1), PeerInfo::new(1)],
        listeners: vec![],
    };
    assert_eq!(
        net.core(1).change_membership(dup),
        Err(MembershipError::DuplicateId(1).into())
    );
    let both = ConfChangeRequest {
        mode: ConfChangeMode::SetUnconditionally,
        voters: vec![PeerInfo::new(1)],
        listeners: vec![PeerInfo::new(1)],
    };
    assert_eq!(
        net.core(1).change_membership(both),
        Err(MembershipError::VoterAndListener(1).into())
    );
}

#[test]
fn t40_removed_leader_steps_down_once_the_change_commits() {
    let mut net = Net::new(3);
    net.elect(1);
    let req = ConfChangeRequest {
        mode: ConfChangeMode::SetUnconditionally,
        voters: vec![PeerInfo::new(2), PeerInfo::new(3)],
        listeners: vec![],
    };
    net.core(1).change_membership(req).unwrap();
    net.flush();
    assert!(conf_done(&net.take_events(1)).unwrap().is_ok());
    assert_ne!(net.nodes[&1].role(), Role::Leader);
    net.tick_all(40);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    assert_ne!(leaders[0], 1, "a removed member never campaigns");
    let (_, index) = net.propose(leaders[0], "after");
    assert_eq!(net.commit(leaders[0]), index);
}

#[test]
fn t40_listener_gets_the_log_never_votes_and_can_be_promoted() {
    let mut net = Net::new(3);
    net.elect(1);
    net.add_empty(4);
    let req = ConfChangeRequest {
        mode: ConfChangeMode::Add,
        voters: vec![],
        listeners: vec![PeerInfo::new(4)],
    };
    net.core(1).change_membership(req).unwrap();
    net.tick_all(5);
    assert!(conf_done(&net.take_events(1)).unwrap().is_ok());
    assert!(net.nodes[&1].membership().is_listener(4));
    net.propose(1, "a");
    net.tick_all(3);
    assert_eq!(net.applied_commands(4), vec![cmd("a")]);
    // A listener does not count: with two voters down, nothing commits.
    net.cut.extend([2, 3]);
    let (_, index) = net.propose(1, "b");
    assert!(net.commit(1) < index);
    net.cut.clear();
    net.tick_all(3);
    // Promotion through Add.
    net.core(1).change_membership(add_voter(4)).unwrap();
    net.tick_all(5);
    assert!(conf_done(&net.take_events(1)).unwrap().is_ok());
    assert!(net.nodes[&1].membership().voters.contains_key(&4));
    assert!(!net.nodes[&1].membership().listeners.contains_key(&4));
}

#[test]
fn t40_new_leader_finishes_a_joint_change_it_inherits() {
    let mut net = Net::new(3);
    net.elect(1);
    net.add_empty(4);
    // n4 is a caught-up listener first, so promoting it needs no staging and
    // the joint entry is appended at once.
    let listener = ConfChangeRequest {
        mode: ConfChangeMode::Add,
        voters: vec![],
        listeners: vec![PeerInfo::new(4)],
    };
    net.core(1).change_membership(listener).unwrap();
    net.tick_all(5);
    assert!(conf_done(&net.take_events(1)).unwrap().is_ok());
    // The joint entry reaches everyone, but n1 never hears back.
    net.blocked.extend([(2, 1), (3, 1), (4, 1)]);
    net.core(1).change_membership(add_voter(4)).unwrap();
    net.flush();
    assert!(
        net.nodes[&2].membership().is_joint(),
        "n2 has the joint membership"
    );
    net.crash(1);
    net.blocked.clear();
    net.tick_all(60);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    for id in 2..=4 {
        let m = net.nodes[&id].membership();
        assert!(!m.is_joint(), "n{id} moved on to the final membership");
        assert!(m.voters.contains_key(&4));
    }
}

// --------------------------------------------------------------------------
// 50: leadership transfer
// --------------------------------------------------------------------------

#[test]
fn t50_transfer_to_caught_up_follower_refuses_writes_meanwhile() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    net.blocked.insert((1, 2)); // hold the StartElection back for a moment
    net.core(1).transfer_leadership(Some(2), 20).unwrap();
    assert_eq!(
        net.core(1).propose(cmd("b")),
        Err(ProposeError::SteppingDown)
    );
    net.blocked.clear();
    net.tick_all(3);
    assert_eq!(net.leaders(), vec![2]);
    let done = transfer_done(&net.take_events(1)).expect("transfer reported");
    assert_eq!(done.unwrap().target, 2);
}

#[test]
fn t50_transfer_waits_until_the_target_holds_the_last_entry() {
    let mut net = Net::new(3);
    net.elect(1);
    net.cut.insert(3);
    for _ in 0..3 {
        net.propose(1, "a");
    }
    net.cut.clear();
    net.core(1).transfer_leadership(Some(3), 40).unwrap();
    // The lost appends are retransmitted after `retransmit_ticks`.
    net.tick_all(20);
    assert_eq!(net.leaders(), vec![3], "n3 caught up, then took over");
    assert_eq!(net.applied_commands(3).len(), 3);
}

#[test]
fn t50_transfer_times_out_and_the_leader_serves_again() {
    let mut net = Net::new(3);
    net.elect(1);
    net.cut.insert(3);
    net.core(1).transfer_leadership(Some(3), 10).unwrap();
    net.tick_all(12);
    assert_eq!(
        transfer_done(&net.take_events(1)),
        Some(Err(TransferError::Timeout { target: 3 }))
    );
    assert_eq!(net.leaders(), vec![1]);
    assert!(net.core(1).propose(cmd("ok")).is_ok());
}

#[test]
fn t50_transfer_errors_and_step_down_picks_the_best_voter() {
    let mut net = Net::new(3);
    net.elect(1);
    assert_eq!(
        net.core(1).transfer_leadership(Some(9), 10),
        Err(TransferError::NotAVoter(9))
    );
    assert_eq!(
        net.core(2).transfer_leadership(Some(3), 10),
        Err(TransferError::NotLeader { leader: Some(1) })
    );
    net.cut.insert(3);
    net.propose(1, "a");
    net.core(1).transfer_leadership(None, 20).unwrap();
    assert_eq!(
        net.core(1).transfer_leadership(None, 20),
        Err(TransferError::InProgress)
    );
    net.tick_all(3);
    assert_eq!(
        net.leaders(),
        vec![2],
        "step-down hands over to the caught-up n2, not n3"
    );
}

#[test]
fn t50_transfer_refused_during_a_membership_change() {
    let mut net = Net::new(3);
    net.elect(1);
    net.core(1).change_membership(add_voter(4)).unwrap();
    assert_eq!(
        net.core(1).transfer_leadership(Some(2), 10),
        Err(TransferError::MembershipChanging)
    );
}

// --------------------------------------------------------------------------
// 60: reads
// --------------------------------------------------------------------------

fn read_ready(events: &[Event], ctx: u64) -> Option<Index> {
    events.iter().find_map(|e| match e {
        Event::ReadReady { ctx: c, index } if *c == ctx => Some(*index),
        _ => None,
    })
}

#[test]
fn t60_read_index_waits_for_a_heartbeat_quorum() {
    let mut net = Net::new(3);
    net.elect(1);
    let (_, index) = net.propose(1, "a");
    net.cut.extend([2, 3]);
    net.core(1).read_index(7);
    net.flush();
    assert_eq!(
        read_ready(&net.take_events(1), 7),
        None,
        "no quorum, no read"
    );
    net.cut.clear();
    net.tick_all(2);
    assert_eq!(read_ready(&net.take_events(1), 7), Some(index));
}

#[test]
fn t60_follower_read_index_goes_through_the_leader() {
    let mut net = Net::new(3);
    net.elect(1);
    let (_, index) = net.propose(1, "a");
    net.core(3).read_index(11);
    net.flush();
    assert_eq!(read_ready(&net.take_events(3), 11), Some(index));
    // Without a known leader it fails at once.
    let mut lone = Net::new(3);
    lone.core(2).read_index(12);
    lone.flush();
    assert!(
        lone.take_events(2)
            .iter()
            .any(|e| matches!(e, Event::ReadFailed { ctx: 12, .. }))
    );
}

#[test]
fn t60_lease_serves_reads_without_a_round_and_expires() {
    let mut net = Net::with_config(3, |c| c.leader_lease = true);
    net.elect(1);
    net.propose(1, "a");
    net.tick_all(2);
    net.delivered.clear();
    net.core(1).read_index(1);
    let ready = net.core(1).take_ready();
    assert!(
        read_ready(&ready.events, 1).is_some(),
        "answered within the lease"
    );
    assert!(ready.messages.is_empty(), "without a heartbeat round");
    // Cut off, the lease runs out before any other leader can be elected.
    net.cut.extend([2, 3]);
    net.tick_all(8);
    net.core(1).read_index(2);
    let ready = net.core(1).take_ready();
    assert!(read_ready(&ready.events, 2).is_none(), "lease expired");
}

#[test]
fn t60_new_leader_reads_wait_until_it_commits_in_its_term() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    net.crash(1);
    // n3 votes for n2 but never receives its appends.
    net.filter = Some(Box::new(|_, env| {
        !(env.from == 2 && env.to == 3 && matches!(env.msg, Message::AppendEntries(_)))
    }));
    net.elect(2);
    // n2 cannot commit its no-op without n3 (n1 is down).
    net.core(2).read_index(5);
    net.flush();
    assert_eq!(read_ready(&net.take_events(2), 5), None);
    net.filter = None;
    net.tick_all(3);
    assert!(read_ready(&net.take_events(2), 5).is_some());
}

// --------------------------------------------------------------------------
// 70: restarts
// --------------------------------------------------------------------------

#[test]
fn t70_restart_keeps_exactly_what_was_durable() {
    let mut net = Net::new(3);
    net.elect(1);
    let (_, durable) = net.propose(1, "a");
    net.hold.insert(1);
    net.cut.extend([2, 3]);
    net.core(1).propose(cmd("lost")).unwrap();
    net.flush();
    net.crash(1);
    net.start(1, cfg(1));
    let log = net.nodes[&1].log();
    assert_eq!(
        log.last_index(),
        durable,
        "the unsynced entry is gone, the synced one stays"
    );
    assert_eq!(net.nodes[&1].hard_state(), net.disks[&1].hard_state);
}

// --------------------------------------------------------------------------
// 90: quiet groups
// --------------------------------------------------------------------------

fn quiet(net: &Net) -> Vec<NodeId> {
    net.nodes
        .values()
        .filter(|c| c.is_quiet())
        .map(|c| c.id())
        .collect()
}

/// Three members, n1 leading, "a" written, then idle until all are quiet.
fn quiet_group() -> Net {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    net.tick_all(30);
    assert_eq!(quiet(&net), vec![1, 2, 3]);
    net
}

#[test]
fn t90_an_idle_group_goes_quiet_and_a_write_wakes_it() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    assert!(quiet(&net).is_empty(), "just written: awake");
    net.tick_all(30);
    assert_eq!(quiet(&net), vec![1, 2, 3], "idle for an election timeout");
    // Quiet: only the rare quiet heartbeat and its replies.
    net.delivered.clear();
    net.tick_all(120);
    assert_eq!(
        net.delivered.len(),
        8,
        "two quiet heartbeats to two followers and their replies in 120 ticks (awake: 240)"
    );
    assert_eq!(net.leaders(), vec![1]);
    let (_, index) = net.propose(1, "b");
    assert_eq!(
        net.commit(1),
        index,
        "a write to a quiet group commits at once"
    );
    assert!(quiet(&net).is_empty(), "and wakes every member");
    net.tick_all(30);
    assert_eq!(quiet(&net), vec![1, 2, 3], "quiet again");
    assert_eq!(net.applied_commands(3), vec![cmd("a"), cmd("b")]);
}

#[test]
fn t90_quiet_followers_of_a_dead_leader_elect_once_woken_or_after_their_long_timeout() {
    for woken in [true, false] {
        let mut net = quiet_group();
        let term = net.nodes[&1].term();
        net.crash(1);
        net.tick_all(100);
        assert!(net.leaders().is_empty(), "quiet followers keep no timer");
        assert_eq!(net.nodes[&2].term(), term);
        if woken {
            // What node liveness does when the leader's node stops answering.
            net.core(2).wake();
            net.core(3).wake();
            net.tick_all(45);
        } else {
            net.tick_all(150);
        }
        assert_eq!(net.leaders().len(), 1, "woken={woken}: a new leader");
        let l = net.leaders()[0];
        net.propose(l, "b");
        net.tick_all(2);
        assert_eq!(net.applied_commands(2), vec![cmd("a"), cmd("b")]);
    }
}

#[test]
fn t90_a_cut_off_quiet_leader_is_replaced_and_steps_down_when_it_returns() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    net.tick_all(30);
    net.cut.insert(1);
    for id in 1..=3 {
        net.core(id).wake();
    }
    net.tick_all(60);
    let new = net
        .leaders()
        .into_iter()
        .filter(|l| *l != 1)
        .collect::<Vec<_>>();
    assert_eq!(new.len(), 1, "the majority elected a leader");
    assert_ne!(
        net.nodes[&1].role(),
        Role::Leader,
        "awake, the old leader's check-quorum ran"
    );
    net.cut.clear();
    net.tick_all(5);
    assert_eq!(net.leaders(), new);
}

#[test]
fn t90_a_lagging_follower_keeps_the_group_awake_until_it_caught_up() {
    let mut net = Net::new(3);
    net.elect(1);
    net.cut.insert(3);
    net.propose(1, "a");
    net.tick_all(60);
    assert!(
        quiet(&net).is_empty(),
        "a member without the whole log needs heartbeats and retries"
    );
    net.cut.clear();
    net.tick_all(40);
    assert_eq!(quiet(&net), vec![1, 2, 3]);
    assert_eq!(net.applied_commands(3), vec![cmd("a")]);
}

#[test]
fn t90_a_restarted_follower_wakes_the_quiet_leader_without_disturbing_it() {
    let mut net = quiet_group();
    let term = net.nodes[&1].term();
    net.crash(3);
    net.start(3, cfg(3));
    // n3 starts awake without a leader; its pre-vote is refused (n2 is
    // sticky to its quiet leader) and wakes the leader, whose heartbeat
    // n3 then follows.
    net.tick_all(40);
    assert_eq!(net.leaders(), vec![1]);
    assert_eq!(net.nodes[&3].leader(), Some(1));
    assert_eq!(net.nodes[&3].term(), term, "no term was raised");
    net.tick_all(40);
    assert_eq!(quiet(&net), vec![1, 2, 3], "quiet again");
}

#[test]
fn t90_reads_and_changes_wake_a_quiet_leader_and_are_served_normally() {
    let mut net = Net::with_config(3, |c| c.leader_lease = true);
    net.elect(1);
    let (_, index) = net.propose(1, "a");
    net.tick_all(30);
    assert_eq!(quiet(&net), vec![1, 2, 3]);
    net.tick_all(37);
    net.core(1).read_index(9);
    let ready = net.core(1).take_ready();
    assert!(
        read_ready(&ready.events, 9).is_none(),
        "the lease ran out while quiet: a heartbeat round first"
    );
    for m in ready.messages {
        net.queue.push_back(m);
    }
    net.flush();
    net.tick_all(2);
    assert_eq!(read_ready(&net.take_events(1), 9), Some(index));
    assert!(!net.nodes[&1].is_quiet());
    net.tick_all(30);
    assert_eq!(quiet(&net), vec![1, 2, 3]);
    net.core(1).transfer_leadership(Some(2), 20).unwrap();
    net.tick_all(10);
    assert_eq!(
        net.leaders(),
        vec![2],
        "a transfer wakes the group and completes"
    );
}

#[test]
fn t90_tick_by_on_a_quiet_member_is_many_ticks_at_once() {
    let mut net = quiet_group();
    net.crash(1);
    // The quiet follower's backstop timeout (200 ticks, counted from its
    // last quiet heartbeat less than 30 ticks ago) passes in one call.
    net.core(2).tick_by(150);
    assert!(net.nodes[&2].is_quiet());
    net.core(2).tick_by(60);
    assert!(!net.nodes[&2].is_quiet(), "woken by its own timeout");
    // The quiet leader's heartbeat is due every 60 ticks, however they come.
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    net.tick_all(30);
    net.delivered.clear();
    net.core(1).tick_by(600);
    net.flush();
    assert_eq!(net.delivered.len(), 4, "one quiet heartbeat round, not ten");
    assert_eq!(quiet(&net), vec![1, 2, 3]);
}

// --------------------------------------------------------------------------
// Regressions from the review of the core's edges: transfer and the lease,
// membership edges, restarts after a snapshot, and what peers may send.
// --------------------------------------------------------------------------

fn is_vote_request(env: &Envelope) -> bool {
    matches!(env.msg, Message::RequestVote(_))
}

#[test]
fn t50_once_start_election_left_the_old_leader_serves_no_lease_read_in_that_term() {
    let mut net = Net::with_config(3, |c| c.leader_lease = true);
    net.elect(1);
    net.propose(1, "a");
    net.tick_all(2);
    // n2 gets the StartElection and campaigns, but its votes go nowhere, so
    // the transfer times out. Its campaign could still win later (a vote
    // request held up in the network), so n1 must not trust old acks.
    net.filter = Some(Box::new(|_, env| !(env.from == 2 && is_vote_request(env))));
    net.blocked.insert((2, 1));
    net.core(1).transfer_leadership(Some(2), 6).unwrap();
    net.flush();
    assert_eq!(
        net.nodes[&2].role(),
        Role::Candidate,
        "n2 got StartElection"
    );
    net.tick_all(7);
    assert_eq!(
        transfer_done(&net.take_events(1)),
        Some(Err(TransferError::Timeout { target: 2 }))
    );
    assert_eq!(net.leaders(), vec![1]);
    net.core(1).read_index(5);
    let ready = net.core(1).take_ready();
    assert!(
        read_ready(&ready.events, 5).is_none(),
        "no lease read after StartElection left in this term"
    );
    // A full round still serves it.
    net.queue.extend(ready.messages);
    net.tick_all(2);
    assert!(read_ready(&net.take_events(1), 5).is_some());
}

#[test]
fn t50_a_transfer_is_reported_done_only_when_its_target_leads() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    // n2 campaigns on StartElection; n1 steps down on its vote request, but
    // neither n1's nor n3's grant reaches n2, so n2 cannot win.
    net.filter = Some(Box::new(|_, env| {
        !(env.to == 2 && matches!(env.msg, Message::RequestVoteReply(_)))
    }));
    net.core(1).transfer_leadership(Some(2), 40).unwrap();
    net.flush();
    assert_ne!(net.nodes[&1].role(), Role::Leader, "n1 stepped down");
    assert_eq!(
        transfer_done(&net.take_events(1)),
        None,
        "stepping down is not success: n2 is not leader"
    );
    net.filter = None;
    net.core(2).set_elections_paused(true);
    for _ in 0..200 {
        if !net.leaders().is_empty() {
            break;
        }
        net.tick_all(1);
    }
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    assert_ne!(leaders[0], 2);
    // The answer comes once another leader is known, or by the deadline.
    net.tick_all(45);
    assert!(
        matches!(
            transfer_done(&net.take_events(1)),
            Some(Err(TransferError::OtherLeader { target: 2, .. }))
                | Some(Err(TransferError::Timeout { target: 2 }))
        ),
        "a transfer that ended with another leader is a failure"
    );
}

#[test]
fn t50_step_down_is_reported_done_when_another_member_leads() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    net.core(1).transfer_leadership(None, 20).unwrap();
    net.tick_all(3);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    assert_ne!(leaders[0], 1);
    let done = transfer_done(&net.take_events(1)).expect("reported");
    assert_eq!(done.unwrap().target, leaders[0]);
}

#[test]
fn t50_a_paused_member_ignores_start_election() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    net.core(2).set_elections_paused(true);
    net.core(1).transfer_leadership(Some(2), 10).unwrap();
    net.tick_all(3);
    assert_eq!(net.leaders(), vec![1], "paused n2 did not campaign");
    assert_eq!(net.nodes[&2].role(), Role::Follower);
}

/// A five-member group whose highest-priority voter n2 hears the leader but
/// cannot reach n3-n5, so it can never win: the hand-over fails every time.
#[test]
fn t50_a_failing_priority_hand_over_backs_off_and_the_group_stays_available() {
    let mut m = Membership::with_voters((1..=5).map(PeerInfo::new));
    m.voters.get_mut(&2).unwrap().priority = 10;
    let mut net = Net::with_membership(m, 1..=5);
    net.elect(1);
    let cut_off = |a: NodeId, b: NodeId| (a == 2 && b >= 3) || (b == 2 && a >= 3);
    net.filter = Some(Box::new(move |_, env| !cut_off(env.from, env.to)));
    let (mut writable, total) = (0, 3000);
    for _ in 0..total {
        net.tick_all(1);
        let leaders = net.leaders();
        // Writes are refused while a hand-over runs; probing with a
        // proposal would itself keep n2 from ever being caught up.
        if let [l] = leaders[..]
            && !net.nodes[&l].status().transferring
        {
            writable += 1;
        }
    }
    assert!(
        writable * 10 >= total * 8,
        "writes were accepted in only {writable} of {total} ticks"
    );
}

#[test]
fn t40_a_removed_member_gets_the_final_configuration_and_stops_campaigning() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    let req = ConfChangeRequest {
        mode: ConfChangeMode::SetUnconditionally,
        voters: vec![PeerInfo::new(1), PeerInfo::new(2)],
        listeners: vec![],
    };
    net.core(1).change_membership(req).unwrap();
    net.tick_all(5);
    assert!(conf_done(&net.take_events(1)).unwrap().is_ok());
    let m3 = net.nodes[&3].membership().clone();
    assert!(!m3.is_joint(), "n3 got the final configuration: {m3:?}");
    assert!(!m3.voters.contains_key(&3));
    assert!(net.nodes[&3].status().removed, "n3 knows it is out");
    net.delivered.clear();
    net.tick_all(100);
    assert!(
        !net.delivered
            .iter()
            .any(|e| e.from == 3 && is_vote_request(e)),
        "a removed member never campaigns"
    );
    assert_eq!(net.leaders(), vec![1]);
}

#[test]
fn t70_a_restart_after_a_snapshot_whose_term_was_not_durable_takes_its_term() {
    let m = Membership::with_voters((1..=3).map(PeerInfo::new));
    let snapshot = SnapshotMeta {
        index: 5,
        term: 4,
        membership: m.clone(),
    };
    let hs = HardState {
        term: 2,
        voted_for: Some(1),
    };
    let mut core = RaftCore::new(cfg(3), hs, snapshot, Vec::new()).unwrap();
    assert_eq!(core.term(), 4, "a snapshot of term 4 proves term 4 began");
    // A stale leader of term 3 is refused.
    let stale = AppendEntries {
        term: 3,
        prev_index: 5,
        prev_term: 4,
        entries: vec![Entry {
            term: 3,
            index: 6,
            payload: EntryPayload::Noop,
        }],
        leader_commit: 6,
        round: 1,
        quiesce: false,
    };
    core.step(1, Message::AppendEntries(stale));
    assert_eq!(core.log().last_index(), 5, "the stale append did not pass");
    let ready = core.take_ready();
    assert_eq!(
        ready.hard_state.map(|h| h.term),
        Some(4),
        "the term is persisted"
    );
}

#[test]
fn t20_a_stale_pre_vote_grant_is_not_counted() {
    let mut net = Net::new(3);
    net.cut.insert(1);
    for _ in 0..40 {
        net.tick_all(1);
        if net.nodes[&1].role() == Role::PreCandidate {
            break;
        }
    }
    assert_eq!(net.nodes[&1].role(), Role::PreCandidate);
    let term = net.nodes[&1].term();
    // Grants from a pre-vote round of an earlier term.
    for from in [2, 3] {
        let reply = RequestVoteReply {
            term,
            pre_vote: true,
            refusal: None,
        };
        net.core(1).step(from, Message::RequestVoteReply(reply));
    }
    assert_eq!(net.nodes[&1].role(), Role::PreCandidate);
    assert_eq!(net.nodes[&1].term(), term);
}

#[test]
fn t60_a_read_index_reply_from_an_earlier_term_fails_the_read_instead_of_hanging() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a");
    let term = net.nodes[&3].term();
    net.blocked.insert((1, 3));
    net.core(3).read_index(9);
    net.flush();
    // n1 is re-elected in a later term before its answer reaches n3.
    let reply = net
        .delivered
        .iter()
        .rev()
        .find(|e| e.to == 3 && matches!(e.msg, Message::ReadIndexReply(_)));
    assert!(reply.is_none(), "the reply was held back");
    let held = net.core(1).take_ready();
    let mut answer = None;
    for env in held.messages.into_iter().chain(held.persisted_messages) {
        if env.to == 3 && matches!(env.msg, Message::ReadIndexReply(_)) {
            answer = Some(env.msg);
        }
    }
    let answer = answer.unwrap_or_else(|| {
        Message::ReadIndexReply(ReadIndexReply {
            term,
            ctx: 9,
            result: Ok(net.commit(1)),
        })
    });
    let commit = net.commit(3);
    let heartbeat = AppendEntries {
        term: term + 1,
        prev_index: commit,
        prev_term: net.nodes[&3].log().term(commit).unwrap(),
        entries: vec![],
        leader_commit: commit,
        round: 99,
        quiesce: false,
    };
    net.core(3).step(1, Message::AppendEntries(heartbeat));
    assert_eq!(net.nodes[&3].leader(), Some(1));
    net.core(3).step(1, answer);
    let events = net.core(3).take_ready().events;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::ReadFailed { ctx: 9, .. })),
        "the read is answered, not left hanging: {events:?}"
    );
}

#[test]
fn t30_impossible_replies_within_the_wire_bounds_are_ignored() {
    let mut net = Net::new(3);
    net.elect(1);
    let (_, index) = net.propose(1, "a");
    let term = net.nodes[&1].term();
    // A reply to a round the leader never started, claiming more log than
    // the leader has.
    let forged = AppendEntriesReply {
        term,
        result: AppendResult::Success,
        match_index: index + 1_000,
        next_index: index + 1_001,
        conflict_term: 0,
        rejected_prev: 0,
        follower_commit: index,
        round: 1_000_000,
        quiet: false,
        feature_level: 2,
    };
    net.cut.insert(3);
    net.core(1).step(2, Message::AppendEntriesReply(forged));
    net.cut.insert(2);
    // Without a real heartbeat quorum, a read must not be confirmed.
    net.core(1).read_index(3);
    net.tick_all(2);
    assert_eq!(
        read_ready(&net.take_events(1), 3),
        None,
        "no quorum, no read"
    );
    net.cut.clear();
    net.tick_all(4);
    let ev = net.take_events(1);
    assert_eq!(read_ready(&ev, 3), Some(index), "{ev:?}");
    let (_, next) = net.propose(1, "b");
    net.tick_all(2);
    assert_eq!(net.commit(2), next, "replication to n2 goes on");
}

// --------------------------------------------------------------------------
// Cluster level: replicated behaviour waits until every member knows it.
// --------------------------------------------------------------------------

fn level_entries(net: &Net, id: NodeId) -> Vec<u32> {
    net.disks[&id]
        .log
        .values()
        .filter_map(|e| match e.payload {
            EntryPayload::ClusterLevel(l) => Some(l),
            _ => None,
        })
        .collect()
}

#[test]
fn t40_the_cluster_level_rises_only_once_every_member_knows_it() {
    // n3 runs the previous version: it reports no level.
    let current = |id| {
        let mut c = cfg(id);
        c.feature_level = FEATURE_LEVEL;
        c
    };
    let mut net = Net::with_config(3, |c| {
        if c.id != 3 {
            c.feature_level = FEATURE_LEVEL;
        }
    });
    net.elect(1);
    net.propose(1, "a");
    net.tick_all(30);
    for id in 1..=3 {
        assert_eq!(net.nodes[&id].status().cluster_level, 1);
        assert!(
            level_entries(&net, id).is_empty(),
            "n{id} never sees a level entry"
        );
    }
    // n3 is upgraded: restarted on the same data with the new version.
    net.crash(3);
    net.start(3, current(3));
    // (A quiet group hears from the restarted member within its long
    // timeout here; on a node, liveness pings wake it at once.)
    for _ in 0..400 {
        if (1..=3).all(|id| net.nodes[&id].status().cluster_level == FEATURE_LEVEL) {
            break;
        }
        net.tick_all(1);
    }
    for id in 1..=3 {
        assert_eq!(
            net.nodes[&id].status().cluster_level,
            FEATURE_LEVEL,
            "n{id}"
        );
        assert_eq!(
            level_entries(&net, id),
            vec![FEATURE_LEVEL],
            "raised once, n{id}"
        );
    }
    // A member of the previous version cannot join a group past its level:
    // it stays staged and the change times out.
    net.disks.insert(4, Disk::default());
    let mut old = cfg(4);
    old.feature_level = 1;
    net.start(4, old);
    net.core(1).change_membership(add_voter(4)).unwrap();
    net.tick_all(40);
    assert!(matches!(
        conf_done(&net.take_events(1)),
        Some(Err(ConfChangeError::StagingTimeout { .. }))
    ));
    assert!(!net.nodes[&1].membership().voters.contains_key(&4));
    // Nor as a listener, which used to be added at once.
    let listener = ConfChangeRequest {
        mode: ConfChangeMode::Add,
        voters: vec![],
        listeners: vec![PeerInfo::new(4)],
    };
    net.core(1).change_membership(listener.clone()).unwrap();
    net.tick_all(40);
    assert!(matches!(
        conf_done(&net.take_events(1)),
        Some(Err(ConfChangeError::StagingTimeout { .. }))
    ));
    assert!(!net.nodes[&1].membership().contains(4));
    // Upgraded, it is admitted.
    net.crash(4);
    net.start(4, current(4));
    net.core(1).change_membership(listener).unwrap();
    net.tick_all(20);
    assert!(conf_done(&net.take_events(1)).unwrap().is_ok());
    assert!(net.nodes[&1].membership().is_listener(4));
}

#[test]
fn t40_a_member_removed_and_added_back_at_once_gets_the_log() {
    // A staged member counts as caught up only with the whole log.
    let mut net = Net::with_config(3, |c| c.staging_catch_up_gap = 0);
    net.elect(1);
    net.propose(1, "a");
    let remove = ConfChangeRequest {
        mode: ConfChangeMode::SetUnconditionally,
        voters: vec![PeerInfo::new(1), PeerInfo::new(2)],
        listeners: vec![],
    };
    // n3 hears nothing more, so it stays departing on the leader (for two
    // staging timeouts, 60 ticks).
    net.cut.insert(3);
    net.core(1).change_membership(remove).unwrap();
    net.tick_all(50);
    assert!(conf_done(&net.take_events(1)).unwrap().is_ok());
    // Added back while still departing, and unreachable past the end of
    // its departure but within the staging timeout.
    net.core(1).change_membership(add_voter(3)).unwrap();
    net.tick_all(15);
    net.cut.clear();
    net.tick_all(20);
    assert!(
        conf_done(&net.take_events(1)).is_some_and(|r| r.is_ok()),
        "the staged member was replicated to and caught up"
    );
    assert!(net.nodes[&1].membership().voters.contains_key(&3));
}

// --------------------------------------------------------------------------
// Followers behind the snapshot, served from storage
// --------------------------------------------------------------------------

/// `net` with n1 leading and n3 cut off while `writes` entries commit; n1
/// then snapshots at the commit index and forgets the entries in memory
/// (storage keeps them). Returns the commit index.
fn n3_behind_the_snapshot(net: &mut Net, writes: usize) -> Index {
    net.elect(1);
    net.cut.insert(3);
    for _ in 0..writes {
        net.propose(1, "a");
    }
    let commit = net.commit(1);
    net.core(1).compact(commit);
    commit
}

#[test]
fn t30_a_follower_behind_the_snapshot_gets_entries_from_storage_not_the_snapshot() {
    let mut net = Net::with_config(3, |c| c.max_append_bytes = 200);
    let commit = n3_behind_the_snapshot(&mut net, 40);
    assert!(net.nodes[&1].log().term(commit - 10).is_none());
    net.cut.clear();
    let (_, index) = net.propose(1, "b");
    net.tick_all(10);
    assert_eq!(net.commit(3), index, "n3 caught up");
    assert!(net.snapshot_requests.is_empty(), "without a snapshot");
    assert!(
        net.fetches.len() > 1,
        "in several bounded reads: {:?}",
        net.fetches
    );
    assert!(
        net.fetches
            .iter()
            .all(|(id, f)| *id == 1 && f.to == 3 && f.hi == commit)
    );
    assert_eq!(
        net.applied_commands(3).len(),
        41,
        "every entry applied once"
    );
}

#[test]
fn t30_a_fetch_that_finds_the_entries_purged_falls_back_to_the_snapshot() {
    let mut net = Net::new(3);
    let commit = n3_behind_the_snapshot(&mut net, 10);
    // Purged between the fetch being asked for and being read: n3 needs
    // entry 2 on, storage kept only the last few.
    net.purge(1, commit - 3);
    net.cut.clear();
    net.tick_all(2);
    assert_eq!(net.fetches.len(), 1);
    assert!(net.snapshot_requests.contains(&(1, 3)));
}

#[test]
fn t30_a_late_fetch_answer_is_ignored_and_the_follower_is_served_afresh() {
    let mut net = Net::new(3);
    let commit = n3_behind_the_snapshot(&mut net, 10);
    // An answer for a fetch nobody asked for (or one given up) is ignored.
    let stale = net.read_disk(
        1,
        Fetch {
            to: 3,
            prev: 3,
            hi: commit,
            max_bytes: 1 << 20,
        },
    );
    net.core(1).fetched(3, 3, stale);
    net.cut.clear();
    net.tick_all(5);
    assert_eq!(net.commit(3), commit);
    assert!(net.snapshot_requests.is_empty());
}

#[test]
fn t30_a_follower_waiting_for_a_slow_storage_read_still_hears_heartbeats() {
    let mut net = Net::new(3);
    n3_behind_the_snapshot(&mut net, 10);
    // The read is asked for and never answered.
    net.hold_fetches = true;
    net.cut.clear();
    net.tick_all(60);
    assert_eq!(net.nodes[&3].role(), Role::Follower);
    assert_eq!(
        net.nodes[&3].leader(),
        Some(1),
        "n3 kept hearing its leader"
    );
    assert_eq!(net.leaders(), vec![1]);
}

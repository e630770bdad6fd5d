//! The retry cache: a retried call gets the first call's reply and is never
//! applied twice.
//!
//! Keyed by (client id, call id). An entry is *pending* from the moment the
//! leader appends the call until it is applied, then *done* with its reply.
//! A retry that finds a pending entry waits for the same log index instead of
//! appending again; one that finds a done entry gets the stored reply.
//!
//! Every member fills the cache when it applies a logged call (the call's ids
//! travel in the log entry), so a new leader already knows the calls its
//! predecessor applied, and a restarted member rebuilds the cache by
//! replaying its log.
//!
//! Two things bound the cache:
//!
//! - **Time.** Done entries expire `ttl_ms` after they were logged:
//!   exactly-once holds within that window, which clients must keep their
//!   retries inside.
//! - **The client's watermark** (the client *session* of the Raft
//!   dissertation, §6.3). A request may say `answered_below = w`: every call
//!   of this client with a lower id has been answered and will never be
//!   retried. The watermark travels in the log entry; applying it drops the
//!   client's done entries below `w`, so a busy client costs the cache only
//!   its calls in flight instead of everything it did in the last minute.
//!   A call below a live watermark that still arrives (a copy the network
//!   held back) is recognised as answered and never applied: the session
//!   remembers `w` for `ttl_ms` after the client's newest call.
//!
//! The done entries and the sessions travel in every snapshot (see
//! [`RetryCache::encode`]): a member that starts from a snapshot, or installs
//! one from the leader, must know the calls the snapshot covers. Otherwise it
//! would apply a duplicate logged after the snapshot that the other members
//! skip (their states would part), and as a leader it would log a retried
//! call again.
//!
//! Time is *log time*: the leader's clock stamped into each logged call
//! (`LoggedCommand.logged_at_ms`). Whether a logged call is a duplicate must
//! be decided identically on every member, so it may depend on the log only,
//! never on a member's own clock. Leaders' clocks differ, so the cache keeps
//! its own clock: the largest log time applied so far, which only moves
//! forward and travels in snapshots. Expiry is checked exactly against it on
//! every lookup; the sweep that frees memory only drops what is expired at
//! that clock, so when it runs changes no answer.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use prost::Message;

use crate::core::Index;

/// The cache as it is stored in a snapshot.
#[derive(Clone, PartialEq, prost::Message)]
struct CacheSnapshot {
    /// Done entries, by client then call.
    #[prost(message, repeated, tag = "1")]
    entries: Vec<CacheSnapshotEntry>,
    /// Watermarks of clients that sent one, by client.
    #[prost(message, repeated, tag = "2")]
    sessions: Vec<CacheSnapshotSession>,
    /// The cache's clock: the largest log time applied.
    #[prost(uint64, tag = "3")]
    clock_ms: u64,
    /// The window the log set (cluster level 2 on); absent before.
    #[prost(uint64, optional, tag = "4")]
    logged_ttl_ms: Option<u64>,
    /// The group's cluster level as applied (0 from older versions: 1).
    #[prost(uint32, tag = "5")]
    cluster_level: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CacheSnapshotEntry {
    #[prost(bytes = "bytes", tag = "1")]
    client: Bytes,
    #[prost(uint64, tag = "2")]
    call: u64,
    #[prost(uint64, tag = "3")]
    index: u64,
    #[prost(uint64, tag = "4")]
    expires_ms: u64,
    /// The state machine's result; absent when it refused the call.
    #[prost(bytes = "bytes", optional, tag = "5")]
    ok: Option<Bytes>,
    #[prost(string, optional, tag = "6")]
    error: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CacheSnapshotSession {
    #[prost(bytes = "bytes", tag = "1")]
    client: Bytes,
    #[prost(uint64, tag = "2")]
    answered_below: u64,
    /// Log time of the client's newest applied call.
    #[prost(uint64, tag = "3")]
    last_ms: u64,
    /// Log time at which the watermark expires; absent in snapshots of
    /// versions that did not store it (then `last_ms` + the window).
    #[prost(uint64, optional, tag = "4")]
    watermark_until_ms: Option<u64>,
}

/// Identifies one call of one client.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CallKey {
    pub client: Bytes,
    pub call: u64,
}

/// What applying a call produced, as the client will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedReply {
    pub index: Index,
    pub result: Result<Bytes, String>,
}

/// The answer to "has this call been seen?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Never seen (or expired): append it.
    New,
    /// Appended at this index, not yet applied: wait for that index.
    Pending { index: Index },
    /// Applied: answer with this.
    Done(CachedReply),
    /// Below the client's watermark: it was answered, its reply is no longer
    /// kept, and it must not be applied again.
    Answered { below: u64 },
}

impl Lookup {
    /// The message a call below its client's watermark gets.
    pub fn answered_message(call: u64, below: u64) -> String {
        format!(
            "call {call} was answered before: the client reported every call below {below} \
             answered, so this is a late copy and is not applied again"
        )
    }
}

#[derive(Debug)]
struct Done {
    reply: CachedReply,
    expires: u64,
}

/// One client's applied calls and watermark.
#[derive(Debug, Default)]
struct Session {
    /// Every call below this was answered; 0 when the client never said.
    answered_below: u64,
    /// Log time of the newest applied call.
    last_ms: u64,
    /// Log time at which the watermark expires: the window in force when the
    /// newest call was applied, past that call. Kept as a time, never
    /// recomputed from the window in force now: the window can change from
    /// call to call (it is the logging leader's), and a watermark that
    /// expired must stay expired whatever window comes next. It depends on
    /// the newest call only, so a member that restored a snapshot without
    /// this session agrees from the client's next call on.
    watermark_until: u64,
    done: BTreeMap<u64, Done>,
    /// (expiry, call) of done entries in completion order, for the sweep.
    /// May name calls already dropped by the watermark.
    order: VecDeque<(u64, u64)>,
}

impl Session {
    fn watermark(&self, now: u64) -> Option<u64> {
        (self.answered_below > 0 && self.watermark_until > now).then_some(self.answered_below)
    }

    /// A call of this client logged at `now` was applied under window `ttl`.
    fn called(&mut self, now: u64, ttl: u64) {
        self.forget_expired(now);
        self.last_ms = self.last_ms.max(now);
        self.watermark_until = self.last_ms.saturating_add(ttl);
    }

    fn done(&self, call: u64, now: u64) -> Option<&Done> {
        self.done.get(&call).filter(|d| d.expires > now)
    }

    /// Drops what expired by `now` and the calls below the watermark;
    /// returns how many done entries went.
    fn trim(&mut self, now: u64) -> usize {
        let before = self.done.len();
        let below = self.answered_below;
        if below > 0 && self.done.first_key_value().is_some_and(|(c, _)| *c < below) {
            self.done = self.done.split_off(&below);
        }
        while let Some(&(at, call)) = self.order.front() {
            if call >= below && at > now && self.done.contains_key(&call) {
                break;
            }
            self.order.pop_front();
            if matches!(self.done.get(&call), Some(d) if d.expires == at && at <= now) {
                self.done.remove(&call);
            }
        }
        before - self.done.len()
    }

    /// Forgets a watermark that expired by `clock`. A session the sweep has
    /// not reached yet must behave exactly like one it freed (or one a
    /// snapshot left out): otherwise a new call would bring the expired
    /// watermark back to life on this member only.
    fn forget_expired(&mut self, clock: u64) {
        if self.watermark(clock).is_none() {
            self.answered_below = 0;
        }
    }

    fn is_idle(&self, now: u64) -> bool {
        self.done.is_empty() && self.watermark(now).is_none()
    }
}

#[derive(Debug)]
pub struct RetryCache {
    sessions: HashMap<Bytes, Session>,
    /// Calls the leader appended and has not seen applied. Only the leader's
    /// bookkeeping: never in a snapshot, never consulted when applying.
    pending: HashMap<CallKey, Index>,
    /// The window in force: this node's `--retry-ttl-ms` until the log sets
    /// one (see [`Self::use_logged_ttl`]).
    ttl_ms: u64,
    /// This node's own window, the one in force at cluster level 1.
    local_ttl_ms: u64,
    /// The window in force came from the log: replicated state.
    ttl_from_log: bool,
    /// The group's cluster level as applied: replicated state.
    level: u32,
    hits: u64,
    /// Done entries held, expired ones not yet swept included.
    done_entries: usize,
    /// The largest log time applied: replicated state, like the entries.
    clock: u64,
    /// Clock reading of the next memory sweep (not replicated: sweeps decide
    /// nothing).
    next_sweep: u64,
}

impl RetryCache {
    pub fn new(ttl_ms: u64) -> Self {
        RetryCache {
            sessions: HashMap::new(),
            pending: HashMap::new(),
            ttl_ms,
            local_ttl_ms: ttl_ms,
            ttl_from_log: false,
            level: 1,
            hits: 0,
            done_entries: 0,
            clock: 0,
            next_sweep: 0,
        }
    }

    /// A `ClusterLevel` entry was applied.
    pub fn raise_level(&mut self, level: u32) {
        self.level = self.level.max(level);
    }

    /// The group's cluster level as applied.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// A logged call carried its leader's window (`0`: none). From cluster
    /// level 2 on it is the window in force, on every member alike, from
    /// this call on; before, each member keeps its own flag, as versions
    /// from before levels do (they ignore the field), so that all members
    /// still decide alike when their flags agree.
    pub fn use_logged_ttl(&mut self, ttl_ms: u64) {
        if self.level >= 2 && ttl_ms > 0 {
            self.ttl_ms = ttl_ms;
            self.ttl_from_log = true;
        }
    }

    /// What the leader knows of a call arriving at `now_ms` by its own clock
    /// (never earlier than the cache's clock). Changes nothing but the hit
    /// count.
    pub fn lookup(&mut self, key: &CallKey, now_ms: u64) -> Lookup {
        let now = now_ms.max(self.clock);
        let found = match self.applied_lookup(key, now) {
            Some(l) => Some(l),
            None => self
                .pending
                .get(key)
                .map(|index| Lookup::Pending { index: *index }),
        };
        match found {
            Some(l) => {
                self.hits += 1;
                l
            }
            None => Lookup::New,
        }
    }

    /// What the applied state says of `key`: done, answered, or nothing.
    fn applied_lookup(&self, key: &CallKey, now: u64) -> Option<Lookup> {
        let s = self.sessions.get(&key.client)?;
        if let Some(d) = s.done(key.call, now) {
            return Some(Lookup::Done(d.reply.clone()));
        }
        match s.watermark(now) {
            Some(below) if key.call < below => Some(Lookup::Answered { below }),
            _ => None,
        }
    }

    /// The leader appended `key` at `index`.
    pub fn appended(&mut self, key: CallKey, index: Index) {
        self.pending.entry(key).or_insert(index);
    }

    /// The call at `index` lost its place (another leader's entry replaced
    /// it); a retry must append it again.
    pub fn abandoned(&mut self, key: &CallKey, index: Index) {
        if self.pending.get(key) == Some(&index) {
            self.pending.remove(key);
        }
    }

    /// Whether the call logged at `logged_at_ms` must not be applied, and
    /// then what its reply is: the first application's result, or an error
    /// for a call below the client's watermark. Check this before giving a
    /// logged call to the state machine; it advances the cache's clock.
    pub fn duplicate(&mut self, key: &CallKey, logged_at_ms: u64) -> Option<Result<Bytes, String>> {
        self.clock = self.clock.max(logged_at_ms);
        self.sweep();
        match self.applied_lookup(key, self.clock)? {
            Lookup::Done(r) => Some(r.result),
            Lookup::Answered { below } => Some(Err(Lookup::answered_message(key.call, below))),
            Lookup::New | Lookup::Pending { .. } => None,
        }
    }

    /// A logged call of `key.client` carried the watermark `answered_below`
    /// (0: none). Applied for every logged call, duplicates included, after
    /// [`Self::duplicate`].
    pub fn client_said(&mut self, key: &CallKey, answered_below: u64) {
        if answered_below == 0 && !self.sessions.contains_key(&key.client) {
            return;
        }
        let s = self.sessions.entry(key.client.clone()).or_default();
        s.called(self.clock, self.ttl_ms);
        if answered_below > s.answered_below {
            s.answered_below = answered_below;
            self.done_entries -= s.trim(self.clock);
        }
    }

    /// The call was applied (on any member, also during replay). The first
    /// application wins: a duplicate logged by a racing retry is answered with
    /// the first result and must not be applied; see [`Self::duplicate`].
    pub fn applied(&mut self, key: CallKey, reply: CachedReply, logged_at_ms: u64) {
        self.pending.remove(&key);
        self.clock = self.clock.max(logged_at_ms);
        let now = self.clock;
        let s = self.sessions.entry(key.client).or_default();
        s.called(now, self.ttl_ms);
        if key.call < s.answered_below {
            return;
        }
        let expires = now.saturating_add(self.ttl_ms);
        match s.done.entry(key.call) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Done { reply, expires });
                self.done_entries += 1;
            }
            // Expired but not swept yet: the call is new again, as it is on
            // a member whose sweep already freed the old entry.
            std::collections::btree_map::Entry::Occupied(mut o) if o.get().expires <= now => {
                o.insert(Done { reply, expires });
            }
            std::collections::btree_map::Entry::Occupied(_) => return,
        }
        s.order.push_back((expires, key.call));
    }

    /// Frees expired entries and idle sessions now and then. Lookups check
    /// expiry exactly against a clock that never goes back, so when this
    /// runs changes no answer.
    fn sweep(&mut self) {
        let now = self.clock;
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now.saturating_add((self.ttl_ms / 8).clamp(1, 5_000));
        let mut freed = 0;
        self.sessions.retain(|_, s| {
            freed += s.trim(now);
            !s.is_idle(now)
        });
        self.done_entries -= freed;
    }

    /// The done entries and watermarks, for a snapshot, in a stable order
    /// (the same cache gives the same bytes). Pending entries are left out:
    /// they belong to log entries after the snapshot, which the log replays.
    pub fn encode(&self) -> Vec<u8> {
        let mut clients: Vec<&Bytes> = self.sessions.keys().collect();
        clients.sort();
        let mut snap = CacheSnapshot {
            clock_ms: self.clock,
            logged_ttl_ms: self.ttl_from_log.then_some(self.ttl_ms),
            cluster_level: self.level,
            ..Default::default()
        };
        // Only what a lookup can still see: the bytes are the same on every
        // member, however its sweeps fell.
        let now = self.clock;
        for client in clients {
            let s = &self.sessions[client];
            for (call, d) in s.done.iter().filter(|(_, d)| d.expires > now) {
                snap.entries.push(CacheSnapshotEntry {
                    client: client.clone(),
                    call: *call,
                    index: d.reply.index,
                    expires_ms: d.expires,
                    ok: d.reply.result.as_ref().ok().cloned(),
                    error: d.reply.result.as_ref().err().cloned(),
                });
            }
            if s.watermark(now).is_some() {
                snap.sessions.push(CacheSnapshotSession {
                    client: client.clone(),
                    answered_below: s.answered_below,
                    last_ms: s.last_ms,
                    watermark_until_ms: Some(s.watermark_until),
                });
            }
        }
        snap.encode_to_vec()
    }

    /// Replaces the applied state with a snapshot's (from [`Self::encode`]);
    /// the leader's pending entries stay.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let snap = CacheSnapshot::decode(bytes).map_err(|e| format!("retry cache: {e}"))?;
        // The replicated settings first: the window decides what follows.
        self.level = snap.cluster_level.max(1);
        (self.ttl_ms, self.ttl_from_log) = match snap.logged_ttl_ms {
            Some(ttl) if self.level >= 2 => (ttl, true),
            _ => (self.local_ttl_ms, false),
        };
        // Snapshots from before the clock was stored: the newest entry's log
        // time is the best guess.
        let clock = match snap.clock_ms {
            0 => snap
                .entries
                .iter()
                .map(|e| e.expires_ms.saturating_sub(self.ttl_ms))
                .max()
                .unwrap_or(0),
            c => c,
        };
        let mut sessions: HashMap<Bytes, Session> = HashMap::new();
        for s in snap.sessions {
            let e = sessions.entry(s.client).or_default();
            e.answered_below = s.answered_below;
            e.last_ms = s.last_ms;
            e.watermark_until = s
                .watermark_until_ms
                .unwrap_or_else(|| s.last_ms.saturating_add(self.ttl_ms));
        }
        let mut order: Vec<(Bytes, u64, u64)> = Vec::with_capacity(snap.entries.len());
        for e in snap.entries {
            let result = match (e.ok, e.error) {
                (Some(ok), None) => Ok(ok),
                (None, Some(err)) => Err(err),
                _ => {
                    return Err(format!(
                        "retry cache: call {} needs exactly one of a result and an error",
                        e.call
                    ));
                }
            };
            order.push((e.client.clone(), e.expires_ms, e.call));
            let reply = CachedReply {
                index: e.index,
                result,
            };
            sessions.entry(e.client).or_default().done.insert(
                e.call,
                Done {
                    reply,
                    expires: e.expires_ms,
                },
            );
        }
        // Completion order is not stored; expiry order serves the sweep.
        order.sort_by_key(|(_, at, call)| (*at, *call));
        for (client, at, call) in order {
            if let Some(s) = sessions.get_mut(&client) {
                s.order.push_back((at, call));
            }
        }
        self.done_entries = sessions.values().map(|s| s.done.len()).sum();
        self.sessions = sessions;
        self.clock = clock;
        self.next_sweep = 0;
        Ok(())
    }

    /// Lookups answered from the cache (for metrics).
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Done entries held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.done_entries
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(call: u64) -> CallKey {
        CallKey {
            client: Bytes::from_static(b"client-1"),
            call,
        }
    }

    fn reply(index: Index) -> CachedReply {
        CachedReply {
            index,
            result: Ok(Bytes::from_static(b"ok")),
        }
    }

    #[test]
    fn retry_waits_for_the_pending_call_then_gets_its_reply() {
        let t0 = 1_000;
        let mut c = RetryCache::new(60_000);
        assert_eq!(c.lookup(&key(1), t0), Lookup::New);
        c.appended(key(1), 7);
        assert_eq!(c.lookup(&key(1), t0), Lookup::Pending { index: 7 });
        c.applied(key(1), reply(7), t0);
        assert_eq!(c.lookup(&key(1), t0), Lookup::Done(reply(7)));
        assert_eq!(c.hits(), 2);
    }

    #[test]
    fn a_duplicate_logged_by_a_race_is_recognised_and_the_first_reply_kept() {
        let t0 = 1_000;
        let mut c = RetryCache::new(60_000);
        c.applied(key(1), reply(7), t0);
        assert_eq!(
            c.duplicate(&key(1), t0 + 5),
            Some(Ok(Bytes::from_static(b"ok")))
        );
        c.applied(key(1), reply(9), t0);
        assert_eq!(c.lookup(&key(1), t0), Lookup::Done(reply(7)));
        assert_eq!(c.duplicate(&key(2), t0), None);
    }

    #[test]
    fn done_entries_expire_after_the_ttl() {
        let t0 = 1_000;
        let mut c = RetryCache::new(10_000);
        c.applied(key(1), reply(1), t0);
        assert!(matches!(c.lookup(&key(1), t0 + 9_999), Lookup::Done(_)));
        assert_eq!(c.lookup(&key(1), t0 + 10_000), Lookup::New);
        assert_eq!(c.duplicate(&key(1), t0 + 10_000), None);
        assert!(c.is_empty(), "the sweep at the new clock freed it");
    }

    #[test]
    fn the_watermark_drops_answered_calls_and_refuses_late_copies() {
        let t0 = 1_000;
        let mut c = RetryCache::new(60_000);
        for call in 1..=100 {
            assert_eq!(c.duplicate(&key(call), t0 + call), None);
            c.client_said(&key(call), call.saturating_sub(3));
            c.applied(key(call), reply(call), t0 + call);
        }
        assert_eq!(c.len(), 4, "only the calls at or above the watermark 97");
        assert_eq!(c.lookup(&key(50), t0 + 200), Lookup::Answered { below: 97 });
        let late = c.duplicate(&key(50), t0 + 200).expect("a late copy");
        assert!(late.unwrap_err().contains("answered before"));
        assert_eq!(c.lookup(&key(98), t0 + 200), Lookup::Done(reply(98)));
        // Another client is untouched by this one's watermark.
        let other = CallKey {
            client: Bytes::from_static(b"client-2"),
            call: 5,
        };
        assert_eq!(c.lookup(&other, t0 + 200), Lookup::New);
        // The watermark lives a ttl past the client's newest call, then the
        // whole session is forgotten.
        assert_eq!(
            c.lookup(&key(50), t0 + 100 + 59_999),
            Lookup::Answered { below: 97 }
        );
        assert_eq!(c.lookup(&key(50), t0 + 100 + 60_000), Lookup::New);
        assert_eq!(c.duplicate(&key(50), t0 + 100 + 60_000), None);
        assert!(c.is_empty() && c.sessions.is_empty());
    }

    #[test]
    fn a_clock_that_goes_back_changes_nothing() {
        // A new leader whose clock is behind stamps earlier log times; the
        // cache's clock stays where it was, so an entry expired once stays
        // expired, whether or not a sweep freed it in between.
        let mut swept = RetryCache::new(10_000);
        let mut unswept = RetryCache::new(10_000);
        swept.applied(key(1), reply(1), 1_000);
        unswept.applied(key(1), reply(1), 1_000);
        swept.duplicate(&key(2), 20_000); // sweeps key 1 away
        unswept.applied(key(2), reply(2), 20_000); // moves the clock only
        assert_eq!(swept.duplicate(&key(1), 5_000), None);
        assert_eq!(unswept.duplicate(&key(1), 5_000), None);
    }

    #[test]
    fn what_expired_is_gone_before_the_sweep_reaches_it() {
        // The sweep runs every ttl/8 of log time; between two sweeps an
        // expired entry or watermark is still in memory and must count for
        // nothing, as on a member that swept it or restored a snapshot
        // without it (found by the proptest in server::apply).
        let mut c = RetryCache::new(1_000);
        assert_eq!(c.duplicate(&key(1), 0), None); // sweeps; next at 125
        c.applied(key(1), reply(1), 0);
        assert_eq!(c.duplicate(&key(2), 990), None); // sweeps; next at 1115
        c.applied(key(2), reply(2), 990);
        assert_eq!(c.duplicate(&key(1), 1_000), None, "expired at 1000");
        c.applied(key(1), reply(3), 1_000);
        assert_eq!(
            c.lookup(&key(1), 1_000),
            Lookup::Done(reply(3)),
            "the new application is remembered"
        );
        assert_eq!(c.len(), 2, "replaced, not added");
        assert_eq!(c.duplicate(&key(9), 3_000), None);
        assert!(c.is_empty(), "the replaced entry's old place is swept too");

        let other = |call| CallKey {
            client: Bytes::from_static(b"client-2"),
            call,
        };
        let mut c = RetryCache::new(1_000);
        assert_eq!(c.duplicate(&other(5), 0), None);
        c.client_said(&other(5), 3);
        c.applied(other(5), reply(5), 0);
        assert_eq!(c.duplicate(&key(1), 990), None); // sweeps; next at 1115
        // The watermark 3 expired at 1000; call 2 is new, and must not bring
        // the old watermark back.
        assert_eq!(c.duplicate(&other(2), 1_000), None);
        c.client_said(&other(2), 0);
        c.applied(other(2), reply(6), 1_000);
        assert_eq!(c.lookup(&other(2), 1_000), Lookup::Done(reply(6)));
        assert_eq!(c.lookup(&other(1), 1_000), Lookup::New);
    }

    #[test]
    fn a_snapshot_carries_done_entries_with_their_expiry() {
        let t0 = 1_000;
        let mut c = RetryCache::new(10_000);
        c.applied(key(1), reply(1), t0);
        c.applied(
            key(2),
            CachedReply {
                index: 2,
                result: Err("refused".into()),
            },
            t0 + 5_000,
        );
        c.appended(key(3), 3);
        let bytes = c.encode();
        let mut d = RetryCache::new(10_000);
        d.appended(key(4), 4);
        d.applied(key(9), reply(9), t0);
        d.restore(&bytes).unwrap();
        assert_eq!(d.lookup(&key(1), t0), Lookup::Done(reply(1)));
        assert!(
            matches!(d.lookup(&key(2), t0), Lookup::Done(CachedReply { result: Err(e), .. }) if e == "refused")
        );
        assert_eq!(
            d.lookup(&key(3), t0),
            Lookup::New,
            "pending entries are not in snapshots"
        );
        assert_eq!(
            d.lookup(&key(4), t0),
            Lookup::Pending { index: 4 },
            "own pending kept"
        );
        assert_eq!(
            d.lookup(&key(9), t0),
            Lookup::New,
            "replaced by the snapshot's"
        );
        assert_eq!(
            d.lookup(&key(1), t0 + 10_000),
            Lookup::New,
            "expiry carried over"
        );
        assert!(matches!(d.lookup(&key(2), t0 + 10_000), Lookup::Done(_)));
        assert!(d.restore(b"\xff\xff").is_err());
    }

    #[test]
    fn a_snapshot_carries_watermarks_and_the_clock_in_a_stable_order() {
        let build = |order: &[u64]| {
            let mut c = RetryCache::new(10_000);
            for &call in order {
                let k = CallKey {
                    client: Bytes::from(format!("client-{}", call % 3)),
                    call,
                };
                c.duplicate(&k, 5_000);
                c.client_said(&k, 2);
                c.applied(k, reply(call), 5_000);
            }
            c
        };
        let a = build(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let b = build(&[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(a.encode(), b.encode(), "same cache, same bytes");
        let mut d = RetryCache::new(10_000);
        d.restore(&a.encode()).unwrap();
        let k1 = CallKey {
            client: Bytes::from_static(b"client-1"),
            call: 1,
        };
        assert_eq!(d.lookup(&k1, 0), Lookup::Answered { below: 2 });
        assert_eq!(d.clock, 5_000, "the clock came along");
        assert_eq!(d.encode(), a.encode());
    }

    #[test]
    fn an_abandoned_call_can_be_appended_again() {
        let t0 = 1_000;
        let mut c = RetryCache::new(60_000);
        c.appended(key(1), 5);
        c.abandoned(&key(1), 4);
        assert_eq!(
            c.lookup(&key(1), t0),
            Lookup::Pending { index: 5 },
            "another index: kept"
        );
        c.abandoned(&key(1), 5);
        assert_eq!(c.lookup(&key(1), t0), Lookup::New);
    }
}

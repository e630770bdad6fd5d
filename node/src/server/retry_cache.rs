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
//! replaying its log. Done entries expire `ttl_ms` after they were logged:
//! exactly-once holds within that window, which clients must keep their
//! retries inside.
//!
//! The done entries travel in every snapshot (see [`RetryCache::encode`]):
//! a member that starts from a snapshot, or installs one from the leader,
//! must know the calls the snapshot covers. Otherwise it would apply a
//! duplicate logged after the snapshot that the other members skip (their
//! states would part), and as a leader it would log a retried call again.
//!
//! Time is *log time*: the leader's clock stamped into each logged call
//! (`LoggedCommand.logged_at_ms`). Whether a logged call is a duplicate must
//! be decided identically on every member, so it may depend on the log only,
//! never on a member's own clock.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use prost::Message;

use crate::core::Index;

/// The done entries as they are stored in a snapshot.
#[derive(Clone, PartialEq, prost::Message)]
struct CacheSnapshot {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<CacheSnapshotEntry>,
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
}

#[derive(Debug)]
enum State {
    Pending { index: Index },
    Done { reply: CachedReply, expires: u64 },
}

#[derive(Debug)]
pub struct RetryCache {
    entries: HashMap<CallKey, State>,
    /// Done entries in completion order, for expiry.
    expiry: VecDeque<(u64, CallKey)>,
    ttl_ms: u64,
    hits: u64,
}

impl RetryCache {
    pub fn new(ttl_ms: u64) -> Self {
        RetryCache {
            entries: HashMap::new(),
            expiry: VecDeque::new(),
            ttl_ms,
            hits: 0,
        }
    }

    /// `now_ms`: the leader's clock when a request arrives, or the log time
    /// of the entry being applied.
    pub fn lookup(&mut self, key: &CallKey, now_ms: u64) -> Lookup {
        self.expire(now_ms);
        match self.entries.get(key) {
            None => Lookup::New,
            Some(State::Pending { index }) => {
                self.hits += 1;
                Lookup::Pending { index: *index }
            }
            Some(State::Done { reply, .. }) => {
                self.hits += 1;
                Lookup::Done(reply.clone())
            }
        }
    }

    /// The leader appended `key` at `index`.
    pub fn appended(&mut self, key: CallKey, index: Index) {
        self.entries.entry(key).or_insert(State::Pending { index });
    }

    /// The call at `index` lost its place (another leader's entry replaced
    /// it); a retry must append it again.
    pub fn abandoned(&mut self, key: &CallKey, index: Index) {
        if matches!(self.entries.get(key), Some(State::Pending { index: i }) if *i == index) {
            self.entries.remove(key);
        }
    }

    /// The call was applied (on any member, also during replay). The first
    /// application wins: a duplicate logged by a racing retry is answered with
    /// the first result and must not be applied; see [`Self::is_duplicate`].
    pub fn applied(&mut self, key: CallKey, reply: CachedReply, logged_at_ms: u64) {
        if matches!(self.entries.get(&key), Some(State::Done { .. })) {
            return;
        }
        let expires = logged_at_ms.saturating_add(self.ttl_ms);
        self.expiry.push_back((expires, key.clone()));
        self.entries.insert(key, State::Done { reply, expires });
    }

    /// Whether the call logged at `logged_at_ms` was applied before: check
    /// this before giving a logged call to the state machine.
    pub fn is_duplicate(&mut self, key: &CallKey, logged_at_ms: u64) -> bool {
        self.expire(logged_at_ms);
        matches!(self.entries.get(key), Some(State::Done { .. }))
    }

    fn expire(&mut self, now: u64) {
        while let Some((at, _)) = self.expiry.front() {
            if *at > now {
                break;
            }
            let (at, key) = self.expiry.pop_front().expect("checked");
            // Only drop the entry this expiry record was made for.
            if matches!(self.entries.get(&key), Some(State::Done { expires, .. }) if *expires == at)
            {
                self.entries.remove(&key);
            }
        }
    }

    /// The done entries, for a snapshot. Pending entries are left out: they
    /// belong to log entries after the snapshot, which the log replays.
    pub fn encode(&self) -> Vec<u8> {
        let mut entries: Vec<CacheSnapshotEntry> = self
            .entries
            .iter()
            .filter_map(|(key, state)| match state {
                State::Done { reply, expires } => Some(CacheSnapshotEntry {
                    client: key.client.clone(),
                    call: key.call,
                    index: reply.index,
                    expires_ms: *expires,
                    ok: reply.result.as_ref().ok().cloned(),
                    error: reply.result.as_ref().err().cloned(),
                }),
                State::Pending { .. } => None,
            })
            .collect();
        // A stable order: the same cache gives the same bytes.
        entries.sort_by(|a, b| (a.index, &a.client, a.call).cmp(&(b.index, &b.client, b.call)));
        CacheSnapshot { entries }.encode_to_vec()
    }

    /// Replaces the done entries with a snapshot's (from [`Self::encode`]);
    /// pending entries stay.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let snap = CacheSnapshot::decode(bytes).map_err(|e| format!("retry cache: {e}"))?;
        self.entries
            .retain(|_, s| matches!(s, State::Pending { .. }));
        let mut expiry = Vec::with_capacity(snap.entries.len());
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
            let key = CallKey {
                client: e.client,
                call: e.call,
            };
            expiry.push((e.expires_ms, key.clone()));
            let reply = CachedReply {
                index: e.index,
                result,
            };
            self.entries.insert(
                key,
                State::Done {
                    reply,
                    expires: e.expires_ms,
                },
            );
        }
        expiry.sort_by_key(|(at, _)| *at);
        self.expiry = expiry.into();
        Ok(())
    }

    /// Lookups answered from the cache (for metrics).
    pub fn hits(&self) -> u64 {
        self.hits
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
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
        assert!(c.is_duplicate(&key(1), t0 + 5));
        c.applied(key(1), reply(9), t0);
        assert_eq!(c.lookup(&key(1), t0), Lookup::Done(reply(7)));
        assert!(!c.is_duplicate(&key(2), t0));
    }

    #[test]
    fn done_entries_expire_after_the_ttl() {
        let t0 = 1_000;
        let mut c = RetryCache::new(10_000);
        c.applied(key(1), reply(1), t0);
        assert!(matches!(c.lookup(&key(1), t0 + 9_999), Lookup::Done(_)));
        assert_eq!(c.lookup(&key(1), t0 + 10_000), Lookup::New);
        assert!(c.is_empty());
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

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
//! replaying its log. Done entries expire after `ttl`: exactly-once holds
//! within that window, which clients must keep their retries inside.
//!
//! Time is passed in, never read here, so tests control it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::core::Index;

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
    Pending {
        index: Index,
    },
    Done {
        reply: CachedReply,
        expires: Instant,
    },
}

#[derive(Debug)]
pub struct RetryCache {
    entries: HashMap<CallKey, State>,
    /// Done entries in completion order, for expiry.
    expiry: VecDeque<(Instant, CallKey)>,
    ttl: Duration,
    hits: u64,
}

impl RetryCache {
    pub fn new(ttl: Duration) -> Self {
        RetryCache {
            entries: HashMap::new(),
            expiry: VecDeque::new(),
            ttl,
            hits: 0,
        }
    }

    pub fn lookup(&mut self, key: &CallKey, now: Instant) -> Lookup {
        self.expire(now);
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
    pub fn applied(&mut self, key: CallKey, reply: CachedReply, now: Instant) {
        if matches!(self.entries.get(&key), Some(State::Done { .. })) {
            return;
        }
        let expires = now + self.ttl;
        self.expiry.push_back((expires, key.clone()));
        self.entries.insert(key, State::Done { reply, expires });
    }

    /// Whether applying `key` again would apply it twice: check this before
    /// giving a logged call to the state machine.
    pub fn is_duplicate(&self, key: &CallKey) -> bool {
        matches!(self.entries.get(key), Some(State::Done { .. }))
    }

    fn expire(&mut self, now: Instant) {
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
        let t0 = Instant::now();
        let mut c = RetryCache::new(Duration::from_secs(60));
        assert_eq!(c.lookup(&key(1), t0), Lookup::New);
        c.appended(key(1), 7);
        assert_eq!(c.lookup(&key(1), t0), Lookup::Pending { index: 7 });
        c.applied(key(1), reply(7), t0);
        assert_eq!(c.lookup(&key(1), t0), Lookup::Done(reply(7)));
        assert_eq!(c.hits(), 2);
    }

    #[test]
    fn a_duplicate_logged_by_a_race_is_recognised_and_the_first_reply_kept() {
        let t0 = Instant::now();
        let mut c = RetryCache::new(Duration::from_secs(60));
        c.applied(key(1), reply(7), t0);
        assert!(c.is_duplicate(&key(1)));
        c.applied(key(1), reply(9), t0);
        assert_eq!(c.lookup(&key(1), t0), Lookup::Done(reply(7)));
        assert!(!c.is_duplicate(&key(2)));
    }

    #[test]
    fn done_entries_expire_after_the_ttl() {
        let t0 = Instant::now();
        let mut c = RetryCache::new(Duration::from_secs(10));
        c.applied(key(1), reply(1), t0);
        assert!(matches!(
            c.lookup(&key(1), t0 + Duration::from_secs(9)),
            Lookup::Done(_)
        ));
        assert_eq!(c.lookup(&key(1), t0 + Duration::from_secs(10)), Lookup::New);
        assert!(c.is_empty());
    }

    #[test]
    fn an_abandoned_call_can_be_appended_again() {
        let t0 = Instant::now();
        let mut c = RetryCache::new(Duration::from_secs(60));
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

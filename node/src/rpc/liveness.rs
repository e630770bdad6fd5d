//! Node liveness: which peers answer, as one ping per peer pair sees it.
//!
//! Quiet groups (see `core::Config::quiesce`) send no heartbeats, so their
//! followers would not notice a dead leader by themselves. Instead every node
//! pings every peer it shares a group with, once per heartbeat interval,
//! whatever the number of groups, and wakes the quiet groups it shares with a
//! peer when that peer
//!
//! - stops answering for longer than the minimum election timeout (their
//!   leader may be gone: the followers' election timers must run again), or
//! - answers again after such a silence, or with a new incarnation because it
//!   restarted (its groups start without a leader and must hear from theirs
//!   before they time out and disturb the group).
//!
//! Waking is never unsafe, only a cost; a missed wake-up is caught by the
//! quiet followers' own long timeout (`core::Config::quiet_timeout_ticks`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::core::NodeId;

/// How often peers are pinged and how long a silence takes a peer for dead.
#[derive(Clone, Copy, Debug)]
pub struct LivenessOptions {
    pub interval: Duration,
    pub dead_after: Duration,
}

impl Default for LivenessOptions {
    /// The node's defaults: the heartbeat interval and the minimum election
    /// timeout of 50 ms ticks.
    fn default() -> Self {
        LivenessOptions {
            interval: Duration::from_millis(100),
            dead_after: Duration::from_millis(500),
        }
    }
}

#[derive(Debug)]
struct PeerState {
    last_heard: Instant,
    alive: bool,
    /// 0 until the peer first answered.
    incarnation: u64,
}

/// What this node knows of its peers' liveness.
#[derive(Debug, Default)]
pub struct Liveness {
    peers: HashMap<NodeId, PeerState>,
}

impl Liveness {
    /// Starts watching `peer` (a peer already watched is unchanged): from
    /// `now` it has `dead_after` to answer.
    pub fn track(&mut self, peer: NodeId, now: Instant) {
        self.peers.entry(peer).or_insert(PeerState {
            last_heard: now,
            alive: true,
            incarnation: 0,
        });
    }

    /// `peer` answered, as `incarnation`. True when that is news: it was
    /// taken for dead, or it restarted since it last answered.
    pub fn heard(&mut self, peer: NodeId, incarnation: u64, now: Instant) -> bool {
        let s = self.peers.entry(peer).or_insert(PeerState {
            last_heard: now,
            alive: true,
            incarnation,
        });
        let news = !s.alive || s.incarnation != incarnation;
        s.alive = true;
        s.incarnation = incarnation;
        s.last_heard = s.last_heard.max(now);
        news
    }

    /// The peers silent for longer than `dead_after` at `now` that were
    /// taken for alive until now.
    pub fn expire(&mut self, now: Instant, dead_after: Duration) -> Vec<NodeId> {
        let mut lost = Vec::new();
        for (id, s) in &mut self.peers {
            if s.alive && now.saturating_duration_since(s.last_heard) > dead_after {
                s.alive = false;
                lost.push(*id);
            }
        }
        lost.sort_unstable();
        lost
    }

    /// Whether `peer` is taken for alive (unknown peers are not).
    #[cfg(test)]
    fn is_alive(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|s| s.alive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_marks_a_peer_dead_once_and_an_answer_or_a_restart_is_news() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let dead_after = ms(500);
        let mut l = Liveness::default();
        l.track(2, t0);
        assert!(l.is_alive(2), "a new peer gets a full window to answer");
        assert!(
            l.heard(2, 7, t0 + ms(10)),
            "the first answer names its incarnation"
        );
        assert!(
            !l.heard(2, 7, t0 + ms(110)),
            "same incarnation, alive: no news"
        );
        assert_eq!(l.expire(t0 + ms(600), dead_after), Vec::<NodeId>::new());
        assert_eq!(l.expire(t0 + ms(611), dead_after), vec![2]);
        assert!(!l.is_alive(2));
        assert!(
            l.expire(t0 + ms(2_000), dead_after).is_empty(),
            "reported once"
        );
        assert!(l.heard(2, 7, t0 + ms(2_100)), "back after a silence");
        assert!(l.is_alive(2));
        assert!(l.heard(2, 9, t0 + ms(2_200)), "restarted without a silence");
        // A reply that was overtaken does not move the clock back.
        assert!(!l.heard(2, 9, t0 + ms(2_150)));
        assert!(l.expire(t0 + ms(2_650), dead_after).is_empty());
        // Tracking an old peer again changes nothing.
        l.track(2, t0 + ms(9_000));
        assert_eq!(l.expire(t0 + ms(9_000), dead_after), vec![2]);
    }
}

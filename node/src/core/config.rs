//! Tuning of one group's consensus core. Time is counted in ticks: the shell
//! decides how long a tick is (the node defaults to 50 ms), the core never
//! reads a clock.

use super::types::NodeId;

/// The cluster level this version knows. A group's cluster level is agreed
/// through its log (a `ClusterLevel` entry, appended once every member
/// reported the level), and replicated behaviour new in a level is on only
/// from that entry on, so members of the previous version, which run in the
/// same group during a rolling upgrade, never decide differently.
///
/// - 1: the behaviour of versions from before levels.
/// - 2: a logged call carries the leader's retry window, and every member
///   judges duplicates by it instead of its own `--retry-ttl-ms`.
pub const FEATURE_LEVEL: u32 = 2;

/// Consensus parameters for one member of one group.
#[derive(Clone, Debug)]
pub struct Config {
    /// This member's id.
    pub id: NodeId,
    /// A follower that hears nothing from a leader for a random number of
    /// ticks in `[min, max)` starts an election. `min` is also the window in
    /// which a follower that heard from a leader refuses to vote for another
    /// candidate (leader stickiness) and the check-quorum period.
    pub election_timeout_min_ticks: u64,
    pub election_timeout_max_ticks: u64,
    /// A leader sends a heartbeat to every member this often.
    pub heartbeat_interval_ticks: u64,
    /// Ask for pre-votes before raising the term, so a member that was cut
    /// off cannot disrupt a healthy leader when it returns.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within
    /// `election_timeout_min_ticks` steps down.
    pub check_quorum: bool,
    /// Serve linearizable reads without a heartbeat round while a quorum
    /// acknowledged the leader less than `lease_ticks` ago, counted from the
    /// start of the acknowledged round.
    ///
    /// Why that is safe, and the assumption it rests on: a follower that
    /// acknowledged the round refuses to help elect anyone else for
    /// `election_timeout_min_ticks` of its own ticks after it received it;
    /// counted in whole ticks that is at least `min − 1` tick lengths of its
    /// real time. The shell derives ticks from a monotonic clock (no tick is
    /// ever lost or invented), so the lease covers at most `lease_ticks` tick
    /// lengths of the leader's real time. The lease is therefore safe while
    /// the two clocks' rates differ by less than
    /// `(min − 1 − lease) / (min − 1 + lease)`: 12.5% with the defaults
    /// (min 10, lease 7). `validate()` refuses a lease with less than one
    /// tick of margin (`lease_ticks > min − 2`). Message delays shorten the
    /// lease, never lengthen it: it starts when the round was sent.
    pub leader_lease: bool,
    pub lease_ticks: u64,
    /// Replication pipeline bounds per follower.
    pub max_inflight_appends: usize,
    pub max_inflight_bytes: usize,
    /// Upper bound on the entries of one append request (at least one entry
    /// is always sent).
    pub max_append_bytes: usize,
    /// An in-flight append unacknowledged for this long is presumed lost and
    /// the follower is probed again.
    pub retransmit_ticks: u64,
    /// A staged member counts as caught up once its match index is within
    /// this many entries of the leader's last index.
    pub staging_catch_up_gap: u64,
    /// A membership change fails when a staged member makes no progress for
    /// this many ticks.
    pub staging_timeout_ticks: u64,
    /// A follower that is being sent a snapshot and does not confirm it within
    /// this many ticks is probed again.
    pub snapshot_timeout_ticks: u64,
    /// Let an idle group go quiet: once every member holds the whole log and
    /// nothing happened for `election_timeout_min_ticks`, the leader stops
    /// heartbeating and the followers stop their election timers. Any write,
    /// read, membership change or message wakes the group. A node with many
    /// groups spends next to nothing on the idle ones; the shell wakes the
    /// quiet groups of a peer that stopped answering (node liveness), so a
    /// dead leader is replaced as fast as in a busy group.
    pub quiesce: bool,
    /// A quiet leader still sends a heartbeat this often, so that a follower
    /// that missed the moment (or restarted) learns who leads.
    pub quiet_heartbeat_ticks: u64,
    /// A quiet follower that hears nothing for this long wakes and starts its
    /// election timer: the backstop when nobody told it the leader is gone.
    pub quiet_timeout_ticks: u64,
    /// Seed for the election-timeout randomisation; the shell passes a random
    /// value, the simulation a deterministic one.
    pub rng_seed: u64,
    /// The cluster level this member knows and reports to its leaders
    /// ([`FEATURE_LEVEL`]; lower only to play a member of an older version
    /// in tests).
    pub feature_level: u32,
}

impl Config {
    /// Defaults for member `id`, tuned for 50 ms ticks: elections after
    /// 0.5-1 s of silence, heartbeats every 100 ms.
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            election_timeout_min_ticks: 10,
            election_timeout_max_ticks: 20,
            heartbeat_interval_ticks: 2,
            pre_vote: true,
            check_quorum: true,
            leader_lease: false,
            lease_ticks: 7,
            max_inflight_appends: 64,
            max_inflight_bytes: 16 << 20,
            max_append_bytes: 1 << 20,
            retransmit_ticks: 10,
            staging_catch_up_gap: 100,
            staging_timeout_ticks: 40,
            snapshot_timeout_ticks: 200,
            quiesce: true,
            quiet_heartbeat_ticks: 60,
            quiet_timeout_ticks: 200,
            rng_seed: id,
            feature_level: FEATURE_LEVEL,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        use ConfigError::*;
        if self.id == 0 {
            return Err(ZeroId);
        }
        if self.heartbeat_interval_ticks == 0 {
            return Err(Invalid("heartbeat_interval_ticks must be at least 1"));
        }
        if self.election_timeout_min_ticks <= self.heartbeat_interval_ticks {
            return Err(Invalid(
                "election_timeout_min_ticks must exceed heartbeat_interval_ticks, \
                 or followers time out between heartbeats",
            ));
        }
        if self.election_timeout_max_ticks <= self.election_timeout_min_ticks {
            return Err(Invalid(
                "election_timeout_max_ticks must exceed election_timeout_min_ticks \
                 (the spread is what breaks split votes)",
            ));
        }
        if self.leader_lease
            && (self.lease_ticks == 0 || self.lease_ticks + 2 > self.election_timeout_min_ticks)
        {
            return Err(Invalid(
                "lease_ticks must be at least 1 and at most election_timeout_min_ticks - 2: \
                 a follower's stickiness is only known to last min - 1 ticks, and the \
                 lease needs a tick of margin for clock drift (raise the election \
                 timeout or turn the lease off)",
            ));
        }
        if self.max_inflight_appends == 0
            || self.max_inflight_bytes == 0
            || self.max_append_bytes == 0
        {
            return Err(Invalid("in-flight and append bounds must be positive"));
        }
        if self.quiesce
            && (self.quiet_heartbeat_ticks < self.heartbeat_interval_ticks
                || self.quiet_timeout_ticks <= 2 * self.quiet_heartbeat_ticks)
        {
            return Err(Invalid(
                "quiet_heartbeat_ticks must be at least heartbeat_interval_ticks and \
                 quiet_timeout_ticks more than twice quiet_heartbeat_ticks, or quiet \
                 followers wake between a quiet leader's heartbeats",
            ));
        }
        if self.retransmit_ticks == 0
            || self.staging_timeout_ticks == 0
            || self.snapshot_timeout_ticks == 0
        {
            return Err(Invalid("timeouts must be at least one tick"));
        }
        Ok(())
    }
}

/// Why a core could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the durable log is inconsistent: {0}")]
    Log(#[from] super::log::RestoreError),
}

/// A configuration the core refuses to run with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("member id 0 is reserved; use a non-zero id")]
    ZeroId,
    #[error("invalid consensus configuration: {0}")]
    Invalid(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_defaults_validate_and_bad_values_are_named() {
        Config::new(1).validate().unwrap();
        let mut c = Config::new(1);
        c.election_timeout_max_ticks = c.election_timeout_min_ticks;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("max_ticks")));
        let mut c = Config::new(1);
        c.leader_lease = true;
        c.lease_ticks = 10;
        assert!(c.validate().is_err());
        // min − 1 is the whole stickiness window: no margin left for drift.
        c.lease_ticks = c.election_timeout_min_ticks - 1;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("margin")));
        c.lease_ticks = c.election_timeout_min_ticks - 2;
        c.validate().unwrap();
        // A short election timeout leaves no room for a lease at all.
        c.election_timeout_min_ticks = 3;
        c.election_timeout_max_ticks = 6;
        c.heartbeat_interval_ticks = 1;
        c.lease_ticks = c.election_timeout_min_ticks * 7 / 10;
        assert!(c.validate().is_err(), "min 3 gives a lease of min - 1");
        assert_eq!(Config::new(0).validate(), Err(ConfigError::ZeroId));
    }
}

//! The group task's one clock: how many ticks the core is told, when the
//! task must wake next, and whether the task was kept from running.
//!
//! Ticks are derived from a monotonic clock, never counted by wake-ups: the
//! core has been told exactly `floor((now - origin) / tick)` ticks whenever
//! it handles a batch. A task that falls behind (a flood of requests, a slow
//! disk, a CPU quota) therefore loses no tick and invents none; it only
//! learns of several at once. That is what the leader lease relies on (see
//! `core::Config::leader_lease`): the lease is counted in ticks, so a tick
//! that went missing would let it outlive real time.
//!
//! A quiet group (see `core::Config::quiesce`) wakes only once per stride;
//! the ticks in between are told in one go when it wakes, for any reason.
//!
//! The clock also notices a stall: the task woke later than the deadline it
//! slept towards by more than the threshold. The process or its runtime was
//! not running (SIGSTOP, a starved or throttled machine); followers may have
//! elected a new leader meanwhile, so a leader steps down before it acts on
//! anything it believed.

use std::time::Duration;

use tokio::time::Instant;

/// A quiet group's task wakes once per this many ticks (a second on the
/// default 50 ms tick) instead of every tick.
pub(super) const QUIET_STRIDE_TICKS: u32 = 20;

#[derive(Debug)]
pub(super) struct Clock {
    tick: Duration,
    origin: Instant,
    /// Ticks told to the core since `origin`.
    told: u64,
    stall_threshold: Duration,
    quiet: bool,
    /// The deadline the task last slept towards.
    deadline: Instant,
}

/// What the task learns from the clock when it wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Advance {
    /// Ticks to pass to the core (`tick_by`) before handling anything.
    pub ticks: u64,
    /// How late the task woke past its deadline, when beyond the threshold.
    pub stalled: Option<Duration>,
}

impl Clock {
    pub(super) fn new(tick: Duration, stall_threshold: Duration, now: Instant) -> Self {
        let tick = tick.max(Duration::from_millis(1));
        Clock {
            tick,
            origin: now,
            told: 0,
            stall_threshold,
            quiet: false,
            deadline: now + tick,
        }
    }

    /// Called first thing whenever the task wakes, whatever woke it.
    pub(super) fn advance(&mut self, now: Instant) -> Advance {
        let elapsed = now.saturating_duration_since(self.origin);
        let total = (elapsed.as_nanos() / self.tick.as_nanos()) as u64;
        let ticks = total.saturating_sub(self.told);
        self.told = self.told.max(total);
        let late = now.saturating_duration_since(self.deadline);
        let stalled = (late > self.stall_threshold).then_some(late);
        if stalled.is_some() {
            // Reported once: the rest of this batch runs on time again.
            self.deadline = now;
        }
        Advance { ticks, stalled }
    }

    /// Whether the core is quiet, which sets how often the task must wake.
    pub(super) fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    /// When the task must wake next if nothing else wakes it: the next tick
    /// boundary, or a stride of ticks later for a quiet group. Remembered,
    /// so that waking late past it counts as a stall.
    pub(super) fn next_deadline(&mut self) -> Instant {
        let ahead = if self.quiet {
            u64::from(QUIET_STRIDE_TICKS)
        } else {
            1
        };
        // In nanoseconds a u64 lasts centuries of ticks.
        let at = self.tick.as_nanos() as u64 * (self.told + ahead);
        self.deadline = self.origin + Duration::from_nanos(at);
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(50);
    const STALL: Duration = Duration::from_secs(1);

    #[test]
    fn t10_a_flood_of_wake_ups_loses_no_tick_and_invents_none() {
        let start = Instant::now();
        let mut c = Clock::new(TICK, STALL, start);
        let mut told = 0;
        // A busy task wakes every 7 ms for ten seconds, never at a tick
        // boundary, and never through the tick timer.
        let mut now = start;
        while now < start + Duration::from_secs(10) {
            now += Duration::from_millis(7);
            let a = c.advance(now);
            assert_eq!(a.stalled, None);
            told += a.ticks;
            let _ = c.next_deadline();
        }
        let real = (now - start).as_millis() as u64 / 50;
        assert_eq!(told, real, "ticks told follow real time exactly");
    }

    #[test]
    fn t10_a_task_kept_from_running_learns_every_tick_at_once_and_sees_the_stall() {
        let start = Instant::now();
        let mut c = Clock::new(TICK, STALL, start);
        let deadline = c.next_deadline();
        assert_eq!(deadline, start + TICK);
        // A slow snapshot or a throttled CPU: the task runs again 2.5 s on.
        let a = c.advance(start + Duration::from_millis(2_550));
        assert_eq!(a.ticks, 51);
        assert!(a.stalled.is_some_and(|late| late >= Duration::from_secs(2)));
        // Reported once, not again for the rest of the batch.
        let a = c.advance(start + Duration::from_millis(2_560));
        assert_eq!(a.stalled, None);
        // Behind by less than the threshold is only late, not a stall.
        let d = c.next_deadline();
        let a = c.advance(d + Duration::from_millis(300));
        assert_eq!(a.ticks, 7);
        assert_eq!(a.stalled, None);
    }

    #[test]
    fn t10_a_quiet_group_sleeps_a_stride_and_is_told_every_tick_it_slept() {
        let start = Instant::now();
        let mut c = Clock::new(TICK, STALL, start);
        c.set_quiet(true);
        let d = c.next_deadline();
        assert_eq!(d, start + TICK * QUIET_STRIDE_TICKS);
        let a = c.advance(d);
        assert_eq!(a.ticks, u64::from(QUIET_STRIDE_TICKS));
        // Woken early by a message: the ticks so far, no more.
        c.set_quiet(false);
        let _ = c.next_deadline();
        let a = c.advance(d + Duration::from_millis(120));
        assert_eq!(a.ticks, 2);
    }
}

//! The group task's loop: wait for a storage completion, an inbox message or
//! a tick, handle everything queued, then drain the core's Readies and
//! publish the view. A quiet group is woken in strides and its core told the
//! ticks that went by before anything else, so leases and timers follow real
//! time. However the loop ends, every client still waiting gets an answer.

use tokio::sync::mpsc;

use super::{AdminError, ClientError, Group, GroupMsg, blocking};
use crate::storage::Completion;

const MAX_BATCH: usize = 1024;
/// A quiet group's task wakes once per this many ticks (a second on the
/// default 50 ms tick) instead of every tick.
const QUIET_STRIDE_TICKS: u32 = 20;

/// Why the group's task woke.
enum Woke {
    Done(Completion),
    Msg(GroupMsg),
    Tick,
}

impl Group {
    pub(super) async fn run(
        mut self,
        mut inbox: mpsc::Receiver<GroupMsg>,
        mut done: mpsc::UnboundedReceiver<Completion>,
    ) {
        let tick = self.opts.tick;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A quiet group is not ticked every tick: it sleeps for a stride and
        // its core is then told how many ticks went by. `quiet_since` is
        // the instant up to which the core has been told.
        let stride = tick * QUIET_STRIDE_TICKS;
        let mut quiet_since: Option<tokio::time::Instant> = None;
        let quiet_sleep = tokio::time::sleep(stride);
        tokio::pin!(quiet_sleep);
        loop {
            let woke = tokio::select! {
                biased;
                Some(c) = done.recv() => Woke::Done(c),
                msg = inbox.recv() => match msg {
                    Some(m) => Woke::Msg(m),
                    None => break,
                },
                _ = ticker.tick(), if quiet_since.is_none() => Woke::Tick,
                _ = &mut quiet_sleep, if quiet_since.is_some() => {
                    quiet_sleep.as_mut().reset(tokio::time::Instant::now() + stride);
                    Woke::Tick
                }
            };
            // Time spent quiet is counted before anything else happens, so
            // that a leader woken by a read judges its lease by real time.
            if let Some(since) = quiet_since {
                let ticks = (since.elapsed().as_nanos() / tick.as_nanos().max(1)) as u32;
                if ticks > 0 {
                    self.core.tick_by(u64::from(ticks));
                    quiet_since = Some(since + tick * ticks);
                }
            }
            match woke {
                Woke::Done(c) => {
                    self.on_completion(c);
                    while let Ok(c) = done.try_recv() {
                        self.on_completion(c);
                    }
                }
                Woke::Msg(m) => {
                    self.handle(m);
                    for _ in 0..MAX_BATCH {
                        match inbox.try_recv() {
                            Ok(m) => self.handle(m),
                            Err(_) => break,
                        }
                    }
                }
                Woke::Tick if quiet_since.is_none() => self.core.tick(),
                Woke::Tick => {}
            }
            if self.failed {
                self.fail_everything("storage failed; the group stopped");
                self.publish();
                return;
            }
            self.process_ready();
            self.after_batch();
            self.publish();
            if self.shutdown_reply.is_some() && self.transfer_reply.is_none() {
                break;
            }
            match (self.core.is_quiet(), quiet_since) {
                (true, None) => {
                    let now = tokio::time::Instant::now();
                    quiet_since = Some(now);
                    quiet_sleep.as_mut().reset(now + stride);
                }
                (false, Some(_)) => {
                    quiet_since = None;
                    ticker.reset();
                }
                _ => {}
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        self.fail_everything("the group is shutting down");
        if let Some(w) = self.worker.take() {
            blocking(move || drop(w.stop()));
        }
        let mut v = self.view.lock().expect("view lock");
        v.stopped = true;
        drop(v);
        if let Some(r) = self.shutdown_reply.take() {
            let _ = r.send(());
        }
    }

    fn fail_everything(&mut self, why: &str) {
        let err = || ClientError::Closed(why.to_string());
        for (_, ws) in std::mem::take(&mut self.writes) {
            for w in ws {
                let _ = w.reply.send(Err(err()));
            }
        }
        for (_, (_, r)) in self.reads.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, rs) in std::mem::take(&mut self.ready_reads) {
            for (_, r) in rs {
                let _ = r.send(Err(err()));
            }
        }
        for w in self.watches.drain(..) {
            let _ = w.reply.send(Err(err()));
        }
        for r in [self.conf_reply.take(), self.transfer_reply.take()]
            .into_iter()
            .flatten()
        {
            let _ = r.send(Err(AdminError::Failed(why.to_string())));
        }
    }
}

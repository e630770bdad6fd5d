//! The group task's loop: wait for a storage completion, an inbox message or
//! the clock's next deadline; tell the core the ticks that went by (from the
//! monotonic clock, see `clock.rs`) before anything else, handle everything
//! queued, then drain the core's Readies and publish the view. However the
//! loop ends, every client still waiting gets an answer.

use tokio::sync::mpsc;

use super::clock::Clock;
use super::snapshot::SnapshotIo;
use super::{AdminError, ClientError, Group, GroupMsg, blocking};
use crate::storage::Completion;

const MAX_BATCH: usize = 1024;

/// Why the group's task woke.
enum Woke {
    Done(Completion),
    Msg(GroupMsg),
    SnapshotIo(SnapshotIo),
    Tick,
}

impl Group {
    pub(super) async fn run(
        mut self,
        mut inbox: mpsc::Receiver<GroupMsg>,
        mut done: mpsc::UnboundedReceiver<Completion>,
        mut snapshot_io: mpsc::UnboundedReceiver<SnapshotIo>,
    ) {
        let now = tokio::time::Instant::now();
        let mut clock = Clock::new(self.opts.tick, self.opts.stall_threshold, now);
        let sleep = tokio::time::sleep_until(clock.next_deadline());
        tokio::pin!(sleep);
        loop {
            // Completions and messages first: under a flood the deadline may
            // never win the select, which costs no tick (the clock counts
            // them whatever woke the task).
            let woke = tokio::select! {
                biased;
                Some(c) = done.recv() => Woke::Done(c),
                Some(io) = snapshot_io.recv() => Woke::SnapshotIo(io),
                msg = inbox.recv() => match msg {
                    Some(m) => Woke::Msg(m),
                    None => break,
                },
                _ = &mut sleep => Woke::Tick,
            };
            self.tell_time(&mut clock);
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
                            Ok(m) => {
                                // The process may have been frozen since
                                // the last message (a CPU quota): a lease
                                // read is judged on the time it is read.
                                self.tell_time(&mut clock);
                                self.handle(m);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Woke::SnapshotIo(io) => self.snapshot_io_done(io),
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
            clock.set_quiet(self.core.is_quiet());
            sleep.as_mut().reset(clock.next_deadline());
        }
        self.stop();
    }

    /// Tells the core the ticks that went by, and steps a leader down first
    /// when the task was kept from running for longer than the threshold.
    fn tell_time(&mut self, clock: &mut Clock) {
        let advance = clock.advance(tokio::time::Instant::now());
        if let Some(late) = advance.stalled {
            // Judged before the ticks are told: a leader that was not
            // running must not serve a read or a write on what it believed
            // before the stall.
            if self.core.role() == crate::core::Role::Leader {
                tracing::warn!(group = %self.label.group, stall_ms = late.as_millis() as u64, "runtime stalled: the group's task was not running; the leader steps down");
            }
            self.core.step_down();
        }
        if advance.ticks > 0 {
            self.core.tick_by(advance.ticks);
        }
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
        let snapshot_waiters = std::mem::take(&mut self.snapshot_waiters);
        for r in [self.conf_reply.take(), self.transfer_reply.take()]
            .into_iter()
            .flatten()
            .chain(snapshot_waiters)
        {
            let _ = r.send(Err(AdminError::Failed(why.to_string())));
        }
    }
}

//! Followers behind the snapshot get entries, not the snapshot, while the
//! log storage still has them: a member restarted during a rolling upgrade
//! is a few thousand entries behind and catches up in seconds that way,
//! where a full state transfer could take minutes.
//!
//! The core keeps in memory only the entries after its snapshot. For a
//! follower whose next entry is older, it asks the shell (`Ready::fetch`)
//! to read entries from storage and answer with [`RaftCore::fetched`]; it
//! sends nothing else to that follower meanwhile. Only committed entries
//! are ever fetched (everything up to the snapshot is), so what storage
//! returns is what the log holds for good, however late the answer comes.
//! When storage no longer holds them (purged), the follower gets the
//! snapshot, as before.

use super::{ProgressState, RaftCore};
use crate::core::types::{Entry, Index, NodeId, Role};

impl RaftCore {
    /// The shell's answer to a `Fetch`: the entries from `prev` on, or
    /// `None` when storage no longer holds `prev` (or could not read it).
    pub fn fetched(&mut self, to: NodeId, prev: Index, entries: Option<Vec<Entry>>) {
        if self.role != Role::Leader {
            return;
        }
        let now = self.now;
        let snapshot_index = self.log.snapshot_index();
        let Some(pr) = self
            .leader_state
            .as_mut()
            .and_then(|l| l.progress.get_mut(&to))
        else {
            return;
        };
        if pr.fetching.take().is_none() || pr.next_index != prev + 1 {
            // An answer nobody waits for any more (a retry, a new probe).
            self.send_append(to);
            return;
        }
        let usable = entries.filter(|es| {
            let first = if prev == 0 { 1 } else { prev };
            es.len() >= 2
                && es[0].index == first
                && es.windows(2).all(|w| w[1].index == w[0].index + 1)
                && es.last().is_some_and(|e| e.index <= snapshot_index)
        });
        match usable {
            // From the start of the log: nothing before it to match.
            Some(es) if prev == 0 => self.send_entries(to, 0, 0, es),
            Some(mut es) => {
                let prev_term = es.remove(0).term;
                self.send_entries(to, prev, prev_term, es);
            }
            None => {
                pr.state = ProgressState::Snapshot { since: now };
                self.out.send_snapshot.push(to);
            }
        }
    }

    /// A fetch the shell did not answer in time is given up, and asked for
    /// again at the next send.
    pub(super) fn expire_fetches(&mut self) {
        let (now, timeout) = (self.now, self.cfg.snapshot_timeout_ticks);
        let Some(ls) = self.leader_state.as_mut() else {
            return;
        };
        for pr in ls.progress.values_mut() {
            if pr.fetching.is_some_and(|since| now - since >= timeout) {
                pr.fetching = None;
            }
        }
    }
}

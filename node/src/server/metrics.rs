//! Prometheus metrics of a node, in the text format `/metrics` serves.
//!
//! Latency histograms are observed where the work happens (the group task
//! times submit-to-durable, the log worker times each fsync). Gauges that
//! mirror a group's state (role, term, indexes, pending requests, retry-cache
//! hits) are set from the groups' published views when scraped, so the hot
//! path never touches them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::group::GroupView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

type HistogramFamily = Family<GroupLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Submit of a Ready's writes to the log worker until durable.
    pub append: HistogramFamily,
    /// One group fsync of the log.
    pub fsync: HistogramFamily,
    pub leader_changes: Family<GroupLabel, Counter>,
    role: Family<GroupLabel, Gauge>,
    term: Family<GroupLabel, Gauge>,
    commit: Family<GroupLabel, Gauge>,
    applied: Family<GroupLabel, Gauge>,
    pending: Family<GroupLabel, Gauge>,
    retry_hits: Family<GroupLabel, Gauge>,
    retry_entries: Family<GroupLabel, Gauge>,
    groups: Gauge,
    groups_quiet: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kuberaft");
        let _ = &mut registry;
        let append: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let fsync: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let m = Metrics {
            append,
            fsync,
            leader_changes: Family::default(),
            role: Family::default(),
            term: Family::default(),
            commit: Family::default(),
            applied: Family::default(),
            pending: Family::default(),
            retry_hits: Family::default(),
            retry_entries: Family::default(),
            groups: Gauge::default(),
            groups_quiet: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "log_append_seconds",
            "Time from handing a batch of log writes to the log worker until it is durable",
            m.append.clone(),
        );
        registry.register(
            "log_fsync_seconds",
            "Duration of one group fsync of the log",
            m.fsync.clone(),
        );
        registry.register(
            "leader_changes",
            "Times this member saw the group's leader change",
            m.leader_changes.clone(),
        );
        registry.register(
            "role",
            "Role in the group: 0 follower, 1 candidate, 2 leader, 3 listener",
            m.role.clone(),
        );
        registry.register("term", "Current term", m.term.clone());
        registry.register("commit_index", "Commit index", m.commit.clone());
        registry.register("applied_index", "Applied index", m.applied.clone());
        registry.register(
            "pending_requests",
            "Client requests admitted and not yet answered",
            m.pending.clone(),
        );
        registry.register(
            "retry_cache_hits",
            "Retried calls answered from the retry cache",
            m.retry_hits.clone(),
        );
        registry.register(
            "retry_cache_entries",
            "Replies the retry cache holds for retries",
            m.retry_entries.clone(),
        );
        registry.register("groups", "Groups hosted by this node", m.groups.clone());
        registry.register(
            "groups_quiet",
            "Groups that are idle and quiet here: no heartbeats, no election timer",
            m.groups_quiet.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition, with state gauges taken from `views`.
    pub fn encode(&self, views: &[GroupView]) -> String {
        self.groups.set(views.len() as i64);
        self.groups_quiet
            .set(views.iter().filter(|v| v.quiet).count() as i64);
        for v in views {
            let l = GroupLabel {
                group: v.group.clone(),
            };
            let role = match v.role.as_str() {
                "leader" => 2,
                "candidate" | "pre-candidate" => 1,
                "listener" => 3,
                _ => 0,
            };
            self.role.get_or_create(&l).set(role);
            self.term.get_or_create(&l).set(v.term as i64);
            self.commit.get_or_create(&l).set(v.commit_index as i64);
            self.applied.get_or_create(&l).set(v.applied_index as i64);
            self.pending
                .get_or_create(&l)
                .set(v.pending_requests as i64);
            self.retry_hits
                .get_or_create(&l)
                .set(v.retry_cache_hits as i64);
            self.retry_entries
                .get_or_create(&l)
                .set(v.retry_cache_entries as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Forgets a removed group's series.
    pub fn remove_group(&self, group: &str) {
        let l = GroupLabel {
            group: group.to_string(),
        };
        for f in [
            &self.role,
            &self.term,
            &self.commit,
            &self.applied,
            &self.pending,
            &self.retry_hits,
            &self.retry_entries,
        ] {
            f.remove(&l);
        }
        self.append.remove(&l);
        self.fsync.remove(&l);
        self.leader_changes.remove(&l);
    }
}

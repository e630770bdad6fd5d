//! The peer transport: one gRPC connection per peer, shared by every group.
//!
//! - appendEntries: one long-lived bidirectional stream per peer carries the
//!   requests of all groups (each names its group); the peer's replies come
//!   back on the same stream and are routed to the group they name. Requests
//!   are pipelined: nothing waits for a reply before the next is sent.
//! - requestVote, startLeaderElection, readIndex: unary calls; the answer is
//!   delivered to the group as a message from the peer.
//! - installSnapshot: a stream of file chunks; the follower's reply ends it.
//!
//! - ping: one per peer every heartbeat interval, for node liveness (see
//!   [`super::liveness`]); started when the first peer address is learned.
//!
//! Sending never blocks a group: a full queue drops the message, which Raft
//! treats like any lost packet (the leader retransmits, candidates retry).
//! A broken stream reconnects with a jittered backoff.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kuberaft_proto::v1 as pb;
use kuberaft_proto::v1::raft_server_protocol_service_client::RaftServerProtocolServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::liveness::{Liveness, LivenessOptions};
use crate::convert::{self, DecodeError, membership_to_pb};
use crate::core::{
    Envelope, InstallSnapshot, Membership, Message, NodeId, ReadIndexRequest, RequestVote,
};
use crate::server::group::{GroupMsg, ReplyPath, Transport};
use crate::server::node::Router;

/// Snapshot files are streamed in chunks of this size.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;
const UNARY_TIMEOUT: Duration = Duration::from_secs(2);
const APPEND_QUEUE: usize = 4096;

#[derive(Debug)]
struct PeerConn {
    address: String,
    client: RaftServerProtocolServiceClient<Channel>,
    appends: mpsc::Sender<pb::AppendEntriesRequest>,
}

#[derive(Debug)]
pub struct PeerTransport {
    /// This transport, for the tasks it starts (which must not keep it alive).
    me: Weak<PeerTransport>,
    self_id: NodeId,
    router: Router,
    addresses: Mutex<HashMap<NodeId, String>>,
    conns: Mutex<HashMap<NodeId, Arc<PeerConn>>>,
    /// Local address of connections to peers (`None`: the system picks).
    source: Option<IpAddr>,
    /// Changes every start; peers see a restart in it.
    incarnation: u64,
    liveness: Mutex<Liveness>,
    liveness_opts: LivenessOptions,
    pinging: AtomicBool,
}

/// Pause after a failed snapshot transfer before the leader may try again.
const SNAPSHOT_RETRY_DELAY: Duration = Duration::from_millis(500);

/// A lazily connecting channel to `address` (host:port).
pub fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    channel_from(address, None)
}

/// [`channel`] whose connections leave from the local address `source`
/// (for hosts with several addresses).
pub fn channel_from(
    address: &str,
    source: Option<IpAddr>,
) -> Result<Channel, tonic::transport::Error> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Ok(Endpoint::from_shared(uri)?
        .local_address(source)
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Lets a warning through at most once per period and counts the rest, so
/// a misbehaving peer cannot flood the log.
#[derive(Debug)]
struct Throttle {
    period_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    const fn new(period_ms: u64) -> Self {
        Throttle {
            period_ms,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if this event may be logged, `n` having been suppressed
    /// since the last one that was.
    fn allow(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        let mine = now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.period_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if !mine {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

static BAD_REPLY: Throttle = Throttle::new(10_000);
static REFUSED: Throttle = Throttle::new(10_000);

/// A reply that cannot be handed to the core is dropped like a lost packet:
/// the leader retransmits, a candidate campaigns again, a read times out.
fn drop_reply(from: NodeId, kind: &str, e: &DecodeError) {
    if let Some(suppressed) = BAD_REPLY.allow() {
        tracing::warn!(peer = from, error = %e, suppressed, "{kind} reply dropped");
    }
}

/// Replies come back on the call or stream to one peer, and only that peer
/// may speak for itself in them.
fn check_replier(to: NodeId, said: NodeId) -> Result<(), DecodeError> {
    if said != to {
        return Err(DecodeError::Invalid(format!(
            "the reply of member {to} names member {said} as its sender"
        )));
    }
    Ok(())
}

fn append_reply(to: NodeId, r: &pb::AppendEntriesReply) -> Result<Message, DecodeError> {
    check_replier(to, r.follower_id)?;
    Ok(Message::AppendEntriesReply(convert::append_reply_from_pb(
        r,
    )?))
}

fn vote_reply(
    to: NodeId,
    sent: &RequestVote,
    r: &pb::RequestVoteReply,
) -> Result<Message, DecodeError> {
    check_replier(to, r.voter_id)?;
    // A granted real vote counts towards leadership where a pre-vote only
    // permits a campaign: the two must not be confused.
    if r.pre_vote != sent.pre_vote {
        return Err(DecodeError::Invalid(format!(
            "the answer to a {} is marked as the other kind",
            if sent.pre_vote { "pre-vote" } else { "vote" }
        )));
    }
    Ok(Message::RequestVoteReply(convert::vote_reply_from_pb(r)?))
}

fn read_index_reply(
    sent: &ReadIndexRequest,
    r: &pb::ReadIndexReply,
) -> Result<Message, DecodeError> {
    // The context says which waiting read the index is for.
    if r.context != sent.ctx {
        return Err(DecodeError::Invalid(format!(
            "read index reply for context {} to a request with context {}",
            r.context, sent.ctx
        )));
    }
    Ok(Message::ReadIndexReply(convert::read_index_reply_from_pb(
        r,
    )?))
}

fn install_reply(to: NodeId, r: &pb::InstallSnapshotReply) -> Result<Message, DecodeError> {
    check_replier(to, r.follower_id)?;
    Ok(Message::InstallSnapshotReply(
        convert::install_reply_from_pb(r)?,
    ))
}

fn deliver(router: &Router, group: &[u8], from: NodeId, msg: GroupMsg) {
    let handle = router.read().expect("router lock").get(group).cloned();
    match handle {
        Some(h) => {
            if h.tx.try_send(msg).is_err() {
                tracing::debug!(from, "group inbox full; peer message dropped");
            }
        }
        None => tracing::debug!(from, "message for a group this node does not host"),
    }
}

fn step(router: &Router, group: &[u8], from: NodeId, msg: Message) {
    let m = GroupMsg::Step {
        from,
        msg,
        reply: ReplyPath::None,
    };
    deliver(router, group, from, m);
}

impl PeerTransport {
    pub fn new(self_id: NodeId, router: Router) -> Arc<Self> {
        Self::with_source(self_id, router, None)
    }

    /// A transport whose peer connections leave from `source`.
    pub fn with_source(self_id: NodeId, router: Router, source: Option<IpAddr>) -> Arc<Self> {
        Self::with_options(self_id, router, source, LivenessOptions::default())
    }

    /// [`Self::with_source`] with peers pinged as `liveness` says.
    pub fn with_options(
        self_id: NodeId,
        router: Router,
        source: Option<IpAddr>,
        liveness: LivenessOptions,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| PeerTransport {
            me: me.clone(),
            self_id,
            router,
            addresses: Mutex::default(),
            conns: Mutex::default(),
            source,
            incarnation: rand::random::<u64>().max(1),
            liveness: Mutex::default(),
            liveness_opts: liveness,
            pinging: AtomicBool::new(false),
        })
    }

    /// `peer` answered a ping or pinged us; wakes its quiet groups if it was
    /// taken for dead or restarted.
    fn heard(&self, peer: NodeId, incarnation: u64) {
        let news = self
            .liveness
            .lock()
            .expect("lock")
            .heard(peer, incarnation, Instant::now());
        if news {
            tracing::debug!(peer, incarnation, "peer answers (again, or restarted)");
            self.wake_groups(peer);
        }
    }

    /// Tells every group that `peer` changed; quiet ones with that member
    /// wake up.
    fn wake_groups(&self, peer: NodeId) {
        let groups: Vec<_> = self
            .router
            .read()
            .expect("router lock")
            .values()
            .map(|g| g.tx.clone())
            .collect();
        for tx in groups {
            // A full inbox belongs to a busy group, which is not quiet.
            let _ = tx.try_send(GroupMsg::PeerChanged { peer });
        }
    }

    fn conn(&self, to: NodeId) -> Option<Arc<PeerConn>> {
        let address = self.addresses.lock().expect("lock").get(&to).cloned()?;
        let mut conns = self.conns.lock().expect("lock");
        if let Some(c) = conns.get(&to).filter(|c| c.address == address) {
            return Some(c.clone());
        }
        let ch = match channel_from(&address, self.source) {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(to, %address, error = %e, "bad peer address");
                return None;
            }
        };
        let client = RaftServerProtocolServiceClient::new(ch)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        let conn = Arc::new(PeerConn {
            address,
            client: client.clone(),
            appends: tx,
        });
        conns.insert(to, conn.clone());
        tokio::spawn(append_stream(to, client, rx, self.router.clone()));
        Some(conn)
    }

    fn unary(&self, group: &Bytes, to: NodeId, msg: Message) {
        let Some(conn) = self.conn(to) else {
            tracing::debug!(to, "no address for peer yet; message dropped");
            return;
        };
        let mut client = conn.client.clone();
        let router = self.router.clone();
        let group = group.clone();
        let from = self.self_id;
        tokio::spawn(async move {
            let (kind, reply) = match msg {
                Message::RequestVote(v) => {
                    let req = convert::vote_to_pb(&group, from, to, &v);
                    let reply = call(client.request_vote(req)).await;
                    ("vote", reply.map(|r| vote_reply(to, &v, &r)))
                }
                Message::StartElection(s) => {
                    let req = convert::start_election_to_pb(&group, from, to, &s);
                    let _ = call(client.start_leader_election(req)).await;
                    return;
                }
                Message::ReadIndex(r) => {
                    let req = convert::read_index_to_pb(&group, from, &r);
                    let reply = call(client.read_index(req)).await;
                    (
                        "read index",
                        reply.map(|reply| read_index_reply(&r, &reply)),
                    )
                }
                other => {
                    tracing::error!(?other, "not a request message");
                    return;
                }
            };
            match reply {
                Some(Ok(m)) => step(&router, &group, to, m),
                Some(Err(e)) => drop_reply(to, kind, &e),
                None => {}
            }
        });
    }
}

/// Pings every known peer once per interval and wakes the groups of peers
/// that fall silent; ends when the transport is dropped.
async fn ping_peers(weak: Weak<PeerTransport>, opts: LivenessOptions) {
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(t) = weak.upgrade() else { return };
        let peers: Vec<NodeId> = t
            .addresses
            .lock()
            .expect("lock")
            .keys()
            .copied()
            .filter(|p| *p != t.self_id)
            .collect();
        let now = Instant::now();
        for peer in peers {
            t.liveness.lock().expect("lock").track(peer, now);
            let Some(conn) = t.conn(peer) else { continue };
            let mut client = conn.client.clone();
            let req = pb::PingRequest {
                from: t.self_id,
                incarnation: t.incarnation,
            };
            let weak = Arc::downgrade(&t);
            tokio::spawn(async move {
                if let Ok(Ok(r)) = tokio::time::timeout(opts.dead_after, client.ping(req)).await
                    && let Some(t) = weak.upgrade()
                {
                    t.heard(peer, r.into_inner().incarnation);
                }
            });
        }
        let lost = t
            .liveness
            .lock()
            .expect("lock")
            .expire(now, opts.dead_after);
        for peer in lost {
            tracing::info!(
                peer,
                "peer stopped answering pings; waking the quiet groups it is in"
            );
            t.wake_groups(peer);
        }
    }
}

async fn call<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Option<T> {
    match tokio::time::timeout(UNARY_TIMEOUT, fut).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        Ok(Err(status)) => {
            tracing::debug!(%status, "peer call failed");
            None
        }
        Err(_) => None,
    }
}

/// Keeps one appendEntries stream to a peer open, feeding it from `queue`
/// and routing replies to their groups.
async fn append_stream(
    to: NodeId,
    mut client: RaftServerProtocolServiceClient<Channel>,
    mut queue: mpsc::Receiver<pb::AppendEntriesRequest>,
    router: Router,
) {
    loop {
        let (tx, rx) = mpsc::channel(256);
        // The first request opens the stream; waiting for it keeps idle
        // peers without a stream.
        let Some(first) = queue.recv().await else {
            return;
        };
        let _ = tx.try_send(first);
        match client.append_entries(ReceiverStream::new(rx)).await {
            Ok(resp) => {
                let mut replies = resp.into_inner();
                loop {
                    tokio::select! {
                        req = queue.recv() => match req {
                            Some(r) => {
                                if tx.send(r).await.is_err() {
                                    break;
                                }
                            }
                            None => return,
                        },
                        reply = replies.message() => match reply {
                            Ok(Some(r)) => {
                                let group = r.group_id.clone().unwrap_or_default().id;
                                match append_reply(to, &r) {
                                    Ok(m) => step(&router, &group, to, m),
                                    Err(e) => drop_reply(to, "append", &e),
                                }
                            }
                            Ok(None) => break,
                            Err(status) => {
                                // The peer ends the stream this way when it
                                // refuses what this node sent: worth seeing.
                                if status.code() == tonic::Code::InvalidArgument {
                                    if let Some(suppressed) = REFUSED.allow() {
                                        tracing::warn!(to, error = %status.message(), suppressed, "peer refused an append");
                                    }
                                } else {
                                    tracing::debug!(to, %status, "append stream broke");
                                }
                                break;
                            }
                        },
                    }
                }
            }
            Err(status) => tracing::debug!(to, %status, "cannot open append stream"),
        }
        // Requests queued while the stream was down are stale; the leader
        // retransmits what matters.
        while queue.try_recv().is_ok() {}
        let jitter = rand::random::<u64>() % 100;
        tokio::time::sleep(Duration::from_millis(100 + jitter)).await;
    }
}

impl Transport for PeerTransport {
    fn send(&self, group: &Bytes, env: Envelope) {
        match &env.msg {
            Message::AppendEntries(a) => {
                let Some(conn) = self.conn(env.to) else {
                    tracing::debug!(to = env.to, "no address for peer yet; append dropped");
                    return;
                };
                let req = convert::append_to_pb(group, env.from, env.to, a);
                if conn.appends.try_send(req).is_err() {
                    tracing::debug!(to = env.to, "append queue full; dropped");
                }
            }
            _ => self.unary(group, env.to, env.msg),
        }
    }

    fn send_snapshot(
        &self,
        group: &Bytes,
        to: NodeId,
        install: InstallSnapshot,
        files: Vec<(String, Vec<u8>)>,
    ) {
        let router = self.router.clone();
        let group = group.clone();
        let from = self.self_id;
        let Some(conn) = self.conn(to) else {
            deliver(&router, &group, to, GroupMsg::SnapshotFailed { to });
            return;
        };
        let mut client = conn.client.clone();
        tokio::spawn(async move {
            let requests = snapshot_requests(&group, from, to, &install, files);
            let result = async {
                let mut replies = client
                    .install_snapshot(tokio_stream::iter(requests))
                    .await?
                    .into_inner();
                let mut last = None;
                while let Some(r) = replies.message().await? {
                    last = Some(r);
                }
                Ok::<_, tonic::Status>(last)
            };
            let outcome = match tokio::time::timeout(Duration::from_secs(300), result).await {
                Ok(Ok(Some(r))) => install_reply(to, &r).map_err(|e| e.to_string()),
                other => Err(format!("{:?}", other.map(|r| r.map(|_| ())))),
            };
            match outcome {
                Ok(m) => step(&router, &group, to, m),
                // A reply the core cannot take fails the transfer: the
                // leader waits for an answer, and this is none.
                Err(why) => {
                    tracing::warn!(to, result = %why, "snapshot transfer failed; retrying in half a second");
                    // A member that is down or unreachable fails every
                    // transfer at once; without a pause the leader would
                    // retry in a tight loop.
                    tokio::time::sleep(SNAPSHOT_RETRY_DELAY).await;
                    deliver(&router, &group, to, GroupMsg::SnapshotFailed { to });
                }
            }
        });
    }

    fn learn(&self, membership: &Membership) {
        let mut addrs = self.addresses.lock().expect("lock");
        for id in membership.members() {
            if let Some(p) = membership.peer(id).filter(|p| !p.address.is_empty()) {
                addrs.insert(id, p.address.clone());
            }
        }
        drop(addrs);
        // Groups learn inside the runtime; the first one starts the pings.
        if tokio::runtime::Handle::try_current().is_ok()
            && !self.pinging.swap(true, Ordering::Relaxed)
        {
            tokio::spawn(ping_peers(self.me.clone(), self.liveness_opts));
        }
    }

    fn pinged(&self, from: NodeId, incarnation: u64) -> u64 {
        self.heard(from, incarnation);
        self.incarnation
    }
}

/// The messages of one snapshot transfer: metadata first, then every file in
/// chunks, the last message marked `done`.
pub fn snapshot_requests(
    group: &Bytes,
    from: NodeId,
    to: NodeId,
    install: &InstallSnapshot,
    files: Vec<(String, Vec<u8>)>,
) -> Vec<pb::InstallSnapshotRequest> {
    let head = pb::InstallSnapshotRequest {
        group_id: convert::group_pb(group),
        leader_id: from,
        follower_id: to,
        leader_term: install.term,
        last_included: Some(pb::TermIndex {
            term: install.meta.term,
            index: install.meta.index,
        }),
        configuration: Some(membership_to_pb(&install.meta.membership)),
        files: files
            .iter()
            .map(|(name, data)| pb::SnapshotFile {
                name: name.clone(),
                size: data.len() as u64,
                crc32c: crc32c::crc32c(data),
            })
            .collect(),
        ..Default::default()
    };
    let mut out = vec![head];
    for (name, data) in files {
        let data = Bytes::from(data);
        let mut offset = 0;
        loop {
            let end = (offset + SNAPSHOT_CHUNK).min(data.len());
            out.push(pb::InstallSnapshotRequest {
                group_id: convert::group_pb(group),
                leader_id: from,
                follower_id: to,
                leader_term: install.term,
                chunk: Some(pb::SnapshotChunk {
                    file_name: name.clone(),
                    offset: offset as u64,
                    data: data.slice(offset..end),
                    done: end == data.len(),
                }),
                ..Default::default()
            });
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
    }
    for (i, r) in out.iter_mut().enumerate() {
        r.request_index = i as u64;
    }
    if let Some(last) = out.last_mut() {
        last.done = true;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_warning_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(200);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.allow(), Some(2));
        assert_eq!(t.allow(), None);
    }

    #[test]
    fn replies_are_checked_against_the_peer_and_the_request() {
        let vote = RequestVote {
            term: 3,
            last_index: 0,
            last_term: 0,
            pre_vote: true,
            transfer: false,
            priority: 0,
        };
        let mut r = pb::RequestVoteReply {
            voter_id: 2,
            term: 3,
            granted: true,
            pre_vote: true,
            ..Default::default()
        };
        assert!(vote_reply(2, &vote, &r).is_ok());
        let e = vote_reply(5, &vote, &r).unwrap_err();
        assert!(e.to_string().contains("member 5 names member 2"), "{e}");
        r.pre_vote = false;
        let e = vote_reply(2, &vote, &r).unwrap_err();
        assert!(e.to_string().contains("pre-vote"), "{e}");

        let read = ReadIndexRequest { term: 3, ctx: 8 };
        let mut r = pb::ReadIndexReply {
            context: 8,
            success: true,
            read_index: 4,
            term: 3,
            ..Default::default()
        };
        assert!(read_index_reply(&read, &r).is_ok());
        r.context = 9;
        assert!(read_index_reply(&read, &r).is_err());

        let r = pb::InstallSnapshotReply {
            follower_id: 0,
            term: 3,
            result: pb::InstallSnapshotResult::Success as i32,
            ..Default::default()
        };
        assert!(install_reply(2, &r).is_err());
        let r = pb::AppendEntriesReply {
            follower_id: 2,
            term: 3,
            result: pb::AppendResult::Success as i32,
            ..Default::default()
        };
        assert!(append_reply(2, &r).is_ok());
        assert!(append_reply(3, &r).is_err());
    }
}

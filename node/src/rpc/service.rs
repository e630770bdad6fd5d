//! The three gRPC services of a node: client, server (peer to peer) and
//! admin. Each handler checks its input (known group, addressed to this
//! member, well-formed peers) and answers a bad request with a status that
//! says what was wrong; the groups only ever see valid messages.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::{Stream, StreamExt};
use kuberaft_proto::v1 as pb;
use kuberaft_proto::v1::admin_protocol_service_server::AdminProtocolService;
use kuberaft_proto::v1::raft_client_protocol_service_server::RaftClientProtocolService;
use kuberaft_proto::v1::raft_server_protocol_service_server::RaftServerProtocolService;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{self, group_pb, membership_from_pb, peer_from_pb, peer_to_pb};
use crate::core::{ConfChangeMode, ConfChangeRequest, Message, NodeId, PeerInfo, SnapshotMeta};
use crate::server::group::{
    AdminError, AdminResult, ClientError, ClientResult, GroupHandle, GroupMsg, ReplyPath,
    display_group,
};
use crate::server::node::{Node, NodeError};

/// Server-side timeout of client requests that do not name one.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests a client may have in flight on one ordered stream.
pub const ORDERED_WINDOW: usize = 1024;
const PEER_REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest snapshot a follower accepts over installSnapshot.
pub const MAX_SNAPSHOT_BYTES: u64 = 2 << 30;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// All three services share the node.
#[derive(Clone, Debug)]
pub struct Services {
    pub node: Arc<Node>,
}

/// A peer request that could not be converted: refused as the caller's
/// mistake, with the reason.
fn invalid(e: convert::DecodeError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn gid(g: &Option<pb::GroupId>) -> Bytes {
    g.as_ref().map(|g| g.id.clone()).unwrap_or_default()
}

impl Services {
    fn group(&self, id: &Option<pb::GroupId>) -> Result<GroupHandle, Status> {
        let id = gid(id);
        self.node.group(&id).ok_or_else(|| {
            Status::not_found(NodeError::UnknownGroup(display_group(&id)).to_string())
        })
    }

    /// Refuses a peer request whose sender is member 0 (no member) or this
    /// node itself: the core would take either for a real peer, e.g. follow
    /// "leader 0", or keep a snapshot it then never answers for.
    fn check_sender(&self, what: &str, from: NodeId) -> Result<(), Status> {
        if from == 0 || from == self.node.id {
            return Err(Status::invalid_argument(format!(
                "{what} from member {from}: the sender must be another member (a non-zero id that is not this node's)"
            )));
        }
        Ok(())
    }

    fn check_addressed(&self, to: NodeId) -> Result<(), Status> {
        if to != 0 && to != self.node.id {
            return Err(Status::failed_precondition(format!(
                "request for member {to} reached member {}: the sender's address for {to} is stale",
                self.node.id
            )));
        }
        Ok(())
    }

    /// Hands a peer request to its group and waits for the group's answer.
    async fn ask_peer(
        &self,
        g: &GroupHandle,
        from: NodeId,
        msg: Message,
    ) -> Result<Message, Status> {
        let (tx, rx) = oneshot::channel();
        let m = GroupMsg::Step {
            from,
            msg,
            reply: ReplyPath::Once(tx),
        };
        g.tx.try_send(m)
            .map_err(|_| Status::unavailable("group is overloaded or stopping; retry"))?;
        match tokio::time::timeout(PEER_REPLY_TIMEOUT, rx).await {
            Ok(Ok(m)) => Ok(m),
            _ => Err(Status::unavailable(
                "the group did not answer (stale request?)",
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Peer to peer
// ---------------------------------------------------------------------------

#[tonic::async_trait]
impl RaftServerProtocolService for Services {
    async fn ping(&self, req: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        let r = req.into_inner();
        self.check_sender("ping", r.from)?;
        let incarnation = self.node.transport().pinged(r.from, r.incarnation);
        Ok(Response::new(pb::PingReply {
            server_id: self.node.id,
            incarnation,
        }))
    }

    async fn request_vote(
        &self,
        req: Request<pb::RequestVoteRequest>,
    ) -> Result<Response<pb::RequestVoteReply>, Status> {
        let r = req.into_inner();
        self.check_addressed(r.voter_id)?;
        self.check_sender("vote request", r.candidate_id)?;
        let g = self.group(&r.group_id)?;
        match self
            .ask_peer(
                &g,
                r.candidate_id,
                Message::RequestVote(convert::vote_from_pb(&r).map_err(invalid)?),
            )
            .await?
        {
            Message::RequestVoteReply(v) => Ok(Response::new(convert::vote_reply_to_pb(
                &g.id,
                self.node.id,
                &v,
            ))),
            _ => Err(Status::internal("unexpected reply to a vote request")),
        }
    }

    async fn start_leader_election(
        &self,
        req: Request<pb::StartLeaderElectionRequest>,
    ) -> Result<Response<pb::StartLeaderElectionReply>, Status> {
        let r = req.into_inner();
        self.check_addressed(r.target_id)?;
        self.check_sender("election request", r.leader_id)?;
        let g = self.group(&r.group_id)?;
        let msg = Message::StartElection(convert::start_election_from_pb(&r).map_err(invalid)?);
        let accepted =
            g.tx.try_send(GroupMsg::Step {
                from: r.leader_id,
                msg,
                reply: ReplyPath::None,
            })
            .is_ok();
        Ok(Response::new(pb::StartLeaderElectionReply {
            group_id: r.group_id,
            target_id: self.node.id,
            accepted,
            term: r.leader_term,
        }))
    }

    type AppendEntriesStream = BoxStream<pb::AppendEntriesReply>;

    async fn append_entries(
        &self,
        req: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<Self::AppendEntriesStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4096);
        let (refuse, refusal) = oneshot::channel::<Status>();
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                if let Err(s) = this.check_addressed(r.follower_id) {
                    tracing::warn!(status = %s, "append for another member");
                    continue;
                }
                let Ok(g) = this.group(&r.group_id) else {
                    tracing::debug!(group = %display_group(&gid(&r.group_id)), "append for a group this node does not host");
                    continue;
                };
                let from = r.leader_id;
                let checked = this
                    .check_sender("append", from)
                    .and_then(|()| convert::append_from_pb(r).map_err(invalid));
                match checked {
                    Ok(a) => {
                        let m = GroupMsg::Step {
                            from,
                            msg: Message::AppendEntries(a),
                            reply: ReplyPath::Stream(tx.clone()),
                        };
                        // Waiting here (rather than dropping) pushes back on
                        // the leader through the stream's flow control.
                        if g.tx.send(m).await.is_err() {
                            continue;
                        }
                    }
                    Err(status) => {
                        // No real leader sends this: end the stream with the
                        // reason, so the sender's log says what it got wrong.
                        // It reconnects after a pause, which bounds these
                        // warnings too.
                        tracing::warn!(from, error = %status.message(), "append refused");
                        let _ = refuse.send(status);
                        return;
                    }
                }
            }
        });
        let replies = futures_util::stream::select(
            ReceiverStream::new(rx).map(Ok),
            futures_util::stream::once(refusal).filter_map(|r| std::future::ready(r.ok().map(Err))),
        )
        // The groups keep their reply senders, so the stream would stay open
        // after a refusal; it ends with it instead.
        .scan(false, |refused, item| {
            let next = (!*refused).then(|| {
                *refused = item.is_err();
                item
            });
            std::future::ready(next)
        });
        Ok(Response::new(Box::pin(replies)))
    }

    type InstallSnapshotStream = BoxStream<pb::InstallSnapshotReply>;

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::InstallSnapshotRequest>>,
    ) -> Result<Response<Self::InstallSnapshotStream>, Status> {
        let mut inbound = req.into_inner();
        let head = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_addressed(head.follower_id)?;
        self.check_sender("snapshot", head.leader_id)?;
        let g = self.group(&head.group_id)?;
        let last = head.last_included.ok_or_else(|| {
            Status::invalid_argument("the first snapshot message must carry last_included")
        })?;
        convert::bounded("leader term", head.leader_term).map_err(invalid)?;
        convert::bounded("snapshot term", last.term).map_err(invalid)?;
        convert::bounded("snapshot index", last.index).map_err(invalid)?;
        let membership = membership_from_pb(&head.configuration.clone().unwrap_or_default())
            .map_err(|e| Status::invalid_argument(format!("snapshot configuration: {e}")))?;
        // Checked: wrapped declared sizes would pass the limit and then
        // reserve (or receive) far more than it.
        let total = head
            .files
            .iter()
            .try_fold(0u64, |t, f| t.checked_add(f.size))
            .ok_or_else(|| {
                Status::invalid_argument(
                    "the declared sizes of the snapshot files add up past 2^64 bytes",
                )
            })?;
        if total > MAX_SNAPSHOT_BYTES {
            return Err(Status::resource_exhausted(format!(
                "snapshot of {total} bytes is over the {MAX_SNAPSHOT_BYTES}-byte limit"
            )));
        }
        // Each file's declared size, and what has arrived of it. Memory is
        // reserved a chunk at most ahead of what arrives: a declared size is
        // a claim, and concurrent streams claiming 2 GiB each would reserve
        // it all before a byte came.
        let mut files: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
        for f in &head.files {
            let ahead = f.size.min(super::peer::SNAPSHOT_CHUNK as u64);
            let fresh = (f.size, Vec::with_capacity(ahead as usize));
            if files.insert(f.name.clone(), fresh).is_some() {
                return Err(Status::invalid_argument(format!(
                    "snapshot file {:?} is listed twice",
                    f.name
                )));
            }
        }
        let mut done = head.done;
        while !done {
            let Some(r) = inbound.message().await? else {
                return Err(Status::aborted(
                    "snapshot stream ended before its last message",
                ));
            };
            done = r.done;
            let Some(c) = r.chunk else { continue };
            let (size, buf) = files.get_mut(&c.file_name).ok_or_else(|| {
                Status::invalid_argument(format!("chunk for unlisted file {:?}", c.file_name))
            })?;
            let end = c.offset.checked_add(c.data.len() as u64).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "chunk of {:?} at offset {} with {} bytes ends past 2^64",
                    c.file_name,
                    c.offset,
                    c.data.len()
                ))
            })?;
            if c.offset != buf.len() as u64 {
                return Err(Status::invalid_argument(format!(
                    "chunk of {:?} at offset {} but {} bytes received so far",
                    c.file_name,
                    c.offset,
                    buf.len()
                )));
            }
            // Nothing beyond the declared size is kept: the limit above
            // holds for what arrives, not only for what was announced.
            if end > *size {
                return Err(Status::invalid_argument(format!(
                    "chunk of {:?} ends at byte {end}, past the file's declared size of {size} bytes",
                    c.file_name
                )));
            }
            buf.extend_from_slice(&c.data);
        }
        for f in &head.files {
            let data = &files[&f.name].1;
            if data.len() as u64 != f.size || crc32c::crc32c(data) != f.crc32c {
                return Err(Status::data_loss(format!(
                    "snapshot file {:?} arrived damaged (size or checksum differs)",
                    f.name
                )));
            }
        }
        let (tx, rx) = oneshot::channel();
        let msg = GroupMsg::InstallSnapshot {
            from: head.leader_id,
            term: head.leader_term,
            meta: SnapshotMeta {
                index: last.index,
                term: last.term,
                membership,
            },
            files: files
                .into_iter()
                .map(|(name, (_, data))| (name, data))
                .collect(),
            reply: tx,
        };
        g.tx.send(msg)
            .await
            .map_err(|_| Status::unavailable("group is stopping"))?;
        let reply = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(Message::InstallSnapshotReply(r))) => {
                convert::install_reply_to_pb(&g.id, self.node.id, &r)
            }
            _ => return Err(Status::unavailable("the group did not answer the snapshot")),
        };
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(reply)))))
    }

    async fn read_index(
        &self,
        req: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexReply>, Status> {
        let r = req.into_inner();
        self.check_sender("read index request", r.follower_id)?;
        let g = self.group(&r.group_id)?;
        match self
            .ask_peer(
                &g,
                r.follower_id,
                Message::ReadIndex(convert::read_index_from_pb(&r).map_err(invalid)?),
            )
            .await?
        {
            Message::ReadIndexReply(m) => {
                Ok(Response::new(convert::read_index_reply_to_pb(&g.id, &m)))
            }
            _ => Err(Status::internal("unexpected reply to a read index request")),
        }
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

fn exception(e: &ClientError) -> pb::RaftException {
    use pb::raft_exception::Kind;
    let kind = match e {
        ClientError::NotLeader { leader, peers } => Kind::NotLeader(pb::NotLeaderException {
            suggested_leader: leader.as_ref().map(|p| peer_to_pb(p, pb::PeerRole::Voter)),
            peers: peers
                .iter()
                .map(|p| peer_to_pb(p, pb::PeerRole::Voter))
                .collect(),
        }),
        ClientError::SteppingDown => Kind::LeaderSteppingDown(pb::LeaderSteppingDownException {
            message: e.to_string(),
        }),
        ClientError::NotReady { term } => {
            Kind::LeaderNotReady(pb::LeaderNotReadyException { leader_term: *term })
        }
        ClientError::StateMachine {
            message,
            rejected_before_logging,
        } => Kind::StateMachine(pb::StateMachineException {
            message: message.clone(),
            rejected_before_logging: *rejected_before_logging,
        }),
        ClientError::ResourceUnavailable { resource, message } => {
            Kind::ResourceUnavailable(pb::ResourceUnavailableException {
                resource: resource.to_string(),
                message: message.clone(),
            })
        }
        ClientError::NotReplicated { index, level } => {
            Kind::NotReplicated(pb::NotReplicatedException {
                call_id: 0,
                level: *level,
                log_index: *index,
            })
        }
        ClientError::Closed(m) => {
            Kind::AlreadyClosed(pb::AlreadyClosedException { message: m.clone() })
        }
    };
    pb::RaftException { kind: Some(kind) }
}

/// A request admitted to its group, waiting for the answer.
type Pending = Pin<Box<dyn std::future::Future<Output = pb::ClientReply> + Send>>;

impl Services {
    fn reply(
        &self,
        req: &pb::ClientRequest,
        result: ClientResult,
        g: Option<&GroupHandle>,
    ) -> pb::ClientReply {
        let commit_infos = g
            .map(|g| {
                // Only the progress: cloning the whole view per reply would
                // put a copy of the membership on every request's path.
                g.view
                    .lock()
                    .expect("view lock")
                    .progress
                    .iter()
                    .map(|(id, _, commit)| pb::CommitInfo {
                        peer_id: *id,
                        commit_index: *commit,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut r = pb::ClientReply {
            group_id: req.group_id.clone(),
            call_id: req.call_id,
            sequence_number: req.sequence_number,
            server_id: self.node.id,
            commit_infos,
            ..Default::default()
        };
        match result {
            Ok(s) => {
                r.success = true;
                r.log_index = s.index;
                r.payload = s.payload;
            }
            Err(e) => r.exception = Some(exception(&e)),
        }
        r
    }

    /// Checks a request and queues it at its group, in arrival order; the
    /// returned future waits for the answer.
    async fn admit(&self, req: pb::ClientRequest) -> Pending {
        use pb::client_request::Kind;
        let id = gid(&req.group_id);
        let Some(g) = self.node.group(&id) else {
            let mut r = self.reply(&req, Ok(Default::default()), None);
            r.success = false;
            r.exception = Some(pb::RaftException {
                kind: Some(pb::raft_exception::Kind::GroupMismatch(
                    pb::GroupMismatchException {
                        group_id: req.group_id.clone(),
                        message: NodeError::UnknownGroup(display_group(&id)).to_string(),
                    },
                )),
            });
            return Box::pin(async move { r });
        };
        let timeout = match req.timeout_ms {
            0 => DEFAULT_CLIENT_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let (tx, rx) = oneshot::channel();
        let msg = match &req.kind {
            Some(Kind::Write(_)) if req.answered_below > req.call_id => {
                let err = ClientError::StateMachine {
                    message: format!(
                        "answered_below {} exceeds the call's own id {}: a call cannot be \
                         answered before it is made; send at most the lowest unanswered call id",
                        req.answered_below, req.call_id
                    ),
                    rejected_before_logging: true,
                };
                let r = self.reply(&req, Err(err), Some(&g));
                return Box::pin(async move { r });
            }
            Some(Kind::Write(w)) => match g.limits.try_acquire(w.payload.len() as u64) {
                Ok(permit) => GroupMsg::Write {
                    client: req.client_id.clone(),
                    call: req.call_id,
                    answered_below: req.answered_below,
                    payload: w.payload.clone(),
                    permit,
                    reply: tx,
                },
                Err(e) => {
                    let err = ClientError::ResourceUnavailable {
                        resource: e.resource(),
                        message: e.to_string(),
                    };
                    let r = self.reply(&req, Err(err), Some(&g));
                    return Box::pin(async move { r });
                }
            },
            Some(Kind::Read(r)) => GroupMsg::Read {
                query: r.query.clone(),
                linearizable: !r.non_linearizable,
                reply: tx,
            },
            Some(Kind::StaleRead(r)) => GroupMsg::StaleRead {
                query: r.query.clone(),
                min_index: r.min_index,
                reply: tx,
            },
            Some(Kind::Watch(w)) => GroupMsg::Watch {
                index: w.index,
                level: w.level(),
                reply: tx,
            },
            None => {
                let err = ClientError::StateMachine {
                    message: "request has no kind; set write, read, stale_read or watch".into(),
                    rejected_before_logging: true,
                };
                let r = self.reply(&req, Err(err), Some(&g));
                return Box::pin(async move { r });
            }
        };
        let sent = g.tx.send(msg).await.is_ok();
        let this = self.clone();
        Box::pin(async move {
            let result = if !sent {
                Err(ClientError::Closed("the group stopped".into()))
            } else {
                match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(ClientError::Closed("the group stopped".into())),
                    Err(_) => match &req.kind {
                        Some(Kind::Watch(w)) => Err(ClientError::NotReplicated {
                            index: w.index,
                            level: w.level,
                        }),
                        _ => Err(ClientError::Closed(format!(
                            "no answer within {} ms; the request may still take effect (retry with the same call id)",
                            timeout.as_millis()
                        ))),
                    },
                }
            };
            this.reply(&req, result, Some(&g))
        })
    }
}

#[tonic::async_trait]
impl RaftClientProtocolService for Services {
    type OrderedStream = BoxStream<pb::ClientReply>;

    /// Requests are queued at their group in stream order (so pipelined
    /// writes are logged, and applied, in the client's order) and answered
    /// in the same order; at most `ORDERED_WINDOW` are in flight.
    async fn ordered(
        &self,
        req: Request<Streaming<pb::ClientRequest>>,
    ) -> Result<Response<Self::OrderedStream>, Status> {
        let queue: FuturesOrdered<Pending> = FuturesOrdered::new();
        Ok(self.pump(req.into_inner(), queue))
    }

    type UnorderedStream = BoxStream<pb::ClientReply>;

    /// Requests are independent; answers leave as they complete.
    async fn unordered(
        &self,
        req: Request<Streaming<pb::ClientRequest>>,
    ) -> Result<Response<Self::UnorderedStream>, Status> {
        let queue: FuturesUnordered<Pending> = FuturesUnordered::new();
        Ok(self.pump(req.into_inner(), queue))
    }
}

/// The in-flight requests of one client stream: answered in order
/// (`FuturesOrdered`) or as they complete (`FuturesUnordered`).
trait InFlight: Stream<Item = pb::ClientReply> + Unpin + Send + 'static {
    fn add(&mut self, p: Pending);
    fn in_flight(&self) -> usize;
}

impl InFlight for FuturesOrdered<Pending> {
    fn add(&mut self, p: Pending) {
        self.push_back(p)
    }
    fn in_flight(&self) -> usize {
        self.len()
    }
}

impl InFlight for FuturesUnordered<Pending> {
    fn add(&mut self, p: Pending) {
        self.push(p)
    }
    fn in_flight(&self) -> usize {
        self.len()
    }
}

impl Services {
    /// Admits a client stream's requests in arrival order, at most
    /// `ORDERED_WINDOW` in flight (reading stops meanwhile: back-pressure),
    /// and sends the answers as `inflight` yields them.
    fn pump(
        &self,
        mut inbound: Streaming<pb::ClientRequest>,
        mut inflight: impl InFlight,
    ) -> Response<BoxStream<pb::ClientReply>> {
        let (tx, rx) = mpsc::channel(ORDERED_WINDOW);
        let this = self.clone();
        tokio::spawn(async move {
            let mut open = true;
            while open || inflight.in_flight() > 0 {
                tokio::select! {
                    m = inbound.message(), if open && inflight.in_flight() < ORDERED_WINDOW => match m {
                        Ok(Some(r)) => {
                            let p = this.admit(r).await;
                            inflight.add(p);
                        }
                        Ok(None) => open = false,
                        Err(status) => {
                            // Say why (e.g. a message over the size limit)
                            // rather than just ending the stream.
                            let _ = tx.send(Err(status)).await;
                            open = false;
                        }
                    },
                    Some(reply) = inflight.next(), if inflight.in_flight() > 0 => {
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }
}

// ---------------------------------------------------------------------------
// Admin
// ---------------------------------------------------------------------------

fn admin_reply(group: Option<pb::GroupId>, result: AdminResult) -> pb::AdminReply {
    let mut r = pb::AdminReply {
        group_id: group,
        ..Default::default()
    };
    match result {
        Ok(index) => {
            r.success = true;
            r.log_index = index;
        }
        Err(AdminError::NotLeader { leader }) => {
            r.error = format!(
                "this member is not the leader; send the request to {}",
                leader.as_ref().map_or(
                    "the leader (unknown right now; retry shortly)".to_string(),
                    |p| format!("member {} at {}", p.id, p.address)
                )
            );
            r.exception = Some(exception(&ClientError::NotLeader {
                leader,
                peers: Vec::new(),
            }));
        }
        Err(AdminError::Failed(e)) => r.error = e,
    }
    r
}

fn peers_from_pb(peers: &[pb::Peer]) -> Result<Vec<PeerInfo>, Status> {
    peers
        .iter()
        .map(|p| {
            if p.id == 0 {
                return Err(Status::invalid_argument(
                    "member id 0 is reserved; give every member a non-zero id",
                ));
            }
            if p.address.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "member {} has no address; give host:port",
                    p.id
                )));
            }
            Ok(peer_from_pb(p))
        })
        .collect()
}

async fn await_admin(rx: oneshot::Receiver<AdminResult>, timeout: Duration) -> AdminResult {
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(AdminError::Failed("the group stopped".into())),
        Err(_) => Err(AdminError::Failed(format!(
            "no outcome within {} ms; check groupInfo, it may still complete",
            timeout.as_millis()
        ))),
    }
}

fn admin_timeout(ms: u64) -> Duration {
    if ms == 0 {
        Duration::from_secs(30)
    } else {
        Duration::from_millis(ms)
    }
}

#[tonic::async_trait]
impl AdminProtocolService for Services {
    async fn set_configuration(
        &self,
        req: Request<pb::SetConfigurationRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let r = req.into_inner();
        let g = self.group(&r.group_id)?;
        let voters = peers_from_pb(&r.peers)?;
        let listeners = peers_from_pb(&r.listeners)?;
        let mode = match r.mode() {
            pb::SetConfigurationMode::Unspecified
            | pb::SetConfigurationMode::SetUnconditionally => ConfChangeMode::SetUnconditionally,
            pb::SetConfigurationMode::Add => ConfChangeMode::Add,
            pb::SetConfigurationMode::CompareAndSet => ConfChangeMode::CompareAndSet {
                voters: peers_from_pb(&r.expected_peers)?,
                listeners: peers_from_pb(&r.expected_listeners)?,
            },
        };
        let (tx, rx) = oneshot::channel();
        let msg = GroupMsg::ChangeMembership {
            req: ConfChangeRequest {
                mode,
                voters,
                listeners,
            },
            reply: tx,
        };
        g.tx.send(msg)
            .await
            .map_err(|_| Status::unavailable("group is stopping"))?;
        let result = await_admin(rx, admin_timeout(r.timeout_ms)).await;
        Ok(Response::new(admin_reply(r.group_id, result)))
    }

    async fn transfer_leadership(
        &self,
        req: Request<pb::TransferLeadershipRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let r = req.into_inner();
        let g = self.group(&r.group_id)?;
        let timeout = admin_timeout(r.timeout_ms).min(Duration::from_secs(60));
        let (tx, rx) = oneshot::channel();
        let msg = GroupMsg::Transfer {
            target: (r.target_id != 0).then_some(r.target_id),
            timeout,
            reply: tx,
        };
        g.tx.send(msg)
            .await
            .map_err(|_| Status::unavailable("group is stopping"))?;
        let result = await_admin(rx, timeout + Duration::from_secs(1)).await;
        Ok(Response::new(admin_reply(r.group_id, result)))
    }

    async fn group_management(
        &self,
        req: Request<pb::GroupManagementRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        use pb::group_management_request::Op;
        let r = req.into_inner();
        let (group, result) = match r.op {
            Some(Op::Add(a)) => {
                let voters = peers_from_pb(&a.peers)?;
                let listeners = peers_from_pb(&a.listeners)?;
                let res = self
                    .node
                    .add_group(gid(&a.group_id), &voters, &listeners, &a.state_machine)
                    .await;
                (a.group_id, res)
            }
            Some(Op::Remove(rm)) => {
                let res = self
                    .node
                    .remove_group(&gid(&rm.group_id), rm.delete_data)
                    .await;
                (rm.group_id, res)
            }
            None => {
                return Err(Status::invalid_argument(
                    "groupManagement needs add or remove",
                ));
            }
        };
        let result = result
            .map(|()| 0)
            .map_err(|e| AdminError::Failed(e.to_string()));
        Ok(Response::new(admin_reply(group, result)))
    }

    async fn snapshot_management(
        &self,
        req: Request<pb::SnapshotManagementRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let r = req.into_inner();
        let g = self.group(&r.group_id)?;
        if !r.create {
            return Err(Status::invalid_argument("snapshotManagement: set create"));
        }
        let (tx, rx) = oneshot::channel();
        g.tx.send(GroupMsg::TakeSnapshot { reply: tx })
            .await
            .map_err(|_| Status::unavailable("group is stopping"))?;
        let result = await_admin(rx, admin_timeout(r.timeout_ms)).await;
        Ok(Response::new(admin_reply(r.group_id, result)))
    }

    async fn leader_election_management(
        &self,
        req: Request<pb::LeaderElectionManagementRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let r = req.into_inner();
        let g = self.group(&r.group_id)?;
        g.tx.send(GroupMsg::PauseElections { pause: r.pause })
            .await
            .map_err(|_| Status::unavailable("group is stopping"))?;
        Ok(Response::new(admin_reply(r.group_id, Ok(0))))
    }

    async fn group_list(
        &self,
        _req: Request<pb::GroupListRequest>,
    ) -> Result<Response<pb::GroupListReply>, Status> {
        Ok(Response::new(pb::GroupListReply {
            server_id: self.node.id,
            group_ids: self
                .node
                .groups()
                .iter()
                .map(|g| pb::GroupId { id: g.id.clone() })
                .collect(),
        }))
    }

    async fn group_info(
        &self,
        req: Request<pb::GroupInfoRequest>,
    ) -> Result<Response<pb::GroupInfoReply>, Status> {
        let r = req.into_inner();
        let g = self.group(&r.group_id)?;
        let v = g.view();
        let role = match v.role.as_str() {
            "leader" => pb::RaftRole::Leader,
            "candidate" | "pre-candidate" => pb::RaftRole::Candidate,
            "listener" => pb::RaftRole::Listener,
            _ => pb::RaftRole::Follower,
        };
        Ok(Response::new(pb::GroupInfoReply {
            group_id: group_pb(&g.id),
            server_id: self.node.id,
            role: role as i32,
            leader_id: v.leader.unwrap_or(0),
            term: v.term,
            configuration: Some(v.membership_pb()),
            commit_infos: v
                .progress
                .iter()
                .map(|(id, _, c)| pb::CommitInfo {
                    peer_id: *id,
                    commit_index: *c,
                })
                .collect(),
            last_index: v.last_index,
            commit_index: v.commit_index,
            applied_index: v.applied_index,
            snapshot_index: v.snapshot_index,
            storage: Some(pb::StorageHealth {
                healthy: v.storage_healthy,
                message: v.storage_message.clone(),
            }),
            elections_paused: v.elections_paused,
        }))
    }
}

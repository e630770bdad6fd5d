//! What peers may send, end to end over gRPC on loopback, in one process:
//!
//! - replies: a fake peer answers a real transport with numbers past the
//!   bound, in another member's name or of the wrong kind; none of it
//!   reaches the group, while its honest answers do;
//! - requests: a real node refuses appends, snapshots, votes, elections and
//!   read-index requests sent as member 0 or as itself, snapshots whose
//!   declared sizes overflow and chunks past their declared size, each with
//!   InvalidArgument and the reason, and none of it changes the group.
//!
//! The same conversions are property-tested in `bad_input.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use kuberaft_node::convert::MAX_TERM_OR_INDEX;
use kuberaft_node::core::{
    AppendEntries, Envelope, InstallSnapshot, Membership, Message, NodeId, PeerInfo,
    ReadIndexRequest, RequestVote, SnapshotMeta,
};
use kuberaft_node::rpc::peer::{PeerTransport, channel};
use kuberaft_node::rpc::{self, Services};
use kuberaft_node::server::group::{GroupHandle, GroupMsg, GroupOptions, GroupView, Transport};
use kuberaft_node::server::limits::PendingLimits;
use kuberaft_node::server::node::{Node, NodeOptions, Router};
use kuberaft_node::storage::GroupStorageOptions;
use kuberaft_proto::v1 as pb;
use kuberaft_proto::v1::raft_server_protocol_service_client::RaftServerProtocolServiceClient;
use kuberaft_proto::v1::raft_server_protocol_service_server::{
    RaftServerProtocolService, RaftServerProtocolServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

const FAKE: NodeId = 2;
const ME: NodeId = 1;

/// How the fake peer spoils its replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Damage {
    Honest,
    /// Every reply's term.
    Term(u64),
    /// The index the reply reports: match index, read index, snapshot index.
    Index(u64),
    /// The reply names another member as its sender.
    Sender,
    /// The reply is of the wrong kind: a pre-vote answered as a vote, a
    /// read answered for another context, an append without a result.
    Kind,
}

#[derive(Clone, Debug)]
struct FakePeer {
    damage: Arc<Mutex<Damage>>,
    /// Replies sent so far.
    answered: Arc<Mutex<u64>>,
}

type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl FakePeer {
    fn damage(&self) -> Damage {
        *self.damage.lock().unwrap()
    }

    fn answered(&self) {
        *self.answered.lock().unwrap() += 1;
    }

    fn term(&self, honest: u64) -> u64 {
        match self.damage() {
            Damage::Term(t) => t,
            _ => honest,
        }
    }

    fn index(&self, honest: u64) -> u64 {
        match self.damage() {
            Damage::Index(i) => i,
            _ => honest,
        }
    }

    fn me(&self) -> NodeId {
        if self.damage() == Damage::Sender {
            FAKE + 1
        } else {
            FAKE
        }
    }
}

#[tonic::async_trait]
impl RaftServerProtocolService for FakePeer {
    async fn ping(&self, _: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        Ok(Response::new(pb::PingReply {
            server_id: FAKE,
            incarnation: 1,
        }))
    }

    async fn request_vote(
        &self,
        req: Request<pb::RequestVoteRequest>,
    ) -> Result<Response<pb::RequestVoteReply>, Status> {
        let r = req.into_inner();
        let reply = pb::RequestVoteReply {
            group_id: r.group_id,
            voter_id: self.me(),
            term: self.term(r.term),
            granted: true,
            pre_vote: r.pre_vote != (self.damage() == Damage::Kind),
            reason: String::new(),
        };
        self.answered();
        Ok(Response::new(reply))
    }

    async fn start_leader_election(
        &self,
        _: Request<pb::StartLeaderElectionRequest>,
    ) -> Result<Response<pb::StartLeaderElectionReply>, Status> {
        Ok(Response::new(pb::StartLeaderElectionReply::default()))
    }

    type AppendEntriesStream = BoxStream<pb::AppendEntriesReply>;

    async fn append_entries(
        &self,
        req: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<Self::AppendEntriesStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let last = r.previous.unwrap_or_default().index + r.entries.len() as u64;
                let result = if this.damage() == Damage::Kind {
                    pb::AppendResult::Unspecified
                } else {
                    pb::AppendResult::Success
                };
                let reply = pb::AppendEntriesReply {
                    group_id: r.group_id,
                    follower_id: this.me(),
                    term: this.term(r.leader_term),
                    result: result as i32,
                    next_index: last + 1,
                    match_index: this.index(last),
                    call_id: r.call_id,
                    ..Default::default()
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
                this.answered();
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type InstallSnapshotStream = BoxStream<pb::InstallSnapshotReply>;

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::InstallSnapshotRequest>>,
    ) -> Result<Response<Self::InstallSnapshotStream>, Status> {
        let mut inbound = req.into_inner();
        let head = inbound.message().await?.unwrap_or_default();
        while let Some(r) = inbound.message().await? {
            if r.done {
                break;
            }
        }
        let reply = pb::InstallSnapshotReply {
            group_id: head.group_id,
            follower_id: self.me(),
            term: self.term(head.leader_term),
            result: pb::InstallSnapshotResult::Success as i32,
            snapshot_index: self.index(head.last_included.unwrap_or_default().index),
            ..Default::default()
        };
        self.answered();
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(reply)))))
    }

    async fn read_index(
        &self,
        req: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexReply>, Status> {
        let r = req.into_inner();
        let context = if self.damage() == Damage::Kind {
            r.context + 1
        } else {
            r.context
        };
        let reply = pb::ReadIndexReply {
            group_id: r.group_id,
            context,
            success: true,
            read_index: self.index(7),
            term: self.term(r.term),
            exception: None,
        };
        self.answered();
        Ok(Response::new(reply))
    }
}

async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn peer(id: NodeId, address: &str) -> PeerInfo {
    PeerInfo {
        id,
        address: address.to_string(),
        priority: 0,
    }
}

/// The next message the group is asked to handle, leaving out liveness
/// news (the transport pings the fake peer on its own).
async fn next(inbox: &mut mpsc::Receiver<GroupMsg>, within: Duration) -> Option<GroupMsg> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, inbox.recv()).await {
            Ok(Some(GroupMsg::PeerChanged { .. })) => continue,
            Ok(m) => return m,
            Err(_) => return None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Vote,
    Read,
    Append,
    Snapshot,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_past_the_bound_or_in_another_name_never_reach_the_group() {
    let fake = FakePeer {
        damage: Arc::new(Mutex::new(Damage::Honest)),
        answered: Arc::default(),
    };
    let (l, addr) = listen().await;
    let server = tonic::transport::Server::builder()
        .add_service(RaftServerProtocolServiceServer::new(fake.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l));
    tokio::spawn(server);

    let group = Bytes::from_static(b"g");
    let (tx, mut inbox) = mpsc::channel(64);
    let router: Router = Arc::default();
    router.write().unwrap().insert(
        group.clone(),
        GroupHandle {
            id: group.clone(),
            tx,
            view: Arc::new(Mutex::new(GroupView::default())),
            limits: PendingLimits::new(16, 1 << 20),
        },
    );
    let t = PeerTransport::new(ME, router);
    let members = [peer(ME, "127.0.0.1:1"), peer(FAKE, &addr)];
    t.learn(&Membership::from_lists(&members, &[]).unwrap());

    let damages = [
        Damage::Term(u64::MAX),
        Damage::Term(MAX_TERM_OR_INDEX + 1),
        Damage::Index(u64::MAX),
        Damage::Index(MAX_TERM_OR_INDEX + 1),
        Damage::Sender,
        Damage::Kind,
        // Last, so each kind ends with proof that its replies get through.
        Damage::Honest,
    ];
    let mut round = 0;
    for kind in [Kind::Vote, Kind::Read, Kind::Append, Kind::Snapshot] {
        for damage in damages {
            // A vote reply carries no index, a read-index reply names no
            // sender, and a snapshot reply's kind is its result, any of
            // which is a valid answer.
            let applies = match damage {
                Damage::Index(_) => !matches!(kind, Kind::Vote),
                Damage::Sender => !matches!(kind, Kind::Read),
                Damage::Kind => !matches!(kind, Kind::Snapshot),
                _ => true,
            };
            if !applies {
                continue;
            }
            *fake.damage.lock().unwrap() = damage;
            let answered = *fake.answered.lock().unwrap();
            round += 1;
            let msg = match kind {
                Kind::Vote => Message::RequestVote(RequestVote {
                    term: 5,
                    last_index: 0,
                    last_term: 0,
                    pre_vote: true,
                    transfer: false,
                    priority: 0,
                }),
                Kind::Read => Message::ReadIndex(ReadIndexRequest { term: 5, ctx: 42 }),
                Kind::Append => Message::AppendEntries(AppendEntries {
                    term: 5,
                    prev_index: 3,
                    prev_term: 5,
                    entries: Vec::new(),
                    leader_commit: 3,
                    round,
                    quiesce: false,
                }),
                Kind::Snapshot => Message::InstallSnapshot(InstallSnapshot {
                    term: 5,
                    meta: SnapshotMeta {
                        index: 9,
                        term: 5,
                        membership: Membership::from_lists(&members, &[]).unwrap(),
                    },
                }),
            };
            match msg {
                Message::InstallSnapshot(install) => {
                    let files = vec![("kv".to_string(), b"data".to_vec())];
                    t.send_snapshot(&group, FAKE, install, files);
                }
                msg => t.send(
                    &group,
                    Envelope {
                        from: ME,
                        to: FAKE,
                        msg,
                    },
                ),
            }
            let case = format!("{kind:?} reply with {damage:?}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while *fake.answered.lock().unwrap() == answered {
                assert!(Instant::now() < deadline, "{case}: the fake peer answers");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A spoilt reply is dropped: give it the time an honest one
            // takes to arrive (a failed snapshot is reported, though).
            let wait = if damage == Damage::Honest || matches!(kind, Kind::Snapshot) {
                Duration::from_secs(10)
            } else {
                Duration::from_millis(300)
            };
            let got = next(&mut inbox, wait).await;
            let step = match got {
                Some(GroupMsg::Step { from, msg, .. }) => {
                    assert_eq!(from, FAKE, "{case}");
                    Some(msg)
                }
                Some(GroupMsg::SnapshotFailed { to }) => {
                    assert_eq!(to, FAKE, "{case}");
                    None
                }
                None => None,
                Some(other) => panic!("{case}: the group got {other:?}"),
            };
            if damage != Damage::Honest {
                assert_eq!(step, None, "{case} reached the group");
                continue;
            }
            let step = step.unwrap_or_else(|| panic!("{case}: the honest reply is delivered"));
            match (kind, step) {
                (Kind::Vote, Message::RequestVoteReply(v)) => {
                    assert!(v.granted() && v.pre_vote && v.term == 5)
                }
                (Kind::Read, Message::ReadIndexReply(r)) => {
                    assert_eq!((r.ctx, r.result), (42, Ok(7)))
                }
                (Kind::Append, Message::AppendEntriesReply(a)) => {
                    assert_eq!((a.match_index, a.round), (3, round))
                }
                (Kind::Snapshot, Message::InstallSnapshotReply(i)) => {
                    assert!(i.accepted && i.snapshot_index == 9)
                }
                (kind, other) => panic!("{kind:?}: unexpected {other:?}"),
            }
        }
    }
}

/// One node serving its services in this process, with a group `g` it
/// leads alone.
struct OneNode {
    node: Arc<Node>,
    addr: String,
    _dir: tempfile::TempDir,
}

impl OneNode {
    async fn start() -> OneNode {
        let dir = tempfile::tempdir().unwrap();
        let (l, addr) = listen().await;
        let opts = NodeOptions {
            data_dir: dir.path().to_path_buf(),
            advertise: addr.clone(),
            group: GroupOptions {
                tick: Duration::from_millis(10),
                // Generous: the test machine is shared.
                stall_threshold: Duration::from_secs(5),
                ..GroupOptions::default()
            },
            storage: GroupStorageOptions::default(),
            log_threads: 1,
        };
        let node = Node::open(opts, |id, router| -> Arc<dyn Transport> {
            PeerTransport::new(id, router)
        })
        .unwrap();
        let services = Services { node: node.clone() };
        tokio::spawn(rpc::serve(services, l, std::future::pending()));
        node.add_group(Bytes::from_static(b"g"), &[peer(node.id, &addr)], &[], "kv")
            .await
            .unwrap();
        let n = OneNode {
            node,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Settled: leading, and past the entry that raises the cluster level,
        // so that the log moves only on what a test sends.
        while n.view().role != "leader"
            || n.view().cluster_level != kuberaft_node::core::FEATURE_LEVEL
            || n.view().commit_index != n.view().last_index
        {
            assert!(Instant::now() < deadline, "the node leads its group");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    }

    fn view(&self) -> GroupView {
        self.node.group(b"g").unwrap().view()
    }

    fn peer(&self) -> RaftServerProtocolServiceClient<Channel> {
        RaftServerProtocolServiceClient::new(channel(&self.addr).unwrap())
    }
}

fn gid() -> Option<pb::GroupId> {
    Some(pb::GroupId {
        id: Bytes::from_static(b"g"),
    })
}

/// Asserts a refusal as InvalidArgument whose message contains `says`.
fn refused(case: &str, r: Result<impl std::fmt::Debug, Status>, says: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{case}: {s:?}");
            assert!(s.message().contains(says), "{case}: {:?}", s.message());
        }
        Ok(r) => panic!("{case}: accepted, answered {r:?}"),
    }
}

async fn answer<T>(case: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{case}: no answer within 10 s"))
}

/// The first reply on an append stream carrying `r`, or why it ended.
async fn append(
    peer: &mut RaftServerProtocolServiceClient<Channel>,
    r: pb::AppendEntriesRequest,
) -> Result<Option<pb::AppendEntriesReply>, Status> {
    let mut s = peer
        .append_entries(tokio_stream::iter(vec![r]))
        .await?
        .into_inner();
    s.message().await
}

/// Declared snapshot files: name and size.
type Files = Vec<(&'static str, u64)>;
/// Chunks of a file: offset and data.
type Chunks = Vec<(u64, Vec<u8>)>;

/// A snapshot stream: a head declaring `files`, then `chunks` of the
/// first file, the last marked done.
async fn snapshot(
    peer: &mut RaftServerProtocolServiceClient<Channel>,
    leader: NodeId,
    me: NodeId,
    term: u64,
    files: Files,
    chunks: Chunks,
) -> Result<Option<pb::InstallSnapshotReply>, Status> {
    let name = files.first().map(|f| f.0.to_string()).unwrap_or_default();
    let head = pb::InstallSnapshotRequest {
        group_id: gid(),
        leader_id: leader,
        follower_id: me,
        leader_term: term,
        last_included: Some(pb::TermIndex { term, index: 1000 }),
        files: files
            .iter()
            .map(|(name, size)| pb::SnapshotFile {
                name: name.to_string(),
                size: *size,
                crc32c: 0,
            })
            .collect(),
        done: chunks.is_empty(),
        ..Default::default()
    };
    let n = chunks.len();
    let rest =
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, (offset, data))| pb::InstallSnapshotRequest {
                chunk: Some(pb::SnapshotChunk {
                    file_name: name.clone(),
                    offset,
                    data: Bytes::from(data),
                    done: i + 1 == n,
                }),
                done: i + 1 == n,
                ..Default::default()
            });
    let all: Vec<_> = std::iter::once(head).chain(rest).collect();
    let mut s = peer
        .install_snapshot(tokio_stream::iter(all))
        .await?
        .into_inner();
    s.message().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_member_0_or_from_the_node_itself_are_refused_and_change_nothing() {
    let n = OneNode::start().await;
    let before = n.view();
    let me = n.node.id;
    // Every forged request carries a newer term: taken, it would show.
    let term = before.term + 1;
    let mut peer = n.peer();
    for from in [0, me] {
        let says = format!("from member {from}:");
        let r = pb::AppendEntriesRequest {
            group_id: gid(),
            leader_id: from,
            follower_id: me,
            leader_term: term,
            previous: Some(pb::TermIndex {
                term: before.term,
                index: before.last_index,
            }),
            leader_commit: before.commit_index,
            ..Default::default()
        };
        let case = format!("append from {from}");
        refused(&case, answer(&case, append(&mut peer, r)).await, &says);

        let case = format!("snapshot from {from}");
        let r = snapshot(&mut peer, from, me, term, Vec::new(), Vec::new());
        refused(&case, answer(&case, r).await, &says);

        let case = format!("vote request from {from}");
        let r = peer.request_vote(pb::RequestVoteRequest {
            group_id: gid(),
            candidate_id: from,
            voter_id: me,
            term,
            last_entry: Some(pb::TermIndex {
                term: before.term,
                index: before.last_index + 10,
            }),
            ..Default::default()
        });
        refused(&case, answer(&case, r).await, &says);

        let case = format!("election request from {from}");
        let r = peer.start_leader_election(pb::StartLeaderElectionRequest {
            group_id: gid(),
            leader_id: from,
            target_id: me,
            leader_term: term,
            leader_last_entry: None,
        });
        refused(&case, answer(&case, r).await, &says);

        let case = format!("read index request from {from}");
        let r = peer.read_index(pb::ReadIndexRequest {
            group_id: gid(),
            follower_id: from,
            context: 1,
            term,
        });
        refused(&case, answer(&case, r).await, &says);
    }
    // A malformed append ends its stream with the reason, too.
    let r = pb::AppendEntriesRequest {
        group_id: gid(),
        leader_id: 424242,
        follower_id: me,
        leader_term: u64::MAX,
        ..Default::default()
    };
    let case = "append with term 2^64-1";
    refused(
        case,
        answer(case, append(&mut peer, r)).await,
        "leader term",
    );

    let after = n.view();
    assert_eq!(after.role, "leader");
    assert_eq!(after.leader, Some(me));
    assert_eq!(after.term, before.term, "no forged term was taken");
    assert_eq!(after.last_index, before.last_index);
    assert_eq!(after.snapshot_index, before.snapshot_index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_whose_sizes_overflow_or_whose_chunks_overrun_are_refused() {
    let n = OneNode::start().await;
    let before = n.view();
    let me = n.node.id;
    let term = before.term;
    let mut peer = n.peer();
    let half = 1u64 << 63;
    let cases: Vec<(&str, Files, Chunks, &str)> = vec![
        (
            // Wraps to 1: under the limit if added unchecked.
            "sizes adding up to 2^64 + 1",
            vec![("kv", u64::MAX), ("other", 2)],
            Vec::new(),
            "add up past 2^64",
        ),
        (
            "sizes adding up to 2^64 exactly",
            vec![("kv", half), ("other", half)],
            Vec::new(),
            "add up past 2^64",
        ),
        (
            "a chunk longer than its file",
            vec![("kv", 3)],
            vec![(0, b"abcdefghij".to_vec())],
            "past the file's declared size of 3 bytes",
        ),
        (
            "chunks past their file's size together",
            vec![("kv", 4)],
            vec![(0, b"abc".to_vec()), (3, b"de".to_vec())],
            "ends at byte 5, past the file's declared size of 4 bytes",
        ),
        (
            "a chunk whose end overflows",
            vec![("kv", 4)],
            vec![(u64::MAX - 1, b"abcd".to_vec())],
            "ends past 2^64",
        ),
        (
            "a file listed twice",
            vec![("kv", 4), ("kv", 5)],
            Vec::new(),
            "listed twice",
        ),
    ];
    for (case, files, chunks, says) in cases {
        let r = snapshot(&mut peer, 424242, me, term, files, chunks);
        refused(case, answer(case, r).await, says);
    }
    let after = n.view();
    assert_eq!(after.role, "leader");
    assert_eq!(after.term, before.term);
    assert_eq!(after.snapshot_index, before.snapshot_index);
    assert_eq!(after.last_index, before.last_index);
}

//! The client library: used by the CLI, the tests and the operator.
//!
//! A [`Client`] talks to one group through any of its members. It keeps one
//! unordered request stream per member (opened on first use, reopened after
//! a failure) and multiplexes every concurrent call over it, so one client
//! can carry thousands of calls in flight.
//!
//! Each call goes to the member believed to lead. A NotLeader answer moves it
//! to the suggested leader (or the next member); transport failures, a leader
//! stepping down and back-pressure retry with exponential backoff and jitter
//! until the call's deadline. A member that does not host the group sends the
//! call on to the next; once every member refused it that way the group does
//! not exist, a definite answer that fails the call at once
//! ([`ClientError::UnknownGroup`]): waiting could not change it. A write keeps its call id across retries, so
//! the servers' retry cache applies it at most once and a retry gets the
//! first attempt's answer: exactly-once within the retry-cache window.
//!
//! Every write also carries the client's watermark: the lowest call id it
//! handed out whose outcome is not settled (answered, or given up by the
//! caller). The servers forget the replies below it, which keeps their retry
//! cache, and every snapshot that carries it, as small as the calls in
//! flight. A write that timed out stays unsettled, so it can still be
//! retried, until the caller says otherwise with [`Client::settle`].

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kuberaft_proto::v1 as pb;
use kuberaft_proto::v1::raft_client_protocol_service_client::RaftClientProtocolServiceClient;
use kuberaft_proto::v1::raft_exception::Kind;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::rpc::peer::channel;
use crate::server::group::display_group;

/// The group a CLI or client uses when none is named.
pub const DEFAULT_GROUP: &str = "default";

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Deadline of one call, retries included.
    pub timeout: Duration,
    /// Server-side timeout of one attempt.
    pub attempt_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(1000),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no answer within {after:?} (last problem: {last}){}",
        if *write { "; the write may still take effect: retry it with the same call id" } else { "" }
    )]
    Timeout {
        after: Duration,
        last: String,
        /// Whether the call was a write, whose outcome is then unknown.
        write: bool,
    },
    #[error("state machine refused the request: {message}")]
    StateMachine {
        message: String,
        rejected_before_logging: bool,
    },
    /// Every member the client knows said it does not host the group, and
    /// no attempt of the call reached one that did: it was applied nowhere.
    /// `message` is the server's, which says how to create the group.
    #[error("{message}")]
    UnknownGroup { group: String, message: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the answer could not be decoded: {0}")]
    Decode(String),
}

/// A successful call: the log index it was applied or read at, and the
/// state machine's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub index: u64,
    pub payload: Bytes,
    pub server_id: u64,
}

/// One member's request stream.
#[derive(Debug)]
struct Stream {
    tx: mpsc::Sender<pb::ClientRequest>,
    waiters: Arc<Mutex<HashMap<u64, oneshot::Sender<pb::ClientReply>>>>,
    alive: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Conn {
    address: String,
    stream: tokio::sync::Mutex<Option<Arc<Stream>>>,
}

#[derive(Debug)]
struct Inner {
    group: Bytes,
    client_id: Bytes,
    calls: Mutex<Calls>,
    next_tag: AtomicU64,
    conns: Mutex<Vec<Arc<Conn>>>,
    leader: AtomicUsize,
    opts: ClientOptions,
}

/// The call ids a client handed out.
#[derive(Debug)]
struct Calls {
    next: u64,
    /// Handed out, outcome not settled: the caller may still retry them.
    unsettled: BTreeSet<u64>,
}

#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What went wrong with one attempt, and where to try next.
enum Attempt {
    Done(pb::ClientReply),
    Fatal(ClientError),
    /// The member does not host the group: the next one may.
    NoGroup {
        why: String,
        message: String,
    },
    /// The request never left this process (no connection): like `Retry`,
    /// but certainly not applied.
    Unsent {
        why: String,
    },
    Retry {
        why: String,
        next: Option<usize>,
    },
    /// The same member, after a backoff (its leader is getting ready).
    Wait {
        why: String,
    },
}

impl Client {
    /// A client of `group` reaching it through `peers` (host:port, any
    /// members; the leader is found).
    pub fn new(peers: &[String], group: &[u8], opts: ClientOptions) -> Result<Client, ClientError> {
        if peers.is_empty() {
            return Err(ClientError::Invalid(
                "no peers given; pass --peers host:port,... or set KUBERAFT_PEERS".into(),
            ));
        }
        let conns = peers
            .iter()
            .map(|a| {
                Arc::new(Conn {
                    address: a.clone(),
                    stream: tokio::sync::Mutex::new(None),
                })
            })
            .collect();
        let client_id: [u8; 16] = rand::random();
        Ok(Client {
            inner: Arc::new(Inner {
                group: Bytes::copy_from_slice(group),
                client_id: Bytes::copy_from_slice(&client_id),
                calls: Mutex::new(Calls {
                    next: 1,
                    unsettled: BTreeSet::new(),
                }),
                next_tag: AtomicU64::new(1),
                conns: Mutex::new(conns),
                leader: AtomicUsize::new(0),
                opts,
            }),
        })
    }

    /// The same client under another identity for retries: a process that
    /// restarts and retries its calls passes the id it used before. The
    /// calls it retries must keep their ids and its new calls must not reuse
    /// them: see [`Self::skip_call_ids`].
    pub fn with_client_id(&self, client_id: Bytes) -> Result<Client, ClientError> {
        let peers: Vec<String> = self
            .inner
            .conns
            .lock()
            .expect("lock")
            .iter()
            .map(|c| c.address.clone())
            .collect();
        let c = Client::new(&peers, &self.inner.group, self.inner.opts.clone())?;
        let mut inner = Arc::try_unwrap(c.inner).expect("fresh client");
        inner.client_id = client_id;
        Ok(Client {
            inner: Arc::new(inner),
        })
    }

    pub fn client_id(&self) -> &Bytes {
        &self.inner.client_id
    }

    /// A fresh call id for [`Self::write_call`]. It stays unsettled (and
    /// holds the watermark back) until a call with it gets a definite answer
    /// or [`Self::settle`] is called.
    pub fn next_call_id(&self) -> u64 {
        let mut c = self.inner.calls.lock().expect("lock");
        let id = c.next;
        c.next += 1;
        c.unsettled.insert(id);
        id
    }

    /// New call ids start at `next` or above, e.g. after a restart under the
    /// same client id, above every id the previous run used.
    pub fn skip_call_ids(&self, next: u64) {
        let mut c = self.inner.calls.lock().expect("lock");
        c.next = c.next.max(next);
    }

    /// The caller will not retry `call_id` (a write that timed out, given
    /// up): the servers may forget it.
    pub fn settle(&self, call_id: u64) {
        self.inner
            .calls
            .lock()
            .expect("lock")
            .unsettled
            .remove(&call_id);
    }

    /// Every call id below this was settled.
    fn answered_below(&self) -> u64 {
        let c = self.inner.calls.lock().expect("lock");
        c.unsettled.first().copied().unwrap_or(c.next)
    }

    /// Writes a state machine command (exactly once).
    pub async fn write(&self, payload: Bytes) -> Result<Reply, ClientError> {
        self.write_call(self.next_call_id(), payload).await
    }

    /// Writes with a caller-chosen call id: calling again with the same id
    /// (a retry after a lost answer) returns the first call's result without
    /// applying it twice.
    pub async fn write_call(&self, call_id: u64, payload: Bytes) -> Result<Reply, ClientError> {
        let kind = pb::client_request::Kind::Write(pb::WriteRequest { payload });
        self.call(call_id, kind).await
    }

    /// A linearizable read.
    pub async fn read(&self, query: Bytes) -> Result<Reply, ClientError> {
        let kind = pb::client_request::Kind::Read(pb::ReadRequest {
            query,
            non_linearizable: false,
        });
        self.call(self.next_call_id(), kind).await
    }

    /// A read of whatever state the answering member has.
    pub async fn read_local(&self, query: Bytes) -> Result<Reply, ClientError> {
        let kind = pb::client_request::Kind::Read(pb::ReadRequest {
            query,
            non_linearizable: true,
        });
        self.call(self.next_call_id(), kind).await
    }

    /// A read served once the answering member applied `min_index`.
    pub async fn stale_read(&self, query: Bytes, min_index: u64) -> Result<Reply, ClientError> {
        let kind = pb::client_request::Kind::StaleRead(pb::StaleReadRequest { query, min_index });
        self.call(self.next_call_id(), kind).await
    }

    /// Waits until `index` reached `level`.
    pub async fn watch(
        &self,
        index: u64,
        level: pb::ReplicationLevel,
    ) -> Result<Reply, ClientError> {
        let kind = pb::client_request::Kind::Watch(pb::WatchRequest {
            index,
            level: level as i32,
        });
        self.call(self.next_call_id(), kind).await
    }

    async fn call(
        &self,
        call_id: u64,
        kind: pb::client_request::Kind,
    ) -> Result<Reply, ClientError> {
        let result = self.call_once(call_id, kind).await;
        // Only a write without an answer may be retried with this id.
        if !matches!(result, Err(ClientError::Timeout { write: true, .. })) {
            self.settle(call_id);
        }
        result
    }

    async fn call_once(
        &self,
        call_id: u64,
        kind: pb::client_request::Kind,
    ) -> Result<Reply, ClientError> {
        let o = &self.inner.opts;
        let is_write = matches!(kind, pb::client_request::Kind::Write(_));
        let started = Instant::now();
        let mut backoff = o.backoff_min;
        let mut last = String::from("no attempt made");
        let mut target = self.inner.leader.load(Ordering::Relaxed);
        let mut attempts = 0u32;
        // Members (by connection) that said they do not host the group.
        let mut without_group = BTreeSet::new();
        // Whether a member hosting the group may have got this call: a
        // write it took may still be applied, so no later refusal can
        // prove that it was applied nowhere (a group removed meanwhile).
        let mut maybe_delivered = false;
        loop {
            let left = o.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(ClientError::Timeout {
                    after: o.timeout,
                    last,
                    write: is_write,
                });
            }
            let req = pb::ClientRequest {
                group_id: Some(pb::GroupId {
                    id: self.inner.group.clone(),
                }),
                client_id: self.inner.client_id.clone(),
                call_id,
                // The server gives up a little before the client does, so a
                // watch or read that cannot finish says why instead of
                // going silent.
                timeout_ms: o.attempt_timeout.min(left.mul_f64(0.9)).as_millis() as u64,
                // Never above the call's own id: a caller-chosen id below
                // the watermark is sent without one.
                answered_below: if is_write {
                    Some(self.answered_below())
                        .filter(|w| *w <= call_id)
                        .unwrap_or(0)
                } else {
                    0
                },
                kind: Some(kind.clone()),
                ..Default::default()
            };
            let (why, next, stay) = match self.attempt(target, req, left).await {
                Attempt::Done(r) => {
                    self.inner.leader.store(target, Ordering::Relaxed);
                    return Ok(Reply {
                        index: r.log_index,
                        payload: r.payload,
                        server_id: r.server_id,
                    });
                }
                Attempt::Fatal(e) => return Err(e),
                Attempt::NoGroup { why, message } => {
                    without_group.insert(target);
                    let n = self.inner.conns.lock().expect("lock").len();
                    if without_group.len() >= n && !(is_write && maybe_delivered) {
                        return Err(ClientError::UnknownGroup {
                            group: display_group(&self.inner.group),
                            message,
                        });
                    }
                    (why, None, false)
                }
                Attempt::Unsent { why } => (why, None, false),
                // Any other answer may come from a member that hosts the
                // group, or at least cannot say it does not.
                Attempt::Retry { why, next } => {
                    without_group.remove(&target);
                    maybe_delivered = true;
                    (why, next, false)
                }
                Attempt::Wait { why } => {
                    without_group.remove(&target);
                    maybe_delivered = true;
                    (why, None, true)
                }
            };
            // An attempt cut short by the call's own deadline says nothing
            // new; the reason before it is the useful one.
            if attempts == 0 || started.elapsed() < o.timeout {
                last = why;
            }
            attempts += 1;
            if !stay {
                let n = self.inner.conns.lock().expect("lock").len();
                let hinted = next.is_some();
                target = next.unwrap_or((target + 1) % n);
                if hinted {
                    // A named leader is worth trying at once.
                    self.inner.leader.store(target, Ordering::Relaxed);
                    continue;
                }
            }
            let jitter = 0.5 + rand::random::<f64>() / 2.0;
            let sleep = backoff.mul_f64(jitter).min(left);
            tokio::time::sleep(sleep).await;
            backoff = (backoff * 2).min(o.backoff_max);
        }
    }

    fn conn_index(&self, address: &str) -> usize {
        let mut conns = self.inner.conns.lock().expect("lock");
        if let Some(i) = conns.iter().position(|c| c.address == address) {
            return i;
        }
        conns.push(Arc::new(Conn {
            address: address.to_string(),
            stream: tokio::sync::Mutex::new(None),
        }));
        conns.len() - 1
    }

    async fn attempt(&self, target: usize, mut req: pb::ClientRequest, left: Duration) -> Attempt {
        let conn = self.inner.conns.lock().expect("lock")[target].clone();
        let stream = match self.stream(&conn).await {
            Ok(s) => s,
            Err(why) => return Attempt::Unsent { why },
        };
        let tag = self.inner.next_tag.fetch_add(1, Ordering::Relaxed);
        req.sequence_number = tag;
        let req_timeout_ms = req.timeout_ms;
        let (tx, rx) = oneshot::channel();
        stream.waiters.lock().expect("lock").insert(tag, tx);
        if stream.tx.send(req).await.is_err() {
            stream.alive.store(false, Ordering::Relaxed);
            return Attempt::Unsent {
                why: format!("connection to {} closed", conn.address),
            };
        }
        // The server gives up after the attempt's timeout; a connection that
        // went silent (a peer killed mid-call) must not hold the call for the
        // rest of its deadline, so the wait ends a little after that.
        let server_gives_up = Duration::from_millis(req_timeout_ms) + Duration::from_millis(500);
        let reply = match tokio::time::timeout(left.min(server_gives_up), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                return Attempt::Retry {
                    why: format!("connection to {} broke", conn.address),
                    next: None,
                };
            }
            Err(_) => {
                stream.waiters.lock().expect("lock").remove(&tag);
                return Attempt::Retry {
                    why: format!("{} did not answer", conn.address),
                    next: None,
                };
            }
        };
        if reply.success {
            return Attempt::Done(reply);
        }
        let Some(kind) = reply.exception.and_then(|e| e.kind) else {
            return Attempt::Retry {
                why: format!("{} failed the call without saying why", conn.address),
                next: None,
            };
        };
        match kind {
            Kind::NotLeader(n) => {
                let next = n
                    .suggested_leader
                    .as_ref()
                    .map(|p| {
                        if p.client_address.is_empty() {
                            &p.address
                        } else {
                            &p.client_address
                        }
                    })
                    .filter(|a| !a.is_empty() && **a != conn.address)
                    .map(|a| self.conn_index(a));
                Attempt::Retry {
                    why: format!("{} is not the leader", conn.address),
                    next,
                }
            }
            Kind::StateMachine(s) => Attempt::Fatal(ClientError::StateMachine {
                message: s.message,
                rejected_before_logging: s.rejected_before_logging,
            }),
            Kind::NotReplicated(n) => Attempt::Retry {
                why: format!("index {} not replicated yet", n.log_index),
                next: Some(target),
            },
            Kind::LeaderNotReady(n) => Attempt::Wait {
                why: format!(
                    "{}: the leader of term {} is not ready yet",
                    conn.address, n.leader_term
                ),
            },
            Kind::LeaderSteppingDown(_) => Attempt::Retry {
                why: format!("{} is handing over leadership", conn.address),
                next: None,
            },
            Kind::ResourceUnavailable(r) => Attempt::Retry {
                why: format!("{}: {} exhausted ({})", conn.address, r.resource, r.message),
                next: None,
            },
            Kind::AlreadyClosed(c) => Attempt::Retry {
                why: format!("{}: {}", conn.address, c.message),
                next: None,
            },
            Kind::GroupMismatch(g) => Attempt::NoGroup {
                why: format!("{}: {}", conn.address, g.message),
                message: g.message,
            },
        }
    }

    async fn stream(&self, conn: &Conn) -> Result<Arc<Stream>, String> {
        let mut slot = conn.stream.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| s.alive.load(Ordering::Relaxed)) {
            return Ok(s.clone());
        }
        let ch =
            channel(&conn.address).map_err(|e| format!("bad address {}: {e}", conn.address))?;
        let mut client = RaftClientProtocolServiceClient::new(ch);
        let (tx, rx) = mpsc::channel(4096);
        let replies = tokio::time::timeout(
            Duration::from_secs(3),
            client.unordered(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| format!("connecting to {} timed out", conn.address))?
        .map_err(|s| format!("{}: {}", conn.address, s.message()))?;
        let s = Arc::new(Stream {
            tx,
            waiters: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
        });
        let (waiters, alive) = (s.waiters.clone(), s.alive.clone());
        let mut replies = replies.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(r)) = replies.message().await {
                if let Some(w) = waiters.lock().expect("lock").remove(&r.sequence_number) {
                    let _ = w.send(r);
                }
            }
            alive.store(false, Ordering::Relaxed);
            // Dropping the waiters tells their callers the stream broke.
            waiters.lock().expect("lock").clear();
        });
        *slot = Some(s.clone());
        Ok(s)
    }

    // -- the kv built-in ----------------------------------------------------

    async fn kv_write(&self, op: pb::kv_command::Op) -> Result<(u64, pb::KvResult), ClientError> {
        let cmd = pb::KvCommand { op: Some(op) };
        let r = self.write(Bytes::from(cmd.encode_to_vec())).await?;
        let res =
            pb::KvResult::decode(r.payload).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((r.index, res))
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64, ClientError> {
        let op = pb::kv_command::Op::Put(pb::KvPut {
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
        });
        Ok(self.kv_write(op).await?.0)
    }

    /// Whether the key existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        let op = pb::kv_command::Op::Delete(pb::KvDelete {
            key: Bytes::copy_from_slice(key),
        });
        Ok(self.kv_write(op).await?.1.ok)
    }

    /// Sets `value` if the key holds `expected` (`None`: if it is absent).
    /// Returns whether it did, and the value the key held.
    pub async fn cas(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<(bool, Option<Bytes>), ClientError> {
        let op = pb::kv_command::Op::CompareAndSet(pb::KvCompareAndSet {
            key: Bytes::copy_from_slice(key),
            expected: Bytes::copy_from_slice(expected.unwrap_or_default()),
            expect_absent: expected.is_none(),
            value: Bytes::copy_from_slice(value),
        });
        let (_, r) = self.kv_write(op).await?;
        Ok((r.ok, r.value))
    }

    async fn kv_query(&self, op: pb::kv_query::Op) -> Result<pb::KvResult, ClientError> {
        let q = pb::KvQuery { op: Some(op) };
        let r = self.read(Bytes::from(q.encode_to_vec())).await?;
        pb::KvResult::decode(r.payload).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A linearizable get.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, ClientError> {
        let op = pb::kv_query::Op::Get(pb::KvGet {
            key: Bytes::copy_from_slice(key),
        });
        Ok(self.kv_query(op).await?.value)
    }

    /// Keys with `prefix`, in order, all pages.
    pub async fn scan(&self, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, ClientError> {
        let mut out = Vec::new();
        let mut after = Bytes::new();
        loop {
            let op = pb::kv_query::Op::Scan(pb::KvScan {
                prefix: Bytes::copy_from_slice(prefix),
                limit: 0,
                start_after: after.clone(),
            });
            let r = self.kv_query(op).await?;
            if let Some(last) = r.pairs.last() {
                after = last.key.clone();
            }
            out.extend(r.pairs.into_iter().map(|p| (p.key, p.value)));
            if !r.truncated {
                return Ok(out);
            }
        }
    }

    // -- the counter built-in -----------------------------------------------

    pub async fn counter_add(&self, n: i64) -> Result<i64, ClientError> {
        let r = self
            .write(Bytes::from(pb::CounterCommand { add: n }.encode_to_vec()))
            .await?;
        let v =
            pb::CounterResult::decode(r.payload).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(v.value)
    }

    pub async fn counter_get(&self) -> Result<i64, ClientError> {
        let r = self.read(Bytes::new()).await?;
        let v =
            pb::CounterResult::decode(r.payload).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(v.value)
    }
}

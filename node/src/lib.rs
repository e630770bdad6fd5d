//! kuberaft node: a multi-group Raft server modelled on Apache Ratis.
//!
//! - [`core`]: the sans-IO consensus core (one value per group member);
//! - [`storage`]: the segmented log, metadata and snapshot files;
//! - [`statemachine`]: the `StateMachine` trait and the `kv` and `counter` built-ins;
//! - [`server`]: request admission (retry cache, pending limits); the group
//!   owner task and registry come next;
//! - [`convert`]: core types to and from the `kuberaft.v1` protobufs.
//!
//! The storage, state machines, server shell, rpc services, HTTP endpoints and
//! client library land in later modules (see DESIGN.md §1).

pub mod client;
pub mod convert;
pub mod core;
pub mod http;
pub mod rpc;
pub mod server;
pub mod statemachine;
pub mod storage;

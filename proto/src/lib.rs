//! The kuberaft wire protocol: generated prost messages and tonic service
//! stubs for package `kuberaft.v1`.
//!
//! This crate only carries generated code. The consensus core never sees these
//! types: the node's `rpc` layer converts them to and from the core's own
//! message types, so the core stays free of tonic and prost.

#![allow(missing_debug_implementations, clippy::all)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("kuberaft.v1");
}

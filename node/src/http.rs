//! HTTP endpoints for probes and monitoring (axum):
//! - `/livez`: the process serves HTTP;
//! - `/readyz`: every hosted group has a known leader, healthy storage, and
//!   this member has applied what it knows committed up to a bounded lag
//!   (503 with the reasons otherwise);
//! - `/metrics`: Prometheus text format;
//! - `/status`: JSON with the member id and every group's state.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

use crate::server::group::GroupView;
use crate::server::node::Node;

/// A follower further behind than this (applied vs. committed) is not ready.
pub const READY_MAX_LAG: u64 = 10_000;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(node)
}

/// Why each group is not ready; empty when the node is ready.
pub fn not_ready(views: &[GroupView]) -> Vec<String> {
    let mut why = Vec::new();
    for v in views {
        if v.leader.is_none() {
            why.push(format!("group {}: no known leader", v.group));
        }
        if !v.storage_healthy {
            why.push(format!("group {}: storage: {}", v.group, v.storage_message));
        }
        if v.commit_index.saturating_sub(v.applied_index) > READY_MAX_LAG {
            why.push(format!(
                "group {}: applied {} is more than {READY_MAX_LAG} behind commit {}",
                v.group, v.applied_index, v.commit_index
            ));
        }
    }
    why
}

fn views(node: &Node) -> Vec<GroupView> {
    node.groups().iter().map(|g| g.view()).collect()
}

async fn readyz(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let why = not_ready(&views(&node));
    if why.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, why.join("\n") + "\n")
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let body = node.metrics.encode(&views(&node));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

#[derive(Serialize)]
struct Status {
    member_id: u64,
    address: String,
    groups: Vec<GroupView>,
}

async fn status(State(node): State<Arc<Node>>) -> impl IntoResponse {
    axum::Json(Status {
        member_id: node.id,
        address: node.opts.advertise.clone(),
        groups: views(&node),
    })
}

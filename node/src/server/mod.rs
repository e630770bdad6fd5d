//! The async shell around the core: the group owner task ([`group`]), the
//! multi-group registry ([`node`]), and the write path's pieces: the retry
//! cache, the pending-request limits and the applier; plus metrics.

pub mod apply;
pub mod group;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod retry_cache;

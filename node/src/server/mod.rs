//! The async shell around the core (being built): the group owner task, the
//! multi-group registry, and the write path's pieces that are here already:
//! the retry cache, the pending-request limits and the applier.

pub mod apply;
pub mod limits;
pub mod retry_cache;

//! The async shell around the core (being built): the group owner task, the
//! multi-group registry, and the request admission it needs — the retry
//! cache and the pending-request limits, which are here already.

pub mod limits;
pub mod retry_cache;

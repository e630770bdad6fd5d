//! The metadata file `raft-meta`: current term, vote, the membership the
//! group started with (the log only holds later changes) and the latest
//! membership written to the log (read before the log is replayed, e.g. for
//! status pages). Replaced atomically
//! (temporary file, fsync, rename, fsync the directory), so after a crash it
//! is the old version or the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kuberaft_proto::v1 as pb;
use prost::Message;

use super::StorageError;
use super::format::{self, Record};
use super::fs::{FileSystem, write_atomic};
use crate::convert::{membership_from_pb, membership_to_pb};
use crate::core::{HardState, Membership};

pub const META_FILE: &str = "raft-meta";

/// What the metadata file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub hard_state: HardState,
    pub initial_membership: Membership,
    /// The newest membership entry written to the log, with its index.
    pub latest_membership: Option<(u64, Membership)>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MetaRecord {
    #[prost(uint64, tag = "1")]
    term: u64,
    /// 0: no vote.
    #[prost(uint64, tag = "2")]
    voted_for: u64,
    #[prost(message, optional, tag = "3")]
    initial_membership: Option<pb::Configuration>,
    /// `log_index` carries the entry's index.
    #[prost(message, optional, tag = "4")]
    latest_membership: Option<pb::Configuration>,
}

#[derive(Debug)]
pub struct MetaStore {
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
}

impl MetaStore {
    pub fn new(fs: Arc<dyn FileSystem>, dir: &Path) -> Self {
        MetaStore {
            fs,
            path: dir.join(META_FILE),
        }
    }

    /// The stored metadata; `None` for a member that never wrote any.
    pub fn load(&self) -> Result<Option<Meta>, StorageError> {
        if !self.fs.exists(&self.path) {
            return Ok(None);
        }
        let data = self
            .fs
            .read(&self.path)
            .map_err(|e| StorageError::io("read", &self.path, e))?;
        let corrupt = |reason: String| StorageError::CorruptMeta {
            file: self.path.clone(),
            reason,
        };
        format::check_header(&data, format::META_MAGIC, "kuberaft metadata")
            .map_err(|e| corrupt(e.to_string()))?;
        let Record::Valid { payload, next } = format::read_record(&data, format::HEADER_LEN) else {
            return Err(corrupt("its record is missing or damaged".into()));
        };
        if next != data.len() {
            return Err(corrupt("unexpected bytes after its record".into()));
        }
        let r = MetaRecord::decode(payload).map_err(|e| corrupt(e.to_string()))?;
        let initial_membership = match &r.initial_membership {
            Some(c) => membership_from_pb(c).map_err(|e| corrupt(e.to_string()))?,
            None => Membership::default(),
        };
        let latest_membership = match &r.latest_membership {
            Some(c) => Some((
                c.log_index,
                membership_from_pb(c).map_err(|e| corrupt(e.to_string()))?,
            )),
            None => None,
        };
        let voted_for = (r.voted_for != 0).then_some(r.voted_for);
        Ok(Some(Meta {
            hard_state: HardState {
                term: r.term,
                voted_for,
            },
            initial_membership,
            latest_membership,
        }))
    }

    pub fn store(&self, meta: &Meta) -> Result<(), StorageError> {
        let r = MetaRecord {
            term: meta.hard_state.term,
            voted_for: meta.hard_state.voted_for.unwrap_or(0),
            initial_membership: Some(membership_to_pb(&meta.initial_membership)),
            latest_membership: meta.latest_membership.as_ref().map(|(index, m)| {
                let mut c = membership_to_pb(m);
                c.log_index = *index;
                c
            }),
        };
        let mut data = format::header(format::META_MAGIC).to_vec();
        format::encode_record(&r.encode_to_vec(), &mut data);
        write_atomic(self.fs.as_ref(), &self.path, &data)
            .map_err(|e| StorageError::io("write", &self.path, e))
    }
}

//! Snapshot files.
//!
//! A snapshot is a directory `snapshot_<term>_<index>` under the group's
//! `snapshots/` directory, holding the state machine's files and a
//! `MANIFEST`: the format header, then one record with the last included
//! entry (term, index), the membership at that entry, and every file's name,
//! size and CRC32C.
//!
//! Writing (a local snapshot, or one received from the leader chunk by
//! chunk) happens in `snapshot_<term>_<index>.tmp`; files are fsynced, the
//! manifest is written and fsynced, and one rename publishes the directory.
//! After a crash a snapshot is therefore whole or absent; leftover `.tmp`
//! directories are removed when the store opens.
//!
//! Loading picks the newest snapshot whose manifest and files all check out;
//! a damaged one is skipped with a warning (an older one, plus the log, may
//! still be complete). The newest `retain` snapshots are kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kuberaft_proto::v1 as pb;
use prost::Message;

use super::StorageError;
use super::format::{self, Record};
use super::fs::{FileSystem, FsFile};
use crate::convert::{membership_from_pb, membership_to_pb};
use crate::core::{Index, SnapshotMeta, Term};

const MANIFEST: &str = "MANIFEST";

#[derive(Clone, PartialEq, prost::Message)]
struct Manifest {
    #[prost(uint64, tag = "1")]
    index: u64,
    #[prost(uint64, tag = "2")]
    term: u64,
    #[prost(message, optional, tag = "3")]
    membership: Option<pb::Configuration>,
    #[prost(message, repeated, tag = "4")]
    files: Vec<pb::SnapshotFile>,
}

/// A published, verified snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub meta: SnapshotMeta,
    pub dir: PathBuf,
    /// (name, size, crc32c) of each file.
    pub files: Vec<(String, u64, u32)>,
}

#[derive(Debug)]
pub struct SnapshotStore {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    retain: usize,
}

fn dir_name(term: Term, index: Index) -> String {
    format!("snapshot_{term}_{index}")
}

fn parse_dir_name(name: &str) -> Option<(Term, Index)> {
    let (term, index) = name.strip_prefix("snapshot_")?.split_once('_')?;
    Some((term.parse().ok()?, index.parse().ok()?))
}

impl SnapshotStore {
    /// Opens the store in `dir`, removing unfinished snapshots.
    pub fn open(fs: Arc<dyn FileSystem>, dir: &Path, retain: usize) -> Result<Self, StorageError> {
        fs.create_dir_all(dir)
            .map_err(|e| StorageError::io("create snapshot directory", dir, e))?;
        for name in fs.list(dir).map_err(|e| StorageError::io("list", dir, e))? {
            if name.ends_with(".tmp") {
                let p = dir.join(&name);
                fs.remove_dir_all(&p)
                    .map_err(|e| StorageError::io("remove unfinished snapshot", &p, e))?;
            }
        }
        Ok(SnapshotStore {
            fs,
            dir: dir.to_path_buf(),
            retain: retain.max(1),
        })
    }

    /// Starts writing the snapshot described by `meta`.
    pub fn begin(&self, meta: SnapshotMeta) -> Result<SnapshotWriter<'_>, StorageError> {
        let tmp = self
            .dir
            .join(format!("{}.tmp", dir_name(meta.term, meta.index)));
        if self.fs.exists(&tmp) {
            self.fs
                .remove_dir_all(&tmp)
                .map_err(|e| StorageError::io("remove", &tmp, e))?;
        }
        self.fs
            .create_dir_all(&tmp)
            .map_err(|e| StorageError::io("create", &tmp, e))?;
        Ok(SnapshotWriter {
            store: self,
            meta,
            tmp,
            files: BTreeMap::new(),
        })
    }

    /// Published snapshots, newest first, without verifying them.
    fn listed(&self) -> Result<Vec<(Term, Index, String)>, StorageError> {
        let mut found: Vec<(Term, Index, String)> = self
            .fs
            .list(&self.dir)
            .map_err(|e| StorageError::io("list", &self.dir, e))?
            .into_iter()
            .filter(|n| !n.ends_with(".tmp"))
            .filter_map(|n| parse_dir_name(&n).map(|(t, i)| (t, i, n)))
            .collect();
        found.sort_by_key(|(term, index, _)| std::cmp::Reverse((*index, *term)));
        Ok(found)
    }

    /// The newest snapshot that verifies, if any.
    pub fn latest(&self) -> Result<Option<SnapshotInfo>, StorageError> {
        for (_, _, name) in self.listed()? {
            match self.verify(&self.dir.join(&name)) {
                Ok(info) => return Ok(Some(info)),
                Err(e) => {
                    tracing::warn!(snapshot = %name, error = %e, "skipping a damaged snapshot")
                }
            }
        }
        Ok(None)
    }

    /// Reads and checks a snapshot directory's manifest and files.
    pub fn verify(&self, dir: &Path) -> Result<SnapshotInfo, StorageError> {
        let path = dir.join(MANIFEST);
        let corrupt = |offset: u64, reason: String| StorageError::Corrupt {
            file: path.clone(),
            offset,
            reason,
        };
        let data = self
            .fs
            .read(&path)
            .map_err(|e| StorageError::io("read", &path, e))?;
        format::check_header(&data, format::MANIFEST_MAGIC, "snapshot manifest")
            .map_err(|e| corrupt(0, e.to_string()))?;
        let Record::Valid { payload, .. } = format::read_record(&data, format::HEADER_LEN) else {
            return Err(corrupt(
                format::HEADER_LEN as u64,
                "manifest record damaged".into(),
            ));
        };
        let m = Manifest::decode(payload)
            .map_err(|e| corrupt(format::HEADER_LEN as u64, e.to_string()))?;
        let membership = match &m.membership {
            Some(c) => membership_from_pb(c).map_err(|e| corrupt(0, e.to_string()))?,
            None => Default::default(),
        };
        let mut files = Vec::new();
        for f in &m.files {
            let fp = dir.join(&f.name);
            let bytes = self
                .fs
                .read(&fp)
                .map_err(|e| StorageError::io("read", &fp, e))?;
            if bytes.len() as u64 != f.size || crc32c::crc32c(&bytes) != f.crc32c {
                return Err(StorageError::Corrupt {
                    file: fp,
                    offset: 0,
                    reason: format!(
                        "size or checksum differs from the manifest (expected {} bytes)",
                        f.size
                    ),
                });
            }
            files.push((f.name.clone(), f.size, f.crc32c));
        }
        Ok(SnapshotInfo {
            meta: SnapshotMeta {
                index: m.index,
                term: m.term,
                membership,
            },
            dir: dir.to_path_buf(),
            files,
        })
    }

    /// A file of a published snapshot.
    pub fn read_file(&self, info: &SnapshotInfo, name: &str) -> Result<Vec<u8>, StorageError> {
        let p = info.dir.join(name);
        self.fs
            .read(&p)
            .map_err(|e| StorageError::io("read", &p, e))
    }

    fn apply_retention(&self) -> Result<(), StorageError> {
        for (_, _, name) in self.listed()?.into_iter().skip(self.retain) {
            let p = self.dir.join(name);
            self.fs
                .remove_dir_all(&p)
                .map_err(|e| StorageError::io("remove old snapshot", &p, e))?;
        }
        Ok(())
    }
}

/// A snapshot being written; nothing is visible until [`Self::finish`].
#[derive(Debug)]
pub struct SnapshotWriter<'a> {
    store: &'a SnapshotStore,
    meta: SnapshotMeta,
    tmp: PathBuf,
    files: BTreeMap<String, Box<dyn FsFile>>,
}

impl SnapshotWriter<'_> {
    fn check_name(name: &str) -> Result<(), StorageError> {
        let ok =
            !name.is_empty() && name != MANIFEST && !name.contains('/') && !name.contains("..");
        if ok {
            Ok(())
        } else {
            Err(StorageError::Corrupt {
                file: PathBuf::from(name),
                offset: 0,
                reason: "not a valid snapshot file name (plain names only, not MANIFEST)".into(),
            })
        }
    }

    /// Writes `data` at `offset` of file `name` (a chunk of a received
    /// snapshot, or a whole file at offset 0).
    pub fn write_chunk(
        &mut self,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        Self::check_name(name)?;
        let path = self.tmp.join(name);
        if !self.files.contains_key(name) {
            let f = self
                .store
                .fs
                .open(&path, true)
                .map_err(|e| StorageError::io("create", &path, e))?;
            self.files.insert(name.to_string(), f);
        }
        let f = self.files.get_mut(name).expect("inserted");
        f.write_at(data, offset)
            .map_err(|e| StorageError::io("write", &path, e))
    }

    /// Makes the files durable, writes the manifest and publishes the
    /// snapshot atomically; then drops snapshots beyond the retention.
    pub fn finish(mut self) -> Result<SnapshotInfo, StorageError> {
        let fs = self.store.fs.clone();
        let mut manifest = Manifest {
            index: self.meta.index,
            term: self.meta.term,
            membership: Some(membership_to_pb(&self.meta.membership)),
            files: Vec::new(),
        };
        for (name, f) in self.files.iter_mut() {
            let path = self.tmp.join(name);
            f.sync_data()
                .map_err(|e| StorageError::io("fsync", &path, e))?;
            let bytes = fs
                .read(&path)
                .map_err(|e| StorageError::io("read", &path, e))?;
            manifest.files.push(pb::SnapshotFile {
                name: name.clone(),
                size: bytes.len() as u64,
                crc32c: crc32c::crc32c(&bytes),
            });
        }
        let mut data = format::header(format::MANIFEST_MAGIC).to_vec();
        format::encode_record(&manifest.encode_to_vec(), &mut data);
        let mpath = self.tmp.join(MANIFEST);
        let mut mf = fs
            .open(&mpath, true)
            .map_err(|e| StorageError::io("create", &mpath, e))?;
        mf.write_at(&data, 0)
            .map_err(|e| StorageError::io("write", &mpath, e))?;
        mf.sync_data()
            .map_err(|e| StorageError::io("fsync", &mpath, e))?;
        fs.sync_dir(&self.tmp)
            .map_err(|e| StorageError::io("fsync directory", &self.tmp, e))?;
        let dest = self
            .store
            .dir
            .join(dir_name(self.meta.term, self.meta.index));
        if fs.exists(&dest) {
            // The same snapshot again (a retried install): keep the first.
            fs.remove_dir_all(&self.tmp)
                .map_err(|e| StorageError::io("remove", &self.tmp, e))?;
        } else {
            fs.rename(&self.tmp, &dest)
                .map_err(|e| StorageError::io("publish snapshot", &self.tmp, e))?;
            fs.sync_dir(&self.store.dir)
                .map_err(|e| StorageError::io("fsync directory", &self.store.dir, e))?;
        }
        let info = self.store.verify(&dest)?;
        self.store.apply_retention()?;
        Ok(info)
    }
}

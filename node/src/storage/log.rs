//! The segmented log (Ratis's `SegmentedRaftLog`).
//!
//! Files in the group's log directory:
//! - `log_<first>-<last>`: a closed segment holding entries `first..=last`;
//! - `log_inprogress_<first>`: the one open segment, written at its end.
//!
//! A segment holds entries of one term only: the open segment is closed when
//! it reaches `segment_size_max_bytes` **or** an entry of another term comes,
//! so truncating a conflicting suffix usually drops whole files. The open
//! segment is preallocated with zeros in chunks (so an fdatasync rarely has to
//! flush a size change) and appends go through a write buffer.
//!
//! Recovery reads every segment and verifies every record's CRC. A torn tail
//! of the open segment (a partly written last record, and nothing valid after
//! it) is cut off. Anything else — a bad record with valid data after it, a
//! damaged closed segment, a missing segment between two others — stops the
//! log with [`StorageError::Corrupt`] or [`StorageError::Gap`], naming the file
//! and offset, unless `truncate_on_corruption` asks to drop everything from the
//! bad record on.
//!
//! Durability: entries are durable once [`LogStore::sync`] returned. A failed
//! write (a full disk) keeps the unwritten bytes and is retried by the next
//! `sync`, so the log recovers when space returns. A failed fsync poisons the
//! log until restart: after a failed fsync the kernel may have dropped dirty
//! pages, so only re-reading the files can say what is on disk.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kuberaft_proto::v1 as pb;
use prost::Message;

use super::format::{self, Record};
use super::fs::{FileSystem, FsFile};
use super::{LogStore, StorageError};
use crate::convert::{entry_from_pb, entry_to_pb};
use crate::core::{Entry, Index, Term};

/// The first zero-filled chunk of a new open segment.
pub const MIN_PREALLOCATE_BYTES: u64 = 64 << 10;

/// Tuning of the segmented log.
#[derive(Clone, Debug)]
pub struct LogOptions {
    pub segment_size_max_bytes: u64,
    /// The open segment grows by zero-filled chunks of at most this size.
    /// Chunks start at [`MIN_PREALLOCATE_BYTES`] and double with the file,
    /// so that a segment of a few entries (an idle group's, or one cut
    /// short by a new term) costs kilobytes, not the whole chunk: a node
    /// with 1,000 groups starting a new term in each would otherwise write
    /// gigabytes of zeros.
    pub preallocate_bytes: u64,
    /// Appends are buffered up to this size before being written.
    pub write_buffer_bytes: usize,
    /// Closed segments are kept in memory up to this size, oldest evicted
    /// first among those [`SegmentedLog::evict_cache`] allows.
    pub cache_max_bytes: usize,
    /// On a corrupt record outside the torn tail, drop the log from there on
    /// instead of refusing to start. Off by default: the dropped entries may
    /// be committed entries that only this member still holds.
    pub truncate_on_corruption: bool,
    /// `purge(upto)` keeps at least this many entries before `upto`, so a
    /// follower slightly behind the snapshot still catches up from the log
    /// instead of needing the whole snapshot.
    pub purge_keep_entries: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_size_max_bytes: 32 << 20,
            preallocate_bytes: 4 << 20,
            write_buffer_bytes: 256 << 10,
            cache_max_bytes: 64 << 20,
            truncate_on_corruption: false,
            purge_keep_entries: 1024,
        }
    }
}

#[derive(Debug)]
struct Segment {
    first: Index,
    /// Offset of each entry's record; entry `first + i` at `offsets[i]`.
    offsets: Vec<u64>,
    terms: Vec<Term>,
    /// Offset just past the last record.
    end: u64,
    /// Entries in memory, if cached.
    cached: Option<Vec<Entry>>,
    cached_bytes: usize,
}

impl OpenSegment {
    /// `file` holds `seg`'s data and nothing after it.
    fn new(seg: Segment, file: Box<dyn FsFile>) -> Self {
        OpenSegment {
            allocated: seg.end,
            seg,
            file,
            buf: Vec::new(),
        }
    }
}

impl Segment {
    fn new(first: Index) -> Self {
        Segment {
            first,
            offsets: Vec::new(),
            terms: Vec::new(),
            end: format::HEADER_LEN as u64,
            cached: Some(Vec::new()),
            cached_bytes: 0,
        }
    }

    fn last(&self) -> Index {
        self.first + self.offsets.len() as Index - 1
    }

    fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    fn contains(&self, index: Index) -> bool {
        index >= self.first && index < self.first + self.offsets.len() as Index
    }

    fn truncate(&mut self, from: Index) {
        let keep = (from - self.first) as usize;
        self.end = self.offsets.get(keep).copied().unwrap_or(self.end);
        self.offsets.truncate(keep);
        self.terms.truncate(keep);
        if let Some(c) = &mut self.cached {
            c.truncate(keep);
            self.cached_bytes = c.iter().map(Entry::size_bytes).sum();
        }
    }
}

#[derive(Debug)]
struct OpenSegment {
    seg: Segment,
    file: Box<dyn FsFile>,
    /// Bytes of the file already zero-filled (preallocated).
    allocated: u64,
    /// Encoded records not yet written; they start at `seg.end - buf.len()`.
    buf: Vec<u8>,
}

/// The segmented log of one group. See the module docs.
#[derive(Debug)]
pub struct SegmentedLog {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    opts: LogOptions,
    closed: VecDeque<Segment>,
    open: Option<OpenSegment>,
    /// Index before the first entry (what was purged or reset away).
    base: Index,
    synced: Index,
    cache_bytes: usize,
    /// Set by a failed fsync: nothing more is trusted until restart.
    poisoned: Option<String>,
}

fn closed_name(first: Index, last: Index) -> String {
    format!("log_{first}-{last}")
}

fn open_name(first: Index) -> String {
    format!("log_inprogress_{first}")
}

enum Name {
    Closed(Index, Index),
    Open(Index),
}

fn parse_name(name: &str) -> Option<Name> {
    if let Some(first) = name.strip_prefix("log_inprogress_") {
        return first.parse().ok().map(Name::Open);
    }
    let (first, last) = name.strip_prefix("log_")?.split_once('-')?;
    Some(Name::Closed(first.parse().ok()?, last.parse().ok()?))
}

impl SegmentedLog {
    /// Opens (and recovers) the log in `dir`, creating the directory if
    /// needed. `base` is the index the log continues from when it is empty
    /// (the snapshot index).
    pub fn open(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        opts: LogOptions,
        base: Index,
    ) -> Result<Self, StorageError> {
        fs.create_dir_all(dir)
            .map_err(|e| StorageError::io("create log directory", dir, e))?;
        let mut log = SegmentedLog {
            fs,
            dir: dir.to_path_buf(),
            opts,
            closed: VecDeque::new(),
            open: None,
            base,
            synced: base,
            cache_bytes: 0,
            poisoned: None,
        };
        log.recover()?;
        log.synced = log.last_index();
        Ok(log)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn recover(&mut self) -> Result<(), StorageError> {
        let names = self
            .fs
            .list(&self.dir)
            .map_err(|e| StorageError::io("list", &self.dir, e))?;
        let mut found: Vec<(Index, Option<Index>, String)> = names
            .into_iter()
            .filter_map(|n| match parse_name(&n)? {
                Name::Closed(f, l) => Some((f, Some(l), n)),
                Name::Open(f) => Some((f, None, n)),
            })
            .collect();
        found.sort_by_key(|(first, ..)| *first);
        let count = found.len();
        let mut expected_first: Option<Index> = None;
        for (i, (first, last, name)) in found.into_iter().enumerate() {
            let path = self.path(&name);
            if let Some(exp) = expected_first
                && first != exp
            {
                return Err(StorageError::Gap {
                    file: path,
                    expected: exp,
                    found: first,
                });
            }
            let is_last = i + 1 == count;
            if last.is_none() && !is_last {
                return Err(StorageError::Corrupt {
                    file: path,
                    offset: 0,
                    reason: "an open segment is followed by other segments".into(),
                });
            }
            match self.load_segment(&path, first, last)? {
                Loaded::Segment(seg) => {
                    expected_first = Some(seg.last() + 1);
                    if last.is_some() {
                        self.cache_bytes += seg.cached_bytes;
                        self.closed.push_back(seg);
                    } else {
                        self.reopen(path, seg)?;
                    }
                }
                Loaded::Empty => {
                    // Created but never written (a crash right after the
                    // roll): nothing to keep.
                    self.fs
                        .remove_file(&path)
                        .map_err(|e| StorageError::io("remove", &path, e))?;
                }
                Loaded::TruncatedAt(seg) => {
                    // Corruption with `truncate_on_corruption`: keep what was
                    // valid, drop every later segment.
                    self.drop_segments_after(seg.first)?;
                    if seg.is_empty() {
                        self.fs
                            .remove_file(&path)
                            .map_err(|e| StorageError::io("remove", &path, e))?;
                    } else if last.is_some() {
                        let open = self.path(&open_name(first));
                        self.fs
                            .rename(&path, &open)
                            .map_err(|e| StorageError::io("rename", &path, e))?;
                        self.reopen(open, seg)?;
                    } else {
                        self.reopen(path, seg)?;
                    }
                    break;
                }
            }
        }
        if let Some(first) = self.first_segment_first()
            && first > self.base + 1
        {
            return Err(StorageError::Gap {
                file: self.dir.clone(),
                expected: self.base + 1,
                found: first,
            });
        }
        if let Some(first) = self.first_segment_first() {
            self.base = first - 1;
        }
        Ok(())
    }

    fn first_segment_first(&self) -> Option<Index> {
        self.closed
            .front()
            .map(|s| s.first)
            .or(self.open.as_ref().map(|o| o.seg.first))
    }

    /// Removes every segment file starting after `first`.
    fn drop_segments_after(&mut self, first_kept: Index) -> Result<(), StorageError> {
        let names = self
            .fs
            .list(&self.dir)
            .map_err(|e| StorageError::io("list", &self.dir, e))?;
        for n in names {
            let first = match parse_name(&n) {
                Some(Name::Closed(f, _)) | Some(Name::Open(f)) => f,
                None => continue,
            };
            if first > first_kept {
                let p = self.path(&n);
                self.fs
                    .remove_file(&p)
                    .map_err(|e| StorageError::io("remove", &p, e))?;
            }
        }
        Ok(())
    }

    fn reopen(&mut self, path: PathBuf, seg: Segment) -> Result<(), StorageError> {
        let mut file = self
            .fs
            .open(&path, false)
            .map_err(|e| StorageError::io("open", &path, e))?;
        let len = file
            .size()
            .map_err(|e| StorageError::io("stat", &path, e))?;
        // Zero what lies past the valid data, so a later recovery cannot
        // mistake stale bytes of a cut-off tail for records.
        if len > seg.end {
            file.set_len(seg.end)
                .map_err(|e| StorageError::io("truncate", &path, e))?;
            file.sync_data()
                .map_err(|e| StorageError::io("fsync", &path, e))?;
        }
        self.cache_bytes += seg.cached_bytes;
        self.open = Some(OpenSegment::new(seg, file));
        Ok(())
    }

    fn load_segment(
        &self,
        path: &Path,
        first: Index,
        last: Option<Index>,
    ) -> Result<Loaded, StorageError> {
        let data = self
            .fs
            .read(path)
            .map_err(|e| StorageError::io("read", path, e))?;
        let corrupt = |offset: usize, reason: String| StorageError::Corrupt {
            file: path.to_path_buf(),
            offset: offset as u64,
            reason,
        };
        if last.is_none() && data.len() < format::HEADER_LEN {
            return Ok(Loaded::Empty);
        }
        format::check_header(&data, format::SEGMENT_MAGIC, "log segment")
            .map_err(|e| corrupt(0, e.to_string()))?;
        let mut seg = Segment::new(first);
        let mut pos = format::HEADER_LEN;
        let truncate = self.opts.truncate_on_corruption;
        loop {
            match format::read_record(&data, pos) {
                Record::Valid { payload, next } => {
                    let entry = pb::LogEntry::decode(payload)
                        .map_err(|e| corrupt(pos, format!("undecodable entry: {e}")))
                        .and_then(|e| entry_from_pb(e).map_err(|e| corrupt(pos, e.to_string())));
                    let entry = match entry {
                        Ok(e) => e,
                        Err(e) if truncate => return Ok(Loaded::cut(seg, e)),
                        Err(e) => return Err(e),
                    };
                    let want = first + seg.offsets.len() as Index;
                    if entry.index != want {
                        let e = corrupt(
                            pos,
                            format!("holds entry {} where {want} belongs", entry.index),
                        );
                        return if truncate {
                            Ok(Loaded::cut(seg, e))
                        } else {
                            Err(e)
                        };
                    }
                    seg.offsets.push(pos as u64);
                    seg.terms.push(entry.term);
                    seg.cached_bytes += entry.size_bytes();
                    seg.cached.as_mut().expect("loading caches").push(entry);
                    seg.end = next as u64;
                    pos = next;
                }
                Record::End => break,
                Record::Invalid { reason } => {
                    // In the open segment a bad record with nothing valid
                    // after it is the torn last write: cut it off.
                    let torn = last.is_none() && !valid_record_follows(&data, pos);
                    if torn {
                        tracing::warn!(file = %path.display(), offset = pos, reason,
                            "cutting off the torn tail of the open log segment");
                        break;
                    }
                    let e = corrupt(
                        pos,
                        format!("{reason}; valid data follows, so this is not a torn write"),
                    );
                    return if truncate {
                        Ok(Loaded::cut(seg, e))
                    } else {
                        Err(e)
                    };
                }
            }
        }
        if let Some(last) = last {
            // A closed segment was fsynced before it was renamed: it must be
            // whole and end exactly at its last record.
            if seg.is_empty() || seg.last() != last {
                let have = if seg.is_empty() {
                    "no entries".to_string()
                } else {
                    format!("up to {}", seg.last())
                };
                let e = corrupt(pos, format!("named to hold up to {last} but holds {have}"));
                return if truncate && !seg.is_empty() {
                    Ok(Loaded::cut(seg, e))
                } else {
                    Err(e)
                };
            }
            if pos != data.len() {
                let e = corrupt(pos, "unexpected bytes after the last record".into());
                return if truncate {
                    Ok(Loaded::cut(seg, e))
                } else {
                    Err(e)
                };
            }
            seg.cached = None;
            seg.cached_bytes = 0;
        }
        if seg.is_empty() && last.is_none() {
            return Ok(Loaded::Empty);
        }
        Ok(Loaded::Segment(seg))
    }

    fn check_usable(&self) -> Result<(), StorageError> {
        match &self.poisoned {
            Some(why) => Err(StorageError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Writes buffered records. On failure the buffer is kept, so a retry
    /// rewrites the same bytes at the same offset.
    fn flush(&mut self) -> Result<(), StorageError> {
        let Some(open) = &mut self.open else {
            return Ok(());
        };
        if open.buf.is_empty() {
            return Ok(());
        }
        let start = open.seg.end - open.buf.len() as u64;
        let path = self.dir.join(open_name(open.seg.first));
        // Preallocate in chunks so fdatasync rarely changes the file size.
        if open.seg.end > open.allocated {
            let cap = self.opts.preallocate_bytes.max(1);
            let chunk = open
                .allocated
                .clamp(MIN_PREALLOCATE_BYTES.min(cap), cap)
                .max(open.seg.end - open.allocated);
            let new_alloc =
                (open.allocated + chunk).min(self.opts.segment_size_max_bytes.max(open.seg.end));
            if new_alloc > open.seg.end {
                let zeros = vec![0u8; (new_alloc - open.seg.end) as usize];
                open.file
                    .write_at(&zeros, open.seg.end)
                    .map_err(|e| StorageError::io("preallocate", &path, e))?;
            }
            open.allocated = new_alloc.max(open.seg.end);
        }
        open.file
            .write_at(&open.buf, start)
            .map_err(|e| StorageError::io("write", &path, e))?;
        open.buf.clear();
        Ok(())
    }

    /// Closes the open segment: written, fsynced, cut to its data, renamed.
    /// On failure the segment stays open and nothing is lost.
    fn close_open(&mut self) -> Result<(), StorageError> {
        self.flush()?;
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let path = self.dir.join(open_name(open.seg.first));
        if open.seg.is_empty() {
            self.open = None;
            return self
                .fs
                .remove_file(&path)
                .map_err(|e| StorageError::io("remove", &path, e));
        }
        open.file
            .set_len(open.seg.end)
            .map_err(|e| StorageError::io("truncate", &path, e))?;
        if let Err(e) = open.file.sync_data() {
            let err = StorageError::io("fsync", &path, e);
            self.poisoned = Some(format!(
                "{err}; restart the member so the log is re-read from disk"
            ));
            return Err(err);
        }
        let to = self.dir.join(closed_name(open.seg.first, open.seg.last()));
        self.fs
            .rename(&path, &to)
            .map_err(|e| StorageError::io("rename", &path, e))?;
        let open = self.open.take().expect("checked");
        self.closed.push_back(open.seg);
        self.evict(Index::MAX);
        Ok(())
    }

    fn sync_file(&mut self, file: &mut Box<dyn FsFile>, path: &Path) -> Result<(), StorageError> {
        file.sync_data().map_err(|e| {
            let err = StorageError::io("fsync", path, e);
            self.poisoned = Some(format!(
                "{err}; restart the member so the log is re-read from disk"
            ));
            err
        })
    }

    fn start_segment(&mut self, first: Index) -> Result<(), StorageError> {
        let path = self.dir.join(open_name(first));
        let mut file = self
            .fs
            .open(&path, true)
            .map_err(|e| StorageError::io("create", &path, e))?;
        file.set_len(0)
            .map_err(|e| StorageError::io("truncate", &path, e))?;
        file.write_at(&format::header(format::SEGMENT_MAGIC), 0)
            .map_err(|e| StorageError::io("write header", &path, e))?;
        let seg = Segment::new(first);
        self.open = Some(OpenSegment::new(seg, file));
        Ok(())
    }

    /// Drops cached closed segments entirely below `keep_from` (what neither
    /// the state machine nor any follower still needs) while the cache is
    /// over its limit. Passing `Index::MAX` only enforces the limit.
    pub fn evict_cache(&mut self, keep_from: Index) {
        self.evict(keep_from);
    }

    fn evict(&mut self, keep_from: Index) {
        for seg in self.closed.iter_mut() {
            if self.cache_bytes <= self.opts.cache_max_bytes {
                break;
            }
            if seg.cached.is_some() && (keep_from == Index::MAX || seg.last() < keep_from) {
                self.cache_bytes -= seg.cached_bytes;
                seg.cached = None;
                seg.cached_bytes = 0;
            }
        }
    }

    fn segment_path(&self, seg: &Segment, open: bool) -> PathBuf {
        if open {
            self.path(&open_name(seg.first))
        } else {
            self.path(&closed_name(seg.first, seg.last()))
        }
    }

    fn read_segment(
        &self,
        seg: &Segment,
        lo: Index,
        hi: Index,
        out: &mut Vec<Entry>,
    ) -> Result<(), StorageError> {
        let (from, to) = (lo.max(seg.first), hi.min(seg.last()));
        if from > to {
            return Ok(());
        }
        if let Some(c) = &seg.cached {
            out.extend_from_slice(&c[(from - seg.first) as usize..=(to - seg.first) as usize]);
            return Ok(());
        }
        let path = self.segment_path(seg, false);
        let file = self
            .fs
            .open(&path, false)
            .map_err(|e| StorageError::io("open", &path, e))?;
        let start = seg.offsets[(from - seg.first) as usize];
        let end = seg
            .offsets
            .get((to - seg.first) as usize + 1)
            .copied()
            .unwrap_or(seg.end);
        let mut buf = vec![0u8; (end - start) as usize];
        let n = file
            .read_at(&mut buf, start)
            .map_err(|e| StorageError::io("read", &path, e))?;
        buf.truncate(n);
        let mut pos = 0;
        for index in from..=to {
            let corrupt = |reason: String| StorageError::Corrupt {
                file: path.clone(),
                offset: start + pos as u64,
                reason,
            };
            match format::read_record(&buf, pos) {
                Record::Valid { payload, next } => {
                    let e = pb::LogEntry::decode(payload).map_err(|e| corrupt(e.to_string()))?;
                    let e = entry_from_pb(e).map_err(|e| corrupt(e.to_string()))?;
                    if e.index != index {
                        return Err(corrupt(format!(
                            "holds entry {} where {index} belongs",
                            e.index
                        )));
                    }
                    out.push(e);
                    pos = next;
                }
                _ => return Err(corrupt("record damaged since the log was opened".into())),
            }
        }
        Ok(())
    }

    /// Entries from `lo` on, up to `hi`, stopping once their records pass
    /// `max_bytes` (but two entries at least, as a leader's fetch needs:
    /// the one whose term the follower must match and one to send). Reads
    /// only the records it returns, so a few huge entries cost only
    /// themselves.
    pub fn read_bounded(
        &self,
        lo: Index,
        hi: Index,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let hi = hi.min(self.last_index());
        if lo <= self.base || lo > hi {
            // Purged (or never held): answered at once, not after a walk
            // over every index up to the purge point.
            return Err(super::unavailable(self, lo, hi));
        }
        let (mut end, mut bytes) = (lo, 0u64);
        for index in lo..=hi {
            let Some(size) = self.record_len(index) else {
                break;
            };
            if index >= lo + 2 && bytes + size > max_bytes as u64 {
                break;
            }
            bytes += size;
            end = index;
        }
        self.entries(lo, end)
    }

    /// The size of entry `index`'s record on disk.
    fn record_len(&self, index: Index) -> Option<u64> {
        let seg = match &self.open {
            Some(o) if o.seg.contains(index) => &o.seg,
            _ => self.closed.iter().rev().find(|s| s.contains(index))?,
        };
        let k = (index - seg.first) as usize;
        let start = *seg.offsets.get(k)?;
        let end = seg.offsets.get(k + 1).copied().unwrap_or(seg.end);
        Some(end.saturating_sub(start))
    }

    /// Number of segment files (closed and open).
    pub fn segment_count(&self) -> usize {
        self.closed.len() + usize::from(self.open.is_some())
    }
}

enum Loaded {
    Segment(Segment),
    /// An open segment with no entries.
    Empty,
    /// Valid up to a corrupt record; only with `truncate_on_corruption`.
    TruncatedAt(Segment),
}

impl Loaded {
    fn cut(seg: Segment, why: StorageError) -> Loaded {
        tracing::error!(error = %why, "truncating the log at a corrupt record as configured");
        Loaded::TruncatedAt(seg)
    }
}

/// Whether a valid record starts right after the invalid one at `pos`, judged
/// by its declared length: then the damage is not a torn last write.
fn valid_record_follows(data: &[u8], pos: usize) -> bool {
    let Some(len) = data.get(pos..pos + 4) else {
        return false;
    };
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    if len == 0 || len > format::MAX_RECORD_LEN {
        return false;
    }
    matches!(
        format::read_record(data, pos + 8 + len),
        Record::Valid { .. }
    )
}

impl LogStore for SegmentedLog {
    fn first_index(&self) -> Index {
        self.base + 1
    }

    fn last_index(&self) -> Index {
        match &self.open {
            Some(o) if !o.seg.is_empty() => o.seg.last(),
            _ => self.closed.back().map_or(self.base, |s| s.last()),
        }
    }

    fn term(&self, index: Index) -> Option<Term> {
        let seg = match &self.open {
            Some(o) if o.seg.contains(index) => &o.seg,
            _ => self.closed.iter().rev().find(|s| s.contains(index))?,
        };
        seg.terms.get((index - seg.first) as usize).copied()
    }

    fn entries(&self, lo: Index, hi: Index) -> Result<Vec<Entry>, StorageError> {
        if lo <= self.base || hi > self.last_index() {
            return Err(super::unavailable(self, lo, hi));
        }
        let mut out = Vec::with_capacity((hi + 1).saturating_sub(lo) as usize);
        for seg in &self.closed {
            self.read_segment(seg, lo, hi, &mut out)?;
        }
        if let Some(o) = &self.open {
            self.read_segment(&o.seg, lo, hi, &mut out)?;
        }
        Ok(out)
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.check_usable()?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        super::prepare_append(self, first.index)?;
        let mut record = Vec::new();
        for e in entries {
            record.clear();
            let payload = entry_to_pb(e).encode_to_vec();
            if payload.len() > format::MAX_RECORD_LEN {
                return Err(StorageError::TooLarge {
                    index: e.index,
                    bytes: payload.len(),
                });
            }
            format::encode_record(&payload, &mut record);
            let roll = match &self.open {
                None => true,
                Some(o) => {
                    !o.seg.is_empty()
                        && (o.seg.terms.last() != Some(&e.term)
                            || o.seg.end + record.len() as u64 > self.opts.segment_size_max_bytes)
                }
            };
            if roll {
                self.close_open()?;
                self.start_segment(e.index)?;
            }
            let open = self.open.as_mut().expect("open segment");
            open.seg.offsets.push(open.seg.end);
            open.seg.terms.push(e.term);
            open.seg.end += record.len() as u64;
            open.seg.cached_bytes += e.size_bytes();
            open.seg
                .cached
                .as_mut()
                .expect("open segment is cached")
                .push(e.clone());
            self.cache_bytes += e.size_bytes();
            open.buf.extend_from_slice(&record);
            if open.buf.len() >= self.opts.write_buffer_bytes {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<Index, StorageError> {
        self.check_usable()?;
        self.flush()?;
        if let Some(mut open) = self.open.take() {
            let path = self.dir.join(open_name(open.seg.first));
            let r = self.sync_file(&mut open.file, &path);
            self.open = Some(open);
            r?;
        }
        self.synced = self.last_index();
        Ok(self.synced)
    }

    fn truncate(&mut self, from: Index) -> Result<(), StorageError> {
        self.check_usable()?;
        if from > self.last_index() {
            return Ok(());
        }
        if from <= self.base {
            return Err(super::unavailable(self, from, from));
        }
        self.flush()?;
        // The open segment first, then closed ones from the newest.
        if let Some(mut open) = self.open.take() {
            let path = self.dir.join(open_name(open.seg.first));
            if from <= open.seg.first {
                self.cache_bytes -= open.seg.cached_bytes;
                drop(open.file);
                self.fs
                    .remove_file(&path)
                    .map_err(|e| StorageError::io("remove", &path, e))?;
            } else {
                self.cache_bytes -= open.seg.cached_bytes;
                open.seg.truncate(from);
                self.cache_bytes += open.seg.cached_bytes;
                open.file
                    .set_len(open.seg.end)
                    .map_err(|e| StorageError::io("truncate", &path, e))?;
                open.allocated = open.seg.end;
                self.open = Some(open);
            }
        }
        while let Some(seg) = self.closed.back() {
            if seg.last() < from {
                break;
            }
            let mut seg = self.closed.pop_back().expect("checked");
            let path = self.segment_path(&seg, false);
            self.cache_bytes -= seg.cached_bytes;
            if from <= seg.first {
                self.fs
                    .remove_file(&path)
                    .map_err(|e| StorageError::io("remove", &path, e))?;
                continue;
            }
            // The segment keeps a prefix and becomes the open one again.
            if seg.cached.is_none() {
                let mut entries = Vec::new();
                self.read_segment(&seg, seg.first, seg.last(), &mut entries)?;
                seg.cached_bytes = entries.iter().map(Entry::size_bytes).sum();
                seg.cached = Some(entries);
            }
            seg.truncate(from);
            self.cache_bytes += seg.cached_bytes;
            let to = self.dir.join(open_name(seg.first));
            self.fs
                .rename(&path, &to)
                .map_err(|e| StorageError::io("rename", &path, e))?;
            let mut file = self
                .fs
                .open(&to, false)
                .map_err(|e| StorageError::io("open", &to, e))?;
            file.set_len(seg.end)
                .map_err(|e| StorageError::io("truncate", &to, e))?;
            self.open = Some(OpenSegment::new(seg, file));
            break;
        }
        // Removed files must stay removed, or a restart would resurrect the
        // conflicting suffix.
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| StorageError::io("fsync directory", &self.dir, e))?;
        self.synced = self.synced.min(from - 1);
        Ok(())
    }

    fn purge(&mut self, upto: Index) -> Result<(), StorageError> {
        self.check_usable()?;
        let upto = upto.saturating_sub(self.opts.purge_keep_entries);
        while self.closed.front().is_some_and(|s| s.last() <= upto) {
            let seg = self.closed.pop_front().expect("checked");
            let path = self.segment_path(&seg, false);
            self.cache_bytes -= seg.cached_bytes;
            self.fs
                .remove_file(&path)
                .map_err(|e| StorageError::io("remove", &path, e))?;
            self.base = seg.last();
        }
        Ok(())
    }

    fn reset(&mut self, base: Index) -> Result<(), StorageError> {
        self.check_usable()?;
        if let Some(open) = self.open.take() {
            let path = self.dir.join(open_name(open.seg.first));
            drop(open.file);
            self.fs
                .remove_file(&path)
                .map_err(|e| StorageError::io("remove", &path, e))?;
        }
        while let Some(seg) = self.closed.pop_back() {
            let path = self.segment_path(&seg, false);
            self.fs
                .remove_file(&path)
                .map_err(|e| StorageError::io("remove", &path, e))?;
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| StorageError::io("fsync directory", &self.dir, e))?;
        self.cache_bytes = 0;
        self.base = base;
        self.synced = base;
        Ok(())
    }
}

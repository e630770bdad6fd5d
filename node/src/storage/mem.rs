//! An in-memory [`LogStore`]: the reference the segmented log is compared
//! with in the conformance suite, and a store for tests of upper layers.

use super::{LogStore, StorageError};
use crate::core::{Entry, Index, Term};

#[derive(Debug, Default)]
pub struct MemLog {
    base: Index,
    entries: Vec<Entry>,
}

impl MemLog {
    pub fn new(base: Index) -> Self {
        MemLog {
            base,
            entries: Vec::new(),
        }
    }
}

impl LogStore for MemLog {
    fn first_index(&self) -> Index {
        self.base + 1
    }

    fn last_index(&self) -> Index {
        self.base + self.entries.len() as Index
    }

    fn term(&self, index: Index) -> Option<Term> {
        if index <= self.base {
            return None;
        }
        self.entries
            .get((index - self.base - 1) as usize)
            .map(|e| e.term)
    }

    fn entries(&self, lo: Index, hi: Index) -> Result<Vec<Entry>, StorageError> {
        if lo <= self.base || hi > self.last_index() {
            return Err(super::unavailable(self, lo, hi));
        }
        Ok(self.entries[(lo - self.base - 1) as usize..(hi - self.base) as usize].to_vec())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        super::prepare_append(self, first.index)?;
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    fn sync(&mut self) -> Result<Index, StorageError> {
        Ok(self.last_index())
    }

    fn truncate(&mut self, from: Index) -> Result<(), StorageError> {
        if from <= self.base {
            return Err(super::unavailable(self, from, from));
        }
        self.entries.truncate((from - self.base - 1) as usize);
        Ok(())
    }

    fn purge(&mut self, upto: Index) -> Result<(), StorageError> {
        let n = (upto.min(self.last_index()).saturating_sub(self.base)) as usize;
        self.entries.drain(..n);
        self.base += n as Index;
        Ok(())
    }

    fn reset(&mut self, base: Index) -> Result<(), StorageError> {
        self.entries.clear();
        self.base = base;
        Ok(())
    }
}

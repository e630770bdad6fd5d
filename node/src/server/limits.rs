//! Bounds on the requests a group holds in flight, by count and by bytes.
//!
//! A request takes a [`Permit`] before it is appended and gives it back when
//! answered (the permit's drop). Over either bound the request is refused at
//! once with ResourceUnavailable: the server never queues without bound, so a
//! client that outruns the disk sees back-pressure instead of growing memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("too many pending requests ({limit}); retry after some complete")]
    Count { limit: u64 },
    #[error("pending requests hold too many bytes ({limit}); retry after some complete")]
    Bytes { limit: u64 },
    #[error("a request of {bytes} bytes is over the {limit}-byte limit for one request")]
    TooLarge { bytes: u64, limit: u64 },
}

impl LimitError {
    /// The resource named in ResourceUnavailable.
    pub fn resource(&self) -> &'static str {
        match self {
            LimitError::Count { .. } => "pending requests",
            LimitError::Bytes { .. } | LimitError::TooLarge { .. } => "pending bytes",
        }
    }
}

#[derive(Debug)]
struct Counters {
    count: AtomicU64,
    bytes: AtomicU64,
    max_count: u64,
    max_bytes: u64,
}

/// Shared by everything that admits requests into one group.
#[derive(Clone, Debug)]
pub struct PendingLimits(Arc<Counters>);

/// Held while a request is pending; releases its share when dropped.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Counters>,
    bytes: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.count.fetch_sub(1, Ordering::AcqRel);
        self.limits.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl PendingLimits {
    pub fn new(max_count: u64, max_bytes: u64) -> Self {
        PendingLimits(Arc::new(Counters {
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            max_count,
            max_bytes,
        }))
    }

    pub fn try_acquire(&self, bytes: u64) -> Result<Permit, LimitError> {
        let c = &self.0;
        if bytes > c.max_bytes {
            return Err(LimitError::TooLarge {
                bytes,
                limit: c.max_bytes,
            });
        }
        if c.count.fetch_add(1, Ordering::AcqRel) >= c.max_count {
            c.count.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Count { limit: c.max_count });
        }
        if c.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > c.max_bytes {
            c.bytes.fetch_sub(bytes, Ordering::AcqRel);
            c.count.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Bytes { limit: c.max_bytes });
        }
        Ok(Permit {
            limits: c.clone(),
            bytes,
        })
    }

    /// (requests, bytes) pending now, for metrics.
    pub fn pending(&self) -> (u64, u64) {
        (
            self.0.count.load(Ordering::Acquire),
            self.0.bytes.load(Ordering::Acquire),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_over_count_and_bytes_and_releases_on_drop() {
        let l = PendingLimits::new(2, 100);
        let a = l.try_acquire(10).unwrap();
        let b = l.try_acquire(10).unwrap();
        assert_eq!(
            l.try_acquire(1).unwrap_err(),
            LimitError::Count { limit: 2 }
        );
        drop(a);
        let c = l.try_acquire(91).unwrap_err();
        assert_eq!(c, LimitError::Bytes { limit: 100 }, "10 + 91 > 100");
        assert_eq!(
            l.pending(),
            (1, 10),
            "a refused request leaves nothing behind"
        );
        assert!(matches!(
            l.try_acquire(101),
            Err(LimitError::TooLarge { .. })
        ));
        drop(b);
        assert_eq!(l.pending(), (0, 0));
        assert_eq!(
            LimitError::Count { limit: 1 }.resource(),
            "pending requests"
        );
    }
}

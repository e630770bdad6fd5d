//! kuberaft's on-disk format, all of it in this file.
//!
//! Every file starts with a 16-byte header: an 8-byte magic naming the kind
//! of file, the format version (u32 LE) and a CRC32C of those 12 bytes
//! (u32 LE). A reader refuses a wrong magic and a version it does not know.
//!
//! Log segments and metadata files then hold records:
//!
//! ```text
//! | len: u32 LE | payload: len bytes | crc32c(len bytes ++ payload): u32 LE |
//! ```
//!
//! `len` is never 0, so a zero where a length should be marks the end of the
//! data (segments are preallocated with zeros). Log payloads are
//! `kuberaft.v1.LogEntry` protobufs; metadata payloads are `MetaRecord`.

/// Magic of a log segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"KRFTLOG\0";
/// Magic of the metadata file (term, vote, initial membership).
pub const META_MAGIC: &[u8; 8] = b"KRFTMETA";
/// Magic of a snapshot manifest.
pub const MANIFEST_MAGIC: &[u8; 8] = b"KRFTSNAP";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 16;
/// Bytes a record adds to its payload.
pub const RECORD_OVERHEAD: usize = 8;
/// Larger records are refused when written and treated as corruption when
/// read (a garbage length must not make recovery allocate gigabytes).
pub const MAX_RECORD_LEN: usize = 64 << 20;

pub fn header(magic: &[u8; 8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What is wrong with a file header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file is shorter than its {HEADER_LEN}-byte header")]
    Short,
    #[error("not a {expected} file (wrong magic)")]
    BadMagic { expected: &'static str },
    #[error("header checksum mismatch")]
    BadChecksum,
    #[error(
        "format version {0} is not supported by this build (it reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
}

pub fn check_header(bytes: &[u8], magic: &[u8; 8], kind: &'static str) -> Result<(), HeaderError> {
    if bytes.len() < HEADER_LEN {
        return Err(HeaderError::Short);
    }
    if &bytes[..8] != magic {
        return Err(HeaderError::BadMagic { expected: kind });
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&bytes[..12]) {
        return Err(HeaderError::BadChecksum);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    Ok(())
}

/// Appends one framed record to `out`.
pub fn encode_record(payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        !payload.is_empty() && payload.len() <= MAX_RECORD_LEN,
        "record size checked by caller"
    );
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The outcome of reading the record at one position.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A valid record and the position after it.
    Valid { payload: &'a [u8], next: usize },
    /// No more data: end of buffer or a zero length (preallocated space).
    End,
    /// The bytes here are not a valid record.
    Invalid { reason: &'static str },
}

pub fn read_record(buf: &[u8], pos: usize) -> Record<'_> {
    let rest = &buf[pos.min(buf.len())..];
    if rest.len() < 4 {
        return if rest.iter().all(|b| *b == 0) {
            Record::End
        } else {
            Record::Invalid {
                reason: "partial length",
            }
        };
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Record::End;
    }
    if len > MAX_RECORD_LEN {
        return Record::Invalid {
            reason: "length beyond the record size limit",
        };
    }
    if rest.len() < 4 + len + 4 {
        return Record::Invalid {
            reason: "record runs past the end of the file",
        };
    }
    let payload = &rest[4..4 + len];
    let stored = u32::from_le_bytes(rest[4 + len..8 + len].try_into().expect("4 bytes"));
    if stored != crc32c::crc32c_append(crc32c::crc32c(&rest[..4]), payload) {
        return Record::Invalid {
            reason: "checksum mismatch",
        };
    }
    Record::Valid {
        payload,
        next: pos + 8 + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_any_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode_record(b"hello", &mut buf);
        encode_record(b"world!", &mut buf);
        let Record::Valid { payload, next } = read_record(&buf, 0) else {
            panic!()
        };
        assert_eq!(payload, b"hello");
        assert!(matches!(
            read_record(&buf, next),
            Record::Valid {
                payload: b"world!",
                ..
            }
        ));
        for byte in 0..13 {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    !matches!(
                        read_record(&bad, 0),
                        Record::Valid {
                            payload: b"hello",
                            ..
                        }
                    ),
                    "flip at byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn zeros_end_the_data_and_garbage_does_not() {
        assert_eq!(read_record(&[0; 32], 0), Record::End);
        assert_eq!(read_record(&[], 0), Record::End);
        assert!(matches!(
            read_record(&[0xff; 32], 0),
            Record::Invalid { .. }
        ));
    }

    #[test]
    fn headers_check_magic_version_and_checksum() {
        let h = header(SEGMENT_MAGIC);
        assert_eq!(check_header(&h, SEGMENT_MAGIC, "segment"), Ok(()));
        assert_eq!(
            check_header(&h, META_MAGIC, "metadata"),
            Err(HeaderError::BadMagic {
                expected: "metadata"
            })
        );
        let mut v2 = h;
        v2[8] = 2;
        let crc = crc32c::crc32c(&v2[..12]);
        v2[12..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            check_header(&v2, SEGMENT_MAGIC, "segment"),
            Err(HeaderError::UnsupportedVersion(2))
        );
        let mut bad = h;
        bad[9] ^= 1;
        assert_eq!(
            check_header(&bad, SEGMENT_MAGIC, "segment"),
            Err(HeaderError::BadChecksum)
        );
    }
}

//! The one format layer every wire and on-disk record of remus shares: a
//! prefix of magic and version, a crc32 checksum, and a closed set of
//! errors a decoder of garbage can return (it never panics).
//!
//! Every record starts with the same 8-byte prefix (integers
//! little-endian):
//! ```text
//! magic [4] | version u8 | 3 bytes (reserved and zero, or the record's own)
//! ```
//! and carries its checksum in one of two places:
//! - **headed** (device state of a VM): `prefix | crc32 u32 (of the body) |
//!   body`; [`seal`] writes it, [`open`] checks it;
//! - **trailed** (manifests, S3 epoch, index and bridge objects): `prefix |
//!   body | crc32 u32 (of everything before)`; [`seal_trailed`] and
//!   [`open_trailed`];
//!
//! and two records use the prefix alone: a pack (its id is the blake3 of
//! the whole object) and a wire frame, whose byte 5 is the message kind and
//! whose checksum covers header and payload (`remus-wan`'s `frame`).
//! [`check_prefix`] is the one check of magic and version; each opener
//! checks magic, length, version and checksum, in that order.

use std::ops::RangeInclusive;

/// Length of the prefix (magic, version, three bytes).
pub const PREFIX_LEN: usize = 8;
/// Length of a headed record's header (prefix and checksum).
pub const HEADER_LEN: usize = PREFIX_LEN + 4;
/// Length of a trailed record's checksum.
pub const TRAILER_LEN: usize = 4;

/// Why bytes are not a valid record. Closed: a caller can match every
/// variant, and a tamper test names the exact one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The record does not start with the expected magic.
    #[error("bad magic {found:02x?} (expected {expected:?})")]
    BadMagic {
        /// The magic expected.
        expected: [u8; 4],
        /// What was there.
        found: Vec<u8>,
    },
    /// A version this build does not read.
    #[error("unsupported {what} version {found} (this build reads {supported})")]
    UnsupportedVersion {
        /// What record.
        what: &'static str,
        /// The version found.
        found: u8,
        /// The newest version this build reads.
        supported: u8,
    },
    /// The checksum does not match the content.
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    ChecksumMismatch {
        /// The stored checksum.
        stored: u32,
        /// The checksum of what was read.
        computed: u32,
    },
    /// Fewer bytes than the layout needs.
    #[error("truncated: {need} bytes needed, {have} present")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A length beyond what the format allows.
    #[error("too large: {len} bytes (at most {max})")]
    TooLarge {
        /// The length claimed.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body does not parse.
    #[error("malformed body: {0}")]
    Malformed(String),
}

/// The prefix of a record: `magic`, `version`, three zero bytes.
#[must_use]
pub fn prefix(magic: &[u8; 4], version: u8) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[..4].copy_from_slice(magic);
    p[4] = version;
    p
}

/// Checks the prefix of `bytes`: `magic`, at least [`PREFIX_LEN`] bytes,
/// and a version within `versions`; returns the version.
///
/// # Errors
/// [`FormatError::BadMagic`], [`FormatError::Truncated`] or
/// [`FormatError::UnsupportedVersion`] (naming the newest of `versions`).
pub fn check_prefix(what: &'static str, magic: &[u8; 4], versions: RangeInclusive<u8>, bytes: &[u8]) -> Result<u8, FormatError> {
    check_magic(magic, bytes)?;
    if bytes.len() < PREFIX_LEN {
        return Err(FormatError::Truncated { need: PREFIX_LEN, have: bytes.len() });
    }
    let version = bytes[4];
    if !versions.contains(&version) {
        return Err(FormatError::UnsupportedVersion { what, found: version, supported: *versions.end() });
    }
    Ok(version)
}

/// Compares a stored checksum with the one of `covered`.
///
/// # Errors
/// [`FormatError::ChecksumMismatch`].
pub fn check_crc(stored: &[u8], covered: &[&[u8]]) -> Result<(), FormatError> {
    let stored = u32::from_le_bytes(stored.try_into().expect("a 4-byte checksum"));
    let mut h = crc32fast::Hasher::new();
    for part in covered {
        h.update(part);
    }
    let computed = h.finalize();
    if stored == computed {
        Ok(())
    } else {
        Err(FormatError::ChecksumMismatch { stored, computed })
    }
}

/// `body` behind a header of `magic` and `version` (a headed record).
#[must_use]
pub fn seal(magic: &[u8; 4], version: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&prefix(magic, version));
    out.extend_from_slice(&checksum(body));
    out.extend_from_slice(body);
    out
}

/// Checks a headed record (magic, length, a version in `1..=supported`,
/// the body's checksum) and returns the version and the body.
///
/// # Errors
/// [`FormatError::BadMagic`], [`FormatError::Truncated`],
/// [`FormatError::UnsupportedVersion`] or [`FormatError::ChecksumMismatch`].
pub fn open<'a>(what: &'static str, magic: &[u8; 4], supported: u8, bytes: &'a [u8]) -> Result<(u8, &'a [u8]), FormatError> {
    check_magic(magic, bytes)?;
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated { need: HEADER_LEN, have: bytes.len() });
    }
    let version = check_prefix(what, magic, 1..=supported, bytes)?;
    let body = &bytes[HEADER_LEN..];
    check_crc(&bytes[PREFIX_LEN..HEADER_LEN], &[body])?;
    Ok((version, body))
}

/// Starts a trailed record: its prefix, to which the caller appends the
/// body before [`seal_trailed`].
#[must_use]
pub fn start_trailed(magic: &[u8; 4], version: u8) -> Vec<u8> {
    prefix(magic, version).to_vec()
}

/// The checksum bytes of `covered`, as a record stores them.
#[must_use]
pub fn checksum(covered: &[u8]) -> [u8; TRAILER_LEN] {
    crc32fast::hash(covered).to_le_bytes()
}

/// Ends a trailed record: appends the checksum of everything in `record`.
#[must_use]
pub fn seal_trailed(mut record: Vec<u8>) -> Vec<u8> {
    let crc = checksum(&record);
    record.extend_from_slice(&crc);
    record
}

/// Checks a trailed record (magic, length, a version in `1..=supported`,
/// the trailing checksum of everything before it) and returns the version
/// and the body between prefix and checksum.
///
/// # Errors
/// [`FormatError::BadMagic`], [`FormatError::Truncated`],
/// [`FormatError::UnsupportedVersion`] or [`FormatError::ChecksumMismatch`].
pub fn open_trailed<'a>(what: &'static str, magic: &[u8; 4], supported: u8, bytes: &'a [u8]) -> Result<(u8, &'a [u8]), FormatError> {
    check_magic(magic, bytes)?;
    if bytes.len() < PREFIX_LEN + TRAILER_LEN {
        return Err(FormatError::Truncated { need: PREFIX_LEN + TRAILER_LEN, have: bytes.len() });
    }
    let version = check_prefix(what, magic, 1..=supported, bytes)?;
    let (covered, crc) = bytes.split_at(bytes.len() - TRAILER_LEN);
    check_crc(crc, &[covered])?;
    Ok((version, &covered[PREFIX_LEN..]))
}

/// Checks that `bytes` starts with `magic`.
///
/// # Errors
/// [`FormatError::BadMagic`] (also for fewer than four bytes).
pub fn check_magic(magic: &[u8; 4], bytes: &[u8]) -> Result<(), FormatError> {
    if bytes.get(..4) == Some(&magic[..]) {
        Ok(())
    } else {
        Err(FormatError::BadMagic { expected: *magic, found: bytes.iter().take(4).copied().collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: &[u8; 4] = b"TEST";

    #[test]
    fn each_kind_of_damage_is_named() {
        let good = seal(M, 2, b"body");
        assert_eq!(open("test", M, 2, &good), Ok((2, &b"body"[..])));
        assert!(matches!(open("test", b"ELSE", 2, &good), Err(FormatError::BadMagic { .. })));
        assert!(matches!(open("test", M, 1, &good), Err(FormatError::UnsupportedVersion { found: 2, supported: 1, .. })));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(open("test", M, 2, &flipped), Err(FormatError::ChecksumMismatch { .. })));
        assert!(matches!(open("test", M, 2, &good[..7]), Err(FormatError::Truncated { need: HEADER_LEN, have: 7 })));
        assert!(matches!(open("test", M, 2, &good[..good.len() - 1]), Err(FormatError::ChecksumMismatch { .. })));
    }

    #[test]
    fn each_kind_of_damage_to_a_trailed_record_is_named() {
        let good = seal_trailed([start_trailed(M, 1), b"body".to_vec()].concat());
        assert_eq!(open_trailed("test", M, 1, &good), Ok((1, &b"body"[..])));
        assert!(matches!(open_trailed("test", b"ELSE", 1, &good), Err(FormatError::BadMagic { .. })));
        let mut newer = good.clone();
        newer[4] = 2;
        assert!(matches!(open_trailed("test", M, 1, &newer), Err(FormatError::UnsupportedVersion { found: 2, supported: 1, .. })));
        let mut flipped = good.clone();
        flipped[9] ^= 1;
        assert!(matches!(open_trailed("test", M, 1, &flipped), Err(FormatError::ChecksumMismatch { .. })));
        assert!(matches!(open_trailed("test", M, 1, &good[..10]), Err(FormatError::Truncated { need: 12, have: 10 })));
        assert!(matches!(open_trailed("test", M, 1, &good[..good.len() - 1]), Err(FormatError::ChecksumMismatch { .. })));
    }

    #[test]
    fn a_prefix_outside_the_versions_read_is_refused() {
        let p = prefix(M, 3);
        assert_eq!(check_prefix("test", M, 3..=3, &p), Ok(3));
        assert!(matches!(
            check_prefix("test", M, 3..=4, &prefix(M, 2)),
            Err(FormatError::UnsupportedVersion { found: 2, supported: 4, .. })
        ));
        assert!(matches!(check_prefix("test", M, 1..=3, &p[..6]), Err(FormatError::Truncated { need: PREFIX_LEN, have: 6 })));
    }

    proptest! {
        #[test]
        fn seal_then_open_round_trips(version in 1u8..=9, body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sealed = seal(M, version, &body);
            prop_assert_eq!(open("test", M, 9, &sealed), Ok((version, &body[..])));
        }

        #[test]
        fn trailed_round_trips(version in 1u8..=9, body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sealed = seal_trailed([start_trailed(M, version), body.clone()].concat());
            prop_assert_eq!(open_trailed("test", M, 9, &sealed), Ok((version, &body[..])));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = open("test", M, 3, &bytes);
            let _ = open_trailed("test", M, 3, &bytes);
            let _ = check_prefix("test", M, 1..=3, &bytes);
        }
    }
}

//! The one format layer every wire and on-disk record of remus can share:
//! a header of magic, version and checksum, and a closed set of errors a
//! decoder of garbage can return (it never panics).
//!
//! Header layout (12 bytes, integers little-endian):
//! ```text
//! magic [4] | version u8 | reserved [3] = 0 | crc32 u32 (of the body)
//! ```
//! followed by the body. [`seal`] writes it; [`open`] checks magic,
//! version and checksum, in that order, and returns the body.

/// Length of the header.
pub const HEADER_LEN: usize = 12;

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

/// `body` behind a header of `magic` and `version`.
#[must_use]
pub fn seal(magic: &[u8; 4], version: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&[version, 0, 0, 0]);
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks the header of `bytes` (magic, then a version in
/// `1..=supported`, then the body's checksum) and returns the version
/// and the body.
///
/// # Errors
/// [`FormatError::BadMagic`], [`FormatError::Truncated`],
/// [`FormatError::UnsupportedVersion`] or [`FormatError::ChecksumMismatch`].
pub fn open<'a>(what: &'static str, magic: &[u8; 4], supported: u8, bytes: &'a [u8]) -> Result<(u8, &'a [u8]), FormatError> {
    check_magic(magic, bytes)?;
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated { need: HEADER_LEN, have: bytes.len() });
    }
    let version = bytes[4];
    if version == 0 || version > supported {
        return Err(FormatError::UnsupportedVersion { what, found: version, supported });
    }
    let stored = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let body = &bytes[HEADER_LEN..];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    Ok((version, body))
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

    proptest! {
        #[test]
        fn seal_then_open_round_trips(version in 1u8..=9, body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sealed = seal(M, version, &body);
            prop_assert_eq!(open("test", M, 9, &sealed), Ok((version, &body[..])));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = open("test", M, 3, &bytes);
        }
    }
}

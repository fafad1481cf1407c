//! Bounds-checked little-endian reading and writing of wire structures.

use remus_types::{ChunkId, FormatError};

use crate::error::DecodeError;

/// Appends primitive values to a byte buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer appending to `buf`.
    #[must_use]
    pub fn with(buf: Vec<u8>) -> Self {
        Self { buf }
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Raw bytes, no length.
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }

    /// A u32 length followed by the bytes.
    ///
    /// # Panics
    /// If `v` is 4 GiB or longer (never for wire structures).
    pub fn blob(&mut self, v: &[u8]) {
        self.u32(u32::try_from(v.len()).expect("blob under 4 GiB"));
        self.bytes(v);
    }

    /// Bytes written so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing was written.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The buffer.
    #[must_use]
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads primitive values from a byte slice; every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    #[must_use]
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// The next `n` bytes.
    ///
    /// # Errors
    /// [`FormatError::Truncated`] when fewer remain.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(FormatError::Truncated { need: n, have: self.buf.len() }.into());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// One byte.
    ///
    /// # Errors
    /// [`FormatError::Truncated`].
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// A little-endian u32.
    ///
    /// # Errors
    /// [`FormatError::Truncated`].
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    /// A little-endian u64.
    ///
    /// # Errors
    /// [`FormatError::Truncated`].
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A 32-byte hash.
    ///
    /// # Errors
    /// [`FormatError::Truncated`].
    pub fn hash(&mut self) -> Result<ChunkId, DecodeError> {
        Ok(ChunkId(self.take(32)?.try_into().expect("32 bytes")))
    }

    /// A u32-length-prefixed blob of at most `max` bytes.
    ///
    /// # Errors
    /// [`FormatError::TooLarge`] or [`FormatError::Truncated`].
    pub fn blob(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(FormatError::TooLarge { len: n, max }.into());
        }
        self.take(n)
    }

    /// Bytes left.
    #[must_use]
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// True when everything was read.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

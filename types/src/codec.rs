//! zstd with one context per thread and level.
//!
//! Creating a zstd context costs more than compressing or decompressing a
//! 4 KiB page, so every per-page call in remus goes through these.

use std::cell::RefCell;
use std::io;

thread_local! {
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static CCTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Decompresses the frame `z` into `dst`, returning the bytes written.
///
/// # Errors
/// When `z` is not a valid frame or does not fit `dst`.
pub fn zstd_decompress_into(z: &[u8], dst: &mut [u8]) -> io::Result<usize> {
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("made above").decompress_to_buffer(z, dst)
    })
}

/// Compresses `data` at `level` (its content size recorded in the frame).
///
/// # Errors
/// When zstd refuses the level.
pub fn zstd_compress(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        c.as_mut().expect("made above").1.compress(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_any_level_and_refuses_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        for level in [1, 3, 1] {
            let z = zstd_compress(&data, level).unwrap();
            assert!(z.len() < data.len());
            let mut out = vec![0u8; 4096];
            assert_eq!(zstd_decompress_into(&z, &mut out).unwrap(), 4096);
            assert_eq!(out, data);
        }
        let mut out = vec![0u8; 4096];
        assert!(zstd_decompress_into(b"not a zstd frame", &mut out).is_err());
        let z = zstd_compress(&data, 1).unwrap();
        assert!(zstd_decompress_into(&z, &mut out[..100]).is_err(), "a frame larger than the buffer is refused");
    }
}

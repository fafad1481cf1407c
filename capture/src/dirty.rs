//! Finding the pages a guest wrote, one way for every guest.
//!
//! Two-phase collection: [`DirtyTracker::collect_running`] with the guest
//! running takes (and re-protects) every page written so far in the epoch,
//! which is most of them; [`DirtyTracker::collect_paused`] with the guest
//! paused finds only the pages written since, so the pause pays the
//! per-page cost of re-protection for a handful of pages. A page in either
//! set is copied inside the pause, so the checkpoint holds its content at
//! the pause; a write racing phase one lands in phase two's set.

use remus_types::PAGE_SIZE;

use crate::{CaptureError, TrackingMode};
use remus_sys::{Mapping, WriteProtectScanner};

/// How a guest's written pages are found.
pub enum DirtyTracker {
    /// userfaultfd async write-protect and `PAGEMAP_SCAN`: exact, and the
    /// cost of a scan is about 1 ms per GiB.
    WriteProtect(WriteProtectScanner),
    /// A 16-byte fingerprint of every page, compared each epoch: exact
    /// too, on any kernel, but it reads all of memory every epoch.
    Hash(Vec<[u8; 16]>),
}

impl DirtyTracker {
    /// A tracker for `mapping` by `mode`: write-protect where asked for or
    /// available (`arm` arms it), hashing where asked for, or as the
    /// fallback of `Auto` with a warning.
    ///
    /// # Errors
    /// [`CaptureError::Tracking`] when write-protect was demanded and
    /// `arm` failed.
    pub fn choose(
        mode: TrackingMode,
        memory: &Mapping,
        arm: impl FnOnce() -> Result<WriteProtectScanner, CaptureError>,
    ) -> Result<Self, CaptureError> {
        match mode {
            TrackingMode::Hash => Ok(Self::hashing(memory.as_slice())),
            TrackingMode::WriteProtect => arm().map(Self::WriteProtect),
            TrackingMode::Auto => Ok(match arm() {
                Ok(s) => Self::WriteProtect(s),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "userfaultfd write-protect + PAGEMAP_SCAN unavailable (needs Linux >= 6.7, and ptrace rights over \
                         another process's memory); hashing every page each epoch instead, which is far slower"
                    );
                    Self::hashing(memory.as_slice())
                }
            }),
        }
    }

    /// A hashing tracker whose baseline is `mem` now.
    #[must_use]
    pub fn hashing(mem: &[u8]) -> Self {
        Self::Hash(mem.chunks_exact(PAGE_SIZE).map(page_fingerprint).collect())
    }

    /// True when pages are found by write-protect scanning.
    #[must_use]
    pub fn exact(&self) -> bool {
        matches!(self, Self::WriteProtect(_))
    }

    /// Phase one, the guest running: appends the pages written so far
    /// (hashing finds nothing here: it looks only while paused).
    ///
    /// # Errors
    /// [`CaptureError::Tracking`] when the scan fails.
    pub fn collect_running(&mut self, out: &mut Vec<u64>) -> Result<(), CaptureError> {
        match self {
            Self::WriteProtect(s) => s.collect(out).map_err(CaptureError::Tracking),
            Self::Hash(_) => Ok(()),
        }
    }

    /// Phase two, the guest paused: appends the pages written since the
    /// last collection; `mem` is the guest's memory (read only by hashing).
    ///
    /// # Errors
    /// [`CaptureError::Tracking`] when the scan fails.
    pub fn collect_paused(&mut self, mem: &[u8], out: &mut Vec<u64>) -> Result<(), CaptureError> {
        match self {
            Self::WriteProtect(s) => s.collect(out).map_err(CaptureError::Tracking),
            Self::Hash(hashes) => {
                for (i, page) in mem.chunks_exact(PAGE_SIZE).enumerate() {
                    let h = page_fingerprint(page);
                    if hashes[i] != h {
                        hashes[i] = h;
                        out.push(i as u64);
                    }
                }
                Ok(())
            }
        }
    }
}

/// First 16 bytes of the page's blake3: enough to notice a change.
fn page_fingerprint(page: &[u8]) -> [u8; 16] {
    remus_types::content_id(page).0[..16].try_into().expect("16 bytes")
}

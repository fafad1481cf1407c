//! The in-process ("arena") guest: a memfd region written by the built-in
//! workload thread, tracked exactly by userfaultfd write-protect and
//! `PAGEMAP_SCAN`, or by page hashing where the kernel lacks those.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use remus_types::{Checkpoint, EpochId, PAGE_SIZE};

use crate::engine::ProtectedGuest;
use crate::sys::{Mapping, PiMutex, WriteProtectScanner};
use crate::workload::{self, WorkloadConfig};
use crate::{CaptureError, OutputBuffer};

/// How dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackingMode {
    /// Write-protect scanning where available, else hashing with a warning.
    #[default]
    Auto,
    /// userfaultfd async write-protect + `PAGEMAP_SCAN` (Linux >= 6.7).
    WriteProtect,
    /// Compare a hash of every page each epoch (slow; any kernel).
    Hash,
}

/// Configuration of an arena guest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ArenaConfig {
    /// Guest memory size in MiB (default 1024).
    pub memory_mib: u64,
    /// Dirty-page tracking (default auto).
    pub tracking: TrackingMode,
    /// The built-in workload.
    pub workload: WorkloadConfig,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        Self { memory_mib: 1024, tracking: TrackingMode::Auto, workload: WorkloadConfig::default() }
    }
}

pub(crate) struct Shared {
    pub(crate) memory: PiMutex<Mapping>,
    pub(crate) pause: AtomicBool,
    pub(crate) stop: AtomicBool,
    pub(crate) written: AtomicU64,
    pub(crate) page_count: u64,
    pub(crate) output: Arc<OutputBuffer<Vec<u8>>>,
}

enum Tracker {
    WriteProtect(WriteProtectScanner),
    Hash(Vec<[u8; 16]>),
}

/// A running arena guest.
pub struct ArenaGuest {
    shared: Arc<Shared>,
    tracker: Tracker,
    workload: Option<JoinHandle<()>>,
    pfns: Vec<u64>,
    last_dirty: usize,
}

impl ArenaGuest {
    /// Creates the guest memory, arms dirty tracking and starts the workload.
    ///
    /// # Errors
    /// [`CaptureError::Config`] for a bad size or workload,
    /// [`CaptureError::Memory`] when the memfd cannot be mapped, and
    /// [`CaptureError::Tracking`] when write-protect tracking was demanded
    /// but the kernel refused it.
    pub fn start(cfg: &ArenaConfig, output: Arc<OutputBuffer<Vec<u8>>>) -> Result<Self, CaptureError> {
        if cfg.memory_mib == 0 || cfg.memory_mib > 1 << 20 {
            return Err(CaptureError::Config(format!("memory-mib must be in 1..=1048576, got {}", cfg.memory_mib)));
        }
        cfg.workload.validate().map_err(CaptureError::Config)?;
        let len = usize::try_from(cfg.memory_mib << 20).map_err(|_| CaptureError::Config("memory too large".into()))?;
        let mapping = Mapping::memfd("remus-arena", len).map_err(CaptureError::Memory)?;
        let tracker = match cfg.tracking {
            TrackingMode::Hash => Tracker::Hash(hash_pages(mapping.as_slice())),
            TrackingMode::WriteProtect => {
                Tracker::WriteProtect(WriteProtectScanner::arm(&mapping).map_err(CaptureError::Tracking)?)
            }
            TrackingMode::Auto => match WriteProtectScanner::arm(&mapping) {
                Ok(s) => Tracker::WriteProtect(s),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "userfaultfd write-protect + PAGEMAP_SCAN unavailable (needs Linux >= 6.7); \
                         falling back to hashing every page each epoch, which is far slower"
                    );
                    Tracker::Hash(hash_pages(mapping.as_slice()))
                }
            },
        };
        let shared = Arc::new(Shared {
            page_count: (len / PAGE_SIZE) as u64,
            memory: PiMutex::new(mapping),
            pause: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            written: AtomicU64::new(0),
            output,
        });
        let wl = cfg.workload.clone();
        let s2 = Arc::clone(&shared);
        let workload = std::thread::Builder::new()
            .name("remus-workload".into())
            .spawn(move || workload::run(&s2, &wl))
            .map_err(|e| CaptureError::Stopped(e.to_string()))?;
        Ok(Self { shared, tracker, workload: Some(workload), pfns: Vec::new(), last_dirty: 0 })
    }

    /// True when dirty pages are found by write-protect scanning.
    #[must_use]
    pub fn exact_tracking(&self) -> bool {
        matches!(self.tracker, Tracker::WriteProtect(_))
    }

    /// Pages written by the workload so far.
    #[must_use]
    pub fn pages_written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Stops the workload thread and waits for it: the guest then stays
    /// still, so a final checkpoint captures its exact memory.
    pub fn stop_workload(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.workload.take() {
            let _ = h.join();
        }
    }

    /// Copies the whole memory while the guest is paused (for tests and
    /// failover hand-back).
    #[must_use]
    pub fn snapshot(&self) -> Vec<u8> {
        let mut copy = Vec::new();
        self.snapshot_into(&mut copy);
        copy
    }

    /// Pauses the guest and copies its whole memory into `buf` (reusing
    /// its allocation): what a checkpoint without dirty tracking costs.
    pub fn snapshot_into(&self, buf: &mut Vec<u8>) {
        self.shared.pause.store(true, Ordering::Release);
        let mem = self.shared.memory.lock();
        buf.clear();
        buf.extend_from_slice(mem.as_slice());
        drop(mem);
        self.shared.pause.store(false, Ordering::Release);
    }
}

impl ProtectedGuest for ArenaGuest {
    fn page_count(&self) -> u64 {
        self.shared.page_count
    }

    fn exact_tracking(&self) -> bool {
        Self::exact_tracking(self)
    }

    fn quiesce(&mut self) {
        self.stop_workload();
    }

    fn checkpoint(&mut self, epoch: EpochId, cp: &mut Checkpoint) -> Result<(), CaptureError> {
        if self.workload.as_ref().is_some_and(JoinHandle::is_finished) && !self.shared.stop.load(Ordering::Relaxed) {
            return Err(CaptureError::Stopped("workload thread exited".into()));
        }
        // Fault the page buffer in before pausing (sized from the last
        // epoch), so the copy inside the pause takes no page faults.
        let estimate = (self.last_dirty * 2).max(1024) * PAGE_SIZE;
        if cp.pages.capacity() < estimate {
            cp.pages = vec![0u8; estimate];
            cp.pages.fill(1);
        }
        // Two-phase scan. Phase one runs with the guest running: it takes
        // (and re-protects) every page written so far in the epoch, which
        // is most of them. Phase two, paused, finds only the pages written
        // since phase one, so the pause pays the per-page cost of
        // re-protection for a handful of pages. A page in either set is
        // copied inside the pause, so the checkpoint holds its content at
        // the pause; a write racing phase one lands in phase two's set.
        self.pfns.clear();
        if let Tracker::WriteProtect(s) = &mut self.tracker {
            s.collect(&mut self.pfns).map_err(CaptureError::Tracking)?;
        }
        let t0 = Instant::now();
        self.shared.pause.store(true, Ordering::Release);
        let mem = self.shared.memory.lock();
        self.shared.output.seal(epoch);
        let result = match &mut self.tracker {
            Tracker::WriteProtect(s) => s.collect(&mut self.pfns).map_err(CaptureError::Tracking),
            Tracker::Hash(hashes) => {
                diff_hashes(mem.as_slice(), hashes, &mut self.pfns);
                Ok(())
            }
        };
        if let Err(e) = result {
            drop(mem);
            self.shared.pause.store(false, Ordering::Release);
            return Err(e);
        }
        self.pfns.sort_unstable();
        self.pfns.dedup();
        let bytes = mem.as_slice();
        cp.pages.clear();
        cp.pages.reserve(self.pfns.len() * PAGE_SIZE);
        self.last_dirty = self.pfns.len();
        for &pfn in &self.pfns {
            let off = pfn as usize * PAGE_SIZE;
            cp.pages.extend_from_slice(&bytes[off..off + PAGE_SIZE]);
        }
        let written = self.shared.written.load(Ordering::Relaxed);
        drop(mem);
        self.shared.pause.store(false, Ordering::Release);
        cp.pause_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        cp.epoch = epoch;
        cp.page_count = self.shared.page_count;
        cp.pfns.clear();
        cp.pfns.extend(self.pfns.iter().map(|&p| remus_types::Pfn(p)));
        cp.device_state = written.to_le_bytes().to_vec();
        Ok(())
    }
}

impl Drop for ArenaGuest {
    fn drop(&mut self) {
        self.stop_workload();
    }
}

/// First 16 bytes of the page's blake3: enough to notice a change.
fn page_fingerprint(page: &[u8]) -> [u8; 16] {
    remus_types::page_hash(page).0[..16].try_into().expect("16 bytes")
}

pub(crate) fn hash_pages(mem: &[u8]) -> Vec<[u8; 16]> {
    mem.chunks_exact(PAGE_SIZE).map(page_fingerprint).collect()
}

pub(crate) fn diff_hashes(mem: &[u8], hashes: &mut [[u8; 16]], out: &mut Vec<u64>) {
    for (i, page) in mem.chunks_exact(PAGE_SIZE).enumerate() {
        let h = page_fingerprint(page);
        if hashes[i] != h {
            hashes[i] = h;
            out.push(i as u64);
        }
    }
}

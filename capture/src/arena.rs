//! The in-process ("arena") guest: a memfd region written by the built-in
//! workload thread, tracked exactly by userfaultfd write-protect and
//! `PAGEMAP_SCAN`, or by page hashing where the kernel lacks those.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use remus_types::{Checkpoint, PAGE_SIZE};

use crate::dirty::DirtyTracker;
use crate::guest::{DeviceState, DirtyLog, DiskTap, MemoryView, Pause};
use crate::workload::{self, WorkloadConfig};
use crate::{CaptureError, OutputBuffer};
use remus_sys::{Mapping, PiMutex, WriteProtectScanner};

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
    /// Held still (self-fenced) until cleared.
    pub(crate) held: AtomicBool,
    pub(crate) written: AtomicU64,
    /// The workload thread's CPU time, ns, as of its last output line
    /// (and exactly once it has stopped).
    pub(crate) cpu_ns: AtomicU64,
    pub(crate) page_count: u64,
    pub(crate) output: Arc<OutputBuffer<Vec<u8>>>,
}

/// A running arena guest.
pub struct ArenaGuest {
    shared: Arc<Shared>,
    tracker: DirtyTracker,
    workload: Option<JoinHandle<()>>,
    /// The workload's count of written pages at the last pause.
    written_at_pause: u64,
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
        if let Some(m) = cfg.workload.marker.as_ref().filter(|m| m.address + m.value.len() as u64 > cfg.memory_mib << 20) {
            return Err(CaptureError::Config(format!("marker at {:#x} lies beyond the guest's {} MiB", m.address, cfg.memory_mib)));
        }
        let len = usize::try_from(cfg.memory_mib << 20).map_err(|_| CaptureError::Config("memory too large".into()))?;
        let mapping = Mapping::memfd("remus-arena", len).map_err(CaptureError::Memory)?;
        let tracker = DirtyTracker::choose(cfg.tracking, &mapping, || WriteProtectScanner::arm(&mapping).map_err(CaptureError::Tracking))?;
        let shared = Arc::new(Shared {
            page_count: (len / PAGE_SIZE) as u64,
            memory: PiMutex::new(mapping),
            pause: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            held: AtomicBool::new(false),
            written: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            output,
        });
        let wl = cfg.workload.clone();
        let s2 = Arc::clone(&shared);
        let workload = std::thread::Builder::new()
            .name("remus-workload".into())
            .spawn(move || workload::run(&s2, &wl))
            .map_err(|e| CaptureError::Stopped(e.to_string()))?;
        Ok(Self { shared, tracker, workload: Some(workload), written_at_pause: 0 })
    }

    /// True when dirty pages are found by write-protect scanning.
    #[must_use]
    pub fn exact_tracking(&self) -> bool {
        self.tracker.exact()
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

impl Pause for ArenaGuest {
    fn pause(&mut self) -> Result<(), CaptureError> {
        if self.workload.as_ref().is_some_and(JoinHandle::is_finished) && !self.shared.stop.load(Ordering::Relaxed) {
            return Err(CaptureError::Stopped("workload thread exited".into()));
        }
        self.shared.pause.store(true, Ordering::Release);
        // Wait out a batch of writes in progress: the workload checks the
        // flag under the lock, so once the lock was taken after the flag
        // was set, nothing is written until the resume.
        drop(self.shared.memory.lock());
        Ok(())
    }

    fn resume(&mut self) -> Result<(), CaptureError> {
        self.shared.pause.store(false, Ordering::Release);
        Ok(())
    }

    fn hold(&mut self, held: bool) {
        self.shared.held.store(held, Ordering::Release);
    }

    fn quiesce(&mut self) {
        self.stop_workload();
    }

    fn cpu_time(&self) -> Duration {
        Duration::from_nanos(self.shared.cpu_ns.load(Ordering::Relaxed))
    }
}

impl DirtyLog for ArenaGuest {
    fn exact_tracking(&self) -> bool {
        Self::exact_tracking(self)
    }

    fn collect_running(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
        self.tracker.collect_running(pfns)
    }

    fn collect_paused(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
        let mem = self.shared.memory.lock();
        self.tracker.collect_paused(mem.as_slice(), pfns)
    }
}

impl MemoryView for ArenaGuest {
    fn page_count(&self) -> u64 {
        self.shared.page_count
    }

    fn copy_pages(&self, pfns: &[u64], out: &mut Vec<u8>) {
        let mem = self.shared.memory.lock();
        let bytes = mem.as_slice();
        out.reserve(pfns.len() * PAGE_SIZE);
        for &pfn in pfns {
            let off = pfn as usize * PAGE_SIZE;
            out.extend_from_slice(&bytes[off..off + PAGE_SIZE]);
        }
    }
}

impl DiskTap for ArenaGuest {}

impl DeviceState for ArenaGuest {
    /// The arena's device state is the workload's count of pages written.
    fn save_device_state(&mut self) -> Result<(), CaptureError> {
        self.written_at_pause = self.shared.written.load(Ordering::Relaxed);
        Ok(())
    }

    fn take_device_state(&mut self, cp: &mut Checkpoint) -> Result<(), CaptureError> {
        cp.device_state = self.written_at_pause.to_le_bytes().to_vec();
        Ok(())
    }
}

impl Drop for ArenaGuest {
    fn drop(&mut self) {
        self.stop_workload();
    }
}

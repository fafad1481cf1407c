//! The guest as the epoch engine sees it: five narrow capabilities, each a
//! trait a hypervisor or process boundary implements, and the one
//! checkpoint sequence over them ([`checkpoint`]), which the engine owns.
//!
//! - [`Pause`]: stop the guest and let it run again (or hold it still);
//! - [`DirtyLog`]: the pages it wrote, mostly while it runs, the rest while
//!   it is paused;
//! - [`MemoryView`]: its memory, read while it is paused;
//! - [`DiskTap`]: the disk blocks written since the last checkpoint;
//! - [`DeviceState`]: the state of its devices, saved while it is paused
//!   and collected after it resumed.
//!
//! A guest is anything with all five ([`ProtectedGuest`]). Because the
//! sequence lives here and not in each guest, a guest cannot seal its
//! output outside its pause, copy memory while it runs, or forget to
//! resume after a failed copy.

use std::time::Instant;

use remus_types::{Checkpoint, EpochId, PagePool, Pfn, PAGE_SIZE};

use crate::CaptureError;

/// Stops and restarts the guest's execution.
pub trait Pause {
    /// Stops the guest: once this returns, it writes no memory and emits no
    /// output until [`Pause::resume`].
    ///
    /// # Errors
    /// The guest cannot be stopped (it exited, its control channel failed);
    /// it is then not paused.
    fn pause(&mut self) -> Result<(), CaptureError>;

    /// Lets the guest run again, unless it is held ([`Pause::hold`]) or
    /// quiesced.
    ///
    /// # Errors
    /// The guest cannot be continued.
    fn resume(&mut self) -> Result<(), CaptureError>;

    /// Holds the guest still while `held` (at the latest from the next
    /// pause on; checkpoints go on, with nothing dirtied), or lets it run
    /// again: a primary that may not own its guest for a while (its lease
    /// unconfirmed) stops it without ending it.
    fn hold(&mut self, held: bool);

    /// Holds the guest still from the next pause on, for good: that
    /// checkpoint is its final state.
    fn quiesce(&mut self);

    /// CPU time the guest's own execution has used inside this process
    /// so far (an in-process guest's writer), so that what protecting it
    /// costs can be told apart; zero for a guest in a process of its own.
    fn cpu_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// Which pages the guest wrote since the last checkpoint.
pub trait DirtyLog {
    /// True when written pages are found exactly (write-protect
    /// scanning); false when by hashing every page.
    fn exact_tracking(&self) -> bool;

    /// Collects pages written so far while the guest runs, so that few
    /// are left for the pause (none by default).
    ///
    /// # Errors
    /// A failure of tracking.
    fn collect_running(&mut self, _pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
        Ok(())
    }

    /// Collects the rest, while the guest is paused: after it, `pfns`
    /// holds every page written since the last checkpoint (perhaps
    /// repeated and unordered).
    ///
    /// # Errors
    /// A failure of tracking.
    fn collect_paused(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError>;
}

/// The guest's memory, read while it is paused.
pub trait MemoryView {
    /// Size of the guest's page space in pages (memory, and for a VM its
    /// disk and device state, see `remus-vm`).
    fn page_count(&self) -> u64;

    /// Appends the pages `pfns` of guest memory to `out`, in that order.
    fn copy_pages(&self, pfns: &[u64], out: &mut Vec<u8>);
}

/// The disk writes of each epoch.
pub trait DiskTap {
    /// Appends the disk blocks written since the last checkpoint to `cp`
    /// as pages of the page space, while the guest is paused (nothing for
    /// a guest without a disk, the default).
    ///
    /// # Errors
    /// A block cannot be read.
    fn take_disk(&mut self, _cp: &mut Checkpoint) -> Result<(), CaptureError> {
        Ok(())
    }
}

/// The state of the guest's devices besides memory and disk.
pub trait DeviceState {
    /// Saves it while the guest is paused (nothing by default).
    ///
    /// # Errors
    /// The state cannot be saved.
    fn save_device_state(&mut self) -> Result<(), CaptureError> {
        Ok(())
    }

    /// Puts what [`DeviceState::save_device_state`] saved into `cp`
    /// (`device_state`, and any pages of the page space it occupies),
    /// after the guest resumed.
    ///
    /// # Errors
    /// The saved state cannot be read.
    fn take_device_state(&mut self, cp: &mut Checkpoint) -> Result<(), CaptureError>;
}

/// A guest that can be checkpointed: all five capabilities.
pub trait ProtectedGuest: Pause + DirtyLog + MemoryView + DiskTap + DeviceState + Send {}

impl<G: Pause + DirtyLog + MemoryView + DiskTap + DeviceState + Send + ?Sized> ProtectedGuest for G {}

impl<G: Pause + ?Sized> Pause for Box<G> {
    fn pause(&mut self) -> Result<(), CaptureError> {
        (**self).pause()
    }

    fn resume(&mut self) -> Result<(), CaptureError> {
        (**self).resume()
    }

    fn hold(&mut self, held: bool) {
        (**self).hold(held);
    }

    fn quiesce(&mut self) {
        (**self).quiesce();
    }

    fn cpu_time(&self) -> std::time::Duration {
        (**self).cpu_time()
    }
}

impl<G: DirtyLog + ?Sized> DirtyLog for Box<G> {
    fn exact_tracking(&self) -> bool {
        (**self).exact_tracking()
    }

    fn collect_running(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
        (**self).collect_running(pfns)
    }

    fn collect_paused(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
        (**self).collect_paused(pfns)
    }
}

impl<G: MemoryView + ?Sized> MemoryView for Box<G> {
    fn page_count(&self) -> u64 {
        (**self).page_count()
    }

    fn copy_pages(&self, pfns: &[u64], out: &mut Vec<u8>) {
        (**self).copy_pages(pfns, out);
    }
}

impl<G: DiskTap + ?Sized> DiskTap for Box<G> {
    fn take_disk(&mut self, cp: &mut Checkpoint) -> Result<(), CaptureError> {
        (**self).take_disk(cp)
    }
}

impl<G: DeviceState + ?Sized> DeviceState for Box<G> {
    fn save_device_state(&mut self) -> Result<(), CaptureError> {
        (**self).save_device_state()
    }

    fn take_device_state(&mut self, cp: &mut Checkpoint) -> Result<(), CaptureError> {
        (**self).take_device_state(cp)
    }
}

/// Buffers a checkpoint sequence keeps from one epoch to the next.
#[derive(Debug, Default)]
pub struct Scratch {
    pfns: Vec<u64>,
    last_dirty: usize,
    /// Where page buffers come back once their epoch is done with.
    pub(crate) pool: PagePool,
}

/// Takes epoch `epoch`'s checkpoint of `guest` into `cp`: collects the
/// pages written while it runs, pauses it, calls `seal` (the output
/// seal: everything emitted before the pause belongs to this epoch or an
/// earlier one), collects the rest of the written pages, copies them, takes
/// the disk writes, saves the device state, resumes it (also when a step
/// inside the pause failed), then collects the device state. `cp.pause_ns`
/// is the time from the pause to the resume.
///
/// # Errors
/// The first step that failed. When the pause itself failed, `seal` was
/// not called.
pub fn checkpoint<G: ProtectedGuest + ?Sized>(
    guest: &mut G,
    epoch: EpochId,
    cp: &mut Checkpoint,
    scratch: &mut Scratch,
    seal: impl FnOnce(),
) -> Result<(), CaptureError> {
    cp.epoch = epoch;
    cp.page_count = guest.page_count();
    // A page buffer faulted in before pausing (sized from the last
    // epoch), so the copy inside the pause takes no page faults: one
    // handed back by an acknowledged epoch, or a new one with a byte
    // written in each page.
    let estimate = (scratch.last_dirty * 2).max(1024) * PAGE_SIZE;
    cp.pages.clear();
    if cp.pages.capacity() < estimate {
        cp.pages = scratch.pool.take(estimate).unwrap_or_else(|| {
            let mut fresh = Vec::with_capacity(estimate);
            for b in fresh.spare_capacity_mut().iter_mut().step_by(PAGE_SIZE) {
                b.write(1);
            }
            fresh
        });
    }
    cp.pfns.clear();
    // Two-phase collection: most pages are taken before the pause, the few
    // written since inside it.
    let pfns = &mut scratch.pfns;
    pfns.clear();
    guest.collect_running(pfns)?;
    let t0 = Instant::now();
    guest.pause()?;
    seal();
    let inside = (|| {
        guest.collect_paused(pfns)?;
        pfns.sort_unstable();
        pfns.dedup();
        guest.copy_pages(pfns, &mut cp.pages);
        cp.pfns.extend(pfns.iter().map(|&p| Pfn(p)));
        guest.take_disk(cp)?;
        guest.save_device_state()
    })();
    let resumed = guest.resume();
    cp.pause_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    scratch.last_dirty = pfns.len();
    inside?;
    resumed?;
    guest.take_device_state(cp)
}

//! Capture: the epoch engine of remus.
//!
//! Every epoch (25 ms by default) the protected guest is paused, the pages
//! it wrote since the last pause are found and copied, its device state is
//! taken, and it resumes at once; the [`Checkpoint`](remus_types::Checkpoint)
//! goes to the sender. Finding the pages costs one `PAGEMAP_SCAN` ioctl
//! over a userfaultfd write-protected range (about 1 ms per GiB), not a
//! scan of memory.
//!
//! Output commit lives here too: [`OutputBuffer`] holds what the guest
//! emits, per epoch; the engine seals it inside each pause and releases it
//! only in [`EpochEngine::handle_ack`], when the backup committed it.
//!
//! The engine is sans-IO (see [`engine`](EpochEngine)): time and
//! acknowledgements are fed in by a driver (the primary runtime in
//! `remus-node`), so it is tested on a virtual clock with a fake guest.
//!
//! The engine sees a guest through five narrow traits ([`Pause`],
//! [`DirtyLog`], [`MemoryView`], [`DiskTap`], [`DeviceState`]; together
//! [`ProtectedGuest`]) and owns the one checkpoint sequence over them
//! ([`checkpoint`]). Guests: [`ArenaGuest`], an in-process guest with a
//! built-in workload; the QEMU guest lives in `remus-qemu` and uses the
//! same [`DirtyTracker`] and traits.

mod arena;
mod cadence;
mod dirty;
mod engine;
mod error;
pub mod guest;
mod output;
mod workload;

pub use arena::{ArenaConfig, ArenaGuest, TrackingMode};
pub use cadence::{Cadence, CadenceConfig};
pub use dirty::DirtyTracker;
pub use engine::{EpochEngine, CATCH_UP};
pub use error::CaptureError;
pub use guest::{checkpoint, DeviceState, DirtyLog, DiskTap, MemoryView, Pause, ProtectedGuest, Scratch};
pub use output::OutputBuffer;
pub use workload::{ContentMix, WorkloadConfig};

#[cfg(test)]
mod tests;

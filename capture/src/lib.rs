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
//! emits, per epoch, until [`EpochEngine::ack`] says the backup committed it.
//!
//! Backends: [`ArenaGuest`], an in-process guest with a built-in workload;
//! [`qemu::QemuGuest`], a real virtual machine.

mod arena;
mod engine;
mod error;
mod output;
pub mod qemu;
mod sys;
mod workload;

pub use arena::{ArenaConfig, ArenaGuest, TrackingMode};
pub use engine::{EpochEngine, ProtectedGuest};
pub use error::CaptureError;
pub use output::OutputBuffer;
pub use sys::{Mapping, WriteProtectScanner};
pub use workload::{ContentMix, WorkloadConfig};

#[cfg(test)]
mod tests;

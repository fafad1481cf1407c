//! QEMU guests for remus: an unmodified virtual machine protected epoch by
//! epoch, and resumed from a checkpoint.
//!
//! - [`QemuGuest`]: QEMU started paused with its RAM in a shared file, its
//!   disk served by remus over NBD ([`DiskServer`]) and its NIC relayed by
//!   remus ([`NetRelay`], frames to the world held until their epoch
//!   commits); a [`ProtectedGuest`](remus_capture::ProtectedGuest) the
//!   epoch engine drives over QMP ([`Qmp`]).
//! - [`resume`], [`resume_read_only`], [`ResumedVm`]: QEMU started on a
//!   checkpoint's files (failover, `remus-restore --run`, `--mount --run`).
//! - [`command`]: the one QEMU command line for all of them.
//!
//! The page space and the state header every checkpoint carries are
//! `remus-vm`'s: history is read without this crate.

mod guest;
mod launch;
mod nbd;
mod net;
mod qmp;
mod resume;

pub use guest::{default_qemu, default_run_dir, find_shim, open_disk, QemuConfig, QemuGuest, SHIM_NAME};
pub use launch::{command, spawn, Launch};
pub use nbd::DiskServer;
pub use net::{Egress, NetRelay, Tap};
pub use qmp::Qmp;
pub use remus_vm::{QemuMachine, QemuState, RunDir, VMSTATE_PAGES};
pub use resume::{resume, resume_read_only, ResumedVm};

use remus_capture::CaptureError;
use remus_vm::VmError;

/// A layout or run-directory failure as a capture error.
pub(crate) fn vm_error(e: VmError) -> CaptureError {
    match e {
        VmError::Io { .. } => CaptureError::Io(e.to_string()),
        e => CaptureError::Config(e.to_string()),
    }
}

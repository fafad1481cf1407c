//! The kernel interfaces remus needs that std does not wrap, as safe
//! functions and types. Every `unsafe` block of the project (but the
//! `LD_PRELOAD` shim, which is a C-ABI library by nature) is in this
//! crate; the workspace denies `unsafe_code` everywhere else.
//!
//! - [`Mapping`]: an owned shared memory mapping (guest RAM, pack files);
//! - [`WriteProtectScanner`]: exact dirty tracking by userfaultfd
//!   write-protect in async mode and `PAGEMAP_SCAN`;
//! - [`PiMutex`]: a priority-inheriting mutex for the pause;
//! - process settings (real-time priority, allocator, stop signals,
//!   parent-death signal) and file calls (hole punching, locks, detaching
//!   a mount, TAP interfaces).
//!
//! Each module states the invariants its `unsafe` relies on.
#![allow(unsafe_code)]

mod fs;
mod memory;
mod net;
mod pi_mutex;
mod process;
mod uffd;

pub use fs::{detach_mount, punch_hole, sync_all, try_lock_exclusive, wait_readable};
pub use memory::Mapping;
pub use net::{enter_net_namespace, open_tap, open_tun, size_udp_buffers, unshare_net_namespace};
pub use pi_mutex::{PiGuard, PiMutex};
pub use process::{
    cpu_time, die_on_closed_pipe, die_with_parent, ids, install_stop_handler, keep_freed_memory, peak_resident_bytes, process_cpu_time,
    raise_priority, signal, stop_requested, thread_cpu_time,
};
pub use uffd::WriteProtectScanner;

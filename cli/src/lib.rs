//! The remus command line, as a library the two thin binaries share:
//! `remus` (demo, protect, backup, log, keygen) and `remus-restore`.
//!
//! Runtime pieces: [`primary::Primary`] (engine + link), [`backup::Backup`]
//! (store + endpoint + [`replica::StoreReplica`]); one module per
//! subcommand under [`cmd`]; options also read from a TOML file
//! ([`config::Config`]).

pub mod backup;
pub mod cmd;
pub mod config;
pub mod primary;
pub mod replica;
pub mod stats;
pub mod vm;

/// Keeps memory the process frees for reuse rather than handing it back
/// to the kernel at once (glibc unmaps blocks above a threshold and trims
/// the heap top on free). Epochs allocate and free buffers of similar
/// sizes over and over; returned memory comes back as fresh zeroed pages,
/// one fault per 4 KiB, which measured costlier than the copying itself
/// (see docs/benchmarks.md, history). Call first thing in `main`.
pub fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Sets up `tracing` logs on stderr (`RUST_LOG` overrides the level).
pub fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: logs captured to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

//! The remus command line, as a library the two thin binaries share:
//! `remus` (demo, protect, backup, log, keygen) and `remus-restore`.
//!
//! Argument parsing, configuration and presentation only: the runtimes
//! (primary, backup, failover) live in `remus-node`. One module per
//! subcommand under [`cmd`]; options also read from a TOML file
//! ([`config::Config`]); [`summary`] shows a primary's statistics.

pub mod cmd;
pub mod config;
pub mod qemu_settings;
pub mod summary;

/// Sets up `tracing` logs on stderr (`RUST_LOG` overrides the level).
pub fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: logs captured to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

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

/// Sets up `tracing` logs on stderr (`RUST_LOG` overrides the level).
pub fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

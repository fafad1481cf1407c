//! `remus`: protect a guest, keep its backup, read its history.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use remus_cli::cmd;
use remus_cli::config::Config;

#[derive(Debug, Parser)]
#[command(name = "remus", version, about = "High availability and history for running guests by epoch replication")]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory: TLS material and store (default remus-data).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Log more (info level; RUST_LOG overrides).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Primary and backup on loopback, then verified restores.
    Demo(cmd::demo::DemoArgs),
    /// Protect a guest, replicating to a backup.
    Protect(Box<cmd::protect::ProtectArgs>),
    /// Keep replicas of primaries.
    Backup(cmd::backup::BackupArgs),
    /// Move a running guest to its backup (planned switchover).
    Move(cmd::moving::MoveArgs),
    /// List committed epochs.
    Log(cmd::log::LogArgs),
    /// One epoch: manifest, generation, parent, times, pages, bytes.
    Show(cmd::show::ShowArgs),
    /// The pages that differ between two epochs, with their byte ranges.
    Diff(cmd::show::DiffArgs),
    /// The first epoch at which a condition on memory holds.
    Bisect(cmd::show::BisectArgs),
    /// Generate the CA and certificates for mutual TLS.
    Keygen(cmd::keygen::KeygenArgs),
    /// Issue, list and revoke per-guest client certificates.
    Cert(cmd::cert::CertArgs),
    /// Create, rotate and list the key file that encrypts the S3 history.
    Key(cmd::key::KeyArgs),
    /// Re-hash chunks, walk manifest chains, name what is damaged.
    Verify(cmd::verify::VerifyArgs),
    /// Thin by the retention policy and collect unreferenced chunks and packs.
    Gc(cmd::gc::GcArgs),
    /// Copy the S3 tier into an Object Lock (COMPLIANCE) archive bucket.
    Archive(cmd::archive::ArchiveArgs),
    /// Keep guests' leases for sites without S3 (`--witness remus://HOST:PORT`).
    Witness(cmd::witness::WitnessArgs),
}

fn main() -> ExitCode {
    remus_sys::keep_freed_memory();
    remus_sys::die_on_closed_pipe();
    let cli = Cli::parse();
    remus_cli::init_logging(cli.verbose);
    let run = || -> anyhow::Result<bool> {
        let cfg = Config::load(cli.config.as_deref())?;
        let data_dir = cfg.data_dir(cli.data_dir.as_deref());
        match &cli.command {
            Command::Demo(a) => cmd::demo::run(a, &cfg, &data_dir),
            Command::Protect(a) => cmd::protect::run(a, &cfg, &data_dir).map(|()| true),
            Command::Move(a) => cmd::moving::run(a, &data_dir),
            Command::Backup(a) => cmd::backup::run(a, &cfg, cli.config.as_deref(), &data_dir).map(|()| true),
            Command::Log(a) => cmd::log::run(a, &cfg, &data_dir).map(|()| true),
            Command::Show(a) => cmd::show::show(a, &cfg, &data_dir).map(|()| true),
            Command::Diff(a) => cmd::show::diff(a, &cfg, &data_dir).map(|()| true),
            Command::Bisect(a) => cmd::show::bisect(a, &cfg, &data_dir),
            Command::Keygen(a) => cmd::keygen::run(a, &data_dir).map(|()| true),
            Command::Cert(a) => cmd::cert::run(a, &data_dir).map(|()| true),
            Command::Key(a) => cmd::key::run(a).map(|()| true),
            Command::Verify(a) => cmd::verify::run(a, &cfg, &data_dir),
            Command::Gc(a) => cmd::gc::run(a, &cfg, &data_dir).map(|()| true),
            Command::Archive(a) => cmd::archive::run(a, &cfg).map(|()| true),
            Command::Witness(a) => cmd::witness::run(a, &data_dir).map(|()| true),
        }
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("remus: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

//! `remus keygen`: the deployment's CA and the backup/primary certificates.

use std::path::Path;

use anyhow::Result;
use remus_wan::tls::TlsDir;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Overwrite existing material.
    #[arg(long)]
    pub force: bool,
}

/// Runs the command.
///
/// # Errors
/// When material exists (without `--force`) or cannot be written.
pub fn run(args: &KeygenArgs, data_dir: &Path) -> Result<()> {
    let tls = TlsDir(data_dir.join("tls"));
    anyhow::ensure!(args.force || !tls.is_complete(), "{} already holds TLS material; pass --force to replace it", tls.0.display());
    remus_wan::tls::keygen(&tls.0)?;
    println!("wrote ca.pem, backup.pem/.key and primary.pem/.key to {}", tls.0.display());
    Ok(())
}

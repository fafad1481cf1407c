//! `remus witness`: a witness of remus's own for sites without S3. It
//! keeps each guest's lease in a file under `--dir` and changes it only by
//! compare-and-swap, for primaries and backups of the deployment (mutual
//! TLS with its CA; it presents the backup certificate of the data
//! directory's `tls`). Run it on a third site; point primaries and
//! backups at it with `--witness remus://HOST:PORT`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct WitnessArgs {
    /// Address to listen on (UDP, QUIC).
    #[arg(long, default_value = "127.0.0.1:7500")]
    pub listen: SocketAddr,
    /// Where the leases are kept (default `<data-dir>/witness`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Runs until SIGINT or SIGTERM.
///
/// # Errors
/// When the TLS material is missing, the address cannot be bound or the
/// lease directory cannot be read.
pub fn run(args: &WitnessArgs, data_dir: &Path) -> Result<()> {
    super::install_stop_handler();
    let tls = super::tls_dir_for(data_dir, None)?;
    let dir = args.dir.clone().unwrap_or_else(|| data_dir.join("witness"));
    let server = remus_witness::WitnessServer::start(args.listen, &dir, &tls).with_context(|| format!("witness on {}", args.listen))?;
    // Scripts and tests read this line to learn the port.
    println!("listening on {} (witness; leases in {})", server.addr, dir.display());
    use std::io::Write;
    std::io::stdout().flush()?;
    while !super::stop_requested() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(server);
    Ok(())
}

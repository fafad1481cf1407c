//! `remus cert`: per-guest client certificates from the deployment's CA —
//! issue one that speaks for one guest alone, list what was issued, revoke
//! a guest's (writing the revocation list a backup checks).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use remus_types::GuestId;
use remus_wan::tls;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct CertArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: CertAction,
    /// The CA's directory: `ca.pem` and `ca.key`, where `issued.txt`,
    /// `revoked.txt` and `revoked.crl` are kept (default
    /// `<data-dir>/tls`, where `remus keygen` writes).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
}

/// `remus cert` actions.
#[derive(Debug, clap::Subcommand)]
pub enum CertAction {
    /// Issue a certificate that speaks for one guest alone: writes
    /// `guest-G.pem` and `guest-G.key` (give the primary of that guest
    /// these and `ca.pem`, nothing else).
    Issue {
        /// The guest.
        #[arg(long)]
        guest: u64,
        /// Days it is valid (default 365).
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Where to write the pair (default: the CA's directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Every certificate issued, with its guest, serial and expiry.
    List,
    /// Revoke every certificate issued for a guest (or the one with a
    /// serial: a backup's, say) and rewrite `revoked.crl`; copy it into
    /// each backup's TLS directory (a running backup reloads it within
    /// seconds and disconnects a primary it revokes) and each primary's
    /// (a primary refuses a backup it revokes).
    Revoke {
        /// The guest.
        #[arg(long, required_unless_present = "serial", conflicts_with = "serial")]
        guest: Option<u64>,
        /// The serial (hex, as `remus cert list` shows it).
        #[arg(long)]
        serial: Option<String>,
    },
}

/// Runs the command.
///
/// # Errors
/// Without the CA key, for a guest nothing was issued for (revoke), or
/// when files cannot be written.
pub fn run(args: &CertArgs, data_dir: &Path) -> Result<()> {
    let ca = args.ca.clone().unwrap_or_else(|| data_dir.join("tls"));
    match &args.action {
        CertAction::Issue { guest, days, out } => {
            anyhow::ensure!(*days > 0, "--days must be at least 1");
            let out = out.clone().unwrap_or_else(|| ca.clone());
            let issued =
                tls::issue_guest(&ca, GuestId(*guest), *days, &out).with_context(|| format!("issuing with the CA in {}", ca.display()))?;
            println!(
                "wrote guest-{g}.pem and guest-{g}.key to {} (serial {}, valid {days} days); the primary of guest {g} needs them and ca.pem",
                out.display(),
                issued.serial,
                g = guest
            );
        }
        CertAction::List => {
            let now = i64::try_from(remus_types::now_unix_nanos() / 1_000_000_000).unwrap_or(i64::MAX);
            let revoked = tls::revoked(&ca)?;
            // keygen's own certificates, where they are beside the CA.
            for role in ["backup", "primary"] {
                let path = tls::TlsDir(ca.clone()).pair(role).0;
                if let Ok(serial) = tls::serial_of(&path) {
                    let state = if revoked.contains(&serial) { "revoked" } else { "valid" };
                    println!("{role} ({})  serial {serial}  {state}", path.display());
                }
            }
            for i in tls::issued(&ca)? {
                let state = if revoked.contains(&i.serial) {
                    "revoked"
                } else if i.not_after_unix <= now {
                    "expired"
                } else {
                    "valid"
                };
                println!(
                    "{}  serial {}  until {}  {state}",
                    i.guest,
                    i.serial,
                    super::format_time(i.not_after_unix.max(0) as u64 * 1_000_000_000)
                );
            }
        }
        CertAction::Revoke { guest, serial } => {
            let (new, what) = match (guest, serial) {
                (Some(g), _) => (tls::revoke_guest(&ca, GuestId(*g)), format!("certificate(s) of guest {g}")),
                (None, Some(s)) => (tls::revoke_serial(&ca, s), format!("certificate(s) with serial {s}")),
                (None, None) => anyhow::bail!("--guest or --serial"),
            };
            let new = new.with_context(|| format!("revoking with the CA in {}", ca.display()))?;
            println!(
                "revoked {} {what}; wrote {} (copy it into the TLS directory of each backup, which reloads it, and of each primary)",
                new.len(),
                tls::TlsDir(ca.clone()).crl().display()
            );
        }
    }
    Ok(())
}

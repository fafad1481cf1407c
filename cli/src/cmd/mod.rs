//! One module per subcommand, plus the few helpers they share.

pub mod archive;
pub mod backup;
pub mod cert;
pub mod demo;
pub mod gc;
pub mod key;
pub mod keygen;
pub mod log;
pub mod moving;
pub mod protect;
pub mod restore;
pub mod show;
pub mod verify;
pub mod witness;

use std::path::Path;

use anyhow::{Context, Result};
use remus_types::GuestId;
use remus_wan::tls::TlsDir;

/// How long a stopping primary waits for the backup to acknowledge what
/// it has sealed.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

pub use remus_sys::{install_stop_handler, stop_requested};

/// The TLS directory of `data_dir`, generating all of it when any of it
/// is absent (the demo runs both sides).
///
/// # Errors
/// When generation fails.
pub fn tls_dir(data_dir: &Path) -> Result<TlsDir> {
    let tls = TlsDir(data_dir.join("tls"));
    if !tls.is_complete() {
        remus_wan::tls::keygen(&tls.0).with_context(|| format!("generating TLS material in {}", tls.0.display()))?;
        eprintln!("generated a CA and backup/primary certificates in {}", tls.0.display());
    }
    Ok(tls)
}

/// The TLS directory of `data_dir` holding what one side needs: the CA
/// certificate and, for the backup (`guest` none), its pair; for the
/// primary of `guest`, its own pair (`remus cert issue`) or the shared one.
///
/// # Errors
/// Naming the missing files.
pub fn tls_dir_for(data_dir: &Path, guest: Option<GuestId>) -> Result<TlsDir> {
    let tls = TlsDir(data_dir.join("tls"));
    let missing = tls.missing_for(guest);
    anyhow::ensure!(
        missing.is_empty(),
        "TLS material missing: {} (run `remus keygen --data-dir {}`, or `remus cert issue` for a guest)",
        missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        data_dir.display()
    );
    Ok(tls)
}

/// Opens a store read-only: `flag` if given, else `<data_dir>/store`.
///
/// # Errors
/// When there is no store there or RocksDB cannot open it.
pub fn open_store_read_only(flag: Option<&Path>, data_dir: &Path) -> Result<remus_store::Store> {
    let path = flag.map_or_else(|| data_dir.join("store"), Path::to_path_buf);
    anyhow::ensure!(path.exists(), "no store at {}", path.display());
    remus_store::Store::open(&path, remus_store::StoreOptions::read_only()).with_context(|| format!("opening {}", path.display()))
}

/// The S3 tier to read: `url` (`s3://BUCKET/PREFIX`) with the config's
/// other `[s3]` settings, else the config's `[s3]` table. Credentials,
/// region and endpoint not in the config come from the AWS environment.
///
/// # Errors
/// When neither names a bucket, or the settings are invalid.
pub fn s3_config(cfg: &crate::config::Config, url: Option<&str>) -> Result<remus_store::s3::S3Config> {
    match (url, &cfg.s3) {
        (Some(u), base) => Ok(base.clone().unwrap_or_else(|| remus_store::s3::S3Config::new("", "")).with_url(u)?),
        (None, Some(c)) => Ok(c.clone()),
        (None, None) => anyhow::bail!("no S3 tier: give s3://BUCKET/PREFIX or an [s3] table in --config"),
    }
}

/// Flags naming the witness; each overrides `[witness]`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WitnessFlags {
    /// A witness holding each guest's lease: `s3://BUCKET/PREFIX`
    /// (endpoint and credentials as for `[s3]`) or `remus://HOST:PORT`
    /// (a `remus witness`) (default: `witness.url`; none: no witness).
    #[arg(long)]
    pub witness: Option<String>,
    /// This node's name in a lease (default: `witness.node`, else
    /// `<hostname>/primary` or `<hostname>/backup`).
    #[arg(long)]
    pub node: Option<String>,
}

/// The witness from the flags and the config, checked to answer (`None`
/// when neither names one). `role` names the default node.
///
/// # Errors
/// When the settings are invalid or the witness does not answer.
pub fn witness_options(
    cfg: &crate::config::Config,
    flags: &WitnessFlags,
    role: &str,
    tls: &TlsDir,
    guest: Option<GuestId>,
) -> Result<Option<remus_node::WitnessOptions>> {
    let w = match (&flags.witness, &cfg.witness) {
        (Some(url), Some(w)) => crate::config::WitnessConfig { url: url.clone(), ..w.clone() },
        (Some(url), None) => crate::config::WitnessConfig::at(url),
        (None, Some(w)) => w.clone(),
        (None, None) => return Ok(None),
    };
    let timing = w.timing()?;
    let leases: std::sync::Arc<dyn remus_witness::LeaseStore> = match w.url.strip_prefix("remus://") {
        // A remus witness: this host's certificate (a guest's or the
        // shared primary's, or the backup's) and the deployment's CA.
        Some(addr) => {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
                .with_context(|| format!("witness {}: not HOST:PORT", w.url))?
                .next()
                .with_context(|| format!("witness {}: no address", w.url))?;
            let id = match guest {
                Some(g) => tls.primary_identity(g)?,
                None => tls.identity("backup")?,
            };
            std::sync::Arc::new(remus_witness::RemoteLeases::new(addr, tls, id, timing.lease.max(std::time::Duration::from_millis(100)))?)
        }
        None => std::sync::Arc::new(s3_leases(cfg, &w, &timing)?),
    };
    // It must answer now: a lease nobody can read protects nothing.
    leases.read(GuestId(0)).with_context(|| format!("witness {}", w.url))?;
    let node = match flags.node.clone().or(w.node) {
        Some(n) => n,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
            format!("{}/{role}", host.trim())
        }
    };
    anyhow::ensure!(!node.is_empty(), "--node must not be empty");
    Ok(Some(remus_node::WitnessOptions { leases, node, timing }))
}

/// The leases of an S3 witness (`[witness]` url `s3://…`).
fn s3_leases(
    cfg: &crate::config::Config,
    w: &crate::config::WitnessConfig,
    timing: &remus_witness::Timing,
) -> Result<remus_witness::S3Leases> {
    let mut s3 = s3_config(cfg, Some(&w.url)).context("witness")?;
    if w.endpoint.is_some() {
        s3.endpoint.clone_from(&w.endpoint);
    }
    if w.access_key_id.is_some() || w.secret_access_key.is_some() {
        s3.access_key_id.clone_from(&w.access_key_id);
        s3.secret_access_key.clone_from(&w.secret_access_key);
    }
    // Only the lease client's settings matter here, not the tier's keys.
    s3.encryption_keys = None;
    s3.accept_plaintext = false;
    s3.validate().context("witness")?;
    // A request to the witness may take at most a lease period: a
    // renewal that waits longer is of no use, and the next one is due.
    s3.timeout_ms = u64::try_from(timing.lease.as_millis()).unwrap_or(u64::MAX).max(100);
    let client = remus_store::s3::S3Client::new(&s3).with_context(|| format!("witness {}", w.url))?;
    Ok(remus_witness::S3Leases::new(client))
}

/// Connects to the S3 tier, checking the bucket answers.
///
/// # Errors
/// When S3 is unreachable, refuses the credentials or lacks the bucket.
pub fn connect_s3(cfg: &remus_store::s3::S3Config) -> Result<remus_store::s3::S3Tier> {
    remus_store::s3::S3Tier::connect(cfg).with_context(|| format!("opening {}", cfg.url()))
}

/// Parses a time as RFC 3339 (`2026-11-25T15:41:00Z`) or Unix seconds.
///
/// # Errors
/// When it is neither.
pub fn parse_time(s: &str) -> Result<u64> {
    if let Ok(secs) = s.parse::<f64>() {
        anyhow::ensure!(secs >= 0.0 && secs.is_finite(), "time must be non-negative: {s}");
        return Ok((secs * 1e9) as u64);
    }
    let t = humantime::parse_rfc3339_weak(s).with_context(|| format!("time {s:?} is neither RFC 3339 nor Unix seconds"))?;
    let d = t.duration_since(std::time::UNIX_EPOCH).context("time before 1970")?;
    Ok(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Formats ns since the Unix epoch as RFC 3339 with milliseconds.
#[must_use]
pub fn format_time(ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_both_ways() {
        assert_eq!(parse_time("1.5").unwrap(), 1_500_000_000);
        let ns = parse_time("2026-11-25T15:41:00Z").unwrap();
        assert_eq!(format_time(ns), "2026-11-25T15:41:00.000Z");
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("-3").is_err());
    }
}

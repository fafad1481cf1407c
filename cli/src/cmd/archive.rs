//! `remus archive`: copy the S3 tier into a compliance archive, a bucket
//! with Object Lock where every object version is locked in COMPLIANCE
//! mode for a retention period (no one can delete it before the end).

use anyhow::{Context, Result};

use crate::config::Config;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct ArchiveArgs {
    /// The archive: `s3://BUCKET/PREFIX` (same endpoint and credentials
    /// as the `[s3]` tier).
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// Days each archived object stays locked.
    #[arg(long)]
    pub retain_days: u32,
    /// Create the archive bucket with Object Lock enabled if it is missing.
    #[arg(long)]
    pub create_bucket: bool,
    /// Archive this `s3://BUCKET/PREFIX` instead of the config's tier.
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
///
/// # Errors
/// When S3 fails or the archive bucket lacks Object Lock.
pub fn run(args: &ArchiveArgs, cfg: &Config) -> Result<()> {
    anyhow::ensure!(args.retain_days >= 1, "--retain-days must be at least 1");
    let src_cfg = super::s3_config(cfg, args.from.as_deref())?;
    let dst_cfg = src_cfg.clone().with_url(&args.to)?;
    let src = super::connect_s3(&src_cfg)?;
    if args.create_bucket {
        remus_store::s3::S3Client::new(&dst_cfg)?
            .create_bucket(true)
            .with_context(|| format!("creating bucket {} with Object Lock", dst_cfg.bucket))?;
    }
    let dst = super::connect_s3(&dst_cfg)?;
    let mut bar = super::protect::Progress::new(args.json);
    let r = src
        .archive_to(&dst, args.retain_days, &mut |done, total| bar.show(format!("archiving: {done}/{total} objects")))
        .with_context(|| format!("archiving {} to {}", src_cfg.url(), dst_cfg.url()))?;
    bar.finish();
    let until = super::format_time(u64::try_from(r.retain_until_unix_s).unwrap_or(0) * 1_000_000_000);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"copied": r.copied, "present": r.present, "bytes": r.bytes, "mode": "COMPLIANCE", "retain_until": until, "to": dst_cfg.url()})
        );
    } else {
        println!(
            "archived {} objects ({} bytes) to {}, {} already there; locked (COMPLIANCE) until {until}",
            r.copied,
            r.bytes,
            dst_cfg.url(),
            r.present
        );
    }
    Ok(())
}

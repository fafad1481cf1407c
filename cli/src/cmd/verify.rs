//! `remus verify`: re-hash every chunk, walk every manifest chain, check
//! every page-index entry; name exactly what is damaged.

use std::path::{Path, PathBuf};

use anyhow::Result;
use remus_store::Damage;

use crate::config::Config;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Store directory (default `<data-dir>/store`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Verify the S3 tier (the config's `[s3]` table) instead of the local store.
    #[arg(long)]
    pub s3: bool,
    /// With `--s3`: verify this `s3://BUCKET/PREFIX` instead of the config's.
    #[arg(long, value_name = "URL", requires = "s3")]
    pub from: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command; returns false when anything is damaged.
///
/// # Errors
/// When the store cannot be opened or read.
pub fn run(args: &VerifyArgs, cfg: &Config, data_dir: &Path) -> Result<bool> {
    let mut bar = super::protect::Progress::new(args.json);
    let report = if args.s3 {
        let s3 = super::s3_config(cfg, args.from.as_deref())?;
        let tier = super::connect_s3(&s3)?;
        tier.verify(&mut |n| bar.show(format!("verifying {}: {n} chunks re-hashed", s3.url())))?
    } else {
        let store = super::open_store_read_only(args.store.as_deref(), data_dir)?;
        store.verify(|n| bar.show(format!("verifying: {n} chunks re-hashed")))?
    };
    bar.finish();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "checked {} chunks, {} manifests, {} page-index entries: {}",
            report.chunks,
            report.manifests,
            report.pages,
            if report.damage.is_empty() { "no damage".to_string() } else { format!("{} damaged", report.damage.len()) }
        );
        for d in &report.damage {
            println!("  {}", describe(d));
        }
    }
    Ok(report.damage.is_empty())
}

fn describe(d: &Damage) -> String {
    match d {
        Damage::ChunkCorrupt { chunk } => format!("chunk {chunk}: content does not match its hash"),
        Damage::ChunkMissing { chunk, guest, epoch } => format!("guest-{guest} epoch {epoch}: chunk {chunk} is missing"),
        Damage::ManifestCorrupt { guest, epoch, reason } => format!("guest-{guest} epoch {epoch}: manifest damaged ({reason})"),
        Damage::ChainBroken { guest, epoch } => format!("guest-{guest} epoch {epoch}: parent link does not match the previous manifest"),
        Damage::PageIndexMismatch { guest, epoch } => format!("guest-{guest} epoch {epoch}: page index does not match the manifest"),
        Damage::HeadMismatch { guest } => format!("guest-{guest}: head does not name the newest manifest"),
        Damage::PackChunkCorrupt { pack, chunk } => format!("pack {pack}: chunk {chunk} does not match its hash"),
        Damage::PackCorrupt { pack, reason } => format!("pack {pack}: damaged ({reason})"),
        Damage::PackMissing { pack } => format!("pack {pack}: missing (its index is there)"),
        Damage::ObjectCorrupt { key, reason } => format!("object {key}: damaged ({reason})"),
        other => format!("{other:?}"),
    }
}

//! `remus verify`: re-hash every chunk, walk every manifest chain, check
//! every page-index entry; name exactly what is damaged.

use std::path::{Path, PathBuf};

use anyhow::Result;
use remus_store::Damage;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Store directory (default `<data-dir>/store`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command; returns false when anything is damaged.
///
/// # Errors
/// When the store cannot be opened or read.
pub fn run(args: &VerifyArgs, data_dir: &Path) -> Result<bool> {
    let store = super::open_store_read_only(args.store.as_deref(), data_dir)?;
    let mut bar = super::protect::Progress::new(args.json);
    let report = store.verify(|n| bar.show(format!("verifying: {n} chunks re-hashed")))?;
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
        other => format!("{other:?}"),
    }
}

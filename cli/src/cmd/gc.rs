//! `remus gc`: thin by the `[retention]` policy and delete chunks (and
//! S3 packs, with `[s3]`) that no kept epoch references. Offline: the
//! store must not be open in a running backup, which applies the same
//! policy itself every `retention.interval`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use remus_store::{KeepRule, RetentionPolicy, Store, StoreOptions};

use crate::config::Config;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Store directory (default `<data-dir>/store`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
///
/// # Errors
/// When the store cannot be opened (e.g. a backup holds it) or S3 fails.
pub fn run(args: &GcArgs, cfg: &Config, data_dir: &Path) -> Result<()> {
    let path = args.store.clone().unwrap_or_else(|| data_dir.join("store"));
    anyhow::ensure!(path.exists(), "no store at {}", path.display());
    let store = Store::open(&path, StoreOptions::default())
        .with_context(|| format!("opening {} (a running backup holds its store and applies retention itself)", path.display()))?;
    // Without a policy nothing is thinned; GC still collects what
    // earlier thinning left unreferenced.
    let policy = match &cfg.retention {
        Some(r) => r.policy()?.0,
        None => RetentionPolicy { rules: vec![KeepRule { within: Duration::MAX, every: Duration::ZERO }] },
    };
    let tier = cfg.s3.as_ref().map(super::connect_s3).transpose()?;
    let run = remus_store::s3::apply_retention(&store, tier.as_ref(), &policy)?;
    store.flush()?;
    if args.json {
        let s3 = &run.s3;
        println!(
            "{}",
            serde_json::json!({
                "epochs_dropped": run.epochs_dropped, "pages_dropped": run.pages_dropped, "chunks_deleted": run.chunks_deleted,
                "s3": tier.as_ref().map(|_| serde_json::json!({
                    "bridges_put": s3.bridges_put, "epochs_deleted": s3.epochs_deleted,
                    "segments_rewritten": s3.segments_rewritten, "checkpoints_moved": s3.checkpoints_moved, "packs_deleted": s3.packs_deleted,
                    "packs_kept": s3.packs_kept, "dead_chunks_in_kept_packs": s3.dead_chunks_in_kept_packs,
                    "packs_repacked": s3.packs_repacked, "chunks_moved": s3.chunks_moved,
                })),
            })
        );
    } else {
        println!("dropped {} epochs ({} page versions), deleted {} chunks", run.epochs_dropped, run.pages_dropped, run.chunks_deleted);
        if tier.is_some() {
            println!(
                "s3: {} epochs deleted ({} segments rewritten, {} checkpoints moved), {} bridges put, {} packs deleted, {} repacked ({} live chunks moved), {} packs kept ({} dead chunks in them)",
                run.s3.epochs_deleted,
                run.s3.segments_rewritten,
                run.s3.checkpoints_moved,
                run.s3.bridges_put,
                run.s3.packs_deleted,
                run.s3.packs_repacked,
                run.s3.chunks_moved,
                run.s3.packs_kept,
                run.s3.dead_chunks_in_kept_packs
            );
        }
    }
    Ok(())
}

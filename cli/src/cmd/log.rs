//! `remus log`: committed epochs of the guests in a store, or in the S3
//! tier alone.

use std::path::Path;

use anyhow::{Context, Result};
use remus_store::s3::Reach;
use remus_store::Manifest;
use remus_types::GuestId;

use super::format_time;
use crate::config::Config;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Store directory (default `<data-dir>/store`).
    #[arg(long)]
    pub store: Option<std::path::PathBuf>,
    /// Only this guest.
    #[arg(long)]
    pub guest: Option<u64>,
    /// Only the last N epochs of each guest.
    #[arg(long)]
    pub last: Option<usize>,
    /// One JSON object per epoch.
    #[arg(long)]
    pub json: bool,
    /// List the history the S3 tier holds (`s3://BUCKET/PREFIX`; endpoint
    /// and credentials from `--config`'s `[s3]` table or the AWS
    /// environment) instead of a local store: after losing the backup site.
    #[arg(long, visible_alias = "s3", value_name = "URL", conflicts_with = "store")]
    pub from: Option<String>,
}

/// Runs the command.
///
/// # Errors
/// When the store (or the S3 tier) cannot be opened or is damaged.
pub fn run(args: &LogArgs, cfg: &Config, data_dir: &Path) -> Result<()> {
    if let Some(url) = &args.from {
        let s3 = super::s3_config(cfg, Some(url))?;
        let tier = super::connect_s3(&s3)?;
        let guests = match args.guest {
            Some(g) => vec![GuestId(g)],
            None => tier.guests().with_context(|| format!("listing the guests in {}", s3.url()))?,
        };
        for g in guests {
            let read = || format!("reading {g}'s history from {}", s3.url());
            let manifests = match args.last {
                // From the newest segments back; one more, for the restart
                // marker of the first shown.
                Some(n) => tier.last_manifests(g, n.saturating_add(1)).with_context(read)?,
                None => tier.history(g, Reach::ALL, &mut |_, _| {}).with_context(read)?.manifests().cloned().collect(),
            };
            print_history(args, g, &manifests);
        }
        return Ok(());
    }
    let store = super::open_store_read_only(args.store.as_deref(), data_dir)?;
    let guests: Vec<GuestId> = match args.guest {
        Some(g) => vec![GuestId(g)],
        None => store.guests()?.into_iter().map(|(g, _)| g).collect(),
    };
    for g in guests {
        match args.last {
            // Read from the end: one more, for the restart marker of the first shown.
            Some(n) => print_history(args, g, &store.last_manifests(g, n.saturating_add(1))?),
            None => print_history(args, g, &store.manifests(g)?),
        }
    }
    Ok(())
}

/// Prints `g`'s committed epochs `ms` (oldest first), as a table or as
/// JSON lines.
fn print_history(args: &LogArgs, g: GuestId, ms: &[Manifest]) {
    let skip = args.last.map_or(0, |n| ms.len().saturating_sub(n));
    if !args.json {
        match (args.last, ms.last()) {
            (Some(_), Some(head)) => println!("{g}: the last {} committed epochs, up to epoch {}", ms.len() - skip, head.epoch.0),
            _ => println!("{g}: {} committed epochs", ms.len()),
        }
        println!("{:>8}  {:<24}  {:>6}  {:>9}  {:>9}  {:>8}  manifest", "epoch", "time", "pages", "wire B", "new B", "pause ms");
    }
    for (i, m) in ms.iter().enumerate().skip(skip) {
        // A primary that restarted and continued the history.
        let previous = i.checked_sub(1).map(|p| &ms[p]);
        if let (false, Some(p)) = (args.json, previous.filter(|p| p.instance != m.instance || p.generation != m.generation)) {
            println!("{:>8}  primary restarted: generation {} -> {}, history continued", "", p.generation, m.generation);
        }
        if args.json {
            let v = serde_json::json!({
                "guest": g.0, "epoch": m.epoch.0, "time": format_time(m.time_unix_ns), "time_unix_ns": m.time_unix_ns,
                "dirty_pages": m.dirty_pages, "wire_bytes": m.wire_bytes, "new_chunk_bytes": m.new_chunk_bytes,
                "pause_ms": m.pause_ns as f64 / 1e6, "manifest": m.id().to_hex(), "parent": m.parent.to_hex(),
                "memory_root": m.memory_root.to_hex(), "generation": m.generation, "instance": format!("{:016x}", m.instance),
                "commit_time": format_time(m.commit_unix_ns), "commit_unix_ns": m.commit_unix_ns,
                "released_ahead": m.released_ahead,
            });
            println!("{v}");
        } else {
            println!(
                "{:>8}  {:<24}  {:>6}  {:>9}  {:>9}  {:>8.2}  {}",
                m.epoch.0,
                format_time(m.time_unix_ns),
                m.dirty_pages,
                m.wire_bytes,
                m.new_chunk_bytes,
                m.pause_ns as f64 / 1e6,
                &m.id().to_hex()[..16]
            );
        }
    }
}

//! `remus show EPOCH` and `remus diff A B`: one epoch, and what changed
//! between two, read from the history without restoring it.

use std::path::{Path, PathBuf};

use anyhow::Result;
use remus_restore::inspect::{self, Region};
use remus_types::{EpochId, GuestId};

use super::format_time;

/// Arguments of `remus show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The epoch.
    pub epoch: u64,
    /// Store directory (default `<data-dir>/store`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The guest (default 1).
    #[arg(long, default_value_t = 1)]
    pub guest: u64,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `remus diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// One epoch.
    pub a: u64,
    /// The other.
    pub b: u64,
    /// Store directory (default `<data-dir>/store`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The guest (default 1).
    #[arg(long, default_value_t = 1)]
    pub guest: u64,
    /// One JSON object: every changed page with its byte ranges, and the
    /// summary by region.
    #[arg(long)]
    pub json: bool,
}

/// Runs `remus show`.
///
/// # Errors
/// When the store cannot be opened or has no such epoch.
pub fn show(args: &ShowArgs, data_dir: &Path) -> Result<()> {
    let store = super::open_store_read_only(args.store.as_deref(), data_dir)?;
    let (g, e) = (GuestId(args.guest), EpochId(args.epoch));
    let s = inspect::show(&store, g, e)?;
    let m = &s.manifest;
    let layout = s
        .vm
        .as_ref()
        .map(|v| serde_json::json!({"ram_pages": v.machine.ram_pages(), "disk_pfn": v.disk_pfn(), "device_state_pfn": v.vmstate_pfn()}));
    let v = serde_json::json!({
        "guest": g.0, "epoch": m.epoch.0, "manifest": s.id.to_hex(), "parent": m.parent.to_hex(),
        "generation": m.generation, "instance": format!("{:016x}", m.instance),
        "time": format_time(m.time_unix_ns), "commit_time": format_time(m.commit_unix_ns),
        "page_count": m.page_count, "dirty_pages": m.dirty_pages, "zero_pages": s.zero_pages,
        "distinct_contents": s.distinct_contents, "wire_bytes": m.wire_bytes, "new_chunk_bytes": m.new_chunk_bytes,
        "pause_ms": m.pause_ns as f64 / 1e6, "memory_root": m.memory_root.to_hex(), "device_state": m.device_state.to_hex(),
        "qemu": layout,
    });
    if args.json {
        println!("{v}");
        return Ok(());
    }
    println!("{g} epoch {} (generation {}, primary run {:016x})", m.epoch.0, m.generation, m.instance);
    println!("  manifest          {}", s.id.to_hex());
    println!("  parent            {}", m.parent.to_hex());
    println!("  paused at         {} (the primary's clock)", format_time(m.time_unix_ns));
    println!("  committed at      {} (the backup's clock)", format_time(m.commit_unix_ns));
    println!(
        "  pages written     {} of {} ({} zero, {} distinct contents)",
        m.dirty_pages, m.page_count, s.zero_pages, s.distinct_contents
    );
    println!("  bytes             {} on the wire, {} new in the store", m.wire_bytes, m.new_chunk_bytes);
    println!("  pause             {:.2} ms", m.pause_ns as f64 / 1e6);
    println!("  memory root       {}", m.memory_root.to_hex());
    if let Some(v) = &s.vm {
        println!(
            "  QEMU guest        {} MiB RAM, disk from page {}, device state from page {}",
            v.machine.memory_mib,
            v.disk_pfn(),
            v.vmstate_pfn()
        );
    }
    Ok(())
}

fn region_name(r: Region) -> &'static str {
    match r {
        Region::Memory => "memory",
        Region::Disk => "disk",
        Region::DeviceState => "device-state",
    }
}

/// Runs `remus diff`.
///
/// # Errors
/// When the store cannot be opened or lacks either epoch.
pub fn diff(args: &DiffArgs, data_dir: &Path) -> Result<()> {
    let store = super::open_store_read_only(args.store.as_deref(), data_dir)?;
    let g = GuestId(args.guest);
    let d = inspect::diff(&store, g, EpochId(args.a), EpochId(args.b))?;
    let regions: Vec<_> = d
        .by_region()
        .into_iter()
        .map(|(r, pages, bytes)| serde_json::json!({"region": region_name(r), "pages": pages, "bytes": bytes}))
        .collect();
    if args.json {
        let pages: Vec<_> = d
            .pages
            .iter()
            .map(|p| {
                serde_json::json!({
                    "pfn": p.pfn.0, "region": region_name(p.region), "offset": p.offset,
                    "before": p.before.to_hex(), "after": p.after.to_hex(), "ranges": p.ranges,
                })
            })
            .collect();
        println!("{}", serde_json::json!({"guest": g.0, "from": d.from.0, "to": d.to.0, "regions": regions, "pages": pages}));
        return Ok(());
    }
    println!("{g}: {} pages differ between epochs {} and {}", d.pages.len(), d.from.0, d.to.0);
    for (r, pages, bytes) in d.by_region() {
        println!("  {:<13} {pages} pages, {bytes} bytes", region_name(r));
    }
    for p in &d.pages {
        // The first few runs; --json lists them all.
        let mut ranges: Vec<String> = p.ranges.iter().take(4).map(|(a, b)| format!("{a}..{b}")).collect();
        if p.ranges.len() > 4 {
            let bytes: u32 = p.ranges.iter().map(|(a, b)| u32::from(b - a)).sum();
            ranges.push(format!("… ({} runs, {bytes} bytes)", p.ranges.len()));
        }
        println!("  {:<13} page {:>8} at {:#012x}: bytes {}", region_name(p.region), p.pfn.0, p.offset, ranges.join(", "));
    }
    Ok(())
}

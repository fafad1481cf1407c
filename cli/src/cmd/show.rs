//! `remus show EPOCH`, `remus diff A B` and `remus bisect`: one epoch,
//! what changed between two, and the first epoch at which a condition on
//! memory holds, read from the history without restoring it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use remus_restore::inspect::{self, HistoryView, Region, S3View};
use remus_restore::S3Source;
use remus_store::s3::Reach;
use remus_types::{EpochId, GuestId};

use super::format_time;
use crate::config::Config;

/// Which history: the store (or the S3 tier) and the guest.
#[derive(Debug, clap::Args)]
pub struct History {
    /// Store directory (default `<data-dir>/store`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Read the S3 tier alone (`s3://BUCKET/PREFIX`; endpoint and
    /// credentials from `--config`'s `[s3]` table or the AWS environment)
    /// instead of a local store: after losing the backup site.
    #[arg(long = "s3", value_name = "URL", conflicts_with = "store")]
    pub s3: Option<String>,
    /// The guest (default 1).
    #[arg(long, default_value_t = 1)]
    pub guest: u64,
}

impl History {
    /// Runs `f` over the history: the local store, or the part of the
    /// guest's history in the S3 tier that `reach` needs (from the
    /// checkpoint before it; every object read and the chain checked).
    fn with<R>(&self, cfg: &Config, data_dir: &Path, reach: Reach, f: impl FnOnce(&dyn HistoryView, GuestId) -> Result<R>) -> Result<R> {
        let g = GuestId(self.guest);
        let Some(url) = &self.s3 else {
            return f(&super::open_store_read_only(self.store.as_deref(), data_dir)?, g);
        };
        let s3 = super::s3_config(cfg, Some(url))?;
        let tier = super::connect_s3(&s3)?;
        let source =
            S3Source::reach(&tier, g, reach, &mut |_, _| {}).with_context(|| format!("reading {g}'s history from {}", s3.url()))?;
        f(&S3View::new(source), g)
    }
}

/// Arguments of `remus show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The epoch.
    pub epoch: u64,
    /// Which history.
    #[command(flatten)]
    pub history: History,
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
    /// Which history.
    #[command(flatten)]
    pub history: History,
    /// One JSON object: every changed page with its byte ranges, and the
    /// summary by region.
    #[arg(long)]
    pub json: bool,
}

/// Runs `remus show`.
///
/// # Errors
/// When the store cannot be opened or has no such epoch.
pub fn show(args: &ShowArgs, cfg: &Config, data_dir: &Path) -> Result<()> {
    let reach = Reach::epoch(EpochId(args.epoch));
    args.history.with(cfg, data_dir, reach, |store, g| print_epoch(args, store, g))
}

fn print_epoch(args: &ShowArgs, store: &dyn HistoryView, g: GuestId) -> Result<()> {
    let e = EpochId(args.epoch);
    let s = inspect::show(store, g, e)?;
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
        "released_ahead": m.released_ahead, "qemu": layout,
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
    if m.released_ahead {
        println!("  output            released at the seal, before a backup held the epoch (the guest's first copy)");
    }
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
pub fn diff(args: &DiffArgs, cfg: &Config, data_dir: &Path) -> Result<()> {
    let reach = Reach { from: Some(EpochId(args.a.min(args.b))), upto: Some(EpochId(args.a.max(args.b))) };
    args.history.with(cfg, data_dir, reach, |store, g| print_diff(args, store, g))
}

fn print_diff(args: &DiffArgs, store: &dyn HistoryView, g: GuestId) -> Result<()> {
    let d = inspect::diff(store, g, EpochId(args.a), EpochId(args.b))?;
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

/// Arguments of `remus bisect`.
#[derive(Debug, clap::Args)]
pub struct BisectArgs {
    /// The first epoch of the search (where the condition does not hold).
    #[arg(long)]
    pub from: u64,
    /// The last (where it holds).
    #[arg(long)]
    pub to: u64,
    /// Which history.
    #[command(flatten)]
    pub history: History,
    /// Where the bytes are: a byte offset into the guest's memory (a
    /// guest-physical address), decimal or 0x-hex; with --equals or
    /// --changes.
    #[arg(long, value_parser = parse_address)]
    pub at: Option<u64>,
    /// The condition: the bytes at --at are VALUE (text, or `hex:` and hex
    /// digits).
    #[arg(long, value_parser = parse_value, conflicts_with_all = ["contains", "changes"])]
    pub equals: Option<Bytes>,
    /// The condition: VALUE (as for --equals) appears in the range --in.
    #[arg(long, value_parser = parse_value, requires = "within", conflicts_with = "changes")]
    pub contains: Option<Bytes>,
    /// The range for --contains: START..END.
    #[arg(long = "in", value_parser = parse_range)]
    pub within: Option<(u64, u64)>,
    /// The condition: the --len bytes at --at differ from what they were at
    /// --from.
    #[arg(long)]
    pub changes: bool,
    /// With --changes: how many bytes (default one page).
    #[arg(long, default_value_t = 4096)]
    pub len: u64,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_address(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not an address (decimal or 0x-hex): {e}"))
}

/// Bytes given on the command line: text, or `hex:` and hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

fn parse_value(s: &str) -> Result<Bytes, String> {
    let Some(h) = s.strip_prefix("hex:") else { return Ok(Bytes(s.as_bytes().to_vec())) };
    if h.is_empty() || h.len() % 2 != 0 {
        return Err(format!("{s:?}: an even, non-zero number of hex digits after hex:"));
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<_, _>>()
        .map(Bytes)
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("{s:?} is not START..END"))?;
    let (a, b) = (parse_address(a)?, parse_address(b)?);
    if a >= b {
        return Err(format!("{s:?}: the range is empty"));
    }
    Ok((a, b))
}

/// Runs `remus bisect`; false when the condition does not start to hold
/// between the two epochs.
///
/// # Errors
/// When the store cannot be opened, an epoch is missing, or the condition
/// is not given.
pub fn bisect(args: &BisectArgs, cfg: &Config, data_dir: &Path) -> Result<bool> {
    let p = match (&args.equals, &args.contains, args.changes, args.at) {
        (Some(v), None, false, Some(address)) => inspect::Predicate::Equals { address, value: v.0.clone() },
        (None, Some(v), false, _) => {
            let (start, end) = args.within.expect("clap requires --in with --contains");
            inspect::Predicate::Contains { start, end, pattern: v.0.clone() }
        }
        (None, None, true, Some(address)) => inspect::Predicate::Changed { address, len: args.len },
        _ => anyhow::bail!("give one condition: --equals VALUE --at ADDR, --contains VALUE --in START..END, or --changes --at ADDR"),
    };
    anyhow::ensure!(args.from < args.to, "--from must be before --to");
    let reach = Reach { from: Some(EpochId(args.from.min(args.to))), upto: Some(EpochId(args.from.max(args.to))) };
    args.history.with(cfg, data_dir, reach, |store, g| print_bisection(args, store, g, &p))
}

fn print_bisection(args: &BisectArgs, store: &dyn HistoryView, g: GuestId, p: &inspect::Predicate) -> Result<bool> {
    let b = inspect::bisect(store, g, EpochId(args.from), EpochId(args.to), p)?;
    let probes: Vec<_> = b.probes.iter().map(|(e, h)| serde_json::json!({"epoch": e.0, "holds": h})).collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "guest": g.0, "from": args.from, "to": args.to, "first": b.first.map(|e| e.0),
                "holds_at_from": b.ends.0, "holds_at_to": b.ends.1, "epochs_read": b.probes.len(), "probes": probes,
            })
        );
    } else {
        match (b.first, b.ends) {
            (Some(e), _) => println!(
                "{g}: the condition first holds at epoch {} ({} epochs read; exact if, once it holds, it holds at every later epoch)",
                e.0,
                b.probes.len()
            ),
            (None, (true, _)) => println!("{g}: the condition already holds at epoch {}", args.from),
            (None, _) => println!("{g}: the condition does not hold at epoch {}", args.to),
        }
    }
    Ok(b.first.is_some())
}

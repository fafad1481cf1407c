//! `remus demo`: a primary and a backup on loopback over real QUIC with
//! mutual TLS, a real RocksDB store, then restores of random committed
//! epochs checked against the primary's own memory roots.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use remus_restore::{image_root, RestorePlan, Target};
use remus_types::EpochId;
use remus_wan::driver::BackupLinkConfig;

use super::protect::{primary_options, protect_until, GuestFlags};
use super::DRAIN;
use crate::config::Config;
use remus_node::{Backup, BackupOptions};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long to protect the guest.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Random committed epochs to restore and verify.
    #[arg(long, default_value_t = 3)]
    pub restores: usize,
    /// Print the summary as one JSON object (fields in docs/cli.md).
    #[arg(long)]
    pub json: bool,
    /// Guest shape.
    #[command(flatten)]
    pub guest_flags: GuestFlags,
}

/// Runs the demo; returns false when a restore failed.
///
/// # Errors
/// When a component cannot start.
pub fn run(args: &DemoArgs, cfg: &Config, data_dir: &Path) -> Result<bool> {
    anyhow::ensure!(args.seconds > 0.0 && args.seconds.is_finite(), "--seconds must be positive");
    super::install_stop_handler();
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let _lock = lock_data_dir(data_dir)?;
    let tls = super::tls_dir(data_dir)?;
    let store_dir = data_dir.join("demo-store");
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir).with_context(|| format!("clearing the previous demo store {}", store_dir.display()))?;
    }
    let backup = Backup::start(BackupOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        store: store_dir.clone(),
        tls: tls.clone(),
        link: BackupLinkConfig::default(),
        failover: remus_node::FailoverAction::Record,
        s3: None,
        retention: None,
        witness: None,
        hooks: remus_node::HookConfig::default(),
        quota: remus_node::GuestQuota::default(),
    })?;
    let opts = primary_options(cfg, &args.guest_flags, tls, backup.addr, cfg.protect.guest)?;
    let guest = opts.guest;
    if !args.json {
        eprintln!(
            "remus demo: {} MiB guest at {:.1} Hz for {} s; backup on {} (store {})",
            opts.guest_kind.memory_mib(),
            1.0 / opts.cadence.base.as_secs_f64(),
            args.seconds,
            backup.addr,
            store_dir.display()
        );
    }
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let (mut summary, stats) = protect_until(opts, Some(until), args.json, DRAIN, None)?;
    let commits = backup.replica.stats(guest).commit_ns;
    summary.backup_commit_ms_p50 = remus_node::stats::ms(remus_node::stats::percentile(&commits, 50.0));
    summary.backup_commit_ms_p99 = remus_node::stats::ms(remus_node::stats::percentile(&commits, 99.0));

    // Restore random committed epochs and compare with the primary's roots.
    let store = std::sync::Arc::clone(&backup.store);
    let committed = store.head(guest)?.map_or(0, |h| h.epoch.0);
    let mut epochs: Vec<u64> = (1..=committed).collect();
    epochs.shuffle(&mut rand::thread_rng());
    epochs.truncate(args.restores);
    epochs.sort_unstable();
    let img = data_dir.join("demo-restore.img");
    for &e in &epochs {
        let expected = stats.lock().roots.get(&EpochId(e)).copied();
        let t0 = Instant::now();
        let restored = RestorePlan::new(&*store, guest, Target::Epoch(EpochId(e))).and_then(|plan| plan.execute(&*store, &img, |_, _| {}));
        let secs = t0.elapsed().as_secs_f64();
        // Independent check: hash the written file itself.
        let ok = restored.map_err(anyhow::Error::from).and_then(|_| image_root(&img).map_err(anyhow::Error::from));
        match (ok, expected) {
            (Ok(root), Some(want)) if root == want => summary.restores_verified += 1,
            (Ok(_), _) => {
                summary.restores_failed += 1;
                eprintln!("epoch {e}: restored image differs from the primary's memory at that epoch");
            }
            (Err(err), _) => {
                summary.restores_failed += 1;
                eprintln!("epoch {e}: restore failed: {err:#}");
            }
        }
        summary.restored_epochs.push(e);
        summary.restore_seconds.push(secs);
    }
    let _ = std::fs::remove_file(&img);
    drop(store);
    backup.stop();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary.render());
    }
    Ok(summary.restores_failed == 0)
}

/// Holds an exclusive lock on `<data-dir>/demo.lock` for the demo's life:
/// a second demo on the same directory would delete the first one's store.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File> {
    let path = data_dir.join("demo.lock");
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let locked = remus_sys::try_lock_exclusive(&f).with_context(|| format!("locking {}", path.display()))?;
    anyhow::ensure!(locked, "another remus demo is running with data directory {}", data_dir.display());
    Ok(f)
}

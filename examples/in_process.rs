//! A protected application in one process: a 64 MiB arena guest
//! replicated to a backup on loopback (real QUIC, mutual TLS, RocksDB),
//! then its latest committed epoch restored and checked.
//!
//! `cargo run --release -p remus-cli --example in_process`

use std::time::Duration;

use anyhow::Result;
use remus_capture::{ArenaConfig, CadenceConfig};
use remus_node::{Backup, BackupOptions, FailoverAction, GuestKind, Primary, PrimaryOptions};
use remus_restore::{image_root, RestorePlan, Target};
use remus_types::GuestId;
use remus_wan::driver::BackupLinkConfig;
use remus_wan::tls::{keygen, TlsDir};
use remus_wan::SenderConfig;

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tls = TlsDir(dir.path().join("tls"));
    keygen(&tls.0)?;
    let backup = Backup::start(BackupOptions {
        listen: "127.0.0.1:0".parse()?,
        store: dir.path().join("store"),
        tls: tls.clone(),
        link: BackupLinkConfig::default(),
        failover: FailoverAction::Record,
        s3: None,
        retention: None,
        witness: None,
        hooks: remus_node::HookConfig::default(),
        quota: remus_node::GuestQuota::default(),
    })?;
    let primary = Primary::start(PrimaryOptions {
        guest: GuestId(1),
        guest_kind: GuestKind::Arena(ArenaConfig { memory_mib: 64, ..ArenaConfig::default() }),
        cadence: CadenceConfig::fixed(Duration::from_millis(25)),
        backup: backup.addr,
        far: Vec::new(),
        release: remus_node::Release::Near,
        far_retained_bytes: remus_node::fanout::FAR_RETAINED_BYTES,
        tls,
        sender: SenderConfig::default(),
        link: Default::default(),
        output_log: None,
        record_roots: None,
        witness: None,
        hooks: remus_node::HookConfig::default(),
        continues: None,
        adopt_lease: None,
        release_first_copy: true,
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let stats = std::sync::Arc::clone(&primary.stats);
    primary.finish(Duration::from_secs(30))?;
    let (epoch, want) = {
        let s = stats.lock();
        (s.acked, s.roots[&s.acked])
    };
    let img = dir.path().join("latest.img");
    let plan = RestorePlan::new(&*backup.store, GuestId(1), Target::Latest)?;
    plan.execute(&*backup.store, &img, |_, _| {})?;
    anyhow::ensure!(image_root(&img)? == want, "restored image differs from the primary");
    println!("protected for 2 s: {} epochs committed; epoch {} restored byte-exact", epoch.0, epoch.0);
    backup.stop();
    Ok(())
}

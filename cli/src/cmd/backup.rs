//! `remus backup`: keep replicas of one or more primaries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::config::Config;
use remus_node::{Backup, BackupOptions};
use remus_node::{BackupEvent, FailoverAction, FailoverOutcome, ResumeVm};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Address to listen on (default 127.0.0.1:7400; port 0 picks one).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Store directory (default `<data-dir>/store`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Fail over when a primary goes silent: fence it and write its last
    /// committed epoch as a memory image into this directory.
    #[arg(long)]
    pub failover_dir: Option<PathBuf>,
    /// With --failover-dir: resume a failed-over QEMU guest here, in a new
    /// QEMU, from its last committed epoch.
    #[arg(long, requires = "failover_dir")]
    pub resume: bool,
    /// QEMU binary for --resume (default qemu-system-x86_64).
    #[arg(long, requires = "resume")]
    pub qemu_binary: Option<PathBuf>,
    /// TAP interface for a resumed guest's network.
    #[arg(long, requires = "resume")]
    pub tap: Option<String>,
    /// With --resume: protect a resumed guest at once, replicating to the
    /// backup at this address; the guest runs under a `remus protect qemu`
    /// process of its own (not this backup's), in the next generation.
    #[arg(long, requires = "resume")]
    pub reverse_to: Option<SocketAddr>,
    /// The witness: with --failover-dir a guest is taken over only by
    /// winning its lease.
    #[command(flatten)]
    pub witness: super::WitnessFlags,
}

/// Runs until SIGINT or SIGTERM.
///
/// # Errors
/// When the store or the address cannot be opened, or TLS material is missing.
pub fn run(args: &BackupArgs, cfg: &Config, config_path: Option<&Path>, data_dir: &Path) -> Result<()> {
    super::install_stop_handler();
    let tls = super::tls_dir_for(data_dir, None)?;
    let witness = super::witness_options(cfg, &args.witness, "backup", &tls, None)?;
    let b = &cfg.backup;
    let store = args.store.clone().or_else(|| b.store.clone()).unwrap_or_else(|| data_dir.join("store"));
    let backup = Backup::start(BackupOptions {
        listen: args.listen.unwrap_or(b.listen),
        store: store.clone(),
        tls,
        link: b.link(),
        failover: args.failover_dir.clone().map_or(FailoverAction::Record, |dir| FailoverAction::RestoreTo {
            dir,
            resume: args.resume.then(|| ResumeVm {
                qemu_binary: args.qemu_binary.clone().unwrap_or_else(remus_qemu::default_qemu),
                tap: args.tap.clone(),
                images: cfg.backup.qemu_images(),
                protect_to: args.reverse_to,
            }),
        }),
        s3: cfg.s3.clone(),
        retention: cfg.retention.as_ref().map(crate::config::RetentionConfig::policy).transpose()?,
        witness,
        hooks: cfg.hooks.clone().unwrap_or_default(),
        quota: b.quota(),
    })?;
    // Scripts and tests read this line to learn the port.
    println!("listening on {} (store {})", backup.addr, store.display());
    use std::io::Write;
    std::io::stdout().flush()?;
    // One line per guest whose committed epoch moved, at most twice a
    // second: progress for people, and a signal scripts and tests can wait on.
    let mut shown = std::collections::HashMap::new();
    let mut uploaded = std::collections::HashMap::new();
    let mut last_error = None;
    let mut next_progress = std::time::Instant::now() + Duration::from_millis(500);
    while !super::stop_requested() {
        // Events as they come; progress at most twice a second.
        if let Ok(ev) = backup.events.recv_deadline(next_progress) {
            show_event(&ev, &Reverse { args, config_path, data_dir })?;
            continue;
        }
        next_progress = std::time::Instant::now() + Duration::from_millis(500);
        for (g, head) in backup.store.guests()? {
            if shown.insert(g, head.epoch) != Some(head.epoch) {
                match backup.store.manifest(g, head.epoch) {
                    // A graft: the head is another backup's epoch, whose
                    // memory is not here (the primary sends it next); its
                    // event said so.
                    Err(remus_store::StoreError::NoEpoch { .. }) => {}
                    _ => println!("committed {g} epoch {}", head.epoch.0),
                }
                std::io::stdout().flush()?;
            }
            if let (Some(u), true) = (&backup.uploader, cfg.s3.is_some()) {
                let err = u.last_error();
                if err != last_error {
                    match &err {
                        Some(e) => eprintln!("s3 upload failing (the backlog stays in the store and is retried): {e}"),
                        None => eprintln!("s3 upload resumed"),
                    }
                    last_error = err;
                }
                let up = backup.store.s3_cursor(g)?;
                if up.0 > 0 && uploaded.insert(g, up) != Some(up) {
                    println!("uploaded {g} epoch {}", up.0);
                    std::io::stdout().flush()?;
                }
            }
        }
    }
    for (g, head) in backup.store.guests()? {
        let s = backup.replica.stats(g);
        eprintln!(
            "{g}: committed up to epoch {} ({} this run){}",
            head.epoch.0,
            s.epochs,
            s.lost_at.map(|e| format!(", primary lost after epoch {}", e.0)).unwrap_or_default()
        );
    }
    backup.stop();
    Ok(())
}

/// What a guest protected again after failover is started with.
struct Reverse<'a> {
    args: &'a BackupArgs,
    config_path: Option<&'a Path>,
    data_dir: &'a Path,
}

impl Reverse<'_> {
    /// Starts `remus protect qemu` on the failed-over guest's files in
    /// `run_dir`, replicating to `backup`: a process of its own (its own
    /// process group), so the guest outlives this backup. Its output goes
    /// to `run_dir/protect.log`, at info level.
    fn start(
        &self,
        guest: remus_types::GuestId,
        run_dir: &Path,
        backup: SocketAddr,
        after: (u64, String),
        lease: Option<&(u64, String)>,
    ) -> Result<(u32, PathBuf)> {
        use anyhow::Context;
        use std::os::unix::process::CommandExt;
        let log = run_dir.join("protect.log");
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut c = std::process::Command::new(std::env::current_exe().context("finding the remus binary")?);
        if let Some(p) = self.config_path {
            c.arg("--config").arg(p);
        }
        // Its log is a file: info level (when it was protected, links
        // lost and regained), as `--verbose` gives.
        c.arg("--data-dir").arg(self.data_dir).args(["--verbose", "protect", "qemu", "--guest", &guest.0.to_string()]);
        c.args(["--backup", &backup.to_string(), "--resume-run-dir"]).arg(run_dir);
        c.args(["--continue-after", &format!("{}:{}", after.0, after.1)]);
        if let Some((generation, tag)) = lease {
            c.args(["--adopt-lease", &format!("{generation}:{tag}")]);
        }
        if let Some(t) = &self.args.tap {
            c.args(["--tap", t]);
        }
        if let Some(q) = &self.args.qemu_binary {
            c.arg("--qemu-binary").arg(q);
        }
        if let Some(w) = &self.args.witness.witness {
            c.args(["--witness", w]);
        }
        if let Some(n) = &self.args.witness.node {
            c.args(["--node", n]);
        }
        let child = c
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("starting remus protect for the failed-over guest")?;
        Ok((child.id(), log))
    }
}

/// Prints one event of the backup: failovers on stdout (scripts and
/// tests wait on those lines), losses and failures on stderr.
fn show_event(ev: &BackupEvent, reverse: &Reverse<'_>) -> Result<()> {
    use std::io::Write;
    match ev {
        BackupEvent::FailedOver { guest, epoch, outcome: FailoverOutcome::ReadyToProtect { run_dir, backup, manifest, lease } } => {
            match reverse.start(*guest, run_dir, *backup, (epoch.0, manifest.to_hex()), lease.as_ref()) {
                Ok((pid, log)) => println!(
                    "failover {guest} epoch {} protected again by remus pid {pid}, replicating to {backup} (log {})",
                    epoch.0,
                    log.display()
                ),
                Err(e) => eprintln!("failover of {guest} failed: its files are ready in {} but {e:#}", run_dir.display()),
            }
        }
        BackupEvent::PrimaryLost { guest, committed, silence } => {
            eprintln!("{guest}: primary silent after committed epoch {}: {silence}", committed.0);
        }
        BackupEvent::FailedOver { guest, epoch, outcome: FailoverOutcome::Resumed { pid, qmp, from_live } } => println!(
            "failover {guest} epoch {} resumed in qemu pid {pid} (qmp {}; {})",
            epoch.0,
            qmp.display(),
            if *from_live { "from the live image" } else { "restored from the store" }
        ),
        BackupEvent::FailedOver { guest, epoch, outcome: FailoverOutcome::Written { path } } => {
            println!("failover {guest} epoch {} image {}", epoch.0, path.display());
        }
        BackupEvent::FailoverFailed { guest, error } => eprintln!("failover of {guest} failed: {error}"),
        BackupEvent::Fenced { guest, epoch } => eprintln!("{guest}: its old primary is fenced; failing over from epoch {}", epoch.0),
        BackupEvent::HandedOver { guest, epoch } => {
            eprintln!("{guest}: its primary hands it over at epoch {} (a planned move); taking it over", epoch.0);
        }
        BackupEvent::NotProtected { guest, committed } => eprintln!(
            "{guest}: not failed over: it was not yet protected (epoch {} here, the newest committed, is one whose output its \
             primary released while making its first copy; output of later epochs may be out)",
            committed.0
        ),
        BackupEvent::TakeoverAbandoned { guest } => eprintln!("{guest}: the primary is back before its lease ran out; no failover"),
        BackupEvent::LeaseWon { lease, after, released: false } => {
            println!(
                "lease {} generation {} taken by {} after {} ms of silence",
                lease.guest,
                lease.generation,
                lease.owner,
                after.as_millis()
            );
        }
        BackupEvent::LeaseWon { lease, after, released: true } => {
            println!(
                "lease {} generation {} taken by {} {} ms into the move (released by its owner)",
                lease.guest,
                lease.generation,
                lease.owner,
                after.as_millis()
            );
        }
        BackupEvent::Continued { guest, after, elsewhere_from } => match elsewhere_from {
            Some(f) => println!("continuing {guest} after epoch {} (its epochs {} to there are elsewhere)", after.0, f.0),
            None => println!("continuing {guest} after epoch {} (its history up to there is elsewhere)", after.0),
        },
        BackupEvent::QuotaExceeded { guest, used, limit } => eprintln!(
            "{guest}: over its store quota ({} of {}): its commits are refused until retention frees space or [backup] \
             guest-store-mib is raised",
            remus_node::quota::bytes(*used),
            remus_node::quota::bytes(*limit)
        ),
        other => eprintln!("{other:?}"),
    }
    std::io::stdout().flush()?;
    Ok(())
}

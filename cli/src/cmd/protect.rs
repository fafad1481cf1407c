//! `remus protect`: run a protected guest and replicate it to a backup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use remus_types::GuestId;

use crate::config::Config;
use crate::qemu_settings::QemuSettings;
use crate::summary::{progress_line, Summary};
use remus_node::{GuestKind, Primary, PrimaryOptions};

/// Flags shared by `protect` and `demo`; each overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GuestFlags {
    /// Guest memory in MiB (default 1024).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Epochs per second (default 40).
    #[arg(long, conflicts_with = "epoch_ms")]
    pub hz: Option<f64>,
    /// Epoch length in milliseconds (default 25).
    #[arg(long)]
    pub epoch_ms: Option<u64>,
    /// Page writes per second of the built-in workload (default 20000).
    #[arg(long)]
    pub pages_per_sec: Option<u64>,
    /// Congestion control of the link: bbr, cubic or newreno (default:
    /// `protect.congestion`, bbr).
    #[arg(long)]
    pub congestion: Option<remus_wan::Congestion>,
    /// Parity beside each epoch: auto, off, or 1..=16 parity shards per 32
    /// (default: `protect.fec`, auto).
    #[arg(long)]
    pub fec: Option<remus_wan::fec::Fec>,
    /// A bandwidth cap for the link in Mbit/s, 0 for none (default:
    /// `protect.max-rate-mbit`, none).
    #[arg(long)]
    pub max_rate_mbit: Option<u64>,
}

/// Which guest `remus protect` runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The built-in in-process guest.
    #[default]
    Arena,
    /// A QEMU virtual machine.
    Qemu,
}

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct ProtectArgs {
    /// The guest: `arena` (built in) or `qemu`.
    #[arg(value_enum, default_value_t = Kind::Arena)]
    pub kind: Kind,
    /// Backup address (default 127.0.0.1:7400).
    #[arg(long)]
    pub backup: Option<SocketAddr>,
    /// A far backup, replicated to beside the near one (repeat for more;
    /// replaces `protect.far`).
    #[arg(long)]
    pub far: Vec<SocketAddr>,
    /// Whose acknowledgements release output: near (default), all, or a
    /// count of backups.
    #[arg(long, value_parser = |s: &str| remus_node::Release::parse(s))]
    pub release: Option<remus_node::Release>,
    /// Guest id (default 1).
    #[arg(long)]
    pub guest: Option<u64>,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Append released output lines to this file.
    #[arg(long)]
    pub output_log: Option<PathBuf>,
    /// Record each sealed epoch's memory root here (JSON lines).
    #[arg(long)]
    pub record_roots: Option<PathBuf>,
    /// Print the final summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// When stopping, wait this long for the backup to acknowledge what
    /// was sealed (default 30).
    #[arg(long, default_value_t = 30.0)]
    pub drain_seconds: f64,
    /// Guest shape.
    #[command(flatten)]
    pub guest_flags: GuestFlags,
    /// QEMU guest settings (with `qemu`).
    #[command(flatten)]
    pub qemu: QemuSettings,
    /// The witness.
    #[command(flatten)]
    pub witness: super::WitnessFlags,
    /// With `qemu`: resume the guest whose checkpoint is laid out in this
    /// run directory (memory, disk.img, vmstate, machine.json: what a
    /// failover or `remus-restore --to DIR` writes) and protect it; its
    /// machine comes from machine.json.
    #[arg(long)]
    pub resume_run_dir: Option<PathBuf>,
    /// With --resume-run-dir: the guest's history so far is kept by
    /// another backup up to EPOCH:MANIFEST (hex); a backup holding none of
    /// it continues that chain (what `remus backup --reverse-to` passes).
    #[arg(long, value_parser = parse_continues, requires = "resume_run_dir")]
    pub continue_after: Option<(remus_types::EpochId, remus_types::ChunkId)>,
    /// With a witness: adopt the lease GENERATION:VERSION another process
    /// of this node handed off, instead of waiting it out (what `remus
    /// backup --reverse-to` passes).
    #[arg(long, value_parser = parse_adopt)]
    pub adopt_lease: Option<(u64, String)>,
}

fn parse_adopt(s: &str) -> Result<(u64, String), String> {
    let (g, tag) = s.split_once(':').ok_or_else(|| format!("{s:?} is not GENERATION:VERSION"))?;
    Ok((g.parse().map_err(|e| format!("{g:?}: {e}"))?, tag.to_string()))
}

fn parse_continues(s: &str) -> Result<(remus_types::EpochId, remus_types::ChunkId), String> {
    let (e, m) = s.split_once(':').ok_or_else(|| format!("{s:?} is not EPOCH:MANIFEST"))?;
    let epoch = e.parse::<u64>().map_err(|err| format!("{e:?}: {err}"))?;
    let manifest = remus_types::ChunkId::from_hex(m).ok_or_else(|| format!("{m:?} is not a 64-digit hex manifest id"))?;
    Ok((remus_types::EpochId(epoch), manifest))
}

/// Builds the primary's options from the config and the flags.
///
/// # Errors
/// When a value is out of range.
pub fn primary_options(
    cfg: &Config,
    flags: &GuestFlags,
    tls: remus_wan::tls::TlsDir,
    backup: SocketAddr,
    guest: u64,
) -> Result<PrimaryOptions> {
    let p = &cfg.protect;
    let congestion = match flags.congestion {
        Some(c) => c,
        None => p.congestion.parse().map_err(|e| anyhow::anyhow!("protect.congestion: {e}"))?,
    };
    let fec = match flags.fec {
        Some(f) => f,
        None => p.fec.parse().map_err(|e| anyhow::anyhow!("protect.fec: {e}"))?,
    };
    let mut arena = p.arena.clone();
    if let Some(m) = flags.memory_mib {
        arena.memory_mib = m;
    }
    if let Some(r) = flags.pages_per_sec {
        arena.workload.pages_per_sec = r;
    }
    let guest_kind = GuestKind::Arena(arena);
    let epoch = match (flags.hz, flags.epoch_ms) {
        (Some(hz), _) => {
            anyhow::ensure!(hz > 0.0 && hz <= 1000.0, "--hz must be in (0, 1000], got {hz}");
            Duration::from_secs_f64(1.0 / hz)
        }
        (None, Some(ms)) => {
            anyhow::ensure!((1..=10_000).contains(&ms), "--epoch-ms must be in 1..=10000, got {ms}");
            Duration::from_millis(ms)
        }
        (None, None) => Duration::from_millis(p.epoch_ms),
    };
    let sender = p.sender();
    let cadence = p.cadence(epoch);
    let max_rate = match flags.max_rate_mbit.unwrap_or(p.max_rate_mbit) {
        0 => None,
        mbit => {
            Some(mbit.checked_mul(crate::config::BYTES_PER_MBIT).ok_or_else(|| anyhow::anyhow!("--max-rate-mbit {mbit} is too large"))?)
        }
    };
    let link = remus_wan::driver::LinkTuning { congestion, fec, max_rate };
    Ok(PrimaryOptions {
        guest: GuestId(guest),
        guest_kind,
        cadence,
        backup,
        far: p.far.clone(),
        release: remus_node::Release::parse(&p.release).map_err(|e| anyhow::anyhow!("protect.release: {e}"))?,
        far_retained_bytes: p.far_retained_mib << 20,
        tls,
        sender,
        link,
        output_log: None,
        record_roots: None,
        witness: None,
        hooks: cfg.hooks.clone().unwrap_or_default(),
        continues: None,
        adopt_lease: None,
        release_first_copy: p.release_first_copy,
    })
}

/// Reports progress: redrawn on a terminal, a line a second otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    last: Instant,
}

impl Progress {
    /// A reporter; `quiet` prints nothing.
    #[must_use]
    pub fn new(quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Self { bar, quiet, last: Instant::now() }
    }

    /// Shows `line`.
    pub fn show(&mut self, line: String) {
        match &self.bar {
            Some(b) => b.set_message(line),
            None if !self.quiet && self.last.elapsed() >= Duration::from_secs(1) => {
                eprintln!("{line}");
                self.last = Instant::now();
            }
            None => {}
        }
    }

    /// Clears the display.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// Waits while the primary runs, showing progress, until `until` or a stop
/// signal, a move asked for on `mover`, or the engine ending by itself.
pub fn watch(primary: &Primary, until: Option<Instant>, progress: &mut Progress, mover: Option<&super::moving::MoveControl>) {
    loop {
        std::thread::sleep(Duration::from_millis(20));
        progress.show(progress_line(&primary.stats.lock()));
        if super::stop_requested()
            || until.is_some_and(|t| Instant::now() >= t)
            || primary.engine_finished()
            || mover.is_some_and(super::moving::MoveControl::requested)
        {
            break;
        }
    }
}

/// Runs a primary until `until` (or a stop signal), showing progress
/// unless `quiet`, then waits up to `drain` for every sealed epoch to be
/// acknowledged; returns the summary and the primary's statistics.
///
/// # Errors
/// When the guest cannot start, the link fails, or the drain times out.
pub fn protect_until(
    opts: PrimaryOptions,
    until: Option<Instant>,
    quiet: bool,
    drain: Duration,
    mover: Option<&super::moving::MoveControl>,
) -> Result<(Summary, std::sync::Arc<parking_lot::Mutex<remus_node::stats::PrimaryStats>>)> {
    let guest = opts.guest;
    let primary = Primary::start(opts)?;
    let mut progress = Progress::new(quiet);
    watch(&primary, until, &mut progress, mover);
    progress.finish();
    let stats = std::sync::Arc::clone(&primary.stats);
    let exact = primary.exact_tracking;
    if let Some(m) = mover.filter(|m| m.requested()) {
        if !quiet {
            eprintln!("moving: sealing the last epoch with the guest held still, then handing it over to the backup");
        }
        match primary.hand_over(drain) {
            Ok((epoch, held)) => m.answer(&format!(
                "moved {guest} at epoch {}: the guest was held still for {:.1} ms until the backup had taken it over",
                epoch.0,
                held.as_secs_f64() * 1e3
            )),
            Err(e) => {
                m.answer(&format!("move of {guest} failed: {e}"));
                return Err(e.into());
            }
        }
        let summary = Summary::from_stats(&stats.lock(), exact);
        return Ok((summary, stats));
    }
    if !quiet {
        eprintln!("stopping: waiting for the backup to acknowledge every sealed epoch");
    }
    primary.finish(drain)?;
    let summary = Summary::from_stats(&stats.lock(), exact);
    Ok((summary, stats))
}

/// The configuration of a guest resumed from the checkpoint in `dir`: its
/// machine from `dir/machine.json` (checked against the trusted `images`),
/// the rest from `settings`.
fn resumed_config(settings: &QemuSettings, dir: &Path, images: &[PathBuf]) -> Result<remus_qemu::QemuConfig> {
    use anyhow::Context;
    let path = dir.join("machine.json");
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let machine: remus_vm::QemuMachine = serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    // It came from a checkpoint: run only what this host trusts.
    machine.validate_from_peer(images).with_context(|| format!("{}", path.display()))?;
    let mut cfg = settings.resolve(0)?;
    (cfg.machine, cfg.run_dir, cfg.disk) = (machine, dir.to_path_buf(), None);
    Ok(cfg)
}

/// Runs the command.
///
/// # Errors
/// When the guest cannot start, TLS material is missing, or the backup
/// refuses this primary.
pub fn run(args: &ProtectArgs, cfg: &Config, data_dir: &Path) -> Result<()> {
    anyhow::ensure!(args.drain_seconds >= 0.0 && args.drain_seconds.is_finite(), "--drain-seconds must be non-negative");
    super::install_stop_handler();
    let guest = args.guest.unwrap_or(cfg.protect.guest);
    let tls = super::tls_dir_for(data_dir, Some(remus_types::GuestId(guest)))?;
    let backup = args.backup.unwrap_or(cfg.protect.backup);
    let mut opts = primary_options(cfg, &args.guest_flags, tls, backup, guest)?;
    opts.output_log = args.output_log.clone();
    opts.record_roots = args.record_roots.clone();
    opts.witness = super::witness_options(cfg, &args.witness, "primary", &opts.tls, Some(remus_types::GuestId(guest)))?;
    opts.continues = args.continue_after;
    opts.adopt_lease = args.adopt_lease.clone();
    if !args.far.is_empty() {
        opts.far = args.far.clone();
    }
    if let Some(r) = args.release {
        opts.release = r;
    }
    anyhow::ensure!(!opts.far.contains(&opts.backup), "a far backup must not be the near one ({})", opts.backup);
    if args.kind == Kind::Qemu {
        anyhow::ensure!(args.guest_flags.pages_per_sec.is_none(), "--pages-per-sec applies to the arena guest only");
        let mut settings = args.qemu.clone().or(&cfg.protect.qemu);
        settings.memory_mib = args.guest_flags.memory_mib.or(settings.memory_mib);
        opts.guest_kind = match &args.resume_run_dir {
            Some(dir) => GuestKind::ResumedQemu(resumed_config(&settings, dir, &cfg.backup.qemu_images())?),
            None => GuestKind::Qemu(settings.resolve(opts.guest.0)?),
        };
    } else {
        anyhow::ensure!(args.resume_run_dir.is_none(), "--resume-run-dir applies to `remus protect qemu` only");
    }
    let far: String = opts.far.iter().map(|a| format!(" + far {a}")).collect();
    eprintln!(
        "protecting guest {} ({}, {} MiB) at {:.1} Hz, replicating to {backup}{far}",
        opts.guest.0,
        match args.kind {
            Kind::Arena => "arena",
            Kind::Qemu => "qemu",
        },
        opts.guest_kind.memory_mib(),
        1.0 / opts.cadence.base.as_secs_f64()
    );
    if let Some(w) = &opts.witness {
        eprintln!("lease on the witness as {} ({} ms)", w.node, w.timing.lease.as_millis());
    }
    let until = args.seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mover = super::moving::MoveControl::listen(data_dir, opts.guest.0)?;
    let (summary, _) = protect_until(opts, until, args.json, Duration::from_secs_f64(args.drain_seconds), Some(&mover))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary.render());
    }
    Ok(())
}

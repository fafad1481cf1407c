//! `remus-restore`: write the memory image of any committed epoch.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use remus_restore::elf::Vmcoreinfo;
use remus_restore::{RestorePlan, RestoreReport, RestoreSource, S3Source, Target};
use remus_types::{EpochId, GuestId};

use super::parse_time;
use crate::config::Config;

/// What `remus-restore` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormat {
    /// The memory image (for a QEMU guest, the files QEMU resumes from).
    Raw,
    /// An ELF core file of the guest's memory.
    ElfCore,
}

/// Arguments of `remus-restore`.
#[derive(Debug, clap::Parser)]
#[command(name = "remus-restore", version, about = "Restore a guest's memory image at any committed epoch")]
#[command(group(clap::ArgGroup::new("target").required(true).args(["epoch", "at", "latest"])))]
pub struct RestoreArgs {
    /// Data directory (store at `<data-dir>/store`).
    #[arg(long, default_value = "remus-data")]
    pub data_dir: PathBuf,
    /// Store directory (overrides the data directory's).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Guest id.
    #[arg(long, default_value_t = 1)]
    pub guest: u64,
    /// Restore this epoch.
    #[arg(long)]
    pub epoch: Option<u64>,
    /// Restore the newest epoch at or before this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    pub at: Option<String>,
    /// Restore the last committed epoch.
    #[arg(long)]
    pub latest: bool,
    /// Image file to write; for a QEMU guest, a directory that receives
    /// `memory`, `disk.img`, `vmstate` and `machine.json`. With `--mount
    /// --run`: QEMU's run directory (sockets, serial log, disk overlay).
    #[arg(long, required_unless_present = "mount")]
    pub to: Option<PathBuf>,
    /// Serve the epoch at this directory instead of writing it: the same
    /// files, read-only over FUSE, each page read from the store (and
    /// verified) when first read. Stays mounted until Ctrl-C, SIGTERM or
    /// `umount DIR`; with `--run`, until QEMU exits.
    #[arg(long, value_name = "DIR", conflicts_with = "from")]
    pub mount: Option<PathBuf>,
    /// QEMU guests: start QEMU on the restored files, paused, print its
    /// QMP socket, and wait until it exits (time-travel inspection). With
    /// `--mount`, QEMU starts at once on the mounted files: its RAM is
    /// mapped privately and its disk writes go to an overlay in `--to`.
    #[arg(long)]
    pub run: bool,
    /// QEMU binary for --run (default qemu-system-x86_64).
    #[arg(long, requires = "run")]
    pub qemu_binary: Option<PathBuf>,
    /// With --run: continue the guest at once instead of leaving it paused.
    #[arg(long, requires = "run")]
    pub start: bool,
    /// With --run: connect the guest's network to this TAP device (else it
    /// has none).
    #[arg(long, requires = "run")]
    pub tap: Option<String>,
    /// With --run: QEMU's gdbstub listens on this port of 127.0.0.1
    /// (`gdb -ex 'target remote :PORT'`; the guest stays paused until gdb
    /// or QMP continues it).
    #[arg(long, value_name = "PORT", requires = "run", conflicts_with = "start")]
    pub gdb: Option<u16>,
    /// Restore from the S3 tier alone (`s3://BUCKET/PREFIX`), without any
    /// local store: after losing the backup site.
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    /// TOML configuration file (its `[s3]` table: endpoint, region, credentials).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// What to write at --to: `raw` (the memory image; for a QEMU guest
    /// its files) or `elf-core` (one core file of the guest's memory, at
    /// its guest-physical addresses for a QEMU guest, that `gdb -c` and
    /// `readelf` open).
    #[arg(long, value_enum, default_value_t = ImageFormat::Raw, conflicts_with_all = ["mount", "run"])]
    pub format: ImageFormat,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn bar(json: bool, len: u64, template: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() || json {
        return None;
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(indicatif::ProgressStyle::with_template(&format!("{{spinner}} {template}")).expect("valid template").progress_chars("=> "));
    Some(b)
}

/// A restored QEMU guest's state and run directory.
type VmFiles = (remus_vm::QemuState, remus_vm::RunDir);

/// What a restore wrote.
struct Restored {
    /// The epoch's manifest.
    manifest: remus_store::Manifest,
    report: RestoreReport,
    /// A QEMU guest's files (in the raw format).
    vm: Option<VmFiles>,
    /// Whether an ELF core carries the guest kernel's crash-dump note, and
    /// of how many vCPUs it carries the registers.
    core: Option<(Vmcoreinfo, usize)>,
}

/// A QEMU guest's restore when `vm` wrote its files; for any other guest,
/// the one image `image` writes (which `--run` cannot start: refused
/// before anything is written).
fn files_or_image(
    args: &RestoreArgs,
    vm: Option<(remus_vm::QemuState, remus_vm::RunDir, RestoreReport)>,
    image: impl FnOnce() -> Result<RestoreReport>,
) -> Result<(RestoreReport, Option<VmFiles>)> {
    match vm {
        Some((state, run, report)) => Ok((report, Some((state, run)))),
        None => {
            anyhow::ensure!(!args.run, "--run needs a QEMU guest; guest {} is not one", args.guest);
            Ok((image()?, None))
        }
    }
}

/// Restores from the S3 tier alone: the checkpoint and segments the target
/// needs first (with a progress bar), then the same plan as from a local
/// store.
fn restore_from_s3(args: &RestoreArgs, to: &Path, target: Target) -> Result<Restored> {
    let cfg = Config::load(args.config.as_deref())?;
    let s3 = super::s3_config(&cfg, args.from.as_deref())?;
    let tier = super::connect_s3(&s3)?;
    let manifests = bar(args.json, 0, "reading the history from S3 [{bar:40}] {pos}/{len} segments ({elapsed})");
    let source = S3Source::read(&tier, GuestId(args.guest), target, &mut |done, total| {
        if let Some(b) = &manifests {
            b.set_length(total);
            b.set_position(done);
        }
    })
    .with_context(|| format!("reading {}", s3.url()))?;
    if let Some(b) = manifests {
        b.finish_and_clear();
    }
    restore_from(args, &source, to, target, "fetching packs from S3").with_context(|| format!("restoring from {}", s3.url()))
}

/// The restore plan over either tier: a QEMU guest comes back as its files
/// (memory, disk image, device state), any other as one image; a bar
/// shows the pages written.
fn restore_from<S: RestoreSource + ?Sized>(args: &RestoreArgs, source: &S, to: &Path, target: Target, what: &str) -> Result<Restored> {
    let plan = RestorePlan::new(source, GuestId(args.guest), target)?;
    let pages = bar(args.json, plan.manifest.page_count, &format!("{what} [{{bar:40}}] {{pos}}/{{len}} pages written ({{elapsed}})"));
    let mut show = |done, total| {
        if let Some(b) = &pages {
            b.set_length(total);
            b.set_position(done);
        }
    };
    let (report, vm, core) = match args.format {
        ImageFormat::ElfCore => {
            let layout = remus_restore::elf::layout(&plan, source)?;
            let core = remus_restore::elf::write_core(&plan, source, &layout, to, &mut show)?;
            (core.restore, None, Some((core.vmcoreinfo, core.registers)))
        }
        ImageFormat::Raw => {
            let vm = remus_restore::vm::restore_vm(source, &plan, to, &mut show)?;
            let (report, vm) = files_or_image(args, vm, || Ok(plan.execute(source, to, &mut show)?))?;
            (report, vm, None)
        }
    };
    if let Some(b) = pages {
        b.finish_and_clear();
    }
    Ok(Restored { manifest: plan.manifest, report, vm, core })
}

/// Runs the restore.
///
/// # Errors
/// When the store cannot be opened, nothing matches the target, a chunk is
/// missing or corrupt, or the image cannot be written.
pub fn run(args: &RestoreArgs) -> Result<()> {
    let target = match (args.epoch, &args.at) {
        (Some(e), _) => Target::Epoch(EpochId(e)),
        (None, Some(t)) => Target::At(parse_time(t)?),
        (None, None) => Target::Latest,
    };
    let t0 = Instant::now();
    if let Some(at) = &args.mount {
        return serve(args, target, at, t0);
    }
    let to = args.to.as_deref().context("--to is required")?;
    let Restored { manifest, report, vm, core } = if args.from.is_some() {
        restore_from_s3(args, to, target)?
    } else {
        let store = super::open_store_read_only(args.store.as_deref(), &args.data_dir)?;
        restore_from(args, &store, to, target, "restoring")?
    };
    let plan = RestorePlan { guest: GuestId(args.guest), manifest, sync: true };
    let secs = t0.elapsed().as_secs_f64();
    if args.json {
        let v = serde_json::json!({
            "guest": args.guest, "epoch": report.epoch.0, "time": super::format_time(plan.manifest.time_unix_ns),
            "bytes": report.bytes, "pages_written": report.pages_written, "memory_root": report.root.to_hex(),
            "verified": true, "seconds": secs, "to": to.display().to_string(),
            "format": if args.format == ImageFormat::ElfCore { "elf-core" } else { "raw" },
            "kernel_release": match &core { Some((Vmcoreinfo::Kept { release }, _)) => Some(release), _ => None },
            "vcpu_registers": core.as_ref().map(|(_, n)| n),
        });
        println!("{v}");
    } else {
        println!(
            "restored guest {} epoch {} ({}) to {}{}: {} bytes, {} pages written, memory root {} verified, {:.2} s{}",
            args.guest,
            report.epoch.0,
            super::format_time(plan.manifest.time_unix_ns),
            to.display(),
            if args.format == ImageFormat::ElfCore { " as an ELF core" } else { "" },
            report.bytes,
            report.pages_written,
            &report.root.to_hex()[..16],
            secs,
            core.as_ref().map(core_notes).unwrap_or_default()
        );
    }
    if let (true, Some((state, run))) = (args.run, vm) {
        trusted_machine(args, &state)?;
        let qemu = args.qemu_binary.clone().unwrap_or_else(remus_qemu::default_qemu);
        let mut vm = remus_qemu::ResumedVm::start(&qemu, &state, run, None, args.tap.as_deref(), args.start, args.gdb)?;
        vm.release_qmp();
        println!(
            "guest {} epoch {} {} in qemu pid {}; qmp {}{}",
            args.guest,
            report.epoch.0,
            run_state(args),
            vm.pid(),
            vm.run.qmp().display(),
            gdb_note(args)
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        let status = vm.wait()?;
        eprintln!("qemu exited: {status}");
    }
    Ok(())
}

/// Refuses to start a machine whose description (as a primary sent it)
/// names a kernel or initrd outside the guest images this host trusts
/// (`backup.qemu-images` in `--config`), or bad values: the same check a
/// backup makes before it resumes a guest.
fn trusted_machine(args: &RestoreArgs, state: &remus_vm::QemuState) -> Result<()> {
    let images = Config::load(args.config.as_deref())?.backup.qemu_images();
    state.machine.validate_from_peer(&images).with_context(|| format!("guest {}'s stored machine is not started", args.guest))
}

/// What a core's line says of the vCPUs' registers and the guest
/// kernel's crash-dump note.
fn core_notes((v, registers): &(Vmcoreinfo, usize)) -> String {
    let registers = if *registers > 0 { format!("; registers of {registers} vCPU(s)") } else { String::new() };
    registers
        + &match v {
            Vmcoreinfo::Absent => String::new(),
            Vmcoreinfo::Kept { release } => format!("; kernel {release}'s VMCOREINFO kept (`crash VMLINUX CORE` opens it)"),
            Vmcoreinfo::Ambiguous { notes } => {
                format!("; {notes} different VMCOREINFO notes in guest memory, none kept (`crash` needs `--kaslr` for this core)")
            }
        }
}

/// Where the gdbstub listens, for the line `--run` prints.
fn gdb_note(args: &RestoreArgs) -> String {
    args.gdb.map(|port| format!("; gdb 127.0.0.1:{port}")).unwrap_or_default()
}

/// How `--run` leaves the guest.
fn run_state(args: &RestoreArgs) -> &'static str {
    if args.start {
        "running"
    } else {
        "paused"
    }
}

/// `--mount`: serves the epoch lazily at `at` until stopped, or with
/// `--run` starts QEMU on the mounted files at once and serves until it
/// exits.
fn serve(args: &RestoreArgs, target: Target, at: &Path, t0: Instant) -> Result<()> {
    let store = Arc::new(super::open_store_read_only(args.store.as_deref(), &args.data_dir)?);
    let plan = RestorePlan::new(&*store, GuestId(args.guest), target)?;
    let device_state = store.chunk(&plan.manifest.device_state).context("reading the device state")?;
    let (state, files) = remus_restore::vm::mount_files(&device_state, plan.manifest.page_count)?;
    let run = match (args.run, &state) {
        (false, _) => None,
        (true, None) => anyhow::bail!("--run needs a QEMU guest; guest {} is not one", args.guest),
        (true, Some(_)) => {
            let to =
                args.to.as_deref().context("--mount --run needs --to DIR for QEMU's run directory (sockets, serial log, disk overlay)")?;
            Some(remus_vm::RunDir::create(to)?)
        }
    };
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    let names = names.join(", ");
    std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    let mounted = plan.mount(store, files, at)?;
    let (guest, epoch) = (args.guest, plan.manifest.epoch.0);
    let time = super::format_time(plan.manifest.time_unix_ns);
    let mut vm = match (run, state) {
        (Some(run), Some(state)) => {
            trusted_machine(args, &state)?;
            let qemu = args.qemu_binary.clone().unwrap_or_else(remus_qemu::default_qemu);
            let from = remus_vm::RunDir { dir: at.to_path_buf() };
            let mut vm = remus_qemu::ResumedVm::start(&qemu, &state, run, Some(&from), args.tap.as_deref(), args.start, args.gdb)?;
            vm.release_qmp();
            println!(
                "guest {guest} epoch {epoch} ({time}) {} in qemu pid {} after {:.2} s, its files mounted at {}; qmp {}{}",
                run_state(args),
                vm.pid(),
                t0.elapsed().as_secs_f64(),
                at.display(),
                vm.run.qmp().display(),
                gdb_note(args)
            );
            Some(vm)
        }
        _ => {
            println!(
                "guest {guest} epoch {epoch} ({time}) mounted at {} after {:.2} s: {names} (read-only, pages read from the store when first read); stop with Ctrl-C or `umount {}`",
                at.display(),
                t0.elapsed().as_secs_f64(),
                at.display()
            );
            None
        }
    };
    use std::io::Write;
    std::io::stdout().flush()?;
    // QEMU's RAM is the mount's memory file: it is stopped before the
    // mount goes (on its exit, Ctrl-C or SIGTERM).
    super::install_stop_handler();
    while !super::stop_requested() && mounted.is_mounted() && vm.as_mut().is_none_or(remus_qemu::ResumedVm::running) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if let Some(mut vm) = vm {
        if !vm.running() {
            eprintln!("qemu exited: {}", vm.wait()?);
        }
    }
    let stats = mounted.stats();
    let (pages, errors) =
        (stats.pages_read.load(std::sync::atomic::Ordering::Relaxed), stats.errors.load(std::sync::atomic::Ordering::Relaxed));
    mounted.unmount()?;
    eprintln!("unmounted {}: {pages} pages read from the store, {errors} reads refused", at.display());
    Ok(())
}

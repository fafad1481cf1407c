//! QEMU guests at the command line: the `[protect.qemu]` settings (the same
//! fields as flags and as TOML keys), and resuming a checkpoint of a QEMU
//! guest from the store (failover, `remus-restore --run`).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;

use anyhow::{Context, Result};
use remus_capture::qemu::{self, NetRelay, QemuConfig, QemuMachine, QemuState, Qmp, RunDir, Tap};
use remus_capture::TrackingMode;
use remus_restore::{MountContent, MountFile, RestorePlan, RestoreReport, Segment};
use remus_store::Store;
use remus_types::PAGE_SIZE;

/// Settings of a QEMU guest: each is a flag of `remus protect qemu` and a
/// key of `[protect.qemu]`; the flag wins.
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct QemuSettings {
    /// Guest RAM in MiB (default 128; the flag is the shared `--memory-mib`).
    #[arg(skip)]
    pub memory_mib: Option<u64>,
    /// QEMU binary (default qemu-system-x86_64).
    #[arg(long)]
    pub qemu_binary: Option<PathBuf>,
    /// Guest kernel (default: the one scripts/qemu-deps.sh fetched).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (default: the one guest/build.sh built).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default "console=ttyS0 quiet").
    #[arg(long)]
    pub append: Option<String>,
    /// Virtual CPUs (default 1).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Accelerator: tcg or kvm (default tcg).
    #[arg(long)]
    pub accel: Option<String>,
    /// NIC MAC address (default 52:54:00:12:34:56).
    #[arg(long)]
    pub mac: Option<String>,
    /// Raw disk image (default `<run-dir>/disk.img`; created if missing).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Disk size in MiB (default 64; 0 for none).
    #[arg(long)]
    pub disk_mib: Option<u64>,
    /// TAP interface for the guest's network (default: none).
    #[arg(long)]
    pub tap: Option<String>,
    /// Run directory for sockets and guest RAM (default /dev/shm/remus-guest-<id>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Dirty tracking: auto, write-protect or hash (default auto).
    #[arg(long)]
    pub tracking: Option<String>,
    /// The dirty-tracking shim library (default: next to the binary).
    #[arg(long)]
    pub shim: Option<PathBuf>,
}

impl QemuSettings {
    /// `self` with unset fields taken from `other`.
    #[must_use]
    pub fn or(self, other: &Self) -> Self {
        let o = other.clone();
        Self {
            memory_mib: self.memory_mib.or(o.memory_mib),
            qemu_binary: self.qemu_binary.or(o.qemu_binary),
            kernel: self.kernel.or(o.kernel),
            initrd: self.initrd.or(o.initrd),
            append: self.append.or(o.append),
            cpus: self.cpus.or(o.cpus),
            accel: self.accel.or(o.accel),
            mac: self.mac.or(o.mac),
            disk: self.disk.or(o.disk),
            disk_mib: self.disk_mib.or(o.disk_mib),
            tap: self.tap.or(o.tap),
            run_dir: self.run_dir.or(o.run_dir),
            tracking: self.tracking.or(o.tracking),
            shim: self.shim.or(o.shim),
        }
    }

    /// The full configuration for guest `guest` with `memory_mib` of RAM.
    ///
    /// # Errors
    /// When a value is invalid or no kernel/initrd can be found.
    pub fn resolve(&self, guest: u64) -> Result<QemuConfig> {
        let tracking = match self.tracking.as_deref().unwrap_or("auto") {
            "auto" => TrackingMode::Auto,
            "write-protect" => TrackingMode::WriteProtect,
            "hash" => TrackingMode::Hash,
            t => anyhow::bail!("qemu tracking must be auto, write-protect or hash, got {t:?}"),
        };
        let cache = guest_cache();
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => default_kernel(&cache).with_context(|| {
                format!("no guest kernel under {}: run scripts/qemu-deps.sh, or pass --kernel", cache.display())
            })?,
        };
        let machine = QemuMachine {
            memory_mib: self.memory_mib.unwrap_or(128),
            cpus: self.cpus.unwrap_or(1),
            accel: self.accel.clone().unwrap_or_else(|| "tcg".into()),
            kernel,
            initrd: self.initrd.clone().unwrap_or_else(|| cache.join("initramfs.cpio.gz")),
            append: self.append.clone().unwrap_or_else(|| "console=ttyS0 quiet".into()),
            mac: self.mac.clone().unwrap_or_else(|| "52:54:00:12:34:56".into()),
            disk_mib: self.disk_mib.unwrap_or(64),
        };
        machine.validate()?;
        Ok(QemuConfig {
            machine,
            qemu: self.qemu_binary.clone().unwrap_or_else(qemu::default_qemu),
            disk: self.disk.clone(),
            tap: self.tap.clone(),
            run_dir: self.run_dir.clone().unwrap_or_else(|| qemu::default_run_dir(&format!("guest-{guest}"))),
            tracking,
            shim: self.shim.clone(),
        })
    }
}

/// Where scripts/qemu-deps.sh and guest/build.sh keep the guest kernel
/// and initramfs.
fn guest_cache() -> PathBuf {
    std::env::var_os("REMUS_GUEST_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/remus-guest"),
        PathBuf::from,
    )
}

/// The newest `vmlinuz-*` of the extracted kernel package.
fn default_kernel(cache: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache.join("kernel/boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    found.sort();
    found.pop()
}

/// Writes the checkpoint `plan` names into `dir` as the files QEMU resumes
/// from (memory, disk image, device state) when it is a QEMU guest's;
/// `None` for other guests.
///
/// # Errors
/// Store damage, a failed write, or a memory root that does not verify.
pub fn restore_vm(store: &Store, plan: &RestorePlan, dir: &Path, progress: impl FnMut(u64)) -> Result<Option<(QemuState, RunDir, RestoreReport)>> {
    let ds = store.chunk(&plan.manifest.device_state).context("reading the device state")?;
    restore_vm_files(&ds, dir, |segments| Ok(plan.execute_segments(store, segments, progress)?))
}

/// The layout half of [`restore_vm`], for any source of pages: when
/// `device_state` is a QEMU guest's, creates the run directory `dir` and
/// has `write` fill the page space's segments (memory, disk image, device
/// state files), then sizes the device state and writes `machine.json`.
///
/// # Errors
/// A damaged device state header, or what `write` returns.
pub fn restore_vm_files(
    device_state: &[u8],
    dir: &Path,
    write: impl FnOnce(&[Segment<'_>]) -> Result<RestoreReport>,
) -> Result<Option<(QemuState, RunDir, RestoreReport)>> {
    let Some(state) = QemuState::decode(device_state)? else { return Ok(None) };
    let run = RunDir::create(dir)?;
    let segs = state.segments(&run);
    let segments: Vec<Segment<'_>> = segs.iter().map(|(first, pages, path)| Segment { first: *first, pages: *pages, path }).collect();
    let report = write(&segments)?;
    let vm = std::fs::OpenOptions::new().write(true).open(run.vmstate())?;
    vm.set_len(state.vmstate_len)?;
    std::fs::write(run.machine(), state.machine_json()?)?;
    Ok(Some((state, run, report)))
}

/// The files of an epoch served lazily (see [`RestorePlan::mount`]): for a
/// QEMU guest the same files [`restore_vm_files`] writes, with its state;
/// for any other guest its memory image as `memory`.
///
/// # Errors
/// A damaged device state header.
pub fn mount_files(device_state: &[u8], page_count: u64) -> Result<(Option<QemuState>, Vec<MountFile>)> {
    let page = PAGE_SIZE as u64;
    let Some(state) = QemuState::decode(device_state)? else {
        let memory = MountFile { name: "memory".into(), content: MountContent::Pages { first: 0, len: page_count * page } };
        return Ok((None, vec![memory]));
    };
    let names = RunDir { dir: PathBuf::new() };
    let mut files: Vec<MountFile> = state
        .segments(&names)
        .into_iter()
        .map(|(first, pages, path)| {
            let len = if path == names.vmstate() { state.vmstate_len } else { pages * page };
            MountFile { name: path.to_string_lossy().into_owned(), content: MountContent::Pages { first, len } }
        })
        .collect();
    files.push(MountFile { name: names.machine().to_string_lossy().into_owned(), content: MountContent::Bytes(state.machine_json()?) });
    Ok((Some(state), files))
}

/// A QEMU guest resumed from a checkpoint, with its network relayed
/// directly (nothing held: there is no backup behind it).
pub struct ResumedVm {
    child: Child,
    /// Its QMP session (`None` once handed over, see [`Self::release_qmp`]).
    pub qmp: Option<Qmp>,
    /// Its network relay.
    pub net: Arc<NetRelay>,
    /// Its run directory.
    pub run: RunDir,
}

impl ResumedVm {
    /// Starts QEMU on the files [`restore_vm`] wrote in `run`, or, with
    /// `from`, on read-only files there (a mounted epoch: see
    /// [`qemu::resume_read_only`]); continues the guest and announces it on
    /// the network when `start`, else leaves it paused.
    ///
    /// # Errors
    /// When the TAP, the relay or QEMU fail.
    pub fn start(
        qemu_binary: &Path,
        state: &QemuState,
        run: RunDir,
        from: Option<&RunDir>,
        tap: Option<&str>,
        start: bool,
    ) -> Result<Self> {
        let tap = tap.map(Tap::open).transpose()?;
        let net = NetRelay::start(&run.net(), tap, qemu::Egress::Direct)?;
        let (child, qmp) = match from {
            Some(from) => qemu::resume_read_only(qemu_binary, state, &run, from, start)?,
            None => qemu::resume(qemu_binary, state, &run, start)?,
        };
        Ok(Self { child, qmp: Some(qmp), net, run })
    }

    /// QEMU's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes remus's QMP session: QEMU serves one client at a time, and
    /// an operator inspecting the guest needs the socket.
    pub fn release_qmp(&mut self) {
        self.qmp = None;
    }

    /// True while QEMU runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until QEMU exits.
    ///
    /// # Errors
    /// The wait error.
    pub fn wait(&mut self) -> Result<std::process::ExitStatus> {
        Ok(self.child.wait()?)
    }
}

impl Drop for ResumedVm {
    fn drop(&mut self) {
        self.net.stop();
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.execute("quit", None);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

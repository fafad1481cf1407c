//! A real virtual machine as the protected guest: QEMU, paused each epoch
//! over QMP.
//!
//! Per epoch, with the guest running, the pages written so far are taken
//! (phase one, see the arena guest); then `stop`; remus takes the remaining
//! dirty pages, copies every dirty page from its own mapping of the shared
//! memory file and the disk blocks written through its NBD server; QEMU
//! writes its device state alone (`xen-save-devices-state`: no RAM, no
//! migration set-up); then `cont`, and the device state is read while the
//! guest runs.
//!
//! Dirty RAM is found by userfaultfd async write-protect on QEMU's guest
//! RAM mapping, armed from outside through a descriptor the preloaded shim
//! opens inside QEMU, and `PAGEMAP_SCAN` on `/proc/<qemu>/pagemap`. Where
//! that is unavailable, every page of the memory file is hashed each epoch
//! (about 100 ms per GiB: a warning says so).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remus_capture::{CaptureError, DeviceState, DirtyLog, DirtyTracker, DiskTap, MemoryView, Pause, TrackingMode};
use remus_sys::{Mapping, WriteProtectScanner};
use remus_types::{is_zero_page, Checkpoint, Pfn, PAGE_SIZE};
use remus_vm::{QemuMachine, QemuState, RunDir, VMSTATE_PAGES};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::launch::{command, spawn, Launch};
use crate::nbd::DiskServer;
use crate::net::{Egress, NetRelay, Tap};
use crate::qmp::Qmp;

/// Descriptor number the shim parks QEMU's userfaultfd on.
const SHIM_UFFD_FD: i32 = 1000;
/// Name of the shim library, looked for next to the remus binary.
pub const SHIM_NAME: &str = "libremus_uffd_shim.so";

/// Configuration of a protected QEMU guest (`[qemu]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QemuConfig {
    /// The machine.
    #[serde(flatten)]
    pub machine: QemuMachine,
    /// QEMU binary.
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    /// Raw disk image served to the guest (created, zeroed, if missing).
    pub disk: Option<PathBuf>,
    /// TAP interface for the guest's network (none: frames to the world
    /// are dropped).
    pub tap: Option<String>,
    /// Run directory: sockets and guest RAM; on tmpfs.
    pub run_dir: PathBuf,
    /// Dirty tracking.
    #[serde(default)]
    pub tracking: TrackingMode,
    /// The shim library (default: next to the remus binary).
    pub shim: Option<PathBuf>,
}

/// The default QEMU binary.
#[must_use]
pub fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

/// The shim next to the running binary (or in its parent directory, for
/// test binaries under `deps/`).
#[must_use]
pub fn find_shim() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(SHIM_NAME), dir.parent()?.join(SHIM_NAME)].into_iter().find(|p| p.is_file())
}

/// A running, protected QEMU guest.
pub struct QemuGuest {
    child: Child,
    qmp: Qmp,
    memory: Mapping,
    tracker: DirtyTracker,
    disk: Option<DiskServer>,
    net: Arc<NetRelay>,
    run: RunDir,
    state: QemuState,
    first: bool,
    /// Resumed from a checkpoint: its first continue follows an incoming
    /// migration, and it is announced on the network after it.
    resumed: bool,
    hold: bool,
    blocks: Vec<u64>,
    vmstate: Vec<u8>,
    prev_vmstate: Vec<u8>,
}

impl QemuGuest {
    /// Launches QEMU paused, attaches disk, network and dirty tracking.
    /// The guest starts running at the end of the first checkpoint, which
    /// holds all of its memory and disk.
    ///
    /// # Errors
    /// [`CaptureError::Config`] for a bad machine or missing files,
    /// [`CaptureError::Qemu`] when QEMU fails to start or answer,
    /// [`CaptureError::Tracking`] when write-protect tracking was demanded
    /// and is unavailable, [`CaptureError::Io`] for disk or network set-up.
    /// `egress` is [`Egress::Held`] for a protected guest; [`Egress::Direct`]
    /// runs it unprotected on the same plumbing (a baseline to measure
    /// against).
    pub fn start(cfg: &QemuConfig, egress: Egress) -> Result<Self, CaptureError> {
        Self::launch(cfg, egress, false)
    }

    /// Resumes, protected, a guest whose checkpoint is laid out in
    /// `cfg.run_dir` (memory, disk image and device state, as a failover or
    /// a restore writes them): QEMU starts on those files with the dirty
    /// tracking of [`start`](Self::start), loads the device state, and the
    /// guest runs on from the end of the first checkpoint, which holds all
    /// of its memory and disk again (then it is announced on the network,
    /// so switches learn its new port).
    ///
    /// # Errors
    /// As [`start`](Self::start); [`CaptureError::Qemu`] when the device
    /// state does not load.
    pub fn resume(cfg: &QemuConfig, egress: Egress) -> Result<Self, CaptureError> {
        Self::launch(cfg, egress, true)
    }

    fn launch(cfg: &QemuConfig, egress: Egress, resume: bool) -> Result<Self, CaptureError> {
        cfg.machine.validate().map_err(crate::vm_error)?;
        let run = RunDir::create(&cfg.run_dir).map_err(crate::vm_error)?;
        if !resume {
            let _ = std::fs::remove_file(run.memory());
        } else if !run.memory().is_file() || !run.vmstate().is_file() {
            return Err(CaptureError::Config(format!("{} holds no checkpoint to resume (memory, vmstate)", run.dir.display())));
        }
        let disk = if cfg.machine.disk_mib > 0 {
            let path = cfg.disk.clone().unwrap_or_else(|| run.disk());
            let f = open_disk(&path, cfg.machine.disk_mib)?;
            Some(DiskServer::start(f, &run.nbd())?)
        } else {
            None
        };
        let tap = cfg.tap.as_deref().map(Tap::open).transpose()?;
        let net = NetRelay::start(&run.net(), tap, egress)?;
        let shim = match cfg.tracking {
            TrackingMode::Hash => None,
            _ => cfg.shim.clone().or_else(find_shim),
        };
        if cfg.tracking == TrackingMode::WriteProtect && shim.is_none() {
            return Err(CaptureError::Config(format!("tracking = write-protect needs {SHIM_NAME} (set qemu.shim)")));
        }
        let (shim2, uffd_fd) = (shim.clone(), SHIM_UFFD_FD);
        let launch = if resume { Launch::ProtectedIncoming { shim: shim2, uffd_fd } } else { Launch::Protected { shim: shim2, uffd_fd } };
        let mut child = spawn(command(&cfg.qemu, &cfg.machine, &run, &launch))?;
        let mut qmp = match Qmp::connect(&run.qmp(), Duration::from_secs(20)) {
            Ok(q) => q,
            Err(e) => return Err(qemu_failed(&mut child, e)),
        };
        if resume {
            if let Err(e) = crate::resume::load_device_state(&mut qmp, &run.vmstate()) {
                return Err(qemu_failed(&mut child, e));
            }
        }
        let mut g = Self::attach(child, qmp, cfg, run, disk, net, shim.is_some())?;
        g.resumed = resume;
        Ok(g)
    }

    fn attach(
        mut child: Child,
        qmp: Qmp,
        cfg: &QemuConfig,
        run: RunDir,
        disk: Option<DiskServer>,
        net: Arc<NetRelay>,
        shimmed: bool,
    ) -> Result<Self, CaptureError> {
        let len = usize::try_from(cfg.machine.memory_mib << 20).map_err(|_| CaptureError::Config("memory too large".into()))?;
        let memory = Mapping::open_read_only(&run.memory(), len).map_err(CaptureError::Memory)?;
        let pid = child.id();
        let arm = || {
            if !shimmed {
                return Err(CaptureError::Config("write-protect tracking needs the shim".into()));
            }
            let start = find_mapping(pid, &run.memory())?;
            WriteProtectScanner::attach(pid, SHIM_UFFD_FD, start, len as u64).map_err(CaptureError::Tracking)
        };
        let tracker = match DirtyTracker::choose(cfg.tracking, &memory, arm) {
            Ok(t) => t,
            Err(e) => {
                let _ = child.kill();
                return Err(e);
            }
        };
        let state = QemuState { machine: cfg.machine.clone(), vmstate_len: 0 };
        Ok(Self {
            child,
            qmp,
            memory,
            tracker,
            disk,
            net,
            run,
            state,
            first: true,
            resumed: false,
            hold: false,
            blocks: Vec::new(),
            vmstate: Vec::new(),
            prev_vmstate: Vec::new(),
        })
    }

    /// True when dirty RAM is found by write-protect scanning.
    #[must_use]
    pub fn exact_tracking(&self) -> bool {
        self.tracker.exact()
    }

    /// The network relay (its `release` is the output sink).
    #[must_use]
    pub fn net(&self) -> Arc<NetRelay> {
        Arc::clone(&self.net)
    }

    fn alive(&mut self) -> Result<(), CaptureError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(CaptureError::Stopped(format!("QEMU exited ({status}): {}", stderr_tail(&mut self.child)))),
            Err(e) => Err(CaptureError::Qemu(e.to_string())),
        }
    }
}

impl Pause for QemuGuest {
    fn pause(&mut self) -> Result<(), CaptureError> {
        self.alive()?;
        let t0 = Instant::now();
        self.qmp.execute("stop", None)?;
        tracing::debug!(stop = ?t0.elapsed(), "paused");
        Ok(())
    }

    fn resume(&mut self) -> Result<(), CaptureError> {
        let t0 = Instant::now();
        if self.hold {
            return Ok(());
        }
        if std::mem::take(&mut self.resumed) {
            self.qmp.cont_after_migration().and_then(|()| crate::resume::announce(&mut self.qmp))?;
        } else {
            self.qmp.execute("cont", None)?;
        }
        tracing::debug!(cont = ?t0.elapsed(), "resumed");
        Ok(())
    }

    fn hold(&mut self, held: bool) {
        self.hold = held;
    }

    fn quiesce(&mut self) {
        self.hold = true;
    }
}

impl DirtyLog for QemuGuest {
    fn exact_tracking(&self) -> bool {
        Self::exact_tracking(self)
    }

    fn collect_running(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
        if self.first {
            return Ok(());
        }
        self.tracker.collect_running(pfns)
    }

    fn collect_paused(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
        let mem = self.memory.as_slice();
        if self.first {
            pfns.clear();
            pfns.extend((0..self.state.machine.ram_pages()).filter(|&p| !is_zero_page(page(mem, p))));
            // Everything is taken: the write-protect scanner's pages so far
            // are moot (collected and dropped). The hashing baseline, taken
            // at attach with QEMU paused since, needs no pass over memory
            // inside this pause.
            self.tracker.collect_running(&mut Vec::new())
        } else {
            self.tracker.collect_paused(mem, pfns)
        }
    }
}

impl MemoryView for QemuGuest {
    fn page_count(&self) -> u64 {
        self.state.machine.page_count()
    }

    fn copy_pages(&self, pfns: &[u64], out: &mut Vec<u8>) {
        let mem = self.memory.as_slice();
        out.reserve(pfns.len() * PAGE_SIZE);
        for &p in pfns {
            out.extend_from_slice(page(mem, p));
        }
    }
}

impl DiskTap for QemuGuest {
    /// The blocks written through the NBD server (all non-zero ones at
    /// the first checkpoint), as the pages after RAM.
    fn take_disk(&mut self, cp: &mut Checkpoint) -> Result<(), CaptureError> {
        let Some(d) = &self.disk else { return Ok(()) };
        let base = self.state.disk_pfn();
        self.blocks.clear();
        if self.first {
            self.blocks.extend(0..d.blocks());
        } else {
            d.take_dirty(&mut self.blocks);
        }
        let mut buf = vec![0u8; PAGE_SIZE];
        for &b in &self.blocks {
            d.read_block(b, &mut buf).map_err(|e| CaptureError::Io(format!("disk block {b}: {e}")))?;
            if self.first && is_zero_page(&buf) {
                continue;
            }
            cp.pages.extend_from_slice(&buf);
            cp.pfns.push(Pfn(base + b));
        }
        Ok(())
    }
}

impl DeviceState for QemuGuest {
    /// Device state only (no RAM, no migration set-up): the call COLO
    /// and Xen use for this. About 1.7 ms and 32 KiB for a q35 guest
    /// here, against 8–9 ms for a `migrate` (almost all of it set-up).
    fn save_device_state(&mut self) -> Result<(), CaptureError> {
        let t0 = Instant::now();
        let vm_path = self.run.vmstate();
        let _ = std::fs::remove_file(&vm_path);
        self.qmp.execute("xen-save-devices-state", Some(json!({ "filename": vm_path, "live": false })))?;
        tracing::debug!(device_state = ?t0.elapsed(), "device state");
        Ok(())
    }

    /// Takes the device state QEMU wrote during the pause; runs after the
    /// guest resumed (the file is complete and nothing writes it). Only
    /// the pages of the stream that changed (or were cut off) go into the
    /// checkpoint, after the disk's.
    fn take_device_state(&mut self, cp: &mut Checkpoint) -> Result<(), CaptureError> {
        let vm_path = self.run.vmstate();
        self.vmstate.clear();
        std::fs::File::open(&vm_path)
            .and_then(|mut f| f.read_to_end(&mut self.vmstate))
            .map_err(|e| CaptureError::Io(format!("{}: {e}", vm_path.display())))?;
        let cap = VMSTATE_PAGES as usize * PAGE_SIZE;
        if self.vmstate.len() > cap {
            return Err(CaptureError::Qemu(format!("device state of {} bytes exceeds the {cap} reserved", self.vmstate.len())));
        }
        let base = self.state.vmstate_pfn();
        let pages = self.vmstate.len().max(self.prev_vmstate.len()).div_ceil(PAGE_SIZE);
        let mut buf = [0u8; PAGE_SIZE];
        for i in 0..pages {
            let now = padded(&self.vmstate, i, &mut buf);
            let changed = self.first || {
                let mut old = [0u8; PAGE_SIZE];
                padded(&self.prev_vmstate, i, &mut old) != now
            };
            if changed {
                cp.pages.extend_from_slice(now);
                cp.pfns.push(Pfn(base + i as u64));
            }
        }
        std::mem::swap(&mut self.vmstate, &mut self.prev_vmstate);
        self.state.vmstate_len = self.prev_vmstate.len() as u64;
        cp.device_state = self.state.encode();
        self.first = false;
        Ok(())
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        self.net.stop();
        let _ = self.qmp.execute("quit", None);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens (creating, zero-filled, if missing) a raw disk image of `mib` MiB.
///
/// # Errors
/// [`CaptureError::Io`]; [`CaptureError::Config`] when an existing image
/// has another size.
pub fn open_disk(path: &Path, mib: u64) -> Result<std::fs::File, CaptureError> {
    let io = |e: std::io::Error| CaptureError::Io(format!("disk image {}: {e}", path.display()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let want = mib << 20;
    if len == 0 {
        f.set_len(want).map_err(io)?;
    } else if len != want {
        return Err(CaptureError::Config(format!("disk image {} is {len} bytes, disk-mib says {want}", path.display())));
    }
    Ok(f)
}

/// Start address of the mapping of `file` in process `pid`.
fn find_mapping(pid: u32, file: &Path) -> Result<u64, CaptureError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| CaptureError::Qemu(format!("/proc/{pid}/maps: {e}")))?;
    let want = file.to_string_lossy();
    for line in maps.lines() {
        if line.ends_with(&*want) {
            let range = line.split_whitespace().next().unwrap_or_default();
            let start = range.split('-').next().unwrap_or_default();
            return u64::from_str_radix(start, 16).map_err(|e| CaptureError::Qemu(format!("bad maps line {line:?}: {e}")));
        }
    }
    Err(CaptureError::Qemu(format!("QEMU (pid {pid}) has no mapping of {want}")))
}

/// The last lines QEMU wrote to stderr, for an error message.
pub(crate) fn stderr_tail(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// QEMU failed to come up: kill it and say why.
pub(crate) fn qemu_failed(child: &mut Child, e: CaptureError) -> CaptureError {
    let _ = child.kill();
    let _ = child.wait();
    CaptureError::Qemu(format!("{e}; QEMU said: {}", stderr_tail(child)))
}

fn page(mem: &[u8], pfn: u64) -> &[u8] {
    let off = pfn as usize * PAGE_SIZE;
    &mem[off..off + PAGE_SIZE]
}

fn padded<'a>(stream: &'a [u8], i: usize, buf: &'a mut [u8; PAGE_SIZE]) -> &'a [u8] {
    let off = i * PAGE_SIZE;
    if off + PAGE_SIZE <= stream.len() {
        return &stream[off..off + PAGE_SIZE];
    }
    buf.fill(0);
    if off < stream.len() {
        buf[..stream.len() - off].copy_from_slice(&stream[off..]);
    }
    &buf[..]
}

/// The default run directory named `tag` (on tmpfs, since it holds guest
/// RAM).
#[must_use]
pub fn default_run_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/remus-{tag}"))
}

//! The QEMU machine remus runs: its command line, in one place, for the
//! protected primary and for a guest resumed from a checkpoint (failover,
//! `remus-restore --run`); and the self-describing state header that every
//! checkpoint of a QEMU guest carries as its device state.
//!
//! State layout: one page space per guest, so the whole pipeline (dedup,
//! XOR deltas, the store's page index, restore and its memory root) applies
//! to all of it unchanged:
//! ```text
//! pfn 0 .. ram_pages                      guest RAM
//! ram_pages .. +disk_blocks               the disk, 4 KiB blocks
//! .. +VMSTATE_PAGES                       QEMU's device state (its device
//!                                         stream, RAM excluded), zero-padded
//! ```
//! The checkpoint's `device_state` is [`QemuState`]: the machine, the
//! layout and the length of the device-state stream.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use remus_types::PAGE_SIZE;
use serde::{Deserialize, Serialize};

use crate::CaptureError;

/// Pages reserved for QEMU's device state (4 MiB; a q35 guest with a
/// virtio disk and NIC writes about 32 KiB).
pub const VMSTATE_PAGES: u64 = 1024;
const STATE_MAGIC: &[u8; 4] = b"RMQD";

/// What a QEMU guest is: enough to start an identical machine elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QemuMachine {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Accelerator: `tcg` (anywhere) or `kvm`.
    pub accel: String,
    /// Kernel for direct boot.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub append: String,
    /// The NIC's MAC address.
    pub mac: String,
    /// Disk size in MiB (0: no disk).
    pub disk_mib: u64,
}

impl QemuMachine {
    /// RAM in pages.
    #[must_use]
    pub fn ram_pages(&self) -> u64 {
        self.memory_mib * 256
    }

    /// Disk in 4 KiB blocks.
    #[must_use]
    pub fn disk_blocks(&self) -> u64 {
        self.disk_mib * 256
    }

    /// Size of the guest's page space (RAM, disk, device state).
    #[must_use]
    pub fn page_count(&self) -> u64 {
        self.ram_pages() + self.disk_blocks() + VMSTATE_PAGES
    }

    /// Checks sizes and names.
    ///
    /// # Errors
    /// [`CaptureError::Config`] naming the bad field.
    pub fn validate(&self) -> Result<(), CaptureError> {
        let bad = |m: String| Err(CaptureError::Config(m));
        if !(16..=1 << 20).contains(&self.memory_mib) {
            return bad(format!("memory-mib must be in 16..=1048576, got {}", self.memory_mib));
        }
        if !(1..=64).contains(&self.cpus) {
            return bad(format!("cpus must be in 1..=64, got {}", self.cpus));
        }
        if !matches!(self.accel.as_str(), "tcg" | "kvm") {
            return bad(format!("accel must be tcg or kvm, got {:?}", self.accel));
        }
        if self.disk_mib > 1 << 20 {
            return bad(format!("disk-mib must be at most 1048576, got {}", self.disk_mib));
        }
        let mac_ok = self.mac.split(':').count() == 6
            && self.mac.split(':').all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
        if !mac_ok {
            return bad(format!("mac {:?} is not six hex bytes like 52:54:00:12:34:56", self.mac));
        }
        for (what, p) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if !p.is_file() {
                return bad(format!("{what} {} does not exist (guest/build.sh builds one)", p.display()));
            }
        }
        Ok(())
    }
}

/// Files and sockets of one running QEMU.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// The directory (on tmpfs: guest RAM lives in `memory`).
    pub dir: PathBuf,
}

impl RunDir {
    /// Uses `dir`, creating it.
    ///
    /// # Errors
    /// [`CaptureError::Io`] when it cannot be created.
    pub fn create(dir: &Path) -> Result<Self, CaptureError> {
        std::fs::create_dir_all(dir).map_err(|e| CaptureError::Io(format!("{}: {e}", dir.display())))?;
        Ok(Self { dir: dir.to_path_buf() })
    }
    /// Guest RAM (the memory-backend file).
    #[must_use]
    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }
    /// The raw disk image.
    #[must_use]
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
    /// QEMU's device state (`xen-save-devices-state`: devices, no RAM).
    #[must_use]
    pub fn vmstate(&self) -> PathBuf {
        self.dir.join("vmstate")
    }
    /// The QMP socket.
    #[must_use]
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The machine's description (`machine.json`, [`QemuState::machine_json`]).
    #[must_use]
    pub fn machine(&self) -> PathBuf {
        self.dir.join("machine.json")
    }
    /// The copy-on-write overlay over a read-only disk image (lazy resume).
    #[must_use]
    pub fn overlay(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// The netdev stream socket remus listens on.
    #[must_use]
    pub fn net(&self) -> PathBuf {
        self.dir.join("net.sock")
    }
    /// The NBD socket remus serves the disk on.
    #[must_use]
    pub fn nbd(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    /// The serial console log.
    #[must_use]
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
}

/// How QEMU is started.
#[derive(Debug, Clone)]
pub enum Launch {
    /// Protected primary: paused at start (`-S`), disk over NBD from remus,
    /// the dirty-tracking shim preloaded.
    Protected {
        /// The shim library, if write-protect tracking is wanted.
        shim: Option<PathBuf>,
        /// Descriptor number the shim parks its userfaultfd on.
        uffd_fd: i32,
    },
    /// Resumed from a checkpoint in the run dir (`-incoming defer`), disk
    /// from the image file, paused until told to continue.
    Incoming,
    /// Resumed from read-only checkpoint files in `from` (an epoch served
    /// lazily): RAM mapped privately from `from`'s memory file (the
    /// guest's writes stay in QEMU), the disk behind the qcow2 overlay
    /// [`RunDir::overlay`] on `from`'s image, paused until told to continue.
    IncomingReadOnly {
        /// The memory, disk and device-state files, named as in a run
        /// directory.
        from: RunDir,
    },
}

impl Launch {
    /// Where the checkpoint's memory and device-state files are: `from`
    /// for a read-only resume, else `run`.
    #[must_use]
    pub(crate) fn checkpoint<'a>(&'a self, run: &'a RunDir) -> &'a RunDir {
        match self {
            Self::IncomingReadOnly { from } => from,
            _ => run,
        }
    }
}

/// The QEMU command for `machine` in `run`.
#[must_use]
pub fn command(qemu: &Path, machine: &QemuMachine, run: &RunDir, launch: &Launch) -> Command {
    let mut c = Command::new(qemu);
    // A read-only checkpoint is mapped privately: the guest's writes stay in QEMU.
    let sharing = if matches!(launch, Launch::IncomingReadOnly { .. }) { "share=off,readonly=on,rom=off" } else { "share=on" };
    let mem = format!(
        "memory-backend-file,id=mem,size={}M,mem-path={},{sharing}",
        machine.memory_mib,
        launch.checkpoint(run).memory().display()
    );
    c.args(["-name", "remus-guest", "-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-accel", &machine.accel])
        // No self-description in the device-state stream (nothing reads it,
        // and the loader would expect one).
        .args(["-machine", "q35,memory-backend=mem,suppress-vmdesc=on"])
        .args(["-m", &format!("{}M", machine.memory_mib)])
        .args(["-smp", &machine.cpus.to_string()])
        .args(["-object", &mem])
        .arg("-kernel")
        .arg(&machine.kernel)
        .arg("-initrd")
        .arg(&machine.initrd)
        .args(["-append", &machine.append])
        .args(["-chardev", &format!("file,id=serial0,path={},append=on", run.serial().display())])
        .args(["-serial", "chardev:serial0"])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", run.qmp().display())])
        .args(["-netdev", &format!("stream,id=net0,server=off,addr.type=unix,addr.path={}", run.net().display())])
        .args(["-device", &format!("virtio-net-pci,netdev=net0,mac={},romfile=", machine.mac)]);
    if machine.disk_mib > 0 {
        let blockdev = match launch {
            Launch::Protected { .. } => {
                format!("driver=nbd,node-name=disk0,server.type=unix,server.path={},export=disk", run.nbd().display())
            }
            Launch::Incoming => format!("driver=raw,node-name=disk0,file.driver=file,file.filename={}", run.disk().display()),
            Launch::IncomingReadOnly { .. } => {
                format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={}", run.overlay().display())
            }
        };
        c.args(["-blockdev", &blockdev]).args(["-device", "virtio-blk-pci,drive=disk0"]);
    }
    match launch {
        Launch::Protected { shim, uffd_fd } => {
            c.arg("-S");
            if let Some(shim) = shim {
                c.env("LD_PRELOAD", shim).env("REMUS_UFFD_FD", uffd_fd.to_string());
            }
        }
        Launch::Incoming | Launch::IncomingReadOnly { .. } => {
            // The device state is `xen-save-devices-state`'s, which has
            // no configuration section for the loader to expect.
            c.args(["-S", "-incoming", "defer", "-global", "migration.send-configuration=off"]);
        }
    }
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Starts QEMU; its stderr is kept for error messages. QEMU is killed
/// when the thread that started it ends (`PR_SET_PDEATHSIG`), so a guest
/// never outlives the remus that protects or runs it: when a primary is
/// killed, its QEMU dies with it, as a failed host's would.
///
/// # Errors
/// [`CaptureError::Qemu`] when the binary cannot be run.
pub fn spawn(mut cmd: Command) -> Result<Child, CaptureError> {
    use std::os::unix::process::CommandExt;
    let prog = cmd.get_program().to_string_lossy().into_owned();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes one async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| CaptureError::Qemu(format!("starting {prog}: {e} (scripts/qemu-deps.sh installs QEMU)")))
}

/// The device state of a QEMU checkpoint: how to read the page space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QemuState {
    /// The machine.
    pub machine: QemuMachine,
    /// Length of QEMU's device-state stream at the end of the page space.
    pub vmstate_len: u64,
}

impl QemuState {
    /// The machine described for people and tools (`machine.json` beside
    /// restored files).
    ///
    /// # Errors
    /// A serialization failure (none for a well-formed machine).
    pub fn machine_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(&self.machine)
    }

    /// Encodes as the checkpoint's device state.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = STATE_MAGIC.to_vec();
        out.extend(serde_json::to_vec(self).expect("plain data serialises"));
        out
    }

    /// Decodes a checkpoint's device state; `None` when it is not a QEMU
    /// guest's.
    ///
    /// # Errors
    /// [`CaptureError::Config`] for a QEMU header that does not parse.
    pub fn decode(bytes: &[u8]) -> Result<Option<Self>, CaptureError> {
        let Some(json) = bytes.strip_prefix(STATE_MAGIC) else { return Ok(None) };
        serde_json::from_slice(json).map(Some).map_err(|e| CaptureError::Config(format!("QEMU state header: {e}")))
    }

    /// First page of the disk.
    #[must_use]
    pub fn disk_pfn(&self) -> u64 {
        self.machine.ram_pages()
    }

    /// First page of the device-state stream.
    #[must_use]
    pub fn vmstate_pfn(&self) -> u64 {
        self.machine.ram_pages() + self.machine.disk_blocks()
    }

    /// The three files a checkpoint splits into: `(first pfn, pages, path)`
    /// for RAM, disk and device state (whose file is cut to
    /// `vmstate_len` after writing).
    #[must_use]
    pub fn segments(&self, run: &RunDir) -> Vec<(u64, u64, PathBuf)> {
        let mut s = vec![(0, self.machine.ram_pages(), run.memory())];
        if self.machine.disk_blocks() > 0 {
            s.push((self.disk_pfn(), self.machine.disk_blocks(), run.disk()));
        }
        s.push((self.vmstate_pfn(), self.vmstate_len.div_ceil(PAGE_SIZE as u64), run.vmstate()));
        s
    }
}

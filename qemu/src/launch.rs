//! The QEMU command line, in one place, for the protected primary and for
//! a guest resumed from a checkpoint (failover, `remus-restore --run`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use remus_capture::CaptureError;
use remus_vm::{QemuMachine, RunDir};

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
    /// Resumed from a checkpoint in the run dir under protection: as
    /// [`Launch::Protected`] (disk over NBD, the shim), loading the
    /// checkpoint's device state (`-incoming defer`) over its memory file.
    ProtectedIncoming {
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
    pub fn checkpoint<'a>(&'a self, run: &'a RunDir) -> &'a RunDir {
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
    let mem =
        format!("memory-backend-file,id=mem,size={}M,mem-path={},{sharing}", machine.memory_mib, launch.checkpoint(run).memory().display());
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
            Launch::Protected { .. } | Launch::ProtectedIncoming { .. } => {
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
        Launch::Protected { .. } => {
            c.arg("-S");
        }
        Launch::ProtectedIncoming { .. } | Launch::Incoming | Launch::IncomingReadOnly { .. } => {
            // The device state is `xen-save-devices-state`'s, which has
            // no configuration section for the loader to expect.
            c.args(["-S", "-incoming", "defer", "-global", "migration.send-configuration=off"]);
        }
    }
    if let Launch::Protected { shim: Some(shim), uffd_fd } | Launch::ProtectedIncoming { shim: Some(shim), uffd_fd } = launch {
        c.env("LD_PRELOAD", shim).env("REMUS_UFFD_FD", uffd_fd.to_string());
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
    let prog = cmd.get_program().to_string_lossy().into_owned();
    remus_sys::die_with_parent(&mut cmd);
    cmd.spawn().map_err(|e| CaptureError::Qemu(format!("starting {prog}: {e} (scripts/qemu-deps.sh installs QEMU)")))
}

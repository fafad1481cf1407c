//! Resuming a QEMU guest from a checkpoint laid out as files (failover,
//! `remus-restore --run`, `--mount --run`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use remus_capture::CaptureError;
use remus_vm::{QemuState, RunDir};
use serde_json::json;

use crate::guest::qemu_failed;
use crate::launch::{command, spawn, Launch};
use crate::net::{Egress, NetRelay, Tap};
use crate::qmp::Qmp;

/// Resumes a guest from a checkpoint laid out in `run` (memory, disk and
/// device-state files as [`QemuState::segments`] names them): starts QEMU
/// paused on those files (`-incoming defer`), loads the device state and,
/// when `start` is set,
/// continues it and announces its MAC on the network (so switches learn
/// its new port, as Remus's unsolicited ARP did). Returns QEMU and its QMP
/// session; the guest is paused when `start` is false.
///
/// # Errors
/// [`CaptureError::Qemu`] when QEMU fails to start or load the state.
pub fn resume(qemu: &Path, state: &QemuState, run: &RunDir, start: bool) -> Result<(Child, Qmp), CaptureError> {
    resume_launch(qemu, state, run, &Launch::Incoming, start, None)
}

/// As [`resume`], from read-only checkpoint files in `from` (an epoch
/// served lazily, see `remus-restore --mount`): QEMU maps the memory file
/// privately and writes the disk to a new qcow2 overlay in `run`, so
/// nothing of `from` is written, and pages are read only when touched.
///
/// # Errors
/// As [`resume`]; [`CaptureError::Qemu`] when the overlay cannot be made
/// (`qemu-img`, beside `qemu` or on the PATH).
pub fn resume_read_only(
    qemu: &Path,
    state: &QemuState,
    run: &RunDir,
    from: &RunDir,
    start: bool,
    gdb: Option<u16>,
) -> Result<(Child, Qmp), CaptureError> {
    if state.machine.disk_mib > 0 {
        let img = qemu.with_file_name("qemu-img");
        let img = if img.is_file() { img } else { PathBuf::from("qemu-img") };
        let out = Command::new(&img)
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            // qemu-img resolves a relative backing file from the overlay's directory.
            .arg(std::path::absolute(from.disk()).map_err(|e| CaptureError::Io(format!("{}: {e}", from.disk().display())))?)
            .arg(run.overlay())
            .output()
            .map_err(|e| CaptureError::Qemu(format!("{}: {e}", img.display())))?;
        if !out.status.success() {
            return Err(CaptureError::Qemu(format!("creating the disk overlay: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
    }
    resume_launch(qemu, state, run, &Launch::IncomingReadOnly { from: from.clone() }, start, gdb)
}

/// `gdb`: a port on 127.0.0.1 where QEMU's gdbstub listens.
fn resume_launch(
    qemu: &Path,
    state: &QemuState,
    run: &RunDir,
    launch: &Launch,
    start: bool,
    gdb: Option<u16>,
) -> Result<(Child, Qmp), CaptureError> {
    let vmstate = launch.checkpoint(run).vmstate();
    let mut cmd = command(qemu, &state.machine, run, launch);
    if let Some(port) = gdb {
        cmd.args(["-gdb", &format!("tcp:127.0.0.1:{port}")]);
    }
    let mut child = spawn(cmd)?;
    let mut qmp = match Qmp::connect(&run.qmp(), Duration::from_secs(20)) {
        Ok(q) => q,
        Err(e) => return Err(qemu_failed(&mut child, e)),
    };
    let loaded = (|| {
        load_device_state(&mut qmp, &vmstate)?;
        if start {
            qmp.cont_after_migration()?;
            announce(&mut qmp)?;
        }
        Ok::<_, CaptureError>(())
    })();
    match loaded {
        Ok(()) => Ok((child, qmp)),
        Err(e) => Err(qemu_failed(&mut child, e)),
    }
}

/// Loads a checkpoint's device state into a QEMU started with `-incoming
/// defer` on the checkpoint's memory file.
pub(crate) fn load_device_state(qmp: &mut Qmp, vmstate: &Path) -> Result<(), CaptureError> {
    // A stream of devices only loads as an incoming migration with shared
    // RAM: the RAM is already in the memory file.
    qmp.set_capabilities(&[("x-ignore-shared", true)])?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": format!("file:{}", vmstate.display()) })))?;
    qmp.wait_migration(Duration::from_secs(30))
}

/// Announces a resumed guest's MAC on the network (so switches learn its
/// new port, as Remus's unsolicited ARP did).
pub(crate) fn announce(qmp: &mut Qmp) -> Result<(), CaptureError> {
    qmp.execute("announce-self", Some(json!({ "initial": 0, "max": 50, "rounds": 3, "step": 50 }))).map(drop)
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
    /// [`resume_read_only`]); continues the guest and announces it on
    /// the network when `start`, else leaves it paused. With `gdb`, QEMU's
    /// gdbstub listens on that port of 127.0.0.1.
    ///
    /// # Errors
    /// [`CaptureError`] when the TAP, the relay or QEMU fail.
    pub fn start(
        qemu_binary: &Path,
        state: &QemuState,
        run: RunDir,
        from: Option<&RunDir>,
        tap: Option<&str>,
        start: bool,
        gdb: Option<u16>,
    ) -> Result<Self, CaptureError> {
        let tap = tap.map(Tap::open).transpose()?;
        let net = NetRelay::start(&run.net(), tap, Egress::Direct)?;
        let (child, qmp) = match from {
            Some(from) => resume_read_only(qemu_binary, state, &run, from, start, gdb)?,
            None => resume_launch(qemu_binary, state, &run, &Launch::Incoming, start, gdb)?,
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
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
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

//! The page space of a virtual machine: how a QEMU guest's RAM, disk and
//! device state are laid out as one array of pages, the self-describing
//! state header every checkpoint of such a guest carries, and the names of
//! the files a checkpoint is written to. Store, restore and the backup
//! read history through this alone: none of them needs the capture code.
//!
//! Layout: one page space per guest, so the whole pipeline (dedup, XOR
//! deltas, the store's page index, restore and its memory root) applies
//! to all of it unchanged:
//! ```text
//! pfn 0 .. ram_pages                      guest RAM
//! ram_pages .. +disk_blocks               the disk, 4 KiB blocks
//! .. +VMSTATE_PAGES                       QEMU's device state (its device
//!                                         stream, RAM excluded), zero-padded
//! ```
//! The checkpoint's `device_state` is [`QemuState`]: the machine, the
//! layout and the length of the device-state stream, behind the common
//! header of `remus_types::format` (magic `RMQD`, version, crc32):
//! ```text
//! "RMQD" | version u8 = 2 | 0 0 0 | crc32 u32 LE | JSON of QemuState
//! ```
//! Version 1 (written before the header had a version) is `RMQD` followed
//! directly by the JSON; it is still read.

use std::path::{Path, PathBuf};

pub mod cpu;

use remus_types::format::{self, FormatError};
use remus_types::PAGE_SIZE;
use serde::{Deserialize, Serialize};

/// Why a machine or a state header is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// A machine setting is out of range or names a missing file.
    #[error("invalid machine: {0}")]
    Invalid(String),
    /// The state header is damaged.
    #[error("vm state header: {0}")]
    Format(FormatError),
    /// A run directory could not be created.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
}

/// Pages reserved for QEMU's device state (4 MiB; a q35 guest with a
/// virtio disk and NIC writes about 32 KiB).
pub const VMSTATE_PAGES: u64 = 1024;
const STATE_MAGIC: &[u8; 4] = b"RMQD";
/// The state header version written.
const STATE_VERSION: u8 = 2;

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

// The message names the cause: a field, not a `source()`, so a chained
// print says it once.
impl From<FormatError> for VmError {
    fn from(e: FormatError) -> Self {
        Self::Format(e)
    }
}

/// The machine `remus protect qemu` starts unless told otherwise: 128 MiB,
/// one vCPU under TCG, a serial console, a 64 MiB disk; no kernel or
/// initrd (those are always found or given).
impl Default for QemuMachine {
    fn default() -> Self {
        Self {
            memory_mib: 128,
            cpus: 1,
            accel: "tcg".into(),
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            append: "console=ttyS0 quiet".into(),
            mac: "52:54:00:12:34:56".into(),
            disk_mib: 64,
        }
    }
}

impl QemuMachine {
    /// RAM in pages.
    #[must_use]
    pub fn ram_pages(&self) -> u64 {
        self.memory_mib * 256
    }

    /// Guest RAM as QEMU's q35 machine maps it: `(first page of the page
    /// space, pages, guest-physical address)`. All of it from 0 when it is
    /// below 2816 MiB; else 2 GiB from 0 and the rest from 4 GiB (QEMU's
    /// `pc_q35_init`; the RAM file holds the ranges back to back).
    #[must_use]
    pub fn ram_ranges(&self) -> Vec<(u64, u64, u64)> {
        const PAGE: u64 = PAGE_SIZE as u64;
        let ram = self.memory_mib << 20;
        let below = if ram >= 0xb000_0000 { 0x8000_0000 } else { ram };
        let mut ranges = vec![(0, below / PAGE, 0)];
        if ram > below {
            ranges.push((below / PAGE, (ram - below) / PAGE, 1 << 32));
        }
        ranges
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
    /// [`VmError::Invalid`] naming the bad field.
    pub fn validate(&self) -> Result<(), VmError> {
        let bad = |m: String| Err(VmError::Invalid(m));
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
        let mac_ok = self.mac.split(':').count() == 6 && self.mac.split(':').all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
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

    /// Checks a machine that came from a peer (a primary's checkpoint)
    /// before it becomes a QEMU command line here: [`validate`](Self::validate),
    /// a kernel command line of at most 1024 printable characters, and the
    /// kernel and initrd, their links resolved, inside one of the `images`
    /// directories this host trusts.
    ///
    /// # Errors
    /// [`VmError::Invalid`] naming the bad field.
    pub fn validate_from_peer(&self, images: &[PathBuf]) -> Result<(), VmError> {
        self.validate()?;
        if self.append.len() > 1024 || self.append.chars().any(|c| c.is_control()) {
            return Err(VmError::Invalid(format!("append must be at most 1024 printable characters, got {} bytes", self.append.len())));
        }
        let roots: Vec<PathBuf> = images.iter().filter_map(|d| d.canonicalize().ok()).collect();
        for (what, p) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            let real = p.canonicalize().map_err(|e| VmError::Invalid(format!("{what} {}: {e}", p.display())))?;
            if !roots.iter().any(|r| real.starts_with(r)) {
                return Err(VmError::Invalid(format!(
                    "{what} {} is outside the guest images this host trusts ({})",
                    real.display(),
                    images.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                )));
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
    /// [`VmError::Io`] when it cannot be created.
    pub fn create(dir: &Path) -> Result<Self, VmError> {
        std::fs::create_dir_all(dir).map_err(|cause| VmError::Io { path: dir.to_path_buf(), cause })?;
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
    #[must_use]
    pub fn machine_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.machine).expect("plain data serialises")
    }

    /// Makes a checkpoint's files in `run` exactly what QEMU loads: the
    /// device-state file cut to the stream's length, and `machine.json`
    /// written beside them.
    ///
    /// # Errors
    /// The I/O error.
    pub fn finish_files(&self, run: &RunDir) -> std::io::Result<()> {
        std::fs::OpenOptions::new().write(true).open(run.vmstate())?.set_len(self.vmstate_len)?;
        std::fs::write(run.machine(), self.machine_json())
    }

    /// Encodes as the checkpoint's device state.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        format::seal(STATE_MAGIC, STATE_VERSION, &serde_json::to_vec(self).expect("plain data serialises"))
    }

    /// Decodes a checkpoint's device state; `None` when it is not a QEMU
    /// guest's (it does not start with the magic).
    ///
    /// # Errors
    /// [`VmError::Format`]: an unsupported version, a checksum mismatch, a
    /// truncated header or a body that does not parse.
    pub fn decode(bytes: &[u8]) -> Result<Option<Self>, VmError> {
        if format::check_magic(STATE_MAGIC, bytes).is_err() {
            return Ok(None);
        }
        // Version 1: the JSON right after the magic.
        let json = if bytes.get(4) == Some(&b'{') { &bytes[4..] } else { format::open("vm state", STATE_MAGIC, STATE_VERSION, bytes)?.1 };
        let state = serde_json::from_slice(json).map_err(|e| FormatError::Malformed(e.to_string()))?;
        Ok(Some(state))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> QemuState {
        let machine = QemuMachine {
            memory_mib: 16,
            kernel: "k".into(),
            initrd: "i".into(),
            append: String::new(),
            disk_mib: 1,
            ..QemuMachine::default()
        };
        QemuState { machine, vmstate_len: 5000 }
    }

    #[test]
    fn a_peers_machine_is_run_only_from_trusted_images_and_with_a_sane_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let (images, elsewhere) = (dir.path().join("images"), dir.path().join("elsewhere"));
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        for p in [images.join("k"), images.join("i"), elsewhere.join("k")] {
            std::fs::write(p, b"x").unwrap();
        }
        let good = QemuMachine { kernel: images.join("k"), initrd: images.join("i"), ..state().machine };
        good.validate_from_peer(std::slice::from_ref(&images)).unwrap();
        let outside = QemuMachine { kernel: elsewhere.join("k"), ..good.clone() };
        let err = outside.validate_from_peer(std::slice::from_ref(&images)).unwrap_err().to_string();
        assert!(err.contains("outside the guest images"), "{err}");
        // A path that climbs out of the trusted directory is resolved first.
        let climbing = QemuMachine { kernel: images.join("../elsewhere/k"), ..good.clone() };
        assert!(climbing.validate_from_peer(std::slice::from_ref(&images)).is_err());
        let append = QemuMachine { append: "console=ttyS0\n-device evil".into(), ..good.clone() };
        assert!(append.validate_from_peer(std::slice::from_ref(&images)).unwrap_err().to_string().contains("append"));
        let accel = QemuMachine { accel: "xen,evil=1".into(), ..good.clone() };
        assert!(accel.validate_from_peer(std::slice::from_ref(&images)).unwrap_err().to_string().contains("accel"));
        // Every other field, each refused by name.
        let trusted = std::slice::from_ref(&images);
        for (bad, field) in [
            (QemuMachine { memory_mib: 0, ..good.clone() }, "memory-mib"),
            (QemuMachine { memory_mib: u64::MAX, ..good.clone() }, "memory-mib"),
            (QemuMachine { cpus: 0, ..good.clone() }, "cpus"),
            (QemuMachine { cpus: 4096, ..good.clone() }, "cpus"),
            (QemuMachine { disk_mib: u64::MAX, ..good.clone() }, "disk-mib"),
            (QemuMachine { mac: "52:54:00:12:34:56,script=/bin/evil".into(), ..good.clone() }, "mac"),
            (QemuMachine { mac: "zz:54:00:12:34:56".into(), ..good.clone() }, "mac"),
            (QemuMachine { append: "a".repeat(1025), ..good.clone() }, "append"),
            (QemuMachine { kernel: images.join("absent"), ..good.clone() }, "kernel"),
            (QemuMachine { initrd: elsewhere.join("k"), ..good.clone() }, "initrd"),
        ] {
            let err = bad.validate_from_peer(trusted).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn state_header_round_trips_and_names_each_damage() {
        let s = state();
        let bytes = s.encode();
        assert_eq!(QemuState::decode(&bytes).unwrap(), Some(s.clone()));
        assert_eq!(QemuState::decode(b"arena device state").unwrap(), None, "not a QEMU guest's");
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0x20;
        assert!(matches!(QemuState::decode(&flipped), Err(VmError::Format(FormatError::ChecksumMismatch { .. }))));
        let mut newer = bytes.clone();
        newer[4] = 9;
        assert!(matches!(QemuState::decode(&newer), Err(VmError::Format(FormatError::UnsupportedVersion { found: 9, .. }))));
        assert!(matches!(QemuState::decode(&bytes[..8]), Err(VmError::Format(FormatError::Truncated { .. }))));
    }

    #[test]
    fn version_one_headers_are_still_read() {
        let s = state();
        let mut v1 = STATE_MAGIC.to_vec();
        v1.extend(serde_json::to_vec(&s).unwrap());
        assert_eq!(QemuState::decode(&v1).unwrap(), Some(s));
        v1.truncate(v1.len() - 1);
        assert!(matches!(QemuState::decode(&v1), Err(VmError::Format(FormatError::Malformed(_)))));
    }

    #[test]
    fn segments_cover_ram_disk_and_device_state() {
        let s = state();
        let run = RunDir { dir: PathBuf::from("/r") };
        let segs = s.segments(&run);
        assert_eq!(segs[0], (0, 4096, run.memory()));
        assert_eq!(segs[1], (4096, 256, run.disk()));
        assert_eq!(segs[2], (4352, 2, run.vmstate()));
        assert_eq!(s.machine.page_count(), 4096 + 256 + VMSTATE_PAGES);
    }
}

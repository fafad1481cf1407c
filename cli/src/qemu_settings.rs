//! The `[protect.qemu]` settings of a QEMU guest: the same fields as flags
//! of `remus protect qemu` and as TOML keys, resolved to a
//! [`QemuConfig`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use remus_capture::TrackingMode;
use remus_qemu::{self as qemu, QemuConfig, QemuMachine};

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
            None => default_kernel(&cache)
                .with_context(|| format!("no guest kernel under {}: run scripts/qemu-deps.sh, or pass --kernel", cache.display()))?,
        };
        let d = QemuMachine::default();
        let machine = QemuMachine {
            memory_mib: self.memory_mib.unwrap_or(d.memory_mib),
            cpus: self.cpus.unwrap_or(d.cpus),
            accel: self.accel.clone().unwrap_or(d.accel),
            kernel,
            initrd: self.initrd.clone().unwrap_or_else(|| cache.join("initramfs.cpio.gz")),
            append: self.append.clone().unwrap_or(d.append),
            mac: self.mac.clone().unwrap_or(d.mac),
            disk_mib: self.disk_mib.unwrap_or(d.disk_mib),
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
pub fn guest_cache() -> PathBuf {
    std::env::var_os("REMUS_GUEST_CACHE")
        .map_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/remus-guest"), PathBuf::from)
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

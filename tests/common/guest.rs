//! The QEMU test guest (built by guest/build.sh) and its test network: a
//! bridge on 10.0.2.1/24 (the guest is 10.0.2.15) and three persistent TAPs
//! on it, `tap-p` for the primary, `tap-b` and `tap-c` for backups, made inside a
//! network namespace the test or benchmark created.

use std::path::PathBuf;
use std::process::Command;

/// The guest's kernel and initramfs, built (or found built) by
/// guest/build.sh, which also installs QEMU and fetches the kernel when
/// missing.
pub fn guest_image() -> (PathBuf, PathBuf) {
    let out = Command::new("bash").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../guest/build.sh")).output().expect("guest/build.sh");
    assert!(
        out.status.success(),
        "guest/build.sh failed (run scripts/test.sh, which installs QEMU and the guest): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("paths");
    let mut lines = text.lines().rev();
    let kernel = PathBuf::from(lines.next().expect("kernel path"));
    let initrd = PathBuf::from(lines.next().expect("initramfs path"));
    (kernel, initrd)
}

/// The guest kernel's vmlinux with its debug symbols (for `crash`),
/// fetched by scripts/qemu-deps.sh when missing.
#[allow(dead_code)] // the benches share this file and do not use it
pub fn vmlinux() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/qemu-deps.sh");
    let out = Command::new("bash")
        .args(["-c", &format!("source {script} >/dev/null && printf %s \"$REMUS_GUEST_VMLINUX\"")])
        .output()
        .expect("scripts/qemu-deps.sh");
    assert!(out.status.success(), "scripts/qemu-deps.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("a path"))
}

/// The network, as `ip` commands in order.
pub const BRIDGE_AND_TAPS: &[&str] = &[
    "ip link set lo up",
    "ip link add br0 type bridge",
    "ip addr add 10.0.2.1/24 dev br0",
    "ip link set br0 up",
    "ip tuntap add dev tap-p mode tap",
    "ip tuntap add dev tap-b mode tap",
    "ip tuntap add dev tap-c mode tap",
    "ip link set tap-p master br0",
    "ip link set tap-b master br0",
    "ip link set tap-c master br0",
    "ip link set tap-p up",
    "ip link set tap-b up",
    "ip link set tap-c up",
];

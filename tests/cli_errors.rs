//! Bad input and bad configuration get clear errors, not panics.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn stderr_of(cmd: &mut Command) -> (i32, String) {
    let out = run_limited(cmd, Duration::from_secs(30));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn missing_tls_material_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = stderr_of(Command::new(remus()).args(["protect", "--seconds", "1", "--data-dir"]).arg(dir.path()));
    assert_eq!(code, 2);
    assert!(err.contains("TLS material missing") && err.contains("ca.pem") && err.contains("remus keygen"), "{err}");
    let (code, err) = stderr_of(Command::new(remus()).args(["backup", "--data-dir"]).arg(dir.path()));
    assert_eq!(code, 2);
    assert!(err.contains("TLS material missing") && err.contains("backup.key"), "{err}");
}

#[test]
fn bad_config_is_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("remus.toml");
    std::fs::write(&cfg, "[protect]\nepoch-millis = 3\n").unwrap();
    let (code, err) = stderr_of(Command::new(remus()).arg("--config").arg(&cfg).args(["log"]));
    assert_eq!(code, 2);
    assert!(err.contains("epoch-millis"), "{err}");
    std::fs::write(&cfg, "[protect]\nepoch-ms = 0\n").unwrap();
    let (code, err) = stderr_of(Command::new(remus()).arg("--config").arg(&cfg).args(["log"]));
    assert_eq!(code, 2);
    assert!(err.contains("epoch-ms"), "{err}");
}

#[test]
fn restore_without_a_store_or_epoch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) =
        stderr_of(Command::new(remus_restore()).arg("--data-dir").arg(dir.path()).args(["--epoch", "3", "--to"]).arg(dir.path().join("x")));
    assert_eq!(code, 2);
    assert!(err.contains("no store at"), "{err}");
    let (code, err) = stderr_of(Command::new(remus_restore()).args(["--to", "x"]));
    assert_ne!(code, 0);
    assert!(err.contains("--epoch") || err.contains("required"), "{err}");
}

#[test]
fn keygen_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ok = run_limited(Command::new(remus()).args(["keygen", "--data-dir"]).arg(dir.path()), Duration::from_secs(30));
    assert!(ok.status.success());
    let (code, err) = stderr_of(Command::new(remus()).args(["keygen", "--data-dir"]).arg(dir.path()));
    assert_eq!(code, 2);
    assert!(err.contains("--force"), "{err}");
}

#[test]
fn bad_qemu_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let protect_qemu = |extra: &[&str]| {
        let mut c = Command::new(remus());
        c.args(["protect", "qemu", "--seconds", "1", "--data-dir"]).arg(dir.path()).args(extra);
        stderr_of(&mut c)
    };
    let (code, err) = protect_qemu(&["--kernel", "/nonexistent/vmlinuz", "--initrd", "/nonexistent/initrd"]);
    assert_eq!(code, 2);
    assert!(err.contains("kernel /nonexistent/vmlinuz does not exist"), "{err}");
    let (code, err) = protect_qemu(&["--kernel", "/dev/null", "--mac", "52:54:00:zz:00:01"]);
    assert_eq!(code, 2);
    assert!(err.contains("mac"), "{err}");
    let (code, err) = protect_qemu(&["--tracking", "sometimes"]);
    assert_eq!(code, 2);
    assert!(err.contains("tracking"), "{err}");
    let (code, err) = protect_qemu(&["--pages-per-sec", "5"]);
    assert_eq!(code, 2);
    assert!(err.contains("arena guest only"), "{err}");
}

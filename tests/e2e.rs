//! End to end, as separate processes: `remus backup` and `remus protect`
//! over real QUIC with mutual TLS on loopback, a real RocksDB store; the
//! backup is SIGKILLed mid-run and restarted on the same store while the
//! primary keeps going; then `remus-restore` writes random committed epochs
//! and each image must hash to the memory root the primary recorded.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rand::seq::SliceRandom;
use remus_types::MemoryDigest;

#[test]
fn separate_processes_replicate_survive_a_backup_restart_and_restore_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);

    let backup = BackupProcess::start(data, "127.0.0.1:0");
    let addr = backup.addr.clone();
    let roots = data.join("roots.jsonl");
    let output_log = data.join("released.log");
    let primary = protect(data, &addr)
        .args(["--memory-mib", "64", "--seconds", "6", "--json", "--record-roots"])
        .arg(&roots)
        .arg("--output-log")
        .arg(&output_log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();

    // Let some epochs commit, then kill the backup without warning.
    let before_kill = backup.wait_committed(1, 20, Duration::from_secs(60));
    backup.kill();
    // Same store, same address: the primary reconnects and resumes.
    let backup = BackupProcess::start(data, &addr);
    let after_restart = backup.wait_committed(1, before_kill + 20, Duration::from_secs(60));
    assert!(after_restart > before_kill);

    let out = primary.wait_with_output().unwrap();
    assert!(out.status.success(), "protect failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("protect --json prints one object");
    let committed = summary["epochs_committed"].as_u64().unwrap();
    assert_eq!(committed, summary["epochs"].as_u64().unwrap(), "every sealed epoch acknowledged at the end");
    assert!(committed > after_restart);
    // Protected once the first epoch (the whole memory) was committed:
    // within the run, before the backup was killed.
    let protected = summary["protected_ms"].as_f64().expect("protected");
    assert!(protected > 0.0 && protected < summary["seconds"].as_f64().unwrap() * 1e3, "{summary}");
    // Output commit: every released line belongs to an acknowledged epoch,
    // and all output was released once everything was acknowledged.
    let released = std::fs::read_to_string(&output_log).unwrap();
    assert_eq!(released.lines().count() as u64, summary["output_lines_released"].as_u64().unwrap());
    assert!(released.starts_with("tick 1:"));
    backup.stop();

    // The log lists every committed epoch, hash-chained.
    let out = run_limited(Command::new(remus()).args(["log", "--json", "--data-dir"]).arg(data), Duration::from_secs(30));
    assert!(out.status.success());
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(entries.len() as u64, committed);
    for w in entries.windows(2) {
        assert_eq!(w[1]["parent"], w[0]["manifest"], "manifest chain");
    }
    // A new guest: its first copy's epochs (sealed before the first was
    // acknowledged) had their output released at their seals, and say so
    // in the history; every later epoch's was held for its ack.
    let ahead = entries.iter().take_while(|e| e["released_ahead"] == true).count() as u64;
    assert!(ahead >= 1 && ahead < committed, "{ahead} of {committed} released ahead");
    assert_eq!(ahead, summary["released_ahead_epochs"].as_u64().unwrap(), "{summary}");
    assert!(entries[ahead as usize..].iter().all(|e| e["released_ahead"] == false), "only the first copy's epochs");

    // The store verifies clean after a SIGKILLed backup.
    let out = run_limited(Command::new(remus()).args(["verify", "--json", "--data-dir"]).arg(data), Duration::from_secs(60));
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["manifests"].as_u64().unwrap(), committed);
    assert_eq!(report["damage"].as_array().unwrap().len(), 0);

    // Restore random epochs: some from before the kill, some after.
    let roots = read_roots(&roots);
    let mut rng = rand::thread_rng();
    let mut picks: Vec<u64> = (1..=before_kill).collect::<Vec<_>>().choose_multiple(&mut rng, 2).copied().collect();
    picks.extend((before_kill + 1..=committed).collect::<Vec<_>>().choose_multiple(&mut rng, 2).copied());
    for e in picks {
        let img = data.join(format!("epoch-{e}.img"));
        let out = run_limited(
            Command::new(remus_restore()).arg("--data-dir").arg(data).args(["--epoch", &e.to_string(), "--json", "--to"]).arg(&img),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "restore {e}: {}", String::from_utf8_lossy(&out.stderr));
        let image = std::fs::read(&img).unwrap();
        assert_eq!(image.len(), 64 << 20);
        assert_eq!(MemoryDigest::of_image(&image).to_hex(), roots[&e], "epoch {e} is not byte-exact");
        std::fs::remove_file(&img).unwrap();
    }

    // Restore by time: the newest epoch at or before a committed epoch's time.
    let mid = &entries[entries.len() / 2];
    let at = format!("{:.9}", mid["time_unix_ns"].as_u64().unwrap() as f64 / 1e9 + 0.000_000_5);
    let img = data.join("at.img");
    let out = run_limited(
        Command::new(remus_restore()).arg("--data-dir").arg(data).args(["--at", &at, "--json", "--to"]).arg(&img),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "restore --at: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["epoch"], mid["epoch"]);

    // Served lazily: the mounted memory is the epoch's, byte-exact, and
    // SIGTERM unmounts it.
    let e = committed;
    let mnt = dir.path().join("mnt");
    let mut served = Command::new(remus_restore())
        .arg("--data-dir")
        .arg(data)
        .args(["--epoch", &e.to_string(), "--mount"])
        .arg(&mnt)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(served.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with(&format!("guest 1 epoch {e} (")) && line.contains("mounted at"), "{line}");
    let image = std::fs::read(mnt.join("memory")).unwrap();
    assert_eq!(MemoryDigest::of_image(&image).to_hex(), roots[&e], "mounted epoch {e} is not byte-exact");
    remus_sys::signal(served.id(), libc::SIGTERM).expect("signalling our own child");
    let out = served.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("unmounted") && err.contains("pages read from the store, 0 reads refused"), "{err}");
    assert!(!mnt.join("memory").exists(), "unmounted");
    // A process guest has nothing for QEMU to run.
    let out = run_limited(
        Command::new(remus_restore()).arg("--data-dir").arg(data).args(["--latest", "--run", "--to", "x", "--mount"]).arg(&mnt),
        Duration::from_secs(30),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--run needs a QEMU guest"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The primary dies (SIGKILL); the backup notices the silence, fences it,
/// and hands back the last committed epoch as a memory image that is
/// byte-exact the primary's memory at that epoch.
#[test]
fn a_killed_primary_fails_over_to_its_last_committed_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let failover = data.join("failover");
    // Tests run in parallel on a small machine: allow 2 s of silence so
    // that only the kill below, not a scheduling stall, causes failover.
    let config = data.join("remus.toml");
    std::fs::write(&config, "[backup]\nprimary-timeout-ms = 2000\n").unwrap();
    let backup = BackupProcess::start_with(
        data,
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap(), "--failover-dir", failover.to_str().unwrap()],
    );
    let roots = data.join("roots.jsonl");
    let mut primary = protect(data, &backup.addr)
        .args(["--memory-mib", "64", "--seconds", "120", "--record-roots"])
        .arg(&roots)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    backup.wait_committed(1, 30, Duration::from_secs(60));
    primary.kill().unwrap();
    primary.wait().unwrap();

    let line = backup.wait_line("failover guest-1 epoch ", Duration::from_secs(30));
    let mut words = line.split_whitespace().skip(3);
    let epoch: u64 = words.next().unwrap().parse().unwrap();
    let image = std::path::PathBuf::from(words.nth(1).unwrap());
    assert!(epoch >= 30);
    let roots = read_roots(&roots);
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(MemoryDigest::of_image(&bytes).to_hex(), roots[&epoch], "failover image of epoch {epoch} is not byte-exact");

    // The old primary is fenced: a new run of guest 1 is refused.
    let out = run_limited(protect(data, &backup.addr).args(["--memory-mib", "64", "--seconds", "5"]), Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("failed over to this backup at epoch {epoch} at ")), "{err}");
    backup.stop();

    // The fence is in the store: a restarted backup still refuses it.
    let backup = BackupProcess::start_with(data, "127.0.0.1:0", &["--config", config.to_str().unwrap()]);
    let out = run_limited(protect(data, &backup.addr).args(["--memory-mib", "64", "--seconds", "5"]), Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("failed over to this backup at epoch {epoch} at ")), "after a restart: {err}");
    backup.stop();
}

/// The backup's disk fills up mid-run: commits fail without a trace of a
/// half-written epoch, nothing unacknowledged is released, and everything
/// committed before stays verifiable and restorable byte-exact.
/// Needs root (it mounts a small tmpfs for the store), as the suite runs in CI.
#[test]
fn a_full_disk_at_the_backup_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let small = data.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(&small).status().unwrap();
    assert!(mounted.success(), "this test mounts a 16 MiB tmpfs and needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let store = small.join("store");

    let backup = BackupProcess::start_with(data, "127.0.0.1:0", &["--store", store.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    let output_log = data.join("released.log");
    // A fixed period, so that each epoch holds one 25 ms output line (the
    // count below): with adaptive epochs a backup that stopped committing
    // lengthens them.
    let config = data.join("fixed.toml");
    std::fs::write(&config, "[protect]\nmax-epoch-ms = 25\n").unwrap();
    let primary = protect(data, &backup.addr)
        .args(["--config", config.to_str().unwrap()])
        .args(["--memory-mib", "64", "--seconds", "6", "--drain-seconds", "2", "--json", "--record-roots"])
        .arg(&roots)
        .arg("--output-log")
        .arg(&output_log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let committed_early = backup.wait_committed(1, 5, Duration::from_secs(60));
    let out = primary.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "the primary must report unacknowledged epochs: {err}");
    assert!(err.contains("did not acknowledge") && err.contains("never released"), "{err}");
    backup.stop();

    // Nothing half-written: the store verifies clean and its head is the
    // last epoch the backup reported committed.
    let out = run_limited(
        Command::new(remus()).args(["verify", "--json", "--store"]).arg(&store).arg("--data-dir").arg(data),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed = report["manifests"].as_u64().unwrap();
    assert!(committed >= committed_early);
    // Output commit: no more output released than epochs acknowledged
    // (one line per 25 ms tick, at most one tick per epoch plus the first).
    let released = std::fs::read_to_string(&output_log).unwrap().lines().count() as u64;
    let sealed = read_roots(&roots).len() as u64;
    assert!(sealed > committed + 10, "the disk never filled: {sealed} sealed, {committed} committed");
    assert!(released <= committed + 2, "{released} lines released for {committed} committed epochs");

    let roots = read_roots(&roots);
    for e in [1, committed / 2, committed] {
        assert_store_restores(&store, e, &data.join(format!("full-{e}.img")), &roots[&e], Duration::from_secs(60));
    }
}

/// A guest over its store quota (`[backup] guest-store-mib`): the backup
/// refuses its commits saying why, on both sides; its output stays held;
/// what was committed before stays whole and restores byte-exact.
#[test]
fn a_guest_over_its_store_quota_is_refused_by_name_and_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let config = data.join("remus.toml");
    std::fs::write(&config, "[backup]\nguest-store-mib = 2\n").unwrap();
    let backup = BackupProcess::start_logged(data, "127.0.0.1:0", &["--config", config.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    let output_log = data.join("released.log");
    let out = run_limited(
        protect(data, &backup.addr)
            .args(["--memory-mib", "64", "--seconds", "4", "--drain-seconds", "2", "--json", "--record-roots"])
            .arg(&roots)
            .arg("--output-log")
            .arg(&output_log),
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "the primary must report unacknowledged epochs: {err}");
    assert!(err.contains("guest-1 is over its store quota at this backup") && err.contains("guest-store-mib"), "{err}");
    let line = backup.wait_stderr("over its store quota", Duration::from_secs(30));
    assert!(line.contains("guest-1") && line.contains("of 2.0 MiB"), "{line}");
    let store = data.join("store");
    backup.stop();

    let out = run_limited(
        Command::new(remus()).args(["verify", "--json", "--store"]).arg(&store).arg("--data-dir").arg(data),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
    let committed = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["manifests"].as_u64().unwrap();
    let roots = read_roots(&roots);
    assert!(committed >= 1 && (roots.len() as u64) > committed + 10, "{} sealed, {committed} committed", roots.len());
    let released = std::fs::read_to_string(&output_log).unwrap().lines().count() as u64;
    assert!(released <= committed + 2, "{released} lines released for {committed} committed epochs");
    assert_store_restores(&store, committed, &data.join("quota.img"), &roots[&committed], Duration::from_secs(60));
}

/// One backup protects two primaries at once (N-to-1); each guest's
/// history is kept apart and restores byte-exact.
#[test]
fn one_backup_protects_two_primaries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let backup = BackupProcess::start(data, "127.0.0.1:0");
    let spawn = |guest: &str, roots: &std::path::Path| {
        protect(data, &backup.addr)
            .args(["--guest", guest, "--memory-mib", "32", "--seconds", "3", "--json", "--record-roots"])
            .arg(roots)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (r1, r2) = (data.join("roots1.jsonl"), data.join("roots2.jsonl"));
    let (p1, p2) = (spawn("1", &r1), spawn("2", &r2));
    let committed: Vec<u64> = [p1, p2]
        .into_iter()
        .map(|p| {
            let out = p.wait_with_output().unwrap();
            assert!(out.status.success());
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["epochs_committed"].as_u64().unwrap()
        })
        .collect();
    backup.stop();
    for (guest, (roots, last)) in [(1u64, (&r1, committed[0])), (2, (&r2, committed[1]))] {
        assert!(last > 20, "guest {guest} committed only {last}");
        let roots = read_roots(roots);
        let e = last / 2;
        let img = data.join(format!("g{guest}.img"));
        let out = run_limited(
            Command::new(remus_restore())
                .arg("--data-dir")
                .arg(data)
                .args(["--guest", &guest.to_string(), "--epoch", &e.to_string(), "--to"])
                .arg(&img),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "restore guest {guest}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&e], "guest {guest} epoch {e}");
    }
    // The two guests ran the same workload seed but from different runs:
    // their logs are separate chains.
    let out = run_limited(Command::new(remus()).args(["log", "--json", "--data-dir"]).arg(data), Duration::from_secs(30));
    let guests: std::collections::BTreeSet<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["guest"].as_u64().unwrap())
        .collect();
    assert_eq!(guests, [1, 2].into_iter().collect());
}

/// A primary holding only its own certificate (`remus cert issue`) and the
/// CA's is protected; where the backup does not let the shared
/// certificate speak for guests, a primary presenting it is refused by
/// name; a revoked guest is refused once the backup loads the list.
#[test]
fn per_guest_certificates_from_remus_cert() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let primary_dir = data.join("primary-2");
    let ca = data.join("tls");
    let out = run_limited(
        Command::new(remus())
            .args(["cert", "issue", "--guest", "2", "--days", "30", "--ca"])
            .arg(&ca)
            .arg("--out")
            .arg(primary_dir.join("tls")),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "cert issue: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::copy(ca.join("ca.pem"), primary_dir.join("tls/ca.pem")).unwrap();
    let config = data.join("strict.toml");
    std::fs::write(&config, "[backup]\nshared-primary-cert = false\n").unwrap();
    let run = |backup: &BackupProcess, from: &std::path::Path| {
        run_limited(
            protect(from, &backup.addr).args(["--guest", "2", "--memory-mib", "16", "--seconds", "2", "--json"]),
            Duration::from_secs(60),
        )
    };

    let backup = BackupProcess::start_logged(data, "127.0.0.1:0", &["--config", config.to_str().unwrap()]);
    let own = run(&backup, &primary_dir);
    assert!(own.status.success(), "own certificate: {}", String::from_utf8_lossy(&own.stderr));
    let v: serde_json::Value = serde_json::from_slice(&own.stdout).unwrap();
    assert!(v["epochs_committed"].as_u64().unwrap() > 10, "{v}");
    let shared = run(&backup, data);
    let err = String::from_utf8_lossy(&shared.stderr);
    assert!(!shared.status.success() && err.contains("shared primary certificate"), "{err}");
    // The backup logs the refusal with its reason.
    let line = backup.wait_stderr("primary connection ended", Duration::from_secs(10));
    assert!(line.contains("shared primary certificate may not speak for guest-2"), "{line}");
    // Guest 2's pair put where guest 3's belongs: refused for guest 3.
    let other_dir = data.join("primary-3");
    std::fs::create_dir_all(other_dir.join("tls")).unwrap();
    std::fs::copy(ca.join("ca.pem"), other_dir.join("tls/ca.pem")).unwrap();
    for ext in ["pem", "key"] {
        std::fs::copy(primary_dir.join(format!("tls/guest-2.{ext}")), other_dir.join(format!("tls/guest-3.{ext}"))).unwrap();
    }
    let out = run_limited(
        protect(&other_dir, &backup.addr).args(["--guest", "3", "--memory-mib", "16", "--seconds", "2", "--json"]),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not issued for guest-3"), "{err}");
    let line = backup.wait_stderr("primary connection ended", Duration::from_secs(10));
    assert!(line.contains("this client certificate is not issued for guest-3"), "{line}");
    backup.stop();

    // Revoked while the backup runs (its TLS directory is the CA's here):
    // it reloads the list and refuses the certificate from then on.
    let backup = BackupProcess::start_logged(data, "127.0.0.1:0", &["--config", config.to_str().unwrap()]);
    let out = run_limited(Command::new(remus()).args(["cert", "revoke", "--guest", "2", "--ca"]).arg(&ca), Duration::from_secs(30));
    assert!(out.status.success(), "cert revoke: {}", String::from_utf8_lossy(&out.stderr));
    let out = run_limited(Command::new(remus()).args(["cert", "list", "--ca"]).arg(&ca), Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked"), "{}", String::from_utf8_lossy(&out.stdout));
    backup.wait_stderr("revocation list reloaded", Duration::from_secs(20));
    let revoked = run(&backup, &primary_dir);
    let err = String::from_utf8_lossy(&revoked.stderr);
    assert!(!revoked.status.success() && err.contains("certificate"), "a revoked certificate: {err}");
    let line = backup.wait_stderr("refused connection", Duration::from_secs(10));
    assert!(line.contains("Revoked"), "{line}");
    backup.stop();
}

/// GC in a live backup removes chunks the primary remembers sending: the
/// workload's `recycle` writes return pages to content they held before,
/// and retention keeps only the last 200 ms, so most of that content is
/// deleted between two of its uses. The primary must keep committing
/// (epoch numbers keep rising across several GC runs), every sealed epoch
/// is acknowledged at the end, and the last one restores byte-exact.
#[test]
fn gc_in_a_live_backup_does_not_stall_a_primary_whose_pages_return_to_old_content() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let config = data.join("remus.toml");
    std::fs::write(
        &config,
        "[protect.arena.workload]\n\
         mix = { zero = 5, text = 10, random = 5, duplicate = 10, edit = 20, recycle = 50 }\n\
         [retention]\n\
         interval = \"200ms\"\n\
         keep = [{ within = \"200ms\", every = \"0s\" }]\n",
    )
    .unwrap();
    let backup = BackupProcess::start_logged(data, "127.0.0.1:0", &["--verbose", "--config", config.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    let primary = protect(data, &backup.addr)
        .args(["--memory-mib", "32", "--seconds", "8", "--drain-seconds", "20", "--json", "--config"])
        .arg(&config)
        .arg("--record-roots")
        .arg(&roots)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut committed = backup.wait_committed(1, 20, Duration::from_secs(60));
    // Three GC runs that deleted chunks, each followed by 20 more epochs
    // (half a second of them): a stalled primary fails here.
    let mut collections = 0;
    while collections < 3 {
        let line = backup.wait_stderr("retention applied", Duration::from_secs(60));
        let deleted: u64 = line
            .split("chunks_deleted: ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no chunk count in {line:?}"));
        if deleted > 0 {
            collections += 1;
            committed = backup.wait_committed(1, committed + 20, Duration::from_secs(30));
        }
    }
    let out = primary.wait_with_output().unwrap();
    assert!(out.status.success(), "protect failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("protect --json prints one object");
    let last = summary["epochs_committed"].as_u64().unwrap();
    assert_eq!(last, summary["epochs"].as_u64().unwrap(), "every sealed epoch acknowledged at the end");
    assert!(last > committed);
    // The primary did have to drop chunks it had sent: the test exercised
    // what it is about.
    assert!(summary["chunks_forgotten"].as_u64().unwrap() > 0, "{summary}");
    backup.stop();

    let img = data.join("last.img");
    let out = run_limited(
        Command::new(remus_restore()).arg("--data-dir").arg(data).args(["--epoch", &last.to_string(), "--to"]).arg(&img),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "restore {last}: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), read_roots(&roots)[&last], "epoch {last}");
    let out = run_limited(Command::new(remus()).args(["verify", "--json", "--data-dir"]).arg(data), Duration::from_secs(60));
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
}

/// `remus diff` names exactly the pages that differ between two epochs,
/// checked against full restores of both; `remus show` agrees with the
/// log; a missing epoch is a clear error.
#[test]
fn diff_names_exactly_the_pages_two_restored_epochs_differ_in() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let backup = BackupProcess::start(data, "127.0.0.1:0");
    let out = run_limited(
        protect(data, &backup.addr).args(["--memory-mib", "16", "--pages-per-sec", "3000", "--seconds", "2", "--json"]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    backup.stop();
    let (a, b) = (5u64, 40u64);
    let image = |e: u64| {
        let img = data.join(format!("e{e}.img"));
        let out = run_limited(
            Command::new(remus_restore()).arg("--data-dir").arg(data).args(["--epoch", &e.to_string(), "--to"]).arg(&img),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "restore {e}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(&img).unwrap()
    };
    let (ia, ib) = (image(a), image(b));
    let out = run_limited(
        Command::new(remus()).args(["diff", &a.to_string(), &b.to_string(), "--json", "--data-dir"]).arg(data),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pages = d["pages"].as_array().unwrap();
    let named: Vec<u64> = pages.iter().map(|p| p["pfn"].as_u64().unwrap()).collect();
    let differ: Vec<u64> = (0..ia.len() / 4096).filter(|&p| ia[p * 4096..][..4096] != ib[p * 4096..][..4096]).map(|p| p as u64).collect();
    assert!(!differ.is_empty(), "the workload changed pages between epochs {a} and {b}");
    assert_eq!(named, differ, "diff names exactly the pages whose bytes differ");
    // Each page's ranges cover exactly its differing bytes.
    for p in pages {
        let at = p["pfn"].as_u64().unwrap() as usize * 4096;
        let mut in_ranges = vec![false; 4096];
        for r in p["ranges"].as_array().unwrap() {
            let (s, e) = (r[0].as_u64().unwrap() as usize, r[1].as_u64().unwrap() as usize);
            in_ranges[s..e].iter_mut().for_each(|x| *x = true);
        }
        for (k, inside) in in_ranges.iter().enumerate() {
            assert_eq!(*inside, ia[at + k] != ib[at + k], "page {} byte {k}", at / 4096);
        }
    }
    assert_eq!(d["regions"][0]["pages"].as_u64(), Some(differ.len() as u64));
    // `show` agrees with the log's chain.
    let show = |e: u64| {
        let out =
            run_limited(Command::new(remus()).args(["show", &e.to_string(), "--json", "--data-dir"]).arg(data), Duration::from_secs(30));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (sa, sa1) = (show(a), show(a + 1));
    assert_eq!(sa1["parent"], sa["manifest"]);
    assert_eq!(sa["epoch"].as_u64(), Some(a));
    assert!(sa["dirty_pages"].as_u64().unwrap() >= sa["zero_pages"].as_u64().unwrap());
    let out = run_limited(Command::new(remus()).args(["show", "99999", "--data-dir"]).arg(data), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no committed epoch 99999"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `remus bisect` finds the epoch at which the workload wrote a marker at
/// a known address, reading about log2(n) + 2 epochs; the epochs on
/// either side show it absent and present, in raw images and in ELF cores
/// that gdb and readelf open.
#[test]
fn bisect_finds_the_epoch_the_workload_wrote_its_marker() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let config = data.join("remus.toml");
    std::fs::write(&config, "[protect.arena.workload.marker]\nafter-ms = 1000\naddress = 0x3010\nvalue = \"remus-marker-7\"\n").unwrap();
    let backup = BackupProcess::start(data, "127.0.0.1:0");
    let out = run_limited(
        protect(data, &backup.addr).arg("--config").arg(&config).args([
            "--memory-mib",
            "16",
            "--pages-per-sec",
            "3000",
            "--seconds",
            "2",
            "--json",
        ]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["epochs_committed"].as_u64().unwrap();
    backup.stop();
    // The end of the history, read from the end.
    let out = run_limited(Command::new(remus()).args(["log", "--last", "3", "--json", "--data-dir"]).arg(data), Duration::from_secs(30));
    let tail: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(tail, [last - 2, last - 1, last]);
    let out = run_limited(Command::new(remus()).args(["log", "--last", "3", "--data-dir"]).arg(data), Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("guest-1: the last 3 committed epochs, up to epoch {last}")));
    let out = run_limited(
        Command::new(remus())
            .args([
                "bisect",
                "--from",
                "1",
                "--to",
                &last.to_string(),
                "--at",
                "0x3010",
                "--equals",
                "remus-marker-7",
                "--json",
                "--data-dir",
            ])
            .arg(data),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = b["first"].as_u64().expect("found");
    let read = b["epochs_read"].as_u64().unwrap();
    let bound = (last as f64).log2().ceil() as u64 + 2;
    assert!(read <= bound, "{read} epochs read for {last} epochs (log2 n + 2 = {bound})");
    // Written about a second in: neither at the start nor at the end.
    assert!(first > 10 && first < last - 10, "epoch {first} of {last}");
    // The marker is absent the epoch before and present from this one on.
    let bytes_at = |e: u64| {
        let img = data.join(format!("b{e}.img"));
        let out = run_limited(
            Command::new(remus_restore()).arg("--data-dir").arg(data).args(["--epoch", &e.to_string(), "--to"]).arg(&img),
            Duration::from_secs(60),
        );
        assert!(out.status.success());
        std::fs::read(&img).unwrap()[0x3010..0x3010 + 14].to_vec()
    };
    assert_ne!(bytes_at(first - 1), b"remus-marker-7");
    assert_eq!(bytes_at(first), b"remus-marker-7");
    assert_eq!(bytes_at(last), b"remus-marker-7", "the workload never writes its marker page");
    // The same epochs as ELF cores: gdb reads the marker at its address in
    // the first, and not in the one before.
    let gdb_at = |e: u64| {
        let core = data.join(format!("core{e}"));
        let out = run_limited(
            Command::new(remus_restore())
                .arg("--data-dir")
                .arg(data)
                .args(["--epoch", &e.to_string(), "--format", "elf-core", "--json", "--to"])
                .arg(&core),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((report["format"].as_str(), report["verified"].as_bool()), (Some("elf-core"), Some(true)));
        let out = run_limited(
            Command::new("gdb").args(["-nx", "-batch", "-ex"]).arg(format!("core-file {}", core.display())).args(["-ex", "x/s 0x3010"]),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "gdb: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(gdb_at(first).contains("0x3010:\t\"remus-marker-7\""), "{}", gdb_at(first));
    assert!(!gdb_at(first - 1).contains("remus-marker-7"));
    let segments = run_limited(Command::new("readelf").arg("-lW").arg(data.join(format!("core{first}"))), Duration::from_secs(30));
    let listing = String::from_utf8_lossy(&segments.stdout);
    assert!(listing.contains("Elf file type is CORE"), "{listing}");
    assert_eq!(listing.lines().filter(|l| l.trim_start().starts_with("LOAD")).count(), 1, "{listing}");
    assert!(listing.contains("0x1000000 0x1000000"), "one 16 MiB range: {listing}");
    // Never true before: exit 1 and says so.
    let out = run_limited(
        Command::new(remus())
            .args(["bisect", "--from", "1", "--to", &(first - 1).to_string(), "--at", "0x3010", "--equals", "remus-marker-7", "--data-dir"])
            .arg(data),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not hold at epoch"));
}

/// `remus move` of a process guest: the primary seals its last epoch with
/// the guest still and hands it over; the backup writes that very epoch
/// out at once (no silence waited for), byte-exact, and the primary ends
/// well. With no primary running, `remus move` says so.
#[test]
fn remus_move_hands_a_process_guest_over_at_its_last_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let failover = data.join("failover");
    let backup = BackupProcess::start_with(data, "127.0.0.1:0", &["--failover-dir", failover.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    let mut primary = protect(data, &backup.addr)
        .args(["--memory-mib", "32", "--seconds", "120", "--json", "--record-roots"])
        .arg(&roots)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    backup.wait_committed(1, 20, Duration::from_secs(60));
    let out = run_limited(Command::new(remus()).args(["move", "--data-dir"]).arg(data), Duration::from_secs(60));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{said} {}", String::from_utf8_lossy(&out.stderr));
    let epoch: u64 =
        said.strip_prefix("moved guest-1 at epoch ").and_then(|r| r.split(':').next()).and_then(|e| e.parse().ok()).expect(&said);
    let line = backup.wait_line("failover guest-1 epoch ", Duration::from_secs(30));
    assert!(line.starts_with(&format!("failover guest-1 epoch {epoch} image ")), "taken over at the epoch handed over: {line}");
    let status = primary.wait().unwrap();
    assert!(status.success(), "the primary that moved its guest ends well");
    let mut summary = String::new();
    std::io::Read::read_to_string(primary.stdout.as_mut().unwrap(), &mut summary).unwrap();
    let s: serde_json::Value = serde_json::from_str(summary.trim()).expect("summary");
    assert_eq!(s["epochs_committed"].as_u64(), Some(epoch), "every epoch acknowledged, the last one handed over");
    let image = line.rsplit(' ').next().unwrap();
    assert_eq!(MemoryDigest::of_image(&std::fs::read(image).unwrap()).to_hex(), read_roots(&roots)[&epoch], "byte-exact");
    let out = run_limited(Command::new(remus()).args(["move", "--data-dir"]).arg(data), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no remus protect of guest 1 runs"), "{}", String::from_utf8_lossy(&out.stderr));
    backup.stop();
}

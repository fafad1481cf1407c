//! The S3 tier end to end, as separate processes against a real S3
//! server (`moto_server`, started by `scripts/test.sh`, its URL in
//! `REMUS_TEST_S3_ENDPOINT`): the backup uploads while S3 is away and
//! drains the backlog once it returns; then the backup site is lost (its
//! RocksDB deleted) and `remus-restore --from s3://…` restores byte-exact
//! from S3 alone; `remus verify --s3` names a flipped byte in a pack.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use remus_store::s3::{format, S3Client, S3Config};
use remus_types::MemoryDigest;

fn endpoint() -> String {
    std::env::var("REMUS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("REMUS_TEST_S3_ENDPOINT is not set: run `bash scripts/test.sh`, which starts moto_server, or start one and export its URL")
    })
}

fn bucket(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn client(bucket: &str, prefix: &str) -> S3Client {
    let mut c = S3Config::new(bucket, prefix);
    c.endpoint = Some(endpoint());
    c.region = Some("us-east-1".into());
    c.access_key_id = Some("test".into());
    c.secret_access_key = Some("test".into());
    S3Client::new(&c).unwrap()
}

fn write_config(path: &Path, endpoint: &str, bucket: &str, prefix: &str) {
    std::fs::write(
        path,
        format!(
            "[protect]\nbackup-timeout-ms = 3000\n\n[backup]\nprimary-timeout-ms = 3000\n\n[s3]\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\nendpoint = \"{endpoint}\"\n\
             region = \"us-east-1\"\naccess-key-id = \"test\"\nsecret-access-key = \"test\"\npack-size-kib = 1024\n\
             upload-interval-ms = 200\ntimeout-ms = 3000\n"
        ),
    )
    .unwrap();
}

/// A loopback TCP forwarder to `target`, started late to end an outage.
fn forward(listener: TcpListener, target: String) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(a) = conn else { break };
            let Ok(b) = TcpStream::connect(&target) else { continue };
            for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

fn restore_from_s3(extra: &[&str], envs: &[(&str, String)], epoch: u64, to: &Path) -> std::process::Output {
    let mut c = Command::new(remus_restore());
    c.args(extra).args(["--epoch", &epoch.to_string(), "--json", "--to"]).arg(to);
    for (k, v) in envs {
        c.env(k, v);
    }
    run_limited(&mut c, Duration::from_secs(120))
}

#[test]
fn an_s3_outage_leaves_a_backlog_that_drains_and_site_loss_restores_from_s3_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let bucket = bucket("siteloss");
    let s3 = client(&bucket, "site-a");
    s3.create_bucket(false).unwrap();

    // The backup's S3 endpoint is a forwarder that is not there yet: S3 is away.
    let port = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = port.local_addr().unwrap();
    drop(port);
    let config = data.join("remus.toml");
    write_config(&config, &format!("http://{proxy}"), &bucket, "site-a");
    let backup = BackupProcess::start_with(data, "127.0.0.1:0", &["--config", config.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    // Generous link timeouts: tests, moto and both sides share 2 cores.
    let primary = protect(data, &backup.addr)
        .args(["--config", config.to_str().unwrap(), "--memory-mib", "32", "--seconds", "4", "--json", "--record-roots"])
        .arg(&roots)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let out = primary.wait_with_output().unwrap();
    assert!(out.status.success(), "protect failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed = summary["epochs_committed"].as_u64().unwrap();
    assert!(committed > 20, "{summary}");
    // Every epoch was acknowledged while S3 was away; none is in S3 yet.
    assert!(s3.list("epochs/").unwrap().is_empty());

    // S3 returns: the backlog drains.
    forward(TcpListener::bind(proxy).unwrap(), endpoint().trim_start_matches("http://").to_string());
    let line = backup.wait_line(&format!("uploaded guest-1 epoch {committed}"), Duration::from_secs(120));
    assert_eq!(line, format!("uploaded guest-1 epoch {committed}"));
    backup.stop();
    let epochs = s3.list("epochs/").unwrap();
    assert_eq!(epochs.len() as u64, committed);
    assert!(!s3.list("packs/").unwrap().is_empty() && s3.list("packs/").unwrap().len() == s3.list("index/").unwrap().len());

    // The backup site is lost.
    std::fs::remove_dir_all(data.join("store")).unwrap();
    let roots = read_roots(&roots);
    let url = format!("s3://{bucket}/site-a");
    let direct = data.join("direct.toml");
    write_config(&direct, &endpoint(), "ignored-by-from", "x");
    for e in [1, committed / 2, committed] {
        let img = data.join(format!("s3-{e}.img"));
        let out = restore_from_s3(&["--from", &url, "--config", direct.to_str().unwrap()], &[], e, &img);
        assert!(out.status.success(), "restore {e}: {}", String::from_utf8_lossy(&out.stderr));
        let image = std::fs::read(&img).unwrap();
        assert_eq!(image.len(), 32 << 20);
        assert_eq!(MemoryDigest::of_image(&image).to_hex(), roots[&e], "epoch {e} from S3 is not byte-exact");
    }
    // Credentials and endpoint from the usual AWS environment, no config.
    let env = [
        ("AWS_ENDPOINT_URL", endpoint()),
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let img = data.join("env.img");
    let out = restore_from_s3(&["--from", &url], &env, committed - 1, &img);
    assert!(out.status.success(), "restore with AWS env: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&(committed - 1)]);

    // verify --s3 passes, then names one flipped byte in a pack.
    let verify = || {
        run_limited(
            Command::new(remus()).args(["verify", "--s3", "--json", "--from", &url, "--config"]).arg(&direct),
            Duration::from_secs(120),
        )
    };
    let out = verify();
    assert!(out.status.success(), "verify --s3: {}", String::from_utf8_lossy(&out.stdout));
    let ix_key = s3.list("index/").unwrap()[0].key.clone();
    let ix = format::decode_index(&s3.get(&ix_key).unwrap()).unwrap();
    let victim = ix.entries[ix.entries.len() / 2];
    let pack_key = format::pack_key(&ix.pack);
    let mut pack = s3.get(&pack_key).unwrap();
    pack[victim.offset as usize + victim.len as usize - 1] ^= 0x40;
    s3.delete(&pack_key, None).unwrap();
    s3.put_new(&pack_key, pack).unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "verify must fail: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["damage"],
        serde_json::json!([{"kind": "pack-chunk-corrupt", "pack": ix.pack.to_hex(), "chunk": victim.id.to_hex()}])
    );

    // Bad input is a clear error: an unreachable endpoint, a missing bucket.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = data.join("dead.toml");
    write_config(&dead, &format!("http://{}", closed.local_addr().unwrap()), "x-bucket", "x");
    drop(closed);
    let out = restore_from_s3(&["--from", &url, "--config", dead.to_str().unwrap()], &[], 1, &img);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unreachable") && err.contains(&url), "{err}");
    let out = restore_from_s3(&["--from", "s3://no-such-bucket-here/x", "--config", direct.to_str().unwrap()], &[], 1, &img);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("does not exist"), "{err}");
}

/// The backup thins and collects every second while a primary writes
/// (GC during ingest, locally and in S3); afterwards every kept epoch
/// restores byte-exact, both stores verify clean, `remus gc` runs
/// offline, and `remus archive` writes a COMPLIANCE-locked copy whose
/// versions the server refuses to delete and which restores on its own.
#[test]
fn retention_during_ingest_then_a_locked_archive() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let bucket = bucket("retain");
    let s3 = client(&bucket, "b");
    s3.create_bucket(false).unwrap();
    let config = data.join("remus.toml");
    write_config(&config, &endpoint(), &bucket, "b");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[retention]\ninterval = \"1s\"\nkeep = [{ within = \"300ms\", every = \"0s\" }, { within = \"1h\", every = \"500ms\" }]\n");
    std::fs::write(&config, text).unwrap();

    let backup = BackupProcess::start_with(data, "127.0.0.1:0", &["--config", config.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    let out = run_limited(
        protect(data, &backup.addr)
            .args(["--config", config.to_str().unwrap(), "--memory-mib", "32", "--seconds", "5", "--json", "--record-roots"])
            .arg(&roots),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "protect: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed = summary["epochs_committed"].as_u64().unwrap();
    backup.wait_line(&format!("uploaded guest-1 epoch {committed}"), Duration::from_secs(120));
    backup.stop();

    let log = run_limited(Command::new(remus()).args(["log", "--json", "--data-dir"]).arg(data), Duration::from_secs(30));
    let kept: Vec<u64> = String::from_utf8_lossy(&log.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap())
        .collect();
    assert!(kept.len() > 5 && (kept.len() as u64) < committed / 2, "thinned during ingest: kept {} of {committed}", kept.len());
    assert_eq!(*kept.last().unwrap(), committed);
    let roots = read_roots(&roots);
    // Every kept epoch is restored in the store's own tests; here a
    // sample from each age tier (each restore syncs a 32 MiB image).
    let sample = [kept[0], kept[1], kept[kept.len() / 2], kept[kept.len() - 2], kept[kept.len() - 1]];
    for e in &sample {
        let img = data.join("kept.img");
        let out = run_limited(
            Command::new(remus_restore()).arg("--data-dir").arg(data).args(["--epoch", &e.to_string(), "--to"]).arg(&img),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "restore kept epoch {e}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[e], "kept epoch {e}");
    }
    let url = format!("s3://{bucket}/b");
    for e in [kept[0], kept[kept.len() / 2]] {
        let img = data.join("kept-s3.img");
        let out = restore_from_s3(&["--from", &url, "--config", config.to_str().unwrap()], &[], e, &img);
        assert!(out.status.success(), "restore kept epoch {e} from S3: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&e], "kept epoch {e} from S3");
    }
    // A dropped epoch is gone from both.
    let dropped = (1..committed).find(|e| !kept.contains(e)).unwrap();
    let out = restore_from_s3(&["--from", &url, "--config", config.to_str().unwrap()], &[], dropped, &data.join("x.img"));
    assert_eq!(out.status.code(), Some(2));
    for args in [&["verify", "--json"][..], &["verify", "--s3", "--json"][..], &["gc", "--json"][..]] {
        let out = run_limited(
            Command::new(remus()).args(args).arg("--config").arg(&config).arg("--data-dir").arg(data),
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "{args:?}: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if args[0] == "verify" {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["damage"], serde_json::json!([]), "{args:?}");
            assert_eq!(v["manifests"].as_u64().unwrap(), kept.len() as u64, "{args:?}");
        }
    }

    // The compliance archive.
    let lock_url = format!("s3://{}-lock/arch", bucket);
    let out = run_limited(
        Command::new(remus())
            .args(["archive", "--to", &lock_url, "--retain-days", "1", "--create-bucket", "--json", "--config"])
            .arg(&config),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "archive: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["mode"], "COMPLIANCE");
    assert_eq!(r["copied"].as_u64().unwrap(), s3.list("").unwrap().len() as u64);
    let locked = client(&format!("{bucket}-lock"), "arch");
    let versions = locked.list_versions("packs/").unwrap();
    assert!(!versions.is_empty());
    let err = locked.delete(&versions[0].key, Some(&versions[0].version)).unwrap_err();
    assert!(matches!(err, remus_store::s3::S3Error::Denied { .. }), "a locked version must not be deletable: {err}");
    assert_eq!(locked.list_versions("packs/").unwrap().len(), versions.len());
    let img = data.join("archive.img");
    let out = restore_from_s3(&["--from", &lock_url, "--config", config.to_str().unwrap()], &[], committed, &img);
    assert!(out.status.success(), "restore from the archive: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&committed]);
}

//! The S3 tier end to end, as separate processes against a real S3
//! server (`moto_server`, started by `scripts/test.sh`, its URL in
//! `REMUS_TEST_S3_ENDPOINT`): the backup uploads while S3 is away and
//! drains the backlog once it returns; then the backup site is lost (its
//! RocksDB deleted) and `remus-restore --from s3://…` restores byte-exact
//! from S3 alone; `remus verify --s3` names a flipped byte in a pack;
//! against a second server that checks credentials, a wrong key is
//! refused by name while the backlog waits for the right one.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::moto::AuthMoto;
use common::*;
use remus_store::s3::{format, S3Client, S3Config, S3Error};
use remus_types::{ChunkId, MemoryDigest};

fn endpoint() -> String {
    std::env::var("REMUS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("REMUS_TEST_S3_ENDPOINT is not set: run `bash scripts/test.sh`, which starts moto_server, or start one and export its URL")
    })
}

fn bucket(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// The key the shared server takes (it takes any).
const ANY_KEY: (&str, &str) = ("test", "test");

/// Epochs the segments under `s3` hold, all guests.
fn epochs_in(s3: &S3Client) -> u64 {
    let mut epochs = std::collections::BTreeSet::new();
    for l in s3.list("segments/").unwrap() {
        let seg = format::SegmentObject::decode(&s3.get(&l.key).unwrap()).unwrap();
        epochs.extend(seg.epochs.iter().map(|(m, _)| (m.guest, m.epoch)));
    }
    epochs.len() as u64
}

fn client(bucket: &str, prefix: &str) -> S3Client {
    client_as(&endpoint(), bucket, prefix, ANY_KEY)
}

fn client_as(endpoint: &str, bucket: &str, prefix: &str, (id, secret): (&str, &str)) -> S3Client {
    let mut c = S3Config::new(bucket, prefix);
    c.endpoint = Some(endpoint.to_string());
    c.region = Some("us-east-1".into());
    c.access_key_id = Some(id.into());
    c.secret_access_key = Some(secret.into());
    S3Client::new(&c).unwrap()
}

fn write_config(path: &Path, endpoint: &str, bucket: &str, prefix: &str) {
    write_config_as(path, endpoint, bucket, prefix, ANY_KEY);
}

fn write_config_as(path: &Path, endpoint: &str, bucket: &str, prefix: &str, (id, secret): (&str, &str)) {
    std::fs::write(
        path,
        format!(
            "[protect]\nbackup-timeout-ms = 3000\n\n[backup]\nprimary-timeout-ms = 3000\n\n[s3]\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\nendpoint = \"{endpoint}\"\n\
             region = \"us-east-1\"\naccess-key-id = \"{id}\"\nsecret-access-key = \"{secret}\"\npack-size-kib = 1024\n\
             upload-interval-ms = 200\ntimeout-ms = 3000\n"
        ),
    )
    .unwrap();
}

/// Protects a 32 MiB guest for `seconds` against `backup`, recording its
/// roots into `roots`; returns the epochs committed.
fn protect_recorded(data: &Path, backup: &str, config: &Path, seconds: u32, roots: &Path) -> u64 {
    let out = run_limited(
        protect(data, backup)
            .args([
                "--config",
                config.to_str().unwrap(),
                "--memory-mib",
                "32",
                "--seconds",
                &seconds.to_string(),
                "--json",
                "--record-roots",
            ])
            .arg(roots),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "protect: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    summary["epochs_committed"].as_u64().unwrap()
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
    // Generous link timeouts (in the config): tests, moto and both sides share 2 cores.
    let committed = protect_recorded(data, &backup.addr, &config, 4, &roots);
    assert!(committed > 20, "{committed} epochs committed");
    // Every epoch was acknowledged while S3 was away; none is in S3 yet.
    assert!(s3.list("segments/").unwrap().is_empty());

    // S3 returns: the backlog drains.
    forward(TcpListener::bind(proxy).unwrap(), endpoint().trim_start_matches("http://").to_string());
    let line = backup.wait_line(&format!("uploaded guest-1 epoch {committed}"), Duration::from_secs(120));
    assert_eq!(line, format!("uploaded guest-1 epoch {committed}"));
    backup.stop();
    assert_eq!(epochs_in(&s3), committed);
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
    // The history lists from S3 alone: every epoch, one chain, each
    // manifest naming the memory root the primary recorded.
    let out = run_limited(Command::new(remus()).args(["log", "--json", "--from", &url, "--config"]).arg(&direct), Duration::from_secs(120));
    assert!(out.status.success(), "log --from: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.iter().map(|m| m["epoch"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=committed).collect::<Vec<_>>());
    for (a, b) in listed.iter().zip(&listed[1..]) {
        assert_eq!(b["parent"], a["manifest"], "one chain");
    }
    for m in &listed {
        assert_eq!(m["memory_root"].as_str(), Some(roots[&m["epoch"].as_u64().unwrap()].as_str()));
    }
    // The last few, read from the newest segments back.
    let out = run_limited(
        Command::new(remus()).args(["log", "--json", "--last", "3", "--from", &url, "--config"]).arg(&direct),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "log --last --from: {}", String::from_utf8_lossy(&out.stderr));
    let last: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(last, listed[listed.len() - 3..]);
    // show, diff and bisect from S3 alone too: diff names exactly the pages
    // whose bytes differ between the two epochs restored from S3 above.
    let from_s3 = |args: &[&str]| {
        let out =
            run_limited(Command::new(remus()).args(args).args(["--json", "--s3", &url, "--config"]).arg(&direct), Duration::from_secs(120));
        assert!(out.status.code().is_some_and(|c| c < 2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let shown = from_s3(&["show", &committed.to_string()]);
    assert_eq!(shown["manifest"], listed.last().unwrap()["manifest"]);
    let (a, b) = (committed / 2, committed);
    let d = from_s3(&["diff", &a.to_string(), &b.to_string()]);
    let (ia, ib) = (std::fs::read(data.join(format!("s3-{a}.img"))).unwrap(), std::fs::read(data.join(format!("s3-{b}.img"))).unwrap());
    let differ: Vec<u64> = (0..ia.len() / 4096).filter(|p| ia[p * 4096..][..4096] != ib[p * 4096..][..4096]).map(|p| p as u64).collect();
    let named: Vec<u64> = d["pages"].as_array().unwrap().iter().map(|p| p["pfn"].as_u64().unwrap()).collect();
    assert!(!differ.is_empty());
    assert_eq!(named, differ, "diff from S3 names exactly the pages whose bytes differ");
    // The first byte that differs: bisect for its value at b finds an
    // epoch in (a, b] where it first held, reading about log2 n epochs.
    let at = (0..ia.len()).find(|&i| ia[i] != ib[i]).unwrap().min(ia.len() - 8) as u64;
    let value = ib[at as usize..at as usize + 8].iter().map(|x| format!("{x:02x}")).collect::<String>();
    let bis = from_s3(&[
        "bisect",
        "--from",
        &a.to_string(),
        "--to",
        &b.to_string(),
        "--at",
        &format!("{at:#x}"),
        "--equals",
        &format!("hex:{value}"),
    ]);
    let first = bis["first"].as_u64().expect("found");
    assert!(first > a && first <= b, "{bis}");
    assert!(bis["epochs_read"].as_u64().unwrap() <= ((b - a) as f64).log2().ceil() as u64 + 2, "{bis}");
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
    // The flipped chunk is named first; besides it, only deltas read
    // through it (each over it or over another one named).
    let damage = report["damage"].as_array().unwrap();
    assert_eq!(damage[0], serde_json::json!({"kind": "pack-chunk-corrupt", "pack": ix.pack.to_hex(), "chunk": victim.id.to_hex()}));
    let named: std::collections::HashSet<&str> = damage.iter().filter_map(|d| d["chunk"].as_str()).collect();
    for d in &damage[1..] {
        assert_eq!(d["kind"], "pack-chunk-corrupt", "{report}");
        let pack = ChunkId::from_hex(d["pack"].as_str().unwrap()).unwrap();
        let entries = format::decode_index(&s3.get(&format::index_key(&pack)).unwrap()).unwrap().entries;
        let e = entries.iter().find(|e| Some(&*e.id.to_hex()) == d["chunk"].as_str()).expect("a chunk of its pack");
        let value = s3.get_range(&format::pack_key(&pack), e.offset, 33).unwrap();
        let base = ChunkId(value[1..33].try_into().unwrap()).to_hex();
        assert!(value[0] == 3 && named.contains(&*base), "{} is no delta over a chunk named: {report}", e.id);
    }

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
    text.push_str(
        "\n[retention]\ninterval = \"1s\"\nkeep = [{ within = \"300ms\", every = \"0s\" }, { within = \"1h\", every = \"500ms\" }]\n",
    );
    std::fs::write(&config, text).unwrap();

    let backup = BackupProcess::start_with(data, "127.0.0.1:0", &["--config", config.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    let committed = protect_recorded(data, &backup.addr, &config, 5, &roots);
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
    assert!(matches!(err, remus_store::s3::S3Error::Locked { .. }), "a locked version must not be deletable: {err}");
    assert_eq!(locked.list_versions("packs/").unwrap().len(), versions.len());
    let img = data.join("archive.img");
    let out = restore_from_s3(&["--from", &lock_url, "--config", config.to_str().unwrap()], &[], committed, &img);
    assert!(out.status.success(), "restore from the archive: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&committed]);
}

/// Wrong credentials against a server that checks them (a moto_server of
/// this test's own): the backup keeps committing, keeps its backlog and
/// says why nothing uploads, naming the key; `remus verify --s3` and
/// `remus-restore --from` fail naming it; restarted with the right key,
/// the backup drains the backlog and every epoch restores from S3.
#[test]
fn wrong_credentials_are_denied_by_name_and_the_backlog_waits_for_the_right_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let moto = AuthMoto::start(data);
    let (id, secret) = moto.user_with_s3_access("remus-backup");
    let right = (id.as_str(), secret.as_str());
    let wrong = (id.as_str(), "not-the-secret");
    let bucket = bucket("auth");
    let s3 = client_as(&moto.endpoint, &bucket, "site", right);
    s3.create_bucket(false).unwrap();
    s3.check().unwrap();
    // The server checks: a wrong secret is refused, and so is the key the
    // shared server takes; each denial names the key id it refused.
    for (key, what) in [(wrong, "SignatureDoesNotMatch"), (ANY_KEY, "InvalidAccessKeyId")] {
        let c = client_as(&moto.endpoint, &bucket, "site", key);
        let err = c.check().unwrap_err();
        assert!(matches!(&err, S3Error::Denied { access_key, .. } if access_key == key.0), "{err}");
        let err = c.list("").unwrap_err();
        assert!(matches!(&err, S3Error::Denied { detail, .. } if detail.starts_with(what)), "{err}");
    }

    // The backup runs with the wrong secret: every epoch commits locally.
    let wrong_config = data.join("wrong.toml");
    write_config_as(&wrong_config, &moto.endpoint, &bucket, "site", wrong);
    let backup = BackupProcess::start_logged(data, "127.0.0.1:0", &["--config", wrong_config.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    let committed = protect_recorded(data, &backup.addr, &wrong_config, 3, &roots);
    assert!(committed > 5, "{committed} epochs committed");
    // It says why nothing uploads, naming the key ...
    let line = backup.wait_stderr("s3 upload failing", Duration::from_secs(60));
    assert!(line.contains("s3 access denied for access key id") && line.contains(&id), "{line}");
    // ... once per distinct error and reporter (the uploader's log, the
    // command's line), though every pass fails again.
    let mut reports = std::collections::HashSet::new();
    for l in backup.stop_logged() {
        if let Some(at) = l.find("s3 access denied") {
            assert!(reports.insert((l.starts_with("s3 upload failing"), l[at..].to_string())), "reported again: {l}");
        }
    }
    assert!(s3.list("").unwrap().is_empty(), "nothing reaches S3 with a wrong key");

    // Nothing committed is lost: the backlog restores from the local store.
    let roots = read_roots(&roots);
    let img = data.join("local.img");
    let out = run_limited(
        Command::new(remus_restore()).arg("--data-dir").arg(data).args(["--epoch", &committed.to_string(), "--to"]).arg(&img),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "local restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&committed]);

    // Commands that read S3 fail with the wrong key, naming it.
    let url = format!("s3://{bucket}/site");
    let verify = |config: &Path| {
        run_limited(Command::new(remus()).args(["verify", "--s3", "--json", "--config"]).arg(config), Duration::from_secs(120))
    };
    let out = verify(&wrong_config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&url) && err.contains("access denied") && err.contains(&id), "{err}");
    let out = restore_from_s3(&["--from", &url, "--config", wrong_config.to_str().unwrap()], &[], committed, &img);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&url) && err.contains("access denied") && err.contains(&id), "{err}");

    // Restarted with the right key, the backup drains the backlog ...
    let right_config = data.join("right.toml");
    write_config_as(&right_config, &moto.endpoint, &bucket, "site", right);
    let backup = BackupProcess::start_with(data, "127.0.0.1:0", &["--config", right_config.to_str().unwrap()]);
    backup.wait_line(&format!("uploaded guest-1 epoch {committed}"), Duration::from_secs(120));
    backup.stop();
    assert_eq!(epochs_in(&s3), committed);
    // ... which then verifies and restores from S3 alone.
    let out = verify(&right_config);
    assert!(out.status.success(), "verify --s3: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for e in [1, committed] {
        let img = data.join(format!("s3-{e}.img"));
        let out = restore_from_s3(&["--from", &url, "--config", right_config.to_str().unwrap()], &[], e, &img);
        assert!(out.status.success(), "restore {e} from S3: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&e], "epoch {e} from S3");
    }
}

/// The history is sealed with a key file from `remus key new` before it
/// leaves the backup: after site loss it restores byte-exact, lists and
/// verifies from S3 with that file alone, and without it every command
/// says the history is encrypted and which setting it needs.
#[test]
fn an_encrypted_history_restores_and_verifies_from_s3_with_its_key_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let bucket = bucket("sealed");
    let s3 = client(&bucket, "site-a");
    s3.create_bucket(false).unwrap();
    let keys = data.join("s3.keys");
    let out = run_limited(Command::new(remus()).args(["key", "new"]).arg(&keys), Duration::from_secs(30));
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("key 1 added"), "{out:?}");
    let with_keys = |path: &Path, endpoint: &str| {
        write_config(path, endpoint, &bucket, "site-a");
        let mut text = std::fs::read_to_string(path).unwrap();
        text.push_str(&format!("encryption-keys = \"{}\"\n", keys.display()));
        std::fs::write(path, text).unwrap();
    };
    let config = data.join("remus.toml");
    with_keys(&config, &endpoint());
    let backup = BackupProcess::start_with(data, "127.0.0.1:0", &["--config", config.to_str().unwrap()]);
    let roots = data.join("roots.jsonl");
    let committed = protect_recorded(data, &backup.addr, &config, 3, &roots);
    backup.wait_line(&format!("uploaded guest-1 epoch {committed}"), Duration::from_secs(120));
    backup.stop();
    let roots = read_roots(&roots);
    // Nothing in the bucket is readable without the key.
    for l in s3.list("").unwrap() {
        let body = s3.get(&l.key).unwrap();
        assert!(!l.key.starts_with("packs/") || body[4] == 2, "{} is a sealed pack", l.key);
        assert!(l.key.starts_with("packs/") || body.starts_with(b"RMSE"), "{} is sealed", l.key);
    }

    std::fs::remove_dir_all(data.join("store")).unwrap();
    let url = format!("s3://{bucket}/site-a");
    let img = data.join("sealed.img");
    let out = restore_from_s3(&["--from", &url, "--config", config.to_str().unwrap()], &[], committed, &img);
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&committed], "byte-exact from a sealed tier");
    let out = run_limited(
        Command::new(remus()).args(["verify", "--s3", "--json", "--from", &url, "--config"]).arg(&config),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "verify --s3: {}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["chunks"].as_u64().unwrap() > 0 && report["damage"] == serde_json::json!([]), "{report}");

    // Without the key file: refused, saying why.
    let bare = data.join("bare.toml");
    write_config(&bare, &endpoint(), &bucket, "site-a");
    let out = restore_from_s3(&["--from", &url, "--config", bare.to_str().unwrap()], &[], committed, &img);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("is encrypted") && err.contains("s3.encryption-keys"), "{err}");
    let out = run_limited(Command::new(remus()).args(["log", "--from", &url, "--config"]).arg(&bare), Duration::from_secs(60));
    assert!(out.status.code() == Some(2) && String::from_utf8_lossy(&out.stderr).contains("is encrypted"), "{out:?}");
    // Rotation: a second key encrypts from then on; both decrypt.
    let out = run_limited(Command::new(remus()).args(["key", "new"]).arg(&keys), Duration::from_secs(30));
    assert!(out.status.success(), "{out:?}");
    let out = run_limited(Command::new(remus()).args(["key", "list"]).arg(&keys), Duration::from_secs(30));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "key 1\nkey 2 (encrypts)\n");
    let out = restore_from_s3(&["--from", &url, "--config", config.to_str().unwrap()], &[], 1, &img);
    assert!(out.status.success(), "restore after rotation: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).unwrap()).to_hex(), roots[&1]);
}

/// Least privilege against S3: the backup holds keys to the history and
/// the leases, the primary keys to the lease prefix alone (`[witness]`
/// credentials of its own, no `[s3]`). The primary protects its guest
/// normally under the witness, and its keys can neither read, list,
/// delete nor overwrite anything of the history, which stays whole.
#[test]
fn a_primary_holding_lease_keys_alone_protects_and_cannot_touch_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let moto = AuthMoto::start_for(data, 2);
    let (tier_bucket, lease_bucket) = (bucket("least-tier"), bucket("least-leases"));
    let (bid, bsecret) = moto.user_with_s3_access("remus-backup");
    let (pid, psecret) = moto.user_with_policy(
        "remus-primary",
        &serde_json::json!([
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": format!("arn:aws:s3:::{lease_bucket}/leases/*")},
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": format!("arn:aws:s3:::{lease_bucket}")},
        ]),
    );
    let backup_keys = (bid.as_str(), bsecret.as_str());
    let primary_keys = (pid.as_str(), psecret.as_str());
    let tier = client_as(&moto.endpoint, &tier_bucket, "site", backup_keys);
    tier.create_bucket(false).unwrap();
    client_as(&moto.endpoint, &lease_bucket, "", backup_keys).create_bucket(false).unwrap();

    let backup_config = data.join("backup.toml");
    write_config_as(&backup_config, &moto.endpoint, &tier_bucket, "site", backup_keys);
    let text = std::fs::read_to_string(&backup_config).unwrap();
    std::fs::write(&backup_config, format!("{text}\n[witness]\nurl = \"s3://{lease_bucket}/leases\"\nnode = \"site-b\"\n")).unwrap();
    let backup = BackupProcess::start_logged(data, "127.0.0.1:0", &["--config", backup_config.to_str().unwrap()]);
    let primary_config = data.join("primary.toml");
    std::fs::write(
        &primary_config,
        format!(
            "[protect]\nbackup-timeout-ms = 3000\n\n[witness]\nurl = \"s3://{lease_bucket}/leases\"\nnode = \"site-a\"\nendpoint = \"{}\"\n\
             access-key-id = \"{pid}\"\nsecret-access-key = \"{psecret}\"\n",
            moto.endpoint
        ),
    )
    .unwrap();
    let roots = data.join("roots.jsonl");
    let committed = protect_recorded(data, &backup.addr, &primary_config, 3, &roots);
    assert!(committed > 5, "{committed} epochs committed");
    backup.wait_line(&format!("uploaded guest-1 epoch {committed}"), Duration::from_secs(120));
    backup.stop();
    // The primary held the guest's lease, written with its own keys.
    let lease = client_as(&moto.endpoint, &lease_bucket, "leases", primary_keys).get("leases/guest-1").unwrap();
    let lease: serde_json::Value = serde_json::from_slice(&lease).unwrap();
    assert_eq!(lease["owner"], "site-a", "{lease}");

    // The history, as the backup's keys see it; then the primary's try.
    let before: Vec<String> = tier.list("").unwrap().into_iter().map(|l| l.key).collect();
    assert!(before.iter().any(|k| k.starts_with("segments/")), "{before:?}");
    let theirs = client_as(&moto.endpoint, &tier_bucket, "site", primary_keys);
    let some = &before[0];
    let denied = |r: Result<(), S3Error>, what: &str| {
        assert!(matches!(&r, Err(S3Error::Denied { access_key, .. }) if *access_key == pid), "{what}: {r:?}");
    };
    denied(theirs.list("").map(|_| ()), "list");
    denied(theirs.get(some).map(|_| ()), "read");
    denied(theirs.delete(some, None), "delete");
    denied(theirs.put_new("segments/0000000000000001/99999999999999999999", b"forged".to_vec()), "put");
    let leases_elsewhere = client_as(&moto.endpoint, &lease_bucket, "other", primary_keys);
    denied(leases_elsewhere.put_new("x", b"x".to_vec()), "put outside the lease prefix");
    let after: Vec<String> = tier.list("").unwrap().into_iter().map(|l| l.key).collect();
    assert_eq!(after, before, "the history is whole");
}

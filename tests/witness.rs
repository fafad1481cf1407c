//! Failover decided by a witness, through real partitions: `remus backup`
//! and `remus protect` as processes, remus-relay cutting their QUIC link,
//! a TCP gate cutting the primary from the S3 server that holds the
//! leases (moto_server, started by scripts/test.sh).
//!
//! What must hold: a cut link alone fails nothing over while the primary
//! still renews its lease, and output flows again when the link heals; a
//! primary cut off from both the backup and the witness fences itself
//! (guest held, output held), the backup takes over only by winning the
//! next generation, and the old primary stops, having released nothing
//! beyond the epoch the guest resumed from; restarted, it is refused.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::gate::TcpGate;
use common::*;
use remus_relay::{Impairment, Relay, RelayConfig};
use remus_store::s3::{S3Client, S3Config};
use remus_types::MemoryDigest;

/// The history of guest 1 in the store, as `remus log --json` lines.
fn history(data: &Path) -> Vec<serde_json::Value> {
    let out = run_limited(Command::new(remus()).args(["log", "--json", "--data-dir"]).arg(data), LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// Restores epoch `epoch` from the store and checks it against `root`.
fn assert_restores_to(data: &Path, epoch: u64, root: &str) {
    assert_store_restores(&data.join("store"), epoch, &data.join(format!("epoch-{epoch}.img")), root, LIMIT);
}

const LIMIT: Duration = Duration::from_secs(120);

fn endpoint() -> String {
    std::env::var("REMUS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("REMUS_TEST_S3_ENDPOINT is not set: run `bash scripts/test.sh`, which starts moto_server, or start one and export its URL")
    })
}

fn client(bucket: &str) -> S3Client {
    let mut c = S3Config::new(bucket, "leases");
    c.endpoint = Some(endpoint());
    c.region = Some("us-east-1".into());
    c.access_key_id = Some("test".into());
    c.secret_access_key = Some("test".into());
    S3Client::new(&c).unwrap()
}

/// A fresh bucket for the leases of one test.
fn lease_bucket(name: &str) -> String {
    let bucket = format!("{name}-{}", std::process::id());
    client(&bucket).create_bucket(false).unwrap();
    bucket
}

/// The lease object of guest 1, as JSON.
fn lease(bucket: &str) -> serde_json::Value {
    let (bytes, _) = client(bucket).get_tagged("leases/guest-1").unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Short timeouts, so that a cut is noticed at once; every event of both
/// sides appended to `events.jsonl` beside the config by a hook.
fn write_config(path: &Path) {
    let events = path.with_file_name("events.jsonl");
    std::fs::write(
        path,
        format!(
            "[protect]\nbackup-timeout-ms = 500\n\n[backup]\nprimary-timeout-ms = 500\nprimary-timeout-max-ms = 1000\n\n\
             [hooks]\ncommand = \"cat >> {}\"\n",
            events.display()
        ),
    )
    .unwrap();
}

/// The (role, event, whole event) triples the hooks received, in order.
fn hook_events(config: &Path) -> Vec<(String, String, serde_json::Value)> {
    let text = std::fs::read_to_string(config.with_file_name("events.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("one JSON event per line");
            (v["role"].as_str().unwrap().to_string(), v["event"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// Waits until the hooks received `event` from `role` (delivery is
/// asynchronous) and returns it.
fn wait_hook(config: &Path, role: &str, event: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        if let Some((_, _, v)) = hook_events(config).into_iter().find(|(r, e, _)| r == role && e == event) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "no {role} {event} event: {:?}", hook_events(config));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cmd` reaching S3 at `endpoint` through the AWS environment.
fn with_s3(cmd: &mut Command, endpoint: &str) {
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1");
}

fn start_backup(data: &Path, config: &Path, bucket: &str) -> BackupProcess {
    let mut cmd = Command::new(remus());
    cmd.args(["backup", "--data-dir"]).arg(data).args(["--listen", "127.0.0.1:0", "--config"]).arg(config);
    cmd.arg("--failover-dir").arg(data.join("failover"));
    cmd.args(["--witness", &format!("s3://{bucket}/leases"), "--node", "site-b"]);
    with_s3(&mut cmd, &endpoint());
    BackupProcess::spawn_logged(cmd)
}

/// A primary running in the background.
struct PrimaryProcess(Child);

impl PrimaryProcess {
    fn start(data: &Path, config: &Path, relay: &Relay, bucket: &str, s3: &str, seconds: u32) -> Self {
        Self::start_to(data, config, &relay.local_addr().to_string(), bucket, s3, seconds, "roots.jsonl")
    }

    /// A primary of guest 1 on node site-a replicating to `backup`,
    /// recording its roots in `data/roots`.
    fn start_to(data: &Path, config: &Path, backup: &str, bucket: &str, s3: &str, seconds: u32, roots: &str) -> Self {
        let mut cmd = protect(data, backup);
        cmd.arg("--config").arg(config);
        cmd.args(["--memory-mib", "64", "--pages-per-sec", "2000", "--json", "--drain-seconds", "60", "--seconds", &seconds.to_string()]);
        cmd.args(["--witness", &format!("s3://{bucket}/leases"), "--node", "site-a"]);
        cmd.arg("--record-roots").arg(data.join(roots)).arg("--output-log").arg(data.join("released.log"));
        with_s3(&mut cmd, s3);
        Self(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn protect"))
    }

    /// Waits for the exit: success, stdout, stderr.
    fn wait(self) -> (bool, String, String) {
        let pid = self.0.id();
        let (tx, rx) = std::sync::mpsc::channel();
        let child = self.0;
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = rx.recv_timeout(LIMIT).unwrap_or_else(|_| {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("the primary did not exit");
        });
        let out = out.expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("--- primary stderr ---\n{stderr}");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
    }
}

fn relay_to(backup: &str) -> Relay {
    let upstream: SocketAddr = backup.parse().expect("backup address");
    Relay::start(&RelayConfig::symmetric(upstream, Impairment::default(), 7)).expect("relay")
}

/// Released output lines are the workload's ticks 1..=n, once each, in
/// order.
fn assert_one_history(released: &Path) -> usize {
    let text = std::fs::read_to_string(released).unwrap();
    for (i, line) in text.lines().enumerate() {
        assert!(line.starts_with(&format!("tick {}:", i + 1)), "line {} is {line:?}: a tick lost, repeated or reordered", i + 1);
    }
    text.lines().count()
}

#[test]
fn a_cut_link_with_the_witness_reachable_fails_nothing_over_and_output_flows_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let config = data.join("remus.toml");
    write_config(&config);
    let bucket = lease_bucket("witness-link");
    let backup = start_backup(data, &config, &bucket);
    let relay = relay_to(&backup.addr);
    let primary = PrimaryProcess::start(data, &config, &relay, &bucket, &endpoint(), 8);
    backup.wait_committed(1, 20, LIMIT);
    // Cut the link for longer than the backup's timeout and the lease
    // together: without the witness the backup would fail over.
    relay.set_partitioned(true);
    backup.wait_stderr("primary silent", LIMIT);
    std::thread::sleep(Duration::from_secs(2));
    relay.set_partitioned(false);
    backup.wait_stderr("no failover", LIMIT);
    let (ok, stdout, stderr) = primary.wait();
    assert!(ok, "the primary failed: {stderr}");
    let s: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("summary")).unwrap();
    assert_eq!(s["epochs_committed"], s["epochs"], "every epoch acknowledged after the link healed");
    assert_eq!(s["generation"], 1);
    assert_eq!(s["self_fences"], 0, "the witness confirmed the primary throughout");
    // Output was held across the cut (the epochs sealed then waited for
    // it to heal) and then flowed.
    assert!(s["commit_ms_p99"].as_f64().unwrap() >= 1000.0, "{s}");
    assert_eq!(s["output_lines_released"].as_u64().unwrap() as usize, assert_one_history(&data.join("released.log")));
    let l = lease(&bucket);
    assert_eq!((l["generation"].as_u64(), l["owner"].as_str()), (Some(1), Some("site-a")), "{l}");
    assert!(!data.join("failover").exists() || std::fs::read_dir(data.join("failover")).unwrap().next().is_none(), "nothing failed over");
    let lines = backup.stop_logged();
    assert!(!lines.iter().any(|l| l.contains("failover of")), "{lines:?}");
    assert_eq!(wait_hook(&config, "primary", "lease-taken")["generation"], 1);
    wait_hook(&config, "backup", "primary-lost");
    wait_hook(&config, "backup", "takeover-abandoned");
    assert!(
        !hook_events(&config).iter().any(|(_, e, _)| e == "failover" || e == "fence" || e == "self-fence"),
        "{:?}",
        hook_events(&config)
    );
}

#[test]
fn a_primary_cut_off_from_backup_and_witness_fences_itself_and_the_backup_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let config = data.join("remus.toml");
    write_config(&config);
    let bucket = lease_bucket("witness-both");
    let backup = start_backup(data, &config, &bucket);
    let relay = relay_to(&backup.addr);
    let gate = TcpGate::start(endpoint().trim_start_matches("http://"));
    let primary = PrimaryProcess::start(data, &config, &relay, &bucket, &gate.url(), 60);
    backup.wait_committed(1, 20, LIMIT);
    relay.set_partitioned(true);
    gate.set_cut(true);
    let won = backup.wait_line("lease guest-1 generation 2 taken by site-b", LIMIT);
    let failover = backup.wait_line("failover guest-1 epoch ", LIMIT);
    eprintln!("{won}\n{failover}");
    // "failover guest-1 epoch E image PATH"
    let mut words = failover.split_whitespace().skip(3);
    let epoch: u64 = words.next().unwrap().parse().unwrap();
    let image = words.nth(1).unwrap().to_string();
    // The witness comes back for the old primary (the link stays cut): it
    // learns it was taken over and stops.
    gate.set_cut(false);
    let (ok, _, stderr) = primary.wait();
    assert!(!ok, "the old primary must not go on");
    assert!(stderr.contains("self-fenced"), "it fenced itself while cut off");
    assert!(stderr.contains("was taken over by site-b in generation 2"), "{stderr}");
    let acked: u64 = stderr
        .split("no output after epoch ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the last released epoch is named");
    assert!(acked <= epoch, "released output of epoch {acked}, beyond the epoch {epoch} the guest resumed from");
    assert_one_history(&data.join("released.log"));
    // The guest resumed from a committed epoch, byte-exact.
    let roots = read_roots(&data.join("roots.jsonl"));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&image).unwrap()).to_hex(), roots[&epoch]);
    let l = lease(&bucket);
    assert_eq!((l["generation"].as_u64(), l["owner"].as_str()), (Some(2), Some("site-b")), "{l}");
    // The hooks heard every step, each side in its order.
    assert_eq!(wait_hook(&config, "backup", "lease-won")["generation"], 2);
    assert_eq!(wait_hook(&config, "backup", "fence")["epoch"].as_u64(), Some(epoch));
    assert_eq!(wait_hook(&config, "backup", "failover")["epoch"].as_u64(), Some(epoch));
    assert_eq!(wait_hook(&config, "primary", "superseded")["by"], "site-b");
    wait_hook(&config, "primary", "self-fence");
    let order = |role: &str| hook_events(&config).into_iter().filter(|(r, _, _)| r == role).map(|(_, e, _)| e).collect::<Vec<_>>();
    assert_eq!(order("primary"), ["lease-taken", "self-fence", "superseded"]);
    assert_eq!(order("backup"), ["primary-lost", "lease-won", "fence", "failover"]);
    // Started again, the old primary is refused, naming the new owner.
    relay.set_partitioned(false);
    let again = PrimaryProcess::start(data, &config, &relay, &bucket, &endpoint(), 5);
    let (ok, _, stderr) = again.wait();
    assert!(!ok);
    assert!(stderr.contains("guest-1 is owned by site-b in generation 2"), "{stderr}");
    backup.stop();
}

#[test]
fn a_restarted_primary_continues_its_guests_history_in_the_next_generation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let config = data.join("remus.toml");
    write_config(&config);
    let bucket = lease_bucket("witness-restart");
    // No failover here: the backup only records.
    let backup = BackupProcess::start(data, "127.0.0.1:0");
    let first = PrimaryProcess::start_to(data, &config, &backup.addr, &bucket, &endpoint(), 60, "roots-1.jsonl");
    backup.wait_committed(1, 20, LIMIT);
    // A crash: nothing flushed, the lease left to run out.
    let mut child = first.0;
    child.kill().unwrap();
    let _ = child.wait();
    let second = PrimaryProcess::start_to(data, &config, &backup.addr, &bucket, &endpoint(), 3, "roots-2.jsonl");
    let (ok, stdout, stderr) = second.wait();
    assert!(ok, "the restarted primary failed: {stderr}");
    let s: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("summary")).unwrap();
    assert_eq!(s["generation"], 2, "the next generation");
    // It continued right after the last epoch the first run committed.
    let before = s["first_epoch"].as_u64().unwrap() - 1;
    assert!(before >= 20, "{s}");
    assert_eq!(s["epochs_committed"], s["epochs"]);
    // Protected from its own first epoch's commit, not from the backup's
    // welcome (which names the first run's last epoch).
    let protected = s["protected_ms"].as_f64().expect("protected");
    assert!(protected > 0.0 && protected < s["seconds"].as_f64().unwrap() * 1e3, "{s}");
    // One chain, epochs 1..=last, the generation changing once where the
    // second run began.
    let h = history(data);
    assert_eq!(h.iter().map(|m| m["epoch"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=h.len() as u64).collect::<Vec<_>>());
    for (a, b) in h.iter().zip(&h[1..]) {
        assert_eq!(b["parent"], a["manifest"], "the chain continues across the restart");
    }
    let generations: Vec<u64> = h.iter().map(|m| m["generation"].as_u64().unwrap()).collect();
    assert!(
        generations[..before as usize].iter().all(|g| *g == 1) && generations[before as usize..].iter().all(|g| *g == 2),
        "{generations:?}"
    );
    let out = run_limited(Command::new(remus()).args(["verify", "--json", "--data-dir"]).arg(data), LIMIT);
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
    // Both runs' epochs restore exact: the last of the first run, the
    // first of the second (a memory of its own, none of the first run's
    // pages showing through) and the last.
    let (one, two) = (read_roots(&data.join("roots-1.jsonl")), read_roots(&data.join("roots-2.jsonl")));
    assert_restores_to(data, before, &one[&before]);
    let last = h.len() as u64;
    assert_restores_to(data, before + 1, &two[&(before + 1)]);
    assert_restores_to(data, last, &two[&last]);
    let l = lease(&bucket);
    assert_eq!((l["generation"].as_u64(), l["owner"].as_str()), (Some(2), Some("site-a")), "{l}");
    assert_eq!(wait_hook(&config, "primary", "history-continued")["after"].as_u64(), Some(before));
    let taken: Vec<u64> =
        hook_events(&config).iter().filter(|(_, e, _)| e == "lease-taken").map(|(_, _, v)| v["generation"].as_u64().unwrap()).collect();
    assert_eq!(taken, [1, 2], "a change of generation at each start");
    backup.stop();
}

/// A planned move under a witness: the primary releases its lease once
/// its last epoch is sealed (guest held) and acknowledged, so the backup
/// takes the next generation without waiting a lease period out, and the
/// guest is taken over at the epoch handed over.
#[test]
fn a_moving_primary_releases_its_lease_and_the_backup_takes_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let config = data.join("remus.toml");
    write_config(&config);
    let bucket = lease_bucket("witness-move");
    let backup = start_backup(data, &config, &bucket);
    let primary = PrimaryProcess::start_to(data, &config, &backup.addr, &bucket, &endpoint(), 120, "roots.jsonl");
    backup.wait_committed(1, 20, LIMIT);
    let out = run_limited(Command::new(remus()).args(["move", "--data-dir"]).arg(data), LIMIT);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{said} {}", String::from_utf8_lossy(&out.stderr));
    let epoch: u64 =
        said.strip_prefix("moved guest-1 at epoch ").and_then(|r| r.split(':').next()).and_then(|e| e.parse().ok()).expect(&said);
    let (ok, _, stderr) = primary.wait();
    assert!(ok, "the primary that moved its guest ends well: {stderr}");
    let won = wait_hook(&config, "backup", "lease-won");
    assert_eq!(
        (won["generation"].as_u64(), won["node"].as_str(), won["released"].as_bool()),
        (Some(2), Some("site-b"), Some(true)),
        "{won}"
    );
    let moved = wait_hook(&config, "backup", "move");
    assert_eq!(moved["epoch"].as_u64(), Some(epoch), "{moved}");
    let l = lease(&bucket);
    assert_eq!((l["generation"].as_u64(), l["owner"].as_str(), l.get("released")), (Some(2), Some("site-b"), None), "{l}");
    let line = backup.wait_line("failover guest-1 epoch ", LIMIT);
    assert!(line.starts_with(&format!("failover guest-1 epoch {epoch} image ")), "taken over at the epoch handed over: {line}");
    let image = line.rsplit(' ').next().unwrap();
    assert_eq!(MemoryDigest::of_image(&std::fs::read(image).unwrap()).to_hex(), read_roots(&data.join("roots.jsonl"))[&epoch]);
    backup.stop();
}

/// Where there is no S3: a `remus witness` process on a third site keeps
/// the lease. The primary reaches backup and witness each through a relay;
/// both are cut: it fences itself, the backup wins the lease from the
/// witness and fails over from a committed epoch, and the primary, once
/// it reaches the witness again, learns it was taken over and stops. The
/// witness kept the lease in its file.
#[test]
fn a_remus_witness_process_decides_a_takeover_where_there_is_no_s3() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    keygen(data);
    let config = data.join("remus.toml");
    write_config(&config);
    let leases = data.join("leases");
    let mut cmd = Command::new(remus());
    cmd.args(["witness", "--data-dir"]).arg(data).args(["--listen", "127.0.0.1:0", "--dir"]).arg(&leases);
    let witness = BackupProcess::spawn_logged(cmd);
    let witness_relay = relay_to(&witness.addr);
    let mut cmd = Command::new(remus());
    cmd.args(["backup", "--data-dir"]).arg(data).args(["--listen", "127.0.0.1:0", "--config"]).arg(&config);
    cmd.arg("--failover-dir").arg(data.join("failover"));
    cmd.args(["--witness", &format!("remus://{}", witness.addr), "--node", "site-b"]);
    let backup = BackupProcess::spawn_logged(cmd);
    let relay = relay_to(&backup.addr);
    let mut cmd = protect(data, &relay.local_addr().to_string());
    cmd.arg("--config").arg(&config);
    cmd.args(["--memory-mib", "64", "--pages-per-sec", "2000", "--json", "--drain-seconds", "60", "--seconds", "60"]);
    cmd.args(["--witness", &format!("remus://{}", witness_relay.local_addr()), "--node", "site-a"]);
    cmd.arg("--record-roots").arg(data.join("roots.jsonl")).arg("--output-log").arg(data.join("released.log"));
    let primary = PrimaryProcess(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn protect"));
    backup.wait_committed(1, 20, LIMIT);
    relay.set_partitioned(true);
    witness_relay.set_partitioned(true);
    backup.wait_line("lease guest-1 generation 2 taken by site-b", LIMIT);
    let failover = backup.wait_line("failover guest-1 epoch ", LIMIT);
    let mut words = failover.split_whitespace().skip(3);
    let epoch: u64 = words.next().unwrap().parse().unwrap();
    let image = words.nth(1).unwrap().to_string();
    witness_relay.set_partitioned(false);
    let (ok, _, stderr) = primary.wait();
    assert!(!ok, "the old primary must not go on");
    assert!(stderr.contains("self-fenced") && stderr.contains("was taken over by site-b in generation 2"), "{stderr}");
    assert_one_history(&data.join("released.log"));
    let roots = read_roots(&data.join("roots.jsonl"));
    assert_eq!(MemoryDigest::of_image(&std::fs::read(&image).unwrap()).to_hex(), roots[&epoch]);
    backup.stop();
    witness.stop();
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(leases.join("guest-1.lease")).unwrap()).unwrap();
    assert_eq!((stored["lease"]["generation"].as_u64(), stored["lease"]["owner"].as_str()), (Some(2), Some("site-b")), "{stored}");
}

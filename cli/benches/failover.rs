//! Failover time: a primary killed with SIGKILL, `remus backup` with
//! `--failover-dir` taking its guest over, through remus-relay at a given
//! round trip; the time from the kill to each step the backup reports,
//! read as its lines arrive:
//! - detection: the backup's "primary silent" (its liveness timeout);
//! - lease: "lease … taken" (with a witness: the lease run out unchanged
//!   and the next generation won);
//! - ready: "failover guest-1 epoch N image …" (the last committed epoch
//!   written out, ready to resume from).
//!
//! Run it beside an S3 server for the witness:
//! `bash -c 'source scripts/s3-server.sh && cargo bench -p remus-cli --bench failover'`.
//! Environment:
//! - `REMUS_BENCH_RTT_MS` (default `0,20,100`);
//! - `REMUS_BENCH_WITNESS` (default `on,off`): with and without the
//!   witness, alternated;
//! - `REMUS_BENCH_RUNS` (default 3) per cell;
//! - `REMUS_BENCH_TIMEOUT_MS` (default 500): the backup's primary timeout
//!   (its floor) and the lease period.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use remus_relay::{Impairment, Relay, RelayConfig};
use remus_store::s3::{S3Client, S3Config};

mod common;

use common::env_list;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn with_s3(cmd: &mut Command, endpoint: &str) {
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1");
}

/// Lines of both of the backup's outputs, with the instant each arrived.
fn read_lines(child: &mut Child) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), l));
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send((Instant::now(), l));
        }
    });
    rx
}

fn wait_for(lines: &mpsc::Receiver<(Instant, String)>, needle: &str, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, line) = lines.recv_timeout(left).unwrap_or_else(|_| panic!("no line with {needle:?}"));
        if line.contains(needle) {
            return at;
        }
    }
}

/// One failover; returns (detection, lease, ready) times from the kill.
fn run(data: &Path, rtt_ms: u64, witness: Option<(&str, &str)>, timeout_ms: u64) -> (Duration, Option<Duration>, Duration) {
    let _ = std::fs::remove_dir_all(data);
    std::fs::create_dir_all(data).unwrap();
    let keygen = Command::new(env!("CARGO_BIN_EXE_remus")).args(["keygen", "--data-dir"]).arg(data).output().expect("keygen");
    assert!(keygen.status.success());
    let config = data.join("remus.toml");
    let mut text = format!("[backup]\nprimary-timeout-ms = {timeout_ms}\n\n[protect]\nbackup-timeout-ms = {}\n", timeout_ms.max(500));
    if let Some((_, url)) = witness {
        text.push_str(&format!("\n[witness]\nurl = \"{url}\"\nlease-ms = {timeout_ms}\n"));
    }
    std::fs::write(&config, text).unwrap();
    let mut b = Command::new(env!("CARGO_BIN_EXE_remus"));
    b.args(["backup", "--listen", "127.0.0.1:0", "--data-dir"]).arg(data).arg("--config").arg(&config);
    b.arg("--failover-dir").arg(data.join("failover"));
    if let Some((endpoint, _)) = witness {
        b.args(["--node", "site-b"]);
        with_s3(&mut b, endpoint);
    }
    let mut backup = Killed(b.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn backup"));
    let lines = read_lines(&mut backup.0);
    let (_, first) = lines.recv_timeout(Duration::from_secs(30)).expect("listening line");
    let addr: SocketAddr =
        first.strip_prefix("listening on ").and_then(|r| r.split_whitespace().next()).expect("address").parse().expect("addr");
    let imp = Impairment { delay: Duration::from_millis(rtt_ms / 2), ..Impairment::default() };
    let relay = Relay::start(&RelayConfig::symmetric(addr, imp, 1)).expect("relay");
    let mut p = Command::new(env!("CARGO_BIN_EXE_remus"));
    p.args(["protect", "--memory-mib", "256", "--seconds", "600", "--json", "--data-dir"]).arg(data).arg("--config").arg(&config);
    p.args(["--backup", &relay.local_addr().to_string()]);
    if let Some((endpoint, _)) = witness {
        p.args(["--node", "site-a"]);
        with_s3(&mut p, endpoint);
    }
    let mut primary = Killed(p.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn protect"));
    wait_for(&lines, "committed guest-1 epoch 1", Duration::from_secs(60));
    // Steady state: a few seconds of replication before the host dies.
    std::thread::sleep(Duration::from_secs(3));
    let _ = lines.try_iter().count();
    let killed = Instant::now();
    primary.0.kill().expect("SIGKILL");
    let _ = primary.0.wait();
    let detected = wait_for(&lines, "primary silent", Duration::from_secs(60));
    let leased = witness.map(|_| wait_for(&lines, "lease guest-1 generation", Duration::from_secs(60)));
    let ready = wait_for(&lines, "failover guest-1 epoch", Duration::from_secs(60));
    (detected - killed, leased.map(|l| l - killed), ready - killed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let rtts: Vec<u64> = env_list("REMUS_BENCH_RTT_MS", "0,20,100");
    let modes: Vec<String> = env_list("REMUS_BENCH_WITNESS", "on,off");
    let runs: usize = env_list("REMUS_BENCH_RUNS", "3")[0];
    let timeout_ms: u64 = env_list("REMUS_BENCH_TIMEOUT_MS", "500")[0];
    let endpoint = std::env::var("REMUS_TEST_S3_ENDPOINT").ok();
    let root = std::env::temp_dir().join("remus-bench-failover");
    let _ = std::fs::remove_dir_all(&root);
    let bucket = format!("bench-witness-{}", std::process::id());
    if let Some(e) = &endpoint {
        let mut c = S3Config::new(&bucket, "");
        c.endpoint = Some(e.clone());
        c.region = Some("us-east-1".into());
        c.access_key_id = Some("test".into());
        c.secret_access_key = Some("test".into());
        S3Client::new(&c).unwrap().create_bucket(false).unwrap();
    }
    println!("failover after SIGKILL of the primary (primary timeout and lease {timeout_ms} ms; 256 MiB arena guest, default workload)");
    println!("| RTT ms | witness | run | detection ms | lease won ms | image ready ms |");
    println!("|---|---|---|---|---|---|");
    let mut n = 0;
    for rtt in &rtts {
        for run_no in 0..runs {
            for mode in &modes {
                let witness = match (mode.as_str(), &endpoint) {
                    ("on", Some(e)) => Some((e.as_str(), format!("s3://{bucket}/run-{n}"))),
                    ("on", None) => {
                        eprintln!("witness runs skipped: REMUS_TEST_S3_ENDPOINT is not set (source scripts/s3-server.sh)");
                        continue;
                    }
                    _ => None,
                };
                n += 1;
                let w = witness.as_ref().map(|(e, u)| (*e, u.as_str()));
                let (detect, lease, ready) = run(&root.join(format!("run-{n}")), *rtt, w, timeout_ms);
                println!(
                    "| {rtt} | {mode} | {} | {:.0} | {} | {:.0} |",
                    run_no + 1,
                    ms(detect),
                    lease.map_or("-".into(), |l| format!("{:.0}", ms(l))),
                    ms(ready)
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

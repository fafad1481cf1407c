//! WAN benchmark: `remus backup` and `remus protect` as separate processes
//! with remus-relay between them, over a matrix of round-trip times and
//! loss rates (each with jitter), for the default workload and an
//! incompressible one, with BBR (remus's default) beside quinn's default
//! controller (CUBIC) measured in the same run.
//!
//! Per cell: achieved Hz, output delay (seal to acknowledgement) p50/p99,
//! wire bytes per dirty page, bytes resent, and CPU time per dirty page on
//! each side.
//!
//! `cargo bench -p remus-cli --bench wan`; environment:
//! - `REMUS_BENCH_SECONDS` (default 15): length of each run;
//! - `REMUS_BENCH_RTT_MS` (default `0,20,50,100,200`);
//! - `REMUS_BENCH_LOSS` (default `0,0.001,0.01`);
//! - `REMUS_BENCH_WORKLOADS` (default `default,incompressible`);
//! - `REMUS_BENCH_CC` (default `bbr,cubic`);
//! - `REMUS_BENCH_FEC` (default `auto,off`): parity beside each epoch;
//! - `REMUS_BENCH_JITTER_MS` (default 1; 0 at RTT 0);
//! - `REMUS_BENCH_PAGES_PER_SEC` (default: the workload's own, 20 000).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use remus_relay::{Direction, Impairment, Relay, RelayConfig};

mod common;

use common::env_list;

struct BackupProc {
    child: Child,
    addr: SocketAddr,
}

impl BackupProc {
    fn start(data: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_remus"))
            .args(["backup", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn backup");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().expect("listening line").expect("read");
        let addr = first.strip_prefix("listening on ").and_then(|r| r.split_whitespace().next()).expect("address").parse().expect("addr");
        // Keep draining stdout so the backup never blocks on it.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Self { child, addr }
    }

    fn cpu(&self) -> Duration {
        remus_sys::process_cpu_time(self.child.id()).expect("backup cpu time")
    }
}

impl Drop for BackupProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const INCOMPRESSIBLE: &str = "[protect.arena.workload.mix]\nzero = 0\ntext = 0\nrandom = 100\nduplicate = 0\nedit = 0\n";

struct Cell {
    rtt_ms: u64,
    loss: f64,
    workload: String,
    cc: String,
    fec: String,
}

fn run_cell(c: &Cell, seconds: u64, jitter: Duration) -> String {
    let dir = tempfile::tempdir_in(bench_root()).expect("tempdir");
    let data = dir.path();
    let keygen = Command::new(env!("CARGO_BIN_EXE_remus")).args(["keygen", "--data-dir"]).arg(data).output().expect("keygen");
    assert!(keygen.status.success());
    let backup = BackupProc::start(data);
    let one_way = Duration::from_micros(c.rtt_ms * 500);
    let imp =
        Impairment { delay: one_way, jitter: if c.rtt_ms == 0 { Duration::ZERO } else { jitter }, loss: c.loss, ..Impairment::default() };
    let relay = Relay::start(&RelayConfig::symmetric(backup.addr, imp, 7)).expect("relay");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_remus"));
    if c.workload == "incompressible" {
        let cfg = data.join("incompressible.toml");
        std::fs::write(&cfg, INCOMPRESSIBLE).expect("config");
        cmd.arg("--config").arg(cfg);
    }
    let cpu0 = backup.cpu();
    let out = cmd
        .args(["protect", "--data-dir"])
        .arg(data)
        .args(["--backup", &relay.local_addr().to_string(), "--json", "--drain-seconds", "20", "--congestion", &c.cc, "--fec", &c.fec])
        .args(["--seconds", &seconds.to_string()])
        .args(std::env::var("REMUS_BENCH_PAGES_PER_SEC").map(|r| vec!["--pages-per-sec".to_string(), r]).unwrap_or_default())
        .stderr(Stdio::null())
        .output()
        .expect("protect");
    let backup_cpu = backup.cpu().saturating_sub(cpu0);
    let lost = relay.counters(Direction::Up).lost + relay.counters(Direction::Down).lost;
    let head = format!("{:>4} {:>6.1} {:>15} {:>6} {:>5}", c.rtt_ms, c.loss * 100.0, c.workload, c.cc, c.fec);
    let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return format!("{head}  failed: exit {:?} (no summary)", out.status.code());
    };
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let dirty = f("dirty_pages").max(1.0);
    let acked = f("epochs_committed") / f("epochs").max(1.0);
    format!(
        "{head} {:>6.1} {:>6.0}% {:>8.0} {:>8.0} {:>7.0} {:>8.0} {:>10.0} {:>9.1} {:>9.1} {:>7}{}",
        f("hz"),
        acked * 100.0,
        f("commit_ms_p50"),
        f("commit_ms_p99"),
        f("wire_bytes_per_dirty_page"),
        f("parity_bytes") / dirty,
        f("resent_bytes"),
        f("cpu_seconds") * 1e6 / dirty,
        backup_cpu.as_secs_f64() * 1e6 / dirty,
        lost,
        if out.status.success() { "" } else { "  (did not drain)" },
    )
}

/// Where each run's data directory goes: one directory, emptied when the
/// benchmark starts, so that runs of a benchmark that was killed (whose
/// temporary directories were never dropped) do not pile up and fill the
/// disk, which slows the store and spoils later measurements.
fn bench_root() -> std::path::PathBuf {
    std::env::temp_dir().join("remus-bench-wan")
}

fn main() {
    let root = bench_root();
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("benchmark data directory");
    let seconds: u64 = std::env::var("REMUS_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let jitter = Duration::from_micros(
        std::env::var("REMUS_BENCH_JITTER_MS").ok().and_then(|s| s.parse::<f64>().ok()).map_or(1000, |ms| (ms * 1000.0) as u64),
    );
    let rtts: Vec<u64> = env_list("REMUS_BENCH_RTT_MS", "0,20,50,100,200");
    let losses: Vec<f64> = env_list("REMUS_BENCH_LOSS", "0,0.001,0.01");
    let workloads: Vec<String> = env_list("REMUS_BENCH_WORKLOADS", "default,incompressible");
    let ccs: Vec<String> = env_list("REMUS_BENCH_CC", "bbr,cubic");
    let fecs: Vec<String> = env_list("REMUS_BENCH_FEC", "auto,off");
    println!("# remus WAN benchmark: {seconds} s per run, jitter ±{} ms, 1024 MiB arena guest at 40 Hz", jitter.as_secs_f64() * 1e3);
    println!(
        "{:>4} {:>6} {:>15} {:>6} {:>5} {:>6} {:>7} {:>8} {:>8} {:>7} {:>8} {:>10} {:>9} {:>9} {:>7}",
        "rtt",
        "loss%",
        "workload",
        "cc",
        "fec",
        "Hz",
        "acked",
        "p50 ms",
        "p99 ms",
        "B/page",
        "parity/p",
        "resent B",
        "prim µs/p",
        "back µs/p",
        "lost"
    );
    for rtt_ms in &rtts {
        for loss in &losses {
            for workload in &workloads {
                // The controllers and parity settings back to back, so that
                // a change in the machine's load hits them alike.
                for cc in &ccs {
                    for fec in &fecs {
                        let cell = Cell { rtt_ms: *rtt_ms, loss: *loss, workload: workload.clone(), cc: cc.clone(), fec: fec.clone() };
                        println!("{}", run_cell(&cell, seconds, jitter));
                    }
                }
            }
        }
    }
}

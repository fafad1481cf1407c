//! WAN benchmark: `remus backup` and `remus protect` as separate processes
//! with remus-relay between them, over a matrix of round-trip times and
//! loss rates (each with jitter), for the default workload and an
//! incompressible one, with BBR (remus's default) beside quinn's default
//! controller (CUBIC) measured in the same run.
//!
//! Per cell: achieved Hz, output delay p50/p99 ("out": how long each
//! epoch's output was held, 0 for a new guest's first-copy epochs released
//! at their seals), seal-to-acknowledgement p99 of every epoch ("ack p99")
//! and of those sealed once protected ("p99 prot": after the first copy
//! was committed, none of them waiting behind it), wire bytes per dirty
//! page, bytes resent, and CPU time per dirty page on each side.
//!
//! Beside them, per round trip and loss rate, the baseline a replicator
//! without remus's encoding or transport would be: a plain kernel TCP
//! stream (the kernel's default controller, `k:NAME` in the table, and
//! its default socket buffers) carrying the same number of
//! raw 4 KiB pages per 25 ms epoch, each epoch acknowledged by the
//! receiver once it has all of it, over the same impairment: two network
//! namespaces joined by remus-relay's TUN wire (needs root). Its epochs
//! are sealed on time while at most 64 wait to be sent, later ones wait
//! for room (so its Hz falls when the path cannot carry them).
//!
//! `cargo bench -p remus-cli --bench wan`; environment:
//! - `REMUS_BENCH_SECONDS` (default 15): length of each run;
//! - `REMUS_BENCH_RTT_MS` (default `0,20,50,100,200`);
//! - `REMUS_BENCH_LOSS` (default `0,0.001,0.01`);
//! - `REMUS_BENCH_WORKLOADS` (default `default,incompressible`);
//! - `REMUS_BENCH_CC` (default `bbr,cubic`);
//! - `REMUS_BENCH_FEC` (default `auto,off`): parity beside each epoch;
//! - `REMUS_BENCH_JITTER_MS` (default 1; 0 at RTT 0);
//! - `REMUS_BENCH_PAGES_PER_SEC` (default: the workload's own, 20 000);
//! - `REMUS_BENCH_TCP` (default 1; 0 leaves the TCP baseline out);
//! - `REMUS_BENCH_FIRST_COPY` (default `release`; `hold`, or both):
//!   `[protect] release-first-copy` true or false.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use remus_relay::{Direction, End, Impairment, Relay, RelayConfig, TunWire, ADDR_B};

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
    /// Release a new guest's output during its first copy.
    release_first_copy: bool,
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
    let cfg = data.join("bench.toml");
    let workload = if c.workload == "incompressible" { INCOMPRESSIBLE } else { "" };
    std::fs::write(&cfg, format!("[protect]\nrelease-first-copy = {}\n\n{workload}", c.release_first_copy)).expect("config");
    cmd.arg("--config").arg(cfg);
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
    let first = if c.release_first_copy { "rel" } else { "hold" };
    let head = format!("{:>4} {:>6.1} {:>15} {:>6} {:>5} {:>4}", c.rtt_ms, c.loss * 100.0, c.workload, c.cc, c.fec, first);
    let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return format!("{head}  failed: exit {:?} (no summary)", out.status.code());
    };
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let dirty = f("dirty_pages").max(1.0);
    let acked = f("epochs_committed") / f("epochs").max(1.0);
    format!(
        "{head} {:>6.1} {:>6.0}% {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>7.0} {:>8.0} {:>10.0} {:>9.1} {:>9.1} {:>7}{}",
        f("hz"),
        acked * 100.0,
        f("output_ms_p50"),
        f("output_ms_p99"),
        f("commit_ms_p99"),
        f("protected_commit_ms_p99"),
        f("wire_bytes_per_dirty_page"),
        f("parity_bytes") / dirty,
        f("resent_bytes"),
        f("cpu_seconds") * 1e6 / dirty,
        backup_cpu.as_secs_f64() * 1e6 / dirty,
        lost,
        if out.status.success() { "" } else { "  (did not drain)" },
    )
}

/// The kernel TCP baseline over the same path: `pages` raw pages per 25 ms
/// epoch for `seconds`, each epoch acknowledged by the receiver once whole
/// (an 8-byte epoch number back); a row of the table.
fn run_tcp(rtt_ms: u64, loss: f64, pages: usize, seconds: u64, jitter: Duration) -> String {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::Instant;
    // The kernel's controller in the namespaces, as the label of the row.
    let cc = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").map_or("tcp".into(), |c| format!("k:{}", c.trim()));
    let head = format!("{:>4} {:>6.1} {:>15} {:>6} {:>5} {:>4}", rtt_ms, loss * 100.0, "raw pages", cc, "-", "-");
    let one_way = Duration::from_micros(rtt_ms * 500);
    let imp = Impairment { delay: one_way, jitter: if rtt_ms == 0 { Duration::ZERO } else { jitter }, loss, ..Impairment::default() };
    let wire = match TunWire::start(imp, imp, 7) {
        Ok(w) => w,
        Err(e) => return format!("{head}  not run: {e}"),
    };
    let epoch_bytes = pages * remus_types::PAGE_SIZE;
    // Content is no matter to TCP: one buffer of random bytes, sent again.
    let content: Vec<u8> = (0..epoch_bytes as u64).map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8).collect();
    let (ready_tx, ready_rx) = mpsc::channel();
    let sealed: std::sync::Mutex<Vec<Instant>> = std::sync::Mutex::new(Vec::new());
    let started = Instant::now();
    let (content, sealed_ref, wire_ref) = (&content, &sealed, &wire);
    let (mut delays_ms, acked) = std::thread::scope(|s| {
        s.spawn(|| {
            wire_ref.enter(End::B).expect("enter B");
            let l = std::net::TcpListener::bind((ADDR_B, 7901)).expect("listen");
            ready_tx.send(()).expect("ready");
            let (mut c, _) = l.accept().expect("accept");
            let mut buf = vec![0u8; epoch_bytes + 8];
            while c.read_exact(&mut buf).is_ok() {
                if c.write_all(&buf[..8]).is_err() {
                    break;
                }
            }
        });
        // The sending end on a thread of its own: only it enters A.
        s.spawn(move || {
            let (mut delays_ms, mut acked) = (Vec::new(), 0u64);
            ready_rx.recv().expect("receiver ready");
            wire_ref.enter(End::A).expect("enter A");
            let c = std::net::TcpStream::connect((ADDR_B, 7901)).expect("connect");
            let _ = c.set_nodelay(true);
            let mut reader = c.try_clone().expect("clone");
            let (queue_tx, queue_rx) = mpsc::sync_channel::<u64>(64);
            let mut writer = c;
            s.spawn(move || {
                for epoch in queue_rx {
                    if writer.write_all(&epoch.to_le_bytes()).and_then(|()| writer.write_all(content)).is_err() {
                        break;
                    }
                }
                let _ = writer.shutdown(std::net::Shutdown::Write);
            });
            let sealed = sealed_ref;
            s.spawn(move || {
                let mut next = Instant::now();
                let end = next + Duration::from_secs(seconds);
                let mut epoch = 0u64;
                while next < end {
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    sealed.lock().expect("sealed").push(Instant::now());
                    if queue_tx.send(epoch).is_err() {
                        break;
                    }
                    epoch += 1;
                    next = (next + Duration::from_millis(25)).max(Instant::now());
                }
            });
            // Acknowledgements, until the stream ends or 20 s after the run
            // (then the connection is cut, which ends the other threads).
            let deadline = started + Duration::from_secs(seconds + 20);
            let _ = reader.set_read_timeout(Some(Duration::from_millis(200)));
            let mut ack = [0u8; 8];
            let mut have = 0;
            while Instant::now() < deadline {
                match reader.read(&mut ack[have..]) {
                    Ok(0) => break,
                    Ok(n) => have += n,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                    Err(_) => break,
                }
                if have == 8 {
                    have = 0;
                    let e = u64::from_le_bytes(ack) as usize;
                    let at = sealed.lock().expect("sealed")[e];
                    delays_ms.push(at.elapsed().as_secs_f64() * 1e3);
                    acked += 1;
                }
            }
            let _ = reader.shutdown(std::net::Shutdown::Both);
            (delays_ms, acked)
        })
        .join()
        .expect("the sending end")
    });
    let epochs = sealed.into_inner().expect("sealed").len() as f64;
    delays_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| delays_ms.get(((delays_ms.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    let (up, down) = (wire.counters(Direction::Up), wire.counters(Direction::Down));
    let wire_bytes = (up.bytes + down.bytes) as f64 / (acked.max(1) as f64 * pages as f64);
    format!(
        "{head} {:>6.1} {:>6.0}% {:>8.0} {:>8.0} {:>8.0} {:>8} {:>7.0} {:>8} {:>10} {:>9} {:>9} {:>7}",
        epochs / seconds as f64,
        acked as f64 / epochs.max(1.0) * 100.0,
        pct(0.5),
        pct(0.99),
        pct(0.99),
        "-",
        wire_bytes,
        "-",
        "-",
        "-",
        "-",
        up.lost + down.lost,
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
    let first_copy: Vec<String> = env_list("REMUS_BENCH_FIRST_COPY", "release");
    println!("# remus WAN benchmark: {seconds} s per run, jitter ±{} ms, 1024 MiB arena guest at 40 Hz", jitter.as_secs_f64() * 1e3);
    println!(
        "{:>4} {:>6} {:>15} {:>6} {:>5} {:>4} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>10} {:>9} {:>9} {:>7}",
        "rtt",
        "loss%",
        "workload",
        "cc",
        "fec",
        "1st",
        "Hz",
        "acked",
        "out p50",
        "out p99",
        "ack p99",
        "p99 prot",
        "B/page",
        "parity/p",
        "resent B",
        "prim µs/p",
        "back µs/p",
        "lost"
    );
    let tcp = std::env::var("REMUS_BENCH_TCP").map_or(true, |v| v != "0");
    let pages = std::env::var("REMUS_BENCH_PAGES_PER_SEC").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(20_000) / 40;
    for rtt_ms in &rtts {
        for loss in &losses {
            if tcp {
                println!("{}", run_tcp(*rtt_ms, *loss, pages, seconds, jitter));
            }
            for workload in &workloads {
                // The controllers and parity settings back to back, so that
                // a change in the machine's load hits them alike.
                for cc in &ccs {
                    for fec in &fecs {
                        for first in &first_copy {
                            let cell = Cell {
                                rtt_ms: *rtt_ms,
                                loss: *loss,
                                workload: workload.clone(),
                                cc: cc.clone(),
                                fec: fec.clone(),
                                release_first_copy: first != "hold",
                            };
                            println!("{}", run_cell(&cell, seconds, jitter));
                        }
                    }
                }
            }
        }
    }
}

//! QEMU benchmark: a real guest protected by remus, measured against the
//! same guest unprotected in the same run.
//!
//! - Achieved Hz, pause p50/p99 and wire bytes per epoch for each guest
//!   size and epoch rate (default 128, 256 and 1024 MiB at 20 and 40 Hz),
//!   with a CPU-bound job running in the guest.
//! - Guest slowdown: a fixed CPU-bound job (sha256 of 48 MiB inside the
//!   guest, timed by the client) protected vs unprotected, and with
//!   checkpoints taken at 20 Hz but not sent (the cost of the pause alone).
//! - Failover: SIGKILL of the primary (remus and its QEMU) to the guest
//!   answering at the backup, on the client's open connection and on a new
//!   one, with the link through remus-relay at each round trip of
//!   REMUS_BENCH_QEMU_FAILOVER_RTT_MS (default "0"; "none" to skip) and each primary
//!   timeout of REMUS_BENCH_QEMU_TIMEOUT_MS (default "500").
//! - Planned move: `remus move` through remus-relay at each round trip of
//!   REMUS_BENCH_QEMU_MOVE_RTT_MS (default "0"; "none" to skip), under a
//!   client sending one request after another: the hold `remus move`
//!   reports, the time until the guest runs at the backup, and the
//!   client's slowest request.
//! - Protected again: `remus move` to a backup running `--reverse-to` a
//!   third one reached through remus-relay at each round trip of
//!   REMUS_BENCH_QEMU_REVERSE_RTT_MS (default none): the time until the
//!   third backup commits the new primary's first epoch (the whole
//!   memory, as the new primary logs it), what remus-relay counted on the
//!   way, and the client's slowest request.
//! - Failback: at each round trip of REMUS_BENCH_QEMU_FAILBACK_RTT_MS
//!   (default none), two sites each protecting a guest that arrives
//!   (`--reverse-to` the other through remus-relay); the guest moves there
//!   and back: the time until it is protected again each way, at a backup
//!   holding nothing of it and at the one it left (which held most of it).
//!
//! `cargo bench -p remus-cli --bench qemu` as root (it makes a private
//! network namespace for the guest's network). REMUS_BENCH_QEMU_SIZES
//! ("128,256,1024"; "none" for the failover alone) and
//! REMUS_BENCH_QEMU_JOBS (3) change the defaults.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use remus_capture::{checkpoint, Scratch, TrackingMode};
use remus_qemu::{Egress, QemuConfig, QemuGuest, QemuMachine, RunDir};
use remus_types::{Checkpoint, EpochId};

#[path = "../../tests/common/guest.rs"]
mod guest;

const JOB_MIB: u32 = 48;

fn main() {
    enter_private_netns();
    let (kernel, initrd) = guest::guest_image();
    let sizes = numbers("REMUS_BENCH_QEMU_SIZES", "128,256,1024");
    let rtts = numbers("REMUS_BENCH_QEMU_FAILOVER_RTT_MS", "0");
    let jobs: usize = std::env::var("REMUS_BENCH_QEMU_JOBS").map_or(3, |s| s.parse().expect("job count"));
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    run_ok(Command::new(remus()).args(["keygen", "--data-dir"]).arg(&data));

    println!("remus QEMU benchmark: TCG guest, {JOB_MIB} MiB sha256 job x{jobs} in the guest during each run");
    println!();
    println!("Per size, in this order: the unprotected guest (same QEMU, disk and network");
    println!("plumbing, no epochs), checkpoints only (pause, capture, resume at 20 Hz, nothing");
    println!("sent), protected at 20 and 40 Hz (remus protect qemu + remus backup, loopback");
    println!("QUIC, mutual TLS), the unprotected guest again. Slowdown is against the mean of");
    println!("the two unprotected medians, which bracket the others in time.");
    println!();
    println!(
        "  {:>5}  {:>14}  {:>3}  {:>7}  {:>9}  {:>9}  {:>9}  {:>10}  {:>7}  {:>8}",
        "MiB", "run", "Hz", "got Hz", "pause p50", "pause p99", "pause max", "wire/epoch", "job ms", "slowdown"
    );
    for &mib in &sizes {
        let before = median(&unprotected(&kernel, &initrd, mib, jobs, work.path()));
        let cp = median(&checkpoints_only(&kernel, &initrd, mib, jobs, work.path(), Some(20)));
        let runs: Vec<_> = [20u32, 40].iter().map(|&hz| (hz, protected(&kernel, &initrd, mib, hz, jobs, &data))).collect();
        let after = median(&unprotected(&kernel, &initrd, mib, jobs, work.path()));
        let base = (before + after) / 2.0;
        println!("  {mib:>5}  {:>14}  {:>3}  {:>7}  {:>9}  {:>9}  {:>9}  {:>10}  {before:>7.0}", "unprotected", "", "", "", "", "", "");
        println!(
            "  {mib:>5}  {:>14}  {:>3}  {:>7}  {:>9}  {:>9}  {:>9}  {:>10}  {cp:>7.0}  {:>7.1}%",
            "checkpoints",
            20,
            "",
            "",
            "",
            "",
            "",
            (cp / base - 1.0) * 100.0
        );
        for (hz, (s, ms)) in runs {
            let job = median(&ms);
            println!(
                "  {mib:>5}  {:>14}  {hz:>3}  {:>7.1}  {:>6.2} ms  {:>6.2} ms  {:>6.1} ms  {:>7.0} KB  {job:>7.0}  {:>7.1}%",
                "protected",
                s["hz"].as_f64().unwrap_or(0.0),
                s["pause_ms_p50"].as_f64().unwrap_or(0.0),
                s["pause_ms_p99"].as_f64().unwrap_or(0.0),
                s["pause_ms_max"].as_f64().unwrap_or(0.0),
                s["wire_bytes"].as_f64().unwrap_or(0.0) / s["epochs"].as_f64().unwrap_or(1.0).max(1.0) / 1000.0,
                (job / base - 1.0) * 100.0
            );
        }
        println!("  {mib:>5}  {:>14}  {:>3}  {:>7}  {:>9}  {:>9}  {:>9}  {:>10}  {after:>7.0}", "unprotected", "", "", "", "", "", "");
    }
    println!();
    let move_rtts = numbers("REMUS_BENCH_QEMU_MOVE_RTT_MS", "0");
    let reverse_rtts = numbers("REMUS_BENCH_QEMU_REVERSE_RTT_MS", "none");
    let timeouts = numbers("REMUS_BENCH_QEMU_TIMEOUT_MS", "500");
    for rtt in numbers("REMUS_BENCH_QEMU_FAILBACK_RTT_MS", "none") {
        let [there, back] = failback(&kernel, &initrd, &data, work.path(), rtt);
        println!("failback (128 MiB, 40 Hz; B and C each protect a guest that arrives, replicating to the other through remus-relay, {rtt} ms round trip):");
        println!(
            "  move A -> B: protected again at C {:>6.0} ms after remus move (C held {} of its pages)",
            there.0.as_secs_f64() * 1e3,
            there.1
        );
        println!(
            "  move B -> C: protected again at B {:>6.0} ms after remus move (B held {} of its pages, from before the first move)",
            back.0.as_secs_f64() * 1e3,
            back.1
        );
    }
    for &rtt in &reverse_rtts {
        let r = protected_again(&kernel, &initrd, &data, work.path(), rtt);
        println!("remus move to a backup protecting it again (--reverse-to a third, {rtt} ms round trip to it through remus-relay):");
        println!("  remus move asked to the new primary started   {:>6.0} ms", r.handed.as_secs_f64() * 1e3);
        println!(
            "  ... to the third backup's commit of its first epoch {:>6.0} ms (protected again: the whole memory)",
            r.protected.as_secs_f64() * 1e3
        );
        println!("  relay to the third backup: {}", r.relayed);
        println!(
            "  client's slowest request                       {:>6.0} ms ({:.0} ms typical before the move)",
            r.slowest.as_secs_f64() * 1e3,
            r.typical.as_secs_f64() * 1e3
        );
        for l in &r.said {
            println!("  new primary: {l}");
        }
    }
    for &rtt in &move_rtts {
        let m = planned_move(&kernel, &initrd, &data, work.path(), rtt);
        println!("remus move (128 MiB, 40 Hz, {rtt} ms round trip through remus-relay), a client sending inc after inc:");
        println!("  guest held still until the backup had it  {:>6.1} ms (as remus move reports)", m.held_ms);
        println!("  remus move asked to resumed at the backup {:>6.0} ms", m.resumed.as_secs_f64() * 1e3);
        println!(
            "  client's slowest request                  {:>6.0} ms ({:.0} ms typical before the move)",
            m.slowest.as_secs_f64() * 1e3,
            m.typical.as_secs_f64() * 1e3
        );
    }
    for rtt in rtts {
        for &timeout in &timeouts {
            let f = failover(&kernel, &initrd, &data, work.path(), rtt, timeout);
            println!("failover (128 MiB, 40 Hz, backup primary-timeout {timeout} ms, {rtt} ms round trip through remus-relay), from SIGKILL of the primary:");
            println!("  backup declared it lost        {:>6.0} ms", f.detected.as_secs_f64() * 1e3);
            println!("  backup resumed the guest       {:>6.0} ms", f.resumed.as_secs_f64() * 1e3);
            println!("  new connection accepted        {:>6.0} ms (the guest's kernel answers)", f.handshake.as_secs_f64() * 1e3);
            println!(
                "  new connection answered        {:>6.0} ms (its counter service; {:.0} ms for a new connection before the kill)",
                f.new_conn.as_secs_f64() * 1e3,
                f.steady.as_secs_f64() * 1e3
            );
            println!("  the next new connection took   {:>6.0} ms", f.second.as_secs_f64() * 1e3);
            println!(
                "  open connection's next reply   {:>6.0} ms (includes the client's TCP retransmission backoff)",
                f.open_conn.as_secs_f64() * 1e3
            );
        }
    }
}

/// The comma-separated numbers in environment variable `var` (`default`
/// when unset; none for "none").
fn numbers(var: &str, default: &str) -> Vec<u64> {
    match std::env::var(var).as_deref().unwrap_or(default) {
        "none" => Vec::new(),
        v => v.split(',').map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{var}: {v:?} is not a list of numbers"))).collect(),
    }
}

fn remus() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_remus"))
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Moves this process into a network namespace of its own, with a bridge
/// (10.0.2.1/24; the guest is .15) and two TAPs on it.
fn enter_private_netns() {
    remus_sys::unshare_net_namespace().expect("unshare(CLONE_NEWNET) failed (run as root)");
    for cmd in guest::BRIDGE_AND_TAPS {
        let args: Vec<&str> = cmd.split(' ').collect();
        run_ok(Command::new(args[0]).args(&args[1..]));
    }
}

fn wait_ready(serial: &Path, mut primary: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(serial).is_ok_and(|s| s.contains("remus-guest ready")) {
        assert!(Instant::now() < deadline, "guest never became ready: {}", serial.display());
        if let Some(Ok(Some(status))) = primary.as_mut().map(|p| p.try_wait()) {
            panic!("the primary exited ({status}) before its guest was ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connect(port: u16, limit: Duration) -> TcpStream {
    let deadline = Instant::now() + limit;
    loop {
        match TcpStream::connect_timeout(&format!("10.0.2.15:{port}").parse().unwrap(), Duration::from_millis(500)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "guest port {port}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Runs the CPU job `n` times, each on a new connection; client-timed ms.
fn cpu_jobs(n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let mut s = connect(7001, Duration::from_secs(60));
            let t0 = Instant::now();
            s.write_all(format!("{JOB_MIB}\n").as_bytes()).unwrap();
            let mut reply = String::new();
            BufReader::new(s).read_line(&mut reply).unwrap();
            assert!(reply.trim().parse::<u64>().is_ok(), "cpujob reply {reply:?}");
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn machine(kernel: &Path, initrd: &Path, mib: u64) -> QemuMachine {
    QemuMachine {
        memory_mib: mib,
        cpus: 1,
        accel: "tcg".into(),
        kernel: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        append: "console=ttyS0 quiet".into(),
        mac: "52:54:00:12:34:56".into(),
        disk_mib: 16,
    }
}

fn unprotected(kernel: &Path, initrd: &Path, mib: u64, jobs: usize, work: &Path) -> Vec<f64> {
    checkpoints_only(kernel, initrd, mib, jobs, work, None)
}

/// The guest checkpointed at `hz` with the checkpoints thrown away (no
/// replication), or never (`None`): what the pause itself costs the guest.
fn checkpoints_only(kernel: &Path, initrd: &Path, mib: u64, jobs: usize, work: &Path, hz: Option<u32>) -> Vec<f64> {
    let run_dir = PathBuf::from(format!("/dev/shm/remus-bench-u{}", std::process::id()));
    let cfg = QemuConfig {
        machine: machine(kernel, initrd, mib),
        qemu: remus_qemu::default_qemu(),
        disk: Some(work.join(format!("disk-u{mib}.img"))),
        tap: Some("tap-p".into()),
        run_dir: run_dir.clone(),
        // The same preloaded shim as a protected guest; write-protect
        // tracking is armed only when checkpoints are taken.
        tracking: if hz.is_some() { TrackingMode::WriteProtect } else { TrackingMode::Hash },
        shim: None,
    };
    let mut guest = QemuGuest::start(&cfg, Egress::Direct).expect("QEMU");
    // One checkpoint starts it (QEMU is launched paused).
    let mut scratch = Scratch::default();
    checkpoint(&mut guest, EpochId(1), &mut Checkpoint::default(), &mut scratch, || {}).expect("start");
    wait_ready(&RunDir { dir: run_dir.clone() }.serial(), None);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let epochs = std::thread::spawn(move || {
        let mut cp = Checkpoint::default();
        let mut e = 2;
        while let Some(hz) = hz.filter(|_| !stop2.load(std::sync::atomic::Ordering::Relaxed)) {
            std::thread::sleep(Duration::from_secs_f64(1.0 / f64::from(hz)));
            checkpoint(&mut guest, EpochId(e), &mut cp, &mut scratch, || {}).expect("checkpoint");
            e += 1;
        }
        guest
    });
    let ms = cpu_jobs(jobs);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(epochs.join().expect("epoch thread"));
    let _ = std::fs::remove_dir_all(&run_dir);
    ms
}

struct Proc {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Proc {
    /// Runs `cmd`, timing each line it prints on stdout or stderr as it
    /// arrives (stderr echoed to this process's).
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        let (tx, lines) = mpsc::channel();
        let read = |r: Box<dyn std::io::Read + Send>, tx: mpsc::Sender<(Instant, String)>, echo: bool| {
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines() {
                    let Ok(l) = l else { break };
                    if echo {
                        eprintln!("{l}");
                    }
                    if tx.send((Instant::now(), l)).is_err() {
                        break;
                    }
                }
            });
        };
        read(Box::new(child.stdout.take().unwrap()), tx.clone(), false);
        read(Box::new(child.stderr.take().unwrap()), tx, true);
        Self { child, lines }
    }

    fn wait_line(&self, prefix: &str, limit: Duration) -> (Instant, String) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (t, l) = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no line {prefix:?}"));
            if l.starts_with(prefix) {
                return (t, l);
            }
        }
    }

    /// When each of `prefixes` first began a line, in any order, and the line.
    fn wait_lines(&self, prefixes: &[&str], limit: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + limit;
        let mut at: Vec<Option<(Instant, String)>> = vec![None; prefixes.len()];
        while at.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let (t, l) = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no lines {prefixes:?}"));
            for (p, a) in prefixes.iter().zip(at.iter_mut()) {
                if a.is_none() && l.starts_with(p) {
                    *a = Some((t, l.clone()));
                }
            }
        }
        at.into_iter().map(|a| a.expect("seen")).collect()
    }

    fn term(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backup(data: &Path, extra: &[&str]) -> (Proc, String) {
    backup_with(None, data, extra)
}

/// `remus backup` with a config file.
fn backup_with(config: Option<&Path>, data: &Path, extra: &[&str]) -> (Proc, String) {
    backup_at(config, data, "127.0.0.1:0", extra)
}

/// `remus backup` listening on `listen`.
fn backup_at(config: Option<&Path>, data: &Path, listen: &str, extra: &[&str]) -> (Proc, String) {
    let store = tempfile::Builder::new().prefix("store").tempdir_in(data.parent().unwrap()).unwrap().keep();
    let mut c = Command::new(remus());
    if let Some(config) = config {
        c.arg("--config").arg(config);
    }
    c.args(["backup", "--data-dir"]).arg(data).arg("--store").arg(&store).args(["--listen", listen]).args(extra);
    let p = Proc::spawn(c);
    let (_, first) = p.wait_line("listening on ", Duration::from_secs(30));
    let addr = first.split_whitespace().nth(2).unwrap().to_string();
    (p, addr)
}

fn protect_cmd(kernel: &Path, initrd: &Path, mib: u64, hz: u32, data: &Path, addr: &str, run_dir: &Path) -> Command {
    let mut c = Command::new(remus());
    c.args(["protect", "qemu", "--json", "--data-dir"])
        .arg(data)
        .args(["--backup", addr, "--tap", "tap-p", "--disk-mib", "16", "--tracking", "write-protect"])
        .args(["--memory-mib", &mib.to_string(), "--hz", &hz.to_string()])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--run-dir")
        .arg(run_dir);
    c
}

/// A relay to `to` adding a round trip of `rtt_ms` (in this process's
/// network namespace, like the rest), and its address.
fn relay(to: &str, rtt_ms: u64) -> (remus_relay::Relay, String) {
    let imp = remus_relay::Impairment { delay: Duration::from_millis(rtt_ms / 2), ..remus_relay::Impairment::default() };
    let relay = remus_relay::Relay::start(&remus_relay::RelayConfig::symmetric(to.parse().expect("address"), imp, 1)).expect("relay");
    let via = relay.local_addr().to_string();
    (relay, via)
}

/// `remus protect qemu` of a `mib` MiB guest at `hz` replicating to
/// `backup`, in a run directory named by `tag`, once its guest is ready.
fn ready_primary(kernel: &Path, initrd: &Path, (mib, hz): (u64, u32), data: &Path, backup: &str, tag: &str) -> (Proc, PathBuf) {
    let run_dir = PathBuf::from(format!("/dev/shm/remus-bench-{}-{tag}", std::process::id()));
    let mut primary = Proc::spawn(protect_cmd(kernel, initrd, mib, hz, data, backup, &run_dir));
    wait_ready(&run_dir.join("serial.log"), Some(&mut primary.child));
    (primary, run_dir)
}

fn protected(kernel: &Path, initrd: &Path, mib: u64, hz: u32, jobs: usize, data: &Path) -> (serde_json::Value, Vec<f64>) {
    let (_backup, addr) = backup(data, &[]);
    let (mut primary, run_dir) = ready_primary(kernel, initrd, (mib, hz), data, &addr, &format!("p{mib}-{hz}"));
    let ms = cpu_jobs(jobs);
    primary.term();
    let (_, json) = primary.wait_line("{", Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&run_dir);
    (serde_json::from_str(&json).expect("summary json"), ms)
}

struct Failover {
    detected: Duration,
    resumed: Duration,
    handshake: Duration,
    new_conn: Duration,
    /// A new connection's reply before the kill (median of 5).
    steady: Duration,
    /// The next new connection's reply, right after the first one answered.
    second: Duration,
    open_conn: Duration,
}

fn failover(kernel: &Path, initrd: &Path, data: &Path, work: &Path, rtt_ms: u64, timeout_ms: u64) -> Failover {
    let fo = work.join(format!("failover-{rtt_ms}-{timeout_ms}"));
    let config = work.join(format!("failover-{timeout_ms}.toml"));
    std::fs::write(&config, format!("[backup]\nprimary-timeout-ms = {timeout_ms}\n")).expect("config");
    let (backup, addr) = backup_with(Some(&config), data, &["--failover-dir", fo.to_str().unwrap(), "--resume", "--tap", "tap-b"]);
    let (_relay, via) = relay(&addr, rtt_ms);
    let (mut primary, run_dir) = ready_primary(kernel, initrd, (128, 40), data, &via, &format!("failover-{rtt_ms}"));
    let mut conn = BufReader::new(connect(7000, Duration::from_secs(60)));
    let inc = |c: &mut BufReader<TcpStream>| {
        c.get_mut().write_all(b"inc\n").unwrap();
        let mut r = String::new();
        c.read_line(&mut r).unwrap();
        assert!(r.trim().parse::<u64>().is_ok(), "counter reply {r:?}");
    };
    for _ in 0..5 {
        inc(&mut conn);
    }
    // What a new connection's reply costs the guest when nothing fails
    // (under TCG the service forks a shell per connection).
    let mut steady: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            assert!(get_reply(TcpStream::connect_timeout(&"10.0.2.15:7000".parse().unwrap(), Duration::from_secs(5)).expect("connect")));
            t.elapsed().as_secs_f64()
        })
        .collect();
    steady.sort_by(f64::total_cmp);
    let killed = Instant::now();
    primary.child.kill().unwrap();
    let _ = primary.child.wait();
    // New connections tried back to back (each given 20 ms), so the time
    // the guest first answers is known to within about that: its kernel
    // (the handshake) and its counter service (a reply).
    let probe = std::thread::spawn(move || {
        let mut handshake = None;
        loop {
            if let Ok(s) = TcpStream::connect_timeout(&"10.0.2.15:7000".parse().unwrap(), Duration::from_millis(20)) {
                let shook = *handshake.get_or_insert(killed.elapsed());
                if get_reply(s) {
                    let answered = killed.elapsed();
                    // And once more, on a guest that has run a little.
                    let t = Instant::now();
                    let again = TcpStream::connect_timeout(&"10.0.2.15:7000".parse().unwrap(), Duration::from_secs(5)).is_ok_and(get_reply);
                    assert!(again, "the resumed guest answered once and then not");
                    return (shook, answered, t.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    inc(&mut conn);
    let open_conn = killed.elapsed();
    let (handshake, new_conn, second) = probe.join().unwrap();
    let at = backup.wait_lines(&["guest-1: primary silent", "failover guest-1"], Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&run_dir);
    Failover {
        detected: at[0].0.duration_since(killed),
        resumed: at[1].0.duration_since(killed),
        handshake,
        new_conn,
        open_conn,
        steady: Duration::from_secs_f64(steady[2]),
        second,
    }
}

/// A planned move through a relay adding `rtt_ms`, under a client sending
/// one `inc` after another on one connection.
struct Move {
    /// What `remus move` reported: the guest held still until the backup had it.
    held_ms: f64,
    /// `remus move` asked to the backup's line that the guest runs there.
    resumed: Duration,
    /// The client's slowest request across the move.
    slowest: Duration,
    /// Its median request before the move.
    typical: Duration,
}

fn planned_move(kernel: &Path, initrd: &Path, data: &Path, work: &Path, rtt_ms: u64) -> Move {
    let fo = work.join(format!("move-{rtt_ms}"));
    let (backup, addr) = backup(data, &["--failover-dir", fo.to_str().unwrap(), "--resume", "--tap", "tap-b"]);
    let (_relay, via) = relay(&addr, rtt_ms);
    let (mut primary, run_dir) = ready_primary(kernel, initrd, (128, 40), data, &via, &format!("move-{rtt_ms}"));
    let client = Client::start();
    std::thread::sleep(Duration::from_secs(2));
    let (asked, held_ms) = remus_move(data);
    let at = backup.wait_lines(&["failover guest-1"], Duration::from_secs(30));
    let _ = primary.child.wait();
    std::thread::sleep(Duration::from_secs(2));
    let (slowest, typical) = client.stop(asked);
    let _ = std::fs::remove_dir_all(&run_dir);
    Move { held_ms, resumed: at[0].0.duration_since(asked), slowest, typical }
}

/// `remus move` of the guest whose primary runs with `data`: when it was
/// asked, and the hold it reports.
fn remus_move(data: &Path) -> (Instant, f64) {
    let asked = Instant::now();
    let out = Command::new(remus()).args(["move", "--data-dir"]).arg(data).output().expect("remus move");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "remus move: {text} {}", String::from_utf8_lossy(&out.stderr));
    let held_ms = text.split("held still for ").nth(1).and_then(|t| t.split(' ').next()).and_then(|t| t.parse().ok()).expect(&text);
    (asked, held_ms)
}

/// A client of the counter service sending one `inc` after another on
/// one connection, checking that the values run on by one.
struct Client {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Duration)>>,
}

impl Client {
    fn start() -> Self {
        let mut conn = BufReader::new(connect(7000, Duration::from_secs(60)));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut took = Vec::new();
            let mut last = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                conn.get_mut().write_all(b"inc\n").unwrap();
                let mut r = String::new();
                conn.read_line(&mut r).unwrap();
                let n: u64 = r.trim().parse().expect("counter reply");
                assert_eq!(n, last + 1, "a request lost or repeated");
                last = n;
                took.push((t, t.elapsed()));
            }
            took
        });
        Self { stop, thread }
    }

    /// Stops it: its slowest request, and its median one before `since`.
    fn stop(self, since: Instant) -> (Duration, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let took = self.thread.join().unwrap();
        let mut before: Vec<Duration> = took.iter().filter(|(t, _)| *t < since).map(|(_, d)| *d).collect();
        before.sort_unstable();
        (took.iter().map(|(_, d)| *d).max().unwrap(), before[before.len() / 2])
    }
}

/// A planned move to a backup that protects the guest again at once
/// (`--reverse-to` a third backup, through a relay adding `rtt_ms`): when
/// the guest is protected again, and what the client waited.
struct Reverse {
    /// `remus move` asked to the backup's line that the new primary runs.
    handed: Duration,
    /// ... to the third backup's commit of the new primary's first epoch.
    protected: Duration,
    /// What remus-relay did on the way to the third backup.
    relayed: String,
    slowest: Duration,
    typical: Duration,
    /// The new primary's summary lines on epoch length and commit latency.
    said: Vec<String>,
}

fn protected_again(kernel: &Path, initrd: &Path, data: &Path, work: &Path, rtt_ms: u64) -> Reverse {
    let (far, far_addr) = backup(data, &[]);
    let (relay, via) = relay(&far_addr, rtt_ms);
    let fo = work.join(format!("reverse-{rtt_ms}"));
    // The new primary's encoding threads (REMUS_BENCH_QEMU_ENCODE_THREADS,
    // default: the machine's), through the config it inherits.
    let config = work.join(format!("reverse-{rtt_ms}.toml"));
    let threads = std::env::var("REMUS_BENCH_QEMU_ENCODE_THREADS").map_or(String::new(), |n| format!("encode-threads = {n}\n"));
    std::fs::write(&config, format!("[protect]\n{threads}")).expect("config");
    let args = ["--failover-dir", fo.to_str().unwrap(), "--resume", "--tap", "tap-b", "--reverse-to", &via];
    let (near, addr) = backup_with(Some(&config), data, &args);
    let (mut primary, run_dir) = ready_primary(kernel, initrd, (128, 40), data, &addr, &format!("reverse-{rtt_ms}"));
    let client = Client::start();
    std::thread::sleep(Duration::from_secs(2));
    let asked_wall = std::time::SystemTime::now();
    let (asked, _) = remus_move(data);
    let (handed, line) = near.wait_lines(&["failover guest-1"], Duration::from_secs(30)).remove(0);
    let pid = line.split("remus pid ").nth(1).and_then(|p| p.split(',').next()).expect(&line).to_string();
    let log = line.split("(log ").nth(1).map(|l| PathBuf::from(l.trim_end_matches(')'))).expect(&line);
    // The new primary says when it is protected, in its log (the third
    // backup's first line for the guest is the graft, "continuing").
    let protected = protected_in_log(&log, asked_wall, Duration::from_secs(120));
    let _ = primary.child.wait();
    std::thread::sleep(Duration::from_secs(2));
    let (slowest, typical) = client.stop(asked);
    // The new primary runs apart from the backup that started it (its own
    // process group, with its QEMU): stop it.
    let _ = Command::new("kill").arg(&pid).status();
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // What the new primary said (its summary: commit latency, epochs).
    let said = std::fs::read_to_string(&log)
        .map(|t| t.lines().filter(|l| l.starts_with("commit latency") || l.starts_with("epoch length")).map(str::to_string).collect())
        .unwrap_or_default();
    let relayed = format!("{}; kernel drops at the relay {:?}", relay.counters(remus_relay::Direction::Up), relay.kernel_drops());
    drop(far);
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_dir_all(&fo);
    Reverse { handed: handed.duration_since(asked), protected, relayed, slowest, typical, said }
}

/// Failback through a round trip of `rtt_ms`: B and C (at the first
/// host's site) each protect a guest that arrives, replicating to the
/// other through remus-relay. The guest moves A -> B (C holds nothing of
/// it), then back B -> C (B holds it as of the first move), under a
/// client: for each move, the time until the new primary is protected
/// (its backup committed its whole memory) and how many of its pages that
/// backup told it it held.
fn failback(kernel: &Path, initrd: &Path, data: &Path, work: &Path, rtt_ms: u64) -> [(Duration, u64); 2] {
    // Fixed ports (this process's private namespace): each names the other.
    let (b, c) = ("127.0.0.1:7411", "127.0.0.1:7412");
    let (_to_c, via_c) = relay(c, rtt_ms);
    let (_to_b, via_b) = relay(b, rtt_ms);
    let (fo_b, fo_c) = (work.join(format!("failback-b-{rtt_ms}")), work.join(format!("failback-c-{rtt_ms}")));
    let site = |fo: &Path, tap: &str, listen: &str, to: &str| {
        backup_at(None, data, listen, &["--failover-dir", fo.to_str().unwrap(), "--resume", "--tap", tap, "--reverse-to", to]).0
    };
    let near = site(&fo_b, "tap-b", b, &via_c);
    let far = site(&fo_c, "tap-c", c, &via_b);
    let (mut primary, run_dir) = ready_primary(kernel, initrd, (128, 40), data, b, &format!("failback-{rtt_ms}"));
    let client = Client::start();
    let mut pids = Vec::new();
    let mut out = [(Duration::ZERO, 0); 2];
    for (i, taker) in [&near, &far].into_iter().enumerate() {
        std::thread::sleep(Duration::from_secs(2));
        let wall = std::time::SystemTime::now();
        remus_move(data);
        let (_, line) = taker.wait_lines(&["failover guest-1"], Duration::from_secs(30)).remove(0);
        pids.push(line.split("remus pid ").nth(1).and_then(|p| p.split(',').next()).expect(&line).to_string());
        let log = line.split("(log ").nth(1).map(|l| PathBuf::from(l.trim_end_matches(')'))).expect(&line);
        let protected = protected_in_log(&log, wall, Duration::from_secs(120));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let held = text
            .lines()
            .find(|l| l.contains("the backup holds these of the guest's pages already"))
            .and_then(|l| l.split("chunks=").nth(1))
            .and_then(|n| n.split_whitespace().next())
            .map_or(0, |n| n.parse().expect(&line));
        out[i] = (protected, held);
        if i == 0 {
            let _ = primary.child.wait();
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    client.stop(Instant::now());
    // The last new primary runs apart from the backup that started it.
    for pid in &pids {
        let _ = Command::new("kill").arg(pid).status();
    }
    for pid in &pids {
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop((near, far));
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_dir_all(&fo_b);
    let _ = std::fs::remove_dir_all(&fo_c);
    out
}

/// Waits for the line of `log` saying the primary is protected; the time
/// from `since` to it, by the log's timestamp (UTC, the same clock).
fn protected_in_log(log: &Path, since: std::time::SystemTime, limit: Duration) -> Duration {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("protected: the backup committed")) {
            // "2026-12-03T12:10:11.123456Z  INFO ...": seconds into the day.
            let clock = l.split('T').nth(1).and_then(|t| t.split('Z').next()).expect(l);
            let mut parts = clock.split(':').map(|p| p.parse::<f64>().expect(l));
            let (h, m, s) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            let at = h * 3600.0 + m * 60.0 + s;
            let from = since.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() % 86_400.0;
            return Duration::from_secs_f64((at - from).max(0.0));
        }
        assert!(Instant::now() < deadline, "{}: never protected:\n{text}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asks `get` on a new connection: true when the guest replied.
fn get_reply(s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = BufReader::new(s);
    c.get_mut().write_all(b"get\n").unwrap();
    let mut r = String::new();
    c.read_line(&mut r).is_ok_and(|n| n > 0)
}

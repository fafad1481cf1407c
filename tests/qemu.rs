//! A real QEMU guest protected end to end: a counter service inside the
//! guest, a client in a network namespace the test creates, the primary
//! (remus and its QEMU) killed with SIGKILL under load, and the backup
//! resuming the guest from its last committed epoch. The client's TCP
//! connection carries on; every value it was told is still there, none
//! is repeated or lost, and the guest's memory and disk agree.
//!
//! With a witness (the S3 server of scripts/test.sh), a primary cut off
//! from both its backup and the witness holds its guest still; the backup
//! takes the guest over once the lease runs out, and the client, talking to
//! whichever side answers, sees one history of counter values.
//!
//! Needs root (network namespaces, TAP devices), QEMU and the test guest:
//! `scripts/test.sh` installs and builds them (scripts/qemu-deps.sh,
//! guest/build.sh) before running this.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::gate::TcpGate;
use common::{keygen, remus, remus_restore, run_limited, BackupProcess};
use remus_relay::{Impairment, Relay, RelayConfig};

/// A network namespace with a bridge (10.0.2.1/24, the guest is .15) and
/// three persistent TAPs on it: the primary's, the backup's and a second
/// backup's.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        let name = format!("remus-t{}", std::process::id());
        let ns = Self { name };
        sh(&["ip", "netns", "add", &ns.name]);
        for cmd in common::guest::BRIDGE_AND_TAPS {
            let mut args = vec!["ip", "netns", "exec", &ns.name];
            args.extend(cmd.split(' '));
            sh(&args);
        }
        ns
    }

    /// A command run inside the namespace.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` inside the namespace: the calling thread joins it (a socket
    /// stays in the namespace it was made in, threads start in their
    /// creator's), then returns to the test's own.
    fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let own = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = std::fs::File::open(format!("/var/run/netns/{}", self.name)).expect("test netns");
        remus_sys::enter_net_namespace(&target).expect("entering the test namespace");
        let out = f();
        remus_sys::enter_net_namespace(&own).expect("back to our own namespace");
        out
    }

    /// Connects to `addr` from inside the namespace.
    fn connect(&self, addr: &str, limit: Duration) -> TcpStream {
        let stream = self.enter(|| {
            let deadline = Instant::now() + limit;
            loop {
                match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
                    Ok(s) => break Ok(s),
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => break Err(e),
                }
            }
        });
        stream.unwrap_or_else(|e| panic!("connecting to {addr} in the test namespace: {e}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One request on the counter connection.
fn request(conn: &mut BufReader<TcpStream>, line: &str) -> String {
    conn.get_mut().write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut reply = String::new();
    conn.read_line(&mut reply).expect("reply");
    assert!(!reply.is_empty(), "connection closed on {line:?}");
    reply.trim().to_string()
}

/// A child process killed when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the file at `path` has a line containing `needle`, and
/// returns that line.
fn wait_for_file_line(path: &Path, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(line) = std::fs::read_to_string(path).ok().and_then(|s| s.lines().find(|l| l.contains(needle)).map(str::to_owned)) {
            return line;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{} never showed {needle:?}: {}", path.display(), std::fs::read_to_string(path).unwrap_or_default());
}

/// The tests of this file each run a QEMU guest under TCG; one at a time,
/// so that two guests do not starve each other on a small machine.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn counter_service_survives_sigkill_of_the_primary() {
    let _one = ONE_GUEST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (kernel, initrd) = common::guest::guest_image();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    keygen(&data);
    let ns = Netns::create();
    // Silence on a loaded 2-core machine running two TCG guests' worth of
    // work can exceed the default 500 ms: a false failover would fence a
    // live primary, so the test allows 2 s.
    let cfg = dir.path().join("remus.toml");
    std::fs::write(&cfg, "[backup]\nprimary-timeout-ms = 2000\n").unwrap();
    let failover = dir.path().join("failover");
    let mut bcmd = ns.command(&remus());
    bcmd.arg("--config")
        .arg(&cfg)
        .args(["backup", "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--failover-dir"])
        .arg(&failover)
        .args(["--resume", "--tap", "tap-b"]);
    let backup = BackupProcess::spawn(bcmd);
    let run_dir = PathBuf::from(format!("/dev/shm/remus-test-{}", std::process::id()));
    let mut pcmd = ns.command(&remus());
    pcmd.args(["protect", "qemu", "--data-dir"])
        .arg(&data)
        .args(["--backup", &backup.addr, "--tap", "tap-p", "--memory-mib", "128", "--disk-mib", "16", "--hz", "40"])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--run-dir")
        .arg(&run_dir)
        .args(["--tracking", "write-protect"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut primary = KillOnDrop(pcmd.spawn().expect("spawn primary"));
    wait_for_file_line(&run_dir.join("serial.log"), "remus-guest ready", Duration::from_secs(120));

    let mut conn = BufReader::new(ns.connect("10.0.2.15:7000", Duration::from_secs(60)));
    conn.get_ref().set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let mut seen = Vec::new();
    for _ in 0..25 {
        seen.push(request(&mut conn, "inc").parse::<u64>().expect("a number"));
    }
    // Under load: the next request is on the wire when the primary dies.
    conn.get_mut().write_all(b"inc\n").unwrap();
    let killed_at = Instant::now();
    primary.0.kill().expect("SIGKILL the primary");
    primary.0.wait().unwrap();
    let mut reply = String::new();
    conn.read_line(&mut reply).expect("reply after failover");
    let failover_time = killed_at.elapsed();
    seen.push(reply.trim().parse().expect("a number"));
    for _ in 0..10 {
        seen.push(request(&mut conn, "inc").parse::<u64>().expect("a number"));
    }
    let expected: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(seen, expected, "values the client received must be consecutive from 1: none lost, none repeated");
    let last = *seen.last().unwrap();
    assert_eq!(request(&mut conn, "get"), format!("{last} {last}"), "memory and disk agree with what the client was told");
    let line = backup.wait_line("failover guest-1 epoch ", Duration::from_secs(5));
    assert!(line.contains("resumed in qemu pid"), "{line}");
    assert!(line.contains("from the live image"), "the backup kept the guest's files current: {line}");
    eprintln!("failover: {line}; first reply {failover_time:?} after SIGKILL");

    // The primary's QEMU died with it (a failed host takes its guest along).
    let stale = Command::new("pgrep").args(["-f", &run_dir.join("qmp.sock").to_string_lossy()]).output().unwrap();
    assert!(stale.stdout.is_empty(), "the primary's QEMU outlived it: {}", String::from_utf8_lossy(&stale.stdout));
    let _ = std::fs::remove_dir_all(&run_dir);

    // A new connection reaches the resumed guest too.
    let mut second = BufReader::new(ns.connect("10.0.2.15:7000", Duration::from_secs(10)));
    second.get_ref().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(request(&mut second, "inc"), (last + 1).to_string());
    drop(backup);

    // Time travel: the history has the guest's files at an early epoch.
    let to = dir.path().join("epoch-1");
    let out = run_limited(
        Command::new(remus_restore()).args(["--data-dir"]).arg(&data).args(["--epoch", "1", "--to"]).arg(&to),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    for f in ["memory", "disk.img", "vmstate", "machine.json"] {
        assert!(to.join(f).is_file(), "{f} restored");
    }
    assert_eq!(std::fs::metadata(to.join("memory")).unwrap().len(), 128 << 20);
    assert_eq!(std::fs::metadata(to.join("disk.img")).unwrap().len(), 16 << 20);

    // A host that trusts other guest images does not start it.
    let strict = dir.path().join("strict.toml");
    std::fs::write(&strict, "[backup]\nqemu-images = [\"/nonexistent-images\"]\n").unwrap();
    let out = run_limited(
        Command::new(remus_restore())
            .args(["--data-dir"])
            .arg(&data)
            .args(["--epoch", "40", "--run", "--config"])
            .arg(&strict)
            .arg("--to")
            .arg(dir.path().join("untrusted")),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("outside the guest images this host trusts"), "{err}");
    // ... and runs it, paused, for inspection over QMP and gdb.
    let at = dir.path().join("epoch-40");
    let gdb_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut run = KillOnDrop(
        Command::new(remus_restore())
            .args(["--data-dir"])
            .arg(&data)
            .args(["--epoch", "40", "--run", "--gdb", &gdb_port.to_string(), "--to"])
            .arg(&at)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(run.0.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("paused in qemu") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "remus-restore --run ended early");
    }
    assert!(line.trim_end().ends_with(&format!("; gdb 127.0.0.1:{gdb_port}")), "{line}");
    let qmp = line.split("qmp ").nth(1).unwrap().split(';').next().unwrap().trim().to_string();
    assert!(line.starts_with("guest 1 epoch 40 paused in qemu pid"), "{line}");
    assert_eq!(qmp_status(Path::new(&qmp)), "paused");
    // gdb on the stub reads guest-physical memory as the epoch has it
    // (and continues the guest when it detaches).
    let memory = std::fs::read(at.join("memory")).unwrap();
    let addr = busy_page(&memory);
    let stub = format!("target remote 127.0.0.1:{gdb_port}");
    let (text, read) = gdb_bytes(&[&stub, "info registers rip", "info registers rsp", "maint packet Qqemu.PhyMemMode:1"], addr);
    let live = (register(&text, "rip"), register(&text, "rsp"));
    assert_eq!(read, memory[addr..addr + 8], "gdb reads the epoch's memory at {addr:#x}");
    drop(run);
    drop(out);
    // The same epoch as an ELF core carries the vCPU's registers (read by
    // remus from the device state): gdb finds in it what QEMU, loading that
    // device state itself, showed, and the same memory.
    let core40 = dir.path().join("epoch-40.core");
    let out = run_limited(
        Command::new(remus_restore()).args(["--data-dir"]).arg(&data).args(["--epoch", "40", "--format", "elf-core", "--to"]).arg(&core40),
        Duration::from_secs(60),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("; registers of 1 vCPU(s)"), "{said} {}", String::from_utf8_lossy(&out.stderr));
    let (text, read) = gdb_bytes(&[&format!("core-file {}", core40.display()), "info registers rip", "info registers rsp"], addr);
    assert_eq!((register(&text, "rip"), register(&text, "rsp")), live, "the core's registers are QEMU's: {text}");
    assert_eq!(read, memory[addr..addr + 8], "gdb reads the core at guest-physical {addr:#x}");

    // The last committed epoch, brought back lazily: QEMU starts at once on
    // the epoch's files mounted from the store, and the guest serves the
    // counter from that epoch's state.
    let mnt = dir.path().join("latest-mnt");
    let lazy_run = dir.path().join("latest-run");
    let mut lazy = KillOnDrop(
        ns.command(&remus_restore())
            .args(["--data-dir"])
            .arg(&data)
            .args(["--latest", "--run", "--start", "--tap", "tap-b", "--mount"])
            .arg(&mnt)
            .arg("--to")
            .arg(&lazy_run)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(lazy.0.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("running in qemu") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "remus-restore --mount --run ended early");
    }
    assert!(line.starts_with("guest 1 epoch ") && line.contains("its files mounted at"), "{line}");
    let mut conn = BufReader::new(ns.connect("10.0.2.15:7000", Duration::from_secs(60)));
    conn.get_ref().set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let got = request(&mut conn, "get");
    let (mem, disk) = got.split_once(' ').expect("MEM DISK");
    assert_eq!(mem, disk, "memory and disk of the restored epoch agree");
    let n: u64 = mem.parse().unwrap();
    // Output commit: the 25 replies before the kill were released only
    // once their epochs were committed, so the last epoch holds them all.
    assert!((25..=26).contains(&n), "the last committed epoch holds counter {n}");
    assert_eq!(request(&mut conn, "inc"), (n + 1).to_string());
    // Nothing the guest did reached the mounted epoch: its files read as
    // a full restore of the same epoch writes them (seen from the mount
    // namespace `ip netns exec` gave remus-restore).
    let full = dir.path().join("latest-full");
    let out_full = run_limited(
        Command::new(remus_restore()).args(["--data-dir"]).arg(&data).args(["--latest", "--to"]).arg(&full),
        Duration::from_secs(60),
    );
    assert!(out_full.status.success(), "restore: {}", String::from_utf8_lossy(&out_full.stderr));
    let seen = PathBuf::from(format!("/proc/{}/root{}", lazy.0.id(), mnt.display()));
    for f in ["memory", "disk.img", "vmstate", "machine.json"] {
        assert!(std::fs::read(seen.join(f)).unwrap() == std::fs::read(full.join(f)).unwrap(), "mounted {f} differs from the restored one");
    }
    // The same epoch as an ELF core: one range of guest RAM at guest-physical
    // 0 (the guest has less than 2816 MiB), byte for byte the memory QEMU
    // resumes from; disk and device state stay out.
    let core = dir.path().join("latest.core");
    let out = run_limited(
        Command::new(remus_restore()).args(["--data-dir"]).arg(&data).args(["--latest", "--format", "elf-core", "--to"]).arg(&core),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    let listing = run_limited(Command::new("readelf").arg("-lW").arg(&core), Duration::from_secs(30));
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let loads: Vec<Vec<&str>> =
        listing.lines().map(str::split_whitespace).map(Iterator::collect).filter(|f: &Vec<&str>| f.first() == Some(&"LOAD")).collect();
    // The same RAM a second time at the kernel image's virtual addresses.
    assert_eq!(loads.len(), 2, "{listing}");
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let (offset, paddr, size) = (hex(loads[0][1]), hex(loads[0][3]), hex(loads[0][4]));
    let memory = std::fs::read(full.join("memory")).unwrap();
    assert_eq!((paddr, size), (0, memory.len() as u64), "{listing}");
    assert!(hex(loads[1][2]) >= 0xffff_ffff_8000_0000 && hex(loads[1][1]) >= offset, "{listing}");
    // gdb reads a busy page of it at its guest-physical address.
    let addr = busy_page(&memory);
    let (_, read) = gdb_bytes(&[&format!("core-file {}", core.display())], addr);
    assert_eq!(read, memory[addr..addr + 8], "gdb reads the core at guest-physical {addr:#x}");
    // `crash` opens it with the guest kernel's vmlinux alone: the core
    // carries the kernel's own VMCOREINFO note (release, KASLR offset).
    let release = kernel.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("kernel {release}'s VMCOREINFO kept")), "{said}");
    let commands = dir.path().join("crash-commands");
    std::fs::write(&commands, "sys\nlog\nq\n").unwrap();
    let crash = run_limited(
        Command::new("crash").arg("-s").arg("-i").arg(&commands).arg(common::guest::vmlinux()).arg(&core).stdin(Stdio::null()),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&crash.stdout);
    assert!(crash.status.success(), "crash: {text} {}", String::from_utf8_lossy(&crash.stderr));
    assert!(text.lines().any(|l| l.trim() == format!("RELEASE: {release}")), "crash sys: {text}");
    assert!(text.contains(&format!("Linux version {release}")), "crash log shows the guest's boot: {text}");
    // gdb, given the kernel's symbols moved by its KASLR offset (from the
    // note), reads the kernel's variables through the image mapping the
    // core adds beside guest-physical memory.
    let bytes = std::fs::read(&core).unwrap();
    let at = bytes.windows(13).position(|w| w == b"KERNELOFFSET=").expect("KERNELOFFSET in the core's VMCOREINFO") + 13;
    let kaslr: String = bytes[at..].iter().take_while(|b| b.is_ascii_hexdigit()).map(|&b| char::from(b)).collect();
    let mut gdb = Command::new("gdb");
    gdb.args(["-nx", "-batch", "-ex"])
        .arg(format!("add-symbol-file {} -o 0x{kaslr}", common::guest::vmlinux().display()))
        .arg("-ex")
        .arg(format!("core-file {}", core.display()))
        .args(["-ex", "p init_uts_ns.name.release"]);
    let out = run_limited(&mut gdb, Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("= \"{release}\"")), "gdb reads the kernel's release by its symbol: {text}");
    let core = std::fs::read(&core).unwrap();
    assert!(core[offset as usize..][..memory.len()] == memory[..], "the core's RAM is the restored memory");
    drop(conn);
    drop(lazy);
}

#[test]
fn a_guest_cut_off_from_backup_and_witness_fails_over_once_and_its_client_sees_one_history() {
    let _one = ONE_GUEST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (kernel, initrd) = common::guest::guest_image();
    let endpoint = std::env::var("REMUS_TEST_S3_ENDPOINT").expect("REMUS_TEST_S3_ENDPOINT: run scripts/test.sh, which starts moto_server");
    let moto = endpoint.trim_start_matches("http://").to_string();
    let bucket = format!("qemu-witness-{}", std::process::id());
    let mut s3 = remus_store::s3::S3Config::new(&bucket, "");
    s3.endpoint = Some(endpoint.clone());
    s3.region = Some("us-east-1".into());
    (s3.access_key_id, s3.secret_access_key) = (Some("test".into()), Some("test".into()));
    remus_store::s3::S3Client::new(&s3).unwrap().create_bucket(false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    keygen(&data);
    let ns = Netns::create();
    // The witness from inside the namespace: two gates listening there and
    // connecting out from the test's own; the primary's is cut below.
    let (for_backup, for_primary) =
        ns.enter(|| (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), std::net::TcpListener::bind("127.0.0.1:0").unwrap()));
    let (gate_b, gate_p) = (TcpGate::on(for_backup, &moto), TcpGate::on(for_primary, &moto));
    // Timeouts and lease for a loaded 2-core machine running TCG guests.
    let cfg = dir.path().join("remus.toml");
    std::fs::write(
        &cfg,
        format!(
            "[backup]\nprimary-timeout-ms = 2000\n\n[protect]\nbackup-timeout-ms = 2000\n\n[witness]\nurl = \"s3://{bucket}/leases\"\nlease-ms = 1000\n"
        ),
    )
    .unwrap();
    let s3_env = |c: &mut Command, url: String| {
        c.env("AWS_ENDPOINT_URL", url).env("AWS_ACCESS_KEY_ID", "test").env("AWS_SECRET_ACCESS_KEY", "test").env("AWS_REGION", "us-east-1");
    };
    let failover = dir.path().join("failover");
    let mut bcmd = ns.command(&remus());
    bcmd.arg("--config").arg(&cfg).args(["backup", "--data-dir"]).arg(&data).args(["--listen", "127.0.0.1:0", "--failover-dir"]);
    bcmd.arg(&failover).args(["--resume", "--tap", "tap-b", "--node", "site-b"]);
    s3_env(&mut bcmd, gate_b.url());
    let backup = BackupProcess::spawn(bcmd);
    // The link between them through a relay in the namespace, to cut.
    let relay = ns.enter(|| Relay::start(&RelayConfig::symmetric(backup.addr.parse().unwrap(), Impairment::default(), 3)).unwrap());
    let run_dir = PathBuf::from(format!("/dev/shm/remus-test-w{}", std::process::id()));
    let log = dir.path().join("primary.log");
    let mut pcmd = ns.command(&remus());
    pcmd.arg("--config").arg(&cfg).args(["protect", "qemu", "--data-dir"]).arg(&data);
    pcmd.args(["--backup", &relay.local_addr().to_string(), "--tap", "tap-p", "--memory-mib", "128", "--disk-mib", "16"]);
    pcmd.arg("--kernel").arg(&kernel).arg("--initrd").arg(&initrd).arg("--run-dir").arg(&run_dir);
    pcmd.args(["--tracking", "write-protect", "--node", "site-a"]).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
    s3_env(&mut pcmd, gate_p.url());
    let mut primary = KillOnDrop(pcmd.spawn().expect("spawn primary"));
    wait_for_file_line(&run_dir.join("serial.log"), "remus-guest ready", Duration::from_secs(120));

    let mut conn = BufReader::new(ns.connect("10.0.2.15:7000", Duration::from_secs(60)));
    conn.get_ref().set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let mut seen = Vec::new();
    for _ in 0..25 {
        seen.push(request(&mut conn, "inc").parse::<u64>().expect("a number"));
    }
    // The primary's site is cut off, from its backup and from the witness,
    // with a request on the wire: the primary's guest may answer it, but
    // the answer is never released; the backup's resumed guest answers.
    relay.set_partitioned(true);
    gate_p.set_cut(true);
    conn.get_mut().write_all(b"inc\n").unwrap();
    let mut reply = String::new();
    conn.read_line(&mut reply).expect("reply after failover");
    seen.push(reply.trim().parse().expect("a number"));
    for _ in 0..10 {
        seen.push(request(&mut conn, "inc").parse::<u64>().expect("a number"));
    }
    let expected: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(seen, expected, "values the client received must be consecutive from 1: none lost, none repeated");
    let last = *seen.last().unwrap();
    assert_eq!(request(&mut conn, "get"), format!("{last} {last}"), "memory and disk agree with what the client was told");
    backup.wait_line("lease guest-1 generation 2 taken by site-b", Duration::from_secs(5));
    let line = backup.wait_line("failover guest-1 epoch ", Duration::from_secs(5));
    assert!(line.contains("resumed in qemu pid"), "{line}");

    // The witness comes back for the old primary (its link stays cut): it
    // learns it was taken over and stops, its guest never having run on.
    gate_p.set_cut(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = primary.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the old primary did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("self-fenced"), "it held its guest while cut off: {text}");
    assert!(text.contains("was taken over by site-b in generation 2"), "{text}");
    let stale = Command::new("pgrep").args(["-f", &run_dir.join("qmp.sock").to_string_lossy()]).output().unwrap();
    assert!(stale.stdout.is_empty(), "the old primary's QEMU outlived it");
    let _ = std::fs::remove_dir_all(&run_dir);
    assert_eq!(request(&mut conn, "inc"), (last + 1).to_string(), "the resumed guest serves on");
    drop(relay);
}

/// Three sites on the namespace's bridge: a primary (QEMU on tap-p)
/// replicating to B (tap-b), which protects a guest it takes over again
/// (`--reverse-to`), replicating to C (tap-c), which does the same
/// towards B; and a client connected to the guest's counter service.
/// Fields drop in order: the namespace last.
struct ThreeSites {
    conn: BufReader<TcpStream>,
    primary: KillOnDrop,
    near: BackupProcess,
    far: BackupProcess,
    run_dir: PathBuf,
    data: PathBuf,
    ns: Netns,
}

impl ThreeSites {
    /// Starts them under `dir`, with `extra` appended to the shared config.
    fn start(dir: &Path, tag: &str, extra: &str) -> Self {
        let (kernel, initrd) = common::guest::guest_image();
        let data = dir.join("data");
        keygen(&data);
        let ns = Netns::create();
        let cfg = dir.join("remus.toml");
        std::fs::write(&cfg, format!("[backup]\nprimary-timeout-ms = 2000\n\n[protect]\nbackup-timeout-ms = 2000\n\n{extra}")).unwrap();
        let backup = |store: &str, failover: &str, tap: &str, listen: &str, reverse_to: &str| {
            let mut c = ns.command(&remus());
            c.arg("--config").arg(&cfg).args(["backup", "--data-dir"]).arg(&data).arg("--store").arg(data.join(store));
            c.args(["--listen", listen, "--failover-dir"]).arg(dir.join(failover)).args(["--resume", "--tap", tap]);
            c.args(["--reverse-to", reverse_to]);
            BackupProcess::spawn(c)
        };
        // Each protects a guest that arrives again, replicating to the
        // other: B and C are two sites, the first host at C's (ports fixed
        // in the namespace this test made, so each can name the other).
        let (b, c) = ("127.0.0.1:7401", "127.0.0.1:7402");
        let far = backup("store-c", "failover-c", "tap-c", c, b);
        let near = backup("store-b", "failover-b", "tap-b", b, c);
        let run_dir = PathBuf::from(format!("/dev/shm/remus-test-{tag}{}", std::process::id()));
        let mut pcmd = ns.command(&remus());
        pcmd.arg("--config").arg(&cfg).args(["protect", "qemu", "--data-dir"]).arg(&data);
        pcmd.args(["--backup", &near.addr, "--tap", "tap-p", "--memory-mib", "128", "--disk-mib", "16"]);
        pcmd.arg("--kernel").arg(&kernel).arg("--initrd").arg(&initrd).arg("--run-dir").arg(&run_dir);
        pcmd.args(["--tracking", "write-protect"]).stdout(Stdio::null()).stderr(Stdio::inherit());
        let primary = KillOnDrop(pcmd.spawn().expect("spawn primary"));
        wait_for_file_line(&run_dir.join("serial.log"), "remus-guest ready", Duration::from_secs(120));
        let conn = BufReader::new(ns.connect("10.0.2.15:7000", Duration::from_secs(60)));
        conn.get_ref().set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Self { conn, primary, near, far, run_dir, data, ns }
    }
}

#[test]
fn a_failed_over_guest_is_protected_again_and_survives_a_second_failover() {
    let _one = ONE_GUEST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    // C is where the guest replicates once it failed over to B, and where
    // it fails over the second time.
    let ThreeSites { mut conn, mut primary, near, far, run_dir, data, ns: _ns } = ThreeSites::start(dir.path(), "r", "");
    let mut seen = Vec::new();
    for _ in 0..25 {
        seen.push(request(&mut conn, "inc").parse::<u64>().expect("a number"));
    }
    // The first host dies with a request on the wire.
    conn.get_mut().write_all(b"inc\n").unwrap();
    primary.0.kill().expect("SIGKILL the primary");
    primary.0.wait().unwrap();
    let mut reply = String::new();
    conn.read_line(&mut reply).expect("reply after the first failover");
    seen.push(reply.trim().parse().expect("a number"));
    let line = near.wait_line("failover guest-1 epoch ", Duration::from_secs(30));
    let pid = protected_again_by(&line);
    let handed: u64 = line.split_whitespace().nth(3).and_then(|e| e.parse().ok()).expect("the failover epoch");
    // The guest now runs protected at B, replicating to C: each reply it
    // gives is released only once C committed it.
    for _ in 0..10 {
        seen.push(request(&mut conn, "inc").parse::<u64>().expect("a number"));
    }
    // C first records where the history it continues left off (nothing of
    // the memory yet), then commits the new host's epochs after it.
    let graft = far.wait_line("continuing guest-1 after epoch ", Duration::from_secs(60));
    let after: u64 = graft.split_whitespace().nth(4).and_then(|e| e.parse().ok()).expect(&graft);
    assert!(after >= handed, "{graft}: the history continues from the failover epoch {handed} on");
    far.wait_committed(1, after + 1, Duration::from_secs(60));
    // The new host dies too, under load.
    conn.get_mut().write_all(b"inc\n").unwrap();
    sh(&["kill", "-9", &pid.to_string()]);
    let mut reply = String::new();
    conn.read_line(&mut reply).expect("reply after the second failover");
    seen.push(reply.trim().parse().expect("a number"));
    let line = far.wait_line("failover guest-1 epoch ", Duration::from_secs(30));
    // Protected again at once, by B, which it failed over from before: B
    // takes its history up again after the epoch C resumed it from.
    let third = KillPidOnDrop(protected_again_by(&line));
    let second: u64 = line.split_whitespace().nth(3).and_then(|e| e.parse().ok()).expect("the failover epoch");
    for _ in 0..10 {
        seen.push(request(&mut conn, "inc").parse::<u64>().expect("a number"));
    }
    let graft = near.wait_line("continuing guest-1 after epoch ", Duration::from_secs(60));
    let after: u64 = graft.split_whitespace().nth(4).and_then(|e| e.parse().ok()).expect(&graft);
    assert!(after >= second, "{graft}: B's history goes on from C's failover epoch {second} on");
    near.wait_committed(1, after + 1, Duration::from_secs(60));
    for _ in 0..5 {
        seen.push(request(&mut conn, "inc").parse::<u64>().expect("a number"));
    }
    let expected: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(seen, expected, "across two failovers the client's values run on from 1: none lost, none repeated");
    let last = *seen.last().unwrap();
    assert_eq!(request(&mut conn, "get"), format!("{last} {last}"), "memory and disk agree with what the client was told");
    let _ = std::fs::remove_dir_all(&run_dir);
    // C's history of the guest continues B's chain: its first epoch is the
    // one after the failover epoch, naming B's manifest of it as parent,
    // and it verifies.
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = run_limited(Command::new(remus()).args(args).arg("--data-dir").arg(&data), Duration::from_secs(60));
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let store = |name: &str| data.join(name).to_string_lossy().into_owned();
    let at_c = json(&["log", "--json", "--store", &store("store-c")]);
    assert_eq!(at_c[0]["epoch"].as_u64(), Some(handed + 1), "C continues after the epoch B resumed from");
    let at_b = json(&["show", &handed.to_string(), "--json", "--store", &store("store-b")]);
    assert_eq!(at_c[0]["parent"], at_b[0]["manifest"], "one chain across both backups");
    json(&["verify", "--json", "--store", &store("store-c")]);
    // B holds the guest's history up to the first failover and again
    // after the second, one chain through C's epochs between, and it
    // verifies; its epochs before the guest left are still restorable.
    let at_b = json(&["log", "--json", "--store", &store("store-b")]);
    let epochs: Vec<u64> = at_b.iter().map(|m| m["epoch"].as_u64().unwrap()).collect();
    let back = epochs.iter().position(|e| *e > handed).expect("B committed epochs after the guest came back");
    assert_eq!(epochs[back], after + 1, "{epochs:?}");
    assert!(epochs[..back].iter().all(|e| *e <= handed), "{epochs:?}");
    let at_c = json(&["show", &after.to_string(), "--json", "--store", &store("store-c")]);
    assert_eq!(at_b[back]["parent"], at_c[0]["manifest"], "B's history goes on from C's epoch");
    json(&["verify", "--json", "--store", &store("store-b")]);
    drop(third);
}

/// The pid of the primary a backup's failover line says protects the
/// guest again.
fn protected_again_by(line: &str) -> u32 {
    assert!(line.contains("protected again by remus pid"), "{line}");
    line.split("remus pid ").nth(1).and_then(|r| r.split(',').next()).and_then(|p| p.parse().ok()).expect(line)
}

/// A process the test did not start itself (a primary a backup started),
/// killed when the test ends, passed or failed.
struct KillPidOnDrop(u32);

impl Drop for KillPidOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-9", &self.0.to_string()]).status();
    }
}

#[test]
fn remus_move_takes_the_guest_there_back_and_there_again_under_client_load_losing_no_request() {
    let _one = ONE_GUEST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    // B and C each protect the guest again once it arrives, replicating
    // to the other.
    let sites = ThreeSites::start(dir.path(), "m", &format!("[hooks]\ncommand = \"cat >> {}\"\n", events.display()));
    let ThreeSites { mut conn, mut primary, near, far, run_dir, data, ns: _ns } = sites;
    // A client that keeps asking, one request after another, timing each.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let client = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            seen.push((request(&mut conn, "inc").parse::<u64>().expect("a number"), t.elapsed()));
        }
        (seen, conn)
    });
    let remus_move = || {
        let out = run_limited(Command::new(remus()).args(["move", "--data-dir"]).arg(&data), Duration::from_secs(120));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && text.starts_with("moved guest-1 at epoch "), "{text} {}", String::from_utf8_lossy(&out.stderr));
        text
    };
    std::thread::sleep(Duration::from_secs(2));
    let first = remus_move();
    assert!(primary.0.wait().unwrap().success(), "the primary that moved its guest ends well");
    let line = near.wait_line("failover guest-1 epoch ", Duration::from_secs(30));
    protected_again_by(&line);
    // The guest runs on at B, protected to C (the first host's site);
    // then it moves back there, and there again: each time protected at
    // once by the site it left, which takes its history up again.
    far.wait_committed(1, 1, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    let second = remus_move();
    let line = far.wait_line("failover guest-1 epoch ", Duration::from_secs(30));
    protected_again_by(&line);
    let graft = near.wait_line("continuing guest-1 after epoch ", Duration::from_secs(60));
    let after: u64 = graft.split_whitespace().nth(4).and_then(|e| e.parse().ok()).expect(&graft);
    near.wait_committed(1, after + 1, Duration::from_secs(120));
    // B still held most of the guest's memory from before it left: the
    // new primary was told, and sent those pages by reference.
    let log = PathBuf::from(line.rsplit("(log ").next().and_then(|l| l.strip_suffix(')')).expect(&line));
    let told = wait_for_file_line(&log, "the backup holds these of the guest's pages already", Duration::from_secs(30));
    let chunks: u64 = told.split("chunks=").nth(1).and_then(|n| n.split_whitespace().next()).and_then(|n| n.parse().ok()).expect(&told);
    assert!(chunks > 100, "{told}");
    std::thread::sleep(Duration::from_secs(2));
    let third = remus_move();
    let line = near.wait_line("failover guest-1 epoch ", Duration::from_secs(30));
    let last_host = KillPidOnDrop(protected_again_by(&line));
    let graft = far.wait_line("continuing guest-1 after epoch ", Duration::from_secs(60));
    let after: u64 = graft.split_whitespace().nth(4).and_then(|e| e.parse().ok()).expect(&graft);
    far.wait_committed(1, after + 1, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (seen, mut conn) = client.join().unwrap();
    let values: Vec<u64> = seen.iter().map(|(v, _)| *v).collect();
    let expected: Vec<u64> = (1..=values.len() as u64).collect();
    assert_eq!(values, expected, "across three moves the client's values run on from 1: none lost, none repeated");
    let last = *values.last().unwrap();
    assert_eq!(request(&mut conn, "get"), format!("{last} {last}"), "memory and disk agree with what the client was told");
    // The pause each move cost the client: its two slowest requests.
    let mut slow: Vec<Duration> = seen.iter().map(|(_, d)| *d).collect();
    slow.sort_unstable();
    eprintln!("move 1: {first}move 2: {second}move 3: {third}slowest requests: {:?} of {} requests", &slow[slow.len() - 4..], values.len());
    let _ = std::fs::remove_dir_all(&run_dir);
    // The hooks heard every move: each a `move` and a `failover` at the
    // epoch the guest was handed over at.
    let heard: Vec<serde_json::Value> =
        std::fs::read_to_string(&events).unwrap().lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect();
    let moves: Vec<u64> = heard.iter().filter(|e| e["event"] == "move").map(|e| e["epoch"].as_u64().unwrap()).collect();
    let failovers: Vec<u64> = heard.iter().filter(|e| e["event"] == "failover").map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(moves.len(), 3, "{heard:?}");
    assert_eq!(moves, failovers, "each move taken over from the epoch handed over");
    // Each new primary's backup continued the history: C from nothing, then
    // B and C each after the epochs the guest ran elsewhere.
    let continued: Vec<(u64, Option<u64>)> = heard
        .iter()
        .filter(|e| e["event"] == "history-continued" && e["role"] == "backup")
        .map(|e| (e["after"].as_u64().unwrap(), e["elsewhere_from"].as_u64()))
        .collect();
    assert_eq!(continued.iter().map(|(a, _)| *a).collect::<Vec<_>>(), moves, "{heard:?}");
    assert!(continued[0].1.is_none() && continued[1..].iter().all(|(a, f)| f.is_some_and(|f| f <= *a)), "{continued:?}");
    drop(last_host);
}

/// The run state of the QEMU behind a QMP socket.
/// The first page above 1 MiB whose first 8 bytes are all non-zero.
fn busy_page(memory: &[u8]) -> usize {
    (0x10_0000..memory.len()).step_by(4096).find(|&a| memory[a..a + 8].iter().all(|&b| b != 0)).expect("a busy page")
}

/// The value of register `name` in gdb's `info registers` output.
fn register(text: &str, name: &str) -> String {
    text.lines()
        .map(str::split_whitespace)
        .find_map(|mut f| (f.next() == Some(name)).then(|| f.next()).flatten())
        .unwrap_or_else(|| panic!("gdb printed no {name}: {text}"))
        .to_string()
}

/// Runs `gdb -batch` with `commands`, then reads 8 bytes at `addr`:
/// everything it printed, and those bytes.
fn gdb_bytes(commands: &[&str], addr: usize) -> (String, Vec<u8>) {
    let mut cmd = Command::new("gdb");
    cmd.args(["-nx", "-batch"]);
    for c in commands.iter().copied().chain([format!("x/8xb {addr:#x}").as_str()]) {
        cmd.args(["-ex", c]);
    }
    let out = run_limited(&mut cmd, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.starts_with(&format!("{addr:#x}"))).unwrap_or_else(|| panic!("gdb: {text}"));
    let read = line.split('\t').skip(1).map(|b| u8::from_str_radix(b.trim().trim_start_matches("0x"), 16).unwrap()).collect();
    (text, read)
}

fn qmp_status(path: &Path) -> String {
    let s = std::os::unix::net::UnixStream::connect(path).expect("qmp socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n").unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(st) = v["return"]["status"].as_str() {
            return st.to_string();
        }
    }
}

/// Both dirty-page trackers capture a booting guest exactly: after a clean
/// stop (whose last epoch holds the guest still), the restored memory and
/// disk equal QEMU's own files byte for byte.
#[test]
fn both_trackers_capture_the_guest_exactly() {
    let _one = ONE_GUEST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (kernel, initrd) = common::guest::guest_image();
    for tracking in ["write-protect", "hash"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        keygen(&data);
        let backup = BackupProcess::start(&data, "127.0.0.1:0");
        let run_dir = PathBuf::from(format!("/dev/shm/remus-test-{}-{tracking}", std::process::id()));
        let out = run_limited(
            Command::new(remus())
                .args(["protect", "qemu", "--json", "--data-dir"])
                .arg(&data)
                .args(["--backup", &backup.addr, "--memory-mib", "128", "--disk-mib", "16", "--seconds", "10", "--tracking", tracking])
                .arg("--kernel")
                .arg(&kernel)
                .arg("--initrd")
                .arg(&initrd)
                .arg("--run-dir")
                .arg(&run_dir),
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "{tracking}: {}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(summary["epochs"].as_u64().unwrap() > 20, "{tracking}: {summary}");
        backup.stop();
        let to = dir.path().join("latest");
        let r = run_limited(
            Command::new(remus_restore()).arg("--data-dir").arg(&data).args(["--latest", "--to"]).arg(&to),
            Duration::from_secs(60),
        );
        assert!(r.status.success(), "{tracking}: restore: {}", String::from_utf8_lossy(&r.stderr));
        for (restored, live) in [("memory", "memory"), ("disk.img", "disk.img")] {
            let a = std::fs::read(to.join(restored)).unwrap();
            let b = std::fs::read(run_dir.join(live)).unwrap();
            assert_eq!(a.len(), b.len(), "{tracking}: {restored} size");
            let differ = a.chunks(4096).zip(b.chunks(4096)).filter(|(x, y)| x != y).count();
            assert_eq!(differ, 0, "{tracking}: {differ} pages of {restored} differ from QEMU's");
        }
        let _ = std::fs::remove_dir_all(&run_dir);
    }
}

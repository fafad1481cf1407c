//! Helpers for end-to-end tests: the real binaries, run as processes.

#![allow(dead_code)]

pub mod gate;
pub mod guest;
pub mod moto;

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Path of the `remus` binary built for these tests.
pub fn remus() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_remus"))
}

/// Path of the `remus-restore` binary.
pub fn remus_restore() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_remus-restore"))
}

/// Runs a command to completion, killing it after `limit`.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("command did not finish within {limit:?}: {cmd:?}");
        }
    }
}

/// A backup process with a reader of its stdout lines (and of its
/// stderr lines, when started by [`start_logged`](Self::start_logged)).
pub struct BackupProcess {
    pub child: Child,
    pub addr: String,
    lines: mpsc::Receiver<String>,
    errors: Option<mpsc::Receiver<String>>,
    /// The stderr lines read so far.
    stderr: RefCell<Vec<String>>,
}

impl BackupProcess {
    /// Starts `remus backup` on `listen` and waits for its "listening on" line.
    pub fn start(data_dir: &Path, listen: &str) -> Self {
        Self::start_with(data_dir, listen, &[])
    }

    /// As [`start`](Self::start), with extra arguments.
    pub fn start_with(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(remus());
        cmd.args(["backup", "--data-dir"]).arg(data_dir).args(["--listen", listen]).args(extra);
        Self::spawn(cmd)
    }

    /// As [`start_with`](Self::start_with), reading stderr too (see
    /// [`wait_stderr`](Self::wait_stderr)); its lines still reach the
    /// test's output.
    pub fn start_logged(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(remus());
        cmd.args(["backup", "--data-dir"]).arg(data_dir).args(["--listen", listen]).args(extra);
        Self::spawn_with(cmd, true)
    }

    /// Runs `cmd` (a `remus backup` command line) and waits for its
    /// "listening on" line.
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_with(cmd, false)
    }

    /// As [`spawn`](Self::spawn), reading stderr too.
    pub fn spawn_logged(cmd: Command) -> Self {
        Self::spawn_with(cmd, true)
    }

    fn spawn_with(mut cmd: Command, read_stderr: bool) -> Self {
        let stderr = if read_stderr { Stdio::piped() } else { Stdio::inherit() };
        let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().expect("spawn backup");
        let lines = spawn_line_reader(child.stdout.take().expect("stdout"), false);
        let errors = child.stderr.take().map(|e| spawn_line_reader(e, true));
        let first = lines.recv_timeout(Duration::from_secs(30)).expect("backup printed no listening line");
        let addr = first
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_string();
        Self { child, addr, lines, errors, stderr: RefCell::default() }
    }

    /// Waits until the backup reports `guest` committed at least `epoch`.
    pub fn wait_committed(&self, guest: u64, epoch: u64, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        let prefix = format!("committed guest-{guest} epoch ");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("guest {guest} never reached epoch {epoch}"));
            if let Some(n) = line.strip_prefix(&prefix).and_then(|n| n.trim().parse::<u64>().ok()) {
                if n >= epoch {
                    return n;
                }
            }
        }
    }

    /// Waits for a stdout line starting with `prefix` and returns it.
    pub fn wait_line(&self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no line starting with {prefix:?}"));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Waits for a stderr line containing `needle` and returns it
    /// (backups started by [`start_logged`](Self::start_logged)).
    pub fn wait_stderr(&self, needle: &str, limit: Duration) -> String {
        let errors = self.errors.as_ref().expect("stderr is read only when started by start_logged");
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = errors.recv_timeout(left).unwrap_or_else(|_| panic!("no stderr line containing {needle:?}"));
            self.stderr.borrow_mut().push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// As [`stop`](Self::stop), returning every line the backup wrote to
    /// stderr (backups started by [`start_logged`](Self::start_logged)).
    pub fn stop_logged(mut self) -> Vec<String> {
        let errors = self.errors.take().expect("stderr is read only when started by start_logged");
        let mut all = self.stderr.take();
        self.stop();
        // The reader ends at the pipe's end, now that the backup is gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match errors.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => all.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return all,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("the backup's stderr did not end"),
            }
        }
    }

    /// SIGKILL: no chance to flush anything beyond what was committed.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "backup exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "backup did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BackupProcess {
    /// A failing test must not leave a backup behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of `out` as they come; `echo` copies them to the test's stderr
/// (captured by the test harness, shown when the test fails).
fn spawn_line_reader(out: impl std::io::Read + Send + 'static, echo: bool) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("{line}");
            }
            if tx.send(line).is_err() && !echo {
                break;
            }
        }
    });
    rx
}

/// `remus protect --data-dir DATA --backup ADDR`, for more arguments.
pub fn protect(data_dir: &Path, backup: &str) -> Command {
    let mut c = Command::new(remus());
    c.args(["protect", "--data-dir"]).arg(data_dir).args(["--backup", backup]);
    c
}

/// Writes TLS material into `data_dir` with `remus keygen`.
pub fn keygen(data_dir: &Path) {
    let out = run_limited(Command::new(remus()).args(["keygen", "--data-dir"]).arg(data_dir), Duration::from_secs(30));
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
}

/// Restores epoch `epoch` of the store at `store` into `img` with
/// remus-restore (within `limit`), checks the image's memory root is
/// `root` (as the primary recorded it), and removes the image.
pub fn assert_store_restores(store: &Path, epoch: u64, img: &Path, root: &str, limit: Duration) {
    let out =
        run_limited(Command::new(remus_restore()).arg("--store").arg(store).args(["--epoch", &epoch.to_string(), "--to"]).arg(img), limit);
    assert!(out.status.success(), "restore {epoch} from {}: {}", store.display(), String::from_utf8_lossy(&out.stderr));
    let image = std::fs::read(img).unwrap();
    assert_eq!(remus_types::MemoryDigest::of_image(&image).to_hex(), root, "epoch {epoch} of {} restored exact", store.display());
    std::fs::remove_file(img).unwrap();
}

/// Reads the primary's recorded roots (JSON lines) into a map.
pub fn read_roots(path: &Path) -> std::collections::HashMap<u64, String> {
    let text = std::fs::read_to_string(path).expect("roots file");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (v["epoch"].as_u64().expect("epoch"), v["root"].as_str().expect("root").to_string())
        })
        .collect()
}

//! `remus move`: a planned switchover. A running `remus protect` listens
//! on a socket in its data directory; `remus move` asks it there to hand
//! its guest over to its backup, which takes it over at once from the last
//! epoch (sealed with the guest held still, acknowledged).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use parking_lot::Mutex;

/// Where the running primary of `guest` listens.
#[must_use]
pub fn socket_path(data_dir: &Path, guest: u64) -> PathBuf {
    data_dir.join("run").join(format!("guest-{guest}.sock"))
}

/// A running primary's end: the request, when one came, and the asker to
/// answer.
pub struct MoveControl {
    path: PathBuf,
    asked: Arc<Mutex<Option<UnixStream>>>,
}

impl MoveControl {
    /// Listens for `remus move` of `guest` under `data_dir`.
    ///
    /// # Errors
    /// When another primary of the guest listens there already, or the
    /// socket cannot be made.
    pub fn listen(data_dir: &Path, guest: u64) -> Result<Self> {
        let path = socket_path(data_dir, guest);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Another primary of the guest may be on its way out (it moved
        // the guest here a moment ago): give it a few seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(&path).is_ok() {
            if std::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "another remus protect of guest {guest} runs with data dir {} ({} answers)",
                    data_dir.display(),
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
        let asked: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let a2 = Arc::clone(&asked);
        std::thread::Builder::new().name("remus-move".into()).spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let mut line = String::new();
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                if BufReader::new(&conn).read_line(&mut line).is_ok() && line.trim() == "move" {
                    let mut a = a2.lock();
                    if a.is_none() {
                        *a = Some(conn);
                    }
                }
            }
        })?;
        Ok(Self { path, asked })
    }

    /// Whether a move was asked for.
    #[must_use]
    pub fn requested(&self) -> bool {
        self.asked.lock().is_some()
    }

    /// Tells the asker how it went.
    pub fn answer(&self, line: &str) {
        if let Some(mut s) = self.asked.lock().take() {
            let _ = writeln!(s, "{line}");
        }
    }
}

impl Drop for MoveControl {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct MoveArgs {
    /// The guest (default 1).
    #[arg(long, default_value_t = 1)]
    pub guest: u64,
    /// How long to wait for the move (default 120 s).
    #[arg(long, default_value_t = 120.0)]
    pub wait_seconds: f64,
}

/// Runs the command: true when the guest moved.
///
/// # Errors
/// When no primary of the guest runs with this data directory.
pub fn run(args: &MoveArgs, data_dir: &Path) -> Result<bool> {
    anyhow::ensure!(args.wait_seconds > 0.0 && args.wait_seconds.is_finite(), "--wait-seconds must be positive");
    let path = socket_path(data_dir, args.guest);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!("no remus protect of guest {} runs with data dir {} ({})", args.guest, data_dir.display(), path.display())
    })?;
    s.set_read_timeout(Some(Duration::from_secs_f64(args.wait_seconds)))?;
    writeln!(s, "move")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).context("waiting for the move")?;
    let line = line.trim();
    anyhow::ensure!(!line.is_empty(), "the primary ended without saying how the move went");
    println!("{line}");
    Ok(line.starts_with("moved "))
}

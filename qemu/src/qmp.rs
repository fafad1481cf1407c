//! A blocking QMP client: one command at a time over QEMU's unix socket.
//!
//! QMP interleaves asynchronous events (`{"event": ...}`) with command
//! replies; events are kept (the last few) and skipped when waiting for a
//! reply. Every reply is either `{"return": ...}` or `{"error": {...}}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use remus_capture::CaptureError;

/// A connected, capability-negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
    /// Events seen while waiting for replies, oldest first (bounded).
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path`, retrying until `timeout` while QEMU starts, and
    /// leaves capability negotiation mode.
    ///
    /// # Errors
    /// [`CaptureError::Qemu`] when the socket never accepts or QEMU's
    /// greeting or negotiation fails.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, CaptureError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!(error = %e, "QMP socket not ready");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(CaptureError::Qemu(format!("QMP socket {}: {e}", path.display()))),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(qmp_io)?;
        let writer = stream.try_clone().map_err(qmp_io)?;
        let mut qmp = Self { reader: BufReader::new(stream), writer, line: String::new(), events: Vec::new() };
        let greeting = qmp.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(CaptureError::Qemu(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    ///
    /// # Errors
    /// [`CaptureError::Qemu`] with QEMU's error description, or the I/O
    /// error when QEMU is gone.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, CaptureError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| CaptureError::Qemu(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(qmp_io)?;
        loop {
            let v = self.read_value()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                return Err(CaptureError::Qemu(format!("{command}: {desc}")));
            }
            if v.get("event").is_some() {
                if self.events.len() >= 64 {
                    self.events.remove(0);
                }
                self.events.push(v);
            }
        }
    }

    /// Sets migration capabilities, e.g. `[("x-ignore-shared", true)]`.
    ///
    /// # Errors
    /// As [`Self::execute`].
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), CaptureError> {
        let list: Vec<Value> = caps.iter().map(|(c, on)| json!({ "capability": c, "state": on })).collect();
        self.execute("migrate-set-capabilities", Some(json!({ "capabilities": list })))?;
        Ok(())
    }

    /// Polls `query-migrate` until the migration completed.
    ///
    /// # Errors
    /// [`CaptureError::Qemu`] when it failed or was cancelled, or did not
    /// finish within `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), CaptureError> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", None)?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    let why = r.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(CaptureError::Qemu(format!("migration {s}: {why}")));
                }
                _ if Instant::now() >= deadline => {
                    return Err(CaptureError::Qemu(format!("migration did not finish within {timeout:?}: {r}")));
                }
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// `cont` right after a migration: QEMU reports the migration completed
    /// a moment before its clean-up lets the VM run ("Migration is not
    /// finalized yet"); that refusal is retried for up to a second.
    ///
    /// # Errors
    /// As [`Self::execute`].
    pub fn cont_after_migration(&mut self) -> Result<(), CaptureError> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.execute("cont", None) {
                Err(CaptureError::Qemu(m)) if m.contains("not finalized") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(100));
                }
                r => return r.map(drop),
            }
        }
    }

    fn read_value(&mut self) -> Result<Value, CaptureError> {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).map_err(qmp_io)?;
        if n == 0 {
            return Err(CaptureError::Qemu("QMP connection closed (QEMU exited?)".into()));
        }
        serde_json::from_str(&self.line).map_err(|e| CaptureError::Qemu(format!("bad QMP message {:?}: {e}", self.line.trim())))
    }
}

fn qmp_io(e: std::io::Error) -> CaptureError {
    CaptureError::Qemu(format!("QMP: {e}"))
}

//! Notifications: what an operator's tooling must hear of (a failover, a
//! fence, a self-fence, a takeover, a change of generation), delivered to
//! a configured command (the event as one JSON line on its stdin) and/or
//! an HTTP endpoint (a POST of the same JSON), off the runtime's threads.
//!
//! Delivery is best effort and in order: a hook that fails or hangs is
//! logged and given up on after [`TIMEOUT`]; the runtime never waits for
//! it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

/// How long one delivery may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Where events go (the `[hooks]` table of the configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HookConfig {
    /// A command run through `sh -c` once per event, the event as JSON on
    /// its stdin.
    #[serde(default)]
    pub command: Option<String>,
    /// An `http://HOST:PORT/PATH` URL each event is POSTed to as JSON.
    #[serde(default)]
    pub url: Option<String>,
}

impl HookConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the bad value.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(u) = &self.url {
            parse_url(u)?;
        }
        if self.command.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err("hooks.command must not be empty".into());
        }
        Ok(())
    }
}

/// The delivery worker; dropping it delivers what is queued, then stops.
pub struct Hooks {
    tx: Option<Sender<serde_json::Value>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hooks {
    /// Starts delivering to `cfg` (nothing is started when it names no
    /// hook).
    #[must_use]
    pub fn start(cfg: HookConfig) -> Self {
        if cfg.command.is_none() && cfg.url.is_none() {
            return Self { tx: None, thread: None };
        }
        let (tx, rx) = crossbeam_channel::unbounded::<serde_json::Value>();
        let thread = std::thread::Builder::new()
            .name("remus-hooks".into())
            .spawn(move || {
                for event in rx {
                    deliver(&cfg, &event);
                }
            })
            .ok();
        Self { tx: Some(tx), thread }
    }

    /// Queues `event` (a JSON object; `time` is added) for delivery.
    pub fn notify(&self, mut event: serde_json::Value) {
        let Some(tx) = &self.tx else { return };
        if let Some(o) = event.as_object_mut() {
            o.insert("time".into(), humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string().into());
        }
        let _ = tx.send(event);
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn deliver(cfg: &HookConfig, event: &serde_json::Value) {
    let mut line = event.to_string();
    line.push('\n');
    if let Some(c) = &cfg.command {
        if let Err(e) = run_command(c, line.as_bytes()) {
            tracing::warn!(command = %c, error = %e, "hook command failed");
        }
    }
    if let Some(u) = &cfg.url {
        if let Err(e) = post(u, line.as_bytes()) {
            tracing::warn!(url = %u, error = %e, "hook POST failed");
        }
    }
}

fn run_command(command: &str, input: &[u8]) -> Result<(), String> {
    let mut child = Command::new("sh")
        .args(["-c", command])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting it: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).map_err(|e| format!("writing the event: {e}"))?;
    }
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) if s.success() => return Ok(()),
            Some(s) => return Err(format!("exited with {s}")),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {TIMEOUT:?}; killed"));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// `http://HOST:PORT/PATH` into (`HOST:PORT`, `/PATH`).
fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("hooks.url {url:?} must be an http:// URL"))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    if authority.is_empty() {
        return Err(format!("hooks.url {url:?} names no host"));
    }
    let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    Ok((authority, path))
}

fn post(url: &str, body: &[u8]) -> Result<(), String> {
    let (authority, path) = parse_url(url)?;
    let addr = authority.to_socket_addrs().map_err(|e| format!("resolving {authority}: {e}"))?.next().ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connecting: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|()| s.write_all(body)).map_err(|e| format!("sending: {e}"))?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status).map_err(|e| format!("reading the answer: {e}"))?;
    let text = String::from_utf8_lossy(&status);
    match text.get(9..10) {
        Some("2") => Ok(()),
        _ => Err(format!("answered {:?}", text.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(parse_url("http://h:8/a/b").unwrap(), ("h:8".into(), "/a/b".into()));
        assert_eq!(parse_url("http://h").unwrap(), ("h:80".into(), "/".into()));
        assert!(parse_url("https://h/").unwrap_err().contains("http://"));
        assert!(HookConfig { command: Some(" ".into()), url: None }.validate().is_err());
    }

    #[test]
    fn a_command_and_an_endpoint_each_get_every_event_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("events");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/remus", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !String::from_utf8_lossy(&req).contains("}\n") {
                    let n = c.read(&mut buf).unwrap();
                    req.extend_from_slice(&buf[..n]);
                }
                c.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
                let text = String::from_utf8(req).unwrap();
                assert!(text.starts_with("POST /remus HTTP/1.1\r\n"), "{text}");
                bodies.push(text.split("\r\n\r\n").nth(1).unwrap().to_string());
            }
            bodies
        });
        let cfg = HookConfig { command: Some(format!("cat >> {}", file.display())), url: Some(url) };
        cfg.validate().unwrap();
        let hooks = Hooks::start(cfg);
        hooks.notify(serde_json::json!({"event": "self-fence", "guest": 1}));
        hooks.notify(serde_json::json!({"event": "superseded", "guest": 1}));
        drop(hooks);
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.iter().map(|l| l["event"].as_str().unwrap()).collect::<Vec<_>>(), ["self-fence", "superseded"]);
        assert!(lines[0]["time"].as_str().unwrap().starts_with("20"), "stamped");
        let bodies = server.join().unwrap();
        assert!(bodies[0].contains("self-fence") && bodies[1].contains("superseded"), "{bodies:?}");
    }
}

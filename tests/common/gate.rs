//! A TCP forwarder that can be cut: a partition between a process and a
//! TCP service (the S3 witness) for the tests. Cut, it forwards nothing in
//! either direction (bytes wait, as across a real partition, and requests
//! time out); healed, it forwards again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A forwarder on loopback to one target.
pub struct TcpGate {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl TcpGate {
    /// Forwards a fresh loopback port to `target` (`host:port`).
    pub fn start(target: &str) -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").expect("bind gate"), target)
    }

    /// Forwards what `listener` accepts to `target`, connecting from the
    /// network namespace of the calling thread (the listener may be in
    /// another: a socket stays in the namespace it was made in).
    pub fn on(listener: TcpListener, target: &str) -> Self {
        let addr = listener.local_addr().expect("gate address");
        let cut = Arc::new(AtomicBool::new(false));
        let (c, target) = (Arc::clone(&cut), target.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(a) = conn else { break };
                let Ok(b) = TcpStream::connect(&target) else { continue };
                for (from, to) in [(a.try_clone().expect("clone"), b.try_clone().expect("clone")), (b, a)] {
                    let c = Arc::clone(&c);
                    std::thread::spawn(move || pump(from, to, &c));
                }
            }
        });
        Self { addr, cut }
    }

    /// `http://ADDR`, to give as an S3 endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts (`true`) or heals (`false`) the path.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = from.read(&mut buf) {
        while cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

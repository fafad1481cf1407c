//! The relay through real loopback sockets: an echo server upstream, a
//! client that numbers its datagrams, and the relay's counters checked
//! against what each end saw.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::*;

/// How long a test waits for the relay to drain before it fails.
const LIMIT: Duration = Duration::from_secs(20);

/// Echoes every datagram and records the sequence numbers it saw.
struct Echo {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Self {
        let sock = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while !st2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    s2.lock().push(u64::from_le_bytes(buf[..8].try_into().unwrap()));
                    sock.send_to(&buf[..n], from).unwrap();
                }
            }
        });
        Self { addr, seen, stop, thread: Some(thread) }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.take().unwrap().join();
    }
}

fn client() -> UdpSocket {
    let c = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    c
}

fn datagram(seq: u64, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len.max(8)];
    d[..8].copy_from_slice(&seq.to_le_bytes());
    d
}

/// Sends `n` numbered datagrams of `len` bytes, `gap` apart, taking in
/// the echoes that arrive meanwhile (so that the client's own socket
/// buffer never overflows) and returning them.
fn send(c: &UdpSocket, to: SocketAddr, n: u64, len: usize, gap: Duration) -> Vec<u64> {
    let mut got = Vec::new();
    for seq in 0..n {
        c.send_to(&datagram(seq, len), to).unwrap();
        if seq % 128 == 127 {
            collect(c, &mut got);
        }
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    got
}

/// Takes every echo already waiting on `c`.
fn collect(c: &UdpSocket, got: &mut Vec<u64>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    c.set_nonblocking(true).unwrap();
    while c.recv(&mut buf).is_ok() {
        got.push(u64::from_le_bytes(buf[..8].try_into().unwrap()));
    }
    c.set_nonblocking(false).unwrap();
}

/// Waits until the relay has taken `sent` datagrams up and has nothing
/// left to deliver either way; returns what the client received (`got`
/// before, and since).
fn drain(relay: &Relay, c: &UdpSocket, sent: u64, mut got: Vec<u64>) -> Vec<u64> {
    let start = Instant::now();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        while c.recv(&mut buf).is_ok() {
            got.push(u64::from_le_bytes(buf[..8].try_into().unwrap()));
        }
        let up = relay.counters(Direction::Up);
        let down = relay.counters(Direction::Down);
        let settled = up.packets == sent
            && relay.pending(Direction::Up) == 0
            && relay.pending(Direction::Down) == 0
            && down.packets == up.delivered
            && got.len() as u64 == down.delivered;
        if settled {
            return got;
        }
        assert!(start.elapsed() < LIMIT, "relay did not drain: up {up}; down {down}; client got {}", got.len());
    }
}

fn relay(upstream: SocketAddr, up: Impairment, down: Impairment) -> Relay {
    Relay::start(&RelayConfig { listen: "127.0.0.1:0".parse().unwrap(), upstream, up, down, seed: 7 }).unwrap()
}

#[test]
fn a_clean_path_delivers_everything_in_order_and_counts_it() {
    let echo = Echo::start();
    let r = relay(echo.addr, Impairment::default(), Impairment::default());
    let c = client();
    let early = send(&c, r.local_addr(), 500, 1200, Duration::ZERO);
    let got = drain(&r, &c, 500, early);
    assert_eq!(got, (0..500).collect::<Vec<_>>());
    let up = r.counters(Direction::Up);
    assert_eq!((up.packets, up.delivered, up.dropped(), up.bytes), (500, 500, 0, 500 * 1200));
    assert_eq!(r.kernel_drops(), Some(0), "the relay's sockets dropped nothing");
}

#[test]
fn delay_holds_every_datagram_for_at_least_the_round_trip() {
    let echo = Echo::start();
    let one_way = Duration::from_millis(30);
    let r = relay(echo.addr, Impairment::delay(one_way), Impairment::delay(one_way));
    let c = client();
    let start = Instant::now();
    let early = send(&c, r.local_addr(), 1, 100, Duration::ZERO);
    let got = drain(&r, &c, 1, early);
    assert_eq!(got, vec![0]);
    assert!(start.elapsed() >= 2 * one_way, "echo came back after {:?}", start.elapsed());
}

#[test]
fn random_loss_drops_about_its_fraction_and_only_what_it_counts() {
    let echo = Echo::start();
    let r = relay(echo.addr, Impairment { loss: 0.1, ..Impairment::default() }, Impairment::default());
    let c = client();
    let early = send(&c, r.local_addr(), 4000, 200, Duration::from_micros(10));
    let got = drain(&r, &c, 4000, early);
    let up = r.counters(Direction::Up);
    // Binomial(4000, 0.1): mean 400, sd 19; the band is about 5 sd.
    assert!((300..=500).contains(&up.lost), "lost {}", up.lost);
    assert_eq!(got.len() as u64, 4000 - up.lost, "every missing datagram was counted as lost");
    assert_eq!(echo.seen.lock().len() as u64, up.delivered);
}

/// Mean length of the runs of consecutive sequence numbers missing.
fn mean_gap_run(seen: &[u64], sent: u64) -> f64 {
    let mut present = vec![false; sent as usize];
    for s in seen {
        present[*s as usize] = true;
    }
    let (mut runs, mut missing, mut in_run) = (0u64, 0u64, false);
    for p in present {
        if !p {
            missing += 1;
            if !in_run {
                runs += 1;
            }
        }
        in_run = !p;
    }
    missing as f64 / runs.max(1) as f64
}

#[test]
fn bursty_loss_comes_in_runs_of_about_the_burst_length() {
    for (burst, lo, hi) in [(1.0, 1.0, 1.3), (5.0, 3.5, 7.0)] {
        let echo = Echo::start();
        let imp = Impairment { loss: 0.05, loss_burst: burst, ..Impairment::default() };
        let r = relay(echo.addr, imp, Impairment::default());
        let c = client();
        let early = send(&c, r.local_addr(), 20_000, 64, Duration::from_micros(10));
        drain(&r, &c, 20_000, early);
        let lost = r.counters(Direction::Up).lost;
        assert!((600..=1500).contains(&lost), "burst {burst}: lost {lost} of 20000 at 5%");
        let run = mean_gap_run(&echo.seen.lock(), 20_000);
        assert!((lo..=hi).contains(&run), "burst {burst}: mean loss run {run:.2}");
    }
}

#[test]
fn jitter_reorders_and_a_steady_delay_does_not() {
    for (jitter, reorders) in [(Duration::ZERO, false), (Duration::from_millis(2), true)] {
        let echo = Echo::start();
        let imp = Impairment { delay: Duration::from_millis(5), jitter, ..Impairment::default() };
        let r = relay(echo.addr, imp, Impairment::default());
        let c = client();
        let early = send(&c, r.local_addr(), 400, 200, Duration::from_micros(100));
        drain(&r, &c, 400, early);
        let seen = echo.seen.lock().clone();
        let out_of_order = seen.windows(2).filter(|w| w[1] < w[0]).count();
        let counted = r.counters(Direction::Up).reordered;
        assert_eq!(counted > 0, reorders, "jitter {jitter:?}: {counted} counted as reordered");
        assert_eq!(out_of_order > 0, reorders, "jitter {jitter:?}: {out_of_order} arrived out of order");
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..400).collect::<Vec<_>>(), "reordered, never lost");
    }
}

#[test]
fn duplication_delivers_extra_copies_and_counts_them() {
    let echo = Echo::start();
    let r = relay(echo.addr, Impairment { duplicate: 0.2, ..Impairment::default() }, Impairment::default());
    let c = client();
    let early = send(&c, r.local_addr(), 1000, 100, Duration::ZERO);
    drain(&r, &c, 1000, early);
    let up = r.counters(Direction::Up);
    assert!((120..=280).contains(&up.duplicated), "duplicated {}", up.duplicated);
    assert_eq!(echo.seen.lock().len() as u64, 1000 + up.duplicated);
}

#[test]
fn a_rate_limit_paces_delivery_and_drops_at_the_tail_of_a_full_queue() {
    let echo = Echo::start();
    let rate = 8_000_000; // 1 MB/s
    let imp = Impairment { rate: Some(rate), queue: 100_000, ..Impairment::default() };
    let r = relay(echo.addr, imp, Impairment::default());
    let c = client();
    let start = Instant::now();
    // 400 kB at once: the queue holds 100 kB, the rest beyond it is dropped.
    let early = send(&c, r.local_addr(), 400, 1000, Duration::ZERO);
    let got = drain(&r, &c, 400, early);
    let up = r.counters(Direction::Up);
    assert!(up.queue_dropped > 0, "{up}");
    assert_eq!(got.len() as u64, 400 - up.queue_dropped);
    // Whatever got through crossed a 1 MB/s bottleneck one after another.
    let carried = Duration::from_secs_f64(up.delivered as f64 * 1000.0 * 8.0 / rate as f64);
    assert!(start.elapsed() >= carried, "{} kB through 1 MB/s in {:?}", up.delivered, start.elapsed());
    assert!(up.delivered * 1000 <= 100_000 + 2 * 1000 + (start.elapsed().as_secs_f64() * 1e6) as u64);
}

#[test]
fn a_partition_drops_everything_until_it_heals() {
    let echo = Echo::start();
    let r = relay(echo.addr, Impairment::default(), Impairment::default());
    let c = client();
    r.set_partitioned(true);
    let early = send(&c, r.local_addr(), 50, 100, Duration::ZERO);
    let got = drain(&r, &c, 50, early);
    assert!(got.is_empty());
    assert_eq!(r.counters(Direction::Up).partition_dropped, 50);
    r.set_partitioned(false);
    let early = send(&c, r.local_addr(), 50, 100, Duration::ZERO);
    let got = drain(&r, &c, 100, early);
    assert_eq!(got.len(), 50);
}

#[test]
fn two_clients_each_get_their_own_replies() {
    let echo = Echo::start();
    let r = relay(echo.addr, Impairment::default(), Impairment::default());
    let (a, b) = (client(), client());
    a.send_to(&datagram(1, 64), r.local_addr()).unwrap();
    b.send_to(&datagram(2, 64), r.local_addr()).unwrap();
    let mut buf = [0u8; 64];
    let recv = |c: &UdpSocket, buf: &mut [u8]| {
        let start = Instant::now();
        loop {
            if c.recv(buf).is_ok() {
                return u64::from_le_bytes(buf[..8].try_into().unwrap());
            }
            assert!(start.elapsed() < LIMIT);
        }
    };
    assert_eq!(recv(&a, &mut buf), 1);
    assert_eq!(recv(&b, &mut buf), 2);
}

#[test]
fn bad_values_are_refused_with_the_value_named() {
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (imp, needle) in [
        (Impairment { loss: 1.0, ..Impairment::default() }, "loss 1"),
        (Impairment { loss_burst: 0.5, ..Impairment::default() }, "burst 0.5"),
        (Impairment { duplicate: -0.1, ..Impairment::default() }, "duplicate -0.1"),
        (Impairment { rate: Some(0), ..Impairment::default() }, "rate 0"),
        (Impairment { rate: Some(1000), queue: 10, ..Impairment::default() }, "queue of 10"),
    ] {
        let err = Relay::start(&RelayConfig::symmetric(up, imp, 1)).err().expect("refused").to_string();
        assert!(err.contains(needle), "{err:?} should name {needle:?}");
    }
    let r = Relay::start(&RelayConfig::symmetric(up, Impairment::default(), 1)).unwrap();
    assert!(r.set_impairment(Direction::Down, Impairment { loss: 2.0, ..Impairment::default() }).is_err());
}

#[test]
fn rates_parse_with_their_units() {
    assert_eq!(parse_rate("100mbit"), Ok(100_000_000));
    assert_eq!(parse_rate("1.5Gbit"), Ok(1_500_000_000));
    assert_eq!(parse_rate("800kbit"), Ok(800_000));
    assert_eq!(parse_rate("12345"), Ok(12_345));
    assert!(parse_rate("fast").is_err());
    assert!(parse_rate("-3mbit").is_err());
}

#[test]
fn kernel_drops_are_read_from_the_udp_table() {
    let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                 1: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000 5\n\
                 2: 0100007F:1F91 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000 7\n";
    assert_eq!(udp_drops(table, &[0x1F90]), 5);
    assert_eq!(udp_drops(table, &[0x1F90, 0x1F91]), 12);
    assert_eq!(udp_drops(table, &[1]), 0);
}

/// Kernel TCP across the wire: a connection from one namespace to the
/// other takes the path's round trip, and 4 MiB cross 1% loss intact
/// (TCP retransmits what the wire drops, which the counters show).
#[test]
fn kernel_tcp_crosses_the_wire_at_its_round_trip_and_through_loss() {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    let path = Impairment { delay: Duration::from_millis(10), jitter: Duration::from_millis(1), loss: 0.01, ..Impairment::default() };
    let wire = TunWire::start(path, path, 3).unwrap();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            wire.enter(End::B).unwrap();
            let l = TcpListener::bind(SocketAddr::from((ADDR_B, 7900))).unwrap();
            tx.send(()).unwrap();
            let (mut c, _) = l.accept().unwrap();
            let mut one = [0u8; 1];
            c.read_exact(&mut one).unwrap();
            c.write_all(&one).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            c.write_all(blake3::hash(&got).as_bytes()).unwrap();
        });
        rx.recv().unwrap();
        wire.enter(End::A).unwrap();
        let mut c = TcpStream::connect(SocketAddr::from((ADDR_B, 7900))).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let t0 = Instant::now();
        c.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).unwrap();
        let rtt = t0.elapsed();
        assert!(rtt >= Duration::from_millis(18), "a round trip through 2 x 10 ms ±1 ms took {rtt:?}");
        c.write_all(&data).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut digest = [0u8; 32];
        c.read_exact(&mut digest).unwrap();
        assert_eq!(&digest, blake3::hash(&data).as_bytes(), "4 MiB arrived intact");
    });
    let up = wire.counters(Direction::Up);
    assert!(up.lost > 0 && up.delivered > 2000, "{up}");
}

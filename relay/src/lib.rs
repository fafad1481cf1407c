//! A userspace UDP relay that impairs a path the way a wide-area link does.
//!
//! The relay listens on one address and forwards every datagram to an
//! upstream address, each client through an upstream socket of its own,
//! and the replies back. Each direction is a [`Pipe`] with its own
//! [`Impairment`]:
//!
//! - a bottleneck of `rate` bits per second with a queue of `queue` bytes
//!   (a datagram that would overflow the queue is dropped at its tail, as
//!   a router does);
//! - a one-way `delay`, varied per datagram uniformly within `±jitter`, so
//!   that datagrams overtake each other when the jitter exceeds their
//!   spacing (reordering, as netem does with jitter);
//! - `loss` of datagrams, independent or in bursts of `loss_burst` on
//!   average (a two-state Gilbert model whose long-run loss is `loss`);
//! - `duplicate`: the fraction of datagrams delivered twice;
//! - partitions switched on and off while the relay runs.
//!
//! Nothing is dropped silently: the relay's sockets have large buffers,
//! every datagram it drops is counted by cause ([`Counters`]), and
//! [`Relay::kernel_drops`] reads what the kernel dropped on its sockets.
//! Randomness comes from a seed, so a run can be repeated.
//!
//! [`TunWire`] puts the same pipes between two network namespaces, for
//! any IP traffic (kernel TCP) rather than one UDP flow.

use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Socket buffer the relay asks for (the kernel caps it at rmem_max).
const SOCKET_BUFFER: usize = 8 << 20;
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_536;

/// What one direction of the path does to datagrams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Each datagram's delay varies uniformly within `delay ± jitter`.
    pub jitter: Duration,
    /// Long-run fraction of datagrams lost, in `[0, 1)`.
    pub loss: f64,
    /// Mean length of a loss burst in datagrams (1: independent losses).
    pub loss_burst: f64,
    /// Fraction of datagrams delivered twice, in `[0, 1]`.
    pub duplicate: f64,
    /// Bottleneck rate in bits per second; `None` for no limit.
    pub rate: Option<u64>,
    /// Bytes the bottleneck queues before it drops (with `rate`).
    pub queue: usize,
}

impl Default for Impairment {
    fn default() -> Self {
        Self { delay: Duration::ZERO, jitter: Duration::ZERO, loss: 0.0, loss_burst: 1.0, duplicate: 0.0, rate: None, queue: 4 << 20 }
    }
}

impl Impairment {
    /// A clean path with one-way `delay`.
    #[must_use]
    pub fn delay(delay: Duration) -> Self {
        Self { delay, ..Self::default() }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`RelayError::Invalid`] naming the value out of range.
    pub fn validate(&self) -> Result<(), RelayError> {
        if !(0.0..1.0).contains(&self.loss) {
            return Err(RelayError::Invalid(format!("loss {} is not in [0, 1)", self.loss)));
        }
        if !(self.loss_burst >= 1.0 && self.loss_burst.is_finite()) {
            return Err(RelayError::Invalid(format!("loss burst {} is not a length of at least 1", self.loss_burst)));
        }
        if !(0.0..=1.0).contains(&self.duplicate) {
            return Err(RelayError::Invalid(format!("duplicate {} is not in [0, 1]", self.duplicate)));
        }
        if self.rate == Some(0) {
            return Err(RelayError::Invalid("rate 0 carries nothing".into()));
        }
        if self.rate.is_some() && self.queue < MAX_DATAGRAM {
            return Err(RelayError::Invalid(format!("queue of {} bytes is smaller than a datagram", self.queue)));
        }
        Ok(())
    }
}

/// Why the relay cannot start or be changed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A value out of range.
    #[error("invalid impairment: {0}")]
    Invalid(String),
    /// A socket could not be made.
    #[error("relay socket: {0}")]
    Io(io::Error),
}

// The message names the cause: a field, not a `source()`, so a chained
// print says it once.
impl From<io::Error> for RelayError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// One direction of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From clients to the upstream address.
    Up,
    /// From the upstream address back to clients.
    Down,
}

/// What a direction did, since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams received.
    pub packets: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Datagrams sent on (duplicates included).
    pub delivered: u64,
    /// Dropped by the loss model.
    pub lost: u64,
    /// Dropped because the bottleneck queue was full.
    pub queue_dropped: u64,
    /// Dropped during a partition.
    pub partition_dropped: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Delivered after a datagram that arrived later.
    pub reordered: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
}

impl Counters {
    /// Every datagram the relay dropped, for any reason.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.lost + self.queue_dropped + self.partition_dropped + self.send_errors
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} packets ({} B) in, {} out; lost {}, queue-dropped {}, partition-dropped {}, duplicated {}, reordered {}, send errors {}",
            self.packets,
            self.bytes,
            self.delivered,
            self.lost,
            self.queue_dropped,
            self.partition_dropped,
            self.duplicated,
            self.reordered,
            self.send_errors
        )
    }
}

#[derive(Default)]
struct AtomicCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    delivered: AtomicU64,
    lost: AtomicU64,
    queue_dropped: AtomicU64,
    partition_dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    send_errors: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            packets: r(&self.packets),
            bytes: r(&self.bytes),
            delivered: r(&self.delivered),
            lost: r(&self.lost),
            queue_dropped: r(&self.queue_dropped),
            partition_dropped: r(&self.partition_dropped),
            duplicated: r(&self.duplicated),
            reordered: r(&self.reordered),
            send_errors: r(&self.send_errors),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Where a pipe delivers: a UDP socket and address, or a TUN interface.
#[derive(Clone)]
pub(crate) enum Sink {
    Udp(Arc<UdpSocket>, SocketAddr),
    Tun(Arc<std::fs::File>),
}

impl Sink {
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Udp(socket, to) => socket.send_to(bytes, *to).map(|_| ()),
            Self::Tun(f) => {
                use std::io::Write;
                (&**f).write(bytes).map(|_| ())
            }
        }
    }
}

/// A datagram waiting for its delivery time.
struct Scheduled {
    at: Instant,
    seq: u64,
    bytes: Arc<[u8]>,
    sink: Sink,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap's top is the earliest delivery.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct PipeState {
    imp: Impairment,
    rng: SmallRng,
    /// The Gilbert model's state: in a loss burst.
    bursting: bool,
    partitioned: bool,
    /// When the bottleneck finishes sending what it has queued.
    busy_until: Instant,
    heap: BinaryHeap<Scheduled>,
    next_seq: u64,
    highest_delivered: Option<u64>,
}

impl PipeState {
    /// True when the loss model drops the next datagram.
    fn lose(&mut self) -> bool {
        let imp = self.imp;
        if imp.loss <= 0.0 {
            return false;
        }
        if imp.loss_burst <= 1.0 {
            return self.rng.gen_bool(imp.loss);
        }
        // Leave a burst with probability 1/burst; enter one so that the
        // long-run fraction of datagrams in bursts is `loss`.
        let leave = 1.0 / imp.loss_burst;
        let enter = (imp.loss * leave / (1.0 - imp.loss)).min(1.0);
        self.bursting = if self.bursting { !self.rng.gen_bool(leave) } else { self.rng.gen_bool(enter) };
        self.bursting
    }

    fn sample_delay(&mut self) -> Duration {
        let imp = self.imp;
        if imp.jitter.is_zero() {
            return imp.delay;
        }
        let j = imp.jitter.as_secs_f64();
        let d = imp.delay.as_secs_f64() + self.rng.gen_range(-j..=j);
        Duration::from_secs_f64(d.max(0.0))
    }
}

/// One direction: impairs datagrams and sends each at its time.
pub(crate) struct Pipe {
    state: Mutex<PipeState>,
    wake: Condvar,
    counters: AtomicCounters,
}

impl Pipe {
    pub(crate) fn new(imp: Impairment, seed: u64) -> Self {
        Self {
            state: Mutex::new(PipeState {
                imp,
                rng: SmallRng::seed_from_u64(seed),
                bursting: false,
                partitioned: false,
                busy_until: Instant::now(),
                heap: BinaryHeap::new(),
                next_seq: 0,
                highest_delivered: None,
            }),
            wake: Condvar::new(),
            counters: AtomicCounters::default(),
        }
    }

    /// A datagram arrived at `now`: drop it or schedule it (and a copy).
    pub(crate) fn push(&self, now: Instant, bytes: &[u8], sink: &Sink) {
        let c = &self.counters;
        bump(&c.packets);
        c.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut st = self.state.lock();
        if st.partitioned {
            bump(&c.partition_dropped);
            return;
        }
        if st.lose() {
            bump(&c.lost);
            return;
        }
        let departs = match st.imp.rate {
            None => now,
            Some(rate) => {
                let start = st.busy_until.max(now);
                let backlog = (start - now).as_secs_f64() * rate as f64 / 8.0;
                if backlog + bytes.len() as f64 > st.imp.queue as f64 {
                    bump(&c.queue_dropped);
                    return;
                }
                st.busy_until = start + Duration::from_secs_f64(bytes.len() as f64 * 8.0 / rate as f64);
                st.busy_until
            }
        };
        let duplicate = st.imp.duplicate;
        let copies = if st.rng.gen_bool(duplicate) { 2 } else { 1 };
        let bytes: Arc<[u8]> = bytes.into();
        for copy in 0..copies {
            if copy > 0 {
                bump(&c.duplicated);
            }
            let at = departs + st.sample_delay();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.heap.push(Scheduled { at, seq, bytes: Arc::clone(&bytes), sink: sink.clone() });
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Sends datagrams at their delivery times until `stop`.
    pub(crate) fn run(&self, stop: &AtomicBool) {
        loop {
            let next = {
                let mut st = self.state.lock();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let now = Instant::now();
                    match st.heap.peek().map(|s| s.at) {
                        Some(at) if at <= now => {
                            let s = st.heap.pop().expect("peeked");
                            if st.highest_delivered.is_some_and(|h| s.seq < h) {
                                bump(&self.counters.reordered);
                            }
                            st.highest_delivered = st.highest_delivered.max(Some(s.seq));
                            break s;
                        }
                        Some(at) => {
                            let _ = self.wake.wait_until(&mut st, at.min(now + POLL));
                        }
                        None => {
                            let _ = self.wake.wait_for(&mut st, POLL);
                        }
                    }
                }
            };
            match next.sink.send(&next.bytes) {
                Ok(()) => bump(&self.counters.delivered),
                Err(_) => bump(&self.counters.send_errors),
            }
        }
    }
}

/// Where the relay listens and forwards, and what it does on the way.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Address clients send to (port 0: any free port).
    pub listen: SocketAddr,
    /// Address datagrams are forwarded to.
    pub upstream: SocketAddr,
    /// Clients to upstream.
    pub up: Impairment,
    /// Upstream to clients.
    pub down: Impairment,
    /// Seed of the loss, jitter and duplication draws.
    pub seed: u64,
}

impl RelayConfig {
    /// A relay on a free loopback port to `upstream`, the same impairment
    /// both ways.
    #[must_use]
    pub fn symmetric(upstream: SocketAddr, imp: Impairment, seed: u64) -> Self {
        let listen = if upstream.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }.parse().expect("loopback");
        Self { listen, upstream, up: imp, down: imp, seed }
    }
}

/// The two directions of an impaired path and the threads that run them,
/// for the UDP relay and the TUN wire alike.
pub(crate) struct Pipes {
    pub(crate) up: Pipe,
    pub(crate) down: Pipe,
    pub(crate) stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pipes {
    /// Up impaired by `up`, down by `down`; `seed` draws both.
    pub(crate) fn new(up: Impairment, down: Impairment, seed: u64) -> Self {
        Self {
            up: Pipe::new(up, seed),
            down: Pipe::new(down, seed ^ 0x9e37_79b9_7f4a_7c15),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn pipe(&self, dir: Direction) -> &Pipe {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    /// Runs `f(owner)` on a named thread that [`stop`](Self::stop) joins.
    pub(crate) fn spawn<T: Send + Sync + 'static>(
        &self,
        owner: &Arc<T>,
        name: &str,
        f: impl FnOnce(&T) + Send + 'static,
    ) -> io::Result<()> {
        let me = Arc::clone(owner);
        let h = std::thread::Builder::new().name(name.into()).spawn(move || f(&me))?;
        self.threads.lock().push(h);
        Ok(())
    }

    /// Cuts (or heals) both directions.
    pub(crate) fn set_partitioned(&self, on: bool) {
        for dir in [Direction::Up, Direction::Down] {
            self.pipe(dir).state.lock().partitioned = on;
        }
    }

    /// Stops every thread and waits for them.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.up.wake.notify_all();
        self.down.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

struct Shared {
    listen: Arc<UdpSocket>,
    upstream: SocketAddr,
    pipes: Pipes,
    /// Client address to the upstream socket that speaks for it.
    sessions: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
}

impl Shared {
    fn spawn(self: &Arc<Self>, name: &str, f: impl FnOnce(&Shared) + Send + 'static) -> io::Result<()> {
        self.pipes.spawn(self, name, f)
    }

    /// The upstream socket for `client`, made (with its reader) on first use.
    fn session(self: &Arc<Self>, client: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        if let Some(s) = self.sessions.lock().get(&client) {
            return Ok(Arc::clone(s));
        }
        let any: SocketAddr = if self.upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("any");
        let sock = Arc::new(udp_socket(any)?);
        self.sessions.lock().insert(client, Arc::clone(&sock));
        let reader = Arc::clone(&sock);
        self.spawn("relay-down", move |me| {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while !me.pipes.stop.load(Ordering::Relaxed) {
                match reader.recv_from(&mut buf) {
                    Ok((n, from)) if from == me.upstream => {
                        me.pipes.down.push(Instant::now(), &buf[..n], &Sink::Udp(Arc::clone(&me.listen), client))
                    }
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        })?;
        Ok(sock)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

fn udp_socket(bind: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if bind.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort, past the kernel's cap where this process may; what it
    // drops anyway shows in `kernel_drops`.
    let _ = remus_sys::size_udp_buffers(&sock, SOCKET_BUFFER);
    sock.bind(&bind.into())?;
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(POLL))?;
    Ok(sock)
}

/// A running relay; stops when dropped.
pub struct Relay {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Relay {
    /// Starts relaying.
    ///
    /// # Errors
    /// [`RelayError::Invalid`] for an impairment out of range,
    /// [`RelayError::Io`] when a socket or thread cannot be made.
    pub fn start(cfg: &RelayConfig) -> Result<Self, RelayError> {
        cfg.up.validate()?;
        cfg.down.validate()?;
        let listen = Arc::new(udp_socket(cfg.listen)?);
        let addr = listen.local_addr()?;
        let shared = Arc::new(Shared {
            listen,
            upstream: cfg.upstream,
            pipes: Pipes::new(cfg.up, cfg.down, cfg.seed),
            sessions: Mutex::new(HashMap::new()),
        });
        shared.spawn("relay-up-send", |me| me.pipes.up.run(&me.pipes.stop))?;
        shared.spawn("relay-down-send", |me| me.pipes.down.run(&me.pipes.stop))?;
        let me = Arc::clone(&shared);
        shared.spawn("relay-up", move |_| {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while !me.pipes.stop.load(Ordering::Relaxed) {
                match me.listen.recv_from(&mut buf) {
                    Ok((n, client)) => match me.session(client) {
                        Ok(sock) => me.pipes.up.push(Instant::now(), &buf[..n], &Sink::Udp(sock, me.upstream)),
                        Err(_) => bump(&me.pipes.up.counters.send_errors),
                    },
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        })?;
        Ok(Self { shared, addr })
    }

    /// The address clients send to.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts (or heals) both directions; datagrams already on their way
    /// still arrive, as on a real path.
    pub fn set_partitioned(&self, on: bool) {
        self.shared.pipes.set_partitioned(on);
    }

    /// Changes one direction's impairment while running.
    ///
    /// # Errors
    /// [`RelayError::Invalid`] for values out of range.
    pub fn set_impairment(&self, dir: Direction, imp: Impairment) -> Result<(), RelayError> {
        imp.validate()?;
        self.shared.pipes.pipe(dir).state.lock().imp = imp;
        Ok(())
    }

    /// What one direction did so far.
    #[must_use]
    pub fn counters(&self, dir: Direction) -> Counters {
        self.shared.pipes.pipe(dir).counters.snapshot()
    }

    /// Datagrams of one direction scheduled and not yet sent on.
    #[must_use]
    pub fn pending(&self, dir: Direction) -> usize {
        self.shared.pipes.pipe(dir).state.lock().heap.len()
    }

    /// Datagrams the kernel dropped on the relay's own sockets (full
    /// receive buffers), read from `/proc/net/udp{,6}`; `None` where that
    /// cannot be read.
    #[must_use]
    pub fn kernel_drops(&self) -> Option<u64> {
        let mut ports = vec![self.addr.port()];
        for s in self.shared.sessions.lock().values() {
            if let Ok(a) = s.local_addr() {
                ports.push(a.port());
            }
        }
        let mut total = None;
        for table in ["/proc/net/udp", "/proc/net/udp6"] {
            let Ok(text) = std::fs::read_to_string(table) else { continue };
            total = Some(total.unwrap_or(0) + udp_drops(&text, &ports));
        }
        total
    }
}

/// Sums the `drops` column of the sockets bound to `ports` in a
/// `/proc/net/udp` table.
fn udp_drops(table: &str, ports: &[u16]) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            ports.contains(&port).then(|| fields.last()?.parse::<u64>().ok()).flatten()
        })
        .sum()
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.pipes.stop();
    }
}

/// Parses a rate such as `100mbit`, `1.5gbit`, `800kbit` or plain bits per
/// second.
///
/// # Errors
/// A message naming the text.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mul) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.to_string(), *m)))
        .unwrap_or((t.clone(), 1.0));
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a rate (such as 100mbit)"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("{s:?} is not a positive rate"));
    }
    Ok((v * mul) as u64)
}

mod wire;
pub use wire::{End, TunWire, ADDR_A, ADDR_B};

#[cfg(test)]
mod tests;

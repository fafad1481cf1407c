//! Deterministic simulation of primary and backup cores on a virtual
//! clock, with latency, reordering and link cuts; no sockets, no sleeps.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use remus_types::{Checkpoint, ChunkId, EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

use crate::*;

const PAGES: u64 = 256;

/// The backup's durable state: chunks and the memory image per epoch.
#[derive(Default)]
struct Backup {
    chunks: HashMap<ChunkId, Vec<u8>>,
    memory: Vec<u8>,
    committed: EpochId,
    roots: HashMap<EpochId, ChunkId>,
}

impl Backup {
    fn commit(&mut self, e: &ReceivedEpoch) {
        assert_eq!(e.header.epoch, self.committed.next(), "commits in order");
        let mut staged: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        for r in &e.records {
            let page = r
                .decode_page(|h| staged.get(h).or_else(|| self.chunks.get(h)).cloned())
                .unwrap_or_else(|err| panic!("epoch {}: {err}", e.header.epoch));
            self.memory[r.pfn.0 as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&page);
            staged.insert(r.hash, page);
        }
        self.chunks.extend(staged);
        self.committed = e.header.epoch;
        assert_eq!(MemoryDigest::of_image(&self.memory), e.memory_root, "memory root at {}", e.header.epoch);
        self.roots.insert(e.header.epoch, e.memory_root);
    }
}

enum Packet {
    ToBackupControl(Vec<u8>),
    ToBackupEpoch(Vec<u8>),
    ToPrimary(Vec<u8>),
}

struct Sim {
    now: Instant,
    rng: rand::rngs::SmallRng,
    net: Vec<(Instant, Packet)>,
    sender: SenderCore,
    receiver: Option<ReceiverCore>,
    backup: Backup,
    memory: Vec<u8>,
    epoch_bytes_sent: HashMap<EpochId, u32>,
    latency: Duration,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let now = Instant::now();
        let mut s = Self {
            now,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            net: Vec::new(),
            sender: SenderCore::new(SenderConfig::default(), GuestId(7), 1, PAGES),
            receiver: None,
            backup: Backup { memory: vec![0; PAGES as usize * PAGE_SIZE], ..Backup::default() },
            memory: vec![0; PAGES as usize * PAGE_SIZE],
            epoch_bytes_sent: HashMap::new(),
            latency: Duration::from_millis(50),
        };
        s.connect();
        s
    }

    fn connect(&mut self) {
        self.receiver = Some(ReceiverCore::new(self.now, Duration::from_millis(50), Duration::from_millis(500)));
        self.sender.handle_connected(self.now);
    }

    fn cut(&mut self) {
        self.net.clear();
        self.sender.handle_disconnected();
        self.receiver = None;
    }

    fn seal(&mut self, epoch: u64) {
        let mut pfns: Vec<u64> = (0..20).map(|_| self.rng.gen_range(0..PAGES)).collect();
        pfns.sort_unstable();
        pfns.dedup();
        for &p in &pfns {
            let page = &mut self.memory[p as usize * PAGE_SIZE..][..PAGE_SIZE];
            match self.rng.gen_range(0..4) {
                0 => page.fill(0),
                1 => page[self.rng.gen_range(0..PAGE_SIZE)] ^= 0x5a,
                2 => page.fill(self.rng.gen_range(0..4)),
                _ => self.rng.fill(page),
            }
        }
        let mut pages = Vec::new();
        for &p in &pfns {
            pages.extend_from_slice(&self.memory[p as usize * PAGE_SIZE..][..PAGE_SIZE]);
        }
        let cp = Checkpoint {
            guest: GuestId(7),
            epoch: EpochId(epoch),
            page_count: PAGES,
            pfns: pfns.into_iter().map(Pfn).collect(),
            pages,
            ..Checkpoint::default()
        };
        let root = self.sender.push_checkpoint(cp);
        assert_eq!(root, MemoryDigest::of_image(&self.memory));
    }

    /// Runs the network and both cores until `until`.
    fn run(&mut self, until: Instant) {
        while self.now < until {
            while let Some(t) = self.sender.poll_transmit() {
                let jitter = Duration::from_millis(self.rng.gen_range(0..30));
                let at = self.now + self.latency + jitter;
                match t {
                    Transmit::Control(b) => self.net.push((self.now + self.latency, Packet::ToBackupControl(b))),
                    Transmit::Epoch { epoch, bytes, .. } => {
                        *self.epoch_bytes_sent.entry(epoch).or_default() += 1;
                        self.net.push((at, Packet::ToBackupEpoch(bytes)));
                    }
                }
            }
            if let Some(rx) = self.receiver.as_mut() {
                while let Some(group) = rx.poll_commit() {
                    for e in &group {
                        self.backup.commit(e);
                    }
                    rx.handle_committed(group.last().expect("non-empty").header.epoch, ChunkId([1; 32]));
                }
                while let Some(b) = rx.poll_transmit() {
                    self.net.push((self.now + self.latency, Packet::ToPrimary(b)));
                }
            }
            self.net.sort_by_key(|(t, _)| *t);
            let step = self.now + Duration::from_millis(1);
            while self.net.first().is_some_and(|(t, _)| *t <= step) {
                let (_, p) = self.net.remove(0);
                self.deliver(p);
            }
            self.now = step;
            self.sender.handle_timeout(self.now);
            if let Some(rx) = self.receiver.as_mut() {
                rx.handle_timeout(self.now);
            }
        }
    }

    fn deliver(&mut self, p: Packet) {
        let now = self.now;
        if self.receiver.is_none() && !matches!(p, Packet::ToPrimary(_)) {
            return; // the backup is gone: packets to it are lost
        }
        match p {
            Packet::ToBackupControl(b) => {
                let (m, _) = Message::decode(&b).unwrap().unwrap();
                let rx = self.receiver.as_mut().unwrap();
                match m {
                    Message::Hello { guest, page_count, .. } => {
                        rx.accept(guest, page_count, self.backup.committed, ChunkId::default());
                    }
                    m => rx.handle_message(now, m).unwrap(),
                }
            }
            Packet::ToBackupEpoch(b) => self.receiver.as_mut().unwrap().handle_epoch_stream(now, &b).unwrap(),
            Packet::ToPrimary(b) => {
                let (m, _) = Message::decode(&b).unwrap().unwrap();
                self.sender.handle_message(now, m).unwrap();
            }
        }
    }
}

#[test]
fn epochs_commit_in_order_and_survive_link_cuts() {
    for seed in 0..8 {
        let mut sim = Sim::new(seed);
        let start = sim.now;
        for e in 1..=60u64 {
            sim.seal(e);
            sim.run(start + Duration::from_millis(25 * e));
            if e == 20 || e == 41 {
                sim.cut();
                sim.run(sim.now + Duration::from_millis(100));
                sim.connect();
            }
        }
        sim.run(sim.now + Duration::from_secs(2));
        assert_eq!(sim.backup.committed, EpochId(60), "seed {seed}");
        assert_eq!(sim.sender.acked(), EpochId(60));
        assert_eq!(sim.sender.unacked(), 0);
        assert_eq!(sim.backup.memory, sim.memory);
        // Only epochs not yet committed at a cut are sent twice.
        let resent = sim.epoch_bytes_sent.values().filter(|&&n| n > 1).count();
        assert!(resent <= 2 * SenderConfig::default().max_in_flight + 4, "seed {seed}: {resent} epochs resent");
    }
}

#[test]
fn a_silent_backup_is_noticed() {
    let mut sim = Sim::new(99);
    sim.seal(1);
    sim.run(sim.now + Duration::from_millis(300));
    assert!(sim.sender.is_connected());
    sim.receiver = None; // backup vanishes without closing
    sim.net.clear();
    sim.run(sim.now + Duration::from_millis(600));
    let mut silent = false;
    while let Some(e) = sim.sender.poll_event() {
        silent |= e == SenderEvent::PeerSilent;
    }
    assert!(silent);
}

#[test]
fn a_silent_primary_is_noticed_by_the_backup() {
    let now = Instant::now();
    let mut rx = ReceiverCore::new(now, Duration::from_millis(50), Duration::from_millis(150));
    rx.accept(GuestId(3), PAGES, EpochId(9), ChunkId::default());
    rx.handle_timeout(now + Duration::from_millis(100));
    assert_eq!(rx.poll_event(), None);
    rx.handle_timeout(now + Duration::from_millis(151));
    assert_eq!(rx.poll_event(), Some(ReceiverEvent::PrimaryLost { guest: GuestId(3), committed: EpochId(9) }));
}

#[test]
fn malformed_epoch_streams_are_refused() {
    let now = Instant::now();
    let mut rx = ReceiverCore::new(now, Duration::from_millis(50), Duration::from_millis(150));
    assert!(rx.handle_epoch_stream(now, b"RMUS").is_err(), "epoch before hello");
    rx.accept(GuestId(3), PAGES, EpochId(0), ChunkId::default());
    let header = EpochHeader { guest: GuestId(3), epoch: EpochId(1), time_unix_ns: 0, page_count: PAGES, pause_ns: 0, records: 2 };
    let mut s = Message::EpochBegin(header).to_bytes();
    Message::EpochEnd { epoch: EpochId(1), memory_root: ChunkId::default() }.encode(&mut s);
    assert_eq!(
        rx.handle_epoch_stream(now, &s),
        Err(ProtocolError::BadEpoch { epoch: EpochId(1), reason: "fewer records than announced" })
    );
    let other = Message::EpochBegin(EpochHeader { guest: GuestId(4), ..header }).to_bytes();
    assert!(matches!(rx.handle_epoch_stream(now, &other), Err(ProtocolError::BadEpoch { reason: "epoch of another guest", .. })));
    let mut flipped = s.clone();
    flipped[20] ^= 1;
    assert!(matches!(rx.handle_epoch_stream(now, &flipped), Err(ProtocolError::Decode(DecodeError::ChecksumMismatch))));
    assert_eq!(rx.poll_commit(), None);
}

#[test]
fn retained_checkpoints_are_bounded_while_the_backup_is_away() {
    let cfg = SenderConfig { max_retained_bytes: 3 * 20 * PAGE_SIZE, ..SenderConfig::default() };
    let mut s = SenderCore::new(cfg, GuestId(1), 1, PAGES);
    let cp = |e: u64| Checkpoint {
        guest: GuestId(1),
        epoch: EpochId(e),
        page_count: PAGES,
        pfns: (0..20).map(Pfn).collect(),
        pages: vec![e as u8; 20 * PAGE_SIZE],
        ..Checkpoint::default()
    };
    for e in 1..=2 {
        assert!(s.can_accept());
        s.push_checkpoint(cp(e));
    }
    s.push_checkpoint(cp(3));
    assert!(!s.can_accept(), "three epochs reach the bound");
    // An ack frees them.
    let now = Instant::now();
    s.handle_connected(now);
    s.handle_message(now, Message::Welcome { guest: GuestId(1), committed: EpochId(0), head: ChunkId::default() }).unwrap();
    s.handle_message(now, Message::Ack { epoch: EpochId(2), manifest: ChunkId::default() }).unwrap();
    assert!(s.can_accept());
    assert_eq!(s.unacked(), 1);
}

#[test]
fn an_error_before_welcome_is_a_refusal_and_after_it_is_retryable() {
    let now = Instant::now();
    let mut s = SenderCore::new(SenderConfig::default(), GuestId(1), 1, PAGES);
    s.handle_connected(now);
    assert_eq!(s.handle_message(now, Message::Error("fenced".into())), Err(ProtocolError::Refused("fenced".into())));
    s.handle_disconnected();
    s.handle_connected(now);
    s.handle_message(now, Message::Welcome { guest: GuestId(1), committed: EpochId(0), head: ChunkId::default() }).unwrap();
    assert_eq!(s.handle_message(now, Message::Error("disk full".into())), Err(ProtocolError::Peer("disk full".into())));
}

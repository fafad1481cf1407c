//! Deterministic simulation of primary and backup cores on a virtual
//! clock, with latency, reordering and link cuts; no sockets, no sleeps.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use remus_types::{Checkpoint, ChunkId, EpochId, GuestId, MemoryDigest, MergedCheckpoint, PagePool, Pfn, PAGE_SIZE};

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
    /// Commits a group, all or nothing: `Err` names every chunk it
    /// references (or uses as an XOR base) that is not held.
    fn commit(&mut self, group: &[ReceivedEpoch]) -> Result<(), Vec<ChunkId>> {
        let mut staged: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        let mut missing = Vec::new();
        let mut writes = Vec::new();
        for e in group {
            for r in &e.records {
                let lookup = |h: &ChunkId| staged.get(h).or_else(|| self.chunks.get(h)).cloned();
                match r.decode_page(lookup) {
                    Ok(page) => {
                        staged.insert(r.hash, page.clone());
                        writes.push((e.header.epoch, r.pfn, page));
                    }
                    Err(DecodeError::MissingBase(h)) => missing.push(h),
                    Err(err) => panic!("epoch {}: {err}", e.header.epoch),
                }
            }
        }
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            return Err(missing);
        }
        let mut writes = writes.into_iter().peekable();
        for e in group {
            assert!(e.header.epoch > self.committed && e.header.follows == self.committed, "commits in order, each once");
            assert_eq!(e.header.released_ahead, released_ahead(e.header.epoch), "the flag crosses as sealed");
            while let Some((_, pfn, page)) = writes.next_if(|(epoch, _, _)| *epoch == e.header.epoch) {
                self.memory[pfn.0 as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&page);
            }
            self.committed = e.header.epoch;
            assert_eq!(MemoryDigest::of_image(&self.memory), e.memory_root, "memory root at {}", e.header.epoch);
            self.roots.insert(e.header.epoch, e.memory_root);
        }
        self.chunks.extend(staged);
        Ok(())
    }

    /// The most aggressive retention: only the committed memory is kept,
    /// every chunk it does not show is deleted. Returns what was deleted.
    fn gc(&mut self) -> Vec<ChunkId> {
        let live: std::collections::HashSet<ChunkId> = self.memory.chunks_exact(PAGE_SIZE).map(remus_types::content_id).collect();
        let deleted: Vec<ChunkId> = self.chunks.keys().filter(|h| !live.contains(h)).copied().collect();
        for h in &deleted {
            self.chunks.remove(h);
        }
        deleted
    }
}

/// Which epochs the simulated primary marks as released ahead (any rule
/// does: the flag must cross as sealed, a merged epoch carrying its last).
fn released_ahead(epoch: EpochId) -> bool {
    epoch.0 % 3 == 0
}

/// A datagram in flight, by where it goes.
enum Packet {
    BackupControl(Vec<u8>),
    BackupEpoch(Vec<u8>),
    Primary(Vec<u8>),
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
    /// The epoch whose parts are being sent, and its bytes so far.
    parts: Option<(EpochId, Vec<u8>)>,
    latency: Duration,
    /// Commits refused for missing chunks.
    refusals: u32,
    /// Chunks the encoder forgot on the backup's Forget and Missing.
    forgotten: usize,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let now = Instant::now();
        let mut s = Self {
            now,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            net: Vec::new(),
            // Odd seeds send every epoch of more than five pages in parts
            // (a first copy's way), interleaved with acks and heartbeats.
            sender: SenderCore::new(
                SenderConfig {
                    slice_pages: if seed % 2 == 1 { 5 } else { SenderConfig::default().slice_pages },
                    ..SenderConfig::default()
                },
                GuestId(7),
                1,
                PAGES,
            ),
            receiver: None,
            backup: Backup { memory: vec![0; PAGES as usize * PAGE_SIZE], ..Backup::default() },
            memory: vec![0; PAGES as usize * PAGE_SIZE],
            epoch_bytes_sent: HashMap::new(),
            parts: None,
            latency: Duration::from_millis(50),
            refusals: 0,
            forgotten: 0,
        };
        s.connect();
        s
    }

    fn connect(&mut self) {
        self.receiver = Some(ReceiverCore::new(self.now, Duration::from_millis(50), Duration::from_millis(500), Duration::from_secs(5)));
        self.sender.handle_connected(self.now);
    }

    fn cut(&mut self) {
        self.net.clear();
        self.parts = None;
        self.sender.handle_disconnected();
        self.receiver = None;
    }

    fn seal(&mut self, epoch: u64) {
        let cp = self.write(epoch);
        let root = self.sender.push_checkpoint(cp);
        assert_eq!(root, MemoryDigest::of_image(&self.memory));
    }

    /// Writes some pages of the guest; returns the epoch's checkpoint.
    fn write(&mut self, epoch: u64) -> Checkpoint {
        let mut pfns: Vec<u64> = (0..20).map(|_| self.rng.gen_range(0..PAGES)).collect();
        pfns.sort_unstable();
        pfns.dedup();
        for &p in &pfns {
            let page = &mut self.memory[p as usize * PAGE_SIZE..][..PAGE_SIZE];
            match self.rng.gen_range(0..5) {
                0 => page.fill(0),
                1 => page[self.rng.gen_range(0..PAGE_SIZE)] ^= 0x5a,
                2 => page.fill(self.rng.gen_range(0..4)),
                // One of a pool of contents: a page returns to content
                // some page held before, which the backup may have dropped.
                3 => {
                    page.fill(0x11);
                    page[..2].copy_from_slice(&self.rng.gen_range(0..256u16).to_le_bytes());
                }
                _ => self.rng.fill(page),
            }
        }
        let mut pages = Vec::new();
        for &p in &pfns {
            pages.extend_from_slice(&self.memory[p as usize * PAGE_SIZE..][..PAGE_SIZE]);
        }
        Checkpoint {
            guest: GuestId(7),
            epoch: EpochId(epoch),
            page_count: PAGES,
            pfns: pfns.into_iter().map(Pfn).collect(),
            pages,
            released_ahead: released_ahead(EpochId(epoch)),
            ..Checkpoint::default()
        }
    }

    /// Runs the network and both cores until `until`.
    fn run(&mut self, until: Instant) {
        while self.now < until {
            while let Some(t) = self.sender.poll_transmit() {
                let jitter = Duration::from_millis(self.rng.gen_range(0..30));
                let at = self.now + self.latency + jitter;
                match t {
                    Transmit::Control(b) => self.net.push((self.now + self.latency, Packet::BackupControl(b))),
                    Transmit::Epoch { epoch, bytes, first, last, wire_bytes, .. } => {
                        // One stream: its parts in order, another epoch's
                        // only after its last.
                        assert_eq!(first, self.parts.is_none(), "epoch {epoch}: a first part opens a stream, and only then");
                        let (e, mut all) = self.parts.take().unwrap_or((epoch, Vec::new()));
                        assert_eq!(e, epoch, "the parts of one epoch at a time");
                        all.extend_from_slice(&bytes);
                        if !last {
                            self.parts = Some((epoch, all));
                            continue;
                        }
                        assert_eq!(wire_bytes, all.len() as u64);
                        *self.epoch_bytes_sent.entry(epoch).or_default() += 1;
                        self.net.push((at, Packet::BackupEpoch(all)));
                    }
                }
            }
            if let Some(rx) = self.receiver.as_mut() {
                while let Some(group) = rx.poll_commit() {
                    match self.backup.commit(&group) {
                        Ok(()) => rx.handle_committed(group.last().expect("non-empty").header.epoch, ChunkId([1; 32])),
                        Err(missing) => {
                            self.refusals += 1;
                            rx.handle_missing(&missing);
                        }
                    }
                }
                while let Some(b) = rx.poll_transmit() {
                    self.net.push((self.now + self.latency, Packet::Primary(b)));
                }
                while let Some(b) = rx.poll_forget() {
                    let jitter = Duration::from_millis(self.rng.gen_range(0..30));
                    self.net.push((self.now + self.latency + jitter, Packet::Primary(b)));
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
        if self.receiver.is_none() && !matches!(p, Packet::Primary(_)) {
            return; // the backup is gone: packets to it are lost
        }
        match p {
            Packet::BackupControl(b) => {
                let (m, _) = Message::decode(&b).unwrap().unwrap();
                let rx = self.receiver.as_mut().unwrap();
                match m {
                    Message::Hello { guest, page_count, .. } => {
                        rx.accept(guest, page_count, (self.backup.committed, ChunkId::default()), Vec::new());
                    }
                    m => rx.handle_message(now, m).unwrap(),
                }
            }
            Packet::BackupEpoch(b) => {
                self.receiver.as_mut().unwrap().handle_epoch_stream(now, &b).unwrap();
            }
            Packet::Primary(b) => {
                let (m, _) = Message::decode(&b).unwrap().unwrap();
                self.sender.handle_message(now, m).unwrap();
                while let Some(e) = self.sender.poll_event() {
                    if let SenderEvent::Forgot { held } = e {
                        self.forgotten += held;
                    }
                }
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

/// A backup cut off long enough is sent the epochs it missed merged into
/// one (the primary's fan-out to a far backup does so): it commits that
/// one after the last it holds, skipping those between, and reaches the
/// same memory.
#[test]
fn epochs_merged_while_the_backup_was_away_commit_as_one_that_follows_the_last_it_holds() {
    for seed in 0..8 {
        let mut sim = Sim::new(seed);
        let start = sim.now;
        let mut merged: Option<MergedCheckpoint> = None;
        for e in 1..=60u64 {
            if e == 20 {
                sim.cut();
            }
            let cp = sim.write(e);
            if (20..40).contains(&e) {
                match merged.as_mut() {
                    Some(m) => m.absorb(cp),
                    None => merged = Some(MergedCheckpoint::new(cp)),
                }
            } else {
                if let Some(m) = merged.take() {
                    sim.connect();
                    sim.sender.push_checkpoint(m.into_checkpoint());
                }
                let root = sim.sender.push_checkpoint(cp);
                assert_eq!(root, MemoryDigest::of_image(&sim.memory));
            }
            sim.run(start + Duration::from_millis(25 * e));
        }
        sim.run(sim.now + Duration::from_secs(2));
        assert_eq!(sim.backup.committed, EpochId(60), "seed {seed}");
        assert_eq!(sim.backup.memory, sim.memory);
        let mut kept: Vec<u64> = sim.backup.roots.keys().map(|e| e.0).filter(|e| (18..42).contains(e)).collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![18, 19, 39, 40, 41], "seed {seed}: the merged epochs are skipped");
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
        silent |= matches!(e, SenderEvent::PeerSilent(_));
    }
    assert!(silent);
}

#[test]
fn a_silent_primary_is_noticed_by_the_backup() {
    let now = Instant::now();
    let mut rx = ReceiverCore::new(now, Duration::from_millis(50), Duration::from_millis(150), Duration::from_secs(5));
    rx.accept(GuestId(3), PAGES, (EpochId(9), ChunkId::default()), Vec::new());
    rx.handle_timeout(now + Duration::from_millis(100));
    assert_eq!(rx.poll_event(), None);
    rx.handle_timeout(now + Duration::from_millis(151));
    match rx.poll_event() {
        Some(ReceiverEvent::PrimaryLost { guest: GuestId(3), committed: EpochId(9), silence }) => {
            assert_eq!(silence.silent_for, Duration::from_millis(151));
            assert_eq!(silence.timeout, Duration::from_millis(150));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_primary_whose_packets_keep_arriving_is_not_lost_while_its_heartbeats_are_late() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut rx = ReceiverCore::new(t0, ms(50), ms(500), Duration::from_secs(5));
    rx.accept(GuestId(3), PAGES, (EpochId(9), ChunkId::default()), Vec::new());
    // Two seconds without a single control message, but the transport
    // sees the primary's packets every 100 ms (bulk data, retransmissions).
    for i in 1..=20 {
        rx.handle_activity(t0 + ms(100) * i, true, ms(100));
        rx.handle_timeout(t0 + ms(100) * i);
    }
    assert_eq!(rx.poll_event(), None);
    // Then nothing at all: lost after the timeout, which three round trips
    // of 200 ms raise to 600 ms.
    let last = t0 + ms(2000);
    rx.handle_activity(last + ms(10), false, ms(200));
    rx.handle_timeout(last + ms(599));
    assert_eq!(rx.poll_event(), None);
    rx.handle_timeout(last + ms(600));
    assert!(matches!(rx.poll_event(), Some(ReceiverEvent::PrimaryLost { silence, .. }) if silence.timeout == ms(600)));
}

#[test]
fn a_primary_heard_irregularly_gets_more_time_before_it_counts_as_lost() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut rx = ReceiverCore::new(t0, ms(50), ms(500), Duration::from_secs(5));
    rx.accept(GuestId(3), PAGES, (EpochId(9), ChunkId::default()), Vec::new());
    let mut t = t0;
    for i in 0..100 {
        t += if i % 4 == 0 { ms(480) } else { ms(50) };
        rx.handle_message(t, Message::Heartbeat { epoch: EpochId(9) }).unwrap();
    }
    // A regular primary would be lost 500 ms after this; this one has often
    // been nearly that late and is given longer.
    rx.handle_timeout(t + ms(550));
    assert_eq!(rx.poll_event(), None);
    rx.handle_timeout(t + Duration::from_secs(5));
    assert!(matches!(rx.poll_event(), Some(ReceiverEvent::PrimaryLost { .. })));
}

#[test]
fn malformed_epoch_streams_are_refused() {
    let now = Instant::now();
    let mut rx = ReceiverCore::new(now, Duration::from_millis(50), Duration::from_millis(150), Duration::from_secs(5));
    assert!(rx.handle_epoch_stream(now, b"RMUS").is_err(), "epoch before hello");
    rx.accept(GuestId(3), PAGES, (EpochId(0), ChunkId::default()), Vec::new());
    let header = EpochHeader {
        guest: GuestId(3),
        epoch: EpochId(1),
        time_unix_ns: 0,
        page_count: PAGES,
        pause_ns: 0,
        records: 2,
        round: 0,
        follows: EpochId(0),
        released_ahead: false,
    };
    let mut s = Message::EpochBegin(header).to_bytes();
    Message::EpochEnd { epoch: EpochId(1), memory_root: ChunkId::default() }.encode(&mut s);
    assert_eq!(rx.handle_epoch_stream(now, &s), Err(ProtocolError::BadEpoch { epoch: EpochId(1), reason: "fewer records than announced" }));
    let other = Message::EpochBegin(EpochHeader { guest: GuestId(4), ..header }).to_bytes();
    assert!(matches!(rx.handle_epoch_stream(now, &other), Err(ProtocolError::BadEpoch { reason: "epoch of another guest", .. })));
    // A record count no epoch of this guest can have is refused before
    // anything is allocated for it.
    let huge = Message::EpochBegin(EpochHeader { records: u32::MAX, ..header }).to_bytes();
    assert!(matches!(
        rx.handle_epoch_stream(now, &huge),
        Err(ProtocolError::BadEpoch { reason: "more records than the guest has pages", .. })
    ));
    let mut flipped = s.clone();
    flipped[20] ^= 1;
    assert!(matches!(
        rx.handle_epoch_stream(now, &flipped),
        Err(ProtocolError::Decode(DecodeError::Format(remus_types::FormatError::ChecksumMismatch { .. })))
    ));
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
fn acknowledged_checkpoints_hand_their_page_buffers_back_and_unacknowledged_ones_keep_them() {
    let pool = PagePool::default();
    let mut s = SenderCore::new(SenderConfig::default(), GuestId(1), 1, PAGES).recycling_pages_into(pool.clone());
    for e in 1..=3u64 {
        let mut pages = Vec::with_capacity(40 * PAGE_SIZE);
        pages.resize(20 * PAGE_SIZE, e as u8);
        s.push_checkpoint(Checkpoint {
            guest: GuestId(1),
            epoch: EpochId(e),
            page_count: PAGES,
            pfns: (0..20).map(Pfn).collect(),
            pages,
            ..Checkpoint::default()
        });
    }
    assert!(pool.take(1).is_none(), "nothing handed back before an ack");
    let now = Instant::now();
    s.handle_connected(now);
    s.handle_message(now, Message::Welcome { guest: GuestId(1), committed: EpochId(0), head: ChunkId::default() }).unwrap();
    s.handle_message(now, Message::Ack { epoch: EpochId(2), manifest: ChunkId::default() }).unwrap();
    for _ in 1..=2 {
        let buf = pool.take(40 * PAGE_SIZE).expect("an acknowledged epoch's buffer, whole");
        assert!(buf.is_empty());
    }
    assert!(pool.take(1).is_none(), "epoch 3 is not acknowledged: its buffer stays with it");
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

/// The backup's GC deletes every chunk its committed memory does not show
/// (the most aggressive retention) every fourth epoch, while pages return
/// to old content and the link is cut once. Whether the deletions are
/// relayed (Forget) or not, every epoch commits once, in order, and the
/// backup ends with the primary's memory; without Forget, refusals
/// (Missing) and resends carry it alone.
#[test]
fn gc_at_the_backup_never_stalls_the_primary() {
    for relay in [false, true] {
        let (mut refusals, mut forgotten) = (0, 0);
        for seed in 0..8 {
            let mut sim = Sim::new(seed);
            let start = sim.now;
            for e in 1..=80u64 {
                sim.seal(e);
                sim.run(start + Duration::from_millis(25 * e));
                if e % 4 == 0 {
                    let deleted = sim.backup.gc();
                    if let (true, Some(rx)) = (relay, sim.receiver.as_mut()) {
                        rx.handle_chunks_deleted(&deleted);
                    }
                }
                if e == 50 {
                    sim.cut();
                    sim.run(sim.now + Duration::from_millis(100));
                    sim.connect();
                }
            }
            sim.run(sim.now + Duration::from_secs(2));
            assert_eq!(sim.backup.committed, EpochId(80), "relay {relay} seed {seed}");
            assert_eq!(sim.sender.acked(), EpochId(80));
            assert_eq!(sim.sender.unacked(), 0);
            assert_eq!(sim.backup.memory, sim.memory);
            refusals += sim.refusals;
            forgotten += sim.forgotten;
        }
        eprintln!("relay {relay}: {refusals} refusals, {forgotten} chunks forgotten");
        if relay {
            assert!(forgotten > 0, "no deletion reached the encoder");
        } else {
            assert!(refusals > 0, "GC never removed a chunk the primary named: the test tests nothing");
            assert_eq!(forgotten, 0);
        }
    }
}

fn epoch_stream(epoch: u64, round: u32, records: Vec<PageRecord>) -> Vec<u8> {
    let header = EpochHeader {
        guest: GuestId(3),
        epoch: EpochId(epoch),
        time_unix_ns: 0,
        page_count: PAGES,
        pause_ns: 0,
        records: records.len() as u32,
        round,
        follows: EpochId(epoch - 1),
        released_ahead: false,
    };
    let mut s = Message::EpochBegin(header).to_bytes();
    Message::Pages(records).encode(&mut s);
    Message::DeviceState(Vec::new()).encode(&mut s);
    Message::EpochEnd { epoch: EpochId(epoch), memory_root: ChunkId::default() }.encode(&mut s);
    s
}

fn control(rx: &mut ReceiverCore) -> Vec<Message> {
    std::iter::from_fn(|| rx.poll_transmit()).map(|b| Message::decode(&b).unwrap().unwrap().0).collect()
}

#[test]
fn a_refused_commit_opens_a_round_and_drops_what_was_encoded_before_it() {
    let now = Instant::now();
    let mut rx = ReceiverCore::new(now, Duration::from_millis(50), Duration::from_millis(500), Duration::from_secs(5));
    rx.accept(GuestId(3), PAGES, (EpochId(4), ChunkId::default()), Vec::new());
    let gone = ChunkId([5; 32]);
    let reference = || vec![PageRecord { pfn: Pfn(1), hash: gone, encoding: PageEncoding::Ref }];
    rx.handle_epoch_stream(now, &epoch_stream(5, 0, reference())).unwrap();
    rx.handle_epoch_stream(now, &epoch_stream(6, 0, Vec::new())).unwrap();
    assert_eq!(rx.poll_commit().unwrap().len(), 2);
    rx.handle_epoch_stream(now, &epoch_stream(7, 0, Vec::new())).unwrap();
    // The store refuses the group: nothing committed, everything dropped.
    rx.handle_missing(&[gone]);
    assert_eq!((rx.committed(), rx.waiting(), rx.round()), (EpochId(4), 0, 1));
    let sent = control(&mut rx);
    assert_eq!(sent.last(), Some(&Message::Missing { round: 1, epoch: EpochId(5), chunks: vec![gone] }));
    assert!(!sent.iter().any(|m| matches!(m, Message::Ack { .. })), "nothing acknowledged: {sent:?}");
    // An encoding of the old round still in flight is dropped on arrival.
    rx.handle_epoch_stream(now, &epoch_stream(6, 0, Vec::new())).unwrap();
    assert_eq!((rx.waiting(), rx.poll_commit()), (0, None));
    assert_eq!(
        rx.handle_epoch_stream(now, &epoch_stream(5, 2, Vec::new())),
        Err(ProtocolError::BadEpoch { epoch: EpochId(5), reason: "epoch of a refusal round not yet opened" })
    );
    // The new round's encodings commit, once.
    rx.handle_epoch_stream(now, &epoch_stream(6, 1, Vec::new())).unwrap();
    rx.handle_epoch_stream(now, &epoch_stream(5, 1, Vec::new())).unwrap();
    let group = rx.poll_commit().unwrap();
    assert_eq!(group.iter().map(|e| (e.header.epoch.0, e.header.round)).collect::<Vec<_>>(), vec![(5, 1), (6, 1)]);
    rx.handle_committed(EpochId(6), ChunkId([6; 32]));
    assert_eq!(control(&mut rx), vec![Message::Ack { epoch: EpochId(6), manifest: ChunkId([6; 32]) }]);

    // A list too long for one frame: the excess goes first, as Forget.
    let many: Vec<ChunkId> = (0..MAX_CHUNK_LIST as u32 + 3).map(|i| ChunkId(blake3::hash(&i.to_le_bytes()).into())).collect();
    rx.handle_missing(&many);
    let sent = control(&mut rx);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], Message::Forget(many[..3].to_vec()));
    assert_eq!(sent[1], Message::Missing { round: 2, epoch: EpochId(7), chunks: many[3..].to_vec() });
    // Deletions are relayed as Forget frames for a stream of their own.
    rx.handle_chunks_deleted(&many);
    assert_eq!(control(&mut rx), vec![]);
    let relayed: Vec<Message> = std::iter::from_fn(|| rx.poll_forget()).map(|b| Message::decode(&b).unwrap().unwrap().0).collect();
    assert_eq!(relayed, vec![Message::Forget(many[..MAX_CHUNK_LIST].to_vec()), Message::Forget(many[MAX_CHUNK_LIST..].to_vec())]);
}

#[test]
fn after_missing_the_sender_resends_in_full_for_the_new_round() {
    let now = Instant::now();
    let mut s = SenderCore::new(SenderConfig::default(), GuestId(3), 1, PAGES);
    let text: Vec<u8> = b"content the backup will collect ".iter().copied().cycle().take(PAGE_SIZE).collect();
    let hash = remus_types::content_id(&text);
    let cp = |e: u64, pfn: u64| Checkpoint {
        guest: GuestId(3),
        epoch: EpochId(e),
        page_count: PAGES,
        pfns: vec![Pfn(pfn)],
        pages: text.clone(),
        ..Checkpoint::default()
    };
    let next_epoch = |s: &mut SenderCore| loop {
        match s.poll_transmit() {
            Some(Transmit::Epoch { bytes, .. }) => {
                let mut rd = FrameReader::default();
                rd.push(&bytes);
                let Some(Message::EpochBegin(h)) = rd.next_message().unwrap() else { panic!("no EpochBegin") };
                let Some(Message::Pages(records)) = rd.next_message().unwrap() else { panic!("no Pages") };
                return (h, records);
            }
            Some(Transmit::Control(_)) => {}
            None => panic!("nothing to send"),
        }
    };
    s.handle_connected(now);
    s.handle_message(now, Message::Welcome { guest: GuestId(3), committed: EpochId(0), head: ChunkId::default() }).unwrap();
    s.push_checkpoint(cp(1, 0));
    assert!(matches!(next_epoch(&mut s).1[0].encoding, PageEncoding::RawZstd(_)));
    s.handle_message(now, Message::Ack { epoch: EpochId(1), manifest: ChunkId::default() }).unwrap();
    s.push_checkpoint(cp(2, 1));
    let (h, records) = next_epoch(&mut s);
    assert_eq!((h.epoch, h.round), (EpochId(2), 0));
    assert_eq!(records[0].encoding, PageEncoding::Ref);
    // Refusals must come in order and for the next epoch to commit.
    let missing = |round, epoch| Message::Missing { round, epoch: EpochId(epoch), chunks: vec![hash] };
    assert_eq!(s.handle_message(now, missing(2, 2)), Err(ProtocolError::Unexpected("missing out of round")));
    assert!(matches!(s.handle_message(now, missing(1, 3)), Err(ProtocolError::Unexpected(_))));
    s.handle_message(now, missing(1, 2)).unwrap();
    assert_eq!(s.poll_event(), Some(SenderEvent::Acked { epoch: EpochId(1), manifest: ChunkId::default() }));
    assert_eq!(s.poll_event(), Some(SenderEvent::Resending { from: EpochId(2), missing: 1 }));
    let (h, records) = next_epoch(&mut s);
    assert_eq!((h.epoch, h.round), (EpochId(2), 1));
    assert!(matches!(records[0].encoding, PageEncoding::RawZstd(_)), "sent in full: {:?}", records[0].encoding);
    // Forget of a hash held again (it was just sent in full) drops it.
    s.handle_message(now, Message::Forget(vec![hash, ChunkId([1; 32])])).unwrap();
    assert_eq!(s.poll_event(), Some(SenderEvent::Forgot { held: 1 }));
    // A new connection starts at round 0 again.
    s.handle_disconnected();
    s.handle_connected(now);
    s.handle_message(now, Message::Welcome { guest: GuestId(3), committed: EpochId(1), head: ChunkId::default() }).unwrap();
    assert_eq!(next_epoch(&mut s).0.round, 0);
}

#[test]
fn a_new_run_asks_what_the_backup_holds_and_sends_those_pages_by_reference() {
    let now = Instant::now();
    let mut s = SenderCore::new(SenderConfig::default(), GuestId(3), 1, PAGES);
    let page = |b: u8| -> Vec<u8> { b"a page the backup may hold ".iter().map(|c| c ^ b).cycle().take(PAGE_SIZE).collect() };
    let (there, new) = (page(1), page(2));
    let hello = |s: &mut SenderCore| {
        s.handle_connected(now);
        match s.poll_transmit() {
            Some(Transmit::Control(b)) => Message::decode(&b).unwrap().unwrap().0,
            other => panic!("no Hello: {other:?}"),
        }
    };
    assert!(matches!(hello(&mut s), Message::Hello { wants_holds: true, .. }), "a run that knows nothing asks");
    s.handle_message(now, Message::Holds(vec![remus_types::content_id(&there), ChunkId([9; 32])])).unwrap();
    s.handle_message(now, Message::Holds(vec![ChunkId([9; 32])])).unwrap();
    assert_eq!(s.assumed(), 2, "counted once each");
    s.handle_message(now, Message::Welcome { guest: GuestId(3), committed: EpochId(0), head: ChunkId::default() }).unwrap();
    assert_eq!(s.handle_message(now, Message::Holds(vec![])), Err(ProtocolError::Unexpected("holds after the welcome")));
    let mut pages = there.clone();
    pages.extend_from_slice(&new);
    s.push_checkpoint(Checkpoint {
        guest: GuestId(3),
        epoch: EpochId(1),
        page_count: PAGES,
        pfns: vec![Pfn(0), Pfn(1)],
        pages,
        ..Checkpoint::default()
    });
    let records = loop {
        match s.poll_transmit() {
            Some(Transmit::Epoch { bytes, .. }) => {
                let mut rd = FrameReader::default();
                rd.push(&bytes);
                assert!(matches!(rd.next_message().unwrap(), Some(Message::EpochBegin(_))));
                let Some(Message::Pages(records)) = rd.next_message().unwrap() else { panic!("no Pages") };
                break records;
            }
            Some(Transmit::Control(_)) => {}
            None => panic!("nothing to send"),
        }
    };
    assert_eq!(records[0].encoding, PageEncoding::Ref, "the page the backup holds goes by reference");
    assert!(matches!(records[1].encoding, PageEncoding::RawZstd(_)), "{:?}", records[1].encoding);
    // The same run reconnecting knows what the backup holds: it does not
    // ask again.
    s.handle_disconnected();
    assert!(matches!(hello(&mut s), Message::Hello { wants_holds: false, .. }));
}

#[test]
fn the_backup_lists_what_the_guest_holds_before_its_welcome_in_frames_of_bounded_size() {
    let mut rx = ReceiverCore::new(Instant::now(), Duration::from_millis(50), Duration::from_secs(1), Duration::from_secs(5));
    let many: Vec<ChunkId> = (0..MAX_CHUNK_LIST as u32 + 3).map(|i| ChunkId(blake3::hash(&i.to_le_bytes()).into())).collect();
    rx.accept(GuestId(3), PAGES, (EpochId(9), ChunkId([1; 32])), many.clone());
    assert_eq!(
        control(&mut rx),
        vec![
            Message::Holds(many[..MAX_CHUNK_LIST].to_vec()),
            Message::Holds(many[MAX_CHUNK_LIST..].to_vec()),
            Message::Welcome { guest: GuestId(3), committed: EpochId(9), head: ChunkId([1; 32]) }
        ]
    );
}

#[test]
fn datagram_copies_are_advisory_and_an_ack_counts_only_once_welcomed() {
    let now = Instant::now();
    let mut s = SenderCore::new(SenderConfig::default(), GuestId(7), 1, PAGES);
    for e in 1..=3 {
        s.push_checkpoint(Checkpoint { guest: GuestId(7), epoch: EpochId(e), page_count: PAGES, ..Checkpoint::default() });
    }
    s.handle_connected(now);
    // Overtaking the Welcome: ignored, not an error.
    s.handle_datagram(now, &Message::Ack { epoch: EpochId(2), manifest: ChunkId::default() });
    assert_eq!(s.acked(), EpochId(0));
    s.handle_message(now, Message::Welcome { guest: GuestId(7), committed: EpochId(0), head: ChunkId::default() }).unwrap();
    s.handle_datagram(now, &Message::Ack { epoch: EpochId(2), manifest: ChunkId::default() });
    assert_eq!(s.acked(), EpochId(2));
    // A stale copy, one for an epoch never sealed, or another message: ignored.
    s.handle_datagram(now, &Message::Ack { epoch: EpochId(1), manifest: ChunkId::default() });
    s.handle_datagram(now, &Message::Ack { epoch: EpochId(9), manifest: ChunkId::default() });
    s.handle_datagram(now, &Message::Welcome { guest: GuestId(8), committed: EpochId(3), head: ChunkId::default() });
    assert_eq!(s.acked(), EpochId(2));
    // The stream's own copy of the same ack is harmless.
    s.handle_message(now, Message::Ack { epoch: EpochId(2), manifest: ChunkId::default() }).unwrap();
    assert_eq!(s.acked(), EpochId(2));
    let acks = std::iter::from_fn(|| s.poll_event()).filter(|e| matches!(e, SenderEvent::Acked { .. })).count();
    assert_eq!(acks, 1, "one acknowledgement event for epoch 2");
}

#[test]
fn acknowledgements_and_heartbeats_are_also_offered_as_datagrams() {
    let now = Instant::now();
    let mut rx = ReceiverCore::new(now, Duration::from_millis(50), Duration::from_millis(500), Duration::from_secs(5));
    rx.accept(GuestId(3), PAGES, (EpochId(0), ChunkId::default()), Vec::new());
    rx.handle_timeout(now + Duration::from_millis(50));
    let datagrams: Vec<Message> = std::iter::from_fn(|| rx.poll_datagram())
        .map(|b| {
            let mut rd = FrameReader::default();
            rd.push(&b);
            rd.next_message().unwrap().expect("one whole frame")
        })
        .collect();
    assert!(datagrams.iter().any(|m| matches!(m, Message::Heartbeat { .. })), "{datagrams:?}");
    assert!(!datagrams.iter().any(|m| matches!(m, Message::Welcome { .. })), "the Welcome goes on the stream only");
}

#[test]
fn a_cause_the_message_names_is_not_also_its_source() {
    // A chained print ({:#}, what the command line shows) walks source():
    // a cause already in the message must not be walked to again.
    let e = LinkError::from(std::io::Error::other("boom"));
    assert_eq!(e.to_string(), "socket: boom");
    assert!(std::error::Error::source(&e).is_none());
    let e = LinkError::from(StreamError::from(DecodeError::Corrupt("bad frame")));
    assert_eq!(e.to_string(), "decode: corrupt: bad frame");
    assert!(std::error::Error::source(&e).and_then(std::error::Error::source).is_none(), "said once");
}

#[test]
fn a_handover_is_asked_once_per_connection_without_waiting_for_the_last_ack_and_ends_on_the_answer() {
    let now = Instant::now();
    let mut s = SenderCore::new(SenderConfig::default(), GuestId(1), 1, PAGES);
    let welcome = |committed| Message::Welcome { guest: GuestId(1), committed: EpochId(committed), head: ChunkId::default() };
    let handovers = |s: &mut SenderCore| {
        std::iter::from_fn(|| s.poll_transmit())
            .filter_map(|t| match t {
                Transmit::Control(b) => Some(b),
                _ => None,
            })
            .filter_map(|b| match Message::decode(&b) {
                Ok(Some((Message::Handover { epoch }, _))) => Some(epoch.0),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    s.push_checkpoint(Checkpoint { guest: GuestId(1), epoch: EpochId(1), page_count: PAGES, ..Checkpoint::default() });
    s.want_handover();
    assert!(!s.send_handover(), "not before connected");
    s.handle_connected(now);
    s.handle_message(now, welcome(0)).unwrap();
    // Asked for the last epoch sealed while it is still unacknowledged:
    // the backup takes the guest over once it has committed it.
    assert!(s.send_handover());
    assert!(!s.send_handover(), "once per connection");
    assert_eq!(handovers(&mut s), vec![1]);
    assert!(s.handover_pending());
    // The answer comes after the epoch's Ack; before it, it is refused.
    assert!(s.handle_message(now, Message::Handover { epoch: EpochId(1) }).is_err());
    // The connection breaks before the answer: asked again on the next.
    s.handle_disconnected();
    s.handle_connected(now);
    s.handle_message(now, welcome(1)).unwrap();
    assert!(s.send_handover());
    assert_eq!(handovers(&mut s), vec![1]);
    s.handle_message(now, Message::Handover { epoch: EpochId(1) }).unwrap();
    assert_eq!((s.handed_over(), s.handover_pending()), (Some(EpochId(1)), false));
    assert!(std::iter::from_fn(|| s.poll_event()).any(|e| matches!(e, SenderEvent::HandedOver { epoch: EpochId(1) })));
    // An answer nobody asked for is a protocol error.
    let mut other = SenderCore::new(SenderConfig::default(), GuestId(1), 1, PAGES);
    other.handle_connected(now);
    other.handle_message(now, welcome(0)).unwrap();
    assert!(other.handle_message(now, Message::Handover { epoch: EpochId(0) }).is_err());
}

#[test]
fn a_handover_asked_before_its_epoch_commits_is_taken_once_it_has_and_nothing_after_it_is_accepted() {
    let now = Instant::now();
    let mut rx = ReceiverCore::new(now, Duration::from_millis(50), Duration::from_millis(500), Duration::from_secs(5));
    rx.accept(GuestId(3), PAGES, (EpochId(4), ChunkId::default()), Vec::new());
    assert!(
        matches!(rx.handle_message(now, Message::Handover { epoch: EpochId(3) }), Err(ProtocolError::BadEpoch { .. })),
        "not at an epoch before the last committed"
    );
    // Asked at epoch 6 while 5 and 6 are still on their way.
    rx.handle_message(now, Message::Handover { epoch: EpochId(6) }).unwrap();
    rx.handle_epoch_stream(now, &epoch_stream(5, 0, Vec::new())).unwrap();
    assert_eq!(rx.poll_commit().unwrap().len(), 1);
    rx.handle_committed(EpochId(5), ChunkId([5; 32]));
    assert_eq!(rx.poll_event(), None, "not before epoch 6 is committed");
    assert_eq!(
        rx.handle_epoch_stream(now, &epoch_stream(7, 0, Vec::new())),
        Err(ProtocolError::BadEpoch { epoch: EpochId(7), reason: "epoch after the one the guest was handed over at" })
    );
    rx.handle_epoch_stream(now, &epoch_stream(6, 0, Vec::new())).unwrap();
    assert_eq!(rx.poll_commit().unwrap().len(), 1);
    assert_eq!(rx.poll_event(), None, "not while it is being committed");
    rx.handle_committed(EpochId(6), ChunkId([6; 32]));
    // Its Ack goes first, then the takeover.
    assert_eq!(
        control(&mut rx),
        vec![
            Message::Welcome { guest: GuestId(3), committed: EpochId(4), head: ChunkId::default() },
            Message::Ack { epoch: EpochId(5), manifest: ChunkId([5; 32]) },
            Message::Ack { epoch: EpochId(6), manifest: ChunkId([6; 32]) }
        ]
    );
    assert_eq!(rx.poll_event(), Some(ReceiverEvent::Handover { guest: GuestId(3), epoch: EpochId(6) }));
    // Asked at the epoch already committed: at once.
    let mut rx = ReceiverCore::new(now, Duration::from_millis(50), Duration::from_millis(500), Duration::from_secs(5));
    rx.accept(GuestId(3), PAGES, (EpochId(4), ChunkId::default()), Vec::new());
    rx.handle_message(now, Message::Handover { epoch: EpochId(4) }).unwrap();
    assert_eq!(rx.poll_event(), Some(ReceiverEvent::Handover { guest: GuestId(3), epoch: EpochId(4) }));
}

#[test]
fn a_large_epoch_goes_out_in_parts_and_one_refused_part_way_is_finished_then_sent_again_in_full() {
    let now = Instant::now();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut page = || -> Vec<u8> { (0..PAGE_SIZE).map(|_| rng.gen_range(0..4u8)).collect() };
    let cp = |e: u64, pages: &[Vec<u8>]| Checkpoint {
        guest: GuestId(3),
        epoch: EpochId(e),
        page_count: PAGES,
        pfns: (0..pages.len() as u64).map(Pfn).collect(),
        pages: pages.concat(),
        ..Checkpoint::default()
    };
    // Every part of the next epoch (control frames between them skipped),
    // and its records, from the concatenated stream.
    let next_epoch = |s: &mut SenderCore| {
        let (mut parts, mut all) = (Vec::new(), Vec::new());
        loop {
            match s.poll_transmit() {
                Some(Transmit::Epoch { bytes, first, last, wire_bytes, .. }) => {
                    assert_eq!(first, parts.is_empty());
                    all.extend_from_slice(&bytes);
                    assert_eq!(wire_bytes, all.len() as u64);
                    parts.push(bytes);
                    if last {
                        break;
                    }
                }
                Some(Transmit::Control(_)) => {}
                None => panic!("nothing to send"),
            }
        }
        let mut rd = FrameReader::default();
        rd.push(&all);
        let Some(Message::EpochBegin(h)) = rd.next_message().unwrap() else { panic!("no EpochBegin") };
        let mut records = Vec::new();
        loop {
            match rd.next_message().unwrap() {
                Some(Message::Pages(r)) => records.extend(r),
                Some(Message::DeviceState(_)) => {}
                Some(Message::EpochEnd { epoch, .. }) => {
                    assert_eq!(epoch, h.epoch);
                    break;
                }
                m => panic!("unexpected {m:?}"),
            }
        }
        assert_eq!(rd.pending(), 0);
        (parts.len(), h, records)
    };
    let connect = |slice_pages| {
        let mut s = SenderCore::new(SenderConfig { slice_pages, ..SenderConfig::default() }, GuestId(3), 1, PAGES);
        s.handle_connected(now);
        s.handle_message(now, Message::Welcome { guest: GuestId(3), committed: EpochId(0), head: ChunkId::default() }).unwrap();
        s
    };
    let (mut parted, mut whole) = (connect(4), connect(4096));
    let first: Vec<Vec<u8>> = (0..3).map(|_| page()).collect();
    let mut second: Vec<Vec<u8>> = (0..7).map(|_| page()).collect();
    second.extend(first.iter().cloned());
    for s in [&mut parted, &mut whole] {
        s.push_checkpoint(cp(1, &first));
        assert_eq!(next_epoch(s).0, 1);
        s.handle_message(now, Message::Ack { epoch: EpochId(1), manifest: ChunkId::default() }).unwrap();
        s.push_checkpoint(cp(2, &second));
    }
    // Ten pages in slices of four: three parts, the same records as in one
    // piece (the last three pages the backup holds: references).
    let (n, h, records) = next_epoch(&mut parted);
    assert_eq!((n, h.records), (3, 10));
    assert_eq!(records, next_epoch(&mut whole).2);
    assert!(records[7..].iter().all(|r| r.encoding == PageEncoding::Ref));
    parted.handle_message(now, Message::Ack { epoch: EpochId(2), manifest: ChunkId::default() }).unwrap();

    // Refused after its first part: the rest goes out (in the old round,
    // which the backup drops), then the epoch again, in the new round,
    // every page in full: none counts as held.
    let third: Vec<Vec<u8>> = (0..10).map(|_| page()).collect();
    parted.push_checkpoint(cp(3, &third));
    let Some(Transmit::Epoch { first: true, last: false, .. }) = parted.poll_transmit() else { panic!("no first part") };
    parted.handle_message(now, Message::Missing { round: 1, epoch: EpochId(3), chunks: vec![ChunkId([9; 32])] }).unwrap();
    let mut rest = 0;
    loop {
        match parted.poll_transmit() {
            Some(Transmit::Epoch { first: false, last, .. }) => {
                rest += 1;
                if last {
                    break;
                }
            }
            Some(Transmit::Control(_)) => {}
            t => panic!("the refused epoch's parts first, got {t:?}"),
        }
    }
    assert_eq!(rest, 2);
    let (n, h, records) = next_epoch(&mut parted);
    assert_eq!((n, h.epoch, h.round), (3, EpochId(3), 1));
    assert!(records.iter().all(|r| r.encoding != PageEncoding::Ref), "{records:?}");
    // A cut part-way: after the reconnect the epoch starts over.
    parted.push_checkpoint(cp(4, &third[..6]));
    let Some(Transmit::Epoch { first: true, last: false, .. }) = parted.poll_transmit() else { panic!("no first part") };
    parted.handle_disconnected();
    parted.handle_connected(now);
    parted.handle_message(now, Message::Welcome { guest: GuestId(3), committed: EpochId(2), head: ChunkId::default() }).unwrap();
    let (n, h, _) = next_epoch(&mut parted);
    assert_eq!((n, h.epoch, h.round), (3, EpochId(3), 0));
    assert_eq!(next_epoch(&mut parted).1.epoch, EpochId(4));
}

//! The primary's side of the protocol, sans IO: no sockets, no clock of
//! its own. The driver feeds it checkpoints ([`SenderCore::push_checkpoint`]),
//! control messages ([`SenderCore::handle_message`]) and time
//! ([`SenderCore::handle_timeout`]), and drains
//! [`SenderCore::poll_transmit`] and [`SenderCore::poll_event`].
//!
//! Several epochs may be in flight (up to `max_in_flight`). Every
//! checkpoint is retained until acknowledged; after a reconnect the
//! backup's Welcome says what it committed, the encoder forgets every hash
//! it sent later, and the retained epochs are encoded and sent again, so
//! nothing the backup holds is resent and nothing it lacks is referenced.
//!
//! The backup's GC may delete chunks the encoder still counts as held.
//! It says so with Forget (the encoder drops them); an epoch encoded
//! before that arrived and naming one is refused with Missing, and the
//! sender then does what it does after a reconnect (forget what was sent
//! after the committed epoch, plus the missing chunks, and send every
//! unacknowledged epoch again) within the connection, tagging the new
//! encodings with Missing's round so that the backup can tell them from
//! the refused ones still in flight.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use remus_types::{Checkpoint, ChunkId, EpochId, GuestId, MemoryDigest, PagePool};

use crate::encoding::{EncoderConfig, EncodingMix, PageEncoder, SharedFrames};
use crate::error::ProtocolError;
use crate::frame::{EpochHeader, Message};
use crate::liveness::{Pulse, Silence};

/// Tuning of the sender.
#[derive(Debug, Clone, Copy)]
pub struct SenderConfig {
    /// Epochs sent but not yet acknowledged, at most (default 256: 6.4 s
    /// at 40 Hz). Throughput is at most this many epochs per round of
    /// acknowledgement (the round trip plus the time to send what is
    /// queued ahead), so a small window on a long path caps the rate below
    /// what the guest produces and output waits on a backlog that never
    /// drains (16 at 100 ms RTT held output 3.4 s). Memory stays bounded by
    /// `max_retained_bytes`.
    pub max_in_flight: usize,
    /// Heartbeat period (default 50 ms).
    pub heartbeat: Duration,
    /// Silence after which the backup counts as lost, at the least
    /// (default 10 heartbeats); longer when it has been heard irregularly
    /// (see [`Liveness`]).
    pub peer_timeout: Duration,
    /// Silence after which the backup counts as lost, at the most
    /// (default 5 s).
    pub peer_timeout_max: Duration,
    /// Target payload bytes per Pages frame (default 256 KiB).
    pub batch_bytes: usize,
    /// Pages encoded per turn of a large epoch (default 4096): an epoch
    /// with more dirty pages (a first copy, a burst) goes out in parts as
    /// they are encoded, on one stream, so the link carries the first
    /// while the rest are encoded, and acknowledgements and heartbeats are
    /// handled between parts.
    pub slice_pages: usize,
    /// Bytes of unacknowledged checkpoints kept for resending, at most
    /// (default 2 GiB). Beyond it the sender takes no new checkpoint, so
    /// the capture engine blocks and the guest runs on in a longer epoch:
    /// memory stays bounded while the backup is away.
    pub max_retained_bytes: usize,
    /// Page encoder tuning.
    pub encoder: EncoderConfig,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            heartbeat: Duration::from_millis(50),
            peer_timeout: Duration::from_millis(500),
            peer_timeout_max: Duration::from_secs(5),
            batch_bytes: 256 << 10,
            slice_pages: 4096,
            max_retained_bytes: 2 << 30,
            encoder: EncoderConfig::default(),
        }
    }
}

/// What the driver must send.
#[derive(Debug)]
pub enum Transmit {
    /// Frames for the control stream.
    Control(Vec<u8>),
    /// An epoch, or a part of one, for a stream of its own: the parts of
    /// an epoch come one after another (other transmits between them),
    /// the first opening its stream, the last finishing it.
    Epoch {
        /// The epoch.
        epoch: EpochId,
        /// Its frames (this part's).
        bytes: Vec<u8>,
        /// Its first part: a new stream.
        first: bool,
        /// Its last part: the stream ends after it.
        last: bool,
        /// Bytes of the epoch so far, this part's included (at the last
        /// part, its size on the wire).
        wire_bytes: u64,
        /// Dirty pages it carries.
        pages: u64,
        /// How they were encoded so far.
        mix: EncodingMix,
        /// True when this epoch went on the wire before (a reconnect or a
        /// refusal) and is sent again.
        resent: bool,
    },
}

/// What happened, for the driver and the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum SenderEvent {
    /// The backup committed every epoch up to this one.
    Acked {
        /// The epoch.
        epoch: EpochId,
        /// Its manifest hash.
        manifest: ChunkId,
    },
    /// The backup has been silent for longer than the peer timeout.
    PeerSilent(Silence),
    /// The backup deleted chunks (GC); `held` of them were counted as held
    /// and are forgotten.
    Forgot {
        /// Chunks the encoder stopped counting as held.
        held: usize,
    },
    /// The backup took the guest over from this epoch (a planned move).
    HandedOver {
        /// The last epoch.
        epoch: EpochId,
    },
    /// The backup refused epoch `from` for naming chunks it does not
    /// hold; every unacknowledged epoch is being sent again.
    Resending {
        /// The refused epoch (the first resent).
        from: EpochId,
        /// How many chunks it named that the backup lacks.
        missing: usize,
    },
}

struct Retained {
    cp: Checkpoint,
    /// The epoch pushed before it (see [`EpochHeader::follows`]).
    follows: EpochId,
    hashes: Vec<ChunkId>,
    root: ChunkId,
    sent: bool,
    /// Sent on some connection before.
    ever_sent: bool,
}

/// Sans-IO state of the primary.
pub struct SenderCore {
    cfg: SenderConfig,
    guest: GuestId,
    instance: u64,
    /// The generation owned on the witness (0 without one).
    generation: u64,
    /// The history this run continues, kept by another backup (see
    /// [`Message::Hello`]).
    continues: (EpochId, ChunkId),
    page_count: u64,
    encoder: PageEncoder,
    digest: MemoryDigest,
    retained: BTreeMap<EpochId, Retained>,
    retained_bytes: usize,
    acked: EpochId,
    sealed: EpochId,
    /// The epoch this run's history starts after, when set by
    /// [`after`](Self::after).
    starts_after: Option<EpochId>,
    connected: bool,
    /// Refusal round of this connection (see [`Message::Missing`]).
    round: u32,
    /// Heartbeats, and the watch on the backup: while connected and it
    /// was not declared lost.
    pulse: Pulse,
    control: VecDeque<Message>,
    /// Copies of heartbeats for unreliable datagrams.
    datagrams: VecDeque<Message>,
    events: VecDeque<SenderEvent>,
    /// A planned move, if one was asked for.
    handover: Handover,
    /// The epoch being sent in parts, if any.
    streaming: Option<Streaming>,
    /// Welcomed once in this run: the encoder knows what the backup holds.
    welcomed_once: bool,
    /// Chunks the backup's Holds added on this connection.
    assumed: usize,
    /// Where an acknowledged checkpoint's page buffer goes back to.
    page_pool: Option<PagePool>,
    /// The manifest of the highest acknowledged epoch (zero before any).
    acked_manifest: ChunkId,
}

/// An epoch part-way onto its stream.
struct Streaming {
    epoch: EpochId,
    /// Its next page to encode.
    next: usize,
    wire_bytes: u64,
    mix: EncodingMix,
    resent: bool,
    /// Refused while it was being sent (see [`Message::Missing`]): its
    /// stream is finished in the old round, which the backup drops, and
    /// then the encoder forgets again what it counted as sent since the
    /// committed epoch, the missing chunks included.
    refused: Option<Vec<ChunkId>>,
}

/// Where a planned move stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// None asked for: the link ends when the checkpoints do.
    NotAsked,
    /// To be asked of the backup once every epoch is sealed.
    Wanted,
    /// Asked on this connection; the answer is awaited (asked again on
    /// the next connection if this one breaks).
    Sent,
    /// The backup took the guest over at this epoch.
    Done(EpochId),
}

impl SenderCore {
    /// A sender for `guest` (memory of `page_count` pages). `instance`
    /// identifies this run of the primary to the backup.
    #[must_use]
    pub fn new(cfg: SenderConfig, guest: GuestId, instance: u64, page_count: u64) -> Self {
        Self {
            cfg,
            guest,
            instance,
            generation: 0,
            continues: (EpochId(0), ChunkId::default()),
            page_count,
            encoder: PageEncoder::new(cfg.encoder),
            digest: MemoryDigest::zeroed(page_count),
            retained: BTreeMap::new(),
            retained_bytes: 0,
            acked: EpochId(0),
            sealed: EpochId(0),
            starts_after: None,
            connected: false,
            round: 0,
            pulse: Pulse::default(),
            control: VecDeque::new(),
            datagrams: VecDeque::new(),
            events: VecDeque::new(),
            handover: Handover::NotAsked,
            streaming: None,
            welcomed_once: false,
            assumed: 0,
            page_pool: None,
            acked_manifest: ChunkId::default(),
        }
    }

    /// Asks for a planned move: once the last epoch is sealed (with the
    /// guest held still for good), the backup is asked to take the guest
    /// over from it as soon as it has committed it
    /// ([`send_handover`](Self::send_handover)) instead of the link ending.
    pub fn want_handover(&mut self) {
        if self.handover == Handover::NotAsked {
            self.handover = Handover::Wanted;
        }
    }

    /// Whether the link still has a handover to make.
    #[must_use]
    pub fn handover_pending(&self) -> bool {
        matches!(self.handover, Handover::Wanted | Handover::Sent)
    }

    /// The epoch the guest was handed over at, once the backup said so.
    #[must_use]
    pub fn handed_over(&self) -> Option<EpochId> {
        match self.handover {
            Handover::Done(e) => Some(e),
            _ => None,
        }
    }

    /// Queues the Handover of the last epoch sealed on the control stream,
    /// once per connection; true when it queued it. The caller knows no
    /// epoch follows (the guest is held still for good). It goes without
    /// waiting for that epoch's acknowledgement: the backup takes the
    /// guest over once it has committed it.
    pub fn send_handover(&mut self) -> bool {
        if self.connected && self.handover == Handover::Wanted {
            self.control.push_back(Message::Handover { epoch: self.sealed });
            self.handover = Handover::Sent;
            return true;
        }
        false
    }

    /// The same sender, sharing the frames of pages it sends whole with
    /// the other links of its primary (see [`SharedFrames`]), going
    /// through an epoch's pages last to first when `backwards`.
    #[must_use]
    pub fn sharing_frames(mut self, frames: SharedFrames, backwards: bool) -> Self {
        self.encoder.share_frames(frames, backwards);
        self
    }

    /// The same sender, handing each acknowledged checkpoint's page buffer
    /// back to `pool` (see [`PagePool`]).
    #[must_use]
    pub fn recycling_pages_into(mut self, pool: PagePool) -> Self {
        self.page_pool = Some(pool);
        self
    }

    /// The same sender, owning `generation` on the witness (said in every
    /// Hello).
    #[must_use]
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// The same sender, continuing a history whose last epoch `epoch`
    /// (manifest `manifest`) another backup keeps: a backup holding none of
    /// the guest's history continues that chain.
    #[must_use]
    pub fn continuing(mut self, epoch: EpochId, manifest: ChunkId) -> Self {
        self.continues = (epoch, manifest);
        self
    }

    /// The same sender, its epochs starting after `epoch`, which the
    /// backup must hold already (a far backup joining a primary that
    /// continues the history its near backup holds): a backup holding
    /// less, or more, is refused with a protocol error.
    #[must_use]
    pub fn after(mut self, epoch: EpochId) -> Self {
        (self.sealed, self.acked, self.starts_after) = (epoch, epoch, Some(epoch));
        self
    }

    /// The configuration it runs with.
    #[must_use]
    pub fn config(&self) -> &SenderConfig {
        &self.cfg
    }

    /// A connection is up: queue the Hello.
    pub fn handle_connected(&mut self, now: Instant) {
        self.control.push_back(Message::Hello {
            guest: self.guest,
            instance: self.instance,
            page_count: self.page_count,
            generation: self.generation,
            continues: self.continues,
            wants_holds: !self.welcomed_once || self.encoder.held_len() == 0,
        });
        self.connected = false;
        self.assumed = 0;
        self.round = 0;
        self.pulse = Pulse::start(now, self.cfg.heartbeat, self.cfg.peer_timeout, self.cfg.peer_timeout_max);
    }

    /// The connection broke: everything unacknowledged will be sent again
    /// after the next Welcome.
    pub fn handle_disconnected(&mut self) {
        self.connected = false;
        self.pulse = Pulse::default();
        if self.handover == Handover::Sent {
            self.handover = Handover::Wanted;
        }
        self.control.clear();
        self.datagrams.clear();
        self.streaming = None;
        for r in self.retained.values_mut() {
            r.sent = false;
        }
    }

    /// Takes a sealed checkpoint (epochs must arrive in order) and returns
    /// the memory root of the guest at that epoch. Epochs may be skipped:
    /// a checkpoint that merges the epochs since the last one pushed
    /// ([`remus_types::MergedCheckpoint`]) follows that one in the backup's history.
    ///
    /// # Panics
    /// If epochs are pushed out of order or the page count differs.
    pub fn push_checkpoint(&mut self, mut cp: Checkpoint) -> ChunkId {
        assert!(cp.epoch > self.sealed, "checkpoints must be pushed in epoch order");
        assert_eq!(cp.page_count, self.page_count, "page count changed");
        // Taken once for every link when there are several.
        let hashes = if cp.hashes.len() == cp.pfns.len() { std::mem::take(&mut cp.hashes) } else { cp.page_ids() };
        for (pfn, h) in cp.pfns.iter().zip(&hashes) {
            self.digest.set(*pfn, *h);
        }
        let root = self.digest.root();
        let follows = std::mem::replace(&mut self.sealed, cp.epoch);
        self.retained_bytes += cp.pages.len();
        self.retained.insert(cp.epoch, Retained { cp, follows, hashes, root, sent: false, ever_sent: false });
        root
    }

    /// Handles a message from the backup's control stream.
    ///
    /// # Errors
    /// [`ProtocolError`] for a message that makes no sense here, or the
    /// backup's own error; the driver then closes the connection.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<(), ProtocolError> {
        self.pulse.heard(now);
        match msg {
            Message::Welcome { guest, committed, head } => {
                if guest != self.guest {
                    return Err(ProtocolError::Unexpected("welcome for another guest"));
                }
                if committed < self.acked && Some(self.acked) == self.starts_after {
                    return Err(ProtocolError::BadEpoch {
                        epoch: committed,
                        reason: "backup holds less of the guest's history than this primary continues from",
                    });
                }
                if committed < self.acked {
                    return Err(ProtocolError::BadEpoch { epoch: committed, reason: "backup lost acknowledged epochs" });
                }
                if committed > self.sealed {
                    if self.sealed != EpochId(0) || self.starts_after.is_some() {
                        return Err(ProtocolError::BadEpoch { epoch: committed, reason: "backup is ahead of this primary" });
                    }
                    // Nothing sealed yet: this run continues the guest's
                    // history (a restarted primary); its epochs follow
                    // the committed one.
                    self.sealed = committed;
                }
                self.connected = true;
                self.welcomed_once = true;
                self.encoder.forget_after(committed);
                for r in self.retained.values_mut() {
                    r.sent = false;
                }
                self.ack(committed, head);
            }
            Message::Ack { epoch, manifest } => {
                if !self.connected || epoch > self.sealed {
                    return Err(ProtocolError::BadEpoch { epoch, reason: "ack for an epoch never sent" });
                }
                self.ack(epoch, manifest);
            }
            Message::Heartbeat { .. } => {}
            Message::Handover { epoch } => {
                if self.handover != Handover::Sent || epoch != self.acked || self.unacked() != 0 {
                    return Err(ProtocolError::Unexpected("handover not asked for"));
                }
                self.handover = Handover::Done(epoch);
                self.events.push_back(SenderEvent::HandedOver { epoch });
            }
            Message::Holds(chunks) => {
                if self.connected {
                    return Err(ProtocolError::Unexpected("holds after the welcome"));
                }
                self.assumed += self.encoder.assume_held(&chunks);
            }
            Message::Forget(chunks) => {
                // On a stream of its own, it may overtake the Welcome;
                // forgetting is safe at any time.
                let held = self.encoder.forget(&chunks);
                self.events.push_back(SenderEvent::Forgot { held });
            }
            Message::Missing { round, epoch, chunks } => {
                if !self.connected {
                    return Err(ProtocolError::Unexpected("missing before welcome"));
                }
                // The backup acknowledged everything before the refused
                // epoch on this same stream, and numbers its refusals.
                if round != self.round.wrapping_add(1) {
                    return Err(ProtocolError::Unexpected("missing out of round"));
                }
                if epoch != self.acked.next() || epoch > self.sealed {
                    return Err(ProtocolError::Unexpected("missing for an epoch that is not the next to commit"));
                }
                // As after a reconnect at the committed epoch: the backup
                // dropped every epoch after it, so nothing first sent in
                // them is held, nor are the missing chunks.
                self.encoder.forget_after(self.acked);
                self.encoder.forget(&chunks);
                if let Some(st) = self.streaming.as_mut() {
                    st.refused = Some(chunks.clone());
                }
                self.round = round;
                for r in self.retained.values_mut() {
                    r.sent = false;
                }
                self.events.push_back(SenderEvent::Resending { from: epoch, missing: chunks.len() });
            }
            Message::Error(m) if self.connected => return Err(ProtocolError::Peer(m)),
            Message::Error(m) => return Err(ProtocolError::Refused(m)),
            _ => return Err(ProtocolError::Unexpected("data message on the control stream")),
        }
        Ok(())
    }

    /// A message that came as a datagram (a copy of one the control
    /// stream carries too, possibly arriving first): an acknowledgement
    /// is taken once connected, a heartbeat is a sign of life, anything
    /// else is ignored. Never an error: datagrams are advisory.
    pub fn handle_datagram(&mut self, now: Instant, msg: &Message) {
        match *msg {
            Message::Ack { epoch, manifest } if self.connected && epoch <= self.sealed => {
                self.pulse.heard(now);
                self.ack(epoch, manifest);
            }
            Message::Heartbeat { .. } if self.connected => self.pulse.heard(now),
            _ => {}
        }
    }

    /// Next frame to send as an unreliable datagram as well (a heartbeat
    /// also queued on the control stream): a heartbeat stuck behind a
    /// lost packet on the stream still arrives this way.
    pub fn poll_datagram(&mut self) -> Option<Vec<u8>> {
        self.datagrams.pop_front().map(|m| m.to_bytes())
    }

    fn ack(&mut self, epoch: EpochId, manifest: ChunkId) {
        if epoch >= self.acked {
            self.acked_manifest = manifest;
        }
        if epoch > self.acked {
            self.acked = epoch;
            let kept = self.retained.split_off(&epoch.next());
            let done = std::mem::replace(&mut self.retained, kept);
            if let Some(pool) = &self.page_pool {
                for r in done.into_values() {
                    pool.give(r.cp.pages);
                }
            }
            self.retained_bytes = self.retained.values().map(|r| r.cp.pages.len()).sum();
            self.events.push_back(SenderEvent::Acked { epoch, manifest });
        }
    }

    /// A sign of life other than a message: the backup's packets are
    /// arriving (the driver counts them), or the link measured `rtt`.
    pub fn handle_activity(&mut self, now: Instant, packets_arrived: bool, rtt: Duration) {
        self.pulse.activity(now, packets_arrived, rtt);
    }

    /// When the driver should call [`handle_timeout`](Self::handle_timeout).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pulse.poll_timeout()
    }

    /// Advances the clock: queues heartbeats, notices a silent backup.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (beat, lost) = self.pulse.tick(now);
        if beat {
            self.control.push_back(Message::Heartbeat { epoch: self.sealed });
            self.datagrams.push_back(Message::Heartbeat { epoch: self.sealed });
        }
        if let Some(silence) = lost {
            self.events.push_back(SenderEvent::PeerSilent(silence));
        }
    }

    /// The next control message to send, if any: what [`poll_transmit`]
    /// gives first, for a driver that has no room for more epoch bytes.
    ///
    /// [`poll_transmit`]: Self::poll_transmit
    pub fn poll_control(&mut self) -> Option<Transmit> {
        self.control.pop_front().map(|m| Transmit::Control(m.to_bytes()))
    }

    /// Whether an epoch is part-way out: the next epoch bytes
    /// [`poll_transmit`](Self::poll_transmit) gives are its next part.
    #[must_use]
    pub fn is_streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// The next thing to send, encoding an epoch when the window allows.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.poll_control() {
            return Some(t);
        }
        if !self.connected {
            return None;
        }
        // An epoch part-way out goes on before any other starts.
        if let Some(st) = self.streaming.take() {
            return Some(self.next_part(st, Vec::new()));
        }
        if self.in_flight() >= self.cfg.max_in_flight {
            return None;
        }
        let epoch = *self.retained.iter().find(|(_, r)| !r.sent)?.0;
        let r = self.retained.get_mut(&epoch).expect("present");
        let resent = std::mem::replace(&mut r.ever_sent, true);
        let mut out = Vec::with_capacity(r.cp.pfns.len().min(self.cfg.slice_pages.max(1)) * 1024 + 256);
        epoch_begin(r, self.round, &mut out);
        let st = Streaming { epoch, next: 0, wire_bytes: 0, mix: EncodingMix::default(), resent, refused: None };
        Some(self.next_part(st, out))
    }

    /// Encodes the next slice of the epoch `st` onto `out` (which may hold
    /// its beginning), and its end when no page is left.
    fn next_part(&mut self, mut st: Streaming, mut out: Vec<u8>) -> Transmit {
        let first = st.next == 0;
        let r = self.retained.get_mut(&st.epoch).expect("a streaming epoch is retained until acknowledged");
        let end = r.cp.pfns.len().min(st.next + self.cfg.slice_pages.max(1));
        encode_pages(&mut self.encoder, &self.cfg, r, st.next..end, &mut out, &mut st.mix);
        st.next = end;
        let last = end == r.cp.pfns.len();
        if last {
            epoch_end(r, &mut out);
        }
        st.wire_bytes += out.len() as u64;
        let t = Transmit::Epoch {
            epoch: st.epoch,
            bytes: out,
            first,
            last,
            wire_bytes: st.wire_bytes,
            pages: r.cp.pfns.len() as u64,
            mix: st.mix,
            resent: st.resent,
        };
        if !last {
            self.streaming = Some(st);
        } else if let Some(chunks) = st.refused {
            // Sent in a refused round: it comes again, and what it sent
            // is not held.
            self.encoder.forget_after(self.acked);
            self.encoder.forget(&chunks);
        } else {
            r.sent = true;
        }
        t
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Epochs sent and not yet acknowledged.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.retained.values().filter(|r| r.sent).count()
    }

    /// False while retained checkpoints exceed `max_retained_bytes`: the
    /// driver then stops taking checkpoints until acks free memory.
    #[must_use]
    pub fn can_accept(&self) -> bool {
        self.retained_bytes < self.cfg.max_retained_bytes
    }

    /// Epochs retained (sent or not) awaiting an ack.
    #[must_use]
    pub fn unacked(&self) -> usize {
        self.retained.len()
    }

    /// Highest acknowledged epoch.
    #[must_use]
    pub fn acked(&self) -> EpochId {
        self.acked
    }

    /// Highest sealed epoch.
    #[must_use]
    pub fn sealed(&self) -> EpochId {
        self.sealed
    }

    /// The manifest of the highest acknowledged epoch, [`acked`](Self::acked)
    /// (zero before any).
    #[must_use]
    pub fn acked_manifest(&self) -> ChunkId {
        self.acked_manifest
    }

    /// Chunks the backup said it holds before this connection's Welcome
    /// (see [`Message::Holds`]) that the encoder did not count as held:
    /// pages with that content go by reference.
    #[must_use]
    pub fn assumed(&self) -> usize {
        self.assumed
    }

    /// True once the backup has welcomed this connection.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.connected
    }
}

/// An epoch's first frame.
fn epoch_begin(r: &Retained, round: u32, out: &mut Vec<u8>) {
    let Retained { cp, follows, .. } = r;
    let records = u32::try_from(cp.pfns.len()).expect("fewer than 4 Gi pages per epoch");
    Message::EpochBegin(EpochHeader {
        guest: cp.guest,
        epoch: cp.epoch,
        time_unix_ns: cp.time_unix_ns,
        page_count: cp.page_count,
        pause_ns: cp.pause_ns,
        records,
        round,
        follows: *follows,
        released_ahead: cp.released_ahead,
    })
    .encode(out);
}

/// The epoch's pages `range` as Pages frames onto `out`, their encodings
/// counted in `mix`.
fn encode_pages(
    enc: &mut PageEncoder,
    cfg: &SenderConfig,
    r: &Retained,
    range: std::ops::Range<usize>,
    out: &mut Vec<u8>,
    mix: &mut EncodingMix,
) {
    let Retained { cp, hashes, .. } = r;
    let start = range.start;
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    for rec in enc.encode_pages(cp.epoch, &cp.pfns[range.clone()], |i| cp.page(start + i), &hashes[range]) {
        mix.add(&rec.encoding);
        batch_bytes += rec.wire_len();
        batch.push(rec);
        if batch_bytes >= cfg.batch_bytes {
            Message::Pages(std::mem::take(&mut batch)).encode(out);
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        Message::Pages(batch).encode(out);
    }
}

/// An epoch's last frames.
fn epoch_end(r: &Retained, out: &mut Vec<u8>) {
    Message::DeviceState(r.cp.device_state.clone()).encode(out);
    Message::EpochEnd { epoch: r.cp.epoch, memory_root: r.root }.encode(out);
}

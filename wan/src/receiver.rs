//! The backup's side of the protocol, sans IO, one per connection.
//!
//! Epoch streams may complete in any order; [`ReceiverCore::poll_commit`]
//! hands them out strictly in epoch order, one at a time, and only after
//! [`ReceiverCore::handle_committed`] reports epoch `N` durably committed
//! is `Ack(N)` queued. An epoch at or below the committed one (resent after
//! a reconnect) is dropped and acknowledged again.
//!
//! When a commit is refused because the epochs name chunks the store does
//! not hold ([`ReceiverCore::handle_missing`]), the core opens a new
//! refusal round: it drops every epoch received and not committed, and
//! queues `Missing` with the round and the chunks; the primary sends those
//! epochs again, encoded for that round. An epoch stream of an earlier
//! round is dropped on arrival (the primary resends it), so an epoch is
//! committed from one encoding only, once.
//!
//! Chunks the store's GC deletes are relayed as Forget frames through
//! [`ReceiverCore::poll_forget`], for a stream of their own: a long list
//! never holds back an Ack or a heartbeat on the control stream.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use remus_types::{ChunkId, EpochId, GuestId};

use crate::encoding::PageRecord;
use crate::error::ProtocolError;
use crate::frame::{EpochHeader, FrameReader, Message, MAX_CHUNK_LIST};
use crate::liveness::{Pulse, Silence};

/// Most epochs handed out in one commit group.
pub const MAX_GROUP: usize = 32;

/// An epoch received whole, ready to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedEpoch {
    /// Its header.
    pub header: EpochHeader,
    /// Page records, in the order sent.
    pub records: Vec<PageRecord>,
    /// Device state.
    pub device_state: Vec<u8>,
    /// The primary's memory root at this epoch.
    pub memory_root: ChunkId,
    /// Bytes this epoch took on the wire.
    pub wire_bytes: u64,
}

/// What happened, for the driver.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverEvent {
    /// The primary hands the guest over (a planned move): every epoch up
    /// to `epoch` is committed; take it over from there.
    Handover {
        /// The guest.
        guest: GuestId,
        /// Its last epoch, committed.
        epoch: EpochId,
    },
    /// The primary has been silent for longer than the timeout: fail over
    /// from this epoch, the last committed.
    PrimaryLost {
        /// The guest.
        guest: GuestId,
        /// Last committed epoch.
        committed: EpochId,
        /// Why it counts as lost.
        silence: Silence,
    },
}

/// Sans-IO state of one connection at the backup.
pub struct ReceiverCore {
    guest: Option<GuestId>,
    page_count: u64,
    committed: EpochId,
    manifest: ChunkId,
    committing: bool,
    /// Refusal round (see the module notes).
    round: u32,
    ready: BTreeMap<EpochId, ReceivedEpoch>,
    /// Heartbeats, and the watch on the primary (ended once it was
    /// declared lost).
    pulse: Pulse,
    control: VecDeque<Message>,
    /// Copies of acknowledgements and heartbeats for unreliable datagrams.
    datagrams: VecDeque<Message>,
    forget: VecDeque<Message>,
    events: VecDeque<ReceiverEvent>,
    /// A planned move asked for at this epoch, taken once it is
    /// committed (the primary asks as soon as it has sealed it).
    handover_at: Option<EpochId>,
}

impl ReceiverCore {
    /// A connection's state; heartbeats every `heartbeat`; the primary is
    /// lost after `timeout` of silence at the least, `timeout_max` at the
    /// most, as its [`Liveness`] judges.
    #[must_use]
    pub fn new(now: Instant, heartbeat: Duration, timeout: Duration, timeout_max: Duration) -> Self {
        Self {
            guest: None,
            page_count: 0,
            committed: EpochId(0),
            manifest: ChunkId::default(),
            committing: false,
            round: 0,
            ready: BTreeMap::new(),
            pulse: Pulse::start(now, heartbeat, timeout, timeout_max),
            control: VecDeque::new(),
            datagrams: VecDeque::new(),
            forget: VecDeque::new(),
            events: VecDeque::new(),
            handover_at: None,
        }
    }

    /// The Hello was accepted by the store, which had `committed` (manifest
    /// `head`) for this guest: queue `holds` (what the guest may name by
    /// hash, when the Hello asked) and the Welcome.
    pub fn accept(&mut self, guest: GuestId, page_count: u64, (committed, head): (EpochId, ChunkId), holds: Vec<ChunkId>) {
        self.guest = Some(guest);
        self.page_count = page_count;
        self.committed = committed;
        self.manifest = head;
        for part in holds.chunks(MAX_CHUNK_LIST) {
            self.control.push_back(Message::Holds(part.to_vec()));
        }
        self.control.push_back(Message::Welcome { guest, committed, head });
    }

    /// Largest epoch stream accepted, in bytes: every page plain, plus slack.
    #[must_use]
    pub fn max_epoch_bytes(&self) -> usize {
        usize::try_from(self.page_count.saturating_mul(4200)).unwrap_or(usize::MAX).saturating_add(8 << 20)
    }

    /// A control-stream message from the primary (Hello is handled by the
    /// driver before the core exists).
    ///
    /// # Errors
    /// [`ProtocolError`] for anything but a heartbeat or an error.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<(), ProtocolError> {
        self.pulse.heard(now);
        match msg {
            Message::Heartbeat { .. } => Ok(()),
            Message::Handover { epoch } => {
                self.guest.ok_or(ProtocolError::Unexpected("handover before hello"))?;
                if epoch < self.committed || self.ready.keys().next_back().is_some_and(|&e| e > epoch) {
                    return Err(ProtocolError::BadEpoch { epoch, reason: "handover at an epoch before the last one sent" });
                }
                // Taken once every epoch up to it is committed (at once
                // when they are): the primary holds its guest still from
                // the moment it sealed that epoch, so the move costs one
                // round trip, not two.
                self.handover_at = Some(epoch);
                self.take_handover();
                Ok(())
            }
            Message::Error(m) => Err(ProtocolError::Peer(m)),
            _ => Err(ProtocolError::Unexpected("message on the control stream")),
        }
    }

    /// A whole epoch stream: the epoch, when it is kept to be committed
    /// (`None`: already committed, or of a refusal round that is over).
    ///
    /// # Errors
    /// [`ProtocolError`] when the stream is malformed, belongs to another
    /// guest, or its record count does not add up.
    pub fn handle_epoch_stream(&mut self, now: Instant, bytes: &[u8]) -> Result<Option<EpochId>, ProtocolError> {
        self.pulse.heard(now);
        let guest = self.guest.ok_or(ProtocolError::Unexpected("epoch before hello"))?;
        let mut rd = FrameReader::default();
        rd.push(bytes);
        let header = match rd.next_message()? {
            Some(Message::EpochBegin(h)) => h,
            _ => return Err(ProtocolError::Unexpected("epoch stream without EpochBegin")),
        };
        let bad = |reason| ProtocolError::BadEpoch { epoch: header.epoch, reason };
        if header.guest != guest {
            return Err(bad("epoch of another guest"));
        }
        if header.page_count != self.page_count {
            return Err(bad("page count differs from hello"));
        }
        if header.follows >= header.epoch {
            return Err(bad("follows an epoch not before it"));
        }
        if self.handover_at.is_some_and(|h| header.epoch > h) {
            return Err(bad("epoch after the one the guest was handed over at"));
        }
        // An epoch names each page at most once.
        if u64::from(header.records) > self.page_count {
            return Err(bad("more records than the guest has pages"));
        }
        // Each record takes at least 9 bytes of the stream: bound the
        // allocation by what arrived, not by the count announced.
        let mut records = Vec::with_capacity((header.records as usize).min(bytes.len() / 9));
        let mut device_state = Vec::new();
        let memory_root = loop {
            match rd.next_message()? {
                Some(Message::Pages(mut batch)) => {
                    if records.len() + batch.len() > header.records as usize {
                        return Err(bad("more records than announced"));
                    }
                    if batch.iter().any(|r| r.pfn.0 >= self.page_count) {
                        return Err(bad("page number beyond guest memory"));
                    }
                    records.append(&mut batch);
                }
                Some(Message::DeviceState(d)) => device_state = d,
                Some(Message::EpochEnd { epoch, memory_root }) => {
                    if epoch != header.epoch {
                        return Err(bad("EpochEnd of another epoch"));
                    }
                    break memory_root;
                }
                Some(_) => return Err(bad("unexpected message in epoch stream")),
                None => return Err(bad("stream ended before EpochEnd")),
            }
        };
        if rd.pending() != 0 {
            return Err(bad("bytes after EpochEnd"));
        }
        if records.len() != header.records as usize {
            return Err(bad("fewer records than announced"));
        }
        if header.epoch <= self.committed {
            // Resent after a reconnect: already durable, acknowledge again.
            self.send_redundant(Message::Ack { epoch: self.committed, manifest: self.manifest });
            return Ok(None);
        }
        if header.round < self.round {
            // Encoded before the primary saw the last refusal: it may name
            // chunks this backup lacks, and the primary sends it again.
            return Ok(None);
        }
        if header.round > self.round {
            return Err(bad("epoch of a refusal round not yet opened"));
        }
        let epoch = header.epoch;
        self.ready.insert(epoch, ReceivedEpoch { header, records, device_state, memory_root, wire_bytes: bytes.len() as u64 });
        Ok(Some(epoch))
    }

    /// The next epochs to commit, in order and each following the one
    /// before (the committed one first; see [`EpochHeader::follows`]),
    /// when no commit is running: every complete epoch that is ready goes
    /// in one group (at most [`MAX_GROUP`]), so the store can commit them
    /// with one synced write when the backup falls behind.
    pub fn poll_commit(&mut self) -> Option<Vec<ReceivedEpoch>> {
        if self.committing {
            return None;
        }
        let mut group = Vec::new();
        let mut last = self.committed;
        while group.len() < MAX_GROUP {
            // Epochs received are kept by number: the next to commit is the
            // lowest one above the last, and only if it says it follows it.
            let Some(entry) = self.ready.range(last.next()..).next().filter(|(_, e)| e.header.follows == last) else { break };
            let epoch = *entry.0;
            group.push(self.ready.remove(&epoch).expect("present"));
            last = epoch;
        }
        if group.is_empty() {
            return None;
        }
        self.committing = true;
        Some(group)
    }

    /// The store durably committed every epoch up to `epoch` (the last of
    /// the group), whose manifest is `manifest`.
    pub fn handle_committed(&mut self, epoch: EpochId, manifest: ChunkId) {
        self.committing = false;
        self.committed = epoch;
        self.manifest = manifest;
        self.send_redundant(Message::Ack { epoch, manifest });
        self.take_handover();
    }

    /// Hands out the planned move asked for once its epoch is committed.
    fn take_handover(&mut self) {
        if let (Some(guest), Some(epoch)) = (self.guest, self.handover_at) {
            if epoch == self.committed && !self.committing {
                self.handover_at = None;
                self.events.push_back(ReceiverEvent::Handover { guest, epoch });
            }
        }
    }

    /// The commit handed out by [`poll_commit`](Self::poll_commit) was
    /// refused, nothing of it written, because its epochs name `chunks`,
    /// which the store does not hold (GC deleted them). Opens a new
    /// refusal round: every uncommitted epoch is dropped and `Missing`
    /// asks the primary to send them again without these chunks (a list
    /// too long for one frame goes partly in Forget frames before it).
    pub fn handle_missing(&mut self, chunks: &[ChunkId]) {
        self.committing = false;
        self.ready.clear();
        self.round = self.round.wrapping_add(1);
        // The excess goes first on the same stream: handled before Missing.
        let split = chunks.len().saturating_sub(MAX_CHUNK_LIST);
        for part in chunks[..split].chunks(MAX_CHUNK_LIST) {
            self.control.push_back(Message::Forget(part.to_vec()));
        }
        self.control.push_back(Message::Missing { round: self.round, epoch: self.committed.next(), chunks: chunks[split..].to_vec() });
    }

    /// The store deleted `chunks` (GC): queue Forget frames, for
    /// [`poll_forget`](Self::poll_forget), so the primary stops
    /// referencing them.
    pub fn handle_chunks_deleted(&mut self, chunks: &[ChunkId]) {
        for part in chunks.chunks(MAX_CHUNK_LIST) {
            self.forget.push_back(Message::Forget(part.to_vec()));
        }
    }

    /// Next Forget frame to relay, on a stream apart from the control
    /// stream (order among them, or with control frames, does not matter:
    /// forgetting is always safe for the primary).
    pub fn poll_forget(&mut self) -> Option<Vec<u8>> {
        self.forget.pop_front().map(|m| m.to_bytes())
    }

    /// Current refusal round.
    #[must_use]
    pub fn round(&self) -> u32 {
        self.round
    }

    /// A sign of life other than a message: the primary's packets are
    /// arriving (the driver counts them), or the link measured `rtt`.
    pub fn handle_activity(&mut self, now: Instant, packets_arrived: bool, rtt: Duration) {
        self.pulse.activity(now, packets_arrived, rtt);
    }

    /// When to call [`handle_timeout`](Self::handle_timeout).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pulse.poll_timeout()
    }

    /// Advances the clock.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (beat, lost) = self.pulse.tick(now);
        if beat {
            self.send_redundant(Message::Heartbeat { epoch: self.committed });
        }
        if let (Some(silence), Some(guest)) = (lost, self.guest) {
            self.events.push_back(ReceiverEvent::PrimaryLost { guest, committed: self.committed, silence });
        }
    }

    /// Queues `m` on the control stream and, as a copy, for a datagram.
    fn send_redundant(&mut self, m: Message) {
        self.datagrams.push_back(m.clone());
        self.control.push_back(m);
    }

    /// A message that came as a datagram: a heartbeat is a sign of life;
    /// anything else is ignored (datagrams only ever repeat what the
    /// control stream carries).
    pub fn handle_datagram(&mut self, now: Instant, msg: &Message) {
        if matches!(msg, Message::Heartbeat { .. }) {
            self.pulse.heard(now);
        }
    }

    /// Next frame to send as an unreliable datagram as well: an
    /// acknowledgement or heartbeat also on the control stream. A lost
    /// packet there holds back everything behind it for a retransmission
    /// (a round trip or more); the datagram copy is not held back, and
    /// acknowledgements are cumulative, so any later one stands in for a
    /// lost one.
    pub fn poll_datagram(&mut self) -> Option<Vec<u8>> {
        self.datagrams.pop_front().map(|m| m.to_bytes())
    }

    /// Next control frame to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.control.pop_front().map(|m| m.to_bytes())
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// Last committed epoch.
    #[must_use]
    pub fn committed(&self) -> EpochId {
        self.committed
    }

    /// Complete epochs waiting for their turn to commit.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.ready.len()
    }
}

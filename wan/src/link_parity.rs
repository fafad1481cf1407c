//! The driver's side of parity (`crate::fec`): how much each epoch gets
//! (by the link's real loss and backlog), sending it, and at the backup
//! the inbox of parity datagrams and the out-of-order reader of epoch
//! streams that rebuilds an epoch as soon as it can.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, VarInt};
use remus_types::EpochId;

use crate::budget::{ConnectionBudget, Held};
use crate::error::{DecodeError, StreamError};
use crate::fec::{Fec, Parity, Reassembly};

/// How much parity each epoch of a connection gets.
pub(crate) struct ParityPlanner {
    fec: Fec,
    loss: LossMeter,
    backlog: Backlog,
}

impl ParityPlanner {
    pub(crate) fn new(fec: Fec) -> Self {
        Self { fec, loss: LossMeter::default(), backlog: Backlog::default() }
    }

    /// Shard size and parity shards per group for `epoch` of `len` bytes,
    /// put on the wire now; `None` for no parity.
    pub(crate) fn plan(&mut self, conn: &Connection, epoch: EpochId, len: usize) -> Option<(u16, u8)> {
        // Parity buys latency with spare capacity; a link already behind
        // (its oldest unacknowledged epoch waiting several round trips)
        // has none to spare.
        let behind = self.backlog.behind(conn.rtt());
        self.backlog.sent(epoch);
        if behind || len == 0 || self.fec == Fec::Off {
            return None;
        }
        let shard = u16::try_from(crate::fec::shard_size(conn.max_datagram_size()?)?).ok()?;
        let group = crate::fec::Layout::new(len as u64, shard, 1).largest_group();
        let parity = self.fec.parity_for(self.loss.rate(conn), group);
        (parity > 0).then_some((shard, parity))
    }

    pub(crate) fn acked(&mut self, epoch: EpochId) {
        self.backlog.acked(epoch);
    }
}

/// When each unacknowledged epoch went on the wire (this connection).
#[derive(Default)]
struct Backlog(std::collections::VecDeque<(EpochId, Instant)>);

impl Backlog {
    fn sent(&mut self, epoch: EpochId) {
        self.0.push_back((epoch, Instant::now()));
    }

    fn acked(&mut self, epoch: EpochId) {
        while self.0.front().is_some_and(|(e, _)| *e <= epoch) {
            self.0.pop_front();
        }
    }

    /// Whether the oldest unacknowledged epoch has waited more than four
    /// round trips and 250 ms: longer than a retransmission or two take,
    /// so a link that recovers a loss is not taken for one that is behind.
    fn behind(&self, rtt: Duration) -> bool {
        self.0.front().is_some_and(|(_, t)| t.elapsed() > 4 * rtt + Duration::from_millis(250))
    }
}

/// The link's packet loss over the last few thousand packets: what quinn
/// declared lost less what it later saw acknowledged (the patched
/// quinn-proto counts those spurious losses), what [`Fec::Auto`] sizes
/// parity by.
#[derive(Default)]
struct LossMeter {
    sent: u64,
    lost: u64,
    rate: f64,
}

impl LossMeter {
    /// Packets per sample: enough that 0.1% loss shows as a few losses.
    const SAMPLE: u64 = 4000;

    fn rate(&mut self, conn: &Connection) -> f64 {
        let path = conn.stats().path;
        let sent = path.sent_packets.saturating_sub(self.sent);
        if sent >= Self::SAMPLE {
            let real = path.lost_packets.saturating_sub(path.spurious_lost_packets);
            let lost = real.saturating_sub(self.lost);
            let sample = lost as f64 / sent as f64;
            // Halfway towards each new sample: a burst of loss raises parity
            // at once, a clean stretch lowers it within a few samples.
            self.rate = if self.sent == 0 { sample } else { f64::midpoint(self.rate, sample).max(sample) };
            self.sent = path.sent_packets;
            self.lost = real;
        }
        self.rate
    }
}

/// Sends parity for an epoch's stream `bytes` (QUIC stream `stream`) as
/// datagrams, a group at a time while it fits the datagram buffer: parity
/// is optional and goes out before stream data, and a backlog of it would
/// starve the epochs it protects. Returns the bytes sent and left out.
pub(crate) fn send_parity(conn: &Connection, stream: u64, bytes: &[u8], (shard, count): (u16, u8)) -> (u64, u64) {
    let group_bytes = usize::from(count) * (usize::from(shard) + crate::fec::PARITY_HEADER_LEN);
    let total = crate::fec::Layout::new(bytes.len() as u64, shard, count).groups as usize * group_bytes;
    let mut sent = 0;
    for group in crate::fec::encode_groups(stream, bytes, shard, count) {
        if conn.datagram_send_buffer_space() < group_bytes {
            break;
        }
        for p in group {
            let d = p.to_bytes();
            sent += d.len();
            let _ = conn.send_datagram(d.into());
        }
    }
    (sent as u64, total.saturating_sub(sent) as u64)
}

/// Parity shards that came as datagrams, waiting for their epoch streams'
/// readers, which they wake.
pub(crate) struct ParityInbox {
    max_len: u64,
    state: std::sync::Mutex<InboxState>,
}

#[derive(Default)]
struct InboxState {
    /// Parity not yet taken, and the wake-up of the stream's reader.
    waiting: std::collections::HashMap<u64, (Vec<Parity>, Arc<tokio::sync::Notify>)>,
    /// Streams below this index are complete: their parity is dropped.
    floor: u64,
    /// Complete streams at or above `floor`.
    done: std::collections::BTreeSet<u64>,
    /// Highest stream index a reader asked for.
    highest: u64,
    /// Data shards rebuilt from parity, for the link's statistics.
    rebuilt_shards: u64,
    /// Epochs completed with the help of parity.
    rebuilt_epochs: u64,
}

impl ParityInbox {
    /// Streams ahead of the highest one read for which parity is kept: as
    /// many as may be open at once, with room.
    const AHEAD: u64 = 4096;

    pub(crate) fn new(max_len: u64) -> Self {
        Self { max_len, state: std::sync::Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn deliver(&self, datagram: &[u8]) {
        let p = match Parity::decode(datagram, self.max_len) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "parity datagram dropped");
                return;
            }
        };
        let mut st = self.lock();
        if p.stream < st.floor || st.done.contains(&p.stream) || p.stream > st.highest + Self::AHEAD {
            return;
        }
        let slot = st.waiting.entry(p.stream).or_default();
        slot.0.push(p);
        slot.1.notify_one();
    }

    /// The wake-up for `stream`'s reader, and the parity that came for it.
    fn take(&self, stream: u64) -> (Vec<Parity>, Arc<tokio::sync::Notify>) {
        let mut st = self.lock();
        st.highest = st.highest.max(stream);
        let slot = st.waiting.entry(stream).or_default();
        (std::mem::take(&mut slot.0), Arc::clone(&slot.1))
    }

    fn finish(&self, stream: u64, rebuilt: usize) {
        let mut st = self.lock();
        st.waiting.remove(&stream);
        st.done.insert(stream);
        if rebuilt > 0 {
            st.rebuilt_shards += rebuilt as u64;
            st.rebuilt_epochs += 1;
        }
        // Streams complete about in order: forget those far behind.
        while st.done.len() > 2 * Self::AHEAD as usize {
            let first = st.done.pop_first().expect("non-empty");
            st.floor = first + 1;
        }
        let floor = st.floor;
        st.waiting.retain(|&s, _| s >= floor);
    }
}

/// Logs what parity did for a connection when it ends.
pub(crate) struct ParityReport(pub(crate) Arc<ParityInbox>);

impl Drop for ParityReport {
    fn drop(&mut self) {
        let st = self.0.lock();
        tracing::info!(epochs = st.rebuilt_epochs, shards = st.rebuilt_shards, "epochs rebuilt from parity during the connection");
    }
}

/// Reads one epoch stream, out of order, until all of it arrived or the
/// parity that came for it can rebuild the rest; a stream completed from
/// parity is stopped, so the primary retransmits none of it.
pub(crate) async fn read_epoch_stream(
    mut s: RecvStream,
    inbox: &ParityInbox,
    budget: &ConnectionBudget,
) -> Result<(Vec<u8>, Held), StreamError> {
    let id = s.id().index();
    let _open = budget.open(id);
    let mut held = Held::default();
    let mut r = Reassembly::new(inbox.max_len);
    let mut first: Option<Instant> = None;
    let result = loop {
        let (parity, wake) = inbox.take(id);
        for p in parity {
            if let Err(e) = r.add_parity(p) {
                tracing::debug!(error = %e, stream = id, "parity dropped");
            }
        }
        if let Some(bytes) = r.take_complete() {
            if r.rebuilt() > 0 {
                let _ = s.stop(VarInt::from_u32(0));
            }
            break Ok((bytes, held));
        }
        tokio::select! {
            chunk = s.read_chunk(usize::MAX, false) => match chunk {
                Ok(Some(c)) => {
                    first.get_or_insert_with(Instant::now);
                    budget.take(id, c.bytes.len(), &mut held).await;
                    if let Err(e) = r.add_data(c.offset, &c.bytes) {
                        break Err(StreamError::Decode(DecodeError::Fec(e)));
                    }
                }
                Ok(None) => {
                    if let Err(e) = r.stream_ended() {
                        break Err(StreamError::Decode(DecodeError::Fec(e)));
                    }
                }
                Err(e) => break Err(e.into()),
            },
            () = wake.notified() => {}
        }
    };
    let (parity, layout) = r.parity_seen();
    tracing::debug!(
        stream = id,
        ms = first.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
        rebuilt = r.rebuilt(),
        parity,
        groups = layout.map_or(0, |l| l.groups),
        per_group = layout.map_or(0, |l| l.parity),
        "epoch stream read"
    );
    inbox.finish(id, r.rebuilt());
    result
}

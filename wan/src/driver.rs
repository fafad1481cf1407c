//! The tokio/quinn driver around the sans-IO cores: sockets, streams and
//! timers, nothing of the protocol itself.
//!
//! The primary opens one bidirectional control stream per connection and
//! one unidirectional stream per epoch, so several epochs are in flight
//! and a slow one does not hold back the others' delivery. The backup
//! reads each epoch stream whole (bounded by the guest's size), hands
//! complete epochs to the [`Replica`] in order, and acknowledges each
//! after the replica has committed it. It relays the chunks the replica's
//! GC deletes to the primary (Forget frames, on a unidirectional stream of
//! their own per list, at a lower priority than the control stream), and
//! a commit refused for missing chunks becomes a Missing for the primary,
//! not a closed connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use quinn::Endpoint;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use remus_types::{Checkpoint, ChunkId, EpochId, FormatError, GuestId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::budget::{Budget, ConnectionBudget, Held};
use crate::encoding::EncodingMix;
use crate::error::{CommitError, DecodeError, LinkError, ProtocolError, Side, StreamError};
use crate::fec::{Fec, Parity};
use crate::frame::{FrameReader, Message};
use crate::link_parity::{read_epoch_stream, send_parity, ParityInbox, ParityPlanner, ParityReport};
use crate::receiver::{ReceivedEpoch, ReceiverCore, ReceiverEvent};
use crate::sender::{SenderConfig, SenderCore, SenderEvent, Transmit};

/// UDP socket buffer size: the default 208 KiB drops packets under load.
const SOCKET_BUFFER: usize = 4 << 20;

/// How the link controls its sending rate (`[link] congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// Model-based (BBR): paces at the measured bottleneck rate and
    /// round-trip time, and does not take random loss for congestion, so
    /// a lossy long path keeps its throughput.
    #[default]
    Bbr,
    /// Loss-based (CUBIC), quinn's default: halves its window on loss,
    /// which bounds the rate near MSS/RTT·1.22/√loss.
    Cubic,
    /// Loss-based (NewReno).
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bbr" => Ok(Self::Bbr),
            "cubic" => Ok(Self::Cubic),
            "newreno" => Ok(Self::NewReno),
            other => Err(format!("unknown congestion control {other:?} (bbr, cubic or newreno)")),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bbr => "bbr",
            Self::Cubic => "cubic",
            Self::NewReno => "newreno",
        })
    }
}

/// Reordering, in packets, that loss detection tolerates before it calls
/// a packet lost (RFC 9002 suggests 3). A jittery path reorders far more
/// than 3 packets at the packet rates of an epoch stream; with 3, every
/// such reordering was taken for loss and the window collapsed. Loss is
/// then found by the time threshold below instead.
const PACKET_THRESHOLD: u32 = 1000;
/// Bytes of datagrams queued ahead of stream data at most.
const DATAGRAM_SEND_BUFFER: usize = 128 << 10;
/// A packet is lost when a later one was acknowledged this many smoothed
/// round trips after it was sent (RFC 9002: 9/8): room for jitter of an
/// eighth to a quarter of the round trip.
const TIME_THRESHOLD: f32 = 1.25;

/// Transport settings for long fat pipes: large windows, many streams,
/// loss detection that tolerates reordering, and the chosen congestion
/// control.
#[must_use]
pub fn transport_config(congestion: Congestion, max_rate: Option<u64>) -> quinn::TransportConfig {
    resuming_transport_config(congestion, max_rate, None)
}

/// A path as a connection measured it, for the next connection to the
/// same backup to start from.
#[derive(Debug, Clone, Copy)]
struct MeasuredPath {
    /// BBR's delivery-rate estimate, bytes per second.
    bandwidth: u64,
    min_rtt: Duration,
    at: tokio::time::Instant,
}

/// A copy of `conn`'s congestion controller when it is BBR.
fn bbr_state(conn: &Connection) -> Option<Box<quinn::congestion::Bbr>> {
    conn.congestion_state().into_any().downcast::<quinn::congestion::Bbr>().ok()
}

/// How long a measured path is trusted for the next connection's start.
const PATH_MEMORY: Duration = Duration::from_secs(300);

impl MeasuredPath {
    /// The path `conn` measured, when its controller is BBR and has one.
    fn of(conn: &Connection) -> Option<Self> {
        let bbr = bbr_state(conn)?;
        (bbr.bandwidth() > 0).then(|| Self { bandwidth: bbr.bandwidth(), min_rtt: bbr.min_rtt(), at: tokio::time::Instant::now() })
    }
}

/// [`transport_config`], with BBR starting from `path` (a reconnection
/// to the same backup: Careful Resume, see quinn-proto's PATCHES.md).
fn resuming_transport_config(congestion: Congestion, max_rate: Option<u64>, path: Option<MeasuredPath>) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(1024));
    t.stream_receive_window(VarInt::from_u32(64 << 20));
    t.receive_window(VarInt::from_u32(512 << 20));
    t.send_window(512 << 20);
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(Some(VarInt::from_u32(10_000).into()));
    // Datagrams (ack and heartbeat copies, parity) go out before stream
    // data; a small buffer keeps them from ever queueing far ahead of it.
    t.datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    t.packet_threshold(PACKET_THRESHOLD);
    t.time_threshold(TIME_THRESHOLD);
    let controller: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> = match congestion {
        Congestion::Bbr => {
            let mut bbr = quinn::congestion::BbrConfig::default();
            if let Some(p) = path.filter(|p| p.at.elapsed() < PATH_MEMORY) {
                bbr.resume(p.bandwidth, p.min_rtt);
            }
            Arc::new(bbr)
        }
        Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
        Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
    };
    match max_rate {
        Some(rate) => t.congestion_controller_factory(Arc::new(crate::rate_cap::CappedFactory { inner: controller, rate })),
        None => t.congestion_controller_factory(controller),
    };
    t
}

/// A UDP endpoint on `bind` with large socket buffers; a server when
/// `server` is given.
///
/// # Errors
/// [`LinkError::Io`] when the socket cannot be created or bound.
pub fn endpoint(bind: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<Endpoint, LinkError> {
    let domain = if bind.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Past the kernel's cap (net.core.rmem_max) where this process may;
    // short of it, datagrams a busy process has not read yet are dropped.
    match remus_sys::size_udp_buffers(&sock, SOCKET_BUFFER) {
        Ok((rcv, _)) if rcv < SOCKET_BUFFER => tracing::warn!(
            granted_kib = rcv >> 10,
            wanted_kib = SOCKET_BUFFER >> 10,
            "the kernel capped the UDP receive buffer (net.core.rmem_max): under load datagrams are dropped before remus reads \
             them; raise it (sysctl -w net.core.rmem_max=8388608) or run with CAP_NET_ADMIN"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "UDP socket buffers not sized"),
    }
    sock.bind(&bind.into())?;
    let runtime = quinn::default_runtime().ok_or_else(|| LinkError::Connect("no async runtime".into()))?;
    Ok(Endpoint::new(quinn::EndpointConfig::default(), server, sock.into(), runtime)?)
}

/// What the primary's link reports.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// A checkpoint was taken over; `root` is the guest's memory root at it.
    Sealed {
        /// The epoch.
        epoch: EpochId,
        /// Memory root.
        root: ChunkId,
    },
    /// An epoch went onto the wire.
    Sent {
        /// The epoch.
        epoch: EpochId,
        /// Its size on the wire.
        wire_bytes: u64,
        /// Dirty pages it carried.
        pages: u64,
        /// How they were encoded.
        mix: EncodingMix,
        /// True when it went on the wire before (its bytes are resent).
        resent: bool,
    },
    /// Parity for an epoch ([`crate::fec`]), datagram headers included.
    Parity {
        /// The epoch.
        epoch: EpochId,
        /// Bytes queued for sending.
        sent: u64,
        /// Bytes left out because the datagram buffer was full (a
        /// saturated link).
        dropped: u64,
    },
    /// The backup durably committed every epoch up to `epoch`.
    Acked {
        /// The epoch.
        epoch: EpochId,
        /// Its manifest hash.
        manifest: ChunkId,
        /// The path's round-trip time, as the transport measures it now.
        rtt: Duration,
    },
    /// The backup took the guest over from `epoch` (a planned move).
    HandedOver {
        /// The last epoch.
        epoch: EpochId,
    },
    /// Connected and welcomed: the backup has committed up to `committed`
    /// (for a primary that has sealed nothing yet, where its epochs
    /// start: after it).
    Connected {
        /// The last committed epoch.
        committed: EpochId,
        /// Its manifest id (zero when none).
        manifest: ChunkId,
        /// Chunks the backup said the guest's memory holds there (asked
        /// for by a run that knew nothing of it): pages with that content
        /// go by reference.
        holds: usize,
    },
    /// The backup deleted chunks (GC); `held` of them were counted as held
    /// by the encoder, which forgot them.
    Forgot {
        /// Chunks forgotten.
        held: usize,
    },
    /// The backup refused epoch `from` for naming `missing` chunks it does
    /// not hold; every unacknowledged epoch is sent again without them.
    Resending {
        /// The refused epoch.
        from: EpochId,
        /// Chunks it lacked.
        missing: usize,
    },
    /// The connection was lost (or could not be made); the link reconnects.
    Disconnected(Arc<LinkError>),
}

/// How the primary's link uses the path: transport behaviour that the
/// sans-IO sender core does not see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkTuning {
    /// Congestion control (default BBR).
    pub congestion: Congestion,
    /// Parity beside each epoch (default sized to the loss seen).
    pub fec: Fec,
    /// Bandwidth cap in bytes per second (default none).
    pub max_rate: Option<u64>,
}

/// Builds the primary's TLS client configuration (with its certificate)
/// for each connection attempt, so that a revocation list written since
/// the last one is honoured.
pub type ClientSource = Arc<dyn Fn() -> Result<quinn::ClientConfig, LinkError> + Send + Sync>;

/// Where and how the primary connects.
#[derive(Clone)]
pub struct PrimaryLinkConfig {
    /// Backup address.
    pub backup: SocketAddr,
    /// TLS client config, built again before each connection attempt.
    pub client: ClientSource,
    /// Protocol tuning.
    pub sender: SenderConfig,
    /// Transport tuning.
    pub tuning: LinkTuning,
    /// The protected guest.
    pub guest: GuestId,
    /// This run of the primary.
    pub instance: u64,
    /// The generation it owns on the witness (0 without one).
    pub generation: u64,
    /// Guest memory size in pages.
    pub page_count: u64,
    /// A history kept by another backup that this run continues (a guest
    /// protected again after failing over): its last epoch and manifest.
    pub continues: Option<(EpochId, ChunkId)>,
    /// The epoch the checkpoints start after, which the backup must hold
    /// (none: whatever the backup's first Welcome says; see
    /// [`SenderCore::after`]).
    pub start_after: Option<EpochId>,
    /// Where acknowledged checkpoints' page buffers go back to (the epoch
    /// engine's; none: they are freed).
    pub page_pool: Option<remus_types::PagePool>,
    /// Whole-page frames shared with the primary's other links (with far
    /// backups; none: each link compresses its own), and whether this
    /// link goes through an epoch's pages last to first.
    pub shared_frames: Option<(crate::SharedFrames, bool)>,
    /// Set before the checkpoints end: a planned move, the backup taking
    /// the guest over once every epoch is acknowledged
    /// ([`LinkEvent::HandedOver`]), instead of the link just ending.
    pub handover: Arc<std::sync::atomic::AtomicBool>,
}

enum Control {
    Message(Result<Message, StreamError>),
    /// A copy of a control message that came as a datagram.
    Datagram(Message),
    /// The peer finished its control stream: a clean end.
    Closed,
}

/// Runs the primary's link until `checkpoints` closes and every epoch is
/// acknowledged, reconnecting as needed.
///
/// # Errors
/// [`LinkError::Protocol`] when the backup refuses this primary (another
/// instance of the guest, lost history); transport errors are retried.
pub async fn run_primary(
    cfg: PrimaryLinkConfig,
    mut checkpoints: mpsc::Receiver<Checkpoint>,
    events: mpsc::UnboundedSender<LinkEvent>,
) -> Result<(), LinkError> {
    let bind: SocketAddr = if cfg.backup.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("addr");
    let ep = endpoint(bind, None)?;
    // The round trip of the last connection, the next attempt's estimate,
    // and the path it measured, the next connection's start.
    let mut last_rtt = None;
    let mut last_path = None;
    let mut in_force: Option<quinn::ClientConfig> = None;
    let mut core = SenderCore::new(cfg.sender, cfg.guest, cfg.instance, cfg.page_count).with_generation(cfg.generation);
    if let Some((epoch, manifest)) = cfg.continues {
        core = core.continuing(epoch, manifest);
    }
    if let Some(epoch) = cfg.start_after {
        core = core.after(epoch);
    }
    if let Some(pool) = &cfg.page_pool {
        core = core.recycling_pages_into(pool.clone());
    }
    if let Some((frames, backwards)) = &cfg.shared_frames {
        core = core.sharing_frames(frames.clone(), *backwards);
    }
    let mut input = Input::default();
    let mut backoff = MIN_BACKOFF;
    loop {
        if cfg.handover.load(std::sync::atomic::Ordering::Relaxed) {
            core.want_handover();
        }
        if input.closed && core.unacked() == 0 && !core.handover_pending() {
            ep.close(VarInt::from_u32(0), b"done");
            ep.wait_idle().await;
            return Ok(());
        }
        // The TLS files as they are now (a revocation list written since);
        // unreadable ones leave the configuration in force, with a warning
        // (at the first attempt, there is none: the error ends the link).
        let mut transport = resuming_transport_config(cfg.tuning.congestion, cfg.tuning.max_rate, last_path);
        if let Some(rtt) = last_rtt {
            transport.initial_rtt(rtt);
        }
        let transport = Arc::new(transport);
        let current = match ((cfg.client)(), in_force.take()) {
            (Ok(mut c), _) => {
                c.transport_config(Arc::clone(&transport));
                c
            }
            (Err(e), None) => return Err(e),
            (Err(e), Some(mut c)) => {
                tracing::warn!(error = %e, "TLS files not reloaded; the configuration in force stays");
                c.transport_config(Arc::clone(&transport));
                c
            }
        };
        let client = in_force.insert(current);
        // Connect, still taking checkpoints so the guest never waits on us.
        let attempt = attempt_timeout(last_rtt);
        let conn = match ep.connect_with(client.clone(), cfg.backup, crate::tls::SERVER_NAME) {
            Ok(c) => match input.take_while(&mut core, &mut checkpoints, &events, tokio::time::timeout(attempt, c)).await {
                // Retrying cannot help: the certificate will not change.
                Ok(Err(e)) => match certificate_refusal(&e) {
                    Some(refused) => return Err(refused),
                    None => Err(LinkError::from(e)),
                },
                Ok(Ok(c)) => Ok(c),
                Err(_) => {
                    // Unanswered (the backup down or cut off): a fresh
                    // attempt at once, the wait already paid; the loss was
                    // reported when the connection went.
                    tracing::debug!(attempt_ms = attempt.as_millis() as u64, "no answer from the backup; connecting again");
                    continue;
                }
            },
            Err(e) => Err(LinkError::from(e)),
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                let _ = events.send(LinkEvent::Disconnected(Arc::new(e)));
                input.take_while(&mut core, &mut checkpoints, &events, tokio::time::sleep(backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let acked_before = core.acked();
        let served =
            serve_connection(&conn, &mut core, (cfg.tuning.fec, &cfg.handover), &mut checkpoints, &mut input.closed, &events).await;
        let st = conn.stats();
        last_rtt = Some(st.path.rtt);
        last_path = MeasuredPath::of(&conn).or(last_path);
        tracing::info!(
            rtt_ms = st.path.rtt.as_secs_f64() * 1e3,
            cwnd = st.path.cwnd,
            sent_packets = st.path.sent_packets,
            lost_packets = st.path.lost_packets,
            spurious_lost_packets = st.path.spurious_lost_packets,
            lost_bytes = st.path.lost_bytes,
            congestion_events = st.path.congestion_events,
            "link statistics at the end of a connection"
        );
        match served {
            Ok(()) => {}
            Err(LinkError::Protocol(e @ (ProtocolError::Refused(_) | ProtocolError::BadEpoch { .. }))) => {
                // Refused at Hello, or a backup whose history contradicts
                // this primary's: retrying cannot help.
                conn.close(VarInt::from_u32(2), e.to_string().as_bytes());
                return Err(LinkError::Protocol(e));
            }
            Err(e) => {
                // TLS 1.3: the backup judges our certificate after our side
                // of the handshake is done, so its verdict ends the connection.
                if let Some(refused) = conn.close_reason().as_ref().and_then(certificate_refusal) {
                    return Err(refused);
                }
                // The backup ended it saying why (a commit it refused, say):
                // that reason, not the lost read it caused here.
                let e = match conn.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == VarInt::from_u32(1) && !c.reason.is_empty() => {
                        LinkError::Protocol(ProtocolError::Peer(String::from_utf8_lossy(&c.reason).into_owned()))
                    }
                    _ => e,
                };
                conn.close(VarInt::from_u32(1), b"reconnecting");
                let _ = events.send(LinkEvent::Disconnected(Arc::new(e)));
            }
        }
        core.handle_disconnected();
        if core.acked() > acked_before {
            backoff = MIN_BACKOFF;
        } else {
            // A connection that acknowledged nothing (a backup failing its
            // commits, say): back off before resending everything again.
            input.take_while(&mut core, &mut checkpoints, &events, tokio::time::sleep(backoff)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// The refusal, when a handshake failed over a certificate (revoked,
/// expired, not from the CA, refused) on either side: retrying cannot
/// help. TLS alerts travel as QUIC crypto errors, 0x100 plus the alert.
fn certificate_refusal(e: &quinn::ConnectionError) -> Option<LinkError> {
    let code = match e {
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        quinn::ConnectionError::TransportError(t) => t.code,
        _ => return None,
    };
    let v = u64::from(code);
    // bad_certificate .. certificate_unknown, unknown_ca, access_denied.
    ((0x100..0x200).contains(&v) && matches!(v - 0x100, 42..=46 | 48 | 49))
        .then(|| LinkError::Protocol(ProtocolError::Refused(format!("the TLS handshake failed over a certificate: {e}"))))
}

/// How long one connection attempt waits for the backup's answer before
/// a fresh one starts. quinn resends an unanswered handshake at a probe
/// timeout that doubles each time, so after a partition heals its next
/// resend could be seconds away (a 5 s cut at 100 ms RTT reconnected
/// 2.7 s after healing). A fresh attempt whose round-trip estimate is the
/// last connection's resends at about 3, 9 and 21 round trips: ten round
/// trips bounds the wait for a healed path to a few of them, and leaves a
/// handshake room for a lost packet or two. The first attempt, with no
/// measure yet, takes quinn's 333 ms estimate.
fn attempt_timeout(last_rtt: Option<Duration>) -> Duration {
    (last_rtt.unwrap_or(Duration::from_millis(333)) * 10).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The primary's intake of checkpoints while it is not connected.
#[derive(Default)]
struct Input {
    closed: bool,
}

impl Input {
    /// Awaits `fut`, taking checkpoints meanwhile so the guest never waits
    /// on a connection attempt or a backoff.
    async fn take_while<F: std::future::Future>(
        &mut self,
        core: &mut SenderCore,
        checkpoints: &mut mpsc::Receiver<Checkpoint>,
        events: &mpsc::UnboundedSender<LinkEvent>,
        fut: F,
    ) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => return r,
                cp = checkpoints.recv(), if !self.closed && core.can_accept() => match cp {
                    Some(cp) => push(core, cp, events),
                    None => self.closed = true,
                },
            }
        }
    }
}

fn push(core: &mut SenderCore, cp: Checkpoint, events: &mpsc::UnboundedSender<LinkEvent>) {
    let epoch = cp.epoch;
    let root = core.push_checkpoint(cp);
    let _ = events.send(LinkEvent::Sealed { epoch, root });
}

async fn serve_connection(
    conn: &Connection,
    core: &mut SenderCore,
    (fec, handover): (Fec, &std::sync::atomic::AtomicBool),
    checkpoints: &mut mpsc::Receiver<Checkpoint>,
    input_closed: &mut bool,
    events: &mpsc::UnboundedSender<LinkEvent>,
) -> Result<(), LinkError> {
    let (mut control, recv) = conn.open_bi().await?;
    core.handle_connected(Instant::now());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_control(recv, tx.clone()));
    let _guard = AbortOnDrop(reader);
    let _forget_reader = AbortOnDrop(tokio::spawn(read_forget_streams(conn.clone(), tx.clone())));
    let _datagram_reader = AbortOnDrop(tokio::spawn(read_datagrams(conn.clone(), tx.clone(), None)));
    let _trace = AbortOnDrop(tokio::spawn(trace_path(conn.clone())));
    let mut streams = JoinSet::new();
    // The stream of an epoch being sent in parts.
    let mut parts = None;
    let mut welcomed = false;
    let mut activity = PeerActivity::default();
    let mut parity = ParityPlanner::new(fec);
    loop {
        if handover.load(std::sync::atomic::Ordering::Relaxed) {
            core.want_handover();
        }
        // Encode at most one epoch per turn so heartbeats and acks are
        // never held up behind a backlog of encoding.
        let more = flush_sender(core, &mut control, conn, (&mut streams, &mut parts), events, &mut parity).await?;
        while let Some(ev) = core.poll_event() {
            match ev {
                SenderEvent::Acked { epoch, manifest } => {
                    parity.acked(epoch);
                    let _ = events.send(LinkEvent::Acked { epoch, manifest, rtt: conn.rtt() });
                }
                SenderEvent::PeerSilent(silence) => {
                    tracing::warn!(%silence, "backup lost");
                    return Err(LinkError::Silent { side: Side::Backup, silence: Box::new(silence) });
                }
                SenderEvent::Forgot { held } => {
                    let _ = events.send(LinkEvent::Forgot { held });
                }
                SenderEvent::Resending { from, missing } => {
                    let _ = events.send(LinkEvent::Resending { from, missing });
                }
                SenderEvent::HandedOver { epoch } => {
                    // The backup has the guest: nothing more to say.
                    let _ = events.send(LinkEvent::HandedOver { epoch });
                    let _ = control.finish();
                    conn.close(VarInt::from_u32(0), b"handed over");
                    return Ok(());
                }
            }
        }
        if core.is_connected() && !welcomed {
            welcomed = true;
            let _ = events.send(LinkEvent::Connected { committed: core.acked(), manifest: core.acked_manifest(), holds: core.assumed() });
        }
        if *input_closed && core.handover_pending() {
            // A planned move: ask (once on this connection, as soon as the
            // last epoch is sealed), then wait for the backup's answer.
            if core.send_handover() {
                continue;
            }
        } else if *input_closed && core.unacked() == 0 {
            // Finish the control stream and let the backup close: a clean end.
            let _ = control.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            return Ok(());
        }
        let deadline = core.poll_timeout().map(tokio::time::Instant::from_std);
        let blocked = parts_blocked(core, parts.as_ref());
        // Biased: messages that queued up while this task was encoding
        // are handled before a timeout is judged.
        tokio::select! {
            biased;
            Some(input) = rx.recv() => match input {
                Control::Message(Ok(m)) => core.handle_message(Instant::now(), m)?,
                Control::Message(Err(e)) => return Err(e.into()),
                Control::Datagram(m) => core.handle_datagram(Instant::now(), &m),
                Control::Closed => return Err(LinkError::ControlClosed(Side::Backup)),
            },
            cp = checkpoints.recv(), if !*input_closed && core.can_accept() => match cp {
                Some(cp) => push(core, cp, events),
                None => *input_closed = true,
            },
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                if let Ok(Err(e)) = done {
                    return Err(e.into());
                }
            }
            true = parts_room(parts.as_ref()), if blocked => {}
            () = sleep_opt(deadline) => {
                let (arrived, rtt) = activity.look(conn);
                core.handle_activity(Instant::now(), arrived, rtt);
                core.handle_timeout(Instant::now());
            }
            () = std::future::ready(()), if more => {}
        }
    }
}

/// Logs the path's state four times a second at debug level (the
/// congestion window's ramp, the round trip, bytes out, losses): what a
/// slow first copy or a stalled link is read from.
async fn trace_path(conn: Connection) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // The controller is copied to be read: only when the line is kept.
        if !tracing::enabled!(tracing::Level::DEBUG) {
            continue;
        }
        let st = conn.stats();
        let bbr = bbr_state(&conn);
        tracing::debug!(
            cwnd = st.path.cwnd,
            bbr = bbr.as_ref().map_or("-", |b| b.mode_name()),
            bw_mbps = bbr.as_ref().map_or(0.0, |b| b.bandwidth() as f64 * 8e-6),
            min_rtt_ms = bbr.as_ref().map_or(0.0, |b| b.min_rtt().as_secs_f64() * 1e3),
            rtt_ms = st.path.rtt.as_secs_f64() * 1e3,
            tx_bytes = st.udp_tx.bytes,
            rx_bytes = st.udp_rx.bytes,
            lost_packets = st.path.lost_packets,
            congestion_events = st.path.congestion_events,
            "path"
        );
    }
}

/// What the transport knows of the peer's liveness: its packets keep
/// arriving even when a heartbeat is stuck behind a retransmission.
#[derive(Default)]
struct PeerActivity {
    datagrams: u64,
}

impl PeerActivity {
    /// Whether datagrams arrived since the last look, and the round trip.
    fn look(&mut self, conn: &Connection) -> (bool, Duration) {
        let n = conn.stats().udp_rx.datagrams;
        let arrived = n > self.datagrams;
        self.datagrams = n;
        (arrived, conn.rtt())
    }
}

/// The tasks writing epoch streams.
type EpochStreams = JoinSet<Result<(), StreamError>>;
/// Where the parts of an epoch sent in parts go, to its stream's writer.
type PartSink = mpsc::Sender<Vec<u8>>;

/// Parts of an epoch sent in parts that may wait for its stream's writer:
/// the next part is encoded only when there is room for it, so however
/// large the epoch (a first copy over a slow link), what waits encoded is
/// a few parts, not the whole of it.
const PARTS_AHEAD: usize = 2;

/// The core's next transmit, short of a further part of an epoch whose
/// writer has no room for it (control messages still go).
fn next_transmit(core: &mut SenderCore, parts: Option<&PartSink>) -> Option<Transmit> {
    if parts_blocked(core, parts) {
        return core.poll_control();
    }
    core.poll_transmit()
}

fn parts_blocked(core: &SenderCore, parts: Option<&PartSink>) -> bool {
    core.is_streaming() && parts.is_some_and(|s| s.capacity() == 0)
}

/// Resolves once the writer of the epoch in parts has room for another
/// part (`false` if it is gone: its task reports why).
async fn parts_room(parts: Option<&PartSink>) -> bool {
    match parts {
        Some(s) => s.reserve().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Writes an epoch sent in parts onto a stream of its own, each part as
/// it comes, and finishes the stream when the parts end.
async fn write_parts(conn: Connection, priority: i32, mut parts: mpsc::Receiver<Vec<u8>>) -> Result<(), StreamError> {
    let mut s = conn.open_uni().await?;
    // Cannot fail on a stream just opened.
    let _ = s.set_priority(priority);
    while let Some(bytes) = parts.recv().await {
        match s.write_all(&bytes).await {
            Err(quinn::WriteError::Stopped(_)) => return Ok(()),
            r => r?,
        }
    }
    let _ = s.finish();
    Ok(())
}

async fn flush_sender(
    core: &mut SenderCore,
    control: &mut SendStream,
    conn: &Connection,
    (streams, parts): (&mut EpochStreams, &mut Option<PartSink>),
    events: &mpsc::UnboundedSender<LinkEvent>,
    parity: &mut ParityPlanner,
) -> Result<bool, LinkError> {
    while let Some(d) = core.poll_datagram() {
        send_datagram(conn, d);
    }
    while let Some(t) = next_transmit(core, parts.as_ref()) {
        match t {
            Transmit::Control(b) => control.write_all(&b).await.map_err(StreamError::from)?,
            Transmit::Epoch { epoch, bytes, first, last, wire_bytes, pages, mix, resent } => {
                if last {
                    let _ = events.send(LinkEvent::Sent { epoch, wire_bytes, pages, mix, resent });
                }
                if !(first && last) {
                    // An epoch in parts (no parity: it is large).
                    if first {
                        let _ = parity.plan(conn, epoch, 0);
                        let (tx, rx) = mpsc::channel(PARTS_AHEAD);
                        streams.spawn(write_parts(conn.clone(), epoch_priority(epoch), rx));
                        *parts = Some(tx);
                    }
                    let sink = if last { parts.take() } else { parts.clone() };
                    // Room was checked before the part was encoded; a
                    // writer gone has failed, which its task reports.
                    let _ = sink.expect("an epoch's parts follow its first").try_send(bytes);
                    return Ok(true);
                }
                let parity = parity.plan(conn, epoch, bytes.len());
                let conn = conn.clone();
                let events = events.clone();
                let priority = epoch_priority(epoch);
                streams.spawn(async move {
                    let mut s = conn.open_uni().await?;
                    // Cannot fail on a stream just opened.
                    let _ = s.set_priority(priority);
                    match s.write_all(&bytes).await {
                        // The backup rebuilt the epoch from parity and
                        // stopped the stream: nothing more to send.
                        Err(quinn::WriteError::Stopped(_)) => return Ok(()),
                        r => r?,
                    }
                    // Fails only on a stream the backup already stopped.
                    let _ = s.finish();
                    if let Some(plan) = parity {
                        let (sent, dropped) = send_parity(&conn, s.id().index(), &bytes, plan);
                        let _ = events.send(LinkEvent::Parity { epoch, sent, dropped });
                    }
                    Ok(())
                });
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The send priority of an epoch's stream: below the control stream (0)
/// and Forget streams (-1), and the older the epoch the higher, so that
/// the link carries epochs first in, first out (retransmissions of an old
/// epoch included): the oldest unacknowledged epoch, the one output waits
/// for, is never held back by younger ones sharing the window.
fn epoch_priority(epoch: EpochId) -> i32 {
    // Wraps after 2^30 epochs (about 310 days at 40 Hz); across the wrap
    // a few epochs go out of order, which costs delay, not correctness.
    let rank = i32::try_from(epoch.0 % (1 << 30)).expect("below 2^30");
    -2 - rank
}

/// The backup's Forget streams: each carries Forget frames only, read as
/// they come (memory stays within a frame), handed on like control
/// messages.
async fn read_forget_streams(conn: Connection, tx: mpsc::UnboundedSender<Control>) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let mut rd = FrameReader::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let r = loop {
                match rd.next_message() {
                    Ok(Some(m @ Message::Forget(_))) => {
                        if tx.send(Control::Message(Ok(m))).is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => break Err(DecodeError::Corrupt("a message other than Forget on a forget stream")),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = r {
                let _ = tx.send(Control::Message(Err(e.into())));
                return;
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => rd.push(&buf[..n]),
                Ok(None) if rd.pending() == 0 => break,
                Ok(None) => {
                    let _ = tx.send(Control::Message(Err(DecodeError::from(FormatError::Truncated {
                        need: rd.pending() + 1,
                        have: rd.pending(),
                    })
                    .into())));
                    return;
                }
                // Advisory: a stream cut off (the connection ending) loses
                // nothing that matters.
                Err(_) => break,
            }
        }
    }
}

/// Sends `frame` as an unreliable datagram when the peer takes datagrams
/// of its size; dropped otherwise (it is a copy of a control message).
fn send_datagram(conn: &Connection, frame: Vec<u8>) {
    if conn.max_datagram_size().is_some_and(|max| frame.len() <= max) {
        let _ = conn.send_datagram(frame.into());
    }
}

/// Datagrams from the peer: each one frame, a copy of a control message,
/// or (at the backup, into `parity`) a parity shard of an epoch stream.
/// A datagram that does not decode is dropped (the stream has the real
/// one).
async fn read_datagrams(conn: Connection, tx: mpsc::UnboundedSender<Control>, parity: Option<Arc<ParityInbox>>) {
    while let Ok(d) = conn.read_datagram().await {
        if let Some(inbox) = parity.as_ref().filter(|_| Parity::is_parity(&d)) {
            inbox.deliver(&d);
            continue;
        }
        let mut rd = FrameReader::default();
        rd.push(&d);
        match rd.next_message() {
            Ok(Some(m)) if rd.pending() == 0 => {
                if tx.send(Control::Datagram(m)).is_err() {
                    return;
                }
            }
            _ => tracing::debug!(len = d.len(), "undecodable datagram dropped"),
        }
    }
}

async fn read_control(mut recv: RecvStream, tx: mpsc::UnboundedSender<Control>) {
    let mut rd = FrameReader::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        loop {
            match rd.next_message() {
                Ok(Some(m)) => {
                    if tx.send(Control::Message(Ok(m))).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Control::Message(Err(e.into())));
                    return;
                }
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => rd.push(&buf[..n]),
            Ok(None) => {
                let _ = tx.send(Control::Closed);
                return;
            }
            Err(e) => {
                let _ = tx.send(Control::Message(Err(e.into())));
                return;
            }
        }
    }
}

/// Writes Forget frames on a unidirectional stream of their own, below the
/// control stream's priority (0): Acks and heartbeats go first.
async fn send_forget(conn: &Connection, frames: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut s = conn.open_uni().await?;
    let _ = s.set_priority(-1);
    s.write_all(frames).await?;
    s.finish()?;
    Ok(())
}

/// The next list of deleted chunks; pends forever without a subscription.
async fn next_deleted(rx: &mut Option<tokio::sync::broadcast::Receiver<Arc<[ChunkId]>>>) -> Option<Arc<[ChunkId]>> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let Some(r) = rx.as_mut() else { return std::future::pending().await };
        match r.recv().await {
            Ok(chunks) => return Some(chunks),
            // Missed lists only cost a refused commit later.
            Err(RecvError::Lagged(n)) => tracing::debug!(lists = n, "deleted-chunk lists missed"),
            Err(RecvError::Closed) => *rx = None,
        }
    }
}

async fn sleep_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The backup's store, as the driver sees it.
pub trait Replica: Send + Sync + 'static {
    /// A primary says Hello. Returns the last committed epoch of `guest`
    /// and its manifest hash, or why the primary is refused.
    ///
    /// # Errors
    /// A message sent to the primary before the connection is closed.
    fn welcome(
        &self,
        guest: GuestId,
        instance: u64,
        page_count: u64,
        generation: u64,
        continues: Option<(EpochId, ChunkId)>,
    ) -> Result<(EpochId, ChunkId), String>;

    /// Durably commits complete, consecutive epochs (blocking), all or
    /// none; returns the last one's manifest hash.
    ///
    /// # Errors
    /// [`CommitError::Missing`] with every chunk the epochs name that the
    /// replica does not hold: the primary is told, and sends the epochs
    /// again without them. Any other [`CommitError`]: the
    /// connection is closed and the primary resends on its next one.
    fn commit(&self, epochs: Vec<ReceivedEpoch>) -> Result<ChunkId, CommitError>;

    /// Chunks of `guest`'s history the replica deletes from now on (its
    /// GC), as lists, for the driver to relay to this connection's
    /// primary (no other guest's); `None` when it never deletes any.
    /// Relaying is advisory: a list missed (a lagging receiver) only means
    /// a refused commit later.
    fn deleted_chunks(&self, _guest: GuestId) -> Option<tokio::sync::broadcast::Receiver<Arc<[ChunkId]>>> {
        None
    }

    /// The primary of `guest` went silent after `committed`; `silence`
    /// is the evidence.
    fn primary_lost(&self, guest: GuestId, committed: EpochId, silence: &crate::liveness::Silence);

    /// The primary hands `guest` over at `epoch`, its last, committed (a
    /// planned move): take it over now, or say why not.
    ///
    /// # Errors
    /// Why this backup does not take the guest over.
    fn hand_over(&self, guest: GuestId, epoch: EpochId) -> Result<(), String>;

    /// The connection of `guest` ended (for any reason).
    fn disconnected(&self, guest: GuestId);

    /// Chunks of `guest`'s memory at its head here that its primary may
    /// name by hash (see [`Message::Holds`]), at most
    /// [`MAX_HOLDS`]; asked for by a primary that knows nothing of what
    /// this replica holds. Advisory: none is always correct.
    fn holds(&self, _guest: GuestId) -> Vec<ChunkId> {
        Vec::new()
    }
}

/// Most chunks a backup lists in [`Message::Holds`] (32 MiB of hashes:
/// a 4 GiB memory of distinct pages).
pub const MAX_HOLDS: usize = 1 << 20;

/// Timing of the backup's side.
#[derive(Debug, Clone, Copy)]
pub struct BackupLinkConfig {
    /// Heartbeat period (default 50 ms).
    pub heartbeat: Duration,
    /// Silence after which the primary counts as lost, at the least
    /// (default 10 heartbeats: on a loaded host a few periods of silence
    /// are common); longer when it has been heard irregularly (see
    /// [`Liveness`](crate::Liveness)).
    pub primary_timeout: Duration,
    /// Silence after which the primary counts as lost, at the most
    /// (default 5 s).
    pub primary_timeout_max: Duration,
    /// Bytes of epochs received and not yet committed, per connection, at
    /// most (default 1 GiB; see [`Budget`]).
    pub max_buffered_per_connection: u64,
    /// ... and across all connections (default 4 GiB).
    pub max_buffered: u64,
    /// Whether the client certificate shared by every guest (`keygen`'s
    /// `primary.pem`) may speak for any guest (default true). A
    /// certificate issued for one guest speaks for that guest only,
    /// whatever this says.
    pub shared_primary_cert: bool,
}

impl Default for BackupLinkConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(50),
            primary_timeout: Duration::from_millis(500),
            primary_timeout_max: Duration::from_secs(5),
            max_buffered_per_connection: 1 << 30,
            max_buffered: 4 << 30,
            shared_primary_cert: true,
        }
    }
}

/// Accepts primaries on `ep` until the endpoint closes, within the
/// memory budget `cfg` sets.
pub async fn run_backup<R: Replica>(ep: Endpoint, replica: Arc<R>, cfg: BackupLinkConfig) {
    let budget = Arc::new(Budget::new(cfg.max_buffered_per_connection, cfg.max_buffered));
    serve_backup(ep, replica, cfg, budget).await;
}

/// As [`run_backup`], following `tls`'s revocation list: when
/// `revoked.crl` changes (written, replaced or removed; looked for every
/// [`REVOCATION_POLL`]), new handshakes are checked against the new list
/// and every connected primary's certificate is checked again, and one
/// it revokes is disconnected (its next handshake is then refused). A
/// list that cannot be read keeps the one in force, with a warning.
pub async fn run_backup_revoking<R: Replica>(ep: Endpoint, replica: Arc<R>, cfg: BackupLinkConfig, tls: crate::tls::TlsDir) {
    let budget = Arc::new(Budget::new(cfg.max_buffered_per_connection, cfg.max_buffered));
    let (tx, rx) = tokio::sync::watch::channel(None);
    let _watch = AbortOnDrop(tokio::spawn(watch_revocations(ep.clone(), tls, tx)));
    accept_primaries(ep, replica, cfg, budget, Some(rx)).await;
}

/// How often a backup looks for a new revocation list.
pub const REVOCATION_POLL: Duration = Duration::from_secs(2);

async fn watch_revocations(ep: Endpoint, tls: crate::tls::TlsDir, checks: tokio::sync::watch::Sender<Option<crate::tls::PeerCheck>>) {
    let stamp = |tls: &crate::tls::TlsDir| std::fs::metadata(tls.crl()).and_then(|m| m.modified()).ok();
    let mut last = stamp(&tls);
    loop {
        tokio::time::sleep(REVOCATION_POLL).await;
        let now = stamp(&tls);
        if now == last {
            continue;
        }
        last = now;
        match tls.backup_server_and_check() {
            Ok((cfg, check)) => {
                ep.set_server_config(Some(cfg));
                // A change of who may connect: shown at the default level.
                tracing::warn!(path = %tls.crl().display(), "revocation list reloaded");
                let _ = checks.send(Some(check));
            }
            Err(e) => tracing::warn!(error = %e, "revocation list not reloaded; the one in force stays"),
        }
    }
}

/// As [`run_backup`], within `budget` (which the caller can watch).
pub async fn serve_backup<R: Replica>(ep: Endpoint, replica: Arc<R>, cfg: BackupLinkConfig, budget: Arc<Budget>) {
    accept_primaries(ep, replica, cfg, budget, None).await;
}

/// Serves each primary that connects; with `checks`, disconnects one
/// whose certificate a new check refuses.
async fn accept_primaries<R: Replica>(
    ep: Endpoint,
    replica: Arc<R>,
    cfg: BackupLinkConfig,
    budget: Arc<Budget>,
    checks: Option<tokio::sync::watch::Receiver<Option<crate::tls::PeerCheck>>>,
) {
    while let Some(incoming) = ep.accept().await {
        let replica = Arc::clone(&replica);
        let budget = budget.connection();
        let mut checks = checks.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "refused connection");
                    return;
                }
            };
            let peer = conn.remote_address();
            let chain = crate::tls::peer_chain(&conn);
            let served = serve_primary(&conn, &replica, cfg, &budget);
            tokio::pin!(served);
            let revoked = async {
                let Some(rx) = checks.as_mut() else { return std::future::pending().await };
                loop {
                    if rx.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                    let check = rx.borrow_and_update().clone();
                    if let Some(Err(why)) = check.map(|c| c(&chain)) {
                        return why;
                    }
                }
            };
            tokio::select! {
                r = &mut served => match r {
                    Ok(()) => conn.close(VarInt::from_u32(0), b"done"),
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "primary connection ended");
                        conn.close(VarInt::from_u32(1), e.to_string().as_bytes());
                    }
                },
                why = revoked => {
                    let why = format!("the certificate this primary connected with is no longer valid: {why}");
                    tracing::warn!(%peer, %why, "primary disconnected");
                    conn.close(VarInt::from_u32(1), why.as_bytes());
                }
            }
        });
    }
}

async fn serve_primary<R: Replica>(
    conn: &Connection,
    replica: &Arc<R>,
    cfg: BackupLinkConfig,
    budget: &Arc<ConnectionBudget>,
) -> Result<(), LinkError> {
    let (mut control, recv) = conn.accept_bi().await?;
    // One reader frames the whole control stream, Hello included.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _control_reader = AbortOnDrop(tokio::spawn(read_control(recv, tx.clone())));
    let hello = match rx.recv().await {
        Some(Control::Message(m)) => m?,
        Some(Control::Closed | Control::Datagram(_)) | None => return Err(LinkError::Closed),
    };
    let Message::Hello { guest, instance, page_count, generation, continues, wants_holds } = hello else {
        return Err(ProtocolError::Unexpected("first control message is not Hello").into());
    };
    let r2 = Arc::clone(replica);
    let continues = (continues.0 > EpochId(0)).then_some(continues);
    let welcome = match identity_refusal(conn, guest, cfg.shared_primary_cert) {
        Some(why) => Err(why),
        None => tokio::task::spawn_blocking(move || r2.welcome(guest, instance, page_count, generation, continues)).await?,
    };
    let (committed, head) = match welcome {
        Ok(w) => w,
        Err(m) => {
            let _ = control.write_all(&Message::Error(m.clone()).to_bytes()).await;
            let _ = control.finish();
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(LinkError::Refused(m));
        }
    };
    tracing::info!(%guest, committed = committed.0, peer = %conn.remote_address(), "primary connected");
    // Subscribed before the Welcome: what GC deletes from here on reaches
    // the primary after it.
    let deleted = replica.deleted_chunks(guest);
    let holds = if wants_holds {
        let r2 = Arc::clone(replica);
        tokio::task::spawn_blocking(move || r2.holds(guest)).await?
    } else {
        Vec::new()
    };
    let session = Session { guest, page_count, committed, head, holds, budget: Arc::clone(budget) };
    let result = serve_epochs(conn, replica, cfg, session, control, (tx, rx), deleted).await;
    replica.disconnected(guest);
    result
}

/// Why the peer's certificate may not speak for `guest`, if it may not.
fn identity_refusal(conn: &Connection, guest: GuestId, shared_allowed: bool) -> Option<String> {
    let chain = crate::tls::peer_chain(conn);
    let Some(leaf) = chain.first() else {
        return Some("no client certificate".into());
    };
    match crate::tls::speaks_for(leaf, guest) {
        crate::tls::Speaks::Guest => None,
        crate::tls::Speaks::Shared if shared_allowed => None,
        crate::tls::Speaks::Shared => Some(format!(
            "the shared primary certificate may not speak for {guest} here (backup.shared-primary-cert = false): issue one with `remus cert issue --guest {}`",
            guest.0
        )),
        crate::tls::Speaks::Not => Some(format!("this client certificate is not issued for {guest}")),
    }
}

/// What the Hello and the replica settled for a connection, and its
/// memory budget.
struct Session {
    guest: GuestId,
    page_count: u64,
    committed: EpochId,
    head: ChunkId,
    /// What the guest's memory at the head holds, for the primary (when
    /// its Hello asked).
    holds: Vec<ChunkId>,
    budget: Arc<ConnectionBudget>,
}

async fn serve_epochs<R: Replica>(
    conn: &Connection,
    replica: &Arc<R>,
    cfg: BackupLinkConfig,
    Session { guest, page_count, committed, head, holds, budget }: Session,
    mut control: SendStream,
    (tx, mut rx): (mpsc::UnboundedSender<Control>, mpsc::UnboundedReceiver<Control>),
    mut deleted: Option<tokio::sync::broadcast::Receiver<Arc<[ChunkId]>>>,
) -> Result<(), LinkError> {
    let mut core = ReceiverCore::new(Instant::now(), cfg.heartbeat, cfg.primary_timeout, cfg.primary_timeout_max);
    let mut activity = PeerActivity::default();
    core.accept(guest, page_count, (committed, head), holds);
    let max = core.max_epoch_bytes();
    let inbox = Arc::new(ParityInbox::new(max as u64));
    let _report = ParityReport(Arc::clone(&inbox));
    let _datagram_reader = AbortOnDrop(tokio::spawn(read_datagrams(conn.clone(), tx, Some(Arc::clone(&inbox)))));
    let _trace = AbortOnDrop(tokio::spawn(trace_path(conn.clone())));
    let (etx, mut erx) = mpsc::unbounded_channel::<Result<(Vec<u8>, Held), StreamError>>();
    let c2 = conn.clone();
    let inbox2 = Arc::clone(&inbox);
    let budget2 = Arc::clone(&budget);
    let _epoch_reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            let Ok(s) = c2.accept_uni().await else { return };
            let etx = etx.clone();
            let (inbox, budget) = (Arc::clone(&inbox2), Arc::clone(&budget2));
            tokio::spawn(async move {
                let _ = etx.send(read_epoch_stream(s, &inbox, &budget).await);
            });
        }
    }));
    // Budget held by epochs received and not yet committed.
    let mut held: BTreeMap<EpochId, Held> = BTreeMap::new();
    let mut commit: Option<tokio::task::JoinHandle<(EpochId, Result<ChunkId, CommitError>)>> = None;
    loop {
        if commit.is_none() {
            if let Some(group) = core.poll_commit() {
                let r2 = Arc::clone(replica);
                let epoch = group.last().expect("non-empty").header.epoch;
                let (first, started) = (group[0].header.epoch, Instant::now());
                commit = Some(tokio::task::spawn_blocking(move || {
                    let r = r2.commit(group);
                    tracing::debug!(first = first.0, last = epoch.0, ms = started.elapsed().as_secs_f64() * 1e3, "commit group");
                    (epoch, r)
                }));
            }
        }
        while let Some(d) = core.poll_datagram() {
            send_datagram(conn, d);
        }
        while let Some(b) = core.poll_transmit() {
            control.write_all(&b).await.map_err(StreamError::from)?;
        }
        let mut forget = Vec::new();
        while let Some(b) = core.poll_forget() {
            forget.extend_from_slice(&b);
        }
        if !forget.is_empty() {
            let conn = conn.clone();
            tokio::spawn(async move {
                if let Err(e) = send_forget(&conn, &forget).await {
                    tracing::debug!(error = %e, "forget stream not delivered");
                }
            });
        }
        // Either event ends the link.
        if let Some(ev) = core.poll_event() {
            match ev {
                ReceiverEvent::Handover { guest, epoch } => {
                    tracing::info!(%guest, epoch = epoch.0, "the primary hands the guest over");
                    let r2 = Arc::clone(replica);
                    let taken = tokio::task::spawn_blocking(move || r2.hand_over(guest, epoch)).await?;
                    let answer = match &taken {
                        Ok(()) => Message::Handover { epoch },
                        Err(m) => Message::Error(m.clone()),
                    };
                    control.write_all(&answer.to_bytes()).await.map_err(StreamError::from)?;
                    let _ = control.finish();
                    // The primary closes once it has the answer.
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                    return taken.map_err(LinkError::Refused);
                }
                ReceiverEvent::PrimaryLost { guest, committed, silence } => {
                    tracing::warn!(%guest, committed = committed.0, %silence, "primary lost");
                    replica.primary_lost(guest, committed, &silence);
                    return Err(LinkError::Silent { side: Side::Primary, silence: Box::new(silence) });
                }
            }
        }
        let deadline = core.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            Some(input) = rx.recv() => match input {
                Control::Message(Ok(m)) => {
                    tracing::debug!(?m, "control message from primary");
                    core.handle_message(Instant::now(), m)?;
                }
                Control::Message(Err(e)) => return Err(e.into()),
                Control::Datagram(m) => core.handle_datagram(Instant::now(), &m),
                Control::Closed => {
                    tracing::info!(%guest, committed = core.committed().0, "primary finished");
                    return Ok(());
                }
            },
            Some(read) = erx.recv() => {
                let (bytes, budget) = read?;
                tracing::debug!(len = bytes.len(), "epoch stream from primary");
                if let Some(epoch) = core.handle_epoch_stream(Instant::now(), &bytes)? {
                    held.insert(epoch, budget);
                }
            }
            Some(done) = async { match commit.as_mut() { Some(h) => Some(h.await), None => None } }, if commit.is_some() => {
                commit = None;
                let (epoch, r) = done?;
                match r {
                    Ok(manifest) => {
                        core.handle_committed(epoch, manifest);
                        held = held.split_off(&epoch.next());
                    }
                    Err(CommitError::Missing(chunks)) => {
                        tracing::info!(
                            %guest,
                            epoch = core.committed().next().0,
                            missing = chunks.len(),
                            "epochs name chunks no longer held; the primary sends them again"
                        );
                        core.handle_missing(&chunks);
                        // Every uncommitted epoch was dropped, to come again.
                        held.clear();
                    }
                    Err(e) => {
                        let _ = control.write_all(&Message::Error(e.to_string()).to_bytes()).await;
                        return Err(LinkError::Commit { epoch, cause: e });
                    }
                }
            }
            Some(chunks) = next_deleted(&mut deleted) => {
                tracing::debug!(%guest, chunks = chunks.len(), "telling the primary to forget deleted chunks");
                core.handle_chunks_deleted(&chunks);
            }
            () = sleep_opt(deadline) => {
                let (arrived, rtt) = activity.look(conn);
                core.handle_activity(Instant::now(), arrived, rtt);
                core.handle_timeout(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_attempt_waits_ten_round_trips_within_one_to_ten_seconds() {
        let ms = Duration::from_millis;
        // Room for a handshake that loses a packet or two on a long path.
        assert_eq!(attempt_timeout(Some(ms(200))), ms(2000));
        // A short path is still given a second: a handshake costs CPU too.
        assert_eq!(attempt_timeout(Some(ms(1))), ms(1000));
        // Never longer than the connection's idle timeout.
        assert_eq!(attempt_timeout(Some(ms(5000))), ms(10_000));
        // No measure yet: quinn's own estimate.
        assert_eq!(attempt_timeout(None), ms(3330));
    }

    /// While an epoch's stream writer has no room for another part, the
    /// core gives control messages only: the encoder never runs further
    /// ahead of the link than [`PARTS_AHEAD`] parts.
    #[test]
    fn parts_are_encoded_no_further_ahead_than_their_writer_has_room_for() {
        use remus_types::{Checkpoint, ChunkId, GuestId, Pfn, PAGE_SIZE};
        let now = Instant::now();
        let mut core = SenderCore::new(SenderConfig { slice_pages: 4, ..SenderConfig::default() }, GuestId(3), 1, 64);
        core.handle_connected(now);
        core.handle_message(now, Message::Welcome { guest: GuestId(3), committed: EpochId(0), head: ChunkId::default() }).unwrap();
        let pages: Vec<u8> = (0..40 * PAGE_SIZE).map(|i| (i * 7 / 4093) as u8).collect();
        core.push_checkpoint(Checkpoint {
            guest: GuestId(3),
            epoch: EpochId(1),
            page_count: 64,
            pfns: (0..40).map(Pfn).collect(),
            pages,
            ..Checkpoint::default()
        });
        let (tx, mut rx) = mpsc::channel(PARTS_AHEAD);
        let mut sink: Option<PartSink> = None;
        let take = |core: &mut SenderCore, sink: &mut Option<PartSink>| loop {
            match next_transmit(core, sink.as_ref()) {
                Some(Transmit::Epoch { bytes, first, last, .. }) => {
                    if first {
                        *sink = Some(tx.clone());
                    }
                    sink.as_ref().unwrap().try_send(bytes).expect("room was checked");
                    return Some(last);
                }
                Some(Transmit::Control(_)) => {}
                None => return None,
            }
        };
        // Ten parts to go; the writer reads none of them: two are encoded.
        assert_eq!(take(&mut core, &mut sink), Some(false));
        assert_eq!(take(&mut core, &mut sink), Some(false));
        assert_eq!(take(&mut core, &mut sink), None, "no room: no third part");
        assert!(core.is_streaming() && parts_blocked(&core, sink.as_ref()));
        // A heartbeat falls due meanwhile: it still goes.
        core.handle_timeout(now + Duration::from_secs(1));
        assert!(matches!(next_transmit(&mut core, sink.as_ref()), Some(Transmit::Control(_))));
        // The writer takes parts as the link carries them: one encoded per
        // part taken, to the last.
        let mut parts = 2;
        loop {
            rx.try_recv().expect("a part waits");
            let last = take(&mut core, &mut sink).expect("room, yet no part");
            parts += 1;
            if last {
                assert!(!core.is_streaming());
                break;
            }
            assert_eq!(take(&mut core, &mut sink), None, "one taken, one encoded");
        }
        assert_eq!(parts, 10);
    }
}

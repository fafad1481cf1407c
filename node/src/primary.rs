//! The primary at run time: the epoch engine driven on a thread of its
//! own (its timer, and the acknowledgements that release held output), the
//! QUIC link on another.
//!
//! The engine thread is the engine's only driver: it sleeps until the
//! engine's next timeout or the next acknowledgement, whichever comes
//! first, hands sealed checkpoints to the link, and delivers the output
//! the engine releases to its sinks (the guest's network, the output log).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use parking_lot::Mutex;
use remus_capture::{ArenaConfig, ArenaGuest, CadenceConfig, EpochEngine, OutputBuffer, ProtectedGuest};
use remus_qemu::{Egress, NetRelay, QemuConfig, QemuGuest};
use remus_types::{now_unix_nanos, Checkpoint, ChunkId, EpochId, GuestId, PagePool};
use remus_wan::driver::ClientSource;
use remus_wan::driver::{run_primary, LinkEvent, LinkTuning, PrimaryLinkConfig};
use remus_wan::tls::{client_config, TlsDir};
use remus_wan::{SenderConfig, SharedFrames};
use remus_witness::Standing;
use tokio::sync::mpsc;

use crate::error::NodeError;
use crate::fanout::{fan_out, merging_feed, FarStats, Feeds, Release, Releaser, FAR_QUEUE};
use crate::hooks::{HookConfig, Hooks};
use crate::lease::{acquire, adopt, Renewal, WitnessOptions};
use crate::stats::PrimaryStats;

type Result<T, E = NodeError> = std::result::Result<T, E>;

/// Everything a primary needs.
#[derive(Debug, Clone)]
pub struct PrimaryOptions {
    /// Guest id.
    pub guest: GuestId,
    /// The guest.
    pub guest_kind: GuestKind,
    /// Epoch length: the base period, and how far it may grow while the
    /// backup lags (see [`CadenceConfig`]).
    pub cadence: CadenceConfig,
    /// Backup address (the near backup, when there are far ones).
    pub backup: SocketAddr,
    /// Far backups, replicated to at once beside the near one (see
    /// [`crate::fanout`]).
    pub far: Vec<SocketAddr>,
    /// Whose acknowledgements release output.
    pub release: Release,
    /// Bytes of unacknowledged checkpoints a far backup's link keeps (one
    /// that does not pace the guest) before merging the rest (default
    /// [`FAR_RETAINED_BYTES`](crate::fanout::FAR_RETAINED_BYTES)).
    pub far_retained_bytes: usize,
    /// TLS material.
    pub tls: TlsDir,
    /// Protocol tuning.
    pub sender: SenderConfig,
    /// Transport tuning (congestion control, parity).
    pub link: LinkTuning,
    /// Where released output lines go.
    pub output_log: Option<PathBuf>,
    /// Where each sealed epoch's memory root is recorded (JSON lines).
    pub record_roots: Option<PathBuf>,
    /// The witness holding the guest's lease (none: the primary runs
    /// without one, and a backup with failover set may take over a guest
    /// that is still alive behind a cut link).
    pub witness: Option<WitnessOptions>,
    /// Where its events (lease taken, history continued, self-fence,
    /// taken over) are delivered.
    pub hooks: HookConfig,
    /// A lease another process of this node handed off (generation,
    /// version): adopted at once instead of waited out (a guest protected
    /// again after failing over here).
    pub adopt_lease: Option<(u64, String)>,
    /// The history this run continues when its backup holds none of the
    /// guest's (a guest protected again after failing over): the last
    /// epoch and its manifest, kept by the backup it failed over to.
    pub continues: Option<(EpochId, remus_types::ChunkId)>,
    /// A guest with no history (new to every backup) releases its output
    /// while its first copy is made, as Remus did during its initial
    /// migration: no backup could resume it before that copy is committed,
    /// and holding it would cut the guest off for as long as the copy
    /// takes (see [`EpochEngine::releasing_ahead`]). False: held, like
    /// every later epoch's. A guest that continues a history (restarted,
    /// failed over or moved) always holds it.
    pub release_first_copy: bool,
}

/// Whether the primary may release output (its lease, when it has one),
/// and whom it tells when that changes.
struct Ownership {
    guest: GuestId,
    lease: Option<Renewal>,
    hooks: Hooks,
    /// Set when the guest is handed over (a planned move): once its last
    /// epoch is sealed and acknowledged, the lease is released.
    handover: Arc<AtomicBool>,
}

impl Ownership {
    fn standing(&self) -> Option<Standing> {
        self.lease.as_ref().map(Renewal::standing)
    }

    /// Tells the hooks: `fields` (a JSON object) with the event's name,
    /// the role, the guest and the generation.
    fn notify(&self, event: &str, mut fields: serde_json::Value) {
        if let Some(o) = fields.as_object_mut() {
            o.insert("event".into(), event.into());
            o.insert("role".into(), "primary".into());
            o.insert("guest".into(), self.guest.0.into());
            if let Some(l) = &self.lease {
                o.insert("generation".into(), l.generation().into());
            }
        }
        self.hooks.notify(fields);
    }
}

/// Which guest a primary protects.
#[derive(Debug, Clone)]
pub enum GuestKind {
    /// The built-in in-process guest.
    Arena(ArenaConfig),
    /// A QEMU virtual machine.
    Qemu(QemuConfig),
    /// A QEMU virtual machine resumed from the checkpoint laid out in its
    /// run directory (a guest that failed over here, protected again).
    ResumedQemu(QemuConfig),
}

impl GuestKind {
    /// Guest RAM in MiB.
    #[must_use]
    pub fn memory_mib(&self) -> u64 {
        match self {
            Self::Arena(a) => a.memory_mib,
            Self::Qemu(q) | Self::ResumedQemu(q) => q.machine.memory_mib,
        }
    }
}

/// A running primary.
pub struct Primary {
    stop: Arc<AtomicBool>,
    handover: Arc<AtomicBool>,
    engine: Option<JoinHandle<Result<()>>>,
    link: Option<JoinHandle<Result<()>>>,
    /// Live statistics.
    pub stats: Arc<Mutex<PrimaryStats>>,
    /// True when dirty tracking is exact.
    pub exact_tracking: bool,
}

/// Where released output goes: the guest's network and the output log.
struct OutputSinks {
    net: Option<Arc<NetRelay>>,
    log: Option<std::fs::File>,
}

impl OutputSinks {
    fn deliver(&mut self, released: &[Vec<u8>]) {
        if let Some(net) = &self.net {
            net.release(released);
        }
        if let Some(f) = self.log.as_mut() {
            for line in released {
                let _ = f.write_all(line);
            }
        }
    }
}

impl Primary {
    /// Starts the guest, the engine and the link.
    ///
    /// # Errors
    /// When the guest cannot start or the TLS material is unusable.
    pub fn start(opts: PrimaryOptions) -> Result<Self> {
        // Checked now (a clear error before the guest starts), and built
        // again before each connection attempt (a revocation list since).
        let client: ClientSource = {
            let (tls, guest) = (opts.tls.clone(), opts.guest);
            Arc::new(move || client_config(Some(tls.primary_identity(guest)?), tls.roots()?, tls.crls()?))
        };
        client()?;
        // The lease before the guest: a guest owned elsewhere never starts.
        let lease = match &opts.witness {
            Some(w) => {
                let adopted = match &opts.adopt_lease {
                    Some((generation, tag)) => adopt(w, opts.guest, *generation, tag)?,
                    None => None,
                };
                let (holder, lease) = match adopted {
                    Some(a) => a,
                    None => acquire(w, opts.guest, |l| {
                        tracing::info!(lease = %l, wait_ms = w.timing.taker_wait(w.timing.lease).as_millis(), "this node owned the guest before; waiting out its lease to take the next generation");
                    })?,
                };
                tracing::info!(lease = %lease.lease, "lease taken");
                Some(Renewal::start(w, holder, lease)?)
            }
            None => None,
        };
        let handover = Arc::new(AtomicBool::new(false));
        let owner = Ownership { guest: opts.guest, lease, hooks: Hooks::start(opts.hooks.clone()), handover: Arc::clone(&handover) };
        if let Some(w) = &opts.witness {
            owner.notify("lease-taken", serde_json::json!({ "node": w.node }));
        }
        let output = Arc::new(OutputBuffer::default());
        let (guest, net): (Box<dyn ProtectedGuest>, _) = match &opts.guest_kind {
            GuestKind::Arena(a) => {
                (Box::new(ArenaGuest::start(a, Arc::clone(&output)).map_err(|cause| NodeError::GuestStart { kind: "arena", cause })?), None)
            }
            GuestKind::Qemu(q) | GuestKind::ResumedQemu(q) => {
                let egress = Egress::Held(Arc::clone(&output));
                let g = if matches!(opts.guest_kind, GuestKind::ResumedQemu(_)) {
                    QemuGuest::resume(q, egress)
                } else {
                    QemuGuest::start(q, egress)
                }
                .map_err(|cause| NodeError::GuestStart { kind: "QEMU", cause })?;
                let net = g.net();
                (Box::new(g), Some(net))
            }
        };
        // Only for a guest new to every backup (one that failed over or
        // moved continues its history elsewhere: a backup or the S3 tier
        // could bring it back from before output released now).
        let release_first_copy =
            opts.release_first_copy && opts.continues.is_none() && !matches!(opts.guest_kind, GuestKind::ResumedQemu(_));
        let exact_tracking = guest.exact_tracking();
        let page_count = guest.page_count();
        let stats =
            Arc::new(Mutex::new(PrimaryStats { generation: owner.lease.as_ref().map(Renewal::generation), ..PrimaryStats::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(256);
        let (etx, erx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
        let releaser = Arc::new(Releaser::new(opts.release, 1 + opts.far.len(), ack_tx));
        stats.lock().far = opts.far.iter().map(|a| FarStats { addr: Some(*a), ..FarStats::default() }).collect();
        // The first Welcome says where the guest's history stands: a
        // restarted primary continues it.
        let (base_tx, base_rx) = crossbeam_channel::bounded(1);
        // With far backups every link is sent the same pages: their ids
        // are taken once, and each page sent whole compressed about once
        // (the near link first to last, far ones backwards).
        let fan_out = !opts.far.is_empty();
        // Page buffers go round: the engine copies into one, the link
        // holding it hands it back once its epoch is acknowledged (with far
        // backups, one link holds the engine's buffer and the others
        // copies, which the pool lets go first: they are the smallest).
        let pool = PagePool::default();
        let link_cfg = PrimaryLinkConfig {
            backup: opts.backup,
            client,
            sender: opts.sender,
            tuning: opts.link,
            guest: opts.guest,
            instance: rand::random(),
            generation: owner.lease.as_ref().map_or(0, Renewal::generation),
            page_count,
            handover: Arc::clone(&handover),
            continues: opts.continues,
            start_after: None,
            page_pool: Some(pool.clone()),
            shared_frames: fan_out.then(|| (SharedFrames::default(), false)),
        };
        let (far, release, far_retained) = (opts.far.clone(), opts.release, opts.far_retained_bytes);
        let create = |p: &Option<PathBuf>| -> Result<Option<std::fs::File>> {
            p.as_ref().map(|p| std::fs::File::create(p).map_err(NodeError::io(format!("creating {}", p.display())))).transpose()
        };
        let roots_file = create(&opts.record_roots)?;
        let sinks = OutputSinks { net, log: create(&opts.output_log)? };
        let s2 = Arc::clone(&stats);
        let link = std::thread::Builder::new()
            .name("remus-link".into())
            .spawn(move || -> Result<()> {
                // Two workers: while one encodes a large epoch (the first holds the
                // whole guest), the other keeps reading the backup's heartbeats,
                // so a busy primary does not mistake itself for a silent backup.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(NodeError::io("starting the link's runtime"))?;
                rt.block_on(async move {
                    if far.is_empty() {
                        let consumer = tokio::spawn(consume_events(erx, s2, releaser, base_tx, None, roots_file));
                        let r = run_primary(link_cfg, rx, etx).await;
                        let _ = consumer.await;
                        return Ok(r?);
                    }
                    let (far_base_tx, far_base_rx) = tokio::sync::oneshot::channel();
                    let consumer =
                        tokio::spawn(consume_events(erx, Arc::clone(&s2), Arc::clone(&releaser), base_tx, Some(far_base_tx), roots_file));
                    let fan = FanOut { near: link_cfg, far, release, far_retained, stats: s2, releaser };
                    let r = fan.run(rx, etx, far_base_rx).await;
                    let _ = consumer.await;
                    r
                })
            })
            .map_err(NodeError::io("spawning the link thread"))?;
        let s3 = Arc::clone(&stats);
        let stop2 = Arc::clone(&stop);
        let cadence = opts.cadence;
        let id = opts.guest;
        let engine = std::thread::Builder::new()
            .name("remus-epoch".into())
            .spawn(move || {
                // Real-time priority where allowed, so a pause is not stretched
                // by preemption; elsewhere epochs run at normal priority.
                if !remus_sys::raise_priority() {
                    tracing::debug!("real-time priority not available; epochs run at normal priority");
                }
                let Some(committed) = wait_for_welcome(&base_rx, &stop2) else { return Ok(()) };
                if committed > EpochId(0) {
                    tracing::info!(committed = committed.0, "continuing the guest's history after the committed epoch");
                    owner.notify("history-continued", serde_json::json!({ "after": committed.0 }));
                }
                {
                    let mut s = s3.lock();
                    s.started = Instant::now();
                    (s.continued_from, s.sealed, s.acked) = (committed, committed, committed);
                }
                let mut engine = EpochEngine::new(id, guest, output, cadence.base, Instant::now())
                    .with_cadence(cadence)
                    .with_page_pool(pool)
                    .after(committed);
                if release_first_copy && committed == EpochId(0) {
                    engine = engine.releasing_ahead();
                }
                drive_engine(engine, (tx, fan_out), &ack_rx, sinks, &s3, &stop2, &owner)
            })
            .map_err(NodeError::io("spawning the epoch thread"))?;
        Ok(Self { stop, handover, engine: Some(engine), link: Some(link), stats, exact_tracking })
    }

    /// Stops sealing epochs; the link keeps going until every sealed epoch
    /// is acknowledged.
    pub fn stop_sealing(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// True once the engine stopped (by request or failure).
    pub fn engine_finished(&self) -> bool {
        self.engine.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// A planned move: seals one last epoch with the guest held still,
    /// waits (at most `drain`) until the backup has it, and hands the
    /// guest over; the backup takes it over from that epoch at once.
    /// Returns that epoch and how long the guest was held still before
    /// the backup said it had taken over.
    ///
    /// # Errors
    /// As [`finish`](Self::finish); [`NodeError::Link`] when the backup
    /// refuses to take the guest over (the guest stays held, its output
    /// since the last acknowledged epoch unreleased).
    pub fn hand_over(self, drain: Duration) -> Result<(EpochId, Duration)> {
        self.handover.store(true, Ordering::Relaxed);
        let stats = Arc::clone(&self.stats);
        self.finish(drain)?;
        let s = stats.lock();
        let epoch = s.handed_over.ok_or(NodeError::LinkStopped)?;
        let held = s.last_seal_started.map_or(Duration::ZERO, |t| s.handed_over_at.unwrap_or_else(Instant::now).duration_since(t));
        Ok((epoch, held))
    }

    /// Stops sealing and waits, at most `drain`, until every sealed epoch
    /// is acknowledged.
    ///
    /// # Errors
    /// The engine's or the link's failure, or the backup not acknowledging
    /// in time: those epochs' output is then never released.
    pub fn finish(mut self, drain: Duration) -> Result<()> {
        self.stop_sealing();
        let deadline = Instant::now() + drain;
        // The engine's result, joined as soon as it ends.
        let mut engine: Option<Result<()>> = None;
        loop {
            if let Some(t) = self.engine.take_if(|t| t.is_finished()) {
                match t.join().map_err(|_| NodeError::Panicked("epoch")).and_then(|r| r) {
                    // Taken over: nothing it sealed may be acknowledged now.
                    Err(e @ NodeError::Superseded { .. }) => return Err(e),
                    r => engine = Some(r),
                }
            }
            if engine.is_some() && self.link.as_ref().is_none_or(JoinHandle::is_finished) {
                break;
            }
            if Instant::now() >= deadline {
                let s = self.stats.lock();
                return Err(NodeError::Unacknowledged { first: s.acked.next(), last: s.sealed, released_ahead: s.released_ahead, drain });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let engine = engine.expect("joined above");
        let link = self.link.take().expect("joined once").join().map_err(|_| NodeError::Panicked("link"))?;
        // The link's failure is the cause when both failed (the engine stops
        // because the link did).
        link.and(engine)
    }
}

/// The engine's driver loop: seals on the engine's timer, hands each
/// checkpoint to the link, and feeds acknowledgements in as they arrive,
/// delivering what the engine releases. After the last epoch is sealed it
/// waits for the acknowledgements alone; it ends when the engine is
/// finished or the link is gone.
///
/// With a lease, output is released only while the lease stands
/// ([`Standing::Owner`]): an acknowledgement counts as the backup's
/// confirmation of the epoch's seal time; while neither it nor the
/// witness confirmed the owner recently enough the guest is held still and
/// acknowledgements wait (self-fencing); taken over, it stops.
fn drive_engine<G: ProtectedGuest>(
    mut engine: EpochEngine<G>,
    (tx, hash_once): (mpsc::Sender<Checkpoint>, bool),
    acks: &Receiver<EpochId>,
    mut sinks: OutputSinks,
    stats: &Mutex<PrimaryStats>,
    stop: &AtomicBool,
    owner: &Ownership,
) -> Result<()> {
    let mut tx = Some(tx);
    // The newest acknowledgement not yet fed in (held while self-fenced).
    let mut pending: Option<EpochId> = None;
    let mut fenced: Option<Instant> = None;
    while !engine.finished() {
        if stop.load(Ordering::Relaxed) {
            engine.stop();
        }
        let input = match engine.poll_timeout() {
            Some(due) => acks.recv_deadline(due),
            None => acks.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match input {
            Ok(epoch) => {
                if let (Some(l), Some(sealed)) = (&owner.lease, stats.lock().sealed_at.get(&epoch)) {
                    l.backup_heard(*sealed);
                }
                pending = pending.max(Some(epoch));
            }
            Err(RecvTimeoutError::Timeout) => {
                let rtt = stats.lock().path_rtt;
                engine.set_path_rtt(rtt);
                let started = Instant::now();
                let Some(mut cp) = engine.handle_timeout(started, now_unix_nanos()).map_err(NodeError::Checkpoint)? else { continue };
                record_seal(stats, &cp, engine.period(), started);
                if hash_once {
                    // Several links (near and far backups): the pages' ids
                    // taken here once rather than by each.
                    cp.hashes = cp.page_ids();
                }
                {
                    let mut s = stats.lock();
                    s.throttled_epochs = engine.throttled_epochs();
                    s.guest_cpu = engine.guest().cpu_time();
                }
                let Some(link) = &tx else { continue };
                if link.blocking_send(cp).is_err() {
                    return Err(NodeError::LinkStopped);
                }
                if engine.all_sealed() {
                    // No more checkpoints: the link ends once all are acknowledged.
                    tx = None;
                }
            }
            Err(RecvTimeoutError::Disconnected) if engine.all_sealed() => {
                // The link ended (its failure is reported by the link thread).
                return Ok(());
            }
            Err(RecvTimeoutError::Disconnected) => return Err(NodeError::LinkStopped),
        }
        match owner.standing() {
            None | Some(Standing::Owner) => {
                if let Some(since) = fenced.take() {
                    engine.set_fenced(false);
                    stats.lock().self_fenced_ns += u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    tracing::warn!(held_ms = since.elapsed().as_millis(), "lease confirmed again: the guest runs and output flows");
                    owner.notify("self-fence-ended", serde_json::json!({ "held_ms": since.elapsed().as_millis() as u64 }));
                }
                // A first copy's epochs, released at their seals.
                let ahead = engine.take_released_ahead();
                if !ahead.is_empty() {
                    stats.lock().output_released += ahead.len() as u64;
                    sinks.deliver(&ahead);
                }
                if let Some(epoch) = pending.take() {
                    let released = engine.handle_ack(epoch, Instant::now());
                    record_ack(stats, engine.acked(), released.len());
                    sinks.deliver(&released);
                }
            }
            Some(Standing::SelfFenced { .. }) => {
                if fenced.is_none() {
                    fenced = Some(Instant::now());
                    engine.set_fenced(true);
                    stats.lock().self_fences += 1;
                    tracing::error!(
                        acked = engine.acked().0,
                        "self-fenced: neither the witness nor the backup confirmed this primary within the lease; the guest is held still and its output held"
                    );
                    owner.notify("self-fence", serde_json::json!({ "acked": engine.acked().0 }));
                }
            }
            Some(Standing::Superseded(lease)) => {
                engine.set_fenced(true);
                owner.notify(
                    "superseded",
                    serde_json::json!({ "by": lease.owner, "new_generation": lease.generation, "acked": engine.acked().0 }),
                );
                return Err(NodeError::Superseded { lease, acked: engine.acked() });
            }
        }
    }
    // Handed over: the guest is held still for good and everything it
    // emitted is released; the next owner need not wait the lease out.
    if let Some(l) = owner.lease.as_ref().filter(|_| owner.handover.load(Ordering::Relaxed)) {
        l.release();
    }
    Ok(())
}

/// Waits for the link's first Welcome and returns the epoch the backup
/// has committed (0 for a new guest); `None` when stopped first or the
/// link ended (its failure is reported by the link thread).
fn wait_for_welcome(base: &Receiver<EpochId>, stop: &AtomicBool) -> Option<EpochId> {
    loop {
        match base.recv_timeout(Duration::from_millis(100)) {
            Ok(committed) => return Some(committed),
            Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => {}
            Err(_) => return None,
        }
    }
}

fn record_seal(stats: &Mutex<PrimaryStats>, cp: &Checkpoint, next_period: Duration, started: Instant) {
    let sealed_at = Instant::now();
    let mut s = stats.lock();
    s.last_seal_started = Some(started);
    s.periods_ns.push(u64::try_from(next_period.as_nanos()).unwrap_or(u64::MAX));
    s.pauses_ns.push(cp.pause_ns);
    s.dirty_pages += cp.pfns.len() as u64;
    s.sealed = cp.epoch;
    s.sealed_at.insert(cp.epoch, sealed_at);
    s.last_seal = Some(sealed_at);
    if cp.released_ahead {
        s.released_ahead = cp.epoch;
    }
}

fn record_ack(stats: &Mutex<PrimaryStats>, acked: EpochId, released: usize) {
    let now = Instant::now();
    let mut s = stats.lock();
    for e in s.acked.0 + 1..=acked.0 {
        if let Some(t) = s.sealed_at.remove(&EpochId(e)) {
            let held = now.duration_since(t);
            tracing::debug!(epoch = e, held_ms = held.as_secs_f64() * 1e3, "epoch acknowledged");
            let ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
            s.commit_ns.push(ns);
            if s.protected_at.is_some_and(|p| t >= p) {
                s.protected_commit_ns.push(ns);
            }
            // Released at its seal: its output waited for nothing.
            let output = if EpochId(e) <= s.released_ahead { 0 } else { ns };
            s.output_ns.push(output);
        }
    }
    s.acked = s.acked.max(acked);
    s.output_released += released as u64;
}

/// Takes the link's events: statistics, recorded roots, and every
/// acknowledgement forwarded to the engine's driver (which releases).
async fn consume_events(
    mut rx: mpsc::UnboundedReceiver<LinkEvent>,
    stats: Arc<Mutex<PrimaryStats>>,
    releaser: Arc<Releaser>,
    base: Sender<EpochId>,
    mut far_base: Option<tokio::sync::oneshot::Sender<(EpochId, ChunkId)>>,
    mut roots: Option<std::fs::File>,
) {
    let mut base = Some(base);
    while let Some(ev) = rx.recv().await {
        match ev {
            LinkEvent::Sealed { epoch, root } => {
                stats.lock().roots.insert(epoch, root);
                if let Some(f) = roots.as_mut() {
                    let _ = writeln!(f, "{{\"epoch\":{},\"root\":\"{}\"}}", epoch.0, root.to_hex());
                }
            }
            LinkEvent::Parity { sent, dropped, .. } => {
                let mut s = stats.lock();
                s.parity_bytes += sent;
                s.parity_dropped_bytes += dropped;
            }
            LinkEvent::Sent { epoch, wire_bytes, pages, mix, resent } => {
                let mut s = stats.lock();
                if let Some(t) = s.sealed_at.get(&epoch) {
                    tracing::debug!(epoch = epoch.0, ms = t.elapsed().as_secs_f64() * 1e3, wire_bytes, "epoch encoded");
                }
                if resent {
                    s.resent_bytes += wire_bytes;
                    s.resent_epochs += 1;
                }
                s.wire_bytes += wire_bytes;
                s.wire_pages += pages;
                s.mix.merge(&mix);
            }
            LinkEvent::Acked { epoch, rtt, .. } => {
                let mut s = stats.lock();
                s.path_rtt = rtt;
                // An epoch this run sealed (not the one a backup's welcome
                // says it holds; the first one holds the whole memory) and
                // whose output was held: every epoch released ahead is
                // older (a backup fails the guest over from here on).
                if s.protected_at.is_none() && s.sealed_at.contains_key(&epoch) && epoch > s.released_ahead {
                    let now = Instant::now();
                    s.protected_at = Some(now);
                    let after_ms = now.duration_since(s.started).as_millis();
                    tracing::info!(
                        epoch = epoch.0,
                        after_ms,
                        "protected: the backup committed this run's first copy and an epoch whose output was held"
                    );
                }
                drop(s);
                releaser.acked(0, epoch);
            }
            LinkEvent::HandedOver { epoch } => {
                let mut s = stats.lock();
                (s.handed_over, s.handed_over_at) = (Some(epoch), Some(Instant::now()));
            }
            LinkEvent::Connected { committed, manifest, holds } => {
                tracing::info!(committed = committed.0, "connected to backup");
                if holds > 0 {
                    tracing::info!(chunks = holds, "the backup holds these of the guest's pages already: they go by reference");
                }
                if let Some(b) = base.take() {
                    let _ = b.send(committed);
                }
                if let Some(b) = far_base.take() {
                    let _ = b.send((committed, manifest));
                }
            }
            LinkEvent::Forgot { held } => stats.lock().chunks_forgotten += held as u64,
            LinkEvent::Resending { from, missing } => {
                stats.lock().refusals += 1;
                tracing::info!(epoch = from.0, missing, "the backup no longer holds chunks an epoch named; sending again in full");
            }
            LinkEvent::Disconnected(why) => {
                stats.lock().disconnects += 1;
                tracing::warn!(%why, "backup link lost; retrying");
            }
        }
    }
    if let Some(f) = roots.as_mut() {
        let _ = f.flush();
    }
}

/// The links of a primary with far backups: the near one (its events
/// taken by [`consume_events`]), the far ones, started once the near
/// backup said where the guest's history stands, and the fan-out between
/// the engine and them.
struct FanOut {
    near: PrimaryLinkConfig,
    far: Vec<SocketAddr>,
    release: Release,
    far_retained: usize,
    stats: Arc<Mutex<PrimaryStats>>,
    releaser: Arc<Releaser>,
}

/// How long, once the near link is done, far backups that do not pace
/// the guest are given to acknowledge the rest before the primary stops
/// without them (they keep what they committed).
const FAR_DRAIN: Duration = Duration::from_secs(10);

impl FanOut {
    async fn run(
        self,
        checkpoints: mpsc::Receiver<Checkpoint>,
        events: mpsc::UnboundedSender<LinkEvent>,
        base: tokio::sync::oneshot::Receiver<(EpochId, ChunkId)>,
    ) -> Result<()> {
        let Self { near, far, release, far_retained, stats, releaser } = self;
        let (near_tx, near_rx) = mpsc::channel(16);
        let near_link = tokio::spawn(run_primary(near.clone(), near_rx, events));
        // Nothing is sealed before the near backup's Welcome.
        let Ok((committed, manifest)) = base.await else { return Ok(near_link.await.map_err(|_| NodeError::Panicked("link"))??) };
        let mut feeds = Feeds { paced: vec![near_tx], merging: Vec::new() };
        let mut paced = Vec::new();
        let mut unpaced = Vec::new();
        for (k, addr) in far.iter().enumerate() {
            let paces = release.paces(k + 1);
            let mut sender = near.sender;
            if !paces {
                sender.max_retained_bytes = sender.max_retained_bytes.min(far_retained);
            }
            let cfg = PrimaryLinkConfig {
                backup: *addr,
                sender,
                start_after: Some(committed),
                // A far backup holding less of the guest's history than the
                // near one (it fell behind before this primary started, or
                // holds none) continues it from the near one's head: the
                // first epoch carries the whole memory, by reference where
                // it still holds the content.
                continues: Some((committed, manifest)).filter(|(e, _)| *e > EpochId(0)),
                handover: Arc::default(),
                shared_frames: near.shared_frames.as_ref().map(|(f, _)| (f.clone(), true)),
                ..near.clone()
            };
            let (etx, erx) = mpsc::unbounded_channel();
            tokio::spawn(consume_far_events(k + 1, erx, Arc::clone(&stats), Arc::clone(&releaser)));
            if paces {
                let (tx, rx) = mpsc::channel(16);
                feeds.paced.push(tx);
                paced.push((*addr, tokio::spawn(run_primary(cfg, rx, etx))));
            } else {
                let (tx, rx) = mpsc::channel(FAR_QUEUE);
                let (feed_tx, feed_rx) = mpsc::unbounded_channel();
                feeds.merging.push(feed_tx);
                tokio::spawn(merging_feed(feed_rx, tx, Arc::clone(&stats.lock().far[k].merged)));
                unpaced.push((*addr, tokio::spawn(run_primary(cfg, rx, etx))));
            }
        }
        tokio::spawn(fan_out(checkpoints, feeds));
        let near_result = near_link.await.map_err(|_| NodeError::Panicked("link"))?;
        let mut result: Result<()> = near_result.map_err(NodeError::from);
        for (addr, link) in paced {
            let r = link.await.map_err(|_| NodeError::Panicked("link"))?;
            if let Err(e) = r {
                tracing::error!(backup = %addr, error = %e, "a backup whose acknowledgements release output failed");
                result = result.and(Err(e.into()));
            }
        }
        let deadline = tokio::time::Instant::now() + FAR_DRAIN;
        for (addr, link) in unpaced {
            match tokio::time::timeout_at(deadline, link).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(backup = %addr, error = %e, "far backup link ended"),
                Ok(Err(_)) => return Err(NodeError::Panicked("link")),
                Err(_) => {
                    tracing::warn!(backup = %addr, "far backup has not acknowledged every epoch; stopping without it (it keeps what it committed)")
                }
            }
        }
        result
    }
}

/// Takes a far backup's link events: its statistics, and its
/// acknowledgements for the release rule.
async fn consume_far_events(
    i: usize,
    mut rx: mpsc::UnboundedReceiver<LinkEvent>,
    stats: Arc<Mutex<PrimaryStats>>,
    releaser: Arc<Releaser>,
) {
    while let Some(ev) = rx.recv().await {
        let mut s = stats.lock();
        let far = &mut s.far[i - 1];
        let addr = far.addr;
        match ev {
            LinkEvent::Sent { wire_bytes, resent, .. } => {
                far.wire_bytes += wire_bytes;
                if resent {
                    far.resent_bytes += wire_bytes;
                }
            }
            LinkEvent::Acked { epoch, .. } => {
                far.acked = far.acked.max(epoch);
                drop(s);
                releaser.acked(i, epoch);
            }
            LinkEvent::Connected { committed, holds, .. } => {
                far.connected = true;
                tracing::info!(backup = ?addr, committed = committed.0, holds, "connected to far backup");
            }
            LinkEvent::Disconnected(why) => {
                far.connected = false;
                far.disconnects += 1;
                tracing::warn!(backup = ?addr, %why, "far backup link lost; retrying");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_capture::{CaptureError, DeviceState, DirtyLog, DiskTap, MemoryView, Pause};
    use remus_types::PAGE_SIZE;

    #[test]
    fn latency_once_protected_counts_only_epochs_sealed_after_the_first_copy_was_committed() {
        let stats = Mutex::new(PrimaryStats::default());
        let t0 = Instant::now();
        {
            let mut s = stats.lock();
            // Epochs 1 (the first copy) and 2 sealed before it was committed,
            // 3 and 4 after.
            for (e, at) in [(1, 0), (2, 10), (3, 60), (4, 70)] {
                s.sealed_at.insert(EpochId(e), t0 + Duration::from_millis(at));
            }
            s.protected_at = Some(t0 + Duration::from_millis(50));
        }
        record_ack(&stats, EpochId(4), 0);
        let s = stats.lock();
        assert_eq!(s.commit_ns.len(), 4);
        assert_eq!(s.protected_commit_ns.len(), 2);
        assert_eq!(&s.protected_commit_ns[..], &s.commit_ns[2..], "epochs 3 and 4");
    }

    /// A guest that emits one line per epoch, just before each pause.
    struct LineGuest {
        output: Arc<OutputBuffer<Vec<u8>>>,
        /// The epoch it runs in, by its own count.
        epoch: EpochId,
        quiesced: bool,
    }

    impl Pause for LineGuest {
        fn pause(&mut self) -> Result<(), CaptureError> {
            if !self.quiesced {
                self.output.push(format!("line of epoch {}\n", self.epoch.0).into_bytes());
            }
            Ok(())
        }

        fn resume(&mut self) -> Result<(), CaptureError> {
            self.epoch = self.epoch.next();
            Ok(())
        }

        fn hold(&mut self, _held: bool) {}

        fn quiesce(&mut self) {
            self.quiesced = true;
        }
    }

    impl DirtyLog for LineGuest {
        fn exact_tracking(&self) -> bool {
            true
        }

        fn collect_paused(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
            pfns.push(0);
            Ok(())
        }
    }

    impl MemoryView for LineGuest {
        fn page_count(&self) -> u64 {
            1
        }

        fn copy_pages(&self, pfns: &[u64], out: &mut Vec<u8>) {
            out.resize(out.len() + pfns.len() * PAGE_SIZE, 0);
        }
    }

    impl DiskTap for LineGuest {}

    impl DeviceState for LineGuest {
        fn take_device_state(&mut self, _cp: &mut Checkpoint) -> Result<(), CaptureError> {
            Ok(())
        }
    }

    /// Runs the driver with a link that acknowledges what `ack` allows,
    /// then stops; returns the released log and the driver's result.
    fn run(ack: impl Fn(EpochId) -> bool + Send + 'static, stop_after: u64) -> (String, Result<()>, EpochId) {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("released");
        let output = Arc::new(OutputBuffer::default());
        let guest = LineGuest { output: Arc::clone(&output), epoch: EpochId(1), quiesced: false };
        let engine = EpochEngine::new(GuestId(1), guest, output, Duration::from_millis(2), Instant::now());
        let (tx, mut rx) = mpsc::channel::<Checkpoint>(4);
        let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
        let stats = Mutex::new(PrimaryStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        // The link: acknowledges each checkpoint it may, in order, two
        // epochs behind (as over a long round trip: the engine has sealed
        // more by the time an ack arrives), and asks the engine to stop
        // after `stop_after` epochs.
        let link = std::thread::spawn(move || {
            let mut in_flight = std::collections::VecDeque::new();
            let send = |e: EpochId| !ack(e) || ack_tx.send(e).is_ok();
            while let Some(cp) = rx.blocking_recv() {
                if cp.epoch.0 >= stop_after {
                    stop2.store(true, Ordering::Relaxed);
                }
                in_flight.push_back(cp.epoch);
                while in_flight.len() > 2 {
                    if !send(in_flight.pop_front().expect("non-empty")) {
                        return;
                    }
                }
            }
            in_flight.into_iter().all(send);
        });
        let sinks = OutputSinks { net: None, log: Some(std::fs::File::create(&log_path).unwrap()) };
        let owner = Ownership { guest: GuestId(1), lease: None, hooks: Hooks::start(HookConfig::default()), handover: Arc::default() };
        let result = drive_engine(engine, (tx, false), &ack_rx, sinks, &stats, &stop, &owner);
        link.join().unwrap();
        let sealed = stats.lock().sealed;
        (std::fs::read_to_string(&log_path).unwrap(), result, sealed)
    }

    #[test]
    fn the_driver_releases_each_line_once_after_its_epochs_ack() {
        let (log, result, sealed) = run(|_| true, 6);
        result.unwrap();
        assert!(sealed.0 >= 7, "the stop comes after epoch 6");
        // The last epoch is sealed with the guest held still: no line.
        let want: String = (1..sealed.0).map(|e| format!("line of epoch {e}\n")).collect();
        assert_eq!(log, want, "every line, once, in order");
    }

    #[test]
    fn nothing_past_the_last_acknowledged_epoch_is_released() {
        // The backup acknowledges up to epoch 3 and then nothing; the link
        // goes away with epochs 4.. sealed but never acknowledged. The
        // driver ends with it (the link reports its own failure).
        let (log, result, _) = run(|e| e.0 <= 3, 6);
        result.unwrap();
        let want: String = (1..=3).map(|e| format!("line of epoch {e}\n")).collect();
        assert_eq!(log, want);
    }
}

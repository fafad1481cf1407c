//! The witness at run time: taking a guest's lease, keeping it renewed,
//! and winning it over for a takeover, around the sans-IO
//! [`LeaseHolder`] and [`Claimant`] of `remus-witness`.
//!
//! Invariants owned here: a primary starts only as the lease's owner (a
//! guest that failed over elsewhere is refused, naming who owns it since
//! when); a restarted primary takes the next generation only after waiting
//! out the lease of the one before; a backup fails a guest over only after
//! winning the lease for the next generation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use remus_types::{EpochId, GuestId};
use remus_witness::{Claimant, Lease, LeaseHolder, LeaseStore, Standing, Tagged, Takeover, Timing, WitnessError};

use crate::error::NodeError;

/// Where the witness is and who this node is to it.
#[derive(Clone)]
pub struct WitnessOptions {
    /// The leases.
    pub leases: Arc<dyn LeaseStore>,
    /// This node's name in a lease (an operator reads it: a site or host).
    pub node: String,
    /// Lease timing.
    pub timing: Timing,
}

impl std::fmt::Debug for WitnessOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessOptions").field("node", &self.node).field("timing", &self.timing).finish_non_exhaustive()
    }
}

impl WitnessOptions {
    fn lease_ms(&self) -> u64 {
        u64::try_from(self.timing.lease.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Takes `guest`'s lease for a primary starting on this node: the first
/// generation when there is none; the next one when this node owned the
/// last (a restart), once that lease has run out unchanged. Calls
/// `waiting` once with the lease it waits out.
///
/// # Errors
/// [`NodeError::Owned`] when another node owns the guest (it failed over
/// there); [`NodeError::Witness`] when the witness cannot be read or
/// written.
pub fn acquire(w: &WitnessOptions, guest: GuestId, mut waiting: impl FnMut(&Lease)) -> Result<(LeaseHolder, Tagged), NodeError> {
    let mut claimant = Claimant::new(w.timing, Instant::now());
    let mut seen: Option<String> = None;
    let mut renewals = 0;
    loop {
        match claimant.poll(Instant::now()) {
            Takeover::Read => match w.leases.read(guest).map_err(NodeError::Witness)? {
                // Nobody ever owned the guest: take the first generation
                // (or, created meanwhile, read it again).
                None => {
                    if let Some(won) = take(w, guest, None, 1, None, &mut claimant)? {
                        return Ok(won);
                    }
                }
                Some(t) if t.lease.owner != w.node => return Err(NodeError::Owned(Box::new(t.lease))),
                Some(t) => {
                    match &seen {
                        None => waiting(&t.lease),
                        Some(tag) if *tag != t.tag => renewals += 1,
                        Some(_) => {}
                    }
                    if renewals >= 3 {
                        // Renewed again and again while this one waits: its
                        // owner runs.
                        return Err(NodeError::Running(Box::new(t.lease)));
                    }
                    seen = Some(t.tag.clone());
                    claimant.observe(Instant::now(), Some(&t));
                }
            },
            Takeover::Wait(until) => std::thread::sleep(until.saturating_duration_since(Instant::now())),
            Takeover::Attempt { expected, generation, .. } => {
                if let Some(won) = take(w, guest, expected.as_deref(), generation, None, &mut claimant)? {
                    return Ok(won);
                }
            }
        }
    }
}

/// Takes over, for a primary starting on this node, a lease another
/// process of this node handed off ([`Renewal::hand_off`]): generation
/// `generation` at version `tag`, renewed at once. `None` when the lease
/// is not that one any more (then [`acquire`] decides).
///
/// # Errors
/// [`NodeError::Witness`] when the witness cannot be read or written.
pub fn adopt(w: &WitnessOptions, guest: GuestId, generation: u64, tag: &str) -> Result<Option<(LeaseHolder, Tagged)>, NodeError> {
    let Some(current) = w.leases.read(guest).map_err(NodeError::Witness)? else { return Ok(None) };
    if current.tag != tag || current.lease.generation != generation || current.lease.owner != w.node {
        return Ok(None);
    }
    let sent_at = Instant::now();
    match w.leases.replace(&current.lease.renewed(), tag) {
        Ok(t) => Ok(Some((LeaseHolder::new(w.timing, generation, sent_at), t))),
        Err(WitnessError::Lost(_)) => Ok(None),
        Err(e) => Err(NodeError::Witness(e)),
    }
}

/// Swaps in generation `generation` owned by this node if the lease is
/// still `expected` (`None`: still absent). `Ok(None)` when it changed.
fn take(
    w: &WitnessOptions,
    guest: GuestId,
    expected: Option<&str>,
    generation: u64,
    from_epoch: Option<EpochId>,
    claimant: &mut Claimant,
) -> Result<Option<(LeaseHolder, Tagged)>, NodeError> {
    let lease = Lease::new(guest, generation, &w.node, w.lease_ms(), from_epoch.map(|e| e.0));
    let sent_at = Instant::now();
    let r = match expected {
        Some(tag) => w.leases.replace(&lease, tag),
        None => w.leases.create(&lease),
    };
    match r {
        Ok(t) => Ok(Some((LeaseHolder::new(w.timing, generation, sent_at), t))),
        Err(WitnessError::Lost(_)) => {
            claimant.on_lost();
            Ok(None)
        }
        Err(e) => Err(NodeError::Witness(e)),
    }
}

/// A lease won by a takeover.
pub struct Won {
    /// The owner's side of it.
    pub holder: LeaseHolder,
    /// The lease as written.
    pub lease: Tagged,
    /// The lease replaced was released by its owner (a planned move), so
    /// it was taken without waiting a lease period out.
    pub released: bool,
}

/// Waits, as a backup whose primary went silent (last heard at
/// `last_heard`), until the lease may be taken, and takes it for the next
/// generation starting from `committed`. `watched` is a [`LeaseWatch`]'s
/// view from before: the wait for an unchanged lease counts from when it
/// first read the current version. `heard` is polled for newer signs of
/// the owner; `cancel` ends the wait. `None`: the owner was heard again
/// (or the backup is stopping), so there is no takeover.
///
/// # Errors
/// [`NodeError::Witness`] for a witness that answers with an error other
/// than unreachable (an unreachable witness is retried: a takeover needs
/// it).
pub fn claim(
    w: &WitnessOptions,
    (guest, committed): (GuestId, EpochId),
    (last_heard, watched): (Instant, Option<Claimant>),
    heard: impl Fn() -> Option<Instant>,
    cancel: &AtomicBool,
) -> Result<Option<Won>, NodeError> {
    let mut claimant = watched.unwrap_or_else(|| Claimant::new(w.timing, last_heard));
    claimant.on_owner_heard(last_heard);
    loop {
        if cancel.load(Ordering::Relaxed) || heard().is_some_and(|h| h > last_heard) {
            return Ok(None);
        }
        let now = Instant::now();
        match claimant.poll(now) {
            Takeover::Read => match w.leases.read(guest) {
                Ok(current) => claimant.observe(Instant::now(), current.as_ref()),
                Err(WitnessError::Unreachable(e)) => {
                    tracing::warn!(%guest, error = %e, "the witness is unreachable; no takeover without it");
                    std::thread::sleep(w.timing.retry_every());
                }
                Err(e) => return Err(NodeError::Witness(e)),
            },
            Takeover::Wait(until) => std::thread::sleep(until.saturating_duration_since(now).min(w.timing.retry_every())),
            Takeover::Attempt { expected, generation, released } => {
                match take(w, guest, expected.as_deref(), generation, Some(committed), &mut claimant) {
                    Ok(Some((holder, lease))) => return Ok(Some(Won { holder, lease, released })),
                    Ok(None) => {}
                    Err(NodeError::Witness(WitnessError::Unreachable(e))) => {
                        tracing::warn!(%guest, error = %e, "the witness is unreachable; no takeover without it");
                        claimant.on_lost();
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// A backup's running view of a guest's lease while its primary is alive
/// (a read every [`Timing::read_every`], each fed to a [`Claimant`]), so
/// that a takeover counts the lease unchanged from when this backup first
/// read its current version, not from when the primary was declared lost:
/// failover then takes about one lease period after the primary's death
/// instead of the liveness timeout plus one.
pub struct LeaseWatch {
    claimant: Arc<Mutex<Claimant>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LeaseWatch {
    /// Watches `guest`'s lease until dropped.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(w: &WitnessOptions, guest: GuestId) -> Result<Self, NodeError> {
        let claimant = Arc::new(Mutex::new(Claimant::new(w.timing, Instant::now())));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, stop2, leases, every) = (Arc::clone(&claimant), Arc::clone(&stop), Arc::clone(&w.leases), w.timing.read_every());
        let thread = std::thread::Builder::new()
            .name("remus-lease-watch".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    if let Ok(lease) = leases.read(guest) {
                        c2.lock().observe(Instant::now(), lease.as_ref());
                    }
                    std::thread::sleep(every);
                }
            })
            .map_err(NodeError::io("spawning the lease watch thread"))?;
        Ok(Self { claimant, stop, thread: Some(thread) })
    }

    /// What it has seen, as a taker that has watched since it started.
    #[must_use]
    pub fn claimant(&self) -> Claimant {
        self.claimant.lock().clone()
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An owned lease kept renewed by a thread of its own; the engine's
/// driver asks it whether it may run and release output.
pub struct Renewal {
    holder: Arc<Mutex<LeaseHolder>>,
    stop: Arc<AtomicBool>,
    /// Set: the thread releases the lease (once) and stops renewing.
    release: Arc<AtomicBool>,
    /// The renewal thread; it returns the lease as last written (none once
    /// superseded).
    thread: Option<JoinHandle<Option<Tagged>>>,
}

impl Renewal {
    /// Renews `lease` (owned through `holder`) until dropped.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(w: &WitnessOptions, holder: LeaseHolder, lease: Tagged) -> Result<Self, NodeError> {
        let holder = Arc::new(Mutex::new(holder));
        let (stop, release) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (h2, s2, r2, leases) = (Arc::clone(&holder), Arc::clone(&stop), Arc::clone(&release), Arc::clone(&w.leases));
        let thread = std::thread::Builder::new()
            .name("remus-lease".into())
            .spawn(move || renew(&*leases, &h2, lease, &s2, &r2))
            .map_err(NodeError::io("spawning the lease thread"))?;
        Ok(Self { holder, stop, release, thread: Some(thread) })
    }

    /// The generation owned.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.holder.lock().generation()
    }

    /// Whether the owner may run and release output now.
    #[must_use]
    pub fn standing(&self) -> Standing {
        self.holder.lock().may_run(Instant::now())
    }

    /// The backup acknowledged an epoch sealed at `sealed_at`.
    pub fn backup_heard(&self, sealed_at: Instant) {
        self.holder.lock().on_backup_heard(sealed_at);
    }

    /// Releases the lease for a planned move, soon, from the renewal
    /// thread, which then renews no more: the next owner takes it at once
    /// instead of waiting a lease period out. Only for an owner whose
    /// guest is held still for good and which releases no output of a
    /// later epoch.
    pub fn release(&self) {
        self.release.store(true, Ordering::Relaxed);
    }

    /// Stops renewing and returns the lease as last written, for another
    /// process of this node to [`adopt`] (none when it was superseded).
    #[must_use]
    pub fn hand_off(mut self) -> Option<Tagged> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).flatten()
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The renewal loop: a renewal whenever the holder asks for one; a lost
/// swap is read back, and only a lease of another generation or owner
/// supersedes (a renewal that was applied but not answered changed the
/// tag, not the owner). Asked to release, it writes the released lease
/// once and ends.
fn renew(
    leases: &dyn LeaseStore,
    holder: &Mutex<LeaseHolder>,
    mut lease: Tagged,
    stop: &AtomicBool,
    release: &AtomicBool,
) -> Option<Tagged> {
    loop {
        let now = Instant::now();
        // A release asked for is written even when the owner stops at once
        // (the primary that moved its guest away ends right after).
        if release.load(Ordering::Relaxed) {
            let guest = lease.lease.guest;
            return match leases.replace(&lease.lease.released(), &lease.tag) {
                Ok(t) => {
                    tracing::info!(%guest, lease = %t.lease, "lease released for the move");
                    Some(t)
                }
                Err(e) => {
                    // The next owner then waits the lease out, as after a failure.
                    tracing::warn!(%guest, error = %e, "the lease could not be released; the next owner waits it out");
                    None
                }
            };
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if !holder.lock().poll_renewal(now) {
            let next = holder.lock().poll_timeout().unwrap_or(now + Duration::from_millis(50));
            std::thread::sleep(next.saturating_duration_since(now).clamp(Duration::from_millis(1), Duration::from_millis(50)));
            continue;
        }
        let guest = lease.lease.guest;
        match leases.replace(&lease.lease.renewed(), &lease.tag) {
            Ok(t) => {
                lease = t;
                holder.lock().on_renewed(now);
            }
            Err(WitnessError::Lost(_)) => match leases.read(guest) {
                // Marked released by someone else: a taker may take it at
                // once, so this owner stops as if taken over.
                Ok(Some(t)) if t.lease.released => {
                    tracing::error!(%guest, lease = %t.lease, "the lease was marked released by another writer; this primary stops");
                    holder.lock().on_superseded(t.lease);
                    return None;
                }
                Ok(Some(t)) if t.lease.generation == lease.lease.generation && t.lease.owner == lease.lease.owner => {
                    lease = t;
                    holder.lock().on_renewal_failed(now);
                }
                Ok(Some(t)) => {
                    tracing::error!(%guest, lease = %t.lease, "the guest was taken over; this primary stops");
                    holder.lock().on_superseded(t.lease);
                    return None;
                }
                Ok(None) | Err(_) => holder.lock().on_renewal_failed(now),
            },
            Err(e) => {
                tracing::debug!(%guest, error = %e, "lease renewal failed; trying again");
                holder.lock().on_renewal_failed(now);
            }
        }
    }
    Some(lease)
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_witness::MemoryLeases;

    fn witness(leases: &Arc<MemoryLeases>) -> WitnessOptions {
        WitnessOptions { leases: Arc::clone(leases) as Arc<dyn LeaseStore>, node: "site-b".into(), timing: Timing::default() }
    }

    #[test]
    fn a_handed_off_lease_is_adopted_at_once_and_a_changed_one_is_not() {
        let leases = Arc::new(MemoryLeases::default());
        let w = witness(&leases);
        let g = GuestId(1);
        let (holder, lease) = acquire(&w, g, |_| {}).unwrap();
        let renewal = Renewal::start(&w, holder, lease).unwrap();
        let handed = renewal.hand_off().expect("the lease as last written");
        let t0 = Instant::now();
        let (holder, adopted) = adopt(&w, g, handed.lease.generation, &handed.tag).unwrap().expect("adopted");
        assert!(t0.elapsed() < w.timing.lease, "no lease period waited out");
        assert_eq!(adopted.lease.generation, 1);
        assert_eq!(holder.generation(), 1);
        // The version handed off is gone now: adopting it again fails, as
        // it would after anyone else's write.
        assert!(adopt(&w, g, 1, &handed.tag).unwrap().is_none());
        assert!(adopt(&w, g, 2, &adopted.tag).unwrap().is_none(), "another generation");
        let other = WitnessOptions { node: "site-c".into(), ..witness(&leases) };
        assert!(adopt(&other, g, 1, &adopted.tag).unwrap().is_none(), "another node");
    }

    /// Waits (at most a few lease periods) until `cond` holds.
    fn eventually(w: &WitnessOptions, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + w.timing.lease * 10;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        cond()
    }

    #[test]
    fn a_release_is_written_once_and_a_release_by_another_writer_stops_the_owner() {
        let leases = Arc::new(MemoryLeases::default());
        let w = witness(&leases);
        let g = GuestId(1);
        // The owner's own release: the same generation, marked, and no
        // renewal after it.
        let (holder, lease) = acquire(&w, g, |_| {}).unwrap();
        let renewal = Renewal::start(&w, holder, lease).unwrap();
        renewal.release();
        assert!(eventually(&w, || leases.read(g).unwrap().is_some_and(|t| t.lease.released)), "released");
        let released = leases.read(g).unwrap().unwrap();
        assert_eq!(released.lease.generation, 1);
        drop(renewal);
        assert_eq!(leases.read(g).unwrap().unwrap().tag, released.tag, "nothing written after the release");
        // Marked released by another writer (stolen witness credentials): a
        // taker could take it at once, so the owner stops.
        let g2 = GuestId(2);
        let (holder, lease) = acquire(&w, g2, |_| {}).unwrap();
        let renewal = Renewal::start(&w, holder, lease).unwrap();
        let current = leases.read(g2).unwrap().unwrap();
        leases.replace(&current.lease.released(), &current.tag).unwrap();
        assert!(eventually(&w, || matches!(renewal.standing(), Standing::Superseded(_))), "the owner stops");
    }
}

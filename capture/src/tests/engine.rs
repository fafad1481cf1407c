//! The epoch engine on a virtual clock with a fake guest: when epochs are
//! sealed, and the output-commit rule (released only on the ack of its
//! epoch, never twice, never lost across reconnects and repeated acks).

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use remus_types::{Checkpoint, EpochId, GuestId, Pfn, PAGE_SIZE};

use crate::{CaptureError, DeviceState, DirtyLog, DiskTap, EpochEngine, MemoryView, OutputBuffer, Pause};

const PERIOD: Duration = Duration::from_millis(25);

/// A guest with no memory to speak of that emits output right up to each
/// pause and right after each resume, the edges where an epoch's output
/// is easiest to misattribute. It counts its epochs itself (one per
/// pause), so what it expects of each item does not depend on the engine.
struct FakeGuest {
    output: Arc<OutputBuffer<Vec<u8>>>,
    /// Ids for the items it emits itself, and the epoch each must carry.
    emitted: Vec<(u64, EpochId)>,
    next_item: u64,
    /// The epoch it runs in, by its own count.
    epoch: EpochId,
    paused: bool,
    quiesced: bool,
    /// Refuse to pause (a guest whose control channel failed).
    cannot_pause: bool,
}

impl FakeGuest {
    fn new(output: Arc<OutputBuffer<Vec<u8>>>) -> Self {
        Self { output, emitted: Vec::new(), next_item: 1 << 32, epoch: EpochId(1), paused: false, quiesced: false, cannot_pause: false }
    }

    fn emit(&mut self) {
        assert!(!self.paused, "a paused guest emits nothing");
        let id = self.next_item;
        self.next_item += 1;
        self.output.push(id.to_le_bytes().to_vec());
        self.emitted.push((id, self.epoch));
    }
}

impl Pause for FakeGuest {
    fn pause(&mut self) -> Result<(), CaptureError> {
        assert!(!self.quiesced || !self.paused, "checkpoint after the final one");
        if self.cannot_pause {
            return Err(CaptureError::Stopped("cannot pause".into()));
        }
        // The last output before the pause belongs to this epoch.
        if !self.quiesced {
            self.emit();
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), CaptureError> {
        assert!(self.paused, "resumed without a pause");
        self.epoch = self.epoch.next();
        if !self.quiesced {
            self.paused = false;
            // The first output after the resume belongs to the next one.
            self.emit();
        }
        Ok(())
    }

    fn hold(&mut self, _held: bool) {}

    fn quiesce(&mut self) {
        self.quiesced = true;
    }
}

impl DirtyLog for FakeGuest {
    fn exact_tracking(&self) -> bool {
        true
    }

    fn collect_paused(&mut self, pfns: &mut Vec<u64>) -> Result<(), CaptureError> {
        assert!(self.paused, "pages collected from a running guest");
        pfns.push(self.epoch.0 % 4);
        Ok(())
    }
}

impl MemoryView for FakeGuest {
    fn page_count(&self) -> u64 {
        4
    }

    fn copy_pages(&self, pfns: &[u64], out: &mut Vec<u8>) {
        assert!(self.paused, "memory copied from a running guest");
        for _ in pfns {
            out.extend_from_slice(&[self.epoch.0 as u8; PAGE_SIZE]);
        }
    }
}

impl DiskTap for FakeGuest {}

impl DeviceState for FakeGuest {
    fn take_device_state(&mut self, cp: &mut Checkpoint) -> Result<(), CaptureError> {
        cp.device_state = cp.epoch.0.to_le_bytes().to_vec();
        Ok(())
    }
}

/// The engine, its clock, and what was released, checked as it goes.
struct Sim {
    engine: EpochEngine<FakeGuest>,
    output: Arc<OutputBuffer<Vec<u8>>>,
    now: Instant,
    /// Items the test emitted while the guest ran, with their epoch.
    pushed: Vec<(u64, EpochId)>,
    next_item: u64,
    released: Vec<u64>,
    /// Highest ack fed in, as the engine may count it (up to the sealed).
    max_ack: EpochId,
    seals: Vec<Instant>,
    /// Epochs sealed with their output released at once.
    ahead: Vec<EpochId>,
}

impl Sim {
    fn new() -> Self {
        Self::with(false)
    }

    /// With `ahead`, the engine releases its first copy's output at the
    /// seals ([`EpochEngine::releasing_ahead`]).
    fn with(ahead: bool) -> Self {
        let output = Arc::new(OutputBuffer::default());
        let now = Instant::now();
        let mut engine = EpochEngine::new(GuestId(1), FakeGuest::new(Arc::clone(&output)), Arc::clone(&output), PERIOD, now);
        if ahead {
            engine = engine.releasing_ahead();
        }
        Self {
            engine,
            output,
            now,
            pushed: Vec::new(),
            next_item: 0,
            released: Vec::new(),
            max_ack: EpochId(0),
            seals: Vec::new(),
            ahead: Vec::new(),
        }
    }

    /// The guest emits an item while running (in the open epoch).
    fn emit(&mut self) {
        let epoch = self.engine.sealed().next();
        let id = self.next_item;
        self.next_item += 1;
        assert_eq!(self.output.push(id.to_le_bytes().to_vec()), epoch);
        self.pushed.push((id, epoch));
    }

    /// Advances the virtual clock, sealing every epoch that falls due.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        while let Some(due) = self.engine.poll_timeout().filter(|d| *d <= self.now) {
            let cp = self.engine.handle_timeout(self.now, 0).unwrap().expect("due, so sealed");
            assert_eq!(cp.epoch, self.engine.sealed());
            assert!(due <= self.now);
            self.seals.push(self.now);
            if cp.released_ahead {
                // From the first on, without a gap: once an epoch was held
                // none is released ahead again.
                assert_eq!(self.ahead.len() as u64 + 1, cp.epoch.0, "released ahead after a held epoch");
                self.ahead.push(cp.epoch);
            }
            let items = self.engine.take_released_ahead();
            self.take_items(items);
            self.check();
        }
    }

    fn take_items(&mut self, items: Vec<Vec<u8>>) {
        for item in items {
            let id = u64::from_le_bytes(item.try_into().expect("8-byte item"));
            self.released.push(id);
        }
    }

    fn ack(&mut self, epoch: EpochId) {
        let counted = epoch.min(self.engine.sealed());
        self.max_ack = self.max_ack.max(counted);
        let items = self.engine.handle_ack(epoch, self.now);
        self.take_items(items);
        self.check();
    }

    /// The epoch every item must carry, test's and guest's alike.
    fn epoch_of(&self, id: u64) -> EpochId {
        self.pushed.iter().chain(&self.engine.guest().emitted).find(|(i, _)| *i == id).expect("released item was pushed").1
    }

    /// Never before its epoch's ack (unless its epoch was released
    /// ahead), never twice, in the order pushed.
    fn check(&self) {
        let mut seen = std::collections::HashSet::new();
        for &id in &self.released {
            assert!(seen.insert(id), "item {id} released twice");
            let e = self.epoch_of(id);
            assert!(
                e <= self.max_ack || self.ahead.contains(&e),
                "item {id} of epoch {e} released with only epoch {} acknowledged",
                self.max_ack
            );
        }
        // Every item of an acknowledged or released-ahead epoch is out
        // (nothing held back or lost).
        let all = self.pushed.iter().chain(&self.engine.guest().emitted);
        for (id, e) in all {
            if *e <= self.max_ack || self.ahead.contains(e) {
                assert!(seen.contains(id), "item {id} of acknowledged epoch {e} was never released");
            }
        }
        // Push order within the release stream (ids of one source ascend).
        let mine: Vec<u64> = self.released.iter().copied().filter(|id| *id < 1 << 32).collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "released out of order: {mine:?}");
    }
}

#[test]
fn seals_once_a_period_on_the_virtual_clock_and_does_not_burst_after_a_stall() {
    let mut sim = Sim::new();
    sim.advance(PERIOD / 2);
    assert_eq!(sim.engine.sealed(), EpochId(0), "nothing is due before a period has passed");
    sim.advance(PERIOD / 2);
    assert_eq!(sim.engine.sealed(), EpochId(1));
    sim.advance(PERIOD * 3);
    assert_eq!(sim.engine.sealed(), EpochId(2), "a stall of three periods seals once, not three times");
    assert_eq!(sim.engine.poll_timeout(), Some(sim.now + PERIOD), "the next epoch is a full period after the late one");
    for _ in 0..8 {
        sim.advance(PERIOD);
    }
    assert_eq!(sim.engine.sealed(), EpochId(10));
    assert!(sim.seals.windows(2).skip(2).all(|w| w[1] - w[0] == PERIOD));
}

#[test]
fn output_waits_for_its_epochs_ack_and_is_released_once() {
    let mut sim = Sim::new();
    sim.emit();
    sim.advance(PERIOD); // seals epoch 1
    sim.emit(); // epoch 2
    sim.advance(PERIOD); // seals epoch 2
    sim.emit(); // epoch 3, open
    sim.ack(EpochId(0));
    assert!(sim.released.is_empty(), "ack 0 releases nothing");
    sim.ack(EpochId(1));
    assert_eq!(sim.released, [0, 1 << 32], "epoch 1: the item before it and the guest's last before the pause");
    sim.ack(EpochId(1));
    sim.ack(EpochId(0));
    assert_eq!(sim.released.len(), 2, "a repeated or stale ack releases nothing again");
    sim.ack(EpochId(2));
    assert_eq!(sim.released.len(), 5);
    assert_eq!(sim.output.held(), 2, "epoch 3 is open: its items stay held");
}

#[test]
fn a_continued_history_seals_after_the_committed_epoch_and_releases_nothing_early() {
    let output = Arc::new(OutputBuffer::default());
    // The guest speaks before the engine learns where the history stands.
    output.push(b"early".to_vec());
    let now = Instant::now();
    let guest = FakeGuest::new(Arc::clone(&output));
    let mut engine = EpochEngine::new(GuestId(1), guest, Arc::clone(&output), PERIOD, now).after(EpochId(41));
    assert_eq!((engine.sealed(), engine.acked()), (EpochId(41), EpochId(41)));
    assert!(engine.handle_ack(EpochId(41), now).is_empty(), "the committed epoch's ack releases nothing of this run");
    let cp = engine.handle_timeout(now + PERIOD, 0).unwrap().expect("due");
    assert_eq!(cp.epoch, EpochId(42));
    let released = engine.handle_ack(EpochId(42), now + PERIOD);
    assert_eq!(released.first().map(Vec::as_slice), Some(&b"early"[..]), "what the guest said first goes out with the first epoch");
    assert_eq!(output.held(), 1, "the guest's item after the resume belongs to epoch 43");
}

#[test]
fn a_first_copy_released_ahead_releases_at_the_seals_until_the_first_epoch_is_acknowledged() {
    let mut sim = Sim::with(true);
    sim.emit();
    sim.advance(PERIOD); // seals 1: its output goes out at once
    assert_eq!(sim.ahead, [EpochId(1)]);
    assert_eq!(sim.released, [0, 1 << 32]);
    sim.emit();
    sim.advance(PERIOD); // 2, still before epoch 1's ack
    assert_eq!(sim.ahead, [EpochId(1), EpochId(2)]);
    assert_eq!(sim.output.held(), 1, "only the open epoch's item waits");
    sim.ack(EpochId(1));
    sim.emit();
    sim.advance(PERIOD); // 3: protected now, held for its ack
    assert_eq!(sim.ahead, [EpochId(1), EpochId(2)], "epoch 3 is not released ahead");
    assert_eq!(
        sim.output.held(),
        4,
        "epoch 3's three items (the test's, the guest's after the last resume and before this pause) and the open epoch's"
    );
    sim.ack(EpochId(2));
    assert_eq!(sim.output.held(), 4, "epoch 2's ack releases nothing more");
    sim.ack(EpochId(3));
    assert_eq!(sim.output.held(), 1);
    // A continued history: this run's first epoch is 42, released ahead
    // until its ack (the primary asks for this only for a new guest).
    let output = Arc::new(OutputBuffer::default());
    let guest = FakeGuest::new(Arc::clone(&output));
    let now = Instant::now();
    let mut engine = EpochEngine::new(GuestId(1), guest, Arc::clone(&output), PERIOD, now).after(EpochId(41)).releasing_ahead();
    let cp = engine.handle_timeout(now + PERIOD, 0).unwrap().expect("due");
    assert!(cp.released_ahead);
    assert_eq!(engine.take_released_ahead().len(), 1, "the guest's item before the pause");
    engine.handle_ack(EpochId(42), now + PERIOD);
    assert!(!engine.handle_timeout(now + PERIOD * 2, 0).unwrap().expect("due").released_ahead, "after this run's first ack: held");
}

#[test]
fn epochs_are_released_ahead_until_the_backup_has_caught_up_or_the_catch_up_limit_has_passed() {
    // The backup acknowledges 10 periods after each seal (a backlog behind
    // the first copy), then 1 period after: caught up (within 2 periods).
    let mut sim = Sim::with(true);
    for _ in 0..10 {
        sim.advance(PERIOD);
    }
    sim.ack(EpochId(1));
    sim.advance(PERIOD);
    assert_eq!(sim.ahead.len(), 11, "still behind: epoch 11 released ahead too");
    sim.ack(EpochId(10));
    sim.advance(PERIOD);
    assert_eq!(sim.ahead.len(), 11, "epoch 10, acknowledged 2 periods after its seal: caught up, epoch 12 held");
    assert!(sim.output.held() > 0);
    // A backup that never catches up: released ahead for at most
    // CATCH_UP after the first acknowledgement.
    let mut sim = Sim::with(true);
    let target = crate::engine::CATCH_UP;
    for _ in 0..10 {
        sim.advance(PERIOD);
    }
    let mut acked = 0;
    while sim.ahead.len() == sim.engine.sealed().0 as usize {
        acked += 1;
        sim.ack(EpochId(acked));
        sim.advance(PERIOD);
        assert!(sim.seals.len() < 10 + (target.as_millis() / PERIOD.as_millis()) as usize + 2, "released ahead past the target");
    }
    assert!(sim.ahead.len() >= 10 + (target.as_millis() / PERIOD.as_millis()) as usize - 1, "ended early: {}", sim.ahead.len());
    // Acknowledgements that stop after the first: the limit holds all the same.
    let mut sim = Sim::with(true);
    for _ in 0..10 {
        sim.advance(PERIOD);
    }
    sim.ack(EpochId(1));
    for _ in 0..(target.as_millis() / PERIOD.as_millis()) + 2 {
        sim.advance(PERIOD);
    }
    let sealed = sim.engine.sealed().0 as usize;
    assert!(sim.ahead.len() < sealed, "still released ahead {} of {sealed} with no acknowledgement since the first", sim.ahead.len());
}

#[test]
fn an_ack_beyond_the_last_sealed_epoch_never_releases_the_open_epoch() {
    let mut sim = Sim::new();
    sim.advance(PERIOD);
    sim.emit(); // open epoch 2
    sim.ack(EpochId(7));
    assert_eq!(sim.engine.acked(), EpochId(1), "an ack counts up to the sealed epoch only");
    assert_eq!(sim.output.held(), 2, "the open epoch's items are not released");
    sim.advance(PERIOD);
    sim.ack(EpochId(2));
    assert_eq!(sim.output.held(), 1, "only the guest's item after the resume is left");
}

#[test]
fn stop_seals_one_last_quiesced_epoch_and_finishes_on_its_ack() {
    let mut sim = Sim::new();
    sim.advance(PERIOD);
    sim.emit();
    sim.engine.stop();
    assert!(!sim.engine.finished());
    sim.advance(PERIOD);
    assert!(sim.engine.all_sealed());
    assert_eq!(sim.engine.poll_timeout(), None, "nothing is due after the last epoch");
    sim.advance(PERIOD * 4);
    assert_eq!(sim.engine.sealed(), EpochId(2));
    assert!(!sim.engine.finished(), "the last epoch is not acknowledged yet");
    sim.ack(EpochId(2));
    assert!(sim.engine.finished());
    assert_eq!(sim.output.held(), 0, "the guest was still after the last pause: nothing is left held");
}

#[test]
fn a_guest_that_cannot_pause_seals_nothing() {
    let mut sim = Sim::new();
    sim.emit();
    sim.engine.guest_mut().cannot_pause = true;
    let err = sim.engine.seal(0).unwrap_err();
    assert!(matches!(err, CaptureError::Stopped(_)), "{err}");
    assert_eq!(sim.engine.sealed(), EpochId(0), "the epoch was not sealed");
    sim.ack(EpochId(1));
    assert!(sim.released.is_empty(), "nothing released for an epoch that was never sealed");
    assert_eq!(sim.output.held(), 1);
}

#[test]
fn a_checkpoint_carries_the_pages_and_device_state_taken_in_its_pause() {
    let mut sim = Sim::new();
    sim.advance(PERIOD);
    sim.advance(PERIOD);
    let cp = sim.engine.seal(0).unwrap();
    assert_eq!((cp.epoch, cp.page_count, cp.pfns.as_slice()), (EpochId(3), 4, &[Pfn(3)][..]));
    assert_eq!(cp.pages, vec![3u8; PAGE_SIZE], "copied while the guest was in epoch 3");
    assert_eq!(cp.device_state, 3u64.to_le_bytes());
    assert!(!sim.engine.guest().paused, "resumed after the checkpoint");
}

#[derive(Debug, Clone)]
enum Op {
    Emit,
    Advance(u64),
    /// An ack of the sealed epoch minus this (a late or replayed one).
    AckBehind(u64),
    /// An ack past the sealed epoch (a confused peer).
    AckAhead(u64),
    /// A reconnect: the backup's Welcome replays its committed epoch,
    /// which is at most what it acknowledged before.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Emit),
        3 => (1u64..80).prop_map(Op::Advance),
        3 => (0u64..4).prop_map(Op::AckBehind),
        1 => (1u64..3).prop_map(Op::AckAhead),
        1 => Just(Op::Reconnect),
    ]
}

proptest! {
    /// Any interleaving of output, time, and late, repeated, early or
    /// replayed acks: nothing released before its epoch's ack, nothing
    /// twice, and once the final epoch is acknowledged nothing is lost.
    #[test]
    fn output_commit_holds_under_any_ack_order(ops in proptest::collection::vec(op(), 1..120), ahead in any::<bool>()) {
        let mut sim = Sim::with(ahead);
        for op in ops {
            match op {
                Op::Emit => sim.emit(),
                Op::Advance(ms) => sim.advance(Duration::from_millis(ms)),
                Op::AckBehind(k) => sim.ack(EpochId(sim.engine.sealed().0.saturating_sub(k))),
                Op::AckAhead(k) => sim.ack(EpochId(sim.engine.sealed().0 + k)),
                Op::Reconnect => sim.ack(EpochId(sim.max_ack.0 / 2)),
            }
        }
        sim.engine.stop();
        sim.advance(PERIOD * 2);
        prop_assert!(sim.engine.all_sealed());
        sim.ack(sim.engine.sealed());
        prop_assert!(sim.engine.finished());
        prop_assert_eq!(sim.output.held(), 0);
        let total = sim.pushed.len() + sim.engine.guest().emitted.len();
        prop_assert_eq!(sim.released.len(), total, "every item released exactly once");
    }
}

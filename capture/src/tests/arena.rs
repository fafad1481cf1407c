//! Engine-level tests on a real arena guest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use remus_types::{now_unix_nanos, EpochId, GuestId, PAGE_SIZE};

use crate::*;

fn apply(shadow: &mut [u8], cp: &remus_types::Checkpoint) {
    for (i, pfn) in cp.pfns.iter().enumerate() {
        shadow[pfn.0 as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(cp.page(i));
    }
}

/// Rebuilds memory from checkpoints alone and compares it byte for byte
/// with the guest's own memory: no written page may ever be missed.
fn replay_matches(tracking: TrackingMode) {
    let cfg = ArenaConfig {
        memory_mib: 16,
        tracking,
        workload: WorkloadConfig { pages_per_sec: 100_000, output_interval_ms: 2, ..WorkloadConfig::default() },
    };
    let out = Arc::new(OutputBuffer::default());
    let guest = ArenaGuest::start(&cfg, Arc::clone(&out)).unwrap();
    let mut engine = EpochEngine::new(GuestId(1), guest, Arc::clone(&out), Duration::from_millis(5), Instant::now());
    let started = Instant::now();
    let mut shadow = vec![0u8; engine.guest().page_count() as usize * PAGE_SIZE];
    let mut dirty_total = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(5));
        let cp = engine.seal(now_unix_nanos()).unwrap();
        dirty_total += cp.pfns.len();
        apply(&mut shadow, &cp);
    }
    engine.guest_mut().stop_workload();
    // The writer's own CPU time, counted once it stopped: some, and no
    // more than the time it ran.
    let cpu = engine.guest().cpu_time();
    assert!(cpu > Duration::ZERO && cpu <= started.elapsed(), "writer CPU {cpu:?} over {:?}", started.elapsed());
    let last = engine.seal(now_unix_nanos()).unwrap();
    apply(&mut shadow, &last);
    assert!(dirty_total > 100, "workload wrote too little: {dirty_total}");
    assert!(shadow == engine.guest().snapshot(), "replayed checkpoints differ from guest memory");

    // Output commit: held until acked, then released in order.
    assert!(out.held() > 0, "workload produced no output");
    let before = out.held();
    assert!(engine.handle_ack(EpochId(0), Instant::now()).is_empty());
    let released = engine.handle_ack(last.epoch, Instant::now());
    assert_eq!(released.len(), before);
    assert!(String::from_utf8_lossy(&released[0]).starts_with("tick 1:"));
}

#[test]
fn write_protect_tracking_is_exact() {
    replay_matches(TrackingMode::WriteProtect);
}

#[test]
fn hash_tracking_is_exact() {
    replay_matches(TrackingMode::Hash);
}

#[test]
fn a_held_guest_writes_and_says_nothing_until_let_go() {
    let cfg = ArenaConfig {
        memory_mib: 16,
        tracking: TrackingMode::WriteProtect,
        workload: WorkloadConfig { pages_per_sec: 100_000, output_interval_ms: 1, ..WorkloadConfig::default() },
    };
    let out = Arc::new(OutputBuffer::default());
    let guest = ArenaGuest::start(&cfg, Arc::clone(&out)).unwrap();
    let mut engine = EpochEngine::new(GuestId(1), guest, Arc::clone(&out), Duration::from_millis(5), Instant::now());
    let seal = |engine: &mut EpochEngine<ArenaGuest>| engine.seal(now_unix_nanos()).unwrap().pfns.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seal(&mut engine) == 0 {
        assert!(Instant::now() < deadline, "the workload never wrote");
        std::thread::sleep(Duration::from_millis(2));
    }
    engine.guest_mut().hold(true);
    // The first checkpoint after the hold takes what was written before it.
    seal(&mut engine);
    let said = out.held();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(seal(&mut engine), 0, "a held guest wrote");
    }
    assert_eq!(out.held(), said, "a held guest said something");
    engine.guest_mut().hold(false);
    while seal(&mut engine) == 0 {
        assert!(Instant::now() < deadline, "the guest never ran again");
        std::thread::sleep(Duration::from_millis(2));
    }
    engine.guest_mut().stop_workload();
}

#[test]
fn bad_config_is_refused() {
    let out = Arc::new(OutputBuffer::default());
    let cfg = ArenaConfig { memory_mib: 0, ..ArenaConfig::default() };
    assert!(matches!(ArenaGuest::start(&cfg, Arc::clone(&out)), Err(CaptureError::Config(_))));
    let mut cfg = ArenaConfig { memory_mib: 4, ..ArenaConfig::default() };
    cfg.workload.hot_fraction = 0.0;
    assert!(matches!(ArenaGuest::start(&cfg, out), Err(CaptureError::Config(_))));
}

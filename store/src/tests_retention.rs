//! Thinning and GC on a real RocksDB, alone and while commits go on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use remus_types::{ChunkId, EpochId, GuestId, Pfn, PAGE_SIZE};

use crate::*;
use remus_types::content_id;

const MS: u64 = 1_000_000;

fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    p[..8].copy_from_slice(&seed.to_le_bytes());
    p[100] = seed as u8;
    p
}

/// Epoch `e` writes 6 pages (1 ms apart): 4 new contents and 2 references
/// to content the previous epoch wrote (sent as references, without
/// their bytes, unless `full`).
fn commit_for(guest: GuestId, e: u64, full: bool) -> (EpochCommit, Vec<(u64, u64)>) {
    let mut c =
        EpochCommit { guest, epoch: EpochId(e), page_count: 64, time_unix_ns: e * MS, commit_unix_ns: e * MS, ..Default::default() };
    let mut writes = Vec::new();
    for k in 0..6u64 {
        let pfn = (e * 7 + k * 11) % 64;
        let seed = if k < 4 || e == 1 { e * 10 + k } else { (e - 1) * 10 + k };
        let p = page(seed);
        let id = content_id(&p);
        c.pages.push((Pfn(pfn), id));
        if full || k < 4 || e == 1 {
            c.chunks.push((id, StoredChunk::Zstd(zstd::bulk::compress(&p, 1).unwrap())));
        }
        writes.push((pfn, seed));
    }
    c.device_state = vec![e as u8; 3];
    (c, writes)
}

/// Commits epoch `e`, resending full content when a referenced chunk was
/// collected meanwhile (as a primary does after a refused commit); also
/// returns the chunks the refusal named.
fn commit_refused(store: &Store, guest: GuestId, e: u64) -> (Vec<(u64, u64)>, Vec<ChunkId>) {
    let (c, writes) = commit_for(guest, e, false);
    let sent: Vec<ChunkId> = c.chunks.iter().map(|(id, _)| *id).collect();
    let referenced: Vec<ChunkId> = c.pages.iter().map(|(_, id)| *id).filter(|id| !sent.contains(id)).collect();
    match store.commit(c) {
        Ok(_) => (writes, Vec::new()),
        Err(StoreError::Unstored { guest: g, epoch, ids }) => {
            assert_eq!((g, epoch), (guest, EpochId(e)));
            // References whose chunk is gone, each once (exactness is
            // tested in tests.rs: GC may run beside this check).
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats: {ids:?}");
            assert!(ids.iter().all(|id| referenced.contains(id) && !store.has_chunk(id).unwrap()), "{ids:?}");
            assert_eq!(store.head(guest).unwrap().map(|h| h.epoch), Some(EpochId(e - 1)), "nothing of a refused epoch is written");
            store.commit(commit_for(guest, e, true).0).unwrap();
            (writes, ids)
        }
        Err(e) => panic!("{e}"),
    }
}

fn commit(store: &Store, guest: GuestId, e: u64) -> Vec<(u64, u64)> {
    commit_refused(store, guest, e).0
}

fn check_restores(store: &Store, guest: GuestId, states: &[BTreeMap<u64, u64>]) -> usize {
    let mut kept = 0;
    for m in store.manifests(guest).unwrap() {
        let want = &states[m.epoch.0 as usize - 1];
        let mut got = BTreeMap::new();
        store
            .for_each_page_at(guest, m.epoch, |pfn, id| {
                let data = store.chunk(&id)?;
                got.insert(pfn.0, u64::from_le_bytes(data[..8].try_into().unwrap()));
                Ok(())
            })
            .unwrap();
        assert_eq!(&got, want, "kept epoch {} restores exactly", m.epoch);
        kept += 1;
    }
    kept
}

/// Commits epochs 1..=n of `guest` (see `commit`); the page state after each.
fn commit_epochs(store: &Store, guest: GuestId, n: u64) -> Vec<BTreeMap<u64, u64>> {
    let mut state = BTreeMap::new();
    (1..=n)
        .map(|e| {
            state.extend(commit(store, guest, e));
            state.clone()
        })
        .collect()
}

/// Every epoch of the last 20 ms, then one per 7 ms up to 200 ms.
fn every_7_ms_after_20() -> RetentionPolicy {
    let ms = Duration::from_millis;
    RetentionPolicy { rules: vec![KeepRule { within: ms(20), every: ms(0) }, KeepRule { within: ms(200), every: ms(7) }] }
}

#[test]
fn epochs_stamped_far_ahead_or_far_back_by_their_primary_thin_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(9);
    let before = remus_types::now_unix_nanos();
    for e in 1..=5 {
        let (mut c, _) = commit_for(g, e, true);
        // The store's own clock, and the primary's claims: epoch 2 says it
        // was taken in 1970, the last ten years from now.
        c.commit_unix_ns = 0;
        c.time_unix_ns = match e {
            2 => 1,
            5 => before + 10 * 365 * 86_400 * 1_000_000_000,
            _ => before + e * MS,
        };
        store.commit(c).unwrap();
    }
    let after = remus_types::now_unix_nanos();
    let policy = RetentionPolicy { rules: vec![KeepRule { within: Duration::from_secs(3600), every: Duration::ZERO }] };
    assert_eq!(store.thin(g, &policy, EpochId(5)).unwrap().epochs_dropped, 0, "an hour's epochs are kept, whatever the primary claims");
    let times: Vec<u64> = store.manifests(g).unwrap().iter().map(|m| m.commit_unix_ns).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "commit times ascend: {times:?}");
    assert!(times.iter().all(|t| (before..=after).contains(t)), "the backup's clock: {times:?}");
}

#[test]
fn the_policy_keeps_every_recent_epoch_then_one_per_slot() {
    let ms = Duration::from_millis;
    let p = RetentionPolicy { rules: vec![KeepRule { within: ms(10), every: ms(0) }, KeepRule { within: ms(50), every: ms(10) }] };
    let epochs: Vec<(EpochId, u64)> = (1..=100).map(|e| (EpochId(e), e * MS)).collect();
    let mut keep: Vec<u64> = p.keep(&epochs).into_iter().map(|e| e.0).collect();
    keep.sort_unstable();
    // Newest at 100 ms: 90..=100 all; 50..90 one per 10 ms slot (oldest
    // of each); older than 50 ms dropped.
    assert_eq!(keep, vec![50, 60, 70, 80, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100]);
    assert_eq!(RetentionPolicy::standard().rules.len(), 4);
}

#[test]
fn thinning_keeps_every_kept_epoch_byte_exact_and_the_chain_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    let states = commit_epochs(&store, g, 120);
    let ms = Duration::from_millis;
    let policy = every_7_ms_after_20();
    // Two rounds, the second coarser: runs merge with existing bridges.
    let r = store.thin(g, &policy, EpochId(60)).unwrap();
    assert!(r.epochs_dropped > 40 && r.pages_dropped > 0, "{r:?}");
    assert_eq!(check_restores(&store, g, &states), 120 - r.epochs_dropped as usize);
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    let coarser = RetentionPolicy { rules: vec![KeepRule { within: ms(20), every: ms(0) }, KeepRule { within: ms(200), every: ms(30) }] };
    let r2 = store.thin(g, &coarser, EpochId(120)).unwrap();
    assert!(r2.epochs_dropped > 0);
    let kept = check_restores(&store, g, &states);
    assert_eq!(kept as u64, 120 - r.epochs_dropped - r2.epochs_dropped);
    assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(120), "the newest epoch is always kept");
    let before = store.verify(|_| {}).unwrap();
    assert_eq!(before.damage, vec![]);
    let gc = store.gc().unwrap();
    assert!(gc.deleted > 0, "{gc:?}");
    assert_eq!(check_restores(&store, g, &states), kept);
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    assert!(store.verify(|_| {}).unwrap().chunks < before.chunks);

    // A bridge that does not link the kept manifests is named.
    let b = store.bridges(g).unwrap()[1];
    let next = b.last.next();
    let mut m = store.manifest(g, next).unwrap();
    m.parent = ChunkId([9; 32]);
    store.corrupt_manifest_for_test(g, next, &m.encode()).unwrap();
    let damage = store.verify(|_| {}).unwrap().damage;
    assert!(damage.contains(&Damage::ChainBroken { guest: 1, epoch: next.0 }), "{damage:?}");
}

#[test]
fn a_store_with_page_lists_in_the_earlier_form_reads_thins_and_verifies_alike() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    let states = commit_epochs(&store, g, 120);
    let lists = store.page_lists(g, EpochId(1), EpochId(120)).unwrap();
    assert_eq!(lists.len(), 120);
    // Every other epoch of the first half as a store written before kept it.
    for e in (1..=60).step_by(2) {
        store.old_form_page_list_for_test(g, EpochId(e)).unwrap();
    }
    assert_eq!(store.page_lists(g, EpochId(1), EpochId(120)).unwrap(), lists);
    // Found again when the store is opened.
    drop(store);
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.page_lists(g, EpochId(1), EpochId(120)).unwrap(), lists);
    for (e, pages) in &lists {
        assert_eq!(&store.epoch_pages(g, *e).unwrap(), pages, "epoch {e}");
    }
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    let r = store.thin(g, &every_7_ms_after_20(), EpochId(120)).unwrap();
    assert!(r.epochs_dropped > 40 && r.pages_dropped > 0, "{r:?}");
    assert_eq!(check_restores(&store, g, &states), 120 - r.epochs_dropped as usize);
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    // What thinning kept of each list is what the index kept.
    for (e, pages) in store.page_lists(g, EpochId(1), EpochId(120)).unwrap() {
        let full = &lists[e.0 as usize - 1].1;
        assert!(pages.iter().all(|p| full.contains(p)), "epoch {e}");
    }
}

#[test]
fn gc_during_ingest_never_loses_what_a_kept_epoch_needs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
    let g = GuestId(4);
    let announced = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a2 = Arc::clone(&announced);
    store.on_chunks_deleted(move |guest, ids| {
        assert_eq!(guest, GuestId(4), "only the guest whose history named them");
        a2.lock().unwrap().extend_from_slice(ids);
    });
    let done = Arc::new(AtomicBool::new(false));
    let ingest = {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut state = BTreeMap::new();
            let mut states = Vec::new();
            let mut refused = Vec::new();
            for e in 1..=400 {
                let (writes, unstored) = commit_refused(&store, g, e);
                state.extend(writes);
                states.push(state.clone());
                refused.extend(unstored);
            }
            done.store(true, Ordering::Relaxed);
            (states, refused)
        })
    };
    let ms = Duration::from_millis;
    let policy = RetentionPolicy { rules: vec![KeepRule { within: ms(15), every: ms(0) }, KeepRule { within: ms(10_000), every: ms(9) }] };
    let mut rounds = 0;
    let mut deleted = 0;
    while !done.load(Ordering::Relaxed) || rounds < 2 {
        let head = store.head(g).unwrap().map_or(EpochId(0), |h| h.epoch);
        store.thin(g, &policy, head).unwrap();
        deleted += store.gc().unwrap().deleted;
        rounds += 1;
    }
    let (states, refused) = ingest.join().unwrap();
    assert!(rounds >= 2 && deleted > 0, "{rounds} rounds, {deleted} chunks collected");
    // Watchers heard of every deletion, and commits were refused only for
    // chunks not stored, each named (checked in `commit_refused`).
    assert_eq!(announced.lock().unwrap().len() as u64, deleted);
    assert!(!refused.is_empty(), "no commit was refused");
    let kept = check_restores(&store, g, &states);
    assert!(kept < 200, "thinning dropped epochs: {kept} kept");
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
}

/// GC's deletions reach, guest by guest, only the guest whose history
/// named the chunks: a chunk two guests share is deleted (and announced)
/// only when the last one drops it, and only to that one.
#[test]
fn a_deletion_is_announced_only_to_the_guest_whose_history_named_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let heard: Arc<std::sync::Mutex<Vec<(GuestId, ChunkId)>>> = Arc::default();
    let h2 = Arc::clone(&heard);
    store.on_chunks_deleted(move |guest, ids| h2.lock().unwrap().extend(ids.iter().map(|id| (guest, *id))));
    let (a, b) = (GuestId(1), GuestId(2));
    // Both guests write the same contents: every chunk is shared.
    for e in 1..=20 {
        for g in [a, b] {
            store.commit(commit_for(g, e, true).0).unwrap();
        }
    }
    let policy = RetentionPolicy { rules: vec![KeepRule { within: Duration::from_millis(2), every: Duration::ZERO }] };
    store.thin(a, &policy, EpochId(20)).unwrap();
    assert_eq!(store.gc().unwrap().deleted, 0, "the other guest still names every chunk");
    assert!(heard.lock().unwrap().is_empty());
    store.thin(b, &policy, EpochId(20)).unwrap();
    let deleted = store.gc().unwrap().deleted;
    assert!(deleted > 0);
    let heard = heard.lock().unwrap();
    assert_eq!(heard.len() as u64, deleted, "each deleted chunk announced once");
    assert!(heard.iter().all(|(g, _)| *g == b), "only to the guest that dropped the last reference");
}

#[test]
fn usage_is_what_the_kept_epochs_charge_through_commits_thinning_reopening_and_a_store_that_never_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (GuestId(1), GuestId(2));
    let charged = |store: &Store, g: GuestId| store.manifests(g).unwrap().iter().map(Manifest::charge).sum::<u64>();
    {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(store.usage(a).unwrap(), 0);
        for e in 1..=40 {
            store.commit(commit_for(a, e, true).0).unwrap();
        }
        // B stores content of its own and content A stored first (charged
        // to A alone: B's chunks are new to it, not to the store).
        store.commit_many((1..=5).map(|e| commit_for(b, e, true).0).collect()).unwrap();
        let used = store.usage(a).unwrap();
        assert_eq!(used, charged(&store, a));
        // 40 epochs of 4 new zstd pages and a 3-byte device state each, plus
        // manifests and index entries.
        assert!(used > 40 * (4 * 10 + 4 + 252 + 6 * 48), "{used}");
        assert_eq!(store.usage(b).unwrap(), charged(&store, b));
        assert_eq!(store.usage(b).unwrap(), 5 * (252 + 6 * 48), "B stored no page or device state A had not");
        // Thinning takes away what the dropped epochs charged.
        let policy = RetentionPolicy { rules: vec![KeepRule { within: Duration::from_millis(5), every: Duration::ZERO }] };
        let r = store.thin(a, &policy, EpochId(40)).unwrap();
        assert!(r.epochs_dropped >= 30, "{r:?}");
        assert_eq!(store.usage(a).unwrap(), charged(&store, a));
        assert!(store.usage(a).unwrap() < used / 4);
    }
    // Kept across a restart, and counted once from the manifests in a
    // store written before usage was kept.
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (ua, ub) = (store.usage(a).unwrap(), store.usage(b).unwrap());
    assert_eq!(ua, charged(&store, a));
    store.forget_usage_for_test().unwrap();
    assert_eq!(store.usage(a).unwrap(), 0);
    drop(store);
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!((store.usage(a).unwrap(), store.usage(b).unwrap()), (ua, ub));
    store.commit(commit_for(a, 41, true).0).unwrap();
    assert_eq!(store.usage(a).unwrap(), charged(&store, a));
}
